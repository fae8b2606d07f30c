//! The seam sockets come through.
//!
//! The relays and the lifecycle never name the [`Switcher`]: they ask a
//! [`SocketFactory`] for namespaces and sockets. The switcher is the one
//! implementation the daemon uses; a broker that makes sockets in another
//! process can be another, and unit tests use a fake that needs no root and
//! can fail (or panic) on purpose, without any test code on these paths.
//!
//! A namespace's fd stays open while a [`Lease`] on it is held: a binding
//! holds one on the namespace it connects from, so that the fd goes when the
//! last binding that needs it goes, whichever thread drops it, and the
//! kernel can free a deleted namespace.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use super::{NsError, NsId, NsRef, Socket, SocketSpec, Switcher};

/// A socket on its way, or already made: the request is already queued
/// when this is returned (see [`Switcher::socket`]), so many asked for
/// before awaiting any share the namespace thread's switches.
///
/// A concrete type rather than a boxed future because it is asked for once
/// per connection: a socket of nsproxy's own namespace, or one from a pool,
/// is there at once and costs no allocation; one queued for another thread
/// (or process) waits on a channel.
#[must_use = "a socket's request is made; await it or drop the socket"]
pub struct SocketFuture(Pending);

enum Pending {
    Made(Option<Result<Socket, NsError>>),
    Queued(oneshot::Receiver<Result<Socket, NsError>>),
    Other(Pin<Box<dyn Future<Output = Result<Socket, NsError>> + Send + 'static>>),
}

impl SocketFuture {
    /// A socket already made (or the error making it).
    pub fn made(r: Result<Socket, NsError>) -> SocketFuture {
        SocketFuture(Pending::Made(Some(r)))
    }

    /// A socket another thread will send; its end dropped unsent reads as
    /// [`NsError::Stopped`].
    pub fn queued(rx: oneshot::Receiver<Result<Socket, NsError>>) -> SocketFuture {
        SocketFuture(Pending::Queued(rx))
    }

    /// Any other way of getting one (boxed).
    pub fn other(
        f: impl Future<Output = Result<Socket, NsError>> + Send + 'static,
    ) -> SocketFuture {
        SocketFuture(Pending::Other(Box::pin(f)))
    }
}

impl Future for SocketFuture {
    type Output = Result<Socket, NsError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every variant is Unpin (a boxed future is pinned in its box).
        match &mut self.get_mut().0 {
            Pending::Made(r) => {
                Poll::Ready(r.take().expect("a SocketFuture polled after it completed"))
            }
            Pending::Queued(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(NsError::Stopped))),
            Pending::Other(f) => f.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for SocketFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.0 {
            Pending::Made(_) => "made",
            Pending::Queued(_) => "queued",
            Pending::Other(_) => "other",
        };
        f.debug_tuple("SocketFuture").field(&state).finish()
    }
}

/// Resolutions on their way, in the order of the references asked for.
pub type ResolveFuture<'a> = Pin<Box<dyn Future<Output = Vec<Result<NsId, NsError>>> + Send + 'a>>;

