//! The decisions of the lifecycle, as pure functions over plain data.
//!
//! Each input the server reacts to (a reload's desired bindings, a batch of
//! namespace events, retries falling due, a lost listener, a failed open)
//! goes in with a view of the current entries ([`View`]: a rule and a
//! [`Phase`] per key), and a list of [`Action`]s comes out. Nothing here
//! touches a socket or a namespace, so every case is unit-tested without
//! root (`reconcile/tests.rs`); `apply.rs` carries the actions out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::config::{OnDelete, Rule};
use crate::netns::discovery::NsEvent;
use crate::netns::{NsError, NsId, NsRef};
use crate::status::ReloadReport;

pub(crate) use super::desired::Key;
use super::desired::{Change, compare, key, listed_before, listens_in};

/// Where an entry is, as far as decisions go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Listening,
    Waiting,
    Failed,
    /// Served under another reference to the same namespace.
    SameAs,
}

/// What the reconciler reads of an entry.
pub(crate) trait View {
    fn rule(&self) -> &Arc<Rule>;
    fn phase(&self) -> Phase;
}

/// Why a binding waits. Each is rendered for `status` in `report.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WaitReason {
    /// Its namespace does not exist (yet); opened when discovery reports it.
    Namespace { error: String },
    /// Its upstream namespace does not exist (yet).
    UpstreamNamespace { error: String },
    /// Its listen address is not configured in the namespace (yet).
    Address { error: String },
    /// Its namespace (or upstream namespace) was deleted.
    Deleted { name: String, upstream: bool },
    /// Its listener was lost; opened again at the next retry.
    Lost { reason: String },
    /// Its listener was just closed; the next action says what follows.
    Closed(CloseWhy),
}

/// Why a binding failed; tried again at the next reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FailReason {
    /// Its namespace cannot be used (not a namespace, may not be entered …).
    Namespace {
        error: String,
    },
    UpstreamNamespace {
        error: String,
    },
    /// Making the listener failed (port in use, permission …).
    Listen {
        error: String,
    },
    /// Opening or serving the listener panicked (the panic's message).
    Panicked(String),
}

/// Why a listener is closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloseWhy {
    Removed,
    RuleChanged,
    Deleted {
        name: String,
        upstream: bool,
    },
    /// Another reference to its namespace, listed before it, serves it.
    SameAs {
        winner: NsRef,
    },
}

/// How a listener closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseMode {
    /// Stop accepting; open connections get the drain timeout.
    Drain,
    /// Stop accepting and close every connection now.
    Now,
}

impl From<OnDelete> for CloseMode {
    fn from(p: OnDelete) -> Self {
        match p {
            OnDelete::Close => CloseMode::Now,
            OnDelete::Drain => CloseMode::Drain,
        }
    }
}

/// A binding to open.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Open {
    pub key: Key,
    pub rule: Arc<Rule>,
    /// A binding of the same key was just closed: its port may take a
    /// moment to be released.
    pub replacing: bool,
    /// A reload retries it (it was waiting or failed): counted in the
    /// report as reopened if it listens then, unchanged if not.
    pub reopen: bool,
}

/// One step for the shell to carry out, in order; opens are made together
/// after the rest.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    Open(Open),
    /// Close the listener of `key` (only ever for one listening).
    Close {
        key: Key,
        mode: CloseMode,
        why: CloseWhy,
    },
    /// Apply `rule`'s retunable settings to the running binding in place.
    Retune {
        key: Key,
        rule: Arc<Rule>,
    },
    /// Nothing changes; the entry shares the new rule (cheap comparisons).
    Keep {
        key: Key,
        rule: Arc<Rule>,
    },
    Wait {
        key: Key,
        why: WaitReason,
    },
    Fail {
        key: Key,
        why: FailReason,
    },
    /// The entry is gone.
    Forget {
        key: Key,
    },
    /// Try opening `key` again after the pause for `attempts` earlier tries
    /// ([`super::retry::pause`]).
    Retry {
        key: Key,
        attempts: u32,
    },
    /// Stop trying to open `key` on a schedule.
    Unschedule {
        key: Key,
    },
}

/// A reload's actions, and the counts known before anything opens.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub actions: Vec<Action>,
    pub report: ReloadReport,
}

