//! Port ranges end to end: one rule listening on many ports, each port a
//! binding of its own, through real namespaces and real sockets.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

/// A TCP server on each of `ports` in `tag` that answers with its own port.
fn port_servers(mut s: Scenario, tag: &str, ports: std::ops::RangeInclusive<u16>) -> Scenario {
    for p in ports {
        s = s.tcp_serve(tag, &format!("127.0.0.1:{p}"), move |mut c| {
            let _ = c.write_all(format!("{p}\n").as_bytes());
        });
    }
    s
}

fn answer(ns: &TestNs, addr: &str) -> String {
    let mut c = ns
        .tcp_connect(addr)
        .unwrap_or_else(|e| panic!("{addr} in {}: {e}", ns.name()));
    String::from_utf8(read_all(&mut c).unwrap()).unwrap()
}

/// One byte there and back on an echoed connection.
fn echoes(c: &mut TcpStream, b: u8) {
    c.write_all(&[b]).unwrap();
    let mut one = [0u8; 1];
    c.read_exact(&mut one).unwrap();
    assert_eq!(one[0], b);
}

fn status_json(s: &Running) -> serde_json::Value {
    let (code, out, err) = s.cli(&["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn tcp_range_port_to_port() {
    as_root(|| {
        let s = port_servers(Scenario::with(&["a", "up"]), "up", 9000..=9004)
            .rule(
                tcp("media")
                    .listen("[::]:7000-7004")
                    .netns(["a", "host"])
                    .upstream_in("up", "127.0.0.1:9000-9004"),
            )
            .start();
        assert!(
            s.ready_log().contains("10 of 10 binding(s) listening"),
            "{}",
            s.ready_log()
        );
        for ns in [s.ns("a"), s.host()] {
            for p in 0..5 {
                let got = answer(ns, &format!("127.0.0.1:{}", 7000 + p));
                assert_eq!(got, format!("{}\n", 9000 + p), "in {}", ns.name());
            }
        }
        // Each port is a binding of its own in status, under one rule.
        let st = status_json(&s);
        let b = st["bindings"].as_array().unwrap();
        assert_eq!(b.len(), 10);
        assert!(b.iter().all(|b| b["rule"] == "media"));
        let ports: Vec<u64> = b
            .iter()
            .filter(|b| b["netns"] == s.ns("a").name())
            .map(|b| b["port"].as_u64().unwrap())
            .collect();
        assert_eq!(ports, [7000, 7001, 7002, 7003, 7004]);
        assert!(s.terminate().success());
    })
}

#[test]
fn tcp_range_to_one_upstream_port() {
    as_root(|| {
        let s = Scenario::with(&["a"])
            .tcp_hello("host", "127.0.0.1:9000", "one\n")
            .rule(
                tcp("many")
                    .listen("0.0.0.0:7000-7019")
                    .netns(["a"])
                    .upstream("127.0.0.1:9000"),
            )
            .start();
        for p in 7000..=7019 {
            assert_eq!(answer(s.ns("a"), &format!("127.0.0.1:{p}")), "one\n");
        }
        assert!(s.ns("a").tcp_connect("127.0.0.1:7020").is_err());
        assert!(s.terminate().success());
    })
}

#[test]
fn udp_range_port_to_port() {
    as_root(|| {
        let s = Scenario::with(&["a", "up"]);
        for p in 9100..=9103u16 {
            let sock = s.ns("up").udp_bind(&format!("127.0.0.1:{p}"));
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let reply = [&buf[..n], format!(" at {p}").as_bytes()].concat();
                    let _ = sock.send_to(&reply, from);
                }
            });
        }
        let s = s
            .rule(
                udp("dgram")
                    .listen("[::]:5300-5303")
                    .netns(["a"])
                    .upstream_in("up", "127.0.0.1:9100-9103"),
            )
            .start();
        for i in 0..4u16 {
            for to in [
                format!("127.0.0.1:{}", 5300 + i),
                format!("[::1]:{}", 5300 + i),
            ] {
                let c = s.ns("a").udp_client(&to);
                let got = udp_round_trip(&c, b"hi").unwrap();
                assert_eq!(got, format!("hi at {}", 9100 + i).as_bytes(), "{to}");
            }
        }
        assert!(s.terminate().success());
    })
}

