//! Handing an fd that owns itself to tokio's reactor.
//!
//! tokio's constructor (`AsyncFd::register_with_interest`) is `unsafe`: it
//! cannot know that `as_raw_fd` keeps naming the same open file for as long
//! as the `AsyncFd` lives. The types here own their fd, so it does: that is
//! what [`OwnsFd`] promises, and why only this module may implement it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

mod sealed {
    pub trait Sealed {}
}

/// A type that owns the fd `as_raw_fd` returns: the fd stays open, and the
/// same, until the value is dropped. Sealed: implemented only here, for
/// types known to keep that promise.
pub(crate) trait OwnsFd: AsRawFd + sealed::Sealed {}

impl sealed::Sealed for OwnedFd {}
impl OwnsFd for OwnedFd {}
impl sealed::Sealed for File {}
impl OwnsFd for File {}
impl sealed::Sealed for socket2::Socket {}
impl OwnsFd for socket2::Socket {}
impl sealed::Sealed for super::inotify::Inotify {}
impl OwnsFd for super::inotify::Inotify {}

/// Registers `inner` with the current tokio runtime's reactor for
/// `interest`. Must be called inside a runtime. On failure `inner` is
/// dropped (closed) and the error returned.
pub(crate) fn register<T: OwnsFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T: OwnsFd` owns its fd: it stays open, and `as_raw_fd`
    // returns that same fd, until the value is dropped, which only the
    // AsyncFd does (when it is dropped or gives the value back).
    unsafe { AsyncFd::register_with_interest(inner, interest) }.map_err(|e| e.into_parts().1)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[tokio::test]
    async fn a_registered_socket_wakes_when_readable() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let b = register(socket2::Socket::from(OwnedFd::from(b)), Interest::READABLE).unwrap();
        (&a).write_all(b"x").unwrap();
        let mut guard = b.readable().await.unwrap();
        let mut buf = [std::mem::MaybeUninit::new(0u8); 4];
        assert_eq!(guard.get_inner().recv(&mut buf).unwrap(), 1);
        guard.clear_ready();
    }
}
