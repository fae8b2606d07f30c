//! Idle listeners without a task.
//!
//! At thousands of namespaces most listeners never see traffic, and a tokio
//! task plus a reactor registration per listener was a third of nsproxy's
//! memory per listener (1.25 of 3.7 KiB). So a listener starts *parked*: its
//! socket sits in one epoll set that a single hub task watches, at the cost
//! of a slot here and the kernel's epoll entry. When a connection or datagram
//! arrives, the hub hands the socket to a serve task of its own, which runs as
//! before; once the listener has had nothing to do for a while
//! ([`crate::lifecycle::Options::park_after`]) and owns no connection or
//! session, the task ends and the socket is parked again.
//!
//! Stopping a binding ([`Parking::stop`]) closes a parked socket at once, so
//! its port is free for a replacement; a running serve task sees the stop
//! itself. A listener lost between the reactor and the set (the kernel
//! refusing an epoll change), or whose serve task panicked, is reported as a
//! [`Lost`], for the server to deal with. Should the hub itself fail, every
//! listener gets a task of its own, as if parking did not exist.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc};
use tracing::{Instrument, debug, error};

use super::catch::caught;
use super::{Binding, Listener, Served, StopMode};
use crate::sys::epoll;

/// Readiness reports taken from the epoll set per call.
const EVENTS: usize = 256;

/// `Binding::parked_at` when the binding's socket is not parked.
pub(crate) const NOT_PARKED: usize = usize::MAX;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A token is a slot number above a generation of `GEN_BITS` bits.
const GEN_BITS: u32 = usize::BITS / 2;
const GEN_MASK: usize = (1 << GEN_BITS) - 1;
/// Slots a token can name (2³² on 64-bit targets); beyond, listeners keep
/// a task.
const MAX_SLOTS: usize = 1 << (usize::BITS - GEN_BITS - 1);

/// The parked listeners of one server, and the count of its serve tasks.
pub(crate) struct Parking {
    /// Adds and removes sockets in the hub's epoll set; none if the set
    /// could not be made (then every listener keeps a task).
    registry: Option<mio::Registry>,
    slots: Mutex<Slots>,
    /// The drain timeout in nanoseconds: a reload changes it
    /// ([`Parking::set_drain`]), and a stop hands the value then in force
    /// to the binding ([`Stop::drain`](super::Stop::drain)).
    drain: AtomicU64,
    park_after: Duration,
    /// Serve tasks running (each owns a listener that is not parked).
    running: AtomicUsize,
    /// Woken when `running` drops to zero.
    all_stopped: Notify,
    /// Where lost listeners are reported (the server).
    lost: mpsc::UnboundedSender<Lost>,
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parking")
            .field("running", &self.running.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// A binding whose listening socket was closed by its serve task; the
/// binding needs a new one, or is failed ([`Loss`]).
#[derive(Debug)]
pub(crate) struct Lost {
    pub(crate) binding: Arc<Binding>,
    pub(crate) cause: Loss,
}

/// Why a serve task closed its binding's listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Loss {
    /// The socket could not be moved between the reactor and the parking
    /// set (the kernel refused an epoll change): open it again.
    Listener(String),
    /// The serve task panicked, with this message: a bug, so opening the
    /// listener again would likely panic again; the binding is failed.
    Panicked(String),
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Loss::Listener(why) => f.write_str(why),
            Loss::Panicked(msg) => write!(f, "its serve task panicked: {msg}"),
        }
    }
}

/// The task that watches the parked sockets; see [`Hub::run`].
pub(crate) struct Hub {
    poll: AsyncFd<mio::Poll>,
    parking: Arc<Parking>,
}

#[derive(Default)]
struct Slots {
    entries: Vec<Slot>,
    free: Vec<usize>,
    /// The hub has ended: nothing watches the set any more.
    closed: bool,
}

#[derive(Default)]
struct Slot {
    /// Bumped each time the slot is taken, so that a readiness report for
    /// the slot's previous occupant is recognised as stale.
    generation: usize,
    parked: Option<Parked>,
}

struct Parked {
    binding: Arc<Binding>,
    listener: Listener,
}

/// A slot and its generation, as the epoll set's token.
fn token(slot: usize, generation: usize) -> usize {
    (slot << GEN_BITS) | (generation & GEN_MASK)
}

