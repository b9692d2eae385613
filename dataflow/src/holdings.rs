//! What the interest operator keeps on one worker, and the rule that keeps its users' outputs
//! current (semantics §5) as profiles and features change.
//!
//! Every worker holds the whole item table (feature changes are broadcast to all of them) but
//! only the users routed to it. Memory bounds how many users a process can hold, so each
//! string is kept once; and the tables are far larger than the caches, so the hot paths are
//! laid out to touch few cache lines:
//! - an item's id lives once per worker, in the item table; a user's history is a list of
//!   4-byte indices into it (50 ASIN-like ids as `String`s take ~2 KB, as indices 200 bytes);
//! - the item table is a set of columns by item index: features in one dense array, D values
//!   per item, so a history's features are one load each, found by index without a lookup;
//!   the ids, needed only to write a profile out, apart from them;
//! - each item's *holders* are the indices of the local users whose history holds it, so a
//!   feature change finds the users to recompute in O(holders);
//! - each user keeps the sums of its current output (see [`Contribution`]), so the output can be
//!   retracted exactly and a recomputation that changes nothing emits nothing.
//!
//! The sums are recomputed from scratch for each changed user, with [`Contribution`]'s
//! fixed-point arithmetic: a sum of separately rounded integer terms, so the bits depend neither
//! on the worker count nor on the order of changes.

use rustc_hash::{FxHashMap, FxHashSet};

use crate::interest::{InterestParams, ProfileChange};
use crate::model::{id_key, Contribution, FeatureVector, IdKey, Profile};

/// An item's place in its worker's item table. Four bytes: a table of 2^32 items would take
/// hundreds of gigabytes, far beyond any worker.
type ItemIndex = u32;

/// A user's place in its worker's user table, four bytes for the same reason.
type UserIndex = u32;

/// The items known to a worker, every item with features and every item a local user holds,
/// as columns indexed by [`ItemIndex`].
#[derive(Debug)]
struct ItemTable {
    dim: usize,
    index: FxHashMap<IdKey, ItemIndex>,
    keys: Vec<IdKey>,
    ids: Vec<Box<str>>,
    /// Whether each item has features, ...
    known: Vec<bool>,
    /// ... which are `features[item * dim..][..dim]`. Every feature vector has D values: the
    /// features file and the topic's decoder both refuse any other length.
    features: Vec<f32>,
    /// The local users whose history holds each item, each once however many times it does.
    holders: Vec<FxHashSet<UserIndex>>,
    /// Entries released for reuse, so ids seen once (an unknown item in one history) do not
    /// grow the table forever.
    free: Vec<ItemIndex>,
}

impl ItemTable {
    fn new(dim: usize) -> Self {
        ItemTable {
            dim,
            index: FxHashMap::default(),
            keys: Vec::new(),
            ids: Vec::new(),
            known: Vec::new(),
            features: Vec::new(),
            holders: Vec::new(),
            free: Vec::new(),
        }
    }

    /// The index of the item whose key is `key`, if the table has it.
    fn find(&self, key: IdKey) -> Option<ItemIndex> {
        self.index.get(&key).copied()
    }

    /// The index of the item `id` whose key is `key`, added if new.
    fn intern(&mut self, key: IdKey, id: &str) -> ItemIndex {
        if let Some(item) = self.find(key) {
            return item;
        }
        let item = match self.free.pop() {
            Some(item) => {
                self.keys[item as usize] = key;
                self.ids[item as usize] = id.into();
                item
            }
            None => {
                self.keys.push(key);
                self.ids.push(id.into());
                self.known.push(false);
                self.features.resize(self.features.len() + self.dim, 0.0);
                self.holders.push(FxHashSet::default());
                (self.keys.len() - 1) as ItemIndex
            }
        };
        self.index.insert(key, item);
        item
    }

    fn id(&self, item: ItemIndex) -> &str {
        &self.ids[item as usize]
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

    fn holders_mut(&mut self, item: ItemIndex) -> &mut FxHashSet<UserIndex> {
        &mut self.holders[item as usize]
    }

    /// Releases `item` if nothing needs it any more: it has no features and no holder.
    fn release_if_unused(&mut self, item: ItemIndex) {
        let slot = item as usize;
        if !self.known[slot] && self.holders[slot].is_empty() {
            self.index.remove(&self.keys[slot]);
            self.ids[slot] = Box::default();
            // An emptied set keeps its buffer, which a once popular item's makes large.
            self.holders[slot] = FxHashSet::default();
            self.free.push(item);
        }
    }
}

/// The users routed to a worker, as columns indexed by [`UserIndex`]. Users are never removed
/// (a profile is never deleted), so the ids and sums live in flat append-only buffers: no
/// allocation per user, and nothing for the short-lived buffers of each epoch to fragment.
#[derive(Debug)]
struct UserTable {
    index: FxHashMap<IdKey, UserIndex>,
    keys: Vec<IdKey>,
    /// Every user id, one after the other: user `u`'s ends at `id_ends[u]`.
    ids: String,
    id_ends: Vec<usize>,
    timestamps: Vec<u64>,
    /// The kept history, oldest first, as indices into the item table.
    histories: Vec<Box<[ItemIndex]>>,
    /// The sums of each user's current output, `stride` values each (see [`Contribution`]).
    sums: Vec<isize>,
    stride: usize,
}

impl UserTable {
    fn new(dim: usize) -> Self {
        UserTable {
            index: FxHashMap::default(),
            keys: Vec::new(),
            ids: String::new(),
            id_ends: Vec::new(),
            timestamps: Vec::new(),
            histories: Vec::new(),
            sums: Vec::new(),
            stride: Contribution::profile(dim).len(),
        }
    }

