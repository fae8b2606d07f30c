//! The control API and the metrics endpoint against hostile clients:
//! arbitrary and mutated requests (property tests, in-process, over a real
//! unix socket and loopback TCP), malformed requests answered at once,
//! clients that never read, and more clients than the endpoints take (the
//! daemon as its own process, in a test namespace).

mod common;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use nsproxy::control::{self, HttpStats, Limits};
use nsproxy::lifecycle::Command;
use nsproxy::netns::SocketSpec;
use nsproxy::status::{ReloadReport, Status};
use proptest::prelude::*;

// ---- in-process endpoints for the property tests ---------------------------

/// Short limits, so that a case that leaves a request unfinished costs
/// little, yet long enough that a loaded machine does not time out a good
/// request; the cap is above what one case opens.
const TEST_LIMITS: Limits = Limits {
    read_timeout: Duration::from_millis(500),
    write_timeout: Duration::from_secs(2),
    max_connections: 8,
};
/// Longest a case waits for an answer or a close: well past both limits.
const CASE_WAIT: Duration = Duration::from_secs(5);

/// Panics on the servers' threads (a failing case panics on its own
/// thread, and is not counted).
static PANICS: AtomicUsize = AtomicUsize::new(0);
const SERVER_THREAD: &str = "http-endpoints";

/// A control API on a unix socket and a metrics endpoint on loopback TCP,
/// answered by a stand-in for the daemon, on a runtime of their own.
struct Endpoints {
    control: PathBuf,
    metrics: SocketAddr,
    _dir: TempDir,
    _rt: tokio::runtime::Runtime,
}

fn endpoints() -> &'static Endpoints {
    static E: OnceLock<Endpoints> = OnceLock::new();
    E.get_or_init(|| {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some(SERVER_THREAD) {
                PANICS.fetch_add(1, Ordering::Relaxed);
            }
            hook(info);
        }));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(SERVER_THREAD)
            .enable_all()
            .build()
            .unwrap();
        let dir = TempDir::new();
        let path = dir.0.join("control.sock");
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let stats = Arc::new(HttpStats::default());
        let metrics = rt.block_on(async {
            let control = control::bind(&path).await.unwrap();
            tokio::spawn(control::serve(
                control,
                tx.clone(),
                TEST_LIMITS,
                stats.clone(),
                control::Peers::starting_user(),
            ));
            let metrics = nsproxy::metrics::bind("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let addr = metrics.local_addr().unwrap();
            let health = Arc::new(nsproxy::metrics::Health::running(tx));
            tokio::spawn(nsproxy::metrics::serve(metrics, health, TEST_LIMITS, stats));
            tokio::spawn(async move {
                while let Some(cmd) = rx.recv().await {
                    match cmd {
                        Command::Status(reply) => {
                            let _ = reply.send(Status {
                                version: "test".into(),
                                pid: 1,
                                uptime_secs: 1,
                                workers: 1,
                                config: None,
                                namespaces_known: 0,
                                connections_cut: Default::default(),
                                heap_allocated_bytes: None,
                                broker: None,
                                bindings: Vec::new(),
                            });
                        }
                        Command::Reload(reply) => {
                            let _ = reply.send(Ok(ReloadReport::default()));
                        }
                        Command::Ping(reply) => {
                            let _ = reply.send(());
                        }
                    }
                }
            });
            addr
        });
        Endpoints {
            control: path,
            metrics,
            _dir: dir,
            _rt: rt,
        }
    })
}

/// Sends `bytes` (then shuts the write side, if `half_close`) and reads
/// until the server closes; `Err` if it neither answers nor closes in time.
fn exchange<S: Read + Write>(
    mut s: S,
    bytes: &[u8],
    half_close: impl FnOnce(&S),
) -> Result<Vec<u8>, String> {
    // The server may close before taking everything: that is allowed.
    if s.write_all(bytes).is_ok() {
        half_close(&s);
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(got),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "no answer and no close within {CASE_WAIT:?}; got {:?}",
                    String::from_utf8_lossy(&got)
                ));
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Whatever came back is empty (a close) or starts with a status line.
fn answer_or_close(got: &[u8]) -> Result<(), String> {
    if got.is_empty() {
        return Ok(());
    }
    let line = got.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let ok = matches!(parts.next(), Some("HTTP/1.1" | "HTTP/1.0"))
        && parts
            .next()
            .is_some_and(|c| c.len() == 3 && c.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(format!("not a status line: {line:?}"))
    }
}

