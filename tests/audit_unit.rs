//! The audit log on its own: record shape, hash chain, tamper detection, rotation, recovery,
//! durability, failure handling, query and table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::AUDIT_FIELDS as FIELDS;

use std::collections::HashSet;
use std::fs;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::process::{Command, Stdio};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use greenhouse_gateway::audit::{
    AuditError, AuditLog, AuditRecord, AuditSettings, BadReason, Decision, Fsync,
    GENESIS_PREV_HASH, MAX_PATH_BYTES, MAX_RECORD_BYTES, OnError, PATH_TRUNCATED_MARKER,
    QueryFilter, chain_files, cli_verify, parse_ts, query, render_table, rotated_file_name, verify,
};
use greenhouse_gateway::values::Secret;
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::{Digest, Sha256};

fn settings(dir: &Path) -> AuditSettings {
    AuditSettings {
        batch_interval: Duration::from_millis(10),
        ..AuditSettings::new(dir.join("audit").join("audit.jsonl"))
    }
}

fn keyed(dir: &Path, key: &str) -> AuditSettings {
    AuditSettings {
        hmac_key: Some(Secret::new(key)),
        ..settings(dir)
    }
}

fn record(i: u64) -> AuditRecord {
    let forwarded = !i.is_multiple_of(3);
    AuditRecord {
        request_id: format!("req-{i:04}"),
        team: Some(
            if i.is_multiple_of(2) {
                "sourcing"
            } else {
                "agency"
            }
            .into(),
        ),
        subject: Some(format!("svc-{}", i % 4)),
        issuer: Some("https://idp.internal".into()),
        client_addr: Some("10.0.0.7".into()),
        method: "POST".into(),
        operation: Some(
            if i.is_multiple_of(2) {
                "post_candidates"
            } else {
                "get_jobs"
            }
            .into(),
        ),
        path: "/v1/partner/candidates".into(),
        on_behalf_of: Some(format!("user-{}", i % 5)),
        credential: Some("default".into()),
        decision: if forwarded {
            Decision::Forwarded
        } else {
            Decision::Denied
        },
        code: (!forwarded).then(|| "rate_limited".to_string()),
        status: if forwarded { 200 } else { 429 },
        upstream_status: forwarded.then_some(200),
        duration_ms: 1.5 + i as f64,
        upstream_duration_ms: forwarded.then_some(0.75),
        request_bytes: 120 + i,
        response_bytes: 40,
        body_sha256: Some(hex::encode(Sha256::digest(i.to_string()))),
        external_ids: vec![format!("ext-{i}")],
        candidate_ids: vec![1000 + i as i64],
        validation: None,
        quota: Some(json!({"daily_remaining": 10_000 - i as i64})),
        ..AuditRecord::default()
    }
}

async fn write_records(log: &AuditLog, range: std::ops::Range<u64>) {
    for i in range {
        log.write(record(i)).await.unwrap();
    }
}

/// A log with `n` records (seq 1..=n), shut down.
async fn log_with(s: AuditSettings, n: u64) -> PathBuf {
    let path = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    write_records(&log, 1..n + 1).await;
    log.shutdown().await;
    path
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    fs::write(path, text).unwrap();
}

fn check(path: &Path) -> greenhouse_gateway::audit::VerifyReport {
    verify(&[path.to_path_buf()], None)
}

fn assert_bad(
    report: &greenhouse_gateway::audit::VerifyReport,
    line: usize,
    seq: u64,
    reason: BadReason,
) {
    let bad = report
        .first_bad
        .as_ref()
        .unwrap_or_else(|| panic!("tampering not detected: {report:?}"));
    assert_eq!(
        (bad.line, bad.seq, &bad.reason),
        (line, Some(seq), &reason),
        "{bad:?}"
    );
}

/// Polls once: enough for `write` to queue its record (or fail) without waiting for the writer.
fn poll_once<F: Future>(f: F) -> Poll<F::Output> {
    let mut f = pin!(f);
    f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
}

fn all_records(path: &Path) -> Vec<AuditRecord> {
    query(&[path.to_path_buf()], &QueryFilter::default()).unwrap()
}

// ---- the record --------------------------------------------------------------------------

#[tokio::test]
async fn written_line_has_every_field_in_order_with_null_when_absent() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let path = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    log.write(AuditRecord {
        request_id: "r1".into(),
        method: "GET".into(),
        path: "/v1/jobs".into(),
        status: 401,
        code: Some("missing_token".into()),
        ..AuditRecord::default()
    })
    .await
    .unwrap();
    log.shutdown().await;

    let line = &lines(&path)[0];
    let mut last = 0;
    for field in FIELDS {
        let at = line
            .find(&format!("\"{field}\":"))
            .unwrap_or_else(|| panic!("{field} missing from {line}"));
        assert!(at >= last, "{field} out of order in {line}");
        last = at;
    }
    for absent in [
        "team",
        "subject",
        "issuer",
        "client_addr",
        "operation",
        "on_behalf_of",
        "credential",
        "upstream_status",
        "upstream_duration_ms",
        "body_sha256",
        "validation",
        "quota",
    ] {
        assert!(
            line.contains(&format!("\"{absent}\":null")),
            "{absent}: {line}"
        );
    }
    assert!(line.contains("\"external_ids\":[]") && line.contains("\"candidate_ids\":[]"));
    assert!(line.contains("\"decision\":\"denied\""));
    let value: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(value.as_object().unwrap().len(), FIELDS.len());
    assert_eq!(value["seq"], 1);
    assert_eq!(value["prev_hash"], GENESIS_PREV_HASH);
}

#[tokio::test]
async fn query_output_line_is_byte_identical_to_the_stored_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 3).await;
    let stored = lines(&path);
    let printed: Vec<String> = all_records(&path)
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    assert_eq!(printed, stored);
}

