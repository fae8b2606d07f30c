//! SCTP end to end, on a kernel with SCTP: every SCTP test is in this one
//! binary, because `scripts/test.sh` runs it inside a VM (one boot per
//! binary; see `scripts/sctp-vm.sh`). On a host without SCTP each test prints
//! why it skips; inside the VM (`SCTPVM=1`) nothing may skip.
//!
//! Peers are blocking SCTP sockets in test namespaces, made through
//! nsproxy's own SCTP layer; nsproxy runs as its own process.

// The harness is the VM's own (busybox: no `ip netns`); the root check, the
// rule builder and the scenario fixture are those of every other suite.
#[path = "sctp_vm/harness.rs"]
mod harness;
#[path = "common/root.rs"]
mod root;
#[path = "common/rules.rs"]
mod rules;
#[path = "common/scenario.rs"]
mod scenario;

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use harness::*;
use nsproxy::sctp::{self, SndInfo, Streams, UNORDERED};
use rules::*;
use scenario::*;

/// An SCTP rule with a short connect timeout.
fn rule(name: &str) -> Rule {
    sctp(name).extra("connect_timeout = \"2s\"")
}

/// Client namespace `c`, server namespace `s` and nsproxy's own namespace,
/// with an nsproxy forwarding `127.0.0.1:7000` in the client's to
/// `127.0.0.1:9000` in the server's; `extra` adds keys to its rule.
/// `server_listen` makes the server's listener before nsproxy starts, so it
/// is ready for it.
fn client_to_server(server_listen: impl FnOnce(&Ns) -> io::Result<()>, extra: &str) -> Running {
    let s = Scenario::with(&["c", "s"]);
    server_listen(s.ns("s")).unwrap();
    s.rule(
        rule("sctp")
            .listen("127.0.0.1:7000")
            .netns(["c"])
            .upstream_in("s", "127.0.0.1:9000")
            .extra(extra),
    )
    .start()
}

/// A client association to the proxy of [`client_to_server`].
fn connect(setup: &Running) -> nsproxy::netns::Socket {
    setup.ns("c").sctp_connect("127.0.0.1:7000").unwrap()
}

fn with_echo(ns: &Ns) -> io::Result<()> {
    echo_server(ns.sctp_listen("127.0.0.1:9000"));
    Ok(())
}

