//! UDP end to end: the nsproxy binary as its own process (and, once, the
//! library in this process), real namespaces, real sockets.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;

/// main + 2 workers + the namespace thread.
const THREADS: usize = 4;

/// The rule most tests use: `127.0.0.1:7000` in `a` to `127.0.0.1:9000` in `b`.
fn a_to_b(name: &str) -> Rule {
    udp(name)
        .listen("127.0.0.1:7000")
        .netns(["a"])
        .upstream_in("b", "127.0.0.1:9000")
}

#[test]
fn every_namespace_reference_and_address_family() {
    as_root(|| {
        let s = Scenario::with(&["n", "p", "pid", "up"]);
        let resident = s.ns("pid").process();
        let pid_ref = format!("pid:{}", resident.pid());
        let path_ref = format!("/run/netns/{}", s.ns("p").name());
        let up_path = format!("/run/netns/{}", s.ns("up").name());
        let s = s
            .udp_echo("up", "127.0.0.1:9000")
            .udp_echo("up", "[::1]:9001")
            .udp_echo("host", "127.0.0.1:9002")
            .rule(
                udp("dual")
                    .listen("[::]:8000")
                    .netns(["host", "n", path_ref.as_str(), pid_ref.as_str()])
                    .upstream_in("up", "127.0.0.1:9000"),
            )
            .rule(
                udp("v4-to-v6")
                    .listen("127.0.0.1:8001")
                    .netns(["n"])
                    .upstream_in(&up_path, "[::1]:9001"),
            )
            .rule(
                udp("v6-to-host")
                    .listen("[::1]:8002")
                    .netns(["n"])
                    .upstream_in("host", "127.0.0.1:9002"),
            )
            .start();
        let log = s.ready_log();
        assert!(log.contains("ready: 6 of 6 binding(s)"), "{log}");
        let mut n = 0;
        for ns in [s.host(), s.ns("n"), s.ns("p"), s.ns("pid")] {
            for to in ["127.0.0.1:8000", "[::1]:8000"] {
                let c = ns.udp_client(to);
                let msg = format!("to {to} from {}", ns.name());
                let back = udp_round_trip(&c, msg.as_bytes())
                    .unwrap_or_else(|e| panic!("{to} in {}: {e}", ns.name()));
                assert_eq!(back, msg.as_bytes());
                n += 1;
            }
        }
        for to in ["127.0.0.1:8001", "[::1]:8002"] {
            let c = s.ns("n").udp_client(to);
            assert_eq!(udp_round_trip(&c, b"x").unwrap(), b"x", "{to}");
            n += 1;
        }
        assert_eq!(n, 10);
        let log = s.stop();
        // Each session logs what it moved when it ends (here: at shutdown),
        // and IPv4 clients of the dual-stack listener show as plain IPv4.
        assert_eq!(log.matches("session closed").count(), 10, "{log}");
        assert!(log.contains("\"peer\":\"127.0.0.1:"), "{log}");
        assert!(log.contains("\"peer\":\"[::1]:"), "{log}");
        assert!(!log.contains("::ffff:"), "{log}");
        assert!(log.contains("\"protocol\":\"udp\""), "{log}");
    })
}

#[test]
fn forward_command_line_form() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"]).udp_echo("b", "[::1]:9000");
        let spec = format!(
            "udp:[::]:7000@{},host=[::1]:9000@{}",
            s.ns("a").name(),
            s.ns("b").name()
        );
        let s = s.start_command(&["forward", "--workers", "1", &spec]);
        for ns in [s.ns("a"), s.host()] {
            for to in ["127.0.0.1:7000", "[::1]:7000"] {
                let c = ns.udp_client(to);
                assert_eq!(udp_round_trip(&c, b"via cli").unwrap(), b"via cli");
            }
        }
        assert_eq!(s.threads(), 3);
    })
}