#[tokio::test]
async fn writer_sets_empty_ts_keeps_a_given_one_and_owns_seq_and_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let path = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    log.write(AuditRecord {
        seq: 999,
        prev_hash: "forged".into(),
        hash: "forged".into(),
        ..record(1)
    })
    .await
    .unwrap();
    log.write(AuditRecord {
        ts: "2026-01-02T03:04:05.678Z".into(),
        ..record(2)
    })
    .await
    .unwrap();
    log.shutdown().await;
    let recs = all_records(&path);
    assert_eq!(recs[0].seq, 1);
    assert_eq!(recs[0].prev_hash, GENESIS_PREV_HASH);
    assert_ne!(recs[0].hash, "forged");
    assert_eq!(recs[0].ts.len(), "2026-01-02T03:04:05.678Z".len());
    assert!(recs[0].ts.ends_with('Z') && parse_ts(&recs[0].ts).is_some());
    assert_eq!(recs[1].ts, "2026-01-02T03:04:05.678Z");
    assert!(check(&path).is_ok());
}

#[tokio::test]
async fn awkward_numbers_are_normalized_so_the_chain_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let path = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    log.write(AuditRecord {
        duration_ms: 1.234_567_89,
        upstream_duration_ms: Some(f64::NAN),
        quota: Some(json!({"a": 0.1 + 0.2, "b": [1e300, -2.5e-7, 12345678901234567890u64]})),
        validation: Some(json!([{"pointer": "/emails/0/value", "keyword": "format"}])),
        ..record(1)
    })
    .await
    .unwrap();
    log.write(AuditRecord {
        duration_ms: f64::INFINITY,
        ..record(2)
    })
    .await
    .unwrap();
    log.shutdown().await;
    let report = check(&path);
    assert!(report.is_ok(), "{report:?}");
    let recs = all_records(&path);
    assert_eq!(recs[0].duration_ms, 1.235);
    assert_eq!(recs[0].upstream_duration_ms, Some(0.0));
    assert_eq!(recs[1].duration_ms, 0.0);
}

#[test]
fn sanitize_path_escapes_controls_quotes_spaces_and_non_ascii() {
    assert_eq!(
        AuditRecord::sanitize_path("/v1/x?q=\"a b\"\n\r\t\u{0}\u{1b}[31m\\é\u{7f}"),
        "/v1/x?q=%22a%20b%22%0A%0D%09%00%1B[31m%5C%C3%A9%7F"
    );
    assert_eq!(
        AuditRecord::sanitize_path("/v1/jobs?page=2"),
        "/v1/jobs?page=2"
    );
}

#[test]
fn sanitize_path_truncates_long_input_with_a_marker_and_never_splits_an_escape() {
    for pad in 0..4 {
        let raw = format!("/{}{}", "a".repeat(pad), "é".repeat(2000));
        let out = AuditRecord::sanitize_path(&raw);
        assert!(out.len() <= MAX_PATH_BYTES, "{}", out.len());
        let kept = out.strip_suffix(PATH_TRUNCATED_MARKER).expect("marker");
        assert!(kept.len() > MAX_PATH_BYTES - PATH_TRUNCATED_MARKER.len() - 3);
        let tail: Vec<&str> = kept.split('%').skip(1).collect();
        assert!(tail.iter().all(|t| t.len() == 2), "split escape in {kept}");
        assert_eq!(AuditRecord::sanitize_path(&out), out, "not idempotent");
    }
    let ten_kb = "x".repeat(10 * 1024);
    assert_eq!(AuditRecord::sanitize_path(&ten_kb).len(), MAX_PATH_BYTES);
}

#[tokio::test]
async fn hostile_values_still_give_one_well_formed_line_per_record() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let path = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    let evil = format!(
        "x\n{{\"seq\":1,\"hash\":\"0\"}}\r\n\"quoted\"\\ \u{0}\u{1b}[2J\u{2028}é{}",
        "A".repeat(10 * 1024)
    );
    for i in 1..=3 {
        log.write(AuditRecord {
            request_id: evil.clone(),
            team: Some(evil.clone()),
            subject: Some(evil.clone()),
            issuer: Some(evil.clone()),
            client_addr: Some(evil.clone()),
            method: evil.clone(),
            operation: Some(evil.clone()),
            path: format!("/v1/{evil}"),
            on_behalf_of: Some(evil.clone()),
            credential: Some(evil.clone()),
            code: Some(evil.clone()),
            body_sha256: Some(evil.clone()),
            external_ids: vec![evil.clone(), evil.clone()],
            validation: Some(json!([{"pointer": evil.clone(), "keyword": evil.clone()}])),
            ..record(i)
        })
        .await
        .unwrap();
    }
    log.shutdown().await;

    let text = fs::read(&path).unwrap();
    assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), 3);
    assert!(
        !text.iter().any(|&b| b < 0x20 && b != b'\n'),
        "raw control byte"
    );
    for line in lines(&path) {
        let rec: AuditRecord = serde_json::from_str(&line).unwrap();
        // Kept whole, or (the line over MAX_RECORD_BYTES) cut with the marker.
        let subject = rec.subject.unwrap_or_default();
        let kept = subject
            .strip_suffix(PATH_TRUNCATED_MARKER)
            .unwrap_or(&subject);
        assert!(subject == evil || evil.starts_with(kept), "{subject:?}");
        assert!(rec.path.len() <= MAX_PATH_BYTES && rec.path.ends_with(PATH_TRUNCATED_MARKER));
        assert!(rec.path.bytes().all(|b| b.is_ascii_graphic()));
    }
    let report = check(&path);
    assert!(report.is_ok() && report.records == 3, "{report:?}");
}

