//! Fresh recommendations for every user whose profile changed in an epoch (semantics §8), from
//! the co-visitation collections:
//!
//! ```text
//! interests ─▶ queries (a, user@e) for a in W(user), inserted at e, retracted at e+1
//!   ⋈ n(a) ⋈ neighbours(a) ⋈ n(i)  ─▶ terms (user@e, i, k, c, n(a), n(i))  ─exchange by user─┐
//! interests ─▶ the changed users' histories ─────────────────────────────────────────────────┼─▶ score, top N, fill ─▶ lists
//! n(x) ─▶ top P popular ─broadcast──────────────────────────────────────────────────────────┘
//! ```
//!
//! A query lives for one epoch: the joins against the arrangements of n and of the neighbours
//! produce, at epoch e, exactly the terms of the users changed in e, read as of e; its retraction
//! at e + 1 retracts them. Each query carries its epoch, so the scoring operator takes the terms
//! of the users of e at time e and ignores the retractions of older ones. Floats appear only after
//! the joins: the keys are item ids. A user's terms are added per candidate in order of k, then
//! item, as the reference adds them, so that equal scores are equal in bits.
//!
//! The fill-up needs at most N + |history| items of the popularity order: the top
//! `N + max_history` by n(x) (ties by id) are kept as a small collection, broadcast to every
//! worker.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use differential_dataflow::{AsCollection, VecCollection};
use smol_str::SmolStr;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::Concat;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;

use super::covisit::{window_items, Covisitation};
use crate::model::{id_key, EncodedProfile, IdList, UserInterest};

/// The settings of the scores (semantics §8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreParams {
    /// W, as for the co-visitation.
    pub window: usize,
    /// N: items per list.
    pub recommendations_n: usize,
    /// The recency decay of the terms.
    pub decay: f64,
    /// The longest kept history, which bounds how far down the popularity order a fill-up goes.
    pub max_history: usize,
    /// Epochs before this time get no lists (the replay's: their users' lists are in Redis
    /// already).
    pub first_scored_time: u64,
}

/// A user's fresh list, as of the epoch it is emitted at.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRecommendations {
    pub user_id: SmolStr,
    /// The profile's timestamp.
    pub timestamp: u64,
    /// The epoch of the change (also the stream's time).
    pub epoch: u64,
    /// Strongest first: (item, score); fill-up items score 0.
    pub items: Vec<(SmolStr, f64)>,
}

/// Which worker holds a user: the route of the profile exchange (`user_key as u64`).
fn route(user_id: &str) -> u64 {
    id_key(user_id) as u64
}

/// A query's identity: the user, its route and the epoch it was made in.
type Tag = (u64, SmolStr, u64);

/// One summand of a score: candidate `item` through window item `via` at distance `k`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
struct Term {
    tag: Tag,
    item: SmolStr,
    k: u32,
    via: SmolStr,
    covisits: u64,
    n_via: u64,
    n_item: u64,
}

/// One entry of the popularity order: n(x) descending, then id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
struct Popular {
    users: Reverse<u64>,
    item: SmolStr,
}

/// An update of the popularity order's collection, as the scoring operator reads it.
type PopularUpdate = (((), Popular), u64, isize);

/// What the scoring operator reads, routed by user.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
enum ScoreInput {
    /// A term, with the time and count of its update.
    Term(Term, u64, isize),
    /// A user whose profile changed in `epoch`, with its kept history.
    Changed {
        user_id: SmolStr,
        timestamp: u64,
        history: IdList,
        epoch: u64,
    },
}

impl ScoreInput {
    fn route(&self) -> u64 {
        match self {
            ScoreInput::Term(term, _, _) => term.tag.0,
            ScoreInput::Changed { user_id, .. } => route(user_id),
        }
    }
}

