//! Property tests of the TOML front end: generated configs round-trip,
//! and mangled ones never panic and locate every problem.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::config::ProxyProtocol;
use crate::config::strategies::{ip, ns_ref, unicast};
use crate::config::*;
use crate::netns::NsRef;
use crate::sctp::Streams;

/// Checks that `location` is `t.toml:LINE:COLUMN` inside `text`.
fn inside(text: &str, location: &str) -> Result<(), String> {
    let bad = || format!("location {location:?} is not inside the file");
    let rest = location.strip_prefix("t.toml:").ok_or_else(bad)?;
    let (line, col) = rest.split_once(':').ok_or_else(bad)?;
    let (line, col): (usize, usize) = (
        line.parse().map_err(|_| bad())?,
        col.parse().map_err(|_| bad())?,
    );
    let lines: Vec<&str> = text.split('\n').collect();
    if line == 0 || line > lines.len() || col == 0 || col > lines[line - 1].len() + 1 {
        return Err(bad());
    }
    Ok(())
}

/// The text at a `t.toml:LINE:COLUMN` location, to the end of its line.
fn at<'t>(text: &'t str, location: &str) -> &'t str {
    let mut parts = location.rsplitn(3, ':');
    let col: usize = parts.next().unwrap().parse().unwrap();
    let line: usize = parts.next().unwrap().parse().unwrap();
    &text.split('\n').nth(line - 1).unwrap()[col - 1..]
}

/// A duration and how to write it: whole seconds, "Ns" or "Nm" (exact
/// in every form, unlike fractions).
fn duration() -> impl Strategy<Value = (Duration, String)> {
    prop_oneof![
        (1u64..=86_400).prop_map(|s| (Duration::from_secs(s), s.to_string())),
        (1u64..=86_400).prop_map(|s| (Duration::from_secs(s), format!("\"{s}s\""))),
        (1u64..=1440).prop_map(|m| (Duration::from_secs(m * 60), format!("\"{m}m\""))),
    ]
}

/// A valid rule (its name and listen port are set from its index, so
/// that rules never clash) and the optional keys to write for it.
#[derive(Debug, Clone)]
struct Gen {
    rule: Rule,
    write_upstream_netns: bool,
    /// `key = value` lines beyond the required ones.
    extra: Vec<String>,
}

/// Optional values for the connection and TCP keys: `connect_timeout`,
/// `backlog`, `max_connections`, `proxy_protocol`.
type ConnKeys = (
    Option<(Duration, String)>,
    Option<u32>,
    Option<usize>,
    Option<ProxyProtocol>,
);
/// Optional values for `udp_idle_timeout`, `udp_max_sessions`,
/// `on_netns_delete`, `sctp_streams` (in, out) and `sctp_upstream_addrs`.
type OtherKeys = (
    Option<(Duration, String)>,
    Option<usize>,
    Option<OnDelete>,
    Option<(u16, u16)>,
    std::collections::BTreeSet<IpAddr>,
);

/// Sets the drawn optional keys that `rule`'s protocol takes; returns their
/// `key = value` lines.
fn optional_keys(rule: &mut Rule, conn: ConnKeys, other: OtherKeys) -> Vec<String> {
    let mut extra = Vec::new();
    let takes = |k: &str| rule.protocol.takes(k);
    let (connect, backlog, max_conn, pp) = conn;
    let (idle, sessions, on_delete, streams, addrs) = other;
    let (c, b, m, p) = (
        takes("connect_timeout"),
        takes("backlog"),
        takes("max_connections"),
        takes("proxy_protocol"),
    );
    let (ui, us, ss, su) = (
        takes("udp_idle_timeout"),
        takes("udp_max_sessions"),
        takes("sctp_streams"),
        takes("sctp_upstream_addrs"),
    );
    if let (true, Some((d, s))) = (c, connect) {
        rule.connect_timeout = d;
        extra.push(format!("connect_timeout = {s}"));
    }
    if let (true, Some(v)) = (b, backlog) {
        rule.backlog = v;
        extra.push(format!("backlog = {v}"));
    }
    if let (true, Some(v)) = (m, max_conn) {
        rule.max_connections = Some(v);
        extra.push(format!("max_connections = {v}"));
    }
    if let (true, Some(v)) = (p, pp) {
        rule.proxy_protocol = Some(v);
        extra.push(format!("proxy_protocol = \"{v}\""));
    }
    if let (true, Some((d, s))) = (ui, idle) {
        rule.udp_idle_timeout = d;
        extra.push(format!("udp_idle_timeout = {s}"));
    }
    if let (true, Some(n)) = (us, sessions) {
        rule.udp_max_sessions = n;
        extra.push(format!("udp_max_sessions = {n}"));
    }
    if let Some(d) = on_delete {
        rule.on_netns_delete = d;
        extra.push(format!("on_netns_delete = \"{d}\""));
    }
    if let (true, Some((i, o))) = (ss, streams) {
        rule.sctp_streams = Streams {
            outbound: o,
            max_inbound: i,
        };
        extra.push(format!("sctp_streams = {{ in = {i}, out = {o} }}"));
    }
    if su {
        rule.sctp_upstream_addrs = addrs.into_iter().collect();
        let list: Vec<String> = rule
            .sctp_upstream_addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect();
        extra.push(format!("sctp_upstream_addrs = [{}]", list.join(", ")));
    }
    extra
}

