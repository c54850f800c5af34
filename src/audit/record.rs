//! The record and the value rules that keep every record one well-formed line.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::BorrowedFormatItem;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

/// Whether the request was sent upstream.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Sent upstream, whatever came back (502/504 after sending included).
    Forwarded,
    /// Answered by the gateway without forwarding.
    #[default]
    Denied,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Forwarded => "forwarded",
            Decision::Denied => "denied",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Decision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "forwarded" => Ok(Decision::Forwarded),
            "denied" => Ok(Decision::Denied),
            other => Err(format!(
                "\"{}\" is not a decision (use forwarded or denied)",
                other.escape_debug()
            )),
        }
    }
}

/// One request, whatever its outcome (DESIGN 1.5). The field order here is the canonical order
/// of the hash chain: do not reorder. `ts`, `seq`, `prev_hash` and `hash` are filled in by the
/// writer (`ts` only when empty).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct AuditRecord {
    /// RFC 3339 UTC with milliseconds; see [`format_ts`].
    pub ts: String,
    pub seq: u64,
    pub request_id: String,
    pub team: Option<String>,
    /// The caller token's `sub`, when a token was verified.
    pub subject: Option<String>,
    pub issuer: Option<String>,
    pub client_addr: Option<String>,
    pub method: String,
    /// The spec's operation id, when a route matched.
    pub operation: Option<String>,
    /// The request path as received, through [`AuditRecord::sanitize_path`].
    pub path: String,
    pub on_behalf_of: Option<String>,
    /// The name of the upstream credential used.
    pub credential: Option<String>,
    pub decision: Decision,
    /// The problem `code` when the gateway answered with an error.
    pub code: Option<String>,
    /// The status sent to the client.
    pub status: u16,
    pub upstream_status: Option<u16>,
    pub duration_ms: f64,
    pub upstream_duration_ms: Option<f64>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Hex SHA-256 of the request body, when there was one.
    pub body_sha256: Option<String>,
    pub external_ids: Vec<String>,
    pub candidate_ids: Vec<i64>,
    /// `[{"pointer": "...", "keyword": "..."}]`: never the submitted values.
    pub validation: Option<serde_json::Value>,
    pub quota: Option<serde_json::Value>,
    pub prev_hash: String,
    pub hash: String,
}

/// The longest line the writer produces, `\n` included: the unit of the disk reserve. A record
/// that would be longer is shrunk (see `AuditRecord::shrink`).
pub const MAX_RECORD_BYTES: usize = 16 * 1024;
/// A free-form string of a shrunk record keeps at most this many bytes (then the marker).
const SHRUNK_STRING_BYTES: usize = 64;
/// The serialized lists of a shrunk record (`external_ids`, `candidate_ids`, `validation`) keep
/// at most about this many bytes each; `quota` half of it.
const SHRUNK_LIST_BYTES: usize = 2048;

/// The longest `path` kept, in bytes, marker included.
pub const MAX_PATH_BYTES: usize = 512;
/// Ends a truncated `path`.
pub const PATH_TRUNCATED_MARKER: &str = "...[truncated]";

