//! UDP: a listening socket per binding, and a session per client.
//!
//! A session belongs to one client address and port. It owns an upstream
//! socket created in the rule's upstream namespace and connected to the
//! upstream, so the upstream's replies arrive on that socket and go back to
//! exactly that client, and the upstream sees one stable source port per
//! client. Each datagram is passed on whole, or dropped and counted: never
//! cut short, merged or split.
//!
//! ```text
//! client ─► listening socket ─► listener task ─queue─► session task ─► upstream socket ─► upstream
//! client ◄─ listening socket ◄──────────────────────── session task ◄─ upstream socket ◄─ upstream
//!           (sendmmsg from the address the client sent to)
//! ```
//!
//! The listener task only receives, looks the client up and queues the
//! datagram without waiting, so a slow or dead upstream stalls nobody but
//! its own session: when a session's queue is full, the datagram is
//! dropped and counted. Replies leave the listening socket from the
//! address the client's datagram was sent to (`IP_PKTINFO` /
//! `IPV6_PKTINFO`, in the syscall layer, `sys::udp`), which matters for a
//! wildcard listener on a namespace with several addresses.
//!
//! **Batches.** Every hop moves up to `BATCH` (32) datagrams per syscall when
//! that many are waiting, and one when one is: the listener takes what the
//! kernel has queued with one `recvmmsg`; a session takes what its queue
//! holds and sends it upstream with one `sendmmsg`; it takes what its
//! upstream socket holds with one `recvmmsg` and sends it to its client
//! with one `sendmmsg`, straight from the receive slots. Nothing waits to
//! fill a batch. Replies are batched per session, not across the sessions
//! of a listener: see `relay_replies` for why.
//! Within a batch, a run of datagrams of one size to one peer goes as a
//! single `UDP_SEGMENT` (GSO) send where the kernel and route allow it;
//! where they do not, the limit is learnt once and the datagrams go one
//! by one.
//!
//! **Buffers.** Datagrams are received into per-thread slots (`SLOTS`);
//! a client's datagram is copied out of its slot into a buffer from a pool
//! (`POOL`) that its session gives back once it has sent it, so the
//! steady path allocates nothing per datagram. Replies are never copied.
//!
//! A session ends after `udp_idle_timeout` without a datagram in either
//! direction, and its task, queue and socket go with it. At most
//! `udp_max_sessions` sessions exist per binding; a datagram from a further
//! new client is dropped, counted and logged. A "port unreachable" answer
//! from the upstream (ECONNREFUSED) is counted and logged and the session
//! stays until it is idle: the upstream may come back, and the client keeps
//! its upstream source port. At shutdown sessions end at once.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};
use tracing::{Instrument, debug, error, info};

use super::relay::{Active, Gauge, IdleCheck, LISTENER_BACKOFF, canonical, conn_span, pause};
use super::report::{Kind, Reporter};
use super::{Binding, ListenError, Served, StopMode, UdpStats, catch};
use crate::netns::SocketSpec;
use crate::sys::udp::{self as udp_sys, BATCH, RecvBatch, ReplyFrom};

mod session;

