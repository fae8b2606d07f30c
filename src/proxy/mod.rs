//! Listeners and relays, one module per protocol: [`tcp`] (a relay per
//! connection), [`udp`] (a session per client address; its raw
//! `recvmmsg`/`sendmmsg` calls live in the syscall layer, `sys::udp`) and
//! [`sctp`] (a message relay per association, over [`crate::sctp`]).
//!
//! Everything here works on a [`Binding`]: one rule in one namespace, with the
//! sockets already resolved to namespace identities. Sockets come from the
//! [`Switcher`]; nothing here switches namespaces.

mod accept;
pub(crate) mod catch;
mod park;
mod proxy_header;
mod relay;
mod report;
pub mod sctp;
pub(crate) mod source;
mod splice;
mod stats;
pub mod tcp;
mod timeout;
mod trim;
pub mod udp;

pub(crate) use source::upstream_spec;
pub use stats::{BindingStats, ConnStats, SctpStats, TcpStats, UdpStats};

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tracing::Instrument;

use crate::config::{Keepalive, Protocol, ProxyProtocol, Rule};
#[cfg(any(test, doc))]
use crate::netns::Switcher;
use crate::netns::{Lease, NsError, NsId, NsRef, SocketFactory, SocketFuture, SocketSpec};

// `Loss` is for the lifecycle, which tells a panicked binding (failed) from
// a lost listener (opened again).
pub(crate) use park::{Loss, Lost, Parking};

/// One rule in one namespace: the unit that listens, counts and is reported.
#[derive(Debug)]
pub struct Binding {
    pub rule: Arc<Rule>,
    /// The reference as the operator wrote it, for logs and status.
    pub netns: NsRef,
    /// The namespace the listener lives in.
    pub ns: NsId,
    /// The namespace upstream sockets are created in.
    pub upstream_ns: NsId,
    /// Where its sockets come from (the switcher, or a test's fake).
    pub sockets: Arc<dyn SocketFactory>,
    pub stats: BindingStats,
    /// Set when the binding's listener is to stop accepting.
    pub(crate) stop: Stop,
    /// Where the listening socket is parked while idle (see [`Parking`]).
    pub(crate) parked_at: AtomicUsize,
    /// The rule's `max_connections` (`usize::MAX`: none) and
    /// `proxy_protocol` (0 none, 1 v1, 2 v2), which a reload changes in
    /// place ([`Binding::retune`]): these, not `rule`'s, are in force.
    max_connections: AtomicUsize,
    proxy_protocol: AtomicU8,
    /// The rule's `idle_timeout` and `half_close_timeout` in milliseconds
    /// (0: off) and `tcp_keepalive` (packed, 0: off), also changed in place:
    /// open connections read them again at their next check.
    idle_timeout_ms: AtomicU64,
    half_close_timeout_ms: AtomicU64,
    tcp_keepalive: AtomicU64,
    /// The errno of the last failure to create an upstream socket for lack
    /// of fds or memory (0: none since the accept loop last looked), which
    /// makes the accept loop pause (see [`exhausted`]).
    exhausted: AtomicI32,
    /// Holds `upstream_ns` open while the binding exists: its listener,
    /// its last connection or session, and every handle to it. New upstream
    /// sockets need that namespace's fd until then (a closing listener's
    /// backlog is served while it drains), so it is given back only when the
    /// last holder of the binding goes. `None` for bindings made outside the
    /// server (tests).
    _upstream: Option<Lease>,
}

impl Binding {
    /// Whether the listener is parked: idle, with no task of its own.
    pub fn is_parked(&self) -> bool {
        self.parked_at.load(Ordering::SeqCst) != park::NOT_PARKED
    }

    pub(crate) fn new(
        rule: Arc<Rule>,
        netns: NsRef,
        ns: NsId,
        upstream_ns: NsId,
        sockets: Arc<dyn SocketFactory>,
        upstream: Option<Lease>,
    ) -> Binding {
        let b = Binding {
            stats: BindingStats::new(rule.protocol),
            rule,
            netns,
            ns,
            upstream_ns,
            sockets,
            stop: Stop::default(),
            parked_at: AtomicUsize::new(park::NOT_PARKED),
            max_connections: AtomicUsize::new(usize::MAX),
            proxy_protocol: AtomicU8::new(0),
            idle_timeout_ms: AtomicU64::new(0),
            half_close_timeout_ms: AtomicU64::new(0),
            tcp_keepalive: AtomicU64::new(0),
            exhausted: AtomicI32::new(0),
            _upstream: upstream,
        };
        b.set_tuning(&b.rule);
        b
    }

