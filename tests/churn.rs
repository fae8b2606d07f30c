//! Namespace churn: 500 namespaces made and deleted while a rule on "*"
//! serves each of them. Alone in its test binary, so that no other test's
//! namespaces change the counts.

mod common;

use common::*;

/// Open fds of `pid` but the pipes: the splice pipe pool keeps a bounded
/// number of those around on purpose, as many as connections overlapped.
fn fds_but_pipes(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            !std::fs::read_link(e.path())
                .map(|t| t.to_string_lossy().starts_with("pipe:"))
                .unwrap_or(false)
        })
        .count()
}

/// Connects and reads the reply, retrying until served (bounded); on
/// failure the daemon's log says what it did with that namespace.
fn hello_when_ready(d: &Daemon, ns: &TestNs, addr: &str) -> Vec<u8> {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match ns.tcp_connect(addr) {
            Ok(mut c) => return read_all(&mut c).unwrap(),
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!(
                "nothing listens on {addr} in {} after {WAIT:?}: {e}; log:\n{}",
                ns.name(),
                d.log()
            ),
        }
    }
}

#[test]
fn churn_of_500_namespaces_leaks_nothing() {
    as_root(|| {
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
        let threads0 = d.threads();
        assert_eq!(threads0, 4);
        // Warm up (allocator pools, the pool of splice pipes, the runtime's
        // per-worker buffers), then take the baselines once the fd count is
        // steady.
        let warm = TestNs::many("warm", 10);
        for ns in &warm {
            assert_eq!(hello_when_ready(&d, ns, "127.0.0.1:7999"), b"c\n");
        }
        drop(warm);
        let mut last = usize::MAX;
        let mut steady = 0;
        d.wait_until("fd count steady after the warm-up", || {
            let now = fds_but_pipes(d.pid());
            steady = if now == last { steady + 1 } else { 0 };
            last = now;
            steady >= 5
        });
        let fds0 = last;
        let rss0 = d.rss_kib();
        let mut served = 0;
        for round in 0..50 {
            let batch = TestNs::many(&format!("churn{round}x"), 10);
            for ns in &batch {
                assert_eq!(
                    hello_when_ready(&d, ns, "127.0.0.1:7999"),
                    b"c\n",
                    "{}",
                    ns.name()
                );
                served += 1;
            }
            drop(batch);
        }
        assert_eq!(served, 500);
        d.wait_until("fds back to the baseline", || {
            fds_but_pipes(d.pid()) <= fds0
        });
        assert_eq!(d.threads(), threads0);
        let rss = d.rss_kib();
        eprintln!(
            "churn: threads {threads0} -> {}, fds {fds0} -> {}, rss {rss0} KiB -> {rss} KiB",
            d.threads(),
            fds_but_pipes(d.pid())
        );
        // Allocator pools may keep some memory; a leak per namespace would show
        // as megabytes over 500 namespaces.
        assert!(
            rss < rss0 + 8 * 1024,
            "rss grew from {rss0} KiB to {rss} KiB"
        );
    })
}
