//! Test harness: namespaces that clean up after themselves, sockets inside
//! them, and the nsproxy binary as a separate process; [`Scenario`] puts
//! them together, and [`as_root`] is the one root check.
//!
//! Every namespace a test makes has a unique name (`nspt-PID-N-tag`) and is
//! deleted when its guard drops, also when the test panics. Traffic stays on
//! loopback inside those namespaces. Every wait is bounded.

#![allow(dead_code)]

mod root;
mod rules;
mod scenario;
// Not every test crate uses each of them.
#[allow(unused_imports)]
pub use root::*;
#[allow(unused_imports)]
pub use rules::*;
#[allow(unused_imports)]
pub use scenario::*;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nsproxy::netns::{NsId, NsRef, SocketSpec, Switcher};

/// Longest any single wait in a test may take.
pub const WAIT: Duration = Duration::from_secs(20);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Interface and netns names have no length issue here, but keep it short.
    format!("nspt-{}-{n}-{tag}", std::process::id())
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A network namespace made for one test, removed on drop.
pub struct TestNs {
    name: String,
    /// Made by this guard (and so removed by it), or only adopted.
    owned: bool,
}

impl TestNs {
    /// Creates `nspt-PID-N-tag` with `lo` up.
    pub fn new(tag: &str) -> TestNs {
        let name = unique(tag);
        ip(&["netns", "add", &name]).expect("ip netns add");
        let ns = TestNs { name, owned: true };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]).expect("lo up");
        ns
    }

    /// Creates `n` namespaces, several at a time.
    pub fn many(tag: &str, n: usize) -> Vec<TestNs> {
        let names: Vec<String> = (0..n).map(|i| unique(&format!("{tag}{i}"))).collect();
        let mut out = Vec::with_capacity(n);
        for chunk in names.chunks(25) {
            let handles: Vec<_> = chunk
                .iter()
                .cloned()
                .map(|name| {
                    std::thread::spawn(move || {
                        ip(&["netns", "add", &name])?;
                        let ns = TestNs { name, owned: true };
                        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
                        Ok(ns)
                    })
                })
                .collect();
            // Collect every guard before failing, so each made namespace is removed.
            let made: Vec<io::Result<TestNs>> =
                handles.into_iter().map(|h| h.join().unwrap()).collect();
            for m in made {
                out.push(m.expect("ip netns add / lo up"));
            }
        }
        out
    }

    /// A handle on a namespace made elsewhere; dropping it removes nothing.
    pub fn adopt(name: &str) -> TestNs {
        TestNs {
            name: name.to_owned(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn reference(&self) -> NsRef {
        NsRef::Named(self.name.clone())
    }

    /// Resolves this namespace in the test process's switcher.
    pub fn id(&self) -> NsId {
        switcher()
            .resolve_blocking(&self.reference())
            .expect("resolve test namespace")
    }

    /// Adds an address to this namespace's `lo` (e.g. "127.0.0.2/8").
    pub fn add_lo_addr(&self, cidr: &str) {
        ip(&["-n", &self.name, "addr", "add", cidr, "dev", "lo"]).expect("ip addr add");
    }

    /// A blocking TCP listener inside this namespace.
    pub fn tcp_listen(&self, addr: &str) -> TcpListener {
        let addr: SocketAddr = addr.parse().unwrap();
        let s = switcher()
            .socket_blocking(self.id(), SocketSpec::tcp(&addr))
            .expect("socket in test namespace");
        s.set_nonblocking(false).unwrap();
        s.set_reuse_address(true).unwrap();
        if addr.is_ipv6() {
            s.set_only_v6(false).unwrap();
        }
        s.bind(&addr.into()).expect("bind in test namespace");
        s.listen(128).unwrap();
        s.into()
    }

    /// One TCP connection attempt from inside this namespace.
    pub fn tcp_connect(&self, addr: &str) -> io::Result<TcpStream> {
        let addr: SocketAddr = addr.parse().unwrap();
        let s = switcher()
            .socket_blocking(self.id(), SocketSpec::tcp(&addr))
            .map_err(io::Error::other)?;
        s.set_nonblocking(false)?;
        s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
        let s: TcpStream = s.into();
        s.set_read_timeout(Some(WAIT))?;
        s.set_write_timeout(Some(WAIT))?;
        Ok(s)
    }

    /// Connects from inside this namespace, retrying until something listens
    /// (bounded by [`WAIT`]).
    pub fn tcp_connect_when_ready(&self, addr: &str) -> TcpStream {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.tcp_connect(addr) {
                Ok(s) => return s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!(
                    "nothing listens on {addr} in {} after {WAIT:?}: {e}",
                    self.name
                ),
            }
        }
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!(
                "warning: could not remove test namespace {}: {e}",
                self.name
            );
        }
    }
}

