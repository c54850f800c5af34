//! The audit trail through the gateway: one well-formed record per request whatever its outcome,
//! no PII or secret in it, fail-closed when it cannot be written, durable across SIGKILL with
//! `fsync = "always"` and `"batch"`, and the `audit verify` / `audit query` commands on a real trail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use greenhouse_gateway::sandbox::{Sandbox, SandboxOptions};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::{
    AUDIT_FIELDS as FIELDS, Harness, Setup, Stub, TestClient, default_teams, email, raw_exchange,
};

fn audit_path(h: &Harness) -> PathBuf {
    h.dir.path().join("audit/audit.jsonl")
}

fn read_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not one JSON record per line ({e}): {l:.200}"))
        })
        .collect()
}

/// Waits until the trail holds `n` records (responses finish slightly before their record is
/// flushed with the default `batch` mode).
async fn records(h: &Harness, n: usize) -> Vec<Value> {
    for _ in 0..300 {
        let recs = read_records(&audit_path(h));
        if recs.len() >= n {
            return recs;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the audit trail never held {n} records: {:?}",
        read_records(&audit_path(h)).len()
    )
}

fn by_request_id<'a>(recs: &'a [Value], id: &str) -> &'a Value {
    let found: Vec<&Value> = recs.iter().filter(|r| r["request_id"] == id).collect();
    assert_eq!(found.len(), 1, "exactly one record for request {id}");
    found[0]
}

fn tiny_quota_team() -> (&'static str, String) {
    (
        "tiny",
        email(
            r#"name = "tiny"
operations = ["listPartnerJobs"]
[[members]]
iss = "ISSUER"
sub = "svc-tiny"
[on_behalf_of]
default = "sourcing.bot(at)example.com"
[quota]
rate = "1/h"
burst = 1
"#,
        ),
    )
}

