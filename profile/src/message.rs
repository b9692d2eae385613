//! The profile message of semantics §2 and its two codecs.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The longest user_id a message may carry, in bytes.
pub const MAX_USER_ID_BYTES: usize = 256;
/// The greatest timestamp a message may carry (2^53, the largest integer every JSON reader keeps
/// exact).
pub const MAX_TIMESTAMP: u64 = 1 << 53;
/// The most history items a message may carry.
pub const MAX_HISTORY_ITEMS: usize = 10_000;

/// A user's recent history, as published on the profile topic keyed by `user_id`.
///
/// `history_items` is oldest first, newest last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileMessage {
    pub user_id: String,
    pub history_items: Vec<String>,
    pub timestamp: u64,
}

/// A decoded message whose ids borrow from the encoded value wherever they can (a JSON string
/// with an escape is the exception), so that a consumer that only reads the ids, and copies
/// them into buffers of its own, does not allocate one `String` per id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileMessageView<'a> {
    pub user_id: Cow<'a, str>,
    pub history_items: Vec<Cow<'a, str>>,
    pub timestamp: u64,
}

/// An id as decoded, borrowed where it can be. Serde borrows a `Cow<str>` only where it is a
/// field marked `borrow`, not as the element of a `Vec`; this field is one.
#[derive(Deserialize)]
#[serde(transparent)]
struct WireId<'a>(#[serde(borrow)] Cow<'a, str>);

/// The bincode value as read.
#[derive(Deserialize)]
struct BincodeWire<'a> {
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow)]
    history_items: Vec<WireId<'a>>,
    timestamp: u64,
}

/// A borrowed profile message, so a producer can encode one without copying its ids.
/// It encodes to exactly the bytes of the equal [`ProfileMessage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProfileMessageRef<'a> {
    pub user_id: &'a str,
    pub history_items: &'a [&'a str],
    pub timestamp: u64,
}

/// Why a message is invalid (semantics §2). The `Display` text is the reason a dead-letter copy
/// carries; [`InvalidMessage::kind`] is a short stable label for metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("value is not UTF-8: {0}")]
    NotUtf8(#[from] std::str::Utf8Error),
    #[error("value is not JSON: {0}")]
    NotJson(String),
    #[error("value is not a profile message: {0}")]
    WrongShape(String),
    #[error("value is not a bincode profile message: {0}")]
    NotBincode(String),
    #[error("user_id is empty")]
    EmptyUserId,
    #[error("user_id is {0} bytes long, more than {MAX_USER_ID_BYTES}")]
    UserIdTooLong(usize),
    #[error("timestamp {0} is not an integer in 0..=2^53")]
    BadTimestamp(String),
    #[error("history_items has {0} items, more than {MAX_HISTORY_ITEMS}")]
    TooManyItems(usize),
}

impl InvalidMessage {
    /// A short, stable label for the reason, for metric labels and headers.
    pub fn kind(&self) -> &'static str {
        match self {
            InvalidMessage::NotUtf8(_) => "not_utf8",
            InvalidMessage::NotJson(_) => "not_json",
            InvalidMessage::WrongShape(_) => "wrong_shape",
            InvalidMessage::NotBincode(_) => "not_bincode",
            InvalidMessage::EmptyUserId => "empty_user_id",
            InvalidMessage::UserIdTooLong(_) => "user_id_too_long",
            InvalidMessage::BadTimestamp(_) => "bad_timestamp",
            InvalidMessage::TooManyItems(_) => "too_many_items",
        }
    }
}

/// Checks a user_id against semantics §2: not empty, at most 256 bytes.
pub fn validate_user_id(user_id: &str) -> Result<(), InvalidMessage> {
    if user_id.is_empty() {
        Err(InvalidMessage::EmptyUserId)
    } else if user_id.len() > MAX_USER_ID_BYTES {
        Err(InvalidMessage::UserIdTooLong(user_id.len()))
    } else {
        Ok(())
    }
}

