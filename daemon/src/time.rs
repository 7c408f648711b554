//! UTC timestamps in the layouts the API and the original's ConfigMaps use,
//! without a calendar dependency.
use std::time::{SystemTime, UNIX_EPOCH};

/// `YYYY-MM-DDTHH:MM:SSZ` in UTC (the original's `updateTimestamp` layout).
pub fn utc_seconds(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86400) as i64);
    let rem = secs % 86400;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (RFC 3339, milliseconds) for the native API.
pub fn rfc3339_millis(t: SystemTime) -> String {
    let ms = t.duration_since(UNIX_EPOCH).map(|d| d.subsec_millis()).unwrap_or(0);
    let s = utc_seconds(t);
    format!("{}.{ms:03}Z", &s[..s.len() - 1])
}

/// serde helper: an instant as RFC 3339.
pub fn serialize_rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339_millis(*t))
}

/// serde helper: an optional instant as RFC 3339, or null.
pub fn serialize_opt_rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&rfc3339_millis(*t)),
        None => s.serialize_none(),
    }
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn known_instants() {
        assert_eq!(utc_seconds(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_millis(951_782_400_123); // 2000-02-29
        assert_eq!(utc_seconds(t), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_millis(t), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc_seconds(UNIX_EPOCH + Duration::from_secs(1_795_305_599)), "2026-11-21T23:59:59Z");
    }
}
