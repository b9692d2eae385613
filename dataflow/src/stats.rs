//! Per-epoch statistics: what each worker counted, summed over all workers, printed as one line
//! per epoch (or a JSON line with `--stats-json`) and as a summary at exit.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Write;
use std::rc::Rc;

use serde::{Deserialize, Serialize};

use crate::metrics::PartitionTally;
use crate::state::items::ItemTable;
use crate::state::users::UserTable;

/// What happened in one epoch (on one worker, or summed over all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochCounters {
    /// Profile and item-feature messages read.
    pub messages: u64,
    /// Messages that failed validation and went to the dead-letter topic.
    pub invalid: u64,
    /// Valid profile messages older than the user's current profile.
    pub stale: u64,
    /// Users whose profile changed (the values written).
    pub changed: u64,
    /// Values Redis stored (the rest were older than what it held).
    pub redis_writes: u64,
    /// Of those, values written plain, without the no-regression check (`--checked-writes`).
    #[serde(default)]
    pub plain_writes: u64,
    /// Milliseconds from the epoch's end to Redis' acknowledgement (the worst worker's).
    pub latency_ms: u64,
    /// Values Redis refused for good (their key holds another type, e.g. a hash another
    /// program put there), sent to the dead-letter topic instead.
    #[serde(default)]
    pub redis_rejected: u64,
    /// With recommendations: the cost of the epoch's recommendations (see [`RecommendCost`]).
    /// Not `flatten`ed: these counters cross processes in timely's bincode, which cannot size a
    /// flattened struct (it becomes a map of unknown length).
    #[serde(default)]
    pub recommend: RecommendCost,
}

/// What the recommendations cost in one epoch (on one worker, or summed over all): the
/// co-visitation's changes and the lists computed, and the worker time their operators took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RecommendCost {
    /// Changes of c(a, b) applied, as the users' window changes imply them (both directions
    /// count; changes of one pair from different users are not combined first).
    #[serde(default)]
    pub pair_updates: u64,
    /// Entries of some item's top K neighbours that changed: entered, left, or changed count.
    #[serde(default)]
    pub neighbour_changes: u64,
    /// Users' lists computed.
    #[serde(default)]
    pub lists: u64,
    /// Microseconds of worker time, summed over workers, in reducing each changed user's
    /// windows to what left, stayed and entered ...
    #[serde(default)]
    pub pairs_us: u64,
    /// ... in keeping the counts (the pairs each window change implies, and n(x)) and the
    /// neighbours ...
    #[serde(default)]
    pub neighbours_us: u64,
    /// ... and in the scoring (applying the items' changes to each worker's copy, and the
    /// lists). The popularity order is not timed.
    #[serde(default)]
    pub scoring_us: u64,
}

impl RecommendCost {
    /// Adds another worker's (or epoch's) cost.
    pub fn add(&mut self, other: &RecommendCost) {
        self.pair_updates += other.pair_updates;
        self.neighbour_changes += other.neighbour_changes;
        self.lists += other.lists;
        self.pairs_us += other.pairs_us;
        self.neighbours_us += other.neighbours_us;
        self.scoring_us += other.scoring_us;
    }

    /// The worker time of the three stages.
    pub fn total_us(&self) -> u64 {
        self.pairs_us + self.neighbours_us + self.scoring_us
    }

    /// Whether the epoch had any (with recommendations off, never).
    pub fn is_empty(&self) -> bool {
        *self == RecommendCost::default()
    }
}

impl EpochCounters {
    /// Adds another worker's counts; latency is the maximum, since the epoch is done when the
    /// slowest worker is.
    pub fn add(&mut self, other: &EpochCounters) {
        self.messages += other.messages;
        self.invalid += other.invalid;
        self.stale += other.stale;
        self.changed += other.changed;
        self.redis_writes += other.redis_writes;
        self.plain_writes += other.plain_writes;
        self.redis_rejected += other.redis_rejected;
        self.recommend.add(&other.recommend);
        self.latency_ms = self.latency_ms.max(other.latency_ms);
    }

    /// Whether anything happened.
    pub fn is_idle(&self) -> bool {
        self.messages == 0 && self.changed == 0
    }
}

/// One worker's counters by epoch, filled by the main loop and the operators of the same worker
/// thread, drained once an epoch is complete; and, for the metrics, its stale messages by
/// partition and the tables whose sizes are reported.
#[derive(Debug, Default)]
pub struct StatsBoard {
    epochs: BTreeMap<u64, EpochCounters>,
    /// Stale messages of live epochs by partition, since last taken (see [`crate::metrics`]).
    pub stale: PartitionTally,
    /// The worker's user and item tables, once the dataflow that holds them is built.
    tables: Option<WorkerTables>,
}

