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
//!
//! This module holds [`KafkaSource`] itself: its state, `poll` and `commit_before`. The rest is
//! in its submodules:
//! - `commits`: how long the offset commits have waited for librdkafka's answer;
//! - `consumer`: the librdkafka consumer and dead-letter producer with their options, and which
//!   partitions a worker reads ([`assigned_partitions`]);
//! - `dead_letter`: the dead-letter producer, which holds each copy until the broker
//!   acknowledged it, sends failed ones again, and replaces a producer that died;
//! - `decode`: a message to an event, validation, dead-letter copies of invalid messages;
//! - `start`: each partition's offsets at start, and the replay and catch-up plans made from
//!   them.

mod commits;
mod consumer;
mod dead_letter;
mod decode;
mod start;

use std::collections::BTreeMap;
use std::time::Duration;

use profile::{Encoding, RateLimit};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use self::consumer::SourceContext;
pub use self::consumer::{assigned_partitions, check_profile_topic};
use self::dead_letter::DeadLetters;
use self::decode::Event;
use crate::catch_up::{CatchUp, Marks};
use crate::epoch::{OffsetLedger, SourcePartition};
use crate::metrics::{PartitionCounts, PartitionTally};
use crate::model::{FeatureEvent, ProfileEvent};
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
    /// The Redis the sink writes to, which holds the read marks (URL, CA file, cluster).
    pub read_marks: sink::SinkConfig,
    /// The user's librdkafka properties (`-X`, `KAFKA_CONFIG_FILE`), for every client.
    pub kafka: settings::KafkaProperties,
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(
        "topic {topic:?} (--topic / KAFKA_TOPIC) does not exist on {brokers} \
         (scripts/services.sh start creates it)"
    )]
    MissingTopic { topic: String, brokers: String },
    #[error(
        "no Kafka broker of {brokers} (--brokers / KAFKA_BROKER) answered within {seconds} s; \
         check the address and any -X security settings: {reason}"
    )]
    Unreachable {
        brokers: String,
        seconds: u64,
        reason: String,
    },
    #[error(
        "cannot create a Kafka client with these properties (-X / KAFKA_CONFIG_FILE): {reason}"
    )]
    KafkaClient { reason: String },
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

/// Indexes of the source's two topics, in `KafkaSource::topics` and in a [`SourcePartition`].
pub const PROFILE_TOPIC: usize = 0;
const ITEM_TOPIC: usize = 1;

