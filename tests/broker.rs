//! The socket broker as its own process (the nsproxy binary's hidden
//! `__broker` subcommand) behind a remote switcher in this process: each
//! side notices the other's end, and socket birth through it is timed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nsproxy::broker::{self, PolicySource};
use nsproxy::netns::{NsError, NsRef, SocketSpec, Switcher};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn spawn(specs: &[String]) -> broker::BrokerChild {
    broker::spawn_exe(
        bin().as_ref(),
        &PolicySource::Forward(specs.to_vec()),
        &["--log-level".into(), "warn".into()],
    )
    .expect("start the broker")
}

/// Waits (bounded) for `child` to exit.
fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "the broker did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_killed_broker_is_noticed_at_once_and_fails_every_request() {
    let mut b = spawn(&["tcp:127.0.0.1:1=127.0.0.1:2".into()]);
    let sw = Switcher::remote(b.fd, b.pid).unwrap();
    let link = sw.broker().unwrap().clone();
    rt().block_on(async {
        let home = sw.resolve(&NsRef::Host).await.unwrap();
        assert_eq!(home, sw.home());
        b.child.kill().unwrap(); // SIGKILL
        tokio::time::timeout(WAIT, link.gone())
            .await
            .expect("the relay hears the broker's end");
        let e = sw.resolve(&NsRef::Host).await.unwrap_err();
        assert!(
            matches!(e, NsError::BrokerGone { pid } if pid == b.pid),
            "{e}"
        );
        assert!(e.to_string().contains("is gone"), "{e}");
    });
    let _ = wait_exit(&mut b.child);
}

#[test]
fn the_broker_exits_when_the_relay_closes_its_socket() {
    let mut b = spawn(&["tcp:127.0.0.1:1=127.0.0.1:2".into()]);
    let sw = Switcher::remote(b.fd, b.pid).unwrap();
    rt().block_on(async { sw.resolve(&NsRef::Host).await.unwrap() });
    drop(sw);
    assert!(wait_exit(&mut b.child).success());
}

#[test]
fn a_broker_with_a_bad_fd_says_so() {
    let out = std::process::Command::new(bin())
        .args([
            "__broker",
            "--fd",
            "0",
            "--forward=tcp:127.0.0.1:1=127.0.0.1:2",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not the relay's socket"), "{err}");
}

/// Socket birth in a namespace through the broker and through this
/// process's own namespace thread, one at a time and 64 together. Prints
/// the times; fails only if the broker is wildly slower (10×), which no
/// loaded machine explains.
#[test]
fn socket_birth_through_the_broker() {
    as_root(|| {
        let ns = TestNs::new("brk");
        let mut b = spawn(&[format!("tcp:[::]:80@{}=127.0.0.1:9", ns.name())]);
        let remote = Switcher::remote(b.fd, b.pid).unwrap();
        let local = switcher();
        let rt = rt();
        let addr = "[::]:0".parse().unwrap();
        let spec = SocketSpec::tcp(&addr);
        let mut times = Vec::new();
        for (what, sw) in [("local", local), ("broker", &remote)] {
            let id = rt.block_on(sw.resolve(&ns.reference())).unwrap();
            // Warm up, then time.
            for _ in 0..20 {
                rt.block_on(sw.socket(id, spec)).unwrap();
            }
            let n = 500;
            let t = Instant::now();
            for _ in 0..n {
                rt.block_on(sw.socket(id, spec)).unwrap();
            }
            let one = t.elapsed() / n;
            let rounds = 50;
            let t = Instant::now();
            for _ in 0..rounds {
                let futures: Vec<_> = (0..64).map(|_| sw.socket(id, spec)).collect();
                for f in futures {
                    rt.block_on(f).unwrap();
                }
            }
            let batch = t.elapsed() / rounds;
            eprintln!("socket birth ({what}): one {one:?}, 64 together {batch:?}");
            times.push((one, batch));
            sw.release(id);
        }
        let (local, broker) = (times[0], times[1]);
        assert!(
            broker.0 < local.0 * 10 + Duration::from_micros(200),
            "{broker:?} vs {local:?}"
        );
        drop(remote);
        assert!(wait_exit(&mut b.child).success());
    })
}

/// Resolving many namespaces (what start-up does first) through the broker
/// and locally; `NSPROXY_BROKER_NAMESPACES` namespaces (default 1,000).
/// Slow to set up: run with `--ignored`.
#[test]
#[ignore]
fn resolving_many_namespaces_through_the_broker() {
    as_root(|| {
        let n = std::env::var("NSPROXY_BROKER_NAMESPACES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        let all = TestNs::many("brkm", n);
        let refs: Vec<NsRef> = all.iter().map(|ns| ns.reference()).collect();
        // Every test namespace of this process, by the pattern of their names.
        let pattern = format!("tcp:[::]:80@nspt-{}-*=127.0.0.1:9", std::process::id());
        let mut b = spawn(&[pattern]);
        let remote = Switcher::remote(b.fd, b.pid).unwrap();
        let rt = rt();
        for (what, sw) in [("local", switcher()), ("broker", &remote)] {
            let t = Instant::now();
            let got = rt.block_on(sw.resolve_many(&refs));
            let took = t.elapsed();
            assert!(
                got.iter().all(|r| r.is_ok()),
                "{:?}",
                got.iter().find(|r| r.is_err())
            );
            eprintln!("resolving {n} namespaces ({what}): {took:?}");
            for id in got.into_iter().flatten() {
                sw.release(id);
            }
        }
        drop(remote);
        assert!(wait_exit(&mut b.child).success());
    })
}
