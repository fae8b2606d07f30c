//! TCP: a listener per binding, and a relay per accepted connection.
//!
//! Each accepted connection gets an upstream socket created in the rule's
//! upstream namespace, a connect bounded by the rule's timeout, and then a
//! relay in both directions that passes a FIN on (half-close) while the other
//! direction keeps flowing, and a reset as a reset.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use socket2::SockRef;
use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{Instrument, info, info_span, warn};

use super::splice::Pipe;
use super::{Binding, BindingStats, ListenError, Served, accept, proxy_header};
use crate::config::ProxyProtocol;
use crate::netns::{NsError, SocketSpec};

/// Size of each direction's relay buffer.
const BUF_SIZE: usize = 32 * 1024;

/// Creates the listening socket for `binding` in its namespace.
pub(crate) async fn listen(b: &Binding) -> Result<std::net::TcpListener, ListenError> {
    let addr = b.rule.listen;
    let socket = b.switcher.socket(b.ns, SocketSpec::tcp(&addr)).await?;
    let at = |source: io::Error| ListenError::Socket { addr, source };
    socket.set_reuse_address(true).map_err(at)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // `[::]` means both families, whatever net.ipv6.bindv6only says.
        socket.set_only_v6(false).map_err(at)?;
    }
    socket
        .bind(&addr.into())
        .map_err(|source| ListenError::Bind { addr, source })?;
    socket
        .listen(b.rule.backlog.min(i32::MAX as u32) as i32)
        .map_err(|source| ListenError::Bind { addr, source })?;
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
            let span = info_span!(
                "conn",
                rule = %b.rule.name,
                netns = %b.netns,
                peer = %peer,
                upstream = %b.rule.upstream,
            );
            handle(b, client, peer).instrument(span)
        },
    )
    .await;
    match idle.map(TcpListener::into_std) {
        None => Served::Stopped,
        Some(Ok(l)) => Served::Idle(l),
        Some(Err(e)) => Served::Lost(format!("cannot park the idle socket: {e}")),
    }
}

async fn handle(b: Arc<Binding>, client: TcpStream, peer: SocketAddr) {
    // Declared first, dropped last: after the relay freed its buffers.
    let _open = super::trim::Open::new();
    let started = Instant::now();
    b.stats.active.fetch_add(1, Relaxed);
    let _active = scopeguard(&b);
    // As it was when the client was accepted, whatever a reload does meanwhile.
    let proxy_header = b.proxy_protocol();
    let mut upstream = match connect(&b).await {
        Ok(s) => s,
        Err(e) => {
            b.stats.connect_failed.fetch_add(1, Relaxed);
            warn!("upstream connect failed: {e}; resetting the client connection");
            reset(&client);
            return;
        }
    };
    if let Some(version) = proxy_header {
        if let Err(e) = send_proxy_header(&b, version, &client, peer, &mut upstream).await {
            b.stats.connect_failed.fetch_add(1, Relaxed);
            warn!(
                "sending the PROXY protocol {version} header to the upstream failed: {e}; resetting both connections"
            );
            reset(&client);
            reset(&upstream);
            return;
        }
    }
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let r = relay(client, upstream, &b.stats).await;
    info!(
        bytes_from_client = r.client_to_upstream,
        bytes_to_client = r.upstream_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        "connection closed: {}",
        r.end
    );
}

/// Starts `upstream` with the PROXY protocol header for `client`, before any
/// of the client's bytes.
async fn send_proxy_header(
    b: &Binding,
    version: ProxyProtocol,
    client: &TcpStream,
    peer: SocketAddr,
    upstream: &mut TcpStream,
) -> io::Result<()> {
    let local = client.local_addr()?;
    let header = proxy_header::header(version, peer, local, &b.netns.to_string());
    upstream.write_all(&header).await
}

/// Decrements the active count however `handle` ends (including abort).
fn scopeguard(b: &Arc<Binding>) -> impl Drop + '_ {
    struct Active<'a>(&'a Binding);
    impl Drop for Active<'_> {
        fn drop(&mut self) {
            self.0.stats.active.fetch_sub(1, Relaxed);
        }
    }
    Active(b)
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Socket(#[from] NsError),
    #[error("{} after {:?}", describe(.0), .1)]
    Connect(io::Error, Duration),
    #[error("no answer within {0:?} (connect_timeout)")]
    Timeout(Duration),
}

fn describe(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "connection refused".into(),
        Some(libc::ENETUNREACH) => "network unreachable from the upstream namespace".into(),
        Some(libc::EHOSTUNREACH) => "host unreachable from the upstream namespace".into(),
        _ => e.to_string(),
    }
}

async fn connect(b: &Binding) -> Result<TcpStream, ConnectError> {
    let to = b.rule.upstream;
    let socket = b
        .switcher
        .pooled_socket(b.upstream_ns, SocketSpec::tcp(&to))
        .await?;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
    let started = Instant::now();
    match tokio::time::timeout(b.rule.connect_timeout, socket.connect(to)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(ConnectError::Connect(e, started.elapsed())),
        Err(_) => Err(ConnectError::Timeout(b.rule.connect_timeout)),
    }
}

