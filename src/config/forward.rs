//! The one-line form for ad-hoc use: `nsproxy forward SPEC...`.

use std::time::Duration;

use super::{
    Config, ConfigError, Problem, Rule, Settings, check_listen_ports, check_netns, check_protocol,
    check_range, check_rules, check_upstream_netns, check_upstream_ports,
};
use crate::netns::NsRef;

/// The syntax of one forward spec, for help texts and error messages.
pub const FORWARD_SYNTAX: &str = "PROTO:LISTEN[@NS,NS...]=UPSTREAM[@NS]";

/// Parses forward specs such as `tcp:[::]:8000@host,ns1,ns2=127.0.0.1:9000@host`
/// or `udp:0.0.0.0:53@ns1=10.0.0.53:53@dns`.
///
/// A listen side without `@` listens in `host`; an upstream without `@`
/// connects from `host`. Rules are named `forward-1`, `forward-2`, ...
/// Settings a spec cannot express keep their defaults.
pub fn parse_forward(specs: &[String], workers: Option<usize>) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let mut rules = Vec::new();
    if specs.is_empty() {
        problems.push(Problem {
            location: "command line".into(),
            rule: None,
            key: None,
            message: format!("no forward given: expected {FORWARD_SYNTAX}"),
        });
    }
    for (i, spec) in specs.iter().enumerate() {
        let location = format!("argument {} (\"{spec}\")", i + 1);
        let name = format!("forward-{}", i + 1);
        match parse_one(spec) {
            Ok(parts) => {
                if let Some(rule) = rule(&parts, name, &location, &mut problems) {
                    rules.push((rule, location));
                }
            }
            Err(message) => problems.push(Problem {
                location,
                rule: None,
                key: None,
                message,
            }),
        }
    }
    check_rules(
        rules
            .iter()
            .map(|(r, loc): &(Rule, String)| (r, loc.as_str(), &[][..])),
        &mut problems,
    );
    if problems.is_empty() {
        Ok(Config {
            workers,
            control_socket: None,
            metrics_listen: None,
            user: None,
            drain_timeout: None,
            rules: rules.into_iter().map(|(r, _)| r).collect(),
        })
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// Checks the parts of one spec; `None` (with the problems appended) if
/// any is wrong. The rule's settings are its protocol's defaults.
fn rule(
    parts: &Parts<'_>,
    name: String,
    location: &str,
    problems: &mut Vec<Problem>,
) -> Option<Rule> {
    let mut bad = |key: &str, message: String| {
        problems.push(Problem {
            location: location.to_owned(),
            rule: Some(name.clone()),
            key: Some(key.into()),
            message,
        })
    };
    let protocol = check_protocol(parts.proto).map_err(|m| bad("protocol", m));
    let listen = check_listen_ports(parts.listen).map_err(|m| bad("listen", m));
    let upstream = check_upstream_ports(parts.upstream).map_err(|m| bad("upstream", m));
    let ports = match (listen, upstream) {
        (Ok(l), Ok(u)) => check_range(l, u).map_err(|m| bad("upstream", m)),
        _ => Ok(None),
    };
    let upstream_netns = parts
        .upstream_ns
        .map_or(Ok(NsRef::Host), check_upstream_netns)
        .map_err(|m| bad("upstream_netns", m));
    let mut netns: Vec<NsRef> = Vec::new();
    // A set beside the list, so a long list is checked in linear time.
    let mut seen = std::collections::HashSet::new();
    let mut netns_ok = true;
    for (j, s) in parts.listen_ns.iter().enumerate() {
        match check_netns(s) {
            Ok(r) if !seen.insert(r.clone()) => {
                bad(
                    &format!("netns[{j}]"),
                    format!("namespace \"{r}\" is listed twice"),
                );
                netns_ok = false;
            }
            Ok(r) => netns.push(r),
            Err(m) => {
                bad(&format!("netns[{j}]"), m);
                netns_ok = false;
            }
        }
    }
    let (Ok(protocol), Ok(listen), Ok(upstream), Ok(ports), Ok(upstream_netns), true) =
        (protocol, listen, upstream, ports, upstream_netns, netns_ok)
    else {
        return None;
    };
    let mut rule = Rule::new(
        name,
        listen.0,
        netns,
        upstream.0,
        upstream_netns,
        Settings::defaults(protocol),
        location.to_owned(),
    );
    rule.ports = ports;
    Some(rule)
}

/// Sets `connect_timeout` (`nsproxy forward --connect-timeout`) on every
/// rule whose protocol has the key; a UDP rule has none (its upstream
/// socket is connected without a handshake), and keeps its default, which
/// nothing reads.
pub fn set_connect_timeout(config: &mut Config, timeout: Duration) {
    for r in &mut config.rules {
        if r.protocol.takes("connect_timeout") {
            r.connect_timeout = timeout;
        }
    }
}

struct Parts<'a> {
    proto: &'a str,
    listen: &'a str,
    listen_ns: Vec<&'a str>,
    upstream: &'a str,
    upstream_ns: Option<&'a str>,
}

