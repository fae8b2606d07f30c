//! SCTP: a one-to-one style listener per binding, and a relay per association.
//!
//! Each accepted association gets an upstream association opened from the
//! rule's upstream namespace (bounded by `connect_timeout`), then a relay in
//! both directions that moves *messages*, not bytes:
//!
//! ```text
//!  client ══assoc══► listener (ns) ─accept─► relay task ══assoc══► upstream (upstream_netns)
//!                 recvmsg until MSG_EOR + SCTP_RCVINFO ─► sendmsg + SCTP_SNDINFO (same sid, PPID, unordered)
//! ```
//!
//! - A message arriving in pieces (partial delivery, or larger than the
//!   buffer) is put together until `MSG_EOR` and sent on as one message;
//!   the sending leg's send buffer grows to hold it (SCTP refuses a message
//!   larger than the send buffer). A message larger than [`MAX_MESSAGE`] is
//!   dropped, counted in `oversized` and logged.
//! - Both legs ask for the rule's stream counts (`SCTP_INITMSG`, by default
//!   the maximum, 65535 each way). A message on a stream the other leg does
//!   not have is dropped, counted in `unknown_stream` and logged.
//! - Notifications are consumed (logged at debug), never relayed.
//! - A graceful shutdown (SHUTDOWN) from one side becomes a graceful shutdown
//!   of the other leg; an abort, or any error, aborts the other leg (close
//!   with `SO_LINGER` 0, which sends ABORT).
//!
//! Sockets are non-blocking and driven by tokio's reactor through `AsyncFd`,
//! so no thread ever waits in accept, connect, send or receive.

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use socket2::{SockAddr, Socket};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tracing::{Instrument, debug, info, warn};

use super::relay::{
    self, Abort, Active, ConnectError, Cut, Dir, End, Gauge, Tally, Words, conn_span,
};
use super::timeout::Activity;
use super::{Binding, ListenError, Served, accept};
use crate::config::{Protocol, Rule};
use crate::netns::{NsError, SocketFuture, SocketSpec};
use crate::sctp::{self, AssocState, Events, Notification, Reassembler, Received, SndInfo};

/// How SCTP's close lines word the end of a relay.
const WORDS: Words = Words {
    closed: "both sides shut down",
    cut: "aborted",
};

/// Each direction's buffer at rest; it grows for larger messages.
const BUF_INITIAL: usize = 64 * 1024;
/// The largest message nsproxy puts together; a larger one is read, dropped
/// and reported (holding it would cost unbounded memory per association).
pub const MAX_MESSAGE: usize = 16 << 20;

/// The notifications both legs subscribe to: enough to log why an
/// association ended and to notice an aborted partial delivery.
const EVENTS: Events = Events {
    association: true,
    shutdown: true,
    partial_delivery: true,
    peer_error: true,
};

/// A binding's listening SCTP socket.
#[derive(Debug)]
pub(crate) struct SctpListener {
    fd: AsyncFd<Socket>,
}

/// The primary bound address of a listening socket (the real port when the
/// rule said 0).
pub(crate) fn local_addr(socket: &Socket) -> io::Result<SocketAddr> {
    to_socket_addr(socket.local_addr()?)
}

fn to_socket_addr(a: SockAddr) -> io::Result<SocketAddr> {
    a.as_socket()
        .ok_or_else(|| io::Error::other("not an IP socket address"))
}

/// Turns "no SCTP in this kernel" into its own error; other socket errors
/// stay as they are.
fn socket_error(e: NsError) -> ListenError {
    match e {
        NsError::Socket { source, .. } if sctp::is_unsupported(&source) => {
            ListenError::SctpUnavailable(source)
        }
        e => ListenError::Ns(e),
    }
}

/// The options both legs get before they listen or connect. Set on the
/// listener, they are inherited by every association it accepts.
fn configure(s: &Socket, rule: &Rule) -> io::Result<()> {
    sctp::set_init(s, rule.sctp_streams)?;
    sctp::set_nodelay(s, true)?;
    sctp::set_recv_rcvinfo(s, true)?;
    sctp::subscribe(s, EVENTS)
}

