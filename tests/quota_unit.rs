//! Quota decisions: GCRA rates with an injectable clock, daily quotas across UTC midnight,
//! concurrency leases, all-or-nothing spending, the upstream budget, the rate-limit headers, and
//! the Redis backend (exactness across replicas, key TTLs, outages and recovery).
//!
//! Redis tests start their own `redis-server` on a free port when it is on PATH (killed on
//! drop), else use `REDIS_URL`, else fail. Tests that stop or pause the server need their own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::redis::{RedisServer, free_port, test_redis};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use greenhouse_gateway::config::{self, Config, Problem};
use greenhouse_gateway::quota::{
    Backend, Limit, ManualClock, NoSlot, OnBackendError, OpLimits, QuotaOptions, QuotaSettings,
    Quotas, Refusal, TeamLimits, UpstreamBudget, validate_limit,
};
use greenhouse_gateway::values::Rate;

// ---------------------------------------------------------------------------------------------
// Helpers

const DAY: u64 = 86_400;
/// 2024-10-04 00:00:00 UTC.
const DAY0: Duration = Duration::from_secs(20_000 * DAY);
/// Noon of that day.
const NOON: Duration = Duration::from_secs(20_000 * DAY + 12 * 3600);

fn rate(count: u32, per: Duration) -> Rate {
    Rate { count, per }
}

fn per_sec(count: u32) -> Rate {
    rate(count, Duration::from_secs(1))
}

fn per_hour(count: u32) -> Rate {
    rate(count, Duration::from_secs(3600))
}

fn limit(rate: Rate, burst: u32) -> Limit {
    Limit {
        rate: Some(rate),
        burst: Some(burst),
    }
}

fn team_rate(r: Rate, burst: u32) -> TeamLimits {
    TeamLimits {
        limit: limit(r, burst),
        ..TeamLimits::default()
    }
}

fn op(limit: Limit, daily: Option<u64>) -> OpLimits {
    OpLimits { limit, daily }
}

fn memory(teams: Vec<(&str, TeamLimits)>) -> QuotaSettings {
    QuotaSettings {
        teams: teams
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .collect::<BTreeMap<_, _>>(),
        ..QuotaSettings::default()
    }
}

fn at(clock_start: Duration, settings: QuotaSettings) -> (Quotas, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(clock_start));
    (Quotas::with_clock(settings, clock.clone()), clock)
}

fn header<'a>(headers: &'a [(http::HeaderName, http::HeaderValue)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.to_str().expect("visible ASCII"))
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

async fn admitted_count(q: &Quotas, team: &str, op: &str, n: usize) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        if q.admit(team, op).await.is_ok() {
            ok += 1;
        }
    }
    ok
}

/// Runs `n` admits at once spread over `replicas`; returns how many were admitted.
async fn concurrent_admits(replicas: &[Quotas], team: &str, op: &str, n: usize) -> usize {
    let mut tasks = Vec::new();
    for i in 0..n {
        let q = replicas[i % replicas.len()].clone();
        let (team, op) = (team.to_string(), op.to_string());
        tasks.push(tokio::spawn(
            async move { q.admit(&team, &op).await.is_ok() },
        ));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap() {
            ok += 1;
        }
    }
    ok
}

fn prefix(test: &str) -> String {
    format!("ghgwtest:{test}:{:08x}", rand::random::<u32>())
}

fn redis_settings(
    url: &str,
    key_prefix: &str,
    teams: Vec<(&str, TeamLimits)>,
    on_backend_error: OnBackendError,
    timeout: Duration,
) -> QuotaSettings {
    QuotaSettings {
        backend: Backend::Redis {
            url: url.to_string(),
            timeout,
            key_prefix: key_prefix.to_string(),
            ca_pem: None,
        },
        on_backend_error,
        ..memory(teams)
    }
}

async fn redis_quotas(settings: QuotaSettings) -> Quotas {
    Quotas::new_with_options(
        settings,
        QuotaOptions {
            probe_interval: Duration::from_millis(100),
            recheck_interval: Duration::from_millis(100),
            ..QuotaOptions::default()
        },
    )
    .await
}

