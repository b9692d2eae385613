//! The Kafka source of one worker: reads its share of the profile and item-feature partitions,
//! validates every message (semantics §2, §3), copies invalid ones to the dead-letter topic, and
//! commits offsets only for epochs whose output Redis has acknowledged.
//!
//! Partitions are assigned, not subscribed: partition `p` of every topic belongs to the worker
//! with global index `p mod workers`, the same on every run and every process, so no rebalance
//! can move a partition while an epoch is open.
//!
//! On start the source first replays its partitions up to the group's committed offsets, to
//! rebuild the state (see [`crate::replay`]), and only then reads on from those offsets.
//!
//! It also keeps the read marks of its profile partitions in Redis ahead of what it hands the
//! dataflow, and tells when it has caught up with the marks it found at start, after which its
//! epochs' values may be written plain (see [`crate::catch_up`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use profile::{Encoding, ItemFeaturesMessage, ProfileMessageView};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};

use crate::catch_up::{CatchUp, Marks, NeverPlain, PartitionStart};
use crate::epoch::{OffsetLedger, SourcePartition};
use crate::model::{FeatureEvent, FeatureVector, ProfileEvent};
use crate::replay::{Read, Replay};

/// What the source needs to know.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub brokers: String,
    pub group: String,
    pub profile_topic: String,
    pub item_topic: String,
    pub dlq_topic: String,
    pub encoding: Encoding,
    pub max_history: usize,
    pub dim: usize,
    /// The Redis the sink writes to, which holds the read marks.
    pub redis: String,
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic {topic:?} does not exist on {brokers} (scripts/services.sh start creates it)")]
    MissingTopic { topic: String, brokers: String },
    #[error(transparent)]
    ReadMarks(#[from] sink::SinkError),
}

/// The messages of one poll, already validated.
#[derive(Debug, Default)]
pub struct Polled {
    pub profiles: Vec<ProfileEvent>,
    pub features: Vec<FeatureEvent>,
    /// Messages read, valid or not, not counting replayed ones.
    pub messages: u64,
    /// Messages that went to the dead-letter topic.
    pub invalid: u64,
    /// Messages replayed to rebuild the state (valid ones are in `profiles` and `features`).
    pub replayed: u64,
}

/// Counts dead-letter copies the broker did not take, so offsets wait for them.
#[derive(Debug, Default)]
struct DlqContext {
    failed: AtomicU64,
}

impl ClientContext for DlqContext {}

impl ProducerContext for DlqContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "a dead-letter copy was not stored");
        }
    }
}

