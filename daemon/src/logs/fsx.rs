//! Fd-relative filesystem primitives for the sweeper.
//!
//! Why not `std::fs`: path-based calls re-resolve every component on each
//! call, so a directory swapped for a symlink between "look" and "delete"
//! would redirect the deletion outside the root. Everything here works
//! relative to a directory fd we already hold, opens one component at a time
//! with `O_NOFOLLOW` (and, where the kernel has it, `openat2` with
//! `RESOLVE_NO_XDEV | RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`), and compares
//! the device and mount id of every directory with the root's, so a symlink
//! is never followed and a mount point (bind mounts of the same filesystem
//! included) is never crossed.
//!
//! Residual risk, accepted: a process with write access both inside the
//! root and outside it (same filesystem) could `rename(2)` a directory we
//! already hold an fd for out of the root while we empty it. Only the
//! database processes write under the root, and they do not do that.

use std::ffi::{CStr, CString};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{openat, openat2, statx, unlinkat, AtFlags, FileType, Mode, OFlags, RawDir, ResolveFlags, StatxFlags};
use rustix::io::Errno;

/// Deepest directory nesting we walk. Deeper trees are treated as a listing
/// error (fail closed) rather than risking fd exhaustion.
pub(crate) const MAX_DEPTH: usize = 128;

/// What we need to know about one entry, from a single `statx` that never
/// follows a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub kind: Kind,
    pub dev: (u32, u32),
    pub ino: u64,
    /// Mount id, when the kernel reports it (`STATX_MNT_ID`, Linux 5.8+).
    pub mnt_id: Option<u64>,
    pub size: u64,
    /// Hard links to the inode.
    pub nlink: u32,
    /// Modification time (content) in nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    /// Status change time (content, links, owner, mode, rename; set by the
    /// kernel, never by `utimensat`), in nanoseconds since the Unix epoch.
    pub ctime_ns: i128,
}

/// The entry kinds the rules distinguish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

/// Identity of the filesystem mount the root lives on: a directory whose
/// identity differs is a mount point and is never entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MountIdentity {
    pub dev: (u32, u32),
    pub mnt_id: Option<u64>,
}

impl Meta {
    pub(crate) fn mount(&self) -> MountIdentity {
        MountIdentity { dev: self.dev, mnt_id: self.mnt_id }
    }

    /// When this entry last changed in any way: the later of its mtime and
    /// its ctime. A copy that keeps old mtimes (`cp -p`, `rsync -a`, a
    /// restore) still gets a fresh ctime, which no system call can set back.
    pub(crate) fn changed_ns(&self) -> i128 {
        self.mtime_ns.max(self.ctime_ns)
    }
}

impl MountIdentity {
    /// True when `meta` is on a different mount. Mount ids are compared only
    /// when both sides have one; st_dev alone misses bind mounts of the same
    /// filesystem, which is why the mount id matters.
    pub(crate) fn differs(&self, meta: &Meta) -> bool {
        if self.dev != meta.dev {
            return true;
        }
        matches!((self.mnt_id, meta.mnt_id), (Some(a), Some(b)) if a != b)
    }
}

const STATX_MASK: StatxFlags = StatxFlags::TYPE
    .union(StatxFlags::INO)
    .union(StatxFlags::NLINK)
    .union(StatxFlags::SIZE)
    .union(StatxFlags::MTIME)
    .union(StatxFlags::CTIME)
    .union(StatxFlags::MNT_ID);

fn ns(t: rustix::fs::StatxTimestamp) -> i128 {
    i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec)
}

fn meta_from(st: rustix::fs::Statx) -> Meta {
    let kind = match FileType::from_raw_mode(u32::from(st.stx_mode)) {
        FileType::RegularFile => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    };
    let mnt_id = StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID).then_some(st.stx_mnt_id);
    Meta {
        kind,
        dev: (st.stx_dev_major, st.stx_dev_minor),
        ino: st.stx_ino,
        mnt_id,
        nlink: st.stx_nlink,
        size: st.stx_size,
        mtime_ns: ns(st.stx_mtime),
        ctime_ns: ns(st.stx_ctime),
    }
}

/// `statx(dir, name, AT_SYMLINK_NOFOLLOW)`: describes the entry itself, never
/// what a symlink points to.
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<Meta, Errno> {
    statx(dir, name, AtFlags::SYMLINK_NOFOLLOW, STATX_MASK).map(meta_from)
}