/// Redis quotas for one team `t` limited only to `cap` requests at once (keys under `prefix`).
async fn redis_concurrency_quotas(url: &str, prefix: &str, cap: u32) -> Quotas {
    let t = TeamLimits {
        concurrency: Some(cap),
        daily: None,
        ..TeamLimits::default()
    };
    redis_quotas(redis_settings(
        url,
        prefix,
        vec![("t", t)],
        OnBackendError::Deny,
        Duration::from_secs(2),
    ))
    .await
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Memory backend: exactness and GCRA with an injectable clock

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_twice_the_burst_at_once_admits_exactly_the_burst() {
    let q = Quotas::new(memory(vec![("t", team_rate(per_hour(10), 10))])).await;
    assert_eq!(concurrent_admits(&[q], "t", "op", 20).await, 10);
}

#[tokio::test]
async fn after_the_burst_one_more_is_admitted_exactly_one_interval_later() {
    let (q, clock) = at(NOON, memory(vec![("t", team_rate(per_sec(10), 3))]));
    assert_eq!(admitted_count(&q, "t", "op", 3).await, 3);
    match q.admit("t", "op").await {
        Err(Refusal::RateLimited { retry_after, .. }) => {
            assert_eq!(retry_after, Duration::from_millis(100))
        }
        other => panic!("expected a rate refusal, got {other:?}"),
    }
    clock.advance(Duration::from_millis(99));
    match q.admit("t", "op").await {
        Err(Refusal::RateLimited { retry_after, .. }) => {
            assert_eq!(retry_after, Duration::from_millis(1))
        }
        other => panic!("expected a rate refusal, got {other:?}"),
    }
    clock.advance(Duration::from_millis(1));
    assert!(q.admit("t", "op").await.is_ok());
    assert!(q.admit("t", "op").await.is_err());
}

#[tokio::test]
async fn a_burst_spent_just_before_a_second_boundary_is_not_granted_again_after_it() {
    // A fixed one-second window would grant 10 at x.9 s and 10 more at (x+1).0 s.
    let (q, clock) = at(NOON, memory(vec![("t", team_rate(per_sec(10), 10))]));
    clock.advance(Duration::from_millis(900));
    assert_eq!(admitted_count(&q, "t", "op", 10).await, 10);
    clock.advance(Duration::from_millis(100));
    assert_eq!(admitted_count(&q, "t", "op", 10).await, 1);
}

#[tokio::test]
async fn daily_quota_exhausted_at_23_59_59_is_admitted_again_at_00_00_00_utc() {
    let mut t = TeamLimits::default();
    t.operations
        .insert("create".into(), op(Limit::default(), Some(3)));
    let (q, clock) = at(DAY0 - Duration::from_secs(3), memory(vec![("t", t)]));
    assert_eq!(admitted_count(&q, "t", "create", 3).await, 3);
    clock.set(DAY0 - Duration::from_secs(1));
    match q.admit("t", "create").await {
        Err(r @ Refusal::DailyQuotaExhausted { .. }) => {
            assert_eq!(r.retry_after(), Some(Duration::from_secs(1)));
            assert_eq!(r.kind(), "daily");
            assert_eq!(r.code(), "daily_quota_exhausted");
        }
        other => panic!("expected the daily quota refusal, got {other:?}"),
    }
    clock.set(DAY0);
    assert!(q.admit("t", "create").await.is_ok());
}

#[tokio::test]
async fn refused_requests_spend_nothing_so_one_interval_later_exactly_one_is_admitted() {
    let (q, clock) = at(NOON, memory(vec![("t", team_rate(per_sec(10), 2))]));
    assert_eq!(admitted_count(&q, "t", "op", 2).await, 2);
    assert_eq!(admitted_count(&q, "t", "op", 50).await, 0);
    clock.advance(Duration::from_millis(100));
    assert_eq!(admitted_count(&q, "t", "op", 5).await, 1);
}

#[tokio::test]
async fn a_request_refused_by_its_operation_spends_nothing_from_the_team() {
    let mut t = team_rate(per_hour(2), 2);
    t.operations
        .insert("a".into(), op(limit(per_hour(1), 1), Some(10)));
    let (q, _clock) = at(NOON, memory(vec![("t", t)]));
    assert!(q.admit("t", "a").await.is_ok());
    assert_eq!(admitted_count(&q, "t", "a", 5).await, 0);
    // the team still has its second request
    assert!(q.admit("t", "b").await.is_ok());
    assert!(q.admit("t", "b").await.is_err());
    let snap = q.snapshot();
    assert_eq!(
        snap["teams"]["t"]["usage"]["operations"]["a"]["daily_used"],
        1
    );
}

#[tokio::test]
async fn a_request_refused_by_the_team_rate_spends_nothing_from_the_daily_quota() {
    let mut t = team_rate(per_sec(10), 1);
    t.operations
        .insert("create".into(), op(Limit::default(), Some(2)));
    let (q, clock) = at(NOON, memory(vec![("t", t)]));
    assert!(q.admit("t", "create").await.is_ok());
    assert_eq!(admitted_count(&q, "t", "create", 5).await, 0);
    clock.advance(Duration::from_millis(100));
    assert!(q.admit("t", "create").await.is_ok());
    clock.advance(Duration::from_millis(100));
    assert!(matches!(
        q.admit("t", "create").await,
        Err(Refusal::DailyQuotaExhausted { .. })
    ));
}

#[tokio::test]
async fn concurrency_cap_is_released_when_the_admission_drops() {
    let t = TeamLimits {
        concurrency: Some(2),
        daily: None,
        ..TeamLimits::default()
    };
    let (q, _clock) = at(NOON, memory(vec![("t", t)]));
    let a = q.admit("t", "op").await.unwrap();
    let _b = q.admit("t", "op").await.unwrap();
    match q.admit("t", "op").await {
        Err(r @ Refusal::ConcurrencyLimited { .. }) => {
            assert_eq!(r.retry_after(), Some(Duration::from_secs(1)));
            assert_eq!(r.kind(), "concurrency");
        }
        other => panic!("expected a concurrency refusal, got {other:?}"),
    }
    drop(a);
    assert!(q.admit("t", "op").await.is_ok());
}

#[tokio::test]
async fn a_concurrency_refusal_spends_no_rate() {
    let t = TeamLimits {
        concurrency: Some(1),
        daily: None,
        ..team_rate(per_hour(2), 2)
    };
    let (q, _clock) = at(NOON, memory(vec![("t", t)]));
    let a = q.admit("t", "op").await.unwrap();
    for _ in 0..5 {
        assert!(matches!(
            q.admit("t", "op").await,
            Err(Refusal::ConcurrencyLimited { .. })
        ));
    }
    drop(a);
    assert!(q.admit("t", "op").await.is_ok(), "the second of the burst");
}

#[tokio::test]
async fn one_teams_exhaustion_leaves_other_teams_untouched() {
    let (q, _clock) = at(
        NOON,
        memory(vec![
            ("a", team_rate(per_hour(2), 2)),
            ("b", team_rate(per_hour(2), 2)),
        ]),
    );
    assert_eq!(admitted_count(&q, "a", "op", 5).await, 2);
    assert_eq!(admitted_count(&q, "b", "op", 5).await, 2);
}

#[tokio::test]
async fn a_team_without_limits_is_admitted_without_headers() {
    let (q, _clock) = at(NOON, memory(vec![("free", TeamLimits::default())]));
    for team in ["free", "not-configured"] {
        let a = q.admit(team, "op").await.unwrap();
        assert!(a.headers.is_empty());
        assert_eq!(a.source(), "none");
    }
}

// ---------------------------------------------------------------------------------------------
// Rate-limit headers (draft-ietf-httpapi-ratelimit-headers, structured fields)

fn sourcing() -> TeamLimits {
    let mut t = TeamLimits {
        concurrency: Some(16),
        daily: None,
        ..team_rate(per_sec(20), 20)
    };
    t.operations.insert(
        "createPartnerCandidate".into(),
        op(
            Limit {
                rate: Some(per_sec(5)),
                burst: None,
            },
            Some(5000),
        ),
    );
    t
}

#[tokio::test]
async fn an_admission_carries_ratelimit_policy_and_ratelimit_for_every_limit_that_applies() {
    let (q, _clock) = at(NOON, memory(vec![("sourcing", sourcing())]));
    let mut a = q.admit("sourcing", "createPartnerCandidate").await.unwrap();
    let headers = std::mem::take(&mut a.headers);
    assert_eq!(
        header(&headers, "RateLimit-Policy"),
        "\"team\";q=20;w=1, \"team-concurrency\";q=16;qu=\"concurrent-requests\", \
         \"createPartnerCandidate\";q=5;w=1, \"createPartnerCandidate-daily\";q=5000;w=86400"
    );
    assert_eq!(
        header(&headers, "RateLimit"),
        "\"team\";r=19;t=1, \"team-concurrency\";r=15, \"createPartnerCandidate\";r=4;t=1, \
         \"createPartnerCandidate-daily\";r=4999;t=43200"
    );
    let other = q.admit("sourcing", "listPartnerJobs").await.unwrap();
    assert_eq!(
        header(&other.headers, "RateLimit"),
        "\"team\";r=18;t=1, \"team-concurrency\";r=14"
    );
}

#[tokio::test]
async fn a_rate_refusal_carries_headers_with_nothing_remaining_for_the_refusing_policy() {
    let (q, _clock) = at(NOON, memory(vec![("sourcing", sourcing())]));
    let _held: Vec<_> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(q.admit("sourcing", "createPartnerCandidate").await.unwrap());
        }
        v
    };
    let refusal = q
        .admit("sourcing", "createPartnerCandidate")
        .await
        .unwrap_err();
    assert_eq!(refusal.kind(), "rate");
    assert_eq!(refusal.retry_after(), Some(Duration::from_millis(200)));
    let headers = refusal.headers();
    assert!(header(&headers, "RateLimit-Policy").starts_with("\"team\";q=20;w=1"));
    assert_eq!(
        header(&headers, "RateLimit"),
        "\"team\";r=15;t=1, \"team-concurrency\";r=11, \"createPartnerCandidate\";r=0;t=1, \
         \"createPartnerCandidate-daily\";r=4995;t=43200"
    );
}

#[tokio::test]
async fn a_burst_above_the_rate_is_advertised_as_a_vendor_parameter() {
    let (q, _clock) = at(NOON, memory(vec![("t", team_rate(per_sec(20), 40))]));
    let a = q.admit("t", "op").await.unwrap();
    assert_eq!(
        header(&a.headers, "RateLimit-Policy"),
        "\"team\";q=20;w=1;ghgw-burst=40"
    );
    assert_eq!(header(&a.headers, "RateLimit"), "\"team\";r=39;t=1");
}

