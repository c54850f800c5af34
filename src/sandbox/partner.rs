//! The Partner API under `/v1/partner`, in the shapes of the seed OpenAPI spec.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use serde_json::{Map, Value, json};

use super::respond::{
    Body, error_entry, gh_error, gh_errors, json, method_not_allowed, rfc3339_in,
};
use super::state::{RateDecision, Shared, User};

/// Where the Partner API lives on the sandbox.
pub const BASE_PATH: &str = "/v1/partner";

/// How long a tracking link stays valid.
const TRACKING_LINK_LIFETIME_SECS: u64 = 30 * 24 * 3600;

/// Answers one Partner API request.
pub(crate) async fn handle(shared: &Shared, parts: &Parts, body: &Bytes) -> Response<Body> {
    // Injected faults come first: they model the network and Greenhouse itself.
    let latency = shared.faults.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some(status) = shared.faults.take_partner_failure() {
        return injected_failure(status);
    }

    // 1. The credential: a bearer token we issued, or a Basic partner key.
    let Some(credential) = authenticate(shared, &parts.headers) else {
        return gh_error(StatusCode::UNAUTHORIZED, "Invalid credentials", None);
    };
    // 2. The credential's rate-limit window; every answer from here on carries its counters.
    let decision = shared.count_request(&credential);
    let mut resp = if let RateDecision::Limited { .. } = decision {
        gh_error(
            StatusCode::TOO_MANY_REQUESTS,
            "Rate limit exceeded; retry after the window resets",
            None,
        )
    } else {
        // 3. The acting user, then 4. the operation.
        match acting_user(shared, &parts.headers) {
            Ok(user) => route(shared, parts, body, user),
            Err(why) => gh_error(StatusCode::UNAUTHORIZED, why, Some("On-Behalf-Of")),
        }
    };
    rate_headers(resp.headers_mut(), decision);
    resp
}

/// The rate-limit key of a valid credential: `client:<id>` or `key:<index>`.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Option<String> {
    let mut all = headers.get_all(header::AUTHORIZATION).iter();
    let value = all.next()?;
    if all.next().is_some() {
        return None;
    }
    let (scheme, credentials) = value.to_str().ok()?.split_once(' ')?;
    let credentials = credentials.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return shared
            .token_client(credentials)
            .map(|client| format!("client:{client}"));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = String::from_utf8(STANDARD.decode(credentials).ok()?).ok()?;
        // The partner key is the user name; the password is empty.
        let (key, password) = decoded.split_once(':')?;
        if !password.is_empty() {
            return None;
        }
        let index = shared.partner_keys.iter().position(|k| k == key)?;
        return Some(format!("key:{index}"));
    }
    None
}

/// The enabled user named by the single `On-Behalf-Of` header, or why there is none.
fn acting_user<'a>(shared: &'a Shared, headers: &HeaderMap) -> Result<&'a User, &'static str> {
    let mut all = headers.get_all("on-behalf-of").iter();
    let value = all.next().ok_or("On-Behalf-Of header is required")?;
    if all.next().is_some() {
        return Err("On-Behalf-Of must be sent exactly once");
    }
    let email = value
        .to_str()
        .map_err(|_| "On-Behalf-Of is not a valid email address")?;
    match shared.user_by_email(email.trim()) {
        None => Err("On-Behalf-Of names no Greenhouse user"),
        Some(user) if !user.enabled => Err("On-Behalf-Of user is disabled"),
        Some(user) => Ok(user),
    }
}

fn route(shared: &Shared, parts: &Parts, body: &Bytes, user: &User) -> Response<Body> {
    let operation = parts.uri.path().strip_prefix(BASE_PATH).unwrap_or_default();
    let method = &parts.method;
    match operation {
        "/candidates" if method == Method::GET => list_candidates(shared, parts.uri.query()),
        "/candidates" if method == Method::POST => create_candidates(shared, body),
        "/candidates" => method_not_allowed("GET, POST"),
        "/current_user" if method == Method::GET => json(
            StatusCode::OK,
            &json!({ "id": user.id, "name": user.name, "email": user.email }),
        ),
        "/jobs" if method == Method::GET => json(
            StatusCode::OK,
            &serde_json::to_value(&shared.jobs).unwrap_or_default(),
        ),
        "/prospect_pools" if method == Method::GET => json(
            StatusCode::OK,
            &serde_json::to_value(&shared.pools).unwrap_or_default(),
        ),
        "/current_user" | "/jobs" | "/prospect_pools" => method_not_allowed("GET"),
        "/tracking_link" if method == Method::POST => tracking_link(shared, body),
        "/tracking_link" => method_not_allowed("POST"),
        _ => not_found(),
    }
}

