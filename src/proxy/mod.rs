//! Listeners and relays, one module per protocol.
//!
//! Everything here works on a [`Binding`]: one rule in one namespace, with the
//! sockets already resolved to namespace identities. Sockets come from the
//! [`Switcher`]; nothing here switches namespaces.

pub mod tcp;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::config::Rule;
use crate::netns::{NsError, NsId, NsRef, Switcher};

/// One rule in one namespace: the unit that listens, counts and is reported.
#[derive(Debug)]
pub struct Binding {
    pub rule: Arc<Rule>,
    /// The reference as the operator wrote it, for logs and status.
    pub netns: NsRef,
    /// The namespace the listener lives in.
    pub ns: NsId,
    /// The namespace upstream sockets are created in.
    pub upstream_ns: NsId,
    pub switcher: Switcher,
    pub stats: BindingStats,
}

/// Counters of one binding, updated by its listener and connections.
#[derive(Debug, Default)]
pub struct BindingStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections open right now.
    pub active: AtomicU64,
    /// Connections closed because the upstream could not be reached.
    pub connect_failed: AtomicU64,
    /// accept(2) failures (resource exhaustion, aborted handshakes).
    pub accept_errors: AtomicU64,
    /// Bytes from clients to the upstream, counted when a connection closes.
    pub bytes_in: AtomicU64,
    /// Bytes from the upstream to clients, counted when a connection closes.
    pub bytes_out: AtomicU64,
}

/// Why a binding could not listen.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{0}")]
    Ns(#[from] NsError),
    #[error("cannot listen on {addr}: {source}{}", bind_hint(source))]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot set up the socket for {addr}: {source}")]
    Socket { addr: SocketAddr, source: io::Error },
}

fn bind_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => {
            " (another socket in this namespace already uses this address and port)"
        }
        Some(libc::EADDRNOTAVAIL) => {
            " (this address is not configured on any interface in this namespace)"
        }
        Some(libc::EACCES) => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        _ => "",
    }
}
