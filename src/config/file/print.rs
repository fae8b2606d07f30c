//! A rule printed as a `[[proxy]]` table, every key of its protocol's
//! settings groups written out, and the properties that need it: a printed
//! rule parses back equal, and a key is refused exactly where the types say.

use std::fmt::Write as _;
use std::time::Duration;

use proptest::prelude::*;

use crate::config::settings::{all_keys, refusal};
use crate::config::strategies::{protocol, rule};
use crate::config::{Protocol, Rule, Settings, parse_toml};
use crate::netns::NsRef;

/// A duration as the front end reads it back exactly.
fn duration(d: Duration) -> String {
    assert_eq!(d.subsec_nanos(), 0, "the strategies make whole seconds");
    format!("\"{}s\"", d.as_secs())
}

fn off(d: Option<Duration>) -> String {
    d.map_or("false".into(), duration)
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(|i| format!("\"{i}\"")).collect();
    format!("[{}]", items.join(", "))
}

/// The TOML value of per-protocol `key` in `rule`; `None` where the value is
/// written by leaving the key out. Panics on a key it does not know, so
/// that a new setting fails here until it is printed.
fn value(rule: &Rule, key: &str) -> Option<String> {
    Some(match key {
        "connect_timeout" => duration(rule.connect_timeout),
        "backlog" => rule.backlog.to_string(),
        "max_connections" => rule.max_connections?.to_string(),
        "idle_timeout" => off(rule.idle_timeout),
        "proxy_protocol" => format!("\"{}\"", rule.proxy_protocol?),
        "upstream_source" => match rule.upstream_source {
            crate::config::UpstreamSource::Proxy => return None,
            source => format!("\"{source}\""),
        },
        "half_close_timeout" => off(rule.half_close_timeout),
        "tcp_keepalive" => rule.tcp_keepalive.map_or("false".into(), |k| {
            format!(
                "{{ idle = {}, interval = {}, count = {} }}",
                duration(k.idle),
                duration(k.interval),
                k.count
            )
        }),
        "udp_idle_timeout" => duration(rule.udp_idle_timeout),
        "udp_max_sessions" => rule.udp_max_sessions.to_string(),
        "sctp_streams" => format!(
            "{{ in = {}, out = {} }}",
            rule.sctp_streams.max_inbound, rule.sctp_streams.outbound
        ),
        "sctp_listen_addrs" => list(&rule.sctp_listen_addrs),
        "sctp_upstream_addrs" => list(&rule.sctp_upstream_addrs),
        "sctp_source_addrs" => list(&rule.sctp_source_addrs),
        other => panic!("no way to print setting `{other}`: add it here"),
    })
}

/// The keys every rule has.
fn print_common(text: &mut String, rule: &Rule) {
    writeln!(
        text,
        "[[proxy]]\nname = \"{}\"\nprotocol = \"{}\"\nlisten = \"{}\"\nnetns = {}\nupstream = \"{}\"\nupstream_netns = \"{}\"\non_netns_delete = \"{}\"",
        rule.name,
        rule.protocol,
        rule.listen_text(),
        list(&rule.netns),
        rule.upstream_text(),
        rule.upstream_netns,
        rule.on_netns_delete,
    )
    .unwrap();
}

/// `rule` as a `[[proxy]]` table with every key of its protocol's groups.
pub(super) fn print(text: &mut String, rule: &Rule) {
    print_common(text, rule);
    for key in rule.settings().keys() {
        if let Some(v) = value(rule, key.name) {
            writeln!(text, "{} = {v}", key.name).unwrap();
        }
    }
}

/// Gives the rules distinct names and ports (every other one a range),
/// and the origins the printer will put them at.
fn place(rules: &mut [Rule]) -> String {
    let mut text = String::new();
    for (i, r) in rules.iter_mut().enumerate() {
        r.name = format!("rule-{i}");
        r.listen.set_port(1000 + 100 * i as u16);
        // Every other rule a port range, port to port or to one port.
        if i % 2 == 1 {
            let (first, up) = (r.listen.port(), r.upstream.port());
            r.ports = Some(crate::config::PortRange {
                first,
                last: first + i as u16,
                upstream_first: up,
                to_one: i % 4 == 3 || up.checked_add(i as u16).is_none(),
            });
        }
        text.push('\n');
        r.origin = format!("t.toml:{}:1", text.matches('\n').count() + 1);
        print(&mut text, r);
    }
    text
}

/// A sample value of per-protocol `key`: its default in a rule of a
/// protocol that has it, or, where the default is written by leaving the
/// key out, a value the key takes.
fn sample(key: &str) -> String {
    let p = Protocol::ALL.into_iter().find(|p| p.takes(key)).unwrap();
    let mut r = Rule::new(
        "s".into(),
        "[::1]:1".parse().unwrap(),
        vec![NsRef::Host],
        "[::1]:2".parse().unwrap(),
        NsRef::Host,
        Settings::defaults(p),
        String::new(),
    );
    r.max_connections = Some(1);
    r.proxy_protocol = Some(crate::config::ProxyProtocol::V1);
    r.upstream_source = crate::config::UpstreamSource::Client;
    value(&r, key).unwrap()
}

#[test]
fn every_setting_prints() {
    for key in all_keys() {
        assert!(!sample(key.name).is_empty(), "{}", key.name);
    }
}

proptest! {
    #[test]
    fn prop_printed_rules_parse_back_equal(mut rules in prop::collection::vec(rule(), 1..5)) {
        let text = place(&mut rules);
        let config = parse_toml(&text, "t.toml")
            .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&config.rules, &rules, "{}", text);
    }

    #[test]
    fn prop_keys_are_refused_where_the_types_say(
        protocol in protocol(),
        key in prop::sample::select(all_keys()),
    ) {
        let text = format!(
            "[[proxy]]\nname = \"r\"\nprotocol = \"{protocol}\"\nlisten = \"[::1]:1\"\nnetns = \"host\"\nupstream = \"[::1]:2\"\n{} = {}\n",
            key.name,
            sample(key.name)
        );
        match (parse_toml(&text, "t.toml"), refusal(protocol, key.name)) {
            (Ok(c), Ok(())) => prop_assert!(c.rules[0].settings().keys().contains(&key)),
            (Err(e), Err(refused)) => {
                let want = format!(
                    "t.toml:7:{}: rule r: `{}`: {refused}",
                    key.name.len() + 4,
                    key.name
                );
                let got: Vec<String> = e.problems().iter().map(|p| p.to_string()).collect();
                prop_assert_eq!(got, vec![want]);
            }
            (got, want) => prop_assert!(false, "{protocol} {}: parsed {got:?}, refusal {want:?}", key.name),
        }
    }
}
