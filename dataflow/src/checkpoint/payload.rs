//! What one worker's checkpoint file holds, and its encoding.
//!
//! A payload is two bincode 1.3 values one after the other: a [`Head`] (what the state is
//! compatible with, and the source offsets it covers) and a [`Body`] (the state). The head comes
//! first and is small, so a restart reads every worker's offsets, and checks the checkpoint fits
//! this run, before it turns any state into events.
//!
//! The body is columns, not a struct per user: at full scale a worker holds ~190,000 profiles
//! of up to 50 items, and a `Vec` per profile would be that many allocations to write and to
//! read. Histories name items by their index in the part's own dictionary of item ids (4 bytes,
//! where an ASIN-like id is 10 and a length), not by the worker's item-table index, which is
//! reused once an item is released and means nothing to another run.

use std::path::Path;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::epoch::SourcePartition;
use crate::model::IdList;

/// What a checkpoint's state is compatible with: a run whose settings differ from any of these
/// cannot use it (see [`Head::mismatch`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compatibility {
    pub profile_topic: String,
    pub item_topic: String,
    /// The profiles' histories are cut to it: a run that keeps more would lack items.
    pub max_history: u64,
    pub dim: u32,
    /// The features file as the checkpoint's run read it. The checkpoint holds every item's
    /// features, the file's overlaid with the topic's updates, and a restart takes them instead
    /// of the file; with another file that would be a wrong state, so the restart replays in
    /// full instead.
    pub features_file: Fingerprint,
}

/// A file's length and modification time, which `make` and rsync trust to tell a changed file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub len: u64,
    pub modified_ns: u128,
}

impl Fingerprint {
    /// The fingerprint of the file at `path`.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        let metadata = std::fs::metadata(path)?;
        let modified_ns = metadata
            .modified()?
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        Ok(Fingerprint {
            len: metadata.len(),
            modified_ns,
        })
    }
}

/// The first part of a payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub compatibility: Compatibility,
    /// For each partition the worker read, the next offset to read once the state is loaded:
    /// `(topic, partition, offset)`, the topic 0 for profiles and 1 for item features.
    pub offsets: Vec<(u8, i32, i64)>,
}

impl Head {
    /// Why a run with `expected` cannot use this checkpoint, if it cannot.
    pub fn mismatch(&self, expected: &Compatibility) -> Option<String> {
        let found = &self.compatibility;
        let differs = |what: &str, found: String, expected: String| {
            Some(format!("{what} is {expected}, the checkpoint's {found}"))
        };
        if found.profile_topic != expected.profile_topic {
            return differs(
                "the profile topic",
                found.profile_topic.clone(),
                expected.profile_topic.clone(),
            );
        }
        if found.item_topic != expected.item_topic {
            return differs(
                "the item topic",
                found.item_topic.clone(),
                expected.item_topic.clone(),
            );
        }
        if found.max_history != expected.max_history {
            return differs(
                "MAX_HISTORY",
                found.max_history.to_string(),
                expected.max_history.to_string(),
            );
        }
        if found.dim != expected.dim {
            return differs(
                "the features' dimension",
                found.dim.to_string(),
                expected.dim.to_string(),
            );
        }
        if found.features_file != expected.features_file {
            return Some(
                "the features file changed since the checkpoint (length or modification time)"
                    .to_owned(),
            );
        }
        None
    }

    /// The offsets as source partitions.
    pub fn positions(&self) -> impl Iterator<Item = (SourcePartition, i64)> + '_ {
        self.offsets
            .iter()
            .map(|&(topic, partition, offset)| ((topic as usize, partition), offset))
    }
}

/// The state of one worker: its users' profiles and its items' features.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Body {
    /// The item ids the histories name, each once.
    pub items: IdList,
    /// Each user's id, then the timestamp of its profile and the end of its history in
    /// `histories` (the user before it ends where it starts).
    pub user_ids: IdList,
    pub timestamps: Vec<u64>,
    pub history_ends: Vec<u32>,
    /// Every history, oldest item first, as indices into `items`.
    pub histories: Vec<u32>,
    /// Each item with features, and its features as f32 bit patterns, `dim` per item.
    pub feature_items: IdList,
    pub features: Vec<u32>,
}

