//! Memory back to the kernel after a burst: every TCP connection, SCTP
//! association and UDP session holds an [`Open`] while it lives, and when
//! many have ended since the last trim, the last one to end asks the
//! allocator to release its free pages ([`crate::sys::release_free_memory`]).
//! No timer, and nothing while the count grows or holds steady.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Open connections and sessions, process-wide.
static OPEN: AtomicUsize = AtomicUsize::new(0);
/// The most open at once since the last trim.
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Fewer than this many ended since the last trim is not worth one (their
/// buffers are a few hundred KiB at most, and the allocator reuses them).
const WORTH_IT: usize = 64;

/// True when a trim is due: the count fell to zero after at least
/// [`WORTH_IT`], or to half a peak of at least twice that.
pub(crate) fn trim_due(peak: usize, now: usize) -> bool {
    let ended = peak.saturating_sub(now);
    ended >= WORTH_IT && (now == 0 || (peak >= 2 * WORTH_IT && now <= peak / 2))
}

/// One open connection or session.
pub(crate) struct Open(());

impl Open {
    pub(crate) fn new() -> Open {
        let now = OPEN.fetch_add(1, Relaxed) + 1;
        PEAK.fetch_max(now, Relaxed);
        Open(())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let now = OPEN.fetch_sub(1, Relaxed) - 1;
        let peak = PEAK.load(Relaxed);
        // Only the thread that resets the peak trims.
        if trim_due(peak, now) && PEAK.compare_exchange(peak, now, Relaxed, Relaxed).is_ok() {
            crate::sys::release_free_memory();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_after_a_burst_not_while_steady() {
        assert!(!trim_due(0, 0));
        assert!(!trim_due(10, 0), "a few connections are not worth a trim");
        assert!(trim_due(WORTH_IT, 0));
        assert!(trim_due(2000, 1000), "half of a big peak");
        assert!(!trim_due(2000, 1001));
        assert!(!trim_due(100, 50), "half of a small peak");
        assert!(!trim_due(500, 500), "steady");
    }
}
