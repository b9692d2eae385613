//! A plain sequential implementation of the contract (semantics §1–§5), with none of the
//! dataflow's machinery: maps updated message by message, every user's vector recomputed with a
//! naive formula of its own (not `profile::interest_vector`, which the dataflow uses), so that a
//! mistake in the dataflow's formula cannot pass for correct. Tests check the dataflow against it.

use std::collections::{BTreeMap, HashMap};

use profile::ProfileMessage;
use serde::Deserialize;

use crate::model::ReadPosition;

/// A user's value as the sink writes it (semantics §6), field for field, so that a test can
/// read the dataflow's written JSON into it and compare.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceProfile {
    pub user_id: String,
    pub timestamp: u64,
    pub history_items: Vec<String>,
    pub interest_vector: Vec<f32>,
    pub known_items: u32,
    pub epoch: u64,
}

/// The state of the contract after the messages seen so far.
#[derive(Debug, Clone)]
pub struct Reference {
    max_history: usize,
    decay: f64,
    dim: usize,
    profiles: BTreeMap<String, (u64, Vec<String>)>,
    features: HashMap<String, Vec<f32>>,
}

/// What one epoch did to the reference.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReferenceEpoch {
    /// Final values of the users whose output changed, sorted by user.
    pub changed: Vec<ReferenceProfile>,
    /// Profile messages older than the user's profile when read.
    pub stale: u64,
}

impl Reference {
    /// An empty state.
    pub fn new(max_history: usize, decay: f64, dim: usize) -> Self {
        Reference {
            max_history,
            decay,
            dim,
            profiles: BTreeMap::new(),
            features: HashMap::new(),
        }
    }

    /// Every user's current kept history (oldest first), by user: the snapshot semantics §8
    /// computes recommendations from (see [`crate::recommend::reference`]).
    pub fn histories(&self) -> impl Iterator<Item = (&str, &[String])> + '_ {
        self.profiles
            .iter()
            .map(|(user, (_, items))| (user.as_str(), items.as_slice()))
    }

    /// Sets an item's features (`None` deletes the item).
    pub fn set_features(&mut self, item_id: &str, features: Option<Vec<f32>>) {
        match features {
            Some(values) => self.features.insert(item_id.to_owned(), values),
            None => self.features.remove(item_id),
        };
    }

    /// Applies `epoch`: profile messages and feature updates each in read order.
    pub fn apply_epoch(
        &mut self,
        epoch: u64,
        messages: &[(ProfileMessage, ReadPosition)],
        features: &[(String, Option<Vec<f32>>, ReadPosition)],
    ) -> ReferenceEpoch {
        let before = self.outputs();
        let mut messages: Vec<_> = messages.iter().collect();
        messages.sort_by_key(|(_, position)| *position);
        let mut stale = 0;
        for (message, _) in messages {
            let current = self.profiles.get(&message.user_id);
            if current.is_some_and(|(timestamp, _)| message.timestamp < *timestamp) {
                stale += 1;
                continue;
            }
            let items = &message.history_items;
            let kept = items[items.len().saturating_sub(self.max_history)..].to_vec();
            self.profiles
                .insert(message.user_id.clone(), (message.timestamp, kept));
        }
        let mut features: Vec<_> = features.iter().collect();
        features.sort_by_key(|(_, _, position)| *position);
        for (item_id, values, _) in features {
            self.set_features(item_id, values.clone());
        }
        // "Changed" is decided on the vector rounded to f32, as it is reported and as the
        // dataflow decides it, by bits. The two formulas may round differently, so in principle
        // a feature change that moves a vector by less than an f32 ulp could count as a change
        // here and not there (or the reverse); the tests keep feature changes far larger.
        let changed = self
            .outputs()
            .into_iter()
            .filter(|(user, output)| before.get(user) != Some(output))
            .map(|(user, output)| ReferenceProfile {
                user_id: user,
                timestamp: output.timestamp,
                history_items: output.items,
                interest_vector: output.vector,
                known_items: output.known_items,
                epoch,
            })
            .collect();
        ReferenceEpoch { changed, stale }
    }

    /// Every user's output (its vector and known items, and its timestamp and history, which
    /// `profiles` holds), by user.
    fn outputs(&self) -> BTreeMap<String, Output> {
        self.profiles
            .iter()
            .map(|(user, (timestamp, items))| {
                let features: Vec<_> = items
                    .iter()
                    .map(|item| self.features.get(item).map(Vec::as_slice))
                    .collect();
                let (vector, known_items) = naive_interest_vector(&features, self.dim, self.decay);
                let output = Output {
                    timestamp: *timestamp,
                    items: items.clone(),
                    vector,
                    known_items,
                };
                (user.clone(), output)
            })
            .collect()
    }
}

