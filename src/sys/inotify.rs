//! inotify(7): a non-blocking instance, its watches, and the events it
//! reads, decoded from the kernel's `struct inotify_event` layout.
//!
//! Not the `inotify` crate: what discovery needs is four calls and a
//! parser, and it waits for the fd on tokio's reactor next to
//! `/proc/self/mountinfo`, which it registers itself anyway.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// An inotify instance (non-blocking, close-on-exec).
#[derive(Debug)]
pub(crate) struct Inotify {
    fd: OwnedFd,
}

/// A watch descriptor: which watch an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Watch(i32);

/// One event out of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Event<'a> {
    pub(crate) watch: Watch,
    /// `IN_*` bits.
    pub(crate) mask: u32,
    /// The name in the watched directory, up to its first NUL; empty for an
    /// event about the directory itself.
    pub(crate) name: &'a OsStr,
}

/// Size of `struct inotify_event` without its name.
const HEADER: usize = 16;

impl Inotify {
    /// `inotify_init1(IN_NONBLOCK | IN_CLOEXEC)`.
    pub(crate) fn new() -> io::Result<Inotify> {
        // SAFETY: plain syscall; the returned fd is checked and owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Inotify { fd })
    }

    /// `inotify_add_watch(path, mask)`.
    pub(crate) fn add_watch(&self, path: &std::path::Path, mask: u32) -> io::Result<Watch> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with NUL"))?;
        // SAFETY: the inotify fd is open and `c` is a valid C string.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), mask) };
        if wd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(Watch(wd))
        }
    }

    /// `inotify_rm_watch`; errors (a watch the kernel already dropped) are
    /// harmless and ignored.
    pub(crate) fn rm_watch(&self, watch: Watch) {
        // SAFETY: removing a watch from our own open inotify fd.
        unsafe { libc::inotify_rm_watch(self.fd.as_raw_fd(), watch.0) };
    }

    /// One `read` into `buf`; returns how many bytes of events it holds.
    /// Never blocks: no pending event is `WouldBlock`.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into a live, writable buffer of the length given.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Inotify {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Inotify {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The events in `buf` (the bytes one read returned), in order. A name cut
/// short by the end of `buf` is kept as far as it goes; a header cut short
/// ends the walk.
pub(crate) fn events(buf: &[u8]) -> impl Iterator<Item = Event<'_>> {
    let n = buf.len();
    let mut off = 0usize;
    std::iter::from_fn(move || {
        if off + HEADER > n {
            return None;
        }
        let wd = i32::from_ne_bytes(buf[off..off + 4].try_into().unwrap());
        let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap());
        let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
        let raw = &buf[off + HEADER..(off + HEADER).saturating_add(len).min(n)];
        let name = raw.split(|b| *b == 0).next().unwrap_or(&[]);
        off = off.saturating_add(HEADER).saturating_add(len);
        Some(Event {
            watch: Watch(wd),
            mask,
            name: OsStr::from_bytes(name),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event as the kernel lays it out: the name NUL-padded to `len`.
    fn event(wd: i32, mask: u32, name: &str, len: u32) -> Vec<u8> {
        let mut b = wd.to_ne_bytes().to_vec();
        b.extend_from_slice(&mask.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&len.to_ne_bytes());
        let mut padded = name.as_bytes().to_vec();
        padded.resize(len as usize, 0);
        b.extend_from_slice(&padded);
        b
    }

    #[test]
    fn events_are_decoded_in_order_and_cut_ones_end_the_walk() {
        let mut buf = event(1, libc::IN_CREATE, "ns1", 16);
        buf.extend(event(2, libc::IN_DELETE_SELF, "", 0));
        buf.extend(event(1, libc::IN_DELETE, "a-longer-name", 16));
        let got: Vec<_> = events(&buf).map(|e| (e.watch, e.mask, e.name)).collect();
        assert_eq!(
            got,
            [
                (Watch(1), libc::IN_CREATE, OsStr::new("ns1")),
                (Watch(2), libc::IN_DELETE_SELF, OsStr::new("")),
                (Watch(1), libc::IN_DELETE, OsStr::new("a-longer-name")),
            ]
        );
        // A name cut by the end of the read is kept as far as it goes; a
        // header cut short is not read.
        let cut = &buf[..buf.len() - 10];
        let last = events(cut).last().unwrap();
        assert_eq!(last.name, OsStr::new("a-long"));
        assert_eq!(events(&buf[..HEADER - 1]).count(), 0);
        // A length that lies does not lead outside the buffer.
        let mut lie = event(3, libc::IN_CREATE, "x", 4);
        lie[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert_eq!(events(&lie).count(), 1);
    }

    #[test]
    fn a_watch_reports_a_created_file_by_name() {
        let dir = std::env::temp_dir().join(format!("nsproxy-inotify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ino = Inotify::new().unwrap();
        let mut buf = vec![0u8; 4096];
        let e = ino.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "nothing yet");
        let w = ino.add_watch(&dir, libc::IN_CREATE).unwrap();
        std::fs::write(dir.join("ns1"), b"").unwrap();
        let n = ino.read(&mut buf).unwrap();
        let got: Vec<_> = events(&buf[..n])
            .map(|e| (e.watch, e.name.to_owned()))
            .collect();
        ino.rm_watch(w);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(got, [(w, "ns1".into())]);
        assert!(ino.add_watch(&dir, libc::IN_CREATE).is_err(), "gone");
    }
}
