//! Command-line flags. The original daemon's flags keep their names and
//! defaults (docs/compat.md), so the existing DaemonSet works unchanged; the
//! flags it had that did nothing are accepted and reported once.
use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::Parser;

use crate::{
    engines::{
        runtime::{DockerEndpoint, DockerHostError},
        EnginesConfig,
    },
    kube::{Access, ClusterConfig},
    logs::LogSweepArgs,
    network::NicConfig,
    ports::PortsConfig,
    telemetry::LogFormat,
};

#[derive(Parser, Debug, Clone)]
#[command(name = "polarstack-daemon", version, about = "eBPF-assisted host observer for PolarDB Stack nodes")]
pub struct Flags {
    /// HTTP port (compat: also the port peers used).
    #[arg(long, default_value_t = 8900)]
    pub port: u16,

    /// Address the HTTP server listens on.
    #[arg(long, default_value = "0.0.0.0")]
    pub listen_address: IpAddr,

    /// This node's name (Kubernetes spec.nodeName); required in cluster mode.
    #[arg(long, env = "CURRENT_NODE_NAME")]
    pub current_node_name: Option<String>,

    /// Label selector of the engine-version ConfigMaps.
    #[arg(long, default_value = "configtype=minor_version_info,dbClusterMode=WriteReadMore")]
    pub core_version_cm_labels: String,

    /// ConfigMap whose annotations hold the watched port ranges.
    #[arg(long, default_value = "polardb4mpd-controller")]
    pub mpd_controller_cm_name: String,

    /// Label selector of the daemon's own pods (default app=polarstack-daemon).
    /// Accepted for the original's DaemonSet; it has no effect here: a
    /// cluster-wide rescan reaches every node through the API server, not by
    /// calling peer pods.
    #[arg(long)]
    pub polarstack_daemon_pod_labels: Option<String>,

    /// Path to a kubeconfig; without it and outside a pod the daemon runs standalone.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes API server address (overrides the kubeconfig's).
    #[arg(long)]
    pub master: Option<String>,

    /// The client-network NIC; `NET_CARD_NAME` of `ccm-config` overrides it
    /// in cluster mode.
    #[arg(long, env = "NET_CARD_NAME", default_value = "bond1")]
    pub net_card_name: String,

    /// The client subnet (`192.0.2.0/24`) or mask (`255.255.255.0`) that
    /// picks the client IP when the NIC has several; `ccm-config` overrides it.
    #[arg(long, env = "NET_MASK")]
    pub net_mask: Option<String>,

    /// Docker Engine API socket (used when present). Without the flag,
    /// DOCKER_HOST is honoured as the original's Docker client did
    /// (unix:///path or tcp://host:port), else /var/run/docker.sock.
    #[arg(long)]
    pub docker_socket: Option<PathBuf>,

    /// CRI sockets (containerd, CRI-O); each one present is used. Repeat the
    /// flag to give several.
    #[arg(long = "cri-socket", default_values = ["/run/containerd/containerd.sock", "/run/crio/crio.sock"])]
    pub cri_sockets: Vec<PathBuf>,

    /// How often CRI runtimes are listed (CRI has no image events; Docker's
    /// events trigger rescans at once).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub cri_poll_interval: Duration,

    /// Period of the Node-condition heartbeat (`NodeRefreshFlag`'s
    /// lastHeartbeatTime). Conditions that change are written at once.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub node_heartbeat_interval: Duration,

    /// How long port changes are coalesced before the port-usage ConfigMap
    /// is written.
    #[arg(long, default_value = "200ms", value_parser = parse_duration)]
    pub publish_debounce: Duration,

    /// Least time between two writes of the port-usage ConfigMap (ephemeral
    /// ports inside the watched ranges change often on a busy node).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub publish_min_interval: Duration,

