//! Namespace churn: 500 namespaces made and deleted while a rule on "*"
//! serves each of them. Alone in its test binary, so that no other test's
//! namespaces change the counts.

mod common;

use common::*;

fn hello_when_ready(ns: &TestNs, addr: &str) -> Vec<u8> {
    let mut c = ns.tcp_connect_when_ready(addr);
    read_all(&mut c).unwrap()
}

#[test]
fn churn_of_500_namespaces_leaks_nothing() {
    if !root_or_skip("churn_of_500_namespaces_leaks_nothing") {
        return;
    }
    let host = TestNs::new("h");
    hello_server(host.tcp_listen("127.0.0.1:9000"), "c\n");
    // A port no other test uses: this rule listens in every namespace on
    // the machine, including other tests'.
    let d = Daemon::run(
        &host,
        "workers = 2\n[[proxy]]\nname = \"all\"\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:7999\"\nnetns = [\"*\"]\nupstream = \"127.0.0.1:9000\"\n",
        &[],
    );
    d.wait_ready();
    // This test binary runs alone, so nothing else makes namespaces now.
    let (fds0, threads0) = (d.fds(), d.threads());
    assert_eq!(threads0, 4);
    // Warm up (allocator pools, the runtime's per-worker buffers), then take
    // the memory baseline.
    let warm = TestNs::many("warm", 10);
    for ns in &warm {
        assert_eq!(hello_when_ready(ns, "127.0.0.1:7999"), b"c\n");
    }
    drop(warm);
    d.wait_until("warm-up namespaces released", || d.fds() <= fds0);
    let rss0 = d.rss_kib();
    let mut served = 0;
    for round in 0..50 {
        let batch = TestNs::many(&format!("churn{round}x"), 10);
        for ns in &batch {
            assert_eq!(
                hello_when_ready(ns, "127.0.0.1:7999"),
                b"c\n",
                "{}",
                ns.name()
            );
            served += 1;
        }
        drop(batch);
    }
    assert_eq!(served, 500);
    d.wait_until("fds back to the baseline", || d.fds() <= fds0);
    assert_eq!(d.threads(), threads0);
    let rss = d.rss_kib();
    eprintln!(
        "churn: threads {threads0} -> {}, fds {fds0} -> {}, rss {rss0} KiB -> {rss} KiB",
        d.threads(),
        d.fds()
    );
    // Allocator pools may keep some memory; a leak per namespace would show
    // as megabytes over 500 namespaces.
    assert!(
        rss < rss0 + 8 * 1024,
        "rss grew from {rss0} KiB to {rss} KiB"
    );
}
