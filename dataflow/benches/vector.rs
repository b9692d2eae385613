//! The interest-vector maths of semantics §5, as the dataflow computes it: the contract's own
//! formula, `profile::interest_vector`, over a history whose features are looked up in the
//! worker's feature table. The dataflow runs it for every user whose profile or whose items'
//! features changed in an epoch, once per changed user.
//!
//! Inputs are realistic: histories of 50 items, all with features, drawn uniformly from a table
//! of 200,000 items (the end-to-end benchmark's), with `datagen`'s features (uniform on [-1, 1])
//! and decay 0.9. `scattered` cycles through 4,096 such histories, so that, as in the dataflow,
//! the features come from a table larger than the caches (25.6 MB at D = 32, in a 32 MiB L3 that
//! other processes share); `cached` repeats one history, whose features then stay in L1/L2.
//!
//! ```text
//! cargo bench -p streamrec-dataflow --bench vector
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use profile::{DEFAULT_DECAY, DEFAULT_MAX_HISTORY};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Items in the feature table.
const ITEMS: usize = 200_000;

/// Histories cycled through by the `scattered` benchmarks.
const USERS: usize = 4_096;

/// The feature dimensions measured; 32 is the default and the end-to-end benchmark's.
const DIMS: [usize; 3] = [8, 32, 128];

/// Every item's features, `dim` values each, in one flat table.
struct Table {
    dim: usize,
    values: Vec<f32>,
}

impl Table {
    fn new(dim: usize) -> Self {
        let mut values = Vec::with_capacity(ITEMS * dim);
        for item in 0..ITEMS {
            values.extend(datagen::item_features(42, dim, item));
        }
        Table { dim, values }
    }

    fn features(&self, item: usize) -> &[f32] {
        &self.values[item * self.dim..(item + 1) * self.dim]
    }

    /// `USERS` histories of 50 distinct items, oldest first, as their features.
    fn histories(&self) -> Vec<Vec<&[f32]>> {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        (0..USERS)
            .map(|_| {
                let picks = rand::seq::index::sample(&mut rng, ITEMS, DEFAULT_MAX_HISTORY);
                picks.into_iter().map(|item| self.features(item)).collect()
            })
            .collect()
    }
}

fn history_throughput(dim: usize) -> Throughput {
    Throughput::ElementsAndBytes {
        elements: DEFAULT_MAX_HISTORY as u64,
        bytes: (DEFAULT_MAX_HISTORY * dim * size_of::<f32>()) as u64,
    }
}

fn vector(c: &mut Criterion) {
    let decay = DEFAULT_DECAY;
    let tables: Vec<Table> = DIMS.into_iter().map(Table::new).collect();
    let histories: Vec<_> = tables.iter().map(Table::histories).collect();

    // Features in history order, as the dataflow passes them.
    let mut group = c.benchmark_group("interest_vector");
    for (table, histories) in tables.iter().zip(&histories) {
        let dim = table.dim;
        let histories: Vec<Vec<Option<&[f32]>>> = histories
            .iter()
            .map(|h| h.iter().map(|&x| Some(x)).collect())
            .collect();
        group.throughput(history_throughput(dim));
        group.bench_function(BenchmarkId::new("scattered", dim), |b| {
            let mut u = 0;
            b.iter(|| {
                u = (u + 1) % USERS;
                profile::interest_vector(black_box(&histories[u]).iter().copied(), dim, decay)
            })
        });
        // What the dataflow does: touch every row first, so that the cache misses overlap.
        group.bench_function(BenchmarkId::new("scattered_touched", dim), |b| {
            let mut u = 0;
            b.iter(|| {
                u = (u + 1) % USERS;
                let history = black_box(&histories[u]);
                let mut touch = 0f32;
                for x in history.iter().flatten() {
                    touch += x.first().unwrap_or(&0.0) + x.last().unwrap_or(&0.0);
                }
                black_box(touch);
                profile::interest_vector(history.iter().copied(), dim, decay)
            })
        });
        if dim == 32 {
            group.bench_function(BenchmarkId::new("cached", dim), |b| {
                b.iter(|| {
                    profile::interest_vector(black_box(&histories[0]).iter().copied(), dim, decay)
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, vector);
criterion_main!(benches);
