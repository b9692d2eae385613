//! A plain sequential implementation of the contract (semantics §1–§5), with none of the
//! dataflow's machinery: maps updated message by message, every user's vector recomputed with
//! the float formula of the `profile` crate. Tests check the dataflow against it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use profile::ProfileMessage;

use crate::model::{ProfileOutput, ReadPosition};

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
    pub changed: Vec<ProfileOutput>,
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

    /// Applies one epoch: profile messages and feature updates each in read order.
    pub fn apply_epoch(
        &mut self,
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
            .map(|(_, output)| output)
            .collect();
        ReferenceEpoch { changed, stale }
    }

    /// Every user's output, by user.
    pub fn outputs(&self) -> BTreeMap<String, ProfileOutput> {
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
                let output = ProfileOutput {
                    user_id: user.clone(),
                    timestamp: *timestamp,
                    history_items: items.iter().map(|item| Arc::from(item.as_str())).collect(),
                    interest_vector: vector.vector,
                    known_items: vector.known_items,
                };
                (user.clone(), output)
            })
            .collect()
    }
}
