//! Turning a Kafka message into an event: decoding and validating it (semantics §2, §3), and
//! copying an invalid one to the dead-letter topic with why and where it was read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use profile::{ItemFeaturesMessage, ProfileMessageView, RateLimit};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message};

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

/// Counts dead-letter copies the broker did not take, so offsets wait for them.
#[derive(Debug, Default)]
pub(super) struct DlqContext {
    pub(super) failed: AtomicU64,
}

impl ClientContext for DlqContext {}

impl ProducerContext for DlqContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%error, "a dead-letter copy was not stored");
        }
    }
}

/// Copies an invalid message to the dead-letter topic with why and where it was read.
pub(super) fn dead_letter(
    dlq: &ThreadedProducer<DlqContext>,
    dlq_topic: &str,
    warnings: &RateLimit,
    message: &BorrowedMessage<'_>,
    invalid: &Invalid,
) {
    let (kind, reason) = (invalid.kind, invalid.reason.as_str());
    let partition = message.partition().to_string();
    let offset = message.offset().to_string();
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
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: "streamrec.reason",
            value: Some(reason),
        })
        .insert(Header {
            key: "streamrec.reason_kind",
            value: Some(kind),
        })
        .insert(Header {
            key: "streamrec.source_topic",
            value: Some(message.topic()),
        })
        .insert(Header {
            key: "streamrec.source_partition",
            value: Some(&partition),
        })
        .insert(Header {
            key: "streamrec.source_offset",
            value: Some(&offset),
        });
    let mut record = BaseRecord::to(dlq_topic)
        .payload(message.payload().unwrap_or_default())
        .headers(headers);
    if let Some(key) = message.key() {
        record = record.key(key);
    }
    send_waiting(dlq, record);
}

/// Copies a value the dataflow could not store to the dead-letter topic, with `headers` saying
/// why.
pub(super) fn dead_letter_value(
    dlq: &ThreadedProducer<DlqContext>,
    dlq_topic: &str,
    headers: &[(&str, &str)],
    key: &[u8],
    payload: &[u8],
) {
    let headers = headers
        .iter()
        .fold(OwnedHeaders::new(), |all, &(key, value)| {
            all.insert(Header {
                key,
                value: Some(value),
            })
        });
    let record = BaseRecord::to(dlq_topic)
        .payload(payload)
        .key(key)
        .headers(headers);
    send_waiting(dlq, record);
}

/// Queues `record`, waiting for room in a full local queue rather than dropping it.
fn send_waiting(dlq: &ThreadedProducer<DlqContext>, mut record: BaseRecord<'_, [u8], [u8]>) {
    // A full local queue drains as the broker acknowledges; wait for room rather than drop.
    loop {
        match dlq.send(record) {
            Ok(()) => break,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((error, _)) => {
                dlq.context().failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "cannot queue a dead-letter copy");
                break;
            }
        }
    }
}
