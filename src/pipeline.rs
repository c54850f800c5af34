//! The decision path, in order. Each step either lets the request through or answers with a
//! [`GatewayError`]; errors become responses only in [`GatewayError::to_response`].
//!
//! 1. framing and target sanity, declared body size (before authentication)
//! 2. the caller's bearer JWT, whatever the path
//! 3. the route, from the spec
//! 4. team membership, the operation allow-list, `On-Behalf-Of`
//! 5. query parameters the spec declares; the body, read within the limit
//! 6. forward with the upstream credential; the response streams back

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;

use crate::auth::jwt::{AuthError, VerifiedToken, Verifier};
use crate::auth::upstream::{UpstreamCredentials, ceil_secs, retry_after};
use crate::config::Config;
use crate::error::GatewayError;
use crate::http_client::HttpClient;
use crate::metrics::Metrics;
use crate::policy::{Team, decide_on_behalf_of};
use crate::proxy::{self, Outbound};
use crate::spec::{Operation, RouteMatch};

/// The response body type of the gateway listener.
pub type RespBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Everything a request needs, built once at start.
pub struct Gateway {
    pub config: Arc<Config>,
    pub verifier: Verifier,
    pub credentials: UpstreamCredentials,
    pub client: HttpClient,
    pub metrics: Metrics,
    upstream_host: HeaderValue,
}

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        verifier: Verifier,
        credentials: UpstreamCredentials,
        client: HttpClient,
        metrics: Metrics,
    ) -> Self {
        let host = config
            .upstream
            .base_url
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let upstream_host =
            HeaderValue::from_str(&host).unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Gateway {
            config,
            verifier,
            credentials,
            client,
            metrics,
            upstream_host,
        }
    }
}

/// What the pipeline learned about a request, for metrics and logs.
#[derive(Default)]
struct Context {
    team: Option<String>,
    operation: Option<String>,
}

/// Handles one request on the gateway listener. Never fails: every outcome is a response.
pub async fn handle(
    gw: Arc<Gateway>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<RespBody> {
    let started = Instant::now();
    let request_id = request_id(req.headers());
    let mut ctx = Context::default();
    let (mut resp, code) = match decide_and_forward(&gw, req, peer, &request_id, &mut ctx).await {
        Ok(resp) => (resp, "forwarded"),
        Err(e) => {
            if e.fault() != crate::error::Fault::Client {
                tracing::warn!(request_id = %request_id, code = e.code(), "request failed");
            }
            (
                e.to_response(&request_id)
                    .map(|b| Full::new(b).map_err(|never| match never {}).boxed()),
                e.code(),
            )
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    gw.metrics.request(
        ctx.team.as_deref().unwrap_or("none"),
        ctx.operation.as_deref().unwrap_or("none"),
        code,
        started.elapsed().as_secs_f64(),
    );
    tracing::debug!(request_id = %request_id, status = resp.status().as_u16(), code, "answered");
    resp
}

async fn decide_and_forward(
    gw: &Gateway,
    req: Request<Incoming>,
    peer: SocketAddr,
    request_id: &str,
    ctx: &mut Context,
) -> Result<Response<RespBody>, GatewayError> {
    let cfg = &gw.config;
    // 1. Framing and target sanity; a declared body over the limit is refused before anything
    //    else, without reading it.
    check_target(&req)?;
    if let Some(len) = declared_length(&req)?
        && len > cfg.limits.max_body_bytes
    {
        return Err(GatewayError::PayloadTooLarge {
            limit: cfg.limits.max_body_bytes,
        });
    }

    // 2. Who is calling.
    let token = authenticate(gw, &req).await?;

    // 3. Which operation.
    let op = route(cfg, &req)?;
    ctx.operation = Some(op.id.clone());

    // 4. Which team, may it call this, on whose behalf.
    let team: &Team = cfg
        .teams
        .find(&token.claims)
        .ok_or(GatewayError::UnknownTeam)?;
    ctx.team = Some(team.name.clone());
    if !team.may_call(&op.id) {
        return Err(GatewayError::OperationNotAllowed);
    }
    let obo_headers: Vec<&HeaderValue> = req.headers().get_all("on-behalf-of").iter().collect();
    let on_behalf_of = decide_on_behalf_of(&team.on_behalf_of, &obo_headers, &token.claims)
        .map_err(GatewayError::OnBehalfOfNotAllowed)?;

    // 5. Only what the spec declares; the body within the limit.
    check_query(op, req.uri().query())?;
    let (parts, body) = req.into_parts();
    let body = read_body(body, cfg.limits.max_body_bytes).await?;

    // 6. Forward with the team's credential; one replay with a fresh token after a 401.
    let upstream = Upstream {
        gw,
        parts: &parts,
        body,
        on_behalf_of: &on_behalf_of,
        request_id,
        peer,
    };
    let authorization = gw.credentials.authorization(&team.credential).await?;
    let mut resp = upstream.send(&op.id, authorization.clone()).await?;
    if resp.status() == StatusCode::UNAUTHORIZED {
        drop(resp);
        let fresh = gw
            .credentials
            .after_unauthorized(&team.credential, &authorization)
            .await?;
        resp = upstream.send(&op.id, fresh).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            tracing::error!(request_id, credential = %team.credential, "Greenhouse refused a fresh token (or the On-Behalf-Of user)");
            return Err(GatewayError::UpstreamRejectedCredentials);
        }
    }
    if resp.status() == StatusCode::TOO_MANY_REQUESTS {
        // The budget is shared by every team: not this caller's fault, and nobody should call
        // Greenhouse with this credential until it says so.
        let wait = retry_after(resp.headers(), std::time::SystemTime::now());
        gw.credentials.pause(&team.credential, wait);
        return Err(GatewayError::UpstreamRateLimited {
            retry_after_secs: ceil_secs(wait),
        });
    }
    let (mut head, body) = resp.into_parts();
    proxy::downstream_headers(&mut head.headers);
    head.version = Version::HTTP_11;
    Ok(Response::from_parts(
        head,
        body.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
            .boxed(),
    ))
}

/// One request's upstream call, repeatable with another credential.
struct Upstream<'a> {
    gw: &'a Gateway,
    parts: &'a http::request::Parts,
    body: Bytes,
    on_behalf_of: &'a str,
    request_id: &'a str,
    peer: SocketAddr,
}

impl Upstream<'_> {
    async fn send(
        &self,
        operation: &str,
        authorization: HeaderValue,
    ) -> Result<Response<Incoming>, GatewayError> {
        let cfg = &self.gw.config;
        let headers = proxy::upstream_headers(
            &self.parts.headers,
            Outbound {
                upstream_host: &self.gw.upstream_host,
                authorization,
                on_behalf_of: self.on_behalf_of,
                request_id: self.request_id,
                client_ip: self.peer.ip(),
            },
        )?;
        let uri = proxy::upstream_uri(
            &cfg.upstream.base_url,
            self.parts.uri.path(),
            self.parts.uri.query(),
        )?;
        let sent = Instant::now();
        let result = proxy::send(
            &self.gw.client,
            self.parts.method.clone(),
            uri,
            headers,
            self.body.clone(),
            cfg.upstream.timeout,
        )
        .await;
        self.gw
            .metrics
            .upstream(operation, sent.elapsed().as_secs_f64());
        result
    }
}

