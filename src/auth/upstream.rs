//! Upstream credentials: the partner API key (HTTP Basic, key as user name, empty password) and
//! OAuth2 client-credentials tokens (RFC 6749 section 4.4), cached per credential.
//!
//! The token cache, per credential:
//! - callers read the cached token without waiting; a background refresher renews it
//!   `refresh_before` its expiry (with jitter), so callers do not wait in steady state;
//! - a missing or expired token is fetched by exactly one request while the others wait for that
//!   same fetch (single flight, bounded by the credential's timeout); an expired token is never
//!   returned;
//! - a failed fetch (error status, timeout, garbage, an empty 200) backs off exponentially with
//!   jitter; meanwhile a still-valid token keeps being used, and without one callers get 503
//!   `upstream_credentials_unavailable` at once instead of piling onto the token endpoint;
//! - after an upstream 401 the token that was rejected is evicted and one fresh token is fetched,
//!   shared by every request that saw the same rejection; but Greenhouse also answers 401 for an
//!   `On-Behalf-Of` user it does not know, so one team's bad user must not churn the token every
//!   team uses: a fresh token refused on its replay is remembered with that user, and later 401s
//!   for the same token and user are blamed on the user (no eviction, no fetch); and 401-triggered
//!   fetches happen at most once per [`MIN_UNAUTHORIZED_REFETCH`] per credential;
//! - after an upstream 429 the credential is paused until `Retry-After`, and callers get 503
//!   `upstream_rate_limited` without calling the upstream.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderMap, HeaderValue, Method, Request, header};
use rand::Rng;
use serde_json::Value;
use tracing::Instrument as _;

use crate::error::GatewayError;
use crate::http_client::{FetchError, HttpClient, error_chain, fetch, full_body};
use crate::metrics::Metrics;
use crate::values::Secret;

/// Lifetime assumed when the token endpoint states none, or an absurd one.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Pause after an upstream 429 that names no time.
const DEFAULT_PAUSE: Duration = Duration::from_secs(10);
const MAX_PAUSE: Duration = Duration::from_secs(3600);
/// Least time between two token fetches triggered by upstream 401s, per credential.
pub const MIN_UNAUTHORIZED_REFETCH: Duration = Duration::from_secs(5);
/// Most `On-Behalf-Of` users remembered as refused with the current token.
const MAX_REFUSED_USERS: usize = 64;

/// A `[credentials.<name>]` table, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSettings {
    OAuth2(OAuth2Credential),
    Basic { api_key: Secret },
}

