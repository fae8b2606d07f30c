//! What the daemon reports about itself: the model behind `nsproxy status`,
//! the control API's JSON and the Prometheus metrics.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use serde::{Deserialize, Serialize};

use crate::proxy::{BindingStats, ConnStats, UdpStats};

/// A snapshot of the whole daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub uptime_secs: u64,
    /// Forwarding threads.
    pub workers: usize,
    /// The config file, when the daemon runs from one (`reload` re-reads it).
    pub config: Option<String>,
    /// Names under /run/netns that are network namespaces right now.
    pub namespaces_known: usize,
    /// Connections and associations nsproxy reset (aborted) itself since it
    /// started, process-wide (their bindings are gone by then).
    #[serde(default)]
    pub connections_cut: Cuts,
    /// Heap memory in use (allocated and not freed), in bytes; absent
    /// where the C library cannot tell. RSS also counts free memory the
    /// allocator keeps for reuse; this does not, so a leak shows here.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub heap_allocated_bytes: Option<u64>,
    /// The socket broker, when nsproxy runs split (started as root); absent
    /// when it runs as one process.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub broker: Option<BrokerReport>,
    /// Every rule × namespace, in configuration order.
    pub bindings: Vec<BindingReport>,
}

/// The socket broker of a split nsproxy.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrokerReport {
    pub pid: u32,
    /// False once it is gone: no new socket can be made in another
    /// namespace, and nsproxy is draining to exit non-zero.
    pub alive: bool,
}

/// Connections and associations nsproxy cut, by why.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cuts {
    /// Still open when their closing listener's drain timeout ran out
    /// (shutdown, reload, a namespace deleted in drain mode).
    pub at_drain_timeout: u64,
    /// Their listener closed at once (`on_netns_delete = "close"`, or the
    /// server stopped at once).
    pub at_close: u64,
}

/// One rule in one namespace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BindingReport {
    pub rule: String,
    pub protocol: String,
    /// The namespace reference (a name matched by a glob appears as that name).
    pub netns: String,
    /// `listening`, `waiting` (for the namespace to exist), `failed` or
    /// `same_namespace` (served under another reference).
    pub state: BindingState,
    /// Why it is not listening, for `waiting`, `failed` and `same_namespace`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reason: Option<String>,
    /// The configured listen address (for a port range, this binding's
    /// port of it).
    pub listen: String,
    /// For a rule with a port range, which of its listen ports this binding
    /// is; each port listens and fails on its own.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub port: Option<u16>,
    /// The bound address (the real port when `listen` said 0).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub local: Option<String>,
    pub upstream: String,
    pub upstream_netns: String,
    pub counters: Counters,
    /// Listening but idle, with no task of its own until the next client.
    #[serde(default)]
    pub parked: bool,
    /// The rule's `max_connections`, when it has one (TCP, SCTP).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub max_connections: Option<usize>,
}

/// Where a binding is, as `status` reports it (the JSON names are the
/// snake_case ones: `listening`, `waiting`, `failed`, `same_namespace`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BindingState {
    /// Its listener exists (served by a task, or parked while idle).
    Listening,
    /// For its namespace, its upstream namespace or its address to exist,
    /// or for its listener to be opened again.
    Waiting,
    /// Could not listen; tried again at the next reload.
    Failed,
    /// Its namespace is the one another reference of the rule names, and
    /// is served there.
    SameNamespace,
}

impl BindingState {
    /// The name in `status --json`, the table and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            BindingState::Listening => "listening",
            BindingState::Waiting => "waiting",
            BindingState::Failed => "failed",
            BindingState::SameNamespace => "same_namespace",
        }
    }
}

impl std::fmt::Display for BindingState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// For callers holding a state's JSON name (scripts' habits, tests).
impl PartialEq<&str> for BindingState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A binding's counters, flat whatever its protocol: those of other
/// protocols read 0 (see [`BindingStats`] and its parts for what each
/// means).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub connect_failed: u64,
    pub accept_errors: u64,
    #[serde(default)]
    pub paused_at_cap: u64,
    #[serde(default)]
    pub backlog_reset: u64,
    #[serde(default)]
    pub idle_timeouts: u64,
    #[serde(default)]
    pub half_close_timeouts: u64,
    #[serde(default)]
    pub client_gone_connecting: u64,
    #[serde(default)]
    pub upstream_socket_exhausted: u64,
    #[serde(default)]
    pub upstream_source_failed: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub sessions_created: u64,
    pub sessions_active: u64,
    pub sessions_expired: u64,
    pub sessions_failed: u64,
    pub dropped_at_cap: u64,
    pub dropped_queue_full: u64,
    pub dropped_by_kernel: u64,
    pub truncated: u64,
    pub send_errors: u64,
    pub upstream_refused: u64,
    pub recv_errors: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub unknown_stream: u64,
    pub oversized: u64,
}

