//! The TOML front end.
//!
//! The document is walked by hand over the spanned tree of the `toml` parser
//! rather than through serde, so that one pass can report *every* problem
//! (serde stops at the first) and each with its line and column.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{
    Config, ConfigError, DEFAULT_BACKLOG, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HALF_CLOSE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_SCTP_STREAMS, DEFAULT_TCP_KEEPALIVE, DEFAULT_UDP_IDLE_TIMEOUT,
    DEFAULT_UDP_MAX_SESSIONS, Keepalive, MAX_CONNECTIONS, MAX_UDP_SESSIONS, MAX_WORKERS, OnDelete,
    Problem, Protocol, Rule, check_listen, check_name, check_netns, check_on_delete,
    check_protocol, check_proxy_protocol, check_rules, check_sctp_addr, check_sctp_listen_addrs,
    check_upstream, check_upstream_netns, parse_duration,
};
use crate::netns::NsRef;

const TOP_KEYS: &[&str] = &[
    "workers",
    "control_socket",
    "metrics_listen",
    "drain_timeout",
    "proxy",
];
const RULE_KEYS: &[&str] = &[
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

/// Parses and checks a TOML configuration; `origin` names it in messages
/// (usually the file path).
pub fn parse_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
    parse_toml_located(text, origin).map(|(config, _)| config)
}

/// Like [`parse_toml`], and also where each rule's namespace references are
/// written (one [`RuleLocations`] per rule, in the order of `rules`), so
/// that `nsproxy check` can point at the entry a finding is about.
pub fn parse_toml_located(
    text: &str,
    origin: &str,
) -> Result<(Config, Vec<RuleLocations>), ConfigError> {
    let mut cx = Cx {
        origin,
        lines: LineIndex::new(text),
        problems: Vec::new(),
    };
    let finish = |cx: Cx<'_>, rules: &[(Rule, String, RuleLocations)]| {
        // Problems in file order; cross-rule ones after them. A stable sort
        // keeps the problems at one offset in the order they were found.
        let mut found = cx.problems;
        found.sort_by_key(|(at, _)| *at);
        let mut problems: Vec<Problem> = found.into_iter().map(|(_, p)| p).collect();
        check_rules(
            rules
                .iter()
                .map(|(r, name_loc, at)| (r, name_loc.as_str(), at.netns.as_slice())),
            &mut problems,
        );
        problems
    };
    let doc = match DeTable::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            cx.problem(
                span,
                None,
                None,
                format!("TOML syntax error: {}", e.message().trim_end()),
            );
            return Err(ConfigError::Invalid(finish(cx, &[])));
        }
    };
    let doc = doc.get_ref();

    let mut workers = None;
    let mut control_socket = None;
    let mut metrics_listen = None;
    let mut drain_timeout = None;
    let mut rules = Vec::new();
    let mut saw_proxy = false;
    for (key, value) in doc.iter() {
        match key.get_ref().as_ref() {
            "workers" => {
                workers = cx
                    .integer(value, None, "workers", 1, MAX_WORKERS as i64)
                    .map(|n| n as usize)
            }
            "control_socket" => {
                control_socket = cx
                    .string(value, None, "control_socket")
                    .map(std::path::PathBuf::from)
            }
            "metrics_listen" => {
                metrics_listen = cx.checked(value, None, "metrics_listen", check_listen)
            }
            "drain_timeout" => drain_timeout = cx.duration(value, None, "drain_timeout"),
            "proxy" => {
                saw_proxy = true;
                match value.get_ref() {
                    DeValue::Array(items) if items.iter().all(|t| t.get_ref().is_table()) => {
                        for (i, item) in items.iter().enumerate() {
                            if let DeValue::Table(t) = item.get_ref() {
                                if let Some(r) = cx.rule(i, item.span(), t) {
                                    rules.push(r);
                                }
                            }
                        }
                    }
                    _ => cx.problem(
                        value.span(),
                        None,
                        Some("proxy"),
                        "`proxy` must be an array of tables: write each rule under its own [[proxy]] header"
                            .into(),
                    ),
                }
            }
            other => cx.unknown_key(key, None, other, TOP_KEYS),
        }
    }
    if !saw_proxy {
        cx.problem(
            0..0,
            None,
            None,
            "no rules: add at least one [[proxy]] table".into(),
        );
    }
    let problems = finish(cx, &rules);
    if problems.is_empty() {
        let (rules, locations) = rules.into_iter().map(|(r, _, l)| (r, l)).unzip();
        Ok((
            Config {
                workers,
                control_socket,
                metrics_listen,
                drain_timeout,
                rules,
            },
            locations,
        ))
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// Where one rule's namespace references are written, as `FILE:LINE:COLUMN`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuleLocations {
    /// One per entry of [`Rule::netns`], in its order.
    pub netns: Vec<String>,
    /// The `upstream_netns` value; `None` when the key is absent (`host`).
    pub upstream_netns: Option<String>,
}

