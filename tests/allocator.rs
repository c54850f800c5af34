//! Memory freed by a burst goes back to the system while the process is idle, with the
//! allocator the gateway's binary uses (mimalloc, declared here as in `src/main.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// This process's anonymous (heap) memory, in KiB.
fn anonymous_kib() -> u64 {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").expect("smaps_rollup");
    rollup
        .lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("an Anonymous line")
}

#[test]
fn memory_freed_by_a_burst_is_given_back_within_seconds_of_going_idle() {
    // The option number the gateway sets is mimalloc's purge delay: before it is set, it reads
    // mimalloc 3's default for that option, 1000 ms, which no other option of mimalloc 3 has.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        assert_eq!(
            greenhouse_gateway::memory::purge_delay_ms(),
            1000,
            "the option read is not mimalloc's purge delay (default 1000 ms)"
        );
    }
    greenhouse_gateway::memory::set_purge_delay();
    assert_eq!(
        greenhouse_gateway::memory::purge_delay_ms(),
        greenhouse_gateway::memory::PURGE_DELAY.as_millis() as std::ffi::c_long,
        "mimalloc's purge delay was not set"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .unwrap();
    runtime.spawn(greenhouse_gateway::memory::give_back_freed_memory());
    std::thread::sleep(Duration::from_millis(100));
    let before = anonymous_kib();
    // About 76 MiB in pieces of 4, 8 and 16 KiB (sizes a request's buffers come in), each written to.
    let burst: Vec<Vec<u8>> = (0..8192).map(|i| vec![1u8; 4096 << (i % 3)]).collect();
    let during = anonymous_kib();
    assert!(
        during >= before + 48 * 1024,
        "the burst should have made at least 48 MiB resident: {before} KiB before, {during} KiB with it"
    );
    drop(burst);
    // Due after the purge delay, given back at the next tick; nothing else allocates in this
    // process meanwhile, so without the ticks it would stay.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = anonymous_kib();
        if now < before + 8 * 1024 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after the burst was freed {now} KiB are still resident ({before} KiB before it)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
