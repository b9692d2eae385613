//! The first `k` values of each key, kept up to date as the input changes: hand-made operators
//! where differential's `reduce` (and `count` before it) measured too slow.
//!
//! A `reduce` reads a key's whole group whenever one of its values changes. The neighbours of a
//! popular item come from tens of thousands of partners, and the popularity order from every
//! item; even split into 64 buckets first (a top per bucket, then of the buckets' winners), a
//! message of the bench workload, which replaces a user's window of 10 items, made the two
//! reduces read ~100,000 values (docs/performance.md). Here each key keeps its values ordered:
//! a change costs a logarithmic update, and only the keys changed in an epoch have their first
//! `k` read again.
//!
//! - [`top_k`] takes a collection of (key, value) and keeps each key's values with their counts
//!   (the popularity order: one key, the items ranked by n(x)).
//! - [`top_k_by_count`] takes a multiset of (key, value) records and ranks each key's values by
//!   their multiplicity, counting them itself (the neighbours: c(a, b) is the multiplicity of
//!   the pair (a, b)).
//!
//! The output is a collection like `reduce`'s: at each epoch, for each changed key, the values
//! that left its first `k` retracted and those that entered it inserted. Epochs are applied in
//! order, each once the input frontier has passed it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use foldhash::HashMap;

use differential_dataflow::consolidation::consolidate_updates;
use differential_dataflow::{AsCollection, Hashable, VecCollection};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Operator;
use timely::ExchangeData;

use crate::pending::PendingEpochs;

/// Each key's values, ordered, with their counts (only positive counts are kept).
type Ranked<V> = BTreeMap<V, isize>;

/// The time of an update.
fn time_of<D>(update: &(D, u64, isize)) -> u64 {
    update.1
}

/// The first `k` values (in `V`'s order) of each key of `input`, as a collection.
pub fn top_k<'scope, K, V>(
    input: &VecCollection<'scope, u64, (K, V), isize>,
    k: usize,
    name: &str,
) -> VecCollection<'scope, u64, (K, V), isize>
where
    K: ExchangeData + Clone + Ord + std::hash::Hash + Hashable<Output = u64>,
    V: ExchangeData + Clone + Ord,
{
    // Keys are routed as differential routes a reduce's: the same worker on every worker and
    // process, and as even a spread.
    let route = |((key, _), _, _): &((K, V), u64, isize)| key.hashed();
    input
        .inner
        .clone()
        .unary_frontier(Exchange::new(route), name, move |_, _| {
            let mut pending = PendingEpochs::default();
            let mut ranked: HashMap<K, Ranked<V>> = HashMap::default();
            // What the output holds for each key: its first `k` as last emitted.
            let mut emitted: HashMap<K, Vec<V>> = HashMap::default();
            move |(input, frontier), output| {
                input.for_each(|capability, updates| {
                    pending.hold_each(&capability, updates, time_of)
                });
                while let Some((capability, mut updates)) =
                    pending.take_complete(frontier.frontier())
                {
                    let time = *capability.time();
                    consolidate_updates(&mut updates);
                    let mut changed: Vec<K> = Vec::new();
                    for ((key, value), _, diff) in updates {
                        let values = ranked.entry(key.clone()).or_default();
                        let count = values.entry(value.clone()).or_insert(0);
                        *count += diff;
                        if *count <= 0 {
                            // A retraction beyond what was inserted would be a bug upstream;
                            // the value simply leaves.
                            values.remove(&value);
                        }
                        if values.is_empty() {
                            ranked.remove(&key);
                        }
                        changed.push(key);
                    }
                    changed.sort_unstable();
                    changed.dedup();
                    let mut session = output.session(&capability);
                    for key in changed {
                        let first: Vec<V> = ranked
                            .get(&key)
                            .map(|values| values.keys().take(k).cloned().collect())
                            .unwrap_or_default();
                        let before = emitted.remove(&key).unwrap_or_default();
                        for value in before.iter().filter(|value| !first.contains(value)) {
                            session.give(((key.clone(), value.clone()), time, -1));
                        }
                        for value in first.iter().filter(|value| !before.contains(value)) {
                            session.give(((key.clone(), value.clone()), time, 1));
                        }
                        if !first.is_empty() {
                            emitted.insert(key, first);
                        }
                    }
                }
            }
        })
        .as_collection()
}

