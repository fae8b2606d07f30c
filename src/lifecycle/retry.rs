//! When to try again a binding whose listen address was not configured yet,
//! or whose listener was lost: a back-off schedule over plain data.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::desired::Key;

/// First and longest pause between attempts to listen on an address that
/// is not configured yet. A namespace usually appears before its addresses
/// (`ip netns add`, then `ip addr add` or the loopback brought up; CNI
/// plugins likewise), so the first retries come quickly; an address that
/// never appears costs one bind attempt per binding every 2 s.
pub(crate) const MIN: Duration = Duration::from_millis(50);
pub(crate) const MAX: Duration = Duration::from_secs(2);

/// The pause before the next attempt after `attempts` failed ones: doubling
/// from [`MIN`] up to [`MAX`].
pub(crate) fn pause(attempts: u32) -> Duration {
    MIN.saturating_mul(1 << attempts.min(16)).min(MAX)
}

/// Bindings to try again: how often each was tried, and when it is due.
#[derive(Debug, Default)]
pub(crate) struct Schedule {
    due: HashMap<Key, (u32, Instant)>,
}

impl Schedule {
    /// Tries `key` again [`pause`]`(attempts)` after `now`.
    pub(crate) fn insert(&mut self, key: Key, attempts: u32, now: Instant) {
        self.due.insert(key, (attempts, now + pause(attempts)));
    }

    /// Takes `key` off the schedule; returns how often it was tried.
    pub(crate) fn remove(&mut self, key: &Key) -> Option<u32> {
        self.due.remove(key).map(|(attempts, _)| attempts)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.due.is_empty()
    }

    /// The earliest time an attempt is due.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.due.values().map(|(_, at)| *at).min()
    }

    /// The keys due at `now` (still scheduled: opening one takes it off).
    pub(crate) fn due(&self, now: Instant) -> Vec<Key> {
        let mut keys: Vec<Key> = self
            .due
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys
    }
}

/// Completes when the earliest retry of `s` is due (never, when none is).
pub(crate) async fn next_due(s: &Schedule) {
    match s.next() {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::NsRef;

    #[test]
    fn the_pause_doubles_from_the_minimum_to_the_maximum() {
        assert_eq!(pause(0), MIN);
        assert_eq!(pause(1), MIN * 2);
        assert_eq!(pause(3), MIN * 8);
        assert_eq!(pause(6), MAX);
        assert_eq!(pause(u32::MAX), MAX);
    }

    #[test]
    fn only_what_is_due_is_returned_and_it_stays_until_removed() {
        let now = Instant::now();
        let mut s = Schedule::default();
        let a: Key = ("r".into(), NsRef::Named("a".into()));
        let b: Key = ("r".into(), NsRef::Named("b".into()));
        s.insert(a.clone(), 0, now);
        s.insert(b.clone(), 5, now);
        assert_eq!(s.next(), Some(now + MIN));
        assert!(s.due(now).is_empty());
        assert_eq!(s.due(now + MIN), vec![a.clone()]);
        assert_eq!(s.due(now + MAX), vec![a.clone(), b.clone()]);
        assert_eq!(s.remove(&b), Some(5));
        assert_eq!(s.remove(&b), None);
        assert_eq!(s.due(now + MAX), vec![a]);
    }
}
