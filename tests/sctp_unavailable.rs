//! A kernel without SCTP: an SCTP rule fails with a clear message, and every
//! other rule serves. Runs on a host whose kernel has no SCTP (the VM that
//! runs `tests/sctp_vm.rs` has it, so this one stays on the host).

mod common;

use common::*;
use nsproxy::netns::{Domain, Protocol, Socket, Type};

fn kernel_has_sctp() -> bool {
    Socket::new(
        Domain::IPV4,
        Type::STREAM,
        Some(Protocol::from(nsproxy::sctp::IPPROTO_SCTP)),
    )
    .is_ok()
}

#[test]
fn an_sctp_rule_fails_clearly_and_a_tcp_rule_serves() {
    as_root(|| {
        if kernel_has_sctp() {
            eprintln!(
                "SKIPPED an_sctp_rule_fails_clearly_and_a_tcp_rule_serves: this kernel has SCTP, and the test needs one without"
            );
            return;
        }
        let (host, a) = (TestNs::new("h"), TestNs::new("a"));
        hello_server(host.tcp_listen("127.0.0.1:9000"), "tcp ok\n");
        let config = format!(
            r#"
[[proxy]]
name = "signalling"
protocol = "sctp"
listen = "[::]:38412"
netns = ["{a}", "host"]
upstream = "127.0.0.1:38412"

[[proxy]]
name = "web"
protocol = "tcp"
listen = "127.0.0.1:7000"
netns = ["{a}"]
upstream = "127.0.0.1:9000"
"#,
            a = a.name()
        );
        let d = Daemon::run(&host, &config, &[]);
        let log = d.wait_ready();
        assert!(log.contains("ready: 1 of 3 binding(s)"), "{log}");
        let failed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("not listening"))
            .collect();
        assert_eq!(failed.len(), 2, "{log}");
        for l in failed {
            assert!(l.contains("\"rule\":\"signalling\""), "{l}");
            assert!(l.contains("SCTP is not available in this kernel"), "{l}");
            assert!(l.contains("modprobe sctp"), "{l}");
        }
        let mut c = a.tcp_connect("127.0.0.1:7000").unwrap();
        assert_eq!(read_all(&mut c).unwrap(), b"tcp ok\n");
        assert!(d.terminate().success());
    })
}
