//! The item-feature message of semantics §3.

use serde::{Deserialize, Serialize};

/// The largest feature magnitude accepted (semantics §3): larger values are taken for a corrupt
/// row or message (no embedding has them) and refused with the rest of it.
pub const MAX_FEATURE_MAGNITUDE: f32 = 1.0e5;

/// Whether every value is a feature value §3 allows: finite, at most
/// [`MAX_FEATURE_MAGNITUDE`] either way. The dataflow checks both its features CSV and the
/// decoded [`ItemFeaturesMessage`]s with it.
pub fn features_in_bounds(values: &[f32]) -> bool {
    values
        .iter()
        .all(|x| x.is_finite() && x.abs() <= MAX_FEATURE_MAGNITUDE)
}

/// An update of one item's features on the item topic; `features: None` (JSON `null`) deletes
/// the item, which makes it unknown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemFeaturesMessage {
    pub item_id: String,
    // A custom deserializer makes the field required: a missing `features` is a malformed
    // message, only an explicit `null` deletes.
    #[serde(deserialize_with = "Option::deserialize")]
    pub features: Option<Vec<f32>>,
}

/// Why an item-feature message is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidItemFeatures {
    #[error("value is not an item-feature message: {0}")]
    WrongShape(String),
    #[error("item_id is empty")]
    EmptyItemId,
    #[error("features has {found} values, expected {expected}")]
    WrongDimension { expected: usize, found: usize },
    #[error("features holds a value that is not finite")]
    NotFinite,
    #[error("features hold a value beyond ±{MAX_FEATURE_MAGNITUDE}")]
    TooLarge,
}

impl ItemFeaturesMessage {
    /// Decodes a JSON value and checks it against the feature dimension `dim` and the bounds of
    /// feature values (finite, within [`MAX_FEATURE_MAGNITUDE`]).
    pub fn decode(value: &[u8], dim: usize) -> Result<Self, InvalidItemFeatures> {
        let message: ItemFeaturesMessage = serde_json::from_slice(value)
            .map_err(|e| InvalidItemFeatures::WrongShape(e.to_string()))?;
        if message.item_id.is_empty() {
            return Err(InvalidItemFeatures::EmptyItemId);
        }
        if let Some(features) = &message.features {
            if features.len() != dim {
                return Err(InvalidItemFeatures::WrongDimension {
                    expected: dim,
                    found: features.len(),
                });
            }
            if !features.iter().all(|x| x.is_finite()) {
                return Err(InvalidItemFeatures::NotFinite);
            }
            if !features_in_bounds(features) {
                return Err(InvalidItemFeatures::TooLarge);
            }
        }
        Ok(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_updates_and_deletes() {
        let update = ItemFeaturesMessage::decode(br#"{"item_id":"i","features":[1,2.5]}"#, 2);
        assert_eq!(update.unwrap().features, Some(vec![1.0, 2.5]));
        let delete = ItemFeaturesMessage::decode(br#"{"item_id":"i","features":null}"#, 2);
        assert_eq!(delete.unwrap().features, None);
    }

    #[test]
    fn rejects_bad_updates() {
        let decode = |v: &[u8]| ItemFeaturesMessage::decode(v, 2).unwrap_err();
        assert!(matches!(
            decode(br#"{"item_id":"i","features":[1]}"#),
            InvalidItemFeatures::WrongDimension {
                expected: 2,
                found: 1
            }
        ));
        assert_eq!(
            decode(br#"{"item_id":"","features":null}"#),
            InvalidItemFeatures::EmptyItemId
        );
        assert!(matches!(
            decode(br#"{"item_id":"i"}"#),
            InvalidItemFeatures::WrongShape(_)
        ));
        assert!(matches!(
            decode(b"nope"),
            InvalidItemFeatures::WrongShape(_)
        ));
        let too_large = decode(br#"{"item_id":"i","features":[1,-100000.5]}"#);
        assert_eq!(too_large, InvalidItemFeatures::TooLarge);
        assert_eq!(
            too_large.to_string(),
            "features hold a value beyond ±100000"
        );
        assert!(
            ItemFeaturesMessage::decode(br#"{"item_id":"i","features":[1,-100000]}"#, 2).is_ok()
        );
    }
}
