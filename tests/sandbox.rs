//! The sandbox over real sockets on 127.0.0.1:0: the token endpoint, the dev IdP, the Partner
//! API emulator, rate limiting, fault injection and the `/_sandbox/` hooks.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use greenhouse_gateway::sandbox::{Sandbox, SandboxOptions};
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

type Error = Box<dyn std::error::Error + Send + Sync>;
type TestResult = Result<(), Error>;

const CLIENT_ID: &str = "gateway-dev";
const CLIENT_SECRET: &str = "dev-client-secret";
const PARTNER_KEY: &str = "dev-partner-key";
const INVALID_JSON: &str = "Your request included invalid JSON.";

// ----- a small HTTP/1.1 client: one connection per request -----

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Result<Value, Error> {
        Ok(serde_json::from_slice(&self.body)?)
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn header_u64(&self, name: &str) -> Result<u64, Error> {
        Ok(self
            .header(name)
            .ok_or_else(|| format!("no {name} header"))?
            .parse()?)
    }

    /// The `field` of the first Greenhouse error entry.
    fn error_field(&self) -> Result<Value, Error> {
        Ok(self.json()?["errors"][0]["field"].clone())
    }
}

async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Reply, Error> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let (parts, body) = sender.send_request(req).await?.into_parts();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await?.to_bytes(),
    })
}

fn request(sb: &Sandbox, method: Method, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", sb.addr().to_string())
}

async fn get(sb: &Sandbox, path: &str) -> Result<Reply, Error> {
    send(
        sb.addr(),
        request(sb, Method::GET, path).body(Full::default())?,
    )
    .await
}

async fn post_json(sb: &Sandbox, path: &str, body: &Value) -> Result<Reply, Error> {
    let req = request(sb, Method::POST, path)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    send(sb.addr(), req).await
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `POST /oauth/token` with a form body and optional extra headers.
async fn token_request(sb: &Sandbox, form: &str, headers: &[(&str, &str)]) -> Result<Reply, Error> {
    let mut req = request(sb, Method::POST, "/oauth/token")
        .header("content-type", "application/x-www-form-urlencoded");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(
        sb.addr(),
        req.body(Full::new(Bytes::from(form.to_owned())))?,
    )
    .await
}

/// A fresh access token for the default client, through `client_secret_basic`.
async fn fetch_token(sb: &Sandbox) -> Result<String, Error> {
    let auth = basic(CLIENT_ID, CLIENT_SECRET);
    let reply = token_request(
        sb,
        "grant_type=client_credentials",
        &[("authorization", &auth)],
    )
    .await?;
    if reply.status != StatusCode::OK {
        return Err(format!("token endpoint answered {}", reply.status).into());
    }
    let token = reply.json()?["access_token"].as_str().map(str::to_owned);
    token.ok_or_else(|| "no access_token".into())
}

/// A Partner API call: `op` is the path below `/v1/partner`.
struct Call<'a> {
    method: Method,
    op: &'a str,
    auth: Option<String>,
    on_behalf_of: Vec<String>,
    body: Option<Bytes>,
    extra: Vec<(&'a str, &'a str)>,
}

impl<'a> Call<'a> {
    fn new(method: Method, op: &'a str) -> Self {
        Call {
            method,
            op,
            auth: None,
            on_behalf_of: Vec::new(),
            body: None,
            extra: Vec::new(),
        }
    }

    fn get(op: &'a str) -> Self {
        Call::new(Method::GET, op)
    }

    fn post(op: &'a str, body: &Value) -> Self {
        Call::new(Method::POST, op).raw_body(body.to_string())
    }

    fn auth(mut self, value: String) -> Self {
        self.auth = Some(value);
        self
    }

    fn obo(mut self, email: &str) -> Self {
        self.on_behalf_of.push(email.to_owned());
        self
    }

    fn raw_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = Some(body.into());
        self
    }

    fn header(mut self, name: &'a str, value: &'a str) -> Self {
        self.extra.push((name, value));
        self
    }

    async fn send(self, sb: &Sandbox) -> Result<Reply, Error> {
        let mut req = request(sb, self.method, &format!("/v1/partner{}", self.op));
        if let Some(auth) = &self.auth {
            req = req.header("authorization", auth);
        }
        for email in &self.on_behalf_of {
            req = req.header("on-behalf-of", email);
        }
        if self.body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (name, value) in &self.extra {
            req = req.header(*name, *value);
        }
        send(
            sb.addr(),
            req.body(Full::new(self.body.unwrap_or_default()))?,
        )
        .await
    }
}

async fn sandbox() -> Result<Sandbox, Error> {
    Ok(Sandbox::start_local(SandboxOptions::default()).await?)
}

