//! The broker loop against a real namespace (root), and the remote
//! switcher's end of it. The loop runs on a thread of the test process: it
//! is that thread alone that switches namespaces, as in the broker process.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;

use super::wire::{self, Ns, Op, Outcome, Reply, Request, Spec, WireError};
use super::*;
use crate::netns::{NsError, Switcher};

use crate::privsep::is_root;

/// Whether a test needing root may run; without root it says why it skips,
/// and under `NSPROXY_REQUIRE_ROOT=1` a skip is a failure.
fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("NSPROXY_REQUIRE_ROOT").as_deref() == Ok("1") {
        panic!(
            "{test}: needs root (network namespaces), and NSPROXY_REQUIRE_ROOT=1 forbids skipping"
        );
    }
    eprintln!("SKIPPED {test}: needs root to create network namespaces");
    false
}

/// A namespace made with `ip netns add`, deleted when dropped.
struct TestNs(String);

impl TestNs {
    fn new(tag: &str) -> TestNs {
        use std::sync::atomic::AtomicUsize;
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "nsproxy-brk-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("ip netns add")
            .success();
        assert!(ok, "ip netns add {name}");
        TestNs(name)
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// A broker serving `specs`' policy on a thread; the relay's end.
fn start(
    specs: &[String],
) -> (
    OwnedFd,
    Arc<Refusals>,
    std::thread::JoinHandle<io::Result<()>>,
) {
    let config = config::parse_forward(specs, None).unwrap();
    let (relay, broker) = fdpass::seqpacket_pair().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let mut b = Broker::with_config(PolicySource::Forward(vec![]), &config).unwrap();
        tx.send(b.refusals()).unwrap();
        b.serve(broker.as_fd())
    });
    (relay, rx.recv().unwrap(), t)
}

