//! TCP: a listener per binding, and a relay per accepted connection.
//!
//! Each accepted connection gets an upstream socket created in the rule's
//! upstream namespace, a connect bounded by the rule's timeout, and then a
//! relay in both directions that passes a FIN on (half-close) while the other
//! direction keeps flowing, and a reset as a reset.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU8, AtomicU64};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info, warn};

use super::relay::{
    self, Abort, Active, ConnectError, Cut, Dir, Early, End, Gauge, Tally, Words, conn_span,
    is_resource_exhaustion,
};
use super::splice::Pipe;
use super::timeout::{Activity, Expired};
use super::{Binding, ListenError, Served, accept, proxy_header, source};
use crate::config::{Protocol, ProxyProtocol};
use crate::netns::SocketFuture;

/// How TCP's close lines word the end of a relay.
const WORDS: Words = Words {
    closed: "both sides closed",
    cut: "reset",
};

/// Size of the per-thread buffer every read goes into (see [`copy_pump`]).
const BUF_SIZE: usize = 32 * 1024;

/// Binds `socket` (asked for in `b`'s namespace) to `b`'s address and
/// listens on it.
pub(crate) async fn listen(
    b: &Binding,
    socket: SocketFuture,
) -> Result<std::net::TcpListener, ListenError> {
    let addr = b.rule.listen;
    let socket = socket.await?;
    let at = |source: io::Error| ListenError::Socket { addr, source };
    socket.set_reuse_address(true).map_err(at)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // `[::]` means both families, whatever net.ipv6.bindv6only says.
        socket.set_only_v6(false).map_err(at)?;
    }
    super::bind_listen(b, &socket, addr, &[]).await?;
    socket
        .listen(b.rule.backlog.min(i32::MAX as u32) as i32)
        .map_err(|source| ListenError::Bind { addr, source })?;
    // Set once here rather than on every connection: an accepted socket
    // starts as a copy of its listener, TCP_NODELAY and keepalive included.
    // Failing, each connection sets them itself (see `Inherited`).
    let _ = socket.set_tcp_nodelay(true);
    if let Some(k) = b.tcp_keepalive() {
        if let Err(e) = set_keepalive(SockRef::from(&socket), Some(k)) {
            debug!("cannot set keepalive on the listener: {e}");
        }
    }
    // Non-blocking since socket(2), as tokio needs when a task serves it.
    Ok(std::net::TcpListener::from(socket))
}

/// Accepts until the binding stops, then lets connections drain for up to
/// `drain` and closes the rest; or gives the listener back when idle (see
/// [`accept::serve`]).
pub(crate) async fn serve(
    b: Arc<Binding>,
    listener: std::net::TcpListener,
    drain: Duration,
    park_after: Duration,
) -> Served<std::net::TcpListener> {
    let inherited = Inherited::of(SockRef::from(&listener));
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return Served::Lost(format!("cannot watch the socket: {e}")),
    };
    let idle = accept::serve(
        b,
        listener,
        drain,
        park_after,
        "connection",
        |b, client, peer| {
            let span = conn_span!("conn", b, peer);
            // Asked for now, before the accept loop takes another client:
            // out of fds, it pauses at once and the clients after this one
            // wait in the backlog (see `Early::ask`).
            let first = Early::ask(&b, super::upstream_spec(&b.rule));
            handle(b, client, peer, first, inherited).instrument(span)
        },
    )
    .await;
    match idle.map(TcpListener::into_std) {
        None => Served::Stopped,
        Some(Ok(l)) => Served::Idle(l),
        Some(Err(e)) => Served::Lost(format!("cannot park the idle socket: {e}")),
    }
}

/// The options every accepted socket has from its listener, as read back
/// from the listener (which may have been set up by an earlier serve, or
/// under a keepalive a reload has changed since).
#[derive(Debug, Clone, Copy)]
struct Inherited {
    nodelay: bool,
    keepalive: Option<crate::config::Keepalive>,
}

