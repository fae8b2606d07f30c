//! Following namespace files as they come and go: the named namespaces in
//! `/run/netns`, and the files of any other directory a rule names by path
//! or by an absolute pattern (`/var/run/docker/netns/*`, the file of a
//! container that is restarted).
//!
//! `ip netns add NAME` (and containerd for its `cni-*` files) first creates
//! an empty placeholder file and only then bind-mounts the namespace onto
//! it, and no inotify event marks the mount. So a new file is "pending"
//! until it is an nsfs mount. Instead of retrying, we wait on
//! `/proc/self/mountinfo`, which the kernel marks readable-with-priority
//! (POLLPRI) whenever the mount table changes, and then look at the pending
//! files again. `ip netns del` unmounts and unlinks, which inotify reports.
//! Other tools may only unmount (the file stays) or mount another namespace
//! on the same file: files followed by path are looked at again on every
//! mount-table change too (a `stat` each), `/run/netns` names are not, so
//! that following N additions there stays linear. Nothing here polls on a
//! timer.
//!
//! While a directory does not exist, its nearest existing ancestor is
//! watched for the next component's creation. The inotify calls are in the
//! syscall layer (`src/sys/inotify.rs`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tracing::warn;

use super::reference::name_matches;
use super::{NsId, NsRef, nsfs};
use crate::sys::inotify::{self, Inotify, Watch};
use crate::sys::reactor;

/// A change in the set of namespace files followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NsEvent {
    /// The file is now a network namespace: a [`NsRef::Named`] for a
    /// `/run/netns` name, a [`NsRef::Path`] for a file followed by path.
    Appeared(NsRef),
    /// The file is gone, or no longer that namespace.
    Gone(NsRef),
}

/// Watches directories of namespace files (normally `/run/netns`, and the
/// directories of the paths and absolute patterns rules name).
pub struct Discovery {
    inotify: AsyncFd<Inotify>,
    mountinfo: AsyncFd<File>,
    dirs: Vec<Dir>,
    queue: VecDeque<NsEvent>,
    /// The references followed by path ([`Discovery::set_paths`]), kept to
    /// expand their wildcard directories again.
    paths: Vec<NsRef>,
    /// A directory appeared or went where a pattern's wildcard directory
    /// is matched: expand the patterns again once the events are read.
    reexpand: bool,
}

/// One watched directory and what of it is followed.
struct Dir {
    path: PathBuf,
    /// Every file is reported as a `/run/netns` name.
    names: bool,
    /// File-name patterns (an exact path's name is a pattern without
    /// wildcards) whose matches are reported as paths.
    patterns: Vec<String>,
    /// A pattern's wildcard directory is matched here (see [`Wanted`]).
    structure: bool,
    /// Watch descriptor of `path`, when it exists.
    wd: Option<Watch>,
    /// While `path` does not exist: the watch of its nearest existing
    /// ancestor, and the name on the way down from there.
    ancestor: Option<(Watch, String)>,
    /// Files that are a namespace, with the namespace each is.
    known: BTreeMap<String, NsId>,
    /// Files that exist but are not (yet) a namespace.
    pending: BTreeSet<String>,
}

const DIR_MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR
    // Two followed directories can share a watch (one is the other's
    // ancestor, or the same directory by two paths): add to the mask, never
    // replace it.
    | libc::IN_MASK_ADD;
const ANCESTOR_MASK: u32 =
    libc::IN_CREATE | libc::IN_MOVED_TO | libc::IN_ONLYDIR | libc::IN_MASK_ADD;

impl Dir {
    fn new(path: PathBuf) -> Dir {
        Dir {
            path,
            names: false,
            patterns: Vec::new(),
            structure: false,
            wd: None,
            ancestor: None,
            known: BTreeMap::new(),
            pending: BTreeSet::new(),
        }
    }

