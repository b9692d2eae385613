//! Taking a worker's checkpoint: its state read from the arrangements as of a durable time, in
//! the background.
//!
//! The profile and features arrangements hold the state. The checkpointer keeps a handle to
//! each trace whose logical compaction it holds at the next checkpoint's time minus one, so that
//! the state as of that time stays readable after the dataflow has moved past it (the handle
//! holds back nothing else: updates before that time still merge as they would). Profiles name
//! their items by the worker's item table, whose entries are reused once released; the item
//! table is held the same way ([`ItemTable::hold_from`]), so the ids read are the ones the
//! profiles meant at that time.
//!
//! Reading the traces into columns is the only part on the worker's thread (a walk over its
//! profiles: ~50 ms per 100,000 users); encoding, the checksum, the write, its fsyncs and
//! pruning are on a thread of their own. A worker waits for its previous write only when the
//! next checkpoint is due before it ended.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::thread::JoinHandle;
use std::time::Instant;

use differential_dataflow::trace::cursor::cursor_list;
use differential_dataflow::trace::{Cursor, TraceReader};
use timely::progress::{Antichain, Timestamp};

use super::files::CheckpointDir;
use super::payload::{encode_into, Body, Compatibility, Head};
use super::schedule::Schedule;
use super::KEEP;
use crate::epoch::SourcePartition;
use crate::metrics::CheckpointMetrics;
use crate::state::features::FeatureTrace;
use crate::state::items::ItemTable;
use crate::state::profiles::ProfileTrace;
use crate::state::users::UserTable;
use crate::upsert::value_as_of;

/// What a worker's state is, for its checkpoints: the two arrangements' traces, and the tables
/// the profiles' values index into.
pub struct StateHandles {
    pub profiles: ProfileTrace,
    pub features: FeatureTrace,
    pub items: Rc<RefCell<ItemTable>>,
    pub users: Rc<RefCell<UserTable>>,
}

impl std::fmt::Debug for StateHandles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateHandles").finish_non_exhaustive()
    }
}

impl StateHandles {
    /// Keeps the state readable as of every time from `time` on.
    fn hold_from(&mut self, time: u64) {
        let frontier = Antichain::from_elem(time);
        self.profiles.set_logical_compaction(frontier.borrow());
        self.features.set_logical_compaction(frontier.borrow());
        // Physical compaction is held alike, as every other reader of these traces does:
        // reading goes over every batch, so nothing needs the batches' boundaries, but the hold
        // is one time and costs nothing a release would save.
        self.profiles.set_physical_compaction(frontier.borrow());
        self.features.set_physical_compaction(frontier.borrow());
        self.items.borrow_mut().hold_from(Some(time));
    }

    /// Whether both traces hold every update before `time`.
    fn complete_before(&mut self, time: u64) -> bool {
        let mut upper = Antichain::from_elem(u64::minimum());
        self.profiles.read_upper(&mut upper);
        let profiles = !upper.less_than(&time);
        self.features.read_upper(&mut upper);
        profiles && !upper.less_than(&time)
    }

    /// The state once every update at or before `as_of` is counted, as a checkpoint's body;
    /// `None` if a trace cannot be read. `like` is the last one read, whose sizes the columns
    /// start from: grown by doubling, the histories' column alone would take up to twice its
    /// 37 MB a worker at full scale.
    fn read_as_of(&mut self, as_of: u64, like: Sizes) -> Option<Body> {
        let items = self.items.borrow();
        let users = self.users.borrow();
        let mut body = Body::default();
        let margin = |n: usize| n + n / 16;
        body.timestamps.reserve(margin(like.users));
        body.history_ends.reserve(margin(like.users));
        body.histories.reserve(margin(like.histories));
        // Item-table index -> index in the body's dictionary, u32::MAX for not yet in it.
        let mut dictionary = vec![u32::MAX; items.slots()];
        let (mut cursor, storage) = cursor_list(every_batch(&mut self.profiles)?);
        while let Some(&user) = cursor.get_key(&storage) {
            if let Some(profile) = value_as_of(&mut cursor, &storage, as_of) {
                body.user_ids.push(users.id(user));
                body.timestamps.push(profile.timestamp);
                for &item in profile.history.iter() {
                    let entry = &mut dictionary[item as usize];
                    if *entry == u32::MAX {
                        *entry = body.items.len() as u32;
                        body.items.push(items.id(item));
                    }
                    body.histories.push(*entry);
                }
                body.history_ends.push(body.histories.len() as u32);
            }
            cursor.step_key(&storage);
        }
        let (mut cursor, storage) = cursor_list(every_batch(&mut self.features)?);
        while cursor.key_valid(&storage) {
            if let Some(features) = value_as_of(&mut cursor, &storage, as_of) {
                body.feature_items.push(&features.item_id);
                body.features.extend_from_slice(features.features.bits());
            }
            cursor.step_key(&storage);
        }
        Some(body)
    }
}

/// Every batch of `trace`, to read as one.
fn every_batch<Tr: TraceReader<Time = u64>>(trace: &mut Tr) -> Option<Vec<Tr::Batch>> {
    // Through the empty frontier: every batch, whatever the physical compaction; `None` only
    // for a trace that was closed.
    trace.batches_through(Antichain::new().borrow())
}

/// The sizes of a body's columns.
#[derive(Debug, Clone, Copy, Default)]
struct Sizes {
    users: usize,
    histories: usize,
}

/// Where and how a run's workers write their checkpoints.
#[derive(Debug, Clone)]
pub struct Settings {
    pub dir: CheckpointDir,
    pub interval_ms: u64,
    pub compatibility: Compatibility,
}

