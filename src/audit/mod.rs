//! The audit trail: one tamper-evident, PII-free JSON line per request.
//!
//! - [`AuditRecord`]: the record (DESIGN 1.5), every field always present.
//! - [`AuditLog`]: the writer (a std thread fed by a bounded queue, group commit; with `batch`
//!   and `never` a record is appended by the request's own thread when nothing is queued), size
//!   rotation and continuation of an existing chain after a restart or a crash.
//! - [`verify`] / [`cli_verify`]: re-check the hash chain and name the first bad record.
//! - [`query`] / [`cli_query`] / [`render_table`]: filter records across rotated files.
//!
//! # Canonical form and hash chain
//!
//! A record's *canonical JSON* is the record serialized by `serde_json` as one compact JSON
//! object (no whitespace at all) with the members in this fixed order, **without** `hash`:
//!
//! `ts, seq, request_id, team, subject, issuer, client_addr, method, operation, path,
//! on_behalf_of, credential, decision, code, status, upstream_status, duration_ms,
//! upstream_duration_ms, request_bytes, response_bytes, body_sha256, external_ids,
//! candidate_ids, validation, quota, prev_hash`
//!
//! Absent values are `null` (lists are `[]`); strings use `serde_json` escaping (`\"`, `\\`,
//! `\n`, `\r`, `\t`, `\b`, `\f`, `\u00XX` for the other control characters, everything else
//! including non-ASCII written as raw UTF-8); objects inside `validation` and `quota` have their
//! keys in sorted order (`serde_json`'s default map).
//!
//! ```text
//! hash = hex( SHA-256( prev_hash || "\n" || canonical_json ) )               without a key
//! hash = hex( HMAC-SHA256( key, prev_hash || "\n" || canonical_json ) )      with [audit] hmac_key
//! ```
//!
//! where `prev_hash` is the 64 lowercase hex characters (ASCII bytes) of the previous record's
//! `hash`, `key` is the UTF-8 bytes of the configured secret, and `hex` is lowercase. The very
//! first record of a chain has `seq` 1 and `prev_hash` = 64 × `0`; `seq` grows by exactly 1 per
//! record, across rotated files.
//!
//! The line written is the canonical JSON with `"hash":"<hex>"` appended as its last member,
//! followed by `\n`. So the hash input can be recovered from the raw line alone: drop the final
//! `,"hash":"<64 hex>"}` and close the object with `}`. Any reader can re-verify a log with a few
//! lines of Python:
//!
//! ```text
//! import hashlib, hmac, json, sys
//! key = None  # or b"the [audit] hmac_key value"
//! prev, seq = "0" * 64, 0
//! for n, raw in enumerate(open(sys.argv[1], "rb"), 1):  # rotated files first, oldest to newest
//!     line = raw.rstrip(b"\n")
//!     rec = json.loads(line)
//!     body, tail = line.rsplit(b',"hash":', 1)
//!     msg = prev.encode() + b"\n" + body + b"}"
//!     want = (hmac.new(key, msg, hashlib.sha256) if key else hashlib.sha256(msg)).hexdigest()
//!     assert tail == b'"' + want.encode() + b'"}', f"line {n}: hash"
//!     assert rec["prev_hash"] == prev and rec["seq"] == seq + 1, f"line {n}: chain"
//!     prev, seq = want, rec["seq"]
//! print("OK:", seq, "records")
//! ```
//!
//! [`verify`] does the same and also re-serializes every parsed record and compares it with the
//! raw line bytes, so an edit that keeps the hash input intact but changes the line (whitespace,
//! a different escape for the same string, a duplicate or extra member) is caught too.
//!
//! To keep that re-serialization byte-exact the writer normalizes a record before hashing it:
//! `seq`, `prev_hash` and `hash` are always the writer's; `ts` is set to the write time when empty
//! (RFC 3339 UTC with milliseconds, `2026-05-01T12:00:00.123Z`); `path` goes through
//! [`AuditRecord::sanitize_path`] (idempotent); durations are rounded to the microsecond (non-finite
//! values become 0); floating point numbers inside `validation`/`quota` are passed once through
//! serialize/parse.
//!
//! # Files and rotation
//!
//! Records are appended to `[audit] path` (e.g. `audit/audit.jsonl`). When the next write would make
//! it larger than `rotate_bytes`, the file is fsynced and renamed to `audit.jsonl.<seq>` where
//! `<seq>` is the `seq` of its first record zero-padded to 20 digits (so names sort in chain order),
//! and a new `audit.jsonl` continues the chain. Given the base file or its folder, [`verify`] and
//! [`query`] read `audit.jsonl.<seq>` files in order, then `audit.jsonl`.
//!
//! # Durability (`[audit] fsync`)
//!
//! The writer thread drains everything queued, writes it with one `write(2)`, and then (a record
//! appended by its request's thread, see [`AuditLog::write_reserved`], is a group of one; that
//! happens only in the two modes that need no `fdatasync` before the answer):
//! - `always`: one `fdatasync` for the group; [`AuditLog::write`] resolves after it. An
//!   acknowledged record survives power loss.
//! - `batch` (default): `write` resolves after `write(2)`; `fdatasync` runs at most every
//!   `batch_interval` (50 ms by default) while there is unsynced data. A process crash loses nothing
//!   acknowledged; a power failure or kernel crash can lose at most the records acknowledged in the
//!   last `batch_interval` (plus the time of one `fdatasync`).
//! - `never`: no fsync except on rotation and shutdown; the OS decides when data reaches the disk.
//!
//! A crash can leave a *torn* last line (a partial write without its `\n`). [`verify`] reports it as
//! a torn tail, not as tampering. [`AuditLog::open`] moves the torn bytes to
//! `audit.jsonl.torn-<unix ms>` (kept for inspection, never read as part of the chain), truncates
//! them, and continues the chain from the last complete record. An unterminated last line that is
//! a complete, valid record only lost its `\n`; it is kept and terminated.
//!
//! # Disk reserve (`[audit] reserve_bytes`)
//!
//! No request is forwarded unless its record can be written. A line is at most
//! [`MAX_RECORD_BYTES`] (a record that would be longer has its free-form strings cut to 64 bytes
//! and its lists cut to about 2 KiB, ending in `...[truncated]` or `{"truncated": n}`). The writer
//! keeps `reserve_bytes` of disk allocated beyond the end of the current file
//! (`fallocate(FALLOC_FL_KEEP_SIZE)`: the file size does not change), topping it up when less than
//! half is left. Every record first takes a reservation of [`MAX_RECORD_BYTES`] out of that space
//! ([`AuditLog::reserve`]); the pipeline takes it before forwarding and hands it to
//! [`AuditLog::write_reserved`] at the end. When the disk is full the reserve cannot be topped up:
//! the records of requests already in flight are still written into it, while new requests get
//! 503 `audit_unavailable` once it cannot hold one more record (checked again every second and
//! after every write). Rotation allocates the new file's reserve before switching to it (and
//! trims the old file's); until that allocation succeeds the current file keeps growing past
//! `rotate_bytes` into its own reserve. Devices, pipes and filesystems without `fallocate` have
//! no reserve (logged at start); there a write failure is only noticed when it happens.
//!
//! # What the chain does and does not prove
//!
//! Without a key, anyone who can write the file can recompute every hash after an edit; the chain
//! then only detects accidental damage and careless edits. With `hmac_key`, an edit, insertion,
//! deletion or reordering cannot be hidden without the key. In both cases removing records from
//! the *end* of the newest file (or whole newest files) cannot be detected from the files alone:
//! compare the `last: seq N hash H` that `audit verify` prints with a value recorded elsewhere.
//! The chain must start at `seq` 1: verifying a log whose oldest files were removed reports the
//! missing records as deleted.

