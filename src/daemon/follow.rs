//! Following the config file (`nsproxy run --watch-config`): a change to
//! it is reloaded as SIGHUP would be, without anyone sending one.
//!
//! The file's directory is watched, not the file. A Kubernetes ConfigMap
//! volume changes by swapping a symlink: the pod sees
//! `dir/nsproxy.toml → ..data/nsproxy.toml` and `..data → ..2026_12_03_…`,
//! and an update writes a new `..2026_…` directory, points `..data_tmp` at it
//! and renames `..data_tmp` over `..data`. The file's inode never changes
//! (a new one appears elsewhere), so a watch on the file would see nothing;
//! the rename is an event in its directory. An editor that writes the file
//! in place, or replaces it by a rename, is an event there too. When the
//! path resolves into another directory (a symlink to a file elsewhere, or
//! the ConfigMap's `..2026_…`), that directory is watched as well, and
//! looked up again after each change.
//!
//! Any event starts a quiet period ([`DEBOUNCE`]); once the directory has
//! been quiet that long (a ConfigMap update is several events, an editor's
//! save a few), the text is read the way a reload reads it (split, by the
//! socket broker) and compared by hash with the last text seen. Only a
//! different text asks for a reload: other keys of the ConfigMap, or a
//! save without a change, do nothing. A bad new text is refused by the
//! reload as any reload refuses it, and the running config keeps serving;
//! it is not tried again until the text changes once more.
//!
//! The watches are made before the relay gives up its privileges (an
//! inotify watch is checked when it is added, not when events arrive), so a
//! directory only root may read is followed too. A directory looked up
//! later (the next `..2026_…`) is watched as the relay; if it may not, a
//! warning names it, and its directory's own events still lead to reloads.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::lifecycle::Command;
use crate::netns::SocketFactory;
use crate::sys::inotify::{self, Inotify, Watch};
use crate::sys::reactor;

/// How long the directory must be quiet before the file is looked at.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

/// Most quiet periods a burst of events may reset: a directory that never
/// stays quiet is looked at after about 2 s all the same.
const MAX_ROUNDS: usize = 10;

/// What changes a directory entry: made, written and closed, renamed in or
/// out, removed, its attributes (a `chmod` that makes it readable); and the
/// directory itself going away.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_DELETE
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// The text of a config, as compared between looks: a hash (a config may
/// be megabytes; two texts that hash alike are taken for one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(u64);

impl Fingerprint {
    pub fn of(text: &str) -> Fingerprint {
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        Fingerprint(h.finish())
    }
}

/// What a look at the file leads to.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// The text differs from the last one seen: reload, and remember it.
    Reload(Fingerprint),
    /// The same text: nothing to do.
    Same,
    /// The file cannot be read now (mid-swap, removed, no permission): the
    /// running config keeps serving; the next change looks again.
    Unreadable(String),
}

