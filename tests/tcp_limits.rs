//! TCP limits and cuts end to end: idle and half-close timeouts, keepalive,
//! resets when nsproxy itself ends a connection, running out of fds, and
//! upstream connects that cannot or need not finish.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;

fn rule(name: &str, netns: &[&str], upstream: &str, upstream_netns: &str, extra: &str) -> String {
    rule_of(
        "tcp",
        name,
        "127.0.0.1:7000",
        netns,
        upstream,
        upstream_netns,
        extra,
    )
}

/// Reads until the stream ends; the error kind it ended with (`None`: a
/// clean EOF), within a generous bound.
fn end_of(c: &mut std::net::TcpStream) -> Option<ErrorKind> {
    c.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                panic!("the connection was not ended within {WAIT:?}")
            }
            Err(e) => return Some(e.kind()),
        }
    }
}

/// Sends `msg` through an echo and checks it comes back.
fn echo(c: &mut std::net::TcpStream, msg: &[u8]) {
    c.write_all(msg).unwrap();
    let mut back = vec![0; msg.len()];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

/// An upstream that accepts and then holds each connection, never writing
/// or closing; the server side of each is sent back for inspection.
fn holding_server(l: std::net::TcpListener) -> std::sync::mpsc::Receiver<std::net::TcpStream> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { return };
            if tx.send(c).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn idle_timeout_resets_both_legs_and_is_counted() {
    as_root(|| {
        let (host, a) = (TestNs::new("h"), TestNs::new("a"));
        let held = holding_server(host.tcp_listen("127.0.0.1:9000"));
        let d = Daemon::run(
            &host,
            &config(&rule(
                "idle",
                &[a.name()],
                "127.0.0.1:9000",
                "host",
                "idle_timeout = \"1s\"",
            )),
            &[],
        );
        d.wait_ready();
        let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
        c.write_all(b"hello").unwrap();
        let mut server = held.recv_timeout(WAIT).unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).unwrap();
        // Then nothing moves: both legs are reset, not closed cleanly.
        let started = Instant::now();
        assert_eq!(end_of(&mut c), Some(ErrorKind::ConnectionReset));
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert_eq!(end_of(&mut server), Some(ErrorKind::ConnectionReset));
        let log = d.wait_log("idle for 1s (idle_timeout)");
        let line = log.lines().find(|l| l.contains("idle_timeout")).unwrap();
        assert!(line.contains("\"bytes_from_client\":5"), "{line}");
        assert_eq!(d.counters("idle", a.name())["idle_timeouts"], 1);
    })
}

#[test]
fn half_close_timeout_ends_a_connection_left_half_open() {
    as_root(|| {
        let (host, a) = (TestNs::new("h"), TestNs::new("a"));
        let held = holding_server(host.tcp_listen("127.0.0.1:9000"));
        let d = Daemon::run(
            &host,
            &config(&rule(
                "hc",
                &[a.name()],
                "127.0.0.1:9000",
                "host",
                "half_close_timeout = \"1s\"",
            )),
            &[],
        );
        d.wait_ready();
        let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
        c.write_all(b"request").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        // The upstream gets the request and the FIN, and then never answers
        // nor closes: the connection would stay half-open for ever.
        let mut server = held.recv_timeout(WAIT).unwrap();
        let mut got = Vec::new();
        server.set_read_timeout(Some(WAIT)).unwrap();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"request");
        assert_eq!(end_of(&mut c), Some(ErrorKind::ConnectionReset));
        let log = d.wait_log("half_close_timeout");
        assert!(log.contains("half-closed and silent for 1s"), "{log}");
        let n = d.counters("hc", a.name());
        assert_eq!(
            (
                n["half_close_timeouts"].as_u64(),
                n["idle_timeouts"].as_u64()
            ),
            (Some(1), Some(0))
        );
    })
}

/// The daemon's TCP sockets (copied into this process with pidfd_getfd),
/// each with its local and peer address.
fn daemon_tcp_sockets(pid: u32) -> Vec<(OwnedFd, std::net::SocketAddr, std::net::SocketAddr)> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) } as i32;
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd, owned here only.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(n) = e.file_name().to_string_lossy().parse::<libc::c_int>() else {
            continue;
        };
        // SAFETY: copies fd `n` of the process; a new fd or -1.
        let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), n, 0) } as i32;
        if copy < 0 {
            continue;
        }
        // SAFETY: a fresh fd, owned here only.
        let fd = unsafe { OwnedFd::from_raw_fd(copy) };
        let s = socket2::SockRef::from(&fd);
        let (Ok(local), Ok(peer)) = (s.local_addr(), s.peer_addr()) else {
            continue;
        };
        if let (Some(l), Some(p)) = (local.as_socket(), peer.as_socket()) {
            out.push((fd, l, p));
        }
    }
    out
}

