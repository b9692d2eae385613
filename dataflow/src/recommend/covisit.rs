//! Co-visitation (semantics §8) as collections, maintained incrementally from the interest
//! collection as histories slide and are replaced:
//!
//! ```text
//! interests ─┬─ window items ─count─▶ n(x)
//!            └─ window pairs (a, b), multiplicity c(a, b) ─count, top K per a─▶ neighbours(a)
//! ```
//!
//! The window of a user is the set of the distinct items of its last W history positions (see
//! [`super::reference`] for the rules). The pairs are the self-join of the windows on user,
//! computed where a user's old and new values meet ([`window_pairs`]): when a window slides by
//! d items, only the 2·d·(W − 1) pairs that touch an item that left or entered it change, so an
//! update costs O(d·W), not O(W²).
//!
//! Item ids travel between workers as they are, [`SmolStr`] (inline up to 23 bytes): the
//! contract breaks ties between neighbours by the ids' bytes, which a hash would lose, and
//! users and items of every worker meet here, where one worker's numbers mean nothing to
//! another. Each operator numbers the ids it keeps for itself ([`super::intern`]).
//!
//! Each item's neighbours are its top K partners by (c desc, id asc). A popular item has tens of
//! thousands of partners, and a `reduce` reads its whole group whenever one of them changes;
//! [`super::top::top_k_by_count`] keeps each pair's count once, as two worker-local numbers and a
//! count, with only each item's strongest partners in order, and compares only the changed
//! items' first K (docs/performance.md has the measurements that replaced the self-join,
//! `count` and `reduce`, then the string-keyed ordered sets).

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::time::Instant;

use differential_dataflow::{AsCollection, VecCollection};
use smol_str::SmolStr;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Operator;

use super::{add_cost, CostBoard, Stage};
use crate::model::UserInterest;

/// The sizes of §8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CovisitParams {
    /// W: the history positions, newest first, whose items form a user's window.
    pub window: usize,
    /// K: neighbours kept per item.
    pub neighbours: usize,
}

/// One of an item's neighbours: the partner and c(a, b), ordered strongest first (c descending,
/// then id ascending), as the contract ranks them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Neighbour {
    /// c(a, b), descending.
    pub covisits: Reverse<u64>,
    pub item_id: SmolStr,
}

/// The collections of co-visitation.
pub struct Covisitation<'scope> {
    /// W, the window they were built with (the scores read the same windows).
    pub window: usize,
    /// (x, n(x)) for every item in some window.
    pub item_users: VecCollection<'scope, u64, (SmolStr, isize), isize>,
    /// (a, b) for a ≠ b, both directions, with multiplicity c(a, b).
    pub pairs: VecCollection<'scope, u64, (SmolStr, SmolStr), isize>,
    /// (a, b with c(a, b)): the K strongest partners of each item.
    pub neighbours: VecCollection<'scope, u64, (SmolStr, Neighbour), isize>,
}

impl std::fmt::Debug for Covisitation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Covisitation").finish_non_exhaustive()
    }
}

/// A user's window: the distinct items of `history`'s last `window` positions, each with the
/// distance k of its newest occurrence from the newest item (0 for the newest).
pub fn window_items<'a>(
    history: impl DoubleEndedIterator<Item = &'a str>,
    window: usize,
) -> BTreeMap<&'a str, u32> {
    let mut items = BTreeMap::new();
    // From the newest position back, so that the first k recorded for an item is its smallest.
    for (k, item) in history.rev().take(window).enumerate() {
        items.entry(item).or_insert(k as u32);
    }
    items
}

/// Builds the co-visitation collections on the interest collection.
///
/// What the pairs and the neighbours cost each epoch is added to `cost`.
pub fn covisitation<'scope>(
    interests: &VecCollection<'scope, u64, UserInterest, isize>,
    params: CovisitParams,
    cost: &CostBoard,
) -> Covisitation<'scope> {
    let window = params.window;
    let item_users = interests
        .clone()
        .flat_map(move |interest: UserInterest| {
            window_items(interest.history_items.iter(), window)
                .into_keys()
                .map(SmolStr::new)
                .collect::<Vec<_>>()
        })
        .count();
    let pairs = window_pairs(interests, window, cost.clone());
    let board = cost.clone();
    let neighbours = super::top::top_k_by_count(
        &pairs,
        params.neighbours,
        |covisits, item_id: &SmolStr| Neighbour {
            covisits: Reverse(covisits),
            item_id: item_id.clone(),
        },
        move |epoch, work| {
            add_cost(&board, epoch, Stage::Neighbours, work.took, |cost| {
                cost.pair_updates += work.updates as u64;
                cost.neighbour_changes += work.changes as u64;
            });
        },
        "Neighbours",
    );
    Covisitation {
        window,
        item_users,
        pairs,
        neighbours,
    }
}

