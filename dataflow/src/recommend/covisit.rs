//! Co-visitation (semantics §8) as differential collections, maintained incrementally from the
//! interest collection as histories slide and are replaced:
//!
//! ```text
//! interests ─flat_map─▶ windows (user, item) ─arrange by user─┬─ self-join ─▶ pairs (a, b) ─count─▶ c(a, b)
//!                                            └─ map item ─count─▶ n(x)         │
//!            c(a, b) ─▶ top K per a (`top_k`) ─▶ neighbours(a)
//! ```
//!
//! The window of a user is the set of the distinct items of its last W history positions (see
//! [`super::reference`] for the rules). When a window slides by d items, the interest
//! collection retracts the old history and inserts the new one; their windows differ in about
//! 2d (user, item) records once consolidated, which is what the arrangement by user holds, and
//! the self-join's delta then produces O(d·W) pair changes, not O(W²).
//!
//! Item ids are keys here as they are, [`SmolStr`] (inline up to 23 bytes): the contract breaks
//! ties between neighbours by the ids' bytes, which a hash would lose, and users and items of
//! every worker meet in these collections, where the workers' table indices mean nothing.
//!
//! Each item's neighbours are its top K partners by (c desc, id asc). A popular item has tens of
//! thousands of partners, and a `reduce` reads its whole group whenever one of them changes
//! (even split into 64 buckets of partners, then a top of the buckets' winners, that was most
//! of the recommendations' cost); [`super::top::top_k`] keeps each item's partners ordered and
//! reads only the changed items' first K.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use differential_dataflow::VecCollection;
use smol_str::SmolStr;

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
    /// (user, item): the distinct items of each user's window.
    pub windows: VecCollection<'scope, u64, (SmolStr, SmolStr), isize>,
    /// (x, n(x)) for every item in some window.
    pub item_users: VecCollection<'scope, u64, (SmolStr, isize), isize>,
    /// ((a, b), c(a, b)) for a ≠ b with c(a, b) ≥ 1, both directions.
    pub covisits: VecCollection<'scope, u64, ((SmolStr, SmolStr), isize), isize>,
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
pub fn covisitation<'scope>(
    interests: &VecCollection<'scope, u64, UserInterest, isize>,
    params: CovisitParams,
) -> Covisitation<'scope> {
    let window = params.window;
    let windows = interests.clone().flat_map(move |interest: UserInterest| {
        window_items(interest.history_items.iter(), window)
            .into_keys()
            .map(|item| (interest.user_id.clone(), SmolStr::new(item)))
            .collect::<Vec<_>>()
    });
    let item_users = windows.clone().map(|(_user, item)| item).count();
    let by_user = windows.clone().arrange_by_key();
    let covisits = by_user
        .clone()
        .join_core(by_user, |_user, a: &SmolStr, b: &SmolStr| {
            (a != b).then(|| (a.clone(), b.clone()))
        })
        .count();
    let partners = covisits.clone().map(|((a, b), c)| {
        (
            a,
            Neighbour {
                covisits: Reverse(c as u64),
                item_id: b,
            },
        )
    });
    let neighbours = super::top::top_k(&partners, params.neighbours, "Neighbours");
    Covisitation {
        window,
        windows,
        item_users,
        covisits,
        neighbours,
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
        Updates<((SmolStr, SmolStr), isize)>,
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
            let (item_users, covisits, neighbours) = shared.clone();
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, interests) = scope.new_collection::<UserInterest, isize>();
                let built = covisitation(&interests, params);
                built
                    .item_users
                    .inspect(move |(d, t, r)| item_users.lock().unwrap().push((d.clone(), *t, *r)));
                built
                    .covisits
                    .inspect(move |(d, t, r)| covisits.lock().unwrap().push((d.clone(), *t, *r)));
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
            let (item_users, covisits, neighbours) = run(workers, &epochs, params);
            let mut per_epoch = Vec::new();
            for (epoch, histories) in epochs.iter().enumerate() {
                let reference = RecommendReference::new(histories.values(), settings);
                let epoch = epoch as u64;
                let n = as_of(&item_users, epoch);
                for ((item, count), one) in &n {
                    assert_eq!(*one, 1);
                    assert_eq!(reference.users_holding(item) as isize, *count, "n({item})");
                }
                let c = as_of(&covisits, epoch);
                let expected: BTreeMap<((SmolStr, SmolStr), isize), isize> = reference
                    .all_covisits()
                    .map(|(a, b, c)| ((((a.into()), b.into()), c as isize), 1))
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
