//! The latency measurement: messages produced at a fixed rate while the dataflow runs, as a
//! live service sees them, instead of a preloaded backlog read as fast as it goes. Each epoch's
//! latency (from its close to the Redis acknowledgement of its output) is what the dataflow's
//! own stats report; this module paces the producer and summarises the latencies.

use std::time::{Duration, Instant};

use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;

use crate::e2e::EpochStat;

/// Publishes `messages` to `topic` at `rate` messages per second, spread evenly (one slice a
/// millisecond), and waits until the broker has them all. Returns the time taken.
pub fn produce_paced(
    brokers: &str,
    topic: &str,
    messages: &[(String, Vec<u8>)],
    rate: f64,
) -> anyhow::Result<Duration> {
    anyhow::ensure!(rate > 0.0, "the rate must be positive");
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Same key hashing as the ingest API, so the partitioning is what production sees.
        .set("partitioner", "murmur2_random")
        // Latency over throughput: a message waits at most 1 ms for its batch, as the ingest
        // API's producer does, so the epochs see the pace that was asked for.
        .set("linger.ms", "1")
        .create()?;
    let started = Instant::now();
    for (i, (key, value)) in messages.iter().enumerate() {
        // Message i is due i / rate seconds after the start.
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        let now = Instant::now();
        if due > now + Duration::from_millis(1) {
            std::thread::sleep(due - now);
        }
        let mut record = BaseRecord::to(topic)
            .key(key.as_str())
            .payload(value.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => return Err(error.into()),
            }
        }
    }
    producer.flush(Duration::from_secs(60))?;
    Ok(started.elapsed())
}

/// Latency percentiles of the epochs that read messages.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Latencies {
    /// Epochs counted.
    pub epochs: usize,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

/// The latencies of the epochs that read messages, leaving out those that started within
/// `warmup_ms` of the first such epoch (the dataflow's connections and first fetches), or
/// `None` if no epoch is left. Percentiles are nearest-rank.
pub fn latencies(epochs: &[EpochStat], warmup_ms: u64) -> Option<Latencies> {
    let first = epochs.iter().find(|e| e.messages > 0)?.epoch;
    let mut values: Vec<u64> = epochs
        .iter()
        .filter(|e| e.messages > 0 && e.epoch >= first + warmup_ms)
        .map(|e| e.latency_ms)
        .collect();
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank =
        |p: f64| values[((p * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
    Some(Latencies {
        epochs: values.len(),
        p50_ms: rank(0.50),
        p99_ms: rank(0.99),
        max_ms: values[values.len() - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(epoch: u64, messages: u64, latency_ms: u64) -> EpochStat {
        EpochStat {
            epoch,
            messages,
            invalid: 0,
            stale: 0,
            changed: messages,
            redis_writes: messages,
            latency_ms,
        }
    }

    #[test]
    fn percentiles_skip_the_warmup_and_idle_epochs() {
        let mut epochs = vec![epoch(1_000, 5, 900), epoch(1_100, 0, 0)];
        // 100 epochs after the warm-up, latencies 1..=100 ms.
        epochs.extend((1..=100).map(|i| epoch(2_000 + i * 100, 10, i)));
        let l = latencies(&epochs, 1_000).unwrap();
        assert_eq!(l.epochs, 100);
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (50, 99, 100));
        // Without a warm-up the slow first epoch counts.
        assert_eq!(latencies(&epochs, 0).unwrap().max_ms, 900);
        assert_eq!(latencies(&[epoch(1, 0, 0)], 0), None);
    }
}
