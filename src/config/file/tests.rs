//! Unit tests of the TOML front end: each message, with its location.

use super::*;
use crate::config::ProxyProtocol;
use crate::config::*;
use crate::netns::NsRef;

fn problems(text: &str) -> Vec<String> {
    match parse_toml(text, "t.toml") {
        Ok(c) => panic!("expected problems, got {c:?}"),
        Err(e) => e.problems().iter().map(|p| p.to_string()).collect(),
    }
}

const GOOD: &str = r#"
workers = 2
[[proxy]]
name = "hello"
protocol = "tcp"
listen = "[::]:8000"
netns = ["host", "ns1", "ns2"]
upstream = "127.0.0.1:9000"
upstream_netns = "host"
"#;

#[test]
fn reference_config_parses() {
    let c = parse_toml(GOOD, "t.toml").unwrap();
    assert_eq!(c.workers, Some(2));
    let r = &c.rules[0];
    assert_eq!(r.name, "hello");
    assert_eq!(r.listen, "[::]:8000".parse().unwrap());
    assert_eq!(
        r.netns,
        vec![
            NsRef::Host,
            NsRef::Named("ns1".into()),
            NsRef::Named("ns2".into())
        ]
    );
    assert_eq!(r.upstream_netns, NsRef::Host);
    assert_eq!(r.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
    assert_eq!(r.origin, "t.toml:3:1");
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let text = GOOD
        .replace("workers = 2", "workers = 2\nwrokers = 3")
        .replace(
            "upstream_netns = \"host\"",
            "upstream_netns = \"host\"\nlisten_port = 9",
        );
    assert_eq!(
        problems(&text),
        vec![
            "t.toml:3:1: unknown key `wrokers` (expected one of: workers, control_socket, metrics_listen, drain_timeout, user, proxy)",
            "t.toml:11:1: rule hello: unknown key `listen_port` (expected one of: name, protocol, listen, netns, upstream, upstream_netns, connect_timeout, backlog, max_connections, proxy_protocol, upstream_source, udp_idle_timeout, udp_max_sessions, idle_timeout, half_close_timeout, tcp_keepalive, on_netns_delete, sctp_streams, sctp_listen_addrs, sctp_upstream_addrs, sctp_source_addrs)",
        ]
    );
}

#[test]
fn every_bad_value_is_reported_at_once() {
    let text = r#"
[[proxy]]
name = "a b"
protocol = "http"
listen = "8000"
netns = ["ns1", "bad/name", "pid:x", "ns1"]
upstream = "localhost:9000"
upstream_netns = ""
connect_timeout = "soon"
backlog = 0
"#;
    assert_eq!(
        problems(text),
        vec![
            "t.toml:3:8: rule #1: `name`: invalid rule name \"a b\": ' ' is not allowed (use letters, digits, '-', '_' and '.')",
            "t.toml:4:12: rule #1: `protocol`: unknown protocol \"http\": expected \"tcp\", \"udp\" or \"sctp\"",
            "t.toml:5:10: rule #1: `listen`: invalid listen address \"8000\": expected IP:PORT, such as 0.0.0.0:8000, 127.0.0.1:8000 or [::]:8000",
            "t.toml:6:17: rule #1: `netns[1]`: \"bad/name\" is not a valid namespace name: a name under /run/netns has no '/' and is not \".\" or \"..\" (for a path, start it with '/')",
            "t.toml:6:29: rule #1: `netns[2]`: \"pid:x\" is not a valid pid: expected \"pid:\" followed by a process id such as pid:1234",
            "t.toml:6:38: rule #1: `netns[3]`: namespace \"ns1\" is listed twice",
            "t.toml:7:12: rule #1: `upstream`: invalid upstream address \"localhost:9000\": expected IP:PORT such as 127.0.0.1:9000 or [::1]:9000 (host names are not resolved)",
            "t.toml:8:18: rule #1: `upstream_netns`: empty namespace reference: use \"host\", a name under /run/netns, an absolute path or \"pid:PID\"",
            "t.toml:9:19: rule #1: `connect_timeout`: invalid duration \"soon\": expected a number with a unit, such as 500ms, 5s or 2m",
            "t.toml:10:11: rule #1: `backlog`: must be between 1 and 65535, got 0",
        ]
    );
}

#[test]
fn duplicate_names_and_binds() {
    let text = format!("{GOOD}\n{}", GOOD.replace("workers = 2", ""));
    assert_eq!(
        problems(&text),
        vec![
            "t.toml:14:8: rule hello: `name`: duplicate rule name \"hello\" (first used at t.toml:3:1)",
            "t.toml:17:10: rule hello: `netns[0]`: tcp [::]:8000 in namespace \"host\" is already used by rule hello (at t.toml:7:10)",
            "t.toml:17:18: rule hello: `netns[1]`: tcp [::]:8000 in namespace \"ns1\" is already used by rule hello (at t.toml:7:18)",
            "t.toml:17:25: rule hello: `netns[2]`: tcp [::]:8000 in namespace \"ns2\" is already used by rule hello (at t.toml:7:25)",
        ]
    );
}

#[test]
fn udp_rules_and_their_keys() {
    let udp = GOOD.replace("\"tcp\"", "\"udp\"");
    let c = parse_toml(&udp, "t.toml").unwrap();
    let r = &c.rules[0];
    assert_eq!(r.protocol, Protocol::Udp);
    assert_eq!(r.udp_idle_timeout, DEFAULT_UDP_IDLE_TIMEOUT);
    assert_eq!(r.udp_max_sessions, DEFAULT_UDP_MAX_SESSIONS);
    let tuned = udp.replace(
        "upstream_netns = \"host\"",
        "upstream_netns = \"host\"\nudp_idle_timeout = \"1500ms\"\nudp_max_sessions = 7",
    );
    let r = &parse_toml(&tuned, "t.toml").unwrap().rules[0];
    assert_eq!(r.udp_idle_timeout, std::time::Duration::from_millis(1500));
    assert_eq!(r.udp_max_sessions, 7);
    let r = &parse_toml(
        &udp.replace(
            "name = \"hello\"",
            "name = \"hello\"\nudp_idle_timeout = 30",
        ),
        "t.toml",
    )
    .unwrap()
    .rules[0];
    assert_eq!(r.udp_idle_timeout, std::time::Duration::from_secs(30));
    // TCP and UDP may share an address and port.
    let both = format!(
        "{GOOD}\n{}",
        udp.replace("workers = 2", "").replace("hello", "hello-udp")
    );
    assert_eq!(parse_toml(&both, "t.toml").unwrap().rules.len(), 2);
}

#[test]
fn max_connections_caps_tcp_and_sctp_rules() {
    assert_eq!(
        parse_toml(GOOD, "t.toml").unwrap().rules[0].max_connections,
        None
    );
    let capped = |v: &str| {
        GOOD.replace(
            "upstream_netns = \"host\"",
            &format!("upstream_netns = \"host\"\nmax_connections = {v}"),
        )
    };
    for protocol in ["tcp", "sctp"] {
        let text = capped("250").replace("\"tcp\"", &format!("\"{protocol}\""));
        let r = &parse_toml(&text, "t.toml").unwrap().rules[0];
        assert_eq!(r.max_connections, Some(250), "{protocol}");
    }
    assert_eq!(
        problems(&capped("0")),
        vec!["t.toml:10:19: rule hello: `max_connections`: must be between 1 and 1000000, got 0"]
    );
    assert_eq!(
        problems(&capped("\"many\"")),
        vec!["t.toml:10:19: rule hello: `max_connections`: expected an integer, found a string"]
    );
}

#[test]
fn timeouts_and_keepalive() {
    use std::time::Duration;
    let good_with = |protocol: &str, extra: &str| {
        GOOD.replace("\"tcp\"", &format!("\"{protocol}\""))
            .replace("upstream_netns = \"host\"", extra)
    };
    let with_extra =
        |protocol: &str, extra: &str| parse_toml(&good_with(protocol, extra), "t.toml");
    let r = &parse_toml(GOOD, "t.toml").unwrap().rules[0];
    assert_eq!(r.idle_timeout, Some(DEFAULT_IDLE_TIMEOUT));
    assert_eq!(r.half_close_timeout, Some(DEFAULT_HALF_CLOSE_TIMEOUT));
    assert_eq!(r.tcp_keepalive, Some(DEFAULT_TCP_KEEPALIVE));
    let r = &with_extra(
        "tcp",
        "upstream_netns = \"host\"\nidle_timeout = \"90s\"\nhalf_close_timeout = false\ntcp_keepalive = { idle = \"30s\", count = 3 }",
    )
    .unwrap()
    .rules[0];
    assert_eq!(r.idle_timeout, Some(Duration::from_secs(90)));
    assert_eq!(r.half_close_timeout, None);
    let want = Keepalive {
        idle: Duration::from_secs(30),
        count: 3,
        ..DEFAULT_TCP_KEEPALIVE
    };
    assert_eq!(r.tcp_keepalive, Some(want));
    let r = &with_extra(
        "tcp",
        "upstream_netns = \"host\"\nidle_timeout = false\ntcp_keepalive = false",
    )
    .unwrap()
    .rules[0];
    assert_eq!((r.idle_timeout, r.tcp_keepalive), (None, None));
    // SCTP takes idle_timeout only.
    let r = &with_extra("sctp", "upstream_netns = \"host\"\nidle_timeout = 20")
        .unwrap()
        .rules[0];
    assert_eq!(r.idle_timeout, Some(Duration::from_secs(20)));
    assert_eq!(
        problems(&good_with(
            "sctp",
            "upstream_netns = \"host\"\nhalf_close_timeout = \"5s\"\ntcp_keepalive = true"
        )),
        [
            "t.toml:10:22: rule hello: `half_close_timeout`: only applies to tcp rules, and this rule is sctp (only TCP has half-closed connections): remove it",
            "t.toml:11:17: rule hello: `tcp_keepalive`: only applies to tcp rules, and this rule is sctp (keepalive probes are TCP's): remove it",
        ]
    );
    assert_eq!(
        problems(&good_with(
            "udp",
            "upstream_netns = \"host\"\nidle_timeout = \"5s\""
        )),
        [
            "t.toml:10:16: rule hello: `idle_timeout`: only applies to tcp and sctp rules, and this rule is udp (UDP sessions end after udp_idle_timeout): remove it",
        ]
    );
    assert_eq!(
        problems(&good_with(
            "tcp",
            "upstream_netns = \"host\"\nidle_timeout = true\ntcp_keepalive = { idle = \"1500ms\", count = 0, every = 1 }"
        )),
        [
            "t.toml:10:16: rule hello: `idle_timeout`: expected a duration such as \"30m\", or false to turn it off; true is not a duration",
            "t.toml:11:26: rule hello: `tcp_keepalive.idle`: 1.5s is not a whole number of seconds from 1s to 32767s (the kernel counts keepalive times in seconds)",
            "t.toml:11:44: rule hello: `tcp_keepalive.count`: must be between 1 and 127, got 0",
            "t.toml:11:47: rule hello: unknown key `tcp_keepalive.every` (expected one of: idle, interval, count)",
        ]
    );
}

#[test]
fn proxy_protocol_on_tcp_rules() {
    assert_eq!(
        parse_toml(GOOD, "t.toml").unwrap().rules[0].proxy_protocol,
        None
    );
    let with = |v: &str| {
        GOOD.replace(
            "upstream_netns = \"host\"",
            &format!("upstream_netns = \"host\"\nproxy_protocol = {v}"),
        )
    };
    for (v, want) in [("v1", ProxyProtocol::V1), ("v2", ProxyProtocol::V2)] {
        let r = &parse_toml(&with(&format!("\"{v}\"")), "t.toml")
            .unwrap()
            .rules[0];
        assert_eq!(r.proxy_protocol, Some(want));
    }
    assert_eq!(
        problems(&with("\"2\"")),
        vec![
            "t.toml:10:18: rule hello: `proxy_protocol`: invalid proxy_protocol \"2\": expected \"v1\" (text) or \"v2\" (binary, with the namespace)"
        ]
    );
    assert_eq!(
        problems(&with("\"v2\"").replace("\"tcp\"", "\"sctp\"")),
        vec![
            "t.toml:10:18: rule hello: `proxy_protocol`: only applies to tcp rules, and this rule is sctp (nsproxy sends PROXY protocol headers on TCP connections only): remove it"
        ]
    );
}

#[test]
fn upstream_source_on_tcp_and_udp_rules_only() {
    assert_eq!(
        parse_toml(GOOD, "t.toml").unwrap().rules[0].upstream_source,
        UpstreamSource::Proxy
    );
    let with = |v: &str| {
        GOOD.replace(
            "upstream_netns = \"host\"",
            &format!("upstream_netns = \"host\"\nupstream_source = {v}"),
        )
    };
    for protocol in ["tcp", "udp"] {
        let text = with("\"client\"").replace("\"tcp\"", &format!("\"{protocol}\""));
        let r = &parse_toml(&text, "t.toml").unwrap().rules[0];
        assert_eq!(r.upstream_source, UpstreamSource::Client, "{protocol}");
    }
    assert_eq!(
        problems(&with("\"nsproxy\"")),
        vec![
            "t.toml:10:19: rule hello: `upstream_source`: invalid upstream_source \"nsproxy\": expected \"proxy\" (nsproxy's own address, the default) or \"client\" (the client's address and port, with IP_TRANSPARENT)"
        ]
    );
    assert_eq!(
        problems(&with("\"client\"").replace("\"tcp\"", "\"sctp\"")),
        vec![
            "t.toml:10:19: rule hello: `upstream_source`: only applies to tcp and udp rules, and this rule is sctp (Linux SCTP has no IP_TRANSPARENT: an association cannot be bound to the client's address): remove it"
        ]
    );
}

#[test]
fn keys_of_the_other_protocol_are_refused() {
    let tcp = GOOD.replace(
        "upstream_netns = \"host\"",
        "upstream_netns = \"host\"\nudp_idle_timeout = \"5s\"\nudp_max_sessions = 0",
    );
    assert_eq!(
        problems(&tcp),
        vec![
            "t.toml:10:20: rule hello: `udp_idle_timeout`: only applies to udp rules, and this rule is tcp (connections and associations have idle_timeout): remove it",
            "t.toml:11:20: rule hello: `udp_max_sessions`: must be between 1 and 1000000, got 0",
            "t.toml:11:20: rule hello: `udp_max_sessions`: only applies to udp rules, and this rule is tcp (connections and associations are capped with max_connections): remove it",
        ]
    );
    let udp = GOOD.replace("\"tcp\"", "\"udp\"").replace(
        "upstream_netns = \"host\"",
        "upstream_netns = \"host\"\nconnect_timeout = 3\nbacklog = 10\nmax_connections = 5",
    );
    assert_eq!(
        problems(&udp),
        vec![
            "t.toml:10:19: rule hello: `connect_timeout`: only applies to tcp and sctp rules, and this rule is udp (a UDP upstream socket is connected without a handshake): remove it",
            "t.toml:11:11: rule hello: `backlog`: only applies to tcp and sctp rules, and this rule is udp (UDP has no listen queue): remove it",
            "t.toml:12:19: rule hello: `max_connections`: only applies to tcp and sctp rules, and this rule is udp (UDP caps sessions with udp_max_sessions): remove it",
        ]
    );
    assert_eq!(
        problems(&GOOD.replace(
            "upstream_netns = \"host\"",
            "upstream_netns = \"host\"\nsctp_streams = 8\nsctp_source_addrs = []"
        )),
        vec![
            "t.toml:10:16: rule hello: `sctp_streams`: only applies to sctp rules, and this rule is tcp (only SCTP has streams): remove it",
            "t.toml:11:21: rule hello: `sctp_source_addrs`: only applies to sctp rules, and this rule is tcp (only SCTP is multi-homed): remove it",
        ]
    );
}

#[test]
fn sctp_rules_and_their_keys() {
    let sctp = GOOD.replace("\"tcp\"", "\"sctp\"");
    let r = &parse_toml(&sctp, "t.toml").unwrap().rules[0];
    assert_eq!(r.protocol, Protocol::Sctp);
    assert_eq!(r.sctp_streams, crate::sctp::Streams::MAX);
    assert!(r.sctp_listen_addrs.is_empty() && r.sctp_source_addrs.is_empty());

    let text = sctp
        .replace("[::]:8000", "[fd00::1]:38412")
        .replace(
            "upstream_netns = \"host\"",
            "upstream_netns = \"host\"\nsctp_streams = { in = 64, out = 16 }\nsctp_listen_addrs = [\"10.0.0.2\", \"fd00::2\"]\nsctp_upstream_addrs = [\"127.0.0.2\"]\nsctp_source_addrs = [\"127.0.0.3\", \"::1\"]",
        );
    let r = &parse_toml(&text, "t.toml").unwrap().rules[0];
    assert_eq!(
        r.sctp_streams,
        crate::sctp::Streams {
            outbound: 16,
            max_inbound: 64
        }
    );
    let ips =
        |v: &[&str]| -> Vec<std::net::IpAddr> { v.iter().map(|s| s.parse().unwrap()).collect() };
    assert_eq!(r.sctp_listen_addrs, ips(&["10.0.0.2", "fd00::2"]));
    assert_eq!(r.sctp_upstream_addrs, ips(&["127.0.0.2"]));
    assert_eq!(r.sctp_source_addrs, ips(&["127.0.0.3", "::1"]));
    assert_eq!(
        parse_toml(
            &sctp.replace("upstream_netns = \"host\"", "sctp_streams = 7"),
            "t.toml"
        )
        .unwrap()
        .rules[0]
            .sctp_streams,
        crate::sctp::Streams {
            outbound: 7,
            max_inbound: 7
        }
    );

    let bad = sctp.replace(
        "upstream_netns = \"host\"",
        "sctp_streams = { in = 0, both = 3 }\nsctp_listen_addrs = [\"10.0.0.2\", \"10.0.0.2:5\", \"0.0.0.0\"]\nsctp_upstream_addrs = \"127.0.0.2\"",
    );
    assert_eq!(
        problems(&bad),
        vec![
            "t.toml:9:23: rule hello: `sctp_streams.in`: must be between 1 and 65535, got 0",
            "t.toml:9:26: rule hello: unknown key `sctp_streams.both` (expected one of: in, out)",
            "t.toml:10:34: rule hello: `sctp_listen_addrs[1]`: invalid address \"10.0.0.2:5\": expected an IP address such as 10.0.0.2 or fd00::2 (the port is the rule's)",
            "t.toml:10:48: rule hello: `sctp_listen_addrs[2]`: invalid address \"0.0.0.0\": name one unicast address of an interface",
            "t.toml:11:23: rule hello: `sctp_upstream_addrs`: expected a list of IP addresses such as [\"10.0.0.2\", \"fd00::2\"], found a string",
        ]
    );
    let wildcard = sctp.replace(
        "upstream_netns = \"host\"",
        "sctp_listen_addrs = [\"10.0.0.2\"]",
    );
    assert_eq!(
        problems(&wildcard),
        vec![
            "t.toml:9:21: rule hello: `sctp_listen_addrs`: `listen` is the wildcard ::, which already binds every address: name one address in `listen` and the others here",
        ]
    );
    let v4 = wildcard
        .replace("[::]:8000", "10.0.0.1:8000")
        .replace("\"10.0.0.2\"", "\"fd00::2\"");
    assert_eq!(
        problems(&v4),
        vec![
            "t.toml:9:21: rule hello: `sctp_listen_addrs`: fd00::2 is IPv6, and `listen` 10.0.0.1:8000 makes an IPv4 socket: listen on an IPv6 address (its socket carries IPv4 too) or list IPv4 addresses only",
        ]
    );
}

#[test]
fn missing_keys_wrong_types_and_syntax() {
    assert_eq!(
        problems("[[proxy]]\nname = \"x\"\nnetns = 3\nlisten = 8000\n"),
        vec![
            "t.toml:1:1: rule x: missing required key `protocol`",
            "t.toml:1:1: rule x: missing required key `upstream`",
            "t.toml:3:9: rule x: `netns`: expected a list of namespaces such as [\"host\", \"ns1\"], found an integer",
            "t.toml:4:10: rule x: `listen`: expected a string, found an integer",
        ]
    );
    assert_eq!(
        problems("workers = 0\n[[proxy]]\n")[0],
        "t.toml:1:11: `workers`: must be between 1 and 256, got 0"
    );
    assert_eq!(
        problems(""),
        vec!["t.toml:1:1: no rules: add at least one [[proxy]] table"]
    );
    assert!(problems("[[proxy]\n")[0].starts_with("t.toml:1:"));
    assert_eq!(
        problems("[proxy]\nname = \"a\"\n")[0],
        "t.toml:1:1: `proxy`: `proxy` must be an array of tables: write each rule under its own [[proxy]] header"
    );
}

#[test]
fn the_rule_keys_are_the_common_ones_and_every_settings_group() {
    use super::rule::RULE_KEYS;
    let groups: Vec<&str> = crate::config::settings::all_keys()
        .iter()
        .map(|k| k.name)
        .collect();
    let common: Vec<&str> = RULE_KEYS
        .iter()
        .copied()
        .filter(|k| !groups.contains(k))
        .collect();
    assert_eq!(
        common,
        [
            "name",
            "protocol",
            "listen",
            "netns",
            "upstream",
            "upstream_netns",
            "on_netns_delete"
        ]
    );
    for k in groups {
        assert!(RULE_KEYS.contains(&k), "`{k}` is missing from RULE_KEYS");
    }
}

#[test]
fn port_ranges_parse_port_to_port_and_to_one() {
    let text = r#"
[[proxy]]
name = "media"
protocol = "udp"
listen = "[::]:10000-10099"
netns = "host"
upstream = "127.0.0.1:20000-20099"

[[proxy]]
name = "one"
protocol = "tcp"
listen = "0.0.0.0:3000-3009"
netns = "host"
upstream = "127.0.0.1:80"
"#;
    let c = parse_toml(text, "t.toml").unwrap();
    let r = &c.rules[0];
    assert_eq!(r.listen, "[::]:10000".parse().unwrap());
    assert_eq!(r.port_count(), 100);
    assert_eq!(r.listen_text(), "[::]:10000-10099");
    assert_eq!(r.upstream_text(), "127.0.0.1:20000-20099");
    assert_eq!(c.rules[1].per_port()[9].upstream.port(), 80);
    assert_eq!(c.rules[1].upstream_text(), "127.0.0.1:80");
}

#[test]
fn bad_port_ranges_are_located() {
    let rule = |name: &str, listen: &str, upstream: &str| {
        format!(
            "[[proxy]]\nname = \"{name}\"\nprotocol = \"tcp\"\nlisten = \"{listen}\"\nnetns = \"host\"\nupstream = \"{upstream}\"\n"
        )
    };
    let text = [
        rule("rev", "[::]:200-100", "[::1]:9"),
        rule("big", "[::]:65000-65536", "[::1]:9"),
        rule("zero", "[::]:0-5", "[::1]:9"),
        rule("len", "[::]:10-19", "[::1]:20-30"),
        rule("single", "[::]:10", "[::1]:20-30"),
        rule("a", "[::]:1000-1099", "[::1]:9"),
        rule("b", "[::]:1050-1060", "[::1]:9"),
    ]
    .concat();
    assert_eq!(
        problems(&text),
        vec![
            "t.toml:4:10: rule rev: `listen`: invalid listen address \"[::]:200-100\": the port range 200-100 is reversed: write the lower port first (100-200)",
            "t.toml:10:10: rule big: `listen`: invalid listen address \"[::]:65000-65536\": port 65536 in the range 65000-65536 is out of range: ports of a range are 1 to 65535",
            "t.toml:16:10: rule zero: `listen`: invalid listen address \"[::]:0-5\": port 0 in the range 0-5 is out of range: ports of a range are 1 to 65535",
            "t.toml:24:12: rule len: `upstream`: the upstream range 20-30 has 11 port(s) and the listen range 10-19 has 10: give ranges of the same length (port to port) or one upstream port (every listen port to it)",
            "t.toml:30:12: rule single: `upstream`: the upstream is the port range 20-30 but `listen` is one port (10): a single listen port forwards to a single upstream port",
            "t.toml:41:9: rule b: `netns[0]`: tcp [::]:1050 (of the range 1050-1060) in namespace \"host\" is already used by rule a (at t.toml:35:9)",
        ]
    );
}

#[test]
fn a_range_and_a_single_port_clash_where_they_meet() {
    let text = r#"
[[proxy]]
name = "range"
protocol = "udp"
listen = "[::]:5000-5010"
netns = ["ns1"]
upstream = "[::1]:9"

[[proxy]]
name = "single"
protocol = "udp"
listen = "[::]:5010"
netns = ["ns1"]
upstream = "[::1]:9"

[[proxy]]
name = "other-protocol"
protocol = "tcp"
listen = "[::]:5000-5010"
netns = ["ns1"]
upstream = "[::1]:9"
"#;
    let p = problems(text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("t.toml:13:10: rule single: `netns[0]`: udp [::]:5010 in namespace \"ns1\" is already used by rule range"), "{p:?}");
}

#[test]
fn a_range_over_an_earlier_single_port_names_that_port() {
    let rule = |name: &str, listen: &str, netns: &str| {
        format!(
            "[[proxy]]\nname = \"{name}\"\nprotocol = \"tcp\"\nlisten = \"{listen}\"\nnetns = [{netns}]\nupstream = \"[::1]:9\"\n"
        )
    };
    let text = [
        rule("single", "[::]:8042", "\"a\""),
        rule("other-address", "127.0.0.1:8000-8100", "\"a\""),
        rule("range", "[::]:8000-8100", "\"b\", \"a\""),
        rule("elsewhere", "[::]:8000-8100", "\"c\""),
    ]
    .concat();
    assert_eq!(
        problems(&text),
        vec![
            "t.toml:17:15: rule range: `netns[1]`: tcp [::]:8042 (of the range 8000-8100) in namespace \"a\" is already used by rule single (at t.toml:5:10)",
        ]
    );
}
