//! Kernel SCTP through a thin layer over libc: the socket options, the
//! message calls and the notifications nsproxy needs, on any socket fd.
//!
//! Why not a crate: `tokio-sctp` links libsctp (lksctp-tools) and only wraps
//! sockets it creates itself; `sctp-rs` and its fork `oxirush-sctp` also
//! create their own sockets, and are young. nsproxy's sockets are born on the
//! namespace thread ([`crate::netns::Switcher`]), and what it needs from SCTP
//! is small: a handful of `SOL_SCTP` options and `recvmsg`/`sendmsg` with one
//! control message each, against the kernel's stable UAPI (`<linux/sctp.h>`).
//! The unsafe part is one file of plain calls (`sys.rs`).
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

mod sys;

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;

/// The SCTP protocol number, for `socket(2)`.
pub const IPPROTO_SCTP: i32 = libc::IPPROTO_SCTP;

/// `msg_flags` bit: the data is a notification, not a peer's message.
const MSG_NOTIFICATION: i32 = 0x8000;

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

/// Appends `addr` as a kernel `sockaddr_in`/`sockaddr_in6`, the packed array
/// format of `SCTP_SOCKOPT_BINDX_ADD` and `SCTP_SOCKOPT_CONNECTX`.
fn pack(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            out.extend_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&[0; 8]);
        }
        SocketAddr::V6(a) => {
            out.extend_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
            out.extend_from_slice(&a.port().to_be_bytes());
            out.extend_from_slice(&a.flowinfo().to_be_bytes());
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.scope_id().to_ne_bytes());
        }
    }
}

fn packed(addrs: &[SocketAddr]) -> Vec<u8> {
    let mut v = Vec::with_capacity(addrs.len() * 28);
    for a in addrs {
        pack(&mut v, a);
    }
    v
}

/// `sctp_bindx(SCTP_BINDX_ADD_ADDR)`: binds the socket to more local
/// addresses (multi-homing). On a bound socket the port must be the bound one
/// or 0. An IPv6 socket takes IPv4 addresses too (unless `IPV6_V6ONLY`).
pub fn bindx(fd: impl AsFd, addrs: &[SocketAddr]) -> io::Result<()> {
    if addrs.is_empty() {
        return Ok(());
    }
    sys::setsockopt_bytes(fd.as_fd(), sys::SCTP_SOCKOPT_BINDX_ADD, &packed(addrs)).map(drop)
}

/// `sctp_connectx`: starts an association to a peer known by several
/// addresses (all with the same port). On a non-blocking socket this returns
/// `EINPROGRESS` as [`io::Error`]: wait until the socket is writable, then
/// check `SO_ERROR`, as with `connect(2)`.
pub fn connectx(fd: impl AsFd, addrs: &[SocketAddr]) -> io::Result<()> {
    sys::setsockopt_bytes(fd.as_fd(), sys::SCTP_SOCKOPT_CONNECTX, &packed(addrs)).map(drop)
}

/// Decodes a packed array of `count` kernel socket addresses (the format of
/// `SCTP_GET_PEER_ADDRS`); stops at anything it does not understand.
fn unpack(mut b: &[u8], count: usize) -> Vec<SocketAddr> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count && b.len() >= 2 {
        let family = i32::from(u16::from_ne_bytes([b[0], b[1]]));
        let (addr, len): (SocketAddr, usize) = if family == libc::AF_INET && b.len() >= 16 {
            let ip = std::net::Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            ((ip, u16::from_be_bytes([b[2], b[3]])).into(), 16)
        } else if family == libc::AF_INET6 && b.len() >= 28 {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[8..24]);
            let ip = std::net::Ipv6Addr::from(octets);
            let scope = u32::from_ne_bytes([b[24], b[25], b[26], b[27]]);
            let a = std::net::SocketAddrV6::new(ip, u16::from_be_bytes([b[2], b[3]]), 0, scope);
            (a.into(), 28)
        } else {
            break;
        };
        out.push(addr);
        b = &b[len..];
    }
    out
}

