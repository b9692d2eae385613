//! A worker's local numbering of the item ids its recommendation state holds: each distinct id
//! is kept once, and the per-item state refers to it by a `u32`.
//!
//! The co-visits are the largest state of the recommendations (tens of millions of pairs at
//! full scale): with each pair's partner as a 24-byte [`smol_str::SmolStr`] in a hash map and
//! again in an ordered set, a pair cost about 90 bytes, and ranking it meant comparing strings.
//! With local ids a pair is two `u32`s. The numbers are local to the worker: they are not in
//! the ids' order, so where the contract breaks a tie by id, [`Interner::cmp`] compares the ids
//! of two numbers, first by an 8-byte prefix kept beside them ([`OrderPrefix`]), which settles
//! almost every comparison without reading the ids themselves.
//!
//! An id keeps its number for the worker's lifetime, also once no state refers to it: the
//! table grows with the distinct items ever seen (about 40 bytes each), not with their pairs.

use std::cmp::Ordering;
use std::hash::BuildHasher;

use hashbrown::HashTable;
use smol_str::SmolStr;

/// A prefix of a value in the value's order: `x < y` implies `x.order_prefix() <=
/// y.order_prefix()`, so unequal prefixes order their values, and only equal ones need the
/// values compared.
pub trait OrderPrefix: Ord {
    fn order_prefix(&self) -> u64;
}

/// The first 8 bytes, big-endian, padded with zeros: in byte order a shorter string sorts
/// before its extensions, and padding only makes prefixes equal, never reversed.
fn bytes_prefix(bytes: &[u8]) -> u64 {
    let mut prefix = [0u8; 8];
    let len = bytes.len().min(8);
    prefix[..len].copy_from_slice(&bytes[..len]);
    u64::from_be_bytes(prefix)
}

impl OrderPrefix for SmolStr {
    fn order_prefix(&self) -> u64 {
        bytes_prefix(self.as_bytes())
    }
}

impl OrderPrefix for String {
    fn order_prefix(&self) -> u64 {
        bytes_prefix(self.as_bytes())
    }
}

impl OrderPrefix for u32 {
    fn order_prefix(&self) -> u64 {
        u64::from(*self)
    }
}

/// The local numbers of the values seen so far, and the value of each number.
///
/// Each value is kept once, in `values`: the hash table holds only numbers (4 bytes a slot and
/// a control byte, where a map from value to number held a 24-byte id again in 32-byte slots)
/// and compares a candidate through `values`. A worker keeps three such tables, each of
/// nearly every item.
#[derive(Debug)]
pub struct Interner<V> {
    numbers: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    values: Vec<V>,
    /// Each number's [`OrderPrefix`]: 8 bytes a number, read where ranks tie.
    prefixes: Vec<u64>,
}

impl<V> Default for Interner<V> {
    fn default() -> Self {
        Interner {
            numbers: HashTable::new(),
            hasher: foldhash::fast::RandomState::default(),
            values: Vec::new(),
            prefixes: Vec::new(),
        }
    }
}

impl<V: Clone + Eq + std::hash::Hash + OrderPrefix> Interner<V> {
    /// The number of `value`, given the next free one if it has none yet.
    pub fn number(&mut self, value: &V) -> u32 {
        let Interner {
            numbers,
            hasher,
            values,
            prefixes,
        } = self;
        let hash = hasher.hash_one(value);
        if let Some(&number) = numbers.find(hash, |&n| values[n as usize] == *value) {
            return number;
        }
        // Four billion distinct items per worker is beyond any catalogue this serves; the
        // checked conversion turns it into a clear stop rather than a silent mix-up.
        let number = u32::try_from(values.len()).expect("more than 2^32 distinct items");
        values.push(value.clone());
        prefixes.push(value.order_prefix());
        numbers.insert_unique(hash, number, |&n| hasher.hash_one(&values[n as usize]));
        number
    }

