//! The last stage: the final values of each epoch's changed users are handed to an
//! [`EpochWriter`] (Redis, or a capture in tests) as they come, and the stage holds the epoch's
//! capability until the frontier has passed it and the writer has stored all of them, so a
//! probe after it passes an epoch only once that epoch is durable on every worker — which is
//! when its offsets may be committed.
//!
//! The writer runs on a thread of its own, one per worker: while Redis stores a slice of epoch
//! n, the worker goes on computing the next slice, reading Kafka and computing epoch n+1,
//! instead of waiting for the acknowledgement, and epochs keep closing on time. Values go to the
//! writer in order, at most [`MAX_BATCHES_QUEUED`] batches ahead of it; past that the worker
//! waits, so a slow Redis slows the reading down instead of filling memory.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;

use crate::epoch::EpochTally;
use crate::model::EncodedProfile;
use crate::replay::is_replay_epoch;
use crate::stats::StatsBoard;

/// Writes the final values of an epoch somewhere durable.
pub trait EpochWriter: Send + 'static {
    /// Writes `profiles`, the final values of `epoch`, and returns how many were stored, only
    /// once they are durable. It must not give up: retrying is its job.
    fn write_epoch(&mut self, epoch: u64, profiles: &[EncodedProfile]) -> u64;
}

/// How many batches of values a worker may hand its writer before it waits for one to be
/// stored: timely's batches of ~150 values, so about two slices of the interest operator
/// (`PROFILES_PER_ACTIVATION`), ~3 MB.
pub const MAX_BATCHES_QUEUED: usize = 16;

/// What the operator hands the writer thread.
#[derive(Debug)]
enum ToWriter {
    /// Some final values of an epoch, to store now.
    Values(u64, Vec<EncodedProfile>),
    /// Every value of the epoch was handed over: report it once they are stored.
    Complete(u64),
}

/// What the writer thread reports of each epoch, in the order it was handed them.
#[derive(Debug)]
struct Stored {
    epoch: u64,
    written: u64,
    at_ms: u64,
}

/// Writes each complete epoch of `outputs`, the final values of the users that changed in it.
/// The output carries the number of each epoch written, for a probe.
///
/// Values go to the writer as they arrive, before their epoch is complete: the interest
/// operator emits an epoch in slices, and Redis stores one slice while the worker computes the
/// next. An epoch counts as written (its capability is released) only once the frontier has
/// passed it and the writer has stored every value handed to it before that.
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
        let (to_writer, handed) = mpsc::sync_channel::<ToWriter>(MAX_BATCHES_QUEUED);
        let (to_operator, stored) = mpsc::channel::<Stored>();
        let mut writer = writer;
        #[allow(clippy::expect_used)]
        std::thread::Builder::new()
            .name(format!("writer-{}", worker.index()))
            .spawn(move || {
                // Values stored per epoch not yet complete, in epoch order.
                let mut written = EpochTally::default();
                for message in handed {
                    match message {
                        ToWriter::Values(epoch, profiles) => {
                            let count = writer.write_epoch(epoch, &profiles);
                            // Freed here, so that the cost of an epoch includes freeing its
                            // outputs instead of delaying the next one on the worker.
                            drop(profiles);
                            written.add(epoch, count);
                        }
                        ToWriter::Complete(epoch) => {
                            // Epochs complete in order: this one is the oldest left.
                            let report = Stored {
                                epoch,
                                written: written.take_before(epoch + 1),
                                at_ms: unix_millis(),
                            };
                            // Both fail only once the dataflow is gone, when nothing waits.
                            if to_operator.send(report).is_err() || activator.activate().is_err() {
                                break;
                            }
                        }
                    }
                }
            })
            .expect("the OS refused a thread for the Redis writer");
        // Epochs with values handed to the writer, oldest first, with their capability and
        // number of changed users; the first `complete` of them are complete.
        let mut open: VecDeque<(Capability<u64>, u64)> = VecDeque::new();
        let mut complete = 0;
        // Blocks while MAX_BATCHES_QUEUED batches wait: the writer sets the pace.
        #[allow(clippy::expect_used)]
        let hand = move |message: ToWriter| {
            to_writer
                .send(message)
                .expect("the Redis writer thread stopped (it only stops by panicking)");
        };
        move |(input, frontier), output| {
            input.for_each(|capability, data| {
                // Values are at their batch's time, the epoch that produced them; epochs
                // arrive in order, since the interest operator completes one before the next.
                let Some(&epoch) = capability.least() else {
                    return;
                };
                if open.back().is_none_or(|(held, _)| *held.time() != epoch) {
                    if let Some(capability) = capability.retain_least(0) {
                        open.push_back((capability, 0));
                    }
                }
                if let Some((_, changed)) = open.back_mut() {
                    *changed += data.len() as u64;
                }
                hand(ToWriter::Values(epoch, std::mem::take(data)));
            });
            while let Some((capability, _)) = open.get(complete) {
                if frontier.less_equal(capability.time()) {
                    break;
                }
                hand(ToWriter::Complete(*capability.time()));
                complete += 1;
            }
            for report in stored.try_iter() {
                #[allow(clippy::expect_used)]
                let (capability, changed) = open
                    .pop_front()
                    .expect("the writer reports only epochs it was handed");
                complete -= 1;
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
