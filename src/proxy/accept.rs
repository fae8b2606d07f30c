//! The accept loop of the connection-oriented protocols (TCP, SCTP), and
//! small helpers every listener uses.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::task::{JoinError, JoinSet};
use tokio::time::Sleep;
use tracing::{debug, error, info, warn};

use super::relay::{
    Backoff, IdleCheck, LISTENER_BACKOFF, canonical, is_resource_exhaustion, pause,
};
use super::report::{REPORT_INTERVAL, Rated, Suppressed, Window};
use super::{Binding, StopMode, catch};

/// A listening socket that yields connections (or associations).
pub(crate) trait Accept: Send + Sync + 'static {
    type Conn: Send + 'static;
    /// The next connection and its peer.
    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Conn, SocketAddr)>> + Send;
    /// A connection the kernel has already set up in the backlog, taken
    /// without waiting (`WouldBlock` when there is none). Asks the socket
    /// itself, not the reactor's idea of its readiness.
    fn accept_queued(&self) -> io::Result<(Self::Conn, SocketAddr)>;
    /// Closes `conn` as a failure (TCP RST, SCTP ABORT), not a clean end.
    fn refuse(conn: Self::Conn);
}

impl Accept for tokio::net::TcpListener {
    type Conn = tokio::net::TcpStream;
    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Conn, SocketAddr)>> + Send {
        self.accept()
    }

    fn accept_queued(&self) -> io::Result<(Self::Conn, SocketAddr)> {
        let (s, peer) = socket2::SockRef::from(self).accept()?;
        s.set_nonblocking(true)?;
        let peer = peer
            .as_socket()
            .ok_or_else(|| io::Error::other("a TCP peer without an IP address"))?;
        Ok((tokio::net::TcpStream::from_std(s.into())?, peer))
    }

    fn refuse(conn: Self::Conn) {
        let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
    }
}

/// Accepts until the binding's stop is requested, handing each connection
/// to `handle` (a task each, owned by this loop: dropping the loop's future
/// closes them all). While the rule's `max_connections` are open it does not
/// accept: further clients wait in the listen backlog, as with HAProxy's
/// `maxconn`, rather than being turned away. Once stopped, connections get
/// up to `drain` to finish and the rest are closed ([`StopMode::Close`]: all
/// closed at once). Returns the listener instead when it has accepted
/// nothing for `park_after` and no connection is open, to be parked. `noun`
/// names a connection in logs.
pub(crate) async fn serve<L, H, F>(
    b: Arc<Binding>,
    listener: L,
    drain: Duration,
    park_after: Duration,
    noun: &'static str,
    handle: H,
) -> Option<L>
where
    L: Accept,
    H: Fn(Arc<Binding>, L::Conn, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let stats = b.stats.conn();
    let mut conns = JoinSet::new();
    let mut idle = IdleCheck::new(park_after);
    let mut at_cap = CapPause::default();
    // Out of fds or memory: for accept(2), and for upstream sockets.
    let (mut accept_short, mut upstream_short) = (Shortage::default(), Shortage::default());
    loop {
        // `len` counts finished tasks until they are reaped: reap them all,
        // so that the cap counts open connections only.
        while let Some(done) = conns.try_join_next() {
            ended(done, noun);
        }
        // Made before the stop flag and the cap are read: a stop or a
        // reload changing the cap after this wakes it.
        let woken = b.stop.woken();
        if b.stop.mode().is_some() {
            break;
        }
        let errno = b.exhausted.swap(0, Relaxed);
        if errno != 0 {
            // A connection could not get its upstream socket: accepting more
            // would only take more fds and reset them; clients wait in the
            // backlog instead, as when accept(2) itself runs out.
            let e = io::Error::from_raw_os_error(errno);
            upstream_short.pause(&b, &mut idle, |d, more| warn!(
                "cannot create upstream sockets: {e}{}; pausing accepts for {d:?} (clients wait in the listen backlog; counted in upstream_socket_exhausted){}",
                crate::sys::fd_exhaustion_hint(&e),
                more.since()
            )).await;
            continue;
        }
        let full = at_cap.check(&b, conns.len(), noun);
        tokio::select! {
            // In this order: a stop or new cap is seen before another
            // accept; finished connections are reaped at the top, so none of
            // these can keep the accept branch waiting.
            biased;
            () = woken => {}
            // A connection ended: its fds are free again.
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                ended(done, noun);
                upstream_short.backoff.reset();
            }
            () = idle.due() => {
                if idle.idle(!conns.is_empty()) {
                    at_cap.flush(noun);
                    return Some(listener);
                }
            }
            () = at_cap.report.as_mut(), if at_cap.window.is_open() => at_cap.report_due(noun),
            accepted = listener.accept_one(), if !full => match accepted {
                Ok((conn, peer)) => {
                    accept_short.backoff.reset();
                    idle.busy();
                    stats.accepted.fetch_add(1, Relaxed);
                    conns.spawn(handle(b.clone(), conn, canonical(peer)));
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    stats.accept_errors.fetch_add(1, Relaxed);
                    accept_short.pause(&b, &mut idle, |d, more| warn!(
                        "accept failed: {e}{}; pausing accepts for {d:?} (counted in accept_errors){}",
                        crate::sys::fd_exhaustion_hint(&e), more.since()
                    )).await;
                }
                Err(e) => {
                    // The pending connection died before we took it
                    // (ECONNABORTED, EPROTO, ...): nothing to back off from.
                    stats.accept_errors.fetch_add(1, Relaxed);
                    debug!("accept failed: {e}");
                }
            },
        }
    }
    at_cap.flush(noun);
    close(&b, listener, conns, &handle, noun, drain).await;
    None
}