    /// The hash under which the table keeps `value` (that of its borrowed form, as [`get`]
    /// looks it up): a value's hash is the same for the table's lifetime.
    ///
    /// [`get`]: Self::get
    pub fn hash_of<Q: std::hash::Hash + ?Sized>(&self, value: &Q) -> u64 {
        self.hasher.hash_one(value)
    }

    /// The number of `value`, if it has one. (`V`'s hash must be its borrowed form's, as for
    /// a map's keys.)
    pub fn get<Q>(&self, value: &Q) -> Option<u32>
    where
        V: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let hash = self.hasher.hash_one(value);
        let values = &self.values;
        self.numbers
            .find(hash, |&n| values[n as usize].borrow() == value)
            .copied()
    }
}

impl<V: Ord> Interner<V> {
    /// The values numbered `x` and `y` compared (see [`OrderPrefix`]).
    ///
    /// # Panics
    /// If a number was not given by this table (a bug, not an input error).
    pub fn cmp(&self, x: u32, y: u32) -> Ordering {
        let (x, y) = (x as usize, y as usize);
        self.prefixes[x]
            .cmp(&self.prefixes[y])
            .then_with(|| self.values[x].cmp(&self.values[y]))
    }
}

impl<V> Interner<V> {
    /// The order prefix of the value numbered `number` ([`OrderPrefix`]): where many values
    /// are ranked at once, each read once.
    ///
    /// # Panics
    /// If `number` was not given by this table (a bug, not an input error).
    pub fn prefix(&self, number: u32) -> u64 {
        self.prefixes[number as usize]
    }

    /// The value numbered `number`.
    ///
    /// # Panics
    /// If `number` was not given by this table (a bug, not an input error).
    pub fn value(&self, number: u32) -> &V {
        &self.values[number as usize]
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn numbers_are_stable_and_read_back() {
        let mut table: Interner<String> = Interner::default();
        let a = table.number(&"a".to_string());
        let b = table.number(&"b".to_string());
        assert_ne!(a, b);
        assert_eq!(table.number(&"a".to_string()), a);
        assert_eq!(table.get("b"), Some(b));
        assert_eq!(table.get("c"), None);
        assert_eq!(table.value(b), "b");
        assert_eq!(table.value(a), "a");
    }

    #[test]
    fn every_value_is_found_through_the_tables_growth() {
        // Enough values for the table of numbers to grow many times, each rehash finding the
        // values through `values`: every value keeps its first number, found by `get` with the
        // borrowed form too, and a value never interned is not found.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let ids: Vec<SmolStr> = (0..20_000)
            .map(|i| SmolStr::new(format!("B{:08}{i}", rng.random_range(0..100_000_000u32))))
            .collect();
        let mut table: Interner<SmolStr> = Interner::default();
        let numbers: Vec<u32> = ids.iter().map(|id| table.number(id)).collect();
        for (id, &number) in ids.iter().zip(&numbers) {
            assert_eq!(table.number(id), number, "{id}");
            assert_eq!(table.get(id.as_str()), Some(number), "{id}");
            assert_eq!(table.value(number), id);
        }
        assert_eq!(table.get("not interned"), None);
    }

    #[test]
    fn numbers_compare_as_their_values() {
        // Short ids, long ids with shared prefixes, NUL bytes (where padding makes prefixes
        // equal), and multi-byte characters.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let alphabet = ["", "a", "b", "\0", "é", "B000", "B0001"];
        let mut values: Vec<SmolStr> =
            ["", "a", "a\0", "a\0\0\0\0\0\0\0\0", "abcdefgh", "abcdefghi"]
                .into_iter()
                .map(SmolStr::new)
                .collect();
        for _ in 0..300 {
            let parts = rng.random_range(0..6);
            let id: String = (0..parts)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            values.push(SmolStr::new(id));
        }
        let mut table: Interner<SmolStr> = Interner::default();
        let numbers: Vec<u32> = values.iter().map(|v| table.number(v)).collect();
        for (x, vx) in numbers.iter().zip(&values) {
            for (y, vy) in numbers.iter().zip(&values) {
                assert_eq!(table.cmp(*x, *y), vx.cmp(vy), "{vx:?} against {vy:?}");
            }
        }
    }
}