    /// The log sweeps' flags (`--dbcluster-log-dir`, `--ins-folder-overdue-days`, ...).
    #[command(flatten)]
    pub logs: LogSweepArgs,

    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, default_value = "info")]
    pub log_level: String,

    /// Resync period of the listener and UDP tables while eBPF events flow
    /// (well under a millisecond on any host).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// Resync period of every table while eBPF events flow: TCP's bind and
    /// established hashes cost about 1 us per connection (catches TIME_WAIT expiry).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub connected_resync_interval: Duration,

    /// Full resync period when eBPF is unavailable (snapshot-only mode).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub degraded_resync_interval: Duration,

    /// Delay before a targeted dump confirms a possibly freed port.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub verify_delay: Duration,

    /// eBPF ring buffer size in bytes: a power of two, at least 4096.
    #[arg(long, default_value_t = polarstack_ebpf_common::DEFAULT_RING_BYTES, value_parser = parse_ring_bytes)]
    pub ring_buffer_bytes: u32,

    /// Capacity of the kernel's table of bound, listening and UDP sockets
    /// (whose close it reports). A full table is counted and reported.
    #[arg(long, default_value_t = polarstack_ebpf_common::TRACKED_MAX_ENTRIES, value_parser = clap::value_parser!(u32).range(1024..=16_777_216))]
    pub tracked_sockets_max: u32,

    /// Run on sock_diag snapshots alone, without loading eBPF.
    #[arg(long)]
    pub disable_ebpf: bool,

    /// List bound TCP sockets with the eBPF socket iterator even where
    /// sock_diag can (Linux 6.5+); for testing the path older kernels take.
    #[arg(long, hide = true)]
    pub force_bound_iter: bool,

    /// cgroup v2 mount to attach the eBPF programs to (default: found at run time).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,

    /// File holding the bearer token that authorizes the endpoints that
    /// change state (sweeps, rescans) besides Kubernetes RBAC (a mounted
    /// Secret; re-read per check). `--log-sweep-token-file` is the same.
    #[arg(long)]
    pub api_token_file: Option<PathBuf>,

    /// The original's POSTs (RequestCheckCoreVersion, InnerCheckCoreVersion)
    /// need an authorized caller too; by default they stay open for existing
    /// callers, coalesced and rate limited.
    #[arg(long)]
    pub v1_require_auth: bool,

    /// Test hook: makes the named supervised task panic once, a second after
    /// it starts, to exercise the supervision (docs/operations.md).
    #[arg(long, hide = true, value_name = "TASK")]
    pub fail_task: Option<String>,

    // Flags of the original that did nothing. Accepted so an unchanged
    // DaemonSet starts; each one given is logged once at start-up.
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub node_status_update_frequency: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub develop_mode: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub events_enable_upload: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub events_upload_url: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub events_upload_timeout: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub job_enable_del_fip: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub job_enable_add_fip: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub service_owner_db_cluster: Option<String>,
    /// klog verbosity; mapped to a log level (0-1 info, 2-3 debug, 4+ trace).
    #[arg(long = "v", hide = true)]
    pub klog_v: Option<u8>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub logtostderr: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub log_dir: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub log_file: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub log_flush_frequency: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub stderrthreshold: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "true")]
    pub alsologtostderr: Option<String>,
}

impl Flags {
    /// Parses the process arguments, accepting Go's single-dash long flags
    /// (`-port=8900`) as the original's DaemonSet may use them.
    pub fn from_env() -> Self {
        Self::parse_from(normalize_go_flags(std::env::args_os()))
    }

    pub fn try_from_args<I: IntoIterator<Item = String>>(args: I) -> Result<Self, clap::Error> {
        Self::try_parse_from(normalize_go_flags(args.into_iter().map(Into::into)))
    }

