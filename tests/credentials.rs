//! Upstream credentials: the OAuth2 token cache (single flight, refresh, backoff), replay after
//! an upstream 401, pausing after an upstream 429, the partner key, and a canary scan proving no
//! secret or token reaches a log line (at trace level) or a response.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use greenhouse_gateway::auth::upstream::UpstreamCredentials;
use greenhouse_gateway::auth::upstream::{ClientAuth, CredentialSettings, OAuth2Credential};
use greenhouse_gateway::http_client::build_client;
use greenhouse_gateway::metrics::Metrics;
use greenhouse_gateway::sandbox::SandboxOptions;
use greenhouse_gateway::values::Secret;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use support::{Harness, Reply, Setup, Stub};

// ---------------------------------------------------------------------------------------------
// Every log line of this test binary, at trace level, for the canary scans.

#[derive(Clone)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static LogBuf {
    static LOGS: OnceLock<LogBuf> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = LogBuf(Arc::default());
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    })
}

fn log_text() -> String {
    String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned()
}

/// Asserts that none of `secrets` appears in the logs or in any of `replies`.
fn assert_no_canary(secrets: &[String], replies: &[Reply]) {
    let text = log_text();
    assert!(text.len() > 1000, "trace logging is not capturing anything");
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        assert!(
            !text.contains(s.as_str()),
            "a secret or token appears in the logs: {}...",
            &s[..6]
        );
        for r in replies {
            let all = format!("{:?}{}", r.headers, r.text());
            assert!(
                !all.contains(s.as_str()),
                "a secret or token appears in a response"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A token endpoint that counts requests and answers from a script.

#[derive(Clone, Debug)]
enum TokenReply {
    Ok { lifetime: u64 },
    Status(u16, &'static str),
    Stall(Duration),
    Garbage,
    Empty,
}

struct TokenStub {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    script: Arc<Mutex<TokenReply>>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenStub {
    async fn start(reply: TokenReply, delay: Duration) -> TokenStub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(Mutex::new(reply));
        let (h, s) = (hits.clone(), script.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, s) = (h.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (h, s) = (h.clone(), s.clone());
                        async move {
                            let _ = req.into_body().collect().await;
                            let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                            tokio::time::sleep(delay).await;
                            let reply = s.lock().unwrap().clone();
                            let (status, body) = match reply {
                                TokenReply::Ok { lifetime } => (
                                    200,
                                    json!({"access_token": format!("stub-access-token-{n}-{}", "x".repeat(16)), "token_type": "Bearer", "expires_in": lifetime})
                                        .to_string(),
                                ),
                                TokenReply::Status(code, body) => (code, body.to_string()),
                                TokenReply::Stall(d) => {
                                    tokio::time::sleep(d).await;
                                    (500, String::new())
                                }
                                TokenReply::Garbage => (200, "<html>not json</html>".to_string()),
                                TokenReply::Empty => (200, String::new()),
                            };
                            let mut resp = Response::new(Full::new(Bytes::from(body)));
                            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TokenStub {
            addr,
            hits,
            script,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn set(&self, reply: TokenReply) {
        *self.script.lock().unwrap() = reply;
    }
}

impl Drop for TokenStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const STUB_SECRET: &str = "stub-client-secret-canary-5c1e";

fn credentials_for(url: &str, timeout: Duration) -> UpstreamCredentials {
    let mut map = BTreeMap::new();
    map.insert(
        "default".to_string(),
        CredentialSettings::OAuth2(OAuth2Credential {
            token_url: url.parse().unwrap(),
            client_id: "gateway".into(),
            client_secret: Secret::new(STUB_SECRET),
            scope: Some("partner".into()),
            client_auth: ClientAuth::Basic,
            refresh_before: Duration::from_secs(60),
            timeout,
            extra_params: BTreeMap::new(),
        }),
    );
    UpstreamCredentials::new(
        &map,
        build_client(None, Duration::from_secs(2)).unwrap(),
        Metrics::new(),
    )
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn fifty_concurrent_cold_requests_cause_exactly_one_token_fetch() {
    logs();
    let stub = TokenStub::start(
        TokenReply::Ok { lifetime: 3600 },
        Duration::from_millis(200),
    )
    .await;
    let creds = credentials_for(&stub.url(), Duration::from_secs(5));
    let calls = (0..50).map(|_| {
        let c = creds.clone();
        tokio::spawn(async move { c.get("default").expect("configured").authorization().await })
    });
    let results: Vec<_> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    let first = results[0].as_ref().unwrap().clone();
    assert!(
        results.iter().all(|r| r.as_ref().unwrap() == first),
        "everyone shares the one token"
    );
    assert_eq!(stub.hits(), 1);
    assert_no_canary(&[STUB_SECRET.to_string()], &[]);
}

#[tokio::test]
async fn failing_token_endpoint_without_a_token_gives_503_quickly_and_backs_off() {
    logs();
    for reply in [
        TokenReply::Status(500, r#"{"error":"server_error"}"#),
        TokenReply::Garbage,
        TokenReply::Empty,
        TokenReply::Stall(Duration::from_secs(30)),
    ] {
        let stub = TokenStub::start(reply.clone(), Duration::ZERO).await;
        let creds = credentials_for(&stub.url(), Duration::from_millis(500));
        let started = Instant::now();
        let first = creds
            .get("default")
            .expect("configured")
            .authorization()
            .await;
        assert_eq!(
            first.map_err(|e| e.code()),
            Err("upstream_credentials_unavailable"),
            "{reply:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{reply:?}: the first caller waited too long"
        );
        // During the backoff, callers are answered at once and the endpoint is not hammered.
        let hits = stub.hits();
        let started = Instant::now();
        for _ in 0..20 {
            assert!(
                creds
                    .get("default")
                    .expect("configured")
                    .authorization()
                    .await
                    .is_err()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{reply:?}: callers waited during backoff"
        );
        assert_eq!(
            stub.hits(),
            hits,
            "{reply:?}: requests during backoff reached the token endpoint"
        );
        assert!(
            creds
                .not_ready()
                .iter()
                .any(|r| r.contains("credential default")),
            "{reply:?}"
        );
    }
}

#[tokio::test]
async fn token_endpoint_recovers_after_backoff_and_readiness_follows() {
    logs();
    let stub = TokenStub::start(TokenReply::Status(503, ""), Duration::ZERO).await;
    let creds = credentials_for(&stub.url(), Duration::from_millis(500));
    creds.start().await;
    assert!(!creds.not_ready().is_empty());
    stub.set(TokenReply::Ok { lifetime: 3600 });
    // The background refresher retries after its backoff, without any caller.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !creds.not_ready().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        creds.not_ready().is_empty(),
        "the credential did not recover by itself"
    );
    assert!(
        creds
            .get("default")
            .expect("configured")
            .authorization()
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn steady_traffic_over_several_token_lifetimes_refreshes_ahead_and_never_sends_an_expired_token()
 {
    logs();
    let h = Harness::start_with(Setup {
        sandbox: SandboxOptions {
            token_expires_in: 2,
            rate_limit: 10_000,
            ..SandboxOptions::default()
        },
        ..Setup::default()
    })
    .await;
    let t = h.sourcing_token();
    h.sandbox.clear_received();
    let before = h.sandbox.token_requests().len();
    let mut sent = 0;
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        let r = h.get("/v1/partner/jobs", &t).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An expired token would have been refused by the sandbox and replayed: one upstream call
    // per request proves every token sent was valid.
    assert_eq!(
        h.sandbox.received().len(),
        sent,
        "some request needed a replay"
    );
    let fetches = h.sandbox.token_requests().len() - before;
    // Lifetime 2 s, refreshed 1 s (half the lifetime) ahead: about one fetch per second.
    assert!((3..=8).contains(&fetches), "{fetches} token fetches in 5 s");
}

#[tokio::test]
async fn token_endpoint_down_keeps_serving_the_valid_token_then_503_after_expiry() {
    logs();
    let h = Harness::start_with(Setup {
        sandbox: SandboxOptions {
            token_expires_in: 4,
            rate_limit: 10_000,
            ..SandboxOptions::default()
        },
        ..Setup::default()
    })
    .await;
    let t = h.sourcing_token();
    h.sandbox.faults().token_endpoint_fail(1_000, 500);
    // Refresh is due after about 2 s; the token stays valid until 4 s.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = h.get("/v1/partner/jobs", &t).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the still-valid token must keep being used: {}",
        r.text()
    );
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let started = Instant::now();
    let r = h.get("/v1/partner/jobs", &t).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_credentials_unavailable"
        )
    );
    assert!(
        started.elapsed() < Duration::from_secs(7),
        "the caller waited too long"
    );
    // The partner-key team is unaffected.
    let agency = h.token("svc-agency-connector", json!({}));
    assert_eq!(
        h.get("/v1/partner/jobs", &agency).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn invalid_client_is_503_and_logged_loudly_without_the_secret() {
    logs();
    let h = Harness::start_with(Setup {
        sandbox: SandboxOptions {
            clients: vec![("gateway-dev".into(), "the-real-secret-differs".into())],
            rate_limit: 10_000,
            ..SandboxOptions::default()
        },
        wait_ready: false,
        ..Setup::default()
    })
    .await;
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream_credentials_unavailable"
        )
    );
    assert!(h.sandbox.received().is_empty());
    let text = log_text();
    assert!(
        text.contains("rejected the gateway's client credentials"),
        "no loud log line"
    );
    assert!(text.contains("invalid_client"));
    let ready = h
        .client
        .send(Method::GET, &h.admin_url("/readyz"), &[], Bytes::new())
        .await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready.text().contains("credential default"),
        "{}",
        ready.text()
    );
    assert_no_canary(
        &["dev-client-secret".into(), "the-real-secret-differs".into()],
        &[r, ready],
    );
}

#[tokio::test]
async fn revoked_token_gets_one_refetch_and_one_replay_then_200() {
    logs();
    let h = Harness::start().await;
    let t = h.sourcing_token();
    assert_eq!(h.get("/v1/partner/jobs", &t).await.status, StatusCode::OK);
    h.sandbox.clear_received();
    let fetches = h.sandbox.token_requests().len();
    h.sandbox.revoke_all_tokens();
    let r = h.get("/v1/partner/jobs", &t).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(h.sandbox.token_requests().len(), fetches + 1);
    let got = h.sandbox.received();
    assert_eq!(
        got.len(),
        2,
        "the 401 and the replay: {:?}",
        got.iter()
            .map(|g| (&g.path, g.header("authorization").map(|a| a.len())))
            .collect::<Vec<_>>()
    );
    assert_ne!(
        got[0].header("authorization"),
        got[1].header("authorization"),
        "the replay uses the fresh token"
    );
    // The next request uses the fresh token straight away.
    assert_eq!(h.get("/v1/partner/jobs", &t).await.status, StatusCode::OK);
    assert_eq!(h.sandbox.received().len(), 3);
}

#[tokio::test]
async fn upstream_that_always_says_401_gets_one_shared_refetch_one_replay_each_and_502() {
    logs();
    let stub = Stub::start().await;
    stub.set_reply(
        401,
        r#"{"errors":[{"message":"Invalid credentials"}]}"#,
        Duration::from_millis(300),
    );
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        ..Setup::default()
    })
    .await;
    let fetches = h.sandbox.token_requests().len();
    let t = h.sourcing_token();
    let calls = (0..10).map(|_| {
        let (c, url, auth) = (
            h.client.clone(),
            h.url("/v1/partner/jobs"),
            format!("Bearer {t}"),
        );
        tokio::spawn(async move {
            c.send(Method::GET, &url, &[("authorization", &auth)], Bytes::new())
                .await
        })
    });
    for r in futures_util::future::join_all(calls).await {
        let r = r.unwrap();
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::BAD_GATEWAY, "upstream_rejected_credentials")
        );
    }
    assert_eq!(
        h.sandbox.token_requests().len(),
        fetches + 1,
        "concurrent 401s share one refetch"
    );
    assert_eq!(
        stub.seen().len(),
        20,
        "each request: one call and one replay"
    );
}

#[tokio::test]
async fn partner_key_rejected_by_the_upstream_is_502_without_replay() {
    logs();
    let stub = Stub::start().await;
    stub.set_reply(
        401,
        r#"{"message":"Invalid Basic Auth credentials"}"#,
        Duration::ZERO,
    );
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        ..Setup::default()
    })
    .await;
    let r = h
        .get(
            "/v1/partner/jobs",
            &h.token("svc-agency-connector", json!({})),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_GATEWAY, "upstream_rejected_credentials")
    );
    assert_eq!(stub.seen().len(), 1);
}

#[tokio::test]
async fn other_upstream_statuses_pass_through_without_token_churn() {
    logs();
    let stub = Stub::start().await;
    stub.set_reply(
        403,
        r#"{"errors":[{"message":"Forbidden"}]}"#,
        Duration::ZERO,
    );
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        ..Setup::default()
    })
    .await;
    let fetches = h.sandbox.token_requests().len();
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(h.sandbox.token_requests().len(), fetches);
}

