//! Per-issuer JWKS key cache.
//!
//! Each configured issuer owns one `IssuerKeys`: the last good set of verification keys, fetched
//! from a URL (or re-read from a file) at start, refreshed in the background and, for an unknown
//! `kid`, refetched on demand. Every fetch is single-flight: concurrent callers wait on the one
//! fetch in progress instead of starting their own. A failed fetch (error, timeout, non-200,
//! oversized, garbage, or no usable key) never replaces the last good keys.
//!
//! On-demand refetches are bounded two ways: after a refetch that succeeded, at most one more per
//! `refetch_cooldown` (so a flood of made-up `kid`s costs one fetch per cooldown); after a fetch
//! that failed, the next attempt waits a short backoff of its own ([`MIN_FAILURE_BACKOFF`]
//! doubling to [`MAX_FAILURE_BACKOFF`], never more than the cooldown), so an identity provider that
//! is restarting is neither hammered nor left unconsulted for a whole cooldown once it is back.
//! Start-up and background fetches do not consume the cooldown: a provider that signs with a new
//! key the moment it publishes it gets its first token accepted.
//!
//! Every key carries a liveness flag shared by the same key (same `kid` and material) across
//! fetches; a fetch whose set no longer holds a key clears its flag, which is how verifications
//! cached under that key stop being honoured at that very refresh.
//!
//! Keys are parsed by hand so that one odd key cannot spoil the set: unsupported key types
//! (`oct` shared secrets included), curves and algorithms, encryption keys, short RSA moduli and
//! malformed members are skipped with a count, never fatal. Key material is never logged.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{self as lc, ParsedPublicKey, VerificationAlgorithm};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::header::{ACCEPT, CACHE_CONTROL, USER_AGENT};
use http::{HeaderMap, Method, Request, StatusCode};
use jsonwebtoken::Algorithm;
use serde_json::Value;
use tokio::io::AsyncReadExt as _;
use tracing::Instrument as _;

use crate::http_client::{HttpClient, fetch, full_body};
use crate::metrics::Metrics;

/// Default background refresh period when the JWKS response carries no `max-age`.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// Default minimum time between two on-demand refetches of one issuer's keys.
pub const DEFAULT_REFETCH_COOLDOWN: Duration = Duration::from_secs(30);
/// Default clock-skew allowance for `exp`, `nbf` and `iat`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
/// Largest JWKS document accepted.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Time allowed for one JWKS fetch, connect to last body byte.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Bounds applied to a `Cache-Control: max-age` before it is used as the refresh period.
pub const MIN_MAX_AGE: Duration = Duration::from_secs(60);
/// See [`MIN_MAX_AGE`].
pub const MAX_MAX_AGE: Duration = Duration::from_secs(3600);
/// Longest `kid` accepted, in a token header or in a JWKS.
pub const MAX_KID_LEN: usize = 256;
/// First wait before an on-demand refetch after a failed fetch.
pub const MIN_FAILURE_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait before an on-demand refetch after failed fetches (also capped by the cooldown).
pub const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(5);

/// Most JWKS members examined; the rest of an oversized set is ignored (with a warning).
pub const MAX_JWKS_MEMBERS: usize = 256;
/// Most usable keys kept per issuer; later usable keys are ignored (with a warning).
pub const MAX_USABLE_KEYS: usize = 64;
/// Floor on the background refresh period, whatever the config says.
const MIN_BACKGROUND_DELAY: Duration = Duration::from_secs(1);
const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted: verifying with an 8192-bit key costs about 16 times a 2048-bit
/// one, which forged tokens could otherwise make every request pay.
pub const MAX_RSA_BITS: usize = 4096;

const RSA_ALGS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A JWKS URL (https; plain http only where the config layer allowed it, i.e. loopback).
    Url(String),
    /// A local JWKS file, re-read on every refresh.
    File(PathBuf),
}

