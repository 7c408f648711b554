//! Log sweeps end to end: the real daemon binary, against the fake API
//! server, sweeping real trees over HTTP (`POST /api/v2/logs/sweep`).
//!
//! Rule 1 needs trees that look old to a ctime, which cannot be set back:
//! those live on a loop-mounted ext4 image whose ctimes were written offline
//! (`polarstack_tests::aged_fs`). Whatever a test writes after mounting is
//! fresh, as on a real node.
use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{symlink, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime},
};

use polarstack_tests::{
    aged_fs::{settle_dir_times, AgedFs},
    cluster::{daemon_for, seed, NODE},
    fake_api::{FakeApi, Fault, RequestRecord},
    in_new_netns, wait_for, Daemon,
};
use serde_json::{json, Value};

const LABEL: &str = "apsara.metric.ins_id";
const TOKEN: &str = "sweep-token";
const DAY: u64 = 86_400;

/// A pod of instance `id`, on another node (rule 1 asks cluster-wide).
fn db_pod(api: &FakeApi, id: &str) {
    api.put(json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("db-{id}"), "namespace": "default", "labels": {LABEL: id}},
        "spec": {"nodeName": "node-b", "containers": [{"name": "pg", "image": "polardb/engine:1"}]}}));
}

fn write_file(p: &Path, age_days: u64, body: &[u8]) {
    fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    fs::write(p, body).expect("write");
    set_age(p, age_days);
}

fn set_age(p: &Path, age_days: u64) {
    let t = SystemTime::now() - Duration::from_secs(age_days * DAY);
    let f = fs::File::open(p).expect("open");
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t)).expect("set times");
}

/// Staging for a tree that will be sealed; `root/` is the log root.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("polarstack-sweeps-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("root")).expect("staging");
        Self { dir }
    }
    /// An instance folder written `age_days` ago and left alone since (its
    /// log is not a `postgresql*.log`, so rule 2 leaves it to rule 1).
    fn old_instance(&self, id: &str, age_days: u64) {
        write_file(&self.dir.join(format!("root/{id}/log/error.log")), age_days, b"log");
        write_file(&self.dir.join(format!("root/{id}/data/base/1/16384")), age_days, b"data");
    }
    fn seal(self) -> AgedFs {
        settle_dir_times(&self.dir, &BTreeSet::new());
        let fs = AgedFs::seal(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
        fs
    }
}

fn start(api: &FakeApi, root: &Path, token_dir: &Path) -> Daemon {
    start_with(api, root, token_dir, None)
}

/// [`start`], optionally under a wrapper (`setpriv`).
fn start_with(api: &FakeApi, root: &Path, token_dir: &Path, wrapper: Option<Command>) -> Daemon {
    let token = token_dir.join("token");
    fs::write(&token, TOKEN).expect("token file");
    let args = [
        "--dbcluster-log-dir",
        root.to_str().expect("utf-8"),
        "--ins-folder-overdue-days",
        "3",
        // No scheduled sweep during a test (the first would come after 30 s).
        "--log-sweep-interval",
        "24h",
        "--log-sweep-http-enable",
        "--log-sweep-token-file",
        token.to_str().expect("utf-8"),
    ];
    match wrapper {
        None => daemon_for(api.kubeconfig_path(), NODE, &args),
        Some(cmd) => {
            let kc = api.kubeconfig_path().to_str().expect("utf-8");
            let mut all = vec!["--kubeconfig", kc, "--current-node-name", NODE, "--publish-debounce", "50ms"];
            all.extend_from_slice(&args);
            let mut d = Daemon::start_with(cmd, &all);
            d.wait_ready();
            d
        }
    }
}

fn sweep(d: &mut Daemon) -> Value {
    match d.post_as("/api/v2/logs/sweep?dry_run=false", Some(TOKEN)) {
        Ok((200, v)) => v,
        other => panic!("sweep: {other:?}\n{}", d.log_text()),
    }
}

fn removed(report: &Value, root: &Path) -> BTreeSet<String> {
    report["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .map(|e| {
            let p = e["path"].as_str().expect("path");
            Path::new(p).strip_prefix(root).expect("under the root").to_string_lossy().into_owned()
        })
        .collect()
}

