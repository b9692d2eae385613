//! What the interest operator keeps on one worker, and the rule that keeps its users' outputs
//! current (semantics §5) as profiles and features change.
//!
//! Every worker holds the whole item table (feature changes are broadcast to all of them) but
//! only the users routed to it. Memory bounds how many users a process can hold, so each
//! string is kept once; and the tables are far larger than the caches, so the hot paths are
//! laid out to touch few cache lines:
//! - an item's id lives once per worker, in the item table; a user's history is a list of
//!   4-byte indices into it (50 ASIN-like ids as `String`s take ~2 KB, as indices 200 bytes);
//! - the item table is columns by item index: features in one dense array, D values per
//!   item, so a history's features are one load each, found by index without a lookup; whether
//!   each item has features, a byte each; and one cache line per item with the rest (the
//!   holders below, the id);
//! - each item's *holders* list the local users whose history took it in, so that a feature
//!   change finds the users to recompute in O(holders) (see [`Holder`]);
//! - setting a profile does not touch its items' lines: it records its *holder changes* (the
//!   new history's items gain the user, the old one's that count their holders lose it), and
//!   these are applied a batch at a time, at the end of each epoch, sorted by item (see
//!   [`HolderChanges`]). Touched profile by profile, the 50 lines of the new history, the ends
//!   of their 50 lists and the 50 lines of the old history were three cache misses per item,
//!   30% of the core's time; an epoch's changes, sorted, reach each item's line and list once,
//!   in address order;
//! - a changed profile's output is encoded from the message's own ids, not from the table;
//! - each user keeps a 64-bit fingerprint of its current output, so that a recomputation that
//!   changes nothing emits nothing, without keeping the vector itself.
//!
//! A user's interest vector is recomputed from scratch, from its history in history order, by
//! [`profile::interest_vector`], the contract's own formula: one worker holds the whole of a
//! user, so the sum runs in one fixed order and the bits are those of the sequential reference
//! on any number of workers and processes.

use rustc_hash::FxHashMap;
use smol_str::SmolStr;

use crate::interest::InterestParams;
use crate::key_index::KeyIndex;
use sink::{EncodedProfile, ProfileRecord};

use crate::model::{id_key, FeatureVector, IdKey, Profile};

/// An item's place in its worker's item table. Four bytes, of which a [`HolderChange`] takes
/// 31: a table of 2^31 items would take hundreds of gigabytes, far beyond any worker.
type ItemIndex = u32;

/// The most items one worker's table can hold (see [`ItemIndex`]).
const MAX_ITEMS_PER_WORKER: usize = 1 << 31;

/// A user's place in its worker's user table, four bytes for the same reason.
type UserIndex = u32;

/// An entry of an item's holders list: a user, and a tag of the version of the user's history
/// that holds the item, in four bytes.
///
/// Lists are append-only. Each time a user's history changes, its version goes up by one and the
/// user is appended, tagged with the new version, to the list of every item of the new history.
/// An entry is current while its tag is the user's version: the user has not changed its
/// history since. The entries of older versions are left where they are and skipped by readers,
/// until they are half of the list and it is compacted (amortised O(1) a push). This costs a
/// push per item where a set of holders costs a removal and an insertion into two hashed sets,
/// each a cache miss; telling a current entry from a stale one is one load from a dense array
/// of versions; and an entry takes 4 bytes, about what a hashed set's slot takes.
///
/// The tag is the version's low [`TAG_BITS`] bits, so a stale entry passes for current when its
/// user's version has moved on by a multiple of 256 since. That costs the user one needless
/// recomputation when the item's features change, which emits nothing (its output fingerprint
/// is unchanged); it never makes a holder missed, since a current entry always passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holder(u32);

/// Bits of a [`Holder`] that tag the version.
const TAG_BITS: u32 = 8;

/// The most users one worker can hold: a [`Holder`] has the other 24 bits for the user's index.
/// At about a kilobyte of state per user that is some 16 GB, more than one worker should hold;
/// add workers or processes instead.
pub const MAX_USERS_PER_WORKER: usize = 1 << (32 - TAG_BITS);

impl Holder {
    fn new(user: UserIndex, version: u32) -> Self {
        Holder(user | version << (32 - TAG_BITS))
    }

    fn user(self) -> UserIndex {
        self.0 & (MAX_USERS_PER_WORKER as u32 - 1)
    }

    fn tag(self) -> u32 {
        self.0 >> (32 - TAG_BITS)
    }
}

