//! The configuration: what to listen on, where, and where to forward to.
//!
//! Two front ends produce the same [`Config`]: a TOML file ([`load`],
//! [`parse_toml`]) and the one-line command-line form ([`parse_forward`]).
//! Both check every value with the same functions and report *every* problem
//! at once, each naming where it is (file:line:column or argument), the rule
//! and the key, and quoting the offending value.
//!
//! # Layout
//!
//! - this module: [`Config`], [`Rule`] and the value types, [`load`];
//! - [`settings`]: the per-protocol settings groups, from which the refused
//!   keys and what a reload changes in place ([`Rule::same_identity`],
//!   [`Rule::tuning`]) follow;
//! - `values`: the value checks both front ends share, and the cross-rule
//!   checks;
//! - `file`: the TOML front end ([`parse_toml`]); `forward`: the one-line
//!   form ([`parse_forward`]);
//! - `ports`: port ranges ([`PortRange`]) and the one rule per port that
//!   bindings run ([`Rule::per_port`]);
//! - [`check`]: what `nsproxy check` says about the namespaces a config
//!   names.

pub mod check;
mod file;
mod forward;
mod ports;
pub mod settings;
#[cfg(test)]
mod strategies;
mod values;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::netns::NsRef;
use crate::sctp::Streams;

pub use file::{RuleLocations, parse_toml, parse_toml_located};
pub use forward::{FORWARD_SYNTAX, parse_forward, set_connect_timeout};
pub use ports::PortRange;
pub use settings::{
    ConnSettings, Kind, SctpSettings, SettingKey, Settings, TcpSettings, Tuning, UdpSettings,
};
pub(crate) use values::*;
pub use values::{check_user, parse_duration};

/// Default for [`Rule::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`Rule::backlog`].
pub const DEFAULT_BACKLOG: u32 = 1024;
/// Default for [`Rule::udp_idle_timeout`].
///
/// UDP has no end-of-session signal, so a session ends after this long
/// without a datagram in either direction. A minute outlasts the retries of
/// request/response protocols (DNS, NTP, RADIUS) and the keepalives of
/// tunnels (WireGuard sends one every 25 s), so a live exchange keeps its
/// session (and its upstream source port); it is still short enough that
/// one-shot clients do not hold an fd each for long. Linux conntrack uses
/// 30 s for one-way UDP flows and 120 s for two-way ones; this sits between.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`Rule::udp_max_sessions`]. Each session holds one fd (its
/// upstream socket), a task and a small queue. 10 000 per binding is room
/// for busy request/response traffic, while a client sweeping source ports
/// cannot take every fd nsproxy has (the hard `RLIMIT_NOFILE`, which nsproxy
/// raises itself to; lower the cap where that limit is small).
pub const DEFAULT_UDP_MAX_SESSIONS: usize = 10_000;
/// Largest accepted `udp_max_sessions`.
pub const MAX_UDP_SESSIONS: usize = 1_000_000;
/// Largest accepted `max_connections`.
pub const MAX_CONNECTIONS: usize = 1_000_000;
/// Default for [`Rule::sctp_streams`]: 65535 each way, the protocol's
/// maximum, as the reference deployment used. An association gets the
/// smaller of what each end offers, so this never limits a peer; the
/// kernel's own default (10 outbound) breaks peers that use higher stream
/// ids. The kernel sets up state for every stream an association ends up
/// with, so lower it where many associations with few streams are relayed.
pub const DEFAULT_SCTP_STREAMS: Streams = Streams::MAX;
/// Default for [`Rule::idle_timeout`]: an hour, as Envoy's tcp_proxy
/// `idle_timeout`. A peer that vanished without a FIN or RST (its namespace's
/// veth gone, a NAT or conntrack entry expired, a hostile client) otherwise
/// holds two fds, a task and buffers for ever; an hour is far beyond the
/// silences of interactive protocols that keep no keepalive of their own,
/// and keepalive ([`DEFAULT_TCP_KEEPALIVE`]) finds dead TCP peers sooner.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default for [`Rule::half_close_timeout`]: a minute, as Linux's own
/// `net.ipv4.tcp_fin_timeout` for an orphaned FIN-WAIT-2 socket. Like
/// HAProxy's `timeout client-fin`/`server-fin` it counts silence, so a
/// download after a client's FIN (request sent, then `shutdown`) goes on as
/// long as it moves; only a half-closed connection where nothing moves is
/// ended (the CLOSE-WAIT and FIN-WAIT-2 leak of istio/ztunnel#1629).
pub const DEFAULT_HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default for [`Rule::tcp_keepalive`]: a probe after 60 s of silence, then
/// every 10 s, 6 unanswered ones end the connection. A peer that vanished is
/// found within two minutes rather than the kernel's default of over two
/// hours (7200 s + 9 × 75 s), at the cost of one small segment a minute on a
/// silent connection.
pub const DEFAULT_TCP_KEEPALIVE: Keepalive = Keepalive {
    idle: Duration::from_secs(60),
    interval: Duration::from_secs(10),
    count: 6,
};

