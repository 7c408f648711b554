//! Reaching the API server: which cluster (if any), the client, retries, and
//! the metrics every API call feeds.
use std::{
    collections::BTreeMap,
    fmt,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use kube::config::{KubeConfigOptions, Kubeconfig};
use prometheus_client::encoding::DescriptorEncoder;

use crate::telemetry::{counter_by, gauge, gauge_by, sum_count};

/// How the daemon reaches Kubernetes, decided from flags and environment the
/// way the original's `clientcmd.BuildConfigFromFlags` did, minus its
/// fallback to guessing: no kubeconfig, no `--master` and not in a pod means
/// standalone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Standalone,
    Kubeconfig { path: PathBuf, master: Option<String> },
    Master(String),
    InCluster,
}

impl Access {
    pub fn detect(kubeconfig: Option<PathBuf>, master: Option<String>) -> Self {
        let master = master.filter(|m| !m.trim().is_empty());
        match (kubeconfig.filter(|p| !p.as_os_str().is_empty()), master) {
            (Some(path), master) => Access::Kubeconfig { path, master },
            (None, Some(m)) => Access::Master(m),
            (None, None) if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => Access::InCluster,
            (None, None) => Access::Standalone,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path:?}: {source}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("--master {value:?} is not a URL: {reason}")]
    Master { value: String, reason: String },
    #[error("in-cluster configuration: {0}")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("creating the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Builds the client. Nothing here talks to the API server yet, so a cluster
/// that is down at start degrades the daemon later instead of stopping it.
pub async fn client(access: &Access) -> Result<kube::Client, ClientError> {
    let parse_master = |m: &str| {
        m.parse::<http::Uri>().map_err(|e| ClientError::Master { value: m.to_owned(), reason: e.to_string() })
    };
    let config = match access {
        Access::Standalone => unreachable!("no client is built in standalone mode"),
        Access::Kubeconfig { path, master } => {
            let kc =
                Kubeconfig::read_from(path).map_err(|source| ClientError::Kubeconfig { path: path.clone(), source })?;
            let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Kubeconfig { path: path.clone(), source })?;
            if let Some(m) = master {
                config.cluster_url = parse_master(m)?;
            }
            config
        }
        Access::Master(m) => kube::Config::new(parse_master(m)?),
        Access::InCluster => kube::Config::incluster().map_err(ClientError::InCluster)?,
    };
    let mut config = config;
    // kube sets no read timeout: a watch on a connection that died without a
    // reset (an API server or load balancer failing over) would wait forever
    // and freeze every input. Longer than the watcher's 290 s server-side
    // timeout, so healthy idle watches are never cut.
    config.read_timeout = Some(READ_TIMEOUT);
    kube::Client::try_from(config).map_err(ClientError::Client)
}

/// See [`client`]: the longest an answer (or a watch event) may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(320);

/// Why a call to the API server did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no answer within {:?}", super::WRITE_TIMEOUT)]
    Timeout,
    #[error(transparent)]
    Api(#[from] kube::Error),
}

/// One API call as every sink makes it: bounded by `WRITE_TIMEOUT` (a slow
/// API server must not stall a sink), counted by verb, resource and result,
/// and its latency recorded when it succeeds.
pub async fn call<T>(
    metrics: &ApiMetrics,
    verb: &'static str,
    resource: &'static str,
    fut: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, CallError> {
    let started = std::time::Instant::now();
    match tokio::time::timeout(super::WRITE_TIMEOUT, fut).await {
        Err(_) => {
            metrics.timeout(verb, resource);
            Err(CallError::Timeout)
        }
        Ok(r) => {
            metrics.request(verb, resource, r.as_ref().map(|_| ()));
            if r.is_ok() && verb != "get" {
                metrics.write_latency(started.elapsed());
            }
            Ok(r?)
        }
    }
}

/// Short labels for an API call's result, bounded in number.
/// How long one watch asks to last: what kube-apiserver grants by default
/// (between its --min-request-timeout of 30 min and twice that), drawn anew
/// for each watcher so a fleet that starts together renews apart. kube's
/// default (290 s) would be about a hundred renewals per node per hour
/// across the daemon's watches; this is a few. Bookmarks (on by default in
/// the watcher) keep a quiet watch from hitting the client's idle timeout.
pub fn watch_config() -> kube::runtime::watcher::Config {
    const MIN_SECS: u32 = 30 * 60;
    kube::runtime::watcher::Config::default().timeout(MIN_SECS + fastrand::u32(0..MIN_SECS))
}

pub fn result_label(res: &Result<(), &kube::Error>) -> &'static str {
    match res {
        Ok(()) => "ok",
        Err(kube::Error::Api(s)) => match s.code {
            404 => "not_found",
            409 => "conflict",
            429 => "throttled",
            403 | 401 => "denied",
            400..=499 => "client_error",
            _ => "server_error",
        },
        Err(_) => "unreachable",
    }
}

