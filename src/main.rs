//! The `nsproxy` command: a thin layer over the library.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use nsproxy::config::{self, Config, FORWARD_SYNTAX};
use nsproxy::lifecycle::Pinned;
use nsproxy::netns::{NsRef, Switcher};
use nsproxy::{control, daemon, runtime, status};
use tracing::error;

#[derive(Parser)]
#[command(
    name = "nsproxy",
    version,
    propagate_version = true,
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
        /// The TOML config file (re-read on SIGHUP and `nsproxy reload`).
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
        /// Started as root, the account the relay runs as (overrides `user`;
        /// default nobody; "root" keeps one privileged process).
        #[arg(long)]
        user: Option<String>,
        /// Follow the config file: reload when its text changes, as SIGHUP
        /// would (for a Kubernetes ConfigMap; off by default).
        #[arg(long)]
        watch_config: bool,
        /// Take the listening sockets over from the nsproxy running on the
        /// same control socket, then make it drain and exit (an upgrade or
        /// restart without refusing a connection); without one running,
        /// start afresh.
        #[arg(long)]
        takeover: bool,
    },
    /// Show every rule in every namespace of the running daemon.
    Status {
        /// Machine-readable JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The running daemon's control socket.
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
    },
    /// Make the running daemon re-read its config file (like SIGHUP).
    Reload {
        /// The running daemon's control socket.
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        control_socket: PathBuf,
    },
    /// Check a config file: print every problem, exit non-zero if there is one.
    Check {
        /// The TOML config file to check.
        #[arg(long, short, required_unless_present = "show_syscalls")]
        config: Option<PathBuf>,
        /// Also fail when a namespace the config names does not exist (now).
        #[arg(long)]
        strict: bool,
        /// Print the system calls the relay and the socket broker may make
        /// (their seccomp allowlists) and exit.
        #[arg(long)]
        show_syscalls: bool,
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
        /// Started as root, the account the relay runs as (default nobody;
        /// "root" keeps one privileged process).
        #[arg(long)]
        user: Option<String>,
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
    /// Writes files generated from this command line's definition (for
    /// packaging: scripts/package-deb.sh).
    #[command(name = "__generate", hide = true)]
    Generate {
        what: Generated,
        /// The directory to write into (it must exist).
        dir: PathBuf,
    },
}

