//! The seccomp allowlists: the system calls the relay (and the broker) may
//! make once started, each group with why it is there, compiled to BPF
//! with `seccompiler`.
//!
//! The relay's list was built from what nsproxy really calls: the TCP,
//! UDP, live-reload, discovery and HTTP end-to-end suites run under
//! `strace -f`, plus what Rust's standard library and glibc call on rare
//! paths (a panic, an abort, a thread's start and end) and the SCTP calls
//! the VM suite makes. Absent on purpose, whatever the arguments:
//! `setns`, `unshare`, `mount`, `umount2`, `pivot_root`, `chroot`,
//! `ptrace`, `process_vm_*`, `execve`, `execveat`, `fork`/`vfork`, `bpf`,
//! `perf_event_open`, `init_module`, `finit_module`, `kexec_*`, `keyctl`,
//! `add_key`, `userfaultfd`, `io_uring_*`, `seccomp`, the `set*id` and
//! `capset` families, `kill`, `unlink`, `rename`, `chmod`, `chown`.
//!
//! A call not on the list fails with `EPERM` rather than killing the
//! process: nsproxy checks every result, so a call missing on a rare path
//! fails that one operation with a logged error (and the daemon keeps
//! serving everyone else), while what matters, that the call is not made,
//! holds either way. A killed relay would take every namespace's traffic
//! with it. `clone3` fails with `ENOSYS` instead: glibc then falls back to
//! `clone`, whose flags (unlike `clone3`'s, behind a pointer) a filter can
//! read, so a thread may start but no new namespace.

// libc's constants have the C types of each target (c_int, c_ulong, c_long),
// which are u64 or i64 on some targets and not on others: the casts to the
// filter's u64/i64 stay, even where they are no-ops.
#![allow(clippy::unnecessary_cast)]

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::sys::privs::PrivError;

/// What a syscall on a list may be called with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Args {
    /// Any arguments.
    Any,
    /// Argument `index` is one of these values.
    OneOf(u8, &'static [u64]),
    /// `(arg[index] & mask) == value`.
    Masked(u8, u64, u64),
    /// Argument `index` is this value.
    Eq(u8, u64),
    /// Argument `index` is a null pointer.
    Null(u8),
}

/// One allowed system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    pub name: &'static str,
    pub nr: i64,
    pub args: Args,
}

macro_rules! any {
    ($($name:ident),* $(,)?) => {
        [$(Allowed { name: stringify!($name), nr: libc::$name as i64, args: Args::Any }),*]
    };
}

fn named(list: &mut Vec<Allowed>, prefix_stripped: impl IntoIterator<Item = Allowed>) {
    list.extend(prefix_stripped.into_iter().map(|a| Allowed {
        name: a.name.trim_start_matches("SYS_"),
        ..a
    }));
}

fn with(name: &'static str, nr: libc::c_long, args: Args) -> Allowed {
    Allowed {
        name,
        nr: nr as i64,
        args,
    }
}

/// `linux/nsfs.h`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: u64 = 0xb703;
/// `linux/sockios.h`: the network namespace a socket belongs to, as an
/// nsfs fd (to check a socket from the broker is where it should be; the
/// fd is of no use for entering without `setns` and CAP_SYS_ADMIN).
const SIOCGSKNS: u64 = 0x894c;
/// The flags that would make a clone a new namespace of some kind.
const NEW_NAMESPACE: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;
/// Opening for writing, creating or truncating.
const OPEN_WRITE: u64 = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;