/// Builds the scores: a stream of the fresh lists of the users whose profile changed, each at
/// the epoch of the change.
pub fn recommendations<'scope>(
    interests: &VecCollection<'scope, u64, UserInterest, isize>,
    covisitation: &Covisitation<'scope>,
    params: ScoreParams,
) -> Stream<'scope, u64, Vec<UserRecommendations>> {
    let window = params.window;
    let first = params.first_scored_time;
    // The queries: (a, tag, k) for a in W(user), at e, retracted at e + 1.
    let queries = interests
        .inner
        .clone()
        .unary(Pipeline, "RecsQueries", move |_, _| {
            move |input, output| {
                input.for_each(|capability, updates| {
                    for (interest, epoch, diff) in updates.iter() {
                        if *diff <= 0 || *epoch < first {
                            continue;
                        }
                        let tag: Tag = (route(&interest.user_id), interest.user_id.clone(), *epoch);
                        let distances = distances(&interest.history_items, window);
                        let now = capability.delayed(epoch, 0);
                        let next = capability.delayed(&(epoch + 1), 0);
                        let mut inserted = Vec::with_capacity(distances.len());
                        let mut retracted = Vec::with_capacity(distances.len());
                        for (via, k) in distances {
                            let record = (via, (tag.clone(), k));
                            retracted.push((record.clone(), epoch + 1, -1));
                            inserted.push((record, *epoch, 1));
                        }
                        output.session(&now).give_container(&mut inserted);
                        output.session(&next).give_container(&mut retracted);
                    }
                });
            }
        })
        .as_collection();
    let item_users = covisitation.item_users.clone().arrange_by_key();
    let terms = queries
        .arrange_by_key()
        .join_core(item_users.clone(), |via, (tag, k), n_via| {
            Some((via.clone(), (tag.clone(), *k, *n_via as u64)))
        })
        .arrange_by_key()
        .join_core(
            covisitation.neighbours.clone().arrange_by_key(),
            |via, (tag, k, n_via), neighbour| {
                Some((
                    neighbour.item_id.clone(),
                    (tag.clone(), *k, via.clone(), neighbour.covisits.0, *n_via),
                ))
            },
        )
        .arrange_by_key()
        .join_core(
            item_users,
            |item, (tag, k, via, covisits, n_via), n_item| {
                Some(Term {
                    tag: tag.clone(),
                    item: item.clone(),
                    k: *k,
                    via: via.clone(),
                    covisits: *covisits,
                    n_via: *n_via,
                    n_item: *n_item as u64,
                })
            },
        );
    let changed = interests
        .inner
        .clone()
        .flat_map(move |(interest, epoch, diff)| {
            (diff > 0 && epoch >= first).then_some(ScoreInput::Changed {
                user_id: interest.user_id,
                timestamp: interest.timestamp,
                history: interest.history_items,
                epoch,
            })
        });
    let inputs = terms
        .inner
        .map(|(term, time, diff)| ScoreInput::Term(term, time, diff))
        .concat(changed);
    let popular_len = params.recommendations_n + params.max_history;
    let popular = popular_order(&covisitation.item_users, popular_len)
        .inner
        .broadcast();
    score(inputs, popular, params)
}

/// Each distinct item of the window with the distance of its newest occurrence.
fn distances(history: &IdList, window: usize) -> Vec<(SmolStr, u32)> {
    let mut seen = BTreeMap::new();
    for (k, item) in history.iter().rev().take(window).enumerate() {
        seen.entry(item).or_insert(k as u32);
    }
    debug_assert_eq!(seen.len(), window_items(history.iter(), window).len());
    seen.into_iter()
        .map(|(item, k)| (SmolStr::new(item), k))
        .collect()
}

/// The first `len` items by n(x) descending, ties by id: a top per bucket of items, then of the
/// buckets' winners.
fn popular_order<'scope>(
    item_users: &VecCollection<'scope, u64, (SmolStr, isize), isize>,
    len: usize,
) -> VecCollection<'scope, u64, ((), Popular), isize> {
    item_users
        .clone()
        .map(|(item, users)| {
            let bucket = xxhash_rust::xxh3::xxh3_64(item.as_bytes()) % 64;
            (
                bucket,
                Popular {
                    users: Reverse(users as u64),
                    item,
                },
            )
        })
        .reduce(move |_, input, output| first(input, len, output))
        .map(|(_, popular)| ((), popular))
        .reduce(move |_, input, output| first(input, len, output))
}

fn first(input: &[(&Popular, isize)], len: usize, output: &mut Vec<(Popular, isize)>) {
    output.extend(
        input
            .iter()
            .filter(|(_, count)| *count > 0)
            .take(len)
            .map(|(popular, _)| ((*popular).clone(), 1)),
    );
}

/// The lists as the sink's values for `user_recs:{user_id}`.
pub fn encode_recommendations<'scope>(
    lists: Stream<'scope, u64, Vec<UserRecommendations>>,
) -> Stream<'scope, u64, Vec<EncodedProfile>> {
    lists.flat_map(|list| {
        match EncodedProfile::recommendations(
            &list.user_id,
            list.timestamp,
            list.epoch,
            &list.items,
        ) {
            Ok(value) => Some(value),
            // Unreachable in practice, as for profiles: timestamps and epochs stay below 2^53.
            Err(error) => {
                tracing::error!(%error, user_id = %list.user_id, "recommendations not written");
                None
            }
        }
    })
}

/// The popularity order's updates of one epoch, held until the epoch is complete.
type PendingPopular = (Capability<u64>, Vec<(Popular, isize)>);

