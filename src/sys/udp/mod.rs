//! The UDP syscalls std, socket2 and tokio do not offer: `recvmmsg` that
//! takes a batch of datagrams, each with its destination address
//! (`IP_PKTINFO` / `IPV6_PKTINFO` control messages), its real length and the
//! socket's count of datagrams the kernel dropped (`SO_RXQ_OVFL`); and
//! `sendmmsg` that sends a batch to one peer, picking the source address.
//!
//! A listener bound to a wildcard address must answer from the address the
//! client sent to, or a client that `connect`ed its socket drops the reply.
//! Routing would pick *a* source address, not necessarily that one.
//!
//! Batches save the syscall per datagram, which is most of what a datagram
//! costs nsproxy besides the kernel's own work: measured on a 2-core VM,
//! 64-byte datagrams over loopback cost 1.3 µs each to receive one by one
//! and 1.0 µs in batches of 32; 5.2 µs each to send (the receiver's side of
//! loopback included) and 4.3 µs in batches.
//!
//! Everything here is non-blocking and returns `WouldBlock` as an error, so
//! that callers can run it inside tokio's `async_io`.

use std::io;
use std::mem::{self, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;

use libc::{c_int, c_uint, c_void};
use socket2::SockAddr;

/// Most datagrams one `recvmmsg` or `sendmmsg` call moves. Past 32 the
/// saving per datagram is small, while receive slots cost memory (see
/// [`RecvBatch`]).
pub(crate) const BATCH: usize = 32;

/// Where a reply to a client must come from: the destination of the
/// client's datagram, as the kernel reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReplyFrom {
    /// The local address; IPv4 clients of a dual-stack socket get an IPv4
    /// address here (not the v4-mapped form).
    pub ip: IpAddr,
    /// The interface the datagram arrived on. Only used to send from an
    /// IPv6 link-local address, which means nothing without its interface.
    pub ifindex: u32,
}

/// What the kernel said about one datagram of a batch.
#[derive(Debug)]
pub(crate) struct Received {
    /// The datagram's real length, also when it did not fit its slot.
    pub len: usize,
    /// The datagram was longer than its slot; only the slot's length of it
    /// was kept, and the rest is gone.
    pub truncated: bool,
    /// The sender, as the socket sees it (v4-mapped on a dual-stack
    /// socket); `None` when the batch was received without addresses, or
    /// (which an IP socket never reports) from a non-IP address.
    pub peer: Option<SocketAddr>,
    /// `None` when the kernel sent no usable packet info (or it was a
    /// multicast or broadcast destination, which cannot be a source).
    pub reply_from: Option<ReplyFrom>,
    /// How many datagrams the kernel has dropped on this socket so far
    /// because its receive buffer was full (a running count that wraps);
    /// `None` until the first drop, or without [`enable_drop_count`].
    pub kernel_drops: Option<u32>,
}

/// `SO_RXQ_OVFL` (Linux 2.6.33), which the libc crate does not define for
/// Linux: 40 in asm-generic and on every architecture but SPARC.
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_RXQ_OVFL: c_int = 0x24;
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_RXQ_OVFL: c_int = 40;

/// Room for one `IP_PKTINFO`, one `IPV6_PKTINFO` (a dual-stack socket gets
/// both for an IPv4 datagram) and one `SO_RXQ_OVFL` message (32 + 40 + 24
/// bytes on 64-bit), with margin; aligned like `cmsghdr`, as the `CMSG_*`
/// accessors require.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; 128]);

fn setsockopt_int(fd: BorrowedFd<'_>, level: c_int, name: c_int, value: c_int) -> io::Result<()> {
    // SAFETY: `fd` is an open socket for the whole call; the option value
    // is a live c_int and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            ptr::from_ref(&value).cast::<c_void>(),
            size_of::<c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to report each datagram's destination address.
///
/// An IPv4 socket gets `IP_PKTINFO`. An IPv6 socket gets `IPV6_RECVPKTINFO`,
/// and, when `dual_stack`, also `IP_PKTINFO`, whose "specific destination"
/// is the better source for replies to IPv4 broadcasts.
pub(crate) fn enable_pktinfo(fd: BorrowedFd<'_>, ipv6: bool, dual_stack: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        if dual_stack {
            setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
        }
        Ok(())
    } else {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
    }
}

