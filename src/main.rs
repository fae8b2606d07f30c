//! The `nsproxy` command: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use nsproxy::config::{self, Config, FORWARD_SYNTAX};
use nsproxy::lifecycle::{Command as ServerCommand, Options, Server};
use nsproxy::netns::{NsRef, Switcher};
use nsproxy::status::BindingState;
use nsproxy::{control, metrics, runtime, status, systemd};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "nsproxy",
    version,
    about = "Listen on and proxy ports inside many network namespaces from one process"
)]
struct Cli {
    /// Log format: readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log level or filter (error, warn, info, debug, trace, or a tracing filter
    /// such as "nsproxy=debug"); RUST_LOG overrides it.
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a TOML config file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Forwarding threads (overrides `workers` in the file; default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
        /// How long open connections may take to finish after SIGTERM/SIGINT
        /// (overrides `drain_timeout` in the file; default 5s).
        #[arg(long, value_parser = parse_duration)]
        drain_timeout: Option<Duration>,
        /// The control socket (overrides `control_socket`; "" turns the API off).
        #[arg(long, value_parser = parse_path)]
        control_socket: Option<PathBuf>,
    },
    /// Show every rule in every namespace of the running daemon.
    Status {
        /// Machine-readable JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
    },
    /// Make the running daemon re-read its config file (like SIGHUP).
    Reload {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
    },
    /// Check a config file: print every problem, exit non-zero if there is one.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Also fail when a namespace the config names does not exist (now).
        #[arg(long)]
        strict: bool,
    },
    /// Forward ports without a config file.
    #[command(after_help = FORWARD_HELP)]
    Forward {
        /// One or more forwards: PROTO:LISTEN[@NS,NS...]=UPSTREAM[@NS]
        #[arg(required = true, value_name = "SPEC")]
        specs: Vec<String>,
        /// Forwarding threads (default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
        /// Upstream connect timeout for every forward.
        #[arg(long, value_parser = parse_duration)]
        connect_timeout: Option<Duration>,
        /// How long open connections may take to finish after SIGTERM/SIGINT.
        #[arg(long, value_parser = parse_duration)]
        drain_timeout: Option<Duration>,
        /// The control socket ("" turns the API off).
        #[arg(long, value_parser = parse_path)]
        control_socket: Option<PathBuf>,
    },
    /// The socket broker of a split nsproxy (started by nsproxy itself).
    #[command(name = "__broker", hide = true)]
    Broker {
        /// The inherited end of the relay's socket.
        #[arg(long)]
        fd: i32,
        /// The config file the policy comes from.
        #[arg(long, conflicts_with = "forward")]
        config: Option<PathBuf>,
        /// Forward specs the policy comes from.
        #[arg(long)]
        forward: Vec<String>,
    },
}

const FORWARD_HELP: &str = "\
Each SPEC is PROTO:LISTEN[@NS,NS...]=UPSTREAM[@NS]. Without @NS the listen side
is `host` (the namespace nsproxy runs in), and so is the upstream side. A
namespace is `host`, a name under /run/netns, an absolute nsfs path such as
/proc/1234/ns/net, or pid:1234.

Examples:
  # port 8000 in ns1 and ns2 forwarded to a service on the host
  nsproxy forward 'tcp:[::]:8000@ns1,ns2=127.0.0.1:9000'
  # a port on the host forwarded into a namespace with no route to it
  nsproxy forward 'tcp:127.0.0.1:5432=127.0.0.1:5432@db'
  # two forwards in one process
  nsproxy forward 'tcp:0.0.0.0:80@web=10.0.0.2:80@edge' 'tcp:[::1]:22=[::1]:22@pid:4242'";

/// A path, where "" is allowed (it means "off").
fn parse_path(s: &str) -> Result<PathBuf, String> {
    Ok(PathBuf::from(s))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log_level);
    match cli.command {
        Command::Broker {
            fd,
            config,
            forward,
        } => nsproxy::broker::run_inherited(
            fd,
            match config {
                Some(path) => nsproxy::broker::PolicySource::File(path),
                None => nsproxy::broker::PolicySource::Forward(forward),
            },
        ),
        Command::Check { config, strict } => check(&config, strict),
        Command::Status {
            json,
            control_socket,
        } => client(|| async move {
            let s = control::status(&control_socket).await?;
            if json {
                print_out(&format!("{}\n", serde_json::to_string_pretty(&s)?))?;
            } else {
                print_out(&status::table(&s))?;
            }
            Ok(())
        }),
        Command::Reload { control_socket } => client(|| async move {
            let r = control::reload(&control_socket).await?;
            // Reopened bindings only when there are some, so that the
            // usual line stays as it was.
            let reopened = match r.reopened {
                0 => String::new(),
                n => format!(", {n} reopened (were not listening)"),
            };
            println!(
                "reloaded: {} added, {} removed, {} replaced, {} updated in place, {} unchanged{reopened}",
                r.added, r.removed, r.replaced, r.retuned, r.unchanged
            );
            Ok(())
        }),
        Command::Run {
            config,
            workers,
            drain_timeout,
            control_socket,
        } => match config::load(&config) {
            Ok(mut c) => {
                c.workers = workers.or(c.workers);
                c.drain_timeout = drain_timeout.or(c.drain_timeout);
                c.control_socket = control_socket.or(c.control_socket);
                serve(c, Some(config), drain_timeout.is_some())
            }
            Err(e) => {
                eprintln!("nsproxy: {}: {e}", config.display());
                ExitCode::from(2)
            }
        },
        Command::Forward {
            specs,
            workers,
            connect_timeout,
            drain_timeout,
            control_socket,
        } => match config::parse_forward(&specs, workers) {
            Ok(mut c) => {
                if let Some(t) = connect_timeout {
                    config::set_connect_timeout(&mut c, t);
                }
                c.drain_timeout = drain_timeout;
                c.control_socket = control_socket;
                serve(c, None, true)
            }
            Err(e) => {
                eprintln!("nsproxy: {e}\n(syntax: {FORWARD_SYNTAX}; see nsproxy forward --help)");
                ExitCode::from(2)
            }
        },
    }
}

fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|e| {
            eprintln!("nsproxy: bad --log-level {level:?} ({e}); using info");
            EnvFilter::new("info")
        });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(config: Config, path: Option<PathBuf>, drain_pinned: bool) -> ExitCode {
    match try_serve(config, path, drain_pinned) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("nsproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_serve(config: Config, path: Option<PathBuf>, drain_pinned: bool) -> anyhow::Result<()> {
    match runtime::raise_fd_limit() {
        Ok(l) if l.capped_by_hard => warn!(
            "open file limit: {} (the hard limit, which nsproxy may not raise: each listener, connection leg and UDP session is an fd; raise it with LimitNOFILE= or `ulimit -Hn` for large setups)",
            l.soft
        ),
        Ok(l) => info!("open file limit: {}", l.soft),
        Err(e) => warn!(
            "cannot raise the open file limit (RLIMIT_NOFILE): {e}; large configurations may run out of fds"
        ),
    }
    // Started first, from the main thread, so that its home is the namespace
    // nsproxy was started in.
    let switcher = Switcher::spawn().context("cannot start the namespace thread")?;
    let workers = config
        .workers
        .unwrap_or_else(runtime::default_workers)
        .clamp(1, config::MAX_WORKERS);
    let rt = runtime::build(workers).context("cannot start the runtime")?;
    info!(workers, home = %switcher.home(), pid = std::process::id(), "nsproxy {} starting", env!("CARGO_PKG_VERSION"));
    rt.block_on(async {
        let mut signals = Signals::new().context("cannot install signal handlers")?;
        let options = Options {
            drain: config.drain_timeout.unwrap_or(nsproxy::lifecycle::DEFAULT_DRAIN_TIMEOUT),
            config_path: path,
            workers,
            drain_pinned,
            ..Options::default()
        };
        let socket_path = match &config.control_socket {
            Some(p) if p.as_os_str().is_empty() => None,
            Some(p) => Some(p.clone()),
            None => Some(PathBuf::from(control::DEFAULT_SOCKET)),
        };
        let metrics_addr = config.metrics_listen;
        let rules = config.rules.len();
        // A pattern may match namespaces made later: then there is reason to wait.
        let has_pattern = config
            .rules
            .iter()
            .any(|r| r.netns.iter().any(|n| matches!(n, NsRef::Glob(_))));
        // Signals are heard during start-up too: a stop then ends the
        // process at once (nothing serves yet), and a reload is done once
        // start-up is over.
        let start = Server::start(config, switcher, options);
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
                        return Ok(());
                    }
                },
            }
        };

        let st = server.status().await;
        let count = |state: BindingState| st.bindings.iter().filter(|b| b.state == state).count();
        let (listening, waiting, failed) = (
            count(BindingState::Listening),
            count(BindingState::Waiting),
            count(BindingState::Failed),
        );
        if listening == 0 && waiting == 0 && !has_pattern {
            server.shutdown().await;
            anyhow::bail!(
                "no listener could be started ({} binding(s) failed; see the errors above)",
                st.bindings.len()
            );
        }

        let mut control_path = None;
        let http_stats = std::sync::Arc::new(control::HttpStats::default());
        if let Some(p) = socket_path {
            match control::bind(&p).await {
                Ok(l) => {
                    info!("control API on {}", p.display());
                    tokio::spawn(control::serve(l, server.commands(), control::Limits::CONTROL, http_stats.clone()));
                    control_path = Some(p);
                }
                Err(e) => error!("{e}; the control API (nsproxy status, nsproxy reload) is off"),
            }
        }
        if let Some(addr) = metrics_addr {
            match metrics::bind(addr).await {
                Ok(l) => {
                    info!("metrics on http://{}/metrics", l.local_addr().unwrap_or(addr));
                    tokio::spawn(metrics::serve(l, server.commands(), control::Limits::METRICS, http_stats));
                }
                Err(e) => error!("{e}; metrics are off"),
            }
        }

        info!(
            "ready: {listening} of {} binding(s) listening, {waiting} waiting for their namespace, {failed} failed, across {rules} rule(s)",
            st.bindings.len()
        );
        if let Err(e) = systemd::notify("READY=1") {
            warn!("cannot notify systemd: {e}");
        }
        if reload_when_started {
            request_reload(&server);
        }
        loop {
            match signals.next().await {
                Signal::Reload => {
                    info!("SIGHUP received: reloading");
                    request_reload(&server);
                }
                Signal::Stop(name) => {
                    info!("{name} received");
                    break;
                }
            }
        }
        // A second stop signal during the drain ends it at once.
        let shutdown = server.shutdown();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                signal = signals.next() => if let Signal::Stop(name) = signal {
                    warn!("{name} received again: stopping without waiting for open connections");
                    nsproxy::proxy::cut_drain_short();
                    break;
                },
            }
        }
        if let Some(p) = control_path {
            let _ = std::fs::remove_file(p);
        }
        info!("stopped");
        Ok(())
    })
}