/// One trusted token issuer.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuerConfig {
    /// Exact `iss` value.
    pub issuer: String,
    /// Accepted `aud` values; a token must name at least one.
    pub audiences: Vec<String>,
    /// Where the verification keys come from.
    pub keys: KeySource,
    /// Accepted `alg` values. HMAC algorithms are never accepted (a JWKS carries public keys).
    pub algorithms: Vec<Algorithm>,
    /// Clock-skew allowance for `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Background refresh period, used when the JWKS response has no `Cache-Control: max-age`
    /// (a `max-age` is honoured, clamped to 1 minute .. 1 hour).
    pub refresh_interval: Duration,
    /// Minimum time after a successful fetch triggered by an unknown `kid` before another one
    /// (failed fetches back off by [`MIN_FAILURE_BACKOFF`]..[`MAX_FAILURE_BACKOFF`] instead).
    pub refetch_cooldown: Duration,
}

impl IssuerConfig {
    /// An issuer with the default algorithms (ES256, ES384, RS256, PS256, EdDSA), leeway,
    /// refresh interval and refetch cooldown.
    pub fn new(issuer: impl Into<String>, audiences: Vec<String>, keys: KeySource) -> Self {
        IssuerConfig {
            issuer: issuer.into(),
            audiences,
            keys,
            algorithms: vec![
                Algorithm::ES256,
                Algorithm::ES384,
                Algorithm::RS256,
                Algorithm::PS256,
                Algorithm::EdDSA,
            ],
            leeway: DEFAULT_LEEWAY,
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            refetch_cooldown: DEFAULT_REFETCH_COOLDOWN,
        }
    }
}

/// Whether `alg` is an HMAC algorithm (never accepted: it would turn a public key into a secret).
pub(crate) fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

/// A `kid` we are willing to compare and carry around: 1..=256 printable ASCII characters.
pub(crate) fn is_valid_kid(kid: &str) -> bool {
    !kid.is_empty() && kid.len() <= MAX_KID_LEN && kid.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

/// One usable verification key.
pub(crate) struct VerificationKey {
    pub(crate) kid: Option<String>,
    /// The algorithms this key may verify (its `alg` when published, else all its type allows),
    /// each with the key parsed once, at load, for it (a verification reuses it: no key is
    /// rebuilt per token).
    parsed: Vec<(Algorithm, ParsedPublicKey)>,
    /// `kid`, key type and public material: the same key in two fetches has the same identity.
    identity: String,
    /// True while the key is in the issuer's current set; shared with the same key of later
    /// fetches and with the verifications cached under it.
    pub(crate) live: Arc<AtomicBool>,
}

impl VerificationKey {
    fn fits(&self, alg: Algorithm) -> bool {
        self.parsed.iter().any(|(a, _)| *a == alg)
    }

    /// Whether `signature` (raw bytes) signs `message` under this key with `alg`; false for an
    /// algorithm the key may not verify.
    pub(crate) fn verifies(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        self.parsed
            .iter()
            .find(|(a, _)| *a == alg)
            .is_some_and(|(_, key)| key.verify_sig(message, signature).is_ok())
    }
}

/// The aws-lc verification algorithm of a JWS `alg` (the same ones `jsonwebtoken` uses);
/// `None` for HMAC, which is never accepted.
fn lc_algorithm(alg: Algorithm) -> Option<&'static dyn VerificationAlgorithm> {
    Some(match alg {
        Algorithm::RS256 => &lc::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &lc::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &lc::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &lc::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &lc::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &lc::RSA_PSS_2048_8192_SHA512,
        Algorithm::ES256 => &lc::ECDSA_P256_SHA256_FIXED,
        Algorithm::ES384 => &lc::ECDSA_P384_SHA384_FIXED,
        Algorithm::EdDSA => &lc::ED25519,
        _ => return None,
    })
}

/// DER of an RFC 8017 `RSAPublicKey` (SEQUENCE { INTEGER n, INTEGER e }) from the big-endian
/// magnitudes of a JWK's `n` and `e`.
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    fn push_len(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
    }
    fn integer(magnitude: &[u8]) -> Vec<u8> {
        let trimmed: &[u8] = {
            let skip = magnitude.iter().take_while(|b| **b == 0).count();
            &magnitude[skip.min(magnitude.len().saturating_sub(1))..]
        };
        let pad = trimmed.first().is_some_and(|b| b & 0x80 != 0);
        let mut out = vec![0x02];
        push_len(&mut out, trimmed.len() + usize::from(pad));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(trimmed);
        out
    }
    let (n, e) = (integer(n), integer(e));
    let mut out = vec![0x30];
    push_len(&mut out, n.len() + e.len());
    out.extend_from_slice(&n);
    out.extend_from_slice(&e);
    out
}

