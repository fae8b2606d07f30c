//! `upstream_source = "client"` end to end: the upstream, in a namespace of
//! its own, sees each client's own address and port (TCP and UDP, IPv4 and
//! IPv6), replies reach the client through the policy routing the test sets
//! up there, and a client address the upstream namespace cannot use fails
//! that connection or session alone, counted and logged.
//!
//! Addresses: clients are `10.99.0.2` / `fd99::2` on `lo` of their listen
//! namespace (`a`, `b`); the upstream is `10.98.0.1` / `fd98::1` on `lo` of
//! `up`, where the client addresses are not local. There, the replies of
//! the upstream are routed to `lo` as local by `from UPSTREAM lookup 100`
//! and `local default dev lo table 100`, the README's commands.

mod common;

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nsproxy::netns::SocketSpec;

const CLIENT4: &str = "10.99.0.2";
const CLIENT6: &str = "fd99::2";
const UP4: &str = "10.98.0.1";
const UP6: &str = "fd98::1";

/// `ip -n NS ARGS`, which must succeed.
fn ip_in(ns: &TestNs, args: &[&str]) {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns.name())
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip -n {} {}: {}",
        ns.name(),
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The client addresses on `lo` of a listen namespace.
fn client_side(ns: &TestNs) {
    ns.add_lo_addr(&format!("{CLIENT4}/32"));
    ip_in(
        ns,
        &["-6", "addr", "add", &format!("{CLIENT6}/128"), "dev", "lo"],
    );
}

/// The upstream's addresses on `lo` of `ns`; with `routing`, the policy
/// routing that brings its replies to the client addresses back to nsproxy.
fn upstream_side(ns: &TestNs, routing: bool) {
    ns.add_lo_addr(&format!("{UP4}/32"));
    ip_in(
        ns,
        &["-6", "addr", "add", &format!("{UP6}/128"), "dev", "lo"],
    );
    if routing {
        upstream_side_routing(ns);
    }
}

/// The README's policy routing for an upstream at `UP4` and `UP6` in `ns`.
fn upstream_side_routing(ns: &TestNs) {
    for cmd in [
        format!("rule add from {UP4} lookup 100"),
        "route add local 0.0.0.0/0 dev lo table 100".to_owned(),
        format!("-6 rule add from {UP6} lookup 100"),
        "-6 route add local ::/0 dev lo table 100".to_owned(),
    ] {
        ip_in(ns, &cmd.split(' ').collect::<Vec<_>>());
    }
}

/// A TCP upstream that starts each connection with the peer it sees
/// (`getpeername`) on a line, then echoes.
fn tell_peer(c: TcpStream) {
    let mut c = c;
    let peer = c.peer_addr().unwrap();
    if c.write_all(format!("{peer}\n").as_bytes()).is_err() {
        return;
    }
    let mut r = c.try_clone().unwrap();
    let _ = io::copy(&mut r, &mut c);
}

/// A UDP upstream that answers each datagram with the peer it came from
/// (`recvfrom`) and the datagram: `PEER DATA`.
fn udp_tell_peer(s: UdpSocket) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                continue;
            };
            let reply = format!("{from} {}", String::from_utf8_lossy(&buf[..n]));
            let _ = s.send_to(reply.as_bytes(), from);
        }
    });
}

/// A TCP connection from `from` (address and port) in `ns` to `to`.
fn tcp_from(ns: &TestNs, from: SocketAddr, to: &str) -> io::Result<TcpStream> {
    let to: SocketAddr = to.parse().unwrap();
    let s = switcher()
        .socket_blocking(ns.id(), SocketSpec::tcp(&to))
        .map_err(io::Error::other)?;
    s.set_nonblocking(false)?;
    s.bind(&from.into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(WAIT))?;
    s.set_write_timeout(Some(WAIT))?;
    Ok(s)
}