/// One worker's Kafka reader.
pub struct KafkaSource {
    /// The worker's global index.
    worker: usize,
    config: SourceConfig,
    consumer: BaseConsumer<SourceContext>,
    dlq: DeadLetters,
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
    warnings: RateLimit,
    /// Messages read and invalid per partition, for the metrics (see
    /// [`take_read_counts`](Self::take_read_counts)).
    read_counts: PartitionTally,
    /// Each assigned partition's offset committed last (or where reading started), for its
    /// lag and for checkpoints.
    committed: BTreeMap<SourcePartition, i64>,
    /// Every position this source has committed, by partition: each commit carries them all,
    /// so that one lost on the way (the broker was down, or its coordinator moved) is made good
    /// by the next, also for a partition that gets no new message.
    commit_positions: BTreeMap<SourcePartition, i64>,
    /// Whether librdkafka refused the last commit (it is sent again at the next call).
    commit_refused: bool,
    /// When each commit librdkafka has not answered yet was sent.
    unanswered_commits: commits::UnansweredCommits,
    /// Where live reading starts for partitions a restored checkpoint covers (the others start
    /// at their committed offsets).
    live_from: BTreeMap<SourcePartition, i64>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("assigned", &self.assigned)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// Connects, finds the partitions, and assigns this worker its share: first from the
    /// beginning, to replay each partition up to the group's committed offset, if it has one;
    /// then (see [`poll`](Self::poll)) from that offset, or from the beginning for a partition
    /// never committed.
    ///
    /// With `checkpoint`, the offsets a restored checkpoint's state ends at (see
    /// [`crate::checkpoint`]), each partition it covers is replayed from there instead of from
    /// its beginning.
    pub fn new(
        config: SourceConfig,
        index: usize,
        peers: usize,
        checkpoint: Option<&BTreeMap<SourcePartition, i64>>,
    ) -> Result<Self, SourceError> {
        let consumer = consumer::consumer(&config, index)?;
        let dlq = consumer::dead_letter_producer(&config)?;

        let topics = [config.profile_topic.clone(), config.item_topic.clone()];
        let assigned = consumer::assignment(&consumer, &topics, &config.brokers, index, peers)?;
        let offsets = start::start_offsets(&consumer, &topics, &assigned, checkpoint)?;
        let mut read_marks =
            sink::ReadMarks::connect_for(&config.read_marks, &config.profile_topic)?;
        let (marks, catch_up) = start::plan_catch_up(&offsets, &mut read_marks)?;
        start::log_catch_up_plan(index, &catch_up, &read_marks);
        let replay = start::plan_replay(&offsets);
        let committed = offsets
            .iter()
            .map(|(&partition, start)| (partition, start.resume()))
            .collect();
        // Where live reading starts for a partition not replayed: its committed offset
        // (librdkafka's stored one), unless a checkpoint says otherwise.
        let live_from: BTreeMap<SourcePartition, i64> = offsets
            .iter()
            .filter(|(_, start)| start.replay_from().is_some())
            .map(|(&partition, start)| (partition, start.resume()))
            .collect();
        let replay = if replay.is_done() {
            consumer.assign(&consumer::live_assignment(
                &topics, &assigned, None, &live_from,
            )?)?;
            tracing::info!(worker = index, partitions = ?assigned, "assigned partitions");
            None
        } else {
            let mut replaying = TopicPartitionList::new();
            for (topic, partition) in replay.partitions() {
                let from = offsets
                    .get(&(topic, partition))
                    .and_then(|start| start.replay_from())
                    .map_or(Offset::Beginning, Offset::Offset);
                replaying.add_partition_offset(&topics[topic], partition, from)?;
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
            worker: index,
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
            warnings: RateLimit::per_second(),
            read_counts: PartitionTally::default(),
            committed,
            commit_positions: BTreeMap::new(),
            commit_refused: false,
            unanswered_commits: commits::UnansweredCommits::default(),
            live_from,
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
                    // A broker or network hiccup: librdkafka reconnects by itself. (The
                    // context's error callback has logged it, rate-limited.)
                    tracing::debug!(%error, "Kafka consumer error");
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
                            &self.warnings,
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
                self.read_counts.entry((topic, position.0)).messages += 1;
            }
            let payload = message.payload().unwrap_or_default();
            match decode::decode(topic, payload, position, &self.config) {
                Ok(Event::Profile(event)) => polled.profiles.push(event),
                Ok(Event::Features(event)) => polled.features.push(event),
                // Replayed messages were dead-lettered when first read.
                Err(invalid) => {
                    if !replayed {
                        polled.invalid += 1;
                        self.read_counts.entry((topic, position.0)).invalid += 1;
                        decode::dead_letter(
                            &mut self.dlq,
                            epoch,
                            &self.warnings,
                            &message,
                            &invalid,
                        );
                    }
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
            for (&(topic, partition), &end) in ends.iter() {
                if topic == PROFILE_TOPIC {
                    self.catch_up.ends_at(partition, end);
                }
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
        match consumer::live_assignment(&self.topics, &self.assigned, Some(replay), &self.live_from)
            .and_then(|live| self.consumer.assign(&live))
        {
            Ok(()) => self.replay = None,
            Err(error) => {
                if let Some(suppressed) = self.warnings.allow() {
                    tracing::warn!(%error, suppressed, "cannot assign the live partitions yet; retrying");
                }
            }
        }
    }

    /// Commits the offsets of every epoch before `frontier` (all durable in Redis) whose
    /// dead-letter copies the broker has all acknowledged: an epoch with a copy still
    /// unacknowledged, and every later one, waits for a later call. Never waits for the broker.
    /// Each commit carries every partition's position, so that a later commit makes good one
    /// lost while the broker was away, also for a partition with no new message (which would
    /// otherwise keep its old committed offset: replayed after a restart, and a lag in the
    /// group's offsets); one librdkafka refuses, or reports failed later, is sent again at the
    /// next call.
    /// Returns the positions that are new in this commit.
    pub fn commit_before(&mut self, frontier: u64) -> BTreeMap<SourcePartition, i64> {
        self.dlq.maintain();
        self.warn_of_unanswered_commits();
        // A commit librdkafka refused, or that failed at the broker, is sent again, with the
        // next epoch's or on its own.
        let failed_at_broker = self
            .consumer
            .context()
            .commit_failed
            .swap(false, std::sync::atomic::Ordering::Relaxed);
        let failed = std::mem::take(&mut self.commit_refused) || failed_at_broker;
        if self.ledger.is_empty() && !failed {
            return BTreeMap::new();
        }
        let frontier = match self.dlq.unacknowledged_before() {
            Some(waiting) if waiting < frontier => {
                tracing::debug!(
                    epoch = waiting,
                    copies = self.dlq.unacknowledged(),
                    "offsets wait for dead-letter copies"
                );
                waiting
            }
            _ => frontier,
        };
        let positions = self.ledger.complete_before(frontier);
        if positions.is_empty() && !failed {
            return positions;
        }
        self.commit_positions.extend(&positions);
        if self.commit_positions.is_empty() {
            // Nothing read yet: nothing to send again either.
            return positions;
        }
        let mut list = TopicPartitionList::new();
        for (&(topic, partition), &offset) in &self.commit_positions {
            if let Err(error) =
                list.add_partition_offset(&self.topics[topic], partition, Offset::Offset(offset))
            {
                tracing::error!(%error, "cannot build the offset commit");
            }
        }
        // Asynchronous: a commit lost to a crash only means re-reading messages whose outputs
        // Redis already holds, which the no-regression script makes harmless.
        match self.consumer.commit(&list, CommitMode::Async) {
            // Also the positions of a refused commit this one sends again.
            Ok(()) => {
                self.committed.extend(&self.commit_positions);
                self.unanswered_commits.sent(std::time::Instant::now());
            }
            Err(error) => {
                self.commit_refused = true;
                if let Some(suppressed) = self.warnings.allow() {
                    tracing::warn!(%error, suppressed, "offset commit failed; it is sent again");
                }
            }
        }
        positions
    }

    /// Counts the commits librdkafka has answered, and warns while one has waited too long
    /// (see [`commits::UnansweredCommits`]).
    fn warn_of_unanswered_commits(&mut self) {
        let answered = self
            .consumer
            .context()
            .commits_answered
            .load(std::sync::atomic::Ordering::Relaxed);
        self.unanswered_commits.answered(answered);
        self.unanswered_commits
            .warn_if_waiting(self.worker, std::time::Instant::now());
    }

    /// Where reading would resume for each assigned partition had every epoch before `frontier`
    /// been committed: what a checkpoint of the state before `frontier` stores. Call it before
    /// [`commit_before`](Self::commit_before) passes `frontier`, which forgets the epochs.
    pub fn positions_before(&self, frontier: u64) -> BTreeMap<SourcePartition, i64> {
        let mut positions = self.committed.clone();
        for (partition, next) in self.ledger.positions_before(frontier) {
            let position = positions.entry(partition).or_insert(next);
            *position = (*position).max(next);
        }
        positions
    }

    /// The first epoch whose offsets may not be committed yet, for want of a dead-letter
    /// acknowledgement, if any: no checkpoint may cover it either, as a restart from it would
    /// not copy its invalid messages again.
    pub fn uncommittable_from(&self) -> Option<u64> {
        self.dlq.unacknowledged_before()
    }

    /// The source's topics, by their index in a [`SourcePartition`].
    pub fn topics(&self) -> &[String; 2] {
        &self.topics
    }

    /// The partitions this worker reads.
    pub fn assigned(&self) -> &[SourcePartition] {
        &self.assigned
    }

    /// Hands `each` every partition's messages read and invalid since the last call.
    pub fn take_read_counts(&mut self, each: impl FnMut(SourcePartition, PartitionCounts)) {
        self.read_counts.drain(each);
    }

    /// Hands `each` every assigned partition's lag: the messages past the offset this run
    /// committed last (or where it started reading), up to the partition's end as librdkafka's
    /// statistics last reported it, once a second. None before the first statistics.
    pub fn lags(&self, mut each: impl FnMut(SourcePartition, i64)) {
        let Ok(ends) = self.consumer.context().ends.lock() else {
            return;
        };
        for (partition, &committed) in &self.committed {
            if let Some(&end) = ends.get(partition) {
                each(*partition, (end - committed).max(0));
            }
        }
    }

    /// How long no Kafka broker has answered this worker's consumer, as of its last statistics
    /// (once a second): at most about a second while the broker is healthy.
    pub fn broker_silence(&self) -> Duration {
        self.consumer
            .context()
            .silence
            .lock()
            .map_or(Duration::ZERO, |silence| silence.duration())
    }

    /// The worker's global index.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// Dead-letter deliveries that failed so far (each copy is sent again until stored).
    pub fn dead_letter_failures(&self) -> u64 {
        self.dlq.failures()
    }

    /// Dead-letter copies the broker has not acknowledged yet.
    pub fn dead_letters_unacknowledged(&self) -> usize {
        self.dlq.unacknowledged()
    }

    /// Waits, at most `timeout`, until the broker acknowledged every dead-letter copy, so that
    /// the last commit on shutdown covers their epochs. Whether it did.
    pub fn settle_dead_letters(&mut self, timeout: Duration) -> bool {
        self.dlq.settle(Some(timeout))
    }
}

/// Raises a read mark in Redis before the message that reached it is handed on, retrying with
/// backoff until Redis has it: a value written from past the mark could otherwise be undone by a
/// later run that trusts the mark.
fn raise_mark(
    read_marks: &mut sink::ReadMarks,
    marks: &mut Marks,
    warnings: &RateLimit,
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
                if let Some(suppressed) = warnings.allow() {
                    tracing::warn!(%error, partition, mark, suppressed, "cannot raise a read mark; retrying");
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Dead-letter copies of profiles Redis refused for good (see `sink::WriteStats::rejected`),
/// sent by a worker's Redis writer on its own thread. It has a producer of its own, made like
/// the source's: the source's lives on the worker thread, and sharing it would tie the writer
/// thread to the worker loop. The copies go to the same topic, in the same shape as those of
/// invalid messages (payload and key as they would have been stored, why in the headers), so
/// that one tool reads both.
pub struct RejectedProfiles {
    producer: DeadLetters,
    source_topic: String,
}

impl std::fmt::Debug for RejectedProfiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RejectedProfiles")
            .field("producer", &self.producer)
            .finish_non_exhaustive()
    }
}

impl RejectedProfiles {
    /// A producer to `config.dlq_topic`, with the source's delivery settings.
    pub fn new(config: &SourceConfig) -> Result<Self, KafkaError> {
        Ok(Self {
            producer: consumer::dead_letter_producer(config)?,
            source_topic: config.profile_topic.clone(),
        })
    }

    /// Queues a copy of `profile`, the value Redis refused with `error`, computed in `epoch`.
    pub fn send(&mut self, profile: &crate::model::EncodedProfile, error: &str, epoch: u64) {
        decode::dead_letter_value(
            &mut self.producer,
            epoch,
            &[
                ("streamrec.reason", error),
                ("streamrec.reason_kind", "redis_rejected"),
                ("streamrec.source_topic", &self.source_topic),
                ("streamrec.epoch", &epoch.to_string()),
            ],
            profile.user_id().as_bytes(),
            profile.value().as_bytes(),
        );
    }

    /// Waits until the broker acknowledged every copy queued, so that the epoch they belong
    /// to (and its offsets) completes only after them; sends failed copies again and replaces
    /// a dead producer as long as it takes, like the source's offsets, which wait for their
    /// copies.
    pub fn flush(&mut self) {
        self.producer.settle(None);
    }

    /// Deliveries that failed so far (each copy is sent again until stored).
    pub fn failures(&self) -> u64 {
        self.producer.failures()
    }

    /// How many times the producer was replaced after it died.
    pub fn replacements(&self) -> u64 {
        self.producer.generation()
    }
}