/// `tcp_keepalive`: TCP keepalive probes on both legs of a connection
/// (`SO_KEEPALIVE`, `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Silence before the first probe.
    pub idle: Duration,
    /// Between unanswered probes.
    pub interval: Duration,
    /// Unanswered probes before the kernel ends the connection.
    pub count: u32,
}

/// Largest accepted `workers` value; more threads than this only cost memory.
pub const MAX_WORKERS: usize = 256;

/// A whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Forwarding threads; `None` means one per CPU.
    pub workers: Option<usize>,
    /// The control API's unix socket; `None` means the default
    /// ([`crate::control::DEFAULT_SOCKET`]), an empty path turns it off.
    pub control_socket: Option<PathBuf>,
    /// Where Prometheus metrics are served (in the home namespace); off when `None`.
    pub metrics_listen: Option<SocketAddr>,
    /// How long connections may take to finish when their listener closes
    /// gracefully; `None` means the default of 5 s.
    pub drain_timeout: Option<Duration>,
    /// The account the relay runs as when nsproxy starts as root; `None`
    /// means `nobody`, `"root"` keeps one privileged process (see the
    /// README's Security section).
    pub user: Option<String>,
    pub rules: Vec<Rule>,
}

/// One forwarding rule: listen on `listen` in every namespace of `netns`,
/// forward each connection to `upstream` from inside `upstream_netns`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Unique; names the rule in logs, status and metrics.
    pub name: String,
    pub protocol: Protocol,
    /// The address to bind inside each listen namespace; with a port
    /// range, its first port (or, in a binding's rule, its port).
    pub listen: SocketAddr,
    /// `listen` is a port range: one binding per port. A
    /// [`Binding`](crate::proxy::Binding) serves one port, that of its
    /// rule's `listen`: make bindings from [`Rule::per_port`] (the server
    /// does). `None`: one port.
    pub ports: Option<PortRange>,
    /// The namespaces to listen in; no two entries are textually equal.
    pub netns: Vec<NsRef>,
    pub upstream: SocketAddr,
    /// The namespace upstream connections are made from.
    pub upstream_netns: NsRef,
    /// How long an upstream connect may take before the client is dropped.
    pub connect_timeout: Duration,
    /// `listen(2)` backlog.
    pub backlog: u32,
    /// TCP, SCTP: most connections (associations) open at once in each
    /// namespace the rule listens in; at the cap the listener stops
    /// accepting and further clients wait in its backlog. `None`: no cap.
    pub max_connections: Option<usize>,
    /// TCP: the PROXY protocol header sent to the upstream before any data,
    /// telling it the client's address, the address the client connected
    /// to and (v2) the listen namespace. `None`: no header.
    pub proxy_protocol: Option<ProxyProtocol>,
    /// TCP, UDP: the source address of upstream connections (sessions):
    /// nsproxy's own in `upstream_netns`, or the client's (bound with
    /// `IP_TRANSPARENT`).
    pub upstream_source: UpstreamSource,
    /// UDP: a client's session ends after this long without a datagram in
    /// either direction.
    pub udp_idle_timeout: Duration,
    /// TCP, SCTP: a connection (association) that moved no byte (message)
    /// in either direction for this long is closed, both legs reset
    /// (aborted). `None`: never.
    pub idle_timeout: Option<Duration>,
    /// TCP: once one side has sent FIN, the other direction may stay open
    /// as long as it is never silent for this long; then both legs are
    /// reset. `None`: as long as it likes.
    pub half_close_timeout: Option<Duration>,
    /// TCP: keepalive probes on both legs; `None`: off.
    pub tcp_keepalive: Option<Keepalive>,
    /// UDP: most client sessions at once in each namespace the rule listens
    /// in; datagrams from further new clients are dropped and counted.
    pub udp_max_sessions: usize,
    /// What happens to connections and sessions when a namespace the rule
    /// listens in (or connects from) is deleted.
    pub on_netns_delete: OnDelete,
    /// SCTP: the stream counts both legs ask for (`SCTP_INITMSG`).
    pub sctp_streams: Streams,
    /// SCTP: more local addresses the listener binds besides `listen`'s
    /// (multi-homing, `sctp_bindx`), with `listen`'s port. Only these and
    /// `listen` are advertised to clients.
    pub sctp_listen_addrs: Vec<IpAddr>,
    /// SCTP: more addresses of the upstream besides `upstream`'s, with its
    /// port (multi-homing, `sctp_connectx`).
    pub sctp_upstream_addrs: Vec<IpAddr>,
    /// SCTP: local addresses upstream associations bind in `upstream_netns`.
    /// Empty: the kernel binds, and advertises to the upstream, every
    /// address of that namespace.
    pub sctp_source_addrs: Vec<IpAddr>,
    /// Where the rule was written ("nsproxy.toml:12" or "argument 1"), for messages.
    pub origin: String,
}

