//! A kubeconfig pointing at the fake, in the shape both kubectl and kube-rs
//! read: one cluster (plain HTTP), one token user, one current context.
use std::net::SocketAddr;

/// The bearer token the kubeconfig carries. The fake accepts any token (or
/// none); the RBAC check ([`super::RbacRule`]) is per server, not per user.
pub const TOKEN: &str = "fake-apiserver-token";

pub fn render(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: http://{addr}
users:
- name: fake-user
  user:
    token: {TOKEN}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake-user
    namespace: default
current-context: fake
preferences: {{}}
"
    )
}
