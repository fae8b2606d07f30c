use std::collections::HashSet;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::config::strategies::rule;
use crate::config::{OnDelete, parse_forward, parse_toml};
use crate::netns::NsRef;

fn tcp_rule(extra: &str) -> Rule {
    let text = format!(
        "[[proxy]]\nname = \"r\"\nprotocol = \"tcp\"\nlisten = \"[::1]:1\"\nnetns = [\"host\", \"ns1\"]\nupstream = \"[::1]:2\"\n{extra}\n"
    );
    parse_toml(&text, "t.toml").unwrap().rules.remove(0)
}

/// A key is in one group, but for `upstream_source`, which TCP and UDP
/// (and not SCTP) both take: declared in both of their groups, alike.
#[test]
fn each_key_is_in_one_group_and_named_once() {
    let mut names = HashSet::new();
    let mut shared = Vec::new();
    for group in [
        ConnSettings::KEYS,
        TcpSettings::KEYS,
        UdpSettings::KEYS,
        SctpSettings::KEYS,
    ] {
        for k in group {
            if !names.insert(k.name) {
                shared.push(k);
            }
        }
    }
    assert_eq!(
        shared.iter().map(|k| k.name).collect::<Vec<_>>(),
        ["upstream_source"]
    );
    let tcp = TcpSettings::KEYS
        .iter()
        .find(|k| k.name == "upstream_source");
    assert_eq!(tcp, Some(shared[0]), "declared alike in both groups");
    let all: HashSet<&str> = all_keys().iter().map(|k| k.name).collect();
    assert_eq!(all, names);
}

#[test]
fn the_tuning_is_the_settings_of_kind_tuning() {
    let tuning: HashSet<&str> = all_keys()
        .iter()
        .filter(|k| k.kind == Kind::Tuning)
        .map(|k| k.name)
        .collect();
    assert_eq!(tuning, Tuning::KEYS.into_iter().collect());
}

#[test]
fn each_protocol_has_its_groups() {
    let names = |p: Protocol| -> Vec<&str> {
        Settings::defaults(p)
            .keys()
            .iter()
            .map(|k| k.name)
            .collect()
    };
    assert_eq!(
        names(Protocol::Udp),
        ["udp_idle_timeout", "udp_max_sessions", "upstream_source"]
    );
    assert!(names(Protocol::Tcp).contains(&"proxy_protocol"));
    assert!(names(Protocol::Sctp).contains(&"max_connections"));
    assert!(!names(Protocol::Sctp).contains(&"tcp_keepalive"));
    for p in Protocol::ALL {
        assert_eq!(Settings::defaults(p).protocol(), p);
    }
}

#[test]
fn refusals_name_the_protocols_that_take_the_key() {
    assert_eq!(
        refusal(Protocol::Udp, "connect_timeout")
            .unwrap_err()
            .to_string(),
        "only applies to tcp and sctp rules, and this rule is udp (a UDP upstream socket is connected without a handshake): remove it"
    );
    assert_eq!(
        refusal(Protocol::Sctp, "tcp_keepalive")
            .unwrap_err()
            .to_string(),
        "only applies to tcp rules, and this rule is sctp (keepalive probes are TCP's): remove it"
    );
    // Keys of every rule, unknown keys and the protocol's own pass.
    for key in ["name", "on_netns_delete", "bogus", "idle_timeout"] {
        assert_eq!(refusal(Protocol::Tcp, key), Ok(()), "{key}");
    }
}

#[test]
fn settings_read_and_write_a_rule() {
    let r = tcp_rule("max_connections = 3\nproxy_protocol = \"v2\"\nbacklog = 7");
    let Settings::Tcp { conn, tcp } = r.settings() else {
        panic!("a tcp rule has tcp settings");
    };
    assert_eq!((conn.max_connections, conn.backlog), (Some(3), 7));
    assert_eq!(tcp.proxy_protocol, Some(ProxyProtocol::V2));
    let mut back = tcp_rule("");
    Settings::Tcp { conn, tcp }.write_to(&mut back);
    assert_eq!(back, r);
}

#[test]
fn an_unchanged_rule_is_the_same_binding() {
    let a = tcp_rule("");
    let mut b = a.clone();
    // A rule's namespace list and where it is written are no part of it.
    b.netns.push(NsRef::Named("ns2".into()));
    b.origin = "elsewhere:9".into();
    assert!(a.same_identity(&b));
    assert!(a.changed_settings(&b).is_empty());
    assert_eq!(a.tuning(), b.tuning());
}

#[test]
fn a_retuned_rule_keeps_its_binding() {
    let a = tcp_rule("");
    for extra in [
        "max_connections = 10",
        "proxy_protocol = \"v1\"",
        "idle_timeout = \"5s\"",
        "half_close_timeout = false",
        "tcp_keepalive = false",
    ] {
        let b = tcp_rule(extra);
        assert!(a.same_identity(&b), "{extra}");
        assert_ne!(a.tuning(), b.tuning(), "{extra}");
        let changed: Vec<&str> = a.changed_settings(&b).iter().map(|k| k.name).collect();
        assert_eq!(changed, [extra.split(' ').next().unwrap()]);
    }
}

