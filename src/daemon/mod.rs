//! The daemon: `nsproxy run` and `nsproxy forward` from a parsed config to
//! exit — the namespace thread, the runtime, the server, the operator
//! interfaces (control API, metrics, systemd), signals and shutdown.
//!
//! The steps, in order: raise the fd limit; start where sockets come from
//! (the namespace thread); build the runtime; bind the control socket and
//! the metrics listener; serve the metrics listener (its readiness probe
//! says "starting"); start the server (signals are heard meanwhile);
//! serve the control API, mark the daemon ready and tell systemd; then
//! reload on SIGHUP until a stop signal, and drain.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tracing::{debug, error, info, warn};

use crate::config::{self, Config};
use crate::lifecycle::{Command, Options, Server};
use crate::netns::{NsRef, SocketFactory, Switcher};
use crate::{broker, metrics, privsep, runtime, systemd};

mod follow;
mod interfaces;
mod plan;

pub use follow::Fingerprint;
use interfaces::{Interfaces, control_socket_path};

pub use plan::{DEFAULT_USER, Plan, Single, plan};

/// How `nsproxy run` or `forward` was asked to serve.
#[derive(Debug)]
pub struct Run {
    pub config: Config,
    pub source: Source,
    /// What the command line gave instead of the file: a reload keeps it.
    pub pinned: crate::lifecycle::Pinned,
    /// Given to the socket broker, when there is one (logging options).
    pub broker_args: Vec<std::ffi::OsString>,
    /// A socket broker started before the config was parsed
    /// ([`start_broker_early`]), used if the plan is split.
    pub early_broker: Option<std::io::Result<broker::BrokerChild>>,
    /// `--watch-config`: the config file is followed (its directory is
    /// watched, and a changed text reloaded), and
    /// this is the text the config was parsed from.
    pub follow: Option<Fingerprint>,
    /// `--takeover`: take the listening sockets of the nsproxy running on
    /// the same control socket, then tell it to drain and exit.
    pub takeover: bool,
}

/// Starts the socket broker of `nsproxy run --config PATH` before the relay
/// parses the file, so that the broker's start (exec, its own parse of the
/// file for its policy, capabilities, seccomp) overlaps the relay's parse
/// instead of following it: with thousands of rules each parse is tens of
/// milliseconds, all on the way to the first listener. Only when the plan
/// will almost surely be split: root, and a relay account (`--user`, else a
/// plain top-level `user = "NAME"` in the file, else nobody) that exists
/// and is not uid 0. A broker the plan turns out not to
/// need is closed and reaped; nothing depends on the guess.
///
/// Call it from the main thread, like [`broker::spawn`].
pub fn start_broker_early(
    path: &std::path::Path,
    cli_user: Option<&str>,
    broker_args: &[std::ffi::OsString],
) -> Option<std::io::Result<broker::BrokerChild>> {
    if !matches!(plan(privsep::effective_uid(), cli_user), Plan::Split { .. }) {
        return None;
    }
    let user = match cli_user {
        Some(u) => u.to_owned(),
        None => file_user(&config::read_text(path).ok()?)?.unwrap_or(DEFAULT_USER.into()),
    };
    // What would fail the start before the broker is needed, looked at now:
    // the broker is then started only for a relay that goes on to use it.
    config::check_user(&user).ok()?;
    if privsep::lookup_user(&user).ok()?.uid == 0 {
        return None;
    }
    Some(broker::spawn(
        &broker::PolicySource::File(path.to_owned()),
        broker_args,
    ))
}

/// The top-level `user = "NAME"` of a config text (`Some(None)` without
/// one), or `None` when a top-level line about `user` is anything else: a
/// cheap look, not a parse, so it gives up on whatever it does not know.
fn file_user(text: &str) -> Option<Option<String>> {
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            break;
        }
        if !line.contains("user") {
            continue;
        }
        let value = line.strip_prefix("user")?.trim_start().strip_prefix('=')?;
        let value = value.split('#').next()?.trim();
        let name = value.strip_prefix('"')?.strip_suffix('"')?;
        if name.contains(['\\', '"']) {
            return None;
        }
        return Some(Some(name.to_owned()));
    }
    Some(None)
}

/// Where the config came from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A file, read again at each reload.
    File(PathBuf),
    /// `nsproxy forward`'s specs (no reload).
    Forward(Vec<String>),
}

