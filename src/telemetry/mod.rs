//! Traces: W3C Trace Context on every request, and, when `[tracing] otlp_endpoint` is set, the
//! gateway's spans exported over OTLP/HTTP ([`otlp`]).
//!
//! Every request is part of a trace. A caller's valid `traceparent` is continued (same trace id);
//! a missing or malformed one starts a new trace; its `tracestate` is passed on, bounded. The
//! upstream gets a `traceparent` whose parent is the gateway's own span: the exported `upstream`
//! span of that call when spans are exported, otherwise an id the gateway made for the request.
//!
//! The spans are made here and only here, so what they carry can be read in one place: every
//! field is bounded and comes from configuration or the gateway's own decisions (team, operation,
//! status, code, credential and issuer names), never a token, a subject or a path with values.
//! Only the spans named in [`EXPORTED_SPANS`] are exported, and no log event is.
//!
//! Log lines go to standard error through [`log_writer`].

pub mod log_writer;
pub mod otlp;
pub mod text_line;
pub mod w3c;

use http::{HeaderMap, HeaderValue, Method};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use otlp::{Exporting, OtlpSettings, install, layer};

/// The target of every span made here (what the exporting layer looks for).
pub(crate) const SPAN_TARGET: &str = module_path!();

/// The spans within a request (the quota decision, the upstream budget, the upstream call) are
/// made only while exporting: they exist for the trace, and a log line logged within them
/// carries the request's span (its request id) either way. Three spans per request cost about
/// 3 % of the gateway's CPU under load.
///
/// The spans the OpenTelemetry layer exports: the request, the key fetch, the token fetch, the
/// quota decision, the wait for the shared upstream budget and the upstream call.
pub const EXPORTED_SPANS: [&str; 6] = [
    "request",
    "jwks_fetch",
    "token_fetch",
    "quota",
    "upstream_budget",
    "upstream",
];

/// The span of one request on the gateway listener. Its outcome is recorded by
/// [`RequestTrace::finish`].
pub fn request_span(request_id: &str, method: &Method) -> Span {
    tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %method_label(method),
        trace_id = Empty,
        team = Empty,
        operation = Empty,
        status = Empty,
        code = Empty,
        otel.kind = "server",
        otel.status_code = Empty,
    )
}

/// A JWKS fetch of one configured issuer (in a request on an unknown key id, or in the
/// background).
pub fn jwks_fetch_span(issuer: &str) -> Span {
    tracing::info_span!(
        "jwks_fetch",
        issuer,
        result = Empty,
        otel.kind = "client",
        otel.status_code = Empty
    )
}

/// A token request of one configured credential.
pub fn token_fetch_span(credential: &str) -> Span {
    tracing::info_span!(
        "token_fetch",
        credential,
        result = Empty,
        otel.kind = "client",
        otel.status_code = Empty
    )
}

/// The team's quota decision for one request: `admitted` (and by whom: `none`, `memory`,
/// `redis`, `local`, `allowed`) or `refused` (and why: `rate`, `daily`, `concurrency`,
/// `backend`).
pub fn quota_span(team: &str, operation: &str) -> Span {
    if !otlp::exporting() {
        return Span::none();
    }
    tracing::info_span!(
        "quota",
        team,
        operation,
        decision = Empty,
        source = Empty,
        kind = Empty
    )
}

/// The wait for a slot in the shared Greenhouse budget.
pub fn upstream_budget_span() -> Span {
    if !otlp::exporting() {
        return Span::none();
    }
    tracing::info_span!("upstream_budget", result = Empty)
}

/// One call to Greenhouse (a replay after a 401 is a second one): the status it answered, or
/// the gateway's code when it did not (`upstream_error`, `upstream_timeout`).
pub fn upstream_span(operation: &str) -> Span {
    if !otlp::exporting() {
        return Span::none();
    }
    tracing::info_span!(
        "upstream",
        operation,
        status = Empty,
        code = Empty,
        otel.kind = "client",
        otel.status_code = Empty
    )
}

/// Marks a span failed (`otel.status_code = error`); the reason is in its other fields.
pub fn mark_error(span: &Span) {
    span.record("otel.status_code", "error");
}

/// The method as spans and logs show it: a standard one, or `_OTHER` (an extension method is
/// the caller's free text).
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// One request's place in its trace, kept (with its span) until the response ends.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    trace_id: u128,
    /// The gateway's span for this request: the exported request span's id, or one made up.
    span_id: u64,
    sampled: bool,
    tracestate: Option<HeaderValue>,
    /// Whether the caller's `traceparent` was continued.
    continued: bool,
    exported: bool,
    span: Span,
}