/// Where namespaces are resolved and sockets are made in them.
pub trait SocketFactory: Send + Sync + fmt::Debug {
    /// The namespace nsproxy started in (`host`).
    fn home(&self) -> NsId;
    /// Resolves references and keeps each namespace's fd open until
    /// [`SocketFactory::release`]; see [`Switcher::resolve_many`].
    fn resolve_many<'a>(&'a self, references: &'a [NsRef]) -> ResolveFuture<'a>;
    /// A new socket in `ns` (resolved earlier); see [`Switcher::socket`].
    fn socket(&self, ns: NsId, spec: SocketSpec) -> SocketFuture;
    /// [`SocketFactory::socket`] for each of `asks`. One at a time unless
    /// an implementation batches them ([`Switcher::sockets`] does: one
    /// wake-up of the namespace thread, few broker messages).
    fn sockets(&self, asks: &[(NsId, SocketSpec)]) -> Vec<SocketFuture> {
        asks.iter()
            .map(|&(ns, spec)| self.socket(ns, spec))
            .collect()
    }
    /// A socket made ahead of time in `ns`, for upstream connections; see
    /// [`Switcher::pooled_socket`].
    fn pooled_socket(&self, ns: NsId, spec: SocketSpec) -> SocketFuture;
    /// Like [`SocketFactory::socket`], for callers outside a runtime.
    fn socket_blocking(&self, ns: NsId, spec: SocketSpec) -> Result<Socket, NsError>;
    /// Closes the fd of `ns`; callers use [`Leases`] rather than this.
    fn release(&self, ns: NsId);
    /// The text of the config file at `path`, for a reload. Split, the
    /// socket broker reads it (and updates its policy from it), as the relay
    /// may not; by default, it is read here.
    fn read_config<'a>(&'a self, path: &'a Path) -> ConfigFuture<'a> {
        Box::pin(async move { crate::config::read_text(path) })
    }
    /// The socket broker sockets come from, when they come from another
    /// process (for status and metrics); `None` by default.
    fn broker(&self) -> Option<crate::status::BrokerReport> {
        None
    }
    /// Binds `socket` to `addrs` where this process may not (a port below
    /// 1024 without CAP_NET_BIND_SERVICE): split, the socket broker does.
    /// By default: `PermissionDenied`.
    fn bind_privileged<'a>(
        &'a self,
        socket: &'a Socket,
        addrs: &'a [SocketAddr],
    ) -> BindFuture<'a> {
        let _ = (socket, addrs);
        Box::pin(async {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "this process may not bind ports below 1024",
            ))
        })
    }
}

/// A config file's text on its way ([`SocketFactory::read_config`]).
pub type ConfigFuture<'a> =
    Pin<Box<dyn Future<Output = Result<String, crate::config::ConfigError>> + Send + 'a>>;

/// A bind on its way ([`SocketFactory::bind_privileged`]).
pub type BindFuture<'a> = Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;

impl SocketFactory for Switcher {
    fn home(&self) -> NsId {
        Switcher::home(self)
    }

    fn resolve_many<'a>(&'a self, references: &'a [NsRef]) -> ResolveFuture<'a> {
        Box::pin(Switcher::resolve_many(self, references))
    }

    fn socket(&self, ns: NsId, spec: SocketSpec) -> SocketFuture {
        Switcher::socket(self, ns, spec)
    }

    fn sockets(&self, asks: &[(NsId, SocketSpec)]) -> Vec<SocketFuture> {
        Switcher::sockets(self, asks)
    }

    fn pooled_socket(&self, ns: NsId, spec: SocketSpec) -> SocketFuture {
        Switcher::pooled_socket(self, ns, spec)
    }

    fn socket_blocking(&self, ns: NsId, spec: SocketSpec) -> Result<Socket, NsError> {
        Switcher::socket_blocking(self, ns, spec)
    }

    fn release(&self, ns: NsId) {
        Switcher::release(self, ns);
    }

    fn read_config<'a>(&'a self, path: &'a Path) -> ConfigFuture<'a> {
        Box::pin(async move {
            match self.read_config_remote().await {
                None => crate::config::read_text(path),
                Some(r) => r.map_err(|source| crate::config::ConfigError::Read {
                    path: path.to_owned(),
                    source,
                }),
            }
        })
    }

    fn bind_privileged<'a>(
        &'a self,
        socket: &'a Socket,
        addrs: &'a [SocketAddr],
    ) -> BindFuture<'a> {
        Box::pin(Switcher::bind_privileged(self, socket, addrs))
    }

    fn broker(&self) -> Option<crate::status::BrokerReport> {
        Switcher::broker(self).map(|link| crate::status::BrokerReport {
            pid: link.pid(),
            alive: !link.is_gone(),
        })
    }
}

impl From<Switcher> for Arc<dyn SocketFactory> {
    fn from(s: Switcher) -> Self {
        Arc::new(s)
    }
}

/// Counts the holders of each namespace of one factory and releases a
/// namespace's fd when its last [`Lease`] is dropped.
#[derive(Clone)]
pub struct Leases {
    registry: Arc<Registry>,
}

struct Registry {
    sockets: Arc<dyn SocketFactory>,
    state: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    held: HashMap<NsId, usize>,
    /// Namespaces released since the last [`Leases::mark`]: a resolution
    /// made before such a release may have been undone by it.
    released: HashSet<NsId>,
}

