//! systemd's readiness protocol (`sd_notify`), without libsystemd: one
//! datagram to `$NOTIFY_SOCKET` per state change.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
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

/// The fds the service manager passed this process (`LISTEN_FDS`, with
/// their `LISTEN_FDNAMES`), once [`claim_listen_fds`] took them.
static PASSED: std::sync::Mutex<Vec<(String, OwnedFd)>> = std::sync::Mutex::new(Vec::new());

/// Takes the fds systemd passed this process (`LISTEN_PID` is this pid,
/// `LISTEN_FDS` of them from fd 3, named by `LISTEN_FDNAMES`), making them
/// close-on-exec at once so that no child inherits them; call it first
/// thing, before any child is started. Returns how many, or why the
/// variables could not be used.
pub fn claim_listen_fds() -> Result<usize, String> {
    let var = |name| std::env::var(name).ok();
    let (Some(pid), Some(count)) = (var("LISTEN_PID"), var("LISTEN_FDS")) else {
        return Ok(0);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        // Meant for another process (a parent that did not clear them).
        return Ok(0);
    }
    let count: usize = count
        .trim()
        .parse()
        .map_err(|_| format!("LISTEN_FDS={count:?} is not a number"))?;
    let names = var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    let mut taken = Vec::with_capacity(count);
    let mut problems = Vec::new();
    for i in 0..count {
        let raw = 3 + i as std::os::fd::RawFd;
        let name = names.next().unwrap_or("unknown").to_owned();
        match crate::sys::fdpass::take_inherited_socket(raw) {
            Ok(fd) => taken.push((name, fd)),
            Err(e) => problems.push(format!("fd {raw} ({name}): {e}")),
        }
    }
    let n = taken.len();
    *PASSED.lock().unwrap_or_else(|e| e.into_inner()) = taken;
    match problems.is_empty() {
        true => Ok(n),
        false => Err(format!("not sockets, skipped: {}", problems.join(", "))),
    }
}

/// The fds [`claim_listen_fds`] took (once: later calls get none).
pub fn take_listen_fds() -> Vec<(String, OwnedFd)> {
    std::mem::take(&mut *PASSED.lock().unwrap_or_else(|e| e.into_inner()))
}

/// How many fds the service manager keeps for this service across a
/// restart (`$FDSTORE`, set by systemd 254+ from `FileDescriptorStoreMax=`);
/// `None` without a store.
pub fn fd_store_max() -> Option<usize> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let n: usize = std::env::var("FDSTORE").ok()?.trim().parse().ok()?;
    (n > 0).then_some(n)
}

/// Hands `fds` to the service manager's fd store (`FDSTORE=1` with
/// `FDNAME=`, one message each), then waits (bounded) until it has read
/// them all (`BARRIER=1`): a process that exits right after is sure they
/// are stored. Returns how many were sent.
pub fn store_fds(fds: &[(String, std::os::fd::BorrowedFd<'_>)]) -> io::Result<usize> {
    let Some(s) = notify_socket()? else {
        return Ok(0);
    };
    let s = s.as_fd();
    for (name, fd) in fds {
        let msg = format!("FDSTORE=1\nFDNAME={name}");
        crate::sys::fdpass::send(s, msg.as_bytes(), &[*fd], false)?;
    }
    barrier(s)?;
    Ok(fds.len())
}

/// Tells the service manager to close the stored fds named `names`.
pub fn remove_fds<'a>(names: impl IntoIterator<Item = &'a str>) -> io::Result<()> {
    let Some(s) = notify_socket()? else {
        return Ok(());
    };
    for name in names {
        let msg = format!("FDSTOREREMOVE=1\nFDNAME={name}");
        crate::sys::fdpass::send(s.as_fd(), msg.as_bytes(), &[], false)?;
    }
    Ok(())
}

/// The connected notification socket, or one connected now.
fn notify_socket() -> io::Result<Option<Notifier>> {
    if let Some(s) = CONNECTED.get() {
        return Ok(Some(Notifier::Shared(s)));
    }
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(None);
    };
    let s = UnixDatagram::unbound()?;
    s.connect_addr(&address(&path.to_string_lossy())?)?;
    Ok(Some(Notifier::Own(s)))
}

enum Notifier {
    Shared(&'static UnixDatagram),
    Own(UnixDatagram),
}

impl Notifier {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Notifier::Shared(s) => s.as_fd(),
            Notifier::Own(s) => s.as_fd(),
        }
    }
}

/// How long [`store_fds`] waits for the service manager to read them.
const BARRIER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `BARRIER=1` with a pipe's write end: the manager closes it once it has
/// read every message before, and the read end then sees EOF.
fn barrier(s: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    let (read, write) = crate::sys::fdpass::pipe()?;
    crate::sys::fdpass::send(s, b"BARRIER=1", &[write.as_fd()], false)?;
    drop(write);
    if crate::sys::fdpass::wait_hangup(read.as_fd(), BARRIER_TIMEOUT)? {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the service manager did not confirm within {BARRIER_TIMEOUT:?} (BARRIER=1)"),
        ))
    }
}

/// The service manager's end of a notification: one message read from
/// the notification socket `socket`, and the fds it carried (`FDSTORE=1`,
/// `BARRIER=1`), for whatever stands in for systemd (the tests do).
pub fn receive_notification(socket: &UnixDatagram) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 4096];
    let r = crate::sys::fdpass::recv(socket.as_fd(), &mut buf, crate::sys::fdpass::MAX_FDS, false)?;
    Ok((String::from_utf8_lossy(&buf[..r.len]).into_owned(), r.fds))
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
