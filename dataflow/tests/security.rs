//! The dataflow binary end to end as the README's Redis ACL user (`docs/redis-acl.txt`): it
//! takes over, writes checked and then plain (MSET) on an empty database, raises its read marks
//! and stops cleanly; the same user short of one permission stops at start with an error that
//! names it; and a run over TLS, as that user, on a private redis-server with a test CA.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::security::{AclUser, Role, TlsRedis};
use testkit::{create_topic, produce, unique_topic};

/// The database this test owns and empties (no other test of the workspace uses it).
const DB: u32 = 11;

const FEATURES: &str = "item_id,f0,f1\napple,1,0\nbanana,0,1\n";

/// One run's topics, group and features file.
struct Topics {
    topic: String,
    features: PathBuf,
    args: Vec<String>,
}

impl Topics {
    async fn new(name: &str) -> Self {
        let topic = unique_topic(name);
        let features = std::env::temp_dir().join(format!("{topic}.features.csv"));
        std::fs::write(&features, FEATURES).unwrap();
        create_topic(&topic, 2).await;
        create_topic(&format!("{topic}.items"), 1).await;
        create_topic(&format!("{topic}.dlq"), 1).await;
        let args = [
            "--brokers",
            &testkit::brokers(),
            "--topic",
            &topic,
            "--item-topic",
            &format!("{topic}.items"),
            "--dlq-topic",
            &format!("{topic}.dlq"),
            "--group",
            &format!("{topic}.group"),
            "--item-features",
            features.to_str().unwrap(),
            "--epoch-ms",
            "50",
            "--stats-json",
            "-w",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Topics {
            topic,
            features,
            args,
        }
    }

    async fn produce(&self, user: &str, items: &[&str], timestamp: u64) {
        let value =
            serde_json::json!({"user_id": user, "history_items": items, "timestamp": timestamp});
        produce(&self.topic, Some(user), value.to_string().as_bytes()).await;
    }
}

impl Drop for Topics {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.features);
    }
}

/// A running dataflow, its stats lines and its stderr.
struct Dataflow {
    child: Child,
    lines: testkit::process::JsonLines,
}

impl Dataflow {
    fn spawn(args: &[String], redis: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dataflow"))
            .args(args)
            .args(redis)
            .env("RUST_LOG", "warn")
            .env_remove("LOG_FORMAT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = testkit::process::JsonLines::from_stdout(&mut child);
        Dataflow { child, lines }
    }

    fn total(&self, field: &str) -> u64 {
        self.lines.total(field)
    }

    fn wait_for(&mut self, field: &str, at_least: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.total(field) < at_least {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("dataflow exited with {status}: {}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "{field}: {} of {at_least} after 30 s",
                self.total(field)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits at most 30 s for the process to exit by itself, and returns whether it succeeded
    /// and its stderr.
    fn exit(mut self) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.success(), self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "dataflow did not exit within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and a clean exit.
    fn stop(self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let (ok, stderr) = self.exit();
        assert!(ok, "dataflow failed: {stderr}");
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Dataflow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(client: &redis::Client, key: &str) -> Option<String> {
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    redis::cmd("GET").arg(key).query(&mut conn).unwrap()
}

fn timestamp_of(client: &redis::Client, user: &str) -> Option<u64> {
    let value: Value = serde_json::from_str(&get(client, &profile::redis_key(user))?).unwrap();
    value["timestamp"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dataflow_runs_as_the_acl_user_and_goes_plain() {
    let admin_url = testkit::redis_url_db(DB);
    let admin = redis::Client::open(admin_url.as_str()).unwrap();
    let mut conn = admin
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    // Empty, so that the marks are of known origin and the writes go plain once caught up.
    let _: () = redis::cmd("FLUSHDB").query(&mut conn).unwrap();
    let user = AclUser::create(admin.clone(), &admin_url, Role::Dataflow, &[]);
    let topics = Topics::new("acl-dataflow").await;
    let alice = format!("{}-alice", topics.topic);
    let bob = format!("{}-bob", topics.topic);
    topics.produce(&alice, &["apple"], 10).await;

    let url = user.url(DB);
    let mut run = Dataflow::spawn(&topics.args, &["--redis", &url]);
    run.wait_for("redis_writes", 1);
    topics.produce(&bob, &["banana", "apple"], 20).await;
    topics.produce(&alice, &["apple", "banana"], 30).await;
    run.wait_for("redis_writes", 3);
    assert_eq!(run.total("plain_writes"), 3, "MSET went through");
    run.stop();

    assert_eq!(timestamp_of(&admin, &alice), Some(30));
    assert_eq!(timestamp_of(&admin, &bob), Some(20));
    let marks: std::collections::BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{}{}", sink::READ_MARKS_KEY_PREFIX, topics.topic))
        .query(&mut conn)
        .unwrap();
    assert_eq!(marks["origin"], "fresh", "{marks:?}");
    assert_eq!(marks["generation"], "1", "{marks:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_needed_permission_the_dataflow_stops_at_start_naming_it() {
    let admin_url = testkit::redis_url_db(DB);
    let admin = redis::Client::open(admin_url.as_str()).unwrap();
    let topics = Topics::new("acl-dataflow-noperm").await;
    for (missing, command) in [("+hincrby", "'hincrby'"), ("+evalsha", "'evalsha'")] {
        let user = AclUser::create(admin.clone(), &admin_url, Role::Dataflow, &[missing]);
        let run = Dataflow::spawn(&topics.args, &["--redis", &user.url(DB)]);
        let (ok, stderr) = run.exit();
        assert!(!ok, "{stderr}");
        assert!(stderr.to_ascii_uppercase().contains("NOPERM"), "{stderr}");
        assert!(stderr.contains(command), "{stderr}");
        assert!(stderr.contains("ACL"), "{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dataflow_writes_over_tls_as_the_acl_user_with_the_ca_file() {
    let server = TlsRedis::start();
    let user = AclUser::create(server.admin(), &server.url(0), Role::Dataflow, &[]);
    let topics = Topics::new("tls-dataflow").await;
    let carol = format!("{}-carol", topics.topic);
    topics.produce(&carol, &["banana"], 40).await;
    let ca_file = server.ca_file.to_str().unwrap().to_owned();
    let url = user.url(0);
    assert!(url.starts_with("rediss://"));

    let mut run = Dataflow::spawn(
        &topics.args,
        &["--redis", &url, "--redis-ca-file", &ca_file],
    );
    run.wait_for("redis_writes", 1);
    run.stop();
    assert_eq!(timestamp_of(&server.admin(), &carol), Some(40));

    // Trusting another CA, it stops at start and says why.
    let other = server.other_ca_file.to_str().unwrap().to_owned();
    let run = Dataflow::spawn(&topics.args, &["--redis", &url, "--redis-ca-file", &other]);
    let (ok, stderr) = run.exit();
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("UnknownIssuer"), "{stderr}");
    assert!(stderr.contains("--redis-ca-file"), "{stderr}");
}
