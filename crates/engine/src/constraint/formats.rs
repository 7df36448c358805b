//! RFC 3339 dates and times, enforced exactly.
//!
//! llguidance's patterns for the `date`, `time` and `date-time` formats accept a few strings RFC
//! 3339 (and JSON Schema validators) reject: February 29 of any year, year 0000, second 60 at any
//! minute; and fractional seconds of any length, so a sampled model can write digits until it runs
//! out of tokens. Before compiling, such a format becomes a `pattern` that accepts only valid
//! values: days per month, February 29 in leap years only, seconds 00–59, at most nine fractional
//! digits, and a time zone (`Z` or an offset), as JSON Schema's `time` requires.

use serde_json::Value;

/// Years 0001–9999.
const YEAR: &str = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})";
/// Month and day, February 29 excluded (see [`LEAP_DAY`]).
const MONTH_DAY: &str =
    "(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))";
/// February 29 of a leap year: divisible by 4 but not by 100, or divisible by 400.
const LEAP_DAY: &str = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00)-02-29";
const TIME: &str =
    "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])";

fn date() -> String {
    format!("(?:{YEAR}-{MONTH_DAY}|{LEAP_DAY})")
}

/// The anchored pattern for a format, if it is one of the three.
fn pattern(format: &str) -> Option<String> {
    match format {
        "date" => Some(format!("^{}$", date())),
        "time" => Some(format!("^{TIME}$")),
        "date-time" => Some(format!("^{}T{TIME}$", date())),
        _ => None,
    }
}

/// Keywords whose values are data, not schemas: left as they are.
const DATA_KEYWORDS: [&str; 4] = ["const", "enum", "examples", "default"];

/// Replaces every date/time `format` without a `pattern` of its own by the exact pattern.
pub(crate) fn strict_date_time(schema: &mut Value) {
    match schema {
        Value::Object(obj) => {
            let f = obj.get("format").and_then(Value::as_str).and_then(pattern);
            if let (Some(p), false) = (f, obj.contains_key("pattern")) {
                obj.remove("format");
                obj.insert("pattern".into(), Value::String(p));
            }
            for (k, v) in obj.iter_mut() {
                if !DATA_KEYWORDS.contains(&k.as_str()) {
                    strict_date_time(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strict_date_time),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constraint::tests::{accepts, synth};
    use crate::constraint::ConstraintSpec;

    fn schema_accepts(format: &str, value: &str) -> bool {
        let m = synth();
        let spec = ConstraintSpec::JsonSchema(serde_json::json!({"type": "string", "format": format}));
        accepts(m, &spec, &format!("\"{value}\""))
    }

    #[test]
    fn dates_follow_the_calendar() {
        for ok in ["2024-02-29", "2000-02-29", "1999-12-31", "0001-01-01", "2023-04-30"] {
            assert!(schema_accepts("date", ok), "{ok}");
        }
        for bad in ["2023-02-29", "1900-02-29", "0000-01-01", "2023-04-31", "2023-13-01", "2023-00-10", "2023-1-1"] {
            assert!(!schema_accepts("date", bad), "{bad}");
        }
    }

    #[test]
    fn times_have_valid_seconds_bounded_fractions_and_a_zone() {
        for ok in ["14:44:59Z", "00:00:00+05:30", "23:59:59.123456789-08:00"] {
            assert!(schema_accepts("time", ok), "{ok}");
        }
        for bad in ["14:44:60Z", "24:00:00Z", "12:00:00", "12:00:00.1234567890Z", "12:60:00Z"] {
            assert!(!schema_accepts("time", bad), "{bad}");
        }
        assert!(schema_accepts("date-time", "2024-02-29T12:00:00Z"));
        assert!(!schema_accepts("date-time", "2023-02-29T12:00:00Z"));
    }

    #[test]
    fn only_schemas_are_rewritten() {
        let mut s = serde_json::json!({
            "type": "object",
            "properties": {
                "when": {"type": "string", "format": "date"},
                "own": {"type": "string", "format": "date", "pattern": "^2024"},
                "mail": {"type": "string", "format": "email"},
                "format": {"const": {"format": "date"}},
            },
            "$defs": {"t": {"format": "time"}},
        });
        strict_date_time(&mut s);
        assert!(s["properties"]["when"]["pattern"].as_str().unwrap().starts_with("^(?:"));
        assert!(s["properties"]["when"].get("format").is_none());
        assert_eq!(s["properties"]["own"]["format"], "date");
        assert_eq!(s["properties"]["mail"]["format"], "email");
        assert_eq!(s["properties"]["format"]["const"], serde_json::json!({"format": "date"}));
        assert!(s["$defs"]["t"]["pattern"].is_string());
    }
}