#[tokio::test]
async fn every_outcome_produces_exactly_one_record_with_the_right_fields() {
    let stub = Stub::start().await;
    let mut teams = default_teams();
    teams.push(tiny_quota_team());
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        upstream_timeout: "500ms",
        teams,
        extra: "[limits]\nmax_body_bytes = 2048\n".into(),
        ..Setup::default()
    })
    .await;
    let t = h.sourcing_token();
    let auth = format!("Bearer {t}");
    let mut expect: Vec<(String, &str, u16, Option<&str>)> = Vec::new();
    let send =
        async |method: Method, path: &str, headers: Vec<(&str, String)>, body: &'static str| {
            let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let r = h
                .client
                .send(
                    method,
                    &h.url(path),
                    &hs,
                    Bytes::from_static(body.as_bytes()),
                )
                .await;
            (r.headers["x-request-id"].to_str().unwrap().to_string(), r)
        };
    let a = || vec![("authorization", auth.clone())];
    let json_a = || {
        vec![
            ("authorization", auth.clone()),
            ("content-type", "application/json".to_string()),
        ]
    };

    let (id, r) = send(Method::GET, "/v1/partner/jobs", a(), "").await;
    expect.push((id, "forwarded", r.status.as_u16(), None));
    let (id, _) = send(Method::GET, "/v1/partner/jobs", vec![], "").await;
    expect.push((id, "denied", 401, Some("missing_token")));
    let stranger = h.token("svc-stranger", json!({}));
    let (id, _) = send(
        Method::GET,
        "/v1/partner/jobs",
        vec![("authorization", format!("Bearer {stranger}"))],
        "",
    )
    .await;
    expect.push((id, "denied", 403, Some("unknown_team")));
    let (id, _) = send(Method::GET, "/v1/partner/current_user", a(), "").await;
    expect.push((id, "denied", 403, Some("operation_not_allowed")));
    let (id, _) = send(Method::GET, "/v1/partner/nope", a(), "").await;
    expect.push((id, "denied", 404, Some("route_not_found")));
    let (id, _) = send(Method::DELETE, "/v1/partner/jobs", a(), "").await;
    expect.push((id, "denied", 405, Some("method_not_allowed")));
    let (id, _) = send(Method::POST, "/v1/partner/candidates", a(), "{}").await;
    expect.push((id, "denied", 415, Some("unsupported_media_type")));
    let big: &'static str = Box::leak("x".repeat(4096).into_boxed_str());
    let (id, _) = send(Method::POST, "/v1/partner/candidates", json_a(), big).await;
    expect.push((id, "denied", 413, Some("payload_too_large")));
    let (id, _) = send(
        Method::POST,
        "/v1/partner/candidates",
        json_a(),
        "{\"first_name\":1}",
    )
    .await;
    expect.push((id, "denied", 422, Some("validation_failed")));
    let tiny = h.token("svc-tiny", json!({}));
    let _ = send(
        Method::GET,
        "/v1/partner/jobs",
        vec![("authorization", format!("Bearer {tiny}"))],
        "",
    )
    .await;
    let (id, _) = send(
        Method::GET,
        "/v1/partner/jobs",
        vec![("authorization", format!("Bearer {tiny}"))],
        "",
    )
    .await;
    expect.push((id, "denied", 429, Some("rate_limited")));
    stub.set_reply(200, "[]", Duration::from_secs(2));
    let (id, _) = send(Method::GET, "/v1/partner/jobs", a(), "").await;
    expect.push((id, "forwarded", 504, Some("upstream_timeout")));
    stub.set_reply(
        500,
        r#"{"errors":[{"message":"Internal error"}]}"#,
        Duration::ZERO,
    );
    let (id, _) = send(Method::GET, "/v1/partner/jobs", a(), "").await;
    expect.push((id, "forwarded", 500, None));

    let recs = records(&h, 13).await;
    assert_eq!(recs.len(), 13, "one record per request, no more");
    for r in &recs {
        let obj = r.as_object().unwrap();
        for f in FIELDS {
            assert!(obj.contains_key(f), "field {f} missing in {r}");
        }
        assert_eq!(obj.len(), 27, "unexpected fields in {r}");
    }
    for (id, decision, status, code) in expect {
        let r = by_request_id(&recs, &id);
        assert_eq!(r["decision"], decision, "{r}");
        assert_eq!(r["status"], status, "{r}");
        assert_eq!(r["code"].as_str(), code, "{r}");
    }
    // Identity fields come only from a verified token.
    let missing = recs.iter().find(|r| r["code"] == "missing_token").unwrap();
    assert!(
        missing["team"].is_null() && missing["subject"].is_null() && missing["issuer"].is_null()
    );
    let unknown = recs.iter().find(|r| r["code"] == "unknown_team").unwrap();
    assert_eq!(unknown["subject"], "svc-stranger");
    assert!(unknown["team"].is_null());
    let ok = recs.iter().find(|r| r["status"] == 200).unwrap();
    assert_eq!(ok["team"], "sourcing");
    assert_eq!(ok["operation"], "listPartnerJobs");
    assert_eq!(ok["on_behalf_of"], email("sourcing.bot(at)example.com"));
    assert_eq!(ok["credential"], "default");
    assert_eq!(ok["upstream_status"], 200);
    assert_eq!(ok["client_addr"], "127.0.0.1");
    assert_eq!(ok["response_bytes"], 2);
    let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=13).collect::<Vec<u64>>());
}

#[tokio::test]
async fn client_addr_comes_from_x_forwarded_for_only_through_a_trusted_proxy() {
    for (trusted, want) in [(false, "127.0.0.1"), (true, "198.51.100.7")] {
        let stub = Stub::start().await;
        let listen_extra = if trusted {
            "trusted_proxies = [\"127.0.0.1/32\", \"10.0.0.0/8\"]".to_string()
        } else {
            String::new()
        };
        let h = Harness::start_with(Setup {
            upstream: Some(stub.base_url()),
            listen_extra,
            ..Setup::default()
        })
        .await;
        let auth = format!("Bearer {}", h.sourcing_token());
        // The client claims 203.0.113.1; a trusted 10.x proxy saw 198.51.100.7.
        let xff = "203.0.113.1, 198.51.100.7, 10.1.2.3";
        let r = h
            .client
            .send(
                Method::GET,
                &h.url("/v1/partner/jobs"),
                &[("authorization", &auth), ("x-forwarded-for", xff)],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK);
        let recs = records(&h, 1).await;
        assert_eq!(recs[0]["client_addr"], want, "trusted={trusted}");
        // The upstream gets the gateway's own X-Forwarded-For, never the caller's.
        assert_eq!(
            stub.seen()[0].headers["x-forwarded-for"],
            want,
            "trusted={trusted}"
        );
    }
}

