//! The namespace thread of a relay without privileges: it takes the same
//! requests as the switching thread, but forwards them to the socket broker
//! (`crate::broker`) over a `SOCK_SEQPACKET` socket and fulfils the replies,
//! so that the pool, batching, release and resolve API stay the same.
//!
//! The thread waits on both the request channel (through a waker that every
//! send rings) and the socket, so that it hears the broker's end at once,
//! even when idle. Everything drained from the channel together is sent
//! back to back (pipelined; consecutive resolutions in one message, chunked
//! to fit), and the broker answers in order. Sends and receives never
//! block: with both socket buffers full, a thread blocked sending while the
//! broker blocks sending its replies would wait for ever.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering::AcqRel};
use std::sync::{Arc, mpsc};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use socket2::Socket;
use tokio::sync::{oneshot, watch};
use tracing::{error, warn};

use super::switcher::Request;
use super::{NsError, NsId, Pool, SocketSpec};
use crate::broker::wire::{self, Op, Outcome};
use crate::sys::fdpass;

const SOCKET: Token = Token(0);
const WAKE: Token = Token(1);

/// The socket broker as the relay sees it: whether it is still there.
#[derive(Clone, Debug)]
pub struct BrokerLink {
    pid: u32,
    gone: watch::Receiver<bool>,
}

impl BrokerLink {
    /// The broker's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// True once the broker is gone (its socket reached EOF or failed):
    /// no new socket can be made from then on.
    pub fn is_gone(&self) -> bool {
        *self.gone.borrow()
    }

    /// Waits until the broker is gone.
    pub async fn gone(&self) {
        let mut rx = self.gone.clone();
        let _ = rx.wait_for(|g| *g).await;
    }
}

/// What a request sent waits for.
enum Waiting {
    Resolve(Vec<oneshot::Sender<Result<NsId, NsError>>>),
    Socket(NsId, oneshot::Sender<Result<Socket, NsError>>),
    /// Several sockets asked for together, fulfilled by one refill.
    Sockets(NsId, Vec<oneshot::Sender<Result<Socket, NsError>>>),
    /// Sockets of several namespaces asked for together (`Op::Sockets`).
    Mixed(Vec<(NsId, oneshot::Sender<Result<Socket, NsError>>)>),
    Refill {
        ns: NsId,
        spec: SocketSpec,
        pool: Arc<Pool>,
    },
    /// How many namespaces the release gives back.
    Release(usize),
    Bind(oneshot::Sender<io::Result<()>>),
    ReadConfig(oneshot::Sender<io::Result<String>>),
}

impl Waiting {
    /// Tells the requester `e`.
    fn fail(self, e: impl Fn() -> NsError) {
        match self {
            Waiting::Resolve(replies) => {
                for r in replies {
                    let _ = r.send(Err(e()));
                }
            }
            Waiting::Socket(_, r) => {
                let _ = r.send(Err(e()));
            }
            Waiting::Sockets(_, replies) => {
                for r in replies {
                    let _ = r.send(Err(e()));
                }
            }
            Waiting::Mixed(replies) => {
                for (_, r) in replies {
                    let _ = r.send(Err(e()));
                }
            }
            // The slot stays "refilling": nothing could refill it anyway,
            // and callers fall back to asking (and are told).
            Waiting::Refill { .. } => {}
            // The broker keeps those namespaces open (a leak until it
            // exits), which only the log can tell; a broker that is gone
            // holds nothing and was reported already.
            Waiting::Release(n) => match e() {
                NsError::BrokerGone { .. } => {}
                e => warn!(
                    "{n} namespace(s) not released by the socket broker, which keeps them open: {e}"
                ),
            },
            Waiting::Bind(r) => {
                let _ = r.send(Err(io::Error::other(e().to_string())));
            }
            Waiting::ReadConfig(r) => {
                let _ = r.send(Err(io::Error::other(e().to_string())));
            }
        }
    }
}

/// Wakes the forwarding thread once per batch of requests, not once per
/// request: a caller asking for 64 sockets in a row would otherwise pay 64
/// eventfd writes and wake the thread while it is still reading the first
/// few, which split the batch into many small messages (and the broker's
/// switches with them).
#[derive(Debug)]
pub(super) struct Wake {
    waker: Waker,
    /// Set by the first request since the thread last looked.
    rung: AtomicBool,
}

