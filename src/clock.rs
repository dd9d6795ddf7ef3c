//! Time. The database keeps whole seconds since the Unix epoch; the API speaks
//! RFC 3339 in UTC with a `Z`, whole seconds (`2024-01-15T10:30:00Z`).

use std::time::{SystemTime, UNIX_EPOCH};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

/// Seconds since the epoch, now.
pub fn now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(before) => -(before.duration().as_secs() as i64),
    }
}

/// `2024-01-15T10:30:00Z`. Seconds outside years 0000-9999 cannot be stored
/// (parse refuses them), so formatting cannot fail for a stored value; the
/// fallback is the epoch rather than a panic.
pub fn format(ts: i64) -> String {
    let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| t.format(fmt).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_string())
}

/// Any RFC 3339 timestamp, normalised to UTC and truncated to whole seconds.
pub fn parse(s: &str) -> Option<i64> {
    OffsetDateTime::parse(s, &Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// Serde adapter: a timestamp field written and read as RFC 3339.
pub mod rfc3339 {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ts: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*ts))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        super::parse(&s).ok_or_else(|| de::Error::custom("not an RFC 3339 timestamp"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_whole_seconds() {
        assert_eq!(format(0), "1970-01-01T00:00:00Z");
        assert_eq!(format(1_705_314_600), "2024-01-15T10:30:00Z");
    }

    #[test]
    fn parses_offsets_and_fractions_to_utc_seconds() {
        assert_eq!(parse("2024-01-15T10:30:00Z"), Some(1_705_314_600));
        assert_eq!(parse("2024-01-15T12:30:00.999+02:00"), Some(1_705_314_600));
        assert_eq!(parse("2024-01-15 10:30:00"), None);
        assert_eq!(parse("yesterday"), None);
    }

    #[test]
    fn round_trips() {
        for ts in [0, 1, 1_705_314_600, 253_402_300_799] {
            assert_eq!(parse(&format(ts)), Some(ts));
        }
    }
}
