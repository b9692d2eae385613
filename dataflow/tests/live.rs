//! The dataflow binary end to end against the real broker and Redis: profiles pushed through
//! the ingest API appear in Redis with the contract's values; stale pushes change nothing; an
//! item-feature update re-emits exactly its holders; poison messages go to the dead-letter topic
//! without stopping their partition; SIGTERM finishes and exits 0; a closed stdout ends the
//! stats lines, not the dataflow; a backlog is read a bounded amount at a time; two processes of
//! two workers leave the same Redis contents as one worker; and a restart, of one process or
//! two, rebuilds the state from the topics without writing it again; a profile Redis refuses
//! for good (its key holds a hash) goes to the dead-letter topic while the stream moves on; and
//! `--metrics-addr` serves Prometheus text whose counters match what was sent; the whole
//! pipeline (ingest API, dataflow, API reads) runs on a Redis Cluster through a resharding;
//! recommendations reach Redis and the API as the reference computes them, and after a crash
//! and a restart from a checkpoint equal those of an uninterrupted run.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::{create_topic, http, produce, read_topic, unique_topic};

/// Features of the test items (D = 2); `unknown` has none.
const FEATURES: &str = "item_id,f0,f1\napple,1,0\nbanana,0,1\ncherry,0.5,0.5\n";

/// One test's topics, group, Redis database and features file.
struct Setup {
    topic: String,
    item_topic: String,
    dlq_topic: String,
    group: String,
    redis: String,
    features: PathBuf,
}

/// The features file goes with the test: a run of the suite would otherwise leave one in the
/// temporary directory per test.
impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.features);
    }
}

impl Setup {
    async fn new(name: &str, redis_db: u32) -> Self {
        let topic = unique_topic(name);
        let setup = Setup {
            item_topic: format!("{topic}.items"),
            dlq_topic: format!("{topic}.dlq"),
            group: format!("{topic}.group"),
            redis: testkit::redis_url_db(redis_db),
            features: std::env::temp_dir().join(format!("{topic}.features.csv")),
            topic,
        };
        create_topic(&setup.topic, 4).await;
        create_topic(&setup.item_topic, 1).await;
        create_topic(&setup.dlq_topic, 1).await;
        std::fs::write(&setup.features, FEATURES).unwrap();
        setup
    }

    fn args(&self) -> Vec<String> {
        let brokers = testkit::brokers();
        testkit::process::DataflowRun {
            brokers: &brokers,
            topic: &self.topic,
            item_topic: &self.item_topic,
            dlq_topic: &self.dlq_topic,
            group: &self.group,
            redis: &self.redis,
            item_features: &self.features,
        }
        .args(50)
    }
}

/// A running dataflow process and the stats lines it printed.
struct Dataflow {
    child: Child,
    lines: testkit::process::JsonLines,
}

impl Dataflow {
    fn spawn(args: &[String]) -> Self {
        Self::spawn_with(args, |_| {})
    }

