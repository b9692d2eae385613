//! The interest-vector maths of semantics §5, as the dataflow computes it and as the contract
//! states it.
//!
//! `Contribution::history` is the sums of one user's history in fixed point: the dataflow
//! recomputes them for every user whose profile or whose items' features changed in an epoch,
//! and they are part of the ~35 µs of worker time per message of the end-to-end benchmark.
//! `Contribution::finish` turns the sums into the vector written to Redis, once per changed user
//! per epoch. `profile::interest_vector` is the plain float formula the dataflow is tested
//! against, measured on the same inputs for comparison.
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
use dataflow::model::Contribution;
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

    /// `USERS` histories of 50 distinct items, oldest first, as
    /// `(distance from the newest, features)`.
    fn histories(&self) -> Vec<Vec<(u32, &[f32])>> {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        (0..USERS)
            .map(|_| {
                let picks = rand::seq::index::sample(&mut rng, ITEMS, DEFAULT_MAX_HISTORY);
                let newest = DEFAULT_MAX_HISTORY - 1;
                picks
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| ((newest - i) as u32, self.features(item)))
                    .collect()
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

    let mut group = c.benchmark_group("contribution_history");
    for (table, histories) in tables.iter().zip(&histories) {
        let dim = table.dim;
        group.throughput(history_throughput(dim));
        group.bench_function(BenchmarkId::new("scattered", dim), |b| {
            let mut u = 0;
            b.iter(|| {
                u = (u + 1) % USERS;
                Contribution::history(dim, decay, black_box(&histories[u]))
            })
        });
        if dim == 32 {
            group.bench_function(BenchmarkId::new("cached", dim), |b| {
                b.iter(|| Contribution::history(dim, decay, black_box(&histories[0])))
            });
        }
    }
    group.finish();

    // The same histories in the shape the float formula takes: features in history order.
    let mut group = c.benchmark_group("interest_vector");
    for (table, histories) in tables.iter().zip(&histories) {
        let dim = table.dim;
        let histories: Vec<Vec<Option<&[f32]>>> = histories
            .iter()
            .map(|h| h.iter().map(|&(_, x)| Some(x)).collect())
            .collect();
        group.throughput(history_throughput(dim));
        group.bench_function(BenchmarkId::new("scattered", dim), |b| {
            let mut u = 0;
            b.iter(|| {
                u = (u + 1) % USERS;
                profile::interest_vector(black_box(&histories[u]).iter().copied(), dim, decay)
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

    let mut group = c.benchmark_group("contribution_finish");
    group.throughput(Throughput::Elements(1));
    for (table, histories) in tables.iter().zip(&histories) {
        let dim = table.dim;
        let sums: Vec<Vec<isize>> = histories
            .iter()
            .map(|h| Contribution::history(dim, decay, h))
            .collect();
        // The two formulas agree to well within the 1e-4 readers compare with (the dataflow's
        // tests check this in earnest; here it only guards that both get the same inputs).
        let (vector, known) = Contribution::finish(&sums[0], dim);
        let expected =
            profile::interest_vector(histories[0].iter().map(|&(_, x)| Some(x)), dim, decay);
        assert_eq!(known, expected.known_items);
        assert!(vector
            .iter()
            .zip(&expected.vector)
            .all(|(x, y)| (x - y).abs() < 1e-5));
        group.bench_function(BenchmarkId::from_parameter(dim), |b| {
            let mut u = 0;
            b.iter(|| {
                u = (u + 1) % USERS;
                Contribution::finish(black_box(&sums[u]), dim)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, vector);
criterion_main!(benches);