impl Wake {
    /// After a request is sent on the channel: wakes the thread unless a
    /// wake is already on its way. The swap orders the send before the
    /// thread's [`Wake::clear`], so the thread, woken or not, sees the
    /// request when it next drains the channel.
    pub(super) fn ring(&self) {
        if !self.rung.swap(true, AcqRel) {
            // Lost only if the thread's poll is gone, and then so is it.
            let _ = self.waker.wake();
        }
    }

    /// Wakes the thread whatever the state (the last handle is dropped).
    pub(super) fn force(&self) {
        self.rung.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.waker.wake();
    }

    /// Before the thread drains the channel: requests sent from now on ring
    /// again.
    fn clear(&self) {
        self.rung.swap(false, AcqRel);
    }
}

struct Outgoing {
    bytes: Vec<u8>,
    fd: Option<OwnedFd>,
}

pub(super) fn spawn(
    fd: OwnedFd,
    pid: u32,
) -> io::Result<(mpsc::Sender<Request>, Arc<Wake>, BrokerLink)> {
    let (mut fwd, tx, link) = Forwarder::new(fd, pid)?;
    let waker = fwd.wake.clone();
    std::thread::Builder::new()
        .name("nsproxy-netns".into())
        .spawn(move || fwd.run())?;
    Ok((tx, waker, link))
}

struct Forwarder {
    fd: OwnedFd,
    pid: u32,
    poll: Poll,
    rx: mpsc::Receiver<Request>,
    out: VecDeque<Outgoing>,
    /// Sent (or queued to send) and not answered, in order.
    pending: VecDeque<(u64, Waiting)>,
    next_id: u64,
    gone: watch::Sender<bool>,
    buf: Vec<u8>,
    wake: Arc<Wake>,
}