#[test]
fn keepalive_is_set_on_both_legs() {
    as_root(|| {
        let (host, a) = (TestNs::new("h"), TestNs::new("a"));
        echo_server(host.tcp_listen("127.0.0.1:9000"));
        let d = Daemon::run(
            &host,
            &config(&format!(
                "{}{}",
                rule(
                    "ka",
                    &[a.name()],
                    "127.0.0.1:9000",
                    "host",
                    "tcp_keepalive = { idle = \"42s\", interval = \"7s\", count = 3 }",
                ),
                rule_of(
                    "tcp",
                    "noka",
                    "127.0.0.1:7001",
                    &[a.name()],
                    "127.0.0.1:9000",
                    "host",
                    "tcp_keepalive = false",
                )
            )),
            &[],
        );
        d.wait_ready();
        let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
        echo(&mut c, b"ping");
        let mut plain = a.tcp_connect("127.0.0.1:7001").unwrap();
        echo(&mut plain, b"ping");
        // The client leg has its listener's keepalive from the start; the
        // upstream leg gets its own once the connection has lived a second
        // (short connections never pay for the syscalls).
        let legs = || {
            let (mut client_legs, mut upstream_legs) = (0, 0);
            for (fd, local, peer) in daemon_tcp_sockets(d.pid()) {
                let s = socket2::SockRef::from(&fd);
                let on = s.keepalive().unwrap();
                match (local.port(), peer.port()) {
                    (7000, _) => client_legs += 1,
                    (7001, _) => {
                        assert!(!on, "tcp_keepalive = false, yet keepalive on {local}");
                        continue;
                    }
                    (_, 9000) if on => upstream_legs += 1,
                    (_, 9000) => continue, // the other rule's, or not set yet
                    _ => continue,
                }
                assert!(on, "no keepalive on {local} -> {peer}");
                assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(42));
                assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(7));
                assert_eq!(s.tcp_keepalive_retries().unwrap(), 3);
            }
            (client_legs, upstream_legs)
        };
        d.wait_until("keepalive on both legs of the connection", || {
            legs() == (1, 1)
        });
    })
}

#[test]
fn shutdown_resets_what_outlives_the_drain_and_logs_it() {
    as_root(|| {
        let (host, a) = (TestNs::new("h"), TestNs::new("a"));
        echo_server(host.tcp_listen("127.0.0.1:9000"));
        let d = Daemon::run(
            &host,
            &config(&rule("cut", &[a.name()], "127.0.0.1:9000", "host", "")),
            &["--drain-timeout", "500ms"],
        );
        d.wait_ready();
        let mut conns: Vec<_> = (0..3)
            .map(|_| a.tcp_connect("127.0.0.1:7000").unwrap())
            .collect();
        for c in &mut conns {
            echo(c, b"partial");
        }
        d.signal("TERM");
        // Cut mid-exchange: a reset, never a clean end of stream.
        for c in &mut conns {
            assert_eq!(end_of(c), Some(ErrorKind::ConnectionReset));
        }
        let (status, log) = d.wait_exit();
        assert!(status.success(), "{log}");
        let cuts: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains(
                    "connection cut: still open when its closing listener's drain timeout ran out",
                )
            })
            .collect();
        assert_eq!(cuts.len(), 3, "{log}");
        for l in cuts {
            assert!(
                l.contains("\"bytes_from_client\":7") && l.contains("\"bytes_to_client\":7"),
                "{l}"
            );
        }
    })
}

