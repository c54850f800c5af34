//! The Greenhouse sandbox: an in-memory emulator of the Partner API, an OAuth2 token endpoint
//! and a dev identity provider. Used by `dev`, `sandbox` and the tests.
//!
//! One hyper server (HTTP/1.1 and HTTP/2 cleartext on the same port) answers:
//!
//! | path | what |
//! |---|---|
//! | `/v1/partner/*` | the six operations of the seed spec; Bearer or Basic partner key, `On-Behalf-Of`, rate limit |
//! | `POST /oauth/token` | client-credentials grant (`client_secret_basic` or `client_secret_post`) |
//! | `GET /.well-known/jwks.json` | the dev IdP's ES256 public keys |
//! | `GET /.well-known/openid-configuration` | issuer, JWKS and token URLs |
//! | `/_sandbox/*` | test hooks (see the `hooks` module): recorded requests, minting, faults |
//!
//! The order of checks on a Partner API call: injected latency and failures, credential (401),
//! the credential's rate-limit window (429), `On-Behalf-Of` (401), route (404/405), body (400/422).
//! Everything lives in memory; nothing is persisted and no secret or token is logged.

mod faults;
mod hooks;
mod idp;
mod oauth;
mod partner;
mod respond;
mod server;
mod state;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::StatusCode;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use faults::Faults;
pub use idp::DEFAULT_AUDIENCE;
pub use partner::BASE_PATH as PARTNER_BASE_PATH;

use state::Shared;

/// Request bodies above this size are refused with 413.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// How a sandbox is set up.
#[derive(Clone, Debug)]
pub struct SandboxOptions {
    /// OAuth clients `(client_id, client_secret)` the token endpoint accepts.
    pub clients: Vec<(String, String)>,
    /// Partner API keys accepted as the Basic-auth user name (with an empty password).
    pub partner_keys: Vec<String>,
    /// Lifetime of issued access tokens, in seconds.
    pub token_expires_in: u64,
    /// Requests per credential per window; 0 switches rate limiting (and its headers) off.
    pub rate_limit: u32,
    /// The fixed rate-limit window.
    pub rate_window: Duration,
    /// The dev IdP's issuer; `http://<bound addr>` when `None`.
    pub issuer: Option<String>,
    /// Encode Partner API answers the way real servers do: `br` or `gzip`, whichever the
    /// request's `Accept-Encoding` lists first.
    pub compress: bool,
    /// The status of a successful `POST /candidates`: 201 (the seed spec) or 200 (what
    /// Greenhouse's documentation allows, "200-level").
    pub create_status: StatusCode,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            clients: vec![("gateway-dev".to_owned(), "dev-client-secret".to_owned())],
            partner_keys: vec!["dev-partner-key".to_owned()],
            token_expires_in: 3600,
            rate_limit: 50,
            rate_window: Duration::from_secs(10),
            issuer: None,
            compress: false,
            create_status: StatusCode::CREATED,
        }
    }
}

/// A request as the sandbox received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// The path without the query.
    pub path: String,
    pub query: Option<String>,
    /// Every header in arrival order, names lowercase, duplicates kept.
    pub headers: Vec<(String, String)>,
    pub body: bytes::Bytes,
}

impl RecordedRequest {
    /// Every value of the header `name` (case-insensitive).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The first value of the header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name).into_iter().next()
    }
}

/// A running sandbox. Dropping it stops the server and closes every connection.
pub struct Sandbox {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Sandbox {
    /// Serves the sandbox on `listener` from a new task. Needs a Tokio runtime.
    pub async fn spawn(listener: TcpListener, opts: SandboxOptions) -> std::io::Result<Sandbox> {
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(opts, addr)?);
        let task = tokio::spawn(server::serve(listener, Arc::clone(&shared)));
        Ok(Sandbox { shared, addr, task })
    }

    /// Binds `127.0.0.1:0` and serves the sandbox there.
    pub async fn start_local(opts: SandboxOptions) -> std::io::Result<Sandbox> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        Sandbox::spawn(listener, opts).await
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://HOST:PORT`, with a loopback host when bound to an unspecified address.
    pub fn origin(&self) -> String {
        self.shared.public_origin.clone()
    }