fn untoken(t: usize) -> (usize, usize) {
    (t >> GEN_BITS, t & GEN_MASK)
}

impl Parking {
    /// Makes the epoll set; `drain` is what serve tasks give connections
    /// when their binding stops, `park_after` how long they wait idle
    /// before parking their listener. Run the returned hub as a task, and
    /// reopen the bindings the receiver reports. Must run inside a tokio
    /// runtime.
    pub(crate) fn new(
        drain: Duration,
        park_after: Duration,
    ) -> (Arc<Parking>, Option<Hub>, mpsc::UnboundedReceiver<Lost>) {
        let made = mio::Poll::new().and_then(|poll| {
            let registry = poll.registry().try_clone()?;
            Ok((registry, epoll::register_poll(poll)?))
        });
        let (registry, poll) = match made {
            Ok((r, p)) => (Some(r), Some(p)),
            Err(e) => {
                error!(
                    "cannot make the epoll set for idle listeners: {e}; every listener keeps a task of its own"
                );
                (None, None)
            }
        };
        let (lost, lost_rx) = mpsc::unbounded_channel();
        let parking = Arc::new(Parking {
            registry,
            slots: Mutex::new(Slots::default()),
            drain: AtomicU64::new(nanos(drain)),
            park_after,
            running: AtomicUsize::new(0),
            all_stopped: Notify::new(),
            lost,
        });
        let hub = poll.map(|poll| Hub {
            poll,
            parking: parking.clone(),
        });
        (parking, hub, lost_rx)
    }

    /// The drain timeout in force.
    pub(crate) fn drain(&self) -> Duration {
        Duration::from_nanos(self.drain.load(SeqCst))
    }