impl Inherited {
    fn of(s: SockRef<'_>) -> Inherited {
        let keepalive = match s.keepalive() {
            Ok(true) => (|| {
                Some(crate::config::Keepalive {
                    idle: s.tcp_keepalive_time().ok()?,
                    interval: s.tcp_keepalive_interval().ok()?,
                    count: s.tcp_keepalive_retries().ok()?,
                })
            })(),
            _ => None,
        };
        Inherited {
            nodelay: s.tcp_nodelay().unwrap_or(false),
            keepalive,
        }
    }
}

async fn handle(
    b: Arc<Binding>,
    client: TcpStream,
    peer: SocketAddr,
    first: Early,
    inherited: Inherited,
) {
    let _active = Active::new(b.clone(), Gauge::Connections);
    let stats = b.stats.tcp();
    // As it was when the client was accepted, whatever a reload does meanwhile.
    let proxy_header = b.proxy_protocol();
    let keepalive = b.tcp_keepalive();
    let moved = Moved::new();
    let upstream = {
        // Should the connection be cut meanwhile, the client is reset.
        let cut = Cut::new(&b, &client, None, &moved);
        let r = connect(&b, &client, peer, first).await;
        cut.disarm();
        match r {
            Ok(s) => s,
            Err(ConnectError::ClientGone(e, after)) => {
                // The connect is not an upstream failure: not counted in
                // connect_failed, and logged at info.
                stats.conn.client_gone_connecting.fetch_add(1, Relaxed);
                info!(
                    duration_ms = moved.activity.start().elapsed().as_millis() as u64,
                    "connection closed: the client reset ({e}) while the upstream connect was under way, after {after:?}; the connect was abandoned"
                );
                return;
            }
            Err(e) => {
                stats.conn.connect_failed.fetch_add(1, Relaxed);
                if matches!(e, ConnectError::Source(_)) {
                    stats.upstream_source_failed.fetch_add(1, Relaxed);
                }
                warn!("upstream connect failed: {e}; resetting the client connection");
                reset(&client);
                return;
            }
        }
    };
    // Silence is counted from here: the connect's own time is connect_timeout's.
    moved.activity.touch();
    let cut = Cut::new(&b, &client, Some(&upstream), &moved);
    if let Some(version) = proxy_header {
        if let Err(e) = send_proxy_header(&b, version, &client, peer, &upstream).await {
            cut.disarm();
            stats.conn.connect_failed.fetch_add(1, Relaxed);
            warn!(
                "sending the PROXY protocol {version} header to the upstream failed: {e}; resetting both connections"
            );
            reset(&client);
            reset(&upstream);
            return;
        }
    }
    // The client leg has its listener's TCP_NODELAY; the upstream leg
    // needs its own, at once, as Nagle would hold back the second of two
    // small writes.
    if !inherited.nodelay {
        let _ = client.set_nodelay(true);
    }
    let _ = upstream.set_nodelay(true);
    // Keepalive only matters to a connection that lives: set once it has
    // for a second (four setsockopt(2) calls on the upstream leg, which
    // most short connections would make for nothing). The client leg has
    // its listener's, unless a reload changed the keepalive since.
    let settle = || {
        let legs = [
            ("client", &client, keepalive != inherited.keepalive),
            ("upstream", &upstream, keepalive.is_some()),
        ];
        for (leg, s, needed) in legs {
            if needed {
                if let Err(e) = set_keepalive(SockRef::from(s), keepalive) {
                    debug!("cannot set keepalive on the {leg} leg: {e}");
                }
            }
        }
    };
    let end = relay(&b, &client, &upstream, &moved, settle).await;
    cut.disarm();
    match &end {
        End::Closed => {}
        End::Failed(..) => {
            reset(&client);
            reset(&upstream);
        }
        End::Expired(why) => {
            reset(&client);
            reset(&upstream);
            match why {
                Expired::Idle(_) => &stats.conn.idle_timeouts,
                Expired::HalfClose(_) => &stats.half_close_timeouts,
            }
            .fetch_add(1, Relaxed);
        }
    }
    info!(
        bytes_from_client = moved.c2u.load(Relaxed),
        bytes_to_client = moved.u2c.load(Relaxed),
        duration_ms = moved.activity.start().elapsed().as_millis() as u64,
        "connection closed: {}",
        end.describe(&WORDS)
    );
}

