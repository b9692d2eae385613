//! The dataflow driven from memory, without a broker or Redis: the same dataflow
//! ([`crate::graph::build`]), fed with prepared epochs on N worker threads. Tests check it
//! against the sequential [`crate::reference`]; the benchmark measures the core with it, through
//! [`run_in_memory_with`], which can also time each epoch and count outputs without keeping them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use crate::epoch::Epoch;
use crate::graph::WriterSetup;
use crate::interest::InterestParams;
use crate::model::{EncodedProfile, FeatureEvent, ProfileEvent, ReadPosition, UserInterest};

use crate::output::{EpochWriter, PlainWrites, WriteStopped, WriterThread, Written};
use sink::WriteMode;

use crate::stats::{EpochCounters, StatsBoard};

/// The input of one epoch.
#[derive(Debug, Clone, Default)]
pub struct EpochInput {
    pub profiles: Vec<ProfileEvent>,
    pub features: Vec<FeatureEvent>,
}

/// What a run produced: per epoch, the final values of the changed users (sorted by user), the
/// interest collection's updates (sorted), and the counters summed over workers.
#[derive(Debug, Default)]
pub struct MemoryRun {
    pub outputs: BTreeMap<u64, Vec<EncodedProfile>>,
    pub interests: BTreeMap<u64, Vec<(UserInterest, isize)>>,
    pub counters: BTreeMap<u64, EpochCounters>,
}

type Shared<T> = Arc<Mutex<T>>;

/// How [`run_in_memory_with`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Keep every output, as [`run_in_memory`] does. Without it outputs are only counted (the
    /// counters' `changed`), so that a run over millions of users does not hold them all.
    pub keep_outputs: bool,
    /// Feed each epoch only once the one before it is written on every worker, and time each:
    /// while epochs overlap, the time of one of them means nothing.
    pub lockstep: bool,
}

impl Default for MemoryOptions {
    /// What [`run_in_memory`] does: keep outputs, epochs overlap.
    fn default() -> Self {
        MemoryOptions {
            keep_outputs: true,
            lockstep: false,
        }
    }
}

/// A run of [`run_in_memory_with`] and its times, all on worker 0's clock.
#[derive(Debug, Default)]
pub struct TimedRun {
    pub run: MemoryRun,
    /// From the initial features being in place on every worker (epoch 0 written) to the last
    /// epoch written on every worker: the time the epochs took, without thread start-up, the
    /// initial features, splitting the input or dropping the state.
    pub elapsed: Duration,
    /// With [`MemoryOptions::lockstep`], each epoch's time from its first event fed to its
    /// outputs written on every worker (0 is the initial features); empty otherwise.
    pub epoch_times: BTreeMap<u64, Duration>,
}

/// Collects the values written, as a stand-in for Redis that keeps everything; or, without a
/// map, only counts them.
struct CaptureWriter(Option<Shared<BTreeMap<u64, Vec<EncodedProfile>>>>);

impl EpochWriter for CaptureWriter {
    fn write_epoch(
        &mut self,
        epoch: Epoch,
        profiles: &[EncodedProfile],
        _: WriteMode,
    ) -> Result<Written, WriteStopped> {
        if let Some(outputs) = &self.0 {
            let mut outputs = outputs
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            outputs
                .entry(epoch.time())
                .or_default()
                .extend_from_slice(profiles);
        }
        Ok(Written {
            stored: profiles.len() as u64,
            ..Written::default()
        })
    }
}

/// Runs the dataflow on `workers` threads. `initial_features` enter at epoch 0 (as the features
/// CSV does); `epochs[i]` is epoch `i + 1`. Each worker feeds the events of the partitions it
/// would own (partition mod workers), as the Kafka source does.
pub fn run_in_memory(
    workers: usize,
    params: InterestParams,
    initial_features: Vec<FeatureEvent>,
    epochs: Vec<EpochInput>,
) -> Result<MemoryRun, String> {
    run_in_memory_with(
        workers,
        params,
        initial_features,
        epochs,
        MemoryOptions::default(),
    )
    .map(|timed| timed.run)
}

