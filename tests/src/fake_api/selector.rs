//! Label and field selectors, as `?labelSelector=` and `?fieldSelector=` take
//! them. They filter lists and watch events alike.
use serde_json::{Map, Value};

use super::{discovery::ResourceType, status::ApiError};

#[derive(Debug, Clone, PartialEq)]
enum LabelOp {
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<(String, LabelOp)>);

fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63 && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Splits at commas that are not inside `( )`.
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e in (f,g),h notin (i),j,!k` (`==` as `=`).
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let bad = |why: &str| ApiError::bad_request(format!("unable to parse requirement: {why} in {s:?}"));
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for part in split_top_level(s) {
            let part = part.trim();
            let (key, op) = if let Some(key) = part.strip_prefix('!') {
                (key.trim(), LabelOp::DoesNotExist)
            } else if let Some((key, v)) = part.split_once("!=") {
                (key.trim(), LabelOp::NotEq(v.trim().to_string()))
            } else if let Some((key, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (key.trim(), LabelOp::Eq(v.trim().to_string()))
            } else if let Some((key, rest)) = part.split_once(|c: char| c.is_whitespace()) {
                let rest = rest.trim_start();
                let (negate, list) = if let Some(l) = rest.strip_prefix("notin") {
                    (true, l)
                } else if let Some(l) = rest.strip_prefix("in") {
                    (false, l)
                } else {
                    return Err(bad("unknown operator"));
                };
                let list = list.trim();
                let inner =
                    list.strip_prefix('(').and_then(|l| l.strip_suffix(')')).ok_or_else(|| bad("expected ( )"))?;
                let values: Vec<String> = inner.split(',').map(|v| v.trim().to_string()).collect();
                if values.iter().any(|v| !valid_value(v)) {
                    return Err(bad("invalid value"));
                }
                (key.trim(), if negate { LabelOp::NotIn(values) } else { LabelOp::In(values) })
            } else {
                (part, LabelOp::Exists)
            };
            if !valid_key(key) {
                return Err(bad("invalid label key"));
            }
            if let LabelOp::Eq(v) | LabelOp::NotEq(v) = &op {
                if !valid_value(v) {
                    return Err(bad("invalid label value"));
                }
            }
            reqs.push((key.to_string(), op));
        }
        Ok(Self(reqs))
    }

    /// Whether an object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, object: &Value) -> bool {
        let empty = Map::new();
        let labels = object.pointer("/metadata/labels").and_then(Value::as_object).unwrap_or(&empty);
        self.0.iter().all(|(key, op)| {
            let v = labels.get(key).and_then(Value::as_str);
            match op {
                LabelOp::Eq(want) => v == Some(want),
                LabelOp::NotEq(want) => v != Some(want),
                LabelOp::In(set) => v.is_some_and(|v| set.iter().any(|s| s == v)),
                LabelOp::NotIn(set) => v.is_none_or(|v| !set.iter().any(|s| s == v)),
                LabelOp::Exists => v.is_some(),
                LabelOp::DoesNotExist => v.is_none(),
            }
        })
    }
}

/// A parsed field selector: `field=value` / `field==value` / `field!=value`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// The field labels each resource supports, beyond `metadata.name` and
/// `metadata.namespace`. Others get a 400, as from a real apiserver.
fn supported_fields(rt: &ResourceType) -> &'static [&'static str] {
    match (rt.group, rt.plural) {
        ("", "pods") => &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        ("", "nodes") => &["spec.unschedulable"],
        ("", "namespaces") => &["status.phase"],
        ("", "events") => &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        ("events.k8s.io", "events") => &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ],
        _ => &[],
    }
}

/// The string a field label has on an object: missing fields are "", and
/// booleans that default to false (`spec.unschedulable`) read "false".
fn field_value(object: &Value, field: &str) -> String {
    let path = if field == "source" { "source.component" } else { field };
    let mut v = object;
    for seg in path.split('.') {
        match v.get(seg) {
            Some(next) => v = next,
            None => {
                return if matches!(field, "spec.unschedulable" | "spec.hostNetwork") {
                    "false".into()
                } else {
                    String::new()
                }
            }
        }
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl FieldSelector {
    pub fn parse(s: &str, rt: &ResourceType) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for part in s.split(',') {
            let (field, negate, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (f, false, v)
            } else {
                return Err(ApiError::bad_request(format!("invalid selector: '{s}'; can't understand '{part}'")));
            };
            let field = field.trim();
            if !matches!(field, "metadata.name" | "metadata.namespace") && !supported_fields(rt).contains(&field) {
                return Err(ApiError::bad_request(format!("field label not supported: {field}")));
            }
            reqs.push((field.to_string(), negate, value.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, negate, want)| (field_value(object, field) == *want) != *negate)
    }
}

/// The name a list or watch is authorized as: the value of a
/// `metadata.name=` (or `==`) term of its field selector, as the apiserver's
/// request-info resolver takes it (`RequiresExactMatch("metadata.name")`),
/// before any check of which fields the resource supports. None when the
/// selector does not parse, has no such term, or the value could not be a
/// path segment (`.`, `..`, or containing `/` or `%`).
pub fn exact_name(raw: &str) -> Option<String> {
    if raw.trim().is_empty() {
        return None;
    }
    let mut found = None;
    for part in raw.split(',') {
        let (field, exact, value) = if let Some((f, v)) = part.split_once("!=") {
            (f, false, v)
        } else if let Some((f, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            (f, true, v)
        } else {
            return None;
        };
        if exact && field.trim() == "metadata.name" && found.is_none() {
            found = Some(value.trim().to_string());
        }
    }
    found.filter(|n| n != "." && n != ".." && !n.contains(['/', '%']))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(labels: Value) -> Value {
        json!({ "metadata": { "name": "a", "namespace": "ns", "labels": labels }, "spec": { "nodeName": "n1" } })
    }

    fn sel(s: &str) -> LabelSelector {
        LabelSelector::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn label_operators() {
        let o = obj(json!({ "app": "db", "tier": "back" }));
        for (s, want) in [
            ("", true),
            ("app=db", true),
            ("app==db", true),
            ("app=web", false),
            ("app!=web", true),
            ("missing!=x", true),
            ("app in (web, db)", true),
            ("app in (web)", false),
            ("app notin (web)", true),
            ("missing notin (web)", true),
            ("app notin (db,web)", false),
            ("app", true),
            ("missing", false),
            ("!missing", true),
            ("!app", false),
            ("app=db,tier=back", true),
            ("app=db,tier in (front,x)", false),
            ("app in (db,web),!missing,tier", true),
        ] {
            assert_eq!(sel(s).matches(&o), want, "{s}");
        }
        assert!(sel("app").matches(&obj(json!({ "app": "" }))));
        assert!(!sel("app=db").matches(&json!({ "metadata": { "name": "x" } })));
    }

    #[test]
    fn label_parse_errors() {
        for s in ["app in db", "a b", "app=(x)", "=x", "app in (a b)"] {
            assert!(LabelSelector::parse(s).is_err(), "{s} should not parse");
        }
    }

    #[test]
    fn field_selectors() {
        let pods = ResourceType::lookup("pods").expect("pods");
        let cms = ResourceType::lookup("configmaps").expect("configmaps");
        let o = obj(json!({}));
        let f = |s: &str, rt| FieldSelector::parse(s, rt).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert!(f("metadata.name=a", cms).matches(&o));
        assert!(!f("metadata.name!=a", cms).matches(&o));
        assert!(f("metadata.namespace==ns,metadata.name=a", cms).matches(&o));
        assert!(f("spec.nodeName=n1", pods).matches(&o));
        assert!(!f("spec.nodeName=n2", pods).matches(&o));
        assert!(f("status.phase=", pods).matches(&o), "missing fields read as empty");
        let err = FieldSelector::parse("spec.nodeName=n1", cms).expect_err("configmaps have no spec.nodeName");
        assert_eq!((err.code, err.message.as_str()), (400, "field label not supported: spec.nodeName"));
        assert!(FieldSelector::parse("nonsense", cms).is_err());
        let nodes = ResourceType::lookup("nodes").expect("nodes");
        assert!(f("spec.unschedulable=false", nodes).matches(&o));
    }

    #[test]
    fn names_that_authorize_a_list() {
        let some = |s: &str| Some(s.to_string());
        assert_eq!(exact_name("metadata.name=a"), some("a"));
        assert_eq!(exact_name("metadata.name==a"), some("a"));
        assert_eq!(exact_name("metadata.namespace=ns,metadata.name=a"), some("a"));
        assert_eq!(exact_name("metadata.name=a,spec.unknown=x"), some("a"), "fields are checked later");
        assert_eq!(exact_name("metadata.name=a,metadata.name=b"), some("a"));
        for none in [
            "",
            "metadata.name!=a",
            "spec.nodeName=a",
            "metadata.name=a,nonsense",
            "metadata.name=..",
            "metadata.name=a/b",
        ] {
            assert_eq!(exact_name(none), None, "{none}");
        }
    }
}
