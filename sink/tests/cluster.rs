#![allow(clippy::unwrap_used)]
//! The sink on a Redis Cluster of the test's own (`testkit::cluster::PrivateCluster`): records
//! spread over the masters by slot, the no-regression rule, resharding (ASK while a slot moves,
//! MOVED once it has), the read marks' origin over all masters, and the fence on every master.

mod common;

use common::{unique, Profiles};
use redis::Commands;
use sink::{
    encode_profile, key_slot, ReadMarks, RedisSink, SinkConfig, SinkError, WriteMode, WriterFence,
};
use testkit::cluster::PrivateCluster;

fn config(cluster: &PrivateCluster) -> SinkConfig {
    SinkConfig {
        redis_cluster: true,
        ..SinkConfig::new(cluster.seeds())
    }
}

fn stored(conn: &mut redis::cluster::ClusterConnection, user: &str) -> Option<String> {
    conn.get(profile::redis_key(user)).unwrap()
}

#[test]
fn records_go_to_the_master_of_their_slot_and_never_regress() {
    let cluster = PrivateCluster::start();
    let profiles = Profiles::new(&unique("spread"), 3000, 5, 4);
    let mut sink = RedisSink::connect(config(&cluster)).unwrap();
    assert!(sink.is_cluster());

    let stats = sink.write(profiles.records(2_000, 10)).unwrap();
    assert_eq!(stats.written, 3000);
    // Batched per node: a few batches, not one per slot.
    assert!(stats.batches <= 3 * 8, "{stats:?}");
    let per_node = cluster.keys_per_node();
    assert_eq!(per_node.iter().sum::<u64>(), 3000);
    assert!(per_node.iter().all(|&n| n > 800), "{per_node:?}");

    let mut conn = cluster.connection();
    for record in profiles.records(2_000, 10) {
        assert_eq!(
            stored(&mut conn, record.user_id).unwrap().as_bytes(),
            encode_profile(&record)
        );
    }
    // Older timestamps are skipped on every node; the same timestamp with a later epoch wins.
    let stats = sink.write(profiles.records(1_999, 99)).unwrap();
    assert_eq!((stats.written, stats.skipped_stale), (0, 3000));
    let stats = sink.write(profiles.records(2_000, 11)).unwrap();
    assert_eq!((stats.written, stats.skipped_stale), (3000, 0));
    let first = profiles.records(2_000, 11).next().unwrap();
    assert_eq!(
        stored(&mut conn, first.user_id).unwrap().as_bytes(),
        encode_profile(&first)
    );
    assert_eq!(sink.metrics().snapshot().records_moved, 0);
}

#[test]
fn a_slot_moving_during_writes_loses_nothing() {
    let cluster = PrivateCluster::start();
    let profiles = Profiles::new(&unique("reshard"), 2000, 3, 2);
    let mut sink = RedisSink::connect(config(&cluster)).unwrap();
    sink.write(profiles.records(100, 1)).unwrap();

    // The slot of the first user, and every user of ours in it.
    let slot = key_slot(profile::redis_key(&profiles.users[0]).as_bytes());
    let in_slot: Vec<String> = profiles
        .users
        .iter()
        .filter(|user| key_slot(profile::redis_key(user).as_bytes()) == slot)
        .cloned()
        .collect();
    let from = cluster.owner(slot);
    let to = *cluster.ports().iter().find(|&&port| port != from).unwrap();

    // Half-way: the first user's key has moved, the slot is still the old master's. The sink's
    // map says the old master, which refuses that key: it goes after ASKING to the new one.
    cluster.begin_migration(slot, to, &[profile::redis_key(&profiles.users[0])]);
    let stats = sink.write(profiles.records(200, 2)).unwrap();
    assert_eq!(stats.written, 2000, "{stats:?}");
    let moved = sink.metrics().snapshot().records_moved;
    assert!(
        moved >= 1,
        "the moved key must have been resent, moved = {moved}"
    );

    // Done: the slot belongs to the new master, which the sink learns from the old one's
    // refusal and a fresh slot map.
    cluster.finish_migration(slot, to);
    assert_eq!(cluster.owner(slot), to);
    let stats = sink.write(profiles.records(300, 3)).unwrap();
    assert_eq!(stats.written, 2000, "{stats:?}");
    assert!(sink.metrics().snapshot().records_moved > moved);
    // And a later write goes straight to it.
    let before = sink.metrics().snapshot().records_moved;
    sink.write(profiles.records(400, 4)).unwrap();
    assert_eq!(sink.metrics().snapshot().records_moved, before);

    let mut conn = cluster.connection();
    for record in profiles.records(400, 4) {
        assert_eq!(
            stored(&mut conn, record.user_id).unwrap().as_bytes(),
            encode_profile(&record),
            "{}",
            record.user_id
        );
    }
    let mut new_owner = cluster.node(to);
    for user in &in_slot {
        let exists: bool = new_owner.exists(profile::redis_key(user)).unwrap();
        assert!(exists, "{user} should live on the new master");
    }
}

