//! The end-to-end measurement: the real `dataflow` binary on the preloaded topic, timed from
//! the epoch in which it first read to the Redis acknowledgement of the epoch in which it read
//! the last message, as its own per-epoch statistics report them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dataflow::stats::{EpochCounters, RecommendCost};

use crate::cpu::{CpuPerMessage, CpuSampler, ResidentOverWindow};
use serde::{Deserialize, Serialize};

/// One epoch as the dataflow's `--stats-json` reports it: the epoch and the dataflow's own
/// counters of it, side by side in the JSON line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochStat {
    pub epoch: u64,
    #[serde(flatten)]
    pub counters: EpochCounters,
}

/// What an end-to-end run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndToEnd {
    pub epochs: Vec<EpochStat>,
    pub messages: u64,
    /// From the start of the first epoch that read to the acknowledgement of the last one.
    pub seconds: f64,
    /// From the dataflow's launch (before it loads the features file) to the acknowledgement
    /// of the last epoch: what a restart costs before the state is current again.
    #[serde(default)]
    pub launch_seconds: f64,
    /// The dataflow's peak resident memory (`VmHWM`), in kB, read just before it was stopped;
    /// `None` where /proc cannot tell.
    pub peak_rss_kb: Option<u64>,
    /// The dataflow's resident size over the run's window, sampled with its CPU.
    #[serde(default)]
    pub resident: Option<ResidentOverWindow>,
    /// CPU per message over the run's window, of the dataflow, Redis and the rest.
    pub cpu: CpuPerMessage,
}

impl EndToEnd {
    /// Messages per second, first read to last acknowledgement.
    pub fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds.max(1e-9)
    }

    /// Messages per second, launch to last acknowledgement.
    pub fn launch_rate(&self) -> f64 {
        self.messages as f64 / self.launch_seconds.max(1e-9)
    }

    /// Seconds from the dataflow's launch to the start of the first epoch that read a message:
    /// what a start costs before the first message is read (the read itself is within that
    /// epoch, so this is short of it by less than one `--epoch-ms`).
    pub fn first_read_seconds(&self) -> f64 {
        self.launch_seconds - self.seconds
    }

    /// Profile values handed to Redis: the changed profiles of every epoch.
    pub fn profile_writes(&self) -> u64 {
        self.epochs.iter().map(|e| e.counters.changed).sum()
    }

    /// With recommendations, what they cost over the run's epochs.
    pub fn recommend_cost(&self) -> Option<RecommendSummary> {
        let mut total = RecommendCost::default();
        let mut epochs = 0;
        for epoch in &self.epochs {
            if !epoch.counters.recommend.is_empty() {
                epochs += 1;
                total.add(&epoch.counters.recommend);
            }
        }
        (epochs > 0).then_some(RecommendSummary {
            epochs,
            messages: self.messages,
            total,
        })
    }
}

/// The recommendations' cost over a run: the epochs that had any, and their sum.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecommendSummary {
    pub epochs: u64,
    pub messages: u64,
    pub total: RecommendCost,
}

impl RecommendSummary {
    /// Two lines: the average epoch, and the same per message.
    pub fn render(&self) -> String {
        let per = |value: u64, by: u64| value as f64 / by.max(1) as f64;
        let total = &self.total;
        let line = |by: u64, unit: f64| {
            format!(
                "{:.1} pair updates, {:.2} neighbour changes, {:.2} lists; worker time {:.1} \
                 (pairs {:.1}, neighbours {:.1}, scoring {:.1})",
                per(total.pair_updates, by),
                per(total.neighbour_changes, by),
                per(total.lists, by),
                per(total.total_us(), by) / unit,
                per(total.pairs_us, by) / unit,
                per(total.neighbours_us, by) / unit,
                per(total.scoring_us, by) / unit,
            )
        };
        format!(
            "  recommendations, per epoch ({} epochs; times in ms): {}\n  recommendations, per \
             message (times in us): {}",
            self.epochs,
            line(self.epochs, 1e3),
            line(self.messages, 1.0),
        )
    }
}

/// The `dataflow` binary beside this one (both are built into the same target directory).
pub fn dataflow_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name("dataflow");
    anyhow::ensure!(
        path.exists(),
        "{} not found: build it first with `cargo build --release -p streamrec-dataflow`",
        path.display()
    );
    Ok(path)
}

/// How long the dataflow may go without reading a message, while messages are still expected,
/// before the run is given up: long past any pause of a working pipeline (its start-up, a
/// backlog held back by `--max-in-flight`), and far short of `--timeout-secs`, which a broker
/// that died mid-run (tansu killed for memory, once: docs/tansu.md, 5) used to run out in full.
pub const STALL: Duration = Duration::from_secs(60);

