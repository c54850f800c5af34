//! What an operator sees: `/metrics` (every series after a representative run, bounded labels,
//! Prometheus text or OpenMetrics by `Accept`, read by the reference parsers), the admin token on
//! every admin path, `healthcheck` with that token, one log line per request (JSON selected by
//! `GATEWAY_LOG_FORMAT`, text with span fields, `RUST_LOG` targets) and the readiness drain on
//! SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use greenhouse_gateway::sandbox::{Sandbox, SandboxOptions};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Harness, Reply, Setup, Stub, TestClient};

const ADMIN_TOKEN: &str = "observability-admin-token-0123456789abcdef";

/// A team limited to one request an hour, beside the default teams.
fn teams_with_a_limited_one() -> Vec<(&'static str, String)> {
    let mut teams = support::default_teams();
    teams.push((
        "limited",
        r#"name = "limited"
operations = ["listPartnerJobs"]
credential = "default"
[[members]]
iss = "ISSUER"
sub = "svc-limited"
[on_behalf_of]
default = "limited.bot@example.com"
[quota]
rate = "1/h"
burst = 1
"#
        .to_string(),
    ));
    teams
}

async fn with_stub(setup: Setup) -> (Harness, Stub) {
    let stub = Stub::start().await;
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        ..setup
    })
    .await;
    (h, stub)
}

async fn admin(h: &Harness, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
    TestClient::new()
        .send(method, &h.admin_url(path), headers, Bytes::new())
        .await
}

/// Waits until the audit file holds `n` records: every request before it has been counted.
async fn wait_records(h: &Harness, n: usize) {
    let path = h.dir.path().join("audit/audit.jsonl");
    for _ in 0..500 {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().count() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the audit file never held {n} records")
}

/// One sample line of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of an exposition (a test-side reading, independent of the implementation; label
/// values here never hold `,` or escaped quotes).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').unwrap();
                    let labels = body
                        .split("\",")
                        .filter(|kv| !kv.is_empty())
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").unwrap();
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (name, labels)
                }
            };
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().unwrap(),
            }
        })
        .collect()
}

fn find<'a>(all: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    all.iter().find(|s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

