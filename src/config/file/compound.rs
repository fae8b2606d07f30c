//! The values that are lists or tables: `netns`, the SCTP address lists,
//! `tcp_keepalive` and `sctp_streams`.

use toml::Spanned;
use toml::de::DeValue;

use super::cx::{Cx, article};
use crate::config::{
    DEFAULT_SCTP_STREAMS, DEFAULT_TCP_KEEPALIVE, Keepalive, check_netns, check_sctp_addr,
};
use crate::netns::NsRef;

impl Cx<'_> {
    /// `tcp_keepalive = false`, `true` (the defaults) or
    /// `{ idle = "60s", interval = "10s", count = 6 }` (missing fields take
    /// their defaults).
    pub(super) fn keepalive(
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
    pub(super) fn streams(
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
    pub(super) fn ip_list(
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
    pub(super) fn netns_list(
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
