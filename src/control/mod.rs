//! The control API: HTTP/JSON over a unix socket, and its client.
//!
//! | request | answer |
//! |---|---|
//! | `GET /status` | [`Status`] as JSON |
//! | `POST /reload` | [`ReloadReport`] as JSON, or 400 with `{"error": "..."}` when the new config is invalid (the old one keeps serving) |
//!
//! The socket is created with mode 0600, so only its owner (the user
//! nsproxy runs as) can use it.

pub(crate) mod http;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::status::{ReloadReport, Status};

/// Where the control socket is unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/nsproxy/control.sock";

/// A request from the API to whoever owns the running state.
#[derive(Debug)]
pub enum Command {
    Status(oneshot::Sender<Status>),
    Reload(oneshot::Sender<Result<ReloadReport, String>>),
}

/// Why the control socket could not be set up or reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another nsproxy is already running with control socket {0}")]
    InUse(PathBuf),
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
/// A leftover socket file from a dead daemon is replaced; a live one is an
/// error.
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
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ControlError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(create)?;
    }
    let listener = UnixListener::bind(path).map_err(create)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(create)?;
    Ok(listener)
}

/// Answers API requests until the task is dropped.
pub async fn serve(listener: UnixListener, commands: mpsc::Sender<Command>) {
    loop {
        let (conn, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("control socket accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let commands = commands.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(conn, commands).await {
                debug!("control request failed: {e}");
            }
        });
    }
}

async fn handle(mut conn: UnixStream, commands: mpsc::Sender<Command>) -> io::Result<()> {
    let req = tokio::time::timeout(http::REQUEST_TIMEOUT, http::read_request(&mut conn))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request timed out"))??;
    let gone = || io::Error::other("the daemon is shutting down");
    let (status, body) = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/status") => {
            let (tx, rx) = oneshot::channel();
            commands
                .send(Command::Status(tx))
                .await
                .map_err(|_| gone())?;
            let s = rx.await.map_err(|_| gone())?;
            (200, serde_json::to_string(&s).map_err(io::Error::other)?)
        }
        ("POST", "/reload") => {
            let (tx, rx) = oneshot::channel();
            commands
                .send(Command::Reload(tx))
                .await
                .map_err(|_| gone())?;
            match rx.await.map_err(|_| gone())? {
                Ok(r) => (200, serde_json::to_string(&r).map_err(io::Error::other)?),
                Err(e) => (400, serde_json::json!({ "error": e }).to_string()),
            }
        }
        (_, "/status" | "/reload") => (
            405,
            serde_json::json!({ "error": "method not allowed: GET /status, POST /reload" })
                .to_string(),
        ),
        _ => (
            404,
            serde_json::json!({ "error": "unknown path: GET /status, POST /reload" }).to_string(),
        ),
    };
    http::respond(&mut conn, status, "application/json", body.as_bytes()).await
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

async fn call(path: &Path, method: &str, what: &str) -> Result<String, ControlError> {
    let mut conn = connect(path).await?;
    let (status, body) = http::call(&mut conn, method, what)
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
    let body = call(path, "GET", "/status").await?;
    serde_json::from_str(&body).map_err(|e| ControlError::Decode(e.to_string()))
}

/// Client: `POST /reload`.
pub async fn reload(path: &Path) -> Result<ReloadReport, ControlError> {
    let body = call(path, "POST", "/reload").await?;
    serde_json::from_str(&body).map_err(|e| ControlError::Decode(e.to_string()))
}
