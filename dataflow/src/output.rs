//! The last stage: once an epoch is complete, its consolidated changes become one final value
//! per changed user, handed to an [`EpochWriter`] (Redis, or a capture in tests). The stage holds
//! the epoch's capability until the writer returns, so a probe after it passes an epoch only
//! once that epoch is durable on every worker — which is when its offsets may be committed.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use differential_dataflow::consolidation::consolidate;
use differential_dataflow::VecCollection;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Operator;
use timely::dataflow::Stream;

use crate::interest::ProfileChange;
use crate::model::{Contribution, ProfileOutput};
use crate::pending::PendingEpochs;
use crate::stats::StatsBoard;

/// Writes the final values of an epoch somewhere durable.
pub trait EpochWriter: 'static {
    /// Writes `profiles`, the final values of `epoch`, and returns how many were stored, only
    /// once they are durable. It must not give up: retrying is its job.
    fn write_epoch(&mut self, epoch: u64, profiles: &[ProfileOutput]) -> u64;
}

/// Turns each complete epoch of `changes` into final values and writes them. The output carries
/// the number of each epoch written, for a probe.
pub fn write_epochs<'scope, W: EpochWriter>(
    changes: VecCollection<'scope, u64, ProfileChange, isize>,
    dim: usize,
    epoch_ms: Option<u64>,
    mut writer: W,
    stats: Rc<RefCell<StatsBoard>>,
) -> Stream<'scope, u64, Vec<u64>> {
    changes
        .inner
        .unary_frontier(Pipeline, "WriteEpochs", move |_capability, _info| {
            let mut pending = PendingEpochs::<(ProfileChange, isize)>::default();
            move |(input, frontier), output| {
                input.for_each(|capability, data| {
                    // Updates carry their own times, at or after the batch's stamp.
                    for (change, time, diff) in data.drain(..) {
                        pending
                            .at(time, || capability.delayed(&time, 0))
                            .push((change, diff));
                    }
                });
                while let Some((capability, mut updates)) =
                    pending.take_complete(frontier.frontier())
                {
                    let epoch = *capability.time();
                    consolidate(&mut updates);
                    // After consolidation a changed user has its old value retracted (-1) and
                    // its new value added (+1); the new one is what gets written.
                    let profiles: Vec<ProfileOutput> = updates
                        .into_iter()
                        .filter(|(_, diff)| *diff > 0)
                        .map(|((_user, (profile, sums)), _)| {
                            let (interest_vector, known_items) = Contribution::finish(&sums, dim);
                            ProfileOutput {
                                user_id: profile.user_id,
                                timestamp: profile.timestamp,
                                history_items: profile.history_items,
                                interest_vector,
                                known_items,
                            }
                        })
                        .collect();
                    let written = writer.write_epoch(epoch, &profiles);
                    let mut board = stats.borrow_mut();
                    let counters = board.epoch(epoch);
                    counters.changed += profiles.len() as u64;
                    counters.redis_writes += written;
                    if let Some(epoch_ms) = epoch_ms {
                        let now = unix_millis();
                        counters.latency_ms = now.saturating_sub(epoch + epoch_ms);
                    }
                    output.session(&capability).give(epoch);
                }
            }
        })
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
