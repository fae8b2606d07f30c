//! A binding's counters, one type per protocol: a binding carries only
//! the counters its protocol has.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::config::Protocol;

/// Counters of one binding, of its rule's protocol only (a TCP binding has
/// no datagram counters), updated by its listener and connections (TCP),
/// sessions (UDP) or associations (SCTP). The variant is fixed when the
/// binding is made: a relay takes its typed view ([`BindingStats::tcp`] and
/// the like) once per listener, connection or batch, not per event.
#[derive(Debug)]
pub enum BindingStats {
    Tcp(TcpStats),
    /// Shared with the listener's task and sessions, which count per
    /// datagram straight into it, with no look at the variant.
    Udp(Arc<UdpStats>),
    Sctp(SctpStats),
}

impl BindingStats {
    /// Zeroed counters for a binding of `protocol`.
    pub fn new(protocol: Protocol) -> BindingStats {
        match protocol {
            Protocol::Tcp => BindingStats::Tcp(TcpStats::default()),
            Protocol::Udp => BindingStats::Udp(Arc::default()),
            Protocol::Sctp => BindingStats::Sctp(SctpStats::default()),
        }
    }

    /// The counters TCP and SCTP share.
    ///
    /// # Panics
    /// On a UDP binding's counters: only connection-oriented relays ask.
    #[track_caller]
    pub fn conn(&self) -> &ConnStats {
        match self {
            BindingStats::Tcp(t) => &t.conn,
            BindingStats::Sctp(s) => &s.conn,
            BindingStats::Udp(_) => panic!("a UDP binding has no connection counters"),
        }
    }

    /// A TCP binding's counters.
    ///
    /// # Panics
    /// On another protocol's: only the TCP relay asks.
    #[track_caller]
    pub fn tcp(&self) -> &TcpStats {
        match self {
            BindingStats::Tcp(t) => t,
            _ => panic!("not a TCP binding's counters"),
        }
    }

    /// A UDP binding's counters.
    ///
    /// # Panics
    /// On another protocol's: only the UDP relay asks.
    #[track_caller]
    pub fn udp(&self) -> &Arc<UdpStats> {
        match self {
            BindingStats::Udp(u) => u,
            _ => panic!("not a UDP binding's counters"),
        }
    }

    /// An SCTP binding's counters.
    ///
    /// # Panics
    /// On another protocol's: only the SCTP relay asks.
    #[track_caller]
    pub fn sctp(&self) -> &SctpStats {
        match self {
            BindingStats::Sctp(s) => s,
            _ => panic!("not an SCTP binding's counters"),
        }
    }
}

/// Counters of the connection-oriented relays (TCP, SCTP), kept by the
/// shared accept loop and each connection (association).
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections open right now.
    pub active: AtomicU64,
    /// Connections closed because the upstream could not be reached.
    pub connect_failed: AtomicU64,
    /// accept(2) failures (resource exhaustion, aborted handshakes).
    pub accept_errors: AtomicU64,
    /// Times the listener reached `max_connections` open connections and
    /// stopped accepting until one closed (clients meanwhile wait in the
    /// listen backlog).
    pub paused_at_cap: AtomicU64,
    /// Clients that were waiting in the listen backlog when the listener
    /// closed and were reset: beyond `max_connections`, or all of them when
    /// it closed at once. (Those within the cap are served while draining.)
    pub backlog_reset: AtomicU64,
    /// Connections (associations) closed by `idle_timeout`.
    pub idle_timeouts: AtomicU64,
    /// Clients that reset (aborted) while nsproxy was still connecting
    /// upstream; the connect was abandoned.
    pub client_gone_connecting: AtomicU64,
    /// Times an upstream socket could not be created for lack of fds or
    /// kernel memory; the client waited and it was tried again, and the
    /// listener paused accepting meanwhile.
    pub upstream_socket_exhausted: AtomicU64,
    /// Bytes from clients to the upstream, counted as they are sent.
    pub bytes_in: AtomicU64,
    /// Bytes from the upstream to clients, counted as they are sent.
    pub bytes_out: AtomicU64,
}

