//! The connection to Redis: connecting, loading the script, sending batches through a bounded
//! pipeline, and retrying unacknowledged batches with exponential backoff.
//!
//! The connection is a plain sync `redis::Connection` with socket timeouts: the dataflow's
//! workers are OS threads without an async runtime, and a worker must block until its epoch is
//! stored anyway.
//!
//! Batches are sent with `send_packed_command` and their replies read with `recv_response`, so
//! the sink can encode batch n+1 while Redis executes batch n (`pipeline_depth`). Redis answers
//! in order, so the front of the window is always the batch the next reply belongs to.
//!
//! On any failure the connection is dropped and every unacknowledged batch is sent again on a
//! fresh one. That is simple and always correct: after a timeout or a broken pipe, replies may
//! still be in flight on the old socket and could be taken for replies to later batches; and
//! resending a batch that did reach Redis is harmless because the script never goes back in
//! time. A fresh connection also re-runs `SCRIPT LOAD`, which covers NOSCRIPT after a Redis
//! restart or `SCRIPT FLUSH`.
//!
//! Plain batches (`MSET`, see [`WriteMode`](crate::WriteMode)) are safe only in order, so a
//! failure turns every unacknowledged batch into its checked form before it is resent: a batch
//! that did reach Redis may have been followed by a later one, which a plain resend would undo.
//! The old connection is a second hazard: Redis may still hold commands it read from it and run
//! them after the new connection's. So the fresh connection first ends the old one with
//! `CLIENT KILL ID`, and until that has worked the sink writes nothing plain.
//!
//! With a [`WriterFence`](crate::WriterFence), each connection is named after its dataflow
//! run and checks, before any batch, that no newer run has taken over: a newer run ends the
//! older run's connections (`ReadMarks::take_over`), so an older run can write again only on a
//! new connection, and that one refuses with [`SinkError::Fenced`].
//!
//! The write-safety rules, as one state machine: docs/architecture.md#write-safety.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use profile::RateLimit;
use redis::{Client, Connection, RedisError, Script, Value};

use crate::batch::Batch;
use crate::cluster::Redirect;
use crate::encode::EncodedProfile;
use crate::error::is_permanent;
use crate::metrics::SinkMetrics;
use crate::{RejectedRecord, SinkConfig, SinkError, WriteStats};

/// The no-regression write script, executed once per batch.
pub(crate) const WRITE_SCRIPT: &str = include_str!("profile_write.lua");

/// The same script for a Redis Cluster node, allowed to touch keys of any slot the node serves
/// (Redis 7): a cluster batch holds many slots and declares none of them (see `cluster.rs`).
pub(crate) const CLUSTER_WRITE_SCRIPT: &str = concat!(
    "#!lua flags=allow-cross-slot-keys\n",
    include_str!("profile_write.lua")
);

pub(crate) struct Service {
    client: Client,
    /// `None` after a failure, until the next attempt connects again.
    conn: Option<Connection>,
    script: Script,
    /// Batches not yet acknowledged, oldest first.
    window: VecDeque<Batch>,
    /// How many of `window` were sent on the current connection (always a prefix).
    sent: usize,
    /// Redis's id of the current connection (`CLIENT ID`), if it told.
    client_id: Option<i64>,
    /// Whether an earlier connection may still run commands after the current one's: set by a
    /// failure, cleared once the fresh connection has killed the old one.
    old_connection_alive: bool,
    /// The id of the connection dropped by the last failure, to kill from the next one.
    dropped_client: Option<i64>,
    /// The run this sink writes for, if any.
    fence: Option<crate::WriterFence>,
    pipeline_depth: usize,
    io_timeout: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    max_retries: Option<u32>,
    metrics: Arc<SinkMetrics>,
    warnings: RateLimit,
    /// Rate limit of the warnings about refused records, apart from `warnings` so that retries
    /// and refusals each get their line.
    rejections: RateLimit,
    /// Cluster only: the client that reads the fence's generation from the node holding the
    /// read marks, which need not be this one; and its connection, made on first use.
    generation_reader: Option<redis::cluster::ClusterClient>,
    generation_conn: Option<redis::cluster::ClusterConnection>,
    /// Cluster only: records this node did not take because their key is served elsewhere
    /// now, each with the node Redis named, if it did (`MOVED`/`ASK`); the sink resends them.
    pub(crate) moved: Vec<(EncodedProfile, Option<Redirect>)>,
}

// redis::Connection is not Debug.
impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("addr", &self.addr())
            .field("connected", &self.conn.is_some())
            .field("unacknowledged_batches", &self.window.len())
            .finish_non_exhaustive()
    }
}