/// Like [`tcp_from`], retried (bounded) until nsproxy listens.
fn tcp_from_when_ready(ns: &TestNs, from: SocketAddr, to: &str) -> TcpStream {
    let deadline = Instant::now() + WAIT;
    loop {
        match tcp_from(ns, from, to) {
            Ok(s) => return s,
            Err(e) if Instant::now() >= deadline => panic!("{to} in {}: {e}", ns.name()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A free port on `ip` in `ns` (bound and given back at once).
fn free_port(ns: &TestNs, ip: &str) -> SocketAddr {
    let a: SocketAddr = SocketAddr::new(ip.parse().unwrap(), 0);
    let s = switcher()
        .socket_blocking(ns.id(), SocketSpec::tcp(&a))
        .unwrap();
    s.bind(&a.into()).unwrap();
    s.local_addr().unwrap().as_socket().unwrap()
}

/// The connection is reset: at once (the reset may beat `connect`'s
/// return on loopback), or at the first read.
fn assert_reset(c: io::Result<TcpStream>) {
    let r = c.and_then(|mut c| c.read(&mut [0u8; 64]));
    assert!(
        matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "the client is reset: {r:?}"
    );
}

/// The first line the upstream sends: the peer it sees.
fn seen_peer(c: &TcpStream) -> String {
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    line.trim().to_owned()
}

fn echo_once(c: &mut TcpStream, msg: &[u8]) {
    c.write_all(msg).unwrap();
    let mut got = vec![0; msg.len()];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

/// Waits (bounded) until `counter` of the binding reads `want`.
fn wait_counter(d: &Daemon, rule: &str, ns: &str, counter: &str, want: u64) {
    d.wait_until(&format!("{counter} = {want} in {rule}@{ns}"), || {
        d.counters(rule, ns)[counter] == want
    });
}

/// A scenario of listen namespaces `a`, `b` and upstream namespace `up`,
/// its addresses and routing set up, serving TCP (port 9000: tells the
/// peer) and UDP (port 9001: tells the peer) on both upstream addresses.
fn scenario() -> Scenario {
    let s = Scenario::with(&["a", "b", "up"]);
    client_side(s.ns("a"));
    client_side(s.ns("b"));
    upstream_side(s.ns("up"), true);
    let s = s
        .tcp_serve("up", &format!("{UP4}:9000"), tell_peer)
        .tcp_serve("up", &format!("[{UP6}]:9000"), tell_peer);
    udp_tell_peer(s.ns("up").udp_bind(&format!("{UP4}:9001")));
    udp_tell_peer(s.ns("up").udp_bind(&format!("[{UP6}]:9001")));
    s
}

fn client_rule(name: &str, listen: &str, upstream: &str) -> Rule {
    tcp(name)
        .listen(listen)
        .netns(["a", "b"])
        .upstream_in("up", upstream)
        .extra("upstream_source = \"client\"\nconnect_timeout = \"3s\"")
}

#[test]
fn tcp_upstream_sees_the_client_ipv4_and_ipv6() {
    as_root(|| {
        let s = scenario()
            .rule(client_rule("v4", "0.0.0.0:7000", &format!("{UP4}:9000")))
            .rule(client_rule("v6", "[::]:7006", &format!("[{UP6}]:9000")))
            .start();
        let from4 = free_port(s.ns("a"), CLIENT4);
        let mut c = tcp_from_when_ready(s.ns("a"), from4, &format!("{CLIENT4}:7000"));
        assert_eq!(
            seen_peer(&c),
            from4.to_string(),
            "the upstream's getpeername"
        );
        echo_once(&mut c, b"replies come back (IPv4)");

        let from6 = free_port(s.ns("b"), CLIENT6);
        let mut c6 = tcp_from_when_ready(s.ns("b"), from6, &format!("[{CLIENT6}]:7006"));
        assert_eq!(seen_peer(&c6), from6.to_string());
        echo_once(&mut c6, b"replies come back (IPv6)");
        drop((c, c6));
        s.wait_log_count("connection closed", 2);
    })
}

#[test]
fn udp_upstream_sees_the_client_and_replies_reach_it() {
    as_root(|| {
        let s = scenario()
            .rule(
                udp("u4")
                    .listen("0.0.0.0:7001")
                    .netns(["a"])
                    .upstream_in("up", &format!("{UP4}:9001"))
                    .extra("upstream_source = \"client\""),
            )
            .rule(
                udp("u6")
                    .listen("[::]:7007")
                    .netns(["a"])
                    .upstream_in("up", &format!("[{UP6}]:9001"))
                    .extra("upstream_source = \"client\""),
            )
            .start();
        for (ip, to) in [
            (CLIENT4, format!("{CLIENT4}:7001")),
            (CLIENT6, format!("[{CLIENT6}]:7007")),
        ] {
            let c = s
                .ns("a")
                .udp_bind(&SocketAddr::new(ip.parse().unwrap(), 0).to_string());
            c.connect(&to).unwrap();
            let me = c.local_addr().unwrap();
            let reply = udp_round_trip(&c, b"hello").unwrap();
            assert_eq!(
                String::from_utf8(reply).unwrap(),
                format!("{me} hello"),
                "the upstream's recvfrom shows the client ({to})"
            );
        }
    })
}

#[test]
fn the_same_client_address_in_two_namespaces_fails_the_second_alone() {
    as_root(|| {
        let s = scenario()
            .head("metrics_listen = \"127.0.0.1:9100\"")
            .rule(client_rule("t", "0.0.0.0:7000", &format!("{UP4}:9000")))
            .rule(
                udp("u")
                    .listen("0.0.0.0:7001")
                    .netns(["a", "b"])
                    .upstream_in("up", &format!("{UP4}:9001"))
                    .extra("upstream_source = \"client\""),
            )
            .start();
        let (a, b) = (s.ns("a"), s.ns("b"));
        // TCP: the same address and port in a and b, to the same upstream:
        // the same 4-tuple would be needed twice in `up`.
        let from = free_port(a, CLIENT4);
        let mut first = tcp_from_when_ready(a, from, &format!("{CLIENT4}:7000"));
        assert_eq!(seen_peer(&first), from.to_string());
        // Listening in b too (it was ready with a): one attempt, so that
        // exactly one connection fails.
        assert_reset(tcp_from(b, from, &format!("{CLIENT4}:7000")));
        wait_counter(&s, "t", b.name(), "upstream_source_failed", 1);
        assert_eq!(s.counters("t", b.name())["connect_failed"], 1);
        assert_eq!(s.counters("t", a.name())["upstream_source_failed"], 0);
        echo_once(&mut first, b"the first is unaffected");
        s.wait_log("are in use in the upstream namespace already");

        // UDP: the same, for sessions.
        let c1 = a.udp_bind(&format!("{CLIENT4}:0"));
        let me = c1.local_addr().unwrap();
        c1.connect(format!("{CLIENT4}:7001")).unwrap();
        let got = udp_round_trip(&c1, b"one").unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), format!("{me} one"));
        let c2 = b.udp_bind(&me.to_string());
        c2.connect(format!("{CLIENT4}:7001")).unwrap();
        c2.send(b"two").unwrap();
        wait_counter(&s, "u", b.name(), "upstream_source_failed", 1);
        assert_eq!(s.counters("u", b.name())["sessions_failed"], 1);
        let got = udp_round_trip(&c1, b"again").unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), format!("{me} again"));

        // The metric, per binding.
        let mut m = s.host().tcp_connect("127.0.0.1:9100").unwrap();
        m.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let body = String::from_utf8(read_all(&mut m).unwrap()).unwrap();
        for (rule, protocol) in [("t", "tcp"), ("u", "udp")] {
            for (ns, want) in [(a.name(), 0), (b.name(), 1)] {
                let series = format!(
                    "nsproxy_upstream_source_failed_total{{rule=\"{rule}\",netns=\"{ns}\",protocol=\"{protocol}\"}} {want}"
                );
                assert!(body.contains(&series), "{series} in:\n{body}");
            }
        }
    })
}

#[test]
fn an_ipv6_client_of_an_ipv4_upstream_fails_alone_and_a_mapped_ipv4_one_works() {
    as_root(|| {
        let s = scenario()
            .rule(client_rule("mixed", "[::]:7000", &format!("{UP4}:9000")))
            .start();
        let a = s.ns("a");
        let from6 = free_port(a, CLIENT6);
        // The listener is there once the daemon is ready: one attempt.
        assert_reset(tcp_from(a, from6, &format!("[{CLIENT6}]:7000")));
        wait_counter(&s, "mixed", a.name(), "upstream_source_failed", 1);
        s.wait_log("is IPv6, the upstream 10.98.0.1:9000 is IPv4");
        // An IPv4 client of the `[::]` listener (v4-mapped there) is IPv4
        // at the upstream.
        let from4 = free_port(a, CLIENT4);
        let mut c4 = tcp_from_when_ready(a, from4, &format!("{CLIENT4}:7000"));
        assert_eq!(seen_peer(&c4), from4.to_string());
        echo_once(&mut c4, b"mapped");
    })
}

/// /proc/PID/status as a map.
fn proc_status(pid: u32) -> HashMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn cap_eff(pid: u32) -> u64 {
    u64::from_str_radix(&proc_status(pid)["CapEff"], 16).unwrap()
}

const CAP_NET_ADMIN: u64 = 1 << 12;
const CAP_SYS_ADMIN: u64 = 1 << 21;

#[test]
fn split_the_broker_keeps_net_admin_for_such_a_rule_and_the_relay_nothing() {
    as_root(|| {
        let s = scenario()
            .rule(client_rule("t", "0.0.0.0:7000", &format!("{UP4}:9000")))
            .start();
        let from = free_port(s.ns("a"), CLIENT4);
        let mut c = tcp_from_when_ready(s.ns("a"), from, &format!("{CLIENT4}:7000"));
        assert_eq!(seen_peer(&c), from.to_string());
        echo_once(&mut c, b"split");
        let mut brokers = Vec::new();
        s.wait_until("the broker runs", || {
            brokers = children(s.pid());
            brokers.len() == 1
        });
        assert_eq!(cap_eff(brokers[0]), CAP_SYS_ADMIN | CAP_NET_ADMIN);
        assert_eq!(cap_eff(s.pid()), 0, "the relay");
        assert!(s.log().contains("cap_net_admin"), "{}", s.log());
    })
}

#[test]
fn a_rule_from_the_host_namespace_gets_its_transparent_socket_from_the_broker() {
    as_root(|| {
        let s = Scenario::with(&["a"]);
        client_side(s.ns("a"));
        upstream_side(s.host(), true);
        let s = s
            .tcp_serve("host", &format!("{UP4}:9000"), tell_peer)
            .rule(
                tcp("home")
                    .listen("0.0.0.0:7000")
                    .netns(["a"])
                    .upstream_in("host", &format!("{UP4}:9000"))
                    .extra("upstream_source = \"client\""),
            )
            .start();
        let from = free_port(s.ns("a"), CLIENT4);
        let mut c = tcp_from_when_ready(s.ns("a"), from, &format!("{CLIENT4}:7000"));
        assert_eq!(seen_peer(&c), from.to_string());
        echo_once(&mut c, b"home");
    })
}

#[test]
fn check_warns_where_the_policy_routing_is_missing_and_gives_the_commands() {
    as_root(|| {
        let up = TestNs::new("up");
        upstream_side(&up, false);
        let dir = TempDir::new();
        let rules = [
            tcp("t4")
                .listen("0.0.0.0:7000")
                .netns(["host"])
                .upstream_in(up.name(), &format!("{UP4}:9000"))
                .extra("upstream_source = \"client\""),
            udp("u6")
                .listen("[::]:7000")
                .netns(["host"])
                .upstream_in(up.name(), &format!("[{UP6}]:9000"))
                .extra("upstream_source = \"client\""),
            tcp("plain")
                .listen("0.0.0.0:7001")
                .netns(["host"])
                .upstream_in(up.name(), &format!("{UP4}:9000")),
        ];
        let text: String = rules.iter().map(ToString::to_string).collect();
        let path = dir.file("t.toml", &config(&text));
        let path = path.to_str().unwrap();
        let (code, out, err) = run_cli(&["check", "--config", path]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("2 routing warning(s)"), "{out}");
        let n = up.name();
        for want in [
            format!(
                "rule t4: `upstream_netns`: upstream_source = \"client\": namespace \"{n}\" has no IPv4 policy routing"
            ),
            format!(
                "`ip -n {n} rule add from {UP4} lookup 100` and `ip -n {n} route add local 0.0.0.0/0 dev lo table 100`"
            ),
            format!(
                "`ip -n {n} -6 rule add from {UP6} lookup 100` and `ip -n {n} -6 route add local ::/0 dev lo table 100`"
            ),
        ] {
            assert!(err.contains(&want), "{want}\nin:\n{err}");
        }
        assert!(!err.contains("rule plain"), "{err}");
        let (code, _, _) = run_cli(&["check", "--strict", "--config", path]);
        assert_eq!(code, 1, "--strict fails on it");

        // The README's commands, run: no warning.
        upstream_side_routing(&up);
        let (code, out, err) = run_cli(&["check", "--strict", "--config", path]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(!out.contains("routing warning"), "{out}");
    })
}

#[test]
fn in_one_process_too() {
    as_root(|| {
        let s = scenario()
            .head("user = \"root\"")
            .rule(client_rule("t", "0.0.0.0:7000", &format!("{UP4}:9000")))
            .rule(
                udp("u")
                    .listen("0.0.0.0:7001")
                    .netns(["a"])
                    .upstream_in("up", &format!("{UP4}:9001"))
                    .extra("upstream_source = \"client\""),
            )
            .start();
        assert!(children(s.pid()).is_empty(), "no broker");
        let from = free_port(s.ns("a"), CLIENT4);
        let mut c = tcp_from_when_ready(s.ns("a"), from, &format!("{CLIENT4}:7000"));
        assert_eq!(seen_peer(&c), from.to_string());
        echo_once(&mut c, b"one process");
        let u = s.ns("a").udp_bind(&format!("{CLIENT4}:0"));
        let me = u.local_addr().unwrap();
        u.connect(format!("{CLIENT4}:7001")).unwrap();
        let got = udp_round_trip(&u, b"hi").unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), format!("{me} hi"));
    })
}

