//! `nsproxy run --watch-config`: the config file followed without SIGHUP —
//! a Kubernetes ConfigMap update (the `..data` symlink swapped), an edit in
//! place, a bad text refused while the old rules keep serving, and a
//! directory only root may read still followed by the unprivileged relay.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::*;

/// A TCP rule to the hello server on `127.0.0.1:9000` in nsproxy's namespace.
fn to_host(name: &str, listen: &str) -> Rule {
    tcp(name)
        .listen(listen)
        .netns(["a"])
        .upstream_in("host", "127.0.0.1:9000")
}

/// A directory laid out as the kubelet lays out a ConfigMap volume:
/// `nsproxy.toml → ..data/nsproxy.toml`, `..data → ..2026_12_03_…`. Each
/// [`ConfigMap::publish`] is an update made as the kubelet makes it.
struct ConfigMap {
    dir: TempDir,
    published: usize,
}

impl ConfigMap {
    fn new(text: &str) -> ConfigMap {
        let mut cm = ConfigMap {
            dir: TempDir::new(),
            published: 0,
        };
        cm.publish(text);
        std::os::unix::fs::symlink("..data/nsproxy.toml", cm.path()).unwrap();
        cm
    }

    /// The path the pod is given.
    fn path(&self) -> PathBuf {
        self.dir.0.join("nsproxy.toml")
    }

    /// Writes the new text in a new timestamped directory, points
    /// `..data_tmp` at it, renames `..data_tmp` over `..data` (the one
    /// atomic step) and removes the old directory.
    fn publish(&mut self, text: &str) {
        let old = self.data_dir();
        self.published += 1;
        let new = self.data_dir();
        std::fs::create_dir(self.dir.0.join(&new)).unwrap();
        std::fs::write(self.dir.0.join(&new).join("nsproxy.toml"), text).unwrap();
        // Another key of the ConfigMap, as kubelet writes every key.
        std::fs::write(self.dir.0.join(&new).join("README"), "other key").unwrap();
        let tmp = self.dir.0.join("..data_tmp");
        std::os::unix::fs::symlink(&new, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.0.join("..data")).unwrap();
        if self.published > 1 {
            std::fs::remove_dir_all(self.dir.0.join(old)).unwrap();
        }
    }

    fn data_dir(&self) -> String {
        format!(
            "..2026_12_03_10_00_{:02}.{}",
            self.published,
            std::process::id()
        )
    }
}

#[test]
fn a_configmap_update_is_followed_and_a_bad_one_refused() {
    as_root(|| {
        let (one, two) = (
            to_host("one", "127.0.0.1:7000"),
            to_host("two", "127.0.0.1:7001"),
        );
        let s = Scenario::with(&["a"])
            .tcp_hello("host", "127.0.0.1:9000", "hello\n")
            .rule(one.clone());
        let mut cm = ConfigMap::new(&s.config_text());
        let path = cm.path().display().to_string();
        let s = s.start_command(&["run", "--config", &path, "--watch-config"]);
        let a = s.ns("a");
        assert_eq!(
            read_all(&mut a.tcp_connect_when_ready("127.0.0.1:7000")).unwrap(),
            b"hello\n"
        );
        s.wait_log("--watch-config");

        // A new rule, published: served without a SIGHUP.
        cm.publish(&s.config_for(&[one.clone(), two.clone()]));
        s.wait_log("config reloaded");
        let mut c = a.tcp_connect_when_ready("127.0.0.1:7001");
        assert_eq!(read_all(&mut c).unwrap(), b"hello\n");

        // A bad text: refused as a reload is, the old rules keep serving.
        cm.publish("workers = 2\n[[proxy]]\nname = \"x\"\n");
        let log = s.wait_log("reload rejected");
        assert!(log.contains("missing required key `protocol`"), "{log}");
        for port in ["7000", "7001"] {
            let mut c = a.tcp_connect(&format!("127.0.0.1:{port}")).unwrap();
            assert_eq!(read_all(&mut c).unwrap(), b"hello\n");
        }

        // Fixed, without `two`: followed again, and `two` closes.
        cm.publish(&s.config_for(&[one]));
        s.wait_log_count("config reloaded", 2);
        assert!(a.tcp_connect("127.0.0.1:7001").is_err());
        assert!(a.tcp_connect("127.0.0.1:7000").is_ok());
        let log = s.log();
        assert!(!log.contains("SIGHUP received"), "{log}");
        assert!(!log.contains("cannot watch"), "{log}");
    })
}

#[test]
fn a_plain_file_edited_in_place_is_followed() {
    as_root(|| {
        let one = to_host("one", "127.0.0.1:7000");
        let two = to_host("two", "127.0.0.1:7001");
        let s = Scenario::with(&["a"])
            .tcp_hello("host", "127.0.0.1:9000", "hello\n")
            .rule(one.clone())
            .args(&["--watch-config"])
            .start();
        let a = s.ns("a");
        a.tcp_connect_when_ready("127.0.0.1:7000");
        // Truncated and written where it is: the same inode.
        s.write_config(&[one, two]);
        s.wait_log("config reloaded");
        let mut c = a.tcp_connect_when_ready("127.0.0.1:7001");
        assert_eq!(read_all(&mut c).unwrap(), b"hello\n");
    })
}

#[test]
fn a_directory_only_root_may_read_is_followed_by_the_relay() {
    as_root(|| {
        let one = to_host("one", "127.0.0.1:7000");
        let two = to_host("two", "127.0.0.1:7001");
        let s = Scenario::with(&["a"])
            .tcp_hello("host", "127.0.0.1:9000", "hello\n")
            .rule(one.clone());
        let dir = TempDir::new();
        let file = dir.file("nsproxy.toml", &s.config_text());
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = file.display().to_string();
        let s = s.start_command(&["run", "--config", &path, "--watch-config"]);
        // Split: the relay runs as nobody, who may not even look in `dir`.
        s.wait_log("relay running as nobody");
        let a = s.ns("a");
        a.tcp_connect_when_ready("127.0.0.1:7000");
        std::fs::write(&file, s.config_for(&[one, two])).unwrap();
        s.wait_log("config reloaded");
        a.tcp_connect_when_ready("127.0.0.1:7001");
        let log = s.log();
        assert!(!log.contains("cannot watch"), "{log}");
    })
}

#[test]
fn a_symlink_to_a_file_elsewhere_follows_edits_of_that_file() {
    as_root(|| {
        let one = to_host("one", "127.0.0.1:7000");
        let two = to_host("two", "127.0.0.1:7001");
        let s = Scenario::with(&["a"])
            .tcp_hello("host", "127.0.0.1:9000", "hello\n")
            .rule(one.clone());
        let (links, files) = (TempDir::new(), TempDir::new());
        let file = files.file("real.toml", &s.config_text());
        let link = links.0.join("nsproxy.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let path = link.display().to_string();
        let s = s.start_command(&["run", "--config", &path, "--watch-config"]);
        let a = s.ns("a");
        a.tcp_connect_when_ready("127.0.0.1:7000");
        // Nothing happens in the link's directory: the file's is watched too.
        std::fs::write(&file, s.config_for(&[one, two])).unwrap();
        s.wait_log("config reloaded");
        a.tcp_connect_when_ready("127.0.0.1:7001");
    })
}
