//! The dataflow core alone, driven from memory through [`dataflow::in_memory::run_in_memory_with`]:
//! no broker, no Redis, so what is measured is the interest operator and its state. Three
//! measurements:
//! - [`scaling`]: the benchmark workload's throughput on each worker count;
//! - [`incremental`]: the time of an epoch of a few changed users, with a small and a large
//!   number of users already in state (an incremental core costs the same on both);
//! - [`item_update`]: the time of an epoch with one item-feature update held by K users (the
//!   holders index makes it O(K), whatever the number of users).
//!
//! Inputs are built before the clock starts: the workload's JSON is decoded to events, and each
//! run's events are made before it, so only the dataflow is timed.

use std::time::Duration;

use dataflow::in_memory::{run_in_memory_with, EpochInput, MemoryOptions, TimedRun};
use dataflow::interest::InterestParams;
use dataflow::model::{id_key, FeatureEvent, FeatureVector, ProfileEvent, ReadPosition};
use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::ratio;
use crate::workload::{Workload, WorkloadConfig};

/// Partitions of the imagined profile topic, as many as the end-to-end benchmark's default: a
/// worker feeds the partitions it owns, so this must be a multiple of the worker counts for an
/// even split.
pub const PARTITIONS: u64 = 4;

/// The partition of item-feature events, apart from the profile partitions so that positions
/// never clash (the item topic has one partition).
pub const ITEM_PARTITION: i32 = 1000;

/// The first timestamp of generated messages, as the workload's.
const BASE_TIMESTAMP: u64 = 1_500_000_000;

/// Why a measurement could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("a generated message does not decode: {0}")]
    Decode(#[from] profile::InvalidMessage),
    #[error("the dataflow failed: {0}")]
    Dataflow(String),
    #[error("{0}")]
    Config(String),
}

/// Splits `items` into consecutive epochs of `per_epoch` (the last may be shorter); `per_epoch`
/// 0 is taken as 1.
pub fn split_epochs<T>(items: Vec<T>, per_epoch: usize) -> Vec<Vec<T>> {
    let per_epoch = per_epoch.max(1);
    let mut epochs = Vec::with_capacity(items.len().div_ceil(per_epoch));
    let mut items = items.into_iter().peekable();
    while items.peek().is_some() {
        epochs.push(items.by_ref().take(per_epoch).collect());
    }
    epochs
}

/// The median of `samples` (the mean of the middle two for an even count); zero if empty.
pub fn median(samples: &[Duration]) -> Duration {
    // `low + (high - low) / 2`: the same as their mean, and it cannot overflow.
    middle(samples, Duration::cmp).map_or(Duration::ZERO, |(low, high)| low + (high - low) / 2)
}

/// The middle two of `values` in `order`, the same value twice for an odd count; `None` if
/// empty: what a median takes the mean of, whatever the values' kind.
pub fn middle<T: Copy>(
    values: &[T],
    order: impl FnMut(&T, &T) -> std::cmp::Ordering,
) -> Option<(T, T)> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(order);
    let n = sorted.len();
    (n > 0).then(|| (sorted[(n - 1) / 2], sorted[n / 2]))
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// Read positions as Kafka would give them: a user's messages go to one partition, chosen by
/// its key, which keeps their order; offsets count up per partition.
#[derive(Debug, Default)]
struct Positions {
    offsets: [i64; PARTITIONS as usize],
}

impl Positions {
    fn next(&mut self, user_id: &str) -> ReadPosition {
        let partition = (id_key(user_id) % u128::from(PARTITIONS)) as usize;
        self.offsets[partition] += 1;
        (partition as i32, self.offsets[partition])
    }
}

/// The workload's items with their popularity, to draw histories from.
#[derive(Debug)]
struct Catalogue {
    items: Vec<String>,
    popularity: WeightedIndex<f64>,
    rng: ChaCha8Rng,
}

