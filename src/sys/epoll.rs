//! Readiness without a task: the epoll set idle listeners are parked in
//! (registered with tokio's reactor), and a query of whether clients wait
//! in a listener's backlog.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use tokio::io::unix::AsyncFd;

/// Registers `poll` (an epoll set) with tokio's reactor, to be woken when
/// any socket in the set becomes ready. Must run inside a tokio runtime.
pub(crate) fn register_poll(poll: mio::Poll) -> io::Result<AsyncFd<mio::Poll>> {
    // SAFETY: the Poll owns its epoll fd, which stays open and is what
    // `as_raw_fd` returns until the Poll is dropped; only the AsyncFd drops
    // it (or hands it back), after deregistering it.
    unsafe { AsyncFd::register_with_interest(poll, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Whether `fd` is readable right now (for a listener: a client waits in
/// its backlog), asked of the socket itself without waiting.
pub(crate) fn readable_now(fd: BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd for the call, whose fd the borrow
    // keeps open; a zero timeout makes it a query, never a wait.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

/// Connections waiting in TCP listener `fd`'s accept queue (what `TCP_INFO`
/// reports for a listener as `tcpi_unacked`).
#[cfg(test)]
pub(crate) fn accept_queue_len(fd: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given, and
    // the borrow keeps the fd open for the call.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_unacked)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn a_waiting_client_makes_a_listener_readable() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!readable_now(l.as_fd()));
        assert_eq!(accept_queue_len(l.as_fd()).unwrap(), 0);
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while accept_queue_len(l.as_fd()).unwrap() < 1 {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(readable_now(l.as_fd()));
    }
}