/// A TCP binding's counters.
#[derive(Debug, Default)]
pub struct TcpStats {
    pub conn: ConnStats,
    /// Half-closed connections closed by `half_close_timeout`.
    pub half_close_timeouts: AtomicU64,
    /// `upstream_source = "client"`: connections reset because their
    /// upstream socket could not come from the client's address (another
    /// connection in the upstream namespace has that address, port and
    /// upstream; an address family the upstream's is not). Also counted in
    /// `connect_failed`.
    pub upstream_source_failed: AtomicU64,
}

/// A UDP binding's counters. Every datagram nsproxy drops is counted in
/// exactly one of the `dropped_*`, `truncated` or `send_errors` counters
/// (drops on session sockets' own receive buffers, a kernel matter,
/// excepted).
#[derive(Debug, Default)]
pub struct UdpStats {
    /// Bytes from clients to the upstream, counted as they are sent.
    pub bytes_in: AtomicU64,
    /// Bytes from the upstream to clients, counted as they are sent.
    pub bytes_out: AtomicU64,
    /// Datagrams from clients sent on to the upstream.
    pub datagrams_in: AtomicU64,
    /// Datagrams from the upstream sent back to their client.
    pub datagrams_out: AtomicU64,
    /// Sessions (one per client address and port) started.
    pub sessions_created: AtomicU64,
    /// Sessions open right now.
    pub sessions_active: AtomicU64,
    /// Sessions ended by `udp_idle_timeout`.
    pub sessions_expired: AtomicU64,
    /// Sessions that ended at once because their upstream socket could not
    /// be created or connected; the datagrams waiting for it are counted in
    /// `send_errors`.
    pub sessions_failed: AtomicU64,
    /// `upstream_source = "client"`: sessions that failed because their
    /// upstream socket could not be bound to the client's address (another
    /// session in the upstream namespace has it; an address family the
    /// upstream's is not). Also counted in `sessions_failed`.
    pub upstream_source_failed: AtomicU64,
    /// Datagrams from new clients dropped because the binding already had
    /// `udp_max_sessions` sessions.
    pub dropped_at_cap: AtomicU64,
    /// Datagrams dropped because their session's queue to the upstream was
    /// full (the upstream socket could not send as fast as the client).
    pub dropped_queue_full: AtomicU64,
    /// Datagrams (either direction) larger than the receive buffer;
    /// dropped, never passed on cut short.
    pub truncated: AtomicU64,
    /// Datagrams (either direction) a send failed for, and so dropped.
    pub send_errors: AtomicU64,
    /// "Port unreachable" reports (ECONNREFUSED) on session sockets:
    /// nothing listened on the upstream port. The session stays.
    pub upstream_refused: AtomicU64,
    /// Receive errors: on the listening socket (the kernel short of
    /// memory), or ICMP errors other than "port unreachable" (such as "host
    /// unreachable") on session sockets, which keep their session.
    pub recv_errors: AtomicU64,
    /// Datagrams the kernel dropped before nsproxy could read them, because
    /// the listening socket's receive buffer was full (as reported by
    /// `SO_RXQ_OVFL`, with the next datagram that got through).
    pub dropped_by_kernel: AtomicU64,
}

/// An SCTP binding's counters.
#[derive(Debug, Default)]
pub struct SctpStats {
    pub conn: ConnStats,
    /// Messages from clients sent on to the upstream, counted when an
    /// association closes.
    pub messages_in: AtomicU64,
    /// Messages from the upstream sent on to clients, counted when an
    /// association closes.
    pub messages_out: AtomicU64,
    /// Messages dropped because their stream id is not open toward the
    /// other side (the other association has fewer outbound streams).
    pub unknown_stream: AtomicU64,
    /// Messages dropped because they were larger than nsproxy reassembles,
    /// or than the other leg's send buffer could be made.
    pub oversized: AtomicU64,
}
