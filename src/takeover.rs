//! Upgrading without an outage: a new nsproxy takes the running one's
//! listening sockets over, serves them, and the old one drains and exits.
//!
//! A listening socket is one kernel object however many processes hold an
//! fd of it: connections queued in its backlog belong to it, not to a
//! process. So if the old process hands a copy of each fd to the new one
//! and only then stops calling accept, no client is refused and none is
//! queued on a socket that goes away. The steps:
//!
//! 1. `nsproxy run --takeover` asks the running daemon `POST /takeover` on
//!    its control socket (so the same SO_PEERCRED check admits it). The
//!    answer names a one-off abstract unix socket, `@nsproxy-takeover-PID-
//!    RANDOM`, known only to the admitted client, on which the old process
//!    accepts one `SOCK_SEQPACKET` connection, checks its peer again, and
//!    sends a [`Header`] then its sockets, at most 64 fds a message
//!    (`SCM_RIGHTS`), each described by a [`Handed`]: the binding's rule,
//!    namespace (the reference and its identity), protocol and addresses;
//!    and its control socket and metrics listener.
//! 2. The new process opens its bindings as usual, except that a binding
//!    with a handed socket of the same protocol, namespace and listen
//!    address takes that socket (`Inherited::take`) after checking it
//!    itself: its protocol, that it listens, its real address
//!    (`getsockname`) and its namespace (`SO_NETNS_COOKIE`, compared with a
//!    socket made in the binding's namespace). Sockets no binding takes are
//!    closed. The control socket and the metrics listener are taken if the
//!    new config names the same path and address.
//! 3. Ready, the new process sends `ready`; the old one stops accepting
//!    everywhere (without closing anything the new one holds: its fds are
//!    its own), lets open connections drain for `drain_timeout`, and exits
//!    0 without removing the control socket's file, now the new one's.
//!
//! If the new process goes before step 3, the old one sees its connection
//! close and serves on as if nothing happened.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::Protocol;
use crate::control::{ControlError, Peers};
use crate::netns::{NsId, SocketSpec};
use crate::proxy::{Binding, Listener};
use crate::sys::fdpass;

/// How long the old process waits for the new one to connect to the
/// one-off socket, and each side for the other's next message while the
/// sockets are handed.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest message of a handover: a header, or the descriptions of
/// [`fdpass::MAX_FDS`] sockets.
const MAX_MESSAGE: usize = 256 * 1024;

/// What the new process is told first.
#[derive(Debug, Serialize, Deserialize)]
pub struct Header {
    /// The old process.
    pub pid: u32,
    /// Its version (for the log).
    pub version: String,
    /// How many sockets follow, in messages of at most 64.
    pub sockets: usize,
}

/// One socket handed over, as the old process describes it; the new one
/// checks the socket itself before using it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Handed {
    /// A binding's listening socket.
    Binding {
        rule: String,
        /// The namespace reference as written in the config.
        netns: String,
        /// The namespace's identity (nsfs device and inode).
        ns_dev: u64,
        ns_ino: u64,
        /// `tcp`, `udp` or `sctp`.
        protocol: String,
        /// The listen address the rule names (port 0 stays 0).
        listen: SocketAddr,
        /// The address it is bound to.
        local: SocketAddr,
    },
    /// The control API's unix listener.
    Control { path: PathBuf },
    /// The metrics endpoint's TCP listener.
    Metrics { local: SocketAddr },
}

impl std::fmt::Display for Handed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handed::Binding {
                rule,
                netns,
                protocol,
                local,
                ..
            } => write!(f, "rule \"{rule}\" in \"{netns}\" ({protocol} {local})"),
            Handed::Control { path } => write!(f, "the control socket {}", path.display()),
            Handed::Metrics { local } => write!(f, "the metrics listener on {local}"),
        }
    }
}

/// The answer to `POST /takeover`: where to fetch the sockets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Offer {
    /// The one-off socket, `@` for the abstract namespace.
    pub socket: String,
    /// The old process.
    pub pid: u32,
}

