//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` and `tracestate`
//! headers, parsed strictly and written in version `00`. Pure functions over header values; what
//! a request does with them is in [`super::RequestTrace`].

use http::{HeaderMap, HeaderValue};

/// `tracestate` the gateway passes on, at most (the length every participant must propagate).
pub const MAX_TRACESTATE_LEN: usize = 512;
/// Members longer than this are the first dropped when `tracestate` must be shortened.
const LONG_MEMBER: usize = 128;
/// List members a `tracestate` may have.
const MAX_MEMBERS: usize = 32;

/// A caller's `traceparent`, valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// Never zero.
    pub trace_id: u128,
    /// The caller's span; never zero.
    pub parent_id: u64,
    pub sampled: bool,
}

/// The `traceparent` of a request: none, a valid one, or why it was refused (a fixed phrase,
/// never the value, which is the caller's and goes into no log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    Absent,
    Valid(TraceParent),
    Malformed(&'static str),
}

/// Reads the request's `traceparent` header.
pub fn traceparent(headers: &HeaderMap) -> Inbound {
    let mut values = headers.get_all("traceparent").iter();
    match (values.next(), values.next()) {
        (None, _) => Inbound::Absent,
        (Some(_), Some(_)) => Inbound::Malformed("more than one traceparent header"),
        (Some(v), None) => match parse_traceparent(v.as_bytes()) {
            Ok(tp) => Inbound::Valid(tp),
            Err(why) => Inbound::Malformed(why),
        },
    }
}

/// Parses one `traceparent` value: `version-traceid-parentid-flags`, lowercase hex. Version
/// `00` is exactly 55 characters; a later version is read by the same prefix, and may carry more
/// after a `-`. `ff` is no version.
pub fn parse_traceparent(v: &[u8]) -> Result<TraceParent, &'static str> {
    if v.len() < 55 {
        return Err("traceparent is too short");
    }
    let version = hex_lc(&v[0..2]).ok_or("traceparent version is not lowercase hex")?;
    if version == 0xff {
        return Err("traceparent version ff is invalid");
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return Err("traceparent fields are not separated by '-'");
    }
    let trace_id = hex_lc(&v[3..35]).ok_or("traceparent trace-id is not 32 lowercase hex")?;
    let parent_id = hex_lc(&v[36..52]).ok_or("traceparent parent-id is not 16 lowercase hex")?;
    let flags = hex_lc(&v[53..55]).ok_or("traceparent flags are not 2 lowercase hex")?;
    if version == 0 && v.len() != 55 {
        return Err("traceparent version 00 is not 55 characters");
    }
    if v.len() > 55 && v[55] != b'-' {
        return Err("traceparent has trailing characters");
    }
    if trace_id == 0 {
        return Err("traceparent trace-id is all zeros");
    }
    if parent_id == 0 {
        return Err("traceparent parent-id is all zeros");
    }
    Ok(TraceParent {
        trace_id,
        parent_id: parent_id as u64,
        sampled: flags & 1 == 1,
    })
}

/// Lowercase hex digits (at most 32) as a number; `None` for anything else.
fn hex_lc(s: &[u8]) -> Option<u128> {
    if s.is_empty() || s.len() > 32 {
        return None;
    }
    s.iter().try_fold(0u128, |acc, &b| {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u128::from(d))
    })
}

/// `traceparent` as the gateway sends it: version `00`, only the sampled flag (the other bits
/// are not defined by version 00 and are sent as zero).
pub fn format_traceparent(trace_id: u128, span_id: u64, sampled: bool) -> HeaderValue {
    let mut b = *b"00-00000000000000000000000000000000-0000000000000000-00";
    // The slices are exactly twice the bytes encoded: these cannot fail.
    let _ = hex::encode_to_slice(trace_id.to_be_bytes(), &mut b[3..35]);
    let _ = hex::encode_to_slice(span_id.to_be_bytes(), &mut b[36..52]);
    if sampled {
        b[54] = b'1';
    }
    HeaderValue::from_bytes(&b).unwrap_or(HeaderValue::from_static(
        "00-00000000000000000000000000000000-0000000000000000-00",
    ))
}

/// The request's `tracestate`, to pass on: every header line, each member validated; `None`
/// when there is none or any member is malformed, a key repeats, or there are more than 32
/// members (then the whole header is dropped, as the spec allows). Longer than
/// [`MAX_TRACESTATE_LEN`], it is shortened as the spec says: members over 128 characters go
/// first, then members from the end.
pub fn tracestate(headers: &HeaderMap) -> Option<String> {
    let mut members: Vec<&str> = Vec::new();
    for value in headers.get_all("tracestate") {
        let text = value.to_str().ok()?;
        for m in text.split(',') {
            let m = m.trim_matches([' ', '\t']);
            if m.is_empty() {
                continue;
            }
            let (key, val) = m.split_once('=')?;
            if !valid_key(key) || !valid_value(val) {
                return None;
            }
            if members.len() == MAX_MEMBERS
                || members
                    .iter()
                    .any(|o| o.split_once('=').map(|p| p.0) == Some(key))
            {
                return None;
            }
            members.push(m);
        }
    }
    let len = |ms: &[&str]| ms.iter().map(|m| m.len()).sum::<usize>() + ms.len().saturating_sub(1);
    if len(&members) > MAX_TRACESTATE_LEN {
        members.retain(|m| m.len() <= LONG_MEMBER);
        while len(&members) > MAX_TRACESTATE_LEN {
            members.pop();
        }
    }
    (!members.is_empty()).then(|| members.join(","))
}

