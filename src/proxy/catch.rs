//! Panics stop at task boundaries: a bug in one binding's serve task, or in
//! one connection's or session's task, must not take other bindings (or
//! the binding's other connections) down with it.
//!
//! A serve task is wrapped in [`caught`], so that its end, panic or not, is
//! reported to the server ([`super::Loss::Panicked`]). Connection and
//! session tasks are spawned into their listener's `JoinSet`, which already
//! catches their panics; [`panicked`] reads the message out of the join
//! error, for the listener to log and go on.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::task::Poll;

/// Runs `f` to completion, or until a poll of it panics: then `Err` with
/// the panic's message. `f` is dropped after a panic, never polled again.
///
/// Unwind safety is asserted: after a panic nothing of `f` is used but its
/// drop, and what it shares with others (the binding's counters and stop
/// flag, atomics; locks whose users recover from poisoning) stays usable.
pub(crate) async fn caught<F: Future>(f: F) -> Result<F::Output, String> {
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(
        move |cx| match catch_unwind(AssertUnwindSafe(|| f.as_mut().poll(cx))) {
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(message(&*payload))),
        },
    )
    .await
}

/// The message of a task that panicked, or `None` for a task that was
/// cancelled (aborted, or dropped at shutdown).
pub(crate) fn panicked(e: tokio::task::JoinError) -> Option<String> {
    e.try_into_panic().ok().map(|payload| message(&*payload))
}

/// What `panic!` was given: a `&str` or a `String`, else a placeholder.
pub(crate) fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_in_a_poll_becomes_its_message() {
        let r: Result<(), String> = caught(async {
            tokio::task::yield_now().await;
            panic!("bug {}", 42);
        })
        .await;
        assert_eq!(r, Err("bug 42".to_owned()));
        let r: Result<(), String> = caught(async { std::panic::panic_any(7u8) }).await;
        assert_eq!(r, Err("a panic without a message".to_owned()));
    }

    #[tokio::test]
    async fn a_future_that_does_not_panic_is_passed_through() {
        let r = caught(async {
            tokio::task::yield_now().await;
            "done"
        })
        .await;
        assert_eq!(r, Ok("done"));
    }

    #[tokio::test]
    async fn a_join_error_gives_the_message_or_none_if_cancelled() {
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async { panic!("in a connection") });
        let e = tasks.join_next().await.unwrap().unwrap_err();
        assert_eq!(panicked(e).as_deref(), Some("in a connection"));
        let h = tokio::spawn(std::future::pending::<()>());
        h.abort();
        assert_eq!(panicked(h.await.unwrap_err()), None);
    }
}
