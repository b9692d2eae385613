//! What a worker keeps of each local user beside the profile arrangement: a dense 4-byte index
//! (the profile arrangement's key and the holders lists' entries), the user's id and the
//! version of its history. The profile itself (timestamp, history) lives in the arrangement.
//!
//! The profile upsert and the interest operator share the table (they run on the same worker
//! thread): the upsert adds each new user with its id, the interest operator keeps the rest.
//! The ids live here, once, in one buffer, rather than in the arrangement's values, which the
//! arrangement copies into every batch and merge.

use rustc_hash::FxHashMap;

use super::holders::{Holder, MAX_USERS_PER_WORKER, TAG_BITS};
use crate::model::IdKey;

/// A user's place in its worker's user table, four bytes: a [`Holder`] packs it with a tag.
pub type UserIndex = u32;

/// The users routed to a worker, as columns indexed by [`UserIndex`]. Users are never removed
/// (a profile is never deleted).
#[derive(Debug, Default)]
pub struct UserTable {
    index: FxHashMap<IdKey, UserIndex>,
    /// Every user id, one after the other: user `u`'s ends at `id_ends[u]`. Users are never
    /// removed, so an append-only buffer: no allocation per user.
    ids: String,
    id_ends: Vec<usize>,
    /// The version of each user's history (see [`Holder`]).
    versions: Vec<u32>,
}

impl UserTable {
    /// The index of the user `id` whose key is `key`, added if new.
    pub fn find_or_add(&mut self, key: IdKey, id: &str) -> UserIndex {
        if let Some(&user) = self.index.get(&key) {
            return user;
        }
        // A capacity limit, like running out of memory, which at this size would come first.
        assert!(
            self.id_ends.len() < MAX_USERS_PER_WORKER,
            "a worker holds {MAX_USERS_PER_WORKER} users, its most: run more workers or processes"
        );
        let user = self.id_ends.len() as UserIndex;
        self.index.insert(key, user);
        self.ids.push_str(id);
        self.id_ends.push(self.ids.len());
        self.versions.push(0);
        user
    }

    /// The number of users held.
    pub fn len(&self) -> usize {
        self.id_ends.len()
    }

    /// Whether no user is held.
    pub fn is_empty(&self) -> bool {
        self.id_ends.is_empty()
    }

    /// The user's id.
    pub fn id(&self, user: UserIndex) -> &str {
        let user = user as usize;
        let start = user.checked_sub(1).map_or(0, |before| self.id_ends[before]);
        &self.ids[start..self.id_ends[user]]
    }

    /// Starts a new version of the user's history, which makes its holder entries stale, and
    /// returns it.
    pub fn new_version(&mut self, user: UserIndex) -> u32 {
        let version = &mut self.versions[user as usize];
        *version = version.wrapping_add(1);
        *version
    }

    /// Whether `holder` is a current entry: its user has not changed its history since (or, one
    /// time in 256, a stale one that passes for current; see [`Holder`]).
    pub fn is_current(&self, holder: Holder) -> bool {
        self.versions[holder.user() as usize] % (1 << TAG_BITS) == holder.tag()
    }
}
