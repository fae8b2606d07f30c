//! One UDP session: a client's upstream socket, its task, and the moves
//! both ways (see the parent module for the design).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, Release};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info};

use super::{
    BATCH, Datagram, Link, POOL, ReplyFrom, SLOTS, Shared, Warn, dropped_truncated, forget,
    kernel_dropped, udp_sys,
};
use crate::config::Protocol;
use crate::netns::NsError;
use crate::proxy::relay::{Active, canonical};
use crate::proxy::source::{self, SourceError};
use crate::proxy::{Binding, upstream_spec};

/// Why a session could not get its upstream socket.
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error("{0}")]
    Socket(#[from] NsError),
    #[error("cannot connect a UDP socket to {to} in the upstream namespace: {source}")]
    Connect { to: SocketAddr, source: io::Error },
    #[error("cannot register the upstream socket: {0}")]
    Register(io::Error),
    /// `upstream_source = "client"`: it could not be bound to the client's
    /// address.
    #[error("{0}")]
    Source(#[from] SourceError),
}

/// The session's upstream socket, connected to the upstream; with
/// `upstream_source = "client"`, bound to `peer` (the client) first.
async fn open_upstream(b: &Binding, peer: SocketAddr) -> Result<UdpSocket, UpstreamError> {
    let to = b.rule.upstream;
    let spec = upstream_spec(&b.rule);
    let socket = b.sockets.pooled_socket(b.upstream_ns, spec).await?;
    if spec.transparent {
        source::bind(&socket, peer, to, Protocol::Udp)?;
    }
    if let Err(e) = udp_sys::enable_drop_count(socket.as_fd()) {
        debug!(upstream = %to, "cannot count the kernel's drops (SO_RXQ_OVFL): {e}");
    }
    // UDP connect sends nothing: it fixes the peer (replies from anyone
    // else are dropped by the kernel) and picks the source address and port.
    socket
        .connect(&to.into())
        .map_err(|source| UpstreamError::Connect { to, source })?;
    UdpSocket::from_std(std::net::UdpSocket::from(socket)).map_err(UpstreamError::Register)
}

/// What one session moved, for its closing log line.
#[derive(Default)]
struct Moved {
    datagrams_from_client: u64,
    datagrams_to_client: u64,
    bytes_from_client: u64,
    bytes_to_client: u64,
}

/// A session, as its listener starts it.
pub(super) struct Session {
    pub(super) shared: Arc<Shared>,
    /// The client.
    pub(super) peer: SocketAddr,
    /// Tells it apart from a later session of the same client.
    pub(super) id: u64,
    /// What it shares with its listener, which sends to its upstream
    /// socket itself when it can.
    pub(super) link: Arc<Link>,
    /// Counts it in `sessions_active` while it lives.
    pub(super) _active: Active,
}

impl Session {
    /// Opens the upstream socket and relays until the session is idle for
    /// `udp_idle_timeout` or its listener closes its queue `rx`.
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Datagram>) {
        let started = Instant::now();
        let upstream = match open_upstream(&self.shared.b, self.peer).await {
            Ok(s) => Arc::new(s),
            Err(e) => return self.failed(rx, &e),
        };
        debug!("session opened");
        // From here on the listener sends to it itself whenever the queue
        // is empty.
        if self.link.upstream.set(upstream.clone()).is_err() {
            unreachable!("a session opens its upstream socket once");
        }
        let mut moved = Moved::default();
        let end = self.relay(&upstream, &mut rx, &mut moved).await;
        moved.datagrams_from_client += self.link.datagrams.load(Relaxed);
        moved.bytes_from_client += self.link.bytes.load(Relaxed);
        info!(
            datagrams_from_client = moved.datagrams_from_client,
            datagrams_to_client = moved.datagrams_to_client,
            bytes_from_client = moved.bytes_from_client,
            bytes_to_client = moved.bytes_to_client,
            duration_ms = started.elapsed().as_millis() as u64,
            "session closed: {end}"
        );
    }

    /// Ends a session that could not get its upstream socket: out of the
    /// map first, so that nothing more is queued; then counts what was.
    fn failed(&self, mut rx: mpsc::Receiver<Datagram>, e: &UpstreamError) {
        let shared = &self.shared;
        shared.stats.sessions_failed.fetch_add(1, Relaxed);
        if matches!(e, UpstreamError::Source(_)) {
            shared.stats.upstream_source_failed.fetch_add(1, Relaxed);
        }
        forget(&mut shared.lock_sessions(), self.peer, self.id);
        rx.close();
        let mut lost = 0;
        while rx.try_recv().is_ok() {
            lost += 1;
        }
        shared.stats.send_errors.fetch_add(lost, Relaxed);
        shared.warnings.warn(Warn::NoUpstream, || {
            format!("cannot start a session: {e}; dropped {lost} datagram(s) from the client")
        });
    }

    /// Relays both ways until the session is idle or its queue is closed;
    /// says which.
    async fn relay(
        &self,
        upstream: &UdpSocket,
        rx: &mut mpsc::Receiver<Datagram>,
        moved: &mut Moved,
    ) -> &'static str {
        let (shared, peer) = (&self.shared, self.peer);
        let b = &shared.b;
        let idle = b.rule.udp_idle_timeout;
        let link = &*self.link;
        let mut last = Instant::now();
        let timer = tokio::time::sleep_until(last + idle);
        tokio::pin!(timer);
        // What the queue held at once, up to BATCH; kept, so that its room
        // is reused.
        let mut batch = Vec::new();
        let mut replies = Replies::default();
        loop {
            tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => {
                    // The listener dropped the queue: it is closing
                    // (shutdown, or its binding was removed).
                    if n == 0 {
                        return "the listener closed";
                    }
                    last = Instant::now();
                    let size = batch.iter().map(Datagram::size).sum();
                    to_upstream(shared, upstream, &batch, moved).await;
                    POOL.put_back(batch.drain(..).map(|d| d.data));
                    // Only now: until these have left, the listener must
                    // queue behind them rather than send past them.
                    link.queued.fetch_sub(size, Release);
                }
                // ERROR too: an ICMP report (port unreachable) makes the
                // socket report only EPOLLERR, not readable; waiting for
                // reads alone would leave it unread (and the lost datagram
                // uncounted) until the client sent again, or for good if it
                // never did.
                r = upstream.async_io(Interest::READABLE | Interest::ERROR, || {
                    relay_replies(shared, upstream, peer, link.reply_from(shared), moved, &mut replies)
                }) => match r {
                    Ok(()) => {
                        last = Instant::now();
                        let reply_from = link.reply_from(shared);
                        for data in replies.waiting.drain(..) {
                            if to_client(shared, peer, reply_from, &data).await {
                                moved.datagrams_to_client += 1;
                                moved.bytes_to_client += data.len() as u64;
                            }
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => refused(shared, "receiving"),
                    Err(e) => {
                        // Other ICMP errors (host or network unreachable)
                        // end here too; the session stays, like for
                        // "refused".
                        shared.stats.recv_errors.fetch_add(1, Relaxed);
                        shared.warnings.warn(Warn::RecvFailed, || format!(
                            "receiving from the upstream failed: {e}"
                        ));
                    }
                },
                () = &mut timer => {
                    // The listener's own sends count as activity too; it
                    // stamps them instead of waking this task.
                    let deadline = last.max(link.sent_at(shared)) + idle;
                    if Instant::now() < deadline {
                        timer.as_mut().reset(deadline);
                    } else if shared.remove_if_idle(peer, self.id, rx, link, idle) {
                        shared.stats.sessions_expired.fetch_add(1, Relaxed);
                        return "idle";
                    } else {
                        // A datagram arrived just as the session went idle.
                        last = Instant::now();
                        timer.as_mut().reset(last + idle);
                    }
                }
            }
        }
    }
}