#[test]
fn two_hundred_clients_each_get_only_their_own_replies() {
    as_root(|| {
        const CLIENTS: usize = 200;
        const EACH: usize = 100;
        let s = Scenario::with(&["c", "s"]);
        let echo = s.ns("s").udp_bind("127.0.0.1:9000");
        echo.set_read_timeout(None).unwrap();
        udp_echo_server(echo);
        let s = s
            .rule(
                udp("many")
                    .listen("127.0.0.1:7000")
                    .netns(["c"])
                    .upstream_in("s", "127.0.0.1:9000"),
            )
            .start();
        // Scoped threads: all are joined (and the namespace guard outlives
        // them) even when one of them panics.
        let failed: Vec<String> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..CLIENTS)
                .map(|i| {
                    let ns = s.ns("c");
                    scope.spawn(move || -> Result<(), String> {
                        let c = ns.udp_client("127.0.0.1:7000");
                        for j in 0..EACH {
                            // Sizes vary so that a mixed-up reply cannot match by length.
                            let mut msg = format!("client {i} datagram {j} ").into_bytes();
                            msg.extend(random_bytes(
                                (i * 7 + j * 13) % 1200,
                                (i * EACH + j) as u64,
                            ));
                            let back = udp_round_trip(&c, &msg)
                                .map_err(|e| format!("client {i} datagram {j}: {e}"))?;
                            if back != msg {
                                return Err(format!("client {i} datagram {j}: got another reply"));
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            workers
                .into_iter()
                .filter_map(|w| match w.join() {
                    Ok(r) => r.err(),
                    Err(_) => Some("a client thread panicked".into()),
                })
                .collect()
        });
        assert!(failed.is_empty(), "{failed:#?}\nlog:\n{}", s.log());
        assert_eq!(s.threads(), THREADS, "threads grew with {CLIENTS} sessions");
    })
}

#[test]
fn boundaries_and_the_largest_datagrams_pass_intact() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"]);
        let echo4 = s.ns("b").udp_bind("127.0.0.1:9000");
        let echo6 = s.ns("b").udp_bind("[::1]:9000");
        for e in [&echo4, &echo6] {
            s2(e).set_recv_buffer_size(4 << 20).unwrap();
        }
        udp_echo_server(echo4);
        udp_echo_server(echo6);
        let s = s
            .rule(a_to_b("v4"))
            .rule(
                udp("v6")
                    .listen("[::1]:7000")
                    .netns(["a"])
                    .upstream_in("b", "[::1]:9000"),
            )
            .start();
        // The largest UDP payloads: 65,535 minus the IPv4 (20) and UDP (8)
        // headers, and minus the UDP header alone for IPv6.
        for (to, sizes) in [
            (
                "127.0.0.1:7000",
                &[0, 1, 1472, 1473, 9000, 65_000, 65_507][..],
            ),
            ("[::1]:7000", &[0, 1, 1452, 1453, 65_000, 65_527][..]),
        ] {
            let c = s.ns("a").udp_client(to);
            s2(&c).set_recv_buffer_size(4 << 20).unwrap();
            // One at a time: each comes back whole.
            for &len in sizes {
                let msg = random_bytes(len, len as u64 + 1);
                let back =
                    udp_round_trip(&c, &msg).unwrap_or_else(|e| panic!("{len} bytes to {to}: {e}"));
                assert_eq!((back.len(), checksum(&back)), (len, checksum(&msg)), "{to}");
            }
            // Back to back: neither merged nor split, in order.
            for &len in sizes {
                c.send(&random_bytes(len, len as u64 + 2)).unwrap();
            }
            let mut buf = vec![0u8; 70_000];
            for &len in sizes {
                let n = c
                    .recv(&mut buf)
                    .unwrap_or_else(|e| panic!("{len} bytes to {to}: {e}"));
                assert_eq!(n, len, "{to}");
                assert_eq!(
                    checksum(&buf[..n]),
                    checksum(&random_bytes(len, len as u64 + 2))
                );
            }
        }
    })
}

/// socket2's view of a std socket, for options std lacks.
fn s2(s: &UdpSocket) -> socket2::SockRef<'_> {
    socket2::SockRef::from(s)
}

