//! Where the daemon is in its life, for the probes on the metrics listener
//! (`/healthz`, `/readyz`), and the way to the running server's commands for
//! the endpoints that read its counters.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::lifecycle::Command;

/// How long `/healthz` waits for the server's loop to answer before it
/// says the loop is stuck.
pub const LIVE_WAIT: Duration = Duration::from_secs(5);

/// A phase of the daemon's life, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The initial listeners are being opened: not ready.
    Starting,
    /// Serving: the initial listeners are up (listening, waiting or failed,
    /// as `status` tells).
    Ready,
    /// Stopping (a stop signal, or the socket broker gone): open
    /// connections drain; not ready, so that no new client is sent here.
    Draining,
}

impl Phase {
    /// The word the probes answer.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
        }
    }
}

#[derive(Clone)]
struct State {
    phase: Phase,
    /// The running server's commands, from its start on.
    commands: Option<mpsc::Sender<Command>>,
}

/// The daemon's phase and its server's commands, shared by the daemon
/// (which moves it along) and the metrics listener (which reports it).
/// The listener is served from before the server starts, so that `/readyz`
/// can say "not yet".
pub struct Health {
    state: watch::Sender<State>,
}

impl Health {
    /// Before the server exists.
    pub fn starting() -> Health {
        Health {
            state: watch::Sender::new(State {
                phase: Phase::Starting,
                commands: None,
            }),
        }
    }

    /// For a server already running (a library user serving metrics for a
    /// [`Server`](crate::lifecycle::Server) it started): ready at once.
    pub fn running(commands: mpsc::Sender<Command>) -> Health {
        let h = Health::starting();
        h.ready(commands);
        h
    }

    /// The server has started and its initial listeners are up.
    pub fn ready(&self, commands: mpsc::Sender<Command>) {
        self.state.send_modify(|s| {
            s.phase = Phase::Ready;
            s.commands = Some(commands);
        });
    }

    /// The daemon is stopping: not ready from now on (its counters are
    /// still served while the server answers).
    pub fn draining(&self) {
        self.state.send_modify(|s| s.phase = Phase::Draining);
    }

    /// Where the daemon is now.
    pub fn phase(&self) -> Phase {
        self.state.borrow().phase
    }

    /// The server's commands, waiting for its start (callers bound the wait).
    pub(crate) async fn commands(&self) -> mpsc::Sender<Command> {
        let mut rx = self.state.subscribe();
        let state = rx
            .wait_for(|s| s.commands.is_some())
            .await
            .expect("the sender lives in self");
        state.commands.clone().expect("waited for")
    }

    /// Whether the daemon is alive: while starting or draining the process
    /// answering is enough (both take as long as they need, on purpose);
    /// while serving, its server's loop must answer within [`LIVE_WAIT`].
    pub(crate) async fn live(&self) -> Result<(), String> {
        let state = self.state.borrow().clone();
        let (Phase::Ready, Some(commands)) = (state.phase, state.commands) else {
            return Ok(());
        };
        let (tx, rx) = oneshot::channel();
        let ping = async {
            commands.send(Command::Ping(tx)).await.ok()?;
            rx.await.ok()
        };
        match tokio::time::timeout(LIVE_WAIT, ping).await {
            Ok(Some(())) => Ok(()),
            Ok(None) => Err("the server has stopped".into()),
            Err(_) => Err(format!(
                "the server's loop did not answer within {LIVE_WAIT:?}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_phase_moves_and_liveness_asks_the_loop_only_while_serving() {
        let h = Health::starting();
        assert_eq!(h.phase(), Phase::Starting);
        assert_eq!(h.live().await, Ok(()));
        let (tx, mut rx) = mpsc::channel(1);
        h.ready(tx);
        assert_eq!(h.phase(), Phase::Ready);
        let answering = tokio::spawn(async move {
            if let Some(Command::Ping(reply)) = rx.recv().await {
                let _ = reply.send(());
            }
            // Then the loop is gone.
        });
        assert_eq!(h.live().await, Ok(()));
        answering.await.unwrap();
        assert_eq!(h.live().await, Err("the server has stopped".into()));
        h.draining();
        assert_eq!(h.phase(), Phase::Draining);
        assert_eq!(h.live().await, Ok(()));
        let _ = h.commands().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_loop_is_not_alive() {
        let (tx, _held) = mpsc::channel(1);
        let h = Health::running(tx);
        let why = h.live().await.unwrap_err();
        assert!(why.contains("did not answer within 5s"), "{why}");
    }
}
