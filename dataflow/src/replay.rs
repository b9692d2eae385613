//! Rebuilding a worker's state on start, before it reads anything new.
//!
//! The state (profiles, live feature updates, holders) lives in memory, and Redis holds the
//! outputs of everything up to the committed offsets. On start, each worker therefore first
//! reads its partitions from their beginning up to those offsets again, in *replay epochs*
//! numbered from 0 (one per `--epoch-ms` of replaying), which precede every live epoch: those
//! are Unix milliseconds, far above. A replay epoch's outputs are computed, so that later
//! changes are compared against them, but not written: Redis holds them already. Only once
//! every partition of the worker is replayed does it read past the committed offsets, in epochs
//! from the clock. Timely completes every replay epoch on every worker before any live epoch,
//! so a live message or feature update always meets the whole state: a feature update reaches
//! the holders of the item from before the restart, and a new message meets every feature
//! update read before it.
//!
//! [`Replay`] is the bookkeeping: where each partition's replay ends, and when it is done.

use std::collections::BTreeMap;

use crate::epoch::SourcePartition;

/// The first epoch that is not a replay epoch. Live epochs are Unix milliseconds (2^40 ms is
/// in 2004), so they are all above it, and a replay would need 2^40 epochs to reach it.
pub const FIRST_LIVE_EPOCH: u64 = 1 << 40;

/// Whether `epoch` is one of the replay's, whose outputs Redis holds already.
pub fn is_replay_epoch(epoch: u64) -> bool {
    epoch < FIRST_LIVE_EPOCH
}

/// What to do with a message read while the worker replays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Below its partition's committed offset: apply it to the state, write nothing.
    Replay,
    /// At or past the committed offset of a partition whose replay is done: leave it, it is read
    /// again once the worker is live.
    Later,
}

/// The partitions a worker is still replaying, and the offset each replay ends at.
#[derive(Debug, Default)]
pub struct Replay {
    /// Partitions still replaying, with the offset their replay ends before.
    ends: BTreeMap<SourcePartition, i64>,
    /// Partitions whose replay ended since the last [`Replay::take_finished`].
    finished: Vec<SourcePartition>,
    /// Messages replayed so far.
    replayed: u64,
}

impl Replay {
    /// A replay of each `(partition, low, end)`: its messages from `low`, the first offset the
    /// broker still has, up to `end`, its committed offset (capped at the partition's end). A
    /// partition with nothing below `end` is left out.
    pub fn new(partitions: impl IntoIterator<Item = (SourcePartition, i64, i64)>) -> Self {
        Replay {
            ends: partitions
                .into_iter()
                .filter(|&(_, low, end)| end > low.max(0))
                .map(|(partition, _, end)| (partition, end))
                .collect(),
            ..Replay::default()
        }
    }

    /// Where the replay of `partition` ends, if it has one to do.
    pub fn end(&self, partition: &SourcePartition) -> Option<i64> {
        self.ends.get(partition).copied()
    }

    /// Whether every partition is replayed.
    pub fn is_done(&self) -> bool {
        self.ends.is_empty()
    }

    /// Messages replayed so far.
    pub fn replayed(&self) -> u64 {
        self.replayed
    }

    /// Classifies the message at `offset` of `partition`. The message just before the end
    /// finishes the partition's replay, and so does any message at or past it (offsets may
    /// have gaps).
    pub fn read(&mut self, partition: SourcePartition, offset: i64) -> Read {
        let Some(&end) = self.ends.get(&partition) else {
            return Read::Later;
        };
        if offset >= end - 1 {
            self.finish(partition);
        }
        if offset < end {
            self.replayed += 1;
            Read::Replay
        } else {
            Read::Later
        }
    }

    /// The broker reported the end of partition number `partition` of one of the topics. Its
    /// replay is done if only one replaying partition has that number; otherwise the report
    /// cannot say which (librdkafka's end-of-partition event names no topic), and the replay
    /// ends with the message before the committed offset instead.
    pub fn end_of_partition(&mut self, partition: i32) {
        let mut candidates = self.ends.keys().filter(|(_, p)| *p == partition);
        if let (Some(&only), None) = (candidates.next(), candidates.next()) {
            self.finish(only);
        }
    }

    /// The partitions whose replay ended since the last call, to stop fetching them.
    pub fn take_finished(&mut self) -> Vec<SourcePartition> {
        std::mem::take(&mut self.finished)
    }

    fn finish(&mut self, partition: SourcePartition) {
        if self.ends.remove(&partition).is_some() {
            self.finished.push(partition);
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
        assert_eq!(replay.ends, BTreeMap::from([((0, 0), 5)]));
        assert!(Replay::new([((0, 0), -1, -1001)]).is_done());
    }

    #[test]
    fn a_replay_ends_with_the_message_before_the_end() {
        let mut replay = Replay::new([((0, 0), 0, 3), ((0, 1), 2, 4)]);
        assert_eq!(replay.read((0, 0), 0), Read::Replay);
        assert_eq!(replay.read((0, 1), 2), Read::Replay);
        assert_eq!(replay.read((0, 0), 1), Read::Replay);
        assert!(replay.take_finished().is_empty());
        assert_eq!(replay.read((0, 0), 2), Read::Replay);
        assert_eq!(replay.take_finished(), [(0, 0)]);
        // Prefetched messages past the end wait for the live phase.
        assert_eq!(replay.read((0, 0), 3), Read::Later);
        assert!(!replay.is_done());
        // A gap: offset 3 is missing, 4 is past the end.
        assert_eq!(replay.read((0, 1), 4), Read::Later);
        assert_eq!(replay.take_finished(), [(0, 1)]);
        assert!(replay.is_done());
        assert_eq!(replay.replayed(), 4);
    }

    #[test]
    fn the_end_of_a_partition_finishes_it_when_unambiguous() {
        let mut replay = Replay::new([((0, 0), 0, 10), ((1, 0), 0, 10), ((0, 1), 0, 10)]);
        replay.end_of_partition(0);
        assert!(
            replay.take_finished().is_empty(),
            "two topics have a partition 0"
        );
        replay.end_of_partition(1);
        assert_eq!(replay.take_finished(), [(0, 1)]);
        replay.end_of_partition(5);
        assert!(replay.take_finished().is_empty());
        // Once one of the two partitions 0 is done, the report can only be the other's.
        assert_eq!(replay.read((1, 0), 9), Read::Replay);
        assert_eq!(replay.take_finished(), [(1, 0)]);
        replay.end_of_partition(0);
        assert_eq!(replay.take_finished(), [(0, 0)]);
        assert!(replay.is_done());
    }
}
