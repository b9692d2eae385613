//! The interest operator: reads the profile and features arrangements' batches and emits, per
//! epoch, the new output of every local user whose profile or interest vector changed in it
//! (semantics §5).
//!
//! Once both arrangements have passed an epoch, the operator applies the epoch's feature
//! changes to the dense feature cache and collects the holders of each changed item (through
//! the holders index); then, for each user in the epoch's profile batch, it computes the new
//! profile's vector from the cache (O(history)) and emits it; last, it recomputes each holder
//! of a changed item whose profile did not change, reading its profile as of the epoch from
//! the profile arrangement's trace, and emits those whose output moved. A user's output is
//! final when emitted: one per user and epoch, so the writer needs no consolidation.
//!
//! The profiles are applied a slice of [`PROFILES_PER_ACTIVATION`] users at a time, and the
//! operator yields between slices, so that the writer stores one slice while the next is
//! computed.
//!
//! Two structures here are hand-made rather than arrangements, where measurements said so:
//! - the feature cache (in the item table): the vector reads 50 features a message, ~8 ns each
//!   by index from a dense array, against ~190 ns a lookup through an arrangement's cursor;
//! - the holders index (see `state/holders.rs`): an arrangement of (item, user) pairs cost
//!   +4–5 µs a message.
//!
//! A user's interest vector is recomputed from scratch, from its history in history order, by
//! [`profile::interest_vector`]: one worker holds the whole of a user, so the sum runs in one
//! fixed order and the bits are the same on any number of workers and processes.

use std::cell::RefCell;
use std::rc::Rc;

use differential_dataflow::operators::arrange::Arranged;
use differential_dataflow::trace::{Cursor, Navigable, TraceReader};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;
use timely::progress::Antichain;

use crate::model::EncodedProfile;
use crate::pending::PendingEpochs;
use crate::state::features::FeatureChange;
use crate::state::holders::HoldersIndex;
use crate::state::items::{ItemIndex, ItemTable};
use crate::state::profiles::{ProfileState, ProfileTrace};
use crate::state::users::{UserIndex, UserTable};
use crate::upsert::{value_as_of, Prior, UpsertBatch};
use sink::ProfileRecord;

/// The parameters of the interest vector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InterestParams {
    /// Feature dimension D.
    pub dim: usize,
    /// Recency decay (semantics §5).
    pub decay: f64,
}

/// How many profiles the operator applies before it yields. An epoch of a catching-up worker
/// holds tens of thousands: applied in one go, they would reach the Redis writer only at the
/// end, and the worker would read nothing meanwhile. In slices, the writer stores each slice
/// while the next one is computed, and the worker polls Kafka between them.
pub const PROFILES_PER_ACTIVATION: usize = 1024;

/// What reached the operator, held until its epoch is complete.
enum Arrived {
    Profiles(UpsertBatch<UserIndex, ProfileState>),
    Features(FeatureChange),
}

type ProfileCursor = <UpsertBatch<UserIndex, ProfileState> as Navigable>::Cursor;

/// A complete epoch being applied, a slice of profiles at a time.
struct InProgress {
    capability: Capability<u64>,
    /// The epoch's profile batches still to read, and the cursor into the first.
    profiles: Vec<UpsertBatch<UserIndex, ProfileState>>,
    cursor: Option<ProfileCursor>,
    /// Users that held an item whose features changed, and so may have a new vector.
    recompute: Vec<UserIndex>,
    /// Users whose profile changed, emitted already.
    changed: Vec<UserIndex>,
    /// Items whose features were deleted: released at the end if nothing holds them.
    deleted: Vec<ItemIndex>,
}

/// What the operator keeps on one worker besides the shared item table.
struct InterestState {
    params: InterestParams,
    items: Rc<RefCell<ItemTable>>,
    users: Rc<RefCell<UserTable>>,
    holders: HoldersIndex,
    /// A handle to the profile trace, for the profiles of holders: it holds compaction back to
    /// the epoch the operator reads.
    profiles: ProfileTrace,
}

