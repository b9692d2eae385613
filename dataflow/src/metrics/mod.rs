//! Prometheus metrics of the dataflow, served in the text format at `GET /metrics` on
//! `--metrics-addr` (see [`server`]). One registry per process: every worker thread adds to the
//! same counters, so the endpoint serves the sum over the process's workers, and a series
//! labelled by partition comes from the one worker that reads that partition.
//!
//! Nothing here is touched per message. The source and the profile upsert count per partition
//! in plain integers of their own thread (see [`PartitionTally`]), and each worker adds those
//! counts, its partitions' lag and its tables' sizes to the shared atomics once per epoch of
//! its clock and once per completed epoch ([`WorkerMetrics`]); the Redis writer thread adds once per write call, a slice of an
//! epoch ([`WriterMetrics`]); worker 0's stats reporter counts each epoch and its latency once
//! every worker has reported it ([`Metrics::epoch_done`]), so with several processes only
//! process 0 counts epochs.

pub mod server;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::epoch::SourcePartition;
use crate::stats::EpochCounters;

pub use server::{MetricsError, MetricsServer};

/// The labels of a series kept per source partition.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    /// The topic's name (the profile topic or the item-feature topic).
    pub topic: String,
    pub partition: i32,
}

/// The labels of a series kept per worker.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// The worker's global index (over every process).
    pub worker: u64,
}

/// Every metric the dataflow exports, shared by the process's threads.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    messages_read: Family<PartitionLabels, Counter>,
    messages_invalid: Family<PartitionLabels, Counter>,
    messages_stale: Family<PartitionLabels, Counter>,
    consumer_lag: Family<PartitionLabels, Gauge>,
    epochs_completed: Counter,
    epoch_latency: Histogram,
    redis_writes: Counter,
    redis_retries: Counter,
    redis_moved: Counter,
    redis_write_latency: Histogram,
    users_held: Gauge,
    items_held: Gauge,
    kafka_silent: Family<WorkerLabels, Gauge<f64, AtomicU64>>,
    dead_letters_unacknowledged: Gauge,
    checkpoint: CheckpointMetrics,
    recommend: RecommendMetrics,
}

/// The recommendations' cost, counted per completed live epoch (see
/// [`crate::stats::RecommendCost`]).
#[derive(Debug, Default)]
struct RecommendMetrics {
    pair_updates: Counter,
    neighbour_changes: Counter,
    lists: Counter,
    seconds: Family<StageLabels, Counter<f64, AtomicU64>>,
}

impl RecommendMetrics {
    /// The values of [`StageLabels::stage`].
    const STAGES: [&'static str; 3] = ["pairs", "neighbours", "scoring"];
}

/// The labels of the recommendations' worker time: which of their stages.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    /// `pairs`, `neighbours` or `scoring`.
    stage: &'static str,
}

/// The handles a checkpoint writer thread updates.
#[derive(Debug, Clone)]
pub struct CheckpointMetrics {
    written: Counter,
    failed: Counter,
    duration: Histogram,
    newest: Gauge<f64, AtomicU64>,
}

impl CheckpointMetrics {
    /// A worker's file of the checkpoint of epoch time `time` (Unix ms) was written, taking
    /// `took` from reading the state to the last fsync.
    pub fn written(&self, time: u64, took: Duration) {
        self.written.inc();
        self.duration.observe(took.as_secs_f64());
        let seconds = time as f64 / 1e3;
        if seconds > self.newest.get() {
            self.newest.set(seconds);
        }
    }