/// The consumer's context. librdkafka reports each end of a partition, which the replay asks
/// for (`enable.partition.eof`), to the error callback as well as to `poll`; those are news,
/// not errors. Its statistics tell where each profile partition ends, as the fetches found it,
/// for the catch-up (see [`crate::catch_up`]).
#[derive(Debug)]
struct SourceContext {
    profile_topic: String,
    /// Profile partition → its high watermark in the last statistics.
    ends: std::sync::Mutex<BTreeMap<i32, i64>>,
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if let KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF) =
            error
        {
            tracing::trace!(reason, "end of partition");
        } else {
            tracing::error!(%error, reason, "librdkafka error");
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        let Some(topic) = statistics.topics.get(&self.profile_topic) else {
            return;
        };
        if let Ok(mut ends) = self.ends.lock() {
            for (&partition, stats) in &topic.partitions {
                // -1 until a fetch (or offset query) of the partition has answered.
                if partition >= 0 && stats.hi_offset >= 0 {
                    ends.insert(partition, stats.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {}

const PROFILE_TOPIC: usize = 0;
const ITEM_TOPIC: usize = 1;

/// One worker's Kafka reader.
pub struct KafkaSource {
    config: SourceConfig,
    consumer: BaseConsumer<SourceContext>,
    dlq: ThreadedProducer<DlqContext>,
    topics: [String; 2],
    ledger: OffsetLedger,
    assigned: Vec<SourcePartition>,
    /// While the state is rebuilt, the replay.
    replay: Option<Replay>,
    /// The profile partitions' read marks, in Redis and as last raised.
    read_marks: sink::ReadMarks,
    marks: Marks,
    /// What is left to read before the worker is caught up.
    catch_up: CatchUp,
    warnings: Warnings,
}

/// Lets through at most one warning a second, counting the rest, so a stream of bad messages
/// or a broker outage cannot flood the log.
#[derive(Debug, Default)]
struct Warnings {
    last: Option<Instant>,
    suppressed: u64,
}

impl Warnings {
    fn warn(&mut self, log: impl FnOnce()) {
        let now = Instant::now();
        if self
            .last
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(1))
        {
            if self.suppressed > 0 {
                tracing::warn!(suppressed = self.suppressed, "similar warnings suppressed");
                self.suppressed = 0;
            }
            self.last = Some(now);
            log();
        } else {
            self.suppressed += 1;
        }
    }
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("assigned", &self.assigned)
            .finish_non_exhaustive()
    }
}

/// The partitions of a topic with `partitions` partitions that belong to worker `index` of
/// `peers`: those congruent to it modulo `peers`.
pub fn assigned_partitions(partitions: usize, index: usize, peers: usize) -> Vec<i32> {
    (0..partitions)
        .filter(|p| p % peers.max(1) == index)
        .map(|p| p as i32)
        .collect()
}

impl KafkaSource {
    /// Connects, finds the partitions, and assigns this worker its share: first from the
    /// beginning, to replay each partition up to the group's committed offset, if it has one;
    /// then (see [`poll`](Self::poll)) from that offset, or from the beginning for a partition
    /// never committed.
    pub fn new(config: SourceConfig, index: usize, peers: usize) -> Result<Self, SourceError> {
        let consumer: BaseConsumer<SourceContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            // Committed offsets of this group say where to resume after a restart.
            .set("group.id", &config.group)
            // Offsets are committed by hand, only once an epoch is durable in Redis.
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A partition with no committed offset is read from its start: nothing is skipped.
            .set("auto.offset.reset", "earliest")
            // Tells the replay on start that a partition is read to its end, even if the offsets
            // just below the committed one are missing (compaction, transaction markers).
            .set("enable.partition.eof", "true")
            // tansu (and any broker) answers a fetch with no new data only after this wait;
            // a short wait keeps epochs closing on time and throughput up (20x with tansu).
            .set("fetch.wait.max.ms", "5")
            // Prefetch a few polls ahead (a poll takes at most --max-poll-records messages,
            // 4 MB of 1 KB profiles by default), bounded in memory: 16 MB per worker. 64 MB
            // read no faster here and cost 96 MB more RSS on two workers.
            .set("queued.max.messages.kbytes", "16384")
            // Once that prefetch is full (the worker is busy computing an epoch), librdkafka
            // postpones the partition's next fetch by this long, 1 s by default: the worker
            // then drained the queue in a few ms and sat idle for the rest of the second. A
            // few ms keeps the queue topped up at the cost of a few more queue checks.
            .set("fetch.queue.backoff.ms", "5")
            // The statistics carry each partition's end as the fetches report it, which the
            // catch-up waits for (tansu's answer to an offset query falls short of it). Once a
            // second: a start-up waits at most that long more, and the parsing costs nothing.
            .set("statistics.interval.ms", "1000")
            .create_with_context(SourceContext {
                profile_topic: config.profile_topic.clone(),
                ends: std::sync::Mutex::default(),
            })?;
        let dlq: ThreadedProducer<DlqContext> = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            // A dead-letter copy is kept as long as the broker is down: offsets wait for it.
            .set("message.timeout.ms", "0")
            // The copy must survive a broker failure like any message.
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .create_with_context(DlqContext::default())?;

        let topics = [config.profile_topic.clone(), config.item_topic.clone()];
        let mut assigned = Vec::new();
        for (topic_index, topic) in topics.iter().enumerate() {
            let partitions = partition_count(&consumer, topic)?;
            if partitions == 0 {
                if topic_index == PROFILE_TOPIC {
                    return Err(SourceError::MissingTopic {
                        topic: topic.clone(),
                        brokers: config.brokers.clone(),
                    });
                }
                if index == 0 {
                    tracing::warn!(topic, "item topic does not exist: no live feature updates");
                }
                continue;
            }
            for partition in assigned_partitions(partitions, index, peers) {
                assigned.push((topic_index, partition));
            }
        }
        let offsets = start_offsets(&consumer, &topics, &assigned)?;
        let mut read_marks = sink::ReadMarks::connect(
            &config.redis,
            &config.profile_topic,
            Duration::from_secs(10),
        )?;
        let (marks, catch_up) = plan_catch_up(&offsets, &mut read_marks)?;
        match catch_up.never_plain() {
            Some(NeverPlain::UnknownOrigin) if index == 0 => tracing::info!(
                key = read_marks.key(),
                "Redis held values before the read marks were created: every write goes \
                 through the no-regression script (start on an empty database for plain writes)"
            ),
            Some(NeverPlain::Deleted { partition }) => tracing::info!(
                worker = index,
                partition,
                "messages an earlier run may have written from were deleted (retention or \
                 compaction), so the rebuilt state may lack them: every write goes through \
                 the no-regression script"
            ),
            _ => {}
        }
        if catch_up.never_plain().is_none() && !catch_up.is_done() {
            tracing::info!(
                worker = index,
                targets = ?catch_up.pending(),
                "reading up to the read marks before writing plain"
            );
        }
        let replay = plan_replay(&offsets);
        let replay = if replay.is_done() {
            consumer.assign(&live_assignment(&topics, &assigned, None)?)?;
            tracing::info!(worker = index, partitions = ?assigned, "assigned partitions");
            None
        } else {
            let mut replaying = TopicPartitionList::new();
            for (topic, partition) in replay.partitions() {
                replaying.add_partition_offset(&topics[topic], partition, Offset::Beginning)?;
            }
            consumer.assign(&replaying)?;
            tracing::info!(
                worker = index,
                partitions = ?assigned,
                "assigned partitions; replaying up to the committed offsets first"
            );
            Some(replay)
        };
        Ok(KafkaSource {
            config,
            consumer,
            dlq,
            topics,
            ledger: OffsetLedger::default(),
            assigned,
            replay,
            read_marks,
            marks,
            catch_up,
            warnings: Warnings::default(),
        })
    }

    /// Whether every profile partition of this worker is read up to the read mark it had at
    /// start, so that from the epoch of its last read on, no value of this worker's input can
    /// be older than one an earlier run wrote.
    pub fn is_caught_up(&self) -> bool {
        self.catch_up.is_done()
    }

    /// Whether the source is still replaying (and so reads in replay epochs, see [`crate::replay`]).
    pub fn is_replaying(&self) -> bool {
        self.replay.is_some()
    }

    /// Reads at most `max` messages that are already here (no waiting), as epoch `epoch`.
    ///
    /// While the source replays, the messages are those below the committed offsets (for a
    /// replay epoch), without offsets to commit or dead-letter copies, which their first
    /// reading made; the poll stops where the replay ends, and the next one reads live.
    pub fn poll(&mut self, epoch: u64, max: u64) -> Polled {
        let mut polled = Polled::default();
        for _ in 0..max {
            let message = match self.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(message)) => message,
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    // Caught up with a partition: news only to a replay.
                    if let Some(replay) = &mut self.replay {
                        replay.end_of_partition(partition);
                        if replay.is_done() {
                            break;
                        }
                    }
                    continue;
                }
                Some(Err(error)) => {
                    // A broker or network hiccup: librdkafka reconnects by itself.
                    self.warnings
                        .warn(|| tracing::warn!(%error, "Kafka consumer error"));
                    break;
                }
            };
            let topic = if message.topic() == self.topics[PROFILE_TOPIC] {
                PROFILE_TOPIC
            } else {
                ITEM_TOPIC
            };
            let position = (message.partition(), message.offset());
            let replayed = match &mut self.replay {
                None => false,
                Some(replay) => match replay.read((topic, position.0), position.1) {
                    Read::Replay => true,
                    Read::Later => continue,
                },
            };
            if topic == PROFILE_TOPIC {
                self.catch_up.read(position.0, position.1);
                if !replayed {
                    if let Some(mark) = self.marks.raise_for(position.0, position.1) {
                        raise_mark(
                            &mut self.read_marks,
                            &mut self.marks,
                            &mut self.warnings,
                            position.0,
                            mark,
                        );
                    }
                }
            }
            if replayed {
                polled.replayed += 1;
            } else {
                self.ledger.observe(epoch, (topic, position.0), position.1);
                polled.messages += 1;
            }
            let payload = message.payload().unwrap_or_default();
            let outcome = if topic == PROFILE_TOPIC {
                ProfileMessageView::decode(payload, self.config.encoding)
                    .map(|m| {
                        polled.profiles.push(ProfileEvent::from_view(
                            &m,
                            position,
                            self.config.max_history,
                        ))
                    })
                    .map_err(|e| (e.kind(), e.to_string()))
            } else {
                self.decode_features(payload, position)
                    .map(|event| polled.features.push(event))
            };
            if let Err((kind, reason)) = outcome {
                if !replayed {
                    polled.invalid += 1;
                    dead_letter(
                        &self.dlq,
                        &self.config.dlq_topic,
                        &mut self.warnings,
                        &message,
                        kind,
                        &reason,
                    );
                }
            }
            if self.replay.as_ref().is_some_and(Replay::is_done) {
                break;
            }
        }
        self.go_live_once_replayed();
        self.note_partition_ends();
        polled
    }

    /// While catching up, lets the partitions' ends as the last statistics reported them finish
    /// the partitions read up to there.
    fn note_partition_ends(&mut self) {
        if self.catch_up.is_done() || self.catch_up.never_plain().is_some() {
            return;
        }
        if let Ok(ends) = self.consumer.context().ends.lock() {
            for (&partition, &end) in ends.iter() {
                self.catch_up.ends_at(partition, end);
            }
        }
    }

    /// Once every partition is replayed, reads live from where each replay ended.
    fn go_live_once_replayed(&mut self) {
        let Some(replay) = &self.replay else {
            return;
        };
        if !replay.is_done() {
            return;
        }
        // A fresh assignment drops whatever was prefetched past the replay's ends. (Partitions
        // that finish early are not paused meanwhile: what they prefetch is bounded by
        // queued.max.messages.kbytes, and a pause would have to be lifted again.)
        match live_assignment(&self.topics, &self.assigned, Some(replay))
            .and_then(|live| self.consumer.assign(&live))
        {
            Ok(()) => self.replay = None,
            Err(error) => self
                .warnings
                .warn(|| tracing::warn!(%error, "cannot assign the live partitions yet; retrying")),
        }
    }

    fn decode_features(
        &self,
        payload: &[u8],
        position: (i32, i64),
    ) -> Result<FeatureEvent, (&'static str, String)> {
        let message = ItemFeaturesMessage::decode(payload, self.config.dim)
            .map_err(|e| ("bad_item_features", e.to_string()))?;
        let features = match message.features {
            None => None,
            Some(values) => Some(FeatureVector::new(&values).ok_or((
                "bad_item_features",
                format!(
                    "features hold a value beyond ±{}",
                    crate::model::MAX_FEATURE_MAGNITUDE
                ),
            ))?),
        };
        Ok(FeatureEvent {
            item_id: message.item_id,
            features,
            position,
        })
    }

    /// Commits the offsets of every epoch before `frontier` (all durable in Redis), once every
    /// dead-letter copy of them is stored. Returns the positions committed.
    pub fn commit_before(&mut self, frontier: u64) -> BTreeMap<SourcePartition, i64> {
        if self.ledger.is_empty() {
            return BTreeMap::new();
        }
        if self.dlq.in_flight_count() > 0 {
            if let Err(error) = self.dlq.flush(Duration::from_secs(5)) {
                self.warnings
                    .warn(|| tracing::warn!(%error, "dead-letter topic slow; offsets wait"));
                return BTreeMap::new();
            }
        }
        let positions = self.ledger.complete_before(frontier);
        if positions.is_empty() {
            return positions;
        }
        let mut list = TopicPartitionList::new();
        for (&(topic, partition), &offset) in &positions {
            if let Err(error) =
                list.add_partition_offset(&self.topics[topic], partition, Offset::Offset(offset))
            {
                tracing::error!(%error, "cannot build the offset commit");
            }
        }
        // Asynchronous: a commit lost to a crash only means re-reading messages whose outputs
        // Redis already holds, which the no-regression script makes harmless.
        if let Err(error) = self.consumer.commit(&list, CommitMode::Async) {
            self.warnings
                .warn(|| tracing::warn!(%error, "offset commit failed; the next one covers it"));
        }
        positions
    }

    /// Dead-letter copies the broker refused, so far.
    pub fn dead_letter_failures(&self) -> u64 {
        self.dlq.context().failed.load(Ordering::Relaxed)
    }
}

