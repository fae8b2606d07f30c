//! The upstream of the demo: answers every TCP connection with one line.
//!
//! `cargo run --example hello_upstream -- 127.0.0.1:9000`

use std::io::Write;
use std::net::TcpListener;

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9000".into());
    let listener = TcpListener::bind(&addr)?;
    eprintln!("hello_upstream: answering on {addr}");
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
        let _ = writeln!(
            conn,
            "hello from the upstream in the host namespace (connection from {peer})"
        );
    }
    Ok(())
}
