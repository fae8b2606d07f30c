//! The library API used directly, without the binary.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use nsproxy::config::parse_toml;
use nsproxy::lifecycle::{Options, Server};
use nsproxy::netns::{NsError, NsRef, SocketSpec, Switcher};

#[test]
fn references_to_one_namespace_are_one_identity() {
    if !root_or_skip("references_to_one_namespace_are_one_identity") {
        return;
    }
    let ns = TestNs::new("ident");
    let sw = Switcher::spawn().unwrap();
    let by_name = sw.resolve_blocking(&ns.reference()).unwrap();
    let by_path = sw
        .resolve_blocking(&NsRef::Path(format!("/run/netns/{}", ns.name()).into()))
        .unwrap();
    assert_eq!(by_name, by_path);
    let own_pid = NsRef::Pid(std::process::id());
    assert_eq!(sw.resolve_blocking(&own_pid).unwrap(), sw.home());
    assert_eq!(sw.resolve_blocking(&NsRef::Host).unwrap(), sw.home());
    assert_ne!(by_name, sw.home());
}

#[test]
fn many_references_resolve_together_in_order() {
    if !root_or_skip("many_references_resolve_together_in_order") {
        return;
    }
    let (a, b) = (TestNs::new("many-a"), TestNs::new("many-b"));
    let sw = Switcher::spawn().unwrap();
    let missing = NsRef::Named(format!("{}-missing", a.name()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let got = rt.block_on(sw.resolve_many(&[b.reference(), NsRef::Host, missing, a.reference()]));
    assert_eq!(got.len(), 4);
    assert_eq!(
        got[0].as_ref().unwrap(),
        &sw.resolve_blocking(&b.reference()).unwrap()
    );
    assert_eq!(got[1].as_ref().unwrap(), &sw.home());
    assert!(
        matches!(got[2], Err(NsError::NotFound { .. })),
        "{:?}",
        got[2]
    );
    assert_eq!(
        got[3].as_ref().unwrap(),
        &sw.resolve_blocking(&a.reference()).unwrap()
    );
}

#[test]
fn non_namespace_files_are_refused_clearly() {
    let sw = Switcher::spawn().unwrap();
    let err = sw
        .resolve_blocking(&NsRef::Path("/etc/hostname".into()))
        .unwrap_err();
    assert!(matches!(err, NsError::NotNsfs { .. }), "{err}");
    assert!(
        err.to_string()
            .starts_with("\"/etc/hostname\" is not a network namespace: /etc/hostname is on "),
        "{err}"
    );
    let err = sw
        .resolve_blocking(&NsRef::Path("/proc/self/ns/mnt".into()))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "\"/proc/self/ns/mnt\" is a mount namespace (/proc/self/ns/mnt), not a network namespace"
    );
    let err = sw.resolve_blocking(&NsRef::Pid(u32::MAX - 1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "namespace \"pid:{0}\" not found: /proc/{0}/ns/net does not exist (is process {0} running?)",
            u32::MAX - 1
        )
    );
}

#[test]
fn sockets_are_born_in_the_namespace_asked_for() {
    if !root_or_skip("sockets_are_born_in_the_namespace_asked_for") {
        return;
    }
    let (a, b) = (TestNs::new("a"), TestNs::new("b"));
    let sw = Switcher::spawn().unwrap();
    let (ia, ib) = (
        sw.resolve_blocking(&a.reference()).unwrap(),
        sw.resolve_blocking(&b.reference()).unwrap(),
    );
    let addr = "127.0.0.1:7000".parse().unwrap();
    // The same address bound in two namespaces, from one process: only
    // possible if each socket lives in its own namespace.
    let la = sw.socket_blocking(ia, SocketSpec::tcp(&addr)).unwrap();
    let lb = sw.socket_blocking(ib, SocketSpec::tcp(&addr)).unwrap();
    for l in [&la, &lb] {
        l.bind(&addr.into()).unwrap();
        l.listen(8).unwrap();
    }
    // A's listener answers in A; the test process's own namespace has none.
    assert!(a.tcp_connect("127.0.0.1:7000").is_ok());
    assert!(b.tcp_connect("127.0.0.1:7000").is_ok());
    assert!(std::net::TcpStream::connect("127.0.0.1:7000").is_err());
    drop(la);
    // Polled, not asserted at once: a child that another test is spawning
    // (`ip netns add`) holds a copy of every fd between its fork and exec,
    // so the listener may outlive this close by a moment.
    let deadline = Instant::now() + WAIT;
    while a.tcp_connect("127.0.0.1:7000").is_ok() {
        assert!(
            Instant::now() < deadline,
            "A's listener still answers after close"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(b.tcp_connect("127.0.0.1:7000").is_ok());
}

#[test]
fn server_api_reports_every_binding_and_counts_traffic() {
    if !root_or_skip("server_api_reports_every_binding_and_counts_traffic") {
        return;
    }
    let (a, b) = (TestNs::new("a"), TestNs::new("b"));
    echo_server(b.tcp_listen("127.0.0.1:9000"));
    let cfg = format!(
        "[[proxy]]\nname = \"lib\"\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:0\"\nnetns = [\"{a}\", \"/run/netns/{a}\", \"nspt-none\"]\nupstream = \"127.0.0.1:9000\"\nupstream_netns = \"{b}\"\n",
        a = a.name(),
        b = b.name()
    );
    let config = parse_toml(&cfg, "inline").unwrap();
    let rt = nsproxy::runtime::build(1).unwrap();
    rt.block_on(async {
        let server = Server::start(config, Switcher::spawn().unwrap(), Options::default()).await;
        let st = server.status().await;
        let states: Vec<(&str, &str, Option<&str>)> = st
            .bindings
            .iter()
            .map(|b| (b.netns.as_str(), b.state.as_str(), b.reason.as_deref()))
            .collect();
        let by_path = format!("/run/netns/{}", a.name());
        let listening = st
            .bindings
            .iter()
            .find(|b| b.state == "listening")
            .expect("one listens");
        let local: std::net::SocketAddr = listening.local.as_ref().unwrap().parse().unwrap();
        assert_ne!(local.port(), 0, "the real port is reported");
        // The two references to one namespace listen once, under whichever
        // came first in the config.
        assert!(
            states.contains(&(a.name(), "listening", None)),
            "{states:?}"
        );
        assert!(
            states.iter().any(|(n, s, r)| *n == by_path
                && *s == "same_namespace"
                && r.unwrap().contains(a.name())),
            "{states:?}"
        );
        assert!(
            states.iter().any(|(n, s, r)| *n == "nspt-none"
                && *s == "waiting"
                && r.unwrap().starts_with("namespace \"nspt-none\" not found")),
            "{states:?}"
        );

        let addr = local.to_string();
        let payload = random_bytes(100_000, 7);
        // Blocking client work runs on its own thread; the server's tasks
        // run on the runtime's worker meanwhile.
        let echoed = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut c = a.tcp_connect(&addr).unwrap();
                    let mut w = c.try_clone().unwrap();
                    let payload = &payload;
                    let sender = scope.spawn(move || {
                        w.write_all(payload).unwrap();
                        w.shutdown(std::net::Shutdown::Write).unwrap();
                    });
                    let got = read_all(&mut c).unwrap();
                    sender.join().unwrap();
                    got
                })
                .join()
                .unwrap()
        });
        assert_eq!(checksum(&echoed), checksum(&payload));
        // Counters are added as connections close; poll briefly.
        let mut counters = Default::default();
        for _ in 0..200 {
            let st = server.status().await;
            counters = st
                .bindings
                .iter()
                .find(|b| b.state == "listening")
                .unwrap()
                .counters
                .clone();
            if counters.bytes_out == payload.len() as u64 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let c: nsproxy::status::Counters = counters;
        assert_eq!(c.connections_accepted, 1);
        assert_eq!(c.bytes_in, payload.len() as u64);
        assert_eq!(c.bytes_out, payload.len() as u64);
        assert_eq!(c.connections_active, 0);
        server.shutdown().await;
    });
}

