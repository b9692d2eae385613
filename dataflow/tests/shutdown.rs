//! SIGTERM with work in flight, end to end against the test broker and Redis: the dataflow has
//! read N messages whose values Redis has not stored yet (Redis holds writes back with
//! `CLIENT PAUSE ... WRITE`) when it gets SIGTERM. It must finish the epochs it read, store
//! them, commit their offsets and exit 0: all N users are in Redis, and a restart with the same
//! group reads and writes nothing of them again.
//!
//! In a test binary of its own: the pause holds back every client's writes on the shared test
//! Redis, which would slow the tests of another binary running beside it.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;
use serde_json::Value;
use testkit::{create_topic, http, unique_topic};

/// Features of the test items (D = 2).
const FEATURES: &str = "item_id,f0,f1\napple,1,0\nbanana,0,1\n";
const PARTITIONS: i32 = 4;
/// Messages in flight at SIGTERM, one user each: far below the read marks' stride (10,000), so
/// that reading them needs no write to Redis while it holds writes back.
const IN_FLIGHT: usize = 400;
/// How long Redis holds writes back: long enough for the dataflow to read every message and
/// get SIGTERM with all of them unstored.
const PAUSE: Duration = Duration::from_secs(5);

/// A running dataflow: its stats lines, and the metrics address it logged.
struct Dataflow {
    child: Child,
    stats: testkit::process::JsonLines,
    metrics: std::net::SocketAddr,
}