/// The key in the form aws-lc parses, once per algorithm it may verify.
fn parse_for(
    algs: &[Algorithm],
    bytes: &[u8],
) -> Result<Vec<(Algorithm, ParsedPublicKey)>, &'static str> {
    algs.iter()
        .map(|alg| {
            let lc = lc_algorithm(*alg).ok_or("unsupported alg")?;
            ParsedPublicKey::new(lc, bytes)
                .map(|key| (*alg, key))
                .map_err(|_| "key rejected by the crypto library")
        })
        .collect()
}

/// The usable keys of one issuer, as of one successful fetch.
pub(crate) struct KeySet {
    keys: Vec<VerificationKey>,
    /// What was left out of the document and why (`kid`s and reasons, never key material), for
    /// the operator's log; empty when every member was used.
    pub(crate) skipped: String,
}

/// The outcome of looking a token's key up in a [`KeySet`]: at most one key is ever tried, so a
/// forged token costs one signature check whatever the issuer publishes.
pub(crate) enum KeyMatch<'a> {
    /// The one key to try.
    Key(&'a VerificationKey),
    /// The `kid` is known but its key cannot verify the token's `alg`.
    WrongAlgorithm,
    /// No key with this `kid` (or, without a `kid`, no key fitting the `alg`).
    Unknown,
    /// The token names no `kid` and several keys fit its `alg`.
    KidRequired,
}

impl KeySet {
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// Makes the keys of `self` that `previous` also held share its liveness flags, and clears the
    /// flags of the keys of `previous` that `self` no longer holds. Returns how many were removed.
    fn succeed(&mut self, previous: &KeySet) -> usize {
        for key in &mut self.keys {
            if let Some(old) = previous.keys.iter().find(|o| o.identity == key.identity) {
                key.live = old.live.clone();
            }
        }
        let mut removed = 0;
        for old in &previous.keys {
            if !self.keys.iter().any(|k| k.identity == old.identity) {
                old.live.store(false, Ordering::Release);
                removed += 1;
            }
        }
        removed
    }

    pub(crate) fn select(&self, kid: Option<&str>, alg: Algorithm) -> KeyMatch<'_> {
        match kid {
            Some(kid) => {
                // `kid`s are unique in the set (later duplicates are skipped at parse time).
                match self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)) {
                    Some(k) if k.fits(alg) => KeyMatch::Key(k),
                    Some(_) => KeyMatch::WrongAlgorithm,
                    None => KeyMatch::Unknown,
                }
            }
            None => {
                let mut fitting = self.keys.iter().filter(|k| k.fits(alg));
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => KeyMatch::Key(k),
                    (Some(_), Some(_)) => KeyMatch::KidRequired,
                    (None, _) => KeyMatch::Unknown,
                }
            }
        }
    }
}

/// Parses a JWKS document, keeping the usable keys. Fails when nothing usable is left.
pub(crate) fn parse_jwks(body: &[u8]) -> Result<KeySet, String> {
    let doc: Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON ({:?})", e.classify()))?;
    let members = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| "not a JWK set (no \"keys\" array)".to_string())?;
    let mut keys: Vec<VerificationKey> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let name = |member: &Value| {
        member
            .get("kid")
            .and_then(Value::as_str)
            .filter(|k| is_valid_kid(k))
            .map_or_else(|| "(no kid)".to_string(), |k| format!("kid {k:?}"))
    };
    for member in members.iter().take(MAX_JWKS_MEMBERS) {
        match parse_key(member) {
            Ok(_) if keys.len() >= MAX_USABLE_KEYS => skipped.push(format!(
                "{}: over the limit of {MAX_USABLE_KEYS} usable keys",
                name(member)
            )),
            Ok(k) if k.kid.is_some() && keys.iter().any(|o| o.kid == k.kid) => {
                skipped.push(format!("{}: a second key with this kid", name(member)))
            }
            Ok(k) => keys.push(k),
            Err(why) => skipped.push(format!("{}: {why}", name(member))),
        }
    }
    if members.len() > MAX_JWKS_MEMBERS {
        skipped.push(format!(
            "{} members after the first {MAX_JWKS_MEMBERS} not read",
            members.len() - MAX_JWKS_MEMBERS
        ));
    }
    // Bounded, whatever the document holds: the first reasons are the useful ones.
    let summary = if skipped.len() > 8 {
        format!(
            "{}; and {} more",
            skipped[..8].join("; "),
            skipped.len() - 8
        )
    } else {
        skipped.join("; ")
    };
    if keys.is_empty() {
        return Err(format!(
            "no usable keys among {} members ({summary})",
            members.len()
        ));
    }
    Ok(KeySet {
        keys,
        skipped: summary,
    })
}

