//! Canonical form and hashing (see the module documentation of [`crate::audit`]).

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{AuditError, AuditRecord};
use crate::values::Secret;

/// `prev_hash` of the first record of a chain.
pub const GENESIS_PREV_HASH: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// What `serde_json` writes last for a record whose `hash` is empty.
const EMPTY_HASH_MEMBER: &[u8] = b",\"hash\":\"\"}";
const HASH_MEMBER_OPEN: &[u8] = b",\"hash\":\"";

/// SHA-256, or HMAC-SHA256 with the configured key.
#[derive(Clone)]
pub(crate) enum ChainKey {
    Plain,
    Keyed(Box<Hmac<Sha256>>),
}

impl ChainKey {
    pub(crate) fn new(key: Option<&Secret>) -> Result<Self, AuditError> {
        match key {
            None => Ok(ChainKey::Plain),
            Some(k) => Hmac::<Sha256>::new_from_slice(k.expose().as_bytes())
                .map(|m| ChainKey::Keyed(Box::new(m)))
                .map_err(|e| AuditError::Settings(format!("hmac_key: {e}"))),
        }
    }

    pub(crate) fn is_keyed(&self) -> bool {
        matches!(self, ChainKey::Keyed(_))
    }

    /// Lowercase hex of the digest of `prev_hash || "\n" || canonical`.
    pub(crate) fn digest(&self, prev_hash: &str, canonical: &[u8]) -> String {
        match self {
            ChainKey::Plain => {
                let mut h = Sha256::new();
                h.update(prev_hash.as_bytes());
                h.update(b"\n");
                h.update(canonical);
                crate::values::lower_hex(&h.finalize())
            }
            ChainKey::Keyed(mac) => {
                let mut m = (**mac).clone();
                m.update(prev_hash.as_bytes());
                m.update(b"\n");
                m.update(canonical);
                crate::values::lower_hex(&m.finalize().into_bytes())
            }
        }
    }
}

/// Writes the canonical JSON of `rec` (its `hash` ignored) into `out`, replacing its contents.
pub(crate) fn canonical_into(rec: &mut AuditRecord, out: &mut Vec<u8>) -> Result<(), AuditError> {
    let hash = std::mem::take(&mut rec.hash);
    out.clear();
    let written = serde_json::to_writer(&mut *out, &*rec);
    rec.hash = hash;
    written.map_err(|e| AuditError::Encode(e.to_string()))?;
    if !out.ends_with(EMPTY_HASH_MEMBER) {
        return Err(AuditError::Encode(
            "the record did not serialize with hash as its last member".into(),
        ));
    }
    out.truncate(out.len() - EMPTY_HASH_MEMBER.len());
    out.push(b'}');
    Ok(())
}

/// Appends the stored line (without `\n`): the canonical JSON with `"hash"` as last member.
pub(crate) fn push_line(canonical: &[u8], hash: &str, out: &mut Vec<u8>) {
    let body = canonical.strip_suffix(b"}").unwrap_or(canonical);
    out.extend_from_slice(body);
    out.extend_from_slice(HASH_MEMBER_OPEN);
    out.extend_from_slice(hash.as_bytes());
    out.extend_from_slice(b"\"}");
}

/// Brings a record's free-form numbers into a form that re-serializes byte for byte after a
/// parse (see "Canonical form" in the module documentation).
pub(crate) fn normalize(rec: &mut AuditRecord) {
    if !AuditRecord::path_is_sanitized(&rec.path) {
        rec.path = AuditRecord::sanitize_path(&rec.path);
    }
    rec.duration_ms = round_ms(rec.duration_ms);
    rec.upstream_duration_ms = rec.upstream_duration_ms.map(round_ms);
    for v in [&mut rec.validation, &mut rec.quota].into_iter().flatten() {
        if has_float(v) {
            stabilize(v);
        }
    }
}

/// Microsecond precision; non-finite and absurd values (beyond ~30 years) become 0.
fn round_ms(ms: f64) -> f64 {
    if !ms.is_finite() || ms.abs() > 1e12 {
        return 0.0;
    }
    (ms * 1000.0).round() / 1000.0
}

fn has_float(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.is_f64(),
        serde_json::Value::Array(a) => a.iter().any(has_float),
        serde_json::Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

/// Serialize/parse until the value no longer changes (once in practice).
fn stabilize(v: &mut serde_json::Value) {
    for _ in 0..3 {
        let Ok(text) = serde_json::to_string(v) else {
            return;
        };
        let Ok(parsed) = serde_json::from_str::<serde_json::Value>(&text) else {
            return;
        };
        if parsed == *v {
            return;
        }
        *v = parsed;
    }
}
