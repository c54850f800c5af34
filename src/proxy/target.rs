//! The request target: the one canonical form of a path the gateway routes and forwards, the
//! form of it the audit trail and logs may hold (no value from a URL, ever), and the ids a query
//! names.
//!
//! A path is routed and forwarded byte for byte as received, so what is checked is exactly what
//! Greenhouse gets. Paths that servers and frameworks read in different ways are refused
//! instead of normalised: empty segments (`//`), dot segments (`.`, `..`), `;` parameters, a
//! backslash, and percent-encoded `.`, `/`, `\`, `;` or NUL.

use crate::spec::{Operation, Spec};

/// Why a path is not canonical: `None` when it is.
pub fn non_canonical(path: &str) -> Option<&'static str> {
    const WHY: &str = "the path must be canonical: no empty or dot segments, no `;` parameters, \
                       no backslash and no percent-encoded `.`, `/`, `\\`, `;` or NUL";
    let rest = path.strip_prefix('/')?;
    if path.contains(['\\', ';']) {
        return Some(WHY);
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    for (i, s) in segments.iter().enumerate() {
        // A trailing slash is an ordinary (unrouted) path; an empty segment inside is not.
        if (s.is_empty() && i != last) || *s == "." || *s == ".." {
            return Some(WHY);
        }
        if encoded_bytes(s).any(|b| matches!(b, b'.' | b'/' | b'\\' | b';' | 0)) {
            return Some(WHY);
        }
    }
    None
}

/// The bytes a string spells as `%XX`.
fn encoded_bytes(s: &str) -> impl Iterator<Item = u8> + '_ {
    s.as_bytes().windows(3).filter_map(|w| {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (w[0], hex(w[1]), hex(w[2])) {
            (b'%', Some(hi), Some(lo)) => u8::try_from(hi * 16 + lo).ok(),
            _ => None,
        }
    })
}

/// The path for the audit record and logs: the prefix and the matched operation's template, or,
/// for a path that matches none, each segment that is literally a segment of the prefix or of a
/// template with every other segment replaced by `*`. Query parameters by name only: a name the
/// operation (or, unrouted, any operation) declares, every other name `*`; never a value.
pub fn audit_path(
    spec: &Spec,
    prefix: &str,
    path: &str,
    query: Option<&str>,
    op: Option<&Operation>,
) -> String {
    let mut out = match path.strip_prefix(prefix) {
        Some(rest) if rest.starts_with('/') => format!("{prefix}{}", spec.redacted_path(rest)),
        Some("") => prefix.to_string(),
        _ => {
            let known: Vec<&str> = prefix.split('/').collect();
            let mut out = String::new();
            for (i, s) in path.split('/').enumerate().skip(1) {
                out.push('/');
                out.push_str(if s.is_empty() || known.get(i) == Some(&s) {
                    s
                } else {
                    "*"
                });
            }
            out
        }
    };
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        out.push('?');
        for (i, (name, _)) in form_urlencoded::parse(q.as_bytes()).enumerate() {
            if i > 0 {
                out.push('&');
            }
            let declared = match op {
                Some(op) => op.declares_query(&name),
                None => spec.operations().iter().any(|o| o.declares_query(&name)),
            };
            out.push_str(if declared { &name } else { "*" });
        }
    }
    out
}

/// The ids a query names, for their own audit fields: `candidate_ids` and `external_ids` when
/// the operation declares them (comma-separated or repeated; at most 1000 of each).
#[derive(Debug, Default, PartialEq)]
pub struct QueryIds {
    pub candidate_ids: Vec<i64>,
    pub external_ids: Vec<String>,
}

/// The longest external id recorded from a query, in bytes; longer ones are not ids the API
/// could hold, and are left out.
const MAX_EXTERNAL_ID_BYTES: usize = 255;

