//! One `[[proxy]]` table to a [`Rule`].

use std::ops::Range;

use toml::de::{DeTable, DeValue};

use super::RuleLocations;
use super::cx::Cx;
use crate::config::{
    DEFAULT_BACKLOG, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HALF_CLOSE_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_SCTP_STREAMS, DEFAULT_TCP_KEEPALIVE, DEFAULT_UDP_IDLE_TIMEOUT,
    DEFAULT_UDP_MAX_SESSIONS, MAX_CONNECTIONS, MAX_UDP_SESSIONS, OnDelete, Protocol, Rule,
    check_listen, check_name, check_on_delete, check_protocol, check_proxy_protocol,
    check_sctp_listen_addrs, check_upstream, check_upstream_netns,
};
use crate::netns::NsRef;

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
/// Keys that mean something for some protocols only, and why, for the
/// message that a rule of another protocol gets.
const PROTOCOL_KEYS: &[(&str, &[Protocol], &str)] = &[
    (
        "connect_timeout",
        &[Protocol::Tcp, Protocol::Sctp],
        "a UDP upstream socket is connected without a handshake",
    ),
    (
        "backlog",
        &[Protocol::Tcp, Protocol::Sctp],
        "UDP has no listen queue",
    ),
    (
        "max_connections",
        &[Protocol::Tcp, Protocol::Sctp],
        "UDP caps sessions with udp_max_sessions",
    ),
    (
        "proxy_protocol",
        &[Protocol::Tcp],
        "nsproxy sends PROXY protocol headers on TCP connections only",
    ),
    (
        "udp_idle_timeout",
        &[Protocol::Udp],
        "connections and associations have idle_timeout",
    ),
    (
        "udp_max_sessions",
        &[Protocol::Udp],
        "connections and associations are capped with max_connections",
    ),
    (
        "idle_timeout",
        &[Protocol::Tcp, Protocol::Sctp],
        "UDP sessions end after udp_idle_timeout",
    ),
    (
        "half_close_timeout",
        &[Protocol::Tcp],
        "only TCP has half-closed connections",
    ),
    (
        "tcp_keepalive",
        &[Protocol::Tcp],
        "keepalive probes are TCP's",
    ),
    ("sctp_streams", &[Protocol::Sctp], "only SCTP has streams"),
    (
        "sctp_listen_addrs",
        &[Protocol::Sctp],
        "only SCTP is multi-homed",
    ),
    (
        "sctp_upstream_addrs",
        &[Protocol::Sctp],
        "only SCTP is multi-homed",
    ),
    (
        "sctp_source_addrs",
        &[Protocol::Sctp],
        "only SCTP is multi-homed",
    ),
];

