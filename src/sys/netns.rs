//! The namespace calls: `setns(2)` into a network namespace, and the checks
//! that prove a file is one (`fstatfs` for nsfs, the `NS_GET_NSTYPE`
//! ioctl). The logic around them (opening without blocking, the cache, the
//! switch back home) is in [`crate::netns`].

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `statfs.f_type` of the nsfs pseudo file system (linux/magic.h).
pub(crate) const NSFS_MAGIC: i64 = 0x6e73_6673;
/// `ioctl(fd, NS_GET_NSTYPE)` (linux/nsfs.h, since Linux 4.11): `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Moves the calling thread into the network namespace `ns` refers to.
///
/// Only the namespace thread (`crate::netns::switcher`) may call this:
/// `.clippy.toml` forbids it everywhere else. Any other thread is assumed
/// to stay in the home namespace for life, and a task that awaited in
/// between would leave its thread in the wrong one.
#[allow(clippy::disallowed_methods)]
pub(crate) fn setns_net(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: the fd is open for the borrow's lifetime; setns only changes
    // this thread's network namespace (CLONE_NEWNET makes the kernel refuse
    // an fd of any other kind).
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `statfs.f_type` of the file system `fd` is on. Accepts an `O_PATH` fd,
/// so the file system is known before the file's own open runs.
pub(crate) fn fs_type(fd: BorrowedFd<'_>) -> io::Result<i64> {
    // SAFETY: `fd` is open for the duration of the call (borrowed) and `st`
    // points to writable memory of the right size.
    f_type_of(|st| unsafe { libc::fstatfs(fd.as_raw_fd(), st) })
}

/// `statfs.f_type` of the file system `path` is on (the file it names,
/// symlinks followed), without opening it.
pub(crate) fn path_fs_type(path: &std::path::Path) -> io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call and `st`
    // points to writable memory of the right size.
    f_type_of(|st| unsafe { libc::statfs(c.as_ptr(), st) })
}

/// `f_type` of the struct `call` (statfs or fstatfs) fills, or its error.
fn f_type_of(call: impl FnOnce(*mut libc::statfs) -> libc::c_int) -> io::Result<i64> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    if call(st.as_mut_ptr()) != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the call succeeded, so it filled the struct.
    // (`f_type` is i64 on x86_64 but narrower elsewhere, hence the cast.)
    #[allow(clippy::unnecessary_cast)]
    let f_type = unsafe { st.assume_init() }.f_type as i64;
    Ok(f_type)
}

/// The kind of namespace an nsfs file is (`NS_GET_NSTYPE`): one of the
/// `CLONE_NEW*` flags. Refuses an `O_PATH` fd (EBADF).
pub(crate) fn ns_type(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the open fd.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(kind)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn a_namespace_file_is_on_nsfs_and_says_its_kind() {
        let net = File::open("/proc/self/ns/net").unwrap();
        assert_eq!(fs_type(net.as_fd()).unwrap(), NSFS_MAGIC);
        assert_eq!(ns_type(net.as_fd()).unwrap(), libc::CLONE_NEWNET);
        let uts = File::open("/proc/self/ns/uts").unwrap();
        assert_eq!(ns_type(uts.as_fd()).unwrap(), libc::CLONE_NEWUTS);
    }

    #[test]
    fn other_files_are_not_namespaces() {
        let status = File::open("/proc/self/status").unwrap();
        assert_ne!(fs_type(status.as_fd()).unwrap(), NSFS_MAGIC);
        // Not an nsfs file: the ioctl is not one it knows.
        assert!(ns_type(status.as_fd()).is_err());
    }

    #[test]
    fn setns_refuses_a_file_that_is_not_a_network_namespace() {
        // Without entering anything: a uts namespace is not CLONE_NEWNET
        // (EINVAL, or EPERM without CAP_SYS_ADMIN), a plain file is neither.
        let uts = File::open("/proc/self/ns/uts").unwrap();
        #[allow(clippy::disallowed_methods)]
        let e = setns_net(uts.as_fd()).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EPERM)),
            "{e}"
        );
        let status = File::open("/proc/self/status").unwrap();
        #[allow(clippy::disallowed_methods)]
        let e = setns_net(status.as_fd()).unwrap_err();
        assert!(
            matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EPERM)),
            "{e}"
        );
    }
}