/// `GET /candidates?candidate_ids=1,2&external_ids=a,b`: the union of both matches.
fn list_candidates(shared: &Shared, query: Option<&str>) -> Response<Body> {
    let mut ids = Vec::new();
    let mut external_ids = Vec::new();
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let items = value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect::<Vec<_>>();
        match name.as_ref() {
            "candidate_ids" => {
                for item in items {
                    let Ok(id) = item.parse::<u64>() else {
                        return gh_error(
                            StatusCode::BAD_REQUEST,
                            "candidate_ids must be a comma-separated list of integers",
                            Some("candidate_ids"),
                        );
                    };
                    ids.push(id);
                }
            }
            "external_ids" => external_ids.extend(items),
            _ => {}
        }
    }
    json(
        StatusCode::OK,
        &Value::Array(shared.find_candidates(&ids, &external_ids)),
    )
}

/// `POST /candidates`: one candidate object, or an array of them (all or nothing).
fn create_candidates(shared: &Shared, body: &Bytes) -> Response<Body> {
    let Ok(parsed) = serde_json::from_slice::<Value>(body) else {
        return invalid_json();
    };
    let (items, batch) = match parsed {
        Value::Array(items) => (items, true),
        single => (vec![single], false),
    };
    if items.is_empty() {
        return gh_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "at least one candidate is required",
            None,
        );
    }
    let mut errors = Vec::new();
    let mut candidates = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let prefix = if batch {
            format!("[{index}].")
        } else {
            String::new()
        };
        match item {
            Value::Object(candidate) => {
                validate_candidate(shared, &candidate, &prefix, &mut errors);
                candidates.push(candidate);
            }
            _ => errors.push(error_entry("a candidate must be a JSON object", None)),
        }
    }
    if !errors.is_empty() {
        return gh_errors(StatusCode::UNPROCESSABLE_ENTITY, errors);
    }
    let mut created = shared.create_candidates(candidates);
    let body = if batch {
        Value::Array(created)
    } else {
        created.pop().unwrap_or_default()
    };
    json(shared.create_status, &body)
}

/// Checks a seed-shape `PartnerCandidate`, pushing one error entry per problem.
fn validate_candidate(
    shared: &Shared,
    c: &Map<String, Value>,
    prefix: &str,
    errors: &mut Vec<Value>,
) {
    let mut fail = |field: &str, message: &str| {
        errors.push(error_entry(message, Some(&format!("{prefix}{field}"))));
    };
    for field in ["external_id", "first_name", "last_name"] {
        match c.get(field) {
            None | Some(Value::Null) => fail(field, &format!("{field} is required")),
            Some(Value::String(s)) if s.trim().is_empty() => {
                fail(field, &format!("{field} must not be blank"));
            }
            Some(Value::String(_)) => {}
            Some(_) => fail(field, &format!("{field} must be a string")),
        }
    }
    for field in ["company", "title"] {
        if c.get(field).is_some_and(|v| !v.is_string() && !v.is_null()) {
            fail(field, &format!("{field} must be a string"));
        }
    }
    for field in [
        "emails",
        "phone_numbers",
        "social_media_addresses",
        "attachments",
    ] {
        if c.get(field).is_some_and(|v| !v.is_array() && !v.is_null()) {
            fail(field, &format!("{field} must be an array"));
        }
    }
    match c.get("application") {
        None | Some(Value::Null) => {}
        Some(Value::Object(application)) => match application.get("job_id") {
            None | Some(Value::Null) => {}
            Some(job) => match job.as_u64() {
                Some(id) if shared.job(id).is_some() => {}
                Some(_) => fail("application.job_id", "no such job"),
                None => fail("application.job_id", "job_id must be an integer"),
            },
        },
        Some(_) => fail("application", "application must be an object"),
    }
    match c.get("prospect") {
        None | Some(Value::Null) => {}
        Some(Value::Object(prospect)) => {
            let pool_id = prospect.get("prospect_pool_id").filter(|v| !v.is_null());
            let stage_id = prospect.get("prospect_stage_id").filter(|v| !v.is_null());
            let pool = match pool_id.map(Value::as_u64) {
                None => None,
                Some(Some(id)) => {
                    let pool = shared.pool(id);
                    if pool.is_none() {
                        fail("prospect.prospect_pool_id", "no such prospect pool");
                    }
                    pool
                }
                Some(None) => {
                    fail(
                        "prospect.prospect_pool_id",
                        "prospect_pool_id must be an integer",
                    );
                    None
                }
            };
            match stage_id.map(Value::as_u64) {
                None => {}
                Some(Some(id)) => {
                    let known = match pool {
                        Some(pool) => pool.stages.iter().any(|s| s.id == id),
                        None => shared
                            .pools
                            .iter()
                            .any(|p| p.stages.iter().any(|s| s.id == id)),
                    };
                    if !known {
                        fail(
                            "prospect.prospect_stage_id",
                            "no such stage in the prospect pool",
                        );
                    }
                }
                Some(None) => {
                    fail(
                        "prospect.prospect_stage_id",
                        "prospect_stage_id must be an integer",
                    );
                }
            }
        }
        Some(_) => fail("prospect", "prospect must be an object"),
    }
}

