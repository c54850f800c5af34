//! Hot reload: a changed policy is in force from the very next request, a broken one is refused
//! as a whole while the running one stays, what a reload did not touch keeps its state (quota
//! counts, keys, tokens), what needs a restart is refused by name, certificates rotate for new
//! connections, and requests in flight finish under the policy they started with.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Harness, Reply, Setup, Stub, TestClient, email};

fn team_path(h: &Harness, name: &str) -> PathBuf {
    h.dir.path().join("teams").join(format!("{name}.toml"))
}

/// Rewrites a team file the way an editor would (the issuer placeholder filled in).
fn write_team(h: &Harness, name: &str, text: &str) {
    std::fs::write(
        team_path(h, name),
        email(text).replace("ISSUER", &h.sandbox.issuer()),
    )
    .unwrap();
}

fn edit_gateway_toml(h: &Harness, edit: impl FnOnce(String) -> String) {
    let path = h.dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
}

async fn reload(h: &Harness) -> Reply {
    h.client
        .send(
            Method::POST,
            &h.admin_url("/admin/reload"),
            &[],
            Bytes::new(),
        )
        .await
}

async fn metrics(h: &Harness) -> String {
    h.client
        .send(Method::GET, &h.admin_url("/metrics"), &[], Bytes::new())
        .await
        .text()
}

fn audit_records(h: &Harness) -> Vec<Value> {
    std::fs::read_to_string(h.dir.path().join("audit/audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the trail holds a record for `request_id`.
async fn record_of(h: &Harness, request_id: &str) -> Value {
    for _ in 0..300 {
        if let Some(r) = audit_records(h)
            .into_iter()
            .find(|r| r["request_id"] == request_id)
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no audit record for {request_id}")
}

const SOURCING: &str = r#"name = "sourcing"
operations = ["listPartnerJobs", "listPartnerProspectPools", "createPartnerCandidate", "listPartnerCandidates"]
credential = "default"
[[members]]
iss = "ISSUER"
sub = "svc-sourcing-*"
[on_behalf_of]
default = "sourcing.bot(at)example.com"
allowed = ["recruiter.one(at)example.com"]
"#;

fn sourcing_with(extra: &str) -> String {
    format!("{SOURCING}{extra}")
}

#[tokio::test]
async fn an_operation_removed_from_a_team_is_refused_on_the_very_next_request() {
    let h = Harness::start().await;
    let token = h.sourcing_token();
    assert_eq!(
        h.get("/v1/partner/prospect_pools", &token).await.status,
        StatusCode::OK
    );
    write_team(
        &h,
        "sourcing",
        &SOURCING.replace("\"listPartnerProspectPools\", ", ""),
    );
    let r = reload(&h).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["generation"], 2);
    let refused = h.get("/v1/partner/prospect_pools", &token).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.code(), "operation_not_allowed");
    // The rest of the team's policy is unchanged.
    assert_eq!(
        h.get("/v1/partner/jobs", &token).await.status,
        StatusCode::OK
    );
    assert!(
        metrics(&h)
            .await
            .contains("gateway_config_reloads_total{result=\"success\"} 1")
    );
}

#[tokio::test]
async fn a_broken_reload_is_refused_whole_and_the_running_policy_stays_in_force() {
    let h = Harness::start().await;
    let token = h.sourcing_token();
    // Two problems in one change: an unknown operation, and a rate that does not parse; plus a
    // valid-looking removal that must not be applied either.
    write_team(
        &h,
        "sourcing",
        &sourcing_with("[quota]\nrate = \"fast\"\n")
            .replace("\"listPartnerJobs\"", "\"noSuchOperation\""),
    );
    let r = reload(&h).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let body = r.json();
    assert_eq!(body["result"], "invalid");
    assert_eq!(body["generation"], 1);
    let problems: Vec<String> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("sourcing.toml") && p.contains("noSuchOperation")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("sourcing.toml") && p.contains("quota.rate")),
        "{problems:?}"
    );
    // Still the old policy: listPartnerJobs allowed, no quota.
    for _ in 0..3 {
        assert_eq!(
            h.get("/v1/partner/jobs", &token).await.status,
            StatusCode::OK
        );
    }
    let m = metrics(&h).await;
    assert!(
        m.contains("gateway_config_reloads_total{result=\"invalid\"} 1"),
        "{m}"
    );
    let teams = h
        .client
        .send(Method::GET, &h.admin_url("/admin/teams"), &[], Bytes::new())
        .await
        .json();
    assert_eq!(teams["generation"], 1);
}

#[tokio::test]
async fn a_listener_address_change_is_refused_naming_the_key() {
    let h = Harness::start().await;
    edit_gateway_toml(&h, |t| {
        t.replacen("addr = \"127.0.0.1:0\"", "addr = \"127.0.0.1:1\"", 1)
    });
    let r = reload(&h).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.json()["result"], "restart_required");
    let text = r.text();
    assert!(
        text.contains("listen.addr changed: it applies only at a restart"),
        "{text}"
    );
    // Still serving where it was.
    let token = h.sourcing_token();
    assert_eq!(
        h.get("/v1/partner/jobs", &token).await.status,
        StatusCode::OK
    );
    assert!(
        metrics(&h)
            .await
            .contains("gateway_config_reloads_total{result=\"restart_required\"} 1")
    );
}

