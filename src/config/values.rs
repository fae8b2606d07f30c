//! The value checks both front ends share, each returning the message a
//! user reads, and the checks that hold across rules.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub(crate) use super::ports::check_range;
use super::ports::parse_ports;
use super::{OnDelete, Problem, Protocol, ProxyProtocol, Rule, UpstreamSource};
use crate::netns::NsRef;

pub(crate) fn check_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("rule name is empty".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "-_.".contains(*c)))
    {
        return Err(format!(
            "invalid rule name \"{s}\": {c:?} is not allowed (use letters, digits, '-', '_' and '.')"
        ));
    }
    Ok(s.to_owned())
}

pub(crate) fn check_protocol(s: &str) -> Result<Protocol, String> {
    match s {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        "sctp" => Ok(Protocol::Sctp),
        _ => Err(format!(
            "unknown protocol \"{s}\": expected \"tcp\", \"udp\" or \"sctp\""
        )),
    }
}

pub(crate) fn check_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>().map_err(|_| {
        format!(
            "invalid listen address \"{s}\": expected IP:PORT, such as 0.0.0.0:8000, 127.0.0.1:8000 or [::]:8000"
        )
    })
}

/// A rule's `listen`: `IP:PORT`, or `IP:FIRST-LAST` for a port range (the
/// address with the first port, and the last).
pub(crate) fn check_listen_ports(s: &str) -> Result<(SocketAddr, Option<u16>), String> {
    parse_ports(s).map_err(|m| {
        if m.is_empty() {
            format!(
                "invalid listen address \"{s}\": expected IP:PORT, such as 0.0.0.0:8000, 127.0.0.1:8000 or [::]:8000"
            )
        } else {
            format!("invalid listen address \"{s}\": {m}")
        }
    })
}

/// A rule's `upstream`: as [`check_upstream`], or `IP:FIRST-LAST`.
pub(crate) fn check_upstream_ports(s: &str) -> Result<(SocketAddr, Option<u16>), String> {
    let (addr, last) = parse_ports(s).map_err(|m| {
        if m.is_empty() {
            format!(
                "invalid upstream address \"{s}\": expected IP:PORT such as 127.0.0.1:9000 or [::1]:9000 (host names are not resolved)"
            )
        } else {
            format!("invalid upstream address \"{s}\": {m}")
        }
    })?;
    match last {
        None => check_upstream(s).map(|a| (a, None)),
        Some(_) => check_upstream(&addr.to_string()).map(|a| (a, last)),
    }
}

pub(crate) fn check_upstream(s: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = s.parse().map_err(|_| {
        format!(
            "invalid upstream address \"{s}\": expected IP:PORT such as 127.0.0.1:9000 or [::1]:9000 (host names are not resolved)"
        )
    })?;
    if addr.port() == 0 {
        return Err(format!(
            "invalid upstream address \"{s}\": port 0 cannot be connected to"
        ));
    }
    if addr.ip().is_unspecified() {
        return Err(format!(
            "invalid upstream address \"{s}\": {} is the wildcard address, name the upstream's real address",
            addr.ip()
        ));
    }
    Ok(addr)
}

/// One address of an SCTP multi-homing list: an IP, no port.
pub(crate) fn check_sctp_addr(s: &str) -> Result<IpAddr, String> {
    let ip: IpAddr = s.parse().map_err(|_| {
        format!("invalid address \"{s}\": expected an IP address such as 10.0.0.2 or fd00::2 (the port is the rule's)")
    })?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(format!(
            "invalid address \"{s}\": name one unicast address of an interface"
        ));
    }
    Ok(ip)
}

/// Checks the SCTP keys against the rule's addresses: extra listen
/// addresses need a specific `listen` of a family that can carry them.
pub(crate) fn check_sctp_listen_addrs(listen: SocketAddr, extra: &[IpAddr]) -> Result<(), String> {
    if extra.is_empty() {
        return Ok(());
    }
    if listen.ip().is_unspecified() {
        return Err(format!(
            "`listen` is the wildcard {}, which already binds every address: name one address in `listen` and the others here",
            listen.ip()
        ));
    }
    if let (true, Some(v6)) = (listen.is_ipv4(), extra.iter().find(|a| a.is_ipv6())) {
        return Err(format!(
            "{v6} is IPv6, and `listen` {listen} makes an IPv4 socket: listen on an IPv6 address (its socket carries IPv4 too) or list IPv4 addresses only"
        ));
    }
    Ok(())
}

pub(crate) fn check_netns(s: &str) -> Result<NsRef, String> {
    s.parse::<NsRef>().map_err(|e| e.to_string())
}

/// Like [`check_netns`], but one namespace: a pattern cannot be connected from.
pub(crate) fn check_upstream_netns(s: &str) -> Result<NsRef, String> {
    match check_netns(s)? {
        NsRef::Glob(g) => Err(format!(
            "\"{g}\" is a pattern: upstream connections are made from one namespace, name it exactly"
        )),
        r => Ok(r),
    }
}

pub(crate) fn check_proxy_protocol(s: &str) -> Result<ProxyProtocol, String> {
    match s {
        "v1" => Ok(ProxyProtocol::V1),
        "v2" => Ok(ProxyProtocol::V2),
        _ => Err(format!(
            "invalid proxy_protocol \"{s}\": expected \"v1\" (text) or \"v2\" (binary, with the namespace)"
        )),
    }
}

pub(crate) fn check_upstream_source(s: &str) -> Result<UpstreamSource, String> {
    match s {
        "proxy" => Ok(UpstreamSource::Proxy),
        "client" => Ok(UpstreamSource::Client),
        _ => Err(format!(
            "invalid upstream_source \"{s}\": expected \"proxy\" (nsproxy's own address, the default) or \"client\" (the client's address and port, with IP_TRANSPARENT)"
        )),
    }
}