/// Asks the server to reload without waiting for it: signals (a stop
/// above all) are heard while it runs. The outcome is logged by the server.
fn request_reload(server: &Server) {
    let commands = server.commands();
    tokio::spawn(async move {
        let (reply, done) = tokio::sync::oneshot::channel();
        if commands.send(ServerCommand::Reload(reply)).await.is_ok() {
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

/// Runs a control-API client call on a small runtime of its own.
/// Writes `text` to standard output. A reader that went away early
/// (`nsproxy status | head`) is not an error: it had what it wanted.
fn print_out(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

fn client<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nsproxy: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nsproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path, strict: bool) -> ExitCode {
    let (config, locations) = match config::load_located(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    // The namespaces are looked at now, without switching into any of them.
    let report = match Switcher::spawn() {
        Ok(switcher) => {
            let has_pattern = config
                .rules
                .iter()
                .any(|r| r.netns.iter().any(|n| matches!(n, NsRef::Glob(_))));
            let names = if has_pattern {
                netns_names()
            } else {
                Vec::new()
            };
            config::check::check_namespaces(&config, &locations, &names, |refs| {
                resolve_in_batches(&switcher, refs)
            })
        }
        Err(e) => {
            eprintln!(
                "{}: cannot look at namespaces: {e}",
                if strict { "error" } else { "warning" }
            );
            if strict {
                return ExitCode::FAILURE;
            }
            config::check::NsReport {
                bindings: config.rules.iter().map(|r| r.netns.len()).sum(),
                ..Default::default()
            }
        }
    };
    {
        // Buffered: thousands of findings are not one write(2) each.
        use std::io::Write;
        let mut err = std::io::BufWriter::new(std::io::stderr().lock());
        for f in &report.findings {
            let label = match f.severity {
                config::check::Severity::Note => "note",
                config::check::Severity::Warning if strict => "error",
                config::check::Severity::Warning => "warning",
            };
            let _ = writeln!(err, "{label}: {f}");
        }
        let _ = err.flush();
    }
    let warnings = report.count(config::check::Severity::Warning);
    if strict && warnings > 0 {
        eprintln!("{}: {warnings} namespace problem(s)", path.display());
        return ExitCode::FAILURE;
    }
    println!(
        "{}: OK: {}",
        path.display(),
        report.summary(config.rules.len())
    );
    ExitCode::SUCCESS
}

/// Looks references up in batches (one trip to the namespace thread per
/// batch, not per reference), closing each namespace's fd once looked at:
/// a config naming thousands of namespaces must not run `check` out of fds.
fn resolve_in_batches(
    switcher: &Switcher,
    refs: &[NsRef],
) -> Vec<Result<nsproxy::netns::NsId, nsproxy::netns::NsError>> {
    // A batch holds one fd per namespace until it is released: at most half
    // of what is left once the process's own fds are counted.
    let soft = runtime::raise_fd_limit().map_or(1024, |l| l.soft);
    let batch = usize::try_from(soft.saturating_sub(32) / 2)
        .unwrap_or(usize::MAX)
        .clamp(1, 512);
    let rt = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(rt) => rt,
        // Without a runtime, one at a time.
        Err(_) => {
            return refs
                .iter()
                .map(|r| {
                    let id = switcher.resolve_blocking(r)?;
                    switcher.release(id);
                    Ok(id)
                })
                .collect();
        }
    };
    let mut out = Vec::with_capacity(refs.len());
    for chunk in refs.chunks(batch) {
        let results = rt.block_on(switcher.resolve_many(chunk));
        for id in results.iter().flatten() {
            switcher.release(*id);
        }
        out.extend(results);
    }
    out
}

/// The names under /run/netns now (none when it does not exist).
fn netns_names() -> Vec<String> {
    match std::fs::read_dir(nsproxy::netns::NETNS_RUN_DIR) {
        Ok(entries) => entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect(),
        Err(_) => Vec::new(),
    }
}
