//! Epochs of processing time, and which Kafka offsets each epoch holds.
//!
//! An [`Epoch`] is either one of the replay's, which rebuild the state on start and write
//! nothing (see [`crate::replay`]), or a live one, named by the Unix time in milliseconds at
//! which it starts, so live epoch numbers keep increasing across restarts (and across a change
//! of `--epoch-ms`), and the `epoch` stored in Redis tells when the value was produced. The
//! dataflow's timestamps are the epochs' [`Epoch::time`], every replay epoch before every live
//! one; [`Epoch::at`] reads a timestamp back.
//!
//! Epochs and the offset ledger in the whole: docs/architecture.md#epochs.

use std::collections::{BTreeMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where live epochs begin among the dataflow's timestamps: 2^40 ms is in 2004, so every live
/// epoch's Unix milliseconds are above it, and replay epochs, which count up from 0 in steps of
/// `--epoch-ms`, would take 35 years of replaying to reach it.
pub const FIRST_LIVE_TIME: u64 = 1 << 40;

/// An epoch of the dataflow. Ordered as their times are: every replay epoch first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Epoch {
    /// An epoch of rebuilding the state on start, counted from 0 in steps of `--epoch-ms`: its
    /// outputs are computed, so that later changes are compared against them, but not
    /// written, since Redis holds them already.
    Replay(u64),
    /// An epoch of reading past the committed offsets, named by the Unix milliseconds at which
    /// it starts.
    Live(u64),
}

impl Epoch {
    /// The first epoch of every run: the features file and the start of the replay.
    pub const START: Epoch = Epoch::Replay(0);

    /// The epoch whose dataflow timestamp is `time`.
    pub fn at(time: u64) -> Epoch {
        if time < FIRST_LIVE_TIME {
            Epoch::Replay(time)
        } else {
            Epoch::Live(time)
        }
    }

    /// The epoch's timestamp in the dataflow. A live epoch of a clock set before 2004 is taken
    /// for the first live time, so that it still follows the replay.
    pub fn time(self) -> u64 {
        match self {
            Epoch::Replay(time) => time.min(FIRST_LIVE_TIME - 1),
            Epoch::Live(start_ms) => start_ms.max(FIRST_LIVE_TIME),
        }
    }

    /// Whether this is one of the replay's epochs, whose outputs Redis holds already.
    pub fn is_replay(self) -> bool {
        matches!(self, Epoch::Replay(_))
    }

    /// When a live epoch started, in Unix milliseconds.
    pub fn start_ms(self) -> Option<u64> {
        match self {
            Epoch::Replay(_) => None,
            Epoch::Live(start_ms) => Some(start_ms),
        }
    }
}

/// Maps wall-clock time to epochs of a fixed length, never going backwards.
#[derive(Debug, Clone)]
pub struct EpochClock {
    epoch_ms: u64,
    last: u64,
}

impl EpochClock {
    /// A clock of epochs `epoch_ms` long (at least 1).
    pub fn new(epoch_ms: u64) -> Self {
        EpochClock {
            epoch_ms: epoch_ms.max(1),
            last: 0,
        }
    }

    /// The epoch containing Unix time `now_ms`, or the last one returned if the clock stepped
    /// back.
    pub fn epoch_at(&mut self, now_ms: u64) -> u64 {
        let epoch = now_ms - now_ms % self.epoch_ms;
        self.last = self.last.max(epoch);
        self.last
    }

    /// The current live epoch.
    pub fn now(&mut self) -> Epoch {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Epoch::Live(self.epoch_at(now_ms))
    }

    /// The epoch after `epoch`, of the same kind.
    pub fn next(&self, epoch: Epoch) -> Epoch {
        match epoch {
            Epoch::Replay(time) => Epoch::Replay(time + self.epoch_ms),
            Epoch::Live(start_ms) => Epoch::Live(start_ms + self.epoch_ms),
        }
    }
}

/// A partition of one of the source topics: (topic index, partition).
pub type SourcePartition = (usize, i32);

/// The greatest offset read from each partition in each epoch not yet committed. Once the
/// dataflow's output frontier passes an epoch, every epoch before it is durable in Redis and
/// [`OffsetLedger::complete_before`] returns the positions to commit.
#[derive(Debug, Default)]
pub struct OffsetLedger {
    epochs: BTreeMap<u64, BTreeMap<SourcePartition, i64>>,
}

impl OffsetLedger {
    /// Records that `offset` of `partition` was read in `epoch`.
    pub fn observe(&mut self, epoch: u64, partition: SourcePartition, offset: i64) {
        let greatest = self
            .epochs
            .entry(epoch)
            .or_default()
            .entry(partition)
            .or_insert(offset);
        *greatest = (*greatest).max(offset);
    }

    /// Forgets every epoch before `frontier` and returns, per partition read in them, the next
    /// offset to read: the position to commit.
    pub fn complete_before(&mut self, frontier: u64) -> BTreeMap<SourcePartition, i64> {
        let positions = self.positions_before(frontier);
        self.epochs = self.epochs.split_off(&frontier);
        positions
    }