#[test]
fn a_port_in_use_fails_alone_and_the_rest_serve() {
    as_root(|| {
        let s = Scenario::with(&["a"]).tcp_echo("host", "127.0.0.1:9000");
        // Someone else holds 7002 in `a` before nsproxy starts.
        let _squatter = s.ns("a").tcp_listen("[::]:7002");
        let s = s
            .rule(
                tcp("web")
                    .listen("[::]:7000-7004")
                    .netns(["a"])
                    .upstream("127.0.0.1:9000"),
            )
            .head("metrics_listen = \"127.0.0.1:9900\"")
            .start();
        for p in [7000, 7001, 7003, 7004] {
            let mut c = s.ns("a").tcp_connect(&format!("127.0.0.1:{p}")).unwrap();
            echoes(&mut c, b'x');
        }
        // The log names the port that failed.
        let log = s.log();
        let failed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("not listening"))
            .collect();
        assert_eq!(failed.len(), 1, "{log}");
        assert!(failed[0].contains("[::]:7002"), "{}", failed[0]);
        // Status: one failed port, four listening.
        let st = status_json(&s);
        let b = st["bindings"].as_array().unwrap();
        let state = |p: u64| {
            b.iter()
                .find(|b| b["port"] == p)
                .map(|b| b["state"].as_str().unwrap().to_owned())
                .unwrap()
        };
        assert_eq!(state(7002), "failed");
        for p in [7000, 7001, 7003, 7004] {
            assert_eq!(state(p), "listening");
        }
        let (_, table, _) = s.cli(&["status"]);
        let row = table.lines().find(|l| l.starts_with("web[7002]")).unwrap();
        assert!(row.contains("failed"), "{table}");
        // Metrics: the port is a label.
        let metrics = s.host().tcp_connect("127.0.0.1:9900").map(|mut c| {
            c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            String::from_utf8(read_all(&mut c).unwrap()).unwrap()
        });
        let metrics = metrics.unwrap();
        assert!(
            metrics.contains(&format!(
                "nsproxy_binding_state{{rule=\"web\",netns=\"{}\",protocol=\"tcp\",port=\"7002\",state=\"failed\"}} 1",
                s.ns("a").name()
            )),
            "{metrics}"
        );
        assert!(s.terminate().success());
    })
}

#[test]
fn reload_widens_and_narrows_a_range_port_by_port() {
    as_root(|| {
        let rule = |ports: &str| {
            tcp("grow")
                .listen(&format!("127.0.0.1:{ports}"))
                .netns(["a"])
                .upstream("127.0.0.1:9000")
        };
        let s = Scenario::with(&["a"])
            .tcp_echo("host", "127.0.0.1:9000")
            .rule(rule("7000-7002"))
            .start();
        let a = s.ns("a");
        let mut established = a.tcp_connect("127.0.0.1:7001").unwrap();
        echoes(&mut established, b'1');
        let before = s.socket_inodes();

        // Widened on both sides: the three ports there keep their sockets.
        s.write_config(&[rule("6998-7004")]);
        let (code, out, err) = s.cli(&["reload"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out,
            "reloaded: 4 added, 0 removed, 0 replaced, 0 updated in place, 3 unchanged\n"
        );
        let after = s.socket_inodes();
        assert!(
            before.iter().all(|i| after.contains(i)),
            "a socket was closed by widening: before {before:?}, after {after:?}"
        );
        echoes(&mut established, b'2');
        for p in 6998..=7004 {
            let mut c = a.tcp_connect_when_ready(&format!("127.0.0.1:{p}"));
            echoes(&mut c, b'w');
        }

        // Narrowed: the ports that go close, the established connection on a
        // kept port lives on.
        let before = s.socket_inodes();
        s.write_config(&[rule("7001-7002")]);
        let (code, out, err) = s.cli(&["reload"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            out,
            "reloaded: 0 added, 5 removed, 0 replaced, 0 updated in place, 2 unchanged\n"
        );
        echoes(&mut established, b'3');
        for p in [6998, 6999, 7000, 7003, 7004] {
            s.wait_until(&format!("port {p} closed"), || {
                a.tcp_connect(&format!("127.0.0.1:{p}")).is_err()
            });
        }
        let mut c = a.tcp_connect("127.0.0.1:7002").unwrap();
        echoes(&mut c, b'n');
        let after = s.socket_inodes();
        assert!(after.len() < before.len(), "{before:?} -> {after:?}");
        assert!(s.terminate().success());
    })
}

#[test]
fn forward_form_takes_ranges() {
    as_root(|| {
        let s = port_servers(Scenario::with(&["a", "up"]), "up", 9000..=9002);
        let spec = format!(
            "tcp:[::]:7000-7002@{}=127.0.0.1:9000-9002@{}",
            s.ns("a").name(),
            s.ns("up").name()
        );
        let s = s.start_command(&["forward", "--workers", "1", &spec]);
        for p in 0..3 {
            let got = answer(s.ns("a"), &format!("[::1]:{}", 7000 + p));
            assert_eq!(got, format!("{}\n", 9000 + p));
        }
        // A bad range is refused at its argument.
        let (code, _, err) = run_cli(&["forward", "tcp:[::]:7000-7001@x=127.0.0.1:9000-9005"]);
        assert_ne!(code, 0, "{err}");
        assert!(
            err.contains("argument 1") && err.contains("same length"),
            "{err}"
        );
    })
}
