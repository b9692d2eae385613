//! Framing encoded profiles into the Redis commands the sink sends (`EVALSHA` batches through
//! the write script, or plain `MSET`s).
//!
//! This is the dataflow's Redis writer thread's work per value before the socket: the worker
//! encodes each changed profile (`benches/encode.rs`), the writer thread batches the encoded
//! values into commands. 1,000 realistic profiles (a 14-character reviewer id, 50 item ids, a
//! D = 32 vector from `datagen`, about 1.1 KB each) in batches of the default size.
//!
//! ```text
//! cargo bench -p streamrec-sink --bench framing
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use profile::{DEFAULT_DECAY, DEFAULT_MAX_HISTORY};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sink::{frame_for_bench, EncodedProfile, ProfileRecord, WriteMode};

/// The feature dimension of the end-to-end benchmark.
const DIM: usize = 32;
const PROFILES: usize = 1000;

fn framing(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let users = datagen::user_ids(&mut rng, PROFILES);
    let items = datagen::item_ids(&mut rng, DEFAULT_MAX_HISTORY);
    let features: Vec<Vec<f32>> = (0..DEFAULT_MAX_HISTORY)
        .map(|item| datagen::item_features(42, DIM, item))
        .collect();
    let interest = profile::interest_vector(
        features.iter().map(|x| Some(x.as_slice())),
        DIM,
        DEFAULT_DECAY,
    );
    let profiles: Vec<EncodedProfile> = users
        .iter()
        .map(|user_id| {
            EncodedProfile::encode(&ProfileRecord {
                user_id,
                timestamp: 1_456_923_842,
                history_items: &items,
                interest_vector: &interest.vector,
                known_items: interest.known_items,
                epoch: 1_795_969_348_800,
            })
        })
        .collect::<Result<_, _>>()
        .expect("the profiles are valid");

    let mut group = c.benchmark_group("frame_encoded");
    group.throughput(Throughput::Elements(PROFILES as u64));
    for (name, mode) in [("checked", WriteMode::Checked), ("plain", WriteMode::Plain)] {
        group.bench_function(name, |b| {
            b.iter(|| frame_for_bench(black_box(&profiles), mode))
        });
    }
    group.finish();
}

criterion_group!(benches, framing);
criterion_main!(benches);
