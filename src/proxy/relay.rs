//! What the relays of every protocol share, written once: the spans their
//! log lines carry, the upstream connect (socket with back-off, timeout,
//! the client giving up, the error and its description), the gauge of open
//! connections, the two-way relay loop with its idle check, the cut of a
//! connection dropped mid-way, and the listener's own idle check.
//!
//! The protocol modules keep only what differs: how a socket is made and
//! connected, how bytes or messages move, and their words in the logs.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::timeout::{self, Activity, Expired, Verdict};
use super::{Binding, trim};
use crate::config::Protocol;
use crate::netns::{NsError, SocketFuture, SocketSpec};

/// The span of one connection (association, session): a root span, so that
/// a line's innermost span names the rule and namespace (what log readers
/// look up), without the listener's span repeating them.
macro_rules! conn_span {
    ($name:literal, $b:expr, $peer:expr) => {
        tracing::info_span!(
            parent: None,
            $name,
            rule = %$b.rule.name,
            netns = %$b.netns,
            peer = %$peer,
            upstream = %$b.rule.upstream,
        )
    };
}
pub(crate) use conn_span;

impl Binding {
    /// The span of the binding's listener (its serve task, its opening, its
    /// rate-limited reports): every line inside names the rule, namespace,
    /// protocol and listen address. Made per serve task, not kept: a parked
    /// listener holds none.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "binding",
            rule = %self.rule.name,
            netns = %self.netns,
            protocol = %self.rule.protocol,
            listen = %self.rule.listen,
        )
    }
}

/// A pause that doubles at each use, up to a ceiling.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

/// After accept(2), or receiving on a UDP listener, failed for lack of fds
/// or memory: the pause of the listener.
pub(crate) const LISTENER_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
/// Between tries to make an upstream socket while fds or memory are short.
const SOCKET_BACKOFF: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(500));

impl Backoff {
    const fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The pause to make now; the next one is twice as long.
    pub(crate) fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        d
    }

    /// Things work again: the next pause is the shortest.
    pub(crate) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// Sleeps for `d`, or less if the binding is told to stop meanwhile.
pub(crate) async fn pause(b: &Binding, d: Duration) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = b.stop.requested() => {}
    }
}

/// Whether an error means the process or the kernel is short of fds or
/// memory: a condition that passes, worth waiting out.
pub(crate) fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Shows IPv4 clients of a dual-stack listener as 1.2.3.4, not ::ffff:1.2.3.4.
pub(crate) fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Which of a binding's gauges an [`Active`] counts in.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Gauge {
    /// TCP connections, SCTP associations (`active`).
    Connections,
    /// UDP sessions (`sessions_active`).
    Sessions,
}

/// One open connection (association, session): counted in its gauge, and
/// in the process-wide count that decides when memory goes back to the
/// kernel ([`trim`]), for as long as it lives, however its task ends.
/// Make it first, so that it is dropped last, after the buffers.
pub(crate) struct Active {
    b: Arc<Binding>,
    gauge: Gauge,
    _open: trim::Open,
}

impl Active {
    pub(crate) fn new(b: Arc<Binding>, gauge: Gauge) -> Active {
        let open = trim::Open::new();
        Active::counter(&b, gauge).fetch_add(1, Relaxed);
        Active {
            b,
            gauge,
            _open: open,
        }
    }

    fn counter(b: &Binding, gauge: Gauge) -> &AtomicU64 {
        match gauge {
            Gauge::Connections => &b.stats.conn().active,
            Gauge::Sessions => &b.stats.udp().sessions_active,
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        Active::counter(&self.b, self.gauge).fetch_sub(1, Relaxed);
    }
}

/// Why an upstream connection (association) could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("{0}")]
    Socket(#[from] NsError),
    #[error("cannot set up the upstream socket: {0}")]
    Setup(io::Error),
    #[error("{} after {:?}", describe(*.0, .1), .2)]
    Connect(Protocol, io::Error, Duration),
    #[error("no answer within {0:?} (connect_timeout)")]
    Timeout(Duration),
    /// `upstream_source = "client"`: the upstream socket could not come
    /// from the client's address.
    #[error("{0}")]
    Source(#[from] super::source::SourceError),
    /// Not a failure of the upstream: the client reset (aborted) meanwhile.
    #[error("the client went away ({0}) after {1:?}")]
    ClientGone(io::Error, Duration),
}

/// What a connect error means, in the words of where it comes from.
pub(crate) fn describe(protocol: Protocol, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) if protocol == Protocol::Sctp => {
            "association refused (nothing listens there)".into()
        }
        Some(libc::ECONNREFUSED) => "connection refused".into(),
        Some(libc::ENETUNREACH) => "network unreachable from the upstream namespace".into(),
        Some(libc::EHOSTUNREACH) => "host unreachable from the upstream namespace".into(),
        // What connect(2) says when the route found is a blackhole.
        Some(libc::EINVAL) => format!(
            "no route: the upstream namespace's routing table blackholes the upstream address (a `blackhole` route; see `ip route get` there) ({e})"
        ),
        // A `prohibit` route, or a firewall rule in the OUTPUT path.
        Some(libc::EACCES | libc::EPERM) => format!(
            "prohibited by a route or firewall rule in the upstream namespace (a `prohibit` route, or a rule rejecting the connection) ({e})"
        ),
        _ => e.to_string(),
    }
}

