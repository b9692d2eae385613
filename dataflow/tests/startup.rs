//! The binary's start-up checks, against the test broker and Redis (scripts/test.sh): every
//! setting that cannot work ends the run with an error naming it, non-zero, before anything is
//! written to Redis; and no secret (a secret `-X` property, the Redis URL's password) reaches
//! stderr, in either log format. A Redis Cluster with a master down is refused the same way.
//! Each test uses topics and Redis users of its own, so the tests run in parallel.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs the binary with `args` and `envs` from an empty directory holding a two-item features
/// file, until it exits (within 60 s).
fn run(args: &[&str], envs: &[(&str, &str)]) -> testkit::process::Exited {
    let dir = tempfile::tempdir().unwrap();
    let features = dir.path().join("item_features.csv");
    std::fs::write(&features, "item_id,f0,f1\na,1,2\nb,3,4\n").unwrap();
    let mut command = testkit::process::isolated(env!("CARGO_BIN_EXE_dataflow"), dir.path());
    command
        .arg("--item-features")
        .arg(&features)
        .args(args)
        .envs(envs.iter().copied());
    let exited = testkit::process::run_to_exit(command, Duration::from_secs(60));
    assert!(
        !exited.timed_out,
        "the dataflow did not exit within 60 s: {}",
        exited.stderr
    );
    exited
}

/// Whether any run touched `topic`'s profiles in Redis (the take-over writes its read marks).
fn read_marks_exist(topic: &str) -> bool {
    let key = format!("{}{topic}", sink::READ_MARKS_KEY_PREFIX);
    redis::cmd("EXISTS")
        .arg(&key)
        .query::<bool>(&mut testkit::redis_connection())
        .unwrap()
}

fn create_topic(name: &str) {
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(testkit::create_topic(name, 1));
}

#[test]
fn a_wrong_redis_password_is_refused_before_anything_is_written() {
    let user = testkit::FullAccessUser::new("startup-acl", "right-password-7f3a");
    let topic = testkit::unique_topic("startup-wrong-password");
    create_topic(&topic);
    let outcome = run(
        &[
            "--brokers",
            &testkit::brokers(),
            "--topic",
            &topic,
            "--redis",
            &testkit::redis_url_as(&user.0, "wrong-password-c41d"),
        ],
        &[],
    );
    assert!(!outcome.success, "{}", outcome.stderr);
    let stderr = outcome.stderr.to_lowercase();
    assert!(
        stderr.contains("redis") && stderr.contains("authentication failed"),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stderr.contains("wrong-password-c41d"));
    assert!(!read_marks_exist(&topic), "a refused run wrote to Redis");
    // The right password starts: the refusal was the password's.
    let dir = tempfile::tempdir().unwrap();
    let features = dir.path().join("item_features.csv");
    std::fs::write(&features, "item_id,f0,f1\na,1,2\n").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dataflow"))
        .args(["--brokers", &testkit::brokers(), "--topic", &topic])
        .args([
            "--redis",
            &testkit::redis_url_as(&user.0, "right-password-7f3a"),
        ])
        .arg("--item-features")
        .arg(&features)
        .args(["--group", &topic])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !read_marks_exist(&topic) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(read_marks_exist(&topic), "the right password did not start");
}

#[test]
fn a_redis_cluster_with_a_master_down_is_refused_before_anything_is_written() {
    let mut cluster = testkit::cluster::PrivateCluster::start();
    let down = cluster.ports()[2];
    cluster.kill(down);
    let topic = testkit::unique_topic("startup-cluster");
    create_topic(&topic);
    let outcome = run(
        &[
            "--brokers",
            &testkit::brokers(),
            "--topic",
            &topic,
            "--redis",
            &cluster.seeds(),
            "--redis-cluster",
        ],
        &[],
    );
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains(&format!("127.0.0.1:{down}")),
        "the error names the node: {}",
        outcome.stderr
    );
    let keys: Vec<u64> = cluster.ports()[..2]
        .iter()
        .map(|&port| redis::cmd("DBSIZE").query(&mut cluster.node(port)).unwrap())
        .collect();
    assert_eq!(keys, [0, 0], "a refused run wrote to Redis");
}

#[test]
fn a_missing_topic_is_refused_before_anything_is_written() {
    let topic = testkit::unique_topic("startup-missing-topic");
    let outcome = run(
        &[
            "--brokers",
            &testkit::brokers(),
            "--topic",
            &topic,
            "--redis",
            &testkit::redis_url(),
        ],
        &[],
    );
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains(&topic)
            && outcome.stderr.contains("does not exist")
            && outcome.stderr.contains("KAFKA_TOPIC"),
        "{}",
        outcome.stderr
    );
    // The take-over of Redis, which would end an older run's writers, never happened.
    assert!(!read_marks_exist(&topic), "a refused run wrote to Redis");
}

