//! The Redis value of a profile (semantics §6): compact JSON with the fields in the contract's
//! order. The order is not cosmetic: the write script finds the stored `"timestamp"` and
//! `"epoch"` by pattern, relying on `timestamp` being a top-level number and `epoch` the last
//! field (see `profile_write.lua`). A user's recommendations (§8) follow the same rule;
//! `popular_items` has neither field, so the script always replaces it.

use serde::{Serialize, Serializer};

use crate::{SinkError, MAX_EXACT};

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
/// Public for tests and benchmarks; the sink itself encodes through [`EncodedProfile`].
pub fn encode_profile<S: AsRef<str>>(record: &ProfileRecord<'_, S>) -> Vec<u8> {
    let mut out = Vec::with_capacity(estimated_len(record));
    encode_profile_into(record, &mut out);
    out
}

/// Which of the contract's keys a value goes under.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyKind {
    /// `user_profile:{user_id}` (semantics §6).
    #[default]
    Profile,
    /// `user_recs:{user_id}` (semantics §8).
    Recommendations,
    /// `popular_items`, one key (semantics §8).
    PopularItems,
}

impl KeyKind {
    /// The key's text before the user id (all of it for `popular_items`).
    pub fn prefix(self) -> &'static str {
        match self {
            KeyKind::Profile => profile::REDIS_KEY_PREFIX,
            KeyKind::Recommendations => profile::RECS_KEY_PREFIX,
            KeyKind::PopularItems => profile::POPULAR_ITEMS_KEY,
        }
    }

    /// The kind and user id of `key`, if it is one of the contract's keys.
    pub(crate) fn of_key(key: &str) -> Option<(KeyKind, &str)> {
        if key == profile::POPULAR_ITEMS_KEY {
            return Some((KeyKind::PopularItems, ""));
        }
        [KeyKind::Profile, KeyKind::Recommendations]
            .into_iter()
            .find_map(|kind| Some((kind, key.strip_prefix(kind.prefix())?)))
    }
}

/// A profile already encoded as its Redis value, with what the write script needs beside it.
///
/// The dataflow encodes each changed profile where it computes it, straight from its state
/// (no owned copy of the history to build, hand to the writer thread and free again), and the
/// writer thread only frames the bytes: see [`RedisSink::write_encoded`](crate::RedisSink::write_encoded).
#[derive(Clone, PartialEq, Eq)]
pub struct EncodedProfile {
    /// The user id followed by the JSON value: one allocation per profile.
    text: String,
    /// Where the user id ends and the value begins in `text`.
    split: usize,
    timestamp: u64,
    epoch: u64,
    /// Non-finite floats written as `0.0`, for the sink's metrics.
    non_finite: u32,
    /// The key it goes under.
    kind: KeyKind,
}

impl EncodedProfile {
    /// Encodes `record`. Refuses a timestamp or epoch above 2^53, which the write script could
    /// not compare exactly.
    pub fn encode<S: AsRef<str>>(record: &ProfileRecord<'_, S>) -> Result<Self, SinkError> {
        check(record)?;
        let mut text = Vec::with_capacity(record.user_id.len() + estimated_len(record));
        text.extend_from_slice(record.user_id.as_bytes());
        let non_finite = encode_profile_into(record, &mut text);
        // Only `str`s and ASCII went in.
        #[allow(clippy::expect_used)]
        let text = String::from_utf8(text).expect("the encoder writes UTF-8");
        Ok(Self {
            text,
            split: record.user_id.len(),
            timestamp: record.timestamp,
            epoch: record.epoch,
            non_finite: non_finite as u32,
            kind: KeyKind::Profile,
        })
    }

