//! The bench binary: `cargo run --release -p streamrec-bench -- --help`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use bench::chart::write_chart;
use bench::cpu;
use bench::e2e::{dataflow_binary, run_dataflow, EndToEnd};
use bench::paced::WARMUP_MS;
use bench::pairs::{PairFigures, PairsReport};
use bench::redis_write::{
    flush_db, ping, set_phase, sink_phase, Profiles, RedisPhase, RedisTarget,
};
use bench::summary::Summary;
use bench::workload::{Workload, WorkloadConfig};
use clap::Parser;

// The allocator the dataflow binary runs with, so that --in-memory measures the core as it runs
// there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Measures streamrec on a generated workload: preload a fresh topic, read it back raw, run the
/// dataflow on it end to end, then write the same number of profiles to Redis as plain pipelined
/// SETs and through the sink's Lua script; then search the maximum rate it sustains fed live, and
/// measure its epoch latency fed live at half of that. Prints a per-epoch table and a summary
/// with the ratios, and writes them as JSON and an SVG chart. Needs a broker and Redis
/// (scripts/services.sh start) and the release dataflow binary (cargo build --release -p
/// streamrec-dataflow).
#[derive(Debug, Parser)]
#[command(name = "bench", version)]
struct Args {
    #[command(flatten)]
    workload: WorkloadConfig,
    /// Read the workload from this file instead of generating it: one profile message a line,
    /// each the JSON value the topic gets (semantics §2), keyed by its user_id. Needs
    /// --features-file; the generator's flags are then ignored.
    #[arg(long, requires = "features_file")]
    messages_file: Option<std::path::PathBuf>,
    /// The item features of a --messages-file workload, as the dataflow's CSV (semantics §3):
    /// `item_id,f0,...,f{D-1}`.
    #[arg(long, requires = "messages_file")]
    features_file: Option<std::path::PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKER", default_value = "localhost:9092")]
    brokers: String,
    /// Redis the dataflow and the Redis phases write to. Use a database of its own: its
    /// database (/9 by default) is emptied with FLUSHDB before the end-to-end run and before
    /// each Redis phase, so that every run starts from the same state, and the run leaves ~100k
    /// keys in it.
    #[arg(
        long,
        env = "BENCH_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/9"
    )]
    redis: String,
    /// --redis is a Redis Cluster's seed list (as the dataflow's --redis-cluster): the dataflow
    /// runs with --redis-cluster, every master is emptied before each phase, the raw SET phase
    /// uses cluster pipelines, and Redis's CPU is not sampled.
    #[arg(long, env = "BENCH_REDIS_CLUSTER")]
    redis_cluster: bool,
    /// Dataflow workers (-w).
    #[arg(short = 'w', long, default_value_t = 2)]
    workers: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Epoch length given to the dataflow.
    #[arg(long, default_value_t = 100)]
    epoch_ms: u64,
    /// Where to write the figures as JSON: workload, every phase's rate, the ratios and the
    /// per-epoch statistics.
    #[arg(long, default_value = "target/bench/e2e.json")]
    json: std::path::PathBuf,
    /// Where to write the SVG chart of messages/s and epoch latency per epoch. The latency
    /// phase's chart goes beside it, with `-live` added to the name.
    #[arg(long, default_value = "target/bench/e2e.svg")]
    chart: std::path::PathBuf,
    /// The latency phase produces at this fraction of the maximum sustained rate (see
    /// --sustained-secs), while a fresh dataflow reads a fresh topic live, and reports the
    /// p50/p99 epoch latency (target: p99 at most twice --epoch-ms at half the maximum sustained
    /// rate). 0 skips the phase, and the search for that rate with it.
    #[arg(long, default_value_t = 0.5)]
    latency_fraction: f64,
    /// Produce the latency phase at this many messages per second instead of a fraction of
    /// the maximum sustained rate, to compare runs at one rate (no search is made).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// The maximum sustained rate is searched by bisection between 0 and the end-to-end rate,
    /// with live runs (a fresh dataflow on a fresh topic, fed at a fixed rate) that produce for
    /// this many seconds each; a run keeps up if it stores the messages within their schedule
    /// over 0.97, plus two epochs for the last one to close and be written. 0
    /// skips the search: the latency phase then takes its fraction of the preloaded end-to-end
    /// rate, which is more than the machine sustains live (the producer and the broker's intake
    /// share its cores).
    #[arg(long, default_value_t = 15)]
    sustained_secs: u64,
    /// Live runs of that search. Each halves the interval, so 4 place the rate within 1/16 of
    /// the end-to-end rate.
    #[arg(long, default_value_t = 4)]
    sustained_steps: usize,
    /// The upper end of that search, in msg/s, instead of the end-to-end rate just measured
    /// (which no live run exceeds), to search a narrower range.
    #[arg(long)]
    sustained_max: Option<f64>,
    /// How long the latency phase produces, in seconds (past the workload's end its messages
    /// come round again, with later timestamps).
    #[arg(long, default_value_t = 20)]
    latency_secs: u64,
    /// Measure the dataflow core alone instead, from the generated workload in memory (no broker,
    /// no Redis): its rate with -w 1 and with -w N, and the speedup. `bench-core` has this and
    /// the incremental-cost and item-update modes, with more flags.
    #[arg(long)]
    in_memory: bool,
    /// The latency phase's producer batches messages for up to this many ms (librdkafka's
    /// linger.ms). Batches of 1 ms cost tansu a request each and made it the bottleneck.
    #[arg(long, default_value_t = 20)]
    latency_linger_ms: u64,
    /// Give up on a phase after this many seconds. A phase whose dataflow reads nothing for
    /// 60 s while messages are still expected (a broker gone) is given up on before that.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Instead of the phases above: preload once, then run the dataflow end to end 2·N times
    /// on that topic, `--recommendations off` then `on`, N pairs back to back, each run from an
    /// empty database with a consumer group of its own; print each pair's rates and their
    /// ratio, and the median ratio (the target: at least 0.5). Pairs, because on a shared
    /// machine a run's rate moves more from one minute to the next than a change does.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100))]
    recommendations_pairs: Option<u64>,
    /// Leave the run's topics on the broker. By default they are deleted at the end: a broker
    /// that keeps topics in memory would otherwise hold every run's messages.
    #[arg(long)]
    keep_topics: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.in_memory {
        return in_memory(&args);
    }
    let binary = dataflow_binary()?;
    // Before generating and preloading the workload, so that a wrong URL fails at once.
    let redis = RedisTarget {
        url: args.redis.clone(),
        cluster: args.redis_cluster,
    };
    ping(&redis)?;
    let started = std::time::Instant::now();
    let workload = workload(&args)?;
    eprintln!(
        "workload: {} messages, {} distinct users, {} items, D={}, {} MB of values ({:.1} s){}",
        workload.messages.len(),
        workload.distinct_users,
        workload.items.len(),
        workload.dim,
        workload.value_bytes() / 1_000_000,
        started.elapsed().as_secs_f64(),
        workload
            .slide
            .map_or_else(String::new, |slide| format!(", histories slide by {slide}"))
    );
    let run_id = format!(
        "bench-{}-{}",
        std::process::id(),
        started.elapsed().as_nanos()
    );
    let dir = std::env::temp_dir().join(&run_id);
    std::fs::create_dir_all(&dir)?;
    let features = dir.join("item_features.csv");
    workload.write_features(&features)?;
    let runs = Runs {
        args: &args,
        binary: &binary,
        workload: &workload,
        run_id: &run_id,
        features: &features,
        // Redis's CPU is read from /proc where it runs on this machine (one server only).
        redis_pid: (!args.redis_cluster)
            .then(|| cpu::local_redis_pid(&args.redis))
            .flatten(),
        redis,
    };
    let mut topics = bench::broker::RunTopics::new(&args.brokers, args.keep_topics);

    let preload_rate = preload(&runs, &mut topics)?;
    if let Some(pairs) = args.recommendations_pairs {
        let report = recommendation_pairs(&runs, pairs)?;
        std::fs::remove_dir_all(&dir).ok();
        return report_pairs(&runs, &report);
    }
    let raw_rate = raw_consume(&runs)?;
    let e2e = end_to_end(&runs)?;
    let (set, lua) = redis_phases(&runs, e2e.profile_writes())?;
    let sustained = sustained_rate(&runs, &mut topics, e2e.rate())?;
    let latency = latency(&runs, &mut topics, sustained.as_ref(), e2e.rate())?;
    std::fs::remove_dir_all(&dir).ok();
    report(
        &runs,
        &Figures {
            preload_rate,
            raw_rate,
            e2e,
            set,
            lua,
            sustained,
            latency,
        },
    )
}