/// TCP keepalive with the rule's timings (`SO_KEEPALIVE` and the three
/// `TCP_KEEP*` options), or off.
fn set_keepalive(s: SockRef<'_>, k: Option<crate::config::Keepalive>) -> io::Result<()> {
    let Some(k) = k else {
        return s.set_keepalive(false);
    };
    let ka = socket2::TcpKeepalive::new()
        .with_time(k.idle)
        .with_interval(k.interval)
        .with_retries(k.count);
    s.set_tcp_keepalive(&ka)
}

/// What a connection moved so far, and when it last did: shared by its
/// pumps, its timer, and the [`Cut`] that logs it if it is cut.
struct Moved {
    c2u: AtomicU64,
    u2c: AtomicU64,
    activity: Activity,
    /// Directions that reached EOF: see [`pass_fin`].
    ended: AtomicU8,
}

impl Moved {
    fn new() -> Moved {
        Moved {
            c2u: AtomicU64::new(0),
            u2c: AtomicU64::new(0),
            activity: Activity::new(),
            ended: AtomicU8::new(0),
        }
    }
}

impl Tally for Moved {
    fn cut(&self, _b: &Binding, why: &str, connecting: bool) {
        info!(
            bytes_from_client = self.c2u.load(Relaxed),
            bytes_to_client = self.u2c.load(Relaxed),
            duration_ms = self.activity.start().elapsed().as_millis() as u64,
            "connection cut: {why}; both sides were reset{}",
            if connecting {
                " (the upstream connect was under way)"
            } else {
                ""
            }
        );
    }
}

impl Abort for TcpStream {
    fn abort(&self) {
        reset(self);
    }
}

/// Starts `upstream` with the PROXY protocol header for `client`, before any
/// of the client's bytes.
async fn send_proxy_header(
    b: &Binding,
    version: ProxyProtocol,
    client: &TcpStream,
    peer: SocketAddr,
    upstream: &TcpStream,
) -> io::Result<()> {
    let local = client.local_addr()?;
    let header = proxy_header::header(version, peer, local, &b.netns.to_string());
    let mut data = &header[..];
    while !data.is_empty() {
        upstream.writable().await?;
        match upstream.try_write(data) {
            Ok(k) => data = &data[k..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Connects upstream within `connect_timeout`, unless `client` resets
/// first; out of fds or memory for the upstream socket, it waits and tries
/// again within the same limit (see [`relay::upstream_socket`]).
///
/// With `upstream_source = "client"`, the socket is bound to `peer` (the
/// client's address and port) first; that failing, or the connect finding
/// the 4-tuple taken, is a [`ConnectError::Source`].
async fn connect(
    b: &Binding,
    client: &TcpStream,
    peer: SocketAddr,
    first: Early,
) -> Result<TcpStream, ConnectError> {
    let to = b.rule.upstream;
    let spec = super::upstream_spec(&b.rule);
    let attempt = async {
        let started = tokio::time::Instant::now();
        let socket = relay::upstream_socket(b, spec, Some(first)).await?;
        if spec.transparent {
            source::bind(&socket, peer, to, Protocol::Tcp)?;
        }
        connect_stream(socket, to).await.map_err(|e| {
            match spec
                .transparent
                .then(|| source::in_use_at_connect(&e, peer, to))
                .flatten()
            {
                Some(clash) => ConnectError::Source(clash),
                None => ConnectError::Connect(Protocol::Tcp, e, started.elapsed()),
            }
        })
    };
    relay::connect_within(
        b.rule.connect_timeout,
        std::pin::pin!(attempt),
        std::pin::pin!(reset_by(client)),
    )
    .await
}

/// Connects `socket` (non-blocking) to `to`, and completes when the connect
/// has. Unlike tokio's `TcpSocket::connect`, it reads the socket's error
/// (`getsockopt(SO_ERROR)`) only when the reactor reports one: a failed
/// connect sets it, and the kernel then flags the socket with EPOLLERR; one
/// that the reactor reports only writable is up. One syscall less per
/// connection.
async fn connect_stream(socket: socket2::Socket, to: SocketAddr) -> io::Result<TcpStream> {
    match socket.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        // A hang-up without an error is not a connect that failed in any
        // way TCP reports; say what is known.
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::NotConnected.into()));
    }
    Ok(stream)
}

/// Completes when `client` resets. Only a reset (the socket's error set:
/// EPOLLERR) ends the wait, even after data: a FIN may be a client that
/// sent everything and waits for the answer, or one that reads a banner
/// after closing its side.
async fn reset_by(client: &TcpStream) -> io::Error {
    match client.ready(Interest::ERROR).await {
        Err(e) => e,
        Ok(_) => match client.take_error() {
            Ok(Some(e)) | Err(e) => e,
            // No error after all (nothing here uses the error queue):
            // nothing to wait for.
            Ok(None) => std::future::pending().await,
        },
    }
}

/// Closes with RST instead of FIN, so the peer learns the connection failed
/// rather than seeing a clean, empty end of stream.
fn reset(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// How a bounded copy ended.
#[derive(PartialEq, Eq)]
enum Copied {
    /// The source ended; FIN was passed on.
    Eof,
    /// The byte limit was reached; the rest is for another method.
    Limit,
}

/// In splice mode, a direction is copied until it has carried this much:
/// short exchanges (requests, replies, handshakes) cost fewer syscalls
/// copied than spliced (one read and one write against two splices and a
/// pipe), bulk transfers then go zero-copy.
const SPLICE_AFTER: u64 = 64 * 1024;

/// How the bytes of a direction are moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// splice(2) through a pipe: no copy into user space.
    Splice,
    /// read into a buffer, write from it.
    Copy,
}

/// splice unless `NSPROXY_TCP_SPLICE=0` (for comparing the two in benchmarks).
fn mode() -> Mode {
    static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("NSPROXY_TCP_SPLICE").as_deref() {
        Ok("0" | "off" | "false") => Mode::Copy,
        _ => Mode::Splice,
    })
}

