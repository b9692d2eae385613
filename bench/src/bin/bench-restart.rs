//! Restart time with and without checkpoints: `cargo run --release -p streamrec-bench --bin
//! bench-restart -- --help`.

use std::time::Duration;

use anyhow::Context;
use bench::broker::RunTopics;
use bench::restart::{Restart, Setup};
use bench::workload::{Workload, WorkloadConfig};
use clap::Parser;

/// Measures how long the dataflow takes to restart (launch until a new user's message is in
/// Redis) after a clean stop, with checkpoints on and off, on a topic that retains the
/// workload once and then --retention-factor times over (the same users, later timestamps).
/// Without checkpoints a restart replays everything the topic retains; with them it loads the
/// state and replays what came after the checkpoint. Also reports the shutdown checkpoint's
/// size and write time. Needs a broker and Redis (scripts/services.sh start) and the release
/// dataflow binary.
#[derive(Debug, Parser)]
#[command(name = "bench-restart", version)]
struct Args {
    #[command(flatten)]
    workload: WorkloadConfig,
    /// How many times the workload the larger topic retains (1: only the workload once, e.g.
    /// for the checkpoint's size at full scale).
    #[arg(long, default_value_t = 4)]
    retention_factor: usize,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKER", default_value = "localhost:9092")]
    brokers: String,
    /// Redis the dataflow writes to (a database of its own: it is emptied before each run).
    #[arg(
        long,
        env = "BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/9"
    )]
    redis: String,
    /// Dataflow workers (-w).
    #[arg(short = 'w', long, default_value_t = 2)]
    workers: usize,
    /// Partitions of the benchmark topics.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Measure only with checkpoints on (`on`), only off (`off`), or both.
    #[arg(long, default_value = "both", value_parser = ["on", "off", "both"])]
    modes: String,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "target/bench/restart.json")]
    json: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let binary = bench::e2e::dataflow_binary()?;
    let workload = Workload::generate(&args.workload);
    let run_id = format!("restart-{}", std::process::id());
    let dir = std::env::temp_dir().join(&run_id);
    std::fs::create_dir_all(&dir)?;
    let features = dir.join("item_features.csv");
    workload.write_features(&features)?;
    let setup = Setup {
        binary,
        args: [
            "--brokers",
            &args.brokers,
            "--redis",
            &args.redis,
            "--item-features",
            &features.display().to_string(),
            "--item-topic",
            &format!("{run_id}-no-items"),
            "-w",
            &args.workers.to_string(),
        ]
        .map(str::to_owned)
        .to_vec(),
        redis: args.redis.clone(),
        brokers: args.brokers.clone(),
        timeout: Duration::from_secs(args.timeout_secs),
    };
    let modes: &[bool] = match args.modes.as_str() {
        "on" => &[true],
        "off" => &[false],
        _ => &[false, true],
    };
    let target = bench::redis_write::RedisTarget {
        url: args.redis.clone(),
        cluster: false,
    };
    let mut topics = RunTopics::new(&args.brokers, false);
    let mut results: Vec<Restart> = Vec::new();
    let mut factors = vec![1, args.retention_factor.max(1)];
    factors.dedup();
    for factor in factors {
        let count = workload.messages.len() * factor;
        let messages: Vec<(String, Vec<u8>)> = (0..count).map(|i| workload.message_at(i)).collect();
        for &checkpoints in modes {
            let topic = format!(
                "{run_id}-{factor}x-{}",
                if checkpoints { "on" } else { "off" }
            );
            topics.create(&topic, args.partitions)?;
            bench::broker::preload(&args.brokers, &topic, &messages)
                .with_context(|| format!("preloading {topic}"))?;
            bench::redis_write::flush_db(&target)?;
            let result = setup
                .measure(&topic, count as u64, checkpoints, &dir.join(&topic))
                .with_context(|| format!("measuring {topic}"))?;
            eprintln!("{}", line(&result));
            results.push(result);
            topics.delete(&topic);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    println!("\n| retained messages | checkpoints | restart (s) | replayed | checkpoint (MB) | its users | read (ms) | write (ms) |");
    println!("|---|---|---|---|---|---|---|---|");
    for result in &results {
        println!("{}", row(result));
    }
    for &checkpoints in modes {
        let of = |retained: usize| {
            results
                .iter()
                .find(|r| r.checkpoints == checkpoints && r.retained == retained as u64)
                .map(|r| r.restart_seconds)
        };
        let base = workload.messages.len();
        if args.retention_factor <= 1 {
            continue;
        }
        if let (Some(one), Some(more)) = (of(base), of(base * args.retention_factor)) {
            println!(
                "checkpoints {}: {}x the retention, {:.2}x the restart time ({one:.2} s -> {more:.2} s)",
                if checkpoints { "on" } else { "off" },
                args.retention_factor,
                more / one
            );
        }
    }
    bench::write_json(&args.json, &results)?;
    eprintln!("wrote {}", args.json.display());
    Ok(())
}

fn line(result: &Restart) -> String {
    format!(
        "{} messages, checkpoints {}: restart {:.2} s, {} replayed",
        result.retained,
        if result.checkpoints { "on" } else { "off" },
        result.restart_seconds,
        result.replayed
    )
}

fn row(result: &Restart) -> String {
    let known = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
    format!(
        "| {} | {} | {:.2} | {} | {} | {} | {} | {} |",
        result.retained,
        if result.checkpoints { "on" } else { "off" },
        result.restart_seconds,
        result.replayed,
        result
            .checkpoint_bytes
            .map_or("-".to_owned(), |b| format!("{:.1}", b as f64 / 1e6)),
        result
            .checkpoint_users
            .map_or("-".to_owned(), |u| u.to_string()),
        known(result.checkpoint_read_ms),
        known(result.checkpoint_write_ms),
    )
}
