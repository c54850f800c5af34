//! Prometheus metrics (DESIGN 1.6 names). Label values come from configuration (team names,
//! operation ids, fixed reason codes), never from raw request input.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    team: String,
    operation: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TeamOpLabels {
    team: String,
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenFetchLabels {
    credential: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    team: String,
    operation: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ValidationLabels {
    team: String,
    operation: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TeamLabels {
    team: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<TeamOpLabels, Histogram, fn() -> Histogram>,
    upstream_duration: Family<OpLabels, Histogram, fn() -> Histogram>,
    jwt_rejections: Family<ReasonLabels, Counter>,
    token_fetches: Family<TokenFetchLabels, Counter>,
    quota_rejections: Family<QuotaLabels, Counter>,
    quota_backend_allowed: Counter,
    validation_failures: Family<ValidationLabels, Counter>,
    spec_drift: Family<OpLabels, Counter>,
    inflight: Family<TeamLabels, Gauge>,
    audit_records: Counter,
    audit_errors: Counter,
    config_reloads: Family<ResultLabels, Counter>,
}

/// Cheap to clone; shared by every request.
#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<TeamOpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let upstream_duration =
            Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let jwt_rejections = Family::<ReasonLabels, Counter>::default();
        let token_fetches = Family::<TokenFetchLabels, Counter>::default();
        let build_info = Family::<BuildLabels, Gauge>::default();
        let quota_rejections = Family::<QuotaLabels, Counter>::default();
        let quota_backend_allowed = Counter::default();
        let validation_failures = Family::<ValidationLabels, Counter>::default();
        let spec_drift = Family::<OpLabels, Counter>::default();
        let inflight = Family::<TeamLabels, Gauge>::default();
        let audit_records = Counter::default();
        let audit_errors = Counter::default();
        let config_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "gateway_config_reloads",
            "Configuration reloads, by result (success, invalid, restart_required)",
            config_reloads.clone(),
        );
        registry.register(
            "gateway_quota_rejections",
            "Requests refused by a quota, by team, operation and kind",
            quota_rejections.clone(),
        );
        registry.register(
            "gateway_quota_backend_allowed",
            "Requests admitted without a quota decision because the backend failed (on_backend_error = allow)",
            quota_backend_allowed.clone(),
        );
        registry.register(
            "gateway_validation_failures",
            "Requests that did not match the spec, by team, operation and mode",
            validation_failures.clone(),
        );
        registry.register(
            "gateway_spec_drift",
            "Upstream responses that did not match the spec, by operation",
            spec_drift.clone(),
        );
        registry.register(
            "gateway_inflight_requests",
            "Requests admitted and not finished, by team",
            inflight.clone(),
        );
        registry.register(
            "gateway_audit_records",
            "Audit records written",
            audit_records.clone(),
        );
        registry.register(
            "gateway_audit_errors",
            "Audit records that could not be written",
            audit_errors.clone(),
        );
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register(
            "gateway_requests",
            "Requests answered, by team, operation and code",
            requests.clone(),
        );
        registry.register(
            "gateway_request_duration_seconds",
            "Time to answer a request",
            duration.clone(),
        );
        registry.register(
            "gateway_upstream_duration_seconds",
            "Time Greenhouse took to answer",
            upstream_duration.clone(),
        );
        registry.register(
            "gateway_jwt_rejections",
            "Caller tokens refused, by reason",
            jwt_rejections.clone(),
        );
        registry.register(
            "gateway_upstream_token_fetches",
            "Upstream token requests, by credential and result",
            token_fetches.clone(),
        );
        registry.register("gateway_build_info", "Build information", build_info);
        Metrics(Arc::new(Inner {
            config_reloads,
            quota_rejections,
            quota_backend_allowed,
            validation_failures,
            spec_drift,
            inflight,
            audit_records,
            audit_errors,
            registry,
            requests,
            duration,
            upstream_duration,
            jwt_rejections,
            token_fetches,
        }))
    }

    /// Records one answered request. `team` and `operation` are config names or `none`.
    pub fn request(&self, team: &str, operation: &str, code: &str, seconds: f64) {
        self.0
            .requests
            .get_or_create(&RequestLabels {
                team: team.into(),
                operation: operation.into(),
                code: code.into(),
            })
            .inc();
        self.0
            .duration
            .get_or_create(&TeamOpLabels {
                team: team.into(),
                operation: operation.into(),
            })
            .observe(seconds);
    }

    pub fn upstream(&self, operation: &str, seconds: f64) {
        self.0
            .upstream_duration
            .get_or_create(&OpLabels {
                operation: operation.into(),
            })
            .observe(seconds);
    }

    pub fn jwt_rejection(&self, reason: &'static str) {
        self.0
            .jwt_rejections
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn token_fetch(&self, credential: &str, result: &'static str) {
        self.0
            .token_fetches
            .get_or_create(&TokenFetchLabels {
                credential: credential.into(),
                result: result.into(),
            })
            .inc();
    }

    pub fn quota_rejection(&self, team: &str, operation: &str, kind: &str) {
        self.0
            .quota_rejections
            .get_or_create(&QuotaLabels {
                team: team.into(),
                operation: operation.into(),
                kind: kind.into(),
            })
            .inc();
    }

    /// One request admitted without a quota decision (`on_backend_error = "allow"`).
    pub fn quota_backend_allowed(&self) {
        self.0.quota_backend_allowed.inc();
    }

    pub fn validation_failure(&self, team: &str, operation: &str, mode: &str) {
        self.0
            .validation_failures
            .get_or_create(&ValidationLabels {
                team: team.into(),
                operation: operation.into(),
                mode: mode.into(),
            })
            .inc();
    }

    pub fn spec_drift(&self, operation: &str) {
        self.0
            .spec_drift
            .get_or_create(&OpLabels {
                operation: operation.into(),
            })
            .inc();
    }

    /// One more request of `team` in flight until the returned guard is dropped.
    pub fn inflight(&self, team: &str) -> InflightGuard {
        let g = self
            .0
            .inflight
            .get_or_create(&TeamLabels { team: team.into() })
            .clone();
        g.inc();
        InflightGuard(g)
    }

    /// One reload attempt; `result` is `success`, `invalid` or `restart_required`.
    pub fn config_reload(&self, result: &'static str) {
        self.0
            .config_reloads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    pub fn audit_written(&self) {
        self.0.audit_records.inc();
    }

    pub fn audit_error(&self) {
        self.0.audit_errors.inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.0.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Decrements `gateway_inflight_requests` when dropped.
pub struct InflightGuard(Gauge);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_metrics_use_the_design_names() {
        let m = Metrics::new();
        m.request("sourcing", "listPartnerJobs", "ok", 0.01);
        m.jwt_rejection("expired");
        let text = m.render();
        assert!(text.contains("gateway_requests_total{team=\"sourcing\",operation=\"listPartnerJobs\",code=\"ok\"} 1"), "{text}");
        assert!(
            text.contains("gateway_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains("gateway_jwt_rejections_total{reason=\"expired\"} 1"),
            "{text}"
        );
        assert!(text.contains("gateway_build_info"), "{text}");
    }
}