fn kept(report: &Value, root: &Path, rel: &str) -> Option<(String, String)> {
    let path = root.join(rel).to_string_lossy().into_owned();
    report["kept"].as_array().expect("kept").iter().find(|k| k["path"] == path.as_str()).map(|k| {
        (k["reason"].as_str().unwrap_or_default().to_owned(), k["detail"].as_str().unwrap_or_default().to_owned())
    })
}

/// Pod lists that carry the instance label: (the whole listing, one-id lists).
fn instance_lists(reqs: &[RequestRecord]) -> (Vec<RequestRecord>, Vec<RequestRecord>) {
    let ours: Vec<_> = reqs
        .iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v1/pods" && r.param("watch").is_none())
        .filter(|r| r.param("labelSelector").is_some_and(|l| l.starts_with(LABEL)))
        .cloned()
        .collect();
    ours.into_iter().partition(|r| r.param("labelSelector").as_deref() == Some(LABEL))
}

fn one_id(r: &RequestRecord) -> String {
    r.param("labelSelector").and_then(|l| l.strip_prefix(&format!("{LABEL}=")).map(str::to_owned)).unwrap_or_default()
}

/// One sweep with K candidate folders costs one listing and at most K one-id
/// lists, and never a watch: here 4 podless candidates, one of them young,
/// so exactly 3 one-id lists.
#[test]
fn a_sweep_lists_instances_once_and_asks_again_only_before_each_removal() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        db_pod(&api, "7003");
        let staging = Staging::new("count");
        for id in ["7001", "7002", "7003", "7005"] {
            staging.old_instance(id, 10);
        }
        let aged = staging.seal();
        let root = aged.path().join("root");
        // 7004: created today, before its pod: no logs, only directories.
        fs::create_dir_all(root.join("7004/data")).expect("mkdir");
        let mut d = start(&api, &root, aged.path());

        let before = Instant::now();
        let report = sweep(&mut d);
        let window: Vec<_> = api.requests().into_iter().filter(|r| r.at >= before).collect();

        assert_eq!(removed(&report, &root), ["7001", "7002", "7005"].map(String::from).into_iter().collect());
        assert_eq!(kept(&report, &root, "7003").map(|k| k.0), Some("owned_by_live_pod".into()));
        assert_eq!(kept(&report, &root, "7004").map(|k| k.0), Some("too_recent".into()));
        assert!(root.join("7003/data/base/1/16384").exists() && root.join("7004/data").is_dir());

        let (listing, per_id) = instance_lists(&window);
        assert_eq!(listing.len(), 1, "one listing: {listing:?}");
        let l = &listing[0];
        assert_eq!(l.param("limit").as_deref(), Some("500"), "paginated");
        assert_eq!(l.param("resourceVersion").as_deref(), Some("0"), "served from the watch cache");
        assert_eq!(l.param("resourceVersionMatch").as_deref(), Some("NotOlderThan"));
        assert!(l.accept.as_deref().is_some_and(|a| a.contains("as=PartialObjectMetadataList")), "{l:?}");
        let asked: BTreeSet<_> = per_id.iter().map(one_id).collect();
        assert_eq!(asked, ["7001", "7002", "7005"].map(String::from).into_iter().collect(), "{per_id:?}");
        assert_eq!(per_id.len(), 3, "once each");
        let candidates = 4;
        assert!(per_id.len() <= candidates);
        for r in &per_id {
            assert_eq!(r.param("limit").as_deref(), Some("1"), "{r:?}");
            assert_eq!(r.param("resourceVersion"), None, "a fresh read, not the cache: {r:?}");
            assert!(r.at > l.at, "asked after the listing");
        }
        // No watch of instance pods, ever (from start-up on).
        let watches: Vec<_> = api
            .requests()
            .into_iter()
            .filter(|r| r.path.ends_with("/pods") && r.param("watch").is_some())
            .filter(|r| r.param("labelSelector").is_some_and(|l| l.contains(LABEL)))
            .collect();
        assert!(watches.is_empty(), "{watches:?}");
        eprintln!("requests for rule 1 in this sweep: {} listing + {} one-id lists", listing.len(), per_id.len());
        let _ = d.terminate();
    });
}

