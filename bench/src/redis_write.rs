//! The Redis side of a benchmark: how fast Redis stores the profiles the end-to-end run wrote,
//! once as plain pipelined `SET`s (the raw rate) and once through the sink's own path
//! (`RedisSink::write`, i.e. the no-regression Lua script), so that the report shows what the
//! script costs and how far the end-to-end rate is from what Redis alone can take.
//!
//! The values are real profiles of the workload, encoded by `sink::encode_profile`, so they have
//! the size the dataflow writes: user id, 50-item history, D-dimensional vector, known items and
//! epoch.
//!
//! Both phases batch and pipeline exactly as the sink does with its defaults (512 records per
//! batch, 2 batches in flight, one connection per dataflow worker), so that the only differences
//! between them are the command (`SET` against the script's `EVALSHA`) and the sink encoding each
//! record while the other phase sends values encoded before the clock starts.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::Value;
use serde::{Deserialize, Serialize};
use sink::{ProfileRecord, RedisSink, SinkConfig};

use crate::workload::Workload;

/// Timeout of connecting and of every socket read and write: a phase that stalls this long has
/// failed, and waiting forever would hide that.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The profiles the dataflow writes for a run of the workload, in columns.
#[derive(Debug)]
pub struct Profiles<'w> {
    user_ids: Vec<&'w str>,
    timestamps: Vec<u64>,
    /// The kept history of each profile: profile `i`'s ends at `item_ends[i]`.
    items: Vec<&'w str>,
    item_ends: Vec<usize>,
    /// The interest vector of each profile, `dim` values per profile.
    vectors: Vec<f32>,
    dim: usize,
    known_items: Vec<u32>,
    epoch: u64,
}

impl<'w> Profiles<'w> {
    /// The profile written after each of the first `count` messages of `workload` (all of them
    /// if `count` is larger), with the dataflow's defaults (50 kept items, decay 0.9) and
    /// `epoch` as every profile's epoch.
    ///
    /// A message's profile is computed from that message alone, as the dataflow computes it:
    /// every message is newer than all before it, so it replaces its user's history with its
    /// own last 50 items, in message order. The vector comes from
    /// `profile::interest_vector`, as the dataflow's does, so the values are the dataflow's but
    /// for the epoch number.
    pub fn build(workload: &'w Workload, count: usize, epoch: u64) -> Self {
        let count = count.min(workload.messages.len());
        let dim = workload.dim;
        let history = workload.history.min(profile::DEFAULT_MAX_HISTORY);
        let mut profiles = Profiles {
            user_ids: Vec::with_capacity(count),
            timestamps: Vec::with_capacity(count),
            items: Vec::with_capacity(count * history),
            item_ends: Vec::with_capacity(count),
            vectors: Vec::with_capacity(count * dim),
            dim,
            known_items: Vec::with_capacity(count),
            epoch,
        };
        for i in 0..count {
            let kept = profile::keep_last(workload.history_of(i), profile::DEFAULT_MAX_HISTORY);
            let interest = profile::interest_vector(
                kept.iter().map(|&item| workload.features_of(item as usize)),
                dim,
                profile::DEFAULT_DECAY,
            );
            profiles
                .user_ids
                .push(&workload.users[workload.message_users[i] as usize]);
            profiles.timestamps.push(workload.timestamps[i]);
            profiles.items.extend(
                kept.iter()
                    .map(|&item| workload.items[item as usize].as_str()),
            );
            profiles.item_ends.push(profiles.items.len());
            profiles.vectors.extend_from_slice(&interest.vector);
            profiles.known_items.push(interest.known_items);
        }
        profiles
    }

    /// Number of profiles.
    pub fn len(&self) -> usize {
        self.user_ids.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.user_ids.is_empty()
    }

    /// Profile `i` as the sink takes it.
    pub fn record(&self, i: usize) -> ProfileRecord<'_> {
        ProfileRecord {
            user_id: self.user_ids[i],
            timestamp: self.timestamps[i],
            history_items: &self.items
                [i.checked_sub(1).map_or(0, |before| self.item_ends[before])..self.item_ends[i]],
            interest_vector: &self.vectors[i * self.dim..(i + 1) * self.dim],
            known_items: self.known_items[i],
            epoch: self.epoch,
        }
    }

    /// The profiles' indices split over `connections`, each user always on the same one (as
    /// the dataflow routes a user to one worker), in profile order within each.
    fn shards(&self, connections: usize) -> Vec<Vec<usize>> {
        let connections = connections.max(1);
        let mut shards = vec![Vec::new(); connections];
        for (i, user) in self.user_ids.iter().enumerate() {
            // DefaultHasher::new() has fixed keys, so the split is the same on every run.
            let mut hasher = std::hash::DefaultHasher::new();
            user.hash(&mut hasher);
            shards[(hasher.finish() % connections as u64) as usize].push(i);
        }
        shards
    }
}