impl CredentialSettings {
    pub fn kind(&self) -> &'static str {
        match self {
            CredentialSettings::OAuth2(_) => "oauth2_client_credentials",
            CredentialSettings::Basic { .. } => "basic",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the client id and secret.
    Basic,
    /// `client_secret_post`: both in the form body.
    Post,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuth2Credential {
    pub token_url: http::Uri,
    pub client_id: String,
    pub client_secret: Secret,
    pub scope: Option<String>,
    pub client_auth: ClientAuth,
    pub refresh_before: Duration,
    pub timeout: Duration,
    pub extra_params: BTreeMap<String, String>,
}

/// All configured credentials, by name.
#[derive(Clone)]
pub struct UpstreamCredentials {
    sources: Arc<BTreeMap<String, Credential>>,
    client: HttpClient,
    metrics: Metrics,
}

/// One credential, resolved: what a team holds (never looked up by name per request). Cheap to
/// clone.
#[derive(Clone)]
pub struct Credential {
    name: Arc<str>,
    source: Arc<Source>,
}

struct Source {
    /// The settings it was built from, to tell on reload whether they changed.
    configured: CredentialSettings,
    kind: Kind,
    /// Set after an upstream 429: no call with this credential until then.
    paused_until: Mutex<Option<Instant>>,
    /// Whether its first token was fetched and its refresher runs.
    started: std::sync::atomic::AtomicBool,
}

enum Kind {
    Basic(HeaderValue),
    OAuth2(Arc<TokenSource>),
}

struct TokenSource {
    name: String,
    cfg: OAuth2Credential,
    client: HttpClient,
    metrics: Metrics,
    state: Mutex<TokenState>,
    /// Held while a token request is in flight: the single flight.
    fetch_lock: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct TokenState {
    token: Option<Token>,
    failures: u32,
    next_attempt: Option<Instant>,
    last_error: Option<String>,
    /// When the last fetch triggered by an upstream 401 started (the floor counts from it).
    last_unauthorized_fetch: Option<Instant>,
    /// `On-Behalf-Of` users (lower-cased) with which the current token, fetched fresh after a 401,
    /// was refused again on its replay: a 401 for the same token and user is the user's, not the
    /// token's. Cleared whenever the token changes.
    refused_users: Vec<String>,
}

#[derive(Clone)]
struct Token {
    header: HeaderValue,
    expires_at: SystemTime,
    refresh_at: SystemTime,
}

impl UpstreamCredentials {
    pub fn new(
        credentials: &BTreeMap<String, CredentialSettings>,
        client: HttpClient,
        metrics: Metrics,
    ) -> Self {
        UpstreamCredentials::build(credentials, client, metrics, None)
    }

    /// The credentials of a reloaded configuration. A credential whose settings did not change
    /// is the same credential (its token, its pause and its refresher are kept); a changed or new
    /// one starts without a token (call [`UpstreamCredentials::start`]); a removed one is
    /// dropped, and its refresher ends with it.
    pub fn reconfigured(&self, credentials: &BTreeMap<String, CredentialSettings>) -> Self {
        UpstreamCredentials::build(
            credentials,
            self.client.clone(),
            self.metrics.clone(),
            Some(self),
        )
    }

    fn build(
        credentials: &BTreeMap<String, CredentialSettings>,
        client: HttpClient,
        metrics: Metrics,
        previous: Option<&UpstreamCredentials>,
    ) -> Self {
        let sources = credentials
            .iter()
            .map(|(name, c)| {
                let kept = previous
                    .and_then(|p| p.sources.get(name))
                    .filter(|old| old.source.configured == *c)
                    .cloned();
                let credential = kept.unwrap_or_else(|| Credential {
                    name: Arc::from(name.as_str()),
                    source: Arc::new(Source::new(name, c, &client, &metrics)),
                });
                (name.clone(), credential)
            })
            .collect();
        UpstreamCredentials {
            sources: Arc::new(sources),
            client,
            metrics,
        }
    }

    /// The credential of this name (`None` when not configured: configuration validation makes
    /// every team's credential exist, so this is for resolving a policy once, at load).
    pub fn get(&self, name: &str) -> Option<Credential> {
        self.sources.get(name).cloned()
    }

    /// Fetches every OAuth2 token not fetched yet once and starts their background refreshers
    /// (credentials a reload kept are left alone).
    pub async fn start(&self) {
        let tokens: Vec<Arc<TokenSource>> = self
            .sources
            .values()
            .filter(|c| !c.source.started.swap(true, Ordering::SeqCst))
            .filter_map(|c| match &c.source.kind {
                Kind::OAuth2(t) => Some(t.clone()),
                Kind::Basic(_) => None,
            })
            .collect();
        futures_util::future::join_all(tokens.iter().map(|t| async move { t.get().await.ok() }))
            .await;
        for t in tokens {
            tokio::spawn(TokenSource::refresher(Arc::downgrade(&t)));
        }
    }

    /// Readiness findings: credentials that cannot currently produce a valid token.
    pub fn not_ready(&self) -> Vec<String> {
        self.sources
            .values()
            .filter_map(|c| match &c.source.kind {
                Kind::OAuth2(t) if t.valid_token().is_none() => {
                    let why = t
                        .with_state(|st| st.last_error.clone())
                        .flatten()
                        .unwrap_or_else(|| "no token yet".into());
                    Some(format!("credential {}: {why}", t.name))
                }
                _ => None,
            })
            .collect()
    }
}

impl Credential {
    /// The configured name (for the audit record and logs).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `Authorization` value to send upstream; 503 while the credential is paused after an
    /// upstream 429 or has no valid token.
    pub async fn authorization(&self) -> Result<HeaderValue, GatewayError> {
        let src = &self.source;
        if let Some(left) = src.paused_for() {
            return Err(GatewayError::UpstreamRateLimited {
                retry_after_secs: ceil_secs(left),
            });
        }
        match &src.kind {
            Kind::Basic(v) => Ok(v.clone()),
            Kind::OAuth2(t) => t.get().await,
        }
    }

    /// After the upstream answered 401 to `rejected` for a request on behalf of `on_behalf_of`:
    /// evicts that token and returns a fresh one (one fetch shared by every request that saw the
    /// same rejection). `upstream_rejected_credentials` without a fetch when a partner key (it
    /// cannot be renewed), when this token was already refused for this user after a fresh fetch
    /// ([`Credential::refused_after_replay`]), or when a 401 made a fetch less than
    /// [`MIN_UNAUTHORIZED_REFETCH`] ago.
    pub async fn after_unauthorized(
        &self,
        rejected: &HeaderValue,
        on_behalf_of: &str,
    ) -> Result<HeaderValue, GatewayError> {
        match &self.source.kind {
            Kind::Basic(_) => Err(GatewayError::UpstreamRejectedCredentials),
            Kind::OAuth2(t) => t.replace(rejected, on_behalf_of).await,
        }
    }

    /// The upstream answered 401 again to the replay with `fresh`, the token
    /// [`Credential::after_unauthorized`] returned: the token is not what it refuses (a fresh
    /// token is as good as tokens get), so later 401s with this token and user leave the token
    /// alone.
    pub fn refused_after_replay(&self, fresh: &HeaderValue, on_behalf_of: &str) {
        if let Kind::OAuth2(t) = &self.source.kind {
            t.with_state(|st| {
                if st.token.as_ref().is_some_and(|tok| tok.header == fresh) {
                    let user = on_behalf_of.to_ascii_lowercase();
                    if !st.refused_users.contains(&user) {
                        if st.refused_users.len() >= MAX_REFUSED_USERS {
                            st.refused_users.remove(0);
                        }
                        st.refused_users.push(user);
                    }
                }
            });
        }
    }

    /// After an upstream 429: no call with this credential for `retry_after`.
    pub fn pause(&self, retry_after: Duration) {
        if let Ok(mut p) = self.source.paused_until.lock() {
            let until = Instant::now() + retry_after.min(MAX_PAUSE);
            if p.is_none_or(|cur| cur < until) {
                *p = Some(until);
            }
            tracing::warn!(
                credential = %self.name,
                retry_after_s = retry_after.as_secs(),
                "Greenhouse rate-limited the credential; pausing it"
            );
        }
    }
}

impl Source {
    fn new(name: &str, c: &CredentialSettings, client: &HttpClient, metrics: &Metrics) -> Source {
        let kind = match c {
            CredentialSettings::Basic { api_key } => {
                let encoded = STANDARD.encode(format!("{}:", api_key.expose()));
                let mut v = HeaderValue::from_str(&format!("Basic {encoded}"))
                    .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
                v.set_sensitive(true);
                Kind::Basic(v)
            }
            CredentialSettings::OAuth2(cfg) => Kind::OAuth2(Arc::new(TokenSource {
                name: name.to_string(),
                cfg: cfg.clone(),
                client: client.clone(),
                metrics: metrics.clone(),
                state: Mutex::new(TokenState::default()),
                fetch_lock: tokio::sync::Mutex::new(()),
            })),
        };
        Source {
            configured: c.clone(),
            kind,
            paused_until: Mutex::new(None),
            started: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn paused_for(&self) -> Option<Duration> {
        let until = (*self.paused_until.lock().ok()?)?;
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }
}

/// Reads an upstream 429's wait: `Retry-After` as seconds, an epoch time (a value above 10^9, as
/// Greenhouse documented for a while) or an HTTP date; else `X-RateLimit-Reset` (epoch); else a
/// default.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Duration {
    let epoch_now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let from_epoch = |e: u64| Duration::from_secs(e.saturating_sub(epoch_now));
    if let Some(v) = headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    {
        if let Ok(n) = v.parse::<u64>() {
            return if n > 1_000_000_000 {
                from_epoch(n)
            } else {
                Duration::from_secs(n)
            };
        }
        if let Ok(at) = httpdate::parse_http_date(v) {
            return at.duration_since(now).unwrap_or_default();
        }
    }
    if let Some(n) = headers
        .get("x-ratelimit-reset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return from_epoch(n);
    }
    DEFAULT_PAUSE
}

/// Whole seconds, rounded up, at least 1 (for `Retry-After`).
pub fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

fn now() -> SystemTime {
    SystemTime::now()
}

impl TokenSource {
    fn with_state<R>(&self, f: impl FnOnce(&mut TokenState) -> R) -> Option<R> {
        self.state.lock().ok().map(|mut st| f(&mut st))
    }

    fn valid_token(&self) -> Option<Token> {
        self.with_state(|st| st.token.clone())
            .flatten()
            .filter(|t| t.expires_at > now())
    }

    fn backing_off(&self) -> bool {
        self.with_state(|st| st.next_attempt)
            .flatten()
            .is_some_and(|at| at > Instant::now())
    }

    async fn get(&self) -> Result<HeaderValue, GatewayError> {
        if let Some(tok) = self.valid_token() {
            return Ok(tok.header);
        }
        if self.backing_off() {
            return Err(GatewayError::UpstreamCredentialsUnavailable);
        }
        // Waiters never wait longer than one token request.
        let wait = self.cfg.timeout + Duration::from_secs(1);
        let Ok(_guard) = tokio::time::timeout(wait, self.fetch_lock.lock()).await else {
            return Err(GatewayError::UpstreamCredentialsUnavailable);
        };
        if let Some(tok) = self.valid_token() {
            return Ok(tok.header);
        }
        if self.backing_off() {
            return Err(GatewayError::UpstreamCredentialsUnavailable);
        }
        self.fetch().await.map(|t| t.header)
    }

    async fn replace(
        &self,
        rejected: &HeaderValue,
        on_behalf_of: &str,
    ) -> Result<HeaderValue, GatewayError> {
        let wait = self.cfg.timeout + Duration::from_secs(1);
        let Ok(_guard) = tokio::time::timeout(wait, self.fetch_lock.lock()).await else {
            return Err(GatewayError::UpstreamCredentialsUnavailable);
        };
        // Someone who saw the same 401 may have replaced the token already.
        if let Some(tok) = self.valid_token()
            && tok.header != rejected
        {
            return Ok(tok.header);
        }
        let user = on_behalf_of.to_ascii_lowercase();
        let verdict = self
            .with_state(|st| {
                let current = st.token.as_ref().is_some_and(|t| t.header == rejected);
                if current && st.refused_users.contains(&user) {
                    return Err(
                        "the same token was refused for this On-Behalf-Of user after a fresh fetch",
                    );
                }
                if st
                    .last_unauthorized_fetch
                    .is_some_and(|at| at.elapsed() < MIN_UNAUTHORIZED_REFETCH)
                {
                    return Err("a 401 made a token fetch moments ago");
                }
                if current {
                    st.token = None;
                }
                st.last_unauthorized_fetch = Some(Instant::now());
                Ok(())
            })
            .unwrap_or(Err("token state unavailable"));
        if let Err(why) = verdict {
            tracing::warn!(credential = %self.name, reason = why, "upstream 401; keeping the token, no new fetch");
            return Err(GatewayError::UpstreamRejectedCredentials);
        }
        tracing::info!(credential = %self.name, "upstream rejected the token; fetching a new one");
        self.fetch().await.map(|t| t.header)
    }

    /// Renews the token ahead of expiry, and retries after failures, without any caller waiting.
    /// Ends when the credential is dropped (removed or changed by a reload).
    async fn refresher(this: std::sync::Weak<Self>) {
        loop {
            let Some(this_now) = this.upgrade() else {
                return;
            };
            let wait = this_now
                .with_state(|st| {
                    let by_backoff = st
                        .next_attempt
                        .map(|at| at.saturating_duration_since(Instant::now()));
                    let by_refresh = st
                        .token
                        .as_ref()
                        .map(|t| t.refresh_at.duration_since(now()).unwrap_or_default());
                    match (by_backoff, by_refresh) {
                        (Some(b), Some(r)) => b.max(r),
                        (Some(b), None) => b,
                        (None, Some(r)) => r,
                        (None, None) => Duration::ZERO,
                    }
                })
                .unwrap_or(MAX_BACKOFF);
            drop(this_now);
            tokio::time::sleep(wait.max(Duration::from_millis(50))).await;
            let Some(this_now) = this.upgrade() else {
                return;
            };
            let _guard = this_now.fetch_lock.lock().await;
            let due = this_now
                .with_state(|st| st.token.as_ref().is_none_or(|t| t.refresh_at <= now()))
                .unwrap_or(false);
            if due && !this_now.backing_off() {
                let _ = this_now.fetch().await;
            }
        }
    }

    async fn fetch(&self) -> Result<Token, GatewayError> {
        let span = crate::telemetry::token_fetch_span(&self.name);
        let result = self.request_token().instrument(span.clone()).await;
        let label = match &result {
            Ok(_) => "success",
            Err(TokenError::Timeout) => "timeout",
            Err(TokenError::Rejected(_)) => "rejected",
            Err(TokenError::Invalid(_)) => "invalid_response",
            Err(TokenError::Failed(_)) => "error",
        };
        span.record("result", label);
        if result.is_err() {
            crate::telemetry::mark_error(&span);
        }
        drop(span);
        self.metrics.token_fetch(&self.name, label);
        match result {
            Ok(tok) => {
                self.with_state(|st| {
                    if st.token.as_ref().is_none_or(|t| t.header != tok.header) {
                        st.refused_users.clear();
                    }
                    st.token = Some(tok.clone());
                    st.failures = 0;
                    st.next_attempt = None;
                    st.last_error = None;
                });
                Ok(tok)
            }
            Err(e) => {
                let why = e.to_string();
                let backoff = self
                    .with_state(|st| {
                        st.failures = st.failures.saturating_add(1);
                        let base = MIN_BACKOFF
                            .saturating_mul(1u32 << st.failures.min(8).saturating_sub(1))
                            .min(MAX_BACKOFF);
                        let jittered = base.mul_f64(rand::rng().random_range(0.5..=1.0));
                        st.next_attempt = Some(Instant::now() + jittered);
                        st.last_error = Some(why.clone());
                        jittered
                    })
                    .unwrap_or(MAX_BACKOFF);
                let still_valid = self.valid_token().is_some();
                if matches!(e, TokenError::Rejected(_)) {
                    // A rejected client is a configuration problem someone must fix: say so loudly.
                    tracing::error!(credential = %self.name, reason = %why, retry_in_ms = backoff.as_millis() as u64, still_valid, "the token endpoint rejected the gateway's client credentials");
                } else {
                    tracing::warn!(credential = %self.name, reason = %why, retry_in_ms = backoff.as_millis() as u64, still_valid, "upstream token request failed");
                }
                Err(GatewayError::UpstreamCredentialsUnavailable)
            }
        }
    }

    /// One token request.
    async fn request_token(&self) -> Result<Token, TokenError> {
        let cfg = &self.cfg;
        let req = self.token_request().map_err(TokenError::Failed)?;
        let (status, _headers, body) = fetch(&self.client, req, MAX_TOKEN_RESPONSE, cfg.timeout)
            .await
            .map_err(|e| match e {
                FetchError::Timeout => TokenError::Timeout,
                other => TokenError::Failed(format!("token endpoint: {}", error_chain(&other))),
            })?;
        if !status.is_success() {
            let code = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(sanitize_code));
            let text = match code {
                Some(c) => format!("token endpoint answered {status} with error {c}"),
                None => format!("token endpoint answered {status}"),
            };
            return Err(if status.is_client_error() {
                TokenError::Rejected(text)
            } else {
                TokenError::Failed(text)
            });
        }
        parse_token_response(&body, now(), cfg.refresh_before).map_err(TokenError::Invalid)
    }

    /// The RFC 6749 section 4.4.2 request, with the client authenticated as configured.
    fn token_request(&self) -> Result<Request<crate::http_client::OutBody>, String> {
        let cfg = &self.cfg;
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if let Some(scope) = &cfg.scope {
            form.append_pair("scope", scope);
        }
        for (k, v) in &cfg.extra_params {
            form.append_pair(k, v);
        }
        let mut builder = Request::builder()
            .method(Method::POST)
            .uri(cfg.token_url.clone())
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json");
        match cfg.client_auth {
            ClientAuth::Basic => {
                // RFC 6749 section 2.3.1: both parts form-urlencoded before Basic encoding.
                let enc =
                    |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                let pair = format!(
                    "{}:{}",
                    enc(&cfg.client_id),
                    enc(cfg.client_secret.expose())
                );
                let mut v = HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(pair)))
                    .map_err(|_| "client credentials cannot form a header".to_string())?;
                v.set_sensitive(true);
                builder = builder.header(header::AUTHORIZATION, v);
            }
            ClientAuth::Post => {
                form.append_pair("client_id", &cfg.client_id);
                form.append_pair("client_secret", cfg.client_secret.expose());
            }
        }
        builder
            .body(full_body(form.finish()))
            .map_err(|e| format!("cannot build request: {e}"))
    }
}

/// Why a token request failed (texts never contain a secret or a token).
#[derive(Debug, thiserror::Error)]
enum TokenError {
    #[error("token endpoint timed out")]
    Timeout,
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
}

/// Keeps an error code from a token endpoint printable and short (it is logged).
fn sanitize_code(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(64)
        .collect()
}

fn parse_token_response(
    body: &[u8],
    at: SystemTime,
    refresh_before: Duration,
) -> Result<Token, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| "token endpoint answered with a body that is not JSON".to_string())?;
    let access = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("token endpoint answered without an access_token")?;
    if let Some(tt) = v.get("token_type").and_then(Value::as_str)
        && !tt.eq_ignore_ascii_case("bearer")
    {
        return Err("token endpoint answered with a token_type other than Bearer".into());
    }
    let lifetime = token_lifetime(&v, at);
    let mut header = HeaderValue::from_str(&format!("Bearer {access}"))
        .map_err(|_| "the access_token is not a valid header value".to_string())?;
    header.set_sensitive(true);
    let expires_at = at + lifetime;
    // Refresh `refresh_before` ahead of expiry, but never earlier than half-way through a short
    // lifetime, so a short-lived token is not refreshed continuously.
    let margin = refresh_before.min(lifetime / 2);
    // Up to a tenth more, so replicas started together do not refresh together.
    let margin = margin + margin.mul_f64(rand::rng().random_range(0.0..0.1));
    Ok(Token {
        header,
        expires_at,
        refresh_at: expires_at - margin,
    })
}

