//! Strict query-string parsing: unknown, repeated or malformed parameters are
//! errors that name the parameter, never silently ignored.
use std::{collections::BTreeMap, str::FromStr};

use super::error::ApiError;

pub struct Params {
    values: BTreeMap<String, String>,
}

impl Params {
    pub fn parse(raw: Option<&str>, accepted: &[&'static str]) -> Result<Self, ApiError> {
        let mut values = BTreeMap::new();
        for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            if !accepted.contains(&k.as_ref()) {
                return Err(ApiError::UnknownParam { name: k.into_owned(), accepted: accepted.join(", ") });
            }
            if values.insert(k.to_string(), v.into_owned()).is_some() {
                return Err(ApiError::DuplicateParam(k.into_owned()));
            }
        }
        Ok(Self { values })
    }

    /// An optional parameter parsed with `FromStr`; `expected` explains the
    /// accepted values in the error.
    pub fn opt<T: FromStr>(&self, name: &'static str, expected: &str) -> Result<Option<T>, ApiError> {
        self.values
            .get(name)
            .map(|v| {
                v.parse().map_err(|_| ApiError::BadParam {
                    param: name,
                    value: v.clone(),
                    reason: format!("expected {expected}"),
                })
            })
            .transpose()
    }

    /// A port number, 1 to 65535.
    pub fn port(&self, name: &'static str) -> Result<Option<u16>, ApiError> {
        let p: Option<u16> = self.opt(name, "a port number from 1 to 65535")?;
        match p {
            Some(0) => Err(ApiError::BadParam {
                param: name,
                value: "0".into(),
                reason: "expected a port number from 1 to 65535".into(),
            }),
            p => Ok(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_duplicate_and_bad_values() {
        assert!(matches!(Params::parse(Some("x=1"), &["a"]), Err(ApiError::UnknownParam { .. })));
        assert!(matches!(Params::parse(Some("a=1&a=2"), &["a"]), Err(ApiError::DuplicateParam(_))));
        let p = Params::parse(Some("a=70000&b=0&c=%41"), &["a", "b", "c"]).expect("parses");
        assert!(matches!(p.port("a"), Err(ApiError::BadParam { param: "a", .. })));
        assert!(matches!(p.port("b"), Err(ApiError::BadParam { param: "b", .. })));
        assert_eq!(p.opt::<String>("c", "text").ok().flatten().as_deref(), Some("A"));
    }
}
