//! The socket broker: the small process that keeps what socket birth needs
//! (CAP_SYS_ADMIN for `setns`) when nsproxy runs split, so that the relay,
//! which handles tenants' bytes, keeps no privilege at all.
//!
//! The relay starts it ([`spawn`]) by re-executing its own binary with one
//! end of a `SOCK_SEQPACKET` pair as fd 3; its main thread ([`run_broker`])
//! then loops: receive a request, check it ([`policy`]), do it with the
//! switching logic every nsproxy uses (the only `setns` calls stay in
//! `netns::switcher`), and send the reply with the sockets made
//! (`SCM_RIGHTS`). The protocol is in [`wire`]. Whatever arrives, it never
//! panics: anything refused is answered as refused, logged and counted
//! ([`Refusals`]). EOF on its socket (the relay is gone) ends it, and so
//! does the relay's death (`PR_SET_PDEATHSIG`).
//!
//! On the relay's side, [`crate::netns::Switcher::remote`] is the switcher
//! whose requests come here.

pub mod policy;
pub mod wire;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socket2::Socket;
use tracing::{info, warn};

use crate::config::{self, Config};
use crate::netns::{NsId, NsRef, SocketSpec, SwitchingThread};
use crate::sys::fdpass;
use policy::{Policy, Resolved};
use wire::{Op, Outcome, Reply, WireError, WireIo};

/// Where the broker's policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// A config file, re-read on `ReadConfig` (a reload).
    File(PathBuf),
    /// `nsproxy forward` specs; there is no file to reload.
    Forward(Vec<String>),
}

impl PolicySource {
    fn load(&self) -> Result<(Config, Option<String>), String> {
        match self {
            PolicySource::File(path) => {
                let text = config::read_text(path).map_err(|e| e.to_string())?;
                let c = config::parse_toml(&text, &path.display().to_string())
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                Ok((c, Some(text)))
            }
            PolicySource::Forward(specs) => config::parse_forward(specs, None)
                .map(|c| (c, None))
                .map_err(|e| e.to_string()),
        }
    }

    /// The arguments of the hidden subcommand that name this source.
    fn args(&self) -> Vec<OsString> {
        match self {
            PolicySource::File(p) => vec!["--config".into(), p.clone().into_os_string()],
            PolicySource::Forward(specs) => specs
                .iter()
                .map(|s| OsString::from(format!("--forward={s}")))
                .collect(),
        }
    }
}

/// The fd number the broker's socket has in the broker.
pub const BROKER_FD: i32 = 3;
/// The hidden subcommand that runs the broker.
pub const SUBCOMMAND: &str = "__broker";

/// A broker started by [`spawn`].
#[derive(Debug)]
pub struct BrokerChild {
    /// The relay's end of the socket: give it to
    /// [`crate::netns::Switcher::remote`].
    pub fd: OwnedFd,
    /// The broker's pid.
    pub pid: u32,
    /// The process, for waiting on it (reaping it once it exits).
    pub child: std::process::Child,
}

/// Starts the broker: `/proc/self/exe __broker --fd 3 (--config PATH |
/// --forward=SPEC...) EXTRA...`, with its end of a new socket pair as fd 3.
/// `extra_args` go last (global options such as `--log-format json`).
///
/// Call it from the thread that will live as long as the relay (the main
/// thread): the broker's parent-death signal follows the thread that
/// forked it.
pub fn spawn(source: &PolicySource, extra_args: &[OsString]) -> io::Result<BrokerChild> {
    spawn_exe(std::path::Path::new("/proc/self/exe"), source, extra_args)
}

/// Like [`spawn`], with another nsproxy binary (for tests, whose own
/// executable is not nsproxy).
pub fn spawn_exe(
    exe: &std::path::Path,
    source: &PolicySource,
    extra_args: &[OsString],
) -> io::Result<BrokerChild> {
    let (relay, broker) = fdpass::seqpacket_pair()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(SUBCOMMAND)
        .arg("--fd")
        .arg(BROKER_FD.to_string())
        .args(source.args())
        .args(extra_args)
        .stdin(std::process::Stdio::null());
    fdpass::pass_fd_as(&mut cmd, broker.as_fd(), BROKER_FD);
    let child = cmd.spawn()?;
    drop(broker);
    Ok(BrokerChild {
        fd: relay,
        pid: child.id(),
        child,
    })
}

