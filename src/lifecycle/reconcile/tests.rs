//! Every decision of the reconciler, on plain data: no root, no sockets.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::lifecycle::desired::{Slot, desired};

/// An entry as the tests model it.
#[derive(Debug, Clone)]
struct M {
    rule: Arc<Rule>,
    phase: Phase,
}

impl View for M {
    fn rule(&self) -> &Arc<Rule> {
        &self.rule
    }
    fn phase(&self) -> Phase {
        self.phase
    }
}

type Model = HashMap<Key, M>;

/// A TCP rule `name` listening in `netns` (TOML array items), with `extra`
/// keys.
fn rule(name: &str, netns: &str, extra: &str) -> String {
    format!(
        "[[proxy]]\nname = \"{name}\"\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:80\"\nnetns = [{netns}]\nupstream = \"127.0.0.1:9\"\n{extra}\n"
    )
}

fn rules(toml: &str) -> Vec<Arc<Rule>> {
    crate::config::parse_toml(toml, "test")
        .unwrap()
        .rules
        .iter()
        .flat_map(Rule::per_port)
        .map(Arc::new)
        .collect()
}

fn key(rule: &str, ns: &str) -> Key {
    (rule.into(), ns.parse().unwrap())
}

fn names(n: &[&str]) -> Vec<NsRef> {
    n.iter().map(|s| NsRef::Named((*s).to_owned())).collect()
}

/// Carries `actions` out on the model as if every open listened.
fn apply(model: &mut Model, actions: &[Action]) {
    for a in actions {
        match a {
            Action::Open(o) => {
                model.insert(
                    o.key.clone(),
                    M {
                        rule: o.rule.clone(),
                        phase: Phase::Listening,
                    },
                );
            }
            Action::Close { key, .. } => {
                let e = model.get_mut(key).expect("closes an entry");
                assert_eq!(e.phase, Phase::Listening, "closes only a listener: {key:?}");
                e.phase = Phase::Waiting;
            }
            Action::Retune { key, rule } | Action::Keep { key, rule } => {
                model.get_mut(key).expect("an entry").rule = rule.clone();
            }
            Action::Wait { key, .. } => model.get_mut(key).unwrap().phase = Phase::Waiting,
            Action::Fail { key, .. } => model.get_mut(key).unwrap().phase = Phase::Failed,
            Action::Forget { key } => {
                model.remove(key);
            }
            Action::Retry { .. } | Action::Unschedule { .. } => {}
        }
    }
}

/// The model after starting with `toml`, every open listening.
fn started(toml: &str, known: &[&str]) -> (Model, Vec<Arc<Rule>>) {
    let rs = rules(toml);
    let mut m = Model::new();
    let plan = reload(&m, desired(&rs, &names(known)));
    apply(&mut m, &plan.actions);
    (m, rs)
}

fn opens(actions: &[Action]) -> Vec<&Open> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Open(o) => Some(o),
            _ => None,
        })
        .collect()
}

fn touching<'a>(actions: &'a [Action], k: &Key) -> Vec<&'a Action> {
    actions.iter().filter(|a| action_key(a) == k).collect()
}

fn action_key(a: &Action) -> &Key {
    match a {
        Action::Open(o) => &o.key,
        Action::Close { key, .. }
        | Action::Retune { key, .. }
        | Action::Keep { key, .. }
        | Action::Wait { key, .. }
        | Action::Fail { key, .. }
        | Action::Forget { key }
        | Action::Retry { key, .. }
        | Action::Unschedule { key } => key,
    }
}

#[test]
fn a_start_opens_every_desired_binding() {
    let rs = rules(&rule("r", "\"host\", \"a\"", ""));
    let plan = reload(&Model::new(), desired(&rs, &[]));
    assert_eq!(plan.report.added, 2);
    let keys: Vec<&Key> = opens(&plan.actions).iter().map(|o| &o.key).collect();
    assert_eq!(keys, [&key("r", "host"), &key("r", "a")]);
}

#[test]
fn an_unchanged_rule_is_kept_untouched() {
    let toml = rule("r", "\"a\", \"b\"", "");
    let (m, _) = started(&toml, &[]);
    let plan = reload(&m, desired(&rules(&toml), &[]));
    assert!(
        plan.actions
            .iter()
            .all(|a| matches!(a, Action::Keep { .. })),
        "{:?}",
        plan.actions
    );
    assert_eq!(plan.report.unchanged, 2);
}