fn addrs(fd: impl AsFd, option: libc::c_int) -> io::Result<Vec<SocketAddr>> {
    // struct sctp_getaddrs { sctp_assoc_t assoc_id; __u32 addr_num; __u8 addrs[]; }
    // with assoc_id 0: the one association of a one-to-one socket.
    let mut buf = vec![0u8; 8 + 64 * 28];
    let n = sys::getsockopt_bytes(fd.as_fd(), option, &mut buf)?;
    let count = u32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    Ok(unpack(&buf[8..n.max(8)], count))
}

/// The peer's addresses in the association (`sctp_getpaddrs`): every address
/// the peer advertised, not only the one connected to. IPv4 peers of an IPv6
/// socket show as IPv4-mapped.
pub fn peer_addrs(fd: impl AsFd) -> io::Result<Vec<SocketAddr>> {
    addrs(fd, sys::SCTP_GET_PEER_ADDRS)
}

/// This end's addresses in the association, or the bound addresses of a
/// socket without one (`sctp_getladdrs`).
pub fn local_addrs(fd: impl AsFd) -> io::Result<Vec<SocketAddr>> {
    addrs(fd, sys::SCTP_GET_LOCAL_ADDRS)
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

/// What one `recvmsg` returned: a piece of a message or notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recv {
    /// Bytes received; 0 without `eor` means the peer shut the association
    /// down (SCTP messages are never empty).
    pub len: usize,
    /// `MSG_EOR`: this piece ends the message.
    pub eor: bool,
    /// `MSG_NOTIFICATION`: the bytes are a notification from the kernel.
    pub notification: bool,
    /// Present when [`set_recv_rcvinfo`] is on and this is data.
    pub info: Option<RcvInfo>,
}

/// One `recvmsg` into `buf`. A message larger than `buf` (or than the socket's
/// receive buffer: partial delivery) arrives in several pieces, the last one
/// with `eor`; [`Reassembler`] puts them together.
pub fn recv(fd: impl AsFd, buf: &mut [u8]) -> io::Result<Recv> {
    let r = sys::recvmsg(fd.as_fd(), buf)?;
    Ok(Recv {
        len: r.len,
        eor: r.flags & libc::MSG_EOR != 0,
        notification: r.flags & MSG_NOTIFICATION != 0,
        info: r.rcvinfo.map(|i| RcvInfo {
            sid: i.rcv_sid,
            ssn: i.rcv_ssn,
            flags: i.rcv_flags,
            ppid: i.rcv_ppid,
            tsn: i.rcv_tsn,
            cumtsn: i.rcv_cumtsn,
            context: i.rcv_context,
            assoc_id: i.rcv_assoc_id,
        }),
    })
}

/// A whole record, as [`Reassembler::recv_once`] returns it; its bytes are in
/// [`Reassembler::message`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A peer's message, with its stream, PPID and flags (all zero if
    /// `SCTP_RECVRCVINFO` is off).
    Data(RcvInfo),
    /// A kernel notification; never to be relayed.
    Notification(Notification),
    /// A message larger than the reassembly limit: its `len` bytes were
    /// read and thrown away (the association goes on).
    Oversized { len: usize, info: RcvInfo },
    /// The peer shut down: no more messages will come.
    Eof,
}

/// Puts the pieces of a message (or notification) together until `MSG_EOR`.
///
/// The buffer grows (doubling) up to a limit, and shrinks back to its initial
/// size after a large message, so an association costs its initial size at
/// rest. A message larger than the limit is read to its end and reported as
/// [`Received::Oversized`] instead.
#[derive(Debug)]
pub struct Reassembler {
    buf: Vec<u8>,
    filled: usize,
    /// The current record has been returned; the next call starts a new one.
    done: bool,
    /// From the record's first piece.
    notification: bool,
    info: Option<RcvInfo>,
    /// Bytes of an oversized message thrown away so far.
    skipped: usize,
    initial: usize,
    limit: usize,
}

impl Reassembler {
    /// `initial` bytes of buffer, growing to at most `limit` for one message.
    pub fn new(initial: usize, limit: usize) -> Reassembler {
        let initial = initial.clamp(1, limit.max(1));
        Reassembler {
            buf: vec![0; initial],
            filled: 0,
            done: false,
            notification: false,
            info: None,
            skipped: 0,
            initial,
            limit: limit.max(initial),
        }
    }

    /// The record the last successful call returned.
    pub fn message(&self) -> &[u8] {
        &self.buf[..self.filled]
    }