    /// A worker's file could not be written.
    pub fn failed(&self) {
        self.failed.inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric, under the prefix `streamrec_dataflow`.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("streamrec_dataflow");
        let messages_read = Family::<PartitionLabels, Counter>::default();
        registry.register(
            "messages_read",
            "Messages read from Kafka, valid or not (not counting the replay on start), by topic \
             and partition",
            messages_read.clone(),
        );
        let messages_invalid = Family::<PartitionLabels, Counter>::default();
        registry.register(
            "messages_invalid",
            "Messages that failed validation and went to the dead-letter topic, by topic and \
             partition",
            messages_invalid.clone(),
        );
        let messages_stale = Family::<PartitionLabels, Counter>::default();
        registry.register(
            "messages_stale",
            "Valid profile messages older than the user's current profile, which change nothing, \
             by topic and partition",
            messages_stale.clone(),
        );
        let consumer_lag = Family::<PartitionLabels, Gauge>::default();
        registry.register(
            "consumer_lag",
            "Messages in the partition past the offset this run committed last (the partition's \
             end as librdkafka's statistics last reported it, once a second)",
            consumer_lag.clone(),
        );
        let epochs_completed = Counter::default();
        registry.register(
            "epochs_completed",
            "Live epochs completed on every worker and durable in Redis (process 0 only)",
            epochs_completed.clone(),
        );
        // 5 ms .. ~10 s: an epoch is usually stored within tens of milliseconds of its end, and
        // seconds mean a backlog or a slow Redis.
        let epoch_latency = Histogram::new(exponential_buckets(0.005, 2.0, 12));
        registry.register_with_unit(
            "epoch_latency",
            "Time from the end of a live epoch that changed profiles to Redis' acknowledgement \
             of its last value, the slowest worker's (process 0 only)",
            Unit::Seconds,
            epoch_latency.clone(),
        );
        let redis_writes = Counter::default();
        registry.register(
            "redis_writes",
            "Profiles Redis stored (not counting values it held newer ones of)",
            redis_writes.clone(),
        );
        let redis_retries = Counter::default();
        registry.register(
            "redis_retries",
            "Redis write attempts made again after a failure",
            redis_retries.clone(),
        );
        let redis_moved = Counter::default();
        registry.register(
            "redis_moved",
            "Redis Cluster: profiles resent to another master because their slot moved \
             (resharding) or their master kept failing (failover)",
            redis_moved.clone(),
        );
        // 0.1 ms .. ~3 s: a pipelined slice of ~150 profiles takes about a millisecond on a
        // local Redis; seconds mean retries.
        let redis_write_latency = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register_with_unit(
            "redis_write_latency",
            "Time to store one slice of an epoch's profiles in Redis, retries included",
            Unit::Seconds,
            redis_write_latency.clone(),
        );
        let users_held = Gauge::default();
        registry.register(
            "users_held",
            "Users in the workers' user tables (each user is held by one worker)",
            users_held.clone(),
        );
        let items_held = Gauge::default();
        registry.register(
            "items_held",
            "Items in the workers' item tables, summed over workers (an item with features is \
             held by every worker)",
            items_held.clone(),
        );
        let kafka_silent = Family::<WorkerLabels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "kafka_silent",
            "Time since a Kafka broker last answered the worker's consumer, as of its last \
             statistics (once a second): about a second at most while the broker is healthy, \
             growing while it hangs or is down",
            Unit::Seconds,
            kafka_silent.clone(),
        );
        let dead_letters_unacknowledged = Gauge::default();
        registry.register(
            "dead_letters_unacknowledged",
            "Dead-letter copies of invalid messages the broker has not acknowledged yet; the \
             offsets of their epochs wait for them",
            dead_letters_unacknowledged.clone(),
        );
        let checkpoint = CheckpointMetrics {
            // 10 ms .. ~40 s: a worker's file of 100,000 users takes well under a second.
            duration: Histogram::new(exponential_buckets(0.01, 2.0, 12)),
            written: Counter::default(),
            failed: Counter::default(),
            newest: Gauge::default(),
        };
        registry.register(
            "checkpoint_files_written",
            "Checkpoint files written, one per worker and checkpoint",
            checkpoint.written.clone(),
        );
        registry.register(
            "checkpoint_failures",
            "Checkpoint files that could not be written (the stream goes on; see the log)",
            checkpoint.failed.clone(),
        );
        registry.register_with_unit(
            "checkpoint_duration",
            "Time to take a worker's checkpoint: reading the state, encoding, writing, fsync",
            Unit::Seconds,
            checkpoint.duration.clone(),
        );
        registry.register(
            "checkpoint_newest_epoch_seconds",
            "Epoch time (Unix seconds) of the newest checkpoint file this process wrote: a \
             restart replays from about then; time() minus it is the checkpoint's age",
            checkpoint.newest.clone(),
        );
        let recommend = RecommendMetrics::default();
        registry.register(
            "recommend_pair_updates",
            "With recommendations: changes of co-visitation counts c(a, b) applied (each ordered \
             pair, as the users' window changes imply them)",
            recommend.pair_updates.clone(),
        );
        registry.register(
            "recommend_neighbour_changes",
            "With recommendations: entries of an item's top K neighbours that changed (entered, \
             left, or changed count)",
            recommend.neighbour_changes.clone(),
        );
        registry.register(
            "recommend_lists",
            "With recommendations: users' lists computed",
            recommend.lists.clone(),
        );
        registry.register_with_unit(
            "recommend_worker",
            "With recommendations: worker time in their operators, by stage (pairs: from the \
             windows; neighbours: the counts and top K; scoring: the lists), summed over workers",
            Unit::Seconds,
            recommend.seconds.clone(),
        );
        // Every stage's series from the start, at 0, so that a rate over them starts there.
        for stage in RecommendMetrics::STAGES {
            drop(recommend.seconds.get_or_create(&StageLabels { stage }));
        }
        Metrics {
            recommend,
            checkpoint,
            registry,
            kafka_silent,
            dead_letters_unacknowledged,
            messages_read,
            messages_invalid,
            messages_stale,
            consumer_lag,
            epochs_completed,
            epoch_latency,
            redis_writes,
            redis_retries,
            redis_moved,
            redis_write_latency,
            users_held,
            items_held,
        }
    }

    /// The metrics in the OpenMetrics text format, which Prometheus reads.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Counts a live epoch complete on every worker, with `counters` summed over them; its
    /// latency counts only if it changed profiles (an idle epoch has none).
    pub fn epoch_done(&self, counters: &EpochCounters) {
        self.epochs_completed.inc();
        let cost = &counters.recommend;
        self.recommend.pair_updates.inc_by(cost.pair_updates);
        self.recommend
            .neighbour_changes
            .inc_by(cost.neighbour_changes);
        self.recommend.lists.inc_by(cost.lists);
        let times = [cost.pairs_us, cost.neighbours_us, cost.scoring_us];
        for (stage, us) in RecommendMetrics::STAGES.into_iter().zip(times) {
            self.recommend
                .seconds
                .get_or_create(&StageLabels { stage })
                .inc_by(us as f64 / 1e6);
        }
        if counters.changed > 0 {
            self.epoch_latency
                .observe(Duration::from_millis(counters.latency_ms).as_secs_f64());
        }
    }

    /// The handles a checkpoint writer updates.
    pub fn checkpoints(&self) -> CheckpointMetrics {
        self.checkpoint.clone()
    }

    /// The handles a Redis writer thread updates.
    pub fn writer(&self) -> WriterMetrics {
        WriterMetrics {
            writes: self.redis_writes.clone(),
            retries: self.redis_retries.clone(),
            moved: self.redis_moved.clone(),
            latency: self.redis_write_latency.clone(),
            sink_retries_seen: 0,
            sink_moved_seen: 0,
        }
    }
}