fn first_user(sb: &Sandbox) -> Result<String, Error> {
    sb.users()
        .into_iter()
        .next()
        .ok_or_else(|| "no seeded users".into())
}

fn assert_basic_challenge(reply: &Reply) {
    assert_eq!(
        reply.header("www-authenticate"),
        Some("Basic realm=\"Greenhouse\"")
    );
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
fn looks_like_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z'
        && [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
            .iter()
            .all(|&i| b[i].is_ascii_digit())
}

// ----- URLs -----

#[tokio::test]
async fn urls_point_at_the_bound_loopback_port() -> TestResult {
    let sb = sandbox().await?;
    let port = sb.addr().port();
    assert_eq!(sb.base_url(), format!("http://127.0.0.1:{port}/v1/partner"));
    assert_eq!(
        sb.token_url(),
        format!("http://127.0.0.1:{port}/oauth/token")
    );
    assert_eq!(
        sb.jwks_url(),
        format!("http://127.0.0.1:{port}/.well-known/jwks.json")
    );
    assert_eq!(sb.issuer(), format!("http://127.0.0.1:{port}"));

    let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    let port = listener.local_addr()?.port();
    let opts = SandboxOptions {
        issuer: Some("https://idp.dev.invalid".to_owned()),
        ..SandboxOptions::default()
    };
    let wide = Sandbox::spawn(listener, opts).await?;
    assert_eq!(
        wide.base_url(),
        format!("http://127.0.0.1:{port}/v1/partner")
    );
    assert_eq!(wide.issuer(), "https://idp.dev.invalid");
    let discovery = get(&wide, "/.well-known/openid-configuration")
        .await?
        .json()?;
    assert_eq!(discovery["issuer"], "https://idp.dev.invalid");
    assert_eq!(discovery["jwks_uri"], json!(wide.jwks_url()));
    Ok(())
}

#[tokio::test]
async fn shutdown_stops_answering() -> TestResult {
    let sb = sandbox().await?;
    let addr = sb.addr();
    assert_eq!(
        get(&sb, "/.well-known/jwks.json").await?.status,
        StatusCode::OK
    );
    sb.shutdown();
    // The abort takes effect once the runtime polls again; give it a few turns, no sleeping.
    for _ in 0..100 {
        let req = Request::get("/.well-known/jwks.json")
            .header("host", addr.to_string())
            .body(Full::default())?;
        if send(addr, req).await.is_err() {
            return Ok(());
        }
        tokio::task::yield_now().await;
    }
    Err("the sandbox still answers after shutdown".into())
}

#[tokio::test]
async fn http2_prior_knowledge_is_served_on_the_same_port() -> TestResult {
    let sb = sandbox().await?;
    let stream = TcpStream::connect(sb.addr()).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(format!("{}/jobs", sb.base_url()))
        .header("authorization", basic(PARTNER_KEY, ""))
        .header("on-behalf-of", first_user(&sb)?)
        .body(Full::<Bytes>::default())?;
    let resp = sender.send_request(req).await?;
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await?.to_bytes();
    let jobs: Value = serde_json::from_slice(&body)?;
    assert!(jobs.as_array().is_some_and(|j| j.len() >= 4));
    Ok(())
}

// ----- token endpoint -----

#[tokio::test]
async fn client_secret_post_and_basic_both_issue_tokens() -> TestResult {
    let sb = sandbox().await?;
    let via_basic = token_request(
        &sb,
        "grant_type=client_credentials",
        &[("authorization", &basic(CLIENT_ID, CLIENT_SECRET))],
    )
    .await?;
    let via_post = token_request(
        &sb,
        &format!(
            "grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"
        ),
        &[],
    )
    .await?;
    let mut tokens = Vec::new();
    for reply in [&via_basic, &via_post] {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header("cache-control"), Some("no-store"));
        let body = reply.json()?;
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["expires_in"], 3600);
        assert_eq!(body["scope"], "partner");
        assert!(body["expires_at"].as_str().is_some_and(looks_like_rfc3339));
        let token = body["access_token"].as_str().ok_or("no access_token")?;
        assert!(token.len() >= 43, "token too short: {} chars", token.len());
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        tokens.push(token.to_owned());
    }
    assert_ne!(tokens[0], tokens[1]);
    for token in &tokens {
        let reply = Call::get("/current_user")
            .auth(bearer(token))
            .obo(&first_user(&sb)?)
            .send(&sb)
            .await?;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(sb.token_requests().len(), 2);
    assert!(
        sb.received()
            .iter()
            .all(|r| r.path == "/v1/partner/current_user")
    );
    Ok(())
}

