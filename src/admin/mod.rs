//! The admin listener: `/healthz`, `/readyz`, `/metrics`. Loopback by default; when a token is
//! configured, `/metrics` needs it as a bearer token (health and readiness stay open for probes).

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::pipeline::Gateway;

/// Reasons the gateway is not ready; empty when it is.
pub fn not_ready(gw: &Gateway) -> Vec<String> {
    let mut out = gw.verifier.not_ready();
    out.extend(gw.credentials.not_ready());
    out
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

fn authorized(gw: &Gateway, req: &Request<Incoming>) -> bool {
    let Some(token) = &gw.config.admin.token else {
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

pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
        "/metrics" if authorized(&gw, &req) => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            gw.metrics.render(),
        ),
        "/metrics" => text(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "admin token required\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}
