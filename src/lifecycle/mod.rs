//! Turns a configuration into running bindings and keeps them matched to
//! the configuration and to the namespaces that exist, as both change.
//!
//! A *binding* is one rule in one namespace. The [`Server`] is an actor: one
//! task owns every binding and reacts to its inputs one at a time:
//! namespaces appearing and vanishing ([`Discovery`]), reloads, retries
//! falling due, lost listeners and status requests. Each binding succeeds
//! or fails on its own: a missing namespace makes it wait, a port in use, a
//! permission error or a panic fails it, and every other binding serves.
//!
//! The decisions are apart from the sockets, so that they can be read and
//! tested without root:
//! - `desired`: rules × known namespaces → the bindings that should exist.
//! - `reconcile`: the pure decision, from the entries as plain data and an
//!   input to a list of actions (open, close draining or now, retune in
//!   place, keep, wait, fail, forget, retry).
//! - `apply`: the thin shell that carries actions out: resolves namespaces
//!   in batches, opens listeners in chunks, parks them, contains a panic.
//! - `leases`: the namespaces a chunk resolves, held open while it needs
//!   them; a binding holds a [`Lease`](crate::netns::Lease) on its upstream
//!   namespace for as long as it exists.
//! - `retry`: the back-off schedule for addresses not configured yet.
//! - `report`: states rendered as text, and the status snapshot.

mod apply;
mod desired;
mod leases;
mod reconcile;
mod report;
mod retry;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use self::desired::{Key, Slot};
use self::reconcile::{FailReason, Phase, View, WaitReason};
pub use self::report::Tally;
use crate::config::{self, Config, Rule};
use crate::netns::discovery::{Discovery, NsEvent};
use crate::netns::{Leases, NETNS_RUN_DIR, NsId, NsRef, SocketFactory};
use crate::proxy::{Binding, Lost, Parking, StopMode};
use crate::status::{ReloadReport, Status};
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
    /// Settings given on the command line, which a reload of the file
    /// keeps (and says so when the file asks for another value).
    pub pinned: Pinned,
    /// Listening sockets taken over from the nsproxy this one replaces
    /// (`--takeover`): a binding uses the one of its protocol, namespace
    /// and listen address instead of making a socket.
    pub inherited: Option<Arc<crate::takeover::Inherited>>,
}

/// Which of the file's settings the command line overrides (`--drain-timeout`,
/// `--workers`, `--control-socket`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pinned {
    pub drain: bool,
    pub workers: bool,
    pub control_socket: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            drain: DEFAULT_DRAIN_TIMEOUT,
            config_path: None,
            netns_dir: PathBuf::from(NETNS_RUN_DIR),
            workers: crate::runtime::default_workers(),
            park_after: DEFAULT_PARK_AFTER,
            pinned: Pinned::default(),
            inherited: None,
        }
    }
}

/// A request to the running server from the control API, the metrics
/// endpoint or a signal handler ([`Server::commands`]).
#[derive(Debug)]
pub enum Command {
    /// A snapshot of every binding.
    Status(oneshot::Sender<Status>),
    /// Re-read the config file and apply it.
    Reload(ReloadReply),
    /// Answered at once: the server's loop is turning (the liveness probe).
    Ping(oneshot::Sender<()>),
}

/// Where a reload's outcome goes.
pub type ReloadReply = oneshot::Sender<Result<ReloadReport, ReloadError>>;

/// Why a reload changed nothing; the running config keeps serving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    #[error("no config file to re-read (started without --config)")]
    NoConfigFile,
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("the server has stopped")]
    Stopped,
}

/// The running proxy: a handle to the task that owns every binding.
pub struct Server {
    commands: mpsc::Sender<Command>,
    control: mpsc::Sender<Control>,
    task: JoinHandle<()>,
}

/// What only the [`Server`] handle (and the server's own tasks) ask.
enum Control {
    Apply(Config, ReloadReply),
    Bindings(oneshot::Sender<Vec<Arc<Binding>>>),
    Tally(oneshot::Sender<report::Tally>),
    Shutdown(oneshot::Sender<()>),
    /// Copies of every listening socket, for a takeover.
    Handover(oneshot::Sender<Vec<(crate::takeover::Handed, std::os::fd::OwnedFd)>>),
    /// The config file, read and parsed by a task of its own (see
    /// `Supervisor::request_reload`), for the reloads waiting on it.
    Parsed(Result<Config, ReloadError>, Vec<ReloadReply>),
}

