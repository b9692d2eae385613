//! The features arrangement: each item's current features, keyed by item (semantics §3). The
//! source of truth for features: the features file enters it at the first epoch, the
//! `item_features` topic after, and a `null` deletes the item's features, as a retraction.
//!
//! Feature events are few next to profile messages, and every worker needs every item's
//! features (a history's items are anywhere): the events are broadcast and each worker
//! arranges all of them. Within an epoch the event read last wins; features have no version,
//! so none is stale.

use differential_dataflow::operators::arrange::Arranged;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::Stream;

use crate::model::{id_key, FeatureEvent, FeatureVector};
use crate::upsert::{arrange_upserts, Prior, Update, UpsertTrace};

/// An item's current features as the arrangement holds them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FeatureState {
    /// The item's id (the arrangement's key is its hash).
    pub item_id: String,
    pub features: FeatureVector,
}

/// The features arrangement's trace.
pub type FeatureTrace = UpsertTrace<FeatureState>;

/// Arranges the feature events by item, the whole collection on every worker.
pub fn arrange_features<'scope>(
    events: Stream<'scope, u64, Vec<FeatureEvent>>,
) -> Arranged<'scope, FeatureTrace> {
    arrange_upserts(
        events.broadcast(),
        Pipeline,
        "FeatureArrangement",
        settle_features,
    )
}

/// Applies one complete epoch's feature events, the last one read of each item winning, to the
/// current features in `prior`.
fn settle_features(
    epoch: u64,
    events: Vec<FeatureEvent>,
    prior: &mut Prior<FeatureState>,
    updates: &mut Vec<Update<FeatureState>>,
) {
    let mut events: Vec<_> = events
        .into_iter()
        .map(|event| (id_key(&event.item_id), event))
        .collect();
    events.sort_unstable_by_key(|(key, event)| (*key, event.position));
    let mut events = events.into_iter().peekable();
    while let Some((key, event)) = events.next() {
        if events.peek().is_some_and(|(next, _)| *next == key) {
            continue;
        }
        let current = prior.get(key, epoch);
        let new = event.features.map(|features| FeatureState {
            item_id: event.item_id,
            features,
        });
        if current == new {
            continue;
        }
        if let Some(current) = current {
            updates.push(((key, current), epoch, -1));
        }
        if let Some(new) = new {
            updates.push(((key, new), epoch, 1));
        }
    }
}
