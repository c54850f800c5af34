//! Inbound JWT verification.
//!
//! Order of work for one token, cheapest and most suspicious first, so that nothing an attacker
//! controls can cause a key lookup, a JWKS fetch or a signature check unless everything that can
//! be checked without the key already passed:
//! 1. size cap, then exactly three non-empty base64url segments;
//! 2. the header, decoded here (not by the library): `alg` must be a known asymmetric algorithm
//!    (`none` in any spelling and HS* are refused), no embedded or remote key (`jwk`, `jku`,
//!    `x5u`, `x5c`), no `crit`, and a short printable `kid`;
//! 3. the unverified payload picks the issuer by `iss`; the issuer must allow the `alg`; `exp`
//!    and `aud` must be present, `exp`/`nbf`/`iat` within leeway, `aud` must name us;
//! 4. key lookup by `kid` (refetching the issuer's JWKS at most once per cooldown), then one
//!    signature check of `header.payload` with that key, parsed once when the JWKS was loaded
//!    (the claims checked in 3. are the ones the signature covers: the same decoded bytes).
//!
//! Verified tokens are cached by the SHA-256 of the token until (at the latest) their `exp`, each
//! entry with the liveness flag of the key that verified it: a JWKS fetch that withdraws the key
//! clears the flag, and a cache hit under a cleared flag is verified afresh (and refused).
//! Tokens, signatures and keys are never logged; only reasons, configured issuers and algorithm
//! names are.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde::Deserialize;
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::jwks::{
    FETCH_TIMEOUT, FetchCounter, IssuerConfig, IssuerKeys, KeyMatch, is_hmac, is_valid_kid,
    spawn_refresher,
};
use crate::http_client::HttpClient;
use crate::metrics::Metrics;

/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Memory for verified tokens by default (`limits.verified_token_cache_bytes`).
pub const DEFAULT_TOKEN_CACHE_BYTES: u64 = 16 * 1024 * 1024;
/// The largest budget accepted.
pub const MAX_TOKEN_CACHE_BYTES: u64 = 1 << 30;
/// What an entry costs beyond twice its token's length, in bytes: the key, the entry and its
/// reference counts, the parsed claims' map nodes and the cache's bookkeeping. An estimate: it
/// puts a 600-byte RS256 token at about 1.5 KiB, in line with the ~100 MiB a cache of 100 000
/// such tokens was seen to hold before the cache was sized by bytes.
const ENTRY_OVERHEAD_BYTES: usize = 320;
/// A cached verification is reused for at most this long (and never past the token's `exp`); a
/// key withdrawn from a JWKS stops being honoured through the cache at the fetch that sees it
/// gone (see [`Cached`]).
const MAX_CACHE_TTL: Duration = Duration::from_secs(300);
/// Upper bound on the initial fetch of all issuers' keys in [`Verifier::start`].
const START_TIMEOUT: Duration = Duration::from_secs(FETCH_TIMEOUT.as_secs() + 1);
/// Largest leeway honoured, whatever the config says.
const MAX_LEEWAY: Duration = Duration::from_secs(3600);

/// Header members that carry or point at a key; a token must never choose its own key.
const EMBEDDED_KEY_MEMBERS: [&str; 4] = ["jwk", "jku", "x5u", "x5c"];

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    /// The `iss` claim (one of the configured issuers).
    pub issuer: String,
    /// The `sub` claim, when present.
    pub subject: Option<String>,
    /// All claims of the payload.
    pub claims: Map<String, Value>,
    /// The `exp` claim, seconds since the epoch.
    pub expires_at: u64,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// The token is bad (401).
    Invalid(RejectReason),
    /// The token's issuer has no usable keys (never fetched successfully) (503).
    JwksUnavailable,
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Invalid(r) => write!(f, "invalid token: {}", r.as_str()),
            AuthError::JwksUnavailable => f.write_str("issuer keys unavailable"),
        }
    }
}

impl std::error::Error for AuthError {}

/// The precise reason a token was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    TooLarge,
    Malformed,
    Algorithm,
    UnknownIssuer,
    UnknownKey,
    /// No `kid`, and the issuer publishes several keys fitting the token's `alg`.
    KidRequired,
    Signature,
    Expired,
    NotYetValid,
    IssuedInFuture,
    MissingClaim,
    Audience,
    Crit,
    EmbeddedKey,
}