#[test]
fn five_thousand_idle_sessions_expire_and_free_everything() {
    as_root(|| {
        const SESSIONS: usize = 5000;
        const BATCH: usize = 250;
        const UPSTREAM_POOL_MAX: usize = 32;
        let s = Scenario::with(&["a", "b"]);
        let echo = s.ns("b").udp_bind("127.0.0.1:9000");
        s2(&echo).set_recv_buffer_size(4 << 20).unwrap();
        udp_echo_server(echo);
        let s = s
            .rule(a_to_b("idle").extra("udp_idle_timeout = \"2s\""))
            .start();
        let a = s.ns("a");
        let (fds, threads) = (s.fds(), s.threads());
        assert_eq!(threads, THREADS);

        // Four rounds: memory may grow in the first (allocator arenas, maps
        // sized for 5000 sessions) but not from round to round after that.
        let mut rss_after = Vec::new();
        for round in 1..=4 {
            let mut peak = 0;
            let started = Instant::now();
            // Each client socket is a new source port, so a new session. All
            // stay open until every session exists, or a new socket could get
            // the port of a closed one whose session still lives.
            let mut all = Vec::with_capacity(SESSIONS);
            for batch in 0..SESSIONS / BATCH {
                let clients: Vec<UdpSocket> =
                    (0..BATCH).map(|_| a.udp_client("127.0.0.1:7000")).collect();
                for (i, c) in clients.iter().enumerate() {
                    c.send(format!("{batch}/{i}").as_bytes()).unwrap();
                }
                let mut buf = [0u8; 64];
                for (i, c) in clients.iter().enumerate() {
                    let n = c
                        .recv(&mut buf)
                        .unwrap_or_else(|e| panic!("round {round} batch {batch} client {i}: {e}"));
                    assert_eq!(&buf[..n], format!("{batch}/{i}").as_bytes());
                }
                peak = peak.max(s.fds());
                all.extend(clients);
            }
            eprintln!(
                "round {round}: {SESSIONS} sessions in {:?}",
                started.elapsed()
            );
            drop(all);
            assert_eq!(
                s.threads(),
                THREADS,
                "threads grew with {SESSIONS} sessions"
            );
            // Sessions hold an fd each; most of them are still open here.
            assert!(
                peak >= fds + SESSIONS / 2,
                "peak {peak} fds, baseline {fds}"
            );
            s.wait_log_count("session closed: idle", round * SESSIONS);
            // Upstream sockets come from a pool the switcher keeps per
            // namespace (at most 32, refilled ahead of need), so the count
            // settles anywhere up to 32 above the baseline; a leak would be
            // thousands.
            s.wait_until("fds back to the baseline", || {
                s.fds() <= fds + UPSTREAM_POOL_MAX
            });
            assert_eq!(s.threads(), THREADS);
            rss_after.push(s.rss_kib());
        }
        // A leaked session (task, queue, timer: a few KiB) would add well over
        // 10 MiB per round; allocator noise stays within a few MiB.
        assert!(
            rss_after[3] <= rss_after[1] + 8 * 1024,
            "resident memory after each round (KiB): {rss_after:?}"
        );
        assert!(s.terminate().success());
    })
}

#[test]
fn session_cap_drops_datagrams_of_new_clients_and_says_so() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .udp_echo("b", "127.0.0.1:9000")
            .rule(a_to_b("capped").extra("udp_max_sessions = 2\nudp_idle_timeout = \"1s\""))
            .start();
        let a = s.ns("a");
        let (c1, c2, c3) = (
            a.udp_client("127.0.0.1:7000"),
            a.udp_client("127.0.0.1:7000"),
            a.udp_client("127.0.0.1:7000"),
        );
        assert_eq!(udp_round_trip(&c1, b"one").unwrap(), b"one");
        assert_eq!(udp_round_trip(&c2, b"two").unwrap(), b"two");
        c3.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let e = udp_round_trip(&c3, b"three").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        let log = s.wait_log("session limit reached (udp_max_sessions = 2)");
        let c3_port = c3.local_addr().unwrap().port();
        assert!(
            log.contains(&format!("new client 127.0.0.1:{c3_port}")),
            "{log}"
        );
        // The sessions at the cap still work.
        assert_eq!(udp_round_trip(&c1, b"one again").unwrap(), b"one again");
        // Once they expire there is room again.
        s.wait_log_count("session closed: idle", 2);
        c3.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(udp_round_trip(&c3, b"three").unwrap(), b"three");
    })
}