#[tokio::test]
async fn basic_client_credentials_are_form_urldecoded() -> TestResult {
    let opts = SandboxOptions {
        clients: vec![("svc:reports".to_owned(), "s3cr+t/=".to_owned())],
        ..SandboxOptions::default()
    };
    let sb = Sandbox::start_local(opts).await?;
    let auth = basic("svc%3Areports", "s3cr%2Bt%2F%3D");
    let reply = token_request(
        &sb,
        "grant_type=client_credentials",
        &[("authorization", &auth)],
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK);
    Ok(())
}

#[tokio::test]
async fn token_endpoint_with_wrong_secret_answers_invalid_client_401() -> TestResult {
    let sb = sandbox().await?;
    let auth = basic(CLIENT_ID, "not-the-secret");
    let reply = token_request(
        &sb,
        "grant_type=client_credentials",
        &[("authorization", &auth)],
    )
    .await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()?["error"], "invalid_client");
    assert!(reply.json()?["error_description"].is_string());
    assert_basic_challenge(&reply);
    assert_eq!(reply.header("cache-control"), Some("no-store"));

    let form =
        format!("grant_type=client_credentials&client_id=nobody&client_secret={CLIENT_SECRET}");
    let reply = token_request(&sb, &form, &[]).await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()?["error"], "invalid_client");
    Ok(())
}

#[tokio::test]
async fn token_endpoint_without_client_authentication_answers_invalid_client() -> TestResult {
    let sb = sandbox().await?;
    let reply = token_request(&sb, "grant_type=client_credentials", &[]).await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()?["error"], "invalid_client");
    Ok(())
}

#[tokio::test]
async fn token_endpoint_with_basic_and_form_secret_answers_invalid_request() -> TestResult {
    let sb = sandbox().await?;
    let auth = basic(CLIENT_ID, CLIENT_SECRET);
    let form = format!(
        "grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"
    );
    let reply = token_request(&sb, &form, &[("authorization", &auth)]).await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()?["error"], "invalid_request");
    Ok(())
}

#[tokio::test]
async fn token_endpoint_with_password_grant_answers_unsupported_grant_type() -> TestResult {
    let sb = sandbox().await?;
    let auth = basic(CLIENT_ID, CLIENT_SECRET);
    let reply = token_request(
        &sb,
        "grant_type=password&username=a&password=b",
        &[("authorization", &auth)],
    )
    .await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()?["error"], "unsupported_grant_type");
    Ok(())
}

#[tokio::test]
async fn token_endpoint_without_grant_type_answers_invalid_request() -> TestResult {
    let sb = sandbox().await?;
    let auth = basic(CLIENT_ID, CLIENT_SECRET);
    let reply = token_request(&sb, "scope=partner", &[("authorization", &auth)]).await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()?["error"], "invalid_request");

    let reply = token_request(
        &sb,
        "grant_type=client_credentials&grant_type=client_credentials",
        &[("authorization", &auth)],
    )
    .await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "repeated parameter");
    assert_eq!(reply.json()?["error"], "invalid_request");
    Ok(())
}

#[tokio::test]
async fn token_endpoint_echoes_known_scopes_and_rejects_unknown_ones() -> TestResult {
    let sb = sandbox().await?;
    let auth = basic(CLIENT_ID, CLIENT_SECRET);
    let reply = token_request(
        &sb,
        "grant_type=client_credentials&scope=jobs.view+candidates.create",
        &[("authorization", &auth)],
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()?["scope"], "jobs.view candidates.create");

    let reply = token_request(
        &sb,
        "grant_type=client_credentials&scope=admin",
        &[("authorization", &auth)],
    )
    .await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()?["error"], "invalid_scope");
    Ok(())
}

#[tokio::test]
async fn token_endpoint_answers_get_with_405() -> TestResult {
    let sb = sandbox().await?;
    let reply = get(&sb, "/oauth/token").await?;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), Some("POST"));
    Ok(())
}

#[tokio::test]
async fn token_endpoint_faults_drop_the_connection_then_answer_the_status() -> TestResult {
    let sb = sandbox().await?;
    sb.faults().token_endpoint_fail(1, 0);
    assert!(
        fetch_token(&sb).await.is_err(),
        "status 0 must drop the connection"
    );

    sb.faults().token_endpoint_fail(2, 503);
    let auth = basic(CLIENT_ID, CLIENT_SECRET);
    for _ in 0..2 {
        let reply = token_request(
            &sb,
            "grant_type=client_credentials",
            &[("authorization", &auth)],
        )
        .await?;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(reply.json()?["error"], "temporarily_unavailable");
    }
    fetch_token(&sb).await?;
    assert_eq!(sb.token_requests().len(), 4);
    Ok(())
}

