//! The dataflow binary: configuration, logging, signals, and the run until Ctrl-C or SIGTERM.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use dataflow::config::Config;
use tracing_subscriber::EnvFilter;

// Differential's batches and the per-record sums allocate and free many small buffers; glibc's
// allocator spent most of the dataflow's time consolidating its free lists (perf: ~70% in
// malloc/free), mimalloc's thread-local free lists do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let config = Config::from_env_and_args()?;
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, shutdown.clone())
            .context("installing signal handlers")?;
    }
    let summary = dataflow::run::run(config, shutdown).context("dataflow failed")?;
    if summary.epochs > 0 {
        println!(
            "{}",
            dataflow::stats::format_summary(&summary.totals, summary.epochs, summary.seconds)
        );
    }
    Ok(())
}
