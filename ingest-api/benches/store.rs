//! `BehaviorStore::history(user, T)`: the ingest API's lookup of a user's history (semantics §1).
//!
//! Every `/push_interest/` request makes one such lookup and every `/send_kafka/` request about
//! 45, so at the API's ~30k requests/s this is its inner loop next to the Kafka publish. A lookup
//! is a hash lookup of the user id, the contract's `history_window` (a binary search) over the
//! user's timestamp column and a gather of the window's interned item ids. The same window on
//! plain rows, without the store, is measured in `profile/benches/history.rs`.
//!
//! The store is loaded once, outside the measurement, from a behaviour CSV generated in memory by
//! `datagen`: 100,000 users (about a quarter of the full data, with the same heavy-tailed rows per
//! user, mean 13.5) and 200,000 items, plus 16 users with exactly 20, 16 with 200 and 16 with
//! 2,000 rows. Lookups cycle through those users and through 64 query times spread over the
//! data's 1996–2018 range, so that neither one user's rows nor one answer stays hot; `typical`
//! cycles through 1,024 users of the generated distribution.
//!
//! ```text
//! cargo bench -p streamrec-ingest-api --bench store
//! ```

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use datagen::{GeneratorConfig, Row};
use ingest_api::store::BehaviorStore;
use profile::DEFAULT_MAX_HISTORY;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Row counts of the users injected into the generated data.
const SIZES: [usize; 3] = [20, 200, 2_000];

/// Injected users per size.
const USERS_PER_SIZE: usize = 16;

/// Generated users looked up by `typical`.
const TYPICAL_USERS: usize = 1_024;

/// Number of distinct query times lookups cycle through.
const QUERIES: usize = 64;

/// Seconds in a day: review times are UTC midnights.
const DAY: u64 = 86_400;

struct Setup {
    store: BehaviorStore,
    /// The injected users, by size.
    sized: Vec<(usize, Vec<String>)>,
    typical: Vec<String>,
    times: Vec<u64>,
}

fn setup() -> Setup {
    let config = GeneratorConfig {
        users: 100_000,
        items: datagen::FULL_ITEMS,
        seed: 4,
        ..GeneratorConfig::default()
    };
    let mut data = datagen::generate(&config).expect("a valid generator configuration");
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let typical: Vec<String> = (0..TYPICAL_USERS)
        .map(|_| data.users[rng.random_range(0..config.users)].clone())
        .collect();

    let days = (datagen::TIMESTAMP_MAX - datagen::TIMESTAMP_MIN) / DAY;
    let extra = datagen::user_ids(&mut rng, SIZES.len() * USERS_PER_SIZE);
    let mut sized = Vec::new();
    for (s, &size) in SIZES.iter().enumerate() {
        let ids = extra[s * USERS_PER_SIZE..(s + 1) * USERS_PER_SIZE].to_vec();
        for id in &ids {
            let user = data.users.len() as u32;
            data.users.push(id.clone());
            let mut stamps: Vec<u64> = Vec::with_capacity(size);
            for item in rand::seq::index::sample(&mut rng, data.items.len(), size) {
                // 30% of reviews on a day the user already reviewed on, as in the generator.
                let timestamp = if !stamps.is_empty() && rng.random_bool(0.3) {
                    stamps[rng.random_range(0..stamps.len())]
                } else {
                    datagen::TIMESTAMP_MIN + rng.random_range(0..=days) * DAY
                };
                stamps.push(timestamp);
                data.rows.push(Row {
                    user,
                    item: item as u32,
                    timestamp,
                });
            }
        }
        sized.push((size, ids));
    }

    let mut csv = Vec::new();
    datagen::write_behavior_csv(&data, &mut csv).expect("writing to a Vec cannot fail");
    let store = BehaviorStore::from_reader(csv.as_slice()).expect("the generated CSV loads");
    assert_eq!(store.stats().bad_rows, 0);

    let (first, last) = (datagen::TIMESTAMP_MIN, datagen::TIMESTAMP_MAX + 30 * DAY);
    let times = (0..QUERIES as u64)
        .map(|i| first + (last - first) * i / (QUERIES as u64 - 1))
        .collect();
    Setup {
        store,
        sized,
        typical,
        times,
    }
}

/// Benchmarks lookups that cycle through `users` and the query times.
fn bench_users(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    setup: &Setup,
    users: &[String],
) {
    let store = &setup.store;
    assert!(users
        .iter()
        .all(|u| !store.history(u, u64::MAX, 1).is_empty()));
    group.bench_function(id, |b| {
        // The next user on every lookup, the next time on every pass over the users: every
        // user meets every time.
        let (mut u, mut t) = (0, 0);
        b.iter(|| {
            u += 1;
            if u == users.len() {
                u = 0;
                t = (t + 1) % QUERIES;
            }
            store.history(black_box(&users[u]), setup.times[t], DEFAULT_MAX_HISTORY)
        })
    });
}

fn lookup(c: &mut Criterion) {
    let setup = setup();
    let mut group = c.benchmark_group("store_history");
    group.throughput(Throughput::Elements(1));
    bench_users(
        &mut group,
        BenchmarkId::from_parameter("typical"),
        &setup,
        &setup.typical,
    );
    for (size, users) in &setup.sized {
        bench_users(&mut group, BenchmarkId::from_parameter(size), &setup, users);
    }
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
