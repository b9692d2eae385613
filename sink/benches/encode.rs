//! Encoding one profile as the JSON value the sink writes to Redis (semantics §6).
//!
//! The dataflow's writer encodes every changed profile of every epoch, on a worker's core, before
//! Redis sees a byte, so this bounds how many profiles per second one core can hand to Redis.
//! The profile is realistic: a 14-character reviewer id and 50 ASIN-like item ids from
//! `datagen`, held as `String`s as the dataflow holds them, and a D = 32 interest vector computed
//! from `datagen` features (full-precision floats, which is what makes the float formatting
//! cost what it does), about 1.1 KB of JSON. `encode_profile` allocates its output, as
//! `EncodedProfile::encode`, which the dataflow calls, does.
//!
//! ```text
//! cargo bench -p streamrec-sink --bench encode
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sink::encode_profile;

mod realistic;

fn encode(c: &mut Criterion) {
    let profiles = realistic::Profiles::new(1);
    let record = profiles.record(&profiles.users[0]);
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
