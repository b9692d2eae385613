//! The Redis writer of the streamrec dataflow. Once the dataflow's frontier passes an epoch, each
//! timely worker hands its [`RedisSink`] that epoch's final profile of every changed user it
//! owns; [`RedisSink::write`] stores them as the JSON values of semantics §6 under
//! `user_profile:{user_id}` and returns only when Redis acknowledged all of them, so that the
//! worker commits its Kafka offsets only after its output is durable in Redis. The API is
//! synchronous (workers are plain threads, one sink and one connection each) and pipelined:
//! records go in batches bounded by count and bytes, each batch one execution of a Lua script
//! that refuses to move a key back to an older (timestamp, epoch). That check makes retries and
//! replays after a crash harmless, so any failure is handled by resending unacknowledged batches
//! on a fresh connection with exponential backoff; by default nothing is ever dropped.
//!
//!
//! The check costs Redis several times what a plain `SET` does (docs/performance.md). A caller that
//! knows no older value can reach Redis any more (the dataflow, once it has read past every offset
//! a previous run may have written from: see `read_marks`) switches to [`WriteMode::Plain`], and
//! batches become `MSET`s; a retried batch still goes through the script.
//!
//! On a Redis Cluster (`SinkConfig::redis_cluster`) the sink keeps one connection and one batch
//! per master and routes each record by its key's slot, following the cluster through
//! reshardings and failovers with the same guarantees (`cluster`).
//!
//! Layout: `config` (settings), `encode` (the JSON value), `batch` (batching into the wire
//! format), `service` (connection, script, pipelined send, retry), `metrics` (counters),
//! `read_marks` (how far the profile topic may have been read into Redis), `cluster` (seeds,
//! slots, redirects) and `cluster_writer` (routing and resends), `error`.

mod batch;
mod cluster;
mod cluster_writer;
mod config;
mod encode;
mod error;
mod metrics;
mod read_marks;
mod service;

use std::sync::Arc;

pub use config::{redis_client, SinkConfig, WriterFence, DEFAULT_REDIS_URL};
pub use encode::{encode_profile, EncodedProfile, KeyKind, ProfileRecord};
pub use error::SinkError;
pub use metrics::{SinkMetrics, SinkMetricsSnapshot};
pub use read_marks::{ReadMarks, StoredMarks, TakeOver, READ_MARKS_KEY_PREFIX};

use batch::{Batcher, Pushed};
use cluster_writer::ClusterWriter;
use service::Service;

pub use cluster::key_slot;

/// The URL of every master of the Redis Cluster behind the seed list `list` (see
/// [`SinkConfig::redis_cluster`]), from its slot map: for tools that act on each node (a
/// benchmark emptying the cluster).
pub fn cluster_master_urls(
    list: &str,
    io_timeout: std::time::Duration,
) -> Result<Vec<String>, SinkError> {
    let target = cluster::ClusterTarget::parse(list, None)?;
    let slots = target
        .slot_map(&[], io_timeout)
        .map_err(|source| SinkError::Connect {
            addr: target.seed_addrs(),
            source,
        })?;
    slots
        .nodes
        .iter()
        .map(|addr| target.node_url(addr))
        .collect()
}

/// The seed URLs of a Redis Cluster seed list as [`SinkConfig::redis_cluster`] reads it (bare
/// `host:port` entries take the first URL's scheme and credentials), for other clients of the
/// same cluster (the ingest API's reads).
pub fn cluster_seed_urls(list: &str) -> Result<Vec<String>, SinkError> {
    Ok(cluster::ClusterTarget::parse(list, None)?.seeds().to_vec())
}

/// The Lua script every batch runs, for tools and tests that want to inspect or reuse it.
pub const WRITE_SCRIPT: &str = service::WRITE_SCRIPT;

/// Largest timestamp and epoch the script compares exactly (Lua numbers are doubles).
pub const MAX_EXACT: u64 = 1 << 53;

/// Frames `profiles` into the commands [`RedisSink::write_encoded`] would send, with the
/// default batch limits, and returns their total size in bytes: the writer thread's share of
/// the work before the socket, for `benches/framing.rs`. Not part of the API.
#[doc(hidden)]
pub fn frame_for_bench(profiles: &[EncodedProfile], mode: WriteMode) -> usize {
    let config = SinkConfig::default();
    let mut batcher = Batcher::new(
        config.max_batch_records,
        config.max_batch_bytes,
        "0123456789012345678901234567890123456789",
    );
    batcher.set_mode(mode);
    let mut bytes = 0;
    for profile in profiles {
        if let Ok(Pushed {
            sealed: Some(batch),
            ..
        }) = batcher.push_encoded(profile)
        {
            bytes += batch.packed.len();
        }
    }
    bytes + batcher.seal().map_or(0, |batch| batch.packed.len())
}