/// Checks a timestamp against semantics §2: an integer in 0..=2^53.
pub fn validate_timestamp(timestamp: u64) -> Result<(), InvalidMessage> {
    if timestamp > MAX_TIMESTAMP {
        Err(InvalidMessage::BadTimestamp(timestamp.to_string()))
    } else {
        Ok(())
    }
}

/// The rules of semantics §2 that the decoders' types do not already enforce.
fn validate_fields(user_id: &str, timestamp: u64, items: usize) -> Result<(), InvalidMessage> {
    validate_user_id(user_id)?;
    validate_timestamp(timestamp)?;
    if items > MAX_HISTORY_ITEMS {
        return Err(InvalidMessage::TooManyItems(items));
    }
    Ok(())
}

/// The wire encoding of profile message values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encoding {
    /// UTF-8 JSON, the original system's format, readable by any Kafka client.
    #[default]
    Json,
    /// bincode 1.3 (fixed-width integers, little endian) of [`ProfileMessage`], for clients that
    /// already speak it. Not smaller for this message: each id carries an 8-byte length where JSON
    /// spends two quotes (938 bytes against 719 for 50 ids), and it decodes no faster.
    Bincode,
}

impl Encoding {
    /// The names accepted by [`FromStr`].
    pub const NAMES: [&'static str; 2] = ["json", "bincode"];
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoding::Json => "json",
            Encoding::Bincode => "bincode",
        })
    }
}

impl FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "json" => Ok(Encoding::Json),
            "bincode" => Ok(Encoding::Bincode),
            other => Err(format!(
                "unknown encoding {other:?}, expected one of {:?}",
                Encoding::NAMES
            )),
        }
    }
}

/// The JSON value as read, before validation: the timestamp is kept as a JSON number so that a
/// negative, fractional or too large one gets its own reason rather than a generic type error.
#[derive(Deserialize)]
struct JsonWire<'a> {
    #[serde(borrow)]
    user_id: Cow<'a, str>,
    #[serde(borrow)]
    history_items: Vec<WireId<'a>>,
    timestamp: serde_json::Number,
}

/// The ids of a wire struct (the same layout: the vector's buffer is reused).
fn ids(wire: Vec<WireId<'_>>) -> Vec<Cow<'_, str>> {
    wire.into_iter().map(|WireId(id)| id).collect()
}

fn bincode_options() -> impl bincode::Options {
    use bincode::Options;
    // Fixed-width integers match `bincode::serialize`, the encoding other bincode 1.3 users
    // produce by default. The limit stops a corrupt length prefix from asking for gigabytes.
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(16 << 20)
}

impl ProfileMessage {
    /// Decodes and validates a message value (semantics §2).
    pub fn decode(value: &[u8], encoding: Encoding) -> Result<Self, InvalidMessage> {
        let view = ProfileMessageView::decode(value, encoding)?;
        Ok(ProfileMessage {
            user_id: view.user_id.into_owned(),
            history_items: view
                .history_items
                .into_iter()
                .map(Cow::into_owned)
                .collect(),
            timestamp: view.timestamp,
        })
    }

    /// Checks the rules of semantics §2 that the decoder's types do not already enforce.
    pub fn validate(&self) -> Result<(), InvalidMessage> {
        validate_fields(&self.user_id, self.timestamp, self.history_items.len())
    }

    /// Encodes this message.
    pub fn encode(&self, encoding: Encoding) -> Vec<u8> {
        let items: Vec<&str> = self.history_items.iter().map(String::as_str).collect();
        ProfileMessageRef {
            user_id: &self.user_id,
            history_items: &items,
            timestamp: self.timestamp,
        }
        .encode(encoding)
    }
}

impl<'a> ProfileMessageView<'a> {
    /// Decodes and validates a message value (semantics §2), borrowing from it.
    pub fn decode(value: &'a [u8], encoding: Encoding) -> Result<Self, InvalidMessage> {
        let message = match encoding {
            Encoding::Json => Self::decode_json(value)?,
            Encoding::Bincode => {
                use bincode::Options;
                let wire: BincodeWire<'a> = bincode_options()
                    .deserialize(value)
                    .map_err(|e| InvalidMessage::NotBincode(e.to_string()))?;
                ProfileMessageView {
                    user_id: wire.user_id,
                    history_items: ids(wire.history_items),
                    timestamp: wire.timestamp,
                }
            }
        };
        validate_fields(
            &message.user_id,
            message.timestamp,
            message.history_items.len(),
        )?;
        Ok(message)
    }

    fn decode_json(value: &'a [u8]) -> Result<Self, InvalidMessage> {
        let text = std::str::from_utf8(value)?;
        // The plain form producers write, fast; serde_json for everything else, which also
        // says why a message is invalid.
        if let Some(message) = crate::fast_json::decode(text) {
            return Ok(message);
        }
        Self::decode_json_with_serde(text)
    }

    /// The JSON decoding of serde_json, which decides on every input.
    pub(crate) fn decode_json_with_serde(text: &'a str) -> Result<Self, InvalidMessage> {
        let wire: JsonWire<'a> = serde_json::from_str(text).map_err(|e| {
            if e.is_data() {
                InvalidMessage::WrongShape(e.to_string())
            } else {
                InvalidMessage::NotJson(e.to_string())
            }
        })?;
        let timestamp = wire
            .timestamp
            .as_u64()
            .ok_or_else(|| InvalidMessage::BadTimestamp(wire.timestamp.to_string()))?;
        Ok(ProfileMessageView {
            user_id: wire.user_id,
            history_items: ids(wire.history_items),
            timestamp,
        })
    }
}

