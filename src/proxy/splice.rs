//! Zero-copy TCP relaying with splice(2): socket → pipe → socket, so the
//! payload never enters user space.
//!
//! Each direction of a connection borrows one pipe from a small process-wide
//! pool; a pipe goes back only when it is empty, so no byte of one
//! connection can ever reach another.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// Pipe capacity asked for (F_SETPIPE_SZ). The default 64 KiB pipe means a
/// syscall pair per 64 KiB; 256 KiB moves bulk data in fewer, and pages are
/// only held while data is in flight.
const PIPE_SIZE: usize = 256 * 1024;
/// Pipes kept for reuse; more are closed when returned.
const POOL_MAX: usize = 128;

/// A non-blocking pipe.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What the kernel granted.
    pub(crate) size: usize,
}

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both fds are open and now owned here only.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on an fd we own; a failure leaves the default size.
        let granted = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_SIZE as libc::c_int,
            )
        };
        let size = if granted > 0 {
            granted as usize
        } else {
            64 * 1024
        };
        Ok(Pipe { read, write, size })
    }

    /// A pipe from the pool, or a new one.
    pub(crate) fn take() -> io::Result<Pipe> {
        if let Some(p) = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        Pipe::new()
    }

    /// Returns an empty pipe to the pool (a pipe with data in it is closed).
    pub(crate) fn give_back(self, empty: bool) {
        if !empty {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }

    /// Moves up to `len` bytes from socket `from` into the pipe.
    pub(crate) fn fill(&self, from: RawFd, len: usize) -> io::Result<usize> {
        splice(from, self.write.as_raw_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe to socket `to`.
    pub(crate) fn drain(&self, to: RawFd, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), to, len)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call (borrowed from
    // live sockets and pipes); null offsets mean "current position", which
    // is what sockets and pipes require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn splices_between_sockets_and_pools_empty_pipes() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let l2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l2.local_addr().unwrap()).unwrap();
        let (mut d, _) = l2.accept().unwrap();
        a.write_all(b"spliced").unwrap();
        let p = Pipe::take().unwrap();
        assert!(p.size >= 64 * 1024);
        let mut n = 0;
        for _ in 0..1000 {
            match p.fill(b.as_raw_fd(), p.size) {
                Ok(k) => {
                    n = k;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(n, 7);
        assert_eq!(p.drain(c.as_raw_fd(), n).unwrap(), 7);
        let mut buf = [0u8; 7];
        d.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"spliced");
        p.give_back(true);
        assert!(!POOL.lock().unwrap().is_empty());
    }
}
