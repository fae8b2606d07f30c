//! Rules × known namespaces → the bindings that should exist, and how two
//! versions of a rule differ. Pure: no sockets, no namespaces opened.

use std::collections::HashSet;
use std::sync::Arc;

use crate::config::Rule;
use crate::netns::NsRef;

/// Which of a rule's bindings a key is, besides its namespace: the rule's
/// name and, for a port range, the listen port (each port of a range is a
/// binding of its own, which listens, fails and is reloaded alone).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Slot {
    pub name: String,
    pub port: Option<u16>,
}

impl Slot {
    /// The slot of a binding's rule (one of [`Rule::per_port`]'s).
    pub(crate) fn of(rule: &Rule) -> Slot {
        Slot {
            name: rule.name.clone(),
            port: rule.range_port(),
        }
    }
}

/// A rule without a range, for tests.
#[cfg(test)]
impl From<&str> for Slot {
    fn from(name: &str) -> Slot {
        Slot {
            name: name.to_owned(),
            port: None,
        }
    }
}

/// A binding's identity: (rule and port, namespace reference). A rule with
/// a glob has one key per matching name.
pub(crate) type Key = (Slot, NsRef);

/// The key of the binding of `rule` (one of [`Rule::per_port`]'s) in `ns`.
pub(crate) fn key(rule: &Rule, ns: NsRef) -> Key {
    (Slot::of(rule), ns)
}

/// The rules as bindings run them: one per port of a range
/// ([`Rule::per_port`]), in configuration order.
pub(crate) fn per_port(rules: &[Rule]) -> Vec<Arc<Rule>> {
    rules
        .iter()
        .flat_map(Rule::per_port)
        .map(Arc::new)
        .collect()
}

/// The bindings `rules` (one per port, [`per_port`]) ask for when the
/// namespaces in `known` (`/run/netns` names, files followed by path)
/// exist, in configuration order (rule, then its `netns` list; a glob's
/// matches in the order of `known`), each key once.
pub(crate) fn desired(rules: &[Arc<Rule>], known: &[NsRef]) -> Vec<(Key, Arc<Rule>)> {
    let mut out = Vec::new();
    let mut seen: HashSet<Key> = HashSet::new();
    for rule in rules {
        for sel in &rule.netns {
            let refs: Vec<NsRef> = match sel {
                NsRef::Glob(_) => known
                    .iter()
                    .filter(|n| sel.matches_ref(n))
                    .cloned()
                    .collect(),
                other => vec![other.clone()],
            };
            for r in refs {
                let key = key(rule, r);
                if seen.insert(key.clone()) {
                    out.push((key, rule.clone()));
                }
            }
        }
    }
    out
}

/// Whether `rule` listens in `r`, a `/run/netns` name or a followed path
/// (listed, or matched by a glob).
pub(crate) fn listens_in(rule: &Rule, r: &NsRef) -> bool {
    rule.netns.iter().any(|s| s == r || s.matches_ref(r))
}

/// Whether `rule` lists `a` before `b` (a name matched by a glob counts at
/// the glob's place).
pub(crate) fn listed_before(rule: &Rule, a: &NsRef, b: &NsRef) -> bool {
    let place = |r: &NsRef| {
        rule.netns
            .iter()
            .position(|s| s == r || s.matches_ref(r))
            .unwrap_or(usize::MAX)
    };
    place(a) < place(b)
}

/// How a rule's new version differs from the one a binding runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing a binding uses (perhaps its `netns` list or its place).
    Same,
    /// Only settings a running binding takes in place
    /// ([`Binding::retune`](crate::proxy::Binding)).
    Retunable,
    /// Anything else: the binding is closed and opened again.
    Reopen,
}

/// How `new` differs from `old`. The namespace list is not part of it:
/// adding a namespace to a rule must not reopen the listeners it already
/// has (and comparing the list per binding would cost N² at N namespaces).
/// Nor is `origin` (a moved line).
pub(crate) fn compare(old: &Rule, new: &Rule) -> Change {
    // Which settings need a new socket and which a running binding takes
    // in place follows from the per-protocol settings types (see
    // `config::settings`), not from a list kept here.
    if !old.same_identity(new) {
        Change::Reopen
    } else if old.tuning() != new.tuning() {
        Change::Retunable
    } else {
        Change::Same
    }
}