    /// The legacy no-op flags that were given, for one warning each.
    pub fn ignored_legacy_flags(&self) -> Vec<&'static str> {
        let given = [
            ("--node-status-update-frequency", self.node_status_update_frequency.is_some()),
            ("--develop-mode", self.develop_mode.is_some()),
            ("--events-enable-upload", self.events_enable_upload.is_some()),
            ("--events-upload-url", self.events_upload_url.is_some()),
            ("--events-upload-timeout", self.events_upload_timeout.is_some()),
            ("--job-enable-del-fip", self.job_enable_del_fip.is_some()),
            ("--job-enable-add-fip", self.job_enable_add_fip.is_some()),
            ("--service-owner-db-cluster", self.service_owner_db_cluster.is_some()),
            ("--polarstack-daemon-pod-labels", self.polarstack_daemon_pod_labels.is_some()),
            ("--logtostderr", self.logtostderr.is_some()),
            ("--log-dir", self.log_dir.is_some()),
            ("--log-file", self.log_file.is_some()),
            ("--log-flush-frequency", self.log_flush_frequency.is_some()),
            ("--stderrthreshold", self.stderrthreshold.is_some()),
            ("--alsologtostderr", self.alsologtostderr.is_some()),
        ];
        given.into_iter().filter(|(_, g)| *g).map(|(n, _)| n).collect()
    }

    /// The effective log level: klog's `--v` when given, else `--log-level`.
    pub fn log_level(&self) -> String {
        match self.klog_v {
            Some(0 | 1) => "info".into(),
            Some(2 | 3) => "debug".into(),
            Some(_) => "trace".into(),
            None => self.log_level.clone(),
        }
    }

    pub fn cluster_config(&self) -> ClusterConfig {
        ClusterConfig {
            access: Access::detect(self.kubeconfig.clone(), self.master.clone()),
            node: self.current_node_name.clone(),
            mpd_controller_cm_name: self.mpd_controller_cm_name.clone(),
            core_version_cm_labels: self.core_version_cm_labels.clone(),
            heartbeat: self.node_heartbeat_interval,
            publish_debounce: self.publish_debounce,
            publish_min_interval: self.publish_min_interval,
        }
    }

    pub fn engines_config(&self) -> Result<EnginesConfig, DockerHostError> {
        let docker = match (&self.docker_socket, std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty())) {
            (Some(path), _) => DockerEndpoint::Unix(path.clone()),
            (None, Some(host)) => DockerEndpoint::from_docker_host(&host)?,
            (None, None) => DockerEndpoint::Unix(PathBuf::from("/var/run/docker.sock")),
        };
        Ok(EnginesConfig { docker, cri_sockets: self.cri_sockets.clone(), cri_poll: self.cri_poll_interval })
    }

    pub fn nic_config(&self) -> NicConfig {
        NicConfig { name: self.net_card_name.clone(), net_mask: self.net_mask.clone().filter(|m| !m.trim().is_empty()) }
    }

    /// The sweeper's settings, with `--api-token-file` standing for the
    /// older `--log-sweep-token-file` it folds in.
    pub fn log_sweep_args(&self) -> LogSweepArgs {
        let mut args = self.logs.clone();
        args.log_sweep_token_file = self.api_token_file();
        args
    }

    /// `--api-token-file`, or the older `--log-sweep-token-file` it folds in.
    pub fn api_token_file(&self) -> Option<PathBuf> {
        self.api_token_file.clone().or_else(|| self.logs.log_sweep_token_file.clone())
    }

    pub fn ports_config(&self) -> PortsConfig {
        PortsConfig {
            resync_interval: self.resync_interval,
            connected_resync_interval: self.connected_resync_interval,
            degraded_resync_interval: self.degraded_resync_interval,
            verify_delay: self.verify_delay,
            loss_check_interval: Duration::from_millis(100),
            ring_bytes: self.ring_buffer_bytes,
            tracked_max: self.tracked_sockets_max,
            disable_ebpf: self.disable_ebpf,
            force_bound_iter: self.force_bound_iter,
            cgroup_root: self.cgroup_root.clone(),
        }
    }
}

fn normalize_go_flags(args: impl IntoIterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.into_iter()
        .enumerate()
        .map(|(i, a)| match a.to_str() {
            Some(s) if i > 0 && s.len() > 2 && s.starts_with('-') && !s.starts_with("--") => format!("-{s}").into(),
            _ => a,
        })
        .collect()
}

/// A duration flag that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad duration {input:?}: {why} (examples: 500ms, 5s, 30m, 6h, 1h30m, 1d)")]
pub struct DurationError {
    input: String,
    why: &'static str,
}

