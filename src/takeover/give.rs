//! The old process's side of a takeover: the one-off socket, the sockets
//! sent on it, and the wait for `ready`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{HANDOVER_TIMEOUT, Handed, Header, Offer, json};
use crate::control::Peers;
use crate::sys::fdpass;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
