//! One request's call to Greenhouse, repeatable with a fresh credential.

use super::*;
use crate::telemetry;
use tracing::Instrument;

/// One request's upstream call, repeatable with another credential.
pub(super) struct Upstream<'a> {
    pub(super) gw: &'a Gateway,
    pub(super) policy: &'a Policy,
    pub(super) parts: &'a http::request::Parts,
    pub(super) query: Option<&'a str>,
    pub(super) body: Bytes,
    pub(super) on_behalf_of: &'a str,
    pub(super) request_id: &'a str,
    pub(super) peer: SocketAddr,
}

impl Upstream<'_> {
    pub(super) async fn send(
        &self,
        route: &Route,
        authorization: HeaderValue,
        ctx: &mut Context,
    ) -> Result<Response<Incoming>, GatewayError> {
        let (policy, rt) = (self.policy, &self.gw.runtime);
        let op = &route.op;
        // The account's budget at Greenhouse, shared by every team and replica.
        let waited = if policy.config.quota.upstream.is_some() {
            telemetry::upstream_budget_span()
        } else {
            tracing::Span::none()
        };
        let slot = policy
            .quotas
            .upstream_slot()
            .instrument(waited.clone())
            .await;
        waited.record(
            "result",
            match &slot {
                Ok(()) => "admitted",
                Err(NoSlot::Later(_)) => "later",
                Err(NoSlot::BackendUnavailable) => "backend_unavailable",
            },
        );
        drop(waited);
        slot.map_err(|no| match no {
            NoSlot::Later(wait) => GatewayError::UpstreamRateLimited {
                retry_after_secs: ceil_secs(wait),
            },
            NoSlot::BackendUnavailable => {
                rt.metrics.quota_rejection(ctx.team(), &op.id, "backend");
                GatewayError::QuotaBackendUnavailable
            }
        })?;
        // This call's span is the parent Greenhouse sees.
        let call = telemetry::upstream_span(&op.id);
        let (traceparent, tracestate) = match &ctx.trace {
            Some(t) => t.outgoing(&call),
            None => {
                RequestTrace::start(tracing::Span::none(), &http::HeaderMap::new()).outgoing(&call)
            }
        };
        let peer_text;
        let headers = proxy::upstream_headers(
            &self.parts.headers,
            Outbound {
                upstream_host: &policy.upstream_host,
                authorization,
                on_behalf_of: self.on_behalf_of,
                request_id: self.request_id,
                client_addr: match ctx.record.client_addr.as_deref() {
                    Some(addr) => addr,
                    None => {
                        peer_text = self.peer.ip().to_string();
                        &peer_text
                    }
                },
                traceparent,
                tracestate,
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
        .instrument(call.clone())
        .await;
        match &result {
            Ok(r) => {
                call.record("status", r.status().as_u16());
                if r.status().is_server_error() {
                    telemetry::mark_error(&call);
                }
            }
            Err(e) => {
                call.record("code", e.code());
                telemetry::mark_error(&call);
            }
        }
        drop(call);
        let took = sent.elapsed();
        rt.metrics.upstream(&route.series, took.as_secs_f64());
        ctx.record.upstream_duration_ms =
            Some(ctx.record.upstream_duration_ms.unwrap_or(0.0) + took.as_secs_f64() * 1000.0);
        if let Ok(r) = &result {
            ctx.record.upstream_status = Some(r.status().as_u16());
            rt.metrics.upstream_response(&route.series, r.status());
        }
        result
    }
}
