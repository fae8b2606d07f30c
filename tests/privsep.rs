//! Least privilege, end to end: started as root, nsproxy runs split — a
//! relay with no capability, `no_new_privs` and a seccomp filter as an
//! unprivileged user, and a socket broker that keeps only CAP_SYS_ADMIN —
//! and each side notices the other's death.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const CAP_NET_BIND_SERVICE: u64 = 1 << 10;
const CAP_SYS_ADMIN: u64 = 1 << 21;

/// The fields of /proc/PID/status (or of one of its tasks).
fn proc_status(path: &str) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn caps(st: &HashMap<String, String>, field: &str) -> u64 {
    u64::from_str_radix(&st[field], 16).unwrap()
}

/// The uid `name` has in /etc/passwd.
fn uid_of(name: &str) -> String {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == name).then(|| f[2].to_owned())
        })
        .unwrap_or_else(|| panic!("no {name} in /etc/passwd"))
}

/// The daemon's one child: its socket broker.
fn broker_of(d: &Daemon) -> u32 {
    let mut found = Vec::new();
    d.wait_until("the broker runs", || {
        found = children(d.pid());
        found.len() == 1
    });
    found[0]
}

fn echo_once(c: &mut TcpStream, msg: &[u8]) {
    c.write_all(msg).unwrap();
    let mut got = vec![0; msg.len()];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

fn a_to_b() -> Rule {
    tcp("t")
        .listen("127.0.0.1:7000")
        .netns(["a"])
        .upstream_in("b", "127.0.0.1:9000")
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for every purpose here.
    let st = proc_status(&format!("/proc/{pid}/status"));
    st.get("State").is_some_and(|s| !s.starts_with('Z'))
}

fn wait_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + WAIT;
    while alive(pid) {
        assert!(Instant::now() < deadline, "{what} (pid {pid}) still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn started_as_root_the_relay_holds_no_privilege_and_the_broker_only_sys_admin() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .tcp_echo("b", "127.0.0.1:9000")
            .rule(a_to_b())
            .start();
        let mut c = s.ns("a").tcp_connect_when_ready("127.0.0.1:7000");
        echo_once(&mut c, b"split");

        let nobody = uid_of("nobody");
        let tasks = std::fs::read_dir(format!("/proc/{}/task", s.pid())).unwrap();
        let mut seen = 0;
        for t in tasks.flatten() {
            let st = proc_status(&format!("{}/status", t.path().display()));
            let name = st["Name"].clone();
            assert_eq!(caps(&st, "CapEff"), 0, "thread {name}: {st:?}");
            assert_eq!(caps(&st, "CapPrm"), 0, "thread {name}");
            assert_eq!(st["NoNewPrivs"], "1", "thread {name}");
            assert_eq!(st["Seccomp"], "2", "thread {name}");
            let uids: Vec<&str> = st["Uid"].split_whitespace().collect();
            assert_eq!(uids, [nobody.as_str(); 4], "thread {name}");
            seen += 1;
        }
        assert!(seen >= 3, "{seen} threads");

        let broker = broker_of(&s);
        let st = proc_status(&format!("/proc/{broker}/status"));
        assert_eq!(st["Name"], "nsproxy-broker", "what ps shows");
        assert_eq!(caps(&st, "CapEff"), CAP_SYS_ADMIN, "{st:?}");
        assert_eq!(caps(&st, "CapPrm"), CAP_SYS_ADMIN);
        assert_eq!(caps(&st, "CapBnd") & !CAP_SYS_ADMIN, 0);
        assert!(s.log().contains("socket broker"), "{}", s.log());
    })
}

#[test]
fn a_port_below_1024_is_bound_by_the_broker() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .tcp_echo("b", "127.0.0.1:9000")
            .rule(a_to_b().listen("127.0.0.1:80"))
            .start();
        let mut c = s.ns("a").tcp_connect_when_ready("127.0.0.1:80");
        echo_once(&mut c, b"low port");
        let st = proc_status(&format!("/proc/{}/status", broker_of(&s)));
        assert_eq!(
            caps(&st, "CapEff"),
            CAP_SYS_ADMIN | CAP_NET_BIND_SERVICE,
            "{st:?}"
        );
        let relay = proc_status(&format!("/proc/{}/status", s.pid()));
        assert_eq!(caps(&relay, "CapEff"), 0);
    })
}

