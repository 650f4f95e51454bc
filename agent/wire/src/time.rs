//! Time on the wire: protobuf timestamps checked into `SystemTime`, and display that never
//! panics whatever a peer sent.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 9999-12-31T23:59:59Z: the last second a job timestamp may name.
pub const MAX_TIMESTAMP_SECS: i64 = 253_402_300_799;

/// A job timestamp as a `SystemTime`; before 1970 or after 9999-12-31 is an error, so no time
/// arithmetic on it can overflow.
pub fn timestamp(t: &prost_types::Timestamp) -> Result<SystemTime, String> {
    if t.seconds < 0 {
        return Err(format!("{}s is before 1970", t.seconds));
    }
    if t.seconds > MAX_TIMESTAMP_SECS {
        return Err(format!("{}s is after 9999-12-31", t.seconds));
    }
    let nanos = u32::try_from(t.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| format!("nanos {} is outside 0..1e9", t.nanos))?;
    // In range by the checks above; checked anyway, as all time arithmetic here is.
    UNIX_EPOCH
        .checked_add(Duration::new(t.seconds.unsigned_abs(), nanos))
        .ok_or_else(|| format!("{}s is not representable", t.seconds))
}

/// Unix seconds as RFC 3339, for display; never panics (humantime's formatter errors past
/// 9999, and `UNIX_EPOCH + d` overflows), whatever a report or an agent sent.
pub fn rfc3339_secs(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) if secs <= MAX_TIMESTAMP_SECS => {
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string()
        }
        _ => format!("(time out of range: {secs}s)"),
    }
}

/// `t + d`, saturating at the far future instead of overflowing.
pub fn plus(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_add(d)
        .unwrap_or_else(|| UNIX_EPOCH + Duration::from_secs(MAX_TIMESTAMP_SECS.unsigned_abs()))
}
