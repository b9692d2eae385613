//! The broker side of a benchmark: a fresh topic, preloaded as fast as the producer goes, and
//! the raw rate at which consumers can read it back and discard it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Creates `name` with `partitions` partitions.
pub fn create_topic(brokers: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = futures::executor::block_on(admin.create_topics([&topic], &options))?;
    for result in results {
        result.map_err(|(topic, code)| anyhow::anyhow!("creating {topic}: {code}"))?;
    }
    Ok(())
}

/// The topics a run created, deleted when it ends however it ends: a broker that keeps topics
/// in memory (tansu with `memory://`) otherwise holds every run's messages until the machine
/// runs out (docs/tansu.md, 5).
#[derive(Debug)]
pub struct RunTopics {
    brokers: String,
    names: Vec<String>,
    /// Leave them for inspection instead.
    pub keep: bool,
}

impl RunTopics {
    pub fn new(brokers: &str, keep: bool) -> Self {
        RunTopics {
            brokers: brokers.to_owned(),
            names: Vec::new(),
            keep,
        }
    }

    /// Creates `name` with `partitions` partitions, to be deleted with the others.
    pub fn create(&mut self, name: &str, partitions: i32) -> anyhow::Result<()> {
        create_topic(&self.brokers, name, partitions)?;
        self.names.push(name.to_owned());
        Ok(())
    }

    /// Deletes `name` now, unless the run keeps its topics. A topic that cannot be deleted is
    /// reported, and tried again with the others at the end.
    pub fn delete(&mut self, name: &str) {
        if self.keep {
            return;
        }
        match delete_topics(&self.brokers, &[name.to_owned()]) {
            Ok(()) => self.names.retain(|n| n != name),
            Err(error) => eprintln!("could not delete the topic {name}: {error:#}"),
        }
    }
}

impl Drop for RunTopics {
    fn drop(&mut self) {
        if self.keep || self.names.is_empty() {
            return;
        }
        match delete_topics(&self.brokers, &self.names) {
            Ok(()) => eprintln!("deleted the run's topics: {}", self.names.join(", ")),
            Err(error) => eprintln!(
                "could not delete the run's topics {}: {error:#}",
                self.names.join(", ")
            ),
        }
    }
}

/// Deletes `names`.
pub fn delete_topics(brokers: &str, names: &[String]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    // Bounded on our side too: with the broker gone, the run's real error waits behind this.
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let results = futures::executor::block_on(admin.delete_topics(&names, &options))?;
    for result in results {
        result.map_err(|(topic, code)| anyhow::anyhow!("deleting {topic}: {code}"))?;
    }
    Ok(())
}

/// Publishes every message (keyed, so a user stays in one partition) and waits until the broker
/// has them all. Returns the time taken.
pub fn preload(
    brokers: &str,
    topic: &str,
    messages: &[(String, Vec<u8>)],
) -> anyhow::Result<Duration> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        // Same key hashing as the ingest API, so the partitioning is what production sees.
        .set("partitioner", "murmur2_random")
        // Throughput over latency: fill large batches.
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()?;
    let started = Instant::now();
    for (key, value) in messages {
        send(&producer, topic, key, value, None)?;
    }
    producer.flush(Duration::from_secs(300))?;
    Ok(started.elapsed())
}

/// Queues one keyed message, waiting while the producer's queue is full, unless `stop` is set
/// meanwhile: a producer whose broker is gone would otherwise wait for room for good.
pub fn send(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: &str,
    value: &[u8],
    stop: Option<&AtomicBool>,
) -> anyhow::Result<()> {
    let mut record = BaseRecord::to(topic).key(key).payload(value);
    loop {
        if stop.is_some_and(|stop| stop.load(Ordering::Relaxed)) {
            anyhow::bail!("{STOPPED}");
        }
        match producer.send(record) {
            Ok(()) => return Ok(()),
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

/// Why a producer given a stop flag gave up.
pub const STOPPED: &str = "the producer stopped: the run it fed has ended";

/// Reads `expected` messages of `topic` back with `consumers` threads (partition p to thread
/// p mod consumers, as the dataflow assigns them), discarding them. Returns the time from the
/// first poll to the last message read.
pub fn consume_all(
    brokers: &str,
    topic: &str,
    partitions: i32,
    consumers: usize,
    expected: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let counts: Vec<anyhow::Result<(usize, Instant)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..consumers)
            .map(|index| {
                scope.spawn(move || -> anyhow::Result<(usize, Instant)> {
                    let consumer: BaseConsumer = ClientConfig::new()
                        .set("bootstrap.servers", brokers)
                        .set("group.id", "streamrec-bench-raw")
                        .set("enable.auto.commit", "false")
                        // As the dataflow: tansu answers an empty fetch only after this wait
                        // (docs/tansu.md, 2).
                        .set("fetch.wait.max.ms", "5")
                        .set("queued.max.messages.kbytes", "65536")
                        .create()?;
                    let mut assignment = TopicPartitionList::new();
                    let mut owned = 0;
                    for p in (0..partitions).filter(|p| *p as usize % consumers == index) {
                        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
                        owned += 1;
                    }
                    if owned == 0 {
                        return Ok((0, started));
                    }
                    consumer.assign(&assignment)?;
                    let mut count = 0;
                    let mut last = started;
                    // A thread's share is not known in advance: read until a quiet second.
                    while last.elapsed() < Duration::from_secs(1) {
                        match consumer.poll(Duration::from_millis(50)) {
                            Some(Ok(_)) => {
                                count += 1;
                                last = Instant::now();
                            }
                            Some(Err(error)) => return Err(error.into()),
                            None => {}
                        }
                    }
                    Ok((count, last))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("consumer panicked")))
            })
            .collect()
    });
    let (mut total, mut last) = (0, started);
    for count in counts {
        let (count, at) = count?;
        total += count;
        last = last.max(at);
    }
    anyhow::ensure!(
        total == expected,
        "read {total} messages back, expected {expected}"
    );
    Ok(last.duration_since(started))
}