mod chain;
mod files;
mod query;
mod record;
mod verify;
mod writer;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::values::Secret;

pub use chain::GENESIS_PREV_HASH;
pub use files::{chain_files, rotated_file_name};
pub use query::{QueryFilter, cli_query, query, render_table};
pub use record::{
    AuditRecord, Decision, MAX_PATH_BYTES, MAX_RECORD_BYTES, PATH_TRUNCATED_MARKER, format_ts,
    parse_ts,
};
pub use verify::{BadReason, BadRecord, ChainHead, VerifyReport, cli_verify, verify};
pub use writer::{AuditLog, AuditReservation};

/// When the writer calls `fdatasync` (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// After every group, before acknowledging it.
    Always,
    /// At most every `batch_interval`; acknowledgement after `write(2)`.
    #[default]
    Batch,
    /// Never (except rotation and shutdown).
    Never,
}

/// What the gateway does with new requests while the audit log cannot be written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    /// Refuse them with 503 `audit_unavailable` (fail closed).
    #[default]
    Reject,
    /// Serve them anyway; the failures are counted.
    Continue,
}

/// The validated `[audit]` section.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditSettings {
    /// The current file; rotated files sit next to it.
    pub path: PathBuf,
    pub fsync: Fsync,
    pub on_error: OnError,
    /// Rotate before a write would make the file larger than this; 0 disables rotation.
    pub rotate_bytes: u64,
    /// Keys the chain (HMAC-SHA256 instead of SHA-256).
    pub hmac_key: Option<Secret>,
    /// Records waiting for the writer; a write beyond this fails at once.
    pub queue_capacity: usize,
    /// With [`Fsync::Batch`], the longest an acknowledged record stays unsynced.
    pub batch_interval: Duration,
    /// Disk space kept allocated ahead of the current file (see "Disk reserve").
    pub reserve_bytes: u64,
}