impl Rule {
    /// A rule with `settings` for its protocol, every other protocol's
    /// settings at their defaults (which nothing reads), and the default
    /// `on_netns_delete`.
    pub fn new(
        name: String,
        listen: SocketAddr,
        netns: Vec<NsRef>,
        upstream: SocketAddr,
        upstream_netns: NsRef,
        settings: Settings,
        origin: String,
    ) -> Rule {
        let (conn, tcp) = (ConnSettings::default(), TcpSettings::default());
        let (udp, sctp) = (UdpSettings::default(), SctpSettings::default());
        let mut rule = Rule {
            name,
            protocol: settings.protocol(),
            listen,
            ports: None,
            netns,
            upstream,
            upstream_netns,
            connect_timeout: conn.connect_timeout,
            backlog: conn.backlog,
            max_connections: conn.max_connections,
            proxy_protocol: tcp.proxy_protocol,
            upstream_source: tcp.upstream_source,
            udp_idle_timeout: udp.udp_idle_timeout,
            idle_timeout: conn.idle_timeout,
            half_close_timeout: tcp.half_close_timeout,
            tcp_keepalive: tcp.tcp_keepalive,
            udp_max_sessions: udp.udp_max_sessions,
            on_netns_delete: OnDelete::default(),
            sctp_streams: sctp.sctp_streams,
            sctp_listen_addrs: sctp.sctp_listen_addrs,
            sctp_upstream_addrs: sctp.sctp_upstream_addrs,
            sctp_source_addrs: sctp.sctp_source_addrs,
            origin,
        };
        settings.write_to(&mut rule);
        rule
    }

    /// Where `r` stands in [`Rule::netns`]: its own position, or for a name
    /// that only a pattern names, the position of the first pattern that
    /// matches it. When several references of a rule turn out to be one
    /// namespace, the one listed first is the one to listen as (it is the
    /// name in PROXY v2 headers, metric labels and status). `None` when the
    /// rule does not name `r` at all.
    pub fn rank(&self, r: &NsRef) -> Option<usize> {
        self.netns
            .iter()
            .position(|n| n == r)
            .or_else(|| self.netns.iter().position(|n| n.matches_ref(r)))
    }
}

/// `proxy_protocol`: which PROXY protocol header upstream connections start
/// with (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyProtocol {
    /// The text header: `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`.
    V1,
    /// The binary header, with the listen namespace in a `PP2_TYPE_NETNS`
    /// TLV.
    V2,
}