/// `addr` in the family of a socket: an IPv4 address on an IPv6 socket
/// becomes IPv4-mapped, as `bind`/`connect` want it.
fn in_family(addr: SocketAddr, v6: bool) -> SocketAddr {
    match addr {
        SocketAddr::V4(a) if v6 => SocketAddr::new(IpAddr::V6(a.ip().to_ipv6_mapped()), a.port()),
        a => a,
    }
}

/// Binds `socket` (asked for in `b`'s namespace) and listens on it: bound
/// to `listen` plus any `sctp_listen_addrs` (multi-homing), with the rule's
/// stream counts.
pub(crate) async fn listen(b: &Binding, socket: SocketFuture) -> Result<Socket, ListenError> {
    let addr = b.rule.listen;
    let socket = socket.await.map_err(socket_error)?;
    let at = |source: io::Error| ListenError::Socket { addr, source };
    socket.set_reuse_address(true).map_err(at)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // `[::]` means both families, whatever net.ipv6.bindv6only says.
        socket.set_only_v6(false).map_err(at)?;
    }
    configure(&socket, &b.rule).map_err(at)?;
    super::bind_listen(b, &socket, addr, &b.rule.sctp_listen_addrs).await?;
    socket
        .listen(b.rule.backlog.min(i32::MAX as u32) as i32)
        .map_err(|source| ListenError::Bind { addr, source })?;
    Ok(socket)
}

/// Accepts until the binding stops, then lets associations drain for up to
/// `drain` and aborts the rest; or gives the socket back when idle (see
/// [`accept::serve`]).
pub(crate) async fn serve(
    b: Arc<Binding>,
    socket: Socket,
    drain: Duration,
    park_after: Duration,
) -> Served<Socket> {
    let listener = match sctp::register(socket) {
        Ok(fd) => SctpListener { fd },
        Err(e) => return Served::Lost(format!("cannot watch the socket: {e}")),
    };
    let idle = accept::serve(
        b,
        listener,
        drain,
        park_after,
        "association",
        |b, client, peer| {
            let span = conn_span!("assoc", b, peer);
            handle(b, client).instrument(span)
        },
    )
    .await;
    match idle {
        Some(l) => Served::Idle(l.fd.into_inner()),
        None => Served::Stopped,
    }
}

impl accept::Accept for SctpListener {
    type Conn = AsyncFd<Socket>;
    fn accept_one(
        &self,
    ) -> impl std::future::Future<Output = io::Result<(Self::Conn, SocketAddr)>> + Send {
        accept(self)
    }

    fn accept_queued(&self) -> io::Result<(Self::Conn, SocketAddr)> {
        let (s, peer) = self.fd.get_ref().accept()?;
        s.set_nonblocking(true)?;
        let peer = to_socket_addr(peer)?;
        Ok((sctp::register(s)?, peer))
    }

    fn refuse(conn: Self::Conn) {
        abort(&conn);
    }
}

/// One accepted association, registered with the reactor.
async fn accept(l: &SctpListener) -> io::Result<(AsyncFd<Socket>, SocketAddr)> {
    let (s, peer) = l.fd.async_io(Interest::READABLE, |s| s.accept()).await?;
    s.set_nonblocking(true)?;
    let peer = to_socket_addr(peer)?;
    Ok((sctp::register(s)?, peer))
}

/// Closes with ABORT instead of a graceful SHUTDOWN once the fd is dropped.
fn abort(s: &AsyncFd<Socket>) {
    let _ = s.get_ref().set_linger(Some(Duration::ZERO));
}

