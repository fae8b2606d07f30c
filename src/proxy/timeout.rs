//! The idle and half-close limits of TCP connections and SCTP associations.
//!
//! A relay does not re-arm a timer per chunk: its pumps store a coarse
//! last-activity time (a clock read through the vDSO and a relaxed store,
//! no syscall), and one timer per connection, armed for the earliest
//! deadline, checks it when it fires and re-arms for the deadline that
//! activity since has pushed back. The decision is [`check`], a pure
//! function.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

/// The limits in force (a reload changes them in place).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Limits {
    /// No byte (message) in either direction for this long: closed.
    pub idle: Option<Duration>,
    /// Half-closed and no byte for this long: closed.
    pub half_close: Option<Duration>,
}

/// Which limit ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    Idle(Duration),
    HalfClose(Duration),
}

impl std::fmt::Display for Expired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expired::Idle(d) => write!(f, "idle for {d:?} (idle_timeout)"),
            Expired::HalfClose(d) => {
                write!(f, "half-closed and silent for {d:?} (half_close_timeout)")
            }
        }
    }
}

/// What the timer does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Close the connection.
    Expired(Expired),
    /// Nothing is due yet: fire again then.
    WakeAt(Instant),
    /// No limit applies (both off, or half-close off and not half-closed).
    Never,
}

/// Whether a connection last active at `last`, half-closed or not, has
/// outlived a limit at `now`, and if not, when it next could.
pub(crate) fn check(now: Instant, last: Instant, half_closed: bool, limits: Limits) -> Verdict {
    let idle = limits.idle.map(|d| (last + d, Expired::Idle(d)));
    let half = limits
        .half_close
        .filter(|_| half_closed)
        .map(|d| (last + d, Expired::HalfClose(d)));
    let first = match (idle, half) {
        (Some(i), Some(h)) => Some(if h.0 < i.0 { h } else { i }),
        (i, h) => i.or(h),
    };
    match first {
        None => Verdict::Never,
        Some((due, why)) if due <= now => Verdict::Expired(why),
        Some((due, _)) => Verdict::WakeAt(due),
    }
}

/// When a connection last moved a byte (message), as milliseconds since it
/// started: shared by its two pumps and its timer.
#[derive(Debug)]
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Something moved now.
    pub(crate) fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    pub(crate) fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Relaxed))
    }

    /// When the connection started.
    pub(crate) fn start(&self) -> Instant {
        self.start
    }
}

/// A deadline that stands for "never" while no limit applies: far enough
/// not to matter, near enough for the timer wheel; a reload wakes the
/// relay to look again.
pub(crate) fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(7 * 24 * 3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn the_earliest_limit_decides() {
        let t0 = Instant::now();
        let both = Limits {
            idle: Some(S(3600)),
            half_close: Some(S(60)),
        };
        // Open both ways: only idle applies.
        assert_eq!(check(t0, t0, false, both), Verdict::WakeAt(t0 + S(3600)));
        // Half-closed: the shorter half-close limit.
        assert_eq!(check(t0, t0, true, both), Verdict::WakeAt(t0 + S(60)));
        assert_eq!(
            check(t0 + S(60), t0, true, both),
            Verdict::Expired(Expired::HalfClose(S(60)))
        );
        // Activity pushes it back.
        assert_eq!(
            check(t0 + S(60), t0 + S(30), true, both),
            Verdict::WakeAt(t0 + S(90))
        );
        assert_eq!(
            check(t0 + S(3600), t0, false, both),
            Verdict::Expired(Expired::Idle(S(3600)))
        );
        // A half-close limit longer than idle: idle still ends it first.
        let long_half = Limits {
            idle: Some(S(10)),
            half_close: Some(S(60)),
        };
        assert_eq!(
            check(t0 + S(10), t0, true, long_half),
            Verdict::Expired(Expired::Idle(S(10)))
        );
    }

    #[test]
    fn off_limits_never_fire() {
        let t0 = Instant::now();
        assert_eq!(
            check(t0 + S(999_999), t0, true, Limits::default()),
            Verdict::Never
        );
        let half_only = Limits {
            idle: None,
            half_close: Some(S(5)),
        };
        assert_eq!(check(t0 + S(999), t0, false, half_only), Verdict::Never);
        assert_eq!(
            check(t0 + S(5), t0, true, half_only),
            Verdict::Expired(Expired::HalfClose(S(5)))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn activity_is_kept_in_milliseconds() {
        let a = Activity::new();
        assert_eq!(a.last(), a.start());
        tokio::time::advance(Duration::from_millis(1500)).await;
        a.touch();
        assert_eq!(a.last(), a.start() + Duration::from_millis(1500));
    }
}