/// What both processes need to run at all: memory, threads and their
/// locks, signals (a panic's backtrace, an abort), time, and exit.
fn common() -> Vec<Allowed> {
    let mut l = Vec::new();
    // Memory: the allocator (brk, mmap, munmap, mremap, madvise to give
    // pages back) and thread stacks (mprotect for the guard page). Never
    // executable: no mapping or protection change may add PROT_EXEC, so a
    // compromised process cannot make new code.
    named(
        &mut l,
        any![SYS_brk, SYS_munmap, SYS_mremap, SYS_madvise, SYS_membarrier],
    );
    let no_exec = Args::Masked(2, libc::PROT_EXEC as u64, 0);
    l.push(with("mmap", libc::SYS_mmap, no_exec));
    l.push(with("mprotect", libc::SYS_mprotect, no_exec));
    // Threads and their locks: futex (every lock and condvar), a thread's
    // start (clone, only of a thread in the same namespaces; set_robust_list,
    // rseq and sigaltstack as glibc and std set each thread up) and end
    // (exit, madvise of its stack), sched_yield in spin loops,
    // sched_getaffinity for the CPU count.
    named(
        &mut l,
        any![
            SYS_futex,
            SYS_set_robust_list,
            SYS_rseq,
            SYS_sigaltstack,
            SYS_sched_yield,
            SYS_sched_getaffinity,
            SYS_set_tid_address,
            SYS_exit,
            SYS_exit_group,
        ],
    );
    l.push(with(
        "clone",
        libc::SYS_clone,
        Args::Masked(
            0,
            libc::CLONE_THREAD as u64 | NEW_NAMESPACE,
            libc::CLONE_THREAD as u64,
        ),
    ));
    // Thread names (PR_SET_NAME) and nothing else prctl can do.
    l.push(with(
        "prctl",
        libc::SYS_prctl,
        Args::OneOf(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64]),
    ));
    // Signals: handlers (tokio's SIGTERM/SIGHUP, std's stack-overflow
    // handler), masks, the return from a handler, and an abort's raise,
    // which is tgkill to the process's own thread (glibc's raise).
    named(
        &mut l,
        any![
            SYS_rt_sigaction,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_restart_syscall,
            SYS_getpid,
            SYS_getppid,
            SYS_gettid,
        ],
    );
    // Only to this process's own threads: not to another process of the
    // same user.
    l.push(with(
        "tgkill",
        libc::SYS_tgkill,
        Args::Eq(0, u64::from(std::process::id())),
    ));
    // Time: vDSO calls fall back to these; sleeps.
    named(
        &mut l,
        any![
            SYS_clock_gettime,
            SYS_clock_getres,
            SYS_gettimeofday,
            SYS_clock_nanosleep,
            SYS_nanosleep,
        ],
    );
    // Identity reads (never changes) and randomness (hash maps' seeds).
    named(
        &mut l,
        any![
            SYS_getuid,
            SYS_geteuid,
            SYS_getgid,
            SYS_getegid,
            SYS_getresuid,
            SYS_getresgid,
            SYS_getgroups,
            SYS_uname,
            SYS_getrandom,
        ],
    );
    // The open-file limit may be read (error messages name it), not set.
    l.push(with("prlimit64", libc::SYS_prlimit64, Args::Null(2)));
    // fds: reading, writing (logs to stderr, the sockets), closing,
    // duplicating, flags (O_NONBLOCK, FD_CLOEXEC).
    named(
        &mut l,
        any![
            SYS_read,
            SYS_readv,
            SYS_pread64,
            SYS_write,
            SYS_writev,
            SYS_close,
            SYS_dup,
            SYS_dup3,
            SYS_fcntl,
            SYS_lseek,
        ],
    );
    // Files, read only: namespace discovery reads /run/netns and
    // /proc/self/mountinfo, status reads /proc/self; an open for writing,
    // creating or truncating is refused.
    l.push(with(
        "openat",
        libc::SYS_openat,
        Args::Masked(2, OPEN_WRITE, 0),
    ));
    named(
        &mut l,
        any![
            SYS_fstat,
            SYS_newfstatat,
            SYS_statx,
            SYS_fstatfs,
            SYS_statfs,
            SYS_getdents64,
            SYS_readlinkat,
            SYS_faccessat,
            SYS_faccessat2,
            SYS_getcwd,
        ],
    );
    #[cfg(target_arch = "x86_64")]
    named(
        &mut l,
        any![
            SYS_access,
            SYS_readlink,
            SYS_stat,
            SYS_lstat,
            SYS_arch_prctl
        ],
    );
    l
}