/// Why a payload could not be decoded, though its checksum held (a bug, or a file written by
/// another build of the same format version).
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("cannot decode: {0}")]
    Decode(#[from] bincode::Error),
    #[error("inconsistent: {0}")]
    Inconsistent(&'static str),
}

/// Writes the payload of `head` and `body` to `out`.
pub fn encode_into(out: &mut dyn std::io::Write, head: &Head, body: &Body) -> std::io::Result<()> {
    let to_io = |error: bincode::Error| match *error {
        bincode::ErrorKind::Io(error) => error,
        other => std::io::Error::other(other.to_string()),
    };
    bincode::serialize_into(&mut *out, head).map_err(to_io)?;
    bincode::serialize_into(&mut *out, body).map_err(to_io)
}

/// The payload of `head` and `body`, in memory.
#[cfg(test)]
pub fn encode(head: &Head, body: &Body) -> Vec<u8> {
    let mut bytes = Vec::new();
    // Writing to a Vec cannot fail, and every field is plain data.
    #[allow(clippy::expect_used)]
    encode_into(&mut bytes, head, body).expect("a payload encodes into memory");
    bytes
}

/// The head of a payload, and the rest of the bytes.
pub fn decode_head(payload: &[u8]) -> Result<(Head, &[u8]), PayloadError> {
    let mut rest = payload;
    let head = bincode::deserialize_from(&mut rest)?;
    Ok((head, rest))
}

/// The body after a head, checked for consistency, so that turning it into events cannot
/// index out of bounds.
pub fn decode_body(rest: &[u8], dim: usize) -> Result<Body, PayloadError> {
    let body: Body = bincode::deserialize(rest)?;
    let users = body.user_ids.len();
    if !body.items.is_well_formed() || !body.user_ids.is_well_formed() {
        return Err(PayloadError::Inconsistent("an id list is malformed"));
    }
    if !body.feature_items.is_well_formed() {
        return Err(PayloadError::Inconsistent("the feature ids are malformed"));
    }
    if body.timestamps.len() != users || body.history_ends.len() != users {
        return Err(PayloadError::Inconsistent(
            "user columns of different lengths",
        ));
    }
    let ordered = body.history_ends.windows(2).all(|w| w[0] <= w[1]);
    if !ordered || body.history_ends.last().map_or(0, |&end| end as usize) != body.histories.len() {
        return Err(PayloadError::Inconsistent("history ends out of order"));
    }
    if body
        .histories
        .iter()
        .any(|&item| item as usize >= body.items.len())
    {
        return Err(PayloadError::Inconsistent(
            "a history names an unknown item",
        ));
    }
    if body.features.len() != body.feature_items.len() * dim {
        return Err(PayloadError::Inconsistent("features of another dimension"));
    }
    Ok(body)
}

impl Body {
    /// The history of user `i` (an index into the user columns), as indices into `items`.
    pub fn history(&self, user: usize) -> &[u32] {
        let start = user
            .checked_sub(1)
            .map_or(0, |before| self.history_ends[before] as usize);
        &self.histories[start..self.history_ends[user] as usize]
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn head() -> Head {
        Head {
            compatibility: Compatibility {
                profile_topic: "user_behavior".into(),
                item_topic: "item_features".into(),
                max_history: 50,
                dim: 2,
                features_file: Fingerprint {
                    len: 10,
                    modified_ns: 7,
                },
            },
            offsets: vec![(0, 0, 15), (0, 2, 3), (1, 0, 4)],
        }
    }

    fn body() -> Body {
        Body {
            items: IdList::new(&["a", "b", "c"]),
            user_ids: IdList::new(&["u1", "u2"]),
            timestamps: vec![5, 9],
            history_ends: vec![2, 5],
            histories: vec![0, 1, 2, 2, 0],
            feature_items: IdList::new(&["a"]),
            features: vec![1.0f32.to_bits(), 2.0f32.to_bits()],
        }
    }

    #[test]
    fn a_payload_round_trips_and_its_head_reads_alone() {
        let bytes = encode(&head(), &body());
        let (read_head, rest) = decode_head(&bytes).unwrap();
        assert_eq!(read_head, head());
        assert_eq!(
            read_head.positions().collect::<Vec<_>>(),
            [((0, 0), 15), ((0, 2), 3), ((1, 0), 4)]
        );
        let read_body = decode_body(rest, 2).unwrap();
        assert_eq!(read_body, body());
        assert_eq!(read_body.history(0), [0, 1]);
        assert_eq!(read_body.history(1), [2, 2, 0]);
    }

    #[test]
    fn inconsistent_bodies_are_refused_not_indexed() {
        type Damage = fn(&mut Body);
        let cases: [(&str, Damage); 4] = [
            ("unknown item", |b| b.histories[0] = 3),
            ("ends", |b| b.history_ends = vec![3, 2]),
            ("columns", |b| b.timestamps.pop().map(drop).unwrap_or(())),
            ("dimension", |b| b.features.push(0)),
        ];
        for (what, damage) in cases {
            let mut body = body();
            damage(&mut body);
            let bytes = encode(&head(), &body);
            let (_, rest) = decode_head(&bytes).unwrap();
            assert!(
                matches!(decode_body(rest, 2), Err(PayloadError::Inconsistent(_))),
                "{what}"
            );
        }
        assert!(decode_head(b"\x01").is_err());
    }

    #[test]
    fn every_setting_that_shapes_the_state_must_match() {
        let expected = head().compatibility;
        assert_eq!(head().mismatch(&expected), None);
        let cases: [fn(&mut Compatibility); 5] = [
            |c| c.profile_topic = "other".into(),
            |c| c.item_topic = "other".into(),
            |c| c.max_history = 20,
            |c| c.dim = 3,
            |c| c.features_file.modified_ns += 1,
        ];
        for change in cases {
            let mut other = expected.clone();
            change(&mut other);
            let why = head().mismatch(&other).unwrap();
            assert!(!why.is_empty());
        }
    }
}
