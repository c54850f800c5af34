//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/admin/teams`, `/admin/reload`.
//! Loopback by default. With `admin.token`, every path needs it as a bearer token, the probes
//! included: `greenhouse-gateway healthcheck --config` reads the token from the same config and
//! sends it, so container health checks keep working without the token in a manifest.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::gateway::Gateway;
use crate::metrics::{Format, Sampled};

/// Reasons the gateway is not ready; empty when it is.
pub fn not_ready(gw: &Gateway) -> Vec<String> {
    gw.not_ready()
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = text(
        StatusCode::UNAUTHORIZED,
        "text/plain",
        "admin token required\n",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer realm=\"greenhouse-gateway admin\""),
    );
    r
}

fn authorized(gw: &Gateway, req: &Request<Incoming>) -> bool {
    let policy = gw.policy();
    let Some(token) = &policy.config.admin.token else {
        return true;
    };
    let expected = format!("Bearer {}", token.expose());
    req.headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| constant_time_eq(v.as_bytes(), expected.as_bytes()))
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Each team's policy and live quota usage.
fn teams_json(gw: &Gateway) -> serde_json::Value {
    let policy = gw.policy();
    let usage = policy.quotas.snapshot();
    let teams: Vec<serde_json::Value> = policy
        .config
        .teams
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name,
                "description": t.description,
                "operations": t.operations,
                "credential": t.credential,
                "on_behalf_of": {
                    "default": t.on_behalf_of.default,
                    "allowed": t.on_behalf_of.allowed,
                    "from_claim": t.on_behalf_of.from_claim,
                },
                "validation": t.validation.as_str(),
                "quota": usage.get("teams").and_then(|u| u.get(&t.name)).cloned().unwrap_or(serde_json::Value::Null),
            })
        })
        .collect();
    serde_json::json!({"generation": policy.generation, "teams": teams, "quota_backend": usage.get("backend").cloned().unwrap_or_default(), "upstream_budget": usage.get("upstream").cloned().unwrap_or_default()})
}

pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    // Before anything else, so that without the token not even which paths exist is told.
    if !authorized(&gw, &req) {
        return unauthorized();
    }
    if req.uri().path() == "/admin/reload" {
        return reload(&gw, &req).await;
    }
    if req.method() != http::Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            let reasons = not_ready(&gw);
            let body =
                serde_json::json!({"ready": reasons.is_empty(), "reasons": reasons}).to_string();
            let status = if reasons.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, "application/json", body)
        }
        "/metrics" => {
            let accept = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = Format::negotiate(accept);
            let sampled = Sampled {
                audit_queue_depth: gw.runtime.audit.queue_depth(),
                quota_backend_errors: gw.policy().quotas.backend_errors(),
            };
            let mut r = text(
                StatusCode::OK,
                format.content_type(),
                gw.runtime.metrics.expose(format, &sampled),
            );
            r.headers_mut()
                .insert(header::VARY, http::HeaderValue::from_static("Accept"));
            r
        }
        "/admin/teams" => text(
            StatusCode::OK,
            "application/json",
            teams_json(&gw).to_string(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// `POST /admin/reload`: the same as SIGHUP, answered with the outcome: 200 with the new
/// generation, or 422 with every problem (the running configuration stays in force).
async fn reload(gw: &Gateway, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != http::Method::POST {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use POST /admin/reload\n",
        );
        r.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return r;
    }
    match gw.reload().await {
        Ok(generation) => text(
            StatusCode::OK,
            "application/json",
            serde_json::json!({"result": "success", "generation": generation}).to_string(),
        ),
        Err(e) => text(
            StatusCode::UNPROCESSABLE_ENTITY,
            "application/json",
            serde_json::json!({
                "result": e.result(),
                "generation": gw.policy().generation,
                "problems": e.problems(),
            })
            .to_string(),
        ),
    }
}
