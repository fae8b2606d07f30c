//! Privilege separation: what the relay and the broker give up, and the
//! checks that they did.
//!
//! Started as root and split, nsproxy runs two processes (see the README's
//! "Security" section):
//! - the relay, which handles every tenant's bytes, becomes an ordinary
//!   user with no capability ([`become_relay`]), sets `no_new_privs`, and
//!   installs the seccomp allowlist of [`seccomp`] on all its threads
//!   ([`seccomp::Filter::relay`], [`seccomp::Filter::apply_to_all_threads`]);
//! - the broker, which makes sockets inside namespaces, stays uid 0 with
//!   only CAP_SYS_ADMIN (for `setns`) and, when a rule listens on a port
//!   below 1024, CAP_NET_BIND_SERVICE ([`become_broker`]).
//!
//! # Order, for the caller
//! [`become_relay`] may run before or after the runtime's threads exist:
//! glibc changes the ids of every thread, and the kernel clears the
//! capabilities of each thread whose ids all become non-zero. Before is
//! still better: the bounding set and the inheritable set it clears are the
//! calling thread's, inherited only by threads started after. The seccomp
//! filter goes last, after the drop (the filter refuses `setresuid`) and
//! after everything done once at start-up that the filter refuses (opening
//! files for writing, `chmod` of the control socket, `execve` of the
//! broker); with TSYNC it covers the threads that already exist, so it may
//! be installed once the runtime is up.

pub mod seccomp;
mod status;

pub use self::status::{ProcStatus, StatusError};
pub use crate::sys::privs::{Account, Cap, CapSets, PrivError};

use crate::sys::privs;

/// The account nsproxy runs its relay as unless configured otherwise.
pub const DEFAULT_USER: &str = "nobody";

/// Looks an account up by name: `no such user "NAME"` if there is none.
pub fn lookup_user(name: &str) -> Result<Account, PrivError> {
    privs::lookup_user(name)
}

/// True when the process runs as root (effective uid 0).
pub fn is_root() -> bool {
    effective_uid() == 0
}

/// The effective uid.
pub fn effective_uid() -> u32 {
    privs::getresuid().1
}

/// The real uid: the user who started nsproxy (sudo and systemd set it
/// too), whom the control socket answers besides root.
pub fn starting_uid() -> u32 {
    privs::getuid()
}

/// Becomes `account` for good, with no capability left, not dumpable (no
/// other process of `account` may ptrace it or read its memory and fds, and
/// it leaves no core dump), and sets `no_new_privs`; checks all of it
/// through `/proc/thread-self/status`. Refuses
/// uid 0 (that is not dropping). Needs root (CAP_SETUID, CAP_SETGID,
/// CAP_SETPCAP). The seccomp filter is separate: see the module's "Order".
pub fn become_relay(account: &Account) -> Result<(), PrivError> {
    if account.uid == 0 {
        return Err(PrivError::Refused(format!(
            "the relay may not run as {} (uid 0): that keeps every privilege",
            account.name
        )));
    }
    // While CAP_SETPCAP is still there: no execve can bring a capability
    // back, whatever file it runs.
    privs::drop_bounding_set(&[])?;
    privs::drop_to(account.uid, account.gid)?;
    // The drop cleared effective, permitted and ambient; inheritable stays
    // unless cleared.
    privs::clear_caps()?;
    privs::set_not_dumpable()?;
    privs::set_no_new_privs()?;
    let st = ProcStatus::of_thread_self().map_err(|e| PrivError::Verify(e.to_string()))?;
    let caps = privs::capget()?;
    if caps
        != (CapSets {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        })
        || !st.holds_no_capability()
    {
        return Err(PrivError::Verify(format!(
            "capabilities remain: effective {:#x}, permitted {:#x}, inheritable {:#x}, ambient {:#x}",
            st.cap_eff,
            st.cap_prm,
            st.cap_inh,
            st.cap_amb.unwrap_or(0)
        )));
    }
    if st.uid != [account.uid; 4] || st.gid != [account.gid; 4] {
        return Err(PrivError::Verify(format!(
            "the process is uid {:?} gid {:?}, not {}:{}",
            st.uid, st.gid, account.uid, account.gid
        )));
    }
    if st.no_new_privs == Some(false) {
        return Err(PrivError::Verify("no_new_privs is not set".into()));
    }
    Ok(())
}

/// The capabilities the broker keeps: CAP_SYS_ADMIN for `setns`, and
/// CAP_NET_BIND_SERVICE when a rule listens on a port below 1024.
pub fn broker_caps(need_bind_service: bool) -> Vec<Cap> {
    let mut caps = vec![Cap::SysAdmin];
    if need_bind_service {
        caps.push(Cap::NetBindService);
    }
    caps
}

/// Keeps only [`broker_caps`] (effective, permitted and bounding; nothing
/// inheritable or ambient) and sets `no_new_privs`; stays uid 0. For the
/// calling thread: call it while the broker is single-threaded.
pub fn become_broker(need_bind_service: bool) -> Result<(), PrivError> {
    keep_only_caps(&broker_caps(need_bind_service))
}

/// Like [`become_broker`] with any set of capabilities (a feature needing
/// CAP_NET_ADMIN or CAP_NET_RAW, or CAP_SYS_PTRACE for `pid:N` references
/// to another user's processes).
pub fn keep_only_caps(keep: &[Cap]) -> Result<(), PrivError> {
    privs::keep_only_caps(keep)?;
    privs::set_no_new_privs()?;
    let st = ProcStatus::of_thread_self().map_err(|e| PrivError::Verify(e.to_string()))?;
    let mask = keep.iter().fold(0, |m, c| m | c.bit());
    if st.cap_eff & !mask != 0 || st.cap_prm & !mask != 0 || st.cap_bnd & !mask != 0 {
        return Err(PrivError::Verify(format!(
            "the broker holds more than {mask:#x}: effective {:#x}, permitted {:#x}, bounding {:#x}",
            st.cap_eff, st.cap_prm, st.cap_bnd
        )));
    }
    Ok(())
}

/// Compiles the relay's seccomp filter and installs it on every thread:
/// for good, and last (see the module's "Order").
pub fn install_relay_filter() -> Result<(), PrivError> {
    seccomp::Filter::relay()?.apply_to_all_threads()
}

/// Compiles the broker's seccomp filter and installs it on every thread.
pub fn install_broker_filter() -> Result<(), PrivError> {
    seccomp::Filter::broker()?.apply_to_all_threads()
}

/// The relay's allowed system calls, one line each, sorted (for `nsproxy
/// check --show-syscalls` and the README).
pub fn relay_syscalls() -> Vec<String> {
    seccomp::describe(&seccomp::relay_allowlist())
}

/// The broker's allowed system calls, one line each, sorted.
pub fn broker_syscalls() -> Vec<String> {
    seccomp::describe(&seccomp::broker_allowlist())
}

/// Sets `no_new_privs` on the calling thread.
pub fn set_no_new_privs() -> Result<(), PrivError> {
    privs::set_no_new_privs()
}

/// This process's privileges as `/proc/self/status` shows them.
pub fn self_status() -> Result<ProcStatus, StatusError> {
    ProcStatus::of_self()
}

#[cfg(test)]
mod tests;