/// A pod created after the sweep listed the instances, while the sweep is
/// about to remove its folder: the fresh one-id re-check sees it. The
/// re-check for 7101 is slowed (a delay fault on that one selector) so the
/// pod can be created in between, deterministically.
#[test]
fn a_pod_created_after_the_listing_keeps_its_folder() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        let staging = Staging::new("appears");
        staging.old_instance("7101", 10);
        staging.old_instance("7102", 10);
        let aged = staging.seal();
        let root = aged.path().join("root");
        let mut d = start(&api, &root, aged.path());
        api.inject(Fault::delay(Duration::from_secs(2)).param("labelSelector", &format!("{LABEL}=7101")));

        let before = Instant::now();
        let (report, created_at) = thread::scope(|s| {
            let sweeping = s.spawn(|| d.post_as("/api/v2/logs/sweep?dry_run=false", Some(TOKEN)));
            let listed = wait_for(Duration::from_secs(10), || {
                instance_lists(&api.requests()).0.iter().any(|r| r.at >= before && r.status == 200)
            });
            assert!(listed, "the sweep never listed the instances");
            db_pod(&api, "7101");
            let created_at = Instant::now();
            (sweeping.join().expect("sweep thread"), created_at)
        });
        let report = match report {
            Ok((200, v)) => v,
            other => panic!("sweep: {other:?}\n{}", d.log_text()),
        };
        assert_eq!(removed(&report, &root), ["7102".to_owned()].into_iter().collect());
        let (reason, detail) = kept(&report, &root, "7101").expect("7101 reported");
        assert_eq!(reason, "owned_by_live_pod");
        assert!(detail.contains("appeared during the sweep"), "{detail}");
        assert!(root.join("7101/data/base/1/16384").exists());
        let (listing, per_id) = instance_lists(&api.requests());
        assert!(listing.iter().all(|r| r.at < created_at), "the pod came after the listing");
        assert!(per_id.iter().any(|r| one_id(r) == "7101"));
        let _ = d.terminate();
    });
}

/// The listing failing (500, 403, a dropped connection) deletes nothing by
/// rule 1 and the report says why; rules 2 and 3 still run. Once the API
/// server answers again, the folder goes: it was removable all along.
#[test]
fn a_failed_listing_disables_rule_1_and_says_why() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        db_pod(&api, "7202");
        let staging = Staging::new("fails");
        // 7201: podless and old, with nothing rules 2 or 3 would touch.
        write_file(&staging.dir.join("root/7201/data/base/1/16384"), 10, b"data");
        fs::create_dir_all(staging.dir.join("root/7202")).expect("mkdir");
        let aged = staging.seal();
        let root = aged.path().join("root");
        let mut d = start(&api, &root, aged.path());

        for (name, fault, says) in [
            ("500", Fault::internal_error(), "500"),
            ("403", Fault::status(403), "403"),
            ("dropped", Fault::drop_connection(), ""),
        ] {
            // Fresh rule 2 and 3 targets in the live folder each round.
            write_file(&root.join("7202/log/postgresql-old.log"), 10, b"old");
            write_file(&root.join("7202/rm_data_20200101000000/f"), 10, b"x");
            set_age(&root.join("7202/rm_data_20200101000000"), 10);
            api.clear_faults();
            api.inject(fault.param("labelSelector", LABEL));
            let before = Instant::now();
            let report = sweep(&mut d);
            let want: BTreeSet<String> =
                ["7202/log/postgresql-old.log", "7202/rm_data_20200101000000"].map(String::from).into_iter().collect();
            assert_eq!(removed(&report, &root), want, "{name}: rules 2 and 3 still run");
            assert!(root.join("7201/data/base/1/16384").exists(), "{name}");
            let (reason, detail) = kept(&report, &root, "7201").expect("7201 reported");
            assert_eq!(reason, "ownership_unknown", "{name}");
            let errors = report["errors"].to_string();
            assert!(errors.contains("rule 1 (instance folders) skipped"), "{name}: {errors}");
            assert!(errors.contains(says) && detail.contains(says), "{name}: {errors} / {detail}");
            let window: Vec<_> = api.requests().into_iter().filter(|r| r.at >= before).collect();
            let (listing, per_id) = instance_lists(&window);
            assert!(!listing.is_empty() && per_id.is_empty(), "{name}: no one-id lists without a listing");
            eprintln!("{name}: {errors}");
        }
        // The API server down altogether: the same.
        api.clear_faults();
        api.set_down(true);
        let report = sweep(&mut d);
        api.set_down(false);
        assert!(root.join("7201/data/base/1/16384").exists(), "down");
        assert_eq!(kept(&report, &root, "7201").map(|k| k.0), Some("ownership_unknown".into()), "down: {report}");
        assert!(report["errors"].to_string().contains("rule 1 (instance folders) skipped"), "down: {report}");
        // The listing answers but the fresh re-check of 7201 fails: kept.
        api.inject(Fault::internal_error().param("labelSelector", &format!("{LABEL}=7201")));
        let report = sweep(&mut d);
        assert!(root.join("7201/data/base/1/16384").exists(), "re-check failed");
        let (reason, detail) = kept(&report, &root, "7201").expect("7201 reported");
        assert_eq!(reason, "ownership_unknown");
        assert!(detail.contains("re-check before removal") && detail.contains("500"), "{detail}");
        // Answering again: the folder goes, it was removable all along.
        api.clear_faults();
        let report = sweep(&mut d);
        assert!(removed(&report, &root).contains("7201"), "{report}");
        assert!(!root.join("7201").exists());
        let _ = d.terminate();
    });
}