impl Forwarder {
    /// A forwarder on the broker's socket `fd`, and the channel that feeds
    /// it; its thread is not started.
    fn new(fd: OwnedFd, pid: u32) -> io::Result<(Forwarder, mpsc::Sender<Request>, BrokerLink)> {
        let poll = Poll::new()?;
        let raw = fd.as_raw_fd();
        poll.registry().register(
            &mut SourceFd(&raw),
            SOCKET,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        // Shared with the thread: closing the eventfd while its last wake is
        // still unread would drop that wake from the epoll set.
        let wake = Arc::new(Wake {
            waker: Waker::new(poll.registry(), WAKE)?,
            rung: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let (gone_tx, gone_rx) = watch::channel(false);
        let fwd = Forwarder {
            fd,
            pid,
            poll,
            rx,
            out: VecDeque::new(),
            pending: VecDeque::new(),
            next_id: 1,
            gone: gone_tx,
            buf: vec![0; wire::MAX_MESSAGE + 1],
            wake,
        };
        Ok((fwd, tx, BrokerLink { pid, gone: gone_rx }))
    }

    fn is_gone(&self) -> bool {
        *self.gone.borrow()
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(8);
        loop {
            self.wake.clear();
            let open = self.drain_channel();
            if !self.is_gone() {
                self.flush();
                self.receive();
            }
            if !open && (self.pending.is_empty() || self.is_gone()) {
                // Every handle is dropped: closing the socket ends the broker.
                return;
            }
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!("the namespace thread cannot wait on the socket broker: {e}");
                    self.broker_gone(&format!("cannot wait on its socket: {e}"));
                }
            }
        }
    }

    /// Takes every request waiting; false once every sender is dropped.
    fn drain_channel(&mut self) -> bool {
        let mut batch = Vec::new();
        let open = loop {
            match self.rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(mpsc::TryRecvError::Empty) => break true,
                Err(mpsc::TryRecvError::Disconnected) => break false,
            }
        };
        let mut batch = batch.into_iter().peekable();
        while let Some(req) = batch.next() {
            match req {
                Request::Resolve { reference, reply } => {
                    let mut refs = vec![reference];
                    let mut replies = vec![reply];
                    while let Some(Request::Resolve { .. }) = batch.peek() {
                        let Some(Request::Resolve { reference, reply }) = batch.next() else {
                            unreachable!("peeked")
                        };
                        refs.push(reference);
                        replies.push(reply);
                    }
                    let texts: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
                    let mut replies = replies.into_iter();
                    for range in wire::resolve_chunks(&texts) {
                        let mine: Vec<_> = replies.by_ref().take(range.len()).collect();
                        let op = Op::Resolve {
                            refs: texts[range].to_vec(),
                        };
                        self.queue(op, None, Waiting::Resolve(mine));
                    }
                }
                Request::Socket { ns, spec, reply } => {
                    // Consecutive ones travel together, up to a message's
                    // worth: of one kind in one namespace as one refill (one
                    // switch for all), else as one batch of sockets.
                    let mut asked = vec![(ns, spec, reply)];
                    while asked.len() < wire::MAX_REFILL as usize
                        && matches!(batch.peek(), Some(Request::Socket { .. }))
                    {
                        let Some(Request::Socket { ns, spec, reply }) = batch.next() else {
                            unreachable!("peeked")
                        };
                        asked.push((ns, spec, reply));
                    }
                    let alike = asked.iter().all(|(n, s, _)| *n == ns && *s == spec);
                    let (op, waiting) = if asked.len() == 1 {
                        let (ns, spec, reply) = asked.pop().expect("one");
                        let op = Op::Socket {
                            ns: ns.into(),
                            spec: spec.into(),
                        };
                        (op, Waiting::Socket(ns, reply))
                    } else if alike {
                        let op = Op::Refill {
                            ns: ns.into(),
                            spec: spec.into(),
                            n: asked.len() as u32,
                        };
                        let replies = asked.into_iter().map(|(_, _, r)| r).collect();
                        (op, Waiting::Sockets(ns, replies))
                    } else {
                        let items = asked
                            .iter()
                            .map(|(n, s, _)| ((*n).into(), (*s).into()))
                            .collect();
                        let replies = asked.into_iter().map(|(n, _, r)| (n, r)).collect();
                        (Op::Sockets { items }, Waiting::Mixed(replies))
                    };
                    self.queue(op, None, waiting);
                }
                Request::Refill { ns, spec, n, pool } => {
                    let op = Op::Refill {
                        ns: ns.into(),
                        spec: spec.into(),
                        n: (n as u32).min(wire::MAX_REFILL),
                    };
                    self.queue(op, None, Waiting::Refill { ns, spec, pool });
                }
                Request::Release { ns } => {
                    // Consecutive ones go together: a start-up gives back
                    // the fds of every namespace it only listens in at once.
                    let mut all = vec![ns.into()];
                    while all.len() < wire::MAX_RELEASE
                        && matches!(batch.peek(), Some(Request::Release { .. }))
                    {
                        let Some(Request::Release { ns }) = batch.next() else {
                            unreachable!("peeked")
                        };
                        all.push(ns.into());
                    }
                    let n = all.len();
                    self.queue(Op::Release { ns: all }, None, Waiting::Release(n));
                }
                Request::Bind {
                    socket,
                    addrs,
                    reply,
                } => {
                    let fd = OwnedFd::from(socket);
                    self.queue(Op::Bind { addrs }, Some(fd), Waiting::Bind(reply));
                }
                Request::ReadConfig { reply } => {
                    self.queue(Op::ReadConfig, None, Waiting::ReadConfig(reply));
                }
            }
        }
        open
    }

    fn queue(&mut self, op: Op, fd: Option<OwnedFd>, waiting: Waiting) {
        if self.is_gone() {
            let pid = self.pid;
            waiting.fail(|| NsError::BrokerGone { pid });
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        match wire::encode_request(&wire::Request { id, op }) {
            Ok(bytes) => {
                self.out.push_back(Outgoing { bytes, fd });
                self.pending.push_back((id, waiting));
            }
            Err(e) => {
                let reason = format!("request not sent: {e}");
                waiting.fail(|| NsError::Refused {
                    reason: reason.clone(),
                });
            }
        }
    }

    fn flush(&mut self) {
        while let Some(m) = self.out.front() {
            let fds: Vec<_> = m.fd.iter().map(|f| f.as_fd()).collect();
            match fdpass::send(self.fd.as_fd(), &m.bytes, &fds, true) {
                Ok(_) => {
                    self.out.pop_front();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.broker_gone(&format!("sending to it failed: {e}"));
                    return;
                }
            }
        }
    }

    fn receive(&mut self) {
        loop {
            let got = match fdpass::recv(self.fd.as_fd(), &mut self.buf, fdpass::MAX_FDS, true) {
                Ok(g) => g,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.broker_gone(&format!("receiving from it failed: {e}"));
                    return;
                }
            };
            if got.len == 0 && got.fds.is_empty() && !got.truncated {
                self.broker_gone("its socket was closed");
                return;
            }
            self.fulfil(got);
        }
    }

