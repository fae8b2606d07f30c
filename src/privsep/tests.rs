//! The relay's drop, checked from outside: a child process (this test
//! binary again, running only [`relay_child`]) becomes `nobody` with the
//! relay's filter, and the parent reads `/proc/CHILD/status`. The child
//! checks from inside that what the filter refuses is refused.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::process::{Command, Stdio};

use super::*;

const CHILD_ENV: &str = "NSPROXY_PRIVSEP_CHILD";

type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// Runs this test binary again as a child playing `role` (its `ROLE_child`
/// test), and reads what it reports (`KEY VALUE` lines) until it says
/// READY. The rest of its output stays open until it exits: libtest writes
/// its summary last.
fn start_child(
    role: &str,
) -> (
    std::process::Child,
    std::collections::HashMap<String, String>,
    Lines,
) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &format!("privsep::tests::{role}_child"),
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut seen = std::collections::HashMap::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "READY" {
            break;
        }
        if let Some((k, v)) = line.split_once(' ') {
            seen.insert(k.to_owned(), v.to_owned());
        }
    }
    (child, seen, lines)
}

fn is_root() -> bool {
    super::is_root()
}

/// True when a root test may run; without root it says why it skips, and
/// under `NSPROXY_REQUIRE_ROOT=1` (as in CI) a skip is a failure.
fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("NSPROXY_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!(
            "{test}: needs root (to drop to another user), and NSPROXY_REQUIRE_ROOT=1 forbids skipping"
        );
    }
    eprintln!("SKIPPED {test}: needs root to drop to another user");
    false
}

/// Runs only in the child: becomes the relay, says what it sees, and waits
/// for the parent to close its stdin.
#[test]
fn relay_child() {
    if std::env::var(CHILD_ENV).as_deref() != Ok("relay") {
        return;
    }
    let mut out = std::io::stdout().lock();
    let nobody = lookup_user("nobody").unwrap();
    become_relay(&nobody).unwrap();
    let filter = seccomp::Filter::relay().unwrap();
    filter.apply_to_all_threads().unwrap();
    let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
    let [setns, unshare, ptrace, setuid] = crate::sys::privs::forbidden_call_errnos(ns.as_fd());
    // On a line of its own: libtest has written the test's name.
    writeln!(out).unwrap();
    writeln!(out, "setns {setns}").unwrap();
    writeln!(out, "unshare {unshare}").unwrap();
    writeln!(out, "ptrace {ptrace}").unwrap();
    writeln!(out, "setuid {setuid}").unwrap();
    let [userns, clone, exec_map] = crate::sys::privs::unprivileged_call_errnos();
    writeln!(out, "userns {userns}").unwrap();
    writeln!(out, "clone-userns {clone}").unwrap();
    writeln!(out, "exec-map {exec_map}").unwrap();
    // What the relay does must still work: a thread (clone3 refused with
    // ENOSYS, glibc falls back to clone), a TCP socket, reading /proc.
    let thread = std::thread::spawn(|| 7).join().map(|n| n == 7);
    writeln!(out, "thread {}", thread.unwrap_or(false)).unwrap();
    let tcp = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None);
    writeln!(out, "tcp {}", tcp.is_ok()).unwrap();
    // Discovery and the nsfs checks read these, not dumpable as it is.
    use std::os::fd::AsRawFd;
    let own_fd = std::fs::File::open(format!("/proc/self/fd/{}", ns.as_raw_fd()));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo");
    writeln!(out, "proc {}", own_fd.is_ok() && mountinfo.is_ok()).unwrap();
    let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error()).unwrap_or(0);
    // What it must not do, though nobody may do each without a filter: a
    // netlink socket, a file opened for writing (/dev/null is mode 0666),
    // a program started.
    let netlink = socket2::Socket::new(
        socket2::Domain::from(libc::AF_NETLINK),
        socket2::Type::RAW,
        None,
    );
    writeln!(out, "netlink {}", errno(netlink.map(drop))).unwrap();
    let write = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map(drop);
    writeln!(out, "open-write {}", errno(write)).unwrap();
    let exec = Command::new("/bin/true").status().map(drop);
    writeln!(out, "exec {}", errno(exec)).unwrap();
    writeln!(out, "READY").unwrap();
    out.flush().unwrap();
    drop(out);
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn the_relay_holds_nothing_and_cannot_switch_namespaces() {
    if !root_or_skip("privsep::tests::the_relay_holds_nothing_and_cannot_switch_namespaces") {
        return;
    }
    let nobody = lookup_user("nobody").unwrap();
    let (mut child, seen, lines) = start_child("relay");
    assert!(
        seen.contains_key("exec"),
        "the child stopped early: {seen:?}"
    );
    // Every thread of the child, not only the main one (the drop and the
    // filter ran on the test's thread, after libtest's main thread existed).
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .unwrap()
        .map(|e| e.unwrap().path().join("status"))
        .collect();
    assert!(tasks.len() >= 2, "{tasks:?}");
    for t in &tasks {
        let st = ProcStatus::read(t).unwrap();
        assert_eq!(st.cap_eff, 0, "{t:?}: {st:?}");
        assert!(st.holds_no_capability(), "{t:?}: {st:?}");
        assert_eq!(st.no_new_privs, Some(true), "{t:?}");
        assert_eq!(st.seccomp, Some(2), "{t:?}");
        assert_eq!(st.uid, [nobody.uid; 4], "{t:?}");
        assert_eq!(st.gid, [nobody.gid; 4], "{t:?}");
    }
    let st = ProcStatus::of_pid(child.id()).unwrap();
    assert_eq!(st.seccomp_filters.unwrap_or(2), 2, "{st:?}");
    // Not dumpable: its /proc entries belong to root, not to nobody, so
    // another process of nobody cannot ptrace it or open its fds.
    use std::os::unix::fs::MetadataExt;
    let fd_dir = std::fs::metadata(format!("/proc/{}/fd", child.id())).unwrap();
    assert_eq!(fd_dir.uid(), 0);
    drop(child.stdin.take());
    let rest: Vec<_> = lines.map_while(Result::ok).collect();
    assert!(child.wait().unwrap().success(), "{rest:?}");
    let eperm = libc::EPERM.to_string();
    for call in [
        "setns",
        "unshare",
        "ptrace",
        "setuid",
        "netlink",
        "open-write",
        "exec",
    ] {
        assert_eq!(seen.get(call), Some(&eperm), "{call}: {seen:?}");
    }
    assert_eq!(seen.get("thread").map(String::as_str), Some("true"));
    assert_eq!(seen.get("tcp").map(String::as_str), Some("true"));
    assert_eq!(seen.get("proc").map(String::as_str), Some("true"));
}