/// What `__generate` writes.
#[derive(Clone, Copy, ValueEnum)]
enum Generated {
    /// Manual pages: nsproxy.1 and one per subcommand (nsproxy-run.1, ...).
    Man,
    /// Completions for bash (nsproxy.bash), zsh (_nsproxy) and fish (nsproxy.fish).
    Completions,
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
    if let Command::Generate { what, dir } = &cli.command {
        return generate(*what, dir);
    }
    init_logging(cli.log_format, &cli.log_level);
    // The socket broker logs as the daemon does.
    let broker_args: Vec<OsString> = vec![
        "--log-format".into(),
        match cli.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
        .into(),
        "--log-level".into(),
        cli.log_level.clone().into(),
    ];
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
        Command::Generate { .. } => unreachable!("handled before logging starts"),
        Command::Check {
            show_syscalls: true,
            ..
        } => show_syscalls(),
        Command::Check { config, strict, .. } => check(&config.expect("clap requires it"), strict),
        command @ (Command::Status { .. } | Command::Reload { .. }) => control_client(command),
        Command::Run {
            config,
            workers,
            drain_timeout,
            control_socket,
            user,
            watch_config,
            takeover,
        } => {
            // Before any child starts: the fds systemd passed (its fd store)
            // are made close-on-exec, so that the broker inherits none.
            if let Err(e) = nsproxy::systemd::claim_listen_fds() {
                tracing::warn!("LISTEN_FDS: {e}");
            }
            // Before the parse, so that the broker's start overlaps it.
            let early = daemon::start_broker_early(&config, user.as_deref(), &broker_args);
            let text = config::read_text(&config);
            let follow = match &text {
                Ok(t) if watch_config => Some(daemon::Fingerprint::of(t)),
                _ => None,
            };
            match text.and_then(|t| config::parse_toml(&t, &config.display().to_string())) {
                Ok(mut c) => {
                    let pinned = Pinned {
                        drain: drain_timeout.is_some(),
                        workers: workers.is_some(),
                        control_socket: control_socket.is_some(),
                    };
                    c.workers = workers.or(c.workers);
                    c.drain_timeout = drain_timeout.or(c.drain_timeout);
                    c.control_socket = control_socket.or(c.control_socket);
                    c.user = user.or(c.user);
                    let source = daemon::Source::File(config);
                    serve(c, source, pinned, &broker_args, early, follow, takeover)
                }
                Err(e) => {
                    eprintln!("nsproxy: {}: {e}", config.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Forward {
            specs,
            workers,
            connect_timeout,
            drain_timeout,
            control_socket,
            user,
        } => match config::parse_forward(&specs, workers) {
            Ok(mut c) => {
                if let Some(t) = connect_timeout {
                    config::set_connect_timeout(&mut c, t);
                }
                c.drain_timeout = drain_timeout;
                c.control_socket = control_socket;
                c.user = user;
                serve(
                    c,
                    daemon::Source::Forward(specs),
                    // No reload: nothing to keep from a file.
                    Pinned {
                        drain: true,
                        workers: true,
                        control_socket: true,
                    },
                    &broker_args,
                    None,
                    None,
                    false,
                )
            }
            Err(e) => {
                eprintln!("nsproxy: {e}\n(syntax: {FORWARD_SYNTAX}; see nsproxy forward --help)");
                ExitCode::from(2)
            }
        },
    }
}

/// `nsproxy status` and `nsproxy reload`: calls to the running daemon.
fn control_client(command: Command) -> ExitCode {
    match command {
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
        _ => unreachable!("status or reload"),
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

fn serve(
    config: Config,
    source: daemon::Source,
    pinned: Pinned,
    broker_args: &[OsString],
    early_broker: Option<std::io::Result<nsproxy::broker::BrokerChild>>,
    follow: Option<daemon::Fingerprint>,
    takeover: bool,
) -> ExitCode {
    if let Some(Err(e)) = config.user.as_deref().map(config::check_user) {
        eprintln!("nsproxy: --user: {e}");
        return ExitCode::from(2);
    }
    let run = daemon::Run {
        config,
        source,
        pinned,
        broker_args: broker_args.to_vec(),
        early_broker,
        follow,
        takeover,
    };
    match daemon::serve(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("nsproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `nsproxy __generate`: the man pages or shell completions, from the one
/// command-line definition above, so they cannot drift from it.
fn generate(what: Generated, dir: &std::path::Path) -> ExitCode {
    let written = match what {
        Generated::Man => clap_mangen::generate_to(Cli::command(), dir),
        Generated::Completions => {
            use clap_complete::Shell;
            let mut cmd = without_hidden_subcommands(Cli::command());
            [Shell::Bash, Shell::Zsh, Shell::Fish]
                .into_iter()
                .try_for_each(|shell| {
                    clap_complete::generate_to(shell, &mut cmd, "nsproxy", dir).map(drop)
                })
        }
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nsproxy: cannot write into {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// The command without its hidden subcommands (`__broker`, `__generate`):
/// clap_complete would offer them on Tab (clap_mangen leaves them out itself).
fn without_hidden_subcommands(cmd: clap::Command) -> clap::Command {
    let visible: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut out = clap::Command::new(env!("CARGO_BIN_NAME"))
        .version(env!("CARGO_PKG_VERSION"))
        .args(cmd.get_arguments().cloned())
        .subcommands(visible)
        .subcommand_required(true);
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    out
}

fn show_syscalls() -> ExitCode {
    let mut out = String::from("# the relay (everything that handles traffic)\n");
    for line in nsproxy::privsep::relay_syscalls() {
        out += &format!("{line}\n");
    }
    out += "\n# the socket broker\n";
    for line in nsproxy::privsep::broker_syscalls() {
        out += &format!("{line}\n");
    }
    match print_out(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nsproxy: {e}");
            ExitCode::FAILURE
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
            let mut names = if has_pattern {
                netns_names()
            } else {
                Vec::new()
            };
            names.extend(config::check::files_of_path_patterns(&config));
            let mut report = config::check::check_namespaces(&config, &locations, &names, |refs| {
                resolve_in_batches(&switcher, refs)
            });
            let unwatchable = config::check::dirs_the_relay_cannot_watch(&config);
            report.findings.extend(config::check::unwatchable_findings(
                &config,
                &locations,
                &unwatchable,
            ));
            let routing = routing_of(&switcher, &config::check::client_source_namespaces(&config));
            let found = config::check::routing_findings(&config, &locations, &routing);
            report.routing = found
                .iter()
                .filter(|f| f.severity == config::check::Severity::Warning)
                .count();
            report.findings.extend(found);
            report
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
                bindings: config
                    .rules
                    .iter()
                    .map(|r| r.netns.len() * r.port_count())
                    .sum(),
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

/// The policy routing of each namespace in `refs` (those of the rules with
/// `upstream_source = "client"`), read over a netlink socket made there;
/// a namespace that cannot be looked up is left out (it has a finding of
/// its own).
fn routing_of(
    switcher: &Switcher,
    refs: &[NsRef],
) -> std::collections::HashMap<NsRef, Result<nsproxy::netns::routing::Routing, String>> {
    use nsproxy::netns::routing::{Routing, netlink_spec};
    let mut out = std::collections::HashMap::new();
    for r in refs {
        let Ok(id) = switcher.resolve_blocking(r) else {
            continue;
        };
        let read = switcher
            .socket_blocking(id, netlink_spec())
            .map_err(|e| e.to_string())
            .and_then(|s| Routing::of(&s).map_err(|e| e.to_string()));
        switcher.release(id);
        out.insert(r.clone(), read);
    }
    out
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