#[tokio::test]
async fn hostile_paths_user_agents_and_header_values_still_give_one_well_formed_line_each() {
    let (h, _stub) = {
        let stub = Stub::start().await;
        (
            Harness::start_with(Setup {
                upstream: Some(stub.base_url()),
                ..Setup::default()
            })
            .await,
            stub,
        )
    };
    let t = h.sourcing_token();
    let long = "A".repeat(10 * 1024);
    // Bytes hyper itself refuses (raw quotes, DEL, bare CR) never become requests; these are the
    // hostile ones that do.
    let requests = vec![
        format!("GET /v1/partner/jobs%0d%0a%22%7D%7B%22seq%22:1%5C HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nUser-Agent: evil\tOBS agent\r\n\r\n").replace("OBS", "\u{ff}"),
        format!("GET /v1/partner/{long} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n"),
        format!("GET /v1/partner/jobs?x=%22%7D%7B%5C%0A HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nOn-Behalf-Of: q\t{{}}\r\n\r\n"),
        "GET /v1/partner/{evil}|%00%01%1b[31m HTTP/1.1\r\nHost: x\r\nUser-Agent: \t\t\r\n\r\n".to_string(),
    ];
    for req in &requests {
        let out = raw_exchange(h.gateway.addr, req.as_bytes(), Duration::from_secs(3)).await;
        assert!(out.starts_with("HTTP/1.1 4"), "{out:.200}");
    }
    let recs = records(&h, requests.len()).await;
    assert_eq!(recs.len(), requests.len());
    let text = std::fs::read_to_string(audit_path(&h)).unwrap();
    assert_eq!(
        text.lines().count(),
        requests.len(),
        "a record spans more than one line"
    );
    for r in &recs {
        let path = r["path"].as_str().unwrap();
        assert!(path.len() <= 512, "path not truncated: {}", path.len());
        assert!(
            !path
                .chars()
                .any(|c| c.is_control() || c == '"' || c == '\\'),
            "{path}"
        );
    }
    let verify = Command::new(support::binary())
        .args(["audit", "verify"])
        .arg(audit_path(&h))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[tokio::test]
async fn the_trail_holds_no_candidate_pii_and_no_token() {
    let h = Harness::start().await;
    let t = h.sourcing_token();
    let pii = json!({
        "external_id": "ext-pii-1",
        "first_name": "Zephyrine-PII",
        "last_name": "Quixotica-PII",
        "company": "Company-PII",
        "title": "Title-PII",
        "emails": [{"value": email("zephyrine.pii(at)example.com"), "type": "personal"}],
        "phone_numbers": [{"value": "+1-555-0100-PII", "type": "mobile"}],
        "social_media_addresses": [{"value": "https://social.example/zephyrine-PII"}],
        "attachments": [
            {"filename": "resume-PII.pdf", "type": "resume", "content": "UElJLWNvbnRlbnQ=", "content_type": "application/pdf"},
            {"filename": "cover-PII.pdf", "type": "cover_letter", "url": "https://files.example/cover-PII.pdf"}
        ]
    });
    let r = h.post_json("/v1/partner/candidates", &t, &pii).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let r = h
        .get("/v1/partner/candidates?external_ids=ext-pii-1", &t)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.text().contains("Zephyrine-PII"),
        "the sandbox returned the candidate"
    );
    // Refusals carry PII too.
    let mut bad = pii.clone();
    bad["first_name"] = json!(42);
    let r = h.post_json("/v1/partner/candidates", &t, &bad).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let recs = records(&h, 3).await;
    let text = std::fs::read_to_string(audit_path(&h)).unwrap();
    for canary in [
        "PII",
        "zephyrine",
        "555-0100",
        "UElJLWNvbnRlbnQ",
        "files.example",
        "social.example",
        &t,
        t.rsplit('.').next().unwrap(),
        "dev-client-secret",
        "dev-partner-key",
    ] {
        assert!(!text.contains(canary), "the audit trail holds {canary:?}");
    }
    // What it does hold: who, for whom, which candidate.
    assert_eq!(recs[0]["external_ids"], json!(["ext-pii-1"]));
    assert!(recs[0]["body_sha256"].as_str().unwrap().len() == 64);
    assert!(
        recs[1]["candidate_ids"]
            .as_array()
            .is_some_and(|a| a.len() == 1),
        "{}",
        recs[1]
    );
    assert_eq!(
        recs[0]["on_behalf_of"],
        email("sourcing.bot(at)example.com")
    );
}