/// The layer itself, without nsproxy: stream id, PPID and the unordered flag
/// arrive as sent, the association's streams are as asked, notifications are
/// told apart from data.
#[test]
fn sctp_layer_keeps_stream_ppid_and_flags() {
    as_sctp(|| {
        let ns = Ns::new("raw");
        let l = ns.sctp_listen_with(
            "127.0.0.1:9000",
            Streams {
                outbound: 20,
                max_inbound: 30,
            },
            &[],
        );
        sctp::subscribe(
            &l,
            sctp::Events {
                association: true,
                ..Default::default()
            },
        )
        .unwrap();
        let c = ns
            .sctp_connect_with(
                "127.0.0.1:9000",
                Streams {
                    outbound: 25,
                    max_inbound: 12,
                },
            )
            .unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        // Each direction gets the smaller of what its sender offers and its
        // receiver accepts.
        let st = sctp::status(&c).unwrap();
        assert_eq!((st.outbound_streams, st.inbound_streams), (25, 12));
        let st = sctp::status(&s).unwrap();
        assert_eq!((st.outbound_streams, st.inbound_streams), (12, 25));
        // Stream 30 is beyond the 25 the client has.
        let err = send(&c, b"x", 30, 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");

        send(&c, b"ordered", 24, 0x0102_0304).unwrap();
        send_with(
            &c,
            b"unordered",
            &SndInfo {
                sid: 3,
                flags: UNORDERED,
                ppid: 7,
                ..SndInfo::default()
            },
        )
        .unwrap();
        // The accepted socket saw COMM_UP first (inherited subscription).
        let mut r = sctp::Reassembler::new(4, 1 << 20);
        match r.recv_blocking(&s).unwrap() {
            sctp::Received::Notification(sctp::Notification::AssocChange { state, .. }) => {
                assert_eq!(state, sctp::AssocState::CommUp)
            }
            other => panic!("expected COMM_UP, got {other:?}"),
        }
        // A 4-byte buffer grows: the message arrives whole all the same.
        let m = recv(&s).unwrap().unwrap();
        assert_eq!(
            (
                m.data.as_slice(),
                m.info.sid,
                m.info.ppid,
                m.info.flags & UNORDERED
            ),
            (&b"ordered"[..], 24, 0x0102_0304, 0)
        );
        let m = recv(&s).unwrap().unwrap();
        assert_eq!(
            (
                m.data.as_slice(),
                m.info.sid,
                m.info.ppid,
                m.info.flags & UNORDERED
            ),
            (&b"unordered"[..], 3, 7, UNORDERED)
        );
        let peers = sctp::peer_addrs(&c).unwrap();
        assert_eq!(peers, vec!["127.0.0.1:9000".parse::<SocketAddr>().unwrap()]);
        c.shutdown(Shutdown::Write).unwrap();
        assert!(recv(&s).unwrap().is_none(), "EOF after the peer's SHUTDOWN");
    })
}

/// What one side sent: `count` messages over 10 streams, stream `sid`
/// with PPID `ppid_base + sid`, stream 9 unordered.
fn message(dir: &str, i: usize) -> (Vec<u8>, u16) {
    let sid = (i % 10) as u16;
    let mut data = format!("{dir} stream {sid} message {}|", i / 10).into_bytes();
    // Sizes vary from a few bytes to about 3 KiB.
    data.extend(random_bytes((i * 37) % 3000, i as u64));
    (data, sid)
}

fn send_all(s: &nsproxy::netns::Socket, dir: &str, n: usize, ppid_base: u32) {
    for i in 0..n {
        let (data, sid) = message(dir, i);
        let flags = if sid == 9 { UNORDERED } else { 0 };
        send_with(
            s,
            &data,
            &SndInfo {
                sid,
                flags,
                ppid: ppid_base + u32::from(sid),
                ..SndInfo::default()
            },
        )
        .unwrap_or_else(|e| panic!("{dir}: sending message {i}: {e}"));
    }
}

/// Receives `n` messages and checks each: whole, on its stream, with its
/// PPID and flag, and in order within each ordered stream.
fn check_all(s: &nsproxy::netns::Socket, dir: &str, n: usize, ppid_base: u32) {
    let mut next = [0usize; 10];
    let mut unordered = std::collections::BTreeSet::new();
    for k in 0..n {
        let m = recv(s)
            .unwrap_or_else(|e| panic!("{dir}: receiving message {k}: {e}"))
            .unwrap_or_else(|| panic!("{dir}: end after {k} of {n} messages"));
        let sid = m.info.sid as usize;
        assert!(sid < 10, "{dir}: stream {sid}");
        assert_eq!(
            m.info.ppid,
            ppid_base + sid as u32,
            "{dir}: PPID on stream {sid}"
        );
        let seq = if sid == 9 {
            assert_eq!(m.info.flags & UNORDERED, UNORDERED, "{dir}: unordered flag");
            let head =
                String::from_utf8_lossy(&m.data[..m.data.iter().position(|&b| b == b'|').unwrap()])
                    .into_owned();
            let seq: usize = head.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(
                unordered.insert(seq),
                "{dir}: unordered message {seq} twice"
            );
            seq
        } else {
            assert_eq!(m.info.flags & UNORDERED, 0, "{dir}: ordered stream {sid}");
            let seq = next[sid];
            next[sid] += 1;
            seq
        };
        let (want, _) = message(dir, seq * 10 + sid);
        assert!(
            m.data == want,
            "{dir}: stream {sid} message {seq} differs (in order, whole)"
        );
    }
}

#[test]
fn thousand_messages_over_ten_streams_each_way() {
    as_sctp(|| {
        const N: usize = 1000;
        let (tx, rx) = mpsc::channel();
        let setup = client_to_server(
            |ns| {
                let l = ns.sctp_listen("127.0.0.1:9000");
                std::thread::spawn(move || {
                    let (s, _) = l.accept().unwrap();
                    s.set_read_timeout(Some(WAIT)).unwrap();
                    let w = s.try_clone().unwrap();
                    let sender = std::thread::spawn(move || send_all(&w, "down", N, 200));
                    check_all(&s, "up", N, 100);
                    sender.join().unwrap();
                    // Wait for the client's SHUTDOWN before closing.
                    let _ = tx.send(recv(&s).map(|m| m.is_none()));
                });
                Ok(())
            },
            "",
        );
        let c = connect(&setup);
        let w = c.try_clone().unwrap();
        let sender = std::thread::spawn(move || send_all(&w, "up", N, 100));
        check_all(&c, "down", N, 200);
        sender.join().unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert!(
            rx.recv_timeout(WAIT).unwrap().unwrap(),
            "server saw the end"
        );
        assert!(recv(&c).unwrap().is_none());
        let log = setup.wait_log("association closed");
        assert!(
            log.contains(&format!("\"messages_from_client\":{N}")),
            "{log}"
        );
        assert!(
            log.contains(&format!("\"messages_to_client\":{N}")),
            "{log}"
        );
        assert!(log.contains("both sides shut down"), "{log}");
    })
}

#[test]
fn a_message_larger_than_the_socket_buffer_arrives_whole() {
    as_sctp(|| {
        let setup = client_to_server(with_echo, "");
        let c = connect(&setup);
        let rcvbuf = c.recv_buffer_size().unwrap();
        // Larger than a receive buffer (nsproxy's legs have the same default),
        // so every receiver gets it by partial delivery, and nsproxy must put it
        // together and grow its send buffer. Not much larger: the VM emulates
        // its CPU, and moves only a few MB/s.
        let len = rcvbuf * 3 / 2;
        let big = random_bytes(len, 7);
        let w = c.try_clone().unwrap();
        let sent = big.clone();
        let sender = std::thread::spawn(move || send(&w, &sent, 5, 0xdead_beef));
        let m = recv(&c).unwrap().expect("the echo");
        sender.join().unwrap().unwrap();
        assert_eq!((m.info.sid, m.info.ppid), (5, 0xdead_beef));
        assert_eq!(m.data.len(), len);
        assert!(m.data == big, "content differs");
        assert!(
            m.pieces > 1,
            "{len} bytes (receive buffer {rcvbuf}) arrived in one piece: no partial delivery happened"
        );
    })
}

#[test]
fn sixty_four_kib_messages_both_ways() {
    as_sctp(|| {
        const N: usize = 64;
        let setup = client_to_server(with_echo, "");
        let c = connect(&setup);
        let w = c.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            for i in 0..N {
                send(
                    &w,
                    &random_bytes(64 * 1024, i as u64),
                    (i % 4) as u16,
                    i as u32,
                )
                .unwrap();
            }
        });
        for i in 0..N {
            let m = recv(&c).unwrap().expect("echo");
            // Each stream is ordered; across streams order may differ.
            assert_eq!(m.data.len(), 64 * 1024);
            let i_sent = m.info.ppid as usize;
            assert_eq!(m.info.sid as usize, i_sent % 4, "message {i}");
            assert!(
                m.data == random_bytes(64 * 1024, i_sent as u64),
                "message {i_sent} differs"
            );
        }
        sender.join().unwrap();
    })
}

