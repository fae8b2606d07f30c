//! What the broker may do for the relay: only what the running config
//! needs. Pure: built from a [`Config`], asked about references, socket
//! kinds and addresses, and testable without root.
//!
//! - Resolve: `host`; any reference a rule names (its `netns` list or its
//!   `upstream_netns`); a `/run/netns` name, or a path, one of the rules'
//!   patterns matches (`tenant-*`, `/var/run/docker/netns/*`).
//! - Socket and Refill: only in a namespace resolved under the current
//!   policy ([`Resolved`]), and only of a kind (domain, type, protocol) a
//!   rule uses there: its listen socket where it listens, its upstream
//!   socket in its upstream namespace.
//! - Bind: only of the addresses a rule listens on (its `listen`, and for
//!   SCTP its `sctp_listen_addrs` at that port), with that rule's kind of
//!   socket.
//! - Release: always.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::{Config, Protocol as RuleProtocol, Rule};
use crate::netns::{NsId, NsRef, SocketSpec};

/// The broker's policy for one config.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<RulePolicy>,
    /// The rules that name each reference explicitly (listen or upstream
    /// side), and those with a glob: the only rules a reference can match,
    /// so that a check costs the rules that could match it, not all of
    /// them (a generated config has a rule per namespace; a rule can list
    /// thousands of namespaces).
    by_ref: HashMap<NsRef, Vec<usize>>,
    with_glob: Vec<usize>,
}

#[derive(Debug, Clone)]
struct RulePolicy {
    rule: Rule,
    listen: SocketSpec,
    upstream: SocketSpec,
    /// `listen` and, for SCTP, its extra addresses at the same port.
    addrs: Vec<SocketAddr>,
    /// The rule's explicit listen references and its globs, for checks
    /// that do not scan a list of thousands.
    listen_refs: std::collections::HashSet<NsRef>,
    listen_globs: Vec<NsRef>,
}

/// Why the policy refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "namespace \"{0}\" is not named by any rule of the config nor matched by one of its patterns"
    )]
    Namespace(NsRef),
    #[error("namespace {0} was not resolved under the current config")]
    NotResolved(NsId),
    #[error("no rule of the config uses a {kind} socket in namespace {ns} ({refs})")]
    Kind {
        ns: NsId,
        kind: String,
        refs: String,
    },
    #[error("no rule of the config listens on {addrs} with a {kind} socket in namespace {refs}")]
    Bind {
        addrs: String,
        kind: String,
        refs: String,
    },
}

/// A socket kind in words: "TCP/IPv6 stream".
pub fn describe(spec: &SocketSpec) -> String {
    let domain = match i32::from(spec.domain) {
        libc::AF_INET => "IPv4".to_owned(),
        libc::AF_INET6 => "IPv6".to_owned(),
        libc::AF_UNIX => "unix".to_owned(),
        d => format!("domain {d}"),
    };
    let ty = match i32::from(spec.ty) {
        libc::SOCK_STREAM => "stream".to_owned(),
        libc::SOCK_DGRAM => "datagram".to_owned(),
        libc::SOCK_SEQPACKET => "seqpacket".to_owned(),
        libc::SOCK_RAW => "raw".to_owned(),
        t => format!("type {t}"),
    };
    let proto = match spec.protocol.map(i32::from) {
        None | Some(0) => "default protocol".to_owned(),
        Some(libc::IPPROTO_TCP) => "TCP".to_owned(),
        Some(libc::IPPROTO_UDP) => "UDP".to_owned(),
        Some(libc::IPPROTO_SCTP) => "SCTP".to_owned(),
        Some(p) => format!("protocol {p}"),
    };
    let transparent = if spec.transparent {
        " (IP_TRANSPARENT)"
    } else {
        ""
    };
    format!("{proto}/{domain} {ty}{transparent}")
}

fn unspecified(v6: bool) -> SocketAddr {
    if v6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    }
}