async fn handle(b: Arc<Binding>, client: AsyncFd<Socket>) {
    let _active = Active::new(b.clone(), Gauge::Connections);
    let stats = b.stats.conn();
    let flows = Flows::default();
    let upstream = {
        // Should the association be cut meanwhile, the client is aborted.
        let cut = Cut::new(&b, &client, None, &flows);
        let r = relay::connect_within(
            b.rule.connect_timeout,
            std::pin::pin!(connect(&b)),
            std::pin::pin!(aborted(&client)),
        )
        .await;
        cut.disarm();
        match r {
            Ok(s) => s,
            Err(ConnectError::ClientGone(e, _)) => {
                stats.client_gone_connecting.fetch_add(1, Relaxed);
                flows.log(
                    &b,
                    &format!(
                        "association closed: the client aborted ({e}) while the upstream connect was under way; the connect was abandoned"
                    ),
                );
                return;
            }
            Err(e) => {
                stats.connect_failed.fetch_add(1, Relaxed);
                warn!("upstream connect failed: {e}; aborting the client association");
                abort(&client);
                return;
            }
        }
    };
    // Silence is counted from here: the connect's own time is connect_timeout's.
    flows.activity.touch();
    let cut = Cut::new(&b, &client, Some(&upstream), &flows);
    let end = relay(&b, &client, &upstream, &flows).await;
    cut.disarm();
    match &end {
        End::Closed => {}
        End::Failed(..) => {
            abort(&client);
            abort(&upstream);
        }
        End::Expired(_) => {
            abort(&client);
            abort(&upstream);
            stats.idle_timeouts.fetch_add(1, Relaxed);
        }
    }
    flows.log(&b, &format!("association closed: {}", end.describe(&WORDS)));
}

/// What both directions of an association moved, and when last.
#[derive(Debug)]
struct Flows {
    /// Client to upstream.
    up: Flow,
    /// Upstream to client.
    down: Flow,
    activity: Activity,
}

impl Default for Flows {
    fn default() -> Flows {
        Flows {
            up: Flow::default(),
            down: Flow::default(),
            activity: Activity::new(),
        }
    }
}

impl Flows {
    /// Adds what moved to the binding's counters (SCTP counts them when an
    /// association ends) and logs the end.
    fn log(&self, b: &Binding, what: &str) {
        let (up, down) = (self.up.read(), self.down.read());
        let stats = b.stats.sctp();
        stats.conn.bytes_in.fetch_add(up.bytes, Relaxed);
        stats.conn.bytes_out.fetch_add(down.bytes, Relaxed);
        stats.messages_in.fetch_add(up.messages, Relaxed);
        stats.messages_out.fetch_add(down.messages, Relaxed);
        info!(
            messages_from_client = up.messages,
            messages_to_client = down.messages,
            bytes_from_client = up.bytes,
            bytes_to_client = down.bytes,
            dropped_from_client = up.dropped,
            dropped_to_client = down.dropped,
            duration_ms = self.activity.start().elapsed().as_millis() as u64,
            "{what}"
        );
    }
}

impl Tally for Flows {
    fn cut(&self, b: &Binding, why: &str, _connecting: bool) {
        self.log(
            b,
            &format!("association cut: {why}; both sides were aborted"),
        );
    }
}

impl Abort for AsyncFd<Socket> {
    fn abort(&self) {
        abort(self);
    }
}

/// Completes when the client's association fails (an ABORT sets the
/// socket's error): a graceful SHUTDOWN does not count, as for TCP's FIN.
async fn aborted(client: &AsyncFd<Socket>) -> io::Error {
    loop {
        let mut ready = match client.ready(Interest::ERROR).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        match client.get_ref().take_error() {
            Ok(Some(e)) => return e,
            Err(e) => return e,
            Ok(None) => ready.clear_ready(),
        }
    }
}

