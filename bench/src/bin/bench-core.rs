//! The core benchmark: `cargo run --release -p streamrec-bench --bin bench-core -- --help`.

use std::time::Instant;

use anyhow::Context;
use bench::dataflow_core::{EpochConfig, ScalingConfig};
use bench::workload::{Workload, WorkloadConfig};
use clap::{Parser, ValueEnum};

// The allocator the dataflow binary runs with, so that the core is measured as it runs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// The workload's throughput per worker count.
    Scaling,
    /// One epoch of a few changed users, with a small and a large state.
    Incremental,
    /// One item-feature update held by K users, for each K.
    ItemUpdate,
}

/// Measures the dataflow core alone, from memory: no broker, no Redis. Runs each MODE given (all
/// by default), prints a table per mode and writes every figure as JSON.
#[derive(Debug, Parser)]
#[command(name = "bench-core", version)]
struct Args {
    /// Modes to run, in this order.
    #[arg(value_enum, default_values_t = [Mode::Scaling, Mode::Incremental, Mode::ItemUpdate])]
    modes: Vec<Mode>,
    #[command(flatten)]
    workload: WorkloadConfig,
    /// Recency decay of the interest vector.
    #[arg(long, default_value_t = profile::DEFAULT_DECAY)]
    decay: f64,
    /// Items of a history the dataflow keeps in the scaling mode (its --max-history).
    #[arg(long, default_value_t = profile::DEFAULT_MAX_HISTORY)]
    max_history: usize,
    /// scaling: messages per epoch.
    #[arg(long, default_value_t = 10_000)]
    epoch_messages: usize,
    /// scaling: the worker counts to compare, the first being the baseline of the speedup.
    #[arg(short = 'w', long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// scaling: runs per worker count (alternating counts); the median rate is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// incremental and item-update: worker threads.
    #[arg(long, default_value_t = 1)]
    epoch_workers: usize,
    /// incremental and item-update: items per history. Smaller than the workload's 50 so that a
    /// million users fit in memory with room to spare (the peak RSS of such a run:
    /// docs/performance.md).
    #[arg(long, default_value_t = 20)]
    epoch_history: usize,
    /// incremental and item-update: timed epochs per measurement; the median is reported.
    #[arg(long, default_value_t = 7)]
    repetitions: usize,
    /// incremental and item-update: messages per epoch while the state is loaded (untimed).
    #[arg(long, default_value_t = 100_000)]
    preload_epoch: usize,
    /// incremental: users in state, smallest first; the ratio is largest over smallest.
    #[arg(long, value_delimiter = ',', default_value = "10000,1000000")]
    states: Vec<usize>,
    /// incremental: distinct existing users with a new message in the timed epoch.
    #[arg(long, default_value_t = 1_000)]
    changed_users: usize,
    /// item-update: users in state.
    #[arg(long, default_value_t = 200_000)]
    item_users: usize,
    /// item-update: the holder counts K; each gets an item held by exactly its first K users.
    #[arg(long, value_delimiter = ',', default_value = "10,1000,100000")]
    holders: Vec<usize>,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "target/bench/core.json")]
    json: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let epoch = EpochConfig {
        workers: args.epoch_workers,
        history: args.epoch_history,
        repetitions: args.repetitions,
        preload_epoch: args.preload_epoch,
        decay: args.decay,
    };
    let mut report = serde_json::Map::new();
    for mode in &args.modes {
        let started = Instant::now();
        match mode {
            Mode::Scaling => {
                let workload = Workload::generate(&args.workload);
                let config = ScalingConfig {
                    epoch_messages: args.epoch_messages,
                    workers: args.workers.clone(),
                    runs: args.runs,
                    max_history: args.max_history,
                    decay: args.decay,
                };
                let scaling =
                    bench::dataflow_core::scaling(&workload, &config).context("scaling")?;
                println!("{}", scaling.table());
                report.insert("scaling".into(), serde_json::to_value(scaling)?);
            }
            Mode::Incremental => {
                let incremental = bench::dataflow_core::incremental(
                    &args.workload,
                    &args.states,
                    args.changed_users,
                    &epoch,
                )
                .context("incremental")?;
                println!("{}", incremental.table());
                report.insert("incremental".into(), serde_json::to_value(incremental)?);
            }
            Mode::ItemUpdate => {
                let item_update = bench::dataflow_core::item_update(
                    &args.workload,
                    args.item_users,
                    &args.holders,
                    &epoch,
                )
                .context("item-update")?;
                println!("{}", item_update.table());
                report.insert("item_update".into(), serde_json::to_value(item_update)?);
            }
        }
        eprintln!(
            "({mode:?} took {:.1} s in all)",
            started.elapsed().as_secs_f64()
        );
    }
    report.insert(
        "workload".into(),
        serde_json::json!({
            "messages": args.workload.messages, "users": args.workload.users,
            "items": args.workload.items, "dim": args.workload.dim,
            "history": args.workload.history, "seed": args.workload.seed,
        }),
    );
    bench::write_json(&args.json, &report)?;
    Ok(())
}
