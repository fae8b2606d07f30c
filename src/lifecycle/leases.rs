//! The namespaces a chunk of openings resolves, held open while it needs
//! them.
//!
//! A namespace's fd is given back when its last [`Lease`] goes, on whatever
//! thread drops it (a binding's last connection ending). A resolution
//! answered just before such a release would be undone by it; so every
//! namespace resolved is leased at once, and one whose lease is the first
//! since a release in the meantime is resolved again, now that the lease
//! keeps it.

use std::collections::HashMap;

use crate::netns::{Lease, Leases, NsError, NsId, NsRef, SocketFactory};

/// How often a reference is resolved again when a release keeps racing it.
const TRIES: usize = 3;

/// Resolves `refs` through `sockets`, each result by reference, and the
/// leases that keep every namespace resolved open while they are held.
pub(super) async fn resolve(
    sockets: &dyn SocketFactory,
    leases: &Leases,
    refs: Vec<NsRef>,
) -> (HashMap<NsRef, Result<NsId, NsError>>, Vec<Lease>) {
    let mut resolved = HashMap::with_capacity(refs.len());
    let mut held = Vec::new();
    let mut todo = refs;
    for _ in 0..TRIES {
        if todo.is_empty() {
            break;
        }
        leases.mark();
        // One trip to the namespace thread for the whole chunk: one round
        // trip per binding made startup at thousands of namespaces wait on
        // thread wake-ups, not on work.
        let results = sockets.resolve_many(&todo).await;
        let mut again = Vec::new();
        for (r, result) in todo.into_iter().zip(results) {
            if let Ok(ns) = &result {
                let (lease, stale) = leases.acquire(*ns);
                held.push(lease);
                if stale {
                    again.push(r.clone());
                }
            }
            resolved.insert(r, result);
        }
        todo = again;
    }
    (resolved, held)
}
