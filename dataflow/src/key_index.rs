//! The item table's index: from an id's [`IdKey`] to its place in the table.
//!
//! Every profile message looks up its 50 items in an index larger than the caches, so each lookup
//! is a cache miss, and a general hash map waits for them one after the other: its probe loop
//! branches on what each load finds; `perf` put most of the lookup's time on the one load of the
//! bucket (docs/performance.md, "figures from code comments"). This index is laid out so that a
//! history's lookups can overlap instead: [`touch`](KeyIndex::touch) loads the home slot of every
//! key first, in a loop where no load depends on another and nothing branches on them, so the CPU
//! keeps many misses in flight; the lookups that follow find their slots in cache. (A prefetch
//! instruction would do the same without the loads, but it needs `unsafe`, which the workspace
//! forbids.)
//!
//! Open addressing with linear probing over a power-of-two table, at most 5/8 full. The home
//! slot is the key's low bits: keys are xxh3 hashes already, uniform in every bit. Removal
//! shifts the following entries back instead of leaving tombstones, so a table whose items
//! come and go (unknown ids are released once nothing holds them) never fills with them.

use crate::model::IdKey;

/// A slot's value when it is free: no table of 2^32 - 1 items fits in a worker.
const FREE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Slot {
    key: IdKey,
    value: u32,
}

const EMPTY: Slot = Slot {
    key: 0,
    value: FREE,
};

/// A map from [`IdKey`] to `u32`, with [`touch`](Self::touch) to overlap the cache misses of
/// many lookups.
#[derive(Debug, Default)]
pub struct KeyIndex {
    /// A power of two long, or empty.
    slots: Vec<Slot>,
    len: usize,
}

impl KeyIndex {
    /// The number of keys.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn home(&self, key: IdKey) -> usize {
        key as usize & (self.slots.len() - 1)
    }

    /// Loads the home slot of each key so that looking them up next finds them in cache.
    /// Returns nothing useful; it is only about where the slots are afterwards.
    pub fn touch(&self, keys: impl IntoIterator<Item = IdKey>) {
        if self.slots.is_empty() {
            return;
        }
        let mut sum = 0u32;
        for key in keys {
            sum = sum.wrapping_add(self.slots[self.home(key)].value);
        }
        std::hint::black_box(sum);
    }

    /// The slot that holds `key`, or the free slot where it would go.
    fn find_slot(&self, key: IdKey) -> usize {
        let mask = self.slots.len() - 1;
        let mut at = self.home(key);
        loop {
            let slot = &self.slots[at];
            if slot.value == FREE || slot.key == key {
                return at;
            }
            at = (at + 1) & mask;
        }
    }

    /// The value of `key`, if it has one.
    pub fn get(&self, key: IdKey) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let slot = self.slots[self.find_slot(key)];
        (slot.value != FREE).then_some(slot.value)
    }

    /// Sets the value of `key`; returns the one it replaced.
    ///
    /// # Panics
    /// If `value` is `u32::MAX`, which marks a free slot.
    pub fn insert(&mut self, key: IdKey, value: u32) -> Option<u32> {
        assert!(value != FREE, "u32::MAX marks a free slot");
        if (self.len + 1) * 8 > self.slots.len() * 5 {
            self.grow();
        }
        let at = self.find_slot(key);
        let slot = &mut self.slots[at];
        let old = (slot.value != FREE).then_some(slot.value);
        if old.is_none() {
            self.len += 1;
        }
        *slot = Slot { key, value };
        old
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, key: IdKey) -> Option<u32> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut hole = self.find_slot(key);
        let value = self.slots[hole].value;
        if value == FREE {
            return None;
        }
        // Shift back every entry of the run after the hole that may move into it: one whose
        // home is not in (hole, at], cyclically, so that it stays reachable from its home.
        let mut at = hole;
        loop {
            at = (at + 1) & mask;
            let slot = self.slots[at];
            if slot.value == FREE {
                break;
            }
            let home = self.home(slot.key);
            let reachable_without_hole = if hole <= at {
                hole < home && home <= at
            } else {
                hole < home || home <= at
            };
            if !reachable_without_hole {
                self.slots[hole] = slot;
                hole = at;
            }
        }
        self.slots[hole] = EMPTY;
        self.len -= 1;
        Some(value)
    }

    /// Makes room for `additional` more keys, so that inserting them rehashes the table at
    /// most once, here, instead of at every doubling on the way.
    pub fn reserve(&mut self, additional: usize) {
        let wanted = self.len + additional;
        let mut capacity = self.slots.len().max(16);
        while wanted * 8 > capacity * 5 {
            capacity *= 2;
        }
        if capacity > self.slots.len() {
            self.rehash(capacity);
        }
    }

    fn grow(&mut self) {
        self.rehash((self.slots.len() * 2).max(16));
    }

    /// Moves every entry into a table of `capacity` slots (a power of two).
    fn rehash(&mut self, capacity: usize) {
        let old = std::mem::replace(&mut self.slots, vec![EMPTY; capacity]);
        for slot in old.into_iter().filter(|slot| slot.value != FREE) {
            let at = self.find_slot(slot.key);
            self.slots[at] = slot;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn matches_a_hash_map_under_random_inserts_and_removals() {
        for seed in 0..20 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut index = KeyIndex::default();
            let mut expected: HashMap<IdKey, u32> = HashMap::new();
            // Few distinct home bits, so that runs are long and wrap around the table's end.
            let keys: Vec<IdKey> = (0..300)
                .map(|_| {
                    let low: u128 = rng.random_range(0..64);
                    (rng.random::<u128>() << 16) | low
                })
                .collect();
            for step in 0..5_000 {
                let key = keys[rng.random_range(0..keys.len())];
                if rng.random_bool(0.4) {
                    assert_eq!(
                        index.remove(key),
                        expected.remove(&key),
                        "seed {seed} step {step}"
                    );
                } else {
                    let value = rng.random_range(0..1_000_000);
                    assert_eq!(index.insert(key, value), expected.insert(key, value));
                }
                assert_eq!(index.len(), expected.len());
                if step % 97 == 0 {
                    index.touch(keys.iter().copied());
                    for key in &keys {
                        assert_eq!(index.get(*key), expected.get(key).copied(), "seed {seed}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_reserved_index_keeps_its_keys_and_takes_the_reserved_ones_without_growing() {
        let mut index = KeyIndex::default();
        for key in 0..100u128 {
            index.insert(key << 64 | key, key as u32);
        }
        index.reserve(1_000);
        let slots = index.slots.len();
        assert!(1_100 * 8 <= slots * 5);
        for key in 100..1_100u128 {
            index.insert(key << 64 | key, key as u32);
        }
        assert_eq!(index.slots.len(), slots, "grew after reserving");
        for key in 0..1_100u128 {
            assert_eq!(index.get(key << 64 | key), Some(key as u32));
        }
        index.reserve(0);
        assert_eq!(index.slots.len(), slots);
    }

    #[test]
    fn an_empty_index_finds_nothing() {
        let mut index = KeyIndex::default();
        index.touch([1, 2, 3]);
        assert_eq!(index.get(7), None);
        assert_eq!(index.remove(7), None);
        assert!(index.is_empty());
        assert_eq!(index.insert(7, 0), None);
        assert_eq!(index.insert(7, 1), Some(0));
        assert_eq!(index.get(7), Some(1));
        assert_eq!(index.remove(7), Some(1));
        assert!(index.is_empty());
    }
}
