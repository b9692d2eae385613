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

/// `numerator / denominator`, or `None` when the denominator is not positive (a run too short
/// to time, or missing). The one ratio of the tools; a report that writes a missing ratio as
/// JSON `null` in an `f64` field takes [`summary::ratio_or_nan`].
pub fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0).then(|| numerator / denominator)
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn ratio_needs_a_positive_denominator() {
        assert_eq!(super::ratio(3.0, 2.0), Some(1.5));
        assert_eq!(super::ratio(3.0, 0.0), None);
        assert_eq!(super::ratio(3.0, -1.0), None);
    }
}
