//! The shell that carries out the reconciler's actions on sockets: closes
//! and retunes listeners, resolves namespaces in batches, opens listeners in
//! chunks and parks them, and contains a panic while opening one.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::{Id, JoinError, JoinSet};
use tracing::{error, info, warn};

use super::desired::{self, Key, Slot};
use super::reconcile::{
    self, Action, CloseMode, CloseWhy, Open, OpenFailure, Resolved, Verdict, WaitReason,
};
use super::{Entry, Live, State, Supervisor, leases};
use crate::config::Rule;
use crate::netns::{NsError, NsId, NsRef, SocketFuture};
use crate::proxy::{Binding, ListenError, Listener, StopMode};

/// Most namespaces a chunk of openings resolves (and holds an fd of) at
/// once; see `Supervisor::open_many`.
const OPEN_CHUNK: usize = 1024;

/// Most bindings opened together (a chunk of many ports in few namespaces).
const OPEN_CHUNK_BINDINGS: usize = 4 * OPEN_CHUNK;

/// What the opens of a chunk share.
struct Chunk {
    resolved: HashMap<NsRef, Result<NsId, NsError>>,
    /// Earlier attempts of the bindings that were waiting for their address.
    retried: HashMap<Key, u32>,
    pending: JoinSet<Result<Listener, ListenError>>,
    /// Which binding each open task makes a listener for (a panicking task
    /// returns nothing to tell).
    tasks: HashMap<Id, Arc<Binding>>,
    /// The bindings decided to open, each with whether it replaces one of
    /// its address, until their tasks start (`Supervisor::start_tasks`).
    starting: Vec<(Arc<Binding>, bool)>,
}

/// How many of `opening` (sorted so that a namespace's bindings are
/// together) go in the next chunk: at most [`OPEN_CHUNK`] namespaces (listen
/// and upstream) and [`OPEN_CHUNK_BINDINGS`] bindings, and at least one.
fn chunk_len(opening: &[Open]) -> usize {
    let mut seen: HashSet<&NsRef> = HashSet::new();
    for (i, o) in opening.iter().enumerate() {
        seen.insert(&o.key.1);
        seen.insert(&o.rule.upstream_netns);
        if i > 0 && (seen.len() > OPEN_CHUNK || i == OPEN_CHUNK_BINDINGS) {
            return i;
        }
    }
    opening.len()
}

impl Supervisor {
    /// Carries out `actions` in order; the opens are made together at the
    /// end, so that their namespace switches are batched.
    pub(super) async fn act(&mut self, actions: Vec<Action>) {
        let mut opens = Vec::new();
        let mut retuned = HashSet::new();
        for a in actions {
            match a {
                Action::Open(o) => opens.push(o),
                Action::Retune { key, rule } => {
                    if retuned.insert(rule.name.clone()) {
                        log_retuned(&rule);
                    }
                    self.retune(&key, rule);
                }
                other => self.act_now(other),
            }
        }
        self.open_many(opens).await;
    }

    /// Carries out an action that opens nothing.
    fn act_now(&mut self, action: Action) {
        match action {
            Action::Open(_) => unreachable!("opens are made by `act`"),
            Action::Close { key, mode, why } => self.close(&key, mode, &why),
            Action::Retune { key, rule } => self.retune(&key, rule),
            Action::Keep { key, rule } => {
                // Share the new Arc so that later comparisons are cheap.
                if let Some(e) = self.entries.get_mut(&key) {
                    e.rule = rule;
                }
            }
            Action::Wait { key, why } => self.set_state(&key, State::Waiting(why)),
            Action::Fail { key, why } => self.set_state(&key, State::Failed(why)),
            Action::Forget { key } => {
                self.set_state(&key, State::Opening);
                self.entries.remove(&key);
            }
            Action::Retry { key, attempts } => self.retry.insert(key, attempts, Instant::now()),
            Action::Unschedule { key } => {
                self.retry.remove(&key);
            }
        }
    }

    fn retune(&mut self, key: &Key, rule: Arc<Rule>) {
        if let Some(e) = self.entries.get_mut(key) {
            if let State::Listening { live, .. } = &e.state {
                live.binding.retune(&rule);
            }
            e.rule = rule;
        }
    }

