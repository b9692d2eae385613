//! The latency measurement: messages produced at a fixed rate while the dataflow runs, as a
//! live service sees them, instead of a preloaded backlog read as fast as it goes. Each epoch's
//! latency (from its close to the Redis acknowledgement of its output) is what the dataflow's
//! own stats report; this module paces the producer and summarises the latencies.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;

use crate::e2e::EpochStat;

/// Publishes `count` messages, message `i` being `message(i)` (a key and a value), to `topic`
/// at `rate` messages per second, spread evenly, in producer batches of up to `linger`, and
/// waits until the broker has them all. Returns the time taken. Gives up as soon as `stop` is
/// set: the run it feeds has ended, and a producer whose broker is gone would otherwise wait
/// for room in its queue for good.
pub fn produce_paced(
    brokers: &str,
    topic: &str,
    count: usize,
    message: impl Fn(usize) -> (String, Vec<u8>),
    rate: f64,
    linger: Duration,
    stop: &AtomicBool,
) -> anyhow::Result<Duration> {
    anyhow::ensure!(rate > 0.0, "the rate must be positive");
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Same key hashing as the ingest API, so the partitioning is what production sees.
        .set("partitioner", "murmur2_random")
        // How long a message may wait for its batch. Small batches cost the broker a request
        // each, and with 1 ms batches the broker, not the dataflow, set the epochs' latency
        // (docs/tansu.md, 6).
        .set("linger.ms", linger.as_millis().to_string())
        .create()?;
    let started = Instant::now();
    for i in 0..count {
        let (key, value) = message(i);
        // Message i is due i / rate seconds after the start.
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        let now = Instant::now();
        if due > now + Duration::from_millis(1) {
            std::thread::sleep(due - now);
        }
        crate::broker::send(&producer, topic, &key, &value, Some(stop))?;
    }
    // Until the broker has them all.
    while producer.flush(Duration::from_millis(100)).is_err() {
        if stop.load(Ordering::Relaxed) {
            anyhow::bail!("{}", crate::broker::STOPPED);
        }
    }
    Ok(started.elapsed())
}

/// How long after the first epoch that read messages the latency percentiles begin: the
/// dataflow's connections and first fetches are no measure of the pipeline.
pub const WARMUP_MS: u64 = 1_000;

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
    let first = epochs.iter().find(|e| e.counters.messages > 0)?.epoch;
    let mut values: Vec<u64> = epochs
        .iter()
        .filter(|e| e.counters.messages > 0 && e.epoch >= first + warmup_ms)
        .map(|e| e.counters.latency_ms)
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

    use crate::e2e::tests::epoch;

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