impl Server {
    /// Opens every binding of `config` and starts following namespaces;
    /// returns once the initial bindings are listening, waiting or failed.
    /// Never fails as a whole (see [`Server::status`]). Sockets come from
    /// `sockets` (a [`Switcher`](crate::netns::Switcher), or any
    /// [`SocketFactory`]). Must run inside a tokio runtime.
    pub async fn start(
        config: Config,
        sockets: impl Into<Arc<dyn SocketFactory>>,
        options: Options,
    ) -> Server {
        let sockets = sockets.into();
        let discovery = match Discovery::start_with(&options.netns_dir, &followed(&config)) {
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
        let (commands, command_rx) = mpsc::channel(64);
        let (control, control_rx) = mpsc::channel(8);
        let hub = hub.map(|h| tokio::spawn(h.run()));
        let mut sup = Supervisor {
            parking,
            hub,
            rules: Vec::new(),
            config: config.clone(),
            leases: Leases::new(sockets.clone()),
            sockets,
            options,
            started: Instant::now(),
            discovery,
            entries: HashMap::new(),
            by_ns: HashMap::new(),
            retry: retry::Schedule::default(),
            control: control.downgrade(),
            parsing: false,
            queued_reloads: Vec::new(),
        };
        // Namespaces already there are known before the first reconcile, so
        // that globs see them at once.
        let _ = sup.ready_events();
        sup.apply_config(config).await;
        let task = tokio::spawn(sup.run(command_rx, control_rx, lost));
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

    /// How many bindings are in each state: what [`Server::status`] would
    /// count, without a report per binding (the start-up's `ready:` line,
    /// at thousands of bindings).
    pub async fn tally(&self) -> report::Tally {
        let (tx, rx) = oneshot::channel();
        let _ = self.control.send(Control::Tally(tx)).await;
        rx.await.unwrap_or_default()
    }

    /// The bindings that are listening, in the order of [`Server::status`],
    /// with their live counters. A binding keeps its upstream namespace's fd
    /// open while anything holds it: drop these when done with them.
    pub async fn bindings(&self) -> Vec<Arc<Binding>> {
        let (tx, rx) = oneshot::channel();
        let _ = self.control.send(Control::Bindings(tx)).await;
        rx.await.unwrap_or_default()
    }

    /// A handle that asks for copies of the listening sockets (for a
    /// takeover, [`crate::takeover::Giver`]).
    pub fn handover(&self) -> Handover {
        Handover(self.control.clone())
    }

    /// Applies `config`, or re-reads the config file when `None`. An invalid
    /// config changes nothing and is returned as the error.
    pub async fn reload(&self, config: Option<Config>) -> Result<ReloadReport, ReloadError> {
        let (tx, rx) = oneshot::channel();
        let sent = match config {
            Some(c) => self.control.send(Control::Apply(c, tx)).await.is_ok(),
            None => self.commands.send(Command::Reload(tx)).await.is_ok(),
        };
        if !sent {
            return Err(ReloadError::Stopped);
        }
        rx.await.unwrap_or(Err(ReloadError::Stopped))
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

/// Asks a running [`Server`] for copies of its listening sockets.
#[derive(Clone)]
pub struct Handover(mpsc::Sender<Control>);

impl Handover {
    /// A copy of each listening binding's socket, described; empty once
    /// the server has stopped.
    pub async fn listening(&self) -> Vec<(crate::takeover::Handed, std::os::fd::OwnedFd)> {
        let (tx, rx) = oneshot::channel();
        if self.0.send(Control::Handover(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

struct Entry {
    rule: Arc<Rule>,
    netns: NsRef,
    state: State,
}

enum State {
    Listening {
        live: Live,
        local: SocketAddr,
        /// The listener's fd number and socket inode: whoever holds the
        /// socket (the parking set or a serve task), a takeover copies it
        /// by these ([`crate::sys::fdpass::dup_if_same`]).
        fd: (std::os::fd::RawFd, u64),
    },
    Waiting(WaitReason),
    Failed(FailReason),
    SameAs(NsRef),
    /// Its listener is being made (`open_chunk`).
    Opening,
}

impl View for Entry {
    fn rule(&self) -> &Arc<Rule> {
        &self.rule
    }

    fn phase(&self) -> Phase {
        match self.state {
            State::Listening { .. } => Phase::Listening,
            // Not seen between inputs: a chunk's opens end before the next.
            State::Waiting(_) | State::Opening => Phase::Waiting,
            State::Failed(_) => Phase::Failed,
            State::SameAs(_) => Phase::SameAs,
        }
    }
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
    /// The rules of `config`, one per port of a range, shared with the
    /// bindings made from them.
    rules: Vec<Arc<Rule>>,
    config: Config,
    /// Where namespaces are resolved and listeners made.
    sockets: Arc<dyn SocketFactory>,
    /// Who holds which namespace open: the bindings (their upstream one) and
    /// the chunk being opened (every namespace it resolved).
    leases: Leases,
    options: Options,
    started: Instant,
    discovery: Option<Discovery>,
    entries: HashMap<Key, Entry>,
    /// (rule and port, namespace) → the reference it listens under: finds
    /// a second reference to a namespace the rule already serves.
    by_ns: HashMap<(Slot, NsId), NsRef>,
    /// Bindings to open again later: their listen address is not (yet)
    /// configured in their namespace, or their listener was lost.
    retry: retry::Schedule,
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

impl Supervisor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut control: mpsc::Receiver<Control>,
        mut lost: mpsc::UnboundedReceiver<Lost>,
    ) {
        loop {
            tokio::select! {
                Some(l) = lost.recv() => self.on_lost(l).await,
                Some(cmd) = commands.recv() => match cmd {
                    Command::Status(reply) => { let _ = reply.send(self.status()); }
                    Command::Reload(reply) => self.request_reload(reply),
                    Command::Ping(reply) => { let _ = reply.send(()); }
                },
                msg = control.recv() => match msg {
                    Some(Control::Apply(config, reply)) => {
                        let _ = systemd::notify(&systemd::reloading_message());
                        let _ = reply.send(self.reload(Ok(config)).await);
                    }
                    Some(Control::Parsed(result, replies)) => self.parsed(result, replies).await,
                    Some(Control::Bindings(reply)) => { let _ = reply.send(self.live_bindings()); }
                    Some(Control::Tally(reply)) => { let _ = reply.send(self.tally()); }
                    Some(Control::Handover(reply)) => { let _ = reply.send(self.handover()); }
                    Some(Control::Shutdown(reply)) => {
                        self.shutdown().await;
                        let _ = reply.send(());
                        return;
                    }
                    None => { self.shutdown().await; return; }
                },
                () = retry::next_due(&self.retry), if !self.retry.is_empty() => {
                    self.retry_due().await;
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

    fn known_refs(&self) -> Vec<NsRef> {
        self.discovery
            .as_ref()
            .map(|d| d.known().collect())
            .unwrap_or_default()
    }

    /// Starts re-reading the config file for `reply`. The file is read and
    /// parsed by a task of its own, so that status requests, namespace
    /// events and traffic are served meanwhile; the result comes back as
    /// [`Control::Parsed`].
    fn request_reload(&mut self, reply: ReloadReply) {
        let _ = systemd::notify(&systemd::reloading_message());
        if self.options.config_path.is_none() {
            let e = ReloadError::NoConfigFile;
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
        // Through the factory: split, the socket broker reads the file.
        let sockets = self.sockets.clone();
        tokio::spawn(async move {
            let text = sockets.read_config(&path).await;
            let result = text
                .and_then(|t| config::parse_toml(&t, &path.display().to_string()))
                .map_err(|e| ReloadError::Invalid {
                    path: path.clone(),
                    message: e.to_string(),
                });
            if let Some(tx) = back.upgrade() {
                // A supervisor gone meanwhile drops the replies: their
                // callers are told the server stopped.
                let _ = tx.send(Control::Parsed(result, replies)).await;
            }
        });
    }

    /// A parse task is done: its config is applied, for every reload that
    /// waited on it, and the reloads asked for meanwhile parse again.
    async fn parsed(&mut self, result: Result<Config, ReloadError>, replies: Vec<ReloadReply>) {
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

    async fn reload(
        &mut self,
        config: Result<Config, ReloadError>,
    ) -> Result<ReloadReport, ReloadError> {
        let outcome = match config {
            Ok(new) => {
                let r = self.apply_config(new).await;
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

    /// Makes the bindings match `new`: what is new opens, what is gone
    /// closes (draining), what changed is replaced, the rest is untouched.
    async fn apply_config(&mut self, mut new: Config) -> ReloadReport {
        self.take_settings(&mut new);
        self.rules = desired::per_port(&new.rules);
        if let Some(d) = self.discovery.as_mut() {
            d.set_paths(&followed(&new));
        }
        self.config = new;
        let desired = desired::desired(&self.rules, &self.known_refs());
        let plan = reconcile::reload(&self.entries, desired);
        let mut report = plan.report;
        let reopening: Vec<Key> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                reconcile::Action::Open(o) if o.reopen => Some(o.key.clone()),
                _ => None,
            })
            .collect();
        self.act(plan.actions).await;
        // A binding that was not listening (failed, or waiting for its
        // namespace or address) and listens now was reopened; the others
        // are as they were.
        for key in reopening {
            match self.entries.get(&key).map(View::phase) {
                Some(Phase::Listening) => report.reopened += 1,
                _ => report.unchanged += 1,
            }
        }
        report
    }

    /// The settings of `new` that are not bindings: warns about those that
    /// need a restart, and applies (or pins) the drain timeout.
    fn take_settings(&mut self, new: &mut Config) {
        // The command line's values are the running ones: the file's are
        // not compared with them (every reload would say they changed).
        if self.options.pinned.workers {
            if let Some(file) = new.workers.filter(|w| Some(*w) != self.config.workers) {
                warn!(
                    "`workers` = {file} in the file is not applied: --workers on the command line keeps it"
                );
            }
            new.workers = self.config.workers;
        }
        if self.options.pinned.control_socket {
            if let Some(file) = new
                .control_socket
                .as_ref()
                .filter(|p| Some(*p) != self.config.control_socket.as_ref())
            {
                warn!(
                    "`control_socket` {} in the file is not applied: --control-socket on the command line keeps it",
                    file.display()
                );
            }
            new.control_socket = self.config.control_socket.clone();
        }
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
        if self.options.pinned.drain {
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
                // Before anything closes: the bindings this reload removes
                // or replaces drain with the new timeout too.
                info!(
                    "drain_timeout {drain:?} applied (was {:?}): to every listener closed from now on, open connections included",
                    self.options.drain
                );
                self.options.drain = drain;
                self.parking.set_drain(drain);
            }
        }
    }

    /// Opens again the bindings whose retry is due.
    async fn retry_due(&mut self) {
        let due = self.retry.due(Instant::now());
        let actions = reconcile::retries(&self.entries, due);
        self.act(actions).await;
    }

    async fn on_events(&mut self, events: Vec<NsEvent>) {
        let actions = reconcile::events(&self.entries, &self.rules, &events);
        self.act(actions).await;
    }

    /// A listener reported lost by its serve task: opened again with the
    /// next retry round if its socket went, failed if its task panicked;
    /// either only if the binding is still the one listening.
    async fn on_lost(&mut self, lost: Lost) {
        let key = desired::key(&lost.binding.rule, lost.binding.netns.clone());
        let Some(Entry {
            state: State::Listening { live, .. },
            ..
        }) = self.entries.get(&key)
        else {
            return;
        };
        if !Arc::ptr_eq(&live.binding, &lost.binding) {
            return;
        }
        let cause = match lost.cause {
            crate::proxy::Loss::Listener(reason) => reconcile::Lost::Listener(reason),
            crate::proxy::Loss::Panicked(msg) => {
                let b = &lost.binding;
                error!(rule = %b.rule.name, netns = %b.netns, listen = %b.rule.listen,
                    "the listener's task panicked: {msg}; failed until a reload, every other binding keeps serving");
                reconcile::Lost::Panicked(msg)
            }
        };
        self.act(reconcile::lost(&key, cause)).await;
    }

    /// A copy of every listening socket, described for a takeover.
    fn handover(&self) -> Vec<(crate::takeover::Handed, std::os::fd::OwnedFd)> {
        let mut out = Vec::new();
        for e in self.entries.values() {
            let State::Listening { live, local, fd } = &e.state else {
                continue;
            };
            let b = &live.binding;
            let Some(copy) = crate::sys::fdpass::dup_if_same(fd.0, fd.1) else {
                warn!(rule = %b.rule.name, netns = %b.netns,
                    "takeover: the listener is being replaced (its socket is gone); not handed over");
                continue;
            };
            let handed = crate::takeover::Handed::Binding {
                rule: b.rule.name.clone(),
                netns: b.netns.to_string(),
                ns_dev: b.ns.dev,
                ns_ino: b.ns.ino,
                protocol: b.rule.protocol.to_string(),
                listen: b.rule.listen,
                local: *local,
            };
            out.push((handed, copy));
        }
        out
    }

    async fn shutdown(&mut self) {
        let _ = systemd::notify("STOPPING=1");
        info!(
            "shutting down: no new connections; open TCP connections get up to {:?}, UDP sessions close now",
            self.options.drain
        );
        // Dropping a listening entry stops its listener.
        self.entries
            .retain(|_, e| !matches!(e.state, State::Listening { .. }));
        // Every binding is told to stop: the serve tasks end once their
        // connections have drained. Each binding's lease gives its upstream
        // namespace back as it goes (but those a library caller still holds).
        self.parking.stopped().await;
    }
}

/// The files `config` names by path or absolute pattern, for [`Discovery`]
/// to follow.
fn followed(config: &Config) -> Vec<NsRef> {
    crate::netns::discovery::followed_paths(
        config
            .rules
            .iter()
            .flat_map(|r| r.netns.iter().chain(std::iter::once(&r.upstream_netns))),
    )
}

async fn next_event(d: &mut Option<Discovery>) -> io::Result<NsEvent> {
    match d {
        Some(d) => d.next().await,
        None => std::future::pending().await,
    }
}
