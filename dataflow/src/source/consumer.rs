//! The librdkafka clients of a worker's source, each option with why it is set, and which
//! partitions the worker reads.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use profile::RateLimit;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use super::dead_letter::DeadLetters;
use super::{SourceConfig, SourceError, PROFILE_TOPIC};
use crate::epoch::SourcePartition;
use crate::replay::Replay;

/// The consumer's context. librdkafka reports each end of a partition, which the replay asks
/// for (`enable.partition.eof`), to the error callback as well as to `poll`; those are news,
/// not errors. Its statistics tell where each partition ends, as the fetches found it, for the
/// catch-up (see [`crate::catch_up`]) and the lag metrics, and whether the broker still
/// answers (see [`BrokerSilence`]).
#[derive(Debug)]
pub(super) struct SourceContext {
    /// The worker's index, for the logs.
    worker: usize,
    /// The source's topics, by their index in a [`SourcePartition`].
    topics: [String; 2],
    /// Partition → its high watermark in the last statistics.
    pub(super) ends: std::sync::Mutex<BTreeMap<SourcePartition, i64>>,
    /// How long the brokers have not answered, as of the last statistics.
    pub(super) silence: std::sync::Mutex<BrokerSilence>,
    /// Whether an offset commit failed at the broker since the source last looked. Commits
    /// are asynchronous: `commit` returns once librdkafka has queued one, and a commit that
    /// then times out or meets a coordinator that is not ready is only reported here. The
    /// source sends its positions again (see `KafkaSource::commit_before`); without that, the
    /// last commit before a quiet spell could be lost and its partitions' committed offsets
    /// stay behind until the next message.
    pub(super) commit_failed: AtomicBool,
    /// How many commits the callback has answered, failed or not (see [`super::commits`]).
    pub(super) commits_answered: AtomicU64,
    /// librdkafka's errors and log lines while a broker is unreachable come a few a second per
    /// connection: rate-limited, they say the same.
    warnings: RateLimit,
}

/// Whether the consumer hears from the brokers. It always has a fetch waiting at a broker (one
/// answers within `fetch.wait.max.ms` even with nothing new), so responses stop arriving only
/// when no broker answers: a broker hung (SIGSTOP, a long GC pause, a partitioned network) or
/// down. Told apart by the statistics' count of responses received, once a second.
#[derive(Debug)]
pub(super) struct BrokerSilence {
    /// Responses received from every broker, in the last statistics.
    responses: u64,
    /// When the count last grew (or the consumer started).
    last_answer: std::time::Instant,
    /// Whether the silence was reported as a stall, so its end is reported too.
    reported: bool,
    /// The stall's own limit (once a second), apart from librdkafka's lines, which could
    /// otherwise crowd it out.
    warnings: RateLimit,
}

impl BrokerSilence {
    /// How long no broker has answered (up to a second more than the statistics saw).
    pub(super) fn duration(&self) -> Duration {
        self.last_answer.elapsed()
    }

    fn seconds(&self) -> f64 {
        self.duration().as_secs_f64()
    }
}

/// A silence this long is a stall worth a warning: far longer than a fetch's wait and a
/// round trip, longer than the second between statistics.
const STALL_WARNING: Duration = Duration::from_secs(3);

impl SourceContext {
    fn new(worker: usize, topics: [String; 2]) -> Self {
        SourceContext {
            worker,
            topics,
            ends: std::sync::Mutex::default(),
            silence: std::sync::Mutex::new(BrokerSilence {
                responses: 0,
                last_answer: std::time::Instant::now(),
                reported: false,
                warnings: RateLimit::per_second(),
            }),
            commit_failed: AtomicBool::new(false),
            commits_answered: AtomicU64::new(0),
            warnings: RateLimit::per_second(),
        }
    }

    /// Logs with `log`, handed the count of lines held back, unless one was logged less than
    /// a second ago.
    fn warn(&self, log: impl FnOnce(u64)) {
        if let Some(suppressed) = self.warnings.allow() {
            log(suppressed);
        }
    }

