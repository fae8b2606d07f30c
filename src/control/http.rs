//! HTTP/1.1 for the control API and the metrics endpoint, on hyper: the
//! limits that keep a slow or hostile client from holding what the relays
//! need, and the control API's client.
//!
//! Each endpoint answers one request per connection and holds at most
//! [`Limits::max_connections`] connections; a client has
//! [`Limits::read_timeout`] to send its request head and
//! [`Limits::write_timeout`] to take the whole answer, from its first byte.
//! hyper parses the request (malformed heads get its 400, 414 or 431) and
//! writes the body as a shared buffer, without copying it per client; a
//! request line in another HTTP version is answered 505 here, before hyper
//! sees it ([`VersionWatch`]).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tracing::{debug, warn};

/// Longest request head accepted (hyper's minimum buffer); the endpoints
/// have no use for more. A longer head is answered 431.
const MAX_HEAD: usize = 8192;
/// Refusals at the cap within this long are logged as one line.
const REPORT_INTERVAL: Duration = Duration::from_secs(10);
/// The answer to a request line whose version is not HTTP/1.x. hyper would
/// answer it with a bare 400 (and HTTP/2's connection preface with no answer
/// at all); the client is better told what is wrong.
const VERSION_NOT_SUPPORTED: &[u8] = b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain\r\nContent-Length: 45\r\nConnection: close\r\n\r\nnsproxy's HTTP endpoints speak HTTP/1.x only\n";

/// What one endpoint allows each client, and how many clients at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From the connection's accept to the end of its request head.
    pub read_timeout: Duration,
    /// From the first byte of the answer to its last: a client that does not
    /// read is dropped (with a reset) after this long.
    pub write_timeout: Duration,
    /// Connections open at once; one more is answered 503 and closed at once.
    pub max_connections: usize,
}

impl Limits {
    /// The control API's: local tools, one request at a time each.
    pub const CONTROL: Limits = Limits {
        read_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(10),
        max_connections: 16,
    };
    /// The metrics endpoint's: a few Prometheus servers scraping now and then.
    pub const METRICS: Limits = Limits {
        read_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(10),
        max_connections: 64,
    };
}

/// What happened to one endpoint's connections, for the metrics.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Connections served (not counting those refused at the cap).
    pub accepted: AtomicU64,
    /// Connections answered 503 and closed because `max_connections` were open.
    pub refused_at_cap: AtomicU64,
    /// Connections closed because the request head did not come in time.
    pub read_timeouts: AtomicU64,
    /// Connections reset because the client did not take the answer in time.
    pub write_timeouts: AtomicU64,
    /// Connections answered 403 because the peer's user may not use the
    /// endpoint (the control API checks SO_PEERCRED).
    pub refused_peer: AtomicU64,
}

/// The two HTTP endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Control,
    Metrics,
}

impl Endpoint {
    /// The name in logs and in the `endpoint` label.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Control => "control",
            Endpoint::Metrics => "metrics",
        }
    }

    /// This endpoint's counters.
    pub fn stats(self, s: &HttpStats) -> &EndpointStats {
        match self {
            Endpoint::Control => &s.control,
            Endpoint::Metrics => &s.metrics,
        }
    }
}

/// Both endpoints' counters.
#[derive(Debug, Default)]
pub struct HttpStats {
    pub control: EndpointStats,
    pub metrics: EndpointStats,
}

/// The listeners the endpoints run on (a unix socket, a TCP port).
pub(crate) trait Listener: Send + 'static {
    type Conn: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn accept(&self) -> io::Result<Self::Conn> {
        tokio::net::UnixListener::accept(self).await.map(|(c, _)| c)
    }
}

impl Listener for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    async fn accept(&self) -> io::Result<Self::Conn> {
        tokio::net::TcpListener::accept(self).await.map(|(c, _)| c)
    }
}

/// The answer every endpoint gives; the body is shared, not copied, among
/// the clients it goes to.
pub(crate) type Answer = Response<Full<Bytes>>;

/// Builds an answer.
pub(crate) fn answer(status: StatusCode, content_type: &'static str, body: Bytes) -> Answer {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// 405 with the `Allow` header the standard asks for.
pub(crate) fn not_allowed(allow: &'static str, content_type: &'static str, body: Bytes) -> Answer {
    let mut r = answer(StatusCode::METHOD_NOT_ALLOWED, content_type, body);
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// Serves `listener` with `handler` until the task is dropped. `refusal` is
/// the whole answer written (without waiting) to a client beyond the cap.
pub(crate) async fn serve<L, H, F>(
    listener: L,
    endpoint: Endpoint,
    limits: Limits,
    stats: Arc<HttpStats>,
    refusal: &'static [u8],
    handler: H,
) where
    L: Listener,
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Answer> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let name = endpoint.name();
    let mut refused = Refusals::default();
    let (mut failed_accepts, mut last_accept_log) = (0u64, None);
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            () = refused.interval_end(), if refused.open() => {
                refused.flush(name, limits.max_connections);
                continue;
            }
        };
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // Out of fds, most likely: back off instead of spinning,
                // and say so once per interval, not ten times a second.
                failed_accepts += 1;
                if last_accept_log.is_none_or(|t: Instant| t.elapsed() >= REPORT_INTERVAL) {
                    warn!(
                        count = failed_accepts,
                        "{name} accept failed: {e} ({failed_accepts} time(s) since the last report; retrying every 100 ms)"
                    );
                    failed_accepts = 0;
                    last_accept_log = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            endpoint.stats(&stats).refused_at_cap.fetch_add(1, Relaxed);
            refuse(&conn, refusal);
            refused.note(name, limits.max_connections);
            continue;
        };
        endpoint.stats(&stats).accepted.fetch_add(1, Relaxed);
        let handler = handler.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            connection(conn, limits, endpoint.stats(&stats), handler, permit).await;
        });
    }
}