/// Decodes a base64url member, tolerating trailing padding; returns the unpadded text and bytes.
fn b64_member<'a>(
    obj: &'a serde_json::Map<String, Value>,
    name: &str,
) -> Result<(&'a str, Vec<u8>), &'static str> {
    let text = obj
        .get(name)
        .and_then(Value::as_str)
        .ok_or("missing or non-string key parameter")?;
    let text = text.trim_end_matches('=');
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| "key parameter is not base64url")?;
    Ok((text, bytes))
}

fn parse_key(member: &Value) -> Result<VerificationKey, &'static str> {
    let obj = member.as_object().ok_or("not an object")?;
    let kty = obj.get("kty").and_then(Value::as_str).ok_or("no kty")?;
    if let Some(u) = obj.get("use")
        && u.as_str() != Some("sig")
    {
        return Err("use is not sig");
    }
    if let Some(ops) = obj.get("key_ops") {
        let ops = ops.as_array().ok_or("key_ops is not an array")?;
        if !ops.iter().any(|o| o.as_str() == Some("verify")) {
            return Err("key_ops lacks verify");
        }
    }
    let kid = match obj.get("kid") {
        None => None,
        Some(Value::String(k)) if is_valid_kid(k) => Some(k.clone()),
        Some(_) => return Err("bad kid"),
    };
    let published_alg = match obj.get("alg") {
        None => None,
        Some(Value::String(a)) => match Algorithm::from_str(a) {
            Ok(alg) if !is_hmac(alg) => Some(alg),
            _ => return Err("unsupported alg"),
        },
        Some(_) => return Err("non-string alg"),
    };
    let material: String;
    // The public key as aws-lc parses it: an SEC1 point, an RFC 8017 DER, raw Ed25519 bytes.
    let (possible, public): (Vec<Algorithm>, Vec<u8>) = match kty {
        "EC" => {
            let crv = obj.get("crv").and_then(Value::as_str).ok_or("no crv")?;
            let (alg, len) = match crv {
                "P-256" => (Algorithm::ES256, 32),
                "P-384" => (Algorithm::ES384, 48),
                _ => return Err("unsupported EC curve"),
            };
            let (x, xb) = b64_member(obj, "x")?;
            let (y, yb) = b64_member(obj, "y")?;
            if xb.len() != len || yb.len() != len {
                return Err("EC coordinates of the wrong length");
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&xb);
            point.extend_from_slice(&yb);
            material = format!("EC {crv} {x} {y}");
            (vec![alg], point)
        }
        "RSA" => {
            let (n, nb) = b64_member(obj, "n")?;
            let (e, eb) = b64_member(obj, "e")?;
            let n_trimmed = nb.iter().skip_while(|b| **b == 0).count();
            let bits = n_trimmed * 8;
            if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                return Err(if bits > MAX_RSA_BITS {
                    "RSA key larger than 4096 bits refused"
                } else {
                    "RSA key smaller than 2048 bits refused"
                });
            }
            if eb.iter().all(|b| *b == 0) || eb.len() > 8 {
                return Err("bad RSA exponent");
            }
            material = format!("RSA {n} {e}");
            (RSA_ALGS.to_vec(), rsa_public_key_der(&nb, &eb))
        }
        "OKP" => {
            let crv = obj.get("crv").and_then(Value::as_str).ok_or("no crv")?;
            if crv != "Ed25519" {
                return Err("unsupported OKP curve");
            }
            let (x, xb) = b64_member(obj, "x")?;
            if xb.len() != 32 {
                return Err("Ed25519 key of the wrong length");
            }
            material = format!("OKP {crv} {x}");
            (vec![Algorithm::EdDSA], xb)
        }
        _ => return Err("unsupported kty"),
    };
    let algs = match published_alg {
        Some(alg) if possible.contains(&alg) => vec![alg],
        Some(_) => return Err("alg does not fit the key type"),
        None => possible,
    };
    let parsed = parse_for(&algs, &public)?;
    let identity = format!("{} {material}", kid.as_deref().unwrap_or(""));
    Ok(VerificationKey {
        kid,
        parsed,
        identity,
        live: Arc::new(AtomicBool::new(true)),
    })
}