/// The co-visits of every user's window: each ordered pair (a, b), a ≠ b, of the window's
/// items, as a collection in which (a, b) has multiplicity c(a, b).
///
/// This is the self-join of the (user, item) window collection on user, computed where a
/// user's values meet: a user has one interest value at a time, so its pairs are a function of
/// that one record, and the interest operator emits a changed user's retraction and insertion
/// together. The updates of one user and time in an input batch are combined before anything
/// is emitted: for a retraction and an insertion, only the pairs that touch an item that left
/// or entered the window, 2·d·(W − 1) for a slide of d items. Any other grouping (a user's
/// updates split over batches, say) emits more updates that consolidate to the same
/// collection. Measured against `join_core` on an arrangement by user, which needed that
/// arrangement (every window, 10 records a user) and emitted ~540 pair updates a replaced
/// window, 180 of them net (docs/performance.md).
fn window_pairs<'scope>(
    interests: &VecCollection<'scope, u64, UserInterest, isize>,
    window: usize,
    cost: CostBoard,
) -> VecCollection<'scope, u64, (SmolStr, SmolStr), isize> {
    interests
        .inner
        .clone()
        .unary(Pipeline, "WindowPairs", move |_, _| {
            let mut changes: Vec<((SmolStr, SmolStr), isize)> = Vec::new();
            move |input, output| {
                input.for_each(|capability, records| {
                    let started = Instant::now();
                    records.sort_unstable_by(|(x, tx, _), (y, ty, _)| {
                        (tx, &x.user_id).cmp(&(ty, &y.user_id))
                    });
                    let first_time = records.first().map_or(0, |(_, time, _)| *time);
                    let mut session = output.session(&capability);
                    for group in records
                        .chunk_by(|(x, tx, _), (y, ty, _)| tx == ty && x.user_id == y.user_id)
                    {
                        let time = group[0].1;
                        pair_changes(group, window, &mut changes);
                        for (pair, diff) in changes.drain(..) {
                            session.give((pair, time, diff));
                        }
                    }
                    // Counted at the batch's first time, where the updates of a user usually
                    // all are.
                    add_cost(&cost, first_time, Stage::Pairs, started.elapsed(), |_| {});
                });
            }
        })
        .as_collection()
}

