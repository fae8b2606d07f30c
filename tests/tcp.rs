//! TCP end to end: the nsproxy binary as its own process, real namespaces,
//! real sockets.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use common::*;

/// A TCP rule with a short connect timeout.
fn rule(name: &str) -> Rule {
    tcp(name).extra("connect_timeout = \"2s\"")
}

#[test]
fn reference_scenario_host_ns1_ns2_answer() {
    as_root(|| {
        let s = Scenario::with(&["ns1", "ns2"])
            .tcp_hello("host", "127.0.0.1:9000", "hello\n")
            .rule(
                rule("hello")
                    .listen("[::]:8000")
                    .netns(["host", "ns1", "ns2"])
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .start();
        for ns in [s.host(), s.ns("ns1"), s.ns("ns2")] {
            for addr in ["127.0.0.1:8000", "[::1]:8000"] {
                let mut c = ns
                    .tcp_connect(addr)
                    .unwrap_or_else(|e| panic!("{addr} in {}: {e}", ns.name()));
                assert_eq!(
                    read_all(&mut c).unwrap(),
                    b"hello\n",
                    "{addr} in {}",
                    ns.name()
                );
            }
        }
        let log = s.wait_log_count("connection closed", 6);
        // Every connection line names rule, namespace, peer and upstream.
        let closed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("connection closed"))
            .collect();
        assert_eq!(closed.len(), 6, "{log}");
        for l in &closed {
            for field in [
                "\"rule\":\"hello\"",
                "\"netns\":",
                "\"upstream\":\"127.0.0.1:9000\"",
                "\"bytes_to_client\":6",
            ] {
                assert!(l.contains(field), "{field} missing in {l}");
            }
            assert!(
                l.contains("\"peer\":\"127.0.0.1:") || l.contains("\"peer\":\"[::1]:"),
                "{l}"
            );
        }
        assert!(log.contains(&format!("\"netns\":\"{}\"", s.ns("ns2").name())));
        assert!(s.terminate().success());
    })
}

#[test]
fn sixteen_mib_each_way_across_namespaces() {
    as_root(|| {
        const LEN: usize = 16 << 20;
        let s = Scenario::with(&["c", "s"]);
        let to_server = random_bytes(LEN, 1);
        let to_client = random_bytes(LEN, 2);
        let (want_at_server, want_at_client) = (checksum(&to_server), checksum(&to_client));

        let listener = s.ns("s").tcp_listen("127.0.0.1:9000");
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            c.set_read_timeout(Some(WAIT)).unwrap();
            let mut w = c.try_clone().unwrap();
            let sender = std::thread::spawn(move || {
                w.write_all(&to_client).unwrap();
                w.shutdown(Shutdown::Write).unwrap();
            });
            let got = read_all(&mut c).unwrap();
            sender.join().unwrap();
            (got.len(), checksum(&got))
        });
        let s = s
            .rule(
                rule("bulk")
                    .listen("127.0.0.1:7000")
                    .netns(["c"])
                    .upstream_in("s", "127.0.0.1:9000"),
            )
            .start();
        let mut c = s.ns("c").tcp_connect("127.0.0.1:7000").unwrap();
        let mut w = c.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            w.write_all(&to_server).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let got = read_all(&mut c).unwrap();
        sender.join().unwrap();
        assert_eq!((got.len(), checksum(&got)), (LEN, want_at_client));
        assert_eq!(server.join().unwrap(), (LEN, want_at_server));
        let log = s.wait_log("connection closed");
        assert!(
            log.contains(&format!("\"bytes_from_client\":{LEN}")),
            "{log}"
        );
        assert!(log.contains(&format!("\"bytes_to_client\":{LEN}")), "{log}");
    })
}

#[test]
fn half_close_passes_fin_and_keeps_the_other_direction() {
    as_root(|| {
        // The server answers only after it has seen the client's FIN.
        let s = Scenario::with(&["a", "b"])
            .tcp_serve("b", "127.0.0.1:9000", |mut c| {
                let got = read_all(&mut c).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                c.write_all(format!("got {} bytes after your FIN", got.len()).as_bytes())
                    .unwrap();
            })
            .rule(
                rule("hc")
                    .listen("127.0.0.1:7000")
                    .netns(["a"])
                    .upstream_in("b", "127.0.0.1:9000"),
            )
            .start();
        let mut c = s.ns("a").tcp_connect("127.0.0.1:7000").unwrap();
        c.write_all(b"12345").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_all(&mut c).unwrap(), b"got 5 bytes after your FIN");
    })
}