/// Moves `from` → `to` until EOF, then sends FIN on `to`. `moved` counts
/// for the close log, `total` for the binding's live counters.
async fn pump(from: &TcpStream, to: &TcpStream, c: Count<'_>) -> Result<(), PumpError> {
    if mode() == Mode::Splice {
        if copy_pump(from, to, c, SPLICE_AFTER).await? == Copied::Eof {
            return Ok(());
        }
        // Ok(false): splice cannot serve this pair of sockets, copy instead.
        if splice_pump(from, to, c).await? {
            return Ok(());
        }
    }
    copy_pump(from, to, c, u64::MAX).await.map(|_| ())
}

/// Where a direction counts what it moves: for the close log (`moved`),
/// the binding's live counters (`total`), and the idle timer (`activity`).
#[derive(Clone, Copy)]
struct Count<'a> {
    moved: &'a AtomicU64,
    total: &'a AtomicU64,
    activity: &'a Activity,
    ended: &'a AtomicU8,
}

impl Count<'_> {
    fn add(&self, k: usize) {
        self.moved.fetch_add(k as u64, Relaxed);
        self.total.fetch_add(k as u64, Relaxed);
        self.activity.touch();
    }
}

thread_local! {
    /// Where every read of the copying relay lands: one buffer per worker
    /// thread, not one per direction, so that an idle connection holds no
    /// buffer at all (as HAProxy allocates its buffers on demand).
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; BUF_SIZE].into_boxed_slice());
}

/// What one read-and-forward step did.
enum Step {
    /// The source ended.
    Eof,
    /// Bytes were read; what `to` did not take at once is held here
    /// (empty, unallocated, when it took them all) until written. `last`:
    /// they were the last, the source's FIN is already in (see
    /// [`fin_follows`]).
    Read { rest: Vec<u8>, last: bool },
}