    /// Notes the responses received so far; warns (at most once a second) while no broker has
    /// answered for [`STALL_WARNING`], and says when one answers again.
    fn note_responses(&self, statistics: &rdkafka::Statistics) {
        let responses = statistics.brokers.values().map(|b| b.rx).sum();
        let Ok(mut silence) = self.silence.lock() else {
            return;
        };
        if responses != silence.responses {
            silence.responses = responses;
            if silence.reported {
                tracing::info!(
                    worker = self.worker,
                    silent_seconds = silence.seconds(),
                    "the Kafka broker answers again"
                );
                silence.reported = false;
            }
            silence.last_answer = std::time::Instant::now();
            return;
        }
        let silent = silence.last_answer.elapsed();
        if silent >= STALL_WARNING {
            silence.reported = true;
            let states: BTreeMap<&str, &str> = statistics
                .brokers
                .values()
                .map(|b| (b.nodename.as_str(), b.state.as_str()))
                .collect();
            let worker = self.worker;
            if let Some(suppressed) = silence.warnings.allow() {
                tracing::warn!(
                    worker,
                    suppressed,
                    silent_seconds = silent.as_secs_f64(),
                    brokers = ?states,
                    "the Kafka broker has not answered; reading and committing wait"
                );
            }
        }
    }
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => self.warn(|suppressed| {
                tracing::warn!(
                    suppressed,
                    worker = self.worker,
                    fac,
                    log_message,
                    "librdkafka (consumer)"
                )
            }),
            _ => tracing::debug!(
                worker = self.worker,
                fac,
                log_message,
                "librdkafka (consumer)"
            ),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF) =
            error
        {
            tracing::trace!(reason, "end of partition");
        } else {
            // librdkafka reconnects and retries by itself; a lasting outage shows as a stall.
            self.warn(|suppressed| tracing::warn!(suppressed, worker = self.worker, %error, reason, "Kafka consumer error"),
            );
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        self.note_responses(&statistics);
        let Ok(mut ends) = self.ends.lock() else {
            return;
        };
        for (index, name) in self.topics.iter().enumerate() {
            let Some(topic) = statistics.topics.get(name) else {
                continue;
            };
            for (&partition, stats) in &topic.partitions {
                // -1 until a fetch (or offset query) of the partition has answered.
                if partition >= 0 && stats.hi_offset >= 0 {
                    ends.insert((index, partition), stats.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        self.commits_answered.fetch_add(1, Ordering::Relaxed);
        let partitions = offsets.elements();
        if let Some(error) = commit_error(result, partitions.iter().map(|p| p.error())) {
            self.commit_failed.store(true, Ordering::Relaxed);
            self.warn(|suppressed| {
                tracing::warn!(
                    suppressed,
                    worker = self.worker,
                    %error,
                    "offset commit failed at the broker; it is sent again"
                )
            });
        }
    }
}

/// Why a commit failed, if it did: as a whole, or for one of its partitions.
fn commit_error(
    result: KafkaResult<()>,
    mut partitions: impl Iterator<Item = KafkaResult<()>>,
) -> Option<KafkaError> {
    result
        .err()
        .or_else(|| partitions.find_map(|partition| partition.err()))
}

/// The consumer of worker `worker`'s profile and item-feature partitions.
pub(super) fn consumer(
    config: &SourceConfig,
    worker: usize,
) -> Result<BaseConsumer<SourceContext>, KafkaError> {
    let mut client = ClientConfig::new();
    client
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
        // a short wait keeps epochs closing on time and throughput up (docs/tansu.md, 2).
        .set("fetch.wait.max.ms", "5")
        // Prefetch a few polls ahead (a poll takes at most --max-poll-records messages,
        // 4 MB of 1 KB profiles by default), bounded in memory: 16 MB per worker. A larger
        // prefetch read no faster and cost memory (docs/performance.md, "figures from code
        // comments").
        .set("queued.max.messages.kbytes", "16384")
        // Once that prefetch is full (the worker is busy computing an epoch), librdkafka
        // postpones the partition's next fetch by this long, 1 s by default: the worker
        // then drained the queue in a few ms and sat idle for the rest of the second. A
        // few ms keeps the queue topped up at the cost of a few more queue checks.
        .set("fetch.queue.backoff.ms", "5")
        // A connection that failed is tried again after a backoff that doubles up to this,
        // 10 s by default: after a broker restart the group-coordinator connection, which
        // the commits need, came back up to 10 s after the broker (commits unanswered for
        // 21-22 s in 2 of 4 runs of the restart test; with 1 s, in none of 5). It costs a
        // connection attempt a second per broker while one is down.
        .set("reconnect.backoff.max.ms", "1000")
        // The statistics carry each partition's end as the fetches report it, which the
        // catch-up waits for (tansu's answer to an offset query falls short of it:
        // docs/tansu.md, 3). Once a
        // second: a start-up waits at most that long more, and the parsing costs nothing.
        .set("statistics.interval.ms", "1000");
    // The user's -X / KAFKA_CONFIG_FILE properties (security, client id, tuning), last so that
    // they win over the tuning above; the ones set above for correctness are refused earlier.
    config.kafka.apply(&mut client);
    client.create_with_context(SourceContext::new(
        worker,
        [config.profile_topic.clone(), config.item_topic.clone()],
    ))
}

/// The producer of a worker's dead-letter copies (see [`super::dead_letter`]).
pub(super) fn dead_letter_producer(config: &SourceConfig) -> Result<DeadLetters, KafkaError> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        // A dead-letter copy is kept as long as the broker is down: offsets wait for it. Also
        // what keeps a stall from killing the producer: with a finite timeout, messages that
        // time out make librdkafka ask for a new producer epoch, which tansu answers by fencing
        // the producer (the ingest API's producer meets that).
        .set("message.timeout.ms", "0")
        // The copy must survive a broker failure like any message.
        .set("acks", "all")
        // A copy retried after a lost acknowledgement is stored once, as long as the producer
        // lives (a replaced one may store it again: at least once).
        .set("enable.idempotence", "true");
    // The user's -X / KAFKA_CONFIG_FILE properties, as for the consumer.
    config.kafka.apply(&mut client);
    DeadLetters::new(client, config.dlq_topic.clone())
}

/// The context of the start-up check: librdkafka's complaints about a broker it cannot reach
/// are the check's error, said once, rather than a line every few ms while it waits.
struct QuietContext;

impl ClientContext for QuietContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        tracing::debug!(?level, fac, log_message, "librdkafka");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka error");
    }
}

