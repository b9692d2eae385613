//! A plain sequential implementation of the contract (semantics §1–§5), with none of the
//! dataflow's machinery: maps updated message by message, every user's vector recomputed with
//! the float formula of the `profile` crate. Tests check the dataflow against it.

use std::collections::{BTreeMap, HashMap};

use profile::ProfileMessage;

use sink::ProfileRecord;

use crate::model::{EncodedProfile, ReadPosition};

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
    /// Final values of the users whose output changed, sorted by user, encoded as the sink
    /// writes them.
    pub changed: Vec<EncodedProfile>,
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
        let changed = self
            .outputs()
            .into_iter()
            .filter(|(user, output)| before.get(user) != Some(output))
            .map(|(user, output)| {
                let (timestamp, items) = &self.profiles[&user];
                let record = ProfileRecord {
                    user_id: &user,
                    timestamp: *timestamp,
                    history_items: items,
                    interest_vector: &output.vector,
                    known_items: output.known_items,
                    epoch,
                };
                #[allow(clippy::expect_used)] // test oracle; the tests use small numbers
                EncodedProfile::encode(&record).expect("timestamps and epochs below 2^53")
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
                let vector = profile::interest_vector(
                    items
                        .iter()
                        .map(|item| self.features.get(item).map(Vec::as_slice)),
                    self.dim,
                    self.decay,
                );
                let output = Output {
                    timestamp: *timestamp,
                    items: items.clone(),
                    vector: vector.vector,
                    known_items: vector.known_items,
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