impl RejectReason {
    /// Snake-case name, used as a metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            RejectReason::TooLarge => "too_large",
            RejectReason::Malformed => "malformed",
            RejectReason::Algorithm => "algorithm",
            RejectReason::UnknownIssuer => "unknown_issuer",
            RejectReason::UnknownKey => "unknown_key",
            RejectReason::KidRequired => "kid_required",
            RejectReason::Signature => "signature",
            RejectReason::Expired => "expired",
            RejectReason::NotYetValid => "not_yet_valid",
            RejectReason::IssuedInFuture => "issued_in_future",
            RejectReason::MissingClaim => "missing_claim",
            RejectReason::Audience => "audience",
            RejectReason::Crit => "crit",
            RejectReason::EmbeddedKey => "embedded_key",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal with what a log line may say about the token besides the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub error: AuthError,
    /// The token header's `alg`: a known algorithm's name, or a short alphanumeric value as sent
    /// (such as `none`); `None` when absent or anything else (never raw input that could be long
    /// or carry control characters).
    pub alg: Option<String>,
    /// The token's `iss`, only when it is a configured issuer (an unverified token's issuer is
    /// the sender's choice).
    pub issuer: Option<String>,
}

impl From<RejectReason> for AuthError {
    fn from(r: RejectReason) -> Self {
        AuthError::Invalid(r)
    }
}

/// Verifies inbound JWTs against the configured issuers. Cheap to clone.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Issuer {
    /// The settings as configured (before capping), to tell on reload whether they changed.
    configured: IssuerConfig,
    /// Whether its keys were fetched once and its refresher runs (a reload reuses the issuer,
    /// its keys and its refresher when its settings did not change).
    started: AtomicBool,
    keys: Arc<IssuerKeys>,
    /// Accepted algorithms (configured ones minus HMAC).
    algorithms: Vec<Algorithm>,
    leeway: u64,
    audiences: HashSet<String>,
}

impl Issuer {
    fn new(configured: IssuerConfig, client: &HttpClient, fetches: &Arc<FetchCounter>) -> Issuer {
        let mut config = configured.clone();
        if config.leeway > MAX_LEEWAY {
            tracing::warn!(issuer = %config.issuer, "jwt: leeway capped at one hour");
            config.leeway = MAX_LEEWAY;
        }
        let mut algs: Vec<Algorithm> = Vec::new();
        for alg in &config.algorithms {
            if is_hmac(*alg) {
                tracing::warn!(issuer = %config.issuer, alg = ?alg, "jwt: HMAC algorithm ignored");
            } else if !algs.contains(alg) {
                algs.push(*alg);
            }
        }
        if algs.is_empty() {
            tracing::warn!(issuer = %config.issuer, "jwt: issuer has no usable algorithm; its tokens are refused");
        }
        Issuer {
            audiences: config.audiences.iter().cloned().collect(),
            leeway: config.leeway.as_secs(),
            algorithms: algs,
            keys: Arc::new(IssuerKeys::new(config, client.clone(), fetches.clone())),
            started: AtomicBool::new(false),
            configured,
        }
    }

    fn accepts(&self, alg: Algorithm) -> bool {
        self.algorithms.contains(&alg)
    }
}

type CacheKey = [u8; 32];

/// A cached verification: the token, and the liveness flag of the key that verified it.
struct Cached {
    token: Arc<VerifiedToken>,
    key_live: Arc<AtomicBool>,
    /// Its estimated memory, charged against the cache's byte budget.
    weight: u32,
}

/// An entry's estimated memory: the parsed claims take about twice the token's length (the
/// token is base64 of their JSON, signature included), plus fixed overhead.
fn cached_entry_weight(token_len: usize) -> u32 {
    u32::try_from(token_len.saturating_mul(2) + ENTRY_OVERHEAD_BYTES).unwrap_or(u32::MAX)
}

struct Inner {
    /// In configuration order (for `not_ready`).
    issuers: Vec<Arc<Issuer>>,
    by_name: HashMap<String, Arc<Issuer>>,
    /// Union of every issuer's accepted algorithms, checked before the payload is read.
    any_alg: HashSet<Algorithm>,
    /// `None` when the budget is 0: every token's signature is checked on every request.
    cache: Option<moka::future::Cache<CacheKey, Arc<Cached>>>,
    cache_bytes: u64,
    fetches: Arc<FetchCounter>,
    signature_checks: Arc<AtomicU64>,
    client: HttpClient,
}