/// What applying holder changes reads and writes of an item, and what a feature change reads:
/// one cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct ItemSlot {
    /// The local users whose history took the item in, current and stale (see [`Holder`]).
    holders: Vec<Holder>,
    /// The item's id, read to encode the output of a user whose vector a feature change
    /// moved. Inline (see [`SmolStr`]) for ids of up to 23 bytes, which ASIN-like ids are.
    id: SmolStr,
    /// While the item has no features, the number of local users whose current history holds
    /// it (once the pending holder changes are applied), so that it is released when the last
    /// one lets it go. An item with features is kept whoever holds it, so its count is not
    /// kept up: that would take a change per item of every old history, half of all changes.
    /// It is counted afresh when the item loses its features (see
    /// [`ItemTable::count_holders`]).
    held_by: u32,
    /// The length of `holders` after it was last compacted.
    compacted_len: u32,
}

impl ItemSlot {
    /// Drops the stale entries of the holders list once it has doubled since it was last
    /// compacted: amortised O(1) a push, and a list at most about twice as long as it was then.
    fn compact_if_grown(&mut self, users: &UserTable) {
        if self.holders.len() > 2 * self.compacted_len as usize + COMPACTION_SLACK {
            self.compact(users);
        }
    }

    fn compact(&mut self, users: &UserTable) {
        let holders = &mut self.holders;
        holders.retain(|&holder| users.is_current(holder));
        // A list that grew by doubling keeps up to twice what it needs.
        if holders.capacity() > holders.len() + holders.len() / 2 + COMPACTION_SLACK {
            holders.shrink_to(holders.len() + holders.len() / 4 + COMPACTION_SLACK);
        }
        self.compacted_len = holders.len() as u32;
    }
}

/// A list is compacted when it passes twice its length after the last compaction plus this
/// many, so that a small list is not compacted at every push.
const COMPACTION_SLACK: usize = 16;

/// The items known to a worker, every item with features and every item a local user holds,
/// as columns indexed by [`ItemIndex`].
#[derive(Debug)]
struct ItemTable {
    dim: usize,
    /// Looked up 50 times a message: see [`KeyIndex`] for how those lookups overlap.
    index: KeyIndex,
    keys: Vec<IdKey>,
    /// The features of each item that has them (see `known`):
    /// `features[item * dim..][..dim]`. Every feature vector has D values: the features file and
    /// the topic's decoder both refuse any other length.
    features: Vec<f32>,
    /// Whether each item has features, which are then its row of `features`. A column of its
    /// own, read with the features for every item of a changed history: a byte per item keeps
    /// it in the caches, where a flag in the slot cost a cache miss per item.
    known: Vec<bool>,
    /// Everything else of each item, one cache line each: the tables are larger than the
    /// caches.
    slots: Vec<ItemSlot>,
    /// Entries released for reuse, so ids seen once (an unknown item in one history) do not
    /// grow the table forever.
    free: Vec<ItemIndex>,
}

impl ItemTable {
    fn new(dim: usize) -> Self {
        ItemTable {
            dim,
            index: KeyIndex::default(),
            keys: Vec::new(),
            features: Vec::new(),
            known: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
        }
    }

    /// The index of the item whose key is `key`, if the table has it.
    fn find(&self, key: IdKey) -> Option<ItemIndex> {
        self.index.get(key)
    }

    /// The index of the item `id` whose key is `key`, added if new.
    fn intern(&mut self, key: IdKey, id: &str) -> ItemIndex {
        if let Some(item) = self.find(key) {
            return item;
        }
        let item = match self.free.pop() {
            Some(item) => {
                self.keys[item as usize] = key;
                self.slots[item as usize].id = id.into();
                item
            }
            None => {
                // A capacity limit, like running out of memory, which at this size would come
                // first: a HolderChange has 31 bits for the item.
                assert!(
                    self.keys.len() < MAX_ITEMS_PER_WORKER,
                    "a worker holds {MAX_ITEMS_PER_WORKER} items, its most"
                );
                self.keys.push(key);
                self.features.resize(self.features.len() + self.dim, 0.0);
                self.known.push(false);
                self.slots.push(ItemSlot {
                    id: id.into(),
                    ..ItemSlot::default()
                });
                (self.keys.len() - 1) as ItemIndex
            }
        };
        self.index.insert(key, item);
        item
    }

    fn id(&self, item: ItemIndex) -> &str {
        &self.slots[item as usize].id
    }

    /// The item's features, if it has any.
    fn features(&self, item: ItemIndex) -> Option<&[f32]> {
        let item = item as usize;
        self.known[item].then(|| &self.features[item * self.dim..][..self.dim])
    }