#[tokio::test]
async fn documented_recipe_recomputes_every_hash_from_the_raw_lines() {
    let dir = tempfile::tempdir().unwrap();
    let plain = log_with(settings(dir.path()), 5).await;
    let dir2 = tempfile::tempdir().unwrap();
    let key = "k3y-for-the-recipe";
    let with_key = log_with(keyed(dir2.path(), key), 5).await;

    for (path, key) in [(plain, None), (with_key, Some(key))] {
        let mut prev = GENESIS_PREV_HASH.to_string();
        for (n, line) in lines(&path).iter().enumerate() {
            let cut = line.rfind(",\"hash\":").unwrap();
            let canonical = format!("{}}}", &line[..cut]);
            let mut msg = format!("{prev}\n").into_bytes();
            msg.extend_from_slice(canonical.as_bytes());
            let digest = match key {
                None => hex::encode(Sha256::digest(&msg)),
                Some(k) => {
                    let mut mac = Hmac::<Sha256>::new_from_slice(k.as_bytes()).unwrap();
                    mac.update(&msg);
                    hex::encode(mac.finalize().into_bytes())
                }
            };
            assert_eq!(&line[cut..], format!(",\"hash\":\"{digest}\"}}"));
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["prev_hash"], prev.as_str());
            assert_eq!(v["seq"], n as u64 + 1);
            prev = digest;
        }
    }
}

// ---- verify and tampering -------------------------------------------------------------------

#[tokio::test]
async fn verify_passes_on_a_clean_log_and_reports_the_chain_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 10).await;
    let report = check(&path);
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, 10);
    assert_eq!(report.torn_tail, None);
    let head = report.last.unwrap();
    assert_eq!(head.seq, 10);
    assert_eq!(head.hash, all_records(&path)[9].hash);
    assert_eq!(cli_verify(&[path], None), 0);
}

#[tokio::test]
async fn verify_names_an_edited_field_as_edited() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 10).await;
    let mut l = lines(&path);
    assert!(l[4].contains("\"status\":200"));
    l[4] = l[4].replace("\"status\":200", "\"status\":201");
    write_lines(&path, &l);
    let report = check(&path);
    assert_bad(&report, 5, 5, BadReason::Edited);
    assert_eq!(report.records, 4);
    assert_eq!(cli_verify(&[path], None), 1);
}

#[tokio::test]
async fn verify_names_a_deleted_line_as_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 10).await;
    let mut l = lines(&path);
    l.remove(3);
    write_lines(&path, &l);
    assert_bad(
        &check(&path),
        4,
        5,
        BadReason::Deleted {
            expected_seq: 4,
            found_seq: 5,
        },
    );
}

#[tokio::test]
async fn verify_names_a_deleted_first_line_as_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 4).await;
    let mut l = lines(&path);
    l.remove(0);
    write_lines(&path, &l);
    let report = check(&path);
    assert_bad(
        &report,
        1,
        2,
        BadReason::Deleted {
            expected_seq: 1,
            found_seq: 2,
        },
    );
    assert!(report.first_bad.unwrap().detail.contains("starts at seq 2"));
}

#[tokio::test]
async fn verify_names_an_inserted_copy_as_inserted() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 10).await;
    let mut l = lines(&path);
    let copy = l[1].clone();
    l.insert(6, copy);
    write_lines(&path, &l);
    let report = check(&path);
    assert_bad(&report, 7, 2, BadReason::Inserted);
    assert!(report.first_bad.unwrap().detail.contains(":2"));
}

#[tokio::test]
async fn verify_names_swapped_lines_as_reordered() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 10).await;
    let mut l = lines(&path);
    l.swap(2, 3);
    write_lines(&path, &l);
    assert_bad(&check(&path), 3, 4, BadReason::Reordered);
}

#[tokio::test]
async fn verify_names_a_whitespace_only_edit_as_edited() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 10).await;
    let mut l = lines(&path);
    l[5] = l[5].replacen(",\"seq\":", ", \"seq\":", 1);
    write_lines(&path, &l);
    assert_bad(&check(&path), 6, 6, BadReason::Edited);
}

#[tokio::test]
async fn verify_names_an_equivalent_escape_as_edited() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 3).await;
    let mut l = lines(&path);
    // Same parsed value ("POST"), different bytes: the raw-line comparison catches it.
    l[1] = l[1].replacen("\"method\":\"POST\"", "\"method\":\"\\u0050OST\"", 1);
    write_lines(&path, &l);
    assert_bad(&check(&path), 2, 2, BadReason::Edited);
}

#[tokio::test]
async fn verify_names_a_garbage_line_as_bad_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 5).await;
    let mut l = lines(&path);
    l[2] = "{not json".into();
    write_lines(&path, &l);
    let report = check(&path);
    let bad = report.first_bad.unwrap();
    assert_eq!((bad.line, bad.reason), (3, BadReason::BadJson));
}

#[tokio::test]
async fn an_unkeyed_rehash_after_an_edit_is_caught_by_the_keyed_chain() {
    let dir = tempfile::tempdir().unwrap();
    let key = Secret::new("s3cret");
    let path = log_with(keyed(dir.path(), "s3cret"), 6).await;
    // The attacker edits record 3 and recomputes its hash (and the rest) with plain SHA-256.
    let mut l = lines(&path);
    let mut prev = all_records(&path)[1].hash.clone();
    for line in l.iter_mut().skip(2) {
        let mut rec: AuditRecord = serde_json::from_str(line).unwrap();
        rec.status = 204;
        rec.prev_hash = prev.clone();
        rec.hash = String::new();
        let s = serde_json::to_string(&rec).unwrap();
        let canonical = format!("{}}}", s.strip_suffix(",\"hash\":\"\"}").unwrap());
        let digest = hex::encode(Sha256::digest(format!("{prev}\n{canonical}")));
        *line = format!(
            "{},\"hash\":\"{digest}\"}}",
            &canonical[..canonical.len() - 1]
        );
        prev = digest;
    }
    write_lines(&path, &l);
    assert_bad(
        &verify(std::slice::from_ref(&path), Some(&key)),
        3,
        3,
        BadReason::Edited,
    );
}

