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
//! The writer stops for good only when it may not write any more (another run took over, see
//! [`WriteStopped`]), or by panicking. Either way the stage then hands it nothing more and keeps
//! holding the capabilities of the epochs it did not store, so no probe passes them and their
//! offsets are never committed; the worker loop learns of it from the [`WriterThread`] and ends
//! the run.
//!
//! Each value goes with how to write it: checked (through the no-regression script) until every
//! worker has said it caught up with the read marks (see [`crate::catch_up`]), plain for epochs
//! after the last of those.
//!
//! The sink's stages and write modes: docs/architecture.md#the-sink and #write-safety.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use differential_dataflow::VecCollection;
use sink::{ProfileRecord, WriteMode};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;

use crate::epoch::{Epoch, EpochTally};
use crate::model::{EncodedProfile, UserInterest};
use crate::stats::StatsBoard;

/// Writes the final values of an epoch somewhere durable.
pub trait EpochWriter: Send + 'static {
    /// Writes `profiles`, the final values of `epoch`, in `mode`, and returns what it stored,
    /// only once they are durable. It must not give up on a failure that may pass: retrying is
    /// its job. It returns an error only when it may never write again.
    fn write_epoch(
        &mut self,
        epoch: Epoch,
        profiles: &[EncodedProfile],
        mode: WriteMode,
    ) -> Result<Written, WriteStopped>;
}

/// Why an [`EpochWriter`] stopped for good: the values it was handed since the last epoch it
/// stored stay unwritten, and that epoch is the last one of the run that counts as written.
#[derive(Debug, thiserror::Error)]
pub enum WriteStopped {
    /// Another run writes the topic's profiles now (see `sink::ReadMarks::take_over`): writing
    /// on could undo its newer values.
    #[error("another dataflow run took over the topic's profiles")]
    TakenOver(#[source] sink::SinkError),
}

/// How a writer thread ended other than by being asked to.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Stopped(#[from] WriteStopped),
    #[error("the writer thread panicked: {0}")]
    Panicked(String),
}

/// What an [`EpochWriter`] stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Values stored.
    pub stored: u64,
    /// Of those, values stored plain.
    pub plain: u64,
    /// Values Redis refused for good, set aside (see `sink::WriteStats::rejected`).
    pub rejected: u64,
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
    /// The run is over: end the thread (values handed before this are stored first).
    Finish,
}

/// A worker's writer thread, for the worker loop to tell whether it stopped and to end it.
#[derive(Debug)]
pub struct WriterThread {
    /// For [`ToWriter::Finish`]; the operator holds the other sender.
    to_writer: mpsc::SyncSender<ToWriter>,
    /// Taken by [`finish`](Self::finish), or else by `drop`.
    thread: Option<JoinHandle<Result<(), WriteStopped>>>,
}

impl WriterThread {
    /// Whether the thread has ended without being asked to: its writer stopped for good, or it
    /// panicked. The epochs it did not store will never be written by this run; see
    /// [`finish`](Self::finish) for why it ended.
    pub fn has_stopped(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Ends the thread once it has stored every value handed to it, waits for it, and tells
    /// why it ended, if it had stopped on its own.
    pub fn finish(mut self) -> Result<(), WriterError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), WriterError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        // Fails only if the thread has ended already, which the join then tells about.
        let _ = self.to_writer.send(ToWriter::Finish);
        match thread.join() {
            Ok(outcome) => Ok(outcome?),
            Err(panic) => Err(WriterError::Panicked(panic_message(&*panic))),
        }
    }
}

impl Drop for WriterThread {
    /// A run that ends on another error still waits for its writes in flight; why the writer
    /// ended, if it ended on its own, can only be logged then.
    fn drop(&mut self) {
        if let Err(error) = self.join() {
            tracing::error!(%error, "the writer thread ended on its own");
        }
    }
}

/// What a panic said, as far as it is text.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "(no message)".to_owned()
    }
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

