//! Network namespaces: naming them, identifying them, and creating sockets
//! inside them from one dedicated thread.
//!
//! A socket belongs to the network namespace its creating thread was in when
//! `socket(2)` ran, and stays there for life. So nsproxy never moves a
//! worker thread: it asks the [`Switcher`] thread for a socket in namespace X,
//! and then binds, listens, connects and relays with that socket from any
//! thread, in the home namespace, like any other socket.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use nsproxy::netns::{NsRef, SocketSpec, Switcher};
//!
//! let switcher = Switcher::spawn()?;
//! let ns = switcher.resolve(&"ns1".parse::<NsRef>()?).await?;
//! let addr = "127.0.0.1:8000".parse()?;
//! let socket = switcher.socket(ns, SocketSpec::tcp(&addr)).await?;
//! socket.set_reuse_address(true)?;
//! socket.bind(&addr.into())?;
//! socket.listen(128)?;
//! // `socket` now listens inside ns1; hand it to tokio with TcpListener::from_std.
//! # Ok(()) }
//! ```

pub mod discovery;
mod factory;
mod nsfs;
mod reference;
mod remote;
pub mod routing;
mod switcher;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

pub use factory::{
    BindFuture, ConfigFuture, Lease, Leases, ResolveFuture, SocketFactory, SocketFuture,
};
pub use reference::{NETNS_RUN_DIR, NsId, NsRef, NsRefError};
pub use remote::BrokerLink;
pub use socket2::{Domain, Protocol, Socket, Type};
pub(crate) use switcher::Thread as SwitchingThread;
use tokio::sync::oneshot;

/// What kind of socket to create: the arguments of `socket(2)`.
///
/// The socket is always created non-blocking and close-on-exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketSpec {
    pub domain: Domain,
    pub ty: Type,
    pub protocol: Option<Protocol>,
    /// Made with `IP_TRANSPARENT` (`IPV6_TRANSPARENT`) set, so that it may
    /// bind a client's address (`upstream_source = "client"`). Set where the
    /// socket is made, as it needs CAP_NET_ADMIN: split, by the broker.
    pub transparent: bool,
}

impl SocketSpec {
    /// A TCP socket of the family of `addr`.
    pub fn tcp(addr: &SocketAddr) -> Self {
        SocketSpec {
            domain: Domain::for_address(*addr),
            ty: Type::STREAM,
            protocol: Some(Protocol::TCP),
            transparent: false,
        }
    }

    /// A UDP socket of the family of `addr`.
    pub fn udp(addr: &SocketAddr) -> Self {
        SocketSpec {
            domain: Domain::for_address(*addr),
            ty: Type::DGRAM,
            protocol: Some(Protocol::UDP),
            transparent: false,
        }
    }

    /// The same kind of socket, made with `IP_TRANSPARENT` (see
    /// [`SocketSpec::transparent`]) when `on`.
    pub fn transparent(self, on: bool) -> Self {
        SocketSpec {
            transparent: on,
            ..self
        }
    }

    /// A one-to-one style (`SOCK_STREAM`) SCTP socket of the family of `addr`.
    /// An IPv6 one also carries IPv4 (unless `IPV6_V6ONLY` is set).
    pub fn sctp(addr: &SocketAddr) -> Self {
        SocketSpec {
            domain: Domain::for_address(*addr),
            ty: Type::STREAM,
            protocol: Some(Protocol::from(libc::IPPROTO_SCTP)),
            transparent: false,
        }
    }
}

