//! The holders index: for each item, the local users whose current history holds it, so that a
//! feature change finds the users to recompute in O(holders).
//!
//! This is a hand-made structure, not an arrangement, because it is on the hot path of every
//! message: an arrangement of (item, user) pairs was measured at +4–5 µs a message (50 records
//! per message to sort, merge and retract), against a fraction of a microsecond for these
//! append-only lists, whose stale entries are skipped by a tag and dropped in amortised O(1).
//!
//! A user's entries are tagged with the version of its history (see [`Holder`]); a new history
//! appends the user, tagged with its new version, to the list of each of its items, and leaves
//! the old entries to go stale. Nothing needs to leave a list: the item table counts holders
//! itself (see `items.rs`). Appending profile by profile touched a random list end per item;
//! the joins are held back and applied sorted by item once per epoch
//! (see [`HoldersIndex::apply`]), so each list is reached once per batch, in address order.

use super::items::ItemIndex;
use super::users::{UserIndex, UserTable};

/// An entry of an item's holders list: a user, and a tag of the version of the user's history
/// that holds the item, in four bytes.
///
/// An entry is current while its tag is the user's version: the user has not changed its
/// history since. The tag is the version's low [`TAG_BITS`] bits, so a stale entry passes for
/// current when its user's version has moved on by a multiple of 256 since. That costs the user
/// one needless recomputation when the item's features change, which emits nothing (its output
/// is unchanged); it never makes a holder missed, since a current entry always passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Holder(u32);

/// Bits of a [`Holder`] that tag the version.
pub const TAG_BITS: u32 = 8;

/// The most users one worker can hold: a [`Holder`] has the other 24 bits for the user's index.
/// At about a kilobyte of state per user that is some 16 GB, more than one worker should hold;
/// add workers or processes instead.
pub const MAX_USERS_PER_WORKER: usize = 1 << (32 - TAG_BITS);

impl Holder {
    /// The entry of `user` at `version`.
    pub fn new(user: UserIndex, version: u32) -> Self {
        Holder(user | version << (32 - TAG_BITS))
    }

    /// The user.
    pub fn user(self) -> UserIndex {
        self.0 & (MAX_USERS_PER_WORKER as u32 - 1)
    }

    /// The tag of the version that took the item in.
    pub fn tag(self) -> u32 {
        self.0 >> (32 - TAG_BITS)
    }
}

/// One item's holders, current and stale.
#[derive(Debug, Default)]
struct HolderList {
    holders: Vec<Holder>,
    /// The length of `holders` after it was last compacted.
    compacted_len: u32,
}

/// A list is compacted when it passes twice its length after the last compaction plus this
/// many, so that a small list is not compacted at every push.
const COMPACTION_SLACK: usize = 16;

impl HolderList {
    /// Drops the stale entries once the list has doubled since it was last compacted:
    /// amortised O(1) a push, and a list at most about twice as long as it was then.
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

/// The holders list of every item, indexed like the item table.
#[derive(Debug, Default)]
pub struct HoldersIndex {
    lists: Vec<HolderList>,
    /// Joins held back until [`HoldersIndex::apply`].
    joins: Vec<HolderChange>,
}

/// Joins held back before they are applied within an epoch: 8 MB (and as much sort buffer),
/// so that a large epoch does not hold all of its own.
pub const HOLDER_CHANGES_BATCH: usize = 1 << 20;

/// A user's entry joining an item's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HolderChange {
    item: ItemIndex,
    holder: Holder,
}

impl HoldersIndex {
    /// Records that `user`'s history, at `version`, holds `history`'s items. The lists see it
    /// at the next [`HoldersIndex::apply`].
    pub fn join(&mut self, user: UserIndex, version: u32, history: &[ItemIndex]) {
        let holder = Holder::new(user, version);
        self.joins
            .extend(history.iter().map(|&item| HolderChange { item, holder }));
    }