#[tokio::test]
async fn upstream_429_pauses_the_credential_for_each_retry_after_form() {
    logs();
    let epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(4));
    let forms: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("seconds", vec![("retry-after", "3".into())]),
        ("epoch", vec![("retry-after", (epoch + 3).to_string())]),
        ("http date", vec![("retry-after", date)]),
        (
            "x-ratelimit-reset only",
            vec![("x-ratelimit-reset", (epoch + 3).to_string())],
        ),
    ];
    for (name, headers) in forms {
        let stub = Stub::start().await;
        stub.set_reply(
            429,
            r#"{"errors":[{"message":"Too many requests"}]}"#,
            Duration::ZERO,
        );
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        stub.set_reply_headers(&hs);
        let h = Harness::start_with(Setup {
            upstream: Some(stub.base_url()),
            ..Setup::default()
        })
        .await;
        let t = h.sourcing_token();
        let first = h.get("/v1/partner/jobs", &t).await;
        assert_eq!(
            (first.status, first.code().as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "upstream_rate_limited"),
            "{name}"
        );
        let wait: u64 = first.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=5).contains(&wait), "{name}: Retry-After {wait}");
        // Paused: answered at once, without calling Greenhouse, for every team on that credential.
        let reporting = h.token("svc-reporting-job", json!({}));
        for tok in [&t, &reporting] {
            let again = h.get("/v1/partner/jobs", tok).await;
            assert_eq!(again.code(), "upstream_rate_limited", "{name}");
            assert!(again.headers.contains_key("retry-after"), "{name}");
        }
        assert_eq!(
            stub.seen().len(),
            1,
            "{name}: the upstream was called during the pause"
        );
        // Another credential is not paused.
        stub.set_reply(200, "[]", Duration::ZERO);
        stub.set_reply_headers(&[]);
        let agency = h.token("svc-agency-connector", json!({}));
        assert_eq!(
            h.get("/v1/partner/jobs", &agency).await.status,
            StatusCode::OK,
            "{name}"
        );
    }
}