#[test]
fn user_root_keeps_one_privileged_process() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .tcp_echo("b", "127.0.0.1:9000")
            .head("user = \"root\"")
            .rule(a_to_b())
            .start();
        let mut c = s.ns("a").tcp_connect_when_ready("127.0.0.1:7000");
        echo_once(&mut c, b"one process");
        assert!(children(s.pid()).is_empty());
        let st = proc_status(&format!("/proc/{}/status", s.pid()));
        assert_ne!(caps(&st, "CapEff") & CAP_SYS_ADMIN, 0);
        assert_eq!(st["Seccomp"], "0");
        assert!(s.log().contains("less safe"), "{}", s.log());
    })
}

#[test]
fn a_stop_that_signals_the_whole_group_is_orderly() {
    as_root(|| {
        let mut s = Scenario::with(&["a", "b"])
            .tcp_echo("b", "127.0.0.1:9000")
            .rule(a_to_b())
            .start();
        let mut c = s.ns("a").tcp_connect_when_ready("127.0.0.1:7000");
        echo_once(&mut c, b"before");
        let broker = broker_of(&s);
        // As `systemctl stop` (KillMode=control-group) or Ctrl-C do: the
        // broker is signalled too, here first.
        for pid in [broker, s.pid()] {
            let ok = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let (status, log) = s.wait_exit_here();
        assert!(status.success(), "exited {status}:\n{log}");
        assert!(!log.contains("is gone"), "{log}");
        assert!(!log.contains("broker exited"), "{log}");
    })
}

#[test]
fn the_broker_killed_the_relay_drains_and_exits_non_zero() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .tcp_echo("b", "127.0.0.1:9000")
            .head("metrics_listen = \"127.0.0.1:9100\"")
            .rule(a_to_b())
            .args(&["--drain-timeout", "10s"])
            .start();
        let mut c = s.ns("a").tcp_connect_when_ready("127.0.0.1:7000");
        echo_once(&mut c, b"before");
        let probe = |path: &str| {
            let mut m = s.host().tcp_connect("127.0.0.1:9100").unwrap();
            write!(m, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            String::from_utf8(read_all(&mut m).unwrap()).unwrap()
        };
        assert!(probe("/readyz").starts_with("HTTP/1.1 200 "));
        let broker = broker_of(&s);
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &broker.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        s.wait_log("is gone: no new socket can be made");
        // What it has keeps serving while it drains, and says why.
        echo_once(&mut c, b"after");
        let (code, out, _) = s.cli(&["status", "--json"]);
        assert_eq!(code, 0);
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(st["broker"]["alive"], false, "{st}");
        assert_eq!(st["broker"]["pid"], broker, "{st}");
        // Not ready (draining to exit), yet alive: no restart before the drain.
        let deadline = Instant::now() + WAIT;
        while !probe("/readyz").starts_with("HTTP/1.1 503 ") {
            assert!(Instant::now() < deadline, "still ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(probe("/readyz").ends_with("\r\n\r\ndraining\n"));
        assert!(probe("/healthz").starts_with("HTTP/1.1 200 "));
        drop(c);
        let (status, log) = s.wait_exit();
        assert!(!status.success(), "{status:?}\n{log}");
    })
}

#[test]
fn the_relay_killed_the_broker_exits() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .tcp_echo("b", "127.0.0.1:9000")
            .rule(a_to_b())
            .start();
        let broker = broker_of(&s);
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &s.pid().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        wait_gone(broker, "the broker");
    })
}