impl fmt::Display for ProxyProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        })
    }
}

/// `upstream_source`: which address upstream connections and sessions come
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamSource {
    /// nsproxy's own address in `upstream_netns`, as the kernel picks it
    /// (the default).
    #[default]
    Proxy,
    /// The client's address and port: the upstream socket is made with
    /// `IP_TRANSPARENT` (`IPV6_TRANSPARENT`) and bound to them before it
    /// connects. Replies reach it only through policy routing in the
    /// upstream namespace (see the README).
    Client,
}

impl UpstreamSource {
    /// Whether upstream sockets are bound to the client's address.
    pub fn is_client(self) -> bool {
        self == UpstreamSource::Client
    }
}

impl fmt::Display for UpstreamSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UpstreamSource::Proxy => "proxy",
            UpstreamSource::Client => "client",
        })
    }
}

/// `on_netns_delete`: what a deleted namespace does to open connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnDelete {
    /// Close the listener and every connection and session at once, so that
    /// nothing of nsproxy's keeps the namespace alive (the default).
    #[default]
    Close,
    /// Close the listener; let connections finish for up to the drain
    /// timeout. They keep the namespace alive until they end.
    Drain,
}

impl fmt::Display for OnDelete {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnDelete::Close => "close",
            OnDelete::Drain => "drain",
        })
    }
}

/// The transport a rule proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        })
    }
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `FILE:LINE:COLUMN`, or `argument N` for the command-line form.
    pub location: String,
    /// The rule's name (or `#N` when it has none yet).
    pub rule: Option<String>,
    /// The key, such as `listen` or `netns[2]`.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.location)?;
        if let Some(rule) = &self.rule {
            write!(f, "rule {rule}: ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "`{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", list(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The individual problems (empty for a read error).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
            ConfigError::Read { .. } => &[],
        }
    }
}

fn list(problems: &[Problem]) -> String {
    let n = problems.len();
    let mut s = format!(
        "invalid configuration ({n} problem{}):",
        if n == 1 { "" } else { "s" }
    );
    for p in problems {
        s.push_str("\n  ");
        s.push_str(&p.to_string());
    }
    s
}

/// Reads and checks a TOML config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_file(path)?;
    parse_toml(&text, &path.display().to_string())
}

/// A config file's text, read as [`load`] reads it (never waiting on a
/// FIFO or device), for a caller that parses it itself ([`parse_toml`]).
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    read_file(path)
}

/// Reads a config file without ever waiting on it: opened with `O_NONBLOCK`
/// (which does nothing to a regular file) and refused unless it is one, so
/// a FIFO or device named as the config fails at once instead of stalling
/// `check`, start-up or a reload (which reads on a worker thread).
fn read_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let fail = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(fail)?;
    let t = f.metadata().map_err(fail)?.file_type();
    if !t.is_file() {
        let kind = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else {
            "a device"
        };
        return Err(fail(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {kind}, not a regular file"),
        )));
    }
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(fail)?;
    Ok(text)
}

/// Like [`load`], and also where each rule's namespace references are
/// written ([`parse_toml_located`]).
pub fn load_located(path: &Path) -> Result<(Config, Vec<RuleLocations>), ConfigError> {
    let text = read_file(path)?;
    parse_toml_located(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_listed_reference_ranks_first() {
        let rule = parse_forward(
            &["tcp:[::]:80@tenant-*,pid:335,ns1,t*=127.0.0.1:9".into()],
            None,
        )
        .unwrap()
        .rules
        .remove(0);
        let named = |n: &str| NsRef::Named(n.into());
        assert_eq!(rule.rank(&named("tenant-1")), Some(0));
        assert_eq!(rule.rank(&NsRef::Pid(335)), Some(1));
        assert_eq!(rule.rank(&named("ns1")), Some(2));
        assert_eq!(rule.rank(&named("tx")), Some(3));
        assert_eq!(rule.rank(&NsRef::Pid(1)), None);
        assert_eq!(rule.rank(&named("other")), None);
    }
}
