//! Rate-limited warnings: a flood of one kind of trouble (clients dropped
//! at a cap, sends failing, fds running out) costs one line per interval,
//! and every occurrence is still counted in some line.
//!
//! - [`Window`]: the first occurrence is logged at once; later ones within
//!   [`REPORT_INTERVAL`] are counted, and the count is logged when the
//!   interval ends (by the caller's timer, or [`Reporter`]'s task).
//! - [`Rated`]: at most one line per interval; the occurrences in between
//!   are told with the next line.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tracing::{Instrument, warn};

/// After the first warning of a kind (on one binding), further ones in this
/// interval are counted and logged together at its end.
pub(crate) const REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// One kind of warning's interval: whether one was logged and its interval
/// has not ended, and how many came since.
#[derive(Debug, Default)]
pub(crate) struct Window {
    open: bool,
    suppressed: u64,
}

impl Window {
    /// Whether this occurrence is to be logged now (the interval starts),
    /// else it is counted.
    pub(crate) fn first(&mut self) -> bool {
        if self.open {
            self.suppressed += 1;
            return false;
        }
        self.open = true;
        true
    }

    /// At the end of an interval: the occurrences counted in it, to be
    /// logged (the next interval starts), or `None` (the window closes).
    pub(crate) fn take(&mut self) -> Option<u64> {
        match std::mem::take(&mut self.suppressed) {
            0 => {
                self.open = false;
                None
            }
            n => Some(n),
        }
    }

    /// Whether an interval is running.
    pub(crate) fn is_open(&self) -> bool {
        self.open
    }
}

/// The kinds of warning a [`Reporter`] keeps apart, each with its window.
pub(crate) trait Kind: Copy + Send + Sync + 'static {
    /// How many kinds there are.
    const COUNT: usize;
    /// This kind's place among them, below [`Kind::COUNT`].
    fn index(self) -> usize;
    /// Names the occurrences of this kind in the periodic count.
    fn events(self) -> &'static str;
}

/// Rate-limited warnings shared by tasks (a UDP listener and its
/// sessions): a [`Window`] per kind, and a task per open window that logs
/// its count at each interval's end, in the binding's span.
pub(crate) struct Reporter<K: Kind> {
    windows: Box<[Mutex<Window>]>,
    /// Where the periodic counts are logged: the binding's.
    span: tracing::Span,
    kind: std::marker::PhantomData<K>,
}

impl<K: Kind> Reporter<K> {
    pub(crate) fn new(span: tracing::Span) -> Reporter<K> {
        Reporter {
            windows: (0..K::COUNT).map(|_| Mutex::default()).collect(),
            span,
            kind: std::marker::PhantomData,
        }
    }

    fn window(&self, kind: K) -> MutexGuard<'_, Window> {
        // A window is two integers: whole whatever panicked.
        self.windows[kind.index()]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs `message()` now (in the current span), or counts it for the
    /// next report.
    pub(crate) fn warn(self: &Arc<Self>, kind: K, message: impl FnOnce() -> String) {
        if !self.window(kind).first() {
            return;
        }
        warn!(
            "{}; more of these are counted and reported every {REPORT_INTERVAL:?}",
            message()
        );
        // Lives only while warnings of this kind keep coming, and holds
        // nothing but the counts (no socket).
        let me = self.clone();
        let span = self.span.clone();
        tokio::spawn(async move { me.report(kind).await }.instrument(span));
    }

    async fn report(&self, kind: K) {
        loop {
            tokio::time::sleep(REPORT_INTERVAL).await;
            let Some(n) = self.window(kind).take() else {
                return;
            };
            warn!(
                count = n,
                "{n} more {} in the last {REPORT_INTERVAL:?}",
                kind.events()
            );
        }
    }
}

/// A warning logged at most once per [`REPORT_INTERVAL`]; the times in
/// between are counted and told with the next line.
#[derive(Debug, Default)]
pub(crate) struct Rated {
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

/// How many times a rated warning was not logged since its last line.
pub(crate) struct Suppressed(u64);

impl Suppressed {
    /// The count, as the end of the line that tells it.
    pub(crate) fn since(&self) -> String {
        match self.0 {
            0 => String::new(),
            n => format!("; {n} more time(s) since the last such line ({REPORT_INTERVAL:?} apart)"),
        }
    }
}

impl Rated {
    /// Whether to log now: `Some` with the times suppressed since the last
    /// line, or `None` (counted).
    pub(crate) fn ready(&mut self) -> Option<Suppressed> {
        let now = tokio::time::Instant::now();
        match self.last {
            Some(t) if now < t + REPORT_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(Suppressed(std::mem::take(&mut self.suppressed)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_logs_the_first_and_counts_the_rest_until_quiet() {
        let mut w = Window::default();
        assert!(w.first());
        assert!(!w.first());
        assert!(!w.first());
        assert!(w.is_open());
        assert_eq!(w.take(), Some(2));
        // A quiet interval closes it; the next one is logged at once.
        assert_eq!(w.take(), None);
        assert!(!w.is_open());
        assert!(w.first());
    }

    #[tokio::test(start_paused = true)]
    async fn a_rated_warning_tells_what_it_skipped_with_the_next_line() {
        let mut r = Rated::default();
        assert_eq!(r.ready().unwrap().since(), "");
        assert!(r.ready().is_none());
        assert!(r.ready().is_none());
        tokio::time::advance(REPORT_INTERVAL).await;
        assert_eq!(
            r.ready().unwrap().since(),
            "; 2 more time(s) since the last such line (10s apart)"
        );
    }
}
