//! The broker and HTTP helpers: topics, reading and producing on the test broker, one HTTP
//! request to a test server.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::brokers;

/// Creates a topic on the test broker and waits until its metadata shows every partition.
pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_at(&brokers(), name, partitions).await;
}

/// Creates a topic on the broker at `brokers` (a test that runs its own broker) and waits until
/// its metadata shows every partition.
pub async fn create_topic_at(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .unwrap_or_else(|e| {
            panic!("cannot reach the test broker at {brokers}: {e}; run scripts/test.sh")
        });
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("creating {topic}: {code}"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(name), Duration::from_secs(2))
            .unwrap();
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == name)
            .map_or(0, |t| t.partitions().len());
        if found == partitions as usize {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "topic {name} never showed {partitions} partitions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A message as read back: partition, offset, key, value and headers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Record {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Reads every message of `topic` from the beginning of its `partitions` until `count` have
/// arrived, or panics after `timeout`. Runs on a blocking thread.
pub async fn read_topic(
    topic: &str,
    partitions: i32,
    count: usize,
    timeout: Duration,
) -> Vec<Record> {
    read_topic_at(&brokers(), topic, partitions, count, timeout).await
}

/// [`read_topic`] from the broker at `brokers` (a test that runs its own broker).
pub async fn read_topic_at(
    brokers: &str,
    topic: &str,
    partitions: i32,
    count: usize,
    timeout: Duration,
) -> Vec<Record> {
    read(brokers, topic, partitions, count, timeout, true).await
}

/// Reads every message of `topic` at `brokers` from the beginning of its `partitions` until at
/// least `count` have arrived and no more come for a moment, or panics after `timeout`: for a
/// topic that may hold duplicates (an at-least-once producer).
pub async fn read_topic_at_least(
    brokers: &str,
    topic: &str,
    partitions: i32,
    count: usize,
    timeout: Duration,
) -> Vec<Record> {
    read(brokers, topic, partitions, count, timeout, false).await
}

/// Reads `count` messages, and with `exactly` fails if there are more, else takes them too.
async fn read(
    brokers: &str,
    topic: &str,
    partitions: i32,
    count: usize,
    timeout: Duration,
    exactly: bool,
) -> Vec<Record> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "streamrec-tests")
            .set("enable.auto.commit", "false")
            // tansu holds a fetch until this wait expires; keep it short (docs/tansu.md, 2).
            .set("fetch.wait.max.ms", "5")
            .create()
            .unwrap();
        let mut assignment = TopicPartitionList::new();
        for p in 0..partitions {
            assignment
                .add_partition_offset(&topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&assignment).unwrap();
        let deadline = Instant::now() + timeout;
        let mut records = Vec::new();
        let mut quiet_since = Instant::now();
        loop {
            if records.len() >= count
                && (exactly || quiet_since.elapsed() >= Duration::from_millis(500))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "read {} of {count} messages from {topic}",
                records.len()
            );
            if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                quiet_since = Instant::now();
                let message = message.unwrap();
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| {
                                let value =
                                    h.value.map(String::from_utf8_lossy).unwrap_or_default();
                                (h.key.to_owned(), value.into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(Record {
                    partition: message.partition(),
                    offset: message.offset(),
                    key: message.key().unwrap_or_default().to_vec(),
                    value: message.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
        }
        if exactly {
            // Nothing more than expected may be there.
            let extra = consumer.poll(Duration::from_millis(300));
            assert!(extra.is_none(), "more messages than expected in {topic}");
        }
        records
    })
    .await
    .unwrap()
}

/// Distinct keys of records, as strings.
pub fn keys(records: &[Record]) -> HashSet<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.key.clone()).unwrap())
        .collect()
}

/// One HTTP/1.1 request over a fresh connection; the status and the body.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// Publishes `value` with `key` to `topic` and waits for the broker's acknowledgement.
pub async fn produce(topic: &str, key: Option<&str>, value: &[u8]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    produce_with(&producer, topic, key, value).await;
}

/// Publishes with a producer the caller keeps, for many messages.
pub async fn produce_with(producer: &FutureProducer, topic: &str, key: Option<&str>, value: &[u8]) {
    let mut record = FutureRecord::<str, [u8]>::to(topic).payload(value);
    if let Some(key) = key {
        record = record.key(key);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .unwrap();
}

/// A producer for [`produce_with`].
pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "2")
        .create()
        .unwrap()
}