    /// The most connections (associations) open at once; `None`: no cap.
    pub fn max_connections(&self) -> Option<usize> {
        match self.max_connections.load(Ordering::Relaxed) {
            usize::MAX => None,
            n => Some(n),
        }
    }

    /// The PROXY protocol header new upstream connections start with.
    pub fn proxy_protocol(&self) -> Option<ProxyProtocol> {
        match self.proxy_protocol.load(Ordering::Relaxed) {
            0 => None,
            1 => Some(ProxyProtocol::V1),
            _ => Some(ProxyProtocol::V2),
        }
    }

    /// The idle and half-close limits in force.
    pub(crate) fn timeouts(&self) -> timeout::Limits {
        let ms = |a: &AtomicU64| match a.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_millis(n)),
        };
        timeout::Limits {
            idle: ms(&self.idle_timeout_ms),
            half_close: ms(&self.half_close_timeout_ms),
        }
    }

    /// The keepalive new TCP connections get on both legs.
    pub fn tcp_keepalive(&self) -> Option<Keepalive> {
        unpack_keepalive(self.tcp_keepalive.load(Ordering::Relaxed))
    }

    /// Applies `rule`'s `max_connections`, `proxy_protocol`, timeouts and
    /// keepalive to the running listener, without reopening it: a raised
    /// cap lets clients waiting in the backlog in at once, new connections
    /// get the new header and keepalive, and open connections the new
    /// timeouts at their next check.
    pub(crate) fn retune(&self, rule: &Rule) {
        self.set_tuning(rule);
        // The accept loop waits on this to read the settings again.
        self.stop.wake.notify_waiters();
    }

    fn set_tuning(&self, rule: &Rule) {
        let cap = rule.max_connections.unwrap_or(usize::MAX);
        self.max_connections.store(cap, Ordering::Relaxed);
        let pp = match rule.proxy_protocol {
            None => 0,
            Some(ProxyProtocol::V1) => 1,
            Some(ProxyProtocol::V2) => 2,
        };
        self.proxy_protocol.store(pp, Ordering::Relaxed);
        // Whole milliseconds, at least one: 0 means off.
        let ms = |d: Option<Duration>| d.map_or(0, |d| (d.as_millis() as u64).max(1));
        self.idle_timeout_ms
            .store(ms(rule.idle_timeout), Ordering::Relaxed);
        self.half_close_timeout_ms
            .store(ms(rule.half_close_timeout), Ordering::Relaxed);
        self.tcp_keepalive
            .store(pack_keepalive(rule.tcp_keepalive), Ordering::Relaxed);
    }
}

/// Connections (associations) nsproxy cut, process-wide. A cut happens only
/// once its binding's listener was told to stop, when the binding has left
/// `status` (removed, replaced, or waiting for its namespace again), so a
/// per-binding count would never be seen.
static CUT_AT_DRAIN_TIMEOUT: AtomicU64 = AtomicU64::new(0);
static CUT_AT_CLOSE: AtomicU64 = AtomicU64::new(0);

/// Connections and associations nsproxy has reset (aborted) because it
/// closed them itself, since start: `(at_drain_timeout, at_close)`.
pub fn cuts() -> (u64, u64) {
    (
        CUT_AT_DRAIN_TIMEOUT.load(Ordering::Relaxed),
        CUT_AT_CLOSE.load(Ordering::Relaxed),
    )
}

/// Set when the operator ends a shutdown's drain early (a second stop
/// signal): what is dropped from then on was cut by that, not by the drain
/// timeout its listener's stop mode would suggest.
static DRAIN_CUT_SHORT: AtomicBool = AtomicBool::new(false);

/// Set when the listening sockets live on after this process closes them:
/// a new nsproxy took them over, or systemd's fd store keeps them.
static LISTENERS_LIVE_ON: AtomicBool = AtomicBool::new(false);