// ----- partner authentication -----

#[tokio::test]
async fn partner_call_without_credentials_is_401_with_basic_challenge() -> TestResult {
    let sb = sandbox().await?;
    let reply = Call::get("/jobs").obo(&first_user(&sb)?).send(&sb).await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        reply.json()?,
        json!({"errors":[{"message":"Invalid credentials"}]})
    );
    assert_basic_challenge(&reply);
    assert!(reply.header("x-ratelimit-limit").is_none());

    let reply = Call::get("/jobs")
        .auth(bearer("not-a-token-we-issued"))
        .obo(&first_user(&sb)?)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    Ok(())
}

#[tokio::test]
async fn basic_partner_key_is_accepted() -> TestResult {
    let sb = sandbox().await?;
    let reply = Call::get("/jobs")
        .auth(basic(PARTNER_KEY, ""))
        .obo(&first_user(&sb)?)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-ratelimit-limit"), Some("50"));

    for auth in [basic("unknown-key", ""), basic(PARTNER_KEY, "a-password")] {
        let reply = Call::get("/jobs")
            .auth(auth)
            .obo(&first_user(&sb)?)
            .send(&sb)
            .await?;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_basic_challenge(&reply);
    }
    Ok(())
}

#[tokio::test]
async fn partner_call_without_on_behalf_of_is_401() -> TestResult {
    let sb = sandbox().await?;
    let token = fetch_token(&sb).await?;
    let reply = Call::get("/jobs").auth(bearer(&token)).send(&sb).await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.error_field()?, "On-Behalf-Of");
    assert_basic_challenge(&reply);
    // The credential was good, so the answer still carries the rate-limit counters.
    assert!(reply.header("x-ratelimit-remaining").is_some());
    Ok(())
}

#[tokio::test]
async fn partner_call_with_unknown_on_behalf_of_is_401() -> TestResult {
    let sb = sandbox().await?;
    let reply = Call::get("/jobs")
        .auth(basic(PARTNER_KEY, ""))
        .obo("nobody@example.com")
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.error_field()?, "On-Behalf-Of");
    Ok(())
}

#[tokio::test]
async fn partner_call_on_behalf_of_disabled_user_is_401() -> TestResult {
    let sb = sandbox().await?;
    let disabled = sb.disabled_users();
    let email = disabled.first().ok_or("no disabled user seeded")?;
    assert!(!sb.users().contains(email));
    let reply = Call::get("/jobs")
        .auth(basic(PARTNER_KEY, ""))
        .obo(email)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.error_field()?, "On-Behalf-Of");
    Ok(())
}

#[tokio::test]
async fn partner_call_with_two_on_behalf_of_headers_is_401() -> TestResult {
    let sb = sandbox().await?;
    let users = sb.users();
    let reply = Call::get("/jobs")
        .auth(basic(PARTNER_KEY, ""))
        .obo(&users[0])
        .obo(&users[1])
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.error_field()?, "On-Behalf-Of");
    Ok(())
}

#[tokio::test]
async fn revoked_token_is_401() -> TestResult {
    let sb = sandbox().await?;
    let user = first_user(&sb)?;
    let token = fetch_token(&sb).await?;
    let call = || Call::get("/current_user").obo(&user);
    assert_eq!(
        call().auth(bearer(&token)).send(&sb).await?.status,
        StatusCode::OK
    );
    sb.revoke_all_tokens();
    let reply = call().auth(bearer(&token)).send(&sb).await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_basic_challenge(&reply);
    let fresh = fetch_token(&sb).await?;
    assert_eq!(
        call().auth(bearer(&fresh)).send(&sb).await?.status,
        StatusCode::OK
    );
    Ok(())
}

#[tokio::test]
async fn expired_token_is_401() -> TestResult {
    let opts = SandboxOptions {
        token_expires_in: 0,
        ..SandboxOptions::default()
    };
    let sb = Sandbox::start_local(opts).await?;
    let token = fetch_token(&sb).await?;
    let reply = Call::get("/current_user")
        .auth(bearer(&token))
        .obo(&first_user(&sb)?)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    Ok(())
}

// ----- rate limiting -----