impl Source {
    fn path(&self) -> Option<PathBuf> {
        match self {
            Source::File(p) => Some(p.clone()),
            Source::Forward(_) => None,
        }
    }
}

/// Serves until a stop signal; `Err` when nsproxy could not start or
/// nothing could listen, or (split) when the socket broker died.
pub fn serve(mut run: Run) -> anyhow::Result<()> {
    raise_fd_limit();
    let plan = plan(privsep::effective_uid(), run.config.user.as_deref());
    match &plan {
        Plan::Single(Single::Unprivileged { .. }) => warn!("{plan}"),
        _ => info!("{plan}"),
    }
    // Started first, from the main thread, so that its home is the namespace
    // nsproxy was started in (and, split, so that the broker lives as long
    // as this thread: its parent-death signal follows the thread).
    let early = run.early_broker.take();
    let (switcher, split, unneeded) = sockets(&plan, &run, early)?;
    let workers = run
        .config
        .workers
        .unwrap_or_else(runtime::default_workers)
        .clamp(1, config::MAX_WORKERS);
    let rt = runtime::build(workers).context("cannot start the runtime")?;
    info!(workers, home = %switcher.home(), pid = std::process::id(), "nsproxy {} starting", env!("CARGO_PKG_VERSION"));
    let broker = switcher.broker().cloned();
    let served = rt.block_on(async {
        // Before anything binds: the old process holds the ports.
        let passed = systemd::take_listen_fds();
        let mut taken = match run.takeover {
            true => take_over(&run.config).await?,
            false => None,
        };
        if taken.is_none() {
            // What the previous nsproxy of this service left in systemd's
            // fd store as it stopped (see `Stopped::Signal` below).
            taken = crate::takeover::from_fd_store(passed);
        } else if !passed.is_empty() {
            warn!("--takeover took the running nsproxy's sockets: the {} fd(s) systemd passed are closed and removed from its store", passed.len());
            let _ = systemd::remove_fds(passed.iter().map(|(n, _)| n.as_str()));
        }
        // Bound while nsproxy may still: the socket is made by, and
        // belongs to, the user who started it.
        let mut interfaces = Interfaces::bind(&run.config, taken.as_mut()).await;
        // Watched while privileged: a watch is checked when it is made.
        let follower = follow_config(&run);
        if let Err(e) = systemd::connect() {
            warn!("cannot connect to systemd's notification socket: {e}");
        }
        if let Some(split) = &split {
            if let Err(e) = split.drop_privileges() {
                interfaces.remove_socket();
                return Err(e);
            }
        }
        let drain_timeout = run
            .config
            .drain_timeout
            .unwrap_or(crate::lifecycle::DEFAULT_DRAIN_TIMEOUT);
        let options = Options {
            drain: drain_timeout,
            config_path: run.source.path(),
            workers,
            pinned: run.pinned,
            inherited: taken.as_ref().map(|t| t.inherited.clone()),
            ..Options::default()
        };
        let mut signals = Signals::new().context("cannot install signal handlers")?;
        // Served from now on, so that the readiness probe says "starting"
        // (and liveness "alive") however long the start takes.
        let health = Arc::new(metrics::Health::starting());
        interfaces.serve_metrics(&health);
        let reader = switcher.clone();
        let started = start(run.config, switcher, options, &mut signals).await;
        let (server, ready, reload_when_started) = match started {
            Ok(Some(s)) => s,
            Ok(None) => {
                interfaces.remove_socket();
                return Ok(());
            }
            Err(e) => {
                interfaces.remove_socket();
                return Err(e);
            }
        };
        health.ready(server.commands());
        let (handed_tx, mut handed) = tokio::sync::mpsc::unbounded_channel();
        interfaces.serve_control(&server, handed_tx);
        if let (Some(f), Some(loaded)) = (follower, run.follow) {
            tokio::spawn(f.run(loaded, reader, server.commands()));
        }
        info!("{ready}");
        if let Some(t) = taken {
            let from = t.from;
            if let Err(e) = t.ready() {
                warn!("cannot tell pid {from} that this process serves: {e}; it serves on too until stopped");
            }
            // Ours now: the old process leaves the file when it exits.
            interfaces.control_adopted = false;
        }
        if let Err(e) = systemd::notify("READY=1") {
            warn!("cannot notify systemd: {e}");
        }
        if reload_when_started {
            request_reload(&server);
        }
        let stopped = until_stopped(
            &server,
            &mut signals,
            broker.as_ref(),
            &mut handed,
            drain_timeout,
            &health,
        )
        .await;
        health.draining();
        match stopped {
            // The new process serves the control socket and metrics now.
            Stopped::TakenOver(_) => {
                interfaces.hand_off();
                crate::proxy::listeners_live_on();
            }
            Stopped::Signal => {
                if let Some(max) = systemd::fd_store_max() {
                    // Before anything stops accepting: the listeners stay
                    // open in the store, for the next start to take.
                    let metrics = interfaces.metrics_copy.as_ref().map(|(a, fd)| (*a, fd.as_fd()));
                    match crate::takeover::store(&server.handover(), metrics, max).await {
                        Ok(n) => {
                            info!("{n} listening socket(s) kept in systemd's fd store for the next start");
                            crate::proxy::listeners_live_on();
                        }
                        Err(e) => warn!("cannot keep the listening sockets in systemd's fd store: {e}; the next start opens new ones (clients are refused meanwhile)"),
                    }
                }
            }
            Stopped::BrokerLost(_) => {}
        }
        drain(server, &mut signals).await;
        interfaces.remove_socket();
        match stopped {
            Stopped::BrokerLost(pid) => {
                anyhow::bail!("stopped: the socket broker (pid {pid}) died")
            }
            Stopped::TakenOver(pid) => {
                info!("stopped: pid {pid} took over");
                Ok(())
            }
            Stopped::Signal => {
                info!("stopped");
                Ok(())
            }
        }
    });
    // The broker ends when its socket closes (the switcher went with the
    // runtime's tasks); reaped here so that it leaves no zombie.
    drop(rt);
    if let Some(split) = split {
        split.reap();
    }
    if let Some(mut child) = unneeded {
        // Its socket closed long ago: it has exited, or soon will.
        let _ = child.wait();
    }
    served
}

