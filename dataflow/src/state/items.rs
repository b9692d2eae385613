//! The item table: every item a worker knows, as columns indexed by [`ItemIndex`].
//!
//! Two operators of a worker share it (they run on the same thread): the profile upsert
//! interns the items of each new history and counts, per item, the current profiles that hold
//! it; the interest operator keeps the dense feature cache up to date from the features
//! arrangement and reads it 50 times a message. A history is a list of 4-byte indices into
//! this table, in the profile arrangement and everywhere else: 50 ASIN-like ids as `String`s
//! take ~2 KB, as indices 200 bytes.
//!
//! An item is kept while it has features or a current profile holds it. One that has neither is
//! released, and its index reused, but only once the interest operator has finished the epoch
//! in which it was last let go (see [`ItemTable::release_unused`]): the upsert runs ahead of the
//! interest operator by up to a few epochs, and the batches in between may still name the
//! index in a history the interest operator has yet to read.

use smol_str::SmolStr;

use crate::key_index::KeyIndex;
use crate::model::{FeatureVector, IdKey};

/// An item's place in its worker's item table. Four bytes, of which a holder change key takes
/// 31 (see `holders.rs`): a table of 2^31 items would take hundreds of gigabytes, far beyond
/// any worker.
pub type ItemIndex = u32;

/// The most items one worker's table can hold (see [`ItemIndex`]).
const MAX_ITEMS_PER_WORKER: usize = 1 << 31;

/// How an item is held by the current profiles.
#[derive(Debug, Clone, Copy, Default)]
struct Holding {
    /// How many places in current profiles hold the item (an item twice in one history counts
    /// twice). Kept by the profile upsert as it replaces histories.
    places: u32,
    /// The last epoch in which a history took the item in or let it go: an epoch the interest
    /// operator reads up to may name it, as a current history's item, until then.
    last_changed: u64,
}

/// The items known to a worker, as columns indexed by [`ItemIndex`].
#[derive(Debug)]
pub struct ItemTable {
    dim: usize,
    /// Looked up 50 times a message: see [`KeyIndex`] for how those lookups overlap.
    index: KeyIndex,
    keys: Vec<IdKey>,
    /// Each item's id, read to encode a history. Inline (see [`SmolStr`]) for ids of up to 23
    /// bytes, which ASIN-like ids are.
    ids: Vec<SmolStr>,
    /// The feature cache: `features[item * dim..][..dim]` for each item that has features (see
    /// `known`). Kept from the features arrangement's batches by the interest operator; every
    /// vector has D values, since the features file and the topic's decoder refuse any other.
    features: Vec<f32>,
    /// Whether each item has features. A column of its own, read with the features for every
    /// item of a changed history: a byte per item stays in the caches.
    known: Vec<bool>,
    /// How each item is held (see [`Holding`]): one column of both fields, since a history
    /// taken in or let go updates both, for 50 items scattered over a table larger than the
    /// caches.
    holding: Vec<Holding>,
    /// Items let go by their last holder, with the epoch in which that happened, oldest first:
    /// candidates for release once the interest operator has finished that epoch.
    let_go: std::collections::VecDeque<(u64, ItemIndex)>,
    /// Entries released for reuse, so ids seen once (an unknown item in one history) do not
    /// grow the table forever.
    free: Vec<ItemIndex>,
    /// See [`ItemTable::hold_from`].
    hold: Option<u64>,
}

impl ItemTable {
    /// An empty table of items with `dim` features each.
    pub fn new(dim: usize) -> Self {
        ItemTable {
            dim,
            index: KeyIndex::default(),
            keys: Vec::new(),
            ids: Vec::new(),
            features: Vec::new(),
            known: Vec::new(),
            holding: Vec::new(),
            let_go: Default::default(),
            free: Vec::new(),
            hold: None,
        }
    }

    /// The number of items held now (released entries are not).
    pub fn len(&self) -> usize {
        self.keys.len() - self.free.len()
    }

    /// Whether no item is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of entries, held or released: one past the greatest [`ItemIndex`] in use.
    pub fn slots(&self) -> usize {
        self.keys.len()
    }

    /// Keeps every item that a profile held at some epoch from `time` on, however the profiles
    /// change after it, until the hold moves on: a checkpoint reads the profiles as of a time
    /// the interest operator has passed, and names their items by this table (see
    /// `checkpoint::take`). `None` lets go.
    pub fn hold_from(&mut self, time: Option<u64>) {
        self.hold = time;
    }

