//! Per-protocol settings as types, and what follows from them.
//!
//! A [`Rule`] keeps its settings flat (its readers use the fields), but each
//! per-protocol setting belongs to one group, declared once below with the
//! `settings!` macro: [`ConnSettings`] (TCP and SCTP, the protocols with
//! connections), [`TcpSettings`], [`UdpSettings`] and [`SctpSettings`]. A
//! protocol has the groups its [`Settings`] variant holds. From that alone
//! follow:
//!
//! - which keys a rule of a protocol refuses ([`refusal`]), and the message,
//!   naming the protocols that take the key;
//! - whether two versions of a rule need a new binding
//!   ([`Rule::same_identity`]) or only a retune ([`Rule::tuning`]), from each
//!   setting's [`Kind`];
//! - which settings differ between two versions ([`Rule::changed_settings`]).
//!
//! A group's field reads the field of [`Rule`] of the same name, so a group
//! cannot name a setting `Rule` does not have.
//!
//! # Identity and tuning
//!
//! | settings | kind | why |
//! |---|---|---|
//! | `name`, `protocol`, `listen`, `upstream`, `upstream_netns` | identity | what the binding is: its listening socket and where it connects from |
//! | `backlog`, `sctp_streams`, `sctp_listen_addrs` | identity | set on the listening socket when it is made |
//! | `connect_timeout`, `sctp_upstream_addrs`, `sctp_source_addrs` | identity | read by the relay from the rule the binding was opened with |
//! | `udp_idle_timeout`, `udp_max_sessions` | identity | likewise, by the UDP session table |
//! | `upstream_source` | identity | decides the kind of upstream socket (made with `IP_TRANSPARENT`, bound to the client) |
//! | `on_netns_delete` | identity | as the reload has always had it; the server reads it from its entry's rule when a namespace goes, so it could become tuning |
//! | `max_connections`, `idle_timeout`, `proxy_protocol`, `half_close_timeout`, `tcp_keepalive` | tuning | the binding keeps them in atomics that the accept loop and open connections read again ([`Tuning`]) |
//! | `netns`, `origin` | neither | a binding is one entry of `netns`; `origin` is where the rule is written |

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

mod change;

pub use change::Tuning;

use super::{
    DEFAULT_BACKLOG, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HALF_CLOSE_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_SCTP_STREAMS, DEFAULT_TCP_KEEPALIVE, DEFAULT_UDP_IDLE_TIMEOUT,
    DEFAULT_UDP_MAX_SESSIONS, Keepalive, Protocol, ProxyProtocol, Rule, UpstreamSource,
};
use crate::sctp::Streams;

/// What a change of a setting does to a running binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The binding is replaced: closed gracefully and opened anew. Either
    /// the setting shapes the socket (`backlog`, the SCTP addresses and
    /// streams), or the relay reads it from the rule the binding was opened
    /// with (`connect_timeout`, the UDP session settings).
    Identity,
    /// The running binding takes it in place ([`Tuning`]): listeners and
    /// open connections are kept.
    Tuning,
}

/// One key of a settings group, as written in a `[[proxy]]` table (the
/// same name as its field of [`Rule`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingKey {
    pub name: &'static str,
    pub kind: Kind,
    /// Why rules of the protocols without this group have no such key, for
    /// the message that refuses it there.
    pub elsewhere: &'static str,
}