#[test]
fn a_client_shutdown_reaches_the_server_gracefully() {
    as_sctp(|| {
        let (tx, rx) = mpsc::channel();
        let setup = client_to_server(
            |ns| {
                serve(ns.sctp_listen("127.0.0.1:9000"), move |s| {
                    let mut got = 0;
                    let end = loop {
                        match recv(&s) {
                            Ok(Some(_)) => got += 1,
                            Ok(None) => break "shutdown".to_string(),
                            Err(e) => break format!("error: {e}"),
                        }
                    };
                    let _ = tx.send((got, end));
                });
                Ok(())
            },
            "",
        );
        let c = connect(&setup);
        for i in 0..3 {
            send(&c, b"bye soon", i, 1).unwrap();
        }
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(rx.recv_timeout(WAIT).unwrap(), (3, "shutdown".to_string()));
        assert!(
            recv(&c).unwrap().is_none(),
            "the client's association ends gracefully too"
        );
        let log = setup.wait_log("association closed");
        assert!(log.contains("both sides shut down"), "{log}");
    })
}

#[test]
fn a_server_shutdown_reaches_the_client_gracefully() {
    as_sctp(|| {
        let setup = client_to_server(
            |ns| {
                serve(ns.sctp_listen("127.0.0.1:9000"), |s| {
                    send(&s, b"one", 1, 11).unwrap();
                    send(&s, b"two", 2, 22).unwrap();
                    s.shutdown(Shutdown::Write).unwrap();
                    // Stay until the peer completes the shutdown.
                    while let Ok(Some(_)) = recv(&s) {}
                });
                Ok(())
            },
            "",
        );
        let c = connect(&setup);
        let m = recv(&c).unwrap().unwrap();
        assert_eq!(
            (m.data.as_slice(), m.info.sid, m.info.ppid),
            (&b"one"[..], 1, 11)
        );
        let m = recv(&c).unwrap().unwrap();
        assert_eq!(
            (m.data.as_slice(), m.info.sid, m.info.ppid),
            (&b"two"[..], 2, 22)
        );
        assert!(recv(&c).unwrap().is_none(), "graceful end, not an abort");
        setup.wait_log("both sides shut down");
    })
}