/// Runs `attempt` (make the upstream socket, connect it) within `limit`,
/// the rule's `connect_timeout`, unless `gone` (the client resetting or
/// aborting) completes first. Both are pinned by the caller: a future
/// taken by value would be held twice in the connection's task (an async
/// fn keeps its arguments beside what it moves them into), and that task
/// lives as long as the connection.
pub(crate) async fn connect_within<T>(
    limit: Duration,
    attempt: Pin<&mut impl Future<Output = Result<T, ConnectError>>>,
    gone: Pin<&mut impl Future<Output = io::Error>>,
) -> Result<T, ConnectError> {
    let started = Instant::now();
    tokio::select! {
        r = tokio::time::timeout(limit, attempt) => r.unwrap_or(Err(ConnectError::Timeout(limit))),
        e = gone => Err(ConnectError::ClientGone(e, started.elapsed())),
    }
}

type SocketResult = Result<socket2::Socket, NsError>;

/// An upstream socket on its way (a pool or the namespace thread) or made;
/// `counted`: it failed for lack of fds and that was already reported.
pub(crate) struct Early {
    f: SocketFuture,
    counted: bool,
}

impl Early {
    /// Asks for `b`'s upstream socket of `spec` and polls once, now: a
    /// socket of nsproxy's own namespace is made on the spot, and if that
    /// failed for lack of fds the accept loop is told before it accepts
    /// again. (Otherwise a burst of clients is accepted first, each holding
    /// an fd while it waits for one more, and none gets it.)
    pub(crate) fn ask(b: &Binding, spec: SocketSpec) -> Early {
        let mut f = b.sockets.pooled_socket(b.upstream_ns, spec);
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(&mut f).poll(&mut cx) {
            Poll::Pending => Early { f, counted: false },
            Poll::Ready(r) => {
                let mut counted = false;
                if let Err(NsError::Socket { source, .. }) = &r {
                    if is_resource_exhaustion(source) {
                        super::exhausted(b, source);
                        counted = true;
                    }
                }
                Early {
                    f: SocketFuture::made(r),
                    counted,
                }
            }
        }
    }
}

/// An upstream socket of `spec` from `b`'s upstream namespace (`first`: one
/// already asked for). Out of fds or memory, it tells the accept loop to
/// pause ([`super::exhausted`]), so that clients wait in the backlog rather
/// than being accepted and reset, and tries again after a back-off, until
/// the caller's `connect_timeout` ends the wait.
pub(crate) async fn upstream_socket(
    b: &Binding,
    spec: SocketSpec,
    first: Option<Early>,
) -> SocketResult {
    let mut backoff = SOCKET_BACKOFF;
    let mut next = first;
    loop {
        let (made, counted) = match next.take() {
            Some(first) => (first.f.await, first.counted),
            None => (b.sockets.pooled_socket(b.upstream_ns, spec).await, false),
        };
        match made {
            Err(NsError::Socket { source, .. }) if is_resource_exhaustion(&source) => {
                if !counted {
                    super::exhausted(b, &source);
                }
                tokio::time::sleep(backoff.next()).await;
            }
            r => return r,
        }
    }
}

