//! The syscall layer: every call into libc that Rust cannot check, behind
//! safe functions, and the only place in the crate where `unsafe` code is
//! allowed (the crate root denies it).
//!
//! Why a layer of its own: the rest of nsproxy (namespaces, relays, the
//! lifecycle) reads as ordinary safe Rust, and what the compiler cannot
//! prove (a pointer's length, an fd's lifetime, a C struct's layout) is
//! argued once, here, in a `// SAFETY:` comment beside each `unsafe` block.
//! Wrappers take and return `OwnedFd`/`BorrowedFd` (or types that own their
//! fd), never a bare `RawFd` closed by hand; they decide nothing, so the
//! logic that uses them stays where its concern is.
//!
//! - this file: process-wide settings (the open-file limit, the monotonic
//!   clock, the allocator's free memory and heap in use), and
//!   `IP_TRANSPARENT`/`IPV6_TRANSPARENT` on a socket.
//! - [`cmsg`]: control messages, walked out of a receive and laid out for a
//!   send.
//! - [`fdpass`]: fds over a unix `SOCK_SEQPACKET` pair (`SCM_RIGHTS`), for
//!   the socket broker; its parent-death signal.
//! - [`netns`]: `setns(2)` (for the namespace thread only, enforced by
//!   `.clippy.toml`) and the nsfs checks (`fstatfs`, `NS_GET_NSTYPE`).
//! - [`inotify`]: the inotify instance and event decoding behind namespace
//!   discovery.
//! - [`privs`]: accounts, dropping to another user, capability sets and
//!   `no_new_privs`, each checked after it is done.
//! - [`reactor`]: handing an fd-owning value to tokio's reactor.
//! - [`sctp`]: the `SOL_SCTP` socket options and `recvmsg`/`sendmsg` with
//!   one SCTP control message each.
//! - [`udp`]: `recvmmsg`/`sendmmsg` batches with packet info, drop counts
//!   and UDP GSO.

#![allow(unsafe_code)]

pub(crate) mod cmsg;
pub(crate) mod epoll;
pub(crate) mod fdpass;
pub(crate) mod inotify;
pub(crate) mod netns;
pub(crate) mod privs;
pub(crate) mod reactor;
pub(crate) mod sctp;
pub(crate) mod splice;
pub(crate) mod udp;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Most open files nsproxy asks for: what systemd gives services as their
/// hard limit. Enough for 10,000 namespaces with a few listeners each and
/// their connections; fd tables grow only with fds really open.
const NOFILE_WANTED: u64 = 524_288;

/// The open-file limit after [`crate::runtime::raise_fd_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit now in force.
    pub soft: u64,
    /// True when the hard limit was below what nsproxy asks for (524,288)
    /// and could not be raised (no `CAP_SYS_RESOURCE` in the initial user
    /// namespace): the soft limit is then only what the hard limit allows.
    pub capped_by_hard: bool,
}

/// Raises the open-file limit: both limits to [`NOFILE_WANTED`] (or
/// `fs.nr_open`, if lower) when the hard limit is below it and the process
/// may raise it, else the soft limit to the hard limit. Every listener,
/// connection and namespace in use is an fd, and the usual soft limit of
/// 1,024 runs out at a few hundred namespaces.
pub(crate) fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let mut lim = getrlimit()?;
    let wanted = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(NOFILE_WANTED, |nr_open| nr_open.min(NOFILE_WANTED));
    if lim.rlim_max < wanted {
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: wanted,
        };
        if setrlimit(&raised).is_ok() {
            return Ok(NofileLimit {
                soft: wanted,
                capped_by_hard: false,
            });
        }
        // EPERM without CAP_SYS_RESOURCE: the soft limit can still go up to
        // the hard one.
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        setrlimit(&lim)?;
    }
    Ok(NofileLimit {
        soft: lim.rlim_cur,
        capped_by_hard: lim.rlim_max < wanted,
    })
}

