//! The `bench` binary end to end, on a tiny workload against the test broker and Redis: every
//! phase runs, the sustained-rate search bisects as its runs say, the latency phase runs at
//! half the rate it found, and the run's topics are gone afterwards; and its
//! `--recommendations-pairs` mode, whose runs alternate the switch whatever the environment says.

#![allow(clippy::unwrap_used)] // a panic in a test is a test failure

use std::process::Command;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde_json::Value;

/// The tests' own databases (this and the next): `bench` empties its database with FLUSHDB.
const REDIS_DB: u32 = 12;

/// `bench` on a tiny workload of `messages` messages (over a fifth as many users, and 500
/// items), 2 workers and partitions, against the test broker and Redis database `db`.
fn bench(messages: u32, db: u32) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bench"));
    command
        .args(["--messages", &messages.to_string()])
        .args(["--users", &(messages / 5).to_string(), "--items", "500"])
        .args([
            "--dim",
            "4",
            "--history",
            "10",
            "-w",
            "2",
            "--partitions",
            "2",
        ])
        .args(["--brokers", &testkit::brokers()])
        .args(["--redis", &testkit::redis_url_db(db)]);
    command
}

#[test]
fn bench_searches_the_sustained_rate_and_measures_latency_at_half_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("e2e.json");
    let upper = 1_600.0;
    let output = bench(3000, REDIS_DB)
        // Two live runs of 3 s, bisecting (0, 1,600] msg/s: a rate this machine keeps up with
        // even in a debug build, so both runs should keep up.
        .args(["--sustained-secs", "3", "--sustained-steps", "2"])
        .args(["--sustained-max", &upper.to_string(), "--latency-secs", "3"])
        .args(["--timeout-secs", "120"])
        .arg("--json")
        .arg(&json)
        .arg("--chart")
        .arg(dir.path().join("e2e.svg"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();

    assert!(report["e2e_msgs_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(report["e2e"]["messages"], 3000);
    let sustained = &report["sustained"];
    let probes = sustained["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 2, "{sustained}");
    // The first run is at half the upper end, the second halfway to the side it decided.
    assert_eq!(probes[0]["offered"], upper / 2.0);
    let first_kept_up = probes[0]["kept_up"].as_bool().unwrap();
    let second = if first_kept_up { 0.75 } else { 0.25 } * upper;
    assert_eq!(probes[1]["offered"], second, "{sustained}");
    // The rate found is the highest one that kept up.
    let highest_kept_up = probes
        .iter()
        .filter(|p| p["kept_up"] == true)
        .map(|p| p["offered"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        highest_kept_up > 0.0,
        "no run kept up at 800 msg/s or less:\n{stderr}"
    );
    assert_eq!(sustained["rate"], highest_kept_up);
    for probe in probes {
        assert!(probe["stored"].as_f64().unwrap() > 0.0, "{probe}");
    }

    // The latency phase ran at half of it, live, and reported its epochs.
    let latency = &report["latency"];
    assert_eq!(latency["max_rate_basis"], "the maximum sustained rate");
    assert_eq!(latency["rate_msgs_per_s"], highest_kept_up / 2.0);
    assert_eq!(latency["messages"], (highest_kept_up / 2.0 * 3.0) as u64);
    assert!(
        latency["latencies"]["epochs"].as_u64().unwrap() > 0,
        "{latency}"
    );
    assert!(
        stderr.contains("maximum sustained rate fed live"),
        "{stderr}"
    );

    // Every topic of the run was deleted: the preloaded one is named by the run, and the live
    // runs' topics by that name and a suffix.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", testkit::brokers())
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .unwrap();
    let deleted = stderr
        .lines()
        .find_map(|line| line.strip_prefix("deleted the run's topics: "))
        .unwrap_or_else(|| panic!("no topic deleted:\n{stderr}"));
    // Each live run deleted its own topic when it ended: only the preloaded one is left for
    // the end.
    let run_topics: Vec<&str> = deleted.split(", ").collect();
    assert_eq!(run_topics.len(), 1, "{deleted}");
    let left: Vec<&str> = metadata
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|name| name.starts_with(run_topics[0]))
        .collect();
    assert!(left.is_empty(), "topics left on the broker: {left:?}");
}

#[test]
fn recommendation_pairs_run_off_then_on_and_report_the_median_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("pairs.json");
    let output = bench(2000, REDIS_DB + 1)
        .args(["--recommendations-pairs", "2", "--timeout-secs", "120"])
        // The mode's own switch must win over the environment's, for the off runs too.
        .env("RECOMMENDATIONS", "on")
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "bench failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let pairs = &report["recommendation_pairs"];
    let figures = pairs["pairs"].as_array().unwrap();
    assert_eq!(figures.len(), 2, "{pairs}");
    let mut ratios = Vec::new();
    for pair in figures {
        assert_eq!(pair["messages"], 2000, "{pair}");
        let (off, on) = (
            pair["off_msgs_per_s"].as_f64().unwrap(),
            pair["on_msgs_per_s"].as_f64().unwrap(),
        );
        assert!(off > 0.0 && on > 0.0, "{pair}");
        // To the last bits or so: serde_json reads floats back within an ulp.
        assert!(
            (pair["ratio"].as_f64().unwrap() - on / off).abs() < 1e-12,
            "{pair}"
        );
        ratios.push(on / off);
        // Off computed no recommendations; on counted pairs and wrote lists.
        assert!(pair["off_recommend"].is_null(), "{pair}");
        let cost = &pair["on_recommend"]["total"];
        assert!(cost["pair_updates"].as_u64().unwrap() > 0, "{pair}");
        assert!(cost["lists"].as_u64().unwrap() > 0, "{pair}");
    }
    let median = (ratios[0] + ratios[1]) / 2.0;
    assert!((pairs["median_ratio"].as_f64().unwrap() - median).abs() < 1e-12);
    assert!(
        stdout.contains(&format!("median of 2 pairs: {median:.2}x")),
        "{stdout}"
    );
    // One preload, and its topic deleted at the end.
    assert_eq!(stderr.matches("preload: ").count(), 1, "{stderr}");
    assert!(stderr.contains("deleted the run's topics: "), "{stderr}");
}
