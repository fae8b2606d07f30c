//! The UDP syscalls std, socket2 and tokio do not offer: `recvmsg` that
//! reports the datagram's destination address (`IP_PKTINFO` /
//! `IPV6_PKTINFO` control messages), its real length and the socket's
//! count of datagrams the kernel dropped (`SO_RXQ_OVFL`), and `sendmsg`
//! that picks the reply's source address.
//!
//! A listener bound to a wildcard address must answer from the address the
//! client sent to, or a client that `connect`ed its socket drops the reply.
//! Routing would pick *a* source address, not necessarily that one.
//!
//! Everything here is non-blocking and returns `WouldBlock` as an error, so
//! that callers can run it inside tokio's `async_io`.

#![allow(unsafe_code)]

use std::io;
use std::mem::{self, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

use libc::{c_int, c_uint, c_void};
use socket2::SockAddr;

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

/// One datagram taken off a listening socket.
#[derive(Debug)]
pub(crate) struct Received {
    /// The datagram's real length, also when it did not fit the buffer.
    pub len: usize,
    /// The datagram was longer than the buffer; only `buf.len()` bytes of it
    /// were kept, and the rest is gone.
    pub truncated: bool,
    /// The client, as the socket sees it (v4-mapped on a dual-stack socket).
    pub peer: SocketAddr,
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

/// Receives one datagram into `buf` (`recvmsg` with packet info). Never
/// blocks: an empty queue is `WouldBlock`.
pub(crate) fn recv_from_to(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg = CmsgBuf([0; 128]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<c_void>(),
        iov_len: buf.len(),
    };
    let mut raw = RawRecv::default();
    let recv = |storage: *mut socket2::SockAddrStorage, len: *mut libc::socklen_t| {
        // SAFETY: all-zero bytes are a valid msghdr (null pointers, zero
        // lengths); the fields that matter are set right below.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = storage.cast::<c_void>();
        // SAFETY: `try_init` passes a valid pointer to the storage's size.
        msg.msg_namelen = unsafe { *len };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.0.as_mut_ptr().cast::<c_void>();
        msg.msg_controllen = cmsg.0.len() as _;
        // SAFETY: every pointer in `msg` points to live, writable memory of
        // the length given next to it (the address storage, `buf` through
        // `iov`, and `cmsg`), all of which outlive the call. MSG_TRUNC makes
        // the result the datagram's real length.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above; recvmsg set msg_namelen to the address's length.
        unsafe { *len = msg.msg_namelen };
        raw = RawRecv {
            len: n as usize,
            flags: msg.msg_flags,
            control: if msg.msg_flags & libc::MSG_CTRUNC == 0 {
                // SAFETY: `msg` describes the aligned control buffer the
                // kernel just filled (recvmsg set msg_controllen to what it
                // wrote), and nothing in it was cut off.
                unsafe { parse_control(&msg) }
            } else {
                Control::default()
            },
        };
        Ok(())
    };
    // SAFETY: `try_init` hands `recv` zeroed address storage and its size;
    // `recv` lets the kernel fill it and sets the length it wrote, which is
    // what `try_init` requires to build the address.
    let (_, peer) = unsafe { SockAddr::try_init(recv) }?;
    let peer = peer.as_socket().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "datagram from a non-IP address")
    })?;
    Ok(Received {
        len: raw.len,
        truncated: raw.flags & libc::MSG_TRUNC != 0 || raw.len > buf.len(),
        peer,
        reply_from: raw.control.reply_from,
        kernel_drops: raw.control.kernel_drops,
    })
}

#[derive(Default)]
struct RawRecv {
    len: usize,
    flags: c_int,
    control: Control,
}

/// What the control messages of one datagram said.
#[derive(Default)]
struct Control {
    reply_from: Option<ReplyFrom>,
    kernel_drops: Option<u32>,
}