/// Asks the kernel to attach its count of dropped datagrams (receive
/// buffer full) to each datagram received, so that those drops are counted
/// too.
pub(crate) fn enable_drop_count(fd: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt_int(fd, libc::SOL_SOCKET, SO_RXQ_OVFL, 1)
}

/// Receive slots for one `recvmmsg` call: [`BATCH`] buffers with an
/// address and a control-message buffer each. Reused from call to call;
/// holds raw pointers into itself only during a call.
pub(crate) struct RecvBatch {
    slot_len: usize,
    /// `BATCH` slots of `slot_len` bytes, one after the other. Allocated
    /// zeroed, so the pages of a slot become resident only once a datagram
    /// that long has been received into it.
    bufs: Box<[u8]>,
    names: [libc::sockaddr_storage; BATCH],
    cmsgs: [CmsgBuf; BATCH],
    iovs: [libc::iovec; BATCH],
    hdrs: [libc::mmsghdr; BATCH],
    /// Messages the last call received.
    count: usize,
}

impl RecvBatch {
    /// Slots of `slot_len` bytes; a longer datagram is reported truncated.
    pub(crate) fn new(slot_len: usize) -> Box<RecvBatch> {
        // SAFETY: all-zero bytes are valid for these plain C structs (null
        // pointers, zero lengths, AF_UNSPEC); `recv` sets what matters.
        let (name, iov, hdr) = unsafe { (mem::zeroed(), mem::zeroed(), mem::zeroed()) };
        Box::new(RecvBatch {
            slot_len,
            bufs: vec![0; BATCH * slot_len].into_boxed_slice(),
            names: [name; BATCH],
            cmsgs: [CmsgBuf([0; 128]); BATCH],
            iovs: [iov; BATCH],
            hdrs: [hdr; BATCH],
            count: 0,
        })
    }

    /// Receives up to [`BATCH`] datagrams (`recvmmsg`); returns how many.
    /// `with_peers` asks for each sender, which a connected socket does not
    /// need. Never blocks: an empty queue is
    /// `WouldBlock`. An error that comes after some datagrams (an ICMP
    /// report on a connected socket) is kept by the kernel for the next
    /// call.
    pub(crate) fn recv(&mut self, fd: BorrowedFd<'_>, with_peers: bool) -> io::Result<usize> {
        self.count = 0;
        let base = self.bufs.as_mut_ptr();
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                // SAFETY: slot `i` starts inside `bufs`, which holds BATCH
                // slots of `slot_len` bytes.
                iov_base: unsafe { base.add(i * self.slot_len) }.cast::<c_void>(),
                iov_len: self.slot_len,
            };
            // SAFETY: all-zero bytes are a valid msghdr (null pointers, zero
            // lengths); the fields that matter are set right below.
            let mut msg: libc::msghdr = unsafe { mem::zeroed() };
            msg.msg_iov = &mut self.iovs[i];
            msg.msg_iovlen = 1;
            if with_peers {
                msg.msg_name = ptr::from_mut(&mut self.names[i]).cast::<c_void>();
                msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            }
            // The kernel writes only the control messages the socket asked
            // for, and SO_RXQ_OVFL's only after a drop.
            msg.msg_control = self.cmsgs[i].0.as_mut_ptr().cast::<c_void>();
            msg.msg_controllen = self.cmsgs[i].0.len() as _;
            self.hdrs[i] = libc::mmsghdr {
                msg_hdr: msg,
                msg_len: 0,
            };
        }
        // SAFETY: each of the BATCH headers points to live, writable memory
        // of the length given next to it (its slot through its iovec, its
        // address storage and its control buffer), all owned by `self` and
        // not moved during the call. MSG_TRUNC makes each msg_len the
        // datagram's real length; no timeout (the socket is non-blocking).
        let n = unsafe {
            libc::recvmmsg(
                fd.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                BATCH as _,
                libc::MSG_TRUNC as _,
                ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        self.count = n as usize;
        Ok(self.count)
    }

    /// The bytes of datagram `i` of the last call, as [`RecvBatch::get`]
    /// gives them, without reading its control messages again.
    pub(crate) fn data(&self, i: usize) -> &[u8] {
        assert!(i < self.count, "datagram {i} of {}", self.count);
        let len = (self.hdrs[i].msg_len as usize).min(self.slot_len);
        let start = i * self.slot_len;
        &self.bufs[start..start + len]
    }

    /// Datagram `i` of the last call: what the kernel said about it, and
    /// its bytes (all of them unless truncated).
    pub(crate) fn get(&self, i: usize) -> (Received, &[u8]) {
        assert!(i < self.count, "datagram {i} of {}", self.count);
        let hdr = &self.hdrs[i];
        let msg = &hdr.msg_hdr;
        let len = hdr.msg_len as usize;
        let control = if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            Control::default()
        } else {
            let written: usize = msg.msg_controllen as _;
            let written = written.min(self.cmsgs[i].0.len());
            parse_control(&self.cmsgs[i].0[..written])
        };
        let peer = if msg.msg_name.is_null() {
            None
        } else {
            socket_addr(&self.names[i], msg.msg_namelen)
        };
        let start = i * self.slot_len;
        let meta = Received {
            len,
            truncated: msg.msg_flags & libc::MSG_TRUNC != 0 || len > self.slot_len,
            peer,
            reply_from: control.reply_from,
            kernel_drops: control.kernel_drops,
        };
        (meta, &self.bufs[start..start + len.min(self.slot_len)])
    }
}