    /// Changes the drain timeout of bindings stopped from now on, whenever
    /// their serve task started.
    pub(crate) fn set_drain(&self, drain: Duration) {
        self.drain.store(nanos(drain), SeqCst);
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        // A panic while holding the lock leaves the slots consistent (every
        // change is a single assignment), so a poisoned lock is still usable.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks `listener` until a client arrives, or closes it if `b` was told
    /// to stop meanwhile.
    pub(crate) fn park(self: &Arc<Self>, b: Arc<Binding>, listener: Listener) {
        let mut slots = self.lock();
        // Checked under the lock that `stop` takes after setting the flag:
        // either the flag is seen here, or `stop` finds the socket parked.
        if b.stop.mode().is_some() {
            return;
        }
        let registry = match &self.registry {
            Some(r) if !slots.closed && slots.free.len() + MAX_SLOTS > slots.entries.len() => r,
            _ => {
                // Nothing to park in: the listener keeps a task (checking
                // again each time it is idle).
                drop(slots);
                return self.serve(b, listener);
            }
        };
        let slot = match slots.free.pop() {
            Some(i) => i,
            None => {
                slots.entries.push(Slot::default());
                slots.entries.len() - 1
            }
        };
        let entry = &mut slots.entries[slot];
        entry.generation = entry.generation.wrapping_add(1);
        let t = token(slot, entry.generation);
        let fd = listener.as_fd().as_raw_fd();
        match registry.register(&mut SourceFd(&fd), Token(t), Interest::READABLE) {
            Ok(()) => {
                b.parked_at.store(t, SeqCst);
                entry.parked = Some(Parked {
                    binding: b,
                    listener,
                });
            }
            Err(e) => {
                // Out of kernel memory for epoll entries: serve it with a
                // task of its own instead, which tries again when idle.
                slots.free.push(slot);
                drop(slots);
                b.span()
                    .in_scope(|| debug!("cannot park an idle listener: {e}; it keeps a task"));
                self.serve(b, listener);
            }
        }
    }

    /// Tells `b`'s listener to stop (see [`StopMode`]). A parked socket is
    /// closed before this returns, unless clients already wait in its
    /// backlog: then a serve task takes them first, as for a listener that
    /// was serving (see `accept::serve`). One the hub is just handing to a
    /// serve task, or that a task serves, closes as soon as that task sees
    /// the stop.
    pub(crate) fn stop(self: &Arc<Self>, b: &Binding, mode: StopMode) {
        b.stop.set_drain(self.drain());
        b.stop.request(mode);
        let taken = {
            // `parked_at` is read under the lock `park` stores it under:
            // either that `park` came first and its slot is found here, or
            // it comes after and sees the flag.
            let mut slots = self.lock();
            let t = b.parked_at.load(SeqCst);
            if t == NOT_PARKED {
                return;
            }
            self.take(&mut slots, t, Some(b))
        };
        let Some(Parked { binding, listener }) = taken else {
            return;
        };
        // At runtime shutdown there is nothing left to serve them with.
        if has_queued_clients(&listener) && tokio::runtime::Handle::try_current().is_ok() {
            self.serve(binding, listener);
        }
    }

    /// Takes the socket parked under token `t` out of the epoll set, if `t`
    /// is current (and belongs to `owner`, when given).
    fn take(&self, slots: &mut Slots, t: usize, owner: Option<&Binding>) -> Option<Parked> {
        let (slot, generation) = untoken(t);
        let entry = slots.entries.get_mut(slot)?;
        if entry.generation & GEN_MASK != generation {
            return None;
        }
        if let (Some(p), Some(owner)) = (&entry.parked, owner) {
            if !std::ptr::eq(Arc::as_ptr(&p.binding), owner) {
                return None;
            }
        }
        let parked = entry.parked.take()?;
        slots.free.push(slot);
        parked.binding.parked_at.store(NOT_PARKED, SeqCst);
        let fd = parked.listener.as_fd().as_raw_fd();
        if let Some(registry) = &self.registry {
            if let Err(e) = registry.deregister(&mut SourceFd(&fd)) {
                // Closing the socket removes it from the set anyway.
                debug!("removing a parked listener from the epoll set: {e}");
            }
        }
        Some(parked)
    }

    /// Takes the socket parked under `t` for a serve task, counting the
    /// task before the lock goes: a `stop` that finds the slot empty, and a
    /// shutdown waiting in `stopped` after it, see this task coming.
    fn take_for_task(&self, slots: &mut Slots, t: usize) -> Option<Parked> {
        let taken = self.take(slots, t, None);
        if taken.is_some() {
            self.running.fetch_add(1, SeqCst);
        }
        taken
    }

    /// Serves `listener` in a task of its own until it is idle (then parks
    /// it) or its binding stops.
    pub(crate) fn serve(self: &Arc<Self>, b: Arc<Binding>, listener: Listener) {
        self.running.fetch_add(1, SeqCst);
        self.spawn_counted(b, listener);
    }

    /// [`Parking::serve`], with the task already counted in `running`.
    fn spawn_counted(self: &Arc<Self>, b: Arc<Binding>, listener: Listener) {
        // Made outside the task, so that a task dropped unpolled (the
        // runtime shutting down) still counts itself out.
        let running = Running(self.clone());
        let span = b.span();
        tokio::spawn(
            async move {
                let parking = &running.0;
                let served = listener.serve(b.clone(), parking.drain(), parking.park_after);
                let cause = match caught(served).await {
                    Ok(Served::Idle(idle)) => return parking.park(b, idle),
                    Ok(Served::Stopped) => return,
                    Ok(Served::Lost(reason)) => {
                        error!("listener closed: {reason}; opening it again");
                        Loss::Listener(reason)
                    }
                    // Its connections went with it; the other bindings'
                    // tasks are untouched.
                    Err(msg) => {
                        error!("listener closed: its serve task panicked: {msg}");
                        Loss::Panicked(msg)
                    }
                };
                let _ = parking.lost.send(Lost { binding: b, cause });
            }
            .instrument(span),
        );
    }

    /// Completes when no serve task is left; call after stopping every
    /// binding.
    pub(crate) async fn stopped(&self) {
        loop {
            let woken = self.all_stopped.notified();
            if self.running.load(SeqCst) == 0 {
                return;
            }
            woken.await;
        }
    }
}

/// Whether connections (associations) wait in `listener`'s backlog.
fn has_queued_clients(listener: &Listener) -> bool {
    !matches!(listener, Listener::Udp { .. }) && epoll::readable_now(listener.as_fd())
}

/// Counts a serve task as running until it ends, however it ends.
struct Running(Arc<Parking>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, SeqCst) == 1 {
            self.0.all_stopped.notify_waiters();
        }
    }
}