impl AuditRecord {
    /// Makes a raw request target safe and bounded: bytes that are controls, space, DEL, `"`, `\`
    /// or non-ASCII become `%XX` (uppercase hex of each byte); the result is cut to at most
    /// [`MAX_PATH_BYTES`] bytes ending in [`PATH_TRUNCATED_MARKER`] (never inside a `%XX`).
    /// Idempotent, so the writer can apply it again.
    pub fn sanitize_path(raw: &str) -> String {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut out = String::with_capacity(raw.len().min(MAX_PATH_BYTES + 3));
        for &b in raw.as_bytes() {
            if needs_escape(b) {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0x0f)]));
            } else {
                out.push(char::from(b));
            }
            if out.len() > MAX_PATH_BYTES {
                break;
            }
        }
        if out.len() > MAX_PATH_BYTES {
            let mut cut = MAX_PATH_BYTES - PATH_TRUNCATED_MARKER.len();
            let bytes = out.as_bytes();
            if bytes[cut - 1] == b'%' {
                cut -= 1;
            } else if bytes[cut - 2] == b'%' {
                cut -= 2;
            }
            out.truncate(cut);
            out.push_str(PATH_TRUNCATED_MARKER);
        }
        out
    }

    /// Bounds a record whose line would exceed [`MAX_RECORD_BYTES`]: every free-form string is
    /// cut to 64 bytes ending in [`PATH_TRUNCATED_MARKER`], `external_ids` and `candidate_ids`
    /// keep their first entries up to about 2 KiB (`external_ids` then ends in the marker),
    /// `validation` keeps its first entries up to about 2 KiB followed by `{"truncated": n}` (n
    /// entries left out), and a `quota` over 1 KiB becomes `{"truncated": true}`. With the path
    /// bound and the fixed fields the line then stays under 13 KiB, even when every string is
    /// made of control characters (6 bytes each once escaped).
    pub(crate) fn shrink(&mut self) {
        for s in [&mut self.request_id, &mut self.method] {
            cut_string(s);
        }
        for s in [
            &mut self.team,
            &mut self.subject,
            &mut self.issuer,
            &mut self.client_addr,
            &mut self.operation,
            &mut self.on_behalf_of,
            &mut self.credential,
            &mut self.code,
            &mut self.body_sha256,
        ]
        .into_iter()
        .flatten()
        {
            cut_string(s);
        }
        let budget = SHRUNK_LIST_BYTES - 2 * SHRUNK_STRING_BYTES;
        let (mut used, mut kept) = (0, 0);
        for id in &mut self.external_ids {
            cut_string(id);
            used += json_len(id.as_str()) + 1;
            if used > budget {
                break;
            }
            kept += 1;
        }
        if kept < self.external_ids.len() {
            self.external_ids.truncate(kept);
            self.external_ids.push(PATH_TRUNCATED_MARKER.to_string());
        }
        let mut used = 0;
        let kept = self
            .candidate_ids
            .iter()
            .take_while(|id| {
                used += id.to_string().len() + 1;
                used <= SHRUNK_LIST_BYTES
            })
            .count();
        self.candidate_ids.truncate(kept);
        if let Some(v) = &mut self.validation
            && json_len(&*v) > SHRUNK_LIST_BYTES
        {
            *v = match v {
                serde_json::Value::Array(items) => {
                    let mut used = 0;
                    let kept = items
                        .iter()
                        .take_while(|item| {
                            used += json_len(*item) + 1;
                            used <= budget
                        })
                        .count();
                    let omitted = items.len() - kept;
                    items.truncate(kept);
                    items.push(serde_json::json!({ "truncated": omitted }));
                    serde_json::Value::Array(std::mem::take(items))
                }
                _ => serde_json::json!({ "truncated": true }),
            };
        }
        if let Some(q) = &mut self.quota
            && json_len(&*q) > SHRUNK_LIST_BYTES / 2
        {
            *q = serde_json::json!({ "truncated": true });
        }
    }

    pub(crate) fn path_is_sanitized(path: &str) -> bool {
        path.len() <= MAX_PATH_BYTES && !path.bytes().any(needs_escape)
    }
}

/// Cuts `s` to [`SHRUNK_STRING_BYTES`] (at a character boundary) and appends the marker.
fn cut_string(s: &mut String) {
    if s.len() <= SHRUNK_STRING_BYTES {
        return;
    }
    let mut cut = SHRUNK_STRING_BYTES - PATH_TRUNCATED_MARKER.len();
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push_str(PATH_TRUNCATED_MARKER);
}

fn json_len<T: Serialize + ?Sized>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX / 4, |b| b.len())
}

fn needs_escape(b: u8) -> bool {
    b <= b' ' || b >= 0x7f || b == b'"' || b == b'\\'
}

const TS_FORMAT: &[BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// `2026-05-01T12:00:00.123Z`: the form of `ts` (UTC, milliseconds).
pub fn format_ts(t: OffsetDateTime) -> String {
    let utc = t.to_offset(time::UtcOffset::UTC);
    utc.format(TS_FORMAT)
        .or_else(|_| utc.format(&Rfc3339))
        .unwrap_or_default()
}

/// Parses an RFC 3339 timestamp (any offset).
pub fn parse_ts(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}
