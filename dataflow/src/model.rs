//! The records that flow through the dataflow. Everything here is plain ordered data: floats are
//! compared by their bit patterns, so that records can be compared and sorted, and they never
//! appear in a key.

/// A user's value as the sink stores it: a [`UserInterest`] encoded as the Redis value of
/// semantics §6 (user id, JSON, and the timestamp and epoch the write script compares).
pub use sink::EncodedProfile;

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

/// An id (user or item) as the dataflow keys it: the 128-bit xxh3 hash of its bytes. Fixed-size
/// keys hash and compare in a few instructions where strings would chase pointers; each string
/// itself is kept once, in the interest operator's tables. With 128 bits, a collision among even
/// a billion ids has odds below 10^-20.
pub type IdKey = u128;

/// The [`IdKey`] of an id. The seed is fixed, so every worker and process agrees.
pub fn id_key(id: &str) -> IdKey {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

/// Where a message was read: its partition and offset. Within an epoch, messages are applied in
/// this order, which for one partition is the order they were read in.
pub type ReadPosition = (i32, i64);

/// A valid profile message as it enters the dataflow; its history is already cut to the kept
/// length (semantics §4).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProfileEvent {
    pub user_id: String,
    /// `id_key(user_id)`, hashed once where the message is read: the exchange, the epoch's
    /// upserts and the worker's user table all key by it.
    pub user_key: IdKey,
    pub timestamp: u64,
    pub history_items: IdList,
    pub position: ReadPosition,
}

/// A list of ids in one buffer, in order. A message's 50 item ids as `Vec<String>` are 51
/// allocations, made when it is decoded and freed once the ids are interned; as an `IdList`
/// they are two, whatever their number.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdList {
    /// Every id, one after the other: id `i` ends at `ends[i]`.
    text: String,
    ends: Vec<u32>,
}

impl IdList {
    /// The list of `ids`, in their order.
    pub fn new<S: AsRef<str>>(ids: &[S]) -> Self {
        Self::from_ids(ids.iter().map(AsRef::as_ref))
    }