#[tokio::test]
async fn keyed_log_verifies_only_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(keyed(dir.path(), "right-key"), 5).await;
    let files = [path.clone()];

    let with_key = verify(&files, Some(&Secret::new("right-key")));
    assert!(with_key.is_ok() && with_key.records == 5, "{with_key:?}");
    assert_bad(&verify(&files, None), 1, 1, BadReason::KeyMismatch);
    assert_bad(
        &verify(&files, Some(&Secret::new("wrong-key"))),
        1,
        1,
        BadReason::KeyMismatch,
    );
    assert_eq!(cli_verify(&files, None), 1);
    assert_eq!(cli_verify(&files, Some(&Secret::new("right-key"))), 0);
}

#[tokio::test]
async fn keyed_log_with_its_key_still_names_an_edit() {
    let dir = tempfile::tempdir().unwrap();
    let key = Secret::new("right-key");
    let path = log_with(keyed(dir.path(), "right-key"), 5).await;
    let mut l = lines(&path);
    l[0] = l[0].replace("\"team\":\"agency\"", "\"team\":\"sourcing\"");
    write_lines(&path, &l);
    assert_bad(&verify(&[path], Some(&key)), 1, 1, BadReason::Edited);
}

#[tokio::test]
async fn unkeyed_log_checked_with_a_key_is_a_key_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 1).await;
    assert_bad(
        &verify(&[path], Some(&Secret::new("k"))),
        1,
        1,
        BadReason::KeyMismatch,
    );
}

#[tokio::test]
async fn verify_of_a_missing_file_is_an_error_not_ok() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jsonl");
    let report = check(&missing);
    assert_eq!(report.first_bad.unwrap().reason, BadReason::Unreadable);
    assert_eq!(cli_verify(&[missing], None), 2);
}

// ---- torn tails and reopening -----------------------------------------------------------------

#[tokio::test]
async fn torn_last_line_is_reported_as_a_torn_tail_not_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 5).await;
    let half = lines(&path)[4][..60].to_string();
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str(&half);
    fs::write(&path, text).unwrap();

    let report = check(&path);
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, 5);
    assert_eq!(report.torn_tail, Some((path.clone(), 6)));
    assert_eq!(cli_verify(&[path], None), 0);
}

#[tokio::test]
async fn torn_line_inside_an_older_rotated_file_is_tampering() {
    let dir = tempfile::tempdir().unwrap();
    let s = AuditSettings {
        rotate_bytes: 2048,
        ..settings(dir.path())
    };
    let base = log_with(s, 12).await;
    let first = chain_files(std::slice::from_ref(&base)).unwrap().remove(0);
    let mut text = fs::read_to_string(&first).unwrap();
    text.push_str("{\"ts\":\"2026");
    fs::write(&first, text).unwrap();
    let report = check(&base);
    assert_eq!(report.first_bad.unwrap().reason, BadReason::BadJson);
    assert_eq!(report.torn_tail, None);
}

#[tokio::test]
async fn reopening_continues_seq_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 5).await;
    let log = AuditLog::open(settings(dir.path())).unwrap();
    write_records(&log, 6..11).await;
    log.shutdown().await;
    let report = check(&path);
    assert!(report.is_ok() && report.records == 10, "{report:?}");
    let seqs: Vec<u64> = all_records(&path).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
}

#[tokio::test]
async fn reopening_a_keyed_log_continues_the_keyed_chain() {
    let dir = tempfile::tempdir().unwrap();
    let key = Secret::new("k");
    log_with(keyed(dir.path(), "k"), 3).await;
    let path = log_with(keyed(dir.path(), "k"), 3).await;
    let report = verify(&[path], Some(&key));
    assert!(report.is_ok() && report.records == 6, "{report:?}");
}

#[tokio::test]
async fn reopening_after_a_torn_tail_moves_it_aside_and_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 5).await;
    let half = lines(&path)[4][..70].to_string();
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str(&half);
    fs::write(&path, text).unwrap();

    let log = AuditLog::open(settings(dir.path())).unwrap();
    write_records(&log, 6..9).await;
    log.shutdown().await;

    let report = check(&path);
    assert!(report.is_ok() && report.torn_tail.is_none(), "{report:?}");
    assert_eq!(report.records, 8);
    let aside: Vec<PathBuf> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".torn-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(fs::read_to_string(&aside[0]).unwrap(), half);
}

#[tokio::test]
async fn reopening_after_a_lost_final_newline_keeps_the_complete_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 3).await;
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, text.trim_end_matches('\n')).unwrap();
    let report = check(&path);
    assert!(report.is_ok() && report.records == 3 && report.torn_tail.is_none());

    let log = AuditLog::open(settings(dir.path())).unwrap();
    write_records(&log, 4..5).await;
    log.shutdown().await;
    let report = check(&path);
    assert!(report.is_ok() && report.records == 4, "{report:?}");
}

#[tokio::test]
async fn reopening_with_an_empty_current_file_continues_from_the_newest_rotated_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 4).await;
    fs::rename(&path, rotated_file_name(&path, 1)).unwrap();
    fs::write(&path, "").unwrap();
    let log = AuditLog::open(settings(dir.path())).unwrap();
    write_records(&log, 5..7).await;
    log.shutdown().await;
    let report = check(&path);
    assert!(report.is_ok() && report.records == 6, "{report:?}");
    assert_eq!(report.files.len(), 2);
}

