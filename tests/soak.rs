//! The soak: mixed TCP and UDP traffic through dozens of namespaces for a
//! given time, while namespaces are made and deleted under glob rules, the
//! config is reloaded (SIGHUP and `nsproxy reload`, rules added, removed and
//! changed) and the upstream is killed and restarted. At the end: the thread
//! count never moved, fds and RSS are back near their baseline, every
//! client-side loss is matched by what the daemon counted or logged, and the
//! daemon logged no error the scenario did not cause.
//!
//! Ignored by `cargo test`: `scripts/soak.sh --duration 30m` runs it (the
//! duration goes in `NSPROXY_SOAK_SECS`). Alone in its test binary, so no
//! other test's namespaces change the counts.

mod common;

use std::io::{Read, Write};
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const WORKERS: usize = 2;
const STABLE: usize = 24;
const TCP_CLIENTS: usize = 6;
const UDP_CLIENTS: usize = 4;
const TCP_PORT: &str = "127.0.0.1:7000";
const UDP_PORT: &str = "127.0.0.1:7001";
const UP_TCP: &str = "127.0.0.1:9000";
const UP_UDP: &str = "127.0.0.1:9001";
/// How long a UDP client waits for its echo before counting the datagram lost.
const UDP_WAIT: Duration = Duration::from_secs(1);
/// How long the upstream stays down each time it is killed.
const DOWN_FOR: Duration = Duration::from_millis(1500);
/// Growth of the fd count over the baseline allowed at the end: the splice
/// pipe pool's idle floor (8 pipes, 2 fds each) may be fuller than at the
/// baseline.
const FD_SLACK: usize = 16;
/// Growth of RSS over the baseline allowed at the end.
const RSS_SLACK_KIB: usize = 8 * 1024;

/// Errors the scenario itself causes, as the start of their message.
const ALLOWED_ERRORS: &[&str] = &[];

fn soak_secs() -> u64 {
    std::env::var("NSPROXY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120)
}

/// The config: the stable rules (never changed, so their counters cover the
/// whole run), the churn rules (globs over the namespaces the churner makes)
/// and `variant`'s extra rules, which reloads add, change and remove.
fn config_text(pid: u32, variant: usize) -> String {
    let stable = format!("nspt-{pid}-*-st*");
    let churn = format!("nspt-{pid}-*-ch*");
    let first = format!("nspt-{pid}-*-st0");
    let udp = "udp_idle_timeout = \"3s\"";
    let mut c = config("");
    c += &rule_of("tcp", "tcp-st", TCP_PORT, &[&stable], UP_TCP, "host", "");
    c += &rule_of("udp", "udp-st", UDP_PORT, &[&stable], UP_UDP, "host", udp);
    c += &rule_of("tcp", "tcp-ch", TCP_PORT, &[&churn], UP_TCP, "host", "");
    c += &rule_of("udp", "udp-ch", UDP_PORT, &[&churn], UP_UDP, "host", udp);
    match variant % 4 {
        0 => {}
        1 => c += &rule_of("tcp", "x1", "127.0.0.1:7100", &[&first], UP_TCP, "host", ""),
        2 => {
            // x1 retuned in place, x2 added.
            let cap = "max_connections = 50";
            c += &rule_of(
                "tcp",
                "x1",
                "127.0.0.1:7100",
                &[&first],
                UP_TCP,
                "host",
                cap,
            );
            c += &rule_of(
                "udp",
                "x2",
                "127.0.0.1:7101",
                &[&first],
                UP_UDP,
                "host",
                udp,
            );
        }
        _ => {
            // x1 replaced (new port), x2 removed.
            c += &rule_of("tcp", "x1", "127.0.0.1:7102", &[&first], UP_TCP, "host", "");
        }
    }
    c
}

fn extra_rules(variant: usize) -> &'static [&'static str] {
    match variant % 4 {
        0 => &[],
        1 | 3 => &["x1"],
        _ => &["x1", "x2"],
    }
}

