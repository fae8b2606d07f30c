//! The one thread that switches network namespaces.
//!
//! Nothing else in the process calls `setns`: `.clippy.toml` forbids both
//! `libc::setns` (allowed only in its wrapper, [`crate::sys::netns`]) and
//! that wrapper (allowed only here, at its three calls). The thread is a plain OS thread started from
//! the home namespace. It owns every cached namespace fd, does
//! `setns(target)` → `socket()` → `setns(home)` synchronously for each
//! request, and hands the socket back. It never awaits, never spawns and never
//! blocks on anything but its request channel, so a switched thread never runs
//! code that assumes the home namespace.
//!
//! Requests that arrive together are served in one batch: consecutive socket
//! requests for the same namespace share one switch in, and the thread returns
//! home whenever the queue runs dry. Resolving a namespace enters it once (a
//! namespace nsproxy may not enter fails there, with its name), and opening
//! its file never blocks (see `nsfs`).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::mpsc;

use socket2::Socket;
use tokio::sync::oneshot;

use super::nsfs::{self, Problem};
use std::sync::Arc;

use super::{NsError, NsId, NsRef, Pool, SocketSpec};
use crate::sys::netns::setns_net;

pub(super) enum Request {
    Resolve {
        reference: NsRef,
        reply: oneshot::Sender<Result<NsId, NsError>>,
    },
    Socket {
        ns: NsId,
        spec: SocketSpec,
        reply: oneshot::Sender<Result<Socket, NsError>>,
    },
    Release {
        ns: NsId,
    },
    /// Make `n` sockets in `ns` for the upstream pool.
    Refill {
        ns: NsId,
        spec: SocketSpec,
        n: usize,
        pool: Arc<Pool>,
    },
    /// Bind `socket` to `addrs` (a port below 1024): only the broker can,
    /// for a relay without privileges.
    Bind {
        socket: Socket,
        addrs: Vec<SocketAddr>,
        reply: oneshot::Sender<io::Result<()>>,
    },
    /// The config file's text, read by the broker.
    ReadConfig {
        reply: oneshot::Sender<io::Result<String>>,
    },
}

/// Starts the thread; returns the home namespace's identity once the thread
/// has captured it.
pub(super) fn spawn() -> io::Result<(mpsc::Sender<Request>, NsId)> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("nsproxy-netns".into())
        .spawn(move || {
            // The thread's own namespace is home: it inherited it from the
            // thread that spawned it.
            let thread = match Thread::here() {
                Ok(t) => t,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(thread.home));
            thread.serve(rx);
        })?;
    let home = ready_rx
        .recv()
        .map_err(|_| io::Error::other("namespace thread exited during start-up"))??;
    Ok((tx, home))
}

/// The switching logic: resolve, create a socket in a namespace, release,
/// go home. Run by the namespace thread of this process, or by the socket
/// broker's main thread (`crate::broker`), which is its process's only one.
pub(crate) struct Thread {
    home: NsId,
    /// Where this thread is right now; equal to `home` between batches.
    current: NsId,
    /// One open fd per namespace a caller resolved and did not release.
    /// Holding it keeps the namespace alive, which is why `Release` exists.
    cache: HashMap<NsId, File>,
}

/// This thread's own network namespace: its file and identity.
pub(crate) fn own_namespace() -> io::Result<(File, NsId)> {
    nsfs::open_netns("/proc/thread-self/ns/net".as_ref()).map_err(|p| {
        io::Error::other(format!(
            "cannot open this thread's own network namespace (/proc/thread-self/ns/net): {p:?}"
        ))
    })
}

impl Thread {
    /// Switching from the calling thread, whose namespace now is home.
    /// The caller must be a thread nothing else runs on, as the namespace
    /// thread and the broker's main thread are.
    pub(crate) fn here() -> io::Result<Thread> {
        let (file, id) = own_namespace()?;
        Ok(Thread::new(file, id))
    }

    /// The namespace this thread returns to.
    pub(crate) fn home(&self) -> NsId {
        self.home
    }

    fn new(home_file: File, home: NsId) -> Self {
        let mut cache = HashMap::new();
        cache.insert(home, home_file);
        Thread {
            home,
            current: home,
            cache,
        }
    }

