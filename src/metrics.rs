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

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.0.registry).is_err() {
            out.clear();
        }
        out
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
