//! The worker loop, in one place: read a capped batch from Kafka into the open epoch, advance
//! the inputs when the clock moves to the next epoch, step the dataflow, and commit the offsets
//! of every epoch the probe says is durable in Redis.
//!
//! The write-safety rules, as one state machine: docs/architecture.md#write-safety.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Concat, Inspect, Operator, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use crate::checkpoint::restore::{self, Restore};
use crate::checkpoint::take::Checkpointer;
use crate::config::{CheckedWrites, Config};
use crate::epoch::{Epoch, EpochClock, EpochTally};
use crate::features::{FeaturesError, FeaturesFile};
use crate::graph::WriterSetup;
use crate::interest::InterestParams;
use crate::metrics::{Metrics, MetricsError, MetricsServer, WorkerMetrics, WriterMetrics};
use crate::model::{EncodedProfile, FeatureEvent, ProfileEvent};
use crate::output::{EpochWriter, PlainWrites, WriteStopped, WriterError, WriterThread, Written};
use crate::source::{KafkaSource, Polled, RejectedProfiles, SourceConfig, SourceError};
use crate::stats::{EpochCounters, StatsBoard, StatsOut};
use sink::WriteMode;

/// Why the dataflow stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Features(#[from] FeaturesError),
    /// The features file's rows could not be read after its header was (shared by every
    /// worker of the process).
    #[error(transparent)]
    FeaturesRows(Arc<FeaturesError>),
    #[error("cannot start the thread that loads the item features or the checkpoint: {0}")]
    FeaturesThread(std::io::Error),
    #[error(
        "cannot read the item features file's length and modification time for checkpoints: {0}"
    )]
    CheckpointSettings(std::io::Error),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("Redis: {0}")]
    Sink(#[from] sink::SinkError),
    #[error("timely: {0}")]
    Timely(String),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("worker 0 could not take over the topic's profiles in Redis (see its error)")]
    TakeOver,
    /// A newer run of the same topic took over (see `sink::ReadMarks::take_over`): this run
    /// stopped writing, committed nothing more, and ended. The binary exits with
    /// [`TAKEN_OVER_EXIT_CODE`].
    #[error(
        "another dataflow run took over the topic's profiles in Redis; this run stopped writing"
    )]
    TakenOver(#[source] sink::SinkError),
    #[error("worker {worker}'s Redis writer thread panicked: {message}")]
    WriterPanicked { worker: usize, message: String },
    /// This worker stopped because another worker of the process stopped writing: the
    /// dataflow cannot go on without it.
    #[error("another worker of this process stopped writing (see its error)")]
    PeerStopped,
}

/// The exit code of a dataflow that a newer run of the same topic took over from (see
/// `sink::ReadMarks::take_over`, [`RunError::TakenOver`]).
pub const TAKEN_OVER_EXIT_CODE: i32 = 3;

/// Totals over a run, for the summary at exit.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub totals: EpochCounters,
    pub epochs: u64,
    pub seconds: f64,
}

/// Writes each epoch's profiles to Redis through the sink, retrying until Redis takes them,
/// except the values Redis refuses for good (a key of another type), which go to the
/// dead-letter topic so that the stream moves on.
struct RedisWriter {
    sink: sink::RedisSink,
    rejected: RejectedProfiles,
    /// With `--metrics-addr`: writes, retries and their latency.
    metrics: Option<WriterMetrics>,
}

impl RedisWriter {
    /// Copies the values Redis refused to the dead-letter topic and waits until the broker
    /// holds them: the epoch counts as written, and its offsets commit, only after that.
    fn set_aside(
        &mut self,
        epoch: u64,
        profiles: &[EncodedProfile],
        refused: &[sink::RejectedRecord],
    ) {
        // Rare (a foreign key type), so a lookup table is built only when needed.
        let by_user: HashMap<(sink::KeyKind, &str), &EncodedProfile> = profiles
            .iter()
            .map(|p| ((p.key_kind(), p.user_id()), p))
            .collect();
        for record in refused {
            match by_user.get(&(record.kind, record.user_id.as_str())) {
                Some(profile) => self.rejected.send(profile, &record.error, epoch),
                // The sink reports only users it was handed.
                None => tracing::error!(user_id = %record.user_id, "Redis refused an unknown user"),
            }
        }
        self.rejected.flush();
        // The sink logs each refusal (rate-limited); this says where they went.
        tracing::warn!(
            epoch,
            count = refused.len(),
            dead_letter_failures = self.rejected.failures(),
            dead_letter_replacements = self.rejected.replacements(),
            "values Redis refused for good sent to the dead-letter topic"
        );
    }
}