/// What one Redis phase measured.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RedisPhase {
    /// Profile values sent.
    pub writes: u64,
    /// Values the script did not store because Redis held a newer one (always 0 for `SET`).
    pub skipped_stale: u64,
    /// From the first command sent to the last reply, over all connections.
    pub seconds: f64,
    /// Bytes of the commands sent (keys, values and framing; for the script also each
    /// record's timestamp and epoch).
    pub command_bytes: u64,
    /// Connections writing in parallel.
    pub connections: usize,
    /// Records per pipelined batch.
    pub batch: usize,
    /// Batches in flight per connection.
    pub depth: usize,
}

impl RedisPhase {
    /// Profile writes per second.
    pub fn rate(&self) -> f64 {
        self.writes as f64 / self.seconds.max(1e-9)
    }

    /// Mean bytes sent per profile write.
    pub fn bytes_per_write(&self) -> f64 {
        self.command_bytes as f64 / self.writes.max(1) as f64
    }
}

fn connect(url: &str) -> anyhow::Result<redis::Connection> {
    let client = redis::Client::open(url).context("parsing the Redis URL (--redis)")?;
    // Messages name host, port and db, not the URL, which may hold a password.
    let info = client.get_connection_info();
    let conn = client
        .get_connection_with_timeout(IO_TIMEOUT)
        .with_context(|| {
            format!(
                "connecting to Redis at {} db {}",
                info.addr(),
                info.redis_settings().db()
            )
        })?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

/// The Redis of a run: one server's URL, or (`cluster`) a Redis Cluster's seed list.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    pub url: String,
    pub cluster: bool,
}

impl RedisTarget {
    /// The URL of each server to act on: the one, or every master of the cluster.
    fn servers(&self) -> anyhow::Result<Vec<String>> {
        if !self.cluster {
            return Ok(vec![self.url.clone()]);
        }
        sink::cluster_master_urls(&self.url, IO_TIMEOUT).context("reading the cluster's masters")
    }
}

/// Checks that Redis answers at `target` (`PING`, on every master of a cluster).
pub fn ping(target: &RedisTarget) -> anyhow::Result<()> {
    for url in target.servers()? {
        let mut conn = connect(&url)?;
        redis::cmd("PING").exec(&mut conn).context("PING")?;
    }
    Ok(())
}

/// Empties the database of `target`, every master of a cluster (`FLUSHDB`, synchronously: an
/// `ASYNC` flush would free the old keys in the background while the next phase is being timed).
pub fn flush_db(target: &RedisTarget) -> anyhow::Result<()> {
    for url in target.servers()? {
        let mut conn = connect(&url)?;
        redis::cmd("FLUSHDB").exec(&mut conn).context("FLUSHDB")?;
    }
    Ok(())
}

/// Runs `work` on one thread per shard, each after its own setup and all started together;
/// returns the time from the first start to the last finish, and what the threads returned.
fn timed_parallel<S, T>(
    shards: Vec<Vec<usize>>,
    setup: impl Fn(&[usize]) -> anyhow::Result<S> + Sync,
    work: impl Fn(S) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<(Duration, Vec<T>)>
where
    S: Send,
    T: Send,
{
    let barrier = Barrier::new(shards.len());
    let results: Vec<anyhow::Result<(Instant, Instant, T)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = shards
            .iter()
            .map(|shard| {
                let (barrier, setup, work) = (&barrier, &setup, &work);
                scope.spawn(move || {
                    let state = setup(shard);
                    // Every thread reaches the barrier, even after a failed setup, so that the
                    // others are not left waiting.
                    barrier.wait();
                    let state = state?;
                    let start = Instant::now();
                    let out = work(state)?;
                    Ok((start, Instant::now(), out))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("writer thread panicked")))
            })
            .collect()
    });
    let mut span: Option<(Instant, Instant)> = None;
    let mut outs = Vec::with_capacity(results.len());
    for result in results {
        let (start, end, out) = result?;
        span = Some(span.map_or((start, end), |(s, e)| (s.min(start), e.max(end))));
        outs.push(out);
    }
    let (start, end) = span.ok_or_else(|| anyhow::anyhow!("no writer thread"))?;
    Ok((end.duration_since(start), outs))
}