/// Counts and logs a "port unreachable" report for a session socket.
pub(super) fn refused(shared: &Shared, doing: &str) {
    shared.stats.upstream_refused.fetch_add(1, Relaxed);
    shared.warnings.warn(Warn::Refused, || {
        format!(
            "upstream {} refused ({doing}: nothing listens on that port); the session stays open",
            shared.b.rule.upstream
        )
    });
}

/// Sends a batch of a client's datagrams to the upstream, in order, with
/// as few `sendmmsg` calls as errors allow.
async fn to_upstream(shared: &Shared, upstream: &UdpSocket, batch: &[Datagram], moved: &mut Moved) {
    let mut next = 0;
    while next < batch.len() {
        let rest = &batch[next..];
        let sent = upstream
            .async_io(Interest::WRITABLE, || {
                udp_sys::send_batch(
                    upstream.as_fd(),
                    rest.iter().map(|d| &d.data[..]),
                    None,
                    None,
                    false,
                    &shared.gso_to_upstream,
                )
            })
            .await;
        let failed = match sent {
            Ok(sent) => {
                let k = sent.count;
                let bytes: usize = rest[..k].iter().map(|d| d.data.len()).sum();
                shared.stats.datagrams_in.fetch_add(k as u64, Relaxed);
                shared.stats.bytes_in.fetch_add(bytes as u64, Relaxed);
                moved.datagrams_from_client += k as u64;
                moved.bytes_from_client += bytes as u64;
                next += k;
                if !sent.stopped {
                    continue;
                }
                // The kernel stopped at `batch[next]` without saying why:
                // send it on its own, which says. (If what stopped the
                // batch was a pending ICMP report, the kernel cleared it
                // and it goes uncounted; the datagram does not.)
                None
            }
            Err(e) => Some(e),
        };
        if next < batch.len() {
            let data = &batch[next].data;
            if to_upstream_one(shared, upstream, data, failed).await {
                moved.datagrams_from_client += 1;
                moved.bytes_from_client += data.len() as u64;
            }
            next += 1;
        }
    }
}