/// Keeps a namespace's fd open in its factory while held. Clones share one
/// hold; the last one dropped gives it back.
#[derive(Clone)]
pub struct Lease(Arc<Held>);

struct Held {
    ns: NsId,
    registry: Arc<Registry>,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Lease").field(&self.0.ns).finish()
    }
}

impl fmt::Debug for Leases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leases").finish_non_exhaustive()
    }
}

impl Lease {
    /// The namespace held open.
    pub fn ns(&self) -> NsId {
        self.0.ns
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let r = &self.registry;
        let mut counts = r.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(n) = counts.held.get_mut(&self.ns) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            counts.held.remove(&self.ns);
            counts.released.insert(self.ns);
            // Under the lock, so that a lease taken after this sees the
            // release (see `Leases::acquire`).
            r.sockets.release(self.ns);
        }
    }
}

impl Leases {
    /// Leases over the namespaces of `sockets`.
    pub fn new(sockets: Arc<dyn SocketFactory>) -> Leases {
        Leases {
            registry: Arc::new(Registry {
                sockets,
                state: Mutex::default(),
            }),
        }
    }

    /// Starts a window for [`Leases::acquire`]'s staleness answer: call it
    /// before resolving the namespaces to lease. One caller at a time.
    pub fn mark(&self) {
        self.counts().released.clear();
    }

    /// Holds `ns` open. Also says whether the lease is the first one and
    /// `ns` was released since [`Leases::mark`]: then the resolution that
    /// gave `ns` may have been undone by that release (a binding's last
    /// holder can go on any thread at any time), and the caller resolves
    /// again, now that the lease keeps it.
    pub fn acquire(&self, ns: NsId) -> (Lease, bool) {
        let mut counts = self.counts();
        let n = counts.held.entry(ns).or_default();
        *n += 1;
        let stale = *n == 1 && counts.released.contains(&ns);
        drop(counts);
        let held = Held {
            ns,
            registry: self.registry.clone(),
        };
        (Lease(Arc::new(held)), stale)
    }

    /// How many leases hold `ns` (0: released).
    pub fn holders(&self, ns: NsId) -> usize {
        self.counts().held.get(&ns).copied().unwrap_or(0)
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.registry
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts releases; makes no socket.
    #[derive(Debug, Default)]
    struct Releases(Mutex<Vec<NsId>>);

    impl SocketFactory for Releases {
        fn home(&self) -> NsId {
            NsId { dev: 0, ino: 0 }
        }
        fn resolve_many<'a>(&'a self, _: &'a [NsRef]) -> ResolveFuture<'a> {
            Box::pin(async { Vec::new() })
        }
        fn socket(&self, _: NsId, _: SocketSpec) -> SocketFuture {
            SocketFuture::made(Err(NsError::Stopped))
        }
        fn pooled_socket(&self, _: NsId, _: SocketSpec) -> SocketFuture {
            SocketFuture::made(Err(NsError::Stopped))
        }
        fn socket_blocking(&self, _: NsId, _: SocketSpec) -> Result<Socket, NsError> {
            Err(NsError::Stopped)
        }
        fn release(&self, ns: NsId) {
            self.0.lock().unwrap().push(ns);
        }
    }

    #[test]
    fn the_last_lease_gives_the_namespace_back_and_a_later_first_one_is_stale() {
        let f = Arc::new(Releases::default());
        let leases = Leases::new(f.clone());
        let ns = NsId { dev: 1, ino: 5 };
        leases.mark();
        let (a, stale_a) = leases.acquire(ns);
        let (b, stale_b) = leases.acquire(ns);
        assert!(!stale_a && !stale_b);
        let a2 = a.clone();
        drop(a);
        drop(b);
        assert!(f.0.lock().unwrap().is_empty(), "a clone still holds it");
        assert_eq!(leases.holders(ns), 1);
        drop(a2);
        assert_eq!(*f.0.lock().unwrap(), [ns]);
        assert_eq!(leases.holders(ns), 0);
        // Released since the mark: a resolution made before may be undone.
        let (_c, stale) = leases.acquire(ns);
        assert!(stale);
        leases.mark();
        let (_d, stale) = leases.acquire(ns);
        assert!(!stale);
    }
}