/// Creates the run's topic and preloads the workload into it; returns the producer's rate.
fn preload(runs: &Runs<'_>, topics: &mut bench::broker::RunTopics) -> anyhow::Result<f64> {
    let args = runs.args;
    topics
        .create(runs.run_id, args.partitions)
        .context("creating the topic")?;
    let took = bench::broker::preload(&args.brokers, runs.run_id, &runs.workload.messages)?;
    let rate = runs.workload.messages.len() as f64 / took.as_secs_f64();
    eprintln!("preload: {rate:.0} msg/s");
    Ok(rate)
}

/// Reads the preloaded topic back with plain consumers, one per worker: the rate the dataflow's
/// end-to-end rate is compared with.
fn raw_consume(runs: &Runs<'_>) -> anyhow::Result<f64> {
    let args = runs.args;
    let total = runs.workload.messages.len();
    let took = bench::broker::consume_all(
        &args.brokers,
        runs.run_id,
        args.partitions,
        args.workers,
        total,
    )?;
    let rate = total as f64 / took.as_secs_f64();
    eprintln!("raw consume ({} consumers): {rate:.0} msg/s", args.workers);
    Ok(rate)
}

/// The dataflow binary on the preloaded topic, from an empty database.
fn end_to_end(runs: &Runs<'_>) -> anyhow::Result<EndToEnd> {
    let e2e = runs.run_preloaded(&runs.dataflow_args(runs.run_id))?;
    eprintln!(
        "end to end: {:.0} msg/s from the first read, {:.0} msg/s from launch ({:.2} s), \
         {} profile writes; first read {:.2} s after launch",
        e2e.rate(),
        e2e.launch_rate(),
        e2e.launch_seconds,
        e2e.profile_writes(),
        e2e.first_read_seconds()
    );
    Ok(e2e)
}