    fn fulfil(&mut self, got: fdpass::Received) {
        let Some((id, waiting)) = self.pending.pop_front() else {
            warn!("the socket broker sent a reply to nothing; ignored");
            return;
        };
        let reply = if got.truncated {
            Err("longer than the limit".to_owned())
        } else {
            wire::decode_reply(&self.buf[..got.len]).map_err(|e| e.to_string())
        };
        let reply = match reply {
            Ok(r) if r.id == id => r,
            Ok(r) => {
                let e = format!("reply {} to request {id}", r.id);
                warn!("the socket broker's reply does not match: {e}");
                waiting.fail(|| NsError::Refused { reason: e.clone() });
                return;
            }
            Err(e) => {
                warn!("undecodable reply from the socket broker: {e}");
                waiting.fail(|| NsError::Refused {
                    reason: format!("undecodable reply: {e}"),
                });
                return;
            }
        };
        // Fds lost on the way in: this process could not take them (out of
        // fds), which the relays handle as EMFILE.
        let lost = || io::Error::from_raw_os_error(libc::EMFILE);
        let missing = reply.outcome.fds().saturating_sub(got.fds.len());
        if missing > 0 || got.ctrunc {
            warn!(
                "{missing} socket(s) the broker sent were lost on the way in (this process is out of fds); their requests fail as EMFILE"
            );
        }
        let mut fds = got.fds.into_iter().map(Socket::from);
        match (waiting, reply.outcome) {
            (w, Outcome::Failed(e)) => w.fail(|| e.clone().into_ns_error()),
            (Waiting::Resolve(replies), Outcome::Resolved(results)) => {
                let mut results = results.into_iter();
                for r in replies {
                    let _ = r.send(match results.next() {
                        Some(Ok(ns)) => Ok(ns.into()),
                        Some(Err(e)) => Err(e.into_ns_error()),
                        None => Err(NsError::Refused {
                            reason: "the broker's reply has fewer results than asked".into(),
                        }),
                    });
                }
            }
            (Waiting::Socket(ns, r), Outcome::Socket) => {
                let _ = r.send(
                    fds.next()
                        .ok_or_else(|| NsError::Socket { ns, source: lost() }),
                );
            }
            (Waiting::Sockets(ns, replies), Outcome::Refilled { error, .. }) => {
                for r in replies {
                    let _ = r.send(match fds.next() {
                        Some(s) => Ok(s),
                        None => Err(match &error {
                            Some(e) => e.clone().into_ns_error(),
                            None => NsError::Socket { ns, source: lost() },
                        }),
                    });
                }
            }
            (Waiting::Mixed(replies), Outcome::Sockets(results)) => {
                let mut results = results.into_iter();
                for (ns, r) in replies {
                    let _ = r.send(match results.next() {
                        Some(None) => fds
                            .next()
                            .ok_or_else(|| NsError::Socket { ns, source: lost() }),
                        Some(Some(e)) => Err(e.into_ns_error()),
                        None => Err(NsError::Refused {
                            reason: "the broker's reply has fewer results than asked".into(),
                        }),
                    });
                }
            }
            (Waiting::Refill { ns, spec, pool }, Outcome::Refilled { .. }) => {
                pool.refilled(ns, &spec, fds.collect());
            }
            (Waiting::Release(_), Outcome::Released) => {}
            (Waiting::Bind(r), Outcome::Bound) => {
                let _ = r.send(Ok(()));
            }
            (Waiting::ReadConfig(r), Outcome::Config { len }) => {
                let _ = r.send(read_text(fds.next(), len));
            }
            (w, other) => {
                let e = format!("unexpected reply {other:?}");
                warn!("the socket broker sent an {e}");
                w.fail(|| NsError::Refused { reason: e.clone() });
            }
        }
    }

    /// Fails everything pending and everything asked from now on.
    fn broker_gone(&mut self, why: &str) {
        if self.is_gone() {
            return;
        }
        error!(
            "the socket broker (pid {}) is gone ({why}): nsproxy keeps serving what it has, but can make no new socket",
            self.pid
        );
        self.gone.send_replace(true);
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&self.fd.as_raw_fd()));
        self.out.clear();
        let pid = self.pid;
        for (_, w) in self.pending.drain(..) {
            w.fail(|| NsError::BrokerGone { pid });
        }
    }
}