// ---------------------------------------------------------------------------------------------
// Validation helpers

#[test]
fn validate_limit_reports_every_problem_with_its_key() {
    let problems = validate_limit(Some("many/s"), Some(0)).unwrap_err();
    let keys: Vec<_> = problems.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["rate", "burst"]);
    let problems = validate_limit(None, Some(5)).unwrap_err();
    assert_eq!(problems[0].0, "burst");
    assert!(problems[0].1.contains("needs a rate"));
    assert_eq!(
        validate_limit(Some("50/10s"), None),
        Ok(Limit {
            rate: Some(rate(50, Duration::from_secs(10))),
            burst: None
        })
    );
    assert_eq!(validate_limit(None, None), Ok(Limit::default()));
    assert!(validate_limit(Some("5/s"), Some(u64::from(u32::MAX) + 1)).is_err());
}

// ---------------------------------------------------------------------------------------------
// Quota configuration, through `config::load` (the rules that run in production)

/// Issuer, token endpoint and JWKS of the configs below; `load` never contacts them.
const ORIGIN: &str = "http://127.0.0.1:18089";

/// Loads a valid gateway.toml with `upstream_extra` added to `[upstream]` and `extra` appended
/// (a `[quota]` table), and one team `sourcing` (allowed `listPartnerJobs`) whose file has
/// `team_extra` appended, all written to a fresh folder.
fn load_config(
    upstream_extra: &str,
    extra: &str,
    team_extra: &str,
) -> Result<Config, Vec<Problem>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let gateway = format!(
        r#"[listen]
addr = "127.0.0.1:18080"

[upstream]
base_url = "{ORIGIN}/v1/partner"
{upstream_extra}

[credentials.default]
kind = "oauth2_client_credentials"
token_url = "{ORIGIN}/oauth/token"
client_id = "gateway-test"
client_secret = {{ value = "test-client-secret" }}

[[issuers]]
issuer = "{ORIGIN}"
audiences = ["greenhouse-gateway"]
jwks_url = "{ORIGIN}/.well-known/jwks.json"
algorithms = ["ES256"]

{extra}
"#
    );
    let team = format!(
        r#"name = "sourcing"
operations = ["listPartnerJobs"]
credential = "default"

[[members]]
iss = "{ORIGIN}"
sub = "svc-sourcing-*"

[on_behalf_of]
from_claim = "email"

{team_extra}
"#
    );
    std::fs::create_dir(dir.path().join("teams")).expect("teams dir");
    std::fs::write(dir.path().join("gateway.toml"), gateway).expect("write gateway.toml");
    std::fs::write(dir.path().join("teams/sourcing.toml"), team).expect("write team");
    config::load(&dir.path().join("gateway.toml"))
}

fn loaded(upstream_extra: &str, extra: &str, team_extra: &str) -> Config {
    load_config(upstream_extra, extra, team_extra).unwrap_or_else(|p| panic!("{p:#?}"))
}

fn refused(upstream_extra: &str, extra: &str, team_extra: &str) -> Vec<Problem> {
    match load_config(upstream_extra, extra, team_extra) {
        Ok(_) => panic!("loaded, expected problems: {upstream_extra} {extra} {team_extra}"),
        Err(problems) => problems,
    }
}

fn problem_keys(problems: &[Problem]) -> Vec<&str> {
    problems.iter().map(|p| p.key.as_str()).collect()
}

/// Asserts that exactly one problem was reported, at `file` (a file name) and `key`, with a
/// message containing `fragment`.
fn assert_only_problem(problems: &[Problem], file: &str, key: &str, fragment: &str) {
    assert_eq!(problem_keys(problems), [key], "{problems:#?}");
    assert!(problems[0].file.ends_with(file), "{problems:#?}");
    assert!(problems[0].message.contains(fragment), "{problems:#?}");
}

const REDIS_LOCAL: &str = "backend = \"redis\"\nredis_url = { value = \"redis://127.0.0.1:6379\" }";

#[test]
fn quota_backend_defaults_to_memory_and_a_redis_url_loads_with_the_default_timeout_and_prefix() {
    let cfg = loaded("", "", "");
    assert_eq!(cfg.quota.backend, Backend::Memory);
    assert_eq!(cfg.quota.on_backend_error, OnBackendError::Deny);
    let cfg = loaded("", &format!("[quota]\n{REDIS_LOCAL}"), "");
    assert_eq!(cfg.quota.backend, Backend::redis("redis://127.0.0.1:6379"));
}

#[test]
fn quota_backend_problems_are_all_reported_each_at_its_gateway_key() {
    let problems = refused(
        "",
        "[quota]\nbackend = \"redis\"\ntimeout = \"0ms\"\nkey_prefix = \"\"",
        "",
    );
    assert_eq!(
        problem_keys(&problems),
        ["quota.timeout", "quota.redis_url", "quota.key_prefix"],
        "{problems:#?}"
    );
    assert!(problems.iter().all(|p| p.file.ends_with("gateway.toml")));
    let problems = refused("", "[quota]\nbackend = \"etcd\"", "");
    assert_only_problem(
        &problems,
        "gateway.toml",
        "quota.backend",
        "must be \"memory\" or \"redis\"",
    );
}

#[test]
fn redis_url_that_is_not_redis_is_refused_without_echoing_it() {
    let secret = "https://:hunter2-canary@cache.internal:6380";
    let problems = refused(
        "",
        &format!("[quota]\nbackend = \"redis\"\nredis_url = {{ value = \"{secret}\" }}"),
        "",
    );
    assert_only_problem(&problems, "gateway.toml", "quota.redis_url", "redis://");
    assert!(!format!("{problems:?}").contains("hunter2"));
    assert!(!problems[0].to_string().contains("hunter2"));
    assert!(!format!("{:?}", Backend::redis(secret)).contains("hunter2"));
}

#[test]
fn redis_unix_socket_urls_are_refused_naming_the_two_accepted_schemes() {
    for url in ["redis+unix:///run/redis.sock", "unix:///run/redis.sock"] {
        let problems = refused(
            "",
            &format!("[quota]\nbackend = \"redis\"\nredis_url = {{ value = \"{url}\" }}"),
            "",
        );
        assert_only_problem(
            &problems,
            "gateway.toml",
            "quota.redis_url",
            "must start with redis:// or rediss://",
        );
    }
}

#[test]
fn key_prefix_of_letters_digits_and_dash_underscore_dot_colon_loads_and_any_other_is_refused() {
    let cfg = loaded(
        "",
        &format!("[quota]\n{REDIS_LOCAL}\nkey_prefix = \"ghgw:prod-1.eu_west\""),
        "",
    );
    assert!(matches!(
        cfg.quota.backend,
        Backend::Redis { ref key_prefix, .. } if key_prefix == "ghgw:prod-1.eu_west"
    ));
    for prefix in ["ghgw prod", "ghgw/prod", "ghgw{1}", "gräs"] {
        let problems = refused(
            "",
            &format!("[quota]\n{REDIS_LOCAL}\nkey_prefix = \"{prefix}\""),
            "",
        );
        assert_only_problem(
            &problems,
            "gateway.toml",
            "quota.key_prefix",
            "letters, digits and - _ . : only",
        );
    }
}