/// More pods than one page (500): the listing follows the `continue`
/// tokens, so an id on the last page keeps its folder from the listing
/// itself (not only from the re-check), and orphans still go.
#[test]
fn the_listing_follows_every_page() {
    const PODS: usize = 1_234;
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        for i in 0..PODS {
            db_pod(&api, &(10_000 + i).to_string());
        }
        // Pods without the label are not listed at all.
        api.put(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-b", "containers": [{"name": "web", "image": "nginx"}]}}));
        let staging = Staging::new("pages");
        // Live, on the first, second and last page (pods sort by name).
        let live = ["10000", "10600", "11233"];
        for id in live.iter().chain(&["9001", "9002"]) {
            staging.old_instance(id, 10);
        }
        let aged = staging.seal();
        let root = aged.path().join("root");
        let mut d = start(&api, &root, aged.path());

        let before = Instant::now();
        let report = sweep(&mut d);
        assert_eq!(removed(&report, &root), ["9001", "9002"].map(String::from).into_iter().collect());
        for id in live {
            let (reason, detail) = kept(&report, &root, id).expect("reported");
            assert_eq!(reason, "owned_by_live_pod", "{id}");
            assert!(!detail.contains("appeared"), "{id} was in the listing: {detail}");
            assert!(root.join(format!("{id}/data/base/1/16384")).exists(), "{id}");
        }
        let window: Vec<_> = api.requests().into_iter().filter(|r| r.at >= before).collect();
        let (listing, per_id) = instance_lists(&window);
        assert_eq!(listing.len(), PODS.div_ceil(500), "one request per page: {listing:?}");
        assert!(listing.iter().all(|r| r.status == 200), "{listing:?}");
        assert!(listing[0].param("continue").is_none());
        for r in &listing[1..] {
            assert!(r.param("continue").is_some_and(|c| !c.is_empty()), "{r:?}");
            assert_eq!(r.param("resourceVersion"), None, "the token carries the version: {r:?}");
            assert_eq!(r.param("limit").as_deref(), Some("500"));
        }
        let asked: BTreeSet<_> = per_id.iter().map(one_id).collect();
        assert_eq!(asked, ["9001", "9002"].map(String::from).into_iter().collect());
        eprintln!("{PODS} pods listed in {} pages", listing.len());
        let _ = d.terminate();
    });
}

