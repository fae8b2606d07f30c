//! Live operation: namespaces that come and go, reload, the control API,
//! metrics and systemd notifications, with the binary as its own process.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn tcp_rule(
    name: &str,
    listen: &str,
    netns: &[&str],
    upstream: &str,
    upstream_netns: &str,
) -> String {
    rule_of("tcp", name, listen, netns, upstream, upstream_netns, "")
}

/// Connects and reads the hello line, retrying until served (bounded).
fn hello_when_ready(ns: &TestNs, addr: &str) -> Vec<u8> {
    let mut c = ns.tcp_connect_when_ready(addr);
    read_all(&mut c).unwrap()
}

/// Entries of /proc/PID/fd that are namespace files of inode `ino`, and
/// sockets of `pid` that live in the namespace of `ns_file`.
fn holds_namespace(pid: u32, ns_file: &File) -> Vec<String> {
    let ino = ns_file.metadata().unwrap().ino();
    let mut found = Vec::new();
    // Namespace fds, by what they are (an fd opened through /run/netns/X
    // reads as that path, not as net:[...]).
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(m) = std::fs::metadata(e.path()) {
            let link = std::fs::read_link(e.path()).unwrap_or_default();
            if m.ino() == ino && !link.to_string_lossy().starts_with("socket:") {
                found.push(format!(
                    "fd {} -> {}",
                    e.file_name().to_string_lossy(),
                    link.display()
                ));
            }
        }
    }
    // Sockets, checked by the namespace each belongs to (SIOCGSKNS).
    for (fd, ns) in socket_namespaces(pid) {
        if ns == ino {
            found.push(format!("socket {fd}"));
        }
    }
    found
}