/// The --recommendations-pairs mode: `pairs` pairs of end-to-end runs on the preloaded topic,
/// recommendations off then on.
fn recommendation_pairs(runs: &Runs<'_>, pairs: u64) -> anyhow::Result<PairsReport> {
    let mut figures = Vec::new();
    for pair in 1..=pairs {
        let run = |switch: &str| {
            // A group of its own, so that the run reads the topic from its start (and neither
            // finds another run's committed offsets nor its checkpoints).
            let group = format!("{}-pair{pair}-{switch}", runs.run_id);
            let mut dataflow_args = runs.dataflow_args_in_group(runs.run_id, &group);
            dataflow_args.extend(["--recommendations".to_owned(), switch.to_owned()]);
            let e2e = runs
                .run_preloaded(&dataflow_args)
                .with_context(|| format!("pair {pair}, recommendations {switch}"))?;
            eprintln!(
                "pair {pair}, recommendations {switch}: {:.0} msg/s",
                e2e.rate()
            );
            anyhow::Ok(e2e)
        };
        let off = run("off")?;
        let on = run("on")?;
        figures.push(PairFigures::new(&off, &on));
    }
    Ok(PairsReport::new(figures))
}

/// Prints the pairs' table and writes it as JSON.
fn report_pairs(runs: &Runs<'_>, report: &PairsReport) -> anyhow::Result<()> {
    let args = runs.args;
    println!("{}", report.render());
    let json = serde_json::json!({
        "workload": workload_json(runs.workload),
        "workers": args.workers,
        "epoch_ms": args.epoch_ms,
        "recommendation_pairs": report,
    });
    bench::write_json(&args.json, &json)?;
    eprintln!("wrote {}", args.json.display());
    Ok(())
}