/// Odd trees: whatever cannot be judged is kept, with a reason; symlinks are
/// never followed (a loop does not hang the sweep, a target outside is never
/// touched); an entry of the wrong kind is left alone.
#[test]
fn odd_trees_are_kept_with_reasons_and_symlinks_never_followed() {
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        db_pod(&api, "7407");
        let staging = Staging::new("odd");
        let st = |rel: &str| staging.dir.join(rel);
        write_file(&st("outside/victim/postgresql-v.log"), 30, b"victim");
        // Top level: a symlink loop, a dangling symlink, a symlink to a
        // folder outside, and a regular file, all named like instances.
        symlink("7401", st("root/7401")).expect("symlink");
        symlink("/nonexistent/7402", st("root/7402")).expect("symlink");
        symlink("../outside/victim", st("root/7403")).expect("symlink");
        write_file(&st("root/7404"), 30, b"not a folder");
        // Unreadable: a whole folder, and a directory deep in one.
        staging.old_instance("7405", 10);
        staging.old_instance("7406", 10);
        write_file(&st("root/7406/data/base/secret/f"), 10, b"x");
        // Live, with entries of the wrong kind for rules 2 and 3: a file
        // named rm_data_*, a directory named postgresql*.log.
        write_file(&st("root/7407/rm_data_20200101000000"), 30, b"a file");
        write_file(&st("root/7407/log/postgresql-dir.log/inner"), 30, b"x");
        set_age(&st("root/7407/log/postgresql-dir.log"), 30);
        // Podless and old, holding symlink loops and dangling links and a
        // link out: removable (links are unlinked, never followed).
        staging.old_instance("7408", 10);
        symlink("self", st("root/7408/data/self")).expect("symlink");
        symlink("b", st("root/7408/data/a")).expect("symlink");
        symlink("a", st("root/7408/data/b")).expect("symlink");
        symlink("/nonexistent", st("root/7408/data/dangling")).expect("symlink");
        symlink("../../../outside/victim", st("root/7408/data/escape")).expect("symlink");
        symlink("..", st("root/7408/data/up")).expect("symlink");
        for l in ["self", "a", "b", "dangling", "escape", "up"] {
            set_link_age(&st(&format!("root/7408/data/{l}")), 10);
        }
        let aged = staging.seal();
        let root = aged.path().join("root");
        // Made unreadable on the sealed copy (a chmod is a status change, so
        // the ctimes of these two are today's; the daemon must fail on the
        // listing before it ever judges an age: checked below by the reason).
        fs::set_permissions(root.join("7405"), fs::Permissions::from_mode(0o000)).expect("chmod");
        fs::set_permissions(root.join("7406/data/base/secret"), fs::Permissions::from_mode(0o000)).expect("chmod");
        let outside_before = fs::read(aged.path().join("outside/victim/postgresql-v.log")).expect("victim");

        // Without DAC_OVERRIDE and DAC_READ_SEARCH (as a node whose log root
        // is mounted with root squashing, or a deployment that lost them),
        // mode 000 is unreadable even to root.
        let mut setpriv = Command::new("setpriv");
        setpriv.args(["--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-all", "--"]);
        let mut d = start_with(&api, &root, aged.path(), Some(setpriv));
        let report = sweep(&mut d);
        eprintln!("kept: {}", report["kept"]);

        assert_eq!(removed(&report, &root), ["7408".to_owned()].into_iter().collect(), "{report}");
        for (id, reason) in [("7401", "symlink"), ("7402", "symlink"), ("7403", "symlink"), ("7404", "not_a_directory")]
        {
            assert_eq!(kept(&report, &root, id).map(|k| k.0), Some(reason.into()), "{id}: {report}");
            assert!(root.join(id).symlink_metadata().is_ok(), "{id} still there");
        }
        let (reason, detail) = kept(&report, &root, "7405").expect("7405 reported");
        assert_eq!(reason, "unreadable");
        assert!(["Permission denied", "EACCES", "os error 13"].iter().any(|e| detail.contains(e)), "{detail}");
        let (reason, detail) = kept(&report, &root, "7406").expect("7406 reported");
        assert_eq!(reason, "unreadable");
        assert!(detail.contains("secret"), "names what it could not read: {detail}");
        let errors = report["errors"].to_string();
        assert!(errors.contains("7405") && errors.contains("7406"), "{errors}");
        // The live folder's wrong-kind entries stay.
        assert!(root.join("7407/rm_data_20200101000000").is_file());
        assert!(root.join("7407/log/postgresql-dir.log/inner").is_file());
        // Nothing outside was followed into.
        assert_eq!(fs::read(aged.path().join("outside/victim/postgresql-v.log")).expect("victim"), outside_before);
        assert!(root.join("7405").exists() && root.join("7406/data/base/secret").exists());
        fs::set_permissions(root.join("7405"), fs::Permissions::from_mode(0o755)).expect("chmod");
        fs::set_permissions(root.join("7406/data/base/secret"), fs::Permissions::from_mode(0o755)).expect("chmod");
        let _ = d.terminate();
    });
}

/// Sets a symlink's own mtime (not its target's).
fn set_link_age(p: &Path, age_days: u64) {
    use std::os::unix::ffi::OsStrExt as _;
    let secs = SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970").as_secs() - age_days * DAY;
    let t = libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: 0 };
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: a valid C string and two timespecs, as utimensat(2) takes.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(rc, 0, "utimensat {}: {}", p.display(), std::io::Error::last_os_error());
}

