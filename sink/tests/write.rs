#![allow(clippy::unwrap_used)]
//! Writes against the shared test Redis (`STREAMREC_TEST_REDIS`, default
//! redis://127.0.0.1:16379/0): stored values, counts, batching and the no-regression rule.

mod common;

use common::{conn, delete, get, sink, unique, Profiles};
use sink::{encode_profile, ProfileRecord, SinkConfig, SinkError, WriteMode};

fn rec<'a>(
    user: &'a str,
    timestamp: u64,
    epoch: u64,
    items: &'a [&'a str],
    vector: &'a [f32],
) -> ProfileRecord<'a> {
    ProfileRecord {
        user_id: user,
        timestamp,
        history_items: items,
        interest_vector: vector,
        known_items: items.len() as u32,
        epoch,
    }
}

#[test]
fn write_then_get_exact_values() {
    let prefix = unique("exact");
    let users: Vec<String> = (0..20).map(|i| format!("{prefix}-{i}")).collect();
    let items = ["i1", "i2", "i3"];
    let vector = [0.5, 0.25, 0.125];
    let records: Vec<ProfileRecord> = users
        .iter()
        .enumerate()
        .map(|(i, u)| rec(u, 1_000 + i as u64, 7, &items, &vector))
        .collect();

    let mut sink = sink(SinkConfig::new(testkit::redis_url()));
    let stats = sink.write(records.iter().copied()).unwrap();
    assert_eq!(stats.written, 20);
    assert_eq!(stats.skipped_stale, 0);
    assert_eq!(stats.batches, 1);
    assert_eq!(stats.retries, 0);
    assert!(stats.bytes > 20 * 100, "{stats:?}");

    let mut c = conn(&testkit::redis_url());
    for r in &records {
        let stored = get(&mut c, r.user_id).unwrap();
        assert_eq!(stored.as_bytes(), encode_profile(r));
    }
    assert_eq!(
        get(&mut c, &users[3]).unwrap(),
        format!(
            r#"{{"user_id":"{}","timestamp":1003,"history_items":["i1","i2","i3"],"interest_vector":[0.5,0.25,0.125],"known_items":3,"epoch":7}}"#,
            users[3]
        )
    );

    let m = sink.metrics().snapshot();
    assert_eq!(m.records_written, 20);
    assert_eq!(m.batches, 1);
    assert_eq!(m.bytes, stats.bytes as u64);
    assert_eq!(m.connects, 1);
    assert_eq!(m.errors, 0);
}

#[test]
fn empty_write_is_a_no_op() {
    let mut sink = sink(SinkConfig::new(testkit::redis_url()));
    let stats = sink.write(std::iter::empty::<ProfileRecord>()).unwrap();
    assert_eq!(stats, sink::WriteStats::default());
}

#[test]
fn no_regression() {
    let p = unique("noregress");
    let mut sink = sink(SinkConfig::new(testkit::redis_url()));
    let mut c = conn(&testkit::redis_url());
    let user = |s: &str| format!("{p}-{s}");
    let (older, later_epoch, replay, newer) =
        (user("older"), user("later"), user("replay"), user("newer"));

    // Start: every user at (ts 100, epoch 10).
    let start: Vec<_> = [&older, &later_epoch, &replay, &newer]
        .iter()
        .map(|u| rec(u, 100, 10, &["start"], &[1.0]))
        .collect();
    assert_eq!(sink.write(start.iter().copied()).unwrap().written, 4);

    let updates = [
        // Older timestamp, even from a later epoch: skipped.
        rec(&older, 99, 11, &["old"], &[2.0]),
        // Same timestamp, later epoch (item features changed): wins.
        rec(&later_epoch, 100, 11, &["start"], &[3.0]),
        // Same (timestamp, epoch): a replay; the value stays what it was.
        rec(&replay, 100, 10, &["start"], &[1.0]),
        // Newer timestamp, even from an older epoch (cannot happen, but the timestamp rules).
        rec(&newer, 101, 9, &["new"], &[4.0]),
    ];
    let stats = sink.write(updates.iter().copied()).unwrap();
    assert_eq!((stats.written, stats.skipped_stale), (3, 1), "{stats:?}");

    assert_eq!(
        get(&mut c, &older).unwrap().as_bytes(),
        encode_profile(&start[0])
    );
    assert_eq!(
        get(&mut c, &later_epoch).unwrap().as_bytes(),
        encode_profile(&updates[1])
    );
    assert_eq!(
        get(&mut c, &replay).unwrap().as_bytes(),
        encode_profile(&start[2])
    );
    assert_eq!(
        get(&mut c, &newer).unwrap().as_bytes(),
        encode_profile(&updates[3])
    );

    // Same timestamp, older epoch: skipped.
    let stale = rec(&later_epoch, 100, 10, &["start"], &[9.0]);
    let stats = sink.write([stale]).unwrap();
    assert_eq!((stats.written, stats.skipped_stale), (0, 1));
    assert_eq!(
        get(&mut c, &later_epoch).unwrap().as_bytes(),
        encode_profile(&updates[1])
    );
    assert_eq!(sink.metrics().records_skipped_stale(), 2);
}

