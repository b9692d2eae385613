//! The dead-letter producer: copies of invalid messages (the source's) and of values Redis
//! refused (a writer's), kept until the broker acknowledges them, sent again when a delivery
//! failed, and sent through a new librdkafka producer when the old one is dead for good.
//!
//! The guarantee the offsets rely on: a copy counts as stored only once the broker acknowledged
//! it. Until then it is held here, and the offsets of its epoch are not committed (see
//! [`DeadLetters::unacknowledged_before`]); a writer's epoch is not written until its copies
//! are (see [`DeadLetters::settle`]). Copies are delivered at least once: a copy whose delivery
//! failed after the broker stored it (an acknowledgement lost to a dead producer) is sent
//! again, so it may be stored twice; a restart before a copy's epoch is committed reads its
//! message again and copies it again.
//!
//! Why a producer can die: an idempotent librdkafka producer raises a fatal error (after which
//! every send fails) when the broker's view of its producer id and sequence numbers cannot be
//! reconciled with its own (a broker that lost that state, a sequence gap), and tansu answers
//! a producer that asked for a new epoch after messages timed out with `ProducerFenced`, which
//! librdkafka does not flag as fatal but fails every later message with (the ingest API's
//! producer meets that one after a stall, see `ingest-api/src/producer.rs`). Either way the
//! instance is replaced, like the API's: the new one gets a new producer id.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use profile::RateLimit;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};

/// A copy as it is sent, kept until the broker acknowledged it.
#[derive(Debug, Clone)]
pub(super) struct Copy {
    /// The epoch whose offsets wait for it.
    pub(super) epoch: u64,
    pub(super) key: Option<Vec<u8>>,
    pub(super) payload: Vec<u8>,
    pub(super) headers: Vec<(String, String)>,
}

/// What every generation's delivery callbacks report to, shared by the generations.
#[derive(Debug)]
struct Ledger {
    /// Copies sent and not acknowledged yet, by their id.
    unacknowledged: Mutex<BTreeMap<usize, Copy>>,
    /// Copies whose delivery failed, to send again.
    failed: Mutex<BTreeSet<usize>>,
    /// Deliveries that failed, so far (each is retried).
    failures: AtomicU64,
    /// The warnings of the delivery callbacks and of librdkafka, rate-limited.
    warnings: RateLimit,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            unacknowledged: Mutex::default(),
            failed: Mutex::default(),
            failures: AtomicU64::default(),
            warnings: RateLimit::per_second(),
        }
    }
}

impl Ledger {
    fn lock_unacknowledged(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, Copy>> {
        // A panic while the lock was held cannot leave the map half-written.
        self.unacknowledged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_failed(&self) -> std::sync::MutexGuard<'_, BTreeSet<usize>> {
        self.failed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs with `log`, handed the count of lines held back, unless one was logged less than
    /// a second ago.
    fn warn(&self, log: impl FnOnce(u64)) {
        if let Some(suppressed) = self.warnings.allow() {
            log(suppressed);
        }
    }
}

/// One librdkafka producer's context: the shared ledger, and whether this producer is dead.
#[derive(Debug)]
pub(super) struct DlqContext {
    ledger: Arc<Ledger>,
    /// Why a delivery showed that this producer will never deliver again, once one did.
    dead: OnceLock<String>,
}

impl ClientContext for DlqContext {
    /// librdkafka's complaints while a broker is unreachable come a few a second per
    /// connection: rate-limited, they say the same.
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => self.ledger.warn(|suppressed| {
                tracing::warn!(
                    suppressed,
                    fac,
                    log_message,
                    "librdkafka (dead-letter producer)"
                )
            }),
            _ => tracing::debug!(fac, log_message, "librdkafka (dead-letter producer)"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.ledger.warn(|suppressed| tracing::warn!(suppressed, %error, reason, "dead-letter producer error; librdkafka retries"),
        );
    }
}

impl ProducerContext for DlqContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, id: usize) {
        match result {
            Ok(_) => {
                self.ledger.lock_unacknowledged().remove(&id);
            }
            Err((error, _)) => {
                self.ledger.failures.fetch_add(1, Ordering::Relaxed);
                // ProducerFenced: the broker gave this producer id's epoch to another (or
                // refused a bump), and librdkafka fails every later message with it. Fatal:
                // librdkafka's own fatal state, as a message sees it.
                if let Some(code @ (RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::Fatal)) =
                    error.rdkafka_error_code()
                {
                    let _ = self.dead.set(format!("a delivery failed with {code:?}"));
                }
                self.ledger.lock_failed().insert(id);
                self.ledger.warn(|suppressed| {
                    tracing::warn!(suppressed, %error, "a dead-letter copy was not stored; it is sent again")
                });
            }
        }
    }
}