pub fn query_ids(op: &Operation, query: Option<&str>) -> QueryIds {
    let mut ids = QueryIds::default();
    let Some(q) = query else { return ids };
    let wants_candidates = op.declares_query("candidate_ids");
    let wants_external = op.declares_query("external_ids");
    for (name, value) in form_urlencoded::parse(q.as_bytes()) {
        let values = value.split(',').map(str::trim).filter(|v| !v.is_empty());
        if name == "candidate_ids" && wants_candidates {
            for id in values.filter_map(|v| v.parse::<i64>().ok()) {
                if ids.candidate_ids.len() < 1000 && !ids.candidate_ids.contains(&id) {
                    ids.candidate_ids.push(id);
                }
            }
        } else if name == "external_ids" && wants_external {
            for id in values.filter(|v| v.len() <= MAX_EXTERNAL_ID_BYTES) {
                if ids.external_ids.len() < 1000 && !ids.external_ids.iter().any(|e| e == id) {
                    ids.external_ids.push(id.to_string());
                }
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec::builtin().unwrap_or_else(|e| panic!("builtin spec: {e:?}"))
    }

    #[test]
    fn ambiguous_paths_are_not_canonical_and_plain_ones_are() {
        for bad in [
            "/v1/partner//jobs",
            "//v1/partner/jobs",
            "/v1/partner/./jobs",
            "/v1/partner/x/../jobs",
            "/v1/partner/..",
            "/v1/partner/%2e%2e/jobs",
            "/v1/partner/%2E/jobs",
            "/v1/partner/jobs%2fx",
            "/v1/partner/jobs%2Fx",
            "/v1/partner/jobs%5cx",
            "/v1/partner/jobs\\x",
            "/v1/partner/jobs;jsessionid=1",
            "/v1/partner/jobs%3bx",
            "/v1/partner/jobs%00",
        ] {
            assert!(non_canonical(bad).is_some(), "{bad} must be refused");
        }
        for good in [
            "/v1/partner/jobs",
            "/v1/partner/jobs/",
            "/v1/partner/candidates",
            "/v1/partner/x%41y",
            "/v1/partner/jobs.json%41",
            "/",
        ] {
            assert_eq!(non_canonical(good), None, "{good} is canonical");
        }
    }

    #[test]
    fn routed_path_is_its_template_and_query_keeps_declared_names_only() {
        let s = spec();
        let op = s.operation("listPartnerCandidates");
        let got = audit_path(
            &s,
            "/v1/partner",
            "/v1/partner/candidates",
            Some("external_ids=alice%40example.com&access_token=eyJ.x.y&candidate_ids=1"),
            op,
        );
        assert_eq!(got, "/v1/partner/candidates?external_ids&*&candidate_ids");
    }

    #[test]
    fn unrouted_path_keeps_only_literal_segments() {
        let s = spec();
        for (path, want) in [
            (
                "/v1/partner/candidates/alice@example.com",
                "/v1/partner/candidates/*",
            ),
            ("/v1/partner/eyJhbGciOi.x.y", "/v1/partner/*"),
            ("/v2/partner/jobs", "/*/partner/*"),
            ("/alice@example.com", "/*"),
            ("/v1/partner", "/v1/partner"),
            ("/v1/partner//jobs", "/v1/partner//jobs"),
        ] {
            assert_eq!(audit_path(&s, "/v1/partner", path, None, None), want);
        }
        assert_eq!(
            audit_path(&s, "/v1/partner", "/x", Some("email=a%40b.c&phone=1"), None),
            "/*?*&*"
        );
    }

    #[test]
    fn query_ids_come_from_declared_id_parameters_only() {
        let s = spec();
        let Some(list) = s.operation("listPartnerCandidates") else {
            panic!("listPartnerCandidates")
        };
        let ids = query_ids(
            list,
            Some("external_ids=a,b&external_ids=c&candidate_ids=1,x,2,1"),
        );
        assert_eq!(ids.external_ids, ["a", "b", "c"]);
        assert_eq!(ids.candidate_ids, [1, 2]);
        let Some(jobs) = s.operation("listPartnerJobs") else {
            panic!("listPartnerJobs")
        };
        assert_eq!(
            query_ids(jobs, Some("external_ids=a&candidate_ids=1")),
            QueryIds::default()
        );
    }
}