/// From the current entries to `desired` (see [`super::desired::desired`]):
/// what is gone closes (draining) and is forgotten, what changed is closed
/// and opened again, retunable changes are applied in place, a binding that
/// was not listening is tried again, the rest is kept untouched.
pub(crate) fn reload<V: View>(entries: &HashMap<Key, V>, desired: Vec<(Key, Arc<Rule>)>) -> Plan {
    let mut plan = Plan::default();
    let seen: HashSet<&Key> = desired.iter().map(|(k, _)| k).collect();
    let mut gone: Vec<(&Key, &V)> = entries.iter().filter(|(k, _)| !seen.contains(k)).collect();
    gone.sort_by(|a, b| a.0.cmp(b.0));
    for (key, e) in gone {
        if e.phase() == Phase::Listening {
            plan.actions.push(Action::Close {
                key: key.clone(),
                mode: CloseMode::Drain,
                why: CloseWhy::Removed,
            });
        }
        plan.actions.push(Action::Forget { key: key.clone() });
        plan.report.removed += 1;
    }
    for (key, rule) in desired {
        let open = |replacing, reopen| {
            Action::Open(Open {
                key: key.clone(),
                rule: rule.clone(),
                replacing,
                reopen,
            })
        };
        let Some(e) = entries.get(&key) else {
            plan.actions.push(open(false, false));
            plan.report.added += 1;
            continue;
        };
        let change = compare(e.rule(), &rule);
        let (actions, report) = (&mut plan.actions, &mut plan.report);
        match (change, e.phase()) {
            (Change::Reopen, phase) => {
                if phase == Phase::Listening {
                    actions.push(Action::Close {
                        key: key.clone(),
                        mode: CloseMode::Drain,
                        why: CloseWhy::RuleChanged,
                    });
                }
                actions.push(open(true, false));
                report.replaced += 1;
            }
            (Change::Retunable, Phase::Listening) => {
                actions.push(Action::Retune {
                    key: key.clone(),
                    rule: rule.clone(),
                });
                report.retuned += 1;
            }
            (Change::Same, Phase::Listening) => {
                actions.push(Action::Keep {
                    key: key.clone(),
                    rule: rule.clone(),
                });
                report.unchanged += 1;
            }
            // Its namespace may now be listed first, or the other reference
            // gone: resolved again, counted unchanged either way.
            (_, Phase::SameAs) => {
                actions.push(Action::Keep {
                    key: key.clone(),
                    rule: rule.clone(),
                });
                actions.push(open(false, false));
                report.unchanged += 1;
            }
            // Takes the new rule when it opens; counted once it is tried.
            (_, Phase::Waiting | Phase::Failed) => {
                actions.push(Action::Keep {
                    key: key.clone(),
                    rule: rule.clone(),
                });
                actions.push(open(false, true));
            }
        }
    }
    plan
}

/// What a batch of namespace events does, the events taken in order (a
/// name may come and go, or go and come back, within one batch). Closes,
/// waits and forgets come in event order; the opens last, once each, in key
/// order, for what still waits at the end of the batch.
pub(crate) fn events<V: View>(
    entries: &HashMap<Key, V>,
    rules: &[Arc<Rule>],
    batch: &[NsEvent],
) -> Vec<Action> {
    let mut b = Batch {
        entries,
        changed: HashMap::new(),
        opens: BTreeMap::new(),
        actions: Vec::new(),
    };
    for event in batch {
        match event {
            NsEvent::Appeared(r) => b.appeared(rules, r),
            NsEvent::Gone(r) => b.gone(rules, r),
        }
    }
    let Batch {
        mut actions, opens, ..
    } = b;
    actions.extend(opens.into_iter().map(|(key, rule)| {
        Action::Open(Open {
            key,
            rule,
            replacing: false,
            reopen: false,
        })
    }));
    actions
}

/// The entries as earlier events of a batch left them.
struct Batch<'a, V> {
    entries: &'a HashMap<Key, V>,
    /// Phases changed by earlier events (`None`: forgotten).
    changed: HashMap<Key, Option<Phase>>,
    /// Opens decided so far, still undone by a later `Gone`.
    opens: BTreeMap<Key, Arc<Rule>>,
    actions: Vec<Action>,
}

