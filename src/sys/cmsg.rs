//! Control messages (`cmsghdr`): walking the ones `recvmsg` wrote, and
//! laying out the ones a `sendmsg` carries. Shared by the UDP and SCTP
//! calls.

/// Control-message space for one call, aligned like `cmsghdr`, as the
/// `CMSG_*` accessors require. 128 bytes hold what any nsproxy call asks
/// for, with margin: a UDP datagram's `IP_PKTINFO`, `IPV6_PKTINFO` (a
/// dual-stack socket gets both for an IPv4 datagram) and `SO_RXQ_OVFL`
/// (32 + 40 + 24 bytes on 64-bit), or an SCTP message's `SCTP_RCVINFO`
/// and `SCTP_NXTINFO`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub(crate) struct CmsgBuf(pub(crate) [u8; 128]);

/// One control message (`cmsghdr` and its payload) out of a `recvmsg`
/// control buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cmsg<'a> {
    pub(crate) level: libc::c_int,
    pub(crate) kind: libc::c_int,
    pub(crate) data: &'a [u8],
}

/// The control messages in `control` (the first `msg_controllen` bytes of a
/// `recvmsg` control buffer), in order; what CMSG_FIRSTHDR / CMSG_NXTHDR
/// walk, but over a byte slice, so that no length in it can lead a read
/// outside it. A header that is cut short or claims more bytes than remain
/// ends the walk.
pub(crate) fn control_messages(control: &[u8]) -> impl Iterator<Item = Cmsg<'_>> {
    /// Header size; also where the payload starts (CMSG_DATA), as the
    /// header's size is a multiple of the alignment.
    const HDR: usize = size_of::<libc::cmsghdr>();
    /// CMSG_ALIGN: headers start at multiples of size_t.
    const ALIGN: usize = size_of::<usize>();
    const _: () = assert!(HDR % ALIGN == 0);
    let mut rest = control;
    std::iter::from_fn(move || {
        let header = rest.get(..HDR)?;
        // SAFETY: `header` holds HDR = size_of::<cmsghdr>() initialised
        // bytes; read_unaligned needs no alignment, and cmsghdr consists of
        // integers, for which every bit pattern is valid.
        let h = unsafe { std::ptr::read_unaligned(header.as_ptr().cast::<libc::cmsghdr>()) };
        // size_t with glibc, socklen_t with musl.
        let len: usize = h.cmsg_len as _;
        let data = rest.get(HDR..len)?;
        rest = rest.get(len.next_multiple_of(ALIGN)..).unwrap_or_default();
        Some(Cmsg {
            level: h.cmsg_level,
            kind: h.cmsg_type,
            data,
        })
    })
}
