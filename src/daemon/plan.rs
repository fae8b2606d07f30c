//! Who nsproxy runs as, decided from how it was started: a pure function
//! of the effective uid and the `user` setting, so every case is tested
//! without root.

use std::fmt;

/// How the daemon runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Started as root: a socket broker keeps only what socket birth needs,
    /// and the relay runs as `user` with no capability.
    Split { user: String },
    /// One process, as started.
    Single(Single),
}

/// Why nsproxy runs as one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Single {
    /// `user = "root"`: every part keeps root's privileges.
    RootByChoice,
    /// Not started as root: it can enter only the namespaces its
    /// capabilities (if any) allow, usually just its own.
    Unprivileged { euid: u32 },
}

/// The account the relay runs as when nothing says otherwise.
pub const DEFAULT_USER: &str = "nobody";

/// The plan for a process of effective uid `euid` whose `user` setting
/// (the `--user` option over the file's `user`) is `user`.
pub fn plan(euid: u32, user: Option<&str>) -> Plan {
    match (euid, user) {
        (0, Some("root")) => Plan::Single(Single::RootByChoice),
        (0, user) => Plan::Split {
            user: user.unwrap_or(DEFAULT_USER).to_owned(),
        },
        (euid, _) => Plan::Single(Single::Unprivileged { euid }),
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Plan::Split { user } => write!(
                f,
                "split: the relay runs as {user} with no capability, a socket broker keeps only what making sockets in namespaces needs"
            ),
            Plan::Single(Single::RootByChoice) => f.write_str(
                "one process as root (user = \"root\"): the less safe choice, every part of nsproxy keeps root's privileges (see the README's Security section)",
            ),
            Plan::Single(Single::Unprivileged { euid }) => write!(
                f,
                "one process as uid {euid}, not root: nsproxy serves the namespaces it may enter (usually only its own); a binding in any other fails with the reason"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_splits_as_nobody_unless_told() {
        assert_eq!(
            plan(0, None),
            Plan::Split {
                user: "nobody".into()
            }
        );
        assert_eq!(
            plan(0, Some("nsproxy")),
            Plan::Split {
                user: "nsproxy".into()
            }
        );
    }

    #[test]
    fn user_root_keeps_one_process() {
        assert_eq!(plan(0, Some("root")), Plan::Single(Single::RootByChoice));
        assert!(plan(0, Some("root")).to_string().contains("less safe"));
    }

    #[test]
    fn without_root_nothing_is_split() {
        for user in [None, Some("nobody"), Some("root")] {
            assert_eq!(
                plan(1000, user),
                Plan::Single(Single::Unprivileged { euid: 1000 })
            );
        }
    }
}