/// A worker's user and item tables, shared with its operators.
type WorkerTables = (Rc<RefCell<UserTable>>, Rc<RefCell<ItemTable>>);

impl StatsBoard {
    /// Lets [`held`](Self::held) report the sizes of the worker's tables.
    pub fn watch_tables(&mut self, users: Rc<RefCell<UserTable>>, items: Rc<RefCell<ItemTable>>) {
        self.tables = Some((users, items));
    }

    /// The users and items the worker's tables hold, if they are known and not borrowed (they
    /// are only while an operator runs, and the worker loop asks between steps).
    pub fn held(&self) -> Option<(usize, usize)> {
        let (users, items) = self.tables.as_ref()?;
        Some((
            users.try_borrow().ok()?.len(),
            items.try_borrow().ok()?.len(),
        ))
    }

    /// The counters of `epoch`.
    pub fn epoch(&mut self, epoch: u64) -> &mut EpochCounters {
        self.epochs.entry(epoch).or_default()
    }

    /// Removes and returns the counters of every epoch before `frontier`.
    pub fn drain_before(&mut self, frontier: u64) -> Vec<(u64, EpochCounters)> {
        let later = self.epochs.split_off(&frontier);
        std::mem::replace(&mut self.epochs, later)
            .into_iter()
            .collect()
    }
}

/// One epoch's line: for people, or a JSON object with `--stats-json`.
pub fn format_epoch(epoch: u64, counters: &EpochCounters, epoch_ms: u64, json: bool) -> String {
    let rate = counters.messages as f64 * 1000.0 / epoch_ms.max(1) as f64;
    if json {
        let mut line = serde_json::json!({
            "epoch": epoch,
            "messages": counters.messages,
            "invalid": counters.invalid,
            "stale": counters.stale,
            "changed": counters.changed,
            "redis_writes": counters.redis_writes,
            "plain_writes": counters.plain_writes,
            "redis_rejected": counters.redis_rejected,
            "latency_ms": counters.latency_ms,
            "messages_per_second": rate.round(),
        });
        if !counters.recommend.is_empty() {
            line["recommend"] = serde_json::json!(counters.recommend);
        }
        line.to_string()
    } else {
        let mut line = format!(
            "epoch {epoch}  messages {:>7}  invalid {:>5}  stale {:>5}  changed {:>7}  \
             redis_writes {:>7} ({:>7} plain)  latency {:>5} ms  {:>9.0} msg/s",
            counters.messages,
            counters.invalid,
            counters.stale,
            counters.changed,
            counters.redis_writes,
            counters.plain_writes,
            counters.latency_ms,
            rate
        );
        if !counters.recommend.is_empty() {
            let cost = &counters.recommend;
            line += &format!(
                "  pair_updates {:>8}  neighbour_changes {:>7}  lists {:>7}  recommend {:>6.1} ms \
                 (pairs {:.1}, neighbours {:.1}, scoring {:.1})",
                cost.pair_updates,
                cost.neighbour_changes,
                cost.lists,
                cost.total_us() as f64 / 1e3,
                cost.pairs_us as f64 / 1e3,
                cost.neighbours_us as f64 / 1e3,
                cost.scoring_us as f64 / 1e3,
            );
        }
        line
    }
}

/// Where the stats lines go (stdout in the binary). A reader that goes away (`dataflow | head`,
/// a crashed log shipper) ends the stats, not the dataflow: the first failed write is logged,
/// and the lines after it are dropped. Stats are a report on the work, not part of it, and
/// `println!` would panic the worker on a closed pipe, stopping every epoch.
#[derive(Debug)]
pub struct StatsOut<W: Write> {
    out: Option<W>,
}

impl<W: Write> StatsOut<W> {
    pub fn new(out: W) -> Self {
        StatsOut { out: Some(out) }
    }

    /// Writes `line` and a newline, flushed so that a reader sees each epoch as it ends.
    pub fn line(&mut self, line: &str) {
        let Some(out) = &mut self.out else {
            return;
        };
        if let Err(error) = writeln!(out, "{line}").and_then(|()| out.flush()) {
            tracing::error!(%error, "cannot write the stats to stdout: no more stats lines, the dataflow goes on");
            self.out = None;
        }
    }