#[tokio::test]
async fn reopening_after_a_record_larger_than_the_tail_window_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let path = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    write_records(&log, 1..3).await;
    log.shutdown().await;
    // Today's writer bounds a line (MAX_RECORD_BYTES); a file from an older version may end in
    // a much longer one, so it is appended here by hand, chained like the writer would.
    let prev: AuditRecord = serde_json::from_str(lines(&path).last().unwrap()).unwrap();
    let mut big = AuditRecord {
        external_ids: (0..20_000).map(|i| format!("external-{i:08}")).collect(),
        seq: 3,
        prev_hash: prev.hash.clone(),
        ts: prev.ts.clone(),
        ..record(3)
    };
    big.duration_ms = 1.5;
    big.upstream_duration_ms = Some(1.0);
    let text = serde_json::to_string(&big).unwrap();
    let canon = format!("{}}}", text.strip_suffix(",\"hash\":\"\"}").unwrap());
    let hash = hex::encode(Sha256::digest(format!("{}\n{canon}", prev.hash)));
    let line = format!("{},\"hash\":\"{hash}\"}}\n", &canon[..canon.len() - 1]);
    let mut f = fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut f, line.as_bytes()).unwrap();
    drop(f);
    assert!(fs::metadata(&path).unwrap().len() > 256 * 1024);
    let log = AuditLog::open(settings(dir.path())).unwrap();
    log.shutdown().await;
    let log = AuditLog::open(settings(dir.path())).unwrap();
    write_records(&log, 4..6).await;
    log.shutdown().await;
    let report = check(&path);
    assert!(report.is_ok() && report.records == 5, "{report:?}");
}

#[tokio::test]
async fn verify_given_a_missing_current_file_still_finds_its_rotated_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 4).await;
    fs::rename(&path, rotated_file_name(&path, 1)).unwrap();
    let report = check(&path);
    assert!(report.is_ok() && report.records == 4, "{report:?}");
}

#[tokio::test]
async fn shutdown_from_two_handles_both_wait_for_the_flush() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let path = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    for i in 0..200 {
        // Queued (or, when the writer thread is quick, already written at the first poll).
        assert!(matches!(
            poll_once(log.write(record(i))),
            Poll::Pending | Poll::Ready(Ok(()))
        ));
    }
    let other = log.clone();
    let (a, b) = tokio::join!(log.shutdown(), other.shutdown());
    let ((), ()) = (a, b);
    assert_eq!(lines(&path).len(), 200);
}

#[tokio::test]
async fn opening_a_log_whose_last_line_is_garbage_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_with(settings(dir.path()), 2).await;
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str("garbage\n");
    fs::write(&path, text).unwrap();
    let err = AuditLog::open(settings(dir.path())).unwrap_err();
    assert!(matches!(err, AuditError::Corrupt { .. }), "{err:?}");
}

// ---- rotation ---------------------------------------------------------------------------------

#[tokio::test]
async fn rotation_keeps_one_chain_across_files_for_verify_and_query() {
    let dir = tempfile::tempdir().unwrap();
    let s = AuditSettings {
        rotate_bytes: 4096,
        ..settings(dir.path())
    };
    let base = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    // Concurrent writers so groups cross file boundaries.
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                log.write(record(t * 50 + i)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    log.shutdown().await;

    let files = chain_files(std::slice::from_ref(&base)).unwrap();
    assert!(files.len() > 5, "{files:?}");
    assert_eq!(files.last(), Some(&base));
    for f in &files {
        assert!(fs::metadata(f).unwrap().len() <= 4096, "{f:?}");
        if f != &base {
            let first: AuditRecord = serde_json::from_str(&lines(f)[0]).unwrap();
            assert_eq!(f, &rotated_file_name(&base, first.seq));
        }
    }

    let by_base = check(&base);
    assert!(by_base.is_ok() && by_base.records == 200, "{by_base:?}");
    let by_dir = check(base.parent().unwrap());
    assert!(by_dir.is_ok() && by_dir.records == 200, "{by_dir:?}");
    let mut shuffled = files.clone();
    shuffled.reverse();
    assert_eq!(verify(&shuffled, None).records, 200);

    assert_eq!(all_records(&base).len(), 200);
    let filter = QueryFilter {
        external_id: Some("ext-7".into()),
        ..QueryFilter::default()
    };
    assert_eq!(
        query(&[base.parent().unwrap().to_path_buf()], &filter)
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn deleting_a_whole_rotated_file_is_reported_as_deleted_records() {
    let dir = tempfile::tempdir().unwrap();
    let s = AuditSettings {
        rotate_bytes: 2048,
        ..settings(dir.path())
    };
    let base = log_with(s, 20).await;
    let files = chain_files(std::slice::from_ref(&base)).unwrap();
    assert!(files.len() >= 3);
    fs::remove_file(&files[1]).unwrap();
    let report = check(&base);
    assert!(
        matches!(
            report.first_bad.as_ref().unwrap().reason,
            BadReason::Deleted { .. }
        ),
        "{report:?}"
    );
    assert_eq!(report.first_bad.unwrap().file, files[2]);
}

#[tokio::test]
async fn reopening_a_rotated_log_continues_in_the_current_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = || AuditSettings {
        rotate_bytes: 2048,
        ..settings(dir.path())
    };
    log_with(s(), 9).await;
    let base = log_with(s(), 9).await;
    let report = check(&base);
    assert!(report.is_ok() && report.records == 18, "{report:?}");
}

// ---- durability and failures ------------------------------------------------------------------

#[tokio::test]
async fn fsync_always_write_resolves_only_after_the_record_is_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = AuditSettings {
        fsync: Fsync::Always,
        ..settings(dir.path())
    };
    let path = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    for i in 1..=20 {
        log.write(record(i)).await.unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(&format!("\"request_id\":\"req-{i:04}\"")),
            "record {i} not in the file"
        );
        assert_eq!(log.records_written(), i);
    }
    log.shutdown().await;
}

