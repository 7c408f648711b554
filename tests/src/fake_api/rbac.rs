//! An authorizer in the shape of RBAC rules, so a test can check that the
//! daemon gets by with the permissions its manifests grant.
use super::discovery::ResourceType;

/// One allowed (verbs × resources [× namespaces] [× names]) set, like a
/// PolicyRule. `"*"` matches any verb or resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbacRule {
    pub verbs: Vec<String>,
    /// Plural names, subresources as `nodes/status`.
    pub resources: Vec<String>,
    /// `None`: every namespace, and cluster-scoped resources (a ClusterRole's
    /// rule). `Some`: only namespaced requests in these (a Role's rule).
    pub namespaces: Option<Vec<String>>,
    /// `resourceNames`: only requests naming one of these objects.
    pub names: Option<Vec<String>>,
}

impl RbacRule {
    pub fn new(verbs: &[&str], resources: &[&str]) -> Self {
        let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Self { verbs: owned(verbs), resources: owned(resources), namespaces: None, names: None }
    }

    pub fn in_namespaces(mut self, namespaces: &[&str]) -> Self {
        self.namespaces = Some(namespaces.iter().map(|s| s.to_string()).collect());
        self
    }

    pub fn named(mut self, names: &[&str]) -> Self {
        self.names = Some(names.iter().map(|s| s.to_string()).collect());
        self
    }

    fn allows(&self, a: &Attributes<'_>) -> bool {
        self.permits(a.verb, &a.resource_path(), a.namespace, a.name)
    }

    /// Whether this rule alone allows a decision the server logged.
    pub fn allows_check(&self, c: &AuthzCheck) -> bool {
        self.permits(&c.verb, &c.resource, c.namespace.as_deref(), c.name.as_deref())
    }

    fn permits(&self, verb: &str, resource: &str, namespace: Option<&str>, name: Option<&str>) -> bool {
        let any = |list: &[String], x: &str| list.iter().any(|i| i == "*" || i == x);
        any(&self.verbs, verb)
            && any(&self.resources, resource)
            && self.namespaces.as_ref().is_none_or(|ns| namespace.is_some_and(|n| ns.iter().any(|i| i == n)))
            && self.names.as_ref().is_none_or(|names| name.is_some_and(|n| names.iter().any(|i| i == n)))
    }
}

/// One authorization decision, as the request log keeps it (only while RBAC
/// is on): a request is checked once, and a server-side apply that creates
/// its object a second time, as `create`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthzCheck {
    pub verb: String,
    /// The plural, `nodes/status` for a subresource.
    pub resource: String,
    pub namespace: Option<String>,
    /// From the URL, or for list and watch from a `metadata.name` field selector.
    pub name: Option<String>,
    pub allowed: bool,
}

/// What a resource request asks to do, as the authorizer sees it.
#[derive(Debug)]
pub struct Attributes<'a> {
    pub verb: &'static str,
    pub resource: &'static ResourceType,
    pub subresource: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

impl Attributes<'_> {
    fn resource_path(&self) -> String {
        match self.subresource {
            Some(s) => format!("{}/{s}", self.resource.plural),
            None => self.resource.plural.to_string(),
        }
    }

    /// Whether any rule allows it.
    pub fn allowed_by(&self, rules: &[RbacRule]) -> bool {
        rules.iter().any(|r| r.allows(self))
    }

    /// The decision under `rules`, for the request log.
    pub fn check(&self, rules: &[RbacRule]) -> AuthzCheck {
        AuthzCheck {
            verb: self.verb.to_string(),
            resource: self.resource_path(),
            namespace: self.namespace.map(str::to_string),
            name: self.name.map(str::to_string),
            allowed: self.allowed_by(rules),
        }
    }

    /// The message of the apiserver's 403.
    pub fn denial(&self) -> String {
        let what = match self.name {
            Some(n) => format!("{} \"{n}\"", self.resource.qualified()),
            None => self.resource.qualified(),
        };
        let scope = match self.namespace {
            Some(ns) => format!(" in the namespace \"{ns}\""),
            None => " at the cluster scope".to_string(),
        };
        format!(
            "{what} is forbidden: User \"fake-user\" cannot {} resource \"{}\" in API group \"{}\"{scope}",
            self.verb,
            self.resource_path(),
            self.resource.group
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let cm = ResourceType::lookup("configmaps").expect("cm");
        let nodes = ResourceType::lookup("nodes").expect("nodes");
        let rules = [
            RbacRule::new(&["get", "list", "watch", "patch"], &["configmaps"]).in_namespaces(&["kube-system"]),
            RbacRule::new(&["patch"], &["nodes/status"]).named(&["n1"]),
            RbacRule::new(&["get"], &["*"]),
        ];
        let a =
            |verb, resource, subresource, namespace, name| Attributes { verb, resource, subresource, namespace, name };
        assert!(a("list", cm, None, Some("kube-system"), None).allowed_by(&rules));
        assert!(!a("list", cm, None, Some("default"), None).allowed_by(&rules));
        assert!(!a("list", cm, None, None, None).allowed_by(&rules), "all-namespace list needs a cluster rule");
        assert!(!a("create", cm, None, Some("kube-system"), None).allowed_by(&rules));
        assert!(a("patch", nodes, Some("status"), None, Some("n1")).allowed_by(&rules));
        assert!(!a("patch", nodes, Some("status"), None, Some("n2")).allowed_by(&rules));
        assert!(!a("patch", nodes, None, None, Some("n1")).allowed_by(&rules));
        assert!(a("get", nodes, None, None, Some("n9")).allowed_by(&rules));
        assert_eq!(
            a("patch", nodes, None, None, Some("n1")).denial(),
            "nodes \"n1\" is forbidden: User \"fake-user\" cannot patch resource \"nodes\" in API group \"\" at the cluster scope"
        );
    }
}