/// Marks the listening sockets as living on elsewhere (a takeover, the fd
/// store): a closing listener then takes from its backlog only the
/// clients `max_connections` leaves room for, and leaves the rest to
/// whoever holds the socket next instead of resetting them.
pub fn listeners_live_on() {
    LISTENERS_LIVE_ON.store(true, Ordering::Relaxed);
}

/// Whether [`listeners_live_on`] was called.
pub(crate) fn backlog_is_kept() -> bool {
    LISTENERS_LIVE_ON.load(Ordering::Relaxed)
}

/// Marks the shutdown's drain as ended early by the operator, for the close
/// lines of the connections it cuts.
pub fn cut_drain_short() {
    DRAIN_CUT_SHORT.store(true, Ordering::Relaxed);
}

/// Why a connection's task was dropped before it ended on its own, for its
/// close line; counts it.
pub(crate) fn cut_reason(b: &Binding) -> &'static str {
    if DRAIN_CUT_SHORT.load(Ordering::Relaxed) {
        CUT_AT_CLOSE.fetch_add(1, Ordering::Relaxed);
        return "the shutdown's drain was ended early by a second stop signal";
    }
    match b.stop.mode() {
        Some(StopMode::Drain) => {
            CUT_AT_DRAIN_TIMEOUT.fetch_add(1, Ordering::Relaxed);
            "still open when its closing listener's drain timeout ran out"
        }
        Some(StopMode::Close) => {
            CUT_AT_CLOSE.fetch_add(1, Ordering::Relaxed);
            "its listener closed at once (see the listener's line for why)"
        }
        None => {
            CUT_AT_CLOSE.fetch_add(1, Ordering::Relaxed);
            "the server stopped at once"
        }
    }
}

/// Records that an upstream socket could not be created for lack of fds or
/// memory: counted here, reported (rate-limited) by the accept loop, which
/// also pauses accepting, as it does when accept(2) itself runs out.
pub(crate) fn exhausted(b: &Binding, e: &io::Error) {
    b.stats
        .conn()
        .upstream_socket_exhausted
        .fetch_add(1, Ordering::Relaxed);
    b.exhausted
        .store(e.raw_os_error().unwrap_or(libc::EMFILE), Ordering::Relaxed);
    b.stop.wake.notify_waiters();
}

/// Keepalive in one word, so that a reload changes it without a lock:
/// idle and interval seconds (at most 32767 each, the kernel's limit) and
/// the count (at most 127); 0 is off, and no valid setting packs to 0 since
/// the count is at least 1.
fn pack_keepalive(k: Option<Keepalive>) -> u64 {
    k.map_or(0, |k| {
        (k.idle.as_secs().min(0xffff) << 32)
            | (k.interval.as_secs().min(0xffff) << 16)
            | u64::from(k.count.min(0xffff))
    })
}

fn unpack_keepalive(v: u64) -> Option<Keepalive> {
    (v != 0).then(|| Keepalive {
        idle: Duration::from_secs(v >> 32),
        interval: Duration::from_secs((v >> 16) & 0xffff),
        count: (v & 0xffff) as u32,
    })
}

/// A TCP binding in nsproxy's own namespace for unit tests: listening on
/// `127.0.0.1:0`, forwarding to the discard port (where nothing listens, so
/// a served connection counts in `connect_failed`); `extra` adds rule keys.
#[cfg(test)]
pub(crate) async fn test_binding(extra: &str) -> Arc<Binding> {
    let switcher = Switcher::spawn().unwrap();
    let host = switcher.resolve(&NsRef::Host).await.unwrap();
    let toml = format!(
        "[[proxy]]\nname = \"t\"\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:0\"\nnetns = [\"host\"]\nupstream = \"127.0.0.1:9\"\n{extra}\n"
    );
    let rule = crate::config::parse_toml(&toml, "test")
        .unwrap()
        .rules
        .remove(0);
    Arc::new(Binding::new(
        Arc::new(rule),
        NsRef::Host,
        host,
        host,
        Arc::new(switcher),
        None,
    ))
}

