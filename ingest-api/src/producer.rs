//! The Kafka producer of profile messages: idempotent, `acks=all`, bounded in time so that a
//! request never hangs on a broker that is down, and replaced when librdkafka declares it dead.
//!
//! An idempotent librdkafka producer can end up dead for good: after a broker (tansu, for one)
//! stalls long enough for in-flight messages to time out, the producer asks for a new epoch, the
//! broker fences its producer id, and from then on every message fails with `ProducerFenced`,
//! although librdkafka does not flag that as a fatal error. It can also raise a fatal error
//! proper (`fatal_error()`), after which every send fails too. So the librdkafka instance here is
//! a numbered *generation*: a send that fails with such an error marks its generation dead, and
//! the first caller (a publish or the health check) that finds the current generation dead
//! replaces it with a new instance, which gets a new producer id; callers that find it already
//! replaced just use the new one. Requests that were in flight on the dead generation fail (503)
//! and later ones go to the new one. (docs/tansu.md, 4.)

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::config::Config;

/// Where the broker stored an acknowledged message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub partition: i32,
    pub offset: i64,
}

/// Why a message was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker did not acknowledge within {0:?}")]
    Timeout(Duration),
    #[error("broker refused or lost the message: {0}")]
    Kafka(#[from] KafkaError),
}

/// Why publishing cannot succeed now, as the health check sees it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HealthError {
    #[error("the producer is dead ({0}); it is being replaced")]
    Dead(String),
    #[error("broker metadata unreachable: {0}")]
    Unreachable(KafkaError),
    #[error("the profile topic does not exist")]
    TopicMissing,
}

/// How long a health check's answer is reused: a load balancer or an orchestrator probing often
/// costs the broker one metadata request a second at most.
const HEALTH_CACHE: Duration = Duration::from_secs(1);

/// How long a health check waits for the broker's metadata.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// What the broker told a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicHealth {
    pub brokers: usize,
    pub partitions: usize,
}

/// Publishes profile messages to one topic. Cheap to clone: clones share the producer.
#[derive(Clone)]
pub struct ProfileProducer {
    inner: Arc<Inner>,
}

struct Inner {
    /// The settings every generation is created from.
    client_config: ClientConfig,
    topic: String,
    timeout: Duration,
    /// The generation new sends go to.
    current: Mutex<Arc<Generation>>,
    /// The last health answer, when it was taken, and of which generation. The async lock makes
    /// concurrent checks wait for one metadata request instead of each sending their own.
    health: tokio::sync::Mutex<Option<CachedHealth>>,
}

struct CachedHealth {
    at: Instant,
    generation: u64,
    result: Result<TopicHealth, HealthError>,
}

/// One librdkafka producer instance and its number.
struct Generation {
    number: u64,
    /// Always `Some` until dropped.
    producer: Option<FutureProducer>,
    /// Why a send on it showed that it will never deliver again, once one did.
    dead: OnceLock<String>,
}

impl Generation {
    fn producer(&self) -> &FutureProducer {
        self.producer
            .as_ref()
            .expect("a generation's producer is taken only when it is dropped")
    }

    fn new(number: u64, producer: FutureProducer) -> Self {
        Generation {
            number,
            producer: Some(producer),
            dead: OnceLock::new(),
        }
    }

    /// Why this producer will never deliver again, if it will not: librdkafka's fatal error, or
    /// an error a send met that this producer id cannot get past.
    fn death(&self) -> Option<String> {
        self.producer()
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("fatal error {code:?}: {reason}"))
            .or_else(|| self.dead.get().cloned())
    }

    /// Marks the generation dead if `error` says its producer id is.
    fn note(&self, error: &KafkaError) {
        // ProducerFenced: the broker gave this producer id's epoch to someone else (or
        // refused a bump); librdkafka keeps failing every message with it. Fatal: librdkafka's
        // own fatal state, seen by a message.
        if let Some(code @ (RDKafkaErrorCode::ProducerFenced | RDKafkaErrorCode::Fatal)) =
            error.rdkafka_error_code()
        {
            let _ = self.dead.set(format!("a send failed with {code:?}"));
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Destroying a librdkafka producer blocks for up to a second or so (it purges, flushes
        // for up to 500 ms and joins its threads), and the last holder of a replaced generation
        // may be a request handler on an async thread: destroy it on a blocking thread.
        if let Some(producer) = self.producer.take() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn_blocking(move || drop(producer));
            }
        }
    }
}

impl std::fmt::Debug for ProfileProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileProducer")
            .field("topic", &self.inner.topic)
            .field("timeout", &self.inner.timeout)
            .field("generation", &self.current().number)
            .finish_non_exhaustive()
    }
}

