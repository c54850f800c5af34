//! The gateway as a proxy: routing, header hygiene, limits, framing, upstream failures, HTTP/2,
//! TLS and graceful shutdown, through real sockets against a recording stub and the sandbox.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::json;
use support::{Harness, Setup, Stub, TestClient, email, raw_exchange};

async fn with_stub() -> (Harness, Stub) {
    let stub = Stub::start().await;
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        upstream_timeout: "1s",
        ..Setup::default()
    })
    .await;
    (h, stub)
}

#[tokio::test]
async fn upstream_receives_decided_identity_and_none_of_the_callers_credentials() {
    let (h, stub) = with_stub().await;
    let token = h.sourcing_token();
    let auth = format!("Bearer {token}");
    let r = h
        .client
        .send(
            Method::GET,
            &h.url("/v1/partner/jobs"),
            &[
                ("authorization", auth.as_str()),
                ("cookie", "session=secret-cookie"),
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-host", "evil.example"),
                ("forwarded", "for=6.6.6.6"),
                ("connection", "x-drop-me"),
                ("x-drop-me", "1"),
                ("proxy-authorization", "Basic eDp5"),
                ("x-request-id", "caller-req-1"),
                ("accept", "application/json"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.headers["x-request-id"], "caller-req-1");
    assert!(
        r.headers.get("x-upstream-hop").is_none(),
        "header named in upstream Connection must be dropped"
    );
    let seen = stub.seen();
    assert_eq!(seen.len(), 1);
    let got = &seen[0];
    assert_eq!(got.uri, "/v1/partner/jobs");
    let hdr = |n: &str| {
        got.headers
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(hdr("host"), [stub.addr.to_string()]);
    let upstream_auth = hdr("authorization");
    assert_eq!(upstream_auth.len(), 1);
    assert!(
        upstream_auth[0].starts_with("Bearer "),
        "oauth credential expected"
    );
    assert!(
        !upstream_auth[0].contains(&token),
        "caller JWT must never reach the upstream"
    );
    assert_eq!(hdr("on-behalf-of"), [email("sourcing.bot(at)example.com")]);
    assert_eq!(hdr("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(hdr("x-request-id"), ["caller-req-1"]);
    assert_eq!(hdr("accept"), ["application/json"]);
    for absent in [
        "cookie",
        "x-forwarded-host",
        "forwarded",
        "x-drop-me",
        "proxy-authorization",
        "connection",
    ] {
        assert!(hdr(absent).is_empty(), "{absent} reached the upstream");
    }
    let all = format!("{:?}", got.headers);
    assert!(
        !all.contains(&token[token.len() - 20..]),
        "JWT signature seen upstream"
    );
}

#[tokio::test]
async fn declared_query_parameters_pass_unchanged_and_undeclared_are_refused_without_upstream_call()
{
    let (h, stub) = with_stub().await;
    let t = h.sourcing_token();
    let ok = h
        .get(
            "/v1/partner/candidates?external_ids=a,b&candidate_ids=1,2",
            &t,
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        stub.seen()[0].uri,
        "/v1/partner/candidates?external_ids=a,b&candidate_ids=1,2"
    );
    let bad = h
        .get("/v1/partner/candidates?external_ids=a&page=2&debug=1", &t)
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(bad.code(), "bad_request");
    let detail = bad.json()["detail"].as_str().unwrap_or("").to_string();
    assert!(
        detail.contains("page") && detail.contains("debug"),
        "{detail}"
    );
    assert_eq!(stub.seen().len(), 1, "refused request reached the upstream");
}

#[tokio::test]
async fn unknown_path_is_404_and_wrong_method_is_405_with_allow() {
    let (h, stub) = with_stub().await;
    let t = h.sourcing_token();
    let r = h.get("/v1/partner/nope", &t).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "route_not_found")
    );
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let r = h.get("/other/prefix/jobs", &t).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let auth = format!("Bearer {t}");
    let r = h
        .client
        .send(
            Method::DELETE,
            &h.url("/v1/partner/candidates"),
            &[("authorization", &auth)],
            Bytes::new(),
        )
        .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
    );
    assert_eq!(r.headers["allow"], "GET, POST");
    assert!(stub.seen().is_empty());
}

#[tokio::test]
async fn oversized_declared_body_is_413_before_authentication_and_without_upstream_call() {
    let (h, stub) = with_stub().await;
    // No token at all: the size check comes first, and nothing is read.
    let req = format!(
        "POST /v1/partner/candidates HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        20 * 1024 * 1024
    );
    let out = raw_exchange(h.gateway.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("payload_too_large"), "{out}");
    assert!(stub.seen().is_empty());
}

#[tokio::test]
async fn chunked_body_crossing_the_limit_is_413_without_upstream_call() {
    let stub = Stub::start().await;
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        extra: "[limits]\nmax_body_bytes = 1024\n".into(),
        ..Setup::default()
    })
    .await;
    let t = h.sourcing_token();
    let chunk = "a".repeat(800);
    let req = format!(
        "POST /v1/partner/candidates HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len(),
        chunk.len()
    );
    let out = raw_exchange(h.gateway.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(stub.seen().is_empty());
}

#[tokio::test]
async fn malformed_request_targets_and_host_headers_are_400() {
    let (h, stub) = with_stub().await;
    let t = h.sourcing_token();
    let cases = [
        format!(
            "GET http://evil.example/v1/partner/jobs HTTP/1.1\r\nHost: evil.example\r\nAuthorization: Bearer {t}\r\n\r\n"
        ),
        format!("OPTIONS * HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\n\r\n"),
        format!(
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nAuthorization: Bearer {t}\r\n\r\n"
        ),
        format!("GET /v1/partner/jobs HTTP/1.1\r\nAuthorization: Bearer {t}\r\n\r\n"),
        format!(
            "GET /v1/partner/jobs HTTP/1.1\r\nHost: a\r\nHost: b\r\nAuthorization: Bearer {t}\r\n\r\n"
        ),
    ];
    for req in cases {
        let out = raw_exchange(h.gateway.addr, req.as_bytes(), Duration::from_secs(3)).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{req:?} gave {out}");
    }
    assert!(stub.seen().is_empty());
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let (h, _stub) = with_stub().await;
    let req = format!(
        "GET /v1/partner/jobs HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let out = raw_exchange(h.gateway.addr, req.as_bytes(), Duration::from_secs(3)).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
}

#[tokio::test]
async fn slow_request_head_is_cut_off_by_the_header_read_timeout() {
    let stub = Stub::start().await;
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        listen_extra: "header_read_timeout = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    let started = std::time::Instant::now();
    // The head never completes; the server must close the connection by itself.
    let out = raw_exchange(
        h.gateway.addr,
        b"GET /v1/partner/jobs HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "connection was not closed: {out:?}"
    );
    assert!(!out.contains("200 OK"));
}

/// Reads from `s` into `out` until it holds `n` response status lines (or panics, at
/// `deadline` or when the connection ends first).
async fn read_answers(
    s: &mut tokio::net::TcpStream,
    out: &mut Vec<u8>,
    n: usize,
    deadline: tokio::time::Instant,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16 * 1024];
    while out.windows(9).filter(|w| w == b"HTTP/1.1 ").count() < n {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(k)) if k > 0 => out.extend_from_slice(&buf[..k]),
            other => panic!(
                "connection ended early ({other:?}): {}",
                String::from_utf8_lossy(out)
            ),
        }
    }
}

