//! Unit tests of inbound JWT verification and the JWKS key cache, against a real JWKS served by a
//! tiny hyper server on 127.0.0.1 inside each test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair as _,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use greenhouse_gateway::auth::jwks::{IssuerConfig, KeySource, cache_max_age};
use greenhouse_gateway::auth::jwt::{AuthError, RejectReason, Verifier};
use greenhouse_gateway::http_client::build_client;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const ISS: &str = "https://issuer.internal";
const AUD: &str = "greenhouse-gateway";
const COOLDOWN: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------
// Keys and tokens

struct Signer {
    kid: String,
    alg: Algorithm,
    key: EncodingKey,
    jwk: Value,
    raw_public: Vec<u8>,
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn ec_signer(kid: &str) -> Signer {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    assert_eq!(point.len(), 65);
    Signer {
        kid: kid.to_string(),
        alg: Algorithm::ES256,
        key: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                    "x": b64(&point[1..33]), "y": b64(&point[33..65])}),
        raw_public: point,
    }
}

fn ed_signer(kid: &str) -> Signer {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public = pair.public_key().as_ref().to_vec();
    Signer {
        kid: kid.to_string(),
        alg: Algorithm::EdDSA,
        key: EncodingKey::from_ed_der(pkcs8.as_ref()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(&public)}),
        raw_public: public,
    }
}

fn rsa_signer(kid: &str) -> Signer {
    let der = STANDARD.decode(RSA_TEST_KEY_PKCS1_B64).unwrap();
    let pair = aws_lc_rs::rsa::KeyPair::from_der(&der).unwrap();
    let parts = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    Signer {
        kid: kid.to_string(),
        alg: Algorithm::RS256,
        key: EncodingKey::from_rsa_der(&der),
        jwk: json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(&parts.n), "e": b64(&parts.e)}),
        raw_public: parts.n.clone(),
    }
}

fn alg_name(alg: Algorithm) -> String {
    format!("{alg:?}")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": "svc-intake", "exp": now() + 600, "iat": now(), "team": "sourcing"})
}

fn header(s: &Signer) -> Value {
    json!({"alg": alg_name(s.alg), "typ": "JWT", "kid": s.kid})
}

/// Signs arbitrary header and claims JSON with `key` under `alg`.
fn sign_raw(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!(
        "{}.{}",
        b64(serde_json::to_string(header).unwrap().as_bytes()),
        b64(serde_json::to_string(claims).unwrap().as_bytes())
    );
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{signature}")
}

fn sign(s: &Signer, header: &Value, claims: &Value) -> String {
    sign_raw(header, claims, &s.key, s.alg)
}

fn good_token(s: &Signer) -> String {
    sign(s, &header(s), &claims())
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base.as_object_mut().unwrap().insert(key.to_string(), value);
    base
}

fn without(mut base: Value, key: &str) -> Value {
    base.as_object_mut().unwrap().remove(key);
    base
}

fn rejected(r: RejectReason) -> Result<(), AuthError> {
    Err(AuthError::Invalid(r))
}

// ---------------------------------------------------------------------------------------------
// JWKS server

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Serve,
    Fail,
    Garbage,
    Empty,
    Oversized,
}

struct ServerState {
    keys: Vec<Value>,
    mode: Mode,
    cache_control: Option<String>,
    delay: Duration,
}