impl Hub {
    /// Hands each parked socket that becomes readable to a serve task.
    /// Runs until the runtime ends, or until watching fails, when every
    /// parked listener gets a task of its own.
    pub(crate) async fn run(mut self) {
        let failure = self.watch().await;
        error!(
            "watching idle listeners failed: {failure}; every listener keeps a task of its own from now on"
        );
        let parked: Vec<Parked> = {
            let mut slots = self.parking.lock();
            slots.closed = true;
            let tokens: Vec<usize> = slots
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.parked.is_some())
                .map(|(i, e)| token(i, e.generation))
                .collect();
            tokens
                .into_iter()
                .filter_map(|t| self.parking.take_for_task(&mut slots, t))
                .collect()
        };
        for Parked { binding, listener } in parked {
            self.parking.spawn_counted(binding, listener);
        }
    }

    /// Serves readiness reports until watching fails; returns why.
    async fn watch(&mut self) -> String {
        let mut events = Events::with_capacity(EVENTS);
        loop {
            let mut guard = match self.poll.readable_mut().await {
                Ok(g) => g,
                // Only a reactor shutting down fails here.
                Err(e) => return e.to_string(),
            };
            loop {
                if let Err(e) = guard
                    .get_inner_mut()
                    .poll(&mut events, Some(Duration::ZERO))
                {
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return e.to_string();
                }
                let n = events.iter().count();
                for ev in events.iter() {
                    let taken = {
                        let mut slots = self.parking.lock();
                        self.parking.take_for_task(&mut slots, ev.token().0)
                    };
                    if let Some(Parked { binding, listener }) = taken {
                        self.parking.spawn_counted(binding, listener);
                    }
                }
                if n < EVENTS {
                    break;
                }
                // A full batch: more may be waiting. Let other tasks run
                // first, so that a flood of wake-ups cannot hog a worker.
                tokio::task::yield_now().await;
            }
            // Every report was taken; a socket that becomes ready from now
            // on makes the epoll fd readable again.
            guard.clear_ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::proxy::until_queued;

    /// Clients that completed their handshake while the listener was
    /// parked are taken when it stops: served within `max_connections`,
    /// the rest reset and counted; all reset on an immediate close.
    #[test]
    fn stopping_a_parked_listener_takes_its_backlog() {
        use super::{Listener, Parking, StopMode};
        use std::sync::atomic::Ordering::Relaxed;
        use std::time::Duration;
        let rt = crate::runtime::build(1).unwrap();
        rt.block_on(async {
            for (mode, served, reset) in [(StopMode::Drain, 2, 1), (StopMode::Close, 0, 3)] {
                let b = crate::proxy::test_binding("max_connections = 2").await;
                // The hub is not run: the listener stays parked whatever
                // arrives.
                let (parking, _hub, _lost) =
                    Parking::new(Duration::from_secs(5), Duration::from_secs(60));
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.set_nonblocking(true).unwrap();
                let addr = l.local_addr().unwrap();
                let _clients: Vec<std::net::TcpStream> = (0..3)
                    .map(|_| std::net::TcpStream::connect(addr).unwrap())
                    .collect();
                until_queued(&l, 3).await;
                parking.park(b.clone(), Listener::Tcp(l));
                assert!(b.is_parked());
                parking.stop(&b, mode);
                parking.stopped().await;
                let s = b.stats.conn();
                assert_eq!(s.accepted.load(Relaxed), served, "{mode:?}");
                // Served: the upstream (the discard port) refused them.
                assert_eq!(s.connect_failed.load(Relaxed), served, "{mode:?}");
                assert_eq!(s.backlog_reset.load(Relaxed), reset, "{mode:?}");
            }
        });
    }

    #[test]
    fn tokens_name_slot_and_generation() {
        for (slot, generation) in [(0, 1), (7, super::GEN_MASK), (super::MAX_SLOTS - 1, 12345)] {
            let t = super::token(slot, generation);
            assert_ne!(t, super::NOT_PARKED);
            assert_eq!(super::untoken(t), (slot, generation & super::GEN_MASK));
        }
        // A generation past the mask wraps within the token, not into the slot.
        assert_eq!(super::untoken(super::token(3, super::GEN_MASK + 2)), (3, 1));
    }
}