/// Grows this process's fd table to hold at least `fds` descriptors now,
/// while it has one thread. The kernel doubles the table as fds are
/// opened, and in a process of several threads each doubling waits for an
/// RCU grace period (`synchronize_rcu` in `expand_fdtable`): 10 to 40 ms
/// here, during which the thread opening the fd (the one receiving a batch
/// of listeners from the broker, or a worker accepting) stands still. A
/// start-up with 2,000 listeners went through five of them. Done with one
/// thread, the growth costs no wait, and the table never shrinks.
pub(crate) fn presize_fd_table(fds: u64) -> io::Result<()> {
    let Ok(last) = libc::c_int::try_from(fds.saturating_sub(1)) else {
        return Ok(());
    };
    let file = std::fs::File::open("/dev/null")?;
    // SAFETY: `file` is an open fd; F_DUPFD_CLOEXEC only makes a new fd, the
    // lowest free one at or above `last`, which grows the table to hold it.
    let high = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD_CLOEXEC, last) };
    if high < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `high` was just made here and nothing else knows it; the
    // OwnedFd closes it.
    drop(unsafe { OwnedFd::from_raw_fd(high) });
    Ok(())
}

/// The soft open-file limit, for error messages.
pub(crate) fn nofile_soft_limit() -> Option<u64> {
    getrlimit().ok().map(|l| l.rlim_cur)
}

fn getrlimit() -> io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lim)
}

fn setrlimit(lim: &libc::rlimit) -> io::Result<()> {
    // SAFETY: `lim` points to a valid rlimit; the kernel checks cur <= max.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A hint for errors that mean nsproxy is out of file descriptors.
pub(crate) fn fd_exhaustion_hint(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EMFILE) => format!(
            " (nsproxy has reached its open-file limit{}: raise the hard RLIMIT_NOFILE, e.g. LimitNOFILE= in the systemd unit or `ulimit -Hn` before starting it; each listener, connection leg and UDP session is one fd)",
            nofile_soft_limit().map_or(String::new(), |n| format!(" of {n}"))
        ),
        Some(libc::ENFILE) => {
            " (the system-wide limit on open files is reached: see sysctl fs.file-max)".to_owned()
        }
        _ => String::new(),
    }
}

/// CLOCK_MONOTONIC in microseconds.
pub(crate) fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Hands the allocator's free memory back to the kernel. glibc keeps what
/// was freed in its per-thread arenas for reuse and returns it only from
/// the top of a heap, so after a burst of connections the freed buffers and
/// tasks stay resident; malloc_trim(3) releases every free page of every
/// arena. It walks all arenas under their locks: call it rarely.
pub(crate) fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only reads and updates the allocator's own state,
    // under its locks; 0 means "keep no extra padding".
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Bytes the allocator has handed out and not had back (glibc's
/// `mallinfo2`: small blocks in use plus mmapped ones); `None` on other C
/// libraries. Unlike RSS, free memory an arena keeps does not count, so a
/// leak shows here and fragmentation does not. Walks every arena's free
/// lists under their locks: for a status request, not a hot path.
pub(crate) fn heap_allocated() -> Option<u64> {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct
        // of counters; it only reads the allocator's own state.
        let m = unsafe { libc::mallinfo2() };
        Some((m.uordblks + m.hblkhd) as u64)
    }
    #[cfg(not(target_env = "gnu"))]
    None
}

/// `mkfifo(path, 0600)`, for tests that need a file whose open blocks.
#[cfg(test)]
pub(crate) fn mkfifo(path: &std::path::Path) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path with NUL"))?;
    // SAFETY: `c` is a valid C string; mkfifo only creates a file.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `IP_TRANSPARENT` (`v6`: `IPV6_TRANSPARENT`) on a socket, so that it
/// may bind an address that is not one of its namespace's (the client's,
/// for `upstream_source = "client"`). Needs CAP_NET_ADMIN or CAP_NET_RAW
/// over the user namespace owning the socket's network namespace, now: the
/// kernel checks at this call only.
pub(crate) fn set_transparent(fd: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    let on: libc::c_int = 1;
    let (level, name) = if v6 {
        (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
    } else {
        (libc::SOL_IP, libc::IP_TRANSPARENT)
    };
    sctp::setsockopt(fd, level, name, &on)
}

#[cfg(test)]
mod tests {
    /// The table's size, as the kernel reports it (`FDSize`).
    fn fd_table_size() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .expect("an FDSize line");
        line.trim().parse().unwrap()
    }

    #[test]
    fn the_fd_table_is_grown_ahead_and_no_fd_is_left_open() {
        // Within the test runner's soft limit, whatever it is.
        let n = super::getrlimit().unwrap().rlim_cur.min(1000);
        super::presize_fd_table(n).unwrap();
        assert!(fd_table_size() >= n, "FDSize {}", fd_table_size());
        // The fd made at the top of the table is closed again.
        assert!(!std::path::Path::new(&format!("/proc/self/fd/{}", n - 1)).exists());
    }
}
