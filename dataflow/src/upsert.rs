//! The upsert operator: turns a stream of keyed events into a differential collection holding
//! one current value per key, by emitting a retraction of the old value with each new one.
//!
//! Without it the profile collection would keep every message ever read; with it, state is one
//! record per user. Events of an epoch are applied once the epoch is complete, in read order, so
//! the outcome does not depend on how the epoch's messages were batched or interleaved.

use std::collections::HashMap;
use std::hash::Hash;

use differential_dataflow::hashable::Hashable;
use differential_dataflow::{AsCollection, ExchangeData, VecCollection};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Operator;
use timely::dataflow::Stream;

use crate::model::{FeatureEvent, FeatureVector, Profile, ProfileEvent, ReadPosition};
use crate::pending::PendingEpochs;

/// An event that sets the value of a key.
pub trait UpsertEvent: ExchangeData {
    type Key: ExchangeData + Hashable + Hash + Eq;
    type Value: ExchangeData;
    /// The key the event sets.
    fn key(&self) -> &Self::Key;
    /// Where the event was read; events of one epoch apply in this order.
    fn position(&self) -> ReadPosition;
    /// Whether this event, read after the one that set `current`, replaces it. When it does not,
    /// the event is stale: it changes nothing and is counted.
    fn supersedes(&self, current: &Self::Value) -> bool;
    /// The new value, or `None` to delete the key.
    fn into_value(self) -> Option<Self::Value>;
}

impl UpsertEvent for ProfileEvent {
    type Key = String;
    type Value = Profile;
    fn key(&self) -> &String {
        &self.user_id
    }
    fn position(&self) -> ReadPosition {
        self.position
    }
    /// Latest wins (semantics §4); a tie in timestamp goes to the message read later.
    fn supersedes(&self, current: &Profile) -> bool {
        self.timestamp >= current.timestamp
    }
    fn into_value(self) -> Option<Profile> {
        Some(Profile {
            user_id: self.user_id,
            timestamp: self.timestamp,
            history_items: self.history_items,
        })
    }
}

impl UpsertEvent for FeatureEvent {
    type Key = String;
    type Value = FeatureVector;
    fn key(&self) -> &String {
        &self.item_id
    }
    fn position(&self) -> ReadPosition {
        self.position
    }
    /// Feature updates carry no time of their own: the one read last wins.
    fn supersedes(&self, _current: &FeatureVector) -> bool {
        true
    }
    fn into_value(self) -> Option<FeatureVector> {
        self.features
    }
}

/// Applies `events` as upserts. `on_stale(epoch, count)` hears how many events of each epoch
/// were stale.
pub fn upsert<'scope, E: UpsertEvent>(
    events: Stream<'scope, u64, Vec<E>>,
    name: &str,
    mut on_stale: impl FnMut(u64, usize) + 'static,
) -> VecCollection<'scope, u64, (E::Key, E::Value), isize> {
    // Route by the same hash differential arranges by, so the arrangements downstream find
    // their keys already on the right worker.
    let route = Exchange::new(|event: &E| event.key().hashed().into());
    events
        .unary_frontier(route, name, |_capability, _info| {
            let mut state: HashMap<E::Key, E::Value> = HashMap::new();
            let mut pending = PendingEpochs::<E>::default();
            move |(input, frontier), output| {
                input.for_each(|capability, data| {
                    // Input events carry no time of their own: they are at their batch's stamp.
                    let Some(capability) = capability.retain_least(0) else {
                        return;
                    };
                    pending.at(*capability.time(), || capability).append(data);
                });
                while let Some((capability, mut events)) =
                    pending.take_complete(frontier.frontier())
                {
                    let epoch = *capability.time();
                    // Stable sort: the read order within a partition is kept.
                    events.sort_by_key(UpsertEvent::position);
                    let mut stale = 0;
                    let mut changed: HashMap<E::Key, Option<E::Value>> = HashMap::new();
                    for event in events {
                        let current = match changed.get(event.key()) {
                            Some(value) => value.as_ref(),
                            None => state.get(event.key()),
                        };
                        if current.is_some_and(|current| !event.supersedes(current)) {
                            stale += 1;
                            continue;
                        }
                        changed.insert(event.key().clone(), event.into_value());
                    }
                    if stale > 0 {
                        on_stale(epoch, stale);
                    }
                    let mut session = output.session(&capability);
                    for (key, new) in changed {
                        let old = match &new {
                            Some(value) => state.insert(key.clone(), value.clone()),
                            None => state.remove(&key),
                        };
                        if old == new {
                            continue;
                        }
                        if let Some(old) = old {
                            session.give(((key.clone(), old), epoch, -1));
                        }
                        if let Some(new) = new {
                            session.give(((key, new), epoch, 1));
                        }
                    }
                }
            }
        })
        .as_collection()
}
