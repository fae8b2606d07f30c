//! Turns a configuration into running bindings and keeps them matched to
//! the configuration and to the namespaces that exist, as both change.
//!
//! A *binding* is one rule in one namespace. The [`Server`] is an actor: one
//! task owns every binding and reacts to three kinds of input, one at a time:
//! namespaces appearing and vanishing ([`Discovery`]), reloads, and status
//! requests. Each binding succeeds or fails on its own: a missing namespace
//! makes it wait, a port in use or a permission error fails it, and every
//! other binding serves.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{error, info, warn};

use crate::config::{self, Config, OnDelete, Rule};
use crate::control::Command;
use crate::netns::discovery::{Discovery, NsEvent};
use crate::netns::{NETNS_RUN_DIR, NsError, NsId, NsRef, Switcher};
use crate::proxy::{Binding, ListenError, Listener, Lost, Parking, StopMode};
use crate::status::{BindingReport, Counters, ReloadReport, Status};
use crate::systemd;

/// Default time connections get to finish after shutdown begins.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a listener with nothing open stays idle before its task ends and
/// it is parked ([`Options::park_after`]): long enough that a steady trickle
/// of clients keeps its task, short enough that bursts once in a while leave
/// nothing behind.
pub const DEFAULT_PARK_AFTER: Duration = Duration::from_secs(10);

/// How a [`Server`] runs, besides its configuration.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long connections may take to finish when their binding closes
    /// gracefully (shutdown, reload, `on_netns_delete = "drain"`).
    pub drain: Duration,
    /// The config file that a reload without a new config re-reads.
    pub config_path: Option<PathBuf>,
    /// The directory of named namespaces to follow (`/run/netns`).
    pub netns_dir: PathBuf,
    /// Forwarding threads, for the status report.
    pub workers: usize,
    /// How long a listener with nothing open waits for a client before its
    /// task ends and it is parked (an idle listener costs no task; the
    /// next client wakes it).
    pub park_after: Duration,
    /// `drain` was given on the command line: a reload whose file changes
    /// `drain_timeout` keeps it (and says so).
    pub drain_pinned: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            drain: DEFAULT_DRAIN_TIMEOUT,
            config_path: None,
            netns_dir: PathBuf::from(NETNS_RUN_DIR),
            workers: crate::runtime::default_workers(),
            park_after: DEFAULT_PARK_AFTER,
            drain_pinned: false,
        }
    }
}

/// The running proxy: a handle to the task that owns every binding.
pub struct Server {
    commands: mpsc::Sender<Command>,
    control: mpsc::Sender<Control>,
    task: JoinHandle<()>,
}

enum Control {
    Reload(
        Option<Config>,
        oneshot::Sender<Result<ReloadReport, String>>,
    ),
    Bindings(oneshot::Sender<Vec<Arc<Binding>>>),
    Shutdown(oneshot::Sender<()>),
    /// The config file, read and parsed by a task of its own (see
    /// `Supervisor::request_reload`), for the reloads waiting on it.
    Parsed(Result<Config, String>, Vec<ReloadReply>),
}

type ReloadReply = oneshot::Sender<Result<ReloadReport, String>>;

impl Server {
    /// Opens every binding of `config` and starts following namespaces;
    /// returns once the initial bindings are listening, waiting or failed.
    /// Never fails as a whole (see [`Server::status`]). Must run inside a
    /// tokio runtime.
    pub async fn start(config: Config, switcher: Switcher, options: Options) -> Server {
        let discovery = match Discovery::start(&options.netns_dir) {
            Ok(d) => Some(d),
            Err(e) => {
                error!(
                    "cannot follow namespaces in {}: {e}; names that appear later will not be served",
                    options.netns_dir.display()
                );
                None
            }
        };
        let (parking, hub, lost) = Parking::new(options.drain, options.park_after);
        let (released, released_rx) = mpsc::unbounded_channel();
        let (commands, command_rx) = mpsc::channel(64);
        let (control, control_rx) = mpsc::channel(8);
        let hub = hub.map(|h| tokio::spawn(h.run()));
        let mut sup = Supervisor {
            parking,
            hub,
            rules: Vec::new(),
            config: config.clone(),
            switcher,
            options,
            started: Instant::now(),
            discovery,
            entries: HashMap::new(),
            by_ns: HashMap::new(),
            refs: HashMap::new(),
            released,
            addr_retry: HashMap::new(),
            control: control.downgrade(),
            parsing: false,
            queued_reloads: Vec::new(),
        };
        // Namespaces already there are known before the first reconcile, so
        // that globs see them at once.
        sup.drain_discovery();
        sup.apply(config).await;
        let task = tokio::spawn(sup.run(command_rx, control_rx, lost, released_rx));
        Server {
            commands,
            control,
            task,
        }
    }

    /// A channel for status requests and reloads, for the control API and
    /// the metrics endpoint.
    pub fn commands(&self) -> mpsc::Sender<Command> {
        self.commands.clone()
    }

    /// A snapshot of every binding.
    pub async fn status(&self) -> Status {
        let (tx, rx) = oneshot::channel();
        let _ = self.commands.send(Command::Status(tx)).await;
        rx.await
            .expect("the server task answers while the Server exists")
    }

