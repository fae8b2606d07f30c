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
//! client ─► listening socket ─► listener task ─(sendmmsg)──────────────► upstream socket ─► upstream
//!                                            └─queue─► session task ─┘   (first datagrams, full buffer)
//! client ◄─ listening socket ◄──────────────────────── session task ◄─ upstream socket ◄─ upstream
//!           (sendmmsg from the address the client sent to)
//! ```
//!
//! The listener task receives, looks the client up and, once the
//! session's upstream socket is open and nothing waits in its queue, sends
//! the datagrams upstream itself, without waiting: one flow's datagrams
//! cost no hand-off between tasks or threads. Otherwise (the session's
//! first datagrams, while its socket is being made in the upstream
//! namespace; a full send buffer) it queues them for the session's task,
//! and keeps queueing until the queue is empty, so that order holds (see
//! `Link`). A slow or dead upstream stalls nobody but its own session:
//! when a session's queue is full, the datagram is dropped and counted.
//! Replies leave the listening socket from the
//! address the client's datagram was sent to (`IP_PKTINFO` /
//! `IPV6_PKTINFO`, in the syscall layer, `sys::udp`, asked for only on
//! wildcard listeners: a socket bound to one address answers from it),
//! which matters for a wildcard listener on a namespace with several
//! addresses.
//!
//! **Batches.** Every hop moves up to `BATCH` (32) datagrams per syscall when
//! that many are waiting, and one when one is: the listener takes what the
//! kernel has queued with one `recvmmsg` (up to `TURN_BATCHES` of them per
//! wake-up) and sends each client's run of it upstream with one
//! `sendmmsg`; a session sends what its queue holds the same way;
//! it takes what its
//! upstream socket holds with one `recvmmsg` and sends it to its client
//! with one `sendmmsg`, straight from the receive slots. Nothing waits to
//! fill a batch. Replies are batched per session, not across the sessions
//! of a listener: see `relay_replies` for why.
//! Within a batch, a run of datagrams of one size to one peer goes as a
//! single `UDP_SEGMENT` (GSO) send where the kernel and route allow it;
//! where they do not, the limit is learnt once and the datagrams go one
//! by one.
//!
//! **Buffers.** Datagrams are received into per-thread slots (`SLOTS`)
//! and sent upstream from there. Only a datagram that must wait in a
//! session's queue is copied out of its slot, into a buffer from a pool
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
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info};

use super::relay::{Active, Gauge, IdleCheck, LISTENER_BACKOFF, canonical, conn_span, pause};
use super::report::{Kind, Reporter};
use super::{Binding, ListenError, Served, StopMode, UdpStats, catch};
use crate::netns::SocketFuture;
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