/// Runs the dataflow with `args` until it has reported `expected` messages, then stops it with
/// SIGTERM. Gives up after `timeout`, or once it has read nothing for [`STALL`]. `redis_pid` is
/// Redis's process, for the CPU it spends.
pub fn run_dataflow(
    binary: &Path,
    args: &[String],
    epoch_ms: u64,
    expected: u64,
    timeout: Duration,
    redis_pid: Option<u32>,
) -> anyhow::Result<EndToEnd> {
    let launched_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut child = Command::new(binary)
        .args(args)
        .arg("--stats-json")
        .arg("--epoch-ms")
        .arg(epoch_ms.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    let sampler = CpuSampler::start(child.id(), redis_pid);
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(stat) = serde_json::from_str::<EpochStat>(&line) {
                if sender.send(stat).is_err() {
                    break;
                }
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut epochs = Vec::new();
    let mut messages = 0;
    let mut last_read = Instant::now();
    let outcome = loop {
        if messages >= expected {
            break Ok(());
        }
        if last_read.elapsed() >= STALL {
            break Err(anyhow::anyhow!(
                "the dataflow read no message for {}s, with {messages} of {expected} read: is \
                 the broker up? (the dataflow's log is above)",
                STALL.as_secs()
            ));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match receiver.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(stat) => {
                if stat.counters.messages > 0 {
                    last_read = Instant::now();
                }
                messages += stat.counters.messages;
                epochs.push(stat);
            }
            Err(_) if Instant::now() >= deadline => {
                break Err(anyhow::anyhow!(
                    "dataflow reported {messages} of {expected} messages in {timeout:?}"
                ));
            }
            Err(_) => {
                if let Some(status) = child.try_wait()? {
                    break Err(anyhow::anyhow!("dataflow exited early: {status}"));
                }
            }
        }
    };
    let peak_rss_kb = peak_rss_kb(child.id());
    let samples = sampler.finish();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    outcome?;
    let (first, last) = match (epochs.first(), epochs.last()) {
        (Some(first), Some(last)) => (first, last),
        _ => anyhow::bail!("no epoch reported"),
    };
    // From the start of the first epoch that read (an upper bound on the first read, so the
    // rate is if anything understated) to the acknowledgement of the last one.
    let end = last.epoch + epoch_ms + last.counters.latency_ms;
    let seconds = end.saturating_sub(first.epoch) as f64 / 1000.0;
    // Epochs are Unix milliseconds, on this machine's clock.
    let launch_seconds = end.saturating_sub(launched_ms) as f64 / 1000.0;
    Ok(EndToEnd {
        launch_seconds,
        peak_rss_kb,
        resident: ResidentOverWindow::over_window(&samples, first.epoch, end),
        cpu: CpuPerMessage::over_window(messages, &samples, first.epoch, end),
        messages,
        seconds,
        epochs,
    })
}

/// The peak resident memory of process `pid` so far (`VmHWM` in /proc/<pid>/status), in kB.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An epoch that read `messages` and wrote each one, for the tests of what reads epochs.
    pub(crate) fn epoch(epoch: u64, messages: u64, latency_ms: u64) -> EpochStat {
        EpochStat {
            epoch,
            counters: EpochCounters {
                messages,
                changed: messages,
                redis_writes: messages,
                latency_ms,
                ..EpochCounters::default()
            },
        }
    }

    #[test]
    fn reads_the_dataflows_own_stats_lines() {
        let counters = EpochCounters {
            messages: 4096,
            invalid: 1,
            stale: 2,
            changed: 3000,
            redis_writes: 2999,
            plain_writes: 2990,
            latency_ms: 87,
            redis_rejected: 0,
            recommend: RecommendCost::default(),
        };
        let line = dataflow::stats::format_epoch(1_700_000_000_100, &counters, 100, true);
        let stat: EpochStat = serde_json::from_str(&line).unwrap();
        assert_eq!(stat.epoch, 1_700_000_000_100);
        assert_eq!(stat.counters, counters);
    }

    #[test]
    fn sums_the_recommendations_cost_over_the_epochs_that_had_any() {
        let with = |pair_updates, lists, scoring_us| {
            let mut stat = epoch(1, 10, 5);
            stat.counters.recommend = RecommendCost {
                pair_updates,
                neighbour_changes: 1,
                lists,
                pairs_us: 0,
                neighbours_us: 0,
                scoring_us,
            };
            stat
        };
        let mut run = EndToEnd {
            epochs: vec![epoch(0, 10, 5), with(1800, 10, 4000), with(900, 5, 2000)],
            messages: 30,
            seconds: 1.0,
            launch_seconds: 1.2,
            peak_rss_kb: None,
            resident: None,
            cpu: CpuPerMessage::default(),
        };
        let summary = run.recommend_cost().unwrap();
        assert_eq!((summary.epochs, summary.total.pair_updates), (2, 2700));
        let text = summary.render();
        assert!(
            text.contains(
                "(2 epochs; times in ms): 1350.0 pair updates, 1.00 neighbour changes, 7.50 \
                 lists; worker time 3.0 (pairs 0.0, neighbours 0.0, scoring 3.0)"
            ) && text.contains("(times in us): 90.0 pair updates")
                && text.contains("worker time 200.0"),
            "{text}"
        );
        run.epochs.truncate(1);
        assert!(
            run.recommend_cost().is_none(),
            "none with recommendations off"
        );
    }

    #[test]
    fn reads_the_peak_from_proc_status() {
        let status = "Name:\tdataflow\nVmPeak:\t 2000 kB\nVmHWM:\t  804540 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(804_540));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
        assert!(peak_rss_kb(std::process::id()).is_some_and(|kb| kb > 0));
    }
}