/// Per-entry expiry of the verified-token cache: never past `exp`, never over [`MAX_CACHE_TTL`].
struct UntilExpiry;

impl moka::Expiry<CacheKey, Arc<Cached>> for UntilExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Cached>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let exp = UNIX_EPOCH + Duration::from_secs(value.token.expires_at);
        let left = exp
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Some(left.min(MAX_CACHE_TTL))
    }
}

impl Verifier {
    /// Builds a verifier; no I/O happens until [`Verifier::start`] or the first [`Verifier::verify`].
    pub fn new(issuers: Vec<IssuerConfig>, client: HttpClient) -> Self {
        Verifier::build(issuers, client, DEFAULT_TOKEN_CACHE_BYTES, None, None)
    }

    /// [`Verifier::new`] with a byte budget for verified tokens (`0`: no cache).
    pub fn with_cache_bytes(issuers: Vec<IssuerConfig>, client: HttpClient, bytes: u64) -> Self {
        Verifier::build(issuers, client, bytes, None, None)
    }

    /// [`Verifier::with_cache_bytes`], counting every key fetch in `gateway_jwks_fetches_total`
    /// (kept by the verifiers of later reloads).
    pub fn with_metrics(
        issuers: Vec<IssuerConfig>,
        client: HttpClient,
        cache_bytes: u64,
        metrics: Metrics,
    ) -> Self {
        Verifier::build(issuers, client, cache_bytes, None, Some(metrics))
    }

    /// The verifier for a reloaded configuration. An issuer whose settings did not change is
    /// the same issuer: its keys, its refresher and the tokens it verified are kept. A changed
    /// or new issuer starts without keys (call [`Verifier::start`] before using it); a removed
    /// one is dropped with its refresher. Verified tokens are kept only when no issuer changed
    /// or went away, so a token is never honoured under settings it was not checked against.
    /// The cache is also kept only when its byte budget did not change.
    pub fn reconfigured(&self, issuers: Vec<IssuerConfig>, cache_bytes: u64) -> Verifier {
        Verifier::build(
            issuers,
            self.inner.client.clone(),
            cache_bytes,
            Some(&self.inner),
            None,
        )
    }

    fn build(
        issuers: Vec<IssuerConfig>,
        client: HttpClient,
        cache_bytes: u64,
        previous: Option<&Inner>,
        metrics: Option<Metrics>,
    ) -> Self {
        let fetches = previous.map_or_else(
            || Arc::new(FetchCounter::new(metrics)),
            |p| p.fetches.clone(),
        );
        let mut list: Vec<Arc<Issuer>> = Vec::new();
        let mut by_name = HashMap::new();
        let mut any_alg = HashSet::new();
        for config in issuers {
            if by_name.contains_key(&config.issuer) {
                tracing::warn!(issuer = %config.issuer, "jwt: issuer configured twice; later entry ignored");
                continue;
            }
            let issuer = match previous
                .and_then(|p| p.by_name.get(&config.issuer))
                .filter(|old| old.configured == config)
            {
                Some(same) => same.clone(),
                None => Arc::new(Issuer::new(config, &client, &fetches)),
            };
            any_alg.extend(issuer.algorithms.iter().copied());
            by_name.insert(issuer.configured.issuer.clone(), issuer.clone());
            list.push(issuer);
        }
        let unchanged = previous.is_some_and(|p| {
            p.issuers
                .iter()
                .all(|old| list.iter().any(|new| Arc::ptr_eq(old, new)))
        });
        let cache = match previous {
            Some(p) if unchanged && p.cache_bytes == cache_bytes => p.cache.clone(),
            _ => (cache_bytes > 0).then(|| {
                moka::future::Cache::builder()
                    .name("verified-tokens")
                    .max_capacity(cache_bytes)
                    .weigher(|_key: &CacheKey, entry: &Arc<Cached>| entry.weight)
                    .expire_after(UntilExpiry)
                    .build()
            }),
        };
        Verifier {
            inner: Arc::new(Inner {
                issuers: list,
                by_name,
                any_alg,
                cache,
                cache_bytes,
                fetches,
                signature_checks: previous.map_or_else(
                    || Arc::new(AtomicU64::new(0)),
                    |p| p.signature_checks.clone(),
                ),
                client,
            }),
        }
    }

