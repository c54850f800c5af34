//! The decision path, in order, on one screen ([`decide_and_forward`]). Each step either lets
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
use http::header::{self, HeaderName, HeaderValue};
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
use crate::policy::{ValidationMode, decide_on_behalf_of};
use crate::proxy::body::{Finished, ObservedBody, OnFinish};
use crate::proxy::deadline::ResponseDeadline;
use crate::proxy::{self, Outbound, encoding, target};
use crate::quota::{NoSlot, Refusal};
use crate::validate::{BodyError, QueryError};

/// The response body type of the gateway listener.
pub type RespBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Errors a request body may fail with (any body type the pipeline is driven with).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The largest upstream response kept in memory for spec-drift checks and candidate ids; larger
/// responses still stream through, unchecked.
const RESPONSE_COPY_LIMIT: usize = 4 * 1024 * 1024;

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
    /// The caller's address (written into the record only when the record is written).
    client_ip: Option<IpAddr>,
    ratelimit: Vec<(&'static str, String)>,
    validation: Vec<Value>,
    /// Room for the record in the audit reserve, taken before forwarding.
    reservation: Option<AuditReservation>,
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
    ctx.client_ip = Some(client_addr(&policy, peer.ip(), req.headers()));
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
    ctx.client_ip = peer.map(|p| p.ip());
    let routed = policy.route(method, uri.path()).ok().cloned();
    note_target(&policy, &mut ctx, uri, routed.as_ref());
    if let Some(r) = &routed {
        ctx.record.operation = Some(r.op.id.clone());
    }
    respond_error(gw, ctx, GatewayError::Internal, started).await
}

/// The gateway's own answer: written to the audit trail before it is sent.
async fn respond_error(
    gw: &Gateway,
    mut ctx: Context,
    e: GatewayError,
    started: Instant,
) -> Response<RespBody> {
    if e.fault() != crate::error::Fault::Client {
        tracing::warn!(request_id = %ctx.record.request_id, code = e.code(), "request failed");
    }
    let mut resp = e
        .to_response(&ctx.record.request_id)
        .map(|b| Full::new(b).map_err(|never| match never {}).boxed_unsync());
    set_headers(resp.headers_mut(), &ctx);
    ctx.record.code = Some(e.code().to_string());
    ctx.record.status = resp.status().as_u16();
    ctx.record.response_bytes = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
    let _ = finish_record(gw, ctx, started).await;
    resp
}

/// Greenhouse's answer, streamed back; the audit record is written when its body ends, before
/// its last bytes are released. An empty answer (204, 304, `Content-Length: 0`, a HEAD) is one a
/// server may send without ever polling its body, so its record is written before the head is
/// returned. With `on_error = "reject"`, a record that could not be written means the caller
/// never sees a complete success: an empty answer becomes 503 `audit_unavailable`, a body ends
/// with an error (the connection or stream is reset before the last bytes).
async fn respond_forwarded(
    gw: Arc<Gateway>,
    policy: Arc<Policy>,
    mut ctx: Context,
    fwd: Forwarded,
    started: Instant,
) -> Response<RespBody> {
    let (mut head, body) = fwd.response.into_parts();
    proxy::downstream_headers(&mut head.headers);
    head.version = Version::HTTP_11;
    ctx.record.status = head.status.as_u16();
    if let Some(remaining) = head
        .headers
        .get("x-ratelimit-remaining")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        policy.quotas.upstream_feedback(Some(remaining), None);
    }
    let status = head.status.as_u16();
    // A body that stalls longer than the upstream timeout is cut off (and recorded incomplete).
    let idle = policy.config.upstream.timeout;
    let within = policy.config.listen.response_write_timeout;
    set_headers(&mut head.headers, &ctx);
    let route = fwd.route;
    // The copy is read decoded; the caller gets the bytes as Greenhouse encoded them.
    let mut coding = http::HeaderMap::new();
    for v in head.headers.get_all(header::CONTENT_ENCODING) {
        coding.append(header::CONTENT_ENCODING, v.clone());
    }
    // Set by the response deadline's watchdog before it drops the body, so the record says why.
    let expired = Arc::new(AtomicBool::new(false));
    let expired_seen = expired.clone();
    let on_finish: OnFinish = Box::new(move |f: Finished| {
        Box::pin(async move {
            ctx.record.response_bytes = f.bytes;
            if let Some(raw) = f.copy.filter(|_| f.complete)
                && let Some(copy) = decoded(&coding, &raw, &route.op)
            {
                let drift = route.validators.check_response(status, &copy);
                if !drift.is_empty() {
                    gw.runtime.metrics.spec_drift(&route.op.id);
                    sample_drift(&route.op.id, &drift);
                }
                // Greenhouse documents its answers only as "200-level": ids are taken from any
                // 2xx answer of an operation that returns candidates.
                if (200..300).contains(&status) && route.returns_candidates {
                    merge_candidate_ids(&mut ctx.record.candidate_ids, &copy);
                }
            }
            // The policy this request was judged under stays alive until its record is written.
            drop(policy);
            if !f.complete {
                ctx.record.code = Some(if expired_seen.load(Ordering::SeqCst) {
                    "response_write_timeout".into()
                } else {
                    "response_incomplete".into()
                });
            }
            let written = finish_record(&gw, ctx, started).await;
            match written {
                Err(e) if gw.runtime.audit.on_error() == AuditOnError::Reject => {
                    Err(Box::new(e).into())
                }
                _ => Ok(()),
            }
        })
    });
    if http_body::Body::is_end_stream(&body) || http_body::Body::size_hint(&body).exact() == Some(0)
    {
        return respond_empty(head, body, on_finish, fwd.guard).await;
    }
    let body = body
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        .boxed();
    let observed = ObservedBody::new(body, RESPONSE_COPY_LIMIT, on_finish, Some(fwd.guard))
        .with_idle_timeout(idle);
    // The caller has this long to take the whole response; then its slot is released.
    let body = ResponseDeadline::new(observed, within, move || {
        expired.store(true, Ordering::SeqCst)
    });
    Response::from_parts(head, body.boxed_unsync())
}