#[test]
fn a_user_twice_in_one_batch_keeps_the_greater_value_in_either_order() {
    let p = unique("twice");
    let mut sink = sink(SinkConfig::new(testkit::redis_url()));
    let mut c = conn(&testkit::redis_url());
    let (a, b, c_user) = (format!("{p}-a"), format!("{p}-b"), format!("{p}-c"));
    // Stored: c at (ts 50, epoch 1), newer than both of its records below.
    let stored = rec(&c_user, 50, 1, &["kept"], &[9.0]);
    sink.write([stored]).unwrap();
    let newer_a = rec(&a, 20, 2, &["new"], &[2.0]);
    let newer_b = rec(&b, 20, 3, &["new"], &[2.0]);
    let batch = [
        // a: newer first, then older; b: older first, then newer (same ts, later epoch).
        newer_a,
        rec(&a, 10, 2, &["old"], &[1.0]),
        rec(&b, 20, 2, &["old"], &[1.0]),
        newer_b,
        // c: both older than what Redis holds.
        rec(&c_user, 40, 5, &["x"], &[0.0]),
        rec(&c_user, 49, 6, &["y"], &[0.0]),
    ];
    let stats = sink.write(batch.iter().copied()).unwrap();
    // Stored in turn: a's newer value, b's older then its newer one.
    assert_eq!((stats.written, stats.skipped_stale), (3, 3), "{stats:?}");
    assert_eq!(
        get(&mut c, &a).unwrap().as_bytes(),
        encode_profile(&newer_a)
    );
    assert_eq!(
        get(&mut c, &b).unwrap().as_bytes(),
        encode_profile(&newer_b)
    );
    assert_eq!(
        get(&mut c, &c_user).unwrap().as_bytes(),
        encode_profile(&stored)
    );
}

