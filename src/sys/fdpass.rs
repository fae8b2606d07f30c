//! Passing file descriptors between the relay and the socket broker: a
//! `SOCK_SEQPACKET` unix socket pair (one message per `send`, boundaries
//! kept, EOF when the peer is gone), messages carrying fds as
//! `SCM_RIGHTS`, and the parent-death signal the broker asks for.
//!
//! Every fd a receive brings is owned at once ([`OwnedFd`]), so that one
//! a caller refuses (an unexpected fd, a message it cannot decode) is closed
//! when dropped rather than leaked into the process for good.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::cmsg::control_messages;

/// Most fds one message carries (a refill of the upstream pool). The
/// kernel's own limit is 253 (`SCM_MAX_FD`).
pub(crate) const MAX_FDS: usize = 64;

/// Control space for [`MAX_FDS`] fds: CMSG_SPACE(64 * 4) is 16 + 256 bytes.
#[repr(C, align(8))]
struct FdCmsgBuf([u8; 16 + MAX_FDS * 4 + 16]);

/// `socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC)`.
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a writable array of two ints, as socketpair needs.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both fds are new and owned only here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends `bytes` as one message, with `fds` as `SCM_RIGHTS` (none: no
/// control message). `MSG_NOSIGNAL`: a peer gone is `EPIPE`, not a signal.
/// With `dontwait`, a full socket buffer is `WouldBlock`.
pub(crate) fn send(
    fd: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    dontwait: bool,
) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} fds in one message (at most {MAX_FDS})", fds.len()),
        ));
    }
    let mut cbuf = FdCmsgBuf([0; 16 + MAX_FDS * 4 + 16]);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast::<libc::c_void>(),
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = (fds.len() * size_of::<RawFd>()) as u32;
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        debug_assert!(space <= cbuf.0.len());
        msg.msg_control = cbuf.0.as_mut_ptr().cast::<libc::c_void>();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `space` writable, aligned bytes, so
        // CMSG_FIRSTHDR returns a header inside them.
        let h = unsafe { &mut *libc::CMSG_FIRSTHDR(&msg) };
        h.cmsg_level = libc::SOL_SOCKET;
        h.cmsg_type = libc::SCM_RIGHTS;
        // SAFETY: CMSG_LEN only computes a size.
        h.cmsg_len = unsafe { libc::CMSG_LEN(data_len) } as _;
        // SAFETY: CMSG_DATA points just past the header, and CMSG_SPACE
        // reserved room for `fds.len()` ints there; write_unaligned needs
        // no alignment.
        unsafe {
            let data = libc::CMSG_DATA(h).cast::<RawFd>();
            for (i, f) in fds.iter().enumerate() {
                data.add(i).write_unaligned(f.as_raw_fd());
            }
        }
    }
    let mut flags = libc::MSG_NOSIGNAL;
    if dontwait {
        flags |= libc::MSG_DONTWAIT;
    }
    // SAFETY: `msg` points at one iovec over the live `bytes` (only read)
    // and, if any, the live `cbuf` holding open fds (borrowed for the call).
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// One received message.
#[derive(Debug)]
pub(crate) struct Received {
    /// Bytes of the message in the buffer (0 with no fds: the peer closed).
    pub len: usize,
    /// The fds it carried, owned: closed when dropped.
    pub fds: Vec<OwnedFd>,
    /// The message was longer than the buffer (`MSG_TRUNC`); the rest is lost.
    pub truncated: bool,
    /// More fds came than there was room for (`MSG_CTRUNC`), or this
    /// process could not take them (out of fds): the kernel closed the rest.
    pub ctrunc: bool,
}

