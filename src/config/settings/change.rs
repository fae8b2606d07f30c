//! What differs between two versions of a rule, and what of that a
//! running binding takes in place.

use std::fmt;
use std::time::Duration;

use super::{Kind, SettingKey, Settings};
use crate::config::{Keepalive, ProxyProtocol, Rule};

/// The settings a running binding takes in place, without reopening its
/// listener (`Binding::retune`): a raised cap lets clients waiting in the
/// backlog in at once, new connections get the new header and keepalive,
/// open ones the new timeouts at their next check.
///
/// Flat over the protocols, as the binding keeps them: a rule of a protocol
/// without one of these keys has its default (which nothing reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub max_connections: Option<usize>,
    pub proxy_protocol: Option<ProxyProtocol>,
    pub idle_timeout: Option<Duration>,
    pub half_close_timeout: Option<Duration>,
    pub tcp_keepalive: Option<Keepalive>,
}

impl Tuning {
    /// The keys, which are the settings of [`Kind::Tuning`].
    pub const KEYS: [&'static str; 5] = [
        "max_connections",
        "proxy_protocol",
        "idle_timeout",
        "half_close_timeout",
        "tcp_keepalive",
    ];
}

/// As the reload log line has it: "max_connections none, proxy_protocol
/// off, idle_timeout 3600s, half_close_timeout 60s and tcp_keepalive idle
/// 60s, interval 10s, count 6".
impl fmt::Display for Tuning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let off = |d: Option<Duration>| d.map_or("off".to_owned(), |d| format!("{d:?}"));
        write!(
            f,
            "max_connections {}, proxy_protocol {}, idle_timeout {}, half_close_timeout {} and tcp_keepalive {}",
            self.max_connections
                .map_or("none".to_owned(), |n| n.to_string()),
            self.proxy_protocol
                .map_or("off".to_owned(), |v| v.to_string()),
            off(self.idle_timeout),
            off(self.half_close_timeout),
            self.tcp_keepalive.map_or("off".to_owned(), |k| format!(
                "idle {:?}, interval {:?}, count {}",
                k.idle, k.interval, k.count
            )),
        )
    }
}

impl Rule {
    /// Whether a binding of this rule serves as one of `other` would, but
    /// for its [`Tuning`]: when not, a reload replaces the binding.
    ///
    /// Compared: the name, protocol, addresses, `upstream_netns`,
    /// `on_netns_delete`, and the [`Kind::Identity`] settings of the
    /// protocol's groups. Not compared: the `netns` list (a binding is one
    /// of its entries, and adding a namespace to a rule must not reopen
    /// the listeners it already has; comparing the list per binding would
    /// cost N² at N namespaces), `origin` (a moved line), and the settings
    /// of other protocols' groups (which no front end lets a rule set).
    pub fn same_identity(&self, other: &Rule) -> bool {
        // Destructured so that a new field cannot go unclassified: one a
        // group declares is `_` here (its group compares it), any other is
        // compared here or said why not.
        let Rule {
            name,
            protocol,
            listen,
            // A binding is one port of a range: its port is in `listen` and
            // `upstream`, so a port that a widened or narrowed range keeps
            // keeps its socket.
            ports: _,
            netns: _,
            upstream,
            upstream_netns,
            on_netns_delete,
            origin: _,
            connect_timeout: _,
            backlog: _,
            max_connections: _,
            proxy_protocol: _,
            upstream_source: _,
            udp_idle_timeout: _,
            idle_timeout: _,
            half_close_timeout: _,
            tcp_keepalive: _,
            udp_max_sessions: _,
            sctp_streams: _,
            sctp_listen_addrs: _,
            sctp_upstream_addrs: _,
            sctp_source_addrs: _,
        } = self;
        *name == other.name
            && *protocol == other.protocol
            && *listen == other.listen
            && *upstream == other.upstream
            && *upstream_netns == other.upstream_netns
            && *on_netns_delete == other.on_netns_delete
            && self
                .changed_settings(other)
                .iter()
                .all(|k| k.kind == Kind::Tuning)
    }

    /// The settings a running binding of this rule retunes in place.
    pub fn tuning(&self) -> Tuning {
        Tuning {
            max_connections: self.max_connections,
            proxy_protocol: self.proxy_protocol,
            idle_timeout: self.idle_timeout,
            half_close_timeout: self.half_close_timeout,
            tcp_keepalive: self.tcp_keepalive,
        }
    }

    /// The keys of this rule's protocol's groups whose values differ in
    /// `other`, in declaration order.
    pub fn changed_settings(&self, other: &Rule) -> Vec<&'static SettingKey> {
        let mut out = Vec::new();
        Settings::differing(self, other, &mut out);
        out
    }

    /// This rule's protocol's settings, as groups.
    pub fn settings(&self) -> Settings {
        Settings::of(self)
    }
}