/// Why a takeover could not be done.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("--takeover: {0}")]
    Control(#[from] ControlError),
    #[error("--takeover: the running nsproxy's handover socket {socket}: {source}")]
    Io { socket: String, source: io::Error },
    #[error("--takeover: the running nsproxy (pid {pid}) sent {what}")]
    Protocol { pid: u32, what: String },
    #[error(
        "--takeover needs the running nsproxy's control socket, and control_socket is \"\" (off)"
    )]
    NoControlSocket,
    #[error(
        "--takeover: the running nsproxy offers no takeover (a version before it); stop it and start this one"
    )]
    NotOffered,
}

// ---- the old process ----

/// The old process's side: offers its sockets to an admitted client, and
/// says when the one that took them serves.
pub struct Giver {
    /// Dups of the control and metrics listeners (the tasks serving them
    /// own the originals).
    control: Option<(PathBuf, OwnedFd)>,
    metrics: Option<(SocketAddr, OwnedFd)>,
    peers: Peers,
    /// A takeover is under way: another is refused until it ends.
    busy: Arc<AtomicBool>,
    /// Gets the pid of the process that took over, once it serves.
    done: mpsc::UnboundedSender<u32>,
    sockets: crate::lifecycle::Handover,
}

impl Giver {
    /// `done` hears the new process's pid once it serves.
    pub fn new(
        sockets: crate::lifecycle::Handover,
        control: Option<(PathBuf, OwnedFd)>,
        metrics: Option<(SocketAddr, OwnedFd)>,
        peers: Peers,
        done: mpsc::UnboundedSender<u32>,
    ) -> Giver {
        Giver {
            control,
            metrics,
            peers,
            busy: Arc::default(),
            done,
            sockets,
        }
    }

    /// Starts a handover: copies of every listening socket wait on a
    /// one-off socket (its name is the answer) for one admitted peer.
    pub async fn offer(&self) -> Result<Offer, String> {
        if self.busy.swap(true, Ordering::SeqCst) {
            return Err("a takeover is already under way".into());
        }
        match self.start().await {
            Ok(o) => Ok(o),
            Err(e) => {
                self.busy.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    async fn start(&self) -> Result<Offer, String> {
        let mut sockets = self.sockets.listening().await;
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("cannot copy a fd: {e}"));
        if let Some((path, fd)) = &self.control {
            sockets.push((Handed::Control { path: path.clone() }, dup(fd)?));
        }
        if let Some((local, fd)) = &self.metrics {
            sockets.push((Handed::Metrics { local: *local }, dup(fd)?));
        }
        let pid = std::process::id();
        let name = format!("nsproxy-takeover-{pid}-{:016x}", random());
        let listener = (|| {
            let s = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None)?;
            s.bind(&SockAddr::unix(format!("\0{name}"))?)?;
            s.listen(1)?;
            // Bounds accept(2) too.
            s.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
            io::Result::Ok(s)
        })()
        .map_err(|e| format!("cannot make the handover socket: {e}"))?;
        let job = Give {
            listener,
            sockets,
            peers: self.peers.clone(),
            busy: self.busy.clone(),
            done: self.done.clone(),
        };
        std::thread::Builder::new()
            .name("nsproxy-handover".into())
            .spawn(move || job.run())
            .map_err(|e| format!("cannot start the handover thread: {e}"))?;
        Ok(Offer {
            socket: format!("@{name}"),
            pid,
        })
    }
}

/// 64 random bits (from the OS-seeded hasher keys std draws per map).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish()
}

/// One handover, on a thread of its own: its waits are blocking calls.
struct Give {
    listener: Socket,
    sockets: Vec<(Handed, OwnedFd)>,
    peers: Peers,
    busy: Arc<AtomicBool>,
    done: mpsc::UnboundedSender<u32>,
}

impl Give {
    fn run(self) {
        match self.hand() {
            Ok(Some(pid)) => {
                info!(
                    pid,
                    "pid {pid} took over {} socket(s) and serves them",
                    self.sockets.len()
                );
                let _ = self.done.send(pid);
                // Busy for good: this process is on its way out.
                return;
            }
            Ok(None) => {}
            Err(e) => warn!("takeover abandoned: {e}; serving on"),
        }
        self.busy.store(false, Ordering::SeqCst);
    }

