//! Kernel SCTP through a thin layer over libc: the socket options, the
//! message calls and the notifications nsproxy needs, on any socket fd.
//!
//! Why not a crate: `tokio-sctp` links libsctp (lksctp-tools) and only wraps
//! sockets it creates itself; `sctp-rs` and its fork `oxirush-sctp` also
//! create their own sockets, and are young. nsproxy's sockets are born on the
//! namespace thread ([`crate::netns::Switcher`]), and what it needs from SCTP
//! is small: a handful of `SOL_SCTP` options and `recvmsg`/`sendmsg` with one
//! control message each, against the kernel's stable UAPI (`<linux/sctp.h>`).
//! The unsafe part is one file of plain calls in the syscall layer
//! (`src/sys/sctp.rs`).
//!
//! Everything here works on one-to-one style (`SOCK_STREAM`) sockets, blocking
//! or not: on a non-blocking fd a call that would wait returns
//! [`io::ErrorKind::WouldBlock`], so the relay drives them from tokio's
//! reactor (`AsyncFd`) and no thread ever waits in the kernel.
//!
//! ```no_run
//! # fn demo(socket: &socket2::Socket) -> std::io::Result<()> {
//! use nsproxy::sctp::{self, Received, Reassembler, SndInfo};
//!
//! sctp::set_init(socket, sctp::Streams::MAX)?;    // before listen/connect
//! sctp::set_recv_rcvinfo(socket, true)?;          // stream id and PPID per message
//! sctp::send(socket, b"hello", &SndInfo { sid: 3, ppid: 46, ..SndInfo::default() })?;
//! let mut r = Reassembler::new(64 * 1024, 16 << 20);
//! if let Received::Data(info) = r.recv_blocking(socket)? {
//!     println!("{} bytes on stream {}", r.message().len(), info.sid);
//! }
//! # Ok(()) }
//! ```

mod addrs;
mod notification;
mod recv;

use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;

pub use addrs::{bindx, connectx, local_addrs, peer_addrs};
pub use notification::{AssocState, Notification};
pub use recv::{Reassembler, Received, Recv, recv};

use crate::sys::sctp as sys;

/// The SCTP protocol number, for `socket(2)`.
pub const IPPROTO_SCTP: i32 = libc::IPPROTO_SCTP;

/// `SCTP_UNORDERED`: the message was (or is to be) delivered unordered.
pub const UNORDERED: u16 = 1;

/// Stream counts asked for in new associations (`SCTP_INITMSG`).
///
/// An association's outbound stream count is the smaller of the local
/// `outbound` and the peer's `max_inbound`. The kernel's defaults (10
/// outbound, 65535 inbound) are too few for peers that use high stream ids,
/// which then cannot be relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Streams {
    /// Outbound streams to request.
    pub outbound: u16,
    /// Most inbound streams to accept.
    pub max_inbound: u16,
}

impl Streams {
    /// 65535 each way, the protocol's maximum.
    pub const MAX: Streams = Streams {
        outbound: u16::MAX,
        max_inbound: u16::MAX,
    };
}

impl Default for Streams {
    fn default() -> Self {
        Streams::MAX
    }
}

/// Where and how a message arrived (`struct sctp_rcvinfo`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RcvInfo {
    /// Stream id.
    pub sid: u16,
    /// Stream sequence number.
    pub ssn: u16,
    /// [`UNORDERED`] if the message was sent unordered.
    pub flags: u16,
    /// Payload protocol identifier, as sent (opaque to SCTP; customarily in
    /// network byte order).
    pub ppid: u32,
    pub tsn: u32,
    pub cumtsn: u32,
    pub context: u32,
    pub assoc_id: i32,
}

/// How to send a message (`struct sctp_sndinfo`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SndInfo {
    /// Stream id; must be below the association's outbound stream count.
    pub sid: u16,
    /// [`UNORDERED`] to send unordered.
    pub flags: u16,
    /// Payload protocol identifier, passed through untouched.
    pub ppid: u32,
    pub context: u32,
    pub assoc_id: i32,
}

impl SndInfo {
    /// Sends a message on as it arrived: same stream, PPID and unordered flag.
    pub fn relay(info: &RcvInfo) -> SndInfo {
        SndInfo {
            sid: info.sid,
            flags: info.flags & UNORDERED,
            ppid: info.ppid,
            ..SndInfo::default()
        }
    }
}

/// Notifications to subscribe to (`SCTP_EVENTS`). Data-I/O events are always
/// off: per-message information comes from [`set_recv_rcvinfo`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Events {
    /// `SCTP_ASSOC_CHANGE`: up, lost (abort), restart, shutdown complete.
    pub association: bool,
    /// `SCTP_SHUTDOWN_EVENT`: the peer began a graceful shutdown.
    pub shutdown: bool,
    /// `SCTP_PARTIAL_DELIVERY_EVENT`: a partly delivered message was aborted.
    pub partial_delivery: bool,
    /// `SCTP_REMOTE_ERROR`: the peer sent an operational error.
    pub peer_error: bool,
}

/// Sets the stream counts for associations this socket makes or accepts.
/// Takes effect for associations set up afterwards (set it on a listener
/// before `listen`, on a client before `connect`).
pub fn set_init(fd: impl AsFd, streams: Streams) -> io::Result<()> {
    let init = sys::SctpInitmsg {
        num_ostreams: streams.outbound,
        max_instreams: streams.max_inbound,
        ..Default::default()
    };
    sys::setsockopt(fd.as_fd(), sys::SOL_SCTP, sys::SCTP_INITMSG, &init)
}

