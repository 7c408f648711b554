//! Writing a ConfigMap this node owns (the port-usage and availability
//! ConfigMaps): server-side apply with the daemon's field manager, so only
//! the fields it applies are its own and a field it stops applying goes; an
//! ownerReference to this Node, so the object is collected with the node (the
//! original left them behind); every call bounded, counted and timed; the
//! "pending" gauge kept for the object.
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::{
    api::{Patch, PatchParams},
    Api,
};
use serde_json::{json, Map, Value};

use super::{
    client::{call, ApiMetrics, CallError},
    FIELD_MANAGER, NAMESPACE,
};

/// One node-owned ConfigMap in `kube-system`.
#[derive(Clone)]
pub struct NodeOwned {
    api: Api<ConfigMap>,
    nodes: Api<Node>,
    node: String,
    name: String,
    /// The gauge label of this object (`polarstack_kube_publish_pending`).
    object: &'static str,
    metrics: Arc<ApiMetrics>,
    /// The ownerReference, once the Node could be read.
    owner: Option<Value>,
}

impl NodeOwned {
    pub fn new(
        client: &kube::Client,
        node: &str,
        name: String,
        object: &'static str,
        metrics: Arc<ApiMetrics>,
    ) -> Self {
        Self {
            api: Api::namespaced(client.clone(), NAMESPACE),
            nodes: Api::all(client.clone()),
            node: node.to_owned(),
            name,
            object,
            metrics,
            owner: None,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn api(&self) -> &Api<ConfigMap> {
        &self.api
    }

    /// Whether the object differs from what should be published.
    pub fn set_pending(&self, pending: bool) {
        self.metrics.set_pending(self.object, pending);
    }

    /// The Node may have been registered anew (a new uid): look it up again
    /// at the next write.
    pub fn forget_owner(&mut self) {
        self.owner = None;
    }

    /// Applies `data` and `annotations` (server-side apply, forced: fields
    /// another manager wrote, e.g. the Go daemon before an upgrade, are taken
    /// over instead of failing with a conflict).
    pub async fn apply(
        &mut self,
        data: Map<String, Value>,
        annotations: Map<String, Value>,
    ) -> Result<ConfigMap, CallError> {
        if self.owner.is_none() {
            self.owner = self.node_owner().await;
        }
        let mut metadata = json!({"name": self.name, "namespace": NAMESPACE});
        if !annotations.is_empty() {
            metadata["annotations"] = Value::Object(annotations);
        }
        if let Some(o) = &self.owner {
            metadata["ownerReferences"] = json!([o]);
        }
        let body = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data});
        let params = PatchParams::apply(FIELD_MANAGER).force();
        call(&self.metrics, "apply", "configmaps", self.api.patch(&self.name, &params, &Patch::Apply(&body))).await
    }

    /// Removes data keys with a JSON merge patch (for keys another writer
    /// left, which server-side apply cannot remove for us).
    pub async fn remove_keys(&self, keys: impl IntoIterator<Item = String>) -> Result<(), CallError> {
        let gone: Map<String, Value> = keys.into_iter().map(|k| (k, Value::Null)).collect();
        if gone.is_empty() {
            return Ok(());
        }
        let patch = json!({"data": gone});
        let params = PatchParams::default();
        call(&self.metrics, "patch", "configmaps", self.api.patch(&self.name, &params, &Patch::Merge(&patch))).await?;
        Ok(())
    }

    /// The object's data as it is now; None when absent or unreadable.
    pub async fn current_data(&self) -> Option<BTreeMap<String, String>> {
        match call(&self.metrics, "get", "configmaps", self.api.get_opt(&self.name)).await {
            Ok(Some(cm)) => Some(cm.data.unwrap_or_default()),
            _ => None,
        }
    }

    /// The ownerReference to this Node. None while the Node cannot be read:
    /// the object is then published without it, and the next write asks again.
    async fn node_owner(&self) -> Option<Value> {
        match call(&self.metrics, "get", "nodes", self.nodes.get(&self.node)).await {
            Ok(n) => {
                let uid = n.metadata.uid?;
                Some(json!({"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": uid}))
            }
            Err(e) => {
                tracing::warn!(node = %self.node, error = %e, "cannot read this Node; publishing without an ownerReference");
                None
            }
        }
    }
}