impl Cx<'_> {
    /// Reads one `[[proxy]]` table; `None` if anything in it was wrong.
    pub(super) fn rule(
        &mut self,
        index: usize,
        span: Range<usize>,
        t: &DeTable<'_>,
    ) -> Option<(Rule, String, RuleLocations)> {
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
        let listen = listen_v.and_then(|v| self.checked(v, rule, "listen", check_listen));
        let upstream = upstream_v.and_then(|v| self.checked(v, rule, "upstream", check_upstream));
        let netns = netns_v.and_then(|v| self.netns_list(v, rule));
        let (netns, netns_at) = netns.map(|l| l.into_iter().unzip()).unzip();
        let upstream_netns_at = t.get("upstream_netns").map(|v| self.location(v.span()));
        let upstream_netns = match t.get("upstream_netns") {
            Some(v) => self.checked(v, rule, "upstream_netns", check_upstream_netns),
            None => Some(NsRef::Host),
        };
        let connect_timeout = match t.get("connect_timeout") {
            Some(v) => self.duration(v, rule, "connect_timeout"),
            None => Some(DEFAULT_CONNECT_TIMEOUT),
        };
        let backlog = match t.get("backlog") {
            Some(v) => self
                .integer(v, rule, "backlog", 1, 65_535)
                .map(|n| n as u32),
            None => Some(DEFAULT_BACKLOG),
        };
        let max_connections = match t.get("max_connections") {
            Some(v) => self
                .integer(v, rule, "max_connections", 1, MAX_CONNECTIONS as i64)
                .map(|n| Some(n as usize)),
            None => Some(None),
        };
        let proxy_protocol = match t.get("proxy_protocol") {
            Some(v) => self
                .checked(v, rule, "proxy_protocol", check_proxy_protocol)
                .map(Some),
            None => Some(None),
        };
        let udp_idle_timeout = match t.get("udp_idle_timeout") {
            Some(v) => self.duration(v, rule, "udp_idle_timeout"),
            None => Some(DEFAULT_UDP_IDLE_TIMEOUT),
        };
        let idle_timeout = match t.get("idle_timeout") {
            Some(v) => self.optional_duration(v, rule, "idle_timeout"),
            None => Some(Some(DEFAULT_IDLE_TIMEOUT)),
        };
        let half_close_timeout = match t.get("half_close_timeout") {
            Some(v) => self.optional_duration(v, rule, "half_close_timeout"),
            None => Some(Some(DEFAULT_HALF_CLOSE_TIMEOUT)),
        };
        let tcp_keepalive = match t.get("tcp_keepalive") {
            Some(v) => self.keepalive(v, rule),
            None => Some(Some(DEFAULT_TCP_KEEPALIVE)),
        };
        let udp_max_sessions = match t.get("udp_max_sessions") {
            Some(v) => self
                .integer(v, rule, "udp_max_sessions", 1, MAX_UDP_SESSIONS as i64)
                .map(|n| n as usize),
            None => Some(DEFAULT_UDP_MAX_SESSIONS),
        };
        let on_netns_delete = match t.get("on_netns_delete") {
            Some(v) => self.checked(v, rule, "on_netns_delete", check_on_delete),
            None => Some(OnDelete::default()),
        };
        let sctp_streams = match t.get("sctp_streams") {
            Some(v) => self.streams(v, rule),
            None => Some(DEFAULT_SCTP_STREAMS),
        };
        let addrs = |cx: &mut Self, key: &str| match t.get(key) {
            Some(v) => cx.ip_list(v, rule, key),
            None => Some(Vec::new()),
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
        if let Some(protocol) = protocol {
            for (key, only, why) in PROTOCOL_KEYS {
                if let (Some(v), false) = (t.get(*key), only.contains(&protocol)) {
                    let only: Vec<String> = only.iter().map(|p| p.to_string()).collect();
                    self.problem(
                        v.span(),
                        rule,
                        Some(key),
                        format!(
                            "only applies to {} rules, and this rule is {protocol} ({why}): remove it",
                            only.join(" and ")
                        ),
                    );
                }
            }
        }

        if self.problems.len() != before {
            return None;
        }
        Some((
            Rule {
                name: name?,
                protocol: protocol?,
                listen: listen?,
                netns: netns?,
                upstream: upstream?,
                upstream_netns: upstream_netns?,
                connect_timeout: connect_timeout?,
                backlog: backlog?,
                max_connections: max_connections?,
                proxy_protocol: proxy_protocol?,
                udp_idle_timeout: udp_idle_timeout?,
                udp_max_sessions: udp_max_sessions?,
                idle_timeout: idle_timeout?,
                half_close_timeout: half_close_timeout?,
                tcp_keepalive: tcp_keepalive?,
                sctp_streams: sctp_streams?,
                sctp_listen_addrs: sctp_listen_addrs?,
                sctp_upstream_addrs: sctp_upstream_addrs?,
                sctp_source_addrs: sctp_source_addrs?,
                on_netns_delete: on_netns_delete?,
                origin: header,
            },
            name_loc?,
            RuleLocations {
                netns: netns_at?,
                upstream_netns: upstream_netns_at,
            },
        ))
    }
}
