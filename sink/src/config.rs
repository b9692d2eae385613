//! Settings of the Redis sink, with the defaults the dataflow uses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::{Client, TlsCertificates};

use crate::SinkError;

/// Default Redis URL (semantics §7, `REDIS_URL`).
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";

/// Settings of a [`RedisSink`](crate::RedisSink).
///
/// `SinkConfig::default()` holds the defaults; `SinkConfig::new(url)` the defaults with another
/// Redis URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    /// Redis to write to, as a `redis://[user:password@]host:port/db` URL, or `rediss://...`
    /// for TLS (default `redis://127.0.0.1:6379/0`).
    pub redis_url: String,
    /// PEM file of the CA certificates that a `rediss://` server's certificate must chain to,
    /// trusted instead of the system's store (default none: the system store). Read when the
    /// sink connects.
    pub redis_ca_file: Option<PathBuf>,
    /// Whether `redis_url` names a Redis Cluster (default false): then it is a comma-separated
    /// list of seed nodes, `redis://` URLs or `host:port` entries that take the first URL's
    /// scheme and credentials, e.g. `redis://:pw@10.0.0.1:7000,10.0.0.2:7000`. Needs Redis 7.
    pub redis_cluster: bool,
    /// Most records in one batch, i.e. in one execution of the write script (default 512).
    /// A script execution blocks Redis for its whole duration, so this also bounds the latency
    /// other clients see while a batch runs.
    pub max_batch_records: usize,
    /// Most bytes in one batch (default 1 MiB), counted as the size of the command on the wire:
    /// keys, values, timestamps and epochs with their RESP framing. A batch closes before a
    /// record that would pass the limit; a single record larger than the limit goes alone.
    pub max_batch_bytes: usize,
    /// Most batches sent to Redis and not yet acknowledged (default 2). With 1 the sink waits for
    /// each batch's reply before encoding the next; with 2 it encodes batch n+1 while Redis
    /// executes batch n, which is what pays on a sync connection (see the throughput example).
    pub pipeline_depth: usize,
    /// Wait before the first retry of a failed batch (default 50 ms); it doubles on each further
    /// consecutive failure.
    pub retry_initial_backoff: Duration,
    /// Longest wait between two retries (default 5 s).
    pub retry_max_backoff: Duration,
    /// Consecutive failed attempts tolerated before a write gives up with
    /// [`SinkError::RetriesExhausted`]; the count restarts whenever a batch is acknowledged.
    /// `None` (the default) retries until Redis is back, so nothing is ever dropped.
    pub max_retries: Option<u32>,
    /// Timeout of connecting, and of every socket read and write (default 5 s). A timed-out
    /// connection is dropped and replaced, because replies still in flight on it could no longer
    /// be matched to their batches.
    pub io_timeout: Duration,
    /// Which dataflow run this sink writes for (default none): each connection is named after
    /// it, so that a newer run can end it, and refuses to write once a newer run has taken
    /// over (see [`ReadMarks::take_over`](crate::ReadMarks::take_over)).
    pub fence: Option<WriterFence>,
}

/// A dataflow run's claim to write the profiles of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterFence {
    /// The profile topic.
    pub topic: String,
    /// The run's generation, from [`ReadMarks::take_over`](crate::ReadMarks::take_over).
    pub generation: u64,
}

impl WriterFence {
    /// The name of this run's writer connections (`CLIENT SETNAME`).
    pub fn client_name(&self) -> String {
        format!(
            "{}{}",
            crate::read_marks::writer_name_prefix(&self.topic),
            self.generation
        )
    }
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            redis_url: DEFAULT_REDIS_URL.to_owned(),
            redis_ca_file: None,
            redis_cluster: false,
            max_batch_records: 512,
            max_batch_bytes: 1024 * 1024,
            pipeline_depth: 2,
            retry_initial_backoff: Duration::from_millis(50),
            retry_max_backoff: Duration::from_secs(5),
            max_retries: None,
            io_timeout: Duration::from_secs(5),
            fence: None,
        }
    }
}

