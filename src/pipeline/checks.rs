//! The team's quotas and the spec's schemas, as steps of the decision path.

use super::*;
use tracing::Instrument;

pub(super) async fn admit(
    gw: &Gateway,
    policy: &Policy,
    team: &TeamPolicy,
    route: &Route,
    ctx: &mut Context,
) -> Result<crate::quota::Admission, GatewayError> {
    let metrics = &gw.runtime.metrics;
    let span = crate::telemetry::quota_span(&team.team.name, &route.op.id);
    let decided = policy
        .quotas
        .admit_team(&team.quota, route.index)
        .instrument(span.clone())
        .await;
    match &decided {
        Ok(a) => span
            .record("decision", "admitted")
            .record("source", a.source()),
        Err(refusal) => span
            .record("decision", "refused")
            .record("kind", refusal.kind()),
    };
    drop(span);
    match decided {
        Ok(mut a) => {
            // Taken, not copied: nothing reads them from the admission after this.
            ctx.ratelimit = std::mem::take(&mut a.headers);
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
pub(super) fn check_query(
    gw: &Gateway,
    team: &TeamPolicy,
    route: &Route,
    raw: Option<&str>,
    ctx: &mut Context,
) -> Result<Option<String>, GatewayError> {
    let (op, name) = (&route.op, team.team.name.as_str());
    let mode = team.team.validation;
    let found = route.validators.inspect_query(raw);
    if found.undeclared.is_empty() && found.invalid.is_empty() {
        return Ok(raw.map(str::to_string));
    }
    // Counted alike in both modes, undeclared parameters included (report mode counts them too).
    gw.runtime
        .metrics
        .validation_failure(name, &op.id, mode.as_str());
    if mode == ValidationMode::Enforce {
        if !found.undeclared.is_empty() {
            return Err(GatewayError::UndeclaredQuery(found.undeclared));
        }
        return Err(GatewayError::ValidationFailed(found.invalid));
    }
    for n in &found.undeclared {
        ctx.validation.push(
            json!({"in": "query", "pointer": format!("/query/{n}"), "keyword": "undeclared"}),
        );
    }
    ctx.note_problems("query", &found.invalid);
    // Undeclared parameters are dropped (and recorded); malformed declared ones are recorded
    // and still forwarded.
    Ok(if found.undeclared.is_empty() {
        raw.map(str::to_string)
    } else {
        found.declared
    })
}

/// Media type, strict JSON and schema. Malformed JSON and wrong media types are refused in both
/// modes (Greenhouse could do nothing with them); schema violations are recorded in report mode.
pub(super) fn check_body(
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
        ctx.record.body_sha256 = Some(crate::values::lower_hex(&Sha256::digest(body)));
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
pub(super) fn too_large(policy: &Policy, route: Option<&Route>) -> GatewayError {
    GatewayError::PayloadTooLarge {
        limit: policy.config.limits.max_body_bytes,
        attachments: route.is_some_and(|r| r.validators.takes_attachments()),
    }
}
