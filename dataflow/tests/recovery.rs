//! Broker-fault recovery end to end: the dataflow binary (two workers) against a tansu broker of
//! its own (`testkit::tansu`), which the test freezes with SIGSTOP for 12 s while messages keep
//! being produced (the producer's sends just wait), then thaws. Afterwards the dataflow must
//! read on by itself: every user's value in Redis is the sequential reference's over what the
//! profile topic holds, the dead-letter topic holds every invalid message, the group's committed
//! offsets reach the end of every partition, the stall was reported (a rate-limited warning, the
//! metrics) and cleared, and SIGTERM still ends the run with 0. The same with a restart
//! instead of the freeze; and a commit made while the broker is down must reach it, also for a
//! partition that gets no message after it.
//!
//! Redis is the shared test Redis (`STREAMREC_TEST_REDIS`); the users' ids are the test's own.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataflow::reference::{vectors_agree, Reference, ReferenceProfile};
use profile::ProfileMessage;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;
use testkit::tansu::Broker;
use testkit::{create_topic_at, http, read_topic_at_least, unique_topic};

const PARTITIONS: i32 = 4;
const STALL: Duration = Duration::from_secs(12);
const RESTART_DOWN: Duration = Duration::from_secs(6);
/// Features of the test items (D = 2); `unknown` has none.
const FEATURES: &str = "item_id,f0,f1\napple,1,0\nbanana,0,1\ncherry,0.5,0.5\n";
const ITEMS: [&str; 4] = ["apple", "banana", "cherry", "unknown"];

/// The running dataflow: its stats lines (stdout) and log lines (stderr, JSON), both kept.
struct Dataflow {
    child: Child,
    stats: testkit::process::JsonLines,
    logs: Arc<Mutex<Vec<Value>>>,
    metrics: std::net::SocketAddr,
}

impl Dataflow {
    fn spawn(args: &[String]) -> Dataflow {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dataflow"))
            .args(args)
            .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stats = testkit::process::JsonLines::from_stdout(&mut child);
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = Arc::clone(&logs);
        let (found, addr) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let Ok(value) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if let Some(addr) = value["metrics_addr"].as_str() {
                    let _ = found.send(addr.parse().unwrap());
                }
                sink.lock().unwrap().push(value);
            }
        });
        let metrics = addr
            .recv_timeout(Duration::from_secs(30))
            .expect("no metrics_addr logged within 30 s");
        Dataflow {
            child,
            stats,
            logs,
            metrics,
        }
    }

    /// Sum of a stats field over the epochs reported so far (each reported once its output is
    /// durable in Redis).
    fn total(&self, field: &str) -> u64 {
        self.stats.total(field)
    }

    fn wait_for(&self, field: &str, at_least: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.total(field) < at_least {
            assert!(
                Instant::now() < deadline,
                "{field}: {} of {at_least} after {within:?}",
                self.total(field)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("the dataflow exited with {status}");
        }
    }

    /// The log lines whose message starts with `message`, so far.
    fn logged(&self, message: &str) -> Vec<Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .cloned()
            .collect()
    }

    /// The metrics' samples whose name starts with `prefix`, by name with labels.
    async fn samples(&self, prefix: &str) -> BTreeMap<String, f64> {
        let (status, text) = http(self.metrics, "GET", "/metrics", "").await;
        assert_eq!(status, 200, "{text}");
        testkit::prometheus::parse_exposition(&text)
            .into_iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .collect()
    }
}

impl Drop for Dataflow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the test produced: messages it had acknowledged, and how many sends failed.
#[derive(Default)]
struct Produced {
    acked: u64,
    failed: u64,
}

/// A profile message of `user` at `timestamp`, with a history made of the test items.
fn valid(user: &str, timestamp: u64) -> Vec<u8> {
    let n = timestamp as usize;
    let history: Vec<String> = (0..1 + n % 4)
        .map(|k| ITEMS[(n + k) % ITEMS.len()].to_owned())
        .collect();
    serde_json::to_vec(&ProfileMessage {
        user_id: user.to_owned(),
        history_items: history,
        timestamp,
    })
    .unwrap()
}