/// The IP address in `storage`, of which the kernel wrote `len` bytes.
fn socket_addr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match c_int::from(storage.ss_family) {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says a sockaddr_in is stored, which
            // sockaddr_storage is large and aligned enough to hold.
            let a = unsafe { &*ptr::from_ref(storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*ptr::from_ref(storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                u32::from_be(a.sin6_flowinfo),
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// What the control messages of one datagram said.
#[derive(Default)]
struct Control {
    reply_from: Option<ReplyFrom>,
    kernel_drops: Option<u32>,
}

/// Reads the destination address and the drop count out of the control
/// messages in `control` (the bytes `recvmsg` wrote). Pure, so that any
/// bytes can be fed to it in tests; later messages of a kind win, as they
/// do for the kernel's own cmsg walkers.
fn parse_control(control: &[u8]) -> Control {
    let (mut v4, mut v6, mut kernel_drops) = (None, None, None);
    for c in crate::sys::cmsg::control_messages(control) {
        match (c.level, c.kind) {
            (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                if let Some(r) = in_pktinfo(c.data) {
                    v4 = Some(r);
                }
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                if let Some(r) = in6_pktinfo(c.data) {
                    v6 = Some(r);
                }
            }
            (libc::SOL_SOCKET, SO_RXQ_OVFL) => {
                if let Some(n) = ne_u32(c.data, 0) {
                    kernel_drops = Some(n);
                }
            }
            _ => {}
        }
    }
    Control {
        // For an IPv4 datagram on a dual-stack socket both are present;
        // IP_PKTINFO's spec_dst is a usable local address even for a
        // broadcast.
        reply_from: v4.or(v6).filter(|r| can_be_source(r.ip)),
        kernel_drops,
    }
}

/// The `u32` at `at` in `b`, in host order, if `b` holds all of it.
fn ne_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// An `in_pktinfo` payload: the local address the datagram was sent to
/// (`ipi_spec_dst`, network order) and its interface.
fn in_pktinfo(b: &[u8]) -> Option<ReplyFrom> {
    if b.len() < size_of::<libc::in_pktinfo>() {
        return None;
    }
    let ifindex = ne_u32(b, mem::offset_of!(libc::in_pktinfo, ipi_ifindex))?;
    let dst = ne_u32(b, mem::offset_of!(libc::in_pktinfo, ipi_spec_dst))?;
    Some(ReplyFrom {
        ip: IpAddr::V4(Ipv4Addr::from(u32::from_be(dst))),
        ifindex,
    })
}

/// An `in6_pktinfo` payload: the destination address and interface.
fn in6_pktinfo(b: &[u8]) -> Option<ReplyFrom> {
    if b.len() < size_of::<libc::in6_pktinfo>() {
        return None;
    }
    let at = mem::offset_of!(libc::in6_pktinfo, ipi6_addr);
    let addr: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
    Some(ReplyFrom {
        ip: Ipv6Addr::from(addr).to_canonical(),
        ifindex: ne_u32(b, mem::offset_of!(libc::in6_pktinfo, ipi6_ifindex))?,
    })
}

fn can_be_source(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
    }
}

const fn cmsg_len(payload: usize) -> usize {
    // SAFETY: CMSG_LEN is pure arithmetic on its argument.
    unsafe { libc::CMSG_LEN(payload as c_uint) as usize }
}

const fn cmsg_space(payload: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    unsafe { libc::CMSG_SPACE(payload as c_uint) as usize }
}

/// Largest UDP payload over IPv4 (65,535 minus the IP and UDP headers),
/// and so the most one `UDP_SEGMENT` send may carry in all.
const GSO_MAX_BYTES: usize = 65_507;

/// How large a segment a socket's route takes in one `UDP_SEGMENT` send
/// (UDP GSO, Linux 4.18): several datagrams of one size, to one peer, in one
/// syscall and one trip through the stack, which the kernel (or the NIC)
/// cuts into the datagrams they were. It starts at "any" and comes down
/// when a send shows that the route cannot take segments that large (their
/// packets would be longer than its MTU), or to 0 when it cannot take any
/// (an IPsec route, a kernel without UDP GSO). Shared by the sockets of a
/// binding that send the same way, so that each learns it once.
pub(crate) struct Gso(AtomicUsize);

impl Gso {
    pub(crate) const fn new() -> Gso {
        Gso(AtomicUsize::new(GSO_MAX_BYTES))
    }

    /// Never segment: every datagram goes in its own `sendmmsg` message.
    #[cfg(test)]
    pub(crate) const fn off() -> Gso {
        Gso(AtomicUsize::new(0))
    }

    /// The largest segment size still worth trying.
    pub(crate) fn limit(&self) -> usize {
        self.0.load(Relaxed)
    }

    fn lower(&self, to: usize) {
        self.0.fetch_min(to, Relaxed);
    }
}

/// The run of datagrams at the start of `iovs` that one `UDP_SEGMENT` send
/// can carry: (segment size, how many). Every one but the last must have
/// the segment size and the last may be shorter, but not empty (the kernel
/// cuts by size, so an empty one would vanish and a longer one be split);
/// the segment size at most `limit`; all of them together at most
/// [`GSO_MAX_BYTES`]. `None` when the run is shorter than two.
fn gso_run(iovs: &[libc::iovec], limit: usize) -> Option<(usize, usize)> {
    let size = iovs.first()?.iov_len;
    if size == 0 || size > limit.min(usize::from(u16::MAX)) {
        return None;
    }
    let (mut count, mut total) = (0, 0);
    for iov in iovs {
        if iov.iov_len == 0 || iov.iov_len > size || total + iov.iov_len > GSO_MAX_BYTES {
            break;
        }
        count += 1;
        total += iov.iov_len;
        if iov.iov_len < size {
            break;
        }
    }
    (count >= 2).then_some((size, count))
}

/// What one [`send_batch`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Sent {
    /// How many datagrams went, from the first.
    pub count: usize,
    /// The kernel stopped at the next one and did not say why
    /// (sendmmsg(2), BUGS): send that one on its own to learn it. When
    /// false and datagrams are left, they were simply more than one call
    /// takes: send them again.
    pub stopped: bool,
}

/// Control messages for a send, one after the other in an aligned buffer.
struct SendControl {
    buf: CmsgBuf,
    len: usize,
}

impl SendControl {
    fn new() -> SendControl {
        SendControl {
            buf: CmsgBuf([0; 128]),
            len: 0,
        }
    }

    fn push(&mut self, level: c_int, kind: c_int, payload: &[u8]) {
        let space = cmsg_space(payload.len());
        assert!(self.len + space <= self.buf.0.len(), "control buffer full");
        // SAFETY: `len` is a multiple of CMSG_SPACE's alignment (that of
        // cmsghdr) in a buffer aligned for cmsghdr, and the assert above
        // keeps the header and its payload inside the buffer.
        unsafe {
            let c = self
                .buf
                .0
                .as_mut_ptr()
                .add(self.len)
                .cast::<libc::cmsghdr>();
            (*c).cmsg_level = level;
            (*c).cmsg_type = kind;
            (*c).cmsg_len = cmsg_len(payload.len()) as _;
            ptr::copy_nonoverlapping(payload.as_ptr(), libc::CMSG_DATA(c), payload.len());
        }
        self.len += space;
    }

    /// Points `msg` at these messages (or at none).
    fn attach(&mut self, msg: &mut libc::msghdr) {
        if self.len > 0 {
            msg.msg_control = self.buf.0.as_mut_ptr().cast::<c_void>();
            msg.msg_controllen = self.len as _;
        }
    }
}

/// Sends `run` (datagrams of `size` bytes each, the last maybe shorter) as
/// one `UDP_SEGMENT` send: all of it, or nothing and the error.
fn send_segmented(
    fd: BorrowedFd<'_>,
    run: &mut [libc::iovec],
    size: usize,
    to: Option<&SockAddr>,
    pktinfo: Option<&Pktinfo>,
) -> io::Result<()> {
    let mut control = SendControl::new();
    if let Some(info) = pktinfo {
        control.push(info.level, info.kind, info.as_slice());
    }
    control.push(
        libc::SOL_UDP,
        libc::UDP_SEGMENT,
        &(size as u16).to_ne_bytes(),
    );
    // SAFETY: all-zero bytes are a valid msghdr (null pointers, zero
    // lengths); the fields that matter are set right below.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    if let Some(to) = to {
        msg.msg_name = to.as_ptr().cast_mut().cast::<c_void>();
        msg.msg_namelen = to.len();
    }
    msg.msg_iov = run.as_mut_ptr();
    msg.msg_iovlen = run.len() as _;
    control.attach(&mut msg);
    // SAFETY: every pointer in `msg` points to live memory of the length
    // given next to it (the address, the run's datagrams through `run`, the
    // control messages), all of which outlive the call; the kernel only
    // reads them.
    let rc = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, 0) };
    if rc >= 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends the first [`BATCH`] of `datagrams`, each whole, in order, to `to`
