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
//!
//! The old process's side is in `give`, the new process's in `take`, the
//! fd store's names in `fdstore`.

mod fdstore;
mod give;
mod take;

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::ControlError;

pub use fdstore::{fd_name, parse_fd_name, store};
pub use give::Giver;
pub use take::{Inherited, Taken, from_fd_store, take};

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

fn json(v: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data serializes")
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
}