/// Runs only in the child: becomes the broker (on this thread: the broker
/// is single-threaded), says what it sees, and waits.
#[test]
fn broker_child() {
    if std::env::var(CHILD_ENV).as_deref() != Ok("broker") {
        return;
    }
    let mut out = std::io::stdout().lock();
    become_broker(true).unwrap();
    seccomp::Filter::broker()
        .unwrap()
        .apply_to_all_threads()
        .unwrap();
    let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
    let [setns, unshare, ptrace, setuid] = crate::sys::privs::forbidden_call_errnos(ns.as_fd());
    let me = std::fs::read_link("/proc/thread-self").unwrap();
    writeln!(out).unwrap();
    writeln!(out, "task {}", me.display()).unwrap();
    writeln!(out, "setns {setns}").unwrap();
    writeln!(out, "unshare {unshare}").unwrap();
    writeln!(out, "ptrace {ptrace}").unwrap();
    writeln!(out, "setuid {setuid}").unwrap();
    let exec = Command::new("/bin/true").status().map(drop);
    let errno = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error()).unwrap_or(0);
    writeln!(out, "exec {}", errno(exec)).unwrap();
    writeln!(out, "READY").unwrap();
    out.flush().unwrap();
    drop(out);
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn the_broker_keeps_only_what_socket_birth_needs() {
    if !root_or_skip("privsep::tests::the_broker_keeps_only_what_socket_birth_needs") {
        return;
    }
    let (mut child, seen, lines) = start_child("broker");
    let task = seen
        .get("task")
        .unwrap_or_else(|| panic!("the child stopped early: {seen:?}"));
    let st = ProcStatus::read(&std::path::Path::new("/proc").join(task).join("status")).unwrap();
    let want = Cap::SysAdmin.bit() | Cap::NetBindService.bit();
    assert_eq!(st.uid, [0; 4], "{st:?}");
    assert_eq!(
        (st.cap_eff, st.cap_prm, st.cap_bnd),
        (want, want, want),
        "{st:?}"
    );
    assert_eq!((st.cap_inh, st.cap_amb.unwrap_or(0)), (0, 0), "{st:?}");
    assert_eq!(st.no_new_privs, Some(true));
    assert_eq!(st.seccomp, Some(2));
    drop(child.stdin.take());
    let rest: Vec<_> = lines.map_while(Result::ok).collect();
    assert!(child.wait().unwrap().success(), "{rest:?}");
    // setns into a network namespace is what the broker is for; the rest
    // is refused.
    assert_eq!(seen.get("setns").map(String::as_str), Some("0"), "{seen:?}");
    let eperm = libc::EPERM.to_string();
    for call in ["unshare", "ptrace", "setuid", "exec"] {
        assert_eq!(seen.get(call), Some(&eperm), "{call}: {seen:?}");
    }
}