    /// Whether a file named `name` is followed by path.
    fn by_path(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| name_matches(p, name))
    }

    fn follows(&self, name: &str) -> bool {
        self.names || self.by_path(name)
    }

    /// The references a file of this directory stands for.
    fn refs(&self, name: &str) -> Vec<NsRef> {
        let mut out = Vec::new();
        if self.names {
            out.push(NsRef::Named(name.to_owned()));
        }
        if self.by_path(name) {
            out.push(NsRef::Path(self.path.join(name)));
        }
        out
    }
}

/// What `paths` (references of a config) ask to follow.
#[derive(Default)]
struct Wanted {
    /// Directory → the file-name patterns followed in it: a path's
    /// directory for its file name, an absolute pattern's directories (its
    /// wildcards expanded) for its last component.
    files: BTreeMap<PathBuf, BTreeSet<String>>,
    /// Directories where a wildcard component of a pattern is matched
    /// (`/run/user` for `/run/user/*/netns/*`): a directory created or
    /// removed there changes what `files` holds.
    structure: BTreeSet<PathBuf>,
}

/// Files under `/proc` are not followed: inotify reports nothing there.
fn wanted(paths: &[NsRef]) -> Wanted {
    let mut out = Wanted::default();
    for r in paths {
        let (dirs, pattern) = match r {
            NsRef::Path(p) => match (p.parent(), p.file_name().and_then(|n| n.to_str())) {
                (Some(d), Some(n)) => (vec![d.to_owned()], n.to_owned()),
                _ => continue,
            },
            NsRef::Glob(_) => match r.glob_dir() {
                Some((d, pat)) => (expand(d, &mut out.structure), pat.to_owned()),
                None => continue,
            },
            _ => continue,
        };
        for dir in dirs {
            if !dir.starts_with("/proc") {
                out.files.entry(dir).or_default().insert(pattern.clone());
            }
        }
    }
    out
}

/// The directories a directory pattern (`/run/user/*/netns`) stands for
/// now, each wildcard component matched against the subdirectories there
/// (reads the file system); the directories where a wildcard was matched
/// go to `structure`. A literal component need not exist yet.
fn expand(pattern: &Path, structure: &mut BTreeSet<PathBuf>) -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("/")];
    for c in pattern.components().skip(1) {
        let c = c.as_os_str().to_string_lossy();
        if !c.contains(['*', '?', '[']) {
            for d in &mut dirs {
                d.push(&*c);
            }
            continue;
        }
        let mut next = Vec::new();
        for d in dirs {
            if let Ok(entries) = std::fs::read_dir(&d) {
                for e in entries.flatten() {
                    let matched = e.file_name().to_str().is_some_and(|n| name_matches(&c, n));
                    if matched && e.file_type().is_ok_and(|t| t.is_dir()) {
                        next.push(e.path());
                    }
                }
            }
            structure.insert(d);
        }
        next.sort();
        dirs = next;
    }
    dirs
}

