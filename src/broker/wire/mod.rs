//! The broker's protocol: one request or reply per `SOCK_SEQPACKET`
//! message, a JSON body of at most [`MAX_MESSAGE`] bytes, fds as
//! `SCM_RIGHTS` only where the table says so.
//!
//! | request (relay → broker)        | fds | reply (broker → relay)                    | fds       |
//! |---------------------------------|-----|-------------------------------------------|-----------|
//! | `Resolve { refs }`              | 0   | `Resolved([Ok(ns) or Err(error), ...])`, in order | 0 |
//! | `Socket { ns, spec }`           | 0   | `Socket`                                  | 1         |
//! | `Refill { ns, spec, n ≤ 64 }`   | 0   | `Refilled { made, error }`                | `made`    |
//! | `Sockets { items ≤ 64 }`        | 0   | `Sockets([None or Some(error), ...])`     | the `None`s, in order |
//! | `Release { ns: [..] ≤ 1024 }`   | 0   | `Released`                                | 0         |
//! | `Bind { addrs }`                | 1   | `Bound`                                   | 0         |
//! | `ReadConfig`                    | 0   | `Config { len }`                          | 1 (sealed memfd: the text) |
//! | anything, failed or refused     |     | `Failed(error)`                           | 0         |
//!
//! Every message is `{"id": N, ...}`: a reply carries its request's `id`
//! (0 when the request was too broken to have one), and every request gets
//! exactly one reply, in the order the requests came. `refs` are
//! [`NsRef`]s in their text form (`host`, `ns1`, `/path`, `pid:42`);
//! `ns` is a namespace's identity `{dev, ino}`; `spec` is `socket(2)`'s
//! `{domain, ty, protocol}` (protocol 0: the default); `addrs` are socket
//! addresses as text (`10.0.0.1:80`, `[::]:443`); the one fd of `Bind` is
//! the socket to bind (several addresses: SCTP, `sctp_bindx`). Errors
//! ([`WireError`]) are data that map back to [`NsError`] variants, io
//! errors by errno.
//!
//! A `Resolve` batch is split ([`resolve_chunks`]) so that both it and its
//! reply fit in a message. Anything that does not decode, is cut short
//! (`MSG_TRUNC`, `MSG_CTRUNC`), is longer than [`MAX_MESSAGE`] or carries
//! fds it should not is refused (the fds closed) and counted by the broker.
//! Encoding and decoding are pure functions, property-tested below.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::netns::{Domain, NsError, NsId, NsRef, Protocol, SocketSpec, Type};

/// Longest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most sockets one `Refill` asks for.
pub const MAX_REFILL: u32 = 64;
/// Most namespaces one `Release` gives back (about 40 bytes each: the
/// message stays well inside [`MAX_MESSAGE`]).
pub const MAX_RELEASE: usize = 1024;

/// A namespace's identity on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ns {
    pub dev: u64,
    pub ino: u64,
}

impl From<NsId> for Ns {
    fn from(n: NsId) -> Ns {
        Ns {
            dev: n.dev,
            ino: n.ino,
        }
    }
}

impl From<Ns> for NsId {
    fn from(n: Ns) -> NsId {
        NsId {
            dev: n.dev,
            ino: n.ino,
        }
    }
}

/// `socket(2)`'s arguments on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Spec {
    pub domain: i32,
    pub ty: i32,
    /// 0: the default protocol of the type.
    pub protocol: i32,
    /// `IP_TRANSPARENT` set on it (absent: not).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transparent: bool,
}

impl From<SocketSpec> for Spec {
    fn from(s: SocketSpec) -> Spec {
        Spec {
            domain: s.domain.into(),
            ty: s.ty.into(),
            protocol: s.protocol.map_or(0, i32::from),
            transparent: s.transparent,
        }
    }
}

impl From<Spec> for SocketSpec {
    fn from(s: Spec) -> SocketSpec {
        SocketSpec {
            domain: Domain::from(s.domain),
            ty: Type::from(s.ty),
            protocol: (s.protocol != 0).then(|| Protocol::from(s.protocol)),
            transparent: s.transparent,
        }
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub op: Op,
}

/// What a request asks for (see the table in the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Resolve {
        refs: Vec<String>,
    },
    Socket {
        ns: Ns,
        spec: Spec,
    },
    Refill {
        ns: Ns,
        spec: Spec,
        n: u32,
    },
    /// Sockets of several namespaces or kinds at once (start-up opens
    /// thousands of listeners, each in its own namespace): one message.
    Sockets {
        items: Vec<(Ns, Spec)>,
    },
    /// Namespaces given back together (after a start-up, the fds of the
    /// thousands it only listens in): one message.
    Release {
        ns: Vec<Ns>,
    },
    Bind {
        addrs: Vec<SocketAddr>,
    },
    ReadConfig,
}

impl Op {
    /// How many fds a request of this kind must carry.
    pub fn fds(&self) -> usize {
        match self {
            Op::Bind { .. } => 1,
            _ => 0,
        }
    }