    /// Whether lines are still written.
    pub fn is_open(&self) -> bool {
        self.out.is_some()
    }
}

/// The summary printed at exit.
pub fn format_summary(totals: &EpochCounters, epochs: u64, seconds: f64) -> String {
    format!(
        "summary: {epochs} epochs in {seconds:.1} s, {} messages ({:.0}/s), {} invalid, {} stale, \
         {} profiles changed, {} Redis writes ({} plain), worst epoch latency {} ms",
        totals.messages,
        totals.messages as f64 / seconds.max(1e-9),
        totals.invalid,
        totals.stale,
        totals.changed,
        totals.redis_writes,
        totals.plain_writes,
        totals.latency_ms
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_say_what_happened() {
        let counters = EpochCounters {
            messages: 50,
            changed: 40,
            redis_writes: 39,
            plain_writes: 30,
            latency_ms: 12,
            ..Default::default()
        };
        let line = format_epoch(1_000, &counters, 100, false);
        assert!(
            line.contains("messages      50")
                && line.contains("500 msg/s")
                && line.contains("(     30 plain)"),
            "{line}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&format_epoch(1_000, &counters, 100, true)).unwrap();
        assert_eq!(json["redis_writes"], 39);
        assert_eq!(json["plain_writes"], 30);
        assert_eq!(json["messages_per_second"], 500.0);
        assert!(
            json.get("recommend").is_none(),
            "no recommendation fields when off"
        );
        let with_recommendations = EpochCounters {
            recommend: RecommendCost {
                pair_updates: 180,
                neighbour_changes: 7,
                lists: 2,
                pairs_us: 200,
                neighbours_us: 1_000,
                scoring_us: 300,
            },
            ..counters
        };
        let line = format_epoch(1_000, &with_recommendations, 100, false);
        assert!(
            line.contains("pair_updates      180")
                && line.contains("recommend    1.5 ms (pairs 0.2, neighbours 1.0, scoring 0.3)"),
            "{line}"
        );
        let json = format_epoch(1_000, &with_recommendations, 100, true);
        let parsed: EpochCounters = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed.recommend, with_recommendations.recommend, "{json}");
    }

    /// Between processes, timely sends the counters in bincode, which must size them first.
    #[test]
    fn counters_cross_processes_in_bincode() {
        let counters = EpochCounters {
            messages: 3,
            recommend: RecommendCost {
                pair_updates: 180,
                scoring_us: 9,
                ..Default::default()
            },
            ..Default::default()
        };
        let bytes = bincode::serialize(&(7u64, counters)).unwrap();
        let back: (u64, EpochCounters) = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, (7, counters));
    }

    /// A writer whose reader has gone after `room` bytes, like a closed pipe.
    struct ClosedAfter {
        room: usize,
        taken: Vec<u8>,
    }

    impl Write for ClosedAfter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.taken.len() + buf.len() > self.room {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            self.taken.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_closed_output_ends_the_lines_without_a_panic() {
        let mut out = StatsOut::new(ClosedAfter {
            room: 12,
            taken: Vec::new(),
        });
        out.line("epoch 1");
        assert!(out.is_open());
        out.line("epoch 2");
        assert!(!out.is_open(), "the failed write closes the output");
        out.line("epoch 3");
        assert!(!out.is_open());
    }

    #[test]
    fn drains_only_complete_epochs() {
        let mut board = StatsBoard::default();
        board.epoch(100).messages = 3;
        board.epoch(200).stale = 1;
        board.epoch(300).changed = 2;
        let done = board.drain_before(300);
        assert_eq!(
            done.iter().map(|(e, _)| *e).collect::<Vec<_>>(),
            vec![100, 200]
        );
        assert_eq!(board.drain_before(301)[0].1.changed, 2);
        assert!(board.drain_before(u64::MAX).is_empty());
    }

    #[test]
    fn sums_counts_and_takes_the_worst_latency() {
        let mut total = EpochCounters {
            messages: 1,
            latency_ms: 5,
            ..Default::default()
        };
        total.add(&EpochCounters {
            messages: 2,
            latency_ms: 3,
            redis_writes: 4,
            recommend: RecommendCost {
                lists: 2,
                ..Default::default()
            },
            ..Default::default()
        });
        assert_eq!(
            (
                total.messages,
                total.latency_ms,
                total.redis_writes,
                total.recommend.lists
            ),
            (3, 5, 4, 2)
        );
    }
}