/// How one direction of a relay ended.
pub(crate) enum Dir {
    /// The sending side finished (FIN, SHUTDOWN), passed on to the other.
    Done,
    /// Reading or sending failed: what failed, and why.
    Failed(&'static str, io::Error),
}

/// How a relay ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Both directions finished.
    Closed,
    /// One side failed; the other side was reset (aborted).
    Failed(&'static str, io::Error),
    /// A limit ran out; both sides were reset (aborted).
    Expired(Expired),
}

/// How a protocol words the end of a relay in its close line.
pub(crate) struct Words {
    /// Both directions finished: "both sides closed".
    pub(crate) closed: &'static str,
    /// What is done to a side that did not end on its own: "reset".
    pub(crate) cut: &'static str,
}

impl End {
    /// The end in `words`, for the close line.
    pub(crate) fn describe(&self, words: &Words) -> String {
        match self {
            End::Closed => words.closed.to_owned(),
            End::Failed(what, e) => format!("{what}: {e}; the other side was {}", words.cut),
            End::Expired(why) => format!("{why}; both sides were {}", words.cut),
        }
    }
}

/// How long a connection lives before it does what only long connections
/// need ([`both_ways`]'s `settle`): short ones, most of request/reply
/// traffic, never pay for it.
pub(crate) const SETTLE_AFTER: Duration = Duration::from_secs(1);

/// Runs both directions of a relay until both are done, one fails, or a
/// limit of the binding (read again after every event, so that a reload
/// applies) runs out for `activity`: `idle_timeout`, and, if the protocol
/// has half-close, `half_close_timeout` once one direction is done. The
/// limits are checked after events (a direction ending, the timer, a
/// reload), never per chunk; the caller resets both legs on an error or
/// expiry. The directions are pinned by the caller, so that the
/// connection's task holds each once (see [`connect_within`]).
///
/// A connection that lives [`SETTLE_AFTER`] runs `settle` then (TCP sets
/// keepalive on its legs), and only from then on is it woken by a reload:
/// one younger reads the new limits at that mark, at most a second late.
/// Both are syscalls or a shared lock per connection that a short
/// connection would pay for nothing.
pub(crate) async fn both_ways(
    b: &Binding,
    activity: &Activity,
    half_close: bool,
    mut up: Pin<&mut impl Future<Output = Dir>>,
    mut down: Pin<&mut impl Future<Output = Dir>>,
    settle: impl FnOnce(),
) -> End {
    let (mut up_done, mut down_done) = (false, false);
    let mut settle = Some(settle);
    let settle_at = activity.start() + SETTLE_AFTER;
    let timer = tokio::time::sleep_until(settle_at);
    tokio::pin!(timer);
    loop {
        if settle.is_some() && Instant::now() >= settle_at {
            if let Some(f) = settle.take() {
                f();
            }
        }
        // Made before the limits are read, so that a reload changing them
        // in between still wakes this (a `Notified` hears `notify_waiters`
        // from the moment it exists); polled, which takes the binding's
        // lock, only once settled.
        let woken = b.stop.woken();
        let half = half_close && (up_done || down_done);
        let wake_by = settle.is_some().then_some(settle_at);
        if let Some(why) = idle_check(timer.as_mut(), activity, half, b, half_close, wake_by) {
            return End::Expired(why);
        }
        // `None`: the timer or a reload, for the limits to be read again.
        let dir = tokio::select! {
            d = &mut up, if !up_done => {
                up_done = true;
                Some(d)
            }
            d = &mut down, if !down_done => {
                down_done = true;
                Some(d)
            }
            () = &mut timer => None,
            () = woken, if settle.is_none() => None,
        };
        if let Some(Dir::Failed(what, e)) = dir {
            return End::Failed(what, e);
        }
        if up_done && down_done {
            return End::Closed;
        }
    }
}

/// Whether the connection last active per `activity` has outlived a limit
/// of `b`; if not, sets `timer` for when it next could, or for `wake_by`
/// if that is sooner.
fn idle_check(
    timer: Pin<&mut Sleep>,
    activity: &Activity,
    half: bool,
    b: &Binding,
    half_close: bool,
    wake_by: Option<Instant>,
) -> Option<Expired> {
    let now = Instant::now();
    let mut limits = b.timeouts();
    if !half_close {
        limits.half_close = None;
    }
    let at = match timeout::check(now, activity.last(), half, limits) {
        Verdict::Expired(why) => return Some(why),
        Verdict::WakeAt(t) => t,
        Verdict::Never => timeout::far_future(now),
    };
    timer.reset(wake_by.map_or(at, |w| w.min(at)));
    None
}

/// A leg of a connection (association) that can be closed as a failure.
pub(crate) trait Abort {
    /// Makes closing send a reset (TCP RST, SCTP ABORT), not a clean end.
    fn abort(&self);
}

/// What a connection moved, as its cut line tells it.
pub(crate) trait Tally {
    /// Counts and logs the cut of a connection, `why` it was cut, and
    /// whether its upstream connect was still under way.
    fn cut(&self, b: &Binding, why: &str, connecting: bool);
}

/// Resets the legs of a connection (association) whose task is dropped
/// before it ends on its own: its listener's drain timeout ran out, or the
/// listener closed at once (a namespace deleted with
/// `on_netns_delete = "close"`). A plain drop would send FIN (SHUTDOWN),
/// which the peers could take for a complete exchange; the cut is also
/// counted and logged with its reason and what moved.
pub(crate) struct Cut<'a, L: Abort, T: Tally> {
    b: &'a Binding,
    client: &'a L,
    upstream: Option<&'a L>,
    tally: &'a T,
    armed: bool,
}

