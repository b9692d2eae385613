//! The dataflow, in one function that every driver (Kafka in `run.rs`, in memory in `in_memory.rs`)
//! builds:
//!
//! ```text
//! profile events ─exchange by user─▶ upsert ─▶ profile arrangement (user → profile) ──┐
//!                                                                                       ├─▶ interest collection ─▶ encode ─▶ writer ─▶ probe
//! feature events ─exchange by item─▶ upsert ─▶ features arrangement (item → features) ─changes, broadcast┘
//! ```
//!
//! With recommendations on, the interest collection also feeds the co-visitation collections
//! and the scores ([`crate::recommend`]), whose lists and `popular_items` join the values the
//! writer stores.
//!
//! The two arrangements hold the state (see [`crate::state`]); the interest operator reads
//! their batches, keeps the feature cache and the holders index beside them, and maintains the
//! interest collection, each user's output as a domain value, updated per epoch for the users
//! whose output changed; the sink's stages encode its new values and store each complete epoch,
//! releasing its time only once it is durable, so the probe after it tells the driver which
//! epochs' input offsets may be committed.

use std::cell::RefCell;
use std::rc::Rc;

use differential_dataflow::VecCollection;
use timely::dataflow::Stream;

use crate::checkpoint::take::StateHandles;
use crate::interest::{interest_profiles, InterestParams};
use crate::model::{FeatureEvent, ProfileEvent, UserInterest};
use crate::output::{encode_outputs, write_epochs, EpochWriter, PlainWrites, WriterThread};
use crate::recommend::covisit::covisitation;
use crate::recommend::scores::{
    encode_recommendations, popular_items, popular_order, recommendations,
};
use crate::state::features::{arrange_features, feature_changes};
use crate::state::items::ItemTable;
use crate::state::profiles::arrange_profiles;
use crate::state::users::UserTable;
use crate::stats::StatsBoard;
use timely::dataflow::operators::Concat;

/// What the writer stage needs besides the values.
#[derive(Debug)]
pub struct WriterSetup<W> {
    pub writer: W,
    /// When values may go plain (see [`PlainWrites`]).
    pub plain_writes: PlainWrites,
    /// The epoch length, to measure each epoch's latency from its end; `None` in memory.
    pub epoch_ms: Option<u64>,
}

/// The recommendations' settings (semantics §8), when they are on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecommendSetup {
    pub covisit: crate::recommend::covisit::CovisitParams,
    pub scores: crate::recommend::scores::ScoreParams,
}

/// What the dataflow computes and keeps besides the profiles.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Options {
    /// With recommendations, their settings.
    pub recommend: Option<RecommendSetup>,
    /// Whether to return handles to the state, for checkpoints.
    pub keep_state: bool,
}

/// What [`build`] returns to its driver.
pub struct Built<'scope> {
    /// The interest collection: every local user's current output, as (user's value, epoch,
    /// ±1) updates. Other operators of the dataflow may read it; the sink's stages do.
    pub interests: VecCollection<'scope, u64, UserInterest, isize>,
    /// The number of each epoch written, once it is durable on this worker, for a probe.
    pub written: Stream<'scope, u64, Vec<u64>>,
    /// The writer's thread, which the driver joins when it stops.
    pub writer_thread: WriterThread,
    /// With checkpoints, handles to the state they read (see [`crate::checkpoint::take`]).
    pub state: Option<StateHandles>,
}

impl std::fmt::Debug for Built<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built")
            .field("writer_thread", &self.writer_thread)
            .finish_non_exhaustive()
    }
}

/// Builds the dataflow on the three input streams: profile events, feature events, and each
/// worker's index at the epoch it caught up with the read marks (see [`crate::catch_up`]).
/// With `options.keep_state`, returns handles to the state for checkpoints.
pub fn build<'scope, W: EpochWriter>(
    profile_events: Stream<'scope, u64, Vec<ProfileEvent>>,
    feature_events: Stream<'scope, u64, Vec<FeatureEvent>>,
    caught_up: Stream<'scope, u64, Vec<u64>>,
    params: InterestParams,
    options: Options,
    writer: WriterSetup<W>,
    stats: Rc<RefCell<StatsBoard>>,
) -> Built<'scope> {
    // The item table is shared by the profile upsert, which interns each history's items,
    // and the interest operator, which keeps its feature cache: both run on this worker's
    // thread.
    let items = Rc::new(RefCell::new(ItemTable::new(params.dim)));
    // So is the user table: the upsert adds each new user, with its id.
    let users = Rc::new(RefCell::new(UserTable::default()));
    let profiles = arrange_profiles(profile_events, items.clone(), users.clone(), stats.clone());
    let features = arrange_features(feature_events);
    let changes = feature_changes(&features);
    let state = options.keep_state.then(|| StateHandles {
        profiles: profiles.trace.clone(),
        features: features.trace.clone(),
        items: items.clone(),
        users: users.clone(),
    });
    let interests = interest_profiles(&profiles, changes, items, users, params);
    // Otherwise the handles returned with the arrangements are dropped here, so that they hold
    // no compaction back; an operator that reads a trace keeps a handle of its own.
    let mut values = encode_outputs(interests.clone());
    if let Some(setup) = options.recommend {
        // Each changed user's fresh list and, from worker 0, popular_items when it changes: to
        // Redis with the profiles of the same epoch.
        // Their operators add what each epoch cost to the worker's stats board.
        let covisitation = covisitation(&interests, setup.covisit, &stats);
        // One popularity order serves both the fill-up and popular_items.
        let order = popular_order(
            &covisitation.item_users,
            profile::POPULAR_ITEMS.max(setup.scores.popularity_len()),
        );
        let lists = encode_recommendations(recommendations(
            &interests,
            &covisitation,
            &order,
            setup.scores,
            &stats,
        ));
        let popular = popular_items(&order, profile::POPULAR_ITEMS);
        values = values.concat(lists).concat(popular);
    }
    let (written, writer_thread) = write_epochs(
        values,
        caught_up,
        writer.plain_writes,
        writer.epoch_ms,
        writer.writer,
        stats,
    );
    Built {
        interests,
        written,
        writer_thread,
        state,
    }
}