/// Reads `max-age` from a `Cache-Control` header, clamped to [`MIN_MAX_AGE`]..[`MAX_MAX_AGE`].
pub fn cache_max_age(headers: &HeaderMap) -> Option<Duration> {
    let mut found = None;
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { continue };
        for directive in text.split(',') {
            let directive = directive.trim();
            let Some((name, arg)) = directive.split_once('=') else {
                continue;
            };
            if name.trim().eq_ignore_ascii_case("max-age")
                && let Ok(secs) = arg.trim().trim_matches('"').parse::<u64>()
            {
                found = Some(Duration::from_secs(secs).clamp(MIN_MAX_AGE, MAX_MAX_AGE));
            }
        }
    }
    found
}

/// Counts fetch attempts of every issuer of a verifier: the total, and, when the verifier has
/// metrics, `gateway_jwks_fetches_total{issuer,result}`.
pub(crate) struct FetchCounter {
    total: AtomicU64,
    metrics: Option<Metrics>,
}

impl FetchCounter {
    pub(crate) fn new(metrics: Option<Metrics>) -> Self {
        FetchCounter {
            total: AtomicU64::new(0),
            metrics,
        }
    }

    /// Fetch attempts so far (URL or file), all issuers.
    pub(crate) fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn outcome(&self, issuer: &str, result: &'static str) {
        if let Some(m) = &self.metrics {
            m.jwks_fetch(issuer, result);
        }
    }
}

struct Snapshot {
    keys: Option<Arc<KeySet>>,
    /// Incremented at the end of every fetch attempt, good or bad.
    generation: u64,
    /// When the last on-demand refetch that succeeded started: the cooldown counts from it.
    last_refetch: Option<Instant>,
    /// Fetches failed in a row (any kind); zero after a success.
    failures: u32,
    /// After a failed fetch: no on-demand refetch before this.
    retry_at: Option<Instant>,
    /// Why the last fetch failed, while it is the latest outcome (never a secret: no URL, no
    /// body, only a status, a size or the transport error's kind).
    last_error: Option<String>,
}

/// The key cache of one issuer.
pub(crate) struct IssuerKeys {
    pub(crate) config: IssuerConfig,
    client: HttpClient,
    state: RwLock<Snapshot>,
    /// Held for the whole of a fetch: this is what makes fetches single-flight.
    fetch_lock: tokio::sync::Mutex<()>,
    fetches: Arc<FetchCounter>,
}

impl IssuerKeys {
    pub(crate) fn new(
        config: IssuerConfig,
        client: HttpClient,
        fetches: Arc<FetchCounter>,
    ) -> Self {
        IssuerKeys {
            config,
            client,
            state: RwLock::new(Snapshot {
                keys: None,
                generation: 0,
                last_refetch: None,
                failures: 0,
                retry_at: None,
                last_error: None,
            }),
            fetch_lock: tokio::sync::Mutex::new(()),
            fetches,
        }
    }

    /// The current keys (if any were ever fetched) and the fetch generation they were read at.
    pub(crate) fn current(&self) -> (Option<Arc<KeySet>>, u64) {
        let s = self.state.read().unwrap_or_else(PoisonError::into_inner);
        (s.keys.clone(), s.generation)
    }

    pub(crate) fn has_keys(&self) -> bool {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .is_some()
    }