/// How a write guards a key against going back in time (semantics §6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WriteMode {
    /// Through the write script, which skips a record older than the stored value: safe
    /// whatever Redis holds.
    #[default]
    Checked,
    /// `MSET`, several times cheaper for Redis, and correct only when Redis cannot hold a
    /// value newer than the record: when this sink is the only writer of its keys and every
    /// value written before was older (for the dataflow: after it has caught up with what a
    /// previous run may have written). A batch resent after a failure, and every batch while an
    /// older connection may still run commands, still goes through the script.
    ///
    /// `MSET` also replaces a key of another type (a hash someone else put there) instead of
    /// refusing it with WRONGTYPE as the script does: the caller vouches that nobody else
    /// writes these keys.
    Plain,
}

/// What one [`RedisSink::write`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Records stored.
    pub written: usize,
    /// Of those, records stored by plain batches.
    pub written_plain: usize,
    /// Records not stored because Redis held a newer profile.
    pub skipped_stale: usize,
    /// Batches acknowledged.
    pub batches: usize,
    /// Bytes of the acknowledged batches' commands.
    pub bytes: usize,
    /// Attempts repeated after a failure.
    pub retries: usize,
    /// Records Redis refused for good, left unwritten and set aside so that the rest of the
    /// write goes through: today those whose key holds another type than a string (WRONGTYPE,
    /// e.g. a hash another program put at `user_profile:{id}`). The key is left as it is.
    /// Checked writes only: a plain `MSET` replaces a key of any type, so Redis never refuses
    /// it (see [`WriteMode::Plain`]).
    pub rejected: Vec<RejectedRecord>,
}

/// A record Redis refused for good (see [`WriteStats::rejected`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRecord {
    /// The record's user (empty for `popular_items`).
    pub user_id: String,
    /// Which of the user's keys.
    pub kind: KeyKind,
    /// Redis's error, starting with its code (`WRONGTYPE Operation against a key holding the
    /// wrong kind of value`).
    pub error: String,
}

impl RejectedRecord {
    /// The error's code, its first word (`WRONGTYPE`).
    pub fn code(&self) -> &str {
        self.error.split(' ').next().unwrap_or_default()
    }
}

/// Writes profiles to Redis for one dataflow worker. See the crate documentation.
#[derive(Debug)]
pub struct RedisSink {
    target: Target,
    metrics: Arc<SinkMetrics>,
    mode: WriteMode,
}

/// One Redis, or the nodes of a cluster.
#[derive(Debug)]
enum Target {
    // Boxed: the two differ in size, and either is made once per sink.
    Single {
        service: Box<Service>,
        batcher: Batcher,
    },
    Cluster(Box<ClusterWriter>),
}

impl RedisSink {
    /// Validates the config, connects and loads the write script (`SCRIPT LOAD`).
    ///
    /// Unlike [`write`](Self::write) this does not retry: a Redis that is unreachable at start is
    /// more often a wrong URL than an outage, and the caller is better placed to decide whether
    /// to wait.
    ///
    /// On a cluster it reads the slot map from the seeds and connects to every master.
    pub fn connect(config: SinkConfig) -> Result<Self, SinkError> {
        let metrics = Arc::new(SinkMetrics::default());
        let target = if config.redis_cluster {
            Target::Cluster(Box::new(ClusterWriter::connect(
                &config,
                Arc::clone(&metrics),
            )?))
        } else {
            let service = Service::connect(&config, Arc::clone(&metrics))?;
            let batcher = Batcher::new(
                config.max_batch_records,
                config.max_batch_bytes,
                service.script_sha(),
            );
            Target::Single {
                service: Box::new(service),
                batcher,
            }
        };
        Ok(Self {
            target,
            metrics,
            mode: WriteMode::Checked,
        })
    }

    /// How the next writes guard their keys; [`WriteMode::Checked`] until set. On a cluster a
    /// plain batch is a pipeline of `SET`s per master (an `MSET` may not span slots).
    pub fn set_mode(&mut self, mode: WriteMode) {
        self.mode = mode;
        if let Target::Cluster(cluster) = &mut self.target {
            cluster.set_mode(mode);
        }
    }

