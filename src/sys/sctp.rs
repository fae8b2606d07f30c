//! The raw calls: `setsockopt`/`getsockopt` at level `SOL_SCTP`, and
//! `recvmsg`/`sendmsg` with one SCTP control message each.
//!
//! This is the only unsafe code of the SCTP layer; the safe one is
//! [`crate::sctp`]. The structures mirror the kernel's UAPI header
//! `<linux/sctp.h>` (stable ABI); libc 0.2 exports none of them for Linux, so
//! they are declared here with their sizes checked at compile time against
//! the C layout.

use std::io;
use std::mem::{self, size_of};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

use libc::{c_int, c_void, socklen_t};

use super::cmsg::CmsgBuf;

/// Socket option level of SCTP (`SOL_SCTP`, equal to `IPPROTO_SCTP`).
pub(crate) const SOL_SCTP: c_int = libc::IPPROTO_SCTP;

// Socket options (<linux/sctp.h>).
pub(crate) const SCTP_INITMSG: c_int = 2;
pub(crate) const SCTP_NODELAY: c_int = 3;
pub(crate) const SCTP_EVENTS: c_int = 11;
pub(crate) const SCTP_STATUS: c_int = 14;
pub(crate) const SCTP_RECVRCVINFO: c_int = 32;
pub(crate) const SCTP_SOCKOPT_BINDX_ADD: c_int = 100;
pub(crate) const SCTP_SOCKOPT_CONNECTX: c_int = 110;
pub(crate) const SCTP_GET_PEER_ADDRS: c_int = 108;
pub(crate) const SCTP_GET_LOCAL_ADDRS: c_int = 109;

// Control message types (`cmsg_type` at level `SOL_SCTP`).
const SCTP_SNDINFO: c_int = 2;
const SCTP_RCVINFO: c_int = 3;

/// `struct sctp_initmsg`: stream counts and INIT retries for new associations.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SctpInitmsg {
    pub num_ostreams: u16,
    pub max_instreams: u16,
    pub max_attempts: u16,
    pub max_init_timeo: u16,
}

/// `struct sctp_sndinfo` (RFC 6458 5.3.4), sent as an `SCTP_SNDINFO` cmsg.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SctpSndinfo {
    pub snd_sid: u16,
    pub snd_flags: u16,
    pub snd_ppid: u32,
    pub snd_context: u32,
    pub snd_assoc_id: i32,
}

/// `struct sctp_rcvinfo` (RFC 6458 5.3.5), received as an `SCTP_RCVINFO`
/// cmsg once `SCTP_RECVRCVINFO` is on.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SctpRcvinfo {
    pub rcv_sid: u16,
    pub rcv_ssn: u16,
    pub rcv_flags: u16,
    pub rcv_ppid: u32,
    pub rcv_tsn: u32,
    pub rcv_cumtsn: u32,
    pub rcv_context: u32,
    pub rcv_assoc_id: i32,
}

/// The first eight fields of `struct sctp_event_subscribe`, one byte per
/// notification type. The struct grew over kernel versions (14 bytes in 6.1);
/// the kernel accepts any prefix of it and leaves the rest as it was, so this
/// prefix works on every kernel with SCTP.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct SctpEventSubscribe {
    pub data_io: u8,
    pub association: u8,
    pub address: u8,
    pub send_failure: u8,
    pub peer_error: u8,
    pub shutdown: u8,
    pub partial_delivery: u8,
    pub adaptation_layer: u8,
}

/// `struct sctp_paddrinfo` (packed, aligned to 4), part of [`SctpStatus`].
#[repr(C, packed(4))]
#[derive(Clone, Copy)]
pub(crate) struct SctpPaddrinfo {
    pub assoc_id: i32,
    pub address: libc::sockaddr_storage,
    pub state: i32,
    pub cwnd: u32,
    pub srtt: u32,
    pub rto: u32,
    pub mtu: u32,
}

/// `struct sctp_status`. `getsockopt(SCTP_STATUS)` wants the whole of it
/// (176 bytes) or fails with `EINVAL`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct SctpStatus {
    pub assoc_id: i32,
    pub state: i32,
    pub rwnd: u32,
    pub unackdata: u16,
    pub penddata: u16,
    pub instrms: u16,
    pub outstrms: u16,
    pub fragmentation_point: u32,
    pub primary: SctpPaddrinfo,
}

