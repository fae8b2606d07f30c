//! Following the named namespaces in `/run/netns` as they come and go.
//!
//! `ip netns add NAME` first creates an empty placeholder file and only then
//! bind-mounts the namespace onto it, and no inotify event marks the mount.
//! So a new name is "pending" until its file is an nsfs mount. Instead of
//! retrying, we wait on `/proc/self/mountinfo`, which the kernel marks
//! readable-with-priority (POLLPRI) whenever the mount table changes, and
//! then look at the pending names again. `ip netns del` unmounts and unlinks,
//! which inotify reports. Nothing here polls on a timer.
//!
//! While `/run/netns` does not exist, its parent is watched for its creation.
//! The inotify calls are in the syscall layer (`src/sys/inotify.rs`).

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::nsfs;
use crate::sys::inotify::{self, Inotify, Watch};
use crate::sys::reactor;

/// A change in the set of named namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NsEvent {
    /// `/run/netns/NAME` is now a network namespace.
    Appeared(String),
    /// `/run/netns/NAME` is gone (or no longer a namespace).
    Gone(String),
}

/// Watches a directory of namespace pins (normally `/run/netns`).
pub struct Discovery {
    dir: PathBuf,
    inotify: AsyncFd<Inotify>,
    /// Watch descriptor of `dir`, when it exists.
    dir_wd: Option<Watch>,
    /// Watch descriptor of the parent, while `dir` does not exist.
    parent_wd: Option<Watch>,
    mountinfo: AsyncFd<File>,
    /// Names whose file exists and is a namespace.
    known: BTreeSet<String>,
    /// Names whose file exists but is not (yet) a namespace.
    pending: BTreeSet<String>,
    queue: VecDeque<NsEvent>,
}

const DIR_MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;
const PARENT_MASK: u32 = libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ONLYDIR;

impl Discovery {
    /// Starts watching `dir`. The namespaces already there are reported as
    /// [`NsEvent::Appeared`] by the first calls to [`Discovery::next`]. Must
    /// be called inside a tokio runtime.
    pub fn start(dir: &Path) -> io::Result<Discovery> {
        let inotify = reactor::register(Inotify::new()?, Interest::READABLE)?;
        let mountinfo = File::open("/proc/self/mountinfo")?;
        let mountinfo = reactor::register(mountinfo, Interest::PRIORITY)?;
        let mut d = Discovery {
            dir: dir.to_owned(),
            inotify,
            dir_wd: None,
            parent_wd: None,
            mountinfo,
            known: BTreeSet::new(),
            pending: BTreeSet::new(),
            queue: VecDeque::new(),
        };
        // The mount table is never read: the kernel marks the file at open
        // with the table's current version, and every poll that reports a
        // change (POLLPRI) moves the mark to the new version. Reading it
        // per change, as before, cost time in the size of the table, which
        // grows with every namespace: following N additions was quadratic.
        d.watch_dir()?;
        Ok(d)
    }

    /// The names known to be namespaces right now.
    pub fn known(&self) -> impl Iterator<Item = &str> {
        self.known.iter().map(String::as_str)
    }

    /// A change that is already known, without waiting.
    pub fn try_next(&mut self) -> Option<NsEvent> {
        self.queue.pop_front()
    }

