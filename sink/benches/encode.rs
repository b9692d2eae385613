//! Encoding one profile as the JSON value the sink writes to Redis (semantics §6).
//!
//! The dataflow's writer encodes every changed profile of every epoch, on a worker's core, before
//! Redis sees a byte, so this bounds how many profiles per second one core can hand to Redis.
//! The profile is realistic: a 14-character reviewer id and 50 ASIN-like item ids from
//! `datagen`, held as `String`s as the dataflow holds them, and a D = 32 interest vector computed
//! from `datagen` features (full-precision floats, which is what makes the float formatting
//! cost what it does), about 1.1 KB of JSON. `encode_profile` allocates its output; the sink
//! itself appends into a reused batch buffer, so it pays a little less than this.
//!
//! ```text
//! cargo bench -p streamrec-sink --bench encode
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use profile::{DEFAULT_DECAY, DEFAULT_MAX_HISTORY};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sink::{encode_profile, ProfileRecord};

/// The feature dimension of the end-to-end benchmark.
const DIM: usize = 32;

fn encode(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let user_id = datagen::user_ids(&mut rng, 1).remove(0);
    let items = datagen::item_ids(&mut rng, DEFAULT_MAX_HISTORY);
    let features: Vec<Vec<f32>> = (0..DEFAULT_MAX_HISTORY)
        .map(|item| datagen::item_features(42, DIM, item))
        .collect();
    let interest = profile::interest_vector(
        features.iter().map(|x| Some(x.as_slice())),
        DIM,
        DEFAULT_DECAY,
    );
    let record = ProfileRecord {
        user_id: &user_id,
        timestamp: 1_456_923_842,
        history_items: &items,
        interest_vector: &interest.vector,
        known_items: interest.known_items,
        epoch: 1_795_969_348_800,
    };
    let bytes = encode_profile(&record).len() as u64;

    let mut group = c.benchmark_group("encode_profile");
    group.throughput(Throughput::ElementsAndBytes { elements: 1, bytes });
    group.bench_function("50_items_d32", |b| {
        b.iter(|| encode_profile(black_box(&record)))
    });
    group.finish();
}

criterion_group!(benches, encode);
criterion_main!(benches);