#[tokio::test]
async fn pause_ends_when_retry_after_has_passed() {
    logs();
    let stub = Stub::start().await;
    stub.set_reply(429, "{}", Duration::ZERO);
    stub.set_reply_headers(&[("retry-after", "1")]);
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        ..Setup::default()
    })
    .await;
    let t = h.sourcing_token();
    assert_eq!(
        h.get("/v1/partner/jobs", &t).await.code(),
        "upstream_rate_limited"
    );
    stub.set_reply(200, "[]", Duration::ZERO);
    stub.set_reply_headers(&[]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(h.get("/v1/partner/jobs", &t).await.status, StatusCode::OK);
    assert_eq!(stub.seen().len(), 2);
}

#[tokio::test]
async fn canary_scan_finds_no_secret_or_token_in_trace_logs_or_responses() {
    logs();
    let h = Harness::start().await;
    let mut replies = Vec::new();
    let sourcing = h.sourcing_token();
    let agency = h.token("svc-agency-connector", json!({}));
    let reporting = h.token("svc-reporting-x", json!({}));
    for tok in [&sourcing, &agency, &reporting] {
        replies.push(h.get("/v1/partner/jobs", tok).await);
    }
    h.sandbox.revoke_all_tokens();
    replies.push(h.get("/v1/partner/jobs", &sourcing).await);
    replies.push(h.get("/v1/partner/current_user", &agency).await);
    replies.push(h.get("/v1/partner/jobs", &format!("{sourcing}x")).await);
    replies.push(
        h.post_json(
            "/v1/partner/candidates",
            &agency,
            &json!({"external_id": "e", "first_name": "A", "last_name": "B"}),
        )
        .await,
    );
    let mut secrets = vec![
        "dev-client-secret".to_string(),
        "dev-partner-key".to_string(),
        base64_of("dev-partner-key:"),
        base64_of("gateway-dev:dev-client-secret"),
    ];
    for tok in [&sourcing, &agency, &reporting] {
        secrets.push(tok.to_string());
        secrets.push(tok.rsplit('.').next().unwrap().to_string()); // the signature alone
    }
    // Every upstream access token the sandbox issued (as the gateway sent them).
    for r in h.sandbox.received() {
        if let Some(a) = r.header("authorization") {
            secrets.push(
                a.trim_start_matches("Bearer ")
                    .trim_start_matches("Basic ")
                    .to_string(),
            );
        }
    }
    assert!(secrets.len() > 10);
    assert_no_canary(&secrets, &replies);
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

// ---------------------------------------------------------------------------------------------
// One team's unknown On-Behalf-Of user must not churn the token every team shares.

/// The default teams plus `marketing`, whose default `On-Behalf-Of` user the sandbox (like
/// Greenhouse) does not know, so every call it makes is answered 401.
fn teams_with_an_unknown_user() -> Vec<(&'static str, String)> {
    let mut teams = support::default_teams();
    teams.push((
        "marketing",
        support::email(
            r#"name = "marketing"
operations = ["listPartnerJobs"]
credential = "default"
[[members]]
iss = "ISSUER"
sub = "svc-marketing"
[on_behalf_of]
default = "nobody.greenhouse.knows(at)example.com"
"#,
        ),
    ));
    teams
}

#[tokio::test]
async fn unknown_on_behalf_of_user_causes_at_most_one_extra_token_fetch_and_other_teams_keep_the_token()
 {
    logs();
    let h = Harness::start_with(Setup {
        teams: teams_with_an_unknown_user(),
        ..Setup::default()
    })
    .await;
    let good = h.sourcing_token();
    let bad = h.token("svc-marketing", json!({}));
    assert_eq!(
        h.get("/v1/partner/jobs", &good).await.status,
        StatusCode::OK
    );
    let fetches = h.sandbox.token_requests().len();
    h.sandbox.clear_received();

    // Sequential, then concurrent, calls on behalf of the unknown user.
    for i in 0..5 {
        let r = h.get("/v1/partner/jobs", &bad).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::BAD_GATEWAY, "upstream_rejected_credentials"),
            "bad call {i}: {}",
            r.text()
        );
    }
    let concurrent =
        futures_util::future::join_all((0..5).map(|_| h.get("/v1/partner/jobs", &bad))).await;
    for r in &concurrent {
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    }
    assert!(
        h.sandbox.token_requests().len() <= fetches + 1,
        "10 calls with an unknown On-Behalf-Of caused {} token fetches",
        h.sandbox.token_requests().len() - fetches
    );
    let upstream_calls = h.sandbox.received().len();
    assert!(
        upstream_calls <= 10 + 1,
        "10 bad calls made {upstream_calls} upstream calls (one replay at most)"
    );

    // Another team's calls keep working, with the token the bad calls last used.
    let token_in_use = h
        .sandbox
        .received()
        .last()
        .unwrap()
        .header("authorization")
        .map(str::to_owned);
    for _ in 0..3 {
        let r = h.get("/v1/partner/jobs", &good).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let after = h.sandbox.received();
    assert_eq!(after.len(), upstream_calls + 3, "good calls: no replay");
    assert_eq!(
        after
            .last()
            .unwrap()
            .header("authorization")
            .map(str::to_owned),
        token_in_use,
        "the good team uses the same token"
    );
    assert!(h.sandbox.token_requests().len() <= fetches + 1);
}

