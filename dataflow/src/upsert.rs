//! Upserts: events that set the current value of a key, latest wins (semantics §4).
//!
//! [`resolve_epoch`] is the rule: an epoch's events apply once the epoch is complete, in read
//! order, so the outcome does not depend on how its messages were batched or interleaved; an
//! event older than the key's current value is stale. The interest operator applies it to the
//! profiles of its users and to the feature events every worker receives.

use rustc_hash::FxHashMap;
use std::fmt::Debug;
use std::hash::Hash;

use differential_dataflow::hashable::Hashable;

use crate::model::{FeatureEvent, FeatureVector, IdKey, Profile, ProfileEvent, ReadPosition};

/// An event that sets the value of a key.
pub trait UpsertEvent {
    type Key: Hashable + Hash + Eq + Clone + Debug;
    type Value: Debug;
    /// What orders the events of one key: an event whose version is below that of the key's
    /// current value is stale (it changes nothing and is counted); among equal versions the
    /// event read later wins.
    type Version: Ord + Copy;
    /// The key the event sets.
    fn key(&self) -> &Self::Key;
    /// Where the event was read; events of one epoch apply in this order.
    fn position(&self) -> ReadPosition;
    /// The event's version.
    fn version(&self) -> Self::Version;
    /// The new value, or `None` to delete the key.
    fn into_value(self) -> Option<Self::Value>;
}

impl UpsertEvent for ProfileEvent {
    type Key = IdKey;
    type Value = Profile;
    /// Latest wins (semantics §4); a tie in timestamp goes to the message read later.
    type Version = u64;
    fn key(&self) -> &IdKey {
        &self.user_key
    }
    fn position(&self) -> ReadPosition {
        self.position
    }
    fn version(&self) -> u64 {
        self.timestamp
    }
    fn into_value(self) -> Option<Profile> {
        Some(Profile {
            user_id: self.user_id,
            user_key: self.user_key,
            timestamp: self.timestamp,
            history_items: self.history_items,
        })
    }
}

impl UpsertEvent for FeatureEvent {
    type Key = String;
    type Value = FeatureVector;
    /// Feature updates carry no time of their own: the one read last wins.
    type Version = ();
    fn key(&self) -> &String {
        &self.item_id
    }
    fn position(&self) -> ReadPosition {
        self.position
    }
    fn version(&self) {}
    fn into_value(self) -> Option<FeatureVector> {
        self.features
    }
}

/// The worker an event goes to: the one that holds its key's current value.
pub fn route<E: UpsertEvent>(event: &E) -> u64 {
    event.key().hashed().into()
}

/// A value with the version of the event that set it.
type Versioned<E> = (<E as UpsertEvent>::Version, <E as UpsertEvent>::Value);

/// What one epoch's events do to the keys they set.
#[derive(Debug)]
pub struct EpochUpserts<E: UpsertEvent> {
    /// For each key set, the value of its last event that was not stale (`None` when that
    /// event deletes the key).
    pub latest: FxHashMap<E::Key, Option<E::Value>>,
    /// How many events were stale.
    pub stale: usize,
}

/// Reduces an epoch's `events` to the last one per key, in read order. `current(key)` is the
/// version of the key's value before the epoch, if it has one.
pub fn resolve_epoch<E: UpsertEvent>(
    mut events: Vec<E>,
    current: impl Fn(&E::Key) -> Option<E::Version>,
) -> EpochUpserts<E> {
    // Stable sort: the read order within a partition is kept.
    events.sort_by_key(UpsertEvent::position);
    let mut stale = 0;
    // Fx, not SipHash: keys come from our own topics (user keys are xxh3 hashes already).
    // Sized for every event at once: grown from empty, it rehashed every entry several times
    // an epoch.
    let mut latest: FxHashMap<E::Key, Option<Versioned<E>>> =
        FxHashMap::with_capacity_and_hasher(events.len(), Default::default());
    for event in events {
        let version = match latest.get(event.key()) {
            Some(value) => value.as_ref().map(|(version, _)| *version),
            None => current(event.key()),
        };
        if version.is_some_and(|version| event.version() < version) {
            stale += 1;
            continue;
        }
        let key = event.key().clone();
        let version = event.version();
        latest.insert(key, event.into_value().map(|value| (version, value)));
    }
    let latest = latest
        .into_iter()
        .map(|(key, value)| (key, value.map(|(_, value)| value)))
        .collect();
    EpochUpserts { latest, stale }
}
