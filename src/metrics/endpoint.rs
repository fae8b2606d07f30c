//! What the metrics listener serves: the Prometheus text, the status JSON,
//! the status page and the health probes.
//!
//! | request (`GET`, `HEAD`) | answer |
//! |---|---|
//! | `/metrics` | the Prometheus text ([`render`](super::render)) |
//! | `/status.json` | the control API's `GET /status` JSON |
//! | `/` | the status page (HTML, fetching `/status.json`) |
//! | `/healthz` | 200 while the process and its server's loop answer |
//! | `/readyz` | 200 once the initial listeners are up; 503 before, and while draining |
//!
//! The text and the JSON are the costly answers (megabytes at 10,000
//! bindings): each is rendered at most once a second, however many clients
//! ask, and shared among them ([`Cache`]).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, HeaderName, HeaderValue};
use hyper::{Method, Request, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::Health;
use crate::control::http::{self, Answer, Endpoint};
use crate::control::{HttpStats, Limits};
use crate::lifecycle::Command;
use crate::status::Status;

/// A rendered answer younger than this, still being sent to someone, is
/// served again as it is: it bounds the renders among overlapping clients
/// and the copies slow clients hold (one per interval within the write
/// timeout).
const FRESH: Duration = Duration::from_secs(1);
/// How long a request waits for the daemon's counters (for its start,
/// too) before a 503.
const STATUS_WAIT: Duration = Duration::from_secs(10);

/// The whole answer to a client beyond [`Limits::max_connections`].
pub(super) const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 53\r\nConnection: close\r\n\r\ntoo many metrics connections open; try again shortly\n";

/// The status page: one file, its style and script inline.
pub(super) const PAGE: &str = include_str!("status_page.html");

/// The page's Content-Security-Policy: nothing but its own inline style
/// and script (by their SHA-256, checked by a test against the file) and
/// fetches of this origin; no frame may hold it.
const PAGE_CSP: &str = concat!(
    "default-src 'none'; ",
    "style-src 'sha256-vZRvzLLLxSvX+Ao0ZuL8QoVDqtLg0ZohH3DIio76O+4='; ",
    "script-src 'sha256-khFmMYE/Jd0Bc1mw7Dq7Zexf1n+9pAT0Osa8QLR3N5o='; ",
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
);

/// The 404, naming the paths served here.
const NOT_FOUND: &str = "not found; served here: /, /metrics, /status.json, /healthz, /readyz\n";

/// The last rendering of one kind, shared by every client that asks while
/// it is fresh.
#[derive(Default)]
struct Cache {
    /// Rendered when, and the bytes while anyone still sends them (so that
    /// an idle daemon holds no copy).
    last: tokio::sync::Mutex<Option<(Instant, Weak<Vec<u8>>)>>,
}

impl Cache {
    /// The last rendering if fresh, else `render`'s (which runs only then).
    /// Concurrent clients wait for one render instead of making one each.
    async fn get(
        &self,
        render: impl Future<Output = Result<Vec<u8>, &'static str>>,
    ) -> Result<Bytes, &'static str> {
        let mut last = self.last.lock().await;
        if let Some((at, text)) = last.as_ref() {
            if let Some(text) = text.upgrade().filter(|_| at.elapsed() < FRESH) {
                return Ok(Bytes::from_owner(Shared(text)));
            }
        }
        let text = Arc::new(render.await?);
        *last = Some((Instant::now(), Arc::downgrade(&text)));
        Ok(Bytes::from_owner(Shared(text)))
    }
}

/// One rendering's bytes, shared among the answers that carry it.
struct Shared(Arc<Vec<u8>>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// What the listener's requests share.
struct Renders {
    health: Arc<Health>,
    stats: Arc<HttpStats>,
    metrics: Cache,
    json: Cache,
}

impl Renders {
    /// A snapshot from the server (waiting for its start).
    async fn status(&self) -> Result<Status, &'static str> {
        let commands = self.health.commands().await;
        let (tx, rx) = oneshot::channel();
        let gone = "nsproxy is shutting down\n";
        commands.send(Command::Status(tx)).await.map_err(|_| gone)?;
        rx.await.map_err(|_| gone)
    }

    async fn metrics(&self) -> Result<Bytes, &'static str> {
        self.metrics
            .get(async {
                let mut out = super::render(&self.status().await?);
                super::render_http(&mut out, &self.stats);
                Ok(out.into_bytes())
            })
            .await
    }

    async fn json(&self) -> Result<Bytes, &'static str> {
        self.json
            .get(async {
                serde_json::to_vec(&self.status().await?)
                    .map_err(|_| "cannot encode the status as JSON\n")
            })
            .await
    }
}

fn text(status: StatusCode, body: &'static str) -> Answer {
    http::answer(status, "text/plain", Bytes::from_static(body.as_bytes()))
}

fn header(a: &mut Answer, name: HeaderName, value: &'static str) {
    a.headers_mut()
        .insert(name, HeaderValue::from_static(value));
}