    /// Sets the item's features; returns whether they changed.
    fn set_features(&mut self, item: ItemIndex, features: Option<&FeatureVector>) -> bool {
        let same = match (self.features(item), features) {
            (Some(old), Some(new)) => old
                .iter()
                .map(|x| x.to_bits())
                .eq(new.values().map(f32::to_bits)),
            (old, new) => old.is_none() && new.is_none(),
        };
        let item = item as usize;
        self.known[item] = features.is_some();
        let slot = &mut self.features[item * self.dim..][..self.dim];
        slot.fill(0.0);
        for (x, value) in slot
            .iter_mut()
            .zip(features.iter().flat_map(|x| x.values()))
        {
            *x = value;
        }
        !same
    }

    /// Releases `item` if nothing needs it any more: it has no features and no holder.
    fn release_if_unused(&mut self, item: ItemIndex) {
        let slot = item as usize;
        let entry = &mut self.slots[slot];
        if !self.known[slot] && entry.held_by == 0 {
            self.index.remove(self.keys[slot]);
            entry.id = SmolStr::default();
            // Every entry left is stale; the buffer goes too, which a once popular item's
            // makes large.
            entry.holders = Vec::new();
            entry.compacted_len = 0;
            self.free.push(item);
        }
    }

    /// Counts the item's holders into [`ItemSlot::held_by`], from its list of current entries
    /// (just compacted). An entry whose tag passes for current though its user has moved on
    /// (see [`Holder`]) is told apart by the user's history, and one user's two such entries
    /// are one: O(holders) with the history scans, once per item that loses its features.
    fn count_holders(&mut self, item: ItemIndex, users: &UserTable) {
        let slot = &mut self.slots[item as usize];
        slot.holders.sort_unstable_by_key(|holder| holder.0);
        slot.holders.dedup();
        slot.held_by = slot
            .holders
            .iter()
            .filter(|holder| users.histories[holder.user() as usize].contains(&item))
            .count() as u32;
    }
}

/// The users routed to a worker, as columns indexed by [`UserIndex`]. Users are never removed
/// (a profile is never deleted), so the ids live in one append-only buffer: no allocation per
/// user, and nothing for the short-lived buffers of each epoch to fragment.
#[derive(Debug, Default)]
struct UserTable {
    index: FxHashMap<IdKey, UserIndex>,
    keys: Vec<IdKey>,
    /// Every user id, one after the other: user `u`'s ends at `id_ends[u]`.
    ids: String,
    id_ends: Vec<usize>,
    timestamps: Vec<u64>,
    /// The kept history, oldest first, as indices into the item table.
    histories: Vec<Box<[ItemIndex]>>,
    /// The version of each history (see [`Holder`]).
    versions: Vec<u32>,
    /// A fingerprint of each user's current output: its vector's bits and known items.
    outputs: Vec<u64>,
}

impl UserTable {
    fn find(&self, key: IdKey) -> Option<UserIndex> {
        self.index.get(&key).copied()
    }

    /// Adds the user `id` whose key is `key`, with an empty history.
    fn add(&mut self, key: IdKey, id: &str) -> UserIndex {
        // A capacity limit, like running out of memory, which at this size would come first.
        assert!(
            self.keys.len() < MAX_USERS_PER_WORKER,
            "a worker holds {MAX_USERS_PER_WORKER} users, its most: run more workers or processes"
        );
        let user = self.keys.len() as UserIndex;
        self.index.insert(key, user);
        self.keys.push(key);
        self.ids.push_str(id);
        self.id_ends.push(self.ids.len());
        self.timestamps.push(0);
        self.histories.push(Box::default());
        self.versions.push(0);
        self.outputs.push(0);
        user
    }

    fn id(&self, user: UserIndex) -> &str {
        let user = user as usize;
        let start = user.checked_sub(1).map_or(0, |before| self.id_ends[before]);
        &self.ids[start..self.id_ends[user]]
    }

    /// Whether `holder` is a current entry: its user has not changed its history since (or, one
    /// time in 256, a stale one that passes for current; see [`Holder`]).
    fn is_current(&self, holder: Holder) -> bool {
        self.versions[holder.user() as usize] % (1 << TAG_BITS) == holder.tag()
    }
}

