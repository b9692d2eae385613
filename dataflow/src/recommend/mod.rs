//! Recommendations (semantics §8): item-to-item co-visitation over the newest part of every
//! user's history, each item's strongest neighbours, and per-user top-N lists filled up with the
//! most popular items. [`reference`] is the plain sequential definition, which the dataflow's
//! incremental version is tested against and which the evaluation command (`bench-recs`) runs.

pub mod covisit;
pub mod reference;
pub mod scores;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use differential_dataflow::input::Input;
use smol_str::SmolStr;
use timely::dataflow::operators::{Inspect, Probe};

use crate::model::{IdList, UserInterest};

/// Each user's list: (item, score), strongest first.
pub type Lists = BTreeMap<String, Vec<(SmolStr, f64)>>;

/// The lists of every user of `histories` (user → kept history, oldest first), computed by the
/// dataflow's recommendation operators ([`covisit`], [`scores`]) on `workers` worker threads in
/// one epoch, as if every profile had just changed: the evaluation command's engine.
pub fn recommend_snapshot(
    histories: &BTreeMap<String, Vec<String>>,
    covisit: covisit::CovisitParams,
    params: scores::ScoreParams,
    workers: usize,
) -> Result<Lists, String> {
    let lists: Arc<Mutex<Lists>> = Arc::default();
    let shared = Arc::clone(&lists);
    let histories = Arc::new(histories.clone());
    timely::execute(timely::Config::process(workers.max(1)), move |worker| {
        let lists = Arc::clone(&shared);
        let (index, peers) = (worker.index(), worker.peers());
        let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (input, interests) = scope.new_collection::<UserInterest, isize>();
            let covisitation = covisit::covisitation(&interests, covisit);
            let probe = scores::recommendations(&interests, &covisitation, params)
                .inspect(move |list| {
                    let mut lists = lists.lock().unwrap_or_else(|e| e.into_inner());
                    lists.insert(list.user_id.to_string(), list.items.clone());
                })
                .probe()
                .0;
            (input, probe)
        });
        for (user, history) in histories.iter().skip(index).step_by(peers) {
            input.insert(UserInterest {
                user_id: SmolStr::new(user),
                timestamp: 0,
                history_items: IdList::new(history),
                interest_vector: Vec::new(),
                known_items: 0,
            });
        }
        input.advance_to(1);
        input.flush();
        worker.step_while(|| probe.less_than(input.time()));
    })
    .map_err(|error| format!("timely: {error}"))?;
    let lists = std::mem::take(&mut *lists.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(lists)
}