/// Closes a stopped listener: takes its backlog, then lets connections
/// drain for up to `drain` (none with [`StopMode::Close`]).
async fn close<L, H, F>(
    b: &Arc<Binding>,
    listener: L,
    mut conns: JoinSet<()>,
    handle: &H,
    noun: &str,
    drain: Duration,
) where
    L: Accept,
    H: Fn(Arc<Binding>, L::Conn, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    take_backlog(b, &listener, &mut conns, handle, noun);
    drop(listener);
    if !conns.is_empty() {
        if b.stop.mode() == Some(StopMode::Close) {
            info!("listener closed; closing {} {noun}(s)", conns.len());
        } else {
            // The timeout of when the stop came: a reload may have changed it.
            drain_all(conns, b.stop.drain().unwrap_or(drain), noun).await;
        }
    }
}

/// Pauses of the accept loop for lack of fds or memory, of one kind: each
/// logged at most once per [`REPORT_INTERVAL`], the rest counted into its
/// next line.
struct Shortage {
    backoff: Backoff,
    rated: Rated,
}

impl Default for Shortage {
    fn default() -> Shortage {
        Shortage {
            backoff: LISTENER_BACKOFF,
            rated: Rated::default(),
        }
    }
}

impl Shortage {
    /// Pauses the loop (a busy period for the idle check), or less if the
    /// binding stops; `log` tells the pause, unless a line was logged less
    /// than an interval ago.
    async fn pause(
        &mut self,
        b: &Binding,
        idle: &mut IdleCheck,
        log: impl FnOnce(Duration, Suppressed),
    ) {
        let d = self.backoff.next();
        if let Some(more) = self.rated.ready() {
            log(d, more);
        }
        idle.busy();
        pause(b, d).await;
    }
}

/// The listener at `max_connections`: counted once per pause, the first
/// pause logged at once, later ones reported every [`REPORT_INTERVAL`].
struct CapPause {
    paused: bool,
    window: Window,
    /// When the pauses counted in `window` are reported.
    report: Pin<Box<Sleep>>,
}

impl Default for CapPause {
    fn default() -> CapPause {
        CapPause {
            paused: false,
            window: Window::default(),
            report: Box::pin(tokio::time::sleep(REPORT_INTERVAL)),
        }
    }
}

impl CapPause {
    /// Whether `open` connections fill the cap in force (a reload may have
    /// changed it); counts and logs the start of a pause.
    fn check(&mut self, b: &Binding, open: usize, noun: &str) -> bool {
        let cap = b.max_connections().unwrap_or(usize::MAX);
        let full = open >= cap;
        if full && !self.paused {
            // Counted once per pause, whether an accept or a reload
            // lowering the cap brought it.
            b.stats.conn().paused_at_cap.fetch_add(1, Relaxed);
            if self.window.first() {
                warn!(
                    "{open} {noun}(s) open, max_connections is {cap}: not accepting more until one closes (clients wait in the listen backlog); further pauses are counted (paused_at_cap) and reported every {REPORT_INTERVAL:?}"
                );
                self.rearm();
            }
        }
        self.paused = full;
        full
    }

    fn rearm(&mut self) {
        self.report
            .as_mut()
            .reset(tokio::time::Instant::now() + REPORT_INTERVAL);
    }

    /// At the end of an interval: reports its pauses, if any.
    fn report_due(&mut self, noun: &str) {
        if self.flush(noun) {
            self.rearm();
        }
    }

    /// Logs the times the cap was reached since the last line; returns
    /// whether there were any (the interval goes on), else closes it.
    fn flush(&mut self, noun: &str) -> bool {
        let Some(n) = self.window.take() else {
            return false;
        };
        warn!(
            count = n,
            "max_connections reached {n} more time(s) since the last report (each time, accepting paused until a {noun} closed)"
        );
        true
    }
}

/// Looks at how a connection's task ended: a panic is a bug in that
/// connection's handling, logged, and the listener goes on.
fn ended(done: Result<(), JoinError>, noun: &str) {
    if let Err(e) = done {
        if let Some(msg) = catch::panicked(e) {
            error!("a {noun}'s task panicked: {msg}; the {noun} was dropped, the listener goes on");
        }
    }
}

