//! Log sweeps against real trees under /tmp (issue 6).
//!
//! Every test builds a tree, sets mtimes explicitly (no timing dependence),
//! snapshots every path below the temp dir (the root *and* an "outside"
//! sibling that must never be touched), sweeps, and compares the snapshot
//! with exactly what should have gone.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failure is the test failing")]

// Wrapped in `mod logs` so `cargo test ... logs` selects these tests.
mod logs {
    use std::collections::BTreeSet;
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use polarstack_daemon::logs::{
        KeepReason, LiveInstances, LiveInstancesError, LogSweepArgs, Rule, Standalone, SweepError, SweepHandle,
        SweepReport,
    };
    use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};

    const DAY: u64 = 86_400;
    const N: u32 = 3;

    struct Tree {
        tmp: tempfile::TempDir,
    }

    impl Tree {
        fn new() -> Self {
            let tmp = tempfile::Builder::new().prefix("polarstack-logs-").tempdir_in("/tmp").expect("tempdir");
            fs::create_dir(tmp.path().join("root")).expect("root");
            fs::create_dir(tmp.path().join("outside")).expect("outside");
            Self { tmp }
        }
        fn base(&self) -> &Path {
            self.tmp.path()
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
        }
        fn symlink(&self, target: &Path, rel: &str) {
            let p = self.p(rel);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::os::unix::fs::symlink(target, &p).expect("symlink");
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

    struct Owners(BTreeSet<String>);
    impl LiveInstances for Owners {
        fn live_ins_ids(&self) -> Result<BTreeSet<String>, LiveInstancesError> {
            Ok(self.0.clone())
        }
    }
    fn owners(ids: &[&str]) -> Arc<dyn LiveInstances> {
        Arc::new(Owners(ids.iter().map(|s| s.to_string()).collect()))
    }

    struct Failing;
    impl LiveInstances for Failing {
        fn live_ins_ids(&self) -> Result<BTreeSet<String>, LiveInstancesError> {
            Err(LiveInstancesError::ListFailed { reason: "apiserver unreachable".into() })
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
        // 1002: no pod, every log old: rule 1.
        t.file("root/1002/log/postgresql-a.log", 10, 50);
        t.file("root/1002/log/error.log", 5, 50);
        t.file("root/1002/data/f", 1, 50);
        // 1003: no pod, one recent log: kept; rules 2 and 3 inside.
        t.file("root/1003/log/postgresql-old.log", 10, 20);
        t.file("root/1003/log/slow.log", 1, 20);
        t.file("root/1003/rm_data_20240202000000/f", 10, 20);
        t.age("root/1003/rm_data_20240202000000", 10);
        // 1004: no pod, no log at all: rule 1.
        t.file("root/1004/data/f", 0, 10);
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
            ("root/1004", Rule::InstanceFolder),
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
        let t = Tree::new();
        realistic(&t);
        let before = t.snapshot();
        let h = handle(&t.root(), owners(&["1001", "9999"]));
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
        assert_eq!(kept(&t, &r, "root/lost+found"), Some(KeepReason::NotInstanceId));
        assert_eq!(kept(&t, &r, "root/admin"), Some(KeepReason::NotInstanceId));
        assert_eq!(kept(&t, &r, "root/notes.txt"), Some(KeepReason::NotInstanceId));
        assert_eq!(kept(&t, &r, "root/5005"), Some(KeepReason::NotADirectory));
        assert_eq!(kept(&t, &r, "root/1001/rm_data_20991231000000"), Some(KeepReason::TooRecent));

        // Metrics count what went.
        let m = metrics_text(&h);
        assert!(m.contains("# TYPE polarstack_logs_removed_files_total counter"), "{m}");
        assert!(m.contains("polarstack_logs_removed_bytes_total{rule=\"postgresql_log\"} 127"), "{m}");
        assert!(m.contains("polarstack_logs_sweep_errors_total 0"), "{m}");
        assert!(!m.contains("polarstack_logs_last_success_timestamp_seconds 0.0\n"), "{m}");

        // A second sweep finds nothing more to do.
        let again = h.sweep(false).await.expect("sweep");
        assert!(again.removed.is_empty(), "{:?}", again.removed);
    }

    #[tokio::test]
    async fn dry_run_reports_exactly_what_a_real_run_removes() {
        let t = Tree::new();
        realistic(&t);
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
        let t = Tree::new();
        realistic(&t);
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
        let t = Tree::new();
        t.file("root/7/log/postgresql.log", 10, 1);
        t.file("root/8/log/postgresql.log", 10, 1);
        let r = handle(&t.root(), owners(&[])).sweep(false).await.expect("sweep");
        assert_eq!(r.removed.len(), 2);
        assert!(!t.p("root/7").exists() && !t.p("root/8").exists());
        assert!(t.root().exists(), "the root itself stays");
    }

    #[tokio::test]
    async fn symlinks_are_never_followed() {
        let t = Tree::new();
        // Targets outside the root, all "overdue".
        t.file("outside/victim/postgresql-v.log", 30, 10);
        t.file("outside/victim/rm_data_1/f", 30, 10);
        t.age("outside/victim/rm_data_1", 30);
        t.age("outside/victim", 30);
        t.file("outside/file.log", 30, 10);
        let victim = t.p("outside/victim");
        // 2001: podless, old, with a link out: rule 1 removes the link, not the target.
        t.file("root/2001/log/postgresql.log", 10, 1);
        t.symlink(&victim, "root/2001/escape");
        t.age("root/2001/escape", 30);
        // 2002: live, with links out, named like rule targets.
        t.file("root/2002/log/postgresql-now.log", 0, 1);
        t.symlink(&victim, "root/2002/escape");
        t.symlink(&victim, "root/2002/rm_data_20200101000000");
        t.age("root/2002/rm_data_20200101000000", 30);
        t.symlink(&t.p("outside/file.log"), "root/2002/log/postgresql-link.log");
        t.age("root/2002/log/postgresql-link.log", 30);
        // 3001: a symlinked instance folder (podless, old target).
        t.symlink(&victim, "root/3001");
        t.age("root/3001", 30);
        // 3002: a symlink to the root's parent.
        t.symlink(t.base(), "root/3002");
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
        let t = Tree::new();
        t.file("root/pi-123/log/postgresql.log", 30, 1);
        t.file("root/123/log/postgresql.log", 30, 1);
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
        let t = Tree::new();
        t.file("outside/mnt/postgresql-m.log", 30, 10);
        t.file("outside/mnt/rm_data_1/f", 30, 10);
        t.age("outside/mnt/rm_data_1", 30);
        // 4001: podless, old, a bind mount inside (same filesystem: same st_dev).
        t.file("root/4001/log/postgresql.log", 10, 1);
        t.dir("root/4001/mnt");
        // 4002: a top-level bind mount named like an instance.
        t.dir("root/4002");
        // 4003: live, bind mount inside holding overdue logs.
        t.file("root/4003/log/postgresql-now.log", 0, 1);
        t.dir("root/4003/data");
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
            let t = Tree::new();
            realistic(&t);
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
            let t = Tree::new();
            realistic(&t);
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
            for id in ["1001", "1002", "1003", "1004"] {
                assert_eq!(kept(&t, &r, &format!("root/{id}")), Some(KeepReason::OwnershipUnknown), "{source} {id}");
            }
            assert!(r.errors.iter().any(|e| e.error.contains("rule 1")), "{:?}", r.errors);
        }
    }

    /// Answers "no pods" the first time, then writes a fresh log into every
    /// podless folder on the re-check the sweeper makes right before deleting:
    /// a deterministic "log appeared during the sweep".
    struct WritesDuringSweep {
        calls: AtomicUsize,
        folders: Vec<PathBuf>,
    }
    impl LiveInstances for WritesDuringSweep {
        fn live_ins_ids(&self) -> Result<BTreeSet<String>, LiveInstancesError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) > 0 {
                for f in &self.folders {
                    let _ = fs::write(f.join("log/postgresql-new.log"), b"started");
                }
            }
            Ok(BTreeSet::new())
        }
    }

    #[tokio::test]
    async fn folder_that_gains_a_recent_log_during_the_sweep_is_kept() {
        let t = Tree::new();
        t.file("root/6001/log/postgresql-old.log", 10, 1);
        t.file("root/6001/data/f", 10, 1);
        let before = t.snapshot();
        let o = Arc::new(WritesDuringSweep { calls: AtomicUsize::new(0), folders: vec![t.p("root/6001")] });
        let r = handle(&t.root(), o).sweep(false).await.expect("sweep");
        assert_eq!(kept(&t, &r, "root/6001"), Some(KeepReason::RecentLogAppeared));
        let mut after = before.clone();
        after.insert("root/6001/log/postgresql-new.log".into());
        // Rule 2 still removes the overdue log; the folder and its data stay.
        after.remove("root/6001/log/postgresql-old.log");
        assert_eq!(t.snapshot(), after);
    }

    /// A pod for the folder appears between the decision and the deletion.
    struct PodAppears(AtomicUsize);
    impl LiveInstances for PodAppears {
        fn live_ins_ids(&self) -> Result<BTreeSet<String>, LiveInstancesError> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                Ok(BTreeSet::new())
            } else {
                Ok(["6002".to_owned()].into_iter().collect())
            }
        }
    }

    #[tokio::test]
    async fn folder_whose_pod_appears_during_the_sweep_is_kept() {
        let t = Tree::new();
        t.file("root/6002/data/f", 10, 1);
        let before = t.snapshot();
        let r = handle(&t.root(), Arc::new(PodAppears(AtomicUsize::new(0)))).sweep(false).await.expect("sweep");
        assert_eq!(kept(&t, &r, "root/6002"), Some(KeepReason::OwnedByLivePod));
        assert_eq!(t.snapshot(), before);
    }

    #[tokio::test]
    async fn concurrent_sweeps_queue_and_both_answer() {
        let t = Tree::new();
        realistic(&t);
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
        let h = polarstack_daemon::logs::spawn(a, owners(&["1"]), shutdown.clone()).expect("spawn");
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
}
