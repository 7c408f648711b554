//! The cluster's settings for this daemon, from three watched ConfigMaps in
//! kube-system (docs/compat.md "Inputs"): `ccm-config` (client NIC), the
//! operator's `controller-config` (`enablePrintPort`, `isCheckOObIP`) and
//! `--mpd-controller-cm-name` (the watched port ranges). Each change applies
//! live. One task owns [`Settings`]; sinks read it through a watch channel.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{network::NicConfig, tasks::Tasks};

use super::{
    client::ApiMetrics,
    mirror,
    ranges::{PortRanges, RangeError},
    NAMESPACE,
};

pub const CCM_CONFIG: &str = "ccm-config";
pub const CONTROLLER_CONFIG: &str = "controller-config";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// Every input has been read once (present or known absent).
    pub synced: bool,
    pub ranges: PortRanges,
    /// The ranges are the operator's shipped defaults: its ConfigMap is missing.
    pub default_ranges: bool,
    /// `controller-config` `enablePrintPort` (default true): publish ports.
    pub enable_print_port: bool,
    /// `controller-config` `isCheckOObIP` (default true).
    pub check_oob_ip: bool,
    /// `ccm-config` `NET_CARD_NAME` and `NET_MASK`; when absent, the flags
    /// (which the DaemonSet fills from the same keys) apply.
    pub net_card_name: Option<String>,
    pub net_mask: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            synced: false,
            ranges: PortRanges::defaults(),
            default_ranges: true,
            enable_print_port: true,
            check_oob_ip: true,
            net_card_name: None,
            net_mask: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Input {
    Ccm,
    Controller,
    Mpd,
}

/// What is known of each input ConfigMap: not yet read, absent, or present.
type Latest = BTreeMap<Input, Option<ConfigMap>>;

/// A value in an input ConfigMap that could not be used as written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Problem {
    configmap: String,
    key: String,
    value: String,
    /// What was done instead, and why.
    message: String,
}

/// Starts the task that owns the settings: the three watches and the
/// derivation, one restartable unit (a new run reads all three again and
/// publishes nothing until it has).
pub fn spawn(
    client: kube::Client,
    mpd_name: String,
    metrics: Arc<ApiMetrics>,
    tasks: &Tasks,
) -> watch::Receiver<Settings> {
    let (tx, rx) = watch::channel(Settings::default());
    let shutdown = tasks.shutdown();
    tasks.restartable("settings", move || {
        follow(client.clone(), mpd_name.clone(), metrics.clone(), tx.clone(), shutdown.clone())
    });
    rx
}

async fn follow(
    client: kube::Client,
    mpd_name: String,
    metrics: Arc<ApiMetrics>,
    tx: watch::Sender<Settings>,
    shutdown: CancellationToken,
) {
    // Unbounded: a dropped update would leave stale settings; there are at
    // most a few per ConfigMap change.
    let (updates_tx, mut updates) = mpsc::unbounded_channel::<(Input, Option<ConfigMap>)>();
    let watches = [
        (Input::Ccm, CCM_CONFIG.to_owned()),
        (Input::Controller, CONTROLLER_CONFIG.to_owned()),
        (Input::Mpd, mpd_name.clone()),
    ]
    .map(|(input, name)| {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
        let cfg = super::client::watch_config().fields(&format!("metadata.name={name}"));
        let updates_tx = updates_tx.clone();
        let resource = match input {
            Input::Ccm => "configmaps/ccm-config",
            Input::Controller => "configmaps/controller-config",
            Input::Mpd => "configmaps/port-ranges",
        };
        mirror::run(api, cfg, resource, metrics.clone(), shutdown.clone(), move |view| {
            // An error after the first sync keeps the last settings: stale
            // ranges beat none while the API server is away.
            if view.synced {
                let _ = updates_tx.send((input, view.objects.values().next().cloned()));
            }
        })
    });
    let owner = async {
        let mut latest = Latest::new();
        let mut warned: BTreeSet<Problem> = BTreeSet::new();
        while let Some((input, cm)) = updates.recv().await {
            latest.insert(input, cm);
            let (next, problems) = derive(&latest, &mpd_name);
            for p in problems {
                // One warning per bad value, not one per event.
                if !warned.contains(&p) {
                    tracing::warn!(configmap = %p.configmap, key = %p.key, value = %p.value, "{}", p.message);
                    warned.insert(p);
                }
            }
            tx.send_if_modified(|cur| {
                // A restarted run has read only some inputs yet: the settings
                // published before stay until it has read all three.
                if *cur == next || (cur.synced && !next.synced) {
                    return false;
                }
                tracing::info!(
                    ranges = ?next.ranges.watched.iter().map(|r| (r.from, r.to)).collect::<Vec<_>>(),
                    default_ranges = next.default_ranges,
                    enable_print_port = next.enable_print_port,
                    net_card_name = ?next.net_card_name,
                    "cluster settings changed"
                );
                *cur = next;
                true
            });
        }
    };
    tokio::select! {
        _ = futures_util::future::join_all(watches) => {}
        () = owner => {}
    }
}