/// A message the dataflow must dead-letter: not JSON. Its payload names it, to be found in the
/// dead-letter topic.
fn invalid(n: u64) -> Vec<u8> {
    format!("{{not json {n}").into_bytes()
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "2")
        // The test's sends wait through the stall rather than fail; the dataflow's side is what
        // is tested, and the reference is built from what the topic holds anyway.
        .set("message.timeout.ms", "120000")
        .set("enable.idempotence", "false")
        .create()
        .unwrap()
}

async fn send(producer: &FutureProducer, topic: &str, key: &str, value: &[u8]) -> bool {
    producer
        .send(
            FutureRecord::to(topic).key(key).payload(value),
            Duration::from_secs(120),
        )
        .await
        .is_ok()
}

/// The group's committed offset of every partition of `topic` (-1 for none).
fn committed(brokers: &str, group: &str, topic: &str) -> Vec<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        list.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    (0..PARTITIONS)
        .map(
            |p| match committed.find_partition(topic, p).unwrap().offset() {
                Offset::Offset(offset) => offset,
                _ => -1,
            },
        )
        .collect()
}

/// A run's topics (the profile topic with `PARTITIONS` partitions, the item and dead-letter
/// topics with one), group and features file.
struct Topics {
    topic: String,
    item_topic: String,
    dlq_topic: String,
    group: String,
    features: tempfile::NamedTempFile,
}

impl Topics {
    async fn create(brokers: &str, name: &str) -> Topics {
        let topic = unique_topic(name);
        let topics = Topics {
            item_topic: format!("{topic}.items"),
            dlq_topic: format!("{topic}.dlq"),
            group: format!("{topic}.group"),
            features: tempfile::NamedTempFile::new().unwrap(),
            topic,
        };
        create_topic_at(brokers, &topics.topic, PARTITIONS).await;
        create_topic_at(brokers, &topics.item_topic, 1).await;
        create_topic_at(brokers, &topics.dlq_topic, 1).await;
        std::fs::write(topics.features.path(), FEATURES).unwrap();
        topics
    }

    /// The dataflow's arguments: two workers, epochs of `epoch_ms`, and librdkafka's requests
    /// given up after `socket_timeout_ms`.
    fn args(&self, brokers: &str, epoch_ms: u64, socket_timeout_ms: u64) -> Vec<String> {
        let redis = testkit::redis_url();
        let run = testkit::process::DataflowRun {
            brokers,
            topic: &self.topic,
            item_topic: &self.item_topic,
            dlq_topic: &self.dlq_topic,
            group: &self.group,
            redis: &redis,
            item_features: self.features.path(),
        };
        let mut args = run.args(epoch_ms);
        args.extend([
            "-w".to_owned(),
            "2".to_owned(),
            "-X".to_owned(),
            format!("socket.timeout.ms={socket_timeout_ms}"),
        ]);
        args
    }
}