    /// Why the latest fetch failed, when it did.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .last_error
            .clone()
    }

    /// Unconditional fetch (start and background refresh), single-flight with every other fetch.
    /// Returns how long to wait before the next background refresh.
    pub(crate) async fn refresh(&self) -> Duration {
        let _guard = self.fetch_lock.lock().await;
        self.fetch_locked().await
    }

    /// On-demand refetch after a key lookup missed at `seen_generation`. Fetches only when no
    /// fetch finished since (else the caller just uses that fetch's result) and, if the latest
    /// fetch failed, its backoff has passed, or else the last successful on-demand refetch is
    /// older than the cooldown. Returns the keys as they are afterwards.
    pub(crate) async fn refetch_if_allowed(&self, seen_generation: u64) -> Option<Arc<KeySet>> {
        let _guard = self.fetch_lock.lock().await;
        let fetch_now = {
            let s = self.state.read().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            s.generation == seen_generation
                && if s.failures > 0 {
                    s.retry_at.is_none_or(|at| now >= at)
                } else {
                    s.last_refetch
                        .is_none_or(|at| now.duration_since(at) >= self.config.refetch_cooldown)
                }
        };
        if fetch_now {
            tracing::debug!(issuer = %self.config.issuer, "jwks: on-demand refetch");
            let started = Instant::now();
            self.fetch_locked().await;
            let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
            if s.failures == 0 {
                s.last_refetch = Some(started);
            }
        }
        self.current().0
    }

    /// The wait before an on-demand refetch after `failures` failed fetches in a row.
    fn failure_backoff(&self, failures: u32) -> Duration {
        let cap = MAX_FAILURE_BACKOFF.min(self.config.refetch_cooldown);
        MIN_FAILURE_BACKOFF
            .saturating_mul(1u32 << failures.clamp(1, 16).saturating_sub(1))
            .min(cap)
    }

    /// One fetch attempt; the caller holds `fetch_lock`.
    async fn fetch_locked(&self) -> Duration {
        self.fetches.total.fetch_add(1, Ordering::Relaxed);
        let span = crate::telemetry::jwks_fetch_span(&self.config.issuer);
        // `error`: no document (transport, status, timeout, file); `invalid`: nothing usable in it.
        let outcome = match self.load().instrument(span.clone()).await {
            Ok((body, hint)) => parse_jwks(&body)
                .map(|set| (set, hint))
                .map_err(|e| ("invalid", e)),
            Err(e) => Err(("error", e)),
        };
        let result = outcome.as_ref().map_or_else(|(r, _)| *r, |_| "success");
        self.fetches.outcome(&self.config.issuer, result);
        span.record("result", if outcome.is_ok() { "ok" } else { "error" });
        if outcome.is_err() {
            crate::telemetry::mark_error(&span);
        }
        drop(span);
        let mut s = self.state.write().unwrap_or_else(PoisonError::into_inner);
        s.generation = s.generation.wrapping_add(1);
        match outcome {
            Ok((mut set, hint)) => {
                let removed = s.keys.as_ref().map_or(0, |old| set.succeed(old));
                // Said once per change, not on every refresh of the same document.
                let before = s.keys.as_ref().map(|old| old.skipped.as_str());
                if !set.skipped.is_empty() && before != Some(set.skipped.as_str()) {
                    tracing::warn!(issuer = %self.config.issuer, usable = set.len(), skipped = %set.skipped, "jwks: keys left out; tokens signed with them are refused");
                }
                tracing::debug!(issuer = %self.config.issuer, keys = set.len(), removed, "jwks: keys refreshed");
                s.keys = Some(Arc::new(set));
                s.failures = 0;
                s.retry_at = None;
                s.last_error = None;
                hint.unwrap_or(self.config.refresh_interval)
            }
            Err((_, reason)) => {
                s.failures = s.failures.saturating_add(1);
                s.retry_at = Some(Instant::now() + self.failure_backoff(s.failures));
                s.last_error = Some(reason.clone());
                tracing::warn!(
                    issuer = %self.config.issuer,
                    reason = %reason,
                    keeping_previous = s.keys.is_some(),
                    "jwks: fetch failed"
                );
                self.config
                    .refresh_interval
                    .min(self.config.refetch_cooldown.max(Duration::from_secs(1)))
            }
        }
    }

    /// Reads the raw JWKS document and, for a URL, the refresh hint from `Cache-Control`.
    async fn load(&self) -> Result<(Bytes, Option<Duration>), String> {
        match &self.config.keys {
            KeySource::Url(url) => {
                let req = Request::builder()
                    .method(Method::GET)
                    .uri(url.as_str())
                    .header(ACCEPT, "application/jwk-set+json, application/json")
                    .header(
                        USER_AGENT,
                        concat!("greenhouse-gateway/", env!("CARGO_PKG_VERSION")),
                    )
                    .body(full_body(Bytes::new()))
                    .map_err(|_| "invalid JWKS URL".to_string())?;
                let (status, headers, body) =
                    fetch(&self.client, req, MAX_JWKS_BYTES, FETCH_TIMEOUT)
                        .await
                        .map_err(|e| e.to_string())?;
                if status != StatusCode::OK {
                    return Err(format!("status {}", status.as_u16()));
                }
                Ok((body, cache_max_age(&headers)))
            }
            KeySource::File(path) => {
                let read = async {
                    let file = tokio::fs::File::open(path)
                        .await
                        .map_err(|e| format!("cannot open file: {e}"))?;
                    let mut buf = Vec::new();
                    file.take(MAX_JWKS_BYTES as u64 + 1)
                        .read_to_end(&mut buf)
                        .await
                        .map_err(|e| format!("cannot read file: {e}"))?;
                    if buf.len() > MAX_JWKS_BYTES {
                        return Err(format!("file over {MAX_JWKS_BYTES} bytes"));
                    }
                    Ok((Bytes::from(buf), None))
                };
                tokio::time::timeout(FETCH_TIMEOUT, read)
                    .await
                    .map_err(|_| "timed out".to_string())?
            }
        }
    }
}