fn decide(last: Fingerprint, now: Result<Fingerprint, String>) -> Decision {
    match now {
        Ok(f) if f == last => Decision::Same,
        Ok(f) => Decision::Reload(f),
        Err(e) => Decision::Unreadable(e),
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The directory `path` resolves into, when it is not `dir` itself.
fn target_dir(path: &Path, dir: &Path) -> Option<PathBuf> {
    let real = std::fs::canonicalize(path).ok()?;
    let real_dir = parent(&real);
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    (real_dir != dir).then_some(real_dir)
}

/// The watches on a config file's directories, made while privileged.
#[derive(Debug)]
pub struct Follower {
    path: PathBuf,
    inotify: AsyncFd<Inotify>,
    /// The directory the path is in (as given), watched all along.
    dir: PathBuf,
    dir_watch: Option<Watch>,
    /// The directory the path resolves into, when another: the ConfigMap's
    /// `..2026_…` changes at each update, and is looked up again.
    target: Option<(PathBuf, Watch)>,
}

impl Follower {
    /// Watches `path`'s directory (and the one it resolves into). Must be
    /// called inside the runtime; `Err` names the directory.
    pub fn watch(path: &Path) -> io::Result<Follower> {
        let inotify = reactor::register(Inotify::new()?, Interest::READABLE)?;
        let dir = parent(path);
        let wd = inotify.get_ref().add_watch(&dir, MASK).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot watch {} (the config's directory): {e}",
                    dir.display()
                ),
            )
        })?;
        let mut f = Follower {
            path: path.to_owned(),
            inotify,
            dir,
            dir_watch: Some(wd),
            target: None,
        };
        f.retarget();
        Ok(f)
    }

    /// Follows the config until the server stops taking commands: a
    /// changed text is a [`Command::Reload`], as SIGHUP is. `loaded` is
    /// the text the running config was parsed from: a change made before
    /// the watches were in place is caught by the first look, made now.
    pub async fn run(
        mut self,
        loaded: Fingerprint,
        sockets: impl SocketFactory,
        commands: mpsc::Sender<Command>,
    ) {
        info!(
            "following {} (--watch-config): a change to its text is reloaded as SIGHUP would be",
            self.path.display()
        );
        let mut last = loaded;
        let mut buf = vec![0u8; 16 * 1024];
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) {
                if let Err(e) = self.next_events(&mut buf).await {
                    warn!(
                        "stopped following {}: {e}; reload it with SIGHUP or `nsproxy reload`",
                        self.path.display()
                    );
                    return;
                }
                // Quiet for DEBOUNCE, or MAX_ROUNDS bursts: then look.
                for _ in 0..MAX_ROUNDS {
                    tokio::select! {
                        r = self.next_events(&mut buf) => if r.is_err() { break },
                        () = tokio::time::sleep(DEBOUNCE) => break,
                    }
                }
                self.retarget();
            }
            let now = sockets
                .read_config(&self.path)
                .await
                .map(|t| Fingerprint::of(&t))
                .map_err(|e| e.to_string());
            match decide(last, now) {
                Decision::Same => debug!("{}: changed on disk, same text", self.path.display()),
                Decision::Unreadable(e) => warn!(
                    "{} changed but cannot be read now ({e}); the running config keeps serving, the next change is looked at again",
                    self.path.display()
                ),
                Decision::Reload(f) => {
                    last = f;
                    info!("{} changed: reloading", self.path.display());
                    let (reply, done) = tokio::sync::oneshot::channel();
                    if commands.send(Command::Reload(reply)).await.is_err() {
                        return;
                    }
                    // The outcome is logged by the server; waiting for it
                    // keeps one reload at a time from here.
                    let _ = done.await;
                }
            }
        }
    }

    /// Waits for events and reads them all; `Err` when the inotify fd
    /// fails. The config's directory itself going away is retried once.
    async fn next_events(&mut self, buf: &mut [u8]) -> io::Result<()> {
        loop {
            let mut guard = self.inotify.readable().await?;
            guard.clear_ready();
            drop(guard);
            let mut got = false;
            loop {
                let n = match self.inotify.get_ref().read(buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                let mut gone = false;
                for e in inotify::events(&buf[..n]) {
                    got = true;
                    if Some(e.watch) == self.dir_watch
                        && e.mask & (libc::IN_IGNORED | libc::IN_DELETE_SELF | libc::IN_MOVE_SELF)
                            != 0
                    {
                        gone = true;
                    }
                }
                if gone {
                    self.rewatch_dir();
                }
            }
            if got {
                return Ok(());
            }
        }
    }

    /// The config's directory went away (or was moved): watched again if
    /// it is back, else said.
    fn rewatch_dir(&mut self) {
        if let Some(wd) = self.dir_watch.take() {
            self.inotify.get_ref().rm_watch(wd);
        }
        match self.inotify.get_ref().add_watch(&self.dir, MASK) {
            Ok(wd) => self.dir_watch = Some(wd),
            Err(e) => warn!(
                "cannot watch {} again as uid {} ({e}): changes to {} are not followed until a restart; reload it with SIGHUP or `nsproxy reload`",
                self.dir.display(),
                crate::privsep::effective_uid(),
                self.path.display()
            ),
        }
    }

    /// Looks up the directory the path resolves into and watches it
    /// instead of the last one (a ConfigMap update points `..data` at a
    /// new one).
    fn retarget(&mut self) {
        let want = target_dir(&self.path, &self.dir);
        if want.as_ref() == self.target.as_ref().map(|(p, _)| p) {
            return;
        }
        if let Some((_, wd)) = self.target.take() {
            // Harmless when the directory went and the kernel dropped it.
            self.inotify.get_ref().rm_watch(wd);
        }
        let Some(dir) = want else { return };
        match self.inotify.get_ref().add_watch(&dir, MASK) {
            Ok(wd) => self.target = Some((dir, wd)),
            Err(e) => warn!(
                "cannot watch {} as uid {} ({e}): {} resolves there; an edit of the file in that directory is not followed (a change of the link in {} is)",
                dir.display(),
                crate::privsep::effective_uid(),
                self.path.display(),
                self.dir.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_different_readable_text_reloads() {
        let a = Fingerprint::of("workers = 1\n");
        let b = Fingerprint::of("workers = 2\n");
        assert_ne!(a, b);
        assert_eq!(decide(a, Ok(a)), Decision::Same);
        assert_eq!(decide(a, Ok(b)), Decision::Reload(b));
        assert_eq!(
            decide(a, Err("gone".into())),
            Decision::Unreadable("gone".into())
        );
    }

    #[test]
    fn the_directory_of_a_bare_name_is_the_current_one() {
        assert_eq!(parent(Path::new("nsproxy.toml")), PathBuf::from("."));
        assert_eq!(
            parent(Path::new("/etc/nsproxy/x.toml")),
            PathBuf::from("/etc/nsproxy")
        );
    }

    #[test]
    fn a_configmap_layout_resolves_into_its_data_directory() {
        let dir = std::env::temp_dir().join(format!("nsproxy-follow-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.join("..2026_12_03_10_00_00.1");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("nsproxy.toml"), "x").unwrap();
        std::os::unix::fs::symlink("..2026_12_03_10_00_00.1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/nsproxy.toml", dir.join("nsproxy.toml")).unwrap();
        std::fs::write(dir.join("plain.toml"), "x").unwrap();
        let want = std::fs::canonicalize(&data).unwrap();
        let got = target_dir(&dir.join("nsproxy.toml"), &dir);
        let plain = target_dir(&dir.join("plain.toml"), &dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(got, Some(want));
        assert_eq!(plain, None);
    }
}