/// How often failed copies are sent again: a copy the broker refuses for good (one larger
/// than it takes, say) is retried at this pace, not in a busy loop.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// A dead-letter producer whose copies are held until acknowledged (see the module's doc).
pub(super) struct DeadLetters {
    /// The settings every generation is created from.
    client_config: ClientConfig,
    topic: String,
    producer: ThreadedProducer<DlqContext>,
    /// How many times the producer was replaced.
    generation: u64,
    ledger: Arc<Ledger>,
    next_id: usize,
    last_retry: Option<Instant>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("topic", &self.topic)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// A producer to `topic` made from `client_config`.
    pub(super) fn new(client_config: ClientConfig, topic: String) -> Result<Self, KafkaError> {
        let ledger = Arc::new(Ledger::default());
        let producer = create(&client_config, &ledger)?;
        Ok(DeadLetters {
            client_config,
            topic,
            producer,
            generation: 0,
            ledger,
            next_id: 0,
            last_retry: None,
        })
    }

    /// Queues `copy`; it is held until the broker acknowledges it.
    pub(super) fn send(&mut self, copy: Copy) {
        let id = self.next_id;
        self.next_id += 1;
        self.ledger.lock_unacknowledged().insert(id, copy.clone());
        self.produce(id, &copy);
    }

    /// Hands `copy` to the current producer, waiting for room in a full local queue; a copy
    /// it cannot take is marked failed, to be sent again.
    fn produce(&self, id: usize, copy: &Copy) {
        let headers = copy
            .headers
            .iter()
            .fold(OwnedHeaders::new(), |all, (key, value)| {
                all.insert(Header {
                    key,
                    value: Some(value),
                })
            });
        let mut record = BaseRecord::with_opaque_to(&self.topic, id)
            .payload(&copy.payload)
            .headers(headers);
        if let Some(key) = &copy.key {
            record = record.key(key);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                // A full local queue drains as the broker acknowledges: wait for room.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((error, _)) => {
                    self.ledger.failures.fetch_add(1, Ordering::Relaxed);
                    self.ledger.lock_failed().insert(id);
                    self.ledger.warn(|suppressed| {
                        tracing::warn!(suppressed, %error, "cannot queue a dead-letter copy; it is sent again")
                    });
                    return;
                }
            }
        }
    }

    /// Replaces a dead producer, and sends failed copies again (at most once a second).
    /// Never waits for the broker.
    pub(super) fn maintain(&mut self) {
        if let Some(reason) = self.death() {
            match create(&self.client_config, &self.ledger) {
                Ok(producer) => {
                    self.generation += 1;
                    tracing::warn!(
                        %reason,
                        generation = self.generation,
                        topic = self.topic,
                        "the dead-letter producer is dead; replaced it with a new one"
                    );
                    // Dropping the dead one fails what it still holds, into `failed`.
                    let dead = std::mem::replace(&mut self.producer, producer);
                    drop(dead);
                    // Sent at once through the new one.
                    self.last_retry = None;
                }
                Err(error) => {
                    // Keep the dead one: the next call tries again.
                    self.ledger.warn(|suppressed| {
                        tracing::error!(suppressed, %reason, %error, "the dead-letter producer is dead and cannot be replaced")
                    });
                    return;
                }
            }
        }
        if self.last_retry.is_some_and(|at| at.elapsed() < RETRY_EVERY) {
            return;
        }
        let failed = std::mem::take(&mut *self.ledger.lock_failed());
        if failed.is_empty() {
            return;
        }
        self.last_retry = Some(Instant::now());
        let copies: Vec<(usize, Copy)> = {
            let unacknowledged = self.ledger.lock_unacknowledged();
            failed
                .into_iter()
                .filter_map(|id| unacknowledged.get(&id).map(|copy| (id, copy.clone())))
                .collect()
        };
        tracing::info!(
            copies = copies.len(),
            generation = self.generation,
            "sending failed dead-letter copies again"
        );
        for (id, copy) in &copies {
            self.produce(*id, copy);
        }
    }

    /// Why the current producer will never deliver again, if it will not.
    fn death(&self) -> Option<String> {
        self.producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("fatal error {code:?}: {reason}"))
            .or_else(|| self.producer.context().dead.get().cloned())
    }

    /// The first epoch with a copy not acknowledged yet, if any: offsets of that epoch and
    /// later ones must wait.
    pub(super) fn unacknowledged_before(&self) -> Option<u64> {
        self.ledger
            .lock_unacknowledged()
            .values()
            .map(|copy| copy.epoch)
            .min()
    }

    /// Copies not acknowledged yet.
    pub(super) fn unacknowledged(&self) -> usize {
        self.ledger.lock_unacknowledged().len()
    }

    /// Waits until the broker acknowledged every copy, replacing a dead producer and sending
    /// failed copies again meanwhile, for at most `timeout` (`None`: as long as it takes, with
    /// a warning every few seconds). Whether every copy is acknowledged.
    pub(super) fn settle(&mut self, timeout: Option<Duration>) -> bool {
        let started = Instant::now();
        let mut warned = Instant::now();
        loop {
            self.maintain();
            let left = self.unacknowledged();
            if left == 0 {
                return true;
            }
            if timeout.is_some_and(|timeout| started.elapsed() >= timeout) {
                return false;
            }
            if warned.elapsed() >= Duration::from_secs(5) {
                warned = Instant::now();
                tracing::warn!(
                    copies = left,
                    waited_seconds = started.elapsed().as_secs(),
                    "dead-letter copies not acknowledged yet; waiting"
                );
            }
            // Delivery callbacks run on the producer's own thread; a flush just waits for them.
            let _ = self.producer.flush(Duration::from_millis(100));
        }
    }

    /// Deliveries that failed so far (each copy is sent again until stored).
    pub(super) fn failures(&self) -> u64 {
        self.ledger.failures.load(Ordering::Relaxed)
    }

    /// How many times the producer was replaced.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }
}