/// Reads what `from` has into the thread's scratch buffer and writes as
/// much of it to `to` as goes at once, without waiting: only bytes `to`
/// cannot take now get a buffer of their own. Synchronous, so the borrow of
/// the scratch buffer never spans an await (another task of this thread
/// uses it meanwhile).
///
/// Bytes that are the source's last go with `MSG_MORE`, so that the FIN
/// passed on right after rides in the same segment (as HAProxy does): in
/// request/reply traffic, the reply and its end are one packet to the
/// client instead of two, and the read that would only return EOF is
/// never made.
fn forward(from: &TcpStream, to: &TcpStream, c: Count<'_>) -> Result<Step, PumpError> {
    SCRATCH.with_borrow_mut(|buf| {
        let n = read_draining(from, buf).map_err(PumpError::Read)?;
        if n == 0 {
            return Ok(Step::Eof);
        }
        c.activity.touch();
        let last = n < buf.len() && fin_follows(from);
        let flags = if last { libc::MSG_MORE } else { 0 };
        let k = match to.try_io(Interest::WRITABLE, || {
            SockRef::from(to).send_with_flags(&buf[..n], flags)
        }) {
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(PumpError::Write(e)),
        };
        c.add(k);
        Ok(Step::Read {
            rest: buf[k..n].to_vec(),
            last,
        })
    })
}

/// Whether the peer's FIN is already in, right after a read drained
/// `from` (a short read, see [`read_draining`]): the reactor saw the end
/// of the stream (EPOLLRDHUP) and no data since, and neither an error nor
/// a hang-up, which a reset brings (EPOLLERR, EPOLLHUP: the reset is then
/// read as one, and the client reset in turn). A FIN is taken in sequence,
/// after every byte before it, so the drained socket has nothing left but
/// the end. Asks the reactor's readiness, not the socket: no syscall. The
/// interest includes WRITABLE so that the poll returns at once (a
/// connected socket is writable) and the ERROR bit is not masked out.
fn fin_follows(from: &TcpStream) -> bool {
    use std::task::{Context, Poll, Waker};
    use tokio::io::Ready;
    let all = Interest::READABLE | Interest::WRITABLE | Interest::ERROR;
    let ready = std::pin::pin!(from.ready(all));
    match ready.poll(&mut Context::from_waker(Waker::noop())) {
        // (`is_readable` also holds for a closed read side: the bit itself.)
        Poll::Ready(Ok(r)) => {
            r.is_read_closed()
                && (r & Ready::READABLE).is_empty()
                && !r.is_error()
                && !r.is_write_closed()
        }
        _ => false,
    }
}