    fn serve(mut self, rx: mpsc::Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut next = Some(first);
            while let Some(req) = next {
                match req {
                    Request::Socket { ns, spec, reply } => {
                        // A dropped receiver drops (closes) the socket: nobody leaks it.
                        let _ = reply.send(self.socket_in(ns, spec));
                    }
                    Request::Resolve { reference, reply } => {
                        // Not from home: a path means the same in every
                        // network namespace (only the mount namespace,
                        // which nsproxy never changes, matters to it).
                        let _ = reply.send(self.resolve(&reference));
                    }
                    Request::Refill { ns, spec, n, pool } => {
                        // Stop at the first failure (EMFILE, the namespace
                        // released meanwhile): callers fall back to asking.
                        let made: Vec<Socket> = (0..n)
                            .map_while(|_| self.socket_in(ns, spec).ok())
                            .collect();
                        pool.refilled(ns, &spec, made);
                    }
                    Request::Release { ns } => self.release(ns),
                    Request::Bind { reply, .. } => {
                        let _ = reply.send(Err(io::Error::new(
                            io::ErrorKind::PermissionDenied,
                            "no socket broker: this process binds its sockets itself",
                        )));
                    }
                    Request::ReadConfig { reply } => {
                        let _ = reply.send(Err(io::Error::new(
                            io::ErrorKind::Unsupported,
                            "no socket broker to read the config",
                        )));
                    }
                }
                next = rx.try_recv().ok();
            }
            self.go_home();
        }
    }

    /// Closes the cached fd of `ns` (never home's), from home.
    pub(crate) fn release(&mut self, ns: NsId) {
        self.go_home();
        if ns != self.home {
            self.cache.remove(&ns);
        }
    }

    pub(crate) fn resolve(&mut self, reference: &NsRef) -> Result<NsId, NsError> {
        let path = match reference {
            NsRef::Host => return Ok(self.home),
            NsRef::Glob(_) => {
                return Err(NsError::Pattern {
                    reference: reference.clone(),
                });
            }
            _ => reference
                .path()
                .expect("named, path and pid references have a path"),
        };
        let (file, id) = nsfs::open_netns(&path).map_err(|p| match p {
            Problem::Missing => NsError::NotFound {
                reference: reference.clone(),
                path: path.clone(),
            },
            Problem::Open(source) => NsError::Open {
                reference: reference.clone(),
                path: path.clone(),
                source,
            },
            Problem::NotNsfs(f_type) => NsError::NotNsfs {
                reference: reference.clone(),
                path: path.clone(),
                fs: nsfs::fs_name(f_type),
            },
            Problem::NotAFile(kind) => NsError::NotAFile {
                reference: reference.clone(),
                path: path.clone(),
                kind,
            },
            Problem::WrongKind(kind) => NsError::WrongKind {
                reference: reference.clone(),
                path: path.clone(),
                kind,
            },
            Problem::Inspect(source) => NsError::Open {
                reference: reference.clone(),
                path: path.clone(),
                source,
            },
        })?;
        // Keep the first fd of a namespace; a second reference to it adds nothing.
        if let std::collections::hash_map::Entry::Vacant(slot) = self.cache.entry(id) {
            // Entered once now, so that a namespace nsproxy may not enter
            // (no CAP_SYS_ADMIN, or not over the user namespace that owns
            // it) fails its bindings when they are opened, not each of
            // their connections later (a listener in `host` connecting into
            // it would otherwise listen and reset every client). The thread
            // stays there: the sockets asked for next are usually for it.
            #[allow(clippy::disallowed_methods)]
            if let Err(source) = setns_net(file.as_fd()) {
                return Err(NsError::CannotEnter {
                    reference: reference.clone(),
                    path,
                    source,
                });
            }
            self.current = id;
            slot.insert(file);
        }
        Ok(id)
    }

    pub(crate) fn socket_in(&mut self, ns: NsId, spec: SocketSpec) -> Result<Socket, NsError> {
        if ns != self.current {
            let Some(file) = self.cache.get(&ns) else {
                return Err(NsError::NotOpen { ns });
            };
            #[allow(clippy::disallowed_methods)]
            if let Err(source) = setns_net(file.as_fd()) {
                return Err(NsError::Enter { ns, source });
            }
            self.current = ns;
        }
        super::socket_here(ns, spec)
    }

    /// Returns to the home namespace, or ends the process.
    pub(crate) fn go_home(&mut self) {
        if self.current == self.home {
            return;
        }
        let home = self
            .cache
            .get(&self.home)
            .expect("home fd is never released");
        #[allow(clippy::disallowed_methods)]
        if let Err(err) = setns_net(home.as_fd()) {
            // Every later socket would be born in namespace `current`, which
            // is somebody else's network: a security bug, not an error to
            // recover from.
            let msg = format!(
                "nsproxy: FATAL: cannot switch the namespace thread back to its home namespace {} from {}: {err}; aborting so that no socket is created in the wrong namespace",
                self.home, self.current
            );
            tracing::error!("{msg}");
            eprintln!("{msg}");
            std::process::abort();
        }
        self.current = self.home;
    }
}