/// Builds the interest operator on the two arrangements; at each epoch, the result holds the
/// new output of exactly the users whose profile or interest vector changed in that epoch,
/// once each, encoded as its Redis value (semantics §6).
pub fn interest_profiles<'scope>(
    profiles: &Arranged<'scope, ProfileTrace>,
    features: Stream<'scope, u64, Vec<FeatureChange>>,
    items: Rc<RefCell<ItemTable>>,
    users: Rc<RefCell<UserTable>>,
    params: InterestParams,
) -> Stream<'scope, u64, Vec<EncodedProfile>> {
    let scope = profiles.stream.scope();
    let trace = profiles.trace.clone();
    profiles.stream.clone().binary_frontier(
        features,
        Pipeline,
        Pipeline,
        "Interest",
        move |_capability, info| {
            let activator = scope.activator_for(info.address.clone());
            let mut state = InterestState {
                params,
                items,
                users,
                holders: HoldersIndex::default(),
                profiles: trace,
            };
            let mut pending = PendingEpochs::<Arrived>::default();
            let mut in_progress: Option<InProgress> = None;
            move |(profiles, profiles_frontier), (features, features_frontier), output| {
                profiles.for_each(|capability, data| {
                    if let Some(capability) = capability.retain_least(0) {
                        let batches = data.drain(..).filter_map(|span| span.inner);
                        pending
                            .at(*capability.time(), || capability)
                            .extend(batches.map(Arrived::Profiles));
                    }
                });
                features.for_each(|capability, data| {
                    if let Some(capability) = capability.retain_least(0) {
                        pending
                            .at(*capability.time(), || capability)
                            .extend(data.drain(..).map(Arrived::Features));
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
                            let Some((capability, arrived)) =
                                pending.take_complete(frontier.borrow())
                            else {
                                break;
                            };
                            in_progress.insert(state.begin(capability, arrived))
                        }
                    };
                    let capability = current.capability.clone();
                    let mut session = output.session(&capability);
                    let done =
                        state.apply_profiles(current, &mut budget, |output| session.give(output));
                    if done {
                        if let Some(finished) = in_progress.take() {
                            state.finish(finished, |output| session.give(output));
                        }
                    }
                    drop(session);
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

impl InterestState {
    /// Starts applying a complete epoch: its feature changes, which therefore come before every
    /// profile of the epoch.
    fn begin(&mut self, capability: Capability<u64>, arrived: Vec<Arrived>) -> InProgress {
        let mut work = InProgress {
            capability,
            profiles: Vec::new(),
            cursor: None,
            recompute: Vec::new(),
            changed: Vec::new(),
            deleted: Vec::new(),
        };
        // Every list complete before it is read (nothing is held back between epochs).
        let users = self.users.borrow();
        self.holders.apply(&users);
        let mut items = self.items.borrow_mut();
        for arrived in arrived {
            let (key, features) = match arrived {
                Arrived::Profiles(batch) => {
                    work.profiles.push(batch);
                    continue;
                }
                Arrived::Features(change) => change,
            };
            let item = match &features {
                Some(value) => Some(items.intern(key, &value.item_id)),
                None => items.find(key),
            };
            if let Some(item) = item {
                if items.set_features(item, features.as_ref().map(|value| &value.features)) {
                    work.recompute
                        .extend(self.holders.current_holders(item, &users));
                }
                if features.is_none() {
                    work.deleted.push(item);
                }
            }
        }
        work
    }

    /// Applies up to `budget` of the epoch's profiles, emitting each changed user's output, and
    /// takes what it applied from the budget. Returns whether every profile is applied.
    fn apply_profiles(
        &mut self,
        work: &mut InProgress,
        budget: &mut usize,
        mut emit: impl FnMut(EncodedProfile),
    ) -> bool {
        let epoch = *work.capability.time();
        let items = self.items.borrow();
        let mut users = self.users.borrow_mut();
        while let Some(batch) = work.profiles.last() {
            let cursor = work.cursor.get_or_insert_with(|| batch.cursor());
            while let Some(&user) = cursor.get_key(batch) {
                if *budget == 0 {
                    return false;
                }
                *budget -= 1;
                // A profile is never deleted: every changed user has a new value.
                if let Some(profile) = value_as_of(cursor, batch, epoch) {
                    let version = users.new_version(user);
                    self.holders.join(user, version, &profile.history);
                    let vector = interest_vector(&items, &profile.history, self.params);
                    users.set_output(user, fingerprint(&vector));
                    encode(&items, users.id(user), profile, &vector, epoch, &mut emit);
                    work.changed.push(user);
                    if self.holders.is_full() {
                        self.holders.apply(&users);
                    }
                }
                cursor.step_key(batch);
            }
            work.profiles.pop();
            work.cursor = None;
        }
        true
    }

    /// Ends the epoch: every holder of an item whose features changed, and whose profile did
    /// not (it was emitted already), is emitted if its vector or known items changed. Then the
    /// holders lists take the epoch's joins, and items nothing needs any more are released.
    fn finish(&mut self, work: InProgress, mut emit: impl FnMut(EncodedProfile)) {
        let epoch = *work.capability.time();
        let InProgress {
            mut changed,
            mut recompute,
            deleted,
            ..
        } = work;
        changed.sort_unstable();
        recompute.sort_unstable();
        recompute.dedup();
        recompute.retain(|user| changed.binary_search(user).is_err());
        let mut users = self.users.borrow_mut();
        if !recompute.is_empty() {
            #[allow(clippy::expect_used)]
            let batches = self
                .profiles
                .batches_through(Antichain::new().borrow())
                .expect("the interest operator holds compaction back to its epoch");
            let mut prior = Prior::new(batches);
            let items = self.items.borrow();
            // Sorted: the cursor moves forward only.
            for user in recompute {
                let Some(profile) = prior.get(user, epoch) else {
                    continue;
                };
                let vector = interest_vector(&items, &profile.history, self.params);
                if users.set_output(user, fingerprint(&vector)) {
                    encode(&items, users.id(user), &profile, &vector, epoch, &mut emit);
                }
            }
        }
        self.holders.apply(&users);
        let mut items = self.items.borrow_mut();
        let holders = &mut self.holders;
        items.release_unused(epoch, |item| holders.release(item));
        for item in deleted {
            items.release_if_unused(item, epoch, &mut |item| holders.release(item));
        }
        // Nothing reads this epoch's profiles again: the trace may merge them into the next.
        let next = Antichain::from_elem(epoch + 1);
        self.profiles.set_logical_compaction(next.borrow());
        self.profiles.set_physical_compaction(next.borrow());
    }
}

/// The interest vector of `history` with the cached features.
fn interest_vector(
    items: &ItemTable,
    history: &[ItemIndex],
    params: InterestParams,
) -> profile::InterestVector {
    // The features of a history are rows (of two cache lines at D = 32) scattered over a table
    // larger than the caches: touched first, their misses overlap, and the formula finds them
    // in L1 (see `cargo bench -p streamrec-dataflow --bench vector`). The ids' lines too, for
    // the encoding that follows.
    items.touch_rows(history);
    profile::interest_vector(
        history.iter().map(|&item| items.features(item)),
        params.dim,
        params.decay,
    )
}

/// Encodes a user's value of `epoch` (semantics §6) for `emit`.
fn encode(
    items: &ItemTable,
    user_id: &str,
    profile: &ProfileState,
    vector: &profile::InterestVector,
    epoch: u64,
    emit: &mut impl FnMut(EncodedProfile),
) {
    let history: Vec<&str> = profile.history.iter().map(|&item| items.id(item)).collect();
    let record = ProfileRecord {
        user_id,
        timestamp: profile.timestamp,
        history_items: &history,
        interest_vector: &vector.vector,
        known_items: vector.known_items,
        epoch,
    };
    match EncodedProfile::encode(&record) {
        Ok(encoded) => emit(encoded),
        // Unreachable in practice: the source refuses timestamps above 2^53 (semantics §2)
        // and epochs are Unix milliseconds. Logged rather than a panic, like any bad input.
        Err(error) => tracing::error!(%error, epoch, "profile not written"),
    }
}

/// A 64-bit hash of an interest vector's bits and known items: two outputs of one history that
/// fingerprint alike are taken as equal (the odds of a collision are 2^-64).
fn fingerprint(vector: &profile::InterestVector) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(&vector.known_items.to_le_bytes());
    for x in &vector.vector {
        hasher.update(&x.to_bits().to_le_bytes());
    }
    hasher.digest()
}
