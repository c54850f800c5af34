//! Caller identity through the real gateway on loopback: hostile inbound tokens, key rotation and
//! JWKS outages, team membership, the operation allow-list and the `On-Behalf-Of` decision.
//! Every refusal is checked for its status, its problem `code`, that nothing the caller sent is
//! echoed, and that the upstream received nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Map, Value, json};
use support::{AUDIENCE, Harness, Reply, Setup, Stub, TestClient, email, raw_exchange};

/// A little over the test issuer's `refetch_cooldown` (1 s).
const PAST_COOLDOWN: Duration = Duration::from_millis(1150);

// ---------------------------------------------------------------------------------------------
// Token surgery

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn b64_json(v: &Value) -> String {
    b64(v.to_string().as_bytes())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn segments(token: &str) -> Vec<String> {
    token.split('.').map(str::to_string).collect()
}

fn decode_segment(seg: &str) -> Map<String, Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap()
}

/// Edits the header of a token, keeping payload and signature (so the signature breaks).
fn edit_header(token: &str, f: impl FnOnce(&mut Map<String, Value>)) -> String {
    let s = segments(token);
    let mut header = decode_segment(&s[0]);
    f(&mut header);
    format!("{}.{}.{}", b64_json(&Value::Object(header)), s[1], s[2])
}

/// Edits the payload of a token, keeping header and signature (so the signature breaks).
fn edit_payload(token: &str, f: impl FnOnce(&mut Map<String, Value>)) -> String {
    let s = segments(token);
    let mut payload = decode_segment(&s[1]);
    f(&mut payload);
    format!("{}.{}.{}", s[0], b64_json(&Value::Object(payload)), s[2])
}

/// The `kid` a token's header carries, when the header decodes and the kid is a string.
fn kid_of(token: &str) -> Option<String> {
    let first = token.split('.').next()?;
    let bytes = URL_SAFE_NO_PAD.decode(first).ok()?;
    let header: Map<String, Value> = serde_json::from_slice(&bytes).ok()?;
    header
        .get("kid")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// Signs `header.claims` with any key and algorithm (the header is taken as given).
fn sign_raw(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let input = format!("{}.{}", b64_json(header), b64_json(claims));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

/// A P-256 key of our own: the gateway has never seen it.
struct OwnKey {
    enc: EncodingKey,
    jwk: Value,
}

fn own_key(kid: &str) -> OwnKey {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = kp.public_key_raw();
    assert_eq!(point.len(), 65);
    OwnKey {
        enc: EncodingKey::from_ec_der(&kp.serialize_der()),
        jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                    "x": b64(&point[1..33]), "y": b64(&point[33..65])}),
    }
}

/// Claims that would be accepted if the signature were good.
fn good_claims(h: &Harness, sub: &str) -> Value {
    let t = now();
    json!({"iss": h.sandbox.issuer(), "aud": AUDIENCE, "sub": sub, "iat": t, "nbf": t, "exp": t + 600})
}

fn random_hex() -> String {
    format!("{:016x}", rand::random::<u64>())
}

// ---------------------------------------------------------------------------------------------
// Assertions

fn www_authenticate(r: &Reply) -> String {
    r.headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// 401 `invalid_token` with a Bearer challenge carrying `error="invalid_token"`, and a body that
/// repeats none of `secrets`.
fn assert_invalid_token(case: &str, r: &Reply, secrets: &[String]) {
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{case}: {}", r.text());
    assert_eq!(r.code(), "invalid_token", "{case}: {}", r.text());
    let www = www_authenticate(r);
    assert!(
        www.starts_with("Bearer"),
        "{case}: WWW-Authenticate {www:?}"
    );
    assert!(
        www.contains("error=\"invalid_token\""),
        "{case}: WWW-Authenticate {www:?}"
    );
    let body = r.text();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        assert!(
            !body.contains(s.as_str()),
            "{case}: the error body repeats {s:?}: {body}"
        );
    }
}

fn assert_refused(case: &str, r: &Reply, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{case}: {}", r.text());
    assert_eq!(r.code(), code, "{case}: {}", r.text());
}

fn assert_upstream_untouched(h: &Harness, what: &str) {
    let got = h.sandbox.received();
    assert!(
        got.is_empty(),
        "{what}: the upstream received {} request(s): {:?}",
        got.len(),
        got.first().map(|r| &r.path)
    );
}

/// The one `On-Behalf-Of` the last upstream request carried.
fn last_obo(h: &Harness) -> String {
    let got = h.sandbox.received();
    let last = got.last().expect("a forwarded request");
    let values = last.header_values("on-behalf-of");
    assert_eq!(
        values.len(),
        1,
        "exactly one On-Behalf-Of upstream: {values:?}"
    );
    values[0].to_string()
}

async fn send_with(h: &Harness, method: Method, path: &str, headers: &[(&str, &str)]) -> Reply {
    h.client
        .send(method, &h.url(path), headers, Bytes::new())
        .await
}