/// `SCTP_NODELAY`: send at once instead of bundling small messages (Nagle).
pub fn set_nodelay(fd: impl AsFd, on: bool) -> io::Result<()> {
    sys::setsockopt(
        fd.as_fd(),
        sys::SOL_SCTP,
        sys::SCTP_NODELAY,
        &libc::c_int::from(on),
    )
}

/// `SCTP_RECVRCVINFO`: attach an [`RcvInfo`] (stream, PPID, flags) to every
/// received message.
pub fn set_recv_rcvinfo(fd: impl AsFd, on: bool) -> io::Result<()> {
    sys::setsockopt(
        fd.as_fd(),
        sys::SOL_SCTP,
        sys::SCTP_RECVRCVINFO,
        &libc::c_int::from(on),
    )
}

/// Subscribes to exactly the notifications in `events` (`SCTP_EVENTS`).
pub fn subscribe(fd: impl AsFd, events: Events) -> io::Result<()> {
    let sub = sys::SctpEventSubscribe {
        association: events.association.into(),
        shutdown: events.shutdown.into(),
        partial_delivery: events.partial_delivery.into(),
        peer_error: events.peer_error.into(),
        ..Default::default()
    };
    sys::setsockopt(fd.as_fd(), sys::SOL_SCTP, sys::SCTP_EVENTS, &sub)
}

/// A snapshot of a one-to-one socket's association (`SCTP_STATUS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// `sstat_state` (`SCTP_ESTABLISHED` is 4 on Linux).
    pub state: i32,
    /// Inbound streams the association has.
    pub inbound_streams: u16,
    /// Outbound streams the association has: stream ids must be below this.
    pub outbound_streams: u16,
    /// Largest message fragment (path MTU less headers).
    pub fragmentation_point: u32,
}

/// The association's state and negotiated stream counts. Fails (`EINVAL`)
/// before the association exists.
pub fn status(fd: impl AsFd) -> io::Result<Status> {
    let s = sys::getsockopt(fd.as_fd(), sys::SCTP_STATUS, sys::SctpStatus::default())?;
    Ok(Status {
        state: s.state,
        inbound_streams: s.instrms,
        outbound_streams: s.outstrms,
        fragmentation_point: s.fragmentation_point,
    })
}

/// Sends `data` as one whole message with `info`'s stream, PPID and flags.
/// On a non-blocking socket without room for the message this fails with
/// `WouldBlock` and sends nothing (SCTP messages are atomic). A stream id the
/// association does not have gives `EINVAL`.
pub fn send(fd: impl AsFd, data: &[u8], info: &SndInfo) -> io::Result<usize> {
    let raw = sys::SctpSndinfo {
        snd_sid: info.sid,
        snd_flags: info.flags,
        snd_ppid: info.ppid,
        snd_context: info.context,
        snd_assoc_id: info.assoc_id,
    };
    sys::sendmsg(fd.as_fd(), data, &raw)
}

/// Makes the send buffer hold a `len`-byte message; returns whether it now
/// does.
///
/// SCTP sends a message whole or not at all, and refuses one larger than the
/// socket's send buffer (`EMSGSIZE`; Linux's default buffer is about 200
/// KiB). This raises the buffer with `SO_SNDBUFFORCE` (needs
/// `CAP_NET_ADMIN`), else with `SO_SNDBUF`, which the kernel caps at twice
/// `net.core.wmem_max`. The buffer is a limit, not memory set aside.
pub fn fit_send_buffer(fd: impl AsFd, len: usize) -> io::Result<bool> {
    let sock = socket2::SockRef::from(&fd);
    if sock.send_buffer_size()? >= len {
        return Ok(true);
    }
    // The kernel doubles the value asked for (bookkeeping overhead).
    let want = libc::c_int::try_from(len).unwrap_or(libc::c_int::MAX);
    if sys::setsockopt(fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &want).is_err() {
        sock.set_send_buffer_size(len)?;
    }
    Ok(sock.send_buffer_size()? >= len)
}

/// Hands a non-blocking socket to the tokio reactor (of the runtime this is
/// called in): from then on `AsyncFd::async_io` waits for readiness without
/// blocking a thread. tokio's own constructor for this is `unsafe` (it cannot
/// know the fd stays open); a `socket2::Socket` owns its fd, so this is safe.
pub fn register(socket: socket2::Socket) -> io::Result<tokio::io::unix::AsyncFd<socket2::Socket>> {
    sys::register(socket)
}

/// True when `e` says the kernel has no SCTP (module not loaded, blacklisted
/// or not built): `socket()` fails with `EPROTONOSUPPORT` (or, on some
/// kernels, `ESOCKTNOSUPPORT`).
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPROTONOSUPPORT | libc::ESOCKTNOSUPPORT)
    )
}

/// The address family a socket needs to reach or bind all of `addrs`: IPv6 if
/// any is IPv6 (an IPv6 SCTP socket also carries IPv4), else IPv4.
pub fn needs_ipv6(addrs: impl IntoIterator<Item = IpAddr>) -> bool {
    addrs.into_iter().any(|a| a.is_ipv6())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_stream_ppid_and_unordered_only() {
        let info = RcvInfo {
            sid: 9,
            ssn: 4,
            flags: UNORDERED | 0x10,
            ppid: 0x3c00_0000,
            tsn: 1,
            cumtsn: 1,
            context: 5,
            assoc_id: 3,
        };
        assert_eq!(
            SndInfo::relay(&info),
            SndInfo {
                sid: 9,
                flags: UNORDERED,
                ppid: 0x3c00_0000,
                context: 0,
                assoc_id: 0
            }
        );
    }
}