/// Takes the clients waiting in the listen backlog (their handshake done,
/// not yet accepted), which closing the listener would reset unseen: as
/// many as `max_connections` leaves room for become connections of the
/// closing listener and drain with the others; the rest (all of them when
/// the listener closes at once) are reset here, counted and logged.
fn take_backlog<L, H, F>(
    b: &Arc<Binding>,
    listener: &L,
    conns: &mut JoinSet<()>,
    handle: &H,
    noun: &str,
) where
    L: Accept,
    H: Fn(Arc<Binding>, L::Conn, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    // The socket lives on (a takeover, the fd store): what does not fit
    // is left queued for its next holder, not reset.
    let kept = super::backlog_is_kept();
    let room = match b.stop.mode() {
        Some(StopMode::Close) => 0,
        _ => b
            .max_connections()
            .map_or(usize::MAX, |cap| cap.saturating_sub(conns.len())),
    };
    let stats = b.stats.conn();
    let (mut taken, mut reset) = (0u64, 0u64);
    // Bounded: the backlog holds at most `backlog` (the kernel may allow
    // one more); clients still arriving are not chased.
    for _ in 0..=b.rule.backlog {
        if kept && taken as usize >= room {
            break;
        }
        match listener.accept_queued() {
            Ok((conn, peer)) if (taken as usize) < room => {
                taken += 1;
                stats.accepted.fetch_add(1, Relaxed);
                conns.spawn(handle(b.clone(), conn, canonical(peer)));
            }
            Ok((conn, _)) => {
                reset += 1;
                stats.backlog_reset.fetch_add(1, Relaxed);
                L::refuse(conn);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_resource_exhaustion(&e) => {
                stats.accept_errors.fetch_add(1, Relaxed);
                warn!(
                    "accept failed while closing the listener: {e}{}; {noun}(s) still in its backlog are reset",
                    crate::sys::fd_exhaustion_hint(&e)
                );
                break;
            }
            Err(e) => {
                // One that died in the backlog: skip it, as the loop does.
                stats.accept_errors.fetch_add(1, Relaxed);
                debug!("accept failed: {e}");
            }
        }
    }
    if taken > 0 {
        info!("took {taken} {noun}(s) waiting in the listen backlog before closing the listener");
    }
    if reset > 0 {
        let why = if b.stop.mode() == Some(StopMode::Close) {
            "the listener closes at once"
        } else {
            "max_connections are open"
        };
        warn!(
            count = reset,
            "reset {reset} {noun}(s) waiting in the listen backlog as the listener closed: {why} (see backlog_reset)"
        );
    }
}

/// Gives open connections up to `drain` to finish, then closes the rest.
async fn drain_all(mut conns: JoinSet<()>, drain: Duration, noun: &str) {
    let open = conns.len();
    info!("listener closed; draining {open} {noun}(s) for up to {drain:?}");
    let drained = tokio::time::timeout(drain, async {
        while let Some(done) = conns.join_next().await {
            ended(done, noun);
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            "closing {} {noun}(s) still open after {drain:?}",
            conns.len()
        );
        conns.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::atomic::AtomicUsize;

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// Clients whose handshake is done when the listener closes: within
    /// `max_connections` they are served, the rest reset and counted; on an
    /// immediate close all are reset.
    #[test]
    fn a_closing_listener_serves_its_backlog_within_the_cap() {
        let rt = crate::runtime::build(1).unwrap();
        rt.block_on(async {
            for (mode, served_want) in [(StopMode::Drain, 2), (StopMode::Close, 0)] {
                let b = crate::proxy::test_binding("max_connections = 2").await;
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                // Three handshakes done, waiting in the backlog.
                let mut clients: Vec<std::net::TcpStream> = (0..3)
                    .map(|_| std::net::TcpStream::connect(addr).unwrap())
                    .collect();
                crate::proxy::until_queued(&listener, 3).await;
                b.stop.request(mode);
                let served = Arc::new(AtomicUsize::new(0));
                let counted = served.clone();
                let handle = move |_b: Arc<Binding>, mut conn: tokio::net::TcpStream, _peer| {
                    let counted = counted.clone();
                    async move {
                        counted.fetch_add(1, Relaxed);
                        let _ = conn.write_all(b"hi").await;
                    }
                };
                let idle = serve(
                    b.clone(),
                    listener,
                    Duration::from_secs(5),
                    Duration::from_secs(60),
                    "connection",
                    handle,
                )
                .await;
                assert!(idle.is_none());
                assert_eq!(served.load(Relaxed), served_want, "{mode:?}");
                assert_eq!(b.stats.conn().accepted.load(Relaxed), served_want as u64);
                assert_eq!(
                    b.stats.conn().backlog_reset.load(Relaxed),
                    3 - served_want as u64
                );
                let mut answered = 0;
                for c in &mut clients {
                    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                    let mut buf = [0u8; 2];
                    match c.read_exact(&mut buf) {
                        Ok(()) => {
                            assert_eq!(&buf, b"hi");
                            answered += 1;
                        }
                        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{mode:?}"),
                    }
                }
                assert_eq!(answered, served_want, "{mode:?}");
            }
        });
    }
}
