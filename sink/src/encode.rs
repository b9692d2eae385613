//! The Redis value of a profile (semantics §6): compact JSON with the fields in the contract's
//! order. The order is not cosmetic: the write script finds the stored `"timestamp"` and
//! `"epoch"` by pattern, relying on `timestamp` being a top-level number and `epoch` the last
//! field (see `profile_write.lua`).

use serde::ser::{Serialize, SerializeStruct, Serializer};

/// One user's profile as it goes to Redis (semantics §6).
///
/// Everything is borrowed from the dataflow's state. `S` is the type the caller keeps item ids
/// in (`&str`, `String`, `Arc<str>`, `Box<str>` ...), so that a worker holding `Vec<String>`
/// histories does not have to build a `Vec<&str>` per record; it defaults to `&str`, which makes
/// `ProfileRecord<'_>` the same as `profile::ProfileMessageRef`'s layout.
#[derive(Debug)]
pub struct ProfileRecord<'a, S = &'a str> {
    /// The user; the key is `profile::redis_key(user_id)`.
    pub user_id: &'a str,
    /// Timestamp of the message the profile came from (unix seconds, at most 2^53).
    pub timestamp: u64,
    /// The kept history, oldest first, newest last.
    pub history_items: &'a [S],
    /// The interest vector (semantics §5). Finite by the dataflow's guarantee; a non-finite
    /// value is written as `0.0` (and counted in [`SinkMetrics`](crate::SinkMetrics)), because
    /// JSON has no NaN and a `null` would break every reader of the vector.
    pub interest_vector: &'a [f32],
    /// Number of known items in the history.
    pub known_items: u32,
    /// The dataflow epoch that produced this value (at most 2^53).
    pub epoch: u64,
}

// Manual impls: a derive would require `S: Copy`, but the record only holds references.
impl<S> Clone for ProfileRecord<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<S> Copy for ProfileRecord<'_, S> {}

/// The JSON value stored under the user's key, e.g.
/// `{"user_id":"u1","timestamp":1456923842,"history_items":["a","b"],"interest_vector":[0.5,1.0],"known_items":2,"epoch":1234}`.
///
/// Public for tests and benchmarks; the sink itself encodes into its batch buffers.
pub fn encode_profile<S: AsRef<str>>(record: &ProfileRecord<'_, S>) -> Vec<u8> {
    let mut out = Vec::with_capacity(estimated_len(record));
    encode_profile_into(record, &mut out);
    out
}

/// Appends the JSON value to `out`; returns how many non-finite floats were written as `0.0`.
pub(crate) fn encode_profile_into<S: AsRef<str>>(
    record: &ProfileRecord<'_, S>,
    out: &mut Vec<u8>,
) -> usize {
    // Writing plain strings and numbers into a Vec cannot fail: serde_json only errors on I/O
    // (impossible for a Vec) and on map keys that are not strings (there are no maps here).
    #[allow(clippy::expect_used)]
    serde_json::to_writer(&mut *out, &Json(record))
        .expect("serializing strings and numbers into a Vec cannot fail");
    record
        .interest_vector
        .iter()
        .filter(|x| !x.is_finite())
        .count()
}

/// A close upper-bound guess of the encoded size, to size buffers once.
pub(crate) fn estimated_len<S: AsRef<str>>(record: &ProfileRecord<'_, S>) -> usize {
    let items: usize = record
        .history_items
        .iter()
        .map(|s| s.as_ref().len() + 3)
        .sum();
    // 16 bytes covers any f32 in shortest round-trip form plus its comma in the common case.
    110 + record.user_id.len() + items + 16 * record.interest_vector.len()
}

struct Json<'r, 'a, S>(&'r ProfileRecord<'a, S>);

impl<S: AsRef<str>> Serialize for Json<'_, '_, S> {
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        let r = self.0;
        // Field order is the contract (§6) and the script's parsing depends on it.
        let mut s = serializer.serialize_struct("Profile", 6)?;
        s.serialize_field("user_id", r.user_id)?;
        s.serialize_field("timestamp", &r.timestamp)?;
        s.serialize_field("history_items", &Items(r.history_items))?;
        s.serialize_field("interest_vector", &Floats(r.interest_vector))?;
        s.serialize_field("known_items", &r.known_items)?;
        s.serialize_field("epoch", &r.epoch)?;
        s.end()
    }
}

struct Items<'a, S>(&'a [S]);

impl<S: AsRef<str>> Serialize for Items<'_, S> {
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        serializer.collect_seq(self.0.iter().map(AsRef::as_ref))
    }
}

struct Floats<'a>(&'a [f32]);

impl Serialize for Floats<'_> {
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        // serde_json would write NaN/inf as `null`; 0.0 keeps the vector a vector of numbers.
        // f32 goes through serialize_f32, i.e. the shortest text that parses back to the same
        // f32 (ryu), not the longer f64 expansion.
        serializer.collect_seq(self.0.iter().map(|&x| if x.is_finite() { x } else { 0.0 }))
    }
}
