//! The gateway as a `tower::Service`, driven with `oneshot`: no socket on the gateway's side
//! (the upstream is the sandbox, on loopback). The whole decision path, from token to forward,
//! and the guard around it: a panic is a 500 `internal_error` with its audit record.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use greenhouse_gateway::gateway::Gateway;
use greenhouse_gateway::pipeline::RespBody;
use greenhouse_gateway::sandbox::Sandbox;
use greenhouse_gateway::service::{Guarded, gateway_service};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::{AUDIENCE, Setup};
use tower::ServiceExt;

struct InProcess {
    sandbox: Sandbox,
    gateway: Arc<Gateway>,
    dir: tempfile::TempDir,
}

async fn in_process() -> InProcess {
    let setup = Setup::default();
    let sandbox = Sandbox::start_local(setup.sandbox.clone()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    support::write_config(dir.path(), &sandbox, &setup);
    let config = greenhouse_gateway::config::load(&dir.path().join("gateway.toml")).unwrap();
    let gateway = greenhouse_gateway::server::build(config).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while !gateway.not_ready().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("ready");
    InProcess {
        sandbox,
        gateway,
        dir,
    }
}

impl InProcess {
    fn token(&self, sub: &str) -> String {
        self.sandbox.mint_token(
            json!({"sub": sub, "aud": AUDIENCE}),
            Duration::from_secs(600),
        )
    }

    async fn call(&self, req: Request<Full<Bytes>>) -> (StatusCode, Value) {
        let resp = gateway_service(self.gateway.clone())
            .oneshot(req)
            .await
            .unwrap();
        read(resp).await
    }

    async fn records(&self, n: usize) -> Vec<Value> {
        let path = self.dir.path().join("audit/audit.jsonl");
        for _ in 0..300 {
            let recs: Vec<Value> = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            if recs.len() >= n {
                return recs;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} records")
    }
}

async fn read(resp: Response<RespBody>) -> (StatusCode, Value) {
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn get(path: &str, token: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::get(path).header("host", "gateway.test");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn the_decision_path_runs_through_oneshot_without_a_socket() {
    let gw = in_process().await;
    // No token: 401 before anything else.
    let (status, body) = gw.call(get("/v1/partner/jobs", None)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["code"], "missing_token");
    // A team member calling an operation its team may not call.
    let agency = gw.token("svc-agency-connector");
    let (status, body) = gw.call(get("/v1/partner/candidates", Some(&agency))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["code"], "operation_not_allowed");
    // Unknown route.
    let sourcing = gw.token("svc-sourcing-bot");
    let (status, body) = gw.call(get("/v1/partner/nowhere", Some(&sourcing))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "route_not_found");
    // Allowed: forwarded to the sandbox, with the team's On-Behalf-Of.
    let (status, body) = gw.call(get("/v1/partner/jobs", Some(&sourcing))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let seen = gw.sandbox.received();
    let last = seen.last().unwrap();
    assert_eq!(last.path, "/v1/partner/jobs");
    assert!(last.header("on-behalf-of").is_some());
    // Every one of them recorded; the in-process peer is unknown.
    let recs = gw.records(4).await;
    let codes: Vec<&Value> = recs.iter().map(|r| &r["code"]).collect();
    assert_eq!(
        codes,
        vec![
            &json!("missing_token"),
            &json!("operation_not_allowed"),
            &json!("route_not_found"),
            &Value::Null
        ]
    );
    assert_eq!(recs[3]["decision"], "forwarded");
    assert_eq!(recs[3]["team"], "sourcing");
    assert_eq!(recs[3]["client_addr"], "0.0.0.0");
}

#[tokio::test]
async fn a_panic_while_handling_is_a_500_with_its_audit_record() {
    let gw = in_process().await;
    let panicking = tower::service_fn(|_req: Request<Full<Bytes>>| async move {
        if true {
            panic!("a bug in a handler");
        }
        Ok::<Response<RespBody>, Infallible>(Response::new(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed_unsync(),
        ))
    });
    let service = Guarded::new(panicking, gw.gateway.clone());
    let mut req = get("/v1/partner/jobs?per_page=5", None);
    req.headers_mut()
        .insert("x-request-id", "panic-1".parse().unwrap());
    let resp = service.oneshot(req).await.unwrap();
    assert_eq!(
        resp.headers()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap(),
        "panic-1"
    );
    let (status, body) = read(resp).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(body["code"], "internal_error");
    assert_eq!(body["request_id"], "panic-1");
    let recs = gw.records(1).await;
    let rec = &recs[0];
    assert_eq!(rec["request_id"], "panic-1");
    assert_eq!(rec["code"], "internal_error");
    assert_eq!(rec["status"], 500);
    assert_eq!(rec["decision"], "denied");
    assert_eq!(rec["operation"], "listPartnerJobs");
    assert_eq!(rec["path"], "/v1/partner/jobs?*", "no value from the URL");
    // The gateway keeps serving.
    let token = gw.token("svc-sourcing-bot");
    let (status, _) = gw.call(get("/v1/partner/jobs", Some(&token))).await;
    assert_eq!(status, StatusCode::OK);
}