/// The pair changes of one user's updates at one time, consolidated, into `changes`.
fn pair_changes(
    group: &[(UserInterest, u64, isize)],
    window: usize,
    changes: &mut Vec<((SmolStr, SmolStr), isize)>,
) {
    let items = |interest: &UserInterest| -> Vec<SmolStr> {
        window_items(interest.history_items.iter(), window)
            .into_keys()
            .map(SmolStr::new)
            .collect()
    };
    match group {
        // The usual case: the old value retracted and the new one inserted.
        [(first, _, d1), (second, _, d2)] if d1 + d2 == 0 && d1.abs() == 1 => {
            let (old, new) = if *d1 < 0 {
                (items(first), items(second))
            } else {
                (items(second), items(first))
            };
            let left: Vec<&SmolStr> = old.iter().filter(|x| !new.contains(x)).collect();
            let entered: Vec<&SmolStr> = new.iter().filter(|x| !old.contains(x)).collect();
            for (changed, within, diff) in [(&left, &old, -1), (&entered, &new, 1)] {
                // Each pair of `within` that touches a changed item, once.
                for &a in changed.iter() {
                    for b in within.iter().filter(|b| *b != a) {
                        changes.push(((a.clone(), b.clone()), diff));
                        if !changed.contains(&b) {
                            changes.push(((b.clone(), a.clone()), diff));
                        }
                    }
                }
            }
        }
        _ => {
            for (interest, _, diff) in group {
                let items = items(interest);
                for a in &items {
                    for b in items.iter().filter(|b| *b != a) {
                        changes.push(((a.clone(), b.clone()), *diff));
                    }
                }
            }
            differential_dataflow::consolidation::consolidate(changes);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    use differential_dataflow::input::Input;

    use super::*;
    use crate::recommend::reference::{RecommendReference, RecommendSettings};
    use crate::recommend::test_histories::{epochs, feed};

    type Updates<D> = Arc<Mutex<Vec<(D, u64, isize)>>>;

    /// The collection `updates` holds as of `epoch`: each record with its count, zeros dropped.
    fn as_of<D: Ord + Clone>(updates: &Updates<D>, epoch: u64) -> BTreeMap<D, isize> {
        let mut state = BTreeMap::new();
        for (data, time, diff) in updates.lock().unwrap().iter() {
            if *time <= epoch {
                *state.entry(data.clone()).or_insert(0) += diff;
            }
        }
        state.retain(|_, count| *count != 0);
        state
    }

    type Captured = (
        Updates<(SmolStr, isize)>,
        Updates<(SmolStr, SmolStr)>,
        Updates<(SmolStr, Neighbour)>,
    );

    /// Runs `covisitation` on `workers` workers over the epochs' histories, fed as the interest
    /// collection would be (the old value retracted, the new inserted, by the user's worker).
    fn run(
        workers: usize,
        epochs: &[BTreeMap<String, Vec<String>>],
        params: CovisitParams,
    ) -> Captured {
        let captured: Captured = Default::default();
        let epochs = epochs.to_vec();
        let shared = captured.clone();
        timely::execute(timely::Config::process(workers), move |worker| {
            let (item_users, pairs, neighbours) = shared.clone();
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, interests) = scope.new_collection::<UserInterest, isize>();
                let built = covisitation(&interests, params, &CostBoard::default());
                built
                    .item_users
                    .inspect(move |(d, t, r)| item_users.lock().unwrap().push((d.clone(), *t, *r)));
                built
                    .pairs
                    .inspect(move |(d, t, r)| pairs.lock().unwrap().push((d.clone(), *t, *r)));
                let probe = built
                    .neighbours
                    .inspect(move |(d, t, r)| neighbours.lock().unwrap().push((d.clone(), *t, *r)))
                    .probe()
                    .0;
                (input, probe)
            });
            feed(worker, &mut input, &probe, &epochs);
        })
        .unwrap();
        captured
    }

    #[test]
    fn counts_and_neighbours_match_the_reference_over_epochs_and_workers() {
        let params = CovisitParams {
            window: 5,
            neighbours: 3,
        };
        let settings = RecommendSettings {
            covisit_window: params.window,
            neighbours: params.neighbours,
            ..RecommendSettings::default()
        };
        let epochs = epochs(7);
        let mut outputs = Vec::new();
        for workers in [1, 2, 4] {
            let (item_users, pairs, neighbours) = run(workers, &epochs, params);
            let mut per_epoch = Vec::new();
            for (epoch, histories) in epochs.iter().enumerate() {
                let reference = RecommendReference::new(histories.values(), settings);
                let epoch = epoch as u64;
                let n = as_of(&item_users, epoch);
                for ((item, count), one) in &n {
                    assert_eq!(*one, 1);
                    assert_eq!(reference.users_holding(item) as isize, *count, "n({item})");
                }
                // The multiplicity of (a, b) is c(a, b).
                let c = as_of(&pairs, epoch);
                let expected: BTreeMap<(SmolStr, SmolStr), isize> = reference
                    .all_covisits()
                    .map(|(a, b, c)| ((a.into(), b.into()), c as isize))
                    .collect();
                assert_eq!(c, expected, "c(a, b) at epoch {epoch}, {workers} workers");
                let mut lists: BTreeMap<SmolStr, Vec<(String, u64)>> = BTreeMap::new();
                for ((item, neighbour), one) in as_of(&neighbours, epoch) {
                    assert_eq!(one, 1);
                    lists
                        .entry(item)
                        .or_default()
                        .push((neighbour.item_id.to_string(), neighbour.covisits.0));
                }
                for (item, list) in &lists {
                    let expected: Vec<(String, u64)> = reference
                        .neighbours(item)
                        .iter()
                        .map(|n| (n.item_id.clone(), n.covisits))
                        .collect();
                    assert_eq!(list, &expected, "neighbours({item}) at epoch {epoch}");
                }
                assert_eq!(
                    lists.len(),
                    n.keys()
                        .filter(|(item, _)| !reference.neighbours(item).is_empty())
                        .count(),
                    "every item with a partner has neighbours"
                );
                per_epoch.push((n, c));
            }
            outputs.push(per_epoch);
        }
        assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn a_window_is_the_set_of_the_last_positions() {
        let history = ["a", "b", "c", "b", "d"];
        let items = window_items(history.iter().copied(), 3);
        assert_eq!(items, BTreeMap::from([("b", 1), ("c", 2), ("d", 0)]));
        // An item twice counts once, at its newest position.
        let all = window_items(history.iter().copied(), 10);
        assert_eq!(
            all,
            BTreeMap::from([("a", 4), ("b", 1), ("c", 2), ("d", 0)])
        );
    }
}
