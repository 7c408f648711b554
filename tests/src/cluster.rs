//! What cluster tests share: seeding the fake API server the way a PolarDB
//! Stack cluster looks, starting the daemon against it, and reading its
//! outputs back (the port-usage keys, Node conditions).
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use serde_json::{json, Value};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{fake_api::FakeApi, wait_for, Daemon};

/// The node most tests run the daemon as.
pub const NODE: &str = "node-a";
pub const NS: &str = "kube-system";
/// Long enough for a write to reach the fake, short enough to keep the suite quick.
pub const SOON: Duration = Duration::from_secs(15);

pub fn usage_cm(node: &str) -> String {
    format!("cloud-provider-port-usage-{node}")
}

/// Seeds what a PolarDB Stack cluster has: the node, the operator's
/// ConfigMaps with port ranges (a range with its upper bound in play, a
/// single port), controller-config and ccm-config.
pub fn seed(api: &FakeApi, node: &str, ranges: &[(&str, &str)]) {
    api.put(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node},
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
            "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}));
    set_ranges(api, ranges);
    set_print_port(api, true);
    api.put(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ccm-config", "namespace": NS},
        "data": {"NET_CARD_NAME": "eth0"}}));
}

pub fn set_ranges(api: &FakeApi, ranges: &[(&str, &str)]) {
    let annotations: serde_json::Map<String, Value> =
        ranges.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect();
    api.put(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "polardb4mpd-controller", "namespace": NS, "annotations": annotations},
        "data": {"Pbx.Next.External.Port": "20001"}}));
}

pub fn set_print_port(api: &FakeApi, on: bool) {
    api.put(
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "controller-config", "namespace": NS},
        "data": {"enablePrintPort": on.to_string(), "isCheckOObIP": "false"}}),
    );
}

pub fn daemon_for(api_kubeconfig: &std::path::Path, node: &str, extra: &[&str]) -> Daemon {
    let kc = api_kubeconfig.to_str().expect("utf-8 path");
    let mut args = vec!["--kubeconfig", kc, "--current-node-name", node, "--publish-debounce", "50ms"];
    args.extend_from_slice(extra);
    let mut d = Daemon::start(&args);
    d.wait_ready();
    d
}

/// The port keys of a node's usage ConfigMap, or None while it does not exist.
pub fn keys(api: &FakeApi, node: &str) -> Option<BTreeSet<u16>> {
    let cm = api.get("configmaps", Some(NS), &usage_cm(node))?;
    let data = cm["data"].as_object().cloned().unwrap_or_default();
    Some(
        data.iter()
            .map(|(k, v)| {
                assert_eq!(v, "the port already use", "value of key {k}");
                k.parse().unwrap_or_else(|_| panic!("key {k:?} is not a port"))
            })
            .collect(),
    )
}

pub fn wait_keys(api: &FakeApi, d: &mut Daemon, node: &str, want: &[u16]) {
    let want: BTreeSet<u16> = want.iter().copied().collect();
    if !wait_for(SOON, || keys(api, node).as_ref() == Some(&want)) {
        panic!("ConfigMap keys {:?}, expected {want:?}\n{}", keys(api, node), d.log_text());
    }
}

pub fn tcp_listen(port: u16) -> Socket {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    s.set_reuse_address(true).expect("SO_REUSEADDR");
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into()).expect("bind");
    s.listen(8).expect("listen");
    s
}

pub fn udp_bind(port: u16) -> Socket {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
    s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into()).expect("bind");
    s
}

pub fn condition(api: &FakeApi, node: &str, t: &str) -> Option<Value> {
    let n = api.get("nodes", None, node)?;
    n["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == t).cloned()
}

pub fn wait_condition(api: &FakeApi, d: &mut Daemon, t: &str, status: &str, reason: &str, message: &str) -> Value {
    let ok = wait_for(SOON, || {
        condition(api, NODE, t)
            .is_some_and(|c| c["status"] == status && c["reason"] == reason && c["message"] == message)
    });
    assert!(ok, "{t}: want {status}/{reason}/{message}, have {:?}\n{}", condition(api, NODE, t), d.log_text());
    condition(api, NODE, t).expect("condition")
}