/// `POST /tracking_link`: `{job_id?, source_id?, external_id?}` → 201 `{url, expires_at}`.
fn tracking_link(shared: &Shared, body: &Bytes) -> Response<Body> {
    let Ok(parsed) = serde_json::from_slice::<Value>(body) else {
        return invalid_json();
    };
    let Value::Object(request) = parsed else {
        return gh_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be a JSON object",
            None,
        );
    };
    let present = |field: &str| request.get(field).filter(|v| !v.is_null());
    let mut errors = Vec::new();
    for field in ["job_id", "source_id"] {
        if present(field).is_some_and(|v| v.as_u64().is_none()) {
            errors.push(error_entry(
                &format!("{field} must be an integer"),
                Some(field),
            ));
        }
    }
    if present("external_id").is_some_and(|v| !v.is_string()) {
        errors.push(error_entry(
            "external_id must be a string",
            Some("external_id"),
        ));
    }
    if !errors.is_empty() {
        return gh_errors(StatusCode::UNPROCESSABLE_ENTITY, errors);
    }
    if let Some(job_id) = present("job_id").and_then(Value::as_u64)
        && shared.job(job_id).is_none()
    {
        return gh_error(StatusCode::NOT_FOUND, "Not found", Some("job_id"));
    }
    let slug = format!("{:012x}", rand::random::<u64>() >> 16);
    json(
        StatusCode::CREATED,
        &json!({
            "url": format!("https://grnh.se/{slug}"),
            "expires_at": rfc3339_in(TRACKING_LINK_LIFETIME_SECS),
        }),
    )
}

/// The Greenhouse 404 body, also used for unknown paths outside the API.
pub(crate) fn not_found() -> Response<Body> {
    gh_error(StatusCode::NOT_FOUND, "Not found", None)
}

fn invalid_json() -> Response<Body> {
    gh_error(
        StatusCode::BAD_REQUEST,
        "Your request included invalid JSON.",
        None,
    )
}

fn injected_failure(status: u16) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let message = match status.as_u16() {
        400 => "Bad request",
        401 => "Invalid credentials",
        403 => "Forbidden",
        404 => "Not found",
        429 => "Rate limit exceeded",
        500..=599 => "Internal error",
        _ => "Injected fault",
    };
    let mut resp = gh_error(status, message, None);
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1u32));
    }
    resp
}

const LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

fn rate_headers(headers: &mut HeaderMap, decision: RateDecision) {
    match decision {
        RateDecision::Unlimited => {}
        RateDecision::Allowed {
            limit,
            remaining,
            reset_epoch,
        } => {
            headers.insert(LIMIT, HeaderValue::from(limit));
            headers.insert(REMAINING, HeaderValue::from(remaining));
            headers.insert(RESET, HeaderValue::from(reset_epoch));
        }
        RateDecision::Limited {
            limit,
            retry_after,
            reset_epoch,
        } => {
            headers.insert(LIMIT, HeaderValue::from(limit));
            headers.insert(REMAINING, HeaderValue::from(0u32));
            headers.insert(RESET, HeaderValue::from(reset_epoch));
            headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
    }
}