/// The longest the client NIC waits for the cluster's settings before the
/// flags' NIC is watched (the ConfigMaps may be unreadable).
const SETTINGS_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The client NIC to watch: `ccm-config`'s keys where present, else the
/// flags (`fallback`). None until the settings are read (at most
/// `SETTINGS_WAIT`), so the first conditions are about the right NIC.
/// Changes apply live.
pub fn nic_config(
    settings: watch::Receiver<Settings>,
    fallback: NicConfig,
    tasks: &Tasks,
) -> watch::Receiver<Option<NicConfig>> {
    let pick = move |s: &Settings| NicConfig {
        name: s.net_card_name.clone().unwrap_or_else(|| fallback.name.clone()),
        net_mask: s.net_mask.clone().or_else(|| fallback.net_mask.clone()),
    };
    let first = {
        let s = settings.borrow();
        s.synced.then(|| pick(&s))
    };
    let (tx, rx) = watch::channel(first);
    tasks.restartable("nic-config", move || {
        let (mut settings, tx, pick) = (settings.clone(), tx.clone(), pick.clone());
        async move {
            // Only the first run waits for the settings (a restart has a NIC).
            let mut deadline = tx.borrow().is_none().then(|| tokio::time::Instant::now() + SETTINGS_WAIT);
            settings.mark_changed();
            loop {
                tokio::select! {
                    r = settings.changed() => if r.is_err() { return },
                    () = crate::retry::sleep_until(deadline) => deadline = None,
                }
                let next = {
                    let s = settings.borrow_and_update();
                    if !s.synced && deadline.is_some() {
                        continue; // partly read: wait for the rest, or the deadline
                    }
                    Some(pick(&s))
                };
                deadline = None;
                super::set_if_changed(&tx, next);
            }
        }
    });
    rx
}

/// A boolean key of `controller-config`: its default when absent, and when
/// not a boolean (reported once as a problem).
fn flag(data: Option<&BTreeMap<String, String>>, key: &str, default: bool, problems: &mut Vec<Problem>) -> bool {
    match data.and_then(|d| d.get(key)).map(|v| v.trim().to_ascii_lowercase()) {
        None => default,
        Some(v) if v == "true" || v == "1" || v == "yes" => true,
        Some(v) if v == "false" || v == "0" || v == "no" => false,
        Some(v) => {
            problems.push(Problem {
                configmap: CONTROLLER_CONFIG.to_owned(),
                key: key.to_owned(),
                value: v,
                message: format!("not a boolean; using the default, {default}"),
            });
            default
        }
    }
}