#[test]
fn a_changed_identity_replaces_the_binding() {
    let a = tcp_rule("");
    for extra in [
        "connect_timeout = 9",
        "backlog = 5",
        "on_netns_delete = \"drain\"",
    ] {
        let b = tcp_rule(extra);
        assert!(!a.same_identity(&b), "{extra}");
        assert_eq!(a.tuning(), b.tuning(), "{extra}");
    }
    let mut b = a.clone();
    b.upstream_netns = NsRef::Named("up".into());
    assert!(!a.same_identity(&b));
    let mut b = a.clone();
    b.listen.set_port(2);
    assert!(!a.same_identity(&b));
    let mut b = a.clone();
    Settings::defaults(Protocol::Sctp).write_to(&mut b);
    assert!(!a.same_identity(&b), "another protocol");
}

#[test]
fn udp_and_sctp_settings_are_identity() {
    let mut a = tcp_rule("");
    Settings::defaults(Protocol::Udp).write_to(&mut a);
    let mut b = a.clone();
    b.udp_max_sessions = 5;
    assert!(!a.same_identity(&b));
    Settings::defaults(Protocol::Sctp).write_to(&mut a);
    let mut b = a.clone();
    b.sctp_source_addrs = vec!["10.0.0.1".parse().unwrap()];
    assert!(!a.same_identity(&b));
    let mut b = a.clone();
    b.max_connections = Some(1);
    assert!(a.same_identity(&b), "SCTP retunes its cap too");
}

#[test]
fn the_tuning_reads_as_the_reload_log_has_it() {
    assert_eq!(
        tcp_rule("").tuning().to_string(),
        "max_connections none, proxy_protocol off, idle_timeout 3600s, half_close_timeout 60s and tcp_keepalive idle 60s, interval 10s, count 6"
    );
    let t = tcp_rule("max_connections = 4\nproxy_protocol = \"v2\"\nidle_timeout = false\nhalf_close_timeout = \"90s\"\ntcp_keepalive = false").tuning();
    assert_eq!(
        t.to_string(),
        "max_connections 4, proxy_protocol v2, idle_timeout off, half_close_timeout 90s and tcp_keepalive off"
    );
}

#[test]
fn forwards_take_their_protocols_defaults() {
    let specs = [
        "udp:[::1]:53=[::1]:54".to_owned(),
        "tcp:[::1]:1=[::1]:2".to_owned(),
    ];
    let mut c = parse_forward(&specs, None).unwrap();
    for r in &c.rules {
        assert_eq!(r.settings(), Settings::defaults(r.protocol));
        assert_eq!(r.on_netns_delete, OnDelete::Close);
    }
    crate::config::set_connect_timeout(&mut c, Duration::from_secs(2));
    assert_eq!(
        c.rules[0].connect_timeout,
        crate::config::DEFAULT_CONNECT_TIMEOUT
    );
    assert_eq!(c.rules[1].connect_timeout, Duration::from_secs(2));
}

/// The comparison the reload made field by field before
/// [`Rule::same_identity`], kept as the oracle it must agree with on every
/// rule a front end makes.
fn same_rule_before(a: &Rule, b: &Rule) -> bool {
    a.name == b.name
        && a.protocol == b.protocol
        && a.listen == b.listen
        && a.upstream == b.upstream
        && a.upstream_netns == b.upstream_netns
        && a.connect_timeout == b.connect_timeout
        && a.backlog == b.backlog
        && a.udp_idle_timeout == b.udp_idle_timeout
        && a.udp_max_sessions == b.udp_max_sessions
        && a.on_netns_delete == b.on_netns_delete
        && a.sctp_streams == b.sctp_streams
        && a.sctp_listen_addrs == b.sctp_listen_addrs
        && a.sctp_upstream_addrs == b.sctp_upstream_addrs
        && a.sctp_source_addrs == b.sctp_source_addrs
}

/// Likewise, whether the reload retuned a kept binding.
fn retuned_before(a: &Rule, b: &Rule) -> bool {
    a.max_connections != b.max_connections
        || a.proxy_protocol != b.proxy_protocol
        || a.idle_timeout != b.idle_timeout
        || a.half_close_timeout != b.half_close_timeout
        || a.tcp_keepalive != b.tcp_keepalive
}

/// `a`, and `a` with some of its settings taken from `b` (its other keys
/// too, half the time), as a reload would see an edited rule.
fn edited(a: Rule, b: Rule, common: bool) -> (Rule, Rule) {
    let mut e = a.clone();
    if b.protocol == a.protocol || common {
        b.settings().write_to(&mut e);
    }
    if common {
        e.listen = b.listen;
        e.upstream = b.upstream;
        e.upstream_netns = b.upstream_netns.clone();
        e.on_netns_delete = b.on_netns_delete;
    }
    e.netns = b.netns;
    (a, e)
}

proptest! {
    #[test]
    fn prop_identity_and_tuning_agree_with_the_field_by_field_reload(
        a in rule(),
        b in rule(),
        common in any::<bool>(),
    ) {
        let (a, e) = edited(a, b, common);
        prop_assert_eq!(a.same_identity(&e), same_rule_before(&a, &e));
        prop_assert_eq!(a.tuning() != e.tuning(), retuned_before(&a, &e));
    }

    #[test]
    fn prop_what_changed_follows_the_kinds(a in rule(), b in rule()) {
        let (a, e) = edited(a, b, false);
        let changed = a.changed_settings(&e);
        prop_assert_eq!(
            a.same_identity(&e),
            changed.iter().all(|k| k.kind == Kind::Tuning)
        );
        prop_assert_eq!(
            a.tuning() != e.tuning(),
            changed.iter().any(|k| k.kind == Kind::Tuning)
        );
        prop_assert!(a.same_identity(&a) && a.changed_settings(&a).is_empty());
    }
}
