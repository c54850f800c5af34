//! `check --explain`: for each request, the decision it prints is the one the running gateway
//! then makes for the same request (same status, same code), with nothing sent and no quota
//! spent by the explanation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use tokio::process::Command;

use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};
use support::{Harness, Setup, email};

/// Runs `check --explain` against the harness's own configuration; the exit code, the printed
/// steps and the (status, code) of its result line.
/// (Run without blocking the test's runtime: the sandbox serving the issuer's keys runs on it.)
async fn explain(h: &Harness, args: &[&str]) -> (i32, String, (u16, String)) {
    let out = Command::new(support::binary())
        .args(["check", "--config"])
        .arg(h.dir.path().join("gateway.toml"))
        .arg("--explain")
        .args(args)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let last = text
        .lines()
        .find(|l| l.starts_with("result"))
        .unwrap_or_else(|| {
            panic!(
                "no result line: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let mut words = last.split_whitespace().skip(1);
    let status: u16 = words.next().unwrap().parse().unwrap();
    let code = words.next().unwrap().trim_end_matches(':').to_string();
    (out.status.code().unwrap(), text, (status, code))
}

fn token_file(h: &Harness, token: &str) -> String {
    let path = h.dir.path().join("token.jwt");
    std::fs::write(&path, token).unwrap();
    path.display().to_string()
}

/// The real gateway's answer to the same request.
async fn real(
    h: &Harness,
    method: Method,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> (u16, String) {
    let auth = format!("Bearer {token}");
    let mut all = vec![("authorization", auth.as_str())];
    all.extend_from_slice(headers);
    if body.is_some() {
        all.push(("content-type", "application/json"));
    }
    let r = h
        .client
        .send(
            method,
            &h.url(path),
            &all,
            body.map_or(Bytes::new(), |b| Bytes::from(b.to_string())),
        )
        .await;
    let code = if r.status.is_success() {
        "forwarded".to_string()
    } else {
        r.code()
    };
    (r.status.as_u16(), code)
}

fn limited_team() -> (&'static str, String) {
    (
        "limited",
        r#"name = "limited"
operations = ["listPartnerJobs"]
credential = "default"
[[members]]
iss = "ISSUER"
sub = "svc-limited"
[on_behalf_of]
default = "sourcing.bot(at)example.com"
[quota]
rate = "1/m"
[quota.operations.listPartnerJobs]
daily = 7
"#
        .replace("(at)", "@"),
    )
}

async fn harness() -> Harness {
    let mut teams = support::default_teams();
    teams.push(limited_team());
    Harness::start_with(Setup {
        teams,
        ..Setup::default()
    })
    .await
}

#[tokio::test]
async fn an_allowed_request_is_explained_as_forwarded_and_the_gateway_forwards_it() {
    let h = harness().await;
    let token = h.sourcing_token();
    let file = token_file(&h, &token);
    let before = h.sandbox.received().len();
    let (exit, text, said) =
        explain(&h, &["--path", "/v1/partner/jobs", "--token-file", &file]).await;
    assert_eq!(exit, 0, "{text}");
    assert_eq!(said, (200, "forwarded".to_string()), "{text}");
    assert!(text.contains("signature and claims verified"), "{text}");
    assert!(text.contains("listPartnerJobs"), "{text}");
    assert!(text.contains("sourcing"), "{text}");
    assert!(
        text.contains(&email("sourcing.bot(at)example.com")),
        "the On-Behalf-Of and why: {text}"
    );
    assert!(text.contains("team's on_behalf_of.default"), "{text}");
    assert!(text.contains("credential     default"), "{text}");
    assert_eq!(
        h.sandbox.received().len(),
        before,
        "explaining sent nothing"
    );
    let done = real(&h, Method::GET, "/v1/partner/jobs", &token, &[], None).await;
    assert_eq!(done, said);
}

#[tokio::test]
async fn a_refused_operation_is_explained_with_the_gateways_status_and_code() {
    let h = harness().await;
    let token = h.token("svc-agency-connector", json!({}));
    let file = token_file(&h, &token);
    let (exit, text, said) = explain(
        &h,
        &["--path", "/v1/partner/candidates", "--token-file", &file],
    )
    .await;
    assert_eq!(exit, 3, "{text}");
    assert_eq!(said, (403, "operation_not_allowed".to_string()));
    let done = real(&h, Method::GET, "/v1/partner/candidates", &token, &[], None).await;
    assert_eq!(done, said);
}

#[tokio::test]
async fn a_refused_on_behalf_of_is_explained_with_the_gateways_status_and_code() {
    let h = harness().await;
    let token = h.sourcing_token();
    let file = token_file(&h, &token);
    let header = "On-Behalf-Of: someone.else@example.com";
    let (exit, text, said) = explain(
        &h,
        &[
            "--path",
            "/v1/partner/jobs",
            "--token-file",
            &file,
            "--header",
            header,
        ],
    )
    .await;
    assert_eq!(exit, 3, "{text}");
    assert_eq!(said, (403, "on_behalf_of_not_allowed".to_string()));
    let done = real(
        &h,
        Method::GET,
        "/v1/partner/jobs",
        &token,
        &[("on-behalf-of", "someone.else@example.com")],
        None,
    )
    .await;
    assert_eq!(done, said);
}

#[tokio::test]
async fn a_quota_limited_team_is_shown_its_charged_limits_and_no_quota_is_spent() {
    let h = harness().await;
    let token = h.token("svc-limited", json!({}));
    let file = token_file(&h, &token);
    // Explained three times: a quota of one a minute would be spent by the first if explaining
    // counted.
    for _ in 0..3 {
        let (exit, text, said) =
            explain(&h, &["--path", "/v1/partner/jobs", "--token-file", &file]).await;
        assert_eq!(exit, 0, "{text}");
        assert_eq!(said, (200, "forwarded".to_string()));
        assert!(text.contains("team rate 1/m (burst 1)"), "{text}");
        assert!(text.contains("operation daily 7"), "{text}");
        assert!(
            text.contains(":team:limited:rate"),
            "the key charged: {text}"
        );
    }
    let first = real(&h, Method::GET, "/v1/partner/jobs", &token, &[], None).await;
    assert_eq!(first, (200, "forwarded".to_string()));
    let second = real(&h, Method::GET, "/v1/partner/jobs", &token, &[], None).await;
    assert_eq!(second, (429, "rate_limited".to_string()));
}

#[tokio::test]
async fn an_invalid_body_is_explained_with_its_pointers_and_the_gateways_status_and_code() {
    let h = harness().await;
    let token = h.sourcing_token();
    let file = token_file(&h, &token);
    let body = json!({"first_name": "Ada", "emails": [{"value": "CANARY-not-an-email"}]});
    let body_file = h.dir.path().join("body.json");
    std::fs::write(&body_file, body.to_string()).unwrap();
    let (exit, text, said) = explain(
        &h,
        &[
            "--method",
            "POST",
            "--path",
            "/v1/partner/candidates",
            "--token-file",
            &file,
            "--body",
            &body_file.display().to_string(),
        ],
    )
    .await;
    assert_eq!(exit, 3, "{text}");
    assert_eq!(said, (422, "validation_failed".to_string()));
    assert!(text.contains("/emails/0/value format"), "{text}");
    assert!(text.contains("/last_name required"), "{text}");
    assert!(
        !text.contains("CANARY"),
        "a submitted value was printed: {text}"
    );
    let done = real(
        &h,
        Method::POST,
        "/v1/partner/candidates",
        &token,
        &[],
        Some(&body),
    )
    .await;
    assert_eq!(done, said);
}

#[tokio::test]
async fn claims_given_as_json_are_explained_without_a_signature_check() {
    let h = harness().await;
    let claims = json!({"iss": h.sandbox.issuer(), "sub": "svc-reporting-nightly"});
    let (exit, text, said) = explain(
        &h,
        &[
            "--path",
            "/v1/partner/jobs",
            "--claims",
            &claims.to_string(),
        ],
    )
    .await;
    assert_eq!(exit, 0, "{text}");
    assert_eq!(said, (200, "forwarded".to_string()));
    assert!(text.contains("no signature checked"), "{text}");
    assert!(text.contains("reporting"), "{text}");
    // Claims that are not an object, or no identity at all: a usage error, exit 2.
    for args in [
        vec!["--path", "/v1/partner/jobs", "--claims", "[1]"],
        vec!["--path", "/v1/partner/jobs"],
    ] {
        let out = Command::new(support::binary())
            .args(["check", "--config"])
            .arg(h.dir.path().join("gateway.toml"))
            .arg("--explain")
            .args(&args)
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).is_empty());
    }
}
