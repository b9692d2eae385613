//! Cumulative counters of a sink, readable from any thread while the worker writes.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Cumulative counters of one [`RedisSink`](crate::RedisSink) since it was created.
///
/// Plain relaxed atomics: each counter is exact, but a reader on another thread may see one
/// counter updated before another. Take a [`snapshot`](Self::snapshot) to print or export them
/// (it serializes to JSON for `--stats-json`, and snapshots of several workers add up with `+=`).
#[derive(Debug, Default)]
pub struct SinkMetrics {
    pub(crate) records_written: AtomicU64,
    pub(crate) records_skipped_stale: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) plain_batches: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) non_finite_floats: AtomicU64,
    pub(crate) records_rejected: AtomicU64,
    pub(crate) records_moved: AtomicU64,
}

/// The values of [`SinkMetrics`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SinkMetricsSnapshot {
    /// Records Redis stored.
    pub records_written: u64,
    /// Records the script did not store because Redis already held a newer profile
    /// (greater timestamp, or same timestamp and later epoch).
    pub records_skipped_stale: u64,
    /// Batches acknowledged (each counted once, however often it was retried).
    pub batches: u64,
    /// Of those, batches written plain (`MSET`, no check: see `WriteMode::Plain`).
    pub plain_batches: u64,
    /// Bytes of the acknowledged batches' commands (each batch counted once).
    pub bytes: u64,
    /// Attempts made again after a failure.
    pub retries: u64,
    /// Failed attempts: connection errors, timeouts and error replies.
    pub errors: u64,
    /// Connections opened (the first one included), each followed by a `SCRIPT LOAD`.
    pub connects: u64,
    /// Non-finite interest-vector components written as 0.0.
    pub non_finite_floats: u64,
    /// Records Redis refused for good and the sink set aside unwritten (their key holds
    /// another type than a string: see `WriteStats::rejected`).
    pub records_rejected: u64,
    /// Redis Cluster: records a node did not take because their key's slot had moved (a
    /// resharding) or the node kept failing (a failover, maybe), resent to the node that
    /// serves the slot now (each time counted).
    pub records_moved: u64,
}

macro_rules! getters {
    ($($name:ident),*) => {
        $(
            #[doc = concat!("Current value of `", stringify!($name), "` (see [`SinkMetricsSnapshot`]).")]
            pub fn $name(&self) -> u64 {
                self.$name.load(Ordering::Relaxed)
            }
        )*

        /// All counters at once.
        pub fn snapshot(&self) -> SinkMetricsSnapshot {
            SinkMetricsSnapshot { $($name: self.$name()),* }
        }
    };
}

impl SinkMetrics {
    getters!(
        records_written,
        records_skipped_stale,
        batches,
        plain_batches,
        bytes,
        retries,
        errors,
        connects,
        non_finite_floats,
        records_rejected,
        records_moved
    );

    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl std::ops::AddAssign for SinkMetricsSnapshot {
    fn add_assign(&mut self, o: Self) {
        self.records_written += o.records_written;
        self.records_skipped_stale += o.records_skipped_stale;
        self.batches += o.batches;
        self.plain_batches += o.plain_batches;
        self.bytes += o.bytes;
        self.retries += o.retries;
        self.errors += o.errors;
        self.connects += o.connects;
        self.non_finite_floats += o.non_finite_floats;
        self.records_rejected += o.records_rejected;
        self.records_moved += o.records_moved;
    }
}
