//! Upgrading without an outage: `nsproxy run --takeover` started while a
//! daemon runs takes its listening sockets, and the old one drains and
//! exits 0; clients see no refusal and no reset across the swap.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// The most short connections one stream makes (it stops earlier when
/// told), and the longest it runs.
const MAX_SHORT: usize = 20_000;
const STREAM_TIME: Duration = Duration::from_secs(90);

/// Short connections to `addr` in `ns`, one after another, each sending a
/// line and expecting it echoed, until `stop` (or the bounds above).
/// Counts into `done`; returns what failed.
fn short_stream(
    ns: &TestNs,
    addr: &str,
    stop: &AtomicBool,
    done: &AtomicUsize,
    seed: usize,
) -> Vec<String> {
    let mut failures = Vec::new();
    let start = Instant::now();
    for i in 0..MAX_SHORT {
        if stop.load(Ordering::Relaxed) || start.elapsed() > STREAM_TIME {
            break;
        }
        let line = format!("short {seed}-{i}\n");
        let got = ns.tcp_connect(addr).and_then(|mut c| {
            c.write_all(line.as_bytes())?;
            c.shutdown(std::net::Shutdown::Write)?;
            read_all(&mut c)
        });
        match got {
            Ok(b) if b == line.as_bytes() => {}
            Ok(b) => failures.push(format!("#{i}: echoed {} of {} bytes", b.len(), line.len())),
            Err(e) => failures.push(format!("#{i}: {e}")),
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    failures
}

/// One long connection streaming `chunk`-sized pieces and checking each
/// echo, until `swapped` is set and `after` more pieces have gone through.
/// Returns the bytes that came back intact.
fn long_stream(ns: &TestNs, addr: &str, swapped: &AtomicBool, seed: u64) -> Result<u64, String> {
    const CHUNK: usize = 4096;
    const AFTER: usize = 50;
    let mut c = ns.tcp_connect(addr).map_err(|e| e.to_string())?;
    let (mut sent, mut after) = (0u64, 0);
    let start = Instant::now();
    for i in 0.. {
        if swapped.load(Ordering::Relaxed) {
            after += 1;
            if after > AFTER {
                break;
            }
        }
        if start.elapsed() > STREAM_TIME {
            return Err("the swap never came".into());
        }
        let data = random_bytes(CHUNK, seed + i);
        c.write_all(&data).map_err(|e| format!("write #{i}: {e}"))?;
        let mut back = vec![0u8; CHUNK];
        c.read_exact(&mut back)
            .map_err(|e| format!("read #{i}: {e}"))?;
        if back != data {
            return Err(format!("chunk #{i} came back changed"));
        }
        sent += CHUNK as u64;
        // Pacing: a few hundred chunks a second, so the swap falls mid-stream.
        std::thread::sleep(Duration::from_millis(2));
    }
    c.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let rest = read_all(&mut c).map_err(|e| format!("closing: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} bytes more than sent", rest.len()));
    }
    Ok(sent)
}

/// `nsproxy run --takeover` with the config file and control socket of the
/// daemon `s` runs, and `extra` arguments.
fn takeover(s: &Running, extra: &[&str]) -> Daemon {
    let args = s.same_config_args();
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.push("--takeover");
    args.extend(extra);
    Daemon::command(s.host(), &args)
}

/// Waits (bounded) until `n` has reached `at_least`.
fn until_count(n: &AtomicUsize, at_least: usize, what: &str) {
    let deadline = Instant::now() + WAIT;
    while n.load(Ordering::Relaxed) < at_least {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {at_least} within {WAIT:?}",
            n.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_takeover_under_a_stream_of_connections_refuses_and_resets_none() {
    // Split (as root by default): the relays, unprivileged, hand and take.
    as_root(|| swap_under_load("nobody"))
}

#[test]
fn a_takeover_of_a_single_process_daemon_refuses_and_resets_none() {
    as_root(|| swap_under_load("root"))
}

/// A swap under a stream of short connections and three long ones, both
/// daemons relaying as `user`.
fn swap_under_load(user: &str) {
    {
        const ADDR: &str = "127.0.0.1:7000";
        let mut s = Scenario::with(&["a"])
            .tcp_echo("host", "127.0.0.1:9000")
            .udp_echo("host", "127.0.0.1:9001")
            .head("drain_timeout = \"60s\"\nmetrics_listen = \"127.0.0.1:0\"")
            .rule(
                tcp("echo")
                    .listen(ADDR)
                    .netns(["a"])
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .rule(
                tcp("echo-udp")
                    .protocol("udp")
                    .listen(ADDR)
                    .netns(["a"])
                    .upstream_in("host", "127.0.0.1:9001"),
            )
            .args(&["--user", user])
            .start();
        assert_eq!(
            s.ready_log().contains("relay running as"),
            user != "root",
            "{}",
            s.ready_log()
        );
        // A UDP client with a session in the old process.
        let udp = s.ns("a").udp_client(ADDR);
        assert_eq!(udp_round_trip(&udp, b"before").unwrap(), b"before");
        let old_pid = s.pid();
        let (stop, swapped) = (AtomicBool::new(false), AtomicBool::new(false));
        let done = AtomicUsize::new(0);
        // A handle of its own, so that the daemon may be waited for while
        // the clients use the namespace; the scenario still removes it.
        let ns = TestNs::adopt(s.ns("a").name());
        let ns = &ns;
        let (stop, swapped, done) = (&stop, &swapped, &done);
        let (short, long, new, old_exit) = std::thread::scope(|scope| {
            let short: Vec<_> = (0..2)
                .map(|seed| scope.spawn(move || short_stream(ns, ADDR, stop, done, seed)))
                .collect();
            let long: Vec<_> = (0..3)
                .map(|seed| scope.spawn(move || long_stream(ns, ADDR, swapped, seed * 1_000_000)))
                .collect();
            until_count(done, 1000, "short connections before the swap");
            let new = takeover(&s, &["--user", user]);
            new.wait_ready();
            // The old one has been told; it no longer accepts.
            s.wait_log("took over: no new connections here");
            swapped.store(true, Ordering::Relaxed);
            let long: Vec<_> = long.into_iter().map(|h| h.join().unwrap()).collect();
            // The long connections were its last: it exits now.
            let old_exit = s.wait_exit_here();
            let after = done.load(Ordering::Relaxed);
            until_count(done, after + 1500, "short connections after the swap");
            stop.store(true, Ordering::Relaxed);
            let short: Vec<String> = short.into_iter().flat_map(|h| h.join().unwrap()).collect();
            (short, long, new, old_exit)
        });
        let total = done.load(Ordering::Relaxed);
        assert!(
            short.is_empty(),
            "{} of {total} short connections failed: {:?}\nnew log:\n{}",
            short.len(),
            &short[..short.len().min(10)],
            new.log()
        );
        for (i, l) in long.iter().enumerate() {
            match l {
                Ok(bytes) => assert!(*bytes > 0, "long connection {i} sent nothing"),
                Err(e) => panic!("long connection {i}: {e}\nold log:\n{}", old_exit.1),
            }
        }
        let (status, old_log) = old_exit;
        assert!(
            status.success(),
            "the old daemon exited {status}:\n{old_log}"
        );
        assert!(old_log.contains("stopped: pid"), "{old_log}");
        assert!(
            !old_log.contains("still open when its closing listener's drain timeout ran out"),
            "{old_log}"
        );
        let new_log = new.log();
        assert!(
            new_log.contains("serving 2 listening socket(s) taken over from pid"),
            "{new_log}"
        );
        assert!(!new_log.contains("not taking"), "{new_log}");
        assert!(new_log.contains(&format!("(pid {old_pid})")), "{new_log}");
        // The new one serves, and answers on the same control socket.
        let mut c = s.ns("a").tcp_connect(ADDR).unwrap();
        c.write_all(b"after\n").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(read_all(&mut c).unwrap(), b"after\n");
        // The same UDP client: its session starts afresh in the new process.
        assert_eq!(udp_round_trip(&udp, b"after").unwrap(), b"after");
        let (code, out, err) = run_cli(&["status", "--control-socket", s.control_socket()]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("listening"), "{out}");
        let status = new.terminate();
        assert!(status.success(), "the new daemon exited {status}");
        eprintln!("{total} short connections, 0 failed; 3 long ones kept every byte");
    }
}

#[test]
fn a_new_process_that_fails_before_it_serves_leaves_the_old_one_serving() {
    as_root(|| {
        const ADDR: &str = "127.0.0.1:7004";
        let s = Scenario::with(&["a"])
            .tcp_hello("host", "127.0.0.1:9000", "hi\n")
            .rule(
                tcp("hi")
                    .listen(ADDR)
                    .netns(["a"])
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .start();
        // It takes the sockets, then has nothing it can listen on: its
        // only rule names the namespace of a process that does not exist.
        let dir = TempDir::new();
        let bad = dir.file(
            "bad.toml",
            &config(
                &tcp("gone")
                    .listen(ADDR)
                    .netns(["pid:2147483646"])
                    .upstream_in("host", "127.0.0.1:9000")
                    .to_string(),
            ),
        );
        let args = [
            "run",
            "--config",
            bad.to_str().unwrap(),
            "--control-socket",
            s.control_socket(),
            "--takeover",
            // One process, root: it could remove the socket file.
            "--user",
            "root",
        ];
        let (status, log) = Daemon::command(s.host(), &args).wait_exit();
        assert!(!status.success(), "{log}");
        assert!(log.contains("socket(s) over from nsproxy"), "{log}");
        assert!(log.contains("no listener could be started"), "{log}");
        s.wait_log("went before it served the sockets it took: serving on");
        // The old one's control socket is still there, and answers.
        let (code, out, err) = run_cli(&["status", "--control-socket", s.control_socket()]);
        assert_eq!(code, 0, "{out}{err}");
        let mut c = s.ns("a").tcp_connect(ADDR).unwrap();
        assert_eq!(read_all(&mut c).unwrap(), b"hi\n");
        // And it may be taken over again.
        let new = takeover(&s, &[]);
        new.wait_ready();
        let (status, old_log) = {
            let mut s = s;
            let r = s.wait_exit_here();
            let mut c = s.ns("a").tcp_connect(ADDR).unwrap();
            assert_eq!(read_all(&mut c).unwrap(), b"hi\n");
            drop(new);
            r
        };
        assert!(status.success(), "{old_log}");
    })
}

#[test]
fn a_takeover_with_no_daemon_running_starts_afresh() {
    as_root(|| {
        let s = Scenario::with(&["a"])
            .tcp_hello("host", "127.0.0.1:9000", "hi\n")
            .rule(
                tcp("hi")
                    .listen("127.0.0.1:7001")
                    .netns(["a"])
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .args(&["--takeover"])
            .start();
        let log = s.wait_log("starting afresh");
        assert!(
            log.contains("--takeover: no nsproxy runs with control socket"),
            "{log}"
        );
        let mut c = s.ns("a").tcp_connect("127.0.0.1:7001").unwrap();
        assert_eq!(read_all(&mut c).unwrap(), b"hi\n");
        s.stop();
    })
}

#[test]
fn a_takeover_a_running_daemon_refuses_is_an_error_and_it_serves_on() {
    as_root(|| {
        let s = Scenario::with(&["a"])
            .tcp_hello("host", "127.0.0.1:9000", "hi\n")
            .rule(
                tcp("hi")
                    .listen("127.0.0.1:7002")
                    .netns(["a"])
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .start();
        // Someone else holds the one takeover a daemon serves at a time.
        let (code, out, err) = run_cli_with_body(s.control_socket());
        assert_eq!(code, 0, "{out}{err}");
        let (status, log) = takeover(&s, &[]).wait_exit();
        assert!(!status.success(), "{log}");
        assert!(
            log.contains("cannot take over from the nsproxy on")
                && log.contains("a takeover is already under way"),
            "{log}"
        );
        // The running one serves on.
        let mut c = s.ns("a").tcp_connect("127.0.0.1:7002").unwrap();
        assert_eq!(read_all(&mut c).unwrap(), b"hi\n");
        s.stop();
    })
}

/// A takeover is also how a new config meets the sockets of the old: the
/// rule both share is served on the socket taken over, a rule only the new
/// config has gets a listener of its own, and after the swap a reload opens
/// listeners as any other does (the relay asks the broker for them again).
#[test]
fn a_takeover_whose_config_adds_a_rule_serves_both_and_reloads_after() {
    as_root(|| {
        const KEPT: &str = "127.0.0.1:7006";
        const ADDED: &str = "127.0.0.1:7007";
        const LATER: &str = "127.0.0.1:7008";
        let kept = tcp("kept")
            .listen(KEPT)
            .netns(["a"])
            .upstream_in("host", "127.0.0.1:9000");
        let added = tcp("added")
            .listen(ADDED)
            .netns(["b"])
            .upstream_in("host", "127.0.0.1:9001");
        let later = tcp("later")
            .listen(LATER)
            .netns(["a", "b"])
            .upstream_in("host", "127.0.0.1:9002");
        let mut s = Scenario::with(&["a", "b"])
            .tcp_hello("host", "127.0.0.1:9000", "kept\n")
            .tcp_hello("host", "127.0.0.1:9001", "added\n")
            .tcp_hello("host", "127.0.0.1:9002", "later\n")
            .rule(kept.clone())
            .start();
        // Polls: a reload's answer may come before its listeners open.
        let hello = |s: &Running, tag: &str, addr: &str| {
            let mut c = s.ns(tag).tcp_connect_when_ready(addr);
            String::from_utf8(read_all(&mut c).unwrap()).unwrap()
        };
        assert_eq!(hello(&s, "a", KEPT), "kept\n");
        let old_pid = s.pid();
        s.write_config(&[kept.clone(), added.clone()]);
        let new = takeover(&s, &[]);
        new.wait_ready();
        let (status, old_log) = s.wait_exit_here();
        // Logged as it tells the old one to go, which may be just after
        // its ready line.
        let new_log = new.wait_log("listening socket(s) taken over from pid");
        assert!(
            status.success(),
            "the old daemon exited {status}:\n{old_log}"
        );
        assert!(
            new_log.contains(&format!(
                "serving 1 listening socket(s) taken over from pid {old_pid}"
            )),
            "{new_log}"
        );
        assert!(!new_log.contains("not taking"), "{new_log}");
        assert_eq!(hello(&s, "a", KEPT), "kept\n");
        assert_eq!(hello(&s, "b", ADDED), "added\n");

        s.write_config(&[kept.clone(), added.clone(), later]);
        let (code, out, err) = run_cli(&["reload", "--control-socket", s.control_socket()]);
        assert_eq!(code, 0, "{out}{err}\n{}", new.log());
        // The new rule's two bindings; the two taken over or opened at the
        // swap stay.
        assert_eq!(
            out,
            "reloaded: 2 added, 0 removed, 0 replaced, 0 updated in place, 2 unchanged\n"
        );
        for tag in ["a", "b"] {
            assert_eq!(hello(&s, tag, LATER), "later\n", "in {tag}");
        }
        assert_eq!(hello(&s, "a", KEPT), "kept\n");
        assert_eq!(hello(&s, "b", ADDED), "added\n");
        let status = new.terminate();
        assert!(status.success(), "the new daemon exited {status}");
    })
}

/// `POST /takeover` by hand (curl-like, over the unix socket): starts a
/// handover nobody fetches.
fn run_cli_with_body(socket: &str) -> (i32, String, String) {
    use std::os::unix::net::UnixStream;
    let mut c = UnixStream::connect(socket).unwrap();
    c.set_read_timeout(Some(WAIT)).unwrap();
    c.write_all(b"POST /takeover HTTP/1.1\r\nHost: nsproxy\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    let ok = answer.starts_with("HTTP/1.1 200");
    (if ok { 0 } else { 1 }, answer, String::new())
}

/// Stands in for systemd's notification socket and fd store: keeps the fds
/// of `FDSTORE=1` by their `FDNAME=`, drops those `FDSTOREREMOVE=1` names,
/// and answers `BARRIER=1` (by closing the fd it carried), until dropped.
struct FakeSystemd {
    path: std::path::PathBuf,
    state: Arc<Mutex<StoreState>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: TempDir,
}

#[derive(Default)]
struct StoreState {
    stored: Vec<(String, OwnedFd)>,
    /// Every message, in order.
    messages: Vec<String>,
}

impl FakeSystemd {
    fn new() -> FakeSystemd {
        let dir = TempDir::new();
        let path = dir.0.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let state = Arc::new(Mutex::new(StoreState::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                let Ok((text, fds)) = nsproxy::systemd::receive_notification(&socket) else {
                    continue;
                };
                let mut st = st.lock().unwrap();
                let field = |k: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(k))
                        .map(str::to_owned)
                };
                if text.lines().any(|l| l == "FDSTORE=1") {
                    let name = field("FDNAME=").unwrap_or_default();
                    st.stored
                        .extend(fds.into_iter().map(|fd| (name.clone(), fd)));
                } else if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                    let name = field("FDNAME=").unwrap_or_default();
                    st.stored.retain(|(n, _)| *n != name);
                }
                // BARRIER=1: its fd is dropped here, which is the answer.
                st.messages.push(text);
            }
        });
        FakeSystemd {
            path,
            state,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }

    fn stored_names(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.stored.iter().map(|(n, _)| n.clone()).collect()
    }

    fn messages(&self) -> Vec<String> {
        self.state.lock().unwrap().messages.clone()
    }

    /// Starts `nsproxy ARGS` in `host` as systemd starts a service with an
    /// fd store: the stored fds at 3, 4, ... (`LISTEN_FDS`,
    /// `LISTEN_FDNAMES`, `LISTEN_PID` of the process itself), and the
    /// notification socket.
    fn start_service(&self, host: &TestNs, args: &[&str]) -> Daemon {
        let st = self.state.lock().unwrap();
        let n = st.stored.len();
        let raw: Vec<i32> = st.stored.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let names: Vec<&str> = st.stored.iter().map(|(n, _)| n.as_str()).collect();
        let join = |v: Vec<String>| v.join(" ");
        // Out of the way first (an fd may already be 3 or 4), then in place.
        let script = format!(
            "exec {}; exec {}; exec {} {}; LISTEN_FDS={n} LISTEN_FDNAMES={} NOTIFY_SOCKET={} FDSTORE=16 LISTEN_PID=$$ exec \"$0\" \"$@\"",
            join((0..n).map(|i| format!("{}<&{}", 100 + i, raw[i])).collect()),
            join(raw.iter().map(|fd| format!("{fd}<&-")).collect()),
            join((0..n).map(|i| format!("{}<&{}", 3 + i, 100 + i)).collect()),
            join((0..n).map(|i| format!("{}<&-", 100 + i)).collect()),
            names.join(":"),
            self.path(),
        );
        // Inherited only by this child: close-on-exec again right after.
        let inherit = |on: bool| {
            for (_, fd) in &st.stored {
                socket2::SockRef::from(fd).set_cloexec(!on).unwrap();
            }
        };
        inherit(true);
        let d = Daemon::wrapped(host, &["bash", "-c", &script], args);
        inherit(false);
        d
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_restart_through_systemds_fd_store_refuses_and_resets_none() {
    as_root(|| {
        const ADDR: &str = "127.0.0.1:7003";
        let systemd = FakeSystemd::new();
        let mut s = Scenario::with(&["a"])
            .tcp_echo("host", "127.0.0.1:9000")
            .rule(
                tcp("echo")
                    .listen(ADDR)
                    .netns(["a"])
                    .upstream_in("host", "127.0.0.1:9000"),
            )
            .env("NOTIFY_SOCKET", systemd.path())
            .env("FDSTORE", "16")
            .start();
        let ns = TestNs::adopt(s.ns("a").name());
        let ns = &ns;
        let (stop, done) = (&AtomicBool::new(false), &AtomicUsize::new(0));
        let (short, new, old_exit) = std::thread::scope(|scope| {
            let short: Vec<_> = (0..2)
                .map(|seed| scope.spawn(move || short_stream(ns, ADDR, stop, done, seed)))
                .collect();
            until_count(done, 1000, "short connections before the restart");
            // `systemctl restart`: stop (SIGTERM), then start again.
            s.signal("TERM");
            let old_exit = s.wait_exit_here();
            let stored = systemd.stored_names();
            assert_eq!(stored.len(), 1, "{stored:?}\n{}", old_exit.1);
            let args = s.same_config_args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let new = systemd.start_service(s.host(), &args);
            new.wait_ready();
            new.wait_until("the store is emptied", || systemd.stored_names().is_empty());
            let after = done.load(Ordering::Relaxed);
            until_count(done, after + 1500, "short connections after the restart");
            stop.store(true, Ordering::Relaxed);
            let short: Vec<String> = short.into_iter().flat_map(|h| h.join().unwrap()).collect();
            (short, new, old_exit)
        });
        let total = done.load(Ordering::Relaxed);
        assert!(
            short.is_empty(),
            "{} of {total} short connections failed: {:?}\nnew log:\n{}",
            short.len(),
            &short[..short.len().min(10)],
            new.log()
        );
        let (status, old_log) = old_exit;
        assert!(
            status.success(),
            "the old daemon exited {status}:\n{old_log}"
        );
        assert!(
            old_log.contains("1 listening socket(s) kept in systemd's fd store"),
            "{old_log}"
        );
        let messages = systemd.messages();
        assert!(
            messages.iter().any(
                |m| m.starts_with("FDSTORE=1\nFDNAME=b_tcp_") && m.ends_with("_127.0.0.1_7003")
            ),
            "{messages:?}"
        );
        let new_log = new.log();
        assert!(
            new_log.contains("serving 1 listening socket(s) taken over from systemd's fd store"),
            "{new_log}"
        );
        assert!(!new_log.contains("not taking"), "{new_log}");
        let mut c = ns.tcp_connect(ADDR).unwrap();
        c.write_all(b"after\n").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(read_all(&mut c).unwrap(), b"after\n");
        let status = new.terminate();
        assert!(status.success(), "the new daemon exited {status}");
        eprintln!("{total} short connections across a restart through the fd store, 0 failed");
    })
}
