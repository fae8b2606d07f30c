//! Namespaces outside /run/netns, followed live: an absolute-path pattern
//! (`/var/run/docker/netns/*`-style) and an exact path whose file goes and
//! comes back (a container restarted), with namespaces bind-mounted into a
//! directory of the test's own, the way Docker and containerd pin theirs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;

/// A TCP rule to `127.0.0.1:9000` in nsproxy's own namespace.
fn to_host(name: &str, listen: &str) -> Rule {
    tcp(name)
        .listen(listen)
        .upstream_in("host", "127.0.0.1:9000")
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A directory of namespace pins, a shared mount of its own so that the
/// mounts made in it reach nsproxy (which `ip netns exec` starts in a mount
/// namespace of its own, a slave of this one). Everything mounted in it is
/// unmounted when it drops, also on panic.
struct PinDir {
    dir: TempDir,
}

impl PinDir {
    fn new() -> PinDir {
        let dir = TempDir::new();
        let p = dir.0.to_str().unwrap().to_owned();
        let p = p.as_str();
        run("mount", &["--bind", p, p]);
        let pins = PinDir { dir };
        run("mount", &["--make-shared", p]);
        pins
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// A pattern over this directory's files.
    fn pattern(&self, p: &str) -> String {
        format!("{}/{p}", self.dir.0.display())
    }

    /// An empty file, as `ip netns add` and containerd make first.
    fn placeholder(&self, name: &str) -> PathBuf {
        let f = self.path(name);
        std::fs::write(&f, b"").unwrap();
        f
    }

    /// Mounts `ns` on the file `name` (made if missing).
    fn pin(&self, name: &str, ns: &TestNs) {
        let f = self.path(name);
        if !f.exists() {
            self.placeholder(name);
        }
        let from = format!("/run/netns/{}", ns.name());
        run("mount", &["--bind", &from, f.to_str().unwrap()]);
    }

    /// Unmounts the file `name`; it stays, empty.
    fn unpin(&self, name: &str) {
        run("umount", &[self.path(name).to_str().unwrap()]);
    }

    /// Unmounts and removes the file `name`, as `ip netns del` does.
    fn remove(&self, name: &str) {
        self.unpin(name);
        std::fs::remove_file(self.path(name)).unwrap();
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Lazily and recursively: every pin, then the directory's own bind.
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(&self.dir.0)
            .status();
    }
}

/// Waits (bounded) until nothing listens on `addr` in `ns` any more.
fn wait_unserved(ns: &TestNs, addr: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    while ns.tcp_connect(addr).is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} in {} still served after {WAIT:?}\n{}",
            ns.name(),
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The fds of nsproxy's processes (relay and broker) that keep the
/// namespace of `ns_file` alive: namespace files, and sockets made in it.
fn namespace_fds(s: &Running, ns_file: &std::fs::File) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let ino = ns_file.metadata().unwrap().ino();
    let mut found = Vec::new();
    for pid in s.pids() {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in fds.flatten() {
            let link = std::fs::read_link(e.path()).unwrap_or_default();
            let is_ns = std::fs::metadata(e.path()).is_ok_and(|m| m.ino() == ino);
            if is_ns && !link.to_string_lossy().starts_with("socket:") {
                found.push(format!("{pid}: {}", link.display()));
            }
        }
        for (fd, ns) in socket_namespaces(pid) {
            if ns == ino {
                found.push(format!("{pid}: socket fd {fd}"));
            }
        }
    }
    found
}

fn hello_when_ready(ns: &TestNs, addr: &str) -> Vec<u8> {
    let mut c = ns.tcp_connect_when_ready(addr);
    read_all(&mut c).unwrap()
}

fn state_of(s: &Running, path: &Path) -> String {
    let (_, out, _) = s.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let b = v["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["netns"] == path.to_str().unwrap())
        .unwrap_or_else(|| panic!("no binding in {} in {out}", path.display()));
    b["state"].as_str().unwrap().to_owned()
}

#[test]
fn a_path_pattern_follows_files_present_mounted_later_unmounted_and_remounted() {
    as_root(|| {
        let pins = PinDir::new();
        let s = Scenario::with(&["a", "b", "other"])
            .tcp_hello("host", "127.0.0.1:9000", "hi\n")
            .rule(to_host("d", "127.0.0.1:7000").netns([&pins.pattern("c-*")]));
        // Present at start.
        pins.pin("c-a", s.ns("a"));
        let s = s.start();
        let (a, b) = (s.ns("a"), s.ns("b"));
        assert_eq!(hello_when_ready(a, "127.0.0.1:7000"), b"hi\n");

        // An empty file first, the namespace mounted onto it later: served
        // once it is a namespace (the mount-table wait).
        pins.placeholder("c-b");
        pins.pin("c-b", b);
        assert_eq!(hello_when_ready(b, "127.0.0.1:7000"), b"hi\n");
        // A file the pattern does not match is not followed.
        pins.pin("x-other", s.ns("other"));

        // Unmounted, the file left behind: no longer served.
        pins.unpin("c-b");
        wait_unserved(b, "127.0.0.1:7000", || s.log());
        // Mounted again: served again.
        pins.pin("c-b", b);
        assert_eq!(hello_when_ready(b, "127.0.0.1:7000"), b"hi\n");

        // The mount changes of c-b left c-a's listener alone (it is looked
        // at again on each, and is still the same namespace).
        let c_a = format!("\"netns\":\"{}\"", pins.path("c-a").display());
        let log = s.log();
        let opened = log
            .lines()
            .filter(|l| l.contains("\"message\":\"listening\"") && l.contains(&c_a))
            .count();
        assert_eq!(opened, 1, "{log}");

        // Unmounted and removed: released (no fd of nsproxy's keeps the
        // namespace alive); the other file still serves.
        let pin = std::fs::File::open(format!("/run/netns/{}", a.name())).unwrap();
        assert!(!namespace_fds(&s, &pin).is_empty(), "nsproxy holds it now");
        pins.remove("c-a");
        wait_unserved(a, "127.0.0.1:7000", || s.log());
        let deadline = Instant::now() + WAIT;
        while !namespace_fds(&s, &pin).is_empty() {
            let held = namespace_fds(&s, &pin);
            assert!(
                Instant::now() < deadline,
                "still held: {held:?}\n{}",
                s.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(hello_when_ready(b, "127.0.0.1:7000"), b"hi\n");
        assert!(
            s.ns("other").tcp_connect("127.0.0.1:7000").is_err(),
            "x-other does not match c-*"
        );
        let log = s.log();
        assert!(
            log.contains("is gone (its file was removed, unmounted or remounted)"),
            "{log}"
        );
    })
}

#[test]
fn an_exact_path_that_goes_and_comes_back_is_followed() {
    as_root(|| {
        let pins = PinDir::new();
        let ctr = pins.path("ctr");
        let s = Scenario::with(&["first", "second"])
            .tcp_hello("host", "127.0.0.1:9000", "ctr\n")
            .rule(to_host("c", "127.0.0.1:7001").netns([ctr.to_str().unwrap()]))
            .start();
        // Missing at start: waiting, not failed.
        assert_eq!(state_of(&s, &ctr), "waiting", "{}", s.log());
        pins.pin("ctr", s.ns("first"));
        assert_eq!(hello_when_ready(s.ns("first"), "127.0.0.1:7001"), b"ctr\n");
        assert_eq!(state_of(&s, &ctr), "listening");

        // The container stops: its file goes; the binding waits again.
        pins.remove("ctr");
        wait_unserved(s.ns("first"), "127.0.0.1:7001", || s.log());
        assert_eq!(state_of(&s, &ctr), "waiting", "{}", s.log());

        // It is restarted in a new namespace under the same path.
        pins.pin("ctr", s.ns("second"));
        assert_eq!(hello_when_ready(s.ns("second"), "127.0.0.1:7001"), b"ctr\n");
        assert!(s.ns("first").tcp_connect("127.0.0.1:7001").is_err());

        // Another namespace mounted on the same file, without removing it.
        pins.unpin("ctr");
        pins.pin("ctr", s.ns("first"));
        assert_eq!(hello_when_ready(s.ns("first"), "127.0.0.1:7001"), b"ctr\n");
        wait_unserved(s.ns("second"), "127.0.0.1:7001", || s.log());
    })
}

#[test]
fn a_reload_follows_the_directories_of_the_new_config() {
    as_root(|| {
        let (one, two) = (PinDir::new(), PinDir::new());
        let rule = |dir: &PinDir| to_host("r", "127.0.0.1:7002").netns([&dir.pattern("*")]);
        let s = Scenario::with(&["a", "b"])
            .tcp_hello("host", "127.0.0.1:9000", "re\n")
            .rule(rule(&one))
            .start();
        one.pin("a", s.ns("a"));
        assert_eq!(hello_when_ready(s.ns("a"), "127.0.0.1:7002"), b"re\n");
        // The pattern moves to another directory: its file is served at
        // the reload, what appears there later too, the old one no longer.
        two.pin("b", s.ns("b"));
        s.write_config(&[rule(&two)]);
        let (code, _, err) = s.cli(&["reload"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(hello_when_ready(s.ns("b"), "127.0.0.1:7002"), b"re\n");
        wait_unserved(s.ns("a"), "127.0.0.1:7002", || s.log());
        two.remove("b");
        wait_unserved(s.ns("b"), "127.0.0.1:7002", || s.log());
        two.pin("a", s.ns("a"));
        assert_eq!(hello_when_ready(s.ns("a"), "127.0.0.1:7002"), b"re\n");
        // The old directory is not followed any more.
        one.remove("a");
        one.pin("b", s.ns("b"));
        assert!(s.ns("b").tcp_connect("127.0.0.1:7002").is_err());
    })
}

/// Split, the relay (`nobody`) cannot watch a directory only root may read:
/// it says so, and a path there is still resolved (by the broker) at start.
#[test]
fn a_directory_the_relay_cannot_read_is_named_and_resolved_at_load() {
    as_root(|| {
        let pins = PinDir::new();
        std::fs::create_dir(pins.path("private")).unwrap();
        std::fs::set_permissions(
            pins.path("private"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let s = Scenario::with(&["a"]).tcp_hello("host", "127.0.0.1:9000", "p\n");
        pins.pin("private/ns", s.ns("a"));
        let file = pins.path("private/ns");
        let s = s
            .rule(to_host("p", "127.0.0.1:7003").netns([file.to_str().unwrap()]))
            .start();
        assert_eq!(hello_when_ready(s.ns("a"), "127.0.0.1:7003"), b"p\n");
        let log = s.wait_log("cannot watch");
        assert!(
            log.contains(&format!(
                "cannot watch {} as uid 65534",
                pins.path("private").display()
            )),
            "{log}"
        );
    })
}

#[test]
fn check_counts_path_pattern_matches_and_names_what_cannot_be_followed() {
    as_root(|| {
        let pins = PinDir::new();
        let a = TestNs::new("chk");
        pins.pin("c-1", &a);
        std::fs::create_dir(pins.path("private")).unwrap();
        std::fs::set_permissions(
            pins.path("private"),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let missing = pins.path("gone");
        let text = config(
            &[
                to_host("g", "127.0.0.1:7000")
                    .netns([&pins.pattern("c-*"), &pins.pattern("none-*")]),
                to_host("m", "127.0.0.1:7001").netns([missing.to_str().unwrap()]),
                to_host("p", "127.0.0.1:7002")
                    .netns([&format!("{}/*", pins.path("private").display())]),
            ]
            .map(|r| r.to_string())
            .concat(),
        );
        let f = pins.dir.file("nsproxy.toml", &text);
        let (code, out, err) = run_cli(&["check", "--config", f.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
        // c-1 (a pattern match) and the missing path count as bindings;
        // "none-*" and the private directory match nothing now.
        assert!(out.contains("2 binding(s) (1 from 3 pattern(s)"), "{out}");
        assert!(
            err.contains(&format!("matches no file in {} now", pins.dir.0.display())),
            "{err}"
        );
        assert!(
            err.contains("its binding waits, and opens when a network namespace is mounted there"),
            "{err}"
        );
        assert!(
            err.contains(&format!(
                "{} is not readable by `nobody`",
                pins.path("private").display()
            )),
            "{err}"
        );
    })
}

/// `/run/user/*/netns/*`: a wildcard directory too, its matches followed as
/// they come and go (a user's runtime directory made, its netns directory
/// made later, a pin in it, the whole directory removed).
#[test]
fn a_pattern_with_a_wildcard_directory_follows_new_directories() {
    as_root(|| {
        let pins = PinDir::new();
        let s = Scenario::with(&["a", "b"]).tcp_hello("host", "127.0.0.1:9000", "u\n");
        std::fs::create_dir_all(pins.path("u1/netns")).unwrap();
        pins.pin("u1/netns/a", s.ns("a"));
        let s = s
            .rule(to_host("u", "127.0.0.1:7004").netns([&pins.pattern("*/netns/*")]))
            .start();
        assert_eq!(hello_when_ready(s.ns("a"), "127.0.0.1:7004"), b"u\n");
        // A new user: its directory first, its netns directory afterwards.
        std::fs::create_dir(pins.path("u2")).unwrap();
        std::fs::create_dir(pins.path("u2/netns")).unwrap();
        pins.pin("u2/netns/b", s.ns("b"));
        assert_eq!(hello_when_ready(s.ns("b"), "127.0.0.1:7004"), b"u\n");
        // The user goes: the pin, then the directories.
        pins.remove("u2/netns/b");
        std::fs::remove_dir(pins.path("u2/netns")).unwrap();
        std::fs::remove_dir(pins.path("u2")).unwrap();
        wait_unserved(s.ns("b"), "127.0.0.1:7004", || s.log());
        // And comes back.
        std::fs::create_dir_all(pins.path("u2/netns")).unwrap();
        pins.pin("u2/netns/b", s.ns("b"));
        assert_eq!(hello_when_ready(s.ns("b"), "127.0.0.1:7004"), b"u\n");
        assert_eq!(hello_when_ready(s.ns("a"), "127.0.0.1:7004"), b"u\n");
    })
}
