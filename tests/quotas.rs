//! Quotas through the gateway: exact bursts under concurrency (HTTP/1.1, HTTP/2, replicas
//! sharing Redis, real processes), per-operation rates and daily quotas, concurrency leases given
//! back on every path, refusals that cost nothing, Redis failures under each `on_backend_error`,
//! key TTLs, the shared upstream budget, and what `/admin/teams` and `/metrics` report.
//!
//! Redis tests start their own `redis-server` on a free port when it is on PATH (killed on
//! drop), else use `REDIS_URL`, else fail. Tests that stop or pause Redis need their own server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use greenhouse_gateway::sandbox::Sandbox;
use greenhouse_gateway::server::{self, Running};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::redis::{RedisServer, test_redis};
use support::{AUDIENCE, Reply, ServeProcess, Setup, Stub, TestClient, email, spawn_serve};

/// A generous bound for "answered, not hung".
const NO_HANG: Duration = Duration::from_secs(2);
/// How long a gateway may take to notice by itself that Redis is back.
const RECOVERY: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Gateways

/// A team whose members are `svc-<name>`, with the given `[quota]` tables (may be empty).
fn team(name: &'static str, quota: &str) -> (&'static str, String) {
    let text = format!(
        r#"name = "{name}"
operations = ["listPartnerJobs", "listPartnerCandidates", "createPartnerCandidate"]
credential = "partner_key"
[[members]]
iss = "ISSUER"
sub = "svc-{name}"
[on_behalf_of]
default = "quota.bot(at)example.com"
{quota}
"#
    );
    (name, email(&text))
}

/// A team with `[quota] rate` and `burst`.
fn rate_team(name: &'static str, rate: &str, burst: u32) -> (&'static str, String) {
    team(
        name,
        &format!("[quota]\nrate = \"{rate}\"\nburst = {burst}\n"),
    )
}

fn redis_quota(url: &str, on_backend_error: &str, key_prefix: &str) -> String {
    format!(
        "[quota]\nbackend = \"redis\"\nredis_url = {{ value = \"{url}\" }}\n\
         on_backend_error = \"{on_backend_error}\"\ntimeout = \"200ms\"\nkey_prefix = \"{key_prefix}\"\n"
    )
}

/// One in-process gateway; it keeps running until the test's runtime ends.
struct Gw {
    running: Running,
    _dir: tempfile::TempDir,
}

impl Gw {
    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.running.addr, path)
    }

    fn admin(&self, path: &str) -> String {
        format!("http://{}{}", self.running.admin_addr, path)
    }
}

/// Writes the harness config for `setup`, adds `upstream_keys` to its `[upstream]` table and
/// returns the path of gateway.toml.
fn write_config(dir: &Path, sandbox: &Sandbox, setup: &Setup, upstream_keys: &str) -> String {
    support::write_config(dir, sandbox, setup);
    let path = dir.join("gateway.toml");
    if !upstream_keys.is_empty() {
        let text = std::fs::read_to_string(&path).unwrap();
        let anchor = "connect_timeout = \"2s\"\n";
        assert!(text.contains(anchor), "the harness config changed shape");
        let patched = text.replacen(anchor, &format!("{anchor}{upstream_keys}\n"), 1);
        std::fs::write(&path, patched).unwrap();
    }
    path.to_string_lossy().into_owned()
}

/// A gateway in front of `setup.upstream`, trusting `sandbox`'s tokens.
async fn start_gateway(sandbox: &Sandbox, setup: &Setup, upstream_keys: &str) -> Gw {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), sandbox, setup, upstream_keys);
    let config = greenhouse_gateway::config::load(Path::new(&path))
        .unwrap_or_else(|p| panic!("test config invalid: {p:#?}"));
    let running = server::start(config).await.expect("gateway starts");
    tokio::time::timeout(Duration::from_secs(10), running.wait_ready())
        .await
        .expect("gateway ready");
    Gw { running, _dir: dir }
}

/// A sandbox (issuer and token endpoint), a recording stub upstream and one gateway.
struct Env {
    sandbox: Sandbox,
    stub: Stub,
    gw: Gw,
    client: TestClient,
}

