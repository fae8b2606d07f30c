//! Accounts, credentials and capabilities: `getpwnam_r`, the `setres*id`
//! family, `capset`/`capget` and the `prctl`s around them, behind safe
//! functions that check what they did.
//!
//! What is per thread and what is per process matters here. glibc's
//! `setgroups`, `setresgid` and `setresuid` change every thread of the
//! process (it signals each one to make the same call), so [`drop_to`] may
//! run after threads exist. The kernel's capability sets, the bounding set
//! and `no_new_privs` are per thread: [`keep_only_caps`],
//! [`drop_bounding_set`] and [`set_no_new_privs`] change the calling thread
//! and the threads it starts later only (the broker, their user, is single
//! threaded; a seccomp filter installed with TSYNC sets `no_new_privs` on
//! every thread as well).

use std::ffi::{CStr, CString};
use std::io;

/// A user account, as looked up by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The name it was looked up by (as the password database spells it).
    pub name: String,
    pub uid: u32,
    /// The account's primary group.
    pub gid: u32,
}

/// What failed while looking up an account or giving up privileges.
#[derive(Debug, thiserror::Error)]
pub enum PrivError {
    #[error("no such user {0:?}")]
    NoSuchUser(String),
    #[error("cannot look up user {name:?}: {source}")]
    Lookup { name: String, source: io::Error },
    #[error("{call} failed: {source}")]
    Call {
        call: &'static str,
        source: io::Error,
    },
    #[error("privileges were not dropped as asked: {0}")]
    Verify(String),
    #[error("{0}")]
    Refused(String),
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(String),
}

fn call_failed(call: &'static str) -> PrivError {
    PrivError::Call {
        call,
        source: io::Error::last_os_error(),
    }
}

/// Looks `name` up in the password database (files, or whatever NSS
/// module `/etc/nsswitch.conf` names): its uid and primary group.
pub fn lookup_user(name: &str) -> Result<Account, PrivError> {
    let c_name = CString::new(name).map_err(|_| PrivError::NoSuchUser(name.to_owned()))?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: an all-zero passwd is a valid value of a plain C struct
        // (null pointers, zero ids); getpwnam_r overwrites it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: `c_name` is a valid C string; `pwd`, `buf` (with its true
        // length) and `result` are valid and writable for the call, and the
        // strings `pwd` points to live in `buf`, which outlives their use
        // below.
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            return Err(PrivError::Lookup {
                name: name.to_owned(),
                source: io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Err(PrivError::NoSuchUser(name.to_owned()));
        }
        // SAFETY: on success `pw_name` points to a NUL-terminated string
        // inside `buf`, which is still alive.
        let found = unsafe { CStr::from_ptr(pwd.pw_name) }
            .to_string_lossy()
            .into_owned();
        return Ok(Account {
            name: found,
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        });
    }
}

/// The real, effective and saved user ids.
pub fn getresuid() -> (u32, u32, u32) {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid, writable uid_t; getresuid cannot fail with them.
    unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
    (r, e, s)
}

/// The real, effective and saved group ids.
pub fn getresgid() -> (u32, u32, u32) {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: three valid, writable gid_t; getresgid cannot fail with them.
    unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
    (r, e, s)
}

/// The real user id.
pub fn getuid() -> u32 {
    // SAFETY: getuid has no arguments and cannot fail.
    unsafe { libc::getuid() }
}