fn raw_status(out: &str) -> u16 {
    out.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn raw_body(out: &str) -> &str {
    out.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

// ---------------------------------------------------------------------------------------------
// 1. Hostile tokens

/// One hostile token: its name, the `RejectReason` the verifier should give, and the token.
struct Hostile {
    name: String,
    reason: &'static str,
    token: String,
}

/// The hostile corpus. `jku` is a URL nobody may ever fetch.
fn hostile_tokens(h: &Harness, jku: &str) -> Vec<Hostile> {
    let real = h.sourcing_token();
    let sandbox_kid = h.sandbox.current_kid();
    let claims = good_claims(h, "svc-sourcing-bot");
    let seg = segments(&real);
    let mut cases: Vec<Hostile> = Vec::new();
    let mut add = |name: &str, reason: &'static str, token: String| {
        cases.push(Hostile {
            name: name.to_string(),
            reason,
            token,
        })
    };

    // alg none, every spelling, empty signature (and once with the real signature kept).
    for spelling in ["none", "None", "NONE", "nOnE"] {
        let header = json!({"alg": spelling, "typ": "JWT"});
        add(
            &format!("alg {spelling} with empty signature"),
            "malformed",
            format!("{}.{}.", b64_json(&header), seg[1]),
        );
        let with_kid = json!({"alg": spelling, "typ": "JWT", "kid": sandbox_kid});
        add(
            &format!("alg {spelling} with kid and empty signature"),
            "malformed",
            format!("{}.{}.", b64_json(&with_kid), seg[1]),
        );
        add(
            &format!("alg {spelling} keeping the real signature"),
            "algorithm",
            edit_header(&real, |hd| {
                hd.insert("alg".into(), json!(spelling));
            }),
        );
    }

    // HS256/HS512 keyed with the issuer's own public key, in several encodings.
    let jwks = h.sandbox.jwks();
    let jwk = jwks["keys"][0].clone();
    let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
    let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
    let point: Vec<u8> = [&[0x04u8][..], &x, &y].concat();
    // SubjectPublicKeyInfo for a P-256 key: fixed prefix, then the uncompressed point.
    let spki_prefix: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    let spki: Vec<u8> = [&spki_prefix[..], &point].concat();
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        STANDARD.encode(&spki)
    );
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("JWK JSON", jwk.to_string().into_bytes()),
        ("JWKS JSON", jwks.to_string().into_bytes()),
        ("raw point", point.clone()),
        ("SPKI DER", spki.clone()),
        ("SPKI PEM", pem.clone().into_bytes()),
        (
            "x base64url",
            jwk["x"].as_str().unwrap().as_bytes().to_vec(),
        ),
    ];
    for (what, secret) in &secrets {
        for alg in [Algorithm::HS256, Algorithm::HS512] {
            let header = json!({"alg": format!("{alg:?}"), "typ": "JWT", "kid": sandbox_kid});
            let token = sign_raw(
                &header,
                &claims,
                &EncodingKey::from_secret(secret).unwrap(),
                alg,
            );
            add(
                &format!("{alg:?} keyed with the issuer public key as {what}"),
                "algorithm",
                token,
            );
        }
    }
    // Algorithms outside the issuer's list (ES256 only), and near-miss spellings of the right one.
    for alg in [
        "RS256", "ES384", "EdDSA", "PS256", "HS384", "es256", "ES256 ", "ES 256", "",
    ] {
        add(
            &format!("alg {alg:?} on a real token"),
            "algorithm",
            edit_header(&real, |hd| {
                hd.insert("alg".into(), json!(alg));
            }),
        );
    }
    add(
        "alg missing",
        "algorithm",
        edit_header(&real, |hd| {
            hd.remove("alg");
        }),
    );
    add(
        "alg not a string",
        "algorithm",
        edit_header(&real, |hd| {
            hd.insert("alg".into(), json!(["ES256"]));
        }),
    );

    // Keys carried by, or pointed at from, the token itself.
    let attacker = own_key("attacker-key-1");
    let own_header = |extra: Value| {
        let mut hd = json!({"alg": "ES256", "typ": "JWT", "kid": "attacker-key-1"});
        for (k, v) in extra.as_object().unwrap() {
            hd[k] = v.clone();
        }
        hd
    };
    let own = |extra: Value| sign_raw(&own_header(extra), &claims, &attacker.enc, Algorithm::ES256);
    add(
        "embedded jwk with its own kid",
        "embedded_key",
        own(json!({"jwk": attacker.jwk})),
    );
    add(
        "embedded jwk under the issuer's kid",
        "embedded_key",
        own(json!({"jwk": attacker.jwk, "kid": sandbox_kid})),
    );
    add(
        "embedded x5c",
        "embedded_key",
        own(json!({"x5c": [STANDARD.encode(&spki)]})),
    );
    add(
        "jku to a local listener",
        "embedded_key",
        own(json!({"jku": jku})),
    );
    add(
        "jku to a local listener under the issuer's kid",
        "embedded_key",
        own(json!({"jku": jku, "kid": sandbox_kid})),
    );
    add(
        "x5u to a local listener",
        "embedded_key",
        own(json!({"x5u": jku})),
    );
    add(
        "jku added to a real token",
        "embedded_key",
        edit_header(&real, |hd| {
            hd.insert("jku".into(), json!(jku));
        }),
    );
    add(
        "null jwk member",
        "embedded_key",
        edit_header(&real, |hd| {
            hd.insert("jwk".into(), Value::Null);
        }),
    );

    // Signatures and keys.
    let mut sig = URL_SAFE_NO_PAD.decode(&seg[2]).unwrap();
    sig[7] ^= 0x01;
    add(
        "flipped signature byte",
        "signature",
        format!("{}.{}.{}", seg[0], seg[1], b64(&sig)),
    );
    let mut sig = URL_SAFE_NO_PAD.decode(&seg[2]).unwrap();
    sig.truncate(63);
    add(
        "signature one byte short",
        "signature",
        format!("{}.{}.{}", seg[0], seg[1], b64(&sig)),
    );
    add(
        "signature of another token",
        "signature",
        format!("{}.{}.{}", seg[0], seg[1], segments(&h.sourcing_token())[2]),
    );
    add(
        "changed payload under the real signature",
        "signature",
        edit_payload(&real, |p| {
            p.insert("sub".into(), json!("svc-sourcing-admin"));
        }),
    );
    add(
        "issuer's kid, foreign key",
        "signature",
        own(json!({"kid": sandbox_kid})),
    );
    add(
        "no kid, foreign key",
        "signature",
        sign_raw(
            &json!({"alg": "ES256", "typ": "JWT"}),
            &claims,
            &attacker.enc,
            Algorithm::ES256,
        ),
    );
    add(
        "unknown kid",
        "unknown_key",
        own(json!({"kid": format!("no-such-kid-{}", random_hex())})),
    );
    add(
        "path-like kid",
        "unknown_key",
        own(json!({"kid": "../../../etc/passwd"})),
    );
    for (name, kid) in [
        (
            "kid of 300 characters",
            json!(format!("K{}", "q".repeat(299))),
        ),
        ("kid with a control character", json!("kid\u{1}ctl-7a1")),
        ("kid with CRLF", json!("kid\r\nX-Evil: 1")),
        ("kid with DEL", json!("kid\u{7f}del-7a1")),
        ("kid with non-ASCII", json!("k\u{e9}y-\u{1F511}")),
        ("kid empty", json!("")),
        ("kid a number", json!(42)),
        ("kid an object", json!({"kid": "x"})),
    ] {
        add(name, "malformed", own(json!({"kid": kid})));
        add(
            &format!("{name} on a real token"),
            "malformed",
            edit_header(&real, |hd| {
                hd.insert("kid".into(), kid.clone());
            }),
        );
    }
    add(
        "unknown crit",
        "crit",
        edit_header(&real, |hd| {
            hd.insert("crit".into(), json!(["x-gateway-ext"]));
            hd.insert("x-gateway-ext".into(), json!(true));
        }),
    );
    add(
        "empty crit",
        "crit",
        edit_header(&real, |hd| {
            hd.insert("crit".into(), json!([]));
        }),
    );
    add(
        "crit b64",
        "crit",
        own(json!({"crit": ["b64"], "b64": false})),
    );
    add("duplicate alg member", "malformed", {
        let header = format!(r#"{{"alg":"ES256","kid":"{sandbox_kid}","alg":"none"}}"#);
        format!("{}.{}.{}", b64(header.as_bytes()), seg[1], seg[2])
    });
    add("duplicate exp member", "malformed", {
        let p = String::from_utf8(URL_SAFE_NO_PAD.decode(&seg[1]).unwrap()).unwrap();
        let p = format!("{},\"exp\":99999999999}}", p.trim_end_matches('}'));
        format!("{}.{}.{}", seg[0], b64(p.as_bytes()), seg[2])
    });

    // Claims, with the issuer's real signature wherever the sandbox can mint them.
    let t = now();
    let mint = |extra: Value| h.token("svc-sourcing-bot", extra);
    add(
        "expired",
        "expired",
        mint(json!({"exp": t - 120, "iat": t - 900, "nbf": t - 900})),
    );
    add(
        "expired just past the leeway",
        "expired",
        mint(json!({"exp": t - 30, "iat": t - 900, "nbf": t - 900})),
    );
    add(
        "nbf in the future",
        "not_yet_valid",
        mint(json!({"nbf": t + 600})),
    );
    add(
        "iat in the future",
        "issued_in_future",
        mint(json!({"iat": t + 600})),
    );
    add(
        "exp not a number",
        "malformed",
        mint(json!({"exp": "tomorrow"})),
    );
    add("exp null", "malformed", mint(json!({"exp": null})));
    add("exp negative", "malformed", mint(json!({"exp": -1})));
    add(
        "wrong issuer",
        "unknown_issuer",
        mint(json!({"iss": "https://evil.example"})),
    );
    add(
        "issuer with a trailing slash",
        "unknown_issuer",
        mint(json!({"iss": format!("{}/", h.sandbox.issuer())})),
    );
    add("issuer not a string", "malformed", mint(json!({"iss": 7})));
    add(
        "wrong audience",
        "audience",
        mint(json!({"aud": "another-service"})),
    );
    add(
        "audience list without us",
        "audience",
        mint(json!({"aud": ["another-service", "third"]})),
    );
    add(
        "audience in other case",
        "audience",
        mint(json!({"aud": "Greenhouse-Gateway"})),
    );
    add("audience empty list", "audience", mint(json!({"aud": []})));
    add(
        "sub not a string",
        "malformed",
        mint(json!({"sub": ["svc-sourcing-bot"]})),
    );
    for claim in ["exp", "iss", "aud"] {
        add(
            &format!("missing {claim}"),
            "missing_claim",
            edit_payload(&real, |p| {
                p.remove(claim);
            }),
        );
    }
    add(
        "oversized (over 8 KiB)",
        "too_large",
        mint(json!({"pad": "x".repeat(9 * 1024)})),
    );

    // Shape.
    add(
        "two segments",
        "malformed",
        format!("{}.{}", seg[0], seg[1]),
    );
    add("four segments", "malformed", format!("{real}.{}", seg[2]));
    add(
        "five segments (JWE shape)",
        "malformed",
        format!("{}.{}.{}.{}.{}", seg[0], seg[1], seg[2], seg[2], seg[2]),
    );
    add(
        "empty header segment",
        "malformed",
        format!(".{}.{}", seg[1], seg[2]),
    );
    add(
        "empty payload segment",
        "malformed",
        format!("{}..{}", seg[0], seg[2]),
    );
    add(
        "non-base64 header",
        "malformed",
        format!("eyJ!!!.{}.{}", seg[1], seg[2]),
    );
    add(
        "base64 padding",
        "malformed",
        format!("{}.{}.{}==", seg[0], seg[1], seg[2]),
    );
    add(
        "standard base64 alphabet",
        "malformed",
        format!("{}.{}.{}+/", seg[0], seg[1], seg[2]),
    );
    add(
        "header not JSON",
        "malformed",
        format!("{}.{}.{}", b64(b"not json"), seg[1], seg[2]),
    );
    add(
        "header a JSON array",
        "malformed",
        format!("{}.{}.{}", b64(b"[\"ES256\"]"), seg[1], seg[2]),
    );
    add(
        "payload not JSON",
        "malformed",
        format!("{}.{}.{}", seg[0], b64(b"\x00\x01garbage"), seg[2]),
    );
    add("dots only", "malformed", "..".to_string());
    cases
}