/// Writes every profile as `SET user_profile:<id> <value>`, pipelined like the sink (same batch
/// size, same number of batches in flight, one connection per dataflow worker). The values are
/// encoded before the clock starts: this is the rate Redis and the client library reach with
/// nothing else to do.
///
/// On a cluster each connection is the redis crate's cluster connection and each batch one
/// cluster pipeline, which it splits by node: one batch in flight, not `pipeline_depth`.
pub fn set_phase(
    target: &RedisTarget,
    profiles: &Profiles,
    connections: usize,
) -> anyhow::Result<RedisPhase> {
    if target.cluster {
        return cluster_set_phase(&target.url, profiles, connections);
    }
    let url = target.url.as_str();
    let defaults = SinkConfig::default();
    let (batch, depth) = (defaults.max_batch_records, defaults.pipeline_depth);
    let (elapsed, written) = timed_parallel(
        profiles.shards(connections),
        |shard| {
            let values = keys_and_values(profiles, shard);
            Ok((connect(url)?, values))
        },
        |(mut conn, values)| {
            let mut in_flight: VecDeque<usize> = VecDeque::with_capacity(depth);
            let mut bytes = 0;
            for chunk in values.chunks(batch) {
                let mut pipe = redis::pipe();
                for (key, value) in chunk {
                    pipe.cmd("SET").arg(key).arg(value);
                }
                let packed = pipe.get_packed_pipeline();
                bytes += packed.len() as u64;
                conn.send_packed_command(&packed)?;
                in_flight.push_back(chunk.len());
                // As the sink: after sending, wait until depth - 1 batches are left in flight,
                // so that the next batch is packed while Redis executes the previous one.
                while in_flight.len() >= depth {
                    read_oks(&mut conn, in_flight.pop_front().unwrap_or(0))?;
                }
            }
            while let Some(replies) = in_flight.pop_front() {
                read_oks(&mut conn, replies)?;
            }
            Ok((values.len() as u64, bytes))
        },
    )?;
    Ok(RedisPhase::of_sets(elapsed, &written, batch, depth))
}

/// The key and encoded value of each profile of `shard`, made before the clock starts.
fn keys_and_values(profiles: &Profiles, shard: &[usize]) -> Vec<(String, Vec<u8>)> {
    shard
        .iter()
        .map(|&i| {
            let record = profiles.record(i);
            (
                profile::redis_key(record.user_id),
                sink::encode_profile(&record),
            )
        })
        .collect()
}

fn cluster_set_phase(
    seeds: &str,
    profiles: &Profiles,
    connections: usize,
) -> anyhow::Result<RedisPhase> {
    let batch = SinkConfig::default().max_batch_records;
    let seeds = sink::cluster_seed_urls(seeds)?;
    let (elapsed, written) = timed_parallel(
        profiles.shards(connections),
        |shard| {
            let values = keys_and_values(profiles, shard);
            let conn = redis::cluster::ClusterClient::new(seeds.clone())?.get_connection()?;
            Ok((conn, values))
        },
        |(mut conn, values)| {
            let mut bytes = 0;
            for chunk in values.chunks(batch) {
                let mut pipe = redis::cluster::cluster_pipe();
                for (key, value) in chunk {
                    pipe.cmd("SET").arg(key).arg(value);
                    bytes += (key.len() + value.len()) as u64;
                }
                pipe.exec(&mut conn)?;
            }
            Ok((values.len() as u64, bytes))
        },
    )?;
    Ok(RedisPhase::of_sets(elapsed, &written, batch, 1))
}

impl RedisPhase {
    /// A phase of plain `SET`s: `written` holds each connection's (writes, bytes).
    fn of_sets(elapsed: Duration, written: &[(u64, u64)], batch: usize, depth: usize) -> Self {
        RedisPhase {
            writes: written.iter().map(|w| w.0).sum(),
            skipped_stale: 0,
            seconds: elapsed.as_secs_f64(),
            command_bytes: written.iter().map(|w| w.1).sum(),
            connections: written.len(),
            batch,
            depth,
        }
    }
}

