//! The `nsproxy` command: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use nsproxy::config::{self, Config, FORWARD_SYNTAX};
use nsproxy::netns::{NsRef, Switcher};
use nsproxy::{runtime, server};
use tracing::{info, warn};

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
        /// How long open connections may take to finish after SIGTERM/SIGINT.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        drain_timeout: Duration,
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
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        drain_timeout: Duration,
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

fn parse_duration(s: &str) -> Result<Duration, String> {
    config::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log_level);
    match cli.command {
        Command::Check { config, strict } => check(&config, strict),
        Command::Run {
            config,
            workers,
            drain_timeout,
        } => match config::load(&config) {
            Ok(c) => serve(c, workers, drain_timeout),
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
        } => match config::parse_forward(&specs, workers) {
            Ok(mut c) => {
                if let Some(t) = connect_timeout {
                    c.rules.iter_mut().for_each(|r| r.connect_timeout = t);
                }
                serve(c, None, drain_timeout)
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

fn serve(config: Config, workers: Option<usize>, drain: Duration) -> ExitCode {
    match try_serve(config, workers, drain) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("nsproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_serve(config: Config, workers: Option<usize>, drain: Duration) -> anyhow::Result<()> {
    match runtime::raise_fd_limit() {
        Ok(n) => info!("open file limit: {n}"),
        Err(e) => warn!(
            "cannot raise the open file limit (RLIMIT_NOFILE): {e}; large configurations may run out of fds"
        ),
    }
    // Started first, from the main thread, so that its home is the namespace
    // nsproxy was started in.
    let switcher = Switcher::spawn().context("cannot start the namespace thread")?;
    let workers = workers
        .or(config.workers)
        .unwrap_or_else(runtime::default_workers)
        .clamp(1, config::MAX_WORKERS);
    let rt = runtime::build(workers).context("cannot start the runtime")?;
    info!(workers, home = %switcher.home(), "nsproxy {} starting", env!("CARGO_PKG_VERSION"));
    rt.block_on(async {
        let stop = stop_signal().context("cannot install signal handlers")?;
        server::run(&config, switcher, drain, stop).await?;
        info!("stopped");
        Ok(())
    })
}

/// Completes on the first SIGTERM or SIGINT.
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = int.recv() => info!("SIGINT received"),
        }
    })
}

fn check(path: &std::path::Path, strict: bool) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    // The namespaces are looked at now, without switching into any of them.
    let mut warnings = Vec::new();
    match Switcher::spawn() {
        Ok(switcher) => {
            for rule in &config.rules {
                let refs = std::iter::once(("upstream_netns", &rule.upstream_netns))
                    .chain(rule.netns.iter().map(|n| ("netns", n)));
                for (key, r) in refs {
                    if *r == NsRef::Host {
                        continue;
                    }
                    if let Err(e) = switcher.resolve_blocking(r) {
                        warnings.push(format!("{}: rule {}: `{key}`: {e}", rule.origin, rule.name));
                    }
                }
            }
        }
        Err(e) => warnings.push(format!("cannot look at namespaces: {e}")),
    }
    for w in &warnings {
        eprintln!("{}: {w}", if strict { "error" } else { "warning" });
    }
    let bindings: usize = config.rules.iter().map(|r| r.netns.len()).sum();
    if strict && !warnings.is_empty() {
        eprintln!(
            "{}: {} namespace problem(s)",
            path.display(),
            warnings.len()
        );
        return ExitCode::FAILURE;
    }
    println!(
        "{}: OK: {} rule(s), {bindings} binding(s){}",
        path.display(),
        config.rules.len(),
        if warnings.is_empty() {
            String::new()
        } else {
            format!(
                ", {} namespace warning(s): those bindings will not listen until the namespace exists and nsproxy is restarted",
                warnings.len()
            )
        }
    );
    ExitCode::SUCCESS
}
