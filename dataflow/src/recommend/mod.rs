//! Recommendations (semantics §8): item-to-item co-visitation over the newest part of every
//! user's history, each item's strongest neighbours, and per-user top-N lists filled up with the
//! most popular items. [`covisit`] and [`scores`] are the dataflow's incremental operators
//! (built by `graph::build` with `--recommendations on`), with [`top`] keeping the neighbours and
//! the popularity order; they add what each epoch cost them to the worker's stats board
//! ([`CostBoard`]). [`reference`](mod@reference) is the plain sequential definition they are tested against;
//! [`recommend_snapshot`] runs the operators on a snapshot, for the evaluation command
//! (`bench-recs`).

pub mod covisit;
pub mod intern;
pub mod reference;
pub mod scores;
pub mod top;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use differential_dataflow::input::Input;
use smol_str::SmolStr;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::Probe;

use crate::model::{IdList, UserInterest};
use crate::stats::{RecommendCost, StatsBoard};

/// The worker's stats board, where the recommendations' operators add what each epoch cost
/// them (reported with the epoch's other counters, and as metrics).
pub type CostBoard = Rc<RefCell<StatsBoard>>;

/// Which of the recommendations' stages took the time (see [`RecommendCost`]).
#[derive(Debug, Clone, Copy)]
enum Stage {
    Pairs,
    Neighbours,
    Scoring,
}

/// Adds to `epoch`'s cost on `board`: `took` of `stage`'s worker time, and what `count` adds.
fn add_cost(
    board: &CostBoard,
    epoch: u64,
    stage: Stage,
    took: Duration,
    count: impl FnOnce(&mut RecommendCost),
) {
    let mut board = board.borrow_mut();
    let cost = &mut board.epoch(epoch).recommend;
    let us = took.as_micros() as u64;
    match stage {
        Stage::Pairs => cost.pairs_us += us,
        Stage::Neighbours => cost.neighbours_us += us,
        Stage::Scoring => cost.scoring_us += us,
    }
    count(cost);
}

/// Each user's list: (item, score), strongest first.
pub type Lists = BTreeMap<String, Vec<(SmolStr, f64)>>;

/// The lists of every user of `histories` (user → kept history, oldest first), computed by the
/// dataflow's recommendation operators ([`covisit`], [`scores`]) on `workers` worker threads in
/// one epoch, as if every profile had just changed: the evaluation command's engine.
pub fn recommend_snapshot<S: AsRef<str>>(
    histories: &BTreeMap<String, Vec<S>>,
    covisit: covisit::CovisitParams,
    params: scores::ScoreParams,
    workers: usize,
) -> Result<Lists, String> {
    let lists: Arc<Mutex<Lists>> = Arc::default();
    let shared = Arc::clone(&lists);
    // Each worker's users as interest values, made here rather than from a copy of
    // `histories` that every worker would share: the copy was the size of the input.
    let workers = workers.max(1);
    let mut parts: Vec<Vec<UserInterest>> = (0..workers).map(|_| Vec::new()).collect();
    for (index, (user, history)) in histories.iter().enumerate() {
        parts[index % workers].push(UserInterest {
            user_id: SmolStr::new(user),
            timestamp: 0,
            history_items: IdList::new(history),
            interest_vector: Vec::new(),
            known_items: 0,
        });
    }
    let parts: Arc<Vec<Mutex<Vec<UserInterest>>>> =
        Arc::new(parts.into_iter().map(Mutex::new).collect());
    timely::execute(timely::Config::process(workers), move |worker| {
        let lists = Arc::clone(&shared);
        let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (input, interests) = scope.new_collection::<UserInterest, isize>();
            let cost = CostBoard::default();
            let covisitation = covisit::covisitation(&interests, covisit, &cost);
            let order = scores::popular_order(&covisitation.item_users, params.popularity_len());
            let (probe, recommendations) =
                scores::recommendations(&interests, &covisitation, &order, params, &cost).probe();
            // The lists moved into the map, not cloned: at full scale they are a tenth of the
            // run's peak. (What the sink has not taken when the probe passes, it takes before
            // `execute` returns, which runs the dataflow to its end.)
            recommendations.sink(Pipeline, "Lists", move |(input, _)| {
                input.for_each(|_, recommendations| {
                    let mut lists = lists.lock().unwrap_or_else(|e| e.into_inner());
                    for list in recommendations.drain(..) {
                        lists.insert(list.user_id.to_string(), list.items);
                    }
                });
            });
            (input, probe)
        });
        let mine = std::mem::take(
            &mut *parts[worker.index()]
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for interest in mine {
            input.insert(interest);
        }
        input.advance_to(1);
        input.flush();
        worker.step_while(|| probe.less_than(input.time()));
    })
    .map_err(|error| format!("timely: {error}"))?;
    let lists = std::mem::take(&mut *lists.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(lists)
}

