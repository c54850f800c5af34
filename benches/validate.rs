#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Body validation of a typical candidate, against plain `serde_json::from_slice` as the baseline
//! measured in the same run: read the ratio, not the absolute time.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use greenhouse_gateway::spec::Spec;
use greenhouse_gateway::validate::{ValidationOptions, Validators, parse_json_strict};
use http::HeaderValue;
use serde_json::Value;

const TYPICAL_CANDIDATE: &str = include_str!("../tests/fixtures/validation/candidate.json");

fn candidate_body(c: &mut Criterion) {
    let spec = Spec::builtin().expect("seed spec");
    let validators = Validators::compile(&spec, ValidationOptions::default()).expect("compile");
    let op = spec.operation("createPartnerCandidate").expect("operation");
    let ct = HeaderValue::from_static("application/json");
    let body = TYPICAL_CANDIDATE.as_bytes();
    assert!(validators.check_body(op, Some(&ct), body).is_ok());

    let mut group = c.benchmark_group("candidate_body");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("baseline_serde_json_from_slice", |b| {
        b.iter(|| serde_json::from_slice::<Value>(black_box(body)).expect("json"))
    });
    group.bench_function("strict_parse_only", |b| {
        b.iter(|| parse_json_strict(black_box(body), 64).expect("json"))
    });
    group.bench_function("check_body", |b| {
        b.iter(|| {
            validators
                .check_body(op, Some(&ct), black_box(body))
                .expect("valid")
        })
    });
    group.finish();

    let mut group = c.benchmark_group("query");
    let list = spec.operation("listPartnerCandidates").expect("operation");
    group.bench_function("check_query_three_ids", |b| {
        b.iter(|| {
            validators
                .check_query(list, black_box(Some("candidate_ids=1,2,3")))
                .expect("valid")
        })
    });
    group.bench_function("check_query_none", |b| {
        b.iter(|| {
            validators
                .check_query(list, black_box(None))
                .expect("valid")
        })
    });
    group.finish();
}

criterion_group!(benches, candidate_body);
criterion_main!(benches);
