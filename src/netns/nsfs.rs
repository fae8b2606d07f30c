//! Opening a namespace file and proving it is a network namespace.
//!
//! Opening is all it takes to hold a namespace alive, so an opened file is
//! kept (cached by the switcher) only as long as a rule needs it.
//!
//! Nothing here may block: the path is first opened with `O_PATH`, which
//! never calls the file's own open (a FIFO waiting for a writer, a device,
//! a FUSE file whose daemon hangs), and only once `fstat` and `fstatfs` say
//! it is a regular file on nsfs is it opened for real, through
//! `/proc/self/fd`, so the file checked is the file opened. `setns(2)` and
//! the `NS_GET_NSTYPE` ioctl refuse an `O_PATH` fd (EBADF), hence the
//! second open. The calls themselves are in [`crate::sys::netns`].

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::NsId;
use crate::sys::netns::{self as sys, NSFS_MAGIC};

/// What is wrong with a file that was supposed to be a network namespace.
#[derive(Debug)]
pub(crate) enum Problem {
    /// The path does not exist.
    Missing,
    /// It could not be opened (permissions, ...).
    Open(io::Error),
    /// It is on another file system; carries `f_type`.
    NotNsfs(i64),
    /// It is not a regular file (a FIFO, socket, device or directory):
    /// refused before anything could block on it; carries its kind.
    NotAFile(&'static str),
    /// It is a namespace, but of another kind ("uts", "mnt", ...).
    WrongKind(&'static str),
    /// fstatfs / ioctl / fstat failed.
    Inspect(io::Error),
}

/// Opens `path` without blocking and checks that it is a network namespace.
pub(crate) fn open_netns(path: &Path) -> Result<(File, NsId), Problem> {
    let probe = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => Problem::Missing,
            _ => Problem::Open(e),
        })?;
    let meta = probe.metadata().map_err(Problem::Inspect)?;
    // nsfs files are regular files (S_IFREG); anything else could block
    // when opened (a FIFO) or is surely not a namespace.
    if let Some(kind) = not_a_file(meta.file_type()) {
        return Err(Problem::NotAFile(kind));
    }
    // fstatfs accepts an O_PATH fd: the file system is known before the
    // file's own open runs, and nsfs's open never blocks.
    let f_type = fs_type(&probe)?;
    if f_type != NSFS_MAGIC {
        return Err(Problem::NotNsfs(f_type));
    }
    let (file, by_fd) = reopen(&probe, path)?;
    let id = if by_fd {
        // The very file proven nsfs above: only its kind is left to check
        // (two calls fewer per namespace, of a start-up's thousands).
        let kind = sys::ns_type(file.as_fd()).map_err(Problem::Inspect)?;
        if kind != libc::CLONE_NEWNET {
            return Err(Problem::WrongKind(kind_name(kind)));
        }
        NsId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    } else {
        inspect(&file)?
    };
    if (id.dev, id.ino) != (meta.dev(), meta.ino()) {
        // Only possible through the fallback open of the path, replaced
        // between the two opens.
        return Err(Problem::Open(io::Error::other(
            "the file changed while it was being opened",
        )));
    }
    Ok((file, id))
}

/// Which namespace the file at `path` is, without opening it: a `stat` and
/// a `statfs` of the path, where [`open_netns`] takes seven calls (nine
/// for a file without a `/proc/self/fd` path to reopen) and two fds (it
/// proves the kind, which needs an open fd). For discovery, which only
/// tracks which namespace a followed name is now: the namespace
/// thread opens it with every check when a rule uses it, and says what is
/// wrong then (a namespace of another kind is refused there, by name).
pub(crate) fn peek_netns(path: &Path) -> Result<NsId, Problem> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Problem::Missing,
        _ => Problem::Open(e),
    })?;
    if let Some(kind) = not_a_file(meta.file_type()) {
        return Err(Problem::NotAFile(kind));
    }
    let f_type = sys::path_fs_type(path).map_err(Problem::Inspect)?;
    if f_type != NSFS_MAGIC {
        return Err(Problem::NotNsfs(f_type));
    }
    Ok(NsId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

/// Opens the file `probe` (an `O_PATH` fd) refers to for reading. Through
/// `/proc/self/fd` it is that very file (`true`); without /proc, the path
/// again, non-blocking (`false`: the caller checks it and compares
/// identities).
fn reopen(probe: &File, path: &Path) -> Result<(File, bool), Problem> {
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(p)
    };
    let by_fd = format!("/proc/self/fd/{}", probe.as_raw_fd());
    match open(Path::new(&by_fd)) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            open(path).map(|f| (f, false)).map_err(Problem::Open)
        }
        Err(e) => Err(Problem::Open(e)),
    }
}

