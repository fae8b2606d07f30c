//! systemd's readiness protocol (`sd_notify`), without libsystemd: one
//! datagram to `$NOTIFY_SOCKET` per state change.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::OnceLock;

/// The notification socket, connected by [`connect`]: permission to
/// reach a socket file is checked when connecting, so a relay that gave up
/// its privileges afterwards still reaches one only root may open.
static CONNECTED: OnceLock<UnixDatagram> = OnceLock::new();

/// Connects to `$NOTIFY_SOCKET` now, for every later [`notify`]; call it
/// before giving up privileges. Without `$NOTIFY_SOCKET`, does nothing.
pub fn connect() -> io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let s = UnixDatagram::unbound()?;
    s.connect_addr(&address(&path.to_string_lossy())?)?;
    let _ = CONNECTED.set(s);
    Ok(())
}

/// Sends `state` (such as `READY=1`) to systemd. Returns `Ok(false)` when
/// not started by systemd with `Type=notify` (no `$NOTIFY_SOCKET`).
pub fn notify(state: &str) -> io::Result<bool> {
    if let Some(s) = CONNECTED.get() {
        return s.send(state.as_bytes()).map(|_| true);
    }
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) => notify_to(&path.to_string_lossy(), state).map(|()| true),
        None => Ok(false),
    }
}

/// Sends `state` to the notification socket `path` ('@' = abstract).
pub(crate) fn notify_to(path: &str, state: &str) -> io::Result<()> {
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &address(path)?)?;
    Ok(())
}

fn address(path: &str) -> io::Result<SocketAddr> {
    match path.strip_prefix('@') {
        // An abstract socket: '@' stands for the leading NUL byte.
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(path),
    }
}

/// `RELOADING=1` with the CLOCK_MONOTONIC timestamp that systemd 253+
/// (`Type=notify-reload`) expects.
pub fn reloading_message() -> String {
    format!(
        "RELOADING=1\nMONOTONIC_USEC={}",
        crate::sys::monotonic_usec()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("nsproxy-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(reloading_message().starts_with("RELOADING=1\nMONOTONIC_USEC="));
    }
}