#[test]
fn datagrams_the_kernel_drops_are_counted_too() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .udp_echo("b", "127.0.0.1:9000")
            .rule(a_to_b("flood"))
            .start();
        let a = s.ns("a");
        // With nsproxy stopped, 40 MB of datagrams overflow any receive buffer
        // the kernel allows (8 MiB here at most, with rmem_max at 4 MiB).
        s.signal("STOP");
        let flood = a.udp_client("127.0.0.1:7000");
        let payload = [0u8; 1400];
        for _ in 0..30_000 {
            flood.send(&payload).unwrap();
        }
        s.signal("CONT");
        // The count comes with the next datagram the kernel does queue.
        let c = a.udp_client("127.0.0.1:7000");
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let answered = (0..100).any(|_| udp_round_trip(&c, b"after").is_ok());
        assert!(answered, "{}", s.log());
        let log = s.wait_log("the kernel dropped");
        assert!(
            log.contains("the socket's receive buffer was full"),
            "{log}"
        );
    })
}

#[test]
fn replies_come_from_the_address_the_client_sent_to() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"]);
        s.ns("a").add_lo_addr("127.0.0.2/8");
        s.ns("a").add_lo_addr("::2/128");
        let s = s
            .udp_echo("b", "127.0.0.1:9000")
            .rule(
                udp("any4")
                    .listen("0.0.0.0:7000")
                    .netns(["a"])
                    .upstream_in("b", "127.0.0.1:9000"),
            )
            .rule(
                udp("dual")
                    .listen("[::]:7001")
                    .netns(["a"])
                    .upstream_in("b", "127.0.0.1:9000"),
            )
            .start();
        let a = s.ns("a");
        // Unconnected clients, so that a reply from any address is received
        // and its source can be checked. Routing alone would answer from
        // 127.0.0.1 (the primary address) and ::1 (the client's own).
        let cases = [
            ("127.0.0.1:0", "127.0.0.2:7000"),
            ("127.0.0.1:0", "127.0.0.1:7000"),
            ("127.0.0.1:0", "127.0.0.2:7001"),
            ("[::1]:0", "[::2]:7001"),
            ("[::1]:0", "[::1]:7001"),
        ];
        for (from, to) in cases {
            let c = a.udp_bind(from);
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let to: SocketAddr = to.parse().unwrap();
            for i in 0..3 {
                c.send_to(format!("hello {i}").as_bytes(), to).unwrap();
                let mut buf = [0u8; 32];
                let (n, source) = c
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("{to}: {e}"));
                assert_eq!(&buf[..n], format!("hello {i}").as_bytes());
                assert_eq!(
                    source, to,
                    "the reply to a datagram for {to} came from {source}"
                );
            }
        }
        // A connected client (which drops replies from anywhere else) works too.
        let c = a.udp_client("127.0.0.2:7000");
        assert_eq!(udp_round_trip(&c, b"connected").unwrap(), b"connected");
    })
}

#[test]
fn ipv6_everywhere() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .udp_echo("b", "[::1]:9000")
            .rule(
                udp("six")
                    .listen("[::1]:7000")
                    .netns(["a", "host"])
                    .upstream_in("b", "[::1]:9000"),
            )
            .start();
        for ns in [s.ns("a"), s.host()] {
            let c = ns.udp_client("[::1]:7000");
            for i in 0..20 {
                let msg = random_bytes(100 + i * 50, i as u64);
                assert_eq!(udp_round_trip(&c, &msg).unwrap(), msg);
            }
        }
        let log = s.stop();
        assert_eq!(log.matches("session closed").count(), 2, "{log}");
        assert!(log.contains("\"peer\":\"[::1]:"), "{log}");
        assert!(log.contains("\"upstream\":\"[::1]:9000\""), "{log}");
        assert!(log.contains("\"datagrams_to_client\":20"), "{log}");
    })
}

#[test]
fn refused_upstream_keeps_the_listener_and_the_session() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .udp_echo("b", "127.0.0.1:9001")
            .rule(a_to_b("dead"))
            .rule(
                udp("alive")
                    .listen("127.0.0.1:7001")
                    .netns(["a"])
                    .upstream_in("b", "127.0.0.1:9001"),
            )
            .start();
        let a = s.ns("a");
        let dead = a.udp_client("127.0.0.1:7000");
        dead.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        // Every datagram gets "port unreachable" back, which the session sees
        // as ECONNREFUSED on its next receive or send.
        for i in 0..20 {
            assert!(udp_round_trip(&dead, format!("{i}").as_bytes()).is_err());
        }
        let log = s.wait_log("nothing listens on that port");
        assert!(log.contains("\"rule\":\"dead\""), "{log}");
        let other = a.udp_client("127.0.0.1:7000");
        let alive = a.udp_client("127.0.0.1:7001");
        assert_eq!(
            udp_round_trip(&alive, b"still here").unwrap(),
            b"still here"
        );
        // The upstream comes back: the same client (the same session, still
        // open) and a new one both get answers.
        udp_echo_server(s.ns("b").udp_bind("127.0.0.1:9000"));
        dead.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(udp_round_trip(&dead, b"back").unwrap(), b"back");
        assert_eq!(udp_round_trip(&other, b"new").unwrap(), b"new");
        assert!(!s.log().contains("session closed"), "{}", s.log());
    })
}