/// The holder changes of the profiles set since they were last applied: the user's entry of
/// its new version joins the list of each item of its new history, and its entry of the old
/// version leaves those of the old one's items that have no features (the entry is stale
/// already, by its tag, but such an item still counts it in [`ItemSlot::held_by`]).
///
/// Applying them one profile at a time touched the line of each of the 50 items, the end of
/// its list, and the line of each of the old history's 50 items: random lines of tables larger
/// than the caches, three cache misses per item. Held back and sorted by item (a stable radix
/// sort, so each list gets its entries in the order the profiles were set, as before), an
/// epoch's changes reach the item lines in address order and each list's end once, however
/// many of the epoch's histories hold the item. `bench-core scaling` ran 1.4x as fast with no
/// holders at all; this keeps most of that.
///
/// Nothing reads the lists or the counts between the changes and their application, nor does
/// any item gain or lose its features: a feature change comes first in its epoch (see
/// [`Holdings::begin_epoch`]), and the changes are applied at the end of each epoch, and within
/// one whenever they reach [`HOLDER_CHANGES_BATCH`].
#[derive(Debug)]
struct HolderChanges {
    changes: Vec<HolderChange>,
    /// Changes held back before they are applied within an epoch.
    batch: usize,
}

/// Changes held back before they are applied within an epoch: 8 MB (and as much sort buffer),
/// so that a large epoch does not hold all of its own.
const HOLDER_CHANGES_BATCH: usize = 1 << 20;

/// One change to an item's holders list: `holder` joins it or leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HolderChange {
    /// The item, shifted left by one, and 1 for a join: sorted by it, an item's changes come
    /// together, its leaves first (so that its count never goes below zero).
    key: u32,
    holder: Holder,
}

impl HolderChange {
    fn join(item: ItemIndex, holder: Holder) -> Self {
        HolderChange {
            key: item << 1 | 1,
            holder,
        }
    }

    fn leave(item: ItemIndex, holder: Holder) -> Self {
        HolderChange {
            key: item << 1,
            holder,
        }
    }

    fn item(self) -> ItemIndex {
        self.key >> 1
    }

    fn is_join(self) -> bool {
        self.key & 1 == 1
    }
}

impl Default for HolderChanges {
    fn default() -> Self {
        HolderChanges {
            changes: Vec::new(),
            batch: HOLDER_CHANGES_BATCH,
        }
    }
}

impl HolderChanges {
    /// Records that `user`'s history went from `old` (of version `old_version`) to `new`;
    /// `known` is [`ItemTable::known`].
    fn record(
        &mut self,
        user: UserIndex,
        (old, old_version): (&[ItemIndex], u32),
        (new, new_version): (&[ItemIndex], u32),
        known: &[bool],
    ) {
        let leaving = Holder::new(user, old_version);
        let joining = Holder::new(user, new_version);
        self.changes.extend(
            old.iter()
                .filter(|&&item| !known[item as usize])
                .map(|&item| HolderChange::leave(item, leaving))
                .chain(new.iter().map(|&item| HolderChange::join(item, joining))),
        );
    }

    fn is_full(&self) -> bool {
        self.changes.len() >= self.batch
    }

    /// Applies the changes to the item table, and releases the items nothing needs any more.
    fn apply(&mut self, items: &mut ItemTable, users: &UserTable) {
        radsort::sort_by_key(&mut self.changes, |change| change.key);
        for changes in self.changes.chunk_by(|a, b| a.item() == b.item()) {
            let item = changes[0].item();
            let counted = !items.known[item as usize];
            let slot = &mut items.slots[item as usize];
            let mut left = false;
            // An item twice in one history is one holder: its two changes are equal, and
            // adjacent once sorted (the sort is stable and each history's changes were
            // recorded together).
            let mut previous = None;
            for &change in changes {
                if previous.replace(change) == Some(change) {
                    continue;
                }
                if change.is_join() {
                    slot.held_by += u32::from(counted);
                    slot.holders.push(change.holder);
                } else {
                    slot.held_by -= 1;
                    left = true;
                }
            }
            slot.compact_if_grown(users);
            if left {
                items.release_if_unused(item);
            }
        }
        self.changes.clear();
    }
}

/// What an epoch being applied has done so far (see [`Holdings::begin_epoch`]).
#[derive(Debug, Default)]
pub struct EpochInProgress {
    /// Users that held an item whose features changed, and so may have a new vector.
    recompute: Vec<UserIndex>,
    /// Users whose profile changed, emitted already.
    changed: Vec<UserIndex>,
}

/// The state of the interest operator on one worker.
#[derive(Debug)]
pub struct Holdings {
    params: InterestParams,
    items: ItemTable,
    users: UserTable,
    /// Holder changes not yet applied to the item table.
    holder_changes: HolderChanges,
    /// The keys of the history being set, a buffer kept between profiles.
    item_keys: Vec<IdKey>,
}

impl Holdings {
    /// No users and no items.
    pub fn new(params: InterestParams) -> Self {
        Holdings {
            params,
            items: ItemTable::new(params.dim),
            users: UserTable::default(),
            holder_changes: HolderChanges::default(),
            item_keys: Vec::new(),
        }
    }