    /// A user's recommendations (semantics §8), `{"user_id", "timestamp", "items": [{"item_id",
    /// "score"}], "epoch"}`, under `user_recs:{user_id}` with the profile's timestamp: the same
    /// no-regression rule as the profile's. A non-finite score is written as 0.
    pub fn recommendations<S: AsRef<str>>(
        user_id: &str,
        timestamp: u64,
        epoch: u64,
        items: &[(S, f64)],
    ) -> Result<Self, SinkError> {
        check_exact(user_id, timestamp, epoch)?;
        #[derive(Serialize)]
        struct Item<'a> {
            item_id: &'a str,
            score: f64,
        }
        #[derive(Serialize)]
        struct Value<'a> {
            user_id: &'a str,
            timestamp: u64,
            items: Vec<Item<'a>>,
            epoch: u64,
        }
        let mut non_finite = 0;
        let value = Value {
            user_id,
            timestamp,
            items: items
                .iter()
                .map(|(item, score)| Item {
                    item_id: item.as_ref(),
                    score: if score.is_finite() {
                        *score
                    } else {
                        non_finite += 1;
                        0.0
                    },
                })
                .collect(),
            epoch,
        };
        Ok(Self::with_value(
            user_id,
            &value,
            timestamp,
            epoch,
            non_finite,
            KeyKind::Recommendations,
        ))
    }

    /// `popular_items` (semantics §8), `[{"item_id", "users"}]`, as of `epoch`.
    pub fn popular_items<S: AsRef<str>>(epoch: u64, items: &[(S, u64)]) -> Self {
        #[derive(Serialize)]
        struct Item<'a> {
            item_id: &'a str,
            users: u64,
        }
        let value: Vec<Item> = items
            .iter()
            .map(|(item, users)| Item {
                item_id: item.as_ref(),
                users: *users,
            })
            .collect();
        Self::with_value("", &value, 0, epoch, 0, KeyKind::PopularItems)
    }

    fn with_value(
        user_id: &str,
        value: &impl Serialize,
        timestamp: u64,
        epoch: u64,
        non_finite: u32,
        kind: KeyKind,
    ) -> Self {
        let mut text = String::from(user_id);
        // Writing into a String's bytes cannot fail, and these values always serialize.
        #[allow(clippy::expect_used)]
        text.push_str(&serde_json::to_string(value).expect("a value always serializes"));
        Self {
            text,
            split: user_id.len(),
            timestamp,
            epoch,
            non_finite,
            kind,
        }
    }

    /// The user (empty for `popular_items`); the key is [`key_kind`](Self::key_kind)'s prefix
    /// followed by it.
    pub fn user_id(&self) -> &str {
        &self.text[..self.split]
    }

    /// Which key the value goes under.
    pub fn key_kind(&self) -> KeyKind {
        self.kind
    }

    /// The JSON value (semantics §6), exactly as it goes to Redis.
    pub fn value(&self) -> &str {
        &self.text[self.split..]
    }

    /// The timestamp in the value.
    pub fn timestamp(&self) -> u64 {
        self.timestamp
    }

    /// The epoch in the value.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How many non-finite floats of the vector were written as `0.0`.
    pub fn non_finite(&self) -> usize {
        self.non_finite as usize
    }
}

impl std::fmt::Debug for EncodedProfile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedProfile")
            .field("user_id", &self.user_id())
            .field("value", &self.value())
            .finish_non_exhaustive()
    }
}

/// Refuses what the write script cannot compare exactly (Lua numbers are doubles).
fn check<S>(record: &ProfileRecord<'_, S>) -> Result<(), SinkError> {
    check_exact(record.user_id, record.timestamp, record.epoch)
}

fn check_exact(user_id: &str, timestamp: u64, epoch: u64) -> Result<(), SinkError> {
    let reason = if timestamp > MAX_EXACT {
        format!("timestamp {timestamp} is above 2^53")
    } else if epoch > MAX_EXACT {
        format!("epoch {epoch} is above 2^53")
    } else {
        return Ok(());
    };
    Err(SinkError::InvalidRecord {
        user_id: user_id.to_owned(),
        reason,
    })
}

/// Appends the JSON value to `out`; returns how many non-finite floats were written as `0.0`.
fn encode_profile_into<S: AsRef<str>>(record: &ProfileRecord<'_, S>, out: &mut Vec<u8>) -> usize {
    let value = RedisValue {
        user_id: record.user_id,
        timestamp: record.timestamp,
        history_items: record.history_items,
        interest_vector: record.interest_vector,
        known_items: record.known_items,
        epoch: record.epoch,
    };
    // Writing into a Vec cannot fail, and nothing in the value can refuse to serialize.
    #[allow(clippy::expect_used)]
    serde_json::to_writer(&mut *out, &value).expect("a profile always serializes into a Vec");
    record
        .interest_vector
        .iter()
        .filter(|x| !x.is_finite())
        .count()
}

/// The Redis value as serde_json writes it. The field order is the contract (§6) and the
/// script's parsing depends on it.
#[derive(Serialize)]
#[serde(bound(serialize = "S: AsRef<str>"))]
struct RedisValue<'a, S> {
    user_id: &'a str,
    timestamp: u64,
    #[serde(serialize_with = "str_seq")]
    history_items: &'a [S],
    #[serde(serialize_with = "finite_floats")]
    interest_vector: &'a [f32],
    known_items: u32,
    epoch: u64,
}

/// The item ids, whatever string type the caller keeps them in.
fn str_seq<S: AsRef<str>, Z: Serializer>(items: &&[S], serializer: Z) -> Result<Z::Ok, Z::Error> {
    serializer.collect_seq(items.iter().map(AsRef::as_ref))
}

/// The vector with a non-finite float as `0.0`: serde_json would write NaN or infinity as
/// `null`, and 0.0 keeps the vector a vector of numbers.
fn finite_floats<Z: Serializer>(vector: &&[f32], serializer: Z) -> Result<Z::Ok, Z::Error> {
    serializer.collect_seq(vector.iter().map(|&x| if x.is_finite() { x } else { 0.0 }))
}

/// A close upper-bound guess of the encoded size, to size buffers once.
fn estimated_len<S: AsRef<str>>(record: &ProfileRecord<'_, S>) -> usize {
    let items: usize = record
        .history_items
        .iter()
        .map(|s| s.as_ref().len() + 3)
        .sum();
    // 16 bytes covers any f32 in shortest round-trip form plus its comma in the common case.
    110 + record.user_id.len() + items + 16 * record.interest_vector.len()
}