#[tokio::test]
async fn quota_usage_survives_an_unrelated_reload_and_a_raised_limit_applies_at_once() {
    let daily = |n: u32| {
        sourcing_with(&format!(
            "[quota.operations.listPartnerJobs]\ndaily = {n}\n"
        ))
    };
    let h = Harness::start_with(Setup {
        teams: vec![("sourcing", email(&daily(3)).to_string())],
        ..Setup::default()
    })
    .await;
    write_team(&h, "sourcing", &daily(3));
    let token = h.sourcing_token();
    for _ in 0..3 {
        assert_eq!(
            h.get("/v1/partner/jobs", &token).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        h.get("/v1/partner/jobs", &token).await.code(),
        "daily_quota_exhausted"
    );
    // An unrelated change (a description): the count stays.
    write_team(
        &h,
        "sourcing",
        &format!("description = \"edited\"\n{}", daily(3)),
    );
    assert_eq!(reload(&h).await.status, StatusCode::OK);
    assert_eq!(
        h.get("/v1/partner/jobs", &token).await.code(),
        "daily_quota_exhausted",
        "usage kept across an unrelated reload"
    );
    // The limit raised to 5: two more today, counted on top of the three already counted.
    write_team(&h, "sourcing", &daily(5));
    assert_eq!(reload(&h).await.status, StatusCode::OK);
    for _ in 0..2 {
        let r = h.get("/v1/partner/jobs", &token).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(
        h.get("/v1/partner/jobs", &token).await.code(),
        "daily_quota_exhausted"
    );
    let teams = h
        .client
        .send(Method::GET, &h.admin_url("/admin/teams"), &[], Bytes::new())
        .await
        .json();
    assert_eq!(teams["generation"], 3);
    let sourcing = teams["teams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "sourcing")
        .unwrap()
        .clone();
    assert_eq!(
        sourcing["quota"]["usage"]["operations"]["listPartnerJobs"]["daily_used"], 5,
        "{sourcing}"
    );
}

#[tokio::test]
async fn keys_and_tokens_are_not_fetched_again_across_a_reload_that_did_not_touch_them() {
    let h = Harness::start().await;
    let token = h.sourcing_token();
    assert_eq!(
        h.get("/v1/partner/jobs", &token).await.status,
        StatusCode::OK
    );
    let jwks_before = h.sandbox.jwks_requests();
    let tokens_before = h.sandbox.token_requests().len();
    for n in 0..3 {
        write_team(
            &h,
            "sourcing",
            &format!("description = \"edit {n}\"\n{SOURCING}"),
        );
        assert_eq!(reload(&h).await.status, StatusCode::OK);
        assert_eq!(
            h.get("/v1/partner/jobs", &token).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(h.sandbox.jwks_requests(), jwks_before, "keys refetched");
    assert_eq!(
        h.sandbox.token_requests().len(),
        tokens_before,
        "upstream token refetched"
    );
}

#[tokio::test]
async fn a_changed_issuer_and_a_changed_credential_are_picked_up() {
    let h = Harness::start_with(Setup {
        sandbox: greenhouse_gateway::sandbox::SandboxOptions {
            clients: vec![
                ("gateway-dev".into(), "dev-client-secret".into()),
                ("gateway-rotated".into(), "rotated-secret".into()),
            ],
            rate_limit: 10_000,
            ..Default::default()
        },
        ..Setup::default()
    })
    .await;
    let old_aud = h.sourcing_token();
    assert_eq!(
        h.get("/v1/partner/jobs", &old_aud).await.status,
        StatusCode::OK
    );
    let tokens_before = h.sandbox.token_requests().len();
    edit_gateway_toml(&h, |t| {
        t.replace(
            "audiences = [\"greenhouse-gateway\"]",
            "audiences = [\"greenhouse-gateway-v2\"]",
        )
        .replace(
            "client_id = \"gateway-dev\"",
            "client_id = \"gateway-rotated\"",
        )
        .replace(
            "{ value = \"dev-client-secret\" }",
            "{ value = \"rotated-secret\" }",
        )
    });
    let r = reload(&h).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // The issuer's new audience: the old token is not for this gateway any more.
    let refused = h.get("/v1/partner/jobs", &old_aud).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let new_aud = h.sandbox.mint_token(
        json!({"sub": "svc-sourcing-bot", "aud": "greenhouse-gateway-v2"}),
        Duration::from_secs(600),
    );
    assert_eq!(
        h.get("/v1/partner/jobs", &new_aud).await.status,
        StatusCode::OK
    );
    // The credential's new client: a token was fetched with it.
    let fetched = h.sandbox.token_requests();
    assert!(fetched.len() > tokens_before);
    // client_secret_basic: the client id is the Basic user name.
    use base64::Engine as _;
    let last = fetched.last().unwrap();
    let auth = last.header("authorization").unwrap_or_default();
    let user_pass = base64::engine::general_purpose::STANDARD
        .decode(auth.strip_prefix("Basic ").unwrap_or_default())
        .unwrap_or_default();
    assert_eq!(
        String::from_utf8_lossy(&user_pass),
        "gateway-rotated:rotated-secret",
        "the token was not fetched with the rotated client"
    );
}

#[tokio::test]
async fn a_request_in_flight_across_a_reload_finishes_under_the_policy_it_started_with() {
    let stub = Stub::start().await;
    stub.set_reply(200, "[]", Duration::from_millis(800));
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        ..Setup::default()
    })
    .await;
    let token = h.sourcing_token();
    let slow = {
        let (client, url) = (TestClient::new(), h.url("/v1/partner/jobs"));
        let auth = format!("Bearer {token}");
        tokio::spawn(async move {
            client
                .send(
                    Method::GET,
                    &url,
                    &[("authorization", &auth), ("x-request-id", "in-flight-1")],
                    Bytes::new(),
                )
                .await
        })
    };
    // Wait until the upstream has the request, then change the team's On-Behalf-Of default and
    // take listPartnerJobs away from it.
    for _ in 0..200 {
        if !stub.seen().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(stub.seen().len(), 1);
    write_team(
        &h,
        "sourcing",
        &SOURCING
            .replace("sourcing.bot(at)", "someone.else(at)")
            .replace("\"listPartnerJobs\", ", ""),
    );
    assert_eq!(reload(&h).await.status, StatusCode::OK);
    let done = slow.await.unwrap();
    assert_eq!(done.status, StatusCode::OK);
    let rec = record_of(&h, "in-flight-1").await;
    assert_eq!(rec["decision"], "forwarded");
    assert_eq!(rec["operation"], "listPartnerJobs");
    assert_eq!(rec["on_behalf_of"], email("sourcing.bot(at)example.com"));
    assert_eq!(rec["status"], 200);
    // The next request is judged by the new policy.
    assert_eq!(
        h.get("/v1/partner/jobs", &token).await.code(),
        "operation_not_allowed"
    );
}

#[tokio::test]
async fn ten_reloads_under_a_steady_stream_of_requests_cost_no_request() {
    let h = Arc::new(Harness::start().await);
    let token = h.sourcing_token();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (h, token, stop) = (h.clone(), token.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            // Bounded: stops when told, or after 2000 requests per task at most.
            for _ in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let r = h.get("/v1/partner/jobs", &token).await;
                if r.status == StatusCode::OK {
                    ok += 1;
                } else {
                    failed.push(format!("{} {}", r.status, r.text()));
                }
            }
            (ok, failed)
        }));
    }
    for n in 0..10 {
        write_team(
            &h,
            "sourcing",
            &sourcing_with(&format!(
                "[quota]\nrate = \"{}/s\"\nburst = 100000\n",
                100_000 + n
            )),
        );
        let r = reload(&h).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut total = 0;
    for task in load {
        let (ok, failed) = task.await.unwrap();
        assert!(
            failed.is_empty(),
            "requests failed during reloads: {failed:?}"
        );
        total += ok;
    }
    assert!(total > 0);
    assert!(
        metrics(&h)
            .await
            .contains("gateway_config_reloads_total{result=\"success\"} 10")
    );
}

/// A self-signed certificate for `localhost`, written as PEM files; the DER for a client that
/// trusts exactly it.
fn cert_files(dir: &Path, name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k, cert.der().to_vec())
}

