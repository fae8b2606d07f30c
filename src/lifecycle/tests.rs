//! The server through its socket seam: a fake factory that needs no root
//! and fails on purpose, with no test code on the production paths.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::netns::{NsError, ResolveFuture, Socket, SocketFuture, SocketSpec};
use crate::status::BindingState;

/// Namespaces by name, all of them really this process's own (sockets are
/// made here); a socket asked for in `panics_in` panics, and so does the
/// next one of the home namespace once `panic_at_home` is set.
#[derive(Debug)]
struct Fake {
    home: NsId,
    names: HashMap<String, NsId>,
    panics_in: Option<NsId>,
    panic_at_home: AtomicBool,
    released: Mutex<Vec<NsId>>,
}

impl Fake {
    fn new(names: &[&str], panics_in: Option<&str>) -> Fake {
        let names: HashMap<String, NsId> = names
            .iter()
            .zip(10..)
            .map(|(n, ino)| ((*n).to_owned(), NsId { dev: 1, ino }))
            .collect();
        Fake {
            home: NsId { dev: 1, ino: 1 },
            panics_in: panics_in.map(|n| names[n]),
            panic_at_home: AtomicBool::new(false),
            names,
            released: Mutex::default(),
        }
    }

    fn make(&self, ns: NsId, spec: SocketSpec) -> Result<Socket, NsError> {
        assert!(self.panics_in != Some(ns), "injected panic for {ns}");
        let at_home = ns == self.home && self.panic_at_home.swap(false, SeqCst);
        assert!(!at_home, "injected panic for an upstream socket");
        crate::netns::socket_here(ns, spec)
    }
}

impl SocketFactory for Fake {
    fn home(&self) -> NsId {
        self.home
    }

    fn resolve_many<'a>(&'a self, references: &'a [NsRef]) -> ResolveFuture<'a> {
        let out = references
            .iter()
            .map(|r| match r {
                NsRef::Host => Ok(self.home),
                NsRef::Named(n) => self.names.get(n).copied().ok_or(NsError::NotFound {
                    reference: r.clone(),
                    path: PathBuf::from("/nowhere"),
                }),
                _ => Err(NsError::Stopped),
            })
            .collect();
        Box::pin(async move { out })
    }

    fn socket(&self, ns: NsId, spec: SocketSpec) -> SocketFuture {
        SocketFuture::made(self.make(ns, spec))
    }

    fn pooled_socket(&self, ns: NsId, spec: SocketSpec) -> SocketFuture {
        self.socket(ns, spec)
    }

    fn socket_blocking(&self, ns: NsId, spec: SocketSpec) -> Result<Socket, NsError> {
        self.make(ns, spec)
    }

    fn release(&self, ns: NsId) {
        self.released.lock().unwrap().push(ns);
    }
}

fn config(netns: &str) -> Config {
    config_to(netns, "127.0.0.1:9".parse().unwrap())
}

fn config_to(netns: &str, upstream: SocketAddr) -> Config {
    crate::config::parse_toml(
        &format!(
            "[[proxy]]\nname = \"r\"\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:0\"\nnetns = [{netns}]\nupstream = \"{upstream}\"\nupstream_netns = \"host\"\n"
        ),
        "test",
    )
    .unwrap()
}

/// An echo server on the loopback, for as long as the runtime runs.
async fn echo() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    at
}