fn control_exchange(bytes: &[u8], half: bool) -> Result<Vec<u8>, String> {
    let s = UnixStream::connect(&endpoints().control).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(CASE_WAIT)).unwrap();
    s.set_write_timeout(Some(CASE_WAIT)).unwrap();
    exchange(s, bytes, |s| {
        if half {
            let _ = s.shutdown(Shutdown::Write);
        }
    })
}

fn metrics_exchange(bytes: &[u8], half: bool) -> Result<Vec<u8>, String> {
    let s = TcpStream::connect(endpoints().metrics).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(CASE_WAIT)).unwrap();
    s.set_write_timeout(Some(CASE_WAIT)).unwrap();
    exchange(s, bytes, |s| {
        if half {
            let _ = s.shutdown(Shutdown::Write);
        }
    })
}

fn status_of(got: &[u8]) -> u16 {
    String::from_utf8_lossy(got)
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Requests the endpoints take, as seeds for mutation.
const SEEDS: &[&[u8]] = &[
    b"GET /status HTTP/1.1\r\nHost: nsproxy\r\n\r\n",
    b"POST /reload HTTP/1.1\r\nHost: nsproxy\r\nContent-Length: 0\r\n\r\n",
    b"GET /metrics HTTP/1.1\nHost: x\n\n",
    b"GET /metrics HTTP/1.0\r\n\r\n",
    b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    b"POST /reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /status?x=1 HTTP/1.1\r\nHost: a\r\nHost: b\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /status.json HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?x#y HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /readyz HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.0\r\n\r\n",
];

/// Arbitrary bytes, or a seed with bytes flipped, inserted, removed or cut.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let arbitrary = prop::collection::vec(any::<u8>(), 0..1024);
    let mutated = (
        prop::sample::select(SEEDS),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 0..8),
    )
        .prop_map(|(seed, edits)| {
            let mut v = seed.to_vec();
            for (at, byte, kind) in edits {
                let i = at.index(v.len() + 1);
                match kind {
                    0 if i < v.len() => v[i] = byte,
                    1 => v.insert(i, byte),
                    2 if i < v.len() => {
                        v.remove(i);
                    }
                    _ => v.truncate(i),
                }
            }
            v
        });
    prop_oneof![arbitrary, mutated]
}

