//! The syscalls of the zero-copy TCP relay: pipe2(2) with a capacity, and
//! splice(2) between a socket and a pipe.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A non-blocking pipe: its read end, its write end, and the capacity the
/// kernel granted.
#[derive(Debug)]
pub(crate) struct PipeFds {
    pub(crate) read: OwnedFd,
    pub(crate) write: OwnedFd,
    pub(crate) size: usize,
}

/// A new non-blocking, close-on-exec pipe, asked to hold `size` bytes
/// (`F_SETPIPE_SZ`). If the kernel refuses (an unprivileged user past
/// `fs.pipe-user-pages-soft` gets `EPERM`, and its new pipes only the
/// minimum of 2 pages), the pipe keeps what it was given: `size` is always
/// what the kernel reports (`F_GETPIPE_SZ`), never what was asked for.
pub(crate) fn pipe(size: usize) -> io::Result<PipeFds> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both fds are open and now owned here only.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let want = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: fcntl on an fd owned here; a failure leaves the size as it was.
    let mut granted = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
    if granted <= 0 {
        // SAFETY: fcntl on an fd owned here, reading its capacity only.
        granted = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
    }
    let size = usize::try_from(granted)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(io::Error::last_os_error)?;
    Ok(PipeFds { read, write, size })
}

/// Moves up to `len` bytes from `from` to `to` without copying them into
/// user space, without blocking (`WouldBlock` when nothing can move).
/// One of the two must be a pipe.
pub(crate) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call (the borrows
    // say so); null offsets mean "current position", which is what sockets
    // and pipes require.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