/// Counts of `gateway_jwt_rejections_total` by reason.
fn rejections(h: &Harness) -> std::collections::BTreeMap<String, u64> {
    let text = h.gateway.gateway.runtime.metrics.render();
    text.lines()
        .filter_map(|l| l.strip_prefix("gateway_jwt_rejections_total{reason=\""))
        .filter_map(|l| {
            let (reason, rest) = l.split_once("\"}")?;
            Some((reason.to_string(), rest.trim().parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn hostile_token_corpus_is_401_invalid_token_without_echo_fetch_or_upstream_call() {
    let h = Harness::start().await;
    let trap = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jku = format!("http://{}/jwks.json", trap.local_addr().unwrap());

    // The same gateway accepts a good token: every refusal below is about the token.
    let control = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(
        control.status,
        StatusCode::OK,
        "control: {}",
        control.text()
    );
    h.sandbox.clear_received();

    let cases = hostile_tokens(&h, &jku);
    assert!(
        cases.len() > 90,
        "corpus unexpectedly small: {}",
        cases.len()
    );
    for Hostile {
        name,
        reason,
        token,
    } in &cases
    {
        let mut secrets = vec![token.clone()];
        if let Some(sig) = token.split('.').nth(2).filter(|s| s.len() >= 16) {
            secrets.push(sig.to_string());
        }
        if let Some(kid) = kid_of(token) {
            secrets.push(kid);
        }
        let before = rejections(&h);
        let r = h.get("/v1/partner/jobs", token).await;
        assert_invalid_token(name, &r, &secrets);
        let after = rejections(&h);
        let grew: Vec<&String> = after
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(grew, [reason], "{name}: rejected for the wrong reason");
        assert_upstream_untouched(&h, name);
    }
    // Nothing ever followed jku / x5u.
    let knocked = tokio::time::timeout(Duration::from_millis(300), trap.accept()).await;
    assert!(
        knocked.is_err(),
        "the gateway connected to a URL named in a token header"
    );
}

#[tokio::test]
async fn hostile_token_on_an_unknown_path_is_still_401_not_404() {
    let h = Harness::start().await;
    let token = edit_header(&h.sourcing_token(), |hd| {
        hd.insert("alg".into(), json!("none"));
    });
    let r = h.get("/v1/partner/no-such-route", &token).await;
    assert_invalid_token("unknown path", &r, std::slice::from_ref(&token));
    let r = h
        .client
        .send(Method::GET, &h.url("/somewhere/else"), &[], Bytes::new())
        .await;
    assert_refused(
        "no token, foreign path",
        &r,
        StatusCode::UNAUTHORIZED,
        "missing_token",
    );
    assert_upstream_untouched(&h, "unknown path");
}

#[tokio::test]
async fn missing_authorization_is_401_missing_token_with_a_bare_bearer_challenge() {
    let h = Harness::start().await;
    let r = send_with(&h, Method::GET, "/v1/partner/jobs", &[]).await;
    assert_refused(
        "missing Authorization",
        &r,
        StatusCode::UNAUTHORIZED,
        "missing_token",
    );
    let www = www_authenticate(&r);
    assert!(www.starts_with("Bearer"), "{www:?}");
    assert!(
        !www.contains("error"),
        "no error attribute without credentials: {www:?}"
    );
    assert_upstream_untouched(&h, "missing Authorization");
}

#[tokio::test]
async fn authorization_header_forms_bearer_any_case_accepted_others_refused() {
    let h = Harness::start().await;
    let t = h.sourcing_token();
    let t2 = h.sourcing_token();
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let auth = format!("{scheme} {t}");
        let r = send_with(
            &h,
            Method::GET,
            "/v1/partner/jobs",
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "scheme {scheme}: {}", r.text());
    }
    assert_eq!(h.sandbox.received().len(), 3);
    h.sandbox.clear_received();

    let basic_creds = format!("Basic {}", STANDARD.encode("svc-sourcing-bot:secret"));
    let refused: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "two Authorization headers, both valid",
            vec![
                ("authorization", format!("Bearer {t}")),
                ("authorization", format!("Bearer {t2}")),
            ],
        ),
        (
            "two Authorization headers, same token",
            vec![
                ("authorization", format!("Bearer {t}")),
                ("authorization", format!("Bearer {t}")),
            ],
        ),
        (
            "Basic scheme carrying the JWT",
            vec![("authorization", format!("Basic {t}"))],
        ),
        (
            "Basic scheme with user:password",
            vec![("authorization", basic_creds)],
        ),
        (
            "Token scheme",
            vec![("authorization", format!("Token {t}"))],
        ),
        (
            "Bearer with no token",
            vec![("authorization", "Bearer".to_string())],
        ),
        (
            "Bearer token with a space inside",
            vec![("authorization", format!("Bearer {t} extra"))],
        ),
        (
            "Bearer glued to the token",
            vec![("authorization", format!("Bearer:{t}"))],
        ),
        ("token without scheme", vec![("authorization", t.clone())]),
    ];
    // Another scheme, or none, carries no bearer token: the bare challenge (RFC 6750 section 3.1).
    let no_bearer = [
        "Basic scheme carrying the JWT",
        "Basic scheme with user:password",
        "Token scheme",
        "Bearer glued to the token",
        "token without scheme",
    ];
    for (name, headers) in refused {
        let hs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = send_with(&h, Method::GET, "/v1/partner/jobs", &hs).await;
        if no_bearer.contains(&name) {
            assert_refused(name, &r, StatusCode::UNAUTHORIZED, "missing_token");
            let www = www_authenticate(&r);
            assert!(
                www.starts_with("Bearer") && !www.contains("error="),
                "{name}: {www:?}"
            );
            assert!(!r.text().contains(t.as_str()), "{name}: token echoed");
        } else {
            assert_invalid_token(name, &r, &[t.clone(), t2.clone()]);
        }
    }
    assert_upstream_untouched(&h, "refused Authorization forms");
}

// ---------------------------------------------------------------------------------------------
// 2.-4. Keys: rotation, unknown-kid floods, JWKS outages

#[tokio::test]
async fn rotated_key_is_fetched_once_and_old_key_works_until_withdrawn() {
    let h = Harness::start().await;
    // Let the start-up fetch fall out of the refetch cooldown.
    tokio::time::sleep(PAST_COOLDOWN).await;
    let old_kid = h.sandbox.current_kid();
    let old_unused = h.sourcing_token();
    let old_unused_later = h.sourcing_token();

    h.sandbox.rotate_signing_key(true);
    let new_kid = h.sandbox.current_kid();
    assert_ne!(old_kid, new_kid);
    let before = h.sandbox.jwks_requests();
    let new_token = h.sourcing_token();
    assert_eq!(kid_of(&new_token).as_deref(), Some(new_kid.as_str()));
    let r = h.get("/v1/partner/jobs", &new_token).await;
    assert_eq!(r.status, StatusCode::OK, "new-kid token: {}", r.text());
    assert_eq!(
        h.sandbox.jwks_requests(),
        before + 1,
        "exactly one refetch for the new kid"
    );

    assert_eq!(kid_of(&old_unused).as_deref(), Some(old_kid.as_str()));
    let r = h.get("/v1/partner/jobs", &old_unused).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "old-kid token while still published: {}",
        r.text()
    );
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "another new-kid token: {}",
        r.text()
    );
    assert_eq!(
        h.sandbox.jwks_requests(),
        before + 1,
        "no further fetch for known kids"
    );

    // Withdraw every earlier key; a token under the next kid makes the gateway refetch.
    let second_unused = h.sourcing_token();
    tokio::time::sleep(PAST_COOLDOWN).await;
    h.sandbox.rotate_signing_key(false);
    let third = h.sourcing_token();
    let refetched_at = std::time::Instant::now();
    let r = h.get("/v1/partner/jobs", &third).await;
    assert_eq!(r.status, StatusCode::OK, "third-kid token: {}", r.text());
    assert_eq!(
        h.sandbox.jwks_requests(),
        before + 2,
        "one refetch for the third kid"
    );
    let forwarded = h.sandbox.received().len();

    // Real, never-used tokens under withdrawn keys: refused once the gateway has seen the new set.
    for (name, token, kid) in [
        (
            "never-used token under the withdrawn second kid",
            &second_unused,
            &new_kid,
        ),
        (
            "never-used token under the withdrawn first kid",
            &old_unused_later,
            &old_kid,
        ),
    ] {
        assert_eq!(kid_of(token).as_deref(), Some(kid.as_str()));
        let r = h.get("/v1/partner/jobs", token).await;
        assert_invalid_token(name, &r, &[token.to_string(), kid.clone()]);
    }
    assert_eq!(
        h.sandbox.received().len(),
        forwarded,
        "refused tokens reached the upstream"
    );
    // Inside the cooldown the withdrawn kids cause no fetch (checked only when the machine was
    // quick enough for both requests to land inside it).
    if refetched_at.elapsed() < Duration::from_millis(900) {
        assert_eq!(
            h.sandbox.jwks_requests(),
            before + 2,
            "withdrawn kids inside the cooldown cause no fetch"
        );
    }
}

