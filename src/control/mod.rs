//! The control API: HTTP/JSON over a unix socket, and its client.
//!
//! | request | answer |
//! |---|---|
//! | `GET /status` | [`Status`] as JSON |
//! | `POST /reload` | [`ReloadReport`] as JSON, or 400 with `{"error": "..."}` when the new config is invalid (the old one keeps serving) |
//! | `POST /takeover` | an [`Offer`](crate::takeover::Offer): where a new nsproxy fetches this one's listening sockets (see [`crate::takeover`]); 409 when one is under way, 404 when not offered |
//!
//! Another method on these paths is answered 405 with `Allow`, another path
//! 404, a malformed request 400; [`Limits`] says what a client may take.
//!
//! The socket is created with mode 0600, so only its owner (the user who
//! started nsproxy) can connect to it; and every connection's peer is
//! checked with SO_PEERCRED ([`Peers`]): only root and the user who started
//! nsproxy are answered, anyone else gets 403. The check is what keeps the
//! API the operator's once the relay runs as another user: a process of
//! that user (a compromised relay's sibling, or anything else running as
//! `nobody`) may still reach an fd of the socket, but not use it.

pub(crate) mod http;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use self::http::{Answer, Endpoint};
pub use self::http::{EndpointStats, HttpStats, Limits};

use crate::lifecycle::Command;
use crate::status::{ReloadReport, Status};

/// Where the control socket is unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/nsproxy/control.sock";

/// Why the control socket could not be set up or reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another nsproxy is already running with control socket {0}")]
    InUse(PathBuf),
    #[error(
        "refusing to use {path} as the control socket: it is {kind}, not a socket (nsproxy only ever replaces a stale socket); remove it or set another control_socket"
    )]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("cannot create the control socket {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error(
        "nsproxy is not running (no control socket at {0}); start it, or pass --control-socket if it uses another path"
    )]
    NotRunning(PathBuf),
    #[error("nsproxy is not running (nothing listens on {0}: a stale socket file)")]
    Stale(PathBuf),
    #[error(
        "permission denied on {0}: the control socket belongs to the user nsproxy runs as (try as root)"
    )]
    Permission(PathBuf),
    #[error("talking to nsproxy over {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("nsproxy answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("cannot read nsproxy's answer: {0}")]
    Decode(String),
}

/// Binds the control socket at `path` (creating its directory), mode 0600.
/// A leftover socket from a dead daemon is replaced; a live one is an
/// error, and so is anything at `path` that is not a socket (it is never
/// removed).
pub async fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let create = |source| ControlError::Create {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(create)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(create)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) => {
            // Only a socket can be a leftover of ours; a symlink is not
            // followed, so whatever it points at is left alone too.
            if let Some(kind) = not_a_socket(m.file_type()) {
                return Err(ControlError::NotASocket {
                    path: path.to_owned(),
                    kind,
                });
            }
            if UnixStream::connect(path).await.is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(create)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(create(e)),
    }
    let listener = UnixListener::bind(path).map_err(create)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(create)?;
    Ok(listener)
}

/// What a file that is not a socket is, for the error; `None` for a socket.
fn not_a_socket(t: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if t.is_socket() {
        None
    } else if t.is_file() {
        Some("a regular file")
    } else if t.is_dir() {
        Some("a directory")
    } else if t.is_symlink() {
        Some("a symbolic link")
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_char_device() || t.is_block_device() {
        Some("a device")
    } else {
        Some("not a socket")
    }
}

/// Who may use the control API: root and the user who started nsproxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers {
    /// The uids answered.
    allowed: Vec<u32>,
}

impl Peers {
    /// Root and `uid`.
    pub fn root_and(uid: u32) -> Peers {
        let mut allowed = vec![0, uid];
        allowed.dedup();
        Peers { allowed }
    }

    /// Root and the real uid of this process now: call it before dropping
    /// privileges (the user who started nsproxy; root under sudo or a
    /// system service).
    pub fn starting_user() -> Peers {
        Peers::root_and(crate::privsep::starting_uid())
    }

    /// Whether a peer whose credentials read `uid` (`None`: they could not
    /// be read) is answered; if not, why, for the 403's body and the log.
    pub fn admit(&self, uid: Option<u32>) -> Result<(), String> {
        let uids = || {
            self.allowed
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" and ")
        };
        match uid {
            Some(u) if self.allowed.contains(&u) => Ok(()),
            Some(u) => Err(format!(
                "uid {u} may not use the control API: it answers only uid {} (root and the user who started nsproxy)",
                uids()
            )),
            None => {
                Err("the peer's credentials (SO_PEERCRED) could not be read: refused".to_owned())
            }
        }
    }
}