#[tokio::test]
async fn token_refetches_after_upstream_401s_have_a_floor_per_credential() {
    logs();
    let stub = Stub::start().await;
    stub.set_reply(
        401,
        r#"{"errors":[{"message":"Invalid On-Behalf-Of"}]}"#,
        Duration::ZERO,
    );
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        ..Setup::default()
    })
    .await;
    let fetches = h.sandbox.token_requests().len();
    let t = h.sourcing_token();
    // Each call names another user, so none is recognised as the user's fault; the floor still
    // holds the credential to one 401-triggered fetch.
    for (i, user) in [
        "sourcing.bot(at)example.com",
        "recruiter.one(at)example.com",
    ]
    .iter()
    .cycle()
    .take(6)
    .enumerate()
    {
        let obo = support::email(user);
        let r = h
            .client
            .send(
                Method::GET,
                &h.url("/v1/partner/jobs"),
                &[
                    ("authorization", &format!("Bearer {t}")),
                    ("on-behalf-of", &obo),
                ],
                Bytes::new(),
            )
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::BAD_GATEWAY, "upstream_rejected_credentials"),
            "call {i}"
        );
    }
    assert_eq!(
        h.sandbox.token_requests().len(),
        fetches + 1,
        "one 401-triggered token fetch within the floor"
    );
    assert_eq!(stub.seen().len(), 6 + 1, "one replay, with the fresh token");
}