/// Why [`until_stopped`] returned.
enum Stopped {
    /// SIGTERM or SIGINT.
    Signal,
    /// A new nsproxy (this pid) took the sockets over and serves them.
    TakenOver(u32),
    /// The socket broker (this pid) died.
    BrokerLost(u32),
}

/// Serves, reloading on SIGHUP, until a stop signal, a takeover that is
/// done (`handed`), or the socket broker's death: then, still answering
/// status and metrics (which say the broker is gone), open connections get
/// `drain_timeout` to finish before what is left is cut.
async fn until_stopped(
    server: &Server,
    signals: &mut Signals,
    broker: Option<&crate::netns::BrokerLink>,
    handed: &mut tokio::sync::mpsc::UnboundedReceiver<u32>,
    drain_timeout: std::time::Duration,
    health: &metrics::Health,
) -> Stopped {
    let broker_gone = async {
        match broker {
            Some(link) => link.gone().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(broker_gone);
    let pid = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Signal::Reload => {
                    info!("SIGHUP received: reloading");
                    request_reload(server);
                }
                Signal::Stop(name) => {
                    info!("{name} received");
                    return Stopped::Signal;
                }
            },
            Some(pid) = handed.recv() => {
                info!(pid, "pid {pid} took over: no new connections here; open ones get up to {drain_timeout:?} (drain_timeout), then this process exits");
                return Stopped::TakenOver(pid);
            }
            () = &mut broker_gone => break broker.map_or(0, |b| b.pid()),
        }
    };
    error!(
        "the socket broker (pid {pid}) is gone: no new socket can be made in another namespace; serving what is open for {drain_timeout:?} (drain_timeout), then exiting non-zero for the service manager to restart nsproxy"
    );
    let _ = systemd::notify("STOPPING=1");
    health.draining();
    tokio::select! {
        () = tokio::time::sleep(drain_timeout) => {}
        signal = signals.next() => if let Signal::Stop(name) = signal {
            info!("{name} received");
        },
    }
    crate::proxy::cut_drain_short();
    Stopped::BrokerLost(pid)
}