impl<V: View> Batch<'_, V> {
    fn phase(&self, key: &Key) -> Option<Phase> {
        match self.changed.get(key) {
            Some(p) => *p,
            None => self.entries.get(key).map(View::phase),
        }
    }

    fn appeared(&mut self, rules: &[Arc<Rule>], named: &NsRef) {
        let mut upstream_of = HashSet::new();
        for rule in rules {
            let key = key(rule, named.clone());
            if listens_in(rule, named) && matches!(self.phase(&key), None | Some(Phase::Waiting)) {
                self.opens.insert(key, rule.clone());
            }
            if rule.upstream_netns == *named {
                upstream_of.insert(rule.name.as_str());
            }
        }
        // Everything that waited for this upstream, in one pass over the
        // entries (one per rule was quadratic when many rules share an
        // upstream namespace).
        if upstream_of.is_empty() {
            return;
        }
        for (k, e) in self.entries {
            if upstream_of.contains(k.0.name.as_str())
                && k.1 != *named
                && self.phase(k) == Some(Phase::Waiting)
            {
                self.opens.insert(k.clone(), e.rule().clone());
            }
        }
    }

    fn gone(&mut self, rules: &[Arc<Rule>], named: &NsRef) {
        // Looked up per rule rather than by scanning every entry: with
        // thousands of namespaces going away, a scan per event would be
        // quadratic.
        let mut affected: Vec<(Key, Arc<Rule>, bool)> = Vec::new();
        let mut upstream_of = HashSet::new();
        for rule in rules {
            let key = key(rule, named.clone());
            if self.phase(&key).is_some() || self.opens.contains_key(&key) {
                affected.push((key, rule.clone(), false));
            }
            if rule.upstream_netns == *named {
                upstream_of.insert(rule.name.as_str());
            }
        }
        if !upstream_of.is_empty() {
            for (k, e) in self.entries {
                if upstream_of.contains(k.0.name.as_str())
                    && k.1 != *named
                    && self.phase(k).is_some()
                {
                    affected.push((k.clone(), e.rule().clone(), true));
                }
            }
        }
        for (key, rule, upstream) in affected {
            let phase = self.phase(&key);
            self.opens.remove(&key);
            let name = named.to_string();
            if phase == Some(Phase::Listening) {
                self.actions.push(Action::Close {
                    key: key.clone(),
                    mode: rule.on_netns_delete.into(),
                    why: CloseWhy::Deleted {
                        name: name.clone(),
                        upstream,
                    },
                });
            }
            if phase.is_none() {
                // Only an open decided earlier in this batch: undone above.
                continue;
            }
            let from_glob = !upstream && !rule.netns.contains(named);
            if from_glob {
                self.actions.push(Action::Forget { key: key.clone() });
                self.changed.insert(key, None);
            } else {
                let why = WaitReason::Deleted { name, upstream };
                self.actions.push(Action::Wait {
                    key: key.clone(),
                    why,
                });
                self.changed.insert(key, Some(Phase::Waiting));
            }
        }
    }
}

/// Retries fallen due: what still waits is opened, the rest (removed by a
/// reload, or no longer waiting) is taken off the schedule.
pub(crate) fn retries<V: View>(entries: &HashMap<Key, V>, due: Vec<Key>) -> Vec<Action> {
    due.into_iter()
        .map(|key| match entries.get(&key) {
            Some(e) if e.phase() == Phase::Waiting => Action::Open(Open {
                rule: e.rule().clone(),
                key,
                replacing: false,
                reopen: false,
            }),
            _ => Action::Unschedule { key },
        })
        .collect()
}

/// Why a listener that was listening is gone; see [`crate::proxy::Loss`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Lost {
    /// Its socket could not be kept: it is opened again.
    Listener(String),
    /// Its task panicked: failed until a reload tries it again.
    Panicked(String),
}

/// A listening binding's listener is gone (the caller checked that the
/// binding reported is the one listening).
pub(crate) fn lost(key: &Key, cause: Lost) -> Vec<Action> {
    match cause {
        Lost::Listener(reason) => vec![
            Action::Wait {
                key: key.clone(),
                why: WaitReason::Lost { reason },
            },
            Action::Retry {
                key: key.clone(),
                attempts: 0,
            },
        ],
        Lost::Panicked(msg) => vec![Action::Fail {
            key: key.clone(),
            why: FailReason::Panicked(msg),
        }],
    }
}

