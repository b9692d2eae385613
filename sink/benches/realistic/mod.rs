//! The realistic profiles the sink's benches encode and frame: 14-character reviewer ids and 50
//! ASIN-like item ids from `datagen`, held as `String`s as the dataflow holds them, and a D = 32
//! interest vector computed from `datagen` features (full-precision floats), about 1.1 KB of
//! JSON each.

use profile::{DEFAULT_DECAY, DEFAULT_MAX_HISTORY};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sink::ProfileRecord;

/// The feature dimension of the end-to-end benchmark.
const DIM: usize = 32;

/// `users` users sharing one history and its interest vector.
pub struct Profiles {
    pub users: Vec<String>,
    items: Vec<String>,
    interest: profile::InterestVector,
}

impl Profiles {
    pub fn new(users: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let users = datagen::user_ids(&mut rng, users);
        let items = datagen::item_ids(&mut rng, DEFAULT_MAX_HISTORY);
        let features: Vec<Vec<f32>> = (0..DEFAULT_MAX_HISTORY)
            .map(|item| datagen::item_features(42, DIM, item))
            .collect();
        let interest = profile::interest_vector(
            features.iter().map(|x| Some(x.as_slice())),
            DIM,
            DEFAULT_DECAY,
        );
        Self {
            users,
            items,
            interest,
        }
    }

    /// The record of `user_id`.
    pub fn record<'a>(&'a self, user_id: &'a str) -> ProfileRecord<'a, String> {
        ProfileRecord {
            user_id,
            timestamp: 1_456_923_842,
            history_items: &self.items,
            interest_vector: &self.interest.vector,
            known_items: self.interest.known_items,
            epoch: 1_795_969_348_800,
        }
    }
}