/// Writes `refusal` if the socket takes it now, then closes: a client
/// beyond the cap costs one fd for an instant, never a wait.
pub(crate) fn refuse<C: AsFd>(conn: &C, refusal: &[u8]) {
    let s = socket2::SockRef::from(conn);
    // A short answer fits in any send buffer; if it does not, the close
    // alone tells the client.
    let _ = s.send_with_flags(refusal, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
    let _ = s.shutdown(std::net::Shutdown::Write);
    // What the client sent already is read and dropped, so that the close
    // is a FIN after the answer: unread data would make it a reset, which
    // may throw the answer away before the client reads it.
    let mut sink = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
    for _ in 0..16 {
        match s.recv_with_flags(&mut sink, libc::MSG_DONTWAIT) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// Rate limits the warning that an endpoint is at its cap: the first
/// refusal is logged at once, later ones within [`REPORT_INTERVAL`] as one
/// line when it ends.
#[derive(Default)]
struct Refusals {
    /// When the open interval ends, if one is open.
    until: Option<Instant>,
    /// Refusals since the last line.
    suppressed: u64,
}

impl Refusals {
    fn open(&self) -> bool {
        self.until.is_some()
    }

    fn note(&mut self, endpoint: &str, cap: usize) {
        if self.until.is_some() {
            self.suppressed += 1;
            return;
        }
        warn!("{endpoint}: {cap} connections open (the most allowed); closed a new one with 503");
        self.until = Some(Instant::now() + REPORT_INTERVAL);
    }

    async fn interval_end(&self) {
        match self.until {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }

    fn flush(&mut self, endpoint: &str, cap: usize) {
        let n = std::mem::take(&mut self.suppressed);
        if n == 0 {
            self.until = None;
            return;
        }
        warn!(
            count = n,
            "{endpoint}: closed {n} more connection(s) with 503 in the last {REPORT_INTERVAL:?}: {cap} were open (the most allowed)"
        );
        self.until = Some(Instant::now() + REPORT_INTERVAL);
    }
}

async fn connection<C, H, F>(
    conn: C,
    limits: Limits,
    stats: &EndpointStats,
    handler: H,
    _slot: OwnedSemaphorePermit,
) where
    C: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Answer> + Send + 'static,
{
    let io = WriteDeadline::new(conn, limits.write_timeout);
    let service = hyper::service::service_fn(move |req| {
        let answer = handler(req);
        async move { Ok::<_, Infallible>(answer.await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.read_timeout)
        .keep_alive(false)
        // A client that sends its request and shuts its side down (`nc -N`)
        // still gets the answer.
        .half_close(true)
        .max_buf_size(MAX_HEAD)
        // The body goes out as the shared buffer it is, not copied into a
        // write buffer of this connection's.
        .writev(true)
        .serve_connection(TokioIo::new(io), service)
        .await;
    match served {
        Ok(()) => {}
        Err(e) if e.is_timeout() => {
            stats.read_timeouts.fetch_add(1, Relaxed);
            debug!(
                "closed a connection whose request did not come within {:?}",
                limits.read_timeout
            );
        }
        Err(e) if timed_out(&e) => {
            stats.write_timeouts.fetch_add(1, Relaxed);
            debug!(
                "reset a connection that did not take its answer within {:?}",
                limits.write_timeout
            );
        }
        Err(e) => debug!("HTTP connection failed: {e}"),
    }
}

fn timed_out(e: &hyper::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return io.kind() == io::ErrorKind::TimedOut;
        }
        source = s.source();
    }
    false
}

/// A connection whose writes must all be done within `timeout` of the
/// first: past it, writes fail and the socket is reset when dropped, so the
/// kernel does not keep its unsent data either. Its reads go through a
/// [`VersionWatch`].
struct WriteDeadline<C> {
    conn: C,
    timeout: Duration,
    /// Armed by the first write.
    deadline: Option<Pin<Box<Sleep>>>,
    version: VersionWatch,
}

/// Follows the request line as its bytes are read, to spot a version other
/// than HTTP/1.x (`HTTP/` and a major digit other than 1) at the very byte
/// where hyper's parser would refuse it, so that it is answered 505 before
/// hyper sees it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum VersionWatch {
    /// In the method (or before the line).
    #[default]
    Method,
    Target,
    /// In the version, with this many bytes of `HTTP/` matched.
    Version(u8),
    /// Nothing more to watch: the version is 1.x, or the line is malformed
    /// in a way hyper answers itself.
    Done,
    /// A version these endpoints do not speak.
    Unsupported,
}

impl VersionWatch {
    /// Takes the next bytes read; true once the version is known to be one
    /// these endpoints do not speak.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        use VersionWatch::*;
        for &b in bytes {
            *self = match (*self, b) {
                (Done | Unsupported, _) => break,
                (Method, b' ') => Target,
                (Target, b' ') => Version(0),
                (Method | Target, b'\r' | b'\n') => Done,
                (Method | Target, _) => *self,
                (Version(n), b) if n < 5 => {
                    if b == b"HTTP/"[usize::from(n)] {
                        Version(n + 1)
                    } else {
                        Done
                    }
                }
                (Version(_), b'0' | b'2'..=b'9') => Unsupported,
                (Version(_), _) => Done,
            };
        }
        *self == Unsupported
    }
}

impl<C: AsFd> WriteDeadline<C> {
    fn new(conn: C, timeout: Duration) -> WriteDeadline<C> {
        WriteDeadline {
            conn,
            timeout,
            deadline: None,
            version: VersionWatch::default(),
        }
    }

    /// Errs once the deadline has passed; otherwise makes sure the task is
    /// woken when it does.
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if deadline.as_mut().poll(cx).is_ready() {
            // RST instead of FIN: the rest of the answer is thrown away now.
            let _ = socket2::SockRef::from(&self.conn).set_linger(Some(Duration::ZERO));
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not take the answer in time",
            ));
        }
        Ok(())
    }
}

