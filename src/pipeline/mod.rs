//! The decision path, in order, on one screen (`decide_and_forward`). Each step either lets
//! the request through or answers with a [`GatewayError`]; errors become responses only in
//! [`GatewayError::to_response`]. Every request, whatever its outcome, ends in one audit record.
//!
//! 0. the gateway-wide bound on requests in flight (`listen.max_requests_in_flight`)
//! 1. framing and target sanity, declared body size (before authentication)
//! 2. the caller's bearer JWT, whatever the path
//! 3. the route, from the spec
//! 4. team membership, the operation allow-list, `On-Behalf-Of`
//! 5. the body is read, within the gateway-wide budget of buffered bytes (503 before reading)
//! 6. the team's quotas
//! 7. query and body against the spec (refused, or recorded in report mode)
//! 8. forward with the upstream credential (within the shared Greenhouse budget); one replay
//!    with a fresh token after a 401; a 429 pauses the credential
//! 9. the response streams back; its audit record is written before its last bytes are released
//!    (an empty response: before its head is sent), into room reserved before forwarding, and a
//!    caller that does not take it within `listen.response_write_timeout` is cut off

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::audit::{AuditError, AuditRecord, AuditReservation, Decision, OnError as AuditOnError};
use crate::auth::jwt::{AuthError, VerifiedToken};
use crate::auth::upstream::{ceil_secs, retry_after};
use crate::error::{FieldProblem, GatewayError};
use crate::gateway::{Gateway, Policy, Route, TeamPolicy};
use crate::metrics::TeamOpSeries;
use crate::policy::{ValidationMode, decide_on_behalf_of};
use crate::proxy::body::{Finished, ObservedBody, OnFinish};
use crate::proxy::deadline::ResponseDeadline;
use crate::proxy::{self, Outbound, encoding, target};
use crate::quota::{NoSlot, RateLimitHeaders, Refusal};
use crate::telemetry::RequestTrace;
use crate::validate::BodyError;

mod checks;
mod explain;
mod inbound;
mod respond;
mod upstream;

use checks::{admit, check_body, check_query, too_large};
pub use explain::{Explain, Explanation, Identity, explain};
pub(crate) use inbound::BodyBudget;
use inbound::{auth_error, authenticate, check_target, client_addr, declared_length, read_body};
pub use inbound::{new_request_id, request_id};
pub use respond::inspect_response;
use respond::{respond_error, respond_forwarded};
use upstream::Upstream;

/// The response body type of the gateway listener.
pub type RespBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Errors a request body may fail with (any body type the pipeline is driven with).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The connection's peer, set by the listener as a request extension. Without it (a request
/// driven in-process), the peer is unknown and recorded as `0.0.0.0`.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// The request id chosen for a request before the pipeline runs (by [`crate::service`]), as a
/// request extension, so that its span, its answer and its record carry the same one.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// What the pipeline learned about a request: the audit record's fields, metrics labels and the
/// rate-limit headers every response to a team carries.
#[derive(Default)]
struct Context {
    record: AuditRecord,
    ratelimit: RateLimitHeaders,
    validation: Vec<Value>,
    /// Room for the record in the audit reserve, taken before forwarding.
    reservation: Option<AuditReservation>,
    /// The request's trace and span, held until the record is written (the response's end).
    trace: Option<RequestTrace>,
    /// Why the gateway answered itself, for the request's log line: the problem's detail (never
    /// a submitted value).
    detail: Option<String>,
    /// The metric series of the request's team and operation, once both are known.
    series: Option<Arc<TeamOpSeries>>,
}

impl Context {
    fn team(&self) -> &str {
        self.record.team.as_deref().unwrap_or("none")
    }
    fn operation(&self) -> &str {
        self.record.operation.as_deref().unwrap_or("none")
    }
    /// Pointers and keywords only: never the values, never the messages.
    fn note_problems(&mut self, where_: &str, problems: &[FieldProblem]) {
        for p in problems {
            self.validation
                .push(json!({"in": where_, "pointer": p.pointer, "keyword": p.keyword}));
        }
    }
}

/// A forwarded response, before its body is wrapped.
struct Forwarded {
    response: Response<Incoming>,
    route: Arc<Route>,
    /// Held until the response body is finished: the concurrency lease, the in-flight gauge and
    /// the gateway-wide in-flight permit.
    guard: Box<dyn std::any::Any + Send>,
}