/// What was counted of one partition since the counts were last taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionCounts {
    /// Messages read (not replayed).
    pub messages: u64,
    /// Of those, messages sent to the dead-letter topic.
    pub invalid: u64,
    /// Valid profile messages older than the user's current profile.
    pub stale: u64,
}

/// Counts per source partition, kept by the thread that counts. A worker reads a handful of
/// partitions, so a short vector searched from the front finds one faster than a hash would;
/// entries stay once made, so counting allocates nothing after the first messages.
#[derive(Debug, Clone, Default)]
pub struct PartitionTally {
    counts: Vec<(SourcePartition, PartitionCounts)>,
}

impl PartitionTally {
    /// The counts of `partition`, added if new.
    pub fn entry(&mut self, partition: SourcePartition) -> &mut PartitionCounts {
        let at = match self.counts.iter().position(|(p, _)| *p == partition) {
            Some(at) => at,
            None => {
                self.counts.push((partition, PartitionCounts::default()));
                self.counts.len() - 1
            }
        };
        &mut self.counts[at].1
    }

    /// Adds every count of `other`.
    pub fn add(&mut self, other: &PartitionTally) {
        for &(partition, counts) in &other.counts {
            let entry = self.entry(partition);
            entry.messages += counts.messages;
            entry.invalid += counts.invalid;
            entry.stale += counts.stale;
        }
    }

