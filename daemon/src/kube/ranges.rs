//! The watched port ranges: the annotations of the operator's
//! `polardb4mpd-controller` ConfigMap (docs/compat.md "Inputs").
//!
//! Every annotation value shaped `a-b`, `a+n` (a and the n ports after it) or
//! `p` is a range, inclusive at both ends, as the operator reads it
//! (PolarDB-Stack-Common `business/adapter/port_range.go`; the original
//! daemon dropped the upper bound and ignored single ports). Every valid
//! range is watched whatever its width: the limit that matters is the
//! ConfigMap's 1 MiB, which the publisher enforces loudly.
//! `polarbox.mpd.reserved.port.ranges` is a comma list of the same forms
//! that the operator never hands out: it is reported, not watched. A bad
//! value is skipped with a reason; the rest apply. A range that runs past
//! 65535 (the operator does not check) is watched up to 65535, with a note.
use std::{collections::BTreeMap, ops::RangeInclusive};

use serde::Serialize;

/// Annotation that lists reserved ports rather than a range to watch.
pub const RESERVED_KEY: &str = "polarbox.mpd.reserved.port.ranges";

/// The operator's shipped ranges, used while its ConfigMap does not exist so
/// the ports it would hand out are still published.
pub const DEFAULT_RANGES: &[(u16, u16)] =
    &[(5400, 5800), (15400, 15800), (16000, 16400), (30000, 32999), (33000, 35999), (36000, 39999)];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("{value:?} is not a port or a range like 5400-5800")]
    NotARange { value: String },
    #[error("{value:?}: ports are 1 to 65535")]
    OutOfBounds { value: String },
    #[error("{value:?}: the range is reversed")]
    Reversed { value: String },
    /// Not a skip: the range is watched up to 65535.
    #[error("{value:?} runs past 65535: watched up to 65535")]
    PastTheLastPort { value: String },
}

/// Ranges by the annotation that named them, plus the reserved list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PortRanges {
    pub watched: Vec<NamedRange>,
    pub reserved: Vec<NamedRange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedRange {
    pub source: String,
    pub from: u16,
    pub to: u16,
}

impl NamedRange {
    pub fn range(&self) -> RangeInclusive<u16> {
        self.from..=self.to
    }
}

impl PortRanges {
    pub fn defaults() -> Self {
        let watched =
            DEFAULT_RANGES.iter().map(|&(from, to)| NamedRange { source: "default".into(), from, to }).collect();
        Self { watched, reserved: Vec::new() }
    }

    pub fn contains(&self, port: u16) -> bool {
        self.watched.iter().any(|r| r.range().contains(&port))
    }

    /// Reads the annotations. Returns the ranges and, for each value that was
    /// skipped or cut at 65535, the annotation key and why.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> (Self, Vec<(String, RangeError)>) {
        let mut out = Self::default();
        let mut problems = Vec::new();
        let mut take = |key: &String, v: &str, list: &mut Vec<NamedRange>| match parse_range(v) {
            Ok(Parsed { from, to, clamped }) => {
                list.push(NamedRange { source: key.clone(), from, to });
                if clamped {
                    problems.push((key.clone(), RangeError::PastTheLastPort { value: v.into() }));
                }
            }
            Err(e) => problems.push((key.clone(), e)),
        };
        for (key, value) in annotations {
            if key == RESERVED_KEY {
                for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                    take(key, item, &mut out.reserved);
                }
                continue;
            }
            // Only values that look like port ranges are candidates; other
            // annotations (kubectl's last-applied JSON, descriptions) are not
            // mistakes to warn about.
            let v = value.trim();
            if v.is_empty() || !v.starts_with(|c: char| c.is_ascii_digit()) {
                continue;
            }
            take(key, v, &mut out.watched);
        }
        (out, problems)
    }
}

/// A number of the range; ports are 1 to 65535, but an end past 65535 is
/// kept as it is for the caller to clamp.
fn number(s: &str, whole: &str) -> Result<u32, RangeError> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RangeError::NotARange { value: whole.into() });
    }
    s.parse::<u32>().map_err(|_| RangeError::OutOfBounds { value: whole.into() })
}