/// The sink's first stage: encodes the interest collection's new values as their Redis values
/// (semantics §6), at their epoch. Retractions are dropped: Redis holds one value per user, and
/// the epoch that retracts a user's value inserts its new one, which replaces it.
///
/// Encoding runs here, on the worker, rather than on the writer thread: the one writer thread
/// of a worker is its bottleneck already (see docs/performance.md).
pub fn encode_outputs<'scope>(
    interests: VecCollection<'scope, u64, UserInterest, isize>,
) -> Stream<'scope, u64, Vec<EncodedProfile>> {
    interests
        .inner
        .unary(Pipeline, "EncodeOutputs", |_capability, _info| {
            move |input, output| {
                input.for_each(|capability, updates| {
                    let Some(capability) = capability.retain_least(0) else {
                        return;
                    };
                    let mut encoded = Vec::with_capacity(updates.len() / 2 + 1);
                    let mut history: Vec<&str> = Vec::new();
                    for (value, epoch, diff) in updates.iter() {
                        if *diff <= 0 {
                            continue;
                        }
                        history.clear();
                        history.extend(value.history_items.iter());
                        let record = ProfileRecord {
                            user_id: &value.user_id,
                            timestamp: value.timestamp,
                            history_items: &history,
                            interest_vector: &value.interest_vector,
                            known_items: value.known_items,
                            epoch: *epoch,
                        };
                        match EncodedProfile::encode(&record) {
                            Ok(value) => encoded.push(value),
                            // Unreachable in practice: the source refuses timestamps above 2^53
                            // (semantics §2) and epochs are Unix milliseconds. Logged rather
                            // than a panic, like any bad input.
                            Err(error) => {
                                tracing::error!(%error, epoch, user_id = %value.user_id, "profile not written")
                            }
                        }
                    }
                    output.session(&capability).give_container(&mut encoded);
                });
            }
        })
}

