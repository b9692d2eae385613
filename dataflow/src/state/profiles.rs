//! The profile arrangement: each local user's current profile, keyed by user (semantics §4).
//!
//! Profile events are exchanged by user, so each worker arranges its own users. Once an epoch
//! is complete its events are applied in read order against the current profile read from the
//! arrangement: a message older than the current one is stale (counted, it changes nothing), a
//! tie in timestamp goes to the message read later, and a message equal to the current profile
//! changes nothing. Each change is a retraction of the old profile and the new one, in the
//! epoch's batch; the trace compacts to one value per user as its frontier moves on.
//!
//! A history is kept as indices into the worker's item table (see `items.rs`), interned here:
//! this is where a profile's items are taken in and the old profile's let go.

use std::cell::RefCell;
use std::rc::Rc;

use differential_dataflow::operators::arrange::Arranged;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::Stream;

use super::items::{ItemIndex, ItemTable};
use super::users::{UserIndex, UserTable};
use crate::epoch::Epoch;
use crate::metrics::PartitionTally;
use crate::model::{id_key, IdKey, ProfileEvent, ReadPosition};
use crate::source::PROFILE_TOPIC;
use crate::stats::StatsBoard;
use crate::upsert::{arrange_upserts, Prior, Update, UpsertTrace};

/// A user's current profile as the arrangement holds it.
///
/// The history is shared, not owned: the arrangement copies each value into its batch and
/// again at every merge of batches, and a copy of an `Rc` is a count, where a copy of a `Vec`
/// was an allocation and 200 bytes. The user's id is kept once, in the worker's user table.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProfileState {
    /// The timestamp of the winning message.
    pub timestamp: u64,
    /// The kept history, oldest first, as indices into the worker's item table.
    pub history: Rc<[ItemIndex]>,
}

/// The profile arrangement's trace, importable by any operator of the same dataflow. Keyed by
/// the user's index in the worker's user table: a dense 4-byte key, where the 16-byte hash of
/// the id made each seek in a large batch about 20 cache misses (`bench-core incremental`: an
/// epoch of 1,000 users took 1.65-2.1x as long with 1,000,000 users in state as with 10,000).
pub type ProfileTrace = UpsertTrace<UserIndex, ProfileState>;

/// Arranges the profile events by user, adding new users to `users`; stale messages are
/// counted on `stats`, which is also where the worker loop finds the tables' sizes.
pub fn arrange_profiles<'scope>(
    events: Stream<'scope, u64, Vec<ProfileEvent>>,
    items: Rc<RefCell<ItemTable>>,
    users: Rc<RefCell<UserTable>>,
    stats: Rc<RefCell<StatsBoard>>,
) -> Arranged<'scope, ProfileTrace> {
    let mut item_keys = Vec::new();
    let mut stale_by_partition = PartitionTally::default();
    stats
        .borrow_mut()
        .watch_tables(users.clone(), items.clone());
    arrange_upserts(
        events,
        Exchange::new(|event: &ProfileEvent| event.user_key as u64),
        "ProfileArrangement",
        move |epoch, events, prior, updates| {
            let stale = settle_profiles(
                epoch,
                events,
                prior,
                updates,
                &mut items.borrow_mut(),
                &mut users.borrow_mut(),
                &mut item_keys,
                &mut stale_by_partition,
            );
            if stale > 0 {
                let mut stats = stats.borrow_mut();
                stats.epoch(epoch).stale += stale;
                // The replay's messages are not counted as read either.
                if !Epoch::at(epoch).is_replay() {
                    stats.stale.add(&stale_by_partition);
                }
                stale_by_partition.clear();
            }
        },
    )
}

/// Applies one complete epoch's profile events, in read order, to the current profiles in
/// `prior`; pushes each changed profile's retraction and new value to `updates` and returns the
/// number of stale events, which it also counts by partition on `stale_by_partition`.
// The epoch, its events and the state they apply to, plus the caller's two reused buffers.
#[allow(clippy::too_many_arguments)]
fn settle_profiles(
    epoch: u64,
    events: Vec<ProfileEvent>,
    prior: &mut Prior<UserIndex, ProfileState>,
    updates: &mut Vec<Update<UserIndex, ProfileState>>,
    items: &mut ItemTable,
    users: &mut UserTable,
    item_keys: &mut Vec<IdKey>,
    stale_by_partition: &mut PartitionTally,
) -> u64 {
    // A user's events in read order (one user's messages share a partition), users in key
    // order, which the cursor wants. The events are large: sorted by index, not moved. A new
    // user is added at once: its first event is no older than a profile it does not have, so
    // it gets one.
    let mut order: Vec<(UserIndex, ReadPosition, u32)> = events
        .iter()
        .enumerate()
        .map(|(i, event)| {
            let user = users.find_or_add(event.user_key, &event.user_id);
            (user, event.position, i as u32)
        })
        .collect();
    order.sort_unstable();
    let mut stale = 0;
    for group in order.chunk_by(|a, b| a.0 == b.0) {
        let key = group[0].0;
        let current = prior.get(key, epoch);
        let mut timestamp = current.as_ref().map(|profile| profile.timestamp);
        let mut winner = None;
        for &(_, _, i) in group {
            let event = &events[i as usize];
            if timestamp.is_some_and(|timestamp| event.timestamp < timestamp) {
                stale += 1;
                stale_by_partition
                    .entry((PROFILE_TOPIC, event.position.0))
                    .stale += 1;
                continue;
            }
            timestamp = Some(event.timestamp);
            winner = Some(i as usize);
        }
        let Some(winner) = winner else { continue };
        let event = &events[winner];
        // Hash every id first and touch their slots in the index, so that the 50 cache misses
        // overlap instead of coming one lookup after another (see KeyIndex).
        item_keys.clear();
        item_keys.extend(event.history_items.iter().map(id_key));
        items.touch(item_keys.iter().copied());
        let history: Rc<[ItemIndex]> = item_keys
            .iter()
            .zip(event.history_items.iter())
            .map(|(&item_key, item)| items.intern(item_key, item))
            .collect();
        if let Some(current) = &current {
            if current.timestamp == event.timestamp && current.history[..] == history[..] {
                continue;
            }
        }
        items.take(epoch, &history);
        if let Some(current) = current {
            items.let_go(epoch, &current.history);
            updates.push(((key, current), epoch, -1));
        }
        let profile = ProfileState {
            timestamp: event.timestamp,
            history,
        };
        updates.push(((key, profile), epoch, 1));
    }
    stale
}
