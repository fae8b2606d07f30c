//! The TCP relay loop through a running nsproxy server (in-process, host
//! namespace on both sides, loopback): bulk bytes, and a whole short
//! connection (accept, upstream connect, 64-byte request and reply, close).
//!
//! `cargo bench --bench relay`. Needs no root. Set `NSPROXY_TCP_SPLICE=0`
//! to measure the copying relay instead of splice.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::LazyLock;

use nsproxy::config::parse_toml;
use nsproxy::lifecycle::{Options, Server};
use nsproxy::netns::Switcher;

struct Setup {
    _rt: tokio::runtime::Runtime,
    _server: Server,
    proxy: SocketAddr,
}

/// Upstream: answers each 64-byte request with 64 bytes; sinks bulk data
/// and acknowledges its end with one byte.
fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut first = [0u8; 1];
                if c.read_exact(&mut first).is_err() {
                    return;
                }
                if first[0] == b'r' {
                    let mut req = [0u8; 63];
                    if c.read_exact(&mut req).is_ok() {
                        let _ = c.write_all(&[b'a'; 64]);
                    }
                    return;
                }
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        let _ = c.write_all(b"k");
                        return;
                    }
                }
            });
        }
    });
    addr
}

static SETUP: LazyLock<Setup> = LazyLock::new(|| {
    let up = upstream();
    let rt = nsproxy::runtime::build(2).unwrap();
    let cfg = parse_toml(
        &format!(
            "[[proxy]]\nname = \"b\"\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:0\"\nnetns = [\"host\"]\nupstream = \"{up}\"\n"
        ),
        "bench",
    )
    .unwrap();
    let server = rt.block_on(Server::start(
        cfg,
        Switcher::spawn().unwrap(),
        Options::default(),
    ));
    let st = rt.block_on(server.status());
    let proxy = st.bindings[0].local.as_ref().unwrap().parse().unwrap();
    Setup {
        _rt: rt,
        _server: server,
        proxy,
    }
});

fn main() {
    divan::main();
}

/// 4 MiB from the client through the proxy, until the upstream has it all.
#[divan::bench]
fn bulk_4mib(bencher: divan::Bencher) {
    let data = vec![7u8; 4 << 20];
    bencher
        .counter(divan::counter::BytesCount::new(data.len()))
        .bench(|| {
            let mut c = TcpStream::connect(SETUP.proxy).unwrap();
            c.write_all(&data).unwrap();
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let mut ack = [0u8; 1];
            c.read_exact(&mut ack).unwrap();
        });
}

/// One connection: connect, 64-byte request, 64-byte reply, close.
#[divan::bench]
fn connection_64b_rr() {
    let mut c = TcpStream::connect(SETUP.proxy).unwrap();
    c.set_nodelay(true).unwrap();
    let mut req = [b'q'; 64];
    req[0] = b'r';
    c.write_all(&req).unwrap();
    let mut reply = [0u8; 64];
    c.read_exact(&mut reply).unwrap();
}
