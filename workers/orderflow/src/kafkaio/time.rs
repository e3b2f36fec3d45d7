//! Record times as text: RFC 3339 UTC with milliseconds ([`rfc3339`]) for output, and RFC 3339
//! with `Z` or a numeric offset ([`parse_rfc3339_ms`]) for the command line.

use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};

/// `ms` since the epoch as RFC 3339 UTC with milliseconds (`2025-11-21T09:26:01.123Z`).
pub fn rfc3339(ms: i64) -> String {
    match u64::try_from(ms) {
        Ok(ms) => humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string(),
        Err(_) => format!("{ms} ms"),
    }
}

/// RFC 3339 to ms since the epoch: `Z` or a numeric `±HH:MM` offset.
///
/// Errors: no time zone, a malformed offset or time.
pub fn parse_rfc3339_ms(t: &str) -> Result<i64> {
    // humantime takes UTC (`Z`) only; a numeric offset is applied here.
    let (utc, offset_s): (String, i64) = if t.ends_with('Z') || t.ends_with('z') {
        (t.to_string(), 0)
    } else if t.len() > 6 && matches!(&t.as_bytes()[t.len() - 6], b'+' | b'-') && t.as_bytes()[t.len() - 3] == b':' {
        let (base, off) = t.split_at(t.len() - 6);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let h: i64 = off[1..3].parse().context("offset hours")?;
        let m: i64 = off[4..6].parse().context("offset minutes")?;
        (format!("{base}Z"), sign * (h * 3600 + m * 60))
    } else {
        bail!("no time zone (Z or ±HH:MM)");
    };
    let st = humantime::parse_rfc3339(&utc)?;
    let ms = match st.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis())?,
        Err(e) => -i64::try_from(e.duration().as_millis())?,
    };
    Ok(ms - offset_s * 1000)
}