impl Default for SctpStatus {
    fn default() -> Self {
        // SAFETY: every field is an integer or a byte array (sockaddr_storage),
        // for which all-zero bytes are a valid value.
        unsafe { mem::zeroed() }
    }
}

// The C layouts, as the kernel's headers define them on x86-64 and aarch64.
const _: () = assert!(size_of::<SctpInitmsg>() == 8);
const _: () = assert!(size_of::<SctpSndinfo>() == 16);
const _: () = assert!(size_of::<SctpRcvinfo>() == 28);
const _: () = assert!(size_of::<SctpEventSubscribe>() == 8);
const _: () = assert!(size_of::<SctpPaddrinfo>() == 152);
const _: () = assert!(size_of::<SctpStatus>() == 176);

fn cvt(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `setsockopt(fd, SOL_SCTP, name, bytes)`; returns the call's result, which
/// `SCTP_SOCKOPT_CONNECTX` uses for the new association's id.
pub(crate) fn setsockopt_bytes(fd: BorrowedFd<'_>, name: c_int, bytes: &[u8]) -> io::Result<c_int> {
    let len =
        socklen_t::try_from(bytes.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the fd is open for the borrow's lifetime; the kernel reads
    // exactly `len` bytes from a live slice of that length.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            SOL_SCTP,
            name,
            bytes.as_ptr().cast::<c_void>(),
            len,
        )
    })
}

/// `setsockopt(fd, level, name, &value)` for a plain-old-data value.
pub(crate) fn setsockopt<T: Copy>(
    fd: BorrowedFd<'_>,
    level: c_int,
    name: c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: the fd is open for the borrow's lifetime; the kernel reads
    // size_of::<T>() bytes from a live reference to a T. Every T used here is
    // a #[repr(C)] struct of integers or a c_int.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast::<c_void>(),
            size_of::<T>() as socklen_t,
        )
    })
    .map(drop)
}

/// `getsockopt(fd, SOL_SCTP, name)` into a value that starts as `value` (some
/// options read an association id from it first).
pub(crate) fn getsockopt<T: Copy>(fd: BorrowedFd<'_>, name: c_int, mut value: T) -> io::Result<T> {
    let mut len = size_of::<T>() as socklen_t;
    // SAFETY: the fd is open; the kernel writes at most `len` bytes into the
    // live `value`, whose type (integers only) is valid for any bytes.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_SCTP,
            name,
            (&mut value as *mut T).cast::<c_void>(),
            &mut len,
        )
    })?;
    Ok(value)
}

/// `getsockopt(fd, SOL_SCTP, name)` into a byte buffer whose start the
/// caller filled in; returns how many bytes the kernel wrote.
pub(crate) fn getsockopt_bytes(
    fd: BorrowedFd<'_>,
    name: c_int,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len =
        socklen_t::try_from(buf.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: the fd is open; the kernel reads and writes at most `len`
    // bytes of the live, writable `buf`.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            SOL_SCTP,
            name,
            buf.as_mut_ptr().cast::<c_void>(),
            &mut len,
        )
    })?;
    Ok(len as usize)
}

/// What one `recvmsg` returned.
pub(crate) struct RawRecv {
    pub len: usize,
    pub flags: c_int,
    pub rcvinfo: Option<SctpRcvinfo>,
}