impl SinkConfig {
    /// The defaults, writing to `redis_url`.
    pub fn new(redis_url: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            ..Self::default()
        }
    }

    /// Rejects settings that would make the sink spin or never send anything.
    pub fn validate(&self) -> Result<(), SinkError> {
        let fail = |what: &str| Err(SinkError::Config(what.to_owned()));
        if self.max_batch_records == 0 {
            return fail("max_batch_records must be at least 1");
        }
        if self.max_batch_bytes == 0 {
            return fail("max_batch_bytes must be at least 1");
        }
        if self.pipeline_depth == 0 {
            return fail("pipeline_depth must be at least 1");
        }
        if self.retry_initial_backoff.is_zero() {
            return fail("retry_initial_backoff must be positive");
        }
        if self.retry_max_backoff < self.retry_initial_backoff {
            return fail("retry_max_backoff must not be shorter than retry_initial_backoff");
        }
        // The redis crate rejects a zero socket timeout, and "no timeout" would let a dead
        // peer block a dataflow worker forever.
        if self.io_timeout.is_zero() {
            return fail("io_timeout must be positive");
        }
        Ok(())
    }
}

/// A Redis client for `url` (`redis://` or `rediss://`). With `ca_file`, a TLS connection trusts
/// the CA certificates in that PEM file instead of the system's store; `ca_file` needs a
/// `rediss://` URL.
///
/// Only builds the client: nothing is sent until a connection is made.
pub fn redis_client(url: &str, ca_file: Option<&Path>) -> Result<Client, SinkError> {
    // The redis crate's URL errors do not repeat the URL, which may hold a password.
    let Some(ca_file) = ca_file else {
        return Client::open(url).map_err(|e| SinkError::Config(format!("redis_url: {e}")));
    };
    let ca = std::fs::read(ca_file)
        .map_err(|e| SinkError::Config(format!("Redis CA file {}: {e}", ca_file.display())))?;
    let certificates = TlsCertificates {
        client_tls: None,
        root_cert: Some(ca),
    };
    Client::build_with_tls(url, certificates).map_err(|e| {
        SinkError::Config(format!("Redis with the CA file {}: {e}", ca_file.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documentation() {
        let c = SinkConfig::default();
        assert_eq!(c.redis_url, "redis://127.0.0.1:6379/0");
        assert_eq!(c.max_batch_records, 512);
        assert_eq!(c.max_batch_bytes, 1 << 20);
        assert_eq!(c.retry_initial_backoff, Duration::from_millis(50));
        assert_eq!(c.retry_max_backoff, Duration::from_secs(5));
        assert_eq!(c.max_retries, None);
        assert_eq!(c.io_timeout, Duration::from_secs(5));
        assert_eq!(c.redis_ca_file, None);
        c.validate().unwrap();
    }

    #[test]
    fn a_ca_file_must_exist_parse_and_go_with_rediss() {
        let missing = Path::new("/nonexistent/streamrec-ca.pem");
        let err = redis_client("rediss://127.0.0.1:6380/0", Some(missing)).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/streamrec-ca.pem"),
            "{err}"
        );

        let dir = std::env::temp_dir().join(format!("sink-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = redis_client("rediss://127.0.0.1:6380/0", Some(&garbage)).unwrap_err();
        assert!(matches!(err, SinkError::Config(_)), "{err}");

        // A CA file says TLS; a plain URL with one is a mistake, not something to ignore.
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = redis_client("redis://127.0.0.1:6379/0", Some(&empty)).unwrap_err();
        assert!(err.to_string().contains("rediss://"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();

        redis_client("rediss://127.0.0.1:6380/0", None).unwrap();
    }

    #[test]
    fn rejects_settings_that_cannot_work() {
        let bad = [
            SinkConfig {
                max_batch_records: 0,
                ..SinkConfig::default()
            },
            SinkConfig {
                max_batch_bytes: 0,
                ..SinkConfig::default()
            },
            SinkConfig {
                pipeline_depth: 0,
                ..SinkConfig::default()
            },
            SinkConfig {
                io_timeout: Duration::ZERO,
                ..SinkConfig::default()
            },
            SinkConfig {
                retry_initial_backoff: Duration::ZERO,
                ..SinkConfig::default()
            },
            SinkConfig {
                retry_max_backoff: Duration::from_millis(1),
                ..SinkConfig::default()
            },
        ];
        for c in bad {
            assert!(matches!(c.validate(), Err(SinkError::Config(_))), "{c:?}");
        }
    }
}