/// A caller's `X-Request-Id` is kept when it is 1 to 128 characters of `A-Z a-z 0-9 . _ -`.
fn request_id(headers: &http::HeaderMap) -> String {
    let mut given = headers.get_all("x-request-id").iter();
    if let (Some(v), None) = (given.next(), given.next())
        && let Ok(s) = v.to_str()
        && (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return s.to_string();
    }
    new_request_id()
}

/// A fresh id: milliseconds since the epoch and 64 random bits, in hex (sortable by time).
pub fn new_request_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{ms:012x}{:016x}", rand::random::<u64>())
}

fn check_target(req: &Request<Incoming>) -> Result<(), GatewayError> {
    if req.method() == http::Method::CONNECT {
        return Err(GatewayError::BadRequest(
            "authority-form request targets are not accepted",
        ));
    }
    let uri = req.uri();
    if uri.path() == "*" || !uri.path().starts_with('/') {
        return Err(GatewayError::BadRequest(
            "the request target must be a path",
        ));
    }
    if req.version() <= Version::HTTP_11 {
        if uri.scheme().is_some() || uri.authority().is_some() {
            return Err(GatewayError::BadRequest(
                "absolute-form request targets are not accepted",
            ));
        }
        let hosts = req.headers().get_all(header::HOST).iter().count();
        if req.version() == Version::HTTP_11 && hosts != 1 {
            return Err(GatewayError::BadRequest(
                "exactly one Host header is required",
            ));
        }
        if hosts > 1 {
            return Err(GatewayError::BadRequest(
                "exactly one Host header is required",
            ));
        }
    }
    Ok(())
}

fn declared_length(req: &Request<Incoming>) -> Result<Option<u64>, GatewayError> {
    let mut values = req.headers().get_all(header::CONTENT_LENGTH).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(v), None) => v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map(Some)
            .ok_or(GatewayError::BadRequest("Content-Length is not a number")),
        _ => Err(GatewayError::BadRequest(
            "more than one Content-Length header",
        )),
    }
}

async fn authenticate(
    gw: &Gateway,
    req: &Request<Incoming>,
) -> Result<Arc<VerifiedToken>, GatewayError> {
    let mut values = req.headers().get_all(header::AUTHORIZATION).iter();
    let value = match (values.next(), values.next()) {
        (None, _) => return Err(GatewayError::MissingToken),
        (Some(v), None) => v,
        _ => {
            return Err(GatewayError::InvalidToken(
                "more than one Authorization header",
            ));
        }
    };
    let token = bearer_token(value)?;
    gw.verifier.verify(token).await.map_err(|e| match e {
        AuthError::JwksUnavailable => GatewayError::JwksUnavailable,
        AuthError::Invalid(reason) => {
            gw.metrics.jwt_rejection(reason.as_str());
            tracing::info!(reason = reason.as_str(), "caller token refused");
            GatewayError::InvalidToken(reason_text(reason))
        }
    })
}

