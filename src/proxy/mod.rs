//! Forwarding: header hygiene in both directions and the upstream call.

pub mod body;
pub mod deadline;
pub mod encoding;
pub mod target;

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;

use crate::error::GatewayError;
use crate::http_client::{HttpClient, error_chain, full_body};

/// Hop-by-hop headers (RFC 9110 section 7.6.1 and the usual proxy extras).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Headers a caller may never pass on: its own credentials and cookies, anything claiming to be
/// forwarding information, the identity we decide ourselves, framing we recompute, and its trace
/// context (the upstream's parent is the gateway's span, not the caller's).
const CALLER_ONLY: [&str; 10] = [
    "authorization",
    "cookie",
    "on-behalf-of",
    "forwarded",
    "x-real-ip",
    "host",
    "content-length",
    "x-request-id",
    "traceparent",
    "tracestate",
];

/// Whether a caller's header goes on to Greenhouse: not hop-by-hop (fixed or listed in
/// `Connection`), not one the caller may never pass on, no `X-Forwarded-*` of its own, and no
/// underscore: `On_Behalf_Of` is `On-Behalf-Of` to every framework that folds `_` into `-`, so
/// such headers never reach Greenhouse (nginx and Envoy drop them the same way).
fn caller_may_forward(name: &HeaderName, listed: &[&str]) -> bool {
    let n = name.as_str();
    !(is_hop_by_hop(name, listed)
        || CALLER_ONLY.contains(&n)
        || n.starts_with("x-forwarded-")
        || n.contains('_'))
}

/// Whether a header is hop-by-hop for this message: one of [`HOP_BY_HOP`] or named in its
/// `Connection` header (`listed`, from [`connection_listed`]).
fn is_hop_by_hop(name: &HeaderName, listed: &[&str]) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
        || listed.iter().any(|t| t.eq_ignore_ascii_case(name.as_str()))
}

/// Names listed in `Connection` (they are hop-by-hop for this message), as sent: compared
/// without regard to case, never parsed into names (which would allocate for each).
fn connection_listed(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name, &listed))
        .cloned()
        .collect();
    for name in hop {
        headers.remove(name);
    }
}

/// What the gateway decided to send along with the caller's request.
pub struct Outbound<'a> {
    pub upstream_host: &'a HeaderValue,
    pub authorization: HeaderValue,
    pub on_behalf_of: &'a str,
    pub request_id: &'a str,
    /// The caller's address as the audit record has it (`X-Forwarded-For`).
    pub client_addr: &'a str,
    /// W3C `traceparent` naming the gateway's span as the parent.
    pub traceparent: HeaderValue,
    /// The caller's `tracestate`, validated and bounded.
    pub tracestate: Option<HeaderValue>,
}

/// The headers the upstream receives (DESIGN 1.3 step 7).
pub fn upstream_headers(inbound: &HeaderMap, out: Outbound<'_>) -> Result<HeaderMap, GatewayError> {
    // One pass over the caller's headers keeping what may go on (no clone-then-remove).
    let listed = connection_listed(inbound);
    let mut h = HeaderMap::with_capacity(inbound.keys_len() + 8);
    for (name, value) in inbound {
        if caller_may_forward(name, &listed) {
            h.append(name.clone(), value.clone());
        }
    }
    encoding::accept_only_decodable(&mut h);
    h.insert(header::HOST, out.upstream_host.clone());
    h.insert(header::AUTHORIZATION, out.authorization);
    let obo = HeaderValue::from_str(out.on_behalf_of).map_err(|_| GatewayError::Internal)?;
    h.insert(HeaderName::from_static("on-behalf-of"), obo);
    let rid = HeaderValue::from_str(out.request_id).map_err(|_| GatewayError::Internal)?;
    h.insert(HeaderName::from_static("x-request-id"), rid);
    let xff = HeaderValue::from_str(out.client_addr).map_err(|_| GatewayError::Internal)?;
    h.insert(HeaderName::from_static("x-forwarded-for"), xff);
    h.insert(HeaderName::from_static("traceparent"), out.traceparent);
    if let Some(ts) = out.tracestate {
        h.insert(HeaderName::from_static("tracestate"), ts);
    }
    Ok(h)
}

/// Cleans an upstream response's headers before they go back to the caller.
pub fn downstream_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
}