/// Polls `server`'s status until every listening binding's `parked` is
/// `want` (bounded by [`WAIT`]).
async fn wait_parked(server: &Server, want: bool, when: &str) -> nsproxy::status::Status {
    let deadline = Instant::now() + WAIT;
    loop {
        let st = server.status().await;
        let listening: Vec<_> = st
            .bindings
            .iter()
            .filter(|b| b.state == "listening")
            .collect();
        assert!(!listening.is_empty(), "{when}: nothing listens: {st:?}");
        if listening.iter().all(|b| b.parked == want) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: listeners not parked={want} after {WAIT:?}: {:?}",
            st.bindings
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn idle_listeners_park_and_wake_for_the_next_client() {
    if !root_or_skip("idle_listeners_park_and_wake_for_the_next_client") {
        return;
    }
    let (a, b) = (TestNs::new("pk-a"), TestNs::new("pk-b"));
    echo_server(b.tcp_listen("127.0.0.1:9000"));
    udp_echo_server(b.udp_bind("127.0.0.1:9001"));
    let rules = [
        rule_of(
            "tcp",
            "t",
            "127.0.0.1:0",
            &[a.name()],
            "127.0.0.1:9000",
            b.name(),
            "",
        ),
        rule_of(
            "udp",
            "u",
            "127.0.0.1:0",
            &[a.name()],
            "127.0.0.1:9001",
            b.name(),
            "udp_idle_timeout = \"200ms\"",
        ),
    ];
    let cfg = parse_toml(&config(&rules.concat()), "inline").unwrap();
    let rt = nsproxy::runtime::build(2).unwrap();
    rt.block_on(async {
        let options = Options {
            park_after: Duration::from_millis(100),
            ..Options::default()
        };
        let server = Server::start(cfg, Switcher::spawn().unwrap(), options).await;
        // Parked from the start: no client has come yet.
        let st = wait_parked(&server, true, "at start").await;
        let local = |rule: &str| -> String {
            st.bindings
                .iter()
                .find(|b| b.rule == rule)
                .and_then(|b| b.local.clone())
                .unwrap()
        };
        let (tcp, udp) = (local("t"), local("u"));
        for round in 0..3u8 {
            // A client wakes each listener; they serve, then park again.
            let msg = format!("round {round}");
            // Blocking clients on their own thread; the server's tasks run
            // on the runtime's workers meanwhile.
            std::thread::scope(|s| {
                s.spawn(|| {
                    let mut c = a.tcp_connect(&tcp).unwrap();
                    c.write_all(msg.as_bytes()).unwrap();
                    c.shutdown(std::net::Shutdown::Write).unwrap();
                    assert_eq!(
                        read_all(&mut c).unwrap(),
                        msg.as_bytes(),
                        "TCP, round {round}"
                    );
                    let u = a.udp_client(&udp);
                    assert_eq!(
                        udp_round_trip(&u, msg.as_bytes()).unwrap(),
                        msg.as_bytes(),
                        "UDP, round {round}"
                    );
                })
                .join()
                .unwrap();
            });
            let st = wait_parked(&server, true, &format!("after round {round}")).await;
            let counters = |rule: &str| {
                st.bindings
                    .iter()
                    .find(|b| b.rule == rule)
                    .unwrap()
                    .counters
                    .clone()
            };
            let n = u64::from(round) + 1;
            assert_eq!(counters("t").connections_accepted, n);
            assert_eq!(counters("t").connections_active, 0);
            assert_eq!(counters("u").datagrams_in, n);
            assert_eq!(counters("u").datagrams_out, n);
            assert_eq!(counters("u").sessions_active, 0);
        }

        // A reload that drops the TCP rule closes its parked socket at once:
        // the port is free when the reload returns.
        let only_udp = parse_toml(&config(&rules[1]), "inline").unwrap();
        server.reload(Some(only_udp)).await.unwrap();
        std::thread::scope(|s| s.spawn(|| drop(a.tcp_listen(&tcp))).join().unwrap());
        server.shutdown().await;
    });
}