#[test]
fn user_and_item_text_cannot_fool_the_script() {
    let p = unique("fool");
    let mut sink = sink(SinkConfig::new(testkit::redis_url()));
    let mut c = conn(&testkit::redis_url());
    let tricky = [
        format!(r#"{p}"timestamp":99999999999"#),
        format!(r#"{p}","timestamp":99999999999,"epoch":99999999999}}"#),
        format!(r#"{p}\"timestamp\":99999999999"#),
    ];
    let poison = [r#"","timestamp":99999999999,"epoch":99999999999}"#];
    for u in &tricky {
        let first = rec(u, 100, 10, &poison, &[1.0]);
        assert_eq!(sink.write([first]).unwrap().written, 1);
        // Had the script read 99999999999 from the user id or item, this would be skipped.
        let second = rec(u, 101, 10, &poison, &[2.0]);
        let stats = sink.write([second]).unwrap();
        assert_eq!((stats.written, stats.skipped_stale), (1, 0), "user {u}");
        assert_eq!(get(&mut c, u).unwrap().as_bytes(), encode_profile(&second));
        // And a genuinely older one is still refused.
        let stats = sink.write([rec(u, 100, 99, &[], &[])]).unwrap();
        assert_eq!(stats.skipped_stale, 1, "user {u}");
    }
}

#[test]
fn values_written_by_others_are_read_or_replaced() {
    let p = unique("foreign");
    let mut sink = sink(SinkConfig::new(testkit::redis_url()));
    let mut c = conn(&testkit::redis_url());
    let (spaced, garbage) = (format!("{p}-spaced"), format!("{p}-garbage"));
    // Python's json.dumps style (spaces, other field order, no epoch) as the original system
    // wrote it.
    let _: () = redis::cmd("SET")
        .arg(profile::redis_key(&spaced))
        .arg(r#"{"user_id": "x", "history_items": ["a"], "timestamp": 500}"#)
        .query(&mut c)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(profile::redis_key(&garbage))
        .arg("not json")
        .query(&mut c)
        .unwrap();
    let stats = sink
        .write([
            rec(&spaced, 499, 1, &[], &[]),
            rec(&garbage, 1, 1, &[], &[]),
        ])
        .unwrap();
    assert_eq!((stats.written, stats.skipped_stale), (1, 1));
    let stats = sink.write([rec(&spaced, 500, 0, &[], &[])]).unwrap();
    assert_eq!(stats.written, 1, "same timestamp, epoch 0 >= missing epoch");
}

#[test]
fn timestamps_far_into_a_value_are_found() {
    // A long user id pushes our own timestamp far from the start of the value, and a foreign
    // value may put it after a long history. The script reads the first 256 bytes and falls
    // back to the whole value when they do not hold the timestamp: the lengths below put the
    // timestamp well inside the head, with its digits cut at the head's end in every way
    // (the digits of 1000 start at 26 + the id's length), and past the head.
    let p = unique("head");
    let mut sink = sink(SinkConfig::new(testkit::redis_url()));
    let mut c = conn(&testkit::redis_url());
    let id_len = |digits_start: usize| digits_start - 26 - p.len() - 1;
    let cut = (251..=257).map(id_len);
    for len in [140, 150, 160, 300].into_iter().chain(cut) {
        let long = format!("{p}-{}", "u".repeat(len));
        if len < 300 {
            let value = encode_profile(&rec(&long, 1_000, 10, &["a"], &[1.0]));
            let key = value.windows(12).position(|w| w == b"\"timestamp\":");
            assert_eq!(key.unwrap() + 12, 26 + long.len());
        }
        assert_eq!(
            sink.write([rec(&long, 1_000, 10, &["a"], &[1.0])])
                .unwrap()
                .written,
            1
        );
        let stats = sink.write([rec(&long, 999, 99, &["b"], &[2.0])]).unwrap();
        assert_eq!(
            (stats.written, stats.skipped_stale),
            (0, 1),
            "user id of {len}+"
        );
        let stats = sink.write([rec(&long, 1_000, 9, &["b"], &[2.0])]).unwrap();
        assert_eq!(
            (stats.written, stats.skipped_stale),
            (0, 1),
            "user id of {len}+"
        );
        let stats = sink.write([rec(&long, 1_000, 11, &["c"], &[3.0])]).unwrap();
        assert_eq!(
            (stats.written, stats.skipped_stale),
            (1, 0),
            "user id of {len}+"
        );
    }
    let foreign = format!("{p}-foreign");
    let history: Vec<String> = (0..30).map(|i| format!("item{i:06}")).collect();
    let value = serde_json::json!({"user_id": "x", "history_items": history, "timestamp": 500});
    let _: () = redis::cmd("SET")
        .arg(profile::redis_key(&foreign))
        .arg(value.to_string())
        .query(&mut c)
        .unwrap();
    assert!(value.to_string().find("timestamp").unwrap() > 160);
    let stats = sink.write([rec(&foreign, 499, 1, &[], &[])]).unwrap();
    assert_eq!((stats.written, stats.skipped_stale), (0, 1));
    let stats = sink.write([rec(&foreign, 500, 0, &[], &[])]).unwrap();
    assert_eq!(stats.written, 1, "same timestamp, epoch 0 >= missing epoch");
}

#[test]
fn batching_by_count() {
    let p = unique("count");
    let data = Profiles::new(&p, 100, 3, 4);
    let mut sink = sink(SinkConfig {
        max_batch_records: 7,
        ..SinkConfig::new(testkit::redis_url())
    });
    let stats = sink.write(data.records(1, 1)).unwrap();
    assert_eq!(stats.batches, 15);
    assert_eq!(stats.written, 100);
    let mut c = conn(&testkit::redis_url());
    for u in &data.users {
        assert!(get(&mut c, u).is_some(), "{u} missing");
    }
}

#[test]
fn batching_by_bytes() {
    let p = unique("bytes");
    let data = Profiles::new(&p, 30, 50, 32);
    // Wire size of one record: its value, key, timestamp and epoch with RESP framing (the
    // framing and the numbers take well under 64 bytes).
    let sizes: Vec<usize> = data
        .records(1, 1)
        .map(|r| encode_profile(&r).len() + profile::redis_key(r.user_id).len())
        .collect();
    let (min, max) = (
        sizes.iter().min().unwrap(),
        sizes.iter().max().unwrap() + 64,
    );
    let two = 2 * max;
    assert!(3 * min > two, "records vary too much in size for this test");
    for (limit, expect_batches) in [(1, 30), (two, 15), (1 << 20, 1)] {
        let mut sink = sink(SinkConfig {
            max_batch_bytes: limit,
            ..SinkConfig::new(testkit::redis_url())
        });
        let stats = sink.write(data.records(limit as u64, 1)).unwrap();
        assert_eq!(stats.batches, expect_batches, "limit {limit}");
        assert_eq!(stats.written, 30);
        if limit > 1 {
            // Within the limit plus the fixed EVALSHA header per batch.
            assert!(stats.bytes <= expect_batches * (limit + 100), "{stats:?}");
        }
    }
}

#[test]
fn many_records_across_pipelined_batches() {
    let p = unique("many");
    let data = Profiles::new(&p, 5_000, 50, 32);
    for depth in [1, 3] {
        let mut sink = sink(SinkConfig {
            pipeline_depth: depth,
            max_batch_records: 100,
            ..SinkConfig::new(testkit::redis_url())
        });
        let stats = sink.write(data.records(10 + depth as u64, 1)).unwrap();
        assert_eq!((stats.written, stats.batches), (5_000, 50));
    }
    let mut c = conn(&testkit::redis_url());
    let stored = get(&mut c, &data.users[4_321]).unwrap();
    let expected = data.records(13, 1).nth(4_321).unwrap();
    assert_eq!(stored.as_bytes(), encode_profile(&expected));
    delete(&testkit::redis_url(), &data.users);
}

#[test]
fn contract_violations_are_refused() {
    let mut sink = sink(SinkConfig::new(testkit::redis_url()));
    let u = unique("invalid");
    let err = sink
        .write([rec(&u, (1 << 53) + 1, 1, &[], &[])])
        .unwrap_err();
    assert!(matches!(err, SinkError::InvalidRecord { .. }), "{err}");
    let err = sink
        .write([rec(&u, 1, (1 << 53) + 1, &[], &[])])
        .unwrap_err();
    assert!(matches!(err, SinkError::InvalidRecord { .. }), "{err}");
    // The sink is still usable afterwards.
    assert_eq!(
        sink.write([rec(&u, 1 << 53, 1, &[], &[])]).unwrap().written,
        1
    );
}

#[test]
fn non_finite_floats_are_counted() {
    let mut sink = sink(SinkConfig::new(testkit::redis_url()));
    let u = unique("nan");
    sink.write([rec(&u, 1, 1, &[], &[f32::NAN, 1.0, f32::INFINITY])])
        .unwrap();
    assert_eq!(sink.metrics().non_finite_floats(), 2);
    let stored = get(&mut conn(&testkit::redis_url()), &u).unwrap();
    assert!(stored.contains("[0.0,1.0,0.0]"), "{stored}");
}

/// Runs `f` on another thread and fails the test if it takes longer than `limit`, so that a
/// sink retrying forever fails instead of hanging the test run.
fn within<T: Send + 'static>(
    limit: std::time::Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not return within {limit:?}"))
}

/// Puts a hash at the profile key of `user`, as another program might.
fn hash_at_profile_key(c: &mut redis::Connection, user: &str) {
    let _: () = redis::cmd("HSET")
        .arg(profile::redis_key(user))
        .arg("f")
        .arg("v")
        .query(c)
        .unwrap();
}

fn key_type(c: &mut redis::Connection, user: &str) -> String {
    redis::cmd("TYPE")
        .arg(profile::redis_key(user))
        .query(c)
        .unwrap()
}

#[test]
fn a_key_of_another_type_is_set_aside_and_the_rest_written() {
    let prefix = unique("wrongtype");
    let users: Vec<String> = (0..7).map(|i| format!("{prefix}-{i}")).collect();
    let refused = users[3].clone();
    let mut c = conn(&testkit::redis_url());
    hash_at_profile_key(&mut c, &refused);

    // Small batches and a pipeline, so that the refused key shares a batch with others and
    // other batches are in flight around it.
    let config = SinkConfig {
        max_batch_records: 3,
        pipeline_depth: 2,
        ..SinkConfig::new(testkit::redis_url())
    };
    let records: Vec<(String, u64)> = users.iter().map(|u| (u.clone(), 1_000)).collect();
    let (stats, metrics, mut sink) = within(std::time::Duration::from_secs(10), move || {
        let mut sink = sink(config);
        let stats = sink
            .write(records.iter().map(|(u, ts)| rec(u, *ts, 1, &["i"], &[0.5])))
            .unwrap();
        let metrics = sink.metrics().snapshot();
        (stats, metrics, sink)
    });
    assert_eq!(stats.written, 6, "{stats:?}");
    assert_eq!(stats.skipped_stale, 0);
    assert_eq!(stats.retries, 0);
    assert_eq!(stats.rejected.len(), 1, "{stats:?}");
    assert_eq!(stats.rejected[0].user_id, refused);
    assert_eq!(stats.rejected[0].code(), "WRONGTYPE", "{stats:?}");
    assert_eq!(metrics.records_rejected, 1);
    assert_eq!(metrics.records_written, 6);
    assert_eq!(metrics.retries, 0);
    for u in &users {
        if *u == refused {
            // Not clobbered.
            assert_eq!(key_type(&mut c, u), "hash");
        } else {
            assert!(
                get(&mut c, u).unwrap().contains("\"timestamp\":1000"),
                "{u}"
            );
        }
    }

    // The next write goes on as usual, the refused key still refused.
    let stats = sink
        .write(users.iter().map(|u| rec(u, 2_000, 2, &[], &[])))
        .unwrap();
    assert_eq!((stats.written, stats.rejected.len()), (6, 1), "{stats:?}");
    assert_eq!(sink.metrics().records_rejected(), 2);
    delete(&testkit::redis_url(), &users);
}

/// `MSET` replaces a key of any type, so a plain write never sees WRONGTYPE: the hash is
/// overwritten. This pins that documented limit of `WriteMode::Plain`; if it ever changes,
/// plain writes need the same set-aside handling as checked ones.
#[test]
fn a_plain_write_replaces_a_key_of_another_type() {
    let prefix = unique("wrongtype-plain");
    let users: Vec<String> = (0..5).map(|i| format!("{prefix}-{i}")).collect();
    let mut c = conn(&testkit::redis_url());
    hash_at_profile_key(&mut c, &users[2]);
    let mut sink = sink(SinkConfig {
        max_batch_records: 2,
        ..SinkConfig::new(testkit::redis_url())
    });
    sink.set_mode(WriteMode::Plain);
    let stats = sink
        .write(users.iter().map(|u| rec(u, 1_000, 1, &[], &[])))
        .unwrap();
    assert_eq!((stats.written, stats.written_plain), (5, 5), "{stats:?}");
    assert!(stats.rejected.is_empty());
    assert_eq!(key_type(&mut c, &users[2]), "string");
    delete(&testkit::redis_url(), &users);
}

#[test]
fn bad_config_and_url_are_refused() {
    let err = RedisSinkExt::connect_err(SinkConfig {
        max_batch_records: 0,
        ..SinkConfig::new(testkit::redis_url())
    });
    assert!(matches!(err, SinkError::Config(_)), "{err}");
    let err = RedisSinkExt::connect_err(SinkConfig::new("not a url"));
    assert!(matches!(err, SinkError::Config(_)), "{err}");
}

struct RedisSinkExt;

impl RedisSinkExt {
    fn connect_err(config: SinkConfig) -> SinkError {
        match sink::RedisSink::connect(config) {
            Ok(_) => panic!("connect should have failed"),
            Err(e) => e,
        }
    }
}

#[test]
fn plain_writes_store_every_record_unchecked() {
    let prefix = unique("plain");
    let users: Vec<String> = (0..40).map(|i| format!("{prefix}-{i}")).collect();
    let mut sink = sink(SinkConfig {
        max_batch_records: 16,
        ..SinkConfig::new(testkit::redis_url())
    });
    let newer: Vec<ProfileRecord> = users
        .iter()
        .map(|u| rec(u, 500, 9, &["a"], &[1.0]))
        .collect();
    sink.write(newer.iter().copied()).unwrap();

    // Plain skips the check: the caller vouches that nothing newer is stored, so an older
    // record (which this test writes only to show that nothing was compared) is stored too.
    sink.set_mode(WriteMode::Plain);
    let older: Vec<ProfileRecord> = users
        .iter()
        .map(|u| rec(u, 400, 3, &["b"], &[2.0]))
        .collect();
    let stats = sink.write(older.iter().copied()).unwrap();
    assert_eq!((stats.written, stats.written_plain), (40, 40), "{stats:?}");
    assert_eq!((stats.skipped_stale, stats.batches), (0, 3), "{stats:?}");
    assert_eq!(sink.metrics().plain_batches(), 3);
    let mut c = conn(&testkit::redis_url());
    for r in &older {
        assert_eq!(
            get(&mut c, r.user_id).unwrap().as_bytes(),
            encode_profile(r)
        );
    }

    // Back to checked: the script compares again.
    sink.set_mode(WriteMode::Checked);
    let stats = sink.write(newer.iter().take(5).copied()).unwrap();
    assert_eq!((stats.written, stats.written_plain), (5, 0), "{stats:?}");
    let stats = sink.write(older.iter().take(5).copied()).unwrap();
    assert_eq!(stats.skipped_stale, 5, "{stats:?}");
    delete(&testkit::redis_url(), &users);
}