/// Spawns the background refresh loop of one issuer. It holds only a weak reference, so it ends
/// once the verifier is dropped.
pub(crate) fn spawn_refresher(keys: &Arc<IssuerKeys>, first_delay: Duration) {
    let weak = Arc::downgrade(keys);
    tokio::spawn(async move {
        let mut delay = first_delay;
        loop {
            tokio::time::sleep(delay.max(MIN_BACKGROUND_DELAY)).await;
            let Some(keys) = weak.upgrade() else { break };
            delay = keys.refresh().await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
    use aws_lc_rs::signature::KeyPair as _;

    fn components(bits: KeySize) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let pair = KeyPair::generate(bits).unwrap();
        let der = pair.public_key().as_ref().to_vec();
        let c = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
        (c.n, c.e, der)
    }

    #[test]
    fn rsa_der_built_from_jwk_components_equals_the_library_encoding() {
        for size in [KeySize::Rsa2048, KeySize::Rsa4096] {
            let (n, e, der) = components(size);
            assert_eq!(rsa_public_key_der(&n, &e), der);
            // A JWK `n` with a leading zero octet (some encoders add one) is the same key.
            let padded: Vec<u8> = std::iter::once(0).chain(n.iter().copied()).collect();
            assert_eq!(rsa_public_key_der(&padded, &e), der);
        }
    }

    #[test]
    fn parsed_key_verifies_only_the_algorithm_it_was_parsed_for() {
        let pair = KeyPair::generate(KeySize::Rsa2048).unwrap();
        let c = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
        let key = VerificationKey {
            kid: None,
            parsed: parse_for(&[Algorithm::RS256], &rsa_public_key_der(&c.n, &c.e)).unwrap(),
            identity: String::new(),
            live: Arc::new(AtomicBool::new(true)),
        };
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut sig = vec![0; pair.public_modulus_len()];
        pair.sign(&lc::RSA_PKCS1_SHA256, &rng, b"h.p", &mut sig)
            .unwrap();
        assert!(key.verifies(Algorithm::RS256, b"h.p", &sig));
        assert!(!key.verifies(Algorithm::RS256, b"h.q", &sig));
        assert!(!key.verifies(Algorithm::RS384, b"h.p", &sig));
        sig[10] ^= 1;
        assert!(!key.verifies(Algorithm::RS256, b"h.p", &sig));
    }
}