/// Whether a new TLS connection to `addr` verifies against exactly `trusted`.
async fn handshake_trusting(addr: std::net::SocketAddr, trusted: &[u8]) -> bool {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(trusted.to_vec()))
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.is_ok()
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_tls_connections_after_a_reload() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, first) = cert_files(certs.path(), "first");
    let h = Harness::start_with(Setup {
        listen_extra: format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}",
            cert.display(),
            key.display()
        ),
        ..Setup::default()
    })
    .await;
    let addr = h.gateway.addr;
    assert!(handshake_trusting(addr, &first).await);
    // The operator replaces the files in place, then reloads.
    let (new_cert, new_key, second) = cert_files(certs.path(), "second");
    std::fs::copy(&new_cert, &cert).unwrap();
    std::fs::copy(&new_key, &key).unwrap();
    assert!(
        handshake_trusting(addr, &first).await,
        "the certificate changes only on reload"
    );
    let r = reload(&h).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(
        handshake_trusting(addr, &second).await,
        "new certificate served"
    );
    assert!(
        !handshake_trusting(addr, &first).await,
        "old certificate gone"
    );
    // A key that does not fit the certificate refuses the reload; the served one stays.
    let (_, other_key, _) = cert_files(certs.path(), "third");
    std::fs::copy(&other_key, &key).unwrap();
    let refused = reload(&h).await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(refused.text().contains("listen.tls"), "{}", refused.text());
    assert!(handshake_trusting(addr, &second).await);
}