/// (`None` on a connected socket) from the address in `from` (when given).
/// `ipv6_socket` says which family the socket is, which decides the form of
/// the control message.
///
/// A run of datagrams of one size goes as one `UDP_SEGMENT` send when `gso`
/// allows it, and the rest with one `sendmmsg`. When the route turns out
/// not to take the run's segments, it goes with `sendmmsg` after all and
/// `gso` learns the limit. An error is returned only when the first
/// datagram failed, and then none went. Never blocks: a full send buffer is
/// `WouldBlock`.
pub(crate) fn send_batch<'a>(
    fd: BorrowedFd<'_>,
    datagrams: impl IntoIterator<Item = &'a [u8]>,
    to: Option<SocketAddr>,
    from: Option<ReplyFrom>,
    ipv6_socket: bool,
    gso: &Gso,
) -> io::Result<Sent> {
    // SAFETY: all-zero bytes are valid iovecs (null pointers, zero lengths);
    // the ones passed to the kernel are filled next.
    let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
    let mut n = 0;
    for data in datagrams.into_iter().take(BATCH) {
        iovs[n] = libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast::<c_void>(),
            iov_len: data.len(),
        };
        n += 1;
    }
    let iovs = &mut iovs[..n];
    if n == 0 {
        return Ok(Sent {
            count: 0,
            stopped: false,
        });
    }
    let to = to.map(SockAddr::from);
    let pktinfo = from.map(|from| Pktinfo::new(from, ipv6_socket));
    let mut refused = None;
    if let Some((size, count)) = gso_run(iovs, gso.limit()) {
        match send_segmented(fd, &mut iovs[..count], size, to.as_ref(), pktinfo.as_ref()) {
            Ok(()) => {
                return Ok(Sent {
                    count,
                    stopped: false,
                });
            }
            Err(e) => {
                refused = match e.raw_os_error() {
                    // Segments too large for the route (older kernels say EINVAL).
                    Some(libc::EMSGSIZE | libc::EINVAL) => Some(size - 1),
                    // No GSO on this route or in this kernel.
                    Some(libc::EIO | libc::ENOPROTOOPT | libc::EOPNOTSUPP) => Some(0),
                    _ => return Err(e),
                }
            }
        }
    }
    let mut control = SendControl::new();
    if let Some(info) = &pktinfo {
        control.push(info.level, info.kind, info.as_slice());
    }
    // SAFETY: all-zero bytes are valid mmsghdrs (null pointers, zero
    // lengths); the first `n` are filled next.
    let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
    for (hdr, iov) in hdrs.iter_mut().zip(iovs.iter_mut()) {
        let msg = &mut hdr.msg_hdr;
        if let Some(to) = &to {
            msg.msg_name = to.as_ptr().cast_mut().cast::<c_void>();
            msg.msg_namelen = to.len();
        }
        msg.msg_iov = iov;
        msg.msg_iovlen = 1;
        // One control message serves every datagram: the kernel only
        // reads it.
        control.attach(msg);
    }
    // SAFETY: the first `n` headers point to live memory of the length
    // given next to each pointer (the address, the datagrams through
    // `iovs`, the control messages), all of which outlive the call; the
    // kernel reads them and writes only each header's msg_len.
    let rc = unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), n as _, 0) };
    if rc < 0 {
        // Also when the segmented send failed: then this error says
        // whether that was about segmenting (this went) or not (this
        // failed too), and `gso` stays as it was.
        return Err(io::Error::last_os_error());
    }
    if let Some(limit) = refused {
        gso.lower(limit);
    }
    let count = rc as usize;
    Ok(Sent {
        count,
        stopped: count < n,
    })
}

