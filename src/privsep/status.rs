//! What `/proc/PID/status` says about a process's privileges: its ids,
//! capability sets, `no_new_privs` and seccomp mode. A pure parser, so that
//! tests, `nsproxy status` and the checks after a drop read the same thing.

use std::path::Path;

use serde::Serialize;

/// The privilege lines of one `/proc/PID/status` (of its main thread).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcStatus {
    /// Real, effective, saved and filesystem user ids.
    pub uid: [u32; 4],
    /// Real, effective, saved and filesystem group ids.
    pub gid: [u32; 4],
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    /// `None` before Linux 4.3 (no ambient set).
    pub cap_amb: Option<u64>,
    /// `None` before Linux 4.10, which does not show it.
    pub no_new_privs: Option<bool>,
    /// 0 none, 1 strict, 2 filter; `None` without `CONFIG_SECCOMP`.
    pub seccomp: Option<u8>,
    /// How many filters are installed (Linux 5.9 on).
    pub seccomp_filters: Option<u32>,
}

/// Why a status text could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StatusError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("no {0} line in the process status")]
    Missing(&'static str),
    #[error("malformed {field} line in the process status: {line:?}")]
    Malformed { field: &'static str, line: String },
}

impl ProcStatus {
    /// Parses the text of a `/proc/PID/status`.
    pub fn parse(text: &str) -> Result<ProcStatus, StatusError> {
        let field = |name: &'static str| -> Option<&str> {
            text.lines().find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(':'))
                    .map(str::trim)
            })
        };
        let malformed = |name: &'static str, v: &str| StatusError::Malformed {
            field: name,
            line: format!("{name}:\t{v}"),
        };
        let ids = |name: &'static str| -> Result<[u32; 4], StatusError> {
            let v = field(name).ok_or(StatusError::Missing(name))?;
            let parsed: Vec<u32> = v
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|_| malformed(name, v))?;
            parsed.try_into().map_err(|_| malformed(name, v))
        };
        let hex = |name: &'static str| -> Result<Option<u64>, StatusError> {
            field(name)
                .map(|v| u64::from_str_radix(v, 16).map_err(|_| malformed(name, v)))
                .transpose()
        };
        let required = |name: &'static str| hex(name)?.ok_or(StatusError::Missing(name));
        let number = |name: &'static str| -> Result<Option<u32>, StatusError> {
            field(name)
                .map(|v| v.parse::<u32>().map_err(|_| malformed(name, v)))
                .transpose()
        };
        let no_new_privs = match number("NoNewPrivs")? {
            None => None,
            Some(0) => Some(false),
            Some(1) => Some(true),
            Some(n) => return Err(malformed("NoNewPrivs", &n.to_string())),
        };
        let seccomp = match number("Seccomp")? {
            None => None,
            Some(n @ 0..=2) => Some(n as u8),
            Some(n) => return Err(malformed("Seccomp", &n.to_string())),
        };
        Ok(ProcStatus {
            uid: ids("Uid")?,
            gid: ids("Gid")?,
            cap_inh: required("CapInh")?,
            cap_prm: required("CapPrm")?,
            cap_eff: required("CapEff")?,
            cap_bnd: required("CapBnd")?,
            cap_amb: hex("CapAmb")?,
            no_new_privs,
            seccomp,
            seccomp_filters: number("Seccomp_filters")?,
        })
    }

    /// Reads and parses `path` (`/proc/self/status`, `/proc/PID/status`).
    pub fn read(path: &Path) -> Result<ProcStatus, StatusError> {
        let text = std::fs::read_to_string(path).map_err(|e| StatusError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        ProcStatus::parse(&text)
    }

    /// This process's (its main thread's).
    pub fn of_self() -> Result<ProcStatus, StatusError> {
        ProcStatus::read(Path::new("/proc/self/status"))
    }

    /// The calling thread's: capabilities and `no_new_privs` are per
    /// thread, and `/proc/self` shows the main thread's.
    pub fn of_thread_self() -> Result<ProcStatus, StatusError> {
        ProcStatus::read(Path::new("/proc/thread-self/status"))
    }

    /// Process `pid`'s (its main thread's).
    pub fn of_pid(pid: u32) -> Result<ProcStatus, StatusError> {
        ProcStatus::read(Path::new(&format!("/proc/{pid}/status")))
    }

    /// True when the process holds no capability at all: none effective,
    /// permitted, inheritable or ambient.
    pub fn holds_no_capability(&self) -> bool {
        self.cap_eff == 0
            && self.cap_prm == 0
            && self.cap_inh == 0
            && self.cap_amb.unwrap_or(0) == 0
    }

    /// True when a seccomp filter is installed (mode 2).
    pub fn filtered(&self) -> bool {
        self.seccomp == Some(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RELAY: &str = "Name:\tnsproxy\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t4242\n\
Uid:\t65534\t65534\t65534\t65534\nGid:\t65534\t65534\t65534\t65534\nFDSize:\t64\nGroups:\t\n\
CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\n\
Seccomp_filters:\t2\nSpeculation_Store_Bypass:\tthread vulnerable\n";

    #[test]
    fn a_relay_status_reads_as_unprivileged() {
        let s = ProcStatus::parse(RELAY).unwrap();
        assert_eq!(s.uid, [65534; 4]);
        assert_eq!(s.gid, [65534; 4]);
        assert!(s.holds_no_capability());
        assert_eq!(s.no_new_privs, Some(true));
        assert!(s.filtered());
        assert_eq!(s.seccomp_filters, Some(2));
    }

    #[test]
    fn a_broker_status_shows_its_capabilities() {
        let text = RELAY
            .replace("65534", "0")
            .replace("CapPrm:\t0000000000000000", "CapPrm:\t0000000000200400")
            .replace("CapEff:\t0000000000000000", "CapEff:\t0000000000200400")
            .replace("Seccomp:\t2", "Seccomp:\t0");
        let s = ProcStatus::parse(&text).unwrap();
        assert_eq!(s.cap_eff, (1 << 21) | (1 << 10));
        assert!(!s.holds_no_capability());
        assert!(!s.filtered());
    }

    #[test]
    fn old_kernels_lack_some_lines() {
        let text: String = RELAY
            .lines()
            .filter(|l| {
                !l.starts_with("CapAmb")
                    && !l.starts_with("NoNewPrivs")
                    && !l.starts_with("Seccomp")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let s = ProcStatus::parse(&text).unwrap();
        assert_eq!((s.cap_amb, s.no_new_privs, s.seccomp), (None, None, None));
    }

    #[test]
    fn missing_and_malformed_lines_are_named() {
        let no_eff: String = RELAY
            .lines()
            .filter(|l| !l.starts_with("CapEff"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(
            ProcStatus::parse(&no_eff),
            Err(StatusError::Missing("CapEff"))
        );
        let bad = RELAY.replace("Uid:\t65534\t65534\t65534\t65534", "Uid:\t1\t2");
        assert!(matches!(
            ProcStatus::parse(&bad),
            Err(StatusError::Malformed { field: "Uid", .. })
        ));
        let bad = RELAY.replace("CapEff:\t0000000000000000", "CapEff:\txyz");
        assert!(matches!(
            ProcStatus::parse(&bad),
            Err(StatusError::Malformed {
                field: "CapEff",
                ..
            })
        ));
        let bad = RELAY.replace("Seccomp:\t2", "Seccomp:\t7");
        assert!(matches!(
            ProcStatus::parse(&bad),
            Err(StatusError::Malformed {
                field: "Seccomp",
                ..
            })
        ));
    }

    #[test]
    fn a_prefix_of_another_field_is_not_taken_for_it() {
        // "Seccomp_filters" must not be read as "Seccomp".
        let text = RELAY.replace("Seccomp:\t2\n", "");
        let s = ProcStatus::parse(&text).unwrap();
        assert_eq!(s.seccomp, None);
        assert_eq!(s.seccomp_filters, Some(2));
    }

    #[test]
    fn this_process_can_be_read() {
        let s = ProcStatus::of_self().unwrap();
        assert_eq!(s.cap_eff & !s.cap_prm, 0);
        assert_eq!(ProcStatus::of_pid(std::process::id()).unwrap().uid, s.uid);
        assert_eq!(ProcStatus::of_thread_self().unwrap().uid, s.uid);
    }
}