#[test]
fn a_slow_upstream_answer_delays_no_other_client() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"]);
        // Answers "slow..." datagrams after two seconds, others at once.
        let server = s.ns("b").udp_bind("127.0.0.1:9000");
        server.set_read_timeout(None).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = server.recv_from(&mut buf) {
                let msg = buf[..n].to_vec();
                let s = server.try_clone().unwrap();
                if msg.starts_with(b"slow") {
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_secs(2));
                        let _ = s.send_to(&msg, from);
                    });
                } else {
                    let _ = s.send_to(&msg, from);
                }
            }
        });
        let s = s.rule(a_to_b("mixed")).start();
        let a = s.ns("a");
        let slow = a.udp_client("127.0.0.1:7000");
        for i in 0..50 {
            slow.send(format!("slow {i}").as_bytes()).unwrap();
        }
        let fast = a.udp_client("127.0.0.1:7000");
        let started = Instant::now();
        for i in 0..50 {
            let msg = format!("fast {i}");
            assert_eq!(
                udp_round_trip(&fast, msg.as_bytes()).unwrap(),
                msg.as_bytes()
            );
        }
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        // The slow answers arrive later, all of them, to their own client.
        let mut buf = [0u8; 64];
        let mut got = 0;
        while got < 50 {
            // A signal to the test process (another test's child exiting)
            // can interrupt a recv with a timeout: that is no answer lost.
            let n = loop {
                match slow.recv(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r.unwrap(),
                }
            };
            assert!(buf[..n].starts_with(b"slow"));
            got += 1;
        }
    })
}

#[test]
fn shutdown_ends_sessions_at_once() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .udp_echo("b", "127.0.0.1:9000")
            .rule(a_to_b("bye"))
            .args(&["--drain-timeout", "30s"])
            .start();
        let c = s.ns("a").udp_client("127.0.0.1:7000");
        assert_eq!(udp_round_trip(&c, b"hi").unwrap(), b"hi");
        let started = Instant::now();
        let log = s.stop();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(log.contains("ending 1 UDP session(s)"), "{log}");
        assert!(log.contains("session closed: the listener closed"), "{log}");
    })
}

/// The library in this process: counters and tokio tasks, which the binary
/// does not show, go back to zero when sessions end.
#[test]
fn counters_and_tasks_in_process() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .udp_echo("b", "127.0.0.1:9000")
            .rule(a_to_b("open").extra("udp_idle_timeout = \"4s\""))
            .rule(
                udp("capped")
                    .listen("127.0.0.1:7001")
                    .netns(["a"])
                    .upstream_in("b", "127.0.0.1:9000")
                    .extra("udp_max_sessions = 5"),
            );
        let a = s.ns("a");
        let p = InProcess::start(&s);
        let tasks = || p.rt.metrics().num_alive_tasks();
        assert_eq!(p.bindings.len(), 2);
        let (open, capped) = (p.bindings[0].clone(), p.bindings[1].clone());
        let baseline = tasks();

        let clients: Vec<UdpSocket> = (0..300).map(|_| a.udp_client("127.0.0.1:7000")).collect();
        for (i, c) in clients.iter().enumerate() {
            let msg = format!("{i}");
            assert_eq!(udp_round_trip(c, msg.as_bytes()).unwrap(), msg.as_bytes());
        }
        let st = open.stats.udp();
        assert_eq!(st.sessions_created.load(Relaxed), 300);
        assert_eq!(st.datagrams_in.load(Relaxed), 300);
        // (The idle timeout is long enough for all 300 to be alive still.)
        assert_eq!(st.sessions_active.load(Relaxed), 300);
        assert!(tasks() >= baseline + 300, "{} tasks", tasks());
        let deadline = Instant::now() + WAIT;
        while st.sessions_active.load(Relaxed) > 0 || tasks() > baseline {
            assert!(
                Instant::now() < deadline,
                "{} sessions, {} tasks (baseline {baseline}) left",
                st.sessions_active.load(Relaxed),
                tasks()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(st.sessions_expired.load(Relaxed), 300);
        // (Counted just after the send, so possibly after the client had it.)
        assert_eq!(st.datagrams_out.load(Relaxed), 300);

        // Eight clients, five sessions: three datagrams dropped and counted.
        let clients: Vec<UdpSocket> = (0..8).map(|_| a.udp_client("127.0.0.1:7001")).collect();
        let mut answered = 0;
        for c in &clients {
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            if udp_round_trip(c, b"?").is_ok() {
                answered += 1;
            }
        }
        let st = capped.stats.udp();
        assert_eq!(answered, 5);
        assert_eq!(st.dropped_at_cap.load(Relaxed), 3);
        assert_eq!(st.sessions_active.load(Relaxed), 5);
        for counter in [&st.truncated, &st.send_errors, &st.dropped_queue_full] {
            assert_eq!(counter.load(Relaxed), 0);
        }

        p.rt.block_on(p.server.shutdown());
        assert_eq!(st.sessions_active.load(Relaxed), 0);
        // The listening sockets are gone: the port can be bound again.
        let _again = a.udp_bind("127.0.0.1:7001");
    })
}

