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