#[test]
fn globs_follow_namespaces_and_deletion_releases_them() {
    if !root_or_skip("globs_follow_namespaces_and_deletion_releases_them") {
        return;
    }
    let host = TestNs::new("h");
    hello_server(host.tcp_listen("127.0.0.1:9000"), "hi\n");
    let first = TestNs::new("globA");
    let pattern = format!("nspt-{}-*-globA*", std::process::id());
    let d = Daemon::run(
        &host,
        &config(&tcp_rule(
            "g",
            "127.0.0.1:7000",
            &[&pattern],
            "127.0.0.1:9000",
            "host",
        )),
        &[],
    );
    d.wait_ready();
    assert_eq!(hello_when_ready(&first, "127.0.0.1:7000"), b"hi\n");

    // A namespace made after start is listening within a second.
    let started = Instant::now();
    let second = TestNs::new("globA2");
    assert_eq!(hello_when_ready(&second, "127.0.0.1:7000"), b"hi\n");
    let took = started.elapsed();
    eprintln!("new namespace served after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // A namespace that does not match is left alone.
    let other = TestNs::new("globB");
    assert!(other.tcp_connect("127.0.0.1:7000").is_err());

    // Deleting it closes the listener and connections and drops the fd,
    // so the kernel can free the namespace.
    let mut open_conn = second.tcp_connect("127.0.0.1:7000").unwrap();
    let pin = File::open(format!("/run/netns/{}", second.name())).unwrap();
    assert!(
        !holds_namespace(d.pid(), &pin).is_empty(),
        "nsproxy should hold it now"
    );
    let deleted = Instant::now();
    drop(second);
    let deadline = deleted + Duration::from_secs(1);
    loop {
        let held = holds_namespace(d.pid(), &pin);
        if held.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still held 1 s after deletion: {held:?}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("namespace released after {:?}", deleted.elapsed());
    // The open connection was closed (default on_netns_delete = "close").
    let mut buf = Vec::new();
    let _ = open_conn.read_to_end(&mut buf);
    assert!(d.log().contains("was deleted"), "{}", d.log());
    // The first one still serves.
    assert_eq!(hello_when_ready(&first, "127.0.0.1:7000"), b"hi\n");
}

#[test]
fn an_exact_name_that_appears_later_is_served() {
    if !root_or_skip("an_exact_name_that_appears_later_is_served") {
        return;
    }
    let host = TestNs::new("h");
    hello_server(host.tcp_listen("127.0.0.1:9000"), "late\n");
    let name = format!("nspt-{}-late-{}", std::process::id(), line!());
    let d = Daemon::run(
        &host,
        &config(&tcp_rule(
            "late",
            "127.0.0.1:7000",
            &[&name],
            "127.0.0.1:9000",
            "host",
        )),
        &[],
    );
    let log = d.wait_ready();
    assert!(
        log.contains("0 of 1 binding(s) listening, 1 waiting"),
        "{log}"
    );
    let (_, out, _) = d.cli(&["status", "--json"]);
    assert!(out.contains("\"state\": \"waiting\""), "{out}");
    // Made by hand under the name the config expects.
    let status = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap();
    assert!(status.success());
    let guard = NamedNs(name.clone());
    let started = Instant::now();
    let ns = TestNs::adopt(&guard.0);
    let _ = Command::new("ip")
        .args(["-n", &name, "link", "set", "lo", "up"])
        .status();
    assert_eq!(hello_when_ready(&ns, "127.0.0.1:7000"), b"late\n");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

/// Removes a namespace made by hand in a test.
struct NamedNs(String);
impl Drop for NamedNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn reload_applies_the_difference_and_rejects_bad_configs() {
    if !root_or_skip("reload_applies_the_difference_and_rejects_bad_configs") {
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("a"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    let keep = tcp_rule(
        "keep",
        "127.0.0.1:7000",
        &[a.name()],
        "127.0.0.1:9000",
        "host",
    );
    let gone = tcp_rule(
        "gone",
        "127.0.0.1:7001",
        &[a.name()],
        "127.0.0.1:9000",
        "host",
    );
    let new = tcp_rule(
        "new",
        "127.0.0.1:7002",
        &[a.name()],
        "127.0.0.1:9000",
        "host",
    );
    let d = Daemon::run(&host, &config(&format!("{keep}{gone}")), &[]);
    d.wait_ready();

    // An established connection on the kept rule.
    let mut established = a.tcp_connect("127.0.0.1:7000").unwrap();
    established.write_all(b"1").unwrap();
    let mut one = [0u8; 1];
    established.read_exact(&mut one).unwrap();

    // A bad config is rejected and the old one keeps serving.
    std::fs::write(d.config_path(), "workers = 2\n[[proxy]]\nname = \"x\"\n").unwrap();
    let (code, _, err) = d.cli(&["reload"]);
    assert_eq!(code, 1);
    assert!(err.contains("missing required key `protocol`"), "{err}");
    assert!(a.tcp_connect("127.0.0.1:7001").is_ok());

    // Connections to the kept rule all through the reload.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, a_name) = (stop.clone(), a.name().to_owned());
    let stream = std::thread::spawn(move || {
        let a = TestNs::adopt(&a_name);
        let mut made = 0;
        let deadline = Instant::now() + WAIT;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            let mut c = a
                .tcp_connect("127.0.0.1:7000")
                .expect("no refused connection during reload");
            c.write_all(b"x").unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).expect("served during reload");
            made += 1;
        }
        made
    });
    std::fs::write(d.config_path(), config(&format!("{keep}{new}"))).unwrap();
    d.signal("HUP");
    d.wait_log("config reloaded");
    let (code, out, err) = d.cli(&["reload"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "reloaded: 0 added, 0 removed, 0 replaced, 0 updated in place, 2 unchanged\n"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let made = stream.join().unwrap();
    assert!(made > 0);
    let log = d.log();
    assert!(
        log.contains("\"added\":1,\"removed\":1,\"replaced\":0,\"retuned\":0,\"unchanged\":1"),
        "{log}"
    );

    // Removed closes, added opens, the established connection lives on.
    assert!(a.tcp_connect("127.0.0.1:7001").is_err());
    let mut c = a.tcp_connect_when_ready("127.0.0.1:7002");
    c.write_all(b"n").unwrap();
    c.read_exact(&mut one).unwrap();
    established.write_all(b"2").unwrap();
    established.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"2");
}

#[test]
fn adding_a_namespace_to_a_rule_keeps_its_other_listeners() {
    if !root_or_skip("adding_a_namespace_to_a_rule_keeps_its_other_listeners") {
        return;
    }
    let (host, a, b) = (TestNs::new("h"), TestNs::new("a"), TestNs::new("b"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    let rule = |netns: &[&str]| tcp_rule("grow", "127.0.0.1:7000", netns, "127.0.0.1:9000", "host");
    let d = Daemon::run(&host, &config(&rule(&[a.name()])), &[]);
    d.wait_ready();
    // The listener in `a` must be the same socket after the reload: every
    // socket open before it is still open after it.
    let sockets_before = d.socket_inodes();
    std::fs::write(d.config_path(), config(&rule(&[a.name(), b.name()]))).unwrap();
    let (code, out, err) = d.cli(&["reload"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out, "reloaded: 1 added, 0 removed, 0 replaced, 0 updated in place, 1 unchanged\n",
        "the namespace already listened in must keep its listener"
    );
    let sockets_after = d.socket_inodes();
    assert!(
        sockets_before.iter().all(|s| sockets_after.contains(s)),
        "a socket was closed by the reload: before {sockets_before:?}, after {sockets_after:?}"
    );
    for ns in [&a, &b] {
        let mut c = ns.tcp_connect_when_ready("127.0.0.1:7000");
        c.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        c.read_exact(&mut one).unwrap();
    }
    assert!(d.terminate().success());
}

#[test]
fn a_listen_address_configured_later_is_served() {
    if !root_or_skip("a_listen_address_configured_later_is_served") {
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("a"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    let d = Daemon::run(
        &host,
        &config(&tcp_rule(
            "later",
            "10.253.0.9:7000",
            &[a.name()],
            "127.0.0.1:9000",
            "host",
        )),
        &[],
    );
    d.wait_ready();
    // Namespaces often get their addresses after they appear: the binding
    // waits (and says why) instead of failing for good.
    let (code, out, err) = d.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    let line = out.lines().find(|l| l.contains(a.name())).unwrap();
    assert!(
        line.contains("waiting") && line.contains("retrying until the address is configured"),
        "{out}"
    );
    a.add_lo_addr("10.253.0.9/32");
    let mut c = a.tcp_connect_when_ready("10.253.0.9:7000");
    c.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    c.read_exact(&mut one).unwrap();
    let log = d.log();
    assert_eq!(
        log.matches("retrying until the address is configured\"")
            .count(),
        1,
        "one warning, not one per retry: {log}"
    );
    assert!(d.terminate().success());
}

#[test]
fn status_cli_and_its_errors() {
    if !root_or_skip("status_cli_and_its_errors") {
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("a"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    let d = Daemon::run(
        &host,
        &config(&tcp_rule(
            "web",
            "127.0.0.1:7000",
            &[a.name(), "nspt-absent"],
            "127.0.0.1:9000",
            "host",
        )),
        &[],
    );
    d.wait_ready();
    let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
    c.write_all(b"abc").unwrap();
    let mut buf = [0u8; 3];
    c.read_exact(&mut buf).unwrap();

    let mode = std::fs::metadata(d.control_socket()).unwrap().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (code, out, err) = d.cli(&["status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("RULE") && out.contains("STATE"), "{out}");
    let line = out.lines().find(|l| l.contains(a.name())).unwrap();
    assert!(
        line.contains("listening") && line.contains("127.0.0.1:7000") && line.contains(" 1 "),
        "{out}"
    );
    let waiting = out.lines().find(|l| l.contains("nspt-absent")).unwrap();
    assert!(
        waiting.contains("waiting: namespace \"nspt-absent\" not found"),
        "{out}"
    );

    let (code, out, _) = d.cli(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let b = &v["bindings"][0];
    assert_eq!(b["rule"], "web");
    assert_eq!(b["counters"]["connections_active"], 1);
    assert_eq!(b["counters"]["connections_accepted"], 1);

    // A reader that stops early (`nsproxy status | head -1`) ends nothing
    // badly: no panic, exit 0.
    for args in [&["status"][..], &["status", "--json"]] {
        let mut child = std::process::Command::new(bin())
            .args(args)
            .args(["--control-socket", d.control_socket()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && err.is_empty(), "{args:?}: {err}");
    }

    let (code, _, err) = run_cli(&["status", "--control-socket", "/nonexistent/nsproxy.sock"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("nsproxy is not running (no control socket at /nonexistent/nsproxy.sock)"),
        "{err}"
    );
    // A second daemon refuses to take over a live control socket.
    let d2 = Daemon::run(
        &host,
        &config(&tcp_rule(
            "web",
            "127.0.0.1:7005",
            &[a.name()],
            "127.0.0.1:9000",
            "host",
        )),
        &["--control-socket", d.control_socket()],
    );
    let log = d2.wait_ready();
    assert!(
        log.contains(&format!(
            "another nsproxy is already running with control socket {}",
            d.control_socket()
        )),
        "{log}"
    );
}

#[test]
fn metrics_pass_promtool() {
    if !root_or_skip("metrics_pass_promtool") {
        return;
    }
    let promtool = Command::new("promtool").arg("--version").output().is_ok();
    if !promtool {
        if std::env::var("NSPROXY_REQUIRE_ROOT").as_deref() == Ok("1") {
            panic!("promtool is missing (apt-get install prometheus); CI must validate metrics");
        }
        eprintln!("SKIPPED metrics_pass_promtool: promtool not installed");
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("a"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    let d = Daemon::run(
        &host,
        &config(&format!(
            "metrics_listen = \"127.0.0.1:9100\"\n{}",
            tcp_rule(
                "m",
                "127.0.0.1:7000",
                &[a.name(), "nspt-absent"],
                "127.0.0.1:9000",
                "host"
            )
        )),
        &[],
    );
    d.wait_ready();
    let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
    c.write_all(b"12345").unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).unwrap();
    drop(c);
    // The metrics endpoint is in nsproxy's own (home) namespace.
    let scrape = || {
        let mut m = host.tcp_connect("127.0.0.1:9100").unwrap();
        m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let text = String::from_utf8(read_all(&mut m).unwrap()).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_owned()
    };
    let mut body = scrape();
    let deadline = Instant::now() + WAIT;
    while !body.contains(&format!(
        "nsproxy_bytes_in_total{{rule=\"m\",netns=\"{}\",protocol=\"tcp\"}} 5",
        a.name()
    )) {
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(20));
        body = scrape();
    }
    assert!(body.contains(&format!(
        "nsproxy_connections_accepted_total{{rule=\"m\",netns=\"{}\",protocol=\"tcp\"}} 1",
        a.name()
    )));
    assert!(body.contains("nsproxy_binding_state{rule=\"m\",netns=\"nspt-absent\",protocol=\"tcp\",state=\"waiting\"} 1"), "{body}");
    assert!(body.contains("nsproxy_namespaces_known "));
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_hears_ready_reloading_and_stopping() {
    if !root_or_skip("systemd_hears_ready_reloading_and_stopping") {
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("a"));
    let dir = TempDir::new();
    let sock_path = dir.0.join("notify.sock");
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify.set_read_timeout(Some(WAIT)).unwrap();
    let cfg = config(&tcp_rule(
        "s",
        "127.0.0.1:7000",
        &[a.name()],
        "127.0.0.1:9000",
        "host",
    ));
    let d = Daemon::run_env(
        &host,
        &cfg,
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    d.signal("HUP");
    assert!(next().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert_eq!(next(), "READY=1");
    d.signal("TERM");
    assert_eq!(next(), "STOPPING=1");
    let (status, _) = d.wait_exit();
    assert!(status.success());
}

#[test]
fn drain_policy_keeps_open_connections_after_deletion() {
    if !root_or_skip("drain_policy_keeps_open_connections_after_deletion") {
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("drain"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    let rule = tcp_rule("d", "127.0.0.1:7000", &[a.name()], "127.0.0.1:9000", "host");
    let d = Daemon::run(
        &host,
        &config(&format!(
            "drain_timeout = \"30s\"\n{rule}on_netns_delete = \"drain\"\n"
        )),
        &[],
    );
    d.wait_ready();
    let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
    let pin = File::open(format!("/run/netns/{}", a.name())).unwrap();
    drop(a);
    d.wait_log("open connections drain: namespace");
    // The listener is gone, the connection still relays.
    c.write_all(b"still").unwrap();
    let mut buf = [0u8; 5];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still");
    let held = holds_namespace(d.pid(), &pin);
    // Only the relayed connection's socket: not the listener, not the fd.
    assert_eq!(held.len(), 1, "only the connection may hold it: {held:?}");
    assert!(held[0].starts_with("socket"), "{held:?}");
    // Once the client is done, nothing holds the namespace any more.
    drop(c);
    d.wait_until("namespace released after the connection ended", || {
        holds_namespace(d.pid(), &pin).is_empty()
    });
}

#[test]
fn udp_sessions_close_when_their_namespace_is_deleted() {
    if !root_or_skip("udp_sessions_close_when_their_namespace_is_deleted") {
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("udpdel"));
    udp_echo_server(host.udp_bind("127.0.0.1:9000"));
    let d = Daemon::run(
        &host,
        &config(&format!(
            "[[proxy]]\nname = \"u\"\nprotocol = \"udp\"\nlisten = \"127.0.0.1:7000\"\nnetns = [\"{}\"]\nupstream = \"127.0.0.1:9000\"\n",
            a.name()
        )),
        &[],
    );
    d.wait_ready();
    let clients: Vec<_> = (0..20).map(|_| a.udp_client("127.0.0.1:7000")).collect();
    for c in &clients {
        assert_eq!(udp_round_trip(c, b"ping").unwrap(), b"ping");
    }
    let fds_with_sessions = d.fds();
    let pin = File::open(format!("/run/netns/{}", a.name())).unwrap();
    drop(a);
    d.wait_until("namespace released", || {
        holds_namespace(d.pid(), &pin).is_empty()
    });
    // The 20 session sockets (in the host namespace) closed too.
    d.wait_until("session sockets closed", || {
        d.fds() + 20 <= fds_with_sessions
    });
}

#[test]
fn deleting_the_upstream_namespace_releases_it_and_its_socket_pool() {
    if !root_or_skip("deleting_the_upstream_namespace_releases_it_and_its_socket_pool") {
        return;
    }
    let (host, a, up) = (TestNs::new("h"), TestNs::new("a"), TestNs::new("up"));
    echo_server(up.tcp_listen("127.0.0.1:9000"));
    let d = Daemon::run(
        &host,
        &config(&tcp_rule(
            "u",
            "127.0.0.1:7000",
            &[a.name()],
            "127.0.0.1:9000",
            up.name(),
        )),
        &[],
    );
    d.wait_ready();
    // A few connections fill the pool of upstream sockets made ahead in `up`.
    for _ in 0..3 {
        let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
        c.write_all(b"p").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
    }
    let pin = File::open(format!("/run/netns/{}", up.name())).unwrap();
    d.wait_until("pool filled", || holds_namespace(d.pid(), &pin).len() > 3);
    drop(up);
    d.wait_until("upstream namespace released", || {
        holds_namespace(d.pid(), &pin).is_empty()
    });
    d.wait_log("upstream namespace");
    // The rule waits for its upstream namespace now.
    let (_, out, _) = d.cli(&["status", "--json"]);
    assert!(out.contains("\"state\": \"waiting\""), "{out}");
}