fn call_raw(
    fd: &OwnedFd,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> (Reply, Vec<OwnedFd>) {
    fdpass::send(fd.as_fd(), bytes, fds, false).unwrap();
    let mut buf = vec![0; wire::MAX_MESSAGE + 1];
    let got = fdpass::recv(fd.as_fd(), &mut buf, fdpass::MAX_FDS, false).unwrap();
    assert!(!got.truncated && !got.ctrunc);
    (wire::decode_reply(&buf[..got.len]).unwrap(), got.fds)
}

/// The text a `Config` reply's sealed memfd holds (which cannot be changed).
fn config_text(r: &Reply, fds: Vec<OwnedFd>) -> String {
    use std::io::{Read, Write};
    let Outcome::Config { len } = r.outcome else {
        panic!("{r:?}")
    };
    let [fd] = <[OwnedFd; 1]>::try_from(fds).expect("one fd");
    let mut f = std::fs::File::from(fd);
    assert!(f.write_all(b"x").is_err(), "the memfd is sealed");
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    assert_eq!(text.len() as u64, len);
    text
}

fn call(fd: &OwnedFd, id: u64, op: Op) -> (Reply, Vec<OwnedFd>) {
    let bytes = wire::encode_request(&Request { id, op }).unwrap();
    let (reply, fds) = call_raw(fd, &bytes, &[]);
    assert_eq!(reply.id, id, "{reply:?}");
    (reply, fds)
}

fn refused(reply: &Reply) -> &str {
    match &reply.outcome {
        Outcome::Failed(WireError::Refused { reason }) => reason,
        other => panic!("not refused: {other:?}"),
    }
}

fn home_ns() -> Ns {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/self/ns/net").unwrap();
    Ns {
        dev: m.dev(),
        ino: m.ino(),
    }
}

#[test]
fn the_broker_serves_only_its_policy_and_survives_bad_input() {
    if !root_or_skip("the_broker_serves_only_its_policy_and_survives_bad_input") {
        return;
    }
    let ns1 = TestNs::new("a");
    let other = TestNs::new("b");
    let (fd, refusals, t) = start(&[format!("tcp:[::]:80@{}=127.0.0.1:9", ns1.0)]);
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);

    // A named namespace resolves; one the config does not name is refused.
    let (r, _) = call(
        &fd,
        1,
        Op::Resolve {
            refs: vec![ns1.0.clone(), other.0.clone(), "host".into()],
        },
    );
    let Outcome::Resolved(results) = r.outcome else {
        panic!("{r:?}")
    };
    let ns = results[0].clone().unwrap();
    assert_ne!(ns, home_ns());
    match &results[1] {
        Err(WireError::Refused { reason }) => assert!(reason.contains(&other.0), "{reason}"),
        e => panic!("{e:?}"),
    }
    assert_eq!(results[2], Ok(home_ns()));
    assert_eq!(count(&refusals.policy), 1);

    // The listen socket comes back, born in that namespace.
    let v6 = "[::]:0".parse().unwrap();
    let tcp6 = Spec::from(SocketSpec::tcp(&v6));
    let (r, fds) = call(&fd, 2, Op::Socket { ns, spec: tcp6 });
    assert_eq!(r.outcome, Outcome::Socket);
    assert_eq!(fds.len(), 1);
    assert_eq!(
        fdpass::socket_netns(fds[0].as_fd()).unwrap(),
        (ns.dev, ns.ino)
    );

    // Another kind of socket is refused, naming the kind.
    let v4 = "0.0.0.0:0".parse().unwrap();
    let (r, fds) = call(
        &fd,
        3,
        Op::Socket {
            ns,
            spec: SocketSpec::udp(&v4).into(),
        },
    );
    assert!(refused(&r).contains("UDP/IPv4"), "{r:?}");
    assert!(fds.is_empty());
    assert_eq!(count(&refusals.policy), 2);

    // Malformed, oversized, and with an fd it should not carry.
    let (r, _) = call_raw(&fd, b"{\"id\": 4, \"op\": {\"Sock", &[]);
    assert_eq!(r.id, 0);
    refused(&r);
    assert_eq!(count(&refusals.malformed), 1);
    let (r, _) = call_raw(&fd, &vec![b' '; wire::MAX_MESSAGE + 100], &[]);
    assert!(refused(&r).contains("longer"), "{r:?}");
    assert_eq!(count(&refusals.oversized), 1);
    let (spare, _keep) = fdpass::seqpacket_pair().unwrap();
    let bytes = wire::encode_request(&Request {
        id: 5,
        op: Op::Socket { ns, spec: tcp6 },
    })
    .unwrap();
    let (r, fds) = call_raw(&fd, &bytes, &[spare.as_fd()]);
    assert_eq!(r.id, 5);
    assert!(refused(&r).contains("fd"), "{r:?}");
    assert!(fds.is_empty());
    assert_eq!(count(&refusals.fds), 1);

    // A refill beyond the limit is refused; one within it comes whole.
    let (r, _) = call(
        &fd,
        6,
        Op::Refill {
            ns,
            spec: tcp6,
            n: wire::MAX_REFILL + 1,
        },
    );
    refused(&r);
    let (r, fds) = call(
        &fd,
        7,
        Op::Refill {
            ns,
            spec: tcp6,
            n: 5,
        },
    );
    assert_eq!(
        r.outcome,
        Outcome::Refilled {
            made: 5,
            error: None
        }
    );
    assert_eq!(fds.len(), 5);

    // A bind of an address no rule listens on is refused.
    let s = Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).unwrap();
    let bytes = wire::encode_request(&Request {
        id: 8,
        op: Op::Bind {
            addrs: vec!["[::1]:81".parse().unwrap()],
        },
    })
    .unwrap();
    let (r, _) = call_raw(&fd, &bytes, &[s.as_fd()]);
    assert!(refused(&r).contains("[::1]:81"), "{r:?}");
    // ReadConfig has no file to read in forward mode.
    let (r, _) = call(&fd, 9, Op::ReadConfig);
    refused(&r);

    // Still serving: a socket, then the namespace released.
    let (r, mut fds) = call(&fd, 10, Op::Socket { ns, spec: tcp6 });
    assert_eq!(r.outcome, Outcome::Socket);
    // The listen address of the rule, in its namespace: bound.
    let listener = Socket::from(fds.pop().unwrap());
    let bytes = wire::encode_request(&Request {
        id: 13,
        op: Op::Bind {
            addrs: vec!["[::]:80".parse().unwrap()],
        },
    })
    .unwrap();
    let (r, _) = call_raw(&fd, &bytes, &[listener.as_fd()]);
    assert_eq!(r.outcome, Outcome::Bound, "{r:?}");
    let port = listener.local_addr().unwrap().as_socket().unwrap().port();
    assert_eq!(port, 80);
    // The same address with a socket of the host namespace: refused.
    let (r, _) = call_raw(&fd, &bytes, &[s.as_fd()]);
    assert!(refused(&r).contains("host"), "{r:?}");
    // More namespaces than a release may carry: refused, none released
    // (a socket there is still made).
    let too_many = vec![ns; wire::MAX_RELEASE + 1];
    let (r, _) = call(&fd, 14, Op::Release { ns: too_many });
    assert!(refused(&r).contains("at most"), "{r:?}");
    let (r, _) = call(&fd, 15, Op::Socket { ns, spec: tcp6 });
    assert_eq!(r.outcome, Outcome::Socket, "{r:?}");
    // As many as it may carry: released.
    let (r, _) = call(
        &fd,
        11,
        Op::Release {
            ns: vec![ns; wire::MAX_RELEASE],
        },
    );
    assert_eq!(r.outcome, Outcome::Released);
    let (r, _) = call(&fd, 12, Op::Socket { ns, spec: tcp6 });
    assert!(refused(&r).contains("not resolved"), "{r:?}");

    // EOF ends the loop, at home.
    drop(fd);
    t.join().unwrap().unwrap();
}