/// Copies an invalid message to the dead-letter topic with why and where it was read.
fn dead_letter(
    dlq: &ThreadedProducer<DlqContext>,
    dlq_topic: &str,
    warnings: &mut Warnings,
    message: &BorrowedMessage<'_>,
    kind: &str,
    reason: &str,
) {
    let partition = message.partition().to_string();
    let offset = message.offset().to_string();
    warnings.warn(|| {
        tracing::warn!(
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            reason,
            "invalid message sent to the dead-letter topic"
        )
    });
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "streamrec.reason",
            value: Some(reason),
        })
        .insert(Header {
            key: "streamrec.reason_kind",
            value: Some(kind),
        })
        .insert(Header {
            key: "streamrec.source_topic",
            value: Some(message.topic()),
        })
        .insert(Header {
            key: "streamrec.source_partition",
            value: Some(&partition),
        })
        .insert(Header {
            key: "streamrec.source_offset",
            value: Some(&offset),
        });
    let mut record = BaseRecord::to(dlq_topic)
        .payload(message.payload().unwrap_or_default())
        .headers(headers);
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    // A full local queue drains as the broker acknowledges; wait for room rather than drop.
    loop {
        match dlq.send(record) {
            Ok(()) => break,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((error, _)) => {
                dlq.context().failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "cannot queue a dead-letter copy");
                break;
            }
        }
    }
}

