//! The real binary: `serve` stops gracefully on SIGTERM and exits 0 after the in-flight request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use greenhouse_gateway::sandbox::{Sandbox, SandboxOptions};
use http::{Method, StatusCode};
use support::{Setup, Stub, TestClient};

#[tokio::test]
async fn serve_on_sigterm_finishes_the_in_flight_request_and_exits_0() {
    let stub = Stub::start().await;
    stub.set_reply(200, "[\"finished\"]", Duration::from_millis(800));
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup {
        upstream: Some(stub.base_url()),
        ..Setup::default()
    };
    support::write_config(dir.path(), &sandbox, &setup);

    let mut served = support::spawn_serve(&dir.path().join("gateway.toml"));
    let (addr, admin) = (served.addr.clone(), served.admin.clone());
    let client = TestClient::new();
    for _ in 0..200 {
        let r = client
            .send(
                Method::GET,
                &format!("http://{admin}/readyz"),
                &[],
                Bytes::new(),
            )
            .await;
        if r.status == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let token = sandbox.mint_token(
        serde_json::json!({"sub": "svc-sourcing-bot", "aud": support::AUDIENCE}),
        Duration::from_secs(60),
    );
    let url = format!("http://{addr}/v1/partner/jobs");
    let c = client.clone();
    let in_flight = tokio::spawn(async move {
        c.send(
            Method::GET,
            &url,
            &[("authorization", &format!("Bearer {token}"))],
            Bytes::new(),
        )
        .await
    });
    for _ in 0..200 {
        if !stub.seen().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        stub.seen().len(),
        1,
        "the request did not reach the upstream"
    );
    // A SIGHUP (reload is not built yet) must not end the process.
    let hup = Command::new("kill")
        .args(["-HUP", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        served.child.try_wait().unwrap().is_none(),
        "SIGHUP ended the gateway"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let r = in_flight.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "[\"finished\"]");
    let mut status = None;
    for _ in 0..200 {
        if let Some(s) = served.child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let status = status.unwrap_or_else(|| {
        let _ = served.child.kill();
        panic!("the gateway did not exit within 5 s of SIGTERM")
    });
    assert_eq!(status.code(), Some(0));
    // Shutdown flushed the audit trail: the in-flight request has its record, and it verifies.
    let trail = std::fs::read_to_string(dir.path().join("audit/audit.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(trail.lines().last().unwrap()).unwrap();
    assert_eq!(last["operation"], "listPartnerJobs");
    assert_eq!(last["status"], 200);
    let verify = Command::new(support::binary())
        .args(["audit", "verify"])
        .arg(dir.path().join("audit/audit.jsonl"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}