/// Errors from resolving a namespace reference or creating a socket in one.
#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("namespace \"{reference}\" not found: {} does not exist{}", path.display(), not_found_hint(reference))]
    NotFound { reference: NsRef, path: PathBuf },
    #[error("cannot open namespace \"{reference}\" ({}): {source}{}", path.display(), crate::sys::fd_exhaustion_hint(source))]
    Open {
        reference: NsRef,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "\"{reference}\" is not a network namespace: {} is on {fs}, not nsfs (expected a name under /run/netns, /proc/PID/ns/net, or a bind mount of one)",
        path.display()
    )]
    NotNsfs {
        reference: NsRef,
        path: PathBuf,
        fs: String,
    },
    #[error(
        "\"{reference}\" is not a network namespace: {} is {kind}, not an nsfs file (refused without opening it, so that nothing waits on it)",
        path.display()
    )]
    NotAFile {
        reference: NsRef,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("\"{reference}\" is a {kind} namespace ({}), not a network namespace", path.display())]
    WrongKind {
        reference: NsRef,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("cannot enter namespace \"{reference}\" ({}): {source}{}", path.display(), enter_hint(source))]
    CannotEnter {
        reference: NsRef,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot enter namespace {ns}: {source}{}", enter_hint(source))]
    Enter { ns: NsId, source: io::Error },
    #[error(
        "cannot create a socket in namespace {ns}: {source}{}",
        crate::sys::fd_exhaustion_hint(source)
    )]
    Socket { ns: NsId, source: io::Error },
    /// `IP_TRANSPARENT` refused (`upstream_source = "client"`).
    #[error(
        "cannot set IP_TRANSPARENT on an upstream socket in namespace {ns}: {source}{}",
        transparent_hint(source)
    )]
    Transparent { ns: NsId, source: io::Error },
    #[error("\"{reference}\" is a pattern over namespace files, not one namespace")]
    Pattern { reference: NsRef },
    #[error("namespace {ns} is not open (resolve a reference to it first)")]
    NotOpen { ns: NsId },
    #[error("the namespace thread has stopped")]
    Stopped,
    /// The socket broker (a process of its own, when nsproxy runs split)
    /// refused the request: its policy allows only what the config uses.
    #[error("the socket broker refused: {reason}")]
    Refused { reason: String },
    #[error("the socket broker (pid {pid}) is gone: no new socket can be made")]
    BrokerGone { pid: u32 },
}

/// `socket(2)` on the calling thread, with the flags every nsproxy socket gets.
pub(crate) fn socket_here(ns: NsId, spec: SocketSpec) -> Result<Socket, NsError> {
    // socket2 adds SOCK_CLOEXEC itself.
    let socket = Socket::new(spec.domain, spec.ty.nonblocking(), spec.protocol)
        .map_err(|source| NsError::Socket { ns, source })?;
    if spec.transparent {
        use std::os::fd::AsFd;
        crate::sys::set_transparent(socket.as_fd(), spec.domain == Domain::IPV6)
            .map_err(|source| NsError::Transparent { ns, source })?;
    }
    Ok(socket)
}

fn transparent_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EPERM) {
        " (upstream_source = \"client\" needs CAP_NET_ADMIN over the user namespace that owns the upstream namespace; split, the socket broker keeps it only when the config it started with has such a rule: restart nsproxy after adding the first one)"
    } else {
        ""
    }
}

fn not_found_hint(r: &NsRef) -> String {
    match r {
        NsRef::Named(n) => format!(" (create it with `ip netns add {n}`)"),
        NsRef::Pid(p) => format!(" (is process {p} running?)"),
        _ => String::new(),
    }
}

fn enter_hint(e: &io::Error) -> &'static str {
    if e.raw_os_error() == Some(libc::EPERM) {
        " (entering a network namespace needs CAP_SYS_ADMIN, over the user namespace that owns it: run nsproxy as root or grant it that capability; bindings that listen or connect there are not served)"
    } else {
        ""
    }
}

/// A handle to the namespace-switching thread. Cheap to clone; the thread
/// exits when the last handle is dropped.
#[derive(Clone, Debug)]
pub struct Switcher {
    tx: mpsc::Sender<switcher::Request>,
    home: NsId,
    /// Sockets made ahead of need for [`Switcher::pooled_socket`].
    pool: Arc<Pool>,
    /// Set when requests go to a socket broker ([`Switcher::remote`]).
    remote: Option<Remote>,
}

