//! Engine versions from their ConfigMaps (docs/compat.md "Inputs"): the version
//! name is `data.name`; its images are the values of every data key whose
//! name contains `Image` after position 0 (`pgEngineImage`, `pfsdImage`, ...).
use std::collections::BTreeMap;

use serde::Serialize;

use super::image_ref::{normalize, ImageKey, RefError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EngineVersion {
    pub name: String,
    /// The ConfigMap it came from (`namespace/name`).
    pub source: String,
    /// Data key -> reference as written, and its canonical key.
    pub images: Vec<VersionImage>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionImage {
    pub key: String,
    pub reference: String,
    #[serde(skip)]
    pub canonical: ImageKey,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("no `name` in data")]
    NoName,
    #[error("no image keys (data keys containing `Image` after the first letter)")]
    NoImages,
    #[error("data key {key:?}: {source}")]
    BadImage { key: String, source: RefError },
    #[error("version name {name:?} is not a plain name (no commas or spaces)")]
    BadName { name: String },
}

fn is_image_key(k: &str) -> bool {
    k.find("Image").is_some_and(|i| i > 0)
}

/// One ConfigMap's version, or why it is skipped.
pub fn parse(source: &str, data: &BTreeMap<String, String>) -> Result<EngineVersion, VersionError> {
    let name = data.get("name").map(|n| n.trim()).filter(|n| !n.is_empty()).ok_or(VersionError::NoName)?;
    // The name is joined with commas into existingVersions.
    if name.contains(',') || name.chars().any(char::is_whitespace) {
        return Err(VersionError::BadName { name: name.to_owned() });
    }
    let mut images = Vec::new();
    for (k, v) in data.iter().filter(|(k, _)| is_image_key(k)) {
        let canonical = normalize(v).map_err(|source| VersionError::BadImage { key: k.clone(), source })?;
        images.push(VersionImage { key: k.clone(), reference: v.trim().to_owned(), canonical });
    }
    if images.is_empty() {
        return Err(VersionError::NoImages);
    }
    Ok(EngineVersion { name: name.to_owned(), source: source.to_owned(), images })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn name_and_image_keys_by_the_original_rule() {
        let v = parse(
            "kube-system/v1",
            &data(&[
                ("name", "11.9.20210910"),
                ("pgEngineImage", "polardb/polardb_pg_engine_release:11.9"),
                ("pfsdImage", "polardb/pfsd:1"),
                ("Image", "not/an-image-key:1"),
                ("imageTag", "ignored"),
                ("description", "x"),
            ]),
        )
        .expect("version");
        assert_eq!(v.name, "11.9.20210910");
        let keys: Vec<_> = v.images.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, vec!["pfsdImage", "pgEngineImage"]);
    }

    #[test]
    fn skipped_with_a_reason() {
        assert_eq!(parse("s", &data(&[("pgEngineImage", "a:1")])), Err(VersionError::NoName));
        assert_eq!(parse("s", &data(&[("name", "v")])), Err(VersionError::NoImages));
        assert!(matches!(
            parse("s", &data(&[("name", "v"), ("pgEngineImage", "bad ref")])),
            Err(VersionError::BadImage { .. })
        ));
        assert!(matches!(
            parse("s", &data(&[("name", "a,b"), ("pgEngineImage", "a:1")])),
            Err(VersionError::BadName { .. })
        ));
    }
}