/// nsproxy as a library in this process, serving a scenario's rules (its
/// namespaces stay with the [`Scenario`], which must outlive this), so that
/// a test can read its counters.
struct InProcess {
    rt: tokio::runtime::Runtime,
    server: nsproxy::lifecycle::Server,
    /// The bindings in the order of the rules.
    bindings: Vec<std::sync::Arc<nsproxy::proxy::Binding>>,
}

impl InProcess {
    fn start(scenario: &Scenario) -> InProcess {
        let cfg = nsproxy::config::parse_toml(&scenario.config_text(), "test").unwrap();
        let rt = nsproxy::runtime::build(2).unwrap();
        let server = rt.block_on(nsproxy::lifecycle::Server::start(
            cfg,
            switcher().clone(),
            nsproxy::lifecycle::Options {
                drain: Duration::from_secs(1),
                // The task counts below are back to their baseline only
                // once idle listeners have parked again: soon, not after
                // the default minute-long wait.
                park_after: Duration::from_secs(1),
                ..Default::default()
            },
        ));
        let bindings = rt.block_on(server.bindings());
        InProcess {
            rt,
            server,
            bindings,
        }
    }

    fn stats(&self, i: usize) -> &nsproxy::proxy::UdpStats {
        self.bindings[i].stats.udp()
    }

    fn stop(self) {
        self.rt.block_on(self.server.shutdown());
    }
}

/// Datagram `seq` of client `client` in a burst: its numbers, then bytes
/// that depend on both. Even clients send a cycle of sizes that crosses
/// the pooled buffers' size (2,048) both ways; odd ones runs of one size,
/// which go as segmented sends (UDP GSO), each ended by a shorter one.
fn burst_datagram(client: u32, seq: u32) -> Vec<u8> {
    const SIZES: [usize; 10] = [8, 64, 200, 1472, 2048, 2049, 9000, 100, 8, 500];
    let len = match (client % 2, seq % 50) {
        (0, _) => SIZES[seq as usize % SIZES.len()],
        (_, 49) => 300,
        _ => 1200,
    };
    let mut d = Vec::with_capacity(len);
    d.extend_from_slice(&client.to_le_bytes());
    d.extend_from_slice(&seq.to_le_bytes());
    d.extend(random_bytes(
        len - 8,
        u64::from(client) << 32 | u64::from(seq),
    ));
    d
}

/// Like [`udp_echo_server`], and counts what it echoed.
fn counting_echo_server(s: UdpSocket) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = count.clone();
    s.set_read_timeout(None).unwrap();
    s2(&s).set_recv_buffer_size(4 << 20).unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            s.send_to(&buf[..n], from).unwrap();
            counted.fetch_add(1, Relaxed);
        }
    });
    count
}