fn is_abort(r: io::Result<Option<Msg>>) -> bool {
    matches!(r, Err(e) if e.raw_os_error() == Some(libc::ECONNRESET))
}

#[test]
fn a_client_abort_aborts_the_server_side() {
    as_sctp(|| {
        let (tx, rx) = mpsc::channel();
        let (got_first, first_arrived) = mpsc::channel();
        let setup = client_to_server(
            |ns| {
                serve(ns.sctp_listen("127.0.0.1:9000"), move |s| {
                    let first = recv(&s).map(|m| m.map(|m| m.data));
                    let _ = got_first.send(());
                    let then = recv(&s);
                    let _ = tx.send((first.ok().flatten(), format!("{then:?}"), is_abort(then)));
                });
                Ok(())
            },
            "",
        );
        let c = connect(&setup);
        send(&c, b"then I abort", 0, 0).unwrap();
        // Once relayed: an abort while nsproxy is still connecting upstream
        // abandons the connect instead (see the test below).
        first_arrived.recv_timeout(WAIT).unwrap();
        c.set_linger(Some(Duration::ZERO)).unwrap();
        drop(c);
        let (first, then, aborted) = rx.recv_timeout(WAIT).unwrap();
        assert_eq!(first.as_deref(), Some(&b"then I abort"[..]));
        assert!(aborted, "the server saw {then}, not an abort");
        let log = setup.wait_log("association closed");
        assert!(log.contains("client aborted"), "{log}");
    })
}

#[test]
fn a_server_abort_aborts_the_client_side() {
    as_sctp(|| {
        let setup = client_to_server(
            |ns| {
                serve(ns.sctp_listen("127.0.0.1:9000"), |s| {
                    let _ = recv(&s);
                    s.set_linger(Some(Duration::ZERO)).unwrap();
                });
                Ok(())
            },
            "",
        );
        let c = connect(&setup);
        send(&c, b"abort me", 0, 0).unwrap();
        let then = recv(&c);
        assert!(
            matches!(&then, Err(e) if e.raw_os_error() == Some(libc::ECONNRESET)),
            "the client saw {:?}, not an abort",
            then.map(|m| m.map(|m| m.data))
        );
        let log = setup.wait_log("association closed");
        assert!(log.contains("upstream aborted"), "{log}");
    })
}