/// An empty forwarded answer: its (empty) body is read and its record written first, then the
/// head is returned with an empty body. A record that could not be written with `on_error =
/// "reject"` turns it into 503 `audit_unavailable` (not recorded again).
async fn respond_empty(
    head: http::response::Parts,
    body: Incoming,
    on_finish: OnFinish,
    guard: Box<dyn std::any::Any + Send>,
) -> Response<RespBody> {
    let request_id = head
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    // Nothing to read; a body that does bring something is cut off and recorded incomplete.
    let complete = matches!(
        http_body_util::BodyExt::frame(&mut Limited::new(body, 0)).await,
        None | Some(Ok(_))
    );
    let written = on_finish(Finished {
        bytes: 0,
        copy: Some(Bytes::new()),
        complete,
    })
    .await;
    drop(guard);
    if written.is_err() {
        let mut resp = GatewayError::AuditUnavailable
            .to_response(&request_id)
            .map(|b| Full::new(b).map_err(|never| match never {}).boxed_unsync());
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        return resp;
    }
    let empty = http_body_util::Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    Response::from_parts(head, empty)
}

/// Writes the audit record (into the room reserved for it, when there is one) and the request
/// metrics. With `fsync = "always"` this resolves only once the record is on disk.
async fn finish_record(gw: &Gateway, mut ctx: Context, started: Instant) -> Result<(), AuditError> {
    ctx.record.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    ctx.record.client_addr = ctx.client_ip.map(|ip| ip.to_string());
    if !ctx.validation.is_empty() {
        ctx.record.validation = Some(Value::Array(std::mem::take(&mut ctx.validation)));
    }
    let code = ctx
        .record
        .code
        .clone()
        .unwrap_or_else(|| "forwarded".to_string());
    let rt = &gw.runtime;
    rt.metrics.request(
        ctx.team(),
        ctx.operation(),
        &code,
        started.elapsed().as_secs_f64(),
    );
    let written = match ctx.reservation.take() {
        Some(room) => rt.audit.write_reserved(ctx.record, room).await,
        None => rt.audit.write(ctx.record).await,
    };
    match &written {
        Ok(()) => rt.metrics.audit_written(),
        Err(e) => {
            rt.metrics.audit_error();
            tracing::error!(error = %e, "audit record could not be written");
        }
    }
    written
}

/// `X-Request-Id` and the team's rate-limit headers, on every response.
fn set_headers(h: &mut http::HeaderMap, ctx: &Context) {
    if let Ok(v) = HeaderValue::from_str(&ctx.record.request_id) {
        h.insert("x-request-id", v);
    }
    for (name, value) in &ctx.ratelimit {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            h.insert(n, v);
        }
    }
}

