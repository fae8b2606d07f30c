//! The socket broker as its own process (the nsproxy binary's hidden
//! `__broker` subcommand) behind a remote switcher in this process: each
//! side notices the other's end. (Socket birth through it is timed in
//! `benches/switcher.rs`, start-up at scale in the comparative bench.)

mod common;

use std::time::{Duration, Instant};

use common::*;
use nsproxy::broker::{self, PolicySource};
use nsproxy::netns::{NsError, NsRef, Switcher};

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
