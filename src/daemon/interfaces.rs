//! The operator's interfaces of a running daemon: the control socket and
//! the metrics listener, bound (or taken over) before the server starts,
//! served once it has, and handed on at a takeover.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::lifecycle::Server;
use crate::{control, metrics};

/// The operator's interfaces: bound before the server starts (and before
/// any privilege is given up), served once it has.
pub(super) struct Interfaces {
    control: Option<UnixListener>,
    /// Removed at exit.
    control_path: Option<PathBuf>,
    /// Who may use the control socket: root and the user who started
    /// nsproxy, read before any privilege is given up.
    peers: control::Peers,
    metrics: Option<TcpListener>,
    /// Both endpoints' counters (the metrics show the control API's too).
    http_stats: Arc<control::HttpStats>,
    /// The tasks serving both, stopped when another process takes them over.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// A copy of the metrics listener, for systemd's fd store at stop.
    pub(super) metrics_copy: Option<(std::net::SocketAddr, std::os::fd::OwnedFd)>,
    /// Another, for a takeover (given to the control API's handler).
    metrics_for_giver: Option<(std::net::SocketAddr, std::os::fd::OwnedFd)>,
    /// The control socket was taken over and the old process still owns
    /// its file: not removed should this process stop before it serves.
    pub(super) control_adopted: bool,
}

impl Interfaces {
    /// Binds the control socket and the metrics listener, or takes those
    /// of the process `taken` over from when they are the same.
    pub(super) async fn bind(
        config: &Config,
        mut taken: Option<&mut crate::takeover::Taken>,
    ) -> Interfaces {
        let (mut control, mut control_path, mut control_adopted) = (None, None, false);
        if let Some(p) = control_socket_path(config) {
            let inherited = taken.as_mut().and_then(|t| t.control_listener(&p));
            let adopted = inherited.is_some();
            let bound = match inherited {
                Some(l) => Ok(l),
                None => control::bind(&p).await,
            };
            match bound {
                Ok(l) => (control, control_path) = (Some(l), Some(p)),
                Err(e) => error!("{e}; the control API (nsproxy status, nsproxy reload) is off"),
            }
            control_adopted = adopted;
        }
        let mut metrics = None;
        if let Some(addr) = config.metrics_listen {
            let inherited = taken.as_mut().and_then(|t| t.metrics_listener(addr));
            let bound = match inherited {
                Some(l) => Ok(l),
                None => metrics::bind(addr).await,
            };
            match bound {
                Ok(l) => metrics = Some(l),
                Err(e) => error!("{e}; metrics are off"),
            }
        }
        Interfaces {
            control,
            control_path,
            peers: control::Peers::starting_user(),
            metrics,
            http_stats: Arc::default(),
            tasks: Vec::new(),
            metrics_copy: None,
            metrics_for_giver: None,
            control_adopted,
        }
    }

    /// Serves the metrics listener, which follows the daemon's `health`
    /// (its probes answer before the server exists). Keeps copies of the
    /// listener for a later takeover and for systemd's fd store at stop.
    pub(super) fn serve_metrics(&mut self, health: &Arc<metrics::Health>) {
        let Some(l) = self.metrics.take() else {
            return;
        };
        if let Ok(addr) = l.local_addr() {
            self.metrics_copy = copy_fd(l.as_fd()).map(|fd| (addr, fd));
            self.metrics_for_giver = copy_fd(l.as_fd()).map(|fd| (addr, fd));
        }
        let addr = l.local_addr().map(|a| a.to_string()).unwrap_or_default();
        info!("metrics on http://{addr}/metrics, status page on http://{addr}/");
        let limits = control::Limits::METRICS;
        let stats = self.http_stats.clone();
        self.tasks.push(tokio::spawn(metrics::serve(
            l,
            health.clone(),
            limits,
            stats,
        )));
    }

    /// Serves the control API on the server's commands; a takeover that is
    /// done is told to `handed`.
    pub(super) fn serve_control(
        &mut self,
        server: &Server,
        handed: tokio::sync::mpsc::UnboundedSender<u32>,
    ) {
        let control_fd = self.control.as_ref().and_then(|l| copy_fd(l.as_fd()));
        let giver = crate::takeover::Giver::new(
            server.handover(),
            self.control_path.clone().zip(control_fd),
            self.metrics_for_giver.take(),
            self.peers.clone(),
            handed,
        );
        if let (Some(l), Some(p)) = (self.control.take(), &self.control_path) {
            info!("control API on {}", p.display());
            let limits = control::Limits::CONTROL;
            let peers = self.peers.clone();
            self.tasks.push(tokio::spawn(control::serve_with(
                l,
                server.commands(),
                limits,
                self.http_stats.clone(),
                peers,
                Some(Arc::new(giver)),
            )));
        }
    }

    /// Another process serves the control socket and metrics from now on:
    /// this one stops answering, and leaves the socket file in place.
    pub(super) fn hand_off(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.control_path = None;
    }

    pub(super) fn remove_socket(&self) {
        if self.control_adopted {
            return;
        }
        if let Some(p) = &self.control_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The control socket's path; `None` when the API is off.
pub(super) fn control_socket_path(config: &Config) -> Option<PathBuf> {
    match &config.control_socket {
        Some(p) if p.as_os_str().is_empty() => None,
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from(control::DEFAULT_SOCKET)),
    }
}

/// A copy of a listener's fd, kept to hand it on later.
fn copy_fd(fd: std::os::fd::BorrowedFd<'_>) -> Option<std::os::fd::OwnedFd> {
    match fd.try_clone_to_owned() {
        Ok(fd) => Some(fd),
        Err(e) => {
            warn!("cannot copy a listener's fd for a later takeover: {e}");
            None
        }
    }
}