impl Catalogue {
    /// The items `config` describes, as the workload generates them.
    fn new(config: &WorkloadConfig) -> Result<Self, CoreError> {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let items = datagen::item_ids(&mut rng, config.items.max(1));
        let popularity =
            WeightedIndex::new((0..items.len()).map(|r| (r as f64 + 1.0).powf(-config.zipf_s)))
                .map_err(|e| CoreError::Config(format!("Zipf weights: {e}")))?;
        Ok(Catalogue {
            items,
            popularity,
            rng,
        })
    }

    fn history(&mut self, len: usize) -> Vec<String> {
        (0..len)
            .map(|_| self.items[self.popularity.sample(&mut self.rng)].clone())
            .collect()
    }

    fn user_ids(&mut self, n: usize) -> Vec<String> {
        datagen::user_ids(&mut self.rng, n)
    }
}

/// Every item's features at epoch 0, as the workload's features file has them.
fn initial_features(items: &[String], seed: u64, dim: usize) -> Vec<FeatureEvent> {
    items
        .iter()
        .enumerate()
        .map(|(index, item)| FeatureEvent {
            item_id: item.clone(),
            features: FeatureVector::new(&datagen::item_features(seed, dim, index)),
            position: (ITEM_PARTITION, index as i64),
        })
        .collect()
}

/// The workload's own item features at epoch 0, as its features file has them.
fn workload_features(workload: &Workload) -> Vec<FeatureEvent> {
    (0..workload.items.len())
        .filter_map(|index| {
            Some(FeatureEvent {
                item_id: workload.items[index].clone(),
                features: FeatureVector::new(workload.features_of(index)?),
                position: (ITEM_PARTITION, index as i64),
            })
        })
        .collect()
}

fn profile_event(
    positions: &mut Positions,
    user_id: &str,
    timestamp: u64,
    history_items: Vec<String>,
    max_history: usize,
) -> ProfileEvent {
    let position = positions.next(user_id);
    let message = profile::ProfileMessage {
        user_id: user_id.to_owned(),
        history_items,
        timestamp,
    };
    ProfileEvent::from_message(message, position, max_history)
}

/// Decodes the workload's messages to events, as the Kafka source would.
pub fn decode_workload(
    workload: &Workload,
    max_history: usize,
) -> Result<Vec<ProfileEvent>, CoreError> {
    let mut positions = Positions::default();
    workload
        .messages
        .iter()
        .map(|(key, value)| {
            let message = profile::ProfileMessage::decode(value, profile::Encoding::Json)?;
            Ok(ProfileEvent::from_message(
                message,
                positions.next(key),
                max_history,
            ))
        })
        .collect()
}

fn run(
    workers: usize,
    params: InterestParams,
    initial: Vec<FeatureEvent>,
    epochs: Vec<EpochInput>,
    lockstep: bool,
) -> Result<TimedRun, CoreError> {
    let options = MemoryOptions {
        keep_outputs: false,
        lockstep,
    };
    run_in_memory_with(workers, params, initial, epochs, options).map_err(CoreError::Dataflow)
}

/// Changed outputs of `epoch` (the values the writer got).
fn changed(run: &TimedRun, epoch: u64) -> u64 {
    run.run.counters.get(&epoch).map_or(0, |c| c.changed)
}

/// What [`scaling`] runs.
#[derive(Debug, Clone)]
pub struct ScalingConfig {
    pub epoch_messages: usize,
    pub workers: Vec<usize>,
    pub runs: usize,
    pub max_history: usize,
    pub decay: f64,
}

/// One timed run of the whole workload.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingRun {
    pub workers: usize,
    pub seconds: f64,
    pub msgs_per_s: f64,
    pub messages: u64,
    pub changed: u64,
}

/// A worker count's median over its runs.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingRow {
    pub workers: usize,
    pub median_msgs_per_s: f64,
    /// Median rate over the first worker count's.
    pub speedup: Option<f64>,
}

