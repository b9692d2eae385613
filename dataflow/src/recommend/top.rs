//! The first `k` values of each key of a collection, kept up to date as the collection changes:
//! a hand-made operator where differential's `reduce` measured too slow.
//!
//! A `reduce` reads a key's whole group whenever one of its values changes. The neighbours of a
//! popular item come from tens of thousands of partners, and the popularity order from every
//! item; even split into 64 buckets first (a top per bucket, then of the buckets' winners), a
//! message of the bench workload, which replaces a user's window of 10 items, made the two
//! reduces read ~100,000 values (docs/performance.md). Here each key keeps its values ordered
//! (a `BTreeMap` with counts): a change costs a logarithmic update, and only the keys changed in
//! an epoch have their first `k` read again and compared with what was emitted last.
//!
//! The output is a collection like `reduce`'s: at each epoch, for each changed key, the values
//! that left its first `k` retracted and those that entered it inserted. Epochs are applied in
//! order, each once the input frontier has passed it.

use std::collections::{BTreeMap, HashMap};

use differential_dataflow::consolidation::consolidate_updates;
use differential_dataflow::{AsCollection, Hashable, VecCollection};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::{Capability, Operator};
use timely::ExchangeData;

/// Each key's values, ordered, with their counts (only positive counts are kept).
type Ranked<V> = BTreeMap<V, isize>;

/// One epoch's updates, held until it is complete.
type Pending<K, V> = (Capability<u64>, Vec<((K, V), u64, isize)>);

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
            let mut pending: BTreeMap<u64, Pending<K, V>> = BTreeMap::new();
            let mut ranked: HashMap<K, Ranked<V>> = HashMap::new();
            // What the output holds for each key: its first `k` as last emitted.
            let mut emitted: HashMap<K, Vec<V>> = HashMap::new();
            move |(input, frontier), output| {
                input.for_each(|capability, updates| {
                    for update in updates.drain(..) {
                        let time = update.1;
                        pending
                            .entry(time)
                            .or_insert_with(|| (capability.delayed(&time, 0), Vec::new()))
                            .1
                            .push(update);
                    }
                });
                while let Some(entry) = pending.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (time, (capability, mut updates)) = entry.remove_entry();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::{Arc, Mutex};

    use differential_dataflow::input::Input;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// The first `k` of each key of `state` (a multiset of (key, value)), by brute force.
    fn expected(state: &BTreeMap<(u32, u32), isize>, k: usize) -> BTreeMap<(u32, u32), isize> {
        let mut by_key: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for (&(key, value), &count) in state {
            if count > 0 {
                by_key.entry(key).or_default().push(value);
            }
        }
        by_key
            .into_iter()
            .flat_map(|(key, values)| values.into_iter().take(k).map(move |v| ((key, v), 1)))
            .collect()
    }

    #[test]
    fn keeps_each_keys_first_values_over_random_epochs_and_workers() {
        let k = 3;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Twelve epochs of random insertions and retractions of values that are present.
        let mut state: BTreeMap<(u32, u32), isize> = BTreeMap::new();
        let mut epochs = Vec::new();
        let mut expectations = Vec::new();
        for _ in 0..12 {
            let mut updates = Vec::new();
            for _ in 0..40 {
                let record = (rng.random_range(0..5u32), rng.random_range(0..20u32));
                let present = state.get(&record).copied().unwrap_or(0);
                let diff = if present > 0 && rng.random_bool(0.5) {
                    -1
                } else {
                    1
                };
                *state.entry(record).or_insert(0) += diff;
                updates.push((record, diff));
            }
            epochs.push(updates);
            expectations.push(expected(&state, k));
        }
        for workers in [1, 2, 4] {
            type Updates = Vec<((u32, u32), u64, isize)>;
            let seen: Arc<Mutex<Updates>> = Arc::default();
            let epochs = epochs.clone();
            let sink = seen.clone();
            timely::execute(timely::Config::process(workers), move |worker| {
                let sink = sink.clone();
                let (mut input, probe) = worker.dataflow::<u64, _, _>(|scope| {
                    let (input, collection) = scope.new_collection::<(u32, u32), isize>();
                    let probe = top_k(&collection, k, "Top")
                        .inspect(move |update| sink.lock().unwrap().push(*update))
                        .probe()
                        .0;
                    (input, probe)
                });
                for (epoch, updates) in epochs.iter().enumerate() {
                    if worker.index() == 0 {
                        for &(record, diff) in updates {
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
            for (epoch, expected) in expectations.iter().enumerate() {
                let mut actual: BTreeMap<(u32, u32), isize> = BTreeMap::new();
                for (record, time, diff) in seen.iter() {
                    if *time <= epoch as u64 {
                        *actual.entry(*record).or_insert(0) += diff;
                    }
                }
                actual.retain(|_, count| *count != 0);
                assert_eq!(&actual, expected, "epoch {epoch}, {workers} workers");
            }
        }
    }
}
