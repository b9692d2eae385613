//! streamrec's benchmark tool. It generates a seeded, Amazon-shaped profile workload, preloads
//! it into a fresh topic, and measures on that same topic the raw rate at which Kafka consumers
//! read it and the end-to-end rate of the real `dataflow` binary, from first read to the last
//! Redis acknowledgement; then how fast Redis alone stores the same profile writes, as plain
//! pipelined `SET`s and through the sink's no-regression script; then the highest rate the
//! dataflow sustains fed live by a paced producer, and its epoch latency at half of that rate.
//! It prints a per-epoch table and a summary with the ratios between those rates, and writes
//! them as JSON and as an SVG chart; `--recommendations-pairs` instead compares end-to-end runs
//! with recommendations on and off ([`pairs`]). `bench-recs` evaluates recommendations offline
//! ([`recs`]); `bench-restart` measures restarts with and without checkpoints ([`restart`]).

pub mod broker;
pub mod chart;
pub mod cpu;
pub mod dataflow_core;
pub mod e2e;
pub mod paced;
pub mod pairs;
pub mod recs;
pub mod redis_write;
pub mod restart;
pub mod summary;
pub mod sustained;
pub mod workload;

/// Writes `report` as pretty JSON to `path`, creating its directory: the tools' `--json`.
pub fn write_json(path: &std::path::Path, report: &impl serde::Serialize) -> anyhow::Result<()> {
    use anyhow::Context;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("writing {}", path.display()))
}