    /// Like [`spawn`](Self::spawn), with the command changed by `configure` first.
    fn spawn_with(args: &[String], configure: impl FnOnce(&mut Command)) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dataflow"));
        command
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped());
        configure(&mut command);
        let mut child = command.spawn().unwrap();
        let lines = testkit::process::JsonLines::from_stdout(&mut child);
        Dataflow { child, lines }
    }

    /// Sum of a stats field over the epochs reported so far.
    fn total(&self, field: &str) -> u64 {
        self.lines.total(field)
    }

    /// Waits until the reported `field` reaches `at_least`. Epochs are reported only once their
    /// output is durable in Redis, so after this every message counted is reflected there.
    fn wait_for(&self, field: &str, at_least: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.total(field) < at_least {
            assert!(
                Instant::now() < deadline,
                "{field}: {} of {at_least} after 30 s",
                self.total(field)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then a clean exit once the open epoch is finished.
    fn stop(self) {
        self.terminate();
        self.wait();
    }

    /// Sends SIGTERM. The processes of one computation finish together, so all of them are
    /// signalled before any is waited for.
    fn terminate(&self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
    }

    /// Waits for a clean exit.
    fn wait(mut self) {
        let status = self.exit_status();
        assert!(status.success(), "dataflow exited with {status}");
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

fn redis(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

fn profile_of(connection: &mut redis::Connection, user: &str) -> Option<Value> {
    let value: Option<String> = redis::cmd("GET")
        .arg(profile::redis_key(user))
        .query(connection)
        .unwrap();
    value.map(|v| serde_json::from_str(&v).unwrap())
}

fn expected_vector(items: &[&str]) -> (Vec<f32>, u32) {
    let features: BTreeMap<&str, [f32; 2]> = BTreeMap::from([
        ("apple", [1.0, 0.0]),
        ("banana", [0.0, 1.0]),
        ("cherry", [0.5, 0.5]),
    ]);
    let v = profile::interest_vector(
        items.iter().map(|i| features.get(i).map(|x| &x[..])),
        2,
        0.9,
    );
    (v.vector, v.known_items)
}

/// Produces `user`'s profile message, keyed by the user, to `topic`.
async fn produce_profile(topic: &str, user: &str, items: &[&str], timestamp: u64) {
    produce(
        topic,
        Some(user),
        profile_message(user, items, timestamp).as_bytes(),
    )
    .await;
}

/// Produces `user`'s profile (one banana) at the timestamps `*next`, `*next + 1`, ... one every
/// 200 ms until `done()` holds, which must happen before `deadline`.
async fn produce_until(
    topic: &str,
    user: &str,
    next: &mut u64,
    deadline: Instant,
    waiting_for: &str,
    mut done: impl FnMut() -> bool,
) {
    while !done() {
        assert!(
            Instant::now() < deadline,
            "no {waiting_for} before the deadline"
        );
        produce_profile(topic, user, &["banana"], *next).await;
        *next += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A profile message value (semantics §2).
fn profile_message(user: &str, items: &[&str], timestamp: u64) -> String {
    serde_json::json!({"user_id": user, "history_items": items, "timestamp": timestamp}).to_string()
}

fn assert_profile(
    value: &Value,
    user: &str,
    timestamp: u64,
    items: &[&str],
    vector: &[f32],
    known: u32,
) {
    assert_eq!(value["user_id"], user);
    assert_eq!(value["timestamp"], timestamp);
    assert_eq!(value["history_items"], serde_json::json!(items));
    assert_eq!(value["known_items"], known);
    let actual: Vec<f64> = value["interest_vector"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(actual.len(), vector.len());
    for (a, e) in actual.iter().zip(vector) {
        assert!((a - f64::from(*e)).abs() < 1e-4, "{actual:?} vs {vector:?}");
    }
    assert!(
        value["epoch"].as_u64().unwrap() > 1_600_000_000_000,
        "epoch is Unix milliseconds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_profiles_stale_pushes_feature_updates_and_poison() {
    let setup = Setup::new("e2e", 0).await;
    let id = setup.topic.clone();
    let (alice, bob, carol) = (
        format!("{id}-alice"),
        format!("{id}-bob"),
        format!("{id}-carol"),
    );
    let behavior = format!(
        "user_id,item_id,timestamp\n\
         {alice},apple,100\n{alice},unknown,100\n{alice},banana,200\n{alice},cherry,300\n\
         {bob},banana,100\n{bob},cherry,150\n"
    );
    // The real ingest API, in process, publishing to this test's topic.
    let mut config = ingest_api::Config::defaults();
    config.shared.brokers = testkit::brokers();
    config.shared.topic = setup.topic.clone();
    let store = ingest_api::store::BehaviorStore::from_reader(behavior.as_bytes()).unwrap();
    let state = ingest_api::AppState::new(config, store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    tokio::spawn(ingest_api::serve(listener, state, std::future::pending()));

    let dataflow = Dataflow::spawn(&[setup.args(), vec!["-w".into(), "2".into()]].concat());
    let mut redis = redis(&setup.redis);

    // A push appears in Redis with the contract's values.
    let push =
        |user: &str, timestamp: u64| format!(r#"{{"user_id":"{user}","timestamp":{timestamp}}}"#);
    let (status, body) = http(api, "POST", "/push_interest/", &push(&alice, 250)).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = http(api, "POST", "/push_interest/", &push(&bob, 999)).await;
    assert_eq!(status, 200);
    dataflow.wait_for("redis_writes", 2);
    let items = ["apple", "unknown", "banana"];
    let (vector, known) = expected_vector(&items);
    let first = profile_of(&mut redis, &alice).expect("alice's profile within seconds");
    assert_profile(&first, &alice, 250, &items, &vector, known);
    assert_eq!(known, 2);

    // A stale push (older timestamp, other history) changes nothing.
    let (status, _) = http(api, "POST", "/push_interest/", &push(&alice, 150)).await;
    assert_eq!(status, 200);
    dataflow.wait_for("stale", 1);
    assert_eq!(profile_of(&mut redis, &alice).unwrap(), first);

    // A feature update of banana re-emits exactly its holders: alice and bob, not carol.
    let (status, _) = http(api, "POST", "/push_interest/", &push(&carol, 999)).await;
    assert_eq!(status, 404, "carol has no behaviour data");
    testkit::produce(
        &setup.topic,
        Some(&carol),
        format!(r#"{{"user_id":"{carol}","history_items":["apple"],"timestamp":5}}"#).as_bytes(),
    )
    .await;
    dataflow.wait_for("redis_writes", 3);
    let carol_before = profile_of(&mut redis, &carol).unwrap();
    let bob_before = profile_of(&mut redis, &bob).unwrap();
    let writes = dataflow.total("redis_writes");
    produce(
        &setup.item_topic,
        Some("banana"),
        br#"{"item_id":"banana","features":[-1,2]}"#,
    )
    .await;
    dataflow.wait_for("redis_writes", writes + 2);
    let alice_after = profile_of(&mut redis, &alice).unwrap();
    assert!(alice_after["epoch"].as_u64() > first["epoch"].as_u64());
    let weights = [0.81f32, 0.9, 1.0]; // apple k=2, unknown k=1, banana k=0
    let expected = [
        (1.0 * weights[0] - 1.0 * weights[2]) / (weights[0] + weights[2]),
        2.0 * weights[2] / (weights[0] + weights[2]),
    ];
    assert_profile(&alice_after, &alice, 250, &items, &expected, 2);
    assert_ne!(
        profile_of(&mut redis, &bob).unwrap()["interest_vector"],
        bob_before["interest_vector"]
    );
    assert_eq!(
        profile_of(&mut redis, &carol).unwrap(),
        carol_before,
        "carol does not hold banana"
    );

    // Poison messages go to the dead-letter topic with their reason and origin; the next valid
    // message of the same partition is processed.
    let dave = format!("{id}-dave");
    produce(&setup.topic, Some(&dave), b"{not json").await;
    produce(
        &setup.topic,
        Some(&dave),
        br#"{"user_id":"","history_items":[],"timestamp":1}"#,
    )
    .await;
    produce(
        &setup.item_topic,
        Some("x"),
        br#"{"item_id":"x","features":[1]}"#,
    )
    .await;
    produce(
        &setup.topic,
        Some(&dave),
        format!(r#"{{"user_id":"{dave}","history_items":["cherry"],"timestamp":7}}"#).as_bytes(),
    )
    .await;
    dataflow.wait_for("invalid", 3);
    dataflow.wait_for("redis_writes", writes + 3);
    let (vector, known) = expected_vector(&["cherry"]);
    assert_profile(
        &profile_of(&mut redis, &dave).unwrap(),
        &dave,
        7,
        &["cherry"],
        &vector,
        known,
    );
    let dead = read_topic(&setup.dlq_topic, 1, 3, Duration::from_secs(20)).await;
    let mut kinds: Vec<&str> = dead
        .iter()
        .map(|r| r.header("streamrec.reason_kind").unwrap())
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["bad_item_features", "empty_user_id", "not_json"]);
    let poison = dead.iter().find(|r| r.value == b"{not json").unwrap();
    assert_eq!(poison.key, dave.as_bytes());
    assert_eq!(
        poison.header("streamrec.source_topic"),
        Some(setup.topic.as_str())
    );
    assert!(poison
        .header("streamrec.source_partition")
        .unwrap()
        .parse::<i32>()
        .is_ok());
    assert!(poison
        .header("streamrec.source_offset")
        .unwrap()
        .parse::<i64>()
        .is_ok());
    assert!(poison
        .header("streamrec.reason")
        .unwrap()
        .contains("not JSON"));

    dataflow.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_rebuilds_the_state_from_the_topics() {
    let setup = Setup::new("restart", 2).await;
    let id = setup.topic.clone();
    let (alice, bob, carol) = (
        format!("{id}-alice"),
        format!("{id}-bob"),
        format!("{id}-carol"),
    );
    let args = [setup.args(), vec!["-w".into(), "2".into()]].concat();
    let mut redis = redis(&setup.redis);

    // First run: alice holds apple, bob cherry; then cherry's features change.
    let first = Dataflow::spawn(&args);
    produce_profile(&setup.topic, &alice, &["apple", "banana"], 10).await;
    produce_profile(&setup.topic, &bob, &["cherry"], 10).await;
    first.wait_for("redis_writes", 2);
    produce(
        &setup.item_topic,
        Some("cherry"),
        br#"{"item_id":"cherry","features":[2,2]}"#,
    )
    .await;
    first.wait_for("redis_writes", 3);
    first.stop();
    let alice_before = profile_of(&mut redis, &alice).unwrap();
    let bob_before = profile_of(&mut redis, &bob).unwrap();
    assert_eq!(bob_before["interest_vector"], serde_json::json!([2.0, 2.0]));

    // Second run, same group: the replay rewrites nothing ...
    let second = Dataflow::spawn(&args);
    // ... a new message meets cherry's features from the item topic, not the file's ...
    produce_profile(&setup.topic, &carol, &["cherry"], 20).await;
    second.wait_for("redis_writes", 1);
    let carol_now = profile_of(&mut redis, &carol).unwrap();
    assert_eq!(carol_now["interest_vector"], serde_json::json!([2.0, 2.0]));
    assert_eq!(profile_of(&mut redis, &alice).unwrap(), alice_before);
    assert_eq!(profile_of(&mut redis, &bob).unwrap(), bob_before);
    // ... and a feature update reaches the holders from before the restart.
    produce(
        &setup.item_topic,
        Some("apple"),
        br#"{"item_id":"apple","features":[3,0]}"#,
    )
    .await;
    second.wait_for("redis_writes", 2);
    let alice_after = profile_of(&mut redis, &alice).unwrap();
    assert!(alice_after["epoch"].as_u64() > alice_before["epoch"].as_u64());
    // apple (k=1, weight 0.9) = [3, 0], banana (k=0, weight 1) = [0, 1].
    let expected = [3.0 * 0.9 / 1.9, 1.0 / 1.9];
    let actual = alice_after["interest_vector"].as_array().unwrap();
    for (a, e) in actual.iter().zip(expected) {
        assert!(
            (a.as_f64().unwrap() - e).abs() < 1e-6,
            "{actual:?} vs {expected:?}"
        );
    }
    assert_eq!(
        second.total("redis_writes"),
        2,
        "only alice and carol were written"
    );
    second.stop();
}

/// Waits until Redis holds `user`'s profile with `timestamp`.
fn wait_for_profile(redis: &mut redis::Connection, user: &str, timestamp: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while profile_of(redis, user).map(|p| p["timestamp"].as_u64()) != Some(Some(timestamp)) {
        assert!(
            Instant::now() < deadline,
            "{user}'s profile at {timestamp} not in Redis after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_the_stats_not_the_dataflow() {
    let setup = Setup::new("closed-stdout", 3).await;
    let id = setup.topic.clone();
    let args = [setup.args(), vec!["-w".into(), "2".into()]].concat();
    // `dataflow --stats-json | head -0`: the reader of the stats is gone from the start.
    let mut child = Command::new(env!("CARGO_BIN_EXE_dataflow"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut dataflow = Dataflow {
        child,
        lines: Default::default(),
    };
    let mut redis = redis(&setup.redis);
    // Users on every partition, in several epochs: each worker goes on after the first stats
    // line failed.
    for round in 1..=3u64 {
        let users: Vec<String> = (0..8).map(|u| format!("{id}-user{u}")).collect();
        for user in &users {
            let message = profile_message(user, &["apple"], round);
            produce(&setup.topic, Some(user), message.as_bytes()).await;
        }
        for user in &users {
            wait_for_profile(&mut redis, user, round);
        }
    }
    // SIGTERM still finishes the open epoch and exits 0.
    dataflow.terminate();
    let status = dataflow.exit_status();
    let mut log = String::new();
    let mut stderr = dataflow.child.stderr.take().unwrap();
    std::io::Read::read_to_string(&mut stderr, &mut log).unwrap();
    assert!(status.success(), "dataflow exited with {status}: {log}");
    assert!(log.contains("cannot write the stats"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_read_a_bounded_amount_at_a_time() {
    let setup = Setup::new("backlog", 4).await;
    let id = setup.topic.clone();
    // The backlog is in the topic before the dataflow starts: 60 users, 10 messages each.
    let producer = testkit::producer();
    for round in 1..=10u64 {
        for u in 0..60 {
            let user = format!("{id}-user{u}");
            let message = profile_message(&user, &["apple"], round);
            testkit::produce_with(&producer, &setup.topic, Some(&user), message.as_bytes()).await;
        }
    }
    let max_in_flight = 16;
    let args = [
        setup.args(),
        vec![
            "-w".into(),
            "2".into(),
            "--max-in-flight".into(),
            max_in_flight.to_string(),
        ],
    ]
    .concat();
    let dataflow = Dataflow::spawn(&args);
    dataflow.wait_for("messages", 600);
    let largest_epoch = dataflow
        .lines
        .values()
        .iter()
        .filter_map(|line| line["messages"].as_u64())
        .max()
        .unwrap();
    assert!(
        largest_epoch <= 2 * max_in_flight,
        "an epoch read {largest_epoch} messages, more than 2 workers x {max_in_flight}"
    );
    // Nothing was lost on the way: every user's last message is in Redis.
    let mut redis = redis(&setup.redis);
    for u in 0..60 {
        wait_for_profile(&mut redis, &format!("{id}-user{u}"), 10);
    }
    dataflow.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_of_two_workers_write_what_one_worker_writes() {
    let one = Setup::new("one", 5).await;
    let mut two = Setup::new("two", 6).await;
    two.topic = one.topic.clone();
    two.item_topic = one.item_topic.clone();
    for url in [&one.redis, &two.redis] {
        let _: () = redis::cmd("FLUSHDB").query(&mut redis(url)).unwrap();
    }
    // Random messages: repeated users, stale and tied timestamps, unknown items.
    let items = ["apple", "banana", "cherry", "unknown"];
    let producer = testkit::producer();
    let mut state = 12345u64;
    let mut next = |n: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    let count = 400;
    for _ in 0..count {
        let user = format!("user{}", next(60));
        let history: Vec<&str> = (0..next(6)).map(|_| items[next(4) as usize]).collect();
        let value = profile_message(&user, &history, 1000 + next(20));
        testkit::produce_with(&producer, &one.topic, Some(&user), value.as_bytes()).await;
    }

    let single = Dataflow::spawn(&one.args());
    single.wait_for("messages", count);
    single.stop();

    let hostfile = std::env::temp_dir().join(format!("{}.hosts", two.group));
    testkit::process::local_hostfile(&hostfile, 2);
    let cluster = |process: &str| {
        let extra = [
            "-w",
            "2",
            "-n",
            "2",
            "-p",
            process,
            "-h",
            hostfile.to_str().unwrap(),
        ];
        Dataflow::spawn(&[two.args(), extra.iter().map(|s| s.to_string()).collect()].concat())
    };
    let (first, second) = (cluster("0"), cluster("1"));
    // Process 0 hosts worker 0, which reports the totals of all four workers.
    first.wait_for("messages", count);

    let contents = |url: &str| {
        let mut connection = redis(url);
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("user_profile:*")
            .query(&mut connection)
            .unwrap();
        keys.into_iter()
            .map(|key| {
                let mut value: Value = serde_json::from_str(
                    &redis::cmd("GET")
                        .arg(&key)
                        .query::<String>(&mut connection)
                        .unwrap(),
                )
                .unwrap();
                // Epoch numbers are the time of the run; everything else must match exactly.
                value.as_object_mut().unwrap().remove("epoch");
                (key, value)
            })
            .collect::<BTreeMap<_, _>>()
    };
    let (a, b) = (contents(&one.redis), contents(&two.redis));
    assert!(a.len() > 40, "only {} users written", a.len());
    assert_eq!(a, b);
    first.terminate();
    second.terminate();
    first.wait();
    second.wait();

    // Restarted, the two processes rebuild their state from the topic and write nothing of it;
    // a feature update then reaches every holder of the item, wherever its state was rebuilt.
    let holders: Vec<&String> = b
        .iter()
        .filter(|(_, value)| {
            value["history_items"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("banana"))
        })
        .map(|(key, _)| key)
        .collect();
    assert!(holders.len() > 10, "only {} hold banana", holders.len());
    let (first, second) = (cluster("0"), cluster("1"));
    produce(
        &two.item_topic,
        Some("banana"),
        br#"{"item_id":"banana","features":[5,5]}"#,
    )
    .await;
    first.wait_for("redis_writes", holders.len() as u64);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(first.total("redis_writes"), holders.len() as u64);
    let after = contents(&two.redis);
    for (key, value) in &after {
        let changed = value != &b[key];
        assert_eq!(changed, holders.contains(&key), "{key}");
    }
    first.terminate();
    second.terminate();
    first.wait();
    second.wait();
}

/// The Redis database the plain-writes test owns and empties between its phases.
const PLAIN_WRITES_DB: u32 = 13;

/// Empties the plain-writes test's database and returns a connection to it.
fn emptied_plain_writes_db() -> redis::Connection {
    let mut redis = redis(&testkit::redis_url_db(PLAIN_WRITES_DB));
    let _: () = redis::cmd("FLUSHDB").query(&mut redis).unwrap();
    redis
}

/// A profile stored by someone else (an older system, or an earlier run), as §6 JSON.
fn store_profile(redis: &mut redis::Connection, user: &str, timestamp: u64) {
    let value = serde_json::json!({"user_id": user, "timestamp": timestamp, "history_items": [],
        "interest_vector": [0.0, 0.0], "known_items": 0, "epoch": 1});
    let _: () = redis::cmd("SET")
        .arg(profile::redis_key(user))
        .arg(value.to_string())
        .query(redis)
        .unwrap();
}

fn timestamp_of(redis: &mut redis::Connection, user: &str) -> Option<u64> {
    profile_of(redis, user).and_then(|p| p["timestamp"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_plain_only_once_caught_up_with_what_redis_may_hold() {
    // 1. An empty database: nothing to catch up with, every value goes plain, and the marks
    //    are raised ahead of what was read.
    let mut redis = emptied_plain_writes_db();
    let setup = Setup::new("plain-fresh", PLAIN_WRITES_DB).await;
    let args = [setup.args(), vec!["-w".into(), "2".into()]].concat();
    let alice = format!("{}-alice", setup.topic);
    let bob = format!("{}-bob", setup.topic);
    produce_profile(&setup.topic, &alice, &["apple"], 10).await;
    let run = Dataflow::spawn(&args);
    run.wait_for("redis_writes", 1);
    produce_profile(&setup.topic, &bob, &["banana"], 10).await;
    run.wait_for("redis_writes", 2);
    assert_eq!(run.total("plain_writes"), 2);
    run.stop();
    let marks: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{}{}", sink::READ_MARKS_KEY_PREFIX, setup.topic))
        .query(&mut redis)
        .unwrap();
    assert_eq!(marks["origin"], "fresh", "{marks:?}");
    for partition in 0..4 {
        assert_eq!(marks[&format!("floor:{partition}")], "0", "{marks:?}");
    }
    let raised: Vec<i64> = marks
        .iter()
        .filter(|(field, _)| *field != "origin" && !field.starts_with("floor:"))
        .map(|(_, mark)| mark.parse().unwrap())
        .collect();
    assert!(
        raised.iter().filter(|&&mark| mark >= 10_000).count() >= 1,
        "a mark raised a stride ahead of the messages read: {marks:?}"
    );

    // 2. A database holding values of unknown origin (an older system's): dave's newer profile
    //    there outlives the older message in the topic, and erin's, sent later, is written
    //    checked too, since no reading proves the older system's values older than the topic.
    let mut redis = emptied_plain_writes_db();
    let setup = Setup::new("plain-unknown", PLAIN_WRITES_DB).await;
    let args = [setup.args(), vec!["-w".into(), "2".into()]].concat();
    let dave = format!("{}-dave", setup.topic);
    let erin = format!("{}-erin", setup.topic);
    store_profile(&mut redis, &dave, 30);
    produce_profile(&setup.topic, &dave, &["apple"], 10).await;
    let run = Dataflow::spawn(&args);
    run.wait_for("changed", 1);
    produce_profile(&setup.topic, &erin, &["banana"], 10).await;
    run.wait_for("redis_writes", 1);
    assert_eq!(timestamp_of(&mut redis, &dave), Some(30));
    assert_eq!(timestamp_of(&mut redis, &erin), Some(10));
    assert_eq!(
        (run.total("redis_writes"), run.total("plain_writes")),
        (1, 0)
    );
    run.stop();

    // 3. Marks (and floors) left by an earlier run, which wrote carol's newer profile before
    //    it stopped: everything up to them is read and written checked (carol's older
    //    message does not replace it), and frank's, sent later, goes plain.
    let mut redis = emptied_plain_writes_db();
    let setup = Setup::new("plain-marks", PLAIN_WRITES_DB).await;
    let args = [setup.args(), vec!["-w".into(), "2".into()]].concat();
    let carol = format!("{}-carol", setup.topic);
    let frank = format!("{}-frank", setup.topic);
    let _: () = redis::cmd("HSET")
        .arg(format!("{}{}", sink::READ_MARKS_KEY_PREFIX, setup.topic))
        .arg(&[
            "origin", "fresh", "0", "1000", "1", "1000", "2", "1000", "3", "1000", "floor:0", "0",
            "floor:1", "0", "floor:2", "0", "floor:3", "0",
        ])
        .query(&mut redis)
        .unwrap();
    store_profile(&mut redis, &carol, 50);
    produce_profile(&setup.topic, &carol, &["apple"], 20).await;
    let run = Dataflow::spawn(&args);
    run.wait_for("changed", 1);
    // The marks lie past the partitions' ends, so the catch-up ends when librdkafka's
    // statistics (once a second) report those ends: frank's profiles go checked until then.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = 10;
    produce_until(
        &setup.topic,
        &frank,
        &mut next,
        deadline,
        "a plain write",
        || run.total("plain_writes") > 0,
    )
    .await;
    assert_eq!(timestamp_of(&mut redis, &carol), Some(50));
    assert!(timestamp_of(&mut redis, &frank) >= Some(10));
    assert!(
        run.total("plain_writes") <= next - 10,
        "only frank's went plain"
    );
    run.stop();

    // 4. --checked-writes always: nothing plain, even in an empty database.
    let _redis = emptied_plain_writes_db();
    let setup = Setup::new("plain-never", PLAIN_WRITES_DB).await;
    let grace = format!("{}-grace", setup.topic);
    let args = [
        setup.args(),
        vec!["--checked-writes".into(), "always".into()],
    ]
    .concat();
    let run = Dataflow::spawn(&args);
    produce_profile(&setup.topic, &grace, &["apple"], 10).await;
    run.wait_for("redis_writes", 1);
    assert_eq!(run.total("plain_writes"), 0);
    run.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_run_takes_over_and_the_older_one_stops_writing() {
    let mut redis = redis(&testkit::redis_url_db(14));
    let _: () = redis::cmd("FLUSHDB").query(&mut redis).unwrap();
    let setup = Setup::new("takeover", 14).await;
    let args = [setup.args(), vec!["-w".into(), "2".into()]].concat();
    let alice = format!("{}-alice", setup.topic);
    let bob = format!("{}-bob", setup.topic);
    let mut older = Dataflow::spawn(&args);
    produce_profile(&setup.topic, &alice, &["apple"], 10).await;
    older.wait_for("redis_writes", 1);

    // A second run of the same topic (a deploy overlapping the old one) takes over: the older
    // run's writers are ended, and at its next write it finds itself replaced and exits.
    let newer = Dataflow::spawn(&args);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = 10;
    let mut status = None;
    produce_until(
        &setup.topic,
        &bob,
        &mut next,
        deadline,
        "the older run's exit",
        || {
            status = older.child.try_wait().unwrap();
            status.is_some()
        },
    )
    .await;
    assert_eq!(
        status.and_then(|status| status.code()),
        Some(dataflow::run::TAKEN_OVER_EXIT_CODE)
    );

    // The newer run writes on, plain once caught up with the older run's marks.
    produce_until(
        &setup.topic,
        &bob,
        &mut next,
        deadline,
        "a plain write",
        || newer.total("plain_writes") > 0,
    )
    .await;
    wait_for_profile(&mut redis, &bob, next - 1);
    assert_eq!(timestamp_of(&mut redis, &alice), Some(10));
    newer.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_redis_refuses_goes_to_the_dead_letter_topic_and_the_stream_moves_on() {
    let setup = Setup::new("redis-rejected", 7).await;
    let id = setup.topic.clone();
    let hashed = format!("{id}-hashed");
    let others: Vec<String> = (0..6).map(|u| format!("{id}-user{u}")).collect();
    let mut redis = redis(&setup.redis);
    // Another program's hash at one user's profile key.
    let _: () = redis::cmd("HSET")
        .arg(profile::redis_key(&hashed))
        .arg("owner")
        .arg("someone else")
        .query(&mut redis)
        .unwrap();
    // Checked writes throughout: a plain MSET would replace the hash rather than be refused
    // (see sink::WriteMode::Plain).
    let args = [
        setup.args(),
        vec!["--checked-writes".into(), "always".into()],
    ]
    .concat();
    let run = Dataflow::spawn(&args);
    for round in 1..=3u64 {
        produce_profile(&setup.topic, &hashed, &["apple"], round).await;
        for user in &others {
            produce_profile(&setup.topic, user, &["banana"], round).await;
        }
        // Every other user's latest message is written: nothing stalls behind the refused one.
        for user in &others {
            wait_for_profile(&mut redis, user, round);
        }
        run.wait_for("redis_rejected", round);
    }
    let kind: String = redis::cmd("TYPE")
        .arg(profile::redis_key(&hashed))
        .query(&mut redis)
        .unwrap();
    assert_eq!(kind, "hash", "the foreign key is left as it was");
    let dead = read_topic(&setup.dlq_topic, 1, 3, Duration::from_secs(20)).await;
    assert_eq!(dead.len(), 3);
    for (round, record) in (1..=3u64).zip(&dead) {
        assert_eq!(
            record.header("streamrec.reason_kind"),
            Some("redis_rejected")
        );
        assert!(
            record
                .header("streamrec.reason")
                .is_some_and(|r| r.starts_with("WRONGTYPE")),
            "{:?}",
            record.headers
        );
        assert_eq!(record.key, hashed.as_bytes());
        let value: Value = serde_json::from_slice(&record.value).unwrap();
        let (vector, known) = expected_vector(&["apple"]);
        assert_profile(&value, &hashed, round, &["apple"], &vector, known);
    }
    assert_eq!(run.total("redis_rejected"), 3);
    // Epochs complete, so SIGTERM finishes promptly and cleanly.
    run.stop();
}

/// Starts the dataflow with `--metrics-addr 127.0.0.1:0` and returns it with the address it
/// logged (JSON logs on stderr; every line is passed on to the test's stderr).
fn spawn_with_metrics(args: &[String]) -> (Dataflow, std::net::SocketAddr) {
    let args = [
        args,
        &[
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            "--log-format".into(),
            "json".into(),
        ],
    ]
    .concat();
    let mut dataflow = Dataflow::spawn_with(&args, |command| {
        command
            .env("RUST_LOG", "warn,dataflow::metrics=info")
            .stderr(Stdio::piped());
    });
    let stderr = dataflow.child.stderr.take().unwrap();
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
    let addr = addr
        .recv_timeout(Duration::from_secs(30))
        .expect("no metrics_addr logged within 30 s");
    (dataflow, addr)
}

/// GET /metrics, parsed.
async fn scrape(addr: std::net::SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = http(addr, "GET", "/metrics", "").await;
    assert_eq!(status, 200, "{body}");
    testkit::prometheus::parse_exposition(&body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_what_was_sent() {
    use rdkafka::producer::FutureRecord;

    const WORKERS: usize = 2;
    let setup = Setup::new("metrics", 10).await;
    let id = setup.topic.clone();
    let args = [setup.args(), vec!["-w".into(), WORKERS.to_string()]].concat();
    let (dataflow, addr) = spawn_with_metrics(&args);

    // Partition p gets 2 + p users with one valid message each, then an older message of the
    // first p of them (stale whether or not it lands in the same epoch: a user's messages are
    // read in order), then p % 3 invalid messages: different counts everywhere, so that a count
    // under the wrong label shows.
    let producer = testkit::producer();
    let mut expected: BTreeMap<i32, (u64, u64, u64)> = BTreeMap::new();
    let mut users = Vec::new();
    for partition in 0..4i32 {
        let send = |key: String, value: String| {
            let producer = &producer;
            let topic = &setup.topic;
            async move {
                let record = FutureRecord::to(topic)
                    .key(&key)
                    .payload(&value)
                    .partition(partition);
                producer
                    .send(record, Duration::from_secs(10))
                    .await
                    .map_err(|(e, _)| e)
                    .unwrap();
            }
        };
        let here: Vec<String> = (0..2 + partition)
            .map(|u| format!("{id}-p{partition}-u{u}"))
            .collect();
        for user in &here {
            send(
                user.clone(),
                profile_message(user, &["apple", "banana"], 100),
            )
            .await;
        }
        for user in &here[..partition as usize] {
            send(user.clone(), profile_message(user, &["cherry"], 50)).await;
        }
        for n in 0..partition % 3 {
            send(format!("{id}-poison{n}"), "{not json".to_owned()).await;
        }
        let (valid, stale, invalid) = (here.len() as u64, partition as u64, (partition % 3) as u64);
        expected.insert(partition, (valid + stale + invalid, invalid, stale));
        users.extend(here);
    }

    // Every user's profile is in Redis, from its valid message.
    let mut redis = redis(&setup.redis);
    for user in &users {
        wait_for_profile(&mut redis, user, 100);
    }

    // The counters reach exactly what was sent once the epochs that read it are complete, and
    // the lag drops to 0 once their offsets are committed and the statistics (once a second)
    // have seen the ends.
    let label = |partition: i32| format!(r#"{{topic="{}",partition="{partition}"}}"#, setup.topic);
    let item_label = format!(r#"{{topic="{}",partition="0"}}"#, setup.item_topic);
    let mut wanted: BTreeMap<String, f64> = BTreeMap::new();
    for (&partition, &(read, invalid, stale)) in &expected {
        let l = label(partition);
        wanted.insert(
            format!("streamrec_dataflow_messages_read_total{l}"),
            read as f64,
        );
        wanted.insert(
            format!("streamrec_dataflow_messages_invalid_total{l}"),
            invalid as f64,
        );
        wanted.insert(
            format!("streamrec_dataflow_messages_stale_total{l}"),
            stale as f64,
        );
        wanted.insert(format!("streamrec_dataflow_consumer_lag{l}"), 0.0);
    }
    wanted.insert(
        format!("streamrec_dataflow_messages_read_total{item_label}"),
        0.0,
    );
    wanted.insert(format!("streamrec_dataflow_consumer_lag{item_label}"), 0.0);
    wanted.insert("streamrec_dataflow_users_held".into(), users.len() as f64);
    // Every history holds only items with features, which every worker's table holds.
    wanted.insert("streamrec_dataflow_items_held".into(), (3 * WORKERS) as f64);
    wanted.insert(
        "streamrec_dataflow_redis_writes_total".into(),
        users.len() as f64,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let samples = loop {
        let samples = scrape(addr).await;
        let differing: Vec<_> = wanted
            .iter()
            .filter(|(name, value)| samples.get(*name) != Some(value))
            .map(|(name, value)| (name, value, samples.get(name)))
            .collect();
        if differing.is_empty() {
            break samples;
        }
        assert!(
            Instant::now() < deadline,
            "after 30 s, (series, wanted, scraped): {differing:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // The totals of the stats lines agree (they are counted apart from the metrics).
    assert_eq!(
        dataflow.total("messages"),
        expected.values().map(|e| e.0).sum::<u64>()
    );
    assert_eq!(
        samples
            .keys()
            .filter(|k| k.starts_with("streamrec_dataflow_messages_read_total"))
            .count(),
        5,
        "4 profile partitions and 1 item partition, over both workers: {samples:#?}"
    );
    assert!(samples["streamrec_dataflow_epochs_completed_total"] > 0.0);
    assert!(samples["streamrec_dataflow_epoch_latency_seconds_count"] > 0.0);
    assert!(
        samples["streamrec_dataflow_epoch_latency_seconds_count"]
            <= samples["streamrec_dataflow_epochs_completed_total"]
    );
    assert!(samples["streamrec_dataflow_redis_write_latency_seconds_count"] > 0.0);
    assert!(samples.contains_key("streamrec_dataflow_redis_retries_total"));
    dataflow.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_on_a_redis_cluster_through_a_resharding() {
    let cluster = testkit::cluster::PrivateCluster::start();
    let mut setup = Setup::new("cluster", 0).await;
    setup.redis = cluster.seeds();
    let id = setup.topic.clone();
    let users: Vec<String> = (0..40).map(|i| format!("{id}-u{i}")).collect();
    let mut behavior = String::from("user_id,item_id,timestamp\n");
    for (i, user) in users.iter().enumerate() {
        let items = ["apple", "banana", "cherry", "unknown"];
        behavior += &format!(
            "{user},{},10\n{user},{},20\n",
            items[i % 4],
            items[(i + 1) % 4]
        );
    }
    // The ingest API publishes, and reads the profiles back from the cluster.
    let mut config = ingest_api::Config::defaults();
    config.shared.brokers = testkit::brokers();
    config.shared.topic = setup.topic.clone();
    config.shared.redis = cluster.seeds();
    config.shared.redis_cluster = true;
    let store = ingest_api::store::BehaviorStore::from_reader(behavior.as_bytes()).unwrap();
    let state = ingest_api::AppState::new(config, store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    tokio::spawn(ingest_api::serve(listener, state, std::future::pending()));

    let args = [
        setup.args(),
        vec!["--redis-cluster".into(), "-w".into(), "2".into()],
    ]
    .concat();
    let dataflow = Dataflow::spawn(&args);
    let push =
        |user: &str, timestamp: u64| format!(r#"{{"user_id":"{user}","timestamp":{timestamp}}}"#);
    for user in &users {
        let (status, body) = http(api, "POST", "/push_interest/", &push(user, 30)).await;
        assert_eq!(status, 200, "{body}");
    }
    dataflow.wait_for("redis_writes", users.len() as u64);

    // Every profile is in the cluster, spread over the three masters, and the API serves it.
    let per_node = cluster.keys_per_node();
    assert!(per_node.iter().all(|&keys| keys > 0), "{per_node:?}");
    let mut conn = cluster.connection();
    let stored = |conn: &mut redis::cluster::ClusterConnection, user: &str| -> Value {
        let value: String = redis::cmd("GET")
            .arg(profile::redis_key(user))
            .query(conn)
            .unwrap();
        serde_json::from_str(&value).unwrap()
    };
    for (i, user) in users.iter().enumerate() {
        let items = ["apple", "banana", "cherry", "unknown"];
        let history = [items[i % 4], items[(i + 1) % 4]];
        let (vector, known) = expected_vector(&history);
        let value = stored(&mut conn, user);
        assert_profile(&value, user, 30, &history, &vector, known);
        let (status, body) = http(api, "GET", &format!("/user_profile/{user}"), "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), value);
    }

    // Caught up with a fresh cluster, the dataflow writes plain: SETs pipelined per master.
    let (writes, plain) = (
        dataflow.total("redis_writes"),
        dataflow.total("plain_writes"),
    );
    let (status, _) = http(api, "POST", "/push_interest/", &push(&users[2], 35)).await;
    assert_eq!(status, 200);
    dataflow.wait_for("redis_writes", writes + 1);
    assert_eq!(dataflow.total("plain_writes"), plain + 1);
    assert_eq!(stored(&mut conn, &users[2])["timestamp"], 35);

    // The slot of the first user moves to another master while the dataflow runs; its next
    // profile still arrives, on the new master.
    let key = profile::redis_key(&users[0]);
    let slot = sink::key_slot(key.as_bytes());
    let to = *cluster
        .ports()
        .iter()
        .find(|&&port| port != cluster.owner(slot))
        .unwrap();
    cluster.finish_migration(slot, to);
    let writes = dataflow.total("redis_writes");
    let (status, _) = http(api, "POST", "/push_interest/", &push(&users[0], 40)).await;
    assert_eq!(status, 200);
    dataflow.wait_for("redis_writes", writes + 1);
    assert_eq!(stored(&mut conn, &users[0])["timestamp"], 40);
    let exists: bool = redis::cmd("EXISTS")
        .arg(&key)
        .query(&mut cluster.node(to))
        .unwrap();
    assert!(exists, "the profile lives on the slot's new master");
    dataflow.stop();

    // A restart with the same group takes over on every master and writes nothing again.
    let second = Dataflow::spawn(&args);
    let (status, _) = http(api, "POST", "/push_interest/", &push(&users[1], 50)).await;
    assert_eq!(status, 200);
    second.wait_for("redis_writes", 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        second.total("redis_writes"),
        1,
        "only the new push is written"
    );
    assert_eq!(stored(&mut conn, &users[1])["timestamp"], 50);
    second.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommendations_reach_redis_and_the_api_as_the_reference_computes_them() {
    use dataflow::recommend::reference::RecommendReference;
    let setup = Setup::new("recs", 12).await;
    let id = setup.topic.clone();
    // Two tastes: the x-users' items and the y-users', one shared item; each user's items at
    // increasing timestamps, so that the history's order is the row order.
    let mut behavior = String::from("user_id,item_id,timestamp\n");
    let mut histories: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (user, items) in taste_histories(&id, 0..24, 0) {
        for (t, item) in items.iter().enumerate() {
            behavior += &format!("{user},{item},{}\n", 10 + t);
        }
        histories.insert(user, items);
    }
    let mut config = ingest_api::Config::defaults();
    config.shared.brokers = testkit::brokers();
    config.shared.topic = setup.topic.clone();
    config.shared.redis = setup.redis.clone();
    let store = ingest_api::store::BehaviorStore::from_reader(behavior.as_bytes()).unwrap();
    let state = ingest_api::AppState::new(config, store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = listener.local_addr().unwrap();
    tokio::spawn(ingest_api::serve(listener, state, std::future::pending()));
    let mut redis = redis(&setup.redis);
    let _: () = redis::cmd("FLUSHDB").query(&mut redis).unwrap();

    let args = [
        setup.args(),
        recommendation_args(),
        vec!["-w".into(), "2".into()],
    ]
    .concat();
    let dataflow = Dataflow::spawn(&args);
    for user in histories.keys() {
        let body = format!(r#"{{"user_id":"{user}","timestamp":100}}"#);
        let (status, body) = http(api, "POST", "/push_interest/", &body).await;
        assert_eq!(status, 200, "{body}");
    }
    // Every user's list is in Redis once every user's profile is.
    dataflow.wait_for("redis_writes", 2 * histories.len() as u64);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lists: usize = redis::cmd("EVAL")
            .arg("return #redis.call('KEYS', ARGV[1])")
            .arg(0)
            .arg(format!("{}{id}-*", profile::RECS_KEY_PREFIX))
            .query(&mut redis)
            .unwrap();
        if lists == histories.len() {
            break;
        }
        assert!(Instant::now() < deadline, "{lists} lists after 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let settings = recommend_settings();
    // A user's list is computed when its profile changes, from the state of that epoch. The
    // last user pushed is not enough: another worker may read an earlier push in a later epoch.
    // So once every list is in, that user is pushed again (a later timestamp, the same
    // history): its new list is computed from every profile.
    let reference = RecommendReference::new(histories.values(), settings);
    let last = histories.keys().last().unwrap().clone();
    let body = format!(r#"{{"user_id":"{last}","timestamp":200}}"#);
    let (status, body) = http(api, "POST", "/push_interest/", &body).await;
    assert_eq!(status, 200, "{body}");
    let stored = wait_for_list(&mut redis, &last, 200);
    assert_eq!(stored["timestamp"], 200);
    let (status, body) = http(api, "GET", &format!("/recommendation/{last}?k=10"), "").await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["source"], "user");
    assert_eq!(answer["items"], stored["items"]);
    let expected = reference.recommend(&histories[&last]);
    let actual = scored_items(&answer["items"]);
    assert!(!expected.is_empty());
    reference
        .check_recommendations(&histories[&last], &actual)
        .unwrap();
    // A user without a list gets the popular items, as the reference counts them.
    let (status, body) = http(api, "GET", "/recommendation/nobody?k=5", "").await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["source"], "popular");
    let popular: Vec<Value> = reference.popular_items()[..5]
        .iter()
        .map(|p| serde_json::json!({"item_id": p.item_id, "users": p.users}))
        .collect();
    assert_eq!(answer["items"], Value::Array(popular));
    dataflow.stop();
}

/// The recommendation tests' flags: W = 4, K = 3 (see [`recommend_settings`]).
fn recommendation_args() -> Vec<String> {
    [
        "--recommendations",
        "on",
        "--covisit-window",
        "4",
        "--neighbours",
        "3",
    ]
    .map(String::from)
    .to_vec()
}

/// The reference's settings for [`recommendation_args`].
fn recommend_settings() -> dataflow::recommend::reference::RecommendSettings {
    dataflow::recommend::reference::RecommendSettings {
        covisit_window: 4,
        neighbours: 3,
        ..Default::default()
    }
}

/// A stored or served list's items, as the reference checks them.
fn scored_items(items: &Value) -> Vec<dataflow::recommend::reference::ScoredItem> {
    items
        .as_array()
        .unwrap()
        .iter()
        .map(|item| dataflow::recommend::reference::ScoredItem {
            item_id: item["item_id"].as_str().unwrap().to_owned(),
            score: item["score"].as_f64().unwrap(),
        })
        .collect()
}

/// The recommendation tests' histories: two tastes over nine items each, one item shared, six
/// items a user; `turn` shifts a taste's items, for a user's later history.
fn taste_histories(
    id: &str,
    users: std::ops::Range<usize>,
    turn: usize,
) -> Vec<(String, Vec<String>)> {
    users
        .map(|u| {
            let taste = if u % 3 == 0 { "y" } else { "x" };
            let items = (0..6)
                .map(|j| {
                    if j == 5 {
                        "shared".to_owned()
                    } else {
                        format!("{taste}{}", (u * 7 + j * 3 + turn * 2) % 9)
                    }
                })
                .collect();
            (format!("{id}-u{u}"), items)
        })
        .collect()
}

/// Waits until Redis holds `user`'s list of the profile of `timestamp`, and returns it.
fn wait_for_list(redis: &mut redis::Connection, user: &str, timestamp: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored: Option<String> = redis::cmd("GET")
            .arg(profile::recs_key(user))
            .query(redis)
            .unwrap();
        if let Some(list) = stored.map(|s| serde_json::from_str::<Value>(&s).unwrap()) {
            if list["timestamp"] == timestamp {
                return list;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no list of {user} at {timestamp} after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The restart test's run: profiles of users 0..20, then (after a SIGKILL and a restart from
/// the checkpoint as two processes, with `restart`) new users 20..30 and new histories of users
/// 0..5, then each probe user pushed again, one at a time once everything before is in Redis,
/// so that its list is computed from every profile. Returns the probes' lists and the final
/// histories.
async fn recommendations_around_a_restart(
    setup: &Setup,
    restart: bool,
) -> (Vec<Value>, BTreeMap<String, Vec<String>>) {
    let checkpoints = std::env::temp_dir().join(format!("{}.checkpoints", setup.topic));
    let args = [
        setup.args(),
        recommendation_args(),
        [
            "--checkpoint-interval",
            "100ms",
            "--checkpoint-dir",
            checkpoints.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec(),
    ]
    .concat();
    let one_process = [args.clone(), vec!["-w".into(), "2".into()]].concat();
    let mut redis = redis(&setup.redis);
    let _: () = redis::cmd("FLUSHDB").query(&mut redis).unwrap();
    let id = setup.topic.clone();
    let mut histories: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut processes = vec![Dataflow::spawn(&one_process)];
    for (user, items) in taste_histories(&id, 0..20, 0) {
        let refs: Vec<&str> = items.iter().map(String::as_str).collect();
        produce_profile(&setup.topic, &user, &refs, 100).await;
        histories.insert(user, items);
    }
    for user in histories.keys() {
        wait_for_list(&mut redis, user, 100);
    }
    if restart {
        // A crash some checkpoints later: the restart restores the newest one and replays the
        // rest of the topic.
        std::thread::sleep(Duration::from_millis(500));
        for process in &mut processes {
            process.child.kill().unwrap();
            process.child.wait().unwrap();
        }
        let found = std::fs::read_dir(&checkpoints).map_or(0, |dir| dir.count());
        assert!(found > 0, "no checkpoint in {}", checkpoints.display());
        // Restarted as two processes of one worker: the co-visitation's updates, the neighbours
        // broadcast for the scoring and the stats now cross processes (in bincode).
        let hostfile = std::env::temp_dir().join(format!("{}.hosts", setup.group));
        testkit::process::local_hostfile(&hostfile, 2);
        processes = ["0", "1"]
            .map(|process| {
                let extra = ["-w", "1", "-n", "2", "-p", process, "-h"];
                let mut extra: Vec<String> = extra.map(String::from).to_vec();
                extra.push(hostfile.to_str().unwrap().to_owned());
                Dataflow::spawn(&[args.clone(), extra].concat())
            })
            .into();
    }
    let mut changed = taste_histories(&id, 20..30, 0);
    changed.extend(taste_histories(&id, 0..5, 1));
    for (user, items) in &changed {
        let refs: Vec<&str> = items.iter().map(String::as_str).collect();
        produce_profile(&setup.topic, user, &refs, 150).await;
        histories.insert(user.clone(), items.clone());
    }
    for (user, _) in &changed {
        wait_for_list(&mut redis, user, 150);
    }
    let mut probes = Vec::new();
    for (i, user) in [0, 3, 7, 12, 21, 25, 29].iter().enumerate() {
        let user = format!("{id}-u{user}");
        let items: Vec<&str> = histories[&user].iter().map(String::as_str).collect();
        let timestamp = 300 + i as u64;
        produce_profile(&setup.topic, &user, &items, timestamp).await;
        let mut list = wait_for_list(&mut redis, &user, timestamp);
        // Compared across runs by content: the user ids differ by the run's topic, the epoch
        // by when it ran.
        list["user_id"] = Value::Null;
        list["epoch"] = Value::Null;
        probes.push(list);
    }
    for process in &processes {
        process.terminate();
    }
    for process in processes {
        process.wait();
    }
    let _ = std::fs::remove_dir_all(&checkpoints);
    (probes, histories)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommendations_after_a_restart_equal_those_of_an_uninterrupted_run() {
    use dataflow::recommend::reference::RecommendReference;
    let uninterrupted = Setup::new("recs-straight", 8).await;
    let restarted = Setup::new("recs-restart", 9).await;
    let (straight, _) = recommendations_around_a_restart(&uninterrupted, false).await;
    let (after_restart, histories) = recommendations_around_a_restart(&restarted, true).await;
    // The same lists, to the bit (their JSON), as the uninterrupted run's.
    assert_eq!(after_restart, straight);
    // And the contract's: the reference over the final histories.
    let reference = RecommendReference::new(histories.values(), recommend_settings());
    for (list, user) in after_restart.iter().zip([0, 3, 7, 12, 21, 25, 29]) {
        let history = &histories[&format!("{}-u{user}", restarted.topic)];
        let actual = scored_items(&list["items"]);
        assert!(!actual.is_empty());
        reference
            .check_recommendations(history, &actual)
            .unwrap_or_else(|e| panic!("u{user}: {e}"));
    }
}