fn create(
    client_config: &ClientConfig,
    ledger: &Arc<Ledger>,
) -> Result<ThreadedProducer<DlqContext>, KafkaError> {
    client_config.create_with_context(DlqContext {
        ledger: Arc::clone(ledger),
        dead: OnceLock::new(),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic in a test is a test failure

    use testkit::tansu::Broker;

    use super::*;

    /// The dataflow's producer never times a copy out (`message.timeout.ms=0`), which is what
    /// keeps a stall from fencing it. This one does, after 2 s, like the ingest API's: a 10 s
    /// stall of its own broker then fails the copies in flight, and librdkafka's request for a
    /// new producer epoch makes tansu fence the producer, after which it never delivers again.
    /// Every copy must still end up in the topic, through a new producer, and only then may
    /// `settle` say so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn copies_survive_failed_deliveries_and_a_dead_producer() {
        let mut broker = Broker::start();
        broker.wait_until_listening().await;
        let topic = testkit::unique_topic("dead-letters");
        testkit::create_topic_at(&broker.brokers(), &topic, 1).await;
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", broker.brokers())
            .set("message.timeout.ms", "2000")
            .set("acks", "all")
            .set("enable.idempotence", "true");
        let copy = |n: u64| Copy {
            epoch: n,
            key: Some(format!("key{n}").into_bytes()),
            payload: format!("copy {n}").into_bytes(),
            headers: vec![("n".to_owned(), n.to_string())],
        };
        let (broker, sent, dead_letters) = tokio::task::spawn_blocking(move || {
            let mut dead_letters = DeadLetters::new(config, topic.clone()).unwrap();
            let mut sent = 0;
            for n in 0..10 {
                dead_letters.send(copy(n));
                sent += 1;
            }
            assert!(dead_letters.settle(Some(Duration::from_secs(20))));
            // Copies in flight when the broker freezes, and more while it is frozen.
            broker.signal("STOP");
            for n in 10..20 {
                dead_letters.send(copy(n));
                sent += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            assert_eq!(dead_letters.unacknowledged_before(), Some(10));
            std::thread::sleep(Duration::from_secs(8));
            broker.signal("CONT");
            for n in 20..30 {
                dead_letters.send(copy(n));
                sent += 1;
            }
            assert!(
                dead_letters.settle(Some(Duration::from_secs(30))),
                "{} copies never acknowledged (producer replaced {} times)",
                dead_letters.unacknowledged(),
                dead_letters.generation()
            );
            (broker, sent, (dead_letters, topic))
        })
        .await
        .unwrap();
        let (dead_letters, topic) = dead_letters;
        assert!(dead_letters.failures() > 0, "no delivery failed: no stall");
        assert_eq!(dead_letters.unacknowledged_before(), None);
        eprintln!(
            "{} failed deliveries, producer replaced {} times",
            dead_letters.failures(),
            dead_letters.generation()
        );
        // Every copy is there; one may be there twice (at least once).
        let records = testkit::read_topic_at_least(
            &broker.brokers(),
            &topic,
            1,
            sent,
            Duration::from_secs(20),
        )
        .await;
        let stored: BTreeSet<String> = records
            .iter()
            .map(|r| String::from_utf8(r.value.clone()).unwrap())
            .collect();
        let expected: BTreeSet<String> = (0..sent as u64).map(|n| format!("copy {n}")).collect();
        assert_eq!(stored, expected);
    }
}