/// Random histories over epochs and their interest values, for the operators' tests against the
/// reference.
#[cfg(test)]
pub(crate) mod test_histories {
    use std::collections::BTreeMap;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use smol_str::SmolStr;

    use differential_dataflow::input::InputSession;
    use timely::dataflow::ProbeHandle;

    use crate::model::{id_key, IdList, UserInterest};
    use crate::recommend::covisit::CovisitParams;
    use crate::recommend::reference::RecommendSettings;

    /// Feeds `epochs` to `input` as the interest collection would change: each worker its own
    /// users (by the profile exchange's route), a changed user's old value retracted and the
    /// new one inserted; one epoch at a time, each run until `probe` has passed it.
    pub(crate) fn feed(
        worker: &mut timely::worker::Worker,
        input: &mut InputSession<u64, UserInterest, isize>,
        probe: &ProbeHandle<u64>,
        epochs: &[BTreeMap<String, Vec<String>>],
    ) {
        let (index, peers) = (worker.index(), worker.peers());
        let mut before: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (epoch, histories) in epochs.iter().enumerate() {
            for (user, history) in histories {
                if id_key(user) as u64 as usize % peers != index
                    || before.get(user) == Some(history)
                {
                    continue;
                }
                if let Some(old) = before.get(user) {
                    input.remove(interest(user, old));
                }
                input.insert(interest(user, history));
            }
            before.clone_from(histories);
            input.advance_to(epoch as u64 + 1);
            input.flush();
            worker.step_while(|| probe.less_than(input.time()));
        }
    }

    /// Sets `key`'s entry of `map` to `count`, as a change record that sets counts says, 0
    /// removing it; checks that the record changes something, and that a 0 removes an entry
    /// that is there.
    pub(crate) fn set_count<K: Ord + Clone + std::fmt::Debug>(
        map: &mut BTreeMap<K, u64>,
        key: &K,
        count: u64,
    ) {
        let before = match count {
            0 => map.remove(key),
            _ => map.insert(key.clone(), count),
        };
        assert_ne!(before, Some(count), "{key:?}: a change changes");
        assert!(
            count != 0 || before.is_some(),
            "{key:?} left without being there"
        );
    }

    /// The reference's settings for the co-visitation of `params`, the rest as by default.
    pub(crate) fn settings(params: CovisitParams) -> RecommendSettings {
        RecommendSettings {
            covisit_window: params.window,
            neighbours: params.neighbours,
            ..RecommendSettings::default()
        }
    }

    /// A user's interest value with `history` (the other fields do not matter here).
    pub(crate) fn interest(user: &str, history: &[String]) -> UserInterest {
        UserInterest {
            user_id: SmolStr::new(user),
            timestamp: 7,
            history_items: IdList::new(history),
            interest_vector: Vec::new(),
            known_items: 0,
        }
    }

    /// The histories of 50 users over six epochs: each epoch some users get a few new items (a
    /// sliding window), some a new history altogether, some stay; items from a small skewed
    /// pool, so that counts tie and windows repeat items.
    pub(crate) fn epochs(seed: u64) -> Vec<BTreeMap<String, Vec<String>>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let item = |rng: &mut ChaCha8Rng| {
            let r: f64 = rng.random();
            format!("i{:02}", (r * r * 40.0) as u32)
        };
        let mut current: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut out = Vec::new();
        for _ in 0..6 {
            for u in 0..50 {
                let user = format!("u{u}");
                match rng.random_range(0..4) {
                    0 => {}
                    1 => {
                        let n = rng.random_range(1..15);
                        current.insert(user, (0..n).map(|_| item(&mut rng)).collect());
                    }
                    _ => {
                        let history = current.entry(user).or_default();
                        for _ in 0..rng.random_range(1..4) {
                            history.push(item(&mut rng));
                        }
                        let excess = history.len().saturating_sub(12);
                        history.drain(..excess);
                    }
                }
            }
            out.push(current.clone());
        }
        out
    }
}
