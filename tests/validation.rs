//! Validation through the gateway: what reaches Greenhouse is exactly what was validated, what
//! does not match the spec is refused with pointers and never echoed, report mode forwards and
//! records, and drifting upstream responses are counted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Harness, Setup, Stub, TestClient, default_teams, email};

const CANARY: &str = "CANARY-91be";

async fn with_stub(extra_team: Option<(&'static str, String)>) -> (Harness, Stub) {
    let stub = Stub::start().await;
    let mut teams = default_teams();
    if let Some(t) = extra_team {
        teams.push(t);
    }
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        teams,
        ..Setup::default()
    })
    .await;
    (h, stub)
}

fn report_team() -> (&'static str, String) {
    (
        "lenient",
        email(
            r#"name = "lenient"
operations = ["createPartnerCandidate", "listPartnerCandidates", "listPartnerJobs"]
[[members]]
iss = "ISSUER"
sub = "svc-lenient"
[on_behalf_of]
default = "sourcing.bot(at)example.com"
[validation]
mode = "report"
"#,
        ),
    )
}

async fn post_raw(
    h: &Harness,
    path: &str,
    token: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> support::Reply {
    let auth = format!("Bearer {token}");
    let mut headers = vec![("authorization", auth.as_str())];
    if let Some(ct) = content_type {
        headers.push(("content-type", ct));
    }
    h.client
        .send(
            Method::POST,
            &h.url(path),
            &headers,
            Bytes::copy_from_slice(body),
        )
        .await
}

async fn metrics(h: &Harness) -> String {
    TestClient::new()
        .send(Method::GET, &h.admin_url("/metrics"), &[], Bytes::new())
        .await
        .text()
}

/// Waits until the audit file holds `n` records and returns them.
async fn audit_records(h: &Harness, n: usize) -> Vec<Value> {
    let path = h.dir.path().join("audit/audit.jsonl");
    for _ in 0..200 {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let recs: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if recs.len() >= n {
            return recs;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the audit file never held {n} records")
}

fn linker_team() -> (&'static str, String) {
    (
        "linker",
        email(
            r#"name = "linker"
operations = ["createTrackingLink", "getCurrentPartnerUser"]
[[members]]
iss = "ISSUER"
sub = "svc-linker"
[on_behalf_of]
default = "sourcing.bot(at)example.com"
"#,
        ),
    )
}

#[tokio::test]
async fn tracking_link_and_current_user_requests_pass_and_invalid_ones_are_refused() {
    let (h, stub) = with_stub(Some(linker_team())).await;
    let t = h.token("svc-linker", json!({}));
    let body = br#"{"job_id": 7001, "source_id": 12,  "external_id": "campaign-7"}"#;
    stub.set_reply(
        201,
        r#"{"url":"https://grnh.se/abc","expires_at":"2026-12-01T00:00:00Z"}"#,
        Duration::ZERO,
    );
    let r = post_raw(
        &h,
        "/v1/partner/tracking_link",
        &t,
        Some("application/json"),
        body,
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(&stub.seen()[0].body[..], &body[..]);
    let bad = post_raw(
        &h,
        "/v1/partner/tracking_link",
        &t,
        Some("application/json"),
        br#"{"job_id": "seven"}"#,
    )
    .await;
    assert_eq!(bad.code(), "validation_failed");
    assert_eq!(bad.json()["errors"][0]["pointer"], "/job_id");
    stub.set_reply(
        200,
        r#"{"id":1,"name":"Bot","email":"bot@example.com"}"#,
        Duration::ZERO,
    );
    assert_eq!(
        h.get("/v1/partner/current_user", &t).await.status,
        StatusCode::OK
    );
    let with_body = post_raw(
        &h,
        "/v1/partner/current_user",
        &t,
        Some("application/json"),
        b"{}",
    )
    .await;
    assert_eq!(with_body.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(stub.seen().len(), 2);
}

#[tokio::test]
async fn valid_bodies_reach_the_upstream_byte_identical() {
    let (h, stub) = with_stub(None).await;
    let t = h.sourcing_token();
    // Unusual but valid spacing and key order: the gateway must not re-serialize.
    let body = format!(
        "{{ \"last_name\" : \"Example\",\n \"first_name\":\"Ada\", \"external_id\":\"ext-1\", \"emails\":[{{\"value\":\"{}\",\"type\":\"work\"}}],\n \"attachments\":[{{\"filename\":\"cv.pdf\",\"type\":\"resume\",\"content\":\"aGVsbG8=\",\"content_type\":\"application/pdf\"}}] }}",
        email("ada(at)example.com")
    );
    stub.set_reply(201, "{}", Duration::ZERO);
    let r = post_raw(
        &h,
        "/v1/partner/candidates",
        &t,
        Some("application/json"),
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    let seen = stub.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].body[..], body.as_bytes());
    // Every GET of the team is forwarded without a body.
    stub.set_reply(200, "[]", Duration::ZERO);
    for path in [
        "/v1/partner/jobs",
        "/v1/partner/prospect_pools",
        "/v1/partner/candidates?candidate_ids=1,2",
    ] {
        assert_eq!(h.get(path, &t).await.status, StatusCode::OK, "{path}");
    }
    assert_eq!(stub.seen().len(), 4);
}

#[tokio::test]
async fn invalid_bodies_are_422_with_exact_pointers_no_echo_and_no_upstream_call() {
    let (h, stub) = with_stub(None).await;
    let t = h.sourcing_token();
    type Case = (&'static str, Value, Vec<(&'static str, &'static str)>);
    let cases: Vec<Case> = vec![
        (
            "missing required fields",
            json!({"company": CANARY}),
            vec![
                ("/external_id", "required"),
                ("/first_name", "required"),
                ("/last_name", "required"),
            ],
        ),
        (
            "wrong type",
            json!({"external_id": 5, "first_name": CANARY, "last_name": "x"}),
            vec![("/external_id", "type")],
        ),
        (
            "bad email",
            json!({"external_id": "e", "first_name": "a", "last_name": "b", "emails": [{"value": CANARY}]}),
            vec![("/emails/0/value", "format")],
        ),
        (
            "array where an object belongs",
            json!({"external_id": "e", "first_name": "a", "last_name": "b", "application": [CANARY]}),
            vec![("/application", "type")],
        ),
        (
            "attachment with both content and url, bad type",
            json!({"external_id": "e", "first_name": "a", "last_name": "b",
                   "attachments": [{"type": CANARY, "content": "aGk=", "url": "https://x.example/cv"}]}),
            vec![("/attachments/0", "oneOf"), ("/attachments/0/type", "enum")],
        ),
        (
            "attachment url over http and bad base64",
            json!({"external_id": "e", "first_name": "a", "last_name": "b",
                   "attachments": [{"type": "resume", "url": format!("http://{CANARY}.example/cv")}, {"type": "resume", "content": format!("{CANARY}!!")}]}),
            vec![
                ("/attachments/0/url", "format"),
                ("/attachments/1/content", "contentEncoding"),
            ],
        ),
    ];
    for (name, body, want) in cases {
        let r = post_raw(
            &h,
            "/v1/partner/candidates",
            &t,
            Some("application/json"),
            body.to_string().as_bytes(),
        )
        .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed"),
            "{name}: {}",
            r.text()
        );
        let got: Vec<(String, String)> = r.json()["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["pointer"].as_str().unwrap().to_string(),
                    e["keyword"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        for (pointer, keyword) in want {
            assert!(
                got.contains(&(pointer.to_string(), keyword.to_string())),
                "{name}: missing {pointer} {keyword} in {got:?}"
            );
        }
        assert!(
            !r.text().contains("CANARY"),
            "{name}: the error echoes a submitted value: {}",
            r.text()
        );
    }
    assert!(
        stub.seen().is_empty(),
        "an invalid body reached the upstream"
    );
}

#[tokio::test]
async fn media_types_malformed_json_deep_nesting_duplicate_keys_and_huge_numbers_are_refused() {
    let (h, stub) = with_stub(None).await;
    let t = h.sourcing_token();
    let valid = br#"{"external_id":"e","first_name":"a","last_name":"b"}"#;
    for ct in [
        None,
        Some("text/plain"),
        Some("application/json; charset=latin1"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let r = post_raw(&h, "/v1/partner/candidates", &t, ct, valid).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            "{ct:?}"
        );
    }
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", br#"{"external_id":"e","#.to_vec()),
        ("invalid utf-8", b"{\"external_id\":\"\xff\xfe\"}".to_vec()),
        ("duplicate key", br#"{"external_id":"e","external_id":"f","first_name":"a","last_name":"b"}"#.to_vec()),
        ("nested duplicate key", br#"{"external_id":"e","first_name":"a","last_name":"b","application":{"job_id":1,"job_id":2}}"#.to_vec()),
        ("deep nesting", deep.into_bytes()),
        ("integer over i64", br#"{"external_id":"e","first_name":"a","last_name":"b","application":{"job_id":9223372036854775808}}"#.to_vec()),
        ("non-finite number", br#"{"external_id":"e","first_name":"a","last_name":"b","application":{"job_id":1e400}}"#.to_vec()),
    ];
    for (name, body) in bad {
        let r = post_raw(
            &h,
            "/v1/partner/candidates",
            &t,
            Some("application/json"),
            &body,
        )
        .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::BAD_REQUEST, "invalid_json"),
            "{name}: {}",
            r.text()
        );
    }
    let ok = post_raw(
        &h,
        "/v1/partner/candidates",
        &t,
        Some("application/json; charset=UTF-8"),
        valid,
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        stub.seen().len(),
        1,
        "only the valid request reached the upstream"
    );
}

#[tokio::test]
async fn query_values_are_checked_by_style() {
    let (h, stub) = with_stub(None).await;
    let t = h.sourcing_token();
    let r = h.get("/v1/partner/candidates?candidate_ids=1,x", &t).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed")
    );
    assert_eq!(r.json()["errors"][0]["pointer"], "/query/candidate_ids/1");
    let r = h
        .get("/v1/partner/candidates?candidate_ids=1&candidate_ids=2", &t)
        .await;
    assert_eq!(
        r.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "a repeated non-exploded parameter"
    );
    assert!(stub.seen().is_empty());
    assert_eq!(
        h.get(
            "/v1/partner/candidates?candidate_ids=1%2C2&external_ids=a,b",
            &t
        )
        .await
        .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn report_mode_forwards_violations_counts_them_and_records_pointers_only() {
    let (h, stub) = with_stub(Some(report_team())).await;
    let t = h.token("svc-lenient", json!({}));
    let body =
        json!({"external_id": "ext-report", "first_name": CANARY, "emails": [{"value": CANARY}]});
    let r = post_raw(
        &h,
        "/v1/partner/candidates",
        &t,
        Some("application/json"),
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "report mode forwards: {}",
        r.text()
    );
    // Undeclared query parameters are dropped, not forwarded, and recorded.
    let r = h
        .get("/v1/partner/candidates?candidate_ids=7&debug=1", &t)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = stub.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].uri, "/v1/partner/candidates?candidate_ids=7");
    // Malformed JSON is still refused: Greenhouse could do nothing with it.
    let r = post_raw(
        &h,
        "/v1/partner/candidates",
        &t,
        Some("application/json"),
        b"{",
    )
    .await;
    assert_eq!(r.code(), "invalid_json");
    let m = metrics(&h).await;
    assert!(m.contains(r#"gateway_validation_failures_total{team="lenient",operation="createPartnerCandidate",mode="report"} 1"#), "{m}");
    let recs = audit_records(&h, 3).await;
    let v = &recs[0]["validation"];
    let pointers: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pointer"].as_str().unwrap())
        .collect();
    assert!(
        pointers.contains(&"/last_name") && pointers.contains(&"/emails/0/value"),
        "{v}"
    );
    assert!(
        recs[1]["validation"].to_string().contains("/query/debug"),
        "{}",
        recs[1]
    );
    let text = std::fs::read_to_string(h.dir.path().join("audit/audit.jsonl")).unwrap();
    assert!(
        !text.contains("CANARY"),
        "the audit trail holds a submitted value"
    );
}

#[tokio::test]
async fn drifting_upstream_response_is_counted_but_never_blocks() {
    let (h, stub) = with_stub(None).await;
    stub.set_reply(
        200,
        r#"[{"id":"not-a-number","name":"Job"}]"#,
        Duration::ZERO,
    );
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.text(),
        r#"[{"id":"not-a-number","name":"Job"}]"#,
        "the response passes unchanged"
    );
    let _ = audit_records(&h, 1).await;
    let m = metrics(&h).await;
    assert!(
        m.contains(r#"gateway_spec_drift_total{operation="listPartnerJobs"} 1"#),
        "{m}"
    );
    stub.set_reply(200, r#"[{"id":1,"name":"Job"}]"#, Duration::ZERO);
    let _ = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    let _ = audit_records(&h, 2).await;
    assert!(
        metrics(&h)
            .await
            .contains(r#"gateway_spec_drift_total{operation="listPartnerJobs"} 1"#),
        "a matching response is not drift"
    );
}

#[tokio::test]
async fn with_the_default_limits_a_resume_of_the_maximum_attachment_size_goes_through() {
    use base64::Engine;
    let (h, stub) = with_stub(None).await;
    let t = h.sourcing_token();
    let candidate = |file_bytes: usize| {
        let content = base64::engine::general_purpose::STANDARD.encode(vec![0x25u8; file_bytes]);
        json!({"external_id": "ext-big", "first_name": "A", "last_name": "B",
               "attachments": [{"filename": "cv.pdf", "type": "resume", "content": content,
                                "content_type": "application/pdf"}]})
    };
    // The documented maximum, 5 MiB, fits in the default 10 MiB body (base64 is 4/3 of it).
    let r = h
        .post_json("/v1/partner/candidates", &t, &candidate(5 * 1024 * 1024))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(stub.seen().len(), 1);
    // One byte more is the attachment rule's 422, not a 413.
    let r = h
        .post_json(
            "/v1/partner/candidates",
            &t,
            &candidate(5 * 1024 * 1024 + 1),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text());
    // A body over the body limit is 413, and says that attachments count in base64.
    let r = h
        .post_json("/v1/partner/candidates", &t, &candidate(8 * 1024 * 1024))
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.text());
    let detail = r.json()["detail"].as_str().unwrap_or("").to_string();
    assert!(detail.contains("attachments count in base64"), "{detail}");
    assert_eq!(stub.seen().len(), 1);
}