    /// The list of the ids `ids` yields, in their order: [`IdList::new`] without a slice to
    /// hold them first. The ids are gone over twice, once to size the buffer.
    pub fn from_ids<'a>(ids: impl ExactSizeIterator<Item = &'a str> + Clone) -> Self {
        let mut list = IdList {
            text: String::with_capacity(ids.clone().map(str::len).sum()),
            ends: Vec::with_capacity(ids.len()),
        };
        for id in ids {
            list.text.push_str(id);
            // A message is at most a few megabytes (bincode's limit is 16 MiB), far below 4 GiB.
            list.ends.push(list.text.len() as u32);
        }
        list
    }

    /// The ids, in order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator + '_ {
        (0..self.ends.len()).map(|i| {
            let start = i.checked_sub(1).map_or(0, |before| self.ends[before]);
            &self.text[start as usize..self.ends[i] as usize]
        })
    }

    /// Loads the list's bytes, so that reading it next finds them in cache. Returns nothing
    /// useful: it is only about where the lines are afterwards.
    pub fn touch(&self) {
        let text = self.text.as_bytes().iter().step_by(64).map(|&b| b as u32);
        let ends = self.ends.iter().step_by(16).copied();
        std::hint::black_box(text.chain(ends).fold(0u32, u32::wrapping_add));
    }

    /// Adds `id` at the end.
    pub fn push(&mut self, id: &str) {
        self.text.push_str(id);
        // A list's text stays far below 4 GiB: a message is at most a few megabytes, and a
        // checkpoint's id lists hold one worker's ids.
        self.ends.push(self.text.len() as u32);
    }

    /// Id `i`; panics if there is none, like indexing.
    pub fn get(&self, i: usize) -> &str {
        let start = i.checked_sub(1).map_or(0, |before| self.ends[before]);
        &self.text[start as usize..self.ends[i] as usize]
    }

    /// The bytes of all ids together.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    /// Whether every id's end is in order, within the text and on a character boundary: true
    /// of every list built here, checked for one decoded from a file.
    pub fn is_well_formed(&self) -> bool {
        let mut start = 0;
        self.ends.iter().all(|&end| {
            let ok = start <= end && self.text.is_char_boundary(end as usize);
            start = end;
            ok
        })
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// A user's output (semantics §6) as the dataflow computes it: the data of the interest
/// collection, in which each epoch retracts the old value of every user whose output changed and
/// inserts the new one. The epoch is the update's time, not part of the value; encoding it for
/// Redis is the sink's stage.
#[derive(Clone, Debug)]
pub struct UserInterest {
    pub user_id: SmolStr,
    /// The timestamp of the message that set the profile.
    pub timestamp: u64,
    /// The kept history, oldest first.
    pub history_items: IdList,
    /// Compared by bit pattern (see the `Ord` below): the dataflow's outputs are the same bits
    /// on any number of workers, so equality means the same bits.
    pub interest_vector: Vec<f32>,
    /// How many history items had features.
    pub known_items: u32,
}

impl UserInterest {
    /// Everything but the vector, then the vector's bits: a total order, so that the values are
    /// differential data that can be consolidated.
    fn ordered(&self) -> (&str, u64, &IdList, u32, impl Iterator<Item = u32> + '_) {
        (
            &self.user_id,
            self.timestamp,
            &self.history_items,
            self.known_items,
            self.interest_vector.iter().map(|x| x.to_bits()),
        )
    }
}

impl PartialEq for UserInterest {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for UserInterest {}

impl PartialOrd for UserInterest {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for UserInterest {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (self.ordered(), other.ordered());
        (a.0, a.1, a.2, a.3)
            .cmp(&(b.0, b.1, b.2, b.3))
            .then_with(|| a.4.cmp(b.4))
    }
}

/// An item-feature update as it enters the dataflow: new features, or `None` to delete.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FeatureEvent {
    pub item_id: String,
    pub features: Option<FeatureVector>,
    pub position: ReadPosition,
}

/// An f32 feature vector kept as bit patterns, so that it is `Ord` data that differential can
/// consolidate. It is only ever a value, never a key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FeatureVector(Vec<u32>);

impl FeatureVector {
    /// Wraps feature values; `None` if one is not finite or exceeds
    /// [`profile::MAX_FEATURE_MAGNITUDE`].
    pub fn new(values: &[f32]) -> Option<Self> {
        profile::features_in_bounds(values)
            .then(|| FeatureVector(values.iter().map(|x| x.to_bits()).collect()))
    }

    /// The values.
    pub fn values(&self) -> impl ExactSizeIterator<Item = f32> + '_ {
        self.0.iter().map(|&bits| f32::from_bits(bits))
    }

    /// The values' bit patterns, as a checkpoint stores them.
    pub fn bits(&self) -> &[u32] {
        &self.0
    }

    /// The vector of these bit patterns; `None` if a value is out of bounds, as for
    /// [`FeatureVector::new`].
    pub fn from_bits(bits: &[u32]) -> Option<Self> {
        let values: Vec<f32> = bits.iter().map(|&bits| f32::from_bits(bits)).collect();
        Self::new(&values)
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A user's current profile: the kept history and the timestamp of the winning message.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Profile {
    pub user_id: String,
    /// `id_key(user_id)`.
    pub user_key: IdKey,
    pub timestamp: u64,
    pub history_items: IdList,
}

impl ProfileEvent {
    /// The event of a valid message read at `position`, keeping only the last `max_history`
    /// items (semantics §4).
    pub fn from_message(
        message: profile::ProfileMessage,
        position: ReadPosition,
        max_history: usize,
    ) -> Self {
        let items = profile::keep_last(&message.history_items, max_history);
        ProfileEvent {
            history_items: IdList::new(items),
            user_key: id_key(&message.user_id),
            user_id: message.user_id,
            timestamp: message.timestamp,
            position,
        }
    }

    /// The same from a decoded message that borrows its ids from the Kafka payload.
    pub fn from_view(
        message: &profile::ProfileMessageView<'_>,
        position: ReadPosition,
        max_history: usize,
    ) -> Self {
        ProfileEvent {
            user_id: message.user_id.clone().into_owned(),
            user_key: id_key(&message.user_id),
            timestamp: message.timestamp,
            history_items: IdList::new(profile::keep_last(&message.history_items, max_history)),
            position,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_list_keeps_its_ids_in_order() {
        let ids = ["b", "", "0196", "é"];
        let list = IdList::new(&ids);
        assert_eq!(list.len(), 4);
        assert_eq!(list.iter().collect::<Vec<_>>(), ids);
        assert_eq!(list.iter().next_back(), Some("é"));
        assert!(IdList::new::<&str>(&[]).is_empty());
    }

    #[test]
    fn features_out_of_range_are_refused() {
        assert!(FeatureVector::new(&[f32::NAN]).is_none());
        assert!(FeatureVector::new(&[1.0e6]).is_none());
        assert!(FeatureVector::new(&[-1.0e5, 1.0e5]).is_some());
    }
}