/// One keep-alive connection whose requests arrive as a client's writes fall: a head cut in the
/// middle of a header and a body cut in two (each piece a read of its own), two requests in one
/// write, and one after the connection sat idle (its read buffer given back). Each is answered
/// once, in order, and the body reaches Greenhouse byte for byte.
#[tokio::test]
async fn requests_in_pieces_pipelined_or_after_a_pause_are_each_answered_in_order() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start().await;
    let sourcing = h.sourcing_token();
    let agency = h.token("svc-agency-connector", json!({}));
    let body = json!({"external_id": "ext-pieces", "first_name": "Ada", "last_name": "Example"})
        .to_string();
    let post = format!(
        "POST /v1/partner/candidates HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {agency}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let get = |id: &str| {
        format!(
            "GET /v1/partner/jobs HTTP/1.1\r\nHost: x\r\nX-Request-Id: {id}\r\nAuthorization: Bearer {sourcing}\r\n\r\n"
        )
    };
    let mut s = tokio::net::TcpStream::connect(h.gateway.addr)
        .await
        .unwrap();
    s.set_nodelay(true).unwrap();
    let head_end = post.find("\r\n\r\n").unwrap() + 4;
    let cut_head = post.find("Content-Type").unwrap() + 7;
    let cut_body = head_end + body.len() / 2;
    for piece in [
        &post[..cut_head],
        &post[cut_head..head_end],
        &post[head_end..cut_body],
        &post[cut_body..],
    ] {
        s.write_all(piece.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    s.write_all(format!("{}{}", get("piece-2"), get("piece-3")).as_bytes())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    read_answers(&mut s, &mut out, 3, deadline).await;
    // Idle long enough for every read to have found nothing; then one more request.
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(get("piece-4").as_bytes()).await.unwrap();
    read_answers(&mut s, &mut out, 4, deadline).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["201", "200", "200", "200"], "{text}");
    let ids: Vec<&str> = text
        .match_indices("x-request-id: piece-")
        .map(|(i, _)| &text[i + 14..i + 21])
        .collect();
    assert_eq!(ids, ["piece-2", "piece-3", "piece-4"], "{text}");
    let created = h
        .sandbox
        .received()
        .into_iter()
        .find(|r| r.method == "POST")
        .expect("the create reached the sandbox");
    assert_eq!(&created.body[..], body.as_bytes());
}

