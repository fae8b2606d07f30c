//! Cost of creating a socket through the namespace path: the namespace
//! thread of this process, and (split, as nsproxy runs when started as
//! root) the socket broker in another process behind a remote switcher.
//!
//! Run as root: `cargo bench --bench switcher`. The benchmark makes one
//! namespace of its own (`nsproxy-bench-PID`) and removes it at the end.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::LazyLock;

use nsproxy::netns::{NsId, NsRef, SocketSpec, Switcher};

struct Setup {
    switcher: Switcher,
    other: Option<NsId>,
    name: String,
    /// The same namespace through a socket broker (the nsproxy binary's
    /// `__broker`, allowed that namespace by a forward spec).
    remote: Option<(Switcher, NsId)>,
}

static SETUP: LazyLock<Setup> = LazyLock::new(|| {
    let switcher = Switcher::spawn().expect("namespace thread");
    let name = format!("nsproxy-bench-{}", std::process::id());
    let made = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .is_ok_and(|s| s.success());
    let other = made.then(|| {
        switcher
            .resolve_blocking(&NsRef::Named(name.clone()))
            .expect("resolve")
    });
    if other.is_none() {
        eprintln!(
            "note: cannot create a namespace (not root?): the other-namespace benchmarks are skipped"
        );
    }
    let remote = other.map(|_| {
        let spec = format!("tcp:127.0.0.1:80@{name}=127.0.0.1:9");
        let b = nsproxy::broker::spawn_exe(
            env!("CARGO_BIN_EXE_nsproxy").as_ref(),
            &nsproxy::broker::PolicySource::Forward(vec![spec]),
            &["--log-level".into(), "warn".into()],
        )
        .expect("start the broker");
        let remote = Switcher::remote(b.fd, b.pid).expect("remote switcher");
        let id = remote
            .resolve_blocking(&NsRef::Named(name.clone()))
            .expect("resolve through the broker");
        // The broker exits when the switcher's socket closes, at the end.
        std::mem::forget(b.child);
        (remote, id)
    });
    Setup {
        switcher,
        other,
        name,
        remote,
    }
});

fn addr() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn main() {
    divan::main();
    if SETUP.other.is_some() {
        let _ = Command::new("ip")
            .args(["netns", "del", &SETUP.name])
            .status();
    }
}

/// Baseline: a plain socket(2) + close, no namespace machinery.
#[divan::bench]
fn plain_socket() {
    drop(socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap());
}

/// A socket in the home namespace: created on the calling thread.
#[divan::bench]
fn home_namespace() {
    let s = &*SETUP;
    drop(
        s.switcher
            .socket_blocking(s.switcher.home(), SocketSpec::tcp(&addr()))
            .unwrap(),
    );
}

/// A socket in another namespace: request to the namespace thread,
/// setns in, socket(), setns home, reply.
#[divan::bench]
fn other_namespace() {
    let s = &*SETUP;
    let Some(ns) = s.other else { return };
    drop(
        s.switcher
            .socket_blocking(ns, SocketSpec::tcp(&addr()))
            .unwrap(),
    );
}

/// 64 sockets for one other namespace requested at once: they share one
/// switch in and out (the start-up pattern with many listeners).
#[divan::bench]
fn other_namespace_batch_of_64(bencher: divan::Bencher) {
    let s = &*SETUP;
    let Some(ns) = s.other else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    bencher
        .counter(divan::counter::ItemsCount::new(64usize))
        .bench_local(|| {
            rt.block_on(async {
                let mut set = Vec::with_capacity(64);
                for _ in 0..64 {
                    set.push(s.switcher.socket(ns, SocketSpec::tcp(&addr())));
                }
                for f in set {
                    drop(f.await.unwrap());
                }
            })
        });
}

/// A socket in another namespace through the socket broker: request over
/// the unix socket, the broker's setns in, socket(), setns home, the fd
/// sent back (SCM_RIGHTS).
#[divan::bench]
fn broker_other_namespace() {
    let s = &*SETUP;
    let Some((remote, ns)) = &s.remote else {
        return;
    };
    drop(
        remote
            .socket_blocking(*ns, SocketSpec::tcp(&addr()))
            .unwrap(),
    );
}

/// 64 sockets through the broker requested at once (pipelined).
#[divan::bench]
fn broker_batch_of_64(bencher: divan::Bencher) {
    let s = &*SETUP;
    let Some((remote, ns)) = &s.remote else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    bencher
        .counter(divan::counter::ItemsCount::new(64usize))
        .bench_local(|| {
            rt.block_on(async {
                let mut set = Vec::with_capacity(64);
                for _ in 0..64 {
                    set.push(remote.socket(*ns, SocketSpec::tcp(&addr())));
                }
                for f in set {
                    drop(f.await.unwrap());
                }
            })
        });
}