#[tokio::test]
async fn rate_limit_headers_count_down_and_429_carries_retry_after() -> TestResult {
    let opts = SandboxOptions {
        rate_limit: 3,
        ..SandboxOptions::default()
    };
    let sb = Sandbox::start_local(opts).await?;
    let user = first_user(&sb)?;
    let token = fetch_token(&sb).await?;
    let call = || Call::get("/jobs").auth(bearer(&token)).obo(&user);
    for remaining in [2, 1, 0] {
        let reply = call().send(&sb).await?;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.header_u64("x-ratelimit-limit")?, 3);
        assert_eq!(reply.header_u64("x-ratelimit-remaining")?, remaining);
    }
    let reply = call().send(&sb).await?;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let retry_after = reply.header_u64("retry-after")?;
    assert!((1..=10).contains(&retry_after), "Retry-After {retry_after}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let reset = reply.header_u64("x-ratelimit-reset")?;
    assert!(
        reset >= now && reset <= now + 11,
        "reset {reset}, now {now}"
    );
    assert_eq!(reply.header_u64("x-ratelimit-remaining")?, 0);
    assert!(reply.json()?["errors"][0]["message"].is_string());

    // A second token of the same client shares the window; a partner key has its own.
    let other_token = fetch_token(&sb).await?;
    let reply = Call::get("/jobs")
        .auth(bearer(&other_token))
        .obo(&user)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let reply = Call::get("/jobs")
        .auth(basic(PARTNER_KEY, ""))
        .obo(&user)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header_u64("x-ratelimit-remaining")?, 2);
    Ok(())
}

#[tokio::test]
async fn rate_window_resets_after_it_elapses() -> TestResult {
    let opts = SandboxOptions {
        rate_limit: 1,
        rate_window: Duration::from_millis(100),
        ..SandboxOptions::default()
    };
    let sb = Sandbox::start_local(opts).await?;
    let user = first_user(&sb)?;
    let call = || Call::get("/jobs").auth(basic(PARTNER_KEY, "")).obo(&user);
    assert_eq!(call().send(&sb).await?.status, StatusCode::OK);
    assert_eq!(
        call().send(&sb).await?.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(call().send(&sb).await?.status, StatusCode::OK);
    Ok(())
}

// ----- partner operations -----

#[tokio::test]
async fn created_candidate_is_found_by_external_and_candidate_ids() -> TestResult {
    let sb = sandbox().await?;
    let user = first_user(&sb)?;
    let auth = basic(PARTNER_KEY, "");
    let mut ids = Vec::new();
    for (external_id, first) in [("ext-1", "Ada"), ("ext-2", "Grace")] {
        let candidate = json!({
            "external_id": external_id,
            "first_name": first,
            "last_name": "Example",
            "emails": [{"value": format!("{first}@example.com"), "type": "personal"}],
            "application": {"job_id": 7001},
        });
        let reply = Call::post("/candidates", &candidate)
            .auth(auth.clone())
            .obo(&user)
            .send(&sb)
            .await?;
        assert_eq!(reply.status, StatusCode::CREATED);
        let stored = reply.json()?;
        let id = stored["id"].as_u64().ok_or("no id")?;
        assert_eq!(stored["external_id"], external_id);
        assert_eq!(stored["emails"], candidate["emails"]);
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);

    let found = |query: String| {
        let auth = auth.clone();
        let user = user.clone();
        let sb = &sb;
        async move {
            let reply = Call::get(&format!("/candidates?{query}"))
                .auth(auth)
                .obo(&user)
                .send(sb)
                .await?;
            assert_eq!(reply.status, StatusCode::OK);
            let list = reply.json()?;
            let ids: Vec<u64> = list
                .as_array()
                .ok_or("not an array")?
                .iter()
                .filter_map(|c| c["id"].as_u64())
                .collect();
            Ok::<_, Error>(ids)
        }
    };
    assert_eq!(found("external_ids=ext-1".to_owned()).await?, vec![ids[0]]);
    assert_eq!(
        found(format!("candidate_ids={}", ids[1])).await?,
        vec![ids[1]]
    );
    assert_eq!(
        found(format!("candidate_ids={},{}", ids[0], ids[1])).await?,
        ids
    );
    assert_eq!(
        found(format!("candidate_ids={}&external_ids=ext-2", ids[0])).await?,
        ids
    );
    assert_eq!(found("external_ids=ext-2%2Cext-1".to_owned()).await?, ids);
    assert!(
        found("external_ids=nobody&candidate_ids=1".to_owned())
            .await?
            .is_empty()
    );
    assert_eq!(sb.candidates().len(), 2);
    Ok(())
}

#[tokio::test]
async fn candidate_ids_that_are_not_integers_are_400() -> TestResult {
    let sb = sandbox().await?;
    let reply = Call::get("/candidates?candidate_ids=12,abc")
        .auth(basic(PARTNER_KEY, ""))
        .obo(&first_user(&sb)?)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.error_field()?, "candidate_ids");
    Ok(())
}

