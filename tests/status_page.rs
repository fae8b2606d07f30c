//! The metrics listener's status page, status JSON and health probes: the
//! endpoints of a daemon in test namespaces (ready, draining), and the page
//! itself in headless Chromium (Debian's `chromium`): it loads, shows the
//! bindings of a running daemon, filters them by the URL's hash, and pages
//! through 10,000 bindings.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nsproxy::control::{HttpStats, Limits};
use nsproxy::lifecycle::Command as ServerCommand;
use nsproxy::status::{BindingReport, BindingState, Counters, Status};

const METRICS: &str = "127.0.0.1:9100";

/// One answer: status, head (lower-cased), body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn has_header(&self, line: &str) -> bool {
        self.head
            .contains(&format!("\r\n{}\r\n", line.to_ascii_lowercase()))
    }
}

fn parse(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Answer {
        status,
        head: format!("{}\r\n", head.to_ascii_lowercase()),
        body: body.to_owned(),
    }
}

fn ask(s: &mut TcpStream, method: &str, path: &str) -> Answer {
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    parse(&read_all(s).unwrap())
}

/// `METHOD path` on the metrics listener in `ns`.
fn request(ns: &TestNs, method: &str, path: &str) -> Answer {
    ask(&mut ns.tcp_connect(METRICS).unwrap(), method, path)
}