    /// The timestamp of the user's current profile, if it has one.
    pub fn timestamp(&self, user_key: IdKey) -> Option<u64> {
        let user = self.users.find(user_key)?;
        Some(self.users.timestamps[user as usize])
    }

    /// Applies one complete epoch: `features`, the value of each item whose features changed
    /// (`None`: deleted), and `profiles`, the new profiles of local users (at most one each).
    /// The new output of each user whose output changed goes to `emit`, once, encoded as its
    /// Redis value of `epoch`. The three steps of [`begin_epoch`](Self::begin_epoch),
    /// [`apply_profiles`](Self::apply_profiles) and [`finish_epoch`](Self::finish_epoch) in one,
    /// for the tests; the interest operator runs them a slice at a time.
    #[cfg(test)]
    fn apply_epoch(
        &mut self,
        epoch: u64,
        features: impl IntoIterator<Item = (String, Option<FeatureVector>)>,
        profiles: impl IntoIterator<Item = Profile>,
        mut emit: impl FnMut(EncodedProfile),
    ) {
        let mut work = self.begin_epoch(features);
        self.apply_profiles(&mut work, epoch, profiles, &mut emit);
        self.finish_epoch(work, epoch, emit);
    }

    /// Starts applying a complete epoch with its `features`, which therefore come before every
    /// profile of the epoch. The epoch's profiles follow, in any number of
    /// [`apply_profiles`](Self::apply_profiles) calls, and then
    /// [`finish_epoch`](Self::finish_epoch), with nothing of another epoch in between.
    pub fn begin_epoch(
        &mut self,
        features: impl IntoIterator<Item = (String, Option<FeatureVector>)>,
    ) -> EpochInProgress {
        let mut work = EpochInProgress::default();
        // Every list complete before it is read (nothing is held back between epochs).
        self.apply_holder_changes();
        for (item_id, features) in features {
            let key = id_key(&item_id);
            let item = match &features {
                Some(_) => self.items.intern(key, &item_id),
                None => match self.items.find(key) {
                    Some(item) => item,
                    None => continue,
                },
            };
            if self.items.set_features(item, features.as_ref()) {
                // Reading the list is the time to drop its stale entries.
                let slot = &mut self.items.slots[item as usize];
                slot.compact(&self.users);
                work.recompute
                    .extend(slot.holders.iter().map(|holder| holder.user()));
                if features.is_none() {
                    self.items.count_holders(item, &self.users);
                }
            }
            self.items.release_if_unused(item);
        }
        work
    }

    /// Applies some of the epoch's profiles and emits the new output of each user whose profile
    /// changed, whatever its vector. That output is final at once: the epoch's features are in
    /// place, and a user has at most one profile in an epoch, so nothing later in the epoch
    /// changes it.
    pub fn apply_profiles(
        &mut self,
        work: &mut EpochInProgress,
        epoch: u64,
        profiles: impl IntoIterator<Item = Profile>,
        mut emit: impl FnMut(EncodedProfile),
    ) {
        let mut profiles = profiles.into_iter().peekable();
        while let Some(profile) = profiles.next() {
            if let Some(next) = profiles.peek() {
                next.history_items.touch();
            }
            if let Some(user) = self.set_profile(&profile) {
                let vector = self.interest_vector(user);
                let history: Vec<&str> = profile.history_items.iter().collect();
                let output = Output {
                    user_id: &profile.user_id,
                    history: &history,
                    vector: &vector,
                };
                self.encode_output(user, output, epoch, &mut emit);
                work.changed.push(user);
            }
            if self.holder_changes.is_full() {
                self.apply_holder_changes();
            }
        }
    }

    /// Applies the holder changes held back so far (see [`HolderChanges`]).
    fn apply_holder_changes(&mut self) {
        self.holder_changes.apply(&mut self.items, &self.users);
    }

    /// Ends the epoch: every holder of an item whose features changed, and whose profile did
    /// not (it was emitted already), is emitted if its vector or known items changed.
    pub fn finish_epoch(
        &mut self,
        work: EpochInProgress,
        epoch: u64,
        mut emit: impl FnMut(EncodedProfile),
    ) {
        let EpochInProgress {
            mut changed,
            mut recompute,
        } = work;
        changed.sort_unstable();
        recompute.sort_unstable();
        recompute.dedup();
        for user in recompute {
            if changed.binary_search(&user).is_ok() {
                continue;
            }
            let before = self.users.outputs[user as usize];
            let vector = self.interest_vector(user);
            if self.users.outputs[user as usize] != before {
                let history: Vec<&str> = self.users.histories[user as usize]
                    .iter()
                    .map(|&item| self.items.id(item))
                    .collect();
                let output = Output {
                    user_id: self.users.id(user),
                    history: &history,
                    vector: &vector,
                };
                self.encode_output(user, output, epoch, &mut emit);
            }
        }
        self.apply_holder_changes();
    }