/// Reads replies on `c` until none comes for `quiet`; checks that each is
/// a whole burst datagram of `client` and that they come in order.
/// Returns how many came.
fn read_burst_replies(c: &UdpSocket, client: u32, quiet: Duration) -> Result<u64, String> {
    c.set_read_timeout(Some(quiet)).unwrap();
    let mut buf = vec![0u8; 70_000];
    let (mut got, mut last) = (0u64, None);
    while let Ok(n) = c.recv(&mut buf) {
        let d = &buf[..n];
        let seq = u32::from_le_bytes(d[4..8].try_into().unwrap());
        if d != burst_datagram(client, seq) {
            return Err(format!(
                "client {client}: reply {got} (seq {seq}, {n} bytes) is not what was sent"
            ));
        }
        if last.is_some_and(|l| seq <= l) {
            return Err(format!("client {client}: seq {seq} came after {last:?}"));
        }
        last = Some(seq);
        got += 1;
    }
    Ok(got)
}

/// Bursts from several clients at once fill batches on every hop: the
/// listener's receive, each session's sends to the upstream, its receives
/// from it and its sends to the client. Every datagram arrives whole and
/// in order, or is counted as dropped; none is lost silently.
#[test]
fn bursts_pass_whole_in_order_and_every_datagram_is_accounted_for() {
    as_root(|| {
        const CLIENTS: u32 = 4;
        const BURST: u32 = 300;
        let s = Scenario::with(&["a", "b"]);
        let echoed = counting_echo_server(s.ns("b").udp_bind("127.0.0.1:9000"));
        // Dual-stack: two clients over IPv4, two over IPv6.
        let s = s.rule(a_to_b("burst").listen("[::]:7000"));
        let p = InProcess::start(&s);
        let clients: Vec<UdpSocket> = (0..CLIENTS)
            .map(|i| {
                let c = s
                    .ns("a")
                    .udp_client(["127.0.0.1:7000", "[::1]:7000"][i as usize / 2]);
                s2(&c).set_recv_buffer_size(4 << 20).unwrap();
                c
            })
            .collect();
        let replies: Vec<Result<u64, String>> = std::thread::scope(|scope| {
            let threads: Vec<_> = clients
                .iter()
                .zip(0..)
                .map(|(c, client)| {
                    scope.spawn(move || {
                        for seq in 0..BURST {
                            c.send(&burst_datagram(client, seq)).unwrap();
                        }
                        read_burst_replies(c, client, Duration::from_millis(500))
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let mut replied = 0;
        for r in replies {
            replied += r.unwrap();
        }
        // One more datagram per client brings the kernel's count of drops on
        // the listening socket, if there were any.
        for (c, client) in clients.iter().zip(0..) {
            let last = burst_datagram(client, BURST);
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            assert_eq!(udp_round_trip(c, &last).unwrap(), last);
            replied += 1;
        }
        // A reply may reach its client just before nsproxy counts it: the
        // counts are final once the sessions have ended.
        let binding = p.bindings[0].clone();
        p.stop();
        let st = binding.stats.udp();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
        let sent = u64::from(CLIENTS * (BURST + 1));
        let (to_upstream, to_clients) = (load(&st.datagrams_in), load(&st.datagrams_out));
        let (queue_full, by_kernel) = (load(&st.dropped_queue_full), load(&st.dropped_by_kernel));
        let echoed = load(&echoed);
        eprintln!(
            "{sent} sent: {to_upstream} to the upstream ({echoed} echoed), {to_clients} back; dropped: {queue_full} (queue full), {by_kernel} (kernel)"
        );
        assert_eq!(echoed, to_upstream, "the upstream got all nsproxy sent it");
        // The kernel's drops may be on the listening socket (on the way in) or
        // on a session's socket (on the way back); the last round trips
        // brought both counts.
        assert_eq!(
            to_clients + queue_full + by_kernel,
            sent,
            "every datagram went there and back, or was counted as dropped"
        );
        assert!(to_upstream > u64::from(BURST) / 2, "many went through");
        assert!(to_upstream + queue_full <= sent);
        assert_eq!(replied, to_clients, "every reply sent arrived");
        for counter in [
            &st.truncated,
            &st.send_errors,
            &st.dropped_at_cap,
            &st.recv_errors,
        ] {
            assert_eq!(load(counter), 0);
        }
        assert_eq!(load(&st.sessions_created), u64::from(CLIENTS));
    })
}

/// "Port unreachable" reports come back while a batch is being sent
/// (on loopback, before its next datagram): the batch goes on, every
/// datagram is counted as sent or failed, and the session stays.
#[test]
fn refusals_in_the_middle_of_a_batch_lose_no_datagram() {
    as_root(|| {
        const BURST: u32 = 500;
        let s = Scenario::with(&["a", "b"]).rule(a_to_b("dead"));
        let p = InProcess::start(&s);
        let c = s.ns("a").udp_client("127.0.0.1:7000");
        for seq in 0..BURST {
            c.send(&burst_datagram(0, seq)).unwrap();
        }
        let st = p.stats(0);
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Relaxed);
        let accounted = || {
            load(&st.datagrams_in)
                + load(&st.send_errors)
                + load(&st.dropped_queue_full)
                + load(&st.dropped_by_kernel)
        };
        let deadline = Instant::now() + WAIT;
        while accounted() < u64::from(BURST) {
            assert!(
                Instant::now() < deadline,
                "{} of {BURST} accounted for",
                accounted()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(load(&st.upstream_refused) > 0);
        // The upstream comes up: the same session carries on.
        udp_echo_server(s.ns("b").udp_bind("127.0.0.1:9000"));
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let back = burst_datagram(0, BURST);
        assert!((0..25).any(|_| udp_round_trip(&c, &back).is_ok_and(|r| r == back)));
        assert_eq!(load(&st.sessions_created), 1);
        p.stop();
    })
}

/// Where the MTU is smaller than the datagrams, a segmented send (UDP GSO)
/// is refused; nsproxy sends them one by one instead (the kernel fragments
/// them), on both legs, and they still arrive whole.
#[test]
fn datagrams_larger_than_the_mtu_pass_whole_both_ways() {
    as_root(|| {
        const BURST: u32 = 40;
        let s = Scenario::with(&["a", "b"]);
        for ns in [s.ns("a"), s.ns("b")] {
            let ok = std::process::Command::new("ip")
                .args(["-n", ns.name(), "link", "set", "lo", "mtu", "1280"])
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let echoed = counting_echo_server(s.ns("b").udp_bind("127.0.0.1:9000"));
        let s = s.rule(a_to_b("mtu"));
        let p = InProcess::start(&s);
        let c = s.ns("a").udp_client("127.0.0.1:7000");
        s2(&c).set_recv_buffer_size(4 << 20).unwrap();
        // 1,400 bytes and the headers do not fit the 1,280-byte MTU: their
        // segmented sends are refused, and they go one by one (fragmented).
        // 1,000 bytes do, and go segmented.
        let big: Vec<Vec<u8>> = (0..BURST).map(|i| vec![i as u8; 1400]).collect();
        for d in &big {
            c.send(d).unwrap();
        }
        let mut buf = [0u8; 2048];
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for d in &big {
            let n = c.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &d[..]);
        }
        let small: Vec<Vec<u8>> = (0..BURST).map(|i| vec![i as u8; 1000]).collect();
        for d in &small {
            c.send(d).unwrap();
        }
        for d in &small {
            let n = c.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &d[..]);
        }
        let st = p.stats(0);
        assert_eq!(echoed.load(Relaxed), u64::from(2 * BURST));
        assert_eq!(st.send_errors.load(Relaxed), 0);
        p.stop();
    })
}

/// The counters of the one binding of `rule`, from `nsproxy status --json`.
fn counters_of(d: &Daemon, rule: &str) -> serde_json::Value {
    let (code, out, err) = d.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    st["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["rule"] == rule)
        .map(|b| b["counters"].clone())
        .expect("the binding")
}

#[test]
fn a_refused_datagram_is_counted_even_when_the_client_sends_nothing_more() {
    as_root(|| {
        // Nothing listens on the upstream port: each datagram is refused.
        let s = Scenario::with(&["a"])
            .rule(
                udp("r")
                    .listen("127.0.0.1:8000")
                    .netns(["a"])
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .start();
        let c = s.ns("a").udp_client("127.0.0.1:8000");
        c.send(b"one").unwrap();
        // The port-unreachable report only marks the session socket in error;
        // it must be read then, not when (if ever) the client sends again.
        s.wait_until("the refusal counted", || {
            counters_of(&s, "r")["upstream_refused"].as_u64() == Some(1)
        });
        let counters = counters_of(&s, "r");
        assert_eq!(counters["datagrams_in"], 1, "{counters}");
        assert_eq!(
            counters["sessions_active"], 1,
            "the session stays: {counters}"
        );
    })
}
