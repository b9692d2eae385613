#![allow(clippy::unwrap_used)]
//! The read marks against private redis-server processes, whose databases start empty.

mod common;

use std::time::Duration;

use common::{conn, unique, PrivateRedis, Profiles};
use sink::{
    ReadMarks, RedisSink, SinkConfig, SinkError, StoredMarks, WriterFence, READ_MARKS_KEY_PREFIX,
};

fn marks(server: &PrivateRedis, topic: &str) -> ReadMarks {
    ReadMarks::connect(&server.url(), topic, Duration::from_secs(2)).unwrap()
}

fn stored(unknown_origin: bool, marks: &[(i32, i64)]) -> StoredMarks {
    StoredMarks {
        unknown_origin,
        marks: marks.iter().copied().collect(),
        floors: Default::default(),
    }
}

#[test]
fn an_empty_database_is_fresh_and_marks_only_go_up() {
    let server = PrivateRedis::start(&[]);
    let mut topic = marks(&server, "profiles");
    assert_eq!(topic.key(), format!("{READ_MARKS_KEY_PREFIX}profiles"));
    assert_eq!(topic.load(&[]).unwrap(), stored(false, &[]));

    topic.advance(&[(0, 100), (3, 7)]).unwrap();
    topic.advance(&[(0, 50), (3, 9), (1, 0)]).unwrap();
    assert_eq!(
        topic.load(&[]).unwrap(),
        stored(false, &[(0, 100), (1, 0), (3, 9)])
    );

    // Another connection (another worker) sees the same; another topic has marks of its own,
    // and finds the database not empty any more.
    assert_eq!(
        marks(&server, "profiles").load(&[]).unwrap(),
        stored(false, &[(0, 100), (1, 0), (3, 9)])
    );
    assert_eq!(
        marks(&server, "other").load(&[]).unwrap(),
        stored(true, &[])
    );
}

#[test]
fn a_database_with_values_is_of_unknown_origin_until_flushed() {
    let server = PrivateRedis::start(&[]);
    let mut c = conn(&server.url());
    let _: () = redis::cmd("SET")
        .arg("user_profile:old")
        .arg("{}")
        .query(&mut c)
        .unwrap();
    let mut topic = marks(&server, "profiles");
    assert_eq!(topic.load(&[]).unwrap(), stored(true, &[]));
    topic.advance(&[(2, 40)]).unwrap();
    // The origin is recorded once: it does not change when values come and go.
    let _: () = redis::cmd("DEL")
        .arg("user_profile:old")
        .query(&mut c)
        .unwrap();
    assert_eq!(topic.load(&[]).unwrap(), stored(true, &[(2, 40)]));

    // FLUSHDB takes the marks with the values.
    let _: () = redis::cmd("FLUSHDB").query(&mut c).unwrap();
    assert_eq!(topic.load(&[]).unwrap(), stored(false, &[]));
}

#[test]
fn a_lost_connection_is_replaced_on_the_next_call() {
    let mut server = PrivateRedis::start(&[]);
    let mut topic = marks(&server, "profiles");
    topic.advance(&[(0, 10)]).unwrap();
    server.kill();
    assert!(topic.advance(&[(0, 20)]).is_err());
    server.restart();
    // The restarted server is empty (no persistence): fresh again.
    topic.advance(&[(0, 30)]).unwrap();
    assert_eq!(
        topic.load(&[]).unwrap().marks,
        [(0, 30)].into_iter().collect()
    );
}

#[test]
fn a_floor_is_recorded_once_and_only_before_any_mark() {
    let server = PrivateRedis::start(&[]);
    let mut topic = marks(&server, "profiles");
    topic.advance(&[(2, 40)]).unwrap();
    let loaded = topic.load(&[(0, 5), (1, 0), (2, 10)]).unwrap();
    // Partition 2 was read into Redis before: its first offset now says nothing.
    assert_eq!(loaded.floors, [(0, 5), (1, 0)].into_iter().collect());
    // A later load (retention moved partition 0 on) keeps the first floor.
    let loaded = topic.load(&[(0, 7), (1, 0)]).unwrap();
    assert_eq!(loaded.floors, [(0, 5), (1, 0)].into_iter().collect());
    assert!(loaded.nothing_deleted(0, 5) && !loaded.nothing_deleted(0, 7));
    assert!(!loaded.nothing_deleted(2, 0));
}

#[test]
fn a_newer_run_ends_the_older_runs_writers_which_then_refuse_to_write() {
    let server = PrivateRedis::start(&[]);
    let mut topic = marks(&server, "profiles");
    let first = topic.take_over().unwrap();
    assert_eq!(
        (first.generation, first.exclusive, first.ended),
        (1, true, 0)
    );
    // Taking over creates the hash as load does: an empty database is still fresh.
    assert!(!topic.load(&[]).unwrap().unknown_origin);

    let fenced = |generation| SinkConfig {
        fence: Some(WriterFence {
            topic: "profiles".into(),
            generation,
        }),
        io_timeout: Duration::from_secs(2),
        retry_initial_backoff: Duration::from_millis(10),
        ..SinkConfig::new(server.url())
    };
    let data = Profiles::new(&unique("fence"), 20, 3, 2);
    let mut older = RedisSink::connect(fenced(first.generation)).unwrap();
    // Another topic's writer is not touched.
    let mut other = RedisSink::connect(SinkConfig {
        fence: Some(WriterFence {
            topic: "other".into(),
            generation: 1,
        }),
        ..fenced(0)
    })
    .unwrap();
    assert_eq!(older.write(data.records(1, 1)).unwrap().written, 20);

    let second = marks(&server, "profiles").take_over().unwrap();
    assert_eq!(
        (second.generation, second.exclusive, second.ended),
        (2, true, 1)
    );
    match older.write(data.records(2, 2)) {
        Err(SinkError::Fenced {
            ours: 1,
            current: 2,
        }) => {}
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert!(matches!(
        RedisSink::connect(fenced(1)),
        Err(SinkError::Fenced {
            ours: 1,
            current: 2
        })
    ));
    let mut newer = RedisSink::connect(fenced(2)).unwrap();
    assert_eq!(newer.write(data.records(3, 3)).unwrap().written, 20);
    assert_eq!(other.write(data.records(4, 4)).unwrap().written, 20);
}

#[test]
fn without_client_a_take_over_is_not_exclusive() {
    let server = PrivateRedis::start(&[]);
    let url = server.url_without_client();
    let mut topic = ReadMarks::connect(&url, "profiles", Duration::from_secs(2)).unwrap();
    let taken = topic.take_over().unwrap();
    assert_eq!((taken.generation, taken.exclusive), (1, false));
}