impl RequestTrace {
    /// Joins the caller's trace, or starts one, for the request whose span is `span` (a span
    /// from [`request_span`], before it is entered).
    pub fn start(span: Span, headers: &HeaderMap) -> RequestTrace {
        let (parent, malformed) = match w3c::traceparent(headers) {
            w3c::Inbound::Valid(tp) => (Some(tp), None),
            w3c::Inbound::Absent => (None, None),
            w3c::Inbound::Malformed(why) => (None, Some(why)),
        };
        // A tracestate belongs to its traceparent: without a valid one it is dropped.
        let tracestate = parent
            .and_then(|_| w3c::tracestate(headers))
            .and_then(|s| HeaderValue::from_str(&s).ok());
        let mut trace = RequestTrace {
            trace_id: parent.map_or_else(new_trace_id, |p| p.trace_id),
            span_id: new_span_id(),
            sampled: parent.is_some_and(|p| p.sampled),
            tracestate,
            continued: parent.is_some(),
            exported: false,
            span,
        };
        if otlp::exporting() {
            if let Some(p) = parent {
                let state = trace
                    .tracestate
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.parse::<TraceState>().ok())
                    .unwrap_or_default();
                let remote = SpanContext::new(
                    TraceId::from(p.trace_id),
                    opentelemetry::trace::SpanId::from(p.parent_id),
                    if p.sampled {
                        TraceFlags::SAMPLED
                    } else {
                        TraceFlags::default()
                    },
                    true,
                    state,
                );
                let _ = trace
                    .span
                    .set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
            }
            // Valid when the OpenTelemetry layer has the span, that is while exporting.
            if let Some((trace_id, span_id, sampled)) = otel_ids(&trace.span) {
                trace.trace_id = trace_id;
                trace.span_id = span_id;
                trace.sampled = sampled;
                trace.exported = true;
            }
        }
        if !trace.span.is_disabled() {
            trace.span.record(
                "trace_id",
                crate::values::lower_hex(&trace.trace_id.to_be_bytes()),
            );
        }
        if let Some(why) = malformed {
            // Inside the request's span (entered only now: its parent is set), with the reason
            // only: the value is the caller's and is never logged.
            trace.span.in_scope(|| {
                tracing::debug!(reason = why, "traceparent ignored; a new trace is started")
            });
        }
        trace
    }

    /// The request's span.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        crate::values::lower_hex(&self.trace_id.to_be_bytes())
    }

    /// Whether the caller's `traceparent` was continued (false: the gateway started the trace).
    pub fn continued(&self) -> bool {
        self.continued
    }

    /// `traceparent` and `tracestate` for a call made within `call` (an [`upstream_span`]): the
    /// call's span is the parent when it is exported, otherwise the request's.
    pub fn outgoing(&self, call: &Span) -> (HeaderValue, Option<HeaderValue>) {
        let (span_id, sampled) = match otel_ids(call).filter(|_| self.exported) {
            Some((trace_id, span_id, sampled)) if trace_id == self.trace_id => (span_id, sampled),
            _ => (self.span_id, self.sampled),
        };
        let tp = w3c::format_traceparent(self.trace_id, span_id, sampled);
        (tp, self.tracestate.clone())
    }

    /// Records the request's outcome on its span while spans are exported: the team and
    /// operation (when known), the status and the code; a 5xx marks the span failed. Without
    /// export nothing is recorded: what is logged in the span after this is the request's own
    /// line, which carries them itself, or an audit write error naming the request id.
    pub fn finish(
        span: &Span,
        team: Option<&str>,
        operation: Option<&str>,
        status: u16,
        code: &str,
    ) {
        if !otlp::exporting() {
            return;
        }
        if let Some(t) = team {
            span.record("team", t);
        }
        if let Some(o) = operation {
            span.record("operation", o);
        }
        span.record("status", status);
        span.record("code", code);
        if status >= 500 {
            mark_error(span);
        }
    }
}

/// The OpenTelemetry ids of an exported span: (trace id, span id, sampled).
fn otel_ids(span: &Span) -> Option<(u128, u64, bool)> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        (
            u128::from_be_bytes(sc.trace_id().to_bytes()),
            u64::from_be_bytes(sc.span_id().to_bytes()),
            sc.is_sampled(),
        )
    })
}

fn new_trace_id() -> u128 {
    loop {
        let id = rand::random::<u128>();
        if id != 0 {
            return id;
        }
    }
}

fn new_span_id() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}