fn gen_rule() -> impl Strategy<Value = Gen> {
    let protocol = prop_oneof![
        Just(Protocol::Tcp),
        Just(Protocol::Udp),
        Just(Protocol::Sctp)
    ];
    (
        protocol,
        ip(),
        prop::collection::vec(ns_ref(true), 1..6),
        (unicast(), 1u16..),
        prop::option::of(ns_ref(false)),
        (
            prop::option::of(duration()),
            prop::option::of(1u32..=65_535),
            prop::option::of(1usize..=MAX_CONNECTIONS),
            prop::option::of(prop_oneof![
                Just(ProxyProtocol::V1),
                Just(ProxyProtocol::V2)
            ]),
        ),
        (
            prop::option::of(duration()),
            prop::option::of(1usize..=MAX_UDP_SESSIONS),
            prop::option::of(prop_oneof![Just(OnDelete::Close), Just(OnDelete::Drain)]),
            prop::option::of((1u16.., 1u16..)),
            prop::collection::btree_set(unicast(), 0..3),
        ),
    )
        .prop_map(
            |(protocol, listen_ip, netns, (up_ip, up_port), up_ns, tcp, udp)| {
                let mut seen = std::collections::HashSet::new();
                let netns: Vec<NsRef> = netns
                    .into_iter()
                    .filter(|r| seen.insert(r.clone()))
                    .collect();
                // Every key not set in `optional_keys` keeps the default the parser
                // gives it (so a new key needs no change here).
                let mut rule = Rule {
                    name: String::new(),
                    protocol,
                    listen: SocketAddr::new(listen_ip, 0),
                    netns,
                    upstream: SocketAddr::new(up_ip, up_port),
                    upstream_netns: up_ns.clone().unwrap_or(NsRef::Host),
                    origin: String::new(),
                    ..defaults(protocol)
                };
                let extra = optional_keys(&mut rule, tcp, udp);
                Gen {
                    rule,
                    write_upstream_netns: up_ns.is_some(),
                    extra,
                }
            },
        )
}

/// A rule of `protocol` with every optional key left out, as read.
fn defaults(protocol: Protocol) -> Rule {
    let text = format!(
        "[[proxy]]\nname = \"d\"\nprotocol = \"{protocol}\"\nlisten = \"127.0.0.1:1\"\nnetns = [\"host\"]\nupstream = \"127.0.0.1:9\"\n"
    );
    let rule = parse_toml(&text, "d.toml").unwrap().rules.remove(0);
    assert_eq!(
        (rule.connect_timeout, rule.backlog, rule.sctp_streams),
        (
            DEFAULT_CONNECT_TIMEOUT,
            DEFAULT_BACKLOG,
            DEFAULT_SCTP_STREAMS
        )
    );
    rule
}

