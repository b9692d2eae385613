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
//!
//! The columns of a worker are ~60 MB at full scale, held until written. All workers reach a
//! checkpoint's time together, so a process's peak memory rose by that much for each of its
//! workers; the workers of a process now take turns ([`BodyGate`]): a worker whose turn has
//! not come keeps the time and the offsets the checkpoint was due with, and reads its state as
//! of that time once the body before it is written (the traces stay held there until then).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    /// Shared by the clones of the settings that the process's workers get.
    pub gate: BodyGate,
}

/// Lets one worker of a process at a time hold a checkpoint's body (read, not yet written).
#[derive(Debug, Clone, Default)]
pub struct BodyGate {
    taken: Arc<AtomicBool>,
}

impl BodyGate {
    /// The turn, if no other worker holds it.
    fn try_enter(&self) -> Option<Turn> {
        self.taken
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
            .then(|| Turn {
                taken: Arc::clone(&self.taken),
            })
    }

    /// The turn, once the worker that holds it, if any, has written its body.
    fn enter(&self) -> Turn {
        loop {
            if let Some(turn) = self.try_enter() {
                return turn;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// A worker's turn to hold a body: given back when dropped, after the body.
#[derive(Debug)]
struct Turn {
    taken: Arc<AtomicBool>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.taken.store(false, Ordering::Release);
    }
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
    /// A checkpoint that was due while another worker held the turn: its time and offsets.
    deferred: Option<(u64, BTreeMap<SourcePartition, i64>)>,
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
            deferred: None,
        };
        checkpointer
            .state
            .hold_from(checkpointer.schedule.next() - 1);
        checkpointer
    }

    /// With every epoch before `durable` stored in Redis, and its offsets ready to commit: takes
    /// the checkpoint that is due, if any, with `positions_before(time)` its offsets. Returns
    /// the time of the checkpoint taken.
    ///
    /// A checkpoint due while another worker of the process holds the turn ([`BodyGate`]) is
    /// taken by a later call, with the offsets of the call it was due at.
    pub fn on_durable(
        &mut self,
        durable: u64,
        positions_before: impl FnOnce(u64) -> BTreeMap<SourcePartition, i64>,
    ) -> Option<u64> {
        let (time, positions) = match self.deferred.take() {
            Some(deferred) => deferred,
            None => {
                let time = self.schedule.due(durable)?;
                // The arrangements are upstream of the durable frontier, so they are complete
                // before it; should a trace lag all the same, the checkpoint waits for the next
                // call.
                if !self.state.complete_before(time) {
                    return None;
                }
                // Now: the source forgets the offsets of epochs once they are committed.
                (time, positions_before(time))
            }
        };
        let Some(turn) = self.settings.gate.try_enter() else {
            self.deferred = Some((time, positions));
            return None;
        };
        self.take(time, time - 1, positions, turn);
        self.schedule.taken(time);
        self.state.hold_from(self.schedule.next() - 1);
        Some(time)
    }

    /// Takes the checkpoint of the whole state once the dataflow has ended, as of `time`, the
    /// end of the last epoch of any worker, and waits for it to be written.
    pub fn finish(mut self, time: u64, positions: BTreeMap<SourcePartition, i64>) {
        // This one covers a deferred one.
        self.deferred = None;
        // Waited for first: this worker may hold the turn itself.
        self.wait();
        let turn = self.settings.gate.enter();
        // Every update counts: the traces may have compacted them past `time`, to the hold.
        self.take(time, u64::MAX, positions, turn);
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
    ///
    /// `turn` is given back once the body is written (or at once if none is read).
    fn take(
        &mut self,
        time: u64,
        as_of: u64,
        positions: BTreeMap<SourcePartition, i64>,
        turn: Turn,
    ) {
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
                // The body's memory goes before the next worker reads its own.
                drop(body);
                drop(turn);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_at_a_time_holds_a_body() {
        let gate = BodyGate::default();
        let other = gate.clone();
        let turn = gate.try_enter().expect("a free gate lets in");
        assert!(other.try_enter().is_none(), "the turn is held");
        let waiting = std::thread::spawn(move || other.enter());
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiting.is_finished(), "enter waits for the turn");
        drop(turn);
        let turn = waiting.join().unwrap();
        assert!(gate.try_enter().is_none());
        drop(turn);
        assert!(gate.try_enter().is_some(), "given back when dropped");
    }
}