fn supplementary_group_count() -> io::Result<usize> {
    // SAFETY: with a size of 0, getgroups only counts and writes nothing.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Becomes `uid`:`gid` for good (real, effective and saved ids), with no
/// supplementary groups, on every thread of the process, and checks it:
/// the ids read back as asked and, unless `uid` is 0, `setuid(0)` fails.
///
/// No supplementary groups, not the account's own: the relay opens no
/// file by group permission (what it reads, `/run/netns` and `/proc/self`,
/// is world-readable), and an account's groups (`adm`, `docker`, ...) are
/// exactly the kind of access a compromised relay should not inherit.
/// Reading them would also need the group database after the drop.
pub fn drop_to(uid: u32, gid: u32) -> Result<(), PrivError> {
    // Groups first, while still allowed to change them (CAP_SETGID).
    // SAFETY: a size of 0 with a null list clears the supplementary groups.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(call_failed("setgroups([])"));
    }
    // SAFETY: plain integer arguments.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(call_failed("setresgid"));
    }
    // SAFETY: plain integer arguments. Last: with the uids goes CAP_SETGID.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(call_failed("setresuid"));
    }
    let uids = getresuid();
    if uids != (uid, uid, uid) {
        return Err(PrivError::Verify(format!(
            "the user ids are {uids:?}, not all {uid}"
        )));
    }
    let gids = getresgid();
    if gids != (gid, gid, gid) {
        return Err(PrivError::Verify(format!(
            "the group ids are {gids:?}, not all {gid}"
        )));
    }
    match supplementary_group_count() {
        Ok(0) => {}
        Ok(n) => {
            return Err(PrivError::Verify(format!(
                "{n} supplementary group(s) remain"
            )));
        }
        Err(source) => {
            return Err(PrivError::Call {
                call: "getgroups",
                source,
            });
        }
    }
    if uid != 0 {
        // SAFETY: plain integer argument; it is expected to fail.
        if unsafe { libc::setuid(0) } == 0 {
            return Err(PrivError::Verify(
                "setuid(0) still succeeds after dropping to another user".into(),
            ));
        }
    }
    Ok(())
}

/// The capabilities nsproxy may keep (numbers from linux/capability.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cap {
    /// Change the bounding set (needed only while dropping).
    SetPcap = 8,
    /// Bind ports below 1024.
    NetBindService = 10,
    /// Interface and routing configuration, some socket options
    /// (`SO_MARK`, transparent sockets).
    NetAdmin = 12,
    /// Raw and packet sockets, `IP_TRANSPARENT` binds.
    NetRaw = 13,
    /// Open `/proc/PID/ns/net` of a process of another user.
    SysPtrace = 19,
    /// `setns(2)` into a network namespace.
    SysAdmin = 21,
}

impl Cap {
    /// The bit of this capability in a 64-bit capability set.
    pub fn bit(self) -> u64 {
        1 << self as u32
    }

    /// The kernel's name, as `capsh` and `/proc` tools print it.
    pub fn name(self) -> &'static str {
        match self {
            Cap::SetPcap => "cap_setpcap",
            Cap::NetBindService => "cap_net_bind_service",
            Cap::NetAdmin => "cap_net_admin",
            Cap::NetRaw => "cap_net_raw",
            Cap::SysPtrace => "cap_sys_ptrace",
            Cap::SysAdmin => "cap_sys_admin",
        }
    }
}

/// A thread's three capability sets, as 64-bit masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSets {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's capability sets.
pub fn capget() -> Result<CapSets, PrivError> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: version 3 takes a header and an array of two data structs,
    // both valid and writable, laid out as linux/capability.h says.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(call_failed("capget"));
    }
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | u64::from(f(&data[1])) << 32;
    Ok(CapSets {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

fn capset(sets: CapSets) -> Result<(), PrivError> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let split = |m: u64| [m as u32, (m >> 32) as u32];
    let (e, p, i) = (
        split(sets.effective),
        split(sets.permitted),
        split(sets.inheritable),
    );
    let data = [
        CapData {
            effective: e[0],
            permitted: p[0],
            inheritable: i[0],
        },
        CapData {
            effective: e[1],
            permitted: p[1],
            inheritable: i[1],
        },
    ];
    // SAFETY: version 3 takes a header and an array of two data structs,
    // both valid, laid out as linux/capability.h says; the kernel only
    // reads the data.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    if rc != 0 {
        return Err(call_failed("capset"));
    }
    Ok(())
}

