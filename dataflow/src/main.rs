//! The dataflow binary: configuration, logging, signals, and the run until Ctrl-C or SIGTERM,
//! or until a newer run takes over (exit code 3, [`dataflow::run::TAKEN_OVER_EXIT_CODE`]).

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use dataflow::config::Config;
use dataflow::run::{RunError, TAKEN_OVER_EXIT_CODE};

// mimalloc for Rust's allocations and, through the crate's `override` feature, for C's malloc too,
// i.e. librdkafka's. glibc's allocator gave the memory of each consumed fetch response back to the
// kernel and took fresh pages for the next: most of the process's page faults were librdkafka
// copying responses into fresh pages, and system time, nearly all page faults (the run makes few
// syscalls), was a large share of its CPU time. With mimalloc underneath, faults and CPU go down
// (figures in docs/performance.md, "figures from code comments"). mimalloc's thread-local free
// lists also keep the per-epoch buffers cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<ExitCode> {
    // Configuration first: it names the log format, and its .env may set RUST_LOG. Its errors
    // (clap's, or a bad -p) are printed without the subscriber.
    let config = Config::from_env_and_args()?;
    settings::logging::init(config.shared.log_format);
    // No transparent huge pages: mimalloc asks for them (madvise) on its arenas, and each epoch
    // frees and reallocates buffers of tens of MB (the recommendations' pair and neighbour
    // updates above all), which mimalloc gives back to the kernel once they have been free for
    // its purge delay (1 s in the mimalloc 3 linked here; its header still says 10 ms). Each
    // first touch after that had the kernel zero a whole 2 MB page: `clear_page_erms` took
    // 13-23% of the samples of a profile with recommendations on. With 4 KB pages the dataflow
    // measured 1.5-1.6x faster with recommendations off and 1.1-1.3x with them on (200,000
    // messages; 1.07x off at full scale), with lower peak RSS (docs/performance.md,
    // "transparent huge pages"). This is what mimalloc's own MIMALLOC_ALLOW_THP=0 does, which
    // must be set before the process starts. A kernel without the call refuses it: huge pages
    // then stay as the system has them.
    if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(%error, "transparent huge pages left on");
    }
    // Secrets (the Redis URL's password, secret -X properties) are shown as *** by Debug.
    tracing::info!(config = ?config, "configuration");
    exit_on_any_panic();
    let shutdown = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, shutdown.clone())
            .context("installing signal handlers")?;
    }
    let summary = match dataflow::run::run(config, shutdown) {
        Ok(summary) => summary,
        // Not a failure of this run but its planned end: a deploy overlapping it replaced it.
        // The code tells a supervisor not to restart it.
        Err(error @ RunError::TakenOver(_)) => {
            let error = anyhow::Error::from(error);
            tracing::error!("{error:#}: exiting with code {TAKEN_OVER_EXIT_CODE}");
            return Ok(ExitCode::from(TAKEN_OVER_EXIT_CODE as u8));
        }
        Err(error) => return Err(error).context("dataflow failed"),
    };
    if summary.epochs > 0 {
        dataflow::stats::StatsOut::new(std::io::stdout()).line(&dataflow::stats::format_summary(
            &summary.totals,
            summary.epochs,
            summary.seconds,
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// A panic on any thread ends the process (exit code 101, after the usual message). Timely's
/// workers wait on one another: a worker that died of a panic would leave the others stepping
/// forever, a process that neither works nor exits. Ended, it is restarted by its supervisor
/// and rebuilds its state from the topics; no offset was committed past what Redis holds.
fn exit_on_any_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!("a thread panicked: the dataflow exits");
        std::process::exit(101);
    }));
}