    /// The kind's name, for logs and counters.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Resolve { .. } => "resolve",
            Op::Socket { .. } => "socket",
            Op::Refill { .. } => "refill",
            Op::Sockets { .. } => "sockets",
            Op::Release { .. } => "release",
            Op::Bind { .. } => "bind",
            Op::ReadConfig => "read-config",
        }
    }
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    pub outcome: Outcome,
}

/// What came of a request (see the table in the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Resolved(Vec<Result<Ns, WireError>>),
    /// One fd: the socket.
    Socket,
    /// `made` fds; `error`: why it stopped short, if it did.
    Refilled {
        made: u32,
        error: Option<WireError>,
    },
    /// One result per item asked for, in order; one fd per `None`.
    Sockets(Vec<Option<WireError>>),
    Released,
    Bound,
    /// One fd: a sealed memfd holding the config's text, `len` bytes (a
    /// config can be far larger than a message).
    Config {
        len: u64,
    },
    Failed(WireError),
}

impl Outcome {
    /// How many fds a reply of this kind carries.
    pub fn fds(&self) -> usize {
        match self {
            Outcome::Socket | Outcome::Config { .. } => 1,
            Outcome::Refilled { made, .. } => *made as usize,
            Outcome::Sockets(results) => results.iter().filter(|r| r.is_none()).count(),
            _ => 0,
        }
    }
}

/// An io error on the wire: its errno when it has one, and its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireIo {
    pub errno: Option<i32>,
    pub message: String,
}

impl From<&io::Error> for WireIo {
    fn from(e: &io::Error) -> WireIo {
        WireIo {
            errno: e.raw_os_error(),
            message: e.to_string(),
        }
    }
}

impl From<WireIo> for io::Error {
    fn from(w: WireIo) -> io::Error {
        match w.errno {
            Some(n) => io::Error::from_raw_os_error(n),
            None => io::Error::other(w.message),
        }
    }
}

/// An error on the wire: the [`NsError`] variants, plus the broker's own
/// refusals and io errors of `Bind` and `ReadConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireError {
    NotFound {
        reference: String,
        path: String,
    },
    Open {
        reference: String,
        path: String,
        error: WireIo,
    },
    NotNsfs {
        reference: String,
        path: String,
        fs: String,
    },
    NotAFile {
        reference: String,
        path: String,
        kind: String,
    },
    WrongKind {
        reference: String,
        path: String,
        kind: String,
    },
    CannotEnter {
        reference: String,
        path: String,
        error: WireIo,
    },
    Enter {
        ns: Ns,
        error: WireIo,
    },
    Socket {
        ns: Ns,
        error: WireIo,
    },
    Transparent {
        ns: Ns,
        error: WireIo,
    },
    Pattern {
        reference: String,
    },
    NotOpen {
        ns: Ns,
    },
    Stopped,
    /// The broker's policy (or its input checks) refused the request.
    Refused {
        reason: String,
    },
    Io(WireIo),
}

fn path_text(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

impl From<&NsError> for WireError {
    fn from(e: &NsError) -> WireError {
        let r = |r: &NsRef| r.to_string();
        match e {
            NsError::NotFound { reference, path } => WireError::NotFound {
                reference: r(reference),
                path: path_text(path),
            },
            NsError::Open {
                reference,
                path,
                source,
            } => WireError::Open {
                reference: r(reference),
                path: path_text(path),
                error: source.into(),
            },
            NsError::NotNsfs {
                reference,
                path,
                fs,
            } => WireError::NotNsfs {
                reference: r(reference),
                path: path_text(path),
                fs: fs.clone(),
            },
            NsError::NotAFile {
                reference,
                path,
                kind,
            } => WireError::NotAFile {
                reference: r(reference),
                path: path_text(path),
                kind: (*kind).to_owned(),
            },
            NsError::WrongKind {
                reference,
                path,
                kind,
            } => WireError::WrongKind {
                reference: r(reference),
                path: path_text(path),
                kind: (*kind).to_owned(),
            },
            NsError::CannotEnter {
                reference,
                path,
                source,
            } => WireError::CannotEnter {
                reference: r(reference),
                path: path_text(path),
                error: source.into(),
            },
            NsError::Enter { ns, source } => WireError::Enter {
                ns: (*ns).into(),
                error: source.into(),
            },
            NsError::Socket { ns, source } => WireError::Socket {
                ns: (*ns).into(),
                error: source.into(),
            },
            NsError::Transparent { ns, source } => WireError::Transparent {
                ns: (*ns).into(),
                error: source.into(),
            },
            NsError::Pattern { reference } => WireError::Pattern {
                reference: r(reference),
            },
            NsError::NotOpen { ns } => WireError::NotOpen { ns: (*ns).into() },
            NsError::Stopped => WireError::Stopped,
            NsError::Refused { reason } => WireError::Refused {
                reason: reason.clone(),
            },
            NsError::BrokerGone { .. } => WireError::Stopped,
        }
    }
}

/// The `&'static str` kinds [`NsError`] names files and namespaces by.
const KINDS: &[&str] = &[
    "a FIFO",
    "a socket",
    "a device",
    "a directory",
    "not a regular file",
    "mount",
    "uts",
    "ipc",
    "user",
    "pid",
    "cgroup",
    "time",
    "net",
];

fn kind(s: &str) -> &'static str {
    KINDS
        .iter()
        .find(|k| **k == s)
        .copied()
        .unwrap_or("unknown")
}