#[test]
fn split_a_reload_that_adds_the_first_such_rule_fails_its_connections_with_the_reason() {
    as_root(|| {
        let plain = tcp("t")
            .listen("0.0.0.0:7000")
            .netns(["a"])
            .upstream_in("up", &format!("{UP4}:9000"));
        let s = scenario().rule(plain).start();
        let from = free_port(s.ns("a"), CLIENT4);
        let c = tcp_from_when_ready(s.ns("a"), from, &format!("{CLIENT4}:7000"));
        assert_ne!(seen_peer(&c), from.to_string(), "nsproxy's own address");
        drop(c);
        s.write_config(&[client_rule("t", "0.0.0.0:7000", &format!("{UP4}:9000"))]);
        let (code, out, err) = s.cli(&["reload"]);
        assert_eq!(code, 0, "{out}{err}");
        // The binding is replaced (a new kind of upstream socket): the new
        // listener, once there, resets its client with the reason.
        let deadline = Instant::now() + WAIT;
        loop {
            let from = free_port(s.ns("a"), CLIENT4);
            let r = tcp_from(s.ns("a"), from, &format!("{CLIENT4}:7000"))
                .and_then(|mut c| c.read(&mut [0u8; 64]));
            if matches!(&r, Err(e) if e.kind() == io::ErrorKind::ConnectionReset) {
                break;
            }
            assert!(Instant::now() < deadline, "never reset: {r:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        s.wait_log("needs CAP_NET_ADMIN");
        s.wait_log("restart nsproxy after adding the first one");
    })
}