    fn find(&self, key: IdKey) -> Option<UserIndex> {
        self.index.get(&key).copied()
    }

    /// Adds the user `id` whose key is `key`, with no history and no sums yet.
    fn add(&mut self, key: IdKey, id: &str) -> UserIndex {
        let user = self.keys.len() as UserIndex;
        self.index.insert(key, user);
        self.keys.push(key);
        self.ids.push_str(id);
        self.id_ends.push(self.ids.len());
        self.timestamps.push(0);
        self.histories.push(Box::default());
        self.sums.resize(self.sums.len() + self.stride, 0);
        user
    }

    fn id(&self, user: UserIndex) -> &str {
        let user = user as usize;
        let start = user.checked_sub(1).map_or(0, |before| self.id_ends[before]);
        &self.ids[start..self.id_ends[user]]
    }

    fn sums(&self, user: UserIndex) -> &[isize] {
        &self.sums[user as usize * self.stride..][..self.stride]
    }

    fn sums_mut(&mut self, user: UserIndex) -> &mut [isize] {
        &mut self.sums[user as usize * self.stride..][..self.stride]
    }
}

/// The state of the interest operator on one worker.
#[derive(Debug)]
pub struct Holdings {
    params: InterestParams,
    items: ItemTable,
    users: UserTable,
}

impl Holdings {
    /// No users and no items.
    pub fn new(params: InterestParams) -> Self {
        Holdings {
            params,
            items: ItemTable::new(params.dim),
            users: UserTable::new(params.dim),
        }
    }

    /// The timestamp of the user's current profile, if it has one.
    pub fn timestamp(&self, user_id: &str) -> Option<u64> {
        let user = self.users.find(id_key(user_id))?;
        Some(self.users.timestamps[user as usize])
    }

    /// Applies one complete epoch: `features`, the value of each item whose features changed
    /// (`None`: deleted), and `profiles`, the new profiles of local users (at most one each).
    /// Each output change goes to `emit`: for each user whose output changed, the retraction
    /// (-1) of the old output, if any, and the insertion (+1) of the new one.
    pub fn apply_epoch(
        &mut self,
        features: impl IntoIterator<Item = (String, Option<FeatureVector>)>,
        profiles: impl IntoIterator<Item = Profile>,
        mut emit: impl FnMut(ProfileChange, isize),
    ) {
        // Users that hold an item whose features changed, and so may have new sums.
        let mut recompute: FxHashSet<UserIndex> = FxHashSet::default();
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
                recompute.extend(self.items.holders[item as usize].iter().copied());
            }
            self.items.release_if_unused(item);
        }