/// What the test does to the broker.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// SIGSTOP, 12 s, SIGCONT.
    Stall,
    /// SIGTERM, 6 s down, started again on its sqlite storage.
    Restart,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dataflow_reads_on_after_the_broker_stalls() {
    scenario(Fault::Stall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dataflow_reads_on_after_the_broker_restarts() {
    scenario(Fault::Restart).await;
}

/// A commit made while the broker is down reaches it, also for a partition that gets nothing
/// after it: messages of one partition read, the broker stopped before their epoch (3 s long)
/// ends, so that the epoch's commit is made while it is down; back, with nothing more to read,
/// the group's committed offset must still reach the partition's end (librdkafka retries such
/// a commit, and each of the source's commits carries every partition's position).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_made_while_the_broker_is_down_reaches_it() {
    let mut broker = Broker::start_sqlite();
    broker.wait_until_listening().await;
    let brokers = broker.brokers();
    let run = Topics::create(&brokers, "recommit").await;
    let topic = run.topic.clone();
    let user = format!("{}_u", topic.replace('-', "_"));
    // A commit to the stopped broker fails after 3 s, not 60.
    let args = run.args(&brokers, 3000, 3000);
    let dataflow = Dataflow::spawn(&args);
    let producer = producer(&brokers);
    // One user, so one partition.
    const MESSAGES: u64 = 5;
    for n in 0..MESSAGES {
        assert!(send(&producer, &topic, &user, &valid(&user, 100 + n)).await);
    }
    let read = |samples: &BTreeMap<String, f64>| -> Option<usize> {
        samples
            .iter()
            .filter(|(name, _)| name.starts_with("streamrec_dataflow_messages_read_total{"))
            .filter(|(name, _)| name.contains(&format!("topic=\"{topic}\"")))
            .find(|(_, &count)| count as u64 == MESSAGES)
            .map(|(name, _)| {
                let label = name.split("partition=\"").nth(1).unwrap();
                label[..label.find('"').unwrap()].parse().unwrap()
            })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let partition = loop {
        if let Some(partition) = read(&dataflow.samples("streamrec_dataflow_").await) {
            break partition;
        }
        assert!(
            Instant::now() < deadline,
            "the messages were not read in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // Down for longer than the epoch and the commit's timeout together.
    let mut broker = tokio::task::spawn_blocking(move || {
        broker.restart(RESTART_DOWN);
        broker
    })
    .await
    .unwrap();
    broker.wait_until_listening().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = tokio::task::spawn_blocking({
            let (brokers, group, topic) = (brokers.clone(), run.group.clone(), topic.clone());
            move || committed(&brokers, &group, &topic)
        })
        .await
        .unwrap();
        if now[partition] == MESSAGES as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "partition {partition}'s committed offset is {} after the restart, not {MESSAGES}",
            now[partition]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn scenario(fault: Fault) {
    let started = Instant::now();
    let mut broker = match fault {
        Fault::Stall => Broker::start(),
        Fault::Restart => Broker::start_sqlite(),
    };
    broker.wait_until_listening().await;
    let brokers = broker.brokers();
    let run = Topics::create(&brokers, "recovery").await;
    let (topic, dlq_topic, group) = (run.topic.clone(), run.dlq_topic.clone(), run.group.clone());
    // Users of this run only, so that the shared Redis' other contents do not matter.
    let prefix = topic.replace('-', "_");
    let user = move |n: u64| format!("{prefix}_u{n}");
    // The clients give up on a request after 4 s instead of 60: the 12 s stall then outlasts
    // their timeouts, so connections are torn down and rebuilt (the harder case, as a stall of
    // minutes would be with the defaults).
    let args = run.args(&brokers, 50, 4000);
    let mut dataflow = Dataflow::spawn(&args);
    let producer = producer(&brokers);

    // Batch 1: users 0..20, and 4 invalid messages.
    let mut sent = 0;
    for n in 0..20 {
        assert!(send(&producer, &topic, &user(n), &valid(&user(n), 100 + n)).await);
        sent += 1;
    }
    for n in 0..4 {
        assert!(send(&producer, &topic, &user(n), &invalid(n)).await);
        sent += 1;
    }
    dataflow.wait_for("messages", sent, Duration::from_secs(30));
    dataflow.wait_for("invalid", 4, Duration::from_secs(10));

    // A trickle of updates of old users, new users and invalid messages, one every 25 ms, from
    // before the stall to after it: the dataflow has dead-letter copies in flight when the
    // broker freezes, and messages wait to be read when it thaws.
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(1_000));
    let trickle = {
        let (producer, topic, stop, counter) = (
            producer.clone(),
            topic.clone(),
            Arc::clone(&stop),
            Arc::clone(&counter),
        );
        let user = user.clone();
        tokio::spawn(async move {
            let mut produced = Produced::default();
            let mut pending = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let (producer, topic, user) = (producer.clone(), topic.clone(), user(n % 30));
                pending.push(tokio::spawn(async move {
                    let value = if n % 4 == 0 {
                        invalid(n)
                    } else {
                        valid(&user, n)
                    };
                    send(&producer, &topic, &user, &value).await
                }));
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            for send in pending {
                if send.await.unwrap() {
                    produced.acked += 1;
                } else {
                    produced.failed += 1;
                }
            }
            produced
        })
    };
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let stalled = Instant::now();
    let during = match fault {
        Fault::Stall => {
            broker.signal("STOP");
            // The dataflow's health while the broker is frozen, looked at after a few seconds.
            tokio::time::sleep(STALL / 2).await;
            dataflow.assert_running();
            let during = dataflow.samples("streamrec_dataflow_").await;
            tokio::time::sleep(STALL - STALL / 2).await;
            broker.signal("CONT");
            during
        }
        Fault::Restart => {
            let restart = tokio::task::spawn_blocking(move || {
                broker.restart(RESTART_DOWN);
                broker
            });
            tokio::time::sleep(RESTART_DOWN - Duration::from_secs(1)).await;
            dataflow.assert_running();
            let during = dataflow.samples("streamrec_dataflow_").await;
            broker = restart.await.unwrap();
            broker.wait_until_listening().await;
            during
        }
    };
    let thawed = Instant::now();
    eprintln!("{fault:?}: the broker was away for {:?}", thawed - stalled);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let trickled = trickle.await.unwrap();

    // Batch 2: new users 30..40, updates of users 0..10, and invalid messages.
    let mut batch2 = 0;
    for n in 30..40 {
        assert!(send(&producer, &topic, &user(n), &valid(&user(n), 100_000 + n)).await);
        batch2 += 1;
    }
    for n in 0..10 {
        assert!(send(&producer, &topic, &user(n), &valid(&user(n), 200_000 + n)).await);
        batch2 += 1;
    }
    for n in 0..3 {
        assert!(send(&producer, &topic, &user(n), &invalid(300_000 + n)).await);
        batch2 += 1;
    }
    eprintln!(
        "produced: batch 1 {sent}, trickle {} acknowledged ({} failed), batch 2 {batch2}",
        trickled.acked, trickled.failed
    );

    // What the profile topic holds, whatever the producer's view of it: the reference is built
    // from that.
    let at_least = sent + trickled.acked + batch2;
    // At least: a send the stall timed out on, or one the producer retried (it is not
    // idempotent), may be in the topic too.
    let records = read_topic_at_least(
        &brokers,
        &topic,
        PARTITIONS,
        at_least as usize,
        Duration::from_secs(30),
    )
    .await;
    let mut ends = vec![0i64; PARTITIONS as usize];
    let mut messages = Vec::new();
    let mut invalid_positions = BTreeSet::new();
    for record in &records {
        let end = &mut ends[record.partition as usize];
        *end = (*end).max(record.offset + 1);
        match serde_json::from_slice::<ProfileMessage>(&record.value) {
            Ok(message) => messages.push((message, (record.partition, record.offset))),
            Err(_) => {
                invalid_positions.insert((record.partition, record.offset));
            }
        }
    }

    // Committed offsets reach every partition's end (the dataflow commits an epoch's offsets
    // once it is durable in Redis and its dead-letter copies are stored).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = tokio::task::spawn_blocking({
            let (brokers, group, topic) = (brokers.clone(), group.clone(), topic.clone());
            move || committed(&brokers, &group, &topic)
        })
        .await
        .unwrap();
        if now == ends {
            break;
        }
        if Instant::now() >= deadline {
            // What held the commits back: unacknowledged dead-letter copies, or a partition
            // not read (its lag), for the failure to say which.
            let metrics = dataflow.samples("streamrec_dataflow_").await;
            let held: Vec<_> = metrics
                .iter()
                .filter(|(name, _)| {
                    name.contains("dead_letters_unacknowledged")
                        || name.contains("consumer_lag")
                        || name.contains("messages_read")
                        || name.contains("kafka_silent")
                })
                .collect();
            panic!(
                "committed offsets {now:?} never reached the partitions' ends {ends:?}; \
                 the dataflow's metrics then: {held:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("committed offsets at the ends {ends:?}");

    // Every user's value is the reference's, over what the topic holds.
    let mut reference = Reference::new(profile::DEFAULT_MAX_HISTORY, profile::DEFAULT_DECAY, 2);
    for line in FEATURES.lines().skip(1) {
        let mut fields = line.split(',');
        let item = fields.next().unwrap();
        let values = fields.map(|f| f.parse().unwrap()).collect();
        reference.set_features(item, Some(values));
    }
    let expected: BTreeMap<String, ReferenceProfile> = reference
        .apply_epoch(1, &messages, &[])
        .changed
        .into_iter()
        .map(|p| (p.user_id.clone(), p))
        .collect();
    assert_eq!(expected.len(), 40, "the test's users");
    let mut redis = redis::Client::open(testkit::redis_url())
        .unwrap()
        .get_connection()
        .unwrap();
    for (user, want) in &expected {
        let value: Option<String> = redis::cmd("GET")
            .arg(profile::redis_key(user))
            .query(&mut redis)
            .unwrap();
        let value = value.unwrap_or_else(|| panic!("{user} is not in Redis"));
        let got: ReferenceProfile = serde_json::from_str(&value).unwrap();
        assert_eq!(
            (&got.timestamp, &got.history_items, got.known_items),
            (&want.timestamp, &want.history_items, want.known_items),
            "{user}"
        );
        assert!(
            vectors_agree(&got.interest_vector, &want.interest_vector),
            "{user}: {:?} against {:?}",
            got.interest_vector,
            want.interest_vector
        );
    }

    // The dead-letter topic holds every invalid message, each with where it was read. Copies
    // are delivered at least once: a copy whose acknowledgement was lost is sent again.
    let dead = read_topic_at_least(
        &brokers,
        &dlq_topic,
        1,
        invalid_positions.len(),
        Duration::from_secs(20),
    )
    .await;
    let mut copies: HashMap<(i32, i64), usize> = HashMap::new();
    for record in &dead {
        let at = (
            record
                .header("streamrec.source_partition")
                .unwrap()
                .parse()
                .unwrap(),
            record
                .header("streamrec.source_offset")
                .unwrap()
                .parse()
                .unwrap(),
        );
        assert!(
            invalid_positions.contains(&at),
            "a dead-letter copy of a valid message: {record:?}"
        );
        *copies.entry(at).or_default() += 1;
    }
    let missing: Vec<_> = invalid_positions
        .iter()
        .filter(|at| !copies.contains_key(at))
        .collect();
    assert!(
        missing.is_empty(),
        "invalid messages not dead-lettered: {missing:?}"
    );
    let duplicated = copies.values().filter(|&&n| n > 1).count();
    eprintln!(
        "{} invalid messages, {} dead-letter copies ({duplicated} duplicated)",
        invalid_positions.len(),
        dead.len()
    );

    // The stall was reported while it lasted and cleared after.
    let silent = |samples: &BTreeMap<String, f64>| {
        samples
            .iter()
            .filter(|(name, _)| name.starts_with("streamrec_dataflow_kafka_silent_seconds"))
            .map(|(_, &v)| v)
            .fold(0.0, f64::max)
    };
    assert!(
        silent(&during) >= 2.0,
        "the metrics did not show the stall: {during:?}"
    );
    let after = dataflow.samples("streamrec_dataflow_").await;
    assert!(silent(&after) < 2.0, "the stall still shows: {after:?}");
    let warnings = dataflow.logged("the Kafka broker has not answered");
    assert!(!warnings.is_empty(), "no warning about the stall");
    // At most one a second per worker (of two) while the broker was away, and a few seconds
    // after, until the statistics see it answer.
    let away = (thawed - stalled).as_secs();
    assert!(
        warnings.len() as u64 <= 2 * (away + 3),
        "{} warnings about {away} s away: not rate-limited",
        warnings.len()
    );
    assert!(
        !dataflow.logged("the Kafka broker answers again").is_empty(),
        "no word that the stall cleared"
    );

    // Still running, and SIGTERM ends it cleanly.
    dataflow.assert_running();
    let status = Command::new("kill")
        .args(["-TERM", &dataflow.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = dataflow.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "the dataflow exited with {status}");
    eprintln!("done in {:?}", started.elapsed());
}
