//! One `[[proxy]]` table to a [`Rule`]: the keys every rule has, then each
//! settings group ([`crate::config::settings`]) read whole; a key of a group
//! the rule's protocol does not have is refused, with the reason its group
//! gives.

use std::net::SocketAddr;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::cx::Cx;
use super::{ReadRule, RuleLocations};
use crate::config::settings::refusal;
use crate::config::{
    ConnSettings, MAX_CONNECTIONS, MAX_UDP_SESSIONS, OnDelete, PortRange, Protocol, Rule,
    SctpSettings, Settings, TcpSettings, UdpSettings, UpstreamSource, check_listen_ports,
    check_name, check_on_delete, check_protocol, check_proxy_protocol, check_range,
    check_sctp_listen_addrs, check_upstream_netns, check_upstream_ports, check_upstream_source,
};
use crate::netns::NsRef;

/// Every key of a `[[proxy]]` table, in the order the unknown-key message
/// lists them: the keys every rule has and every settings group's (a test
/// holds the two to the groups).
pub(super) const RULE_KEYS: &[&str] = &[
    "name",
    "protocol",
    "listen",
    "netns",
    "upstream",
    "upstream_netns",
    "connect_timeout",
    "backlog",
    "max_connections",
    "proxy_protocol",
    "upstream_source",
    "udp_idle_timeout",
    "udp_max_sessions",
    "idle_timeout",
    "half_close_timeout",
    "tcp_keepalive",
    "on_netns_delete",
    "sctp_streams",
    "sctp_listen_addrs",
    "sctp_upstream_addrs",
    "sctp_source_addrs",
];
/// The keys every rule has, as read; each `None` when absent or wrong.
struct Common {
    name: Option<String>,
    /// Where the name is written, for cross-rule messages.
    name_loc: Option<String>,
    protocol: Option<Protocol>,
    listen: Option<SocketAddr>,
    upstream: Option<SocketAddr>,
    /// `listen`'s port range, checked against `upstream`'s.
    ports: Option<Option<PortRange>>,
    netns: Option<Vec<NsRef>>,
    netns_at: Option<Vec<String>>,
    upstream_netns: Option<NsRef>,
    upstream_netns_at: Option<String>,
    on_netns_delete: Option<OnDelete>,
}