/// `expires_in` (seconds) or `expires_at` (RFC 3339 or epoch seconds); absent or absurd values
/// get a conservative default.
fn token_lifetime(v: &Value, at: SystemTime) -> Duration {
    let sane = |d: Duration| (d >= Duration::from_secs(1) && d <= MAX_LIFETIME).then_some(d);
    if let Some(secs) = v.get("expires_in").and_then(|x| {
        x.as_u64()
            .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
    }) {
        return sane(Duration::from_secs(secs)).unwrap_or(DEFAULT_LIFETIME);
    }
    let at_epoch = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let expiry = match v.get("expires_at") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.parse::<i64>().ok().or_else(|| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .ok()
                .map(|t| t.unix_timestamp())
        }),
        _ => None,
    };
    match expiry {
        Some(e) if e > at_epoch => {
            sane(Duration::from_secs((e - at_epoch) as u64)).unwrap_or(DEFAULT_LIFETIME)
        }
        _ => DEFAULT_LIFETIME,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const S60: Duration = Duration::from_secs(60);

    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn expires_in_is_used_as_the_lifetime() {
        assert_eq!(
            token_lifetime(&json!({"expires_in": 3600}), at()),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn expires_at_in_rfc3339_and_epoch_are_understood() {
        assert_eq!(
            token_lifetime(&json!({"expires_at": 1_800_000_600}), at()),
            Duration::from_secs(600)
        );
        assert_eq!(
            token_lifetime(&json!({"expires_at": "2027-01-15T08:10:00Z"}), at()),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn absent_or_absurd_lifetimes_get_the_conservative_default() {
        for v in [
            json!({}),
            json!({"expires_in": 0}),
            json!({"expires_in": 999_999_999}),
            json!({"expires_at": 5}),
        ] {
            assert_eq!(token_lifetime(&v, at()), DEFAULT_LIFETIME, "{v}");
        }
    }

    #[test]
    fn empty_or_tokenless_responses_are_errors() {
        assert!(parse_token_response(b"", at(), S60).is_err());
        assert!(parse_token_response(b"{}", at(), S60).is_err());
        assert!(parse_token_response(br#"{"access_token":""}"#, at(), S60).is_err());
        assert!(
            parse_token_response(br#"{"access_token":"a","token_type":"mac"}"#, at(), S60).is_err()
        );
        assert!(parse_token_response(br#"{"access_token":"a\r\nx"}"#, at(), S60).is_err());
    }

    #[test]
    fn retry_after_in_seconds_epoch_http_date_and_reset_header() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h, at()), Duration::from_secs(7));
        h.insert("retry-after", HeaderValue::from_static("1800000030"));
        assert_eq!(retry_after(&h, at()), Duration::from_secs(30));
        h.insert(
            "retry-after",
            HeaderValue::from_static("Fri, 15 Jan 2027 08:01:00 GMT"),
        );
        assert_eq!(retry_after(&h, at()), Duration::from_secs(60));
        h.remove("retry-after");
        h.insert("x-ratelimit-reset", HeaderValue::from_static("1800000005"));
        assert_eq!(retry_after(&h, at()), Duration::from_secs(5));
        assert_eq!(retry_after(&HeaderMap::new(), at()), DEFAULT_PAUSE);
    }

    #[test]
    fn retry_after_seconds_round_up() {
        assert_eq!(ceil_secs(Duration::from_millis(1500)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(0)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(3)), 3);
    }

    #[test]
    fn token_refreshes_before_it_expires() {
        let t =
            parse_token_response(br#"{"access_token":"abc","expires_in":3600}"#, at(), S60).ok();
        let Some(t) = t else { panic!("parse failed") };
        assert_eq!(t.expires_at, at() + Duration::from_secs(3600));
        let early = (at() + Duration::from_secs(3600))
            .duration_since(t.refresh_at)
            .unwrap_or_default();
        assert!(
            early >= Duration::from_secs(60) && early <= Duration::from_secs(66),
            "{early:?}"
        );
        assert!(t.header.is_sensitive());
    }
}