/// Receives one message into `buf`, keeping at most `max_fds` fds (at most
/// [`MAX_FDS`]); the fds are close-on-exec (`MSG_CMSG_CLOEXEC`). With
/// `dontwait`, nothing waiting is `WouldBlock`.
pub(crate) fn recv(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    dontwait: bool,
) -> io::Result<Received> {
    let max_fds = max_fds.min(MAX_FDS);
    let mut cbuf = FdCmsgBuf([0; 16 + MAX_FDS * 4 + 16]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<libc::c_void>(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((max_fds * size_of::<RawFd>()) as u32) } as usize;
    if max_fds > 0 {
        msg.msg_control = cbuf.0.as_mut_ptr().cast::<libc::c_void>();
        msg.msg_controllen = space.min(cbuf.0.len()) as _;
    }
    let mut flags = libc::MSG_CMSG_CLOEXEC;
    if dontwait {
        flags |= libc::MSG_DONTWAIT;
    }
    // SAFETY: `msg` points at one iovec over the live, writable `buf` and at
    // the live `cbuf`; the kernel writes within their stated lengths.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let written: usize = msg.msg_controllen as _;
    let written = if max_fds > 0 {
        written.min(cbuf.0.len())
    } else {
        0
    };
    let mut fds = Vec::new();
    for c in control_messages(&cbuf.0[..written]) {
        if c.level != libc::SOL_SOCKET || c.kind != libc::SCM_RIGHTS {
            continue;
        }
        for chunk in c.data.chunks_exact(size_of::<RawFd>()) {
            let raw = RawFd::from_ne_bytes(chunk.try_into().expect("chunks of 4"));
            if raw >= 0 {
                // SAFETY: the kernel installed this fd in this process for
                // this message; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    // CMSG_SPACE rounds up, so room for one more may have been taken.
    let over = fds.len() > max_fds;
    fds.truncate(max_fds);
    Ok(Received {
        len: n as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        ctrunc: over || msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// `prctl(PR_SET_PDEATHSIG, sig)`: the kernel sends `sig` to this process
/// when the thread that forked it exits.
pub(crate) fn set_parent_death_signal(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and changes only this
    // process's own setting.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes SIGTERM, SIGINT and SIGHUP do nothing to this process: for the
/// broker, whose life is the relay's socket. A service manager stopping
/// the service, or Ctrl-C at a terminal, signals the whole group; the relay
/// then stops in order, and the broker exits when its socket closes.
pub(crate) fn ignore_stop_signals() -> io::Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: SIG_IGN installs no handler; it changes only this
        // process's disposition of `sig`.
        if unsafe { libc::signal(sig, libc::SIG_IGN) } == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The pid of this process's parent.
pub(crate) fn parent_pid() -> u32 {
    // SAFETY: getppid takes nothing and cannot fail.
    unsafe { libc::getppid() as u32 }
}

/// The identity (device, inode) of the network namespace socket `fd`
/// belongs to (`SIOCGSKNS`, Linux 4.10).
#[cfg(test)]
pub(crate) fn socket_netns(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    const SIOCGSKNS: libc::c_ulong = 0x894C;
    // SAFETY: SIOCGSKNS takes no argument and returns a new fd of the
    // socket's network namespace, or -1.
    let ns = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) };
    if ns < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd, owned only here.
    let f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(ns) });
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// The cookie of the network namespace socket `fd` belongs to
/// (`SO_NETNS_COOKIE`, Linux 5.14): unlike `SIOCGSKNS`, it needs no
/// capability, and a namespace's cookie is unique while the system runs.
pub(crate) fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`, a live
    // u64, and the new length into `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// A read-only copy of `bytes` to pass as an fd: a memfd holding them,
/// sealed against any change, its offset at the start. For what does not
/// fit in a message (a config file's text).
pub(crate) fn sealed_memfd(name: &str, bytes: &[u8]) -> io::Result<OwnedFd> {
    use std::io::{Seek, Write};
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the
    // flags are valid; the result is a new fd or -1.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd, owned only here.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.write_all(bytes)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an int of seal flags, on an fd of ours.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    f.rewind()?;
    Ok(OwnedFd::from(f))
}

/// Makes `fd` the child's fd `target` (and not close-on-exec there) when
/// `cmd` spawns. `fd` must stay open until then (the caller keeps it).
pub(crate) fn pass_fd_as(cmd: &mut std::process::Command, fd: BorrowedFd<'_>, target: RawFd) {
    use std::os::unix::process::CommandExt;
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the child between fork and exec, and
    // calls only dup2 and fcntl, which are async-signal-safe; it allocates
    // nothing. `raw` is open in the parent when it forks (the caller keeps
    // it until the spawn returns), so it is open in the child.
    unsafe {
        cmd.pre_exec(move || {
            if raw == target {
                // dup2 onto itself keeps FD_CLOEXEC: clear it by hand.
                let flags = libc::fcntl(raw, libc::F_GETFD);
                if flags < 0 || libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(raw, target) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Takes ownership of fd `raw`, inherited from the parent, after checking
/// that it is open and a unix `SOCK_SEQPACKET` socket (so that a wrong
/// number cannot make this process own an fd something else owns); it is
/// made close-on-exec.
pub(crate) fn take_inherited_seqpacket(raw: RawFd) -> io::Result<OwnedFd> {
    take_inherited(raw, Some((libc::SOCK_SEQPACKET, "SOCK_SEQPACKET")))
}

/// Takes ownership of inherited fd `raw` once it is known to be an open
/// socket (of type `want`, when given: its value and name), and makes it close-on-exec, so
/// that no child (the socket broker) inherits it.
fn take_inherited(raw: RawFd, want: Option<(libc::c_int, &str)>) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only reads the flags of fd `raw`, if it is open.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ty: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `ty` and `len` are valid and writable, of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some((_, name)) = want.filter(|(w, _)| *w != ty) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {raw} is not a {name} socket"),
        ));
    }
    // SAFETY: fd `raw` is open (F_GETFD succeeded), a socket, and was
    // handed to this process to own; nothing else in it refers to it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: F_SETFD on an fd owned here.
    if unsafe { libc::fcntl(raw, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The inode of the file `fd` refers to (a socket's inode number): with
/// the fd number, what tells one socket from another that got the same
/// number after the first was closed ([`dup_if_same`]).
pub(crate) fn inode(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: stat is plain data; all-zero is a valid value to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `stat` into the live `st`.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_ino)
}

/// A new fd (close-on-exec) for the file that fd number `raw` refers to,
/// if `raw` is open and still the file of inode `ino` (fd numbers are
/// reused once closed: another file under the same number is not taken).
pub(crate) fn dup_if_same(raw: RawFd, ino: u64) -> Option<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new fd for whatever `raw` refers to,
    // or fails (EBADF); it changes nothing about `raw` itself.
    let new = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return None;
    }
    // SAFETY: a new fd, owned only here.
    let fd = unsafe { OwnedFd::from_raw_fd(new) };
    use std::os::fd::AsFd;
    (inode(fd.as_fd()).ok() == Some(ino)).then_some(fd)
}

/// The pid and uid of the process at the other end of unix socket `fd`
/// (`SO_PEERCRED`, as they were when the peer connected).
pub(crate) fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // SAFETY: ucred is plain data; all-zero is a valid value to overwrite.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into the live `cred`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.pid as u32, cred.uid))
}

/// Takes ownership of fd `raw`, passed by the service manager
/// (`LISTEN_FDS`), after checking that it is open and a socket; it is made
/// close-on-exec, so that no child (the socket broker) inherits it.
pub(crate) fn take_inherited_socket(raw: RawFd) -> io::Result<OwnedFd> {
    take_inherited(raw, None)
}

/// `pipe2(O_CLOEXEC)`: (read end, write end).
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 needs.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both fds are new and owned only here.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Waits up to `timeout` for the other end of pipe `fd` to be closed by
/// everyone (or data to come); false on timeout.
pub(crate) fn wait_hangup(fd: BorrowedFd<'_>, timeout: std::time::Duration) -> io::Result<bool> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one live, writable pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return Ok(true);
        }
        if r == 0 {
            return Ok(false);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Drops capability `cap` from the calling thread's effective set only
/// (capabilities are per thread), so that a test can act as a relay
/// without privileges on one thread while the rest of the process keeps
/// them. Threads it starts afterwards inherit the smaller set.
#[cfg(test)]
pub(crate) fn drop_thread_capability(cap: u32) -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget reads a version-3 header and writes two Data structs,
    // both live and of the layout the kernel expects.
    if unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    d[(cap / 32) as usize].effective &= !(1 << (cap % 32));
    // SAFETY: as above; capset only reads them, and changes this thread's
    // capabilities (pid 0: the caller).
    if unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn a_message_and_its_fds_arrive_whole() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, y) = seqpacket_pair().unwrap();
        send(a.as_fd(), b"hello", &[x.as_fd(), y.as_fd()], false).unwrap();
        let mut buf = [0u8; 64];
        let r = recv(b.as_fd(), &mut buf, 4, false).unwrap();
        assert_eq!(&buf[..r.len], b"hello");
        assert_eq!(r.fds.len(), 2);
        assert!(!r.truncated && !r.ctrunc);
        // The fd that came is the socket sent: a message through it arrives.
        send(r.fds[0].as_fd(), b"via", &[], false).unwrap();
        let r2 = recv(r.fds[1].as_fd(), &mut buf, 0, false).unwrap();
        assert_eq!(&buf[..r2.len], b"via");
    }

    #[test]
    fn too_long_and_too_many_are_flagged() {
        let (a, b) = seqpacket_pair().unwrap();
        let (x, y) = seqpacket_pair().unwrap();
        send(a.as_fd(), &[7u8; 100], &[x.as_fd(), y.as_fd()], false).unwrap();
        let mut buf = [0u8; 10];
        let r = recv(b.as_fd(), &mut buf, 1, false).unwrap();
        assert!(r.truncated && r.ctrunc, "{r:?}");
        assert_eq!(r.fds.len(), 1);
        // Nothing else waits, and a closed peer reads as 0 bytes.
        let e = recv(b.as_fd(), &mut buf, 1, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        let r = recv(b.as_fd(), &mut buf, 1, false).unwrap();
        assert_eq!((r.len, r.fds.len()), (0, 0));
    }

    #[test]
    fn a_dup_is_taken_only_of_the_same_file() {
        let (a, b) = seqpacket_pair().unwrap();
        let ino = inode(a.as_fd()).unwrap();
        assert_ne!(ino, inode(b.as_fd()).unwrap());
        let d = dup_if_same(a.as_raw_fd(), ino).unwrap();
        assert_eq!(inode(d.as_fd()).unwrap(), ino);
        assert!(dup_if_same(b.as_raw_fd(), ino).is_none());
        let (pid, uid) = peer_cred(a.as_fd()).unwrap();
        assert_eq!(
            (pid, uid),
            (std::process::id(), crate::privsep::effective_uid())
        );
    }

    #[test]
    fn a_socket_knows_its_namespace() {
        let (a, b) = seqpacket_pair().unwrap();
        // Its cookie needs no capability, and is this namespace's.
        let cookie = netns_cookie(a.as_fd()).unwrap();
        assert_ne!(cookie, 0);
        assert_eq!(netns_cookie(b.as_fd()).unwrap(), cookie);
        // Its identity needs CAP_NET_ADMIN (the unit tests also run as nobody).
        if crate::privsep::is_root() {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata("/proc/self/ns/net").unwrap();
            assert_eq!(socket_netns(a.as_fd()).unwrap(), (m.dev(), m.ino()));
        }
    }
}