    /// Makes `profile` its user's current one; returns the user's index, or `None` if the
    /// profile is the current one already.
    fn set_profile(&mut self, profile: &Profile) -> Option<UserIndex> {
        let key = profile.user_key;
        // Hash every id first and touch their slots in the index, so that the 50 cache misses
        // overlap instead of coming one lookup after another (see KeyIndex).
        let mut item_keys = std::mem::take(&mut self.item_keys);
        item_keys.clear();
        item_keys.extend(profile.history_items.iter().map(id_key));
        self.items.index.touch(item_keys.iter().copied());
        let history: Box<[ItemIndex]> = item_keys
            .iter()
            .zip(profile.history_items.iter())
            .map(|(&item_key, item)| self.items.intern(item_key, item))
            .collect();
        self.item_keys = item_keys;
        let user = match self.users.find(key) {
            Some(user) => {
                let slot = user as usize;
                if self.users.timestamps[slot] == profile.timestamp
                    && self.users.histories[slot] == history
                {
                    return None;
                }
                user
            }
            None => self.users.add(key, &profile.user_id),
        };
        let slot = user as usize;
        self.users.timestamps[slot] = profile.timestamp;
        let old = std::mem::replace(&mut self.users.histories[slot], history);
        let old_version = self.users.versions[slot];
        let version = old_version.wrapping_add(1);
        // Every entry of the old version is stale from now on.
        self.users.versions[slot] = version;
        self.holder_changes.record(
            user,
            (&old, old_version),
            (&self.users.histories[slot], version),
            &self.items.known,
        );
        Some(user)
    }

    /// The user's interest vector, computed from its current history; its fingerprint is
    /// recorded as the user's output.
    fn interest_vector(&mut self, user: UserIndex) -> profile::InterestVector {
        let InterestParams { dim, decay } = self.params;
        let slot = user as usize;
        let history = &self.users.histories[slot];
        // The features of a history are rows (of two cache lines at D = 32) scattered over a table
        // larger than the caches.
        // Touch every row first, in a loop where nothing waits on the loads, so that their
        // cache misses overlap; the formula then finds them in L1. (1.5x faster at D = 32 in
        // `cargo bench -p streamrec-dataflow --bench vector`; the touch is the black box.)
        let mut touch = 0f32;
        for x in history.iter().filter_map(|&item| self.items.features(item)) {
            touch += x.first().unwrap_or(&0.0) + x.last().unwrap_or(&0.0);
        }
        std::hint::black_box(touch);
        let vector = profile::interest_vector(
            history.iter().map(|&item| self.items.features(item)),
            dim,
            decay,
        );
        self.users.outputs[slot] = fingerprint(&vector);
        vector
    }

    /// Encodes the user's value of `epoch` (semantics §6) for `emit`.
    ///
    /// The value is encoded here, where it is computed, rather than as an owned copy of the
    /// history for the writer thread to encode and free: that copy cost an allocation and a
    /// reference per item on this core, and the writer's core then paid a cache miss per item
    /// to read it back.
    fn encode_output(
        &self,
        user: UserIndex,
        output: Output<'_>,
        epoch: u64,
        emit: &mut impl FnMut(EncodedProfile),
    ) {
        let Output {
            user_id,
            history,
            vector,
        } = output;
        let record = ProfileRecord {
            user_id,
            timestamp: self.users.timestamps[user as usize],
            history_items: history,
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
}

/// What a user's output is encoded from besides its timestamp: its id and its current
/// history's ids, from the message for a changed profile (in cache, where the tables' copies
/// are a cache miss each), and its vector.
#[derive(Debug, Clone, Copy)]
struct Output<'a> {
    user_id: &'a str,
    history: &'a [&'a str],
    vector: &'a profile::InterestVector,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::IdList;

    const PARAMS: InterestParams = InterestParams { dim: 1, decay: 0.5 };

    fn profile(user: &str, timestamp: u64, items: &[&str]) -> Profile {
        Profile {
            user_id: user.into(),
            user_key: id_key(user),
            timestamp,
            history_items: IdList::new(items),
        }
    }

    fn features(item: &str, x: Option<f32>) -> (String, Option<FeatureVector>) {
        (item.into(), x.and_then(|x| FeatureVector::new(&[x])))
    }

