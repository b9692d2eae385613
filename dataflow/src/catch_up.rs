//! When a worker may write plain: catching up with what earlier runs may have written, and
//! keeping the read marks ahead of what this run reads (see `sink::ReadMarks`).
//!
//! The write script keeps a key from going back in time, at several times the cost of a
//! plain `MSET` in Redis. It only matters while Redis may hold a value newer than the one being
//! written, which a run of this process can cause itself only through a resent batch (the sink
//! resends checked). The other source is an earlier run that wrote values from messages past
//! its committed offsets before it stopped: this run reads those messages again, with a state
//! that has not seen them yet. Every run raises a partition's read mark in Redis before it
//! hands the dataflow a message at or past the mark, so an earlier run wrote only from messages
//! below the marks this run finds at start. Once every worker has read each of its profile
//! partitions up to that mark, or up to the partition's end as a fetch after start reported it
//! (nothing past it existed when the earlier run stopped), every user's state holds every
//! message any earlier run wrote from; its values are then never older than Redis's, and epochs
//! from then on may be written plain. The end comes from the fetches (librdkafka's
//! statistics), not from a ListOffsets query, which tansu answers with the first offset of the
//! partition's last batch, short of its end (docs/tansu.md, 3).
//!
//! Only the profile topic counts: a value's timestamp comes from profile messages, and its
//! epoch from this run's clock, which is later than any earlier run's.
//!
//! Two cases never get there, and every write stays checked: a database that held values
//! before the marks were created (`origin` `unknown`: an older system's values, whose
//! timestamps need not come from this topic), and a partition that starts past its floor
//! (messages an earlier run may have read were deleted, so the rebuilt state may lack them).
//!
//! The epoch of a worker's last catch-up read is still written checked: only the epochs after
//! it go plain. The argument above would allow it too, but one epoch costs nothing, and it
//! keeps a state the argument excludes (a value in Redis newer than every message of the topic
//! below the mark) from being overwritten by a message read in that epoch.
//!
//! The write-safety rules, as one state machine: docs/architecture.md#write-safety.

use std::collections::BTreeMap;

use sink::StoredMarks;

/// How far past the last offset read a worker raises a mark: one Redis round trip per this
/// many messages of a partition. A restart behind the end of the topic reads up to this many
/// messages per partition more before it writes plain.
pub const MARK_STRIDE: i64 = 10_000;

/// The profile partitions a worker must still read up to a target before it is caught up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatchUp {
    /// Partition → (the offset it must be read up to, exclusive; the next offset to read).
    pending: BTreeMap<i32, (i64, i64)>,
    /// Why this worker will never be caught up, if it will not.
    never: Option<NeverPlain>,
}

/// Why a worker's writes stay checked for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeverPlain {
    /// Redis held values before the marks were created.
    UnknownOrigin,
    /// This partition starts past its floor: messages were deleted that an earlier run may
    /// have written from.
    Deleted { partition: i32 },
}

/// Where one profile partition of a worker stands at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionStart {
    pub partition: i32,
    /// The first offset whose message the rebuilt state needs from the partition: its first
    /// offset (low watermark) now, or 0 after a checkpoint that holds everything before the
    /// messages still there.
    pub first: i64,
    /// The offset the worker reads on from after its replay: the committed one, or `first`.
    pub resume: i64,
}

/// What a worker must read before it is caught up, from the marks found in Redis.
pub fn plan(stored: &StoredMarks, partitions: &[PartitionStart]) -> CatchUp {
    if stored.unknown_origin {
        return CatchUp::never(NeverPlain::UnknownOrigin);
    }
    if let Some(start) = partitions
        .iter()
        .find(|start| !stored.nothing_deleted(start.partition, start.first))
    {
        return CatchUp::never(NeverPlain::Deleted {
            partition: start.partition,
        });
    }
    CatchUp::new(partitions.iter().map(|start| {
        (
            start.partition,
            start.resume,
            stored.catch_up_target(start.partition),
        )
    }))
}

impl CatchUp {
    /// From each partition's (resume offset, target): the offset the worker reads from next,
    /// and the one it must have read up to (`sink::StoredMarks::catch_up_target`).
    pub fn new(partitions: impl IntoIterator<Item = (i32, i64, i64)>) -> Self {
        let pending = partitions
            .into_iter()
            .filter(|&(_, resume, target)| target > resume)
            .map(|(partition, resume, target)| (partition, (target, resume)))
            .collect();
        Self {
            pending,
            never: None,
        }
    }

    /// A worker that will never be caught up, and why.
    pub fn never(why: NeverPlain) -> Self {
        Self {
            pending: BTreeMap::new(),
            never: Some(why),
        }
    }

    /// Notes that the message at `offset` of `partition` was read.
    pub fn read(&mut self, partition: i32, offset: i64) {
        if let Some((target, next)) = self.pending.get_mut(&partition) {
            *next = offset + 1;
            if *next >= *target {
                self.pending.remove(&partition);
            }
        }
    }

    /// Notes that a fetch after start found `partition` to end at `end` (its high watermark):
    /// once read up to there, it holds everything an earlier run can have read.
    pub fn ends_at(&mut self, partition: i32, end: i64) {
        if self
            .pending
            .get(&partition)
            .is_some_and(|&(_, next)| end >= 0 && next >= end)
        {
            self.pending.remove(&partition);
        }
    }