/// 100 MiB.
pub const DEFAULT_ROTATE_BYTES: u64 = 100 * 1024 * 1024;
pub const DEFAULT_QUEUE_CAPACITY: usize = 4096;
pub const DEFAULT_BATCH_INTERVAL: Duration = Duration::from_millis(50);
/// 32 MiB: room for 2048 records of [`MAX_RECORD_BYTES`] in flight.
pub const DEFAULT_RESERVE_BYTES: u64 = 32 * 1024 * 1024;
/// The smallest reserve accepted: four records.
pub const MIN_RESERVE_BYTES: u64 = 4 * MAX_RECORD_BYTES as u64;
/// The largest reserve accepted: 4 GiB.
pub const MAX_RESERVE_BYTES: u64 = 4 * 1024 * 1024 * 1024;

impl AuditSettings {
    /// Defaults for everything but the path.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        AuditSettings {
            path: path.into(),
            fsync: Fsync::default(),
            on_error: OnError::default(),
            rotate_bytes: DEFAULT_ROTATE_BYTES,
            hmac_key: None,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            batch_interval: DEFAULT_BATCH_INTERVAL,
            reserve_bytes: DEFAULT_RESERVE_BYTES,
        }
    }
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings::new("audit/audit.jsonl")
    }
}

/// Why an audit operation failed. `Clone` so one write failure can be handed to every waiter of
/// the group it hit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("the audit queue is full ({0} records waiting)")]
    QueueFull(usize),
    #[error("the audit log is shut down")]
    Closed,
    #[error("the audit disk reserve is used up (the disk is full)")]
    NoSpace,
    #[error("audit log write failed: {0}")]
    Write(String),
    #[error("{}: {message}", path.display())]
    Io { path: PathBuf, message: String },
    #[error("{}:{line}: {message}", path.display())]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("invalid audit settings: {0}")]
    Settings(String),
    #[error("audit record could not be encoded: {0}")]
    Encode(String),
}

impl AuditError {
    fn io(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        AuditError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}