/// The assignment to read live with: a replayed partition from where its replay ended, any
/// other from the group's committed offset (or its beginning, if it has none).
fn live_assignment(
    topics: &[String; 2],
    assigned: &[SourcePartition],
    replay: Option<&Replay>,
) -> Result<TopicPartitionList, KafkaError> {
    let mut live = TopicPartitionList::new();
    for &(topic, partition) in assigned {
        let start = replay
            .and_then(|replay| replay.resume_offset(&(topic, partition)))
            .map_or(Offset::Stored, Offset::Offset);
        live.add_partition_offset(&topics[topic], partition, start)?;
    }
    Ok(live)
}

/// Raises a read mark in Redis before the message that reached it is handed on, retrying with
/// backoff until Redis has it: a value written from past the mark could otherwise be undone by a
/// later run that trusts the mark.
fn raise_mark(
    read_marks: &mut sink::ReadMarks,
    marks: &mut Marks,
    warnings: &mut Warnings,
    partition: i32,
    mark: i64,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        match read_marks.advance(&[(partition, mark)]) {
            Ok(()) => {
                marks.raised(partition, mark);
                return;
            }
            Err(error) => {
                warnings.warn(|| {
                    tracing::warn!(%error, partition, mark, "cannot raise a read mark; retrying")
                });
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Where an assigned partition stands at start.
#[derive(Debug, Clone, Copy)]
struct StartOffsets {
    /// Its first offset (low watermark).
    first: i64,
    /// The group's committed offset, if it has one.
    committed: Option<i64>,
}

/// The first and committed offsets of every assigned partition, read once for the replay and
/// the catch-up.
fn start_offsets(
    consumer: &BaseConsumer<SourceContext>,
    topics: &[String; 2],
    assigned: &[SourcePartition],
) -> Result<BTreeMap<SourcePartition, StartOffsets>, KafkaError> {
    let timeout = Duration::from_secs(10);
    let mut list = TopicPartitionList::new();
    for &(topic, partition) in assigned {
        list.add_partition(&topics[topic], partition);
    }
    let committed = consumer.committed_offsets(list, timeout)?;
    let mut offsets = BTreeMap::new();
    for &(topic, partition) in assigned {
        let committed = match committed
            .find_partition(&topics[topic], partition)
            .map(|p| p.offset())
        {
            Some(Offset::Offset(committed)) => Some(committed),
            _ => None,
        };
        let (first, high) = consumer.fetch_watermarks(&topics[topic], partition, timeout)?;
        tracing::debug!(
            topic = topics[topic],
            partition,
            first,
            committed,
            high,
            "start offsets"
        );
        offsets.insert((topic, partition), StartOffsets { first, committed });
    }
    Ok(offsets)
}

/// Reads the marks of the worker's profile partitions, and the offsets each must be read up to
/// before it is caught up.
fn plan_catch_up(
    offsets: &BTreeMap<SourcePartition, StartOffsets>,
    read_marks: &mut sink::ReadMarks,
) -> Result<(Marks, CatchUp), SourceError> {
    let starts: Vec<PartitionStart> = offsets
        .iter()
        .filter(|(&(topic, _), _)| topic == PROFILE_TOPIC)
        .map(|(&(_, partition), start)| PartitionStart {
            partition,
            first: start.first,
            // Never committed: read from the beginning.
            resume: start.committed.unwrap_or(start.first),
        })
        .collect();
    let firsts: Vec<(i32, i64)> = starts.iter().map(|s| (s.partition, s.first)).collect();
    let stored = read_marks.load(&firsts)?;
    Ok((
        Marks::new(stored.marks.clone()),
        crate::catch_up::plan(&stored, &starts),
    ))
}

/// Where each assigned partition's replay ends: its committed offset. Not capped at the high
/// watermark: tansu reports one below the last batch it holds (its last batch's first offset,
/// it seems), which would cut the replay short. A committed offset beyond a partition's end (a
/// topic recreated under the same group) ends the replay at the end of the partition instead.
fn plan_replay(offsets: &BTreeMap<SourcePartition, StartOffsets>) -> Replay {
    Replay::new(
        offsets
            .iter()
            .filter_map(|(&partition, start)| Some((partition, start.first, start.committed?))),
    )
}

/// Partitions of `topic`, or 0 if it does not exist.
fn partition_count(
    consumer: &BaseConsumer<SourceContext>,
    topic: &str,
) -> Result<usize, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len())
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_has_exactly_one_worker() {
        for peers in 1..=8 {
            for partitions in [1, 4, 7, 16] {
                let mut owners = vec![0; partitions];
                for index in 0..peers {
                    for p in assigned_partitions(partitions, index, peers) {
                        owners[p as usize] += 1;
                    }
                }
                assert!(
                    owners.iter().all(|&n| n == 1),
                    "{peers} workers, {partitions} partitions"
                );
            }
        }
        assert_eq!(assigned_partitions(4, 1, 2), vec![1, 3]);
    }
}