impl<C: AsyncRead + AsFd + Unpin> AsyncRead for WriteDeadline<C> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.conn).poll_read(cx, buf))?;
        if this.version.feed(&buf.filled()[before..]) {
            // hyper gets an error instead of the bytes, so it writes nothing
            // of its own after this answer.
            refuse(&this.conn, VERSION_NOT_SUPPORTED);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the request is not HTTP/1.x: answered 505",
            )));
        }
        Poll::Ready(Ok(()))
    }
}

impl<C: AsyncWrite + AsFd + Unpin> AsyncWrite for WriteDeadline<C> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.conn).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check(cx)?;
        Pin::new(&mut this.conn).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.conn.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.deadline.is_some() {
            this.check(cx)?;
        }
        Pin::new(&mut this.conn).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.deadline.is_some() {
            this.check(cx)?;
        }
        Pin::new(&mut this.conn).poll_shutdown(cx)
    }
}

/// Client side: sends `METHOD path` and returns (status, body). The
/// request is written whole before the answer is read, so that an answer
/// the server gives at once (a 503 at its cap) is read like any other.
pub(crate) async fn call<S>(mut s: S, method: Method, path: &str) -> io::Result<(u16, String)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: nsproxy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    // The server may have answered and closed already: then its answer is
    // what counts.
    let sent = s.write_all(req.as_bytes()).await;
    let mut resp = Vec::new();
    let read = s.read_to_end(&mut resp).await;
    if resp.is_empty() {
        sent?;
        read?;
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut head = httparse::Response::new(&mut headers);
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let body_at = match head.parse(&resp) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(invalid("incomplete HTTP answer".into())),
        Err(e) => return Err(invalid(format!("not an HTTP answer: {e}"))),
    };
    let status = head.code.ok_or_else(|| invalid("no HTTP status".into()))?;
    Ok((
        status,
        String::from_utf8_lossy(&resp[body_at..]).into_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(pieces: &[&[u8]]) -> bool {
        let mut w = VersionWatch::default();
        pieces.iter().any(|p| w.feed(p))
    }

    #[test]
    fn a_version_other_than_1_x_is_spotted_however_the_line_arrives() {
        assert!(watch(&[b"GET /metrics HTTP/2.0\r\n\r\n"]));
        assert!(
            watch(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]),
            "HTTP/2's preface"
        );
        assert!(watch(&[b"GET / HTTP/0.9\r\n"]));
        assert!(watch(&[b"GET /me", b"trics HT", b"TP/", b"3"]));
        for fine in [
            &b"GET /metrics HTTP/1.1\r\n\r\n"[..],
            b"GET /metrics HTTP/1.0\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"hello there\r\n\r\n",
            b"GET /metrics http/2.0\r\n",
            b"GET /metrics HTTP/x\r\n",
            // Only the request line is looked at.
            b"GET / HTTP/1.1\r\nX: HTTP/2.0 y z\r\n\r\n",
        ] {
            assert!(!watch(&[fine]), "{:?}", String::from_utf8_lossy(fine));
        }
    }

    #[test]
    fn the_505_is_a_whole_http_answer() {
        let text = std::str::from_utf8(VERSION_NOT_SUPPORTED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 505 "));
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
    }
}