/// How an attempt to make a listener failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OpenFailure {
    /// The address is not configured in the namespace (yet).
    AddressMissing(String),
    /// Anything else (the error).
    Other(String),
    /// The attempt panicked (the message).
    Panicked(String),
}

/// After a failed attempt to make `key`'s listener, which followed
/// `attempts` earlier ones waiting for the address.
pub(crate) fn open_failed(key: &Key, failure: OpenFailure, attempts: u32) -> Vec<Action> {
    let key = key.clone();
    match failure {
        OpenFailure::AddressMissing(error) => vec![
            Action::Wait {
                key: key.clone(),
                why: WaitReason::Address { error },
            },
            Action::Retry {
                key,
                attempts: attempts + 1,
            },
        ],
        OpenFailure::Other(error) => vec![Action::Fail {
            key,
            why: FailReason::Listen { error },
        }],
        OpenFailure::Panicked(msg) => vec![Action::Fail {
            key,
            why: FailReason::Panicked(msg),
        }],
    }
}

/// A namespace as resolving it turned out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Resolved {
    Id(NsId),
    /// A name with no namespace (yet): worth waiting for.
    Missing(String),
    /// Anything else: not worth waiting for.
    Broken(String),
}

impl Resolved {
    /// From the result of resolving `r` (`None`: it was not resolved).
    pub(crate) fn of(r: &NsRef, result: Option<&Result<NsId, NsError>>) -> Resolved {
        match result {
            Some(Ok(id)) => Resolved::Id(*id),
            Some(Err(
                e @ NsError::NotFound {
                    reference: NsRef::Named(_),
                    ..
                },
            )) => Resolved::Missing(e.to_string()),
            // A path is followed in its directory: gone, or not mounted
            // (yet, or any more), it may be the namespace again later.
            Some(Err(
                e @ (NsError::NotFound {
                    reference: NsRef::Path(p),
                    ..
                }
                | NsError::NotNsfs {
                    reference: NsRef::Path(p),
                    ..
                }),
            )) if !p.starts_with("/proc") => Resolved::Missing(e.to_string()),
            Some(Err(e)) => Resolved::Broken(e.to_string()),
            None => Resolved::Broken(format!("namespace \"{r}\" was not resolved")),
        }
    }
}

/// What to do with a binding about to be opened, once its namespaces are
/// resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Open {
        ns: NsId,
        upstream_ns: NsId,
    },
    /// Open it, after the binding under `loser` (the same namespace, listed
    /// after it in the rule) gives way.
    Demote {
        ns: NsId,
        upstream_ns: NsId,
        loser: NsRef,
    },
    /// Another reference, listed before it, serves its namespace.
    SameAs(NsRef),
    Wait(WaitReason),
    Fail(FailReason),
}

/// Decides the binding of `rule` under `netns`; `serving` is the reference
/// that already serves the namespace `listen` resolved to, if any. The
/// reference listed first names the namespace (in PROXY v2 headers, logs
/// and metric labels), whichever was opened first.
pub(crate) fn verdict(
    rule: &Rule,
    netns: &NsRef,
    listen: Resolved,
    upstream: Resolved,
    serving: Option<&NsRef>,
) -> Verdict {
    let upstream_ns = match upstream {
        Resolved::Id(id) => id,
        Resolved::Missing(error) => return Verdict::Wait(WaitReason::UpstreamNamespace { error }),
        Resolved::Broken(error) => return Verdict::Fail(FailReason::UpstreamNamespace { error }),
    };
    let ns = match listen {
        Resolved::Id(id) => id,
        Resolved::Missing(error) => return Verdict::Wait(WaitReason::Namespace { error }),
        Resolved::Broken(error) => return Verdict::Fail(FailReason::Namespace { error }),
    };
    match serving {
        Some(other) if other != netns && listed_before(rule, netns, other) => Verdict::Demote {
            ns,
            upstream_ns,
            loser: other.clone(),
        },
        Some(other) if other != netns => Verdict::SameAs(other.clone()),
        _ => Verdict::Open { ns, upstream_ns },
    }
}

#[cfg(test)]
mod tests;
