//! Deciding the one `On-Behalf-Of` value the upstream receives.
//!
//! Precedence: the caller's header (only when it is in `allowed`), then `from_claim` (checked
//! against `allowed` when that is set), then `default`. Whatever is chosen must be a syntactically
//! valid email made of printable ASCII, so no claim or header can smuggle CR, LF or any control
//! character into an upstream header.

use http::HeaderValue;
use serde_json::{Map, Value};

/// A team's `[on_behalf_of]`.
#[derive(Debug, Clone, Default)]
pub struct OboPolicy {
    pub default: Option<String>,
    pub allowed: Vec<String>,
    pub from_claim: Option<String>,
}

/// A conservative email syntax check: `local@domain`, printable ASCII without spaces, quotes,
/// angle brackets or commas, a dotted domain of letters, digits and hyphens, at most 254 bytes.
pub fn is_valid_email(s: &str) -> bool {
    if s.is_empty() || s.len() > 254 {
        return false;
    }
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    local_ok && domain_ok
}

/// Why no `On-Behalf-Of` could be decided; each becomes 403 `on_behalf_of_not_allowed` with this
/// text as the detail (which never repeats the submitted value).
pub type OboRefusal = &'static str;

/// Where a decided `On-Behalf-Of` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OboSource {
    /// The caller's `On-Behalf-Of` header, found in the team's `allowed` list (or its default).
    Header,
    /// The token claim named by `from_claim`.
    Claim,
    /// The team's `default`.
    Default,
}

impl OboSource {
    pub fn describe(self) -> &'static str {
        match self {
            OboSource::Header => "the caller's On-Behalf-Of header, which the team allows",
            OboSource::Claim => "the token claim named by on_behalf_of.from_claim",
            OboSource::Default => "the team's on_behalf_of.default",
        }
    }
}

/// Decides the `On-Behalf-Of` value for a request.
pub fn decide_on_behalf_of(
    policy: &OboPolicy,
    headers: &[&HeaderValue],
    claims: &Map<String, Value>,
) -> Result<String, OboRefusal> {
    decide_on_behalf_of_why(policy, headers, claims).map(|(value, _)| value)
}

/// [`decide_on_behalf_of`], saying where the value came from.
pub fn decide_on_behalf_of_why(
    policy: &OboPolicy,
    headers: &[&HeaderValue],
    claims: &Map<String, Value>,
) -> Result<(String, OboSource), OboRefusal> {
    let default = || policy.default.clone().map(|d| (d, OboSource::Default));
    match headers {
        [] => {}
        [one] => {
            let Ok(value) = one.to_str() else {
                return Err("the On-Behalf-Of header is not a valid email address");
            };
            if !is_valid_email(value) {
                return Err("the On-Behalf-Of header is not a valid email address");
            }
            return find_allowed(policy, value)
                .map(|v| (v, OboSource::Header))
                .ok_or("the team may not act on behalf of the requested user");
        }
        _ => return Err("more than one On-Behalf-Of header"),
    }
    if let Some(claim) = &policy.from_claim {
        let value = match claims.get(claim) {
            None | Some(Value::Null) => {
                return default()
                    .ok_or("the token has no On-Behalf-Of claim and the team has no default");
            }
            Some(Value::String(v)) => v,
            Some(_) => return Err("the token's On-Behalf-Of claim is not a single email address"),
        };
        if !is_valid_email(value) {
            return Err("the token's On-Behalf-Of claim is not a valid email address");
        }
        if policy.allowed.is_empty() {
            return Ok((value.clone(), OboSource::Claim));
        }
        return find_allowed(policy, value)
            .map(|v| (v, OboSource::Claim))
            .ok_or("the token's user is not one the team may act for");
    }
    default().ok_or("no On-Behalf-Of was given and the team has no default")
}

