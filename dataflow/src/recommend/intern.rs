//! A worker's local numbering of the item ids its recommendation state holds: each distinct id
//! is kept once, and the per-item state refers to it by a `u32`.
//!
//! The co-visits are the largest state of the recommendations (tens of millions of pairs at
//! full scale): with each pair's partner as a 24-byte [`smol_str::SmolStr`] in a hash map and
//! again in an ordered set, a pair cost about 90 bytes, and ranking it meant comparing strings.
//! With local ids a pair is two `u32`s. The numbers are local to the worker and never leave it
//! (the exchanges and broadcasts between workers carry the ids themselves), so no two workers
//! or processes need to agree on them. They are not in the ids' order: where the contract breaks
//! a tie by id, the comparison reads the id back ([`Interner::value`]).
//!
//! An id keeps its number for the worker's lifetime, also once no state refers to it: the
//! table grows with the distinct items ever seen (about 60 bytes each), not with their pairs.

use foldhash::HashMap;

/// The local numbers of the values seen so far, and the value of each number.
#[derive(Debug)]
pub struct Interner<V> {
    numbers: HashMap<V, u32>,
    values: Vec<V>,
}

impl<V> Default for Interner<V> {
    fn default() -> Self {
        Interner {
            numbers: HashMap::default(),
            values: Vec::new(),
        }
    }
}

impl<V: Clone + Eq + std::hash::Hash> Interner<V> {
    /// The number of `value`, given the next free one if it has none yet.
    pub fn number(&mut self, value: &V) -> u32 {
        if let Some(&number) = self.numbers.get(value) {
            return number;
        }
        // Four billion distinct items per worker is beyond any catalogue this serves; the
        // checked conversion turns it into a clear stop rather than a silent mix-up.
        let number = u32::try_from(self.values.len()).expect("more than 2^32 distinct items");
        self.values.push(value.clone());
        self.numbers.insert(value.clone(), number);
        number
    }

    /// The number of `value`, if it has one.
    pub fn get<Q>(&self, value: &Q) -> Option<u32>
    where
        V: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.numbers.get(value).copied()
    }
}

impl<V> Interner<V> {
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
}