/// Reads the destination address and the drop count out of the control
/// messages of `msg`.
///
/// # Safety
/// `msg.msg_control` must point to `msg.msg_controllen` bytes filled by a
/// successful `recvmsg`, aligned for `cmsghdr`.
unsafe fn parse_control(msg: &libc::msghdr) -> Control {
    let (mut v4, mut v6, mut kernel_drops) = (None, None, None);
    // SAFETY: the caller guarantees a valid, kernel-written control buffer;
    // CMSG_FIRSTHDR/CMSG_NXTHDR stay inside it and return null at its end.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !c.is_null() {
        // SAFETY: `c` is non-null and points to a whole cmsghdr inside the
        // buffer (CMSG_NXTHDR checks that).
        let hdr = unsafe { &*c };
        let data_len = hdr.cmsg_len as usize;
        // SAFETY: CMSG_DATA only offsets the pointer past the header.
        let data = unsafe { libc::CMSG_DATA(c) };
        if hdr.cmsg_level == libc::IPPROTO_IP
            && hdr.cmsg_type == libc::IP_PKTINFO
            && data_len >= cmsg_len(size_of::<libc::in_pktinfo>())
        {
            // SAFETY: the length check above says a whole in_pktinfo
            // follows the header; read_unaligned needs no alignment.
            let info = unsafe { ptr::read_unaligned(data.cast::<libc::in_pktinfo>()) };
            v4 = Some(ReplyFrom {
                ip: IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr))),
                ifindex: info.ipi_ifindex as u32,
            });
        } else if hdr.cmsg_level == libc::IPPROTO_IPV6
            && hdr.cmsg_type == libc::IPV6_PKTINFO
            && data_len >= cmsg_len(size_of::<libc::in6_pktinfo>())
        {
            // SAFETY: as above, for in6_pktinfo.
            let info = unsafe { ptr::read_unaligned(data.cast::<libc::in6_pktinfo>()) };
            v6 = Some(ReplyFrom {
                ip: Ipv6Addr::from(info.ipi6_addr.s6_addr).to_canonical(),
                ifindex: info.ipi6_ifindex,
            });
        } else if hdr.cmsg_level == libc::SOL_SOCKET
            && hdr.cmsg_type == SO_RXQ_OVFL
            && data_len >= cmsg_len(size_of::<u32>())
        {
            // SAFETY: as above, for the u32 count.
            kernel_drops = Some(unsafe { ptr::read_unaligned(data.cast::<u32>()) });
        }
        // SAFETY: `msg` and `c` are as above.
        c = unsafe { libc::CMSG_NXTHDR(msg, c) };
    }
    Control {
        // For an IPv4 datagram on a dual-stack socket both are present;
        // IP_PKTINFO's spec_dst is a usable local address even for a
        // broadcast.
        reply_from: v4.or(v6).filter(|r| can_be_source(r.ip)),
        kernel_drops,
    }
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

/// Sends `data` to `to` from the address in `from` (when given) on an
/// unconnected socket. `ipv6_socket` says which family the socket is, which
/// decides the form of the control message. Never blocks: a full send
/// buffer is `WouldBlock`.
pub(crate) fn send_to_from(
    fd: BorrowedFd<'_>,
    data: &[u8],
    to: SocketAddr,
    from: Option<ReplyFrom>,
    ipv6_socket: bool,
) -> io::Result<usize> {
    let to = SockAddr::from(to);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast::<c_void>(),
        iov_len: data.len(),
    };
    let mut cmsg = CmsgBuf([0; 128]);
    // SAFETY: all-zero bytes are a valid msghdr (null pointers, zero lengths).
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = to.as_ptr().cast_mut().cast::<c_void>();
    msg.msg_namelen = to.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(from) = from {
        let (level, kind, payload) = pktinfo_payload(from, ipv6_socket);
        msg.msg_control = cmsg.0.as_mut_ptr().cast::<c_void>();
        msg.msg_controllen = cmsg_space(payload.len()) as _;
        // SAFETY: msg_control points to `cmsg`, which is aligned for
        // cmsghdr and larger than msg_controllen, so CMSG_FIRSTHDR returns
        // its start, and the header plus `payload.len()` bytes of data fit.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = level;
            (*c).cmsg_type = kind;
            (*c).cmsg_len = cmsg_len(payload.len()) as _;
            ptr::copy_nonoverlapping(payload.as_ptr(), libc::CMSG_DATA(c), payload.len());
        }
    }
    // SAFETY: every pointer in `msg` points to live memory of the length
    // given next to it (the address, `data` through `iov`, `cmsg`); the
    // kernel only reads them.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The control message that sets the source address: `IP_PKTINFO` on an
