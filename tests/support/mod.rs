//! Shared test support: an in-process sandbox and gateway on loopback port 0, a config written to
//! a temporary folder, a recording stub upstream and a small real HTTP client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod redis;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use greenhouse_gateway::sandbox::{Sandbox, SandboxOptions};
use greenhouse_gateway::server::{self, Running};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

/// Email addresses are written with `(at)` in test sources and converted here.
pub fn email(s: &str) -> String {
    s.replace("(at)", "@")
}

/// The audit record's fields in DESIGN 1.5 order, written out independently of the
/// implementation so the tests are an oracle for it.
pub const AUDIT_FIELDS: [&str; 27] = [
    "ts",
    "seq",
    "request_id",
    "team",
    "subject",
    "issuer",
    "client_addr",
    "method",
    "operation",
    "path",
    "on_behalf_of",
    "credential",
    "decision",
    "code",
    "status",
    "upstream_status",
    "duration_ms",
    "upstream_duration_ms",
    "request_bytes",
    "response_bytes",
    "body_sha256",
    "external_ids",
    "candidate_ids",
    "validation",
    "quota",
    "prev_hash",
    "hash",
];

pub const AUDIENCE: &str = "greenhouse-gateway";

/// Team files used by most tests (the same shape as the shipped examples).
pub fn default_teams() -> Vec<(&'static str, String)> {
    vec![
        (
            "sourcing",
            email(
                r#"name = "sourcing"
operations = ["listPartnerJobs", "listPartnerProspectPools", "createPartnerCandidate", "listPartnerCandidates"]
credential = "default"
[[members]]
iss = "ISSUER"
sub = "svc-sourcing-*"
[on_behalf_of]
default = "sourcing.bot(at)example.com"
allowed = ["recruiter.one(at)example.com"]
"#,
            ),
        ),
        (
            "agency",
            email(
                r#"name = "agency"
operations = ["listPartnerJobs", "createPartnerCandidate"]
credential = "partner_key"
[[members]]
iss = "ISSUER"
sub = "svc-agency-connector"
[on_behalf_of]
default = "agency.liaison(at)example.com"
"#,
            ),
        ),
        (
            "reporting",
            email(
                r#"name = "reporting"
operations = ["listPartnerJobs", "getCurrentPartnerUser", "listPartnerCandidates"]
credential = "default"
[[members]]
iss = "ISSUER"
sub = "svc-reporting-*"
[on_behalf_of]
default = "recruiter.two(at)example.com"
allowed = ["recruiter.one(at)example.com"]
from_claim = "act_as"
"#,
            ),
        ),
    ]
}

/// How to build a gateway for a test.
pub struct Setup {
    pub teams: Vec<(&'static str, String)>,
    /// Appended to gateway.toml (extra tables such as `[limits]`).
    pub extra: String,
    /// Replaces `[listen]` keys after `addr`.
    pub listen_extra: String,
    /// `[admin]` keys after `addr` (`token = ...`, say).
    pub admin_extra: String,
    /// Where the gateway forwards; the sandbox when `None`.
    pub upstream: Option<String>,
    pub upstream_timeout: &'static str,
    pub sandbox: SandboxOptions,
    /// Token endpoint of the `default` credential; the sandbox's when `None`.
    pub token_url: Option<String>,
    /// Wait for `/readyz` before returning (off for tests of a gateway that cannot get ready).
    pub wait_ready: bool,
    /// `upstream.ca_file`.
    pub upstream_ca: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            teams: default_teams(),
            extra: String::new(),
            listen_extra: String::new(),
            admin_extra: String::new(),
            upstream: None,
            upstream_timeout: "5s",
            sandbox: SandboxOptions {
                rate_limit: 10_000,
                ..SandboxOptions::default()
            },
            token_url: None,
            wait_ready: true,
            upstream_ca: None,
        }
    }
}