/// Why one attempt failed.
enum AttemptError {
    Redis(RedisError),
    UnexpectedReply(String),
    /// A newer run took over (see the module documentation).
    Fenced {
        ours: u64,
        current: u64,
    },
}

impl From<RedisError> for AttemptError {
    fn from(e: RedisError) -> Self {
        Self::Redis(e)
    }
}

impl Service {
    /// Opens the first connection and loads the script, without retrying.
    pub(crate) fn connect(
        config: &SinkConfig,
        metrics: Arc<SinkMetrics>,
    ) -> Result<Self, SinkError> {
        config.validate()?;
        let client =
            crate::config::redis_client(&config.redis_url, config.redis_ca_file.as_deref())?;
        Self::connect_client(config, client, Script::new(WRITE_SCRIPT), None, metrics)
    }

    /// Opens the first connection to one node of a Redis Cluster, with the cluster form of the
    /// script; `generation_reader` reaches the read marks' node for the fence.
    pub(crate) fn connect_node(
        config: &SinkConfig,
        client: Client,
        generation_reader: redis::cluster::ClusterClient,
        metrics: Arc<SinkMetrics>,
    ) -> Result<Self, SinkError> {
        config.validate()?;
        let script = Script::new(CLUSTER_WRITE_SCRIPT);
        Self::connect_client(config, client, script, Some(generation_reader), metrics)
    }

    fn connect_client(
        config: &SinkConfig,
        client: Client,
        script: Script,
        generation_reader: Option<redis::cluster::ClusterClient>,
        metrics: Arc<SinkMetrics>,
    ) -> Result<Self, SinkError> {
        let mut service = Self {
            client,
            conn: None,
            script,
            window: VecDeque::new(),
            sent: 0,
            client_id: None,
            old_connection_alive: false,
            dropped_client: None,
            fence: config.fence.clone(),
            pipeline_depth: config.pipeline_depth,
            io_timeout: config.io_timeout,
            initial_backoff: config.retry_initial_backoff,
            max_backoff: config.retry_max_backoff,
            max_retries: config.max_retries,
            metrics,
            warnings: RateLimit::per_second(),
            rejections: RateLimit::per_second(),
            generation_reader,
            generation_conn: None,
            moved: Vec::new(),
        };
        let conn = service.open().map_err(|error| match error {
            AttemptError::Fenced { ours, current } => SinkError::Fenced { ours, current },
            AttemptError::Redis(source) => SinkError::Connect {
                addr: service.addr(),
                source,
            },
            AttemptError::UnexpectedReply(reply) => SinkError::UnexpectedReply(reply),
        })?;
        service.conn = Some(conn);
        Ok(service)
    }

    /// Whether a plain batch sent now would reach Redis after everything sent before it; see
    /// the module documentation.
    pub(crate) fn plain_is_safe(&self) -> bool {
        !self.old_connection_alive
    }

    /// SHA1 of the script, which every batch names.
    pub(crate) fn script_sha(&self) -> &str {
        self.script.get_hash()
    }

    /// Host and port of the Redis server, for messages (the URL may hold a password).
    pub(crate) fn addr(&self) -> String {
        self.client.get_connection_info().addr().to_string()
    }

    /// A new connection with socket timeouts and the script loaded, named after its run and
    /// checked against a newer one (with a fence), which first ends the connection a failure
    /// dropped, if any.
    fn open(&mut self) -> Result<Connection, AttemptError> {
        let mut conn = self.open_loaded()?;
        if let Some(fence) = &self.fence {
            // Named first, so that a run taking over from now on finds it; a refused name
            // (an ACL without CLIENT) leaves it unnamed, and that run then writes nothing plain.
            let _: Result<(), _> = redis::cmd("CLIENT")
                .arg("SETNAME")
                .arg(fence.client_name())
                .query(&mut conn);
            let mut hget = redis::cmd("HGET");
            hget.arg(crate::read_marks::read_marks_key(&fence.topic))
                .arg(crate::read_marks::GENERATION_FIELD);
            // On a cluster the marks live on one node, read through a connection that follows
            // redirects. Named before read, as on one Redis: a take-over that raised the
            // generation after this read ends this connection, whichever node it is on.
            let current: Option<u64> = match &self.generation_reader {
                None => hget.query(&mut conn)?,
                Some(reader) => {
                    let reader_conn = match self.generation_conn.take() {
                        Some(reader_conn) => reader_conn,
                        None => reader.get_connection()?,
                    };
                    let reader_conn = self.generation_conn.insert(reader_conn);
                    let current = hget.query(reader_conn);
                    if current.is_err() {
                        self.generation_conn = None;
                    }
                    current?
                }
            };
            if let Some(current) = current.filter(|&current| current > fence.generation) {
                return Err(AttemptError::Fenced {
                    ours: fence.generation,
                    current,
                });
            }
        }
        // CLIENT is an admin command an ACL may refuse; without it, nothing is written plain
        // again, which costs speed, not correctness.
        self.client_id = redis::cmd("CLIENT").arg("ID").query(&mut conn).ok();
        if let Some(old) = self.dropped_client {
            // The reply counts the clients killed: 0 when Redis had already closed it (or
            // restarted), which is as good.
            let killed: Result<i64, _> = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(old)
                .query(&mut conn);
            if killed.is_ok() {
                self.dropped_client = None;
                self.old_connection_alive = false;
            }
        }
        Ok(conn)
    }

