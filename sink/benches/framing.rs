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
use sink::{frame_for_bench, EncodedProfile, WriteMode};

mod realistic;

const PROFILES: usize = 1000;

fn framing(c: &mut Criterion) {
    let realistic = realistic::Profiles::new(PROFILES);
    let profiles: Vec<EncodedProfile> = realistic
        .users
        .iter()
        .map(|user_id| EncodedProfile::encode(&realistic.record(user_id)))
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
