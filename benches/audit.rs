//! Audit records per second with each fsync mode, against serializing and hashing a record
//! without writing it (the baseline, in the same run). Each iteration submits 256 records from
//! concurrent tasks, so the writer's group commit is exercised; one more case shows a single
//! caller waiting for each fsync in turn.
//!
//! `cargo bench --bench audit`; compare the `elem/s` of each case with `serialize_and_hash`.

use std::fmt::Debug;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use greenhouse_gateway::audit::{AuditLog, AuditRecord, AuditSettings, Decision, Fsync};
use sha2::{Digest, Sha256};

const BATCH: u64 = 256;

fn ok<T, E: Debug>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e:?}"),
    }
}

/// A typical forwarded request.
fn record(i: u64) -> AuditRecord {
    AuditRecord {
        request_id: format!("01JBENCH{i:018}"),
        team: Some("sourcing".into()),
        subject: Some("svc-sourcing-bot".into()),
        issuer: Some("https://idp.internal.example".into()),
        client_addr: Some("10.1.2.3".into()),
        method: "POST".into(),
        operation: Some("post_candidates".into()),
        path: "/v1/partner/candidates".into(),
        on_behalf_of: Some("recruiter-17".into()),
        credential: Some("default".into()),
        decision: Decision::Forwarded,
        status: 201,
        upstream_status: Some(201),
        duration_ms: 48.213,
        upstream_duration_ms: Some(41.907),
        request_bytes: 1843,
        response_bytes: 212,
        body_sha256: Some(hex::encode(Sha256::digest(i.to_le_bytes()))),
        external_ids: vec![format!("ats-{i}")],
        candidate_ids: vec![i64::try_from(i).unwrap_or(0) + 1_000_000],
        quota: Some(serde_json::json!({"daily_remaining": 4200, "rate_wait_ms": 0})),
        ..AuditRecord::default()
    }
}

fn bench(c: &mut Criterion) {
    let rt = ok(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build(),
        "runtime",
    );
    let mut group = c.benchmark_group("audit");
    group.throughput(Throughput::Elements(BATCH));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));

    group.bench_function("serialize_and_hash", |b| {
        b.iter(|| {
            for i in 0..BATCH {
                let line = ok(serde_json::to_vec(&record(i)), "serialize");
                black_box(Sha256::digest(&line));
            }
        })
    });

    for (name, fsync) in [
        ("write_fsync_never", Fsync::Never),
        ("write_fsync_batch", Fsync::Batch),
        ("write_fsync_always", Fsync::Always),
    ] {
        let dir = ok(tempfile::tempdir(), "tempdir");
        let log = ok(
            AuditLog::open(AuditSettings {
                fsync,
                rotate_bytes: 64 * 1024 * 1024,
                ..AuditSettings::new(dir.path().join("audit.jsonl"))
            }),
            "open",
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut tasks = tokio::task::JoinSet::new();
                    for i in 0..BATCH {
                        let log = log.clone();
                        tasks.spawn(async move { log.write(record(i)).await });
                    }
                    while let Some(done) = tasks.join_next().await {
                        ok(ok(done, "task"), "write");
                    }
                })
            })
        });
        rt.block_on(log.shutdown());
    }

    // One caller at a time: every record pays its own fsync.
    group.throughput(Throughput::Elements(16));
    let dir = ok(tempfile::tempdir(), "tempdir");
    let log = ok(
        AuditLog::open(AuditSettings {
            fsync: Fsync::Always,
            ..AuditSettings::new(dir.path().join("audit.jsonl"))
        }),
        "open",
    );
    group.bench_function("write_fsync_always_one_caller", |b| {
        b.iter(|| {
            rt.block_on(async {
                for i in 0..16 {
                    ok(log.write(record(i)).await, "write");
                }
            })
        })
    });
    rt.block_on(log.shutdown());
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
