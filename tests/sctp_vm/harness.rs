//! Harness for the SCTP tests: namespaces, SCTP peers inside them, and the
//! nsproxy binary as a process.
//!
//! It works inside the test VM (`scripts/sctp-vm.sh`, busybox: no
//! `ip netns`) and on a host with SCTP and iproute2. A namespace is made with
//! `ip netns add` where iproute2 has it, else with busybox
//! `unshare --net=/run/netns/NAME` (a bind mount of a new namespace), and
//! commands run inside it with `nsenter --net=PATH`, which both have. No
//! test code switches namespaces itself: sockets inside a namespace come from
//! nsproxy's own [`Switcher`].

#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nsproxy::netns::{NsId, NsRef, Socket, SocketSpec, Switcher};
use nsproxy::sctp::{self, RcvInfo, Reassembler, Received, SndInfo, Streams};

use crate::root::{is_root, skip_forbidden, test_name};
use crate::scenario::Scenario;

/// Longest any single wait may take (the VM emulates its CPU: generous).
pub const WAIT: Duration = Duration::from_secs(30);

/// True when this process runs in the test VM.
pub fn in_vm() -> bool {
    std::env::var("SCTPVM").as_deref() == Ok("1")
}

/// True when the test may run: root, and a kernel with SCTP. In the VM
/// nothing may skip; on a host without SCTP the test prints why it skips
/// (`scripts/test.sh` runs this binary in the VM as well).
pub fn sctp_or_skip(test: &str) -> bool {
    let strict = in_vm() || skip_forbidden();
    if !is_root() {
        assert!(
            !strict,
            "{test}: needs root, and skipping is not allowed here"
        );
        eprintln!("SKIPPED {test}: needs root to create network namespaces");
        return false;
    }
    let probe = Socket::new(
        nsproxy::netns::Domain::IPV4,
        nsproxy::netns::Type::STREAM,
        Some(nsproxy::netns::Protocol::from(sctp::IPPROTO_SCTP)),
    );
    match probe {
        Ok(_) => true,
        Err(e) if sctp::is_unsupported(&e) => {
            assert!(
                !in_vm(),
                "{test}: no SCTP inside the test VM ({e}): the harness should have loaded sctp.ko"
            );
            eprintln!(
                "SKIPPED {test}: this kernel has no SCTP ({e}); scripts/test.sh runs these tests in a VM (scripts/sctp-vm.sh)"
            );
            false
        }
        Err(e) => panic!("{test}: cannot probe for SCTP: {e}"),
    }
}