    /// Calls `each` with every partition's counts since the last call (if any), and zeroes
    /// them.
    pub fn drain(&mut self, mut each: impl FnMut(SourcePartition, PartitionCounts)) {
        for (partition, counts) in &mut self.counts {
            let taken = std::mem::take(counts);
            if taken != PartitionCounts::default() {
                each(*partition, taken);
            }
        }
    }

    /// Zeroes every count.
    pub fn clear(&mut self) {
        self.drain(|_, _| {});
    }
}

/// The series of one partition, looked up in the families once.
#[derive(Debug)]
struct PartitionSeries {
    read: Counter,
    invalid: Counter,
    stale: Counter,
    /// Made once the lag is known: a 0 before that would claim the partition was read.
    lag: Option<Gauge>,
}

/// One worker's view of the metrics, on its thread: the series of its partitions, and what it
/// last added to the process-wide gauges, which sum over workers.
#[derive(Debug)]
pub struct WorkerMetrics {
    shared: Arc<Metrics>,
    /// The names of the source topics, by their index in a [`SourcePartition`].
    topics: [String; 2],
    series: Vec<(SourcePartition, PartitionSeries)>,
    /// Users and items this worker last added to the gauges.
    held: (i64, i64),
    /// Dead-letter copies this worker last added to the gauge.
    unacknowledged: i64,
}

impl WorkerMetrics {
    /// A worker's metrics; the counters of `partitions` (the worker's share) show as 0 from now
    /// on, rather than appearing with their first message, so that a rate over them starts
    /// from the first one.
    pub fn new(shared: Arc<Metrics>, topics: [String; 2], partitions: &[SourcePartition]) -> Self {
        let mut metrics = WorkerMetrics {
            shared,
            topics,
            series: Vec::new(),
            held: (0, 0),
            unacknowledged: 0,
        };
        for &partition in partitions {
            metrics.series(partition);
        }
        metrics
    }

    fn labels(&self, partition: SourcePartition) -> PartitionLabels {
        PartitionLabels {
            topic: self
                .topics
                .get(partition.0)
                .cloned()
                .unwrap_or_else(|| format!("topic-{}", partition.0)),
            partition: partition.1,
        }
    }

    fn series(&mut self, partition: SourcePartition) -> &mut PartitionSeries {
        let at = match self.series.iter().position(|(p, _)| *p == partition) {
            Some(at) => at,
            None => {
                let labels = self.labels(partition);
                let shared = &self.shared;
                let series = PartitionSeries {
                    read: shared.messages_read.get_or_create_owned(&labels),
                    invalid: shared.messages_invalid.get_or_create_owned(&labels),
                    stale: shared.messages_stale.get_or_create_owned(&labels),
                    lag: None,
                };
                self.series.push((partition, series));
                self.series.len() - 1
            }
        };
        &mut self.series[at].1
    }