/// Waits (bounded) until `n` connections are in TCP listener `l`'s accept
/// queue: a client's connect() may return before the listener has queued it.
#[cfg(test)]
pub(crate) async fn until_queued(l: &impl AsFd, n: u32) {
    let queued = || crate::sys::epoll::accept_queue_len(l.as_fd()).expect("TCP_INFO");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while queued() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {n} connections queued",
            queued()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// How a binding's listener stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopMode {
    /// Stop accepting; open connections get the drain timeout to finish.
    Drain,
    /// Stop accepting and close every open connection now.
    Close,
}

/// Tells a binding's listener task to stop accepting: a flag and a wake-up
/// inside the binding. (A `watch` channel per binding took 0.34 KiB more
/// each, 3 MiB at 10,000 listeners.)
#[derive(Debug, Default)]
pub(crate) struct Stop {
    /// 0: serving; else a [`StopMode`] (1 drain, 2 close). Only ever rises:
    /// a drain requested after a close (a `Live` dropped after closing it)
    /// leaves it a close.
    requested: AtomicU8,
    wake: tokio::sync::Notify,
    /// The drain timeout in force when the stop was requested, in
    /// nanoseconds plus one (0: not set): a reload may have changed it
    /// since the serve task started.
    drain: AtomicU64,
}

impl Stop {
    /// Use [`Parking::stop`], which also closes a parked socket.
    fn request(&self, mode: StopMode) {
        let v = match mode {
            StopMode::Drain => 1,
            StopMode::Close => 2,
        };
        self.requested.fetch_max(v, Ordering::SeqCst);
        self.wake.notify_waiters();
    }

    fn set_drain(&self, drain: Duration) {
        let n = u64::try_from(drain.as_nanos()).unwrap_or(u64::MAX - 1);
        self.drain.store(n.saturating_add(1), Ordering::SeqCst);
    }

    /// The drain timeout in force when the stop was requested, if it was
    /// set then ([`Parking::stop`]).
    pub(crate) fn drain(&self) -> Option<Duration> {
        match self.drain.load(Ordering::SeqCst) {
            0 => None,
            n => Some(Duration::from_nanos(n - 1)),
        }
    }

    /// How the listener was told to stop, if it was.
    pub(crate) fn mode(&self) -> Option<StopMode> {
        match self.requested.load(Ordering::SeqCst) {
            0 => None,
            1 => Some(StopMode::Drain),
            _ => Some(StopMode::Close),
        }
    }

    /// Completes at the next wake-up: a stop, or new settings
    /// ([`Binding::retune`]). Made before what it guards is read, it misses
    /// no wake-up after that.
    pub(crate) fn woken(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    /// Completes once a stop was requested, before or after.
    pub(crate) async fn requested(&self) {
        loop {
            // Made before the flag is read: a `Notified` is woken by
            // `notify_waiters` from the moment it exists, polled or not,
            // so a request between the check and the await is not lost.
            let woken = self.wake.notified();
            if self.mode().is_some() {
                return;
            }
            woken.await;
        }
    }
}

/// A binding's open listening socket, of the binding's protocol, while no
/// task serves it (a serve task registers it with the reactor).
#[derive(Debug)]
pub(crate) enum Listener {
    Tcp(std::net::TcpListener),
    Udp {
        socket: std::net::UdpSocket,
        /// The kernel's running count of drops on it, as last reported
        /// (`SO_RXQ_OVFL`), kept while parked so no drop is counted twice.
        kernel_drops: u32,
    },
    Sctp(socket2::Socket),
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Udp { socket, .. } => socket.as_fd(),
            Listener::Sctp(s) => s.as_fd(),
        }
    }
}

impl Listener {
    /// The socket `b`'s listener is made from: where and of what kind, for
    /// asking many at once (`SocketFactory::sockets`).
    pub(crate) fn spec(b: &Binding) -> (NsId, SocketSpec) {
        let addr = b.rule.listen;
        let spec = match b.rule.protocol {
            Protocol::Tcp => SocketSpec::tcp(&addr),
            Protocol::Udp => SocketSpec::udp(&addr),
            Protocol::Sctp => SocketSpec::sctp(&addr),
        };
        (b.ns, spec)
    }