/// What [`top_k_by_count`] did in one epoch on one worker.
#[derive(Debug, Clone, Copy)]
pub struct EpochWork {
    /// Records whose count changed.
    pub updates: usize,
    /// Output updates: ranks that entered or left a key's first `k`.
    pub changes: usize,
    /// The time it took.
    pub took: Duration,
}

/// The first `k` values of each key of a multiset, ranked by their multiplicity: the count of
/// each (key, value) record of `input` (as `count` would give), then each key's first `k` by
/// `rank(count, value)`, in one operator.
///
/// Fused because the co-visits are the largest state of the recommendations: `count` followed by
/// [`top_k`] kept every pair three times (`count`'s input and output arrangements, and the
/// ranked values), and moved each changed pair's count through two exchanges as a retraction
/// and an insertion (docs/performance.md, "co-visitation without the self-join"). Here each
/// record's count is kept once, with its rank in an ordered set per key; a change is a hash
/// update and a logarithmic one. A changed key's first `k` is read before and after its changes
/// of the epoch only if a change reaches them (see [`Counted::apply`]), so nothing of what was
/// emitted needs to be kept.
///
/// The output is a collection of (key, rank) as [`top_k`]'s is. `on_epoch` is told what each
/// epoch cost on this worker.
pub fn top_k_by_count<'scope, K, V, R>(
    input: &VecCollection<'scope, u64, (K, V), isize>,
    k: usize,
    rank: impl Fn(u64, &V) -> R + 'static,
    mut on_epoch: impl FnMut(u64, EpochWork) + 'static,
    name: &str,
) -> VecCollection<'scope, u64, (K, R), isize>
where
    K: ExchangeData + Clone + Ord + std::hash::Hash + Hashable<Output = u64>,
    V: ExchangeData + Clone + Ord + std::hash::Hash,
    R: ExchangeData + Clone + Ord,
{
    let route = |((key, _), _, _): &((K, V), u64, isize)| key.hashed();
    input
        .inner
        .clone()
        .unary_frontier(Exchange::new(route), name, move |_, _| {
            let mut pending = PendingEpochs::default();
            let mut keys: HashMap<K, Counted<V, R>> = HashMap::default();
            move |(input, frontier), output| {
                input.for_each(|capability, updates| {
                    pending.hold_each(&capability, updates, time_of)
                });
                while let Some((capability, mut updates)) =
                    pending.take_complete(frontier.frontier())
                {
                    let time = *capability.time();
                    let started = Instant::now();
                    // Sorted by key, then value: each key's changes are one run.
                    consolidate_updates(&mut updates);
                    let mut changes = 0;
                    let mut session = output.session(&capability);
                    for run in updates.chunk_by(|x, y| x.0 .0 == y.0 .0) {
                        let key = &run[0].0 .0;
                        let counted = keys.entry(key.clone()).or_default();
                        let Some(before) =
                            counted.apply(run.iter().map(|((_, v), _, d)| (v, *d)), k, &rank)
                        else {
                            continue;
                        };
                        let after: Vec<R> = counted.ranks.iter().take(k).cloned().collect();
                        if counted.ranks.is_empty() {
                            keys.remove(key);
                        }
                        sorted_difference(&before, &after, |r, diff| {
                            session.give(((key.clone(), r.clone()), time, diff));
                            changes += 1;
                        });
                    }
                    on_epoch(
                        time,
                        EpochWork {
                            updates: updates.len(),
                            changes,
                            took: started.elapsed(),
                        },
                    );
                }
            }
        })
        .as_collection()
}

/// One key's values with their counts (only positive counts are kept), and their ranks in
/// order.
struct Counted<V, R> {
    counts: HashMap<V, u64>,
    ranks: BTreeSet<R>,
}

impl<V, R> Default for Counted<V, R> {
    fn default() -> Self {
        Counted {
            counts: HashMap::default(),
            ranks: BTreeSet::new(),
        }
    }
}

