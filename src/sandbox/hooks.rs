//! The test-hook surface under `/_sandbox/`, so tests in any language can drive the sandbox
//! with plain HTTP:
//!
//! | request | effect |
//! |---|---|
//! | `GET /_sandbox/requests` | `{"requests":[..],"token_requests":[..],"jwks_requests":N}` |
//! | `DELETE /_sandbox/requests` | forgets recorded requests |
//! | `POST /_sandbox/mint` `{"claims":{..},"lifetime_secs":N}` | `{"token":".."}` |
//! | `GET /_sandbox/faults` | the current fault switches |
//! | `POST /_sandbox/faults` `{"latency_ms":N,"fail_next":{"count":N,"status":S},"token_fail_next":{..},"revoke_tokens":true,"jwks_available":B,"reset":true}` | sets them (all keys optional) |
//! | `POST /_sandbox/rotate_key` `{"keep_old":B}` | `{"kid":".."}` |
//! | `GET /_sandbox/users` | the seeded users, with `enabled` |
//! | `GET /_sandbox/candidates` | every stored candidate |

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{Method, Response, StatusCode};
use serde_json::{Map, Value, json};

use super::RecordedRequest;
use super::respond::{Body, empty, json};
use super::state::Shared;

/// Default lifetime of a token minted through the hook.
const DEFAULT_MINT_LIFETIME_SECS: u64 = 3600;

pub(crate) fn handle(shared: &Shared, parts: &Parts, body: &Bytes) -> Response<Body> {
    let hook = parts
        .uri
        .path()
        .strip_prefix("/_sandbox")
        .unwrap_or_default();
    let method = &parts.method;
    let answer = match hook {
        "/requests" if method == Method::GET => Ok(json(StatusCode::OK, &requests(shared))),
        "/requests" if method == Method::DELETE => {
            shared.clear_log();
            Ok(empty(StatusCode::NO_CONTENT))
        }
        "/mint" if method == Method::POST => mint(shared, body),
        "/faults" if method == Method::GET => Ok(json(StatusCode::OK, &shared.faults.describe())),
        "/faults" if method == Method::POST => faults(shared, body),
        "/rotate_key" if method == Method::POST => rotate_key(shared, body),
        "/users" if method == Method::GET => Ok(json(
            StatusCode::OK,
            &serde_json::to_value(&shared.users).unwrap_or_default(),
        )),
        "/candidates" if method == Method::GET => {
            Ok(json(StatusCode::OK, &Value::Array(shared.all_candidates())))
        }
        "/requests" | "/mint" | "/faults" | "/rotate_key" | "/users" | "/candidates" => Err((
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed".to_owned(),
        )),
        _ => Err((StatusCode::NOT_FOUND, "no such sandbox hook".to_owned())),
    };
    answer.unwrap_or_else(|(status, message)| json(status, &json!({ "error": message })))
}

type HookResult = Result<Response<Body>, (StatusCode, String)>;

fn bad_request(message: impl Into<String>) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, message.into())
}

/// The body as a JSON object; an empty body counts as `{}`.
fn object_body(body: &Bytes) -> Result<Map<String, Value>, (StatusCode, String)> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(bad_request("the body must be a JSON object")),
    }
}

fn requests(shared: &Shared) -> Value {
    let render = |requests: Vec<RecordedRequest>| {
        requests
            .into_iter()
            .map(|r| {
                json!({
                    "method": r.method,
                    "path": r.path,
                    "query": r.query,
                    "headers": r.headers,
                    "body": String::from_utf8_lossy(&r.body),
                })
            })
            .collect::<Vec<_>>()
    };
    json!({
        "requests": render(shared.partner_requests()),
        "token_requests": render(shared.token_requests()),
        "jwks_requests": shared.jwks_hits.load(Ordering::Relaxed),
    })
}

fn mint(shared: &Shared, body: &Bytes) -> HookResult {
    let request = object_body(body)?;
    let claims = match request.get("claims") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(claims @ Value::Object(_)) => claims.clone(),
        Some(_) => return Err(bad_request("claims must be an object")),
    };
    let lifetime = match request.get("lifetime_secs") {
        None | Some(Value::Null) => DEFAULT_MINT_LIFETIME_SECS,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad_request("lifetime_secs must be a non-negative integer"))?,
    };
    let token = shared
        .keys
        .mint(&shared.issuer, claims, Duration::from_secs(lifetime))
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(json(StatusCode::OK, &json!({ "token": token })))
}

/// Reads `{"count":N,"status":S}`; `count` defaults to 1.
fn pending(key: &str, value: &Value) -> Result<(u32, u16), (StatusCode, String)> {
    let shape = || bad_request(format!("{key} must be {{\"count\":N,\"status\":S}}"));
    let object = value.as_object().ok_or_else(shape)?;
    let count = match object.get("count") {
        None => 1,
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(shape)?,
    };
    let status = object
        .get("status")
        .and_then(Value::as_u64)
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(shape)?;
    Ok((count, status))
}

fn faults(shared: &Shared, body: &Bytes) -> HookResult {
    let request = object_body(body)?;
    // Everything is checked before any switch moves, so a typo changes nothing.
    let flag = |key: &str, value: &Value| {
        value
            .as_bool()
            .ok_or_else(|| bad_request(format!("{key} must be true or false")))
    };
    let mut latency = None;
    let mut fail_next = None;
    let mut token_fail_next = None;
    let mut revoke = false;
    let mut jwks = None;
    let mut reset = false;
    for (key, value) in &request {
        match key.as_str() {
            "latency_ms" => {
                let ms = value
                    .as_u64()
                    .ok_or_else(|| bad_request("latency_ms must be a non-negative integer"))?;
                latency = Some(Duration::from_millis(ms));
            }
            "fail_next" => fail_next = Some(pending(key, value)?),
            "token_fail_next" => token_fail_next = Some(pending(key, value)?),
            "revoke_tokens" => revoke = flag(key, value)?,
            "jwks_available" => jwks = Some(flag(key, value)?),
            "reset" => reset = flag(key, value)?,
            other => return Err(bad_request(format!("unknown key {other}"))),
        }
    }
    let faults = &shared.faults;
    if reset {
        faults.reset();
    }
    if let Some(latency) = latency {
        faults.set_latency(latency);
    }
    if let Some((count, status)) = fail_next {
        faults.fail_next(count, status);
    }
    if let Some((count, status)) = token_fail_next {
        faults.token_endpoint_fail(count, status);
    }
    if let Some(up) = jwks {
        faults.set_jwks_available(up);
    }
    if revoke {
        shared.revoke_all_tokens();
    }
    Ok(json(StatusCode::OK, &faults.describe()))
}

fn rotate_key(shared: &Shared, body: &Bytes) -> HookResult {
    let request = object_body(body)?;
    let keep_old = match request.get("keep_old") {
        None => true,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| bad_request("keep_old must be true or false"))?,
    };
    let kid = shared
        .keys
        .rotate(keep_old)
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(json(StatusCode::OK, &json!({ "kid": kid })))
}