/// Sends one datagram to the upstream, after a first try that failed with
/// `failed` if there was one; true if it went.
async fn to_upstream_one(
    shared: &Shared,
    upstream: &UdpSocket,
    data: &[u8],
    failed: Option<io::Error>,
) -> bool {
    let mut result = match failed {
        Some(e) => Err(e),
        None => upstream.send(data).await,
    };
    if matches!(&result, Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED)) {
        // The error was a report about an earlier datagram, which the
        // kernel hands to the next call on the socket; this one was not
        // sent yet. Reading the report cleared it: try once more.
        refused(shared, "sending");
        result = upstream.send(data).await;
    }
    match result {
        Ok(_) => {
            shared.stats.datagrams_in.fetch_add(1, Relaxed);
            shared.stats.bytes_in.fetch_add(data.len() as u64, Relaxed);
            true
        }
        Err(e) => {
            send_failed(shared, data.len(), &e);
            false
        }
    }
}

/// A datagram of `len` bytes that could not be sent to the upstream:
/// counted and logged, by the session's task and by the listener's direct
/// sends alike.
pub(super) fn send_failed(shared: &Shared, len: usize, e: &io::Error) {
    shared.stats.send_errors.fetch_add(1, Relaxed);
    shared.warnings.warn(Warn::SendFailed, || {
        format!("dropped a {len}-byte datagram to the upstream: {e}")
    });
}

/// A session's reply path, between batches.
#[derive(Default)]
struct Replies {
    /// Replies that found the listening socket's send buffer full: copied
    /// out of the receive slots to wait for room (rare, so not pooled).
    waiting: Vec<Vec<u8>>,
    /// The kernel's running count of drops on the upstream socket, as last
    /// reported.
    kernel_drops: u32,
}