/// Receive slot size, both directions: larger than any UDP payload short
/// of an IPv6 jumbogram (65,507 bytes over IPv4, 65,527 over IPv6), so a
/// datagram that does not fit is reported as truncated rather than cut.
/// [`BATCH`] slots per worker thread, not per session or binding: 10,000
/// idle sessions do not each hold 64 KiB.
const RECV_BUF: usize = 64 * 1024;
/// Capacity of the pooled buffers that carry a client's datagram to its
/// session: an Ethernet MTU's worth (1,472 bytes of UDP payload) and
/// more. Longer datagrams get a buffer of their own size, not pooled.
const POOLED_LEN: usize = 2048;
/// Most buffers the pool keeps (2 MiB), whatever the number of bindings:
/// enough for the datagrams in flight at a high steady rate; a burst
/// beyond it allocates, and gives the memory back after.
const POOL_MAX: usize = 1024;
/// Socket receive buffer asked for on listening sockets, so that a burst
/// from many clients waits in the kernel instead of being dropped there.
/// The kernel caps it at `net.core.rmem_max` (twice that, in fact).
const LISTEN_RCVBUF: usize = 4 << 20;
/// Datagrams a session may have waiting for its upstream socket. The
/// listener takes up to [`BATCH`] at a time from the kernel's much larger
/// buffer, and on a loaded machine a session's task can wait a few
/// milliseconds for a worker: 128 lost a few hundred datagrams in 150,000
/// at 50,000 a second from one client on 2 busy cores; 1,024 lost none
/// (measured with examples/udp_pps.rs)...
const QUEUE_LEN: usize = 1024;
/// ...and the memory their buffers may take together (capacity, not
/// length, so a pooled buffer counts whole), so that sessions whose task
/// falls behind cannot hold 1,024 × 64 KiB each. Sends to an upstream
/// hardly ever block (UDP has no flow control), so this fills only while
/// a session's task is not scheduled.
const QUEUE_BYTES: usize = 2 << 20;
// A new session's queue always has room for its first datagram, and
// QUEUE_LEN small ones fit in QUEUE_BYTES.
const _: () = assert!(QUEUE_BYTES >= RECV_BUF && QUEUE_BYTES >= QUEUE_LEN * POOLED_LEN);
/// How long sessions get at shutdown to finish the send they are in.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Creates the listening socket for `b` in its namespace.
pub(crate) async fn listen(b: &Binding) -> Result<std::net::UdpSocket, ListenError> {
    let addr = b.rule.listen;
    let socket = b.sockets.socket(b.ns, SocketSpec::udp(&addr)).await?;
    let at = |source: io::Error| ListenError::Socket { addr, source };
    // No SO_REUSEADDR: on UDP it would let a second socket share the port
    // and take some of its datagrams, instead of failing with "in use".
    let dual_stack = addr.is_ipv6() && addr.ip().is_unspecified();
    if dual_stack {
        // `[::]` means both families, whatever net.ipv6.bindv6only says.
        socket.set_only_v6(false).map_err(at)?;
    }
    udp_sys::enable_pktinfo(socket.as_fd(), addr.is_ipv6(), dual_stack).map_err(at)?;
    if let Err(e) = udp_sys::enable_drop_count(socket.as_fd()) {
        debug!(listen = %addr, "cannot count the kernel's drops (SO_RXQ_OVFL): {e}");
    }
    if let Err(e) = socket.set_recv_buffer_size(LISTEN_RCVBUF) {
        debug!(listen = %addr, "cannot enlarge the receive buffer: {e}");
    }
    super::bind_listen(b, &socket, addr, &[]).await?;
    // Non-blocking since socket(2), as tokio needs when a task serves it.
    Ok(std::net::UdpSocket::from(socket))
}