/// The test's upstream: a TCP and a UDP echo server in the daemon's
/// namespace that can be killed (TCP connections reset, the listener and the
/// UDP socket closed) and started again.
struct Upstream {
    host: String,
    /// Bumped by each kill; every server thread of an older life ends.
    life: Arc<AtomicU64>,
    tcp: Option<thread::JoinHandle<()>>,
    udp: Option<thread::JoinHandle<()>>,
    /// TCP connections the upstream reset when killed.
    cut: Arc<AtomicU64>,
}

impl Upstream {
    fn start(host: &TestNs) -> Upstream {
        let mut u = Upstream {
            host: host.name().to_owned(),
            life: Arc::new(AtomicU64::new(0)),
            tcp: None,
            udp: None,
            cut: Arc::new(AtomicU64::new(0)),
        };
        u.restart();
        u
    }

    fn restart(&mut self) {
        let host = TestNs::adopt(&self.host);
        let life = self.life.load(Relaxed);
        let listener = host.tcp_listen(UP_TCP);
        let (l2, c2) = (self.life.clone(), self.cut.clone());
        self.tcp = Some(thread::spawn(move || tcp_upstream(listener, life, l2, c2)));
        let udp = host.udp_bind(UP_UDP);
        let l2 = self.life.clone();
        self.udp = Some(thread::spawn(move || udp_upstream(udp, life, l2)));
    }

    fn kill(&mut self) {
        self.life.fetch_add(1, Relaxed);
        // Wakes the acceptor, which then resets what waits in its queue.
        let _ = TestNs::adopt(&self.host).tcp_connect(UP_TCP);
        for h in [self.tcp.take(), self.udp.take()].into_iter().flatten() {
            h.join().unwrap();
        }
    }
}

fn reset_and_drop(s: std::net::TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
}

fn tcp_upstream(l: std::net::TcpListener, life: u64, now: Arc<AtomicU64>, cut: Arc<AtomicU64>) {
    let mut conns = Vec::new();
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        if now.load(Relaxed) != life {
            // Killed: reset this and everything else in the queue, so that
            // no connection the daemon made is left to the kernel's close.
            reset_and_drop(c);
            l.set_nonblocking(true).unwrap();
            while let Ok((c, _)) = l.accept() {
                reset_and_drop(c);
            }
            break;
        }
        // Finished ones are dropped (detached, so their thread is freed).
        conns.retain(|h: &thread::JoinHandle<()>| !h.is_finished());
        let (now, cut) = (now.clone(), cut.clone());
        conns.push(thread::spawn(move || echo_until_killed(c, life, now, cut)));
    }
    drop(l);
    for c in conns {
        c.join().unwrap();
    }
}

fn echo_until_killed(
    mut c: std::net::TcpStream,
    life: u64,
    now: Arc<AtomicU64>,
    cut: Arc<AtomicU64>,
) {
    c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut buf = vec![0u8; 16384];
    let deadline = Instant::now() + WAIT;
    loop {
        if now.load(Relaxed) != life {
            cut.fetch_add(1, Relaxed);
            return reset_and_drop(c);
        }
        match c.read(&mut buf) {
            Ok(0) => {
                let _ = c.shutdown(std::net::Shutdown::Write);
                return;
            }
            Ok(n) => {
                if let Err(e) = c.write_all(&buf[..n]) {
                    eprintln!("soak: the upstream's write failed: {e}; closing that connection");
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return;
                }
            }
            // A signal to this process is no reason to drop a connection
            // (which, with bytes unread, resets it).
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("soak: the upstream's read failed: {e}; closing that connection");
                return;
            }
        }
    }
}

fn udp_upstream(s: UdpSocket, life: u64, now: Arc<AtomicU64>) {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(4 << 20);
    let mut buf = vec![0u8; 65536];
    while now.load(Relaxed) == life {
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(&buf[..n], from);
        }
    }
    // A socket connected elsewhere matches no datagram from the daemon: from
    // now on they are refused (ICMP port unreachable), as by a closed port,
    // and what was already queued is still answered, so that nothing
    // reaches a dead socket unseen.
    s.connect("127.0.0.1:1").unwrap();
    s.set_nonblocking(true).unwrap();
    while let Ok((n, from)) = s.recv_from(&mut buf) {
        let _ = s.send_to(&buf[..n], from);
    }
}

