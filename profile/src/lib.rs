//! The streamrec data contract in code, shared by every component so that no crate parses or
//! computes a profile on its own: the profile message and its codecs (JSON by default, bincode 1.3
//! as an option) with the validation rules of semantics §2, the item-feature message of §3, the
//! history order and window of §1, the interest-vector formula of §5 and the Redis key of §6; and
//! the rate limit every component's warnings go through.

mod fast_json;
mod history;
mod item;
mod message;
mod rate_limit;
mod vector;

pub use history::{history_order, history_window, keep_last};
pub use item::{
    features_in_bounds, InvalidItemFeatures, ItemFeaturesMessage, MAX_FEATURE_MAGNITUDE,
};
pub use message::{
    validate_timestamp, validate_user_id, Encoding, InvalidMessage, ProfileMessage,
    ProfileMessageRef, ProfileMessageView, MAX_HISTORY_ITEMS, MAX_TIMESTAMP, MAX_USER_ID_BYTES,
};
pub use rate_limit::RateLimit;
pub use vector::{interest_vector, InterestVector};

/// Default number of history items kept per user (semantics §1, §4).
pub const DEFAULT_MAX_HISTORY: usize = 50;

/// Default recency decay of the interest vector (semantics §5).
pub const DEFAULT_DECAY: f64 = 0.9;

/// What every profile key starts with (semantics §6).
pub const REDIS_KEY_PREFIX: &str = "user_profile:";

/// The Redis key that holds a user's profile (semantics §6).
pub fn redis_key(user_id: &str) -> String {
    format!("{REDIS_KEY_PREFIX}{user_id}")
}

/// What every recommendation key starts with (semantics §8).
pub const RECS_KEY_PREFIX: &str = "user_recs:";

/// The Redis key that holds a user's recommendations (semantics §8): JSON `{"user_id",
/// "timestamp", "items": [{"item_id", "score"}], "epoch"}`.
pub fn recs_key(user_id: &str) -> String {
    format!("{RECS_KEY_PREFIX}{user_id}")
}

/// The Redis key of the most popular items (semantics §8): JSON `[{"item_id", "users"}]`, the
/// top [`POPULAR_ITEMS`] by the number of users whose window holds them.
pub const POPULAR_ITEMS_KEY: &str = "popular_items";

/// How many items `popular_items` lists (semantics §8).
pub const POPULAR_ITEMS: usize = 100;

/// Default number of recommendations per user (semantics §8, `RECOMMENDATIONS_N`).
pub const DEFAULT_RECOMMENDATIONS_N: usize = 10;
