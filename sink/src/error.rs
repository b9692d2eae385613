//! Errors of the sink, and which Redis failures are worth retrying.

use redis::{ErrorKind, RedisError, ServerErrorKind};

/// Why a [`RedisSink`](crate::RedisSink) could not be created or could not write.
///
/// After a failed `write` some of its records may be stored and others not. The caller must
/// not commit its input offsets and should replay: the script makes a replay harmless.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A setting is unusable (see [`SinkConfig::validate`](crate::SinkConfig::validate)), or
    /// the Redis URL does not parse.
    #[error("invalid sink configuration: {0}")]
    Config(String),

    /// The first connection (or its `SCRIPT LOAD`) failed. `connect` does not retry, so that a
    /// wrong URL shows up at start instead of as an endless retry loop.
    #[error("cannot connect to Redis at {addr}: {source}{hint}", hint = hint(source))]
    Connect {
        /// Host and port (no password).
        addr: String,
        /// What Redis or the network said.
        #[source]
        source: RedisError,
    },

    /// A record violates the contract the Lua comparison relies on (timestamp or epoch above
    /// 2^53, where a double no longer holds every integer). The dataflow guarantees this never
    /// happens; the records before it in the same write may be stored.
    #[error("record of user {user_id:?} cannot be written: {reason}")]
    InvalidRecord {
        /// The offending user.
        user_id: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Redis refused a batch for a reason that waiting cannot fix (wrong key type, missing
    /// permission, authentication, a failing script), so the sink does not retry it.
    #[error("Redis refused the write permanently: {0}{hint}", hint = hint(.0))]
    Permanent(#[source] RedisError),

    /// A newer run of the dataflow took over this topic's profiles (see
    /// `ReadMarks::take_over`): this sink must not write any more, and its run should stop.
    #[error(
        "a newer dataflow run (generation {current}) took over writing this topic's profiles \
         from this one (generation {ours})"
    )]
    Fenced {
        /// This sink's generation.
        ours: u64,
        /// The generation that took over.
        current: u64,
    },

    /// Reading or raising the read marks failed (see `ReadMarks`); the caller retries.
    #[error("Redis read marks: {0}{hint}", hint = hint(.0))]
    ReadMarks(#[source] RedisError),

    /// Redis answered a batch with something other than its expected reply (a skip count for
    /// the script, OK for a plain batch).
    #[error("unexpected reply to a write batch: {0}")]
    UnexpectedReply(String),

    /// `max_retries` consecutive attempts failed.
    #[error(
        "gave up after {retries} retries; {pending_batches} batches ({pending_records} records) \
         not acknowledged; last error: {last_error}"
    )]
    RetriesExhausted {
        /// Retries made after the first failure.
        retries: u32,
        /// Batches sent or ready to send that Redis did not acknowledge.
        pending_batches: usize,
        /// Records in those batches.
        pending_records: usize,
        /// The error of the last attempt.
        #[source]
        last_error: RedisError,
    },
}

/// What to look at, for the two failures whose fix is a setting: a missing ACL permission and
/// a server certificate no trusted CA signed.
fn hint(err: &RedisError) -> &'static str {
    // Inside a script Redis reports a refused command as a script error, and the redis crate
    // wraps a refused SELECT in a connection error: both only say so in words.
    let message = err.to_string();
    if err.kind() == ErrorKind::Server(ServerErrorKind::NoPerm)
        || message.contains("can't run this command")
        || message.contains("no permissions to run")
    {
        " (the Redis user lacks an ACL permission: the README's Redis ACL section lists what \
         the dataflow needs)"
    } else if message.contains("invalid peer certificate") {
        " (the server's TLS certificate does not chain to a trusted CA: name its CA with \
         --redis-ca-file or REDIS_CA_FILE)"
    } else {
        ""
    }
}

/// Whether a failed attempt is worth repeating.
///
/// Connection errors, timeouts and protocol errors retry on a new connection. Error replies
/// retry too (LOADING, BUSY, OOM, MISCONF, READONLY during a failover, TRYAGAIN, NOSCRIPT after a
/// restart or `SCRIPT FLUSH`, "max number of clients reached" ...): they describe a state of the
/// server that passes or that an operator fixes, and with `max_retries: None` nothing is dropped
/// meanwhile. The exceptions are failures that repeat identically however long we wait.
///
/// Of those, only WRONGTYPE belongs to one record rather than to the whole write: it says that
/// one key holds another type, and the write script catches it per key (`redis.pcall`) and
/// reports the record as rejected (`WriteStats::rejected`) while the rest of its batch is
/// written, so it normally never reaches this function. The others (no permission, bad
/// credentials, a bug in the script, a client misconfiguration) would refuse every record alike:
/// setting all of them aside would silently drop a whole stream, so they fail the write with
/// [`SinkError::Permanent`] and an operator fixes the cause.
pub(crate) fn is_permanent(err: &RedisError) -> bool {
    match err.kind() {
        // A bad URL or client-side misuse.
        ErrorKind::InvalidClientConfig | ErrorKind::Client => true,
        // Credentials are only read from the URL at start.
        ErrorKind::AuthenticationFailed => true,
        ErrorKind::Server(ServerErrorKind::NoPerm) => true,
        ErrorKind::Server(ServerErrorKind::ResponseError) => {
            // A Lua runtime error in our own script ("ERR user_script:12: ..." on Redis 7,
            // "ERR Error running script ..." on 6) is a bug that no retry fixes.
            err.detail()
                .is_some_and(|d| d.contains("user_script") || d.starts_with("Error running script"))
        }
        _ => matches!(
            err.code(),
            // A key under user_profile: that is not a string: someone else's data, not ours to
            // clobber.
            Some("WRONGTYPE" | "NOAUTH" | "WRONGPASS")
        ),
    }
}