    /// `Some(pid)` once the peer said it serves; `None` when it went first.
    fn hand(&self) -> Result<Option<u32>, String> {
        let (conn, _) = self.listener.accept().map_err(|e| {
            format!("no process fetched the sockets within {HANDOVER_TIMEOUT:?} ({e})")
        })?;
        let (pid, uid) = fdpass::peer_cred(conn.as_fd())
            .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
        self.peers
            .admit(Some(uid))
            .map_err(|why| format!("pid {pid}: {why}"))?;
        let _ = conn.set_write_timeout(Some(HANDOVER_TIMEOUT));
        let header = Header {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            sockets: self.sockets.len(),
        };
        let send = |bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]| {
            fdpass::send(conn.as_fd(), bytes, fds, false)
                .map_err(|e| format!("sending to pid {pid}: {e}"))
        };
        send(&json(&header), &[])?;
        for chunk in chunks(&self.sockets) {
            let described: Vec<&Handed> = chunk.iter().map(|(h, _)| h).collect();
            let fds: Vec<_> = chunk.iter().map(|(_, fd)| fd.as_fd()).collect();
            send(&json(&described), &fds)?;
        }
        info!(
            pid,
            "handed {} socket(s) to pid {pid}; serving until it is ready",
            self.sockets.len()
        );
        // As long as it takes the new process to open its bindings.
        let _ = conn.set_read_timeout(None);
        let mut buf = [0u8; 64];
        match fdpass::recv(conn.as_fd(), &mut buf, 0, false) {
            Ok(r) if &buf[..r.len] == b"ready" => Ok(Some(pid)),
            Ok(r) if r.len == 0 => {
                warn!(
                    pid,
                    "pid {pid} went before it served the sockets it took: serving on"
                );
                Ok(None)
            }
            Ok(_) => Err(format!("pid {pid} sent something other than \"ready\"")),
            Err(e) => Err(format!("waiting for pid {pid}: {e}")),
        }
    }
}