/// Handles one request on the gateway listener. Never fails: every outcome is a response. The
/// policy in force when it starts judges it to its end.
pub async fn handle<B>(gw: Arc<Gateway>, req: Request<B>) -> Response<RespBody>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let started = Instant::now();
    let policy = gw.policy();
    let peer = req
        .extensions()
        .get::<PeerAddr>()
        .map_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), |p| p.0);
    let mut ctx = Context::default();
    ctx.record.request_id = match req.extensions().get::<RequestId>() {
        Some(id) => id.0.clone(),
        None => request_id(req.headers()),
    };
    ctx.record.method = req.method().to_string();
    ctx.trace = Some(match req.extensions().get::<RequestTrace>() {
        Some(t) => t.clone(),
        None => RequestTrace::start(tracing::Span::current(), req.headers()),
    });
    // Formatted once: the audit record and `X-Forwarded-For` carry the same text.
    ctx.record.client_addr = Some(client_addr(&policy, peer.ip(), req.headers()).to_string());
    // The route is looked up once, here, so that even a request refused before routing (an
    // invalid token, say) is recorded by its route and the ids it names, never by raw URL.
    let routed = policy.route(req.method(), req.uri().path()).cloned();
    note_target(&policy, &mut ctx, req.uri(), routed.as_ref().ok());
    // 0. The gateway-wide bound on requests in flight, before any work is spent on this one.
    let Ok(permit) = gw.runtime.in_flight.clone().try_acquire_owned() else {
        let e = GatewayError::Overloaded {
            what: "too many requests in flight",
            retry_after_secs: 1,
        };
        return respond_error(&gw, ctx, e, started).await;
    };
    match decide_and_forward(&gw, &policy, req, routed, peer, &mut ctx, permit).await {
        Ok(fwd) => respond_forwarded(gw, policy, ctx, fwd, started).await,
        Err(e) => respond_error(&gw, ctx, e, started).await,
    }
}

/// The record's path (the route's template, never a value from the URL) and the ids the query
/// names.
fn note_target(policy: &Policy, ctx: &mut Context, uri: &http::Uri, route: Option<&Arc<Route>>) {
    let op = route.map(|r| &r.op);
    ctx.record.path = AuditRecord::sanitize_path(&target::audit_path(
        &policy.config.spec,
        &policy.config.upstream.prefix,
        uri.path(),
        uri.query(),
        op,
    ));
    if let Some(op) = op {
        let ids = target::query_ids(op, uri.query());
        ctx.record.candidate_ids = ids.candidate_ids;
        ctx.record.external_ids = ids.external_ids;
    }
}

/// The answer and record for a request whose handling panicked (see [`crate::service`]): 500
/// `internal_error`, recorded with what was known before the pipeline ran.
pub async fn respond_panicked(
    gw: &Gateway,
    request_id: String,
    method: &http::Method,
    uri: &http::Uri,
    peer: Option<SocketAddr>,
    started: Instant,
) -> Response<RespBody> {
    let policy = gw.policy();
    let mut ctx = Context::default();
    ctx.record.request_id = request_id;
    ctx.record.method = method.to_string();
    ctx.record.client_addr = peer.map(|p| p.ip().to_string());
    let routed = policy.route(method, uri.path()).ok().cloned();
    note_target(&policy, &mut ctx, uri, routed.as_ref());
    if let Some(r) = &routed {
        ctx.record.operation = Some(r.op.id.clone());
    }
    respond_error(gw, ctx, GatewayError::Internal, started).await
}