/// The test process's own namespace thread (tests never call setns).
pub fn switcher() -> &'static Switcher {
    static S: OnceLock<Switcher> = OnceLock::new();
    S.get_or_init(|| Switcher::spawn().expect("switcher"))
}

/// The TCP and UDP upstream servers a scenario can start.
impl Scenario {
    /// A TCP server on `addr` in `tag` running `f` for each connection.
    pub fn tcp_serve<F>(self, tag: &str, addr: &str, f: F) -> Scenario
    where
        F: Fn(TcpStream) + Send + Sync + Clone + 'static,
    {
        serve(self.ns(tag).tcp_listen(addr), f);
        self
    }

    /// A TCP server on `addr` in `tag` that echoes until EOF.
    pub fn tcp_echo(self, tag: &str, addr: &str) -> Scenario {
        echo_server(self.ns(tag).tcp_listen(addr));
        self
    }

    /// A TCP server on `addr` in `tag` that sends `reply` and closes.
    pub fn tcp_hello(self, tag: &str, addr: &str, reply: &'static str) -> Scenario {
        hello_server(self.ns(tag).tcp_listen(addr), reply);
        self
    }

    /// A UDP server on `addr` in `tag` that echoes every datagram.
    pub fn udp_echo(self, tag: &str, addr: &str) -> Scenario {
        udp_echo_server(self.ns(tag).udp_bind(addr));
        self
    }
}

/// Serves every connection on `l` with `f`, one thread per connection, until
/// the process ends.
pub fn serve<F>(l: TcpListener, f: F)
where
    F: Fn(TcpStream) + Send + Sync + Clone + 'static,
{
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { return };
            let f = f.clone();
            std::thread::spawn(move || f(conn));
        }
    });
}

/// Answers `reply` to every connection, then closes it.
pub fn hello_server(l: TcpListener, reply: &'static str) {
    serve(l, move |mut c| {
        let _ = c.write_all(reply.as_bytes());
    });
}

/// Echoes until EOF, then closes.
pub fn echo_server(l: TcpListener) {
    serve(l, |mut c| {
        let mut r = c.try_clone().unwrap();
        let _ = io::copy(&mut r, &mut c);
    });
}

pub fn read_all(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    s.read_to_end(&mut v)?;
    Ok(v)
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// FNV-1a 64: a checksum without extra dependencies.
#[derive(Clone, Copy)]
pub struct Fnv(pub u64);
impl Fnv {
    pub fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x100_0000_01b3);
        }
    }
}
pub fn checksum(data: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.update(data);
    h.0
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);
impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(unique("dir"));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nsproxy")
}

/// The nsproxy binary running as its own process, started inside `host` (so
/// that `host` in its config means that test namespace). Killed on drop.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    control: PathBuf,
    _dir: TempDir,
}