#[tokio::test]
async fn every_metric_is_present_after_a_representative_run_with_labels_only_from_configuration() {
    let (h, stub) = with_stub(Setup {
        teams: teams_with_a_limited_one(),
        ..Setup::default()
    })
    .await;
    let sourcing = h.sourcing_token();
    let canary_subject = "svc-canary-subject-4711";
    let stranger = h.token(canary_subject, json!({}));
    let limited = h.token("svc-limited", json!({}));
    let mut n = 0;

    // Forwarded: a 2xx, a 4xx from Greenhouse, and an answer that does not match the spec.
    assert_eq!(
        h.get("/v1/partner/jobs", &sourcing).await.status,
        StatusCode::OK
    );
    stub.set_reply(404, r#"{"message":"not found"}"#, Duration::ZERO);
    let r = h.get("/v1/partner/jobs", &sourcing).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    stub.set_reply(
        200,
        r#"[{"id":"not-a-number","name":"Job"}]"#,
        Duration::ZERO,
    );
    assert_eq!(
        h.get("/v1/partner/jobs", &sourcing).await.status,
        StatusCode::OK
    );
    stub.set_reply(200, "[]", Duration::ZERO);
    n += 3;
    // Refused: an invalid body, an undeclared query parameter, a stranger, a malformed token,
    // a path no route has, and a team over its quota.
    let r = h
        .post_json(
            "/v1/partner/candidates",
            &sourcing,
            &json!({"canary_field": "x"}),
        )
        .await;
    assert_eq!(r.code(), "validation_failed", "{}", r.text());
    let r = h
        .get(
            "/v1/partner/jobs?canary_param=canary-query-value",
            &sourcing,
        )
        .await;
    assert_eq!(r.code(), "bad_request", "{}", r.text());
    let r = h.get("/v1/partner/jobs", &stranger).await;
    assert_eq!(r.code(), "unknown_team", "{}", r.text());
    let r = h.get("/v1/partner/jobs", "canary.token.value").await;
    assert_eq!(r.code(), "invalid_token", "{}", r.text());
    let r = h
        .get("/v1/partner/canary-path-segment?canary_query=1", &sourcing)
        .await;
    assert_eq!(r.code(), "route_not_found", "{}", r.text());
    assert_eq!(
        h.get("/v1/partner/jobs", &limited).await.status,
        StatusCode::OK
    );
    let r = h.get("/v1/partner/jobs", &limited).await;
    assert_eq!(r.code(), "rate_limited", "{}", r.text());
    n += 7;
    // A reload.
    let r = admin(&h, Method::POST, "/admin/reload", &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    wait_records(&h, n).await;

    let text = admin(&h, Method::GET, "/metrics", &[]).await.text();
    let all = samples(&text);
    let issuer = h.sandbox.issuer();
    let version = env!("CARGO_PKG_VERSION");
    let expected: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "gateway_requests_total",
            vec![
                ("team", "sourcing"),
                ("operation", "listPartnerJobs"),
                ("code", "forwarded"),
            ],
        ),
        (
            "gateway_requests_total",
            vec![
                ("team", "none"),
                ("operation", "listPartnerJobs"),
                ("code", "unknown_team"),
            ],
        ),
        (
            "gateway_requests_total",
            vec![
                ("team", "none"),
                ("operation", "none"),
                ("code", "route_not_found"),
            ],
        ),
        (
            "gateway_request_duration_seconds_bucket",
            vec![
                ("team", "sourcing"),
                ("operation", "listPartnerJobs"),
                ("le", "+Inf"),
            ],
        ),
        (
            "gateway_request_duration_seconds_count",
            vec![("team", "limited")],
        ),
        (
            "gateway_upstream_duration_seconds_bucket",
            vec![("operation", "listPartnerJobs"), ("le", "+Inf")],
        ),
        (
            "gateway_upstream_responses_total",
            vec![("operation", "listPartnerJobs"), ("status_class", "2xx")],
        ),
        (
            "gateway_upstream_responses_total",
            vec![("operation", "listPartnerJobs"), ("status_class", "4xx")],
        ),
        (
            "gateway_quota_rejections_total",
            vec![
                ("team", "limited"),
                ("operation", "listPartnerJobs"),
                ("kind", "rate"),
            ],
        ),
        (
            "gateway_validation_failures_total",
            vec![
                ("team", "sourcing"),
                ("operation", "createPartnerCandidate"),
                ("mode", "enforce"),
            ],
        ),
        (
            "gateway_validation_failures_total",
            vec![
                ("team", "sourcing"),
                ("operation", "listPartnerJobs"),
                ("mode", "enforce"),
            ],
        ),
        (
            "gateway_jwt_rejections_total",
            vec![("reason", "malformed")],
        ),
        (
            "gateway_upstream_token_fetches_total",
            vec![("credential", "default"), ("result", "success")],
        ),
        (
            "gateway_jwks_fetches_total",
            vec![("issuer", issuer.as_str()), ("result", "success")],
        ),
        ("gateway_inflight_requests", vec![("team", "sourcing")]),
        (
            "gateway_spec_drift_total",
            vec![("operation", "listPartnerJobs")],
        ),
        ("gateway_config_reloads_total", vec![("result", "success")]),
        ("gateway_build_info", vec![("version", version)]),
        ("gateway_audit_records_total", vec![]),
        ("gateway_audit_errors_total", vec![]),
        ("gateway_audit_queue_depth", vec![]),
        ("gateway_quota_backend_errors_total", vec![]),
        ("gateway_quota_backend_allowed_total", vec![]),
        ("process_cpu_seconds_total", vec![]),
        ("process_resident_memory_bytes", vec![]),
        ("process_virtual_memory_bytes", vec![]),
        ("process_open_fds", vec![]),
        ("process_max_fds", vec![]),
        ("process_start_time_seconds", vec![]),
    ];
    let missing: Vec<String> = expected
        .iter()
        .filter(|(name, labels)| find(&all, name, labels).is_none())
        .map(|(name, labels)| format!("{name}{labels:?}"))
        .collect();
    assert!(missing.is_empty(), "missing {missing:#?} in\n{text}");

    let value = |name: &str, labels: &[(&str, &str)]| find(&all, name, labels).unwrap().value;
    let ok = [
        ("team", "sourcing"),
        ("operation", "listPartnerJobs"),
        ("code", "forwarded"),
    ];
    assert_eq!(value("gateway_requests_total", &ok), 3.0);
    assert_eq!(
        value(
            "gateway_upstream_responses_total",
            &[("operation", "listPartnerJobs"), ("status_class", "2xx")]
        ),
        3.0,
        "two answers for sourcing, one for limited"
    );
    assert_eq!(value("gateway_spec_drift_total", &[]), 1.0);
    assert_eq!(
        value("gateway_inflight_requests", &[("team", "sourcing")]),
        0.0
    );
    assert_eq!(value("gateway_audit_errors_total", &[]), 0.0);
    assert_eq!(value("gateway_quota_backend_errors_total", &[]), 0.0);
    assert!(value("gateway_audit_records_total", &[]) >= n as f64);
    assert!(value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(value("process_open_fds", &[]) > 0.0);
    // A feature that is not built has no series (DESIGN 1.6 names it; it is not faked).
    assert!(!text.contains("gateway_idempotent_replays"), "{text}");

    // Every label value comes from the configuration or a fixed list: never the path, the
    // query, the subject or the token of a request.
    let spec_ops: BTreeSet<String> = h
        .gateway
        .gateway
        .policy()
        .config
        .spec
        .operations()
        .iter()
        .map(|o| o.id.clone())
        .collect();
    for s in &all {
        for (k, v) in &s.labels {
            assert!(!v.contains("canary"), "raw input in {s:?}");
            assert!(!v.contains(canary_subject), "a subject in {s:?}");
            match k.as_str() {
                "team" => assert!(
                    ["sourcing", "agency", "reporting", "limited", "none"].contains(&v.as_str()),
                    "{s:?}"
                ),
                "operation" => assert!(spec_ops.contains(v) || v == "none", "{s:?}"),
                "issuer" => assert_eq!(v, &issuer),
                "credential" => assert!(["default", "partner_key"].contains(&v.as_str())),
                "le" | "version" => {}
                _ => assert!(
                    v.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                    "label value outside a fixed vocabulary: {s:?}"
                ),
            }
        }
    }
    for raw in [sourcing.as_str(), stranger.as_str(), "canary.token.value"] {
        assert!(!text.contains(raw), "a token in /metrics");
    }
}

#[tokio::test]
async fn metrics_answer_openmetrics_or_prometheus_text_by_the_accept_header() {
    let h = Harness::start().await;
    let _ = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    wait_records(&h, 1).await;

    let plain = admin(&h, Method::GET, "/metrics", &[]).await;
    assert_eq!(
        plain.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert_eq!(plain.headers["vary"], "Accept");
    let text = plain.text();
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE gateway_requests_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter\n"),
        "{text}"
    );

    // What Prometheus sends when it scrapes.
    let prometheus_accept = "application/openmetrics-text;version=1.0.0;q=0.6,application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.2";
    for accept in ["application/openmetrics-text", prometheus_accept] {
        let om = admin(&h, Method::GET, "/metrics", &[("accept", accept)]).await;
        assert_eq!(
            om.headers["content-type"],
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            "{accept}"
        );
        let text = om.text();
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE gateway_requests counter\n"), "{text}");
        assert!(
            text.contains("gateway_requests_total{team=\"sourcing\",operation=\"listPartnerJobs\",code=\"forwarded\"} 1\n"),
            "{text}"
        );
    }
    for accept in ["text/plain", "*/*", "application/json"] {
        let r = admin(&h, Method::GET, "/metrics", &[("accept", accept)]).await;
        assert_eq!(
            r.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8",
            "{accept}"
        );
    }
}

/// Parses an exposition with the Python reference client's parser for `format` (`prometheus`
/// or `openmetrics`); every sample as `{family, type, name, labels, value}`.
fn reference_parse(format: &str, text: &str) -> Vec<Value> {
    use std::io::Write;
    let script = r#"
import json, sys
try:
    from prometheus_client.parser import text_string_to_metric_families as prometheus
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
except ImportError:
    sys.exit("prometheus_client is not installed: python3 -m pip install prometheus_client")
parse = openmetrics if sys.argv[1] == "openmetrics" else prometheus
out = []
for f in parse(sys.stdin.read()):
    for s in f.samples:
        out.append({"family": f.name, "type": f.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", script, format])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (the reference Prometheus parser is Python's prometheus_client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the {format} parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
}

#[tokio::test]
async fn metrics_are_read_by_the_reference_prometheus_and_openmetrics_parsers() {
    let h = Harness::start().await;
    let _ = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    let _ = h.get("/v1/partner/jobs", "not-a-token").await;
    wait_records(&h, 2).await;
    for (format, accept) in [
        ("prometheus", "text/plain"),
        ("openmetrics", "application/openmetrics-text"),
    ] {
        let text = admin(&h, Method::GET, "/metrics", &[("accept", accept)])
            .await
            .text();
        let parsed = reference_parse(format, &text);
        let sample = |name: &str| {
            parsed
                .iter()
                .find(|s| s["name"] == name)
                .unwrap_or_else(|| panic!("{format}: no {name} in {parsed:#?}"))
        };
        let forwarded = parsed
            .iter()
            .find(|s| s["name"] == "gateway_requests_total" && s["labels"]["code"] == "forwarded")
            .unwrap_or_else(|| panic!("{format}: {parsed:#?}"));
        assert_eq!(forwarded["type"], "counter", "{format}");
        assert_eq!(forwarded["labels"]["team"], "sourcing");
        assert_eq!(forwarded["value"], 1.0);
        assert_eq!(
            sample("gateway_jwt_rejections_total")["labels"]["reason"],
            "malformed"
        );
        assert_eq!(
            sample("gateway_request_duration_seconds_bucket")["type"],
            "histogram",
            "{format}"
        );
        assert_eq!(sample("gateway_audit_queue_depth")["type"], "gauge");
        assert_eq!(sample("process_cpu_seconds_total")["type"], "counter");
        assert_eq!(sample("process_start_time_seconds")["type"], "gauge");
    }
}

#[tokio::test]
async fn with_an_admin_token_every_admin_path_needs_it_and_teams_shows_no_secret() {
    let (h, _stub) = with_stub(Setup {
        admin_extra: format!("token = {{ value = \"{ADMIN_TOKEN}\" }}"),
        ..Setup::default()
    })
    .await;
    let _ = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let wrong = format!("Bearer {ADMIN_TOKEN}x");
    let basic = format!("Basic {ADMIN_TOKEN}");
    for (method, path, with_token) in [
        (Method::GET, "/healthz", StatusCode::OK),
        (Method::GET, "/readyz", StatusCode::OK),
        (Method::GET, "/metrics", StatusCode::OK),
        (Method::GET, "/admin/teams", StatusCode::OK),
        (Method::POST, "/admin/reload", StatusCode::OK),
        (Method::GET, "/admin/reload", StatusCode::METHOD_NOT_ALLOWED),
        (Method::GET, "/no-such-path", StatusCode::NOT_FOUND),
    ] {
        for refused in [None, Some(wrong.as_str()), Some(basic.as_str())] {
            let headers: Vec<(&str, &str)> =
                refused.map(|v| ("authorization", v)).into_iter().collect();
            let r = admin(&h, method.clone(), path, &headers).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} {refused:?}"
            );
            assert!(
                r.headers.contains_key("www-authenticate"),
                "{method} {path}"
            );
            assert!(!r.text().contains("teams"), "{method} {path}: {}", r.text());
        }
        let r = admin(&h, method.clone(), path, &[("authorization", &bearer)]).await;
        assert_eq!(r.status, with_token, "{method} {path}: {}", r.text());
    }

    let teams = admin(
        &h,
        Method::GET,
        "/admin/teams",
        &[("authorization", &bearer)],
    )
    .await;
    let v = teams.json();
    let names: Vec<&str> = v["teams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["agency", "reporting", "sourcing"], "{v}");
    let sourcing = &v["teams"][2];
    assert_eq!(sourcing["credential"], "default");
    assert!(sourcing["operations"].as_array().unwrap().len() > 1);
    // Every secret of the configuration, and the bearer token of the request just served.
    let text = teams.text();
    for secret in [
        "dev-client-secret",
        "dev-partner-key",
        ADMIN_TOKEN,
        "Bearer ",
    ] {
        assert!(
            !text.contains(secret),
            "/admin/teams shows {secret}: {text}"
        );
    }
    let metrics = admin(&h, Method::GET, "/metrics", &[("authorization", &bearer)]).await;
    for secret in ["dev-client-secret", "dev-partner-key", ADMIN_TOKEN] {
        assert!(!metrics.text().contains(secret));
    }
}

#[tokio::test]
async fn listen_drain_is_checked_and_defaults_to_five_seconds() {
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let load = |drain: &str| {
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup {
            listen_extra: drain.to_string(),
            ..Setup::default()
        };
        support::write_config(dir.path(), &sandbox, &setup);
        greenhouse_gateway::config::load(&dir.path().join("gateway.toml"))
    };
    assert_eq!(
        load("").unwrap().listen.drain,
        Duration::from_secs(5),
        "default"
    );
    assert_eq!(load("drain = \"0s\"").unwrap().listen.drain, Duration::ZERO);
    assert_eq!(
        load("drain = \"15s\"").unwrap().listen.drain,
        Duration::from_secs(15)
    );
    for bad in ["drain = \"6m\"", "drain = \"soon\""] {
        let problems = load(bad).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.to_string().contains("gateway.toml: listen.drain: ")),
            "{bad}: {problems:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary: healthcheck, logs, drain

/// A sandbox, a stub upstream and a config for `serve`, with `setup` applied.
async fn serve_config(setup: Setup) -> (Sandbox, Stub, tempfile::TempDir) {
    let stub = Stub::start().await;
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    support::write_config(
        dir.path(),
        &sandbox,
        &Setup {
            upstream: Some(stub.base_url()),
            ..setup
        },
    );
    (sandbox, stub, dir)
}

async fn wait_ready(client: &TestClient, admin: &str, headers: &[(&str, &str)]) {
    for _ in 0..400 {
        let r = client
            .send_fallible(Method::GET, &format!("http://{admin}/readyz"), headers)
            .await;
        if r.is_some_and(|r| r.status == StatusCode::OK) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the gateway did not become ready");
}

fn token_for(sandbox: &Sandbox, sub: &str) -> String {
    sandbox.mint_token(
        json!({"sub": sub, "aud": support::AUDIENCE}),
        Duration::from_secs(120),
    )
}

/// `greenhouse-gateway healthcheck ARGS` with `env`: (exit code, stdout, stderr).
async fn healthcheck(
    args: Vec<String>,
    env: Vec<(String, String)>,
) -> (Option<i32>, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(support::binary())
            .arg("healthcheck")
            .args(&args)
            .env_remove("OBS_ADMIN_TOKEN")
            .envs(env)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn healthcheck_with_config_sends_the_admin_token_it_names_and_without_it_is_refused() {
    let (_sandbox, _stub, dir) = serve_config(Setup {
        admin_extra: "token = { env = \"OBS_ADMIN_TOKEN\" }".into(),
        ..Setup::default()
    })
    .await;
    // A fixed admin port, so that the config names where the listener is.
    let config = dir.path().join("gateway.toml");
    let port = support::redis::free_port();
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[admin]\naddr = \"127.0.0.1:0\"",
        &format!("[admin]\naddr = \"127.0.0.1:{port}\""),
        1,
    );
    std::fs::write(&config, text).unwrap();
    let served = support::spawn_serve_with_env(&config, &[("OBS_ADMIN_TOKEN", ADMIN_TOKEN)]);
    assert_eq!(served.admin, format!("127.0.0.1:{port}"));
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    wait_ready(
        &TestClient::new(),
        &served.admin,
        &[("authorization", &bearer)],
    )
    .await;
    let config = config.display().to_string();
    let env = vec![("OBS_ADMIN_TOKEN".to_string(), ADMIN_TOKEN.to_string())];

    let (code, stdout, stderr) =
        healthcheck(vec!["--config".into(), config.clone()], env.clone()).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("/healthz answered 200"), "{stdout}");
    let (code, stdout, stderr) = healthcheck(
        vec!["--config".into(), config.clone(), "--ready".into()],
        env.clone(),
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("/readyz answered 200"), "{stdout}");

    // Without the token's environment: the key is named; without a token at all: 401.
    let (code, _, stderr) = healthcheck(vec!["--config".into(), config.clone()], vec![]).await;
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("admin.token: environment variable OBS_ADMIN_TOKEN is not set"),
        "{stderr}"
    );
    let (code, _, stderr) = healthcheck(vec!["--addr".into(), served.admin.clone()], env).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("answered 401"), "{stderr}");
}

/// The log lines of a process, parsed as JSON (every line must be JSON).
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON line: {l}")))
        .collect()
}

