#![allow(clippy::unwrap_used)]
//! Failure handling against private redis-server processes that the tests kill, restart and
//! reconfigure (so that the shared test server is never disturbed).

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{conn, get, unique, PrivateRedis, Profiles};
use sink::{encode_profile, RedisSink, SinkConfig, SinkError, WriteMode, WriteStats};

fn config(server: &PrivateRedis) -> SinkConfig {
    // The sink's retry warnings, visible with --nocapture.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    SinkConfig {
        // Keep the test quick: backoff 20, 40, 80, 160, 200, 200 ... ms.
        retry_initial_backoff: Duration::from_millis(20),
        retry_max_backoff: Duration::from_millis(200),
        io_timeout: Duration::from_secs(2),
        ..SinkConfig::new(server.url())
    }
}

fn assert_all_stored(url: &str, data: &Profiles, timestamp: u64, epoch: u64) {
    let mut c = conn(url);
    for r in data.records(timestamp, epoch) {
        let stored = get(&mut c, r.user_id).unwrap_or_else(|| panic!("{} missing", r.user_id));
        assert_eq!(stored.as_bytes(), encode_profile(&r));
    }
}

#[test]
fn survives_a_redis_restart() {
    let mut server = PrivateRedis::start(&[]);
    let data = Profiles::new(&unique("restart"), 2_000, 50, 32);
    let mut sink = RedisSink::connect(config(&server)).unwrap();
    assert_eq!(sink.write(data.records(1, 1)).unwrap().retries, 0);

    server.kill();
    let writer = thread::spawn(move || {
        let started = Instant::now();
        let stats = sink.write(data.records(2, 2));
        (sink, data, stats, started.elapsed())
    });
    thread::sleep(Duration::from_millis(500));
    server.restart();
    let (sink, data, stats, took) = writer.join().unwrap();
    let stats = stats.unwrap();

    assert!(stats.retries > 0, "{stats:?}");
    assert_eq!(stats.written, 2_000);
    assert!(took >= Duration::from_millis(400), "{took:?}");
    assert_all_stored(&server.url(), &data, 2, 2);
    let m = sink.metrics().snapshot();
    assert!(m.connects >= 2, "{m:?}");
    assert_eq!(m.errors, m.retries, "{m:?}");
}

#[test]
fn reloads_the_script_after_script_flush() {
    let server = PrivateRedis::start(&[]);
    let data = Profiles::new(&unique("flush"), 100, 5, 4);
    let mut sink = RedisSink::connect(config(&server)).unwrap();
    sink.write(data.records(1, 1)).unwrap();

    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut conn(&server.url()))
        .unwrap();
    let stats = sink.write(data.records(2, 1)).unwrap();
    assert_eq!(stats.written, 100);
    assert_eq!(stats.retries, 1, "one NOSCRIPT, one reload: {stats:?}");
    assert_all_stored(&server.url(), &data, 2, 1);
}

#[test]
fn gives_up_after_max_retries() {
    let mut server = PrivateRedis::start(&[]);
    let mut sink = RedisSink::connect(SinkConfig {
        max_retries: Some(2),
        ..config(&server)
    })
    .unwrap();
    server.kill();

    let data = Profiles::new(&unique("giveup"), 10, 2, 2);
    let started = Instant::now();
    let err = sink.write(data.records(1, 1)).unwrap_err();
    let took = started.elapsed();
    match &err {
        SinkError::RetriesExhausted {
            retries,
            pending_records,
            ..
        } => {
            assert_eq!(*retries, 2);
            assert_eq!(*pending_records, 10);
        }
        other => panic!("expected RetriesExhausted, got {other}"),
    }
    // Backoff 20 + 40 ms and refused connections: far below the bound.
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(sink.metrics().retries(), 2);
    assert_eq!(sink.metrics().errors(), 3);

    // Once Redis is back the same sink works again, with nothing left over from the failure.
    server.restart();
    let stats = sink.write(data.records(2, 1)).unwrap();
    assert_eq!((stats.written, stats.batches), (10, 1));
}