#[test]
fn refused_upstream_closes_the_client_promptly_and_others_keep_serving() {
    as_root(|| {
        let s = Scenario::with(&["a"])
            .tcp_hello("host", "127.0.0.1:9001", "alive\n")
            .rule(
                rule("dead")
                    .listen("127.0.0.1:7000")
                    .netns(["a"])
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .rule(
                rule("alive")
                    .listen("127.0.0.1:7001")
                    .netns(["a"])
                    .upstream_in("host", "127.0.0.1:9001"),
            )
            .start();
        let a = s.ns("a");
        for _ in 0..3 {
            let started = Instant::now();
            // The reset may arrive before the client's connect() has even
            // reported success, so it can show up there or on the first read.
            match a.tcp_connect("127.0.0.1:7000") {
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
                Ok(mut c) => {
                    let mut buf = [0u8; 16];
                    // Reset (or at worst EOF), well before any timeout.
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => {}
                        Ok(n) => panic!("got {n} bytes from a dead upstream"),
                    }
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
            let mut ok = a.tcp_connect("127.0.0.1:7001").unwrap();
            assert_eq!(read_all(&mut ok).unwrap(), b"alive\n");
        }
        let log = s.wait_log("upstream connect failed");
        assert!(log.contains("connection refused"), "{log}");
        assert!(log.contains("\"rule\":\"dead\""), "{log}");
    })
}

#[test]
fn two_hundred_namespaces_with_a_fixed_thread_count() {
    as_root(|| {
        let tags: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
        let s = Scenario::new()
            .many("m", 200)
            .tcp_echo("host", "127.0.0.1:9000")
            .rule(
                rule("many")
                    .listen("127.0.0.1:7000")
                    .netns(&tags)
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .start();
        let log = s.ready_log();
        assert!(log.contains("ready: 200 of 200 binding(s)"), "{log}");
        // main + 2 workers + the namespace thread
        assert_eq!(s.threads(), 4);
        // Hold a connection open in every namespace at once, then use each.
        let mut conns: Vec<_> = s
            .group("m")
            .iter()
            .map(|ns| ns.tcp_connect("127.0.0.1:7000").unwrap())
            .collect();
        assert_eq!(conns.len(), 200);
        for (i, c) in conns.iter_mut().enumerate() {
            let msg = format!("namespace {i}\n");
            c.write_all(msg.as_bytes()).unwrap();
            let mut back = vec![0u8; msg.len()];
            c.read_exact(&mut back).unwrap();
            assert_eq!(back, msg.as_bytes());
        }
        assert_eq!(s.threads(), 4, "threads grew with 200 open connections");
        drop(conns);
        assert!(s.terminate().success());
    })
}

#[test]
fn one_bad_binding_never_stops_the_others() {
    as_root(|| {
        let s = Scenario::with(&["busy", "fine"]).tcp_hello("host", "127.0.0.1:9000", "ok\n");
        let _occupied = s.ns("busy").tcp_listen("127.0.0.1:7000");
        let missing = format!("{}-missing", s.ns("fine").name());
        let s = s
            .rule(
                rule("r")
                    .listen("127.0.0.1:7000")
                    .netns(["busy", missing.as_str(), "/etc/hostname", "fine"])
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .start();
        let log = s.ready_log();
        assert!(log.contains("ready: 1 of 4 binding(s)"), "{log}");
        assert!(
            log.contains("cannot listen on 127.0.0.1:7000: Address already in use"),
            "{log}"
        );
        assert!(log.contains(&format!("namespace \\\"{missing}\\\" not found: /run/netns/{missing} does not exist (create it with `ip netns add {missing}`)")), "{log}");
        assert!(
            log.contains("\\\"/etc/hostname\\\" is not a network namespace: /etc/hostname is on"),
            "{log}"
        );
        let mut c = s.ns("fine").tcp_connect("127.0.0.1:7000").unwrap();
        assert_eq!(read_all(&mut c).unwrap(), b"ok\n");
    })
}

#[test]
fn nothing_listening_is_an_error_exit() {
    as_root(|| {
        let s = Scenario::new()
            .rule(
                rule("r")
                    .listen("127.0.0.1:7000")
                    // A process's namespace that is gone is not waited for
                    // (a name, or a file outside /proc, would be).
                    .netns(["/proc/2147483646/ns/net"])
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .spawn();
        let (status, log) = s.wait_exit();
        assert_eq!(status.code(), Some(1), "{log}");
        assert!(
            log.contains("no listener could be started (1 binding(s) failed"),
            "{log}"
        );
    })
}

#[test]
fn forward_command_line_form() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"]).tcp_hello("b", "[::1]:9000", "from b\n");
        let spec = format!(
            "tcp:[::]:7000@{},host=[::1]:9000@{}",
            s.ns("a").name(),
            s.ns("b").name()
        );
        let s = s.start_command(&["forward", "--workers", "1", &spec]);
        for ns in [s.ns("a"), s.host()] {
            let mut c = ns.tcp_connect("127.0.0.1:7000").unwrap();
            assert_eq!(read_all(&mut c).unwrap(), b"from b\n");
        }
        assert_eq!(s.threads(), 3);
    })
}

#[test]
fn graceful_shutdown_lets_open_connections_finish() {
    as_root(|| {
        let s = Scenario::with(&["a"])
            .tcp_echo("host", "127.0.0.1:9000")
            .rule(
                rule("g")
                    .listen("127.0.0.1:7000")
                    .netns(["a"])
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .args(&["--drain-timeout", "10s"])
            .start();
        let a = s.ns("a");
        let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
        c.write_all(b"before").unwrap();
        let mut buf = [0u8; 6];
        c.read_exact(&mut buf).unwrap();
        s.signal("TERM");
        s.wait_log("draining 1 connection(s)");
        // New connections are refused; the open one still relays.
        assert!(a.tcp_connect("127.0.0.1:7000").is_err());
        c.write_all(b"after!").unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"after!");
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_all(&mut c).unwrap(), b"");
        let (status, log) = s.wait_exit();
        assert!(status.success(), "{log}");
    })
}

#[test]
fn running_out_of_fds_pauses_accepts_instead_of_spinning() {
    as_root(|| {
        // A hard limit of 48 fds: a few dozen connections exhaust it.
        let s = Scenario::with(&["a"])
            .tcp_echo("host", "127.0.0.1:9000")
            .rule(
                rule("fd")
                    .listen("127.0.0.1:7000")
                    .netns(["a"])
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .wrapper(&["prlimit", "--nofile=48:48", "--"])
            .start();
        let a = s.ns("a");
        let conns: Vec<_> = (0..40)
            .map(|_| a.tcp_connect("127.0.0.1:7000").unwrap())
            .collect();
        let log = s.wait_log("pausing accepts");
        // Whichever runs out first: accept(2), or the upstream socket made as
        // a client is accepted.
        assert!(
            log.contains("accept failed: Too many open files")
                || log.contains("cannot create upstream sockets: Too many open files"),
            "{log}"
        );
        // Backing off, not spinning: a spinning accept loop fails thousands of
        // times a second. (Each accept that does succeed resets the pause, so
        // the count is not simply log2 of the time; the lines are rate-limited
        // now, but every failure is counted.)
        std::thread::sleep(Duration::from_secs(1));
        let attempts = s.log().matches("pausing accepts").count();
        assert!(
            attempts <= 100,
            "{attempts} failed accepts in about a second"
        );
        // Once fds are free again, new connections are served. (The backlog
        // still holds the dropped clients, which may take the first free fds.)
        drop(conns);
        let deadline = Instant::now() + WAIT;
        loop {
            let echoed = a.tcp_connect("127.0.0.1:7000").and_then(|mut c| {
                c.write_all(b"back")?;
                let mut buf = [0u8; 4];
                c.read_exact(&mut buf)?;
                Ok(buf)
            });
            match echoed {
                Ok(buf) => break assert_eq!(&buf, b"back"),
                Err(e) if Instant::now() > deadline => panic!("never served again: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })
}

/// Sends `msg` through an echo and checks it comes back.
fn echo(c: &mut std::net::TcpStream, msg: &[u8]) {
    c.write_all(msg).unwrap();
    let mut back = vec![0; msg.len()];
    c.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

/// Waits (bounded) until `n` connections wait in the accept queue of the
/// TCP listener on `port` in `ns` (a listener's Recv-Q in `ss`): a client's
/// connect() may return before the listener has queued it.
fn until_queued(ns: &TestNs, port: u16, n: u32) {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name(), "ss", "-Hltn"])
            .arg(format!("sport = :{port}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let queued: u32 = text
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if queued >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{queued} of {n} queued: {text}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The counters of the binding of rule `rule` in namespace `ns`, from
/// `nsproxy status --json`.
fn counters(d: &Daemon, rule: &str, ns: &str) -> serde_json::Value {
    let (code, out, err) = d.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let found = v["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["rule"] == rule && b["netns"] == ns)
        .unwrap_or_else(|| panic!("no binding of {rule} in {ns}: {out}"));
    found["counters"].clone()
}

#[test]
fn at_max_connections_new_clients_wait_until_one_closes() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .tcp_echo("host", "127.0.0.1:9000")
            .rule(
                tcp("capped")
                    .listen("127.0.0.1:7000")
                    .netns(["a", "b"])
                    .upstream_in("host", "127.0.0.1:9000")
                    .extra("max_connections = 2"),
            )
            .start();
        let (a, b) = (s.ns("a"), s.ns("b"));
        let mut first = a.tcp_connect_when_ready("127.0.0.1:7000");
        echo(&mut first, b"one");
        let mut second = a.tcp_connect("127.0.0.1:7000").unwrap();
        echo(&mut second, b"two");
        let log = s.wait_log("max_connections");
        assert!(
            log.contains(
                "2 connection(s) open, max_connections is 2: not accepting more until one closes"
            ),
            "{log}"
        );
        assert!(log.contains("\"rule\":\"capped\""), "{log}");

        // The kernel completes a third handshake into the backlog; nsproxy
        // leaves it there while two are open.
        let mut third = a.tcp_connect("127.0.0.1:7000").unwrap();
        third.write_all(b"three").unwrap();
        // Another namespace of the same rule has a count of its own.
        let mut other = b.tcp_connect_when_ready("127.0.0.1:7000");
        echo(&mut other, b"elsewhere");
        third
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 5];
        let waited = third.read(&mut buf);
        assert!(
            matches!(&waited, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "the third client was served while two were open: {waited:?}"
        );
        let c = counters(&s, "capped", a.name());
        assert_eq!(c["connections_accepted"], 2, "{c}");
        assert_eq!(c["connections_active"], 2, "{c}");
        assert_eq!(c["paused_at_cap"], 1, "{c}");
        // The status table shows the open ones against the cap.
        let (_, table, _) = s.cli(&["status"]);
        let row = table.lines().find(|l| l.contains(a.name())).unwrap();
        assert!(row.contains(" 2/2 "), "{table}");

        // One closes: the waiting client is taken and served.
        drop(first);
        third.set_read_timeout(None).unwrap();
        third.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"three");
        echo(&mut second, b"still");
        let c = counters(&s, "capped", a.name());
        assert_eq!(c["connections_accepted"], 3, "{c}");
        // Taking the third reached the cap again.
        assert_eq!(c["paused_at_cap"], 2, "{c}");
        assert_eq!(counters(&s, "capped", b.name())["paused_at_cap"], 0);

        // A fourth waits in the backlog when the daemon is told to stop. The
        // cap is full, so it is reset (not served beyond the cap), counted and
        // logged, while the open ones drain.
        let mut fourth = a.tcp_connect("127.0.0.1:7000").unwrap();
        fourth.write_all(b"four").unwrap();
        until_queued(a, 7000, 1);
        s.signal("TERM");
        let mut four = [0u8; 4];
        let refused = fourth.read(&mut four);
        assert!(
            matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{refused:?}"
        );
        echo(&mut third, b"draining");
        drop((second, third, other));
        let (status, log) = s.wait_exit();
        assert!(status.success(), "{log}");
        assert!(
            log.contains("reset 1 connection(s) waiting in the listen backlog as the listener closed: max_connections are open"),
            "{log}"
        );
        // The second time at the cap fell within the first warning's
        // interval: counted, and logged at the latest when the listener closed.
        assert!(
            log.contains("max_connections reached 1 more time(s) since the last report"),
            "{log}"
        );
    })
}

#[test]
fn proxy_protocol_tells_the_upstream_the_client_and_namespace() {
    as_root(|| {
        let with = |name: &str, listen: &str, version: &str| {
            tcp(name)
                .listen(listen)
                .netns(["a"])
                .upstream_in("host", "127.0.0.1:9000")
                .extra(&format!("proxy_protocol = \"{version}\""))
        };
        // What the upstream received comes back to the client.
        let s = Scenario::with(&["a"])
            .tcp_echo("host", "127.0.0.1:9000")
            .rule(with("pp1", "127.0.0.1:7000", "v1"))
            .rule(with("pp2", "[::]:7001", "v2"))
            .start();
        let a = s.ns("a");
        let upstream_saw = |mut c: std::net::TcpStream| {
            c.write_all(b"hello").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            read_all(&mut c).unwrap()
        };

        let c = a.tcp_connect_when_ready("127.0.0.1:7000");
        let port = c.local_addr().unwrap().port();
        assert_eq!(
            String::from_utf8(upstream_saw(c)).unwrap(),
            format!("PROXY TCP4 127.0.0.1 127.0.0.1 {port} 7000\r\nhello")
        );

        // v2, by hand from the specification: signature, version 2 + PROXY,
        // family, length, addresses, ports, then the PP2_TYPE_NETNS TLV.
        let v2 = |family: u8, ip: &[u8], port: u16| {
            let mut h = b"\r\n\r\n\0\r\nQUIT\n\x21".to_vec();
            h.push(family);
            let len = 2 * ip.len() + 4 + 3 + a.name().len();
            h.extend_from_slice(&(len as u16).to_be_bytes());
            h.extend_from_slice(ip);
            h.extend_from_slice(ip);
            h.extend_from_slice(&port.to_be_bytes());
            h.extend_from_slice(&7001u16.to_be_bytes());
            h.push(0x30);
            h.extend_from_slice(&(a.name().len() as u16).to_be_bytes());
            h.extend_from_slice(a.name().as_bytes());
            h.extend_from_slice(b"hello");
            h
        };
        // An IPv4 client of the dual-stack listener is reported as IPv4.
        let c = a.tcp_connect_when_ready("127.0.0.1:7001");
        let port = c.local_addr().unwrap().port();
        assert_eq!(upstream_saw(c), v2(0x11, &[127, 0, 0, 1], port));
        let c = a.tcp_connect("[::1]:7001").unwrap();
        let port = c.local_addr().unwrap().port();
        let loopback6 = std::net::Ipv6Addr::LOCALHOST.octets();
        assert_eq!(upstream_saw(c), v2(0x21, &loopback6, port));
    })
}

#[test]
fn a_reload_applies_max_connections_and_proxy_protocol_in_place() {
    as_root(|| {
        let rule = |extra: &str| {
            tcp("tuned")
                .listen("127.0.0.1:7000")
                .netns(["a"])
                .upstream_in("host", "127.0.0.1:9000")
                .extra(extra)
        };
        let s = Scenario::with(&["a"])
            .tcp_echo("host", "127.0.0.1:9000")
            .rule(rule("max_connections = 1"))
            .start();
        let a = s.ns("a");
        let mut first = a.tcp_connect_when_ready("127.0.0.1:7000");
        echo(&mut first, b"one");
        // Waits in the backlog: the cap is 1.
        let mut second = a.tcp_connect("127.0.0.1:7000").unwrap();
        second.write_all(b"two").unwrap();
        let sockets_before = s.socket_inodes();

        s.write_config(&[rule("max_connections = 2\nproxy_protocol = \"v1\"")]);
        let (code, out, err) = s.cli(&["reload"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out,
            "reloaded: 0 added, 0 removed, 0 replaced, 1 updated in place, 0 unchanged\n"
        );
        // The raised cap lets the waiting client in while the first is still
        // open, and its upstream connection is the first with the header.
        let port = second.local_addr().unwrap().port();
        let want = format!("PROXY TCP4 127.0.0.1 127.0.0.1 {port} 7000\r\ntwo");
        let mut got = vec![0; want.len()];
        second.read_exact(&mut got).unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), want);
        // The first connection, made before, relays on untouched.
        echo(&mut first, b"still");
        let sockets_after = s.socket_inodes();
        assert!(
            sockets_before.iter().all(|s| sockets_after.contains(s)),
            "the reload closed a socket: before {sockets_before:?}, after {sockets_after:?}"
        );
        let log = s.log();
        assert!(
            log.contains("max_connections 2, proxy_protocol v1,"),
            "{log}"
        );
    })
}