#[test]
fn a_changed_rule_is_closed_and_opened_again() {
    let (m, _) = started(&rule("r", "\"a\"", ""), &[]);
    let changed = rules(&rule("r", "\"a\"", "").replace(":9", ":10"));
    let plan = reload(&m, desired(&changed, &[]));
    let k = key("r", "a");
    assert_eq!(
        plan.actions,
        [
            Action::Close {
                key: k.clone(),
                mode: CloseMode::Drain,
                why: CloseWhy::RuleChanged
            },
            Action::Open(Open {
                key: k,
                rule: changed[0].clone(),
                replacing: true,
                reopen: false
            })
        ]
    );
    assert_eq!(plan.report.replaced, 1);
}

#[test]
fn only_the_netns_list_changed_opens_the_new_namespace_alone() {
    let (m, _) = started(&rule("r", "\"a\"", ""), &[]);
    let plan = reload(&m, desired(&rules(&rule("r", "\"a\", \"b\"", "")), &[]));
    assert!(matches!(
        &touching(&plan.actions, &key("r", "a"))[..],
        [Action::Keep { .. }]
    ));
    let o = opens(&plan.actions);
    assert_eq!(o.len(), 1);
    assert_eq!(o[0].key, key("r", "b"));
    assert_eq!((plan.report.added, plan.report.unchanged), (1, 1));
}

#[test]
fn each_retunable_key_is_applied_in_place() {
    for extra in [
        "max_connections = 5",
        "proxy_protocol = \"v2\"",
        "idle_timeout = \"30s\"",
        "half_close_timeout = \"5s\"",
        "tcp_keepalive = false",
    ] {
        let (m, _) = started(&rule("r", "\"a\"", ""), &[]);
        let new = rules(&rule("r", "\"a\"", extra));
        let plan = reload(&m, desired(&new, &[]));
        assert_eq!(
            plan.actions,
            [Action::Retune {
                key: key("r", "a"),
                rule: new[0].clone()
            }],
            "{extra}"
        );
        assert_eq!(plan.report.retuned, 1, "{extra}");
    }
}

#[test]
fn a_retunable_change_to_a_waiting_binding_opens_it_with_the_new_rule() {
    let (mut m, _) = started(&rule("r", "\"a\"", ""), &[]);
    m.get_mut(&key("r", "a")).unwrap().phase = Phase::Waiting;
    let new = rules(&rule("r", "\"a\"", "max_connections = 5"));
    let plan = reload(&m, desired(&new, &[]));
    assert_eq!(opens(&plan.actions)[0].rule, new[0]);
    assert!(opens(&plan.actions)[0].reopen);
}

#[test]
fn a_removed_rule_closes_draining_and_is_forgotten() {
    let (mut m, _) = started(
        &(rule("r", "\"a\"", "") + &rule("s", "\"a\", \"b\"", "").replace(":80", ":81")),
        &[],
    );
    m.get_mut(&key("s", "b")).unwrap().phase = Phase::Waiting;
    let plan = reload(&m, desired(&rules(&rule("r", "\"a\"", "")), &[]));
    let sa = key("s", "a");
    assert_eq!(
        touching(&plan.actions, &sa),
        [
            &Action::Close {
                key: sa.clone(),
                mode: CloseMode::Drain,
                why: CloseWhy::Removed
            },
            &Action::Forget { key: sa }
        ]
    );
    // Not listening: nothing to close.
    let sb = key("s", "b");
    assert_eq!(touching(&plan.actions, &sb), [&Action::Forget { key: sb }]);
    assert_eq!(plan.report.removed, 2);
}

#[test]
fn a_failed_binding_is_tried_again_at_a_reload_and_counted_once_tried() {
    let toml = rule("r", "\"a\"", "");
    let (mut m, rs) = started(&toml, &[]);
    m.get_mut(&key("r", "a")).unwrap().phase = Phase::Failed;
    let plan = reload(&m, desired(&rs, &[]));
    let o = opens(&plan.actions);
    assert_eq!(o.len(), 1);
    assert!(o[0].reopen && !o[0].replacing);
    assert_eq!(
        plan.report,
        ReloadReport::default(),
        "counted after the attempt"
    );
    // Discovery does not retry a failed binding.
    let acts = events(&m, &rs, &[NsEvent::Appeared(NsRef::Named("a".into()))]);
    assert!(acts.is_empty(), "{acts:?}");
}