/// A parsed range, clamped to 65535.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub from: u16,
    pub to: u16,
    /// The range ran past 65535.
    pub clamped: bool,
}

/// `a-b`, `a+n` (a and the n ports after it) or `p`.
pub fn parse_range(v: &str) -> Result<Parsed, RangeError> {
    let (from, to) = if let Some((a, b)) = v.split_once('-') {
        (number(a, v)?, number(b, v)?)
    } else if let Some((a, n)) = v.split_once('+') {
        let from = number(a, v)?;
        (from, from.saturating_add(number(n, v)?))
    } else {
        let p = number(v, v)?;
        (p, p)
    };
    if from == 0 || from > 65535 {
        return Err(RangeError::OutOfBounds { value: v.into() });
    }
    if from > to {
        return Err(RangeError::Reversed { value: v.into() });
    }
    let clamped = to > 65535;
    Ok(Parsed { from: from as u16, to: to.min(65535) as u16, clamped })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn ranges_are_inclusive_and_single_ports_count() {
        let (r, skipped) = PortRanges::from_annotations(&ann(&[("a", "5400-5800"), ("b", "6000")]));
        assert!(skipped.is_empty());
        assert!(r.contains(5400) && r.contains(5800) && r.contains(6000));
        assert!(!r.contains(5399) && !r.contains(5801) && !r.contains(6001));
    }

    #[test]
    fn bad_values_are_skipped_with_a_reason_and_the_rest_apply() {
        let (r, skipped) = PortRanges::from_annotations(&ann(&[
            ("ok", "30000-30010"),
            ("reversed", "200-100"),
            ("zero", "0-10"),
            ("big", "65000-70000"),
            ("huge", "99999-100000"),
            ("junk", "12ab"),
            ("note", "owned by the operator"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{\"a\":1}"),
        ]));
        assert_eq!(
            r.watched,
            vec![
                NamedRange { source: "big".into(), from: 65000, to: 65535 },
                NamedRange { source: "ok".into(), from: 30000, to: 30010 },
            ]
        );
        let why: BTreeMap<_, _> = skipped.into_iter().collect();
        assert!(matches!(why["reversed"], RangeError::Reversed { .. }));
        assert!(matches!(why["zero"], RangeError::OutOfBounds { .. }));
        assert!(matches!(why["big"], RangeError::PastTheLastPort { .. }), "kept, cut at 65535");
        assert!(matches!(why["huge"], RangeError::OutOfBounds { .. }));
        assert!(matches!(why["junk"], RangeError::NotARange { .. }));
        assert_eq!(why.len(), 5, "prose and JSON annotations are not ranges: {why:?}");
    }

    #[test]
    fn every_width_and_the_operators_plus_form_are_watched() {
        let (r, problems) =
            PortRanges::from_annotations(&ann(&[("all", "1-65535"), ("plus", "40000+20000"), ("one", "6000+0")]));
        assert!(problems.is_empty(), "{problems:?}");
        let got: Vec<_> = r.watched.iter().map(|n| (n.source.as_str(), n.from, n.to)).collect();
        assert_eq!(got, vec![("all", 1, 65535), ("one", 6000, 6000), ("plus", 40000, 60000)]);
        assert!(r.contains(60000) && !r.contains(0));
    }

    #[test]
    fn reserved_list_forms() {
        let (r, skipped) = PortRanges::from_annotations(&ann(&[(RESERVED_KEY, "5432, 5500-5510,6000+2,x")]));
        let got: Vec<_> = r.reserved.iter().map(|n| (n.from, n.to)).collect();
        assert_eq!(got, vec![(5432, 5432), (5500, 5510), (6000, 6002)]);
        assert_eq!(skipped.len(), 1);
        assert!(r.watched.is_empty(), "reserved ports are not watched ranges");
    }
}
