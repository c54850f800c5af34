//! Traces: W3C trace context continued (or started) and passed upstream with the gateway's span
//! as parent; spans exported over OTLP/HTTP to a recording collector; export never holds up a
//! request; `[tracing]` checked with its key paths.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use greenhouse_gateway::sandbox::{Sandbox, SandboxOptions};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;
use support::{Harness, Setup, Stub, TestClient};

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_PARENT: &str = "00f067aa0ba902b7";

fn caller_traceparent() -> String {
    format!("00-{CALLER_TRACE}-{CALLER_PARENT}-01")
}

/// `traceparent` split into (version, trace id, parent id, flags), each checked to be
/// lowercase hex of the W3C lengths.
fn parts(tp: &str) -> (String, String, String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    for (part, len) in p.iter().zip([2, 32, 16, 2]) {
        assert_eq!(part.len(), len, "{tp}");
        assert!(
            part.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{tp}"
        );
    }
    assert_ne!(p[1], "0".repeat(32), "{tp}");
    assert_ne!(p[2], "0".repeat(16), "{tp}");
    (
        p[0].to_string(),
        p[1].to_string(),
        p[2].to_string(),
        p[3].to_string(),
    )
}

async fn gateway_before_stub() -> (Harness, Stub) {
    let stub = Stub::start().await;
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        ..Setup::default()
    })
    .await;
    (h, stub)
}

/// GET /v1/partner/jobs as the sourcing team, with extra headers.
async fn get_jobs(h: &Harness, extra: &[(&str, &str)]) -> support::Reply {
    let auth = format!("Bearer {}", h.sourcing_token());
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    h.client
        .send(
            Method::GET,
            &h.url("/v1/partner/jobs"),
            &headers,
            Bytes::new(),
        )
        .await
}