    /// `http://HOST:PORT/v1/partner`.
    pub fn base_url(&self) -> String {
        format!("{}{}", self.shared.public_origin, PARTNER_BASE_PATH)
    }

    /// `http://HOST:PORT/oauth/token`.
    pub fn token_url(&self) -> String {
        format!("{}/oauth/token", self.shared.public_origin)
    }

    /// The dev IdP's issuer (`iss` of minted tokens).
    pub fn issuer(&self) -> String {
        self.shared.issuer.clone()
    }

    /// `http://HOST:PORT/.well-known/jwks.json`.
    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.shared.public_origin)
    }

    /// The JWKS document currently published.
    pub fn jwks(&self) -> serde_json::Value {
        self.shared.keys.jwks()
    }

    /// The `kid` of the key [`Sandbox::mint_token`] signs with.
    pub fn current_kid(&self) -> String {
        self.shared.keys.current_kid()
    }

    /// An ES256 JWT signed with the current dev key, header `kid` set. `claims` (an object) is
    /// merged over the defaults: `iss` = [`Sandbox::issuer`], `aud` = [`DEFAULT_AUDIENCE`],
    /// `iat` = `nbf` = now, `exp` = now + `lifetime`, a random `jti`. Returns an empty string
    /// only if signing fails, which a generated P-256 key does not.
    pub fn mint_token(&self, claims: serde_json::Value, lifetime: Duration) -> String {
        match self.shared.keys.mint(&self.shared.issuer, claims, lifetime) {
            Ok(token) => token,
            Err(error) => {
                tracing::error!(%error, "sandbox could not sign a token");
                String::new()
            }
        }
    }

    /// Emails of the seeded, enabled users (valid `On-Behalf-Of` values), first one an admin.
    pub fn users(&self) -> Vec<String> {
        self.shared
            .users
            .iter()
            .filter(|u| u.enabled)
            .map(|u| u.email.to_owned())
            .collect()
    }

    /// Emails of seeded users that exist but are disabled (`On-Behalf-Of` gives 401).
    pub fn disabled_users(&self) -> Vec<String> {
        self.shared
            .users
            .iter()
            .filter(|u| !u.enabled)
            .map(|u| u.email.to_owned())
            .collect()
    }

    /// Every candidate created so far, as stored (with its `id`).
    pub fn candidates(&self) -> Vec<serde_json::Value> {
        self.shared.all_candidates()
    }

    /// Requests to `/v1/partner/*`, oldest first (the last 10 000).
    pub fn received(&self) -> Vec<RecordedRequest> {
        self.shared.partner_requests()
    }

    /// Requests to the token endpoint, oldest first (the last 10 000).
    pub fn token_requests(&self) -> Vec<RecordedRequest> {
        self.shared.token_requests()
    }

    /// How many JWKS requests arrived (also those answered 503).
    pub fn jwks_requests(&self) -> usize {
        self.shared.jwks_hits.load(Ordering::Relaxed)
    }

    /// Forgets recorded partner and token requests and resets the JWKS counter.
    pub fn clear_received(&self) {
        self.shared.clear_log();
    }

    /// The fault switches.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Makes a freshly generated key current. With `keep_old_in_jwks`, the previous keys stay
    /// in the JWKS (after the new one); otherwise only the new key is published.
    pub fn rotate_signing_key(&self, keep_old_in_jwks: bool) {
        if let Err(error) = self.shared.keys.rotate(keep_old_in_jwks) {
            tracing::error!(%error, "sandbox could not generate a new signing key");
        }
    }

    /// Every access token issued so far stops working (401); new ones work.
    pub fn revoke_all_tokens(&self) {
        self.shared.revoke_all_tokens();
    }

    /// Stops the server and closes every connection.
    pub fn shutdown(self) {
        drop(self);
    }

    /// Resolves when the server task ends (it only ends when aborted or on panic).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// An address clients can connect to: loopback instead of an unspecified bind address.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// Locks a mutex, ignoring poisoning: every critical section leaves the data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
