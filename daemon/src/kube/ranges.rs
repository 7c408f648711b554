//! The watched port ranges: the annotations of the operator's
//! `polardb4mpd-controller` ConfigMap (COMPAT.md "Inputs").
//!
//! Every annotation value shaped `a-b` or `p` is a range, inclusive at both
//! ends, as the operator reads it (the original daemon dropped the upper
//! bound and ignored single ports). `polarbox.mpd.reserved.port.ranges` is a
//! comma list of `a-b`, `a+n` or `p` that the operator never hands out: it is
//! reported, not watched. A bad value is skipped with a reason; the rest apply.
use std::{collections::BTreeMap, ops::RangeInclusive};

use serde::Serialize;

/// Annotation that lists reserved ports rather than a range to watch.
pub const RESERVED_KEY: &str = "polarbox.mpd.reserved.port.ranges";

/// A range wider than this is taken for a typo, not a plan: publishing every
/// taken port of 1-65535 could outgrow the 1 MiB ConfigMap limit, and no
/// shipped range is wider than 3,000 ports.
pub const MAX_RANGE_WIDTH: u32 = 16_384;

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
    #[error("{value:?}: a range of {width} ports is wider than {MAX_RANGE_WIDTH}")]
    TooWide { value: String, width: u32 },
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
    /// skipped, the annotation key and why.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> (Self, Vec<(String, RangeError)>) {
        let mut out = Self::default();
        let mut skipped = Vec::new();
        for (key, value) in annotations {
            if key == RESERVED_KEY {
                for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                    match parse_reserved(item) {
                        Ok((from, to)) => out.reserved.push(NamedRange { source: key.clone(), from, to }),
                        Err(e) => skipped.push((key.clone(), e)),
                    }
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
            match parse_range(v) {
                Ok((from, to)) => out.watched.push(NamedRange { source: key.clone(), from, to }),
                Err(e) => skipped.push((key.clone(), e)),
            }
        }
        (out, skipped)
    }
}

fn port(s: &str, whole: &str) -> Result<u16, RangeError> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RangeError::NotARange { value: whole.into() });
    }
    match s.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(RangeError::OutOfBounds { value: whole.into() }),
    }
}

fn checked(from: u16, to: u16, whole: &str) -> Result<(u16, u16), RangeError> {
    if from > to {
        return Err(RangeError::Reversed { value: whole.into() });
    }
    let width = u32::from(to) - u32::from(from) + 1;
    if width > MAX_RANGE_WIDTH {
        return Err(RangeError::TooWide { value: whole.into(), width });
    }
    Ok((from, to))
}

/// `a-b` or `p`.
pub fn parse_range(v: &str) -> Result<(u16, u16), RangeError> {
    match v.split_once('-') {
        Some((a, b)) => checked(port(a, v)?, port(b, v)?, v),
        None => {
            let p = port(v, v)?;
            Ok((p, p))
        }
    }
}

/// `a-b`, `a+n` (a and the n ports after it) or `p`.
pub fn parse_reserved(v: &str) -> Result<(u16, u16), RangeError> {
    match v.split_once('+') {
        Some((a, n)) => {
            let from = port(a, v)?;
            let n: u32 = n.trim().parse().map_err(|_| RangeError::NotARange { value: v.into() })?;
            let to = u16::try_from(u32::from(from) + n).map_err(|_| RangeError::OutOfBounds { value: v.into() })?;
            checked(from, to, v)
        }
        None => parse_range(v),
    }
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
            ("wide", "1-65535"),
            ("junk", "12ab"),
            ("note", "owned by the operator"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{\"a\":1}"),
        ]));
        assert_eq!(r.watched, vec![NamedRange { source: "ok".into(), from: 30000, to: 30010 }]);
        let why: BTreeMap<_, _> = skipped.into_iter().collect();
        assert!(matches!(why["reversed"], RangeError::Reversed { .. }));
        assert!(matches!(why["zero"], RangeError::OutOfBounds { .. }));
        assert!(matches!(why["big"], RangeError::OutOfBounds { .. }));
        assert!(matches!(why["wide"], RangeError::TooWide { width: 65535, .. }));
        assert!(matches!(why["junk"], RangeError::NotARange { .. }));
        assert_eq!(why.len(), 5, "prose and JSON annotations are not ranges: {why:?}");
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
