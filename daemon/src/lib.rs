//! polarstack-daemon: a per-node observer for Kubernetes hosts that run
//! PolarDB Stack databases on the host network.
//!
//! Layout, sources -> state -> sinks:
//! - [`ports`]: which local ports are taken. eBPF events (the programs are in
//!   `daemon-ebpf/`) and sock_diag dumps feed one owner task and its map.
//! - [`network`]: the client NIC's state and address, from rtnetlink events.
//! - [`engines`]: which engine versions have all their images here, from
//!   the Docker API and CRI.
//! - [`logs`]: safe sweeps of the instance log root (the original's three
//!   rules, fd-relative and fail-closed), on a schedule and on request.
//! - [`kube`]: cluster inputs (watched ConfigMaps and pods, which set the
//!   sources' settings) and the Kubernetes sinks (the port-usage and
//!   availability ConfigMaps, Node conditions); absent in standalone mode.
//! - [`http`]: the HTTP sink (health, readiness, metrics, the native API).
//! - [`config`]: flags, including the original daemon's; [`telemetry`]: logs
//!   and the metrics text writer; [`time`]: timestamp layouts; [`tasks`]: the
//!   supervisor every long-running task is started by; [`retry`]: backoff.
//!
//! [`run`] wires them: it starts every source, then the sinks, and stops
//! everything on SIGTERM or SIGINT.
// Public only where the binary, the benchmarks (examples/) and the
// integration tests (tests/) need to reach in; the rest is the crate's own,
// so the compiler reports what nothing uses.
pub mod config;
mod engines;
pub mod http;
mod kube;
pub mod logs;
mod network;
pub mod ports;
mod retry;
pub mod tasks;
pub mod telemetry;
mod time;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Ports(#[from] ports::StartError),
    #[error(transparent)]
    Cluster(#[from] kube::ClusterError),
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    #[error("log sweep settings: {0}")]
    Logs(#[from] logs::LogSweepConfigError),
    #[error(transparent)]
    DockerHost(#[from] engines::runtime::DockerHostError),
    #[error("serving HTTP on {addr}: {source}")]
    Http { addr: SocketAddr, source: std::io::Error },
}

/// Runs the daemon until SIGTERM/SIGINT, then stops within about a second.
///
/// The wiring reads in the order data flows: the cluster's inputs (when
/// there is a cluster), then the domains that own state, then the sinks
/// (Kubernetes, HTTP), which only read the domains' published state.
pub async fn run(flags: config::Flags) -> Result<(), RunError> {
    for flag in flags.ignored_legacy_flags() {
        tracing::warn!(flag, "accepted for compatibility with the original daemon; it has no effect");
    }
    let shutdown = CancellationToken::new();
    let tasks = tasks::Tasks::new(shutdown.clone(), flags.fail_task.clone());
    // Inputs.
    let cluster = kube::connect(flags.cluster_config(), &tasks).await?;
    if cluster.is_none() {
        tracing::info!("no cluster configured: running standalone (every source, HTTP API, no Kubernetes)");
    }
    // Domains.
    let claims = cluster.as_ref().map(kube::Cluster::claim_inputs).unwrap_or_default();
    let ports = ports::start(flags.ports_config(), claims, &tasks)?;
    let nic = match &cluster {
        Some(c) => c.nic_config(flags.nic_config(), &tasks),
        None => watch::channel(Some(flags.nic_config())).1,
    };
    let network = network::spawn(nic, &tasks)?;
    let versions = cluster.as_ref().map_or_else(|| watch::channel(Vec::new()).1, |c| c.versions.clone());
    let engines = engines::spawn(flags.engines_config()?, versions, &tasks);
    // Without a cluster nobody can say which instances are live: rule 1 of
    // the sweeps (instance folders) stays off; rules 2 and 3 run.
    let owners: Arc<dyn logs::LiveInstances> = match &cluster {
        Some(c) => c.live_instances.clone(),
        None => Arc::new(logs::Standalone),
    };
    let mut sweep_args = flags.log_sweep_args();
    sweep_args.callers_checked_by_cluster = cluster.is_some();
    let sweeps = logs::spawn(sweep_args, owners, &tasks)?;
    // Sinks.
    let kube = cluster.map(|c| {
        let publishing = c.publish(&ports, network.clone(), &engines, &tasks);
        (c, publishing)
    });
    let access = http::access::Access::new(flags.api_token_file(), kube.as_ref().map(|(c, _)| c));
    let addr = SocketAddr::new(flags.listen_address, flags.port);
    let state = http::AppState {
        ports,
        network,
        engines,
        kube,
        logs: sweeps,
        sweep_policy: http::logs::HttpSweepPolicy::from_args(&flags.logs),
        access,
        v1_auth: flags.v1_require_auth,
        limits: http::Limits::default(),
        tasks,
        shutdown: shutdown.clone(),
    };
    let mut server = tokio::spawn(http::serve(addr, state));
    let outcome = tokio::select! {
        res = &mut server => match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(RunError::Http { addr, source }),
            Err(join) => Err(RunError::Http { addr, source: std::io::Error::other(join) }),
        },
        sig = shutdown_signal() => {
            tracing::info!(signal = sig, "shutting down");
            Ok(())
        }
    };
    shutdown.cancel();
    // Give the server and tasks a moment to finish; never the whole grace period.
    let _ = tokio::time::timeout(Duration::from_millis(800), server).await;
    outcome
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers the process still dies on the default action.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