impl EpochWriter for RedisWriter {
    fn write_epoch(
        &mut self,
        epoch: Epoch,
        profiles: &[EncodedProfile],
        mode: WriteMode,
    ) -> Result<Written, WriteStopped> {
        // Redis holds the values of the replay already.
        if epoch.is_replay() {
            return Ok(Written::default());
        }
        let epoch = epoch.time();
        self.sink.set_mode(mode);
        let started = Instant::now();
        loop {
            match self.sink.write_encoded(profiles) {
                Ok(stats) => {
                    if !stats.rejected.is_empty() {
                        self.set_aside(epoch, profiles, &stats.rejected);
                    }
                    if let Some(metrics) = &mut self.metrics {
                        metrics.wrote(
                            stats.written as u64,
                            started.elapsed(),
                            self.sink.metrics().snapshot(),
                        );
                    }
                    return Ok(Written {
                        stored: stats.written as u64,
                        plain: stats.written_plain as u64,
                        rejected: stats.rejected.len() as u64,
                    });
                }
                // Another run writes this topic's profiles now; writing on could undo its
                // newer values, and nothing this run holds can be committed any more.
                Err(error @ sink::SinkError::Fenced { .. }) => {
                    return Err(WriteStopped::TakenOver(error));
                }
                // The sink retries transient failures itself; anything else is logged and
                // tried again, because an epoch's output is never dropped.
                Err(error) => {
                    tracing::error!(%error, epoch, "writing an epoch to Redis failed; retrying");
                    if let Some(metrics) = &mut self.metrics {
                        metrics.retrying();
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

/// How long a worker shutting down waits for the broker to acknowledge its dead-letter copies
/// before the last commit.
const SHUTDOWN_DEAD_LETTER_WAIT: Duration = Duration::from_secs(10);

/// What a worker sends in the first epoch to build its state: its share of the features
/// file's rows, or of a restored checkpoint's profiles and features.
#[derive(Debug, Default)]
struct Share {
    profiles: Vec<ProfileEvent>,
    features: Vec<FeatureEvent>,
}

/// The initial state, read by a thread of its own while the workers connect and start reading
/// Kafka (they wait in the dataflow: epoch 0 cannot complete without it), then handed to the
/// process's workers a share each and dropped: the arrangements hold it from then on, and a
/// second copy held for the whole run would cost as much memory again as the file
/// (docs/performance.md).
#[derive(Debug)]
struct InitialState {
    dim: usize,
    /// The global index of the process's first worker.
    first_worker: usize,
    /// `None` while the state is read. Then the shares of the process's workers, by local
    /// index, each until its worker takes it, or why the features file's rows could not be
    /// read.
    loaded: Mutex<Option<LoadedShares>>,
}

impl InitialState {
    fn new(dim: usize, first_worker: usize) -> Self {
        InitialState {
            dim,
            first_worker,
            loaded: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<LoadedShares>> {
        self.loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps the shares of the process's workers.
    fn fill(&self, shares: LoadedShares) {
        *self.lock() = Some(shares);
    }

    /// The share of the worker with global index `index`, once (it is moved out), or `None`
    /// while the state is still being read.
    fn take_share(&self, index: usize) -> Option<Result<Share, RunError>> {
        match &mut *self.lock() {
            None => None,
            Some(Ok(shares)) => Some(Ok(index
                .checked_sub(self.first_worker)
                .and_then(|local| shares.get_mut(local))
                .map(std::mem::take)
                .unwrap_or_default())),
            Some(Err(error)) => Some(Err(RunError::FeaturesRows(error.clone()))),
        }
    }
}

/// What the loading thread leaves: the local workers' shares, or why the features file's rows
/// could not be read.
type LoadedShares = Result<Vec<Share>, Arc<FeaturesError>>;

/// Reads the rows of `file` on a thread of its own into `initial`, one share per worker of the
/// computation as timely numbers them (process p's are p * workers .. (p + 1) * workers): row
/// `i` of the file goes to worker `i` mod the number of workers, over all processes.
fn load_features_in_background(
    file: FeaturesFile,
    config: &Config,
    initial: Arc<InitialState>,
) -> Result<std::thread::JoinHandle<()>, RunError> {
    let workers = config.workers as usize;
    let shares = workers * config.processes as usize;
    let path = config.item_features.display().to_string();
    let started = Instant::now();
    std::thread::Builder::new()
        .name("features".to_owned())
        .spawn(move || {
            let loaded = file.load_in_shares(shares);
            if let Ok(loaded) = &loaded {
                tracing::info!(
                    path,
                    items = loaded.len(),
                    dim = loaded.dim,
                    bad_rows = loaded.bad_rows,
                    seconds = started.elapsed().as_secs_f64(),
                    "loaded item features"
                );
            }
            let local = loaded
                .map(|loaded| {
                    loaded
                        .shares
                        .into_iter()
                        .skip(initial.first_worker)
                        .take(workers)
                        .map(|features| Share {
                            profiles: Vec::new(),
                            features,
                        })
                        .collect()
                })
                .map_err(Arc::new);
            initial.fill(local);
        })
        .map_err(RunError::FeaturesThread)
}

/// Turns the restored checkpoint into the process's workers' shares on a thread of its own
/// (see [`crate::checkpoint::restore`]); the features file is not read: the checkpoint holds
/// every item's features.
fn load_checkpoint_in_background(
    mut restore: Restore,
    config: &Config,
    initial: Arc<InitialState>,
) -> Result<std::thread::JoinHandle<()>, RunError> {
    let workers = config.workers as usize;
    let peers = workers * config.processes as usize;
    let started = Instant::now();
    std::thread::Builder::new()
        .name("checkpoint".to_owned())
        .spawn(move || {
            let shares: Vec<Share> = (initial.first_worker..initial.first_worker + workers)
                .map(|index| {
                    let (profiles, features) = restore.take_events(index, peers);
                    Share { profiles, features }
                })
                .collect();
            tracing::info!(
                time = restore.time,
                written_by_workers = restore.peers,
                profiles = shares.iter().map(|s| s.profiles.len()).sum::<usize>(),
                items = shares.iter().map(|s| s.features.len()).sum::<usize>(),
                seconds = started.elapsed().as_secs_f64(),
                "loaded the checkpoint (this process's share)"
            );
            initial.fill(Ok(shares));
        })
        .map_err(RunError::FeaturesThread)
}

/// What a restored checkpoint tells every worker.
#[derive(Debug, Clone)]
struct Restored {
    /// The checkpoint's time: the run's checkpoints come after it.
    time: u64,
    /// Where its state ends in each partition.
    offsets: Arc<BTreeMap<crate::epoch::SourcePartition, i64>>,
}

/// Runs the dataflow until Ctrl-C or SIGTERM, then finishes the open epoch, writes and commits
/// it, and returns the totals (complete on the process that hosts worker 0).
pub fn run(config: Config, shutdown: Arc<AtomicBool>) -> Result<Summary, RunError> {
    let started = Instant::now();
    // First, so that a port in use fails the run at once, and scrapes work during the load.
    // The server stops when this returns.
    let metrics = config.metrics_addr.map(|_| Arc::new(Metrics::new()));
    let _server = match (config.metrics_addr, &metrics) {
        (Some(addr), Some(metrics)) => Some(MetricsServer::start(addr, metrics.clone())?),
        _ => None,
    };
    // The header now, so that a bad file is refused before anything is written; the rows
    // meanwhile, unless a checkpoint holds the features.
    let features_file = FeaturesFile::open(&config.item_features)?;
    let checkpoints = config
        .checkpoint_settings(features_file.dim())
        .map_err(RunError::CheckpointSettings)?;
    let restore = checkpoints
        .as_ref()
        .and_then(|settings| restore::find(&settings.dir, &settings.compatibility));
    let initial = Arc::new(InitialState::new(
        features_file.dim(),
        config.process as usize * config.workers as usize,
    ));
    let (loader, restored) = match restore {
        Some(mut restore) => {
            tracing::info!(
                time = restore.time,
                partitions = restore.offsets.len(),
                "restoring the newest checkpoint: replaying only the messages after it"
            );
            // The loader needs only the state.
            let restored = Restored {
                time: restore.time,
                offsets: Arc::new(std::mem::take(&mut restore.offsets)),
            };
            (
                load_checkpoint_in_background(restore, &config, initial.clone())?,
                Some(restored),
            )
        }
        None => (
            load_features_in_background(features_file, &config, initial.clone())?,
            None,
        ),
    };
    let start = Start {
        initial,
        checkpoints,
        restored,
    };
    let result = run_computation(config, shutdown, start, metrics, started);
    // The loader's lines (rows skipped, rows loaded) belong to the start of the run, even of a
    // run that failed before it needed them: it is waited for, not cut off at exit. (By the
    // end of a run that got going it is done: every worker waited for its share.)
    let _ = loader.join();
    result
}

/// How the workers start: the initial state being read, the checkpoints' settings, and the
/// checkpoint restored, if any.
#[derive(Debug)]
struct Start {
    initial: Arc<InitialState>,
    checkpoints: Option<crate::checkpoint::take::Settings>,
    restored: Option<Restored>,
}

/// The rest of [`run`], once the initial state is being read: the checks that precede any
/// write, then the timely computation.
fn run_computation(
    config: Config,
    shutdown: Arc<AtomicBool>,
    start: Start,
    metrics: Option<Arc<Metrics>>,
    started: Instant,
) -> Result<Summary, RunError> {
    // Before any worker takes over Redis (which ends an older run's writers): a run that cannot
    // reach Redis with these credentials, or cannot read its topic, must change nothing.
    // Connecting reads and writes nothing; Redis first, as it answers at once either way.
    drop(sink::ReadMarks::connect_for(
        &read_marks_config(&config),
        &config.shared.topic,
    )?);
    crate::source::check_profile_topic(
        &config.shared.brokers,
        config.shared.kafka(),
        &config.shared.topic,
    )?;
    let timely_config = config
        .timely()
        .map_err(|e| RunError::Timely(e.to_string()))?;
    let summary = Arc::new(Mutex::new(Summary::default()));
    let shared = Arc::new((config, start));
    let summary_in = summary.clone();
    // Set by the first worker whose writer stops, so that the process's other workers stop too.
    let writer_stopped = Arc::new(AtomicBool::new(false));
    let guards = timely::execute(timely_config, move |worker| {
        let (config, start) = &*shared;
        let stop = Stop {
            shutdown: &shutdown,
            writer_stopped: &writer_stopped,
        };
        worker_loop(worker, config, start, stop, &summary_in, metrics.as_ref())
    })
    .map_err(RunError::Timely)?;
    let mut failure: Option<RunError> = None;
    for result in guards.join() {
        if let Err(error) = result.map_err(RunError::Timely).and_then(|result| result) {
            // A worker that stopped because another one did says less than that one's error.
            if failure
                .as_ref()
                .is_none_or(|failure| matches!(failure, RunError::PeerStopped))
            {
                failure = Some(error);
            }
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    let mut summary = summary
        .lock()
        .map_err(|e| RunError::Timely(e.to_string()))?
        .clone();
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// What ends a worker's loop, shared by the workers of the process.
#[derive(Debug, Clone, Copy)]
struct Stop<'a> {
    /// Ctrl-C or SIGTERM: finish the open epoch, then end.
    shutdown: &'a AtomicBool,
    /// A worker's writer stopped for good: end at once, writing and committing nothing more.
    writer_stopped: &'a AtomicBool,
}

fn worker_loop(
    worker: &mut timely::worker::Worker,
    config: &Config,
    start: &Start,
    stop: Stop<'_>,
    summary: &Arc<Mutex<Summary>>,
    metrics: Option<&Arc<Metrics>>,
) -> Result<(), RunError> {
    let (index, peers) = (worker.index(), worker.peers());
    // Before any worker reads the read marks or opens its sink: older runs must stop writing.
    let take_over = agree_on_take_over(worker, config)?;
    let initial = &start.initial;
    let params = InterestParams {
        dim: initial.dim,
        decay: config.decay,
    };
    let source_config = SourceConfig {
        brokers: config.shared.brokers.clone(),
        group: config.group.clone(),
        profile_topic: config.shared.topic.clone(),
        item_topic: config.item_topic.clone(),
        dlq_topic: config.dlq_topic.clone(),
        encoding: config.shared.encoding,
        max_history: config.shared.max_history,
        dim: initial.dim,
        read_marks: read_marks_config(config),
        kafka: config.shared.kafka().clone(),
    };
    let rejected = RejectedProfiles::new(&source_config).map_err(SourceError::from)?;
    let restored_offsets = start.restored.as_ref().map(|restored| &*restored.offsets);
    let mut source = KafkaSource::new(source_config, index, peers, restored_offsets)?;
    let mut worker_metrics = metrics.map(|metrics| {
        WorkerMetrics::new(metrics.clone(), source.topics().clone(), source.assigned())
    });
    let mut sink_config = config.sink_config();
    sink_config.fence = Some(sink::WriterFence {
        topic: config.shared.topic.clone(),
        generation: take_over.generation,
    });
    let writer = RedisWriter {
        sink: sink::RedisSink::connect(sink_config)?,
        rejected,
        metrics: metrics.map(|metrics| metrics.writer()),
    };

    // Build inputs, arrange, join, reduce, probe.
    let board = Rc::new(RefCell::new(StatsBoard::default()));
    let mut profile_input = InputHandle::new();
    let mut feature_input = InputHandle::new();
    // The initial state, at epoch 0 only: the features file's rows, or a restored checkpoint's
    // features and profiles. Held open until this worker's share is read, so that no epoch
    // completes without it, while the worker reads Kafka meanwhile.
    let mut file_input = InputHandle::new();
    let mut restored_input = InputHandle::new();
    // Each worker's last epoch, once, at shutdown: the final checkpoint's time is the greatest.
    let mut closing_input = InputHandle::new();
    let last_epoch = Rc::new(std::cell::Cell::new(0u64));
    let mut stats_input = InputHandle::new();
    // Each worker's index, once, at the epoch it caught up with the read marks.
    let mut caught_up_input = InputHandle::new();
    let plain_writes = match config.checked_writes {
        CheckedWrites::UntilCaughtUp if take_over.exclusive => {
            PlainWrites::OnceCaughtUp { workers: peers }
        }
        CheckedWrites::Always | CheckedWrites::UntilCaughtUp => PlainWrites::Never,
    };
    let probe = ProbeHandle::new();
    let mut clock = EpochClock::new(config.epoch_ms);
    let dataflow = worker.next_dataflow_index();
    let (writer_thread, state) = worker.dataflow::<u64, _, _>(|scope| {
        let built = crate::graph::build(
            profile_input
                .to_stream(scope)
                .concat(restored_input.to_stream(scope)),
            feature_input
                .to_stream(scope)
                .concat(file_input.to_stream(scope)),
            caught_up_input.to_stream(scope),
            params,
            crate::graph::Options {
                recommend: config.recommend_setup(),
                keep_state: start.checkpoints.is_some(),
            },
            WriterSetup {
                writer,
                plain_writes,
                epoch_ms: Some(config.epoch_ms),
            },
            board.clone(),
        );
        built.written.probe_with(&probe);
        report_epochs(
            stats_input.to_stream(scope),
            config,
            summary.clone(),
            metrics.cloned(),
        );
        let last = last_epoch.clone();
        closing_input
            .to_stream(scope)
            .broadcast()
            .inspect(move |&time: &u64| last.set(last.get().max(time)));
        (built.writer_thread, built.state)
    });
    let mut checkpointer = start
        .checkpoints
        .clone()
        .zip(state)
        .map(|(settings, state)| {
            let now_ms = clock.now().time();
            let after = start
                .restored
                .as_ref()
                .map_or(now_ms, |restored| restored.time.max(now_ms));
            let metrics = metrics.map(|metrics| metrics.checkpoints());
            Checkpointer::new(settings, index, peers, state, after, metrics)
        });
    // Whether this worker's writer, or another worker's, stopped for good.
    let writing_stopped = |writer_thread: &WriterThread| {
        writer_thread.has_stopped() || stop.writer_stopped.load(Ordering::Relaxed)
    };

    // The inputs start at replay epoch 0: the initial state and the replay of every partition
    // up to its committed offset (see crate::replay), before any live epoch.
    let mut epoch = Epoch::START;
    let mut tick = clock.now();
    // The stats input is deliberately not advanced with the data inputs: another worker may
    // have started in an earlier epoch and send this worker data of it, whose counters must
    // still travel at that epoch's time. It advances only past epochs the probe has seen
    // complete (see finish_epochs).

    // The initial state enters in epoch 0, each worker sending its share once it is read, then
    // closing the inputs.
    let mut initial_inputs = Some((file_input, restored_input));

    let started = Instant::now();
    // The messages read into epochs not yet stored: reading is far cheaper than computing and
    // storing, so without a bound a backlog in Kafka (a restart, a burst) would be read into
    // memory at once (docs/performance.md, "figures from code comments").
    let mut in_flight = EpochTally::default();
    let mut replayed = 0;
    let mut reported = epoch;
    let mut told_caught_up = false;
    loop {
        if let Err(error) = hand_over_initial_state(&mut initial_inputs, initial, index) {
            return Err(stop_unread_features(worker, dataflow, writer_thread, error));
        }
        // At the epoch of the read that caught up, or at epoch 0 with nothing to catch up, so
        // that the first live epoch may go plain.
        if !told_caught_up && source.is_caught_up() {
            told_caught_up = true;
            caught_up_input.send(index as u64);
            tracing::info!(
                worker = index,
                epoch = epoch.time(),
                "caught up with the read marks"
            );
        }
        let stopping = stop.shutdown.load(Ordering::Relaxed);
        let now = clock.now();
        // The first live epoch starts as soon as the replay is done, so that nothing read live
        // is taken for a replayed message.
        let replay_over = epoch.is_replay() && !source.is_replaying();
        if now > tick || stopping || replay_over {
            tick = now;
            epoch = if stopping || source.is_replaying() {
                // On shutdown the open epoch is closed at once; a replay epoch lasts one epoch
                // of the clock, and the next one follows it.
                clock.next(epoch)
            } else {
                now
            };
            profile_input.advance_to(epoch.time());
            feature_input.advance_to(epoch.time());
            caught_up_input.advance_to(epoch.time());
            // Also on the clock, not only when an epoch completes: while none does (Redis
            // down, a long epoch), the lag and the messages read are what an operator needs.
            if let Some(metrics) = &mut worker_metrics {
                record_metrics(metrics, &mut source, &mut board.borrow_mut());
            }
        }
        if stopping {
            break;
        }
        let was_replaying = source.is_replaying();
        // A worker done with its replay reads live at once, even while the replay epochs (the
        // features file's among them) are still being computed here or on other workers: its
        // live epochs complete only after every replay epoch has, everywhere, since timely
        // completes epochs in order, and what it reads meanwhile waits in the dataflow,
        // bounded by --max-in-flight. Waiting for the replay to complete first cost the whole
        // of epoch 0 before the first read (docs/performance.md, 2026-12-06, start-up).
        let room = config.max_in_flight.saturating_sub(in_flight.total());
        let polled = if room == 0 {
            Polled::default()
        } else {
            source.poll(epoch.time(), config.max_poll_records.min(room))
        };
        in_flight.add(epoch.time(), polled.messages + polled.replayed);
        let idle = polled.messages == 0 && polled.replayed == 0;
        replayed += polled.replayed;
        if was_replaying && !source.is_replaying() {
            tracing::info!(
                worker = index,
                messages = replayed,
                seconds = started.elapsed().as_secs_f64(),
                "state rebuilt: replayed up to the committed offsets"
            );
        }
        {
            let mut board = board.borrow_mut();
            let counters = board.epoch(epoch.time());
            counters.messages += polled.messages;
            counters.invalid += polled.invalid;
        }
        for event in polled.profiles {
            profile_input.send(event);
        }
        for event in polled.features {
            feature_input.send(event);
        }

        // Busy: step and poll again at once. Idle: let the worker sleep a little, never long
        // enough to delay the next epoch's close. (`None` would mean "until woken", which only
        // timely's own channels do, not Kafka.)
        let park = if idle {
            Duration::from_millis(1)
        } else {
            Duration::ZERO
        };
        worker.step_or_park(Some(park));
        if writing_stopped(&writer_thread) {
            return Err(stop_writing(worker, dataflow, writer_thread, stop, index));
        }
        let done = probe.with_frontier(|f| f.first().copied().unwrap_or(u64::MAX));
        if done > reported.time() {
            // Before the commit, which forgets the offsets of the epochs it passes.
            if let Some(checkpointer) = &mut checkpointer {
                let durable = source
                    .uncommittable_from()
                    .map_or(done, |waiting| waiting.min(done));
                checkpointer.on_durable(durable, |time| source.positions_before(time));
            }
            finish_epochs(done, &mut source, &board, &mut stats_input);
            if let Some(metrics) = &mut worker_metrics {
                record_metrics(metrics, &mut source, &mut board.borrow_mut());
            }
            in_flight.take_before(done);
            if reported.is_replay() && !Epoch::at(done).is_replay() {
                // Until now no live epoch could complete: this is when the start (the features
                // file, the replay) stops holding the stream back.
                tracing::info!(
                    worker = index,
                    seconds = started.elapsed().as_secs_f64(),
                    "the start's epochs are complete on every worker: live epochs may complete"
                );
            }
            reported = Epoch::at(done);
        }
    }

    tracing::info!(
        worker = index,
        epoch = epoch.time(),
        "shutting down: finishing the open epoch"
    );
    // Every worker tells the others its last epoch, so that all name the final checkpoint
    // alike; they have all heard by the time the dataflow ends. (Not waited for here: a worker
    // whose last epoch is later waits for the others' inputs to pass it, which they do only
    // as they close.)
    closing_input.send(epoch.time());
    drop(closing_input);
    // The open epoch cannot complete without the initial state.
    while initial_inputs.is_some() {
        if let Err(error) = hand_over_initial_state(&mut initial_inputs, initial, index) {
            return Err(stop_unread_features(worker, dataflow, writer_thread, error));
        }
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
    worker.step_while(|| probe.less_than(&epoch.time()) && !writing_stopped(&writer_thread));
    if writing_stopped(&writer_thread) {
        return Err(stop_writing(worker, dataflow, writer_thread, stop, index));
    }
    // The last commit covers the epochs whose dead-letter copies the broker acknowledges by
    // then; the others' messages are read (and copied) again by the next run.
    if !source.settle_dead_letters(SHUTDOWN_DEAD_LETTER_WAIT) {
        tracing::error!(
            worker = index,
            copies = source.dead_letters_unacknowledged(),
            waited_seconds = SHUTDOWN_DEAD_LETTER_WAIT.as_secs(),
            "dead-letter copies not acknowledged at shutdown: their epochs' offsets are not \
             committed, so the next run reads and copies those messages again"
        );
    }
    finish_epochs(epoch.time(), &mut source, &board, &mut stats_input);
    if let Some(metrics) = &mut worker_metrics {
        record_metrics(metrics, &mut source, &mut board.borrow_mut());
    }
    // Closing the inputs lets the dataflow run to its end: the last stats, and the values of
    // later epochs of workers whose clock closed theirs later, which may come to this worker's
    // writer. Only then is the writer thread done.
    drop((profile_input, feature_input, caught_up_input, stats_input));
    while worker.installed_dataflows().contains(&dataflow) {
        if writing_stopped(&writer_thread) {
            return Err(stop_writing(worker, dataflow, writer_thread, stop, index));
        }
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
    // Everything handed to it is stored: the thread ends at once.
    writer_thread
        .finish()
        .map_err(|error| writer_error(index, error))?;
    if let Some(checkpointer) = checkpointer {
        if source.dead_letters_unacknowledged() > 0 {
            tracing::warn!(
                worker = index,
                "no checkpoint at shutdown: dead-letter copies are unacknowledged, so the next \
                 run must read their messages again"
            );
        } else {
            // The dataflow has ended: the state holds every epoch of every worker, and the
            // offsets every message this worker read.
            checkpointer.finish(last_epoch.get(), source.positions_before(u64::MAX));
        }
    }
    Ok(())
}

/// The input of the features file's rows, at epoch 0.
type FileInput = InputHandle<u64, timely::container::CapacityContainerBuilder<Vec<FeatureEvent>>>;
/// The input of a restored checkpoint's profiles, at epoch 0.
type RestoredInput =
    InputHandle<u64, timely::container::CapacityContainerBuilder<Vec<ProfileEvent>>>;

/// Sends this worker's share of the initial state and closes the `inputs` once it is read;
/// until then leaves them open. Never waits.
fn hand_over_initial_state(
    inputs: &mut Option<(FileInput, RestoredInput)>,
    initial: &InitialState,
    index: usize,
) -> Result<(), RunError> {
    let Some((features, profiles)) = inputs else {
        return Ok(());
    };
    match initial.take_share(index) {
        None => Ok(()),
        Some(Ok(share)) => {
            for event in share.features {
                features.send(event);
            }
            for event in share.profiles {
                profiles.send(event);
            }
            // Dropped, the handles close the inputs: epoch 0 may complete.
            *inputs = None;
            Ok(())
        }
        Some(Err(error)) => Err(error),
    }
}

/// Ends the run of a worker when the features file's rows could not be read. As when a writer
/// stops (see [`stop_writing`]), the dataflow is dropped: no epoch has completed without the
/// file, so nothing was written or committed.
fn stop_unread_features(
    worker: &mut timely::worker::Worker,
    dataflow: usize,
    writer_thread: WriterThread,
    error: RunError,
) -> RunError {
    worker.drop_dataflow(dataflow);
    // Nothing was handed to it (epoch 0 never completed): it ends at once.
    let _ = writer_thread.finish();
    error
}

/// Ends the run of a worker whose writer stopped for good (see [`WriterThread::has_stopped`]),
/// or another worker's did, and tells why.
///
/// The dataflow is dropped, not run to its end: its write stage holds the capabilities of the
/// epochs not stored, and releasing them would let a probe, this worker's or another's, pass
/// epochs whose values are not in Redis, and their offsets be committed.
fn stop_writing(
    worker: &mut timely::worker::Worker,
    dataflow: usize,
    writer_thread: WriterThread,
    stop: Stop<'_>,
    index: usize,
) -> RunError {
    // The other workers of the process stop too: none can complete an epoch without this one.
    stop.writer_stopped.store(true, Ordering::Relaxed);
    worker.drop_dataflow(dataflow);
    // Waits for a write in flight (another worker's take-over may have stopped this one's
    // writer mid-write, which then fails at once).
    match writer_thread.finish() {
        Ok(()) => RunError::PeerStopped,
        Err(error) => writer_error(index, error),
    }
}

/// The run's error for a writer thread that ended on its own.
fn writer_error(index: usize, error: WriterError) -> RunError {
    match error {
        WriterError::Stopped(WriteStopped::TakenOver(error)) => {
            tracing::error!(
                worker = index,
                %error,
                "stopping: another dataflow run took over"
            );
            RunError::TakenOver(error)
        }
        WriterError::Panicked(message) => RunError::WriterPanicked {
            worker: index,
            message,
        },
    }
}

/// Worker 0 takes over the topic's profiles in Redis for this run (see
/// `sink::ReadMarks::take_over`: older runs' writers are ended) and tells every worker the
/// outcome; every worker waits for it.
fn agree_on_take_over(
    worker: &mut timely::worker::Worker,
    config: &Config,
) -> Result<sink::TakeOver, RunError> {
    let taken = (worker.index() == 0).then(|| {
        sink::ReadMarks::connect_for(&read_marks_config(config), &config.shared.topic)
            .and_then(|mut marks| marks.take_over())
    });
    if let Some(Ok(taken)) = &taken {
        tracing::info!(
            generation = taken.generation,
            older_writers_ended = taken.ended,
            exclusive = taken.exclusive,
            "took over the topic's profiles in Redis"
        );
        if !taken.exclusive {
            tracing::warn!(
                "Redis refused CLIENT LIST or CLIENT KILL, so older runs' writers may live on: \
                 every write goes through the no-regression script"
            );
        }
    }
    // (generation, exclusive, ended, ok), from worker 0 to all.
    type Outcome = (u64, bool, u64, bool);
    let mut input = InputHandle::new();
    let probe = ProbeHandle::new();
    let heard: Rc<RefCell<Option<Outcome>>> = Rc::default();
    let heard_in = heard.clone();
    worker.dataflow::<u64, _, _>(|scope| {
        input
            .to_stream(scope)
            .broadcast()
            .inspect(move |outcome: &Outcome| *heard_in.borrow_mut() = Some(*outcome))
            .probe_with(&probe);
    });
    match &taken {
        Some(Ok(taken)) => {
            input.send((taken.generation, taken.exclusive, taken.ended as u64, true))
        }
        Some(Err(_)) => input.send((0, false, 0, false)),
        None => {}
    }
    input.close();
    worker.step_while(|| !probe.done());
    if let Some(Err(error)) = taken {
        return Err(RunError::Sink(error));
    }
    let outcome = *heard.borrow();
    match outcome {
        Some((generation, exclusive, ended, true)) => Ok(sink::TakeOver {
            generation,
            exclusive,
            ended: ended as usize,
        }),
        _ => Err(RunError::TakeOver),
    }
}

/// Every epoch before `done` is durable in Redis on every worker: commit its offsets and send
/// this worker's counters of it to the reporter.
fn finish_epochs(
    done: u64,
    source: &mut KafkaSource,
    board: &RefCell<StatsBoard>,
    stats_input: &mut InputHandle<
        u64,
        timely::container::CapacityContainerBuilder<Vec<(u64, EpochCounters)>>,
    >,
) {
    source.commit_before(done);
    for (epoch, counters) in board.borrow_mut().drain_before(done) {
        // Counters of an epoch travel at that epoch's time, so the reporter knows when it has
        // heard from every worker.
        if epoch >= *stats_input.time() {
            stats_input.advance_to(epoch);
        }
        stats_input.send((epoch, counters));
    }
    if done > *stats_input.time() {
        stats_input.advance_to(done);
    }
}

/// Adds what this worker counted since the last call to the metrics: messages read, invalid and
/// stale by partition, its partitions' lag, and its tables' sizes. Called once per epoch of the
/// clock and once per completed epoch, between steps, so that no operator holds the tables.
fn record_metrics(metrics: &mut WorkerMetrics, source: &mut KafkaSource, board: &mut StatsBoard) {
    source.take_read_counts(|partition, counts| metrics.add_counts(partition, counts));
    board
        .stale
        .drain(|partition, counts| metrics.add_counts(partition, counts));
    source.lags(|partition, lag| metrics.set_lag(partition, lag));
    metrics.set_source_health(
        source.worker(),
        source.broker_silence(),
        source.dead_letters_unacknowledged(),
    );
    if let Some((users, items)) = board.held() {
        metrics.set_held(users, items);
    }
}

/// Sums every worker's counters on worker 0 and prints one line per non-idle epoch once all
/// workers have reported it; with `metrics`, counts each epoch and its latency there too.
fn report_epochs<'scope>(
    stats: timely::dataflow::Stream<'scope, u64, Vec<(u64, EpochCounters)>>,
    config: &Config,
    summary: Arc<Mutex<Summary>>,
    metrics: Option<Arc<Metrics>>,
) {
    let json = config.stats_json;
    let epoch_ms = config.epoch_ms;
    stats.sink(
        Exchange::new(|_: &(u64, EpochCounters)| 0),
        "ReportEpochs",
        {
            let mut pending: BTreeMap<u64, EpochCounters> = BTreeMap::new();
            let mut out = StatsOut::new(std::io::stdout());
            move |(input, frontier)| {
                input.for_each(|_, data| {
                    for (epoch, counters) in data.drain(..) {
                        pending.entry(epoch).or_default().add(&counters);
                    }
                });
                while let Some(entry) = pending.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (epoch, counters) = entry.remove_entry();
                    // The replay's epochs rebuild the state and write nothing: no stats lines.
                    if Epoch::at(epoch).is_replay() {
                        continue;
                    }
                    if let Ok(mut summary) = summary.lock() {
                        let latency = summary.totals.latency_ms.max(counters.latency_ms);
                        summary.totals.add(&counters);
                        summary.totals.latency_ms = latency;
                        summary.epochs += 1;
                    }
                    if let Some(metrics) = &metrics {
                        metrics.epoch_done(&counters);
                    }
                    if !counters.is_idle() {
                        out.line(&crate::stats::format_epoch(
                            epoch, &counters, epoch_ms, json,
                        ));
                    }
                }
            }
        },
    );
}

/// The sink's settings for the read marks: a longer I/O timeout than the writes', as they are
/// read once at start, when Redis may still be warming up.
fn read_marks_config(config: &Config) -> sink::SinkConfig {
    sink::SinkConfig {
        io_timeout: Duration::from_secs(10),
        ..config.sink_config()
    }
}