pub(crate) fn check_on_delete(s: &str) -> Result<OnDelete, String> {
    match s {
        "close" => Ok(OnDelete::Close),
        "drain" => Ok(OnDelete::Drain),
        _ => Err(format!(
            "invalid on_netns_delete \"{s}\": expected \"close\" or \"drain\""
        )),
    }
}

/// Parses "5s", "250ms", "2m" (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!("invalid duration \"{s}\": expected a number with a unit, such as 500ms, 5s or 2m")
    };
    let s_trim = s.trim();
    let split = s_trim
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s_trim.len());
    let (num, unit) = s_trim.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(bad()),
    };
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!(
            "invalid duration \"{s}\": must be more than 0 and at most 24h"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Checks that hold across rules; appends problems.
/// `rules` is each rule with where its name is written and where each of
/// its `netns` entries is (empty where the form has no positions: then the
/// rule's origin is used). One pass with hash maps: linear in the rules
/// and their namespaces.
pub(crate) fn check_rules<'a>(
    rules: impl IntoIterator<Item = (&'a Rule, &'a str, &'a [String])>,
    problems: &mut Vec<Problem>,
) {
    // The first use of a name or a (protocol, namespace, address) wins,
    // later ones are reported with where the first is. Binds are kept by
    // address without its port, single ports in order and ranges as
    // ranges, so that a wide range in many namespaces costs one entry per
    // namespace, not one per port, to record and to look up.
    type Bind<'a> = (Protocol, &'a NsRef, SocketAddr);
    let mut names: std::collections::HashMap<&str, &str> = Default::default();
    let mut singles: std::collections::HashMap<Bind<'_>, BTreeMap<u16, (&str, &str)>> =
        Default::default();
    let mut ranges: std::collections::HashMap<Bind<'_>, Vec<(u16, u16, &str, &str)>> =
        Default::default();
    for (rule, name_loc, netns_locs) in rules {
        if let Some(first) = names.insert(&rule.name, &rule.origin) {
            problems.push(Problem {
                location: name_loc.to_owned(),
                rule: Some(rule.name.clone()),
                key: Some("name".into()),
                message: format!(
                    "duplicate rule name \"{}\" (first used at {first})",
                    rule.name
                ),
            });
            names.insert(&rule.name, first);
        }
        let (first, last) = rule
            .ports
            .map_or((rule.listen.port(), rule.listen.port()), |r| {
                (r.first, r.last)
            });
        let mut portless = rule.listen;
        portless.set_port(0);
        let at = |port: u16| {
            let mut a = rule.listen;
            a.set_port(port);
            a
        };
        for (j, ns) in rule.netns.iter().enumerate() {
            let here = netns_locs
                .get(j)
                .map_or(rule.origin.as_str(), |l| l.as_str());
            let bucket = (rule.protocol, ns, portless);
            // The first port another rule already listens on here, and who.
            let in_ranges = ranges.get(&bucket).and_then(|list| {
                list.iter()
                    .find(|(f, l, ..)| *f <= last && first <= *l)
                    .map(|(f, _, other, loc)| (first.max(*f), *other, *loc))
            });
            let in_singles = singles.get(&bucket).and_then(|ports| {
                ports
                    .range(first..=last)
                    .next()
                    .map(|(p, (other, loc))| (*p, *other, *loc))
            });
            let clash = match (in_ranges, in_singles) {
                (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
                (a, b) => a.or(b),
            };
            if let Some((port, other, loc)) = clash {
                let what = match rule.ports {
                    Some(r) => format!("{} (of the range {r})", at(port)),
                    None => at(port).to_string(),
                };
                problems.push(Problem {
                    location: here.to_owned(),
                    rule: Some(rule.name.clone()),
                    key: Some(format!("netns[{j}]")),
                    message: format!(
                        "{} {what} in namespace \"{ns}\" is already used by rule {other} (at {loc})",
                        rule.protocol
                    ),
                });
            } else if rule.ports.is_some() {
                ranges
                    .entry(bucket)
                    .or_default()
                    .push((first, last, &rule.name, here));
            } else {
                singles
                    .entry(bucket)
                    .or_default()
                    .insert(first, (&rule.name, here));
            }
        }
    }
}

/// A user name as `useradd` accepts it (whether the account exists is
/// checked when nsproxy starts, where it matters).
pub fn check_user(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '$'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "invalid user name \"{s}\": expected an account name such as nobody or nsproxy (letters, digits, _ - . and a final $, at most 32)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn upstream_needs_a_real_address() {
        assert!(check_upstream("127.0.0.1:9000").is_ok());
        assert!(check_upstream("[::1]:9000").is_ok());
        assert!(
            check_upstream("localhost:9000")
                .unwrap_err()
                .contains("not resolved")
        );
        assert!(
            check_upstream("127.0.0.1:0")
                .unwrap_err()
                .contains("port 0")
        );
        assert!(
            check_upstream("0.0.0.0:80")
                .unwrap_err()
                .contains("wildcard")
        );
    }

    #[test]
    fn user_names() {
        assert_eq!(check_user("nobody").unwrap(), "nobody");
        assert_eq!(check_user("svc-nsproxy_1").unwrap(), "svc-nsproxy_1");
        for bad in ["", "-x", "a b", "ro/ot", &"x".repeat(33)] {
            assert!(
                check_user(bad).unwrap_err().contains("invalid user name"),
                "{bad}"
            );
        }
    }
}