/// A sandbox and a gateway in front of it.
pub struct Harness {
    pub sandbox: Sandbox,
    pub gateway: Running,
    pub dir: tempfile::TempDir,
    pub client: TestClient,
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(Setup::default()).await
    }

    pub async fn start_with(setup: Setup) -> Harness {
        let sandbox = Sandbox::start_local(setup.sandbox.clone())
            .await
            .expect("sandbox starts");
        let dir = tempfile::tempdir().expect("temp dir");
        write_config(dir.path(), &sandbox, &setup);
        let config = greenhouse_gateway::config::load(&dir.path().join("gateway.toml"))
            .unwrap_or_else(|p| panic!("test config invalid: {p:#?}"));
        let gateway = server::start(config).await.expect("gateway starts");
        if setup.wait_ready {
            tokio::time::timeout(Duration::from_secs(10), gateway.wait_ready())
                .await
                .expect("gateway ready");
        }
        Harness {
            sandbox,
            gateway,
            dir,
            client: TestClient::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.gateway.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.gateway.admin_addr, path)
    }

    /// A valid token for a subject (and extra claims).
    pub fn token(&self, sub: &str, extra: Value) -> String {
        let mut claims = json!({"sub": sub, "aud": AUDIENCE});
        if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        self.sandbox.mint_token(claims, Duration::from_secs(600))
    }

    pub fn sourcing_token(&self) -> String {
        self.token("svc-sourcing-bot", json!({}))
    }

    /// GET through the gateway with a bearer token.
    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.client
            .send(
                Method::GET,
                &self.url(path),
                &[("authorization", &format!("Bearer {token}"))],
                Bytes::new(),
            )
            .await
    }

    /// POST JSON through the gateway with a bearer token.
    pub async fn post_json(&self, path: &str, token: &str, body: &Value) -> Reply {
        let auth = format!("Bearer {token}");
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        self.client
            .send(
                Method::POST,
                &self.url(path),
                &headers,
                Bytes::from(body.to_string()),
            )
            .await
    }
}

pub fn write_config(dir: &Path, sandbox: &Sandbox, setup: &Setup) {
    let teams = dir.join("teams");
    std::fs::create_dir_all(&teams).expect("teams dir");
    for (name, text) in &setup.teams {
        std::fs::write(
            teams.join(format!("{name}.toml")),
            text.replace("ISSUER", &sandbox.issuer()),
        )
        .expect("team file");
    }
    let upstream = setup.upstream.clone().unwrap_or_else(|| sandbox.base_url());
    let gateway = format!(
        r#"
[listen]
addr = "127.0.0.1:0"
{listen_extra}

[admin]
addr = "127.0.0.1:0"
{admin_extra}

[upstream]
base_url = "{upstream}"
timeout = "{timeout}"
connect_timeout = "2s"
{ca}

[credentials.default]
kind = "oauth2_client_credentials"
token_url = "{token_url}"
client_id = "gateway-dev"
client_secret = {{ value = "dev-client-secret" }}
scope = "partner"

[credentials.partner_key]
kind = "basic"
api_key = {{ value = "dev-partner-key" }}

[[issuers]]
issuer = "{issuer}"
audiences = ["{AUDIENCE}"]
jwks_url = "{jwks}"
algorithms = ["ES256"]
leeway = "5s"
refetch_cooldown = "1s"

{extra}
"#,
        listen_extra = setup.listen_extra,
        admin_extra = setup.admin_extra,
        timeout = setup.upstream_timeout,
        ca = setup
            .upstream_ca
            .as_ref()
            .map(|c| format!("ca_file = \"{c}\""))
            .unwrap_or_default(),
        token_url = setup
            .token_url
            .clone()
            .unwrap_or_else(|| sandbox.token_url()),
        issuer = sandbox.issuer(),
        jwks = sandbox.jwks_url(),
        extra = setup.extra,
    );
    std::fs::write(dir.join("gateway.toml"), gateway).expect("gateway.toml");
}

/// A response as the test sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub version: http::Version,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The problem+json `code`, if any.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or("").to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A real HTTP/1.1 client (hyper-util's pooled client).
#[derive(Clone)]
pub struct TestClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl Default for TestClient {
    fn default() -> Self {
        Self::new()
    }
}

impl TestClient {
    pub fn new() -> Self {
        TestClient {
            inner: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    pub fn http2_only() -> Self {
        TestClient {
            inner: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build(HttpConnector::new()),
        }
    }

    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(20), self.inner.request(req))
            .await
            .expect("response within 20 s")
            .expect("request sent");
        collect(resp).await
    }
}

impl TestClient {
    /// Like `send`, but `None` when the connection fails (the server went away).
    pub async fn send_fallible(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Option<Reply> {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(Bytes::new())).ok()?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.inner.request(req))
            .await
            .ok()?
            .ok()?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.ok()?.to_bytes();
        Some(Reply {
            status: parts.status,
            headers: parts.headers,
            body,
            version: parts.version,
        })
    }
}

pub async fn collect(resp: Response<Incoming>) -> Reply {
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
        version: parts.version,
    }
}