/// Polls the server's status until `ok` holds for it (at most 10 s).
async fn until(server: &Server, what: &str, ok: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = server.status().await;
        if ok(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: {st:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn binding<'a>(st: &'a Status, netns: &str) -> &'a crate::status::BindingReport {
    st.bindings.iter().find(|b| b.netns == netns).unwrap()
}

async fn round_trip(at: &str) -> std::io::Result<Vec<u8>> {
    let mut c = tokio::net::TcpStream::connect(at).await?;
    c.write_all(b"ping").await?;
    c.shutdown().await?;
    let mut got = Vec::new();
    c.read_to_end(&mut got).await?;
    Ok(got)
}

/// Options following an empty directory of namespaces.
fn options(dir: &std::path::Path) -> Options {
    Options {
        netns_dir: dir.to_owned(),
        ..Options::default()
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nsproxy-lifecycle-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_panic_while_opening_fails_that_binding_alone() {
    let dir = temp_dir("panic");
    let rt = crate::runtime::build(1).unwrap();
    rt.block_on(async {
        let fake: Arc<dyn SocketFactory> = Arc::new(Fake::new(&["ok", "bad"], Some("bad")));
        let server = Server::start(config("\"ok\", \"bad\""), fake, options(&dir)).await;
        let st = server.status().await;
        let by_ns = |n: &str| st.bindings.iter().find(|b| b.netns == n).unwrap().clone();
        assert_eq!(by_ns("ok").state, BindingState::Listening, "{st:?}");
        let bad = by_ns("bad");
        assert_eq!(bad.state, BindingState::Failed, "{st:?}");
        let reason = bad.reason.unwrap();
        assert!(reason.contains("injected panic"), "{reason}");
        // The server still answers, and reloads.
        let r = server.reload(Some(config("\"ok\""))).await.unwrap();
        assert_eq!((r.removed, r.unchanged), (1, 1));
        server.shutdown().await;
    });
    let _ = std::fs::remove_dir(&dir);
}

#[test]
fn a_panic_while_serving_fails_that_binding_alone() {
    let dir = temp_dir("serve-panic");
    let rt = crate::runtime::build(1).unwrap();
    rt.block_on(async {
        let upstream = echo().await;
        let fake = Arc::new(Fake::new(&["a", "b"], None));
        let sockets: Arc<dyn SocketFactory> = fake.clone();
        let cfg = config_to("\"a\", \"b\"", upstream);
        let server = Server::start(cfg.clone(), sockets, options(&dir)).await;
        let st = until(&server, "both listen", |st| {
            st.bindings
                .iter()
                .all(|b| b.state == BindingState::Listening)
        })
        .await;
        let local = |st: &Status, n: &str| binding(st, n).local.clone().unwrap();
        let (a, b) = (local(&st, "a"), local(&st, "b"));
        assert_eq!(round_trip(&a).await.unwrap(), b"ping");

        // The upstream socket of a's next client is asked for by a's
        // accept loop: the panic is in a's serve task.
        fake.panic_at_home.store(true, SeqCst);
        assert!(round_trip(&a).await.map_or(true, |got| got.is_empty()));
        let st = until(&server, "a failed", |st| {
            binding(st, "a").state == BindingState::Failed
        })
        .await;
        let reason = binding(&st, "a").reason.clone().unwrap();
        assert!(
            reason.contains("injected panic for an upstream socket"),
            "{reason}"
        );
        assert_eq!(binding(&st, "b").state, BindingState::Listening);
        assert_eq!(round_trip(&b).await.unwrap(), b"ping");

        // A reload tries the failed binding again.
        let r = server.reload(Some(cfg)).await.unwrap();
        assert_eq!((r.reopened, r.unchanged), (1, 1), "{r:?}");
        let st = until(&server, "a listens again", |st| {
            binding(st, "a").state == BindingState::Listening
        })
        .await;
        assert_eq!(round_trip(&local(&st, "a")).await.unwrap(), b"ping");
        server.shutdown().await;
    });
    let _ = std::fs::remove_dir(&dir);
}

#[test]
fn a_missing_namespace_waits_and_a_reload_without_a_file_is_refused() {
    let dir = temp_dir("wait");
    let rt = crate::runtime::build(1).unwrap();
    rt.block_on(async {
        let fake = Arc::new(Fake::new(&["x"], None));
        let sockets: Arc<dyn SocketFactory> = fake.clone();
        let server = Server::start(config("\"x\", \"absent\""), sockets, options(&dir)).await;
        let st = server.status().await;
        let absent = st.bindings.iter().find(|b| b.netns == "absent").unwrap();
        assert_eq!(absent.state, BindingState::Waiting);
        assert!(absent.reason.as_deref().unwrap().contains("not found"));
        assert_eq!(server.reload(None).await, Err(ReloadError::NoConfigFile));
        // A namespace only listened in is given back once its listener
        // is made: no binding connects from it.
        let x = NsId { dev: 1, ino: 10 };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !fake.released.lock().unwrap().contains(&x) {
            assert!(Instant::now() < deadline, "x was not released");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.shutdown().await;
    });
    let _ = std::fs::remove_dir(&dir);
}