/// The config text the broker sent in a sealed memfd of `len` bytes.
fn read_text(fd: Option<Socket>, len: u64) -> io::Result<String> {
    use std::io::Read;
    let fd = fd.ok_or_else(|| io::Error::other("the socket broker sent no config text"))?;
    let mut text = String::new();
    std::fs::File::from(std::os::fd::OwnedFd::from(fd))
        .take(len)
        .read_to_string(&mut text)?;
    if text.len() as u64 != len {
        return Err(io::Error::other(format!(
            "the socket broker's config text is {} bytes, not the {len} it said",
            text.len()
        )));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::wire::Ns;

    /// What the relay sent, read from the broker's end of the socket.
    fn sent_to_broker(broker: &OwnedFd) -> Vec<wire::Request> {
        let mut buf = vec![0; wire::MAX_MESSAGE + 1];
        let mut sent = Vec::new();
        // Bounded: more messages than this would be a bug of its own.
        for _ in 0..64 {
            match fdpass::recv(broker.as_fd(), &mut buf, 0, true) {
                Ok(got) => {
                    assert!(!got.truncated, "a request longer than MAX_MESSAGE");
                    sent.push(wire::decode_request(&buf[..got.len]).expect("a request"));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return sent,
                Err(e) => panic!("reading the relay's requests: {e}"),
            }
        }
        panic!("the relay sent more than 64 messages");
    }

    /// A start-up gives back the namespaces it only listens in as one run
    /// of releases; the forwarder sends a run as few messages as
    /// MAX_RELEASE allows, and anything asked between releases ends the
    /// run, so that it is sent (and answered) in its place.
    #[test]
    fn consecutive_releases_travel_together_up_to_the_limit() {
        let (relay_end, broker_end) = fdpass::seqpacket_pair().expect("socketpair");
        let (mut fwd, tx, _link) = Forwarder::new(relay_end, 1).expect("forwarder");
        let ns = |ino: u64| NsId { dev: 4, ino };
        let first_run = (0..wire::MAX_RELEASE as u64 + 1).map(|i| 4_000_000 + i);
        let second_run = [9_000_001, 9_000_002];
        for ino in first_run.clone() {
            tx.send(Request::Release { ns: ns(ino) }).unwrap();
        }
        let (reply, asked) = oneshot::channel();
        let spec = SocketSpec::udp(&"127.0.0.1:9".parse().unwrap());
        tx.send(Request::Socket {
            ns: ns(7),
            spec,
            reply,
        })
        .unwrap();
        for ino in second_run {
            tx.send(Request::Release { ns: ns(ino) }).unwrap();
        }

        assert!(fwd.drain_channel(), "the channel is still open");
        fwd.flush();
        let sent = sent_to_broker(&broker_end);
        let shapes: Vec<String> = sent
            .iter()
            .map(|r| match &r.op {
                Op::Release { ns } => format!("release of {}", ns.len()),
                op => op.name().to_owned(),
            })
            .collect();
        assert_eq!(
            shapes,
            ["release of 1024", "release of 1", "socket", "release of 2"]
        );
        let released: Vec<Ns> = sent
            .iter()
            .filter_map(|r| match &r.op {
                Op::Release { ns } => Some(ns.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        let expected: Vec<Ns> = first_run.chain(second_run).map(|i| ns(i).into()).collect();
        assert_eq!(released, expected, "each namespace once, in order");

        // The broker answers in order; the socket reaches the one who asked
        // for it, between the releases' answers.
        let made = std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket to hand over");
        for r in &sent {
            let (outcome, fds) = match r.op {
                Op::Socket { .. } => (Outcome::Socket, vec![made.as_fd()]),
                _ => (Outcome::Released, vec![]),
            };
            let bytes = wire::encode_reply(&wire::Reply { id: r.id, outcome }).unwrap();
            fdpass::send(broker_end.as_fd(), &bytes, &fds, true).expect("reply");
        }
        fwd.receive();
        assert!(fwd.pending.is_empty(), "every request answered");
        let got = asked.blocking_recv().expect("answered").expect("a socket");
        assert_eq!(
            got.local_addr().unwrap().as_socket(),
            Some(made.local_addr().unwrap()),
            "the socket the broker sent"
        );
    }
}