#[test]
fn the_origin_counts_every_master_and_a_take_over_ends_writers_on_each() {
    let cluster = PrivateCluster::start();
    let topic = unique("marks");
    let marks_config = config(&cluster);

    // An empty cluster is fresh; a second topic's marks, made after a value was written to
    // whichever master, are of unknown origin.
    let mut marks = ReadMarks::connect_for(&marks_config, &topic).unwrap();
    let first = marks.take_over().unwrap();
    assert_eq!(first.generation, 1);
    assert!(!marks.load(&[(0, 0)]).unwrap().unknown_origin);

    let fenced = |generation| SinkConfig {
        fence: Some(WriterFence {
            topic: topic.clone(),
            generation,
        }),
        ..config(&cluster)
    };
    let profiles = Profiles::new(&unique("fence"), 600, 2, 2);
    let mut older = RedisSink::connect(fenced(first.generation)).unwrap();
    older.write(profiles.records(10, 1)).unwrap();

    // A value on some master that holds no marks still makes a new hash of unknown origin.
    let other_topic = unique("marks-other");
    let mut other = ReadMarks::connect_for(&marks_config, &other_topic).unwrap();
    assert!(other.load(&[]).unwrap().unknown_origin);

    // The newer run ends the older run's writer connection on each of the three masters,
    // wherever the marks live; the older run's next write is refused.
    let second = marks.take_over().unwrap();
    assert_eq!(second.generation, 2);
    assert!(second.exclusive);
    assert_eq!(second.ended, 3, "{second:?}");
    match older.write(profiles.records(20, 2)) {
        Err(SinkError::Fenced {
            ours: 1,
            current: 2,
        }) => {}
        other => panic!("expected Fenced, got {other:?}"),
    }
    let mut newer = RedisSink::connect(fenced(second.generation)).unwrap();
    assert_eq!(newer.write(profiles.records(20, 2)).unwrap().written, 600);
}