impl<V: Clone + Eq + std::hash::Hash, R: Clone + Ord> Counted<V, R> {
    /// Applies `updates` (value, change of its count). Returns the first `k` ranks as they were
    /// before, or `None` if the updates left them as they were without reading them: a key with
    /// tens of thousands of values mostly changes far below its first `k`.
    ///
    /// Let b be the k-th rank before. While every update removes and inserts only ranks after b,
    /// the ranks up to b are untouched, so they are still the first k; the first update that
    /// touches b or a rank before it is where the first k are read.
    fn apply<'a>(
        &mut self,
        updates: impl Iterator<Item = (&'a V, isize)>,
        k: usize,
        rank: &impl Fn(u64, &V) -> R,
    ) -> Option<Vec<R>>
    where
        V: 'a,
    {
        let boundary: Option<R> = k
            .checked_sub(1)
            .and_then(|i| self.ranks.iter().nth(i).cloned());
        let mut before: Option<Vec<R>> = None;
        for (value, diff) in updates {
            let old = self.counts.get(value).copied().unwrap_or(0);
            // A retraction beyond what was inserted would be a bug upstream; the value simply
            // leaves.
            let new = (old as i64 + diff as i64).max(0) as u64;
            let old_rank = (old > 0).then(|| rank(old, value));
            let new_rank = (new > 0).then(|| rank(new, value));
            if before.is_none() {
                let touches = |r: &Option<R>| match (r, &boundary) {
                    (Some(r), Some(b)) => r <= b,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if touches(&old_rank) || touches(&new_rank) {
                    before = Some(self.ranks.iter().take(k).cloned().collect());
                }
            }
            if let Some(r) = old_rank {
                self.ranks.remove(&r);
            }
            match new_rank {
                Some(r) => {
                    self.ranks.insert(r);
                    self.counts.insert(value.clone(), new);
                }
                None => {
                    self.counts.remove(value);
                }
            }
        }
        before
    }
}

/// Calls `emit(r, -1)` for each rank of `before` not in `after`, and `emit(r, 1)` for each of
/// `after` not in `before`; both sorted.
fn sorted_difference<R: Ord>(before: &[R], after: &[R], mut emit: impl FnMut(&R, isize)) {
    let (mut i, mut j) = (0, 0);
    loop {
        match (before.get(i), after.get(j)) {
            (Some(x), Some(y)) => match x.cmp(y) {
                std::cmp::Ordering::Less => {
                    emit(x, -1);
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    emit(y, 1);
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    i += 1;
                    j += 1;
                }
            },
            (Some(x), None) => {
                emit(x, -1);
                i += 1;
            }
            (None, Some(y)) => {
                emit(y, 1);
                j += 1;
            }
            (None, None) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::cmp::Reverse;
    use std::sync::{Arc, Mutex};

    use differential_dataflow::input::Input;
    use rand::{Rng, SeedableRng};

    use super::*;

    type Record = (u32, u32);
    type Epochs = Vec<Vec<(Record, isize)>>;

    /// Twelve epochs of `per_epoch` random updates of records from `keys` × `values`: a
    /// retraction of a present record with probability `retract`, else an insertion; and the
    /// multiset after each epoch.
    fn random_epochs(
        seed: u64,
        per_epoch: usize,
        (keys, values): (u32, u32),
        retract: f64,
    ) -> (Epochs, Vec<BTreeMap<Record, isize>>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut state: BTreeMap<Record, isize> = BTreeMap::new();
        let mut epochs = Vec::new();
        let mut states = Vec::new();
        for _ in 0..12 {
            let mut updates = Vec::new();
            for _ in 0..per_epoch {
                let record = (rng.random_range(0..keys), rng.random_range(0..values));
                let present = state.get(&record).copied().unwrap_or(0);
                let diff = if present > 0 && rng.random_bool(retract) {
                    -1
                } else {
                    1
                };
                *state.entry(record).or_insert(0) += diff;
                updates.push((record, diff));
            }
            epochs.push(updates);
            states.push(state.clone());
        }
        (epochs, states)
    }

    /// The first `k` of each key's present values, ranked by `rank(count, value)`, by brute
    /// force.
    fn expected<R: Ord + Clone>(
        state: &BTreeMap<Record, isize>,
        k: usize,
        rank: impl Fn(u64, u32) -> R,
    ) -> BTreeMap<(u32, R), isize> {
        let mut by_key: BTreeMap<u32, Vec<R>> = BTreeMap::new();
        for (&(key, value), &count) in state {
            if count > 0 {
                by_key
                    .entry(key)
                    .or_default()
                    .push(rank(count as u64, value));
            }
        }
        by_key
            .into_iter()
            .flat_map(|(key, mut ranks)| {
                ranks.sort();
                ranks.into_iter().take(k).map(move |r| ((key, r), 1))
            })
            .collect()
    }

    /// The operator under test, built on the input collection.
    type Build<R> = for<'s> fn(
        &VecCollection<'s, u64, Record, isize>,
    ) -> VecCollection<'s, u64, (u32, R), isize>;

    /// Updates of a collection: (data, time, diff).
    type Updates<D> = Vec<(D, u64, isize)>;

    /// Runs `build` over `epochs` on `workers` workers and returns its output as of each
    /// epoch. With `spread`, the updates are spread over the workers, so that a record's
    /// updates arrive from several; otherwise worker 0 sends them all.
    fn run<R: ExchangeData + Ord + Clone>(
        workers: usize,
        epochs: &Epochs,
        spread: bool,
        build: Build<R>,
    ) -> Vec<BTreeMap<(u32, R), isize>> {
        let seen: Arc<Mutex<Updates<(u32, R)>>> = Arc::default();
        let epochs_in = epochs.clone();
        let sink = seen.clone();
        timely::execute(timely::Config::process(workers), move |worker| {
            let sink = sink.clone();
            let (index, peers) = (worker.index(), worker.peers());
            let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, collection) = scope.new_collection::<Record, isize>();
                let probe = build(&collection)
                    .inspect(move |update| sink.lock().unwrap().push(update.clone()))
                    .probe()
                    .0;
                (input, probe)
            });
            for (epoch, updates) in epochs_in.iter().enumerate() {
                for (i, &(record, diff)) in updates.iter().enumerate() {
                    let mine = if spread {
                        i % peers == index
                    } else {
                        index == 0
                    };
                    if mine {
                        input.update(record, diff);
                    }
                }
                input.advance_to(epoch as u64 + 1);
                input.flush();
                worker.step_while(|| probe.less_than(input.time()));
            }
        })
        .unwrap();
        let seen = seen.lock().unwrap();
        (0..epochs.len() as u64)
            .map(|epoch| {
                let mut actual = BTreeMap::new();
                for (record, time, diff) in seen.iter() {
                    if *time <= epoch {
                        *actual.entry(record.clone()).or_insert(0) += diff;
                    }
                }
                actual.retain(|_, count| *count != 0);
                actual
            })
            .collect()
    }

    #[test]
    fn keeps_each_keys_first_values_over_random_epochs_and_workers() {
        // Insertions and retractions of values that are present.
        let (epochs, states) = random_epochs(7, 40, (5, 20), 0.5);
        for workers in [1, 2, 4] {
            let outputs = run::<u32>(workers, &epochs, false, |collection| {
                top_k(collection, 3, "Top")
            });
            for (epoch, (actual, state)) in outputs.iter().zip(&states).enumerate() {
                // The values themselves are the order.
                let expected = expected(state, 3, |_, value| value);
                assert_eq!(actual, &expected, "epoch {epoch}, {workers} workers");
            }
        }
    }

    #[test]
    fn keeps_each_keys_first_values_by_count_over_random_epochs_and_workers() {
        // From a small pool, so that counts grow, tie and fall back to zero.
        let (epochs, states) = random_epochs(11, 60, (4, 8), 0.4);
        let rank = |count: u64, value: u32| (Reverse(count), value);
        for workers in [1, 2, 4] {
            let outputs = run::<(Reverse<u64>, u32)>(workers, &epochs, true, |collection| {
                top_k_by_count(
                    collection,
                    3,
                    |count, value: &u32| (Reverse(count), *value),
                    |_, _| {},
                    "TopByCount",
                )
            });
            for (epoch, (actual, state)) in outputs.iter().zip(&states).enumerate() {
                let expected = expected(state, 3, rank);
                assert_eq!(actual, &expected, "epoch {epoch}, {workers} workers");
            }
        }
    }
}