/// `popular_items` (the first `len` items by n(x), ties by id) as a sink value, from worker 0,
/// at each epoch in which it changed.
pub fn popular_items<'scope>(
    item_users: &VecCollection<'scope, u64, (SmolStr, isize), isize>,
    len: usize,
) -> Stream<'scope, u64, Vec<EncodedProfile>> {
    let updates = popular_order(item_users, len).inner;
    updates.unary_frontier(Exchange::new(|_| 0), "PopularItems", |_, _| {
        let mut order: BTreeMap<Popular, isize> = BTreeMap::new();
        let mut pending: BTreeMap<u64, PendingPopular> = BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each(|capability, updates| {
                for (((), popular), time, diff) in updates.drain(..) {
                    pending
                        .entry(time)
                        .or_insert_with(|| (capability.delayed(&time, 0), Vec::new()))
                        .1
                        .push((popular, diff));
                }
            });
            while let Some(entry) = pending.first_entry() {
                if frontier.less_equal(entry.key()) {
                    break;
                }
                let (epoch, (capability, updates)) = entry.remove_entry();
                for (popular, diff) in updates {
                    *order.entry(popular).or_insert(0) += diff;
                }
                order.retain(|_, count| *count != 0);
                let items: Vec<(&str, u64)> = order
                    .keys()
                    .map(|popular| (popular.item.as_str(), popular.users.0))
                    .collect();
                let value = EncodedProfile::popular_items(epoch, &items);
                output.session(&capability).give(value);
            }
        }
    })
}

/// What the scoring operator holds for an epoch until every input has passed it.
struct PendingEpoch {
    capability: Capability<u64>,
    changed: Vec<(SmolStr, u64, IdList)>,
    /// Per user, its terms with their counts (an update and its retraction cancel).
    terms: HashMap<SmolStr, BTreeMap<Term, isize>>,
}

/// The scoring operator: once both inputs have passed an epoch, each changed user's list.
fn score<'scope>(
    inputs: Stream<'scope, u64, Vec<ScoreInput>>,
    popular: Stream<'scope, u64, Vec<PopularUpdate>>,
    params: ScoreParams,
) -> Stream<'scope, u64, Vec<UserRecommendations>> {
    let pending: Rc<RefCell<BTreeMap<u64, PendingEpoch>>> = Rc::default();
    inputs.binary_frontier(
        popular,
        Exchange::new(ScoreInput::route),
        Pipeline,
        "Recommend",
        move |_, _| {
            // The popularity order as of the last epoch scored, and updates for later ones.
            let mut order: BTreeMap<Popular, isize> = BTreeMap::new();
            let mut order_updates: Vec<(Popular, u64, isize)> = Vec::new();
            move |(input, frontier), (popular, popular_frontier), output| {
                let mut pending = pending.borrow_mut();
                input.for_each(|capability, records| {
                    for record in records.drain(..) {
                        let epoch = match &record {
                            // Only the terms of the query's own epoch: a later time carries
                            // its retraction.
                            ScoreInput::Term(term, time, _) if *time != term.tag.2 => continue,
                            ScoreInput::Term(term, _, _) => term.tag.2,
                            ScoreInput::Changed { epoch, .. } => *epoch,
                        };
                        let entry = pending.entry(epoch).or_insert_with(|| PendingEpoch {
                            capability: capability.delayed(&epoch, 0),
                            changed: Vec::new(),
                            terms: HashMap::new(),
                        });
                        match record {
                            ScoreInput::Term(term, _, diff) => {
                                *entry
                                    .terms
                                    .entry(term.tag.1.clone())
                                    .or_default()
                                    .entry(term)
                                    .or_insert(0) += diff;
                            }
                            ScoreInput::Changed {
                                user_id,
                                timestamp,
                                history,
                                ..
                            } => entry.changed.push((user_id, timestamp, history)),
                        }
                    }
                });
                popular.for_each(|_, updates| {
                    order_updates.extend(
                        updates
                            .drain(..)
                            .map(|(((), popular), time, diff)| (popular, time, diff)),
                    );
                });
                let done: Vec<u64> = pending
                    .keys()
                    .copied()
                    .filter(|epoch| {
                        !frontier.less_equal(epoch) && !popular_frontier.less_equal(epoch)
                    })
                    .collect();
                for epoch in done {
                    let Some(entry) = pending.remove(&epoch) else {
                        continue;
                    };
                    order_updates.retain(|(popular, time, diff)| {
                        if *time <= epoch {
                            *order.entry(popular.clone()).or_insert(0) += diff;
                            false
                        } else {
                            true
                        }
                    });
                    order.retain(|_, count| *count != 0);
                    let mut lists = Vec::with_capacity(entry.changed.len());
                    for (user_id, timestamp, history) in entry.changed {
                        let terms = entry.terms.get(&user_id);
                        let items = user_list(&history, terms, &order, &params);
                        lists.push(UserRecommendations {
                            user_id,
                            timestamp,
                            epoch,
                            items,
                        });
                    }
                    output.session(&entry.capability).give_container(&mut lists);
                }
            }
        },
    )
}