/// `statx` of an open fd (`AT_EMPTY_PATH`): what we actually opened.
pub(crate) fn stat_fd(fd: BorrowedFd<'_>) -> Result<Meta, Errno> {
    statx(fd, c"", AtFlags::EMPTY_PATH, STATX_MASK).map(meta_from)
}

/// Why a child directory could not be opened as a walkable directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenDirError {
    /// The name is (now) a symlink.
    Symlink,
    /// The directory is a mount point (or on another mount).
    MountPoint,
    /// The name is no longer a directory, or was replaced between stat and
    /// open (inode changed).
    Changed,
    Io(Errno),
}

impl std::fmt::Display for OpenDirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Symlink => f.write_str("is a symlink (not followed)"),
            Self::MountPoint => f.write_str("is a mount point (not crossed)"),
            Self::Changed => f.write_str("changed while being examined"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Set once `openat2` answers ENOSYS (kernel < 5.6), so we stop trying.
pub(crate) static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

const DIR_FLAGS: OFlags = OFlags::RDONLY.union(OFlags::DIRECTORY).union(OFlags::NOFOLLOW).union(OFlags::CLOEXEC);

/// Opens the child directory `name` of `parent` for walking, refusing
/// symlinks and mount points. `expect` is the metadata from the listing: the
/// opened directory must be that very inode, so a swap between stat and open
/// is detected.
pub(crate) fn open_child_dir(
    parent: BorrowedFd<'_>,
    name: &CStr,
    root: MountIdentity,
    expect: Option<&Meta>,
) -> Result<(OwnedFd, Meta), OpenDirError> {
    let fd = if NO_OPENAT2.load(Ordering::Relaxed) {
        openat(parent, name, DIR_FLAGS, Mode::empty())
    } else {
        let resolve =
            ResolveFlags::NO_XDEV | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS | ResolveFlags::BENEATH;
        match openat2(parent, name, DIR_FLAGS, Mode::empty(), resolve) {
            Err(Errno::NOSYS) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
                openat(parent, name, DIR_FLAGS, Mode::empty())
            }
            other => other,
        }
    };
    let fd = match fd {
        Ok(fd) => fd,
        Err(Errno::XDEV) => return Err(OpenDirError::MountPoint),
        // O_NOFOLLOW | O_DIRECTORY on a symlink answers ELOOP or ENOTDIR
        // depending on the path taken; look at the name to say which.
        Err(Errno::LOOP | Errno::NOTDIR) => {
            return Err(match stat_at(parent, name) {
                Ok(m) if m.kind == Kind::Symlink => OpenDirError::Symlink,
                _ => OpenDirError::Changed,
            })
        }
        Err(e) => return Err(OpenDirError::Io(e)),
    };
    let meta = stat_fd(fd.as_fd()).map_err(OpenDirError::Io)?;
    if meta.kind != Kind::Dir {
        return Err(OpenDirError::Changed);
    }
    if root.differs(&meta) {
        return Err(OpenDirError::MountPoint);
    }
    if let Some(expect) = expect {
        if expect.ino != meta.ino || expect.dev != meta.dev {
            return Err(OpenDirError::Changed);
        }
    }
    Ok((fd, meta))
}

/// Opens the (already canonical) root directory itself.
pub(crate) fn open_root(path: &Path) -> Result<(OwnedFd, Meta), Errno> {
    let fd = rustix::fs::open(path, DIR_FLAGS, Mode::empty())?;
    let meta = stat_fd(fd.as_fd())?;
    Ok((fd, meta))
}

/// Lists the names in a directory (without `.` and `..`). Any error fails the
/// whole listing: callers must not act on a partial view.
pub(crate) fn list(dir: BorrowedFd<'_>) -> Result<Vec<CString>, Errno> {
    // A fresh fd so the shared one's offset is never disturbed.
    let fd = openat(dir, c".", DIR_FLAGS, Mode::empty())?;
    let mut buf = [MaybeUninit::<u8>::uninit(); 16 * 1024];
    let mut raw = RawDir::new(&fd, &mut buf);
    let mut names = Vec::new();
    while let Some(entry) = raw.next() {
        let entry = entry?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        names.push(name.to_owned());
    }
    Ok(names)
}

/// `unlinkat(dir, name, 0)`: removes a file or symlink (never its target).
pub(crate) fn unlink_file(dir: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    unlinkat(dir, name, AtFlags::empty())
}

/// `unlinkat(dir, name, AT_REMOVEDIR)`.
pub(crate) fn remove_empty_dir(dir: BorrowedFd<'_>, name: &CStr) -> Result<(), Errno> {
    unlinkat(dir, name, AtFlags::REMOVEDIR)
}
