//! Decoding and validating one profile message, in JSON and in bincode.
//!
//! This is the first thing the dataflow does with every record it polls from the profile topic
//! (`ProfileMessage::decode` in `dataflow/src/source.rs`), so its cost is paid once per message
//! before any dataflow work, on the same cores as the workers. The message is the realistic one
//! of the end-to-end benchmark: a 14-character reviewer id, 50 ASIN-like item ids (ISBN-10s and
//! `B…` ids, from `datagen`) and a timestamp, about 0.7 KB of JSON. Throughput is given per
//! message and per byte of the encoded value.
//!
//! ```text
//! cargo bench -p streamrec-profile --bench decode
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use profile::{Encoding, ProfileMessage, ProfileMessageView, DEFAULT_MAX_HISTORY};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The message of a user with a full kept history.
fn realistic_message() -> ProfileMessage {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let user_id = datagen::user_ids(&mut rng, 1).remove(0);
    ProfileMessage {
        user_id,
        history_items: datagen::item_ids(&mut rng, DEFAULT_MAX_HISTORY),
        timestamp: 1_456_923_842,
    }
}

fn decode(c: &mut Criterion) {
    let message = realistic_message();
    let mut group = c.benchmark_group("decode");
    for encoding in [Encoding::Json, Encoding::Bincode] {
        let bytes = message.encode(encoding);
        assert_eq!(
            ProfileMessage::decode(&bytes, encoding).expect("the sample decodes"),
            message
        );
        group.throughput(Throughput::ElementsAndBytes {
            elements: 1,
            bytes: bytes.len() as u64,
        });
        group.bench_function(encoding.to_string(), |b| {
            b.iter(|| ProfileMessage::decode(black_box(&bytes), encoding))
        });
        // What the dataflow decodes: the ids borrowed from the value, not one String each.
        group.bench_function(format!("{encoding}_borrowed"), |b| {
            b.iter(|| ProfileMessageView::decode(black_box(&bytes), encoding))
        });
    }
    group.finish();
}

/// Validation alone (semantics §2), which `decode` runs after parsing: what the rules cost on
/// top of the codec.
fn validate(c: &mut Criterion) {
    let message = realistic_message();
    let mut group = c.benchmark_group("validate");
    group.throughput(Throughput::Elements(1));
    group.bench_function("message", |b| b.iter(|| black_box(&message).validate()));
    group.finish();
}

criterion_group!(benches, decode, validate);
criterion_main!(benches);