/// Receives and relays until the binding stops, then ends every session.
/// Gives the socket back instead (with the kernel's drop count as last
/// seen, `kernel_drops` here) once it has received nothing for
/// `park_after` and has no session left, to be parked.
pub(crate) async fn serve(
    b: Arc<Binding>,
    socket: std::net::UdpSocket,
    mut kernel_drops: u32,
    park_after: Duration,
) -> Served<(std::net::UdpSocket, u32)> {
    let socket = match UdpSocket::from_std(socket) {
        Ok(s) => s,
        Err(e) => return Served::Lost(format!("cannot watch the socket: {e}")),
    };
    let shared = Arc::new(Shared {
        ipv6: b.rule.listen.is_ipv6(),
        gso_to_client: udp_sys::Gso::new(),
        gso_to_upstream: udp_sys::Gso::new(),
        // Its reports are logged in the serve task's span, the binding's.
        warnings: Arc::new(Reporter::new(tracing::Span::current())),
        stats: b.stats.udp().clone(),
        b,
        socket,
        sessions: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(0),
    });
    let b = &shared.b;
    let mut tasks = JoinSet::new();
    let mut backoff = LISTENER_BACKOFF;
    let mut idle = IdleCheck::new(park_after);
    // One batch of datagrams between receiving and dispatching them; kept,
    // so that its room is reused. Allocated with the first datagram: at
    // thousands of namespaces most listeners stay idle, and the room for a
    // batch is 3 KiB.
    let mut inbox = Vec::new();
    loop {
        tokio::select! {
            _ = b.stop.requested() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => ended(done),
            () = idle.due() => {
                // No session task left means no one else holds `shared`.
                let open = !tasks.is_empty() || Arc::strong_count(&shared) > 1;
                if idle.idle(open) {
                    drop(tasks);
                    return park(shared, kernel_drops);
                }
            }
            r = shared.socket.async_io(Interest::READABLE, || recv_from_clients(&shared.socket, &mut inbox)) => match r {
                Ok(()) => {
                    backoff.reset();
                    idle.busy();
                    pass_on(&shared, &mut tasks, &mut inbox, &mut kernel_drops);
                }
                Err(e) => {
                    // An unconnected socket gets no ICMP errors, so this is
                    // the kernel short of memory (or something stranger):
                    // pause rather than spin on it.
                    shared.stats.recv_errors.fetch_add(1, Relaxed);
                    let d = backoff.next();
                    shared.warnings.warn(Warn::RecvFailed, || format!(
                        "receiving on {} failed: {e}; pausing this listener for {d:?}",
                        b.rule.listen
                    ));
                    idle.busy();
                    pause(b, d).await;
                }
            },
        }
    }
    end_sessions(&shared, tasks).await;
    Served::Stopped
}

/// Looks at how a session's task ended: a panic is a bug in that session,
/// logged, and the listener goes on (the client's next datagram starts a
/// new session, as its queue is closed).
fn ended(done: Result<(), JoinError>) {
    if let Err(e) = done {
        match catch::panicked(e) {
            Some(msg) => error!(
                "a UDP session's task panicked: {msg}; the session was dropped, the listener goes on"
            ),
            None => error!("a UDP session's task was cancelled"),
        }
    }
}

/// Hands each datagram of a received batch to its session.
fn pass_on(
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    inbox: &mut Vec<Incoming>,
    kernel_drops: &mut u32,
) {
    let b = &shared.b;
    for Incoming { meta, data } in inbox.drain(..) {
        kernel_dropped(
            shared,
            kernel_drops,
            meta.kernel_drops,
            Warn::KernelDrops,
            |new| {
                format!(
                    "the kernel dropped {new} datagram(s) for {}: the socket's receive buffer was full (raise net.core.rmem_max to allow a larger one)",
                    b.rule.listen
                )
            },
        );
        let Some(peer) = meta.peer else {
            // Only a socket that is not IP has senders without an IP
            // address: never here.
            shared.stats.recv_errors.fetch_add(1, Relaxed);
            continue;
        };
        if meta.truncated {
            dropped_truncated(shared, meta.len, canonical(peer));
            continue;
        }
        let d = Datagram {
            data,
            reply_from: meta.reply_from,
        };
        dispatch(shared, tasks, peer, d);
    }
}

/// Gives an idle listener's socket back, to be parked.
fn park(shared: Arc<Shared>, kernel_drops: u32) -> Served<(std::net::UdpSocket, u32)> {
    let Ok(shared) = Arc::try_unwrap(shared) else {
        unreachable!("the last reference to an idle listener's state")
    };
    match shared.socket.into_std() {
        Ok(socket) => Served::Idle((socket, kernel_drops)),
        Err(e) => Served::Lost(format!("cannot park the idle socket: {e}")),
    }
}