/// One worker's part of the input: the events of the partitions it owns.
type Share = (Vec<FeatureEvent>, Vec<EpochInput>);

/// Splits the input by owning worker before the run, so that each worker moves its events into
/// the dataflow instead of cloning them, as a source hands over what it decoded.
fn split_by_owner(
    peers: usize,
    initial_features: Vec<FeatureEvent>,
    epochs: Vec<EpochInput>,
) -> Vec<Share> {
    let owner = |position: &ReadPosition| position.0.unsigned_abs() as usize % peers;
    let mut shares: Vec<Share> = (0..peers)
        .map(|_| (Vec::new(), vec![EpochInput::default(); epochs.len()]))
        .collect();
    for event in initial_features {
        shares[owner(&event.position)].0.push(event);
    }
    for (i, epoch) in epochs.into_iter().enumerate() {
        for event in epoch.profiles {
            shares[owner(&event.position)].1[i].profiles.push(event);
        }
        for event in epoch.features {
            shares[owner(&event.position)].1[i].features.push(event);
        }
    }
    shares
}

/// [`run_in_memory`] with options: outputs kept or only counted, epochs overlapping or fed one
/// at a time and timed.
pub fn run_in_memory_with(
    workers: usize,
    params: InterestParams,
    initial_features: Vec<FeatureEvent>,
    epochs: Vec<EpochInput>,
    options: MemoryOptions,
) -> Result<TimedRun, String> {
    let workers = workers.max(1);
    let outputs: Shared<BTreeMap<u64, Vec<EncodedProfile>>> = Arc::default();
    let interests: Shared<BTreeMap<u64, Vec<(UserInterest, isize)>>> = Arc::default();
    let counters: Shared<BTreeMap<u64, EpochCounters>> = Arc::default();
    let times: Shared<(Duration, BTreeMap<u64, Duration>)> = Arc::default();
    let shares: Arc<Vec<Mutex<Option<Share>>>> = Arc::new(
        split_by_owner(workers, initial_features, epochs)
            .into_iter()
            .map(|share| Mutex::new(Some(share)))
            .collect(),
    );
    let keep = options.keep_outputs.then(|| outputs.clone());
    let keep_interests = options.keep_outputs.then(|| interests.clone());
    let (counters_in, times_in) = (counters.clone(), times.clone());
    // Set by a worker whose writer thread ended early, so that the others stop waiting too.
    let writer_stopped = Arc::new(AtomicBool::new(false));
    let guards = timely::execute(timely::Config::process(workers), move |worker| {
        let index = worker.index();
        let board = Rc::new(RefCell::new(StatsBoard::default()));
        let mut profile_input = InputHandle::new();
        let mut feature_input = InputHandle::new();
        let probe = ProbeHandle::new();
        let dataflow = worker.next_dataflow_index();
        let writer_thread = worker.dataflow::<u64, _, _>(|scope| {
            let writer = CaptureWriter(keep.clone());
            // Nothing to catch up with in memory, and the capture ignores how it would write.
            let caught_up = timely::dataflow::operators::generic::operator::empty(scope);
            let built = crate::graph::build(
                profile_input.to_stream(scope),
                feature_input.to_stream(scope),
                caught_up,
                params,
                crate::graph::Options::default(),
                WriterSetup {
                    writer,
                    plain_writes: PlainWrites::Never,
                    epoch_ms: None,
                },
                board.clone(),
            );
            if let Some(interests) = keep_interests.clone() {
                built.interests.inner.inspect_core(move |event| {
                    if let Ok((_, updates)) = event {
                        let mut interests = interests
                            .lock()
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                        for (value, epoch, diff) in updates {
                            interests
                                .entry(*epoch)
                                .or_default()
                                .push((value.clone(), *diff));
                        }
                    }
                });
            }
            built.written.probe_with(&probe);
            built.writer_thread
        });
        let waiting = Waiting {
            probe: &probe,
            writer_thread: &writer_thread,
            writer_stopped: &writer_stopped,
        };
        // Ends the run of this worker once a writer thread ended early (see wait_for).
        let stopped = |worker: &mut timely::worker::Worker, writer_thread: WriterThread| {
            writer_stopped.store(true, Ordering::Relaxed);
            worker.drop_dataflow(dataflow);
            match writer_thread.finish() {
                Ok(()) => Err("another worker's writer thread ended early".to_owned()),
                Err(error) => Err(format!("worker {index}: {error}")),
            }
        };

        // Each worker's share is taken once: the closure runs once per worker.
        let (initial_features, epochs) = shares[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .unwrap_or_default();
        let epoch_count = epochs.len() as u64;
        let mut epoch_times = BTreeMap::new();
        let features_started = Instant::now();
        for event in initial_features {
            feature_input.send(event);
        }
        // The initial features are in place before the clock starts: they stand for the
        // features file, loaded before any message is read.
        profile_input.advance_to(1);
        feature_input.advance_to(1);
        if !waiting.wait_for(worker, 1) {
            return stopped(worker, writer_thread);
        }
        let started = Instant::now();
        epoch_times.insert(0, started - features_started);
        let mut epoch_started = started;
        for (i, epoch) in epochs.into_iter().enumerate() {
            let time = i as u64 + 1;
            profile_input.advance_to(time);
            feature_input.advance_to(time);
            if options.lockstep && time > 1 {
                // The epoch before must be written everywhere before this one is fed.
                if !waiting.wait_for(worker, time) {
                    return stopped(worker, writer_thread);
                }
                let now = Instant::now();
                epoch_times.insert(time - 1, now - epoch_started);
                epoch_started = now;
            }
            for event in epoch.profiles {
                board.borrow_mut().epoch(time).messages += 1;
                profile_input.send(event);
            }
            for event in epoch.features {
                board.borrow_mut().epoch(time).messages += 1;
                feature_input.send(event);
            }
        }
        let end = epoch_count + 1;
        profile_input.advance_to(end);
        feature_input.advance_to(end);
        if !waiting.wait_for(worker, end) {
            return stopped(worker, writer_thread);
        }
        let finished = Instant::now();
        if epoch_count > 0 {
            epoch_times.insert(epoch_count, finished - epoch_started);
        }

        if index == 0 {
            let mut times = times_in
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            times.0 = finished - started;
            if options.lockstep {
                times.1 = epoch_times;
            }
        }
        let mut totals = counters_in
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (epoch, counts) in board.borrow_mut().drain_before(u64::MAX) {
            totals.entry(epoch).or_default().add(&counts);
        }
        writer_thread
            .finish()
            .map_err(|error| format!("worker {index}: {error}"))
    })?;
    let errors: Vec<String> = guards
        .join()
        .into_iter()
        .filter_map(|result| result.and_then(|result| result).err())
        .collect();
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    let mut outputs = std::mem::take(&mut *outputs.lock().map_err(|e| e.to_string())?);
    for profiles in outputs.values_mut() {
        profiles.sort_by(|a, b| a.user_id().cmp(b.user_id()));
    }
    let mut interests = std::mem::take(&mut *interests.lock().map_err(|e| e.to_string())?);
    for updates in interests.values_mut() {
        updates.sort();
    }
    let counters = std::mem::take(&mut *counters.lock().map_err(|e| e.to_string())?);
    let (elapsed, epoch_times) = std::mem::take(&mut *times.lock().map_err(|e| e.to_string())?);
    Ok(TimedRun {
        run: MemoryRun {
            outputs,
            interests,
            counters,
        },
        elapsed,
        epoch_times,
    })
}

/// What a worker waits on: its probe, unless a writer thread ended early, its own or another
/// worker's, after which the probe would never pass the epochs it left unwritten.
#[derive(Debug, Clone, Copy)]
struct Waiting<'a> {
    probe: &'a ProbeHandle<u64>,
    writer_thread: &'a WriterThread,
    writer_stopped: &'a AtomicBool,
}

