//! Prometheus text exposition (format 0.0.4) of the daemon's counters,
//! labelled by rule and namespace, served on `metrics_listen`.

use std::fmt::Write as _;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::control::{Command, http};
use crate::status::{Counters, Status};

/// (name, type, help, how to read it from a binding's counters)
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Counters) -> u64,
);

const SERIES: &[Series] = &[
    (
        "nsproxy_connections_accepted_total",
        "counter",
        "TCP connections accepted.",
        |c| c.connections_accepted,
    ),
    (
        "nsproxy_connections_active",
        "gauge",
        "TCP connections open now.",
        |c| c.connections_active,
    ),
    (
        "nsproxy_connections_failed_total",
        "counter",
        "TCP connections closed because the upstream could not be reached.",
        |c| c.connect_failed,
    ),
    (
        "nsproxy_accept_errors_total",
        "counter",
        "accept(2) failures.",
        |c| c.accept_errors,
    ),
    (
        "nsproxy_accept_paused_at_cap_total",
        "counter",
        "Times a listener reached max_connections and stopped accepting until a connection closed.",
        |c| c.paused_at_cap,
    ),
    (
        "nsproxy_backlog_reset_total",
        "counter",
        "Clients reset from the listen backlog as their listener closed (beyond max_connections, or on an immediate close).",
        |c| c.backlog_reset,
    ),
    (
        "nsproxy_idle_timeouts_total",
        "counter",
        "TCP connections and SCTP associations closed (reset, aborted) by idle_timeout.",
        |c| c.idle_timeouts,
    ),
    (
        "nsproxy_half_close_timeouts_total",
        "counter",
        "Half-closed TCP connections closed (reset) by half_close_timeout.",
        |c| c.half_close_timeouts,
    ),
    (
        "nsproxy_cut_at_drain_timeout_total",
        "counter",
        "Connections and associations still open when their closing listener's drain timeout ran out, reset (aborted).",
        |c| c.cut_at_drain_timeout,
    ),
    (
        "nsproxy_cut_at_close_total",
        "counter",
        "Connections and associations reset (aborted) because their listener closed at once (on_netns_delete = \"close\").",
        |c| c.cut_at_close,
    ),
    (
        "nsproxy_client_gone_connecting_total",
        "counter",
        "Clients that reset while the upstream connect was under way; the connect was abandoned.",
        |c| c.client_gone_connecting,
    ),
    (
        "nsproxy_upstream_socket_exhausted_total",
        "counter",
        "Times an upstream socket could not be created for lack of fds or memory (the client waited, accepting paused).",
        |c| c.upstream_socket_exhausted,
    ),
    (
        "nsproxy_bytes_in_total",
        "counter",
        "Bytes from clients to the upstream.",
        |c| c.bytes_in,
    ),
    (
        "nsproxy_bytes_out_total",
        "counter",
        "Bytes from the upstream to clients.",
        |c| c.bytes_out,
    ),
    (
        "nsproxy_datagrams_in_total",
        "counter",
        "UDP datagrams from clients sent to the upstream.",
        |c| c.datagrams_in,
    ),
    (
        "nsproxy_datagrams_out_total",
        "counter",
        "UDP datagrams from the upstream sent to clients.",
        |c| c.datagrams_out,
    ),
    (
        "nsproxy_udp_sessions_created_total",
        "counter",
        "UDP sessions started.",
        |c| c.sessions_created,
    ),
    (
        "nsproxy_udp_sessions_active",
        "gauge",
        "UDP sessions open now.",
        |c| c.sessions_active,
    ),
    (
        "nsproxy_udp_sessions_expired_total",
        "counter",
        "UDP sessions ended by the idle timeout.",
        |c| c.sessions_expired,
    ),
    (
        "nsproxy_udp_sessions_failed_total",
        "counter",
        "UDP sessions whose upstream socket could not be set up.",
        |c| c.sessions_failed,
    ),
    (
        "nsproxy_udp_dropped_at_cap_total",
        "counter",
        "UDP datagrams dropped because the rule had udp_max_sessions sessions.",
        |c| c.dropped_at_cap,
    ),
    (
        "nsproxy_udp_dropped_queue_full_total",
        "counter",
        "UDP datagrams dropped because a session's queue was full.",
        |c| c.dropped_queue_full,
    ),
    (
        "nsproxy_udp_dropped_by_kernel_total",
        "counter",
        "UDP datagrams the kernel dropped because a listening socket's receive buffer was full.",
        |c| c.dropped_by_kernel,
    ),
    (
        "nsproxy_udp_truncated_total",
        "counter",
        "UDP datagrams dropped because they were larger than the buffer.",
        |c| c.truncated,
    ),
    (
        "nsproxy_udp_send_errors_total",
        "counter",
        "UDP datagrams dropped because sending failed.",
        |c| c.send_errors,
    ),
    (
        "nsproxy_udp_upstream_refused_total",
        "counter",
        "ICMP port unreachable reports from UDP upstreams.",
        |c| c.upstream_refused,
    ),
    (
        "nsproxy_udp_recv_errors_total",
        "counter",
        "Receive errors on UDP listening sockets.",
        |c| c.recv_errors,
    ),
    (
        "nsproxy_sctp_messages_in_total",
        "counter",
        "SCTP messages from clients sent to the upstream.",
        |c| c.messages_in,
    ),
    (
        "nsproxy_sctp_messages_out_total",
        "counter",
        "SCTP messages from the upstream sent to clients.",
        |c| c.messages_out,
    ),
    (
        "nsproxy_sctp_unknown_stream_total",
        "counter",
        "SCTP messages dropped because their stream does not exist on the other leg.",
        |c| c.unknown_stream,
    ),
    (
        "nsproxy_sctp_oversized_total",
        "counter",
        "SCTP messages dropped because they were too large to relay.",
        |c| c.oversized,
    ),
];