/// One worker's checkpoints.
#[derive(Debug)]
pub struct Checkpointer {
    settings: Settings,
    worker: u32,
    peers: u32,
    schedule: Schedule,
    state: StateHandles,
    /// The write in progress, if any.
    writing: Option<JoinHandle<()>>,
    /// With `--metrics-addr`.
    metrics: Option<CheckpointMetrics>,
    /// The last body's sizes.
    last: Sizes,
}

impl Checkpointer {
    /// The checkpoints of worker `worker` of `peers`, the first at the first multiple of the
    /// interval after `after`.
    pub fn new(
        settings: Settings,
        worker: usize,
        peers: usize,
        state: StateHandles,
        after: u64,
        metrics: Option<CheckpointMetrics>,
    ) -> Self {
        let schedule = Schedule::new(settings.interval_ms, after);
        let mut checkpointer = Checkpointer {
            settings,
            worker: worker as u32,
            peers: peers as u32,
            schedule,
            state,
            writing: None,
            metrics,
            last: Sizes::default(),
        };
        checkpointer
            .state
            .hold_from(checkpointer.schedule.next() - 1);
        checkpointer
    }

    /// With every epoch before `durable` stored in Redis, and its offsets ready to commit: takes
    /// the checkpoint that is due, if any, with `positions_before(time)` its offsets. Returns
    /// the time of the checkpoint taken.
    pub fn on_durable(
        &mut self,
        durable: u64,
        positions_before: impl FnOnce(u64) -> BTreeMap<SourcePartition, i64>,
    ) -> Option<u64> {
        let time = self.schedule.due(durable)?;
        // The arrangements are upstream of the durable frontier, so they are complete before
        // it; should a trace lag all the same, the checkpoint waits for the next call.
        if !self.state.complete_before(time) {
            return None;
        }
        self.take(time, time - 1, positions_before(time));
        self.schedule.taken(time);
        self.state.hold_from(self.schedule.next() - 1);
        Some(time)
    }

    /// Takes the checkpoint of the whole state once the dataflow has ended, as of `time`, the
    /// end of the last epoch of any worker, and waits for it to be written.
    pub fn finish(mut self, time: u64, positions: BTreeMap<SourcePartition, i64>) {
        // Every update counts: the traces may have compacted them past `time`, to the hold.
        self.take(time, u64::MAX, positions);
        self.wait();
    }

    /// Waits for the write in progress.
    fn wait(&mut self) {
        if let Some(writing) = self.writing.take() {
            if writing.join().is_err() {
                tracing::error!(worker = self.worker, "the checkpoint writer panicked");
            }
        }
    }

    /// Reads the state once every update at or before `as_of` is counted and writes it in the
    /// background as the checkpoint of `time`. The traces hold updates distinct only from the
    /// hold on, so `as_of` is at or past it.
    fn take(&mut self, time: u64, as_of: u64, positions: BTreeMap<SourcePartition, i64>) {
        debug_assert!(as_of >= self.schedule.next() - 1);
        let started = Instant::now();
        let Some(body) = self.state.read_as_of(as_of, self.last) else {
            tracing::error!(
                worker = self.worker,
                time,
                "the state's traces cannot be read; no checkpoint"
            );
            return;
        };
        let read_ms = started.elapsed().as_secs_f64() * 1e3;
        self.last = Sizes {
            users: body.timestamps.len(),
            histories: body.histories.len(),
        };
        let head = Head {
            compatibility: self.settings.compatibility.clone(),
            offsets: positions
                .into_iter()
                .map(|((topic, partition), offset)| (topic as u8, partition, offset))
                .collect(),
        };
        self.wait();
        let (dir, worker, peers) = (self.settings.dir.clone(), self.worker, self.peers);
        let metrics = self.metrics.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("checkpoint-{worker}"))
            .spawn(move || {
                let written = write(&dir, time, worker, peers, &head, &body, read_ms);
                if let Some(metrics) = metrics {
                    match written {
                        true => metrics.written(time, started.elapsed()),
                        false => metrics.failed(),
                    }
                }
            });
        match spawned {
            Ok(handle) => self.writing = Some(handle),
            Err(error) => {
                tracing::error!(worker, %error, "cannot start the checkpoint writer thread; this checkpoint is skipped");
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.wait();
    }
}

/// Encodes and writes one worker's checkpoint, then (worker 0) prunes old ones, and logs how
/// it went; returns whether it was written. A failure is logged and costs only this
/// checkpoint: the stream goes on, and a restart uses an older one or replays in full.
fn write(
    dir: &CheckpointDir,
    time: u64,
    worker: u32,
    peers: u32,
    head: &Head,
    body: &Body,
    read_ms: f64,
) -> bool {
    let started = Instant::now();
    let written = dir.write_with(time, worker, peers, |out| encode_into(out, head, body));
    match written {
        Ok(path) => tracing::info!(
            worker,
            time,
            users = body.user_ids.len(),
            items = body.feature_items.len(),
            bytes = std::fs::metadata(&path).map_or(0, |m| m.len()),
            read_ms,
            write_ms = started.elapsed().as_secs_f64() * 1e3,
            path = %path.display(),
            "checkpoint written"
        ),
        Err(error) => {
            tracing::error!(worker, time, %error, "cannot write the checkpoint; the stream goes on");
            return false;
        }
    }
    if worker == 0 {
        if let Err(error) = dir.prune(KEEP) {
            tracing::warn!(%error, "cannot prune old checkpoints");
        }
    }
    true
}