/// A user's output, less the epoch that writes it.
#[derive(Debug)]
struct Output {
    timestamp: u64,
    items: Vec<String>,
    vector: Vec<f32>,
    known_items: u32,
}

/// Equal when the written value would be: floats by their bits (`-0.0` is written as such).
impl PartialEq for Output {
    fn eq(&self, other: &Self) -> bool {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        self.timestamp == other.timestamp
            && self.items == other.items
            && self.known_items == other.known_items
            && bits(&self.vector) == bits(&other.vector)
    }
}

/// Semantics §5 as written: the vector (rounded to f32 only at the end) and the number of known
/// items. Deliberately naive, in f64 with a fresh `decay.powi(k)` per position and no shortcut,
/// so that it is plainly the contract and shares nothing with `profile::interest_vector` (its
/// running weight, its order of summation) that a mistake could hide in. Taken this literally,
/// the formula is 0/0 (NaN) when every known item is so far back that `decay^k` underflows f64.
fn naive_interest_vector(
    features_in_history_order: &[Option<&[f32]>],
    dim: usize,
    decay: f64,
) -> (Vec<f32>, u32) {
    let n = features_in_history_order.len();
    let mut weighted_sum = vec![0f64; dim];
    let mut total_weight = 0f64;
    let mut known_items = 0;
    for (i, features) in features_in_history_order.iter().enumerate() {
        // Every position counts towards k, known or not.
        let k = n - 1 - i;
        let Some(x) = features else { continue };
        assert_eq!(x.len(), dim, "features have D values (semantics §3)");
        // Histories hold at most 10,000 items (semantics §2).
        let weight = decay.powi(i32::try_from(k).expect("k fits in i32"));
        for (sum, &value) in weighted_sum.iter_mut().zip(x.iter()) {
            *sum += weight * f64::from(value);
        }
        total_weight += weight;
        known_items += 1;
    }
    if known_items == 0 {
        return (vec![0.0; dim], 0);
    }
    let vector = weighted_sum
        .iter()
        .map(|s| (s / total_weight) as f32)
        .collect();
    (vector, known_items)
}