/// Redis alone: `writes` profile writes as plain pipelined SETs, then through the sink's
/// script.
///
/// As many profiles as the end-to-end run wrote: those of the first `writes` messages, with one
/// write per message (the dataflow writes a user once per epoch however many of its messages the
/// epoch holds, which is why `writes` can be below the message count).
fn redis_phases(runs: &Runs<'_>, writes: u64) -> anyhow::Result<(RedisPhase, RedisPhase)> {
    let args = runs.args;
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let profiles = Profiles::build(runs.workload, writes as usize, epoch);
    flush_db(&runs.redis)?;
    let set = set_phase(&runs.redis, &profiles, args.workers).context("raw Redis SET phase")?;
    eprintln!(
        "raw Redis SET ({} connections, {} per pipeline, {} in flight, {:.0} B per write): \
         {:.0} profile writes/s",
        set.connections,
        set.batch,
        set.depth,
        set.bytes_per_write(),
        set.rate()
    );
    flush_db(&runs.redis)?;
    let lua = sink_phase(&runs.redis, &profiles, args.workers).context("sink (Lua) phase")?;
    eprintln!(
        "sink, Lua script ({} connections, {:.0} B per write): {:.0} profile writes/s",
        lua.connections,
        lua.bytes_per_write(),
        lua.rate()
    );
    Ok((set, lua))
}

/// The maximum sustained rate: the highest rate a fresh dataflow, fed live, keeps up with,
/// searched below `e2e_rate` (unless the flags skip the search).
fn sustained_rate(
    runs: &Runs<'_>,
    topics: &mut bench::broker::RunTopics,
    e2e_rate: f64,
) -> anyhow::Result<Option<bench::sustained::Sustained>> {
    let args = runs.args;
    let search =
        args.latency_rate.is_none() && args.latency_fraction > 0.0 && args.sustained_secs > 0;
    if !search {
        return Ok(None);
    }
    eprintln!(
        "searching the maximum sustained rate: {} live runs of {} s",
        args.sustained_steps, args.sustained_secs
    );
    let mut tried = 0;
    let upper = args.sustained_max.unwrap_or(e2e_rate);
    let found = bench::sustained::search(upper, args.sustained_steps, |rate| {
        tried += 1;
        let run = runs.live(
            topics,
            &format!("{}-sustain-{tried}", runs.run_id),
            rate,
            args.sustained_secs,
        )?;
        let p99 = bench::paced::latencies(&run.epochs, WARMUP_MS).map_or(0, |l| l.p99_ms);
        let probe =
            bench::sustained::Probe::new(rate, run.messages, run.seconds, args.epoch_ms, p99);
        eprintln!("{}", probe.line());
        Ok(probe)
    })
    .context("searching the maximum sustained rate")?;
    eprintln!("{}", found.line(e2e_rate));
    Ok(Some(found))
}

/// The latency phase's summary line and its JSON.
struct Latency {
    line: String,
    json: serde_json::Value,
}