    /// Asks for the socket of `b`'s listener in its namespace, for
    /// [`Listener::open`].
    pub(crate) fn ask(b: &Binding) -> SocketFuture {
        let (ns, spec) = Listener::spec(b);
        b.sockets.socket(ns, spec)
    }

    /// Binds and (TCP, SCTP) listens on `socket`, asked for with
    /// [`Listener::ask`].
    pub(crate) async fn open(b: &Binding, socket: SocketFuture) -> Result<Listener, ListenError> {
        let opened = async {
            match b.rule.protocol {
                Protocol::Tcp => tcp::listen(b, socket).await.map(Listener::Tcp),
                Protocol::Udp => udp::listen(b, socket).await.map(|socket| Listener::Udp {
                    socket,
                    kernel_drops: 0,
                }),
                Protocol::Sctp => sctp::listen(b, socket).await.map(Listener::Sctp),
            }
        };
        opened.instrument(b.span()).await
    }

    /// A listening socket another nsproxy made for the same binding (a
    /// takeover), checked before it is served: of `b`'s protocol, listening
    /// (TCP, SCTP), bound to `b`'s listen address (any port when the rule
    /// says 0), and in the namespace whose cookie is `netns_cookie` (`None`
    /// when this kernel has no `SO_NETNS_COOKIE`). Its backlog is set to the
    /// rule's, the rest of its options are the old process's.
    pub(crate) fn adopt(
        b: &Binding,
        fd: std::os::fd::OwnedFd,
        netns_cookie: Option<u64>,
    ) -> Result<Listener, String> {
        use socket2::{Socket, Type};
        let socket = Socket::from(fd);
        let (ty, proto) = match b.rule.protocol {
            Protocol::Tcp => (Type::STREAM, libc::IPPROTO_TCP),
            Protocol::Udp => (Type::DGRAM, libc::IPPROTO_UDP),
            Protocol::Sctp => (Type::STREAM, libc::IPPROTO_SCTP),
        };
        let err = |what: &str, e: io::Error| format!("cannot read its {what}: {e}");
        let got_ty = socket.r#type().map_err(|e| err("type", e))?;
        let got_proto = socket.protocol().map_err(|e| err("protocol", e))?;
        if got_ty != ty || got_proto.map(i32::from) != Some(proto) {
            return Err(format!(
                "it is not a {} socket ({got_ty:?}, protocol {got_proto:?})",
                b.rule.protocol
            ));
        }
        let local = socket
            .local_addr()
            .map_err(|e| err("address", e))?
            .as_socket()
            .ok_or("it is not an IP socket")?;
        let want = b.rule.listen;
        if local.ip() != want.ip() || (want.port() != 0 && local.port() != want.port()) {
            return Err(format!("it is bound to {local}, not {want}"));
        }
        if b.rule.protocol != Protocol::Udp && !socket.is_listener().map_err(|e| err("state", e))? {
            return Err("it is not listening".into());
        }
        if let Some(cookie) = netns_cookie {
            let got = crate::sys::fdpass::netns_cookie(std::os::fd::AsFd::as_fd(&socket))
                .map_err(|e| err("namespace", e))?;
            if got != cookie {
                return Err(format!("it is in another namespace than \"{}\"", b.netns));
            }
        }
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("cannot make it non-blocking: {e}"))?;
        Ok(match b.rule.protocol {
            Protocol::Tcp => {
                // listen(2) again only sets the backlog: queued clients stay.
                let _ = socket.listen(b.rule.backlog.min(i32::MAX as u32) as i32);
                Listener::Tcp(socket.into())
            }
            Protocol::Udp => Listener::Udp {
                socket: socket.into(),
                kernel_drops: 0,
            },
            Protocol::Sctp => Listener::Sctp(socket),
        })
    }

    /// The address actually bound (the real port when the rule said 0).
    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr(),
            Listener::Udp { socket, .. } => socket.local_addr(),
            Listener::Sctp(s) => sctp::local_addr(s),
        }
    }

    /// Serves until the binding's stop is requested, or until the listener
    /// has been idle for `park_after` with nothing open, when it is given
    /// back to be parked. On a stop, TCP connections and SCTP associations
    /// get up to `drain` to finish (none with [`StopMode::Close`]); UDP
    /// sessions end at once.
    async fn serve(
        self,
        b: Arc<Binding>,
        drain: Duration,
        park_after: Duration,
    ) -> Served<Listener> {
        match self {
            Listener::Tcp(l) => tcp::serve(b, l, drain, park_after).await.map(Listener::Tcp),
            Listener::Udp {
                socket,
                kernel_drops,
            } => udp::serve(b, socket, kernel_drops, park_after).await.map(
                |(socket, kernel_drops)| Listener::Udp {
                    socket,
                    kernel_drops,
                },
            ),
            Listener::Sctp(s) => sctp::serve(b, s, drain, park_after)
                .await
                .map(Listener::Sctp),
        }
    }
}