/// Writes each complete epoch of `outputs`, the final values of the users that changed in it.
/// The output carries the number of each epoch written, for a probe; the [`WriterThread`] is
/// for the worker loop, to notice the writer stopping and to end it with the run.
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
) -> (Stream<'scope, u64, Vec<u64>>, WriterThread) {
    let worker = outputs.scope().worker();
    let caught_up = caught_up.broadcast();
    let (to_writer, handed) = mpsc::sync_channel::<ToWriter>(MAX_BATCHES_QUEUED);
    let finish = to_writer.clone();
    // Set by the operator's constructor, which timely runs at once, while building.
    let mut spawned = None;
    let spawned_in = &mut spawned;
    let written = outputs.binary_frontier(
        caught_up,
        Pipeline,
        Pipeline,
        "WriteEpochs",
        move |_capability, info| {
            // The writer thread wakes the operator up when it has stored an epoch.
            let activator = worker.sync_activator_for(info.address.to_vec());
            let index = worker.index();
            let (to_operator, stored) = mpsc::channel::<Stored>();
            let mut writer = writer;
            #[allow(clippy::expect_used)]
            let thread = std::thread::Builder::new()
                .name(format!("writer-{index}"))
                .spawn(move || -> Result<(), WriteStopped> {
                    // Values stored per epoch not yet complete, in epoch order.
                    let mut written = EpochTally::default();
                    let mut written_plain = EpochTally::default();
                    let mut rejected = EpochTally::default();
                    for message in handed {
                        match message {
                            ToWriter::Values(epoch, profiles, mode) => {
                                // On an error the thread ends, dropping the rest of what it was
                                // handed: the operator then holds those epochs forever.
                                let count =
                                    writer.write_epoch(Epoch::at(epoch), &profiles, mode)?;
                                // Freed here, so that the cost of an epoch includes freeing its
                                // outputs instead of delaying the next one on the worker.
                                drop(profiles);
                                written.add(epoch, count.stored);
                                written_plain.add(epoch, count.plain);
                                rejected.add(epoch, count.rejected);
                            }
                            ToWriter::Complete(epoch) => {
                                // Epochs complete in order: this one is the oldest left.
                                let report = Stored {
                                    epoch,
                                    written: Written {
                                        stored: written.take_before(epoch + 1),
                                        plain: written_plain.take_before(epoch + 1),
                                        rejected: rejected.take_before(epoch + 1),
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
                            ToWriter::Finish => break,
                        }
                    }
                    Ok(())
                })
                .expect("the OS refused a thread for the Redis writer");
            *spawned_in = Some(thread);
            // Epochs with values handed to the writer, oldest first, with their capability and
            // number of changed users; the first `complete` of them are complete.
            let mut open: VecDeque<(Capability<u64>, u64)> = VecDeque::new();
            let mut complete = 0;
            // Workers heard from on the caught-up stream, and the latest epoch one caught up at.
            let mut workers_caught_up = 0;
            let mut plain_from = 0;
            let mut announced = false;
            // Blocks while MAX_BATCHES_QUEUED batches wait: the writer sets the pace. Fails only
            // once the writer thread has ended (stopped for good, or panicked): what it is handed
            // then is dropped, its epochs are never reported stored, and the worker loop, told by
            // the WriterThread, ends the run.
            let hand = move |message: ToWriter| {
                let _ = to_writer.send(message);
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
                    counters.redis_rejected += report.written.rejected;
                    // A replay epoch is no epoch of the clock: it has no latency.
                    if let (Some(epoch_ms), Some(start_ms)) =
                        (epoch_ms, Epoch::at(report.epoch).start_ms())
                    {
                        counters.latency_ms = report.at_ms.saturating_sub(start_ms + epoch_ms);
                    }
                    output.session(&capability).give(report.epoch);
                }
            }
        },
    );
    let thread = WriterThread {
        to_writer: finish,
        thread: spawned,
    };
    (written, thread)
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic in a test is a test failure

    use std::time::{Duration, Instant};

    use sink::SinkError;
    use timely::dataflow::operators::Probe;
    use timely::dataflow::{InputHandle, ProbeHandle};

    use super::*;

    fn profile(user: &str, epoch: u64) -> EncodedProfile {
        let record = ProfileRecord::<&str> {
            user_id: user,
            timestamp: 1,
            history_items: &[],
            interest_vector: &[0.0],
            known_items: 0,
            epoch,
        };
        EncodedProfile::encode(&record).unwrap()
    }

    /// Stores epoch 1, then at epoch 2 stops for good, or panics.
    struct StopsAtTwo {
        panics: bool,
    }

    impl EpochWriter for StopsAtTwo {
        fn write_epoch(
            &mut self,
            epoch: Epoch,
            profiles: &[EncodedProfile],
            _: WriteMode,
        ) -> Result<Written, WriteStopped> {
            if epoch.time() < 2 {
                return Ok(Written {
                    stored: profiles.len() as u64,
                    ..Written::default()
                });
            }
            assert!(!self.panics, "the writer broke");
            Err(WriteStopped::TakenOver(SinkError::Fenced {
                ours: 1,
                current: 2,
            }))
        }
    }

    /// Feeds a value in epoch 1 and one in epoch 2, and tells how the writer thread ended once
    /// it did, after checking that epoch 2 never counts as written.
    fn run(writer: StopsAtTwo) -> Result<(), WriterError> {
        timely::execute_directly(move |worker| {
            let mut input = InputHandle::new();
            let probe = ProbeHandle::new();
            let dataflow = worker.next_dataflow_index();
            let writer_thread = worker.dataflow::<u64, _, _>(|scope| {
                let caught_up = timely::dataflow::operators::generic::operator::empty(scope);
                let (written, writer_thread) = write_epochs(
                    input.to_stream(scope),
                    caught_up,
                    PlainWrites::Never,
                    None,
                    writer,
                    Rc::default(),
                );
                written.probe_with(&probe);
                writer_thread
            });
            input.advance_to(1);
            input.send(profile("a", 1));
            input.advance_to(2);
            while probe.less_than(&2) {
                worker.step();
            }
            assert!(!writer_thread.has_stopped());
            input.send(profile("b", 2));
            input.advance_to(3);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !writer_thread.has_stopped() {
                assert!(Instant::now() < deadline, "the writer thread did not stop");
                worker.step();
            }
            for _ in 0..100 {
                worker.step();
            }
            assert_eq!(probe.with_frontier(|f| f.to_vec()), vec![2]);
            // As the worker loop does: the dataflow would never end.
            worker.drop_dataflow(dataflow);
            writer_thread.finish()
        })
    }

    #[test]
    fn a_writer_that_stops_for_good_ends_its_thread_and_holds_the_epoch() {
        let outcome = run(StopsAtTwo { panics: false });
        assert!(
            matches!(
                outcome,
                Err(WriterError::Stopped(WriteStopped::TakenOver(
                    SinkError::Fenced { .. }
                )))
            ),
            "{outcome:?}"
        );
    }

    #[test]
    fn a_panic_in_the_writer_thread_is_an_error() {
        let outcome = run(StopsAtTwo { panics: true });
        assert!(
            matches!(&outcome, Err(WriterError::Panicked(message)) if message == "the writer broke"),
            "{outcome:?}"
        );
    }
}