#[tokio::test]
async fn candidate_missing_required_fields_is_422_naming_each_field() -> TestResult {
    let sb = sandbox().await?;
    let user = first_user(&sb)?;
    let reply = Call::post("/candidates", &json!({"first_name": "Ada", "last_name": 7}))
        .auth(basic(PARTNER_KEY, ""))
        .obo(&user)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    let body = reply.json()?;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .ok_or("no errors array")?
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert_eq!(fields, ["external_id", "last_name"]);

    let unknown_job = json!({
        "external_id": "x", "first_name": "A", "last_name": "B",
        "application": {"job_id": 999}
    });
    let reply = Call::post("/candidates", &unknown_job)
        .auth(basic(PARTNER_KEY, ""))
        .obo(&user)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reply.error_field()?, "application.job_id");
    assert!(sb.candidates().is_empty());
    Ok(())
}

#[tokio::test]
async fn invalid_json_body_is_400() -> TestResult {
    let sb = sandbox().await?;
    let user = first_user(&sb)?;
    for op in ["/candidates", "/tracking_link"] {
        let reply = Call::new(Method::POST, op)
            .raw_body("{\"first_name\": ")
            .auth(basic(PARTNER_KEY, ""))
            .obo(&user)
            .send(&sb)
            .await?;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{op}");
        assert_eq!(reply.json()?, json!({"errors":[{"message": INVALID_JSON}]}));
    }
    Ok(())
}

#[tokio::test]
async fn current_user_jobs_and_pools_follow_the_seed_shapes() -> TestResult {
    let sb = sandbox().await?;
    let users = sb.users();
    assert!(users.len() >= 3);
    let auth = basic(PARTNER_KEY, "");

    let me = Call::get("/current_user")
        .auth(auth.clone())
        .obo(&users[1])
        .send(&sb)
        .await?
        .json()?;
    assert_eq!(me["email"], json!(users[1]));
    assert!(me["id"].is_u64() && me["name"].is_string());

    let jobs = Call::get("/jobs")
        .auth(auth.clone())
        .obo(&users[0])
        .send(&sb)
        .await?
        .json()?;
    let jobs = jobs.as_array().ok_or("jobs is not an array")?;
    assert!(jobs.len() >= 4);
    for job in jobs {
        assert!(job["id"].is_u64() && job["name"].is_string());
        assert!(job["requisition_id"].is_string() || job["requisition_id"].is_null());
        assert!(job["departments"][0]["id"].is_u64() && job["departments"][0]["name"].is_string());
        let office = &job["offices"][0];
        assert!(
            office["id"].is_u64() && office["name"].is_string() && !office["location"].is_null()
        );
    }
    assert!(jobs.iter().any(|j| j["requisition_id"].is_null()));

    let pools = Call::get("/prospect_pools")
        .auth(auth)
        .obo(&users[0])
        .send(&sb)
        .await?
        .json()?;
    let pools = pools.as_array().ok_or("pools is not an array")?;
    assert!(pools.len() >= 2);
    for pool in pools {
        let stages = pool["stages"].as_array().ok_or("no stages")?;
        assert!(!stages.is_empty());
        let priorities: Vec<u64> = stages
            .iter()
            .filter_map(|s| s["priority"].as_u64())
            .collect();
        assert_eq!(priorities.len(), stages.len());
        assert!(
            priorities.windows(2).all(|w| w[0] < w[1]),
            "stages out of order"
        );
    }
    Ok(())
}

#[tokio::test]
async fn tracking_link_is_created_on_grnh_se_and_unknown_job_is_404() -> TestResult {
    let sb = sandbox().await?;
    let user = first_user(&sb)?;
    let reply = Call::post(
        "/tracking_link",
        &json!({"job_id": 7002, "source_id": 12, "external_id": "cmp-1"}),
    )
    .auth(basic(PARTNER_KEY, ""))
    .obo(&user)
    .send(&sb)
    .await?;
    assert_eq!(reply.status, StatusCode::CREATED);
    let link = reply.json()?;
    assert!(
        link["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("https://grnh.se/") && u.len() > 16)
    );
    assert!(link["expires_at"].as_str().is_some_and(looks_like_rfc3339));

    let reply = Call::post("/tracking_link", &json!({"job_id": 1}))
        .auth(basic(PARTNER_KEY, ""))
        .obo(&user)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_field()?, "job_id");
    Ok(())
}