/// Runs the body of a test that needs root and kernel SCTP; otherwise the
/// test says why it skips (or fails where skipping is not allowed, see
/// [`sctp_or_skip`]).
pub fn as_sctp(test: impl FnOnce()) {
    if sctp_or_skip(&test_name()) {
        test();
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("nspt-{}-{n}-{tag}", std::process::id())
}

fn run(cmd: &str, args: &[&str]) -> io::Result<()> {
    let out = Command::new(cmd).args(args).stdin(Stdio::null()).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether `ip` is iproute2 (has `netns`) rather than busybox.
fn iproute2() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        Command::new("ip")
            .args(["netns", "list"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// The shared fixture ([`Scenario`], in `tests/common/scenario.rs`) knows
/// a test namespace by this name.
pub type TestNs = Ns;

/// A network namespace made for one test, removed on drop (also on panic).
pub struct Ns {
    name: String,
}

impl Ns {
    /// Creates `/run/netns/nspt-PID-N-tag` with `lo` up.
    pub fn new(tag: &str) -> Ns {
        let name = unique(tag);
        Ns::create(&name).unwrap_or_else(|e| panic!("cannot create namespace {name}: {e}"));
        let ns = Ns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]).expect("lo up");
        ns
    }

    fn create(name: &str) -> io::Result<()> {
        if iproute2() {
            return run("ip", &["netns", "add", name]);
        }
        std::fs::create_dir_all(nsproxy::netns::NETNS_RUN_DIR)?;
        let path = Path::new(nsproxy::netns::NETNS_RUN_DIR).join(name);
        std::fs::File::create(&path)?;
        let r = run("unshare", &[&format!("--net={}", path.display()), "true"]);
        if r.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        r
    }

    /// Creates `n` namespaces.
    pub fn many(tag: &str, n: usize) -> Vec<Ns> {
        (0..n).map(|i| Ns::new(&format!("{tag}{i}"))).collect()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new(nsproxy::netns::NETNS_RUN_DIR).join(&self.name)
    }

    pub fn reference(&self) -> NsRef {
        NsRef::Named(self.name.clone())
    }

    /// Runs a command inside this namespace and waits for it.
    pub fn exec(&self, cmd: &[&str]) -> io::Result<()> {
        let net = format!("--net={}", self.path().display());
        let mut args = vec![net.as_str()];
        args.extend_from_slice(cmd);
        run("nsenter", &args)
    }

    /// A command that runs inside this namespace (not started yet).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg(program);
        c
    }

    /// Adds an address to this namespace's `lo` (e.g. "127.0.0.2/8").
    pub fn add_lo_addr(&self, cidr: &str) {
        let mut cmd = vec!["ip", "addr", "add", cidr, "dev", "lo"];
        if cidr.contains(':') {
            cmd.insert(1, "-6");
        }
        self.exec(&cmd).expect("ip addr add");
    }

    /// This namespace's identity in the test process's switcher.
    pub fn id(&self) -> NsId {
        switcher()
            .resolve_blocking(&self.reference())
            .expect("resolve test namespace")
    }

    /// A blocking SCTP socket of `family`'s address family inside this
    /// namespace, with the stream counts asked for and per-message info on.
    pub fn sctp_socket(&self, family: &SocketAddr, streams: Streams) -> Socket {
        let s = switcher()
            .socket_blocking(self.id(), SocketSpec::sctp(family))
            .expect("SCTP socket in test namespace");
        s.set_nonblocking(false).unwrap();
        sctp::set_init(&s, streams).unwrap();
        sctp::set_recv_rcvinfo(&s, true).unwrap();
        sctp::set_nodelay(&s, true).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.set_write_timeout(Some(WAIT)).unwrap();
        s
    }

    /// A listening SCTP socket on `addr` (`[::]` is dual-stack).
    pub fn sctp_listen(&self, addr: &str) -> Socket {
        self.sctp_listen_with(addr, Streams::MAX, &[])
    }

    /// Like [`Ns::sctp_listen`], with stream counts and more local addresses.
    pub fn sctp_listen_with(&self, addr: &str, streams: Streams, more: &[&str]) -> Socket {
        let addr: SocketAddr = addr.parse().unwrap();
        let s = self.sctp_socket(&addr, streams);
        s.set_reuse_address(true).unwrap();
        if addr.is_ipv6() {
            s.set_only_v6(false).unwrap();
        }
        s.bind(&addr.into()).expect("bind in test namespace");
        let more: Vec<SocketAddr> = more.iter().map(|a| a.parse().unwrap()).collect();
        sctp::bindx(&s, &more).expect("bindx in test namespace");
        s.listen(128).unwrap();
        s
    }

    /// One association attempt from inside this namespace.
    pub fn sctp_connect(&self, addr: &str) -> io::Result<Socket> {
        self.sctp_connect_with(addr, Streams::MAX)
    }

    pub fn sctp_connect_with(&self, addr: &str, streams: Streams) -> io::Result<Socket> {
        let addr: SocketAddr = addr.parse().unwrap();
        let s = self.sctp_socket(&addr, streams);
        s.connect(&addr.into())?;
        Ok(s)
    }

    /// Connects, retrying while nothing listens yet (bounded by [`WAIT`]).
    pub fn sctp_connect_when_ready(&self, addr: &str) -> Socket {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.sctp_connect(addr) {
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

impl Drop for Ns {
    fn drop(&mut self) {
        let r = if iproute2() {
            run("ip", &["netns", "del", &self.name])
        } else {
            let path = self.path();
            run("umount", &["-l", path.to_str().unwrap()])
                .and_then(|()| std::fs::remove_file(&path))
        };
        if let Err(e) = r {
            eprintln!(
                "warning: could not remove test namespace {}: {e}",
                self.name
            );
        }
    }
}

/// The test process's namespace thread (tests never switch namespaces).
pub fn switcher() -> &'static Switcher {
    static S: OnceLock<Switcher> = OnceLock::new();
    S.get_or_init(|| Switcher::spawn().expect("switcher"))
}

/// One whole message (or the end) on a blocking socket. Notifications are
/// skipped: tests care about data.
#[derive(Debug)]
pub struct Msg {
    pub data: Vec<u8>,
    pub info: RcvInfo,
    /// How many `recvmsg` calls it took (more than one: partial delivery).
    pub pieces: usize,
}

/// Receives the next message; `Ok(None)` once the association was shut
/// down gracefully: by the peer (the kernel says end of file) or by this
/// side (the kernel says `ENOTCONN` once that shutdown is complete).
pub fn recv(s: &Socket) -> io::Result<Option<Msg>> {
    match recv_raw(s) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(None),
        r => r,
    }
}

fn recv_raw(s: &Socket) -> io::Result<Option<Msg>> {
    let mut r = Reassembler::new(64 * 1024, 64 << 20);
    let mut pieces = 0;
    loop {
        pieces += 1;
        match r.recv_once(s.as_fd())? {
            None => {}
            Some(Received::Data(info)) => {
                return Ok(Some(Msg {
                    data: r.message().to_vec(),
                    info,
                    pieces,
                }));
            }
            Some(Received::Notification(_)) => pieces = 0,
            Some(Received::Oversized { len, .. }) => {
                return Err(io::Error::other(format!(
                    "{len}-byte message over the test's limit"
                )));
            }
            Some(Received::Eof) => return Ok(None),
        }
    }
}

/// Sends one message on stream `sid` with `ppid`.
pub fn send(s: &Socket, data: &[u8], sid: u16, ppid: u32) -> io::Result<()> {
    send_with(
        s,
        data,
        &SndInfo {
            sid,
            ppid,
            ..SndInfo::default()
        },
    )
}

/// Sends one message; a message larger than the send buffer grows it first
/// (SCTP refuses it otherwise, with `EMSGSIZE`).
pub fn send_with(s: &Socket, data: &[u8], info: &SndInfo) -> io::Result<()> {
    if data.len() > 64 * 1024 {
        assert!(
            sctp::fit_send_buffer(s, data.len())?,
            "send buffer for {} bytes",
            data.len()
        );
    }
    let n = sctp::send(s, data, info)?;
    assert_eq!(n, data.len(), "a message is sent whole");
    Ok(())
}

/// Serves every association on `l` with `f`, a thread each, until the
/// process ends.
pub fn serve<F>(l: Socket, f: F)
where
    F: Fn(Socket) + Send + Sync + Clone + 'static,
{
    std::thread::spawn(move || {
        loop {
            let Ok((s, _)) = l.accept() else { return };
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.set_write_timeout(Some(WAIT)).unwrap();
            let f = f.clone();
            std::thread::spawn(move || f(s));
        }
    });
}

/// Echoes every message on the stream, PPID and unordered flag it came
/// with, until the peer shuts down; then closes.
pub fn echo_server(l: Socket) {
    serve(l, |s| {
        while let Ok(Some(m)) = recv(&s) {
            if send_with(&s, &m.data, &SndInfo::relay(&m.info)).is_err() {
                return;
            }
        }
    });
}

/// The SCTP upstream servers a scenario can start.
impl Scenario {
    /// An SCTP server on `addr` in `tag` that echoes every message on its
    /// stream, with its PPID and flags.
    pub fn sctp_echo(self, tag: &str, addr: &str) -> Scenario {
        echo_server(self.ns(tag).sctp_listen(addr));
        self
    }
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

/// The nsproxy binary: cargo's build of it, which the VM harness copies in
/// at the same path (`--file`).
pub fn bin() -> &'static str {
    let path = env!("CARGO_BIN_EXE_nsproxy");
    assert!(
        Path::new(path).exists(),
        "{path} is missing: run this binary in the VM with `scripts/sctp-vm.sh --file {path}`"
    );
    path
}

/// The nsproxy binary as its own process inside a namespace (so `host` in
/// its config means that namespace). Killed on drop.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    _dir: TempDir,
}

impl Daemon {
    /// `nsproxy --log-format json run --config <config>` inside `host`.
    pub fn run(host: &Ns, config: &str) -> Daemon {
        let dir = TempDir::new();
        let cfg = dir.file("nsproxy.toml", config);
        Daemon::spawn(host, dir, &["run", "--config", cfg.to_str().unwrap()])
    }

    /// Any nsproxy subcommand, inside `host`.
    pub fn command(host: &Ns, args: &[&str]) -> Daemon {
        Daemon::spawn(host, TempDir::new(), args)
    }

    fn spawn(host: &Ns, dir: TempDir, args: &[&str]) -> Daemon {
        Daemon::spawn_with(host, dir, &[], args, &[])
    }

    /// Like [`Daemon::spawn`], with nsproxy started through `wrapper` (a
    /// command that execs its arguments) and with extra environment
    /// variables; the shared [`Scenario`] starts its daemon here.
    pub(crate) fn spawn_with(
        host: &Ns,
        dir: TempDir,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let log = dir.0.join("stderr.log");
        let err = std::fs::File::create(&log).unwrap();
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = host.command(program);
                c.args(rest).arg(bin());
                c
            }
            None => host.command(bin()),
        };
        // nsenter execs nsproxy (no fork without -p), so the pid is nsproxy's.
        let child = command
            .args(["--log-format", "json", "--log-level", "nsproxy=debug"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn nsproxy");
        Daemon {
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// The config file a [`Daemon::run`] daemon reads.
    pub fn config_path(&self) -> PathBuf {
        self._dir.0.join("nsproxy.toml")
    }

    /// Sends a signal by name (HUP, TERM, ...).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig}");
    }

    /// Waits (bounded) for the process to exit by itself; returns its
    /// status and log.
    pub fn wait_exit(mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let status = wait_exit(&mut child).unwrap_or_else(|| {
            panic!("nsproxy did not exit within {WAIT:?}; log:\n{}", self.log())
        });
        (status, self.log())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until `needle` occurs `n` times in the log; returns it.
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
            if self.exited() {
                panic!("nsproxy exited while waiting for {needle:?}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_log(&self, needle: &str) -> String {
        self.wait_log_count(needle, 1)
    }

    /// Waits until the daemon reports it is ready.
    pub fn wait_ready(&self) -> String {
        self.wait_log("\"ready: ")
    }

    /// True once the process has ended (a zombie counts).
    pub fn exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/status", self.pid())) {
            Ok(s) => s
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('Z')),
            Err(_) => true,
        }
    }

    /// The `Threads:` line of /proc/PID/status.
    pub fn threads(&self) -> usize {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        wait_exit(&mut child).unwrap_or_else(|| panic!("nsproxy did not exit within {WAIT:?}"))
    }
}

/// Waits (bounded) for `child` to exit; kills it and returns `None` if it
/// does not within [`WAIT`].
fn wait_exit(child: &mut Child) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
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
