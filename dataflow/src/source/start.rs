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
}

impl StartOffsets {
    /// Where reading on resumes: the committed offset, or the first one if none was committed.
    pub(super) fn resume(&self) -> i64 {
        self.committed.unwrap_or(self.first)
    }
}

/// The first and committed offsets of every assigned partition, read once for the replay and
/// the catch-up.
pub(super) fn start_offsets(
    consumer: &BaseConsumer<SourceContext>,
    topics: &[String; 2],
    assigned: &[SourcePartition],
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
        offsets.insert((topic, partition), StartOffsets { first, committed });
    }
    Ok(offsets)
}

/// Reads the marks of the worker's profile partitions, and the offsets each must be read up to
/// before it is caught up.
pub(super) fn plan_catch_up(
    offsets: &BTreeMap<SourcePartition, StartOffsets>,
    read_marks: &mut sink::ReadMarks,
) -> Result<(Marks, CatchUp), SourceError> {
    let starts: Vec<PartitionStart> = offsets
        .iter()
        .filter(|(&(topic, _), _)| topic == PROFILE_TOPIC)
        .map(|(&(_, partition), start)| PartitionStart {
            partition,
            first: start.first,
            // Never committed: read from the beginning.
            resume: start.committed.unwrap_or(start.first),
        })
        .collect();
    let firsts: Vec<(i32, i64)> = starts.iter().map(|s| (s.partition, s.first)).collect();
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

/// Where each assigned partition's replay ends: its committed offset. Not capped at the high
/// watermark: tansu reports one below the last batch it holds (its last batch's first offset, it
/// seems; docs/tansu.md, 3), which would cut the replay short. A committed offset beyond a
/// partition's end (a topic recreated under the same group) ends the replay at the end of the
/// partition instead.
pub(super) fn plan_replay(offsets: &BTreeMap<SourcePartition, StartOffsets>) -> Replay {
    Replay::new(
        offsets
            .iter()
            .filter_map(|(&partition, start)| Some((partition, start.first, start.committed?))),
    )
}
