//! Re-checking the hash chain and naming the first bad record.

use std::fmt;
use std::io::Write;
use std::path::PathBuf;

use super::chain::{self, ChainKey, GENESIS_PREV_HASH};
use super::files::{ChainLines, Line, discover};
use super::{AuditError, AuditRecord};
use crate::values::Secret;

/// Why a record is bad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadReason {
    /// Its hash does not match its content, its line is not in canonical form, or its
    /// `prev_hash` does not match the record before it.
    Edited,
    /// Records are missing: `expected_seq` was due, `found_seq` came (the chain starts at 1).
    Deleted { expected_seq: u64, found_seq: u64 },
    /// A record whose seq was already passed (a copy, or a forged record).
    Inserted,
    /// The record that was due comes later.
    Reordered,
    /// Not an audit record (and not the torn last line of the newest file).
    BadJson,
    /// Every hash fails from the first record on: the log is keyed and no key or another key
    /// was given, or a key was given for an unkeyed log.
    KeyMismatch,
    /// A file could not be found or read.
    Unreadable,
}

impl fmt::Display for BadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadReason::Edited => f.write_str("edited"),
            BadReason::Deleted { .. } => f.write_str("deleted"),
            BadReason::Inserted => f.write_str("inserted"),
            BadReason::Reordered => f.write_str("reordered"),
            BadReason::BadJson => f.write_str("not an audit record"),
            BadReason::KeyMismatch => f.write_str("key mismatch"),
            BadReason::Unreadable => f.write_str("unreadable"),
        }
    }
}

/// The first record that does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    pub file: PathBuf,
    /// 1-based line in `file` (0 when the file itself is the problem).
    pub line: usize,
    /// The seq the line claims, when it has one.
    pub seq: Option<u64>,
    pub reason: BadReason,
    /// One human sentence.
    pub detail: String,
}

/// The newest verified record: compare it with a copy kept elsewhere to detect removal of
/// records from the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: String,
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Records that verified (up to the first bad one).
    pub records: u64,
    pub first_bad: Option<BadRecord>,
    /// An unterminated, unparseable last line of the newest file (an interrupted write).
    pub torn_tail: Option<(PathBuf, usize)>,
    /// The files read, in chain order.
    pub files: Vec<PathBuf>,
    pub last: Option<ChainHead>,
}

