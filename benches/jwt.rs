//! Caller-token verification cost: a fresh ES256 token (signature check) and a repeated token
//! (verified-token cache) against decoding the same token's payload without any check, in the
//! same run (report ratios, not absolute times).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use criterion::{Criterion, criterion_group, criterion_main};
use greenhouse_gateway::auth::jwks::{IssuerConfig, KeySource};
use greenhouse_gateway::auth::jwt::Verifier;
use greenhouse_gateway::http_client::build_client;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const ISS: &str = "https://idp.bench.invalid";

fn bench_jwt(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65])}]});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks.to_string()).unwrap();
    let mut cfg = IssuerConfig::new(
        ISS,
        vec!["greenhouse-gateway".into()],
        KeySource::File(file),
    );
    cfg.algorithms = vec![Algorithm::ES256];
    let verifier = rt.block_on(async {
        let v = Verifier::new(
            vec![cfg],
            build_client(None, Duration::from_secs(1)).unwrap(),
        );
        v.start().await;
        v
    });
    let key = EncodingKey::from_ec_der(&kp.serialize_der());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("k1".into());
    let mint = |n: u64| {
        let claims = json!({"iss": ISS, "aud": "greenhouse-gateway", "sub": format!("svc-{n}"), "iat": now, "exp": now + 3600});
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    };
    let repeated = mint(u64::MAX);

    let mut g = c.benchmark_group("jwt");
    g.bench_function("baseline_decode_payload_only", |b| {
        b.iter(|| {
            let payload = repeated.split('.').nth(1).unwrap();
            let bytes = URL_SAFE_NO_PAD.decode(payload).unwrap();
            black_box(serde_json::from_slice::<serde_json::Value>(&bytes).unwrap())
        })
    });
    g.bench_function("verify_repeated_token_cache_hit", |b| {
        b.iter(|| black_box(rt.block_on(verifier.verify(&repeated)).unwrap()))
    });
    // Every iteration gets a token never seen before (minted outside the measurement), so each
    // one pays for the signature check.
    let mut n = 0u64;
    g.bench_function("verify_fresh_token_signature_check", |b| {
        b.iter_batched(
            || {
                n += 1;
                mint(n)
            },
            |t| black_box(rt.block_on(verifier.verify(&t)).unwrap()),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_jwt);
criterion_main!(benches);