#[test]
fn a_refused_upstream_aborts_the_client_and_others_keep_serving() {
    as_sctp(|| {
        let d = Scenario::with(&["a"])
            .sctp_echo("host", "127.0.0.1:9001")
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
        let a = d.ns("a");
        for round in 1..=3 {
            let started = Instant::now();
            // The proxy can abort the association before the client's connect()
            // has seen it established (a slow guest): connect() then fails with
            // ECONNREFUSED, as it would with nothing listening, so the log must
            // show that the proxy took this association and gave up on it.
            match a.sctp_connect("127.0.0.1:7000") {
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED), "{e}");
                    d.wait_log_count("upstream connect failed", round);
                }
                Ok(c) => assert!(is_abort(recv(&c)), "expected an abort"),
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{:?}",
                started.elapsed()
            );
            let ok = a.sctp_connect("127.0.0.1:7001").unwrap();
            send(&ok, b"alive?", 1, 2).unwrap();
            assert_eq!(recv(&ok).unwrap().unwrap().data, b"alive?");
        }
        let log = d.wait_log("upstream connect failed");
        assert!(log.contains("association refused"), "{log}");
        assert!(log.contains("\"rule\":\"dead\""), "{log}");
    })
}

#[test]
fn at_max_connections_new_associations_wait_until_one_closes() {
    as_sctp(|| {
        let setup = client_to_server(with_echo, "max_connections = 1\n");
        let first = connect(&setup);
        send(&first, b"one", 0, 1).unwrap();
        assert_eq!(recv(&first).unwrap().unwrap().data, b"one");
        let log = setup.wait_log("max_connections");
        assert!(
            log.contains("1 association(s) open, max_connections is 1: not accepting more"),
            "{log}"
        );
        // The kernel sets the second association up in the backlog; nsproxy
        // leaves it there while the first is open.
        let second = connect(&setup);
        send(&second, b"two", 2, 2).unwrap();
        second
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let waited = recv(&second);
        assert!(
            matches!(&waited, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "the second association was served while the first was open: {:?}",
            waited.map(|m| m.map(|m| m.data))
        );
        drop(first);
        second.set_read_timeout(None).unwrap();
        let m = recv(&second).unwrap().unwrap();
        assert_eq!(
            (m.data.as_slice(), m.info.sid, m.info.ppid),
            (&b"two"[..], 2, 2)
        );
        // A third waits while the second is open. Told to stop, nsproxy takes it
        // from the backlog and, the cap being full, aborts it: counted and
        // logged, not lost unseen with the closing listener.
        let third = connect(&setup);
        send(&third, b"three", 3, 3).unwrap();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &setup.pid().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let refused = recv(&third);
        assert!(
            matches!(&refused, Err(e) if e.raw_os_error() == Some(libc::ECONNRESET)),
            "{:?}; log:\n{}",
            refused.map(|m| m.map(|m| m.data)),
            setup.log()
        );
        let log = setup.wait_log(
        "reset 1 association(s) waiting in the listen backlog as the listener closed: max_connections are open",
    );
        assert!(log.contains("\"rule\":\"sctp\""), "{log}");
    })
}

#[test]
fn a_hundred_namespaces_with_a_fixed_thread_count() {
    as_sctp(|| {
        let tags: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
        // Few streams: an association whose ends both offer 65535 streams
        // costs the kernel about 2 MiB per socket, and the VM is small.
        let d = Scenario::new()
            .many("m", 100)
            .sctp_echo("host", "127.0.0.1:9000")
            .rule(
                rule("many")
                    .listen("127.0.0.1:7000")
                    .netns(&tags)
                    .upstream_in("host", "127.0.0.1:9000")
                    .extra("sctp_streams = 16"),
            )
            .start();
        let spaces = d.group("m");
        assert_eq!(spaces.len(), 100);
        let log = d.ready_log();
        assert!(log.contains("ready: 100 of 100 binding(s)"), "{log}");
        // main + 2 workers + the namespace thread
        assert_eq!(d.threads(), 4);
        let conns: Vec<_> = spaces
            .iter()
            .map(|ns| ns.sctp_connect("127.0.0.1:7000").unwrap())
            .collect();
        for (i, c) in conns.iter().enumerate() {
            let msg = format!("namespace {i}");
            send(c, msg.as_bytes(), (i % 7) as u16, i as u32).unwrap();
            let m = recv(c)
                .unwrap_or_else(|e| panic!("namespace {i}: {e}; log:\n{}", d.log()))
                .unwrap();
            assert_eq!(
                (m.data, m.info.sid, m.info.ppid),
                (msg.into_bytes(), (i % 7) as u16, i as u32)
            );
        }
        assert_eq!(d.threads(), 4, "100 open associations add no thread");
    })
}

#[test]
fn ipv6_and_dual_stack() {
    as_sctp(|| {
        let to_b = |name: &str, listen: &str| {
            rule(name)
                .listen(listen)
                .netns(["a"])
                .upstream_in("b", "[::1]:9000")
        };
        let d = Scenario::with(&["a", "b"])
            .sctp_echo("b", "[::1]:9000")
            .rule(to_b("v6", "[::1]:7000"))
            .rule(to_b("dual", "[::]:7001"))
            .start();
        let a = d.ns("a");
        for addr in ["[::1]:7000", "[::1]:7001", "127.0.0.1:7001"] {
            let c = a.sctp_connect(addr).unwrap();
            send(&c, addr.as_bytes(), 4, 6).unwrap();
            let m = recv(&c).unwrap().unwrap();
            assert_eq!(
                (m.data.as_slice(), m.info.sid, m.info.ppid),
                (addr.as_bytes(), 4, 6),
                "{addr}"
            );
        }
        let log = d.wait_log_count("association", 3);
        assert!(
            log.contains("\"peer\":\"127.0.0.1:"),
            "IPv4 client of [::] shown as IPv4: {log}"
        );
    })
}

#[test]
fn multi_homing_binds_and_connects_only_the_given_addresses() {
    as_sctp(|| {
        let s = Scenario::with(&["a", "b"]);
        let (host, a, b) = (s.host(), s.ns("a"), s.ns("b"));
        for addr in ["127.0.0.2/8", "127.0.0.3/8"] {
            a.add_lo_addr(addr);
        }
        for addr in ["127.0.0.4/8", "127.0.0.5/8", "127.0.0.9/8"] {
            host.add_lo_addr(addr);
        }
        for addr in ["127.0.0.6/8", "127.0.0.7/8"] {
            b.add_lo_addr(addr);
        }
        let (tx, rx) = mpsc::channel();
        serve(b.sctp_listen("0.0.0.0:9000"), move |s| {
            let peers = sctp::peer_addrs(&s).unwrap();
            let _ = tx.send(peers);
            while let Ok(Some(m)) = recv(&s) {
                let _ = send_with(&s, &m.data, &SndInfo::relay(&m.info));
            }
        });
        let d = s
            .rule(
                rule("mh")
                    .listen("127.0.0.1:7000")
                    .netns(["a"])
                    .upstream_in("b", "127.0.0.6:9000")
                    .extra("sctp_listen_addrs = [\"127.0.0.2\"]\nsctp_upstream_addrs = [\"127.0.0.7\"]\nsctp_source_addrs = [\"127.0.0.4\", \"127.0.0.5\"]"),
            )
            .start();
        let c = d.ns("a").sctp_connect("127.0.0.2:7000").unwrap();
        send(&c, b"multi", 1, 1).unwrap();
        assert_eq!(recv(&c).unwrap().unwrap().data, b"multi");
        let mut seen = sctp::peer_addrs(&c).unwrap();
        seen.sort();
        let want: Vec<SocketAddr> = vec![
            "127.0.0.1:7000".parse().unwrap(),
            "127.0.0.2:7000".parse().unwrap(),
        ];
        assert_eq!(
            seen, want,
            "the client sees exactly the listener's addresses (not 127.0.0.3)"
        );
        let mut upstream_saw = rx.recv_timeout(WAIT).unwrap();
        upstream_saw.sort();
        let ips: Vec<String> = upstream_saw.iter().map(|a| a.ip().to_string()).collect();
        assert_eq!(
            ips,
            ["127.0.0.4", "127.0.0.5"],
            "the upstream sees exactly sctp_source_addrs (not 127.0.0.1 or .9)"
        );
    })
}

#[test]
fn a_stream_the_upstream_lacks_is_reported_and_others_flow() {
    as_sctp(|| {
        let setup = client_to_server(
            |ns| {
                echo_server(ns.sctp_listen_with(
                    "127.0.0.1:9000",
                    Streams {
                        outbound: 5,
                        max_inbound: 5,
                    },
                    &[],
                ));
                Ok(())
            },
            "",
        );
        let c = connect(&setup);
        send(&c, b"on stream 7", 7, 1).unwrap();
        send(&c, b"on stream 4", 4, 2).unwrap();
        let m = recv(&c).unwrap().unwrap();
        assert_eq!((m.data.as_slice(), m.info.sid), (&b"on stream 4"[..], 4));
        let log = setup.wait_log("on stream 7 dropped");
        assert!(log.contains("has only 5 outbound stream(s)"), "{log}");
        c.shutdown(Shutdown::Write).unwrap();
        let log = setup.wait_log("association closed");
        assert!(log.contains("\"dropped_from_client\":1"), "{log}");
    })
}

#[test]
fn stream_counts_are_configurable() {
    as_sctp(|| {
        let setup = client_to_server(with_echo, "sctp_streams = { in = 40, out = 30 }\n");
        let c = setup.ns("c").sctp_connect("127.0.0.1:7000").unwrap();
        let st = sctp::status(&c).unwrap();
        // The client's outbound streams are capped by nsproxy's inbound 40; its
        // inbound streams are nsproxy's outbound 30.
        assert_eq!((st.outbound_streams, st.inbound_streams), (40, 30));
    })
}

#[test]
fn the_forward_form_and_every_kind_of_namespace_reference() {
    as_sctp(|| {
        let s = Scenario::with(&["n", "p", "i", "r"]).sctp_echo("host", "127.0.0.1:9000");
        let (named, by_path, by_pid, by_proc) = (s.ns("n"), s.ns("p"), s.ns("i"), s.ns("r"));
        // A process living in `by_pid` and `by_proc`, for pid:PID and /proc paths.
        let mut sleepers: Vec<_> = [by_pid, by_proc]
            .iter()
            .map(|ns| {
                ns.command("sleep")
                    .arg("120")
                    .spawn()
                    .expect("sleep in a namespace")
            })
            .collect();
        let spec = format!(
            "sctp:127.0.0.1:7000@{},{},pid:{},/proc/{}/ns/net,host=127.0.0.1:9000",
            named.name(),
            by_path.path().display(),
            sleepers[0].id(),
            sleepers[1].id()
        );
        let d = s.start_command(&["forward", &spec]);
        let log = d.ready_log();
        assert!(log.contains("ready: 5 of 5 binding(s)"), "{log}");
        for ns in [d.ns("n"), d.ns("p"), d.ns("i"), d.ns("r"), d.host()] {
            let c = ns.sctp_connect("127.0.0.1:7000").unwrap();
            send(&c, ns.name().as_bytes(), 2, 3).unwrap();
            assert_eq!(recv(&c).unwrap().unwrap().data, ns.name().as_bytes());
        }
        for s in &mut sleepers {
            let _ = s.kill();
            let _ = s.wait();
        }
    })
}

#[test]
fn idle_timeout_aborts_both_legs_of_a_silent_association() {
    as_sctp(|| {
        let (tx, rx) = mpsc::channel();
        let setup = client_to_server(
            |ns| {
                serve(ns.sctp_listen("127.0.0.1:9000"), move |s| {
                    let first = recv(&s).map(|m| m.map(|m| m.data));
                    // Then silence, until nsproxy ends it.
                    let then = recv(&s);
                    let _ = tx.send((first.ok().flatten(), format!("{then:?}"), is_abort(then)));
                });
                Ok(())
            },
            "idle_timeout = \"1s\"\n",
        );
        let c = connect(&setup);
        send(&c, b"and then nothing", 0, 0).unwrap();
        let started = Instant::now();
        let then = recv(&c);
        assert!(is_abort(then), "the client was not aborted");
        assert!(started.elapsed() >= Duration::from_millis(900));
        let (first, then, aborted) = rx.recv_timeout(WAIT).unwrap();
        assert_eq!(first.as_deref(), Some(&b"and then nothing"[..]));
        assert!(aborted, "the server saw {then}, not an abort");
        let log = setup.wait_log("idle for 1s (idle_timeout)");
        assert!(log.contains("\"bytes_from_client\":16"), "{log}");
    })
}

#[test]
fn shutdown_aborts_associations_that_outlive_the_drain() {
    as_sctp(|| {
        let daemon = Scenario::with(&["c", "s"])
            .sctp_echo("s", "127.0.0.1:9000")
            .head("drain_timeout = \"500ms\"")
            .rule(
                rule("sctp")
                    .listen("127.0.0.1:7000")
                    .netns(["c"])
                    .upstream_in("s", "127.0.0.1:9000"),
            )
            .start();
        let c = daemon.ns("c").sctp_connect("127.0.0.1:7000").unwrap();
        send(&c, b"echo", 0, 0).unwrap();
        assert_eq!(
            recv(&c).unwrap().map(|m| m.data).as_deref(),
            Some(&b"echo"[..])
        );
        let status = daemon.terminate();
        assert!(status.success());
        // Cut by the drain's end: an abort, not a graceful shutdown.
        assert!(is_abort(recv(&c)), "the client was not aborted");
    })
}

#[test]
fn an_upstream_connect_is_abandoned_when_the_client_aborts() {
    as_sctp(|| {
        let s = Scenario::with(&["c", "s"]);
        let server = s.ns("s");
        // 10.96.0.1 is routed to `lo` but is not local: the INIT goes nowhere
        // and the connect hangs (up to connect_timeout). The route's source is
        // a local address of that subnet (SCTP uses no loopback address toward
        // others); a /32, since a wider prefix on `lo` makes it all local.
        server.add_lo_addr("10.96.0.2/32");
        server
            .exec(&[
                "ip",
                "route",
                "add",
                "10.96.0.0/16",
                "dev",
                "lo",
                "src",
                "10.96.0.2",
            ])
            .unwrap();
        let daemon = s
            .rule(
                sctp("hang")
                    .listen("127.0.0.1:7000")
                    .netns(["c"])
                    .upstream_in("s", "10.96.0.1:9000")
                    .extra("connect_timeout = \"60s\""),
            )
            .start();
        let client = daemon.ns("c");
        let fds = || {
            std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
                .map(|d| d.count())
                .unwrap_or(0)
        };
        let before = fds();
        let c = client.sctp_connect("127.0.0.1:7000").unwrap();
        // Aborted only once nsproxy has accepted it and made the upstream
        // socket (two fds more): an association aborted in the backlog is
        // never seen.
        let deadline = Instant::now() + WAIT;
        while fds() < before + 2 {
            assert!(
                Instant::now() < deadline,
                "nsproxy never accepted the association"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        c.set_linger(Some(Duration::ZERO)).unwrap();
        drop(c);
        let started = Instant::now();
        let log = daemon.wait_log("while the upstream connect was under way");
        assert!(started.elapsed() < Duration::from_secs(30), "{log}");
        assert!(log.contains("the client aborted"), "{log}");
        assert!(!log.contains("upstream connect failed"), "{log}");
    })
}

/// A port range of SCTP listeners, below 1024 and multi-homed: each port is
/// a binding of its own, bound by the socket broker at every address (split,
/// the default as root, the relay has no capability to bind them itself).
#[test]
fn a_port_range_listens_on_every_port_at_every_address() {
    as_sctp(|| {
        let s = Scenario::with(&["a", "b"]);
        s.ns("a").add_lo_addr("127.0.0.2/8");
        with_echo(s.ns("b")).unwrap();
        let d = s
            .rule(
                rule("range")
                    .listen("127.0.0.1:1020-1027")
                    .netns(["a"])
                    .upstream_in("b", "127.0.0.1:9000")
                    .extra("sctp_listen_addrs = [\"127.0.0.2\"]"),
            )
            .start();
        let log = d.ready_log();
        assert!(log.contains("ready: 8 of 8 binding(s)"), "{log}");
        let relay = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        let cap_eff = relay
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(str::trim);
        assert_eq!(cap_eff, Some("0000000000000000"), "{relay}");
        for port in 1020..=1027 {
            for ip in ["127.0.0.1", "127.0.0.2"] {
                let addr = format!("{ip}:{port}");
                let c = d.ns("a").sctp_connect_when_ready(&addr);
                send(&c, addr.as_bytes(), 1, 7).unwrap();
                assert_eq!(recv(&c).unwrap().unwrap().data, addr.as_bytes());
            }
        }
    })
}