#[test]
fn a_glob_gains_and_loses_a_namespace() {
    let toml = rule("g", "\"web-*\"", "on_netns_delete = \"drain\"");
    let (mut m, rs) = started(&toml, &["web-1"]);
    assert!(m.contains_key(&key("g", "web-1")));
    let acts = events(&m, &rs, &[NsEvent::Appeared(NsRef::Named("web-2".into()))]);
    assert_eq!(
        acts,
        [Action::Open(Open {
            key: key("g", "web-2"),
            rule: rs[0].clone(),
            replacing: false,
            reopen: false
        })]
    );
    apply(&mut m, &acts);
    let k = key("g", "web-1");
    let acts = events(&m, &rs, &[NsEvent::Gone(NsRef::Named("web-1".into()))]);
    assert_eq!(
        acts,
        [
            Action::Close {
                key: k.clone(),
                mode: CloseMode::Drain,
                why: CloseWhy::Deleted {
                    name: "web-1".into(),
                    upstream: false
                }
            },
            Action::Forget { key: k }
        ]
    );
    // A name the glob does not match is no one's business.
    assert!(events(&m, &rs, &[NsEvent::Appeared(NsRef::Named("db".into()))]).is_empty());
}

#[test]
fn a_path_glob_and_an_exact_path_follow_their_files() {
    let toml = rule("g", "\"/d/netns/*\", \"/e/ns\"", "");
    let (mut m, rs) = started(&toml, &[]);
    let path = |p: &str| NsRef::Path(p.into());
    // The exact path waits for its file; the glob has no binding yet.
    assert!(m.contains_key(&key("g", "/e/ns")));
    assert!(!m.contains_key(&key("g", "/d/netns/c1")));
    let acts = events(&m, &rs, &[NsEvent::Appeared(path("/d/netns/c1"))]);
    assert!(
        matches!(&acts[..], [Action::Open(o)] if o.key == key("g", "/d/netns/c1")),
        "{acts:?}"
    );
    apply(&mut m, &acts);
    // Another directory's file, or a /run/netns name, is not the glob's.
    assert!(events(&m, &rs, &[NsEvent::Appeared(path("/d/other/c1"))]).is_empty());
    assert!(events(&m, &rs, &[NsEvent::Appeared(NsRef::Named("c1".into()))]).is_empty());
    let acts = events(&m, &rs, &[NsEvent::Gone(path("/d/netns/c1"))]);
    assert!(
        matches!(&acts[..], [Action::Close { .. }, Action::Forget { key: k }] if *k == key("g", "/d/netns/c1")),
        "{acts:?}"
    );
    apply(&mut m, &acts);
    // The exact path, listening, goes and comes back: it waits in between.
    let mut e = m.get(&key("g", "/e/ns")).unwrap().clone();
    e.phase = Phase::Listening;
    m.insert(key("g", "/e/ns"), e);
    let acts = events(&m, &rs, &[NsEvent::Gone(path("/e/ns"))]);
    assert!(
        matches!(&acts[..], [Action::Close { .. }, Action::Wait { key: k, .. }] if *k == key("g", "/e/ns")),
        "{acts:?}"
    );
    apply(&mut m, &acts);
    let acts = events(&m, &rs, &[NsEvent::Appeared(path("/e/ns"))]);
    assert!(
        matches!(&acts[..], [Action::Open(o)] if o.key == key("g", "/e/ns")),
        "{acts:?}"
    );
}

