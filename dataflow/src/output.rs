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
//!
//! Each value goes with how to write it: checked (through the no-regression script) until every
//! worker has said it caught up with the read marks (see [`crate::catch_up`]), plain for epochs
//! after the last of those.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{SystemTime, UNIX_EPOCH};

use sink::WriteMode;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;

use crate::epoch::EpochTally;
use crate::model::EncodedProfile;
use crate::replay::is_replay_epoch;
use crate::stats::StatsBoard;

/// Writes the final values of an epoch somewhere durable.
pub trait EpochWriter: Send + 'static {
    /// Writes `profiles`, the final values of `epoch`, in `mode`, and returns what it stored,
    /// only once they are durable. It must not give up: retrying is its job.
    fn write_epoch(&mut self, epoch: u64, profiles: &[EncodedProfile], mode: WriteMode) -> Written;
}

/// What an [`EpochWriter`] stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Values stored.
    pub stored: u64,
    /// Of those, values stored plain.
    pub plain: u64,
}

/// How many batches of values a worker may hand its writer before it waits for one to be
/// stored: timely's batches of ~150 values, so about two slices of the interest operator
/// (`PROFILES_PER_ACTIVATION`), ~3 MB.
pub const MAX_BATCHES_QUEUED: usize = 16;

/// What the operator hands the writer thread.
#[derive(Debug)]
enum ToWriter {
    /// Some final values of an epoch, to store now, and how.
    Values(u64, Vec<EncodedProfile>, WriteMode),
    /// Every value of the epoch was handed over: report it once they are stored.
    Complete(u64),
}

/// What the writer thread reports of each epoch, in the order it was handed them.
#[derive(Debug)]
struct Stored {
    epoch: u64,
    written: Written,
    at_ms: u64,
}

/// When the values of an epoch may be written plain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlainWrites {
    /// Never: every value goes through the no-regression script.
    Never,
    /// For epochs after the one at which the last of `workers` workers caught up (each sends
    /// its index once on the caught-up stream, at that epoch).
    OnceCaughtUp { workers: usize },
}

/// Writes each complete epoch of `outputs`, the final values of the users that changed in it.
/// The output carries the number of each epoch written, for a probe.
///
/// `caught_up` carries each worker's index once, at the epoch from which its input can hold no
/// value older than one an earlier run wrote; with [`PlainWrites::OnceCaughtUp`] the values of
/// epochs after the last of them are written plain.
///
/// Values go to the writer as they arrive, before their epoch is complete: the interest
/// operator emits an epoch in slices, and Redis stores one slice while the worker computes the
/// next. An epoch counts as written (its capability is released) only once the frontier has
/// passed it and the writer has stored every value handed to it before that.
pub fn write_epochs<'scope, W: EpochWriter>(
    outputs: Stream<'scope, u64, Vec<EncodedProfile>>,
    caught_up: Stream<'scope, u64, Vec<u64>>,
    plain_writes: PlainWrites,
    epoch_ms: Option<u64>,
    writer: W,
    stats: Rc<RefCell<StatsBoard>>,
) -> Stream<'scope, u64, Vec<u64>> {
    let worker = outputs.scope().worker();
    let caught_up = caught_up.broadcast();
    outputs.binary_frontier(
        caught_up,
        Pipeline,
        Pipeline,
        "WriteEpochs",
        move |_capability, info| {
            // The writer thread wakes the operator up when it has stored an epoch.
            let activator = worker.sync_activator_for(info.address.to_vec());
            let index = worker.index();
            let (to_writer, handed) = mpsc::sync_channel::<ToWriter>(MAX_BATCHES_QUEUED);
            let (to_operator, stored) = mpsc::channel::<Stored>();
            let mut writer = writer;
            #[allow(clippy::expect_used)]
            std::thread::Builder::new()
                .name(format!("writer-{index}"))
                .spawn(move || {
                    // Values stored per epoch not yet complete, in epoch order.
                    let mut written = EpochTally::default();
                    let mut written_plain = EpochTally::default();
                    for message in handed {
                        match message {
                            ToWriter::Values(epoch, profiles, mode) => {
                                let count = writer.write_epoch(epoch, &profiles, mode);
                                // Freed here, so that the cost of an epoch includes freeing its
                                // outputs instead of delaying the next one on the worker.
                                drop(profiles);
                                written.add(epoch, count.stored);
                                written_plain.add(epoch, count.plain);
                            }
                            ToWriter::Complete(epoch) => {
                                // Epochs complete in order: this one is the oldest left.
                                let report = Stored {
                                    epoch,
                                    written: Written {
                                        stored: written.take_before(epoch + 1),
                                        plain: written_plain.take_before(epoch + 1),
                                    },
                                    at_ms: unix_millis(),
                                };
                                // Both fail only once the dataflow is gone, when nothing waits.
                                if to_operator.send(report).is_err()
                                    || activator.activate().is_err()
                                {
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
            // Workers heard from on the caught-up stream, and the latest epoch one caught up at.
            let mut workers_caught_up = 0;
            let mut plain_from = 0;
            let mut announced = false;
            // Blocks while MAX_BATCHES_QUEUED batches wait: the writer sets the pace.
            #[allow(clippy::expect_used)]
            let hand = move |message: ToWriter| {
                to_writer
                    .send(message)
                    .expect("the Redis writer thread stopped (it only stops by panicking)");
            };
            move |(input, frontier), (caught_up, _), output| {
                caught_up.for_each(|capability, workers| {
                    workers_caught_up += workers.len();
                    if let Some(&epoch) = capability.least() {
                        plain_from = plain_from.max(epoch);
                    }
                });
                let plain = match plain_writes {
                    PlainWrites::OnceCaughtUp { workers } => workers_caught_up >= workers,
                    PlainWrites::Never => false,
                };
                if plain && !announced {
                    announced = true;
                    tracing::info!(
                        worker = index,
                        after_epoch = plain_from,
                        "every worker caught up with the read marks: writing plain"
                    );
                }
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
                    let mode = if plain && epoch > plain_from {
                        WriteMode::Plain
                    } else {
                        WriteMode::Checked
                    };
                    hand(ToWriter::Values(epoch, std::mem::take(data), mode));
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
                    counters.redis_writes += report.written.stored;
                    counters.plain_writes += report.written.plain;
                    // A replay epoch is no epoch of the clock: it has no latency.
                    if let Some(epoch_ms) = epoch_ms.filter(|_| !is_replay_epoch(report.epoch)) {
                        counters.latency_ms = report.at_ms.saturating_sub(report.epoch + epoch_ms);
                    }
                    output.session(&capability).give(report.epoch);
                }
            }
        },
    )
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