/// Byte offset to line and column, by binary search over the offsets at
/// which lines start: each position costs O(log lines), so a file with
/// 40,000 problems (or 8,000 rules, each with its header located) is not
/// rescanned from its start per position.
struct LineIndex {
    /// Offset of the first byte of each line; `starts[0] == 0`.
    starts: Vec<usize>,
    len: usize,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex {
            starts,
            len: text.len(),
        }
    }

    /// 1-based line and column (in bytes, as the offsets are) of `offset`.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.len);
        // The number of lines starting at or before `offset`; at least 1.
        let line = self.starts.partition_point(|&s| s <= offset);
        (line, offset - self.starts[line - 1] + 1)
    }
}

struct Cx<'a> {
    origin: &'a str,
    lines: LineIndex,
    /// Each problem with the byte offset it is at, to sort them into file order.
    problems: Vec<(usize, Problem)>,
}

impl Cx<'_> {
    fn location(&self, span: Range<usize>) -> String {
        let (line, col) = self.lines.line_col(span.start);
        format!("{}:{line}:{col}", self.origin)
    }

    fn problem(
        &mut self,
        span: Range<usize>,
        rule: Option<&str>,
        key: Option<&str>,
        message: String,
    ) {
        let at = span.start;
        self.problems.push((
            at,
            Problem {
                location: self.location(span),
                rule: rule.map(str::to_owned),
                key: key.map(str::to_owned),
                message,
            },
        ));
    }

    fn unknown_key(
        &mut self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        rule: Option<&str>,
        name: &str,
        known: &[&str],
    ) {
        self.problem(
            key.span(),
            rule,
            None,
            format!(
                "unknown key `{name}` (expected one of: {})",
                known.join(", ")
            ),
        );
    }

    fn string<'v>(
        &mut self,
        v: &'v Spanned<DeValue<'_>>,
        rule: Option<&str>,
        key: &str,
    ) -> Option<&'v str> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            other => {
                self.problem(
                    v.span(),
                    rule,
                    Some(key),
                    format!(
                        "expected a string, found {} {}",
                        article(other.type_str()),
                        other.type_str()
                    ),
                );
                None
            }
        }
    }

    fn integer(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        rule: Option<&str>,
        key: &str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let DeValue::Integer(i) = v.get_ref() else {
            let t = v.get_ref().type_str();
            self.problem(
                v.span(),
                rule,
                Some(key),
                format!("expected an integer, found {} {t}", article(t)),
            );
            return None;
        };
        match i64::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.problem(
                    v.span(),
                    rule,
                    Some(key),
                    format!("must be between {min} and {max}, got {}", i.as_str()),
                );
                None
            }
        }
    }

    /// Applies a shared check to a string value, reporting its message here.
    fn checked<T>(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        rule: Option<&str>,
        key: &str,
        check: impl Fn(&str) -> Result<T, String>,
    ) -> Option<T> {
        let s = self.string(v, rule, key)?;
        match check(s) {
            Ok(t) => Some(t),
            Err(msg) => {
                self.problem(v.span(), rule, Some(key), msg);
                None
            }
        }
    }

    /// Reads one `[[proxy]]` table; `None` if anything in it was wrong.
    fn rule(
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

    /// A duration as a string ("250ms", "5s", "2m") or whole seconds.
    fn duration(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        rule: Option<&str>,
        key: &str,
    ) -> Option<std::time::Duration> {
        match v.get_ref() {
            DeValue::Integer(_) => self
                .integer(v, rule, key, 1, 86_400)
                .map(|s| std::time::Duration::from_secs(s as u64)),
            _ => self.checked(v, rule, key, parse_duration),
        }
    }

    /// A duration, or `false` for none.
    fn optional_duration(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        rule: Option<&str>,
        key: &str,
    ) -> Option<Option<std::time::Duration>> {
        match v.get_ref() {
            DeValue::Boolean(false) => Some(None),
            DeValue::Boolean(true) => {
                self.problem(
                    v.span(),
                    rule,
                    Some(key),
                    "expected a duration such as \"30m\", or false to turn it off; true is not a duration".to_owned(),
                );
                None
            }
            _ => self.duration(v, rule, key).map(Some),
        }
    }

    /// `tcp_keepalive = false`, `true` (the defaults) or
    /// `{ idle = "60s", interval = "10s", count = 6 }` (missing fields take
    /// their defaults).
    fn keepalive(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        rule: Option<&str>,
    ) -> Option<Option<Keepalive>> {
        // The kernel's limits (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT).
        const MAX_SECS: u64 = 32_767;
        const MAX_COUNT: i64 = 127;
        match v.get_ref() {
            DeValue::Boolean(false) => Some(None),
            DeValue::Boolean(true) => Some(Some(DEFAULT_TCP_KEEPALIVE)),
            DeValue::Table(t) => {
                let mut k = DEFAULT_TCP_KEEPALIVE;
                let mut ok = true;
                for (key, value) in t.iter() {
                    let name: &str = key.get_ref();
                    let full = format!("tcp_keepalive.{name}");
                    let time = match name {
                        "idle" => &mut k.idle,
                        "interval" => &mut k.interval,
                        "count" => {
                            match self.integer(value, rule, &full, 1, MAX_COUNT) {
                                Some(n) => k.count = n as u32,
                                None => ok = false,
                            }
                            continue;
                        }
                        other => {
                            self.unknown_key(
                                key,
                                rule,
                                &format!("tcp_keepalive.{other}"),
                                &["idle", "interval", "count"],
                            );
                            ok = false;
                            continue;
                        }
                    };
                    match self.duration(value, rule, &full) {
                        Some(d) if d.subsec_nanos() == 0 && d.as_secs() <= MAX_SECS => *time = d,
                        Some(d) => {
                            self.problem(
                                value.span(),
                                rule,
                                Some(&full),
                                format!(
                                    "{d:?} is not a whole number of seconds from 1s to {MAX_SECS}s (the kernel counts keepalive times in seconds)"
                                ),
                            );
                            ok = false;
                        }
                        None => ok = false,
                    }
                }
                ok.then_some(Some(k))
            }
            other => {
                let t = other.type_str();
                self.problem(
                    v.span(),
                    rule,
                    Some("tcp_keepalive"),
                    format!(
                        "expected false, true or a table such as {{ idle = \"60s\", interval = \"10s\", count = 6 }}, found {} {t}",
                        article(t)
                    ),
                );
                None
            }
        }
    }

    /// `sctp_streams = 32` (both ways) or `sctp_streams = { in = 64, out = 16 }`.
    fn streams(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        rule: Option<&str>,
    ) -> Option<crate::sctp::Streams> {
        const MAX: i64 = u16::MAX as i64;
        match v.get_ref() {
            DeValue::Integer(_) => {
                self.integer(v, rule, "sctp_streams", 1, MAX)
                    .map(|n| crate::sctp::Streams {
                        outbound: n as u16,
                        max_inbound: n as u16,
                    })
            }
            DeValue::Table(t) => {
                let mut streams = DEFAULT_SCTP_STREAMS;
                let mut ok = true;
                for (key, value) in t.iter() {
                    let k: &str = key.get_ref();
                    let field = match k {
                        "in" => &mut streams.max_inbound,
                        "out" => &mut streams.outbound,
                        other => {
                            self.unknown_key(
                                key,
                                rule,
                                &format!("sctp_streams.{other}"),
                                &["in", "out"],
                            );
                            ok = false;
                            continue;
                        }
                    };
                    match self.integer(value, rule, &format!("sctp_streams.{k}"), 1, MAX) {
                        Some(n) => *field = n as u16,
                        None => ok = false,
                    }
                }
                ok.then_some(streams)
            }
            other => {
                let t = other.type_str();
                self.problem(
                    v.span(),
                    rule,
                    Some("sctp_streams"),
                    format!(
                        "expected a stream count (1 to 65535) or a table such as {{ in = 64, out = 16 }}, found {} {t}",
                        article(t)
                    ),
                );
                None
            }
        }
    }

    /// A list of IP addresses, such as `["10.0.0.2", "fd00::2"]`.
    fn ip_list(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        rule: Option<&str>,
        key: &str,
    ) -> Option<Vec<std::net::IpAddr>> {
        let DeValue::Array(items) = v.get_ref() else {
            let t = v.get_ref().type_str();
            self.problem(
                v.span(),
                rule,
                Some(key),
                format!(
                    "expected a list of IP addresses such as [\"10.0.0.2\", \"fd00::2\"], found {} {t}",
                    article(t)
                ),
            );
            return None;
        };
        let mut out = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let k = format!("{key}[{i}]");
            match self.checked(item, rule, &k, check_sctp_addr) {
                Some(ip) if out.contains(&ip) => {
                    self.problem(item.span(), rule, Some(&k), format!("{ip} is listed twice"));
                    ok = false;
                }
                Some(ip) => out.push(ip),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    /// `netns = ["host", "ns1"]`, or a single string; each reference with
    /// where it is written.
    fn netns_list(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        rule: Option<&str>,
    ) -> Option<Vec<(NsRef, String)>> {
        let items: Vec<&Spanned<DeValue<'_>>> = match v.get_ref() {
            DeValue::Array(a) => a.iter().collect(),
            DeValue::String(_) => vec![v],
            other => {
                let t = other.type_str();
                self.problem(
                    v.span(),
                    rule,
                    Some("netns"),
                    format!(
                        "expected a list of namespaces such as [\"host\", \"ns1\"], found {} {t}",
                        article(t)
                    ),
                );
                return None;
            }
        };
        if items.is_empty() {
            self.problem(v.span(), rule, Some("netns"), "the list is empty: name at least one namespace (\"host\" for the one nsproxy runs in)".into());
            return None;
        }
        let mut out: Vec<(NsRef, String)> = Vec::new();
        // A set beside the list: lists of 10,000 namespaces are checked in
        // linear time.
        let mut seen = std::collections::HashSet::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let key = format!("netns[{i}]");
            match self.checked(item, rule, &key, check_netns) {
                Some(r) if !seen.insert(r.clone()) => {
                    self.problem(
                        item.span(),
                        rule,
                        Some(&key),
                        format!("namespace \"{r}\" is listed twice"),
                    );
                    ok = false;
                }
                Some(r) => out.push((r, self.location(item.span()))),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ProxyProtocol;

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
                "t.toml:3:1: unknown key `wrokers` (expected one of: workers, control_socket, metrics_listen, drain_timeout, proxy)",
                "t.toml:11:1: rule hello: unknown key `listen_port` (expected one of: name, protocol, listen, netns, upstream, upstream_netns, connect_timeout, backlog, max_connections, proxy_protocol, udp_idle_timeout, udp_max_sessions, idle_timeout, half_close_timeout, tcp_keepalive, on_netns_delete, sctp_streams, sctp_listen_addrs, sctp_upstream_addrs, sctp_source_addrs)",
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
            vec![
                "t.toml:10:19: rule hello: `max_connections`: must be between 1 and 1000000, got 0"
            ]
        );
        assert_eq!(
            problems(&capped("\"many\"")),
            vec![
                "t.toml:10:19: rule hello: `max_connections`: expected an integer, found a string"
            ]
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
        let ips = |v: &[&str]| -> Vec<std::net::IpAddr> {
            v.iter().map(|s| s.parse().unwrap()).collect()
        };
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
}

#[cfg(test)]
mod props {
    use std::fmt::Write as _;
    use std::net::{IpAddr, SocketAddr};
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;
    use crate::config::ProxyProtocol;
    use crate::config::strategies::{ip, ns_ref};
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

    fn unicast() -> impl Strategy<Value = IpAddr> {
        ip().prop_filter("one unicast address", |a| {
            !a.is_unspecified() && !a.is_multicast()
        })
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
                    let mut extra = Vec::new();
                    // Every key not set below keeps the default the parser
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
                    let (connect, backlog, max_conn, pp) = tcp;
                    let (idle, sessions, on_delete, streams, addrs) = udp;
                    if protocol != Protocol::Udp {
                        if let Some((d, s)) = connect {
                            rule.connect_timeout = d;
                            extra.push(format!("connect_timeout = {s}"));
                        }
                        if let Some(b) = backlog {
                            rule.backlog = b;
                            extra.push(format!("backlog = {b}"));
                        }
                        if let Some(m) = max_conn {
                            rule.max_connections = Some(m);
                            extra.push(format!("max_connections = {m}"));
                        }
                    }
                    if let (Protocol::Tcp, Some(v)) = (protocol, pp) {
                        rule.proxy_protocol = Some(v);
                        extra.push(format!("proxy_protocol = \"{v}\""));
                    }
                    if protocol == Protocol::Udp {
                        if let Some((d, s)) = idle {
                            rule.udp_idle_timeout = d;
                            extra.push(format!("udp_idle_timeout = {s}"));
                        }
                        if let Some(n) = sessions {
                            rule.udp_max_sessions = n;
                            extra.push(format!("udp_max_sessions = {n}"));
                        }
                    }
                    if let Some(d) = on_delete {
                        rule.on_netns_delete = d;
                        extra.push(format!("on_netns_delete = \"{d}\""));
                    }
                    if protocol == Protocol::Sctp {
                        if let Some((i, o)) = streams {
                            rule.sctp_streams = Streams {
                                outbound: o,
                                max_inbound: i,
                            };
                            extra.push(format!("sctp_streams = {{ in = {i}, out = {o} }}"));
                        }
                        rule.sctp_upstream_addrs = addrs.into_iter().collect();
                        let list: Vec<String> = rule
                            .sctp_upstream_addrs
                            .iter()
                            .map(|a| format!("\"{a}\""))
                            .collect();
                        extra.push(format!("sctp_upstream_addrs = [{}]", list.join(", ")));
                    }
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
}