#[test]
fn a_listed_namespace_deleted_closes_as_configured_and_waits() {
    for (policy, mode) in [("close", CloseMode::Now), ("drain", CloseMode::Drain)] {
        let toml = rule("r", "\"a\"", &format!("on_netns_delete = \"{policy}\""));
        let (mut m, rs) = started(&toml, &[]);
        let k = key("r", "a");
        let acts = events(&m, &rs, &[NsEvent::Gone(NsRef::Named("a".into()))]);
        let deleted = CloseWhy::Deleted {
            name: "a".into(),
            upstream: false,
        };
        assert_eq!(
            acts,
            [
                Action::Close {
                    key: k.clone(),
                    mode,
                    why: deleted
                },
                Action::Wait {
                    key: k.clone(),
                    why: WaitReason::Deleted {
                        name: "a".into(),
                        upstream: false
                    }
                }
            ],
            "{policy}"
        );
        apply(&mut m, &acts);
        // And back: opened again.
        let acts = events(&m, &rs, &[NsEvent::Appeared(NsRef::Named("a".into()))]);
        assert_eq!(opens(&acts).len(), 1, "{policy}");
    }
}

#[test]
fn an_upstream_namespace_deleted_and_back() {
    let toml = rule("r", "\"a\", \"b\"", "upstream_netns = \"up\"");
    let (mut m, rs) = started(&toml, &[]);
    let acts = events(&m, &rs, &[NsEvent::Gone(NsRef::Named("up".into()))]);
    let mut closed: Vec<&Key> = acts
        .iter()
        .filter_map(|a| match a {
            Action::Close {
                key,
                mode: CloseMode::Now,
                why: CloseWhy::Deleted { upstream: true, .. },
            } => Some(key),
            _ => None,
        })
        .collect();
    closed.sort();
    assert_eq!(closed, [&key("r", "a"), &key("r", "b")]);
    apply(&mut m, &acts);
    assert!(m.values().all(|e| e.phase == Phase::Waiting));
    let acts = events(&m, &rs, &[NsEvent::Appeared(NsRef::Named("up".into()))]);
    let keys: Vec<&Key> = opens(&acts).iter().map(|o| &o.key).collect();
    assert_eq!(keys, [&key("r", "a"), &key("r", "b")]);
}

#[test]
fn a_name_that_comes_and_goes_in_one_batch_opens_nothing() {
    let toml = rule("g", "\"web-*\"", "");
    let (m, rs) = started(&toml, &[]);
    let batch = [
        NsEvent::Appeared(NsRef::Named("web-1".into())),
        NsEvent::Gone(NsRef::Named("web-1".into())),
    ];
    assert!(events(&m, &rs, &batch).is_empty());
    // Gone and back within one batch: closed, then opened once.
    let (m, rs) = started(&toml, &["web-1"]);
    let batch = [
        NsEvent::Gone(NsRef::Named("web-1".into())),
        NsEvent::Appeared(NsRef::Named("web-1".into())),
        NsEvent::Appeared(NsRef::Named("web-1".into())),
    ];
    let acts = events(&m, &rs, &batch);
    assert!(matches!(acts[0], Action::Close { .. }));
    assert!(matches!(acts[1], Action::Forget { .. }));
    assert_eq!(opens(&acts).len(), 1, "{acts:?}");
}

#[test]
fn a_lost_listener_waits_is_retried_and_opened_again() {
    let (mut m, rs) = started(&rule("r", "\"host\"", ""), &[]);
    let k = key("r", "host");
    let acts = lost(&k, Lost::Listener("epoll refused it".into()));
    assert_eq!(
        acts[1],
        Action::Retry {
            key: k.clone(),
            attempts: 0
        }
    );
    apply(&mut m, &acts);
    assert_eq!(m[&k].phase, Phase::Waiting);
    let acts = retries(&m, vec![k.clone()]);
    assert_eq!(
        acts,
        [Action::Open(Open {
            key: k.clone(),
            rule: rs[0].clone(),
            replacing: false,
            reopen: false
        })]
    );
    apply(&mut m, &acts);
    assert_eq!(m[&k].phase, Phase::Listening);
    // A retry that finds it listening (or gone) only leaves the schedule.
    assert_eq!(
        retries(&m, vec![k.clone(), key("r", "gone")]),
        [
            Action::Unschedule { key: k },
            Action::Unschedule {
                key: key("r", "gone")
            }
        ]
    );
}