/// Opens the upstream association from the upstream namespace: bound to
/// `sctp_source_addrs` if any (otherwise the kernel uses, and advertises,
/// every address of that namespace), and connected to `upstream` plus
/// `sctp_upstream_addrs` (`sctp_connectx`).
async fn connect(b: &Binding) -> Result<AsyncFd<Socket>, ConnectError> {
    let rule = &b.rule;
    let port = rule.upstream.port();
    let peers: Vec<SocketAddr> = std::iter::once(rule.upstream)
        .chain(
            rule.sctp_upstream_addrs
                .iter()
                .map(|ip| SocketAddr::new(*ip, port)),
        )
        .collect();
    let v6 = sctp::needs_ipv6(
        peers
            .iter()
            .map(|a| a.ip())
            .chain(rule.sctp_source_addrs.iter().copied()),
    );
    let family = if v6 {
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0)
    } else {
        SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0)
    };
    // Out of fds or memory: waits (within connect_timeout) while the
    // accept loop pauses, rather than abort the client at once.
    let socket = relay::upstream_socket(b, SocketSpec::sctp(&family), None).await?;
    configure(&socket, rule).map_err(ConnectError::Setup)?;
    if let Some((first, rest)) = rule.sctp_source_addrs.split_first() {
        let first = in_family(SocketAddr::new(*first, 0), v6);
        socket.bind(&first.into()).map_err(ConnectError::Setup)?;
        let rest: Vec<SocketAddr> = rest.iter().map(|ip| SocketAddr::new(*ip, 0)).collect();
        sctp::bindx(&socket, &rest).map_err(ConnectError::Setup)?;
    }
    let fd = sctp::register(socket).map_err(ConnectError::Setup)?;
    let started = tokio::time::Instant::now();
    let initiated = if peers.len() == 1 {
        fd.get_ref().connect(&in_family(peers[0], v6).into())
    } else {
        sctp::connectx(fd.get_ref(), &peers)
    };
    match initiated {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(ConnectError::Connect(Protocol::Sctp, e, started.elapsed())),
    }
    connected(&fd)
        .await
        .map(|()| fd)
        .map_err(|e| ConnectError::Connect(Protocol::Sctp, e, started.elapsed()))
}

/// Waits until a non-blocking connect has finished: the association is up
/// (writable, with a peer) or failed (`SO_ERROR`).
async fn connected(fd: &AsyncFd<Socket>) -> io::Result<()> {
    loop {
        let mut ready = fd.ready(Interest::WRITABLE | Interest::ERROR).await?;
        if let Some(e) = fd.get_ref().take_error()? {
            return Err(e);
        }
        if fd.get_ref().peer_addr().is_ok() {
            return Ok(());
        }
        ready.clear_ready();
    }
}

/// What one direction moved (atomics: a [`Cut`] reads them while the
/// pumps are stopped mid-way).
#[derive(Debug, Default)]
struct Flow {
    messages: AtomicU64,
    bytes: AtomicU64,
    /// Messages that could not be sent on: a stream the other leg does not
    /// have, or the other leg had already shut down.
    dropped: AtomicU64,
    /// Of those, on a stream the other leg does not have (the first is logged).
    unknown_stream: AtomicU64,
}

/// A [`Flow`] as read at one moment.
struct FlowCounts {
    messages: u64,
    bytes: u64,
    dropped: u64,
}

impl Flow {
    fn read(&self) -> FlowCounts {
        FlowCounts {
            messages: self.messages.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
        }
    }

    fn drop_one(&self) {
        self.dropped.fetch_add(1, Relaxed);
    }
}

/// How one direction stopped.
enum PumpEnd {
    /// The sending side shut down gracefully.
    Shutdown,
    /// Reading from the sending side failed: it aborted, or the association
    /// was lost.
    Read(io::Error),
    /// Sending to the other side failed for another reason than its own
    /// shutdown.
    Write(io::Error),
}

/// One side of the relay.
struct Leg<'a> {
    fd: &'a AsyncFd<Socket>,
    /// "client" or "upstream", for logs.
    name: &'static str,
}