/// The kind of a file that is not a regular file, for the error message.
fn not_a_file(t: std::fs::FileType) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        None
    } else if t.is_fifo() {
        Some("a FIFO")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_char_device() || t.is_block_device() {
        Some("a device")
    } else if t.is_dir() {
        Some("a directory")
    } else {
        Some("not a regular file")
    }
}

fn fs_type(file: &File) -> Result<i64, Problem> {
    sys::fs_type(file.as_fd()).map_err(Problem::Inspect)
}

/// Checks an open file: nsfs, of kind "net"; returns its identity.
pub(crate) fn inspect(file: &File) -> Result<NsId, Problem> {
    let f_type = fs_type(file)?;
    if f_type != NSFS_MAGIC {
        return Err(Problem::NotNsfs(f_type));
    }
    let kind = sys::ns_type(file.as_fd()).map_err(Problem::Inspect)?;
    if kind != libc::CLONE_NEWNET {
        return Err(Problem::WrongKind(kind_name(kind)));
    }
    let meta = file.metadata().map_err(Problem::Inspect)?;
    Ok(NsId {
        dev: meta.dev(),
        ino: meta.ino(),
    })
}

fn kind_name(kind: libc::c_int) -> &'static str {
    match kind {
        libc::CLONE_NEWNS => "mount",
        libc::CLONE_NEWUTS => "uts",
        libc::CLONE_NEWIPC => "ipc",
        libc::CLONE_NEWUSER => "user",
        libc::CLONE_NEWPID => "pid",
        libc::CLONE_NEWCGROUP => "cgroup",
        0x80 => "time",
        _ => "unknown",
    }
}

/// A readable name for common `f_type` values, for error messages.
pub(crate) fn fs_name(f_type: i64) -> String {
    match f_type {
        0x0102_1994 => "tmpfs".into(),
        0xef53 => "ext2/3/4".into(),
        0x9fa0 => "proc".into(),
        0x6265_6572 => "sysfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683e => "btrfs".into(),
        0x794c_7630 => "overlayfs".into(),
        0x1373 => "devfs".into(),
        0x0102_1997 => "9p".into(),
        other => format!("file system type {other:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_is_a_network_namespace() {
        let (_f, id) = open_netns(Path::new("/proc/self/ns/net")).expect("own netns");
        assert!(id.ino > 0);
    }

    #[test]
    fn other_kinds_and_files_are_refused() {
        assert!(matches!(
            open_netns(Path::new("/proc/self/ns/uts")),
            Err(Problem::WrongKind("uts"))
        ));
        assert!(matches!(
            open_netns(Path::new("/proc/self/status")),
            Err(Problem::NotNsfs(_))
        ));
        assert!(matches!(
            open_netns(Path::new("/nonexistent/nsproxy")),
            Err(Problem::Missing)
        ));
        assert!(matches!(
            open_netns(Path::new("/proc/self")),
            Err(Problem::NotAFile("a directory"))
        ));
        assert!(matches!(
            open_netns(Path::new("/dev/null")),
            Err(Problem::NotAFile("a device"))
        ));
    }

    /// Discovery's look without an open: the same identity, the same
    /// refusals, but for the kind (told when the file is opened).
    #[test]
    fn a_peek_names_the_namespace_an_open_proves() {
        let own = Path::new("/proc/self/ns/net");
        assert_eq!(peek_netns(own).unwrap(), open_netns(own).unwrap().1);
        assert!(peek_netns(Path::new("/proc/self/ns/uts")).is_ok());
        assert!(matches!(
            peek_netns(Path::new("/proc/self/status")),
            Err(Problem::NotNsfs(_))
        ));
        assert!(matches!(
            peek_netns(Path::new("/nonexistent/nsproxy")),
            Err(Problem::Missing)
        ));
        assert!(matches!(
            peek_netns(Path::new("/dev/null")),
            Err(Problem::NotAFile("a device"))
        ));
    }

    /// A FIFO without a writer blocks a plain open(2) for reading forever.
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("nsproxy-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("ns");
        crate::sys::mkfifo(&fifo).unwrap();
        let got = open_netns(&fifo);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(matches!(got, Err(Problem::NotAFile("a FIFO"))), "{got:?}");
    }
}