struct JwksServer {
    url: String,
    state: Arc<Mutex<ServerState>>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(keys: Vec<Value>) -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), keys)
    }

    /// Serves on `listener` (for a server that comes up at an address that refused connections).
    fn start_on(listener: TcpListener, keys: Vec<Value>) -> Self {
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(ServerState {
            keys,
            mode: Mode::Serve,
            cache_control: None,
            delay: Duration::ZERO,
        }));
        let hits = Arc::new(AtomicUsize::new(0));
        let (st, h) = (state.clone(), hits.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let (st, h) = (st.clone(), h.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                        let (st, h) = (st.clone(), h.clone());
                        async move { Ok::<_, Infallible>(respond(&st, &h).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        JwksServer { url, state, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    fn set_keys(&self, keys: Vec<Value>) {
        self.state.lock().unwrap().keys = keys;
    }
    fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }
    fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }
    fn set_cache_control(&self, value: &str) {
        self.state.lock().unwrap().cache_control = Some(value.to_string());
    }
}

async fn respond(state: &Mutex<ServerState>, hits: &AtomicUsize) -> Response<Full<Bytes>> {
    hits.fetch_add(1, Ordering::SeqCst);
    let (mode, keys, cache_control, delay) = {
        let s = state.lock().unwrap();
        (s.mode, s.keys.clone(), s.cache_control.clone(), s.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (status, body) = match mode {
        Mode::Serve => (200, json!({ "keys": keys }).to_string()),
        Mode::Fail => (500, "oops".to_string()),
        Mode::Garbage => (200, "<html>not json".to_string()),
        Mode::Empty => (200, r#"{"keys":[]}"#.to_string()),
        Mode::Oversized => {
            let pad = "a".repeat(1024 * 1024 + 10);
            (200, json!({ "keys": keys, "pad": pad }).to_string())
        }
    };
    let mut resp = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(cc) = cache_control {
        resp = resp.header("cache-control", cc);
    }
    resp.body(Full::new(Bytes::from(body))).unwrap()
}

fn config(url: &str) -> IssuerConfig {
    IssuerConfig {
        issuer: ISS.to_string(),
        audiences: vec![AUD.to_string(), "other-audience".to_string()],
        keys: KeySource::Url(url.to_string()),
        algorithms: vec![Algorithm::ES256, Algorithm::RS256, Algorithm::EdDSA],
        leeway: Duration::from_secs(30),
        refresh_interval: Duration::from_secs(300),
        refetch_cooldown: COOLDOWN,
    }
}

fn verifier(configs: Vec<IssuerConfig>) -> Verifier {
    Verifier::new(configs, build_client(None, Duration::from_secs(2)).unwrap())
}

/// A started verifier for one issuer whose JWKS publishes `signers`.
async fn setup(signers: &[&Signer]) -> (JwksServer, Verifier) {
    let server = JwksServer::start(signers.iter().map(|s| s.jwk.clone()).collect()).await;
    let v = verifier(vec![config(&server.url)]);
    v.start().await;
    assert!(v.not_ready().is_empty(), "{:?}", v.not_ready());
    (server, v)
}

async fn check(v: &Verifier, token: &str) -> Result<(), AuthError> {
    v.verify(token).await.map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// Valid tokens

#[tokio::test]
async fn valid_es256_token_is_accepted_with_its_claims() {
    let s = ec_signer("ec-1");
    let (server, v) = setup(&[&s]).await;
    let exp = now() + 600;
    let token = sign(&s, &header(&s), &with(claims(), "exp", json!(exp)));
    let t = v.verify(&token).await.unwrap();
    assert_eq!(t.issuer, ISS);
    assert_eq!(t.subject.as_deref(), Some("svc-intake"));
    assert_eq!(t.expires_at, exp);
    assert_eq!(t.claims.get("team"), Some(&json!("sourcing")));
    assert_eq!(v.signature_checks(), 1);
    assert_eq!(v.jwks_fetches(), 1);
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn valid_rs256_token_is_accepted() {
    let s = rsa_signer("rsa-1");
    let (_server, v) = setup(&[&s]).await;
    assert_eq!(check(&v, &good_token(&s)).await, Ok(()));
}

#[tokio::test]
async fn valid_eddsa_token_is_accepted() {
    let s = ed_signer("ed-1");
    let (_server, v) = setup(&[&s]).await;
    assert_eq!(check(&v, &good_token(&s)).await, Ok(()));
}

/// Every asymmetric algorithm the gateway accepts, each signed by `jsonwebtoken` (not by the
/// code that verifies) and published in a real JWKS: accepted as signed, refused with one
/// signature byte flipped, and refused under another algorithm of the same key type (an RSA key
/// without `alg` may serve all six RSA algorithms; a PKCS#1 signature is no PSS signature).
#[tokio::test]
async fn every_accepted_algorithm_verifies_its_own_signature_and_no_other() {
    let rsa = rsa_signer("rsa-any");
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &SystemRandom::new())
            .unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = pair.public_key().as_ref().to_vec();
    let p384 = Signer {
        kid: "ec-384".into(),
        alg: Algorithm::ES384,
        key: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: json!({"kty": "EC", "crv": "P-384", "kid": "ec-384",
                    "x": b64(&point[1..49]), "y": b64(&point[49..97])}),
        raw_public: point.clone(),
    };
    let p256 = ec_signer("ec-256");
    let ed = ed_signer("ed-1");
    let server = JwksServer::start(vec![
        rsa.jwk.clone(),
        p384.jwk.clone(),
        p256.jwk.clone(),
        ed.jwk.clone(),
    ])
    .await;
    let rsa_algs = [
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::PS384,
        Algorithm::PS512,
    ];
    let mut cfg = config(&server.url);
    cfg.algorithms = rsa_algs.to_vec();
    cfg.algorithms
        .extend([Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA]);
    let v = verifier(vec![cfg]);
    v.start().await;
    assert!(v.not_ready().is_empty(), "{:?}", v.not_ready());
    let mut cases: Vec<(&Signer, Algorithm)> = rsa_algs.iter().map(|a| (&rsa, *a)).collect();
    cases.extend([
        (&p256, Algorithm::ES256),
        (&p384, Algorithm::ES384),
        (&ed, Algorithm::EdDSA),
    ]);
    for (signer, alg) in cases {
        let h = json!({"alg": alg_name(alg), "kid": signer.kid});
        let token = sign_raw(&h, &claims(), &signer.key, alg);
        assert_eq!(check(&v, &token).await, Ok(()), "{alg:?}");
        let (message, sig) = token.rsplit_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        raw[5] ^= 0x01;
        let forged = format!("{message}.{}", b64(&raw));
        assert_eq!(
            check(&v, &forged).await,
            rejected(RejectReason::Signature),
            "{alg:?}"
        );
    }
    // The RSA key signs PKCS#1 v1.5 with SHA-256; the same bytes presented as PS256 or RS384
    // must not verify.
    let rs256 = sign_raw(
        &json!({"alg": "RS256", "kid": "rsa-any"}),
        &claims(),
        &rsa.key,
        Algorithm::RS256,
    );
    let sig = rs256.rsplit_once('.').unwrap().1;
    for other in ["PS256", "RS384"] {
        let h = b64(json!({"alg": other, "kid": "rsa-any"})
            .to_string()
            .as_bytes());
        let p = b64(claims().to_string().as_bytes());
        let relabelled = format!("{h}.{p}.{sig}");
        assert_eq!(
            check(&v, &relabelled).await,
            rejected(RejectReason::Signature),
            "{other}"
        );
    }
}

#[tokio::test]
async fn token_without_kid_is_accepted_by_a_fitting_key() {
    let ec = ec_signer("ec-1");
    let ed = ed_signer("ed-1");
    let (_server, v) = setup(&[&ed, &ec]).await;
    let token = sign(&ec, &without(header(&ec), "kid"), &claims());
    assert_eq!(check(&v, &token).await, Ok(()));
    assert_eq!(
        v.signature_checks(),
        1,
        "only the key fitting ES256 is tried"
    );
}

/// An RSA JWK with a modulus of `bits` bits (never used to verify: refused before that).
fn rsa_jwk_of_bits(kid: &str, bits: usize) -> Value {
    let mut n = vec![0xC5u8; bits / 8];
    n[0] = 0xFF;
    json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(&n), "e": "AQAB"})
}

#[tokio::test]
async fn token_without_kid_when_several_keys_fit_is_refused_without_any_signature_check() {
    let a = rsa_signer("rsa-a");
    let mut b = rsa_signer("rsa-b");
    let mut c = rsa_signer("rsa-c");
    b.jwk = rsa_jwk_of_bits("rsa-b", 4096);
    c.jwk = rsa_jwk_of_bits("rsa-c", 3072);
    let (_server, v) = setup(&[&a, &b, &c]).await;
    let forged = sign(&a, &without(header(&a), "kid"), &claims());
    assert_eq!(
        check(&v, &forged).await,
        rejected(RejectReason::KidRequired)
    );
    assert_eq!(
        v.signature_checks(),
        0,
        "no key is tried for a kid-less token"
    );
    // With its kid the same token verifies, against exactly one key.
    let named = sign(&a, &header(&a), &claims());
    assert_eq!(check(&v, &named).await, Ok(()));
    assert_eq!(v.signature_checks(), 1);
}

#[tokio::test]
async fn rsa_key_over_4096_bits_is_refused_at_load_naming_its_kid_and_why() {
    let s = rsa_signer("rsa-1");
    let mut big = rsa_signer("rsa-5000");
    big.jwk = rsa_jwk_of_bits("rsa-5000", 5000);
    let server = JwksServer::start(vec![big.jwk.clone()]).await;
    let v = verifier(vec![config(&server.url)]);
    v.start().await;
    let why = v.not_ready().join("\n");
    assert!(
        why.contains("kid \"rsa-5000\": RSA key larger than 4096 bits refused"),
        "{why}"
    );
    // Beside a usable key, the big one is left out and its tokens are unknown-key refusals.
    let (_server, v) = setup(&[&s, &big]).await;
    let token = sign(&s, &header(&big), &claims());
    assert_eq!(check(&v, &token).await, rejected(RejectReason::UnknownKey));
    assert_eq!(v.signature_checks(), 0);
}

#[tokio::test]
async fn a_second_key_with_the_same_kid_is_left_out_so_one_kid_names_one_key() {
    let first = ec_signer("dup");
    let second = ec_signer("dup");
    let (_server, v) = setup(&[&first, &second]).await;
    assert_eq!(check(&v, &good_token(&first)).await, Ok(()));
    assert_eq!(
        check(&v, &good_token(&second)).await,
        rejected(RejectReason::Signature)
    );
    assert_eq!(v.signature_checks(), 2, "one check per token");
}

#[tokio::test]
async fn usable_keys_past_the_64th_are_left_out_and_their_tokens_refused() {
    let signers: Vec<Signer> = (0..65).map(|i| ec_signer(&format!("ec-{i}"))).collect();
    let refs: Vec<&Signer> = signers.iter().collect();
    let (_server, v) = setup(&refs).await;
    assert_eq!(check(&v, &good_token(&signers[63])).await, Ok(()));
    assert_eq!(
        check(&v, &good_token(&signers[64])).await,
        rejected(RejectReason::UnknownKey)
    );
}

#[tokio::test]
async fn audience_array_with_one_configured_value_is_accepted() {
    let s = ec_signer("ec-1");
    let (_server, v) = setup(&[&s]).await;
    let token = sign(
        &s,
        &header(&s),
        &with(claims(), "aud", json!(["someone-else", "other-audience"])),
    );
    assert_eq!(check(&v, &token).await, Ok(()));
}

#[tokio::test]
async fn expired_within_leeway_is_accepted() {
    let s = ec_signer("ec-1");
    let (_server, v) = setup(&[&s]).await;
    let token = sign(&s, &header(&s), &with(claims(), "exp", json!(now() - 5)));
    assert_eq!(check(&v, &token).await, Ok(()));
}

#[tokio::test]
async fn key_source_file_is_read() {
    let s = ec_signer("ec-file");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, json!({"keys": [s.jwk]}).to_string()).unwrap();
    let mut c = config("unused");
    c.keys = KeySource::File(path);
    let v = verifier(vec![c]);
    v.start().await;
    assert!(v.not_ready().is_empty());
    assert_eq!(check(&v, &good_token(&s)).await, Ok(()));
}

// ---------------------------------------------------------------------------------------------
// Algorithm and header attacks

#[tokio::test]
async fn alg_none_in_every_spelling_is_rejected_as_algorithm() {
    let s = ec_signer("ec-1");
    let (server, v) = setup(&[&s]).await;
    for alg in ["none", "None", "NONE", "nOnE", "es256", "HS256 ", ""] {
        let h = with(header(&s), "alg", json!(alg));
        let unsigned = format!(
            "{}.{}.",
            b64(h.to_string().as_bytes()),
            b64(claims().to_string().as_bytes())
        );
        assert!(check(&v, &unsigned).await.is_err(), "{alg}");
        let with_sig = format!("{unsigned}AAAA");
        assert_eq!(
            check(&v, &with_sig).await,
            rejected(RejectReason::Algorithm),
            "{alg}"
        );
    }
    let no_alg = sign(&s, &without(header(&s), "alg"), &claims());
    assert_eq!(check(&v, &no_alg).await, rejected(RejectReason::Algorithm));
    assert_eq!(v.signature_checks(), 0);
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn hs256_signed_with_the_issuer_public_key_is_rejected_as_algorithm() {
    let s = ec_signer("ec-1");
    let server = JwksServer::start(vec![s.jwk.clone()]).await;
    let mut c = config(&server.url);
    c.algorithms.push(Algorithm::HS256); // even when (wrongly) configured
    let v = verifier(vec![c]);
    v.start().await;
    let secrets: Vec<Vec<u8>> = vec![
        s.raw_public.clone(),
        s.jwk.to_string().into_bytes(),
        json!({"keys": [s.jwk]}).to_string().into_bytes(),
    ];
    for secret in secrets {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let h = json!({"alg": alg_name(alg), "kid": s.kid});
            let token = sign_raw(
                &h,
                &claims(),
                &EncodingKey::from_secret(&secret).unwrap(),
                alg,
            );
            assert_eq!(check(&v, &token).await, rejected(RejectReason::Algorithm));
        }
    }
    assert_eq!(v.signature_checks(), 0);
}

#[tokio::test]
async fn alg_not_configured_for_the_issuer_is_rejected() {
    let ec = ec_signer("ec-1");
    let rsa = rsa_signer("rsa-1");
    let server = JwksServer::start(vec![ec.jwk.clone(), rsa.jwk.clone()]).await;
    let mut only_es = config(&server.url);
    only_es.algorithms = vec![Algorithm::ES256];
    let v = verifier(vec![only_es]);
    v.start().await;
    assert_eq!(
        check(&v, &good_token(&rsa)).await,
        rejected(RejectReason::Algorithm)
    );
    assert_eq!(check(&v, &good_token(&ec)).await, Ok(()));
}

#[tokio::test]
async fn header_alg_not_fitting_the_kid_key_is_rejected() {
    let ec = ec_signer("ec-1");
    let rsa = rsa_signer("rsa-1");
    let (_server, v) = setup(&[&ec]).await;
    // RS256 token naming the EC key's kid.
    let token = sign(&rsa, &json!({"alg": "RS256", "kid": "ec-1"}), &claims());
    assert_eq!(check(&v, &token).await, rejected(RejectReason::Algorithm));
    assert_eq!(v.signature_checks(), 0);
}

#[tokio::test]
async fn embedded_jwk_and_x5c_headers_are_rejected() {
    let s = ec_signer("ec-1");
    let attacker = ec_signer("attacker");
    let (_server, v) = setup(&[&s]).await;
    let with_jwk = sign(
        &attacker,
        &with(
            without(header(&attacker), "kid"),
            "jwk",
            attacker.jwk.clone(),
        ),
        &claims(),
    );
    assert_eq!(
        check(&v, &with_jwk).await,
        rejected(RejectReason::EmbeddedKey)
    );
    let with_jwk_and_kid = sign(
        &attacker,
        &with(header(&s), "jwk", attacker.jwk.clone()),
        &claims(),
    );
    assert_eq!(
        check(&v, &with_jwk_and_kid).await,
        rejected(RejectReason::EmbeddedKey)
    );
    let with_x5c = sign(
        &attacker,
        &with(header(&s), "x5c", json!(["MIIB"])),
        &claims(),
    );
    assert_eq!(
        check(&v, &with_x5c).await,
        rejected(RejectReason::EmbeddedKey)
    );
    let with_null_jwk = sign(&s, &with(header(&s), "jwk", Value::Null), &claims());
    assert_eq!(
        check(&v, &with_null_jwk).await,
        rejected(RejectReason::EmbeddedKey)
    );
    assert_eq!(v.signature_checks(), 0);
}

#[tokio::test]
async fn jku_and_x5u_headers_are_rejected_without_any_connection() {
    let s = ec_signer("ec-1");
    let attacker = ec_signer("attacker");
    let (server, v) = setup(&[&s]).await;
    let trap = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let trap_url = format!("http://{}/jwks.json", trap.local_addr().unwrap());
    let jku = sign(
        &attacker,
        &with(header(&attacker), "jku", json!(trap_url)),
        &claims(),
    );
    assert_eq!(check(&v, &jku).await, rejected(RejectReason::EmbeddedKey));
    let x5u = sign(
        &attacker,
        &with(header(&attacker), "x5u", json!(trap_url)),
        &claims(),
    );
    assert_eq!(check(&v, &x5u).await, rejected(RejectReason::EmbeddedKey));
    let accepted = tokio::time::timeout(Duration::from_millis(150), trap.accept()).await;
    assert!(
        accepted.is_err(),
        "the jku/x5u listener must receive no connection"
    );
    assert_eq!(server.hits(), 1);
    assert_eq!(v.jwks_fetches(), 1);
}

#[tokio::test]
async fn crit_header_is_rejected_whatever_its_value() {
    let s = ec_signer("ec-1");
    let (_server, v) = setup(&[&s]).await;
    for crit in [json!(["exp"]), json!([]), json!(null), json!("b64")] {
        let token = sign(&s, &with(header(&s), "crit", crit), &claims());
        assert_eq!(check(&v, &token).await, rejected(RejectReason::Crit));
    }
}

#[tokio::test]
async fn malformed_kid_is_rejected_as_malformed() {
    let s = ec_signer("ec-1");
    let (server, v) = setup(&[&s]).await;
    for kid in [
        json!("k".repeat(257)),
        json!("a\nb"),
        json!("tab\there"),
        json!(""),
        json!(7),
        json!(null),
        json!(["ec-1"]),
    ] {
        let token = sign(&s, &with(header(&s), "kid", kid.clone()), &claims());
        assert_eq!(
            check(&v, &token).await,
            rejected(RejectReason::Malformed),
            "{kid}"
        );
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn flipped_signature_byte_is_rejected_as_signature() {
    let s = ec_signer("ec-1");
    let r = rsa_signer("rsa-1");
    let (_server, v) = setup(&[&s, &r]).await;
    for signer in [&s, &r] {
        let token = good_token(signer);
        let (message, sig) = token.rsplit_once('.').unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
        raw[10] ^= 0x01;
        let forged = format!("{message}.{}", b64(&raw));
        assert_eq!(check(&v, &forged).await, rejected(RejectReason::Signature));
        // Claims changed under a valid signature.
        let (h, _) = message.split_once('.').unwrap();
        let other_claims = b64(with(claims(), "sub", json!("admin")).to_string().as_bytes());
        let spliced = format!("{h}.{other_claims}.{sig}");
        assert_eq!(check(&v, &spliced).await, rejected(RejectReason::Signature));
        // And the genuine one still passes.
        assert_eq!(check(&v, &token).await, Ok(()));
    }
}

#[tokio::test]
async fn token_signed_by_another_key_with_a_known_kid_is_rejected_as_signature() {
    let s = ec_signer("ec-1");
    let impostor = ec_signer("ec-1");
    let (_server, v) = setup(&[&s]).await;
    assert_eq!(
        check(&v, &good_token(&impostor)).await,
        rejected(RejectReason::Signature)
    );
}

// ---------------------------------------------------------------------------------------------
// Claims

#[tokio::test]
async fn expired_token_is_rejected_as_expired() {
    let s = ec_signer("ec-1");
    let (_server, v) = setup(&[&s]).await;
    let token = sign(&s, &header(&s), &with(claims(), "exp", json!(now() - 31)));
    assert_eq!(check(&v, &token).await, rejected(RejectReason::Expired));
    let float = sign(
        &s,
        &header(&s),
        &with(claims(), "exp", json!((now() - 100) as f64 + 0.5)),
    );
    assert_eq!(check(&v, &float).await, rejected(RejectReason::Expired));
    assert_eq!(v.signature_checks(), 0);
}

#[tokio::test]
async fn nbf_in_the_future_is_rejected_as_not_yet_valid() {
    let s = ec_signer("ec-1");
    let (_server, v) = setup(&[&s]).await;
    let token = sign(&s, &header(&s), &with(claims(), "nbf", json!(now() + 120)));
    assert_eq!(check(&v, &token).await, rejected(RejectReason::NotYetValid));
    let within_leeway = sign(&s, &header(&s), &with(claims(), "nbf", json!(now() + 10)));
    assert_eq!(check(&v, &within_leeway).await, Ok(()));
}

#[tokio::test]
async fn iat_in_the_future_is_rejected_as_issued_in_future() {
    let s = ec_signer("ec-1");
    let (_server, v) = setup(&[&s]).await;
    let token = sign(&s, &header(&s), &with(claims(), "iat", json!(now() + 120)));
    assert_eq!(
        check(&v, &token).await,
        rejected(RejectReason::IssuedInFuture)
    );
}

#[tokio::test]
async fn missing_exp_iss_or_aud_is_rejected_as_missing_claim() {
    let s = ec_signer("ec-1");
    let (_server, v) = setup(&[&s]).await;
    for claim in ["exp", "iss", "aud"] {
        let token = sign(&s, &header(&s), &without(claims(), claim));
        assert_eq!(
            check(&v, &token).await,
            rejected(RejectReason::MissingClaim),
            "{claim}"
        );
    }
    assert_eq!(v.signature_checks(), 0);
}

#[tokio::test]
async fn claims_of_the_wrong_type_are_rejected_as_malformed() {
    let s = ec_signer("ec-1");
    let (_server, v) = setup(&[&s]).await;
    for (claim, value) in [
        ("exp", json!("soon")),
        ("exp", json!(-1)),
        ("iss", json!([ISS])),
        ("aud", json!(7)),
        ("aud", json!([AUD, 7])),
        ("nbf", json!(null)),
        ("sub", json!(12)),
    ] {
        let token = sign(&s, &header(&s), &with(claims(), claim, value.clone()));
        assert_eq!(
            check(&v, &token).await,
            rejected(RejectReason::Malformed),
            "{claim}={value}"
        );
    }
}

#[tokio::test]
async fn wrong_issuer_is_rejected_without_any_fetch() {
    let s = ec_signer("ec-1");
    let (server, v) = setup(&[&s]).await;
    for iss in [
        "https://evil.example",
        "https://issuer.internal/",
        "HTTPS://ISSUER.INTERNAL",
    ] {
        let token = sign(&s, &header(&s), &with(claims(), "iss", json!(iss)));
        assert_eq!(
            check(&v, &token).await,
            rejected(RejectReason::UnknownIssuer),
            "{iss}"
        );
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn wrong_audience_is_rejected_as_audience() {
    let s = ec_signer("ec-1");
    let (_server, v) = setup(&[&s]).await;
    for aud in [
        json!("someone-else"),
        json!([]),
        json!(["a", "b"]),
        json!("GREENHOUSE-GATEWAY"),
    ] {
        let token = sign(&s, &header(&s), &with(claims(), "aud", aud.clone()));
        assert_eq!(
            check(&v, &token).await,
            rejected(RejectReason::Audience),
            "{aud}"
        );
    }
}

#[tokio::test]
async fn claim_checks_run_before_key_lookup_or_fetch() {
    let s = ec_signer("ec-1");
    let (server, v) = setup(&[&s]).await;
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    let unknown = with(header(&s), "kid", json!("never-published"));
    let expired = sign(&s, &unknown, &with(claims(), "exp", json!(now() - 600)));
    assert_eq!(check(&v, &expired).await, rejected(RejectReason::Expired));
    let wrong_aud = sign(&s, &unknown, &with(claims(), "aud", json!("x")));
    assert_eq!(
        check(&v, &wrong_aud).await,
        rejected(RejectReason::Audience)
    );
    assert_eq!(server.hits(), 1);
    assert_eq!(v.signature_checks(), 0);
}

// ---------------------------------------------------------------------------------------------
// Shape

#[tokio::test]
async fn oversized_token_is_rejected_as_too_large() {
    let s = ec_signer("ec-1");
    let (_server, v) = setup(&[&s]).await;
    assert_eq!(
        check(&v, &"a".repeat(8 * 1024 + 1)).await,
        rejected(RejectReason::TooLarge)
    );
    let big = sign(
        &s,
        &header(&s),
        &with(claims(), "pad", json!("x".repeat(7000))),
    );
    assert!(big.len() > 8 * 1024);
    assert_eq!(check(&v, &big).await, rejected(RejectReason::TooLarge));
    assert_eq!(v.signature_checks(), 0);
}

#[tokio::test]
async fn malformed_segments_are_rejected_as_malformed() {
    let s = ec_signer("ec-1");
    let (server, v) = setup(&[&s]).await;
    let good = good_token(&s);
    let (h, rest) = good.split_once('.').unwrap();
    let (p, sig) = rest.split_once('.').unwrap();
    let enc = |v: &str| b64(v.as_bytes());
    let cases = vec![
        String::new(),
        "abc".to_string(),
        format!("{h}.{p}"),
        format!("{h}.{p}.{sig}.{sig}"),
        format!("{h}..{sig}"),
        format!(".{p}.{sig}"),
        format!("{h}.{p}.{sig}="),
        format!("{h}=.{p}.{sig}"),
        format!("{h}.{p}.{sig}+"),
        format!("{h}.{p}.{}", &sig[..sig.len() - 1]) + "*",
        format!(" {good}"),
        format!("{}.{p}.{sig}", enc("not json")),
        format!("{}.{p}.{sig}", enc("[1,2]")),
        format!("{}.{p}.{sig}", enc(r#"{"alg":"ES256","kid":"ec-1"} x"#)),
        format!(
            "{}.{p}.{sig}",
            enc(r#"{"alg":"ES256","alg":"ES256","kid":"ec-1"}"#)
        ),
        format!("{h}.{}.{sig}", enc("\"a string\"")),
        format!(
            "{h}.{}.{sig}",
            enc(&format!(
                r#"{{"iss":"{ISS}","iss":"{ISS}","aud":"{AUD}","exp":{}}}"#,
                now() + 60
            ))
        ),
        format!("{h}.{p}.a"),
    ];
    for token in cases {
        assert_eq!(
            check(&v, &token).await,
            rejected(RejectReason::Malformed),
            "{token:.60}"
        );
    }
    assert_eq!(v.signature_checks(), 0);
    assert_eq!(server.hits(), 1);
}

// ---------------------------------------------------------------------------------------------
// Key lookup, refetch and the JWKS cache

#[tokio::test]
async fn unknown_kid_is_rejected_as_unknown_key_after_one_refetch() {
    let s = ec_signer("ec-1");
    let stranger = ec_signer("stranger");
    let (server, v) = setup(&[&s]).await;
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    assert_eq!(
        check(&v, &good_token(&stranger)).await,
        rejected(RejectReason::UnknownKey)
    );
    assert_eq!(server.hits(), 2);
    // Within the cooldown: no further fetch.
    assert_eq!(
        check(&v, &good_token(&stranger)).await,
        rejected(RejectReason::UnknownKey)
    );
    assert_eq!(server.hits(), 2);
    assert_eq!(v.signature_checks(), 0);
}

#[tokio::test]
async fn key_rotation_new_kid_is_accepted_after_one_refetch_and_old_key_still_works() {
    let old = ec_signer("2024-old");
    let new = ed_signer("2025-new");
    let (server, v) = setup(&[&old]).await;
    let old_token = good_token(&old);
    assert_eq!(check(&v, &old_token).await, Ok(()));
    server.set_keys(vec![old.jwk.clone(), new.jwk.clone()]);
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    assert_eq!(check(&v, &good_token(&new)).await, Ok(()));
    assert_eq!(server.hits(), 2);
    // A fresh token under the old key (not from the token cache) still verifies, no fetch.
    assert_eq!(
        check(
            &v,
            &sign(&old, &header(&old), &with(claims(), "jti", json!("2")))
        )
        .await,
        Ok(())
    );
    assert_eq!(check(&v, &good_token(&new)).await, Ok(()));
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn random_kid_flood_causes_at_most_one_refetch_within_cooldown() {
    let s = ec_signer("ec-1");
    let (server, v) = setup(&[&s]).await;
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    let tokens: Vec<String> = (0..50)
        .map(|_| {
            let kid = format!("random-{}", rand::random::<u64>());
            sign(&s, &with(header(&s), "kid", json!(kid)), &claims())
        })
        .collect();
    let tasks: Vec<_> = tokens
        .into_iter()
        .map(|t| {
            let v = v.clone();
            tokio::spawn(async move { v.verify(&t).await.map(|_| ()) })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), rejected(RejectReason::UnknownKey));
    }
    assert_eq!(server.hits(), 2);
    assert_eq!(v.jwks_fetches(), server.hits() as u64);
    assert_eq!(v.signature_checks(), 0);
    // And again sequentially, still inside the cooldown.
    for _ in 0..20 {
        let token = sign(
            &s,
            &with(
                header(&s),
                "kid",
                json!(format!("r{}", rand::random::<u32>())),
            ),
            &claims(),
        );
        assert_eq!(check(&v, &token).await, rejected(RejectReason::UnknownKey));
    }
    assert_eq!(server.hits(), 2);
}

/// A verifier whose refetch cooldown is long (30 s), so anything accepted within a test's few
/// seconds was not waiting for a cooldown to pass.
async fn setup_long_cooldown(signers: &[&Signer]) -> (JwksServer, Verifier) {
    let server = JwksServer::start(signers.iter().map(|s| s.jwk.clone()).collect()).await;
    let mut c = config(&server.url);
    c.refetch_cooldown = Duration::from_secs(30);
    let v = verifier(vec![c]);
    v.start().await;
    assert!(v.not_ready().is_empty(), "{:?}", v.not_ready());
    (server, v)
}

/// Polls `token` until it verifies or `within` passes; how long it took.
async fn accepted_within(v: &Verifier, token: &str, within: Duration) -> Option<Duration> {
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        if check(v, token).await.is_ok() {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

#[tokio::test]
async fn cached_verification_of_a_withdrawn_key_is_refused_at_the_refresh_that_withdraws_it() {
    let old = ec_signer("withdrawn");
    let kept = ec_signer("kept");
    let next = ec_signer("next");
    let (server, v) = setup(&[&old, &kept]).await;
    let old_token = good_token(&old);
    let kept_token = good_token(&kept);
    assert_eq!(check(&v, &old_token).await, Ok(()));
    assert_eq!(check(&v, &kept_token).await, Ok(()));
    assert_eq!(check(&v, &old_token).await, Ok(()), "served from the cache");
    let checks = v.signature_checks();
    assert_eq!(checks, 2);

    // The provider withdraws the old key and publishes a new one; a token under the new kid makes
    // the gateway refetch (the way a refresh happens in a test).
    server.set_keys(vec![kept.jwk.clone(), next.jwk.clone()]);
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    assert_eq!(check(&v, &good_token(&next)).await, Ok(()));
    assert_eq!(server.hits(), 2);

    assert_eq!(
        check(&v, &old_token).await,
        rejected(RejectReason::UnknownKey),
        "a cached verification must not outlive its key's withdrawal"
    );
    // A key still published keeps its cached verifications: no new signature check.
    let before = v.signature_checks();
    assert_eq!(check(&v, &kept_token).await, Ok(()));
    assert_eq!(
        v.signature_checks(),
        before,
        "kept key's entry still cached"
    );
}

#[tokio::test]
async fn key_replaced_under_the_same_kid_drops_cached_verifications_of_the_old_material() {
    let first = ec_signer("same-kid");
    let second = ec_signer("same-kid");
    let other = ec_signer("other");
    let (server, v) = setup(&[&first]).await;
    let token = good_token(&first);
    assert_eq!(check(&v, &token).await, Ok(()));
    server.set_keys(vec![second.jwk.clone(), other.jwk.clone()]);
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    assert_eq!(check(&v, &good_token(&other)).await, Ok(()));
    assert_eq!(
        check(&v, &token).await,
        rejected(RejectReason::Signature),
        "the kid is still published, but not the key that signed this token"
    );
}

#[tokio::test]
async fn new_kid_published_at_the_moment_of_signing_is_accepted_on_first_use() {
    // The start-up fetch was a moment ago: it must not count as the cooldown's refetch.
    let old = ec_signer("old");
    let new = ec_signer("new-at-once");
    let (server, v) = setup_long_cooldown(&[&old]).await;
    server.set_keys(vec![old.jwk.clone(), new.jwk.clone()]);
    assert_eq!(
        check(&v, &good_token(&new)).await,
        Ok(()),
        "first token under a just-published key"
    );
    assert_eq!(server.hits(), 2, "one refetch for the new kid");
    // The cooldown still bounds made-up kids after that refetch.
    for i in 0..5 {
        assert_eq!(
            check(&v, &good_token(&ec_signer(&format!("made-up-{i}")))).await,
            rejected(RejectReason::UnknownKey)
        );
    }
    assert_eq!(
        server.hits(),
        2,
        "made-up kids inside the cooldown: no fetch"
    );
}

#[tokio::test]
async fn failed_fetches_during_an_idp_restart_do_not_consume_the_cooldown() {
    let old = ec_signer("before-restart");
    let new = ec_signer("after-restart");
    let server = JwksServer::start(vec![old.jwk.clone()]).await;
    let mut c = config(&server.url);
    c.refetch_cooldown = Duration::from_secs(3);
    let v = verifier(vec![c]);
    v.start().await;
    // Whatever the start-up fetch counts for, it is out of the cooldown now.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    // The provider restarts (answers 500) and comes back with a rotated set.
    server.set_mode(Mode::Fail);
    server.set_keys(vec![new.jwk.clone()]);
    let token = good_token(&new);
    assert_eq!(
        check(&v, &token).await,
        rejected(RejectReason::UnknownKey),
        "while the provider is down"
    );
    let hits_down = server.hits();
    assert_eq!(hits_down, 2, "one failed refetch");
    // Failed fetches back off: a burst of requests does not hammer the provider.
    for _ in 0..20 {
        assert_eq!(check(&v, &token).await, rejected(RejectReason::UnknownKey));
    }
    assert!(
        server.hits() <= hits_down + 1,
        "{} fetches for 20 requests while down",
        server.hits() - hits_down
    );
    assert_eq!(check(&v, &good_token(&old)).await, Ok(()), "old keys kept");

    server.set_mode(Mode::Serve);
    let took = accepted_within(&v, &token, Duration::from_millis(1500)).await;
    assert!(
        took.is_some(),
        "new-kid token still refused 1.5 s after the provider came back: the failed fetch \
         consumed the 3 s cooldown"
    );
}

#[tokio::test]
async fn refused_connections_during_an_idp_restart_do_not_consume_the_cooldown() {
    let new = ec_signer("after");
    // 127.0.0.2: no other test server can take the port while it refuses connections.
    let closed = TcpListener::bind("127.0.0.2:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let url = format!("http://{addr}/jwks.json");
    let mut c = config(&url);
    c.refetch_cooldown = Duration::from_secs(30);
    let v = verifier(vec![c]);
    v.start().await;
    assert_eq!(
        check(&v, &good_token(&new)).await,
        Err(AuthError::JwksUnavailable)
    );
    for _ in 0..10 {
        assert_eq!(
            check(&v, &good_token(&new)).await,
            Err(AuthError::JwksUnavailable)
        );
    }
    let fetches_down = v.jwks_fetches();
    assert!(
        fetches_down <= 3,
        "{fetches_down} fetch attempts for 11 requests against a refused port"
    );
    // The provider comes up on that address.
    let server = JwksServer::start_on(
        TcpListener::bind(addr).await.unwrap(),
        vec![new.jwk.clone()],
    );
    assert_eq!(server.url, url);
    let took = accepted_within(&v, &good_token(&new), Duration::from_secs(3)).await;
    assert!(
        took.is_some(),
        "token refused 3 s after the provider came back (cooldown 30 s)"
    );
    assert!(v.not_ready().is_empty());
}

#[tokio::test]
async fn jwks_outage_with_cached_keys_still_verifies() {
    let s = ec_signer("ec-1");
    let (server, v) = setup(&[&s]).await;
    server.set_mode(Mode::Fail);
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    // Unknown kid triggers a (failing) refetch: still a 401, not a 503.
    assert_eq!(
        check(&v, &good_token(&ec_signer("new"))).await,
        rejected(RejectReason::UnknownKey)
    );
    assert_eq!(server.hits(), 2);
    assert_eq!(check(&v, &good_token(&s)).await, Ok(()));
    assert!(v.not_ready().is_empty());
}

#[tokio::test]
async fn jwks_never_available_gives_jwks_unavailable_and_not_ready() {
    let s = ec_signer("ec-1");
    let server = JwksServer::start(vec![s.jwk.clone()]).await;
    server.set_mode(Mode::Fail);
    let v = verifier(vec![config(&server.url)]);
    v.start().await;
    assert_eq!(
        v.not_ready(),
        vec![format!("jwks: issuer {ISS}: JWKS fetch failed: status 500")]
    );
    assert_eq!(
        check(&v, &good_token(&s)).await,
        Err(AuthError::JwksUnavailable)
    );
    assert_eq!(server.hits(), 1, "inside the cooldown no refetch");
    // Unreachable URL: same outcome.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_url = format!("http://{}/jwks.json", closed.local_addr().unwrap());
    drop(closed);
    let v2 = verifier(vec![config(&dead_url)]);
    v2.start().await;
    assert_eq!(v2.not_ready().len(), 1);
    assert!(
        v2.not_ready()[0].contains("Connection refused"),
        "the reason names the refused connection: {:?}",
        v2.not_ready()
    );
    assert_eq!(
        check(&v2, &good_token(&s)).await,
        Err(AuthError::JwksUnavailable)
    );
    // Once the JWKS comes back, the next request after the cooldown fetches and succeeds.
    server.set_mode(Mode::Serve);
    tokio::time::sleep(COOLDOWN + Duration::from_millis(50)).await;
    assert_eq!(check(&v, &good_token(&s)).await, Ok(()));
    assert!(v.not_ready().is_empty());
}

#[tokio::test]
async fn twenty_concurrent_first_verifications_cause_one_fetch() {
    let s = ec_signer("ec-1");
    let server = JwksServer::start(vec![s.jwk.clone()]).await;
    server.set_delay(Duration::from_millis(100));
    let v = verifier(vec![config(&server.url)]); // not started
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let v = v.clone();
            let token = sign(&s, &header(&s), &with(claims(), "jti", json!(i)));
            tokio::spawn(async move { v.verify(&token).await.map(|_| ()) })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), Ok(()));
    }
    assert_eq!(server.hits(), 1);
    assert_eq!(v.jwks_fetches(), 1);
}

#[tokio::test]
async fn verified_token_cache_skips_the_signature_check() {
    let s = ec_signer("ec-1");
    let (_server, v) = setup(&[&s]).await;
    let token = good_token(&s);
    let first = v.verify(&token).await.unwrap();
    assert_eq!(v.signature_checks(), 1);
    let second = v.verify(&token).await.unwrap();
    assert_eq!(v.signature_checks(), 1);
    assert!(Arc::ptr_eq(&first, &second));
    // Failures are not cached: a bad token costs a check every time.
    let (m, sig) = token.rsplit_once('.').unwrap();
    let mut raw = URL_SAFE_NO_PAD.decode(sig).unwrap();
    raw[0] ^= 0x80;
    let bad = format!("{m}.{}", b64(&raw));
    for _ in 0..2 {
        assert_eq!(check(&v, &bad).await, rejected(RejectReason::Signature));
    }
    assert_eq!(v.signature_checks(), 3);
}

#[tokio::test]
async fn cached_token_is_not_served_past_its_exp() {
    let s = ec_signer("ec-1");
    let server = JwksServer::start(vec![s.jwk.clone()]).await;
    let mut c = config(&server.url);
    c.leeway = Duration::ZERO;
    let v = verifier(vec![c]);
    v.start().await;
    let token = sign(&s, &header(&s), &with(claims(), "exp", json!(now() + 1)));
    assert_eq!(check(&v, &token).await, Ok(()));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(check(&v, &token).await, rejected(RejectReason::Expired));
}

#[tokio::test]
async fn garbage_empty_failing_or_oversized_jwks_keeps_the_previous_keys() {
    let s = ec_signer("ec-1");
    let (server, v) = setup(&[&s]).await;
    let mut expected_hits = 1;
    for (i, mode) in [Mode::Garbage, Mode::Empty, Mode::Fail, Mode::Oversized]
        .into_iter()
        .enumerate()
    {
        server.set_mode(mode);
        tokio::time::sleep(COOLDOWN + Duration::from_millis(30)).await;
        assert_eq!(
            check(&v, &good_token(&ec_signer("unpublished"))).await,
            rejected(RejectReason::UnknownKey)
        );
        expected_hits += 1;
        assert_eq!(server.hits(), expected_hits);
        let fresh = sign(&s, &header(&s), &with(claims(), "jti", json!(i)));
        assert_eq!(check(&v, &fresh).await, Ok(()));
    }
    // A set of only unusable keys is no better than an empty one.
    server.set_mode(Mode::Serve);
    server.set_keys(vec![json!({"kty": "oct", "kid": "ec-1", "k": "c2VjcmV0"})]);
    tokio::time::sleep(COOLDOWN + Duration::from_millis(30)).await;
    assert_eq!(
        check(&v, &good_token(&ec_signer("x"))).await,
        rejected(RejectReason::UnknownKey)
    );
    assert_eq!(
        check(
            &v,
            &sign(&s, &header(&s), &with(claims(), "jti", json!("last")))
        )
        .await,
        Ok(())
    );
    assert!(v.not_ready().is_empty());
}

#[tokio::test]
async fn unsupported_keys_in_the_jwks_are_skipped_not_fatal() {
    let s = ec_signer("ec-good");
    let rng = SystemRandom::new();
    let p384 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).unwrap();
    let p384 = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, p384.as_ref()).unwrap();
    let pt = p384.public_key().as_ref();
    let keys = vec![
        json!({"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"}),
        json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}),
        json!({"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc", "x": s.jwk["x"], "y": s.jwk["y"]}),
        json!({"kty": "RSA", "kid": "short-rsa", "n": b64(&[0xc5; 128]), "e": "AQAB"}),
        json!({"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP", "n": rsa_signer("x").jwk["n"], "e": "AQAB"}),
        json!({"kty": "EC", "crv": "P-256", "kid": "mismatch", "alg": "RS256", "x": s.jwk["x"], "y": s.jwk["y"]}),
        json!({"kty": "EC", "crv": "P-384", "kid": "p384", "x": b64(&pt[1..49]), "y": b64(&pt[49..97])}),
        json!({"kty": "EC", "crv": "P-256", "kid": 5, "x": s.jwk["x"], "y": s.jwk["y"]}),
        json!({"kty": "XYZ", "kid": "weird"}),
        json!("not an object"),
        s.jwk.clone(),
    ];
    let server = JwksServer::start(keys).await;
    let v = verifier(vec![config(&server.url)]);
    v.start().await;
    assert!(v.not_ready().is_empty());
    assert_eq!(check(&v, &good_token(&s)).await, Ok(()));
    // The skipped `oct` key can't be used to verify an HMAC token.
    let hmac = sign_raw(
        &json!({"alg": "HS256", "kid": "hmac"}),
        &claims(),
        &EncodingKey::from_secret(b"secret").unwrap(),
        Algorithm::HS256,
    );
    assert_eq!(check(&v, &hmac).await, rejected(RejectReason::Algorithm));
    // A token naming the skipped encryption key is an unknown key.
    let enc = sign(&s, &with(header(&s), "kid", json!("enc")), &claims());
    assert_eq!(check(&v, &enc).await, rejected(RejectReason::UnknownKey));
}

#[tokio::test]
async fn two_issuers_have_independent_keys() {
    let a = ec_signer("shared-kid");
    let b = ec_signer("shared-kid");
    let server_a = JwksServer::start(vec![a.jwk.clone()]).await;
    let server_b = JwksServer::start(vec![b.jwk.clone()]).await;
    let mut cb = config(&server_b.url);
    cb.issuer = "https://other.internal".to_string();
    let v = verifier(vec![config(&server_a.url), cb]);
    v.start().await;
    assert_eq!(v.jwks_fetches(), 2);
    assert_eq!(check(&v, &good_token(&a)).await, Ok(()));
    let b_claims = with(claims(), "iss", json!("https://other.internal"));
    assert_eq!(check(&v, &sign(&b, &header(&b), &b_claims)).await, Ok(()));
    // b's key does not verify a's issuer, even with the same kid.
    assert_eq!(
        check(&v, &sign(&b, &header(&b), &claims())).await,
        rejected(RejectReason::Signature)
    );
}

#[tokio::test]
async fn cache_control_max_age_is_parsed_and_clamped() {
    let mut h = http::HeaderMap::new();
    assert_eq!(cache_max_age(&h), None);
    h.insert("cache-control", "public, max-age=600".parse().unwrap());
    assert_eq!(cache_max_age(&h), Some(Duration::from_secs(600)));
    h.insert("cache-control", "max-age=5".parse().unwrap());
    assert_eq!(cache_max_age(&h), Some(Duration::from_secs(60)));
    h.insert("cache-control", "MAX-AGE=999999".parse().unwrap());
    assert_eq!(cache_max_age(&h), Some(Duration::from_secs(3600)));
    h.insert("cache-control", "no-cache, max-age=bogus".parse().unwrap());
    assert_eq!(cache_max_age(&h), None);
    // And a JWKS response carrying one is fetched fine.
    let s = ec_signer("ec-1");
    let server = JwksServer::start(vec![s.jwk.clone()]).await;
    server.set_cache_control("public, max-age=120");
    let v = verifier(vec![config(&server.url)]);
    v.start().await;
    assert_eq!(check(&v, &good_token(&s)).await, Ok(()));
}

#[test]
fn reject_reasons_have_snake_case_labels() {
    let all = [
        (RejectReason::TooLarge, "too_large"),
        (RejectReason::Malformed, "malformed"),
        (RejectReason::Algorithm, "algorithm"),
        (RejectReason::UnknownIssuer, "unknown_issuer"),
        (RejectReason::UnknownKey, "unknown_key"),
        (RejectReason::Signature, "signature"),
        (RejectReason::Expired, "expired"),
        (RejectReason::NotYetValid, "not_yet_valid"),
        (RejectReason::IssuedInFuture, "issued_in_future"),
        (RejectReason::MissingClaim, "missing_claim"),
        (RejectReason::Audience, "audience"),
        (RejectReason::Crit, "crit"),
        (RejectReason::EmbeddedKey, "embedded_key"),
    ];
    for (r, label) in all {
        assert_eq!(r.as_str(), label);
    }
}

// A throwaway 2048-bit RSA key (PKCS#1 DER), used only to sign test tokens.
const RSA_TEST_KEY_PKCS1_B64: &str = concat!(
    "MIIEowIBAAKCAQEArFLIjWhc5QB9lXFjZmYJUrMFZkmUQ1YDc3BNi18IIQ7BKBZQpyF0JX0XesP5zke/HZWUI2YUu0KvL1SC",
    "vEaX/gdjBilEJkndiYNxZ+B3eRLyiesa03pnMvz8VdOb0h8UEOrTZx+TOm30JUm4lXb73TPkFdPiJFRbUjlyklUko/e3t6uC",
    "x+SCclvPBSCYymF1UipzTnJk1kS+moOd9fGrcB4zrpTiN9lW/1D7wCIjmilPDe3QexisIxLXUn1L3vNUcfb+Pr1RZoNe+iRA",
    "/jel19ufFnUr5UtVtVe7TVPed7aodypJYYfu48bp2nrSLkgz/XkCABU+H5fcye1szJLMDQIDAQABAoIBABypGBoMxYaA8mIs",
    "na+mQN60T62Xh0U7xQ8qGnuXrq5w2cdlDrz9X2fsyj7s4Vthq3OsMRtCGyiaCrEAiU3vH9BsQhgAPQlxN5trdS0ltDk64YP2",
    "yltp/EgKs51CuKPV72xw4gBAzCfnqbeZ701MoM9FliXbO713GkkurNORvapXftFmnvE+Zjv/SansexNSSDu2s7Sai01+mPeq",
    "u85XTFZHezFWDRWqIKet7m6nNJHpG412qAIf1RJE5HD++BAqF0LWrIZwVO8PmpPZhSsOzSF2iseLyxVeaQ7dDBhPgBehE2PV",
    "BG1B1200R0mUK4jDz2ZlneKplw1S0tlJsIS8tzECgYEA51p0dith6JG844A5xWFd855A6aBHT5SplTUbqWd5Zb/lIx1KaXI8",
    "dfCCsrPxKhWEQ8m71hHGXrVCSmAjaC6ekpuMrkX8sMC3m3S9cKZF62v4sLeKZxGePLxk37XZugdAYxnHFq7614SFkbRXAxRE",
    "ObPZiZJG+4w7PIh2OlSOWk8CgYEAvq5xkaP+htghRs4g3D7k/Cj+IBo/AGZLQCvrNXJ+yRSPdaIT7UU1ZCmdAjMLymzuYXKN",
    "Wh98CGyMGFEPvfF6cU4OQuMf/xOa37eo7VvkAgBTwNo01GT5UugVRB7cfkVoY+AmOMAesJ5kp/VlKyVN6JL4VfHPiPdGc3D9",
    "NtPFyOMCgYEAzAXuPKPndRTI8gwLZnCGTShbcGxjVt/waV/rZAqXeU6wQLY9AB65CP0wFW4wmH9fI/TMzGzidnT83+BGeULb",
    "nsjEWI/p1uotQU/DHIvVj1apexZxXJGh7Ufq4YpaVv68HmkGNI/dMKBytlrGfTWrMQPVLMguBvnU534kXS5iV2sCgYBcztck",
    "BefqheOcbNN9n3cgbGtUALJNZXyW3Ul8GCAxirpQjPSZ9aeI+uAao/HHMsHL2E+IX+6kwwBlDX9V+eSYpV83mwiFxGsLHH8y",
    "GBmgB7y8DvjLr+HSQnenUkYLh4jJo922nXvShyWCwmPdXijPXElWu31BsuktYv874lNP9QKBgCkAmNsoXqILMQFmb20jn8i0",
    "TSpyHsr3RqoItM3HgD2NZv9tqqySGYpUJwxn3Sdp3bexZeRjc87NBwHBB2doxA5s71oDqMU7KzhHjg9P53DaF2RYyRyGs/Cx",
    "n8Na+/dac85Hd4isEYLCSBKdaaFnqj2le64juV3ZqkpGFcjNB1Cq",
);

// ---------------------------------------------------------------------------------------------
// The verified-token cache's byte budget

async fn setup_with_cache(signer: &Signer, bytes: u64) -> (JwksServer, Verifier) {
    let server = JwksServer::start(vec![signer.jwk.clone()]).await;
    let v = Verifier::with_cache_bytes(
        vec![config(&server.url)],
        build_client(None, Duration::from_secs(2)).unwrap(),
        bytes,
    );
    v.start().await;
    assert!(v.not_ready().is_empty(), "{:?}", v.not_ready());
    (server, v)
}

#[tokio::test]
async fn a_cache_budget_of_zero_checks_the_signature_on_every_request() {
    let s = ec_signer("k1");
    let (_server, v) = setup_with_cache(&s, 0).await;
    let token = good_token(&s);
    for n in 1..=3 {
        assert_eq!(check(&v, &token).await, Ok(()));
        assert_eq!(v.signature_checks(), n, "a signature check per request");
    }
    assert_eq!(v.cache_usage().await, (0, 0));
}

#[tokio::test]
async fn the_default_cache_checks_a_repeated_token_once() {
    let s = ec_signer("k1");
    let (_server, v) = setup(&[&s]).await;
    let token = good_token(&s);
    for _ in 0..3 {
        assert_eq!(check(&v, &token).await, Ok(()));
    }
    assert_eq!(v.signature_checks(), 1);
    let (entries, bytes) = v.cache_usage().await;
    assert_eq!(entries, 1);
    assert!(
        bytes >= token.len() as u64,
        "{bytes} bytes for a {} byte token",
        token.len()
    );
}

#[tokio::test]
async fn distinct_tokens_never_hold_more_than_the_cache_budget() {
    let s = ec_signer("k1");
    let budget = 8 * 1024;
    let (_server, v) = setup_with_cache(&s, budget).await;
    let tokens: Vec<String> = (0..200)
        .map(|i| {
            sign(
                &s,
                &header(&s),
                &with(claims(), "sub", json!(format!("svc-{i}"))),
            )
        })
        .collect();
    for t in &tokens {
        assert_eq!(check(&v, t).await, Ok(()));
    }
    let (entries, bytes) = v.cache_usage().await;
    assert!(
        bytes <= budget,
        "{bytes} bytes held over a budget of {budget}"
    );
    assert!(entries > 0 && entries < 200, "{entries} entries");
}