/// Relays messages both ways until both sides shut down, one fails, or
/// `idle_timeout` runs out (the caller aborts both legs then).
async fn relay(
    b: &Binding,
    client: &AsyncFd<Socket>,
    upstream: &AsyncFd<Socket>,
    flows: &Flows,
) -> End {
    let c = Leg {
        fd: client,
        name: "client",
    };
    let u = Leg {
        fd: upstream,
        name: "upstream",
    };
    if let (Ok(cs), Ok(us)) = (
        sctp::status(client.get_ref()),
        sctp::status(upstream.get_ref()),
    ) {
        debug!(
            client_streams_in = cs.inbound_streams,
            client_streams_out = cs.outbound_streams,
            upstream_streams_in = us.inbound_streams,
            upstream_streams_out = us.outbound_streams,
            "association up"
        );
    }
    let activity = &flows.activity;
    let to_upstream = async {
        match pump(b, &c, &u, &flows.up, activity).await {
            PumpEnd::Shutdown => {
                // SCTP has no half-close: a SHUTDOWN ends both directions
                // once in-flight messages are delivered.
                let _ = upstream.get_ref().shutdown(std::net::Shutdown::Write);
                Dir::Done
            }
            PumpEnd::Read(e) => Dir::Failed("client aborted or failed", e),
            PumpEnd::Write(e) => Dir::Failed("upstream send failed", e),
        }
    };
    let to_client = async {
        match pump(b, &u, &c, &flows.down, activity).await {
            PumpEnd::Shutdown => {
                let _ = client.get_ref().shutdown(std::net::Shutdown::Write);
                Dir::Done
            }
            PumpEnd::Read(e) => Dir::Failed("upstream aborted or failed", e),
            PumpEnd::Write(e) => Dir::Failed("client send failed", e),
        }
    };
    // No half-close: only the idle limit applies.
    relay::both_ways(
        b,
        activity,
        false,
        std::pin::pin!(to_upstream),
        std::pin::pin!(to_client),
        || {},
    )
    .await
}

/// True for send errors that mean the receiving association is shutting
/// down (or gone): its own direction's pump reports how it ended.
fn is_closing(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE | libc::ESHUTDOWN | libc::ENOTCONN)
    )
}

/// Moves whole messages from `from` to `to` until `from` shuts down or fails.
async fn pump(
    b: &Binding,
    from: &Leg<'_>,
    to: &Leg<'_>,
    flow: &Flow,
    activity: &Activity,
) -> PumpEnd {
    let mut reasm = Reassembler::new(BUF_INITIAL, MAX_MESSAGE);
    // The other leg's outbound stream count, refreshed when a send says
    // EINVAL (streams can be added during an association).
    let mut streams = sctp::status(to.fd.get_ref())
        .map(|s| s.outbound_streams)
        .unwrap_or(u16::MAX);
    let mut lost = false;
    // Set once `to` refused a send because it is shutting down: messages
    // still arriving are read (so closing does not turn into an ABORT) and
    // dropped.
    let mut to_closing = false;
    let dir = Direction {
        b,
        from,
        to,
        flow,
        activity,
    };
    loop {
        let got = from
            .fd
            .async_io(Interest::READABLE, |s| {
                loop {
                    if let Some(r) = reasm.recv_once(s)? {
                        return Ok(r);
                    }
                }
            })
            .await;
        let info = match got {
            Ok(Received::Data(info)) => info,
            Ok(Received::Notification(n)) => {
                debug!(side = from.name, "notification: {n}");
                match n {
                    Notification::AssocChange {
                        state: AssocState::CommLost | AssocState::CantStart,
                        ..
                    } => lost = true,
                    // The end of a shutdown this side began (nsproxy passed
                    // one on): no EOF follows on such a socket, only ENOTCONN.
                    Notification::AssocChange {
                        state: AssocState::ShutdownComplete,
                        ..
                    } => return PumpEnd::Shutdown,
                    _ => {}
                }
                continue;
            }
            Ok(Received::Oversized { len, info }) => {
                b.stats.sctp().oversized.fetch_add(1, Relaxed);
                warn!(
                    "message of {len} bytes from the {} on stream {} dropped: larger than {MAX_MESSAGE} bytes, the most nsproxy reassembles",
                    from.name, info.sid
                );
                flow.drop_one();
                continue;
            }
            Ok(Received::Eof) if lost => {
                return PumpEnd::Read(io::Error::from_raw_os_error(libc::ECONNRESET));
            }
            Ok(Received::Eof) => return PumpEnd::Shutdown,
            // The association completed a shutdown this side began.
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) && !lost => {
                return PumpEnd::Shutdown;
            }
            Err(e) => return PumpEnd::Read(e),
        };
        let msg = reasm.message();
        if to_closing {
            flow.drop_one();
            continue;
        }
        if info.sid >= streams {
            unknown_stream(b, from, to, info.sid, streams, flow);
            continue;
        }
        match dir.send_on(msg, &info, &mut streams).await {
            Ok(closing) => to_closing = closing,
            Err(e) => return PumpEnd::Write(e),
        }
    }
}

