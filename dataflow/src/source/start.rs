//! Where a worker's source starts: each assigned partition's first and committed offsets, read
//! once, and the two plans made from them: the replay up to the committed offsets, which
//! rebuilds the state (see [`crate::replay`]), and the catch-up with the read marks, after
//! which values may be written plain (see [`crate::catch_up`]).

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::consumer::SourceContext;
use super::{SourceError, PROFILE_TOPIC};
use crate::catch_up::{CatchUp, Marks, NeverPlain, PartitionStart};
use crate::epoch::SourcePartition;
use crate::replay::Replay;

/// Where an assigned partition stands at start.
#[derive(Debug, Clone, Copy)]
pub(super) struct StartOffsets {
    /// Its first offset (low watermark).
    first: i64,
    /// The group's committed offset, if it has one.
    committed: Option<i64>,
    /// Where the restored checkpoint's state ends, if a checkpoint was restored and covers the
    /// partition (see `crate::checkpoint`).
    checkpoint: Option<i64>,
}

impl StartOffsets {
    /// Where reading on resumes: the committed offset, or the first one if none was committed.
    /// A checkpoint past the committed offset (the commit after it was lost in a crash) moves
    /// it there: the checkpoint's state holds those messages, and Redis their outputs.
    pub(super) fn resume(&self) -> i64 {
        match (self.committed, self.checkpoint) {
            (Some(committed), Some(checkpoint)) => committed.max(checkpoint),
            (committed, checkpoint) => committed.or(checkpoint).unwrap_or(self.first),
        }
    }

    /// Where the replay that rebuilds the state starts: after the checkpoint, or at the
    /// beginning. (`None`: the partition's beginning, whatever it is when the replay starts.)
    pub(super) fn replay_from(&self) -> Option<i64> {
        self.checkpoint.map(|checkpoint| checkpoint.max(self.first))
    }

    /// The first offset whose message the rebuilt state lacks if it was deleted: the
    /// partition's first, or, after a checkpoint that the partition still reaches back to,
    /// none (0): the checkpoint holds everything before it.
    fn first_needed(&self) -> i64 {
        match self.checkpoint {
            Some(checkpoint) if checkpoint >= self.first => 0,
            _ => self.first,
        }
    }
}

/// The first and committed offsets of every assigned partition, read once for the replay and
/// the catch-up.
pub(super) fn start_offsets(
    consumer: &BaseConsumer<SourceContext>,
    topics: &[String; 2],
    assigned: &[SourcePartition],
    checkpoint: Option<&BTreeMap<SourcePartition, i64>>,
) -> Result<BTreeMap<SourcePartition, StartOffsets>, KafkaError> {
    let timeout = Duration::from_secs(10);
    let mut list = TopicPartitionList::new();
    for &(topic, partition) in assigned {
        list.add_partition(&topics[topic], partition);
    }
    let committed = consumer.committed_offsets(list, timeout)?;
    let mut offsets = BTreeMap::new();
    for &(topic, partition) in assigned {
        let committed = match committed
            .find_partition(&topics[topic], partition)
            .map(|p| p.offset())
        {
            Some(Offset::Offset(committed)) => Some(committed),
            _ => None,
        };
        let (first, high) = consumer.fetch_watermarks(&topics[topic], partition, timeout)?;
        tracing::debug!(
            topic = topics[topic],
            partition,
            first,
            committed,
            high,
            "start offsets"
        );
        let checkpoint = checkpoint.and_then(|offsets| offsets.get(&(topic, partition)).copied());
        if checkpoint.is_some_and(|checkpoint| checkpoint < first) {
            tracing::warn!(
                topic = topics[topic],
                partition,
                checkpoint,
                first,
                "messages after the checkpoint were deleted (retention) before they were \
                 replayed: the rebuilt state lacks them"
            );
        }
        offsets.insert(
            (topic, partition),
            StartOffsets {
                first,
                committed,
                checkpoint,
            },
        );
    }
    Ok(offsets)
}

/// Reads the marks of the worker's profile partitions, and the offsets each must be read up to
/// before it is caught up.
pub(super) fn plan_catch_up(
    offsets: &BTreeMap<SourcePartition, StartOffsets>,
    read_marks: &mut sink::ReadMarks,
) -> Result<(Marks, CatchUp), SourceError> {
    let profile_offsets = || {
        offsets
            .iter()
            .filter(|(&(topic, _), _)| topic == PROFILE_TOPIC)
    };
    let starts: Vec<PartitionStart> = profile_offsets()
        .map(|(&(_, partition), start)| PartitionStart {
            partition,
            first: start.first_needed(),
            resume: start.resume(),
        })
        .collect();
    let firsts: Vec<(i32, i64)> = profile_offsets()
        .map(|(&(_, partition), start)| (partition, start.first))
        .collect();
    let stored = read_marks.load(&firsts)?;
    Ok((
        Marks::new(stored.marks.clone()),
        crate::catch_up::plan(&stored, &starts),
    ))
}

/// Tells what worker `index` must read before it may write plain, or why it never will.
pub(super) fn log_catch_up_plan(index: usize, catch_up: &CatchUp, read_marks: &sink::ReadMarks) {
    match catch_up.never_plain() {
        Some(NeverPlain::UnknownOrigin) if index == 0 => tracing::info!(
            key = read_marks.key(),
            "Redis held values before the read marks were created: every write goes \
             through the no-regression script (start on an empty database for plain writes)"
        ),
        Some(NeverPlain::Deleted { partition }) => tracing::info!(
            worker = index,
            partition,
            "messages an earlier run may have written from were deleted (retention or \
             compaction), so the rebuilt state may lack them: every write goes through \
             the no-regression script"
        ),
        _ => {}
    }
    if catch_up.never_plain().is_none() && !catch_up.is_done() {
        tracing::info!(
            worker = index,
            targets = ?catch_up.pending(),
            "reading up to the read marks before writing plain"
        );
    }
}

/// Where each assigned partition's replay starts (after the checkpoint, or at its first
/// offset) and ends: its committed offset. Not capped at the high
/// watermark: tansu reports one below the last batch it holds (its last batch's first offset, it
/// seems; docs/tansu.md, 3), which would cut the replay short. A committed offset beyond a
/// partition's end (a topic recreated under the same group) ends the replay at the end of the
/// partition instead.
pub(super) fn plan_replay(offsets: &BTreeMap<SourcePartition, StartOffsets>) -> Replay {
    Replay::new(offsets.iter().filter_map(|(&partition, start)| {
        Some((
            partition,
            start.replay_from().unwrap_or(start.first),
            start.committed?,
        ))
    }))
}