#[tokio::test]
async fn json_log_selected_by_the_environment_has_one_line_per_request_carrying_its_id() {
    let (sandbox, stub, dir) = serve_config(Setup {
        upstream_timeout: "500ms",
        ..Setup::default()
    })
    .await;
    let served = support::spawn_serve_logging(
        &dir.path().join("gateway.toml"),
        &[],
        &[("GATEWAY_LOG_FORMAT", "json"), ("RUST_LOG", "info")],
    );
    let client = TestClient::new();
    wait_ready(&client, &served.admin, &[]).await;
    let token = token_for(&sandbox, "svc-sourcing-bot");
    let bearer = format!("Bearer {token}");
    let url = |p: &str| format!("http://{}{p}", served.addr);
    let send = |id: &'static str, path: &'static str, auth: Option<String>| {
        let client = client.clone();
        let url = url(path);
        async move {
            let mut headers = vec![("x-request-id", id.to_string())];
            if let Some(a) = auth {
                headers.push(("authorization", a));
            }
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            client.send(Method::GET, &url, &headers, Bytes::new()).await
        }
    };
    assert_eq!(
        send("obs-forwarded-1", "/v1/partner/jobs", Some(bearer.clone()))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send("obs-refused-2", "/v1/partner/jobs", None).await.code(),
        "missing_token"
    );
    assert_eq!(
        send(
            "obs-invalid-3",
            "/v1/partner/jobs",
            Some("Bearer a.b.c".into())
        )
        .await
        .code(),
        "invalid_token"
    );
    // The upstream too slow: a warning in the request's span, then its line.
    stub.set_reply(200, "[]", Duration::from_secs(2));
    assert_eq!(
        send("obs-timeout-4", "/v1/partner/jobs", Some(bearer.clone()))
            .await
            .code(),
        "upstream_timeout"
    );
    // An answer too large to be read ahead: its record and line are written when the
    // connection has sent the last of it, outside the request's future, still in its span.
    let large = format!("[{}]", vec!["{\"id\":1}"; 12_000].join(","));
    assert!(large.len() > 64 * 1024);
    stub.set_reply(200, &large, Duration::ZERO);
    let streamed = send("obs-streamed-5", "/v1/partner/jobs", Some(bearer.clone())).await;
    assert_eq!(streamed.status, StatusCode::OK);
    assert_eq!(streamed.body.len(), large.len());
    let ids = [
        "obs-forwarded-1",
        "obs-refused-2",
        "obs-invalid-3",
        "obs-timeout-4",
        "obs-streamed-5",
    ];
    let mut lines = Vec::new();
    for _ in 0..200 {
        lines = json_lines(&served.log_text());
        let done = lines
            .iter()
            .filter(|l| l["target"] == "greenhouse_gateway::access")
            .count();
        if done >= ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let access: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "greenhouse_gateway::access")
        .collect();
    assert_eq!(access.len(), ids.len(), "{access:#?}");
    for id in ids {
        let mine: Vec<&&Value> = access
            .iter()
            .filter(|l| l["fields"]["request_id"] == id)
            .collect();
        assert_eq!(mine.len(), 1, "one line for {id}: {access:#?}");
        let f = &mine[0]["fields"];
        assert_eq!(mine[0]["level"], "INFO");
        assert_eq!(f["message"], "request finished");
        assert_eq!(f["method"], "GET");
        assert!(f["status"].as_u64().is_some(), "{f}");
        assert!(f["code"].as_str().is_some(), "{f}");
        assert!(f["duration_ms"].as_f64().is_some(), "{f}");
        assert_eq!(mine[0]["span"]["request_id"], id, "{}", mine[0]);
    }
    let line = |id: &str| {
        &access
            .iter()
            .find(|l| l["fields"]["request_id"] == id)
            .unwrap()["fields"]
    };
    let ok = line("obs-forwarded-1");
    assert_eq!(ok["team"], "sourcing");
    assert_eq!(ok["operation"], "listPartnerJobs");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["code"], "forwarded");
    assert_eq!(ok["upstream_status"], 200);
    assert_eq!(line("obs-refused-2")["code"], "missing_token");
    assert_eq!(line("obs-refused-2")["status"], 401);
    let invalid = line("obs-invalid-3");
    assert_eq!(invalid["code"], "invalid_token");
    assert!(
        invalid["detail"]
            .as_str()
            .unwrap_or("")
            .contains("malformed"),
        "a refusal says why: {invalid}"
    );
    assert_eq!(line("obs-timeout-4")["code"], "upstream_timeout");
    // Warnings and errors name the request they belong to.
    let warnings: Vec<&Value> = lines
        .iter()
        .filter(|l| l["level"] == "WARN" || l["level"] == "ERROR")
        .filter(|l| l["span"]["request_id"] == "obs-timeout-4")
        .collect();
    assert!(!warnings.is_empty(), "{lines:#?}");
    // Never a token or a secret in the log.
    let log = served.log_text();
    for secret in [token.as_str(), "dev-client-secret", "dev-partner-key"] {
        assert!(!log.contains(secret), "the log holds a secret");
    }
}