#[test]
fn bad_seed_lists_and_unreachable_clusters_are_clear_errors() {
    let err = RedisSink::connect(SinkConfig {
        redis_cluster: true,
        ..SinkConfig::new("redis://127.0.0.1:1/3")
    })
    .unwrap_err();
    assert!(err.to_string().contains("only database 0"), "{err}");

    let err = RedisSink::connect(SinkConfig {
        redis_cluster: true,
        ..SinkConfig::new("redis://127.0.0.1:1,127.0.0.1:2")
    })
    .unwrap_err();
    assert!(
        matches!(&err, SinkError::Connect { addr, .. } if addr == "127.0.0.1:1,127.0.0.1:2"),
        "{err}"
    );

    // A single Redis named as a cluster says so.
    let single = common::PrivateRedis::start(&[]);
    let err = RedisSink::connect(SinkConfig {
        redis_cluster: true,
        ..SinkConfig::new(single.url().trim_end_matches("/0"))
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("cluster support disabled"),
        "{err}"
    );
}

#[test]
fn the_dataflow_acl_user_with_its_cluster_rules_is_enough() {
    use testkit::security::{acl_user_on_cluster, Role};
    let cluster = PrivateCluster::start();
    let topic = unique("acl");
    let as_user = |seeds: String| SinkConfig {
        redis_cluster: true,
        ..SinkConfig::new(seeds)
    };
    let config = as_user(acl_user_on_cluster(&cluster, Role::Dataflow, &[]));
    let mut marks = ReadMarks::connect_for(&config, &topic).unwrap();
    let taken = marks.take_over().unwrap();
    assert!(taken.exclusive, "{taken:?}");
    marks.load(&[(0, 0)]).unwrap();
    let profiles = Profiles::new(&unique("acl"), 200, 2, 2);
    let mut sink = RedisSink::connect(SinkConfig {
        fence: Some(WriterFence {
            topic,
            generation: taken.generation,
        }),
        ..config
    })
    .unwrap();
    assert_eq!(sink.write(profiles.records(1, 1)).unwrap().written, 200);

    // Without the slot map the sink cannot start, and says which command it was refused.
    let cluster = PrivateCluster::start();
    let config = as_user(acl_user_on_cluster(
        &cluster,
        Role::Dataflow,
        &["+cluster|slots"],
    ));
    let err = RedisSink::connect(config).unwrap_err();
    assert!(err.to_string().contains("cluster|slots"), "{err}");
}

#[test]
fn a_master_failing_over_to_its_replica_loses_nothing() {
    let mut cluster = PrivateCluster::start_with_replicas(1);
    let profiles = Profiles::new(&unique("failover"), 1500, 2, 2);
    let mut sink = RedisSink::connect(config(&cluster)).unwrap();
    sink.write(profiles.records(1, 1)).unwrap();

    // A master dies; the write that follows returns only once its replica has taken over and
    // holds the dead master's share too.
    let victim = cluster.ports()[1];
    cluster.kill(victim);
    let stats = sink.write(profiles.records(2, 2)).unwrap();
    assert_eq!(stats.written, 1500, "{stats:?}");
    assert!(!cluster.masters().contains(&victim));
    assert!(sink.metrics().snapshot().records_moved > 0);
    let mut conn = cluster.connection();
    for record in profiles.records(2, 2) {
        assert_eq!(
            stored(&mut conn, record.user_id).unwrap().as_bytes(),
            encode_profile(&record),
            "{}",
            record.user_id
        );
    }
}

#[test]
fn plain_writes_are_pipelined_sets_per_master_and_follow_a_resharding() {
    let cluster = PrivateCluster::start();
    let profiles = Profiles::new(&unique("plain"), 2000, 3, 2);
    let mut sink = RedisSink::connect(config(&cluster)).unwrap();
    sink.set_mode(WriteMode::Plain);
    let stats = sink.write(profiles.records(100, 1)).unwrap();
    assert_eq!(
        (stats.written, stats.written_plain),
        (2000, 2000),
        "{stats:?}"
    );
    assert!(stats.batches <= 3 * 8, "{stats:?}");

    // A key that left its master while the slot moves comes back as ASK and is resent,
    // checked, after ASKING; once the slot has moved, as MOVED.
    let slot = key_slot(profile::redis_key(&profiles.users[0]).as_bytes());
    let from = cluster.owner(slot);
    let to = *cluster.ports().iter().find(|&&port| port != from).unwrap();
    cluster.begin_migration(slot, to, &[profile::redis_key(&profiles.users[0])]);
    let stats = sink.write(profiles.records(200, 2)).unwrap();
    assert_eq!(stats.written, 2000, "{stats:?}");
    assert!(stats.written_plain < 2000, "{stats:?}");
    let moved = sink.metrics().snapshot().records_moved;
    assert!(moved >= 1);
    cluster.finish_migration(slot, to);
    let stats = sink.write(profiles.records(300, 3)).unwrap();
    assert_eq!(stats.written, 2000, "{stats:?}");
    assert!(sink.metrics().snapshot().records_moved > moved);

    let mut conn = cluster.connection();
    for record in profiles.records(300, 3) {
        assert_eq!(
            stored(&mut conn, record.user_id).unwrap().as_bytes(),
            encode_profile(&record),
            "{}",
            record.user_id
        );
    }
}
