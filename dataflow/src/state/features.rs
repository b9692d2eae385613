//! The features arrangement: each item's current features, keyed by item (semantics §3). The
//! source of truth for features: the features file enters it at the first epoch, the
//! `item_features` topic after, and a `null` deletes the item's features, as a retraction.
//!
//! The arrangement is partitioned by item like any other, so a process holds one copy of it
//! whatever its number of workers (every worker arranging the whole collection cost 46 MB a
//! worker at 200,000 items, D = 32, and put the full-scale run over 1 GB). But every worker
//! needs every item's features, since a history's items are anywhere: the arrangement's
//! changes, which are few next to profile messages, are broadcast ([`feature_changes`]) and
//! each worker keeps its dense feature cache from them. Within an epoch the event read last
//! wins; features have no version, so none is stale.

use differential_dataflow::operators::arrange::Arranged;
use differential_dataflow::trace::{Cursor, Navigable};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::Operator;
use timely::dataflow::Stream;

use serde::{Deserialize, Serialize};

use crate::model::{id_key, FeatureEvent, FeatureVector, IdKey};
use crate::upsert::{arrange_upserts, value_as_of, Prior, Update, UpsertTrace};

/// An item's current features as the arrangement holds them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FeatureState {
    /// The item's id (the arrangement's key is its hash).
    pub item_id: String,
    pub features: FeatureVector,
}

/// The features arrangement's trace.
pub type FeatureTrace = UpsertTrace<IdKey, FeatureState>;

/// A change of an item's features: its new features, or `None` once it has none.
pub type FeatureChange = (IdKey, Option<FeatureState>);

/// Arranges the feature events by item.
pub fn arrange_features<'scope>(
    events: Stream<'scope, u64, Vec<FeatureEvent>>,
) -> Arranged<'scope, FeatureTrace> {
    arrange_upserts(
        events,
        Exchange::new(|event: &FeatureEvent| id_key(&event.item_id) as u64),
        "FeatureArrangement",
        settle_features,
    )
}

/// Every change of the features arrangement, on every worker, at its epoch.
pub fn feature_changes<'scope>(
    features: &Arranged<'scope, FeatureTrace>,
) -> Stream<'scope, u64, Vec<FeatureChange>> {
    features
        .stream
        .clone()
        .unary(Pipeline, "FeatureChanges", |_, _| {
            move |input, output| {
                input.for_each(|capability, spans| {
                    let mut session = output.session(&capability);
                    for batch in spans.drain(..).filter_map(|span| span.inner) {
                        let mut cursor = batch.cursor();
                        while let Some(&key) = cursor.get_key(&batch) {
                            // Every update of the batch counts (it holds one epoch); a key
                            // with only a retraction lost its features.
                            let features = value_as_of(&mut cursor, &batch, u64::MAX).cloned();
                            session.give((key, features));
                            cursor.step_key(&batch);
                        }
                    }
                });
            }
        })
        .broadcast()
}

/// Applies one complete epoch's feature events, the last one read of each item winning, to the
/// current features in `prior`.
fn settle_features(
    epoch: u64,
    events: Vec<FeatureEvent>,
    prior: &mut Prior<IdKey, FeatureState>,
    updates: &mut Vec<Update<IdKey, FeatureState>>,
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
