//! The server's side of operating nsproxy: namespace files that must not be
//! waited on, namespaces nsproxy may not enter, and what a reload changes
//! (its drain timeout, bindings it reopens, which reference names a
//! namespace), with the binary as its own process.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

fn tcp_rule(name: &str, listen: &str, netns: &[&str], upstream_netns: &str) -> String {
    rule_of(
        "tcp",
        name,
        listen,
        netns,
        "127.0.0.1:9000",
        upstream_netns,
        "",
    )
}

/// A FIFO at `dir/name`: opening it for reading blocks until a writer comes.
fn fifo(dir: &TempDir, name: &str) -> PathBuf {
    let path = dir.0.join(name);
    let ok = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .expect("mkfifo");
    assert!(ok.success(), "mkfifo {}", path.display());
    path
}

/// Runs `f` on a thread of its own and waits for it, bounded: a call that
/// hangs fails the test instead of hanging it.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(WAIT)
        .unwrap_or_else(|_| panic!("{what} did not return within {WAIT:?}"))
}

/// `nsproxy status --json` of `d`, answered within the bound.
fn status(d: &Daemon) -> serde_json::Value {
    let socket = d.control_socket().to_owned();
    let (code, out, err) = bounded("nsproxy status", move || {
        run_cli(&["status", "--json", "--control-socket", &socket])
    });
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// The status entry of rule `rule` under reference `netns`.
fn binding(d: &Daemon, rule: &str, netns: &str) -> serde_json::Value {
    let st = status(d);
    st["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["rule"] == rule && b["netns"] == netns)
        .unwrap_or_else(|| panic!("no binding of {rule} in {netns}: {st:#}"))
        .clone()
}

/// `nsproxy reload` of `d`, answered within the bound.
fn reload(d: &Daemon) -> String {
    let socket = d.control_socket().to_owned();
    let (code, out, err) = bounded("nsproxy reload", move || {
        run_cli(&["reload", "--control-socket", &socket])
    });
    assert_eq!(code, 0, "{err}");
    out
}

/// Sends one byte and reads it back.
fn echoes(c: &mut std::net::TcpStream) {
    c.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    c.read_exact(&mut one).unwrap();
    assert_eq!(&one, b"x");
}

/// Runs `nsproxy check --config path` (through `wrapper`) inside `host`,
/// bounded; returns its exit status and stderr.
fn check(host: &TestNs, wrapper: &[&str], path: &Path, strict: bool) -> (ExitStatus, String) {
    let mut args = vec!["check", "--config", path.to_str().unwrap()];
    if strict {
        args.push("--strict");
    }
    Daemon::wrapped(host, wrapper, &args).wait_exit()
}

#[test]
fn check_refuses_a_fifo_named_as_a_namespace_without_waiting_on_it() {
    if !root_or_skip("check_refuses_a_fifo_named_as_a_namespace_without_waiting_on_it") {
        return;
    }
    let host = TestNs::new("h");
    let dir = TempDir::new();
    let pipe = fifo(&dir, "not-a-namespace");
    let cfg = dir.file(
        "nsproxy.toml",
        &config(&tcp_rule(
            "f",
            "127.0.0.1:7000",
            &[pipe.to_str().unwrap()],
            "host",
        )),
    );
    let (status, err) = check(&host, &[], &cfg, true);
    assert!(!status.success(), "--strict fails it: {err}");
    assert!(
        err.contains(pipe.to_str().unwrap()) && err.contains("is a FIFO"),
        "names the path and what it is: {err}"
    );
    let (status, err) = check(&host, &[], &cfg, false);
    assert!(status.success(), "a warning without --strict: {err}");
    assert!(err.contains("is a FIFO"), "{err}");
}

#[test]
fn a_fifo_namespace_fails_its_binding_and_the_rest_serve_and_stop() {
    if !root_or_skip("a_fifo_namespace_fails_its_binding_and_the_rest_serve_and_stop") {
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("a"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    let dir = TempDir::new();
    let pipe = fifo(&dir, "ns");
    let pipe = pipe.to_str().unwrap();
    let rules = format!(
        "{}{}",
        tcp_rule("fifo", "127.0.0.1:7001", &[pipe], "host"),
        tcp_rule("good", "127.0.0.1:7000", &[a.name()], "host")
    );
    let d = Daemon::run(&host, &config(&rules), &[]);
    let log = d.wait_ready();
    assert!(log.contains("ready: 1 of 2 binding(s) listening"), "{log}");
    echoes(&mut a.tcp_connect_when_ready("127.0.0.1:7000"));
    let failed = binding(&d, "fifo", pipe);
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["reason"].as_str().unwrap().contains("is a FIFO"),
        "{failed}"
    );
    assert!(d.terminate().success());
}

#[test]
fn a_reload_adding_a_fifo_namespace_stalls_neither_status_nor_other_rules() {
    if !root_or_skip("a_reload_adding_a_fifo_namespace_stalls_neither_status_nor_other_rules") {
        return;
    }
    let (host, a, up) = (TestNs::new("h"), TestNs::new("a"), TestNs::new("up"));
    // Cross-namespace: every new connection needs the namespace thread.
    echo_server(up.tcp_listen("127.0.0.1:9000"));
    let good = tcp_rule("good", "127.0.0.1:7000", &[a.name()], up.name());
    let d = Daemon::run(&host, &config(&good), &[]);
    d.wait_ready();
    echoes(&mut a.tcp_connect_when_ready("127.0.0.1:7000"));

    let dir = TempDir::new();
    let pipe = fifo(&dir, "ns");
    let pipe = pipe.to_str().unwrap();
    let added = tcp_rule("fifo", "127.0.0.1:7001", &[pipe], up.name());
    std::fs::write(d.config_path(), config(&format!("{good}{added}"))).unwrap();
    let out = reload(&d);
    assert!(out.starts_with("reloaded: 1 added"), "{out}");
    assert_eq!(binding(&d, "fifo", pipe)["state"], "failed");
    for _ in 0..3 {
        let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
        bounded("a new connection of another rule", move || echoes(&mut c));
    }
    assert!(d.terminate().success());
}

#[test]
fn sigterm_during_a_slow_drain_twice_stops_at_once() {
    if !root_or_skip("sigterm_during_a_slow_drain_twice_stops_at_once") {
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("a"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    let rules = format!(
        "drain_timeout = \"600s\"\n{}",
        tcp_rule("r", "127.0.0.1:7000", &[a.name()], "host")
    );
    let d = Daemon::run(&host, &rules, &[]);
    d.wait_ready();
    let mut open = a.tcp_connect_when_ready("127.0.0.1:7000");
    echoes(&mut open);
    d.signal("TERM");
    d.wait_log("draining 1 connection(s) for up to 600s");
    d.signal("TERM");
    let (status, log) = d.wait_exit();
    assert!(status.success(), "{log}");
    assert!(log.contains("received again"), "{log}");
    // The open connection is cut, and its close line says by what.
    assert!(
        log.contains(
            "connection cut: the shutdown's drain was ended early by a second stop signal"
        ),
        "{log}"
    );
    let mut rest = Vec::new();
    assert!(
        std::io::Read::read_to_end(&mut open, &mut rest).is_err(),
        "a reset, not an end of stream"
    );
}

#[test]
fn a_reload_changing_drain_timeout_drains_with_the_new_one() {
    if !root_or_skip("a_reload_changing_drain_timeout_drains_with_the_new_one") {
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("a"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    let keep = tcp_rule("keep", "127.0.0.1:7001", &[a.name()], "host");
    let gone = tcp_rule("gone", "127.0.0.1:7000", &[a.name()], "host");
    let d = Daemon::run(&host, &format!("drain_timeout = \"1s\"\n{keep}{gone}"), &[]);
    d.wait_ready();
    let mut open = a.tcp_connect_when_ready("127.0.0.1:7000");
    echoes(&mut open);
    // Its serve task started under the old timeout; the reload removes its
    // rule and sets a longer one.
    std::fs::write(d.config_path(), format!("drain_timeout = \"20s\"\n{keep}")).unwrap();
    let out = reload(&d);
    assert!(out.starts_with("reloaded: 0 added, 1 removed"), "{out}");
    let log = d.wait_log("draining 1 connection(s) for up to");
    assert!(
        log.contains("draining 1 connection(s) for up to 20s"),
        "{log}"
    );
    assert!(log.contains("drain_timeout 20s applied"), "{log}");
    // Still served well after the old timeout.
    std::thread::sleep(Duration::from_secs(2));
    echoes(&mut open);
}

#[test]
fn drain_timeout_on_the_command_line_outranks_the_file_at_every_reload() {
    if !root_or_skip("drain_timeout_on_the_command_line_outranks_the_file_at_every_reload") {
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("a"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    let keep = tcp_rule("keep", "127.0.0.1:7001", &[a.name()], "host");
    let d = Daemon::run(&host, &keep, &["--drain-timeout", "1s", "--workers", "2"]);
    d.wait_ready();
    // The file names no drain_timeout nor workers, and the fixture's
    // --control-socket is none of its business: nothing to warn about.
    let out = reload(&d);
    assert!(out.starts_with("reloaded:"), "{out}");
    let log = d.log();
    assert!(!log.contains("in the file is not applied"), "{log}");
    assert!(!log.contains("takes effect at the next restart"), "{log}");
    assert!(!log.contains("take effect at the next restart"), "{log}");
    // A file that asks for other workers is told it does not get them.
    std::fs::write(d.config_path(), format!("workers = 3\n{keep}")).unwrap();
    reload(&d);
    d.wait_log("`workers` = 3 in the file is not applied: --workers on the command line keeps it");
    // It asks for another: said at this reload and the next, and the
    // command line's value stays.
    std::fs::write(d.config_path(), format!("drain_timeout = \"7s\"\n{keep}")).unwrap();
    for n in 1..=2 {
        reload(&d);
        d.wait_log_count(
            "`drain_timeout` 7s in the file is not applied: --drain-timeout on the command line keeps 1s",
            n,
        );
    }
    assert!(!d.log().contains("drain_timeout 7s applied"), "{}", d.log());
}

#[test]
fn without_cap_sys_admin_a_binding_into_another_namespace_fails_with_the_reason() {
    if !root_or_skip("without_cap_sys_admin_a_binding_into_another_namespace_fails_with_the_reason")
    {
        return;
    }
    let (host, up) = (TestNs::new("h"), TestNs::new("up"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    echo_server(up.tcp_listen("127.0.0.1:9000"));
    let dir = TempDir::new();
    let rules = format!(
        "{}{}",
        tcp_rule("local", "127.0.0.1:7000", &["host"], "host"),
        tcp_rule("into", "127.0.0.1:7001", &["host"], up.name())
    );
    let cfg = dir.file("nsproxy.toml", &config(&rules));
    // Root, but without CAP_SYS_ADMIN (setns(2) needs it).
    let unprivileged = [
        "setpriv",
        "--inh-caps=-sys_admin",
        "--bounding-set=-sys_admin",
    ];
    let d = Daemon::wrapped(
        &host,
        &unprivileged,
        &["run", "--config", cfg.to_str().unwrap()],
    );
    let log = d.wait_ready();
    assert!(log.contains("ready: 1 of 2 binding(s) listening"), "{log}");
    let into = binding(&d, "into", "host");
    assert_eq!(into["state"], "failed", "{into}");
    let reason = into["reason"].as_str().unwrap();
    assert!(
        reason.contains(up.name()) && reason.contains("needs CAP_SYS_ADMIN"),
        "{reason}"
    );
    let mut c = host.tcp_connect_when_ready("127.0.0.1:7000");
    echoes(&mut c);
    assert!(host.tcp_connect("127.0.0.1:7001").is_err(), "not listening");
    assert!(d.terminate().success());

    let (status, err) = check(&host, &unprivileged, &cfg, false);
    assert!(status.success(), "{err}");
    assert!(
        err.contains("warning") && err.contains(up.name()) && err.contains("needs CAP_SYS_ADMIN"),
        "{err}"
    );
}

#[test]
fn a_reload_that_opens_a_failed_binding_counts_it_reopened() {
    if !root_or_skip("a_reload_that_opens_a_failed_binding_counts_it_reopened") {
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("a"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    let taken = a.tcp_listen("127.0.0.1:7001");
    let rules = format!(
        "{}{}",
        tcp_rule("free", "127.0.0.1:7000", &[a.name()], "host"),
        tcp_rule("busy", "127.0.0.1:7001", &[a.name()], "host")
    );
    let d = Daemon::run(&host, &config(&rules), &[]);
    let log = d.wait_ready();
    assert!(log.contains("1 failed"), "{log}");
    drop(taken);
    assert_eq!(
        reload(&d),
        "reloaded: 0 added, 0 removed, 0 replaced, 0 updated in place, 1 unchanged, 1 reopened (were not listening)\n"
    );
    echoes(&mut a.tcp_connect_when_ready("127.0.0.1:7001"));
    // Nothing left to reopen.
    assert_eq!(
        reload(&d),
        "reloaded: 0 added, 0 removed, 0 replaced, 0 updated in place, 2 unchanged\n"
    );
}

#[test]
fn the_first_listed_reference_to_a_namespace_names_it() {
    if !root_or_skip("the_first_listed_reference_to_a_namespace_names_it") {
        return;
    }
    let (host, a) = (TestNs::new("h"), TestNs::new("a"));
    echo_server(host.tcp_listen("127.0.0.1:9000"));
    let inside = a.process();
    let pid = format!("pid:{}", inside.pid());
    // Another rule lists the pid reference first, which put it first in
    // the order namespaces were opened in.
    let first = tcp_rule("pid-only", "127.0.0.1:7000", &[&pid], "host");
    let both = tcp_rule("both", "127.0.0.1:7001", &[a.name(), &pid], "host");
    let d = Daemon::run(&host, &config(&format!("{first}{both}")), &[]);
    d.wait_ready();
    assert_eq!(binding(&d, "both", a.name())["state"], "listening");
    let second = binding(&d, "both", &pid);
    assert_eq!(second["state"], "same_namespace", "{second}");
    echoes(&mut a.tcp_connect_when_ready("127.0.0.1:7001"));

    // A reload that lists a name before a reference already listening
    // moves the binding to the name.
    let grown = tcp_rule("pid-only", "127.0.0.1:7000", &[a.name(), &pid], "host");
    std::fs::write(d.config_path(), config(&format!("{grown}{both}"))).unwrap();
    reload(&d);
    let deadline = Instant::now() + WAIT;
    while binding(&d, "pid-only", a.name())["state"] != "listening" {
        assert!(Instant::now() < deadline, "{:#}", status(&d));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(binding(&d, "pid-only", &pid)["state"], "same_namespace");
    echoes(&mut a.tcp_connect_when_ready("127.0.0.1:7000"));
}
