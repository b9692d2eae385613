//! Checkpoints end to end, against the real broker and Redis: the dataflow killed with SIGKILL
//! at random points of a live stream with feature updates (checkpoints every 100 ms, so some
//! kills land in a write) still leaves every user's value in Redis equal to the sequential
//! reference's; a checkpoint written by 2 workers restores into 3 workers and into 2 processes
//! of 2 workers, replaying nothing and writing nothing again, with outputs equal to the
//! reference's; and corrupt, truncated or incompatible checkpoints are reported by name, the
//! run falling back to an older checkpoint or to the full replay, with the state still exact.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataflow::model::ReadPosition;
use dataflow::reference::{vectors_agree, Reference, ReferenceProfile};
use profile::ProfileMessage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use testkit::{create_topic, unique_topic};

/// The tests' Redis database; users are named after their test's topic, so the tests share it.
const DB: u32 = 15;
/// Items in the features file (D = 2), and items that are never in it.
const FILE_ITEMS: usize = 30;
const ALL_ITEMS: usize = 36;

/// One test's topics, group, features file and checkpoint directory.
struct Setup {
    topic: String,
    item_topic: String,
    dlq_topic: String,
    group: String,
    redis: String,
    dir: tempfile::TempDir,
}

fn item(i: usize) -> String {
    format!("i{i}")
}

fn file_features(i: usize) -> Vec<f32> {
    vec![i as f32 / 10.0, 1.0 - i as f32 / 40.0]
}

impl Setup {
    async fn new(name: &str) -> Self {
        let topic = unique_topic(name);
        let setup = Setup {
            item_topic: format!("{topic}.items"),
            dlq_topic: format!("{topic}.dlq"),
            group: format!("{topic}.group"),
            redis: testkit::redis_url_db(DB),
            dir: tempfile::tempdir().unwrap(),
            topic,
        };
        create_topic(&setup.topic, 4).await;
        create_topic(&setup.item_topic, 2).await;
        create_topic(&setup.dlq_topic, 1).await;
        let mut csv = String::from("item_id,f0,f1\n");
        for i in 0..FILE_ITEMS {
            let x = file_features(i);
            csv.push_str(&format!("{},{},{}\n", item(i), x[0], x[1]));
        }
        std::fs::write(setup.features(), csv).unwrap();
        setup
    }

    fn features(&self) -> PathBuf {
        self.dir.path().join("features.csv")
    }

    fn checkpoints(&self) -> PathBuf {
        self.dir.path().join("checkpoints")
    }

    fn args(&self, interval: &str) -> Vec<String> {
        let (brokers, features) = (testkit::brokers(), self.features());
        let run = testkit::process::DataflowRun {
            brokers: &brokers,
            topic: &self.topic,
            item_topic: &self.item_topic,
            dlq_topic: &self.dlq_topic,
            group: &self.group,
            redis: &self.redis,
            item_features: &features,
        };
        let mut args = run.args(50);
        args.extend([
            "--checkpoint-dir".to_owned(),
            self.checkpoints().display().to_string(),
            "--checkpoint-interval".to_owned(),
            interval.to_owned(),
        ]);
        args
    }

    /// The files of every checkpoint in the directory, as paths relative to it, sorted.
    fn checkpoint_files(&self) -> Vec<String> {
        let mut files = Vec::new();
        for scoped in std::fs::read_dir(self.checkpoints()).into_iter().flatten() {
            let scoped = scoped.unwrap().path();
            for checkpoint in std::fs::read_dir(&scoped).into_iter().flatten() {
                let checkpoint = checkpoint.unwrap().path();
                for file in std::fs::read_dir(&checkpoint).into_iter().flatten() {
                    let file = file.unwrap().path();
                    files.push(
                        file.strip_prefix(self.checkpoints())
                            .unwrap()
                            .display()
                            .to_string(),
                    );
                }
            }
        }
        files.sort();
        files
    }
}

/// A running dataflow process, its stats lines and its log.
struct Dataflow {
    child: Child,
    stats: testkit::process::JsonLines,
    log: Arc<Mutex<Vec<String>>>,
}