#[test]
fn a_panicked_listener_fails_and_is_not_retried() {
    let k = key("r", "a");
    assert_eq!(
        lost(&k, Lost::Panicked("boom".into())),
        [Action::Fail {
            key: k.clone(),
            why: FailReason::Panicked("boom".into())
        }]
    );
    assert_eq!(
        open_failed(&k, OpenFailure::Panicked("boom".into()), 3),
        [Action::Fail {
            key: k,
            why: FailReason::Panicked("boom".into())
        }]
    );
}

#[test]
fn a_missing_address_backs_off_and_other_errors_fail() {
    let k = key("r", "a");
    let acts = open_failed(&k, OpenFailure::AddressMissing("EADDRNOTAVAIL".into()), 2);
    assert_eq!(
        acts[1],
        Action::Retry {
            key: k.clone(),
            attempts: 3
        }
    );
    assert!(matches!(
        &open_failed(&k, OpenFailure::Other("in use".into()), 0)[..],
        [Action::Fail {
            why: FailReason::Listen { .. },
            ..
        }]
    ));
}

#[test]
fn only_a_missing_name_or_followed_path_is_worth_waiting_for() {
    let named: NsRef = "a".parse().unwrap();
    let path: NsRef = "/var/run/x".parse().unwrap();
    let proc: NsRef = "/proc/7/ns/net".parse().unwrap();
    let not_found = |r: &NsRef| {
        Err(NsError::NotFound {
            reference: r.clone(),
            path: PathBuf::from("/nowhere"),
        })
    };
    assert!(matches!(
        Resolved::of(&named, Some(&not_found(&named))),
        Resolved::Missing(_)
    ));
    // A path is followed in its directory: it may come (back).
    assert!(matches!(
        Resolved::of(&path, Some(&not_found(&path))),
        Resolved::Missing(_)
    ));
    let unmounted = Err(NsError::NotNsfs {
        reference: path.clone(),
        path: PathBuf::from("/var/run/x"),
        fs: "tmpfs".into(),
    });
    assert!(matches!(
        Resolved::of(&path, Some(&unmounted)),
        Resolved::Missing(_)
    ));
    // Not under /proc, where nothing can be followed.
    assert!(matches!(
        Resolved::of(&proc, Some(&not_found(&proc))),
        Resolved::Broken(_)
    ));
    let unmounted = Err(NsError::NotNsfs {
        reference: named.clone(),
        path: PathBuf::from("/run/netns/a"),
        fs: "tmpfs".into(),
    });
    assert!(matches!(
        Resolved::of(&named, Some(&unmounted)),
        Resolved::Broken(_)
    ));
    assert!(matches!(Resolved::of(&named, None), Resolved::Broken(_)));
    let id = NsId { dev: 1, ino: 2 };
    assert_eq!(Resolved::of(&named, Some(&Ok(id))), Resolved::Id(id));
}

#[test]
fn the_reference_listed_first_serves_a_namespace_named_twice() {
    let rs = rules(&rule("r", "\"a\", \"/run/netns/a\"", ""));
    let (a, p): (NsRef, NsRef) = ("a".parse().unwrap(), "/run/netns/a".parse().unwrap());
    let id = NsId { dev: 1, ino: 7 };
    let home = NsId { dev: 1, ino: 1 };
    let v = |netns: &NsRef, serving: Option<&NsRef>| {
        verdict(&rs[0], netns, Resolved::Id(id), Resolved::Id(home), serving)
    };
    assert_eq!(
        v(&a, None),
        Verdict::Open {
            ns: id,
            upstream_ns: home
        }
    );
    // The path, listed second, gives way to the name that serves it.
    assert_eq!(v(&p, Some(&a)), Verdict::SameAs(a.clone()));
    // The name, listed first, takes over from the path.
    assert_eq!(
        v(&a, Some(&p)),
        Verdict::Demote {
            ns: id,
            upstream_ns: home,
            loser: p
        }
    );
    assert_eq!(
        v(&a, Some(&a)),
        Verdict::Open {
            ns: id,
            upstream_ns: home
        }
    );
    // The upstream namespace is judged first.
    assert_eq!(
        verdict(
            &rs[0],
            &a,
            Resolved::Missing("no a".into()),
            Resolved::Broken("bad".into()),
            None
        ),
        Verdict::Fail(FailReason::UpstreamNamespace {
            error: "bad".into()
        })
    );
}

