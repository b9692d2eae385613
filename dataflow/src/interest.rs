//! The dataflow itself, in one place: profile events and feature events meet in one operator
//! that keeps every user's output current and emits, per epoch, the outputs that changed.
//!
//! ```text
//! profile events ──exchange by user──┐
//!                                     ├─ InterestProfiles ─▶ outputs: each changed user's new value
//! feature events ──broadcast──────────┘    (per worker: its users, every item's features)
//! ```
//!
//! Profiles are partitioned by user; feature events go to every worker, which all apply them
//! in the same read order, so each holds the whole feature table and a history finds its
//! features locally. Once both inputs have passed an epoch, the operator applies the epoch's
//! events as upserts (latest wins, see [`resolve_epoch`]) to its [`Holdings`], recomputes the
//! vector of each user whose profile changed (O(history)) and of each local holder of an item
//! whose features changed (O(holders), through the holders index), and emits, at the epoch's
//! time, the new value of each user whose output changed: one per user, already final, so the
//! writer needs no consolidation. It does so a slice of `PROFILES_PER_ACTIVATION` (1,024)
//! profiles at a time (the epoch's features first, the holders of changed items last) and
//! yields between slices, so that the writer stores one slice while the next is computed.
//!
//! The operator's output is an upsert stream (a key's new value, no retraction) because its
//! one reader, the Redis writer, wants exactly that; a retraction of the old value would cost
//! rebuilding it (50 item ids) only to cancel it out again.
//!
//! This replaces arranging every history position by item and joining it with the features:
//! about 50 arranged records per message, each turned into a sum record, consolidated and
//! reduced per user. A differential arrangement of the features, read through its cursor,
//! was measured as a stand-in for the feature table: ~190 ns a lookup, sorted by key per epoch,
//! against ~8 ns for the table's by-index load, too slow for 50 lookups a message.

use std::cell::RefCell;
use std::rc::Rc;

use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;
use timely::progress::Antichain;

use crate::holdings::{EpochInProgress, Holdings};
use crate::model::{EncodedProfile, FeatureEvent, Profile, ProfileEvent};
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

/// What the interest operator holds back until its epoch is complete.
#[derive(Debug)]
enum Pending {
    Profile(ProfileEvent),
    Features(FeatureEvent),
}

/// Builds the dataflow from the two event streams; at each epoch, the result holds the new output
/// of exactly the users whose profile or interest vector changed in that epoch, once each.
pub fn interest_profiles<'scope>(
    profile_events: Stream<'scope, u64, Vec<ProfileEvent>>,
    feature_events: Stream<'scope, u64, Vec<FeatureEvent>>,
    params: InterestParams,
    stats: Rc<RefCell<StatsBoard>>,
) -> Stream<'scope, u64, Vec<EncodedProfile>> {
    let scope = profile_events.scope();
    profile_events.binary_frontier(
        // Feature events are few next to profile messages: every worker gets them all, and
        // applies them in the same read order, so each holds the same feature table.
        feature_events.broadcast(),
        Exchange::new(route::<ProfileEvent>),
        Pipeline,
        "InterestProfiles",
        move |_capability, info| {
            let activator = scope.activator_for(info.address.clone());
            let mut holdings = Holdings::new(params);
            let mut pending = PendingEpochs::<Pending>::default();
            let mut in_progress: Option<InProgress> = None;
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
                let mut budget = PROFILES_PER_ACTIVATION;
                loop {
                    let current = match &mut in_progress {
                        Some(current) => current,
                        None => {
                            let Some((capability, inputs)) =
                                pending.take_complete(frontier.borrow())
                            else {
                                break;
                            };
                            in_progress.insert(begin(capability, inputs, &mut holdings, &stats))
                        }
                    };
                    let epoch = *current.capability.time();
                    let mut session = output.session(&current.capability);
                    let slice = budget.min(current.profiles.len());
                    holdings.apply_profiles(
                        &mut current.work,
                        epoch,
                        current.profiles.by_ref().take(slice),
                        |output| session.give(output),
                    );
                    budget -= slice;
                    if current.profiles.len() == 0 {
                        let work = std::mem::take(&mut current.work);
                        holdings.finish_epoch(work, epoch, |output| session.give(output));
                        drop(session);
                        in_progress = None;
                    }
                    if budget == 0 {
                        // The rest next time: meanwhile the writer gets this slice and the
                        // worker reads Kafka.
                        activator.activate();
                        break;
                    }
                }
            }
        },
    )
}

/// How many profiles the operator applies before it yields. An epoch of a catching-up worker
/// holds tens of thousands: applied in one go, they would reach the Redis writer only at the
/// end, and the worker would read nothing meanwhile. In slices, the writer stores each slice
/// while the next one is computed, and the worker polls Kafka between them.
const PROFILES_PER_ACTIVATION: usize = 1024;

/// A complete epoch being applied, a slice of profiles at a time.
struct InProgress {
    capability: Capability<u64>,
    /// The epoch's profiles still to apply.
    profiles: std::vec::IntoIter<Profile>,
    work: EpochInProgress,
}

/// Resolves a complete epoch's events (latest wins) and applies its features, which come before
/// its profiles.
fn begin(
    capability: Capability<u64>,
    inputs: Vec<Pending>,
    holdings: &mut Holdings,
    stats: &RefCell<StatsBoard>,
) -> InProgress {
    let epoch = *capability.time();
    let (mut profile_events, mut feature_events) = (Vec::new(), Vec::new());
    for input in inputs {
        match input {
            Pending::Profile(event) => profile_events.push(event),
            Pending::Features(event) => feature_events.push(event),
        }
    }
    let profiles = resolve_epoch(profile_events, |&user_key| holdings.timestamp(user_key));
    if profiles.stale > 0 {
        stats.borrow_mut().epoch(epoch).stale += profiles.stale as u64;
    }
    // Feature events are never stale: the current value's version is moot.
    let features = resolve_epoch(feature_events, |_| None);
    let work = holdings.begin_epoch(features.latest);
    let profiles: Vec<Profile> = profiles.latest.into_values().flatten().collect();
    InProgress {
        capability,
        profiles: profiles.into_iter(),
        work,
    }
}