impl VerifyReport {
    /// No tampering (a torn tail is allowed).
    pub fn is_ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// Verifies the chain(s) in `files`: the files of one chain in order, or a single folder or
/// base file whose rotated files are found next to it (see [`crate::audit::chain_files`]).
/// Several chains in one folder are verified one after the other, each from seq 1.
/// Stops at the first bad record.
pub fn verify(files: &[PathBuf], hmac_key: Option<&Secret>) -> VerifyReport {
    let mut report = VerifyReport::default();
    let unreadable = |e: AuditError| {
        let (file, detail) = match &e {
            AuditError::Io { path, message } => (path.clone(), message.clone()),
            other => (PathBuf::new(), other.to_string()),
        };
        BadRecord {
            file,
            line: 0,
            seq: None,
            reason: BadReason::Unreadable,
            detail,
        }
    };
    let key = match ChainKey::new(hmac_key) {
        Ok(k) => k,
        Err(e) => {
            report.first_bad = Some(unreadable(e));
            return report;
        }
    };
    let chains = match discover(files) {
        Ok(c) => c,
        Err(e) => {
            report.first_bad = Some(unreadable(e));
            return report;
        }
    };
    for chain_files in chains {
        report.files.extend(chain_files.iter().cloned());
        if let Err(e) = verify_chain(&chain_files, &key, &mut report) {
            report.first_bad = Some(unreadable(e));
        }
        if report.first_bad.is_some() {
            break;
        }
    }
    report
}

fn verify_chain(
    files: &[PathBuf],
    key: &ChainKey,
    report: &mut VerifyReport,
) -> Result<(), AuditError> {
    let mut expected_seq: u64 = 1;
    let mut expected_prev = GENESIS_PREV_HASH.to_string();
    let mut previous: Option<(usize, usize)> = None;
    let mut canon = Vec::new();
    let mut expected_line = Vec::new();
    for line in ChainLines::new(files) {
        let line = line?;
        let path = &files[line.file];
        let bad = |reason: BadReason, seq: Option<u64>, detail: String| BadRecord {
            file: path.clone(),
            line: line.line,
            seq,
            reason,
            detail,
        };
        let mut rec = match serde_json::from_slice::<AuditRecord>(&line.bytes) {
            Ok(r) => r,
            Err(e) => {
                if !line.terminated && only_empty_files_after(files, line.file) {
                    report.torn_tail = Some((path.clone(), line.line));
                    return Ok(());
                }
                let detail = if line.terminated {
                    format!("not an audit record: {e}")
                } else {
                    "an unterminated line at the end of a file that is not the newest".to_string()
                };
                report.first_bad = Some(bad(BadReason::BadJson, loose_seq(&line.bytes), detail));
                return Ok(());
            }
        };
        let seq = Some(rec.seq);
        let claimed = std::mem::take(&mut rec.hash);
        if let Err(e) = chain::canonical_into(&mut rec, &mut canon) {
            report.first_bad = Some(bad(BadReason::BadJson, seq, e.to_string()));
            return Ok(());
        }
        expected_line.clear();
        chain::push_line(&canon, &claimed, &mut expected_line);
        if expected_line != line.bytes {
            report.first_bad = Some(bad(
                BadReason::Edited,
                seq,
                "the line is not in canonical form (whitespace, escaping, member order or an \
                 extra member changed)"
                    .into(),
            ));
            return Ok(());
        }
        if key.digest(&rec.prev_hash, &canon) != claimed {
            let (reason, detail) = if previous.is_none()
                && key_mismatch(key, &rec, &canon, &claimed, files, &line)?
            {
                let detail = if key.is_keyed() {
                    "the hashes do not match the given hmac_key (another key, or the log is not keyed)"
                } else {
                    "the hashes are not plain SHA-256: the log is keyed; pass its hmac_key"
                };
                (BadReason::KeyMismatch, detail.to_string())
            } else {
                (
                    BadReason::Edited,
                    "the hash does not match the record's content".to_string(),
                )
            };
            report.first_bad = Some(bad(reason, seq, detail));
            return Ok(());
        }
        if rec.seq != expected_seq || rec.prev_hash != expected_prev {
            let (reason, detail) = if rec.seq == expected_seq {
                let after = match previous {
                    Some((f, l)) => format!("{}:{l}", files[f].display()),
                    None => "the start of the chain".to_string(),
                };
                (
                    BadReason::Edited,
                    format!(
                        "prev_hash does not match the record before it ({after}): that record was \
                         altered or replaced"
                    ),
                )
            } else if rec.seq > expected_seq {
                if seq_comes_later(files, &line, expected_seq)? {
                    (
                        BadReason::Reordered,
                        format!("seq {expected_seq} was due here and comes later"),
                    )
                } else {
                    let last_missing = rec.seq - 1;
                    let detail = if expected_seq == 1 {
                        format!(
                            "the chain starts at seq {} instead of 1 (records removed, or older \
                             files not given)",
                            rec.seq
                        )
                    } else if expected_seq == last_missing {
                        format!("seq {expected_seq} is missing before this record")
                    } else {
                        format!(
                            "seq {expected_seq}..={last_missing} are missing before this record"
                        )
                    };
                    let reason = BadReason::Deleted {
                        expected_seq,
                        found_seq: rec.seq,
                    };
                    (reason, detail)
                }
            } else {
                let detail = match identical_earlier(files, &line)? {
                    Some((f, l)) => format!(
                        "seq {} was already passed; a copy of {}:{l}",
                        rec.seq,
                        files[f].display()
                    ),
                    None => format!("seq {} was already passed", rec.seq),
                };
                (BadReason::Inserted, detail)
            };
            report.first_bad = Some(bad(reason, seq, detail));
            return Ok(());
        }
        expected_seq = rec.seq.saturating_add(1);
        previous = Some((line.file, line.line));
        report.records += 1;
        report.last = Some(ChainHead {
            seq: rec.seq,
            hash: claimed.clone(),
        });
        expected_prev = claimed;
    }
    Ok(())
}

/// The newest file with content: a torn tail is only possible there.
fn only_empty_files_after(files: &[PathBuf], file: usize) -> bool {
    files[file + 1..]
        .iter()
        .all(|f| std::fs::metadata(f).is_ok_and(|m| m.len() == 0))
}

fn loose_seq(bytes: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct SeqOnly {
        seq: u64,
    }
    serde_json::from_slice::<SeqOnly>(bytes).ok().map(|s| s.seq)
}

/// Lines after `at`, across the rest of the chain.
fn lines_after<'a>(
    files: &'a [PathBuf],
    at: &Line,
) -> impl Iterator<Item = Result<Line, AuditError>> + 'a {
    let (file, line) = (at.file, at.line);
    ChainLines::new(files).filter(move |l| match l {
        Ok(l) => (l.file, l.line) > (file, line),
        Err(_) => true,
    })
}