        let mut changed: Vec<(UserIndex, Profile)> = Vec::new();
        for profile in profiles {
            if let Some(user) = self.set_profile(&profile, &mut emit) {
                changed.push((user, profile));
            }
        }
        // Only now are every history and feature of the epoch in place.
        for (user, profile) in changed {
            recompute.remove(&user);
            let sums = self.compute_sums(user);
            self.users.sums_mut(user).copy_from_slice(&sums);
            emit((self.users.keys[user as usize], (profile, sums)), 1);
        }
        for user in recompute {
            let sums = self.compute_sums(user);
            if sums == self.users.sums(user) {
                continue;
            }
            let (key, profile) = (self.users.keys[user as usize], self.profile(user));
            let old = self.users.sums(user).to_vec();
            self.users.sums_mut(user).copy_from_slice(&sums);
            emit((key, (profile.clone(), old)), -1);
            emit((key, (profile, sums)), 1);
        }
    }

    /// Makes `profile` its user's current one, retracting the old output; returns the user's
    /// index, or `None` if the profile is the current one already. The new output is left to
    /// the caller, once every change of the epoch is in place.
    fn set_profile(
        &mut self,
        profile: &Profile,
        emit: &mut impl FnMut(ProfileChange, isize),
    ) -> Option<UserIndex> {
        let key = id_key(&profile.user_id);
        let history: Box<[ItemIndex]> = profile
            .history_items
            .iter()
            .map(|item| self.items.intern(id_key(item), item))
            .collect();
        let user = match self.users.find(key) {
            Some(user) => {
                let slot = user as usize;
                if self.users.timestamps[slot] == profile.timestamp
                    && self.users.histories[slot] == history
                {
                    return None;
                }
                // Retract before the old history's items may leave the table.
                let old = (self.profile(user), self.users.sums(user).to_vec());
                emit((key, old), -1);
                user
            }
            None => self.users.add(key, &profile.user_id),
        };
        self.users.timestamps[user as usize] = profile.timestamp;
        let old = std::mem::replace(&mut self.users.histories[user as usize], history);
        // Only the items gained or lost change holders: when a history grows by its newest
        // items, as a user's does, that is a few, not all of them.
        let (new, old) = (
            distinct(&self.users.histories[user as usize]),
            distinct(&old),
        );
        for &item in &new {
            if old.binary_search(&item).is_err() {
                self.items.holders_mut(item).insert(user);
            }
        }
        for &item in &old {
            if new.binary_search(&item).is_err() {
                self.items.holders_mut(item).remove(&user);
                self.items.release_if_unused(item);
            }
        }
        Some(user)
    }

    /// The user's current profile, with its strings.
    fn profile(&self, user: UserIndex) -> Profile {
        Profile {
            user_id: self.users.id(user).to_owned(),
            timestamp: self.users.timestamps[user as usize],
            history_items: self.users.histories[user as usize]
                .iter()
                .map(|&item| self.items.id(item).to_owned())
                .collect(),
        }
    }

    /// The sums of the user's current history and features.
    fn compute_sums(&self, user: UserIndex) -> Vec<isize> {
        let InterestParams { dim, decay } = self.params;
        let history = &self.users.histories[user as usize];
        // k is the distance from the newest item; every position counts, known or not.
        let newest = history.len().saturating_sub(1);
        let known: Vec<(u32, &[f32])> = history
            .iter()
            .enumerate()
            .filter_map(|(i, &item)| Some(((newest - i) as u32, self.items.features(item)?)))
            .collect();
        Contribution::history(dim, decay, &known)
    }
}

/// The items of `history`, sorted, each once.
fn distinct(history: &[ItemIndex]) -> Vec<ItemIndex> {
    let mut items = history.to_vec();
    items.sort_unstable();
    items.dedup();
    items
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAMS: InterestParams = InterestParams { dim: 1, decay: 0.5 };

    fn profile(user: &str, timestamp: u64, items: &[&str]) -> Profile {
        Profile {
            user_id: user.into(),
            timestamp,
            history_items: items.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn features(item: &str, x: Option<f32>) -> (String, Option<FeatureVector>) {
        (item.into(), x.and_then(|x| FeatureVector::new(&[x])))
    }

    /// Applies an epoch and returns its changes as (user, timestamp, known items, diff).
    fn epoch(
        holdings: &mut Holdings,
        updates: Vec<(String, Option<FeatureVector>)>,
        profiles: Vec<Profile>,
    ) -> Vec<(String, u64, isize, isize)> {
        let mut changes = Vec::new();
        holdings.apply_epoch(updates, profiles, |(_, (profile, sums)), diff| {
            changes.push((
                profile.user_id,
                profile.timestamp,
                sums[Contribution::KNOWN],
                diff,
            ))
        });
        changes.sort();
        changes
    }

    #[test]
    fn an_unchanged_profile_emits_nothing_and_a_new_timestamp_does() {
        let mut holdings = Holdings::new(PARAMS);
        let a = |t| profile("a", t, &["x"]);
        assert_eq!(
            epoch(&mut holdings, vec![], vec![a(1)]),
            [("a".into(), 1, 0, 1)]
        );
        assert!(epoch(&mut holdings, vec![], vec![a(1)]).is_empty());
        assert_eq!(
            epoch(&mut holdings, vec![], vec![a(2)]),
            [("a".into(), 1, 0, -1), ("a".into(), 2, 0, 1)]
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
        epoch(&mut holdings, vec![], vec![profile("a", 2, &["x"])]);
        assert_eq!(holdings.items.find(id_key("u")), None);
        assert_eq!(holdings.items.free.len(), 1);
        // The freed entry goes to a new item, held by b only.
        epoch(&mut holdings, vec![], vec![profile("b", 1, &["v"])]);
        assert!(holdings.items.free.is_empty());
        assert_eq!(
            epoch(&mut holdings, vec![features("v", Some(1.0))], vec![]),
            [("b".into(), 1, 0, -1), ("b".into(), 1, 1, 1)]
        );
        // A deleted item no one holds leaves the table.
        epoch(&mut holdings, vec![features("w", Some(1.0))], vec![]);
        epoch(&mut holdings, vec![features("w", None)], vec![]);
        assert_eq!(holdings.items.find(id_key("w")), None);
    }

    #[test]
    fn a_feature_change_that_leaves_the_sums_alone_emits_nothing() {
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
}