impl ConsumerContext for QuietContext {}

/// Checks, before anything is written anywhere (the take-over of Redis comes next), that a
/// broker answers with the user's properties and that the profile topic exists.
pub fn check_profile_topic(
    brokers: &str,
    kafka: &settings::KafkaProperties,
    topic: &str,
) -> Result<(), SourceError> {
    let mut client = ClientConfig::new();
    // Only a metadata request: no group, nothing consumed or committed.
    client.set("bootstrap.servers", brokers);
    kafka.apply(&mut client);
    let redact = |error: KafkaError| kafka.redact_text(&error.to_string());
    let consumer: BaseConsumer<QuietContext> =
        client
            .create_with_context(QuietContext)
            .map_err(|error| SourceError::KafkaClient {
                reason: redact(error),
            })?;
    let metadata = consumer
        .fetch_metadata(Some(topic), START_CHECK_TIMEOUT)
        .map_err(|error| SourceError::Unreachable {
            brokers: brokers.to_owned(),
            seconds: START_CHECK_TIMEOUT.as_secs(),
            reason: redact(error),
        })?;
    let exists = metadata
        .topics()
        .iter()
        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty());
    if exists {
        Ok(())
    } else {
        Err(SourceError::MissingTopic {
            topic: topic.to_owned(),
            brokers: brokers.to_owned(),
        })
    }
}

/// How long the start-up check waits for a broker's metadata.
const START_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The partitions of a topic with `partitions` partitions that belong to worker `index` of
/// `peers`: those congruent to it modulo `peers`.
pub fn assigned_partitions(partitions: usize, index: usize, peers: usize) -> Vec<i32> {
    (0..partitions)
        .filter(|p| p % peers.max(1) == index)
        .map(|p| p as i32)
        .collect()
}

/// The partitions of `topics` that belong to worker `index` of `peers`. The profile topic must
/// exist; a missing item topic only means no live feature updates.
pub(super) fn assignment(
    consumer: &BaseConsumer<SourceContext>,
    topics: &[String; 2],
    brokers: &str,
    index: usize,
    peers: usize,
) -> Result<Vec<SourcePartition>, SourceError> {
    let mut assigned = Vec::new();
    for (topic_index, topic) in topics.iter().enumerate() {
        let partitions = partition_count(consumer, topic)?;
        if partitions == 0 {
            if topic_index == PROFILE_TOPIC {
                return Err(SourceError::MissingTopic {
                    topic: topic.clone(),
                    brokers: brokers.to_owned(),
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
    Ok(assigned)
}

/// The assignment to read live with: a replayed partition from where its replay ended, one a
/// restored checkpoint covers from `live_from`, any other from the group's committed offset
/// (or its beginning, if it has none).
pub(super) fn live_assignment(
    topics: &[String; 2],
    assigned: &[SourcePartition],
    replay: Option<&Replay>,
    live_from: &BTreeMap<SourcePartition, i64>,
) -> Result<TopicPartitionList, KafkaError> {
    let mut live = TopicPartitionList::new();
    for &(topic, partition) in assigned {
        let start = replay
            .and_then(|replay| replay.resume_offset(&(topic, partition)))
            .or_else(|| live_from.get(&(topic, partition)).copied())
            .map_or(Offset::Stored, Offset::Offset);
        live.add_partition_offset(&topics[topic], partition, start)?;
    }
    Ok(live)
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

    #[test]
    fn a_commit_that_fails_at_the_broker_is_flagged_for_sending_again() {
        let context = SourceContext::new(0, ["profiles".into(), "items".into()]);
        let mut offsets = TopicPartitionList::new();
        offsets
            .add_partition_offset("profiles", 0, Offset::Offset(7))
            .unwrap();
        context.commit_callback(Ok(()), &offsets);
        assert!(!context.commit_failed.load(Ordering::Relaxed));
        assert_eq!(context.commits_answered.load(Ordering::Relaxed), 1);
        // Failed as a whole (a timeout, no coordinator).
        context.commit_callback(
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RequestTimedOut,
            )),
            &offsets,
        );
        assert!(context.commit_failed.swap(false, Ordering::Relaxed));
        // Failed for one partition only.
        let not_coordinator = Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NotCoordinator));
        assert!(commit_error(Ok(()), [Ok(()), not_coordinator].into_iter()).is_some());
        assert!(commit_error(Ok(()), [Ok(()), Ok(())].into_iter()).is_none());
    }
}
