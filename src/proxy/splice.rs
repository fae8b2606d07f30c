//! Zero-copy TCP relaying with splice(2): socket → pipe → socket, so the
//! payload never enters user space.
//!
//! A direction of a connection borrows a pipe from a small process-wide
//! pool only while bytes are in flight (from the read that fills it until
//! it is drained), so an idle connection holds none. A pipe goes back only
//! when it is empty, so no byte of one connection can ever reach another.
//! The pool keeps at most as many idle pipes as are borrowed at the moment,
//! and at least [`IDLE_FLOOR`]: under load a new transfer rarely waits for
//! pipe2(2), and after a burst the pool shrinks back to the floor (16 fds)
//! as the last pipes come back.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::sys::splice::{PipeFds as Fds, pipe, splice};

/// Pipe capacity asked for (F_SETPIPE_SZ). The default 64 KiB pipe means a
/// syscall pair per 64 KiB; 256 KiB moves bulk data in fewer, and pages are
/// only held while data is in flight.
const PIPE_SIZE: usize = 256 * 1024;
/// Idle pipes always kept (2 fds each).
pub(crate) const IDLE_FLOOR: usize = 8;
/// Most idle pipes kept, however many are borrowed.
const POOL_MAX: usize = 128;

/// A pipe borrowed from the pool; it goes back when dropped, if
/// [`Pipe::give_back`] said it is empty, and is closed otherwise.
#[derive(Debug)]
pub(crate) struct Pipe {
    fds: Option<Fds>,
    /// What the kernel granted.
    pub(crate) size: usize,
    empty: bool,
}

static POOL: Mutex<Vec<Fds>> = Mutex::new(Vec::new());
/// Pipes borrowed now.
static BORROWED: AtomicUsize = AtomicUsize::new(0);

/// How many idle pipes the pool may keep while `borrowed` are in use.
fn idle_limit(borrowed: usize) -> usize {
    borrowed.clamp(IDLE_FLOOR, POOL_MAX)
}

impl Pipe {
    /// A pipe from the pool, or a new one.
    pub(crate) fn take() -> io::Result<Pipe> {
        let pooled = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Ok(Pipe::lend(match pooled {
            Some(fds) => fds,
            None => {
                let fds = pipe(PIPE_SIZE)?;
                if fds.size < PIPE_SIZE {
                    small_pipe(fds.size);
                }
                fds
            }
        }))
    }

    fn lend(fds: Fds) -> Pipe {
        BORROWED.fetch_add(1, Relaxed);
        Pipe {
            size: fds.size,
            fds: Some(fds),
            empty: false,
        }
    }

    /// Returns the pipe: to the pool when `empty`, else closed (its bytes
    /// belong to a connection that failed).
    pub(crate) fn give_back(mut self, empty: bool) {
        self.empty = empty;
    }

    fn fds(&self) -> &Fds {
        self.fds
            .as_ref()
            .expect("a borrowed pipe has its fds until dropped")
    }

    /// Moves up to `len` bytes from socket `from` into the pipe.
    pub(crate) fn fill(&self, from: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(from, self.fds().write.as_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe to socket `to`.
    pub(crate) fn drain(&self, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(self.fds().read.as_fd(), to, len)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        let borrowed = BORROWED.fetch_sub(1, Relaxed) - 1;
        let Some(fds) = self.fds.take() else { return };
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if self.empty {
            pool.push(fds);
        }
        // Beyond the limit, the oldest idle pipes go first (the pool is a
        // stack: its bottom is what has waited longest).
        let excess = pool.len().saturating_sub(idle_limit(borrowed));
        let closed: Vec<Fds> = pool.drain(..excess).collect();
        drop(pool);
        drop(closed);
    }
}

/// Says once per process that pipes are smaller than asked for: splicing
/// goes on, with more syscalls per byte (at the minimum of 2 pages, about
/// 4× as many as with the default pipe), so bulk throughput degrades
/// rather than fails.
fn small_pipe(granted: usize) {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        tracing::warn!(
            "the kernel gives splice pipes of {} KiB, not the {} KiB asked for (F_SETPIPE_SZ refused: nsproxy's user is past fs.pipe-user-pages-soft, or the size is past fs.pipe-max-size); bulk TCP goes on with more syscalls per byte; raise fs.pipe-user-pages-soft to restore it",
            granted / 1024,
            PIPE_SIZE / 1024
        );
    });
}

/// Idle pipes in the pool now.
#[cfg(test)]
fn idle() -> usize {
    POOL.lock().unwrap().len()
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
            match p.fill(b.as_fd(), p.size) {
                Ok(k) => {
                    n = k;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(n, 7);
        assert_eq!(p.drain(c.as_fd(), n).unwrap(), 7);
        let mut buf = [0u8; 7];
        d.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"spliced");
        p.give_back(true);
        assert!(idle() >= 1);
    }

    #[test]
    fn the_pool_keeps_no_more_idle_pipes_than_are_borrowed_or_the_floor() {
        assert_eq!(idle_limit(0), IDLE_FLOOR);
        assert_eq!(idle_limit(IDLE_FLOOR + 5), IDLE_FLOOR + 5);
        assert_eq!(idle_limit(100_000), POOL_MAX);
        // Other tests of this binary may borrow pipes meanwhile, so only
        // the bounds are checked.
        let many: Vec<Pipe> = (0..40).map(|_| Pipe::take().unwrap()).collect();
        for p in many {
            p.give_back(true);
        }
        assert!(idle() <= POOL_MAX);
        assert!(idle() <= idle_limit(BORROWED.load(Relaxed)));
    }
}