#[tokio::test]
async fn random_kid_flood_is_all_401_with_at_most_one_jwks_fetch_and_no_signature_work() {
    let h = Harness::start().await;
    tokio::time::sleep(PAST_COOLDOWN).await;
    let attacker = own_key("flood");
    let claims = good_claims(&h, "svc-sourcing-bot");
    let tokens: Vec<String> = (0..30)
        .map(|_| {
            let header =
                json!({"alg": "ES256", "typ": "JWT", "kid": format!("flood-{}", random_hex())});
            sign_raw(&header, &claims, &attacker.enc, Algorithm::ES256)
        })
        .collect();
    let fetches_before = h.sandbox.jwks_requests();
    let checks_before = h.gateway.gateway.policy().verifier.signature_checks();
    let replies =
        futures_util::future::join_all(tokens.iter().map(|t| h.get("/v1/partner/jobs", t))).await;
    for (i, (r, t)) in replies.iter().zip(&tokens).enumerate() {
        assert_invalid_token(
            &format!("flood token {i}"),
            r,
            &[t.clone(), kid_of(t).unwrap()],
        );
    }
    let grew = h.sandbox.jwks_requests() - fetches_before;
    assert!(grew <= 1, "30 random kids caused {grew} JWKS fetches");
    assert_eq!(
        h.gateway.gateway.policy().verifier.signature_checks(),
        checks_before,
        "unknown kids must not reach signature checks"
    );
    assert_upstream_untouched(&h, "random-kid flood");
    // A legitimate caller is unaffected.
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

#[tokio::test]
async fn jwks_outage_with_cached_keys_keeps_valid_tokens_working_and_unknown_kids_401() {
    let h = Harness::start().await;
    h.sandbox.faults().set_jwks_available(false);
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "cached keys serve during the outage: {}",
        r.text()
    );

    // An unknown kid after the cooldown makes a refetch, which fails: 401, not 503, keys kept.
    tokio::time::sleep(PAST_COOLDOWN).await;
    let before = h.sandbox.jwks_requests();
    let attacker = own_key("outage");
    let token = sign_raw(
        &json!({"alg": "ES256", "kid": "outage-unknown"}),
        &good_claims(&h, "svc-sourcing-bot"),
        &attacker.enc,
        Algorithm::ES256,
    );
    let r = h.get("/v1/partner/jobs", &token).await;
    assert_invalid_token(
        "unknown kid during outage",
        &r,
        std::slice::from_ref(&token),
    );
    assert_eq!(
        h.sandbox.jwks_requests(),
        before + 1,
        "one (failed) refetch"
    );
    assert_eq!(h.sandbox.received().len(), 1);

    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "a failed refetch must not drop the cached keys: {}",
        r.text()
    );
    let ready = TestClient::new()
        .send(Method::GET, &h.admin_url("/readyz"), &[], Bytes::new())
        .await;
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "keys are still usable: {}",
        ready.text()
    );
}