    fn open_loaded(&self) -> Result<Connection, RedisError> {
        let mut conn = self.client.get_connection_with_timeout(self.io_timeout)?;
        conn.set_read_timeout(Some(self.io_timeout))?;
        conn.set_write_timeout(Some(self.io_timeout))?;
        SinkMetrics::add(&self.metrics.connects, 1);
        let sha = self.script.load(&mut conn)?;
        if sha != self.script.get_hash() {
            // Redis computes the same SHA1 as the redis crate; anything else means the batches
            // would name a script that does not exist.
            return Err(RedisError::from((
                redis::ErrorKind::Client,
                "SCRIPT LOAD returned an unexpected SHA1",
                sha,
            )));
        }
        Ok(conn)
    }

    /// Queues a sealed batch and sends it, then waits until fewer than `pipeline_depth` batches
    /// are unacknowledged.
    pub(crate) fn submit(
        &mut self,
        mut batch: Batch,
        stats: &mut WriteStats,
    ) -> Result<(), SinkError> {
        if !self.plain_is_safe() {
            batch.make_checked(self.script.get_hash());
        }
        self.window.push_back(batch);
        self.settle(self.pipeline_depth - 1, stats)
    }

    /// Returns once Redis acknowledged every queued batch.
    pub(crate) fn flush(&mut self, stats: &mut WriteStats) -> Result<(), SinkError> {
        self.settle(0, stats)
    }