/// Reads `replies` replies and checks that each is `OK`.
fn read_oks(conn: &mut redis::Connection, replies: usize) -> anyhow::Result<()> {
    for _ in 0..replies {
        match conn.recv_response()?.extract_error()? {
            Value::Okay => {}
            other => anyhow::bail!("SET answered {other:?}"),
        }
    }
    Ok(())
}

/// Writes every profile through `RedisSink::write` with its default batching, one sink per
/// connection as in the dataflow, each connection's profiles in one call (no epoch barriers:
/// this is the best rate of the sink's path). The sink encodes the records itself, as it does
/// in the dataflow.
pub fn sink_phase(
    target: &RedisTarget,
    profiles: &Profiles,
    connections: usize,
) -> anyhow::Result<RedisPhase> {
    let config = SinkConfig {
        // The sink retries until Redis is back by default; a benchmark should fail instead.
        max_retries: Some(3),
        redis_cluster: target.cluster,
        ..SinkConfig::new(target.url.clone())
    };
    let (batch, depth) = (config.max_batch_records, config.pipeline_depth);
    let (elapsed, stats) = timed_parallel(
        profiles.shards(connections),
        |shard| {
            let sink = RedisSink::connect(config.clone())?;
            let records: Vec<ProfileRecord<'_>> =
                shard.iter().map(|&i| profiles.record(i)).collect();
            Ok((sink, records))
        },
        |(mut sink, records)| {
            let stats = sink.write(records.iter().copied())?;
            anyhow::ensure!(
                stats.written + stats.skipped_stale == records.len(),
                "the sink acknowledged {} + {} stale of {} records",
                stats.written,
                stats.skipped_stale,
                records.len()
            );
            Ok(stats)
        },
    )?;
    Ok(RedisPhase {
        writes: stats
            .iter()
            .map(|s| s.written + s.skipped_stale)
            .sum::<usize>() as u64,
        skipped_stale: stats.iter().map(|s| s.skipped_stale).sum::<usize>() as u64,
        seconds: elapsed.as_secs_f64(),
        command_bytes: stats.iter().map(|s| s.bytes).sum::<usize>() as u64,
        connections: stats.len(),
        batch,
        depth,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{WorkloadConfig, BASE_TIMESTAMP};

    fn small() -> Workload {
        Workload::generate(&WorkloadConfig {
            messages: 300,
            users: 100,
            items: 1000,
            dim: 8,
            history: 50,
            repeat_fraction: None,
            slide: None,
            zipf_s: 0.7,
            seed: 7,
        })
    }

    #[test]
    fn profiles_are_the_messages_histories_with_a_vector() {
        let workload = small();
        let profiles = Profiles::build(&workload, 200, 1_700_000_000_000);
        assert_eq!(profiles.len(), 200);
        let record = profiles.record(3);
        assert_eq!(record.user_id, workload.messages[3].0);
        assert_eq!(record.timestamp, BASE_TIMESTAMP + 3);
        let expected: Vec<&str> = workload
            .history_of(3)
            .iter()
            .map(|&i| workload.items[i as usize].as_str())
            .collect();
        assert_eq!(record.history_items, &expected[..]);
        assert_eq!(record.history_items.len(), 50);
        assert_eq!(record.interest_vector.len(), 8);
        assert!(record.interest_vector.iter().any(|x| *x != 0.0));
        assert_eq!(record.known_items, 50);
        let value = sink::encode_profile(&record);
        assert!(value.ends_with(b"\"epoch\":1700000000000}"));
    }

    #[test]
    fn asking_for_more_profiles_than_messages_gives_one_per_message() {
        let workload = small();
        assert_eq!(Profiles::build(&workload, 10_000, 1).len(), 300);
    }

    #[test]
    fn shards_keep_each_user_on_one_connection_and_cover_everything() {
        let workload = small();
        let profiles = Profiles::build(&workload, 300, 1);
        let shards = profiles.shards(3);
        assert_eq!(shards.len(), 3);
        let mut all: Vec<usize> = shards.concat();
        all.sort_unstable();
        assert_eq!(all, (0..300).collect::<Vec<_>>());
        for (s, shard) in shards.iter().enumerate() {
            for (t, other) in shards.iter().enumerate().filter(|(t, _)| *t != s) {
                assert!(
                    shard.iter().all(|&i| other
                        .iter()
                        .all(|&j| profiles.user_ids[i] != profiles.user_ids[j])),
                    "a user is on connections {s} and {t}"
                );
            }
        }
    }
}