#[tokio::test]
async fn upstream_down_is_502_upstream_error() {
    // A port freed on 127.0.0.2: every other server in the tests binds 127.0.0.1, so nothing
    // can take this address again while the test runs (a freed 127.0.0.1 port could be).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let h = Harness::start_with(Setup {
        upstream: Some(format!("http://127.0.0.2:{port}/v1/partner")),
        ..Setup::default()
    })
    .await;
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_GATEWAY, "upstream_error")
    );
}

#[tokio::test]
async fn slow_upstream_is_504_upstream_timeout() {
    let (h, stub) = with_stub().await;
    stub.set_reply(200, "[]", Duration::from_secs(3));
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
    );
}

#[tokio::test]
async fn upstream_error_statuses_pass_through_with_their_body() {
    let (h, stub) = with_stub().await;
    stub.set_reply(
        404,
        r#"{"errors":[{"message":"Not found"}]}"#,
        Duration::ZERO,
    );
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["errors"][0]["message"], "Not found");
}

#[tokio::test]
async fn http2_request_is_served_and_forwarded() {
    let (h, stub) = with_stub().await;
    let client = TestClient::http2_only();
    let auth = format!("Bearer {}", h.sourcing_token());
    let r = client
        .send(
            Method::GET,
            &h.url("/v1/partner/jobs"),
            &[("authorization", &auth)],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.version, http::Version::HTTP_2);
    assert_eq!(stub.seen().len(), 1);
}

#[tokio::test]
async fn every_gateway_error_is_problem_json_with_request_id() {
    let (h, _stub) = with_stub().await;
    let r = h
        .client
        .send(Method::GET, &h.url("/v1/partner/jobs"), &[], Bytes::new())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let v = r.json();
    assert_eq!(v["code"], "missing_token");
    assert_eq!(v["type"], "urn:greenhouse-gateway:problem:missing_token");
    assert_eq!(v["status"], 401);
    assert_eq!(
        v["request_id"].as_str(),
        r.headers["x-request-id"].to_str().ok()
    );
    assert!(
        r.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
}

#[tokio::test]
async fn through_the_sandbox_oauth_and_basic_credentials_both_work_end_to_end() {
    let h = Harness::start().await;
    let sourcing = h.sourcing_token();
    let r = h.get("/v1/partner/jobs", &sourcing).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(r.json().as_array().is_some_and(|a| !a.is_empty()));
    assert!(
        r.headers.contains_key("x-ratelimit-remaining"),
        "sandbox rate-limit headers pass through"
    );
    let body = json!({"external_id": "ext-42", "first_name": "Ada", "last_name": "Example"});
    let agency = h.token("svc-agency-connector", json!({}));
    let created = h.post_json("/v1/partner/candidates", &agency, &body).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let upstream = h.sandbox.received();
    let last = upstream.last().unwrap();
    assert!(
        last.header("authorization").unwrap().starts_with("Basic "),
        "agency uses the partner key"
    );
    assert_eq!(
        last.header("on-behalf-of"),
        Some(email("agency.liaison(at)example.com").as_str())
    );
    assert_eq!(
        &last.body[..],
        body.to_string().as_bytes(),
        "body forwarded byte for byte"
    );
    let found = h
        .get("/v1/partner/candidates?external_ids=ext-42", &sourcing)
        .await;
    assert_eq!(found.status, StatusCode::OK);
    assert_eq!(found.json()[0]["external_id"], "ext-42");
}

#[tokio::test]
async fn tls_listener_serves_http2_and_http1_by_alpn_and_http1_without_it() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let listen_extra = format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    );
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        listen_extra,
        ..Setup::default()
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let token = h.sourcing_token();
    for h2 in [true, false] {
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_only();
        let connector = if h2 {
            builder.enable_http2().build()
        } else {
            builder.enable_http1().build()
        };
        let client: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(h2)
                .build(connector);
        let req = http::Request::get(format!(
            "https://localhost:{}/v1/partner/jobs",
            h.gateway.addr.port()
        ))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
        let r = support::collect(client.request(req).await.unwrap()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            r.version,
            if h2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            }
        );
    }
    // A client that offers no ALPN at all speaks HTTP/1.1.
    let tcp = tokio::net::TcpStream::connect(h.gateway.addr)
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/v1/partner/jobs")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let r = support::collect(send.send_request(req).await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.version, http::Version::HTTP_11);
    assert_eq!(stub.seen().len(), 3);
}

