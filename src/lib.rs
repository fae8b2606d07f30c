//! nsproxy: listen on and proxy TCP, UDP and SCTP ports inside many Linux
//! network namespaces from one process with a small, fixed number of threads.
//!
//! A socket belongs to the network namespace its creating thread was in at
//! `socket(2)` time, and stays there for life. One dedicated thread
//! ([`netns::Switcher`]) switches in, creates the socket and switches back;
//! from then on the ordinary tokio reactor drives it like any other socket.
//!
//! # Layout
//! - [`netns`]: namespace references and identities, the one thread that
//!   switches namespaces (the only `setns` in the process), and the seam
//!   sockets come through ([`netns::SocketFactory`], with the
//!   [`netns::Lease`]s that hold a namespace open).
//! - [`broker`]: the socket broker, the small privileged process that makes
//!   sockets in namespaces for a relay without privileges (split mode), its
//!   protocol and its policy.
//! - [`config`]: the configuration model, its TOML and command-line front
//!   ends, and validation that reports every problem with its location;
//!   [`config::check`] judges the namespaces a valid config names, for
//!   `nsproxy check`.
//! - [`proxy`]: listeners and relays per protocol ([`proxy::tcp`],
//!   [`proxy::udp`], [`proxy::sctp`]); idle listeners wait without a task,
//!   parked in one epoll set.
//! - [`lifecycle`]: turns a [`config::Config`] into running bindings (one
//!   rule in one namespace each, and one per port of a port range), follows namespaces as they come and go,
//!   applies reloads as a difference, reports state, and shuts down
//!   gracefully. Its decisions are pure functions (`desired`, `reconcile`,
//!   `retry`) that a thin shell (`apply`, `leases`) carries out on sockets;
//!   `report` renders states as text.
//! - [`privsep`]: privilege separation: dropping to an unprivileged user,
//!   keeping only the broker's capabilities, the seccomp allowlists, and
//!   reading back what a process holds (`/proc/PID/status`).
//! - [`runtime`]: the tokio runtime with a fixed thread count.
//! - [`sctp`]: kernel SCTP through a thin layer over libc (socket options,
//!   `recvmsg`/`sendmsg` with stream id and PPID, notifications).
//! - [`status`]: the snapshot behind `nsproxy status`, the API and metrics.
//! - [`control`]: the HTTP/JSON control API on a unix socket, and its client.
//! - [`metrics`]: Prometheus text exposition, and the rest of the metrics
//!   listener: the status page, the status JSON and the health probes.
//! - [`systemd`]: readiness notifications (`sd_notify`).
//! - [`takeover`]: upgrading without an outage: a new process takes the
//!   running one's listening sockets over its control socket (`SCM_RIGHTS`)
//!   and the old one drains and exits.
//!
//! - [`daemon`]: `nsproxy run` and `forward` from a parsed config to exit:
//!   where sockets come from, the runtime, the control socket and metrics
//!   endpoint, privileges given up, the server, signals, reload and drain.
//! - [`broker`]: the socket broker of a split nsproxy (started as root):
//!   the one process that keeps CAP_SYS_ADMIN, making sockets in
//!   namespaces its policy allows and passing them to the relay.
//! - [`privsep`]: the relay's and the broker's privileges: accounts,
//!   capabilities, `no_new_privs`, seccomp allowlists.
//!
//! The `nsproxy` binary is a thin command-line layer over [`daemon`]: it
//! parses arguments and sets up logging.

#![deny(unsafe_code)]

pub mod broker;
pub mod config;
pub mod control;
pub mod daemon;
pub mod lifecycle;
pub mod metrics;
pub mod netns;
pub mod privsep;
pub mod proxy;
pub mod runtime;
pub mod sctp;
pub mod status;
mod sys;
pub mod systemd;
pub mod takeover;