/// Ends every session of a stopped listener: at once when it closes at
/// once, else after a short grace to finish the send they are in.
async fn end_sessions(shared: &Shared, mut tasks: JoinSet<()>) {
    // Closing every queue tells each session to end; it logs what it moved.
    let open = {
        let mut sessions = shared.lock_sessions();
        let n = sessions.len();
        sessions.clear();
        n
    };
    if open > 0 {
        info!("listener closed; ending {open} UDP session(s)");
    }
    let grace = match shared.b.stop.mode() {
        Some(StopMode::Close) => Duration::ZERO,
        _ => SHUTDOWN_GRACE,
    };
    let ended =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if ended.is_err() {
        tasks.shutdown().await;
    }
}

/// Counts the datagrams the kernel dropped on a socket, from its running
/// count `total` (if the datagram came with one) and `last`, the count as
/// last reported; `message` says which socket, given the number.
fn kernel_dropped(
    shared: &Shared,
    last: &mut u32,
    total: Option<u32>,
    kind: Warn,
    message: impl FnOnce(u32) -> String,
) {
    let Some(total) = total else { return };
    let new = total.wrapping_sub(*last);
    *last = total;
    if new > 0 {
        shared
            .stats
            .dropped_by_kernel
            .fetch_add(u64::from(new), Relaxed);
        shared.warnings.warn(kind, || message(new));
    }
}

/// Counts and logs a datagram dropped because it did not fit a receive slot.
fn dropped_truncated(shared: &Shared, len: usize, from: impl std::fmt::Display) {
    shared.stats.truncated.fetch_add(1, Relaxed);
    shared.warnings.warn(Warn::Truncated, || {
        format!("dropped a {len}-byte datagram from {from}: larger than the {RECV_BUF}-byte buffer")
    });
}

/// What one binding's listener task and its sessions share.
struct Shared {
    b: Arc<Binding>,
    /// `b`'s counters, held apart so that counting a datagram goes straight
    /// to them.
    stats: Arc<UdpStats>,
    /// The listening socket: the listener task receives on it; sessions send
    /// their replies with it, so that replies come from the listen port.
    socket: UdpSocket,
    /// The listening socket's family, which decides the packet-info form.
    ipv6: bool,
    /// How large a segment the routes to clients and to the upstream take
    /// in one UDP GSO send, as learnt so far.
    gso_to_client: udp_sys::Gso,
    gso_to_upstream: udp_sys::Gso,
    /// Live sessions by client address. Locked briefly and never across an
    /// await. Queueing a datagram and deciding that a session is idle both
    /// happen under this lock, so no datagram is queued to a session that
    /// is ending.
    sessions: Mutex<HashMap<SocketAddr, Entry>>,
    /// Tells a session apart from a later one of the same client.
    next_id: AtomicU64,
    warnings: Arc<Reporter<Warn>>,
}

impl Shared {
    fn lock_sessions(&self) -> MutexGuard<'_, HashMap<SocketAddr, Entry>> {
        // A panic elsewhere cannot leave the map half-updated: every
        // change is a single insert, remove or clear.
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes session `id` of `peer` if nothing waits in its queue; false
    /// if a datagram arrived meanwhile (the session is not idle after all).
    fn remove_if_idle(&self, peer: SocketAddr, id: u64, rx: &mpsc::Receiver<Datagram>) -> bool {
        let mut sessions = self.lock_sessions();
        if !rx.is_empty() {
            return false;
        }
        forget(&mut sessions, peer, id);
        true
    }
}

/// Removes session `id` of `peer` from the map (a later session of the same
/// client is left alone), and gives back the room a past burst of sessions
/// took: a HashMap never shrinks by itself.
fn forget(sessions: &mut HashMap<SocketAddr, Entry>, peer: SocketAddr, id: u64) {
    if sessions.get(&peer).is_some_and(|e| e.id == id) {
        sessions.remove(&peer);
    }
    if sessions.capacity() > 1024 && sessions.len() < sessions.capacity() / 8 {
        sessions.shrink_to(sessions.len() * 2);
    }
}

