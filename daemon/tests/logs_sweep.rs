//! Log sweeps against real trees (issue 6; rule 1's age, issue 13).
//!
//! Every test builds a tree, sets mtimes explicitly (no timing dependence),
//! snapshots every path below the temp dir (the root *and* an "outside"
//! sibling that must never be touched), sweeps, and compares the snapshot
//! with exactly what should have gone.
//!
//! Rule 1 judges a folder by the mtime and the ctime of everything in it,
//! and a ctime cannot be set back. So a tree that must look old to rule 1 is
//! built in a staging directory and then sealed (`Tree::seal`): copied into
//! a loop-mounted ext4 image whose inodes' ctimes were set to their mtimes
//! offline (`tests/src/aged_fs.rs`). What a test writes after sealing has a
//! true, fresh ctime, exactly as on a real node.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failure is the test failing")]

#[path = "../../tests/src/aged_fs.rs"]
mod aged_fs;

// Wrapped in `mod logs` so `cargo test ... logs` selects these tests.
mod logs {
    use std::cell::RefCell;
    use std::collections::BTreeSet;
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use polarstack_daemon::logs::{
        KeepReason, LiveFuture, LiveInstances, LiveInstancesError, LogSweepArgs, Rule, Standalone, SweepError,
        SweepHandle, SweepReport,
    };
    use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};

    use super::aged_fs::{settle_dir_times, AgedFs};

    const DAY: u64 = 86_400;
    const N: u32 = 3;

    struct Tree {
        tmp: tempfile::TempDir,
        /// Directories whose mtime a test set (the others get their newest
        /// child's when sealed).
        aged_dirs: RefCell<BTreeSet<PathBuf>>,
        sealed: Option<AgedFs>,
    }

    impl Tree {
        fn new() -> Self {
            let tmp = tempfile::Builder::new().prefix("polarstack-logs-").tempdir_in("/tmp").expect("tempdir");
            fs::create_dir(tmp.path().join("root")).expect("root");
            fs::create_dir(tmp.path().join("outside")).expect("outside");
            Self { tmp, aged_dirs: RefCell::new(BTreeSet::new()), sealed: None }
        }
        /// Moves the tree built so far onto a filesystem where every entry's
        /// ctime equals its mtime: it looks written at those times and left
        /// alone since. Directories take their newest child's mtime unless a
        /// test aged them. Later writes happen there, with fresh ctimes.
        fn seal(&mut self) {
            settle_dir_times(self.tmp.path(), &self.aged_dirs.borrow());
            self.sealed = Some(AgedFs::seal(self.tmp.path()));
        }
        fn base(&self) -> &Path {
            match &self.sealed {
                Some(fs) => fs.path(),
                None => self.tmp.path(),
            }
        }
        fn root(&self) -> PathBuf {
            self.base().join("root")
        }
        fn p(&self, rel: &str) -> PathBuf {
            self.base().join(rel)
        }
        /// A file of `size` bytes, `age` days old (parents created as needed).
        fn file(&self, rel: &str, age_days: u64, size: usize) {
            let p = self.p(rel);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(&p, vec![b'x'; size]).expect("write");
            set_age(&p, age_days);
        }
        fn dir(&self, rel: &str) {
            fs::create_dir_all(self.p(rel)).expect("mkdir");
        }
        /// Sets a directory's (or symlink's) own mtime; call after filling it.
        fn age(&self, rel: &str, age_days: u64) {
            set_age(&self.p(rel), age_days);
            self.aged_dirs.borrow_mut().insert(PathBuf::from(rel));
        }
        /// A symlink at `rel` to `target` (relative to the base; "" is the
        /// base itself), written as a relative link so it points at the same
        /// place once sealed.
        fn symlink(&self, target: &str, rel: &str) {
            let p = self.p(rel);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            let ups = Path::new(rel).parent().map_or(0, |d| d.components().count());
            let link = format!("{}{target}", "../".repeat(ups));
            std::os::unix::fs::symlink(link.trim_end_matches('/'), &p).expect("symlink");
        }
        /// Every path below the temp dir, without following symlinks.
        fn snapshot(&self) -> BTreeSet<String> {
            let mut out = BTreeSet::new();
            walk(self.base(), self.base(), &mut out);
            out
        }
        fn rel(&self, abs: &str) -> String {
            Path::new(abs).strip_prefix(self.base()).expect("under base").to_string_lossy().into_owned()
        }
    }

    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in fs::read_dir(dir).expect("read_dir") {
            let e = e.expect("entry");
            let p = e.path();
            out.insert(p.strip_prefix(base).expect("prefix").to_string_lossy().into_owned());
            if e.file_type().expect("type").is_dir() {
                walk(base, &p, out);
            }
        }
    }

    fn set_age(p: &Path, age_days: u64) {
        let t = SystemTime::now() - Duration::from_secs(age_days * DAY);
        let secs = t.duration_since(UNIX_EPOCH).expect("epoch").as_secs() as i64;
        let ts = Timespec { tv_sec: secs, tv_nsec: 0 };
        let times = Timestamps { last_access: ts, last_modification: ts };
        rustix::fs::utimensat(CWD, p, &times, AtFlags::SYMLINK_NOFOLLOW).expect("utimensat");
    }

    /// Paths below `rel` in a snapshot, `rel` included.
    fn subtree(snap: &BTreeSet<String>, rel: &str) -> BTreeSet<String> {
        snap.iter().filter(|p| *p == rel || p.starts_with(&format!("{rel}/"))).cloned().collect()
    }

    /// Answers from a fixed set of live ids and counts the questions.
    #[derive(Default)]
    struct Owners {
        ids: BTreeSet<String>,
        lists: AtomicUsize,
        asked: Mutex<Vec<String>>,
    }
    impl Owners {
        fn of(ids: &[&str]) -> Arc<Self> {
            Arc::new(Self { ids: ids.iter().map(|s| s.to_string()).collect(), ..Self::default() })
        }
        fn asked(&self) -> BTreeSet<String> {
            self.asked.lock().expect("lock").iter().cloned().collect()
        }
    }
    impl LiveInstances for Owners {
        fn live_ins_ids(&self) -> LiveFuture<'_, BTreeSet<String>> {
            self.lists.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(self.ids.clone()) })
        }
        fn is_live<'a>(&'a self, ins_id: &'a str) -> LiveFuture<'a, bool> {
            self.asked.lock().expect("lock").push(ins_id.to_owned());
            Box::pin(async move { Ok(self.ids.contains(ins_id)) })
        }
    }
    fn owners(ids: &[&str]) -> Arc<dyn LiveInstances> {
        Owners::of(ids)
    }

    struct Failing;
    impl LiveInstances for Failing {
        fn live_ins_ids(&self) -> LiveFuture<'_, BTreeSet<String>> {
            Box::pin(async { Err(LiveInstancesError::ListFailed { reason: "apiserver unreachable".into() }) })
        }
        fn is_live<'a>(&'a self, _: &'a str) -> LiveFuture<'a, bool> {
            Box::pin(async { panic!("asked about one id after the list failed") })
        }
    }

    fn args(root: &Path) -> LogSweepArgs {
        LogSweepArgs {
            dbcluster_log_dir: root.to_path_buf(),
            ins_folder_overdue_days: N,
            log_sweep_concurrency: 3,
            ..LogSweepArgs::default()
        }
    }

    fn handle(root: &Path, owners: Arc<dyn LiveInstances>) -> SweepHandle {
        SweepHandle::new(args(root), owners).expect("valid args")
    }

    /// (relative path, rule) of every removal.
    /// The sweeper's metrics, as `/metrics` encodes them.
    fn metrics_text(h: &SweepHandle) -> String {
        let h = h.clone();
        polarstack_daemon::telemetry::encode([polarstack_daemon::telemetry::collector("logs", move |e| {
            h.encode_metrics(e)
        })])
        .expect("metrics encode")
    }

    fn removed(tree: &Tree, r: &SweepReport) -> BTreeSet<(String, Rule)> {
        r.removed.iter().map(|e| (tree.rel(&e.path), e.rule)).collect()
    }

    fn kept(tree: &Tree, r: &SweepReport, rel: &str) -> Option<KeepReason> {
        r.kept_reason(&tree.p(rel).to_string_lossy())
    }

    /// A realistic root: a live instance, podless ones, unrelated entries.
    fn realistic(t: &Tree) {
        // 1001: live. Rule 2 and 3 apply inside it.
        t.file("root/1001/log/postgresql-2024-01-01.log", 10, 100);
        t.file("root/1001/log/postgresql-today.log", 0, 100);
        t.file("root/1001/log/audit-old.log", 10, 100);
        t.file("root/1001/data/base/1/12345", 30, 100);
        t.file("root/1001/data/pg_log/postgresql-deep.log", 10, 7);
        t.file("root/1001/scripts/run.sh", 30, 10);
        t.file("root/1001/rm_data_20240101000000/base/1/1", 30, 1000);
        t.file("root/1001/rm_data_20240101000000/postgresql-x.log", 30, 5);
        t.age("root/1001/rm_data_20240101000000", 10);
        t.file("root/1001/rm_data_20991231000000/f", 1, 10);
        t.age("root/1001/rm_data_20991231000000", 1);
        t.file("root/1001/data/rm_data_nested/f", 10, 1);
        t.age("root/1001/data/rm_data_nested", 10);
        // 1002: no pod, nothing changed for N days: rule 1.
        t.file("root/1002/log/postgresql-a.log", 10, 50);
        t.file("root/1002/log/error.log", 5, 50);
        t.file("root/1002/data/f", 10, 50);
        // 1003: no pod, one recent log: kept; rules 2 and 3 inside.
        t.file("root/1003/log/postgresql-old.log", 10, 20);
        t.file("root/1003/log/slow.log", 1, 20);
        t.file("root/1003/rm_data_20240202000000/f", 10, 20);
        t.age("root/1003/rm_data_20240202000000", 10);
        // 1004: no pod, no log at all, a data file written today: kept
        // (rule 1 once removed it, and its data, for want of a `*.log`).
        t.file("root/1004/data/f", 0, 10);
        // 1005: no pod, old logs beside a fresh data file: kept; rule 2
        // still takes the old postgresql log.
        t.file("root/1005/log/postgresql-b.log", 10, 3);
        t.file("root/1005/data/f", 1, 10);
        // 1006: no pod, no log, nothing changed for N days: rule 1.
        t.file("root/1006/data/base/1/16384", 20, 8);
        // Unrelated entries with old logs that must stay.
        t.file("root/lost+found/postgresql-1.log", 30, 10);
        t.file("root/admin/postgresql-2.log", 30, 10);
        t.file("root/admin/rm_data_1/f", 30, 10);
        t.age("root/admin/rm_data_1", 30);
        t.file("root/notes.txt", 30, 10);
        t.file("root/5005", 30, 10); // an id-named plain file
        t.file("outside/postgresql-3.log", 30, 10);
    }

    fn realistic_expected() -> BTreeSet<(String, Rule)> {
        [
            ("root/1001/log/postgresql-2024-01-01.log", Rule::PostgresqlLog),
            ("root/1001/data/pg_log/postgresql-deep.log", Rule::PostgresqlLog),
            ("root/1001/rm_data_20240101000000", Rule::RmData),
            ("root/1002", Rule::InstanceFolder),
            ("root/1003/log/postgresql-old.log", Rule::PostgresqlLog),
            ("root/1003/rm_data_20240202000000", Rule::RmData),
            ("root/1005/log/postgresql-b.log", Rule::PostgresqlLog),
            ("root/1006", Rule::InstanceFolder),
        ]
        .into_iter()
        .map(|(p, r)| (p.to_owned(), r))
        .collect()
    }

    /// Removes the expected entries (with their subtrees) from a snapshot.
    fn minus(snap: &BTreeSet<String>, gone: &BTreeSet<(String, Rule)>) -> BTreeSet<String> {
        let mut out = snap.clone();
        for (p, _) in gone {
            for q in subtree(snap, p) {
                out.remove(&q);
            }
        }
        out
    }

    #[tokio::test]
    async fn realistic_tree_each_rule_removes_exactly_its_targets() {
        let mut t = Tree::new();
        realistic(&t);
        t.seal();
        let before = t.snapshot();
        let o = Owners::of(&["1001", "9999"]);
        let h = handle(&t.root(), o.clone());
        let r = h.sweep(false).await.expect("sweep");
        assert!(!r.dry_run);
        assert_eq!(removed(&t, &r), realistic_expected());
        assert_eq!(t.snapshot(), minus(&before, &realistic_expected()));
        assert!(r.errors.is_empty(), "{:?}", r.errors);

        // Bytes are what the files weighed.
        let bytes = |rel: &str| r.removed.iter().find(|e| t.rel(&e.path) == rel).expect(rel).bytes;
        assert_eq!(bytes("root/1002"), 150);
        assert_eq!(bytes("root/1001/rm_data_20240101000000"), 1005);
        assert_eq!(bytes("root/1001/data/pg_log/postgresql-deep.log"), 7);

        // Every skip is explained.
        assert_eq!(kept(&t, &r, "root/1001"), Some(KeepReason::OwnedByLivePod));
        assert_eq!(kept(&t, &r, "root/1003"), Some(KeepReason::RecentLog));
        assert_eq!(kept(&t, &r, "root/1004"), Some(KeepReason::TooRecent));
        assert_eq!(kept(&t, &r, "root/1005"), Some(KeepReason::TooRecent));
        let detail = |rel: &str| {
            let p = t.p(rel).to_string_lossy().into_owned();
            r.kept.iter().find(|k| k.path == p).and_then(|k| k.detail.clone()).unwrap_or_default()
        };
        assert!(detail("root/1004").contains("root/1004/data/f changed 0"), "{}", detail("root/1004"));
        assert!(detail("root/1003").contains("slow.log changed 1"), "{}", detail("root/1003"));
        // Ownership: listed once, then asked again only for the folders
        // about to go.
        assert_eq!(o.lists.load(Ordering::SeqCst), 1);
        assert_eq!(o.asked(), ["1002", "1006"].map(String::from).into_iter().collect());
        assert_eq!(kept(&t, &r, "root/lost+found"), Some(KeepReason::NotInstanceId));
        assert_eq!(kept(&t, &r, "root/admin"), Some(KeepReason::NotInstanceId));
        assert_eq!(kept(&t, &r, "root/notes.txt"), Some(KeepReason::NotInstanceId));
        assert_eq!(kept(&t, &r, "root/5005"), Some(KeepReason::NotADirectory));
        assert_eq!(kept(&t, &r, "root/1001/rm_data_20991231000000"), Some(KeepReason::TooRecent));

        // Metrics count what went.
        let m = metrics_text(&h);
        assert!(m.contains("# TYPE polarstack_logs_removed_files_total counter"), "{m}");
        assert!(m.contains("polarstack_logs_removed_bytes_total{rule=\"postgresql_log\"} 130"), "{m}");
        assert!(m.contains("polarstack_logs_sweep_errors_total 0"), "{m}");
        assert!(!m.contains("polarstack_logs_last_success_timestamp_seconds 0.0\n"), "{m}");

        // A second sweep finds nothing more to do.
        let again = h.sweep(false).await.expect("sweep");
        assert!(again.removed.is_empty(), "{:?}", again.removed);
    }

    #[tokio::test]
    async fn dry_run_reports_exactly_what_a_real_run_removes() {
        let mut t = Tree::new();
        realistic(&t);
        t.seal();
        let before = t.snapshot();
        let h = handle(&t.root(), owners(&["1001"]));
        let dry = h.sweep(true).await.expect("dry");
        assert!(dry.dry_run);
        assert_eq!(t.snapshot(), before, "a dry run deletes nothing");
        let real = h.sweep(false).await.expect("real");
        let key = |r: &SweepReport| {
            r.removed.iter().map(|e| (e.path.clone(), e.rule, e.bytes, e.entries)).collect::<Vec<_>>()
        };
        assert_eq!(key(&dry), key(&real));
        assert_eq!(dry.removed_bytes, real.removed_bytes);
        assert_eq!(removed(&t, &real), realistic_expected());
        // The last report is the real one; dry runs count no removals.
        assert!(!h.last_report().expect("report").dry_run);
    }

    #[tokio::test]
    async fn global_dry_run_forces_every_sweep_to_report_only() {
        let mut t = Tree::new();
        realistic(&t);
        t.seal();
        let before = t.snapshot();
        let mut a = args(&t.root());
        a.log_sweep_dry_run = true;
        let h = SweepHandle::new(a, owners(&["1001"])).expect("args");
        let r = h.sweep(false).await.expect("sweep");
        assert!(r.dry_run && r.forced_dry_run);
        assert_eq!(removed(&t, &r), realistic_expected());
        assert_eq!(t.snapshot(), before);
        let m = metrics_text(&h);
        assert!(m.contains("polarstack_logs_removed_files_total{rule=\"instance_folder\"} 0"), "{m}");
    }

    #[tokio::test]
    async fn zero_pods_still_cleans_podless_folders() {
        // The original never cleaned anything when no DB pod existed.
        let mut t = Tree::new();
        t.file("root/7/log/postgresql.log", 10, 1);
        t.file("root/8/log/postgresql.log", 10, 1);
        t.seal();
        let r = handle(&t.root(), owners(&[])).sweep(false).await.expect("sweep");
        assert_eq!(r.removed.len(), 2);
        assert!(!t.p("root/7").exists() && !t.p("root/8").exists());
        assert!(t.root().exists(), "the root itself stays");
    }

    #[tokio::test]
    async fn symlinks_are_never_followed() {
        let mut t = Tree::new();
        // Targets outside the root, all "overdue".
        t.file("outside/victim/postgresql-v.log", 30, 10);
        t.file("outside/victim/rm_data_1/f", 30, 10);
        t.age("outside/victim/rm_data_1", 30);
        t.age("outside/victim", 30);
        t.file("outside/file.log", 30, 10);
        let victim = "outside/victim";
        // 2001: podless, old, with a link out: rule 1 removes the link, not the target.
        t.file("root/2001/log/postgresql.log", 10, 1);
        t.symlink(victim, "root/2001/escape");
        t.age("root/2001/escape", 30);
        // 2002: live, with links out, named like rule targets.
        t.file("root/2002/log/postgresql-now.log", 0, 1);
        t.symlink(victim, "root/2002/escape");
        t.symlink(victim, "root/2002/rm_data_20200101000000");
        t.age("root/2002/rm_data_20200101000000", 30);
        t.symlink("outside/file.log", "root/2002/log/postgresql-link.log");
        t.age("root/2002/log/postgresql-link.log", 30);
        // 3001: a symlinked instance folder (podless, old target).
        t.symlink(victim, "root/3001");
        t.age("root/3001", 30);
        // 3002: a symlink to the root's parent.
        t.symlink("", "root/3002");
        t.seal();
        assert!(t.p("root/2001/escape/postgresql-v.log").exists(), "the links point into the sealed tree");
        let outside_before = subtree(&t.snapshot(), "outside");
        let h = handle(&t.root(), owners(&["2002"]));
        let r = h.sweep(false).await.expect("sweep");

        assert_eq!(subtree(&t.snapshot(), "outside"), outside_before, "nothing outside the root changed");
        assert_eq!(removed(&t, &r), [("root/2001".to_owned(), Rule::InstanceFolder)].into_iter().collect());
        assert!(t.p("root/2002/escape").symlink_metadata().is_ok());
        assert!(t.p("root/3001").symlink_metadata().is_ok());
        assert_eq!(kept(&t, &r, "root/3001"), Some(KeepReason::Symlink));
        assert_eq!(kept(&t, &r, "root/3002"), Some(KeepReason::Symlink));
        assert_eq!(kept(&t, &r, "root/2002/escape"), Some(KeepReason::Symlink));
        assert_eq!(kept(&t, &r, "root/2002/rm_data_20200101000000"), Some(KeepReason::Symlink));
        assert_eq!(kept(&t, &r, "root/2002/log/postgresql-link.log"), Some(KeepReason::Symlink));
    }

    #[tokio::test]
    async fn names_that_are_not_instance_ids_are_never_candidates() {
        let t = Tree::new();
        for name in ["lost+found", "admin", "12a", "a12", ".1001", "1001 ", " 1001", "1001.bak", "-1", "١٢٣"] {
            t.file(&format!("root/{name}/log/postgresql.log"), 30, 1);
            t.file(&format!("root/{name}/rm_data_1/f"), 30, 1);
            t.age(&format!("root/{name}/rm_data_1"), 30);
            t.age(&format!("root/{name}"), 30);
        }
        let before = t.snapshot();
        let r = handle(&t.root(), owners(&[])).sweep(false).await.expect("sweep");
        assert!(r.removed.is_empty(), "{:?}", r.removed);
        assert_eq!(t.snapshot(), before);
        assert_eq!(r.kept.len(), 10);
        assert!(r.kept.iter().all(|k| k.reason == KeepReason::NotInstanceId));
    }

    #[tokio::test]
    async fn custom_pattern_is_honoured() {
        let mut t = Tree::new();
        t.file("root/pi-123/log/postgresql.log", 30, 1);
        t.file("root/123/log/postgresql.log", 30, 1);
        t.seal();
        let mut a = args(&t.root());
        a.ins_id_pattern = "^pi-[0-9]+$".into();
        let r = SweepHandle::new(a, owners(&[])).expect("args").sweep(false).await.expect("sweep");
        assert_eq!(removed(&t, &r), [("root/pi-123".to_owned(), Rule::InstanceFolder)].into_iter().collect());
        assert!(t.p("root/123/log/postgresql.log").exists());
    }

    /// Bind-mounts `src` on `dst` and unmounts on drop.
    struct BindMount(PathBuf);
    impl BindMount {
        fn new(src: &Path, dst: &Path) -> Option<Self> {
            let ok = std::process::Command::new("mount")
                .arg("--bind")
                .arg(src)
                .arg(dst)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            ok.then(|| Self(dst.to_path_buf()))
        }
    }
    impl Drop for BindMount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    #[tokio::test]
    async fn bind_mounts_are_never_crossed() {
        let mut t = Tree::new();
        t.file("outside/mnt/postgresql-m.log", 30, 10);
        t.file("outside/mnt/rm_data_1/f", 30, 10);
        t.age("outside/mnt/rm_data_1", 30);
        // 4001: podless, old, a bind mount inside (same filesystem: same st_dev).
        t.file("root/4001/log/postgresql.log", 10, 1);
        t.dir("root/4001/mnt");
        t.age("root/4001/mnt", 10);
        // 4002: a top-level bind mount named like an instance.
        t.dir("root/4002");
        // 4003: live, bind mount inside holding overdue logs.
        t.file("root/4003/log/postgresql-now.log", 0, 1);
        t.dir("root/4003/data");
        t.seal();
        let src = t.p("outside/mnt");
        let Some(_m1) = BindMount::new(&src, &t.p("root/4001/mnt")) else {
            eprintln!("SKIP: mount --bind unavailable (not root?)");
            return;
        };
        let _m2 = BindMount::new(&src, &t.p("root/4002")).expect("bind 2");
        let _m3 = BindMount::new(&src, &t.p("root/4003/data")).expect("bind 3");
        let outside_before = subtree(&t.snapshot(), "outside");
        let r = handle(&t.root(), owners(&["4003"])).sweep(false).await.expect("sweep");
        // 4001 is kept whole (rule 1 refused); rule 2 still applies inside it.
        assert_eq!(
            removed(&t, &r),
            [("root/4001/log/postgresql.log".to_owned(), Rule::PostgresqlLog)].into_iter().collect()
        );
        assert_eq!(subtree(&t.snapshot(), "outside"), outside_before);
        assert!(t.p("root/4001/mnt").is_dir());
        assert_eq!(kept(&t, &r, "root/4001"), Some(KeepReason::ContainsMountPoint));
        assert_eq!(kept(&t, &r, "root/4002"), Some(KeepReason::MountPoint));
        assert_eq!(kept(&t, &r, "root/4003/data"), Some(KeepReason::MountPoint));
        assert_eq!(kept(&t, &r, "root/4001/mnt"), Some(KeepReason::MountPoint));
    }

    #[tokio::test]
    async fn trailing_slash_and_relative_root_do_not_change_behaviour() {
        let mut reports = Vec::new();
        for form in ["plain", "slash", "dotted", "relative"] {
            let mut t = Tree::new();
            realistic(&t);
            t.seal();
            let root = t.root();
            let flag = match form {
                "plain" => root.clone(),
                "slash" => PathBuf::from(format!("{}/", root.display())),
                "dotted" => root.join("../root/./"),
                _ => {
                    let cwd = std::env::current_dir().expect("cwd");
                    let ups = "../".repeat(cwd.components().count() - 1);
                    PathBuf::from(format!("{ups}{}/", root.strip_prefix("/").expect("abs").display()))
                }
            };
            assert_eq!(flag.is_relative(), form == "relative");
            let before = t.snapshot();
            let r = handle(&flag, owners(&["1001"])).sweep(false).await.expect(form);
            assert_eq!(r.root, root.to_string_lossy(), "{form}: canonical root reported");
            assert_eq!(removed(&t, &r), realistic_expected(), "{form}");
            assert_eq!(t.snapshot(), minus(&before, &realistic_expected()), "{form}");
            reports.push(removed(&t, &r));
        }
        assert!(reports.windows(2).all(|w| w[0] == w[1]));
    }

    #[tokio::test]
    async fn missing_root_deletes_nothing() {
        let t = Tree::new();
        realistic(&t);
        let before = t.snapshot();
        for bad in [t.p("nope"), t.p("nope/"), t.p("root/notes.txt"), PathBuf::from("/")] {
            let h = handle(&bad, owners(&[]));
            let err = h.sweep(false).await.expect_err("must fail");
            assert!(matches!(err, SweepError::RootUnavailable { .. } | SweepError::RootIsSlash), "{err}");
            let last = h.last_report().expect("failure is reported");
            assert!(last.aborted.is_some() && last.removed.is_empty());
            let m = metrics_text(&h);
            assert!(m.contains("polarstack_logs_sweep_errors_total 1"), "{m}");
            assert!(m.contains("polarstack_logs_last_success_timestamp_seconds 0.0\n"), "{m}");
        }
        assert_eq!(t.snapshot(), before);
    }

    #[tokio::test]
    async fn failed_pod_list_disables_rule_1_only() {
        for source in ["failing", "standalone"] {
            let mut t = Tree::new();
            realistic(&t);
            t.seal();
            let before = t.snapshot();
            let o: Arc<dyn LiveInstances> = if source == "failing" { Arc::new(Failing) } else { Arc::new(Standalone) };
            let r = handle(&t.root(), o).sweep(false).await.expect("sweep");
            let expected: BTreeSet<_> =
                realistic_expected().into_iter().filter(|(_, rule)| *rule != Rule::InstanceFolder).collect();
            // 1002's old postgresql log still goes by rule 2.
            let mut expected = expected;
            expected.insert(("root/1002/log/postgresql-a.log".into(), Rule::PostgresqlLog));
            assert_eq!(removed(&t, &r), expected, "{source}");
            assert_eq!(t.snapshot(), minus(&before, &expected), "{source}");
            for id in ["1001", "1002", "1003", "1004", "1005", "1006"] {
                assert_eq!(kept(&t, &r, &format!("root/{id}")), Some(KeepReason::OwnershipUnknown), "{source} {id}");
            }
            assert!(r.errors.iter().any(|e| e.error.contains("rule 1")), "{:?}", r.errors);
        }
    }

    /// Lists no pods, then, on the re-check the sweeper makes right before
    /// deleting, writes a fresh file into the folder and answers "still no
    /// pod": a deterministic "something was written during the sweep".
    struct WritesDuringSweep {
        file: PathBuf,
    }
    impl LiveInstances for WritesDuringSweep {
        fn live_ins_ids(&self) -> LiveFuture<'_, BTreeSet<String>> {
            Box::pin(async { Ok(BTreeSet::new()) })
        }
        fn is_live<'a>(&'a self, _: &'a str) -> LiveFuture<'a, bool> {
            fs::write(&self.file, b"started").expect("write during the sweep");
            Box::pin(async { Ok(false) })
        }
    }

    #[tokio::test]
    async fn folder_that_gains_a_recent_entry_during_the_sweep_is_kept() {
        for (new, reason) in
            [("log/postgresql-new.log", KeepReason::RecentLogAppeared), ("data/new.dat", KeepReason::Changed)]
        {
            let mut t = Tree::new();
            t.file("root/6001/log/postgresql-old.log", 10, 1);
            t.file("root/6001/data/f", 10, 1);
            t.seal();
            let before = t.snapshot();
            let o = Arc::new(WritesDuringSweep { file: t.p("root/6001").join(new) });
            let r = handle(&t.root(), o).sweep(false).await.expect("sweep");
            assert_eq!(kept(&t, &r, "root/6001"), Some(reason), "{new}");
            let mut after = before.clone();
            after.insert(format!("root/6001/{new}"));
            // Rule 2 still removes the overdue log; the folder and its data stay.
            after.remove("root/6001/log/postgresql-old.log");
            assert_eq!(t.snapshot(), after, "{new}");
        }
    }

    /// A pod for the folder appears between the listing and the deletion.
    struct PodAppears;
    impl LiveInstances for PodAppears {
        fn live_ins_ids(&self) -> LiveFuture<'_, BTreeSet<String>> {
            Box::pin(async { Ok(BTreeSet::new()) })
        }
        fn is_live<'a>(&'a self, ins_id: &'a str) -> LiveFuture<'a, bool> {
            Box::pin(async move { Ok(ins_id == "6002") })
        }
    }

    #[tokio::test]
    async fn folder_whose_pod_appears_during_the_sweep_is_kept() {
        let mut t = Tree::new();
        t.file("root/6002/data/f", 10, 1);
        t.file("root/6003/data/f", 10, 1);
        t.seal();
        let before = t.snapshot();
        let r = handle(&t.root(), Arc::new(PodAppears)).sweep(false).await.expect("sweep");
        assert_eq!(kept(&t, &r, "root/6002"), Some(KeepReason::OwnedByLivePod));
        assert_eq!(removed(&t, &r), [("root/6003".to_owned(), Rule::InstanceFolder)].into_iter().collect());
        assert_eq!(t.snapshot(), minus(&before, &removed(&t, &r)));
    }

    /// The re-check right before removal fails: that folder stays (and says
    /// why), the others still go, and rules 2 and 3 run inside it.
    struct RecheckFails;
    impl LiveInstances for RecheckFails {
        fn live_ins_ids(&self) -> LiveFuture<'_, BTreeSet<String>> {
            Box::pin(async { Ok(BTreeSet::new()) })
        }
        fn is_live<'a>(&'a self, ins_id: &'a str) -> LiveFuture<'a, bool> {
            Box::pin(async move {
                if ins_id == "6004" {
                    Err(LiveInstancesError::ListFailed { reason: "the API server answered 500".into() })
                } else {
                    Ok(false)
                }
            })
        }
    }

    #[tokio::test]
    async fn a_failed_recheck_keeps_the_folder_and_says_why() {
        let mut t = Tree::new();
        t.file("root/6004/log/postgresql-old.log", 10, 1);
        t.file("root/6004/rm_data_20200101000000/f", 10, 1);
        t.age("root/6004/rm_data_20200101000000", 10);
        t.file("root/6005/data/f", 10, 1);
        t.seal();
        let r = handle(&t.root(), Arc::new(RecheckFails)).sweep(false).await.expect("sweep");
        assert_eq!(kept(&t, &r, "root/6004"), Some(KeepReason::OwnershipUnknown));
        let want: BTreeSet<_> = [
            ("root/6004/log/postgresql-old.log", Rule::PostgresqlLog),
            ("root/6004/rm_data_20200101000000", Rule::RmData),
            ("root/6005", Rule::InstanceFolder),
        ]
        .into_iter()
        .map(|(p, r)| (p.to_owned(), r))
        .collect();
        assert_eq!(removed(&t, &r), want);
        assert!(t.p("root/6004/log").is_dir());
        assert!(
            r.errors.iter().any(|e| t.rel(&e.path) == "root/6004" && e.error.contains("500")),
            "the report says why: {:?}",
            r.errors
        );
    }

    #[tokio::test]
    async fn concurrent_sweeps_queue_and_both_answer() {
        let mut t = Tree::new();
        realistic(&t);
        t.seal();
        let h = handle(&t.root(), owners(&["1001"]));
        let (a, b) = tokio::join!(h.sweep(false), h.sweep(false));
        let (a, b) = (a.expect("a"), b.expect("b"));
        // One of them did the work, the other found nothing left.
        let total: BTreeSet<_> = removed(&t, &a).union(&removed(&t, &b)).cloned().collect();
        assert_eq!(total, realistic_expected());
        assert!(a.removed.is_empty() || b.removed.is_empty());
    }

    #[tokio::test]
    async fn report_serialises_to_json() {
        let t = Tree::new();
        realistic(&t);
        let r = handle(&t.root(), owners(&["1001"])).sweep(true).await.expect("sweep");
        let v = serde_json::to_value(&r).expect("json");
        assert_eq!(v["dry_run"], true);
        assert!(v["started_at"].as_str().expect("ts").ends_with('Z'));
        assert!(v["removed"][0]["rule"].is_string());
        assert!(v["kept"].as_array().expect("kept").iter().any(|k| k["reason"] == "not_instance_id"));
    }

    /// Real time (a paused clock would auto-advance while the blocking pool
    /// works); the waits are bounds, not assertions about speed.
    #[tokio::test]
    async fn schedule_runs_first_sweep_soon_and_stops_on_shutdown() {
        let t = Tree::new();
        t.file("root/1/log/postgresql.log", 10, 1);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut a = args(&t.root());
        // The first sweep comes after min(30 s, interval).
        a.log_sweep_interval = Duration::from_secs(1);
        let h = polarstack_daemon::logs::spawn(
            a,
            owners(&["1"]),
            &polarstack_daemon::tasks::Tasks::new(shutdown.clone(), None),
        )
        .expect("spawn");
        assert!(h.last_report().is_none());
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while h.last_report().is_none() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = h.last_report().expect("first scheduled sweep ran");
        assert!(!r.dry_run);
        assert!(!t.p("root/1/log/postgresql.log").exists());
        shutdown.cancel();
        loop {
            match h.sweep(true).await {
                Err(SweepError::ShuttingDown) => break,
                _ if std::time::Instant::now() > deadline => panic!("never shut down"),
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Rule 1 judges a folder by when anything in it last changed (mtime or
    /// ctime, the folder itself and every entry of any kind below it), not
    /// by its `*.log` files alone.
    #[tokio::test]
    async fn young_podless_folders_are_kept_whatever_they_hold() {
        let mut t = Tree::new();
        // Written long ago and left alone: these go.
        t.file("root/2104/log/postgresql-1.log", 10, 5);
        t.file("root/2104/data/base/1/16384", 20, 5);
        t.file("outside/backup/2105/log/postgresql-1.log", 10, 5);
        t.file("outside/backup/2105/data/base/1/16384", 20, 5);
        t.file("root/2106/a/b/c/d/e/old.dat", 10, 5);
        t.file("root/2107/data/f", 10, 5);
        t.file("root/2108/data/f", 10, 5);
        t.file("root/2109/data/f", 10, 5);
        t.file("root/2103/log/postgresql-1.log", 10, 5);
        t.file("root/2103/log/error.log", 10, 5);
        t.seal();
        // Created today, before its pod, with no files at all yet.
        t.dir("root/2101/data");
        t.dir("root/2101/log");
        // Logging to `.csv` only.
        t.file("root/2102/log/postgresql-2026-12-01.csv", 0, 5);
        // Old logs (sealed above) beside a data file written today.
        t.file("root/2103/data/base/1/16384", 0, 5);
        // Restored today with `cp -p`: every mtime old, every ctime now.
        let cp = std::process::Command::new("cp")
            .arg("-a")
            .arg(t.p("outside/backup/2105"))
            .arg(t.p("root/2105"))
            .status()
            .expect("cp");
        assert!(cp.success());
        // One new file six levels down in an old tree.
        fs::write(t.p("root/2106/a/b/c/d/e/new.dat"), b"x").expect("write");
        // Only a status change today: a chmod.
        fs::set_permissions(t.p("root/2107/data/f"), std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        // Only a new symlink.
        std::os::unix::fs::symlink("f", t.p("root/2108/data/link")).expect("symlink");
        // 2109: an empty new subdirectory.
        t.dir("root/2109/data/new");
        let before = t.snapshot();
        let o = Owners::of(&[]);
        let r = handle(&t.root(), o.clone()).sweep(false).await.expect("sweep");

        // Rule 2 still takes the old `postgresql*.log` files in the folders
        // that stay (it judges each file by its mtime, as the original).
        let want: BTreeSet<_> = [
            ("root/2104", Rule::InstanceFolder),
            ("root/2103/log/postgresql-1.log", Rule::PostgresqlLog),
            ("root/2105/log/postgresql-1.log", Rule::PostgresqlLog),
        ]
        .into_iter()
        .map(|(p, r)| (p.to_owned(), r))
        .collect();
        assert_eq!(removed(&t, &r), want);
        assert_eq!(t.snapshot(), minus(&before, &want));
        for id in ["2101", "2102", "2103", "2106", "2107", "2108", "2109"] {
            assert_eq!(kept(&t, &r, &format!("root/{id}")), Some(KeepReason::TooRecent), "{id}: {:?}", r.kept);
        }
        // In the restored copy everything is fresh: the first entry found
        // names the reason, a `*.log` or not (directory order).
        let restored = kept(&t, &r, "root/2105");
        assert!(matches!(restored, Some(KeepReason::TooRecent | KeepReason::RecentLog)), "{restored:?}");
        let detail = |rel: &str| {
            let p = t.p(rel).to_string_lossy().into_owned();
            r.kept.iter().find(|k| k.path == p).and_then(|k| k.detail.clone()).unwrap_or_default()
        };
        // The restore is told apart: old mtimes, fresh ctime.
        assert!(detail("root/2105").contains("ctime; its mtime is"), "{}", detail("root/2105"));
        assert!(detail("root/2106").contains("new.dat"), "{}", detail("root/2106"));
        // Only the folder about to go was asked about again.
        assert_eq!(o.asked(), ["2104".to_owned()].into_iter().collect());
        assert!(r.errors.is_empty(), "{:?}", r.errors);
    }

    #[tokio::test]
    async fn no_candidate_folders_no_ownership_questions() {
        let mut t = Tree::new();
        t.file("root/admin/postgresql-1.log", 30, 1);
        t.file("root/notes.txt", 30, 1);
        t.seal();
        let o = Owners::of(&[]);
        let r = handle(&t.root(), o.clone()).sweep(false).await.expect("sweep");
        assert!(r.removed.is_empty());
        assert_eq!(o.lists.load(Ordering::SeqCst), 0, "nothing to ask about");
        assert!(o.asked().is_empty());
    }

    /// Shutdown during a large removal: it stops between two entries within
    /// about 100 ms, and what is left is a consistent tree (every remaining
    /// entry whole, nothing half-removed) that a later sweep can finish.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancellation_stops_a_large_removal_promptly() {
        const DIRS: usize = 50;
        const FILES: usize = 1000;
        let t = Tree::new();
        let rm = "root/9001/rm_data_20200101000000";
        for d in 0..DIRS {
            let dir = t.p(&format!("{rm}/d{d:03}"));
            fs::create_dir_all(&dir).expect("mkdir");
            for f in 0..FILES {
                fs::write(dir.join(format!("{f:04}")), b"0123456789").expect("write");
            }
        }
        t.age(rm, 10);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let mut a = args(&t.root());
        a.log_sweep_interval = Duration::from_secs(1);
        let h = polarstack_daemon::logs::spawn(
            a,
            owners(&["9001"]),
            &polarstack_daemon::tasks::Tasks::new(shutdown.clone(), None),
        )
        .expect("spawn");
        // Wait until the removal is under way (some first-level dirs gone).
        let deadline = Instant::now() + Duration::from_secs(60);
        let left = || fs::read_dir(t.p(rm)).map(|d| d.count()).unwrap_or(0);
        while left() > DIRS - 3 {
            assert!(Instant::now() < deadline, "the removal never started");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let cancelled = Instant::now();
        shutdown.cancel();
        while h.last_report().is_none() {
            assert!(cancelled.elapsed() < Duration::from_secs(10), "the sweep did not stop");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let took = cancelled.elapsed();
        eprintln!("removal of {} files stopped {took:?} after the cancel", DIRS * FILES);
        assert!(took < Duration::from_millis(300), "stopped {took:?} after the cancel");
        let r = h.last_report().expect("report");
        assert!(r.removed.is_empty(), "{:?}", r.removed);
        let k = r.kept.iter().find(|k| t.rel(&k.path) == rm).expect("the folder is reported");
        assert_eq!(k.reason, KeepReason::Cancelled);
        assert!(k.detail.as_deref().is_some_and(|d| d.contains("partially removed")), "{k:?}");
        assert!(r.errors.is_empty(), "a stop is not an error: {:?}", r.errors);
        // Consistent: what is left is whole, directories and files alike.
        let snap = subtree(&t.snapshot(), rm);
        let is_file = |p: &&String| p.matches('/').count() == 4;
        let files = snap.iter().filter(is_file).count();
        assert!(files > 0 && files < DIRS * FILES, "{files} files left");
        for p in snap.iter().filter(is_file) {
            assert_eq!(fs::read(t.p(p)).expect("a whole file"), b"0123456789");
        }
        // A later sweep, N days on (aged by hand), finishes the job.
        t.age(rm, 10);
        let again = handle(&t.root(), owners(&["9001"])).sweep(false).await.expect("sweep");
        assert_eq!(removed(&t, &again), [(rm.to_owned(), Rule::RmData)].into_iter().collect());
        assert!(!t.p(rm).exists());
    }
}