/// SIGTERM while a sweep removes a 200,000-file `rm_data_*` folder (rule 3):
/// the daemon exits with status 0 within about a second, and the tree is
/// partly removed and consistent: every entry left is whole, and a later
/// sweep finishes it.
#[test]
fn sigterm_during_a_large_sweep_exits_promptly_and_leaves_a_consistent_tree() {
    const DIRS: usize = 200;
    const FILES: usize = 1000;
    const BODY: &[u8] = b"0123456789abcdef";
    in_new_netns(|| {
        let api = FakeApi::start();
        seed(&api, NODE, &[("r", "20000-20010")]);
        db_pod(&api, "8001");
        let base = std::env::temp_dir().join(format!("polarstack-sweeps-sigterm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let root = base.join("root");
        let rm = root.join("8001/rm_data_20200101000000");
        let built = Instant::now();
        thread::scope(|s| {
            for t in 0..4 {
                let rm = &rm;
                s.spawn(move || {
                    for d in (t..DIRS).step_by(4) {
                        let dir = rm.join(format!("d{d:03}"));
                        fs::create_dir_all(&dir).expect("mkdir");
                        for f in 0..FILES {
                            fs::write(dir.join(format!("{f:04}")), BODY).expect("write");
                        }
                    }
                });
            }
        });
        set_age(&rm, 10);
        eprintln!("built {} files in {:?}", DIRS * FILES, built.elapsed());
        let mut d = start(&api, &root, &base);

        let left = || fs::read_dir(&rm).map(|e| e.count()).unwrap_or(0);
        let sent = thread::scope(|s| {
            let sweeping = s.spawn(|| d.post_as("/api/v2/logs/sweep?dry_run=false", Some(TOKEN)));
            assert!(wait_for(Duration::from_secs(60), || left() <= DIRS - 5), "the removal never started");
            let pid = d.pid().expect("running") as i32;
            let t = Instant::now();
            // SAFETY: signalling our own child process by pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            // The request ends with the process (or answers first).
            let _ = sweeping.join();
            t
        });
        let (status, took) = wait_exit(&mut d, sent);
        eprintln!("SIGTERM to exit: {took:?}, {} of {DIRS} directories left", left());
        assert!(status.success(), "exit status {status}\n{}", d.log_text());
        assert!(took < Duration::from_secs(1), "took {took:?}\n{}", d.log_text());
        let log = d.log_text();
        assert!(log.contains("removal stopped by shutdown"), "the log says so:\n{log}");

        // Consistent: every entry left is whole (no file half-written, no
        // directory unreadable), and some but not all of it went.
        let mut files = 0;
        for e in fs::read_dir(&rm).expect("rm_data is still a directory") {
            for f in fs::read_dir(e.expect("entry").path()).expect("a whole directory") {
                let f = f.expect("entry").path();
                assert_eq!(fs::read(&f).expect("a whole file"), BODY);
                files += 1;
            }
        }
        assert!(files > 0 && files < DIRS * FILES, "{files} files left");
        eprintln!("{files} of {} files left", DIRS * FILES);

        // Its own mtime is now the interruption's, so rule 3 waits N days
        // again; aged by hand, the next sweep finishes it.
        let mut d = start(&api, &root, &base);
        let report = sweep(&mut d);
        assert_eq!(kept(&report, &root, "8001/rm_data_20200101000000").map(|k| k.0), Some("too_recent".into()));
        set_age(&rm, 10);
        let report = sweep(&mut d);
        assert!(removed(&report, &root).contains("8001/rm_data_20200101000000"), "{report}");
        assert!(!rm.exists());
        eprintln!("the rest ({files} files) swept in {} s", report["duration_seconds"]);
        let _ = d.terminate();
        let _ = fs::remove_dir_all(&base);
    });
}

/// Waits for the daemon to exit after a signal sent at `sent`.
fn wait_exit(d: &mut Daemon, sent: Instant) -> (std::process::ExitStatus, Duration) {
    loop {
        if let Some(st) = d.try_wait() {
            return (st, sent.elapsed());
        }
        assert!(sent.elapsed() < Duration::from_secs(30), "the daemon ignored SIGTERM");
        thread::sleep(Duration::from_millis(5));
    }
}