    /// Sends what is unsent and reads replies until at most `max_unacked` batches are
    /// unacknowledged, retrying failures with backoff.
    fn settle(&mut self, max_unacked: usize, stats: &mut WriteStats) -> Result<(), SinkError> {
        // Consecutive failures without any batch acknowledged in between: progress resets the
        // backoff and the max_retries budget, so a flapping Redis slows the sink down but does
        // not make it give up while batches still get through.
        let mut failures: u32 = 0;
        loop {
            let acked_before = stats.batches;
            let err = match self.attempt(max_unacked, stats) {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(
                            redis = %self.addr(),
                            failed_attempts = failures,
                            "Redis writes go through again"
                        );
                    }
                    return Ok(());
                }
                Err(err) => err,
            };
            if stats.batches > acked_before {
                failures = 0;
            }
            self.drop_connection();
            SinkMetrics::add(&self.metrics.errors, 1);
            let err = match err {
                AttemptError::Redis(e) if !is_permanent(&e) => e,
                AttemptError::Redis(e) => {
                    self.abandon();
                    return Err(SinkError::Permanent(e));
                }
                AttemptError::UnexpectedReply(reply) => {
                    self.abandon();
                    return Err(SinkError::UnexpectedReply(reply));
                }
                AttemptError::Fenced { ours, current } => {
                    self.abandon();
                    return Err(SinkError::Fenced { ours, current });
                }
            };
            if self.max_retries.is_some_and(|max| failures >= max) {
                let pending_batches = self.window.len();
                let pending_records = self.window.iter().map(|b| b.records).sum();
                // A cluster node's records go back to the sink, to be sent wherever a fresh
                // slot map says (its master may have failed over to another address).
                if self.generation_reader.is_some() {
                    SinkMetrics::add(&self.metrics.records_moved, pending_records);
                    for batch in &mut self.window {
                        self.moved
                            .extend(batch.profiles.drain(..).map(|profile| (profile, None)));
                    }
                }
                self.abandon();
                return Err(SinkError::RetriesExhausted {
                    retries: failures,
                    pending_batches,
                    pending_records,
                    last_error: err,
                });
            }
            failures += 1;
            let backoff = self.backoff(failures);
            stats.retries += 1;
            SinkMetrics::add(&self.metrics.retries, 1);
            if let Some(suppressed) = self.warnings.allow() {
                tracing::warn!(
                    redis = %self.addr(),
                    error = %err,
                    kind = err.code().unwrap_or_else(|| err.category()),
                    attempt = failures,
                    backoff_ms = backoff.as_millis() as u64,
                    unacknowledged_batches = self.window.len(),
                    suppressed_warnings = suppressed,
                    "Redis write failed, retrying"
                );
            }
            std::thread::sleep(backoff);
        }
    }

    /// Forgets the current connection after a failure. Its batches will be resent checked,
    /// and nothing goes plain until the connection is known to be gone.
    fn drop_connection(&mut self) {
        if self.conn.take().is_some() {
            self.old_connection_alive = true;
            // Without an id there is nothing to kill, and plain writes stay off.
            if let Some(id) = self.client_id.take() {
                self.dropped_client = Some(id);
            }
        }
        self.sent = 0;
        let sha = self.script.get_hash().to_owned();
        for batch in &mut self.window {
            batch.make_checked(&sha);
        }
    }

    /// One try on the current connection (opening one if there is none).
    fn attempt(&mut self, max_unacked: usize, stats: &mut WriteStats) -> Result<(), AttemptError> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.open()?,
        };
        let conn = self.conn.insert(conn);
        while let Some(batch) = self.window.get(self.sent) {
            conn.send_packed_command(&batch.packed)?;
            self.sent += 1;
        }
        while self.window.len() > max_unacked {
            let Some(batch) = self.window.front() else {
                break;
            };
            if batch.asking {
                match conn.recv_response()?.extract_error()? {
                    Value::Okay => {}
                    other => return Err(AttemptError::UnexpectedReply(format!("{other:?}"))),
                }
            }
            let reply = conn.recv_response()?;
            // A record whose key the command declared and whose slot is served elsewhere:
            // acknowledged here, resent by the sink to the node Redis named.
            if let (true, Value::ServerError(error)) = (batch.declared, &reply) {
                if let Some(redirect) = Redirect::parse(error.code(), error.details()) {
                    SinkMetrics::add(&self.metrics.records_moved, batch.records);
                    let mut batch = self.window.pop_front().expect("the front batch");
                    self.sent -= 1;
                    for profile in batch.profiles.drain(..) {
                        self.moved.push((profile, Some(redirect.clone())));
                    }
                    continue;
                }
            }
            let before = self.moved.len();
            // A cluster's plain batch: one reply a SET, OK or a redirect of a key that left.
            let (skipped, mut rejected) = if batch.is_plain() && batch.cluster {
                let mut reply = Some(reply);
                for profile in &batch.profiles {
                    let reply = match reply.take() {
                        Some(first) => first,
                        None => conn.recv_response()?,
                    };
                    match reply {
                        Value::Okay => {}
                        Value::ServerError(error) => {
                            match Redirect::parse(error.code(), error.details()) {
                                Some(redirect) => {
                                    self.moved.push((profile.clone(), Some(redirect)))
                                }
                                // Resent checked on a fresh connection, as any failure.
                                None => Value::ServerError(error).extract_error().map(drop)?,
                            }
                        }
                        other => return Err(AttemptError::UnexpectedReply(format!("{other:?}"))),
                    }
                }
                (0, Vec::new())
            } else {
                // An error reply becomes an Err here, and so does the whole attempt.
                let reply = reply.extract_error()?;
                match reply {
                    Value::Okay if batch.is_plain() => (0, Vec::new()),
                    Value::Int(n)
                        if !batch.is_plain() && (0..=batch.records as i64).contains(&n) =>
                    {
                        (n as usize, Vec::new())
                    }
                    Value::Array(items) if !batch.is_plain() => {
                        parse_rejections(items, batch.records)
                            .map_err(AttemptError::UnexpectedReply)?
                    }
                    other => return Err(AttemptError::UnexpectedReply(format!("{other:?}"))),
                }
            };
            // Keys a cluster node does not serve (any more): not refused, resent elsewhere.
            rejected.retain(|record| {
                if !record.error.contains("non local key") {
                    return true;
                }
                let found = batch.profiles.iter().find(|profile| {
                    profile.key_kind() == record.kind && profile.user_id() == record.user_id
                });
                match found {
                    Some(profile) => {
                        self.moved.push((profile.clone(), None));
                        false
                    }
                    None => true,
                }
            });
            let moved = self.moved.len() - before;
            SinkMetrics::add(&self.metrics.records_moved, moved);
            let written = batch.records - skipped - rejected.len() - moved;
            let bytes = batch.packed.len();
            stats.written += written;
            stats.skipped_stale += skipped;
            stats.batches += 1;
            stats.bytes += bytes;
            SinkMetrics::add(&self.metrics.records_written, written);
            SinkMetrics::add(&self.metrics.records_skipped_stale, skipped);
            SinkMetrics::add(&self.metrics.batches, 1);
            if batch.is_plain() {
                stats.written_plain += written;
                SinkMetrics::add(&self.metrics.plain_batches, 1);
            }
            SinkMetrics::add(&self.metrics.bytes, bytes);
            if !rejected.is_empty() {
                SinkMetrics::add(&self.metrics.records_rejected, rejected.len());
                for record in &rejected {
                    // One line a second at most, whatever the number of refused keys: a
                    // foreign program's keys can make every epoch refuse some.
                    if let Some(suppressed) = self.rejections.allow() {
                        tracing::warn!(
                            user_id = %record.user_id,
                            error = %record.error,
                            rejected_since_last_warning = suppressed,
                            "Redis refused a profile for good; set aside"
                        );
                    }
                }
                stats.rejected.extend(rejected);
            }
            self.window.pop_front();
            self.sent -= 1;
        }
        Ok(())
    }

    /// Forgets unacknowledged batches after giving up, so that the next write starts clean.
    fn abandon(&mut self) {
        self.window.clear();
        self.sent = 0;
    }

    fn backoff(&self, failures: u32) -> Duration {
        backoff(self.initial_backoff, self.max_backoff, failures)
    }
}