/// What the relay does on top of [`common`].
fn relay_only() -> Vec<Allowed> {
    let mut l = Vec::new();
    // tokio's reactor (mio): epoll, its wake-up eventfd; poll for a single
    // fd (std).
    named(
        &mut l,
        any![
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_epoll_pwait,
            SYS_epoll_pwait2,
            SYS_eventfd2,
            SYS_ppoll,
        ],
    );
    #[cfg(target_arch = "x86_64")]
    named(&mut l, any![SYS_epoll_wait, SYS_poll]);
    // Namespace discovery: inotify on /run/netns and mountinfo.
    named(
        &mut l,
        any![
            SYS_inotify_init1,
            SYS_inotify_add_watch,
            SYS_inotify_rm_watch,
        ],
    );
    // TCP splice relays: a pipe per connection, splice in and out.
    named(&mut l, any![SYS_pipe2, SYS_splice]);
    // Reaping the socket broker, the one child, at exit (waiting only
    // reads a child's status: nothing to guard).
    named(&mut l, any![SYS_wait4, SYS_waitid]);
    // Sockets. New ones only of the families nsproxy uses (IPv4 and IPv6
    // for TCP, UDP and SCTP; unix for sd_notify, the control API and the
    // broker), never netlink, packet, vsock, alg and the like, whose code
    // a compromised relay could otherwise reach.
    let families: &'static [u64] = &[
        libc::AF_UNIX as u64,
        libc::AF_INET as u64,
        libc::AF_INET6 as u64,
    ];
    l.push(with("socket", libc::SYS_socket, Args::OneOf(0, families)));
    l.push(with(
        "socketpair",
        libc::SYS_socketpair,
        Args::OneOf(0, &[libc::AF_UNIX as u64]),
    ));
    // Everything done on a socket once made: listeners, connections, UDP
    // batches with packet info, SCTP messages with their control messages,
    // fds from the broker (recvmsg with SCM_RIGHTS).
    named(
        &mut l,
        any![
            SYS_bind,
            SYS_listen,
            SYS_accept4,
            SYS_connect,
            SYS_shutdown,
            SYS_getsockname,
            SYS_getpeername,
            SYS_getsockopt,
            SYS_setsockopt,
            SYS_sendto,
            SYS_recvfrom,
            SYS_sendmsg,
            SYS_recvmsg,
            SYS_sendmmsg,
            SYS_recvmmsg,
        ],
    );
    #[cfg(target_arch = "x86_64")]
    named(&mut l, any![SYS_accept]);
    // ioctl, only: is a terminal (the log format), non-blocking and
    // close-on-exec (std's socket setters), bytes queued (FIONREAD,
    // SIOCOUTQ), which kind of namespace an nsfs file is, and which
    // namespace a socket is in.
    l.push(with(
        "ioctl",
        libc::SYS_ioctl,
        Args::OneOf(
            1,
            &[
                libc::TCGETS as u64,
                libc::FIONBIO as u64,
                libc::FIOCLEX as u64,
                libc::FIONCLEX as u64,
                libc::FIONREAD as u64,
                libc::TIOCOUTQ as u64,
                NS_GET_NSTYPE,
                SIOCGSKNS,
            ],
        ),
    ));
    l
}

/// What the broker does on top of [`common`]: enter network namespaces,
/// make sockets there, set their options, bind them, and trade messages
/// with fds with the relay over its one unix socket.
fn broker_only() -> Vec<Allowed> {
    let mut l = Vec::new();
    // Into a network namespace only: an fd of another kind is refused by
    // the kernel for this nstype.
    l.push(with(
        "setns",
        libc::SYS_setns,
        Args::OneOf(1, &[libc::CLONE_NEWNET as u64]),
    ));
    let families: &'static [u64] = &[
        libc::AF_UNIX as u64,
        libc::AF_INET as u64,
        libc::AF_INET6 as u64,
    ];
    l.push(with("socket", libc::SYS_socket, Args::OneOf(0, families)));
    named(
        &mut l,
        any![
            SYS_bind,
            SYS_listen,
            // The config's text passed to the relay as a sealed memfd.
            SYS_memfd_create,
            SYS_getsockname,
            SYS_getsockopt,
            SYS_setsockopt,
            SYS_sendmsg,
            SYS_recvmsg,
            SYS_ppoll,
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_epoll_pwait,
            SYS_eventfd2,
        ],
    );
    #[cfg(target_arch = "x86_64")]
    named(&mut l, any![SYS_poll, SYS_epoll_wait]);
    l.push(with(
        "ioctl",
        libc::SYS_ioctl,
        Args::OneOf(
            1,
            &[
                libc::TCGETS as u64,
                libc::FIONBIO as u64,
                libc::FIOCLEX as u64,
                NS_GET_NSTYPE,
                SIOCGSKNS,
            ],
        ),
    ));
    l
}