    /// Adds a partition's counts.
    pub fn add_counts(&mut self, partition: SourcePartition, counts: PartitionCounts) {
        let series = self.series(partition);
        series.read.inc_by(counts.messages);
        series.invalid.inc_by(counts.invalid);
        series.stale.inc_by(counts.stale);
    }

    /// Sets a partition's lag, in messages.
    pub fn set_lag(&mut self, partition: SourcePartition, lag: i64) {
        if let Some(gauge) = &self.series(partition).lag {
            gauge.set(lag);
            return;
        }
        let gauge = self
            .shared
            .consumer_lag
            .get_or_create_owned(&self.labels(partition));
        gauge.set(lag);
        self.series(partition).lag = Some(gauge);
    }

    /// Sets how long no broker has answered worker `worker`'s consumer, and how many of its
    /// dead-letter copies wait for an acknowledgement (summed over workers like the tables).
    pub fn set_source_health(&mut self, worker: usize, silent: Duration, unacknowledged: usize) {
        self.shared
            .kafka_silent
            .get_or_create(&WorkerLabels {
                worker: worker as u64,
            })
            .set(silent.as_secs_f64());
        let unacknowledged = i64::try_from(unacknowledged).unwrap_or(i64::MAX);
        self.shared
            .dead_letters_unacknowledged
            .inc_by(unacknowledged - self.unacknowledged);
        self.unacknowledged = unacknowledged;
    }

    /// Sets this worker's share of the users and items held. The gauges sum over workers: each
    /// adds the change since its last report, and additions commute, so the sum is exact
    /// whatever the order of the workers' reports.
    pub fn set_held(&mut self, users: usize, items: usize) {
        let users = i64::try_from(users).unwrap_or(i64::MAX);
        let items = i64::try_from(items).unwrap_or(i64::MAX);
        self.shared.users_held.inc_by(users - self.held.0);
        self.shared.items_held.inc_by(items - self.held.1);
        self.held = (users, items);
    }
}

/// The metrics a Redis writer thread updates.
#[derive(Debug)]
pub struct WriterMetrics {
    writes: Counter,
    retries: Counter,
    moved: Counter,
    latency: Histogram,
    /// The sink's own retry and moved counts when last seen (they count from its creation).
    sink_retries_seen: u64,
    sink_moved_seen: u64,
}

impl WriterMetrics {
    /// Records one write call: `stored` values in `took`, and the sink's counters so far.
    pub fn wrote(&mut self, stored: u64, took: Duration, sink: sink::SinkMetricsSnapshot) {
        self.writes.inc_by(stored);
        self.latency.observe(took.as_secs_f64());
        let (retries, moved) = (sink.retries, sink.records_moved);
        self.retries
            .inc_by(retries.saturating_sub(self.sink_retries_seen));
        self.sink_retries_seen = self.sink_retries_seen.max(retries);
        self.moved
            .inc_by(moved.saturating_sub(self.sink_moved_seen));
        self.sink_moved_seen = self.sink_moved_seen.max(moved);
    }

    /// Records a write call that failed and will be made again.
    pub fn retrying(&mut self) {
        self.retries.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> [String; 2] {
        ["profiles".to_owned(), "items".to_owned()]
    }

    #[test]
    fn tallies_count_per_partition_and_drain_once() {
        let mut tally = PartitionTally::default();
        tally.entry((0, 1)).messages += 2;
        tally.entry((0, 3)).invalid += 1;
        tally.entry((0, 1)).messages += 1;
        let mut other = PartitionTally::default();
        other.entry((0, 3)).stale += 4;
        tally.add(&other);
        let mut seen = Vec::new();
        tally.drain(|p, c| seen.push((p, c)));
        assert_eq!(
            seen,
            vec![
                (
                    (0, 1),
                    PartitionCounts {
                        messages: 3,
                        ..Default::default()
                    }
                ),
                (
                    (0, 3),
                    PartitionCounts {
                        invalid: 1,
                        stale: 4,
                        ..Default::default()
                    }
                ),
            ]
        );
        tally.drain(|p, c| panic!("drained twice: {p:?} {c:?}"));
    }

    /// The text of `metrics` as (sample name with labels, value) pairs.
    fn samples(metrics: &Metrics) -> Vec<(String, String)> {
        metrics
            .encode()
            .unwrap()
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| {
                let (name, value) = line.rsplit_once(' ').unwrap();
                (name.to_owned(), value.to_owned())
            })
            .collect()
    }