/// Durations as people write them: one or more `<number><unit>` parts with
/// units ms, s, m, h, d (`500ms`, `90s`, `1h30m`). A bare number is refused:
/// the original daemon's flags meant seconds in some places and days in
/// others, so a unit is always required. Periods must be positive.
/// The longest duration a flag takes.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let bad = |why| DurationError { input: input.to_owned(), why };
    let mut rest = input.trim();
    if rest.is_empty() {
        return Err(bad("empty"));
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad("expected a number"));
        }
        let value: u64 = rest[..digits].parse().map_err(|_| bad("number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = rest[..unit_len].trim();
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Some(Duration::from_millis(value)),
            "s" => Some(Duration::from_secs(value)),
            "m" => value.checked_mul(60).map(Duration::from_secs),
            "h" => value.checked_mul(3600).map(Duration::from_secs),
            "d" => value.checked_mul(86_400).map(Duration::from_secs),
            "" => return Err(bad("missing unit")),
            _ => return Err(bad("unknown unit (use ms, s, m, h or d)")),
        };
        total = part.and_then(|p| total.checked_add(p)).ok_or_else(|| bad("too large"))?;
    }
    if total.is_zero() {
        return Err(bad("a duration must be positive"));
    }
    // Timers add durations to the clock: an absurd one would overflow there,
    // inside a task, long after start. No setting of this daemon needs more.
    if total > MAX_DURATION {
        return Err(bad("too large (at most 365d)"));
    }
    Ok(total)
}

fn parse_ring_bytes(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|_| format!("`{s}` is not a number of bytes"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n}: the ring buffer must be a power of two of at least 4096 bytes"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Flags, clap::Error> {
        Flags::try_from_args(std::iter::once("polarstack-daemon").chain(args.iter().copied()).map(String::from))
    }

    #[test]
    fn defaults_match_the_original() {
        let f = parse(&[]).expect("defaults parse");
        assert_eq!(f.port, 8900);
        assert_eq!(f.logs.dbcluster_log_dir, PathBuf::from("/flash/polardb_dbcluster/"));
        assert_eq!(f.logs.ins_folder_overdue_days, 3);
        assert_eq!(f.core_version_cm_labels, "configtype=minor_version_info,dbClusterMode=WriteReadMore");
        assert_eq!(f.mpd_controller_cm_name, "polardb4mpd-controller");
        assert_eq!(f.polarstack_daemon_pod_labels, None, "accepted, not used: no default to keep");
    }

    #[test]
    fn the_original_daemonsets_flags_are_accepted() {
        let f = parse(&[
            "-port=8901",
            "--develop-mode",
            "--events-enable-upload=false",
            "--logtostderr",
            "--v=4",
            "--log-dir",
            "/var/log",
            "--ins-folder-overdue-days=7",
            "--dbcluster-log-dir=/disk1/polardb/",
        ])
        .expect("legacy flags parse");
        assert_eq!(f.port, 8901);
        assert_eq!(f.log_level(), "trace");
        assert_eq!(f.logs.ins_folder_overdue_days, 7);
        assert_eq!(f.logs.dbcluster_log_dir, PathBuf::from("/disk1/polardb/"));
        assert_eq!(
            f.ignored_legacy_flags(),
            vec!["--develop-mode", "--events-enable-upload", "--logtostderr", "--log-dir"]
        );
    }

    #[test]
    fn bad_values_are_clear_errors() {
        for (args, needle) in [
            (&["--port=70000"][..], "70000"),
            (&["--resync-interval=5 parsecs"][..], "unknown unit"),
            (&["--resync-interval=0s"][..], "positive"),
            (&["--ring-buffer-bytes=5000"][..], "power of two"),
            (&["--no-such-flag"][..], "no-such-flag"),
        ] {
            let err = parse(args).expect_err("must fail").to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("6h"), Ok(Duration::from_secs(21600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("365d"), Ok(Duration::from_secs(365 * 86400)));
        for bad in [
            "7",
            "h",
            "",
            "0s",
            "5 parsecs",
            "1x",
            "-1s",
            "99999999999999999999s",
            "99999999999999999d",
            "366d",
            "9000000000h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
