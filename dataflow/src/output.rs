//! The last stage: once an epoch is complete, the final values of its changed users are handed
//! to an [`EpochWriter`] (Redis, or a capture in tests). The stage holds
//! the epoch's capability until the writer returns, so a probe after it passes an epoch only
//! once that epoch is durable on every worker — which is when its offsets may be committed.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Operator;
use timely::dataflow::Stream;

use crate::model::ProfileOutput;
use crate::pending::PendingEpochs;
use crate::stats::StatsBoard;

/// Writes the final values of an epoch somewhere durable.
pub trait EpochWriter: 'static {
    /// Writes `profiles`, the final values of `epoch`, and returns how many were stored, only
    /// once they are durable. It must not give up: retrying is its job.
    fn write_epoch(&mut self, epoch: u64, profiles: &[ProfileOutput]) -> u64;
}

/// Writes each complete epoch of `outputs`, the final values of the users that changed in it. The output carries
/// the number of each epoch written, for a probe.
pub fn write_epochs<'scope, W: EpochWriter>(
    outputs: Stream<'scope, u64, Vec<ProfileOutput>>,
    epoch_ms: Option<u64>,
    mut writer: W,
    stats: Rc<RefCell<StatsBoard>>,
) -> Stream<'scope, u64, Vec<u64>> {
    outputs.unary_frontier(Pipeline, "WriteEpochs", move |_capability, _info| {
        let mut pending = PendingEpochs::<ProfileOutput>::default();
        move |(input, frontier), output| {
            input.for_each(|capability, data| {
                // Outputs are at their batch's time, the epoch that produced them.
                if let Some(capability) = capability.retain_least(0) {
                    pending.at(*capability.time(), || capability).append(data);
                }
            });
            while let Some((capability, profiles)) = pending.take_complete(frontier.frontier()) {
                let epoch = *capability.time();
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