/// `Bearer <token>`, the scheme matched case-insensitively (RFC 6750 section 2.1). Another
/// scheme, or none, means the request carries no bearer token at all: RFC 6750 section 3.1 asks
/// for the bare challenge then, without an error code. A Bearer header with a malformed token is
/// an invalid token.
fn bearer_token(v: &HeaderValue) -> Result<&str, GatewayError> {
    let malformed = GatewayError::InvalidToken("the Authorization header must be `Bearer <token>`");
    let s = v.to_str().map_err(|_| malformed.clone())?;
    let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(GatewayError::MissingToken);
    }
    let token = rest.trim_matches(' ');
    if token.is_empty() || token.contains(' ') {
        return Err(malformed);
    }
    Ok(token)
}

fn reason_text(r: crate::auth::jwt::RejectReason) -> &'static str {
    use crate::auth::jwt::RejectReason::*;
    match r {
        TooLarge => "the token is too large",
        Malformed => "the token is malformed",
        Algorithm => "the token's algorithm is not accepted",
        UnknownIssuer => "the token's issuer is not trusted",
        UnknownKey => "the token's signing key is not known",
        Signature => "the token's signature is invalid",
        Expired => "the token has expired",
        NotYetValid => "the token is not valid yet",
        IssuedInFuture => "the token is issued in the future",
        MissingClaim => "the token lacks a required claim (exp, iss, aud)",
        Audience => "the token is not meant for this gateway",
        Crit => "the token requires an unsupported extension",
        EmbeddedKey => "tokens carrying their own keys are refused",
    }
}

fn route<'a>(cfg: &'a Config, req: &Request<Incoming>) -> Result<&'a Operation, GatewayError> {
    let path = req.uri().path();
    let rest = path
        .strip_prefix(cfg.upstream.prefix.as_str())
        .filter(|r| r.starts_with('/'))
        .ok_or(GatewayError::RouteNotFound)?;
    match cfg.spec.route(req.method(), rest) {
        RouteMatch::Found(op) => Ok(op),
        RouteMatch::MethodNotAllowed(allow) => Err(GatewayError::MethodNotAllowed { allow }),
        RouteMatch::NotFound => Err(GatewayError::RouteNotFound),
    }
}

/// Refuses query parameters the operation does not declare, naming them (reduced to a safe
/// alphabet so nothing a caller sends is echoed verbatim).
fn check_query(op: &Operation, query: Option<&str>) -> Result<(), GatewayError> {
    let Some(q) = query else { return Ok(()) };
    let mut undeclared: Vec<String> = Vec::new();
    for (name, _) in form_urlencoded::parse(q.as_bytes()) {
        if !op.declares_query(&name) {
            let shown = if !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-[]".contains(&b))
            {
                name.into_owned()
            } else {
                "(unprintable name)".to_string()
            };
            if !undeclared.contains(&shown) {
                undeclared.push(shown);
            }
        }
    }
    if undeclared.is_empty() {
        Ok(())
    } else {
        Err(GatewayError::UndeclaredQuery(undeclared))
    }
}

async fn read_body(body: Incoming, limit: u64) -> Result<Bytes, GatewayError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(GatewayError::PayloadTooLarge {
                limit: limit as u64,
            })
        }
        Err(_) => Err(GatewayError::BadRequest(
            "the request body could not be read",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_other_schemes_carry_no_token() {
        for (v, want) in [
            ("Bearer abc", Ok("abc")),
            ("bearer abc", Ok("abc")),
            ("BEARER abc", Ok("abc")),
            ("Basic abc", Err("missing_token")),
            ("abc", Err("missing_token")),
            ("Bearer:abc", Err("missing_token")),
            ("Bearer", Err("invalid_token")),
            ("Bearer ", Err("invalid_token")),
            ("Bearer a b", Err("invalid_token")),
        ] {
            let hv = HeaderValue::from_static(v);
            let got = bearer_token(&hv).map_err(|e| e.code());
            assert_eq!(got, want, "{v}");
        }
    }

    #[test]
    fn well_formed_request_id_is_kept_and_others_replaced() {
        let mut h = http::HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("abc-123_x.y"));
        assert_eq!(request_id(&h), "abc-123_x.y");
        h.insert("x-request-id", HeaderValue::from_static("bad id"));
        assert_ne!(request_id(&h), "bad id");
        let long = "a".repeat(129);
        h.insert(
            "x-request-id",
            HeaderValue::from_str(&long).unwrap_or(HeaderValue::from_static("x")),
        );
        assert_eq!(request_id(&h).len(), 28);
    }
}