#[test]
fn a_remote_switcher_gets_its_sockets_from_the_broker() {
    if !root_or_skip("a_remote_switcher_gets_its_sockets_from_the_broker") {
        return;
    }
    let ns1 = TestNs::new("r");
    let (fd, refusals, t) = start(&[format!("tcp:[::]:80@{}=127.0.0.1:9@{}", ns1.0, ns1.0)]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sw = Switcher::remote(fd, 0).unwrap();
    assert_eq!(Ns::from(sw.home()), home_ns());
    rt.block_on(async {
        let refs: Vec<NsRef> = vec![
            ns1.0.parse().unwrap(),
            "host".parse().unwrap(),
            "nope".parse().unwrap(),
        ];
        let got = sw.resolve_many(&refs).await;
        let ns = *got[0].as_ref().unwrap();
        assert_eq!(got[1].as_ref().unwrap(), &sw.home());
        assert!(
            matches!(got[2], Err(NsError::Refused { .. })),
            "{:?}",
            got[2]
        );
        let v6: SocketAddr = "[::]:0".parse().unwrap();
        let v4: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // Many asked for together: pipelined, all in the namespace.
        let futures: Vec<_> = (0..20)
            .map(|_| sw.socket(ns, SocketSpec::tcp(&v6)))
            .collect();
        for f in futures {
            let s = f.await.unwrap();
            assert_eq!(fdpass::socket_netns(s.as_fd()).unwrap(), (ns.dev, ns.ino));
        }
        // The pool refills through the broker.
        for _ in 0..40 {
            let s = sw.pooled_socket(ns, SocketSpec::tcp(&v4)).await.unwrap();
            assert_eq!(fdpass::socket_netns(s.as_fd()).unwrap(), (ns.dev, ns.ino));
        }
        let e = sw.socket(ns, SocketSpec::udp(&v4)).await.unwrap_err();
        assert!(matches!(e, NsError::Refused { .. }), "{e}");
        sw.release(ns);
        assert!(!sw.broker().unwrap().is_gone());
    });
    assert_eq!(refusals.policy.load(Ordering::Relaxed), 2);
    // The last handle dropped closes the socket: the broker ends.
    drop(sw);
    t.join().unwrap().unwrap();
}

#[test]
fn a_broker_gone_fails_every_request_and_says_so() {
    // No root needed: the "broker" is a socket closed by hand.
    let (relay, broker) = fdpass::seqpacket_pair().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let sw = Switcher::remote(relay, 4242).unwrap();
    let link = sw.broker().unwrap().clone();
    assert_eq!(link.pid(), 4242);
    rt.block_on(async {
        // A request in flight when it goes.
        let x: NsRef = "x".parse().unwrap();
        let pending = sw.resolve(&x);
        let gone = async {
            // The request reached the socket; then the broker dies.
            let mut buf = vec![0; wire::MAX_MESSAGE];
            let got = fdpass::recv(broker.as_fd(), &mut buf, 0, false).unwrap();
            assert!(got.len > 0);
            drop(broker);
        };
        let (r, ()) = tokio::join!(pending, gone);
        match r {
            Err(e @ NsError::BrokerGone { pid: 4242 }) => {
                assert!(e.to_string().contains("(pid 4242) is gone"), "{e}");
            }
            r => panic!("{r:?}"),
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), link.gone())
            .await
            .expect("told at once");
        assert!(link.is_gone());
        let v4: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let e = sw
            .socket(NsId { dev: 1, ino: 2 }, SocketSpec::tcp(&v4))
            .await
            .unwrap_err();
        assert!(matches!(e, NsError::BrokerGone { .. }), "{e}");
        let e = crate::netns::SocketFactory::read_config(&sw, "/x".as_ref())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
    });
}