/// Whether the dataflow's vector `actual` agrees with the reference's `expected`: element-wise
/// within 1e-6, relative to values above 1. The two formulas sum in different orders and weigh
/// with differently rounded powers of `decay`, so their last bits may differ.
pub fn vectors_agree(actual: &[f32], expected: &[f32]) -> bool {
    actual.len() == expected.len()
        && actual.iter().zip(expected).all(|(&a, &b)| {
            let (a, b) = (f64::from(a), f64::from(b));
            (a - b).abs() <= 1e-6 * b.abs().max(1.0)
        })
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    const DIM: usize = 4;
    const DECAYS: [f64; 4] = [1.0, 0.999, 0.9, 0.5];

    #[test]
    fn the_naive_formula_weighs_by_distance_counting_unknown_positions() {
        // a (k=2, weight 0.25), unknown (k=1), b (k=0, weight 1).
        let (a, b) = ([4.0f32, -1.0], [-1.0f32, 2.0]);
        let (vector, known_items) = naive_interest_vector(&[Some(&a), None, Some(&b)], 2, 0.5);
        assert_eq!(known_items, 2);
        // ((0.25 * 4 - 1) / 1.25, (0.25 * -1 + 2) / 1.25)
        assert_eq!(vector, vec![0.0, 1.4]);
        assert_eq!(
            naive_interest_vector(&[None, None], 3, 0.9),
            (vec![0.0; 3], 0)
        );
        assert_eq!(naive_interest_vector(&[], 2, 0.9), (vec![0.0; 2], 0));
    }

    /// What feature values a history is made of.
    #[derive(Debug, Clone, Copy)]
    enum Values {
        Ordinary,
        Negative,
        Tiny,
        /// ±1e5 magnitudes, both signs: the sums cancel.
        Large,
        /// Tiny, ordinary and large together, both signs.
        Mixed,
    }

    const VALUES: [Values; 5] = [
        Values::Ordinary,
        Values::Negative,
        Values::Tiny,
        Values::Large,
        Values::Mixed,
    ];

    fn value(rng: &mut ChaCha8Rng, values: Values) -> f32 {
        let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
        match values {
            Values::Ordinary => rng.random_range(-1.0..1.0),
            Values::Negative => -rng.random_range(0.0..1e3),
            Values::Tiny => sign * rng.random_range(0.5..2.0) * 1e-30,
            Values::Large => sign * rng.random_range(0.5..1.0) * 1e5,
            Values::Mixed => {
                let kind = [Values::Ordinary, Values::Tiny, Values::Large][rng.random_range(0..3)];
                sign * value(rng, kind).abs()
            }
        }
    }

    /// Asserts that `profile::interest_vector` agrees with the naive formula on `history`, and
    /// returns the naive vector.
    fn assert_agree(history: &[Option<Vec<f32>>], decay: f64, context: &str) -> Vec<f32> {
        let features: Vec<_> = history.iter().map(Option::as_deref).collect();
        let (expected, known_items) = naive_interest_vector(&features, DIM, decay);
        let actual = profile::interest_vector(features.iter().copied(), DIM, decay);
        assert_eq!(actual.known_items, known_items, "{context}");
        assert!(
            vectors_agree(&actual.vector, &expected),
            "{context}: {:?} against {expected:?}",
            actual.vector
        );
        expected
    }

    #[test]
    fn the_profile_formula_agrees_with_the_naive_one_on_long_random_histories() {
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        // 0.0: every item known; 1.0: none.
        for unknown in [0.0, 0.2, 0.9, 1.0] {
            for decay in DECAYS {
                for values in VALUES {
                    for len in [0, 1, 2, rng.random_range(3..10_000), 10_000] {
                        let history: Vec<_> = (0..len)
                            .map(|_| {
                                (!rng.random_bool(unknown))
                                    .then(|| (0..DIM).map(|_| value(&mut rng, values)).collect())
                            })
                            .collect();
                        let context =
                            format!("{len} items, {unknown} unknown, decay {decay}, {values:?}");
                        assert_agree(&history, decay, &context);
                    }
                }
            }
        }
    }

    /// A single known item, the oldest of the longest history whose oldest weight `decay^k` is
    /// still a normal f64. Further back, both formulas taken literally lose precision in
    /// subnormal weights, then give 0/0 (the naive one) or whatever the smallest subnormal
    /// weight rounds to (the running weight of `profile::interest_vector`, stuck there at 0.9):
    /// a limit of f64, not a disagreement between the formulas, so it is left out here.
    #[test]
    fn a_single_known_item_at_the_far_end_is_its_own_features() {
        let mut rng = ChaCha8Rng::seed_from_u64(15);
        for decay in DECAYS {
            let len = (1..=10_000)
                .rev()
                .find(|&len| decay.powi(len - 1) >= f64::MIN_POSITIVE)
                .unwrap();
            for values in VALUES {
                let x: Vec<f32> = (0..DIM).map(|_| value(&mut rng, values)).collect();
                let mut history = vec![None; len as usize];
                history[0] = Some(x.clone());
                let context = format!("{len} items, decay {decay}, {values:?}");
                let vector = assert_agree(&history, decay, &context);
                assert!(
                    vectors_agree(&vector, &x),
                    "{context}: {vector:?} against {x:?}"
                );
            }
        }
    }
}