/// What [`scaling`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingReport {
    pub messages: usize,
    pub distinct_users: usize,
    pub epochs: usize,
    pub epoch_messages: usize,
    pub rows: Vec<ScalingRow>,
    pub runs: Vec<ScalingRun>,
}

/// Runs the whole workload, in epochs of `epoch_messages`, on each worker count `runs` times
/// (alternating counts, so that a noisy spell hits each alike) and reports the median rates.
pub fn scaling(workload: &Workload, config: &ScalingConfig) -> Result<ScalingReport, CoreError> {
    let params = InterestParams {
        dim: workload.dim,
        decay: config.decay,
    };
    let mut runs = Vec::new();
    let mut epochs = 0;
    for _ in 0..config.runs.max(1) {
        for &workers in &config.workers {
            let events = decode_workload(workload, config.max_history)?;
            let inputs: Vec<EpochInput> = split_epochs(events, config.epoch_messages)
                .into_iter()
                .map(|profiles| EpochInput {
                    profiles,
                    features: Vec::new(),
                })
                .collect();
            epochs = inputs.len();
            let initial = workload_features(workload);
            let timed = run(workers, params, initial, inputs, false)?;
            let messages: u64 = timed.run.counters.range(1..).map(|(_, c)| c.messages).sum();
            let seconds = timed.elapsed.as_secs_f64();
            runs.push(ScalingRun {
                workers,
                seconds,
                msgs_per_s: ratio(messages as f64, seconds).unwrap_or(0.0),
                messages,
                changed: timed.run.counters.range(1..).map(|(_, c)| c.changed).sum(),
            });
        }
    }
    let mut rows: Vec<ScalingRow> = Vec::new();
    for &workers in &config.workers {
        let mut rates: Vec<f64> = runs
            .iter()
            .filter(|r| r.workers == workers)
            .map(|r| r.msgs_per_s)
            .collect();
        rates.sort_by(f64::total_cmp);
        let median_msgs_per_s = match rates.len() {
            0 => 0.0,
            n if n % 2 == 1 => rates[n / 2],
            n => (rates[n / 2 - 1] + rates[n / 2]) / 2.0,
        };
        let speedup = match rows.first() {
            Some(first) => ratio(median_msgs_per_s, first.median_msgs_per_s),
            None => Some(1.0),
        };
        rows.push(ScalingRow {
            workers,
            median_msgs_per_s,
            speedup,
        });
    }
    Ok(ScalingReport {
        messages: workload.messages.len(),
        distinct_users: workload.distinct_users,
        epochs,
        epoch_messages: config.epoch_messages,
        rows,
        runs,
    })
}

impl ScalingReport {
    /// The report as a plain table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "scaling: {} messages ({} distinct users) in {} epochs of {}\n{:>7} {:>12} {:>8}  runs (msg/s)\n",
            self.messages,
            self.distinct_users,
            self.epochs,
            self.epoch_messages,
            "workers",
            "median msg/s",
            "speedup"
        );
        for row in &self.rows {
            let runs: Vec<String> = self
                .runs
                .iter()
                .filter(|r| r.workers == row.workers)
                .map(|r| format!("{:.0}", r.msgs_per_s))
                .collect();
            out += &format!(
                "{:>7} {:>12.0} {:>8}  {}\n",
                row.workers,
                row.median_msgs_per_s,
                row.speedup.map_or("-".to_owned(), |s| format!("{s:.2}")),
                runs.join(" ")
            );
        }
        out
    }
}

/// What [`incremental`] and [`item_update`] run: epochs fed one at a time and timed.
#[derive(Debug, Clone)]
pub struct EpochConfig {
    pub workers: usize,
    /// Items per history: smaller than the workload's to keep a million users in memory.
    pub history: usize,
    /// Timed epochs per measurement; the median is reported.
    pub repetitions: usize,
    /// Messages per epoch while the state is loaded (not timed), to bound the input in flight.
    pub preload_epoch: usize,
    pub decay: f64,
}

