//! The bench binary: `cargo run --release -p streamrec-bench -- --help`.

use std::time::Duration;

use anyhow::Context;
use bench::e2e::{dataflow_binary, run_dataflow};
use bench::workload::{Workload, WorkloadConfig};
use clap::Parser;

/// Measures streamrec on a generated workload: preload a fresh topic, read it back raw, then run
/// the dataflow on it end to end. Needs a broker and Redis (scripts/services.sh start) and the
/// release dataflow binary (cargo build --release -p streamrec-dataflow).
#[derive(Debug, Parser)]
#[command(name = "bench", version, about, long_about = None)]
struct Args {
    #[command(flatten)]
    workload: WorkloadConfig,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKER", default_value = "localhost:9092")]
    brokers: String,
    /// Redis the dataflow writes to. Use a database of its own: the run writes ~100k keys.
    #[arg(
        long,
        env = "BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/9"
    )]
    redis: String,
    /// Dataflow workers (-w).
    #[arg(short = 'w', long, default_value_t = 2)]
    workers: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Epoch length given to the dataflow.
    #[arg(long, default_value_t = 100)]
    epoch_ms: u64,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "target/bench/e2e.json")]
    json: std::path::PathBuf,
    /// Give up on a phase after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binary = dataflow_binary()?;
    let started = std::time::Instant::now();
    let workload = Workload::generate(&args.workload);
    let total = workload.messages.len();
    eprintln!(
        "workload: {total} messages, {} distinct users, {} items, D={}, {} MB of values ({:.1} s)",
        workload.distinct_users,
        workload.items.len(),
        workload.dim,
        workload.value_bytes() / 1_000_000,
        started.elapsed().as_secs_f64()
    );
    let run_id = format!(
        "bench-{}-{}",
        std::process::id(),
        started.elapsed().as_nanos()
    );
    let topic = run_id.clone();
    let dir = std::env::temp_dir().join(&run_id);
    std::fs::create_dir_all(&dir)?;
    let features = dir.join("item_features.csv");
    workload.write_features(&features)?;

    bench::broker::create_topic(&args.brokers, &topic, args.partitions)
        .context("creating the topic")?;
    let preload = bench::broker::preload(&args.brokers, &topic, &workload.messages)?;
    eprintln!("preload: {:.0} msg/s", total as f64 / preload.as_secs_f64());
    let raw =
        bench::broker::consume_all(&args.brokers, &topic, args.partitions, args.workers, total)?;
    let raw_rate = total as f64 / raw.as_secs_f64();
    eprintln!(
        "raw consume ({} consumers): {raw_rate:.0} msg/s",
        args.workers
    );

    let dataflow_args: Vec<String> = [
        "--brokers",
        &args.brokers,
        "--topic",
        &topic,
        "--group",
        &format!("{run_id}-group"),
        "--redis",
        &args.redis,
        "--item-features",
        features.to_str().unwrap_or_default(),
        "--item-topic",
        &format!("{run_id}-no-items"),
        "-w",
        &args.workers.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let e2e = run_dataflow(
        &binary,
        &dataflow_args,
        args.epoch_ms,
        total as u64,
        Duration::from_secs(args.timeout_secs),
    )?;

    println!(
        "{:>8} {:>9} {:>9} {:>11} {:>10}",
        "epoch+ms", "messages", "changed", "latency_ms", "msg/s"
    );
    let first = e2e.epochs.first().map_or(0, |e| e.epoch);
    for epoch in &e2e.epochs {
        println!(
            "{:>8} {:>9} {:>9} {:>11} {:>10.0}",
            epoch.epoch - first,
            epoch.messages,
            epoch.changed,
            epoch.latency_ms,
            epoch.messages as f64 * 1000.0 / args.epoch_ms as f64
        );
    }
    let changed: u64 = e2e.epochs.iter().map(|e| e.changed).sum();
    println!(
        "end to end: {} messages in {:.2} s = {:.0} msg/s with -w {} ({changed} profile writes); \
         raw consume {raw_rate:.0} msg/s; e2e/raw = {:.2}",
        e2e.messages,
        e2e.seconds,
        e2e.rate(),
        args.workers,
        e2e.rate() / raw_rate
    );
    if let Some(parent) = args.json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let report = serde_json::json!({
        "workload": {"messages": total, "distinct_users": workload.distinct_users, "items": workload.items.len(), "dim": workload.dim, "history": args.workload.history},
        "workers": args.workers,
        "epoch_ms": args.epoch_ms,
        "raw_consume_msgs_per_s": raw_rate,
        "preload_msgs_per_s": total as f64 / preload.as_secs_f64(),
        "e2e_msgs_per_s": e2e.rate(),
        "e2e_over_raw": e2e.rate() / raw_rate,
        "e2e": e2e,
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}