#[tokio::test]
async fn text_log_carries_the_request_id_on_warnings_and_rust_log_silences_the_access_target() {
    let (sandbox, stub, dir) = serve_config(Setup::default()).await;
    // Greenhouse unreachable: the warning about it is logged deep in the upstream call, without
    // an id of its own; the request's span gives it one.
    drop(stub);
    let served = support::spawn_serve_logging(
        &dir.path().join("gateway.toml"),
        &[],
        &[
            ("GATEWAY_LOG_FORMAT", "text"),
            ("RUST_LOG", "info,greenhouse_gateway::access=off"),
        ],
    );
    let client = TestClient::new();
    wait_ready(&client, &served.admin, &[]).await;
    let token = token_for(&sandbox, "svc-sourcing-bot");
    let r = client
        .send(
            Method::GET,
            &format!("http://{}/v1/partner/jobs", served.addr),
            &[
                ("authorization", &format!("Bearer {token}")),
                ("x-request-id", "obs-text-1"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.code(), "upstream_error");
    let mut log = String::new();
    for _ in 0..200 {
        log = served.log_text();
        if log.contains("request failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let warning = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains("upstream request failed"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        warning.contains("request{request_id=obs-text-1"),
        "the span's fields: {warning}"
    );
    assert!(
        !warning.contains('\u{1b}'),
        "no colour codes off a terminal: {warning}"
    );
    assert!(
        serde_json::from_str::<Value>(warning).is_err(),
        "GATEWAY_LOG_FORMAT=text is text"
    );
    assert!(
        !log.contains("request finished"),
        "RUST_LOG switched the access target off: {log}"
    );
}

#[tokio::test]
async fn sigterm_turns_readyz_503_for_the_drain_window_while_requests_still_succeed_then_exits_0() {
    let (sandbox, _stub, dir) = serve_config(Setup {
        listen_extra: "drain = \"2s\"".into(),
        admin_extra: format!("token = {{ value = \"{ADMIN_TOKEN}\" }}"),
        ..Setup::default()
    })
    .await;
    let mut served = support::spawn_serve(&dir.path().join("gateway.toml"));
    let client = TestClient::new();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let auth = [("authorization", bearer.as_str())];
    wait_ready(&client, &served.admin, &auth).await;
    let token = token_for(&sandbox, "svc-sourcing-bot");
    let jobs = format!("http://{}/v1/partner/jobs", served.addr);
    let readyz = format!("http://{}/readyz", served.admin);

    let signalled = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let mut draining = None;
    for _ in 0..200 {
        let r = client
            .send_fallible(Method::GET, &readyz, &auth)
            .await
            .unwrap();
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            draining = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let draining = draining.expect("/readyz never turned 503 after SIGTERM");
    assert!(signalled.elapsed() < Duration::from_secs(2));
    assert!(
        draining.json()["reasons"][0]
            .as_str()
            .unwrap()
            .starts_with("shutting down"),
        "{}",
        draining.text()
    );
    // The window: new requests are still served, and the process still lives.
    let r = client
        .send(
            Method::GET,
            &jobs,
            &[("authorization", &format!("Bearer {token}"))],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let healthz = client
        .send_fallible(
            Method::GET,
            &format!("http://{}/healthz", served.admin),
            &auth,
        )
        .await
        .unwrap();
    assert_eq!(
        healthz.status,
        StatusCode::OK,
        "liveness holds while draining"
    );
    assert!(served.child.try_wait().unwrap().is_none());

    let mut status = None;
    for _ in 0..400 {
        if let Some(s) = served.child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let status = status.unwrap_or_else(|| {
        let _ = served.child.kill();
        panic!("the gateway did not exit after the drain window")
    });
    assert_eq!(status.code(), Some(0));
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "exited before the drain window ended"
    );
    assert!(
        served.log_text().contains("drain window"),
        "{}",
        served.log_text()
    );
    assert!(
        client
            .send_fallible(Method::GET, &jobs, &[])
            .await
            .is_none(),
        "the listener closed"
    );
}