#[tokio::test]
async fn graceful_shutdown_lets_the_in_flight_request_finish_and_stops_accepting() {
    let (h, stub) = with_stub().await;
    stub.set_reply(200, "[\"late\"]", Duration::from_millis(700));
    let client = h.client.clone();
    let url = h.url("/v1/partner/jobs");
    let auth = format!("Bearer {}", h.sourcing_token());
    let in_flight = tokio::spawn(async move {
        client
            .send(Method::GET, &url, &[("authorization", &auth)], Bytes::new())
            .await
    });
    // Wait until the request has reached the upstream, so it is truly in flight.
    for _ in 0..200 {
        if !stub.seen().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stub.seen().len(), 1);
    let addr = h.gateway.addr;
    let Harness {
        gateway,
        sandbox: _sb,
        dir: _dir,
        client: _c,
    } = h;
    gateway.shutdown().await;
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "[\"late\"]");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener still accepting after shutdown"
    );
}

#[tokio::test]
async fn admin_listener_serves_health_readiness_and_metrics() {
    let (h, _stub) = with_stub().await;
    let _ = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    let c = TestClient::new();
    let health = c
        .send(Method::GET, &h.admin_url("/healthz"), &[], Bytes::new())
        .await;
    assert_eq!(health.status, StatusCode::OK);
    let ready = c
        .send(Method::GET, &h.admin_url("/readyz"), &[], Bytes::new())
        .await;
    assert_eq!(ready.status, StatusCode::OK, "{}", ready.text());
    assert_eq!(ready.json()["ready"], true);
    let m = c
        .send(Method::GET, &h.admin_url("/metrics"), &[], Bytes::new())
        .await
        .text();
    assert!(m.contains("gateway_requests_total{team=\"sourcing\",operation=\"listPartnerJobs\",code=\"forwarded\"} 1"), "{m}");
    assert!(
        m.contains("gateway_request_duration_seconds_bucket{"),
        "{m}"
    );
    // The admin surface is not the gateway: it is not reachable on the gateway listener.
    let r = c
        .send(Method::GET, &h.url("/metrics"), &[], Bytes::new())
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn https_upstream_with_an_extra_ca_is_spoken_to_over_http2_when_it_offers_it() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let ca = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let versions = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let v2 = versions.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, versions) = (acceptor.clone(), v2.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        versions.lock().unwrap().push(req.version());
                        async {
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(Bytes::from_static(b"[]")),
                            ))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let h = Harness::start_with(Setup {
        upstream: Some(format!("https://localhost:{port}/v1/partner")),
        extra: String::new(),
        ..Setup::default()
    })
    .await;
    // Without the extra CA the upstream's certificate is not trusted: 502.
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_GATEWAY, "upstream_error")
    );
    drop(h);
    let h = Harness::start_with(Setup {
        upstream: Some(format!("https://localhost:{port}/v1/partner")),
        upstream_ca: Some(ca.display().to_string()),
        ..Setup::default()
    })
    .await;
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(versions.lock().unwrap().as_slice(), [http::Version::HTTP_2]);
    server.abort();
}

#[tokio::test]
async fn body_that_never_completes_is_408_after_the_body_read_timeout_without_upstream_call() {
    let stub = Stub::start().await;
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        listen_extra: "body_read_timeout = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    let t = h.sourcing_token();
    let req = format!(
        "POST /v1/partner/candidates HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"external_id\""
    );
    let out = raw_exchange(h.gateway.addr, req.as_bytes(), Duration::from_secs(10)).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(stub.seen().is_empty());
}