    /// Fetches the keys of every issuer not started yet in parallel (bounded in time), then
    /// spawns their background refresh tasks. Never fails: an issuer left without keys shows up
    /// in [`Verifier::not_ready`]. Issuers already started (a second call, or issuers a reload
    /// kept) are left alone.
    pub async fn start(&self) {
        let fresh: Vec<Arc<Issuer>> = self
            .inner
            .issuers
            .iter()
            .filter(|i| !i.started.swap(true, Ordering::SeqCst))
            .cloned()
            .collect();
        if fresh.is_empty() {
            return;
        }
        let initial = fresh.iter().map(|issuer| {
            let keys = issuer.keys.clone();
            async move {
                let next = keys.refresh().await;
                (keys, next)
            }
        });
        let fetched =
            tokio::time::timeout(START_TIMEOUT, futures_util::future::join_all(initial)).await;
        match fetched {
            Ok(done) => {
                for (keys, next) in done {
                    spawn_refresher(&keys, next);
                }
            }
            Err(_) => {
                tracing::warn!("jwks: initial key fetch did not finish in time");
                for issuer in &fresh {
                    let c = &issuer.keys.config;
                    spawn_refresher(&issuer.keys, c.refresh_interval.min(c.refetch_cooldown));
                }
            }
        }
        for line in self.not_ready() {
            tracing::warn!("{line}");
        }
    }

    /// One line per issuer that has no usable keys yet, naming the last fetch's failure.
    pub fn not_ready(&self) -> Vec<String> {
        self.inner
            .issuers
            .iter()
            .filter(|i| !i.keys.has_keys())
            .map(|i| {
                let issuer = &i.keys.config.issuer;
                match i.keys.last_error() {
                    Some(why) => format!("jwks: issuer {issuer}: JWKS fetch failed: {why}"),
                    None => format!("jwks: issuer {issuer} has no usable keys yet"),
                }
            })
            .collect()
    }

    /// Total JWKS fetch attempts (URL or file), all issuers.
    pub fn jwks_fetches(&self) -> u64 {
        self.inner.fetches.total()
    }

    /// Verified tokens held, and their estimated bytes (after pending evictions are applied).
    pub async fn cache_usage(&self) -> (u64, u64) {
        match &self.inner.cache {
            None => (0, 0),
            Some(c) => {
                c.run_pending_tasks().await;
                (c.entry_count(), c.weighted_size())
            }
        }
    }

    /// Total signature verifications performed.
    pub fn signature_checks(&self) -> u64 {
        self.inner.signature_checks.load(Ordering::Relaxed)
    }

    /// Verifies a raw token (no `Bearer ` prefix).
    pub async fn verify(&self, token: &str) -> Result<Arc<VerifiedToken>, AuthError> {
        self.verify_detailed(token).await.map_err(|r| r.error)
    }

    /// Like [`Verifier::verify`], with what a refusal log line may say about the token.
    pub async fn verify_detailed(&self, token: &str) -> Result<Arc<VerifiedToken>, Refusal> {
        self.verify_inner(token).await.map_err(|error| Refusal {
            error,
            alg: loggable_alg(token),
            issuer: self.configured_issuer(token),
        })
    }

    /// The unverified token's `iss` when it names a configured issuer.
    fn configured_issuer(&self, token: &str) -> Option<String> {
        if token.len() > MAX_TOKEN_BYTES {
            return None;
        }
        let payload = decode_object(token.split('.').nth(1)?).ok()?;
        let iss = payload.get("iss")?.as_str()?;
        self.inner
            .by_name
            .get_key_value(iss)
            .map(|(name, _)| name.clone())
    }