/// One timed measurement: a state size or a holder count, and its epochs.
#[derive(Debug, Clone, Serialize)]
pub struct EpochRow {
    /// Users in state ([`incremental`]) or holders of the updated item ([`item_update`]).
    pub size: usize,
    pub median_ms: f64,
    /// The median per unit of work: per changed user, or per holder.
    pub median_us_per_unit: f64,
    pub epoch_ms: Vec<f64>,
    /// Outputs each timed epoch changed.
    pub changed: Vec<u64>,
}

fn epoch_row(size: usize, units: usize, times: &[Duration], changed: Vec<u64>) -> EpochRow {
    let median = median(times);
    EpochRow {
        size,
        median_ms: millis(median),
        median_us_per_unit: ratio(median.as_secs_f64() * 1e6, units as f64).unwrap_or(0.0),
        epoch_ms: times.iter().copied().map(millis).collect(),
        changed,
    }
}

/// What [`incremental`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct IncrementalReport {
    pub changed_users: usize,
    pub history: usize,
    pub workers: usize,
    pub rows: Vec<EpochRow>,
    /// The last state size's median over the first's.
    pub big_over_small: Option<f64>,
}

/// For each number of users in `states`: loads that many users into state (one message each),
/// then times `repetitions` epochs of `changed_users` new messages for distinct existing users.
pub fn incremental(
    workload: &WorkloadConfig,
    states: &[usize],
    changed_users: usize,
    config: &EpochConfig,
) -> Result<IncrementalReport, CoreError> {
    let params = InterestParams {
        dim: workload.dim,
        decay: config.decay,
    };
    let mut rows = Vec::new();
    for &state in states {
        if changed_users > state {
            return Err(CoreError::Config(format!(
                "{changed_users} changed users among {state} in state"
            )));
        }
        let mut catalogue = Catalogue::new(workload)?;
        let users = catalogue.user_ids(state);
        let mut positions = Positions::default();
        let mut timestamp = BASE_TIMESTAMP;
        let mut events = Vec::with_capacity(state);
        for user in &users {
            timestamp += 1;
            let history = catalogue.history(config.history);
            events.push(profile_event(
                &mut positions,
                user,
                timestamp,
                history,
                config.history,
            ));
        }
        let mut epochs: Vec<EpochInput> = split_epochs(events, config.preload_epoch)
            .into_iter()
            .map(|profiles| EpochInput {
                profiles,
                features: Vec::new(),
            })
            .collect();
        let preload = epochs.len() as u64;
        for _ in 0..config.repetitions.max(1) {
            let chosen = rand::seq::index::sample(&mut catalogue.rng, state, changed_users);
            let mut profiles = Vec::with_capacity(changed_users);
            for user in chosen {
                timestamp += 1;
                let history = catalogue.history(config.history);
                profiles.push(profile_event(
                    &mut positions,
                    &users[user],
                    timestamp,
                    history,
                    config.history,
                ));
            }
            epochs.push(EpochInput {
                profiles,
                features: Vec::new(),
            });
        }
        let timed_epochs = (preload + 1)..=(epochs.len() as u64);
        let initial = initial_features(&catalogue.items, workload.seed, workload.dim);
        drop(users);
        let timed = run(config.workers, params, initial, epochs, true)?;
        let times: Vec<Duration> = timed_epochs
            .clone()
            .map(|e| timed.epoch_times.get(&e).copied().unwrap_or_default())
            .collect();
        let changed = timed_epochs.map(|e| changed(&timed, e)).collect();
        rows.push(epoch_row(state, changed_users, &times, changed));
    }
    let big_over_small = match (rows.first(), rows.last()) {
        (Some(small), Some(big)) => ratio(big.median_ms, small.median_ms),
        _ => None,
    };
    Ok(IncrementalReport {
        changed_users,
        history: config.history,
        workers: config.workers,
        rows,
        big_over_small,
    })
}