    /// Per partition read in an epoch before `frontier`, the next offset to read, as
    /// [`complete_before`](Self::complete_before) would return it, forgetting nothing.
    pub fn positions_before(&self, frontier: u64) -> BTreeMap<SourcePartition, i64> {
        let mut positions = BTreeMap::new();
        for offsets in self.epochs.range(..frontier).map(|(_, offsets)| offsets) {
            for (&partition, &offset) in offsets {
                let next = positions.entry(partition).or_insert(offset + 1);
                *next = (*next).max(offset + 1);
            }
        }
        positions
    }

    /// Whether any epoch is waiting.
    pub fn is_empty(&self) -> bool {
        self.epochs.is_empty()
    }
}

/// A count per epoch for the epochs not yet finished, in epoch order (each added epoch the
/// latest so far), and their total: what a worker has read and not yet stored, or what its
/// writer has stored of epochs not yet reported.
#[derive(Debug, Default)]
pub struct EpochTally {
    /// The count of each epoch, oldest first.
    epochs: VecDeque<(u64, u64)>,
    total: u64,
}

impl EpochTally {
    /// Adds `count` to `epoch`, the latest so far.
    pub fn add(&mut self, epoch: u64, count: u64) {
        if count == 0 {
            return;
        }
        match self.epochs.back_mut() {
            Some((last, counted)) if *last == epoch => *counted += count,
            _ => self.epochs.push_back((epoch, count)),
        }
        self.total += count;
    }

    /// Forgets every epoch before `end` and returns their sum.
    pub fn take_before(&mut self, end: u64) -> u64 {
        let mut taken = 0;
        while let Some(&(epoch, count)) = self.epochs.front() {
            if epoch >= end {
                break;
            }
            self.epochs.pop_front();
            taken += count;
        }
        self.total -= taken;
        taken
    }

    /// The sum over the epochs not yet forgotten.
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_aligned_and_never_go_back() {
        let mut clock = EpochClock::new(100);
        assert_eq!(clock.epoch_at(1_234), 1_200);
        assert_eq!(clock.epoch_at(1_299), 1_200);
        assert_eq!(clock.epoch_at(1_300), 1_300);
        // The wall clock stepped back: stay on the epoch already handed out.
        assert_eq!(clock.epoch_at(1_000), 1_300);
        assert_eq!(clock.next(Epoch::Live(1_300)), Epoch::Live(1_400));
        assert_eq!(clock.next(Epoch::START), Epoch::Replay(100));
        // A restart with another epoch length still continues upwards.
        let mut longer = EpochClock::new(1_000);
        assert!(longer.epoch_at(1_350) >= 1_000);
    }

    #[test]
    fn replay_epochs_come_before_live_ones_and_round_trip() {
        let replay = Epoch::Replay(FIRST_LIVE_TIME - 1);
        let live = Epoch::Live(1_765_000_000_000);
        assert!(replay < live && replay.time() < live.time());
        assert_eq!(Epoch::at(replay.time()), replay);
        assert_eq!(Epoch::at(live.time()), live);
        assert!(Epoch::at(Epoch::START.time()).is_replay());
        assert_eq!(live.start_ms(), Some(1_765_000_000_000));
        assert_eq!(replay.start_ms(), None);
        // A clock set before 2004 still names an epoch after the replay.
        assert!(Epoch::Live(5).time() > replay.time());
        assert!(!Epoch::at(Epoch::Live(5).time()).is_replay());
        // A replay number past the live times (2^40 replay epochs: not reachable, but the type
        // allows it) still names a time before them.
        assert_eq!(Epoch::Replay(u64::MAX).time(), FIRST_LIVE_TIME - 1);
        assert!(Epoch::at(Epoch::Replay(FIRST_LIVE_TIME).time()).is_replay());
    }

    #[test]
    fn commits_only_complete_epochs_at_the_next_offset() {
        let mut ledger = OffsetLedger::default();
        ledger.observe(100, (0, 0), 5);
        ledger.observe(100, (0, 0), 3);
        ledger.observe(100, (0, 1), 7);
        ledger.observe(200, (0, 0), 9);
        ledger.observe(300, (1, 0), 2);
        assert!(ledger.complete_before(100).is_empty());
        assert_eq!(
            ledger.positions_before(250),
            BTreeMap::from([((0, 0), 10), ((0, 1), 8)]),
            "what the commit will be, read ahead"
        );
        let done = ledger.complete_before(250);
        assert_eq!(done, BTreeMap::from([((0, 0), 10), ((0, 1), 8)]));
        assert!(!ledger.is_empty());
        assert_eq!(
            ledger.complete_before(u64::MAX),
            BTreeMap::from([((1, 0), 3)])
        );
        assert!(ledger.is_empty());
    }

    #[test]
    fn a_tally_forgets_whole_epochs_in_order() {
        let mut tally = EpochTally::default();
        tally.add(100, 10);
        tally.add(100, 5);
        tally.add(200, 0);
        tally.add(300, 7);
        assert_eq!(tally.total(), 22);
        assert_eq!(tally.take_before(100), 0, "epoch 100 is not finished yet");
        assert_eq!(tally.total(), 22);
        assert_eq!(tally.take_before(300), 15);
        assert_eq!(tally.total(), 7);
        assert_eq!(tally.take_before(u64::MAX), 7);
        assert_eq!(tally.total(), 0);
    }
}
