//! The dev identity provider: an ES256 signing key (rotatable), its JWKS and token minting.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};

use super::lock;
use super::respond::unix_now;

/// The audience minted tokens carry unless the caller names one.
pub const DEFAULT_AUDIENCE: &str = "greenhouse-gateway";

/// One P-256 signing key and its public JWK.
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn generate(generation: u32) -> std::io::Result<Self> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(std::io::Error::other)?;
        // The raw public key is the uncompressed SEC1 point 0x04 || x || y.
        let point = pair.public_key_raw();
        if point.len() != 65 || point[0] != 0x04 {
            return Err(std::io::Error::other(
                "unexpected P-256 public key encoding",
            ));
        }
        let kid = format!("sandbox-{generation}-{:08x}", rand::random::<u32>());
        let jwk = json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
            "kid": kid,
            "alg": "ES256",
            "use": "sig",
        });
        Ok(SigningKey {
            kid,
            encoding: EncodingKey::from_ec_der(&pair.serialize_der()),
            jwk,
        })
    }
}

struct Ring {
    current: Arc<SigningKey>,
    /// Public keys in the JWKS, newest first.
    published: Vec<Value>,
    generation: u32,
}

/// The signing keys: one current, plus older ones still published after a rotation.
pub(crate) struct KeyRing {
    ring: Mutex<Ring>,
}

impl KeyRing {
    pub(crate) fn new() -> std::io::Result<Self> {
        let key = SigningKey::generate(1)?;
        Ok(KeyRing {
            ring: Mutex::new(Ring {
                published: vec![key.jwk.clone()],
                current: Arc::new(key),
                generation: 1,
            }),
        })
    }

    /// The `kid` of the current signing key.
    pub(crate) fn current_kid(&self) -> String {
        lock(&self.ring).current.kid.clone()
    }

    /// The JWKS document: `{"keys":[...]}`.
    pub(crate) fn jwks(&self) -> Value {
        json!({ "keys": lock(&self.ring).published.clone() })
    }

    /// Makes a fresh key current; older public keys stay published only when asked.
    pub(crate) fn rotate(&self, keep_old_in_jwks: bool) -> std::io::Result<String> {
        let generation = lock(&self.ring).generation + 1;
        // Key generation happens outside the lock.
        let key = SigningKey::generate(generation)?;
        let kid = key.kid.clone();
        let mut ring = lock(&self.ring);
        if keep_old_in_jwks {
            ring.published.insert(0, key.jwk.clone());
        } else {
            ring.published = vec![key.jwk.clone()];
        }
        ring.current = Arc::new(key);
        ring.generation = ring.generation.max(generation);
        Ok(kid)
    }

    /// Signs `claims` (merged over the defaults) with the current key.
    pub(crate) fn mint(
        &self,
        issuer: &str,
        claims: Value,
        lifetime: Duration,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let key = Arc::clone(&lock(&self.ring).current);
        let now = unix_now();
        let mut map = match claims {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        map.entry("iss").or_insert_with(|| issuer.into());
        map.entry("aud").or_insert_with(|| DEFAULT_AUDIENCE.into());
        map.entry("iat").or_insert_with(|| now.into());
        map.entry("nbf").or_insert_with(|| now.into());
        map.entry("exp")
            .or_insert_with(|| now.saturating_add(lifetime.as_secs()).into());
        map.entry("jti")
            .or_insert_with(|| format!("{:016x}", rand::random::<u64>()).into());
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &Value::Object(map), &key.encoding)
    }
}