/// Epoch latency at a fraction of the maximum rate (or at --latency-rate): a fresh dataflow on
/// a fresh topic, fed live; writes its chart. `None` when the flags skip the phase.
fn latency(
    runs: &Runs<'_>,
    topics: &mut bench::broker::RunTopics,
    sustained: Option<&bench::sustained::Sustained>,
    e2e_rate: f64,
) -> anyhow::Result<Option<Latency>> {
    let args = runs.args;
    if args.latency_fraction <= 0.0 && args.latency_rate.is_none() {
        return Ok(None);
    }
    // What the latency phase's rate is a fraction of.
    let (max_rate, basis) = match sustained {
        Some(found) => (found.rate, "the maximum sustained rate"),
        None => (e2e_rate, "the end-to-end rate"),
    };
    let rate = args
        .latency_rate
        .unwrap_or(args.latency_fraction * max_rate);
    let run = runs
        .live(
            topics,
            &format!("{}-live", runs.run_id),
            rate,
            args.latency_secs,
        )
        .context("latency phase")?;
    let count = run.messages;
    let latencies = bench::paced::latencies(&run.epochs, WARMUP_MS)
        .ok_or_else(|| anyhow::anyhow!("the latency phase reported no epoch"))?;
    let line = format!(
        "latency at {:.0}% of {basis} ({rate:.0} msg/s, {count} messages; {:.0}% of the \
         end-to-end rate): epoch latency p50 {} ms, p99 {} ms, max {} ms over {} epochs \
         (target p99 <= {} ms)",
        rate / max_rate * 100.0,
        rate / e2e_rate * 100.0,
        latencies.p50_ms,
        latencies.p99_ms,
        latencies.max_ms,
        latencies.epochs,
        2 * args.epoch_ms
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy = run.cpu.machine_busy_share(run.messages, run.seconds, cores);
    let line = format!("{line}\n{}", run.cpu.render_live(busy));
    eprintln!("{line}");
    let live_chart = args.chart.with_file_name(format!(
        "{}-live.svg",
        args.chart.file_stem().unwrap_or_default().to_string_lossy()
    ));
    if let Some(parent) = live_chart.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let live_title = format!(
        "streamrec bench, fed live at {rate:.0} msg/s ({:.0}% of {basis}), -w {}, {} ms \
         epochs",
        rate / max_rate * 100.0,
        args.workers,
        args.epoch_ms
    );
    write_chart(
        &live_chart,
        &live_title,
        &run.epochs,
        args.epoch_ms,
        run.rate(),
    )
    .with_context(|| format!("writing {}", live_chart.display()))?;
    eprintln!("wrote {}", live_chart.display());
    let json = serde_json::json!({
        "fraction_of_max_rate": rate / max_rate,
        "max_rate_basis": basis,
        "fraction_of_e2e_rate": rate / e2e_rate,
        "rate_msgs_per_s": rate,
        "messages": count,
        "latencies": latencies,
        "p99_target_ms": 2 * args.epoch_ms,
        "cpu_per_message": run.cpu,
        "machine_busy_share": busy,
        "epochs": run.epochs,
    });
    Ok(Some(Latency { line, json }))
}

/// Every phase's figures, for the report.
struct Figures {
    preload_rate: f64,
    raw_rate: f64,
    e2e: EndToEnd,
    set: RedisPhase,
    lua: RedisPhase,
    sustained: Option<bench::sustained::Sustained>,
    latency: Option<Latency>,
}

/// Prints the per-epoch table and the summary, and writes the chart and the JSON report.
fn report(runs: &Runs<'_>, figures: &Figures) -> anyhow::Result<()> {
    let (args, workload) = (runs.args, runs.workload);
    let total = workload.messages.len();
    let Figures {
        preload_rate,
        raw_rate,
        e2e,
        set,
        lua,
        sustained,
        latency,
    } = figures;
    println!(
        "per epoch (epoch+ms: ms since the first epoch; changed: profiles written; latency_ms: \
         epoch end to Redis ack; msg/s: messages over the epoch length)"
    );
    println!(
        "{:>8} {:>9} {:>9} {:>11} {:>10}",
        "epoch+ms", "messages", "changed", "latency_ms", "msg/s"
    );
    let first = e2e.epochs.first().map_or(0, |e| e.epoch);
    for epoch in &e2e.epochs {
        println!(
            "{:>8} {:>9} {:>9} {:>11} {:>10.0}",
            epoch.epoch - first,
            epoch.counters.messages,
            epoch.counters.changed,
            epoch.counters.latency_ms,
            epoch.counters.messages as f64 * 1000.0 / args.epoch_ms as f64
        );
    }
    let summary = Summary::new(total as u64, *raw_rate, e2e, set, lua);
    println!();
    println!("{}", summary.render(args.workers, e2e.seconds, set));
    if let Some(kb) = e2e.peak_rss_kb {
        println!(
            "  dataflow peak RSS (VmHWM) {:.2} GB",
            kb as f64 / 1_000_000.0
        );
    }
    if let Some(resident) = &e2e.resident {
        println!("{}", resident.render());
    }
    println!("{}", e2e.cpu.render());
    let recommend_cost = e2e.recommend_cost();
    if let Some(cost) = &recommend_cost {
        println!("{}", cost.render());
    }
    if let Some(found) = sustained {
        println!("{}", found.render(e2e.rate()));
    }
    if let Some(latency) = latency {
        println!("{}", latency.line);
    }

    let slide = workload
        .slide
        .map_or_else(String::new, |slide| format!(", sliding by {slide}"));
    let title = format!(
        "streamrec bench: {total} messages, {} users, {} items, D={}, history {}{slide}, -w {}, \
         {} ms epochs",
        workload.distinct_users,
        workload.items.len(),
        workload.dim,
        workload.history,
        args.workers,
        args.epoch_ms
    );
    if let Some(parent) = args.chart.parent() {
        std::fs::create_dir_all(parent)?;
    }
    write_chart(&args.chart, &title, &e2e.epochs, args.epoch_ms, e2e.rate())
        .with_context(|| format!("writing {}", args.chart.display()))?;
    let report = serde_json::json!({
        "workload": workload_json(workload),
        "workers": args.workers,
        "epoch_ms": args.epoch_ms,
        "raw_consume_msgs_per_s": raw_rate,
        "preload_msgs_per_s": preload_rate,
        "e2e_msgs_per_s": e2e.rate(),
        "e2e_over_raw": e2e.rate() / raw_rate,
        "redis_set": set,
        "sink_lua": lua,
        "summary": summary,
        "cpu_per_message": e2e.cpu,
        "recommend_cost": recommend_cost,
        "chart": args.chart,
        "sustained": sustained,
        "latency": latency.as_ref().map(|latency| &latency.json),
        "e2e": e2e,
    });
    bench::write_json(&args.json, &report)?;
    eprintln!("wrote {} and {}", args.json.display(), args.chart.display());
    Ok(())
}

/// The workload: read from --messages-file and --features-file, or generated.
fn workload(args: &Args) -> anyhow::Result<Workload> {
    match (&args.messages_file, &args.features_file) {
        (Some(messages), Some(features)) => Ok(Workload::load(messages, features)?),
        _ => Ok(Workload::generate(&args.workload)),
    }
}

/// The workload as the JSON reports describe it.
fn workload_json(workload: &Workload) -> serde_json::Value {
    serde_json::json!({
        "messages": workload.messages.len(), "distinct_users": workload.distinct_users,
        "items": workload.items.len(), "dim": workload.dim, "history": workload.history,
        "slide": workload.slide,
    })
}

/// The --in-memory mode: the scaling measurement of `bench-core`, on this run's workload.
fn in_memory(args: &Args) -> anyhow::Result<()> {
    let workload = workload(args)?;
    let mut workers = vec![1];
    if args.workers > 1 {
        workers.push(args.workers);
    }
    let config = bench::dataflow_core::ScalingConfig {
        epoch_messages: 10_000,
        workers,
        runs: 3,
        max_history: profile::DEFAULT_MAX_HISTORY,
        decay: profile::DEFAULT_DECAY,
    };
    let scaling = bench::dataflow_core::scaling(&workload, &config).context("in-memory scaling")?;
    println!("{}", scaling.table());
    let report = serde_json::json!({"in_memory": {"scaling": scaling}});
    bench::write_json(&args.json, &report)?;
    eprintln!("wrote {}", args.json.display());
    Ok(())
}

/// What every run of the dataflow on the broker shares.
struct Runs<'a> {
    args: &'a Args,
    binary: &'a std::path::Path,
    workload: &'a Workload,
    run_id: &'a str,
    features: &'a std::path::Path,
    redis_pid: Option<u32>,
    redis: RedisTarget,
}