/// Receives what the upstream socket holds (up to [`BATCH`] datagrams) and
/// sends it on to the client, from the address in `from`, straight out of
/// the receive slots: one `recvmmsg` and, usually, one `sendmmsg`. Replies
/// that find the listening socket's send buffer full are copied into
/// `replies.waiting`, for the caller to send once there is room.
/// `WouldBlock` only when nothing was received.
///
/// Batches are per session: what one session's upstream sent since it was
/// last polled. Replies of different sessions are not gathered into one
/// `sendmmsg` on the listening socket, because that needs a queue per
/// listener and a task to flush it: a handoff and a wakeup per reply, and
/// a wait for the flush, which cost about what the batch saves (0.9 µs per
/// datagram, measured) and add latency. With one reply per session in
/// flight, as in DNS, there is nothing to gather anyway.
fn relay_replies(
    shared: &Shared,
    upstream: &UdpSocket,
    peer: SocketAddr,
    from: Option<ReplyFrom>,
    moved: &mut Moved,
    replies: &mut Replies,
) -> io::Result<()> {
    SLOTS.with_borrow_mut(|slots| {
        let n = slots.recv(upstream.as_fd(), false)?;
        // The slots to send, in order: all but the truncated ones.
        let mut order = [0; BATCH];
        let mut count = 0;
        for i in 0..n {
            let (meta, _) = slots.get(i);
            let drops = meta.kernel_drops;
            kernel_dropped(shared, &mut replies.kernel_drops, drops, Warn::UpstreamKernelDrops, |new| {
                format!(
                    "the kernel dropped {new} datagram(s) from the upstream to {}: the session socket's receive buffer was full (the upstream sent faster than they could be passed on)",
                    canonical(peer)
                )
            });
            if meta.truncated {
                dropped_truncated(shared, meta.len, "the upstream");
            } else {
                order[count] = i;
                count += 1;
            }
        }
        let (fd, ipv6) = (shared.socket.as_fd(), shared.ipv6);
        let data = |i: &usize| slots.get(*i).1;
        let mut rest = &order[..count];
        while !rest.is_empty() {
            let gso = &shared.gso_to_client;
            let sent = udp_sys::send_batch(fd, rest.iter().map(data), Some(peer), from, ipv6, gso);
            let failed = match sent {
                Ok(sent) => {
                    for i in &rest[..sent.count] {
                        sent_to_client(shared, moved, data(i).len());
                    }
                    rest = &rest[sent.count..];
                    if !sent.stopped {
                        continue;
                    }
                    let stopped = &rest[0];
                    // The kernel stopped at this one without saying why: on
                    // its own, it says.
                    match udp_sys::send_to_from(fd, data(stopped), peer, from, ipv6) {
                        Ok(()) => {
                            sent_to_client(shared, moved, data(stopped).len());
                            rest = &rest[1..];
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if failed.kind() == io::ErrorKind::WouldBlock {
                replies.waiting.extend(rest.iter().map(|i| data(i).to_vec()));
                break;
            }
            client_send_failed(shared, from, data(&rest[0]).len(), &failed);
            rest = &rest[1..];
        }
        Ok(())
    })
}

/// Counts a datagram sent to the client.
fn sent_to_client(shared: &Shared, moved: &mut Moved, len: usize) {
    shared.stats.datagrams_out.fetch_add(1, Relaxed);
    shared.stats.bytes_out.fetch_add(len as u64, Relaxed);
    moved.datagrams_to_client += 1;
    moved.bytes_to_client += len as u64;
}

/// Sends an upstream datagram to the client from the address the client
/// last sent to, waiting for room in the send buffer; true if it went.
async fn to_client(
    shared: &Shared,
    peer: SocketAddr,
    from: Option<ReplyFrom>,
    data: &[u8],
) -> bool {
    let sent = shared
        .socket
        .async_io(Interest::WRITABLE, || {
            udp_sys::send_to_from(shared.socket.as_fd(), data, peer, from, shared.ipv6)
        })
        .await;
    match sent {
        Ok(()) => {
            shared.stats.datagrams_out.fetch_add(1, Relaxed);
            shared.stats.bytes_out.fetch_add(data.len() as u64, Relaxed);
            true
        }
        Err(e) => {
            client_send_failed(shared, from, data.len(), &e);
            false
        }
    }
}

/// Counts and logs a datagram to a client that could not be sent.
fn client_send_failed(shared: &Shared, from: Option<ReplyFrom>, len: usize, e: &io::Error) {
    shared.stats.send_errors.fetch_add(1, Relaxed);
    shared.warnings.warn(Warn::SendFailed, || {
        let from = from.map_or_else(|| "any address".to_owned(), |f| f.ip.to_string());
        format!("dropped a {len}-byte datagram to the client (sent from {from}): {e}")
    });
}