impl RulePolicy {
    fn new(rule: &Rule) -> RulePolicy {
        let (listen, upstream) = match rule.protocol {
            RuleProtocol::Tcp => (
                SocketSpec::tcp(&rule.listen),
                crate::proxy::upstream_spec(rule),
            ),
            RuleProtocol::Udp => (
                SocketSpec::udp(&rule.listen),
                crate::proxy::upstream_spec(rule),
            ),
            RuleProtocol::Sctp => {
                // As the SCTP relay picks its upstream socket's family.
                let v6 = crate::sctp::needs_ipv6(
                    std::iter::once(rule.upstream.ip())
                        .chain(rule.sctp_upstream_addrs.iter().copied())
                        .chain(rule.sctp_source_addrs.iter().copied()),
                );
                (
                    SocketSpec::sctp(&rule.listen),
                    SocketSpec::sctp(&unspecified(v6)),
                )
            }
        };
        let mut addrs = vec![rule.listen];
        if rule.protocol == RuleProtocol::Sctp {
            addrs.extend(
                rule.sctp_listen_addrs
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, rule.listen.port())),
            );
        }
        let (listen_globs, listen_refs): (Vec<NsRef>, Vec<NsRef>) = rule
            .netns
            .iter()
            .cloned()
            .partition(|n| matches!(n, NsRef::Glob(_)));
        let listen_refs = listen_refs.into_iter().collect();
        RulePolicy {
            rule: rule.clone(),
            listen,
            upstream,
            addrs,
            listen_refs,
            listen_globs,
        }
    }

    /// As [`Rule::rank`] says, without its scan.
    fn listens_in(&self, r: &NsRef) -> bool {
        self.listen_refs.contains(r) || self.listen_globs.iter().any(|g| g.matches_ref(r))
    }

    /// Whether `a` is one of the rule's listen addresses; with a port
    /// range, at any port of it (`addrs` holds them at its first port).
    fn binds(&self, a: &SocketAddr) -> bool {
        let mut at_first = *a;
        if let Some(r) = self.rule.ports.filter(|r| r.contains(a.port())) {
            at_first.set_port(r.first);
        }
        self.addrs.contains(&at_first)
    }

    fn connects_from(&self, r: &NsRef) -> bool {
        self.rule.upstream_netns == *r
    }
}

impl Policy {
    /// The capabilities making this policy's sockets needs, beyond
    /// CAP_SYS_ADMIN for `setns`: CAP_NET_BIND_SERVICE when a rule listens
    /// on a port below 1024, CAP_SYS_PTRACE when a rule names a namespace
    /// by `pid:N` (opening another user's `/proc/N/ns/net` needs it),
    /// CAP_NET_ADMIN when a rule has `upstream_source = "client"` (for
    /// `IP_TRANSPARENT`).
    pub fn capabilities(&self) -> Vec<crate::privsep::Cap> {
        use crate::privsep::Cap;
        let mut caps = vec![Cap::SysAdmin];
        let low = self
            .rules
            .iter()
            .any(|r| r.addrs.iter().any(|a| a.port() != 0 && a.port() < 1024));
        if low {
            caps.push(Cap::NetBindService);
        }
        let by_pid = self.rules.iter().any(|r| {
            r.rule
                .netns
                .iter()
                .chain(std::iter::once(&r.rule.upstream_netns))
                .any(|n| matches!(n, NsRef::Pid(_)))
        });
        if by_pid {
            caps.push(Cap::SysPtrace);
        }
        if self.rules.iter().any(|r| r.upstream.transparent) {
            // IP_TRANSPARENT, for upstream_source = "client".
            caps.push(Cap::NetAdmin);
        }
        caps
    }