/// The sockets in messages of at most [`fdpass::MAX_FDS`] fds and about
/// [`CHUNK_BYTES`] of descriptions (long rule names or paths), well within
/// a unix socket's send buffer.
fn chunks(sockets: &[(Handed, OwnedFd)]) -> Vec<&[(Handed, OwnedFd)]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (h, _)) in sockets.iter().enumerate() {
        let len = json(h).len() + 1;
        if i > start && (i - start == fdpass::MAX_FDS || bytes + len > CHUNK_BYTES) {
            out.push(&sockets[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < sockets.len() {
        out.push(&sockets[start..]);
    }
    out
}

/// See [`chunks`]; a single description may be longer (it goes alone).
const CHUNK_BYTES: usize = 64 * 1024;

fn json(v: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data serializes")
}

// ---- the new process ----

/// What the new process got from the old one.
pub struct Taken {
    /// The old process.
    pub from: u32,
    /// The bindings' sockets, for the server to take.
    pub inherited: Arc<Inherited>,
    control: Option<(PathBuf, OwnedFd)>,
    metrics: Option<(SocketAddr, OwnedFd)>,
    /// The connection to the old process, for `ready`; `None` when the
    /// sockets came from systemd's fd store.
    link: Option<Socket>,
    /// The fd store's names of what came from it, removed from it once
    /// this process serves (it keeps nothing while nsproxy runs).
    stored: Vec<String>,
}

/// Fetches the listening sockets of the nsproxy whose control socket is
/// `control`. `Ok(None)`: no nsproxy runs there (no socket, or a stale one).
pub async fn take(control: &Path) -> Result<Option<Taken>, TakeoverError> {
    let offer = match crate::control::takeover(control).await {
        Ok(o) => o,
        Err(ControlError::NotRunning(_) | ControlError::Stale(_)) => return Ok(None),
        Err(ControlError::Refused { status: 404, .. }) => return Err(TakeoverError::NotOffered),
        Err(e) => return Err(e.into()),
    };
    let io = |source| TakeoverError::Io {
        socket: offer.socket.clone(),
        source,
    };
    let name = offer.socket.strip_prefix('@').unwrap_or(&offer.socket);
    let link = Socket::new(Domain::UNIX, Type::SEQPACKET.cloexec(), None).map_err(io)?;
    link.connect(&SockAddr::unix(format!("\0{name}")).map_err(io)?)
        .map_err(io)?;
    link.set_read_timeout(Some(HANDOVER_TIMEOUT)).map_err(io)?;
    // Blocking reads, on the thread starting the daemon: nothing else is
    // served yet.
    let pid = offer.pid;
    let bad = |what: String| TakeoverError::Protocol { pid, what };
    let mut buf = vec![0u8; MAX_MESSAGE];
    let r = fdpass::recv(link.as_fd(), &mut buf, 0, false).map_err(io)?;
    let header: Header = serde_json::from_slice(&buf[..r.len])
        .map_err(|e| bad(format!("a header that does not parse: {e}")))?;
    let mut handed = Vec::with_capacity(header.sockets);
    while handed.len() < header.sockets {
        let r = fdpass::recv(link.as_fd(), &mut buf, fdpass::MAX_FDS, false).map_err(io)?;
        if r.len == 0 {
            return Err(bad(format!(
                "{} of {} sockets, then closed",
                handed.len(),
                header.sockets
            )));
        }
        let described: Vec<Handed> = serde_json::from_slice(&buf[..r.len])
            .map_err(|e| bad(format!("a description that does not parse: {e}")))?;
        if r.truncated || r.ctrunc || described.len() != r.fds.len() {
            return Err(bad(format!(
                "{} fds for {} sockets (out of fds? see ulimit -n)",
                r.fds.len(),
                described.len()
            )));
        }
        handed.extend(described.into_iter().zip(r.fds));
    }
    info!(
        pid,
        "took {} socket(s) over from nsproxy {} (pid {pid})",
        handed.len(),
        header.version
    );
    let (mut control, mut metrics, mut bindings) = (None, None, Vec::new());
    for (h, fd) in handed {
        match h {
            Handed::Control { path } => control = Some((path, fd)),
            Handed::Metrics { local } => metrics = Some((local, fd)),
            b => bindings.push((b, fd)),
        }
    }
    Ok(Some(Taken {
        from: pid,
        inherited: Arc::new(Inherited::new(bindings)),
        control,
        metrics,
        link: Some(link),
        stored: Vec::new(),
    }))
}

/// What systemd's fd store gave this process at start (`LISTEN_FDS`, see
/// [`crate::systemd::claim_listen_fds`]), if anything: the sockets a
/// previous nsproxy of this service stored as it stopped ([`store`]).
pub fn from_fd_store(passed: Vec<(String, OwnedFd)>) -> Option<Taken> {
    if passed.is_empty() {
        return None;
    }
    let stored = passed.iter().map(|(n, _)| n.clone()).collect();
    let (mut metrics, mut bindings, mut unknown) = (None, Vec::new(), Vec::new());
    for (name, fd) in passed {
        match parse_fd_name(&name) {
            Some(Handed::Metrics { local }) => metrics = Some((local, fd)),
            Some(b @ Handed::Binding { .. }) => bindings.push((b, fd)),
            _ => unknown.push(name),
        }
    }
    if !unknown.is_empty() {
        warn!(
            "systemd passed fds nsproxy does not know, closed: {}",
            unknown.join(", ")
        );
    }
    info!(
        "took {} socket(s) over from systemd's fd store",
        bindings.len() + usize::from(metrics.is_some())
    );
    Some(Taken {
        from: 0,
        inherited: Arc::new(Inherited::new(bindings)),
        control: None,
        metrics,
        link: None,
        stored,
    })
}

/// Before this process stops under systemd with an fd store
/// (`FileDescriptorStoreMax=`): its listening sockets (and metrics
/// listener) go to the store, so that they stay open, clients queuing in
/// their backlogs, until the next nsproxy of the service takes them
/// ([`from_fd_store`]). Returns how many were stored.
pub async fn store(
    sockets: &crate::lifecycle::Handover,
    metrics: Option<(SocketAddr, std::os::fd::BorrowedFd<'_>)>,
    max: usize,
) -> io::Result<usize> {
    let listening = sockets.listening().await;
    let mut named: Vec<(String, std::os::fd::BorrowedFd<'_>)> = listening
        .iter()
        .filter_map(|(h, fd)| Some((fd_name(h)?, fd.as_fd())))
        .collect();
    if let Some((local, fd)) = metrics {
        named.push((fd_name(&Handed::Metrics { local }).expect("named"), fd));
    }
    if named.len() > max {
        warn!(
            "{} listening sockets, and systemd's fd store keeps at most {max} (FileDescriptorStoreMax=): only the first {max} stay open across the restart",
            named.len()
        );
        named.truncate(max);
    }
    crate::systemd::store_fds(&named)
}

/// The fd store's name of a handed socket (`FDNAME=`: at most 255
/// characters, no `:`): `b_PROTOCOL_NSDEV_NSINO_IP_PORT` with the rule's
/// listen address (an IPv6 address's `:` as `-`), or `metrics_IP_PORT`.
/// The control socket is not stored: `RuntimeDirectory=` removes its file
/// when the service stops.
pub fn fd_name(h: &Handed) -> Option<String> {
    let addr = |a: &SocketAddr| format!("{}_{}", a.ip().to_string().replace(':', "-"), a.port());
    match h {
        Handed::Binding {
            protocol,
            ns_dev,
            ns_ino,
            listen,
            ..
        } => Some(format!("b_{protocol}_{ns_dev}_{ns_ino}_{}", addr(listen))),
        Handed::Metrics { local } => Some(format!("metrics_{}", addr(local))),
        Handed::Control { .. } => None,
    }
}

/// The socket an fd store name describes ([`fd_name`]).
pub fn parse_fd_name(name: &str) -> Option<Handed> {
    let parts: Vec<&str> = name.split('_').collect();
    let addr = |ip: &str, port: &str| -> Option<SocketAddr> {
        Some(SocketAddr::new(
            ip.replace('-', ":").parse().ok()?,
            port.parse().ok()?,
        ))
    };
    match parts.as_slice() {
        ["b", protocol, dev, ino, ip, port] => {
            let listen = addr(ip, port)?;
            Some(Handed::Binding {
                rule: String::new(),
                netns: format!("namespace {dev}:{ino}"),
                ns_dev: dev.parse().ok()?,
                ns_ino: ino.parse().ok()?,
                protocol: (*protocol).to_owned(),
                listen,
                local: listen,
            })
        }
        ["metrics", ip, port] => Some(Handed::Metrics {
            local: addr(ip, port)?,
        }),
        _ => None,
    }
}

impl Taken {
    /// The old control listener, if it is the one at `path`.
    pub fn control_listener(&mut self, path: &Path) -> Option<tokio::net::UnixListener> {
        let (at, _) = self.control.as_ref()?;
        if at != path {
            return None;
        }
        let (_, fd) = self.control.take()?;
        let l = std::os::unix::net::UnixListener::from(fd);
        l.set_nonblocking(true).ok()?;
        tokio::net::UnixListener::from_std(l).ok()
    }

    /// The old metrics listener, if it is bound to `addr` (any port of
    /// its address when `addr`'s port is 0).
    pub fn metrics_listener(&mut self, addr: SocketAddr) -> Option<tokio::net::TcpListener> {
        let local = self.metrics.as_ref()?.0;
        if local != addr && (addr.port() != 0 || local.ip() != addr.ip()) {
            return None;
        }
        let (_, fd) = self.metrics.take()?;
        let l = std::net::TcpListener::from(fd);
        l.set_nonblocking(true).ok()?;
        tokio::net::TcpListener::from_std(l).ok()
    }

    /// Tells the old process this one serves: it stops accepting, drains
    /// and exits (with the fd store: empties the store). The sockets no
    /// binding took are closed first.
    pub fn ready(self) -> io::Result<()> {
        let (adopted, left) = self.inherited.finish();
        for what in &left {
            info!(
                "not in this config, closed: {what} (the old process's copy closes when it exits)"
            );
        }
        let Some(link) = &self.link else {
            info!(
                adopted,
                closed = left.len(),
                "serving {adopted} listening socket(s) taken over from systemd's fd store; emptying it"
            );
            return crate::systemd::remove_fds(self.stored.iter().map(String::as_str));
        };
        info!(
            from = self.from,
            adopted,
            closed = left.len(),
            "serving {adopted} listening socket(s) taken over from pid {}; telling it to drain and exit",
            self.from
        );
        fdpass::send(link.as_fd(), b"ready", &[], false).map(drop)
    }
}

/// Where a handed socket may be used: the protocol, namespace and listen
/// address of the binding.
type Key = (Protocol, NsId, SocketAddr);

/// The bindings' sockets handed over, until bindings take them.
pub struct Inherited {
    sockets: Mutex<HashMap<Key, (Handed, OwnedFd)>>,
    /// Descriptions not understood (a protocol this version does not know).
    unknown: Mutex<Vec<String>>,
    /// Each namespace's cookie (`None`: the kernel has no SO_NETNS_COOKIE).
    cookies: tokio::sync::Mutex<HashMap<NsId, Option<u64>>>,
    adopted: AtomicUsize,
}

impl std::fmt::Debug for Inherited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inherited")
            .field("adopted", &self.adopted.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Inherited {
    fn new(handed: Vec<(Handed, OwnedFd)>) -> Inherited {
        let (mut sockets, mut unknown) = (HashMap::new(), Vec::new());
        for (h, fd) in handed {
            let Handed::Binding {
                protocol,
                ns_dev,
                ns_ino,
                listen,
                ..
            } = &h
            else {
                continue;
            };
            let protocol = match protocol.as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "sctp" => Protocol::Sctp,
                _ => {
                    unknown.push(h.to_string());
                    continue;
                }
            };
            let ns = NsId {
                dev: *ns_dev,
                ino: *ns_ino,
            };
            sockets.insert((protocol, ns, *listen), (h, fd));
        }
        Inherited {
            sockets: Mutex::new(sockets),
            unknown: Mutex::new(unknown),
            cookies: tokio::sync::Mutex::default(),
            adopted: AtomicUsize::new(0),
        }
    }

    /// The handed socket for `b`, checked, if there is one: `Some(Err)`
    /// says why it was refused (it is closed).
    pub(crate) async fn take(&self, b: &Binding) -> Option<Result<Listener, String>> {
        let key = (b.rule.protocol, b.ns, b.rule.listen);
        let (handed, fd) = lock(&self.sockets).remove(&key)?;
        let adopted = match self.cookie(b).await {
            Ok(cookie) => Listener::adopt(b, fd, cookie),
            Err(e) => Err(e),
        };
        Some(match adopted {
            Ok(l) => {
                self.adopted.fetch_add(1, Ordering::Relaxed);
                Ok(l)
            }
            Err(why) => Err(format!("the old process's {handed}: {why}")),
        })
    }

    /// The cookie of `b`'s namespace, from a socket made there.
    async fn cookie(&self, b: &Binding) -> Result<Option<u64>, String> {
        let mut cookies = self.cookies.lock().await;
        if let Some(c) = cookies.get(&b.ns) {
            return Ok(*c);
        }
        let addr = b.rule.listen;
        let spec = match b.rule.protocol {
            Protocol::Tcp => SocketSpec::tcp(&addr),
            Protocol::Udp => SocketSpec::udp(&addr),
            Protocol::Sctp => SocketSpec::sctp(&addr),
        };
        let probe = b
            .sockets
            .socket(b.ns, spec)
            .await
            .map_err(|e| format!("cannot check its namespace: {e}"))?;
        let cookie = match fdpass::netns_cookie(probe.as_fd()) {
            Ok(c) => Some(c),
            // Before Linux 5.14: the namespace is the one the old process
            // says (it is root or the user who started nsproxy).
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => None,
            Err(e) => return Err(format!("cannot read its namespace's cookie: {e}")),
        };
        cookies.insert(b.ns, cookie);
        Ok(cookie)
    }

    /// How many sockets bindings took, and what was left (now closed).
    pub fn finish(&self) -> (usize, Vec<String>) {
        let left = std::mem::take(&mut *lock(&self.sockets));
        let mut out: Vec<String> = left.values().map(|(h, _)| h.to_string()).collect();
        out.append(&mut lock(&self.unknown));
        out.sort();
        (self.adopted.load(Ordering::Relaxed), out)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_reads_back_as_written() {
        let h = Handed::Binding {
            rule: "web".into(),
            netns: "ns1".into(),
            ns_dev: 4,
            ns_ino: 4026532000,
            protocol: "tcp".into(),
            listen: "127.0.0.1:80".parse().unwrap(),
            local: "127.0.0.1:80".parse().unwrap(),
        };
        let text = serde_json::to_string(&[&h]).unwrap();
        assert!(text.contains("\"kind\":\"binding\""), "{text}");
        let back: Vec<Handed> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, std::slice::from_ref(&h));
        assert_eq!(h.to_string(), "rule \"web\" in \"ns1\" (tcp 127.0.0.1:80)");
    }

    #[test]
    fn an_fd_store_name_reads_back_as_the_socket_it_names() {
        for listen in ["127.0.0.1:80", "[::]:8000", "[fe80::1]:0"] {
            let h = Handed::Binding {
                rule: "web".into(),
                netns: "ns1".into(),
                ns_dev: 4,
                ns_ino: 4026532000,
                protocol: "udp".into(),
                listen: listen.parse().unwrap(),
                local: listen.parse().unwrap(),
            };
            let name = fd_name(&h).unwrap();
            assert!(!name.contains(':') && name.len() <= 255, "{name}");
            let Some(Handed::Binding {
                protocol,
                ns_dev,
                ns_ino,
                listen: back,
                ..
            }) = parse_fd_name(&name)
            else {
                panic!("{name} does not parse");
            };
            assert_eq!((protocol.as_str(), ns_dev, ns_ino), ("udp", 4, 4026532000));
            assert_eq!(back, listen.parse().unwrap());
        }
        let m = Handed::Metrics {
            local: "127.0.0.1:9100".parse().unwrap(),
        };
        assert_eq!(fd_name(&m).unwrap(), "metrics_127.0.0.1_9100");
        assert_eq!(parse_fd_name("metrics_127.0.0.1_9100"), Some(m));
        let c = Handed::Control {
            path: "/run/x".into(),
        };
        assert_eq!(fd_name(&c), None);
        assert_eq!(parse_fd_name("stored"), None);
        assert_eq!(parse_fd_name("b_tcp_1_2_notanip_80"), None);
    }

    #[test]
    fn messages_hold_at_most_64_fds_and_a_bounded_text() {
        let handed = |rule: String| {
            let (a, _) = fdpass::seqpacket_pair().unwrap();
            let h = Handed::Binding {
                rule,
                netns: "n".into(),
                ns_dev: 1,
                ns_ino: 2,
                protocol: "tcp".into(),
                listen: "127.0.0.1:1".parse().unwrap(),
                local: "127.0.0.1:1".parse().unwrap(),
            };
            (h, a)
        };
        let short: Vec<_> = (0..130).map(|i| handed(format!("r{i}"))).collect();
        let sizes: Vec<usize> = chunks(&short).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [64, 64, 2]);
        let long: Vec<_> = (0..10).map(|_| handed("x".repeat(20_000))).collect();
        let sizes: Vec<usize> = chunks(&long).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, [3, 3, 3, 1]);
        assert!(chunks(&[]).is_empty());
    }

    #[test]
    fn sockets_no_binding_took_are_reported_and_closed() {
        let (a, b) = fdpass::seqpacket_pair().unwrap();
        let binding = |protocol: &str| Handed::Binding {
            rule: "r".into(),
            netns: "n".into(),
            ns_dev: 1,
            ns_ino: 2,
            protocol: protocol.into(),
            listen: "127.0.0.1:1".parse().unwrap(),
            local: "127.0.0.1:1".parse().unwrap(),
        };
        let pool = Inherited::new(vec![(binding("udp"), a), (binding("quic"), b)]);
        let (adopted, left) = pool.finish();
        assert_eq!(adopted, 0);
        assert_eq!(
            left,
            [
                "rule \"r\" in \"n\" (quic 127.0.0.1:1)",
                "rule \"r\" in \"n\" (udp 127.0.0.1:1)"
            ]
        );
        assert!(pool.finish().1.is_empty());
    }
}