/// The highest capability number this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Removes every capability but `keep` from the calling thread's bounding
/// set (so that no later `execve` can bring one back). Needs CAP_SETPCAP.
pub fn drop_bounding_set(keep: &[Cap]) -> Result<(), PrivError> {
    let keep: u64 = keep.iter().map(|c| c.bit()).fold(0, |a, b| a | b);
    for cap in 0..=last_cap().min(63) {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: plain integer arguments.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                // A number this kernel does not know: none above it either.
                break;
            }
            return Err(PrivError::Call {
                call: "prctl(PR_CAPBSET_DROP)",
                source: e,
            });
        }
    }
    Ok(())
}

/// Clears the calling thread's ambient capabilities.
pub fn clear_ambient() -> Result<(), PrivError> {
    // SAFETY: plain integer arguments.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // Before Linux 4.3 there is no ambient set to clear.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(PrivError::Call {
                call: "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
                source: e,
            });
        }
    }
    Ok(())
}

/// Keeps only `keep` in the calling thread's effective and permitted sets,
/// nothing inheritable or ambient, and only `keep` in its bounding set;
/// checks the sets read back as asked. For the broker, which stays uid 0:
/// root with only these capabilities cannot read others' files
/// (CAP_DAC_OVERRIDE), kill others' processes (CAP_KILL), load modules,
/// and so on, and no `execve` gives it more.
pub fn keep_only_caps(keep: &[Cap]) -> Result<(), PrivError> {
    // The bounding set first: dropping from it needs CAP_SETPCAP, which
    // the capset below takes away.
    drop_bounding_set(keep)?;
    clear_ambient()?;
    let mask: u64 = keep.iter().map(|c| c.bit()).fold(0, |a, b| a | b);
    let want = CapSets {
        effective: mask,
        permitted: mask,
        inheritable: 0,
    };
    capset(want)?;
    let got = capget()?;
    if got != want {
        return Err(PrivError::Verify(format!(
            "capabilities are effective {:#x}, permitted {:#x}, inheritable {:#x}; wanted {mask:#x}, {mask:#x}, 0",
            got.effective, got.permitted, got.inheritable
        )));
    }
    Ok(())
}

/// Clears every capability set of the calling thread (after a drop to
/// another user only the inheritable set can still hold something).
pub fn clear_caps() -> Result<(), PrivError> {
    capset(CapSets {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    })
}

/// `PR_SET_NAME`: the calling thread's name (for the main thread, the
/// process's `comm` that `ps` and `top` show). Up to 15 bytes are kept.
pub fn set_thread_name(name: &std::ffi::CStr) -> Result<(), PrivError> {
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the
    // kernel copies at most 16 bytes of it.
    if unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) } != 0 {
        return Err(call_failed("prctl(PR_SET_NAME)"));
    }
    Ok(())
}

/// `PR_SET_NO_NEW_PRIVS`: no `execve` of the calling thread (or of threads
/// and children it starts later) can gain privileges, through set-user-id
/// files or file capabilities; it is also what lets an unprivileged
/// process install a seccomp filter.
pub fn set_no_new_privs() -> Result<(), PrivError> {
    // SAFETY: plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(call_failed("prctl(PR_SET_NO_NEW_PRIVS)"));
    }
    Ok(())
}

/// `PR_SET_DUMPABLE` 0, checked: no process of the same user may ptrace
/// this one or open its `/proc/PID/mem`, fds or environment, and it leaves
/// no core dump (with whatever traffic it held). The kernel does this on a
/// uid change already unless `fs.suid_dumpable` says otherwise.
pub fn set_not_dumpable() -> Result<(), PrivError> {
    // SAFETY: plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(call_failed("prctl(PR_SET_DUMPABLE, 0)"));
    }
    // SAFETY: plain integer arguments; returns the flag.
    match unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } {
        0 => Ok(()),
        -1 => Err(call_failed("prctl(PR_GET_DUMPABLE)")),
        n => Err(PrivError::Verify(format!(
            "the process is still dumpable ({n})"
        ))),
    }
}