#[tokio::test]
async fn unknown_partner_path_is_404_and_wrong_method_is_405() -> TestResult {
    let sb = sandbox().await?;
    let user = first_user(&sb)?;
    let reply = Call::get("/applications")
        .auth(basic(PARTNER_KEY, ""))
        .obo(&user)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.json()?, json!({"errors":[{"message":"Not found"}]}));

    let reply = Call::get("/tracking_link")
        .auth(basic(PARTNER_KEY, ""))
        .obo(&user)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), Some("POST"));

    let reply = Call::new(Method::DELETE, "/candidates")
        .auth(basic(PARTNER_KEY, ""))
        .obo(&user)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.header("allow"), Some("GET, POST"));

    let reply = get(&sb, "/v2/elsewhere").await?;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    Ok(())
}

// ----- recording and faults -----

#[tokio::test]
async fn received_records_partner_requests_with_all_headers_and_body() -> TestResult {
    let sb = sandbox().await?;
    let user = first_user(&sb)?;
    fetch_token(&sb).await?;
    let body = json!({"job_id": 7001});
    Call::post("/tracking_link?utm=x", &body)
        .auth(basic(PARTNER_KEY, ""))
        .obo(&user)
        .header("x-trace", "one")
        .header("X-Trace", "two")
        .send(&sb)
        .await?;
    get(&sb, "/.well-known/jwks.json").await?;

    let received = sb.received();
    assert_eq!(received.len(), 1, "only partner calls are recorded");
    let r = &received[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/partner/tracking_link");
    assert_eq!(r.query.as_deref(), Some("utm=x"));
    assert_eq!(r.header_values("x-trace"), ["one", "two"]);
    assert_eq!(r.header("on-behalf-of"), Some(user.as_str()));
    assert!(r.headers.iter().all(|(n, _)| *n == n.to_ascii_lowercase()));
    assert_eq!(serde_json::from_slice::<Value>(&r.body)?, body);
    assert_eq!(sb.token_requests().len(), 1);
    assert_eq!(sb.jwks_requests(), 1);

    let hook = get(&sb, "/_sandbox/requests").await?.json()?;
    assert_eq!(hook["requests"][0]["path"], "/v1/partner/tracking_link");
    assert_eq!(hook["token_requests"].as_array().map(Vec::len), Some(1));

    sb.clear_received();
    assert!(sb.received().is_empty() && sb.token_requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn fail_next_injects_status() -> TestResult {
    let sb = sandbox().await?;
    let user = first_user(&sb)?;
    sb.faults().fail_next(2, 503);
    for _ in 0..2 {
        let reply = Call::get("/jobs")
            .auth(basic(PARTNER_KEY, ""))
            .obo(&user)
            .send(&sb)
            .await?;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(reply.json()?["errors"][0]["message"].is_string());
    }
    let reply = Call::get("/jobs")
        .auth(basic(PARTNER_KEY, ""))
        .obo(&user)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(sb.received().len(), 3);
    Ok(())
}

#[tokio::test]
async fn latency_delays_partner_answers() -> TestResult {
    let sb = sandbox().await?;
    sb.faults().set_latency(Duration::from_millis(150));
    let started = Instant::now();
    let reply = Call::get("/jobs")
        .auth(basic(PARTNER_KEY, ""))
        .obo(&first_user(&sb)?)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(150));
    Ok(())
}

// ----- dev identity provider -----

async fn published_keys(sb: &Sandbox) -> Result<JwkSet, Error> {
    let reply = get(sb, "/.well-known/jwks.json").await?;
    assert_eq!(reply.status, StatusCode::OK);
    Ok(serde_json::from_slice(&reply.body)?)
}

async fn verify(sb: &Sandbox, token: &str) -> Result<Value, Error> {
    let kid = jsonwebtoken::decode_header(token)?.kid.ok_or("no kid")?;
    let keys = published_keys(sb).await?;
    let jwk = keys.find(&kid).ok_or("kid not published")?;
    let mut validation = Validation::new(Algorithm::ES256);
    validation.set_audience(&["greenhouse-gateway"]);
    validation.set_issuer(&[sb.issuer()]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "nbf"]);
    let data = jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(jwk)?, &validation)?;
    Ok(data.claims)
}