impl Daemon {
    /// `nsproxy run --config <config> --log-format json` plus `extra` args.
    pub fn run(host: &TestNs, config: &str, extra: &[&str]) -> Daemon {
        let dir = TempDir::new();
        let cfg = dir.file("nsproxy.toml", config);
        let mut args = vec!["run", "--config", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        Daemon::spawn(host, dir, &args)
    }

    /// Any nsproxy subcommand, started inside `host`.
    pub fn command(host: &TestNs, args: &[&str]) -> Daemon {
        Daemon::spawn(host, TempDir::new(), args)
    }

    /// Like [`Daemon::command`], with nsproxy started through `wrapper`
    /// (a command that execs its arguments, such as `prlimit ... --`).
    pub fn wrapped(host: &TestNs, wrapper: &[&str], args: &[&str]) -> Daemon {
        Daemon::spawn_with(host, TempDir::new(), wrapper, args, &[])
    }

    /// Like [`Daemon::run`], with extra environment variables.
    pub fn run_env(host: &TestNs, config: &str, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let dir = TempDir::new();
        let cfg = dir.file("nsproxy.toml", config);
        let mut args = vec!["run", "--config", cfg.to_str().unwrap()];
        args.extend_from_slice(extra);
        Daemon::spawn_with(host, dir, &[], &args, env)
    }

    /// The config file a [`Daemon::run`] daemon reads (rewrite it, then reload).
    pub fn config_path(&self) -> PathBuf {
        self._dir.0.join("nsproxy.toml")
    }

    fn spawn(host: &TestNs, dir: TempDir, args: &[&str]) -> Daemon {
        Daemon::spawn_with(host, dir, &[], args, &[])
    }

    fn spawn_with(
        host: &TestNs,
        dir: TempDir,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let log = dir.0.join("stderr.log");
        let err = std::fs::File::create(&log).unwrap();
        // Each daemon gets a control socket of its own, so that parallel
        // tests never meet at the default path.
        let control = dir.0.join("control.sock");
        let mut args: Vec<&str> = args.to_vec();
        let serving = matches!(args.first(), Some(&"run" | &"forward"));
        if serving && !args.contains(&"--control-socket") {
            args.splice(1..1, ["--control-socket", control.to_str().unwrap()]);
        }
        // `ip netns exec` execs the binary (same pid) after entering `host`.
        let child = Command::new("ip")
            .args(["netns", "exec", host.name()])
            .args(wrapper)
            .args([bin(), "--log-format", "json"])
            .args(&args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn nsproxy");
        Daemon {
            child: Some(child),
            log,
            control,
            _dir: dir,
        }
    }

    /// The daemon's control socket.
    pub fn control_socket(&self) -> &str {
        self.control.to_str().unwrap()
    }

    /// Runs `nsproxy ARGS --control-socket <this daemon's>` (status, reload)
    /// and returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = args.to_vec();
        all.extend(["--control-socket", self.control_socket()]);
        run_cli(&all)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The counters of the binding of `rule` in `ns`, from `status --json`.
    pub fn counters(&self, rule: &str, ns: &str) -> serde_json::Value {
        let (code, out, err) = self.cli(&["status", "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["rule"] == rule && b["netns"] == ns)
            .unwrap_or_else(|| panic!("no binding of {rule} in {ns}: {out}"))["counters"]
            .clone()
    }

    /// The daemon's config file and control socket as arguments, for
    /// another `nsproxy run` that takes this one over.
    pub fn same_config_args(&self) -> Vec<String> {
        vec![
            "run".into(),
            "--config".into(),
            self.config_path().display().to_string(),
            "--control-socket".into(),
            self.control_socket().into(),
        ]
    }

    /// The daemon and its children (the socket broker when it runs split).
    pub fn pids(&self) -> Vec<u32> {
        let pid = self.pid();
        let mut all = vec![pid];
        all.extend(children(pid));
        all
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until the log contains `needle`; returns the log.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            if Instant::now() > deadline {
                panic!("log never contained {needle:?} within {WAIT:?}; log:\n{log}");
            }
            if self.exited() {
                panic!(
                    "nsproxy exited while waiting for {needle:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True once the process has ended (a zombie not yet reaped counts).
    pub fn exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/status", self.pid())) {
            Ok(s) => s
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('Z')),
            Err(_) => true,
        }
    }

    /// Waits (bounded) until `needle` occurs `n` times in the log.
    pub fn wait_log_count(&self, needle: &str, n: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if log.matches(needle).count() >= n {
                return log;
            }
            if Instant::now() > deadline {
                panic!("log never had {n} x {needle:?} within {WAIT:?}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the daemon reports it is ready.
    pub fn wait_ready(&self) -> String {
        self.wait_log("\"ready: ")
    }

    /// The `Threads:` line of /proc/PID/status.
    pub fn threads(&self) -> usize {
        self.status_field("Threads:")
    }

    fn status_field(&self, name: &str) -> usize {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Sends a signal by name (HUP, TERM, ...).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig}");
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        wait_exit(&mut child)
    }

    /// Waits (bounded) for the process to exit by itself, keeping the
    /// guard (and what it holds, such as the config's directory).
    pub fn wait_exit_here(&mut self) -> (std::process::ExitStatus, String) {
        let child = self.child.as_mut().expect("not waited for yet");
        let status = wait_exit(child);
        self.child = None;
        (status, self.log())
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_exit(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let log = self.log.clone();
        let status =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wait_exit(&mut child)))
                .unwrap_or_else(|_| {
                    panic!(
                        "log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                });
        (status, self.log())
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("nsproxy (pid {}) did not exit within {WAIT:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs nsproxy to completion (outside any test namespace) and returns
/// (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run nsproxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------
// UDP helpers (added for tests/udp.rs; nothing above depends on them).
// ---------------------------------------------------------------------------

impl TestNs {
    /// A blocking UDP socket bound to `addr` inside this namespace, with
    /// [`WAIT`] as its read timeout. `[::]` is dual-stack.
    pub fn udp_bind(&self, addr: &str) -> std::net::UdpSocket {
        let addr: SocketAddr = addr.parse().unwrap();
        let s = switcher()
            .socket_blocking(self.id(), SocketSpec::udp(&addr))
            .expect("socket in test namespace");
        s.set_nonblocking(false).unwrap();
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            s.set_only_v6(false).unwrap();
        }
        s.bind(&addr.into()).expect("bind in test namespace");
        let s: std::net::UdpSocket = s.into();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    }

    /// A UDP client inside this namespace, connected to `to` from an
    /// ephemeral port on the loopback address of `to`'s family; replies
    /// from any other address are dropped by the kernel.
    pub fn udp_client(&self, to: &str) -> std::net::UdpSocket {
        let to: SocketAddr = to.parse().unwrap();
        let s = self.udp_bind(if to.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        });
        s.connect(to).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// A process (`sleep`) inside this namespace, so that `pid:PID` names
    /// it; killed on drop.
    pub fn process(&self) -> NsProcess {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn sleep in test namespace");
        // `ip netns exec` enters the namespace, then execs sleep in place:
        // once the process is called "sleep", it is in there.
        let pid = child.id();
        let deadline = Instant::now() + WAIT;
        while std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map_or(true, |c| c.trim() != "sleep")
        {
            assert!(
                Instant::now() < deadline,
                "sleep never entered {}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        NsProcess(child)
    }
}

/// A process living in a test namespace; killed on drop.
pub struct NsProcess(Child);

impl NsProcess {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Echoes every datagram to its sender, on its own thread, until the
/// process ends. Its receive buffer is as large as the kernel allows, so
/// that bursts from many clients are not dropped before it reads them.
pub fn udp_echo_server(s: std::net::UdpSocket) {
    s.set_read_timeout(None).unwrap();
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(4 << 20);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    });
}

/// Sends `msg` on a connected socket and returns the first datagram back
/// (or the error, such as a timeout).
pub fn udp_round_trip(c: &std::net::UdpSocket, msg: &[u8]) -> io::Result<Vec<u8>> {
    c.send(msg)?;
    let mut buf = vec![0u8; 65536];
    // Interrupted by a signal to the test process: still waiting.
    let n = loop {
        match c.recv(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => break r?,
        }
    };
    buf.truncate(n);
    Ok(buf)
}

impl Daemon {
    /// Open fds of the daemon (entries of /proc/PID/fd).
    /// The `socket:[INODE]` entries of the daemon's fd table.
    pub fn socket_inodes(&self) -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|l| l.to_string_lossy().into_owned())
            .filter(|l| l.starts_with("socket:"))
            .collect()
    }

    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// Resident memory of the daemon in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> usize {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Waits (bounded) until `f()` holds, polling; panics with `what`.
    pub fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !f() {
            if Instant::now() > deadline {
                panic!("{what}: not within {WAIT:?}; log:\n{}", self.log());
            }
            if self.exited() {
                panic!(
                    "nsproxy exited while waiting for {what}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---- which namespace a process's sockets are in --------------------------

/// The network namespace inode of every socket fd of process `pid`, found
/// by copying each fd into this process (pidfd_getfd) and asking the kernel
/// which namespace the socket belongs to (SIOCGSKNS). Unlike `ss`, this also
/// sees sockets that are not bound or connected (such as pre-created ones).
pub fn socket_namespaces(pid: u32) -> Vec<(String, u64)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::fs::MetadataExt;
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) } as i32;
    assert!(
        pidfd >= 0,
        "pidfd_open({pid}): {}",
        io::Error::last_os_error()
    );
    // SAFETY: a fresh fd, owned here only.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for e in entries.flatten() {
        let is_socket = std::fs::read_link(e.path())
            .map(|t| t.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        let Ok(target_fd) = e.file_name().to_string_lossy().parse::<libc::c_int>() else {
            continue;
        };
        if !is_socket {
            continue;
        }
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_getfd copies fd `target_fd` of the process into this
        // one; it returns a new fd or -1 (the fd may be gone by now).
        let copy =
            unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) } as i32;
        if copy < 0 {
            continue;
        }
        // SAFETY: a fresh fd, owned here only.
        let copy = unsafe { OwnedFd::from_raw_fd(copy) };
        // SAFETY: SIOCGSKNS takes no argument and returns a new fd of the
        // socket's network namespace, or -1.
        let nsfd = unsafe { libc::ioctl(copy.as_raw_fd(), SIOCGSKNS as _) };
        if nsfd < 0 {
            continue;
        }
        // SAFETY: a fresh fd, owned here only.
        let ns = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(nsfd) });
        if let Ok(m) = ns.metadata() {
            out.push((format!("fd {target_fd}"), m.ino()));
        }
    }
    out
}

/// The child processes of `pid` (from every thread's `children` list).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}