#[test]
fn bad_kafka_properties_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let refused_file = dir.path().join("refused.properties");
    std::fs::write(
        &refused_file,
        "# ok so far\nclient.id=x\nenable.idempotence=false\n",
    )
    .unwrap();
    let refused_file = refused_file.to_str().unwrap();
    // A directory: it exists, but cannot be read as a file.
    let unreadable = dir.path().to_str().unwrap();
    for (args, envs, expected) in [
        (
            &["-X", "client.id"][..],
            &[][..],
            &["-X #1", "key=value"][..],
        ),
        (
            &["-X", "client.id=x", "-X", "enable.auto.commit=true"],
            &[],
            &["-X #2", "enable.auto.commit", "cannot be set"],
        ),
        (&["-X", "group.id=other"], &[], &["group.id", "--group"]),
        (
            &["-X", "no.such.property=1"],
            &[],
            &["no.such.property", "librdkafka"],
        ),
        (
            &["--kafka-config-file", refused_file],
            &[],
            &["KAFKA_CONFIG_FILE line 3", "enable.idempotence"],
        ),
        (
            &[],
            &[("KAFKA_CONFIG_FILE", unreadable)],
            &["KAFKA_CONFIG_FILE", unreadable],
        ),
        (
            &["--kafka-config-file", "/nonexistent/kafka.properties"],
            &[],
            &["KAFKA_CONFIG_FILE", "/nonexistent/kafka.properties"],
        ),
    ] {
        // Nothing listens on port 1: a run that got past the check would fail differently.
        let mut all = vec![
            "--brokers",
            "127.0.0.1:1",
            "--redis",
            "redis://127.0.0.1:1/0",
        ];
        all.extend_from_slice(args);
        let outcome = run(&all, envs);
        assert!(!outcome.success, "{args:?} {envs:?}: {}", outcome.stderr);
        for word in expected {
            assert!(
                outcome.stderr.contains(word),
                "{args:?} {envs:?}: {word:?} missing from {}",
                outcome.stderr
            );
        }
        assert!(
            outcome.stderr.contains("invalid configuration"),
            "{args:?} {envs:?}: not refused at start: {}",
            outcome.stderr
        );
    }
}

#[test]
fn secrets_never_reach_stderr() {
    let topic = testkit::unique_topic("startup-secrets");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kafka.properties");
    std::fs::write(
        &file,
        "sasl.username=visible-user\nsasl.password=file-secret-91ab\n",
    )
    .unwrap();
    for format in ["text", "json"] {
        // The run logs its configuration, then fails on the missing topic.
        let outcome = run(
            &[
                "--log-format",
                format,
                "--brokers",
                &testkit::brokers(),
                "--topic",
                &topic,
                "--redis",
                &testkit::redis_url_as("someone", "redis-secret-5e2c"),
                "--kafka-config-file",
                file.to_str().unwrap(),
                "-X",
                "sasl.password=flag-secret-0d77",
            ],
            &[],
        );
        let stderr = &outcome.stderr;
        assert!(!outcome.success, "{stderr}");
        assert!(stderr.contains("configuration"), "{stderr}");
        // The configuration line is there, with the secrets' keys and the user name.
        assert!(stderr.contains("sasl.password"), "{stderr}");
        assert!(stderr.contains("visible-user"), "{stderr}");
        assert!(stderr.contains("someone:***@"), "{stderr}");
        for secret in ["redis-secret-5e2c", "file-secret-91ab", "flag-secret-0d77"] {
            assert!(!stderr.contains(secret), "{format}: {secret} in {stderr}");
        }
    }
    // librdkafka refuses a property of a feature this build lacks, quoting its value: the
    // error names the property, not the secret.
    let outcome = run(&["-X", "ssl.key.password=ssl-secret-66f0"], &[]);
    assert!(!outcome.success);
    assert!(
        outcome.stderr.contains("ssl.key.password"),
        "{}",
        outcome.stderr
    );
    assert!(
        !outcome.stderr.contains("ssl-secret-66f0"),
        "{}",
        outcome.stderr
    );
    // Nor does a mistyped one.
    let outcome = run(&["-X", "sasl.password:typo-secret-3b1e"], &[]);
    assert!(!outcome.success);
    assert!(
        !outcome.stderr.contains("typo-secret-3b1e"),
        "{}",
        outcome.stderr
    );
}