async fn decide_and_forward<B>(
    gw: &Gateway,
    policy: &Policy,
    req: Request<B>,
    routed: Result<Arc<Route>, GatewayError>,
    peer: SocketAddr,
    ctx: &mut Context,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Forwarded, GatewayError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let cfg = &policy.config;
    // 1. Framing and target sanity; a declared body over the limit is refused before anything
    //    else, without reading it.
    check_target(&req)?;
    if let Some(len) = declared_length(&req)?
        && len > cfg.limits.max_body_bytes
    {
        return Err(too_large(policy, routed.as_deref().ok()));
    }

    // 2. Who is calling.
    let token = authenticate(gw, policy, req.headers(), &ctx.record.request_id).await?;
    ctx.record.subject = token.subject.clone();
    ctx.record.issuer = Some(token.issuer.clone());

    // 3. Which operation (looked up in `handle`).
    let route = routed?;
    ctx.record.operation = Some(route.op.id.clone());

    // 4. Which team, may it call this, on whose behalf.
    let Some(team): Option<&TeamPolicy> = policy.team_for(&token.claims) else {
        let missing = cfg.teams.missing_required_claim(&token.claims);
        return Err(GatewayError::UnknownTeam {
            missing_claim: missing.map(str::to_owned),
        });
    };
    ctx.record.team = Some(team.team.name.clone());
    ctx.series = team.series(&route);
    ctx.record.credential = Some(team.credential.name().to_string());
    if !team.may_call(&route) {
        return Err(GatewayError::OperationNotAllowed {
            operation: route.op.id.clone(),
        });
    }
    let obo_headers: Vec<&HeaderValue> = req.headers().get_all("on-behalf-of").iter().collect();
    let on_behalf_of = decide_on_behalf_of(&team.team.on_behalf_of, &obo_headers, &token.claims)
        .map_err(GatewayError::OnBehalfOfNotAllowed)?;
    ctx.record.on_behalf_of = Some(on_behalf_of.clone());

    // 5. The body, read before admission so that a slow upload holds no quota slot, and only
    //    when the gateway-wide budget of buffered bytes has room for it (the reservation is
    //    held until the body is dropped, after forwarding). These bytes are what is validated
    //    and what is forwarded.
    let (parts, body) = req.into_parts();
    let mut reserved = gw.runtime.body_budget.reserve(
        http_body::Body::size_hint(&body).exact(),
        cfg.limits.max_body_bytes,
    )?;
    let body = tokio::time::timeout(
        cfg.listen.body_read_timeout,
        read_body(body, cfg.limits.max_body_bytes),
    )
    .await
    .map_err(|_| GatewayError::BodyTimeout)?
    .map_err(|e| match e {
        GatewayError::PayloadTooLarge { .. } => too_large(policy, Some(&route)),
        other => other,
    })?;
    BodyBudget::shrink(&mut reserved, body.len() as u64);

    // 6. The team's quotas: all checks at once; a refusal spends nothing.
    let admission = admit(gw, policy, team, &route, ctx).await?;
    let inflight = gw.runtime.metrics.inflight(&team.team_series);

    // 7. Query and body against the spec.
    let query = check_query(gw, team, &route, parts.uri.query(), ctx)?;
    check_body(gw, policy, team, &route, &parts, &body, ctx)?;

    // 8. Forward, unless the audit trail cannot record it: room for the record is reserved
    //    first, so the record of a forwarded request cannot fail for want of disk or queue.
    let audit = &gw.runtime.audit;
    if audit.on_error() == AuditOnError::Reject {
        if !audit.healthy() {
            return Err(GatewayError::AuditUnavailable);
        }
        let room = audit
            .reserve()
            .map_err(|_| GatewayError::AuditUnavailable)?;
        ctx.reservation = Some(room);
    } else {
        ctx.reservation = audit.reserve().ok();
    }
    let request_id = ctx.record.request_id.clone();
    let upstream = Upstream {
        gw,
        policy,
        parts: &parts,
        query: query.as_deref(),
        body,
        on_behalf_of: &on_behalf_of,
        request_id: &request_id,
        peer,
    };
    let credential = &team.credential;
    let authorization = credential.authorization().await?;
    let mut resp = upstream.send(&route, authorization.clone(), ctx).await?;
    if resp.status() == StatusCode::UNAUTHORIZED {
        drop(resp);
        let fresh = credential
            .after_unauthorized(&authorization, &on_behalf_of)
            .await?;
        resp = upstream.send(&route, fresh.clone(), ctx).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            credential.refused_after_replay(&fresh, &on_behalf_of);
            tracing::error!(
                request_id,
                credential = credential.name(),
                "Greenhouse refused a fresh token (or the On-Behalf-Of user)"
            );
            return Err(GatewayError::UpstreamRejectedCredentials);
        }
    }
    if resp.status() == StatusCode::TOO_MANY_REQUESTS {
        // The budget is shared by every team: not this caller's fault, and nobody should call
        // Greenhouse with this credential until it says so.
        let wait = retry_after(resp.headers(), SystemTime::now());
        credential.pause(wait);
        return Err(GatewayError::UpstreamRateLimited {
            retry_after_secs: ceil_secs(wait),
        });
    }
    drop(upstream);
    drop(reserved);
    Ok(Forwarded {
        response: resp,
        route,
        guard: Box::new((admission, inflight, permit)),
    })
}
