//! The new process's side of a takeover: fetching the sockets (from the
//! old process, or from systemd's fd store), and the bindings taking them.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use socket2::{Domain, SockAddr, Socket, Type};
use tracing::{info, warn};

use super::{HANDOVER_TIMEOUT, Handed, Header, MAX_MESSAGE, TakeoverError, lock, parse_fd_name};
use crate::config::Protocol;
use crate::control::ControlError;
use crate::netns::NsId;
use crate::proxy::{Binding, Listener};
use crate::sys::fdpass;

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
/// previous nsproxy of this service stored as it stopped
/// ([`store`](super::store)).
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

    /// Whether a socket for `b` was handed over (and not taken yet).
    pub(crate) fn holds(&self, b: &Binding) -> bool {
        lock(&self.sockets).contains_key(&Inherited::key(b))
    }

    /// What a handed socket is found by: what a binding listens on, where.
    fn key(b: &Binding) -> (Protocol, NsId, SocketAddr) {
        (b.rule.protocol, b.ns, b.rule.listen)
    }

    /// The handed socket for `b`, checked, if there is one: `Some(Err)`
    /// says why it was refused (it is closed).
    pub(crate) async fn take(&self, b: &Binding) -> Option<Result<Listener, String>> {
        let (handed, fd) = lock(&self.sockets).remove(&Inherited::key(b))?;
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
        let (_, spec) = Listener::spec(b);
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

#[cfg(test)]
mod tests {
    use super::*;

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