impl Counters {
    /// Reads every counter of `s`; those of other protocols are 0.
    pub fn from_stats(s: &BindingStats) -> Counters {
        match s {
            BindingStats::Tcp(t) => Counters {
                half_close_timeouts: t.half_close_timeouts.load(Relaxed),
                upstream_source_failed: t.upstream_source_failed.load(Relaxed),
                ..Counters::from_conn(&t.conn)
            },
            BindingStats::Sctp(s) => Counters {
                messages_in: s.messages_in.load(Relaxed),
                messages_out: s.messages_out.load(Relaxed),
                unknown_stream: s.unknown_stream.load(Relaxed),
                oversized: s.oversized.load(Relaxed),
                ..Counters::from_conn(&s.conn)
            },
            BindingStats::Udp(u) => Counters::from_udp(u),
        }
    }

    fn from_conn(s: &ConnStats) -> Counters {
        Counters {
            connections_accepted: s.accepted.load(Relaxed),
            connections_active: s.active.load(Relaxed),
            connect_failed: s.connect_failed.load(Relaxed),
            accept_errors: s.accept_errors.load(Relaxed),
            paused_at_cap: s.paused_at_cap.load(Relaxed),
            backlog_reset: s.backlog_reset.load(Relaxed),
            idle_timeouts: s.idle_timeouts.load(Relaxed),
            client_gone_connecting: s.client_gone_connecting.load(Relaxed),
            upstream_socket_exhausted: s.upstream_socket_exhausted.load(Relaxed),
            bytes_in: s.bytes_in.load(Relaxed),
            bytes_out: s.bytes_out.load(Relaxed),
            ..Counters::default()
        }
    }

    fn from_udp(s: &UdpStats) -> Counters {
        Counters {
            bytes_in: s.bytes_in.load(Relaxed),
            bytes_out: s.bytes_out.load(Relaxed),
            datagrams_in: s.datagrams_in.load(Relaxed),
            datagrams_out: s.datagrams_out.load(Relaxed),
            sessions_created: s.sessions_created.load(Relaxed),
            sessions_active: s.sessions_active.load(Relaxed),
            sessions_expired: s.sessions_expired.load(Relaxed),
            sessions_failed: s.sessions_failed.load(Relaxed),
            upstream_source_failed: s.upstream_source_failed.load(Relaxed),
            dropped_at_cap: s.dropped_at_cap.load(Relaxed),
            dropped_queue_full: s.dropped_queue_full.load(Relaxed),
            dropped_by_kernel: s.dropped_by_kernel.load(Relaxed),
            truncated: s.truncated.load(Relaxed),
            send_errors: s.send_errors.load(Relaxed),
            upstream_refused: s.upstream_refused.load(Relaxed),
            recv_errors: s.recv_errors.load(Relaxed),
            ..Counters::default()
        }
    }
}

/// What a reload changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// Bindings opened because a rule or namespace is new.
    pub added: usize,
    /// Bindings closed because their rule or namespace is gone.
    pub removed: usize,
    /// Bindings whose rule changed: closed and opened again.
    pub replaced: usize,
    /// Bindings whose `max_connections` or `proxy_protocol` changed,
    /// applied in place: sockets and connections untouched.
    #[serde(default)]
    pub retuned: usize,
    /// Bindings left alone, their sockets and connections untouched.
    pub unchanged: usize,
    /// Bindings that were not listening (failed, or waiting for their
    /// namespace or address) and that the reload opened.
    #[serde(default)]
    pub reopened: usize,
}