impl<'a, L: Abort, T: Tally> Cut<'a, L, T> {
    pub(crate) fn new(
        b: &'a Binding,
        client: &'a L,
        upstream: Option<&'a L>,
        tally: &'a T,
    ) -> Cut<'a, L, T> {
        Cut {
            b,
            client,
            upstream,
            tally,
            armed: true,
        }
    }

    /// The connection ends on its own terms.
    pub(crate) fn disarm(mut self) {
        self.armed = false;
    }
}

impl<L: Abort, T: Tally> Drop for Cut<'_, L, T> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.client.abort();
        if let Some(u) = self.upstream {
            u.abort();
        }
        let why = super::cut_reason(self.b);
        self.tally.cut(self.b, why, self.upstream.is_none());
    }
}

/// When a listener is idle enough to be parked: nothing arrived for a
/// whole period of `park_after`, and nothing is open. Checked once per
/// period, rather than re-armed per connection or datagram.
pub(crate) struct IdleCheck {
    every: Duration,
    timer: Pin<Box<Sleep>>,
    busy: bool,
}

impl IdleCheck {
    pub(crate) fn new(every: Duration) -> IdleCheck {
        IdleCheck {
            every,
            timer: Box::pin(tokio::time::sleep(every)),
            busy: false,
        }
    }

    /// Something arrived (or the listener was busy failing): not idle in
    /// this period.
    pub(crate) fn busy(&mut self) {
        self.busy = true;
    }

    /// Completes at the end of the period.
    pub(crate) async fn due(&mut self) {
        self.timer.as_mut().await;
    }

    /// At the end of a period: whether the listener is idle (`open`: it
    /// still has something open); if not, the next period starts.
    pub(crate) fn idle(&mut self, open: bool) -> bool {
        if !self.busy && !open {
            return true;
        }
        self.busy = false;
        self.timer.as_mut().reset(Instant::now() + self.every);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::pin;

    #[test]
    fn backoff_doubles_to_its_ceiling_and_resets() {
        let mut b = LISTENER_BACKOFF;
        let got: Vec<u64> = (0..7).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(got, [50, 100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(50));
    }

    #[test]
    fn connect_errors_say_what_the_errno_means_per_protocol() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(describe(Protocol::Tcp, &refused), "connection refused");
        assert_eq!(
            describe(Protocol::Sctp, &refused),
            "association refused (nothing listens there)"
        );
        let e = ConnectError::Connect(Protocol::Tcp, refused, Duration::from_millis(3));
        assert_eq!(e.to_string(), "connection refused after 3ms");
        let blackhole = io::Error::from_raw_os_error(libc::EINVAL);
        assert!(describe(Protocol::Sctp, &blackhole).starts_with("no route"));
    }

    #[tokio::test(start_paused = true)]
    async fn connect_within_times_out_or_sees_the_client_go() {
        let limit = Duration::from_secs(3);
        let slow = async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        };
        let r = connect_within(limit, pin!(slow), pin!(std::future::pending())).await;
        assert!(matches!(r, Err(ConnectError::Timeout(d)) if d == limit));
        let gone = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            io::Error::from_raw_os_error(libc::ECONNRESET)
        };
        let r = connect_within(
            limit,
            pin!(std::future::pending::<Result<(), _>>()),
            pin!(gone),
        )
        .await;
        assert!(
            matches!(r, Err(ConnectError::ClientGone(_, d)) if d == Duration::from_secs(1)),
            "{r:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_listener_is_idle_after_a_quiet_period_with_nothing_open() {
        let mut check = IdleCheck::new(Duration::from_secs(10));
        check.busy();
        check.due().await;
        assert!(!check.idle(false), "something arrived in this period");
        check.due().await;
        assert!(!check.idle(true), "something is open");
        let t0 = Instant::now();
        check.due().await;
        assert_eq!(t0.elapsed(), Duration::from_secs(10));
        assert!(check.idle(false));
    }

    #[tokio::test]
    async fn both_ways_ends_at_the_first_failure_or_when_both_are_done() {
        let b = crate::proxy::test_binding("").await;
        let activity = Activity::new();
        let failed = async { Dir::Failed("client read failed", io::Error::other("boom")) };
        let end = both_ways(
            &b,
            &activity,
            true,
            pin!(failed),
            pin!(std::future::pending()),
            || {},
        )
        .await;
        let words = Words {
            closed: "both sides closed",
            cut: "reset",
        };
        assert_eq!(
            end.describe(&words),
            "client read failed: boom; the other side was reset"
        );
        let done = || async { Dir::Done };
        let end = both_ways(&b, &activity, true, pin!(done()), pin!(done()), || {}).await;
        assert!(matches!(end, End::Closed), "{end:?}");
    }
}