/// The broker's main for the hidden subcommand: fd `raw` is its socket.
pub fn run_inherited(raw: i32, source: PolicySource) -> ExitCode {
    match fdpass::take_inherited_seqpacket(raw) {
        Ok(fd) => run_broker(fd, source),
        Err(e) => {
            eprintln!("nsproxy broker: fd {raw} is not the relay's socket: {e}");
            ExitCode::from(2)
        }
    }
}

/// The broker process: serves requests on `fd` until the relay closes it
/// (exit 0). Call it on the main thread of a process that runs nothing
/// else.
pub fn run_broker(fd: OwnedFd, source: PolicySource) -> ExitCode {
    // Started as `/proc/self/exe`, it would show as "exe" in ps and top.
    if let Err(e) = crate::sys::privs::set_thread_name(c"nsproxy-broker") {
        warn!("cannot name the broker process: {e}");
    }
    if let Err(e) = fdpass::set_parent_death_signal(libc::SIGKILL) {
        warn!("cannot ask to end with the relay (PR_SET_PDEATHSIG): {e}");
    }
    // Dying with the group's SIGTERM, it would leave the relay's orderly
    // stop (draining connections) without its sockets and log an error at
    // every `systemctl stop`.
    if let Err(e) = fdpass::ignore_stop_signals() {
        warn!(
            "cannot ignore SIGTERM, SIGINT and SIGHUP (a stop signalling the whole group ends the broker first): {e}"
        );
    }
    // Each resolved namespace is an fd held here.
    if let Err(e) = crate::runtime::raise_fd_limit() {
        warn!("cannot raise the open file limit: {e}");
    }
    let mut broker = match Broker::new(source) {
        Ok(b) => b,
        Err(e) => {
            // Started before the relay parsed the same file, the relay says
            // the same thing and exits: said once, by the relay.
            if !relay_gone(fd.as_fd()) {
                eprintln!("nsproxy broker: {e}");
            }
            return ExitCode::from(2);
        }
    };
    if let Err(e) = broker.give_up_privileges() {
        eprintln!("nsproxy broker: {e}");
        return ExitCode::from(2);
    }
    info!(
        pid = std::process::id(),
        parent = fdpass::parent_pid(),
        home = %broker.thread.home(),
        "socket broker serving"
    );
    match broker.serve(fd.as_fd()) {
        Ok(()) => {
            info!("the relay closed its socket: socket broker exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nsproxy broker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Waits (at most 5 s) for the relay's first message or the end of its
/// socket: true at the end (the relay exited without asking anything).
fn relay_gone(fd: BorrowedFd<'_>) -> bool {
    let sock = socket2::SockRef::from(&fd);
    if sock.set_read_timeout(Some(Duration::from_secs(5))).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(fdpass::recv(fd, &mut buf, MAX_REQUEST_FDS, false),
        Ok(got) if got.len == 0 && got.fds.is_empty() && !got.truncated)
}

/// Counts of what the broker refused, by reason.
#[derive(Debug, Default)]
pub struct Refusals {
    /// Refused by the policy (namespace, socket kind, address).
    pub policy: AtomicU64,
    /// Did not decode.
    pub malformed: AtomicU64,
    /// Longer than [`wire::MAX_MESSAGE`] (or cut short by the buffer).
    pub oversized: AtomicU64,
    /// Carried fds it should not have (or too many to take).
    pub fds: AtomicU64,
}

impl Refusals {
    fn total(&self) -> u64 {
        self.policy.load(Ordering::Relaxed)
            + self.malformed.load(Ordering::Relaxed)
            + self.oversized.load(Ordering::Relaxed)
            + self.fds.load(Ordering::Relaxed)
    }
}

/// Most fds a request may bring and still be read whole: one more than any
/// request carries, so that extra ones are seen (and closed) rather than
/// left to `MSG_CTRUNC`.
const MAX_REQUEST_FDS: usize = 4;

/// Warn lines per second about refusals; the rest are counted and summed up.
const WARN_PER_SECOND: u32 = 10;

pub(crate) struct Broker {
    thread: SwitchingThread,
    source: PolicySource,
    policy: Policy,
    resolved: Resolved,
    /// The namespace of each cookie (`SO_NETNS_COOKIE`) seen on a socket
    /// made here: how a socket given back to bind is placed, without the
    /// CAP_NET_ADMIN that asking the kernel for its namespace needs.
    cookies: HashMap<u64, NsId>,
    /// The other way round: each namespace's cookie.
    cookie_known: HashMap<NsId, u64>,
    refusals: Arc<Refusals>,
    warned: (Instant, u32, u64),
}

impl Broker {
    pub(crate) fn new(source: PolicySource) -> Result<Broker, String> {
        let (config, _) = source.load()?;
        Broker::with_config(source, &config)
    }

    pub(crate) fn with_config(source: PolicySource, config: &Config) -> Result<Broker, String> {
        let thread = SwitchingThread::here().map_err(|e| e.to_string())?;
        let mut cookies = HashMap::new();
        // The relay makes its own namespace's sockets itself.
        let home = thread.home();
        let probe =
            crate::netns::socket_here(home, SocketSpec::udp(&"127.0.0.1:0".parse().unwrap()));
        if let Ok(cookie) = probe
            .map_err(drop)
            .and_then(|s| fdpass::netns_cookie(s.as_fd()).map_err(drop))
        {
            cookies.insert(cookie, home);
        }
        let cookie_known = cookies.iter().map(|(c, n)| (*n, *c)).collect();
        Ok(Broker {
            thread,
            source,
            policy: Policy::from_config(config),
            resolved: Resolved::default(),
            cookies,
            cookie_known,
            refusals: Arc::default(),
            warned: (Instant::now(), 0, 0),
        })
    }

    /// Keeps only the capabilities its policy needs (on this, its only
    /// thread) and installs its seccomp filter. Started without root there
    /// is nothing to give up but what the filter takes.
    fn give_up_privileges(&self) -> Result<(), String> {
        let mut caps = self.policy.capabilities();
        // Started with fewer (root without CAP_SYS_ADMIN, say): keeps what
        // it has of them, and each binding that needs a missing one fails
        // with the reason, as in one process.
        let held = crate::privsep::self_status().map_or(0, |st| st.cap_prm);
        let missing: Vec<&str> = caps
            .iter()
            .filter(|c| held & c.bit() == 0)
            .map(|c| c.name())
            .collect();
        if !missing.is_empty() {
            warn!(
                "socket broker started without {}: sockets that need it will fail",
                missing.join(", ")
            );
        }
        caps.retain(|c| held & c.bit() != 0);
        if crate::privsep::is_root() {
            crate::privsep::keep_only_caps(&caps)
                .map_err(|e| format!("cannot give up privileges: {e}"))?;
        }
        crate::privsep::install_broker_filter()
            .map_err(|e| format!("cannot install the seccomp filter: {e}"))?;
        let names: Vec<&str> = caps.iter().map(|c| c.name()).collect();
        info!("socket broker keeps {}", names.join(", "));
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn refusals(&self) -> Arc<Refusals> {
        self.refusals.clone()
    }

    /// Serves until EOF (Ok) or a socket error.
    pub(crate) fn serve(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut buf = vec![0u8; wire::MAX_MESSAGE + 1];
        loop {
            let got = match fdpass::recv(fd, &mut buf, MAX_REQUEST_FDS, true) {
                Ok(g) => g,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Idle: home, so that no namespace is kept alive by
                    // this thread being in it.
                    self.thread.go_home();
                    match fdpass::recv(fd, &mut buf, MAX_REQUEST_FDS, false) {
                        Ok(g) => g,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if got.len == 0 && got.fds.is_empty() && !got.truncated {
                self.thread.go_home();
                return Ok(());
            }
            let len = got.len.min(buf.len());
            let (reply, fds) = self.handle(&buf[..len], got);
            let (bytes, fds) = match wire::encode_reply(&reply) {
                Ok(b) => (b, fds),
                Err(e) => {
                    // A reply too long (a resolve batch the relay did not
                    // chunk): said as a failure, without its sockets.
                    let failed = Reply {
                        id: reply.id,
                        outcome: Outcome::Failed(WireError::Refused {
                            reason: format!("reply not sent: {e}"),
                        }),
                    };
                    let b = wire::encode_reply(&failed).expect("a short reply encodes");
                    (b, Vec::new())
                }
            };
            let sent_fds: Vec<_> = fds.iter().map(|s| s.as_fd()).collect();
            loop {
                match fdpass::send(fd, &bytes, &sent_fds, false) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                        self.thread.go_home();
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                }
            }
            // `fds` (this process's copies of the sockets sent) close here.
        }
    }

    fn refuse(&mut self, counter: fn(&Refusals) -> &AtomicU64, what: &str, why: &str) {
        counter(&self.refusals).fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let (since, n, suppressed) = &mut self.warned;
        if now.duration_since(*since) >= Duration::from_secs(1) {
            if *suppressed > 0 {
                warn!(
                    "socket broker: {suppressed} more refusal(s) not logged ({} in all)",
                    self.refusals.total()
                );
            }
            *since = now;
            *n = 0;
            *suppressed = 0;
        }
        if *n < WARN_PER_SECOND {
            *n += 1;
            warn!("socket broker refused {what}: {why}");
        } else {
            *suppressed += 1;
        }
    }

    /// One message: its reply, and the sockets that go with it.
    pub(crate) fn handle(&mut self, bytes: &[u8], got: fdpass::Received) -> (Reply, Vec<Socket>) {
        let fail = |id, reason: String| {
            (
                Reply {
                    id,
                    outcome: Outcome::Failed(WireError::Refused { reason }),
                },
                Vec::new(),
            )
        };
        if got.truncated || bytes.len() > wire::MAX_MESSAGE {
            let why = format!("longer than {} bytes", wire::MAX_MESSAGE);
            self.refuse(|r| &r.oversized, "a message", &why);
            return fail(0, format!("message {why}"));
        }
        let req = match wire::decode_request(bytes) {
            Ok(r) => r,
            Err(e) => {
                let why = e.to_string();
                self.refuse(|r| &r.malformed, "a message", &why);
                return fail(wire::salvage_id(bytes), why);
            }
        };
        let id = req.id;
        if got.ctrunc || got.fds.len() != req.op.fds() {
            let why = format!(
                "it carried {}{} fd(s), a {} request carries {}",
                if got.ctrunc { "more than " } else { "" },
                got.fds.len(),
                req.op.name(),
                req.op.fds()
            );
            self.refuse(|r| &r.fds, &format!("request {id}"), &why);
            // The fds close as `got` is dropped.
            return fail(id, why);
        }
        let mut fds = got.fds.into_iter();
        let (outcome, sockets) = match req.op {
            Op::Resolve { refs } => (Outcome::Resolved(self.resolve(&refs)), Vec::new()),
            Op::Socket { ns, spec } => match self.socket(ns.into(), spec.into()) {
                Ok(s) => (Outcome::Socket, vec![s]),
                Err(e) => (Outcome::Failed(e), Vec::new()),
            },
            Op::Refill { ns, spec, n } => self.refill(ns.into(), spec.into(), n),
            Op::Sockets { items } => self.sockets(items),
            Op::Release { ns } if ns.len() > wire::MAX_RELEASE => {
                let why = format!(
                    "a release of {} namespaces at once (at most {})",
                    ns.len(),
                    wire::MAX_RELEASE
                );
                self.refuse(|r| &r.policy, "a release", &why);
                (
                    Outcome::Failed(WireError::Refused { reason: why }),
                    Vec::new(),
                )
            }
            Op::Release { ns } => {
                for ns in ns {
                    let ns: NsId = ns.into();
                    self.thread.release(ns);
                    self.resolved.release(ns);
                    if let Some(cookie) = self.cookie_known.remove(&ns) {
                        self.cookies.remove(&cookie);
                    }
                }
                (Outcome::Released, Vec::new())
            }
            Op::Bind { addrs } => {
                let socket = Socket::from(fds.next().expect("one fd, checked"));
                match self.bind(&socket, &addrs) {
                    Ok(()) => (Outcome::Bound, Vec::new()),
                    Err(e) => (Outcome::Failed(e), Vec::new()),
                }
            }
            Op::ReadConfig => match self.read_config().and_then(|text| {
                let fd = fdpass::sealed_memfd("nsproxy-config", text.as_bytes())
                    .map_err(|e| WireError::Io(WireIo::from(&e)))?;
                Ok((text.len() as u64, fd))
            }) {
                // Passed like the sockets: the reply's fds are plain fds.
                Ok((len, fd)) => (Outcome::Config { len }, vec![Socket::from(fd)]),
                Err(e) => (Outcome::Failed(e), Vec::new()),
            },
        };
        (Reply { id, outcome }, sockets)
    }
}

/// What each request does, once it is decoded and its fds checked.
impl Broker {
    fn resolve(&mut self, refs: &[String]) -> Vec<Result<wire::Ns, WireError>> {
        refs.iter()
            .map(|text| {
                let r: NsRef = match text.parse() {
                    Ok(r) => r,
                    Err(e) => {
                        let why = format!("not a namespace reference: {e}");
                        self.refuse(|r| &r.malformed, &format!("resolving {text:?}"), &why);
                        return Err(WireError::Refused { reason: why });
                    }
                };
                if let Err(e) = self.policy.allows_resolve(&r) {
                    let why = e.to_string();
                    self.refuse(|r| &r.policy, &format!("resolving \"{r}\""), &why);
                    return Err(WireError::Refused { reason: why });
                }
                match self.thread.resolve(&r) {
                    Ok(ns) => {
                        self.resolved.insert(ns, r);
                        Ok(ns.into())
                    }
                    Err(e) => Err(WireError::from(&e)),
                }
            })
            .collect()
    }

    fn allow_socket(&mut self, ns: NsId, spec: &SocketSpec) -> Result<(), WireError> {
        self.policy
            .allows_socket(&self.resolved, ns, spec)
            .map_err(|e| {
                let why = e.to_string();
                self.refuse(
                    |r| &r.policy,
                    &format!("a {} socket", policy::describe(spec)),
                    &why,
                );
                WireError::Refused { reason: why }
            })
    }

    fn socket(&mut self, ns: NsId, spec: SocketSpec) -> Result<Socket, WireError> {
        self.allow_socket(ns, &spec)?;
        let s = self
            .thread
            .socket_in(ns, spec)
            .map_err(|e| WireError::from(&e))?;
        self.note(ns, &s);
        Ok(s)
    }

    /// Learns `ns`'s cookie from a socket made in it (once per namespace).
    fn note(&mut self, ns: NsId, s: &Socket) {
        if self.cookie_known.contains_key(&ns) {
            return;
        }
        if let Ok(cookie) = fdpass::netns_cookie(s.as_fd()) {
            self.cookies.insert(cookie, ns);
            self.cookie_known.insert(ns, cookie);
        }
    }

    fn sockets(&mut self, items: Vec<(wire::Ns, wire::Spec)>) -> (Outcome, Vec<Socket>) {
        if items.len() > wire::MAX_REFILL as usize {
            let why = format!(
                "{} sockets at once (at most {})",
                items.len(),
                wire::MAX_REFILL
            );
            self.refuse(|r| &r.policy, "a batch of sockets", &why);
            return (
                Outcome::Failed(WireError::Refused { reason: why }),
                Vec::new(),
            );
        }
        let mut made = Vec::with_capacity(items.len());
        let results = items
            .into_iter()
            .map(|(ns, spec)| match self.socket(ns.into(), spec.into()) {
                Ok(s) => {
                    made.push(s);
                    None
                }
                Err(e) => Some(e),
            })
            .collect();
        (Outcome::Sockets(results), made)
    }

    fn refill(&mut self, ns: NsId, spec: SocketSpec, n: u32) -> (Outcome, Vec<Socket>) {
        if n > wire::MAX_REFILL {
            let why = format!("a refill of {n} sockets (at most {})", wire::MAX_REFILL);
            self.refuse(|r| &r.policy, "a refill", &why);
            return (
                Outcome::Failed(WireError::Refused { reason: why }),
                Vec::new(),
            );
        }
        if let Err(e) = self.allow_socket(ns, &spec) {
            return (Outcome::Failed(e), Vec::new());
        }
        let mut made = Vec::new();
        let mut error = None;
        for _ in 0..n {
            match self.thread.socket_in(ns, spec) {
                Ok(s) => made.push(s),
                Err(e) => {
                    error = Some(WireError::from(&e));
                    break;
                }
            }
        }
        if let Some(s) = made.first() {
            self.note(ns, s);
        }
        (
            Outcome::Refilled {
                made: made.len() as u32,
                error,
            },
            made,
        )
    }

    fn bind(&mut self, socket: &Socket, addrs: &[SocketAddr]) -> Result<(), WireError> {
        let io = |e: &io::Error| WireError::Io(WireIo::from(e));
        let spec = SocketSpec {
            domain: socket.domain().map_err(|e| io(&e))?,
            ty: socket.r#type().map_err(|e| io(&e))?,
            protocol: socket.protocol().map_err(|e| io(&e))?,
            // Only listening sockets are bound here, never transparent.
            transparent: false,
        };
        let cookie = fdpass::netns_cookie(socket.as_fd()).map_err(|e| io(&e))?;
        let Some(&ns) = self.cookies.get(&cookie) else {
            let why = "a socket of a namespace this broker made no socket in".to_owned();
            self.refuse(|r| &r.policy, "a bind", &why);
            return Err(WireError::Refused { reason: why });
        };
        let mut refs = self.resolved.refs(ns).cloned().unwrap_or_default();
        if ns == self.thread.home() {
            refs.insert(NsRef::Host);
        }
        if let Err(e) = self.policy.allows_bind(&refs, &spec, addrs) {
            let why = e.to_string();
            self.refuse(|r| &r.policy, "a bind", &why);
            return Err(WireError::Refused { reason: why });
        }
        let (first, rest) = addrs.split_first().expect("allows_bind refuses none");
        socket.bind(&(*first).into()).map_err(|e| io(&e))?;
        crate::sctp::bindx(socket, rest).map_err(|e| io(&e))
    }

    fn read_config(&mut self) -> Result<String, WireError> {
        let PolicySource::File(path) = &self.source else {
            let why = "started with forward specs: there is no config file to read".to_owned();
            self.refuse(|r| &r.policy, "reading the config", &why);
            return Err(WireError::Refused { reason: why });
        };
        let text = config::read_text(path).map_err(|e| match e {
            config::ConfigError::Read { source, .. } => WireError::Io(WireIo {
                errno: source.raw_os_error(),
                message: source.to_string(),
            }),
            other => WireError::Io(WireIo {
                errno: None,
                message: other.to_string(),
            }),
        })?;
        // An invalid config keeps the policy, and its text goes back all
        // the same: the relay parses it and refuses the reload with the
        // same problems.
        if let Ok(c) = config::parse_toml(&text, &path.display().to_string()) {
            self.policy = Policy::from_config(&c);
            for ns in self.resolved.retain_allowed(&self.policy) {
                self.thread.release(ns);
            }
            info!("socket broker: policy updated from {}", path.display());
        }
        Ok(text)
    }
}
