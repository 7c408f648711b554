//! Trees whose inodes carry the ages a test gives them, ctime included.
//!
//! The log sweeper's rule 1 judges a folder by the mtime *and the ctime* of
//! everything in it, and no system call sets a ctime back: it is the time of
//! the last status change, and `utimensat` itself is one. So a tree that
//! looks as if it had been written days ago and left alone since is built in
//! a staging directory (mtimes set with `utimensat`), copied into a fresh
//! ext4 image (`mkfs.ext4 -d`), every inode's ctime and atime set to its
//! mtime with `debugfs` while the image is not mounted, and the image is
//! loop-mounted. Real files on a real filesystem and kernel; only the
//! timestamps were written offline, as the passing days would have written
//! them. Anything created after mounting has a true, fresh ctime.
//!
//! Needs root, `mkfs.ext4` and `debugfs` (e2fsprogs) and loop devices.
//! Shared by `daemon/tests/logs_sweep.rs` (through `#[path]`, as the daemon
//! crate does not depend on this one) and the whole-system log tests.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

/// A loop-mounted ext4 image, unmounted and deleted on drop.
pub struct AgedFs {
    work: PathBuf,
    mnt: PathBuf,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (e2fsprogs installed? running as root?)"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every path below `dir` (without following symlinks), parents first.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        out.push(p.clone());
        if p.symlink_metadata().expect("lstat").is_dir() {
            walk(&p, out);
        }
    }
}

fn mtime(p: &Path) -> SystemTime {
    p.symlink_metadata().and_then(|m| m.modified()).unwrap_or_else(|e| panic!("mtime of {}: {e}", p.display()))
}

/// Gives every directory below `staging` that is not in `keep` (relative
/// paths) the mtime of its newest child, as a directory written once and
/// left alone has (its mtime is when its last entry was added); an empty one
/// keeps its own. Run before [`AgedFs::seal`], after setting file ages.
pub fn settle_dir_times(staging: &Path, keep: &BTreeSet<PathBuf>) {
    fn settle(dir: &Path, staging: &Path, keep: &BTreeSet<PathBuf>) -> SystemTime {
        let mut newest = None;
        for e in std::fs::read_dir(dir).expect("read_dir") {
            let p = e.expect("entry").path();
            let t = if p.symlink_metadata().expect("lstat").is_dir() { settle(&p, staging, keep) } else { mtime(&p) };
            newest = Some(newest.map_or(t, |n: SystemTime| n.max(t)));
        }
        let rel = dir.strip_prefix(staging).expect("under staging").to_path_buf();
        match newest {
            Some(t) if !keep.contains(&rel) && dir != staging => {
                let f = std::fs::File::open(dir).expect("open dir");
                f.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t)).expect("set dir times");
                t
            }
            _ => mtime(dir),
        }
    }
    settle(staging, staging, keep);
}

impl AgedFs {
    /// Copies `staging` into a new ext4 image in which every inode's ctime
    /// and atime equal its mtime, and mounts it; `staging` stays as it is.
    /// Panics when a tool fails (these tests run as root, with e2fsprogs).
    pub fn seal(staging: &Path) -> Self {
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let work = std::env::temp_dir().join(format!(
            "polarstack-aged-{}-{}-{stamp}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mnt = work.join("mnt");
        std::fs::create_dir_all(&mnt).expect("work dir");
        let img = work.join("fs.img");

        let mut paths = Vec::new();
        walk(staging, &mut paths);
        let bytes: u64 = paths.iter().filter_map(|p| p.symlink_metadata().ok()).map(|m| m.len()).sum();
        let size = 16 * 1024 * 1024 + bytes * 2 + paths.len() as u64 * 8192;
        std::fs::File::create(&img).and_then(|f| f.set_len(size)).expect("image file");
        let inodes = (paths.len() + 64).to_string();
        run(Command::new("mkfs.ext4").args(["-q", "-F", "-N", &inodes, "-d"]).arg(staging).arg(&img));

        // ctime := atime := mtime, for the root and every entry.
        let mut cmds = String::new();
        for p in std::iter::once(staging.to_path_buf()).chain(paths) {
            let rel = p.strip_prefix(staging).expect("under staging");
            let name = format!("/{}", rel.display());
            assert!(!name.contains('"') && !name.contains('\n'), "name debugfs cannot quote: {name:?}");
            let secs = mtime(&p).duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
            for field in ["mtime", "atime", "ctime"] {
                writeln!(cmds, "set_inode_field \"{name}\" {field} @{secs}").expect("string");
            }
        }
        let script = work.join("debugfs.cmds");
        std::fs::write(&script, cmds).expect("debugfs script");
        run(Command::new("debugfs").arg("-w").arg("-f").arg(&script).arg(&img));
        run(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt));
        let fs = Self { work, mnt };
        // debugfs reports a failed command only on stderr: check the result.
        let mut copied = Vec::new();
        walk(&fs.mnt, &mut copied);
        for p in copied.iter().filter(|p| !p.starts_with(fs.mnt.join("lost+found"))) {
            let m = p.symlink_metadata().expect("lstat");
            // (Not atime: listing a directory may update it, relatime.)
            assert_eq!(m.ctime(), m.mtime(), "{}: ctime not set", p.display());
        }
        fs
    }

    /// The mount point: the staging directory's copy.
    pub fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for AgedFs {
    fn drop(&mut self) {
        let ok = Command::new("umount").arg(&self.mnt).status().is_ok_and(|s| s.success());
        if !ok {
            // Busy (a daemon still had it open): detach lazily.
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}