/// Declares a settings group: the struct, its [`SettingKey`]s, and the
/// functions that read its fields out of a [`Rule`], write them back and
/// compare them, all from the one list of fields. Each field is written
/// `pub NAME: TYPE => KIND, "why other protocols have no such key";`, KIND
/// being `identity` or `tuning` ([`Kind`]).
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[doc = $doc:expr])*
                pub $field:ident: $ty:ty => $kind:ident, $why:literal;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl $name {
            /// The group's keys, in declaration order.
            pub const KEYS: &'static [SettingKey] = &[$(SettingKey {
                name: stringify!($field),
                kind: settings!(@kind $kind),
                elsewhere: $why,
            }),*];

            /// The group's values in `rule`.
            pub fn of(rule: &Rule) -> Self {
                Self { $($field: rule.$field.clone()),* }
            }

            /// Sets the group's fields of `rule` to these values.
            pub fn write_to(self, rule: &mut Rule) {
                $(rule.$field = self.$field;)*
            }

            /// Appends the group's keys whose values differ between `a`
            /// and `b`, without copying either.
            fn differing(a: &Rule, b: &Rule, out: &mut Vec<&'static SettingKey>) {
                for (key, same) in Self::KEYS.iter().zip([$(a.$field == b.$field),*]) {
                    if !same {
                        out.push(key);
                    }
                }
            }
        }
    };
    (@kind identity) => { Kind::Identity };
    (@kind tuning) => { Kind::Tuning };
}

settings! {
    /// TCP and SCTP: the settings of protocols with connections
    /// (associations), a handshake and a listen queue.
    pub struct ConnSettings {
        /// How long an upstream connect may take before the client is dropped.
        pub connect_timeout: Duration => identity, "a UDP upstream socket is connected without a handshake";
        /// `listen(2)` backlog.
        pub backlog: u32 => identity, "UDP has no listen queue";
        /// Most connections open at once per namespace; `None`: no cap.
        pub max_connections: Option<usize> => tuning, "UDP caps sessions with udp_max_sessions";
        /// A connection silent both ways this long is reset; `None`: never.
        pub idle_timeout: Option<Duration> => tuning, "UDP sessions end after udp_idle_timeout";
    }
}

settings! {
    /// TCP only.
    pub struct TcpSettings {
        /// The PROXY protocol header upstream connections start with.
        pub proxy_protocol: Option<ProxyProtocol> => tuning, "nsproxy sends PROXY protocol headers on TCP connections only";
        /// How long a half-closed connection may be silent; `None`: for ever.
        pub half_close_timeout: Option<Duration> => tuning, "only TCP has half-closed connections";
        /// Keepalive probes on both legs; `None`: off.
        pub tcp_keepalive: Option<Keepalive> => tuning, "keepalive probes are TCP's";
        /// Whose address upstream connections come from.
        pub upstream_source: UpstreamSource => identity, "Linux SCTP has no IP_TRANSPARENT: an association cannot be bound to the client's address";
    }
}

settings! {
    /// UDP only: sessions, which UDP has instead of connections.
    pub struct UdpSettings {
        /// A session silent both ways this long ends.
        pub udp_idle_timeout: Duration => identity, "connections and associations have idle_timeout";
        /// Most sessions at once per namespace.
        pub udp_max_sessions: usize => identity, "connections and associations are capped with max_connections";
        /// Whose address upstream sessions come from.
        pub upstream_source: UpstreamSource => identity, "Linux SCTP has no IP_TRANSPARENT: an association cannot be bound to the client's address";
    }
}

settings! {
    /// SCTP only: streams and multi-homing.
    pub struct SctpSettings {
        /// The stream counts both legs ask for.
        pub sctp_streams: Streams => identity, "only SCTP has streams";
        /// More local addresses the listener binds.
        pub sctp_listen_addrs: Vec<IpAddr> => identity, "only SCTP is multi-homed";
        /// More addresses of the upstream.
        pub sctp_upstream_addrs: Vec<IpAddr> => identity, "only SCTP is multi-homed";
        /// Local addresses upstream associations bind.
        pub sctp_source_addrs: Vec<IpAddr> => identity, "only SCTP is multi-homed";
    }
}

impl Default for ConnSettings {
    fn default() -> Self {
        ConnSettings {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            backlog: DEFAULT_BACKLOG,
            max_connections: None,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
        }
    }
}

