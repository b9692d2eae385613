//! The dataflow itself, in one place: inputs → upsert → arrange → join → reduce → per-epoch
//! output.
//!
//! ```text
//! profile events ─upsert─▶ profiles (user → Profile) ──────────────────────────────┐
//!                              │ flat_map: (item → (user, k)) ─arrange─┐            │
//! feature events ─upsert─▶ features (item → x) ────────────arrange────┴─join─▶     │
//!        contributions (user, decay^k·x as fixed-point sums) ─┬─count_total─▶ sums ─join─▶ changes
//!        profiles ─explode: (user, [1, 0, …])─────────────────┘
//! ```
//!
//! The interest vector of semantics §5 is a ratio of two sums over the history, so it is kept as
//! those sums, carried as the *difference* of each user's record: a new message retracts its old
//! history's contributions and adds the new ones (O(history)); a feature update retracts and
//! re-adds the contribution of each holder of the item (O(holders)). Floats enter only when an
//! epoch's final sums are turned into a vector, after every join.

use std::cell::RefCell;
use std::rc::Rc;

use differential_dataflow::operators::count::CountTotal;
use differential_dataflow::VecCollection;
use timely::dataflow::Stream;

use crate::model::{id_key, Contribution, FeatureEvent, IdKey, Profile, ProfileEvent};
use crate::stats::StatsBoard;
use crate::upsert::upsert;

/// The parameters of the interest vector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InterestParams {
    /// Feature dimension D.
    pub dim: usize,
    /// Recency decay (semantics §5).
    pub decay: f64,
}

/// A user's profile with the sums its interest vector is made of (see [`Contribution`]), keyed
/// by the user's [`IdKey`].
pub type ProfileChange = (IdKey, (Profile, Vec<isize>));

/// Builds the dataflow from the two event streams; the result changes, at each epoch, exactly
/// for the users whose profile or interest vector changed in that epoch.
pub fn interest_profiles<'scope>(
    profile_events: Stream<'scope, u64, Vec<ProfileEvent>>,
    feature_events: Stream<'scope, u64, Vec<FeatureEvent>>,
    params: InterestParams,
    stats: Rc<RefCell<StatsBoard>>,
) -> VecCollection<'scope, u64, ProfileChange, isize> {
    let InterestParams { dim, decay } = params;

    let profiles = upsert(profile_events, "UpsertProfiles", move |epoch, stale| {
        stats.borrow_mut().epoch(epoch).stale += stale as u64;
    })
    .map(|(user_id, profile)| (id_key(&user_id), profile));
    let features_by_item = upsert(feature_events, "UpsertFeatures", |_, _| {})
        .map(|(item_id, features)| (id_key(&item_id), features))
        .arrange_by_key_named("FeaturesByItem");

    // Every history position, keyed by item: k is the distance from the newest item.
    let holdings_by_item = profiles
        .clone()
        .flat_map(|(user, profile)| {
            let newest = profile.history_items.len().saturating_sub(1);
            let items: Vec<IdKey> = profile
                .history_items
                .iter()
                .map(|item| id_key(item))
                .collect();
            items
                .into_iter()
                .enumerate()
                .map(move |(i, item)| (item, (user, (newest - i) as u32)))
        })
        .arrange_by_key_named("HoldingsByItem");

    // A message adds up to 50 contributions for one user; summing them within each batch before
    // they are exchanged and arranged by user leaves about one record per user.
    let contributions = holdings_by_item
        .join_core(features_by_item, move |_item, (user, k), features| {
            Some((*user, Contribution::item(*k, decay, features)))
        })
        .explode(|(user, sums)| Some((user, sums)))
        .consolidate_stream();
    let presence = profiles
        .clone()
        .explode(move |(user, _profile)| Some((user, Contribution::profile(dim))));
    let sums = contributions.concat(presence).count_total();

    profiles.join(sums)
}
