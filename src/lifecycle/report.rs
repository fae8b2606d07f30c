//! States as text, and the status snapshot: the one place a binding's state
//! becomes words.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::desired::Key;
use super::reconcile::{CloseWhy, FailReason, WaitReason};
use super::{Entry, State, Supervisor};
use crate::proxy::Binding;
use crate::status::{BindingReport, BindingState, Counters, Cuts, Status};

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitReason::Namespace { error } => f.write_str(error),
            WaitReason::UpstreamNamespace { error } => write!(f, "upstream namespace: {error}"),
            WaitReason::Address { error } => {
                write!(f, "{error}; retrying until the address is configured")
            }
            WaitReason::Deleted { name, upstream } => write!(
                f,
                "{}; waiting for it to exist again",
                CloseWhy::Deleted {
                    name: name.clone(),
                    upstream: *upstream
                }
            ),
            WaitReason::Lost { reason } => {
                write!(f, "the listener was lost ({reason}); opening it again")
            }
            WaitReason::Closed(why) => why.fmt(f),
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::Namespace { error } | FailReason::Listen { error } => f.write_str(error),
            FailReason::UpstreamNamespace { error } => write!(f, "upstream namespace: {error}"),
            FailReason::Panicked(msg) => write!(f, "panicked: {msg}"),
        }
    }
}

impl fmt::Display for CloseWhy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseWhy::Removed => f.write_str("removed from the config"),
            CloseWhy::RuleChanged => f.write_str("its rule changed"),
            CloseWhy::Deleted { name, upstream } => {
                let which = if *upstream {
                    "upstream namespace"
                } else {
                    "namespace"
                };
                // A path is followed in its directory: its file may have
                // been unmounted or had another namespace mounted on it.
                if name.starts_with('/') {
                    write!(
                        f,
                        "{which} \"{name}\" is gone (its file was removed, unmounted or remounted)"
                    )
                } else {
                    write!(f, "{which} \"{name}\" was deleted")
                }
            }
            CloseWhy::SameAs { winner } => write!(
                f,
                "\"{winner}\", listed before it in the rule, names the same namespace"
            ),
        }
    }
}

/// The name `status` gives a state (an opening binding counts as waiting).
fn state_name(state: &State) -> BindingState {
    match state {
        State::Listening { .. } => BindingState::Listening,
        State::Waiting(_) | State::Opening => BindingState::Waiting,
        State::Failed(_) => BindingState::Failed,
        State::SameAs(_) => BindingState::SameNamespace,
    }
}

/// A state as `status` reports it: its name, why (when not listening), the
/// bound address and the counters.
fn describe(state: &State) -> (BindingState, Option<String>, Option<String>, Counters) {
    let name = state_name(state);
    let quiet = |why: String| (name, Some(why), None, Counters::default());
    match state {
        State::Listening { live, local, .. } => (
            name,
            None,
            Some(local.to_string()),
            Counters::from_stats(&live.binding.stats),
        ),
        State::Waiting(why) => quiet(why.to_string()),
        State::Failed(why) => quiet(why.to_string()),
        State::SameAs(other) => quiet(format!("same namespace as \"{other}\", served there")),
        State::Opening => quiet("opening".to_owned()),
    }
}

fn report(e: &Entry) -> BindingReport {
    let (state, reason, local, counters) = describe(&e.state);
    let parked = match &e.state {
        State::Listening { live, .. } => live.binding.is_parked(),
        _ => false,
    };
    BindingReport {
        rule: e.rule.name.clone(),
        protocol: e.rule.protocol.to_string(),
        netns: e.netns.to_string(),
        state,
        reason,
        listen: e.rule.listen.to_string(),
        port: e.rule.range_port(),
        local,
        upstream: e.rule.upstream.to_string(),
        upstream_netns: e.rule.upstream_netns.to_string(),
        counters,
        parked,
        max_connections: e.rule.max_connections,
    }
}

/// How many bindings are in each state, named as `status` names them
/// ([`Server::tally`](super::Server::tally)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub bindings: usize,
    pub listening: usize,
    /// Waiting for their namespace (or still opening).
    pub waiting: usize,
    pub failed: usize,
}

impl Supervisor {
    pub(super) fn tally(&self) -> Tally {
        let mut t = Tally {
            bindings: self.entries.len(),
            ..Tally::default()
        };
        for e in self.entries.values() {
            match state_name(&e.state) {
                BindingState::Listening => t.listening += 1,
                BindingState::Waiting => t.waiting += 1,
                BindingState::Failed => t.failed += 1,
                BindingState::SameNamespace => {}
            }
        }
        t
    }

    pub(super) fn live_bindings(&self) -> Vec<Arc<Binding>> {
        self.sorted_entries()
            .into_iter()
            .filter_map(|e| match &e.state {
                State::Listening { live, .. } => Some(live.binding.clone()),
                _ => None,
            })
            .collect()
    }

    /// Entries in configuration order (rule, then namespace reference).
    fn sorted_entries(&self) -> Vec<&Entry> {
        let position: HashMap<&str, usize> =
            self.rules
                .iter()
                .enumerate()
                .fold(HashMap::new(), |mut m, (i, r)| {
                    m.entry(r.name.as_str()).or_insert(i);
                    m
                });
        let mut entries: Vec<(&Key, &Entry)> = self.entries.iter().collect();
        // Each key made once: formatting references per comparison cost
        // two strings per comparison, n log n of them per status.
        entries.sort_by_cached_key(|(k, _)| {
            let place = position
                .get(k.0.name.as_str())
                .copied()
                .unwrap_or(usize::MAX);
            (place, k.1.to_string(), k.0.port)
        });
        entries.into_iter().map(|(_, e)| e).collect()
    }

    pub(super) fn status(&self) -> Status {
        let (at_drain_timeout, at_close) = crate::proxy::cuts();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            workers: self.options.workers,
            config: self
                .options
                .config_path
                .as_ref()
                .map(|p| p.display().to_string()),
            namespaces_known: self.discovery.as_ref().map_or(0, |d| d.known().count()),
            connections_cut: Cuts {
                at_drain_timeout,
                at_close,
            },
            heap_allocated_bytes: crate::sys::heap_allocated(),
            broker: self.sockets.broker(),
            bindings: self.sorted_entries().into_iter().map(report).collect(),
        }
    }
}