#[tokio::test]
async fn unwritable_trail_with_reject_gives_503_and_no_upstream_call() {
    let stub = Stub::start().await;
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        extra: "[audit]\npath = \"/dev/full\"\non_error = \"reject\"\nrotate_bytes = 0\n".into(),
        ..Setup::default()
    })
    .await;
    let t = h.sourcing_token();
    // The first failed write marks the trail unhealthy (that request was forwarded: its answer
    // ends broken, or never arrives, rather than as a success) ...
    let _ = TestClient::new()
        .send_fallible(
            Method::GET,
            &h.url("/v1/partner/jobs"),
            &[("authorization", &format!("Bearer {t}"))],
        )
        .await;
    for _ in 0..100 {
        let ready = TestClient::new()
            .send(Method::GET, &h.admin_url("/readyz"), &[], Bytes::new())
            .await;
        if ready.status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(ready.text().contains("audit"), "{}", ready.text());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = stub.seen().len();
    // ... and from then on nothing is forwarded.
    for _ in 0..3 {
        let r = h.get("/v1/partner/jobs", &t).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable")
        );
    }
    assert_eq!(
        stub.seen().len(),
        before,
        "a request was forwarded without an audit record"
    );
    let m = TestClient::new()
        .send(Method::GET, &h.admin_url("/metrics"), &[], Bytes::new())
        .await
        .text();
    assert!(!m.contains("gateway_audit_errors_total 0"), "{m}");
}

#[tokio::test]
async fn unwritable_trail_with_continue_forwards_and_counts_errors() {
    let stub = Stub::start().await;
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        extra: "[audit]\npath = \"/dev/full\"\non_error = \"continue\"\nrotate_bytes = 0\n".into(),
        ..Setup::default()
    })
    .await;
    let t = h.sourcing_token();
    for _ in 0..3 {
        assert_eq!(h.get("/v1/partner/jobs", &t).await.status, StatusCode::OK);
    }
    assert_eq!(stub.seen().len(), 3);
    let mut m = String::new();
    for _ in 0..100 {
        m = TestClient::new()
            .send(Method::GET, &h.admin_url("/metrics"), &[], Bytes::new())
            .await
            .text();
        if m.contains("gateway_audit_errors_total 3") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(m.contains("gateway_audit_errors_total 3"), "{m}");
}

#[tokio::test]
async fn audit_query_filters_a_real_trail_and_verify_catches_an_edit() {
    let h = Harness::start().await;
    let sourcing = h.sourcing_token();
    let agency = h.token("svc-agency-connector", json!({}));
    assert_eq!(
        h.get("/v1/partner/jobs", &sourcing).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.get("/v1/partner/jobs", &agency).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.get("/v1/partner/current_user", &agency).await.status,
        StatusCode::FORBIDDEN
    );
    let _ = records(&h, 3).await;
    let run = |args: &[&str]| {
        let out = Command::new(support::binary())
            .args(["audit", "query"])
            .args(args)
            .arg(audit_path(&h))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run(&["--team", "agency"]).lines().count(), 2);
    assert_eq!(
        run(&["--team", "agency", "--decision", "denied"])
            .lines()
            .count(),
        1
    );
    assert_eq!(
        run(&["--code", "operation_not_allowed", "--status", "403"])
            .lines()
            .count(),
        1
    );
    assert_eq!(run(&["--operation", "listPartnerJobs"]).lines().count(), 2);
    assert_eq!(
        run(&[
            "--since",
            "2000-01-01T00:00:00Z",
            "--until",
            "2000-01-02T00:00:00Z"
        ])
        .lines()
        .count(),
        0
    );
    let table = run(&["--format", "table"]);
    assert!(
        table.lines().next().unwrap().contains("team") && table.lines().count() == 4,
        "{table}"
    );

    let ok = Command::new(support::binary())
        .args(["audit", "verify"])
        .arg(audit_path(&h))
        .output()
        .unwrap();
    assert!(ok.status.success());
    let text = std::fs::read_to_string(audit_path(&h)).unwrap();
    std::fs::write(
        audit_path(&h),
        text.replacen("\"team\":\"agency\"", "\"team\":\"sourcing\"", 1),
    )
    .unwrap();
    let bad = Command::new(support::binary())
        .args(["audit", "verify"])
        .arg(audit_path(&h))
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&bad.stdout)
    );
    assert!(
        String::from_utf8_lossy(&bad.stdout).contains("seq 2"),
        "{}",
        String::from_utf8_lossy(&bad.stdout)
    );
}