/// The listener's handle on one session.
struct Entry {
    id: u64,
    tx: mpsc::Sender<Datagram>,
    /// Buffer bytes (capacity) waiting in the queue, against
    /// [`QUEUE_BYTES`].
    queued: Arc<AtomicUsize>,
}

impl Entry {
    /// Queues `d` without waiting.
    fn offer(&self, d: Datagram) -> Result<(), mpsc::error::TrySendError<Datagram>> {
        let size = d.size();
        if self.queued.fetch_add(size, Relaxed) + size > QUEUE_BYTES {
            self.queued.fetch_sub(size, Relaxed);
            return Err(mpsc::error::TrySendError::Full(d));
        }
        self.tx.try_send(d).inspect_err(|_| {
            self.queued.fetch_sub(size, Relaxed);
        })
    }
}

/// A client's datagram on its way to the upstream.
struct Datagram {
    /// Usually a pooled buffer (see [`POOL`]), which the session gives back.
    data: Vec<u8>,
    /// Where the client sent it, which is where replies must come from.
    reply_from: Option<ReplyFrom>,
}

impl Datagram {
    /// The memory it holds, as counted against [`QUEUE_BYTES`].
    fn size(&self) -> usize {
        self.data.capacity()
    }
}

/// One datagram of a batch from the listening socket, copied out of its
/// slot (or not, when it was truncated: then `data` is empty).
struct Incoming {
    meta: udp_sys::Received,
    data: Vec<u8>,
}

thread_local! {
    /// Each worker thread's receive slots (see [`RECV_BUF`]). Borrowed only
    /// inside a synchronous receive-and-pass-on step, never across an
    /// await, so one set serves every listener and session of the thread.
    static SLOTS: RefCell<Box<RecvBatch>> = RefCell::new(RecvBatch::new(RECV_BUF));
}

/// Buffers for clients' datagrams, recycled: the listener takes one per
/// datagram it queues, and the session gives it back once the datagram is
/// sent. Shared by every binding, so that its size is bounded however many
/// there are; locked once per batch on each side.
struct Pool(Mutex<Vec<Vec<u8>>>);

static POOL: Pool = Pool(Mutex::new(Vec::new()));

impl Pool {
    fn lock(&self) -> MutexGuard<'_, Vec<Vec<u8>>> {
        // A Vec of buffers stays whole whatever panicked.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes back buffers whose datagrams were sent or dropped: those of
    /// the pooled size, up to [`POOL_MAX`]; the others are freed.
    fn put_back(&self, bufs: impl IntoIterator<Item = Vec<u8>>) {
        let mut free = self.lock();
        for buf in bufs {
            if buf.capacity() == POOLED_LEN && free.len() < POOL_MAX {
                free.push(buf);
            }
        }
    }
}

/// `data` in a buffer of its own: a recycled one from `free` (the pool,
/// locked) when it fits one.
fn copy_out(free: &mut Vec<Vec<u8>>, data: &[u8]) -> Vec<u8> {
    if data.len() > POOLED_LEN {
        return data.to_vec();
    }
    let mut buf = free.pop().unwrap_or_else(|| Vec::with_capacity(POOLED_LEN));
    buf.clear();
    buf.extend_from_slice(data);
    buf
}

/// Receives a batch of datagrams from the listening socket into `inbox`.
fn recv_from_clients(socket: &UdpSocket, inbox: &mut Vec<Incoming>) -> io::Result<()> {
    SLOTS.with_borrow_mut(|slots| {
        let n = slots.recv(socket.as_fd(), true)?;
        inbox.reserve_exact(BATCH);
        let mut free = POOL.lock();
        for i in 0..n {
            let (meta, bytes) = slots.get(i);
            let data = if meta.truncated {
                Vec::new()
            } else {
                copy_out(&mut free, bytes)
            };
            inbox.push(Incoming { meta, data });
        }
        Ok(())
    })
}