/// One direction of a relay, as its pump sends messages on.
struct Direction<'a> {
    b: &'a Binding,
    from: &'a Leg<'a>,
    to: &'a Leg<'a>,
    flow: &'a Flow,
    activity: &'a Activity,
}

impl Direction<'_> {
    /// Sends `msg` on, growing the send buffer if it must, and counts it
    /// (moved or dropped); `streams`, the other leg's outbound stream
    /// count, is read again when a send says EINVAL. `Ok(true)`: the other
    /// leg is shutting down, and drops what still comes; `Err`: the send
    /// failed.
    async fn send_on(
        &self,
        msg: &[u8],
        info: &sctp::RcvInfo,
        streams: &mut u16,
    ) -> io::Result<bool> {
        let (b, from, to, flow) = (self.b, self.from, self.to, self.flow);
        let mut sent = send(to, msg, info).await;
        if matches!(&sent, Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE)) {
            // Larger than the send buffer: SCTP sends messages whole, so
            // the buffer must grow to hold it.
            match sctp::fit_send_buffer(to.fd.get_ref(), msg.len()) {
                Ok(true) => sent = send(to, msg, info).await,
                Ok(false) | Err(_) => {
                    b.stats.sctp().oversized.fetch_add(1, Relaxed);
                    warn!(
                        "message of {} bytes from the {} on stream {} dropped: larger than the {} send buffer can be made (net.core.wmem_max; SO_SNDBUFFORCE needs CAP_NET_ADMIN)",
                        msg.len(),
                        from.name,
                        info.sid,
                        to.name
                    );
                    flow.drop_one();
                    return Ok(false);
                }
            }
        }
        match sent {
            Ok(_) => {
                flow.messages.fetch_add(1, Relaxed);
                flow.bytes.fetch_add(msg.len() as u64, Relaxed);
                self.activity.touch();
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // The stream counts may have changed; only a stream the
                // association does not have is a dropped message.
                *streams = sctp::status(to.fd.get_ref())
                    .map(|s| s.outbound_streams)
                    .unwrap_or(*streams);
                if info.sid >= *streams {
                    unknown_stream(b, from, to, info.sid, *streams, flow);
                } else {
                    return Err(e);
                }
            }
            Err(e) if is_closing(&e) => {
                debug!(
                    "{} is shutting down ({e}); dropping what {} still sends",
                    to.name, from.name
                );
                flow.drop_one();
                return Ok(true);
            }
            Err(e) => return Err(e),
        }
        Ok(false)
    }
}

/// Sends one whole message, waiting (in the reactor) for room.
async fn send(to: &Leg<'_>, msg: &[u8], info: &sctp::RcvInfo) -> io::Result<usize> {
    to.fd
        .async_io(Interest::WRITABLE, |s| {
            sctp::send(s, msg, &SndInfo::relay(info))
        })
        .await
}

/// Reports a message on a stream the other side does not have: counted,
/// logged for the first one of each direction, and dropped.
fn unknown_stream(b: &Binding, from: &Leg<'_>, to: &Leg<'_>, sid: u16, streams: u16, flow: &Flow) {
    b.stats.sctp().unknown_stream.fetch_add(1, Relaxed);
    if flow.unknown_stream.fetch_add(1, Relaxed) == 0 {
        warn!(
            "message from the {} on stream {sid} dropped: the {} association has only {streams} outbound stream(s) (ids 0..{}); raise sctp_streams or the peer's stream count. Further drops are counted in the close line",
            from.name,
            to.name,
            streams.saturating_sub(1)
        );
    }
    flow.drop_one();
}