/// What a remote switcher has besides the channel. Shared by the clones
/// of one switcher; declared after `tx`, so that when the last clone goes
/// the channel is closed before [`RemoteWake`]'s drop wakes the thread to
/// see it.
#[derive(Clone, Debug)]
struct Remote {
    wake: Arc<RemoteWake>,
    link: BrokerLink,
}

/// Wakes the forwarding thread, which also waits on the broker's socket.
#[derive(Debug)]
struct RemoteWake(Arc<remote::Wake>);

impl Drop for RemoteWake {
    fn drop(&mut self) {
        self.0.force();
    }
}

/// Upstream sockets created ahead of time, per (namespace, kind of socket),
/// so that accepting a connection never waits behind the namespace thread.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    slots: Mutex<HashMap<PoolKey, Slot>>,
}

/// (namespace, domain, type, protocol, transparent)
type PoolKey = (NsId, i32, i32, i32, bool);

#[derive(Debug, Default)]
pub(crate) struct Slot {
    ready: Vec<Socket>,
    /// A refill request is on its way to the namespace thread.
    refilling: bool,
}

/// A slot is refilled up to `POOL_TARGET` sockets once it holds fewer than
/// `POOL_LOW`: one switch into the namespace then pays for many sockets.
const POOL_TARGET: usize = 32;
const POOL_LOW: usize = 8;

fn pool_key(ns: NsId, spec: &SocketSpec) -> PoolKey {
    (
        ns,
        i32::from(spec.domain),
        i32::from(spec.ty),
        spec.protocol.map_or(0, i32::from),
        spec.transparent,
    )
}

impl Pool {
    /// Called by the namespace thread with the sockets of a refill.
    pub(crate) fn refilled(&self, ns: NsId, spec: &SocketSpec, made: Vec<Socket>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // A slot removed by `release` meanwhile: the sockets are dropped.
        if let Some(slot) = slots.get_mut(&pool_key(ns, spec)) {
            slot.ready.extend(made);
            slot.refilling = false;
        }
    }
}

/// Pre-created upstream sockets unless `NSPROXY_UPSTREAM_POOL=0` (for
/// measuring the difference).
fn pool_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("NSPROXY_UPSTREAM_POOL").as_deref(),
            Ok("0" | "off" | "false")
        )
    })
}

impl Switcher {
    /// Starts the thread. Its home namespace is the calling thread's current
    /// namespace; call this before anything else could have moved the thread.
    pub fn spawn() -> io::Result<Self> {
        let (tx, home) = switcher::spawn()?;
        Ok(Switcher {
            tx,
            home,
            pool: Arc::default(),
            remote: None,
        })
    }

    /// A switcher whose sockets come from the socket broker at the other end
    /// of `fd` (process `broker_pid`, see [`crate::broker::spawn`]) instead
    /// of a namespace thread: its thread (named like the namespace thread)
    /// forwards the same requests over the socket, so that this process
    /// never calls `setns` and needs no privileges. Its home is the calling
    /// thread's namespace (which is the broker's too): call this before
    /// dropping privileges, as it opens `/proc/thread-self/ns/net`.
    ///
    /// When the broker goes, every request fails with
    /// [`NsError::BrokerGone`], and [`Switcher::broker`] tells.
    pub fn remote(fd: std::os::fd::OwnedFd, broker_pid: u32) -> io::Result<Self> {
        let (_, home) = switcher::own_namespace()?;
        let (tx, wake, link) = remote::spawn(fd, broker_pid)?;
        Ok(Switcher {
            tx,
            home,
            pool: Arc::default(),
            remote: Some(Remote {
                wake: Arc::new(RemoteWake(wake)),
                link,
            }),
        })
    }

    /// The socket broker's state, for a [`Switcher::remote`] one.
    pub fn broker(&self) -> Option<&BrokerLink> {
        self.remote.as_ref().map(|r| &r.link)
    }

