//! Prometheus metrics (DESIGN 1.6 names). Label values come from configuration (team names,
//! operation ids, issuers, credential names) or from fixed lists in the code (codes, reasons,
//! results, status classes), never from raw request input.
//!
//! Most series are counted where their event happens. A few are read when `/metrics` is scraped
//! instead, from the component that owns them ([`Sampled`]: the audit queue, the quota backend's
//! failures) or from the operating system ([`process::ProcessStats`]).

mod format;
pub mod process;

use std::sync::{Arc, OnceLock};

pub use format::Format;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
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
struct UpstreamResponseLabels {
    operation: String,
    status_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JwksFetchLabels {
    issuer: String,
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
    upstream_responses: Family<UpstreamResponseLabels, Counter>,
    jwks_fetches: Family<JwksFetchLabels, Counter>,
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
        let upstream_responses = Family::<UpstreamResponseLabels, Counter>::default();
        let jwks_fetches = Family::<JwksFetchLabels, Counter>::default();
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
            "gateway_upstream_responses",
            "Answers Greenhouse gave, by operation and status class (2xx, 3xx, 4xx, 5xx)",
            upstream_responses.clone(),
        );
        registry.register(
            "gateway_jwks_fetches",
            "JWKS fetch attempts, by issuer and result (success, error, invalid)",
            jwks_fetches.clone(),
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
            upstream_responses,
            jwks_fetches,
            jwt_rejections,
            token_fetches,
        }))
    }

    /// Records one answered request. `team` and `operation` are config names or `none`.
    pub fn request(&self, team: &str, operation: &str, code: &str, seconds: f64) {
        self.requests_series(team, operation, code).inc();
        self.duration_series(team, operation).observe(seconds);
    }

    /// [`Metrics::request`] for a request whose team and operation are known, through their
    /// [`TeamOpSeries`]: a forwarded request's counter and every request's duration are then
    /// updated without building or hashing a label set.
    pub fn team_op_request(&self, series: &TeamOpSeries, code: &str, seconds: f64) {
        let (team, operation) = (series.team.as_str(), series.operation.as_str());
        if code == crate::error::FORWARDED {
            series
                .forwarded
                .get_or_init(|| self.requests_series(team, operation, code))
                .inc();
        } else {
            self.requests_series(team, operation, code).inc();
        }
        series
            .duration
            .get_or_init(|| self.duration_series(team, operation))
            .observe(seconds);
    }

    fn requests_series(&self, team: &str, operation: &str, code: &str) -> Counter {
        self.0
            .requests
            .get_or_create(&RequestLabels {
                team: team.into(),
                operation: operation.into(),
                code: code.into(),
            })
            .clone()
    }

    fn duration_series(&self, team: &str, operation: &str) -> Histogram {
        self.0
            .duration
            .get_or_create(&TeamOpLabels {
                team: team.into(),
                operation: operation.into(),
            })
            .clone()
    }

    /// Time Greenhouse took to answer one call of `operation` (its [`OpSeries`]).
    pub fn upstream(&self, series: &OpSeries, seconds: f64) {
        series
            .duration
            .get_or_init(|| {
                self.0
                    .upstream_duration
                    .get_or_create(&OpLabels {
                        operation: series.operation.clone(),
                    })
                    .clone()
            })
            .observe(seconds);
    }

    /// One answer from Greenhouse (every answer counts, a 401 replayed with a fresh token too).
    pub fn upstream_response(&self, series: &OpSeries, status: http::StatusCode) {
        const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
        let class = match status.as_u16() {
            100..=199 => 0,
            200..=299 => 1,
            300..=399 => 2,
            400..=499 => 3,
            _ => 4,
        };
        series.responses[class]
            .get_or_init(|| {
                self.0
                    .upstream_responses
                    .get_or_create(&UpstreamResponseLabels {
                        operation: series.operation.clone(),
                        status_class: CLASSES[class].into(),
                    })
                    .clone()
            })
            .inc();
    }

    /// One JWKS fetch attempt of a configured issuer; `result` is `success`, `error` (no
    /// document: transport, status, timeout, unreadable file) or `invalid` (no usable key in it).
    pub fn jwks_fetch(&self, issuer: &str, result: &'static str) {
        self.0
            .jwks_fetches
            .get_or_create(&JwksFetchLabels {
                issuer: issuer.into(),
                result: result.into(),
            })
            .inc();
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

    /// One more request of `team` in flight until the returned guard is dropped (counted in
    /// its [`TeamSeries`]).
    pub fn inflight(&self, series: &TeamSeries) -> InflightGuard {
        let g = series
            .inflight
            .get_or_init(|| {
                self.0
                    .inflight
                    .get_or_create(&TeamLabels {
                        team: series.team.clone(),
                    })
                    .clone()
            })
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

    /// The series counted here (not the sampled ones), as OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.0.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The whole exposition for a scrape: the series counted here, `sampled` and the process's
    /// own, in `format`.
    pub fn expose(&self, format: Format, sampled: &Sampled) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut now = Registry::default();
        now.register(
            "gateway_audit_queue_depth",
            "Audit records queued for the writer and not yet written",
            ConstGauge::new(i64::try_from(sampled.audit_queue_depth).unwrap_or(i64::MAX)),
        );
        now.register(
            "gateway_quota_backend_errors",
            "Quota decisions Redis could not make (an error or timeout, or Redis known to be down); on_backend_error decided them",
            ConstCounter::new(sampled.quota_backend_errors),
        );
        register_process(&mut now, &process::ProcessStats::read());
        let mut out = String::new();
        let encoded = encode_registry(&mut out, &self.0.registry)
            .and_then(|()| encode_registry(&mut out, &now))
            .and_then(|()| encode_eof(&mut out));
        if encoded.is_err() {
            out.clear();
        }
        match format {
            Format::OpenMetrics => out,
            Format::Prometheus => format::to_prometheus(&out),
        }
    }
}