    /// Gives the entry of `key` its new state; a listener it had stops
    /// (draining) and stops counting for its namespace.
    fn set_state(&mut self, key: &Key, state: State) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if let State::Listening { live, .. } = &entry.state {
            self.by_ns
                .remove(&(Slot::of(&live.binding.rule), live.binding.ns));
        }
        entry.state = state;
    }

    /// Closes the listener of `key` if it listens; the entry stays (the next
    /// action decides its new state).
    fn close(&mut self, key: &Key, mode: CloseMode, why: &CloseWhy) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        let old = std::mem::replace(
            &mut entry.state,
            State::Waiting(WaitReason::Closed(why.clone())),
        );
        let State::Listening { live, .. } = old else {
            return;
        };
        let b = &live.binding;
        match mode {
            CloseMode::Now => {
                info!(rule = %b.rule.name, netns = %b.netns, "closing the listener and its connections: {why}");
                self.parking.stop(b, StopMode::Close);
            }
            CloseMode::Drain => {
                info!(rule = %b.rule.name, netns = %b.netns, "closing the listener, open connections drain: {why}");
                self.parking.stop(b, StopMode::Drain);
            }
        }
        self.by_ns.remove(&(Slot::of(&b.rule), b.ns));
        // Its upstream namespace is given back once the binding is gone.
    }

    /// Resolves and opens bindings; the listeners are created concurrently
    /// so that their namespace switches are batched.
    async fn open_many(&mut self, mut opening: Vec<Open>) {
        // A name that came and went (or was asked for twice): once each.
        opening.retain(|o| {
            !matches!(
                self.entries.get(&o.key),
                Some(Entry {
                    state: State::Listening { .. },
                    ..
                })
            )
        });
        // A namespace's bindings in one chunk, so that its fd is opened once.
        let mut first_seen: HashMap<NsRef, usize> = HashMap::new();
        for (i, o) in opening.iter().enumerate() {
            first_seen.entry(o.key.1.clone()).or_insert(i);
        }
        opening.sort_by_key(|o| first_seen[&o.key.1]);
        // In chunks, so that the namespace fds held while listeners are made
        // stay bounded: at 10,000 namespaces, holding every one at once would
        // need a third more fds than the listeners themselves. Bounded by
        // namespaces rather than bindings: each chunk is one resolve trip and
        // waits for its last listener before the next starts, so a
        // namespace's TCP and UDP rules must not halve the chunk.
        while !opening.is_empty() {
            let rest = opening.split_off(chunk_len(&opening));
            let chunk = std::mem::replace(&mut opening, rest);
            self.open_chunk(chunk).await;
        }
    }

    async fn open_chunk(&mut self, opening: Vec<Open>) {
        let mut refs: Vec<NsRef> = opening
            .iter()
            .flat_map(|o| [o.key.1.clone(), o.rule.upstream_netns.clone()])
            .collect();
        refs.sort();
        refs.dedup();
        // Every namespace the chunk resolved stays open until its listeners
        // are made; those no binding connects from are given back after.
        let (resolved, _held) = leases::resolve(&*self.sockets, &self.leases, refs).await;
        // Whatever becomes of an opening, an earlier wait for its address
        // is over; a new one is recorded if the address is still missing.
        let retried = opening
            .iter()
            .filter_map(|o| self.retry.remove(&o.key).map(|n| (o.key.clone(), n)))
            .collect();
        let mut chunk = Chunk {
            resolved,
            retried,
            pending: JoinSet::new(),
            tasks: HashMap::new(),
            starting: Vec::new(),
        };
        for o in opening {
            self.start_open(o, &mut chunk);
        }
        self.start_tasks(&mut chunk);
        while let Some(done) = chunk.pending.join_next_with_id().await {
            let (id, result) = match done {
                Ok((id, listener)) => (id, listener.map_err(OpenError::Listen)),
                Err(e) => (e.id(), Err(OpenError::Task(panic_message(e)))),
            };
            if let Some(binding) = chunk.tasks.remove(&id) {
                self.opened(binding, result, &chunk.retried);
            }
        }
        // Requests to the namespace thread are served in order, so no
        // listener of this chunk still waits for a fd: `_held` may go.
    }

    /// Decides one opening and, if it is to listen, starts making its
    /// listener.
    fn start_open(&mut self, o: Open, chunk: &mut Chunk) {
        let Open {
            key,
            rule,
            mut replacing,
            ..
        } = o;
        let netns = key.1.clone();
        let look = |r: &NsRef| Resolved::of(r, chunk.resolved.get(r));
        let (listen, upstream) = (look(&netns), look(&rule.upstream_netns));
        let serving = match &listen {
            Resolved::Id(ns) => self.by_ns.get(&(Slot::of(&rule), *ns)).cloned(),
            _ => None,
        };
        let verdict = reconcile::verdict(&rule, &netns, listen, upstream, serving.as_ref());
        let state = match verdict {
            Verdict::Open { ns, upstream_ns } => {
                self.spawn_open(&rule, &netns, ns, upstream_ns, replacing, chunk)
            }
            Verdict::Demote {
                ns,
                upstream_ns,
                loser,
            } => {
                self.demote(&rule, &loser, &netns, ns);
                // The demoted listener may still hold the port.
                replacing = true;
                self.spawn_open(&rule, &netns, ns, upstream_ns, replacing, chunk)
            }
            Verdict::SameAs(other) => {
                warn!(rule = %rule.name, netns = %netns, "\"{netns}\" is the same namespace as \"{other}\"; listening there once");
                State::SameAs(other)
            }
            Verdict::Wait(why) => {
                warn!(rule = %rule.name, netns = %netns, listen = %rule.listen, "waiting: {why}");
                State::Waiting(why)
            }
            Verdict::Fail(why) => {
                error!(rule = %rule.name, netns = %netns, listen = %rule.listen, "not listening: {why}");
                State::Failed(why)
            }
        };
        self.entries.insert(key, Entry { rule, netns, state });
    }

    fn spawn_open(
        &mut self,
        rule: &Arc<Rule>,
        netns: &NsRef,
        ns: NsId,
        upstream_ns: NsId,
        replacing: bool,
        chunk: &mut Chunk,
    ) -> State {
        let (lease, _) = self.leases.acquire(upstream_ns);
        let binding = Arc::new(Binding::new(
            rule.clone(),
            netns.clone(),
            ns,
            upstream_ns,
            self.sockets.clone(),
            Some(lease),
        ));
        self.by_ns.insert((Slot::of(rule), ns), netns.clone());
        chunk.starting.push((binding, replacing));
        State::Opening
    }

    /// Starts the open tasks of the bindings `chunk` decided to open. Their
    /// sockets are asked for here, all at once, rather than by each task
    /// when it first runs: the requests then reach the namespace thread
    /// (and the broker) in a few large messages, not a round trip per
    /// listener, which was most of a start-up with thousands of rules. Not
    /// for a listener the old process handed over (taking over, or the fd
    /// store after a restart): that one is used instead.
    fn start_tasks(&mut self, chunk: &mut Chunk) {
        let inherited = self.options.inherited.clone();
        let mut starting = std::mem::take(&mut chunk.starting);
        // A binding demoted by a later one of the same chunk (a second
        // reference to its namespace) would only bind the port its winner
        // wants.
        starting.retain(|(b, _)| {
            matches!(
                self.entries.get(&desired::key(&b.rule, b.netns.clone())),
                Some(Entry {
                    state: State::Opening,
                    ..
                })
            )
        });
        let wanted: Vec<bool> = starting
            .iter()
            .map(|(b, _)| inherited.as_ref().is_none_or(|i| !i.holds(b)))
            .collect();
        let asks: Vec<_> = starting
            .iter()
            .zip(&wanted)
            .filter(|(_, w)| **w)
            .map(|((b, _), _)| Listener::spec(b))
            .collect();
        // A factory that panics making a socket here (one of the home
        // namespace is made on the calling thread) must not take the
        // supervisor down: then each task asks for its own, and the panic
        // fails that binding alone.
        let sockets = &self.sockets;
        let asked = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            sockets.sockets(&asks)
        })) {
            Ok(asked) => asked,
            Err(panic) => {
                error!(
                    "making {} listener socket(s) at once panicked ({}); each binding asks for its own",
                    asks.len(),
                    crate::proxy::catch::message(&*panic)
                );
                Vec::new()
            }
        };
        let mut asked = asked.into_iter();
        for ((binding, replacing), wanted) in starting.into_iter().zip(wanted) {
            let socket = if wanted { asked.next() } else { None };
            let b = binding.clone();
            let inherited = inherited.clone();
            let task = chunk.pending.spawn(async move {
                open_listener(&b, socket, replacing, inherited.as_deref()).await
            });
            chunk.tasks.insert(task.id(), binding);
        }
    }

    /// Makes the binding of `rule` under reference `loser` give way to
    /// `winner`, a reference to the same namespace `ns` listed before it: a
    /// listening one closes (draining), one being opened is dropped when its
    /// listener is made.
    fn demote(&mut self, rule: &Rule, loser: &NsRef, winner: &NsRef, ns: NsId) {
        let key = desired::key(rule, loser.clone());
        let why = CloseWhy::SameAs {
            winner: winner.clone(),
        };
        self.close(&key, CloseMode::Drain, &why);
        self.by_ns.remove(&(Slot::of(rule), ns));
        if let Some(e) = self.entries.get_mut(&key) {
            info!(rule = %rule.name, netns = %loser, "{why}: serving it as \"{winner}\"");
            e.state = State::SameAs(winner.clone());
        }
    }

    /// The attempt to make `binding`'s listener is over.
    fn opened(
        &mut self,
        binding: Arc<Binding>,
        result: Result<Listener, OpenError>,
        retried: &HashMap<Key, u32>,
    ) {
        let key = desired::key(&binding.rule, binding.netns.clone());
        if !matches!(
            self.entries.get(&key),
            Some(Entry {
                state: State::Opening,
                ..
            })
        ) {
            // Demoted meanwhile (see `demote`): its listener closes here.
            return;
        }
        let b = &binding;
        let failure = match result.and_then(|l| {
            let local = l.local_addr().map_err(|source| {
                OpenError::Listen(ListenError::Socket {
                    addr: b.rule.listen,
                    source,
                })
            })?;
            Ok((l, local))
        }) {
            Ok((listener, local)) => {
                info!(rule = %b.rule.name, protocol = %b.rule.protocol, netns = %b.netns,
                    listen = %local, upstream = %b.rule.upstream, upstream_netns = %b.rule.upstream_netns,
                    "listening");
                // Parked until the first client: most listeners of a large
                // deployment stay idle, and then cost no task.
                let fd = {
                    use std::os::fd::{AsFd, AsRawFd};
                    let ino = crate::sys::fdpass::inode(listener.as_fd()).unwrap_or(0);
                    (listener.as_fd().as_raw_fd(), ino)
                };
                self.parking.park(binding.clone(), listener);
                let live = Live {
                    binding,
                    parking: self.parking.clone(),
                };
                if let Some(e) = self.entries.get_mut(&key) {
                    e.state = State::Listening { live, local, fd };
                }
                return;
            }
            Err(OpenError::Listen(e)) if address_not_there(&e) => {
                OpenFailure::AddressMissing(e.to_string())
            }
            Err(OpenError::Listen(e)) => OpenFailure::Other(e.to_string()),
            Err(OpenError::Task(msg)) => OpenFailure::Panicked(msg),
        };
        self.by_ns.remove(&(Slot::of(&b.rule), b.ns));
        let attempts = retried.get(&key).copied().unwrap_or(0);
        match &failure {
            OpenFailure::AddressMissing(e) if attempts == 0 => {
                warn!(rule = %b.rule.name, netns = %b.netns, listen = %b.rule.listen,
                    "waiting: {e}; retrying until the address is configured");
            }
            OpenFailure::AddressMissing(_) => {}
            OpenFailure::Other(e) => {
                error!(rule = %b.rule.name, netns = %b.netns, listen = %b.rule.listen, "not listening: {e}");
            }
            OpenFailure::Panicked(msg) => {
                error!(rule = %b.rule.name, netns = %b.netns, listen = %b.rule.listen,
                    "not listening: opening the listener panicked: {msg}; every other binding keeps serving");
            }
        }
        for a in reconcile::open_failed(&key, failure, attempts) {
            self.act_now(a);
        }
    }
}

