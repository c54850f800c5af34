//! Caller-token verification cost per algorithm (RS256, ES256, EdDSA): a token never seen before
//! (a signature check) and a repeated token (the verified-token cache), against decoding the
//! same token's payload without any check, in the same run (report ratios, not absolute times).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use criterion::{Criterion, criterion_group, criterion_main};
use greenhouse_gateway::auth::jwks::{IssuerConfig, KeySource};
use greenhouse_gateway::auth::jwt::Verifier;
use greenhouse_gateway::http_client::build_client;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const ISS: &str = "https://idp.bench.invalid";

/// A signing key and its JWK.
fn keys() -> Vec<(Algorithm, &'static str, EncodingKey, Value)> {
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    let rng = SystemRandom::new();
    let ec = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let point = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, ec.as_ref())
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec();
    let ed = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let ed_public = Ed25519KeyPair::from_pkcs8(ed.as_ref())
        .unwrap()
        .public_key()
        .as_ref()
        .to_vec();
    let rsa_der = STANDARD.decode(RSA_TEST_KEY_PKCS1_B64).unwrap();
    let rsa = aws_lc_rs::rsa::KeyPair::from_der(&rsa_der).unwrap();
    let parts = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(rsa.public_key());
    vec![
        (
            Algorithm::RS256,
            "rs256",
            EncodingKey::from_rsa_der(&rsa_der),
            json!({"kty": "RSA", "kid": "rs256", "n": b64(&parts.n), "e": b64(&parts.e)}),
        ),
        (
            Algorithm::ES256,
            "es256",
            EncodingKey::from_ec_der(ec.as_ref()),
            json!({"kty": "EC", "crv": "P-256", "kid": "es256", "x": b64(&point[1..33]), "y": b64(&point[33..65])}),
        ),
        (
            Algorithm::EdDSA,
            "eddsa",
            EncodingKey::from_ed_der(ed.as_ref()),
            json!({"kty": "OKP", "crv": "Ed25519", "kid": "eddsa", "x": b64(&ed_public)}),
        ),
    ]
}

fn bench_jwt(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys = keys();
    let jwks = json!({"keys": keys.iter().map(|k| k.3.clone()).collect::<Vec<_>>()});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks.to_string()).unwrap();
    let mut cfg = IssuerConfig::new(
        ISS,
        vec!["greenhouse-gateway".into()],
        KeySource::File(file),
    );
    cfg.algorithms = vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];
    let client = build_client(None, Duration::from_secs(1)).unwrap();
    let (cached, uncached) = rt.block_on(async {
        let cached = Verifier::new(vec![cfg.clone()], client.clone());
        let uncached = Verifier::with_cache_bytes(vec![cfg], client, 0);
        cached.start().await;
        uncached.start().await;
        (cached, uncached)
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut g = c.benchmark_group("jwt");
    for (alg, kid, key, _) in &keys {
        let mut header = Header::new(*alg);
        header.kid = Some((*kid).into());
        let mint = |n: u64| {
            let claims = json!({"iss": ISS, "aud": "greenhouse-gateway", "sub": format!("svc-{n}"), "iat": now, "exp": now + 3600});
            jsonwebtoken::encode(&header, &claims, key).unwrap()
        };
        let repeated = mint(u64::MAX);
        g.bench_function(format!("{kid}/baseline_decode_payload_only"), |b| {
            b.iter(|| {
                let payload = repeated.split('.').nth(1).unwrap();
                let bytes = URL_SAFE_NO_PAD.decode(payload).unwrap();
                black_box(serde_json::from_slice::<Value>(&bytes).unwrap())
            })
        });
        g.bench_function(format!("{kid}/verify_repeated_token_cache_hit"), |b| {
            b.iter(|| black_box(rt.block_on(cached.verify(&repeated)).unwrap()))
        });
        // The signature checked every time: the cache off, as with
        // `verified_token_cache_bytes = 0` (and as for every token seen for the first time).
        g.bench_function(format!("{kid}/verify_signature_check_every_time"), |b| {
            b.iter(|| black_box(rt.block_on(uncached.verify(&repeated)).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench_jwt);
criterion_main!(benches);

/// The RSA-2048 key of tests/jwt.rs (PKCS#1 DER), for a reproducible RS256 signer.
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