/// Polls `GET path` (bounded by [`WAIT`]) until `f` holds of its answer.
fn poll_until(ns: &TestNs, path: &str, what: &str, f: impl Fn(&Answer) -> bool) -> Answer {
    let deadline = Instant::now() + WAIT;
    loop {
        let a = request(ns, "GET", path);
        if f(&a) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never {what} within {WAIT:?}; last: {} {}",
            a.status,
            a.body
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Several rules over two namespaces, with one binding that fails (its
/// port is taken in `a`) and one waiting for a namespace that is not there;
/// the listener taken is returned, to hold.
fn scenario(extra_head: &str) -> (Scenario, std::net::TcpListener) {
    let s = Scenario::with(&["a", "b"])
        .tcp_echo("host", "127.0.0.1:9000")
        .head(&format!("metrics_listen = \"{METRICS}\""))
        .head(extra_head)
        .rule(
            tcp("web")
                .listen("127.0.0.1:8080")
                .netns(["a", "b"])
                .upstream("127.0.0.1:9000"),
        )
        .rule(
            udp("dns")
                .listen("127.0.0.1:5353")
                .netns(["a"])
                .upstream("127.0.0.1:9053"),
        )
        .rule(
            tcp("api")
                .listen("127.0.0.1:8443")
                .netns(["a", "b", "nspt-absent-ns"])
                .upstream("127.0.0.1:9000"),
        )
        .rule(
            tcp("taken")
                .listen("127.0.0.1:8081")
                .netns(["a"])
                .upstream("127.0.0.1:9000"),
        );
    let held = s.ns("a").tcp_listen("127.0.0.1:8081");
    (s, held)
}

#[test]
fn the_probes_status_json_and_page_of_a_daemon_from_ready_to_draining() {
    as_root(|| {
        let (s, _held) = scenario("drain_timeout = \"30s\"");
        let s = s.spawn();
        let host = s.host();
        // Served before the server has started: whatever is seen first is
        // "starting" (503) or "ready", then ready stays.
        host.tcp_connect_when_ready(METRICS);
        let mut starting = 0;
        let deadline = Instant::now() + WAIT;
        loop {
            let a = request(host, "GET", "/readyz");
            if a.status == 200 {
                assert_eq!(a.body, "ready\n");
                break;
            }
            assert_eq!((a.status, a.body.as_str()), (503, "starting\n"));
            starting += 1;
            assert!(Instant::now() < deadline, "never ready within {WAIT:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!("/readyz answered \"starting\" {starting} time(s) before \"ready\"");
        s.wait_ready();

        let live = request(host, "GET", "/healthz");
        assert_eq!((live.status, live.body.as_str()), (200, "ok\n"));
        assert!(live.has_header("cache-control: no-store"), "{}", live.head);
        let head = request(host, "HEAD", "/readyz");
        assert_eq!((head.status, head.body.as_str()), (200, ""));

        // The status JSON: the control API's, for the page.
        let json = request(host, "GET", "/status.json");
        assert_eq!(json.status, 200, "{}", json.body);
        assert!(
            json.has_header("content-type: application/json"),
            "{}",
            json.head
        );
        assert!(json.has_header("cache-control: no-store"), "{}", json.head);
        let st: Status = serde_json::from_str(&json.body).unwrap();
        let (_, api, _) = s.cli(&["status", "--json"]);
        let api: Status = serde_json::from_str(&api).unwrap();
        assert_eq!(st.bindings.len(), 7);
        assert_eq!(st.bindings.len(), api.bindings.len());
        let state = |rule: &str, ns: &str| {
            st.bindings
                .iter()
                .find(|b| b.rule == rule && b.netns == ns)
                .unwrap_or_else(|| panic!("no binding {rule} in {ns}: {}", json.body))
                .state
        };
        let (a, b) = (s.ns("a").name(), s.ns("b").name());
        assert_eq!(state("web", a), BindingState::Listening);
        assert_eq!(state("web", b), BindingState::Listening);
        assert_eq!(state("dns", a), BindingState::Listening);
        assert_eq!(state("taken", a), BindingState::Failed);
        assert_eq!(state("api", "nspt-absent-ns"), BindingState::Waiting);

        // The page: self-contained, with a policy that allows nothing else.
        let page = request(host, "GET", "/");
        assert_eq!(page.status, 200);
        assert!(
            page.has_header("content-type: text/html; charset=utf-8"),
            "{}",
            page.head
        );
        assert!(page.has_header("cache-control: no-store"), "{}", page.head);
        assert!(
            page.has_header("x-content-type-options: nosniff"),
            "{}",
            page.head
        );
        let csp = page
            .head
            .lines()
            .find_map(|l| l.strip_prefix("content-security-policy: "))
            .unwrap_or_else(|| panic!("no policy: {}", page.head));
        assert!(csp.starts_with("default-src 'none'; "), "{csp}");
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(page.body.starts_with("<!doctype html>"), "{}", page.body);
        assert!(page.body.contains("fetch(\"status.json\""));
        let head = request(host, "HEAD", "/");
        assert_eq!((head.status, head.body.as_str()), (200, ""));

        // What was there before is unchanged.
        let post = request(host, "POST", "/");
        assert_eq!(post.status, 405);
        assert!(post.has_header("allow: get, head"), "{}", post.head);
        assert_eq!(request(host, "PUT", "/readyz").status, 405);
        let nope = request(host, "GET", "/nope");
        assert_eq!(nope.status, 404);
        assert!(nope.body.contains("/status.json"), "{}", nope.body);
        let m = request(host, "GET", "/metrics");
        assert_eq!(m.status, 200);
        assert!(
            m.body.contains("nsproxy_binding_state{rule=\"taken\""),
            "{}",
            m.body
        );

        // Draining: not ready, still alive, while a connection holds the
        // drain open.
        let mut client = s.ns("a").tcp_connect("127.0.0.1:8080").unwrap();
        client.write_all(b"x").unwrap();
        let mut echo = [0u8; 1];
        std::io::Read::read_exact(&mut client, &mut echo).unwrap();
        s.signal("TERM");
        let ready = poll_until(host, "/readyz", "answered 503", |a| a.status == 503);
        assert_eq!(ready.body, "draining\n");
        let live = request(host, "GET", "/healthz");
        assert_eq!((live.status, live.body.as_str()), (200, "ok\n"));
        drop(client);
        let (status, log) = s.wait_exit();
        assert!(status.success(), "{log}");
    })
}

// ---- the page in Chromium -----------------------------------------------------

/// Debian's Chromium, or why the test cannot run.
fn chromium() -> Option<PathBuf> {
    let found = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        let why = "needs Debian's chromium (apt-get install chromium; scripts/install-deps.sh)";
        assert!(
            !skip_forbidden(),
            "{}: {why}, and NSPROXY_REQUIRE_ROOT=1 forbids skipping",
            test_name()
        );
        eprintln!("SKIPPED {}: {why}", test_name());
    }
    found
}

/// Headless Chromium, in namespace `ns` (`None`: this one), with a fresh
/// profile removed afterwards; `what` is `--dump-dom` or `--screenshot=..`.
fn headless(browser: &Path, ns: Option<&TestNs>, url: &str, what: &str) -> String {
    let profile = TempDir::new();
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns.name()]).arg(browser);
            c
        }
        None => Command::new(browser),
    };
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
        // Virtual time: the page's fetch and first render run, its next
        // refresh (5 s away) does not.
        "--virtual-time-budget=3000",
    ])
    .arg(format!("--user-data-dir={}", profile.0.display()))
    .arg(what)
    .arg(url)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let child = cmd.spawn().expect("start chromium");
    let out = wait_output(child, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "chromium {what} {url}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits (bounded) for `child`; killed past `limit`.
fn wait_output(mut child: std::process::Child, limit: Duration) -> std::process::Output {
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
        v
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_end(&mut e, &mut stderr);
    }
    std::process::Output {
        status,
        stdout: reader.join().unwrap(),
        stderr,
    }
}

