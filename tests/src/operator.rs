//! The daemon's outputs read the way its consumers read them: each function
//! mirrors one function of ApsaraDB/PolarDB-Stack-Common (the operator's
//! library), so a contract test fails where the unchanged operator would
//! misbehave.
use std::collections::BTreeSet;

use crate::{cluster::NS, fake_api::FakeApi};

/// `business/adapter/port_generator.go` `getUsedTcpPortByConfigmap`: every
/// data key of `cloud-provider-port-usage-<node>`, TrimSpace then Atoi, kept
/// when in 1..=65535; other keys are skipped silently. None when the
/// ConfigMap is missing (the operator then falls back to ssh + netstat).
pub fn used_ports_of_node(api: &FakeApi, node: &str) -> Option<BTreeSet<u16>> {
    let cm = api.get("configmaps", Some(NS), &format!("cloud-provider-port-usage-{node}"))?;
    let data = cm["data"].as_object().cloned().unwrap_or_default();
    Some(
        data.keys()
            .filter_map(|k| k.trim().parse::<i64>().ok())
            .filter(|p| (1..=65535).contains(p))
            .map(|p| p as u16)
            .collect(),
    )
}

/// `port_generator.go` `getAllNodeUsedPort` / `getAllUsedPort`: the union of
/// every listed node's ports. A node whose ConfigMap is missing is reported
/// in the second set (the operator would ssh to it).
pub fn used_ports(api: &FakeApi) -> (BTreeSet<u16>, BTreeSet<String>) {
    let mut ports = BTreeSet::new();
    let mut by_ssh = BTreeSet::new();
    for node in api.list("nodes", None) {
        let name = node["metadata"]["name"].as_str().unwrap_or_default().to_string();
        match used_ports_of_node(api, &name) {
            Some(p) => ports.extend(p),
            None => {
                by_ssh.insert(name);
            }
        }
    }
    (ports, by_ssh)
}

/// `utils/k8sutil/k8sutil.go` `GetNodeClientIPList`: a node's client IP is
/// the message of its `NodeClientIP` condition when the status is `True`
/// and the message is not `0.0.0.0`; otherwise it has none (and
/// `GetClientIP` fails for it: instance registration and switchover fail).
pub fn client_ip(api: &FakeApi, node: &str) -> Option<String> {
    let n = api.get("nodes", None, node)?;
    n["status"]["conditions"].as_array()?.iter().find_map(|c| {
        (c["type"] == "NodeClientIP" && c["status"] == "True" && c["message"] != "0.0.0.0")
            .then(|| c["message"].as_str().unwrap_or_default().to_string())
    })
}

/// COMPAT: `NodeClientNetworkUnavailable` True means the operator avoids the
/// node for database pods.
pub fn client_network_unavailable(api: &FakeApi, node: &str) -> Option<bool> {
    let n = api.get("nodes", None, node)?;
    let c = n["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "NodeClientNetworkUnavailable")?;
    Some(c["status"] == "True")
}