/// Builds the upstream URI: the upstream's scheme and authority, the caller's path (already
/// routed, so under the shared prefix) and its query as received.
pub fn upstream_uri(base: &Uri, path: &str, query: Option<&str>) -> Result<Uri, GatewayError> {
    let mut pq = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(path);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    let mut parts = http::uri::Parts::default();
    parts.scheme = base.scheme().cloned();
    parts.authority = base.authority().cloned();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|_| GatewayError::BadRequest("the request target is not valid"))?,
    );
    Uri::from_parts(parts).map_err(|_| GatewayError::Internal)
}

/// Sends the request; 502 when the upstream cannot be reached or breaks, 504 when it does not
/// answer with response headers in time.
pub async fn send(
    client: &HttpClient,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    timeout: Duration,
) -> Result<Response<Incoming>, GatewayError> {
    let mut req = Request::new(full_body(body));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(GatewayError::UpstreamTimeout),
        Ok(Err(e)) => {
            tracing::warn!(error = %error_chain(&e), connect = e.is_connect(), "upstream request failed");
            Err(GatewayError::UpstreamError)
        }
        Ok(Ok(resp)) => upstream_framing(resp),
    }
}

/// RFC 9112: an answer with both `Transfer-Encoding` and `Content-Length` is framed by the
/// former (hyper read it so); the length is dropped before anything is passed on, as nginx and
/// Envoy do, so no caller and no audit record believes a truncated body complete. A `101` the
/// gateway never asked for (it never sends `Upgrade`) and any other 1xx reaching here are not
/// answers: 502.
fn upstream_framing(mut resp: Response<Incoming>) -> Result<Response<Incoming>, GatewayError> {
    if resp.status().is_informational() {
        tracing::warn!(
            status = resp.status().as_u16(),
            "upstream answered with an informational status as its final answer"
        );
        return Err(GatewayError::UpstreamError);
    }
    let h = resp.headers_mut();
    if h.contains_key(header::TRANSFER_ENCODING) && h.remove(header::CONTENT_LENGTH).is_some() {
        tracing::warn!(
            "upstream answer carried both Transfer-Encoding and Content-Length; the length was dropped"
        );
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_headers_remove_caller_credentials_hop_by_hop_and_forwarding_claims() {
        let mut inbound = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer caller-jwt"),
            ("cookie", "session=1"),
            ("on-behalf-of", "attacker-chosen"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil"),
            ("forwarded", "for=6.6.6.6"),
            // Listed names in any case, with empty list elements and in two fields.
            ("connection", "keep-alive, X-Secret-Hop,,"),
            ("connection", " x-other-HOP "),
            ("x-secret-hop", "1"),
            ("x-other-hop", "2"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("host", "gateway.internal"),
            ("x-request-id", "caller"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "caller=1"),
            ("accept", "application/json"),
            ("user-agent", "svc/1.0"),
        ] {
            inbound.append(k, HeaderValue::from_static(v));
        }
        let host = HeaderValue::from_static("api.greenhouse.io");
        let out = Outbound {
            upstream_host: &host,
            authorization: HeaderValue::from_static("Bearer upstream"),
            on_behalf_of: "integration@example.com",
            request_id: "rid-1",
            client_addr: "10.1.2.3",
            traceparent: HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01",
            ),
            tracestate: None,
        };
        let h = upstream_headers(&inbound, out).unwrap_or_default();
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "accept",
                "authorization",
                "host",
                "on-behalf-of",
                "traceparent",
                "user-agent",
                "x-forwarded-for",
                "x-request-id"
            ]
        );
        assert_eq!(h.get_all("traceparent").iter().count(), 1);
        assert_eq!(
            h["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01"
        );
        assert_eq!(h["authorization"], "Bearer upstream");
        assert_eq!(h.get_all("on-behalf-of").iter().count(), 1);
        assert_eq!(h["on-behalf-of"], "integration@example.com");
        assert_eq!(h["host"], "api.greenhouse.io");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-request-id"], "rid-1");
    }

    #[test]
    fn upstream_uri_keeps_path_and_query_and_takes_scheme_and_authority_from_base() {
        let base: Uri = "https://api.greenhouse.io/v1/partner"
            .parse()
            .unwrap_or_default();
        let u = upstream_uri(&base, "/v1/partner/candidates", Some("candidate_ids=1,2"))
            .map(|u| u.to_string());
        assert_eq!(
            u,
            Ok("https://api.greenhouse.io/v1/partner/candidates?candidate_ids=1,2".to_string())
        );
    }
}