    /// True while part of a message has arrived and the rest has not.
    pub fn in_progress(&self) -> bool {
        !self.done && self.filled > 0
    }

    /// One `recvmsg`. `Ok(Some(..))` once a record is whole, `Ok(None)` after
    /// a piece (call again). On a non-blocking socket `WouldBlock` keeps the
    /// pieces so far, so this can be retried whenever the socket is readable.
    pub fn recv_once(&mut self, fd: impl AsFd) -> io::Result<Option<Received>> {
        if self.done {
            self.done = false;
            self.filled = 0;
            self.notification = false;
            self.info = None;
            self.skipped = 0;
            if self.buf.len() > self.initial {
                self.buf = vec![0; self.initial];
            }
        }
        if self.filled == self.buf.len() {
            if self.buf.len() >= self.limit {
                // Too large to keep: read the rest into the same space.
                self.skipped += self.filled;
                self.filled = 0;
            } else {
                let grown = (self.buf.len() * 2).min(self.limit);
                self.buf.resize(grown, 0);
            }
        }
        let r = recv(fd.as_fd(), &mut self.buf[self.filled..])?;
        if r.len == 0 && !r.eor && !r.notification {
            // A partial message cut off by the end is lost with it.
            self.filled = 0;
            self.done = true;
            return Ok(Some(Received::Eof));
        }
        if self.filled == 0 && self.skipped == 0 {
            self.notification = r.notification;
        }
        if self.info.is_none() {
            self.info = r.info;
        }
        self.filled += r.len;
        if !r.eor {
            return Ok(None);
        }
        self.done = true;
        if self.skipped > 0 {
            let len = self.skipped + self.filled;
            self.filled = 0;
            return Ok(Some(Received::Oversized {
                len,
                info: self.info.unwrap_or_default(),
            }));
        }
        if self.notification {
            Ok(Some(Received::Notification(Notification::parse(
                self.message(),
            ))))
        } else {
            Ok(Some(Received::Data(self.info.unwrap_or_default())))
        }
    }

    /// Receives one whole record on a blocking socket (for tests and tools).
    pub fn recv_blocking(&mut self, fd: impl AsFd) -> io::Result<Received> {
        loop {
            if let Some(r) = self.recv_once(fd.as_fd())? {
                return Ok(r);
            }
        }
    }
}

/// A notification from the kernel about the association.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notification {
    /// `SCTP_ASSOC_CHANGE`.
    AssocChange {
        state: AssocState,
        /// A protocol error cause code, when the change is a failure.
        error: u16,
        outbound_streams: u16,
        inbound_streams: u16,
    },
    /// `SCTP_SHUTDOWN_EVENT`: the peer sent SHUTDOWN; it sends no more.
    Shutdown,
    /// `SCTP_PARTIAL_DELIVERY_EVENT` (indication 0: the partly delivered
    /// message was aborted).
    PartialDelivery { indication: u32, stream: u32 },
    /// `SCTP_REMOTE_ERROR`: an operational error the peer reported.
    RemoteError { error: u16 },
    /// Any other type (`sn_type`), or a truncated notification (type 0).
    Other { kind: u16 },
}

/// `sac_state` of [`Notification::AssocChange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssocState {
    /// The association is up.
    CommUp,
    /// The association failed: the peer aborted, or it stopped answering.
    CommLost,
    /// The peer restarted.
    Restart,
    /// A graceful shutdown completed.
    ShutdownComplete,
    /// The association could not be set up.
    CantStart,
    Unknown(u16),
}

const SCTP_ASSOC_CHANGE: u16 = 0x8001;
const SCTP_REMOTE_ERROR: u16 = 0x8004;
const SCTP_SHUTDOWN_EVENT: u16 = 0x8005;
const SCTP_PARTIAL_DELIVERY_EVENT: u16 = 0x8006;