impl ProfileProducer {
    /// Creates the producer. It connects lazily: a broker that is down shows in the first
    /// publish or health check, not here.
    pub fn new(config: &Config) -> Result<Self, KafkaError> {
        let timeout = config.publish_timeout();
        // librdkafka must give up on a message a little before the request's own deadline, so
        // that the client hears 503 from us rather than a timeout from its own side.
        let message_timeout = timeout
            .saturating_sub(Duration::from_millis(250))
            .max(Duration::from_millis(50));
        let mut client_config = ClientConfig::new();
        client_config
            .set("bootstrap.servers", &config.shared.brokers)
            // A retried send is stored once: the broker deduplicates by producer id and sequence.
            .set("enable.idempotence", "true")
            // A request answers 200 only once every in-sync replica holds the message.
            .set("acks", "all")
            // A short batching window: under load the concurrent requests share a batch; a lone
            // request waits at most this long before its message leaves.
            .set("linger.ms", config.linger_ms.to_string())
            // Bounded delivery time, so a broker that is down gives an error, never a hang.
            .set(
                "message.timeout.ms",
                message_timeout.as_millis().to_string(),
            )
            // The Java client's key hashing (murmur2), which the original Python producer used
            // too: a user's messages land on the same partition as they did before the switch.
            .set("partitioner", "murmur2_random")
            // Fail fast and visibly on a missing topic instead of creating one with defaults.
            .set("allow.auto.create.topics", "false");
        // The user's -X / KAFKA_CONFIG_FILE properties (security, client id, tuning), last so
        // that they win; the ones set above for correctness are refused at start.
        config.shared.kafka().apply(&mut client_config);
        let producer: FutureProducer = client_config.create()?;
        Ok(ProfileProducer {
            inner: Arc::new(Inner {
                client_config,
                topic: config.shared.topic.clone(),
                timeout,
                current: Mutex::new(Arc::new(Generation::new(0, producer))),
                health: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The topic messages go to.
    pub fn topic(&self) -> &str {
        &self.inner.topic
    }

    /// How many times the producer was replaced after it died.
    pub fn generation(&self) -> u64 {
        self.current().number
    }

    fn current(&self) -> Arc<Generation> {
        // A panic while the lock was held cannot leave the Arc half-written.
        Arc::clone(
            &self
                .inner
                .current
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// The current generation, replaced first if it is dead.
    fn usable(&self) -> Arc<Generation> {
        let generation = self.current();
        match generation.death() {
            None => generation,
            Some(_) => self.replace(&generation),
        }
    }

    /// Replaces `failed` with a new generation if it is dead and still the current one, and
    /// returns the current generation. Of many callers that saw the same dead generation, the
    /// first replaces it and the others get its replacement.
    fn replace(&self, failed: &Generation) -> Arc<Generation> {
        let mut current = self
            .inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if current.number != failed.number {
            return Arc::clone(&current);
        }
        let Some(reason) = failed.death() else {
            return Arc::clone(&current);
        };
        // Creating a producer spawns its threads and returns; it does not wait for the network.
        match self.inner.client_config.create::<FutureProducer>() {
            Ok(producer) => {
                tracing::warn!(
                    %reason,
                    generation = failed.number + 1,
                    "the Kafka producer is dead; replaced it with a new one"
                );
                *current = Arc::new(Generation::new(failed.number + 1, producer));
            }
            Err(error) => {
                // Keep the dead one: the next request or health check tries again.
                tracing::error!(%reason, %error, "the Kafka producer is dead and cannot be replaced");
            }
        }
        Arc::clone(&current)
    }

    /// Publishes one message and waits for the broker's acknowledgement, at most the publish
    /// timeout.
    pub async fn publish(
        &self,
        key: &str,
        payload: &[u8],
    ) -> Result<(Delivery, Duration), PublishError> {
        let generation = self.usable();
        let started = Instant::now();
        let record = FutureRecord::to(&self.inner.topic)
            .key(key)
            .payload(payload);
        let send = generation
            .producer()
            .send(record, Timeout::After(self.inner.timeout));
        let result = match tokio::time::timeout(self.inner.timeout, send).await {
            Ok(Ok(delivery)) => Ok((
                Delivery {
                    partition: delivery.partition,
                    offset: delivery.offset,
                },
                started.elapsed(),
            )),
            Ok(Err((error, _message))) => {
                generation.note(&error);
                Err(PublishError::Kafka(error))
            }
            Err(_elapsed) => Err(PublishError::Timeout(self.inner.timeout)),
        };
        if result.is_err() {
            // Replace it now rather than on the next request, so that the health check and the
            // next request see a live producer.
            self.replace(&generation);
        }
        result
    }

    /// Whether publishing can succeed now: the producer is not dead, a broker
    /// answers a metadata request within 2 s, and the topic has partitions. The answer is reused
    /// for a second, unless the producer was replaced since.
    pub async fn health(&self) -> Result<TopicHealth, HealthError> {
        let generation = self.current();
        if let Some(reason) = generation.death() {
            self.replace(&generation);
            return Err(HealthError::Dead(reason));
        }
        let mut cached = self.inner.health.lock().await;
        if let Some(cached) = cached.as_ref() {
            if cached.generation == generation.number && cached.at.elapsed() < HEALTH_CACHE {
                return cached.result.clone();
            }
        }
        let result = match self.check(&generation, HEALTH_TIMEOUT).await {
            Ok(health) if health.partitions > 0 => Ok(health),
            Ok(_) => Err(HealthError::TopicMissing),
            Err(error) => Err(HealthError::Unreachable(error)),
        };
        *cached = Some(CachedHealth {
            at: Instant::now(),
            generation: generation.number,
            result: result.clone(),
        });
        result
    }

    /// Asks the broker for the topic's metadata, within `timeout`.
    async fn check(
        &self,
        generation: &Arc<Generation>,
        timeout: Duration,
    ) -> Result<TopicHealth, KafkaError> {
        let generation = Arc::clone(generation);
        let topic = self.inner.topic.clone();
        // fetch_metadata blocks its thread; keep it off the request threads.
        tokio::task::spawn_blocking(move || {
            generation
                .producer()
                .client()
                .fetch_metadata(Some(&topic), timeout)
                .map(|m| {
                    let partitions = m
                        .topics()
                        .iter()
                        .filter(|t| t.name() == topic && t.error().is_none())
                        .map(|t| t.partitions().len())
                        .sum();
                    TopicHealth {
                        brokers: m.brokers().len(),
                        partitions,
                    }
                })
        })
        .await
        .map_err(|_| KafkaError::Canceled)?
    }

    /// Waits for every queued message to be delivered or to fail, at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let generation = self.current();
        tokio::task::spawn_blocking(move || generation.producer().flush(Timeout::After(timeout)))
            .await
            .map_err(|_| KafkaError::Canceled)?
    }
}
