//! The server through its socket seam: a fake factory that needs no root
//! and fails on purpose, with no test code on the production paths.

use std::collections::HashMap;
use std::sync::Mutex;

use super::*;
use crate::netns::{NsError, ResolveFuture, Socket, SocketFuture, SocketSpec};
use crate::status::BindingState;

/// Namespaces by name, all of them really this process's own (sockets are
/// made here); a socket asked for in `panics_in` panics.
#[derive(Debug)]
struct Fake {
    home: NsId,
    names: HashMap<String, NsId>,
    panics_in: Option<NsId>,
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
            names,
            released: Mutex::default(),
        }
    }

    fn make(&self, ns: NsId, spec: SocketSpec) -> Result<Socket, NsError> {
        assert!(self.panics_in != Some(ns), "injected panic for {ns}");
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
        let made = self.make(ns, spec);
        Box::pin(async move { made })
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
    crate::config::parse_toml(
        &format!(
            "[[proxy]]\nname = \"r\"\nprotocol = \"tcp\"\nlisten = \"127.0.0.1:0\"\nnetns = [{netns}]\nupstream = \"127.0.0.1:9\"\nupstream_netns = \"host\"\n"
        ),
        "test",
    )
    .unwrap()
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