/// Counters of the Kubernetes side, rendered into `/metrics`.
#[derive(Default)]
pub struct ApiMetrics {
    /// (verb, resource, result) -> count.
    requests: Mutex<BTreeMap<(&'static str, &'static str, &'static str), u64>>,
    write_seconds_sum_micros: AtomicU64,
    write_count: AtomicU64,
    /// Watch streams' errors by resource (each one retried with backoff).
    watch_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Objects that differ from what should be published, by name.
    pending: Mutex<BTreeMap<&'static str, bool>>,
    /// Taken ports the port-usage ConfigMap had no room for (1 MiB).
    port_usage_overflow: AtomicU64,
}

impl ApiMetrics {
    pub fn request(&self, verb: &'static str, resource: &'static str, res: Result<(), &kube::Error>) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((verb, resource, result_label(&res))).or_default() += 1;
    }

    pub fn timeout(&self, verb: &'static str, resource: &'static str) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((verb, resource, "timeout")).or_default() += 1;
    }

    pub fn write_latency(&self, d: Duration) {
        self.write_seconds_sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.write_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `object` (port_usage, node_status, availability) differs from
    /// what the daemon wants to publish.
    pub fn set_pending(&self, object: &'static str, pending: bool) {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(object, pending);
    }

    /// How many taken ports did not fit in the port-usage ConfigMap.
    pub fn set_port_usage_overflow(&self, ports: usize) {
        self.port_usage_overflow.store(ports as u64, Ordering::Relaxed);
    }

    pub fn watch_error(&self, resource: &'static str) {
        let mut m = self.watch_errors.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(resource).or_default() += 1;
    }

    /// Encodes the Kubernetes side's metrics, at scrape time.
    pub fn encode(&self, e: &mut DescriptorEncoder<'_>) -> fmt::Result {
        {
            let m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            let samples = m
                .iter()
                .map(|((verb, res, result), n)| ([("verb", *verb), ("resource", *res), ("result", *result)], *n));
            counter_by(
                e,
                "polarstack_kube_requests_total",
                "Kubernetes API writes and reads made by the daemon's sinks, by verb, resource and result.",
                samples,
            )?;
        }
        {
            let m = self.watch_errors.lock().unwrap_or_else(|p| p.into_inner());
            counter_by(
                e,
                "polarstack_kube_watch_errors_total",
                "Errors of the Kubernetes watches (each retried with backoff).",
                m.iter().map(|(r, n)| ([("resource", *r)], *n)),
            )?;
        }
        // `_sum` and `_count` of one family, so `rate(_sum) / rate(_count)`
        // is the mean write latency.
        sum_count(
            e,
            "polarstack_kube_write_duration_seconds",
            "Time spent in successful Kubernetes writes.",
            self.write_seconds_sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            self.write_count.load(Ordering::Relaxed),
        )?;
        gauge(
            e,
            "polarstack_kube_port_usage_overflow_ports",
            "Taken ports in the watched ranges that did not fit in the port-usage ConfigMap (1 MiB): the operator could hand them out.",
            self.port_usage_overflow.load(Ordering::Relaxed),
        )?;
        let m = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let pending = ["port_usage", "node_status", "availability"]
            .map(|o| ([("object", o)], u64::from(m.get(o).copied().unwrap_or(false))));
        gauge_by(
            e,
            "polarstack_kube_publish_pending",
            "1 while an object in Kubernetes differs from what the daemon wants to publish.",
            pending,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_without_kubeconfig_master_or_pod() {
        if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            assert_eq!(Access::detect(None, None), Access::Standalone);
            assert_eq!(Access::detect(Some(PathBuf::new()), Some(" ".into())), Access::Standalone);
        }
        assert_eq!(Access::detect(None, Some("http://a:1".into())), Access::Master("http://a:1".into()));
        assert!(matches!(Access::detect(Some("/k".into()), None), Access::Kubeconfig { .. }));
    }
}
