//! The end-to-end fixture: a scenario of namespaces, upstream servers and
//! one nsproxy daemon, set up in a few lines and torn down by its guards.
//!
//! ```ignore
//! let s = Scenario::with(&["a", "b"])
//!     .tcp_echo("b", "127.0.0.1:9000")
//!     .rule(tcp("r").listen("127.0.0.1:7000").netns(["a"]).upstream_in("b", "127.0.0.1:9000"))
//!     .start();
//! let mut c = s.ns("a").tcp_connect("127.0.0.1:7000").unwrap();
//! ```
//!
//! Namespaces are named by short tags; in a rule, a tag of the scenario
//! becomes that namespace's unique name, and anything else (`host`, paths,
//! `pid:N`, names that do not exist) is written as given. nsproxy runs in the
//! scenario's own `host` namespace, so `host` in a rule means that one.

#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;

// The SCTP tests include this file in their own harness, which has its own
// `TestNs`, `Daemon` and `TempDir` (it runs in a VM without `ip netns`):
// only these names and the methods used here are shared. The upstream
// servers of each protocol are added in `impl Scenario` blocks beside them.
use super::{Daemon, Rule, TempDir, TestNs, config};

/// Namespaces by tag, with the host namespace nsproxy runs in.
struct Spaces {
    host: TestNs,
    tagged: Vec<(String, TestNs)>,
}

impl Spaces {
    fn get(&self, tag: &str) -> &TestNs {
        if tag == "host" {
            return &self.host;
        }
        self.tagged
            .iter()
            .find(|(t, _)| t == tag)
            .map(|(_, ns)| ns)
            .unwrap_or_else(|| panic!("the scenario has no namespace tagged {tag:?}"))
    }

    /// The unique name of the namespace tagged `entry`, or `entry` itself.
    fn resolve(&self, entry: &str) -> String {
        match self.tagged.iter().find(|(t, _)| t == entry) {
            Some((_, ns)) => ns.name().to_owned(),
            None => entry.to_owned(),
        }
    }

    /// `head`, then `rules` with their tags resolved, as a whole config.
    fn config(&self, head: &str, rules: &[Rule]) -> String {
        let rules: String = rules
            .iter()
            .map(|r| r.clone().map_netns(|n| self.resolve(n)).to_string())
            .collect();
        config(&format!("{head}{rules}"))
    }
}

/// A scenario being set up: its namespaces exist already (so a test may make
/// sockets in them before the daemon starts); the daemon starts with
/// [`Scenario::start`].
pub struct Scenario {
    spaces: Spaces,
    /// Top-level config keys, written before the rules.
    head: String,
    rules: Vec<Rule>,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// A command that execs its arguments (such as `prlimit ... --`).
    wrapper: Vec<String>,
}

impl Scenario {
    /// The host namespace only.
    pub fn new() -> Scenario {
        Scenario::with(&[])
    }