/// Sends raw bytes on a fresh TCP connection and returns what came back: everything until the
/// server closes the connection, or `wait` passes, or shortly after a complete response head.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let head_done = out.windows(4).any(|w| w == b"\r\n\r\n");
        let until = if head_done {
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(200))
        } else {
            deadline
        };
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the stub upstream received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A recording upstream stub: answers every request with the configured status, body and delay.
pub struct Stub {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub reply: Arc<Mutex<(u16, String, Duration)>>,
    pub reply_headers: Arc<Mutex<Vec<(String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stub {
    pub async fn start() -> Stub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stub");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let reply = Arc::new(Mutex::new((200u16, "[]".to_string(), Duration::ZERO)));
        let reply_headers: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let (s2, r2, h2) = (seen.clone(), reply.clone(), reply_headers.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (seen, reply, extra) = (s2.clone(), r2.clone(), h2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, reply, extra) = (seen.clone(), reply.clone(), extra.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            seen.lock().expect("lock").push(Seen {
                                method: parts.method.to_string(),
                                uri: parts.uri.to_string(),
                                headers: parts.headers,
                                body,
                            });
                            let (status, text, delay) = reply.lock().expect("lock").clone();
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let mut resp = Response::new(Full::new(Bytes::from(text)));
                            *resp.status_mut() = StatusCode::from_u16(status).expect("status");
                            resp.headers_mut()
                                .insert("content-type", "application/json".parse().expect("hv"));
                            resp.headers_mut()
                                .insert("connection", "x-upstream-hop".parse().expect("hv"));
                            resp.headers_mut()
                                .insert("x-upstream-hop", "1".parse().expect("hv"));
                            for (k, v) in extra.lock().expect("lock").iter() {
                                resp.headers_mut().insert(
                                    http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                                    v.parse().expect("hv"),
                                );
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Stub {
            addr,
            seen,
            reply,
            reply_headers,
            task,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1/partner", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    pub fn set_reply_headers(&self, headers: &[(&str, &str)]) {
        *self.reply_headers.lock().expect("lock") = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    pub fn set_reply(&self, status: u16, body: &str, delay: Duration) {
        *self.reply.lock().expect("lock") = (status, body.to_string(), delay);
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The path to the built binary (cargo builds it for integration tests).
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_greenhouse-gateway"))
}

/// A `greenhouse-gateway serve` process, killed on drop.
pub struct ServeProcess {
    pub child: Child,
    /// The gateway listener, `IP:PORT`.
    pub addr: String,
    /// The admin listener, `IP:PORT`.
    pub admin: String,
    /// Every line the process wrote to stderr (its log), as it arrives.
    pub log: Arc<Mutex<Vec<String>>>,
}

impl ServeProcess {
    pub fn log_text(&self) -> String {
        self.log.lock().expect("lock").join("\n")
    }

    /// Waits (at most 10 s) until the admin listener's `/readyz` answers 200: keys fetched,
    /// upstream token taken. Panics with the log when it never does.
    pub async fn wait_ready(&self) {
        let client = TestClient::new();
        let url = format!("http://{}/readyz", self.admin);
        for _ in 0..400 {
            if client
                .send(Method::GET, &url, &[], Bytes::new())
                .await
                .status
                == StatusCode::OK
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the gateway never got ready:\n{}", self.log_text());
    }

    /// Whether a log line containing `needle` shows up within 5 s (info lines reach standard
    /// error up to 100 ms after they are logged).
    pub async fn logs_soon(&self, needle: &str) -> bool {
        for _ in 0..200 {
            if self.log_text().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `serve` with `config` and returns once it logs its addresses.
pub fn spawn_serve(config: &Path) -> ServeProcess {
    spawn_serve_with_env(config, &[])
}

/// Like [`spawn_serve`], with extra environment variables (`RUST_LOG`, say).
pub fn spawn_serve_with_env(config: &Path, env: &[(&str, &str)]) -> ServeProcess {
    spawn_serve_logging(config, &["--log-json"], env)
}

/// Like [`spawn_serve`], with extra `serve` arguments instead of `--log-json` (so the log format
/// is what the environment selects: JSON lines or text) and extra environment variables.
pub fn spawn_serve_logging(config: &Path, args: &[&str], env: &[(&str, &str)]) -> ServeProcess {
    let mut child = Command::new(binary())
        .arg("serve")
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            kept.lock().expect("lock").push(line.clone());
            let _ = tx.send(line);
        }
    });
    let mut proc = ServeProcess {
        child,
        addr: String::new(),
        admin: String::new(),
        log,
    };
    // A deadline for the whole wait, not per line: a gateway that keeps logging (retrying an
    // identity provider this thread's runtime cannot serve while it waits) must not wait forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (addr, admin) = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the gateway logs that it listens:\n{}", proc.log_text()));
        if let Some(found) = listening_addrs(&line) {
            break found;
        }
    };
    proc.addr = addr;
    proc.admin = admin;
    proc
}

/// The gateway and admin addresses of the "gateway listening" log line, JSON or text.
fn listening_addrs(line: &str) -> Option<(String, String)> {
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
        if v["fields"]["message"] != "gateway listening" {
            return None;
        }
        let field = |k: &str| v["fields"][k].as_str().map(str::to_string);
        return Some((field("addr")?, field("admin_addr")?));
    }
    if !line.contains("gateway listening") {
        return None;
    }
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_string)
    };
    Some((field("addr=")?, field("admin_addr=")?))
}