/// Binds `socket` (asked for in `b`'s namespace) to `b`'s address.
pub(crate) async fn listen(
    b: &Binding,
    socket: SocketFuture,
) -> Result<std::net::UdpSocket, ListenError> {
    let addr = b.rule.listen;
    let socket = socket.await?;
    let at = |source: io::Error| ListenError::Socket { addr, source };
    // No SO_REUSEADDR: on UDP it would let a second socket share the port
    // and take some of its datagrams, instead of failing with "in use".
    let dual_stack = addr.is_ipv6() && addr.ip().is_unspecified();
    if dual_stack {
        // `[::]` means both families, whatever net.ipv6.bindv6only says.
        socket.set_only_v6(false).map_err(at)?;
    }
    if addr.ip().is_unspecified() {
        // A socket bound to one address answers from it anyway: packet
        // info would only cost a control message per datagram.
        udp_sys::enable_pktinfo(socket.as_fd(), addr.is_ipv6(), dual_stack).map_err(at)?;
    }
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
        pktinfo: b.rule.listen.ip().is_unspecified(),
        epoch: Instant::now(),
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
    // Its own handle, so that the stop request can be made once, not per
    // batch (each one locks the notifier's waiter list twice), and still
    // leave `shared` free to be given back when parking.
    let binding = shared.b.clone();
    let b = &*binding;
    let stop = b.stop.requested();
    tokio::pin!(stop);
    let mut tasks = JoinSet::new();
    let mut backoff = LISTENER_BACKOFF;
    let mut idle = IdleCheck::new(park_after);
    loop {
        tokio::select! {
            () = &mut stop => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => ended(done),
            () = idle.due() => {
                // No session task left means no one else holds `shared`.
                let open = !tasks.is_empty() || Arc::strong_count(&shared) > 1;
                if idle.idle(open) {
                    drop(tasks);
                    return park(shared, kernel_drops);
                }
            }
            r = shared.socket.readable() => match r.and_then(|()| receive(&shared, &mut tasks, &mut kernel_drops)) {
                Ok(()) => {
                    backoff.reset();
                    idle.busy();
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

/// The shortest run of one client's datagrams in a full batch that the
/// listener still sends upstream itself (see `pass_on`).
const DIRECT_RUN: usize = 8;

/// Most batches the listener takes in one turn, before it looks at its
/// other duties (a stop, ended sessions) and lets other tasks run.
const TURN_BATCHES: usize = 8;

/// Receives what the listening socket holds, up to [`TURN_BATCHES`]
/// batches, and passes each datagram on.
///
/// A batch that did not fill up emptied the socket's queue, so it counts
/// as "would block": tokio forgets the readiness at once instead of after
/// one more `recvmmsg` that finds nothing, a syscall per wake-up saved. A
/// datagram that arrived meanwhile still wakes the listener: the socket
/// is registered edge-triggered, and tokio clears only the readiness it
/// had seen before the call.
fn receive(
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    kernel_drops: &mut u32,
) -> io::Result<()> {
    SLOTS.with_borrow_mut(|slots| {
        for _ in 0..TURN_BATCHES {
            let mut got = 0;
            let r = shared.socket.try_io(Interest::READABLE, || {
                got = slots.recv(shared.socket.as_fd(), true)?;
                if got < BATCH {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(())
                }
            });
            if got > 0 {
                pass_on(shared, tasks, slots, got, kernel_drops);
            }
            match r {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
}

/// Hands the `n` datagrams of a received batch to their sessions: all of
/// one client's at once, in the order they came, so that they go upstream
/// in one send (a `UDP_SEGMENT` one when they are of one size) also when
/// several clients' datagrams are interleaved in the batch.
fn pass_on(
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    slots: &RecvBatch,
    n: usize,
    kernel_drops: &mut u32,
) {
    let b = &shared.b;
    let stamp = shared.stamp(Instant::now());
    // Each datagram's client and where it sent to; None once handed on,
    // or for one that is dropped.
    let mut senders: [Option<(SocketAddr, Option<ReplyFrom>)>; BATCH] = [None; BATCH];
    for (k, sender) in senders.iter_mut().enumerate().take(n) {
        let (meta, _) = slots.get(k);
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
        *sender = match meta.peer {
            // Only a socket that is not IP has senders without an IP
            // address: never here.
            None => {
                shared.stats.recv_errors.fetch_add(1, Relaxed);
                None
            }
            Some(peer) if meta.truncated => {
                dropped_truncated(shared, meta.len, canonical(peer));
                None
            }
            Some(peer) => Some((peer, meta.reply_from)),
        };
    }
    let mut run = [0; BATCH];
    for i in 0..n {
        let Some((peer, mut from)) = senders[i].take() else {
            continue;
        };
        run[0] = i;
        let mut len = 1;
        for (j, sender) in senders.iter_mut().enumerate().take(n).skip(i + 1) {
            if let Some((p, f)) = *sender
                && p == peer
            {
                // Replies come from where the client sent to last.
                from = f.or(from);
                *sender = None;
                run[len] = j;
                len += 1;
            }
        }
        // A full batch means the listener is behind: then a client's few
        // datagrams go to its session's task, on whichever worker is free,
        // rather than cost the listener a send each; a long run is one
        // send anyway.
        let direct = (n < BATCH || len >= DIRECT_RUN).then_some(stamp);
        dispatch(shared, tasks, peer, from, slots, &run[..len], direct);
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
    /// The listening socket reports where each datagram was sent to (a
    /// wildcard listener), so replies must say where they come from.
    pktinfo: bool,
    /// What the listener's time stamps for its sessions count from (see
    /// `Link::sent_at`).
    epoch: Instant,
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

    /// Removes session `id` of `peer` if nothing waits in its queue and
    /// the listener sent nothing for it since `idle` ago; false if a
    /// datagram arrived meanwhile (the session is not idle after all).
    fn remove_if_idle(
        &self,
        peer: SocketAddr,
        id: u64,
        rx: &mpsc::Receiver<Datagram>,
        link: &Link,
        idle: Duration,
    ) -> bool {
        let mut sessions = self.lock_sessions();
        if !rx.is_empty() || link.sent_at(self) + idle > Instant::now() {
            return false;
        }
        forget(&mut sessions, peer, id);
        true
    }

    /// `now` as a [`Link::sent_at`] stamp: whole milliseconds since
    /// `epoch`, rounded up so that a session never looks idle early; 0 is
    /// "never".
    fn stamp(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64 + 1
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
    link: Arc<Link>,
    /// `link.reply_from` as the listener last set it, so that it locks
    /// that only when the client sends to another address.
    reply_from: Option<ReplyFrom>,
}

impl Entry {
    /// Queues `d` without waiting.
    fn offer(&self, d: Datagram) -> Result<(), mpsc::error::TrySendError<Datagram>> {
        let queued = &self.link.queued;
        let size = d.size();
        if queued.fetch_add(size, Relaxed) + size > QUEUE_BYTES {
            queued.fetch_sub(size, Relaxed);
            return Err(mpsc::error::TrySendError::Full(d));
        }
        self.tx.try_send(d).inspect_err(|_| {
            queued.fetch_sub(size, Relaxed);
        })
    }
}

/// What a session and its listener share besides the queue.
///
/// Once the session has its upstream socket and its queue is empty, the
/// listener sends the client's datagrams to that socket itself, straight
/// from the receive slots: no copy, no hand-off to the session's task (a
/// wake-up, often on the other worker), no timer touched. The queue
/// carries a session's first datagrams (while its socket is being made)
/// and those that find the socket's send buffer full, for the session's
/// task to send once there is room; while anything is queued the listener
/// queues too, so that datagrams leave in the order they came.
struct Link {
    /// Buffer bytes (capacity) in the queue or in the batch the session's
    /// task is sending, against [`QUEUE_BYTES`]. The task subtracts a batch
    /// only once it is sent (Release), so the listener sees 0 (Acquire)
    /// only when everything it queued has left.
    queued: AtomicUsize,
    /// The session's upstream socket, once it is open.
    upstream: OnceLock<Arc<UdpSocket>>,
    /// When the listener last sent a datagram itself (a `Shared::stamp`),
    /// for the session's idle check; stored before the send, under the
    /// sessions lock, which that check takes too.
    sent_at: AtomicU64,
    /// What the listener sent itself, for the session's closing line.
    datagrams: AtomicU64,
    bytes: AtomicU64,
    /// Where the client last sent to, which is where replies must come
    /// from (a wildcard listener's only; else always `None`).
    reply_from: Mutex<Option<ReplyFrom>>,
}

impl Link {
    fn new(reply_from: Option<ReplyFrom>) -> Link {
        Link {
            queued: AtomicUsize::new(0),
            upstream: OnceLock::new(),
            sent_at: AtomicU64::new(0),
            datagrams: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            reply_from: Mutex::new(reply_from),
        }
    }

    /// When the listener last sent a datagram itself (its epoch if never).
    fn sent_at(&self, shared: &Shared) -> Instant {
        shared.epoch + Duration::from_millis(self.sent_at.load(Relaxed))
    }

    fn reply_from(&self, shared: &Shared) -> Option<ReplyFrom> {
        if !shared.pktinfo {
            return None;
        }
        *self
            .reply_from
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts datagrams of these lengths that the listener sent itself.
    fn sent(&self, shared: &Shared, lens: impl Iterator<Item = usize>) {
        let (mut n, mut bytes) = (0, 0);
        for len in lens {
            n += 1;
            bytes += len as u64;
        }
        shared.stats.datagrams_in.fetch_add(n, Relaxed);
        shared.stats.bytes_in.fetch_add(bytes, Relaxed);
        self.datagrams.fetch_add(n, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
    }
}

/// A client's datagram on its way to the upstream, through its session's
/// queue.
struct Datagram {
    /// Usually a pooled buffer (see [`POOL`]), which the session gives back.
    data: Vec<u8>,
}

impl Datagram {
    /// The memory it holds, as counted against [`QUEUE_BYTES`]; never 0,
    /// so that a queued datagram always shows in `Link::queued`.
    fn size(&self) -> usize {
        self.data.capacity().max(1)
    }
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

/// Hands a run of a client's datagrams (slots `run`, in order; the last
/// sent to `from`) to
/// its session, starting one if needed: sends them upstream at once when
/// `direct` (the time stamp to leave for the session) and the session
/// allow it (see `Link`), else queues them.
fn dispatch(
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    peer: SocketAddr,
    from: Option<ReplyFrom>,
    slots: &RecvBatch,
    run: &[usize],
    direct: Option<u64>,
) {
    let b = &shared.b;
    let mut sessions = shared.lock_sessions();
    // A closed queue means (only after a bug killed a session task) a
    // session that is gone: a fresh one starts below.
    if let Some(e) = sessions.get_mut(&peer)
        && !e.tx.is_closed()
    {
        if e.reply_from != from {
            e.reply_from = from;
            *e.link
                .reply_from
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = from;
        }
        let mut next = 0;
        if let Some(stamp) = direct
            && let Some(up) = e.link.upstream.get()
            && e.link.queued.load(Acquire) == 0
        {
            e.link.sent_at.store(stamp, Relaxed);
            next = send_direct(shared, &e.link, up, slots, run);
        }
        queue(shared, e, peer, slots, &run[next..]);
        return;
    }
    sessions.remove(&peer);
    let max = b.rule.udp_max_sessions;
    if sessions.len() >= max {
        drop(sessions);
        for _ in 0..run.len() {
            shared.stats.dropped_at_cap.fetch_add(1, Relaxed);
            shared.warnings.warn(Warn::AtCap, || {
                format!(
                    "session limit reached (udp_max_sessions = {max}): dropped a datagram from new client {}",
                    canonical(peer)
                )
            });
        }
        return;
    }
    let (tx, rx) = mpsc::channel(QUEUE_LEN);
    let id = shared.next_id.fetch_add(1, Relaxed);
    let entry = Entry {
        id,
        tx,
        link: Arc::new(Link::new(from)),
        reply_from: from,
    };
    let link = entry.link.clone();
    // An empty queue has room for the first datagram (QUEUE_BYTES >=
    // RECV_BUF), so a session never starts without one.
    queue(shared, &entry, peer, slots, run);
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
        link,
        _active: active,
    };
    tasks.spawn(session.run(rx).instrument(span));
}

/// Copies datagrams `run` out of their slots into `e`'s queue; those that
/// find it full are dropped and counted.
fn queue(shared: &Shared, e: &Entry, peer: SocketAddr, slots: &RecvBatch, run: &[usize]) {
    if run.is_empty() {
        return;
    }
    let mut dropped = Vec::new();
    {
        let mut free = POOL.lock();
        for &k in run {
            let d = Datagram {
                data: copy_out(&mut free, slots.data(k)),
            };
            // Closed only if the session's task died since the caller
            // looked (a bug): its datagrams are lost like on a full queue.
            if let Err(mpsc::error::TrySendError::Full(d) | mpsc::error::TrySendError::Closed(d)) =
                e.offer(d)
            {
                dropped.push(d.data);
            }
        }
    }
    for data in &dropped {
        shared.stats.dropped_queue_full.fetch_add(1, Relaxed);
        shared.warnings.warn(Warn::QueueFull, || {
            format!(
                "dropped a {}-byte datagram from {}: its session's queue to the upstream is full",
                data.len(),
                canonical(peer)
            )
        });
    }
    POOL.put_back(dropped);
}

/// Sends datagrams `run` of `slots` to a session's upstream socket, in
/// order, without waiting; returns where in `run` it stopped: its end, or
/// the first datagram that found the socket's send buffer full, for the
/// caller to queue from there. What fails otherwise is counted and logged
/// as the session's own sends are (`session::to_upstream`).
fn send_direct(
    shared: &Shared,
    link: &Link,
    up: &UdpSocket,
    slots: &RecvBatch,
    run: &[usize],
) -> usize {
    let fd = up.as_fd();
    let send_one = |data: &[u8]| match udp_sys::send_batch(
        fd,
        [data],
        None,
        None,
        false,
        &shared.gso_to_upstream,
    ) {
        Ok(sent) if sent.count == 1 => Ok(()),
        Ok(_) => Err(io::Error::other("the kernel sent nothing and said not why")),
        Err(e) => Err(e),
    };
    let data = |k: &usize| slots.data(*k);
    let mut next = 0;
    while next < run.len() {
        let sent = udp_sys::send_batch(
            fd,
            run[next..].iter().map(data),
            None,
            None,
            false,
            &shared.gso_to_upstream,
        );
        let failed = match sent {
            Ok(sent) => {
                let lens = run[next..next + sent.count].iter().map(|k| data(k).len());
                link.sent(shared, lens);
                next += sent.count;
                if !sent.stopped {
                    continue;
                }
                // Stopped without saying why: on its own, it says.
                None
            }
            Err(e) => Some(e),
        };
        let one = data(&run[next]);
        let mut result = match failed {
            Some(e) => Err(e),
            None => send_one(one),
        };
        if matches!(&result, Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED)) {
            // A report about an earlier datagram, which the kernel hands to
            // the next call; this one was not sent yet. Reading the report
            // cleared it: try once more.
            session::refused(shared, "sending");
            result = send_one(one);
        }
        match result {
            Ok(()) => link.sent(shared, [one.len()].into_iter()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return next,
            Err(e) => session::send_failed(shared, one.len(), &e),
        }
        next += 1;
    }
    next
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
