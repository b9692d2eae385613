//! The interest operator: reads the profile and features arrangements' batches and maintains
//! the interest collection, each local user's output (semantics §5, §6) as a differential
//! collection of [`UserInterest`] values: at each epoch, for every user whose profile or
//! interest vector changed in it, a retraction of the user's old value and the new value.
//!
//! Once both arrangements have passed an epoch, the operator applies the epoch's feature
//! changes to the dense feature cache and collects the holders of each changed item (through the holders index); then, for each user
//! in the epoch's profile batch, it retracts the old profile's value and inserts the new
//! profile's, each vector computed from the cache (O(history)); last, it recomputes each holder
//! of a changed item whose profile did not change, reading its profile as of the epoch from the
//! profile arrangement's trace, and updates those whose output moved. The collection is
//! consolidated per epoch: one retraction and one insertion per changed user, none for a user
//! whose output did not change.
//!
//! The old value's vector comes from the output table (`state/outputs.rs`), which keeps each
//! user's last vector: 128 bytes a user at D = 32, 47 MB at full scale, against recomputing it
//! (the old history's 50 feature rows, as they were before the epoch) for every changed user.
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
use differential_dataflow::{AsCollection, VecCollection};
use smol_str::SmolStr;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Capability, Operator};
use timely::dataflow::Stream;
use timely::progress::Antichain;

use crate::model::{IdList, UserInterest};
use crate::pending::{passed_by_both, PendingEpochs};
use crate::state::features::FeatureChange;
use crate::state::holders::HoldersIndex;
use crate::state::items::{ItemIndex, ItemTable};
use crate::state::outputs::OutputTable;
use crate::state::profiles::{ProfileState, ProfileTrace};
use crate::state::users::{UserIndex, UserTable};
use crate::upsert::{retracted_and_inserted, Prior, UpsertBatch};

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

/// One update of the interest collection: a user's value, the epoch, +1 or -1.
type InterestUpdate = (UserInterest, u64, isize);

/// What the operator keeps on one worker besides the shared item table.
struct InterestState {
    params: InterestParams,
    items: Rc<RefCell<ItemTable>>,
    users: Rc<RefCell<UserTable>>,
    /// Each user's last vector, for the retraction of its value.
    outputs: OutputTable,
    holders: HoldersIndex,
    /// A handle to the profile trace, for the profiles of holders: it holds compaction back to
    /// the epoch the operator reads.
    profiles: ProfileTrace,
}