/// How an open task ended without a listener.
enum OpenError {
    Listen(ListenError),
    /// It panicked (the message) or was cancelled.
    Task(String),
}

/// The message of a panicked task, or why a cancelled one ended.
fn panic_message(e: JoinError) -> String {
    let cancelled = e.to_string();
    crate::proxy::catch::panicked(e).unwrap_or(cancelled)
}

fn log_retuned(rule: &Rule) {
    info!(rule = %rule.name,
        "max_connections {}, proxy_protocol {}, idle_timeout {}, half_close_timeout {} and tcp_keepalive {} applied in place: listeners and open connections are kept",
        rule.max_connections.map_or("none".to_owned(), |n| n.to_string()),
        rule.proxy_protocol.map_or("off".to_owned(), |v| v.to_string()),
        rule.idle_timeout.map_or("off".to_owned(), |d| format!("{d:?}")),
        rule.half_close_timeout.map_or("off".to_owned(), |d| format!("{d:?}")),
        rule.tcp_keepalive.map_or("off".to_owned(), |k| format!(
            "idle {:?}, interval {:?}, count {}", k.idle, k.interval, k.count)));
}

/// Whether listening failed because the address is not configured in the
/// namespace (yet).
fn address_not_there(e: &ListenError) -> bool {
    matches!(e, ListenError::Bind { source, .. } if source.raw_os_error() == Some(libc::EADDRNOTAVAIL))
}