    /// Whether every partition is read up to its target.
    pub fn is_done(&self) -> bool {
        self.never.is_none() && self.pending.is_empty()
    }

    /// Why this worker will never be caught up, if it will not.
    pub fn never_plain(&self) -> Option<NeverPlain> {
        self.never
    }

    /// The partitions still behind, with their targets and the next offset each reads.
    pub fn pending(&self) -> &BTreeMap<i32, (i64, i64)> {
        &self.pending
    }
}

/// The read marks of a worker's profile partitions as Redis has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Marks {
    marks: BTreeMap<i32, i64>,
}

impl Marks {
    /// The marks Redis holds for these partitions (absent: 0, i.e. none).
    pub fn new(marks: impl IntoIterator<Item = (i32, i64)>) -> Self {
        Self {
            marks: marks.into_iter().collect(),
        }
    }

    /// The mark `partition` must be raised to before the message at `offset` may be handed on,
    /// or `None` if the mark is past it already.
    pub fn raise_for(&self, partition: i32, offset: i64) -> Option<i64> {
        let mark = self.marks.get(&partition).copied().unwrap_or(0);
        (offset >= mark).then_some(offset + MARK_STRIDE)
    }

    /// Records that Redis now has `mark` for `partition`.
    pub fn raised(&mut self, partition: i32, mark: i64) {
        let entry = self.marks.entry(partition).or_default();
        *entry = (*entry).max(mark);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_already_past_their_target_are_not_pending() {
        let catch_up = CatchUp::new([(0, 100, 100), (1, 100, 50), (2, 0, 0)]);
        assert!(catch_up.is_done());
    }

    #[test]
    fn done_once_every_partition_reads_the_offset_before_its_target() {
        let mut catch_up = CatchUp::new([(0, 0, 10), (1, 5, 6), (2, 0, 0)]);
        assert_eq!(catch_up.pending().len(), 2);
        catch_up.read(0, 8);
        catch_up.read(1, 5);
        catch_up.read(3, 1_000);
        assert_eq!(catch_up.pending(), &[(0, (10, 9))].into_iter().collect());
        catch_up.read(0, 9);
        assert!(catch_up.is_done());
        // Offsets past the target (gaps, compaction) count too.
        let mut catch_up = CatchUp::new([(0, 0, 10)]);
        catch_up.read(0, 15);
        assert!(catch_up.is_done());
    }

    #[test]
    fn a_partition_read_to_its_end_is_done_before_its_mark() {
        let mut catch_up = CatchUp::new([(0, 5, 10_000), (1, 0, 10_000)]);
        // An end not yet reached, or unknown (-1), changes nothing.
        catch_up.ends_at(0, 7);
        catch_up.ends_at(1, -1);
        assert_eq!(catch_up.pending().len(), 2);
        catch_up.read(0, 5);
        catch_up.read(0, 6);
        catch_up.ends_at(0, 7);
        // Nothing read of partition 1, and it is empty.
        catch_up.ends_at(1, 0);
        assert!(catch_up.is_done());
    }

    #[test]
    fn never_is_never_done() {
        let mut catch_up = CatchUp::never(NeverPlain::UnknownOrigin);
        catch_up.read(0, 1_000_000);
        assert!(!catch_up.is_done());
        assert_eq!(catch_up.never_plain(), Some(NeverPlain::UnknownOrigin));
    }

    fn start(partition: i32, first: i64, resume: i64) -> PartitionStart {
        PartitionStart {
            partition,
            first,
            resume,
        }
    }

    #[test]
    fn the_plan_reads_up_to_the_marks_unless_redis_holds_what_no_mark_covers() {
        let mut stored = StoredMarks {
            unknown_origin: false,
            marks: [(0, 500)].into_iter().collect(),
            floors: [(0, 0), (1, 20)].into_iter().collect(),
        };
        let partitions = [start(0, 0, 100), start(1, 20, 20)];
        assert_eq!(
            plan(&stored, &partitions).pending(),
            &[(0, (500, 100))].into_iter().collect()
        );
        // Retention moved partition 1 past its floor.
        assert_eq!(
            plan(&stored, &[start(0, 0, 100), start(1, 21, 21)]).never_plain(),
            Some(NeverPlain::Deleted { partition: 1 })
        );
        // A partition without a floor.
        assert_eq!(
            plan(&stored, &[start(2, 0, 0)]).never_plain(),
            Some(NeverPlain::Deleted { partition: 2 })
        );
        stored.unknown_origin = true;
        assert_eq!(
            plan(&stored, &partitions).never_plain(),
            Some(NeverPlain::UnknownOrigin)
        );
    }

    #[test]
    fn a_mark_is_raised_a_stride_ahead_only_when_reached() {
        let mut marks = Marks::new([(0, 100)]);
        assert_eq!(marks.raise_for(0, 99), None);
        assert_eq!(marks.raise_for(0, 100), Some(100 + MARK_STRIDE));
        assert_eq!(marks.raise_for(1, 0), Some(MARK_STRIDE));
        marks.raised(0, 100 + MARK_STRIDE);
        assert_eq!(marks.raise_for(0, 100 + MARK_STRIDE - 1), None);
        // A mark never goes down.
        marks.raised(0, 5);
        assert_eq!(marks.raise_for(0, 5_000), None);
    }
}