    /// The bindings that are listening, in the order of [`Server::status`],
    /// with their live counters. A binding keeps its upstream namespace's fd
    /// open while anything holds it: drop these when done with them.
    pub async fn bindings(&self) -> Vec<Arc<Binding>> {
        let (tx, rx) = oneshot::channel();
        let _ = self.control.send(Control::Bindings(tx)).await;
        rx.await.unwrap_or_default()
    }

    /// Applies `config`, or re-reads the config file when `None`. An invalid
    /// config changes nothing and is returned as the error.
    pub async fn reload(&self, config: Option<Config>) -> Result<ReloadReport, String> {
        let (tx, rx) = oneshot::channel();
        let _ = self.control.send(Control::Reload(config, tx)).await;
        rx.await.map_err(|_| "the server has stopped".to_owned())?
    }

    /// Stops accepting everywhere, lets open connections finish for up to the
    /// drain timeout, closes what is left, and releases every namespace.
    pub async fn shutdown(self) {
        let (tx, rx) = oneshot::channel();
        if self.control.send(Control::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }
}

/// (rule name, namespace reference): a rule with a glob has one key per
/// matching name.
type Key = (String, NsRef);

struct Entry {
    rule: Arc<Rule>,
    netns: NsRef,
    state: State,
}

enum State {
    Listening {
        live: Live,
        local: SocketAddr,
    },
    /// The namespace (or the upstream namespace) does not exist yet; opened
    /// when discovery reports it.
    Waiting(String),
    Failed(String),
    SameAs(NsRef),
    /// Its listener is being made (`open_chunk`).
    Opening,
}

/// A listening binding, served by a task or parked while idle.
struct Live {
    binding: Arc<Binding>,
    parking: Arc<Parking>,
}

impl Drop for Live {
    /// However a `Live` goes, its listener stops accepting.
    fn drop(&mut self) {
        self.parking.stop(&self.binding, StopMode::Drain);
    }
}

struct Supervisor {
    /// The rules of `config`, shared with the bindings made from them.
    rules: Vec<Arc<Rule>>,
    config: Config,
    switcher: Switcher,
    options: Options,
    started: Instant,
    discovery: Option<Discovery>,
    entries: HashMap<Key, Entry>,
    /// (rule, namespace) → the reference it listens under: finds a second
    /// reference to a namespace the rule already serves.
    by_ns: HashMap<(String, NsId), NsRef>,
    /// How many bindings make their upstream connections from each
    /// namespace: those need its fd for every new upstream socket, until
    /// the binding is gone (a closed listener's connections may still be
    /// opening theirs, see `released`). At zero
    /// the cached fd is released, so the kernel can free a deleted
    /// namespace. A namespace only listened in needs its fd just while its
    /// listeners are created (see `open_many`): one fd less per namespace.
    refs: HashMap<NsId, usize>,
    /// Where bindings report that they are gone ([`Binding`]'s drop), to
    /// count their upstream namespace one user less.
    released: mpsc::UnboundedSender<NsId>,
    /// Bindings whose listen address is not (yet) configured in their
    /// namespace: how often that was found, and when to try again.
    addr_retry: HashMap<Key, AddrRetry>,
    /// Holds idle listeners without a task, and counts the serve tasks.
    parking: Arc<Parking>,
    /// The task watching parked listeners; ends with the supervisor.
    hub: Option<JoinHandle<()>>,
    /// Where a parse task sends the config it read ([`Control::Parsed`]);
    /// weak, so that the supervisor still sees its channel close when the
    /// [`Server`] is dropped.
    control: mpsc::WeakSender<Control>,
    /// A parse task is running: reloads asked for meanwhile wait in
    /// `queued_reloads` and are served by one more parse after it, so that
    /// configs are applied in the order they were read.
    parsing: bool,
    queued_reloads: Vec<ReloadReply>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(hub) = &self.hub {
            hub.abort();
        }
    }
}

/// A binding waiting for its listen address to exist.
struct AddrRetry {
    attempts: u32,
    due: Instant,
}

/// First and longest pause between attempts to listen on an address that
/// is not configured yet. A namespace usually appears before its addresses
/// (`ip netns add`, then `ip addr add` or the loopback brought up; CNI
/// plugins likewise), so the first retries come quickly; an address that
/// never appears costs one bind attempt per binding every 2 s.
const ADDR_RETRY_MIN: Duration = Duration::from_millis(50);
const ADDR_RETRY_MAX: Duration = Duration::from_secs(2);

/// Most bindings opened together; see `Supervisor::open_many`.
const OPEN_CHUNK: usize = 1024;

/// What an attempt to open one binding needs.
struct Opening {
    key: Key,
    rule: Arc<Rule>,
    /// A binding of the same key was just closed: its port may take a moment
    /// to be released.
    replacing: bool,
}