#[test]
fn on_backend_error_local_loads_and_an_unknown_value_is_refused_at_its_key() {
    let cfg = loaded("", "[quota]\non_backend_error = \"local\"", "");
    assert_eq!(cfg.quota.on_backend_error, OnBackendError::Local);
    let problems = refused("", "[quota]\non_backend_error = \"panic\"", "");
    assert_only_problem(
        &problems,
        "gateway.toml",
        "quota.on_backend_error",
        "\"deny\", \"allow\" or \"local\"",
    );
}

#[test]
fn upstream_rate_loads_with_a_two_second_max_wait_and_max_wait_without_rate_is_refused() {
    let cfg = loaded("rate = \"50/10s\"", "", "");
    assert_eq!(
        cfg.quota.upstream,
        Some(UpstreamBudget {
            rate: rate(50, Duration::from_secs(10)),
            max_wait: Duration::from_secs(2)
        })
    );
    assert_eq!(loaded("", "", "").quota.upstream, None);
    let problems = refused("max_wait = \"2s\"", "", "");
    assert_only_problem(
        &problems,
        "gateway.toml",
        "upstream.max_wait",
        "no effect without upstream.rate",
    );
}

#[test]
fn team_concurrency_of_zero_is_refused_and_one_above_u32_max_is_clamped_to_u32_max() {
    let problems = refused("", "", "[quota]\nconcurrency = 0");
    assert_only_problem(
        &problems,
        "sourcing.toml",
        "quota.concurrency",
        "at least 1",
    );
    let cfg = loaded(
        "",
        "",
        &format!("[quota]\nconcurrency = {}", u64::from(u32::MAX) + 1),
    );
    assert_eq!(cfg.quota.teams["sourcing"].concurrency, Some(u32::MAX));
}

#[test]
fn operation_daily_of_zero_is_refused_at_the_operations_key() {
    let problems = refused("", "", "[quota.operations.listPartnerJobs]\ndaily = 0");
    assert_only_problem(
        &problems,
        "sourcing.toml",
        "quota.operations.listPartnerJobs.daily",
        "at least 1",
    );
    let cfg = loaded("", "", "[quota.operations.listPartnerJobs]\ndaily = 100");
    assert_eq!(
        cfg.quota.teams["sourcing"].operations["listPartnerJobs"].daily,
        Some(100)
    );
}

// ---------------------------------------------------------------------------------------------
// Snapshot

#[tokio::test]
async fn snapshot_shows_limits_and_live_usage_per_team() {
    let (q, _clock) = at(NOON, memory(vec![("sourcing", sourcing())]));
    let _a = q.admit("sourcing", "createPartnerCandidate").await.unwrap();
    let _b = q.admit("sourcing", "createPartnerCandidate").await.unwrap();
    let snap = q.snapshot();
    let team = &snap["teams"]["sourcing"];
    assert_eq!(snap["backend"], "memory");
    assert_eq!(team["limits"]["rate"], "20/s");
    assert_eq!(team["limits"]["concurrency"], 16);
    assert_eq!(
        team["limits"]["operations"]["createPartnerCandidate"]["daily"],
        5000
    );
    assert_eq!(team["usage"]["in_flight"], 2);
    assert_eq!(team["usage"]["remaining_burst"], 18);
    let op = &team["usage"]["operations"]["createPartnerCandidate"];
    assert_eq!(op["daily_used"], 2);
    assert_eq!(op["remaining_burst"], 3);
}

// ---------------------------------------------------------------------------------------------
// Upstream budget

fn upstream(r: Rate, max_wait: Duration) -> QuotaSettings {
    QuotaSettings {
        upstream: Some(UpstreamBudget { rate: r, max_wait }),
        ..QuotaSettings::default()
    }
}

#[tokio::test]
async fn no_upstream_budget_gives_a_slot_at_once() {
    let q = Quotas::new(QuotaSettings::default()).await;
    assert_eq!(q.upstream_slot().await, Ok(()));
}

#[tokio::test]
async fn upstream_budget_admits_its_whole_count_at_once_then_waits_for_the_oldest_to_leave() {
    let (q, clock) = at(
        NOON,
        upstream(rate(5, Duration::from_secs(10)), Duration::ZERO),
    );
    for i in 0..5 {
        assert_eq!(q.upstream_slot().await, Ok(()), "slot {i} of 5 waits");
    }
    assert_eq!(
        q.upstream_slot().await,
        Err(NoSlot::Later(Duration::from_secs(10)))
    );
    clock.advance(Duration::from_secs(4));
    assert_eq!(
        q.upstream_slot().await,
        Err(NoSlot::Later(Duration::from_secs(6))),
        "refusals spend nothing"
    );
    clock.advance(Duration::from_secs(6));
    assert_eq!(q.upstream_slot().await, Ok(()));
}

/// Whether any span of `per` holds more than `count` of the (sorted) start times.
fn most_in_any_window(starts: &[Duration], per: Duration) -> usize {
    (0..starts.len())
        .map(|i| {
            starts[i..]
                .iter()
                .take_while(|s| **s < starts[i] + per)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(start_paused = true)]
async fn upstream_budget_never_starts_more_than_its_count_in_any_window_and_waits_only_when_full() {
    // Arrivals in clumps and gaps (a fixed pseudo-random walk), each taking the slot it is given
    // within max_wait.
    let per = Duration::from_secs(10);
    let (q, clock) = at(NOON, upstream(rate(5, per), Duration::from_secs(3)));
    let mut starts: Vec<Duration> = Vec::new();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut now = Duration::ZERO;
    let (mut at_once, mut waited, mut refused) = (0, 0, 0);
    for _ in 0..400 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let step = Duration::from_millis(seed % 4000);
        clock.advance(step);
        now += step;
        let before = tokio::time::Instant::now();
        if q.upstream_slot().await.is_err() {
            refused += 1;
            continue;
        }
        // The slot starts after the delay the limiter chose and the caller slept: tokio's
        // paused clock makes that sleep exact (and instant).
        let slept = before.elapsed();
        if slept.is_zero() {
            at_once += 1;
        } else {
            // It waited: the budget really was used up, 5 starts within the last `per`.
            let in_window = starts.iter().filter(|s| **s + per > now).count();
            assert!(in_window >= 5, "waited with only {in_window} of 5 used");
            waited += 1;
        }
        starts.push(now + slept);
    }
    assert!(
        at_once > 0 && waited > 0 && refused > 0,
        "{at_once} {waited} {refused}"
    );
    starts.sort();
    assert!(
        most_in_any_window(&starts, per) <= 5,
        "more than 5 starts within 10 s"
    );
}

#[tokio::test]
async fn upstream_budget_refuses_at_once_when_no_slot_comes_within_max_wait() {
    let q = Quotas::new(upstream(per_sec(5), Duration::from_millis(10))).await;
    for _ in 0..5 {
        assert_eq!(q.upstream_slot().await, Ok(()));
    }
    let started = Instant::now();
    let NoSlot::Later(retry_after) = q.upstream_slot().await.unwrap_err() else {
        panic!("a memory budget cannot be unavailable")
    };
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        retry_after > Duration::from_millis(10) && retry_after <= Duration::from_secs(1),
        "{retry_after:?}"
    );
}

