//! Turning a Kafka message into an event: decoding and validating it (semantics §2, §3), and
//! copying an invalid one to the dead-letter topic with why and where it was read.

use profile::{ItemFeaturesMessage, ProfileMessageView, RateLimit};
use rdkafka::message::BorrowedMessage;
use rdkafka::Message;

use super::dead_letter::{Copy, DeadLetters};
use super::{SourceConfig, PROFILE_TOPIC};
use crate::model::{FeatureEvent, FeatureVector, ProfileEvent, ReadPosition};

/// A valid message, as the dataflow takes it.
#[derive(Debug)]
pub(super) enum Event {
    Profile(ProfileEvent),
    Features(FeatureEvent),
}

/// Why a message is invalid, as the dead-letter copy's headers tell it.
#[derive(Debug)]
pub(super) struct Invalid {
    /// A short, fixed name of the kind of fault, to count and filter by.
    pub(super) kind: &'static str,
    /// What exactly is wrong, for a person.
    pub(super) reason: String,
}

/// Decodes and validates the payload of a message of topic `topic` (an index into the source's
/// topics) read at `position`.
pub(super) fn decode(
    topic: usize,
    payload: &[u8],
    position: ReadPosition,
    config: &SourceConfig,
) -> Result<Event, Invalid> {
    if topic == PROFILE_TOPIC {
        ProfileMessageView::decode(payload, config.encoding)
            .map(|m| Event::Profile(ProfileEvent::from_view(&m, position, config.max_history)))
            .map_err(|e| Invalid {
                kind: e.kind(),
                reason: e.to_string(),
            })
    } else {
        decode_features(payload, position, config.dim).map(Event::Features)
    }
}

fn decode_features(
    payload: &[u8],
    position: ReadPosition,
    dim: usize,
) -> Result<FeatureEvent, Invalid> {
    let bad = |reason: String| Invalid {
        kind: "bad_item_features",
        reason,
    };
    let message = ItemFeaturesMessage::decode(payload, dim).map_err(|e| bad(e.to_string()))?;
    // The message crate checked the values' bounds; `FeatureVector::new` checks them again
    // only because it is how the type is made.
    let features = match message.features {
        None => None,
        Some(values) => Some(
            FeatureVector::new(&values)
                .ok_or_else(|| bad(profile::InvalidItemFeatures::TooLarge.to_string()))?,
        ),
    };
    Ok(FeatureEvent {
        item_id: message.item_id,
        features,
        position,
    })
}

/// A dead-letter copy of an invalid message read in `epoch`, with why and where it was read.
pub(super) fn dead_letter(
    dlq: &mut DeadLetters,
    epoch: u64,
    warnings: &RateLimit,
    message: &BorrowedMessage<'_>,
    invalid: &Invalid,
) {
    let (kind, reason) = (invalid.kind, invalid.reason.as_str());
    if let Some(suppressed) = warnings.allow() {
        tracing::warn!(
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            reason,
            suppressed,
            "invalid message sent to the dead-letter topic"
        );
    }
    let headers = [
        ("streamrec.reason", reason.to_owned()),
        ("streamrec.reason_kind", kind.to_owned()),
        ("streamrec.source_topic", message.topic().to_owned()),
        (
            "streamrec.source_partition",
            message.partition().to_string(),
        ),
        ("streamrec.source_offset", message.offset().to_string()),
    ];
    dlq.send(Copy {
        epoch,
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().unwrap_or_default().to_vec(),
        headers: headers
            .into_iter()
            .map(|(key, value)| (key.to_owned(), value))
            .collect(),
    });
}

/// A dead-letter copy of a value the dataflow could not store, computed in `epoch`, with
/// `headers` saying why.
pub(super) fn dead_letter_value(
    dlq: &mut DeadLetters,
    epoch: u64,
    headers: &[(&str, &str)],
    key: &[u8],
    payload: &[u8],
) {
    dlq.send(Copy {
        epoch,
        key: Some(key.to_vec()),
        payload: payload.to_vec(),
        headers: headers
            .iter()
            .map(|&(key, value)| (key.to_owned(), value.to_owned()))
            .collect(),
    });
}