    /// Binds `socket` to `addrs` through the socket broker (for ports below
    /// 1024, which a relay without privileges cannot bind). Without a
    /// broker: `PermissionDenied`.
    pub async fn bind_privileged(&self, socket: &Socket, addrs: &[SocketAddr]) -> io::Result<()> {
        if self.remote.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "no socket broker to bind a privileged port",
            ));
        }
        let (reply, rx) = oneshot::channel();
        self.send(switcher::Request::Bind {
            socket: socket.try_clone()?,
            addrs: addrs.to_vec(),
            reply,
        })
        .map_err(|e| io::Error::other(e.to_string()))?;
        rx.await
            .map_err(|_| io::Error::other(NsError::Stopped.to_string()))?
    }

    /// The config file's text, read by the socket broker (which also
    /// updates its policy from it); without a broker, `None`.
    pub async fn read_config_remote(&self) -> Option<io::Result<String>> {
        self.remote.as_ref()?;
        let (reply, rx) = oneshot::channel();
        if let Err(e) = self.send(switcher::Request::ReadConfig { reply }) {
            return Some(Err(io::Error::other(e.to_string())));
        }
        Some(
            rx.await
                .unwrap_or_else(|_| Err(io::Error::other(NsError::Stopped.to_string()))),
        )
    }

    /// The namespace nsproxy started in (`host`).
    pub fn home(&self) -> NsId {
        self.home
    }

    /// Resolves a reference to a namespace identity and keeps that namespace's
    /// fd open until [`Switcher::release`].
    ///
    /// Names are looked up again on every call: `ip netns del x; ip netns add x`
    /// makes a new namespace under the old name.
    pub async fn resolve(&self, reference: &NsRef) -> Result<NsId, NsError> {
        let (reply, rx) = oneshot::channel();
        self.send(switcher::Request::Resolve {
            reference: reference.clone(),
            reply,
        })?;
        rx.await.map_err(|_| NsError::Stopped)?
    }

    /// Resolves many references with one trip to the namespace thread: all
    /// requests are queued before any answer is awaited, so the thread serves
    /// them back to back instead of waking once per reference. Results are in
    /// the order of `references`.
    pub async fn resolve_many(&self, references: &[NsRef]) -> Vec<Result<NsId, NsError>> {
        let queued: Vec<_> = references
            .iter()
            .map(|reference| {
                let (reply, rx) = oneshot::channel();
                self.queue(switcher::Request::Resolve {
                    reference: reference.clone(),
                    reply,
                })
                .map(|()| rx)
            })
            .collect();
        self.ring();
        let mut out = Vec::with_capacity(queued.len());
        for q in queued {
            out.push(match q {
                Ok(rx) => rx.await.unwrap_or(Err(NsError::Stopped)),
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Like [`Switcher::resolve`], for callers outside an async runtime.
    pub fn resolve_blocking(&self, reference: &NsRef) -> Result<NsId, NsError> {
        let (reply, rx) = oneshot::channel();
        self.send(switcher::Request::Resolve {
            reference: reference.clone(),
            reply,
        })?;
        rx.blocking_recv().map_err(|_| NsError::Stopped)?
    }

    /// Creates a socket inside namespace `ns` (resolved earlier).
    ///
    /// A socket for the home namespace is created right here on the calling
    /// thread, without a trip to the namespace thread: every thread but that
    /// one is always home (nothing else in nsproxy calls `setns`, and a
    /// program embedding this library must not move the threads it calls
    /// from either).
    ///
    /// The request is queued when this is called, not when the future is
    /// first polled, so that many requests made before awaiting any of them
    /// reach the namespace thread together and share its switches.
    pub fn socket(&self, ns: NsId, spec: SocketSpec) -> SocketFuture {
        let (socket, queued) = self.socket_unrung(ns, spec);
        if queued {
            self.ring();
        }
        socket
    }

    /// Like [`Switcher::socket`] for each of `asks`, in order; the requests
    /// reach the namespace thread together (it is woken once, after the
    /// last), so they travel in as few messages as fit, and share its
    /// switches.
    pub fn sockets(&self, asks: &[(NsId, SocketSpec)]) -> Vec<SocketFuture> {
        let mut any = false;
        let futures = asks
            .iter()
            .map(|&(ns, spec)| {
                let (socket, queued) = self.socket_unrung(ns, spec);
                any |= queued;
                socket
            })
            .collect();
        if any {
            self.ring();
        }
        futures
    }

    /// [`Switcher::socket`] without waking the forwarding thread; whether
    /// a request was queued for it (a socket of the home namespace is made
    /// here, and needs no wake-up).
    fn socket_unrung(&self, ns: NsId, spec: SocketSpec) -> (SocketFuture, bool) {
        if self.here(ns, &spec) {
            return (SocketFuture::made(socket_here(ns, spec)), false);
        }
        let (reply, rx) = oneshot::channel();
        match self.queue(switcher::Request::Socket { ns, spec, reply }) {
            Ok(()) => (SocketFuture::queued(rx), true),
            Err(e) => (SocketFuture::made(Err(e)), false),
        }
    }

    /// Like [`Switcher::socket`], but from a pool of sockets made ahead of
    /// time in `ns`, for upstream connections: the first call for a
    /// (namespace, kind) waits for the namespace thread, later ones take a
    /// ready socket while the pool refills in the background. The pool is
    /// dropped with [`Switcher::release`], so it never keeps a namespace alive.
    pub fn pooled_socket(&self, ns: NsId, spec: SocketSpec) -> SocketFuture {
        if self.here(ns, &spec) || !pool_enabled() {
            return self.socket(ns, spec);
        }
        let ready = {
            let mut slots = self.pool.slots.lock().unwrap_or_else(|e| e.into_inner());
            let slot = slots.entry(pool_key(ns, &spec)).or_default();
            let ready = slot.ready.pop();
            if slot.ready.len() < POOL_LOW && !slot.refilling {
                let n = POOL_TARGET - slot.ready.len();
                let refill = switcher::Request::Refill {
                    ns,
                    spec,
                    n,
                    pool: self.pool.clone(),
                };
                slot.refilling = self.send(refill).is_ok();
            }
            ready
        };
        match ready {
            Some(s) => SocketFuture::made(Ok(s)),
            None => self.socket(ns, spec),
        }
    }

    /// Like [`Switcher::socket`], for callers outside an async runtime.
    pub fn socket_blocking(&self, ns: NsId, spec: SocketSpec) -> Result<Socket, NsError> {
        if self.here(ns, &spec) {
            return socket_here(ns, spec);
        }
        let (reply, rx) = oneshot::channel();
        self.send(switcher::Request::Socket { ns, spec, reply })?;
        rx.blocking_recv().map_err(|_| NsError::Stopped)?
    }

    /// Whether a socket of `spec` in `ns` is made on the calling thread: one
    /// of the home namespace, unless it needs a privilege a relay without
    /// one lacks (`IP_TRANSPARENT`), which the broker then sets.
    fn here(&self, ns: NsId, spec: &SocketSpec) -> bool {
        ns == self.home && !(spec.transparent && self.remote.is_some())
    }

    /// Closes the cached fd of `ns`, so that the kernel can free the namespace
    /// once nothing else holds it. The home namespace is never released.
    pub fn release(&self, ns: NsId) {
        self.pool
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|k, _| k.0 != ns);
        let _ = self.send(switcher::Request::Release { ns });
    }

    fn send(&self, req: switcher::Request) -> Result<(), NsError> {
        self.queue(req)?;
        self.ring();
        Ok(())
    }

    /// Queues a request without waking the thread that forwards requests
    /// to the broker: [`Switcher::ring`] does, once for many.
    fn queue(&self, req: switcher::Request) -> Result<(), NsError> {
        self.tx.send(req).map_err(|_| NsError::Stopped)
    }

    /// Wakes the forwarding thread for what was queued (the namespace
    /// thread of an unsplit process wakes on the channel itself).
    fn ring(&self) {
        if let Some(r) = &self.remote {
            r.wake.0.ring();
        }
    }
}