/// `simple-key` or `tenant@system`.
fn valid_key(key: &str) -> bool {
    let rest = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-*/".contains(&c);
    let k = key.as_bytes();
    match key.split_once('@') {
        None => {
            (1..=256).contains(&k.len())
                && k[0].is_ascii_lowercase()
                && k[1..].iter().all(|&c| rest(c))
        }
        Some((tenant, system)) => {
            let (t, s) = (tenant.as_bytes(), system.as_bytes());
            (1..=241).contains(&t.len())
                && (t[0].is_ascii_lowercase() || t[0].is_ascii_digit())
                && t[1..].iter().all(|&c| rest(c))
                && (1..=14).contains(&s.len())
                && s[0].is_ascii_lowercase()
                && s[1..].iter().all(|&c| rest(c))
        }
    }
}

/// 1 to 256 printable ASCII characters other than `,` and `=`, not ending in a space.
fn valid_value(v: &str) -> bool {
    let b = v.as_bytes();
    (1..=256).contains(&b.len())
        && b.iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
        && b.last() != Some(&b' ')
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(name: &'static str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(
                name,
                HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("")),
            );
        }
        h
    }

    #[test]
    fn a_valid_traceparent_is_read_with_its_ids_and_sampled_flag() {
        assert_eq!(
            parse_traceparent(VALID.as_bytes()),
            Ok(TraceParent {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                parent_id: 0x00f067aa0ba902b7,
                sampled: true,
            })
        );
        let unsampled = VALID.replace("-01", "-00");
        assert_eq!(
            parse_traceparent(unsampled.as_bytes()).map(|t| t.sampled),
            Ok(false)
        );
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-010",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(
                parse_traceparent(bad.as_bytes()).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_version_00_prefix() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-adds";
        assert_eq!(
            parse_traceparent(v.as_bytes()).map(|t| t.trace_id),
            Ok(0x4bf92f3577b34da6a3ce929d0e0e4736)
        );
        let short = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(parse_traceparent(short.as_bytes()).is_ok());
    }

    #[test]
    fn two_traceparent_headers_are_malformed() {
        assert!(matches!(
            traceparent(&headers("traceparent", &[VALID, VALID])),
            Inbound::Malformed(_)
        ));
        assert_eq!(traceparent(&HeaderMap::new()), Inbound::Absent);
    }

    #[test]
    fn format_writes_version_00_with_only_the_sampled_flag() {
        assert_eq!(
            format_traceparent(0x4bf92f3577b34da6a3ce929d0e0e4736, 0xb7, true),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00000000000000b7-01"
        );
        assert_eq!(
            format_traceparent(1, 2, false),
            "00-00000000000000000000000000000001-0000000000000002-00"
        );
    }

    #[test]
    fn tracestate_members_of_every_line_are_kept_in_order_without_blanks() {
        let h = headers(
            "tracestate",
            &[
                "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7",
                " ,tenant1@vendor=x y",
            ],
        );
        assert_eq!(
            tracestate(&h).as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7,tenant1@vendor=x y")
        );
        assert_eq!(tracestate(&HeaderMap::new()), None);
    }

    #[test]
    fn a_tracestate_with_any_bad_member_is_dropped_whole() {
        for bad in [
            "Congo=1",
            "congo=",
            "congo",
            "congo=a,congo=b",
            "congo=a=b",
            "congo=tab\tinside",
            "1abc=x",
            "t@Vendor=x",
            "t@averyveryverylongsystem=x",
        ] {
            assert_eq!(tracestate(&headers("tracestate", &[bad])), None, "{bad:?}");
        }
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert_eq!(tracestate(&headers("tracestate", &[&many.join(",")])), None);
        let exactly: Vec<String> = (0..32).map(|i| format!("k{i}=v")).collect();
        assert!(tracestate(&headers("tracestate", &[&exactly.join(",")])).is_some());
    }

    #[test]
    fn a_long_tracestate_loses_long_members_first_then_members_from_the_end() {
        let long = format!("big={}", "x".repeat(200));
        let mut members = vec!["a=1".to_string(), long];
        for i in 0..30 {
            members.push(format!("m{i:02}={}", "y".repeat(20)));
        }
        let out = tracestate(&headers("tracestate", &[&members.join(",")])).unwrap_or_default();
        assert!(out.len() <= MAX_TRACESTATE_LEN, "{}", out.len());
        assert!(out.starts_with("a=1,m00="), "{out}");
        assert!(!out.contains("big="));
        // Whole members only, in their order.
        assert!(out.split(',').all(|m| members.iter().any(|o| o == m)));
        let kept = out.split(',').count();
        assert!(kept < 31 && kept > 15, "{kept}");
    }
}