impl Env {
    async fn start(
        teams: Vec<(&'static str, String)>,
        extra: String,
        upstream_keys: &str,
        upstream_timeout: &'static str,
    ) -> Env {
        let sandbox = Sandbox::start_local(Setup::default().sandbox)
            .await
            .expect("sandbox starts");
        let stub = Stub::start().await;
        let setup = Setup {
            teams,
            extra,
            upstream: Some(stub.base_url()),
            upstream_timeout,
            ..Setup::default()
        };
        let gw = start_gateway(&sandbox, &setup, upstream_keys).await;
        Env {
            sandbox,
            stub,
            gw,
            client: TestClient::new(),
        }
    }

    fn token(&self, team: &str) -> String {
        token(&self.sandbox, team)
    }

    async fn get(&self, path: &str, team: &str) -> Reply {
        get(&self.client, &self.gw.url(path), &self.token(team)).await
    }

    async fn post_candidate(&self, team: &str) -> Reply {
        post_candidate(&self.client, &self.gw.url(CANDIDATES), &self.token(team)).await
    }
}

const JOBS: &str = "/v1/partner/jobs";
const CANDIDATES: &str = "/v1/partner/candidates";

fn token(sandbox: &Sandbox, team: &str) -> String {
    sandbox.mint_token(
        json!({"sub": format!("svc-{team}"), "aud": AUDIENCE}),
        Duration::from_secs(600),
    )
}

async fn get(client: &TestClient, url: &str, token: &str) -> Reply {
    client
        .send(
            Method::GET,
            url,
            &[("authorization", &format!("Bearer {token}"))],
            Bytes::new(),
        )
        .await
}

async fn post_candidate(client: &TestClient, url: &str, token: &str) -> Reply {
    let body = json!({"external_id": "ext-1", "first_name": "Ada", "last_name": "Example"});
    let auth = format!("Bearer {token}");
    client
        .send(
            Method::POST,
            url,
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            Bytes::from(body.to_string()),
        )
        .await
}

async fn admin_get(url: &str) -> Reply {
    TestClient::new()
        .send(Method::GET, url, &[], Bytes::new())
        .await
}

/// GETs every url at once (one task each) with `token`; replies in url order.
async fn concurrent_gets(client: &TestClient, urls: Vec<String>, token: &str) -> Vec<Reply> {
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let (c, t) = (client.clone(), token.to_string());
            tokio::spawn(async move { get(&c, &url, &t).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

/// Polls `f` every 100 ms until it is true, for at most `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the stub has seen `n` requests (at most 5 s).
async fn stub_sees(stub: &Stub, n: usize) {
    for _ in 0..500 {
        if stub.seen().len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the stub saw {} requests, never {n}", stub.seen().len());
}

// ---------------------------------------------------------------------------------------------
// Responses

fn header(r: &Reply, name: &str) -> Option<String> {
    r.headers
        .get(name)
        .map(|v| v.to_str().expect("ascii header").to_string())
}

fn retry_after(r: &Reply) -> u64 {
    header(r, "retry-after")
        .unwrap_or_else(|| panic!("no Retry-After on {} {}", r.status, r.text()))
        .parse()
        .expect("Retry-After in whole seconds")
}

/// `r` of `policy` in the `RateLimit` header (`"team";r=4;t=0, ...`).
fn remaining(r: &Reply, policy: &str) -> Option<u64> {
    let value = header(r, "ratelimit")?;
    let item = value
        .split(", ")
        .find(|i| i.starts_with(&format!("\"{policy}\";")))?;
    item.split(';')
        .find_map(|p| p.strip_prefix("r="))
        .and_then(|n| n.parse().ok())
}

/// Both IETF draft fields, the policy naming `policy`, the live value naming it too.
fn assert_ratelimit_fields(r: &Reply, policy: &str) {
    let p = header(r, "ratelimit-policy")
        .unwrap_or_else(|| panic!("no RateLimit-Policy on {} {}", r.status, r.text()));
    assert!(p.contains(policy), "RateLimit-Policy {p:?} lacks {policy}");
    assert!(
        header(r, "ratelimit").is_some(),
        "no RateLimit on {} {}",
        r.status,
        r.text()
    );
}

fn assert_refused(r: &Reply, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.code(), code, "{}", r.text());
}

/// Exactly `burst` of `replies` are 200 (with remaining counts burst-1 .. 0), the rest are 429
/// `rate_limited` with a Retry-After of at most `max_retry` s; all carry the rate-limit fields.
fn assert_exact_burst(replies: &[Reply], burst: u64, max_retry: u64) {
    let admitted: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .collect();
    let refused: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status != StatusCode::OK)
        .collect();
    assert_eq!(
        admitted.len() as u64,
        burst,
        "admitted; statuses: {:?}",
        replies
            .iter()
            .map(|r| r.status.as_u16())
            .collect::<Vec<_>>()
    );
    let left: BTreeSet<u64> = admitted
        .iter()
        .map(|r| {
            assert_ratelimit_fields(r, "\"team\";q=");
            remaining(r, "team").expect("r of \"team\"")
        })
        .collect();
    assert_eq!(
        left,
        (0..burst).collect::<BTreeSet<u64>>(),
        "each admission saw its own remaining count"
    );
    for r in refused {
        assert_refused(r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        let wait = retry_after(r);
        assert!((1..=max_retry).contains(&wait), "Retry-After {wait}");
        assert_ratelimit_fields(r, "\"team\";q=");
        assert_eq!(remaining(r, "team"), Some(0));
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics and admin

async fn metrics(gw: &Gw) -> String {
    admin_get(&gw.admin("/metrics")).await.text()
}

/// The value of one series (`name{labels}` exactly as rendered), if present.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// `quota` of `team` in `GET /admin/teams`.
async fn admin_team_quota(gw: &Gw, team: &str) -> Value {
    let r = admin_get(&gw.admin("/admin/teams")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["teams"]
        .as_array()
        .expect("teams array")
        .iter()
        .find(|t| t["name"] == team)
        .unwrap_or_else(|| panic!("team {team} missing from {}", r.text()))["quota"]
        .clone()
}

fn key_prefix(test: &str) -> String {
    format!("qt-{test}-{:08x}", rand::random::<u32>())
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Every key under `prefix`, by SCAN.
async fn scan_prefix(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

async fn pttl(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Exactness in memory

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_burst_of_5_admits_exactly_5_of_10_concurrent_requests_over_http1_and_http2() {
    let env = Env::start(
        vec![rate_team("one", "5/h", 5), rate_team("two", "5/h", 5)],
        String::new(),
        "",
        "5s",
    )
    .await;

    // HTTP/1.1: ten connections at once.
    let urls = vec![env.gw.url(JOBS); 10];
    let replies = concurrent_gets(&env.client, urls.clone(), &env.token("one")).await;
    assert_exact_burst(&replies, 5, 720);
    for r in &replies {
        assert_eq!(r.version, http::Version::HTTP_11);
        assert_eq!(
            header(r, "ratelimit-policy").as_deref(),
            Some("\"team\";q=5;w=3600")
        );
    }
    assert_eq!(env.stub.seen().len(), 5, "the upstream saw only admissions");

    // HTTP/2: ten streams on one connection, another team with the same limits.
    let h2 = TestClient::http2_only();
    let replies = concurrent_gets(&h2, urls, &env.token("two")).await;
    for r in &replies {
        assert_eq!(r.version, http::Version::HTTP_2, "{}", r.text());
    }
    assert_exact_burst(&replies, 5, 720);
    assert_eq!(env.stub.seen().len(), 10);
}

// ---------------------------------------------------------------------------------------------
// 2. Exactness across replicas sharing Redis

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_redis_admit_exactly_the_burst_together() {
    let redis = test_redis();
    let sandbox = Sandbox::start_local(Setup::default().sandbox)
        .await
        .unwrap();
    let stub = Stub::start().await;
    let setup = Setup {
        teams: vec![rate_team("shared", "5/h", 5)],
        extra: redis_quota(&redis.url, "deny", &key_prefix("two-gw")),
        upstream: Some(stub.base_url()),
        ..Setup::default()
    };
    let a = start_gateway(&sandbox, &setup, "").await;
    let b = start_gateway(&sandbox, &setup, "").await;
    let urls: Vec<String> = (0..10)
        .map(|i| if i % 2 == 0 { a.url(JOBS) } else { b.url(JOBS) })
        .collect();
    let replies = concurrent_gets(&TestClient::new(), urls, &token(&sandbox, "shared")).await;
    assert_exact_burst(&replies, 5, 720);
    assert_eq!(stub.seen().len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateway_processes_sharing_redis_admit_exactly_the_burst_together() {
    let redis = test_redis();
    let sandbox = Sandbox::start_local(Setup::default().sandbox)
        .await
        .unwrap();
    let stub = Stub::start().await;
    let setup = Setup {
        teams: vec![rate_team("procs", "5/h", 5)],
        extra: redis_quota(&redis.url, "deny", &key_prefix("procs")),
        upstream: Some(stub.base_url()),
        ..Setup::default()
    };
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let procs: Vec<ServeProcess> = dirs
        .iter()
        .map(|d| {
            spawn_serve(std::path::Path::new(&write_config(
                d.path(),
                &sandbox,
                &setup,
                "",
            )))
        })
        .collect();
    let client = TestClient::new();
    for p in &procs {
        let url = format!("http://{}/readyz", p.admin);
        eventually(Duration::from_secs(10), "the process is ready", || async {
            admin_get(&url).await.status == StatusCode::OK
        })
        .await;
    }
    let urls: Vec<String> = (0..15)
        .map(|i| format!("http://{}{JOBS}", procs[i % 3].addr))
        .collect();
    let replies = concurrent_gets(&client, urls, &token(&sandbox, "procs")).await;
    assert_exact_burst(&replies, 5, 720);
    assert_eq!(stub.seen().len(), 5);
}

// ---------------------------------------------------------------------------------------------
// 3. Per-operation rate and daily quota

/// Waits out the last 30 s of a UTC day, so a daily quota cannot reset in the middle of a test.
async fn not_at_midnight() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = 86_400 - now % 86_400;
    if left < 30 {
        tokio::time::sleep(Duration::from_secs(left + 1)).await;
    }
}

const OPS_QUOTA: &str = r#"
[quota.operations.createPartnerCandidate]
daily = 3
[quota.operations.listPartnerCandidates]
rate = "2/h"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fourth_create_of_a_daily_3_is_daily_quota_exhausted_and_other_operations_and_teams_go_on()
{
    not_at_midnight().await;
    let env = Env::start(
        vec![team("ops", OPS_QUOTA), team("peer", OPS_QUOTA)],
        String::new(),
        "",
        "5s",
    )
    .await;

    for i in 0..3u64 {
        let r = env.post_candidate("ops").await;
        assert_eq!(r.status, StatusCode::OK, "create {i}: {}", r.text());
        assert_ratelimit_fields(&r, "\"createPartnerCandidate-daily\";q=3;w=86400");
        assert_eq!(remaining(&r, "createPartnerCandidate-daily"), Some(2 - i));
    }
    let r = env.post_candidate("ops").await;
    assert_refused(&r, StatusCode::TOO_MANY_REQUESTS, "daily_quota_exhausted");
    let wait = retry_after(&r);
    assert!((1..=86_400).contains(&wait), "Retry-After {wait}");
    assert_ratelimit_fields(&r, "\"createPartnerCandidate-daily\";q=3;w=86400");
    assert_eq!(remaining(&r, "createPartnerCandidate-daily"), Some(0));
    assert_eq!(env.stub.seen().len(), 3, "the refused create never left");

    // The operation's own rate: 2 per hour (burst 2), then 429 rate_limited.
    for _ in 0..2 {
        let r = env.get(CANDIDATES, "ops").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_ratelimit_fields(&r, "\"listPartnerCandidates\";q=2;w=3600");
    }
    let r = env.get(CANDIDATES, "ops").await;
    assert_refused(&r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!((1..=1800).contains(&retry_after(&r)));
    assert_eq!(remaining(&r, "listPartnerCandidates"), Some(0));

    // Another operation of the same team has no limits: admitted.
    for _ in 0..3 {
        assert_eq!(env.get(JOBS, "ops").await.status, StatusCode::OK);
    }
    // Another team with the same limits is untouched.
    for _ in 0..3 {
        let r = env.post_candidate("peer").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(env.get(CANDIDATES, "peer").await.status, StatusCode::OK);
    assert_eq!(env.stub.seen().len(), 3 + 2 + 3 + 3 + 1);
}

const TEAM_DAILY: &str = r#"
[quota]
daily = 4
[quota.operations.createPartnerCandidate]
daily = 3
"#;

/// Four calls of three operations (some on `gw`, some on `other`) use up a team-wide
/// `daily = 4`; then a call of an operation with no limit of its own is refused, and so is one
/// whose own daily quota has room left.
async fn team_daily_4_spans_operations(gw: &Gw, other: &Gw, sandbox: &Sandbox, stub: &Stub) {
    let client = TestClient::new();
    let t = token(sandbox, "ops");
    let policy = "\"team-daily\";q=4;w=86400";
    let replies = [
        post_candidate(&client, &gw.url(CANDIDATES), &t).await,
        get(&client, &other.url(JOBS), &t).await,
        post_candidate(&client, &other.url(CANDIDATES), &t).await,
        get(&client, &gw.url(CANDIDATES), &t).await,
    ];
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.status, StatusCode::OK, "call {i}: {}", r.text());
        assert_ratelimit_fields(r, policy);
        assert_eq!(remaining(r, "team-daily"), Some(3 - i as u64), "call {i}");
    }
    for r in [
        get(&client, &gw.url(JOBS), &t).await,
        post_candidate(&client, &other.url(CANDIDATES), &t).await,
    ] {
        assert_refused(&r, StatusCode::TOO_MANY_REQUESTS, "daily_quota_exhausted");
        assert!((1..=86_400).contains(&retry_after(&r)), "Retry-After");
        assert_ratelimit_fields(&r, policy);
        assert_eq!(remaining(&r, "team-daily"), Some(0));
    }
    assert_eq!(stub.seen().len(), 4, "refused calls never left");
    // Another team with the same file is untouched.
    let r = get(&client, &gw.url(JOBS), &token(sandbox, "peer")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(remaining(&r, "team-daily"), Some(3));
    let snapshot = admin_team_quota(gw, "ops").await;
    assert_eq!(snapshot["limits"]["daily"], json!(4), "{snapshot}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn team_daily_4_counts_every_operation_together_and_the_fifth_call_is_daily_quota_exhausted()
{
    not_at_midnight().await;
    let env = Env::start(
        vec![team("ops", TEAM_DAILY), team("peer", TEAM_DAILY)],
        String::new(),
        "",
        "5s",
    )
    .await;
    team_daily_4_spans_operations(&env.gw, &env.gw, &env.sandbox, &env.stub).await;
    let snapshot = admin_team_quota(&env.gw, "ops").await;
    assert_eq!(snapshot["usage"]["daily_used"], json!(4), "{snapshot}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_redis_count_one_team_daily_quota_together() {
    not_at_midnight().await;
    let redis = test_redis();
    let prefix = key_prefix("team-daily");
    let sandbox = Sandbox::start_local(Setup::default().sandbox)
        .await
        .unwrap();
    let stub = Stub::start().await;
    let setup = Setup {
        teams: vec![team("ops", TEAM_DAILY), team("peer", TEAM_DAILY)],
        extra: redis_quota(&redis.url, "deny", &prefix),
        upstream: Some(stub.base_url()),
        ..Setup::default()
    };
    let a = start_gateway(&sandbox, &setup, "").await;
    let b = start_gateway(&sandbox, &setup, "").await;
    team_daily_4_spans_operations(&a, &b, &sandbox, &stub).await;
    let mut conn = redis_conn(&redis.url).await;
    let key = format!("{prefix}:team:ops:daily");
    let n: i64 = redis::cmd("HGET")
        .arg(&key)
        .arg("n")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 4, "Redis counts what was forwarded");
    assert!(pttl(&mut conn, &key).await > 0);
}

// ---------------------------------------------------------------------------------------------
// 4. Concurrency

const ONE_AT_A_TIME: &str = "[quota]\nconcurrency = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_1_refuses_a_second_request_in_flight_and_frees_the_slot_on_success_and_on_500()
{
    let env = Env::start(vec![team("solo", ONE_AT_A_TIME)], String::new(), "", "5s").await;
    env.stub
        .set_reply(200, "[\"slow\"]", Duration::from_millis(800));
    let (c, url, t) = (env.client.clone(), env.gw.url(JOBS), env.token("solo"));
    let first = tokio::spawn(async move { get(&c, &url, &t).await });
    stub_sees(&env.stub, 1).await;

    let second = env.get(JOBS, "solo").await;
    assert_refused(
        &second,
        StatusCode::TOO_MANY_REQUESTS,
        "concurrency_limited",
    );
    assert_eq!(retry_after(&second), 1);
    assert_ratelimit_fields(
        &second,
        "\"team-concurrency\";q=1;qu=\"concurrent-requests\"",
    );
    assert_eq!(remaining(&second, "team-concurrency"), Some(0));

    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.text(), "[\"slow\"]");
    assert_eq!(remaining(&first, "team-concurrency"), Some(0));

    // Released on success.
    env.stub
        .set_reply(500, "{\"error\":\"boom\"}", Duration::ZERO);
    let r = env.get(JOBS, "solo").await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.text());
    // Released on an upstream error.
    env.stub.set_reply(200, "[]", Duration::ZERO);
    let r = env.get(JOBS, "solo").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(env.stub.seen().len(), 3, "the refused request never left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_slot_is_freed_when_the_upstream_times_out() {
    let env = Env::start(
        vec![team("solo", ONE_AT_A_TIME)],
        String::new(),
        "",
        "300ms",
    )
    .await;
    // The stub keeps this request far longer than the test runs.
    env.stub.set_reply(200, "[]", Duration::from_secs(60));
    let started = Instant::now();
    let r = env.get(JOBS, "solo").await;
    assert_refused(&r, StatusCode::GATEWAY_TIMEOUT, "upstream_timeout");
    assert!(started.elapsed() < NO_HANG);
    env.stub.set_reply(200, "[]", Duration::ZERO);
    let r = env.get(JOBS, "solo").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// How a caller goes away in the middle of its request.
#[derive(Clone, Copy)]
enum Disconnect {
    /// An HTTP/1.1 client closes its connection.
    CloseTcp,
    /// An HTTP/2 client cancels its stream (RST_STREAM) on a connection that stays open.
    ResetH2Stream,
}

/// With `concurrency = 1` for team `solo`: a request the upstream holds far longer than the
/// test runs is abandoned by its caller; only that can give its slot back, and it must, within
/// a bounded wait.
async fn slot_is_freed_when_the_caller_goes_away(env: &Env, how: Disconnect) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    env.stub.set_reply(200, "[]", Duration::from_secs(60));
    let token = env.token("solo");
    let h2 = TestClient::http2_only();
    let caller = match how {
        Disconnect::CloseTcp => {
            let addr = env.gw.running.addr;
            let request = format!(
                "GET {JOBS} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\n\r\n"
            );
            tokio::spawn(async move {
                let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                s.write_all(request.as_bytes()).await.unwrap();
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out).await;
            })
        }
        Disconnect::ResetH2Stream => {
            let (c, url, t) = (h2.clone(), env.gw.url(JOBS), token.clone());
            tokio::spawn(async move {
                get(&c, &url, &t).await;
            })
        }
    };
    stub_sees(&env.stub, 1).await;
    let r = env.get(JOBS, "solo").await;
    assert_refused(&r, StatusCode::TOO_MANY_REQUESTS, "concurrency_limited");

    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    tokio::time::sleep(Duration::from_millis(50)).await;
    env.stub.set_reply(200, "[]", Duration::ZERO);
    let mut last = None;
    for _ in 0..15 {
        let r = env.get(JOBS, "solo").await;
        if r.status == StatusCode::OK {
            return;
        }
        assert_refused(&r, StatusCode::TOO_MANY_REQUESTS, "concurrency_limited");
        last = Some(r);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the slot of the abandoned request was never given back: {:?}",
        last.map(|r| r.text())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_slot_is_freed_when_an_http1_client_disconnects_mid_request() {
    let env = Env::start(vec![team("solo", ONE_AT_A_TIME)], String::new(), "", "60s").await;
    slot_is_freed_when_the_caller_goes_away(&env, Disconnect::CloseTcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_slot_is_freed_when_an_http2_client_resets_its_stream_mid_request() {
    let env = Env::start(vec![team("solo", ONE_AT_A_TIME)], String::new(), "", "60s").await;
    slot_is_freed_when_the_caller_goes_away(&env, Disconnect::ResetH2Stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_concurrency_lease_is_given_back_when_the_client_disconnects_mid_request() {
    let redis = test_redis();
    let env = Env::start(
        vec![team("solo", ONE_AT_A_TIME)],
        redis_quota(&redis.url, "deny", &key_prefix("disconnect")),
        "",
        "60s",
    )
    .await;
    slot_is_freed_when_the_caller_goes_away(&env, Disconnect::CloseTcp).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Refusals cost nothing

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_do_not_delay_the_next_admission() {
    let env = Env::start(vec![rate_team("brisk", "10/s", 1)], String::new(), "", "5s").await;
    let r = env.get(JOBS, "brisk").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Right after the burst of one: refusals (each would push the next slot 100 ms further if
    // it were counted).
    let replies =
        concurrent_gets(&env.client, vec![env.gw.url(JOBS); 5], &env.token("brisk")).await;
    let refused = replies
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(refused >= 1, "nothing was refused right after the burst");
    for r in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_refused(r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        assert_eq!(retry_after(r), 1);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = env.get(JOBS, "brisk").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// 6. Redis failures

/// A gateway on Redis with `on_backend_error`, its own Redis server and a team `limited` with
/// `[quota]` `quota`.
async fn redis_env(on_backend_error: &str, quota: &str) -> (Env, RedisServer, String) {
    let redis = RedisServer::start();
    let prefix = key_prefix(on_backend_error);
    let env = Env::start(
        vec![team("limited", quota)],
        redis_quota(&redis.url(), on_backend_error, &prefix),
        "",
        "5s",
    )
    .await;
    (env, redis, prefix)
}

async fn readyz(env: &Env) -> Reply {
    admin_get(&env.gw.admin("/readyz")).await
}

/// `/readyz` says 503 with a quota reason.
async fn assert_not_ready_for_quota(env: &Env) {
    eventually(NO_HANG, "readiness reports the quota backend", || async {
        let r = readyz(env).await;
        r.status == StatusCode::SERVICE_UNAVAILABLE
            && r.json()["reasons"]
                .as_array()
                .is_some_and(|a| a.iter().any(|s| s.as_str().unwrap_or("").contains("quota")))
    })
    .await;
}

async fn wait_ready_again(env: &Env) {
    eventually(RECOVERY, "readiness recovers with Redis", || async {
        readyz(env).await.status == StatusCode::OK
    })
    .await;
}

async fn team_rate_key_exists(url: &str, prefix: &str) -> bool {
    let mut conn = redis_conn(url).await;
    let n: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}:team:limited:rate"))
        .query_async(&mut conn)
        .await
        .unwrap();
    n == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_deny_is_503_quota_backend_unavailable_never_429_and_recovers_by_itself() {
    let (env, mut redis, prefix) =
        redis_env("deny", "[quota]\nrate = \"1000/h\"\nburst = 1000\n").await;
    let r = env.get(JOBS, "limited").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(team_rate_key_exists(&redis.url(), &prefix).await);

    redis.stop();
    for _ in 0..5 {
        let started = Instant::now();
        let r = env.get(JOBS, "limited").await;
        assert!(
            started.elapsed() < NO_HANG,
            "answered in {:?}",
            started.elapsed()
        );
        assert_refused(
            &r,
            StatusCode::SERVICE_UNAVAILABLE,
            "quota_backend_unavailable",
        );
    }
    assert_eq!(env.stub.seen().len(), 1);
    assert_not_ready_for_quota(&env).await;

    redis.restart();
    wait_ready_again(&env).await;
    eventually(RECOVERY, "admissions through Redis again", || async {
        env.get(JOBS, "limited").await.status == StatusCode::OK
    })
    .await;
    assert!(
        team_rate_key_exists(&redis.url(), &prefix).await,
        "the admission after recovery was not decided in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_allow_admits_counts_it_in_metrics_and_applies_limits_again_after_recovery()
{
    let (env, mut redis, prefix) = redis_env("allow", "[quota]\nrate = \"2/h\"\nburst = 2\n").await;
    let series = "gateway_quota_backend_allowed_total";
    assert_eq!(env.get(JOBS, "limited").await.status, StatusCode::OK);
    assert_eq!(metric(&metrics(&env.gw).await, series), Some(0.0));

    redis.stop();
    // Four requests, twice the burst: all admitted, none decided.
    for _ in 0..4 {
        let started = Instant::now();
        let r = env.get(JOBS, "limited").await;
        assert!(started.elapsed() < NO_HANG);
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            header(&r, "ratelimit-policy").as_deref(),
            Some("\"team\";q=2;w=3600")
        );
    }
    assert_eq!(metric(&metrics(&env.gw).await, series), Some(4.0));
    assert_eq!(env.stub.seen().len(), 5);
    assert_not_ready_for_quota(&env).await;

    redis.restart();
    wait_ready_again(&env).await;
    // A fresh Redis: the team's burst of 2, then refusals again.
    let replies: Vec<Reply> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(env.get(JOBS, "limited").await);
        }
        v
    };
    assert_eq!(replies[0].status, StatusCode::OK, "{}", replies[0].text());
    assert_eq!(replies[1].status, StatusCode::OK, "{}", replies[1].text());
    assert_refused(&replies[2], StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(team_rate_key_exists(&redis.url(), &prefix).await);
    assert_eq!(metric(&metrics(&env.gw).await, series), Some(4.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_local_applies_the_team_limits_in_memory_then_redis_again_after_recovery() {
    let (env, mut redis, prefix) = redis_env("local", "[quota]\nrate = \"3/h\"\nburst = 3\n").await;
    let r = env.get(JOBS, "limited").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(remaining(&r, "team"), Some(2));

    redis.stop();
    // The in-process limiter has the same limits (and its own, full, burst).
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let r = env.get(JOBS, "limited").await;
        assert!(started.elapsed() < NO_HANG);
        if r.status != StatusCode::OK {
            assert_refused(&r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
            assert_ratelimit_fields(&r, "\"team\";q=3;w=3600");
        }
        statuses.push(r.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    assert_not_ready_for_quota(&env).await;

    redis.restart();
    wait_ready_again(&env).await;
    let r = env.get(JOBS, "limited").await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "decided by the fresh Redis: {}",
        r.text()
    );
    assert_eq!(remaining(&r, "team"), Some(2));
    assert!(team_rate_key_exists(&redis.url(), &prefix).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_redis_with_deny_is_503_within_the_timeout_not_a_hang_and_recovers_on_resume() {
    let (env, redis, _prefix) =
        redis_env("deny", "[quota]\nrate = \"1000/h\"\nburst = 1000\n").await;
    assert_eq!(env.get(JOBS, "limited").await.status, StatusCode::OK);

    redis.signal("-STOP");
    for _ in 0..3 {
        let started = Instant::now();
        let r = env.get(JOBS, "limited").await;
        // timeout = "200ms" plus generous slack
        assert!(
            started.elapsed() < NO_HANG,
            "answered in {:?}",
            started.elapsed()
        );
        assert_refused(
            &r,
            StatusCode::SERVICE_UNAVAILABLE,
            "quota_backend_unavailable",
        );
    }
    assert_not_ready_for_quota(&env).await;

    redis.signal("-CONT");
    wait_ready_again(&env).await;
    eventually(RECOVERY, "admissions through Redis again", || async {
        env.get(JOBS, "limited").await.status == StatusCode::OK
    })
    .await;
}

/// Field `n` of a daily counter (0 when there is none).
async fn daily_used(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> u64 {
    let n: Option<u64> = redis::cmd("HGET")
        .arg(key)
        .arg("n")
        .query_async(conn)
        .await
        .unwrap();
    n.unwrap_or(0)
}

/// Admissions a GCRA arrival time holds, from idle, with `interval` per admission (exact while
/// less than one interval has passed since the first of them).
async fn rate_spent(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    interval: Duration,
) -> u64 {
    let tat: Option<u64> = redis::cmd("GET").arg(key).query_async(conn).await.unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    let now = secs * 1_000_000 + micros;
    let interval = u64::try_from(interval.as_micros()).unwrap();
    tat.map_or(0, |t| t.saturating_sub(now).div_ceil(interval))
}

/// What Redis holds for team `limited` calling listPartnerJobs: team daily, operation daily,
/// team rate, operation rate (admissions each), and leases.
async fn redis_counts(url: &str, prefix: &str) -> [u64; 5] {
    let mut conn = redis_conn(url).await;
    let team = format!("{prefix}:team:limited");
    let op = format!("{team}:op:listPartnerJobs");
    let leases: u64 = redis::cmd("ZCARD")
        .arg(format!("{team}:inflight"))
        .query_async(&mut conn)
        .await
        .unwrap();
    [
        daily_used(&mut conn, &format!("{team}:daily")).await,
        daily_used(&mut conn, &format!("{op}:daily")).await,
        rate_spent(&mut conn, &format!("{team}:rate"), Duration::from_secs(36)).await,
        rate_spent(&mut conn, &format!("{op}:rate"), Duration::from_secs(72)).await,
        leases,
    ]
}

/// Polls [`redis_counts`] until it equals `expected`, for at most `within`.
async fn counts_become(url: &str, prefix: &str, expected: [u64; 5], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let seen = redis_counts(url, prefix).await;
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Redis holds [team daily, op daily, team rate, op rate, leases] = {seen:?}, \
             forwarded {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One request, then six at once (and, with `deny`, three more) during a 1.5 s `CLIENT PAUSE`
/// (longer than the 200 ms quota timeout), with `on_backend_error`; afterwards Redis counts exactly the requests
/// it admitted and the gateway forwarded, and a daily quota of 5 is not used up.
async fn redis_pause_leaves_redis_counting_what_it_forwarded(on_backend_error: &str) {
    let quota = "[quota]\nrate = \"100/h\"\nburst = 100\nconcurrency = 10\ndaily = 5\n\
                 [quota.operations.listPartnerJobs]\nrate = \"50/h\"\nburst = 50\ndaily = 5\n";
    let (env, redis, prefix) = redis_env(on_backend_error, quota).await;
    assert_eq!(env.get(JOBS, "limited").await.status, StatusCode::OK);
    // The lease is given back just after the response ends (in the background): wait for it.
    counts_become(&redis.url(), &prefix, [1, 1, 1, 1, 0], NO_HANG).await;

    // Every admission sent now runs when the pause ends.
    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Six at once, before the gateway sees Redis is away: each sends its admission.
    let urls = vec![env.gw.url(JOBS); 6];
    let during = concurrent_gets(&env.client, urls, &env.token("limited")).await;
    if on_backend_error == "deny" {
        // And a few more while the circuit breaker lets one through now and then (refused, or
        // admitted by Redis once the pause is over).
        for _ in 0..3 {
            let _ = env.get(JOBS, "limited").await;
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    // Forwarded without Redis (`local`): counted by this replica, not in Redis.
    let mut without_redis = 0;
    for r in &during {
        if on_backend_error == "deny" {
            assert_refused(
                r,
                StatusCode::SERVICE_UNAVAILABLE,
                "quota_backend_unavailable",
            );
        } else if r.status == StatusCode::OK {
            without_redis += 1;
        }
    }
    if on_backend_error == "local" {
        assert!(without_redis > 0, "the local limiter admitted none");
    }

    wait_ready_again(&env).await;
    let by_redis = |env: &Env| env.stub.seen().len() as u64 - without_redis;
    let forwarded = by_redis(&env);
    counts_become(
        &redis.url(),
        &prefix,
        [forwarded, forwarded, forwarded, forwarded, 0],
        RECOVERY,
    )
    .await;

    // The daily quota of 5 is not used up by the requests of the pause.
    let r = env.get(JOBS, "limited").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let forwarded = by_redis(&env);
    counts_become(
        &redis.url(),
        &prefix,
        [forwarded, forwarded, forwarded, forwarded, 0],
        NO_HANG,
    )
    .await;

    // Records of admissions and tombstones expire like every other key.
    let mut conn = redis_conn(&redis.url()).await;
    for key in scan_prefix(&mut conn, &prefix).await {
        let ttl = pttl(&mut conn, &key).await;
        assert!(ttl > 0 || ttl == -2, "{key} has PTTL {ttl}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_during_a_redis_pause_stay_uncounted_after_it_and_the_daily_quota_of_5_is_not_spent()
 {
    redis_pause_leaves_redis_counting_what_it_forwarded("deny").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_decided_locally_during_a_redis_pause_are_not_also_counted_in_redis_after_it() {
    redis_pause_leaves_redis_counting_what_it_forwarded("local").await;
}

// ---------------------------------------------------------------------------------------------
// 7. Every Redis key has a TTL

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_redis_key_of_a_run_has_a_ttl() {
    let redis = test_redis();
    let prefix = key_prefix("ttl");
    let quota = r#"[quota]
rate = "100/h"
burst = 100
concurrency = 5
daily = 1000
[quota.operations.createPartnerCandidate]
rate = "50/h"
daily = 100
"#;
    let env = Env::start(
        vec![team("limited", quota)],
        redis_quota(&redis.url, "deny", &prefix),
        "rate = \"100/s\"\nmax_wait = \"1s\"",
        "5s",
    )
    .await;
    let mut conn = redis_conn(&redis.url).await;

    for _ in 0..2 {
        let r = env.post_candidate("limited").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    // A request in flight holds a lease in the team's ZSET.
    env.stub.set_reply(200, "[]", Duration::from_millis(600));
    let (c, url, t) = (env.client.clone(), env.gw.url(JOBS), env.token("limited"));
    let slow = tokio::spawn(async move { get(&c, &url, &t).await });
    stub_sees(&env.stub, 3).await;
    let inflight = format!("{prefix}:team:limited:inflight");
    assert!(scan_prefix(&mut conn, &prefix).await.contains(&inflight));
    assert!(pttl(&mut conn, &inflight).await > 0);
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    // The upstream says nothing is left: the shared budget is blocked (a key of its own).
    env.stub.set_reply(200, "[]", Duration::ZERO);
    env.stub
        .set_reply_headers(&[("x-ratelimit-remaining", "0")]);
    assert_eq!(env.get(JOBS, "limited").await.status, StatusCode::OK);
    let blocked = format!("{prefix}:upstream:blocked");
    eventually(NO_HANG, "the upstream block is written", || async {
        scan_prefix(&mut redis_conn(&redis.url).await, &prefix)
            .await
            .contains(&blocked)
    })
    .await;

    let keys = scan_prefix(&mut conn, &prefix).await;
    for suffix in [
        "team:limited:rate",
        "team:limited:daily",
        "team:limited:op:createPartnerCandidate:rate",
        "team:limited:op:createPartnerCandidate:daily",
        "upstream:window",
        "upstream:blocked",
    ] {
        let key = format!("{prefix}:{suffix}");
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    let records = format!("{prefix}:team:limited:adm:");
    assert!(
        keys.iter().any(|k| k.starts_with(&records)),
        "no admission record in {keys:?}"
    );
    for key in &keys {
        let ttl = pttl(&mut conn, key).await;
        // -1: no TTL (a leak); -2: expired between SCAN and PTTL (fine)
        assert!(ttl > 0 || ttl == -2, "{key} has PTTL {ttl}");
    }
}

// ---------------------------------------------------------------------------------------------
// 8. The shared upstream budget

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_budget_3_per_2s_admits_3_at_once_and_refuses_the_rest_of_a_burst_with_503() {
    let env = Env::start(
        vec![team("free", "")],
        String::new(),
        "rate = \"3/2s\"\nmax_wait = \"100ms\"",
        "5s",
    )
    .await;
    let started = Instant::now();
    let replies = concurrent_gets(&env.client, vec![env.gw.url(JOBS); 8], &env.token("free")).await;
    let elapsed = started.elapsed();
    let admitted = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    for r in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_refused(r, StatusCode::SERVICE_UNAVAILABLE, "upstream_rate_limited");
        assert!((1..=2).contains(&retry_after(r)), "{:?}", r.headers);
    }
    assert_eq!(env.stub.seen().len(), admitted);
    // The whole count is there at once: nobody is refused while budget is left.
    assert!(
        admitted >= 3,
        "only {admitted} of a budget of 3 admitted at once"
    );
    // And never more than 3 per 2 s (plus what max_wait lets reserve ahead).
    let windows = (elapsed + Duration::from_millis(100))
        .as_millis()
        .div_ceil(2000);
    assert!(
        admitted as u128 <= 3 * windows.max(1),
        "{admitted} reached the upstream in {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_budget_2_per_s_with_max_wait_3s_admits_2_at_once_and_2_a_window_later() {
    let env = Env::start(
        vec![team("free", "")],
        String::new(),
        "rate = \"2/s\"\nmax_wait = \"3s\"",
        "5s",
    )
    .await;
    let started = Instant::now();
    let replies = concurrent_gets(&env.client, vec![env.gw.url(JOBS); 4], &env.token("free")).await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(env.stub.seen().len(), 4);
    // Two slots at once, two when the first two leave the 1 s window (a lower bound the sleeps
    // guarantee).
    assert!(started.elapsed() >= Duration::from_millis(950));
    assert!(started.elapsed() < Duration::from_secs(6));
}

// ---------------------------------------------------------------------------------------------
// 9. Admin and metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_teams_and_metrics_show_limits_live_usage_rejections_and_in_flight_requests() {
    not_at_midnight().await;
    let quota = r#"[quota]
rate = "100/h"
burst = 10
concurrency = 2
[quota.operations.createPartnerCandidate]
daily = 3
"#;
    let env = Env::start(
        vec![team("watched", quota), team("free", "")],
        String::new(),
        "",
        "5s",
    )
    .await;

    let q = admin_team_quota(&env.gw, "watched").await;
    assert_eq!(q["usage_source"], "memory");
    assert_eq!(q["limits"]["rate"], "100/h");
    assert_eq!(q["limits"]["burst"], 10);
    assert_eq!(q["limits"]["concurrency"], 2);
    assert_eq!(
        q["limits"]["operations"]["createPartnerCandidate"]["daily"],
        3
    );
    assert_eq!(q["usage"]["remaining_burst"], 10);
    assert_eq!(q["usage"]["in_flight"], 0);
    assert_eq!(
        q["usage"]["operations"]["createPartnerCandidate"]["daily_used"],
        0
    );
    let free = admin_team_quota(&env.gw, "free").await;
    assert_eq!(free["limits"]["rate"], Value::Null);
    assert_eq!(free["limits"]["concurrency"], Value::Null);

    for _ in 0..2 {
        assert_eq!(env.post_candidate("watched").await.status, StatusCode::OK);
    }
    let q = admin_team_quota(&env.gw, "watched").await;
    assert_eq!(
        q["usage"]["operations"]["createPartnerCandidate"]["daily_used"],
        2
    );
    assert_eq!(q["usage"]["remaining_burst"], 8);

    // Two requests in flight: the cap is full.
    env.stub.set_reply(200, "[]", Duration::from_millis(800));
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let (c, url, t) = (env.client.clone(), env.gw.url(JOBS), env.token("watched"));
            tokio::spawn(async move { get(&c, &url, &t).await })
        })
        .collect();
    stub_sees(&env.stub, 4).await;
    let q = admin_team_quota(&env.gw, "watched").await;
    assert_eq!(q["usage"]["in_flight"], 2, "{q}");
    let text = metrics(&env.gw).await;
    assert_eq!(
        metric(&text, "gateway_inflight_requests{team=\"watched\"}"),
        Some(2.0),
        "{text}"
    );
    let r = env.get(JOBS, "watched").await;
    assert_refused(&r, StatusCode::TOO_MANY_REQUESTS, "concurrency_limited");
    for s in slow {
        assert_eq!(s.await.unwrap().status, StatusCode::OK);
    }
    env.stub.set_reply(200, "[]", Duration::ZERO);

    // The daily quota runs out.
    assert_eq!(env.post_candidate("watched").await.status, StatusCode::OK);
    let r = env.post_candidate("watched").await;
    assert_refused(&r, StatusCode::TOO_MANY_REQUESTS, "daily_quota_exhausted");

    let q = admin_team_quota(&env.gw, "watched").await;
    assert_eq!(q["usage"]["in_flight"], 0, "{q}");
    assert_eq!(
        q["usage"]["operations"]["createPartnerCandidate"]["daily_used"],
        3
    );
    // 2 + 2 + 1 admitted; refusals spend nothing
    assert_eq!(q["usage"]["remaining_burst"], 5, "{q}");

    let text = metrics(&env.gw).await;
    let rejections = |op: &str, kind: &str| {
        metric(
            &text,
            &format!(
                "gateway_quota_rejections_total{{team=\"watched\",operation=\"{op}\",kind=\"{kind}\"}}"
            ),
        )
    };
    assert_eq!(
        rejections("createPartnerCandidate", "daily"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        rejections("listPartnerJobs", "concurrency"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(rejections("listPartnerJobs", "rate"), None, "{text}");
    assert_eq!(
        metric(&text, "gateway_inflight_requests{team=\"watched\"}"),
        Some(0.0),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Replicas sharing Redis: concurrency and the upstream budget

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_redis_cap_concurrency_together_and_give_the_leases_back() {
    let redis = test_redis();
    let prefix = key_prefix("conc");
    let sandbox = Sandbox::start_local(Setup::default().sandbox)
        .await
        .unwrap();
    let stub = Stub::start().await;
    let setup = Setup {
        teams: vec![team("pair", "[quota]\nconcurrency = 2\n")],
        extra: redis_quota(&redis.url, "deny", &prefix),
        upstream: Some(stub.base_url()),
        ..Setup::default()
    };
    let a = start_gateway(&sandbox, &setup, "").await;
    let b = start_gateway(&sandbox, &setup, "").await;
    stub.set_reply(200, "[]", Duration::from_millis(1500));
    let urls: Vec<String> = (0..6)
        .map(|i| if i % 2 == 0 { a.url(JOBS) } else { b.url(JOBS) })
        .collect();
    let t = token(&sandbox, "pair");
    let replies = concurrent_gets(&TestClient::new(), urls, &t).await;
    let admitted = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(admitted, 2, "at most two in flight across both replicas");
    for r in replies.iter().filter(|r| r.status != StatusCode::OK) {
        assert_refused(r, StatusCode::TOO_MANY_REQUESTS, "concurrency_limited");
    }
    assert_eq!(stub.seen().len(), 2);

    stub.set_reply(200, "[]", Duration::ZERO);
    let inflight = format!("{prefix}:team:pair:inflight");
    let conn = redis_conn(&redis.url).await;
    eventually(NO_HANG, "both leases are given back in Redis", || {
        let (mut conn, key) = (conn.clone(), inflight.clone());
        async move {
            let n: i64 = redis::cmd("ZCARD")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            n == 0
        }
    })
    .await;
    for gw in [&a, &b, &a, &b] {
        let r = get(&TestClient::new(), &gw.url(JOBS), &t).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sharing_redis_never_exceed_the_budget_in_any_window_together() {
    let redis = test_redis();
    let sandbox = Sandbox::start_local(Setup::default().sandbox)
        .await
        .unwrap();
    let stub = Stub::start().await;
    let setup = Setup {
        teams: vec![team("free", "")],
        extra: redis_quota(&redis.url, "deny", &key_prefix("budget")),
        upstream: Some(stub.base_url()),
        ..Setup::default()
    };
    // 3 per second, reservable up to 1.5 s ahead: 12 requests through two replicas.
    let keys = "rate = \"3/s\"\nmax_wait = \"1500ms\"";
    let a = start_gateway(&sandbox, &setup, keys).await;
    let b = start_gateway(&sandbox, &setup, keys).await;
    let urls: Vec<String> = (0..12)
        .map(|i| if i % 2 == 0 { a.url(JOBS) } else { b.url(JOBS) })
        .collect();
    let client = TestClient::new();
    let t = token(&sandbox, "free");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for url in urls {
        let (client, t) = (client.clone(), t.clone());
        tasks.push(tokio::spawn(async move {
            let r = get(&client, &url, &t).await;
            (r.status, started.elapsed())
        }));
    }
    let mut done = Vec::new();
    for task in tasks {
        done.push(task.await.unwrap());
    }
    let ok: Vec<Duration> = done
        .iter()
        .filter(|(s, _)| *s == StatusCode::OK)
        .map(|(_, at)| *at)
        .collect();
    for (s, _) in done.iter().filter(|(s, _)| *s != StatusCode::OK) {
        assert_eq!(*s, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(stub.seen().len(), ok.len());
    // At once, the whole budget of 3 (shared: both replicas together, not 3 each); then the
    // reservations, 3 per second.
    assert!(
        ok.len() >= 6,
        "only {} admitted in 1.5 s of budget",
        ok.len()
    );
    let at_once = ok
        .iter()
        .filter(|at| **at < Duration::from_millis(950))
        .count();
    assert!(
        (3..=3).contains(&at_once),
        "{at_once} started in the first window: {ok:?}"
    );
    // Any 4 consecutive starts are a window apart (finishes lag their starts by a little, and
    // never lead them: 300 ms of slack for a loaded machine; one budget per replica would put
    // 6 within a few milliseconds).
    let mut ends = ok.clone();
    ends.sort();
    for w in ends.windows(4) {
        assert!(
            w[3] - w[0] >= Duration::from_millis(700),
            "4 requests within one second across two replicas: {ends:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Redis over TLS

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_the_private_ca_file_counts_the_burst_over_tls_and_without_it_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let (redis, ca_pem) = RedisServer::start_tls(dir.path());
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let url = format!("rediss://127.0.0.1:{}/", redis.port);
    let prefix = key_prefix("tls");
    let with_ca = format!(
        "{}redis_ca_file = \"{}\"\n",
        redis_quota(&url, "deny", &prefix),
        ca_file.display()
    );
    let env = Env::start(vec![rate_team("limited", "1/h", 3)], with_ca, "", "5s").await;
    let urls = vec![env.gw.url(JOBS); 6];
    let replies = concurrent_gets(&env.client, urls, &env.token("limited")).await;
    assert_exact_burst(&replies, 3, 3600);

    // The counts live in the TLS-only server (it has no plain port to reach by mistake).
    let client = redis::Client::build_with_tls(
        url.as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(ca_pem.clone().into_bytes()),
        },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = scan_prefix(&mut conn, &prefix).await;
    assert!(
        keys.contains(&format!("{prefix}:team:limited:rate")),
        "{keys:?}"
    );

    // Without the CA file the server's certificate is not trusted (the public roots do not
    // sign it): the gateway must refuse to count there, not fall back to plain text.
    let setup = Setup {
        teams: vec![rate_team("limited", "1/h", 3)],
        extra: redis_quota(&url, "deny", &key_prefix("tls-untrusted")),
        upstream: Some(env.stub.base_url()),
        ..Setup::default()
    };
    let untrusted_dir = tempfile::tempdir().unwrap();
    let path = write_config(untrusted_dir.path(), &env.sandbox, &setup, "");
    let config = greenhouse_gateway::config::load(Path::new(&path))
        .unwrap_or_else(|p| panic!("rediss:// without a CA file is valid config: {p:#?}"));
    let running = server::start(config).await.unwrap();
    let r = get(
        &env.client,
        &format!("http://{}{JOBS}", running.addr),
        &env.token("limited"),
    )
    .await;
    assert_refused(
        &r,
        StatusCode::SERVICE_UNAVAILABLE,
        "quota_backend_unavailable",
    );
    let reasons = greenhouse_gateway::admin::not_ready(&running.gateway).join("; ");
    assert!(reasons.contains("quota"), "{reasons}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_teams_shows_sub_second_and_fractional_rates_as_configured() {
    use greenhouse_gateway::values::parse_rate;
    let env = Env::start(
        vec![
            rate_team("half", "5/500ms", 5),
            rate_team("odd", "3/1500ms", 3),
        ],
        String::new(),
        "rate = \"7/1500ms\"",
        "5s",
    )
    .await;
    for (name, configured) in [("half", "5/500ms"), ("odd", "3/1500ms")] {
        let q = admin_team_quota(&env.gw, name).await;
        let shown = q["limits"]["rate"].as_str().unwrap().to_string();
        assert_eq!(
            parse_rate(&shown),
            parse_rate(configured),
            "{name}: configured {configured:?}, shown {shown:?}"
        );
    }
    let r = admin_get(&env.gw.admin("/admin/teams")).await;
    let shown = r.json()["upstream_budget"]["rate"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        parse_rate(&shown),
        parse_rate("7/1500ms"),
        "shown {shown:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_with_deny_on_the_upstream_budget_is_quota_backend_unavailable() {
    let mut redis = RedisServer::start();
    let env = Env::start(
        vec![team("free", "")],
        redis_quota(&redis.url(), "deny", &key_prefix("updeny")),
        "rate = \"100/s\"\nmax_wait = \"1s\"",
        "5s",
    )
    .await;
    assert_eq!(env.get(JOBS, "free").await.status, StatusCode::OK);
    redis.stop();
    let started = Instant::now();
    let r = env.get(JOBS, "free").await;
    assert!(started.elapsed() < NO_HANG);
    // Greenhouse's budget was never exhausted: the quota backend could not decide.
    assert_refused(
        &r,
        StatusCode::SERVICE_UNAVAILABLE,
        "quota_backend_unavailable",
    );
    assert_eq!(env.stub.seen().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Slow and greedy callers: the response write timeout, the buffered body budget

/// Like [`Env::start`], with extra `[listen]` keys.
async fn env_listening(teams: Vec<(&'static str, String)>, extra: &str, listen_extra: &str) -> Env {
    let sandbox = Sandbox::start_local(Setup::default().sandbox)
        .await
        .expect("sandbox starts");
    let stub = Stub::start().await;
    let setup = Setup {
        teams,
        extra: extra.to_string(),
        listen_extra: listen_extra.to_string(),
        upstream: Some(stub.base_url()),
        upstream_timeout: "5s",
        ..Setup::default()
    };
    let gw = start_gateway(&sandbox, &setup, "").await;
    Env {
        sandbox,
        stub,
        gw,
        client: TestClient::new(),
    }
}

/// Waits for the record of `request_id` in the gateway's audit trail.
async fn audit_record(env: &Env, request_id: &str) -> Value {
    let path = env.gw._dir.path().join("audit/audit.jsonl");
    for _ in 0..200 {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let found: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r["request_id"] == request_id)
            .collect();
        assert!(found.len() <= 1, "more than one record for {request_id}");
        if let Some(r) = found.into_iter().next() {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no audit record for {request_id}");
}

/// A raw HTTP/1.1 request head for team `solo`.
fn raw_head(env: &Env, method: &str, path: &str, request_id: &str, extra: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {}\r\nX-Request-Id: {request_id}\r\n{extra}\r\n",
        env.token("solo")
    )
}

/// Far more than the socket buffers and HTTP/2 windows on both sides can hold.
fn response_too_large_to_buffer() -> String {
    format!("[\"{}\"]", "x".repeat(16 * 1024 * 1024))
}

/// With `concurrency = 1` for `solo` and its one slot held by a response nobody takes: within a
/// bounded wait, another request of the team is admitted.
async fn the_slot_comes_back(env: &Env) {
    let mut last = None;
    for _ in 0..100 {
        let r = env.get(JOBS, "solo").await;
        if r.status == StatusCode::OK {
            return;
        }
        assert_refused(&r, StatusCode::TOO_MANY_REQUESTS, "concurrency_limited");
        last = Some(r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the slot of the response nobody takes was never given back: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_reader_that_never_opens_its_window_gives_its_concurrency_slot_back_after_the_response_write_timeout()
 {
    let env = env_listening(
        vec![team("solo", ONE_AT_A_TIME)],
        "",
        "response_write_timeout = \"500ms\"",
    )
    .await;
    env.stub
        .set_reply(200, &response_too_large_to_buffer(), Duration::ZERO);
    // Its own connection: the response is never read, so its window is never opened again.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    let req = http::Request::get(env.gw.url(JOBS))
        .header("authorization", format!("Bearer {}", env.token("solo")))
        .header("x-request-id", "never-reads-h2")
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let unread = tokio::time::timeout(Duration::from_secs(20), h2.request(req))
        .await
        .expect("a response head")
        .unwrap();
    assert_eq!(unread.status(), StatusCode::OK);
    env.stub.set_reply(200, "[]", Duration::ZERO);
    the_slot_comes_back(&env).await;
    let rec = audit_record(&env, "never-reads-h2").await;
    assert_eq!(rec["code"], "response_write_timeout", "{rec}");
    drop(unread);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_that_never_reads_its_large_response_gives_its_concurrency_slot_back_after_the_response_write_timeout()
 {
    use tokio::io::AsyncWriteExt;
    let env = env_listening(
        vec![team("solo", ONE_AT_A_TIME)],
        "",
        "response_write_timeout = \"500ms\"",
    )
    .await;
    env.stub
        .set_reply(200, &response_too_large_to_buffer(), Duration::ZERO);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut never_reads = socket.connect(env.gw.running.addr).await.unwrap();
    let head = raw_head(&env, "GET", JOBS, "never-reads-1", "");
    never_reads.write_all(head.as_bytes()).await.unwrap();
    stub_sees(&env.stub, 1).await;
    env.stub.set_reply(200, "[]", Duration::ZERO);
    the_slot_comes_back(&env).await;
    let rec = audit_record(&env, "never-reads-1").await;
    assert_eq!(rec["code"], "response_write_timeout", "{rec}");
    assert_eq!(rec["status"], 200, "{rec}");
    assert_eq!(rec["decision"], "forwarded", "{rec}");
    drop(never_reads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_beyond_the_buffered_bytes_budget_is_503_overloaded_before_it_is_read_and_audited() {
    use tokio::io::AsyncWriteExt;
    let env = env_listening(
        vec![team("solo", "")],
        "[limits]\nmax_body_bytes = 1048576\nmax_buffered_body_bytes = 1048576\n",
        "",
    )
    .await;
    let json = "content-type: application/json\r\n";
    // An upload of a declared 800 KB, sent slowly: its bytes are reserved while it arrives.
    let mut slow = tokio::net::TcpStream::connect(env.gw.running.addr)
        .await
        .unwrap();
    let head = raw_head(
        &env,
        "POST",
        CANDIDATES,
        "slow-upload-1",
        &format!("{json}content-length: 800000\r\n"),
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(b"{").await.unwrap();

    // A second declared 800 KB does not fit: refused at once, with only its head sent. (Tried
    // again if it happened to be reserved before the slow upload.)
    let mut refused = None;
    for attempt in 0..5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let id = format!("over-budget-{attempt}");
        let head = raw_head(
            &env,
            "POST",
            CANDIDATES,
            &id,
            &format!("{json}content-length: 800000\r\n"),
        );
        let out =
            support::raw_exchange(env.gw.running.addr, head.as_bytes(), Duration::from_secs(3))
                .await;
        if out.starts_with("HTTP/1.1 503") {
            refused = Some((id, out));
            break;
        }
    }
    let (id, out) = refused.expect("no 503 for a body beyond the budget, without its body");
    assert!(out.contains("\"code\":\"overloaded\""), "{out}");
    assert!(out.to_ascii_lowercase().contains("retry-after: 1"), "{out}");
    let rec = audit_record(&env, &id).await;
    assert_eq!(rec["code"], "overloaded", "{rec}");
    assert_eq!(rec["status"], 503, "{rec}");
    assert_eq!(rec["team"], "solo", "{rec}");
    assert!(env.stub.seen().is_empty(), "nothing was forwarded");

    // The reservation goes with the upload: then a body of that size is read and forwarded.
    drop(slow);
    let mut body =
        json!({"external_id": "ext-1", "first_name": "Ada", "last_name": "Example"}).to_string();
    body.insert_str(1, &" ".repeat(800_000 - body.len()));
    let auth = format!("Bearer {}", env.token("solo"));
    let mut last = None;
    for _ in 0..50 {
        let r = env
            .client
            .send(
                Method::POST,
                &env.gw.url(CANDIDATES),
                &[
                    ("authorization", auth.as_str()),
                    ("content-type", "application/json"),
                ],
                Bytes::from(body.clone()),
            )
            .await;
        if r.status != StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            last = None;
            break;
        }
        last = Some(r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last, None,
        "the slow upload's reservation was never given back"
    );
    assert_eq!(env.stub.seen().len(), 1);
    assert_eq!(env.stub.seen()[0].body.len(), 800_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upload_does_not_hold_the_concurrency_slot_while_its_body_arrives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = env_listening(vec![team("solo", ONE_AT_A_TIME)], "", "").await;
    let body =
        json!({"external_id": "ext-1", "first_name": "Ada", "last_name": "Example"}).to_string();
    let mut slow = tokio::net::TcpStream::connect(env.gw.running.addr)
        .await
        .unwrap();
    let head = raw_head(
        &env,
        "POST",
        CANDIDATES,
        "slow-upload-2",
        &format!(
            "content-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        ),
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body.as_bytes()[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // While the upload is still arriving, the team's one slot is free.
    for _ in 0..3 {
        let r = env.get(JOBS, "solo").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Once complete, the upload is admitted and forwarded.
    slow.write_all(&body.as_bytes()[10..]).await.unwrap();
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut out))
        .await
        .expect("an answer to the upload")
        .unwrap();
    let out = String::from_utf8_lossy(&out[..n]);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let posted: Vec<_> = env
        .stub
        .seen()
        .into_iter()
        .filter(|s| s.method == "POST")
        .collect();
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0].body, Bytes::from(body));
}