#[test]
fn a_same_namespace_binding_is_resolved_again_at_a_reload_counted_unchanged() {
    let toml = rule("r", "\"a\", \"/run/netns/a\"", "");
    let (mut m, rs) = started(&toml, &[]);
    m.get_mut(&key("r", "/run/netns/a")).unwrap().phase = Phase::SameAs;
    let plan = reload(&m, desired(&rs, &[]));
    let o = opens(&plan.actions);
    assert_eq!(o.len(), 1);
    assert!(!o[0].reopen);
    assert_eq!(plan.report.unchanged, 2);
}

/// A small config: up to three rules over a few namespaces and settings.
fn config() -> impl Strategy<Value = Vec<Arc<Rule>>> {
    let base = rules(&rule("x", "\"host\"", ""))[0].clone();
    let refs = [
        NsRef::Host,
        NsRef::Named("a".into()),
        NsRef::Named("b".into()),
        NsRef::Glob("w*".into()),
    ];
    let one = (
        proptest::sample::subsequence(refs.to_vec(), 1..=4),
        0u16..3,
        proptest::option::of(1usize..3),
        prop_oneof![Just(NsRef::Host), Just(NsRef::Named("up".into()))],
    );
    proptest::collection::vec(proptest::option::of(one), 3).prop_map(move |slots| {
        let names = ["r0", "r1", "r2"];
        slots
            .into_iter()
            .zip(names)
            .filter_map(|(slot, name)| {
                let (netns, port, max, up) = slot?;
                let mut r = (*base).clone();
                r.name = name.into();
                r.netns = netns;
                r.listen.set_port(8000 + port);
                r.max_connections = max;
                r.upstream_netns = up;
                Some(Arc::new(r))
            })
            .collect()
    })
}

fn known() -> impl Strategy<Value = Vec<NsRef>> {
    let named = |n: &str| NsRef::Named(n.to_owned());
    proptest::sample::subsequence(vec![named("a"), named("w1"), named("w2")], 0..=3)
}