#[tokio::test]
async fn shutdown_writes_everything_queued_and_later_writes_fail() {
    let dir = tempfile::tempdir().unwrap();
    let s = AuditSettings {
        fsync: Fsync::Never,
        ..settings(dir.path())
    };
    let path = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    for i in 0..500 {
        // Queued (or, when the writer thread is quick, already written at the first poll).
        assert!(
            matches!(
                poll_once(log.write(record(i))),
                Poll::Pending | Poll::Ready(Ok(()))
            ),
            "record {i} refused"
        );
    }
    log.shutdown().await;
    assert_eq!(lines(&path).len(), 500);
    assert!(check(&path).is_ok());
    assert_eq!(log.write(record(0)).await, Err(AuditError::Closed));
    assert!(!log.healthy());
}

#[tokio::test]
async fn write_to_a_full_device_fails_and_marks_the_log_unhealthy() {
    let log = AuditLog::open(AuditSettings {
        on_error: OnError::Continue,
        ..AuditSettings::new("/dev/full")
    })
    .unwrap();
    assert!(log.healthy());
    assert_eq!(log.on_error(), OnError::Continue);
    let err = log.write(record(1)).await.unwrap_err();
    assert!(matches!(err, AuditError::Write(_)), "{err:?}");
    assert!(!log.healthy());
    assert_eq!(log.errors(), 1);
    assert_eq!(log.records_written(), 0);
    log.shutdown().await;
}

#[tokio::test]
async fn failed_rotation_fails_the_write_then_recovers_without_breaking_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let s = AuditSettings {
        rotate_bytes: 1500,
        fsync: Fsync::Always,
        ..settings(dir.path())
    };
    let base = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    log.write(record(1)).await.unwrap();
    // The rotated name is taken (a folder), so the rename must fail, even for root.
    let blocker = rotated_file_name(&base, 1);
    fs::create_dir(&blocker).unwrap();
    let mut failed = false;
    for i in 2..10 {
        if log.write(record(i)).await.is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "rotation never failed");
    assert!(!log.healthy());
    assert!(log.errors() >= 1);

    fs::remove_dir(&blocker).unwrap();
    log.write(record(100)).await.unwrap();
    assert!(log.healthy());
    log.shutdown().await;
    let report = check(&base);
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.records, log.records_written());
}

#[tokio::test]
async fn opening_in_a_read_only_directory_fails() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
    if fs::write(ro.join("probe"), "x").is_ok() {
        eprintln!("skipped: permissions are not enforced for this user (root)");
        return;
    }
    let err = AuditLog::open(AuditSettings::new(ro.join("audit.jsonl"))).unwrap_err();
    assert!(matches!(err, AuditError::Io { .. }), "{err:?}");
}

#[tokio::test]
async fn full_queue_refuses_a_write_at_once_and_reports_unhealthy() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audit.fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // A reader that never reads: once the pipe buffer is full the writer blocks in write(2).
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::File::open(fifo).unwrap())
    };
    let log = AuditLog::open(AuditSettings {
        queue_capacity: 4,
        ..AuditSettings::new(&fifo)
    })
    .unwrap();
    let mut reader = reader.join().unwrap();
    let big = || AuditRecord {
        external_ids: (0..200).map(|i| format!("external-{i:08}")).collect(),
        ..record(1)
    };

    // Write until refused. A first refusal can come from a writer that is merely slower than
    // this loop, so it is confirmed: the queue must still be full after a pause, which a writer
    // that is not blocked in write(2) (the pipe full, its reader never reading) would never allow.
    let accepted = std::cell::Cell::new(0u64);
    let refusals = std::cell::Cell::new(0u64);
    let offer = || match poll_once(log.write(big())) {
        // Queued, or already written before the first poll returned.
        Poll::Pending | Poll::Ready(Ok(())) => {
            accepted.set(accepted.get() + 1);
            None
        }
        Poll::Ready(Err(e)) => {
            refusals.set(refusals.get() + 1);
            Some(e)
        }
    };
    let mut confirmed = None;
    for _ in 0..1000 {
        let refused = loop {
            if let Some(e) = offer() {
                break e;
            }
            assert!(accepted.get() < 100_000, "the queue never filled");
            std::thread::yield_now();
        };
        assert_eq!(refused, AuditError::QueueFull(4));
        std::thread::sleep(std::time::Duration::from_millis(20));
        if offer().is_some() {
            confirmed = Some(refused);
            break;
        }
    }
    assert!(confirmed.is_some(), "the writer never stayed blocked");
    assert!(!log.healthy());
    // Every further write is refused at the first poll: the caller never waits on a full queue.
    for _ in 0..3 {
        assert!(matches!(offer(), Some(AuditError::QueueFull(_))));
    }
    assert!(refusals.get() >= 4);
    assert!(log.errors() >= refusals.get());
    let accepted = accepted.get();

    let drain = std::thread::spawn(move || {
        let mut all = Vec::new();
        reader.read_to_end(&mut all).unwrap();
        all
    });
    log.shutdown().await;
    let text = drain.join().unwrap();
    assert_eq!(
        text.iter().filter(|&&b| b == b'\n').count() as u64,
        log.records_written()
    );
    assert_eq!(log.records_written(), accepted);
}

const CRASH_ENV: &str = "AUDIT_CRASH_CHILD_DIR";