    /// Waits for the next change.
    pub async fn next(&mut self) -> io::Result<NsEvent> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Ok(e);
            }
            tokio::select! {
                guard = self.inotify.readable() => {
                    let mut guard = guard?;
                    guard.clear_ready();
                    drop(guard);
                    self.read_inotify()?;
                }
                guard = self.mountinfo.ready(Interest::PRIORITY) => {
                    let mut guard = guard?;
                    guard.clear_ready();
                    drop(guard);
                    self.recheck_pending();
                }
            }
        }
    }

    /// Watches `dir` if it exists (and scans it), else its parent.
    fn watch_dir(&mut self) -> io::Result<()> {
        match self.add_watch(&self.dir.clone(), DIR_MASK) {
            Ok(wd) => {
                self.dir_wd = Some(wd);
                if let Some(p) = self.parent_wd.take() {
                    self.rm_watch(p);
                }
                self.rescan();
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let parent = self.dir.parent().unwrap_or(Path::new("/")).to_owned();
                self.parent_wd = Some(self.add_watch(&parent, PARENT_MASK)?);
                // It may have appeared between the two calls.
                if self.dir.is_dir() {
                    return self.watch_dir();
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn add_watch(&self, path: &Path, mask: u32) -> io::Result<Watch> {
        self.inotify.get_ref().add_watch(path, mask)
    }

    fn rm_watch(&self, wd: Watch) {
        self.inotify.get_ref().rm_watch(wd);
    }

    /// Compares the directory with what we know, queueing the differences.
    fn rescan(&mut self) {
        let mut now_known = BTreeSet::new();
        let mut now_pending = BTreeSet::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if is_netns(&e.path()) {
                    now_known.insert(name);
                } else {
                    now_pending.insert(name);
                }
            }
        }
        for gone in self.known.difference(&now_known) {
            self.queue.push_back(NsEvent::Gone(gone.clone()));
        }
        for new in now_known.difference(&self.known) {
            self.queue.push_back(NsEvent::Appeared(new.clone()));
        }
        self.known = now_known;
        self.pending = now_pending;
    }

    fn recheck_pending(&mut self) {
        let ready: Vec<String> = self
            .pending
            .iter()
            .filter(|n| is_netns(&self.dir.join(n)))
            .cloned()
            .collect();
        for name in ready {
            self.pending.remove(&name);
            self.known.insert(name.clone());
            self.queue.push_back(NsEvent::Appeared(name));
        }
    }

    fn created(&mut self, name: String) {
        if self.known.contains(&name) {
            return;
        }
        if is_netns(&self.dir.join(&name)) {
            self.pending.remove(&name);
            self.known.insert(name.clone());
            self.queue.push_back(NsEvent::Appeared(name));
        } else {
            self.pending.insert(name);
        }
    }

    fn removed(&mut self, name: &str) {
        self.pending.remove(name);
        if self.known.remove(name) {
            self.queue.push_back(NsEvent::Gone(name.to_owned()));
        }
    }

    fn read_inotify(&mut self) -> io::Result<()> {
        // Room for many events; each is 16 bytes plus a NUL-padded name.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match self.inotify.get_ref().read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for e in inotify::events(&buf[..n]) {
                let name = e.name.to_str().map(str::to_owned);
                self.on_event(e.watch, e.mask, name);
            }
        }
    }

    fn on_event(&mut self, wd: Watch, mask: u32, name: Option<String>) {
        if mask & libc::IN_Q_OVERFLOW != 0 {
            // Events were lost: start over from what is really there.
            self.rescan();
            return;
        }
        if Some(wd) == self.parent_wd {
            let dir_name = self.dir.file_name().and_then(|n| n.to_str());
            if name.as_deref() == dir_name && mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                let _ = self.watch_dir();
            }
            return;
        }
        if Some(wd) != self.dir_wd {
            return;
        }
        if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0 {
            // The directory itself went away: everything in it is gone.
            if mask & libc::IN_IGNORED == 0 {
                if let Some(wd) = self.dir_wd {
                    self.rm_watch(wd);
                }
            }
            self.dir_wd = None;
            let all: Vec<String> = self.known.iter().cloned().collect();
            for n in all {
                self.removed(&n);
            }
            self.pending.clear();
            let _ = self.watch_dir();
            return;
        }
        let Some(name) = name else { return };
        if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
            self.created(name);
        } else if mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0 {
            self.removed(&name);
        }
    }
}

fn is_netns(path: &Path) -> bool {
    nsfs::open_netns(path).is_ok()
}
