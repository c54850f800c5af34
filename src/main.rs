use clap::Parser;

/// mimalloc, chosen by measurement (README, "Performance"); the `system-allocator` feature leaves
/// the system's for heap profilers.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // No transparent huge pages for this process, before the runtime and its threads allocate:
    // mimalloc asks for them on its arena, where they kept about 10 MiB more resident at idle
    // (2 MiB at a time) for no measured gain in speed (README, "Performance"). Best effort: a
    // kernel without the call simply keeps its default.
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    // Freed memory goes back to the system a tenth of a second after it was freed (see
    // `greenhouse_gateway::memory`), before any other thread exists.
    #[cfg(not(feature = "system-allocator"))]
    greenhouse_gateway::memory::set_purge_delay();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // Memory freed by a burst of requests goes back to the system once the gateway is idle.
    #[cfg(not(feature = "system-allocator"))]
    runtime.spawn(greenhouse_gateway::memory::give_back_freed_memory());
    let code = runtime.block_on(async {
        let cli = greenhouse_gateway::cli::Cli::parse();
        greenhouse_gateway::cli::init_tracing(cli.log_json);
        greenhouse_gateway::cli::run(cli).await
    });
    greenhouse_gateway::telemetry::log_writer::flush();
    std::process::exit(code);
}