/// Not a test on its own: the child process of
/// `killed_writer_leaves_a_verifiable_log_with_every_acknowledged_record`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child process of the crash test"]
async fn crash_child_writes_until_killed() {
    let Ok(dir) = std::env::var(CRASH_ENV) else {
        return; // run on its own (`--include-ignored`): nothing to do
    };
    let dir = PathBuf::from(dir);
    let log = AuditLog::open(AuditSettings {
        fsync: Fsync::Always,
        rotate_bytes: 64 * 1024,
        ..settings(&dir)
    })
    .unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..1_000_000u64 {
                let id = format!("t{t}-{i}");
                log.write(AuditRecord {
                    request_id: id.clone(),
                    ..record(i)
                })
                .await
                .unwrap();
                println!("ACK {id}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[test]
fn killed_writer_leaves_a_verifiable_log_with_every_acknowledged_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_writes_until_killed",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let pump = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(id) = line.strip_prefix("ACK ")
                && tx.send(id.to_string()).is_err()
            {
                break;
            }
        }
    });
    let mut acked = HashSet::new();
    while acked.len() < 2000 {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(id) => {
                acked.insert(id);
            }
            Err(_) => break,
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    pump.join().unwrap();
    acked.extend(rx.try_iter());
    assert!(
        acked.len() >= 2000,
        "the child acknowledged only {}",
        acked.len()
    );

    let base = dir.path().join("audit").join("audit.jsonl");
    let report = check(&base);
    assert!(report.is_ok(), "{report:?}");
    let stored: HashSet<String> = all_records(&base)
        .into_iter()
        .map(|r| r.request_id)
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(lost.is_empty(), "acknowledged but not in the log: {lost:?}");

    // The gateway restarts on the same files and the chain goes on.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let log = AuditLog::open(settings(dir.path())).unwrap();
        write_records(&log, 0..3).await;
        log.shutdown().await;
    });
    let after = check(&base);
    assert!(after.is_ok() && after.torn_tail.is_none(), "{after:?}");
    assert_eq!(after.records, report.records + 3);
}

// ---- query and table --------------------------------------------------------------------------

async fn query_fixture(dir: &Path) -> PathBuf {
    let s = settings(dir);
    let path = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    for i in 1..=12u64 {
        log.write(AuditRecord {
            ts: format!("2026-03-01T10:{:02}:00.000Z", i),
            ..record(i)
        })
        .await
        .unwrap();
    }
    log.shutdown().await;
    path
}

fn ids(path: &Path, filter: QueryFilter) -> Vec<String> {
    query(&[path.to_path_buf()], &filter)
        .unwrap()
        .into_iter()
        .map(|r| r.request_id)
        .collect()
}

#[tokio::test]
async fn query_filters_on_each_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = query_fixture(dir.path()).await;
    let f = QueryFilter::default;
    assert_eq!(ids(&path, f()).len(), 12);
    let cases: Vec<(QueryFilter, Vec<u64>)> = vec![
        (
            QueryFilter {
                team: Some("sourcing".into()),
                ..f()
            },
            vec![2, 4, 6, 8, 10, 12],
        ),
        (
            QueryFilter {
                subject: Some("svc-1".into()),
                ..f()
            },
            vec![1, 5, 9],
        ),
        (
            QueryFilter {
                operation: Some("get_jobs".into()),
                ..f()
            },
            vec![1, 3, 5, 7, 9, 11],
        ),
        (
            QueryFilter {
                on_behalf_of: Some("user-2".into()),
                ..f()
            },
            vec![2, 7, 12],
        ),
        (
            QueryFilter {
                decision: Some(Decision::Denied),
                ..f()
            },
            vec![3, 6, 9, 12],
        ),
        (
            QueryFilter {
                code: Some("rate_limited".into()),
                ..f()
            },
            vec![3, 6, 9, 12],
        ),
        (
            QueryFilter {
                status: Some(200),
                ..f()
            },
            vec![1, 2, 4, 5, 7, 8, 10, 11],
        ),
        (
            QueryFilter {
                external_id: Some("ext-4".into()),
                ..f()
            },
            vec![4],
        ),
        (
            QueryFilter {
                candidate_id: Some(1011),
                ..f()
            },
            vec![11],
        ),
        (
            QueryFilter {
                team: Some("sourcing".into()),
                decision: Some(Decision::Denied),
                ..f()
            },
            vec![6, 12],
        ),
        (
            QueryFilter {
                team: Some("nobody".into()),
                ..f()
            },
            vec![],
        ),
    ];
    for (filter, want) in cases {
        let want: Vec<String> = want.iter().map(|i| format!("req-{i:04}")).collect();
        assert_eq!(ids(&path, filter.clone()), want, "{filter:?}");
    }
}

#[tokio::test]
async fn query_time_range_includes_since_and_excludes_until() {
    let dir = tempfile::tempdir().unwrap();
    let path = query_fixture(dir.path()).await;
    let at = |m: u32| parse_ts(&format!("2026-03-01T10:{m:02}:00Z")).unwrap();
    let got = ids(
        &path,
        QueryFilter {
            since: Some(at(3)),
            until: Some(at(6)),
            ..QueryFilter::default()
        },
    );
    assert_eq!(got, ["req-0003", "req-0004", "req-0005"]);
    let since_only = ids(
        &path,
        QueryFilter {
            since: Some(at(11)),
            ..QueryFilter::default()
        },
    );
    assert_eq!(since_only, ["req-0011", "req-0012"]);
}

#[test]
fn render_table_aligns_every_column_and_escapes_controls() {
    let mut recs: Vec<AuditRecord> = (1..=3).map(record).collect();
    recs[0].ts = "2026-03-01T10:00:00.000Z".into();
    recs[1].team = None;
    recs[1].subject = Some("a-much-longer-subject-name\u{1b}[2J".into());
    let table = render_table(&recs);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 4);
    let header = rows[0];
    let starts: Vec<usize> = [
        "ts",
        "team",
        "subject",
        "operation",
        "on_behalf_of",
        "decision",
        "status",
        "code",
        "request_id",
    ]
    .iter()
    .map(|c| header.find(c).unwrap())
    .collect();
    assert!(starts.windows(2).all(|w| w[0] < w[1]), "{header}");
    for row in &rows[1..] {
        let chars: Vec<char> = row.chars().collect();
        for &s in &starts[1..] {
            assert_eq!(chars[s - 1], ' ', "column at {s} not aligned in {row:?}");
            assert_ne!(chars[s], ' ', "column at {s} not aligned in {row:?}");
        }
        assert!(!row.ends_with(' '));
    }
    assert!(!table.contains('\u{1b}'));
    assert!(rows[2].contains("a-much-longer-subject-name\\u{1b}[2J"));
    assert!(rows[2].contains(" - "), "absent team shown as -");
}