#[tokio::test]
async fn upstream_feedback_with_nothing_remaining_holds_the_budget_until_the_window_ends() {
    let (q, clock) = at(NOON, upstream(per_sec(100), Duration::ZERO));
    assert_eq!(q.upstream_slot().await, Ok(()));
    q.upstream_feedback(Some(3), Some(Duration::from_secs(3)));
    clock.advance(Duration::from_millis(10));
    assert_eq!(q.upstream_slot().await, Ok(()));
    q.upstream_feedback(Some(0), Some(Duration::from_secs(3)));
    assert_eq!(
        q.upstream_slot().await,
        Err(NoSlot::Later(Duration::from_secs(3)))
    );
    clock.advance(Duration::from_secs(3));
    assert_eq!(q.upstream_slot().await, Ok(()));
}

// ---------------------------------------------------------------------------------------------
// Redis backend: exactness, replicas, leases, TTLs

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_twice_the_burst_at_once_admits_exactly_the_burst() {
    let r = test_redis();
    let settings = redis_settings(
        &r.url,
        &prefix("exact1"),
        vec![("t", team_rate(per_hour(10), 10))],
        OnBackendError::Deny,
        Duration::from_secs(2),
    );
    let q = redis_quotas(settings).await;
    assert!(q.not_ready().is_empty(), "{:?}", q.not_ready());
    assert_eq!(concurrent_admits(&[q], "t", "op", 20).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sharing_redis_admit_exactly_the_burst_together() {
    let r = test_redis();
    let settings = redis_settings(
        &r.url,
        &prefix("exact2"),
        vec![("t", team_rate(per_hour(10), 10))],
        OnBackendError::Deny,
        Duration::from_secs(2),
    );
    let replicas = [
        redis_quotas(settings.clone()).await,
        redis_quotas(settings).await,
    ];
    assert_eq!(concurrent_admits(&replicas, "t", "op", 20).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sharing_redis_admit_exactly_the_burst_together() {
    let r = test_redis();
    let mut t = team_rate(per_hour(100), 100);
    t.operations
        .insert("create".into(), op(limit(per_hour(7), 7), Some(1000)));
    let settings = redis_settings(
        &r.url,
        &prefix("exact3"),
        vec![("t", t)],
        OnBackendError::Deny,
        Duration::from_secs(2),
    );
    let replicas = [
        redis_quotas(settings.clone()).await,
        redis_quotas(settings.clone()).await,
        redis_quotas(settings).await,
    ];
    assert_eq!(concurrent_admits(&replicas, "t", "create", 30).await, 7);
    // the team spent exactly 7 of 100: 93 more, across replicas
    assert_eq!(concurrent_admits(&replicas, "t", "other", 120).await, 93);
}

#[tokio::test]
async fn redis_request_refused_by_its_operation_spends_nothing_from_the_team_or_the_day() {
    let r = test_redis();
    let p = prefix("nothing");
    let mut t = team_rate(per_hour(2), 2);
    t.operations
        .insert("a".into(), op(limit(per_hour(1), 1), Some(10)));
    let q = redis_quotas(redis_settings(
        &r.url,
        &p,
        vec![("t", t)],
        OnBackendError::Deny,
        Duration::from_secs(2),
    ))
    .await;
    let first = q.admit("t", "a").await.unwrap();
    assert_eq!(first.source(), "redis");
    assert_eq!(admitted_count(&q, "t", "a", 5).await, 0);
    assert!(q.admit("t", "b").await.is_ok());
    assert!(matches!(
        q.admit("t", "b").await,
        Err(Refusal::RateLimited { .. })
    ));
    let mut c = redis_conn(&r.url).await;
    let used: u64 = redis::cmd("HGET")
        .arg(format!("{p}:team:t:op:a:daily"))
        .arg("n")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(used, 1);
}

#[tokio::test]
async fn redis_headers_have_the_same_shape_as_memory_headers() {
    let r = test_redis();
    let q = redis_quotas(redis_settings(
        &r.url,
        &prefix("headers"),
        vec![("sourcing", sourcing())],
        OnBackendError::Deny,
        Duration::from_secs(2),
    ))
    .await;
    let a = q.admit("sourcing", "createPartnerCandidate").await.unwrap();
    assert!(header(&a.headers, "RateLimit-Policy").starts_with("\"team\";q=20;w=1, "));
    let live = header(&a.headers, "RateLimit");
    assert!(
        live.starts_with("\"team\";r=19;t=1, \"team-concurrency\";r=15, \"createPartnerCandidate\";r=4;t=1, \"createPartnerCandidate-daily\";r=4999;t="),
        "{live}"
    );
}

#[tokio::test]
async fn redis_daily_quota_refuses_until_the_next_utc_midnight() {
    let r = test_redis();
    let mut t = TeamLimits::default();
    t.operations
        .insert("create".into(), op(Limit::default(), Some(2)));
    let q = redis_quotas(redis_settings(
        &r.url,
        &prefix("daily"),
        vec![("t", t)],
        OnBackendError::Deny,
        Duration::from_secs(2),
    ))
    .await;
    assert_eq!(admitted_count(&q, "t", "create", 2).await, 2);
    let refusal = q.admit("t", "create").await.unwrap_err();
    assert_eq!(refusal.kind(), "daily");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let to_midnight = Duration::from_secs((now.as_secs() / DAY + 1) * DAY) - now;
    let retry = refusal.retry_after().unwrap();
    // Redis's clock and ours are the same machine's: equal within a little slack.
    assert!(
        retry.abs_diff(to_midnight) < Duration::from_secs(5),
        "{retry:?} vs {to_midnight:?}"
    );
}

#[tokio::test]
async fn redis_concurrency_lease_comes_back_when_the_admission_drops() {
    let r = test_redis();
    let q = redis_concurrency_quotas(&r.url, &prefix("lease-drop"), 1).await;
    let a = q.admit("t", "op").await.unwrap();
    assert!(matches!(
        q.admit("t", "op").await,
        Err(Refusal::ConcurrencyLimited { .. })
    ));
    drop(a);
    // the release runs in the background: give it a bounded number of chances
    let mut admitted = None;
    for _ in 0..200 {
        if let Ok(b) = q.admit("t", "op").await {
            admitted = Some(b);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(admitted.is_some(), "the dropped lease never came back");
    // and an explicit release is done when it returns
    admitted.unwrap().release().await;
    assert!(q.admit("t", "op").await.is_ok());
}

/// Records what clients send a Redis server (`MONITOR`), apart from what scripts run.
struct ClientCommands {
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl ClientCommands {
    async fn watch(url: &str) -> ClientCommands {
        use futures_util::StreamExt;
        let monitor = redis::Client::open(url)
            .unwrap()
            .get_async_monitor()
            .await
            .unwrap();
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut stream = monitor.into_on_message::<String>();
            while let Some(line) = stream.next().await {
                sink.lock().unwrap().push(line);
            }
        });
        ClientCommands { lines }
    }

    /// Sends a marker through `c` and waits (bounded) until it has been seen: everything sent
    /// before it has been recorded.
    async fn settle(&self, c: &mut redis::aio::MultiplexedConnection) {
        let marker = format!("settle-{:08x}", rand::random::<u32>());
        let _: String = redis::cmd("ECHO")
            .arg(&marker)
            .query_async(c)
            .await
            .unwrap();
        for _ in 0..200 {
            if self
                .lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(&marker))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("MONITOR never showed the marker");
    }

    /// Commands named `command` that a client sent (not run by a script).
    fn sent(&self, command: &str) -> usize {
        let quoted = format!("\"{}\"", command.to_ascii_lowercase());
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| !l.contains(" lua]"))
            .filter(|l| {
                l.split_once("] ")
                    .is_some_and(|(_, cmd)| cmd.to_ascii_lowercase().starts_with(&quoted))
            })
            .count()
    }
}

// One thread: the admissions and the background flush never run at the same moment, so the
// count of calls depends only on the linger, not on scheduling.
#[tokio::test]
async fn redis_lease_given_back_rides_on_the_next_admission_one_call_per_request() {
    // a server of its own: its command counts are this test's alone
    let server = RedisServer::start();
    let url = server.url();
    let p = prefix("lease-ride");
    let q = redis_concurrency_quotas(&url, &p, 1).await;
    let mut c = redis_conn(&url).await;
    let sent = ClientCommands::watch(&url).await;
    const N: usize = 200;
    for i in 0..N {
        // concurrency 1: admitted only when the previous lease is gone, at the first try
        let a = q.admit("t", "op").await;
        assert!(a.is_ok(), "admission {i} refused: {a:?}");
        drop(a);
    }
    sent.settle(&mut c).await;
    let admissions = sent.sent("evalsha") + sent.sent("eval");
    let releases_alone = sent.sent("zrem");
    // (plus one EVAL when the first EVALSHA finds the script not loaded yet)
    assert!(
        (N..=N + 1).contains(&admissions),
        "{admissions} script calls for {N} admissions"
    );
    assert!(
        releases_alone * 4 < N,
        "{releases_alone} lease releases of their own for {N} requests"
    );
    // the last lease, which no admission came to carry, is removed after the linger
    let leases = format!("{p}:team:t:inflight");
    let mut left = 1;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        left = redis::cmd("ZCARD")
            .arg(&leases)
            .query_async::<u64>(&mut c)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
    }
    assert_eq!(left, 0, "the last lease was never given back");
}

#[tokio::test]
async fn redis_leases_waiting_to_ride_are_removed_at_once_by_the_shutdown_flush() {
    let r = test_redis();
    let p = prefix("lease-flush");
    let q = redis_concurrency_quotas(&r.url, &p, 5).await;
    let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| q.admit("t", "op")))
        .await
        .into_iter()
        .map(|a| a.unwrap())
        .collect();
    let mut c = redis_conn(&r.url).await;
    let leases = format!("{p}:team:t:inflight");
    let zcard = |c: &mut redis::aio::MultiplexedConnection| {
        let mut c = c.clone();
        let key = leases.clone();
        async move {
            redis::cmd("ZCARD")
                .arg(&key)
                .query_async::<u64>(&mut c)
                .await
                .unwrap()
        }
    };
    assert_eq!(zcard(&mut c).await, 3);
    drop(held);
    // given back, waiting for an admission to carry them; the flush does not wait for one
    q.flush_releases().await;
    assert_eq!(zcard(&mut c).await, 0);
}

#[tokio::test]
async fn redis_lease_never_released_comes_back_after_its_ttl() {
    let r = test_redis();
    let t = TeamLimits {
        concurrency: Some(1),
        daily: None,
        ..TeamLimits::default()
    };
    let q = Quotas::new_with_options(
        redis_settings(
            &r.url,
            &prefix("lease-ttl"),
            vec![("t", t)],
            OnBackendError::Deny,
            Duration::from_secs(2),
        ),
        QuotaOptions {
            lease_ttl: Duration::from_millis(300),
            ..QuotaOptions::default()
        },
    )
    .await;
    // a crashed request (or replica) never gives its lease back
    std::mem::forget(q.admit("t", "op").await.unwrap());
    assert!(matches!(
        q.admit("t", "op").await,
        Err(Refusal::ConcurrencyLimited { .. })
    ));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(q.admit("t", "op").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_one_teams_exhaustion_leaves_other_teams_untouched() {
    let r = test_redis();
    let q = redis_quotas(redis_settings(
        &r.url,
        &prefix("teams"),
        vec![
            ("a", team_rate(per_hour(3), 3)),
            ("b", team_rate(per_hour(3), 3)),
        ],
        OnBackendError::Deny,
        Duration::from_secs(2),
    ))
    .await;
    assert_eq!(
        concurrent_admits(std::slice::from_ref(&q), "a", "op", 6).await,
        3
    );
    assert_eq!(concurrent_admits(&[q], "b", "op", 6).await, 3);
}

#[tokio::test]
async fn every_redis_key_has_a_ttl_after_a_run() {
    let r = test_redis();
    let p = prefix("ttl");
    let mut settings = redis_settings(
        &r.url,
        &p,
        vec![
            ("sourcing", sourcing()),
            ("other", team_rate(per_sec(1), 1)),
        ],
        OnBackendError::Deny,
        Duration::from_secs(2),
    );
    settings.upstream = Some(UpstreamBudget {
        rate: per_sec(50),
        max_wait: Duration::from_secs(1),
    });
    let q = redis_quotas(settings).await;
    let _held = q.admit("sourcing", "createPartnerCandidate").await.unwrap();
    let _ = q.admit("other", "op").await;
    let _ = q.admit("other", "op").await;
    q.upstream_slot().await.unwrap();
    q.upstream_feedback(Some(0), Some(Duration::from_secs(5)));
    let mut c = redis_conn(&r.url).await;
    // the feedback is sent in the background: wait (bounded) for its key
    let blocked = format!("{p}:upstream:blocked");
    for _ in 0..100 {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&blocked)
            .query_async(&mut c)
            .await
            .unwrap();
        if exists {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{p}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut c)
            .await
            .unwrap();
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    keys.sort();
    // Each admission also leaves its record (`adm:{id}`, for a refund), one per team here.
    let (records, shaped): (Vec<String>, Vec<String>) =
        keys.iter().cloned().partition(|k| k.contains(":adm:"));
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records[0].starts_with(&format!("{p}:team:other:adm:")));
    assert!(records[1].starts_with(&format!("{p}:team:sourcing:adm:")));
    let expected = [
        format!("{p}:team:other:rate"),
        format!("{p}:team:sourcing:inflight"),
        format!("{p}:team:sourcing:op:createPartnerCandidate:daily"),
        format!("{p}:team:sourcing:op:createPartnerCandidate:rate"),
        format!("{p}:team:sourcing:rate"),
        format!("{p}:upstream:blocked"),
        format!("{p}:upstream:window"),
    ];
    assert_eq!(shaped, expected);
    for key in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(ttl > 0, "{key} has no TTL ({ttl})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_upstream_budget_is_one_window_for_all_replicas() {
    let r = test_redis();
    let mut settings = redis_settings(
        &r.url,
        &prefix("up-window"),
        vec![],
        OnBackendError::Deny,
        Duration::from_secs(2),
    );
    settings.upstream = Some(UpstreamBudget {
        rate: rate(3, Duration::from_secs(30)),
        max_wait: Duration::ZERO,
    });
    let replicas = [
        redis_quotas(settings.clone()).await,
        redis_quotas(settings).await,
    ];
    let mut admitted = Vec::new();
    for i in 0..8 {
        admitted.push(replicas[i % 2].upstream_slot().await.is_ok());
    }
    // The first three, whichever replica asked; then nothing for the rest of the window.
    assert_eq!(
        admitted,
        [true, true, true, false, false, false, false, false]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_upstream_budget_reserves_ahead_when_the_window_is_full() {
    let r = test_redis();
    let mut settings = redis_settings(
        &r.url,
        &prefix("up-reserve"),
        vec![],
        OnBackendError::Deny,
        Duration::from_secs(2),
    );
    settings.upstream = Some(UpstreamBudget {
        rate: rate(2, Duration::from_millis(500)),
        max_wait: Duration::from_secs(3),
    });
    let replicas = [
        redis_quotas(settings.clone()).await,
        redis_quotas(settings).await,
    ];
    let started = Instant::now();
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let q = replicas[i % 2].clone();
            tokio::spawn(async move { (q.upstream_slot().await, started.elapsed()) })
        })
        .collect();
    let mut ends = Vec::new();
    for t in tasks {
        let (r, at) = t.await.unwrap();
        assert_eq!(r, Ok(()));
        ends.push(at);
    }
    ends.sort();
    // Two per 500 ms window, across both replicas: the 3rd and 4th wait for the first window to
    // pass, the 5th and 6th for the second (lower bounds the sleeps guarantee).
    assert!(ends[2] >= Duration::from_millis(490), "{ends:?}");
    assert!(ends[4] >= Duration::from_millis(990), "{ends:?}");
    assert!(ends[5] < Duration::from_secs(6), "{ends:?}");
}

#[tokio::test]
async fn redis_upstream_budget_refuses_a_replica_when_no_shared_slot_comes_within_max_wait() {
    let r = test_redis();
    let mut settings = redis_settings(
        &r.url,
        &prefix("up-refuse"),
        vec![],
        OnBackendError::Deny,
        Duration::from_secs(2),
    );
    settings.upstream = Some(UpstreamBudget {
        rate: per_sec(5),
        max_wait: Duration::from_millis(10),
    });
    let a = redis_quotas(settings.clone()).await;
    let b = redis_quotas(settings).await;
    for _ in 0..5 {
        assert_eq!(a.upstream_slot().await, Ok(()));
    }
    let NoSlot::Later(retry) = b.upstream_slot().await.unwrap_err() else {
        panic!("redis is up: the budget answers")
    };
    assert!(
        retry > Duration::from_millis(10) && retry <= Duration::from_secs(1),
        "{retry:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Redis outages: stopped and paused, with each on_backend_error

const OUTAGE_TIMEOUT: Duration = Duration::from_millis(200);
/// Generous: the bound is "never much longer than the backend timeout", not a benchmark.
const SLACK: Duration = Duration::from_millis(1500);

enum Outage {
    Stopped,
    Paused,
}

/// Starts a server, makes one admission through it (a live connection), then takes it away.
async fn during_outage(
    outage: Outage,
    on_error: OnBackendError,
) -> (RedisServer, Quotas, Duration) {
    let mut server = RedisServer::start();
    let mut settings = redis_settings(
        &server.url(),
        &prefix("outage"),
        vec![
            ("t", team_rate(per_hour(3), 3)),
            ("fresh", team_rate(per_hour(3), 3)),
        ],
        on_error,
        OUTAGE_TIMEOUT,
    );
    settings.upstream = Some(UpstreamBudget {
        rate: per_sec(100),
        max_wait: Duration::from_millis(100),
    });
    let q = redis_quotas(settings).await;
    let first = q.admit("t", "op").await.unwrap();
    assert_eq!(first.source(), "redis");
    match outage {
        Outage::Stopped => server.stop(),
        Outage::Paused => server.pause(),
    }
    // six decisions, each timed
    let mut slowest = Duration::ZERO;
    let mut results = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        results.push(q.admit("t", "op").await);
        slowest = slowest.max(started.elapsed());
    }
    let started = Instant::now();
    let slot = q.upstream_slot().await;
    slowest = slowest.max(started.elapsed());
    assert!(
        slowest < OUTAGE_TIMEOUT + SLACK,
        "a decision took {slowest:?}"
    );
    // `/readyz` says why, in words an operator can act on, and never the server's URL.
    let reasons = q.not_ready();
    let [reason] = reasons.as_slice() else {
        panic!("one reason: {reasons:?}");
    };
    let why = reason
        .strip_prefix("quota: redis unreachable: ")
        .unwrap_or_else(|| panic!("{reason}"));
    assert!(!why.is_empty() && why != "unknown error", "{reason}");
    assert!(
        !reason.contains("redis://") && !reason.contains(&server.url()),
        "{reason}"
    );
    if matches!(outage, Outage::Paused) {
        assert_eq!(
            why,
            format!("no answer within {} ms", OUTAGE_TIMEOUT.as_millis()),
            "a paused server answers nothing"
        );
    }
    match on_error {
        OnBackendError::Deny => {
            for r in &results {
                let refusal = r.as_ref().unwrap_err();
                assert_eq!(refusal, &Refusal::BackendUnavailable);
                assert_eq!(refusal.kind(), "backend");
                assert_eq!(refusal.code(), "quota_backend_unavailable");
            }
            assert!(slot.is_err());
        }
        OnBackendError::Allow => {
            for r in &results {
                assert_eq!(r.as_ref().unwrap().source(), "allowed");
            }
            assert_eq!(q.backend_errors_allowed(), 7);
            assert_eq!(slot, Ok(()));
        }
        OnBackendError::Local => {
            let admitted: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(
                admitted.len(),
                3,
                "the in-process limiter has the same burst"
            );
            assert!(admitted.iter().all(|a| a.source() == "local"));
            assert_eq!(q.backend_errors_allowed(), 0);
            assert_eq!(slot, Ok(()));
        }
    }
    drop(results);
    (server, q, slowest)
}

#[tokio::test]
async fn redis_stopped_with_deny_refuses_as_backend_unavailable_within_the_timeout() {
    during_outage(Outage::Stopped, OnBackendError::Deny).await;
}

#[tokio::test]
async fn redis_stopped_with_allow_admits_and_counts_within_the_timeout() {
    during_outage(Outage::Stopped, OnBackendError::Allow).await;
}

#[tokio::test]
async fn redis_stopped_with_local_applies_the_same_limits_in_memory_within_the_timeout() {
    during_outage(Outage::Stopped, OnBackendError::Local).await;
}

#[tokio::test]
async fn redis_paused_with_deny_refuses_as_backend_unavailable_within_the_timeout() {
    let (server, q, _) = during_outage(Outage::Paused, OnBackendError::Deny).await;
    server.resume();
    recovers(&q).await;
}

#[tokio::test]
async fn redis_paused_with_allow_admits_and_counts_within_the_timeout() {
    let (server, q, _) = during_outage(Outage::Paused, OnBackendError::Allow).await;
    server.resume();
    recovers(&q).await;
}

#[tokio::test]
async fn redis_paused_with_local_applies_the_same_limits_in_memory_within_the_timeout() {
    let (server, q, _) = during_outage(Outage::Paused, OnBackendError::Local).await;
    server.resume();
    recovers(&q).await;
}

/// Redis is back: a probe succeeds within a bounded number of tries and decisions go through it.
async fn recovers(q: &Quotas) {
    let mut ok = false;
    for _ in 0..50 {
        if q.check_backend().await.is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "redis never came back: {:?}", q.not_ready());
    assert!(q.not_ready().is_empty(), "{:?}", q.not_ready());
    // (a team untouched so far: scripts that timed out while Redis was paused may still have
    // run, and spent, when it resumed)
    let a = q.admit("fresh", "op").await.unwrap();
    assert_eq!(a.source(), "redis");
}

#[tokio::test]
async fn redis_restarted_on_the_same_port_is_used_again_without_a_restart_of_the_gateway() {
    let (mut server, q, _) = during_outage(Outage::Stopped, OnBackendError::Deny).await;
    let port = server.port;
    server.stop();
    let restarted = RedisServer::start_on(port).expect("redis-server restarts on its port");
    recovers(&q).await;
    drop(restarted);
}

#[tokio::test]
async fn quotas_start_with_redis_down_without_failing_and_report_not_ready() {
    let port = free_port(); // nothing listens there
    let started = Instant::now();
    let q = Quotas::new(redis_settings(
        &format!("redis://127.0.0.1:{port}/"),
        &prefix("down"),
        vec![("t", team_rate(per_hour(3), 3))],
        OnBackendError::Deny,
        OUTAGE_TIMEOUT,
    ))
    .await;
    assert!(started.elapsed() < OUTAGE_TIMEOUT + SLACK);
    assert_eq!(q.not_ready().len(), 1, "{:?}", q.not_ready());
    assert_eq!(
        q.admit("t", "op").await.unwrap_err(),
        Refusal::BackendUnavailable
    );
    assert_eq!(q.snapshot()["backend"], "redis");
}

// ---------------------------------------------------------------------------------------------
// Refunds of abandoned Redis admissions, driven on the scripts themselves

const ADMIT_LUA: &str = include_str!("../src/quota/lua/admit.lua");
const REFUND_LUA: &str = include_str!("../src/quota/lua/refund.lua");

/// The seven keys of one admission `id`: team rate, leases, op rate, op daily, team daily,
/// record, tombstone.
fn admission_keys(p: &str, id: &str) -> Vec<String> {
    ["rate", "inflight", "op:x:rate", "op:x:daily", "daily"]
        .iter()
        .map(|k| format!("{p}:team:t:{k}"))
        .chain([
            format!("{p}:team:t:adm:{id}"),
            format!("{p}:team:t:void:{id}"),
        ])
        .collect()
}

/// admit.lua with a team rate of 1 per 10 s (burst 10), concurrency 5, an operation rate of 1
/// per 20 s (burst 10), daily quotas of 100; returns its status.
async fn run_admit(conn: &mut redis::aio::MultiplexedConnection, p: &str, id: &str) -> i64 {
    let script = redis::Script::new(ADMIT_LUA);
    let mut inv = script.prepare_invoke();
    for k in admission_keys(p, id) {
        inv.key(k);
    }
    inv.arg(10_000_000u64)
        .arg(10)
        .arg(5)
        .arg(id)
        .arg(60_000)
        .arg(20_000_000u64)
        .arg(10);
    inv.arg(100).arg(100).arg(120_000);
    let v: Vec<i64> = inv.invoke_async(conn).await.unwrap();
    v[0]
}

async fn run_refund(conn: &mut redis::aio::MultiplexedConnection, p: &str, id: &str) -> i64 {
    let script = redis::Script::new(REFUND_LUA);
    let mut inv = script.prepare_invoke();
    for k in admission_keys(p, id) {
        inv.key(k);
    }
    inv.arg(id).arg(3_600_000);
    inv.invoke_async(conn).await.unwrap()
}

/// Team daily, op daily, leases, and the team and op arrival times (µs ahead of now, 0 idle).
async fn charged(
    conn: &mut redis::aio::MultiplexedConnection,
    p: &str,
) -> (u64, u64, u64, u64, u64) {
    let k = admission_keys(p, "-");
    let base = conn.clone();
    let n = |key: String| {
        let mut c = base.clone();
        async move {
            let n: Option<u64> = redis::cmd("HGET")
                .arg(key)
                .arg("n")
                .query_async(&mut c)
                .await
                .unwrap();
            n.unwrap_or(0)
        }
    };
    let ahead = |key: String| {
        let mut c = base.clone();
        async move {
            let tat: Option<u64> = redis::cmd("GET")
                .arg(key)
                .query_async(&mut c)
                .await
                .unwrap();
            let (s, us): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
            tat.map_or(0, |t| t.saturating_sub(s * 1_000_000 + us))
        }
    };
    let leases: u64 = redis::cmd("ZCARD")
        .arg(&k[1])
        .query_async(conn)
        .await
        .unwrap();
    (
        n(k[4].clone()).await,
        n(k[3].clone()).await,
        leases,
        ahead(k[0].clone()).await,
        ahead(k[2].clone()).await,
    )
}

#[tokio::test]
async fn a_refund_that_reaches_redis_before_its_admission_voids_it_and_nothing_is_charged() {
    let r = test_redis();
    let p = prefix("void-first");
    let mut conn = redis_conn(&r.url).await;
    assert_eq!(
        run_refund(&mut conn, &p, "a1").await,
        0,
        "no record yet: tombstone"
    );
    let void = &admission_keys(&p, "a1")[6];
    let ttl: i64 = redis::cmd("PTTL")
        .arg(void)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0, "the tombstone has PTTL {ttl}");
    assert_eq!(
        run_admit(&mut conn, &p, "a1").await,
        4,
        "the late admission is void"
    );
    assert_eq!(charged(&mut conn, &p).await, (0, 0, 0, 0, 0));
    let record: i64 = redis::cmd("EXISTS")
        .arg(&admission_keys(&p, "a1")[5])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(record, 0, "a void admission leaves no record");
}

#[tokio::test]
async fn a_refund_after_its_admission_undoes_exactly_its_charges_once() {
    let r = test_redis();
    let p = prefix("refund-after");
    let mut conn = redis_conn(&r.url).await;
    assert_eq!(run_admit(&mut conn, &p, "a1").await, 0);
    assert_eq!(run_admit(&mut conn, &p, "a2").await, 0);
    let (team, op, leases, team_tat, op_tat) = charged(&mut conn, &p).await;
    assert_eq!((team, op, leases), (2, 2, 2));
    assert!(team_tat > 10_000_000 && op_tat > 20_000_000);

    assert_eq!(run_refund(&mut conn, &p, "a1").await, 1);
    let (team, op, leases, team_after, op_after) = charged(&mut conn, &p).await;
    assert_eq!((team, op, leases), (1, 1, 1));
    // one interval less (plus the time between the two reads)
    let (team_back, op_back) = (team_tat - team_after, op_tat - op_after);
    assert!((10_000_000..11_000_000).contains(&team_back), "{team_back}");
    assert!((20_000_000..21_000_000).contains(&op_back), "{op_back}");
    let lease_left: Option<f64> = redis::cmd("ZSCORE")
        .arg(&admission_keys(&p, "a2")[1])
        .arg("a2")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(lease_left.is_some(), "the other admission keeps its lease");

    // A second refund of the same admission (a retry) changes nothing.
    assert_eq!(run_refund(&mut conn, &p, "a1").await, 0);
    let (team, op, leases, _, _) = charged(&mut conn, &p).await;
    assert_eq!((team, op, leases), (1, 1, 1));
}