    /// Applies an epoch and returns its outputs as (user, timestamp, known items), sorted.
    fn epoch(
        holdings: &mut Holdings,
        updates: Vec<(String, Option<FeatureVector>)>,
        profiles: Vec<Profile>,
    ) -> Vec<(String, u64, u32)> {
        let mut outputs = Vec::new();
        holdings.apply_epoch(7, updates, profiles, |output| {
            let value: serde_json::Value = serde_json::from_str(output.value()).unwrap();
            assert_eq!(value["epoch"], 7);
            let known_items = value["known_items"].as_u64().unwrap() as u32;
            outputs.push((output.user_id().to_owned(), output.timestamp(), known_items))
        });
        outputs.sort();
        outputs
    }

    #[test]
    fn an_unchanged_profile_emits_nothing_and_a_new_timestamp_does() {
        let mut holdings = Holdings::new(PARAMS);
        let a = |t| profile("a", t, &["x"]);
        assert_eq!(
            epoch(&mut holdings, vec![], vec![a(1)]),
            [("a".into(), 1, 0)]
        );
        assert!(epoch(&mut holdings, vec![], vec![a(1)]).is_empty());
        assert_eq!(
            epoch(&mut holdings, vec![], vec![a(2)]),
            [("a".into(), 2, 0)]
        );
    }

    #[test]
    fn released_items_are_reused_without_leaking_holders() {
        let mut holdings = Holdings::new(PARAMS);
        // "u" is held twice and unknown: dropping it from a's history releases its entry.
        epoch(
            &mut holdings,
            vec![],
            vec![profile("a", 1, &["u", "x", "u"])],
        );
        let u = holdings.items.find(id_key("u")).unwrap();
        assert_eq!(holdings.items.slots[u as usize].held_by, 1);
        epoch(&mut holdings, vec![], vec![profile("a", 2, &["x"])]);
        assert_eq!(holdings.items.find(id_key("u")), None);
        assert_eq!(holdings.items.free.len(), 1);
        // The freed entry goes to a new item, held by b only.
        epoch(&mut holdings, vec![], vec![profile("b", 1, &["v"])]);
        assert!(holdings.items.free.is_empty());
        assert_eq!(
            epoch(&mut holdings, vec![features("v", Some(1.0))], vec![]),
            [("b".into(), 1, 1)]
        );
        // A deleted item no one holds leaves the table.
        epoch(&mut holdings, vec![features("w", Some(1.0))], vec![]);
        epoch(&mut holdings, vec![features("w", None)], vec![]);
        assert_eq!(holdings.items.find(id_key("w")), None);
    }

    #[test]
    fn a_feature_change_that_leaves_the_vector_alone_emits_nothing() {
        let mut holdings = Holdings::new(PARAMS);
        epoch(
            &mut holdings,
            vec![features("x", Some(1.0))],
            vec![profile("a", 1, &["x"])],
        );
        // The same value again, and a change of an item a does not hold.
        assert!(epoch(
            &mut holdings,
            vec![features("x", Some(1.0)), features("y", Some(2.0))],
            vec![]
        )
        .is_empty());
    }

    #[test]
    fn holders_lists_stay_bounded_and_reach_only_current_holders() {
        let mut holdings = Holdings::new(PARAMS);
        // 40 users take x in and out of their history 30 times; only the even ones end with it.
        for round in 0..30u64 {
            let profiles = (0..40)
                .map(|u| {
                    let holds = if round == 29 {
                        u % 2 == 0
                    } else {
                        (round + u) % 2 == 0
                    };
                    let items: &[&str] = if holds { &["x", "y"] } else { &["y"] };
                    profile(&format!("user{u}"), round + 1, items)
                })
                .collect();
            epoch(&mut holdings, vec![], profiles);
        }
        let x = holdings.items.find(id_key("x")).unwrap() as usize;
        assert_eq!(holdings.items.slots[x].held_by, 20);
        assert!(
            holdings.items.slots[x].holders.len() <= 2 * 20 + COMPACTION_SLACK,
            "{} entries for 20 holders",
            holdings.items.slots[x].holders.len()
        );
        let touched = epoch(&mut holdings, vec![features("x", Some(3.0))], vec![]);
        let mut expected: Vec<(String, u64, u32)> = (0..40)
            .step_by(2)
            .map(|u| (format!("user{u}"), 30, 1))
            .collect();
        expected.sort();
        assert_eq!(touched, expected);
        assert_eq!(holdings.items.slots[x].holders.len(), 20);
    }