/// One `recvmsg(fd, buf)`; never blocks on a non-blocking fd.
pub(crate) fn recvmsg(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<RawRecv> {
    let mut cbuf = CmsgBuf([0; 128]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<c_void>(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast::<c_void>();
    msg.msg_controllen = cbuf.0.len() as _;
    // SAFETY: `msg` points at one iovec over the live, writable `buf` and at
    // the live `cbuf`; the kernel writes within their stated lengths.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let written: usize = msg.msg_controllen as _;
    let written = written.min(cbuf.0.len());
    let rcvinfo = rcvinfo_in(&cbuf.0[..written]);
    Ok(RawRecv {
        len: n as usize,
        flags: msg.msg_flags,
        rcvinfo,
    })
}

/// The `SCTP_RCVINFO` among the control messages `recvmsg` wrote (the
/// last, should there be several), decoded field by field from the bytes:
/// pure, so that any bytes can be fed to it in tests.
pub(crate) fn rcvinfo_in(control: &[u8]) -> Option<SctpRcvinfo> {
    super::cmsg::control_messages(control)
        .filter(|c| c.level == SOL_SCTP && c.kind == SCTP_RCVINFO)
        .filter_map(|c| rcvinfo_from(c.data))
        .last()
}

fn rcvinfo_from(b: &[u8]) -> Option<SctpRcvinfo> {
    if b.len() < size_of::<SctpRcvinfo>() {
        return None;
    }
    let u16_at = |at: usize| Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?));
    Some(SctpRcvinfo {
        rcv_sid: u16_at(mem::offset_of!(SctpRcvinfo, rcv_sid))?,
        rcv_ssn: u16_at(mem::offset_of!(SctpRcvinfo, rcv_ssn))?,
        rcv_flags: u16_at(mem::offset_of!(SctpRcvinfo, rcv_flags))?,
        rcv_ppid: u32_at(mem::offset_of!(SctpRcvinfo, rcv_ppid))?,
        rcv_tsn: u32_at(mem::offset_of!(SctpRcvinfo, rcv_tsn))?,
        rcv_cumtsn: u32_at(mem::offset_of!(SctpRcvinfo, rcv_cumtsn))?,
        rcv_context: u32_at(mem::offset_of!(SctpRcvinfo, rcv_context))?,
        rcv_assoc_id: u32_at(mem::offset_of!(SctpRcvinfo, rcv_assoc_id))? as i32,
    })
}

/// One `sendmsg(fd, data)` with an `SCTP_SNDINFO` cmsg: the whole of `data`
/// as one message. `MSG_NOSIGNAL`: a closed association gives `EPIPE`, not
/// `SIGPIPE`.
pub(crate) fn sendmsg(fd: BorrowedFd<'_>, data: &[u8], info: &SctpSndinfo) -> io::Result<usize> {
    // SAFETY: CMSG_SPACE is a pure size computation.
    const SPACE: usize = unsafe { libc::CMSG_SPACE(size_of::<SctpSndinfo>() as u32) } as usize;
    let mut cbuf = CmsgBuf([0; 128]);
    const _: () = assert!(SPACE <= 128);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast::<c_void>(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast::<c_void>();
    msg.msg_controllen = SPACE as _;
    // SAFETY: msg_control points at `cbuf` (aligned, SPACE <= its length), so
    // CMSG_FIRSTHDR returns a non-null header inside it with room for a
    // sctp_sndinfo after it, written unaligned. sendmsg only reads `data`
    // (the iovec's mutable pointer type is the C signature's, not a write).
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_SCTP;
        (*c).cmsg_type = SCTP_SNDINFO;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<SctpSndinfo>() as u32) as _;
        ptr::write_unaligned(libc::CMSG_DATA(c).cast::<SctpSndinfo>(), *info);
        libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Registers `socket` with the current tokio runtime's reactor.
pub(crate) fn register(
    socket: socket2::Socket,
) -> io::Result<tokio::io::unix::AsyncFd<socket2::Socket>> {
    use tokio::io::Interest;
    super::reactor::register(socket, Interest::READABLE | Interest::WRITABLE)
}

#[cfg(test)]
mod tests {
    //! The `SCTP_RCVINFO` parser against generated control buffers.

    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    /// A control message laid out as the kernel's put_cmsg does.
    fn cmsg(level: c_int, kind: c_int, payload: &[u8]) -> Vec<u8> {
        let hdr = size_of::<libc::cmsghdr>();
        let len = hdr + payload.len();
        let mut out = vec![0u8; hdr];
        let at = mem::offset_of!(libc::cmsghdr, cmsg_len);
        out[at..at + size_of::<usize>()].copy_from_slice(&len.to_ne_bytes());
        let at = mem::offset_of!(libc::cmsghdr, cmsg_level);
        out[at..at + 4].copy_from_slice(&level.to_ne_bytes());
        let at = mem::offset_of!(libc::cmsghdr, cmsg_type);
        out[at..at + 4].copy_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(len.next_multiple_of(size_of::<usize>()), 0);
        out
    }

    /// The struct's own bytes (its padding zeroed), as the kernel copies it.
    fn bytes_of(info: &SctpRcvinfo) -> Vec<u8> {
        let mut out = vec![0u8; size_of::<SctpRcvinfo>()];
        let mut put = |at: usize, b: &[u8]| out[at..at + b.len()].copy_from_slice(b);
        put(
            mem::offset_of!(SctpRcvinfo, rcv_sid),
            &info.rcv_sid.to_ne_bytes(),
        );
        put(
            mem::offset_of!(SctpRcvinfo, rcv_ssn),
            &info.rcv_ssn.to_ne_bytes(),
        );
        put(
            mem::offset_of!(SctpRcvinfo, rcv_flags),
            &info.rcv_flags.to_ne_bytes(),
        );
        put(
            mem::offset_of!(SctpRcvinfo, rcv_ppid),
            &info.rcv_ppid.to_ne_bytes(),
        );
        put(
            mem::offset_of!(SctpRcvinfo, rcv_tsn),
            &info.rcv_tsn.to_ne_bytes(),
        );
        put(
            mem::offset_of!(SctpRcvinfo, rcv_cumtsn),
            &info.rcv_cumtsn.to_ne_bytes(),
        );
        put(
            mem::offset_of!(SctpRcvinfo, rcv_context),
            &info.rcv_context.to_ne_bytes(),
        );
        put(
            mem::offset_of!(SctpRcvinfo, rcv_assoc_id),
            &info.rcv_assoc_id.to_ne_bytes(),
        );
        out
    }

    fn rcvinfo() -> impl Strategy<Value = SctpRcvinfo> {
        (any::<[u16; 3]>(), any::<[u32; 4]>(), any::<i32>()).prop_map(|(a, b, id)| SctpRcvinfo {
            rcv_sid: a[0],
            rcv_ssn: a[1],
            rcv_flags: a[2],
            rcv_ppid: b[0],
            rcv_tsn: b[1],
            rcv_cumtsn: b[2],
            rcv_context: b[3],
            rcv_assoc_id: id,
        })
    }

    fn fields(i: &SctpRcvinfo) -> (u16, u16, u16, u32, u32, u32, u32, i32) {
        (
            i.rcv_sid,
            i.rcv_ssn,
            i.rcv_flags,
            i.rcv_ppid,
            i.rcv_tsn,
            i.rcv_cumtsn,
            i.rcv_context,
            i.rcv_assoc_id,
        )
    }

    #[test]
    fn reads_an_rcvinfo_in_the_kernel_layout() {
        let info = SctpRcvinfo {
            rcv_sid: 3,
            rcv_ppid: 0x3c00_0000,
            rcv_assoc_id: 7,
            ..Default::default()
        };
        // The struct's memory as C has it: sid at 0, ppid at 8, assoc_id at 24.
        let mut raw = [0u8; 28];
        raw[0..2].copy_from_slice(&3u16.to_ne_bytes());
        raw[8..12].copy_from_slice(&0x3c00_0000u32.to_ne_bytes());
        raw[24..28].copy_from_slice(&7i32.to_ne_bytes());
        assert_eq!(bytes_of(&info), raw);
        let got = rcvinfo_in(&cmsg(SOL_SCTP, SCTP_RCVINFO, &raw)).unwrap();
        assert_eq!(fields(&got), fields(&info));
    }

    proptest! {
        #[test]
        fn prop_rcvinfo_parser_takes_any_bytes(bytes in vec(any::<u8>(), 0..400)) {
            let _ = rcvinfo_in(&bytes);
        }

        #[test]
        fn prop_rcvinfo_is_found_among_other_messages(
            info in rcvinfo(),
            before in vec((any::<c_int>(), vec(any::<u8>(), 0..40)), 0..3),
            after in vec((any::<c_int>(), vec(any::<u8>(), 0..40)), 0..3),
            short in 0..size_of::<SctpRcvinfo>(),
        ) {
            let mut bytes = Vec::new();
            // Other kinds, and an SCTP_RCVINFO too short to read.
            for (kind, payload) in &before {
                let kind = if *kind == SCTP_RCVINFO { kind + 1 } else { *kind };
                bytes.extend(cmsg(SOL_SCTP, kind, payload));
            }
            bytes.extend(cmsg(SOL_SCTP, SCTP_RCVINFO, &vec![0xff; short]));
            bytes.extend(cmsg(SOL_SCTP, SCTP_RCVINFO, &bytes_of(&info)));
            for (level, payload) in &after {
                let level = if *level == SOL_SCTP { 0 } else { *level };
                bytes.extend(cmsg(level, SCTP_RCVINFO, payload));
            }
            let got = rcvinfo_in(&bytes);
            prop_assert_eq!(got.as_ref().map(fields), Some(fields(&info)));
            // Cut anywhere inside it, it is not read.
            let end = bytes.len() - after.iter().map(|(_, p)| cmsg(0, 0, p).len()).sum::<usize>();
            let cut = end - size_of::<SctpRcvinfo>() / 2;
            prop_assert!(rcvinfo_in(&bytes[..cut]).is_none());
        }
    }
}