/// The relay's allowlist, sorted by name. For this process: `tgkill` is
/// allowed to its own pid only.
pub fn relay_allowlist() -> Vec<Allowed> {
    sorted(common().into_iter().chain(relay_only()).collect())
}

/// The broker's allowlist, sorted by name.
pub fn broker_allowlist() -> Vec<Allowed> {
    sorted(common().into_iter().chain(broker_only()).collect())
}

fn sorted(mut l: Vec<Allowed>) -> Vec<Allowed> {
    l.sort_by_key(|a| a.name);
    l
}

/// The syscall names a list allows, with `(argument N restricted)` after
/// those whose arguments are checked, and the `clone3` line: for `nsproxy
/// check --show-syscalls` and the README.
pub fn describe(list: &[Allowed]) -> Vec<String> {
    let mut lines: Vec<String> = list
        .iter()
        .map(|a| match a.args {
            Args::Any => a.name.to_owned(),
            Args::OneOf(i, _) | Args::Masked(i, _, _) | Args::Eq(i, _) | Args::Null(i) => {
                format!("{} (argument {i} restricted)", a.name)
            }
        })
        .collect();
    lines.push("clone3 (always fails with ENOSYS: glibc then uses clone)".to_owned());
    lines.sort();
    lines
}

fn arch() -> Result<TargetArch, PrivError> {
    TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| PrivError::Seccomp(format!("no filter for this architecture: {e}")))
}

fn backend(e: impl std::fmt::Display) -> PrivError {
    PrivError::Seccomp(e.to_string())
}

/// Compiles `list` to a filter: listed calls (with allowed arguments) are
/// allowed, anything else fails with EPERM.
fn compile(list: &[Allowed]) -> Result<BpfProgram, PrivError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for a in list {
        // Values and flags are compared in their low 32 bits (Dword): the
        // arguments checked that way are C ints or, for ioctl, a number the
        // kernel truncates to 32 bits itself, so the upper half of the
        // register is not part of the call and may hold anything. A
        // pointer is compared whole.
        let dword = |i, op, v| SeccompCondition::new(i, SeccompCmpArgLen::Dword, op, v);
        let conds: Vec<Vec<SeccompCondition>> = match a.args {
            Args::Any => vec![],
            Args::OneOf(i, values) => values
                .iter()
                .map(|&v| dword(i, SeccompCmpOp::Eq, v).map(|c| vec![c]))
                .collect::<Result<_, _>>()
                .map_err(backend)?,
            Args::Masked(i, mask, value) => {
                vec![vec![
                    dword(i, SeccompCmpOp::MaskedEq(mask), value).map_err(backend)?,
                ]]
            }
            Args::Eq(i, v) => vec![vec![dword(i, SeccompCmpOp::Eq, v).map_err(backend)?]],
            Args::Null(i) => vec![vec![
                SeccompCondition::new(i, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, 0)
                    .map_err(backend)?,
            ]],
        };
        let entry = rules.entry(a.nr).or_default();
        for c in conds {
            entry.push(SeccompRule::new(c).map_err(backend)?);
        }
    }
    // Allowed here so that the companion filter's ENOSYS is the answer
    // (an EPERM here would be as strong and win as the newer filter's).
    rules.insert(libc::SYS_clone3, vec![]);
    SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch()?,
    )
    .map_err(backend)?
    .try_into()
    .map_err(backend)
}

/// The companion filter: `clone3` → ENOSYS (see the module's comment),
/// all else allowed. The kernel runs every filter installed and takes the
/// strongest answer: this one's ENOSYS beats the allowlist's Allow for
/// `clone3` (which [`compile`] lists for this reason only), and the
/// allowlist's EPERM beats this one's Allow for the rest. It is installed
/// first, while `prctl` and `seccomp` are still allowed.
fn clone3_filter() -> Result<BpfProgram, PrivError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(backend)?
    .try_into()
    .map_err(backend)
}

/// A compiled pair of filters, ready to install.
#[derive(Debug, Clone)]
pub struct Filter {
    allowlist: BpfProgram,
    clone3: BpfProgram,
}