/// Writes the rules as a file; fills in each rule's name, port and origin.
fn render(rules: &mut [Gen], workers: Option<usize>) -> String {
    let mut text = String::new();
    if let Some(w) = workers {
        writeln!(text, "workers = {w}").unwrap();
    }
    for (i, g) in rules.iter_mut().enumerate() {
        let r = &mut g.rule;
        r.name = format!("rule-{i}");
        r.listen.set_port(1000 + i as u16);
        text.push('\n');
        r.origin = format!("t.toml:{}:1", text.matches('\n').count() + 1);
        let netns: Vec<String> = r.netns.iter().map(|n| format!("\"{n}\"")).collect();
        writeln!(
            text,
            "[[proxy]]\nname = \"{}\"\nprotocol = \"{}\"\nlisten = \"{}\"\nnetns = [{}]\nupstream = \"{}\"",
            r.name,
            r.protocol,
            r.listen,
            netns.join(", "),
            r.upstream
        )
        .unwrap();
        if g.write_upstream_netns {
            writeln!(text, "upstream_netns = \"{}\"", r.upstream_netns).unwrap();
        }
        for line in &g.extra {
            writeln!(text, "{line}").unwrap();
        }
    }
    text
}

/// One edit of a text: at a char position, delete, insert or replace.
fn mutate(text: &str, edits: &[(usize, u8, char)]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for &(pos, op, c) in edits {
        let pos = pos % (chars.len() + 1);
        match op % 3 {
            0 if pos < chars.len() => {
                chars.remove(pos);
            }
            1 => chars.insert(pos, c),
            _ if pos < chars.len() => chars[pos] = c,
            _ => chars.push(c),
        }
    }
    chars.into_iter().collect()
}

fn edit_char() -> impl Strategy<Value = char> {
    prop_oneof![
        3 => prop::sample::select(
            "\"'[]{}=,.:@#\n\\ *?0123456789abcdefghijklmnopqrstuvwxyz-_é€".chars().collect::<Vec<_>>()
        ),
        1 => any::<char>(),
    ]
}

proptest! {
    #[test]
    fn prop_generated_config_round_trips(
        mut rules in prop::collection::vec(gen_rule(), 1..5),
        workers in prop::option::of(1usize..=MAX_WORKERS),
    ) {
        let text = render(&mut rules, workers);
        let (config, locations) = parse_toml_located(&text, "t.toml")
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(config.workers, workers);
        prop_assert_eq!(config.rules.len(), rules.len());
        for ((got, want), at_) in config.rules.iter().zip(&rules).zip(&locations) {
            prop_assert_eq!(got, &want.rule, "{}", text);
            // Each reference is located at its own quoted entry.
            prop_assert_eq!(at_.netns.len(), got.netns.len());
            for (r, loc) in got.netns.iter().zip(&at_.netns) {
                let quoted = format!("\"{r}\"");
                prop_assert!(at(&text, loc).starts_with(&quoted), "{} at {}", r, loc);
            }
            match &at_.upstream_netns {
                Some(loc) => {
                    let quoted = format!("\"{}\"", got.upstream_netns);
                    prop_assert!(at(&text, loc).starts_with(&quoted));
                }
                None => prop_assert!(!want.write_upstream_netns),
            }
        }
    }

    #[test]
    fn prop_mutated_configs_never_panic_and_locate_every_problem(
        mut rules in prop::collection::vec(gen_rule(), 1..4),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), edit_char()), 1..6),
    ) {
        let text = mutate(&render(&mut rules, None), &edits);
        match parse_toml(&text, "t.toml") {
            Ok(config) => {
                for r in &config.rules {
                    prop_assert!(inside(&text, &r.origin).is_ok(), "{}", r.origin);
                }
            }
            Err(e) => {
                prop_assert!(!e.problems().is_empty());
                for p in e.problems() {
                    if let Err(m) = inside(&text, &p.location) {
                        return Err(TestCaseError::fail(format!("{m}: {p}\n{text}")));
                    }
                }
            }
        }
    }

    #[test]
    fn prop_any_text_never_panics_and_locates_every_problem(
        text in prop_oneof![
            any::<String>(),
            "([a-z_\\[\\]\" =.,{}0-9\n]|\\[\\[proxy\\]\\]\n|name = |netns = \\[|\"\\*\"){0,40}",
        ],
    ) {
        if let Err(e) = parse_toml(&text, "t.toml") {
            prop_assert!(!e.problems().is_empty());
            for p in e.problems() {
                prop_assert!(inside(&text, &p.location).is_ok(), "{}", p);
            }
        }
    }

    #[test]
    fn prop_durations_never_panic(s in any::<String>()) {
        if let Ok(d) = parse_duration(&s) {
            prop_assert!(d > Duration::ZERO && d <= Duration::from_secs(86_400));
        }
    }
}