/// Calls `setns(fd, CLONE_NEWNET)`, `unshare(CLONE_NEWNET)`, `ptrace(PTRACE_TRACEME)`
/// and `setuid(0)` and returns their errnos (0 for a success), for tests
/// that check a seccomp filter refuses them. A success means the call was
/// made: only for a process about to exit.
#[cfg(test)]
pub(crate) fn forbidden_call_errnos(ns_fd: std::os::fd::BorrowedFd<'_>) -> [i32; 4] {
    use std::os::fd::AsRawFd;
    let errno = |rc: libc::c_long| {
        if rc == 0 {
            0
        } else {
            io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    };
    // SAFETY: raw syscalls with integer arguments; the fd is borrowed and
    // valid. Each is expected to be refused by the filter.
    unsafe {
        [
            errno(libc::syscall(
                libc::SYS_setns,
                ns_fd.as_raw_fd(),
                libc::CLONE_NEWNET,
            )),
            errno(libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNET)),
            errno(libc::syscall(
                libc::SYS_ptrace,
                libc::PTRACE_TRACEME,
                0,
                0,
                0,
            )),
            errno(libc::syscall(libc::SYS_setuid, 0)),
        ]
    }
}

/// Tries what only a filter stops an unprivileged process from doing: a
/// new user namespace (`unshare(CLONE_NEWUSER)`), a thread-less `clone`
/// into a new user namespace, and an executable anonymous mapping; returns
/// their errnos (0 for a success). Only for a process about to exit.
#[cfg(test)]
pub(crate) fn unprivileged_call_errnos() -> [i32; 3] {
    let last = || io::Error::last_os_error().raw_os_error().unwrap_or(-1);
    // The raw syscall, not libc::unshare (which .clippy.toml keeps to the
    // namespace thread): a test of the filter's refusal, not a switch.
    // SAFETY: unshare with a flag only changes this process's namespaces
    // (it is expected to be refused).
    let userns = match unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) } {
        0 => 0,
        _ => last(),
    };
    // SAFETY: a raw clone with a null stack behaves like fork; the child,
    // if one is made at all, exits at once without touching memory it
    // shares with nothing (the fork copied it).
    let clone = match unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong,
            0,
            0,
            0,
            0,
        )
    } {
        // SAFETY: _exit ends the child at once, running nothing of the
        // parent's (no destructors, no atexit handlers).
        0 => unsafe { libc::_exit(0) },
        n if n > 0 => {
            let mut status = 0;
            // SAFETY: reaps the child just made.
            unsafe { libc::waitpid(n as libc::pid_t, &mut status, 0) };
            0
        }
        _ => last(),
    };
    // SAFETY: an anonymous private mapping that nothing else refers to;
    // unmapped at once if it was made.
    let exec_map = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            last()
        } else {
            libc::munmap(p, 4096);
            0
        }
    };
    [userns, clone, exec_map]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_nobody_are_found_and_a_made_up_name_is_not() {
        let root = lookup_user("root").unwrap();
        assert_eq!((root.uid, root.gid, root.name.as_str()), (0, 0, "root"));
        match lookup_user("no-such-user-nsproxy") {
            Err(e @ PrivError::NoSuchUser(_)) => {
                assert_eq!(e.to_string(), "no such user \"no-such-user-nsproxy\"")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(lookup_user("a\0b"), Err(PrivError::NoSuchUser(_))));
    }

    #[test]
    fn capget_reads_this_thread() {
        let sets = capget().unwrap();
        assert_eq!(sets.effective & !sets.permitted, 0);
    }

    #[test]
    fn cap_bits_match_the_kernel_numbers() {
        assert_eq!(Cap::SysAdmin.bit(), 1 << 21);
        assert_eq!(Cap::NetBindService.bit(), 0x400);
    }
}
