//! Allocated nodePorts, from one watch of the cluster's Services: kube-proxy
//! redirects every allocated nodePort on every node, so a database listening
//! there would get no traffic. They are claims of the ports domain (taken on
//! this node, with the Service as the reason). The NodePort *range* is
//! advice, not occupancy: only allocated ports count.
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use tokio::sync::watch;

use super::client::ApiMetrics;
use crate::{
    ports::{
        map::PortKey,
        model::Proto,
        occupancy::{Claim, ClaimSet},
    },
    tasks::Tasks,
};

/// The nodePorts of NodePort and LoadBalancer Services, by port.
fn claims_of(services: &BTreeMap<String, Service>) -> BTreeMap<PortKey, Vec<Claim>> {
    let mut claims: BTreeMap<PortKey, Vec<Claim>> = BTreeMap::new();
    for (key, svc) in services {
        let Some(spec) = &svc.spec else { continue };
        if !matches!(spec.type_.as_deref(), Some("NodePort") | Some("LoadBalancer")) {
            continue;
        }
        for p in spec.ports.iter().flatten() {
            let Some(port) = p.node_port.and_then(|n| u16::try_from(n).ok()).filter(|n| *n > 0) else { continue };
            let proto = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Proto::Tcp,
                "UDP" => Proto::Udp,
                _ => continue, // SCTP: not a port the operator hands out
            };
            let list = claims.entry((proto, port)).or_default();
            let c = Claim::NodePort { service: key.clone() };
            if !list.contains(&c) {
                list.push(c);
            }
        }
    }
    claims
}

/// Watches every Service; the receiver holds their nodePorts as claims
/// (`synced` once the first list is in; a later watch error keeps the set,
/// late but not wrong, see `mirror`).
pub fn spawn_node_ports(client: kube::Client, metrics: Arc<ApiMetrics>, tasks: &Tasks) -> watch::Receiver<ClaimSet> {
    super::spawn_claims(tasks, "services", Api::all(client), super::client::watch_config(), metrics, claims_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allocated_node_ports_of_node_port_and_load_balancer_services_count() {
        let svc = |name: &str, ty: &str, ports: serde_json::Value| -> (String, Service) {
            let s = serde_json::json!({"metadata": {"name": name, "namespace": "db"}, "spec": {"type": ty, "ports": ports}});
            (format!("db/{name}"), serde_json::from_value(s).expect("service"))
        };
        let services: BTreeMap<_, _> = [
            svc("np", "NodePort", serde_json::json!([{"port": 5432, "nodePort": 31000}, {"port": 53, "nodePort": 31001, "protocol": "UDP"}])),
            svc("lb", "LoadBalancer", serde_json::json!([{"port": 80, "nodePort": 31000}])),
            svc("ip", "ClusterIP", serde_json::json!([{"port": 80}])),
            svc("sctp", "NodePort", serde_json::json!([{"port": 9, "nodePort": 31002, "protocol": "SCTP"}])),
        ]
        .into_iter()
        .collect();
        let c = claims_of(&services);
        assert_eq!(c.keys().copied().collect::<Vec<_>>(), vec![(Proto::Tcp, 31000), (Proto::Udp, 31001)]);
        assert_eq!(c[&(Proto::Tcp, 31000)].len(), 2, "two Services, one port: both named");
    }
}