impl Default for TcpSettings {
    fn default() -> Self {
        TcpSettings {
            proxy_protocol: None,
            half_close_timeout: Some(DEFAULT_HALF_CLOSE_TIMEOUT),
            tcp_keepalive: Some(DEFAULT_TCP_KEEPALIVE),
            upstream_source: UpstreamSource::Proxy,
        }
    }
}

impl Default for UdpSettings {
    fn default() -> Self {
        UdpSettings {
            udp_idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
            udp_max_sessions: DEFAULT_UDP_MAX_SESSIONS,
            upstream_source: UpstreamSource::Proxy,
        }
    }
}

impl Default for SctpSettings {
    fn default() -> Self {
        SctpSettings {
            sctp_streams: DEFAULT_SCTP_STREAMS,
            sctp_listen_addrs: Vec::new(),
            sctp_upstream_addrs: Vec::new(),
            sctp_source_addrs: Vec::new(),
        }
    }
}

/// A rule's protocol with the settings groups it has: the one place that
/// says which protocol has which group.
#[derive(Debug, Clone, PartialEq)]
pub enum Settings {
    Tcp {
        conn: ConnSettings,
        tcp: TcpSettings,
    },
    Udp(UdpSettings),
    Sctp {
        conn: ConnSettings,
        sctp: SctpSettings,
    },
}

impl Settings {
    /// Every group of `protocol` at its defaults.
    pub fn defaults(protocol: Protocol) -> Settings {
        match protocol {
            Protocol::Tcp => Settings::Tcp {
                conn: ConnSettings::default(),
                tcp: TcpSettings::default(),
            },
            Protocol::Udp => Settings::Udp(UdpSettings::default()),
            Protocol::Sctp => Settings::Sctp {
                conn: ConnSettings::default(),
                sctp: SctpSettings::default(),
            },
        }
    }

    /// The groups of `rule`'s protocol, with its values.
    pub fn of(rule: &Rule) -> Settings {
        match rule.protocol {
            Protocol::Tcp => Settings::Tcp {
                conn: ConnSettings::of(rule),
                tcp: TcpSettings::of(rule),
            },
            Protocol::Udp => Settings::Udp(UdpSettings::of(rule)),
            Protocol::Sctp => Settings::Sctp {
                conn: ConnSettings::of(rule),
                sctp: SctpSettings::of(rule),
            },
        }
    }

    pub fn protocol(&self) -> Protocol {
        match self {
            Settings::Tcp { .. } => Protocol::Tcp,
            Settings::Udp(_) => Protocol::Udp,
            Settings::Sctp { .. } => Protocol::Sctp,
        }
    }

    /// The keys of the groups this variant holds, group by group.
    pub fn keys(&self) -> Vec<&'static SettingKey> {
        // Each variant destructured in full, so that a group added to one
        // is a binding here, which unused would fail the build.
        let groups: &[&[SettingKey]] = match self {
            Settings::Tcp { conn, tcp } => &[keys_of(conn), keys_of(tcp)],
            Settings::Udp(udp) => &[keys_of(udp)],
            Settings::Sctp { conn, sctp } => &[keys_of(conn), keys_of(sctp)],
        };
        groups.iter().flat_map(|g| g.iter()).collect()
    }

    /// Sets `rule`'s protocol and the fields of these groups; the fields of
    /// other protocols' groups are left as they are.
    pub fn write_to(self, rule: &mut Rule) {
        rule.protocol = self.protocol();
        match self {
            Settings::Tcp { conn, tcp } => {
                conn.write_to(rule);
                tcp.write_to(rule);
            }
            Settings::Udp(udp) => udp.write_to(rule),
            Settings::Sctp { conn, sctp } => {
                conn.write_to(rule);
                sctp.write_to(rule);
            }
        }
    }

    /// Appends the keys of `a`'s protocol's groups whose values differ in `b`.
    fn differing(a: &Rule, b: &Rule, out: &mut Vec<&'static SettingKey>) {
        match a.protocol {
            Protocol::Tcp => {
                ConnSettings::differing(a, b, out);
                TcpSettings::differing(a, b, out);
            }
            Protocol::Udp => UdpSettings::differing(a, b, out),
            Protocol::Sctp => {
                ConnSettings::differing(a, b, out);
                SctpSettings::differing(a, b, out);
            }
        }
    }
}

