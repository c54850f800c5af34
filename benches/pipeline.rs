//! The decision path's own steps on the shipped configuration (`policies/gateway.toml`), each
//! against a baseline measured in the same run (report ratios, not absolute times):
//! - team match (the last team by name, so every team's members are tried) against parsing the
//!   same claims from JSON;
//! - the response-side work on real sandbox answers (spec-drift check and candidate ids)
//!   against parsing the same body with `serde_json`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use greenhouse_gateway::gateway::Policy;
use greenhouse_gateway::http_client::{build_client, fetch, full_body};
use greenhouse_gateway::pipeline::inspect_response;
use greenhouse_gateway::sandbox::{Sandbox, SandboxOptions};
use http::Request;
use serde_json::{Map, Value, json};

/// A real answer of the sandbox for `path`, and its status.
async fn answer(sandbox: &Sandbox, path: &str) -> (u16, Bytes) {
    let client = build_client(None, Duration::from_secs(2)).unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode("dev-partner-key:");
    let user = sandbox.users().into_iter().next().unwrap();
    let req = Request::get(format!("{}{path}", sandbox.base_url()))
        .header("authorization", format!("Basic {basic}"))
        .header("on-behalf-of", user)
        .body(full_body(Bytes::new()))
        .unwrap();
    let (status, _, body) = fetch(&client, req, 4 << 20, Duration::from_secs(5))
        .await
        .unwrap();
    (status.as_u16(), body)
}

fn bench_pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/gateway.toml");
    let config = greenhouse_gateway::config::load(&shipped).unwrap();
    let issuer = config.issuers[0].issuer.clone();
    let policy = Policy::offline(config).unwrap();

    let mut g = c.benchmark_group("pipeline");
    // Team match: the last team by name.
    let claims_json = json!({"iss": issuer, "sub": "svc-sourcing-bot", "aud": "greenhouse-gateway",
        "exp": 4_000_000_000u64, "iat": 1_700_000_000u64})
    .to_string();
    let claims: Map<String, Value> = serde_json::from_str(&claims_json).unwrap();
    assert_eq!(policy.team_for(&claims).unwrap().team.name, "sourcing");
    g.bench_function("team_match/baseline_parse_claims", |b| {
        b.iter(|| black_box(serde_json::from_str::<Map<String, Value>>(&claims_json).unwrap()))
    });
    g.bench_function("team_match/last_of_three_teams", |b| {
        b.iter(|| black_box(policy.team_for(black_box(&claims)).is_some()))
    });

    // The response side, on what the sandbox answers.
    let sandbox = rt
        .block_on(Sandbox::start_local(SandboxOptions::default()))
        .unwrap();
    for (name, method, path) in [
        ("jobs", http::Method::GET, "/v1/partner/jobs"),
        ("candidates", http::Method::GET, "/v1/partner/candidates"),
    ] {
        let (status, body) = rt.block_on(answer(&sandbox, path));
        let route = policy.route(&method, path).unwrap().clone();
        g.bench_function(format!("response/{name}/baseline_serde_json"), |b| {
            b.iter(|| black_box(serde_json::from_slice::<Value>(&body).unwrap()))
        });
        g.bench_function(format!("response/{name}/drift_and_candidate_ids"), |b| {
            b.iter(|| {
                let mut ids = Vec::new();
                black_box(inspect_response(&route, status, &body, &mut ids));
                black_box(ids)
            })
        });
    }
    g.finish();
    drop(sandbox);
}

criterion_group!(benches, bench_pipeline);
criterion_main!(benches);