/// The control socket's listener: hands on only connections whose peer
/// [`Peers::admit`]s; answers the others 403 at once, counts and logs them.
struct Checked {
    inner: UnixListener,
    peers: Peers,
    stats: Arc<HttpStats>,
    last_warning: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Refusals of peers within this long of a logged one are logged at debug
/// level only: a local process looping on connect cannot flood the log.
const PEER_WARN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl http::Listener for Checked {
    type Conn = UnixStream;
    async fn accept(&self) -> io::Result<UnixStream> {
        loop {
            let (conn, _) = self.inner.accept().await?;
            let cred = conn.peer_cred().ok();
            let Err(why) = self.peers.admit(cred.map(|c| c.uid())) else {
                return Ok(conn);
            };
            let count = self.stats.control.refused_peer.fetch_add(1, Relaxed) + 1;
            let pid = cred
                .and_then(|c| c.pid())
                .map_or("?".to_owned(), |p| p.to_string());
            let now = std::time::Instant::now();
            let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_none_or(|t| now.duration_since(t) >= PEER_WARN_INTERVAL) {
                *last = Some(now);
                warn!(pid = %pid, refused = count, "control API: refused a connection (403): {why}");
            } else {
                debug!(pid = %pid, "control API: refused a connection (403): {why}");
            }
            http::refuse(&conn, forbidden(&why).as_bytes());
        }
    }
}

/// The whole 403 answer naming `why`.
fn forbidden(why: &str) -> String {
    let body = serde_json::json!({ "error": why }).to_string();
    format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The whole answer to a client beyond [`Limits::max_connections`].
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 64\r\nConnection: close\r\n\r\n{\"error\":\"too many control connections open; try again shortly\"}";

/// Answers API requests of the `peers` allowed until the task is dropped,
/// within `limits` ([`Limits::CONTROL`] unless testing), counting into
/// `stats`.
pub async fn serve(
    listener: UnixListener,
    commands: mpsc::Sender<Command>,
    limits: Limits,
    stats: Arc<HttpStats>,
    peers: Peers,
) {
    serve_with(listener, commands, limits, stats, peers, None).await;
}

/// [`serve`], also answering `POST /takeover` with `giver`.
pub async fn serve_with(
    listener: UnixListener,
    commands: mpsc::Sender<Command>,
    limits: Limits,
    stats: Arc<HttpStats>,
    peers: Peers,
    giver: Option<Arc<crate::takeover::Giver>>,
) {
    let listener = Checked {
        inner: listener,
        peers,
        stats: stats.clone(),
        last_warning: std::sync::Mutex::new(None),
    };
    let handler = move |req: Request<Incoming>| {
        let commands = commands.clone();
        let giver = giver.clone();
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        async move { route(&method, &path, &commands, giver.as_deref()).await }
    };
    http::serve(listener, Endpoint::Control, limits, stats, REFUSAL, handler).await;
}

fn json(status: StatusCode, body: String) -> Answer {
    http::answer(status, "application/json", Bytes::from(body))
}

fn error(status: StatusCode, message: &str) -> Answer {
    json(status, serde_json::json!({ "error": message }).to_string())
}

async fn route(
    method: &Method,
    path: &str,
    commands: &mpsc::Sender<Command>,
    giver: Option<&crate::takeover::Giver>,
) -> Answer {
    let gone = || {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the daemon is shutting down",
        )
    };
    let encode = |r: Result<String, serde_json::Error>| match r {
        Ok(body) => json(StatusCode::OK, body),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    match (path, method) {
        ("/status", &Method::GET) => {
            let (tx, rx) = oneshot::channel();
            if commands.send(Command::Status(tx)).await.is_err() {
                return gone();
            }
            match rx.await {
                Ok(s) => encode(serde_json::to_string(&s)),
                Err(_) => gone(),
            }
        }
        ("/reload", &Method::POST) => {
            let (tx, rx) = oneshot::channel();
            if commands.send(Command::Reload(tx)).await.is_err() {
                return gone();
            }
            match rx.await {
                Ok(Ok(r)) => encode(serde_json::to_string(&r)),
                Ok(Err(e)) => error(StatusCode::BAD_REQUEST, &e.to_string()),
                Err(_) => gone(),
            }
        }
        ("/takeover", &Method::POST) => match giver {
            Some(g) => match g.offer().await {
                Ok(offer) => encode(serde_json::to_string(&offer)),
                Err(e) => error(StatusCode::CONFLICT, &e),
            },
            None => error(
                StatusCode::NOT_FOUND,
                "this nsproxy offers no takeover (not started as a daemon)",
            ),
        },
        ("/status" | "/reload" | "/takeover", _) => {
            let allow = if path == "/status" { "GET" } else { "POST" };
            http::not_allowed(
                allow,
                "application/json",
                Bytes::from(
                    serde_json::json!({ "error": format!("method not allowed: {path} takes {allow}") })
                        .to_string(),
                ),
            )
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "unknown path: GET /status, POST /reload, POST /takeover",
        ),
    }
}

/// Client: connects to the daemon's control socket.
async fn connect(path: &Path) -> Result<UnixStream, ControlError> {
    UnixStream::connect(path).await.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ControlError::NotRunning(path.to_owned()),
        io::ErrorKind::ConnectionRefused => ControlError::Stale(path.to_owned()),
        io::ErrorKind::PermissionDenied => ControlError::Permission(path.to_owned()),
        _ => ControlError::Io {
            path: path.to_owned(),
            source: e,
        },
    })
}

async fn call(path: &Path, method: Method, what: &str) -> Result<String, ControlError> {
    let conn = connect(path).await?;
    let (status, body) =
        http::call(conn, method, what)
            .await
            .map_err(|source| ControlError::Io {
                path: path.to_owned(),
                source,
            })?;
    if status == 200 {
        return Ok(body);
    }
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or(body);
    Err(ControlError::Refused { status, message })
}

/// Client: `GET /status`.
pub async fn status(path: &Path) -> Result<Status, ControlError> {
    let body = call(path, Method::GET, "/status").await?;
    serde_json::from_str(&body).map_err(|e| ControlError::Decode(e.to_string()))
}

/// Client: `POST /reload`.
pub async fn reload(path: &Path) -> Result<ReloadReport, ControlError> {
    let body = call(path, Method::POST, "/reload").await?;
    serde_json::from_str(&body).map_err(|e| ControlError::Decode(e.to_string()))
}

/// Client: `POST /takeover` (see [`crate::takeover::take`]).
pub async fn takeover(path: &Path) -> Result<crate::takeover::Offer, ControlError> {
    let body = call(path, Method::POST, "/takeover").await?;
    serde_json::from_str(&body).map_err(|e| ControlError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_whole_http_answer() {
        let text = std::str::from_utf8(REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "));
        assert!(
            head.contains(&format!("Content-Length: {}\r\n", body.len())),
            "{head}"
        );
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }

    #[test]
    fn only_root_and_the_starting_user_are_admitted() {
        let p = Peers::root_and(1000);
        assert_eq!(p.admit(Some(0)), Ok(()));
        assert_eq!(p.admit(Some(1000)), Ok(()));
        let why = p.admit(Some(65534)).unwrap_err();
        assert_eq!(
            why,
            "uid 65534 may not use the control API: it answers only uid 0 and 1000 (root and the user who started nsproxy)"
        );
        assert!(p.admit(None).unwrap_err().contains("SO_PEERCRED"));
        // Started by root: root alone.
        let p = Peers::root_and(0);
        assert_eq!(p.allowed, vec![0]);
        assert!(p.admit(Some(1)).is_err());
    }

    #[test]
    fn the_403_is_a_whole_http_answer() {
        let text = forbidden("uid 5 may not \"x\"");
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{head}");
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "uid 5 may not \"x\"");
    }

    /// A control API on a socket in a fresh directory, answering reloads
    /// with an empty report, admitting `peers`.
    async fn served(peers: Peers, name: &str) -> (PathBuf, Arc<HttpStats>) {
        let dir = std::env::temp_dir().join(format!("nsproxy-peer-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("c.sock");
        let listener = bind(&path).await.unwrap();
        let (tx, mut rx) = mpsc::channel(4);
        let stats = Arc::new(HttpStats::default());
        tokio::spawn(serve(listener, tx, Limits::CONTROL, stats.clone(), peers));
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                if let Command::Reload(reply) = cmd {
                    let _ = reply.send(Ok(ReloadReport::default()));
                }
            }
        });
        (path, stats)
    }

    #[tokio::test]
    async fn the_starting_user_is_answered() {
        let me = crate::privsep::starting_uid();
        let (path, stats) = served(Peers::root_and(me), "allow").await;
        reload(&path).await.unwrap();
        assert_eq!(stats.control.refused_peer.load(Relaxed), 0);
        assert_eq!(stats.control.accepted.load(Relaxed), 1);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[tokio::test]
    async fn a_user_not_admitted_gets_403_and_is_counted() {
        let me = crate::privsep::starting_uid();
        // A list without this process's uid (root included, if it is root).
        let other = me.wrapping_add(4242);
        let peers = Peers {
            allowed: vec![other],
        };
        let (path, stats) = served(peers, "deny").await;
        match reload(&path).await {
            Err(ControlError::Refused {
                status: 403,
                message,
            }) => {
                assert!(
                    message.starts_with(&format!("uid {me} may not use the control API")),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(stats.control.refused_peer.load(Relaxed), 1);
        assert_eq!(stats.control.accepted.load(Relaxed), 0);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn only_a_socket_may_be_replaced() {
        let kind = |p: &Path| not_a_socket(std::fs::symlink_metadata(p).unwrap().file_type());
        assert_eq!(kind(Path::new("/")), Some("a directory"));
        assert_eq!(kind(Path::new("/dev/null")), Some("a device"));
        assert_eq!(
            kind(&std::env::current_exe().unwrap()),
            Some("a regular file")
        );
        let dir = std::env::temp_dir().join(format!("nsproxy-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let _ = std::fs::remove_file(&sock);
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let link = dir.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        assert_eq!(kind(&sock), None);
        // A link to a socket is not followed: it is not ours to remove.
        assert_eq!(kind(&link), Some("a symbolic link"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
