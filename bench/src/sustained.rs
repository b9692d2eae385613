//! The maximum sustained rate: the highest rate at which the dataflow, fed live, keeps up with
//! its producer, found by bisection over short live runs.
//!
//! The latency target is stated at half of this rate. The end-to-end rate of a preloaded topic
//! is no measure of it: fed live, on the same cores, the producer and the broker's intake take
//! their share, and the dataflow reads small fetches instead of full ones, so a message costs
//! the machine more. Half the preloaded rate was close to what the machine could take live,
//! and its latency measured the queueing of a machine near saturation, not the pipeline
//! (docs/performance.md, "figures from code comments").

use serde::Serialize;

/// A live run keeps up if, from its first read to its last acknowledgement, it took at most
/// the producer's schedule divided by this share, plus two epochs (the latency target) for the
/// last epoch's close and write: over 15 s of production, it ended at most ~0.45 s and two
/// epochs behind the producer. A rate the dataflow cannot take leaves it further behind every
/// second, and the stored rate is then its capacity, below this share.
pub const KEEP_UP_SHARE: f64 = 0.97;

/// One live run of the search.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Probe {
    /// Messages per second offered by the producer.
    pub offered: f64,
    /// Messages per second the dataflow stored, from its first read to its last acknowledgement.
    pub stored: f64,
    /// Whether it kept up (see [`KEEP_UP_SHARE`]).
    pub kept_up: bool,
    /// The run's p99 epoch latency, for the record.
    pub p99_ms: u64,
}

impl Probe {
    /// The outcome of a run offered `messages` at `offered` msg/s that stored them in
    /// `seconds`, from its first read to its last acknowledgement, in epochs of `epoch_ms`.
    pub fn new(offered: f64, messages: u64, seconds: f64, epoch_ms: u64, p99_ms: u64) -> Self {
        let schedule = messages as f64 / offered;
        let allowed = schedule / KEEP_UP_SHARE + 2.0 * epoch_ms as f64 / 1000.0;
        Probe {
            offered,
            stored: messages as f64 / seconds.max(1e-9),
            kept_up: seconds <= allowed,
            p99_ms,
        }
    }
}

/// What the search found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sustained {
    /// The highest offered rate that kept up.
    pub rate: f64,
    /// The lowest offered rate that did not, if one was tried: the true maximum lies between.
    pub failed_at: Option<f64>,
    /// Every run, in the order made.
    pub probes: Vec<Probe>,
}

/// Bisects `(0, upper]` with `steps` live runs, `probe(rate)` making one: each run halves the
/// interval between the highest rate known to keep up and the lowest known not to (at first 0
/// and `upper`, the preloaded end-to-end rate, which no live run exceeds). Four steps find the
/// rate within 1/16 of `upper`.
pub fn search(
    upper: f64,
    steps: usize,
    mut probe: impl FnMut(f64) -> anyhow::Result<Probe>,
) -> anyhow::Result<Sustained> {
    anyhow::ensure!(
        upper > 0.0,
        "the search's upper end must be a positive rate"
    );
    anyhow::ensure!(steps > 0, "the search needs at least one live run");
    let (mut kept_up, mut failed) = (0.0_f64, upper);
    let mut probes = Vec::with_capacity(steps);
    for _ in 0..steps {
        let rate = (kept_up + failed) / 2.0;
        let run = probe(rate)?;
        if run.kept_up {
            kept_up = rate;
        } else {
            failed = rate;
        }
        probes.push(run);
    }
    anyhow::ensure!(
        kept_up > 0.0,
        "the dataflow kept up with no rate tried, down to {failed:.0} msg/s: see the probes' \
         stored rates"
    );
    Ok(Sustained {
        rate: kept_up,
        // `upper` itself is never tried.
        failed_at: (failed < upper).then_some(failed),
        probes,
    })
}

impl Sustained {
    /// The result, in a line, with the rate as a share of the preloaded `e2e_rate`.
    pub fn line(&self, e2e_rate: f64) -> String {
        format!(
            "maximum sustained rate fed live: {:.0} msg/s ({:.0}% of the preloaded end-to-end \
             rate){}",
            self.rate,
            self.rate / e2e_rate * 100.0,
            self.failed_at
                .map(|f| format!("; {f:.0} msg/s fell behind"))
                .unwrap_or_default()
        )
    }