impl Cx<'_> {
    /// Reads one `[[proxy]]` table; `None` if anything in it was wrong.
    pub(super) fn rule(
        &mut self,
        index: usize,
        span: Range<usize>,
        t: &DeTable<'_>,
    ) -> Option<ReadRule> {
        let before = self.problems.len();
        let label = match t.get("name").map(|v| v.get_ref()) {
            Some(DeValue::String(s)) if check_name(s).is_ok() => s.to_string(),
            _ => format!("#{}", index + 1),
        };
        let rule = Some(label.as_str());
        let header = self.location(span.clone());
        for (key, _) in t.iter() {
            let k: &str = key.get_ref();
            if !RULE_KEYS.contains(&k) {
                self.unknown_key(key, rule, k, RULE_KEYS);
            }
        }
        let c = self.common(t, span, rule);
        // Every group is read whatever the protocol, so that each value is
        // checked even where the key is refused or the protocol is wrong.
        let conn = self.conn_settings(t, rule);
        // In two groups (TCP's and UDP's): read, and any problem told, once.
        let source = self.upstream_source(t, rule, UpstreamSource::default());
        let tcp = self.tcp_settings(t, rule, source);
        let udp = self.udp_settings(t, rule, source);
        let sctp = self.sctp_settings(t, rule, c.listen);
        if let Some(protocol) = c.protocol {
            self.refuse_other_protocols_keys(t, rule, protocol);
        }
        if self.problems.len() != before {
            return None;
        }
        let settings = match c.protocol? {
            Protocol::Tcp => Settings::Tcp {
                conn: conn?,
                tcp: tcp?,
            },
            Protocol::Udp => Settings::Udp(udp?),
            Protocol::Sctp => Settings::Sctp {
                conn: conn?,
                sctp: sctp?,
            },
        };
        let mut r = Rule::new(
            c.name?,
            c.listen?,
            c.netns?,
            c.upstream?,
            c.upstream_netns?,
            settings,
            header,
        );
        r.on_netns_delete = c.on_netns_delete?;
        r.ports = c.ports?;
        let at = RuleLocations {
            netns: c.netns_at?,
            upstream_netns: c.upstream_netns_at,
        };
        Some((r, c.name_loc?, at))
    }

    /// The keys every rule has: the required ones, `upstream_netns` and
    /// `on_netns_delete`.
    fn common(&mut self, t: &DeTable<'_>, span: Range<usize>, rule: Option<&str>) -> Common {
        let required = |cx: &mut Self, key: &str| {
            let v = t.get(key);
            if v.is_none() {
                cx.problem(
                    span.clone(),
                    rule,
                    None,
                    format!("missing required key `{key}`"),
                );
            }
            v
        };
        let name_v = required(self, "name");
        let protocol_v = required(self, "protocol");
        let listen_v = required(self, "listen");
        let netns_v = required(self, "netns");
        let upstream_v = required(self, "upstream");

        let name = name_v.and_then(|v| self.checked(v, rule, "name", check_name));
        let name_loc = name_v.map(|v| self.location(v.span()));
        let protocol = protocol_v.and_then(|v| self.checked(v, rule, "protocol", check_protocol));
        let listen = listen_v.and_then(|v| self.checked(v, rule, "listen", check_listen_ports));
        let upstream =
            upstream_v.and_then(|v| self.checked(v, rule, "upstream", check_upstream_ports));
        // A range that does not fit its upstream is reported at `upstream`.
        let ports = match (listen, upstream, upstream_v) {
            (Some(l), Some(u), Some(v)) => match check_range(l, u) {
                Ok(r) => Some(r),
                Err(m) => {
                    self.problem(v.span(), rule, Some("upstream"), m);
                    None
                }
            },
            _ => None,
        };
        let (listen, upstream) = (listen.map(|l| l.0), upstream.map(|u| u.0));
        let netns = netns_v.and_then(|v| self.netns_list(v, rule));
        let (netns, netns_at) = netns.map(|l| l.into_iter().unzip()).unzip();
        let upstream_netns_at = t.get("upstream_netns").map(|v| self.location(v.span()));
        let upstream_netns = self.key_or(t, "upstream_netns", NsRef::Host, |cx, v| {
            cx.checked(v, rule, "upstream_netns", check_upstream_netns)
        });
        let on_netns_delete = self.key_or(t, "on_netns_delete", OnDelete::default(), |cx, v| {
            cx.checked(v, rule, "on_netns_delete", check_on_delete)
        });
        Common {
            name,
            name_loc,
            protocol,
            listen,
            upstream,
            ports,
            netns,
            netns_at,
            upstream_netns,
            upstream_netns_at,
            on_netns_delete,
        }
    }

    /// The value of `key` read with `read`, or `default` when absent;
    /// `None` when the value is wrong.
    fn key_or<T>(
        &mut self,
        t: &DeTable<'_>,
        key: &str,
        default: T,
        read: impl FnOnce(&mut Self, &Spanned<DeValue<'_>>) -> Option<T>,
    ) -> Option<T> {
        match t.get(key) {
            Some(v) => read(self, v),
            None => Some(default),
        }
    }

    fn conn_settings(&mut self, t: &DeTable<'_>, rule: Option<&str>) -> Option<ConnSettings> {
        let d = ConnSettings::default();
        let connect_timeout = self.key_or(t, "connect_timeout", d.connect_timeout, |cx, v| {
            cx.duration(v, rule, "connect_timeout")
        });
        let backlog = self.key_or(t, "backlog", d.backlog, |cx, v| {
            cx.integer(v, rule, "backlog", 1, 65_535).map(|n| n as u32)
        });
        let max_connections = self.key_or(t, "max_connections", d.max_connections, |cx, v| {
            cx.integer(v, rule, "max_connections", 1, MAX_CONNECTIONS as i64)
                .map(|n| Some(n as usize))
        });
        let idle_timeout = self.key_or(t, "idle_timeout", d.idle_timeout, |cx, v| {
            cx.optional_duration(v, rule, "idle_timeout")
        });
        Some(ConnSettings {
            connect_timeout: connect_timeout?,
            backlog: backlog?,
            max_connections: max_connections?,
            idle_timeout: idle_timeout?,
        })
    }

    fn tcp_settings(
        &mut self,
        t: &DeTable<'_>,
        rule: Option<&str>,
        upstream_source: Option<UpstreamSource>,
    ) -> Option<TcpSettings> {
        let d = TcpSettings::default();
        let proxy_protocol = self.key_or(t, "proxy_protocol", d.proxy_protocol, |cx, v| {
            cx.checked(v, rule, "proxy_protocol", check_proxy_protocol)
                .map(Some)
        });
        let half_close_timeout =
            self.key_or(t, "half_close_timeout", d.half_close_timeout, |cx, v| {
                cx.optional_duration(v, rule, "half_close_timeout")
            });
        let tcp_keepalive = self.key_or(t, "tcp_keepalive", d.tcp_keepalive, |cx, v| {
            cx.keepalive(v, rule)
        });
        Some(TcpSettings {
            proxy_protocol: proxy_protocol?,
            half_close_timeout: half_close_timeout?,
            tcp_keepalive: tcp_keepalive?,
            upstream_source: upstream_source?,
        })
    }

    fn udp_settings(
        &mut self,
        t: &DeTable<'_>,
        rule: Option<&str>,
        upstream_source: Option<UpstreamSource>,
    ) -> Option<UdpSettings> {
        let d = UdpSettings::default();
        let udp_idle_timeout = self.key_or(t, "udp_idle_timeout", d.udp_idle_timeout, |cx, v| {
            cx.duration(v, rule, "udp_idle_timeout")
        });
        let udp_max_sessions = self.key_or(t, "udp_max_sessions", d.udp_max_sessions, |cx, v| {
            cx.integer(v, rule, "udp_max_sessions", 1, MAX_UDP_SESSIONS as i64)
                .map(|n| n as usize)
        });
        Some(UdpSettings {
            udp_idle_timeout: udp_idle_timeout?,
            udp_max_sessions: udp_max_sessions?,
            upstream_source: upstream_source?,
        })
    }

    /// `upstream_source`, which TCP and UDP rules both take.
    fn upstream_source(
        &mut self,
        t: &DeTable<'_>,
        rule: Option<&str>,
        default: UpstreamSource,
    ) -> Option<UpstreamSource> {
        self.key_or(t, "upstream_source", default, |cx, v| {
            cx.checked(v, rule, "upstream_source", check_upstream_source)
        })
    }

    /// The SCTP group; extra listen addresses are checked against `listen`.
    fn sctp_settings(
        &mut self,
        t: &DeTable<'_>,
        rule: Option<&str>,
        listen: Option<SocketAddr>,
    ) -> Option<SctpSettings> {
        let d = SctpSettings::default();
        let sctp_streams = self.key_or(t, "sctp_streams", d.sctp_streams, |cx, v| {
            cx.streams(v, rule)
        });
        let addrs = |cx: &mut Self, key: &str| {
            cx.key_or(t, key, Vec::new(), |cx, v| cx.ip_list(v, rule, key))
        };
        let sctp_listen_addrs = addrs(self, "sctp_listen_addrs");
        let sctp_upstream_addrs = addrs(self, "sctp_upstream_addrs");
        let sctp_source_addrs = addrs(self, "sctp_source_addrs");
        if let (Some(l), Some(extra), Some(v)) =
            (listen, &sctp_listen_addrs, t.get("sctp_listen_addrs"))
        {
            if let Err(m) = check_sctp_listen_addrs(l, extra) {
                self.problem(v.span(), rule, Some("sctp_listen_addrs"), m);
            }
        }
        Some(SctpSettings {
            sctp_streams: sctp_streams?,
            sctp_listen_addrs: sctp_listen_addrs?,
            sctp_upstream_addrs: sctp_upstream_addrs?,
            sctp_source_addrs: sctp_source_addrs?,
        })
    }

    /// Refuses, at its value, each key of a settings group `protocol` does
    /// not have.
    fn refuse_other_protocols_keys(
        &mut self,
        t: &DeTable<'_>,
        rule: Option<&str>,
        protocol: Protocol,
    ) {
        for (key, v) in t.iter() {
            let k: &str = key.get_ref();
            if let Err(refused) = refusal(protocol, k) {
                self.problem(v.span(), rule, Some(k), refused.to_string());
            }
        }
    }
}
