//! Unit tests of the fd-relative primitives (the tree-level behaviour is in
//! `daemon/tests/logs_sweep.rs`).

use std::ffi::CString;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::fsx::{self, Kind, OpenDirError, NO_OPENAT2};

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("polarstack-fsx-").tempdir_in("/tmp").expect("tempdir")
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no nul")
}

struct BindMount(PathBuf);
impl BindMount {
    fn new(src: &Path, dst: &Path) -> Option<Self> {
        let ok =
            std::process::Command::new("mount").arg("--bind").arg(src).arg(dst).status().is_ok_and(|s| s.success());
        ok.then(|| Self(dst.to_path_buf()))
    }
}
impl Drop for BindMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn directory_swapped_for_a_symlink_after_stat_is_not_followed() {
    let t = tmp();
    std::fs::create_dir(t.path().join("d")).expect("mkdir");
    std::fs::create_dir(t.path().join("elsewhere")).expect("mkdir");
    // Created now so it cannot reuse `d`'s inode number later.
    std::fs::create_dir(t.path().join("other")).expect("mkdir");
    let (root, root_meta) = fsx::open_root(t.path()).expect("root");
    let meta = fsx::stat_at(root.as_fd(), &c("d")).expect("stat");
    assert_eq!(meta.kind, Kind::Dir);
    // The race: between listing and opening, `d` becomes a symlink.
    std::fs::remove_dir(t.path().join("d")).expect("rmdir");
    std::os::unix::fs::symlink(t.path().join("elsewhere"), t.path().join("d")).expect("ln");
    let err = fsx::open_child_dir(root.as_fd(), &c("d"), root_meta.mount(), Some(&meta)).expect_err("must refuse");
    assert_eq!(err, OpenDirError::Symlink);
    // Swapped for another directory: the inode check catches it.
    std::fs::remove_file(t.path().join("d")).expect("rm");
    std::fs::rename(t.path().join("other"), t.path().join("d")).expect("mv");
    let err = fsx::open_child_dir(root.as_fd(), &c("d"), root_meta.mount(), Some(&meta)).expect_err("must refuse");
    assert_eq!(err, OpenDirError::Changed);
}

#[test]
fn bind_mount_of_the_same_filesystem_is_detected_without_openat2() {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir(&src).expect("mkdir");
    std::fs::create_dir(&dst).expect("mkdir");
    let Some(_m) = BindMount::new(&src, &dst) else {
        eprintln!("SKIP: mount --bind unavailable");
        return;
    };
    let (root, root_meta) = fsx::open_root(t.path()).expect("root");
    let meta = fsx::stat_at(root.as_fd(), &c("dst")).expect("stat");
    assert_eq!(meta.dev, root_meta.dev, "same filesystem: st_dev cannot tell");
    if meta.mnt_id.is_none() {
        eprintln!("SKIP: kernel without STATX_MNT_ID");
        return;
    }
    assert!(root_meta.mount().differs(&meta), "the mount id tells");
    // With openat2 (RESOLVE_NO_XDEV) and without it (mount id check alone).
    for no_openat2 in [false, true] {
        NO_OPENAT2.store(no_openat2, Ordering::Relaxed);
        let err = fsx::open_child_dir(root.as_fd(), &c("dst"), root_meta.mount(), None).expect_err("must refuse");
        assert_eq!(err, OpenDirError::MountPoint, "no_openat2={no_openat2}");
        assert!(
            fsx::open_child_dir(root.as_fd(), &c("src"), root_meta.mount(), None).is_ok(),
            "a plain directory opens"
        );
    }
    NO_OPENAT2.store(false, Ordering::Relaxed);
}

#[test]
fn stat_and_unlink_never_touch_a_symlink_target() {
    let t = tmp();
    std::fs::write(t.path().join("target.log"), b"keep").expect("write");
    std::os::unix::fs::symlink(t.path().join("target.log"), t.path().join("link.log")).expect("ln");
    let (root, _) = fsx::open_root(t.path()).expect("root");
    let meta = fsx::stat_at(root.as_fd(), &c("link.log")).expect("stat");
    assert_eq!(meta.kind, Kind::Symlink);
    fsx::unlink_file(root.as_fd(), &c("link.log")).expect("unlink");
    assert_eq!(std::fs::read(t.path().join("target.log")).expect("read"), b"keep");
    let names = fsx::list(root.as_fd()).expect("list");
    assert_eq!(names, vec![c("target.log")]);
}

#[test]
fn change_time_counts_even_when_the_mtime_was_set_back() {
    // What `cp -p`, `rsync -a` or a restore leave behind: an old mtime, and
    // a ctime that says when the copy was made (the kernel sets it on every
    // status change, `utimensat` included, and nothing can set it back).
    let t = tmp();
    std::fs::write(t.path().join("restored.dat"), b"x").expect("write");
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(30 * 86_400);
    let f = std::fs::File::options().write(true).open(t.path().join("restored.dat")).expect("open");
    f.set_times(std::fs::FileTimes::new().set_modified(old).set_accessed(old)).expect("set times");
    let (root, _) = fsx::open_root(t.path()).expect("root");
    let meta = fsx::stat_at(root.as_fd(), &c("restored.dat")).expect("stat");
    let now_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("epoch").as_nanos() as i128;
    let day = 86_400 * 1_000_000_000_i128;
    assert!(now_ns - meta.mtime_ns > 29 * day, "mtime set back");
    assert!(now_ns - meta.ctime_ns < day, "ctime is the copy's");
    assert_eq!(meta.changed_ns(), meta.ctime_ns);
    assert_eq!(meta.nlink, 1);
}
