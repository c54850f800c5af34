//! Upstream credentials: the partner API key (HTTP Basic, key as user name, empty password) and
//! OAuth2 client-credentials tokens (RFC 6749 section 4.4), cached per credential.
//!
//! The token cache: callers read the cached token without waiting; a token inside its
//! `refresh_before` window is refreshed in the background while it keeps being used; a missing or
//! expired token is fetched by exactly one request while the others wait for that same fetch
//! (single flight, bounded by the credential's timeout). An expired token is never returned.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::{HeaderValue, Method, Request, header};
use serde_json::Value;

use crate::config::{ClientAuth, Credential, OAuth2Credential};
use crate::error::GatewayError;
use crate::http_client::{HttpClient, error_chain, fetch, full_body};
use crate::metrics::Metrics;

/// Lifetime assumed when the token endpoint states none, or an absurd one.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// All configured credentials, by name.
#[derive(Clone)]
pub struct UpstreamCredentials {
    sources: Arc<BTreeMap<String, Source>>,
}

#[derive(Clone)]
enum Source {
    Basic(HeaderValue),
    OAuth2(Arc<TokenSource>),
}

struct TokenSource {
    name: String,
    cfg: OAuth2Credential,
    client: HttpClient,
    metrics: Metrics,
    current: Mutex<Option<Token>>,
    fetch_lock: tokio::sync::Mutex<()>,
    refreshing: AtomicBool,
    last_error: Mutex<Option<String>>,
}

#[derive(Clone)]
struct Token {
    header: HeaderValue,
    expires_at: SystemTime,
    refresh_at: SystemTime,
}

impl UpstreamCredentials {
    pub fn new(
        credentials: &BTreeMap<String, Credential>,
        client: HttpClient,
        metrics: Metrics,
    ) -> Self {
        let sources = credentials
            .iter()
            .map(|(name, c)| {
                let src = match c {
                    Credential::Basic { api_key } => {
                        let encoded = STANDARD.encode(format!("{}:", api_key.expose()));
                        let mut v = HeaderValue::from_str(&format!("Basic {encoded}"))
                            .unwrap_or_else(|_| HeaderValue::from_static("Basic"));
                        v.set_sensitive(true);
                        Source::Basic(v)
                    }
                    Credential::OAuth2(cfg) => Source::OAuth2(Arc::new(TokenSource {
                        name: name.clone(),
                        cfg: cfg.clone(),
                        client: client.clone(),
                        metrics: metrics.clone(),
                        current: Mutex::new(None),
                        fetch_lock: tokio::sync::Mutex::new(()),
                        refreshing: AtomicBool::new(false),
                        last_error: Mutex::new(None),
                    })),
                };
                (name.clone(), src)
            })
            .collect();
        UpstreamCredentials {
            sources: Arc::new(sources),
        }
    }

    /// Fetches every OAuth2 token once, so the first callers do not wait.
    pub async fn start(&self) {
        let warmups = self.sources.values().filter_map(|s| match s {
            Source::OAuth2(t) => Some(t.clone()),
            Source::Basic(_) => None,
        });
        futures_util::future::join_all(warmups.map(|t| async move { t.get().await.ok() })).await;
    }

    /// Readiness findings: credentials that cannot currently produce a valid token.
    pub fn not_ready(&self) -> Vec<String> {
        self.sources
            .values()
            .filter_map(|s| match s {
                Source::OAuth2(t) if t.valid_token().is_none() => {
                    let why = t
                        .last_error
                        .lock()
                        .ok()
                        .and_then(|e| e.clone())
                        .unwrap_or_else(|| "no token yet".into());
                    Some(format!("credential {}: {why}", t.name))
                }
                _ => None,
            })
            .collect()
    }

    /// The `Authorization` value to send upstream for this credential.
    pub async fn authorization(&self, name: &str) -> Result<HeaderValue, GatewayError> {
        match self.sources.get(name) {
            Some(Source::Basic(v)) => Ok(v.clone()),
            Some(Source::OAuth2(t)) => t.get().await,
            None => Err(GatewayError::Internal),
        }
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

impl TokenSource {
    fn valid_token(&self) -> Option<Token> {
        let cur = self.current.lock().ok()?.clone()?;
        (cur.expires_at > now()).then_some(cur)
    }

    async fn get(self: &Arc<Self>) -> Result<HeaderValue, GatewayError> {
        if let Some(tok) = self.valid_token() {
            if tok.refresh_at <= now() && !self.refreshing.swap(true, Ordering::AcqRel) {
                let me = self.clone();
                tokio::spawn(async move {
                    let _guard = me.fetch_lock.lock().await;
                    if me.valid_token().is_none_or(|t| t.refresh_at <= now()) {
                        let _ = me.fetch().await;
                    }
                    me.refreshing.store(false, Ordering::Release);
                });
            }
            return Ok(tok.header);
        }
        let _guard = self.fetch_lock.lock().await;
        if let Some(tok) = self.valid_token() {
            return Ok(tok.header);
        }
        self.fetch().await.map(|t| t.header)
    }

    async fn fetch(&self) -> Result<Token, GatewayError> {
        let result = self.request_token().await;
        let label = match &result {
            Ok(_) => "success",
            Err(_) => "error",
        };
        self.metrics.token_fetch(&self.name, label);
        match result {
            Ok(tok) => {
                if let Ok(mut cur) = self.current.lock() {
                    *cur = Some(tok.clone());
                }
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
                Ok(tok)
            }
            Err(why) => {
                tracing::error!(credential = %self.name, reason = %why, "upstream token request failed");
                if let Ok(mut e) = self.last_error.lock() {
                    *e = Some(why);
                }
                Err(GatewayError::UpstreamCredentialsUnavailable)
            }
        }
    }

    /// One token request. The error text names what went wrong without any secret.
    async fn request_token(&self) -> Result<Token, String> {
        let cfg = &self.cfg;
        let req = self.token_request()?;
        let (status, _headers, body) = fetch(&self.client, req, MAX_TOKEN_RESPONSE, cfg.timeout)
            .await
            .map_err(|e| format!("token endpoint: {}", error_chain(&e)))?;
        if !status.is_success() {
            let code = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(sanitize_code));
            return Err(match code {
                Some(c) => format!("token endpoint answered {status} with error {c}"),
                None => format!("token endpoint answered {status}"),
            });
        }
        parse_token_response(&body, now(), cfg.refresh_before)
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
    fn token_refreshes_before_it_expires() {
        let t =
            parse_token_response(br#"{"access_token":"abc","expires_in":3600}"#, at(), S60).ok();
        let Some(t) = t else { panic!("parse failed") };
        assert_eq!(t.expires_at, at() + Duration::from_secs(3600));
        assert_eq!(t.refresh_at, at() + Duration::from_secs(3540));
        assert!(t.header.is_sensitive());
    }
}