/// The trace headers of the last request the stub received.
fn last_trace_headers(stub: &Stub) -> (Vec<String>, Vec<String>) {
    let seen = stub.seen();
    let last = seen.last().expect("the upstream got the request");
    let values = |name: &str| {
        last.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    (values("traceparent"), values("tracestate"))
}

#[tokio::test]
async fn a_callers_traceparent_is_continued_upstream_with_the_same_trace_id_and_a_new_parent_id() {
    let (h, stub) = gateway_before_stub().await;
    let tp = caller_traceparent();
    let r = get_jobs(
        &h,
        &[
            ("traceparent", &tp),
            ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    let (traceparent, tracestate) = last_trace_headers(&stub);
    assert_eq!(traceparent.len(), 1, "{traceparent:?}");
    let (version, trace_id, parent_id, flags) = parts(&traceparent[0]);
    assert_eq!(version, "00");
    assert_eq!(trace_id, CALLER_TRACE, "the caller's trace is continued");
    assert_ne!(
        parent_id, CALLER_PARENT,
        "the upstream's parent is the gateway's span, not the caller's"
    );
    assert_eq!(flags, "01", "the caller's sampled flag is kept");
    assert_eq!(tracestate, ["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"]);

    // A second request in the same trace gets a span of its own.
    get_jobs(&h, &[("traceparent", &tp)]).await;
    let (again, tracestate) = last_trace_headers(&stub);
    let (_, trace_again, parent_again, _) = parts(&again[0]);
    assert_eq!(trace_again, CALLER_TRACE);
    assert_ne!(parent_again, parent_id);
    assert!(tracestate.is_empty(), "{tracestate:?}");
}

#[tokio::test]
async fn a_malformed_traceparent_is_replaced_by_a_fresh_trace_and_its_tracestate_dropped() {
    let (h, stub) = gateway_before_stub().await;
    let malformed = [
        format!("00-{}-{CALLER_PARENT}-01", CALLER_TRACE.to_uppercase()),
        format!("00-{}-{CALLER_PARENT}-01", "0".repeat(32)),
        format!("00-{CALLER_TRACE}-{}-01", "0".repeat(16)),
        format!("ff-{CALLER_TRACE}-{CALLER_PARENT}-01"),
        format!("00-{CALLER_TRACE}-{CALLER_PARENT}-01-extra"),
        format!("00-{CALLER_TRACE}-{CALLER_PARENT}"),
        format!("00-{CALLER_TRACE}x-{CALLER_PARENT}-01"),
        "not a traceparent".to_string(),
    ];
    let mut traces = Vec::new();
    for bad in &malformed {
        let r = get_jobs(
            &h,
            &[("traceparent", bad), ("tracestate", "congo=t61rcWkgMzE")],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{bad}: {}", r.text());
        let (traceparent, tracestate) = last_trace_headers(&stub);
        assert_eq!(traceparent.len(), 1, "{bad}: {traceparent:?}");
        assert_ne!(
            &traceparent[0], bad,
            "a malformed traceparent was passed on"
        );
        let (version, trace_id, _, flags) = parts(&traceparent[0]);
        assert_eq!(version, "00");
        assert_ne!(
            trace_id, CALLER_TRACE,
            "{bad}: the malformed trace was continued"
        );
        assert_eq!(
            flags, "00",
            "{bad}: a new trace the gateway does not record"
        );
        assert!(
            tracestate.is_empty(),
            "{bad}: tracestate without a valid traceparent was passed on: {tracestate:?}"
        );
        traces.push(trace_id);
    }
    // Two traceparent headers are malformed too, even when each is valid.
    let tp = caller_traceparent();
    get_jobs(&h, &[("traceparent", &tp), ("traceparent", &tp)]).await;
    let (traceparent, _) = last_trace_headers(&stub);
    let (_, trace_id, _, _) = parts(&traceparent[0]);
    assert_ne!(trace_id, CALLER_TRACE);
    traces.push(trace_id);
    traces.sort();
    traces.dedup();
    assert_eq!(
        traces.len(),
        malformed.len() + 1,
        "every new trace is its own"
    );
}

#[tokio::test]
async fn a_request_without_traceparent_starts_a_trace_the_upstream_sees() {
    let (h, stub) = gateway_before_stub().await;
    let r = get_jobs(&h, &[("tracestate", "congo=t61rcWkgMzE")]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let (first, tracestate) = last_trace_headers(&stub);
    assert_eq!(first.len(), 1, "{first:?}");
    let (version, first_trace, _, flags) = parts(&first[0]);
    assert_eq!(version, "00");
    assert_eq!(flags, "00");
    assert!(tracestate.is_empty(), "{tracestate:?}");

    get_jobs(&h, &[]).await;
    let (second, _) = last_trace_headers(&stub);
    let (_, second_trace, _, _) = parts(&second[0]);
    assert_ne!(
        first_trace, second_trace,
        "each request starts its own trace"
    );
}

#[tokio::test]
async fn a_long_tracestate_is_passed_on_shortened_to_512_characters_of_whole_members() {
    let (h, stub) = gateway_before_stub().await;
    let mut members = vec![format!("big={}", "x".repeat(200))];
    members.extend((0..31).map(|i| format!("vendor{i:02}={}", "v".repeat(20))));
    let long = members.join(",");
    assert!(long.len() > 512);
    let tp = caller_traceparent();
    get_jobs(&h, &[("traceparent", &tp), ("tracestate", &long)]).await;
    let (_, tracestate) = last_trace_headers(&stub);
    assert_eq!(tracestate.len(), 1, "{tracestate:?}");
    let passed = &tracestate[0];
    assert!(passed.len() <= 512, "{}", passed.len());
    assert!(
        !passed.contains("big="),
        "the long member goes first: {passed}"
    );
    assert!(passed.starts_with("vendor00="), "{passed}");
    assert!(passed.split(',').all(|m| members.iter().any(|o| o == m)));
}

/// A POST the collector received: path, content type and body.
struct Post {
    path: String,
    content_type: Option<String>,
    content_encoding: Option<String>,
    body: Bytes,
}

/// A small OTLP/HTTP collector: records the body of every POST to /v1/traces. With `answer`
/// false it accepts connections and never answers.
struct Collector {
    addr: SocketAddr,
    posts: Arc<Mutex<Vec<Post>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start(answer: bool) -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let posts: Arc<Mutex<Vec<Post>>> = Arc::default();
        let kept = posts.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if !answer {
                    held.push(stream);
                    continue;
                }
                let kept = kept.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let kept = kept.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let content_type = req
                                .headers()
                                .get("content-type")
                                .map(|v| v.to_str().unwrap().to_string());
                            let content_encoding = req
                                .headers()
                                .get("content-encoding")
                                .map(|v| v.to_str().unwrap().to_string());
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            kept.lock().unwrap().push(Post {
                                path,
                                content_type,
                                content_encoding,
                                body,
                            });
                            let mut resp = Response::new(Full::new(Bytes::new()));
                            resp.headers_mut()
                                .insert("content-type", "application/x-protobuf".parse().unwrap());
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector { addr, posts, task }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `content-encoding` of every POST received.
    fn encodings(&self) -> Vec<Option<String>> {
        self.posts
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.content_encoding.clone())
            .collect()
    }

    /// Every span received, decoded, with the resource attributes of its batch.
    fn spans(&self) -> Vec<(Span, HashMap<String, String>)> {
        let mut out = Vec::new();
        for post in self.posts.lock().unwrap().iter() {
            assert_eq!(post.path, "/v1/traces");
            assert_eq!(post.content_type.as_deref(), Some("application/x-protobuf"));
            let body = match post.content_encoding.as_deref() {
                None => post.body.clone(),
                Some("gzip") => {
                    let mut plain = Vec::new();
                    flate2::read::GzDecoder::new(&post.body[..])
                        .read_to_end(&mut plain)
                        .expect("a gzip body");
                    Bytes::from(plain)
                }
                Some(other) => panic!("unexpected content-encoding {other}"),
            };
            let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
            for rs in req.resource_spans {
                let resource: HashMap<String, String> = rs
                    .resource
                    .map(|r| r.attributes)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|kv| (kv.key, value_text(kv.value.and_then(|v| v.value))))
                    .collect();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        out.push((span, resource.clone()));
                    }
                }
            }
        }
        out
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn value_text(v: Option<AnyValue>) -> String {
    match v {
        Some(AnyValue::StringValue(s)) => s,
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| {
            (
                kv.key.clone(),
                value_text(kv.value.clone().and_then(|v| v.value)),
            )
        })
        .collect()
}

/// Waits for the admin listener's `/readyz` to answer 200.
async fn wait_ready(client: &TestClient, admin: &str) {
    for _ in 0..400 {
        let r = client
            .send_fallible(Method::GET, &format!("http://{admin}/readyz"), &[])
            .await;
        if r.is_some_and(|r| r.status == StatusCode::OK) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the gateway did not become ready");
}

/// The gateway's binary serving `setup` in front of `sandbox`, with the environment `env`, once
/// ready: its folder (alive as long as the test needs the files), the process and a client.
async fn serve_ready(
    sandbox: &Sandbox,
    setup: &Setup,
    env: &[(&str, &str)],
) -> (tempfile::TempDir, support::ServeProcess, TestClient) {
    let dir = tempfile::tempdir().unwrap();
    support::write_config(dir.path(), sandbox, setup);
    let served = support::spawn_serve_with_env(&dir.path().join("gateway.toml"), env);
    let client = TestClient::new();
    wait_ready(&client, &served.admin).await;
    (dir, served, client)
}

/// A token of the sourcing team's bot, valid for ten minutes.
fn bot_token(sandbox: &Sandbox) -> String {
    sandbox.mint_token(
        json!({"sub": "svc-sourcing-bot", "aud": support::AUDIENCE}),
        Duration::from_secs(600),
    )
}

/// SIGTERM, then the exit status (the process must exit within 15 s).
async fn terminate(served: &mut support::ServeProcess) -> Option<i32> {
    let killed = Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    for _ in 0..600 {
        if let Some(s) = served.child.try_wait().unwrap() {
            return s.code();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "the gateway did not exit within 15 s of SIGTERM; log:\n{}",
        served.log_text()
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn spans_of_a_request_reach_an_otlp_collector_in_the_callers_trace_without_tokens_or_subjects()
 {
    let collector = Collector::start(true).await;
    let sandbox = Sandbox::start_local(SandboxOptions {
        rate_limit: 10_000,
        ..SandboxOptions::default()
    })
    .await
    .unwrap();
    let setup = Setup {
        extra: format!(
            "[tracing]\notlp_endpoint = \"{}\"\nservice_name = \"gateway-under-test\"\n",
            collector.endpoint()
        ),
        ..Setup::default()
    };
    // Spans leave only when the batch is flushed at shutdown: the export proves the flush. A
    // log filtered down to warnings (but the lines the test waits for) exports all the same.
    let (_dir, mut served, client) = serve_ready(
        &sandbox,
        &setup,
        &[
            (
                "RUST_LOG",
                "warn,greenhouse_gateway::server=info,greenhouse_gateway::telemetry::otlp=info",
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
        ],
    )
    .await;

    // A key the gateway has not seen (fetched within the request) and a revoked upstream token
    // (a fresh one fetched within the request, then one replay): every span kind in one trace.
    sandbox.rotate_signing_key(false);
    sandbox.revoke_all_tokens();
    sandbox.clear_received();
    let subject = "svc-sourcing-bot";
    let token = sandbox.mint_token(
        json!({"sub": subject, "aud": support::AUDIENCE}),
        Duration::from_secs(600),
    );
    let tp = caller_traceparent();
    let auth = format!("Bearer {token}");
    let r = client
        .send(
            Method::GET,
            &format!("http://{}/v1/partner/jobs", served.addr),
            &[
                ("authorization", &auth),
                ("traceparent", &tp),
                ("tracestate", "congo=t61rcWkgMzE"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let request_id = r.headers["x-request-id"].to_str().unwrap().to_string();

    // Greenhouse saw the caller's trace, each call with its own parent.
    let received = sandbox.received();
    assert_eq!(
        received.len(),
        2,
        "a 401, then the replay with a fresh token"
    );
    let mut upstream_parents = Vec::new();
    for call in &received {
        let values = call.header_values("traceparent");
        assert_eq!(values.len(), 1, "{values:?}");
        let (_, trace_id, parent_id, flags) = parts(values[0]);
        assert_eq!(trace_id, CALLER_TRACE);
        assert_eq!(flags, "01");
        assert_eq!(call.header_values("tracestate"), ["congo=t61rcWkgMzE"]);
        upstream_parents.push(parent_id);
    }
    assert_ne!(upstream_parents[0], upstream_parents[1]);
    let bearer_upstream: Vec<String> = received
        .iter()
        .filter_map(|c| c.header("authorization"))
        .map(|a| a.trim_start_matches("Bearer ").to_string())
        .collect();

    assert_eq!(terminate(&mut served).await, Some(0));
    assert!(
        served.log_text().contains("spans flushed"),
        "{}",
        served.log_text()
    );

    let spans = collector.spans();
    let ours: Vec<&(Span, HashMap<String, String>)> = spans
        .iter()
        .filter(|(s, _)| hex(&s.trace_id) == CALLER_TRACE)
        .collect();
    let named = |name: &str| -> Vec<&Span> {
        ours.iter()
            .map(|(s, _)| s)
            .filter(|s| s.name == name)
            .collect()
    };
    let request = named("request");
    assert_eq!(request.len(), 1, "one request span: {ours:#?}");
    let request = request[0];
    assert_eq!(
        hex(&request.parent_span_id),
        CALLER_PARENT,
        "the request span's parent is the caller's span"
    );
    assert_eq!(request.kind, 2, "server");
    let a = attrs(request);
    assert_eq!(a["team"], "sourcing");
    assert_eq!(a["operation"], "listPartnerJobs");
    assert_eq!(a["status"], "200");
    assert_eq!(a["code"], "forwarded");
    assert_eq!(a["request_id"], request_id);
    assert_eq!(a["trace_id"], CALLER_TRACE);
    for name in ["jwks_fetch", "token_fetch", "quota"] {
        let found = named(name);
        assert_eq!(found.len(), 1, "{name}: {ours:#?}");
        assert_eq!(
            found[0].parent_span_id, request.span_id,
            "{name} is a child of the request span"
        );
    }
    assert_eq!(attrs(named("quota")[0])["decision"], "admitted");
    assert_eq!(attrs(named("token_fetch")[0])["credential"], "default");
    assert_eq!(attrs(named("token_fetch")[0])["result"], "success");
    assert_eq!(attrs(named("jwks_fetch")[0])["result"], "ok");
    let upstream = named("upstream");
    assert_eq!(upstream.len(), 2, "{ours:#?}");
    let mut statuses: Vec<String> = upstream
        .iter()
        .map(|s| attrs(s)["status"].clone())
        .collect();
    statuses.sort();
    assert_eq!(statuses, ["200", "401"]);
    for s in &upstream {
        assert_eq!(s.parent_span_id, request.span_id);
        assert_eq!(s.kind, 3, "client");
    }
    let mut exported: Vec<String> = upstream.iter().map(|s| hex(&s.span_id)).collect();
    exported.sort();
    upstream_parents.sort();
    assert_eq!(
        exported, upstream_parents,
        "Greenhouse's parent is the gateway's upstream span"
    );
    for (_, resource) in &ours {
        assert_eq!(resource["service.name"], "gateway-under-test");
    }

    // Nothing the caller or Greenhouse authenticated with, nor who the caller is, nor a log
    // event, in any span.
    let secrets = [
        token.as_str(),
        subject,
        "dev-client-secret",
        "dev-partner-key",
    ];
    let documented = [
        "request_id",
        "method",
        "trace_id",
        "team",
        "operation",
        "status",
        "code",
        "issuer",
        "credential",
        "result",
        "decision",
        "source",
        "kind",
    ];
    for (span, resource) in &spans {
        assert!(span.events.is_empty(), "{span:#?}");
        for key in attrs(span).keys() {
            assert!(
                documented.contains(&key.as_str()),
                "{:?} has the undocumented attribute {key}",
                span.name
            );
        }
        let mut texts: Vec<String> = attrs(span).into_values().collect();
        texts.extend(attrs(span).into_keys());
        texts.extend(resource.values().cloned());
        texts.push(span.name.clone());
        for text in texts {
            for secret in secrets
                .iter()
                .copied()
                .chain(bearer_upstream.iter().map(String::as_str))
            {
                assert!(
                    !text.contains(secret),
                    "{:?} carries a secret or the subject: {text}",
                    span.name
                );
            }
            assert!(!text.contains("eyJ"), "a JWT in {:?}: {text}", span.name);
        }
    }
}

/// One request through a gateway exporting to a collector with the compression variables of
/// `compression` set; after a clean stop: the collector, the `code` of each `request` span
/// received, and the gateway's log.
async fn export_one_request_with_compression(
    compression: &[(&str, &str)],
) -> (Collector, Vec<String>, String) {
    let collector = Collector::start(true).await;
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let setup = Setup {
        extra: format!(
            "[tracing]\notlp_endpoint = \"{}\"\nsample_ratio = 1.0\n",
            collector.endpoint()
        ),
        ..Setup::default()
    };
    let mut env = vec![("OTEL_BSP_SCHEDULE_DELAY", "600000")];
    env.extend_from_slice(compression);
    let (_dir, mut served, client) = serve_ready(&sandbox, &setup, &env).await;
    let token = bot_token(&sandbox);
    let r = client
        .send(
            Method::GET,
            &format!("http://{}/v1/partner/jobs", served.addr),
            &[("authorization", &format!("Bearer {token}"))],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(terminate(&mut served).await, Some(0));
    let codes = collector
        .spans()
        .iter()
        .filter(|(s, _)| s.name == "request")
        .map(|(s, _)| attrs(s)["code"].clone())
        .collect();
    (collector, codes, served.log_text())
}

#[tokio::test]
async fn otlp_compression_gzip_from_the_environment_sends_gzipped_batches_the_collector_decodes() {
    let (collector, codes, log) =
        export_one_request_with_compression(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")]).await;
    let encodings = collector.encodings();
    assert!(!encodings.is_empty(), "{log}");
    assert!(
        encodings.iter().all(|e| e.as_deref() == Some("gzip")),
        "{encodings:?}"
    );
    assert_eq!(codes, ["forwarded"]);
}

/// Whether the log warns that `variable` is ignored.
fn warns_ignored(log: &str, variable: &str) -> bool {
    log.lines().any(|l| {
        l.contains("WARN") && l.contains(&format!("\"{variable}\"")) && l.contains("is ignored")
    })
}

#[tokio::test]
async fn otlp_compression_zstd_is_not_built_in_and_batches_go_uncompressed() {
    let (collector, codes, log) =
        export_one_request_with_compression(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")]).await;
    let encodings = collector.encodings();
    assert!(!encodings.is_empty(), "{log}");
    assert!(encodings.iter().all(Option::is_none), "{encodings:?}");
    assert_eq!(codes, ["forwarded"]);
    assert!(
        warns_ignored(&log, "OTEL_EXPORTER_OTLP_COMPRESSION"),
        "{log}"
    );
}

#[tokio::test]
async fn otlp_traces_compression_zstd_is_ignored_and_the_general_variables_gzip_applies() {
    let (collector, codes, log) = export_one_request_with_compression(&[
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
    ])
    .await;
    let encodings = collector.encodings();
    assert!(!encodings.is_empty(), "{log}");
    assert!(
        encodings.iter().all(|e| e.as_deref() == Some("gzip")),
        "{encodings:?}"
    );
    assert_eq!(codes, ["forwarded"]);
    assert!(
        warns_ignored(&log, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"),
        "{log}"
    );
    assert!(
        !warns_ignored(&log, "OTEL_EXPORTER_OTLP_COMPRESSION"),
        "{log}"
    );
}

#[tokio::test]
async fn a_collector_that_never_answers_holds_up_no_request_and_dropped_spans_are_logged() {
    let collector = Collector::start(false).await;
    let stub = Stub::start().await;
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let setup = Setup {
        upstream: Some(stub.base_url()),
        extra: format!(
            "[tracing]\notlp_endpoint = \"{}\"\nqueue_size = 4\nexport_timeout = \"1s\"\n",
            collector.endpoint()
        ),
        ..Setup::default()
    };
    let (_dir, mut served, client) = serve_ready(&sandbox, &setup, &[("RUST_LOG", "info")]).await;
    let token = bot_token(&sandbox);
    let auth = format!("Bearer {token}");
    for _ in 0..30 {
        let r = client
            .send(
                Method::GET,
                &format!("http://{}/v1/partner/jobs", served.addr),
                &[("authorization", &auth)],
                Bytes::new(),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    assert_eq!(stub.seen().len(), 30);
    assert_eq!(terminate(&mut served).await, Some(0));
    let log = served.log_text();
    assert!(
        log.contains("dropped_span_count"),
        "the spans dropped for a full queue are counted in the log:\n{log}"
    );
    assert!(collector.posts.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_malformed_traceparent_is_ignored_with_its_reason_logged_never_its_value() {
    let stub = Stub::start().await;
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let setup = Setup {
        upstream: Some(stub.base_url()),
        ..Setup::default()
    };
    let (_dir, mut served, client) = serve_ready(&sandbox, &setup, &[("RUST_LOG", "debug")]).await;
    let token = bot_token(&sandbox);
    let marker = "injected-into-logs";
    let bad = format!("00-{CALLER_TRACE}-{CALLER_PARENT}-01-{marker}");
    let r = client
        .send(
            Method::GET,
            &format!("http://{}/v1/partner/jobs", served.addr),
            &[
                ("authorization", &format!("Bearer {token}")),
                ("traceparent", &bad),
                ("tracestate", &format!("k={marker}")),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = stub.seen();
    let tp = seen[0].headers["traceparent"].to_str().unwrap().to_string();
    assert_ne!(parts(&tp).1, CALLER_TRACE);
    assert_eq!(terminate(&mut served).await, Some(0));
    let log = served.log_text();
    assert!(
        log.contains("traceparent ignored"),
        "the reason is logged:\n{log}"
    );
    assert!(
        !log.contains(marker),
        "the caller's value reached the log:\n{log}"
    );
}

#[tokio::test]
async fn tracing_settings_are_checked_with_their_key_paths() {
    let sandbox = Sandbox::start_local(SandboxOptions::default())
        .await
        .unwrap();
    let load = |tracing: &str| {
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup {
            extra: format!("[tracing]\n{tracing}\n"),
            ..Setup::default()
        };
        support::write_config(dir.path(), &sandbox, &setup);
        greenhouse_gateway::config::load(&dir.path().join("gateway.toml"))
    };
    let problems = |tracing: &str| -> Vec<(String, String)> {
        match load(tracing) {
            Ok(_) => Vec::new(),
            Err(list) => list.into_iter().map(|p| (p.key, p.message)).collect(),
        }
    };

    let bad = problems(
        r#"otlp_endpoint = "http://collector.internal:4318"
service_name = ""
sample_ratio = 1.5
queue_size = 0
export_timeout = "0s""#,
    );
    let keys: Vec<&str> = bad.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "tracing.otlp_endpoint",
            "tracing.service_name",
            "tracing.sample_ratio",
            "tracing.queue_size",
            "tracing.export_timeout"
        ],
        "{bad:#?}"
    );
    assert!(bad[0].1.contains("https://"), "{}", bad[0].1);

    let orphan = problems("sample_ratio = 0.5");
    assert_eq!(orphan.len(), 1, "{orphan:?}");
    assert_eq!(orphan[0].0, "tracing.sample_ratio");
    assert!(orphan[0].1.contains("tracing.otlp_endpoint"));

    let unknown = problems("otlp_endpoint = \"http://127.0.0.1:4318\"\nprotocol = \"grpc\"");
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert!(unknown[0].0.starts_with("tracing"), "{unknown:?}");

    let cfg =
        load("otlp_endpoint = \"http://127.0.0.1:4318\"\nsample_ratio = 0.25\nqueue_size = 100")
            .unwrap();
    let t = cfg.tracing.expect("export configured");
    assert_eq!(t.endpoint.to_string(), "http://127.0.0.1:4318/v1/traces");
    assert_eq!(t.service_name, "greenhouse-gateway");
    assert_eq!(t.sample_ratio, 0.25);
    assert_eq!(t.queue_size, 100);
    assert_eq!(t.export_timeout, Duration::from_secs(10));
    let https = load("otlp_endpoint = \"https://otel.example.com/v1/traces\"").unwrap();
    assert_eq!(
        https.tracing.unwrap().endpoint.to_string(),
        "https://otel.example.com/v1/traces"
    );
    assert!(
        load("").unwrap().tracing.is_none(),
        "export is off by default"
    );
}

#[tokio::test]
async fn a_reload_that_changes_tracing_is_refused_as_needing_a_restart() {
    let h = Harness::start().await;
    let path = h.dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{text}\n[tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\n"),
    )
    .unwrap();
    let r = h
        .client
        .send(
            Method::POST,
            &h.admin_url("/admin/reload"),
            &[],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text());
    assert_eq!(r.json()["result"], "restart_required");
    assert!(
        r.text()
            .contains("tracing (any key) changed: it applies only at a restart"),
        "{}",
        r.text()
    );
}