/// The configured spelling of an allowed address (emails compare case-insensitively). The default
/// counts as allowed.
fn find_allowed(policy: &OboPolicy, value: &str) -> Option<String> {
    policy
        .allowed
        .iter()
        .chain(policy.default.iter())
        .find(|a| a.eq_ignore_ascii_case(value))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Addresses are spelled with (at) in this source and turned into real ones here, so that
    // tools which mangle email addresses in text leave the tests intact.
    fn e(s: &str) -> String {
        s.replace("(at)", "@")
    }

    fn policy() -> OboPolicy {
        OboPolicy {
            default: Some(e("integration(at)example.com")),
            allowed: vec![e("recruiter.one(at)example.com")],
            from_claim: None,
        }
    }

    fn no_claims() -> Map<String, Value> {
        Map::new()
    }

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(&e(s)).unwrap_or(HeaderValue::from_static("x"))
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn email_syntax_accepts_ordinary_and_refuses_hostile_values() {
        assert!(is_valid_email(&e("ops(at)example.com")));
        assert!(is_valid_email(&e("first.last+tag(at)sub.example.co.uk")));
        for bad in [
            "",
            "no-at-sign",
            "a(at)b",
            "a(at)(at)b.com",
            "a b(at)c.com",
            "a(at)b.com\r\nX-Evil: 1",
            "a(at)b.com\n",
            "a\nb(at)c.com",
            "\"q\"(at)b.com",
            "<a(at)b.com>",
            "a(at)-b.com",
            ".a(at)b.com",
            "\u{e9}(at)b.com",
        ] {
            assert!(!is_valid_email(&e(bad)), "{bad:?} accepted");
        }
    }

    #[test]
    fn no_header_takes_the_default() {
        assert_eq!(
            decide_on_behalf_of(&policy(), &[], &no_claims()),
            Ok(e("integration(at)example.com"))
        );
    }

    #[test]
    fn allowed_header_is_used_in_its_configured_spelling() {
        let h = hv("Recruiter.One(at)Example.com");
        assert_eq!(
            decide_on_behalf_of(&policy(), &[&h], &no_claims()),
            Ok(e("recruiter.one(at)example.com"))
        );
    }

    #[test]
    fn header_not_in_allowed_is_refused() {
        let h = hv("someone.else(at)example.com");
        assert!(decide_on_behalf_of(&policy(), &[&h], &no_claims()).is_err());
    }

    #[test]
    fn two_headers_are_refused_even_when_both_allowed() {
        let h = hv("recruiter.one(at)example.com");
        assert!(decide_on_behalf_of(&policy(), &[&h, &h], &no_claims()).is_err());
    }

    #[test]
    fn header_with_control_characters_is_refused() {
        let h = HeaderValue::from_bytes(e("recruiter.one(at)example.com\tx").as_bytes())
            .unwrap_or(HeaderValue::from_static("x"));
        assert!(decide_on_behalf_of(&policy(), &[&h], &no_claims()).is_err());
    }

    #[test]
    fn from_claim_is_used_and_checked_against_allowed() {
        let p = OboPolicy {
            from_claim: Some("email".into()),
            ..policy()
        };
        let ok = json!({"email": e("recruiter.one(at)example.com")});
        let bad = json!({"email": e("someone.else(at)example.com")});
        let inj = json!({"email": e("recruiter.one(at)example.com\r\nX-Evil: 1")});
        assert_eq!(
            decide_on_behalf_of(&p, &[], &obj(ok)),
            Ok(e("recruiter.one(at)example.com"))
        );
        assert!(decide_on_behalf_of(&p, &[], &obj(bad)).is_err());
        assert!(decide_on_behalf_of(&p, &[], &obj(inj)).is_err());
    }

    #[test]
    fn from_claim_missing_falls_back_to_default() {
        let p = OboPolicy {
            from_claim: Some("email".into()),
            ..policy()
        };
        assert_eq!(
            decide_on_behalf_of(&p, &[], &no_claims()),
            Ok(e("integration(at)example.com"))
        );
    }

    #[test]
    fn from_claim_that_is_not_a_string_is_refused_not_defaulted() {
        let p = OboPolicy {
            from_claim: Some("email".into()),
            ..policy()
        };
        let c = obj(json!({"email": [e("recruiter.one(at)example.com")]}));
        assert!(decide_on_behalf_of(&p, &[], &c).is_err());
    }

    #[test]
    fn from_claim_without_allowed_list_accepts_any_valid_email() {
        let p = OboPolicy {
            default: None,
            allowed: vec![],
            from_claim: Some("email".into()),
        };
        let c = obj(json!({"email": e("anyone(at)example.com")}));
        assert_eq!(
            decide_on_behalf_of(&p, &[], &c),
            Ok(e("anyone(at)example.com"))
        );
    }

    #[test]
    fn no_header_no_claim_no_default_is_refused() {
        let p = OboPolicy::default();
        assert!(decide_on_behalf_of(&p, &[], &no_claims()).is_err());
    }
}