/// Values owned by other components, read when `/metrics` is scraped.
#[derive(Debug, Default, Clone)]
pub struct Sampled {
    /// Records queued for the audit writer.
    pub audit_queue_depth: u64,
    /// Quota decisions made without Redis since the start (see `Quotas::backend_errors`).
    pub quota_backend_errors: u64,
}

fn register_process(r: &mut Registry, p: &process::ProcessStats) {
    if let Some(v) = p.cpu_seconds {
        r.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            ConstCounter::new(v),
        );
    }
    let gauges: [(&str, &str, Option<u64>); 4] = [
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            p.resident_memory_bytes,
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            p.virtual_memory_bytes,
        ),
        (
            "process_open_fds",
            "Number of open file descriptors",
            p.open_fds,
        ),
        (
            "process_max_fds",
            "Maximum number of open file descriptors",
            p.max_fds,
        ),
    ];
    for (name, help, value) in gauges {
        if let Some(v) = value {
            r.register(
                name,
                help,
                ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)),
            );
        }
    }
    if let Some(v) = p.start_time_seconds {
        r.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            ConstGauge::new(v),
        );
    }
}

/// The series one team's requests to one operation update, each found in its family (a label
/// set built and hashed) the first time it is needed and then used directly. Made with the
/// labels' values and kept by the policy per team and operation, so a reload starts afresh; the
/// series live on in the families.
#[derive(Debug)]
pub struct TeamOpSeries {
    team: String,
    operation: String,
    forwarded: OnceLock<Counter>,
    duration: OnceLock<Histogram>,
}

impl TeamOpSeries {
    pub fn new(team: &str, operation: &str) -> TeamOpSeries {
        TeamOpSeries {
            team: team.to_string(),
            operation: operation.to_string(),
            forwarded: OnceLock::new(),
            duration: OnceLock::new(),
        }
    }
}

/// An operation's upstream series (see [`TeamOpSeries`]).
#[derive(Debug)]
pub struct OpSeries {
    operation: String,
    duration: OnceLock<Histogram>,
    /// By status class, 1xx to 5xx.
    responses: [OnceLock<Counter>; 5],
}

impl OpSeries {
    pub fn new(operation: &str) -> OpSeries {
        OpSeries {
            operation: operation.to_string(),
            duration: OnceLock::new(),
            responses: Default::default(),
        }
    }
}

/// A team's in-flight gauge (see [`TeamOpSeries`]).
#[derive(Debug)]
pub struct TeamSeries {
    team: String,
    inflight: OnceLock<Gauge>,
}

