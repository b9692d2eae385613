//! The Kafka producer of profile messages: idempotent, `acks=all`, and bounded in time so that a
//! request never hangs on a broker that is down.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
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

/// What the broker told a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicHealth {
    pub brokers: usize,
    pub partitions: usize,
}

/// Publishes profile messages to one topic.
#[derive(Clone)]
pub struct ProfileProducer {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl std::fmt::Debug for ProfileProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileProducer")
            .field("topic", &self.topic)
            .field("timeout", &self.timeout)
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
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
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
            .set("allow.auto.create.topics", "false")
            .create()?;
        Ok(ProfileProducer {
            producer,
            topic: config.topic.clone(),
            timeout,
        })
    }

    /// The topic messages go to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Publishes one message and waits for the broker's acknowledgement, at most the publish
    /// timeout.
    pub async fn publish(
        &self,
        key: &str,
        payload: &[u8],
    ) -> Result<(Delivery, Duration), PublishError> {
        let started = Instant::now();
        let record = FutureRecord::to(&self.topic).key(key).payload(payload);
        let send = self.producer.send(record, Timeout::After(self.timeout));
        match tokio::time::timeout(self.timeout, send).await {
            Ok(Ok(delivery)) => Ok((
                Delivery {
                    partition: delivery.partition,
                    offset: delivery.offset,
                },
                started.elapsed(),
            )),
            Ok(Err((error, _message))) => Err(PublishError::Kafka(error)),
            Err(_elapsed) => Err(PublishError::Timeout(self.timeout)),
        }
    }

    /// Asks the broker for the topic's metadata, within `timeout`.
    pub async fn check(&self, timeout: Duration) -> Result<TopicHealth, KafkaError> {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        // fetch_metadata blocks its thread; keep it off the request threads.
        let metadata = tokio::task::spawn_blocking(move || {
            producer
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
        .map_err(|_| KafkaError::Canceled)?;
        metadata
    }

    /// Waits for every queued message to be delivered or to fail, at most `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)))
            .await
            .map_err(|_| KafkaError::Canceled)?
    }
}