/// Listener states, one gauge series each, so that a state change is visible
/// as a 0/1 flip.
const STATES: &[&str] = &[
    "listening",
    "waiting",
    "failed",
    "same_namespace",
    "draining",
];

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders `s` as Prometheus text.
pub fn render(s: &Status) -> String {
    let mut out = String::with_capacity(256 + s.bindings.len() * 1024);
    let labels = |rule: &str, netns: &str, protocol: &str| {
        format!(
            "rule=\"{}\",netns=\"{}\",protocol=\"{}\"",
            escape(rule),
            escape(netns),
            escape(protocol)
        )
    };
    for (name, kind, help, get) in SERIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for b in &s.bindings {
            let _ = writeln!(
                out,
                "{name}{{{}}} {}",
                labels(&b.rule, &b.netns, &b.protocol),
                get(&b.counters)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP nsproxy_binding_state State of each rule in each namespace (1 for the current state).\n# TYPE nsproxy_binding_state gauge"
    );
    for b in &s.bindings {
        for state in STATES {
            let _ = writeln!(
                out,
                "nsproxy_binding_state{{{},state=\"{state}\"}} {}",
                labels(&b.rule, &b.netns, &b.protocol),
                u8::from(b.state == *state)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP nsproxy_listeners_parked Listeners idle with no task of their own (woken by their next client).\n# TYPE nsproxy_listeners_parked gauge\nnsproxy_listeners_parked {}",
        s.bindings.iter().filter(|b| b.parked).count()
    );
    let _ = writeln!(
        out,
        "# HELP nsproxy_namespaces_known Network namespaces under /run/netns.\n# TYPE nsproxy_namespaces_known gauge\nnsproxy_namespaces_known {}",
        s.namespaces_known
    );
    let _ = writeln!(
        out,
        "# HELP nsproxy_uptime_seconds Seconds since nsproxy started.\n# TYPE nsproxy_uptime_seconds gauge\nnsproxy_uptime_seconds {}",
        s.uptime_secs
    );
    out
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct MetricsError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds the metrics listener (in the home namespace).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError { addr, source })
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, commands: mpsc::Sender<Command>) {
    loop {
        let (mut conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("metrics accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let commands = commands.clone();
        tokio::spawn(async move {
            let result = async {
                let req =
                    tokio::time::timeout(http::REQUEST_TIMEOUT, http::read_request(&mut conn))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out")
                        })??;
                if req.path != "/metrics" {
                    return http::respond(
                        &mut conn,
                        404,
                        "text/plain",
                        b"only /metrics is served here\n",
                    )
                    .await;
                }
                let (tx, rx) = oneshot::channel();
                let gone = || std::io::Error::other("the daemon is shutting down");
                commands
                    .send(Command::Status(tx))
                    .await
                    .map_err(|_| gone())?;
                let status = rx.await.map_err(|_| gone())?;
                http::respond(
                    &mut conn,
                    200,
                    "text/plain; version=0.0.4",
                    render(&status).as_bytes(),
                )
                .await
            }
            .await;
            if let Err(e) = result {
                debug!("metrics request failed: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::BindingReport;

    #[test]
    fn labels_are_escaped_and_every_series_has_help() {
        let s = Status {
            version: "0".into(),
            pid: 1,
            uptime_secs: 2,
            workers: 1,
            config: None,
            namespaces_known: 3,
            bindings: vec![BindingReport {
                rule: "r".into(),
                protocol: "tcp".into(),
                netns: "/weird\"path\\x".into(),
                state: "listening".into(),
                parked: false,
                max_connections: None,
                reason: None,
                listen: "[::]:1".into(),
                local: None,
                upstream: "127.0.0.1:2".into(),
                upstream_netns: "host".into(),
                counters: Counters {
                    connections_accepted: 5,
                    ..Default::default()
                },
            }],
        };
        let text = render(&s);
        assert!(text.contains("nsproxy_connections_accepted_total{rule=\"r\",netns=\"/weird\\\"path\\\\x\",protocol=\"tcp\"} 5"), "{text}");
        assert!(text.contains("state=\"listening\"} 1"));
        assert!(text.contains("state=\"failed\"} 0"));
        assert!(text.contains("\nnsproxy_listeners_parked 0\n"));
        for (name, ..) in SERIES {
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1);
        }
    }
}