    /// The host namespace and one namespace per tag (`nspt-PID-N-tag`).
    pub fn with(tags: &[&str]) -> Scenario {
        let host = TestNs::new("h");
        let tagged = tags
            .iter()
            .map(|t| (t.to_string(), TestNs::new(t)))
            .collect();
        Scenario {
            spaces: Spaces { host, tagged },
            head: String::new(),
            rules: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    /// `n` more namespaces, made several at a time, tagged `{tag}0`, `{tag}1`...
    pub fn many(mut self, tag: &str, n: usize) -> Scenario {
        let made = TestNs::many(tag, n);
        let tags = (0..n).map(|i| format!("{tag}{i}"));
        self.spaces.tagged.extend(tags.zip(made));
        self
    }

    /// The namespace tagged `tag` (`host`: the one nsproxy runs in).
    pub fn ns(&self, tag: &str) -> &TestNs {
        self.spaces.get(tag)
    }

    pub fn host(&self) -> &TestNs {
        &self.spaces.host
    }

    /// Adds a rule (namespace tags are resolved when the config is written).
    pub fn rule(mut self, rule: Rule) -> Scenario {
        self.rules.push(rule);
        self
    }

    /// Top-level config keys (such as `metrics_listen`), one per line.
    pub fn head(mut self, lines: &str) -> Scenario {
        self.head.push_str(lines);
        self.head.push('\n');
        self
    }

    /// More arguments for `nsproxy run`.
    pub fn args(mut self, args: &[&str]) -> Scenario {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// An environment variable for the daemon.
    pub fn env(mut self, name: &str, value: &str) -> Scenario {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Starts nsproxy through `wrapper`, a command that execs its arguments.
    pub fn wrapper(mut self, wrapper: &[&str]) -> Scenario {
        self.wrapper = wrapper.iter().map(|a| a.to_string()).collect();
        self
    }

    /// The config the daemon will read.
    pub fn config_text(&self) -> String {
        self.spaces.config(&self.head, &self.rules)
    }

    /// Starts `nsproxy run` with the scenario's config and waits (bounded)
    /// until it reports ready.
    pub fn start(self) -> Running {
        let mut running = self.spawn();
        running.ready = running.daemon.wait_ready();
        running
    }

    /// Starts `nsproxy run` with the scenario's config, without waiting.
    pub fn spawn(self) -> Running {
        let dir = TempDir::new();
        let cfg = dir.file("nsproxy.toml", &self.config_text());
        let mut args = vec![
            "run".to_owned(),
            "--config".into(),
            cfg.display().to_string(),
        ];
        args.extend(self.args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.launch(dir, &args)
    }

    /// Starts any nsproxy subcommand (such as `forward ...`), and waits
    /// (bounded) until it reports ready; the scenario's rules are not used.
    pub fn start_command(self, args: &[&str]) -> Running {
        let mut running = self.launch(TempDir::new(), args);
        running.ready = running.daemon.wait_ready();
        running
    }

    fn launch(self, dir: TempDir, args: &[&str]) -> Running {
        let wrapper: Vec<&str> = self.wrapper.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let daemon = Daemon::spawn_with(&self.spaces.host, dir, &wrapper, args, &env);
        Running {
            daemon,
            spaces: self.spaces,
            head: self.head,
            ready: String::new(),
        }
    }
}

/// A scenario with its daemon running. It derefs to the [`Daemon`] (log,
/// control API, signals). Dropping it kills the daemon first, then removes
/// the namespaces.
pub struct Running {
    // Declared first so that it drops first: nsproxy goes before its
    // namespaces do.
    daemon: Daemon,
    spaces: Spaces,
    head: String,
    /// The log up to the ready line (empty when not waited for).
    ready: String,
}

impl Running {
    /// The namespace tagged `tag` (`host`: the one nsproxy runs in).
    pub fn ns(&self, tag: &str) -> &TestNs {
        self.spaces.get(tag)
    }

    pub fn host(&self) -> &TestNs {
        &self.spaces.host
    }

    /// The namespaces tagged `{tag}0`, `{tag}1`... in order (see
    /// [`Scenario::many`]).
    pub fn group(&self, tag: &str) -> Vec<&TestNs> {
        (0..)
            .map(|i| format!("{tag}{i}"))
            .map_while(|t| self.spaces.tagged.iter().find(|(x, _)| *x == t))
            .map(|(_, ns)| ns)
            .collect()
    }

    /// The log as it was when the daemon reported ready.
    pub fn ready_log(&self) -> &str {
        &self.ready
    }

    /// Deletes the namespace tagged `tag` now, while nsproxy runs.
    pub fn delete_ns(&mut self, tag: &str) {
        let at = self
            .spaces
            .tagged
            .iter()
            .position(|(t, _)| t == tag)
            .unwrap_or_else(|| panic!("the scenario has no namespace tagged {tag:?}"));
        drop(self.spaces.tagged.remove(at));
    }

    /// The config text for `rules` (tags resolved, the scenario's top-level
    /// keys first).
    pub fn config_for(&self, rules: &[Rule]) -> String {
        self.spaces.config(&self.head, rules)
    }

    /// Rewrites the daemon's config file with `rules` (then reload it).
    pub fn write_config(&self, rules: &[Rule]) {
        std::fs::write(self.daemon.config_path(), self.config_for(rules)).unwrap();
    }

    /// The daemon's config file.
    pub fn config_file(&self) -> PathBuf {
        self.daemon.config_path()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(self) -> std::process::ExitStatus {
        self.daemon.terminate()
    }

    /// Waits (bounded) for the daemon to exit by itself.
    pub fn wait_exit(self) -> (std::process::ExitStatus, String) {
        self.daemon.wait_exit()
    }

    /// Sends SIGTERM, checks that the daemon exits cleanly, returns its log.
    pub fn stop(self) -> String {
        self.daemon.signal("TERM");
        let (status, log) = self.daemon.wait_exit();
        assert!(status.success(), "{log}");
        log
    }
}

/// Waiting for the daemon in place ([`Daemon::wait_exit_here`]) keeps the
/// namespaces, which another daemon may serve by then.
impl DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.daemon
    }
}

impl Deref for Running {
    type Target = Daemon;

    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}