proptest! {
    #[test]
    fn prop_control_api_answers_or_closes(bytes in request(), half in prop::bool::weighted(0.97)) {
        let got = control_exchange(&bytes, half).map_err(TestCaseError::fail)?;
        answer_or_close(&got).map_err(TestCaseError::fail)?;
        // Still serving.
        let next = control_exchange(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n", false).map_err(TestCaseError::fail)?;
        prop_assert_eq!(status_of(&next), 200, "{}", String::from_utf8_lossy(&next));
        prop_assert_eq!(PANICS.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn prop_metrics_endpoint_answers_or_closes(bytes in request(), half in prop::bool::weighted(0.97)) {
        let got = metrics_exchange(&bytes, half).map_err(TestCaseError::fail)?;
        answer_or_close(&got).map_err(TestCaseError::fail)?;
        let next = metrics_exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", false).map_err(TestCaseError::fail)?;
        prop_assert_eq!(status_of(&next), 200, "{}", String::from_utf8_lossy(&next));
        prop_assert_eq!(PANICS.load(Ordering::Relaxed), 0);
    }
}

// ---- the daemon ------------------------------------------------------------

/// One request, without shutting the write side (so that an answer that
/// waits for more input would show as no answer); returns the whole reply.
fn ask_tcp(ns: &TestNs, addr: &str, req: &[u8]) -> String {
    let mut s = ns.tcp_connect(addr).unwrap();
    s.write_all(req).unwrap();
    String::from_utf8_lossy(&read_all(&mut s).unwrap()).into_owned()
}

fn ask_unix(path: &str, req: &[u8]) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(req).unwrap();
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    String::from_utf8_lossy(&v).into_owned()
}

fn metrics_config(rules: &str) -> String {
    config(&format!("metrics_listen = \"127.0.0.1:9100\"\n{rules}"))
}

#[test]
fn malformed_requests_are_answered_at_once() {
    if !root_or_skip("malformed_requests_are_answered_at_once") {
        return;
    }
    let host = TestNs::new("h");
    hello_server(host.tcp_listen("127.0.0.1:9000"), "hi\n");
    let d = Daemon::run(
        &host,
        &metrics_config(&rule_of(
            "tcp",
            "m",
            "127.0.0.1:7000",
            &["host"],
            "127.0.0.1:9000",
            "host",
            "",
        )),
        &[],
    );
    d.wait_ready();
    host.tcp_connect_when_ready("127.0.0.1:9100");
    let m = |req: &[u8]| ask_tcp(&host, "127.0.0.1:9100", req);

    let post = m(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    assert!(
        post.to_ascii_lowercase()
            .contains("\r\nallow: get, head\r\n"),
        "{post}"
    );
    // Another HTTP version is told so, HTTP/2's connection preface too.
    for other in [
        &b"GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /metrics HTTP/0.9\r\n\r\n",
    ] {
        let got = m(other);
        assert!(
            got.starts_with("HTTP/1.1 505 "),
            "{:?} got {got:?}",
            String::from_utf8_lossy(other)
        );
    }
    for bad in [
        &b"GET /metrics\r\n\r\n"[..],
        b"hello there\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
    ] {
        let got = m(bad);
        assert!(
            got.starts_with("HTTP/1.1 400 "),
            "{:?} got {got:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert!(m(b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
    // LF-only line endings are HTTP too, answered without waiting for CRLF.
    let lf = m(b"GET /metrics HTTP/1.1\nHost: x\n\n");
    assert!(lf.starts_with("HTTP/1.1 200 "), "{lf}");
    assert!(lf.contains("# HELP nsproxy_connections_accepted_total TCP connections accepted.\n"));
    let head = m(b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert!(
        head.starts_with("HTTP/1.1 200 ") && head.ends_with("\r\n\r\n"),
        "{head}"
    );

    let c = |req: &[u8]| ask_unix(d.control_socket(), req);
    let put = c(b"PUT /status HTTP/1.1\r\n\r\n");
    assert!(put.starts_with("HTTP/1.1 405 "), "{put}");
    assert!(
        put.to_ascii_lowercase().contains("\r\nallow: get\r\n"),
        "{put}"
    );
    let get_reload = c(b"GET /reload HTTP/1.1\r\n\r\n");
    assert!(
        get_reload
            .to_ascii_lowercase()
            .contains("\r\nallow: post\r\n"),
        "{get_reload}"
    );
    assert!(c(b"GET /x HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
    assert!(c(b"GET /status HTTP/2.0\r\n\r\n").starts_with("HTTP/1.1 505 "));
    let lf = c(b"GET /status\nHost: x\n\n");
    assert!(lf.starts_with("HTTP/1.1 400 "), "{lf}");
    let lf = c(b"GET /status HTTP/1.1\nHost: x\n\n");
    assert!(
        lf.starts_with("HTTP/1.1 200 ") && lf.contains("\"bindings\""),
        "{lf}"
    );
    // And the proxy itself is untouched by all this.
    assert_eq!(
        read_all(&mut host.tcp_connect("127.0.0.1:7000").unwrap()).unwrap(),
        b"hi\n"
    );
}

/// A client of the metrics endpoint that sends its request and never reads,
/// with a small receive buffer so that the answer stalls at once.
fn stuck_scraper(host: &TestNs, addr: &str) -> TcpStream {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = switcher()
        .socket_blocking(host.id(), SocketSpec::tcp(&addr))
        .unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect_timeout(&addr.into(), WAIT).unwrap();
    let mut s: TcpStream = s.into();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s
}

fn counter(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
}

#[test]
fn stuck_scrapers_are_capped_then_reset_and_proxying_goes_on() {
    if !root_or_skip("stuck_scrapers_are_capped_then_reset_and_proxying_goes_on") {
        return;
    }
    let host = TestNs::new("h");
    // Send buffers in this namespace grow to 64 KiB at most (4 MiB by
    // default), so that the exposition stalls in them instead of fitting.
    let sysctl = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            host.name(),
            "sysctl",
            "-qw",
            "net.ipv4.tcp_wmem=4096 16384 65536",
        ])
        .status()
        .unwrap();
    assert!(sysctl.success());
    hello_server(host.tcp_listen("127.0.0.1:9000"), "hi\n");
    // Enough bindings for an exposition larger than those buffers.
    let rules: String = (0..300)
        .map(|i| {
            rule_of(
                "tcp",
                &format!("r{i}"),
                &format!("127.0.0.1:{}", 7000 + i),
                &["host"],
                "127.0.0.1:9000",
                "host",
                "",
            )
        })
        .collect();
    let d = Daemon::run(&host, &metrics_config(&rules), &[]);
    d.wait_ready();
    host.tcp_connect_when_ready("127.0.0.1:9100");
    let scrape = || {
        let got = ask_tcp(&host, "127.0.0.1:9100", b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 200 "), "{got:.200}");
        got
    };
    let body_len = scrape().len();
    let (fds, rss) = (d.fds(), d.rss_kib());

    let stuck: Vec<TcpStream> = (0..200)
        .map(|_| stuck_scraper(&host, "127.0.0.1:9100"))
        .collect();
    let cap = Limits::METRICS.max_connections;
    d.wait_log("closed a new one with 503");
    // The cap holds: the daemon has at most `cap` of them open.
    let during = d.fds();
    assert!(
        during <= fds + cap + 2,
        "{during} fds with 200 stuck scrapers, {fds} before, cap {cap}"
    );
    // What 200 copies of the text would cost, against what they cost now.
    let grown = d.rss_kib().saturating_sub(rss);
    assert!(
        grown * 1024 < 50 * body_len,
        "RSS grew {grown} KiB with 200 stuck scrapers of {body_len} bytes each"
    );
    // Proxied connections and the control API are untouched.
    assert_eq!(
        read_all(&mut host.tcp_connect("127.0.0.1:7000").unwrap()).unwrap(),
        b"hi\n"
    );
    let (code, out, err) = d.cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");

    // Past the write timeout, the stuck ones are reset and their fds freed.
    d.wait_until("stuck scrapers dropped", || d.fds() <= fds + 1);
    // Those beyond the cap were answered 503; at most `cap` were being
    // sent the text.
    let (mut refused, mut served, mut other) = (0, 0, Vec::new());
    for mut s in stuck {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut head = [0u8; 12];
        match s.read_exact(&mut head) {
            Ok(()) if &head == b"HTTP/1.1 503" => refused += 1,
            Ok(()) if &head == b"HTTP/1.1 200" => served += 1,
            Ok(()) => other.push(String::from_utf8_lossy(&head).into_owned()),
            Err(e) => other.push(e.to_string()),
        }
    }
    assert!(
        served <= cap && refused >= 200 - cap,
        "{refused} answered 503, {served} sent the text, cap {cap}; others: {other:?}"
    );
    let body = scrape();
    assert!(
        counter(
            &body,
            "nsproxy_http_refused_at_cap_total{endpoint=\"metrics\"}"
        ) >= (200 - cap) as u64
    );
    assert!(
        counter(
            &body,
            "nsproxy_http_write_timeouts_total{endpoint=\"metrics\"}"
        ) >= 1,
        "{}",
        body.lines()
            .filter(|l| l.contains("http"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn idle_control_clients_are_capped_then_closed() {
    if !root_or_skip("idle_control_clients_are_capped_then_closed") {
        return;
    }
    let host = TestNs::new("h");
    hello_server(host.tcp_listen("127.0.0.1:9000"), "hi\n");
    let d = Daemon::run(
        &host,
        &metrics_config(&rule_of(
            "tcp",
            "c",
            "127.0.0.1:7000",
            &["host"],
            "127.0.0.1:9000",
            "host",
            "",
        )),
        &[],
    );
    d.wait_ready();
    let cap = Limits::CONTROL.max_connections;
    // Clients that connect and say nothing.
    let idle: Vec<UnixStream> = (0..cap + 4)
        .map(|_| UnixStream::connect(d.control_socket()).unwrap())
        .collect();
    d.wait_log("control: 16 connections open");
    let (code, out, err) = d.cli(&["status"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("503") && err.contains("too many control connections"),
        "{out}{err}"
    );
    // Past the read timeout they are closed, and the API serves again.
    let started = Instant::now();
    for mut s in idle {
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
    }
    assert!(started.elapsed() < WAIT);
    let (code, out, err) = d.cli(&["status"]);
    assert_eq!(code, 0, "{out}{err}");
    let body = ask_tcp(&host, "127.0.0.1:9100", b"GET /metrics HTTP/1.1\r\n\r\n");
    let at_cap = counter(
        &body,
        "nsproxy_http_refused_at_cap_total{endpoint=\"control\"}",
    );
    assert!(
        at_cap >= 5,
        "{at_cap}: the 4 beyond the cap and the status call"
    );
    let timed_out = counter(
        &body,
        "nsproxy_http_read_timeouts_total{endpoint=\"control\"}",
    );
    assert_eq!(timed_out, cap as u64);
}

#[test]
fn control_socket_path_holding_a_file_is_left_alone() {
    if !root_or_skip("control_socket_path_holding_a_file_is_left_alone") {
        return;
    }
    let host = TestNs::new("h");
    hello_server(host.tcp_listen("127.0.0.1:9000"), "hi\n");
    let dir = TempDir::new();
    let precious = dir.file("nsproxy.toml", "# not a socket\n");
    let fifo = dir.0.join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    for (i, (path, kind)) in [
        (&precious, "a regular file"),
        (&dir.0, "a directory"),
        (&fifo, "a FIFO"),
    ]
    .into_iter()
    .enumerate()
    {
        let listen = format!("127.0.0.1:{}", 7000 + i);
        let d = Daemon::run(
            &host,
            &config(&rule_of(
                "tcp",
                "f",
                &listen,
                &["host"],
                "127.0.0.1:9000",
                "host",
                "",
            )),
            &["--control-socket", path.to_str().unwrap()],
        );
        let log = d.wait_ready();
        assert!(
            log.contains(&format!(
                "refusing to use {} as the control socket: it is {kind}, not a socket",
                path.display()
            )),
            "{log}"
        );
        // It serves on without the API.
        assert_eq!(
            read_all(&mut host.tcp_connect(&listen).unwrap()).unwrap(),
            b"hi\n"
        );
        drop(d);
    }
    assert_eq!(
        std::fs::read_to_string(&precious).unwrap(),
        "# not a socket\n"
    );
    assert!(dir.0.is_dir());
    use std::os::unix::fs::FileTypeExt;
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
}

#[test]
fn another_user_is_refused_with_403_even_when_the_socket_lets_it_connect() {
    as_root(|| {
        let e = endpoints();
        // Open the socket (and its directory) to everyone, as a mistaken
        // mode or an fd passed on would: the peer check still refuses.
        use std::os::unix::fs::PermissionsExt;
        let dir = e.control.parent().unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(&e.control, std::fs::Permissions::from_mode(0o666)).unwrap();
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .args([
                bin(),
                "status",
                "--control-socket",
                e.control.to_str().unwrap(),
            ])
            .output()
            .expect("setpriv (util-linux)");
        std::fs::set_permissions(&e.control, std::fs::Permissions::from_mode(0o600)).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("403"), "{stderr}");
        assert!(
            stderr.contains("uid 65534 may not use the control API"),
            "{stderr}"
        );
        // Root is still answered, and the refusal was counted.
        let (code, stdout, stderr) =
            run_cli(&["status", "--control-socket", e.control.to_str().unwrap()]);
        assert_eq!(code, 0, "{stdout}{stderr}");
        let metrics = metrics_exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", false).unwrap();
        let body = String::from_utf8_lossy(&metrics);
        assert!(
            counter(
                &body,
                "nsproxy_http_refused_peer_total{endpoint=\"control\"}"
            ) >= 1,
            "{body}"
        );
    })
}