/// One user's list from its terms and the popularity order.
fn user_list(
    history: &IdList,
    terms: Option<&BTreeMap<Term, isize>>,
    order: &BTreeMap<Popular, isize>,
    params: &ScoreParams,
) -> Vec<(SmolStr, f64)> {
    let in_history: BTreeSet<&str> = history.iter().collect();
    // Per candidate, its terms in the order of k, then item (the reference's order).
    let mut by_item: BTreeMap<&SmolStr, Vec<&Term>> = BTreeMap::new();
    for (term, count) in terms.into_iter().flatten() {
        if *count > 0 && !in_history.contains(term.item.as_str()) {
            by_item.entry(&term.item).or_default().push(term);
        }
    }
    let mut list: Vec<(SmolStr, f64)> = by_item
        .into_iter()
        .map(|(item, mut terms)| {
            terms.sort_by(|a, b| (a.k, &a.via).cmp(&(b.k, &b.via)));
            let score = terms.iter().fold(0.0, |sum, term| {
                let weight = params.decay.powi(term.k as i32);
                sum + weight * term.covisits as f64
                    / ((term.n_via as f64) * (term.n_item as f64)).sqrt()
            });
            (item.clone(), score)
        })
        .collect();
    list.sort_by(|x, y| y.1.total_cmp(&x.1).then_with(|| x.0.cmp(&y.0)));
    list.truncate(params.recommendations_n);
    for popular in order.keys() {
        if list.len() >= params.recommendations_n {
            break;
        }
        if !in_history.contains(popular.item.as_str())
            && !list.iter().any(|(item, _)| *item == popular.item)
        {
            list.push((popular.item.clone(), 0.0));
        }
    }
    list
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use differential_dataflow::input::Input;
    use timely::dataflow::operators::{Inspect, Probe};

    use super::*;
    use crate::recommend::covisit::{covisitation, CovisitParams};
    use crate::recommend::reference::{RecommendReference, RecommendSettings, ScoredItem};
    use crate::recommend::test_histories::{epochs, feed};

    type Lists = Arc<Mutex<Vec<(u64, UserRecommendations)>>>;

    fn run(
        workers: usize,
        epochs: &[BTreeMap<String, Vec<String>>],
        params: ScoreParams,
        neighbours: usize,
    ) -> Lists {
        let lists: Lists = Default::default();
        let epochs = epochs.to_vec();
        let shared = lists.clone();
        timely::execute(timely::Config::process(workers), move |worker| {
            let lists = shared.clone();
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, interests) = scope.new_collection::<UserInterest, isize>();
                let covisit = covisitation(
                    &interests,
                    CovisitParams {
                        window: params.window,
                        neighbours,
                    },
                );
                let probe = recommendations(&interests, &covisit, params)
                    .inspect(move |list| lists.lock().unwrap().push((list.epoch, list.clone())))
                    .probe()
                    .0;
                (input, probe)
            });
            feed(worker, &mut input, &probe, &epochs);
        })
        .unwrap();
        lists
    }

    #[test]
    fn lists_match_the_reference_for_every_changed_user_over_epochs_and_workers() {
        let params = ScoreParams {
            window: 5,
            recommendations_n: 4,
            decay: 0.9,
            max_history: 12,
            first_scored_time: 0,
        };
        let settings = RecommendSettings {
            covisit_window: 5,
            neighbours: 3,
            recommendations_n: 4,
            decay: 0.9,
        };
        let epochs = epochs(11);
        for workers in [1, 2, 4] {
            let lists = run(workers, &epochs, params, 3);
            let lists = lists.lock().unwrap();
            let mut previous: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (epoch, histories) in epochs.iter().enumerate() {
                let reference = RecommendReference::new(histories.values(), settings);
                let changed: Vec<&String> = histories
                    .iter()
                    .filter(|(user, history)| previous.get(*user) != Some(history))
                    .map(|(user, _)| user)
                    .collect();
                let at: BTreeMap<&str, &UserRecommendations> = lists
                    .iter()
                    .filter(|(time, _)| *time == epoch as u64)
                    .map(|(_, list)| (list.user_id.as_str(), list))
                    .collect();
                assert_eq!(
                    at.len(),
                    changed.len(),
                    "one list per changed user at {epoch}"
                );
                for user in changed {
                    let list = at[user.as_str()];
                    let actual: Vec<ScoredItem> = list
                        .items
                        .iter()
                        .map(|(item, score)| ScoredItem {
                            item_id: item.to_string(),
                            score: *score,
                        })
                        .collect();
                    reference
                        .check_recommendations(&histories[user], &actual)
                        .unwrap_or_else(|e| {
                            panic!("{user} at epoch {epoch}, {workers} workers: {e}")
                        });
                }
                previous.clone_from(histories);
            }
        }
    }
}