    async fn verify_inner(&self, token: &str) -> Result<Arc<VerifiedToken>, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            tracing::debug!(
                reason = RejectReason::TooLarge.as_str(),
                "jwt: token rejected"
            );
            return Err(RejectReason::TooLarge.into());
        }
        // Without a cache (`verified_token_cache_bytes = 0`) no key is hashed at all.
        let Some(cache) = self.inner.cache.as_ref() else {
            return self.verify_uncached(token).await.map(|(v, _)| Arc::new(v));
        };
        let key: CacheKey = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = cache.get(&key).await {
            if now_secs() < hit.token.expires_at && hit.key_live.load(Ordering::Acquire) {
                return Ok(hit.token.clone());
            }
            cache.invalidate(&key).await;
        }
        let (verified, key_live) = self.verify_uncached(token).await?;
        let verified = Arc::new(verified);
        if now_secs() < verified.expires_at {
            let entry = Arc::new(Cached {
                token: verified.clone(),
                key_live,
                weight: cached_entry_weight(token.len()),
            });
            cache.insert(key, entry).await;
        }
        Ok(verified)
    }

    async fn verify_uncached(
        &self,
        token: &str,
    ) -> Result<(VerifiedToken, Arc<AtomicBool>), AuthError> {
        let mut issuer: Option<Arc<Issuer>> = None;
        let result = self.check(token, &mut issuer).await;
        if let Err(e) = &result {
            let reason = match e {
                AuthError::Invalid(r) => r.as_str(),
                AuthError::JwksUnavailable => "jwks_unavailable",
            };
            let issuer = issuer
                .as_ref()
                .map_or("-", |i| i.keys.config.issuer.as_str());
            tracing::debug!(reason, issuer, "jwt: token rejected");
        }
        result
    }

    async fn check(
        &self,
        token: &str,
        issuer_seen: &mut Option<Arc<Issuer>>,
    ) -> Result<(VerifiedToken, Arc<AtomicBool>), AuthError> {
        // 1. Shape.
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(s64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(RejectReason::Malformed.into());
        };
        // Each part decoded once, here: the decoder refuses anything outside the base64url
        // alphabet, padding and non-canonical trailing bits.
        let header = decode_segment(h64)?;
        let payload = decode_segment(p64)?;
        let signature = decode_segment(s64)?;

        // 2. Header.
        let header = parse_object(&header)?;
        let alg = match header.get("alg") {
            Some(Value::String(s)) => {
                Algorithm::from_str(s).map_err(|_| RejectReason::Algorithm)?
            }
            _ => return Err(RejectReason::Algorithm.into()),
        };
        if is_hmac(alg) || !self.inner.any_alg.contains(&alg) {
            return Err(RejectReason::Algorithm.into());
        }
        if EMBEDDED_KEY_MEMBERS.iter().any(|m| header.contains_key(*m)) {
            return Err(RejectReason::EmbeddedKey.into());
        }
        if header.contains_key("crit") {
            return Err(RejectReason::Crit.into());
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) if is_valid_kid(k) => Some(k.as_str()),
            Some(_) => return Err(RejectReason::Malformed.into()),
        };

        // 3. Unverified payload: issuer and the cheap claim checks.
        let claims = parse_object(&payload)?;
        let iss = match claims.get("iss") {
            None => return Err(RejectReason::MissingClaim.into()),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(RejectReason::Malformed.into()),
        };
        let issuer = self
            .inner
            .by_name
            .get(iss)
            .ok_or(RejectReason::UnknownIssuer)?;
        *issuer_seen = Some(issuer.clone());
        if !issuer.accepts(alg) {
            return Err(RejectReason::Algorithm.into());
        }
        check_claims(&claims, issuer, now_secs())?;

        // 4. Key lookup, refetching at most once (and only as the cooldown allows).
        let (set, generation) = issuer.keys.current();
        let mut refetched = false;
        let mut set = match set {
            Some(set) => set,
            None => {
                refetched = true;
                issuer
                    .keys
                    .refetch_if_allowed(generation)
                    .await
                    .ok_or(AuthError::JwksUnavailable)?
            }
        };
        let candidate = loop {
            match set.select(kid, alg) {
                KeyMatch::Key(key) => break key,
                KeyMatch::WrongAlgorithm => return Err(RejectReason::Algorithm.into()),
                KeyMatch::KidRequired => return Err(RejectReason::KidRequired.into()),
                KeyMatch::Unknown if !refetched => {
                    refetched = true;
                    set = issuer
                        .keys
                        .refetch_if_allowed(generation)
                        .await
                        .ok_or(AuthError::JwksUnavailable)?;
                }
                KeyMatch::Unknown => return Err(RejectReason::UnknownKey.into()),
            }
        };

        // A refetch waited on the network: the times are checked again, as of now.
        if refetched {
            check_claims(&claims, issuer, now_secs())?;
        }

        // 5. Signature: one key, one check, over exactly the header and payload bytes decoded
        //    and checked above.
        self.inner.signature_checks.fetch_add(1, Ordering::Relaxed);
        let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
        if !candidate.verifies(alg, signed, &signature) {
            return Err(RejectReason::Signature.into());
        }
        let token = verified(&issuer.keys.config.issuer, claims);
        Ok((token, candidate.live.clone()))
    }
}