/// The table rows of a dumped DOM, each as its text cells.
fn rows(dom: &str) -> Vec<Vec<String>> {
    dom.split("<tr class=\"row ")
        .skip(1)
        .map(|tr| {
            let tr = &tr[..tr.find("</tr>").unwrap()];
            tr.split("<td")
                .skip(1)
                .map(|td| {
                    let td = &td[td.find('>').unwrap() + 1..];
                    td[..td.find("</td>").unwrap()].to_owned()
                })
                .collect()
        })
        .collect()
}

/// The text of the element with `id`, in a dumped DOM.
fn text_of(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {dom}"));
    let rest = &dom[at..];
    let rest = &rest[rest.find('>').unwrap() + 1..];
    rest[..rest.find('<').unwrap()].to_owned()
}

#[test]
fn the_page_shows_and_filters_a_daemons_bindings_in_chromium() {
    as_root(|| {
        let Some(browser) = chromium() else { return };
        let (s, _held) = scenario("");
        let s = s.start();
        let host = s.host();
        let (a, b) = (s.ns("a").name(), s.ns("b").name());
        // Some traffic, for the counters.
        let mut c = s.ns("a").tcp_connect("127.0.0.1:8080").unwrap();
        c.write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        std::io::Read::read_exact(&mut c, &mut buf).unwrap();
        drop(c);
        let url = format!("http://{METRICS}/");

        let dom = headless(&browser, Some(host), &url, "--dump-dom");
        let all = rows(&dom);
        assert_eq!(all.len(), 7, "{dom}");
        assert_eq!(text_of(&dom, "shown"), "1–7 of 7 bindings, page 1 of 1");
        assert_eq!(text_of(&dom, "count-failed"), "failed 1");
        assert_eq!(text_of(&dom, "count-waiting"), "waiting 1");
        assert_eq!(text_of(&dom, "count-listening"), "listening 5");
        let web_a = all
            .iter()
            .find(|r| r[0] == "web" && r[2] == a)
            .unwrap_or_else(|| panic!("no web row for {a}: {all:?}"));
        assert_eq!(web_a[1], "tcp");
        assert_eq!(web_a[3], "listening");
        assert_eq!(web_a[8], "1", "total connections: {web_a:?}");
        assert_eq!(web_a[11], "5 B", "bytes in: {web_a:?}");
        let taken = all.iter().find(|r| r[0] == "taken").unwrap();
        assert_eq!(taken[3], "failed");
        assert!(taken[4].to_lowercase().contains("in use"), "{taken:?}");
        let version = format!("<span>version {}</span>", env!("CARGO_PKG_VERSION"));
        assert!(dom.contains(&version), "{dom}");

        // Filters, from the URL's hash.
        let failed = rows(&headless(
            &browser,
            Some(host),
            &format!("{url}#state=failed"),
            "--dump-dom",
        ));
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0][0], "taken");
        let web = rows(&headless(
            &browser,
            Some(host),
            &format!("{url}#rule=web"),
            "--dump-dom",
        ));
        let mut ns: Vec<&str> = web.iter().map(|r| r[2].as_str()).collect();
        ns.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(ns, want, "{web:?}");
        assert!(web.iter().all(|r| r[0] == "web"));
        let in_b = format!("{url}#netns={b}&state=listening&sort=rule");
        let in_b = rows(&headless(&browser, Some(host), &in_b, "--dump-dom"));
        let names: Vec<&str> = in_b.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(names, ["api", "web"], "{in_b:?}");

        // A picture of it, for the docs when asked (NSPROXY_STATUS_PAGE_PNG).
        let dir = TempDir::new();
        let png = std::env::var("NSPROXY_STATUS_PAGE_PNG")
            .map(PathBuf::from)
            .unwrap_or_else(|_| dir.0.join("status.png"));
        // Refreshed once within the budget, so that the rates show.
        headless(
            &browser,
            Some(host),
            &format!("{url}#every=1"),
            &format!("--screenshot={}", png.display()),
        );
        let bytes = std::fs::read(&png).expect("the screenshot");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    })
}