/// The response copy, decoded; `None` (logged, never with content) when it cannot be.
fn decoded<'a>(
    coding: &http::HeaderMap,
    raw: &'a [u8],
    op: &crate::spec::Operation,
) -> Option<std::borrow::Cow<'a, [u8]>> {
    match encoding::decode(coding, raw, RESPONSE_COPY_LIMIT) {
        Ok(copy) => Some(copy),
        Err(why) => {
            tracing::warn!(operation = %op.id, problem = ?why, "upstream response could not be decoded for inspection");
            None
        }
    }
}

/// Logs where a response differed from the spec: pointers and keywords, at most one line per
/// second per process (sampled), never values.
fn sample_drift(operation: &str, problems: &[FieldProblem]) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    if LAST.swap(now, Ordering::Relaxed) != now {
        let at: Vec<String> = problems
            .iter()
            .take(10)
            .map(|p| format!("{} ({})", p.pointer, p.keyword))
            .collect();
        tracing::warn!(operation, problems = problems.len(), at = %at.join(", "), "upstream response differs from the spec");
    }
}

/// Candidate ids from a successful response: `id` of the object or of each array element.
fn merge_candidate_ids(ids: &mut Vec<i64>, body: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let items: Vec<&Value> = match &v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    for item in items.into_iter().take(1000) {
        if let Some(id) = item.get("id").and_then(Value::as_i64)
            && !ids.contains(&id)
        {
            ids.push(id);
        }
    }
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
    let team: &TeamPolicy = policy
        .team_for(&token.claims)
        .ok_or(GatewayError::UnknownTeam)?;
    ctx.record.team = Some(team.team.name.clone());
    ctx.record.credential = Some(team.credential.name().to_string());
    if !team.may_call(&route) {
        return Err(GatewayError::OperationNotAllowed);
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
    let inflight = gw.runtime.metrics.inflight(&team.team.name);

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

/// Request body bytes buffered at once by the whole gateway (`limits.max_buffered_body_bytes`).
/// Counted in KiB (rounded up), so that any budget fits the semaphore's permit count.
pub(crate) struct BodyBudget {
    kib: Arc<tokio::sync::Semaphore>,
}

fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

impl BodyBudget {
    pub(crate) fn new(bytes: u64) -> Self {
        let permits = usize::try_from(kib(bytes))
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        BodyBudget {
            kib: Arc::new(tokio::sync::Semaphore::new(permits)),
        }
    }

    /// Reserves room for a body before a byte of it is read: its declared length, or, when it
    /// declares none (chunked), the largest body allowed. Never waits: without room, 503.
    fn reserve(
        &self,
        declared: Option<u64>,
        max_body_bytes: u64,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, GatewayError> {
        let overloaded = GatewayError::Overloaded {
            what: "too many request body bytes buffered at once",
            retry_after_secs: 1,
        };
        let want = u32::try_from(kib(declared.unwrap_or(max_body_bytes).min(max_body_bytes)))
            .map_err(|_| overloaded.clone())?;
        self.kib
            .clone()
            .try_acquire_many_owned(want)
            .map_err(|_| overloaded)
    }

    /// Gives back what a body read with an undeclared length did not use.
    fn shrink(permit: &mut tokio::sync::OwnedSemaphorePermit, read: u64) {
        let keep = usize::try_from(kib(read)).unwrap_or(usize::MAX);
        if let Some(excess) = permit.num_permits().checked_sub(keep).filter(|n| *n > 0) {
            drop(permit.split(excess));
        }
    }
}

async fn admit(
    gw: &Gateway,
    policy: &Policy,
    team: &TeamPolicy,
    route: &Route,
    ctx: &mut Context,
) -> Result<crate::quota::Admission, GatewayError> {
    let metrics = &gw.runtime.metrics;
    match policy.quotas.admit_team(&team.quota, route.index).await {
        Ok(a) => {
            ctx.ratelimit = a.headers.clone();
            ctx.record.quota = Some(json!({"decision": "admitted", "source": a.source()}));
            // Counted per event: copying the limiter's running total into the counter raced
            // between concurrent requests and could count twice.
            if a.source() == "allowed" {
                metrics.quota_backend_allowed();
            }
            Ok(a)
        }
        Err(refusal) => {
            ctx.ratelimit = refusal.headers();
            ctx.record.quota = Some(json!({"decision": "refused", "kind": refusal.kind()}));
            metrics.quota_rejection(&team.team.name, &route.op.id, refusal.kind());
            Err(match refusal {
                Refusal::RateLimited { retry_after, .. } => GatewayError::RateLimited {
                    retry_after_secs: ceil_secs(retry_after),
                },
                Refusal::DailyQuotaExhausted { retry_after, .. } => {
                    GatewayError::DailyQuotaExhausted {
                        retry_after_secs: ceil_secs(retry_after),
                    }
                }
                Refusal::ConcurrencyLimited { retry_after, .. } => {
                    GatewayError::ConcurrencyLimited {
                        retry_after_secs: ceil_secs(retry_after),
                    }
                }
                Refusal::BackendUnavailable => GatewayError::QuotaBackendUnavailable,
            })
        }
    }
}

/// The query string to forward: as received, or in report mode without the undeclared
/// parameters (which are recorded instead).
fn check_query(
    gw: &Gateway,
    team: &TeamPolicy,
    route: &Route,
    raw: Option<&str>,
    ctx: &mut Context,
) -> Result<Option<String>, GatewayError> {
    let (op, name) = (&route.op, team.team.name.as_str());
    let mode = team.team.validation;
    let metrics = &gw.runtime.metrics;
    match route.validators.check_query(raw) {
        Ok(()) => Ok(raw.map(str::to_string)),
        Err(QueryError::Undeclared(names)) if mode == ValidationMode::Enforce => {
            Err(GatewayError::UndeclaredQuery(names))
        }
        Err(QueryError::Undeclared(names)) => {
            metrics.validation_failure(name, &op.id, "report");
            for n in &names {
                ctx.validation.push(json!({"in": "query", "pointer": format!("/query/{n}"), "keyword": "undeclared"}));
            }
            let kept: Vec<&str> = raw
                .unwrap_or("")
                .split('&')
                .filter(|pair| {
                    let name = pair.split('=').next().unwrap_or("").replace('+', " ");
                    let name = percent_encoding::percent_decode_str(&name).decode_utf8_lossy();
                    !name.is_empty() && op.declares_query(&name)
                })
                .collect();
            // What is left may itself be malformed: recorded too, still forwarded.
            let kept = (!kept.is_empty()).then(|| kept.join("&"));
            if let Err(QueryError::Invalid(p)) = route.validators.check_query(kept.as_deref()) {
                ctx.note_problems("query", &p);
            }
            Ok(kept)
        }
        Err(QueryError::Invalid(problems)) => {
            metrics.validation_failure(name, &op.id, mode.as_str());
            if mode == ValidationMode::Report {
                ctx.note_problems("query", &problems);
                Ok(raw.map(str::to_string))
            } else {
                Err(GatewayError::ValidationFailed(problems))
            }
        }
    }
}

/// Media type, strict JSON and schema. Malformed JSON and wrong media types are refused in both
/// modes (Greenhouse could do nothing with them); schema violations are recorded in report mode.
fn check_body(
    gw: &Gateway,
    policy: &Policy,
    team: &TeamPolicy,
    route: &Route,
    parts: &http::request::Parts,
    body: &Bytes,
    ctx: &mut Context,
) -> Result<(), GatewayError> {
    ctx.record.request_bytes = body.len() as u64;
    if !body.is_empty() {
        ctx.record.body_sha256 = Some(hex::encode(Sha256::digest(body)));
    }
    if body.is_empty() && route.op.request_body.is_none() {
        return Ok(());
    }
    let ct = parts.headers.get(header::CONTENT_TYPE);
    match route.validators.check_body(ct, body) {
        Ok(facts) => {
            ctx.record.external_ids = facts.external_ids;
            Ok(())
        }
        Err(BodyError::UnsupportedMediaType) => Err(GatewayError::UnsupportedMediaType),
        Err(BodyError::InvalidJson(why)) => Err(GatewayError::InvalidJson(why)),
        Err(BodyError::PayloadTooLarge) => Err(too_large(policy, Some(route))),
        Err(BodyError::Invalid(problems)) => {
            let mode = team.team.validation;
            gw.runtime
                .metrics
                .validation_failure(&team.team.name, &route.op.id, mode.as_str());
            if mode == ValidationMode::Report {
                ctx.note_problems("body", &problems);
                Ok(())
            } else {
                Err(GatewayError::ValidationFailed(problems))
            }
        }
    }
}

/// 413 for this gateway's body limit, saying how large an attachment fits when the operation
/// takes them.
fn too_large(policy: &Policy, route: Option<&Route>) -> GatewayError {
    GatewayError::PayloadTooLarge {
        limit: policy.config.limits.max_body_bytes,
        attachments: route.is_some_and(|r| r.validators.takes_attachments()),
    }
}

/// The caller's address: the socket peer, or, when the peer is a trusted proxy, the nearest
/// untrusted address in `X-Forwarded-For` (read right to left).
fn client_addr(policy: &Policy, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
    let proxies = &policy.config.listen.trusted_proxies;
    let trusted = |ip: &IpAddr| proxies.iter().any(|n| n.contains(ip));
    if !trusted(&peer) {
        return peer;
    }
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map_while(|h| h.trim().parse::<IpAddr>().ok())
        .collect();
    hops.iter()
        .rev()
        .find(|ip| !trusted(ip))
        .or(hops.first())
        .copied()
        .unwrap_or(peer)
}

/// One request's upstream call, repeatable with another credential.
struct Upstream<'a> {
    gw: &'a Gateway,
    policy: &'a Policy,
    parts: &'a http::request::Parts,
    query: Option<&'a str>,
    body: Bytes,
    on_behalf_of: &'a str,
    request_id: &'a str,
    peer: SocketAddr,
}

impl Upstream<'_> {
    async fn send(
        &self,
        route: &Route,
        authorization: HeaderValue,
        ctx: &mut Context,
    ) -> Result<Response<Incoming>, GatewayError> {
        let (policy, rt) = (self.policy, &self.gw.runtime);
        let op = &route.op;
        // The account's budget at Greenhouse, shared by every team and replica.
        policy.quotas.upstream_slot().await.map_err(|no| match no {
            NoSlot::Later(wait) => GatewayError::UpstreamRateLimited {
                retry_after_secs: ceil_secs(wait),
            },
            NoSlot::BackendUnavailable => {
                rt.metrics.quota_rejection(ctx.team(), &op.id, "backend");
                GatewayError::QuotaBackendUnavailable
            }
        })?;
        let headers = proxy::upstream_headers(
            &self.parts.headers,
            Outbound {
                upstream_host: &policy.upstream_host,
                authorization,
                on_behalf_of: self.on_behalf_of,
                request_id: self.request_id,
                client_ip: ctx.client_ip.unwrap_or(self.peer.ip()),
            },
        )?;
        let cfg = &policy.config;
        let uri = proxy::upstream_uri(&cfg.upstream.base_url, self.parts.uri.path(), self.query)?;
        ctx.record.decision = Decision::Forwarded;
        let sent = Instant::now();
        let result = proxy::send(
            &rt.client,
            self.parts.method.clone(),
            uri,
            headers,
            self.body.clone(),
            cfg.upstream.timeout,
        )
        .await;
        let took = sent.elapsed();
        rt.metrics.upstream(&op.id, took.as_secs_f64());
        ctx.record.upstream_duration_ms =
            Some(ctx.record.upstream_duration_ms.unwrap_or(0.0) + took.as_secs_f64() * 1000.0);
        if let Ok(r) = &result {
            ctx.record.upstream_status = Some(r.status().as_u16());
        }
        result
    }
}

/// A caller's `X-Request-Id` is kept when it is 1 to 128 characters of `A-Z a-z 0-9 . _ -`.
pub fn request_id(headers: &http::HeaderMap) -> String {
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

fn check_target<B>(req: &Request<B>) -> Result<(), GatewayError> {
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
    // Routed and forwarded byte for byte: a path others could read differently is refused.
    if let Some(why) = target::non_canonical(uri.path()) {
        return Err(GatewayError::BadRequest(why));
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

fn declared_length<B>(req: &Request<B>) -> Result<Option<u64>, GatewayError> {
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
    policy: &Policy,
    headers: &http::HeaderMap,
    request_id: &str,
) -> Result<Arc<VerifiedToken>, GatewayError> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
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
    let verified = policy.verifier.verify_detailed(token).await;
    verified.map_err(|r| match r.error {
        AuthError::JwksUnavailable => GatewayError::JwksUnavailable,
        AuthError::Invalid(reason) => {
            gw.runtime.metrics.jwt_rejection(reason.as_str());
            // `alg` is a known name or a short alphanumeric value, `issuer` a configured one.
            tracing::info!(
                request_id,
                reason = reason.as_str(),
                alg = r.alg.as_deref().unwrap_or("-"),
                issuer = r.issuer.as_deref().unwrap_or("-"),
                "caller token refused"
            );
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
        KidRequired => "the token names no key (kid) and its issuer publishes several",
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

async fn read_body<B>(body: B, limit: u64) -> Result<Bytes, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(GatewayError::PayloadTooLarge {
                limit: limit as u64,
                attachments: false,
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