#[test]
fn another_process_of_the_relays_user_may_not_use_the_control_socket() {
    as_root(|| {
        let s = Scenario::with(&["a", "b"])
            .tcp_echo("b", "127.0.0.1:9000")
            .rule(a_to_b())
            .start();
        // Opened up on purpose, so that only the credentials check stands
        // in the way (the socket is 0600 and its directory root's).
        let sock = s.control_socket().to_owned();
        let dir = std::path::Path::new(&sock).parent().unwrap().to_owned();
        for (p, mode) in [
            (dir.as_path(), "0755"),
            (std::path::Path::new(&sock), "0666"),
        ] {
            let ok = std::process::Command::new("chmod")
                .args([mode, p.to_str().unwrap()])
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let as_nobody = |cmd: &str| {
            std::process::Command::new("setpriv")
                .args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups"])
                .args([bin(), cmd, "--control-socket", &sock])
                .output()
                .unwrap()
        };
        for cmd in ["status", "reload"] {
            let out = as_nobody(cmd);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{cmd} as nobody succeeded");
            assert!(
                err.contains("403") || err.contains("not allowed"),
                "{cmd}: {err}"
            );
        }
        // The operator still can.
        let (code, _, err) = s.cli(&["status"]);
        assert_eq!(code, 0, "{err}");
    })
}

#[test]
fn user_root_serves_udp_and_reloads_as_before() {
    as_root(|| {
        let udp_rule = udp("u")
            .listen("127.0.0.1:7001")
            .netns(["a"])
            .upstream_in("b", "127.0.0.1:9001");
        let s = Scenario::with(&["a", "b"])
            .tcp_echo("b", "127.0.0.1:9000")
            .udp_echo("b", "127.0.0.1:9001")
            .head("user = \"root\"")
            .rule(a_to_b())
            .rule(udp_rule.clone())
            .start();
        let c = s.ns("a").udp_client("127.0.0.1:7001");
        assert_eq!(udp_round_trip(&c, b"as root").unwrap(), b"as root");
        // A reload as a diff: the TCP rule moves port, the UDP one stays.
        s.write_config(&[a_to_b().listen("127.0.0.1:7002"), udp_rule]);
        let (code, out, err) = s.cli(&["reload"]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("1 replaced") && out.contains("1 unchanged"),
            "{out}"
        );
        let mut t = s.ns("a").tcp_connect_when_ready("127.0.0.1:7002");
        echo_once(&mut t, b"moved");
        assert_eq!(udp_round_trip(&c, b"kept").unwrap(), b"kept");
        assert!(children(s.pid()).is_empty());
    })
}

#[test]
fn out_of_fds_the_relay_drops_what_the_broker_sent_and_recovers() {
    as_root(|| {
        // 64 fds for the relay (and the broker it starts): the pool's 32
        // sockets made ahead and a few dozen clients exhaust them, so that
        // fds arrive from the broker while none is free.
        let s = Scenario::with(&["a", "b"])
            .tcp_echo("b", "127.0.0.1:9000")
            .rule(a_to_b().extra("connect_timeout = \"10s\""))
            .wrapper(&["prlimit", "--nofile=64:64", "--"])
            .start();
        let a = s.ns("a");
        let mut first = a.tcp_connect_when_ready("127.0.0.1:7000");
        echo_once(&mut first, b"first");
        let held: Vec<_> = (0..80)
            .filter_map(|_| a.tcp_connect("127.0.0.1:7000").ok())
            .collect();
        let log = s.wait_log("Too many open files");
        assert!(
            log.contains("pausing accepts")
                || log.contains("lost on the way in")
                || log.contains("cannot create upstream sockets"),
            "{log}"
        );
        drop(held);
        drop(first);
        // Served again, with sockets the broker makes from now on (more
        // connections than the pool held): replies still match requests.
        let deadline = Instant::now() + WAIT;
        let mut served = 0;
        while served < 40 {
            match a.tcp_connect("127.0.0.1:7000").and_then(|mut c| {
                c.set_read_timeout(Some(WAIT))?;
                c.write_all(b"back")?;
                let mut buf = [0u8; 4];
                c.read_exact(&mut buf)?;
                Ok(buf)
            }) {
                Ok(buf) => {
                    assert_eq!(&buf, b"back");
                    served += 1;
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("{served} served, then: {e}\n{}", s.log())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        let (code, out, _) = s.cli(&["status", "--json"]);
        assert_eq!(code, 0);
        let st: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(st["broker"]["alive"], true, "{st}");
        assert!(!s.log().contains("panicked"), "{}", s.log());
    })
}
