//! Namespace discovery: names that appear in and vanish from a netns
//! directory are reported once they really are namespaces.

mod common;

use std::time::Duration;

use common::*;
use nsproxy::netns::NsRef;
use nsproxy::netns::discovery::{Discovery, NsEvent};

fn next(d: &mut Discovery, rt: &tokio::runtime::Runtime) -> NsEvent {
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), d.next())
            .await
            .expect("an event within 5 s")
            .expect("discovery works")
    })
}

#[test]
fn appearing_and_vanishing_namespaces_are_reported() {
    as_root(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        // /run/netns is shared with every other test; only our names count.
        let mut d = Discovery::start("/run/netns".as_ref()).unwrap();
        // Other tests' namespaces come and go too: skip past their events.
        let mut wait_for = |want: NsEvent| {
            for _ in 0..10_000 {
                if next(&mut d, &rt) == want {
                    return;
                }
            }
            panic!("never saw {want:?}");
        };
        let a = TestNs::new("disc");
        wait_for(NsEvent::Appeared(NsRef::Named(a.name().to_owned())));
        let name = a.name().to_owned();
        drop(a);
        wait_for(NsEvent::Gone(NsRef::Named(name)));
    })
}

#[test]
fn a_directory_created_later_is_followed() {
    as_root(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _enter = rt.enter();
        let dir = TempDir::new();
        let netns_dir = dir.0.join("netns");
        let mut d = Discovery::start(&netns_dir).unwrap();
        // A pin made by hand, the way `ip netns add` does it: a placeholder
        // file first, the bind mount of a namespace onto it afterwards.
        let ns = TestNs::new("pin");
        std::fs::create_dir(&netns_dir).unwrap();
        let pin = netns_dir.join("x");
        std::fs::write(&pin, b"").unwrap();
        let mount = std::process::Command::new("mount")
            .args([
                "--bind",
                &format!("/run/netns/{}", ns.name()),
                pin.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(mount.success());
        assert_eq!(
            next(&mut d, &rt),
            NsEvent::Appeared(NsRef::Named("x".into()))
        );
        let umount = std::process::Command::new("umount")
            .arg(&pin)
            .status()
            .unwrap();
        assert!(umount.success());
        std::fs::remove_file(&pin).unwrap();
        assert_eq!(next(&mut d, &rt), NsEvent::Gone(NsRef::Named("x".into())));
    })
}
