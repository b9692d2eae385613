//! Throughput of the sink against a real Redis, and what the no-regression check costs.
//!
//! ```text
//! cargo run -p streamrec-sink --release --example throughput [-- RECORDS [REDIS_URL]]
//! ```
//!
//! REDIS_URL defaults to `STREAMREC_TEST_REDIS`, then `redis://127.0.0.1:16379/0`; RECORDS to
//! 50,000. Records are realistic: 50 item ids of 10 characters and 32 floats (~1.1 KB of JSON).
//! Compared, each on fresh keys ("insert") and on keys holding an older profile ("update"):
//!
//! - the sink: one EVALSHA per batch (512 keys), at several pipeline depths and batch sizes;
//! - a plain pipeline of SETs (no regression check), 512 per round trip;
//! - a pipeline of per-key EVALSHAs of the sink's own script, one key each, 512 per round trip.
//!
//! Each figure is the best of REPEAT runs (env `REPEAT`, default 3), because on a shared machine
//! the worst runs measure the neighbours. The keys are deleted afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use sink::{encode_profile, ProfileRecord, RedisSink, SinkConfig};

struct Data {
    users: Vec<String>,
    items: Vec<Vec<String>>,
    vectors: Vec<Vec<f32>>,
}

impl Data {
    fn new(prefix: &str, n: usize) -> Self {
        Self {
            users: (0..n).map(|i| format!("{prefix}:A{i:012}")).collect(),
            items: (0..n)
                .map(|i| {
                    (0..50)
                        .map(|j| format!("B{:09}", (i * 13 + j) % 1_000_000))
                        .collect()
                })
                .collect(),
            vectors: (0..n)
                .map(|i| {
                    (0..32)
                        .map(|j| (((i * 31 + j * 17) % 1000) as f32 / 997.0) - 0.3)
                        .collect()
                })
                .collect(),
        }
    }

    fn records(&self, ts: u64, epoch: u64) -> impl Iterator<Item = ProfileRecord<'_, String>> {
        (0..self.users.len()).map(move |i| ProfileRecord {
            user_id: &self.users[i],
            timestamp: ts,
            history_items: &self.items[i],
            interest_vector: &self.vectors[i],
            known_items: 50,
            epoch,
        })
    }
}

fn rate(n: usize, took: Duration) -> String {
    format!("{:>9.0} records/s", n as f64 / took.as_secs_f64())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(50_000, |s| s.parse().expect("RECORDS"));
    let url = args.next().unwrap_or_else(testkit::redis_url);
    let prefix = format!("bench-{}", std::process::id());
    let data = Data::new(&prefix, n);
    let json_bytes: usize = data.records(1, 1).map(|r| encode_profile(&r).len()).sum();
    println!(
        "{n} records, {} bytes of JSON each on average, Redis at {url}",
        json_bytes / n
    );

    let started = Instant::now();
    let mut total = 0;
    for r in data.records(1, 1) {
        total += encode_profile(&r).len();
    }
    std::hint::black_box(total);
    println!("{:<44}{}", "encode only", rate(n, started.elapsed()));

    let repeat: usize = std::env::var("REPEAT").map_or(3, |s| s.parse().expect("REPEAT"));
    let mut ts = 0;
    let mut next_ts = || {
        ts += 1;
        ts
    };
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    // The sink's own script, run with one key per call.
    let script = redis::Script::new(sink::WRITE_SCRIPT);
    script.load(&mut conn).unwrap();

    // The sink, in several shapes. Each run writes fresh keys, then overwrites them with a newer
    // timestamp, then replays the same (now stale) timestamp, which every key skips.
    for (label, depth, batch) in [
        ("sink, depth 1, batch 512", 1, 512),
        ("sink, depth 2, batch 512 (default)", 2, 512),
        ("sink, depth 4, batch 512", 4, 512),
        ("sink, depth 2, batch 128", 2, 128),
        ("sink, depth 2, batch 2048", 2, 2048),
    ] {
        let mut sink = RedisSink::connect(SinkConfig {
            pipeline_depth: depth,
            max_batch_records: batch,
            ..SinkConfig::new(url.clone())
        })
        .expect("Redis reachable");
        let mut best = [Duration::MAX; 3];
        for _ in 0..repeat {
            clear(&url, &data);
            let first = next_ts();
            let phases = [(next_ts(), 1), (next_ts(), 1), (first, 0)];
            for (phase, (ts, epoch)) in phases.into_iter().enumerate() {
                let started = Instant::now();
                let stats = sink.write(data.records(ts, epoch)).unwrap();
                best[phase] = best[phase].min(started.elapsed());
                assert_eq!(stats.written + stats.skipped_stale, n);
            }
        }
        for (phase, took) in ["insert", "update", "stale"].iter().zip(best) {
            println!("{:<44}{}", format!("{label}, {phase}"), rate(n, took));
        }
    }

    // The same records through redis::pipe, 512 commands per round trip, without the sink's
    // window: plain SETs (no check) and per-key EVALSHAs (the same check, one call per key).
    for (label, per_key) in [
        ("plain SET pipeline", false),
        ("per-key EVALSHA pipeline", true),
    ] {
        let mut best = [Duration::MAX; 2];
        for _ in 0..repeat {
            clear(&url, &data);
            for slot in &mut best {
                let ts = next_ts();
                let started = Instant::now();
                let records: Vec<_> = data.records(ts, 1).collect();
                for chunk in records.chunks(512) {
                    let mut pipe = redis::pipe();
                    for r in chunk {
                        let key = profile::redis_key(r.user_id);
                        if per_key {
                            pipe.cmd("EVALSHA")
                                .arg(script.get_hash())
                                .arg(1)
                                .arg(key)
                                .arg(r.timestamp)
                                .arg(r.epoch)
                                .arg(encode_profile(r))
                                .ignore();
                        } else {
                            pipe.cmd("SET").arg(key).arg(encode_profile(r)).ignore();
                        }
                    }
                    pipe.query::<()>(&mut conn).unwrap();
                }
                *slot = (*slot).min(started.elapsed());
            }
        }
        for (phase, took) in ["insert", "update"].iter().zip(best) {
            println!(
                "{:<44}{}",
                format!("{label}, 512/trip, {phase}"),
                rate(n, took)
            );
        }
    }

    clear(&url, &data);
}

/// Deletes the benchmark's keys.
fn clear(url: &str, data: &Data) {
    let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
    for chunk in data.users.chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|u| profile::redis_key(u)).collect();
        let _: i64 = redis::cmd("UNLINK").arg(keys).query(&mut conn).unwrap();
    }
}