/// The keys of a group, from the type of a value of it.
fn keys_of<G: Group>(_: &G) -> &'static [SettingKey] {
    G::KEYS
}

/// A settings group, for [`keys_of`].
trait Group {
    const KEYS: &'static [SettingKey];
}

impl Group for ConnSettings {
    const KEYS: &'static [SettingKey] = ConnSettings::KEYS;
}
impl Group for TcpSettings {
    const KEYS: &'static [SettingKey] = TcpSettings::KEYS;
}
impl Group for UdpSettings {
    const KEYS: &'static [SettingKey] = UdpSettings::KEYS;
}
impl Group for SctpSettings {
    const KEYS: &'static [SettingKey] = SctpSettings::KEYS;
}

impl Protocol {
    /// Every protocol, in the order messages list them.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// Whether a rule of this protocol takes the per-protocol key `key`.
    pub fn takes(self, key: &str) -> bool {
        protocol_keys(self).iter().any(|k| k.name == key)
    }
}

/// The keys of a protocol's groups, listed once: the front end asks for
/// every key of every rule, and a list per question made loading a
/// generated config of thousands of rules spend a fifth of its time here.
fn protocol_keys(protocol: Protocol) -> &'static [&'static SettingKey] {
    static KEYS: std::sync::OnceLock<[Vec<&'static SettingKey>; 3]> = std::sync::OnceLock::new();
    let all = KEYS.get_or_init(|| Protocol::ALL.map(|p| Settings::defaults(p).keys()));
    let i = Protocol::ALL
        .iter()
        .position(|p| *p == protocol)
        .expect("Protocol::ALL lists every protocol");
    &all[i]
}

/// [`all_keys`], made once.
fn key_table() -> &'static [&'static SettingKey] {
    static TABLE: std::sync::OnceLock<Vec<&'static SettingKey>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut keys: Vec<&'static SettingKey> = Vec::new();
        for p in Protocol::ALL {
            for k in protocol_keys(p) {
                if !keys.iter().any(|seen| seen.name == k.name) {
                    keys.push(k);
                }
            }
        }
        keys
    })
}

/// A per-protocol key written in a rule of a protocol without it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub key: &'static SettingKey,
    /// The rule's protocol.
    pub protocol: Protocol,
    /// The protocols that take the key.
    pub only: Vec<Protocol>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let only: Vec<String> = self.only.iter().map(ToString::to_string).collect();
        write!(
            f,
            "only applies to {} rules, and this rule is {} ({}): remove it",
            only.join(" and "),
            self.protocol,
            self.key.elsewhere
        )
    }
}

impl std::error::Error for Refusal {}

/// Every per-protocol key, each once, in the order of [`Protocol::ALL`]'s
/// groups.
pub fn all_keys() -> Vec<&'static SettingKey> {
    key_table().to_vec()
}

/// Whether a rule of `protocol` refuses `key`, and why: `Err` for a key of
/// another protocol's group. Keys of no group (the ones every rule has, and
/// unknown ones) are the front end's to judge, and pass here.
pub fn refusal(protocol: Protocol, key: &str) -> Result<(), Refusal> {
    let Some(setting) = key_table().iter().copied().find(|k| k.name == key) else {
        return Ok(());
    };
    if protocol.takes(key) {
        return Ok(());
    }
    Err(Refusal {
        key: setting,
        protocol,
        only: Protocol::ALL.into_iter().filter(|p| p.takes(key)).collect(),
    })
}

#[cfg(test)]
mod tests;