#[test]
fn a_deleted_namespace_in_close_mode_resets_its_connections() {
    as_root(|| {
        let (host, a) = (TestNs::new("h"), TestNs::new("del"));
        echo_server(host.tcp_listen("127.0.0.1:9000"));
        let d = Daemon::run(
            &host,
            &config(&rule(
                "gone",
                &[a.name()],
                "127.0.0.1:9000",
                "host",
                "on_netns_delete = \"close\"",
            )),
            &[],
        );
        d.wait_ready();
        let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
        echo(&mut c, b"0123456789");
        // The client's socket keeps the namespace itself alive; its name goes.
        drop(a);
        assert_eq!(end_of(&mut c), Some(ErrorKind::ConnectionReset));
        let log = d.wait_log("connection cut: its listener closed at once");
        assert!(log.contains("\"bytes_to_client\":10"), "{log}");
        // Counted where it can be seen: the binding itself has left the status.
        let (code, out, err) = d.cli(&["status", "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["connections_cut"]["at_close"], 1, "{out}");
        assert_eq!(v["connections_cut"]["at_drain_timeout"], 0, "{out}");
    })
}

#[test]
fn out_of_fds_with_the_upstream_at_home_clients_wait_instead_of_reset() {
    as_root(|| {
        let (host, a) = (TestNs::new("h"), TestNs::new("a"));
        // The upstream answers after a pause, so that connections pile up.
        serve(host.tcp_listen("127.0.0.1:9000"), |mut c| {
            let mut buf = [0u8; 4];
            if c.read_exact(&mut buf).is_ok() {
                std::thread::sleep(Duration::from_millis(100));
                let _ = c.write_all(&buf);
            }
        });
        let dir = TempDir::new();
        // The upstream is in nsproxy's own namespace: its sockets are made on
        // the spot, not taken from a pool made ahead.
        let cfg = dir.file(
            "fd.toml",
            &config(&rule(
                "fd",
                &[a.name()],
                "127.0.0.1:9000",
                "host",
                "connect_timeout = \"10s\"",
            )),
        );
        let d = Daemon::wrapped(
            &host,
            &["prlimit", "--nofile=40:40", "--"],
            &["run", "--config", cfg.to_str().unwrap()],
        );
        d.wait_ready();
        // 60 clients at once, far more than 40 fds can serve.
        let clients: Vec<_> = (0..60)
            .map(|i| {
                let c = a.tcp_connect("127.0.0.1:7000");
                std::thread::spawn(move || -> Result<(), String> {
                    let mut c = c.map_err(|e| format!("connect: {e}"))?;
                    c.set_read_timeout(Some(WAIT)).unwrap();
                    let msg = format!("{i:04}");
                    c.write_all(msg.as_bytes())
                        .map_err(|e| format!("write: {e}"))?;
                    let mut back = [0u8; 4];
                    c.read_exact(&mut back)
                        .map_err(|e| format!("client {i}: {e}"))?;
                    assert_eq!(&back, msg.as_bytes());
                    Ok(())
                })
            })
            .collect();
        let failed: Vec<String> = clients
            .into_iter()
            .filter_map(|t| t.join().unwrap().err())
            .collect();
        assert!(failed.is_empty(), "{failed:?}\n{}", d.log());
        let n = d.counters("fd", a.name());
        assert_eq!(n["connect_failed"], 0, "{n}");
        let log = d.log();
        let warnings = log
            .lines()
            .filter(|l| l.contains("\"WARN\"") || l.contains("\"level\":\"WARN\""))
            .count();
        // Rate-limited: a line per kind per 10 s, not one per client.
        assert!(warnings <= 4, "{warnings} warnings:\n{log}");
    })
}

/// Runs `ip -n NS ARGS`.
fn ip_in(ns: &TestNs, args: &[&str]) {
    let st = std::process::Command::new("ip")
        .args(["-n", ns.name()])
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "ip -n {} {args:?}", ns.name());
}

#[test]
fn blackhole_and_prohibit_routes_are_explained() {
    as_root(|| {
        let (host, a, up) = (TestNs::new("h"), TestNs::new("a"), TestNs::new("up"));
        ip_in(&up, &["route", "add", "blackhole", "10.99.0.0/16"]);
        ip_in(&up, &["route", "add", "prohibit", "10.98.0.0/16"]);
        let d = Daemon::run(
            &host,
            &config(&format!(
                "{}{}",
                rule("bh", &[a.name()], "10.99.0.1:9000", up.name(), ""),
                rule_of(
                    "tcp",
                    "pr",
                    "127.0.0.1:7001",
                    &[a.name()],
                    "10.98.0.1:9000",
                    up.name(),
                    ""
                )
            )),
            &[],
        );
        d.wait_ready();
        for port in [7000, 7001] {
            if let Ok(mut c) = a.tcp_connect(&format!("127.0.0.1:{port}")) {
                assert_eq!(end_of(&mut c), Some(ErrorKind::ConnectionReset));
            }
        }
        let log = d.wait_log_count("upstream connect failed", 2);
        assert!(
            log.contains(
                "no route: the upstream namespace's routing table blackholes the upstream address"
            ),
            "{log}"
        );
        assert!(
            log.contains("prohibited by a route or firewall rule in the upstream namespace"),
            "{log}"
        );
    })
}

#[test]
fn a_connect_is_abandoned_when_its_client_resets() {
    as_root(|| {
        let (host, a, up) = (TestNs::new("h"), TestNs::new("a"), TestNs::new("up"));
        // An upstream whose accept queue is full (backlog 0, one connection
        // queued and never accepted): the kernel drops further SYNs, so a
        // connect to it hangs.
        let full = up.tcp_listen("127.0.0.1:9000");
        socket2::SockRef::from(&full).listen(0).unwrap();
        let _queued = up.tcp_connect("127.0.0.1:9000").unwrap();
        let d = Daemon::run(
            &host,
            &config(&rule(
                "slow",
                &[a.name()],
                "127.0.0.1:9000",
                up.name(),
                "connect_timeout = \"30s\"",
            )),
            &[],
        );
        d.wait_ready();
        let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
        // Data first does not matter: the reset does.
        c.write_all(b"early bytes").unwrap();
        d.wait_until("the binding accepted the client", || {
            d.counters("slow", a.name())["connections_accepted"] == 1
        });
        // The client gives up with a reset.
        socket2::SockRef::from(&c)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(c);
        let started = Instant::now();
        d.wait_log("while the upstream connect was under way");
        assert!(started.elapsed() < Duration::from_secs(20));
        let n = d.counters("slow", a.name());
        assert_eq!(
            (
                n["client_gone_connecting"].as_u64(),
                n["connect_failed"].as_u64()
            ),
            (Some(1), Some(0))
        );
        assert_eq!(n["connections_active"], 0);
    })
}

#[test]
fn a_reload_applies_new_timeouts_to_open_connections_in_place() {
    as_root(|| {
        let (host, a) = (TestNs::new("h"), TestNs::new("a"));
        echo_server(host.tcp_listen("127.0.0.1:9000"));
        let rule = |extra: &str| rule("tuned", &[a.name()], "127.0.0.1:9000", "host", extra);
        let d = Daemon::run(&host, &config(&rule("idle_timeout = \"1h\"")), &[]);
        d.wait_ready();
        let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
        echo(&mut c, b"one");
        let sockets_before = d.socket_inodes();
        std::fs::write(
            d.config_path(),
            config(&rule("idle_timeout = \"1s\"\ntcp_keepalive = false")),
        )
        .unwrap();
        let (code, out, err) = d.cli(&["reload"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out,
            "reloaded: 0 added, 0 removed, 0 replaced, 1 updated in place, 0 unchanged\n"
        );
        // The open connection takes the new limit without being reopened.
        assert_eq!(end_of(&mut c), Some(ErrorKind::ConnectionReset));
        assert_eq!(d.counters("tuned", a.name())["idle_timeouts"], 1);
        let log = d.log();
        assert!(
            log.contains(
                "idle_timeout 1s, half_close_timeout 60s and tcp_keepalive off applied in place"
            ),
            "{log}"
        );
        // The listener is the one from before.
        let listener_kept = d.socket_inodes().iter().any(|s| sockets_before.contains(s));
        assert!(listener_kept);
        let mut again = a.tcp_connect("127.0.0.1:7000").unwrap();
        echo(&mut again, b"two");
    })
}

/// The client leg's options come from its listener, set when it opened;
/// after a reload changes `tcp_keepalive` in place (the listener kept),
/// new connections still get the new setting on both legs, and with it
/// turned off, none.
#[test]
fn a_reload_changes_the_keepalive_of_new_connections_on_both_legs() {
    as_root(|| {
        let (host, a) = (TestNs::new("h"), TestNs::new("a"));
        echo_server(host.tcp_listen("127.0.0.1:9000"));
        let rule = |extra: &str| rule("ka2", &[a.name()], "127.0.0.1:9000", "host", extra);
        let ka = |idle: u64| {
            format!("tcp_keepalive = {{ idle = \"{idle}s\", interval = \"7s\", count = 3 }}")
        };
        let d = Daemon::run(&host, &config(&rule(&ka(42))), &[]);
        d.wait_ready();
        // What the daemon's connected legs have: (keepalive idle or None) per leg.
        let legs = |d: &Daemon| {
            let mut out = Vec::new();
            for (fd, local, peer) in daemon_tcp_sockets(d.pid()) {
                if local.port() != 7000 && peer.port() != 9000 {
                    continue;
                }
                let s = socket2::SockRef::from(&fd);
                let idle = s
                    .keepalive()
                    .unwrap()
                    .then(|| s.tcp_keepalive_time().unwrap().as_secs());
                out.push((local.port() == 7000, idle));
            }
            out.sort();
            out
        };
        let mut first = a.tcp_connect("127.0.0.1:7000").unwrap();
        echo(&mut first, b"one");
        // Keepalive that is not the listener's is set once a connection has
        // lived a second: polled for.
        d.wait_until("keepalive 42s on both legs", || {
            legs(&d) == [(false, Some(42)), (true, Some(42))]
        });
        drop(first);
        for (extra, want) in [(ka(50), Some(50)), ("tcp_keepalive = false".into(), None)] {
            std::fs::write(d.config_path(), config(&rule(&extra))).unwrap();
            let (code, _, err) = d.cli(&["reload"]);
            assert_eq!(code, 0, "{err}");
            let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
            echo(&mut c, b"two");
            // The earlier connection is gone once only the new one's legs
            // remain, with the new setting.
            d.wait_until(&format!("both legs as {extra} says"), || {
                legs(&d) == [(false, want), (true, want)]
            });
            drop(c);
        }
    })
}
