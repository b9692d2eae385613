//! Rebuilding a worker's state on start, before it reads anything new.
//!
//! The state (profiles, live feature updates, holders) lives in memory, and Redis holds the
//! outputs of everything up to the committed offsets. On start, each worker therefore first
//! reads its partitions from their beginning up to those offsets again, in *replay epochs*
//! ([`crate::epoch::Epoch::Replay`], counted from 0 in steps of `--epoch-ms`), which precede
//! every live epoch. A replay epoch's outputs are computed,
//! so that later changes are compared against them, but not written: Redis holds them
//! already. Only once every partition of the worker is replayed does it read past the committed
//! offsets, in epochs from the clock. Timely completes every replay epoch on every worker
//! before any live epoch, so a live message or feature update always meets the whole state: a
//! feature update reaches the holders of the item from before the restart, and a new message
//! meets every feature update read before it.
//!
//! [`Replay`] is the bookkeeping: where each partition's replay ends, and when it is done.
//!
//! The replay in the whole: docs/architecture.md#replay-on-restart.

use std::collections::BTreeMap;

use crate::epoch::SourcePartition;

/// What to do with a message read while the worker replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Below its partition's committed offset: apply it to the state, write nothing.
    Replay,
    /// At or past the committed offset of a partition whose replay is done: leave it, it is read
    /// again once the worker is live.
    Later,
}

/// The partitions a worker is still replaying, where each replay ends, and where each finished
/// one is to be read on from.
#[derive(Debug, Default)]
pub struct Replay {
    /// Partitions still replaying: the offset their replay ends before, and the offset after
    /// the last message replayed.
    pending: BTreeMap<SourcePartition, (i64, i64)>,
    /// Finished partitions, with the offset after their last message replayed: where live
    /// reading resumes.
    resume: BTreeMap<SourcePartition, i64>,
}

impl Replay {
    /// A replay of each `(partition, low, end)`: its messages from `low`, the first offset the
    /// broker still has, up to `end`, its committed offset. A partition with nothing below
    /// `end` is left out.
    pub fn new(partitions: impl IntoIterator<Item = (SourcePartition, i64, i64)>) -> Self {
        Replay {
            pending: partitions
                .into_iter()
                .filter(|&(_, low, end)| end > low.max(0))
                .map(|(partition, low, end)| (partition, (end, low.max(0))))
                .collect(),
            ..Replay::default()
        }
    }

    /// The partitions to replay, finished or not.
    pub fn partitions(&self) -> impl Iterator<Item = SourcePartition> + '_ {
        self.pending.keys().chain(self.resume.keys()).copied()
    }

    /// Where live reading of a replayed partition resumes once it is finished: after its last
    /// message replayed. That is its end, unless the broker said the partition ended sooner.
    pub fn resume_offset(&self, partition: &SourcePartition) -> Option<i64> {
        self.resume.get(partition).copied()
    }

    /// Whether every partition is replayed.
    pub fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    /// Classifies the message at `offset` of `partition`. The message just before the end
    /// finishes the partition's replay, and so does any message at or past it (offsets may
    /// have gaps).
    pub fn read(&mut self, partition: SourcePartition, offset: i64) -> Read {
        let Some((end, next)) = self.pending.get_mut(&partition) else {
            return Read::Later;
        };
        let end = *end;
        let read = if offset < end {
            *next = offset + 1;
            Read::Replay
        } else {
            Read::Later
        };
        if offset >= end - 1 {
            self.finish(partition);
        }
        read
    }

    /// The broker reported the end of partition number `partition` of one of the topics. Its
    /// replay is done if only one partition of the replay has that number, finished or not (a
    /// finished one is still read, and reports its end again); otherwise the report cannot say
    /// which (librdkafka's end-of-partition event names no topic), and the replay ends with
    /// the message before the committed offset instead. A partition that ends before its
    /// committed offset resumes after its last message replayed, so nothing is skipped even if
    /// the report came early.
    pub fn end_of_partition(&mut self, partition: i32) {
        let mut candidates = self.partitions().filter(|(_, p)| *p == partition);
        if let (Some(only), None) = (candidates.next(), candidates.next()) {
            drop(candidates);
            self.finish(only);
        }
    }

    fn finish(&mut self, partition: SourcePartition) {
        if let Some((_, next)) = self.pending.remove(&partition) {
            self.resume.insert(partition, next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_with_nothing_below_their_end_are_not_replayed() {
        // (0, 0): committed at 5 with data from 0; (0, 1): never committed (end 0); (0, 2):
        // retention dropped everything below the committed offset; (1, 0): empty.
        let replay = Replay::new([
            ((0, 0), 0, 5),
            ((0, 1), 0, 0),
            ((0, 2), 7, 7),
            ((1, 0), 0, 0),
        ]);
        assert_eq!(replay.partitions().collect::<Vec<_>>(), [(0, 0)]);
        assert!(Replay::new([((0, 0), -1, -1001)]).is_done());
    }

    /// The finished partitions, in order.
    fn finished(replay: &Replay) -> Vec<SourcePartition> {
        replay.resume.keys().copied().collect()
    }

    #[test]
    fn a_replay_ends_with_the_message_before_the_end() {
        let mut replay = Replay::new([((0, 0), 0, 3), ((0, 1), 2, 4)]);
        assert_eq!(replay.read((0, 0), 0), Read::Replay);
        assert_eq!(replay.read((0, 1), 2), Read::Replay);
        assert_eq!(replay.read((0, 0), 1), Read::Replay);
        assert!(finished(&replay).is_empty());
        assert_eq!(replay.read((0, 0), 2), Read::Replay);
        assert_eq!(finished(&replay), [(0, 0)]);
        // Prefetched messages past the end wait for the live phase.
        assert_eq!(replay.read((0, 0), 3), Read::Later);
        assert!(!replay.is_done());
        // A gap: offset 3 is missing, 4 is past the end.
        assert_eq!(replay.read((0, 1), 4), Read::Later);
        assert_eq!(finished(&replay), [(0, 0), (0, 1)]);
        assert!(replay.is_done());
        // Live reading resumes after the last message replayed.
        assert_eq!(replay.resume_offset(&(0, 0)), Some(3));
        assert_eq!(replay.resume_offset(&(0, 1)), Some(3));
    }

    #[test]
    fn the_end_of_a_partition_finishes_it_when_unambiguous() {
        let mut replay = Replay::new([((0, 0), 0, 10), ((1, 0), 0, 10), ((0, 1), 0, 10)]);
        replay.end_of_partition(0);
        assert!(
            finished(&replay).is_empty(),
            "two topics have a partition 0"
        );
        replay.end_of_partition(1);
        assert_eq!(finished(&replay), [(0, 1)]);
        replay.end_of_partition(5);
        assert_eq!(finished(&replay), [(0, 1)]);
        // Once one of the two partitions 0 is done, it may still report its end: the report
        // stays ambiguous.
        assert_eq!(replay.read((1, 0), 9), Read::Replay);
        assert_eq!(finished(&replay), [(0, 1), (1, 0)]);
        replay.end_of_partition(0);
        assert!(!replay.is_done());
        assert_eq!(replay.read((0, 0), 9), Read::Replay);
        assert!(replay.is_done());
        // Ended early, before any message: live reading starts where the replay would have.
        assert_eq!(replay.resume_offset(&(0, 1)), Some(0));
        assert_eq!(replay.resume_offset(&(1, 0)), Some(10));
    }
}