    /// What `config` needs.
    pub fn from_config(config: &Config) -> Policy {
        let rules: Vec<RulePolicy> = config.rules.iter().map(RulePolicy::new).collect();
        let mut by_ref: HashMap<NsRef, Vec<usize>> = HashMap::new();
        let mut with_glob = Vec::new();
        for (i, p) in rules.iter().enumerate() {
            let mut glob = false;
            for r in p
                .rule
                .netns
                .iter()
                .chain(std::iter::once(&p.rule.upstream_netns))
            {
                if matches!(r, NsRef::Glob(_)) {
                    glob = true;
                    continue;
                }
                let list = by_ref.entry(r.clone()).or_default();
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
            if glob {
                with_glob.push(i);
            }
        }
        Policy {
            rules,
            by_ref,
            with_glob,
        }
    }

    /// The rules that may listen in or connect from `r`, maybe more.
    fn candidates<'a>(&'a self, r: &NsRef) -> impl Iterator<Item = &'a RulePolicy> + 'a {
        let named = self.by_ref.get(r).map_or(&[][..], Vec::as_slice);
        named
            .iter()
            .chain(self.with_glob.iter())
            .map(|&i| &self.rules[i])
    }

    /// Whether `r` may be resolved.
    pub fn allows_resolve(&self, r: &NsRef) -> Result<(), Refusal> {
        if *r == NsRef::Host
            || self
                .candidates(r)
                .any(|p| p.listens_in(r) || p.connects_from(r))
        {
            Ok(())
        } else {
            Err(Refusal::Namespace(r.clone()))
        }
    }

    /// Whether a socket of `spec` may be made in `ns`, resolved earlier
    /// (under this policy) as recorded in `resolved`.
    pub fn allows_socket(
        &self,
        resolved: &Resolved,
        ns: NsId,
        spec: &SocketSpec,
    ) -> Result<(), Refusal> {
        let Some(refs) = resolved.refs(ns) else {
            return Err(Refusal::NotResolved(ns));
        };
        let used = refs.iter().any(|r| {
            self.candidates(r).any(|p| {
                (p.listen == *spec && p.listens_in(r))
                    || (p.upstream == *spec && p.connects_from(r))
            })
        });
        if used {
            Ok(())
        } else {
            Err(Refusal::Kind {
                ns,
                kind: describe(spec),
                refs: listed(refs),
            })
        }
    }

    /// Whether a socket of `spec`, in the namespace resolved from `refs`,
    /// may be bound to `addrs` (all of them the listen addresses of one
    /// rule that listens there).
    pub fn allows_bind(
        &self,
        refs: &BTreeSet<NsRef>,
        spec: &SocketSpec,
        addrs: &[SocketAddr],
    ) -> Result<(), Refusal> {
        let ok = !addrs.is_empty()
            && refs.iter().any(|r| {
                self.candidates(r).any(|p| {
                    p.listen == *spec && addrs.iter().all(|a| p.binds(a)) && p.listens_in(r)
                })
            });
        if ok {
            Ok(())
        } else {
            Err(Refusal::Bind {
                addrs: listed(addrs),
                kind: describe(spec),
                refs: listed(refs),
            })
        }
    }
}

/// The namespaces the broker has open, with the references each was
/// resolved from: what Socket and Refill may use.
#[derive(Debug, Default)]
pub struct Resolved {
    by_ns: HashMap<NsId, BTreeSet<NsRef>>,
}

impl Resolved {
    /// `r` resolved to `ns`.
    pub fn insert(&mut self, ns: NsId, r: NsRef) {
        self.by_ns.entry(ns).or_default().insert(r);
    }

    /// `ns` was released: it must be resolved again before use.
    pub fn release(&mut self, ns: NsId) {
        self.by_ns.remove(&ns);
    }

    /// The references `ns` was resolved from, if it is open.
    pub fn refs(&self, ns: NsId) -> Option<&BTreeSet<NsRef>> {
        self.by_ns.get(&ns)
    }

    /// After a reload: forgets the references `policy` no longer allows,
    /// and the namespaces left with none (returned, for closing).
    pub fn retain_allowed(&mut self, policy: &Policy) -> Vec<NsId> {
        let mut gone = Vec::new();
        self.by_ns.retain(|ns, refs| {
            refs.retain(|r| policy.allows_resolve(r).is_ok());
            if refs.is_empty() {
                gone.push(*ns);
            }
            !refs.is_empty()
        });
        gone
    }