impl Dataflow {
    /// Starts the binary with `args`, `--metrics-addr 127.0.0.1:0` and JSON logs, passing its
    /// log lines on to the test's stderr.
    fn spawn(args: &[String]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dataflow"))
            .args(args)
            .args(["--metrics-addr", "127.0.0.1:0", "--log-format", "json"])
            .env("RUST_LOG", "warn,dataflow::metrics=info,dataflow::run=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stats = testkit::process::JsonLines::from_stdout(&mut child);
        let stderr = child.stderr.take().unwrap();
        let (found, addr) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let logged = serde_json::from_str::<Value>(&line).ok();
                if let Some(addr) = logged.as_ref().and_then(|l| l["metrics_addr"].as_str()) {
                    let _ = found.send(addr.parse().unwrap());
                }
            }
        });
        let metrics = addr
            .recv_timeout(Duration::from_secs(30))
            .expect("no metrics_addr logged within 30 s");
        Dataflow {
            child,
            stats,
            metrics,
        }
    }

    /// Waits until the reported `field`, summed over the epochs reported so far, reaches
    /// `at_least`. Epochs are reported only once Redis holds their values.
    fn wait_for(&self, field: &str, at_least: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.stats.total(field) < at_least {
            assert!(
                Instant::now() < deadline,
                "{field}: {} of {at_least} after 30 s",
                self.stats.total(field)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Messages of `topic` the workers have read, stored or not: the metrics count a read at
    /// the next close of an epoch of the clock, whether or not the epoch completes.
    async fn messages_read(&self, topic: &str) -> f64 {
        let (status, body) = http(self.metrics, "GET", "/metrics", "").await;
        assert_eq!(status, 200, "{body}");
        let prefix = format!(r#"streamrec_dataflow_messages_read_total{{topic="{topic}","#);
        testkit::prometheus::parse_exposition(&body)
            .iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(_, value)| value)
            .sum()
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Waits for the process to exit, at most 30 s, and returns how it did.
    fn exit_status(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "dataflow did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dataflow {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// The features file goes with the test.
struct FeaturesFile(PathBuf);

impl Drop for FeaturesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A profile message value (semantics §2).
fn profile_message(user: &str, items: &[&str], timestamp: u64) -> String {
    serde_json::json!({"user_id": user, "history_items": items, "timestamp": timestamp}).to_string()
}

/// The stored values of `users` (`None` where Redis has none), as Redis holds them.
fn stored(redis: &mut redis::Connection, users: &[String]) -> Vec<Option<String>> {
    let keys: Vec<String> = users.iter().map(|u| profile::redis_key(u)).collect();
    redis::cmd("MGET").arg(&keys).query(redis).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_work_in_flight_stores_and_commits_it_all() {
    let topic = unique_topic("sigterm-in-flight");
    let item_topic = format!("{topic}.items");
    let dlq_topic = format!("{topic}.dlq");
    create_topic(&topic, PARTITIONS).await;
    create_topic(&item_topic, 1).await;
    create_topic(&dlq_topic, 1).await;
    let features = FeaturesFile(std::env::temp_dir().join(format!("{topic}.features.csv")));
    std::fs::write(&features.0, FEATURES).unwrap();
    let args: Vec<String> = [
        "--brokers",
        &testkit::brokers(),
        "--topic",
        &topic,
        "--item-topic",
        &item_topic,
        "--dlq-topic",
        &dlq_topic,
        "--group",
        &format!("{topic}.group"),
        "--redis",
        &testkit::redis_url(),
        "--item-features",
        features.0.to_str().unwrap(),
        "--epoch-ms",
        "50",
        "--stats-json",
        "-w",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut redis = testkit::redis_connection();
    let producer = testkit::producer();
    let send = |user: String, partition: Option<i32>, timestamp: u64| {
        let value = profile_message(&user, &["apple", "banana"], timestamp);
        let mut record = FutureRecord::to(&topic).key(&user).payload(&value);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        producer.send_result(record).map_err(|(e, _)| e).unwrap()
    };

    let mut first = Dataflow::spawn(&args);
    // One user on every partition, stored: each partition's read mark is raised past what the
    // test sends next, so reading that needs no write to Redis.
    for partition in 0..PARTITIONS {
        let user = format!("{topic}-warm{partition}");
        send(user, Some(partition), 1).await.unwrap().unwrap();
    }
    first.wait_for("redis_writes", PARTITIONS as u64);

    // Redis holds every write back from now on; the dataflow reads the messages, computes
    // their values and waits for Redis to take them.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(PAUSE.as_millis() as u64)
        .arg("WRITE")
        .query(&mut redis)
        .unwrap();
    let paused_until = Instant::now() + PAUSE;
    let users: Vec<String> = (0..IN_FLIGHT).map(|u| format!("{topic}-u{u}")).collect();
    let deliveries: Vec<_> = users.iter().map(|u| send(u.clone(), None, 10)).collect();
    for delivery in deliveries {
        delivery.await.unwrap().unwrap();
    }
    let read_by = Instant::now() + Duration::from_secs(10);
    let expected_read = (PARTITIONS as usize + IN_FLIGHT) as f64;
    while first.messages_read(&topic).await < expected_read {
        assert!(
            Instant::now() < read_by,
            "the messages not read within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Work in flight: everything read, nothing of it stored.
    assert!(
        Instant::now() < paused_until,
        "Redis resumed writes before SIGTERM: nothing was in flight"
    );
    assert!(stored(&mut redis, &users).iter().all(Option::is_none));
    first.terminate();
    let status = first.exit_status();
    assert!(status.success(), "dataflow exited with {status}");
    assert!(
        Instant::now() >= paused_until,
        "the dataflow exited before Redis could store what it had read"
    );

    assert!(first.stats.wait_for_end(Duration::from_secs(10)));

    // Every message read is stored, with its value.
    let after_first = stored(&mut redis, &users);
    for (user, value) in users.iter().zip(&after_first) {
        let value: Value = serde_json::from_str(
            value
                .as_deref()
                .unwrap_or_else(|| panic!("{user}'s profile is not in Redis after a clean exit")),
        )
        .unwrap();
        assert_eq!(value["timestamp"], 10, "{user}: {value}");
        assert_eq!(value["known_items"], 2, "{user}: {value}");
    }
    assert_eq!(first.stats.total("messages"), expected_read as u64);
    assert_eq!(first.stats.total("redis_writes"), expected_read as u64);

    // A restart with the same group: the offsets committed at the exit cover every message,
    // so it replays them and writes none of them again. A new user afterwards shows that it
    // reads live, past all of them.
    let mut second = Dataflow::spawn(&args);
    let newcomer = format!("{topic}-newcomer");
    send(newcomer.clone(), None, 20).await.unwrap().unwrap();
    second.wait_for("redis_writes", 1);
    assert!(stored(&mut redis, std::slice::from_ref(&newcomer))[0].is_some());
    second.terminate();
    let status = second.exit_status();
    assert!(status.success(), "the restart exited with {status}");
    assert!(second.stats.wait_for_end(Duration::from_secs(10)));
    let totals: BTreeMap<&str, u64> = ["messages", "redis_writes", "changed"]
        .into_iter()
        .map(|field| (field, second.stats.total(field)))
        .collect();
    assert_eq!(
        totals,
        BTreeMap::from([("changed", 1), ("messages", 1), ("redis_writes", 1)]),
        "the restart read or wrote more than the newcomer"
    );
    assert_eq!(
        stored(&mut redis, &users),
        after_first,
        "the restart changed a stored value"
    );
}
