//! The last stage: once an epoch is complete, the final values of its changed users are handed
//! to an [`EpochWriter`] (Redis, or a capture in tests). The stage holds the epoch's capability
//! until the writer has stored it, so a probe after it passes an epoch only once that epoch is
//! durable on every worker — which is when its offsets may be committed.
//!
//! The writer runs on a thread of its own, one per worker: while Redis stores epoch n, the
//! worker goes on reading and computing epoch n+1 instead of waiting for the acknowledgement,
//! and epochs keep closing on time. Epochs go to the writer in order, at most
//! [`MAX_EPOCHS_QUEUED`] ahead of it; past that the worker waits, so a slow Redis slows the
//! reading down instead of filling memory.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;

use crate::model::EncodedProfile;
use crate::pending::PendingEpochs;
use crate::replay::is_replay_epoch;
use crate::stats::StatsBoard;

/// Writes the final values of an epoch somewhere durable.
pub trait EpochWriter: Send + 'static {
    /// Writes `profiles`, the final values of `epoch`, and returns how many were stored, only
    /// once they are durable. It must not give up: retrying is its job.
    fn write_epoch(&mut self, epoch: u64, profiles: &[EncodedProfile]) -> u64;
}

/// How many complete epochs a worker may hand its writer before it waits for one to be stored.
pub const MAX_EPOCHS_QUEUED: usize = 4;

/// What the writer thread reports of each epoch, in the order it was handed them.
#[derive(Debug)]
struct Stored {
    epoch: u64,
    written: u64,
    at_ms: u64,
}

/// Writes each complete epoch of `outputs`, the final values of the users that changed in it.
/// The output carries the number of each epoch written, for a probe.
pub fn write_epochs<'scope, W: EpochWriter>(
    outputs: Stream<'scope, u64, Vec<EncodedProfile>>,
    epoch_ms: Option<u64>,
    writer: W,
    stats: Rc<RefCell<StatsBoard>>,
) -> Stream<'scope, u64, Vec<u64>> {
    let worker = outputs.scope().worker();
    outputs.unary_frontier(Pipeline, "WriteEpochs", move |_capability, info| {
        // The writer thread wakes the operator up when it has stored an epoch.
        let activator = worker.sync_activator_for(info.address.to_vec());
        let (to_writer, epochs) =
            mpsc::sync_channel::<(u64, Vec<EncodedProfile>)>(MAX_EPOCHS_QUEUED);
        let (to_operator, stored) = mpsc::channel::<Stored>();
        let mut writer = writer;
        #[allow(clippy::expect_used)]
        std::thread::Builder::new()
            .name(format!("writer-{}", worker.index()))
            .spawn(move || {
                for (epoch, profiles) in epochs {
                    let written = writer.write_epoch(epoch, &profiles);
                    // Freed before the report, so that an epoch's cost includes freeing its
                    // outputs (a few ms for 100,000), instead of delaying the next epoch.
                    drop(profiles);
                    let report = Stored {
                        epoch,
                        written,
                        at_ms: unix_millis(),
                    };
                    // Both fail only once the dataflow is gone, when nothing waits any more.
                    if to_operator.send(report).is_err() || activator.activate().is_err() {
                        break;
                    }
                }
            })
            .expect("the OS refused a thread for the Redis writer");
        let mut pending = PendingEpochs::<EncodedProfile>::default();
        // Epochs handed to the writer and not yet stored, oldest first, with their capability
        // and their number of changed users.
        let mut writing: VecDeque<(Capability<u64>, u64)> = VecDeque::new();
        move |(input, frontier), output| {
            input.for_each(|capability, data| {
                // Outputs are at their batch's time, the epoch that produced them.
                if let Some(capability) = capability.retain_least(0) {
                    pending.at(*capability.time(), || capability).append(data);
                }
            });
            while let Some((capability, profiles)) = pending.take_complete(frontier.frontier()) {
                let epoch = *capability.time();
                let changed = profiles.len() as u64;
                // Blocks while MAX_EPOCHS_QUEUED epochs wait: the writer sets the pace.
                #[allow(clippy::expect_used)]
                to_writer
                    .send((epoch, profiles))
                    .expect("the Redis writer thread stopped (it only stops by panicking)");
                writing.push_back((capability, changed));
            }
            for report in stored.try_iter() {
                #[allow(clippy::expect_used)]
                let (capability, changed) = writing
                    .pop_front()
                    .expect("the writer reports only epochs it was handed");
                debug_assert_eq!(*capability.time(), report.epoch);
                let mut board = stats.borrow_mut();
                let counters = board.epoch(report.epoch);
                counters.changed += changed;
                counters.redis_writes += report.written;
                // A replay epoch is no epoch of the clock: it has no latency.
                if let Some(epoch_ms) = epoch_ms.filter(|_| !is_replay_epoch(report.epoch)) {
                    counters.latency_ms = report.at_ms.saturating_sub(report.epoch + epoch_ms);
                }
                output.session(&capability).give(report.epoch);
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