#[test]
fn connect_to_a_dead_port_fails_at_once() {
    let mut server = PrivateRedis::start(&[]);
    let url = server.url();
    server.kill();
    let started = Instant::now();
    match RedisSink::connect(SinkConfig::new(url)) {
        Err(SinkError::Connect { addr, .. }) => assert!(addr.contains("127.0.0.1")),
        Err(other) => panic!("expected Connect, got {other}"),
        Ok(_) => panic!("connected to a dead port"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn retries_through_busy_replies() {
    // Redis answers BUSY to everyone while a script runs longer than the threshold.
    let server = PrivateRedis::start(&["--busy-reply-threshold", "50"]);
    let sink = RedisSink::connect(config(&server)).unwrap();
    let data = Profiles::new(&unique("busy"), 50, 5, 4);
    let (_, data, stats) = write_while_busy(&server, sink, data, 1, 1);
    let stats = stats.unwrap();
    assert!(stats.retries > 0, "{stats:?}");
    assert_eq!(stats.written, 50);
    assert_all_stored(&server.url(), &data, 1, 1);
}

/// Writes `data`'s records at (`timestamp`, `epoch`) while a script keeps Redis busy (every
/// other command gets BUSY), and ends the script 300 ms into the write; returns the sink, the
/// data and what the write did.
fn write_while_busy(
    server: &PrivateRedis,
    mut sink: RedisSink,
    data: Profiles,
    timestamp: u64,
    epoch: u64,
) -> (RedisSink, Profiles, Result<WriteStats, SinkError>) {
    let url = server.url();
    let blocker = thread::spawn(move || {
        let _ = redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query::<()>(&mut conn(&url));
    });
    thread::sleep(Duration::from_millis(200));
    let writer = thread::spawn(move || {
        let stats = sink.write(data.records(timestamp, epoch));
        (sink, data, stats)
    });
    thread::sleep(Duration::from_millis(300));
    let _: () = redis::cmd("SCRIPT")
        .arg("KILL")
        .query(&mut conn(&server.url()))
        .unwrap();
    blocker.join().unwrap();
    writer.join().unwrap()
}

#[test]
fn a_plain_batch_is_resent_through_the_script() {
    let server = PrivateRedis::start(&["--busy-reply-threshold", "50"]);
    let url = server.url();
    let data = Profiles::new(&unique("plainretry"), 300, 5, 4);
    let mut sink = RedisSink::connect(config(&server)).unwrap();
    // Newer values are stored; then Redis turns busy and a plain write of older ones fails.
    sink.write(data.records(100, 1)).unwrap();
    sink.set_mode(WriteMode::Plain);
    let (mut sink, data, stats) = write_while_busy(&server, sink, data, 50, 2);
    let stats = stats.unwrap();

    // Resent checked, so the older values did not replace the newer ones.
    assert!(stats.retries > 0, "{stats:?}");
    assert_eq!(
        (stats.skipped_stale, stats.written_plain),
        (300, 0),
        "{stats:?}"
    );
    assert_all_stored(&url, &data, 100, 1);

    // The fresh connection killed the old one, so the next write goes plain again.
    let stats = sink.write(data.records(200, 3)).unwrap();
    assert_eq!(
        (stats.written, stats.written_plain),
        (300, 300),
        "{stats:?}"
    );
    assert_all_stored(&url, &data, 200, 3);
}

#[test]
fn without_client_kill_nothing_goes_plain_after_a_failure() {
    let server = PrivateRedis::start(&["--busy-reply-threshold", "50"]);
    // A user that may do everything but CLIENT, so the sink cannot end a dropped connection.
    let url = server.url_without_client();
    let data = Profiles::new(&unique("noclient"), 100, 5, 4);
    let mut sink = RedisSink::connect(SinkConfig {
        redis_url: url.clone(),
        ..config(&server)
    })
    .unwrap();
    sink.set_mode(WriteMode::Plain);
    // No connection was ever dropped: plain is safe.
    assert_eq!(sink.write(data.records(1, 1)).unwrap().written_plain, 100);

    let (mut sink, data, stats) = write_while_busy(&server, sink, data, 2, 2);
    let stats = stats.unwrap();
    assert!(stats.retries > 0, "{stats:?}");
    assert_eq!((stats.written, stats.written_plain), (100, 0), "{stats:?}");

    // The dropped connection could not be killed, so writes stay checked.
    let stats = sink.write(data.records(3, 3)).unwrap();
    assert_eq!((stats.written, stats.written_plain), (100, 0), "{stats:?}");
    assert_all_stored(&server.url(), &data, 3, 3);
}

#[test]
fn retries_through_oom() {
    let server = PrivateRedis::start(&[]);
    let mut sink = RedisSink::connect(config(&server)).unwrap();
    let mut admin = conn(&server.url());
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query(&mut admin)
        .unwrap();

    let data = Profiles::new(&unique("oom"), 50, 5, 4);
    let writer = thread::spawn(move || {
        let stats = sink.write(data.records(1, 1));
        (data, stats)
    });
    thread::sleep(Duration::from_millis(300));
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query(&mut admin)
        .unwrap();
    let (data, stats) = writer.join().unwrap();
    let stats = stats.unwrap();
    assert!(stats.retries > 0, "{stats:?}");
    assert_eq!(stats.written, 50);
    assert_all_stored(&server.url(), &data, 1, 1);
}