    fn value(samples: &[(String, String)], name: &str) -> Option<String> {
        samples
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    #[test]
    fn source_health_is_per_worker_and_unacknowledged_copies_add_up() {
        let shared = Arc::new(Metrics::new());
        let mut one = WorkerMetrics::new(shared.clone(), topics(), &[(0, 0)]);
        let mut two = WorkerMetrics::new(shared.clone(), topics(), &[(0, 1)]);
        one.set_source_health(0, Duration::from_millis(2500), 3);
        two.set_source_health(1, Duration::from_millis(100), 1);
        one.set_source_health(0, Duration::from_millis(7500), 2);
        let s = samples(&shared);
        assert_eq!(
            value(&s, r#"streamrec_dataflow_kafka_silent_seconds{worker="0"}"#).as_deref(),
            Some("7.5")
        );
        assert_eq!(
            value(&s, r#"streamrec_dataflow_kafka_silent_seconds{worker="1"}"#).as_deref(),
            Some("0.1")
        );
        assert_eq!(
            value(&s, "streamrec_dataflow_dead_letters_unacknowledged").as_deref(),
            Some("3")
        );
    }

    #[test]
    fn two_workers_add_up_in_one_text() {
        let shared = Arc::new(Metrics::new());
        let mut one = WorkerMetrics::new(shared.clone(), topics(), &[(0, 0), (1, 0)]);
        let mut two = WorkerMetrics::new(shared.clone(), topics(), &[(0, 1)]);
        one.add_counts(
            (0, 0),
            PartitionCounts {
                messages: 5,
                invalid: 1,
                stale: 2,
            },
        );
        two.add_counts(
            (0, 1),
            PartitionCounts {
                messages: 7,
                ..Default::default()
            },
        );
        two.add_counts(
            (0, 1),
            PartitionCounts {
                messages: 1,
                ..Default::default()
            },
        );
        one.set_lag((0, 0), 12);
        one.set_held(10, 3);
        two.set_held(4, 3);
        one.set_held(11, 2);
        let mut writer = shared.writer();
        let sink = |retries, records_moved| sink::SinkMetricsSnapshot {
            retries,
            records_moved,
            ..Default::default()
        };
        writer.wrote(20, Duration::from_millis(3), sink(0, 0));
        writer.retrying();
        writer.wrote(5, Duration::from_millis(2), sink(2, 4));
        writer.wrote(0, Duration::from_millis(1), sink(2, 7));
        shared.epoch_done(&EpochCounters {
            changed: 3,
            latency_ms: 40,
            recommend: crate::stats::RecommendCost {
                pair_updates: 180,
                neighbour_changes: 4,
                lists: 3,
                pairs_us: 50_000,
                neighbours_us: 150_000,
                scoring_us: 50_000,
            },
            ..Default::default()
        });
        shared.epoch_done(&EpochCounters::default());

        let s = samples(&shared);
        let p0 = r#"{topic="profiles",partition="0"}"#;
        let p1 = r#"{topic="profiles",partition="1"}"#;
        let items = r#"{topic="items",partition="0"}"#;
        for (name, expected) in [
            (format!("streamrec_dataflow_messages_read_total{p0}"), "5"),
            (
                format!("streamrec_dataflow_messages_invalid_total{p0}"),
                "1",
            ),
            (format!("streamrec_dataflow_messages_stale_total{p0}"), "2"),
            (format!("streamrec_dataflow_messages_read_total{p1}"), "8"),
            (
                format!("streamrec_dataflow_messages_invalid_total{p1}"),
                "0",
            ),
            // Made at 0 for a partition the worker reads, before any message.
            (
                format!("streamrec_dataflow_messages_read_total{items}"),
                "0",
            ),
            (format!("streamrec_dataflow_consumer_lag{p0}"), "12"),
            ("streamrec_dataflow_users_held".to_owned(), "15"),
            ("streamrec_dataflow_items_held".to_owned(), "5"),
            ("streamrec_dataflow_redis_writes_total".to_owned(), "25"),
            ("streamrec_dataflow_redis_retries_total".to_owned(), "3"),
            ("streamrec_dataflow_redis_moved_total".to_owned(), "7"),
            (
                "streamrec_dataflow_redis_write_latency_seconds_count".to_owned(),
                "3",
            ),
            ("streamrec_dataflow_epochs_completed_total".to_owned(), "2"),
            (
                "streamrec_dataflow_recommend_pair_updates_total".to_owned(),
                "180",
            ),
            (
                "streamrec_dataflow_recommend_neighbour_changes_total".to_owned(),
                "4",
            ),
            ("streamrec_dataflow_recommend_lists_total".to_owned(), "3"),
            (
                r#"streamrec_dataflow_recommend_worker_seconds_total{stage="neighbours"}"#
                    .to_owned(),
                "0.15",
            ),
            (
                r#"streamrec_dataflow_recommend_worker_seconds_total{stage="scoring"}"#.to_owned(),
                "0.05",
            ),
            // The idle epoch has no latency.
            (
                "streamrec_dataflow_epoch_latency_seconds_count".to_owned(),
                "1",
            ),
            (
                r#"streamrec_dataflow_epoch_latency_seconds_bucket{le="0.04"}"#.to_owned(),
                "1",
            ),
            (
                r#"streamrec_dataflow_epoch_latency_seconds_bucket{le="0.02"}"#.to_owned(),
                "0",
            ),
        ] {
            assert_eq!(
                value(&s, &name).as_deref(),
                Some(expected),
                "{name} in {s:#?}"
            );
        }
        // No lag was reported for partition 1: no series, rather than a made-up 0.
        assert_eq!(
            value(&s, &format!("streamrec_dataflow_consumer_lag{p1}")),
            None
        );
    }

    #[test]
    fn the_text_declares_every_family_and_ends_with_eof() {
        let shared = Arc::new(Metrics::new());
        let mut worker = WorkerMetrics::new(shared.clone(), topics(), &[(0, 2)]);
        worker.set_lag((0, 2), 1);
        // Two files of one checkpoint and one of an older one, out of order, and a failure.
        let checkpoints = shared.checkpoints();
        checkpoints.written(1_700_000_060_000, Duration::from_millis(300));
        checkpoints.written(1_700_000_000_000, Duration::from_millis(200));
        checkpoints.written(1_700_000_060_000, Duration::from_millis(400));
        checkpoints.failed();
        let text = shared.encode().unwrap();
        let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(families, 21, "{text}");
        // Every sample of a declared family, numeric, and `# EOF` last.
        let samples = testkit::prometheus::parse_exposition(&text);
        assert_eq!(
            samples["streamrec_dataflow_checkpoint_files_written_total"],
            3.0
        );
        assert_eq!(samples["streamrec_dataflow_checkpoint_failures_total"], 1.0);
        assert_eq!(
            samples["streamrec_dataflow_checkpoint_duration_seconds_count"],
            3.0
        );
        assert_eq!(
            samples["streamrec_dataflow_checkpoint_newest_epoch_seconds"], 1_700_000_060.0,
            "the newest, not the last written"
        );
    }
}
