//! When checkpoints are taken: at the multiples of the interval, in live epoch time.
//!
//! Every worker of a computation must write the same checkpoint (the state as of the same
//! time) for it to be complete, without talking to the others. Epoch times are Unix
//! milliseconds, the same on every worker, so the rule is about times, not about events: the
//! checkpoint of time `c` (a multiple of the interval) holds the state of every epoch before
//! `c`, and a worker takes it once every epoch before `c` is durable. Each worker sees the
//! durable frontier move in its own steps, so the rule never depends on which values it saw:
//! it takes the next multiple, unless it fell more than an interval behind (Redis was down),
//! when it skips to the newest multiple it can take rather than write a backlog of
//! checkpoints. Workers may then disagree on one checkpoint, which stays incomplete and is
//! pruned; they agree again on the next.

/// The next checkpoint time of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    interval_ms: u64,
    next: u64,
}

impl Schedule {
    /// The checkpoints every `interval_ms` (at least 1) after time `after`, which is the run's
    /// start, or the time of the checkpoint it restored if that is later (a restart within an
    /// interval must not write a checkpoint older than the one it loaded).
    pub fn new(interval_ms: u64, after: u64) -> Self {
        let interval_ms = interval_ms.max(1);
        Schedule {
            interval_ms,
            next: (after / interval_ms + 1) * interval_ms,
        }
    }

    /// The time of the next checkpoint: the state must stay readable as of every epoch before
    /// it, so the traces keep updates from `next - 1` on distinct.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// With every epoch before `durable` stored (and its offsets ready to commit), the time of
    /// the checkpoint to take now, if one is due.
    pub fn due(&self, durable: u64) -> Option<u64> {
        if durable < self.next {
            None
        } else if durable < self.next + self.interval_ms {
            Some(self.next)
        } else {
            Some(durable - durable % self.interval_ms)
        }
    }

    /// The checkpoint of time `time` was taken.
    pub fn taken(&mut self, time: u64) {
        self.next = time + self.interval_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_fall_on_multiples_of_the_interval() {
        let mut schedule = Schedule::new(1_000, 12_345);
        assert_eq!(schedule.next(), 13_000);
        assert_eq!(schedule.due(12_999), None);
        assert_eq!(schedule.due(13_000), Some(13_000));
        assert_eq!(schedule.due(13_700), Some(13_000));
        schedule.taken(13_000);
        assert_eq!(schedule.next(), 14_000);
        assert_eq!(schedule.due(13_900), None);
    }

    #[test]
    fn workers_that_see_the_frontier_in_different_steps_take_the_same_checkpoints() {
        // One worker sees the durable frontier every 100 ms, another every 700 ms.
        let taken_by = |step: u64| {
            let mut schedule = Schedule::new(1_000, 0);
            let mut taken = Vec::new();
            for durable in (0..=6_000).step_by(step as usize) {
                if let Some(time) = schedule.due(durable) {
                    schedule.taken(time);
                    taken.push(time);
                }
            }
            taken
        };
        assert_eq!(taken_by(100), [1_000, 2_000, 3_000, 4_000, 5_000, 6_000]);
        assert_eq!(taken_by(700), [1_000, 2_000, 3_000, 4_000, 5_000]);
    }

    #[test]
    fn a_worker_far_behind_skips_to_the_newest_multiple() {
        let mut schedule = Schedule::new(1_000, 0);
        assert_eq!(schedule.due(4_500), Some(4_000));
        schedule.taken(4_000);
        assert_eq!(schedule.due(4_900), None);
        assert_eq!(schedule.due(5_000), Some(5_000));
    }

    #[test]
    fn a_restart_never_writes_a_checkpoint_older_than_the_one_it_loaded() {
        assert_eq!(Schedule::new(60_000, 120_000).next(), 180_000);
        assert_eq!(Schedule::new(60_000, 119_999).next(), 120_000);
    }
}