#[test]
fn audit_log_handle_is_cheap_to_share_across_tasks() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    shareable::<AuditLog>();
}

#[tokio::test]
async fn oversized_record_is_shrunk_to_the_record_bound_and_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path());
    let path = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    let controls = "\u{1}".repeat(5000);
    let rec = AuditRecord {
        subject: Some(controls.clone()),
        on_behalf_of: Some(controls.clone()),
        method: controls.clone(),
        operation: Some(controls.clone()),
        code: Some(controls),
        external_ids: (0..5000).map(|i| format!("ext-\u{2}-{i:06}")).collect(),
        candidate_ids: (0..5000).map(|i| i64::MAX - i).collect(),
        validation: Some(json!(
            (0..2000)
                .map(|i| json!({"in": "body", "pointer": format!("/a/{i}"), "keyword": "type"}))
                .collect::<Vec<_>>()
        )),
        quota: Some(json!({"big": "q".repeat(5000)})),
        ..record(1)
    };
    log.write(rec).await.unwrap();
    log.write(record(2)).await.unwrap();
    log.shutdown().await;
    let raw = fs::read(&path).unwrap();
    let first = raw.split(|&b| b == b'\n').next().unwrap();
    assert!(
        first.len() < MAX_RECORD_BYTES,
        "{} bytes over the bound",
        first.len()
    );
    let v: serde_json::Value = serde_json::from_slice(first).unwrap();
    assert!(
        v["subject"]
            .as_str()
            .unwrap()
            .ends_with(PATH_TRUNCATED_MARKER)
    );
    assert_eq!(
        v["external_ids"].as_array().unwrap().last().unwrap(),
        PATH_TRUNCATED_MARKER
    );
    assert!(v["validation"].as_array().unwrap().last().unwrap()["truncated"].is_u64());
    let report = check(&path);
    assert!(report.is_ok() && report.records == 2, "{report:?}");
}

/// The writer thread runs under `SCHED_BATCH` (policy 3 in field 41 of its
/// `/proc/self/task/<tid>/stat`), so that queuing a record does not preempt the request threads.
#[cfg(target_os = "linux")]
#[test]
fn the_writer_thread_runs_under_sched_batch() {
    let dir = tempfile::tempdir().unwrap();
    let _log = AuditLog::open(settings(dir.path())).unwrap();
    // The thread names itself and sets its policy as it starts: look for a little while.
    let mut policies = Vec::new();
    for _ in 0..200 {
        policies = writer_policies();
        if !policies.is_empty() && policies.iter().all(|p| *p == 3) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!policies.is_empty(), "no audit-writer thread found");
    assert!(policies.iter().all(|p| *p == 3), "policies {policies:?}");
}

/// The scheduling policy of every thread named `audit-writer` in this process.
#[cfg(target_os = "linux")]
fn writer_policies() -> Vec<u32> {
    let mut policies = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        if comm.trim() != "audit-writer" {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the parenthesised name start at field 3.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        policies.push(after.split(' ').nth(41 - 3).unwrap().parse().unwrap());
    }
    policies
}

// ---- who writes a record ------------------------------------------------------------------

/// With `batch` and `never`, a record is appended by the caller's own thread when the writer is
/// free: the write is done (and on the file) when the first poll returns, with no hand-off to
/// the writer thread to wait for.
#[tokio::test]
async fn batch_and_never_records_are_written_by_the_caller_before_the_first_poll_returns() {
    for fsync in [Fsync::Batch, Fsync::Never] {
        let dir = tempfile::tempdir().unwrap();
        let s = AuditSettings {
            fsync,
            ..settings(dir.path())
        };
        let path = s.path.clone();
        let log = AuditLog::open(s).unwrap();
        for i in 0..50 {
            assert!(
                matches!(poll_once(log.write(record(i))), Poll::Ready(Ok(()))),
                "{fsync:?}: record {i} was not written at the first poll"
            );
            assert_eq!(lines(&path).len() as u64, i + 1, "{fsync:?}");
        }
        assert_eq!(log.records_written(), 50);
        assert_eq!(log.queue_depth(), 0);
        log.shutdown().await;
        let report = check(&path);
        assert!(report.is_ok() && report.records == 50, "{report:?}");
    }
}

/// Records that cannot be appended on the caller's thread (here: every one of them crosses the
/// rotation size, which the writer thread handles) still come out as one verified chain across
/// the rotated files, mixed with those that can.
#[tokio::test]
async fn records_at_the_rotation_size_go_through_the_writer_thread_and_the_chain_holds() {
    let dir = tempfile::tempdir().unwrap();
    let s = AuditSettings {
        // A new file takes a few records on the caller's thread; from then on each record could
        // cross the rotation size, so the writer thread takes it.
        rotate_bytes: MAX_RECORD_BYTES as u64 + 2048,
        ..settings(dir.path())
    };
    let path = s.path.clone();
    let log = AuditLog::open(s).unwrap();
    let mut at_first_poll = 0;
    for i in 0..120 {
        let mut write = pin!(log.write(record(i)));
        match poll_once(write.as_mut()) {
            Poll::Ready(r) => {
                r.unwrap();
                at_first_poll += 1;
            }
            Poll::Pending => write.await.unwrap(),
        }
    }
    log.shutdown().await;
    assert!(
        (1..120).contains(&at_first_poll),
        "{at_first_poll} of 120 written at the first poll: both ways should have been taken"
    );
    assert!(chain_files(std::slice::from_ref(&path)).unwrap().len() >= 3);
    let report = check(&path);
    assert!(report.is_ok() && report.records == 120, "{report:?}");
}