/// Settings from whatever is known of the three inputs, and the values
/// that could not be used as written.
fn derive(latest: &Latest, mpd_name: &str) -> (Settings, Vec<Problem>) {
    let data = |i: Input| latest.get(&i).and_then(|cm| cm.as_ref()).and_then(|cm| cm.data.as_ref());
    let mut problems = Vec::new();
    let mut s = Settings {
        synced: [Input::Ccm, Input::Controller, Input::Mpd].iter().all(|i| latest.contains_key(i)),
        ..Settings::default()
    };
    s.enable_print_port = flag(data(Input::Controller), "enablePrintPort", true, &mut problems);
    s.check_oob_ip = flag(data(Input::Controller), "isCheckOObIP", true, &mut problems);
    if let Some(nic) = data(Input::Ccm).and_then(|d| d.get("NET_CARD_NAME")).map(|v| v.trim()).filter(|v| !v.is_empty())
    {
        s.net_card_name = Some(nic.to_owned());
    }
    s.net_mask =
        data(Input::Ccm).and_then(|d| d.get("NET_MASK")).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    match latest.get(&Input::Mpd).and_then(|cm| cm.as_ref()) {
        Some(cm) => {
            let empty = BTreeMap::new();
            let annotations = cm.metadata.annotations.as_ref().unwrap_or(&empty);
            let (ranges, ranges_problems) = PortRanges::from_annotations(annotations);
            for (key, err) in ranges_problems {
                let message = match err {
                    RangeError::PastTheLastPort { .. } => format!("{err}: watching the range up to 65535"),
                    _ => format!("{err}: skipping this port range"),
                };
                let value = annotations.get(&key).cloned().unwrap_or_default();
                problems.push(Problem { configmap: mpd_name.to_owned(), key, value, message });
            }
            s.ranges = ranges;
            s.default_ranges = false;
        }
        None if latest.contains_key(&Input::Mpd) => {
            tracing::debug!(configmap = mpd_name, "port-range ConfigMap missing: using the operator's shipped ranges");
        }
        None => {}
    }
    (s, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(data: &[(&str, &str)], annotations: &[(&str, &str)]) -> Option<ConfigMap> {
        let mut c = ConfigMap {
            data: Some(data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..ConfigMap::default()
        };
        c.metadata.annotations = Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        Some(c)
    }

    #[test]
    fn derives_from_the_three_configmaps() {
        let mut latest = Latest::new();
        latest.insert(Input::Ccm, cm(&[("NET_CARD_NAME", "eth9"), ("NET_MASK", "192.0.2.0/24")], &[]));
        latest.insert(Input::Controller, cm(&[("enablePrintPort", "false")], &[]));
        let (s, bad) = derive(&latest, "mpd");
        assert!(bad.is_empty(), "{bad:?}");
        assert!(!s.synced, "the range ConfigMap has not been read yet");
        assert!(s.default_ranges);
        assert_eq!(s.net_card_name.as_deref(), Some("eth9"));
        assert_eq!(s.net_mask.as_deref(), Some("192.0.2.0/24"));
        assert!(!s.enable_print_port && s.check_oob_ip);

        latest.insert(Input::Mpd, cm(&[], &[("a", "100-200"), ("b", "300"), ("c", "9-1")]));
        let (s, bad) = derive(&latest, "mpd");
        assert!(s.synced && !s.default_ranges);
        assert!(s.ranges.contains(200) && s.ranges.contains(300) && !s.ranges.contains(5400));
        assert_eq!(bad.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), vec!["c"]);

        latest.insert(Input::Controller, cm(&[("enablePrintPort", "maybe")], &[]));
        let (s, bad) = derive(&latest, "mpd");
        assert!(s.enable_print_port, "a value that is not a boolean means the default");
        assert_eq!(
            bad.iter().map(|p| (p.configmap.as_str(), p.key.as_str())).collect::<Vec<_>>(),
            vec![("controller-config", "enablePrintPort"), ("mpd", "c")]
        );

        latest.insert(Input::Mpd, None);
        let (s, _) = derive(&latest, "mpd");
        assert!(s.synced && s.default_ranges && s.ranges.contains(5400));
    }
}