/// Closes with RST instead of FIN, so the peer learns the connection failed
/// rather than seeing a clean, empty end of stream.
fn reset(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// What a finished relay moved, and how it ended.
pub(crate) struct RelayResult {
    pub client_to_upstream: u64,
    pub upstream_to_client: u64,
    pub end: End,
}

/// How a relay ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Both sides sent FIN.
    Closed,
    /// One side failed or reset; the other side was reset.
    Error(&'static str, io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Closed => f.write_str("both sides closed"),
            End::Error(what, e) => write!(f, "{what}: {e}; the other side was reset"),
        }
    }
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
/// The buffer of that first, copied part.
const SMALL_BUF: usize = 8 * 1024;

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
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    moved: &mut u64,
    total: &AtomicU64,
) -> Result<(), PumpError> {
    if mode() == Mode::Splice {
        let small = vec![0u8; SMALL_BUF];
        if copy_pump(from, to, moved, total, small, SPLICE_AFTER).await? == Copied::Eof {
            return Ok(());
        }
        // Ok(false): splice cannot serve this pair of sockets, copy instead.
        if splice_pump(from, to, moved, total).await? {
            return Ok(());
        }
    }
    let buf = vec![0u8; BUF_SIZE];
    copy_pump(from, to, moved, total, buf, u64::MAX)
        .await
        .map(|_| ())
}

/// Copies through `buf` until EOF, or until `moved` reaches `limit`.
async fn copy_pump(
    from: &TcpStream,
    to: &TcpStream,
    moved: &mut u64,
    total: &AtomicU64,
    mut buf: Vec<u8>,
    limit: u64,
) -> Result<Copied, PumpError> {
    while *moved < limit {
        let n = loop {
            from.readable().await.map_err(PumpError::Read)?;
            match from.try_read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break r.map_err(PumpError::Read)?,
            }
        };
        if n == 0 {
            shutdown_write(to).map_err(PumpError::Write)?;
            return Ok(Copied::Eof);
        }
        let mut data = &buf[..n];
        while !data.is_empty() {
            to.writable().await.map_err(PumpError::Write)?;
            match to.try_write(data) {
                Ok(k) => {
                    data = &data[k..];
                    *moved += k as u64;
                    total.fetch_add(k as u64, Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
    }
    Ok(Copied::Limit)
}

async fn splice_pump(
    from: &TcpStream,
    to: &TcpStream,
    moved: &mut u64,
    total: &AtomicU64,
) -> Result<bool, PumpError> {
    let mut spliced = false;
    loop {
        from.readable().await.map_err(PumpError::Read)?;
        // Borrowed only while bytes are in flight, so an idle connection
        // holds no pipe (see splice.rs). Dropped with bytes in it (the
        // other side failed), it is closed, not pooled.
        let pipe = Pipe::take().map_err(PumpError::Read)?;
        let n = match from.try_io(Interest::READABLE, || {
            pipe.fill(from.as_raw_fd(), pipe.size)
        }) {
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
            return shutdown_write(to).map(|()| true).map_err(PumpError::Write);
        }
        spliced = true;
        let mut in_pipe = n;
        while in_pipe > 0 {
            to.writable().await.map_err(PumpError::Write)?;
            match to.try_io(Interest::WRITABLE, || pipe.drain(to.as_raw_fd(), in_pipe)) {
                Ok(k) => {
                    in_pipe -= k;
                    *moved += k as u64;
                    total.fetch_add(k as u64, Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        pipe.give_back(true);
    }
}

fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    SockRef::from(s).shutdown(std::net::Shutdown::Write)
}

/// Relays both ways until both directions finished or one failed.
/// Bytes are added to `stats` as they move, so that counters of long
/// connections are live.
pub(crate) async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    stats: &BindingStats,
) -> RelayResult {
    let (mut c2u, mut u2c) = (0u64, 0u64);
    let end = {
        let mut up = std::pin::pin!(pump(&client, &upstream, &mut c2u, &stats.bytes_in));
        let mut down = std::pin::pin!(pump(&upstream, &client, &mut u2c, &stats.bytes_out));
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(PumpError::Read(e)) => break End::Error("client read failed", e),
                    Err(PumpError::Write(e)) => break End::Error("upstream write failed", e),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(PumpError::Read(e)) => break End::Error("upstream read failed", e),
                    Err(PumpError::Write(e)) => break End::Error("client write failed", e),
                },
            }
            if up_done && down_done {
                break End::Closed;
            }
        }
    };
    if let End::Error(..) = end {
        reset(&client);
        reset(&upstream);
    }
    RelayResult {
        client_to_upstream: c2u,
        upstream_to_client: u2c,
        end,
    }
}