/// A stand-in for the daemon's server that answers every status request
/// with `status`.
fn answer_with(status: Status) -> tokio::sync::mpsc::Sender<ServerCommand> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                ServerCommand::Status(reply) => {
                    let _ = reply.send(status.clone());
                }
                ServerCommand::Ping(reply) => {
                    let _ = reply.send(());
                }
                ServerCommand::Reload(_) => {}
            }
        }
    });
    tx
}

fn binding(i: usize) -> BindingReport {
    let state = match i % 100 {
        0 => BindingState::Failed,
        1..=4 => BindingState::Waiting,
        _ => BindingState::Listening,
    };
    BindingReport {
        rule: format!("rule{}", i % 10),
        protocol: if i % 2 == 0 { "tcp" } else { "udp" }.into(),
        netns: format!("tenant-{i:05}"),
        state,
        parked: false,
        max_connections: None,
        reason: (state != BindingState::Listening).then(|| "a <b>reason</b> & more".into()),
        listen: "127.0.0.1:80".into(),
        port: None,
        local: None,
        upstream: "127.0.0.1:8080".into(),
        upstream_netns: "host".into(),
        counters: Counters {
            connections_accepted: i as u64,
            bytes_in: 1000 * i as u64,
            ..Counters::default()
        },
    }
}

/// 10,000 bindings (from a stand-in server, on host loopback): the page
/// shows them 100 at a time, pages and filters among them, and shows
/// names as text, never as markup.
#[test]
fn the_page_pages_through_10000_bindings_in_chromium() {
    let Some(browser) = chromium() else { return };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut bindings: Vec<BindingReport> = (0..10_000).map(binding).collect();
    bindings[7].netns = "<img src=x onerror=alert(1)>".into();
    let status = Status {
        version: "test".into(),
        pid: 1,
        uptime_secs: 90061,
        workers: 2,
        config: None,
        namespaces_known: 10_000,
        connections_cut: Default::default(),
        heap_allocated_bytes: None,
        broker: None,
        bindings,
    };
    let addr = rt.block_on(async {
        let l = nsproxy::metrics::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let health = Arc::new(nsproxy::metrics::Health::running(answer_with(status)));
        tokio::spawn(nsproxy::metrics::serve(
            l,
            health,
            Limits::METRICS,
            Arc::new(HttpStats::default()),
        ));
        addr
    });
    let url = format!("http://{addr}/");
    let dom = headless(&browser, None, &url, "--dump-dom");
    assert_eq!(rows(&dom).len(), 100);
    assert_eq!(
        text_of(&dom, "shown"),
        "1–100 of 10000 bindings, page 1 of 100"
    );
    assert!(dom.contains("<span>up 1d 1h 1m 1s</span>"), "{dom}");
    // The hostile name is text: escaped in the DOM, no element made of it.
    assert!(dom.contains("&lt;img src=x onerror=alert(1)&gt;"), "{dom}");
    assert!(!dom.contains("<img"), "{dom}");
    assert!(dom.contains("a &lt;b&gt;reason&lt;/b&gt; &amp; more"));

    let dom = headless(&browser, None, &format!("{url}#page=100"), "--dump-dom");
    let last = rows(&dom);
    assert_eq!(last.len(), 100);
    assert_eq!(last[99][2], "tenant-09999");
    let dom = headless(
        &browser,
        None,
        &format!("{url}#state=failed&rule=rule0&sort=bytes_in&dir=desc"),
        "--dump-dom",
    );
    let failed = rows(&dom);
    assert_eq!(failed.len(), 100, "{}", text_of(&dom, "shown"));
    assert_eq!(
        text_of(&dom, "shown"),
        "1–100 of 100 bindings (filtered from 10000), page 1 of 1"
    );
    assert_eq!(failed[0][2], "tenant-09900");
    assert!(failed.iter().all(|r| r[3] == "failed"));
}

