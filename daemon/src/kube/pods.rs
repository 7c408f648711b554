//! Pods on this node (field selector `spec.nodeName`): their hostPorts, and
//! the container ports of hostNetwork pods, are claims on ports beside
//! sockets (traffic to them is redirected even though no host socket
//! exists), an input of the ports domain.
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::sync::watch;

use super::client::ApiMetrics;
use crate::{
    ports::{
        model::Proto,
        occupancy::{Claim, ClaimSet},
    },
    tasks::Tasks,
};

/// A hostPort of a pod on this node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct HostPort {
    proto: Proto,
    port: u16,
    /// `namespace/name` of the pod.
    pod: String,
}

fn claims_of(pods: &BTreeMap<String, Pod>) -> BTreeMap<(Proto, u16), Vec<Claim>> {
    let mut claims: BTreeMap<(Proto, u16), Vec<Claim>> = BTreeMap::new();
    for h in pods.iter().flat_map(|(k, p)| host_ports_of(k, p)) {
        let list = claims.entry((h.proto, h.port)).or_default();
        let c = Claim::HostPort { pod: h.pod };
        if !list.contains(&c) {
            list.push(c);
        }
    }
    claims
}

/// The host ports a pod holds: its containers' hostPorts, and for a
/// hostNetwork pod every containerPort (Kubernetes defaults hostPort to
/// containerPort there; an object that was not defaulted means the same).
/// From the moment the pod is bound to this node, before its process binds:
/// the port is promised to it.
fn host_ports_of<'a>(key: &'a str, pod: &'a Pod) -> impl Iterator<Item = HostPort> + 'a {
    // A finished pod holds nothing; a pending one may already be bound by kubelet.
    let finished =
        pod.status.as_ref().and_then(|s| s.phase.as_deref()).is_some_and(|p| p == "Succeeded" || p == "Failed");
    let host_network = pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false);
    let spec = pod.spec.iter().filter(move |_| !finished);
    let containers = spec.flat_map(|s| s.init_containers.iter().flatten().chain(s.containers.iter()));
    containers.flat_map(|c| c.ports.iter().flatten()).filter_map(move |p| {
        let port = p.host_port.filter(|&h| h > 0).or_else(|| host_network.then_some(p.container_port))?;
        let port = u16::try_from(port).ok().filter(|&p| p > 0)?;
        let proto = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Proto::Tcp,
            "UDP" => Proto::Udp,
            _ => return None, // SCTP: not a port the operator hands out
        };
        Some(HostPort { proto, port, pod: key.to_owned() })
    })
}

/// Watches this node's pods; the receiver always holds their hostPorts as
/// claims (`synced` once the first list is in).
pub fn spawn_host_ports(
    client: kube::Client,
    node: &str,
    metrics: Arc<ApiMetrics>,
    tasks: &Tasks,
) -> watch::Receiver<ClaimSet> {
    let cfg = super::client::watch_config().fields(&format!("spec.nodeName={node}"));
    super::spawn_claims(tasks, "pods/this-node", Api::all(client), cfg, metrics, claims_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("pod")
    }

    #[test]
    fn host_ports_by_protocol_and_phase() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"containers": [
                {"name": "a", "ports": [{"containerPort": 5432, "hostPort": 5432}, {"containerPort": 53, "hostPort": 5353, "protocol": "UDP"}, {"containerPort": 80}]},
                {"name": "b", "ports": [{"containerPort": 1, "hostPort": 7000, "protocol": "SCTP"}]}
            ]},
            "status": {"phase": "Running"}
        }));
        let got: Vec<_> = host_ports_of("default/db", &p).map(|h| (h.proto, h.port)).collect();
        assert_eq!(got, vec![(Proto::Tcp, 5432), (Proto::Udp, 5353)]);
        let mut done = p.clone();
        done.status.as_mut().expect("status").phase = Some("Succeeded".into());
        assert_eq!(host_ports_of("default/db", &done).count(), 0);
    }

    #[test]
    fn a_host_network_pod_holds_its_container_ports_before_it_binds_them() {
        let p = pod(serde_json::json!({
            "metadata": {"name": "pg-0", "namespace": "db"},
            "spec": {"hostNetwork": true, "nodeName": "n1", "containers": [
                {"name": "engine", "ports": [{"containerPort": 5432}, {"containerPort": 6000, "hostPort": 6000, "protocol": "UDP"}]}
            ]},
            "status": {"phase": "Pending"}
        }));
        let got: Vec<_> = host_ports_of("db/pg-0", &p).map(|h| (h.proto, h.port)).collect();
        assert_eq!(got, vec![(Proto::Tcp, 5432), (Proto::Udp, 6000)]);
    }
}