/// When the upstream was down: (killed at, back at), as offsets from the start.
#[derive(Default)]
struct Windows(Mutex<Vec<(Duration, Option<Duration>)>>);

impl Windows {
    /// True when `t` falls in a down window, or within `grace` after one.
    fn explains(&self, t: Duration, grace: Duration) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .any(|(from, to)| t + grace >= *from && to.is_none_or(|to| t <= to + grace))
    }
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    tcp_ok: AtomicU64,
    /// Exchanges that failed after the connect (reset, short read).
    tcp_failed: AtomicU64,
    /// Failures outside any down window, or with wrong data: never allowed.
    tcp_unexplained: Mutex<Vec<String>>,
    tcp_bytes: AtomicU64,
    udp_sent: AtomicU64,
    udp_answered: AtomicU64,
    udp_late: AtomicU64,
    udp_unexplained: Mutex<Vec<String>>,
    udp_sessions: AtomicU64,
    churned: AtomicU64,
    churn_exchanges: AtomicU64,
    reloads_hup: AtomicU64,
    reloads_cli: AtomicU64,
    kills: AtomicU64,
    /// Traffic threads that panicked (a failed check in a churned namespace).
    panicked: AtomicU64,
}

/// One connection: sends bytes, reads their echo, checks them. Every tenth
/// is large enough (past 64 KiB each way) to go through the splice pipes.
fn tcp_exchange(ns: &TestNs, addr: &str, seed: u64) -> Result<usize, String> {
    let len = if seed % 10 == 0 {
        200_000 + (seed as usize * 7919) % 400_000
    } else {
        1 + (seed as usize * 7919) % 49_152
    };
    let data = random_bytes(len, seed);
    // A reset can come so soon (the daemon resets a client whose upstream
    // refused) that connect() already reports it: that is not a failure to
    // connect.
    let c = ns.tcp_connect(addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::ConnectionReset => format!("reset on connect: {e}"),
        _ => format!("connect failed: {e}"),
    })?;
    // Named in a failure, so that the daemon's lines about this connection
    // (its span's `peer`) can be found.
    let me = c.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let got = thread::scope(|s| {
        let mut w = c.try_clone().map_err(|e| format!("clone: {e}"))?;
        // Written from its own thread: a large echo does not fit in the
        // kernel's buffers while nobody reads it.
        let writer = s.spawn(move || {
            w.write_all(&data)
                .and_then(|()| w.shutdown(std::net::Shutdown::Write))
                .map_err(|e| format!("write: {e}"))
        });
        let mut r = &c;
        let mut got = Vec::with_capacity(len);
        let read = r.read_to_end(&mut got).map_err(|e| format!("read: {e}"));
        writer.join().unwrap()?;
        read.map(|_| got)
    })
    .map_err(|e| format!("{e} [peer={me}]"))?;
    let want = random_bytes(len, seed);
    if got.len() != len || checksum(&got) != checksum(&want) {
        return Err(format!("WRONG DATA: {} of {len} bytes", got.len()));
    }
    Ok(len)
}

/// One ping-pong on a connected UDP socket; false when no echo came.
fn udp_exchange(c: &UdpSocket, seq: u64, late: &mut Vec<u64>) -> bool {
    let len = 8 + (seq as usize * 131) % 1392;
    let mut msg = random_bytes(len, seq);
    msg[..8].copy_from_slice(&seq.to_le_bytes());
    if c.send(&msg).is_err() {
        // A refusal reported on the next send: the datagram was not sent.
        return c.send(&msg).is_ok() && udp_wait(c, seq, &msg, late);
    }
    udp_wait(c, seq, &msg, late)
}

