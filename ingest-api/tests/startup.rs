//! The binary's start-up checks, against the test broker and Redis (scripts/test.sh): a missing
//! topic, a Redis that refuses the credentials and bad Kafka properties end it with an error
//! naming the setting, non-zero, before it listens; and no secret (a secret `-X` property, the
//! Redis URL's password) reaches stderr, in either log format. Each test uses topics and Redis
//! users of its own, so the tests run in parallel.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::time::Duration;

/// Runs the binary with `args` from an empty directory holding a one-row behaviour file, until
/// it exits (killed after 30 s: a run that got past the checks listens forever).
fn run(args: &[&str], envs: &[(&str, &str)]) -> testkit::process::Exited {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("behavior.csv");
    std::fs::write(&csv, "user_id,item_id,timestamp\nalice,a,1\n").unwrap();
    let mut command = testkit::process::isolated(env!("CARGO_BIN_EXE_ingest-api"), dir.path());
    command
        .args(["--bind", "127.0.0.1:0"])
        .arg("--behavior-csv")
        .arg(&csv)
        .args(args)
        .envs(envs.iter().copied());
    testkit::process::run_to_exit(command, Duration::from_secs(30))
}

#[tokio::test]
async fn a_wrong_redis_password_is_refused_at_start() {
    let user = testkit::FullAccessUser::new("api-startup-acl", "right-password-a1b2");
    let topic = testkit::unique_topic("api-startup-password");
    testkit::create_topic(&topic, 1).await;
    let brokers = testkit::brokers();
    let wrong = testkit::redis_url_as(&user.0, "wrong-password-c3d4");
    let outcome = tokio::task::spawn_blocking(move || {
        run(
            &["--brokers", &brokers, "--topic", &topic, "--redis", &wrong],
            &[],
        )
    })
    .await
    .unwrap();
    assert!(!outcome.success, "{}", outcome.stderr);
    assert!(
        outcome.stderr.contains("REDIS_URL")
            && outcome
                .stderr
                .to_lowercase()
                .contains("authentication failed"),
        "{}",
        outcome.stderr
    );
    assert!(!outcome.stderr.contains("wrong-password-c3d4"));
    assert!(!outcome.stderr.contains("listening"), "{}", outcome.stderr);
}

#[test]
fn a_missing_topic_is_refused_at_start() {
    let topic = testkit::unique_topic("api-startup-missing");
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
    assert!(!outcome.stderr.contains("listening"), "{}", outcome.stderr);
}

#[test]
fn bad_kafka_properties_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let unreadable = dir.path().to_str().unwrap();
    for (args, envs, expected) in [
        (&["-X", "acks"][..], &[][..], &["-X #1", "key=value"][..]),
        (
            &["-X", "enable.idempotence=false"],
            &[],
            &["-X #1", "enable.idempotence", "cannot be set"],
        ),
        (&["-X", "linger.ms=5"], &[], &["linger.ms", "--linger-ms"]),
        (
            &[],
            &[("KAFKA_CONFIG_FILE", unreadable)],
            &["KAFKA_CONFIG_FILE", unreadable],
        ),
    ] {
        let outcome = run(args, envs);
        assert!(!outcome.success, "{args:?}: {}", outcome.stderr);
        for word in expected {
            assert!(
                outcome.stderr.contains(word),
                "{args:?} {envs:?}: {word:?} missing from {}",
                outcome.stderr
            );
        }
        assert!(!outcome.stderr.contains("listening"), "{}", outcome.stderr);
    }
}

#[test]
fn secrets_never_reach_stderr() {
    let topic = testkit::unique_topic("api-startup-secrets");
    for format in ["text", "json"] {
        // The service logs its configuration, then stops on the missing topic.
        let outcome = run(
            &[
                "--log-format",
                format,
                "--brokers",
                &testkit::brokers(),
                "--topic",
                &topic,
                "--redis",
                &testkit::redis_url_as("someone", "redis-secret-77aa"),
                "-X",
                "sasl.username=visible-user",
                "-X",
                "sasl.password=flag-secret-88bb",
            ],
            &[],
        );
        let stderr = &outcome.stderr;
        assert!(!outcome.success, "{stderr}");
        assert!(stderr.contains("visible-user"), "{stderr}");
        assert!(stderr.contains("someone:***@"), "{stderr}");
        for secret in ["redis-secret-77aa", "flag-secret-88bb"] {
            assert!(!stderr.contains(secret), "{format}: {secret} in {stderr}");
        }
    }
}