    /// Whether enough joins are held back to apply them within an epoch.
    pub fn is_full(&self) -> bool {
        self.joins.len() >= HOLDER_CHANGES_BATCH
    }

    /// Applies the joins held back, sorted by item so that each list is reached once, in
    /// address order; a stable sort, so each list gets its entries in the order the profiles
    /// were set.
    pub fn apply(&mut self, users: &UserTable) {
        radsort::sort_by_key(&mut self.joins, |change| change.item);
        for changes in self.joins.chunk_by(|a, b| a.item == b.item) {
            let item = changes[0].item as usize;
            if item >= self.lists.len() {
                self.lists.resize_with(item + 1, HolderList::default);
            }
            let list = &mut self.lists[item];
            // An item twice in one history is one holder: its two joins are equal, and
            // adjacent once sorted.
            let mut previous = None;
            for &change in changes {
                if previous.replace(change) != Some(change) {
                    list.holders.push(change.holder);
                }
            }
            list.compact_if_grown(users);
        }
        self.joins.clear();
    }

    /// The users whose current history holds `item` (and, one time in 256, a user whose stale
    /// entry passes for current; see [`Holder`]), after the joins applied so far. Reading a
    /// list is the time to drop its stale entries.
    pub fn current_holders(
        &mut self,
        item: ItemIndex,
        users: &UserTable,
    ) -> impl Iterator<Item = UserIndex> + '_ {
        let list = self.lists.get_mut(item as usize);
        let holders = match list {
            Some(list) => {
                list.compact(users);
                &list.holders[..]
            }
            None => &[],
        };
        holders.iter().map(|holder| holder.user())
    }

    /// Forgets a released item's list; its buffer goes too, which a once popular item's makes
    /// large.
    pub fn release(&mut self, item: ItemIndex) {
        if let Some(list) = self.lists.get_mut(item as usize) {
            *list = HolderList::default();
        }
    }

    /// The number of entries in `item`'s list, stale ones included.
    #[cfg(test)]
    pub fn entries(&self, item: ItemIndex) -> usize {
        self.lists
            .get(item as usize)
            .map_or(0, |list| list.holders.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_stay_bounded_and_reach_only_current_holders() {
        let mut users = UserTable::default();
        let mut index = HoldersIndex::default();
        let ids: Vec<UserIndex> = (0..40u128)
            .map(|u| users.find_or_add(u, &format!("user{u}")))
            .collect();
        // 40 users take item 0 in and out of their history 30 times; only the even ones end
        // with it.
        for round in 0..30usize {
            for &user in &ids {
                let holds = if round == 29 {
                    user.is_multiple_of(2)
                } else {
                    (round + user as usize).is_multiple_of(2)
                };
                let version = users.new_version(user);
                let history: &[ItemIndex] = if holds { &[0, 1] } else { &[1] };
                index.join(user, version, history);
            }
            index.apply(&users);
        }
        assert!(
            index.entries(0) <= 2 * 20 + COMPACTION_SLACK,
            "{}",
            index.entries(0)
        );
        let mut holders: Vec<UserIndex> = index.current_holders(0, &users).collect();
        holders.sort_unstable();
        let even: Vec<UserIndex> = ids
            .iter()
            .copied()
            .filter(|u| u.is_multiple_of(2))
            .collect();
        assert_eq!(holders, even);
        assert_eq!(index.entries(0), 20);
    }

    #[test]
    fn an_item_twice_in_a_history_is_one_entry() {
        let mut users = UserTable::default();
        let mut index = HoldersIndex::default();
        let user = users.find_or_add(7, "seven");
        assert_eq!(users.id(user), "seven");
        let version = users.new_version(user);
        index.join(user, version, &[3, 3, 2]);
        index.apply(&users);
        assert_eq!(index.current_holders(3, &users).collect::<Vec<_>>(), [user]);
        index.release(3);
        assert_eq!(index.current_holders(3, &users).count(), 0);
    }
}
