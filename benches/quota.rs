//! Quota decision cost: memory `admit` against an empty async fn, Redis `admit` against a Redis
//! PING on the same server, in the same run (report ratios, not absolute times).
//!
//! The Redis part uses its own `redis-server` on a free port when it is on PATH, else
//! `REDIS_URL`; without either it is skipped with a message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use greenhouse_gateway::quota::{
    Backend, Limit, OnBackendError, OpLimits, QuotaSettings, Quotas, TeamLimits,
};
use greenhouse_gateway::values::Rate;

/// Every limit configured, none ever reached during a run.
fn teams() -> BTreeMap<String, TeamLimits> {
    let huge = Limit {
        rate: Some(Rate {
            count: u32::MAX,
            per: Duration::from_secs(1),
        }),
        burst: Some(u32::MAX),
    };
    let mut t = TeamLimits {
        limit: huge,
        concurrency: Some(1_000_000),
        daily: None,
        operations: BTreeMap::new(),
    };
    t.operations.insert(
        "createPartnerCandidate".into(),
        OpLimits {
            limit: huge,
            daily: Some(u64::from(u32::MAX)),
        },
    );
    BTreeMap::from([("sourcing".to_string(), t)])
}

async fn empty() -> u64 {
    black_box(1)
}

struct OwnRedis(Child);

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Redis URL and, when we started it, the server (stopped on drop).
fn redis() -> Option<(String, Option<OwnRedis>)> {
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| d.join("redis-server").is_file())
    });
    if on_path {
        let port = TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut lines = BufReader::new(child.stdout.take()?).lines();
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.contains("Ready to accept connections"));
        let server = OwnRedis(child);
        if !ready {
            return None;
        }
        std::thread::spawn(move || lines.for_each(drop));
        return Some((format!("redis://127.0.0.1:{port}/"), Some(server)));
    }
    std::env::var("REDIS_URL").ok().map(|url| (url, None))
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("quota");

    group.bench_function("baseline_empty_async_fn", |b| {
        b.iter(|| rt.block_on(empty()))
    });
    let memory = rt.block_on(Quotas::new(QuotaSettings {
        teams: teams(),
        ..QuotaSettings::default()
    }));
    group.bench_function("memory_admit", |b| {
        b.iter(|| {
            rt.block_on(async {
                let a = memory.admit("sourcing", "createPartnerCandidate").await;
                black_box(a.is_ok())
            })
        })
    });

    match redis() {
        None => eprintln!(
            "quota bench: skipping the Redis part (no redis-server on PATH and no REDIS_URL)"
        ),
        Some((url, _server)) => {
            let mut conn = rt.block_on(async {
                redis::Client::open(url.as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap()
            });
            group.bench_function("baseline_redis_ping", |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
                        black_box(pong)
                    })
                })
            });
            let quotas = rt.block_on(Quotas::new(QuotaSettings {
                backend: Backend::Redis {
                    url: url.clone(),
                    timeout: Duration::from_secs(2),
                    key_prefix: format!("ghgwbench:{:08x}", rand::random::<u32>()),
                    ca_pem: None,
                },
                on_backend_error: OnBackendError::Deny,
                teams: teams(),
                upstream: None,
            }));
            assert!(quotas.not_ready().is_empty(), "{:?}", quotas.not_ready());
            group.bench_function("redis_admit", |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let a = quotas.admit("sourcing", "createPartnerCandidate").await;
                        assert!(a.as_ref().is_ok_and(|a| a.source() == "redis"));
                        // give the lease back as a finished request does: dropped, it rides on
                        // the next admission's call
                        drop(a);
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