/// Reads from `from` into `buf`. A read that did not fill `buf` emptied
/// the socket: its readiness is cleared then and there, as tokio's own
/// reads do, so the next read waits for the next event instead of costing
/// a recv(2) that only says `EAGAIN` (one per exchange, in
/// request-response traffic). Cleared under the readiness seen before the
/// read: an event after it still wakes the pump, and an EOF, once seen, is
/// never cleared.
fn read_draining(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    let mut short = None;
    let r = from.try_io(Interest::READABLE, || {
        let n = (&*SockRef::from(from)).read(buf)?;
        if n > 0 && n < buf.len() {
            short = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short {
        Some(n) => Ok(n),
        None => r,
    }
}

/// Copies until EOF, or until `moved` reaches `limit`. Holds no buffer
/// while waiting for data, and one only while `to` is slower than `from`.
async fn copy_pump(
    from: &TcpStream,
    to: &TcpStream,
    c: Count<'_>,
    limit: u64,
) -> Result<Copied, PumpError> {
    while c.moved.load(Relaxed) < limit {
        from.readable().await.map_err(PumpError::Read)?;
        let (rest, last) = match forward(from, to, c) {
            Err(PumpError::Read(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
            Ok(Step::Eof) => {
                pass_fin(to, c).map_err(PumpError::Write)?;
                return Ok(Copied::Eof);
            }
            Ok(Step::Read { rest, last }) => (rest, last),
        };
        let mut data = &rest[..];
        while !data.is_empty() {
            to.writable().await.map_err(PumpError::Write)?;
            match to.try_write(data) {
                Ok(k) => {
                    data = &data[k..];
                    c.add(k);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        if last {
            // Also what sends the bytes held back by MSG_MORE.
            pass_fin(to, c).map_err(PumpError::Write)?;
            return Ok(Copied::Eof);
        }
    }
    Ok(Copied::Limit)
}

async fn splice_pump(from: &TcpStream, to: &TcpStream, c: Count<'_>) -> Result<bool, PumpError> {
    let mut spliced = false;
    loop {
        from.readable().await.map_err(PumpError::Read)?;
        // Borrowed only while bytes are in flight, so an idle connection
        // holds no pipe (see splice.rs). Dropped with bytes in it (the
        // other side failed), it is closed, not pooled.
        let pipe = match Pipe::take() {
            Ok(p) => p,
            // Out of fds (or pipe memory): nothing is in flight, so this
            // direction goes on copying instead of failing a working
            // connection.
            Err(e) if is_resource_exhaustion(&e) => {
                debug!("no pipe for splice ({e}); copying instead");
                return Ok(false);
            }
            Err(e) => return Err(PumpError::Read(e)),
        };
        let n = match from.try_io(Interest::READABLE, || pipe.fill(from.as_fd(), pipe.size)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back(true);
                continue;
            }
            Err(e) if !spliced && e.raw_os_error() == Some(libc::EINVAL) => {
                pipe.give_back(true);
                return Ok(false);
            }
            r => r.map_err(PumpError::Read)?,
        };
        if n == 0 {
            pipe.give_back(true);
            return pass_fin(to, c).map(|()| true).map_err(PumpError::Write);
        }
        spliced = true;
        c.activity.touch();
        let mut in_pipe = n;
        while in_pipe > 0 {
            to.writable().await.map_err(PumpError::Write)?;
            match to.try_io(Interest::WRITABLE, || pipe.drain(to.as_fd(), in_pipe)) {
                Ok(k) => {
                    in_pipe -= k;
                    c.add(k);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        pipe.give_back(true);
    }
}

/// Passes the end of a direction on to `to`. For the second direction to
/// end, the close that follows at once sends the same FIN (`to` has read
/// its own EOF, so nothing unread can turn the close into a reset): the
/// shutdown(2) is left out, one syscall less per connection.
fn pass_fin(to: &TcpStream, c: Count<'_>) -> io::Result<()> {
    if c.ended.fetch_add(1, Relaxed) > 0 {
        return Ok(());
    }
    SockRef::from(to).shutdown(std::net::Shutdown::Write)
}

/// Relays both ways until both directions finished, one failed, or a
/// limit ran out (the caller resets both legs then). Bytes are added to
/// the binding's counters as they move, so that counters of long
/// connections are live.
async fn relay(
    b: &Binding,
    client: &TcpStream,
    upstream: &TcpStream,
    moved: &Moved,
    settle: impl FnOnce(),
) -> End {
    let activity = &moved.activity;
    let totals = b.stats.conn();
    let up_count = Count {
        moved: &moved.c2u,
        total: &totals.bytes_in,
        activity,
        ended: &moved.ended,
    };
    let down_count = Count {
        moved: &moved.u2c,
        total: &totals.bytes_out,
        activity,
        ended: &moved.ended,
    };
    let up = async {
        match pump(client, upstream, up_count).await {
            Ok(()) => {
                activity.touch();
                Dir::Done
            }
            Err(PumpError::Read(e)) => Dir::Failed("client read failed", e),
            Err(PumpError::Write(e)) => Dir::Failed("upstream write failed", e),
        }
    };
    let down = async {
        match pump(upstream, client, down_count).await {
            Ok(()) => {
                activity.touch();
                Dir::Done
            }
            Err(PumpError::Read(e)) => Dir::Failed("upstream read failed", e),
            Err(PumpError::Write(e)) => Dir::Failed("client write failed", e),
        }
    };
    relay::both_ways(
        b,
        activity,
        true,
        std::pin::pin!(up),
        std::pin::pin!(down),
        settle,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::SocketSpec;

    /// Two ends of a loopback connection: (the far peer, nsproxy's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let far = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (near, _) = l.accept().await.unwrap();
        (far, near)
    }

    /// Waits (bounded) until the reactor has seen `s`'s peer end its side.
    async fn until_read_closed(s: &TcpStream) {
        let seen = async {
            while !s.ready(Interest::READABLE).await.unwrap().is_read_closed() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), seen)
            .await
            .expect("the peer's end seen within 5 s");
    }

    /// A FIN already in when a read drains the socket is seen without a
    /// read of its own; data or no FIN after the read is not taken for it.
    #[tokio::test]
    async fn a_fin_behind_the_last_bytes_is_seen_without_reading() {
        use tokio::io::AsyncWriteExt;
        let (mut far, near) = pair().await;
        let mut buf = vec![0u8; BUF_SIZE];
        far.write_all(b"partial").await.unwrap();
        near.readable().await.unwrap();
        assert_eq!(read_draining(&near, &mut buf).unwrap(), 7);
        assert!(!fin_follows(&near), "no FIN was sent");
        far.write_all(b"last").await.unwrap();
        far.shutdown().await.unwrap();
        // Both are in before the read.
        until_read_closed(&near).await;
        assert_eq!(read_draining(&near, &mut buf).unwrap(), 4);
        assert!(fin_follows(&near));
    }

    /// Bytes followed by a reset (a peer killed with unread data) are not
    /// taken for a clean end: the reset must reach the client as one.
    #[tokio::test]
    async fn a_reset_behind_the_last_bytes_is_no_fin() {
        use tokio::io::AsyncWriteExt;
        let (mut far, near) = pair().await;
        let mut buf = vec![0u8; BUF_SIZE];
        far.write_all(b"partial").await.unwrap();
        SockRef::from(&far)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(far);
        until_read_closed(&near).await;
        // The reset discards what was not read: the read may fail at once.
        match read_draining(&near, &mut buf) {
            Ok(n) => assert!(n <= 7),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        }
        assert!(!fin_follows(&near), "a reset is not a FIN");
    }

    /// With paused time: a silent connection ends at `idle_timeout`; once
    /// half-closed, at the shorter `half_close_timeout` of silence.
    #[tokio::test(start_paused = true)]
    async fn silence_ends_a_relay_at_the_limit_that_applies() {
        let b =
            crate::proxy::test_binding("idle_timeout = \"30s\"\nhalf_close_timeout = \"5s\"").await;
        let (_client_far, client) = pair().await;
        let (_upstream_far, upstream) = pair().await;
        let moved = Moved::new();
        let t0 = tokio::time::Instant::now();
        let end = relay(&b, &client, &upstream, &moved, || {}).await;
        assert!(
            matches!(end, End::Expired(Expired::Idle(d)) if d == Duration::from_secs(30)),
            "{end:?}"
        );
        assert!(t0.elapsed() >= Duration::from_secs(30));

        let (client_far, client) = pair().await;
        let (mut upstream_far, upstream) = pair().await;
        let moved = Moved::new();
        let t0 = tokio::time::Instant::now();
        SockRef::from(&client_far)
            .shutdown(std::net::Shutdown::Write)
            .unwrap();
        let relayed = relay(&b, &client, &upstream, &moved, || {});
        let fin_seen = async {
            // The FIN is passed on, and then nothing more moves.
            let mut buf = [0u8; 8];
            assert_eq!(
                tokio::io::AsyncReadExt::read(&mut upstream_far, &mut buf)
                    .await
                    .unwrap(),
                0
            );
            std::future::pending::<()>().await
        };
        let end = tokio::select! {
            end = relayed => end,
            () = fin_seen => unreachable!(),
        };
        assert!(
            matches!(end, End::Expired(Expired::HalfClose(d)) if d == Duration::from_secs(5)),
            "{end:?}"
        );
        let took = t0.elapsed();
        assert!(took >= Duration::from_secs(5) && took < Duration::from_secs(30));
    }

    /// An idle connection is its task and two sockets: the task is the
    /// connection's memory, so its size is watched (the relay's buffers
    /// are per thread, see `SCRATCH`).
    #[tokio::test]
    async fn an_idle_connection_holds_a_small_task() {
        let b = crate::proxy::test_binding("").await;
        let (_far, near) = pair().await;
        let first = Early::ask(&b, SocketSpec::tcp(&b.rule.upstream));
        let inherited = Inherited {
            nodelay: true,
            keepalive: None,
        };
        let task = handle(
            b.clone(),
            near,
            "127.0.0.1:1".parse().unwrap(),
            first,
            inherited,
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 2048, "the connection's future is {size} bytes");
    }
}