impl ProfileMessageRef<'_> {
    /// Encodes this message: JSON with the fields in the contract's order, or bincode.
    pub fn encode(&self, encoding: Encoding) -> Vec<u8> {
        match encoding {
            // Serializing plain strings, string slices and integers cannot fail.
            Encoding::Json => serde_json::to_vec(self).expect("a profile message always encodes"),
            Encoding::Bincode => {
                use bincode::Options;
                bincode_options()
                    .serialize(self)
                    .expect("a profile message always encodes")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ProfileMessage {
        ProfileMessage {
            user_id: "A34O9UGRTZNTR8".into(),
            history_items: vec!["0553213113".into(), "B000FC1PJI".into()],
            timestamp: 1456923842,
        }
    }

    #[test]
    fn json_is_the_contract_shape() {
        let bytes = sample().encode(Encoding::Json);
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"user_id":"A34O9UGRTZNTR8","history_items":["0553213113","B000FC1PJI"],"timestamp":1456923842}"#
        );
    }

    #[test]
    fn both_encodings_round_trip() {
        for encoding in [Encoding::Json, Encoding::Bincode] {
            let bytes = sample().encode(encoding);
            assert_eq!(ProfileMessage::decode(&bytes, encoding).unwrap(), sample());
        }
    }

    #[test]
    fn a_view_borrows_plain_ids_and_decodes_escaped_ones() {
        for encoding in [Encoding::Json, Encoding::Bincode] {
            let bytes = sample().encode(encoding);
            let view = ProfileMessageView::decode(&bytes, encoding).unwrap();
            assert!(matches!(view.user_id, Cow::Borrowed("A34O9UGRTZNTR8")));
            assert!(view
                .history_items
                .iter()
                .all(|item| matches!(item, Cow::Borrowed(_))));
        }
        let escaped = br#"{"user_id":"a\"b","history_items":["x\u00e9"],"timestamp":1}"#;
        let view = ProfileMessageView::decode(escaped, Encoding::Json).unwrap();
        assert_eq!(view.user_id, "a\"b");
        assert_eq!(view.history_items, ["x\u{e9}"]);
        let empty = br#"{"user_id":"","history_items":[],"timestamp":1}"#;
        assert_eq!(
            ProfileMessageView::decode(empty, Encoding::Json),
            Err(InvalidMessage::EmptyUserId)
        );
    }

    #[test]
    fn bincode_matches_plain_bincode_serialize() {
        let ours = sample().encode(Encoding::Bincode);
        assert_eq!(ours, bincode::serialize(&sample()).unwrap());
    }

    #[test]
    fn decodes_the_original_systems_spacing_and_extra_fields() {
        let text = br#"{"user_id": "A1", "history_items": ["x"], "timestamp": 5, "source": "web"}"#;
        let message = ProfileMessage::decode(text, Encoding::Json).unwrap();
        assert_eq!(message.user_id, "A1");
        assert_eq!(message.timestamp, 5);
    }

    fn reason(value: &[u8]) -> &'static str {
        ProfileMessage::decode(value, Encoding::Json)
            .unwrap_err()
            .kind()
    }

    #[test]
    fn every_invalid_shape_has_its_reason() {
        assert_eq!(reason(b"\xff\xfe"), "not_utf8");
        assert_eq!(reason(b"{not json"), "not_json");
        assert_eq!(reason(b""), "not_json");
        assert_eq!(reason(br#"[1,2]"#), "wrong_shape");
        assert_eq!(reason(br#"{"user_id":"a","timestamp":1}"#), "wrong_shape");
        assert_eq!(
            reason(br#"{"user_id":"a","history_items":[1],"timestamp":1}"#),
            "wrong_shape"
        );
        assert_eq!(
            reason(br#"{"user_id":"a","history_items":"x","timestamp":1}"#),
            "wrong_shape"
        );
        assert_eq!(
            reason(br#"{"user_id":7,"history_items":[],"timestamp":1}"#),
            "wrong_shape"
        );
        assert_eq!(
            reason(br#"{"user_id":"","history_items":[],"timestamp":1}"#),
            "empty_user_id"
        );
        let long = format!(
            r#"{{"user_id":"{}","history_items":[],"timestamp":1}}"#,
            "u".repeat(257)
        );
        assert_eq!(reason(long.as_bytes()), "user_id_too_long");
        for ts in ["-1", "1.5", "1e3", "9007199254740993", "\"12\""] {
            let text = format!(r#"{{"user_id":"a","history_items":[],"timestamp":{ts}}}"#);
            let kind = reason(text.as_bytes());
            assert!(
                kind == "bad_timestamp" || (ts == "\"12\"" && kind == "wrong_shape"),
                "{ts}: {kind}"
            );
        }
        let many = format!(
            r#"{{"user_id":"a","history_items":[{}],"timestamp":1}}"#,
            vec!["\"i\""; 10_001].join(",")
        );
        assert_eq!(reason(many.as_bytes()), "too_many_items");
    }

    #[test]
    fn limits_are_inclusive() {
        let text = format!(
            r#"{{"user_id":"{}","history_items":[{}],"timestamp":{}}}"#,
            "u".repeat(256),
            vec!["\"i\""; 10_000].join(","),
            1u64 << 53
        );
        assert!(ProfileMessage::decode(text.as_bytes(), Encoding::Json).is_ok());
    }

    #[test]
    fn corrupt_bincode_is_rejected_without_allocating() {
        let mut bytes = sample().encode(Encoding::Bincode);
        bytes[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            ProfileMessage::decode(&bytes, Encoding::Bincode)
                .unwrap_err()
                .kind(),
            "not_bincode"
        );
        let mut trailing = sample().encode(Encoding::Bincode);
        trailing.push(0);
        assert!(ProfileMessage::decode(&trailing, Encoding::Bincode).is_err());
    }

    #[test]
    fn encoding_names_parse() {
        for name in Encoding::NAMES {
            assert_eq!(name.parse::<Encoding>().unwrap().to_string(), name);
        }
        assert!("xml".parse::<Encoding>().is_err());
    }
}