/// A counter-bearing answer: within [`STATUS_WAIT`] as a whole (waiting
/// for another client's render counts too), else 503.
async fn bounded(
    render: impl Future<Output = Result<Bytes, &'static str>>,
    content_type: &'static str,
) -> Answer {
    let body = tokio::time::timeout(STATUS_WAIT, render)
        .await
        .unwrap_or(Err("nsproxy is busy: its counters did not come in time\n"));
    let mut a = match body {
        Ok(body) => http::answer(StatusCode::OK, content_type, body),
        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, why),
    };
    header(&mut a, CACHE_CONTROL, "no-store");
    a
}

async fn route(method: &Method, path: &str, r: &Renders) -> Answer {
    let known = matches!(
        path,
        "/" | "/metrics" | "/status.json" | "/healthz" | "/readyz"
    );
    if !known {
        // The path is not echoed: nothing a client sent comes back.
        return text(StatusCode::NOT_FOUND, NOT_FOUND);
    }
    if method != Method::GET && method != Method::HEAD {
        return http::not_allowed(
            "GET, HEAD",
            "text/plain",
            Bytes::from(format!("{path} takes GET or HEAD\n")),
        );
    }
    let mut a = match path {
        "/metrics" => return bounded(r.metrics(), "text/plain; version=0.0.4").await,
        "/status.json" => return bounded(r.json(), "application/json").await,
        "/" => {
            let mut a = http::answer(
                StatusCode::OK,
                "text/html; charset=utf-8",
                Bytes::from_static(PAGE.as_bytes()),
            );
            header(&mut a, hyper::header::CONTENT_SECURITY_POLICY, PAGE_CSP);
            header(&mut a, hyper::header::X_CONTENT_TYPE_OPTIONS, "nosniff");
            header(&mut a, hyper::header::REFERRER_POLICY, "no-referrer");
            a
        }
        "/healthz" => match r.health.live().await {
            Ok(()) => text(StatusCode::OK, "ok\n"),
            Err(why) => http::answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                Bytes::from(format!("not alive: {why}\n")),
            ),
        },
        _ => {
            let phase = r.health.phase();
            let status = match phase {
                super::Phase::Ready => StatusCode::OK,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            http::answer(
                status,
                "text/plain",
                Bytes::from(format!("{}\n", phase.as_str())),
            )
        }
    };
    header(&mut a, CACHE_CONTROL, "no-store");
    a
}

/// Serves the metrics listener until the task is dropped, within `limits`
/// ([`Limits::METRICS`] unless testing), counting into `stats` (which the
/// exposition includes, the control API's too). It may start before the
/// server does: `health` says when it has (the probes answer at once; the
/// counters wait for it).
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    limits: Limits,
    stats: Arc<HttpStats>,
) {
    let renders = Arc::new(Renders {
        health,
        stats: stats.clone(),
        metrics: Cache::default(),
        json: Cache::default(),
    });
    let handler = move |req: Request<Incoming>| {
        let renders = renders.clone();
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        async move { route(&method, &path, &renders).await }
    };
    http::serve(listener, Endpoint::Metrics, limits, stats, REFUSAL, handler).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use sha2::Digest as _;

    #[test]
    fn the_refusal_is_a_whole_http_answer() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
    }

    /// Requests that overlap share one render; once nobody holds it, the
    /// next request renders again (an idle daemon keeps no copy).
    #[tokio::test]
    async fn overlapping_requests_share_one_render() {
        let cache = Cache::default();
        let renders = std::sync::atomic::AtomicUsize::new(0);
        let render = || async {
            let n = renders.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(format!("render {n}").into_bytes())
        };
        let first = cache.get(render()).await.unwrap();
        let second = cache.get(render()).await.unwrap();
        assert_eq!(
            (&first[..], &second[..]),
            (&b"render 0"[..], &b"render 0"[..])
        );
        assert_eq!(first.as_ptr(), second.as_ptr(), "one buffer, not a copy");
        drop((first, second));
        assert_eq!(&cache.get(render()).await.unwrap()[..], b"render 1");
        let failed = cache.get(async { Err("no counters") }).await;
        assert_eq!(failed, Err("no counters"));
    }

    /// The text between `<tag>` and `</tag>`: the page has one of each.
    fn inline<'a>(tag: &str) -> &'a str {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        assert_eq!(PAGE.matches(&open).count(), 1, "one {open}");
        let start = PAGE.find(&open).unwrap() + open.len();
        let end = PAGE[start..].find(&close).unwrap() + start;
        &PAGE[start..end]
    }

    /// Edit the page, and this says the hash to put in [`PAGE_CSP`].
    #[test]
    fn the_policy_allows_the_pages_own_style_and_script_only() {
        for tag in ["style", "script"] {
            let digest = sha2::Sha256::digest(inline(tag).as_bytes());
            let hash = base64::engine::general_purpose::STANDARD.encode(digest);
            let want = format!("{tag}-src 'sha256-{hash}';");
            assert!(PAGE_CSP.contains(&want), "PAGE_CSP needs {want}");
        }
        // Nothing from anywhere else, nor markup that a hash does not cover
        // (style attributes, event handler attributes).
        let markup = PAGE.replace(inline("script"), "").to_ascii_lowercase();
        for outside in ["http:", "https:", "//", " src=", " href=", " style="] {
            assert!(
                !markup.contains(outside),
                "the page's markup has {outside:?}"
            );
        }
        let handler = markup
            .split_whitespace()
            .find(|w| w.starts_with("on") && w.contains('='));
        assert_eq!(handler, None, "an event handler attribute");
    }
}
