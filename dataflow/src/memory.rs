//! The dataflow driven from memory, without a broker or Redis: the same [`interest_profiles`]
//! core and [`write_epochs`] stage, fed with prepared epochs on N worker threads. Tests check it
//! against the sequential [`crate::reference`]; the benchmark measures the core with it.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use timely::dataflow::operators::Probe;
use timely::dataflow::{InputHandle, ProbeHandle};

use crate::interest::{interest_profiles, InterestParams};
use crate::model::{FeatureEvent, ProfileEvent, ProfileOutput, ReadPosition};

use crate::output::{write_epochs, EpochWriter};
use crate::stats::{EpochCounters, StatsBoard};

/// The input of one epoch.
#[derive(Debug, Clone, Default)]
pub struct EpochInput {
    pub profiles: Vec<ProfileEvent>,
    pub features: Vec<FeatureEvent>,
}

/// What a run produced: per epoch, the final values of the changed users (sorted by user) and
/// the counters summed over workers.
#[derive(Debug, Default)]
pub struct MemoryRun {
    pub outputs: BTreeMap<u64, Vec<ProfileOutput>>,
    pub counters: BTreeMap<u64, EpochCounters>,
}

type Shared<T> = Arc<Mutex<T>>;

/// Collects the values written, as a stand-in for Redis that keeps everything.
struct CaptureWriter(Shared<BTreeMap<u64, Vec<ProfileOutput>>>);

impl EpochWriter for CaptureWriter {
    fn write_epoch(&mut self, epoch: u64, profiles: &[ProfileOutput]) -> u64 {
        let mut outputs = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        outputs
            .entry(epoch)
            .or_default()
            .extend_from_slice(profiles);
        profiles.len() as u64
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
    let outputs: Shared<BTreeMap<u64, Vec<ProfileOutput>>> = Arc::default();
    let counters: Shared<BTreeMap<u64, EpochCounters>> = Arc::default();
    let inputs = Arc::new((initial_features, epochs));
    let (outputs_in, counters_in) = (outputs.clone(), counters.clone());
    let guards = timely::execute(timely::Config::process(workers.max(1)), move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let owns =
            move |position: &ReadPosition| position.0.unsigned_abs() as usize % peers == index;
        let board = Rc::new(RefCell::new(StatsBoard::default()));
        let mut profile_input = InputHandle::new();
        let mut feature_input = InputHandle::new();
        let probe = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            let outputs = interest_profiles(
                profile_input.to_stream(scope),
                feature_input.to_stream(scope),
                params,
                board.clone(),
            );
            let writer = CaptureWriter(outputs_in.clone());
            write_epochs(outputs, None, writer, board.clone()).probe_with(&probe);
        });

        let (initial_features, epochs) = &*inputs;
        for event in initial_features.iter().filter(|e| owns(&e.position)) {
            feature_input.send(event.clone());
        }
        for (i, epoch) in epochs.iter().enumerate() {
            let time = i as u64 + 1;
            profile_input.advance_to(time);
            feature_input.advance_to(time);
            for event in epoch.profiles.iter().filter(|e| owns(&e.position)) {
                board.borrow_mut().epoch(time).messages += 1;
                profile_input.send(event.clone());
            }
            for event in epoch.features.iter().filter(|e| owns(&e.position)) {
                board.borrow_mut().epoch(time).messages += 1;
                feature_input.send(event.clone());
            }
        }
        let end = epochs.len() as u64 + 1;
        profile_input.advance_to(end);
        feature_input.advance_to(end);
        worker.step_while(|| probe.less_than(&end));

        let mut totals = counters_in
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (epoch, counts) in board.borrow_mut().drain_before(u64::MAX) {
            totals.entry(epoch).or_default().add(&counts);
        }
    })?;
    for result in guards.join() {
        result?;
    }
    let mut outputs = std::mem::take(&mut *outputs.lock().map_err(|e| e.to_string())?);
    for profiles in outputs.values_mut() {
        profiles.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    }
    let counters = std::mem::take(&mut *counters.lock().map_err(|e| e.to_string())?);
    Ok(MemoryRun { outputs, counters })
}