impl Waiting<'_> {
    /// Runs the worker until the probe has passed `time`, or returns false once a writer thread
    /// ended early. A worker with nothing to do parks (timely wakes it when another worker or
    /// the writer thread has news) instead of spinning, which on a machine with as many cores
    /// as workers would take the CPU the others need.
    fn wait_for(&self, worker: &mut timely::worker::Worker, time: u64) -> bool {
        while self.probe.less_than(&time) {
            if self.writer_thread.has_stopped() || self.writer_stopped.load(Ordering::Relaxed) {
                return false;
            }
            worker.step_or_park(Some(std::time::Duration::from_millis(1)));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic in a test is a test failure

    use super::*;
    use crate::model::FeatureVector;

    fn profile(user: &str, timestamp: u64, items: &[&str], offset: i64) -> ProfileEvent {
        let message = profile::ProfileMessage {
            user_id: user.to_owned(),
            history_items: items.iter().map(|item| item.to_string()).collect(),
            timestamp,
        };
        ProfileEvent::from_message(message, ((offset % 3) as i32, offset), 50)
    }

    /// A feature change that leaves a holder's vector the same to the bit (a tiny change of an
    /// item whose weight is swamped by another's) writes nothing for that holder.
    #[test]
    fn a_feature_change_that_leaves_a_vector_as_it_was_writes_nothing() {
        let params = InterestParams { dim: 2, decay: 0.9 };
        let feature = |item: &str, values: &[f32], offset: i64| FeatureEvent {
            item_id: item.to_owned(),
            features: FeatureVector::new(values),
            position: (100, offset),
        };
        let features = vec![
            feature("big", &[1e5, 0.0], 0),
            feature("small", &[1.0, 0.0], 1),
        ];
        let tiny = f32::from_bits(1.0f32.to_bits() + 1);
        let epochs = vec![
            EpochInput {
                profiles: vec![
                    profile("a", 1, &["big", "small"], 0),
                    profile("b", 1, &["small"], 1),
                ],
                features: vec![],
            },
            EpochInput {
                profiles: vec![],
                features: vec![feature("small", &[tiny, 0.0], 2)],
            },
        ];
        let run = run_in_memory(1, params, features, epochs).unwrap();
        let users = |epoch: u64| -> Vec<String> {
            run.outputs
                .get(&epoch)
                .into_iter()
                .flatten()
                .map(|value| value.user_id().to_string())
                .collect()
        };
        assert_eq!(users(1), ["a", "b"]);
        // b's vector is small's features: it changed. a's is swamped by big's.
        assert_eq!(users(2), ["b"]);
    }

    #[test]
    fn lockstep_times_every_epoch_and_counting_matches_keeping() {
        let params = InterestParams { dim: 2, decay: 0.9 };
        let features = vec![FeatureEvent {
            item_id: "i1".to_owned(),
            features: FeatureVector::new(&[1.0, 2.0]),
            position: (100, 0),
        }];
        let epochs = vec![
            EpochInput {
                profiles: vec![profile("a", 1, &["i1"], 0), profile("b", 1, &["i2"], 1)],
                features: vec![],
            },
            EpochInput::default(),
            EpochInput {
                profiles: vec![],
                features: vec![FeatureEvent {
                    item_id: "i1".to_owned(),
                    features: FeatureVector::new(&[3.0, 4.0]),
                    position: (100, 1),
                }],
            },
        ];
        let kept = run_in_memory(2, params, features.clone(), epochs.clone()).unwrap();
        let options = MemoryOptions {
            keep_outputs: false,
            lockstep: true,
        };
        let counted = run_in_memory_with(2, params, features, epochs, options).unwrap();
        assert!(counted.run.outputs.is_empty());
        assert_eq!(
            counted.epoch_times.keys().copied().collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        let changed = |run: &MemoryRun| {
            run.counters
                .iter()
                .map(|(&epoch, counts)| (epoch, counts.changed))
                .collect::<Vec<_>>()
        };
        assert_eq!(changed(&counted.run), changed(&kept));
        assert_eq!(kept.outputs.get(&3).map(Vec::len), Some(1));
    }
}