impl Runs<'_> {
    /// Where the dataflow runs write their checkpoints: beside the features file.
    fn checkpoint_dir(&self) -> std::path::PathBuf {
        self.features.with_file_name("checkpoints")
    }

    /// The dataflow binary with `dataflow_args` on the preloaded topic until it has stored
    /// every message, from an empty database: every phase that writes to Redis starts from
    /// one, so that runs (and the script's reads of existing keys) are comparable.
    fn run_preloaded(&self, dataflow_args: &[String]) -> anyhow::Result<EndToEnd> {
        flush_db(&self.redis)?;
        run_dataflow(
            self.binary,
            dataflow_args,
            self.args.epoch_ms,
            self.workload.messages.len() as u64,
            Duration::from_secs(self.args.timeout_secs),
            self.redis_pid,
        )
    }

    /// The dataflow's flags for a run on `topic`.
    fn dataflow_args(&self, topic: &str) -> Vec<String> {
        self.dataflow_args_in_group(topic, &format!("{topic}-group"))
    }

    /// The dataflow's flags for a run on `topic` as consumer group `group`.
    fn dataflow_args_in_group(&self, topic: &str, group: &str) -> Vec<String> {
        let args = self.args;
        [
            "--brokers",
            &args.brokers,
            "--topic",
            topic,
            "--group",
            group,
            "--redis",
            &args.redis,
            "--item-features",
            self.features.to_str().unwrap_or_default(),
            "--item-topic",
            &format!("{}-no-items", self.run_id),
            "-w",
            &args.workers.to_string(),
            // In the run's directory, removed at the end; CHECKPOINTS and
            // CHECKPOINT_INTERVAL in the environment reach the dataflow as they are.
            "--checkpoint-dir",
            &self.checkpoint_dir().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(args.redis_cluster.then(|| "--redis-cluster".to_owned()))
        .collect()
    }

    /// A fresh dataflow on a fresh topic `name`, fed live at `rate` msg/s for `secs` seconds
    /// (past the workload's end its messages come round again, with later timestamps), from an
    /// empty database. The topic is deleted afterwards: a broker that keeps it in memory would
    /// hold a GB more for every run.
    fn live(
        &self,
        topics: &mut bench::broker::RunTopics,
        name: &str,
        rate: f64,
        secs: u64,
    ) -> anyhow::Result<bench::e2e::EndToEnd> {
        let args = self.args;
        let count = ((rate * secs as f64) as usize).max(1);
        topics
            .create(name, args.partitions)
            .with_context(|| format!("creating the topic {name}"))?;
        flush_db(&self.redis)?;
        let workload = self.workload;
        // Set once the run has failed: the producer then stops instead of waiting for a
        // broker that may be gone.
        let stop = AtomicBool::new(false);
        let stop = &stop;
        let run = std::thread::scope(|scope| {
            let producer = scope.spawn(move || {
                // Give the dataflow time to load its features and connect, so the first
                // epochs measure the pipeline, not its start.
                std::thread::sleep(Duration::from_secs(2));
                bench::paced::produce_paced(
                    &args.brokers,
                    name,
                    count,
                    |i| workload.message_at(i),
                    rate,
                    Duration::from_millis(args.latency_linger_ms),
                    stop,
                )
            });
            let run = run_dataflow(
                self.binary,
                &self.dataflow_args(name),
                args.epoch_ms,
                count as u64,
                Duration::from_secs(args.timeout_secs),
                self.redis_pid,
            );
            if run.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            let produced = producer
                .join()
                .map_err(|_| anyhow::anyhow!("the paced producer panicked"))?;
            // The run's error first: the producer's would only say it was stopped.
            let run = run?;
            produced?;
            anyhow::Ok(run)
        });
        topics.delete(name);
        run
    }
}