/// The header's `alg` in a form safe to log: a known algorithm's name, or a value of at most 16
/// ASCII letters and digits as sent; `None` otherwise.
fn loggable_alg(token: &str) -> Option<String> {
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let header = decode_object(token.split('.').next()?).ok()?;
    let alg = header.get("alg")?.as_str()?;
    if let Ok(known) = Algorithm::from_str(alg) {
        return Some(format!("{known:?}"));
    }
    (!alg.is_empty() && alg.len() <= 16 && alg.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| alg.to_owned())
}

fn verified(issuer: &str, claims: Map<String, Value>) -> VerifiedToken {
    let subject = claims.get("sub").and_then(Value::as_str).map(str::to_owned);
    let expires_at = claims
        .get("exp")
        .and_then(|v| numeric_date(v, false))
        .unwrap_or(0);
    VerifiedToken {
        issuer: issuer.to_owned(),
        subject,
        claims,
        expires_at,
    }
}

/// The claim checks that need no key. `iss` was checked by the caller.
fn check_claims(
    claims: &Map<String, Value>,
    issuer: &Issuer,
    now: u64,
) -> Result<(), RejectReason> {
    let exp = claims.get("exp").ok_or(RejectReason::MissingClaim)?;
    let aud = claims.get("aud").ok_or(RejectReason::MissingClaim)?;
    // Rounding favours rejection: exp down, nbf and iat up.
    let exp = numeric_date(exp, false).ok_or(RejectReason::Malformed)?;
    let leeway = issuer.leeway;
    if now >= exp.saturating_add(leeway) {
        return Err(RejectReason::Expired);
    }
    if let Some(nbf) = claims.get("nbf") {
        let nbf = numeric_date(nbf, true).ok_or(RejectReason::Malformed)?;
        if nbf > now.saturating_add(leeway) {
            return Err(RejectReason::NotYetValid);
        }
    }
    if let Some(iat) = claims.get("iat") {
        let iat = numeric_date(iat, true).ok_or(RejectReason::Malformed)?;
        if iat > now.saturating_add(leeway) {
            return Err(RejectReason::IssuedInFuture);
        }
    }
    if let Some(sub) = claims.get("sub")
        && !sub.is_string()
    {
        return Err(RejectReason::Malformed);
    }
    let named = match aud {
        Value::String(a) => issuer.audiences.contains(a.as_str()),
        Value::Array(list) => {
            let mut any = false;
            for a in list {
                let a = a.as_str().ok_or(RejectReason::Malformed)?;
                any |= issuer.audiences.contains(a);
            }
            any
        }
        _ => return Err(RejectReason::Malformed),
    };
    if !named {
        return Err(RejectReason::Audience);
    }
    Ok(())
}

/// A JSON NumericDate as whole seconds; `None` when not a non-negative finite number.
fn numeric_date(v: &Value, round_up: bool) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v.as_f64()?;
    if !(0.0..9.0e15).contains(&f) {
        return None;
    }
    let whole = if round_up { f.ceil() } else { f.floor() };
    // Bounded above, finite and non-negative: the conversion is exact.
    Some(whole as u64)
}

/// Decodes one non-empty base64url segment (no padding, canonical trailing bits).
fn decode_segment(segment: &str) -> Result<Vec<u8>, RejectReason> {
    if segment.is_empty() {
        return Err(RejectReason::Malformed);
    }
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| RejectReason::Malformed)
}

/// Decodes one base64url segment holding a JSON object with no duplicate members.
fn decode_object(segment: &str) -> Result<Map<String, Value>, RejectReason> {
    parse_object(&decode_segment(segment)?)
}

/// A decoded segment's JSON object, with no duplicate members.
fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, RejectReason> {
    serde_json::from_slice::<StrictObject>(bytes)
        .map(|o| o.0)
        .map_err(|_| RejectReason::Malformed)
}

/// A JSON object whose top-level members are unique (a duplicate `alg`, `kid`, `iss` or `exp`
/// could be read one way here and another way by the library).
struct StrictObject(Map<String, Value>);

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = StrictObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<StrictObject, A::Error> {
                let mut map = Map::new();
                while let Some(name) = access.next_key::<String>()? {
                    let value: Value = access.next_value()?;
                    if map.insert(name, value).is_some() {
                        return Err(A::Error::custom("duplicate member"));
                    }
                }
                Ok(StrictObject(map))
            }
        }
        deserializer.deserialize_map(ObjectVisitor)
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
