//! `history(user, T)` of semantics §1 on one user's rows: the contract's `history_window` over
//! rows sorted by `history_order`, and that sort itself.
//!
//! The lookup is what the ingest API does for every user of every request (`/push_interest/`
//! looks up one user, `/send_kafka/` about 45), so at ~30k requests/s it is the API's inner loop.
//! The sort by `history_order` on string ids is the contract's reference order, what any
//! component that keeps rows by id pays once per user (the API's store sorts interned item
//! numbers that follow the same order, at load). Rows are realistic: ASIN-like item
//! ids from `datagen`, review days between 1996 and 2018 at UTC midnight, 30% of them on a day
//! the user already reviewed on (the ties `history_order` breaks). Users have 20, 200 and 2,000
//! rows (the data's floor is 5, its mean 13.5 and its cap 2,000); each lookup asks for a
//! different `T` among 64, spread over the user's time range and past it, so that the branch
//! predictor cannot learn one answer.
//!
//! `keep_last` is not measured: it is a constant-time slice. The ingest API's own store, which
//! adds a user-id hash lookup and interned columns to the same window, is measured in
//! `ingest-api/benches/store.rs`.
//!
//! ```text
//! cargo bench -p streamrec-profile --bench history
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use profile::{history_order, history_window, DEFAULT_MAX_HISTORY};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The row counts of the users measured.
const SIZES: [usize; 3] = [20, 200, 2_000];

/// Seconds in a day: review times are UTC midnights.
const DAY: u64 = 86_400;

/// Number of distinct query times each lookup cycles through.
const QUERIES: usize = 64;

/// One user's `(timestamp, item_id)` rows, in no particular order.
fn user_rows(rng: &mut ChaCha8Rng, rows: usize) -> Vec<(u64, String)> {
    let days = (datagen::TIMESTAMP_MAX - datagen::TIMESTAMP_MIN) / DAY;
    let mut stamps: Vec<u64> = Vec::with_capacity(rows);
    for _ in 0..rows {
        let stamp = if !stamps.is_empty() && rng.random_bool(0.3) {
            stamps[rng.random_range(0..stamps.len())]
        } else {
            datagen::TIMESTAMP_MIN + rng.random_range(0..=days) * DAY
        };
        stamps.push(stamp);
    }
    stamps
        .into_iter()
        .zip(datagen::item_ids(rng, rows))
        .collect()
}

/// Query times spread evenly from just before the first row to a little past the last.
fn query_times(sorted: &[(u64, String)]) -> Vec<u64> {
    let first = sorted.first().map_or(0, |r| r.0).saturating_sub(DAY);
    let last = sorted.last().map_or(0, |r| r.0) + 30 * DAY;
    (0..QUERIES as u64)
        .map(|i| first + (last - first) * i / (QUERIES as u64 - 1))
        .collect()
}

fn lookup(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut group = c.benchmark_group("history_lookup");
    group.throughput(Throughput::Elements(1));
    for size in SIZES {
        let mut rows = user_rows(&mut rng, size);
        rows.sort_by(|a, b| history_order((a.0, &a.1), (b.0, &b.1)));
        let times = query_times(&rows);

        // The window alone: one binary search over the timestamps.
        group.bench_with_input(BenchmarkId::new("window", size), &rows, |b, rows| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % QUERIES;
                history_window(black_box(rows), times[i], DEFAULT_MAX_HISTORY, |r| r.0)
            })
        });

        // The whole lookup as the API answers it: the window's item ids, oldest first.
        group.bench_with_input(BenchmarkId::new("items", size), &rows, |b, rows| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % QUERIES;
                let window =
                    history_window(black_box(rows), times[i], DEFAULT_MAX_HISTORY, |r| r.0);
                rows[window]
                    .iter()
                    .map(|r| r.1.as_str())
                    .collect::<Vec<&str>>()
            })
        });
    }
    group.finish();
}

fn sort(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut group = c.benchmark_group("history_sort");
    for size in SIZES {
        let rows = user_rows(&mut rng, size);
        group.throughput(Throughput::Elements(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &rows, |b, rows| {
            b.iter_batched_ref(
                || rows.iter().map(|r| (r.0, r.1.as_str())).collect::<Vec<_>>(),
                |rows| rows.sort_by(|a, b| history_order(*a, *b)),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, lookup, sort);
criterion_main!(benches);
