//! The dataflow itself, in one place: profile events and feature events meet in one operator
//! that keeps every user's output current and emits, per epoch, the outputs that changed.
//!
//! ```text
//! profile events ──exchange by user──┐
//!                                     ├─ InterestProfiles ─▶ changes: user → (Profile, sums)
//! feature events ──broadcast──────────┘    (per worker: its users, every item's features)
//! ```
//!
//! Profiles are partitioned by user; feature events go to every worker, which all apply them
//! in the same read order, so each holds the whole feature table and a history finds its
//! features locally. Once both inputs have passed an epoch, the operator applies the epoch's
//! events as upserts (latest wins, see [`resolve_epoch`]) to its [`Holdings`], recomputes the
//! sums of each user whose profile changed (O(history)) and of each local holder of an item
//! whose features changed (O(holders), through the holders index), and emits, for each user
//! whose output changed, the retraction of the old output and the insertion of the new one.
//!
//! The interest vector of semantics §5 is a ratio of two sums over the history, so each user's
//! output carries those sums (see [`Contribution`](crate::model::Contribution)) as fixed-point
//! integers: the same bits on any number of workers. Floats enter only when an epoch's final
//! sums are turned into a vector, in [`crate::output`].
//!
//! This replaces arranging every history position by item and joining it with the features:
//! about 50 arranged records per message, each turned into a sum record, consolidated and
//! reduced per user. A differential arrangement of the features, read through its cursor,
//! was measured as a stand-in for the feature table: ~190 ns a lookup, sorted by key per epoch,
//! against ~8 ns for the table's by-index load, too slow for 50 lookups a message.

use std::cell::RefCell;
use std::rc::Rc;

use differential_dataflow::{AsCollection, VecCollection};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::Operator;
use timely::dataflow::Stream;
use timely::progress::Antichain;

use crate::holdings::Holdings;
use crate::model::{FeatureEvent, IdKey, Profile, ProfileEvent};
use crate::pending::PendingEpochs;
use crate::stats::StatsBoard;
use crate::upsert::{resolve_epoch, route};

/// The parameters of the interest vector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InterestParams {
    /// Feature dimension D.
    pub dim: usize,
    /// Recency decay (semantics §5).
    pub decay: f64,
}

/// A user's profile with the sums its interest vector is made of (see
/// [`Contribution`](crate::model::Contribution)), keyed by the user's [`IdKey`].
pub type ProfileChange = (IdKey, (Profile, Vec<isize>));

/// What the interest operator holds back until its epoch is complete.
#[derive(Debug)]
enum Pending {
    Profile(ProfileEvent),
    Features(FeatureEvent),
}

/// Builds the dataflow from the two event streams; the result changes, at each epoch, exactly
/// for the users whose profile or interest vector changed in that epoch.
pub fn interest_profiles<'scope>(
    profile_events: Stream<'scope, u64, Vec<ProfileEvent>>,
    feature_events: Stream<'scope, u64, Vec<FeatureEvent>>,
    params: InterestParams,
    stats: Rc<RefCell<StatsBoard>>,
) -> VecCollection<'scope, u64, ProfileChange, isize> {
    profile_events
        .binary_frontier(
            // Feature events are few next to profile messages: every worker gets them all, and
            // applies them in the same read order, so each holds the same feature table.
            feature_events.broadcast(),
            Exchange::new(route::<ProfileEvent>),
            Pipeline,
            "InterestProfiles",
            move |_capability, _info| {
                let mut holdings = Holdings::new(params);
                let mut pending = PendingEpochs::<Pending>::default();
                move |(profiles, profiles_frontier), (features, features_frontier), output| {
                    // Input events carry no time of their own: they are at their batch's stamp.
                    profiles.for_each(|capability, data| {
                        if let Some(capability) = capability.retain_least(0) {
                            pending
                                .at(*capability.time(), || capability)
                                .extend(data.drain(..).map(Pending::Profile));
                        }
                    });
                    features.for_each(|capability, data| {
                        if let Some(capability) = capability.retain_least(0) {
                            pending
                                .at(*capability.time(), || capability)
                                .extend(data.drain(..).map(Pending::Features));
                        }
                    });
                    // An epoch is complete once neither input can bring more of it.
                    let mut frontier = Antichain::new();
                    for time in profiles_frontier
                        .frontier()
                        .iter()
                        .chain(features_frontier.frontier().iter())
                    {
                        frontier.insert(*time);
                    }
                    while let Some((capability, inputs)) = pending.take_complete(frontier.borrow())
                    {
                        let epoch = *capability.time();
                        let (mut profile_events, mut feature_events) = (Vec::new(), Vec::new());
                        for input in inputs {
                            match input {
                                Pending::Profile(event) => profile_events.push(event),
                                Pending::Features(event) => feature_events.push(event),
                            }
                        }
                        let profiles =
                            resolve_epoch(profile_events, |user_id| holdings.timestamp(user_id));
                        if profiles.stale > 0 {
                            stats.borrow_mut().epoch(epoch).stale += profiles.stale as u64;
                        }
                        // Feature events are never stale: the current value's version is moot.
                        let features = resolve_epoch(feature_events, |_| None);
                        let mut session = output.session(&capability);
                        holdings.apply_epoch(
                            features.latest,
                            profiles.latest.into_values().flatten(),
                            |change, diff| session.give((change, epoch, diff)),
                        );
                    }
                }
            },
        )
        .as_collection()
}
