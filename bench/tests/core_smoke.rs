//! Each core benchmark mode on tiny sizes: the counts must be exact; times are not checked.

#![allow(clippy::unwrap_used)] // a panic in a test is a test failure

use bench::dataflow_core::{incremental, item_update, scaling, EpochConfig, ScalingConfig};
use bench::workload::{Workload, WorkloadConfig};

fn workload() -> WorkloadConfig {
    WorkloadConfig {
        messages: 2_000,
        users: 500,
        items: 300,
        dim: 4,
        history: 10,
        repeat_fraction: None,
        slide: None,
        zipf_s: 0.7,
        seed: 7,
    }
}

fn epoch_config() -> EpochConfig {
    EpochConfig {
        workers: 2,
        history: 6,
        repetitions: 3,
        preload_epoch: 70,
        decay: 0.9,
    }
}

#[test]
fn scaling_feeds_every_message_on_each_worker_count() {
    let workload = Workload::generate(&workload());
    let config = ScalingConfig {
        epoch_messages: 300,
        workers: vec![1, 2],
        runs: 2,
        max_history: 50,
        decay: 0.9,
    };
    let report = scaling(&workload, &config).unwrap();
    assert_eq!(report.epochs, 7);
    assert_eq!(report.runs.len(), 4);
    let changed = report.runs[0].changed;
    for run in &report.runs {
        assert_eq!(run.messages, 2_000);
        // Worker counts agree on what changed.
        assert_eq!(run.changed, changed);
    }
    assert!(changed >= workload.distinct_users as u64);
    assert_eq!(report.rows.len(), 2);
}

#[test]
fn incremental_changes_exactly_the_users_with_a_message() {
    let report = incremental(&workload(), &[100, 1_000], 40, &epoch_config()).unwrap();
    assert_eq!(report.rows.len(), 2);
    for row in &report.rows {
        assert_eq!(row.changed, vec![40; 3]);
        assert_eq!(row.epoch_ms.len(), 3);
    }
    assert!(report.big_over_small.is_some());
}

#[test]
fn item_update_changes_exactly_its_holders() {
    let report = item_update(&workload(), 300, &[10, 100, 250], &epoch_config()).unwrap();
    let changed: Vec<(usize, Vec<u64>)> = report
        .rows
        .iter()
        .map(|row| (row.size, row.changed.clone()))
        .collect();
    assert_eq!(
        changed,
        vec![(10, vec![10; 3]), (100, vec![100; 3]), (250, vec![250; 3])]
    );
}

#[test]
fn sizes_that_cannot_be_built_are_refused() {
    assert!(incremental(&workload(), &[10], 40, &epoch_config()).is_err());
    assert!(item_update(&workload(), 5, &[10], &epoch_config()).is_err());
}