impl Notification {
    /// Decodes a whole notification (`union sctp_notification`).
    pub fn parse(b: &[u8]) -> Notification {
        let u16_at = |i: usize| b.get(i..i + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]));
        let u32_at = |i: usize| {
            b.get(i..i + 4)
                .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
        };
        let Some(kind) = u16_at(0) else {
            return Notification::Other { kind: 0 };
        };
        // Header: type u16, flags u16, length u32; the body follows at 8.
        let parsed = match kind {
            SCTP_ASSOC_CHANGE => (|| {
                let state = match u16_at(8)? {
                    0 => AssocState::CommUp,
                    1 => AssocState::CommLost,
                    2 => AssocState::Restart,
                    3 => AssocState::ShutdownComplete,
                    4 => AssocState::CantStart,
                    n => AssocState::Unknown(n),
                };
                Some(Notification::AssocChange {
                    state,
                    error: u16_at(10)?,
                    outbound_streams: u16_at(12)?,
                    inbound_streams: u16_at(14)?,
                })
            })(),
            SCTP_SHUTDOWN_EVENT => Some(Notification::Shutdown),
            SCTP_PARTIAL_DELIVERY_EVENT => (|| {
                Some(Notification::PartialDelivery {
                    indication: u32_at(8)?,
                    stream: u32_at(16)?,
                })
            })(),
            // sre_error is in network byte order.
            SCTP_REMOTE_ERROR => b.get(8..10).map(|s| Notification::RemoteError {
                error: u16::from_be_bytes([s[0], s[1]]),
            }),
            _ => None,
        };
        parsed.unwrap_or(Notification::Other { kind })
    }
}