/// Hands a client's datagram to its session, starting one if needed.
fn dispatch(shared: &Arc<Shared>, tasks: &mut JoinSet<()>, peer: SocketAddr, d: Datagram) {
    let b = &shared.b;
    let mut sessions = shared.lock_sessions();
    let offered = match sessions.get(&peer) {
        Some(e) => e.offer(d),
        None => Err(mpsc::error::TrySendError::Closed(d)),
    };
    let d = match offered {
        Ok(()) => return,
        Err(mpsc::error::TrySendError::Full(d)) => {
            drop(sessions);
            shared.stats.dropped_queue_full.fetch_add(1, Relaxed);
            shared.warnings.warn(Warn::QueueFull, || {
                format!(
                    "dropped a {}-byte datagram from {}: its session's queue to the upstream is full",
                    d.data.len(),
                    canonical(peer)
                )
            });
            POOL.put_back([d.data]);
            return;
        }
        Err(mpsc::error::TrySendError::Closed(d)) => {
            // A new client, or (only after a bug killed a session task) a
            // closed queue: start a fresh session.
            sessions.remove(&peer);
            d
        }
    };
    let max = b.rule.udp_max_sessions;
    if sessions.len() >= max {
        drop(sessions);
        shared.stats.dropped_at_cap.fetch_add(1, Relaxed);
        shared.warnings.warn(Warn::AtCap, || {
            format!(
                "session limit reached (udp_max_sessions = {max}): dropped a datagram from new client {}",
                canonical(peer)
            )
        });
        POOL.put_back([d.data]);
        return;
    }
    let (tx, rx) = mpsc::channel(QUEUE_LEN);
    let id = shared.next_id.fetch_add(1, Relaxed);
    let entry = Entry {
        id,
        tx,
        queued: Arc::new(AtomicUsize::new(0)),
    };
    let queued = entry.queued.clone();
    if entry.offer(d).is_err() {
        unreachable!("an empty queue has room for one datagram (QUEUE_BYTES >= RECV_BUF)");
    }
    sessions.insert(peer, entry);
    drop(sessions);

    shared.stats.sessions_created.fetch_add(1, Relaxed);
    // Made here, not in the task: a task aborted before its first poll
    // still drops it.
    let active = Active::new(b.clone(), Gauge::Sessions);
    let span = conn_span!("udp_session", b, canonical(peer));
    let session = session::Session {
        shared: shared.clone(),
        peer,
        id,
        queued,
        _active: active,
    };
    tasks.spawn(session.run(rx).instrument(span));
}

/// The kinds of warning a UDP binding rate-limits, each on its own.
#[derive(Debug, Clone, Copy)]
enum Warn {
    AtCap,
    QueueFull,
    Truncated,
    SendFailed,
    Refused,
    NoUpstream,
    RecvFailed,
    KernelDrops,
    UpstreamKernelDrops,
}

impl Kind for Warn {
    const COUNT: usize = 9;

    fn index(self) -> usize {
        self as usize
    }

    fn events(self) -> &'static str {
        match self {
            Warn::AtCap => "datagram(s) from new clients dropped at the session limit",
            Warn::QueueFull => "datagram(s) dropped because a session's queue was full",
            Warn::Truncated => "oversized datagram(s) dropped",
            Warn::SendFailed => "datagram(s) dropped because a send failed",
            Warn::Refused => "\"port unreachable\" report(s) from the upstream",
            Warn::NoUpstream => "session(s) that could not open their upstream socket",
            Warn::RecvFailed => "receive error(s)",
            Warn::KernelDrops => {
                "report(s) of datagrams dropped by the kernel (see dropped_by_kernel)"
            }
            Warn::UpstreamKernelDrops => {
                "report(s) of upstream datagrams dropped by the kernel (see dropped_by_kernel)"
            }
        }
    }
}
