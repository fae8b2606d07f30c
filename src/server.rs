//! Turns a configuration into running bindings, and stops them.
//!
//! A binding is one rule in one namespace. Each binding succeeds or fails on
//! its own: a missing namespace, a port in use or a permission error is
//! reported for that rule and namespace, and every other binding serves.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::netns::{NsId, NsRef, Switcher};
use crate::proxy::{Binding, BindingStats, Listener};

/// Default time connections get to finish after shutdown begins.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What became of one rule in one namespace.
#[derive(Debug, Clone)]
pub struct BindingStatus {
    pub rule: String,
    /// The namespace reference as written in the rule.
    pub netns: NsRef,
    pub state: BindingState,
    /// The live binding (counters), when it is listening.
    pub binding: Option<Arc<Binding>>,
}

/// The state of a binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingState {
    /// Listening on this local address (the real port when the rule said 0).
    Listening { local: SocketAddr },
    /// Not listening, and why.
    Failed { reason: String },
    /// The reference names a namespace the rule already listens in under
    /// another reference; it is served once.
    SameNamespaceAs { other: NsRef },
}

/// The running proxy.
pub struct Server {
    bindings: Vec<BindingStatus>,
    shutdown: watch::Sender<bool>,
    listeners: JoinSet<()>,
    switcher: Switcher,
    drain: Duration,
}

impl Server {
    /// Opens every binding of `config`; never fails as a whole (see
    /// [`Server::bindings`] for what did not work). Must run inside a tokio
    /// runtime. `drain` is how long connections may take to finish once
    /// shutdown begins.
    pub async fn start(config: &Config, switcher: Switcher, drain: Duration) -> Server {
        let (shutdown, _) = watch::channel(false);
        let mut statuses = Vec::new();
        let mut opening = JoinSet::new();
        for rule in &config.rules {
            let rule = Arc::new(rule.clone());
            let upstream_ns = match switcher.resolve(&rule.upstream_netns).await {
                Ok(id) => Some(id),
                Err(e) => {
                    error!(rule = %rule.name, upstream_netns = %rule.upstream_netns,
                        "rule cannot forward: upstream namespace: {e}");
                    None
                }
            };
            let mut seen: HashMap<NsId, NsRef> = HashMap::new();
            for netns in &rule.netns {
                let index = statuses.len();
                let mut status = BindingStatus {
                    rule: rule.name.clone(),
                    netns: netns.clone(),
                    state: BindingState::Failed {
                        reason: String::new(),
                    },
                    binding: None,
                };
                let Some(upstream_ns) = upstream_ns else {
                    status.state = BindingState::Failed {
                        reason: format!(
                            "upstream namespace \"{}\" is not available",
                            rule.upstream_netns
                        ),
                    };
                    statuses.push(status);
                    continue;
                };
                match switcher.resolve(netns).await {
                    Err(e) => {
                        error!(rule = %rule.name, netns = %netns, listen = %rule.listen, "not listening: {e}");
                        status.state = BindingState::Failed {
                            reason: e.to_string(),
                        };
                    }
                    Ok(ns) => {
                        if let Some(other) = seen.get(&ns) {
                            warn!(rule = %rule.name, netns = %netns,
                                "\"{netns}\" is the same namespace ({ns}) as \"{other}\"; listening there once");
                            status.state = BindingState::SameNamespaceAs {
                                other: other.clone(),
                            };
                        } else {
                            seen.insert(ns, netns.clone());
                            let binding = Arc::new(Binding {
                                rule: rule.clone(),
                                netns: netns.clone(),
                                ns,
                                upstream_ns,
                                switcher: switcher.clone(),
                                stats: BindingStats::default(),
                            });
                            opening.spawn(async move {
                                let listener = Listener::open(&binding).await;
                                (index, binding, listener)
                            });
                        }
                    }
                }
                statuses.push(status);
            }
        }

        let mut listeners = JoinSet::new();
        while let Some(done) = opening.join_next().await {
            let (index, binding, listener) = done.expect("opening a listener does not panic");
            let status = &mut statuses[index];
            let listener = listener.and_then(|l| {
                let local = l
                    .local_addr()
                    .map_err(|source| crate::proxy::ListenError::Socket {
                        addr: binding.rule.listen,
                        source,
                    })?;
                Ok((l, local))
            });
            match listener {
                Ok((listener, local)) => {
                    info!(rule = %binding.rule.name, protocol = %binding.rule.protocol,
                        netns = %binding.netns, listen = %local,
                        upstream = %binding.rule.upstream, upstream_netns = %binding.rule.upstream_netns,
                        "listening");
                    status.state = BindingState::Listening { local };
                    status.binding = Some(binding.clone());
                    listeners.spawn(listener.serve(binding, shutdown.subscribe(), drain));
                }
                Err(e) => {
                    error!(rule = %binding.rule.name, netns = %binding.netns, listen = %binding.rule.listen,
                        "not listening: {e}");
                    status.state = BindingState::Failed {
                        reason: e.to_string(),
                    };
                }
            }
        }
        Server {
            bindings: statuses,
            shutdown,
            listeners,
            switcher,
            drain,
        }
    }

    /// Every (rule, namespace) pair of the configuration and what became of it,
    /// in configuration order.
    pub fn bindings(&self) -> &[BindingStatus] {
        &self.bindings
    }

    /// How many bindings are listening.
    pub fn listening(&self) -> usize {
        self.bindings
            .iter()
            .filter(|b| matches!(b.state, BindingState::Listening { .. }))
            .count()
    }

    /// The switcher this server creates its sockets with.
    pub fn switcher(&self) -> &Switcher {
        &self.switcher
    }

    /// Stops accepting everywhere, lets open TCP connections finish for up
    /// to the drain timeout, then closes what is left. UDP sessions close at
    /// once: a datagram protocol has no connection for a client to finish.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        info!(
            "shutting down: no new connections; open TCP connections get up to {:?}, UDP sessions close now",
            self.drain
        );
        while self.listeners.join_next().await.is_some() {}
    }
}

/// Why [`run`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("no listener could be started ({0} binding(s) failed; see the errors above)")]
    NothingListening(usize),
}

/// Runs `config` until `shutdown` completes, then shuts down gracefully.
///
/// Fails only when not a single binding could listen: with nothing to serve
/// and no way yet to add namespaces at run time, staying up would hide the
/// problem.
pub async fn run(
    config: &Config,
    switcher: Switcher,
    drain: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let server = Server::start(config, switcher, drain).await;
    let total = server.bindings().len();
    let up = server.listening();
    if up == 0 {
        server.shutdown().await;
        return Err(RunError::NothingListening(total));
    }
    info!(
        "ready: {up} of {total} binding(s) listening across {} rule(s)",
        config.rules.len()
    );
    shutdown.await;
    server.shutdown().await;
    Ok(())
}