impl fmt::Display for Notification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notification::AssocChange {
                state,
                error,
                outbound_streams,
                inbound_streams,
            } => write!(
                f,
                "association change {state:?} (streams out/in {outbound_streams}/{inbound_streams}, error {error})"
            ),
            Notification::Shutdown => f.write_str("peer began shutdown"),
            Notification::PartialDelivery { indication, stream } => {
                write!(f, "partial delivery event {indication} on stream {stream}")
            }
            Notification::RemoteError { error } => write!(f, "peer reported error cause {error}"),
            Notification::Other { kind } => write!(f, "notification type {kind:#x}"),
        }
    }
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
    fn packs_addresses_like_the_kernel() {
        let v = packed(&["10.1.2.3:38412".parse().unwrap()]);
        assert_eq!(v.len(), 16);
        assert_eq!(&v[2..4], &38412u16.to_be_bytes());
        assert_eq!(&v[4..8], &[10, 1, 2, 3]);
        let v = packed(&[
            "[fd00::1]:5".parse().unwrap(),
            "127.0.0.1:5".parse().unwrap(),
        ]);
        assert_eq!(v.len(), 28 + 16);
        assert_eq!(u16::from_ne_bytes([v[0], v[1]]), libc::AF_INET6 as u16);
        assert_eq!(u16::from_ne_bytes([v[28], v[29]]), libc::AF_INET as u16);
        let addrs: Vec<SocketAddr> = vec![
            "[fd00::1]:5".parse().unwrap(),
            "127.0.0.1:5".parse().unwrap(),
        ];
        assert_eq!(unpack(&v, 2), addrs);
        assert_eq!(unpack(&v, 1), addrs[..1]);
        assert_eq!(unpack(&v[..20], 2), addrs[..0]);
    }

    #[test]
    fn parses_notifications() {
        let mut b = Vec::new();
        b.extend_from_slice(&SCTP_ASSOC_CHANGE.to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&20u32.to_ne_bytes());
        for v in [1u16, 0, 10, 65535] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b.extend_from_slice(&7i32.to_ne_bytes());
        assert_eq!(
            Notification::parse(&b),
            Notification::AssocChange {
                state: AssocState::CommLost,
                error: 0,
                outbound_streams: 10,
                inbound_streams: 65535
            }
        );
        assert_eq!(
            Notification::parse(&b[..10]),
            Notification::Other {
                kind: SCTP_ASSOC_CHANGE
            }
        );
        assert_eq!(Notification::parse(&[]), Notification::Other { kind: 0 });
        let mut s = SCTP_SHUTDOWN_EVENT.to_ne_bytes().to_vec();
        s.extend_from_slice(&[0; 10]);
        assert_eq!(Notification::parse(&s), Notification::Shutdown);
    }

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

    mod props {
        //! Notifications and packed address arrays against generated bytes.

        use proptest::collection::vec;
        use proptest::prelude::*;

        use super::*;

        /// A notification in the kernel's layout: type, flags, length,
        /// then the body.
        fn notification(kind: u16, body: &[u8]) -> Vec<u8> {
            let mut b = kind.to_ne_bytes().to_vec();
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&((8 + body.len()) as u32).to_ne_bytes());
            b.extend_from_slice(body);
            b
        }

        fn state(n: u16) -> AssocState {
            match n {
                0 => AssocState::CommUp,
                1 => AssocState::CommLost,
                2 => AssocState::Restart,
                3 => AssocState::ShutdownComplete,
                4 => AssocState::CantStart,
                n => AssocState::Unknown(n),
            }
        }

        /// A notification and its bytes.
        fn encoded() -> impl Strategy<Value = (Notification, Vec<u8>)> {
            prop_oneof![
                (
                    0..6u16,
                    any::<[u16; 3]>(),
                    any::<i32>(),
                    vec(any::<u8>(), 0..8)
                )
                    .prop_map(
                        |(st, [error, outbound_streams, inbound_streams], id, info)| {
                            let mut body = Vec::new();
                            for v in [st, error, outbound_streams, inbound_streams] {
                                body.extend_from_slice(&v.to_ne_bytes());
                            }
                            body.extend_from_slice(&id.to_ne_bytes());
                            body.extend_from_slice(&info);
                            let n = Notification::AssocChange {
                                state: state(st),
                                error,
                                outbound_streams,
                                inbound_streams,
                            };
                            (n, notification(SCTP_ASSOC_CHANGE, &body))
                        }
                    ),
                any::<i32>().prop_map(|id| {
                    (
                        Notification::Shutdown,
                        notification(SCTP_SHUTDOWN_EVENT, &id.to_ne_bytes()),
                    )
                }),
                any::<[u32; 4]>().prop_map(|[indication, id, stream, seq]| {
                    let mut body = Vec::new();
                    for v in [indication, id, stream, seq] {
                        body.extend_from_slice(&v.to_ne_bytes());
                    }
                    let n = Notification::PartialDelivery { indication, stream };
                    (n, notification(SCTP_PARTIAL_DELIVERY_EVENT, &body))
                }),
                (any::<u16>(), vec(any::<u8>(), 0..16)).prop_map(|(error, data)| {
                    let mut body = error.to_be_bytes().to_vec();
                    body.extend_from_slice(&[0; 2]);
                    body.extend_from_slice(&0i32.to_ne_bytes());
                    body.extend_from_slice(&data);
                    (
                        Notification::RemoteError { error },
                        notification(SCTP_REMOTE_ERROR, &body),
                    )
                }),
            ]
        }

        fn addr() -> impl Strategy<Value = SocketAddr> {
            prop_oneof![
                (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| (ip, port).into()),
                (any::<[u8; 16]>(), any::<u16>(), any::<u32>()).prop_map(|(ip, port, scope)| {
                    std::net::SocketAddrV6::new(ip.into(), port, 0, scope).into()
                }),
            ]
        }

        proptest! {
            #[test]
            fn prop_notification_parser_takes_any_bytes(bytes in vec(any::<u8>(), 0..64)) {
                let _ = Notification::parse(&bytes);
            }

            #[test]
            fn prop_notifications_parse_to_their_fields((want, bytes) in encoded()) {
                prop_assert_eq!(Notification::parse(&bytes), want);
                // Cut short, it is either still whole enough or "other" of
                // its own type: never another kind, never a panic.
                for cut in 0..bytes.len() {
                    let got = Notification::parse(&bytes[..cut]);
                    let kind = if cut < 2 { 0 } else { u16::from_ne_bytes([bytes[0], bytes[1]]) };
                    prop_assert!(got == want || got == Notification::Other { kind }, "{got:?}");
                }
            }

            #[test]
            fn prop_unpack_takes_any_bytes(bytes in vec(any::<u8>(), 0..200), count in 0..10usize) {
                prop_assert!(unpack(&bytes, count).len() <= count);
            }

            #[test]
            fn prop_packed_addresses_unpack_to_themselves(addrs in vec(addr(), 0..8)) {
                let b = packed(&addrs);
                prop_assert_eq!(unpack(&b, addrs.len()), addrs.clone());
                // A count below the number packed reads only that many.
                prop_assert_eq!(unpack(&b, addrs.len() / 2), addrs[..addrs.len() / 2].to_vec());
            }
        }
    }
}