    /// Whether this sink writes to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// Writes every record, in pipelined batches bounded by count and bytes, and returns only
    /// once Redis acknowledged all of them; retries failed batches with exponential backoff
    /// (reconnecting and re-loading the script when needed, e.g. after NOSCRIPT or a Redis
    /// restart).
    ///
    /// A record is stored unless Redis already holds the same user with a greater timestamp, or
    /// the same timestamp and a greater epoch; those count as `skipped_stale`. (In
    /// [`WriteMode::Plain`] every record is stored: the caller vouches that none is stale.) Records are
    /// expected to name distinct users (one final value per user and epoch); if a user appears
    /// twice, the greater (timestamp, epoch) wins whatever the order.
    ///
    /// A record whose key Redis refuses for good (it holds another type than a string) is not
    /// retried: it is left out, the rest is written, and it comes back in
    /// [`WriteStats::rejected`] with Redis's error.
    ///
    /// On error, some records may be stored and others not; see [`SinkError`].
    pub fn write<'r, S: AsRef<str> + 'r>(
        &mut self,
        records: impl IntoIterator<Item = ProfileRecord<'r, S>>,
    ) -> Result<WriteStats, SinkError> {
        if let Target::Cluster(cluster) = &mut self.target {
            let profiles = records
                .into_iter()
                .map(|record| EncodedProfile::encode(&record))
                .collect::<Result<Vec<_>, _>>()?;
            let mut stats = WriteStats::default();
            return cluster.write(profiles, &mut stats).map(|()| stats);
        }
        self.write_with(records, |batcher, record| batcher.push(&record))
    }

    /// [`write`](Self::write) for profiles encoded beforehand, e.g. on another thread: the
    /// same batching, retries and guarantees, without encoding here.
    pub fn write_encoded<'r>(
        &mut self,
        profiles: impl IntoIterator<Item = &'r EncodedProfile>,
    ) -> Result<WriteStats, SinkError> {
        if let Target::Cluster(cluster) = &mut self.target {
            let mut stats = WriteStats::default();
            return cluster
                .write(profiles.into_iter().cloned(), &mut stats)
                .map(|()| stats);
        }
        self.write_with(profiles, Batcher::push_encoded)
    }

    /// Pushes every record into the batcher with `push`, submitting each sealed batch; on
    /// error, drops the open batch so that the next write starts clean.
    fn write_with<T>(
        &mut self,
        records: impl IntoIterator<Item = T>,
        push: impl Fn(&mut Batcher, T) -> Result<Pushed, SinkError>,
    ) -> Result<WriteStats, SinkError> {
        let mut stats = WriteStats::default();
        let Target::Single { service, batcher } = &mut self.target else {
            unreachable!("cluster writes take their own path");
        };
        let result = Self::write_inner(
            service,
            batcher,
            self.mode,
            &self.metrics,
            records,
            push,
            &mut stats,
        );
        if result.is_err() {
            batcher.clear();
        }
        result.map(|()| stats)
    }

    fn write_inner<T>(
        service: &mut Service,
        batcher: &mut Batcher,
        mode: WriteMode,
        metrics: &SinkMetrics,
        records: impl IntoIterator<Item = T>,
        push: impl Fn(&mut Batcher, T) -> Result<Pushed, SinkError>,
        stats: &mut WriteStats,
    ) -> Result<(), SinkError> {
        if let Some(batch) = batcher.set_mode(mode) {
            service.submit(batch, stats)?;
        }
        for record in records {
            let pushed = push(batcher, record)?;
            if pushed.non_finite > 0 {
                SinkMetrics::add(&metrics.non_finite_floats, pushed.non_finite);
            }
            if let Some(batch) = pushed.sealed {
                service.submit(batch, stats)?;
            }
        }
        if let Some(batch) = batcher.seal() {
            service.submit(batch, stats)?;
        }
        service.flush(stats)
    }

    /// Cumulative counters of this sink.
    pub fn metrics(&self) -> &SinkMetrics {
        &self.metrics
    }

    /// The same counters, to read from another thread (e.g. a metrics exporter) while the
    /// worker writes.
    pub fn shared_metrics(&self) -> Arc<SinkMetrics> {
        Arc::clone(&self.metrics)
    }
}
