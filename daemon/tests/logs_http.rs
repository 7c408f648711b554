//! The log-sweep HTTP routes, driven in-process.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failure is the test failing")]

// Wrapped in `mod logs` so `cargo test ... logs` selects these tests.
mod logs {
    use std::collections::BTreeSet;
    use std::fs;
    use std::path::Path;
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{header, Method, Request, StatusCode};
    use polarstack_daemon::http::access::Access;
    use polarstack_daemon::http::logs::{routes, HttpSweepPolicy};
    use polarstack_daemon::logs::{LiveFuture, LiveInstances, LogSweepArgs, SweepHandle};
    use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};
    use tower::ServiceExt;

    struct NoPods;
    impl LiveInstances for NoPods {
        fn live_ins_ids(&self) -> LiveFuture<'_, BTreeSet<String>> {
            Box::pin(async { Ok(BTreeSet::new()) })
        }
        fn is_live<'a>(&'a self, _: &'a str) -> LiveFuture<'a, bool> {
            Box::pin(async { Ok(false) })
        }
    }

    struct Fixture {
        tmp: tempfile::TempDir,
        handle: SweepHandle,
    }

    fn old_file(p: &Path) {
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, b"x").expect("write");
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("epoch").as_secs() as i64
            - 10 * 86_400;
        let ts = Timespec { tv_sec: secs, tv_nsec: 0 };
        let times = Timestamps { last_access: ts, last_modification: ts };
        rustix::fs::utimensat(CWD, p, &times, AtFlags::empty()).expect("utimensat");
    }

    fn fixture(global_dry_run: bool) -> Fixture {
        let tmp = tempfile::Builder::new().prefix("polarstack-logs-http-").tempdir_in("/tmp").expect("tempdir");
        old_file(&tmp.path().join("root/42/log/postgresql.log"));
        fs::write(tmp.path().join("token"), "s3cret\n").expect("token");
        let args = LogSweepArgs {
            dbcluster_log_dir: tmp.path().join("root"),
            log_sweep_dry_run: global_dry_run,
            ..LogSweepArgs::default()
        };
        let handle = SweepHandle::new(args, Arc::new(NoPods)).expect("args");
        Fixture { tmp, handle }
    }

    impl Fixture {
        fn policy(&self, enabled: bool) -> HttpSweepPolicy {
            HttpSweepPolicy { allow_real_sweeps: enabled }
        }
        fn access(&self) -> Access {
            Access::new(Some(self.tmp.path().join("token")), None)
        }
        /// Whether the one thing a real sweep removes here is still there:
        /// the folder's overdue `postgresql*.log` (rule 2; the folder itself
        /// was written just now, so rule 1 keeps it).
        fn folder_exists(&self) -> bool {
            self.tmp.path().join("root/42/log/postgresql.log").exists()
        }
    }

    async fn call(
        f: &Fixture,
        policy: HttpSweepPolicy,
        method: Method,
        uri: &str,
        token: Option<&str>,
    ) -> (StatusCode, serde_json::Value) {
        call_with(f, policy, f.access(), method, uri, token).await
    }

    async fn call_with(
        f: &Fixture,
        policy: HttpSweepPolicy,
        access: Access,
        method: Method,
        uri: &str,
        token: Option<&str>,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let resp = routes(f.handle.clone(), policy, access)
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.expect("body");
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    #[tokio::test]
    async fn last_sweep_is_404_before_the_first() {
        let f = fixture(false);
        let (s, j) = call(&f, f.policy(false), Method::GET, "/api/v2/logs/last-sweep", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(j["error"].is_string());
    }

    #[tokio::test]
    async fn dry_runs_need_a_token_and_delete_nothing() {
        let f = fixture(false);
        for uri in ["/api/v2/logs/sweep?dry_run=true", "/api/v2/logs/sweep"] {
            // A dry run walks the whole tree: not for anyone on the node.
            let last = |f: &Fixture| f.handle.last_report().map(|r| r.started_unix);
            let before = last(&f);
            let (s, j) = call(&f, f.policy(false), Method::POST, uri, None).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri}: {j}");
            let (s, _) = call(&f, f.policy(false), Method::POST, uri, Some("guess")).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri}");
            let (s, _) = call(&f, f.policy(false), Method::POST, uri, Some("")).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{uri}: an empty token is no token");
            assert_eq!(last(&f), before, "{uri}: refused calls run no sweep");
            let (s, j) = call(&f, f.policy(false), Method::POST, uri, Some("s3cret")).await;
            assert_eq!(s, StatusCode::OK, "{uri}: {j}");
            assert_eq!(j["dry_run"], true);
            assert_eq!(j["removed"].as_array().expect("removed").len(), 1);
        }
        assert!(f.folder_exists());
        let (s, j) = call(&f, f.policy(false), Method::GET, "/api/v2/logs/last-sweep", None).await;
        assert_eq!(s, StatusCode::OK, "reading the last report is open");
        assert_eq!(j["dry_run"], true);
    }

    #[tokio::test]
    async fn real_sweeps_need_the_flag_and_the_token() {
        let f = fixture(false);
        let uri = "/api/v2/logs/sweep?dry_run=false";
        let cases: [(bool, Option<&str>, StatusCode); 5] = [
            (false, Some("s3cret"), StatusCode::FORBIDDEN),
            (true, None, StatusCode::UNAUTHORIZED),
            (true, Some(""), StatusCode::UNAUTHORIZED),
            (true, Some("wrong"), StatusCode::UNAUTHORIZED),
            (true, Some("s3cret-and-more"), StatusCode::UNAUTHORIZED),
        ];
        for (enabled, token, want) in cases {
            let (s, j) = call(&f, f.policy(enabled), Method::POST, uri, token).await;
            assert_eq!(s, want, "{enabled} {token:?}: {j}");
            assert!(j["error"].is_string());
            assert!(f.folder_exists(), "refused requests delete nothing");
        }
        let (s, j) = call(&f, f.policy(true), Method::POST, uri, Some("s3cret")).await;
        assert_eq!(s, StatusCode::OK, "{j}");
        assert_eq!(j["dry_run"], false);
        assert!(!f.folder_exists());
    }

    #[tokio::test]
    async fn unreadable_token_file_refuses() {
        let f = fixture(false);
        let access = Access::new(Some(f.tmp.path().join("missing")), None);
        let uri = "/api/v2/logs/sweep?dry_run=false";
        let (s, _) = call_with(&f, f.policy(true), access, Method::POST, uri, Some("x")).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(f.folder_exists());
    }

    #[tokio::test]
    async fn bad_queries_are_400_and_change_nothing() {
        let f = fixture(false);
        for q in [
            "dry_run=no",
            "dry_run=",
            "dry_run",
            "dry_run=false&dry_run=false",
            "dry_run=true&x=1",
            "dry_run=%00",
            "dry_run=FALSE",
            "%ff%fe=1",
        ] {
            let uri = format!("/api/v2/logs/sweep?{q}");
            let (s, j) = call(&f, f.policy(true), Method::POST, &uri, Some("s3cret")).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {j}");
            assert!(j["error"].is_string(), "{q}");
        }
        assert!(f.folder_exists());
        assert!(f.handle.last_report().is_none(), "no sweep ran");
    }

    #[tokio::test]
    async fn global_dry_run_wins_over_http() {
        let f = fixture(true);
        let uri = "/api/v2/logs/sweep?dry_run=false";
        let (s, j) = call(&f, f.policy(true), Method::POST, uri, Some("s3cret")).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(j["dry_run"], true);
        assert_eq!(j["forced_dry_run"], true);
        assert!(f.folder_exists());
    }

    #[tokio::test]
    async fn wrong_method_is_a_json_405() {
        let f = fixture(false);
        let (s, j) = call(&f, f.policy(true), Method::GET, "/api/v2/logs/sweep?dry_run=false", Some("s3cret")).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        assert!(j["error"].is_string());
        assert!(f.folder_exists());
    }

    #[tokio::test]
    async fn missing_root_is_a_json_error() {
        let f = fixture(false);
        fs::remove_dir_all(f.tmp.path().join("root")).expect("rm");
        let (s, j) = call(&f, f.policy(false), Method::POST, "/api/v2/logs/sweep?dry_run=true", Some("s3cret")).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(j["error"].as_str().expect("error").contains("unavailable"));
    }
}
