use clap::Parser;

/// mimalloc, chosen by measurement (README, "Performance").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = greenhouse_gateway::cli::Cli::parse();
    greenhouse_gateway::cli::init_tracing(cli.log_json);
    let code = greenhouse_gateway::cli::run(cli).await;
    greenhouse_gateway::telemetry::log_writer::flush();
    std::process::exit(code);
}
