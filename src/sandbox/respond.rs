//! Response builders shared by every sandbox surface, and the little clock helpers they need.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::{Value, json};

/// The body type of every sandbox response.
pub(crate) type Body = Full<Bytes>;

/// The `WWW-Authenticate` value on every 401 the sandbox sends.
pub(crate) const BASIC_CHALLENGE: &str = "Basic realm=\"Greenhouse\"";

/// A JSON response with the given status.
pub(crate) fn json(status: StatusCode, value: &Value) -> Response<Body> {
    // Serialising a `Value` cannot fail (its map keys are strings).
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// A response with no body.
pub(crate) fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// One entry of a Greenhouse `errors` array.
pub(crate) fn error_entry(message: &str, field: Option<&str>) -> Value {
    match field {
        Some(field) => json!({ "message": message, "field": field }),
        None => json!({ "message": message }),
    }
}

/// A Greenhouse-style error: `{"errors":[{"message":..,"field":..}]}`.
pub(crate) fn gh_error(status: StatusCode, message: &str, field: Option<&str>) -> Response<Body> {
    gh_errors(status, vec![error_entry(message, field)])
}

/// A Greenhouse-style error with several entries.
pub(crate) fn gh_errors(status: StatusCode, entries: Vec<Value>) -> Response<Body> {
    let mut resp = json(status, &json!({ "errors": entries }));
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(BASIC_CHALLENGE),
        );
    }
    resp
}

/// 405 with an `Allow` header.
pub(crate) fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = gh_error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", None);
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `secs_from_now` seconds from now as an RFC 3339 UTC timestamp.
pub(crate) fn rfc3339_in(secs_from_now: u64) -> String {
    rfc3339(SystemTime::now() + Duration::from_secs(secs_from_now))
}

/// An RFC 3339 UTC timestamp with second precision, e.g. `2026-05-01T12:00:00Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        let at = |s| rfc3339(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(at(4_102_444_800), "2100-01-01T00:00:00Z");
    }
}