/// The probes follow the daemon's phase, whatever the order of requests:
/// `starting` (503) before the server is there, with `/status.json` waiting
/// for it rather than failing; `ready` once it is; `draining` (503, still
/// alive) once stopping. In process, on host loopback: the daemon's start
/// is too quick to be caught in the middle reliably.
#[test]
fn readiness_is_starting_then_ready_then_draining() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let health = Arc::new(nsproxy::metrics::Health::starting());
    let stats = Arc::new(HttpStats::default());
    let addr = rt.block_on(async {
        let l = nsproxy::metrics::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(nsproxy::metrics::serve(
            l,
            health.clone(),
            Limits::METRICS,
            stats.clone(),
        ));
        addr
    });
    let get = |path: &str| {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        ask(&mut s, "GET", path)
    };
    let ready = get("/readyz");
    assert_eq!((ready.status, ready.body.as_str()), (503, "starting\n"));
    let live = get("/healthz");
    assert_eq!((live.status, live.body.as_str()), (200, "ok\n"));
    // Asked before the start, answered after it.
    let early = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        ask(&mut s, "GET", "/status.json")
    });
    let deadline = Instant::now() + WAIT;
    while stats
        .metrics
        .accepted
        .load(std::sync::atomic::Ordering::Relaxed)
        < 3
    {
        assert!(Instant::now() < deadline, "the early request never came");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The page is there at once (it fetches the JSON itself); and by the
    // end of this exchange the early request has most likely been read.
    assert_eq!(get("/").status, 200);

    let mut status: Status = serde_json::from_value(serde_json::json!({
        "version": "test", "pid": 1, "uptime_secs": 1, "workers": 1, "config": null,
        "namespaces_known": 0, "bindings": []
    }))
    .unwrap();
    status.bindings.push(binding(3));
    let _in_rt = rt.enter();
    health.ready(answer_with(status.clone()));
    let ready = get("/readyz");
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    let early = early.join().unwrap();
    assert_eq!(early.status, 200, "{}", early.body);
    assert_eq!(serde_json::from_str::<Status>(&early.body).unwrap(), status);
    let live = get("/healthz");
    assert_eq!((live.status, live.body.as_str()), (200, "ok\n"));

    // Methods and paths as before the page came.
    let mut post = TcpStream::connect(addr).unwrap();
    post.set_read_timeout(Some(WAIT)).unwrap();
    let post = ask(&mut post, "POST", "/status.json");
    assert_eq!(post.status, 405);
    assert!(post.has_header("allow: get, head"), "{}", post.head);
    let nope = get("/status");
    assert_eq!(nope.status, 404);
    assert_eq!(
        nope.body,
        "not found; served here: /, /metrics, /status.json, /healthz, /readyz\n"
    );

    health.draining();
    let ready = get("/readyz");
    assert_eq!((ready.status, ready.body.as_str()), (503, "draining\n"));
    assert_eq!(get("/healthz").status, 200);
    assert_eq!(get("/status.json").status, 200, "served while draining");
}