#[test]
fn a_broker_reads_the_config_and_updates_its_policy() {
    if !root_or_skip("a_broker_reads_the_config_and_updates_its_policy") {
        return;
    }
    let ns1 = TestNs::new("c");
    let dir = std::env::temp_dir().join(format!("nsproxy-brk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    let rule = |ns: &str| {
        format!(
            "[[proxy]]\nname = \"a\"\nprotocol = \"tcp\"\nlisten = \"[::]:80\"\nnetns = [\"{ns}\"]\nupstream = \"127.0.0.1:9\"\n"
        )
    };
    std::fs::write(&path, rule("elsewhere")).unwrap();
    let (relay, broker) = fdpass::seqpacket_pair().unwrap();
    let source = PolicySource::File(path.clone());
    let t = std::thread::spawn(move || {
        let mut b = Broker::new(source).unwrap();
        b.serve(broker.as_fd())
    });
    let (r, _) = call(
        &relay,
        1,
        Op::Resolve {
            refs: vec![ns1.0.clone()],
        },
    );
    assert!(
        matches!(&r.outcome, Outcome::Resolved(v) if matches!(v[0], Err(WireError::Refused { .. }))),
        "{r:?}"
    );
    std::fs::write(&path, rule(&ns1.0)).unwrap();
    let (r, fds) = call(&relay, 2, Op::ReadConfig);
    assert_eq!(config_text(&r, fds), rule(&ns1.0));
    let (r, _) = call(
        &relay,
        3,
        Op::Resolve {
            refs: vec![ns1.0.clone()],
        },
    );
    assert!(
        matches!(&r.outcome, Outcome::Resolved(v) if v[0].is_ok()),
        "{r:?}"
    );
    // An invalid file: its text all the same (the relay refuses it), the
    // policy kept.
    std::fs::write(&path, "nonsense = [").unwrap();
    let (r, fds) = call(&relay, 4, Op::ReadConfig);
    assert_eq!(config_text(&r, fds), "nonsense = [");
    let (r, _) = call(
        &relay,
        5,
        Op::Resolve {
            refs: vec![ns1.0.clone()],
        },
    );
    assert!(
        matches!(&r.outcome, Outcome::Resolved(v) if v[0].is_ok()),
        "{r:?}"
    );
    drop(relay);
    t.join().unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_relay_without_the_privilege_gets_its_low_port_bound_by_the_broker() {
    if !root_or_skip("a_relay_without_the_privilege_gets_its_low_port_bound_by_the_broker") {
        return;
    }
    let ns1 = TestNs::new("p");
    let spec = format!("tcp:[::]:80@{}=127.0.0.1:9", ns1.0);
    // The broker thread keeps every capability; the relay's thread below
    // drops CAP_NET_BIND_SERVICE.
    let (fd, _refusals, t) = start(std::slice::from_ref(&spec));
    let rule = Arc::new(
        config::parse_forward(&[spec], None)
            .unwrap()
            .rules
            .remove(0),
    );
    let relay = std::thread::spawn(move || {
        const CAP_NET_BIND_SERVICE: u32 = 10;
        fdpass::drop_thread_capability(CAP_NET_BIND_SERVICE).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let remote = Switcher::remote(fd, 0).unwrap();
        let local = Switcher::spawn().unwrap();
        rt.block_on(async {
            let r: NsRef = ns1.0.parse().unwrap();
            for (sw, through_broker) in [(local, false), (remote, true)] {
                let ns = sw.resolve(&r).await.unwrap();
                let b = crate::proxy::Binding::new(
                    rule.clone(),
                    r.clone(),
                    ns,
                    sw.home(),
                    Arc::new(sw.clone()),
                    None,
                );
                let got = crate::proxy::tcp::listen(&b, crate::proxy::Listener::ask(&b)).await;
                if through_broker {
                    let l = got.unwrap();
                    assert_eq!(l.local_addr().unwrap().port(), 80);
                } else {
                    // No broker: this thread may not bind port 80 itself.
                    let e = got.unwrap_err();
                    assert!(e.to_string().contains("Permission denied"), "{e}");
                }
                drop(b);
                sw.release(ns);
            }
        });
        drop(ns1);
    });
    relay.join().unwrap();
    t.join().unwrap().unwrap();
}

mod fuzz {
    use proptest::prelude::*;

    use super::*;

    /// A broker whose policy names only `host`: nothing it may do switches
    /// namespaces, so it runs on the test's thread without root.
    fn host_only() -> Broker {
        let config = config::parse_forward(&["tcp:127.0.0.1:1=127.0.0.1:2".into()], None).unwrap();
        Broker::with_config(PolicySource::Forward(vec![]), &config).unwrap()
    }

    fn received(len: usize, fds: usize, truncated: bool, ctrunc: bool) -> fdpass::Received {
        let fds = (0..fds)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
            .collect();
        fdpass::Received {
            len,
            fds,
            truncated,
            ctrunc,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes, any fds: a reply, never a panic, and sockets only
        /// where the reply says so.
        #[test]
        fn any_bytes_get_a_reply(bytes in prop::collection::vec(any::<u8>(), 0..300), fds in 0..3usize, t in any::<bool>(), c in any::<bool>()) {
            let mut b = host_only();
            let (reply, sockets) = b.handle(&bytes, received(bytes.len(), fds, t, c));
            prop_assert!(matches!(reply.outcome, Outcome::Failed(_)));
            prop_assert!(sockets.is_empty());
        }

        /// Well-formed requests of every kind, with and without an fd, in
        /// any order: each gets a reply whose fds match it.
        #[test]
        fn any_requests_get_consistent_replies(ops in prop::collection::vec((wire::tests::op(), 0..2usize), 1..12)) {
            let mut b = host_only();
            for (i, (op, fds)) in ops.into_iter().enumerate() {
                let bytes = wire::encode_request(&Request { id: i as u64, op }).unwrap();
                let (reply, sockets) = b.handle(&bytes, received(bytes.len(), fds, false, false));
                prop_assert_eq!(reply.id, i as u64);
                prop_assert_eq!(reply.outcome.fds(), sockets.len());
            }
        }
    }
}