impl TeamSeries {
    pub fn new(team: &str) -> TeamSeries {
        TeamSeries {
            team: team.to_string(),
            inflight: OnceLock::new(),
        }
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

    #[test]
    fn exposition_holds_sampled_and_process_series_in_either_format() {
        let m = Metrics::new();
        m.upstream_response(
            &OpSeries::new("listPartnerJobs"),
            http::StatusCode::NOT_FOUND,
        );
        m.jwks_fetch("https://idp.example", "success");
        let sampled = Sampled {
            audit_queue_depth: 3,
            quota_backend_errors: 7,
        };
        let om = m.expose(Format::OpenMetrics, &sampled);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert_eq!(om.matches("# EOF").count(), 1, "{om}");
        for line in [
            "gateway_upstream_responses_total{operation=\"listPartnerJobs\",status_class=\"4xx\"} 1",
            "gateway_jwks_fetches_total{issuer=\"https://idp.example\",result=\"success\"} 1",
            "gateway_audit_queue_depth 3",
            "gateway_quota_backend_errors_total 7",
            "# TYPE gateway_quota_backend_errors counter",
        ] {
            assert!(om.lines().any(|l| l == line), "{line} in\n{om}");
        }
        #[cfg(target_os = "linux")]
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(om.lines().any(|l| l.starts_with(name)), "{name} in\n{om}");
        }
        let text = m.expose(Format::Prometheus, &sampled);
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains("# TYPE gateway_quota_backend_errors_total counter\n"),
            "{text}"
        );
        assert!(text.contains("gateway_audit_queue_depth 3\n"), "{text}");
    }

    fn line_of<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn series_found_once_count_as_the_families_do_and_appear_only_when_used() {
        let m = Metrics::new();
        let series = TeamOpSeries::new("sourcing", "listPartnerJobs");
        // A refusal first: its code's series and the duration, not the forwarded one.
        m.team_op_request(&series, "quota_exceeded", 0.01);
        let text = m.render();
        assert!(
            line_of(&text, "gateway_requests_total{").len() == 1
                && text.contains("code=\"quota_exceeded\"} 1"),
            "{text}"
        );
        for _ in 0..3 {
            m.team_op_request(&series, crate::error::FORWARDED, 0.01);
        }
        // A reload's fresh handles, and the by-name path, count in the same series.
        let after_reload = TeamOpSeries::new("sourcing", "listPartnerJobs");
        m.team_op_request(&after_reload, crate::error::FORWARDED, 0.01);
        m.request("sourcing", "listPartnerJobs", crate::error::FORWARDED, 0.01);
        let text = m.render();
        assert!(
            text.contains("gateway_requests_total{team=\"sourcing\",operation=\"listPartnerJobs\",code=\"forwarded\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("gateway_request_duration_seconds_count{team=\"sourcing\",operation=\"listPartnerJobs\"} 6"),
            "{text}"
        );

        let op = OpSeries::new("listPartnerJobs");
        m.upstream(&op, 0.02);
        m.upstream(&OpSeries::new("listPartnerJobs"), 0.02);
        for status in [200, 201, 404, 503, 200] {
            let status = http::StatusCode::from_u16(status).unwrap();
            m.upstream_response(&op, status);
        }
        let text = m.render();
        assert!(
            text.contains(
                "gateway_upstream_duration_seconds_count{operation=\"listPartnerJobs\"} 2"
            ),
            "{text}"
        );
        let responses = line_of(&text, "gateway_upstream_responses_total{");
        assert_eq!(responses.len(), 3, "no 1xx or 3xx series: {text}");
        for (class, n) in [("2xx", 3), ("4xx", 1), ("5xx", 1)] {
            let want = format!(
                "gateway_upstream_responses_total{{operation=\"listPartnerJobs\",status_class=\"{class}\"}} {n}"
            );
            assert!(responses.contains(&want.as_str()), "{want} in {text}");
        }

        let team = TeamSeries::new("sourcing");
        let a = m.inflight(&team);
        let b = m.inflight(&TeamSeries::new("sourcing"));
        assert!(
            m.render()
                .contains("gateway_inflight_requests{team=\"sourcing\"} 2")
        );
        drop((a, b));
        assert!(
            m.render()
                .contains("gateway_inflight_requests{team=\"sourcing\"} 0")
        );
    }
}