/// `nsproxy status` as a readable table.
pub fn table(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "nsproxy {} (pid {}), up {}s, {} worker(s), {} namespace(s) in /run/netns{}",
        s.version,
        s.pid,
        s.uptime_secs,
        s.workers,
        s.namespaces_known,
        s.config
            .as_ref()
            .map(|c| format!(", config {c}"))
            .unwrap_or_default()
    );
    match s.broker {
        Some(BrokerReport { pid, alive: true }) => {
            let _ = writeln!(out, "split: socket broker pid {pid}");
        }
        Some(BrokerReport { pid, alive: false }) => {
            let _ = writeln!(
                out,
                "split: the socket broker (pid {pid}) is GONE: no new socket can be made; nsproxy is draining to exit"
            );
        }
        None => {}
    }
    let head = [
        "RULE",
        "PROTO",
        "NETNS",
        "STATE",
        "LOCAL",
        "UPSTREAM",
        "ACTIVE",
        "TOTAL",
        "BYTES IN",
        "BYTES OUT",
    ];
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|h| h.to_string()).collect()];
    for b in &s.bindings {
        let c = &b.counters;
        let (active, total) = if b.protocol == "udp" {
            (c.sessions_active.to_string(), c.sessions_created)
        } else {
            // Shown against the cap, if any: "2/2" says why clients wait.
            let cap = b.max_connections.map(|n| format!("/{n}"));
            (
                format!("{}{}", c.connections_active, cap.unwrap_or_default()),
                c.connections_accepted,
            )
        };
        let state = match &b.reason {
            Some(r) => format!("{}: {r}", b.state),
            None => b.state.to_string(),
        };
        rows.push(vec![
            // One row per port of a range: the port says which failed.
            match b.port {
                Some(p) => format!("{}[{p}]", b.rule),
                None => b.rule.clone(),
            },
            b.protocol.clone(),
            b.netns.clone(),
            state,
            b.local.clone().unwrap_or_else(|| "-".into()),
            format!("{}@{}", b.upstream, b.upstream_netns),
            active,
            total.to_string(),
            c.bytes_in.to_string(),
            c.bytes_out.to_string(),
        ]);
    }
    // The state column may carry a long reason: keep it last-but-wide by
    // padding only the columns before it.
    let widths: Vec<usize> = (0..head.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i == 3 {
                    // state with reason: not padded past 40 characters
                    format!("{cell:<w$}", w = widths[i].min(40))
                } else {
                    format!("{cell:<w$}", w = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering::Relaxed;

    use super::Counters;
    use crate::config::Protocol;
    use crate::proxy::BindingStats;

    /// Each protocol's counters land in their flat fields, and the fields
    /// of other protocols read 0, as `status --json` always showed them.
    #[test]
    fn counters_are_flat_whatever_the_protocol() {
        let tcp = BindingStats::new(Protocol::Tcp);
        tcp.tcp().conn.accepted.store(2, Relaxed);
        tcp.tcp().conn.bytes_out.store(3, Relaxed);
        tcp.tcp().half_close_timeouts.store(4, Relaxed);
        assert_eq!(
            Counters::from_stats(&tcp),
            Counters {
                connections_accepted: 2,
                bytes_out: 3,
                half_close_timeouts: 4,
                ..Counters::default()
            }
        );

        let udp = BindingStats::new(Protocol::Udp);
        udp.udp().sessions_active.store(5, Relaxed);
        udp.udp().bytes_in.store(6, Relaxed);
        udp.udp().dropped_by_kernel.store(7, Relaxed);
        assert_eq!(
            Counters::from_stats(&udp),
            Counters {
                sessions_active: 5,
                bytes_in: 6,
                dropped_by_kernel: 7,
                ..Counters::default()
            }
        );

        let sctp = BindingStats::new(Protocol::Sctp);
        sctp.sctp().conn.idle_timeouts.store(8, Relaxed);
        sctp.sctp().messages_out.store(9, Relaxed);
        sctp.sctp().oversized.store(10, Relaxed);
        assert_eq!(
            Counters::from_stats(&sctp),
            Counters {
                idle_timeouts: 8,
                messages_out: 9,
                oversized: 10,
                ..Counters::default()
            }
        );
    }

    #[test]
    #[should_panic(expected = "a UDP binding has no connection counters")]
    fn a_udp_binding_has_no_connection_counters() {
        BindingStats::new(Protocol::Udp).conn();
    }
}
