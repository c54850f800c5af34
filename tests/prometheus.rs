//! `/metrics` as Prometheus itself reads it: after a representative run (forwarded, refused,
//! rate-limited, invalid body, a reload), the scrape is parsed and linted by `promtool check
//! metrics`, Prometheus's own parser (Debian's `prometheus` package; `.ci/run` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::json;
use support::{Harness, Setup, email};

fn promtool() -> std::path::PathBuf {
    which("promtool")
        .expect("promtool is not installed: `apt-get install prometheus` (Debian), as .ci/run does")
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

#[tokio::test]
async fn a_scrape_after_a_representative_run_passes_promtools_parser_and_linter() {
    let mut teams = support::default_teams();
    teams.push((
        "limited",
        email(
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
"#,
        ),
    ));
    let h = Harness::start_with(Setup {
        teams,
        ..Setup::default()
    })
    .await;
    let sourcing = h.sourcing_token();
    assert_eq!(
        h.get("/v1/partner/jobs", &sourcing).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.get("/v1/partner/jobs", "not-a-token").await.status,
        StatusCode::UNAUTHORIZED
    );
    let limited = h.token("svc-limited", json!({}));
    h.get("/v1/partner/jobs", &limited).await;
    assert_eq!(
        h.get("/v1/partner/jobs", &limited).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let invalid = h
        .post_json(
            "/v1/partner/candidates",
            &sourcing,
            &json!({"first_name": 1}),
        )
        .await;
    assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
    let reloaded = h
        .client
        .send(
            Method::POST,
            &h.admin_url("/admin/reload"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(reloaded.status, StatusCode::OK);

    let scrape = h
        .client
        .send(
            Method::GET,
            &h.admin_url("/metrics"),
            &[("accept", "text/plain; version=0.0.4")],
            Bytes::new(),
        )
        .await;
    assert_eq!(scrape.status, StatusCode::OK);
    let text = scrape.text();
    for family in [
        "gateway_requests_total",
        "gateway_quota_rejections_total",
        "gateway_validation_failures_total",
        "gateway_jwt_rejections_total",
        "gateway_config_reloads_total",
        "gateway_build_info",
    ] {
        assert!(text.contains(family), "{family} missing from the scrape");
    }
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool refused the scrape:\n{}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
