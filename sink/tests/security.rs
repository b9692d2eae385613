#![allow(clippy::unwrap_used)]
//! The sink and the read marks as the README's ACL user (`docs/redis-acl.txt`), on a database
//! other than 0 so that SELECT is exercised too; the same user short of one permission; and
//! over TLS to a private redis-server with a CA made for the test.

mod common;

use std::time::{Duration, Instant};

use common::{unique, Profiles};
use sink::{ReadMarks, RedisSink, SinkConfig, SinkError, WriteMode, WriterFence};
use testkit::security::{AclUser, Role, TlsRedis};

/// A database no other test of the workspace uses; the keys are unique anyway.
const DB: u32 = 10;

fn admin_url() -> String {
    let url = testkit::redis_url();
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    format!("{base}/{DB}")
}

fn dataflow_user(without: &[&str]) -> AclUser {
    let url = admin_url();
    AclUser::create(
        redis::Client::open(url.as_str()).unwrap(),
        &url,
        Role::Dataflow,
        without,
    )
}

fn admin_get(client: &redis::Client, key: &str) -> Option<String> {
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    redis::cmd("GET").arg(key).query(&mut conn).unwrap()
}

fn cleanup(client: &redis::Client, keys: Vec<String>) {
    let mut conn = client
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap();
    let _: i64 = redis::cmd("UNLINK").arg(keys).query(&mut conn).unwrap();
}

#[test]
fn the_dataflow_acl_user_writes_checked_and_plain_and_takes_over() {
    let user = dataflow_user(&[]);
    let url = user.url(DB);
    let topic = unique("acl-topic");
    let io = Duration::from_secs(5);

    // Take over (the marks' load script, HINCRBY, CLIENT LIST/KILL), load and advance marks.
    let mut marks = ReadMarks::connect(&url, &topic, io).unwrap();
    let first = marks.take_over().unwrap();
    assert!(first.exclusive, "CLIENT LIST and KILL were refused");
    marks.load(&[(0, 0), (1, 5)]).unwrap();
    marks.advance(&[(0, 10_000)]).unwrap();
    let stored = marks.load(&[]).unwrap();
    assert_eq!(stored.marks.get(&0), Some(&10_000));
    assert_eq!(stored.floors.get(&1), Some(&5));

    // Writes as that run: checked (SCRIPT LOAD, EVALSHA and the script's commands), then plain
    // (MSET); the connection is named (CLIENT SETNAME) and checks the generation (HGET).
    let fence = WriterFence {
        topic: topic.clone(),
        generation: first.generation,
    };
    let mut config = SinkConfig::new(url.clone());
    config.fence = Some(fence);
    let mut sink = RedisSink::connect(config).unwrap();
    let profiles = Profiles::new(&unique("acl"), 5, 3, 4);
    let checked = sink.write(profiles.records(100, 1)).unwrap();
    assert_eq!((checked.written, checked.written_plain), (5, 0));
    // A stale value is skipped: the script really ran its comparison as this user.
    let stale = sink.write(profiles.records(99, 2)).unwrap();
    assert_eq!((stale.written, stale.skipped_stale), (0, 5));
    sink.set_mode(WriteMode::Plain);
    let plain = sink.write(profiles.records(101, 3)).unwrap();
    assert_eq!((plain.written, plain.written_plain), (5, 5));

    let admin = redis::Client::open(admin_url()).unwrap();
    for user_id in &profiles.users {
        let value = admin_get(&admin, &profile::redis_key(user_id)).unwrap();
        let value: serde_json::Value = serde_json::from_str(&value).unwrap();
        assert_eq!(value["timestamp"], 101, "{value}");
        assert_eq!(value["epoch"], 3, "{value}");
    }

    // A newer run takes over as the same user: it ends the older run's writer connection,
    // whose next write finds itself fenced.
    let second = ReadMarks::connect(&url, &topic, io)
        .unwrap()
        .take_over()
        .unwrap();
    assert!(second.exclusive);
    assert_eq!(second.ended, 1);
    let err = sink.write(profiles.records(102, 4)).unwrap_err();
    assert!(matches!(err, SinkError::Fenced { .. }), "{err}");

    let mut keys: Vec<String> = profiles
        .users
        .iter()
        .map(|u| profile::redis_key(u))
        .collect();
    keys.push(marks.key().to_owned());
    cleanup(&admin, keys);
}

/// Redis's NOPERM, which the redis crate prints as "NoPerm: ...".
fn is_noperm(err: &SinkError) -> bool {
    err.to_string().to_ascii_uppercase().contains("NOPERM")
}