/// Builds the interest operator on the two arrangements: the interest collection, each local
/// user's current output, updated at each epoch for exactly the users whose profile or interest
/// vector changed in it.
pub fn interest_profiles<'scope>(
    profiles: &Arranged<'scope, ProfileTrace>,
    features: Stream<'scope, u64, Vec<FeatureChange>>,
    items: Rc<RefCell<ItemTable>>,
    users: Rc<RefCell<UserTable>>,
    params: InterestParams,
) -> VecCollection<'scope, u64, UserInterest, isize> {
    let scope = profiles.stream.scope();
    let trace = profiles.trace.clone();
    profiles
        .stream
        .clone()
        .binary_frontier(
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
                    outputs: OutputTable::new(params.dim),
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
                    let frontier =
                        passed_by_both(profiles_frontier.frontier(), features_frontier.frontier());
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
                        let done = state
                            .apply_profiles(current, &mut budget, |update| session.give(update));
                        if done {
                            if let Some(finished) = in_progress.take() {
                                state.finish(finished, |update| session.give(update));
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
        .as_collection()
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
        // Room for every item with new features, should they all be new, when they outnumber
        // the items held: the features file's epoch interns every item at once, whose columns
        // and index would otherwise be copied at every doubling (docs/performance.md,
        // 2026-12-06, start-up). The usual epoch changes a few items, mostly known ones, and
        // reserving for them would only grow the index early.
        let with_features = arrived
            .iter()
            .filter(|arrived| matches!(arrived, Arrived::Features((_, Some(_)))))
            .count();
        if with_features > items.len() {
            // Room for those the table lacks: the histories read before the file's last share
            // have interned many of its items already, and room for all of them again took the
            // index to twice the slots it needs (33 MB a worker at the bench's 200,000 items).
            let new = arrived
                .iter()
                .filter(|arrived| match arrived {
                    Arrived::Features((key, Some(_))) => items.find(*key).is_none(),
                    _ => false,
                })
                .count();
            items.reserve(new);
        }
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

    /// Applies up to `budget` of the epoch's profiles, updating each changed user's output, and
    /// takes what it applied from the budget. Returns whether every profile is applied.
    fn apply_profiles(
        &mut self,
        work: &mut InProgress,
        budget: &mut usize,
        mut emit: impl FnMut(InterestUpdate),
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
                if let (old, Some(profile)) = retracted_and_inserted(cursor, batch) {
                    let version = users.new_version(user);
                    self.holders.join(user, version, &profile.history);
                    let user_id = SmolStr::new(users.id(user));
                    // The old history's ids, for its retraction, are as scattered as the new
                    // one's rows: touched first, their misses overlap with the vector's.
                    if let Some(old) = old {
                        items.touch_ids(&old.history);
                    }
                    let new = interest_vector(&items, &profile.history, self.params);
                    // The old profile's value was recorded when it was inserted.
                    if let Some((old, vector)) = old.zip(self.outputs.get(user)) {
                        emit((user_interest(&items, &user_id, old, vector), epoch, -1));
                    }
                    self.outputs.set(user, &new.vector, new.known_items);
                    let vector = (&new.vector[..], new.known_items);
                    emit((user_interest(&items, &user_id, profile, vector), epoch, 1));
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
    /// not (it was updated already), is updated if its vector or known items changed. Then the
    /// holders lists take the epoch's joins, and items nothing needs any more are released.
    fn finish(&mut self, work: InProgress, mut emit: impl FnMut(InterestUpdate)) {
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
        let users = self.users.borrow();
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
                let new = interest_vector(&items, &profile.history, self.params);
                let old = self.outputs.get(user);
                if old.is_some_and(|old| same_output(old, &new)) {
                    continue;
                }
                let user_id = SmolStr::new(users.id(user));
                if let Some(old) = old {
                    emit((user_interest(&items, &user_id, &profile, old), epoch, -1));
                }
                self.outputs.set(user, &new.vector, new.known_items);
                let vector = (&new.vector[..], new.known_items);
                emit((user_interest(&items, &user_id, &profile, vector), epoch, 1));
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

/// Whether a new vector of a history makes the same output as the recorded one: the same bits
/// and known items.
fn same_output((vector, known_items): (&[f32], u32), new: &profile::InterestVector) -> bool {
    known_items == new.known_items
        && vector
            .iter()
            .map(|x| x.to_bits())
            .eq(new.vector.iter().map(|x| x.to_bits()))
}

/// The user's output for `profile` and its vector and known items.
fn user_interest(
    items: &ItemTable,
    user_id: &SmolStr,
    profile: &ProfileState,
    (vector, known_items): (&[f32], u32),
) -> UserInterest {
    UserInterest {
        user_id: user_id.clone(),
        timestamp: profile.timestamp,
        history_items: IdList::from_ids(profile.history.iter().map(|&item| items.id(item))),
        interest_vector: vector.to_vec(),
        known_items,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic in a test is a test failure

    use std::cell::Cell;

    use timely::container::CapacityContainerBuilder;
    use timely::dataflow::operators::Inspect;
    use timely::dataflow::InputHandle;

    use super::*;
    use crate::model::{FeatureEvent, ProfileEvent};
    use crate::state::features::{arrange_features, feature_changes};
    use crate::state::profiles::arrange_profiles;

    /// An epoch of more profiles than a slice reaches the output a slice a step: the operator
    /// yields between slices (so that the writer and the Kafka reads get their turn), and
    /// applies every profile in the end.
    #[test]
    fn an_epoch_is_applied_a_slice_per_activation() {
        let users = 3 * PROFILES_PER_ACTIVATION + 5;
        timely::execute_directly(move |worker| {
            let inserted = Rc::new(Cell::new(0usize));
            let seen = inserted.clone();
            let mut profiles = InputHandle::new();
            let mut features: InputHandle<u64, CapacityContainerBuilder<Vec<FeatureEvent>>> =
                InputHandle::new();
            worker.dataflow::<u64, _, _>(|scope| {
                let items = Rc::new(RefCell::new(ItemTable::new(2)));
                let table = Rc::new(RefCell::new(UserTable::default()));
                let stats = Rc::default();
                let arranged = arrange_profiles(
                    profiles.to_stream(scope),
                    items.clone(),
                    table.clone(),
                    stats,
                );
                let changes = feature_changes(&arrange_features(features.to_stream(scope)));
                let params = InterestParams { dim: 2, decay: 0.9 };
                interest_profiles(&arranged, changes, items, table, params)
                    .inner
                    .inspect(move |(_, _, diff)| {
                        if *diff > 0 {
                            seen.set(seen.get() + 1);
                        }
                    });
            });
            for user in 0..users {
                let message = profile::ProfileMessage {
                    user_id: format!("user-{user}"),
                    history_items: vec![format!("item-{}", user % 7)],
                    timestamp: 1,
                };
                profiles.send(ProfileEvent::from_message(message, (0, user as i64), 50));
            }
            profiles.advance_to(1);
            features.advance_to(1);
            let mut per_step = Vec::new();
            while inserted.get() < users && per_step.len() < 1000 {
                let before = inserted.get();
                worker.step();
                per_step.push(inserted.get() - before);
            }
            assert_eq!(inserted.get(), users, "every profile applied");
            let slices: Vec<usize> = per_step.into_iter().filter(|&n| n > 0).collect();
            assert_eq!(
                slices,
                [
                    PROFILES_PER_ACTIVATION,
                    PROFILES_PER_ACTIVATION,
                    PROFILES_PER_ACTIVATION,
                    5
                ]
            );
        });
    }
}