#[tokio::test]
async fn minted_token_verifies_against_published_jwks() -> TestResult {
    let sb = sandbox().await?;
    let token = sb.mint_token(
        json!({"sub": "alice", "team": "sourcing"}),
        Duration::from_secs(60),
    );
    let header = jsonwebtoken::decode_header(&token)?;
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.kid, Some(sb.current_kid()));
    let claims = verify(&sb, &token).await?;
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["team"], "sourcing");
    assert_eq!(claims["aud"], "greenhouse-gateway");
    let (iat, exp) = (claims["iat"].as_u64(), claims["exp"].as_u64());
    assert_eq!(exp.zip(iat).map(|(e, i)| e - i), Some(60));

    let reply = get(&sb, "/.well-known/jwks.json").await?;
    assert_eq!(reply.header("cache-control"), Some("max-age=300"));
    let jwk = &reply.json()?["keys"][0];
    assert_eq!(
        (jwk["kty"].as_str(), jwk["crv"].as_str()),
        (Some("EC"), Some("P-256"))
    );
    assert_eq!(
        (jwk["alg"].as_str(), jwk["use"].as_str()),
        (Some("ES256"), Some("sig"))
    );

    // Caller-given claims win over the defaults.
    let other = sb.mint_token(
        json!({"aud": "elsewhere", "iss": "x"}),
        Duration::from_secs(60),
    );
    assert!(verify(&sb, &other).await.is_err());
    Ok(())
}

#[tokio::test]
async fn rotated_key_signs_and_old_key_stays_only_when_asked() -> TestResult {
    let sb = sandbox().await?;
    let first_kid = sb.current_kid();
    let old_token = sb.mint_token(json!({"sub": "a"}), Duration::from_secs(60));

    sb.rotate_signing_key(true);
    let second_kid = sb.current_kid();
    assert_ne!(first_kid, second_kid);
    let keys = published_keys(&sb).await?;
    assert_eq!(keys.keys.len(), 2);
    assert_eq!(
        keys.keys[0].common.key_id.as_deref(),
        Some(second_kid.as_str())
    );
    verify(&sb, &old_token).await?;
    let new_token = sb.mint_token(json!({"sub": "b"}), Duration::from_secs(60));
    assert_eq!(
        jsonwebtoken::decode_header(&new_token)?.kid,
        Some(second_kid.clone())
    );
    verify(&sb, &new_token).await?;

    sb.rotate_signing_key(false);
    let keys = published_keys(&sb).await?;
    assert_eq!(keys.keys.len(), 1);
    assert!(keys.find(&first_kid).is_none() && keys.find(&second_kid).is_none());
    assert!(verify(&sb, &old_token).await.is_err());
    Ok(())
}

#[tokio::test]
async fn jwks_outage_answers_503_and_is_counted() -> TestResult {
    let sb = sandbox().await?;
    sb.faults().set_jwks_available(false);
    assert_eq!(
        get(&sb, "/.well-known/jwks.json").await?.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    sb.faults().set_jwks_available(true);
    assert_eq!(
        get(&sb, "/.well-known/jwks.json").await?.status,
        StatusCode::OK
    );
    assert_eq!(sb.jwks_requests(), 2);
    Ok(())
}

// ----- HTTP test hooks -----

#[tokio::test]
async fn hooks_mint_tokens_and_set_faults_over_http() -> TestResult {
    let sb = sandbox().await?;
    let reply = post_json(
        &sb,
        "/_sandbox/mint",
        &json!({"claims": {"sub": "bob"}, "lifetime_secs": 120}),
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK);
    let token = reply.json()?["token"]
        .as_str()
        .ok_or("no token")?
        .to_owned();
    assert_eq!(verify(&sb, &token).await?["sub"], "bob");

    let faults = json!({
        "fail_next": {"count": 1, "status": 500},
        "token_fail_next": {"count": 1, "status": 503},
        "jwks_available": false,
        "latency_ms": 0,
    });
    let reply = post_json(&sb, "/_sandbox/faults", &faults).await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()?["fail_next"]["count"], 1);
    let reply = Call::get("/jobs")
        .auth(basic(PARTNER_KEY, ""))
        .obo(&first_user(&sb)?)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(fetch_token(&sb).await.is_err());
    assert_eq!(
        get(&sb, "/.well-known/jwks.json").await?.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // A typo is refused and changes nothing.
    let reply = post_json(
        &sb,
        "/_sandbox/faults",
        &json!({"jwks_available": true, "fail_nxt": {}}),
    )
    .await?;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(!sb.faults().jwks_available());

    let token = fetch_token(&sb).await?;
    let reply = post_json(
        &sb,
        "/_sandbox/faults",
        &json!({"reset": true, "revoke_tokens": true}),
    )
    .await?;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(sb.faults().jwks_available());
    let reply = Call::get("/jobs")
        .auth(bearer(&token))
        .obo(&first_user(&sb)?)
        .send(&sb)
        .await?;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    let users = get(&sb, "/_sandbox/users").await?.json()?;
    assert!(
        users
            .as_array()
            .is_some_and(|u| u.iter().any(|u| u["enabled"] == false))
    );
    assert_eq!(
        get(&sb, "/_sandbox/nope").await?.status,
        StatusCode::NOT_FOUND
    );
    Ok(())
}