#[tokio::test]
async fn headers_with_underscores_never_reach_the_upstream() {
    let (h, stub) = with_stub().await;
    let auth = format!("Bearer {}", h.sourcing_token());
    let r = h
        .client
        .send(
            Method::GET,
            &h.url("/v1/partner/jobs"),
            &[
                ("authorization", auth.as_str()),
                ("on_behalf_of", "spoofed.user@example.com"),
                ("x_forwarded_for", "6.6.6.6"),
                ("x_custom_thing", "1"),
                ("x-custom-thing", "kept"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = stub.seen();
    let got = &seen[0];
    let underscored: Vec<&str> = got
        .headers
        .keys()
        .map(|k| k.as_str())
        .filter(|k| k.contains('_'))
        .collect();
    assert!(underscored.is_empty(), "forwarded: {underscored:?}");
    assert_eq!(got.headers["x-custom-thing"], "kept");
    assert_eq!(got.headers.get_all("on-behalf-of").iter().count(), 1);
    assert_eq!(
        got.headers["on-behalf-of"],
        email("sourcing.bot(at)example.com")
    );
}

#[tokio::test]
async fn ambiguous_paths_are_refused_and_canonical_ones_forwarded_exactly_as_routed() {
    let (h, stub) = with_stub().await;
    let t = h.sourcing_token();
    for path in [
        "/v1/partner//jobs",
        "//v1/partner/jobs",
        "/v1/partner/./jobs",
        "/v1/partner/x/../jobs",
        "/v1/partner/%2e/jobs",
        "/v1/partner/%2E%2E/v1/partner/jobs",
        "/v1/partner/x%2f..%2fjobs",
        "/v1/partner/x%5c..%5cjobs",
        "/v1/partner/jobs;a=b",
        "/v1/partner/jobs%3b",
    ] {
        let r = h.get(path, &t).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{path}: {}", r.text());
        assert_eq!(r.code(), "bad_request", "{path}");
        assert!(!r.text().contains(path), "the error echoes the path");
    }
    assert!(
        stub.seen().is_empty(),
        "an ambiguous path reached the upstream"
    );
    let r = h.get("/v1/partner/jobs/", &t).await;
    assert_eq!(
        r.status,
        StatusCode::NOT_FOUND,
        "a trailing slash is another path"
    );
    let r = h.get("/v1/partner/candidates?candidate_ids=1,2", &t).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = stub.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/v1/partner/candidates?candidate_ids=1,2");
}

/// An upstream that answers every request with `response`, exactly these bytes, then closes:
/// what a misbehaving server sends, which no HTTP library would write. Returns its base URL and
/// how many requests it has read.
async fn raw_upstream(
    response: &'static [u8],
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                seen.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(response).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/v1/partner"), hits)
}

fn last_audit_record(h: &Harness) -> serde_json::Value {
    let text = std::fs::read_to_string(h.dir.path().join("audit/audit.jsonl")).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[tokio::test]
async fn upstream_answer_with_content_length_and_transfer_encoding_reaches_callers_whole_without_the_length()
 {
    const BODY: &str = r#"[{"id":1,"name":"Engineer"},{"id":2,"name":"Designer"}]"#;
    // Content-Length says 3; the chunked body (which frames the message, RFC 9112 6.3) is whole.
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n37\r\n[{\"id\":1,\"name\":\"Engineer\"},{\"id\":2,\"name\":\"Designer\"}]\r\n0\r\n\r\n";
    assert_eq!(BODY.len(), 0x37);
    let (upstream, hits) = raw_upstream(ANSWER).await;
    let h = Harness::start_with(Setup {
        upstream: Some(upstream),
        ..Setup::default()
    })
    .await;
    // HTTP/1.1, read raw: no Content-Length: 3 and the whole body.
    let raw = raw_exchange(
        h.gateway.addr,
        format!(
            "GET /v1/partner/jobs HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            h.sourcing_token()
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    let (head, _) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("content-length: 3"),
        "{head}"
    );
    assert!(raw.contains(BODY), "{raw}");
    let rec = last_audit_record(&h);
    assert_eq!(
        (rec["decision"].as_str(), rec["code"].as_str()),
        (Some("forwarded"), None),
        "complete, not response_incomplete: {rec}"
    );
    assert_eq!(rec["response_bytes"], BODY.len(), "{rec}");
    // HTTP/2: a whole answer, not a protocol error.
    let auth = format!("Bearer {}", h.sourcing_token());
    let r = TestClient::http2_only()
        .send(
            Method::GET,
            &h.url("/v1/partner/jobs"),
            &[("authorization", &auth)],
            Bytes::new(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), BODY);
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn unsolicited_101_from_the_upstream_is_502_upstream_error_and_audited() {
    const ANSWER: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
    let (upstream, hits) = raw_upstream(ANSWER).await;
    let h = Harness::start_with(Setup {
        upstream: Some(upstream),
        ..Setup::default()
    })
    .await;
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_GATEWAY, "upstream_error"),
        "{}",
        r.text()
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    let rec = last_audit_record(&h);
    assert_eq!(
        (rec["code"].as_str(), rec["status"].as_u64()),
        (Some("upstream_error"), Some(502)),
        "{rec}"
    );
}