    /// Random epochs (feature changes and deletions, unknown items, items twice in a history)
    /// applied with the holder changes held back to the end of each epoch and with them
    /// applied after every profile: the outputs are the same, and after each epoch every item
    /// lists each user whose history holds it, every item without features counts them
    /// exactly (also right after it lost its features), and an item is released once it has
    /// neither holders nor features.
    #[test]
    fn holder_changes_held_back_or_not_keep_the_lists_exact() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut held_back = Holdings::new(PARAMS);
        let mut at_once = Holdings::new(PARAMS);
        at_once.holder_changes.batch = 1;
        let item = |i: u32| format!("item{i}");
        for round in 0..200u64 {
            let updates: Vec<_> = (0..rng.random_range(0..3))
                .map(|_| {
                    let value = rng.random_bool(0.7).then(|| rng.random_range(0..8) as f32);
                    features(&item(rng.random_range(0..12)), value)
                })
                .collect();
            let mut users: Vec<u32> = (0..rng.random_range(0..8))
                .map(|_| rng.random_range(0..10))
                .collect();
            users.sort_unstable();
            users.dedup();
            let profiles: Vec<Profile> = users
                .iter()
                .map(|u| {
                    let items: Vec<String> = (0..rng.random_range(0..5))
                        .map(|_| item(rng.random_range(0..16)))
                        .collect();
                    let items: Vec<&str> = items.iter().map(String::as_str).collect();
                    profile(&format!("user{u}"), round + 1, &items)
                })
                .collect();
            assert_eq!(
                epoch(&mut held_back, updates.clone(), profiles.clone()),
                epoch(&mut at_once, updates, profiles),
                "round {round}"
            );
            for holdings in [&held_back, &at_once] {
                let items = &holdings.items;
                for i in 0..16 {
                    let key = id_key(&item(i));
                    let holders: Vec<UserIndex> = (0..holdings.users.keys.len() as UserIndex)
                        .filter(|&u| {
                            holdings.users.histories[u as usize]
                                .iter()
                                .any(|&held| items.keys[held as usize] == key)
                        })
                        .collect();
                    let Some(index) = items.find(key) else {
                        assert!(
                            holders.is_empty(),
                            "round {round}: item{i} held but released"
                        );
                        continue;
                    };
                    let slot = &items.slots[index as usize];
                    if !items.known[index as usize] {
                        assert_eq!(
                            slot.held_by as usize,
                            holders.len(),
                            "round {round}: item{i}"
                        );
                    }
                    assert!(
                        items.known[index as usize] || !holders.is_empty(),
                        "round {round}: item{i} neither known nor held, yet kept"
                    );
                    for user in holders {
                        assert!(
                            slot.holders
                                .iter()
                                .any(|&h| h.user() == user && holdings.users.is_current(h)),
                            "round {round}: item{i} does not list user {user}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_stale_entry_that_passes_for_current_emits_nothing() {
        let mut holdings = Holdings::new(PARAMS);
        epoch(
            &mut holdings,
            vec![features("x", Some(1.0))],
            vec![profile("a", 1, &["x"])],
        );
        // 256 more histories without x: a's version is back to x's entry's tag.
        for t in 2..=257 {
            epoch(&mut holdings, vec![], vec![profile("a", t, &["y"])]);
        }
        let x = holdings.items.find(id_key("x")).unwrap() as usize;
        assert!(!holdings.users.histories[0].contains(&(x as ItemIndex)));
        assert!(holdings
            .users
            .is_current(holdings.items.slots[x].holders[0]));
        // x changes: a is recomputed for nothing, and nothing is emitted.
        assert!(epoch(&mut holdings, vec![features("x", Some(2.0))], vec![]).is_empty());
        // x loses its features: counted afresh, the entry that passes is no holder, and x,
        // neither held nor known, is released.
        assert!(epoch(&mut holdings, vec![features("x", None)], vec![]).is_empty());
        assert_eq!(holdings.items.find(id_key("x")), None);
    }

    /// An item with features whose holders come and go is counted right when it loses them:
    /// the holders still in place keep it, and it goes with the last one.
    #[test]
    fn an_item_that_loses_its_features_counts_its_holders() {
        let mut holdings = Holdings::new(PARAMS);
        let x = Some(1.0);
        epoch(
            &mut holdings,
            vec![features("x", x)],
            vec![profile("a", 1, &["x", "x"]), profile("b", 1, &["x"])],
        );
        epoch(&mut holdings, vec![], vec![profile("a", 2, &["y"])]);
        epoch(&mut holdings, vec![features("x", None)], vec![]);
        let item = holdings.items.find(id_key("x")).unwrap() as usize;
        assert_eq!(holdings.items.slots[item].held_by, 1);
        epoch(&mut holdings, vec![], vec![profile("b", 2, &["y"])]);
        assert_eq!(holdings.items.find(id_key("x")), None);
    }
}
