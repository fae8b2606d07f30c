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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Binding, ListenError};
use crate::netns::{NsError, SocketSpec};

/// Size of each direction's relay buffer.
const BUF_SIZE: usize = 32 * 1024;
/// Accept back-off after running out of fds or memory: first and longest pause.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Creates the listening socket for `binding` in its namespace.
pub(crate) async fn listen(b: &Binding) -> Result<TcpListener, ListenError> {
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
    TcpListener::from_std(std::net::TcpListener::from(socket)).map_err(at)
}

/// Accepts until `shutdown` turns true, then lets connections drain for up
/// to `drain` and closes the rest.
pub(crate) async fn serve(
    b: Arc<Binding>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut conns = JoinSet::new();
    let mut backoff = BACKOFF_MIN;
    loop {
        tokio::select! {
            _ = stopped(&mut shutdown) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    backoff = BACKOFF_MIN;
                    b.stats.accepted.fetch_add(1, Relaxed);
                    let span = info_span!(
                        "conn",
                        rule = %b.rule.name,
                        netns = %b.netns,
                        peer = %canonical(peer),
                        upstream = %b.rule.upstream,
                    );
                    conns.spawn(handle(b.clone(), client).instrument(span));
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    b.stats.accept_errors.fetch_add(1, Relaxed);
                    warn!(rule = %b.rule.name, netns = %b.netns, listen = %b.rule.listen,
                        "accept failed: {e}; pausing accepts for {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(e) => {
                    // The pending connection died before we took it (ECONNABORTED,
                    // EPROTO, ...): nothing to back off from.
                    b.stats.accept_errors.fetch_add(1, Relaxed);
                    debug!(rule = %b.rule.name, netns = %b.netns, "accept failed: {e}");
                }
            },
        }
    }
    drop(listener);
    let open = conns.len();
    if open > 0 {
        info!(rule = %b.rule.name, netns = %b.netns, "listener closed; draining {open} connection(s) for up to {drain:?}");
        let drained =
            tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(rule = %b.rule.name, netns = %b.netns, "closing {} connection(s) still open after {drain:?}", conns.len());
            conns.shutdown().await;
        }
    }
}

/// Completes once shutdown was requested (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Shows IPv4 clients of a dual-stack listener as 1.2.3.4, not ::ffff:1.2.3.4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

async fn handle(b: Arc<Binding>, client: TcpStream) {
    let started = Instant::now();
    b.stats.active.fetch_add(1, Relaxed);
    let _active = scopeguard(&b);
    let upstream = match connect(&b).await {
        Ok(s) => s,
        Err(e) => {
            b.stats.connect_failed.fetch_add(1, Relaxed);
            warn!("upstream connect failed: {e}; resetting the client connection");
            reset(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let r = relay(client, upstream).await;
    b.stats.bytes_in.fetch_add(r.client_to_upstream, Relaxed);
    b.stats.bytes_out.fetch_add(r.upstream_to_client, Relaxed);
    info!(
        bytes_from_client = r.client_to_upstream,
        bytes_to_client = r.upstream_to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        "connection closed: {}",
        r.end
    );
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
        .socket(b.upstream_ns, SocketSpec::tcp(&to))
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

/// Copies `from` to `to` until EOF, then sends FIN on `to`.
async fn pump<R, W>(from: &mut R, to: &mut W, moved: &mut u64) -> Result<(), PumpError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = from.read(&mut buf).await.map_err(PumpError::Read)?;
        if n == 0 {
            return to.shutdown().await.map_err(PumpError::Write);
        }
        to.write_all(&buf[..n]).await.map_err(PumpError::Write)?;
        *moved += n as u64;
    }
}

/// Relays both ways until both directions finished or one failed.
pub(crate) async fn relay(mut client: TcpStream, mut upstream: TcpStream) -> RelayResult {
    let (mut c2u, mut u2c) = (0u64, 0u64);
    let end = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let mut up = std::pin::pin!(pump(&mut cr, &mut uw, &mut c2u));
        let mut down = std::pin::pin!(pump(&mut ur, &mut cw, &mut u2c));
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