#[test]
fn a_missing_permission_is_a_prompt_noperm_error() {
    let admin = redis::Client::open(admin_url()).unwrap();
    let profiles = Profiles::new(&unique("acl-noperm"), 2, 2, 2);

    // Without EVALSHA the script loads, and the first batch is refused for good: no retries.
    let user = dataflow_user(&["+evalsha"]);
    let mut sink = RedisSink::connect(SinkConfig::new(user.url(DB))).unwrap();
    let started = Instant::now();
    let err = sink.write(profiles.records(1, 1)).unwrap_err();
    assert!(matches!(err, SinkError::Permanent(_)), "{err}");
    assert!(is_noperm(&err), "{err}");
    assert!(err.to_string().contains("'evalsha'"), "{err}");
    assert!(err.to_string().contains("ACL"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "{err}");
    assert_eq!(sink.metrics().snapshot().retries, 0);

    // Without SET, the script's own SET is refused, inside EVALSHA: Redis says so as a script
    // error rather than NOPERM, and the sink's message still points at the ACL.
    let user = dataflow_user(&["+set"]);
    let mut sink = RedisSink::connect(SinkConfig::new(user.url(DB))).unwrap();
    let err = sink.write(profiles.records(1, 1)).unwrap_err();
    assert!(matches!(err, SinkError::Permanent(_)), "{err}");
    assert!(err.to_string().contains("can't run this command"), "{err}");
    assert!(err.to_string().contains("ACL permission"), "{err}");

    // Without SCRIPT LOAD, connecting fails at start.
    let user = dataflow_user(&["+script|load"]);
    let err = RedisSink::connect(SinkConfig::new(user.url(DB))).unwrap_err();
    assert!(matches!(err, SinkError::Connect { .. }), "{err}");
    assert!(is_noperm(&err), "{err}");

    // Without HINCRBY, taking over fails.
    let user = dataflow_user(&["+hincrby"]);
    let topic = unique("acl-noperm-topic");
    let mut marks = ReadMarks::connect(&user.url(DB), &topic, Duration::from_secs(5)).unwrap();
    let err = marks.take_over().unwrap_err();
    assert!(is_noperm(&err), "{err}");

    // Without SELECT, a URL naming database 10 cannot log in there.
    let user = dataflow_user(&["+select"]);
    let err = RedisSink::connect(SinkConfig::new(user.url(DB))).unwrap_err();
    assert!(err.to_string().contains("'select'"), "{err}");
    assert!(err.to_string().contains("ACL permission"), "{err}");

    let mut keys: Vec<String> = profiles
        .users
        .iter()
        .map(|u| profile::redis_key(u))
        .collect();
    keys.push(marks.key().to_owned());
    cleanup(&admin, keys);
}

#[test]
fn the_sink_and_the_read_marks_work_over_tls_with_the_ca_file() {
    let server = TlsRedis::start();
    let mut config = SinkConfig::new(server.url(0));
    config.redis_ca_file = Some(server.ca_file.clone());
    let mut sink = RedisSink::connect(config).unwrap();
    let profiles = Profiles::new("tls", 3, 2, 2);
    let stats = sink.write(profiles.records(7, 1)).unwrap();
    assert_eq!(stats.written, 3);
    let value = admin_get(&server.admin(), &profile::redis_key(&profiles.users[2])).unwrap();
    assert!(value.contains(r#""timestamp":7"#), "{value}");

    let mut marks = ReadMarks::connect_with_ca_file(
        &server.url(0),
        Some(&server.ca_file),
        "tls-topic",
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(marks.take_over().unwrap().exclusive);
    marks.advance(&[(0, 42)]).unwrap();
    assert_eq!(marks.load(&[]).unwrap().marks.get(&0), Some(&42));
}

#[test]
fn a_server_certificate_from_another_ca_is_a_clear_connect_error() {
    let server = TlsRedis::start();
    // Another CA, then the system store: neither vouches for the test's certificate.
    for ca_file in [Some(server.other_ca_file.clone()), None] {
        let mut config = SinkConfig::new(server.url(0));
        config.redis_ca_file = ca_file.clone();
        let started = Instant::now();
        let err = RedisSink::connect(config).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, SinkError::Connect { .. }), "{message}");
        assert!(message.contains("certificate"), "{ca_file:?}: {message}");
        assert!(message.contains("UnknownIssuer"), "{ca_file:?}: {message}");
        assert!(
            message.contains("--redis-ca-file"),
            "{ca_file:?}: {message}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{message}");
    }
    // A plain connection to the TLS port gets no answer it understands: an error, not a hang.
    let plain = SinkConfig {
        redis_url: format!("redis://127.0.0.1:{}/0", server.port),
        io_timeout: Duration::from_secs(1),
        ..SinkConfig::default()
    };
    assert!(RedisSink::connect(plain).is_err());
}