/// Waits for the echo of `seq`; the echoes of earlier datagrams that come
/// meanwhile go in `late`.
fn udp_wait(c: &UdpSocket, seq: u64, msg: &[u8], late: &mut Vec<u64>) -> bool {
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + UDP_WAIT;
    while Instant::now() < deadline {
        match c.recv(&mut buf) {
            Ok(n) if n >= 8 => {
                let got = u64::from_le_bytes(buf[..8].try_into().unwrap());
                if got == seq {
                    assert_eq!(&buf[..n], msg, "a datagram came back changed");
                    return true;
                }
                // The echo of one counted lost earlier: it was late, not lost.
                late.push(got);
            }
            Ok(_) => panic!("a datagram came back cut short"),
            // ECONNREFUSED (the daemon's listener is never down, but keep
            // reading) or the timeout.
            Err(_) => {}
        }
    }
    false
}

fn tcp_client(
    i: usize,
    stable: Arc<Vec<TestNs>>,
    seen: Arc<Seen>,
    windows: Arc<Windows>,
    start: Instant,
    stop: Arc<AtomicBool>,
) {
    let mut n = i as u64 * 1_000_000;
    while !stop.load(Relaxed) {
        n += 1;
        let ns = &stable[(n as usize) % stable.len()];
        match tcp_exchange(ns, TCP_PORT, n) {
            Ok(len) => {
                seen.tcp_ok.fetch_add(1, Relaxed);
                seen.tcp_bytes.fetch_add(len as u64, Relaxed);
            }
            Err(e) => {
                let t = start.elapsed();
                if !e.starts_with("connect failed") {
                    seen.tcp_failed.fetch_add(1, Relaxed);
                }
                let explained = !e.starts_with("connect failed")
                    && !e.starts_with("WRONG")
                    && windows.explains(t, Duration::from_secs(2));
                if !explained {
                    seen.tcp_unexplained
                        .lock()
                        .unwrap()
                        .push(format!("{t:?} {}: {e}", ns.name()));
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn udp_client(
    i: usize,
    stable: Arc<Vec<TestNs>>,
    seen: Arc<Seen>,
    windows: Arc<Windows>,
    start: Instant,
    stop: Arc<AtomicBool>,
) {
    let mine: Vec<&TestNs> = stable.iter().skip(i).step_by(UDP_CLIENTS).collect();
    let open = |ns: &TestNs| {
        let c = ns.udp_client(UDP_PORT);
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        seen.udp_sessions.fetch_add(1, Relaxed);
        c
    };
    let mut socks: Vec<UdpSocket> = mine.iter().map(|ns| open(ns)).collect();
    let mut seq = i as u64 * 1_000_000_000;
    // Lost outside a down window: (seq, what), until its echo comes late.
    let mut unexplained: Vec<(u64, String)> = Vec::new();
    let mut late = Vec::new();
    while !stop.load(Relaxed) {
        for (k, c) in socks.iter().enumerate() {
            seq += 1;
            seen.udp_sent.fetch_add(1, Relaxed);
            if udp_exchange(c, seq, &mut late) {
                seen.udp_answered.fetch_add(1, Relaxed);
            } else {
                let t = start.elapsed();
                if !windows.explains(t, Duration::from_secs(1)) {
                    unexplained.push((seq, format!("{t:?} {} seq {seq}", mine[k].name())));
                }
            }
            seen.udp_late.fetch_add(late.len() as u64, Relaxed);
            unexplained.retain(|(s, _)| !late.contains(s));
            late.clear();
        }
        // Now and then a new client port: a new session, and the old one
        // expires (udp_idle_timeout).
        if seq % 97 < socks.len() as u64 {
            let k = (seq as usize) % socks.len();
            socks[k] = open(mine[k]);
        }
    }
    seen.udp_unexplained
        .lock()
        .unwrap()
        .extend(unexplained.into_iter().map(|(_, what)| what));
}

/// Makes namespaces four at a time, waits until the glob rules serve them,
/// exchanges over TCP and UDP, deletes them. Holds `gate` while it does, so
/// the upstream is never killed under it: those bindings' counters go with
/// their namespace, so a loss there could not be matched.
fn churner(seen: Arc<Seen>, gate: Arc<RwLock<()>>, stop: Arc<AtomicBool>) {
    let mut round = 0;
    while !stop.load(Relaxed) {
        round += 1;
        let batch = TestNs::many(&format!("ch{round}x"), 4);
        seen.churned.fetch_add(batch.len() as u64, Relaxed);
        let up = gate.read().unwrap();
        for (k, ns) in batch.iter().enumerate() {
            let deadline = Instant::now() + WAIT;
            // Ready once the glob rule listens there.
            loop {
                match tcp_exchange(ns, TCP_PORT, round * 10 + k as u64) {
                    Ok(_) => break,
                    Err(e) if e.starts_with("connect failed") && Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(10))
                    }
                    Err(e) => panic!("churn namespace {} not served over TCP: {e}", ns.name()),
                }
            }
            let c = ns.udp_client(UDP_PORT);
            c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let mut seq = round * 1000 + k as u64;
            while !udp_exchange(&c, seq, &mut Vec::new()) {
                assert!(
                    Instant::now() < deadline,
                    "churn namespace {} not served over UDP",
                    ns.name()
                );
                seq += 1_000_000;
            }
            seen.churn_exchanges.fetch_add(2, Relaxed);
        }
        drop(up);
        // This process's namespace thread keeps an fd of every namespace it
        // made a socket in: let go of these, or thousands of deleted
        // namespaces stay alive (and the fd limit is reached).
        for ns in &batch {
            switcher().release(ns.id());
        }
        drop(batch);
    }
}

/// `nsproxy status --json`.
fn status(d: &Daemon) -> serde_json::Value {
    let (code, out, err) = d.cli(&["status", "--json"]);
    assert_eq!(code, 0, "status failed: {err}");
    serde_json::from_str(&out).expect("status JSON")
}

/// Sum of `counter` over the bindings of `rule`.
fn sum(st: &serde_json::Value, rule: &str, counter: &str) -> u64 {
    st["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["rule"] == rule)
        .map(|b| b["counters"][counter].as_u64().unwrap_or(0))
        .sum()
}

fn rule_names(st: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = st["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "listening")
        .map(|b| b["rule"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v.dedup();
    v
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn pipe_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|t| t.to_string_lossy().starts_with("pipe:"))
                .unwrap_or(false)
        })
        .count()
}

/// Waits (bounded) until no connection or session is open and the fd count
/// has been steady for a second; returns it.
fn settle(d: &Daemon) -> usize {
    d.wait_until("connections and sessions closed", || {
        let st = status(d);
        ["tcp-st", "tcp-ch"]
            .iter()
            .all(|r| sum(&st, r, "connections_active") == 0)
            && ["udp-st", "udp-ch"]
                .iter()
                .all(|r| sum(&st, r, "sessions_active") == 0)
    });
    let (mut last, mut steady) = (usize::MAX, 0);
    d.wait_until("fd count steady", || {
        let now = fds(d.pid());
        steady = if now == last { steady + 1 } else { 0 };
        last = now;
        thread::sleep(Duration::from_millis(180));
        steady >= 5
    });
    last
}

/// Every error-level line of the JSON log, and the TCP connections of
/// `rule` the daemon closed because the upstream failed.
fn scan_log(log: &str, rule: &str) -> (Vec<String>, u64) {
    let mut errors = Vec::new();
    let mut upstream_closed = 0;
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            errors.push(format!("not JSON: {line}"));
            continue;
        };
        let msg = v["fields"]["message"].as_str().unwrap_or_default();
        if v["level"] == "ERROR" && !ALLOWED_ERRORS.iter().any(|a| msg.starts_with(a)) {
            errors.push(line.to_owned());
        }
        if msg.starts_with("connection closed: upstream") && v["span"]["rule"] == rule {
            upstream_closed += 1;
        }
    }
    (errors, upstream_closed)
}

struct Phase {
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
    handles: Vec<thread::JoinHandle<()>>,
}

/// Starts the clients and the churner.
fn traffic(
    stable: &Arc<Vec<TestNs>>,
    windows: &Arc<Windows>,
    gate: &Arc<RwLock<()>>,
    start: Instant,
) -> Phase {
    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for i in 0..TCP_CLIENTS {
        let (s, w, st, x) = (stable.clone(), windows.clone(), seen.clone(), stop.clone());
        handles.push(thread::spawn(move || tcp_client(i, s, st, w, start, x)));
    }
    for i in 0..UDP_CLIENTS {
        let (s, w, st, x) = (stable.clone(), windows.clone(), seen.clone(), stop.clone());
        handles.push(thread::spawn(move || udp_client(i, s, st, w, start, x)));
    }
    let (st, g, x) = (seen.clone(), gate.clone(), stop.clone());
    handles.push(thread::spawn(move || churner(st, g, x)));
    Phase {
        seen,
        stop,
        handles,
    }
}

impl Phase {
    /// Stops the traffic; counts the threads that panicked (their message
    /// is printed already), so that the figures are still reported.
    fn end(self) -> Arc<Seen> {
        self.stop.store(true, Relaxed);
        let panicked = self
            .handles
            .into_iter()
            .map(|h| h.join().is_err())
            .filter(|p| *p)
            .count();
        self.seen.panicked.fetch_add(panicked as u64, Relaxed);
        self.seen
    }
}

/// Reloads into `variant`, by SIGHUP or by `nsproxy reload`, and checks the
/// extra rules listening are the variant's.
fn reload(d: &Daemon, pid: u32, variant: usize, by_signal: bool, seen: &Seen) {
    std::fs::write(d.config_path(), config_text(pid, variant)).unwrap();
    // Each variant listens with a different set of extra rules, so the
    // status shows when a SIGHUP's reload is done.
    if by_signal {
        d.signal("HUP");
        seen.reloads_hup.fetch_add(1, Relaxed);
    } else {
        let (code, out, err) = d.cli(&["reload"]);
        assert_eq!(code, 0, "reload failed: {err}");
        assert!(out.starts_with("reloaded: "), "{out}");
        seen.reloads_cli.fetch_add(1, Relaxed);
    }
    let want: Vec<String> = extra_rules(variant).iter().map(|s| s.to_string()).collect();
    d.wait_until("the reloaded rules listen", || {
        let names = rule_names(&status(d));
        let extra: Vec<String> = names.into_iter().filter(|n| n.starts_with('x')).collect();
        extra == want
    });
}

#[test]
#[ignore = "long: run by scripts/soak.sh"]
fn soak() {
    if !root_or_skip("soak") {
        return;
    }
    let secs = soak_secs();
    let pid = std::process::id();
    let host = TestNs::new("h");
    let stable = Arc::new(TestNs::many("st", STABLE));
    let mut upstream = Upstream::start(&host);
    let d = Daemon::run(&host, &config_text(pid, 0), &[]);
    // So that scripts/soak.sh can clean up if this process is killed
    // without unwinding: this process's pid names its namespaces.
    if let Ok(f) = std::env::var("NSPROXY_SOAK_PIDFILE") {
        std::fs::write(f, format!("{pid} {}\n", d.pid())).unwrap();
    }
    d.wait_ready();
    d.wait_until("every stable namespace listened in", || {
        let st = status(&d);
        let listening = |r: &str| {
            st["bindings"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|b| b["rule"] == r && b["state"] == "listening")
                .count()
        };
        listening("tcp-st") == STABLE && listening("udp-st") == STABLE
    });
    let threads = d.threads();
    assert_eq!(threads, WORKERS + 2);

    let windows = Arc::new(Windows::default());
    let gate = Arc::new(RwLock::new(()));
    let start = Instant::now();

    // Warm-up: a short run of the whole mix, so that pools, caches and the
    // allocator reach their working size before the baseline.
    let warm = traffic(&stable, &windows, &gate, start);
    let warm_for = Duration::from_secs((secs / 8).clamp(5, 30));
    thread::sleep(warm_for / 2);
    let warm_seen = warm.seen.clone();
    reload(&d, pid, 1, true, &warm_seen);
    reload(&d, pid, 0, false, &warm_seen);
    thread::sleep(warm_for / 2);
    warm.end();
    let fds0 = settle(&d);
    let rss0 = d.rss_kib();
    let pipes0 = pipe_fds(d.pid());
    let st0 = status(&d);
    eprintln!(
        "soak: baseline after {warm_for:?} of warm-up: threads {threads}, fds {fds0} ({pipes0} pipe fds), RSS {rss0} KiB"
    );

    // The run.
    let run_start = Instant::now();
    let run = traffic(&stable, &windows, &gate, start);
    let seen = run.seen.clone();
    let deadline = run_start + Duration::from_secs(secs);
    let (mut next_reload, mut next_kill) = (
        run_start + Duration::from_secs(3),
        run_start + Duration::from_secs(10),
    );
    let (mut variant, mut max_fds, mut max_rss, mut samples) = (0, 0, 0, 0u64);
    let mut last_report = Instant::now();
    while Instant::now() < deadline {
        assert_eq!(d.threads(), threads, "the thread count moved");
        assert!(!d.exited(), "nsproxy exited; log tail:\n{}", tail(&d.log()));
        max_fds = max_fds.max(fds(d.pid()));
        max_rss = max_rss.max(d.rss_kib());
        samples += 1;
        if Instant::now() >= next_reload {
            variant += 1;
            reload(&d, pid, variant, variant % 2 == 1, &seen);
            next_reload = Instant::now() + Duration::from_secs(6);
        }
        if Instant::now() >= next_kill && Instant::now() + Duration::from_secs(5) < deadline {
            let _quiet = gate.write().unwrap();
            windows.0.lock().unwrap().push((start.elapsed(), None));
            upstream.kill();
            seen.kills.fetch_add(1, Relaxed);
            thread::sleep(DOWN_FOR);
            upstream.restart();
            windows.0.lock().unwrap().last_mut().unwrap().1 = Some(start.elapsed());
            next_kill = Instant::now() + Duration::from_secs(20);
        }
        if last_report.elapsed() > Duration::from_secs(60) {
            last_report = Instant::now();
            eprintln!(
                "soak: {:?}: {} TCP ok, {} UDP answered, {} namespaces churned, fds {}, RSS {} KiB",
                run_start.elapsed(),
                seen.tcp_ok.load(Relaxed),
                seen.udp_answered.load(Relaxed),
                seen.churned.load(Relaxed),
                fds(d.pid()),
                d.rss_kib()
            );
        }
        thread::sleep(Duration::from_millis(250));
    }
    let seen = run.end();
    // Back to the starting config, so the end compares like with like.
    if variant % 4 != 0 {
        reload(&d, pid, 0, false, &seen);
    }
    let fds1 = settle(&d);
    let rss1 = d.rss_kib();
    let pipes1 = pipe_fds(d.pid());
    let threads1 = d.threads();
    let ran = run_start.elapsed();

    // What the daemon counted, over the run only (the stable rules never
    // change, so their counters span warm-up and run).
    let st = status(&d);
    let delta = |rule: &str, c: &str| sum(&st, rule, c) - sum(&st0, rule, c);
    let connect_failed = delta("tcp-st", "connect_failed");
    let udp_counted = [
        "upstream_refused",
        "send_errors",
        "recv_errors",
        "dropped_at_cap",
        "dropped_queue_full",
        "dropped_by_kernel",
        "truncated",
    ]
    .iter()
    .map(|c| delta("udp-st", c))
    .sum::<u64>();
    let log = d.log();
    // The warm-up killed nothing, so all these closes are the run's.
    let (errors, upstream_closed) = scan_log(&log, "tcp-st");
    let reloads = seen.reloads_hup.load(Relaxed) + seen.reloads_cli.load(Relaxed);
    let reloads_logged = log.matches("\"config reloaded\"").count() as u64;

    let tcp_ok = seen.tcp_ok.load(Relaxed);
    let tcp_failed = seen.tcp_failed.load(Relaxed);
    let udp_sent = seen.udp_sent.load(Relaxed);
    let udp_lost = udp_sent - seen.udp_answered.load(Relaxed) - seen.udp_late.load(Relaxed);
    eprintln!(
        "soak: ran {ran:?}: TCP {tcp_ok} connections ok ({} MiB echoed), {tcp_failed} cut while the upstream was down \
         (daemon: {connect_failed} connect_failed, {upstream_closed} closed by an upstream reset; upstream reset {}); \
         UDP {udp_sent} datagrams sent, {udp_lost} lost ({} late), daemon counted {udp_counted}, {} client sessions; \
         {} namespaces churned ({} exchanges), reloads: {} SIGHUP + {} nsproxy reload; upstream killed {} times",
        seen.tcp_bytes.load(Relaxed) >> 20,
        upstream.cut.load(Relaxed),
        seen.udp_late.load(Relaxed),
        seen.udp_sessions.load(Relaxed),
        seen.churned.load(Relaxed),
        seen.churn_exchanges.load(Relaxed),
        seen.reloads_hup.load(Relaxed),
        seen.reloads_cli.load(Relaxed),
        seen.kills.load(Relaxed),
    );
    eprintln!(
        "soak: threads {threads} -> {threads1} (constant over {samples} samples); fds {fds0} -> {fds1} \
         (pipes {pipes0} -> {pipes1}; peak {max_fds}); RSS {rss0} KiB -> {rss1} KiB (peak {max_rss} KiB)"
    );

    let tcp_unexplained: Vec<String> = seen.tcp_unexplained.lock().unwrap().clone();
    let mut problems = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            problems.push(what);
        }
    };
    let unexplained = seen.tcp_unexplained.lock().unwrap();
    check(
        unexplained.is_empty(),
        format!("TCP failures the scenario does not explain: {unexplained:#?}"),
    );
    let unexplained = seen.udp_unexplained.lock().unwrap();
    check(
        unexplained.is_empty(),
        format!("UDP losses the scenario does not explain: {unexplained:#?}"),
    );
    let panicked = seen.panicked.load(Relaxed);
    check(
        panicked == 0,
        format!("{panicked} traffic thread(s) panicked (see above)"),
    );
    check(
        tcp_failed == connect_failed + upstream_closed,
        format!(
            "{tcp_failed} TCP exchanges cut, but the daemon counted {connect_failed} connect_failed and logged {upstream_closed} closes by an upstream reset"
        ),
    );
    check(
        udp_lost <= udp_counted,
        format!("{udp_lost} datagrams lost, only {udp_counted} counted"),
    );
    check(
        reloads_logged == reloads + 2,
        format!("{reloads} reloads (and two in the warm-up), {reloads_logged} logged as applied"),
    );
    check(
        errors.is_empty(),
        format!("errors the scenario did not cause:\n{}", errors.join("\n")),
    );
    check(
        threads1 == threads,
        format!("threads {threads} -> {threads1}"),
    );
    check(fds1 <= fds0 + FD_SLACK, format!("fds {fds0} -> {fds1}"));
    check(
        rss1 <= rss0 + RSS_SLACK_KIB,
        format!("RSS {rss0} KiB -> {rss1} KiB"),
    );
    check(
        tcp_ok > 0 && udp_sent > 0 && seen.churned.load(Relaxed) > 0,
        "no traffic".into(),
    );
    for what in &tcp_unexplained {
        if let Some(peer) = what.split("[peer=").nth(1).map(|p| p.trim_end_matches(']')) {
            let about: Vec<&str> = log
                .lines()
                .filter(|l| !peer.is_empty() && l.contains(&format!("\"peer\":\"{peer}\"")))
                .collect();
            problems.push(format!(
                "the daemon's lines for peer {peer} (the last 5 of {}):\n{}",
                about.len(),
                about[about.len().saturating_sub(5)..].join("\n")
            ));
        }
    }
    if !problems.is_empty() {
        // The daemon's log goes with its scratch directory: keep it.
        let kept = std::env::temp_dir().join(format!("nsproxy-soak-{pid}.log"));
        if std::fs::write(&kept, &log).is_ok() {
            problems.push(format!("the daemon's log is kept in {}", kept.display()));
        }
    }
    assert!(
        problems.is_empty(),
        "soak failed (upstream down: {:?}):\n{}",
        windows.0.lock().unwrap(),
        problems.join("\n")
    );
    drop(upstream);
    assert!(d.terminate().success());
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