/// IPv4 socket; `IPV6_PKTINFO` on an IPv6 one, with an IPv4 address in its
/// v4-mapped form (the kernel takes that for IPv4 destinations too).
fn pktinfo_payload(from: ReplyFrom, ipv6_socket: bool) -> (c_int, c_int, Vec<u8>) {
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
            (libc::IPPROTO_IP, libc::IP_PKTINFO, pod_bytes(&info))
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
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, pod_bytes(&info))
        }
    }
}

/// The bytes of a plain C struct without padding (in_pktinfo, in6_pktinfo).
fn pod_bytes<T: Copy>(v: &T) -> Vec<u8> {
    let mut out = vec![0u8; size_of::<T>()];
    // SAFETY: `v` is a live T of size_of::<T>() bytes and `out` has that
    // room; both pktinfo structs consist of integers without padding, so
    // every byte read is initialised.
    unsafe { ptr::copy_nonoverlapping(ptr::from_ref(v).cast::<u8>(), out.as_mut_ptr(), out.len()) };
    out
}

/// Receives one datagram on a connected socket into `buf`; returns its real
/// length, which is more than `buf.len()` when it was truncated. Never
/// blocks: an empty queue is `WouldBlock`. A pending ICMP error (such as
/// port unreachable, ECONNREFUSED) is returned, and thereby cleared.
pub(crate) fn recv_connected(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is live and writable for `buf.len()` bytes; with
    // MSG_TRUNC the kernel still writes at most that many and returns the
    // datagram's real length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast::<c_void>(),
            buf.len(),
            libc::MSG_TRUNC,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    //! Local AF_UNIX datagram pairs: no network traffic, and the kernel
    //! reports truncation on them the same way (Linux 3.4 and later).

    use std::os::fd::AsFd;
    use std::os::unix::net::UnixDatagram;

    use super::*;

    #[test]
    fn truncation_is_reported_with_the_real_length() {
        let (a, b) = UnixDatagram::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        a.send(&[7u8; 100]).unwrap();
        a.send(&[8u8; 10]).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(recv_connected(b.as_fd(), &mut buf).unwrap(), 100);
        assert_eq!(buf, [7u8; 16]);
        // Boundaries stay: the next read is the next datagram, whole.
        assert_eq!(recv_connected(b.as_fd(), &mut buf).unwrap(), 10);
        let e = recv_connected(b.as_fd(), &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn empty_datagrams_are_datagrams() {
        let (a, b) = UnixDatagram::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        a.send(&[]).unwrap();
        assert_eq!(recv_connected(b.as_fd(), &mut [0u8; 4]).unwrap(), 0);
    }

    #[test]
    fn pktinfo_payloads_have_the_kernel_layout() {
        let from = |ip: &str| ReplyFrom {
            ip: ip.parse().unwrap(),
            ifindex: 3,
        };
        let (level, kind, p) = pktinfo_payload(from("127.0.0.2"), false);
        assert_eq!(
            (level, kind, p.len()),
            (libc::IPPROTO_IP, libc::IP_PKTINFO, 12)
        );
        // ifindex 0, spec_dst 127.0.0.2, addr 0
        assert_eq!(p, [0, 0, 0, 0, 127, 0, 0, 2, 0, 0, 0, 0]);
        let (level, kind, p) = pktinfo_payload(from("127.0.0.2"), true);
        assert_eq!(
            (level, kind, p.len()),
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, 20)
        );
        assert_eq!(
            &p[..16],
            &Ipv4Addr::new(127, 0, 0, 2).to_ipv6_mapped().octets()
        );
        assert_eq!(&p[16..], &[0, 0, 0, 0], "no interface for a global address");
        let (_, _, p) = pktinfo_payload(from("fe80::1"), true);
        assert_eq!(
            &p[16..],
            &3u32.to_ne_bytes(),
            "link-local needs its interface"
        );
    }

    #[test]
    fn multicast_and_broadcast_are_never_sources() {
        for ip in ["224.0.0.1", "255.255.255.255", "0.0.0.0", "ff02::1", "::"] {
            assert!(!can_be_source(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["127.0.0.2", "10.1.2.3", "::1", "fe80::1"] {
            assert!(can_be_source(ip.parse().unwrap()), "{ip}");
        }
    }
}