/// `--takeover`: the sockets of the nsproxy on this config's control
/// socket. None running there: a warning, and a fresh start (so that a
/// first start with `--takeover` works); one running that refuses or
/// fails: an error (it serves on).
async fn take_over(config: &Config) -> anyhow::Result<Option<crate::takeover::Taken>> {
    let Some(path) = control_socket_path(config) else {
        return Err(crate::takeover::TakeoverError::NoControlSocket.into());
    };
    match crate::takeover::take(&path).await {
        Ok(Some(t)) => Ok(Some(t)),
        Ok(None) => {
            warn!(
                "--takeover: no nsproxy runs with control socket {}: starting afresh",
                path.display()
            );
            Ok(None)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "cannot take over from the nsproxy on {} (it keeps serving)",
            path.display()
        ))),
    }
}

/// The watches of `--watch-config`, or `None` (not asked for, or the
/// directory cannot be watched: said, and SIGHUP still reloads).
fn follow_config(run: &Run) -> Option<follow::Follower> {
    run.follow?;
    let path = run.source.path()?;
    match follow::Follower::watch(&path) {
        Ok(f) => Some(f),
        Err(e) => {
            warn!(
                "--watch-config: {e}; {} is not followed: reload it with SIGHUP or `nsproxy reload`",
                path.display()
            );
            None
        }
    }
}

/// Where sockets come from, as planned: the namespace thread of this
/// process, or (split) a socket broker (`early`, or started now), with what
/// the relay is to become; and an early broker not needed, to reap.
fn sockets(
    plan: &Plan,
    run: &Run,
    early: Option<std::io::Result<broker::BrokerChild>>,
) -> anyhow::Result<(Switcher, Option<Split>, Option<std::process::Child>)> {
    let Plan::Split { user } = plan else {
        // Its socket closes here: it exits at once.
        let unneeded = early.and_then(Result::ok).map(|c| c.child);
        let switcher = Switcher::spawn().context("cannot start the namespace thread")?;
        return Ok((switcher, None, unneeded));
    };
    let account = privsep::lookup_user(user).with_context(|| format!("user = \"{user}\""))?;
    if account.uid == 0 {
        anyhow::bail!(
            "user = \"{user}\" is uid 0: the relay would keep root's powers; name an unprivileged account, or user = \"root\" for one privileged process"
        );
    }
    let source = match &run.source {
        Source::File(p) => broker::PolicySource::File(p.clone()),
        Source::Forward(specs) => broker::PolicySource::Forward(specs.clone()),
    };
    let child = match early {
        Some(child) => child,
        None => broker::spawn(&source, &run.broker_args),
    }
    .context("cannot start the socket broker")?;
    info!(pid = child.pid, "socket broker started");
    let switcher =
        Switcher::remote(child.fd, child.pid).context("cannot start the socket broker's thread")?;
    Ok((
        switcher,
        Some(Split {
            account,
            broker: child.child,
        }),
        None,
    ))
}

/// A split nsproxy's relay side: whom it becomes, and its broker.
struct Split {
    account: privsep::Account,
    broker: std::process::Child,
}

impl Split {
    /// Becomes the unprivileged relay: the account, no capability,
    /// `no_new_privs`, not dumpable, then the seccomp filter on every thread.
    fn drop_privileges(&self) -> anyhow::Result<()> {
        let a = &self.account;
        privsep::become_relay(a)
            .with_context(|| format!("cannot become {} (uid {})", a.name, a.uid))?;
        privsep::install_relay_filter().context("cannot install the seccomp filter")?;
        info!(
            user = %a.name,
            uid = a.uid,
            broker = self.broker.id(),
            "relay running as {} with no capability and a seccomp allowlist; the socket broker (pid {}) makes the sockets",
            a.name,
            self.broker.id()
        );
        Ok(())
    }

    /// Waits (at most 2 s: something may still hold the socket) for the
    /// broker to exit. Left running, it ends with this process anyway (its
    /// parent-death signal); the relay may not signal it (no `kill`).
    fn reap(mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match self.broker.try_wait() {
                Ok(Some(status)) if !status.success() => {
                    return warn!("the socket broker exited: {status}");
                }
                Ok(Some(_)) => return,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Ok(None) => {
                    return warn!(
                        "the socket broker (pid {}) has not exited; it ends with this process",
                        self.broker.id()
                    );
                }
                Err(e) => return warn!("cannot wait for the socket broker: {e}"),
            }
        }
    }
}