/// How a serve task ended, and what became of its listener.
#[derive(Debug)]
pub(crate) enum Served<L> {
    /// Idle: the listener is given back, to be parked.
    Idle(L),
    /// The binding was told to stop; the listener is closed.
    Stopped,
    /// The listener could not be handed between the reactor and the parking
    /// set (the kernel refused an epoll change) and is closed; why.
    Lost(String),
}

impl<L> Served<L> {
    fn map<M>(self, f: impl FnOnce(L) -> M) -> Served<M> {
        match self {
            Served::Idle(l) => Served::Idle(f(l)),
            Served::Stopped => Served::Stopped,
            Served::Lost(why) => Served::Lost(why),
        }
    }
}

/// Binds a listening socket to `addr`, and (SCTP multi-homing) to each of
/// `extra` at the same port with `sctp_bindx` — the port bound, so that
/// port 0 means one port for all. A port below 1024 this process may not
/// bind (EACCES) is bound, all addresses at once, by the socket factory
/// instead (the broker, split).
pub(crate) async fn bind_listen(
    b: &Binding,
    socket: &socket2::Socket,
    addr: SocketAddr,
    extra: &[std::net::IpAddr],
) -> Result<(), ListenError> {
    let at_port =
        |port| -> Vec<SocketAddr> { extra.iter().map(|ip| SocketAddr::new(*ip, port)).collect() };
    match socket.bind(&addr.into()) {
        Err(source) if source.raw_os_error() == Some(libc::EACCES) => {
            let mut all = vec![addr];
            all.extend(at_port(addr.port()));
            b.sockets
                .bind_privileged(socket, &all)
                .await
                .map_err(|e| ListenError::Bind {
                    addr,
                    source: privileged_bind_error(source, e),
                })
        }
        Err(source) => Err(ListenError::Bind { addr, source }),
        Ok(()) if extra.is_empty() => Ok(()),
        Ok(()) => {
            let port = socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .map_or(addr.port(), |a| a.port());
            let extra = at_port(port);
            crate::sctp::bindx(socket, &extra).map_err(|source| ListenError::Bind {
                addr: extra[0],
                source,
            })
        }
    }
}

/// What to report when a privileged bind failed: the broker's bind error
/// (an errno) as it is, else the first EACCES with the reason added.
pub(crate) fn privileged_bind_error(eacces: io::Error, e: io::Error) -> io::Error {
    if e.raw_os_error().is_some() {
        e
    } else {
        io::Error::new(eacces.kind(), format!("{eacces}; {e}"))
    }
}

/// Why a binding could not listen.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{0}")]
    Ns(#[from] NsError),
    #[error(
        "SCTP is not available in this kernel: {0} (load the module with `modprobe sctp`; on Ubuntu it ships in `linux-modules-extra-$(uname -r)`; check it is not blacklisted in /etc/modprobe.d; other rules are not affected)"
    )]
    SctpUnavailable(io::Error),
    #[error("cannot listen on {addr}: {source}{}", bind_hint(source))]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot set up the socket for {addr}: {source}")]
    Socket { addr: SocketAddr, source: io::Error },
}

fn bind_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => {
            " (another socket in this namespace already uses this address and port)"
        }
        Some(libc::EADDRNOTAVAIL) => {
            " (this address is not configured on any interface in this namespace)"
        }
        Some(libc::EACCES) => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        _ => "",
    }
}