    /// How many namespaces are open.
    pub fn len(&self) -> usize {
        self.by_ns.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.by_ns.is_empty()
    }
}

/// `items` as text, comma-separated, for a refusal's message.
fn listed<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_forward, parse_toml};

    fn forward(specs: &[&str]) -> Policy {
        let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        Policy::from_config(&parse_forward(&specs, None).unwrap())
    }

    fn r(s: &str) -> NsRef {
        s.parse().unwrap()
    }

    const A: NsId = NsId { dev: 1, ino: 10 };
    const B: NsId = NsId { dev: 1, ino: 11 };

    #[test]
    fn only_named_and_matching_references_resolve() {
        let p = forward(&[
            "tcp:[::]:80@tenant-*,pid:42,/var/run/x=127.0.0.1:9@edge",
            "udp:0.0.0.0:53@ns1=10.0.0.1:53",
        ]);
        for ok in ["host", "tenant-7", "pid:42", "/var/run/x", "edge", "ns1"] {
            assert_eq!(p.allows_resolve(&r(ok)), Ok(()), "{ok}");
        }
        for bad in ["other", "pid:43", "/run/netns/ns1", "/proc/1/ns/net"] {
            let e = p.allows_resolve(&r(bad)).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn a_path_pattern_resolves_the_files_of_its_directory_only() {
        let p = forward(&["tcp:[::]:80@/var/run/docker/netns/*,/run/c/cni-*=127.0.0.1:9"]);
        for ok in ["/var/run/docker/netns/1a2b", "/run/c/cni-9"] {
            assert_eq!(p.allows_resolve(&r(ok)), Ok(()), "{ok}");
        }
        for bad in [
            "/var/run/docker/netns/a/b",
            "/var/run/docker/x",
            "/run/c/other",
            "1a2b",
            "cni-9",
        ] {
            assert!(p.allows_resolve(&r(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn sockets_only_of_the_kinds_a_rule_uses_where_it_uses_them() {
        let p = forward(&[
            "tcp:[::]:80@ns1=127.0.0.1:9@edge",
            "udp:0.0.0.0:53@tenant-*=10.0.0.1:53",
        ]);
        let v6: SocketAddr = "[::]:0".parse().unwrap();
        let v4: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let mut res = Resolved::default();
        assert_eq!(
            p.allows_socket(&res, A, &SocketSpec::tcp(&v6)),
            Err(Refusal::NotResolved(A))
        );
        res.insert(A, r("ns1"));
        res.insert(B, r("edge"));
        assert_eq!(p.allows_socket(&res, A, &SocketSpec::tcp(&v6)), Ok(()));
        // The upstream kind only in the upstream namespace.
        assert!(p.allows_socket(&res, A, &SocketSpec::tcp(&v4)).is_err());
        assert_eq!(p.allows_socket(&res, B, &SocketSpec::tcp(&v4)), Ok(()));
        let e = p.allows_socket(&res, A, &SocketSpec::udp(&v4)).unwrap_err();
        assert!(e.to_string().contains("UDP/IPv4 datagram"), "{e}");
        assert!(e.to_string().contains("ns1"), "{e}");
        res.insert(A, r("tenant-3"));
        assert_eq!(p.allows_socket(&res, A, &SocketSpec::udp(&v4)), Ok(()));
        res.release(A);
        assert!(p.allows_socket(&res, A, &SocketSpec::tcp(&v6)).is_err());
    }

    #[test]
    fn binds_only_of_listen_addresses() {
        let toml = r#"
            [[proxy]]
            name = "s"
            protocol = "sctp"
            listen = "10.0.0.1:38"
            sctp_listen_addrs = ["10.0.0.2"]
            netns = ["ns1"]
            upstream = "10.1.0.1:38"

            [[proxy]]
            name = "w"
            protocol = "tcp"
            listen = "[::]:80"
            netns = ["ns1"]
            upstream = "127.0.0.1:8080"
        "#;
        let p = Policy::from_config(&parse_toml(toml, "t.toml").unwrap());
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let tcp6 = SocketSpec::tcp(&a("[::]:0"));
        let sctp4 = SocketSpec::sctp(&a("0.0.0.0:0"));
        let ns1: BTreeSet<NsRef> = [r("ns1")].into();
        let host: BTreeSet<NsRef> = [NsRef::Host].into();
        assert_eq!(p.allows_bind(&ns1, &tcp6, &[a("[::]:80")]), Ok(()));
        assert!(p.allows_bind(&host, &tcp6, &[a("[::]:80")]).is_err());
        assert_eq!(
            p.allows_bind(&ns1, &sctp4, &[a("10.0.0.1:38"), a("10.0.0.2:38")]),
            Ok(())
        );
        assert!(p.allows_bind(&ns1, &sctp4, &[a("[::]:80")]).is_err());
        let e = p.allows_bind(&ns1, &tcp6, &[a("[::]:81")]).unwrap_err();
        assert!(e.to_string().contains("[::]:81"), "{e}");
        assert!(p.allows_bind(&ns1, &tcp6, &[]).is_err());
    }

    #[test]
    fn binds_at_every_port_of_a_range_privileged_ones_too() {
        let p = forward(&["tcp:[::]:1000-1100@ns1=127.0.0.1:8080"]);
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let tcp6 = SocketSpec::tcp(&a("[::]:0"));
        let ns1: BTreeSet<NsRef> = [r("ns1")].into();
        for ok in ["[::]:1000", "[::]:1023", "[::]:1100"] {
            assert_eq!(p.allows_bind(&ns1, &tcp6, &[a(ok)]), Ok(()), "{ok}");
        }
        for bad in ["[::]:999", "[::]:1101", "[::1]:1050"] {
            assert!(p.allows_bind(&ns1, &tcp6, &[a(bad)]).is_err(), "{bad}");
        }
        assert!(
            p.capabilities()
                .contains(&crate::privsep::Cap::NetBindService)
        );
    }

    #[test]
    fn transparent_upstream_sockets_only_for_client_source_rules_with_net_admin() {
        use crate::privsep::Cap;
        let toml = |source: &str| {
            format!(
                "[[proxy]]\nname = \"t\"\nprotocol = \"tcp\"\nlisten = \"0.0.0.0:8000\"\nnetns = [\"ns1\"]\nupstream = \"10.0.0.1:80\"\nupstream_netns = \"up\"\n{source}\n"
            )
        };
        let plain = Policy::from_config(&parse_toml(&toml(""), "t.toml").unwrap());
        let client = Policy::from_config(
            &parse_toml(&toml("upstream_source = \"client\""), "t.toml").unwrap(),
        );
        assert!(!plain.capabilities().contains(&Cap::NetAdmin));
        assert!(client.capabilities().contains(&Cap::NetAdmin));
        let mut res = Resolved::default();
        res.insert(A, r("up"));
        let tcp4 = SocketSpec::tcp(&"10.0.0.1:80".parse().unwrap());
        assert_eq!(
            client.allows_socket(&res, A, &tcp4.transparent(true)),
            Ok(())
        );
        assert!(client.allows_socket(&res, A, &tcp4).is_err());
        assert_eq!(plain.allows_socket(&res, A, &tcp4), Ok(()));
        assert!(
            plain
                .allows_socket(&res, A, &tcp4.transparent(true))
                .is_err()
        );
    }

    #[test]
    fn a_reload_keeps_what_is_still_allowed() {
        let old = forward(&["tcp:[::]:80@ns1,ns2=127.0.0.1:9"]);
        let new = forward(&["tcp:[::]:80@ns1=127.0.0.1:9"]);
        let mut res = Resolved::default();
        for (ns, name) in [(A, "ns1"), (B, "ns2")] {
            assert!(old.allows_resolve(&r(name)).is_ok());
            res.insert(ns, r(name));
        }
        assert_eq!(res.retain_allowed(&new), vec![B]);
        assert_eq!(res.len(), 1);
        assert!(res.refs(A).is_some());
    }
}
