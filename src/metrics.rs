//! Prometheus text exposition (format 0.0.4) of the daemon's counters,
//! labelled by rule and namespace, served on `metrics_listen` with the
//! status page, the status JSON and the health probes ([`serve`]).

mod endpoint;
mod health;

pub use endpoint::serve;
pub use health::{Health, LIVE_WAIT, Phase};

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::net::TcpListener;

use crate::control::http::Endpoint;
use crate::control::{EndpointStats, HttpStats};
use crate::status::{BindingState, Counters, Status};

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
        "nsproxy_upstream_source_failed_total",
        "counter",
        "upstream_source = \"client\": TCP connections and UDP sessions that failed because their upstream socket could not come from the client's address (a 4-tuple already in use there, an address family mismatch).",
        |c| c.upstream_source_failed,
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
/// as a 0/1 flip. `draining` is never a binding's state (a draining listener
/// has left its binding), but dashboards built on the series keep it.
const STATES: &[(&str, Option<BindingState>)] = &[
    ("listening", Some(BindingState::Listening)),
    ("waiting", Some(BindingState::Waiting)),
    ("failed", Some(BindingState::Failed)),
    ("same_namespace", Some(BindingState::SameNamespace)),
    ("draining", None),
];

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders `s` as Prometheus text.
pub fn render(s: &Status) -> String {
    let mut out = String::with_capacity(256 + s.bindings.len() * 1024);
    // A port of a range is a binding of its own: its series carry `port`
    // (a rule without a range keeps the series it always had).
    let labels = |b: &crate::status::BindingReport| {
        let port = b.port.map(|p| format!(",port=\"{p}\"")).unwrap_or_default();
        format!(
            "rule=\"{}\",netns=\"{}\",protocol=\"{}\"{port}",
            escape(&b.rule),
            escape(&b.netns),
            escape(&b.protocol)
        )
    };
    for (name, kind, help, get) in SERIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for b in &s.bindings {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(b), get(&b.counters));
        }
    }
    let _ = writeln!(
        out,
        "# HELP nsproxy_binding_state State of each rule in each namespace (1 for the current state).\n# TYPE nsproxy_binding_state gauge"
    );
    for b in &s.bindings {
        for (state, is) in STATES {
            let _ = writeln!(
                out,
                "nsproxy_binding_state{{{},state=\"{state}\"}} {}",
                labels(b),
                u8::from(*is == Some(b.state))
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
        "# HELP nsproxy_connections_cut_total Connections and associations nsproxy reset (aborted) itself: still open when their closing listener's drain timeout ran out, or their listener closed at once.\n# TYPE nsproxy_connections_cut_total counter\nnsproxy_connections_cut_total{{reason=\"drain_timeout\"}} {}\nnsproxy_connections_cut_total{{reason=\"close\"}} {}",
        s.connections_cut.at_drain_timeout, s.connections_cut.at_close
    );
    if let Some(b) = s.broker {
        let _ = writeln!(
            out,
            "# HELP nsproxy_broker_up Whether the socket broker (split mode) is alive; 0: no new socket can be made in another namespace, and nsproxy is draining to exit.\n# TYPE nsproxy_broker_up gauge\nnsproxy_broker_up {}",
            u8::from(b.alive)
        );
    }
    if let Some(bytes) = s.heap_allocated_bytes {
        let _ = writeln!(
            out,
            "# HELP nsproxy_heap_allocated_bytes Heap memory in use (allocated, not freed); unlike RSS, free memory the allocator keeps for reuse does not count.\n# TYPE nsproxy_heap_allocated_bytes gauge\nnsproxy_heap_allocated_bytes {bytes}"
        );
    }
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

/// (name, help, how to read it from an endpoint's counters)
type HttpSeries = (&'static str, &'static str, fn(&EndpointStats) -> &AtomicU64);

/// The HTTP endpoints' own counters, one series per endpoint each.
const HTTP_SERIES: &[HttpSeries] = &[
    (
        "nsproxy_http_connections_total",
        "Connections served by the control API and the metrics endpoint.",
        |e| &e.accepted,
    ),
    (
        "nsproxy_http_refused_at_cap_total",
        "Connections answered 503 and closed at once because the endpoint had its most connections open.",
        |e| &e.refused_at_cap,
    ),
    (
        "nsproxy_http_read_timeouts_total",
        "Connections closed because the request did not come within the read timeout.",
        |e| &e.read_timeouts,
    ),
    (
        "nsproxy_http_write_timeouts_total",
        "Connections reset because the client did not take the answer within the write timeout.",
        |e| &e.write_timeouts,
    ),
    (
        "nsproxy_http_refused_peer_total",
        "Connections answered 403 because the peer's user may not use the endpoint (the control API: root and the user who started nsproxy only).",
        |e| &e.refused_peer,
    ),
];

/// The HTTP endpoints' own counters.
fn render_http(out: &mut String, stats: &HttpStats) {
    for (name, help, get) in HTTP_SERIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for e in [Endpoint::Control, Endpoint::Metrics] {
            let _ = writeln!(
                out,
                "{name}{{endpoint=\"{}\"}} {}",
                e.name(),
                get(e.stats(stats)).load(Relaxed)
            );
        }
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
            connections_cut: Default::default(),
            heap_allocated_bytes: Some(4096),
            broker: None,
            bindings: vec![BindingReport {
                rule: "r".into(),
                protocol: "tcp".into(),
                netns: "/weird\"path\\x".into(),
                state: BindingState::Listening,
                parked: false,
                max_connections: None,
                reason: None,
                listen: "[::]:1".into(),
                port: None,
                local: None,
                upstream: "127.0.0.1:2".into(),
                upstream_netns: "host".into(),
                counters: Counters {
                    connections_accepted: 5,
                    ..Default::default()
                },
            }],
        };
        let mut ranged = s.bindings[0].clone();
        ranged.port = Some(10005);
        ranged.state = BindingState::Failed;
        let mut with_range = s.clone();
        with_range.bindings.push(ranged);
        let text = render(&with_range);
        assert!(
            text.contains("protocol=\"tcp\",port=\"10005\",state=\"failed\"} 1"),
            "{text}"
        );
        let text = render(&s);
        assert!(text.contains("nsproxy_connections_accepted_total{rule=\"r\",netns=\"/weird\\\"path\\\\x\",protocol=\"tcp\"} 5"), "{text}");
        assert!(text.contains("state=\"listening\"} 1"));
        assert!(text.contains("state=\"failed\"} 0"));
        assert!(text.contains("\nnsproxy_listeners_parked 0\n"));
        for (name, ..) in SERIES {
            assert_eq!(text.matches(&format!("# TYPE {name} ")).count(), 1);
        }
    }

    #[test]
    fn http_counters_are_labelled_by_endpoint() {
        let stats = HttpStats::default();
        stats.metrics.refused_at_cap.store(3, Relaxed);
        let mut out = String::new();
        render_http(&mut out, &stats);
        assert!(
            out.contains("\nnsproxy_http_refused_at_cap_total{endpoint=\"metrics\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("nsproxy_http_write_timeouts_total{endpoint=\"control\"} 0\n"),
            "{out}"
        );
    }
}