/// The references of `rules` that [`Discovery`] follows by path: their
/// paths and absolute patterns, listen side and upstream.
pub fn followed_paths<'a>(refs: impl IntoIterator<Item = &'a NsRef>) -> Vec<NsRef> {
    let mut out: Vec<NsRef> = refs
        .into_iter()
        .filter(|r| matches!(r, NsRef::Path(_)) || r.glob_dir().is_some())
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The directories [`Discovery`] watches for `paths` now (besides
/// `/run/netns`): those of their files, and those where a wildcard
/// directory of a pattern is matched. Reads the file system.
pub fn followed_dirs(paths: &[NsRef]) -> Vec<PathBuf> {
    let w = wanted(paths);
    let mut out: Vec<PathBuf> = w.files.into_keys().chain(w.structure).collect();
    out.sort();
    out.dedup();
    out
}

/// The files that the absolute patterns among `paths` match now (reads
/// the file system), for `nsproxy check`.
pub fn pattern_files(paths: &[NsRef]) -> Vec<PathBuf> {
    let globs: Vec<NsRef> = paths
        .iter()
        .filter(|r| r.glob_dir().is_some())
        .cloned()
        .collect();
    let mut out = Vec::new();
    for dir in wanted(&globs).files.into_keys() {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            out.extend(entries.flatten().map(|e| e.path()));
        }
    }
    out
}

impl Discovery {
    /// Starts watching `dir` for `/run/netns` names. The namespaces already
    /// there are reported as [`NsEvent::Appeared`] by the first calls to
    /// [`Discovery::next`]. Must be called inside a tokio runtime.
    pub fn start(dir: &Path) -> io::Result<Discovery> {
        Discovery::start_with(dir, &[])
    }

    /// Like [`Discovery::start`], also following the files `paths` name
    /// ([`NsRef::Path`]s and absolute [`NsRef::Glob`]s; others are
    /// ignored). A directory that cannot be watched (no permission) is
    /// logged and left out; only `names_dir` failing fails the start.
    pub fn start_with(names_dir: &Path, paths: &[NsRef]) -> io::Result<Discovery> {
        let inotify = reactor::register(Inotify::new()?, Interest::READABLE)?;
        let mountinfo = File::open("/proc/self/mountinfo")?;
        // The mount table is never read: the kernel marks the file at open
        // with the table's current version, and every poll that reports a
        // change (POLLPRI) moves the mark to the new version. Reading it
        // per change, as before, cost time in the size of the table, which
        // grows with every namespace: following N additions was quadratic.
        let mountinfo = reactor::register(mountinfo, Interest::PRIORITY)?;
        let mut d = Discovery {
            inotify,
            mountinfo,
            dirs: Vec::new(),
            queue: VecDeque::new(),
            paths: Vec::new(),
            reexpand: false,
        };
        let mut names = Dir::new(names_dir.to_owned());
        names.names = true;
        d.dirs.push(names);
        d.watch_dir(0)?;
        d.set_paths(paths);
        Ok(d)
    }

    /// Follows the files `paths` name from now on instead of those given
    /// before (a reload): files no longer followed are reported
    /// [`NsEvent::Gone`], newly followed namespaces [`NsEvent::Appeared`].
    pub fn set_paths(&mut self, paths: &[NsRef]) {
        self.paths = paths.to_vec();
        let Wanted {
            files: mut want,
            mut structure,
        } = wanted(paths);
        for i in 0..self.dirs.len() {
            let patterns: Vec<String> = want
                .remove(&self.dirs[i].path)
                .map(|s| s.into_iter().collect())
                .unwrap_or_default();
            self.dirs[i].structure = structure.remove(&self.dirs[i].path);
            if patterns != self.dirs[i].patterns {
                self.dirs[i].patterns = patterns;
                self.rescan(i);
            }
        }
        // Directories nothing follows any more.
        let mut i = 1;
        while i < self.dirs.len() {
            if self.dirs[i].patterns.is_empty() && !self.dirs[i].structure {
                let dir = self.dirs.remove(i);
                self.unwatch(&dir);
            } else {
                i += 1;
            }
        }
        let structure = structure.into_iter().map(|p| (p, BTreeSet::new()));
        for (path, patterns) in want.into_iter().chain(structure) {
            let mut dir = Dir::new(path);
            dir.structure = patterns.is_empty();
            dir.patterns = patterns.into_iter().collect();
            self.dirs.push(dir);
            let i = self.dirs.len() - 1;
            self.watch_or_warn(i);
        }
    }

    /// Watches directory `i`, or says why it cannot be followed (when it
    /// is set up, and when it appears or is made again later).
    fn watch_or_warn(&mut self, i: usize) {
        if let Err(e) = self.watch_dir(i) {
            let uid = crate::privsep::effective_uid();
            warn!(
                "cannot watch {} as uid {uid}: {e}; namespace files there are resolved when the config is loaded or reloaded, not followed as they come and go (split, the relay runs as `nobody`: make the directory readable to it, or run with user = \"root\")",
                self.dirs[i].path.display()
            );
        }
    }

    /// The namespaces known to be there right now.
    pub fn known(&self) -> impl Iterator<Item = NsRef> + '_ {
        self.dirs
            .iter()
            .flat_map(|d| d.known.keys().flat_map(|n| d.refs(n)))
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
                    for i in 0..self.dirs.len() {
                        self.recheck(i);
                    }
                }
            }
        }
    }

    /// Watches directory `i` if it exists (and scans it), else its nearest
    /// existing ancestor.
    fn watch_dir(&mut self, i: usize) -> io::Result<()> {
        // Bounded: each round either watches the directory or finds it
        // missing below an ancestor that exists; a race with its creation
        // is retried a few times, then left to the ancestor's event.
        for _ in 0..4 {
            let path = self.dirs[i].path.clone();
            match self.add_watch(&path, DIR_MASK) {
                Ok(wd) => {
                    self.dirs[i].wd = Some(wd);
                    if let Some((a, _)) = self.dirs[i].ancestor.take() {
                        self.release(a);
                    }
                    self.rescan(i);
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    if let Some((a, _)) = self.dirs[i].ancestor.take() {
                        self.release(a);
                    }
                    let mut child = path.as_path();
                    let mut found = None;
                    for a in path.ancestors().skip(1) {
                        match self.add_watch(a, ANCESTOR_MASK) {
                            Ok(wd) => {
                                let name = child
                                    .file_name()
                                    .and_then(|n| n.to_str())
                                    .unwrap_or_default()
                                    .to_owned();
                                found = Some((wd, name));
                                break;
                            }
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => child = a,
                            Err(e) => return Err(e),
                        }
                    }
                    self.dirs[i].ancestor = found;
                    // It may have appeared between the calls.
                    if !child.is_dir() {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn add_watch(&self, path: &Path, mask: u32) -> io::Result<Watch> {
        self.inotify.get_ref().add_watch(path, mask)
    }

    /// Removes a watch no directory uses any more.
    fn release(&self, wd: Watch) {
        let used = self
            .dirs
            .iter()
            .any(|d| d.wd == Some(wd) || d.ancestor.as_ref().map(|a| a.0) == Some(wd));
        if !used {
            self.inotify.get_ref().rm_watch(wd);
        }
    }

    fn unwatch(&mut self, dir: &Dir) {
        for n in dir.known.keys() {
            for r in dir.refs(n) {
                self.queue.push_back(NsEvent::Gone(r));
            }
        }
        if let Some(wd) = dir.wd {
            self.release(wd);
        }
        if let Some((wd, _)) = &dir.ancestor {
            self.release(*wd);
        }
    }

    /// Compares directory `i` with what we know, queueing the differences.
    fn rescan(&mut self, i: usize) {
        let dir = &self.dirs[i];
        let mut now_known = BTreeMap::new();
        let mut now_pending = BTreeSet::new();
        if let Ok(entries) = std::fs::read_dir(&dir.path) {
            for e in entries.flatten() {
                let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if !dir.follows(&name) {
                    continue;
                }
                match netns_id(&e.path()) {
                    Some(id) => {
                        now_known.insert(name, id);
                    }
                    None => {
                        now_pending.insert(name);
                    }
                }
            }
        }
        let old = std::mem::take(&mut self.dirs[i].known);
        // The references of a file still there may differ too (patterns
        // changed by a reload): compare references, not names.
        let dir = &self.dirs[i];
        let refs = |m: &BTreeMap<String, NsId>| -> BTreeMap<NsRef, NsId> {
            m.iter()
                .flat_map(|(n, id)| dir.refs(n).into_iter().map(|r| (r, *id)))
                .collect()
        };
        let (before, after) = (refs(&old), refs(&now_known));
        for (r, id) in &before {
            if after.get(r) != Some(id) {
                self.queue.push_back(NsEvent::Gone(r.clone()));
            }
        }
        for (r, id) in &after {
            if before.get(r) != Some(id) {
                self.queue.push_back(NsEvent::Appeared(r.clone()));
            }
        }
        self.dirs[i].known = now_known;
        self.dirs[i].pending = now_pending;
    }

    /// After a mount-table change: pending files that are a namespace now,
    /// and files followed by path that are no longer the namespace they
    /// were (unmounted, or another one mounted on them).
    fn recheck(&mut self, i: usize) {
        let dir = &self.dirs[i];
        // Without path patterns nothing here is followed by path: skip the
        // walk over every known name, which made following N additions to
        // /run/netns cost N walks of up to N names.
        let changed: Vec<String> = if dir.patterns.is_empty() {
            Vec::new()
        } else {
            dir.known
                .iter()
                .filter(|(n, id)| dir.by_path(n) && !same_file(&dir.path.join(n), id))
                .map(|(n, _)| n.clone())
                .collect()
        };
        for name in changed {
            self.removed(i, &name);
            self.created(i, name);
        }
        let dir = &self.dirs[i];
        let ready: Vec<(String, NsId)> = dir
            .pending
            .iter()
            .filter_map(|n| netns_id(&dir.path.join(n)).map(|id| (n.clone(), id)))
            .collect();
        for (name, id) in ready {
            self.appeared(i, name, id);
        }
    }

    fn appeared(&mut self, i: usize, name: String, id: NsId) {
        let dir = &mut self.dirs[i];
        dir.pending.remove(&name);
        for r in dir.refs(&name) {
            self.queue.push_back(NsEvent::Appeared(r));
        }
        self.dirs[i].known.insert(name, id);
    }

    fn created(&mut self, i: usize, name: String) {
        let dir = &self.dirs[i];
        if dir.known.contains_key(&name) || !dir.follows(&name) {
            return;
        }
        match netns_id(&dir.path.join(&name)) {
            Some(id) => self.appeared(i, name, id),
            None => {
                self.dirs[i].pending.insert(name);
            }
        }
    }

    fn removed(&mut self, i: usize, name: &str) {
        let dir = &mut self.dirs[i];
        dir.pending.remove(name);
        if dir.known.remove(name).is_some() {
            for r in self.dirs[i].refs(name) {
                self.queue.push_back(NsEvent::Gone(r));
            }
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
            if std::mem::take(&mut self.reexpand) {
                let paths = std::mem::take(&mut self.paths);
                self.set_paths(&paths);
            }
        }
    }

    fn on_event(&mut self, wd: Watch, mask: u32, name: Option<String>) {
        if mask & libc::IN_Q_OVERFLOW != 0 {
            // Events were lost: start over from what is really there,
            // directories of patterns included.
            for i in 0..self.dirs.len() {
                self.rescan(i);
            }
            self.reexpand = true;
            return;
        }
        for i in 0..self.dirs.len() {
            if self.dirs[i].ancestor.as_ref().map(|a| a.0) == Some(wd) {
                let on_the_way = self.dirs[i].ancestor.as_ref().map(|a| a.1.as_str());
                if name.as_deref() == on_the_way
                    && mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0
                {
                    self.watch_or_warn(i);
                    self.reexpand |= self.dirs[i].structure;
                }
                continue;
            }
            if self.dirs[i].wd != Some(wd) {
                continue;
            }
            if self.dirs[i].structure && mask & libc::IN_ISDIR != 0 {
                self.reexpand = true;
            }
            if mask & (libc::IN_DELETE_SELF | libc::IN_MOVE_SELF | libc::IN_IGNORED) != 0 {
                // The directory itself went away: everything in it is gone.
                self.dirs[i].wd = None;
                if mask & libc::IN_IGNORED == 0 {
                    self.release(wd);
                }
                let all: Vec<String> = self.dirs[i].known.keys().cloned().collect();
                for n in all {
                    self.removed(i, &n);
                }
                self.dirs[i].pending.clear();
                self.watch_or_warn(i);
                self.reexpand |= self.dirs[i].structure;
                continue;
            }
            let Some(name) = name.clone() else { continue };
            if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                self.created(i, name);
            } else if mask & (libc::IN_DELETE | libc::IN_MOVED_FROM) != 0 {
                self.removed(i, &name);
            }
        }
    }
}

/// Which namespace a followed file is now, if it is one (see
/// [`nsfs::peek_netns`]: no fd, two calls).
fn netns_id(path: &Path) -> Option<NsId> {
    nsfs::peek_netns(path).ok()
}

/// Whether `path` is still the file of namespace `id` (a `stat`, no open).
fn same_file(path: &Path, id: &NsId) -> bool {
    std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == (id.dev, id.ino))
}