/// Opens a listener (on `socket` when its socket was asked for already), or
/// takes the one handed over for it (`inherited`); when replacing a binding
/// of the same address, waits (bounded) for the old listener to be closed by
/// its task.
async fn open_listener(
    b: &Binding,
    mut socket: Option<SocketFuture>,
    replacing: bool,
    inherited: Option<&crate::takeover::Inherited>,
) -> Result<Listener, ListenError> {
    if let Some(taking) = inherited.map(|i| i.take(b)) {
        match taking.await {
            Some(Ok(l)) => {
                tracing::debug!(rule = %b.rule.name, netns = %b.netns, listen = %b.rule.listen,
                    "taken over from the old process: its queued clients are served here");
                return Ok(l);
            }
            Some(Err(why)) => {
                warn!(rule = %b.rule.name, netns = %b.netns, listen = %b.rule.listen,
                    "not taking {why}; making a new socket (which fails while the old process holds the port)");
            }
            None => {}
        }
    }
    let mut tries = 0;
    loop {
        let asked = socket.take().unwrap_or_else(|| Listener::ask(b));
        match Listener::open(b, asked).await {
            Err(ListenError::Bind { source, .. })
                if replacing && tries < 100 && source.raw_os_error() == Some(libc::EADDRINUSE) =>
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` namespaces with a TCP and a UDP rule each, as `open_many` sorts them.
    fn openings(n: usize) -> Vec<Open> {
        let mut toml = String::new();
        for i in 0..n {
            for p in ["tcp", "udp"] {
                toml += &format!(
                    "[[proxy]]\nname = \"{p}{i}\"\nprotocol = \"{p}\"\nlisten = \"127.0.0.1:80\"\nnetns = [\"ns{i}\"]\nupstream = \"127.0.0.1:9\"\n"
                );
            }
        }
        crate::config::parse_toml(&toml, "test")
            .unwrap()
            .rules
            .into_iter()
            .map(|r| Open {
                key: desired::key(&r, r.netns[0].clone()),
                rule: Arc::new(r),
                replacing: false,
                reopen: false,
            })
            .collect()
    }

    #[test]
    fn a_chunk_is_bounded_by_namespaces_not_by_their_rules() {
        // 1,000 namespaces and the host (the upstream): one chunk.
        assert_eq!(chunk_len(&openings(1000)), 2000);
        // The 1,024th namespace (with the host) starts the next chunk,
        // its two bindings together.
        assert_eq!(chunk_len(&openings(1100)), 2 * (OPEN_CHUNK - 1));
        assert_eq!(chunk_len(&openings(1)), 2);
        assert_eq!(chunk_len(&[]), 0);
    }
}