impl IncrementalReport {
    /// The report as a plain table.
    pub fn table(&self) -> String {
        let title = format!(
            "incremental: an epoch of {} changed users, history {}, -w {}",
            self.changed_users, self.history, self.workers
        );
        let mut out = rows_table(
            &title,
            ("users in state", 14),
            ("µs/changed user", 14),
            2,
            &self.rows,
        );
        if let Some(r) = self.big_over_small {
            out += &format!("largest / smallest state: {r:.2}\n");
        }
        out
    }
}

/// `title`, then one line per row: its size, median ms and median per unit (with `precision`
/// decimals), and every epoch's ms. A column is as wide as its label asks.
fn rows_table(
    title: &str,
    (size_label, size_width): (&str, usize),
    (unit_label, unit_width): (&str, usize),
    precision: usize,
    rows: &[EpochRow],
) -> String {
    let mut out = format!(
        "{title}\n{size_label:>size_width$} {:>10} {unit_label:>unit_width$}  epochs (ms)\n",
        "median ms"
    );
    for row in rows {
        out += &format!(
            "{:>size_width$} {:>10.precision$} {:>unit_width$.precision$}  {}\n",
            row.size,
            row.median_ms,
            row.median_us_per_unit,
            join_ms(&row.epoch_ms)
        );
    }
    out
}

fn join_ms(times: &[f64]) -> String {
    let times: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
    times.join(" ")
}

/// What [`item_update`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct ItemUpdateReport {
    pub users: usize,
    pub history: usize,
    pub workers: usize,
    pub rows: Vec<EpochRow>,
}

/// The id of the item that exactly `holders` users hold.
fn marker_id(holders: usize) -> String {
    format!("MARKER{holders}")
}

/// Loads `users` users into state, where for each K of `holders` a marker item is held by
/// exactly the first K users (as their newest items, so that a change of its features changes
/// their vectors); then times `repetitions` rounds of one epoch per marker, each carrying one
/// feature update of it.
pub fn item_update(
    workload: &WorkloadConfig,
    users: usize,
    holders: &[usize],
    config: &EpochConfig,
) -> Result<ItemUpdateReport, CoreError> {
    if let Some(&k) = holders.iter().find(|&&k| k > users) {
        return Err(CoreError::Config(format!(
            "{k} holders among {users} users"
        )));
    }
    if holders.len() > config.history {
        return Err(CoreError::Config(format!(
            "{} markers do not fit a history of {}",
            holders.len(),
            config.history
        )));
    }
    let params = InterestParams {
        dim: workload.dim,
        decay: config.decay,
    };
    let mut catalogue = Catalogue::new(workload)?;
    let user_ids = catalogue.user_ids(users);
    let mut positions = Positions::default();
    let mut events = Vec::with_capacity(users);
    for (u, user) in user_ids.iter().enumerate() {
        let held = holders.iter().filter(|&&k| u < k).count();
        let mut history = catalogue.history(config.history - held);
        history.extend(holders.iter().filter(|&&k| u < k).map(|&k| marker_id(k)));
        events.push(profile_event(
            &mut positions,
            user,
            BASE_TIMESTAMP + u as u64,
            history,
            config.history,
        ));
    }
    drop(user_ids);
    let mut epochs: Vec<EpochInput> = split_epochs(events, config.preload_epoch)
        .into_iter()
        .map(|profiles| EpochInput {
            profiles,
            features: Vec::new(),
        })
        .collect();
    let preload = epochs.len() as u64;
    let mut initial = initial_features(&catalogue.items, workload.seed, workload.dim);
    let mut offset = initial.len() as i64;
    let marker_features = |salt: u64, m: usize| {
        FeatureVector::new(&datagen::item_features(
            workload.seed.wrapping_add(salt),
            workload.dim,
            catalogue.items.len() + m,
        ))
    };
    for (m, &k) in holders.iter().enumerate() {
        initial.push(FeatureEvent {
            item_id: marker_id(k),
            features: marker_features(0, m),
            position: (ITEM_PARTITION, offset),
        });
        offset += 1;
    }
    for rep in 0..config.repetitions.max(1) {
        for (m, &k) in holders.iter().enumerate() {
            // A new seed each round: every update differs from the value before it.
            epochs.push(EpochInput {
                profiles: Vec::new(),
                features: vec![FeatureEvent {
                    item_id: marker_id(k),
                    features: marker_features(rep as u64 + 1, m),
                    position: (ITEM_PARTITION, offset),
                }],
            });
            offset += 1;
        }
    }
    let timed = run(config.workers, params, initial, epochs, true)?;
    let rows = holders
        .iter()
        .enumerate()
        .map(|(m, &k)| {
            let epochs: Vec<u64> = (0..config.repetitions.max(1))
                .map(|rep| preload + 1 + (rep * holders.len() + m) as u64)
                .collect();
            let times: Vec<Duration> = epochs
                .iter()
                .map(|e| timed.epoch_times.get(e).copied().unwrap_or_default())
                .collect();
            let changed = epochs.iter().map(|&e| changed(&timed, e)).collect();
            epoch_row(k, k, &times, changed)
        })
        .collect();
    Ok(ItemUpdateReport {
        users,
        history: config.history,
        workers: config.workers,
        rows,
    })
}