impl Supervisor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut control: mpsc::Receiver<Control>,
        mut lost: mpsc::UnboundedReceiver<Lost>,
        mut released: mpsc::UnboundedReceiver<NsId>,
    ) {
        let released = &mut released;
        loop {
            tokio::select! {
                Some(l) = lost.recv() => self.reopen_lost(l),
                Some(ns) = released.recv() => self.unacquire(ns),
                Some(cmd) = commands.recv() => match cmd {
                    Command::Status(reply) => { let _ = reply.send(self.status()); }
                    Command::Reload(reply) => self.request_reload(reply),
                },
                msg = control.recv() => match msg {
                    Some(Control::Reload(Some(config), reply)) => {
                        let _ = systemd::notify(&systemd::reloading_message());
                        let _ = reply.send(self.reload(Ok(config)).await);
                    }
                    Some(Control::Reload(None, reply)) => self.request_reload(reply),
                    Some(Control::Parsed(result, replies)) => {
                        let outcome = self.reload(result).await;
                        for reply in replies {
                            let _ = reply.send(outcome.clone());
                        }
                        self.parsing = false;
                        if !self.queued_reloads.is_empty() {
                            let replies = std::mem::take(&mut self.queued_reloads);
                            self.start_parse(replies);
                        }
                    }
                    Some(Control::Bindings(reply)) => { let _ = reply.send(self.live_bindings()); }
                    Some(Control::Shutdown(reply)) => {
                        self.shutdown(released).await;
                        let _ = reply.send(());
                        return;
                    }
                    None => { self.shutdown(released).await; return; }
                },
                () = next_retry(&self.addr_retry), if !self.addr_retry.is_empty() => {
                    self.retry_addresses().await;
                }
                event = next_event(&mut self.discovery) => match event {
                    Ok(e) => {
                        let mut batch = vec![e];
                        // Take whatever else is already known, to open in one go.
                        batch.extend(self.ready_events());
                        self.on_events(batch).await;
                    }
                    Err(e) => {
                        error!("following {} failed: {e}; namespaces that appear from now on will not be served until a reload", self.options.netns_dir.display());
                        self.discovery = None;
                    }
                },
            }
        }
    }

    /// Events discovery has already queued (after a start or a batch).
    fn ready_events(&mut self) -> Vec<NsEvent> {
        let mut out = Vec::new();
        if let Some(d) = self.discovery.as_mut() {
            while let Some(e) = d.try_next() {
                out.push(e);
            }
        }
        out
    }

    fn drain_discovery(&mut self) {
        let _ = self.ready_events();
    }

    fn known_names(&self) -> Vec<String> {
        self.discovery
            .as_ref()
            .map(|d| d.known().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// Starts re-reading the config file for `reply`. The file is read and
    /// parsed by a task of its own, so that status requests, namespace
    /// events and traffic are served meanwhile; the result comes back as
    /// [`Control::Parsed`].
    fn request_reload(&mut self, reply: ReloadReply) {
        let _ = systemd::notify(&systemd::reloading_message());
        if self.options.config_path.is_none() {
            let e = "no config file to re-read (started without --config)".to_owned();
            error!("reload rejected, the running config keeps serving: {e}");
            let _ = reply.send(Err(e));
            let _ = systemd::notify("READY=1");
            return;
        }
        if self.parsing {
            self.queued_reloads.push(reply);
        } else {
            self.start_parse(vec![reply]);
        }
    }

    fn start_parse(&mut self, replies: Vec<ReloadReply>) {
        let Some(path) = self.options.config_path.clone() else {
            return;
        };
        self.parsing = true;
        let back = self.control.clone();
        tokio::spawn(async move {
            let result = config::load(&path).map_err(|e| format!("{}: {e}", path.display()));
            if let Some(tx) = back.upgrade() {
                // A supervisor gone meanwhile drops the replies: their
                // callers are told the server stopped.
                let _ = tx.send(Control::Parsed(result, replies)).await;
            }
        });
    }

    async fn reload(&mut self, config: Result<Config, String>) -> Result<ReloadReport, String> {
        let outcome = match config {
            Ok(new) => {
                let r = self.apply(new).await;
                info!(
                    added = r.added,
                    removed = r.removed,
                    replaced = r.replaced,
                    retuned = r.retuned,
                    unchanged = r.unchanged,
                    reopened = r.reopened,
                    "config reloaded"
                );
                Ok(r)
            }
            Err(e) => {
                error!("reload rejected, the running config keeps serving: {e}");
                Err(e)
            }
        };
        let _ = systemd::notify("READY=1");
        outcome
    }

    /// Makes the bindings match `config`: what is new opens, what is gone
    /// closes (draining), what changed is replaced, the rest is untouched.
    async fn apply(&mut self, mut new: Config) -> ReloadReport {
        if !self.rules.is_empty() {
            if new.workers != self.config.workers {
                warn!("`workers` changed: takes effect at the next restart");
            }
            if new.control_socket != self.config.control_socket
                || new.metrics_listen != self.config.metrics_listen
            {
                warn!(
                    "`control_socket` / `metrics_listen` changed: take effect at the next restart"
                );
            }
        }
        if self.options.drain_pinned {
            // The running value is the command line's, not the file's: say
            // so whenever the file asks for another (not only when it
            // changed, which cannot be told from here).
            if let Some(file) = new.drain_timeout.filter(|d| *d != self.options.drain) {
                warn!(
                    "`drain_timeout` {file:?} in the file is not applied: --drain-timeout on the command line keeps {:?}",
                    self.options.drain
                );
            }
            new.drain_timeout = self.config.drain_timeout;
        } else if new.drain_timeout != self.config.drain_timeout {
            let drain = new.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT);
            if drain != self.options.drain {
                // Before anything below closes: the bindings this reload
                // removes or replaces drain with the new timeout too.
                info!(
                    "drain_timeout {drain:?} applied (was {:?}): to every listener closed from now on, open connections included",
                    self.options.drain
                );
                self.options.drain = drain;
                self.parking.set_drain(drain);
            }
        }
        self.rules = new.rules.iter().cloned().map(Arc::new).collect();
        self.config = new;
        let names = self.known_names();
        let mut desired: Vec<(Key, Arc<Rule>)> = Vec::new();
        let mut seen: std::collections::HashSet<Key> = Default::default();
        for rule in &self.rules {
            for sel in &rule.netns {
                let refs: Vec<NsRef> = match sel {
                    NsRef::Glob(_) => names
                        .iter()
                        .filter(|n| sel.matches(n))
                        .map(|n| NsRef::Named(n.clone()))
                        .collect(),
                    other => vec![other.clone()],
                };
                for r in refs {
                    let key = (rule.name.clone(), r);
                    if seen.insert(key.clone()) {
                        desired.push((key, rule.clone()));
                    }
                }
            }
        }
        let mut report = ReloadReport::default();
        let gone: Vec<Key> = self
            .entries
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            self.close(&key, OnDelete::Drain, "removed from the config");
            self.entries.remove(&key);
            report.removed += 1;
        }
        let mut opening = Vec::new();
        let mut retuned_rules = std::collections::HashSet::new();
        let mut retrying = Vec::new();
        for (key, rule) in desired {
            match self.entries.get(&key) {
                Some(e) if same_rule(&e.rule, &rule) => {
                    let retuned = e.rule.max_connections != rule.max_connections
                        || e.rule.proxy_protocol != rule.proxy_protocol
                        || e.rule.idle_timeout != rule.idle_timeout
                        || e.rule.half_close_timeout != rule.half_close_timeout
                        || e.rule.tcp_keepalive != rule.tcp_keepalive;
                    // A binding not listening takes the new rule when it opens.
                    let live = match &e.state {
                        State::Listening { live, .. } if retuned => Some(&live.binding),
                        _ => None,
                    };
                    let retry = !matches!(e.state, State::Listening { .. });
                    if retry && !matches!(e.state, State::SameAs(_)) {
                        // Counted once the attempt is over, below.
                        retrying.push(key.clone());
                    } else if let Some(binding) = live {
                        report.retuned += 1;
                        binding.retune(&rule);
                        if retuned_rules.insert(rule.name.clone()) {
                            info!(rule = %rule.name,
                                "max_connections {}, proxy_protocol {}, idle_timeout {}, half_close_timeout {} and tcp_keepalive {} applied in place: listeners and open connections are kept",
                                rule.max_connections.map_or("none".to_owned(), |n| n.to_string()),
                                rule.proxy_protocol.map_or("off".to_owned(), |v| v.to_string()),
                                rule.idle_timeout.map_or("off".to_owned(), |d| format!("{d:?}")),
                                rule.half_close_timeout.map_or("off".to_owned(), |d| format!("{d:?}")),
                                rule.tcp_keepalive.map_or("off".to_owned(), |k| format!(
                                    "idle {:?}, interval {:?}, count {}", k.idle, k.interval, k.count)));
                        }
                    } else {
                        report.unchanged += 1;
                    }
                    // Share the new Arc so that later comparisons are cheap.
                    if let Some(e) = self.entries.get_mut(&key) {
                        e.rule = rule.clone();
                    }
                    if retry {
                        opening.push(Opening {
                            key,
                            rule,
                            replacing: false,
                        });
                    }
                }
                Some(_) => {
                    self.close(&key, OnDelete::Drain, "its rule changed");
                    report.replaced += 1;
                    opening.push(Opening {
                        key,
                        rule,
                        replacing: true,
                    });
                }
                None => {
                    report.added += 1;
                    opening.push(Opening {
                        key,
                        rule,
                        replacing: false,
                    });
                }
            }
        }
        self.open_many(opening).await;
        // A binding that was not listening (failed, or waiting for its
        // namespace or address) and listens now was reopened; the others
        // are as they were.
        for key in retrying {
            match self.entries.get(&key) {
                Some(Entry {
                    state: State::Listening { .. },
                    ..
                }) => report.reopened += 1,
                _ => report.unchanged += 1,
            }
        }
        report
    }

    /// Tries again the bindings whose listen address was missing and whose
    /// retry is due. Entries gone or no longer waiting meanwhile (removed by
    /// a reload, their namespace deleted) are forgotten.
    async fn retry_addresses(&mut self) {
        let now = Instant::now();
        let due: Vec<Key> = self
            .addr_retry
            .iter()
            .filter(|(_, r)| r.due <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut opening = Vec::new();
        for key in due {
            match self.entries.get(&key) {
                Some(Entry {
                    rule,
                    state: State::Waiting(_),
                    ..
                }) => opening.push(Opening {
                    rule: rule.clone(),
                    key,
                    replacing: false,
                }),
                _ => {
                    self.addr_retry.remove(&key);
                }
            }
        }
        self.open_many(opening).await;
    }

    async fn on_events(&mut self, events: Vec<NsEvent>) {
        let mut opening = Vec::new();
        for event in events {
            match event {
                NsEvent::Appeared(name) => {
                    let named = NsRef::Named(name.clone());
                    let mut upstream_of = std::collections::HashSet::new();
                    for rule in &self.rules {
                        let listens_there =
                            rule.netns.iter().any(|s| *s == named || s.matches(&name));
                        let key = (rule.name.clone(), named.clone());
                        if listens_there && !self.entries.contains_key(&key) {
                            opening.push(Opening {
                                key,
                                rule: rule.clone(),
                                replacing: false,
                            });
                        } else if listens_there {
                            if let Some(Entry {
                                state: State::Waiting(_),
                                ..
                            }) = self.entries.get(&key)
                            {
                                opening.push(Opening {
                                    key,
                                    rule: rule.clone(),
                                    replacing: false,
                                });
                            }
                        }
                        if rule.upstream_netns == named {
                            upstream_of.insert(rule.name.as_str());
                        }
                    }
                    // Everything that waited for this upstream, in one pass
                    // over the entries (one per rule was quadratic when many
                    // rules share an upstream namespace).
                    if !upstream_of.is_empty() {
                        for (k, e) in &self.entries {
                            if upstream_of.contains(k.0.as_str())
                                && matches!(e.state, State::Waiting(_))
                                && k.1 != named
                            {
                                opening.push(Opening {
                                    key: k.clone(),
                                    rule: e.rule.clone(),
                                    replacing: false,
                                });
                            }
                        }
                    }
                }
                NsEvent::Gone(name) => {
                    let named = NsRef::Named(name.clone());
                    // Looked up per rule rather than by scanning every
                    // entry: with thousands of namespaces going away, a scan
                    // per event would be quadratic.
                    let mut affected: Vec<Key> = Vec::new();
                    let mut upstream_of = std::collections::HashSet::new();
                    for rule in &self.rules {
                        let key = (rule.name.clone(), named.clone());
                        if self.entries.contains_key(&key) {
                            affected.push(key);
                        }
                        if rule.upstream_netns == named {
                            upstream_of.insert(rule.name.as_str());
                        }
                    }
                    if !upstream_of.is_empty() {
                        affected.extend(
                            self.entries
                                .keys()
                                .filter(|k| upstream_of.contains(k.0.as_str()) && k.1 != named)
                                .cloned(),
                        );
                    }
                    for key in affected {
                        let Some(e) = self.entries.get(&key) else {
                            continue;
                        };
                        let rule = e.rule.clone();
                        let upstream_side = key.1 != named;
                        let why = if upstream_side {
                            format!("upstream namespace \"{name}\" was deleted")
                        } else {
                            format!("namespace \"{name}\" was deleted")
                        };
                        self.close(&key, rule.on_netns_delete, &why);
                        let from_glob = !upstream_side && !rule.netns.contains(&named);
                        if from_glob {
                            self.entries.remove(&key);
                        } else if let Some(e) = self.entries.get_mut(&key) {
                            e.state =
                                State::Waiting(format!("{why}; waiting for it to exist again"));
                        }
                    }
                }
            }
        }
        // A name that came and went within one batch: only open what still waits.
        opening.retain(|o| {
            !matches!(
                self.entries.get(&o.key),
                Some(Entry {
                    state: State::Listening { .. },
                    ..
                })
            )
        });
        opening.sort_by(|a, b| a.key.cmp(&b.key));
        opening.dedup_by(|a, b| a.key == b.key);
        self.open_many(opening).await;
    }

    /// Counts one user less; the last one releases the cached fd.
    fn unacquire(&mut self, id: NsId) {
        if let Some(n) = self.refs.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(&id);
                self.switcher.release(id);
            }
        }
    }

    /// Closes the binding of `key` if it listens; the entry stays (callers
    /// decide its new state).
    fn close(&mut self, key: &Key, policy: OnDelete, why: &str) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        let old = std::mem::replace(&mut entry.state, State::Waiting(why.to_owned()));
        let State::Listening { live, .. } = old else {
            return;
        };
        let b = &live.binding;
        match policy {
            OnDelete::Close => {
                info!(rule = %b.rule.name, netns = %b.netns, "closing the listener and its connections: {why}");
                self.parking.stop(b, StopMode::Close);
            }
            OnDelete::Drain => {
                info!(rule = %b.rule.name, netns = %b.netns, "closing the listener, open connections drain: {why}");
                self.parking.stop(b, StopMode::Drain);
            }
        }
        self.by_ns.remove(&(b.rule.name.clone(), b.ns));
        // Its upstream namespace is released once the binding is gone.
    }

    /// Schedules a new listener for a binding whose socket was lost (see
    /// [`Lost`]), if the binding is still the one listening; it opens with
    /// the next retry round, as a binding waiting for its address does.
    fn reopen_lost(&mut self, lost: Lost) {
        let key = (lost.binding.rule.name.clone(), lost.binding.netns.clone());
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        let State::Listening { live, .. } = &entry.state else {
            return;
        };
        if !Arc::ptr_eq(&live.binding, &lost.binding) {
            return;
        }
        entry.state = State::Waiting(format!(
            "the listener was lost ({}); opening it again",
            lost.cause
        ));
        self.by_ns.remove(&(key.0.clone(), lost.binding.ns));
        self.addr_retry.insert(
            key,
            AddrRetry {
                attempts: 0,
                due: Instant::now() + ADDR_RETRY_MIN,
            },
        );
    }

    /// Resolves and opens bindings; the listeners are created concurrently
    /// so that their namespace switches are batched.
    async fn open_many(&mut self, mut opening: Vec<Opening>) {
        // A namespace's bindings in one chunk, so that its fd is opened once.
        let mut first_seen: HashMap<NsRef, usize> = HashMap::new();
        for (i, o) in opening.iter().enumerate() {
            first_seen.entry(o.key.1.clone()).or_insert(i);
        }
        opening.sort_by_key(|o| first_seen[&o.key.1]);
        // In chunks, so that the namespace fds held while listeners are made
        // stay bounded: at 10,000 namespaces, holding every one at once would
        // need a third more fds than the listeners themselves.
        while !opening.is_empty() {
            let rest = opening.split_off(opening.len().min(OPEN_CHUNK));
            let chunk = std::mem::replace(&mut opening, rest);
            self.open_chunk(chunk).await;
        }
    }

    async fn open_chunk(&mut self, opening: Vec<Opening>) {
        // Every namespace of the chunk resolved in one trip to the namespace
        // thread: one round trip per binding made startup at thousands of
        // namespaces wait on thread wake-ups, not on work.
        let mut refs: Vec<NsRef> = opening
            .iter()
            .flat_map(|o| [o.key.1.clone(), o.rule.upstream_netns.clone()])
            .collect();
        refs.sort();
        refs.dedup();
        let results = self.switcher.resolve_many(&refs).await;
        let resolved_ids: Vec<NsId> = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .copied()
            .collect();
        let resolved: HashMap<NsRef, Result<NsId, NsError>> =
            refs.into_iter().zip(results).collect();

        // Whatever becomes of an opening, an earlier wait for its address
        // is over; a new one is recorded if the address is still missing.
        let retried: HashMap<Key, u32> = opening
            .iter()
            .filter_map(|o| {
                self.addr_retry
                    .remove(&o.key)
                    .map(|r| (o.key.clone(), r.attempts))
            })
            .collect();
        let mut pending = JoinSet::new();
        for Opening {
            key,
            rule,
            replacing,
        } in opening
        {
            let netns = key.1.clone();
            let mut replacing = replacing;
            let prepared = match self.prepare(&rule, &netns, &resolved) {
                // The reference listed first names the namespace (in PROXY
                // v2 headers, logs and metric labels), whichever was opened
                // first: this chunk's order follows namespaces, not rules,
                // and a reload may list a name before a reference that
                // already listens.
                Err(State::SameAs(other)) if listed_before(&rule, &netns, &other) => {
                    self.demote(&rule, &other, &netns, &resolved);
                    // The demoted listener may still hold the port.
                    replacing = true;
                    self.prepare(&rule, &netns, &resolved)
                }
                other => other,
            };
            let state = match prepared {
                Ok(binding) => {
                    self.by_ns
                        .insert((rule.name.clone(), binding.ns), netns.clone());
                    pending.spawn(async move {
                        let listener = open_listener(&binding, replacing).await;
                        (binding, listener)
                    });
                    State::Opening
                }
                Err(state) => state,
            };
            match &state {
                State::Waiting(reason) => {
                    warn!(rule = %rule.name, netns = %netns, listen = %rule.listen, "waiting: {reason}");
                }
                State::Failed(reason) => {
                    error!(rule = %rule.name, netns = %netns, listen = %rule.listen, "not listening: {reason}");
                }
                State::SameAs(other) => {
                    warn!(rule = %rule.name, netns = %netns, "\"{netns}\" is the same namespace as \"{other}\"; listening there once");
                }
                _ => {}
            }
            self.entries.insert(key, Entry { rule, netns, state });
        }
        while let Some(done) = pending.join_next().await {
            let (binding, listener) = done.expect("opening a listener does not panic");
            let key = (binding.rule.name.clone(), binding.netns.clone());
            if !matches!(
                self.entries.get(&key),
                Some(Entry {
                    state: State::Opening,
                    ..
                })
            ) {
                // Demoted meanwhile (see `demote`): its listener closes here.
                continue;
            }
            let result = listener.and_then(|l| {
                let local = l.local_addr().map_err(|source| ListenError::Socket {
                    addr: binding.rule.listen,
                    source,
                })?;
                Ok((l, local))
            });
            let state = match result {
                Ok((listener, local)) => {
                    info!(rule = %binding.rule.name, protocol = %binding.rule.protocol, netns = %binding.netns,
                        listen = %local, upstream = %binding.rule.upstream, upstream_netns = %binding.rule.upstream_netns,
                        "listening");
                    // Parked until the first client: most listeners of a
                    // large deployment stay idle, and then cost no task.
                    self.parking.park(binding.clone(), listener);
                    State::Listening {
                        live: Live {
                            binding,
                            parking: self.parking.clone(),
                        },
                        local,
                    }
                }
                Err(e) => {
                    self.by_ns.remove(&(binding.rule.name.clone(), binding.ns));
                    if address_not_there(&e) {
                        let attempts = retried.get(&key).copied().unwrap_or(0) + 1;
                        if attempts == 1 {
                            warn!(rule = %binding.rule.name, netns = %binding.netns, listen = %binding.rule.listen,
                                "waiting: {e}; retrying until the address is configured");
                        }
                        let pause = ADDR_RETRY_MIN
                            .saturating_mul(1 << attempts.min(16))
                            .min(ADDR_RETRY_MAX);
                        self.addr_retry.insert(
                            key.clone(),
                            AddrRetry {
                                attempts,
                                due: Instant::now() + pause,
                            },
                        );
                        State::Waiting(format!("{e}; retrying until the address is configured"))
                    } else {
                        error!(rule = %binding.rule.name, netns = %binding.netns, listen = %binding.rule.listen, "not listening: {e}");
                        State::Failed(e.to_string())
                    }
                }
            };
            if let Some(entry) = self.entries.get_mut(&key) {
                entry.state = state;
            }
        }
        // Every listener of this chunk exists now (requests to the namespace
        // thread are served in order, so none is still waiting for a fd).
        // Namespaces resolved here that no binding connects from (listened
        // in only, or whose bindings failed) are released.
        for ns in resolved_ids {
            if !self.refs.contains_key(&ns) {
                self.switcher.release(ns);
            }
        }
    }

    /// Makes the binding of `rule` under reference `loser` give way to
    /// `winner`, a reference to the same namespace listed before it: a
    /// listening one closes (draining), one being opened is dropped when its
    /// listener is made.
    fn demote(
        &mut self,
        rule: &Rule,
        loser: &NsRef,
        winner: &NsRef,
        resolved: &HashMap<NsRef, Result<NsId, NsError>>,
    ) {
        let key = (rule.name.clone(), loser.clone());
        let why = format!("\"{winner}\", listed before it in the rule, names the same namespace");
        self.close(&key, OnDelete::Drain, &why);
        if let Some(Ok(ns)) = resolved.get(winner) {
            self.by_ns.remove(&(rule.name.clone(), *ns));
        }
        if let Some(e) = self.entries.get_mut(&key) {
            info!(rule = %rule.name, netns = %loser, "{why}: serving it as \"{winner}\"");
            e.state = State::SameAs(winner.clone());
        }
    }

    /// Builds a binding from its namespaces, resolved by the caller; the
    /// error is the state the binding takes instead.
    fn prepare(
        &mut self,
        rule: &Arc<Rule>,
        netns: &NsRef,
        resolved: &HashMap<NsRef, Result<NsId, NsError>>,
    ) -> Result<Arc<Binding>, State> {
        let lookup = |r: &NsRef| -> Result<NsId, (bool, String)> {
            match resolved.get(r) {
                Some(Ok(id)) => Ok(*id),
                Some(Err(e)) => Err((
                    matches!(
                        e,
                        NsError::NotFound {
                            reference: NsRef::Named(_),
                            ..
                        }
                    ),
                    e.to_string(),
                )),
                None => Err((false, format!("namespace \"{r}\" was not resolved"))),
            }
        };
        let upstream_ns = match lookup(&rule.upstream_netns) {
            Ok(id) => id,
            Err((true, e)) => return Err(State::Waiting(format!("upstream namespace: {e}"))),
            Err((false, e)) => return Err(State::Failed(format!("upstream namespace: {e}"))),
        };
        let ns = match lookup(netns) {
            Ok(id) => id,
            Err((true, e)) => return Err(State::Waiting(e)),
            Err((false, e)) => return Err(State::Failed(e)),
        };
        if let Some(other) = self.by_ns.get(&(rule.name.clone(), ns)) {
            if other != netns {
                return Err(State::SameAs(other.clone()));
            }
        }
        *self.refs.entry(upstream_ns).or_default() += 1;
        Ok(Arc::new(Binding::new(
            rule.clone(),
            netns.clone(),
            ns,
            upstream_ns,
            self.switcher.clone(),
            Some(self.released.clone()),
        )))
    }

    async fn shutdown(&mut self, released: &mut mpsc::UnboundedReceiver<NsId>) {
        let _ = systemd::notify("STOPPING=1");
        info!(
            "shutting down: no new connections; open TCP connections get up to {:?}, UDP sessions close now",
            self.options.drain
        );
        // Dropping a listening entry stops its listener.
        self.entries
            .retain(|_, e| !matches!(e.state, State::Listening { .. }));
        // Every binding is told to stop: the serve tasks end once their
        // connections have drained.
        self.parking.stopped().await;
        // Then every binding is gone (but those a library caller still
        // holds): release their upstream namespaces.
        while let Ok(ns) = released.try_recv() {
            self.unacquire(ns);
        }
    }

    fn live_bindings(&self) -> Vec<Arc<Binding>> {
        self.sorted_entries()
            .into_iter()
            .filter_map(|e| match &e.state {
                State::Listening { live, .. } => Some(live.binding.clone()),
                _ => None,
            })
            .collect()
    }

    /// Entries in configuration order (rule, then namespace reference).
    fn sorted_entries(&self) -> Vec<&Entry> {
        let position: HashMap<&str, usize> = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.name.as_str(), i))
            .collect();
        let mut entries: Vec<(&Key, &Entry)> = self.entries.iter().collect();
        // Each key made once: formatting references per comparison cost
        // two strings per comparison, n log n of them per status.
        entries.sort_by_cached_key(|(k, _)| {
            let place = position.get(k.0.as_str()).copied().unwrap_or(usize::MAX);
            (place, k.1.to_string())
        });
        entries.into_iter().map(|(_, e)| e).collect()
    }

    fn status(&self) -> Status {
        let bindings = self
            .sorted_entries()
            .into_iter()
            .map(|e| {
                let (state, reason, local, counters) = match &e.state {
                    State::Listening { live, local } => (
                        "listening",
                        None,
                        Some(local.to_string()),
                        Counters::from_stats(&live.binding.stats),
                    ),
                    State::Waiting(r) => ("waiting", Some(r.clone()), None, Counters::default()),
                    State::Failed(r) => ("failed", Some(r.clone()), None, Counters::default()),
                    State::SameAs(o) => (
                        "same_namespace",
                        Some(format!("same namespace as \"{o}\", served there")),
                        None,
                        Counters::default(),
                    ),
                    State::Opening => (
                        "waiting",
                        Some("opening".to_owned()),
                        None,
                        Counters::default(),
                    ),
                };
                let parked = match &e.state {
                    State::Listening { live, .. } => live.binding.is_parked(),
                    _ => false,
                };
                BindingReport {
                    rule: e.rule.name.clone(),
                    protocol: e.rule.protocol.to_string(),
                    netns: e.netns.to_string(),
                    state: state.into(),
                    reason,
                    listen: e.rule.listen.to_string(),
                    local,
                    upstream: e.rule.upstream.to_string(),
                    upstream_netns: e.rule.upstream_netns.to_string(),
                    counters,
                    parked,
                    max_connections: e.rule.max_connections,
                }
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            uptime_secs: self.started.elapsed().as_secs(),
            workers: self.options.workers,
            config: self
                .options
                .config_path
                .as_ref()
                .map(|p| p.display().to_string()),
            namespaces_known: self.discovery.as_ref().map_or(0, |d| d.known().count()),
            connections_cut: {
                let (at_drain_timeout, at_close) = crate::proxy::cuts();
                crate::status::Cuts {
                    at_drain_timeout,
                    at_close,
                }
            },
            heap_allocated_bytes: crate::sys::heap_allocated(),
            bindings,
        }
    }
}

