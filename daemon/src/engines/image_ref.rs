//! One name per image across runtimes. Docker says `polardb/engine:T`,
//! containerd `docker.io/polardb/engine:T`, podman `localhost/polardb/engine:T`
//! for the same local image; the engine-version ConfigMaps use any of them.
//!
//! The canonical form drops the registries that mean "Docker Hub or local"
//! (`docker.io`, `index.docker.io`, `registry-1.docker.io`, bare `localhost`),
//! drops Docker Hub's implicit `library/`, and adds the implicit `:latest`
//! when neither tag nor digest is given. Any other registry (including
//! `localhost:5000`) stays part of the name, so images from different
//! registries never match.
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageKey(String);

impl fmt::Display for ImageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reference:?} is not an image reference: {why}")]
pub struct RefError {
    pub reference: String,
    pub why: &'static str,
}

const HUB_OR_LOCAL: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io", "localhost"];

/// Canonical key of a reference (`[registry/]path[:tag][@digest]`).
pub fn normalize(reference: &str) -> Result<ImageKey, RefError> {
    let bad = |why| RefError { reference: reference.to_owned(), why };
    let r = reference.trim();
    if r.is_empty() {
        return Err(bad("empty"));
    }
    if r.chars().any(|c| c.is_whitespace() || c.is_control()) || r.contains("://") {
        return Err(bad("contains spaces or a scheme"));
    }
    // A digest pins content; it is kept as given (with the name it came with).
    let (name_tag, digest) = match r.split_once('@') {
        Some((n, d)) if d.contains(':') && !d.is_empty() => (n, Some(d.to_ascii_lowercase())),
        Some(_) => return Err(bad("malformed digest")),
        None => (r, None),
    };
    // The tag is after the last ':' that follows the last '/' (a ':' before it is a registry port).
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
        None => (name_tag, None),
    };
    if name.is_empty() || name.starts_with('/') || name.ends_with('/') || name.contains("//") {
        return Err(bad("empty path component"));
    }
    if tag.is_some_and(str::is_empty) {
        return Err(bad("empty tag"));
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // The first component is a registry when it has a '.' or ':' or is `localhost`.
    let first = parts[0];
    let has_registry = parts.len() > 1 && (first.contains('.') || first.contains(':') || first == "localhost");
    let mut registry = None;
    if has_registry {
        registry = Some(first.to_ascii_lowercase());
        parts.remove(0);
    }
    if let Some(reg) = registry.as_deref() {
        if HUB_OR_LOCAL.contains(&reg) {
            registry = None;
        }
    }
    if registry.is_none() && parts.len() == 2 && parts[0] == "library" {
        parts.remove(0);
    }
    let path = parts.join("/").to_ascii_lowercase();
    let mut key = match registry {
        Some(reg) => format!("{reg}/{path}"),
        None => path,
    };
    match (tag, &digest) {
        (Some(t), _) => {
            key.push(':');
            key.push_str(t);
        }
        (None, None) => key.push_str(":latest"),
        (None, Some(_)) => {}
    }
    if let Some(d) = digest {
        key.push('@');
        key.push_str(&d);
    }
    Ok(ImageKey(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> String {
        normalize(s).unwrap_or_else(|e| panic!("{e}")).0
    }

    #[test]
    fn the_three_runtime_forms_are_one_image() {
        let want = "polardb/polardb_pg_engine_release:11.9.20210910.73ec28a8.20211019155239";
        for form in [
            "polardb/polardb_pg_engine_release:11.9.20210910.73ec28a8.20211019155239",
            "docker.io/polardb/polardb_pg_engine_release:11.9.20210910.73ec28a8.20211019155239",
            "localhost/polardb/polardb_pg_engine_release:11.9.20210910.73ec28a8.20211019155239",
            "index.docker.io/polardb/polardb_pg_engine_release:11.9.20210910.73ec28a8.20211019155239",
        ] {
            assert_eq!(k(form), want, "{form}");
        }
        assert_eq!(k("busybox"), "busybox:latest");
        assert_eq!(k("docker.io/library/busybox:1"), "busybox:1");
        assert_eq!(k("library/busybox:1"), "busybox:1");
    }

    #[test]
    fn different_images_stay_different() {
        assert_ne!(k("polardb/engine:1"), k("polardb/engine:2"));
        assert_ne!(k("polardb/engine:1"), k("polardb/engine2:1"));
        assert_ne!(k("polardb/engine:1"), k("reg.example.com/polardb/engine:1"));
        assert_ne!(k("polardb/engine:1"), k("localhost:5000/polardb/engine:1"));
        assert_eq!(k("localhost:5000/polardb/engine:1"), "localhost:5000/polardb/engine:1");
        assert_ne!(k("polardb/engine"), k("polardb/engine:1"));
        assert_eq!(k("polardb/engine@sha256:ABC"), "polardb/engine@sha256:abc");
    }

    #[test]
    fn junk_is_refused() {
        for bad in ["", "  ", "a b:1", "polardb/:1", "/x", "x:", "http://x/y", "x@nodigest"] {
            assert!(normalize(bad).is_err(), "{bad:?}");
        }
    }
}