impl Dataflow {
    fn spawn(setup: &Setup, interval: &str, extra: &[&str]) -> Self {
        let mut command =
            testkit::process::isolated(env!("CARGO_BIN_EXE_dataflow"), setup.dir.path());
        command
            .args(setup.args(interval))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let stats = testkit::process::JsonLines::from_stdout(&mut child);
        let lines = testkit::process::stderr_lines(&mut child);
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines {
                sink.lock().unwrap().push(line);
            }
        });
        Dataflow { child, stats, log }
    }

    /// How many lines of the log contain `text`.
    fn logged(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains(text))
            .count()
    }

    /// The checkpoints written so far: each time, with the workers that wrote it.
    fn checkpoints_written(&self) -> BTreeMap<u64, BTreeSet<u32>> {
        let mut written: BTreeMap<u64, BTreeSet<u32>> = BTreeMap::new();
        for line in self.log.lock().unwrap().iter() {
            if !line.contains("checkpoint written") {
                continue;
            }
            let field = |name: &str| -> u64 {
                let value = line.split(&format!(" {name}=")).nth(1).unwrap();
                value.split_whitespace().next().unwrap().parse().unwrap()
            };
            written
                .entry(field("time"))
                .or_default()
                .insert(field("worker") as u32);
        }
        written
    }

    /// Waits until the log has a line containing `text`.
    fn wait_for_log(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.logged(text) == 0 {
            assert!(
                Instant::now() < deadline,
                "no log line {text:?} within 30 s:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET /metrics of a run started with `--metrics-addr 127.0.0.1:0`, parsed.
    async fn scrape_metrics(&self) -> std::collections::BTreeMap<String, f64> {
        self.wait_for_log("metrics_addr=");
        let line = self
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|line| line.contains("metrics_addr="))
            .cloned()
            .unwrap();
        let addr = line.split("metrics_addr=").nth(1).unwrap();
        let addr: std::net::SocketAddr = addr.split_whitespace().next().unwrap().parse().unwrap();
        let (status, body) = testkit::http(addr, "GET", "/metrics", "").await;
        assert_eq!(status, 200, "{body}");
        testkit::prometheus::parse_exposition(&body)
    }

    /// SIGKILL: no shutdown, no last checkpoint.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then a clean exit.
    fn stop(self) {
        self.terminate();
        self.wait();
    }

    /// Sends SIGTERM. The processes of one computation finish together: all are signalled
    /// before any is waited for.
    fn terminate(&self) {
        let pid = self.child.id().to_string();
        let signalled = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(signalled.success());
    }

    /// Waits for a clean exit.
    fn wait(mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "dataflow exited with {status}:\n{}",
                    self.log.lock().unwrap().join("\n")
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no exit within 30 s of SIGTERM:\n{}",
                self.log.lock().unwrap().join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dataflow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the test sent, in order, and the contract's outputs for it.
struct Sent {
    topic: String,
    messages: Vec<(ProfileMessage, ReadPosition)>,
    features: Vec<(String, Option<Vec<f32>>, ReadPosition)>,
}

impl Sent {
    fn new(setup: &Setup) -> Self {
        Sent {
            topic: setup.topic.clone(),
            messages: Vec::new(),
            features: Vec::new(),
        }
    }

    fn user(&self, n: usize) -> String {
        format!("{}-u{n}", self.topic)
    }

    /// A random profile message: one of `users` users, 1 to 8 random items (some without
    /// features), a timestamp from a narrow range, so that ties and stale messages are common.
    fn random_message(&self, rng: &mut ChaCha8Rng, users: usize) -> ProfileMessage {
        ProfileMessage {
            user_id: self.user(rng.random_range(0..users)),
            history_items: (0..rng.random_range(1..=8))
                .map(|_| item(rng.random_range(0..ALL_ITEMS)))
                .collect(),
            timestamp: 1_000 + rng.random_range(0..40),
        }
    }

    /// A random feature update: new features for any item, or (one in five) none.
    fn random_features(rng: &mut ChaCha8Rng) -> (String, Option<Vec<f32>>) {
        let features = (rng.random_range(0..5) > 0).then(|| {
            vec![
                rng.random_range(-8..8) as f32 / 4.0,
                rng.random_range(-8..8) as f32 / 4.0,
            ]
        });
        (item(rng.random_range(0..ALL_ITEMS)), features)
    }

    /// Sends a profile message, keyed by its user.
    async fn profile(
        &mut self,
        producer: &rdkafka::producer::FutureProducer,
        message: ProfileMessage,
    ) {
        let value = serde_json::to_vec(&message).unwrap();
        testkit::produce_with(producer, &self.topic, Some(&message.user_id), &value).await;
        let position = (0, self.messages.len() as i64);
        self.messages.push((message, position));
    }

    /// Sends a feature update, keyed by its item.
    async fn feature(
        &mut self,
        producer: &rdkafka::producer::FutureProducer,
        item_topic: &str,
        (item_id, features): (String, Option<Vec<f32>>),
    ) {
        let value = serde_json::json!({ "item_id": item_id, "features": features });
        testkit::produce_with(
            producer,
            item_topic,
            Some(&item_id),
            value.to_string().as_bytes(),
        )
        .await;
        let position = (0, self.features.len() as i64);
        self.features.push((item_id, features, position));
    }

    /// Every user's value as the contract has it after everything sent.
    fn expected(&self) -> Vec<ReferenceProfile> {
        let mut reference = Reference::new(profile::DEFAULT_MAX_HISTORY, 0.9, 2);
        for i in 0..FILE_ITEMS {
            reference.set_features(&item(i), Some(file_features(i)));
        }
        reference
            .apply_epoch(0, &self.messages, &self.features)
            .changed
    }
}

/// The users whose value in Redis is not the contract's, with both (at most 5).
fn mismatches(redis: &mut redis::Connection, expected: &[ReferenceProfile]) -> Vec<String> {
    let mut wrong = Vec::new();
    for want in expected {
        let stored: Option<String> = redis::cmd("GET")
            .arg(profile::redis_key(&want.user_id))
            .query(redis)
            .unwrap();
        let got: Option<ReferenceProfile> = stored.map(|v| serde_json::from_str(&v).unwrap());
        let agrees = got.as_ref().is_some_and(|got| {
            got.timestamp == want.timestamp
                && got.history_items == want.history_items
                && got.known_items == want.known_items
                && vectors_agree(&got.interest_vector, &want.interest_vector)
        });
        if !agrees && wrong.len() < 5 {
            wrong.push(format!(
                "{}: Redis {got:?}, contract {want:?}",
                want.user_id
            ));
        }
    }
    wrong
}

/// Waits until every user's value in Redis is the contract's (60 s at most); on failure shows
/// the end of the logs of `running`.
fn wait_until_redis_matches(setup: &Setup, sent: &Sent, running: &[&Dataflow]) {
    let expected = sent.expected();
    assert!(!expected.is_empty());
    let mut redis = redis::Client::open(setup.redis.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let wrong = mismatches(&mut redis, &expected);
        if wrong.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            for run in running {
                let log = run.log.lock().unwrap();
                eprintln!("{}", log[log.len().saturating_sub(60)..].join("\n"));
            }
            panic!(
                "after 60 s Redis still differs from the contract:\n{}",
                wrong.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `count` random messages for `users` users, with a feature update after every tenth.
async fn send_random(
    setup: &Setup,
    sent: &mut Sent,
    rng: &mut ChaCha8Rng,
    count: usize,
    users: usize,
) {
    let producer = testkit::producer();
    for n in 0..count {
        let message = sent.random_message(rng, users);
        sent.profile(&producer, message).await;
        if n % 10 == 9 {
            let update = Sent::random_features(rng);
            sent.feature(&producer, &setup.item_topic, update).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_points_redis_ends_equal_to_the_contract() {
    let setup = Setup::new("ckpt-kill").await;
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    let sent = Arc::new(tokio::sync::Mutex::new(Sent::new(&setup)));
    // The stream: 2,400 messages and 240 feature updates over ~8 s, sent while the dataflow is
    // killed and started again.
    let producing = {
        let sent = sent.clone();
        let item_topic = setup.item_topic.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        tokio::spawn(async move {
            let producer = testkit::producer();
            for n in 0..2_400 {
                let mut sent = sent.lock().await;
                let message = sent.random_message(&mut rng, 150);
                sent.profile(&producer, message).await;
                if n % 10 == 9 {
                    let update = Sent::random_features(&mut rng);
                    sent.feature(&producer, &item_topic, update).await;
                    drop(sent);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
            }
        })
    };
    let (mut kills, mut restored, mut written, mut left_mid_write) = (0, 0, 0, 0);
    while !producing.is_finished() || kills < 12 {
        let workers = ["1", "2", "3"][rng.random_range(0..3)];
        let dataflow = Dataflow::spawn(&setup, "100ms", &["-w", workers]);
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1_500))).await;
        restored += dataflow.logged("restoring the newest checkpoint");
        written += dataflow.logged("checkpoint written");
        dataflow.kill();
        kills += 1;
        left_mid_write += setup
            .checkpoint_files()
            .iter()
            .filter(|file| file.ends_with(".tmp"))
            .count();
    }
    producing.await.unwrap();
    let last = Dataflow::spawn(
        &setup,
        "100ms",
        &["-w", "2", "--metrics-addr", "127.0.0.1:0"],
    );
    wait_until_redis_matches(&setup, &*sent.lock().await, &[&last]);
    // The checkpoints' metrics: files written, and the newest one's time within seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let metrics = last.scrape_metrics().await;
        if metrics["streamrec_dataflow_checkpoint_files_written_total"] >= 2.0 {
            break metrics;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than 2 files in 10 s: {metrics:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(metrics["streamrec_dataflow_checkpoint_failures_total"], 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let newest = metrics["streamrec_dataflow_checkpoint_newest_epoch_seconds"];
    assert!(
        (now - newest).abs() < 10.0,
        "newest checkpoint at {newest}, now {now}"
    );
    last.stop();
    eprintln!(
        "{kills} kills; {written} checkpoints written, {restored} runs restored one, \
         {left_mid_write} temporary files left by kills mid-write"
    );
    assert!(written > 0, "no checkpoint was written");
    assert!(restored > 0, "no run restored a checkpoint");
}

/// Checks that a run that restored a checkpoint, and has read nothing new, writes nothing in
/// its first 300 ms (six epochs): its worker 0 reports every worker's writes.
fn assert_nothing_written(run: &Dataflow) {
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(run.stats.total("redis_writes"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_restores_into_other_worker_and_process_counts() {
    let setup = Setup::new("ckpt-rescale").await;
    let mut rng = ChaCha8Rng::seed_from_u64(26);
    let mut sent = Sent::new(&setup);

    // Two workers; the shutdown writes a checkpoint of two files.
    let two = Dataflow::spawn(&setup, "60s", &["-w", "2"]);
    send_random(&setup, &mut sent, &mut rng, 300, 80).await;
    wait_until_redis_matches(&setup, &sent, &[&two]);
    two.stop();
    // The shutdown's, and one more if the run crossed a multiple of the interval.
    let files = setup.checkpoint_files();
    let of_two = files.iter().filter(|file| file.ends_with("-of-2.ckpt"));
    assert!(of_two.count() >= 2, "{files:?}");

    // Three workers: the state is restored, nothing replayed, nothing written again; then new
    // messages and feature updates, some for users and items from before, are exact.
    let three = Dataflow::spawn(&setup, "60s", &["-w", "3"]);
    three.wait_for_log("restoring the newest checkpoint");
    three.wait_for_log("the start's epochs are complete on every worker");
    assert_eq!(three.logged("state rebuilt: replayed"), 0);
    assert_nothing_written(&three);
    send_random(&setup, &mut sent, &mut rng, 200, 120).await;
    wait_until_redis_matches(&setup, &sent, &[&three]);
    three.stop();
    let files = setup.checkpoint_files();
    let of_three = files.iter().filter(|file| file.ends_with("-of-3.ckpt"));
    assert!(of_three.count() >= 3, "{files:?}");

    // Two processes of two workers, from the three workers' checkpoint.
    let hostfile = setup.dir.path().join("hosts");
    testkit::process::local_hostfile(&hostfile, 2);
    let process = |p: &str| {
        let hosts = hostfile.to_str().unwrap();
        Dataflow::spawn(&setup, "60s", &["-w", "2", "-n", "2", "-p", p, "-h", hosts])
    };
    let (first, second) = (process("0"), process("1"));
    for process in [&first, &second] {
        process.wait_for_log("restoring the newest checkpoint");
        process.wait_for_log("the start's epochs are complete on every worker");
    }
    assert_nothing_written(&first);
    send_random(&setup, &mut sent, &mut rng, 200, 160).await;
    wait_until_redis_matches(&setup, &sent, &[&first, &second]);
    assert_eq!(
        first.logged("state rebuilt: replayed") + second.logged("state rebuilt: replayed"),
        0
    );
    // Signalled 300 ms apart, the processes close at different epochs (a shutdown that waited
    // for the others before closing its inputs once hung here).
    first.terminate();
    std::thread::sleep(Duration::from_millis(300));
    second.terminate();
    first.wait();
    second.wait();
}

/// The workers of a process reach each checkpoint's time together and take turns to read and
/// write their state (one body in memory at a time): a worker whose turn has not come writes
/// the same checkpoint later, so every periodic checkpoint still has every worker's file.
/// (One second apart: with much shorter intervals a worker whose durable frontier moved past
/// two multiples at once skips to the later, with or without turns.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_of_a_process_writes_every_periodic_checkpoint() {
    let setup = Setup::new("ckpt-turns").await;
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let mut sent = Sent::new(&setup);
    let run = Dataflow::spawn(&setup, "1s", &["-w", "3"]);
    send_random(&setup, &mut sent, &mut rng, 200, 60).await;
    wait_until_redis_matches(&setup, &sent, &[&run]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while run.checkpoints_written().len() < 5 {
        assert!(
            Instant::now() < deadline,
            "fewer than 5 checkpoints in 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let written = run.checkpoints_written();
    run.stop();
    // A worker whose turn comes late may not have written the newest one yet.
    let newest = *written.keys().next_back().unwrap();
    let settled: Vec<_> = written.range(..newest).collect();
    assert!(settled.len() >= 4, "{written:?}");
    for (time, workers) in settled {
        assert_eq!(workers.len(), 3, "checkpoint {time}: {written:?}");
    }
}

/// Damages every file of the newest checkpoint with `damage`.
fn damage_newest(setup: &Setup, damage: impl Fn(&Path)) {
    let files = setup.checkpoint_files();
    let newest = files
        .iter()
        .map(|file| Path::new(file).parent().unwrap().to_owned())
        .max()
        .unwrap();
    for file in files
        .iter()
        .filter(|file| Path::new(file).starts_with(&newest))
    {
        damage(&setup.checkpoints().join(file));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_checkpoints_are_reported_and_the_run_falls_back() {
    let setup = Setup::new("ckpt-bad").await;
    let mut rng = ChaCha8Rng::seed_from_u64(36);
    let mut sent = Sent::new(&setup);
    let flip = |path: &Path| {
        let mut bytes = std::fs::read(path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(path, bytes).unwrap();
    };
    let truncate = |path: &Path| {
        let bytes = std::fs::read(path).unwrap();
        std::fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
    };

    // Two runs, two checkpoints.
    for _ in 0..2 {
        let run = Dataflow::spawn(&setup, "60s", &["-w", "2"]);
        send_random(&setup, &mut sent, &mut rng, 100, 50).await;
        wait_until_redis_matches(&setup, &sent, &[&run]);
        run.stop();
    }
    // The newest one corrupt: the older one is restored.
    damage_newest(&setup, flip);
    let run = Dataflow::spawn(&setup, "60s", &["-w", "2"]);
    run.wait_for_log("checksum mismatch");
    run.wait_for_log("restoring the newest checkpoint");
    send_random(&setup, &mut sent, &mut rng, 100, 60).await;
    wait_until_redis_matches(&setup, &sent, &[&run]);
    run.stop();

    // Every checkpoint truncated: a full replay, with the state exact.
    let files = setup.checkpoint_files();
    for file in &files {
        truncate(&setup.checkpoints().join(file));
    }
    let run = Dataflow::spawn(&setup, "60s", &["-w", "2"]);
    run.wait_for_log("truncated");
    run.wait_for_log("no complete checkpoint: replaying every partition");
    run.wait_for_log("state rebuilt: replayed");
    send_random(&setup, &mut sent, &mut rng, 100, 70).await;
    wait_until_redis_matches(&setup, &sent, &[&run]);
    run.stop();

    // A features file changed since: the checkpoint cannot hold its features, a full replay.
    std::thread::sleep(Duration::from_millis(20));
    let csv = std::fs::read_to_string(setup.features()).unwrap();
    std::fs::write(setup.features(), csv).unwrap();
    let run = Dataflow::spawn(&setup, "60s", &["-w", "1"]);
    run.wait_for_log("the features file changed since the checkpoint");
    run.wait_for_log("state rebuilt: replayed");
    send_random(&setup, &mut sent, &mut rng, 50, 70).await;
    wait_until_redis_matches(&setup, &sent, &[&run]);
    run.stop();
}