impl Filter {
    /// The relay's filter.
    pub fn relay() -> Result<Filter, PrivError> {
        Ok(Filter {
            allowlist: compile(&relay_allowlist())?,
            clone3: clone3_filter()?,
        })
    }

    /// The broker's filter.
    pub fn broker() -> Result<Filter, PrivError> {
        Ok(Filter {
            allowlist: compile(&broker_allowlist())?,
            clone3: clone3_filter()?,
        })
    }

    /// Installs the filter on every thread of the process (TSYNC), which
    /// also sets `no_new_privs` on each. For good: a filter cannot be
    /// removed, and one installed later can only refuse more.
    pub fn apply_to_all_threads(&self) -> Result<(), PrivError> {
        // This order: the allowlist refuses the prctl and seccomp calls
        // that installing a filter makes.
        seccompiler::apply_filter_all_threads(&self.clone3).map_err(backend)?;
        seccompiler::apply_filter_all_threads(&self.allowlist).map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(l: &[Allowed]) -> Vec<&str> {
        l.iter().map(|a| a.name).collect()
    }

    #[test]
    fn what_must_stay_out_is_out() {
        for list in [relay_allowlist(), broker_allowlist()] {
            let n = names(&list);
            for banned in [
                "unshare",
                "mount",
                "umount2",
                "pivot_root",
                "chroot",
                "ptrace",
                "execve",
                "execveat",
                "fork",
                "vfork",
                "clone3",
                "bpf",
                "init_module",
                "finit_module",
                "kexec_load",
                "setuid",
                "setresuid",
                "setgid",
                "setresgid",
                "setgroups",
                "capset",
                "seccomp",
                "kill",
                "unlink",
                "unlinkat",
                "chmod",
                "io_uring_setup",
                "perf_event_open",
                "keyctl",
                "userfaultfd",
                "process_vm_writev",
                "open",
            ] {
                assert!(!n.contains(&banned), "{banned} is allowed");
            }
        }
        assert!(!names(&relay_allowlist()).contains(&"setns"));
        assert!(names(&broker_allowlist()).contains(&"setns"));
    }

    #[test]
    fn every_name_is_listed_once_and_without_its_prefix() {
        for list in [relay_allowlist(), broker_allowlist()] {
            let mut n = names(&list);
            assert!(n.iter().all(|s| !s.starts_with("SYS_")), "{n:?}");
            let len = n.len();
            n.dedup();
            assert_eq!(n.len(), len, "a call is listed twice");
        }
    }

    #[test]
    fn what_the_relay_was_seen_to_call_is_allowed() {
        // From strace of the end-to-end suites (x86_64), minus what only
        // happens before the drop (execve, the control socket's chmod and
        // the namespace thread's setns).
        let seen = [
            "accept4",
            "bind",
            "brk",
            "close",
            "connect",
            "epoll_create1",
            "epoll_ctl",
            "eventfd2",
            "exit",
            "exit_group",
            "fcntl",
            "fstatfs",
            "futex",
            "getdents64",
            "getpid",
            "getrandom",
            "getsockname",
            "getsockopt",
            "gettid",
            "inotify_add_watch",
            "inotify_init1",
            "ioctl",
            "listen",
            "lseek",
            "madvise",
            "mmap",
            "mprotect",
            "mremap",
            "munmap",
            "newfstatat",
            "openat",
            "pipe2",
            "pread64",
            "prctl",
            "prlimit64",
            "read",
            "recvfrom",
            "recvmmsg",
            "rseq",
            "rt_sigaction",
            "rt_sigprocmask",
            "rt_sigreturn",
            "sched_getaffinity",
            "sendmmsg",
            "sendmsg",
            "sendto",
            "set_robust_list",
            "setsockopt",
            "shutdown",
            "sigaltstack",
            "socket",
            "socketpair",
            "splice",
            "statx",
            "write",
            "writev",
        ];
        let relay = relay_allowlist();
        let n = names(&relay);
        for s in seen {
            assert!(n.contains(&s), "{s} is not allowed");
        }
    }

    #[test]
    fn both_filters_compile() {
        Filter::relay().unwrap();
        Filter::broker().unwrap();
        let d = describe(&relay_allowlist());
        assert!(
            d.contains(&"socket (argument 0 restricted)".to_owned()),
            "{d:?}"
        );
        assert!(d.contains(&"accept4".to_owned()));
    }
}