/// The keys and rules of a model, to compare.
fn bindings(m: &Model) -> Vec<(Key, Rule)> {
    let mut v: Vec<(Key, Rule)> = m
        .iter()
        .map(|(k, e)| (k.clone(), (*e.rule).clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

proptest! {
    #[test]
    fn prop_a_diff_there_and_back_yields_the_first_bindings(
        a in config(), b in config(), names in known(),
    ) {
        let mut m = Model::new();
        let first = reload(&m, desired(&a, &names));
        apply(&mut m, &first.actions);
        let at_a = bindings(&m);
        let there = reload(&m, desired(&b, &names));
        apply(&mut m, &there.actions);
        let back = reload(&m, desired(&a, &names));
        apply(&mut m, &back.actions);
        prop_assert_eq!(bindings(&m), at_a);
        prop_assert!(m.values().all(|e| e.phase == Phase::Listening));
    }

    #[test]
    fn prop_an_unchanged_binding_is_never_touched(
        a in config(), b in config(), names in known(),
    ) {
        let mut m = Model::new();
        let start = reload(&m, desired(&a, &names));
        apply(&mut m, &start.actions);
        let want = desired(&b, &names);
        let plan = reload(&m, want.clone());
        for (k, rule) in &want {
            let Some(e) = m.get(k) else { continue };
            if *e.rule != **rule {
                continue;
            }
            for act in touching(&plan.actions, k) {
                prop_assert!(matches!(act, Action::Keep { .. }), "{:?} touched by {:?}", k, act);
            }
        }
    }

    #[test]
    fn prop_events_never_close_what_does_not_listen_nor_open_what_does(
        a in config(), names in known(),
        batch in proptest::collection::vec(
            (any::<bool>(), proptest::sample::select(vec!["a", "b", "w1", "w3", "up"])), 0..6),
    ) {
        let mut m = Model::new();
        let start = reload(&m, desired(&a, &names));
        apply(&mut m, &start.actions);
        let batch: Vec<NsEvent> = batch
            .into_iter()
            .map(|(up, n)| if up { NsEvent::Appeared(NsRef::Named(n.into())) } else { NsEvent::Gone(NsRef::Named(n.into())) })
            .collect();
        let acts = events(&m, &a, &batch);
        // `apply` asserts that only listeners are closed.
        apply(&mut m, &acts);
        let mut opened: Vec<&Key> = opens(&acts).iter().map(|o| &o.key).collect();
        let n = opened.len();
        opened.dedup();
        prop_assert_eq!(n, opened.len(), "each opened once");
    }
}

/// A rule `r` listening on `ports` (`"10-12"`) in `a`, to `upstream`.
fn range_rule(ports: &str, upstream: &str) -> String {
    rule("r", "\"a\"", "")
        .replace(
            "upstream = \"127.0.0.1:9\"",
            &format!("upstream = \"127.0.0.1:{upstream}\""),
        )
        .replace("127.0.0.1:80", &format!("127.0.0.1:{ports}"))
}

fn port_key(port: u16) -> Key {
    let slot = Slot {
        name: "r".into(),
        port: Some(port),
    };
    (slot, "a".parse().unwrap())
}

#[test]
fn a_range_is_one_binding_per_port() {
    let rs = rules(&range_rule("10-12", "20-22"));
    let plan = reload(&Model::new(), desired(&rs, &[]));
    let keys: Vec<&Key> = opens(&plan.actions).iter().map(|o| &o.key).collect();
    assert_eq!(keys, [&port_key(10), &port_key(11), &port_key(12)]);
    assert_eq!(plan.report.added, 3);
}

#[test]
fn widening_a_range_keeps_the_ports_that_stay() {
    let (m, _) = started(&range_rule("10-12", "20-22"), &[]);
    let plan = reload(&m, desired(&rules(&range_rule("9-14", "19-24")), &[]));
    for p in 10..=12 {
        assert!(
            matches!(
                &touching(&plan.actions, &port_key(p))[..],
                [Action::Keep { .. }]
            ),
            "port {p}: {:?}",
            plan.actions
        );
    }
    let mut opened: Vec<u16> = opens(&plan.actions)
        .iter()
        .map(|o| o.key.0.port.unwrap())
        .collect();
    opened.sort();
    assert_eq!(opened, [9, 13, 14]);
    assert_eq!((plan.report.added, plan.report.unchanged), (3, 3));
}

#[test]
fn narrowing_a_range_closes_only_the_ports_that_go() {
    let (m, _) = started(&range_rule("10-14", "7"), &[]);
    let plan = reload(&m, desired(&rules(&range_rule("11-12", "7")), &[]));
    for p in [10, 13, 14] {
        assert!(matches!(
            &touching(&plan.actions, &port_key(p))[..],
            [
                Action::Close {
                    why: CloseWhy::Removed,
                    ..
                },
                Action::Forget { .. }
            ]
        ));
    }
    for p in [11, 12] {
        assert!(matches!(
            &touching(&plan.actions, &port_key(p))[..],
            [Action::Keep { .. }]
        ));
    }
    assert_eq!((plan.report.removed, plan.report.unchanged), (3, 2));
}

#[test]
fn a_shifted_port_to_port_mapping_reopens_the_ports_whose_upstream_moved() {
    let (m, _) = started(&range_rule("10-11", "20-21"), &[]);
    let plan = reload(&m, desired(&rules(&range_rule("10-11", "30-31")), &[]));
    assert_eq!(plan.report.replaced, 2);
}

#[test]
fn a_namespace_that_comes_and_goes_opens_and_closes_every_port_of_a_range() {
    let toml = range_rule("10-12", "7").replace("\"a\"", "\"web-*\"");
    let (mut m, rs) = started(&toml, &[]);
    assert!(m.is_empty());
    let acts = events(&m, &rs, &[NsEvent::Appeared(NsRef::Named("web-1".into()))]);
    let opened: Vec<Option<u16>> = opens(&acts).iter().map(|o| o.key.0.port).collect();
    assert_eq!(opened, [Some(10), Some(11), Some(12)]);
    apply(&mut m, &acts);
    let acts = events(&m, &rs, &[NsEvent::Gone(NsRef::Named("web-1".into()))]);
    let closed = acts
        .iter()
        .filter(|a| matches!(a, Action::Close { .. }))
        .count();
    assert_eq!(closed, 3, "{acts:?}");
}