    /// One line per probe, then the result.
    pub fn render(&self, e2e_rate: f64) -> String {
        let mut lines: Vec<String> = self.probes.iter().map(Probe::line).collect();
        lines.push(self.line(e2e_rate));
        lines.join("\n")
    }
}

impl Probe {
    /// The run, in a line.
    pub fn line(&self) -> String {
        format!(
            "  offered {:>7.0} msg/s: stored {:>7.0} msg/s, p99 {:>5} ms, {}",
            self.offered,
            self.stored,
            self.p99_ms,
            if self.kept_up {
                "kept up"
            } else {
                "fell behind"
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pipeline whose live capacity is `capacity`: offered 15 s of messages, it stores them
    /// at the offered rate up to that, and the last epoch's 150 ms after.
    fn pipeline(capacity: f64) -> impl FnMut(f64) -> anyhow::Result<Probe> {
        move |offered| {
            let messages = (offered * 15.0) as u64;
            let seconds = messages as f64 / offered.min(capacity) + 0.15;
            Ok(Probe::new(offered, messages, seconds, 100, 50))
        }
    }

    #[test]
    fn keeping_up_allows_two_epochs_and_three_percent_of_the_run() {
        // 15 s of messages at 50k msg/s.
        let run = |seconds| Probe::new(50_000.0, 750_000, seconds, 100, 90);
        assert!(run(15.0).kept_up);
        assert!(run(15.0 / 0.97 + 0.2).kept_up);
        assert!(!run(15.0 / 0.97 + 0.21).kept_up);
        assert_eq!(run(15.0).stored, 50_000.0);
        // A run of 2 s may end two epochs late, too.
        assert!(Probe::new(1_000.0, 2_000, 2.25, 100, 90).kept_up);
        assert!(!Probe::new(1_000.0, 2_000, 2.3, 100, 90).kept_up);
    }

    #[test]
    fn the_search_brackets_the_capacity_within_a_sixteenth() {
        for capacity in [7_000.0, 30_000.0, 52_345.0, 61_000.0, 99_000.0] {
            let found = search(100_000.0, 4, pipeline(capacity)).unwrap();
            assert_eq!(found.probes.len(), 4);
            assert!(
                found.rate <= capacity / KEEP_UP_SHARE * 1.02,
                "{capacity}: {found:?}"
            );
            assert!(
                found.rate > capacity - 100_000.0 / 16.0,
                "{capacity}: {found:?}"
            );
            if let Some(failed) = found.failed_at {
                assert!(failed > capacity, "{capacity}: {found:?}");
                assert!(failed - found.rate <= 100_000.0 / 16.0 + 1e-6);
            }
        }
        // The probes halve the interval: 1/2, then 3/4 or 1/4, and so on.
        let found = search(100_000.0, 4, pipeline(52_345.0)).unwrap();
        let offered: Vec<f64> = found.probes.iter().map(|p| p.offered).collect();
        assert_eq!(offered, [50_000.0, 75_000.0, 62_500.0, 56_250.0]);
        assert_eq!((found.rate, found.failed_at), (50_000.0, Some(56_250.0)));
    }

    #[test]
    fn a_pipeline_that_never_keeps_up_is_an_error() {
        let error = search(100_000.0, 3, pipeline(1_000.0)).unwrap_err();
        assert!(error.to_string().contains("12500"), "{error}");
        // A failing run ends the search with its error.
        let mut runs = 0;
        let error = search(100_000.0, 4, |_| {
            runs += 1;
            anyhow::bail!("broker gone")
        })
        .unwrap_err();
        assert_eq!((runs, error.to_string().as_str()), (1, "broker gone"));
        // Nonsense bounds are refused before any run.
        let refused = |upper, steps| {
            search(upper, steps, |_| -> anyhow::Result<Probe> {
                unreachable!()
            })
            .unwrap_err()
            .to_string()
        };
        assert!(refused(0.0, 4).contains("positive"));
        assert!(refused(f64::NAN, 4).contains("positive"));
        assert!(refused(1_000.0, 0).contains("at least one"));
    }
}
