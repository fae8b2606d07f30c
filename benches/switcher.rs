//! Cost of creating a socket through the namespace path.
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
    Setup {
        switcher,
        other,
        name,
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
