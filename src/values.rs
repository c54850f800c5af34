//! Small value types parsed from strings: durations, rates, secrets; and bytes written as hex.
//!
//! Below everything else in the crate: this module imports nothing from it, so configuration,
//! quotas, the audit trail and the command line can all share these types without depending on
//! one another (the quota limiter needs a `Rate`, not the configuration loader).

use std::fmt;
use std::time::Duration;

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"2d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("\"{s}\" has no unit (use ms, s, m, h or d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("\"{s}\" does not start with a whole number"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => {
            return Err(format!(
                "\"{s}\" has an unknown unit \"{unit}\" (use ms, s, m, h or d)"
            ));
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("\"{s}\" is too large"))
}

/// A rate: `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

/// Written so that [`parse_rate`] reads it back as the same rate.
impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.per.as_millis();
        match ms {
            1_000 => write!(f, "{}/s", self.count),
            60_000 => write!(f, "{}/m", self.count),
            3_600_000 => write!(f, "{}/h", self.count),
            ms if ms % 1_000 == 0 => write!(f, "{}/{}s", self.count, ms / 1_000),
            ms => write!(f, "{}/{}ms", self.count, ms),
        }
    }
}

/// Parses `"N/s"`, `"N/m"`, `"N/h"` or `"N/10s"`.
pub fn parse_rate(s: &str) -> Result<Rate, String> {
    let (n, per) = s
        .trim()
        .split_once('/')
        .ok_or_else(|| format!("\"{s}\" is not a rate like \"20/s\""))?;
    let count: u32 = n
        .trim()
        .parse()
        .map_err(|_| format!("\"{s}\": the count must be a whole number"))?;
    if count == 0 {
        return Err(format!("\"{s}\": the count must be at least 1"));
    }
    let per = per.trim();
    let per = match per {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => parse_duration(other).map_err(|e| format!("\"{s}\": {e}"))?,
    };
    if per.is_zero() {
        return Err(format!("\"{s}\": the period must be longer than zero"));
    }
    Ok(Rate { count, per })
}

/// A secret resolved from the environment, a file or (dev only) the config itself. Its `Debug`
/// and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `bytes` as lowercase hex. One table lookup per byte into a buffer sized up front (the `hex`
/// crate's `encode` collects an iterator of `char`s, several times the instructions for the ids
/// and digests every request writes).
pub fn lower_hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    // The buffer is exactly twice the input: this cannot fail, and hex digits are ASCII.
    let _ = hex::encode_to_slice(bytes, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_hex_writes_every_byte_as_two_lowercase_digits() {
        assert_eq!(lower_hex(&[]), "");
        assert_eq!(lower_hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(lower_hex(&all), hex::encode(&all));
    }

    #[test]
    fn durations_with_each_unit_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn duration_without_unit_or_with_unknown_unit_is_refused() {
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("3x").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn rates_in_every_form_parse() {
        assert_eq!(
            parse_rate("20/s"),
            Ok(Rate {
                count: 20,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(
            parse_rate("50/10s"),
            Ok(Rate {
                count: 50,
                per: Duration::from_secs(10)
            })
        );
        assert_eq!(
            parse_rate("100/h").map(|r| r.per),
            Ok(Duration::from_secs(3600))
        );
        assert_eq!(
            parse_rate("50/10s").map(|r| r.to_string()),
            Ok("50/10s".to_string())
        );
    }

    #[test]
    fn displayed_rates_parse_back_to_the_same_rate() {
        for s in ["5/s", "5/m", "5/h", "50/10s", "5/500ms", "3/1500ms", "7/2d"] {
            let r = parse_rate(s).unwrap_or(Rate {
                count: 0,
                per: Duration::ZERO,
            });
            assert_eq!(parse_rate(&r.to_string()), Ok(r), "{s} -> {r}");
        }
    }

    #[test]
    fn zero_or_malformed_rates_are_refused() {
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("5").is_err());
        assert!(parse_rate("5/0s").is_err());
        assert!(parse_rate("x/s").is_err());
    }

    #[test]
    fn secret_never_shows_its_value_in_debug_or_display() {
        let s = Secret::new("hunter2-canary");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2-canary");
    }
}