#[tokio::test]
async fn issuer_that_never_had_keys_gives_503_jwks_unavailable_and_readyz_names_it_until_recovered()
{
    let sandbox = greenhouse_gateway::sandbox::Sandbox::start_local(Setup::default().sandbox)
        .await
        .unwrap();
    sandbox.faults().set_jwks_available(false);
    let dir = tempfile::tempdir().unwrap();
    support::write_config(dir.path(), &sandbox, &Setup::default());
    let config = greenhouse_gateway::config::load(&dir.path().join("gateway.toml")).unwrap();
    let gateway = greenhouse_gateway::server::start(config).await.unwrap();
    let h = Harness {
        sandbox,
        gateway,
        dir,
        client: TestClient::new(),
    };

    let token = h.sourcing_token();
    let r = h.get("/v1/partner/jobs", &token).await;
    assert_refused(
        "valid token, no keys",
        &r,
        StatusCode::SERVICE_UNAVAILABLE,
        "jwks_unavailable",
    );
    assert!(!r.text().contains(&token));
    assert!(
        !www_authenticate(&r).contains("invalid_token"),
        "503 is not a token problem"
    );

    // Tokens refused by the checks that need no key are still 401.
    let bad = edit_header(&token, |hd| {
        hd.insert("alg".into(), json!("HS256"));
    });
    let r = h.get("/v1/partner/jobs", &bad).await;
    assert_invalid_token(
        "HS256 while keys are missing",
        &r,
        std::slice::from_ref(&bad),
    );
    let expired = h.token("svc-sourcing-bot", json!({"exp": now() - 120}));
    let r = h.get("/v1/partner/jobs", &expired).await;
    assert_invalid_token(
        "expired while keys are missing",
        &r,
        std::slice::from_ref(&expired),
    );

    let admin = TestClient::new();
    let ready = admin
        .send(Method::GET, &h.admin_url("/readyz"), &[], Bytes::new())
        .await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        ready.text()
    );
    assert_eq!(ready.json()["ready"], false);
    let reasons = ready.json()["reasons"].to_string();
    assert!(
        reasons.contains(&h.sandbox.issuer()),
        "readyz must name the issuer: {reasons}"
    );
    assert_upstream_untouched(&h, "no keys");

    // Keys come back: the gateway recovers by itself.
    h.sandbox.faults().set_jwks_available(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut last = StatusCode::SERVICE_UNAVAILABLE;
    while tokio::time::Instant::now() < deadline {
        last = h.get("/v1/partner/jobs", &token).await.status;
        if last == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last,
        StatusCode::OK,
        "gateway did not recover after the JWKS came back"
    );
    assert!(
        !h.gateway
            .gateway
            .policy()
            .verifier
            .not_ready()
            .iter()
            .any(|r| r.contains(&h.sandbox.issuer()))
    );
}

/// A harness whose gateway.toml was edited (by `edit`) before the gateway loaded it.
async fn start_edited(setup: Setup, edit: impl FnOnce(String) -> String) -> Harness {
    let sandbox = greenhouse_gateway::sandbox::Sandbox::start_local(setup.sandbox.clone())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    support::write_config(dir.path(), &sandbox, &setup);
    let path = dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(text)).unwrap();
    let config = greenhouse_gateway::config::load(&path).unwrap();
    let gateway = greenhouse_gateway::server::start(config).await.unwrap();
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