/// Sends `data` to `to` from the address in `from` (when given) on an
/// unconnected socket: [`send_batch`] of one, which reports its own error.
pub(crate) fn send_to_from(
    fd: BorrowedFd<'_>,
    data: &[u8],
    to: SocketAddr,
    from: Option<ReplyFrom>,
    ipv6_socket: bool,
) -> io::Result<()> {
    send_batch(fd, [data], Some(to), from, ipv6_socket, &Gso::new()).map(|_| ())
}

/// The control message that sets the source address: `IP_PKTINFO` on an
/// IPv4 socket; `IPV6_PKTINFO` on an IPv6 one, with an IPv4 address in its
/// v4-mapped form (the kernel takes that for IPv4 destinations too).
struct Pktinfo {
    level: c_int,
    kind: c_int,
    /// The struct's bytes (12 for in_pktinfo, 20 for in6_pktinfo), on the
    /// stack: this is built for every batch of replies.
    bytes: [u8; 20],
    len: usize,
}

impl Pktinfo {
    fn new(from: ReplyFrom, ipv6_socket: bool) -> Pktinfo {
        match (from.ip, ipv6_socket) {
            (IpAddr::V4(a), false) => {
                let info = libc::in_pktinfo {
                    // 0: routing picks the interface; only the source is fixed.
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(a).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                Pktinfo::of(libc::IPPROTO_IP, libc::IP_PKTINFO, &info)
            }
            (ip, _) => {
                let v6 = match ip {
                    IpAddr::V4(a) => a.to_ipv6_mapped(),
                    IpAddr::V6(a) => a,
                };
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: if v6.is_unicast_link_local() {
                        from.ifindex
                    } else {
                        0
                    },
                };
                Pktinfo::of(libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &info)
            }
        }
    }

    /// The bytes of a plain C struct without padding (in_pktinfo,
    /// in6_pktinfo).
    fn of<T: Copy>(level: c_int, kind: c_int, v: &T) -> Pktinfo {
        const { assert!(size_of::<T>() <= 20) };
        let mut bytes = [0u8; 20];
        // SAFETY: `v` is a live T of size_of::<T>() bytes and `bytes` has
        // that room (checked above); both pktinfo structs consist of
        // integers without padding, so every byte read is initialised.
        unsafe {
            ptr::copy_nonoverlapping(
                ptr::from_ref(v).cast::<u8>(),
                bytes.as_mut_ptr(),
                size_of::<T>(),
            );
        }
        Pktinfo {
            level,
            kind,
            bytes,
            len: size_of::<T>(),
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod control_props;
