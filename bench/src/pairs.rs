//! `bench --recommendations-pairs N`: what recommendations cost the pipeline's rate, as the
//! ratio of end-to-end runs with `--recommendations on` and `off` on the same preloaded topic.
//!
//! The runs alternate, off first, each pair back to back, so that a pair shares the machine's
//! state of the moment: on this shared machine a run's rate moves by a third from one minute to
//! the next, more than the code changes being compared. The median of the pairs' ratios is
//! the figure; every pair is kept beside it.

use serde::Serialize;

use crate::dataflow_core::middle;
use crate::e2e::{EndToEnd, RecommendSummary};
use crate::summary::ratio_or_nan;

/// One pair's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PairFigures {
    pub off_msgs_per_s: f64,
    pub on_msgs_per_s: f64,
    /// On over off.
    pub ratio: f64,
    /// The dataflow's CPU a message, in µs, off and on.
    pub off_dataflow_us: Option<f64>,
    pub on_dataflow_us: Option<f64>,
    /// The dataflow's peak resident memory (`VmHWM`), in kB, off and on.
    pub off_peak_rss_kb: Option<u64>,
    pub on_peak_rss_kb: Option<u64>,
    /// What the recommendations' stages did and took in the run with them on.
    pub on_recommend: Option<RecommendSummary>,
    /// The same of the run with them off: none, or the switch did not reach the dataflow.
    pub off_recommend: Option<RecommendSummary>,
    /// Messages each run read and stored.
    pub messages: u64,
}

impl PairFigures {
    /// The figures of the runs `off` and `on`.
    pub fn new(off: &EndToEnd, on: &EndToEnd) -> Self {
        PairFigures {
            off_msgs_per_s: off.rate(),
            on_msgs_per_s: on.rate(),
            ratio: ratio_or_nan(on.rate(), off.rate()),
            off_dataflow_us: off.cpu.dataflow_us,
            on_dataflow_us: on.cpu.dataflow_us,
            off_peak_rss_kb: off.peak_rss_kb,
            on_peak_rss_kb: on.peak_rss_kb,
            on_recommend: on.recommend_cost(),
            off_recommend: off.recommend_cost(),
            messages: on.messages.min(off.messages),
        }
    }
}

/// Every pair and the median of their ratios.
#[derive(Debug, Clone, Serialize)]
pub struct PairsReport {
    pub pairs: Vec<PairFigures>,
    pub median_ratio: f64,
}

impl PairsReport {
    /// The report of `pairs`, in the order they ran.
    pub fn new(pairs: Vec<PairFigures>) -> Self {
        let ratios: Vec<f64> = pairs.iter().map(|pair| pair.ratio).collect();
        PairsReport {
            median_ratio: median(&ratios),
            pairs,
        }
    }

    /// A table of the pairs and a line with the median.
    pub fn render(&self) -> String {
        let us = |value: Option<f64>| value.map_or("?".to_owned(), |v| format!("{v:.1}"));
        let gb =
            |kb: Option<u64>| kb.map_or("?".to_owned(), |kb| format!("{:.2}", kb as f64 / 1e6));
        let mut out = format!(
            "{:>4} {:>11} {:>11} {:>7} {:>22} {:>16} {:>22}\n",
            "pair",
            "off msg/s",
            "on msg/s",
            "on/off",
            "dataflow µs/msg off/on",
            "peak GB off/on",
            "pair updates, lists/msg"
        );
        for (at, pair) in self.pairs.iter().enumerate() {
            let work = pair.on_recommend.as_ref().map_or("?".to_owned(), |cost| {
                let per = |value: u64| value as f64 / cost.messages.max(1) as f64;
                format!(
                    "{:.1}, {:.2}",
                    per(cost.total.pair_updates),
                    per(cost.total.lists)
                )
            });
            out.push_str(&format!(
                "{:>4} {:>11.0} {:>11.0} {:>6.2}x {:>22} {:>16} {:>22}\n",
                at + 1,
                pair.off_msgs_per_s,
                pair.on_msgs_per_s,
                pair.ratio,
                format!("{} / {}", us(pair.off_dataflow_us), us(pair.on_dataflow_us)),
                format!("{} / {}", gb(pair.off_peak_rss_kb), gb(pair.on_peak_rss_kb)),
                work
            ));
        }
        out.push_str(&format!(
            "recommendations on / off, median of {} pairs: {:.2}x (target: at least 0.5x)",
            self.pairs.len(),
            self.median_ratio
        ));
        out
    }
}

/// The median of `values` (the mean of the middle two for an even count); NaN for none. NaNs
/// (a run that measured nothing) sort last.
pub fn median(values: &[f64]) -> f64 {
    middle(values, f64::total_cmp).map_or(f64::NAN, |(low, high)| (low + high) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_value_or_the_mean_of_the_middle_two() {
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[0.3]), 0.3);
        assert_eq!(median(&[0.5, 0.2, 0.3]), 0.3);
        assert_eq!(median(&[0.4, 0.2, 0.3, 0.1]), 0.25);
    }

    #[test]
    fn the_report_lists_every_pair_and_the_median_ratio() {
        let pair = |off: f64, on: f64| PairFigures {
            off_msgs_per_s: off,
            on_msgs_per_s: on,
            ratio: ratio_or_nan(on, off),
            off_dataflow_us: Some(12.0),
            on_dataflow_us: Some(40.0),
            off_peak_rss_kb: Some(480_000),
            on_peak_rss_kb: None,
            on_recommend: None,
            off_recommend: None,
            messages: 200_000,
        };
        let report = PairsReport::new(vec![
            pair(100_000.0, 40_000.0),
            pair(120_000.0, 36_000.0),
            pair(90_000.0, 45_000.0),
        ]);
        assert_eq!(report.median_ratio, 0.4);
        let text = report.render();
        assert_eq!(text.lines().count(), 5, "{text}");
        assert!(text.contains("0.30x") && text.contains("0.50x"), "{text}");
        assert!(text.contains("0.48 / ?"), "{text}");
        assert!(
            text.ends_with("median of 3 pairs: 0.40x (target: at least 0.5x)"),
            "{text}"
        );
    }
}