fn long_cooldown(text: String) -> String {
    assert!(text.contains(r#"refetch_cooldown = "1s""#));
    text.replace(r#"refetch_cooldown = "1s""#, r#"refetch_cooldown = "30s""#)
}

#[tokio::test]
async fn withdrawn_key_stops_working_through_the_verified_token_cache_at_the_next_refresh() {
    let h = Harness::start().await;
    tokio::time::sleep(PAST_COOLDOWN).await;
    let token = h.sourcing_token();
    let r = h.get("/v1/partner/jobs", &token).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = h.get("/v1/partner/jobs", &token).await;
    assert_eq!(r.status, StatusCode::OK, "cached: {}", r.text());
    let checks = h.gateway.gateway.policy().verifier.signature_checks();

    // The provider withdraws the key; a token under its new key makes the gateway refresh.
    h.sandbox.rotate_signing_key(false);
    let before = h.sandbox.jwks_requests();
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(r.status, StatusCode::OK, "new-key token: {}", r.text());
    assert_eq!(h.sandbox.jwks_requests(), before + 1, "the refresh");
    assert!(h.gateway.gateway.policy().verifier.signature_checks() > checks);

    let r = h.get("/v1/partner/jobs", &token).await;
    assert_invalid_token(
        "cached token under the withdrawn key",
        &r,
        std::slice::from_ref(&token),
    );
}

#[tokio::test]
async fn token_under_a_key_published_at_the_moment_of_signing_is_accepted_on_first_use() {
    // Cooldown 30 s, and the start-up fetch just happened: the new kid must still be fetched.
    let h = start_edited(Setup::default(), long_cooldown).await;
    h.sandbox.rotate_signing_key(true);
    let before = h.sandbox.jwks_requests();
    let r = h.get("/v1/partner/jobs", &h.sourcing_token()).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "first new-kid token: {}",
        r.text()
    );
    assert_eq!(h.sandbox.jwks_requests(), before + 1);
}

#[tokio::test]
async fn new_key_is_accepted_as_soon_as_the_jwks_is_back_after_failed_fetches() {
    let h = start_edited(Setup::default(), |text| {
        text.replace(r#"refetch_cooldown = "1s""#, r#"refetch_cooldown = "3s""#)
    })
    .await;
    // Whatever the start-up fetch counts for, it is out of the cooldown now.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    // The provider restarts: its JWKS fails, and it comes back with a rotated key.
    h.sandbox.faults().set_jwks_available(false);
    h.sandbox.rotate_signing_key(false);
    let token = h.sourcing_token();
    for _ in 0..5 {
        let r = h.get("/v1/partner/jobs", &token).await;
        assert_invalid_token("while the JWKS is down", &r, std::slice::from_ref(&token));
    }
    h.sandbox.faults().set_jwks_available(true);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut last = StatusCode::UNAUTHORIZED;
    while tokio::time::Instant::now() < deadline && last != StatusCode::OK {
        last = h.get("/v1/partner/jobs", &token).await.status;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        last,
        StatusCode::OK,
        "still refused 1.5 s after the JWKS came back: the failed fetches consumed the 3 s cooldown"
    );
}

#[tokio::test]
async fn readyz_names_the_refused_connection_when_the_jwks_port_refuses() {
    // 127.0.0.2: no other test server can take the port.
    let closed = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    let dead = format!("http://{}/jwks.json", closed.local_addr().unwrap());
    drop(closed);
    let setup = Setup {
        wait_ready: false,
        ..Setup::default()
    };
    let h = start_edited(setup, |text| {
        let line = text
            .lines()
            .find(|l| l.starts_with("jwks_url"))
            .unwrap()
            .to_string();
        text.replace(&line, &format!("jwks_url = \"{dead}\""))
    })
    .await;
    let admin = TestClient::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let ready = loop {
        let ready = admin
            .send(Method::GET, &h.admin_url("/readyz"), &[], Bytes::new())
            .await;
        if ready.text().contains("JWKS") || tokio::time::Instant::now() > deadline {
            break ready;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let reasons = ready.json()["reasons"].to_string();
    assert!(reasons.contains(&h.sandbox.issuer()), "{reasons}");
    assert!(
        reasons.to_ascii_lowercase().contains("connection refused"),
        "readyz must name the refused connection: {reasons}"
    );
    assert!(!reasons.contains("usable keys"), "{reasons}");
}

// Log capture for the refusal-log test: every log line of this test binary, as JSON.
#[derive(Clone)]
struct LogBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn json_logs() -> &'static LogBuf {
    static LOGS: std::sync::OnceLock<LogBuf> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = LogBuf(std::sync::Arc::default());
        let writer = buf.clone();
        let _ = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    })
}

/// The captured log lines whose `request_id` field is `id`.
fn log_lines_of(id: &str) -> Vec<Value> {
    let text = String::from_utf8_lossy(&json_logs().0.lock().unwrap()).into_owned();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["request_id"] == id)
        .collect()
}

#[tokio::test]
async fn algorithm_refusal_is_logged_with_request_id_algorithm_and_configured_issuer_only() {
    json_logs();
    let h = Harness::start().await;
    let id = format!("alg-refusal-{}", random_hex());
    // RS256 is a real algorithm this issuer does not accept (it is configured with ES256).
    let token = edit_header(&h.sourcing_token(), |hd| {
        hd.insert("alg".into(), json!("RS256"));
    });
    let r = send_with(
        &h,
        Method::GET,
        "/v1/partner/jobs",
        &[
            ("authorization", &format!("Bearer {token}")),
            ("x-request-id", &id),
        ],
    )
    .await;
    assert_invalid_token("RS256 token", &r, std::slice::from_ref(&token));
    let lines = log_lines_of(&id);
    let refused = lines
        .iter()
        .find(|l| l["fields"]["message"] == "caller token refused")
        .unwrap_or_else(|| panic!("no refusal log line with the request id: {lines:?}"));
    assert_eq!(refused["fields"]["reason"], "algorithm", "{refused}");
    assert_eq!(refused["fields"]["alg"], "RS256", "{refused}");
    assert_eq!(
        refused["fields"]["issuer"],
        h.sandbox.issuer().as_str(),
        "{refused}"
    );

    // An issuer the gateway does not know is the sender's choice: never logged.
    let id2 = format!("alg-refusal-{}", random_hex());
    let hostile_iss = "https://evil.example/\u{1b}[31mFAKE-LOG-LINE";
    let token2 = edit_payload(&token, |p| {
        p.insert("iss".into(), json!(hostile_iss));
    });
    let r = send_with(
        &h,
        Method::GET,
        "/v1/partner/jobs",
        &[
            ("authorization", &format!("Bearer {token2}")),
            ("x-request-id", &id2),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let lines = log_lines_of(&id2);
    let refused = lines
        .iter()
        .find(|l| l["fields"]["message"] == "caller token refused")
        .unwrap_or_else(|| panic!("no refusal log line: {lines:?}"));
    assert_eq!(refused["fields"]["alg"], "RS256", "{refused}");
    assert_eq!(refused["fields"]["issuer"], "-", "{refused}");
    let all = String::from_utf8_lossy(&json_logs().0.lock().unwrap()).into_owned();
    assert!(
        !all.contains("FAKE-LOG-LINE"),
        "an unconfigured issuer was logged"
    );
}

// ---------------------------------------------------------------------------------------------
// 5.-6. Teams and operations

#[tokio::test]
async fn subject_of_no_team_is_403_unknown_team() {
    let h = Harness::start().await;
    for (name, token) in [
        ("unmatched sub", h.token("svc-marketing-bot", json!({}))),
        ("prefix of a glob", h.token("svc-sourcing", json!({}))),
        (
            "exact member with a suffix",
            h.token("svc-agency-connector-2", json!({})),
        ),
        (
            "no sub at all",
            h.sandbox
                .mint_token(json!({"aud": AUDIENCE}), Duration::from_secs(600)),
        ),
    ] {
        let r = h.get("/v1/partner/jobs", &token).await;
        assert_refused(name, &r, StatusCode::FORBIDDEN, "unknown_team");
        assert!(
            !r.text().contains("svc-"),
            "{name}: the subject is echoed: {}",
            r.text()
        );
    }
    assert_upstream_untouched(&h, "unknown team");
}

#[tokio::test]
async fn unknown_team_detail_says_no_members_matched_and_names_a_missing_sub_but_no_team() {
    let h = Harness::start().await;
    let r = h
        .get("/v1/partner/jobs", &h.token("svc-marketing-bot", json!({})))
        .await;
    assert_refused("unmatched sub", &r, StatusCode::FORBIDDEN, "unknown_team");
    let detail = r.json()["detail"].as_str().unwrap_or_default().to_string();
    assert!(
        detail.contains("no team's [[members]] matched the token"),
        "{detail}"
    );
    assert!(!detail.contains("has no"), "nothing is missing: {detail}");

    // Every team's membership names `sub`: a token without one is told so.
    let no_sub = h
        .sandbox
        .mint_token(json!({"aud": AUDIENCE}), Duration::from_secs(600));
    let r = h.get("/v1/partner/jobs", &no_sub).await;
    assert_refused("no sub", &r, StatusCode::FORBIDDEN, "unknown_team");
    let detail_no_sub = r.json()["detail"].as_str().unwrap_or_default().to_string();
    assert!(
        detail_no_sub.contains("no team's [[members]] matched the token")
            && detail_no_sub.contains("no \"sub\" claim"),
        "{detail_no_sub}"
    );
    // Neither names a team, a pattern or the issuer.
    for d in [&detail, &detail_no_sub] {
        for secretish in [
            "sourcing",
            "agency",
            "reporting",
            "svc-",
            "*",
            &h.sandbox.issuer(),
        ] {
            assert!(!d.contains(secretish), "{secretish:?} in {d}");
        }
    }
    assert_upstream_untouched(&h, "unknown team");
}

#[tokio::test]
async fn operation_not_allowed_detail_names_the_operation() {
    let h = Harness::start().await;
    let reporting = h.token("svc-reporting-daily", json!({}));
    let body = json!({"external_id": "ext-detail-1", "first_name": "Ada", "last_name": "Example"});
    let r = h
        .post_json("/v1/partner/candidates", &reporting, &body)
        .await;
    assert_refused(
        "reporting createPartnerCandidate",
        &r,
        StatusCode::FORBIDDEN,
        "operation_not_allowed",
    );
    let detail = r.json()["detail"].as_str().unwrap_or_default().to_string();
    assert!(detail.contains("createPartnerCandidate"), "{detail}");
    assert!(!detail.contains("ext-detail-1"), "{detail}");
    assert_upstream_untouched(&h, "operation not allowed");
}

#[tokio::test]
async fn route_not_found_detail_reminds_of_the_public_path_prefix_without_echoing_the_path() {
    let h = Harness::start().await;
    let token = h.sourcing_token();
    for path in [
        "/v1/partner/widgets-canary",
        "/partner/jobs-canary",
        "/jobs-canary",
    ] {
        let r = h.get(path, &token).await;
        assert_refused(path, &r, StatusCode::NOT_FOUND, "route_not_found");
        let detail = r.json()["detail"].as_str().unwrap_or_default().to_string();
        assert!(
            detail.contains("paths start with /v1/partner"),
            "{path}: {detail}"
        );
        assert!(!r.text().contains("canary"), "{path}: {}", r.text());
    }
    assert_upstream_untouched(&h, "route not found");
}

#[tokio::test]
async fn each_team_reaches_the_upstream_with_its_own_credential() {
    let h = Harness::start().await;
    for (sub, want_scheme, want_obo) in [
        ("svc-sourcing-bot", "Bearer ", "sourcing.bot(at)example.com"),
        (
            "svc-agency-connector",
            "Basic ",
            "agency.liaison(at)example.com",
        ),
        (
            "svc-reporting-daily",
            "Bearer ",
            "recruiter.two(at)example.com",
        ),
    ] {
        let token = h.token(sub, json!({}));
        let r = h.get("/v1/partner/jobs", &token).await;
        assert_eq!(r.status, StatusCode::OK, "{sub}: {}", r.text());
        let got = h.sandbox.received();
        let last = got.last().unwrap();
        let auth = last.header_values("authorization");
        assert_eq!(auth.len(), 1, "{sub}: one upstream Authorization");
        assert!(
            auth[0].starts_with(want_scheme),
            "{sub}: upstream Authorization {:?}",
            &auth[0][..auth[0].len().min(12)]
        );
        assert!(!auth[0].contains(&token), "{sub}: caller JWT forwarded");
        if want_scheme == "Basic " {
            let decoded = STANDARD.decode(&auth[0]["Basic ".len()..]).unwrap();
            assert_eq!(
                decoded, b"dev-partner-key:",
                "{sub}: partner key as user name, empty password"
            );
        }
        assert_eq!(last_obo(&h), email(want_obo), "{sub}: default On-Behalf-Of");
    }
    assert_eq!(h.sandbox.received().len(), 3);
}

#[tokio::test]
async fn operation_outside_the_team_allow_list_is_403_operation_not_allowed() {
    let h = Harness::start().await;
    let reporting = h.token("svc-reporting-daily", json!({}));
    let agency = h.token("svc-agency-connector", json!({}));
    let sourcing = h.sourcing_token();
    let body = json!({"external_id": "ext-ops-1", "first_name": "Ada", "last_name": "Example"});
    let r = h
        .post_json("/v1/partner/candidates", &reporting, &body)
        .await;
    assert_refused(
        "reporting createPartnerCandidate",
        &r,
        StatusCode::FORBIDDEN,
        "operation_not_allowed",
    );
    let r = h.get("/v1/partner/current_user", &agency).await;
    assert_refused(
        "agency getCurrentPartnerUser",
        &r,
        StatusCode::FORBIDDEN,
        "operation_not_allowed",
    );
    let r = h.get("/v1/partner/current_user", &sourcing).await;
    assert_refused(
        "sourcing getCurrentPartnerUser",
        &r,
        StatusCode::FORBIDDEN,
        "operation_not_allowed",
    );
    let r = h.get("/v1/partner/prospect_pools", &agency).await;
    assert_refused(
        "agency listPartnerProspectPools",
        &r,
        StatusCode::FORBIDDEN,
        "operation_not_allowed",
    );
    let r = h
        .post_json(
            "/v1/partner/tracking_link",
            &sourcing,
            &json!({"job_id": 1}),
        )
        .await;
    assert_refused(
        "sourcing createTrackingLink (no team has it)",
        &r,
        StatusCode::FORBIDDEN,
        "operation_not_allowed",
    );
    // The allow-list is checked before On-Behalf-Of: a bad OBO does not change the answer.
    let auth = format!("Bearer {agency}");
    let r = send_with(
        &h,
        Method::GET,
        "/v1/partner/current_user",
        &[("authorization", &auth), ("on-behalf-of", "nobody")],
    )
    .await;
    assert_refused(
        "agency getCurrentPartnerUser with bad OBO",
        &r,
        StatusCode::FORBIDDEN,
        "operation_not_allowed",
    );
    assert_upstream_untouched(&h, "operation not allowed");
    assert!(
        h.sandbox
            .candidates()
            .iter()
            .all(|c| c["external_id"] != "ext-ops-1")
    );

    // The same operation is fine for a team that has it.
    let r = h.get("/v1/partner/current_user", &reporting).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "reporting getCurrentPartnerUser: {}",
        r.text()
    );
    assert_eq!(h.sandbox.received().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// 7. On-Behalf-Of

#[tokio::test]
async fn on_behalf_of_default_injected_and_allowed_header_forwarded_in_configured_spelling() {
    let h = Harness::start().await;
    let auth = format!("Bearer {}", h.sourcing_token());
    let r = send_with(
        &h,
        Method::GET,
        "/v1/partner/jobs",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(last_obo(&h), email("sourcing.bot(at)example.com"));

    for given in [
        "recruiter.one(at)example.com",
        "Recruiter.One(at)Example.COM",
        "RECRUITER.ONE(at)EXAMPLE.COM",
    ] {
        let v = email(given);
        let r = send_with(
            &h,
            Method::GET,
            "/v1/partner/jobs",
            &[("authorization", &auth), ("On-Behalf-Of", &v)],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{given}: {}", r.text());
        assert_eq!(
            last_obo(&h),
            email("recruiter.one(at)example.com"),
            "{given}: configured spelling forwarded"
        );
    }
    // A claim the team does not configure as `from_claim` changes nothing.
    let with_claim = h.token(
        "svc-sourcing-bot",
        json!({"act_as": email("recruiter.one(at)example.com")}),
    );
    let r = h.get("/v1/partner/jobs", &with_claim).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        last_obo(&h),
        email("sourcing.bot(at)example.com"),
        "sourcing has no from_claim"
    );
    // Naming the default explicitly is allowed too.
    let v = email("Sourcing.Bot(at)example.com");
    let r = send_with(
        &h,
        Method::GET,
        "/v1/partner/jobs",
        &[("authorization", &auth), ("on-behalf-of", &v)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(last_obo(&h), email("sourcing.bot(at)example.com"));
    assert_eq!(h.sandbox.received().len(), 6);
}

#[tokio::test]
async fn on_behalf_of_header_not_allowed_or_repeated_is_403_without_echo_or_upstream_call() {
    let h = Harness::start().await;
    let sourcing = format!("Bearer {}", h.sourcing_token());
    let agency = format!("Bearer {}", h.token("svc-agency-connector", json!({})));
    let one = email("recruiter.one(at)example.com");
    let riley = email("riley.recruiter(at)example.com");
    let (sourcing, agency) = (sourcing.as_str(), agency.as_str());
    let cases: Vec<(&str, &str, Vec<String>)> = vec![
        (
            "sourcing names a user outside allowed",
            sourcing,
            vec![riley.clone()],
        ),
        (
            "sourcing names an unknown user",
            sourcing,
            vec![email("mallory.attacker(at)evil.example")],
        ),
        (
            "agency (no allowed list) names another user",
            agency,
            vec![one.clone()],
        ),
        (
            "two headers, both allowed",
            sourcing,
            vec![one.clone(), one.clone()],
        ),
        (
            "two headers, allowed then not",
            sourcing,
            vec![one.clone(), riley.clone()],
        ),
        (
            "two headers, default and allowed",
            sourcing,
            vec![email("sourcing.bot(at)example.com"), one.clone()],
        ),
        (
            "comma-joined list",
            sourcing,
            vec![format!("{one}, {}", email("sourcing.bot(at)example.com"))],
        ),
        (
            "display-name form",
            sourcing,
            vec![format!("Recruiter One <{one}>")],
        ),
        ("quoted", sourcing, vec![format!("\"{one}\"")]),
        ("tab inside", sourcing, vec![format!("{one}\tx-tab-tail")]),
        (
            "not an address",
            sourcing,
            vec!["not-an-address-7f3".to_string()],
        ),
        ("empty value", sourcing, vec![String::new()]),
    ];
    for (name, auth, values) in cases {
        let mut headers: Vec<(&str, &str)> = vec![("authorization", auth)];
        headers.extend(values.iter().map(|v| ("on-behalf-of", v.as_str())));
        let r = send_with(&h, Method::GET, "/v1/partner/jobs", &headers).await;
        assert_refused(name, &r, StatusCode::FORBIDDEN, "on_behalf_of_not_allowed");
        let body = r.text();
        for v in values.iter().filter(|v| !v.is_empty()) {
            assert!(
                !body.contains(v.as_str()),
                "{name}: the body repeats {v:?}: {body}"
            );
            assert!(
                !body.to_ascii_lowercase().contains(&v.to_ascii_lowercase()),
                "{name}: body repeats {v:?}"
            );
        }
        assert_upstream_untouched(&h, name);
    }
}

#[tokio::test]
async fn on_behalf_of_with_control_characters_or_obs_text_never_reaches_the_upstream() {
    let h = Harness::start().await;
    let token = h.sourcing_token();
    let one = email("recruiter.one(at)example.com");
    let evil = email("a(at)example.com");
    let cases: Vec<(&str, Vec<u8>, Vec<String>)> = vec![
        (
            "CRLF injection after a foreign address",
            format!("{evil}\r\nX-Evil: 1").into_bytes(),
            vec![evil.clone()],
        ),
        (
            "bare CR inside",
            format!("{one}\rX-Evil: 1").into_bytes(),
            vec!["X-Evil".into()],
        ),
        (
            "bare LF after a foreign address",
            format!("{evil}\nX-Evil: 1").into_bytes(),
            vec![evil.clone()],
        ),
        (
            "obs-fold continuation",
            format!("{one}\r\n X-Evil: 1").into_bytes(),
            vec!["X-Evil".into()],
        ),
        ("NUL inside", format!("{one}\0x").into_bytes(), vec![]),
        ("DEL inside", format!("{one}\u{7f}").into_bytes(), vec![]),
        (
            "tab inside",
            format!("{one}\tX-Evil").into_bytes(),
            vec!["X-Evil".into()],
        ),
        (
            "obs-text (Latin-1 byte)",
            [one.as_bytes(), b"\xe9"].concat(),
            vec![],
        ),
        (
            "obs-text (UTF-8 domain)",
            email("recruiter.one(at)ex\u{e4}mple.com").into_bytes(),
            vec!["mple.com".into()],
        ),
        ("double quotes", format!("\"{one}\"").into_bytes(), vec![]),
        (
            "quoted local part",
            email("\"recruiter.one\"(at)example.com").into_bytes(),
            vec!["\"recruiter.one\"".into()],
        ),
    ];
    for (name, value, echoes) in cases {
        let mut req = format!("GET /v1/partner/jobs HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {token}\r\nOn-Behalf-Of: ").into_bytes();
        req.extend_from_slice(&value);
        req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let out = raw_exchange(h.gateway.addr, &req, Duration::from_secs(3)).await;
        let status = raw_status(&out);
        assert!(
            status == 400 || status == 403,
            "{name}: expected 400 or 403, got {out:?}"
        );
        let body = raw_body(&out);
        if status == 403 {
            let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
            assert_eq!(v["code"], "on_behalf_of_not_allowed", "{name}: {body}");
        }
        assert!(!body.contains(&token), "{name}: token echoed");
        for e in &echoes {
            assert!(
                !body.contains(e.as_str()),
                "{name}: body repeats {e:?}: {body}"
            );
        }
        assert_upstream_untouched(&h, name);
    }
}

#[tokio::test]
async fn on_behalf_of_from_claim_is_used_when_allowed_and_refused_otherwise() {
    let h = Harness::start().await;
    let path = "/v1/partner/jobs";
    let r = h
        .get(path, &h.token("svc-reporting-daily", json!({})))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        last_obo(&h),
        email("recruiter.two(at)example.com"),
        "no claim: the default"
    );

    for given in [
        "recruiter.one(at)example.com",
        "Recruiter.ONE(at)example.com",
    ] {
        let r = h
            .get(
                path,
                &h.token("svc-reporting-daily", json!({"act_as": email(given)})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{given}: {}", r.text());
        assert_eq!(
            last_obo(&h),
            email("recruiter.one(at)example.com"),
            "{given}: act_as in its configured spelling"
        );
    }
    let forwarded = h.sandbox.received().len();
    assert_eq!(forwarded, 3);

    for (name, act_as) in [
        (
            "act_as outside allowed",
            email("riley.recruiter(at)example.com"),
        ),
        (
            "act_as unknown user",
            email("mallory.attacker(at)evil.example"),
        ),
        (
            "act_as with CRLF injection",
            email("recruiter.one(at)example.com\r\nX-Evil: 1"),
        ),
        (
            "act_as with LF",
            email("recruiter.one(at)example.com\nX-Evil: 1"),
        ),
        (
            "act_as with NUL",
            email("recruiter.one(at)example.com\u{0}"),
        ),
        (
            "act_as with non-ASCII",
            email("recruiter.one(at)ex\u{e4}mple.com"),
        ),
        ("act_as not an address", "root".to_string()),
        ("act_as empty", String::new()),
    ] {
        let r = h
            .get(
                path,
                &h.token("svc-reporting-daily", json!({"act_as": act_as})),
            )
            .await;
        assert_refused(name, &r, StatusCode::FORBIDDEN, "on_behalf_of_not_allowed");
        let body = r.text();
        if !act_as.is_empty() {
            assert!(
                !body.contains(&act_as),
                "{name}: body repeats the claim: {body}"
            );
        }
        assert!(
            !body.contains("X-Evil") && !body.contains("riley") && !body.contains("mallory"),
            "{name}: {body}"
        );
    }
    assert_eq!(
        h.sandbox.received().len(),
        forwarded,
        "refused claims reached the upstream"
    );
    for req in h.sandbox.received() {
        assert_eq!(
            req.header_values("on-behalf-of").len(),
            1,
            "exactly one On-Behalf-Of per forwarded request"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 8. The caller's JWT stays at the gateway

#[tokio::test]
async fn inbound_jwt_never_reaches_the_upstream_in_any_header_or_body() {
    let stub = Stub::start().await;
    let h = Harness::start_with(Setup {
        upstream: Some(stub.base_url()),
        ..Setup::default()
    })
    .await;
    let sourcing = h.sourcing_token();
    let agency = h.token("svc-agency-connector", json!({}));
    let reporting = h.token(
        "svc-reporting-daily",
        json!({"act_as": email("recruiter.one(at)example.com")}),
    );
    let tokens = [sourcing.clone(), agency.clone(), reporting.clone()];
    let body = json!({"external_id": "ext-leak-1", "first_name": "Ada", "last_name": "Example"});

    let one = email("recruiter.one(at)example.com");
    let replies = [
        h.get("/v1/partner/jobs", &sourcing).await,
        h.post_json("/v1/partner/candidates", &sourcing, &body)
            .await,
        h.post_json("/v1/partner/candidates", &agency, &body).await,
        h.get("/v1/partner/candidates?external_ids=ext-leak-1", &reporting)
            .await,
        send_with(
            &h,
            Method::GET,
            "/v1/partner/prospect_pools",
            &[
                ("authorization", &format!("Bearer {sourcing}")),
                ("on-behalf-of", &one),
                ("cookie", &format!("jwt={sourcing}")),
                ("proxy-authorization", &format!("Bearer {sourcing}")),
                ("x-forwarded-authorization", &format!("Bearer {sourcing}")),
            ],
        )
        .await,
    ];
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.status, StatusCode::OK, "request {i}: {}", r.text());
    }
    // A token smuggled into the query is refused, not forwarded.
    let r = h
        .get(
            &format!("/v1/partner/jobs?access_token={sourcing}"),
            &sourcing,
        )
        .await;
    assert_refused(
        "token in the query",
        &r,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert!(!r.text().contains(&sourcing));

    let seen = stub.seen();
    assert_eq!(seen.len(), 5);
    for (i, req) in seen.iter().enumerate() {
        assert_eq!(
            req.headers.get_all("on-behalf-of").iter().count(),
            1,
            "request {i}: one On-Behalf-Of"
        );
        let mut text = format!("{} {}\n", req.method, req.uri);
        for (k, v) in &req.headers {
            text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        text.push_str(&String::from_utf8_lossy(&req.body));
        for t in &tokens {
            let sig = t.rsplit('.').next().unwrap();
            let payload = t.split('.').nth(1).unwrap();
            assert!(
                !text.contains(t.as_str()),
                "request {i}: the caller JWT reached the upstream"
            );
            assert!(
                !text.contains(sig),
                "request {i}: the JWT signature reached the upstream"
            );
            assert!(
                !text.contains(payload),
                "request {i}: the JWT payload reached the upstream"
            );
        }
        assert!(
            req.headers.get("cookie").is_none() && req.headers.get("proxy-authorization").is_none()
        );
        assert!(req.headers.get("x-forwarded-authorization").is_none());
    }
    for req in h.sandbox.token_requests() {
        let text = format!("{:?} {}", req.headers, String::from_utf8_lossy(&req.body));
        assert!(
            tokens.iter().all(|t| !text.contains(t.as_str())),
            "JWT sent to the token endpoint"
        );
    }
}