fn parse_one(spec: &str) -> Result<Parts<'_>, String> {
    let shape = || format!("expected {FORWARD_SYNTAX}, e.g. tcp:[::]:8000@ns1,ns2=127.0.0.1:9000");
    let (proto, rest) = spec
        .split_once(':')
        .ok_or_else(|| format!("no protocol: {}", shape()))?;
    let (listen_side, upstream_side) = rest
        .split_once('=')
        .ok_or_else(|| format!("no '=' between listen and upstream: {}", shape()))?;
    let (listen, listen_ns) = match listen_side.rsplit_once('@') {
        Some((addr, list)) => (addr, list.split(',').collect()),
        None => (listen_side, vec!["host"]),
    };
    let (upstream, upstream_ns) = match upstream_side.rsplit_once('@') {
        Some((addr, ns)) => (addr, Some(ns)),
        None => (upstream_side, None),
    };
    Ok(Parts {
        proto,
        listen,
        listen_ns,
        upstream,
        upstream_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::*;

    fn parse(specs: &[&str]) -> Result<Config, Vec<String>> {
        let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        parse_forward(&specs, None)
            .map_err(|e| e.problems().iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn full_and_short_forms() {
        let c = parse(&[
            "tcp:[::]:8000@host,ns1,/proc/1/ns/net=127.0.0.1:9000@pid:1",
            "tcp:127.0.0.1:7000=[::1]:7001",
        ])
        .unwrap();
        let r = &c.rules[0];
        assert_eq!(r.name, "forward-1");
        assert_eq!(r.netns.len(), 3);
        assert_eq!(r.upstream_netns, NsRef::Pid(1));
        assert_eq!(c.rules[1].netns, vec![NsRef::Host]);
        assert_eq!(c.rules[1].upstream_netns, NsRef::Host);
    }

    #[test]
    fn udp_forwards() {
        let c = parse(&[
            "udp:[::]:53@ns1,pid:1=10.0.0.53:53@dns",
            "tcp:[::]:53@ns1=10.0.0.53:53@dns",
        ])
        .unwrap();
        let r = &c.rules[0];
        assert_eq!(r.protocol, crate::config::Protocol::Udp);
        assert_eq!(r.netns, vec![NsRef::Named("ns1".into()), NsRef::Pid(1)]);
        assert_eq!(r.upstream_netns, NsRef::Named("dns".into()));
        assert_eq!(r.udp_idle_timeout, DEFAULT_UDP_IDLE_TIMEOUT);
        assert_eq!(r.udp_max_sessions, DEFAULT_UDP_MAX_SESSIONS);
        let c = parse(&["sctp:[::]:38412@ns1,/run/netns/x=127.0.0.1:38412@core"]).unwrap();
        let r = &c.rules[0];
        assert_eq!(r.protocol, crate::config::Protocol::Sctp);
        assert_eq!(r.upstream_netns, NsRef::Named("core".into()));
        assert_eq!(r.sctp_streams, DEFAULT_SCTP_STREAMS);
    }

    #[test]
    fn errors_name_the_argument() {
        assert_eq!(
            parse(&["tcp:[::]:8000@ns1"]).unwrap_err(),
            vec![
                "argument 1 (\"tcp:[::]:8000@ns1\"): no '=' between listen and upstream: expected PROTO:LISTEN[@NS,NS...]=UPSTREAM[@NS], e.g. tcp:[::]:8000@ns1,ns2=127.0.0.1:9000"
            ]
        );
        assert_eq!(
            parse(&["tcp:1.2.3.4:1=127.0.0.1:0@a/b"]).unwrap_err(),
            vec![
                "argument 1 (\"tcp:1.2.3.4:1=127.0.0.1:0@a/b\"): rule forward-1: `upstream`: invalid upstream address \"127.0.0.1:0\": port 0 cannot be connected to",
                "argument 1 (\"tcp:1.2.3.4:1=127.0.0.1:0@a/b\"): rule forward-1: `upstream_netns`: \"a/b\" is not a valid namespace name: a name under /run/netns has no '/' and is not \".\" or \"..\" (for a path, start it with '/')",
            ]
        );
        assert_eq!(parse(&[]).unwrap_err().len(), 1);
    }
}

#[cfg(test)]
mod props {
    use std::net::{IpAddr, SocketAddr};

    use proptest::prelude::*;

    use super::*;
    use crate::config::Protocol;
    use crate::config::strategies::{ip, ns_ref};
    use crate::config::*;

    /// One valid forward: (protocol, listen IP, listen namespaces or none
    /// for the `host` default, upstream, upstream namespace or none).
    fn forward() -> impl Strategy<
        Value = (
            Protocol,
            IpAddr,
            Option<Vec<NsRef>>,
            SocketAddr,
            Option<NsRef>,
        ),
    > {
        (
            prop_oneof![
                Just(Protocol::Tcp),
                Just(Protocol::Udp),
                Just(Protocol::Sctp)
            ],
            ip(),
            prop::option::of(prop::collection::vec(ns_ref(true), 1..5)),
            (
                ip().prop_filter("not the wildcard", |a| !a.is_unspecified()),
                1u16..,
            )
                .prop_map(|(a, p)| SocketAddr::new(a, p)),
            prop::option::of(ns_ref(false)),
        )
    }

    proptest! {
        #[test]
        fn prop_forward_specs_never_panic(
            specs in prop::collection::vec(
                prop_oneof![
                    any::<String>(),
                    "(tcp|udp|sctp|x)?:?([0-9.:\\[\\]]{0,12})(@[a-z0-9/:*,]{0,10})?=?([0-9.:\\[\\]]{0,12})(@[a-z0-9/:*]{0,8})?",
                ],
                0..4,
            ),
        ) {
            match parse_forward(&specs, None) {
                Ok(c) => prop_assert_eq!(c.rules.len(), specs.len()),
                Err(e) => {
                    prop_assert!(!e.problems().is_empty());
                    for p in e.problems() {
                        let named = p.location == "command line"
                            || (1..=specs.len()).any(|i| p.location.starts_with(&format!("argument {i} (")));
                        prop_assert!(named, "{}", p);
                    }
                }
            }
        }

        #[test]
        fn prop_forward_specs_round_trip(fwds in prop::collection::vec(forward(), 1..4)) {
            let mut specs = Vec::new();
            let mut want = Vec::new();
            for (i, (protocol, listen_ip, listen_ns, upstream, upstream_ns)) in fwds.into_iter().enumerate() {
                let listen = SocketAddr::new(listen_ip, 1000 + i as u16);
                let mut netns = listen_ns.unwrap_or_default();
                let mut seen = std::collections::HashSet::new();
                netns.retain(|r| seen.insert(r.clone()));
                let mut spec = format!("{protocol}:{listen}");
                if !netns.is_empty() {
                    let list: Vec<String> = netns.iter().map(|n| n.to_string()).collect();
                    spec.push_str(&format!("@{}", list.join(",")));
                } else {
                    netns = vec![NsRef::Host];
                }
                spec.push_str(&format!("={upstream}"));
                if let Some(u) = &upstream_ns {
                    spec.push_str(&format!("@{u}"));
                }
                want.push((protocol, listen, netns, upstream, upstream_ns.unwrap_or(NsRef::Host), spec.clone()));
                specs.push(spec);
            }
            let config = parse_forward(&specs, Some(3))
                .map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert_eq!(config.workers, Some(3));
            prop_assert_eq!(config.rules.len(), want.len());
            for (i, (r, (protocol, listen, netns, upstream, upstream_netns, spec))) in
                config.rules.iter().zip(want).enumerate()
            {
                prop_assert_eq!(&r.name, &format!("forward-{}", i + 1));
                prop_assert_eq!(r.protocol, protocol);
                prop_assert_eq!(r.listen, listen);
                prop_assert_eq!(&r.netns, &netns);
                prop_assert_eq!(r.upstream, upstream);
                prop_assert_eq!(&r.upstream_netns, &upstream_netns);
                prop_assert_eq!(&r.origin, &format!("argument {} (\"{spec}\")", i + 1));
                prop_assert_eq!(r.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
                prop_assert_eq!(r.on_netns_delete, OnDelete::default());
            }
        }
    }
}
