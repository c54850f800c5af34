//! The answer: the gateway's own (an error, recorded before it is sent) or Greenhouse's,
//! streamed back with its record written before its last bytes are released; what is learnt
//! from the answer on the way (spec drift, candidate ids).

use super::*;

/// The largest upstream response kept in memory for spec-drift checks and candidate ids; larger
/// responses still stream through, unchecked.
const RESPONSE_COPY_LIMIT: usize = 4 * 1024 * 1024;

/// Up to this much of an upstream response is read before its head is returned: an answer that
/// fits is recorded first and then written to the caller at once. Bounded per request in flight.
const RESPONSE_READ_AHEAD: u64 = 64 * 1024;

/// The gateway's own answer: written to the audit trail before it is sent.
pub(super) async fn respond_error(
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
    ctx.detail = log_detail(&e);
    ctx.record.status = resp.status().as_u16();
    ctx.record.response_bytes = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
    let _ = finish_record(gw, ctx, started).await;
    resp
}

/// Greenhouse's answer, streamed back; the audit record is written when its body ends, before
/// its last bytes are released. An answer of up to [`RESPONSE_READ_AHEAD`] bytes is read and
/// recorded before its head is returned. An empty answer (204, 304, `Content-Length: 0`, a
/// HEAD) is one a server may send without ever polling its body, so its record is written
/// before the head is returned. With `on_error = "reject"`, a record that could not be written
/// means the caller never sees a complete success: an empty answer becomes 503
/// `audit_unavailable`, a body ends with an error (the connection or stream is reset before the
/// last bytes).
pub(super) async fn respond_forwarded(
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
                let drift = inspect_response(&route, status, &copy, &mut ctx.record.candidate_ids);
                if !drift.is_empty() {
                    gw.runtime.metrics.spec_drift(&route.op.id);
                    sample_drift(&route.op.id, &drift);
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
    // The finishing work runs where the body ends (polled by the connection, or spawned), out
    // of the request's span unless given it: its log lines carry the request id like the rest.
    let on_finish = in_current_span(on_finish);
    if http_body::Body::is_end_stream(&body) || http_body::Body::size_hint(&body).exact() == Some(0)
    {
        return respond_empty(head, body, on_finish, fwd.guard).await;
    }
    let body = body
        .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        .boxed();
    let mut observed = ObservedBody::new(body, RESPONSE_COPY_LIMIT, on_finish, Some(fwd.guard))
        .with_idle_timeout(idle);
    // A small answer is read whole and recorded before its head goes out, so the caller gets it
    // in one write (and the connection is not woken again for the rest); a larger one streams.
    observed.prefetch(RESPONSE_READ_AHEAD).await;
    // The caller has this long to take the whole response; then its slot is released.
    let body = ResponseDeadline::new(observed, within, move || {
        expired.store(true, Ordering::SeqCst)
    });
    Response::from_parts(head, body.boxed_unsync())
}

/// `on_finish`, run in the span current now (the request's). Where it already runs in that span
/// (a small answer, read ahead within the request's future) it is not instrumented again: each
/// poll and the drop of an instrumented future enter and leave the span.
fn in_current_span(on_finish: OnFinish) -> OnFinish {
    let span = tracing::Span::current();
    Box::new(move |f: Finished| {
        if tracing::Span::current() == span {
            on_finish(f)
        } else {
            Box::pin(tracing::Instrument::instrument(on_finish(f), span))
        }
    })
}

/// An empty forwarded answer: its (empty) body is read and its record written first, then the
/// head is returned with an empty body. A record that could not be written with `on_error =
/// "reject"` turns it into 503 `audit_unavailable` (not recorded again).
pub(super) async fn respond_empty(
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
            resp.headers_mut().insert(X_REQUEST_ID, v);
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
pub(super) async fn finish_record(
    gw: &Gateway,
    mut ctx: Context,
    started: Instant,
) -> Result<(), AuditError> {
    ctx.record.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    if !ctx.validation.is_empty() {
        ctx.record.validation = Some(Value::Array(std::mem::take(&mut ctx.validation)));
    }
    let code = ctx
        .record
        .code
        .clone()
        .unwrap_or_else(|| crate::error::FORWARDED.to_string());
    let span = ctx
        .trace
        .take()
        .map_or_else(tracing::Span::current, |t| t.span().clone());
    RequestTrace::finish(
        &span,
        ctx.record.team.as_deref(),
        ctx.record.operation.as_deref(),
        ctx.record.status,
        &code,
    );
    let rt = &gw.runtime;
    let seconds = started.elapsed().as_secs_f64();
    match &ctx.series {
        Some(series) => rt.metrics.team_op_request(series, &code, seconds),
        None => rt
            .metrics
            .request(ctx.team(), ctx.operation(), &code, seconds),
    }
    let line = AccessLine::of(&ctx, code);
    let written = match ctx.reservation.take() {
        Some(room) => rt.audit.write_reserved(ctx.record, room).await,
        None => rt.audit.write(ctx.record).await,
    };
    match &written {
        Ok(()) => rt.metrics.audit_written(),
        Err(e) => {
            rt.metrics.audit_error();
            tracing::error!(request_id = %line.request_id, error = %e, "audit record could not be written");
        }
    }
    line.log();
    written
}

/// The one log line of a request, written when it ends (its record written or refused):
/// `info` on the target `greenhouse_gateway::access`, so `RUST_LOG` can keep or drop it alone.
/// Names from the configuration and the gateway's own codes only: never the token, the subject,
/// the `On-Behalf-Of` user, the path or the query.
struct AccessLine {
    request_id: String,
    method: String,
    team: Option<String>,
    operation: Option<String>,
    issuer: Option<String>,
    status: u16,
    code: String,
    upstream_status: Option<u16>,
    duration_ms: f64,
    upstream_ms: Option<f64>,
    detail: Option<String>,
}

impl AccessLine {
    fn of(ctx: &Context, code: String) -> AccessLine {
        let r = &ctx.record;
        AccessLine {
            request_id: r.request_id.clone(),
            method: r.method.clone(),
            team: r.team.clone(),
            operation: r.operation.clone(),
            issuer: r.issuer.clone(),
            status: r.status,
            code,
            upstream_status: r.upstream_status,
            duration_ms: (r.duration_ms * 1000.0).round() / 1000.0,
            upstream_ms: r
                .upstream_duration_ms
                .map(|d| (d * 1000.0).round() / 1000.0),
            detail: ctx.detail.clone(),
        }
    }

    fn log(self) {
        tracing::info!(
            target: "greenhouse_gateway::access",
            request_id = %self.request_id,
            method = %self.method,
            team = self.team.as_deref(),
            operation = self.operation.as_deref(),
            issuer = self.issuer.as_deref(),
            status = self.status,
            code = %self.code,
            upstream_status = self.upstream_status,
            duration_ms = self.duration_ms,
            upstream_ms = self.upstream_ms,
            detail = self.detail.as_deref(),
            "request finished"
        );
    }
}

/// What the log line says about an answer of the gateway's own: the problem's detail, and for a
/// schema refusal where it failed (pointers and keywords, as in the audit record).
fn log_detail(e: &GatewayError) -> Option<String> {
    match e {
        GatewayError::ValidationFailed(problems) => {
            let at: Vec<String> = problems
                .iter()
                .take(10)
                .map(|p| format!("{} ({})", p.pointer, p.keyword))
                .collect();
            Some(format!(
                "{}: {}",
                e.detail().unwrap_or_default(),
                at.join(", ")
            ))
        }
        other => other.detail(),
    }
}

/// Made once: inserting a header by a string names it anew (an allocation for a name
/// `http` does not know).
const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// `X-Request-Id` and the team's rate-limit headers, on every response.
pub(super) fn set_headers(h: &mut http::HeaderMap, ctx: &Context) {
    if let Ok(v) = HeaderValue::from_str(&ctx.record.request_id) {
        h.insert(X_REQUEST_ID, v);
    }
    for (name, value) in &ctx.ratelimit {
        h.insert(name.clone(), value.clone());
    }
}

/// The response copy, decoded; `None` (logged, never with content) when it cannot be.
pub(super) fn decoded<'a>(
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
pub(super) fn sample_drift(operation: &str, problems: &[FieldProblem]) {
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

/// What the gateway learns from a complete, decoded upstream answer: where it differs from the
/// spec (pointers and keywords), and the candidate ids it names, added to `ids`.
pub fn inspect_response(
    route: &Route,
    status: u16,
    body: &[u8],
    ids: &mut Vec<i64>,
) -> Vec<FieldProblem> {
    let drift = route.validators.check_response(status, body);
    // Greenhouse documents its answers only as "200-level": ids are taken from any 2xx answer
    // of an operation that returns candidates.
    if (200..300).contains(&status) && route.returns_candidates {
        merge_candidate_ids(ids, body);
    }
    drift
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