/// Whether `rule` lists `a` before `b` (a name matched by a glob counts at
/// the glob's place).
fn listed_before(rule: &Rule, a: &NsRef, b: &NsRef) -> bool {
    let place = |r: &NsRef| {
        rule.netns
            .iter()
            .position(|s| s == r || matches!(r, NsRef::Named(n) if s.matches(n)))
            .unwrap_or(usize::MAX)
    };
    place(a) < place(b)
}

/// Completes when the earliest address retry is due.
async fn next_retry(retry: &HashMap<Key, AddrRetry>) {
    if let Some(due) = retry.values().map(|r| r.due).min() {
        tokio::time::sleep_until(due.into()).await;
    }
}

/// Whether listening failed because the address is not configured in the
/// namespace (yet).
fn address_not_there(e: &ListenError) -> bool {
    matches!(e, ListenError::Bind { source, .. } if source.raw_os_error() == Some(libc::EADDRNOTAVAIL))
}

async fn next_event(d: &mut Option<Discovery>) -> io::Result<NsEvent> {
    match d {
        Some(d) => d.next().await,
        None => std::future::pending().await,
    }
}

/// Whether a binding of rule `a` serves as one of rule `b` would, but for
/// the settings a running binding takes in place ([`Binding::retune`]:
/// `max_connections`, `proxy_protocol`). The namespace list is not part of
/// it: adding a namespace to a rule must not reopen the listeners it already
/// has (and comparing the list per binding would cost N² at N namespaces).
/// Nor is `origin` (a moved line).
fn same_rule(a: &Rule, b: &Rule) -> bool {
    // Destructured so that a new field cannot be forgotten here.
    let Rule {
        name,
        protocol,
        listen,
        netns: _,
        upstream,
        upstream_netns,
        connect_timeout,
        backlog,
        max_connections: _,
        proxy_protocol: _,
        idle_timeout: _,
        half_close_timeout: _,
        tcp_keepalive: _,
        udp_idle_timeout,
        udp_max_sessions,
        on_netns_delete,
        sctp_streams,
        sctp_listen_addrs,
        sctp_upstream_addrs,
        sctp_source_addrs,
        origin: _,
    } = a;
    *name == b.name
        && *protocol == b.protocol
        && *listen == b.listen
        && *upstream == b.upstream
        && *upstream_netns == b.upstream_netns
        && *connect_timeout == b.connect_timeout
        && *backlog == b.backlog
        && *udp_idle_timeout == b.udp_idle_timeout
        && *udp_max_sessions == b.udp_max_sessions
        && *on_netns_delete == b.on_netns_delete
        && *sctp_streams == b.sctp_streams
        && *sctp_listen_addrs == b.sctp_listen_addrs
        && *sctp_upstream_addrs == b.sctp_upstream_addrs
        && *sctp_source_addrs == b.sctp_source_addrs
}

/// Opens a listener; when replacing a binding of the same address, waits
/// (bounded) for the old listener to be closed by its task.
async fn open_listener(b: &Binding, replacing: bool) -> Result<Listener, ListenError> {
    let mut tries = 0;
    loop {
        match Listener::open(b).await {
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