/// The first record fails: is it the key rather than an edit? Yes when a given key is not
/// needed (plain SHA-256 matches), or when the next record fails too (or there is none).
fn key_mismatch(
    key: &ChainKey,
    rec: &AuditRecord,
    canon: &[u8],
    claimed: &str,
    files: &[PathBuf],
    at: &Line,
) -> Result<bool, AuditError> {
    if key.is_keyed() && ChainKey::Plain.digest(&rec.prev_hash, canon) == claimed {
        return Ok(true);
    }
    let Some(next) = lines_after(files, at).next() else {
        return Ok(true);
    };
    let next = next?;
    let Ok(mut next_rec) = serde_json::from_slice::<AuditRecord>(&next.bytes) else {
        return Ok(true);
    };
    let next_claimed = std::mem::take(&mut next_rec.hash);
    let mut next_canon = Vec::new();
    if chain::canonical_into(&mut next_rec, &mut next_canon).is_err() {
        return Ok(true);
    }
    Ok(key.digest(&next_rec.prev_hash, &next_canon) != next_claimed)
}

fn seq_comes_later(files: &[PathBuf], at: &Line, seq: u64) -> Result<bool, AuditError> {
    for line in lines_after(files, at) {
        if loose_seq(&line?.bytes) == Some(seq) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn identical_earlier(files: &[PathBuf], at: &Line) -> Result<Option<(usize, usize)>, AuditError> {
    for line in ChainLines::new(files) {
        let line = line?;
        if (line.file, line.line) >= (at.file, at.line) {
            break;
        }
        if line.bytes == at.bytes {
            return Ok(Some((line.file, line.line)));
        }
    }
    Ok(None)
}

/// `audit verify`: prints `OK: N records` (and the last seq and hash, and a torn-tail warning),
/// or the first bad record. Exit code 0 when no tampering was found (a torn tail included), 1 on
/// tampering, 2 when a file cannot be read.
pub fn cli_verify(files: &[PathBuf], hmac_key: Option<&Secret>) -> i32 {
    let report = verify(files, hmac_key);
    let mut out = std::io::stdout().lock();
    let code = match &report.first_bad {
        None => {
            let _ = writeln!(out, "OK: {} records", report.records);
            if let Some(head) = &report.last {
                let _ = writeln!(out, "last: seq {} hash {}", head.seq, head.hash);
            }
            0
        }
        Some(bad) if bad.reason == BadReason::Unreadable => {
            let _ = writeln!(out, "ERROR: {}: {}", bad.file.display(), bad.detail);
            2
        }
        Some(bad) => {
            let seq = bad.seq.map_or_else(|| "?".to_string(), |s| s.to_string());
            let _ = writeln!(
                out,
                "TAMPERED: {}:{} seq {seq}: {}: {}",
                bad.file.display(),
                bad.line,
                bad.reason,
                bad.detail
            );
            let _ = writeln!(out, "{} records verified before it", report.records);
            1
        }
    };
    if let Some((file, line)) = &report.torn_tail {
        let _ = writeln!(
            out,
            "WARNING: torn tail at {}:{line}: an incomplete last write (a crash or power loss), not \
             tampering; the gateway moves it aside when it next opens the log",
            file.display()
        );
    }
    code
}