    /// The index of the item whose key is `key`, if the table has it.
    pub fn find(&self, key: IdKey) -> Option<ItemIndex> {
        self.index.get(key)
    }

    /// Loads the index slots of `keys`, so that interning them next finds them in cache.
    pub fn touch(&self, keys: impl IntoIterator<Item = IdKey>) {
        self.index.touch(keys);
    }

    /// Makes room for `additional` more items, so that interning them copies no column and
    /// rehashes no index on the way (the features file brings every item at once).
    /// Exactly that room: `Vec::reserve` may double a column that is larger than the items
    /// to come.
    pub fn reserve(&mut self, additional: usize) {
        self.keys.reserve_exact(additional);
        self.ids.reserve_exact(additional);
        self.features.reserve_exact(additional * self.dim);
        self.known.reserve_exact(additional);
        self.holding.reserve_exact(additional);
        self.index.reserve(additional);
    }

    /// The index of the item `id` whose key is `key`, added if new.
    pub fn intern(&mut self, key: IdKey, id: &str) -> ItemIndex {
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
                // A capacity limit, like running out of memory, which at this size would come
                // first.
                assert!(
                    self.keys.len() < MAX_ITEMS_PER_WORKER,
                    "a worker holds {MAX_ITEMS_PER_WORKER} items, its most"
                );
                self.keys.push(key);
                self.ids.push(id.into());
                self.features.resize(self.features.len() + self.dim, 0.0);
                self.known.push(false);
                self.holding.push(Holding::default());
                (self.keys.len() - 1) as ItemIndex
            }
        };
        self.index.insert(key, item);
        item
    }

    /// The item's id.
    pub fn id(&self, item: ItemIndex) -> &str {
        &self.ids[item as usize]
    }

    /// Loads the lines of the items' ids and features, so that reading them next finds them in
    /// cache: the rows of a history are scattered over tables larger than the caches, and in a
    /// loop where nothing waits on the loads their cache misses overlap. Returns nothing
    /// useful; it is only about where the lines are afterwards.
    pub fn touch_rows(&self, history: &[ItemIndex]) {
        let mut touch = 0usize;
        for &item in history {
            touch = touch.wrapping_add(self.ids[item as usize].len());
            if let Some(x) = self.features(item) {
                touch = touch
                    .wrapping_add((x.first().unwrap_or(&0.0) + x.last().unwrap_or(&0.0)) as usize);
            }
        }
        std::hint::black_box(touch);
    }

    /// Loads the lines of the items' ids, as [`touch_rows`](Self::touch_rows) does with their
    /// features too.
    pub fn touch_ids(&self, history: &[ItemIndex]) {
        let touch = history.iter().fold(0usize, |touch, &item| {
            touch.wrapping_add(self.ids[item as usize].len())
        });
        std::hint::black_box(touch);
    }

    /// The item's features, if it has any.
    pub fn features(&self, item: ItemIndex) -> Option<&[f32]> {
        let item = item as usize;
        self.known[item].then(|| &self.features[item * self.dim..][..self.dim])
    }

    /// Sets the item's features in the cache; returns whether they changed.
    pub fn set_features(&mut self, item: ItemIndex, features: Option<&FeatureVector>) -> bool {
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

    /// A history of `epoch` takes the items in: each place counts once.
    pub fn take(&mut self, epoch: u64, history: &[ItemIndex]) {
        for &item in history {
            let holding = &mut self.holding[item as usize];
            holding.places += 1;
            holding.last_changed = epoch;
        }
    }

    /// A history replaced in `epoch` lets its items go; an item no place holds any more becomes
    /// a candidate for release once the interest operator has finished `epoch`.
    pub fn let_go(&mut self, epoch: u64, history: &[ItemIndex]) {
        for &item in history {
            let holding = &mut self.holding[item as usize];
            holding.last_changed = epoch;
            holding.places -= 1;
            if holding.places == 0 {
                self.let_go.push_back((epoch, item));
            }
        }
    }

    /// Releases every item let go in an epoch up to `finished` that nothing needs any more: it
    /// has no features, no place holds it, and no history took it in or let it go after
    /// `finished` (the profiles of the epochs in between still name it). Calls
    /// `released` with each, so that what is kept beside the table goes too.
    pub fn release_unused(&mut self, finished: u64, mut released: impl FnMut(ItemIndex)) {
        let finished = self.releasable_up_to(finished);
        while let Some(&(epoch, item)) = self.let_go.front() {
            if epoch > finished {
                break;
            }
            self.let_go.pop_front();
            self.release_if_unused(item, finished, &mut released);
        }
    }

    /// The last epoch whose changes may release items, with the interest operator done with
    /// `finished`: the hold's time comes first, as the profiles as of it may still name an
    /// item a later epoch let go.
    fn releasable_up_to(&self, finished: u64) -> u64 {
        self.hold.map_or(finished, |hold| finished.min(hold))
    }

    /// Releases `item` if nothing needs it any more (see [`Self::release_unused`]).
    pub fn release_if_unused(
        &mut self,
        item: ItemIndex,
        finished: u64,
        released: &mut impl FnMut(ItemIndex),
    ) {
        let finished = self.releasable_up_to(finished);
        let slot = item as usize;
        // A released entry may be let go again only after it is reused: `held` is 0 and the
        // key is out of the index. Twice in the queue is harmless for the same reason.
        let in_use = self.index.get(self.keys[slot]) == Some(item);
        if in_use
            && !self.known[slot]
            && self.holding[slot].places == 0
            && self.holding[slot].last_changed <= finished
        {
            self.index.remove(self.keys[slot]);
            self.ids[slot] = SmolStr::default();
            self.free.push(item);
            released(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::id_key;

    #[test]
    fn an_item_let_go_is_released_only_after_its_epoch_and_if_not_taken_again() {
        let mut items = ItemTable::new(1);
        let x = items.intern(id_key("x"), "x");
        items.take(1, &[x, x]);
        items.let_go(2, &[x]);
        items.let_go(2, &[x]);
        // Taken again at 3 by a profile the interest operator has not read yet.
        items.take(3, &[x]);
        items.let_go(4, &[x]);
        let mut released = Vec::new();
        items.release_unused(2, |item| released.push(item));
        assert!(
            released.is_empty(),
            "taken in at 3, after the finished epoch"
        );
        items.release_unused(3, |item| released.push(item));
        assert!(released.is_empty(), "let go at 4 only");
        // Taken in at 4 and let go at 5 by profiles the interest operator has yet to read.
        items.take(4, &[x]);
        items.let_go(5, &[x]);
        items.release_unused(4, |item| released.push(item));
        assert!(
            released.is_empty(),
            "the profiles of epochs 4 and 5 name it"
        );
        items.release_unused(5, |item| released.push(item));
        assert_eq!(released, [x]);
        assert_eq!(items.find(id_key("x")), None);
        // The entry goes to the next new item.
        assert_eq!(items.intern(id_key("y"), "y"), x);
        assert_eq!(items.id(x), "y");
    }

    #[test]
    fn a_hold_keeps_the_items_of_the_profiles_as_of_its_time() {
        let mut items = ItemTable::new(1);
        let x = items.intern(id_key("x"), "x");
        items.take(1, &[x]);
        items.hold_from(Some(4));
        // Let go at 6: a checkpoint as of 4 still names it.
        items.let_go(6, &[x]);
        let mut released = Vec::new();
        items.release_unused(8, |item| released.push(item));
        items.release_if_unused(x, 8, &mut |item| released.push(item));
        assert!(released.is_empty());
        items.hold_from(Some(7));
        items.release_unused(8, |item| released.push(item));
        assert_eq!(released, [x]);
    }

    #[test]
    fn an_item_with_features_is_kept_without_holders() {
        let mut items = ItemTable::new(2);
        let x = items.intern(id_key("x"), "x");
        assert!(items.set_features(x, FeatureVector::new(&[1.0, 2.0]).as_ref()));
        assert!(!items.set_features(x, FeatureVector::new(&[1.0, 2.0]).as_ref()));
        items.take(1, &[x]);
        items.let_go(2, &[x]);
        items.release_unused(2, |_| panic!("x has features"));
        assert_eq!(items.features(x), Some(&[1.0, 2.0][..]));
        assert!(items.set_features(x, None));
        let mut released = Vec::new();
        items.release_if_unused(x, 2, &mut |item| released.push(item));
        assert_eq!(released, [x]);
    }
}