#[tokio::test]
async fn sigkill_under_load_with_fsync_always_leaves_a_verifiable_trail_with_every_answered_request()
 {
    sigkill_under_load_leaves_every_answered_request_recorded("always").await;
}

/// With `batch` most records are appended by the request's own thread (no hand-off): an answer
/// still never goes out before its record's `write(2)`, so a killed process has lost none.
#[tokio::test]
async fn sigkill_under_load_with_fsync_batch_leaves_a_verifiable_trail_with_every_answered_request()
{
    sigkill_under_load_leaves_every_answered_request_recorded("batch").await;
}

async fn sigkill_under_load_leaves_every_answered_request_recorded(fsync: &str) {
    let stub = Stub::start().await;
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        upstream: Some(stub.base_url()),
        extra: format!(
            "[audit]\nfsync = \"{fsync}\"\nhmac_key = {{ value = \"test-audit-key-0123456789\" }}\n"
        ),
        ..Setup::default()
    };
    support::write_config(dir.path(), &sandbox, &setup);
    let mut served = support::spawn_serve(&dir.path().join("gateway.toml"));
    let addr = served.addr.clone();
    let token = sandbox.mint_token(
        json!({"sub": "svc-sourcing-bot", "aud": support::AUDIENCE}),
        Duration::from_secs(60),
    );
    // Load from 8 workers; every answer's request id is remembered.
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (answered, stop, token, url) = (
            answered.clone(),
            stop.clone(),
            token.clone(),
            format!("http://{addr}/v1/partner/jobs"),
        );
        workers.push(tokio::spawn(async move {
            let client = TestClient::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 400 {
                n += 1;
                let req = client
                    .send_fallible(
                        Method::GET,
                        &url,
                        &[("authorization", &format!("Bearer {token}"))],
                    )
                    .await;
                match req {
                    Some(r) if r.status == StatusCode::OK => {
                        answered
                            .lock()
                            .unwrap()
                            .push(r.headers["x-request-id"].to_str().unwrap().to_string());
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }));
    }
    // Kill once a good number of requests were answered.
    for _ in 0..500 {
        if answered.lock().unwrap().len() >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let killed = Command::new("kill")
        .args(["-KILL", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let _ = served.child.wait();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let answered: HashSet<String> = answered.lock().unwrap().iter().cloned().collect();
    assert!(
        answered.len() >= 50,
        "too little load before the kill: {}",
        answered.len()
    );

    let path = dir.path().join("audit/audit.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let ids: HashSet<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|r| r["request_id"].as_str().map(str::to_string))
        .collect();
    let missing: Vec<&String> = answered.iter().filter(|id| !ids.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} answered requests have no record, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    // The chain verifies with the key (a torn last line is reported as such, not as tampering)
    // and not without it.
    std::fs::write(dir.path().join("verify.toml"), "").unwrap();
    let with_key = Command::new(support::binary())
        .args(["audit", "verify", "--config"])
        .arg(dir.path().join("gateway.toml"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        with_key.status.success(),
        "{}{}",
        String::from_utf8_lossy(&with_key.stdout),
        String::from_utf8_lossy(&with_key.stderr)
    );
    let without = Command::new(support::binary())
        .args(["audit", "verify"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        without.status.code(),
        Some(1),
        "a keyed chain must not verify without its key"
    );
}

/// Waits until a trail file holds `n` records.
async fn records_in(path: &Path, n: usize) -> Vec<Value> {
    for _ in 0..300 {
        let recs = read_records(path);
        if recs.len() >= n {
            return recs;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the audit trail never held {n} records")
}

#[tokio::test]
async fn tokens_emails_and_phones_in_urls_reach_neither_the_trail_nor_the_log() {
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    support::write_config(dir.path(), &sandbox, &Setup::default());
    let served =
        support::spawn_serve_with_env(&dir.path().join("gateway.toml"), &[("RUST_LOG", "debug")]);
    let client = TestClient::new();
    let base = format!("http://{}", served.addr);
    let token = sandbox.mint_token(
        json!({"sub": "svc-sourcing-bot", "aud": support::AUDIENCE}),
        Duration::from_secs(600),
    );
    let auth = format!("Bearer {token}");
    let signature = token.rsplit('.').next().unwrap().to_string();
    let url_email = email("canary.person(at)example.com");
    let encoded_email = url_email.replace('@', "%40");
    let cases: Vec<(String, bool, u16)> = vec![
        // A token in the query, refused before routing.
        (format!("/v1/partner/jobs?access_token={token}"), false, 401),
        // A token as a path segment.
        (format!("/v1/partner/{token}"), true, 404),
        // PII in undeclared query parameters (enforce mode refuses them).
        (
            format!("/v1/partner/candidates?email={encoded_email}&phone=%2B1-555-0199"),
            true,
            400,
        ),
        // PII as a path segment.
        (format!("/v1/partner/candidates/{url_email}"), true, 404),
        // A lookup by external id and Greenhouse id: those are recorded, in their own fields.
        (
            "/v1/partner/candidates?external_ids=ext-canary-1,ext-canary-2&candidate_ids=77"
                .to_string(),
            true,
            200,
        ),
    ];
    for (path, with_token, want) in &cases {
        let headers: Vec<(&str, &str)> = if *with_token {
            vec![("authorization", auth.as_str())]
        } else {
            vec![]
        };
        let r = client
            .send(
                Method::GET,
                &format!("{base}{path}"),
                &headers,
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status.as_u16(), *want, "{path}: {}", r.text());
    }
    let trail = dir.path().join("audit/audit.jsonl");
    let recs = records_in(&trail, cases.len()).await;
    let paths: Vec<&str> = recs.iter().map(|r| r["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "/v1/partner/jobs?*",
            "/v1/partner/*",
            "/v1/partner/candidates?*&*",
            "/v1/partner/candidates/*",
            "/v1/partner/candidates?external_ids&candidate_ids",
        ]
    );
    let lookup = &recs[4];
    assert_eq!(
        lookup["external_ids"],
        json!(["ext-canary-1", "ext-canary-2"])
    );
    assert_eq!(lookup["candidate_ids"], json!([77]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(&trail).unwrap();
    let log = served.log_text();
    assert!(log.contains("gateway listening"), "the log was captured");
    for canary in [
        signature.as_str(),
        token.as_str(),
        "canary.person",
        "canary.person%40",
        "555-0199",
        "access_token",
    ] {
        assert!(!text.contains(canary), "the audit trail holds {canary:?}");
        assert!(!log.contains(canary), "the log holds {canary:?}");
    }
    // `audit query --external-id` finds the lookup.
    let out = Command::new(support::binary())
        .args(["audit", "query", "--external-id", "ext-canary-2"])
        .arg(&trail)
        .output()
        .unwrap();
    let found: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(found.len(), 1, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(found[0]["operation"], "listPartnerCandidates");
}

/// The value of one metric sample on the admin listener (0 when absent).
async fn metric(h: &Harness, line_prefix: &str) -> f64 {
    let r = h
        .client
        .send(Method::GET, &h.admin_url("/metrics"), &[], Bytes::new())
        .await;
    r.text()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn create_through(
    h: &Harness,
    accept_encoding: Option<&str>,
    external_id: &str,
) -> (u16, Value, http::HeaderMap) {
    let auth = format!("Bearer {}", h.sourcing_token());
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    if let Some(ae) = accept_encoding {
        headers.push(("accept-encoding", ae));
    }
    let body = json!({"external_id": external_id, "first_name": "A", "last_name": "B"});
    let r = h
        .client
        .send(
            Method::POST,
            &h.url("/v1/partner/candidates"),
            &headers,
            Bytes::from(body.to_string()),
        )
        .await;
    (r.status.as_u16(), r.json(), r.headers)
}

#[tokio::test]
async fn a_create_answered_with_200_records_its_candidate_id_and_counts_as_drift() {
    let h = Harness::start_with(Setup {
        sandbox: SandboxOptions {
            rate_limit: 0,
            create_status: StatusCode::OK,
            ..SandboxOptions::default()
        },
        ..Setup::default()
    })
    .await;
    let drift = r#"gateway_spec_drift_total{operation="createPartnerCandidate"}"#;
    let (status, body, _) = create_through(&h, None, "ext-200-1").await;
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_i64().unwrap();
    let recs = records(&h, 1).await;
    assert_eq!(recs[0]["candidate_ids"], json!([id]));
    assert_eq!(recs[0]["upstream_status"], 200);
    assert_eq!(metric(&h, drift).await, 1.0, "an undocumented 2xx is drift");
}

#[tokio::test]
async fn compressed_upstream_answers_are_read_decoded_and_forwarded_as_encoded() {
    let h = Harness::start_with(Setup {
        sandbox: SandboxOptions {
            rate_limit: 0,
            compress: true,
            ..SandboxOptions::default()
        },
        ..Setup::default()
    })
    .await;
    let drift = r#"gateway_spec_drift_total{operation="createPartnerCandidate"}"#;
    // What Node's fetch and Python requests send by default, then brotli alone, then a coding
    // the gateway cannot decode beside one it can.
    let mut ids = Vec::new();
    for (i, (ae, want)) in [
        ("gzip, deflate, br", "gzip"),
        ("br", "br"),
        ("zstd, gzip;q=0.5", "gzip"),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, _, headers) = create_through(&h, Some(ae), &format!("ext-gz-{i}")).await;
        assert_eq!(status, 201);
        assert_eq!(
            headers["content-encoding"], want,
            "forwarded as Greenhouse encoded it"
        );
        let recs = records(&h, i + 1).await;
        let got = recs[i]["candidate_ids"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(got.len(), 1, "{ae}: {}", recs[i]);
        ids.push(got[0].as_i64().unwrap());
    }
    assert_eq!(
        metric(&h, drift).await,
        0.0,
        "decoded answers match the spec"
    );
    let sent: Vec<String> = h
        .sandbox
        .received()
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.header("accept-encoding").unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        sent,
        ["gzip, deflate, br", "br", "gzip;q=0.5"],
        "only decodable codings are asked for"
    );
    // The candidates really exist under those ids (decoded by the test, independently).
    let lookup = format!(
        "/v1/partner/candidates?candidate_ids={}",
        ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
    );
    let r = h.get(&lookup, &h.sourcing_token()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json().as_array().map(Vec::len), Some(3), "{}", r.text());
}

/// A tmpfs mounted for one test, unmounted when dropped (also when the test fails).
struct TinyDisk {
    dir: tempfile::TempDir,
}

impl TinyDisk {
    /// `None` (after saying why) where mounting is not permitted.
    fn mount(size: &str) -> Option<TinyDisk> {
        let dir = tempfile::tempdir().expect("temp dir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs here (this test needs root)");
            return None;
        }
        Some(TinyDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the disk says it is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join("filler")).expect("filler");
        let chunk = vec![b'x'; 4096];
        loop {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        // The last partial page, if any.
        while f.write(&chunk[..1]).is_ok_and(|n| n == 1) {}
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        // Lazy: the gateway's writer may still hold the file open for a moment.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test]
async fn full_audit_disk_refuses_new_requests_with_503_and_every_forwarded_request_has_its_record()
{
    let Some(disk) = TinyDisk::mount("256k") else {
        return;
    };
    let trail = disk.path().join("audit.jsonl");
    let stub = Stub::start().await;
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        extra: format!(
            "[audit]\npath = \"{}\"\nfsync = \"always\"\non_error = \"reject\"\nrotate_bytes = 0\nreserve_bytes = 65536\n",
            trail.display()
        ),
        ..Setup::default()
    })
    .await;
    let t = h.sourcing_token();
    assert_eq!(h.get("/v1/partner/jobs", &t).await.status, StatusCode::OK);
    disk.fill();

    let auth = format!("Bearer {t}");
    let url = h.url("/v1/partner/jobs");
    let send = || {
        let (client, url, auth) = (TestClient::new(), url.clone(), auth.clone());
        async move {
            client
                .send_fallible(Method::GET, &url, &[("authorization", &auth)])
                .await
        }
    };
    let mut replies = Vec::new();
    // A burst first (requests in flight together), then one at a time until refused.
    let burst: Vec<_> = (0..8).map(|_| tokio::spawn(send())).collect();
    for b in burst {
        replies.push(b.await.expect("request task"));
    }
    let mut refused = 0;
    for _ in 0..400 {
        let r = send().await;
        if r.as_ref()
            .is_some_and(|r| r.status == StatusCode::SERVICE_UNAVAILABLE)
        {
            refused += 1;
        }
        replies.push(r);
        if refused >= 5 {
            break;
        }
    }
    assert!(refused >= 5, "the full disk never led to 503s");

    // Complete records only: a write cut short by the full disk is not a record.
    let recs: Vec<Value> = std::fs::read_to_string(&trail)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let recorded: HashSet<&str> = recs
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    for r in replies.iter().flatten() {
        match r.status {
            StatusCode::OK => {
                let id = r.headers["x-request-id"].to_str().expect("request id");
                assert!(recorded.contains(id), "a 200 without its record: {id}");
            }
            StatusCode::SERVICE_UNAVAILABLE => assert_eq!(r.code(), "audit_unavailable"),
            other => panic!("unexpected answer {other}: {}", r.text()),
        }
    }
    let forwarded = recs.iter().filter(|r| r["decision"] == "forwarded").count();
    assert_eq!(
        stub.seen().len(),
        forwarded,
        "the upstream saw requests that have no record"
    );
    drop(h);
}

/// A FIFO as the audit file whose pipe buffer is filled by the test: the gateway's writer then
/// blocks in write(2) until the test reads.
struct StalledTrail {
    path: PathBuf,
    reader: std::fs::File,
    _dir: tempfile::TempDir,
}

impl StalledTrail {
    fn new() -> StalledTrail {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.fifo");
        assert!(
            Command::new("mkfifo")
                .arg(&path)
                .status()
                .is_ok_and(|s| s.success())
        );
        let reader = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
                .open(&path)
                .expect("open the fifo for reading")
        };
        StalledTrail {
            path,
            reader,
            _dir: dir,
        }
    }

    /// Fills the pipe buffer with newlines (empty lines, skipped when reading records).
    fn stall(&self) {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(&self.path)
            .expect("open the fifo for writing");
        let chunk = vec![b'\n'; 4096];
        while w.write(&chunk).is_ok_and(|n| n > 0) {}
        while w.write(b"\n").is_ok_and(|n| n > 0) {}
    }

    /// Everything the pipe holds now.
    fn drain(&mut self) -> String {
        use std::io::Read;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = self.reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[tokio::test]
async fn empty_upstream_answer_is_not_delivered_before_its_record_is_written() {
    let mut trail = StalledTrail::new();
    let stub = Stub::start().await;
    stub.set_reply(204, "", Duration::ZERO);
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        extra: format!(
            // `batch`: a pipe cannot be fsynced; the record is acknowledged after its write(2).
            "[audit]\npath = \"{}\"\nfsync = \"batch\"\non_error = \"reject\"\nrotate_bytes = 0\n",
            trail.path.display()
        ),
        ..Setup::default()
    })
    .await;
    let t = h.sourcing_token();
    let _ = trail.drain();
    trail.stall();
    let auth = format!("Bearer {t}");
    let url = h.url("/v1/partner/jobs");
    let call = tokio::spawn(async move {
        TestClient::new()
            .send(
                Method::GET,
                &url,
                &[("authorization", &auth), ("x-request-id", "empty-answer-1")],
                Bytes::new(),
            )
            .await
    });
    // The upstream has answered; the record cannot be written while the pipe is full.
    for _ in 0..500 {
        if !stub.seen().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        stub.seen().len(),
        1,
        "the request never reached the upstream"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !call.is_finished(),
        "the empty answer was delivered while its record was still unwritten"
    );
    let mut text = String::new();
    for _ in 0..500 {
        text.push_str(&trail.drain());
        if text.contains("empty-answer-1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        text.contains("\"request_id\":\"empty-answer-1\""),
        "no record written"
    );
    let r = call.await.expect("request task");
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn forwarded_answer_whose_record_fails_with_reject_never_completes_as_a_success() {
    let trail = StalledTrail::new();
    let stub = Stub::start().await;
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        extra: format!(
            // `batch`: a pipe cannot be fsynced; the record is acknowledged after its write(2).
            "[audit]\npath = \"{}\"\nfsync = \"batch\"\non_error = \"reject\"\nrotate_bytes = 0\n",
            trail.path.display()
        ),
        ..Setup::default()
    })
    .await;
    let t = h.sourcing_token();
    // Nobody reads any more: the writer's next write(2) fails (EPIPE).
    drop(trail);
    let auth = format!("Bearer {t}");
    let url = h.url("/v1/partner/jobs");
    for (status, body) in [(200, "[{\"id\": 1}]"), (200, "")] {
        stub.set_reply(status, body, Duration::ZERO);
        let r = TestClient::new()
            .send_fallible(Method::GET, &url, &[("authorization", &auth)])
            .await;
        if let Some(r) = r {
            assert_ne!(
                r.status,
                StatusCode::OK,
                "a forwarded answer completed as a success without its record ({body:?})"
            );
            assert_eq!(r.code(), "audit_unavailable", "{}", r.text());
        }
    }
}