/// The script's reply to a batch with refused keys, `[skipped, key1, error1, key2, error2,
/// ...]` (see `profile_write.lua`): the skip count and the refused records, or a description of
/// a reply that does not fit a batch of `records` records.
fn parse_rejections(
    items: Vec<Value>,
    records: usize,
) -> Result<(usize, Vec<RejectedRecord>), String> {
    let describe = |items: &[Value]| format!("{items:?}");
    let (Some(Value::Int(skipped)), true) = (items.first(), items.len() % 2 == 1) else {
        return Err(describe(&items));
    };
    let skipped = *skipped;
    let mut rejected = Vec::with_capacity(items.len() / 2);
    for pair in items[1..].chunks_exact(2) {
        let [Value::BulkString(key), Value::BulkString(error)] = pair else {
            return Err(describe(&items));
        };
        let key = String::from_utf8_lossy(key);
        let Some((kind, user_id)) = crate::KeyKind::of_key(&key) else {
            return Err(describe(&items));
        };
        rejected.push(RejectedRecord {
            user_id: user_id.to_owned(),
            kind,
            error: String::from_utf8_lossy(error).into_owned(),
        });
    }
    match usize::try_from(skipped) {
        Ok(skipped) if !rejected.is_empty() && skipped + rejected.len() <= records => {
            Ok((skipped, rejected))
        }
        _ => Err(describe(&items)),
    }
}

/// `initial * 2^(failures-1)`, capped at `max`.
pub(crate) fn backoff(initial: Duration, max: Duration, failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1));
    initial.checked_mul(factor).map_or(max, |d| d.min(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let ms = Duration::from_millis;
        let got: Vec<Duration> = [1, 2, 3, 4, 8, 40, u32::MAX]
            .into_iter()
            .map(|n| backoff(ms(50), ms(5000), n))
            .collect();
        assert_eq!(
            got,
            [
                ms(50),
                ms(100),
                ms(200),
                ms(400),
                ms(5000),
                ms(5000),
                ms(5000)
            ]
        );
    }

    #[test]
    fn rejections_reply_is_checked_against_the_batch() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let reply = vec![
            Value::Int(1),
            bulk("user_profile:u1"),
            bulk("WRONGTYPE Operation against a key holding the wrong kind of value"),
        ];
        let (skipped, rejected) = parse_rejections(reply.clone(), 2).unwrap();
        assert_eq!(skipped, 1);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].user_id, "u1");
        assert_eq!(rejected[0].code(), "WRONGTYPE");
        // More skipped and refused records than the batch holds, a missing error, a key
        // outside the profile prefix, no refused record at all.
        assert!(parse_rejections(reply.clone(), 1).is_err());
        assert!(parse_rejections(reply[..2].to_vec(), 2).is_err());
        assert!(parse_rejections(vec![Value::Int(0), bulk("other:u1"), bulk("E")], 2).is_err());
        assert!(parse_rejections(vec![Value::Int(0)], 2).is_err());
    }
}