fn reference(s: String) -> NsRef {
    s.parse().unwrap_or(NsRef::Named(s))
}

impl WireError {
    /// The [`NsError`] this stands for.
    pub fn into_ns_error(self) -> NsError {
        match self {
            WireError::NotFound { reference: r, path } => NsError::NotFound {
                reference: reference(r),
                path: PathBuf::from(path),
            },
            WireError::Open {
                reference: r,
                path,
                error,
            } => NsError::Open {
                reference: reference(r),
                path: PathBuf::from(path),
                source: error.into(),
            },
            WireError::NotNsfs {
                reference: r,
                path,
                fs,
            } => NsError::NotNsfs {
                reference: reference(r),
                path: PathBuf::from(path),
                fs,
            },
            WireError::NotAFile {
                reference: r,
                path,
                kind: k,
            } => NsError::NotAFile {
                reference: reference(r),
                path: PathBuf::from(path),
                kind: kind(&k),
            },
            WireError::WrongKind {
                reference: r,
                path,
                kind: k,
            } => NsError::WrongKind {
                reference: reference(r),
                path: PathBuf::from(path),
                kind: kind(&k),
            },
            WireError::CannotEnter {
                reference: r,
                path,
                error,
            } => NsError::CannotEnter {
                reference: reference(r),
                path: PathBuf::from(path),
                source: error.into(),
            },
            WireError::Enter { ns, error } => NsError::Enter {
                ns: ns.into(),
                source: error.into(),
            },
            WireError::Socket { ns, error } => NsError::Socket {
                ns: ns.into(),
                source: error.into(),
            },
            WireError::Transparent { ns, error } => NsError::Transparent {
                ns: ns.into(),
                source: error.into(),
            },
            WireError::Pattern { reference: r } => NsError::Pattern {
                reference: reference(r),
            },
            WireError::NotOpen { ns } => NsError::NotOpen { ns: ns.into() },
            WireError::Stopped => NsError::Stopped,
            WireError::Refused { reason } => NsError::Refused { reason },
            WireError::Io(e) => NsError::Refused {
                reason: e.message.clone(),
            },
        }
    }

    /// The io error this stands for (for `Bind` and `ReadConfig`).
    pub fn into_io_error(self) -> io::Error {
        match self {
            WireError::Io(e) => e.into(),
            WireError::Refused { reason } => io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the socket broker refused: {reason}"),
            ),
            other => io::Error::other(other.into_ns_error().to_string()),
        }
    }
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireFault {
    #[error("message of {0} bytes, over the limit of {MAX_MESSAGE}")]
    TooLong(usize),
    #[error("undecodable message: {0}")]
    Malformed(String),
}

fn encode<T: Serialize>(m: &T) -> Result<Vec<u8>, WireFault> {
    let v = serde_json::to_vec(m).map_err(|e| WireFault::Malformed(e.to_string()))?;
    if v.len() > MAX_MESSAGE {
        return Err(WireFault::TooLong(v.len()));
    }
    Ok(v)
}

fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, WireFault> {
    if b.len() > MAX_MESSAGE {
        return Err(WireFault::TooLong(b.len()));
    }
    serde_json::from_slice(b).map_err(|e| WireFault::Malformed(e.to_string()))
}

pub fn encode_request(r: &Request) -> Result<Vec<u8>, WireFault> {
    encode(r)
}

pub fn decode_request(b: &[u8]) -> Result<Request, WireFault> {
    decode(b)
}

pub fn encode_reply(r: &Reply) -> Result<Vec<u8>, WireFault> {
    encode(r)
}

pub fn decode_reply(b: &[u8]) -> Result<Reply, WireFault> {
    decode(b)
}

/// The `id` of a message that does not decode as a whole, if it has one
/// (so that its refusal reaches the right caller).
pub fn salvage_id(b: &[u8]) -> u64 {
    #[derive(Deserialize)]
    struct IdOnly {
        id: u64,
    }
    serde_json::from_slice::<IdOnly>(b).map_or(0, |m| m.id)
}

/// Room left in a message for what is not the references themselves.
const CHUNK_BUDGET: usize = MAX_MESSAGE - 4096;

/// Splits `refs` (text forms) into consecutive ranges whose `Resolve`
/// request and reply each fit in a message. A reference too long for any
/// message is a range of its own (its encoding then fails, and only it).
pub fn resolve_chunks(refs: &[String]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (i, r) in refs.iter().enumerate() {
        // Its JSON text, in the request once and in an error reply at most
        // twice (as the reference and in its path), plus the error's words.
        let escaped = serde_json::to_string(r).map_or(r.len() * 6, |s| s.len());
        let cost = 2 * escaped + 24 + 256;
        if i > start && used + cost > CHUNK_BUDGET {
            out.push(start..i);
            start = i;
            used = 0;
        }
        used += cost;
    }
    if start < refs.len() {
        out.push(start..refs.len());
    }
    out
}

#[cfg(test)]
pub(crate) mod tests;