fn raise_fd_limit() {
    let limit = runtime::raise_fd_limit();
    // Still one thread here (the runtime and the namespace thread start
    // later), so the table grows without waiting; see presize_fd_table.
    let soft = limit.as_ref().map_or(1024, |l| l.soft);
    if let Err(e) = runtime::presize_fd_table(soft) {
        debug!(
            "cannot make room for {soft} fds ahead of time: {e}; the fd table grows as fds are opened"
        );
    }
    match limit {
        Ok(l) if l.capped_by_hard => warn!(
            "open file limit: {} (the hard limit, which nsproxy may not raise: each listener, connection leg and UDP session is an fd; raise it with LimitNOFILE= or `ulimit -Hn` for large setups)",
            l.soft
        ),
        Ok(l) => info!("open file limit: {}", l.soft),
        Err(e) => warn!(
            "cannot raise the open file limit (RLIMIT_NOFILE): {e}; large configurations may run out of fds"
        ),
    }
}

/// Starts the server, hearing signals meanwhile: a stop then ends the
/// process at once (nothing serves yet: `None`), and a reload is done once
/// start-up is over (the `bool`); with the line saying what listens. `Err`
/// when nothing could listen and nothing is worth waiting for.
async fn start(
    config: Config,
    sockets: impl Into<Arc<dyn SocketFactory>>,
    options: Options,
    signals: &mut Signals,
) -> anyhow::Result<Option<(Server, String, bool)>> {
    let rules = config.rules.len();
    // A pattern may match namespaces made later: then there is reason to wait.
    let has_pattern = config
        .rules
        .iter()
        .any(|r| r.netns.iter().any(|n| matches!(n, NsRef::Glob(_))));
    let start = Server::start(config, sockets, options);
    tokio::pin!(start);
    let mut reload_when_started = false;
    let server = loop {
        tokio::select! {
            server = &mut start => break server,
            signal = signals.next() => match signal {
                Signal::Reload => {
                    info!("SIGHUP received during start-up: reloading once started");
                    reload_when_started = true;
                }
                Signal::Stop(name) => {
                    info!("{name} received during start-up: stopping");
                    return Ok(None);
                }
            },
        }
    };
    let crate::lifecycle::Tally {
        bindings,
        listening,
        waiting,
        failed,
    } = server.tally().await;
    if listening == 0 && waiting == 0 && !has_pattern {
        server.shutdown().await;
        anyhow::bail!(
            "no listener could be started ({bindings} binding(s) failed; see the errors above)"
        );
    }
    let ready = format!(
        "ready: {listening} of {bindings} binding(s) listening, {waiting} waiting for their namespace, {failed} failed, across {rules} rule(s)"
    );
    Ok(Some((server, ready, reload_when_started)))
}

/// Stops the server, letting connections drain; a second stop signal
/// during the drain ends it at once.
async fn drain(server: Server, signals: &mut Signals) {
    let shutdown = server.shutdown();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            signal = signals.next() => if let Signal::Stop(name) = signal {
                warn!("{name} received again: stopping without waiting for open connections");
                crate::proxy::cut_drain_short();
                break;
            },
        }
    }
}

/// Asks the server to reload without waiting for it: signals (a stop
/// above all) are heard while it runs. The outcome is logged by the server.
fn request_reload(server: &Server) {
    let commands = server.commands();
    tokio::spawn(async move {
        let (reply, done) = tokio::sync::oneshot::channel();
        if commands.send(Command::Reload(reply)).await.is_ok() {
            let _ = done.await;
        }
    });
}

enum Signal {
    Reload,
    Stop(&'static str),
}

struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.hup.recv() => Signal::Reload,
            _ = self.term.recv() => Signal::Stop("SIGTERM"),
            _ = self.int.recv() => Signal::Stop("SIGINT"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::file_user;

    #[test]
    fn the_relay_account_is_read_from_a_plain_top_level_line() {
        let user = |t: &str| file_user(t);
        assert_eq!(
            user("workers = 2\n[[proxy]]\nname = \"user\"\n"),
            Some(None)
        );
        assert_eq!(
            user("user = \"nsproxy\" # relay\n"),
            Some(Some("nsproxy".into()))
        );
        assert_eq!(user("  user=\"root\"\n"), Some(Some("root".into())));
        // Anything less plain: no guess (the broker starts after the parse).
        assert_eq!(user("user = 'root'\n"), None);
        assert_eq!(user("\"user\" = \"root\"\n"), None);
        assert_eq!(user("user = \"ro\\u006ft\"\n"), None);
        assert_eq!(user("# the user is root\n"), None);
    }
}