impl ItemUpdateReport {
    /// The report as a plain table.
    pub fn table(&self) -> String {
        let title = format!(
            "item-update: one feature update of an item held by K of {} users, history {}, -w {}",
            self.users, self.history, self.workers
        );
        rows_table(&title, ("K", 8), ("µs/holder", 10), 3, &self.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up_their_columns() {
        let row = |size, median_ms, per_unit| EpochRow {
            size,
            median_ms,
            median_us_per_unit: per_unit,
            epoch_ms: vec![1.0, 2.5],
            changed: vec![10, 10],
        };
        let report = ItemUpdateReport {
            users: 200,
            history: 20,
            workers: 1,
            rows: vec![row(10, 0.1325, 13.25)],
        };
        assert_eq!(
            report.table(),
            concat!(
                "item-update: one feature update of an item held by K of 200 users, history 20, -w 1\n",
                "       K  median ms  µs/holder  epochs (ms)\n",
                "      10      0.133     13.250  1.00 2.50\n",
            )
        );
        let report = IncrementalReport {
            changed_users: 1000,
            history: 20,
            workers: 1,
            rows: vec![row(10000, 4.06, 4.06), row(1000000, 6.27, 6.27)],
            big_over_small: Some(1.544),
        };
        assert_eq!(
            report.table(),
            concat!(
                "incremental: an epoch of 1000 changed users, history 20, -w 1\n",
                "users in state  median ms µs/changed user  epochs (ms)\n",
                "         10000       4.06           4.06  1.00 2.50\n",
                "       1000000       6.27           6.27  1.00 2.50\n",
                "largest / smallest state: 1.54\n",
            )
        );
    }

    #[test]
    fn epochs_split_in_order_with_a_short_last() {
        assert_eq!(
            split_epochs((1..=7).collect(), 3),
            vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]
        );
        assert_eq!(split_epochs(vec![1, 2], 2), vec![vec![1, 2]]);
        assert!(split_epochs(Vec::<u8>::new(), 3).is_empty());
        assert_eq!(split_epochs(vec![1, 2], 0), vec![vec![1], vec![2]]);
    }

    #[test]
    fn median_of_odd_even_and_none() {
        let ms = Duration::from_millis;
        assert_eq!(median(&[ms(5), ms(1), ms(3)]), ms(3));
        assert_eq!(median(&[ms(4), ms(1), ms(2), ms(10)]), ms(3));
        assert_eq!(median(&[]), Duration::ZERO);
    }

    #[test]
    fn a_user_keeps_its_partition() {
        let mut positions = Positions::default();
        let first = positions.next("A1");
        let second = positions.next("A1");
        assert_eq!(first.0, second.0);
        assert_eq!(second.1, first.1 + 1);
    }
}
