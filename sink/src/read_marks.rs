//! Read marks: for each partition of the profile topic, an offset that no run of the dataflow
//! has read past into Redis. They live in Redis beside the values they vouch for, in one hash per
//! topic, `streamrec:read_marks:{topic}` (field: the partition in decimal; value: the offset).
//!
//! Why: plain writes ([`WriteMode::Plain`](crate::WriteMode)) are safe only once no value
//! newer than the one being written can be in Redis. A previous run of the dataflow may have
//! written values from messages past its committed offsets before it stopped, and a restarted
//! run reads those messages again. If every run raises a partition's mark before it hands the
//! dataflow a message at or past it, then a run that has read every partition up to the mark it
//! found at start (or up to the end the partition had then, if lower) holds every message any
//! earlier run wrote from, and from then on its own values are never older than what Redis has.
//!
//! The marks vouch only for values the dataflow wrote. The first [`ReadMarks::load`] on a
//! database therefore records, in the field `origin` and atomically with creating the hash,
//! whether the database held anything before:
//! - `fresh`: it was empty, so a partition without a mark has never been read into Redis;
//! - `unknown`: it held keys, e.g. values of the system streamrec replaces, whose timestamps
//!   need not come from any message of the topic. No amount of reading proves them older than
//!   what comes next, so on such a database every write stays checked.
//!
//! A run rebuilds its state by reading the topic from its beginning, so its state holds every
//! message an earlier run wrote from only if none of them was deleted since (retention,
//! compaction). The first load of a partition that no run has read into Redis yet records its
//! *floor*, the first offset it then had (field `floor:{partition}`); a later run whose
//! partition starts past that floor knows that messages an earlier run may have read are gone,
//! and writes checked.
//!
//! One run at a time: plain writes are safe only if no older run still writes, whose values
//! (from messages this run has not read yet) could be newer than this run's. So every run
//! takes over at start ([`ReadMarks::take_over`]) before it reads the marks: it raises the
//! hash's `generation`, and ends every writer connection of an older generation (each is named
//! `streamrec-writer:{topic}:{generation}`, see [`WriterFence`](crate::WriterFence)). An
//! older run can then only write on a new connection, which sees the newer generation and
//! refuses ([`SinkError::Fenced`]): its dataflow stops. A run that cannot end connections (an
//! ACL without CLIENT) writes nothing plain.
//!
//! Emptying the database (FLUSHDB) removes the marks with the values, which is consistent.
//!
//! On a Redis Cluster the hash is one key on one node, reached through the redis crate's cluster
//! connection (which follows MOVED/ASK); the origin counts the keys of every master, and a
//! take-over ends older writers on every master.
//!
//! The write-safety rules, as one state machine: docs/architecture.md#write-safety.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use redis::{Client, Connection, ConnectionLike, RedisError, Script};

use crate::cluster::ClusterTarget;
use crate::{SinkConfig, SinkError};

/// Prefix of the read marks' hash; the topic name follows it.
pub const READ_MARKS_KEY_PREFIX: &str = "streamrec:read_marks:";

/// The hash's field that counts the runs that took over.
pub(crate) const GENERATION_FIELD: &str = "generation";

/// Prefix of a writer connection's name; `{topic}:{generation}` follows it.
const WRITER_NAME_PREFIX: &str = "streamrec-writer:";

/// The read marks' hash of `topic`.
pub(crate) fn read_marks_key(topic: &str) -> String {
    format!("{READ_MARKS_KEY_PREFIX}{topic}")
}

/// The start of the name of every writer connection of `topic`; its generation follows.
pub(crate) fn writer_name_prefix(topic: &str) -> String {
    format!("{WRITER_NAME_PREFIX}{topic}:")
}

/// What [`ReadMarks::take_over`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TakeOver {
    /// This run's generation, for its sinks' [`WriterFence`](crate::WriterFence).
    pub generation: u64,
    /// Whether every older run's writer connection was ended, so that this run may write
    /// plain; false when Redis refused CLIENT LIST or CLIENT KILL.
    pub exclusive: bool,
    /// How many older writer connections were ended.
    pub ended: usize,
}

/// Creates the hash on first use, recording whether the database held anything before (ARGV[1]
/// counts the keys of the other nodes of a cluster, 0 on one Redis); records the floor of each
/// partition in the rest of ARGV, (partition, first offset) pairs, that has neither a mark nor
/// a floor yet; and returns all of the hash. One script, so that workers starting together
/// agree on the origin. (On a cluster, a worker counts the other nodes' keys before its script
/// runs; if another worker's script created the hash meanwhile, this one finds it and counts
/// nothing, and no worker writes a profile before its own script has run.)
const LOAD_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
    local origin = 'fresh'
    if redis.call('DBSIZE') > 0 or tonumber(ARGV[1]) > 0 then
        origin = 'unknown'
    end
    redis.call('HSET', KEYS[1], 'origin', origin)
end
for i = 2, #ARGV, 2 do
    local floor = 'floor:' .. ARGV[i]
    if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 and redis.call('HEXISTS', KEYS[1], floor) == 0 then
        redis.call('HSET', KEYS[1], floor, ARGV[i + 1])
    end
end
return redis.call('HGETALL', KEYS[1])
"#;

/// Raises marks, never lowers them: ARGV holds (partition, offset) pairs.
const ADVANCE_SCRIPT: &str = r#"
for i = 1, #ARGV, 2 do
    local old = tonumber(redis.call('HGET', KEYS[1], ARGV[i]))
    if not old or tonumber(ARGV[i + 1]) > old then
        redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
end
return 0
"#;

/// The marks of one topic as found in Redis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredMarks {
    /// Whether the database held other keys when the marks were created: values no mark
    /// vouches for, so that no write to it may go plain.
    pub unknown_origin: bool,
    /// Partition → offset no run has read past into Redis.
    pub marks: BTreeMap<i32, i64>,
    /// Partition → its first offset when it was first loaded, before any run read it.
    pub floors: BTreeMap<i32, i64>,
}

impl StoredMarks {
    /// How far `partition` must be read before no value an earlier run wrote can be newer
    /// than what was read: its mark (0 without one). The reader may stop earlier at the
    /// partition's end, since nothing past it was there to read. Meaningless for a database of
    /// unknown origin, where nothing goes plain.
    pub fn catch_up_target(&self, partition: i32) -> i64 {
        self.marks.get(&partition).copied().unwrap_or(0)
    }

    /// Whether every message of `partition` that a run may have read into Redis is still
    /// there, with `first` the partition's first offset now: its floor is at or past `first`.
    /// Without a floor (a mark written before floors existed) nothing says, so no.
    pub fn nothing_deleted(&self, partition: i32, first: i64) -> bool {
        self.floors
            .get(&partition)
            .is_some_and(|&floor| first <= floor)
    }
}

/// A connection to the read marks of one topic.
pub struct ReadMarks {
    opener: Opener,
    conn: Option<MarksConnection>,
    key: String,
    topic: String,
    io_timeout: Duration,
    load: Script,
    advance: Script,
}

impl std::fmt::Debug for ReadMarks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadMarks")
            .field("key", &self.key)
            .field("connected", &self.conn.is_some())
            .finish_non_exhaustive()
    }
}

/// How [`ReadMarks`] reaches Redis.
enum Opener {
    Single(Client),
    Cluster {
        target: ClusterTarget,
        client: Box<redis::cluster::ClusterClient>,
    },
}

enum MarksConnection {
    Single(Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl MarksConnection {
    fn as_dyn(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Self::Single(conn) => conn,
            Self::Cluster(conn) => conn.as_mut(),
        }
    }
}

impl ReadMarks {
    /// Connects to the Redis at `redis_url` (the sink's), for the marks of `topic`. Does not
    /// retry, like [`RedisSink::connect`](crate::RedisSink::connect).
    pub fn connect(redis_url: &str, topic: &str, io_timeout: Duration) -> Result<Self, SinkError> {
        Self::connect_with_ca_file(redis_url, None, topic, io_timeout)
    }

    /// [`connect`](Self::connect) trusting the CA certificates in `ca_file` for a `rediss://`
    /// URL, as [`SinkConfig::redis_ca_file`](crate::SinkConfig::redis_ca_file) does.
    pub fn connect_with_ca_file(
        redis_url: &str,
        ca_file: Option<&Path>,
        topic: &str,
        io_timeout: Duration,
    ) -> Result<Self, SinkError> {
        let client = crate::config::redis_client(redis_url, ca_file)?;
        Self::open_first(Opener::Single(client), topic, io_timeout)
    }

    /// Connects to the Redis (or Redis Cluster) a sink with `config` writes to: its URL, CA
    /// file, cluster flag and I/O timeout.
    pub fn connect_for(config: &SinkConfig, topic: &str) -> Result<Self, SinkError> {
        if !config.redis_cluster {
            return Self::connect_with_ca_file(
                &config.redis_url,
                config.redis_ca_file.as_deref(),
                topic,
                config.io_timeout,
            );
        }
        let target = ClusterTarget::parse(&config.redis_url, config.redis_ca_file.as_deref())?;
        let client = target.cluster_client(config.io_timeout)?;
        let mut marks = Self::open_first(
            Opener::Cluster {
                target,
                client: Box::new(client),
            },
            topic,
            config.io_timeout,
        )?;
        // Every master must be reachable, not just a seed: a run that could not write some
        // slots must fail here, before its take-over changes anything.
        marks.masters()?;
        Ok(marks)
    }

    fn open_first(opener: Opener, topic: &str, io_timeout: Duration) -> Result<Self, SinkError> {
        let mut marks = Self {
            opener,
            conn: None,
            key: read_marks_key(topic),
            topic: topic.to_owned(),
            io_timeout,
            load: Script::new(LOAD_SCRIPT),
            advance: Script::new(ADVANCE_SCRIPT),
        };
        let conn = marks.open().map_err(|source| SinkError::Connect {
            addr: marks.addr(),
            source,
        })?;
        marks.conn = Some(conn);
        Ok(marks)
    }

    /// The hash's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Host and port of Redis (the seeds of a cluster), for messages.
    fn addr(&self) -> String {
        match &self.opener {
            Opener::Single(client) => client.get_connection_info().addr().to_string(),
            Opener::Cluster { target, .. } => target.seed_addrs(),
        }
    }

    fn open(&self) -> Result<MarksConnection, RedisError> {
        match &self.opener {
            Opener::Single(client) => {
                let conn = client.get_connection_with_timeout(self.io_timeout)?;
                conn.set_read_timeout(Some(self.io_timeout))?;
                conn.set_write_timeout(Some(self.io_timeout))?;
                Ok(MarksConnection::Single(conn))
            }
            Opener::Cluster { client, .. } => {
                let conn = client.get_connection()?;
                // Every node answers PING: this fails now, not at the first use, when the
                // seeds are unreachable or refuse the credentials.
                let mut conn = MarksConnection::Cluster(Box::new(conn));
                redis::cmd("PING").query::<String>(conn.as_dyn())?;
                Ok(conn)
            }
        }
    }

    /// Runs `f` on the connection, reconnecting first after a failure; a failure drops the
    /// connection, and the caller decides whether to try again.
    fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut dyn ConnectionLike, &Script, &Script, &str) -> Result<T, RedisError>,
    ) -> Result<T, SinkError> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => self.open().map_err(SinkError::ReadMarks)?,
        };
        let result = f(conn.as_dyn(), &self.load, &self.advance, &self.key);
        if result.is_ok() {
            self.conn = Some(conn);
        }
        result.map_err(SinkError::ReadMarks)
    }

    /// Connections to every master of the cluster, for what must happen on each (counting
    /// keys, ending writers); `None` on one Redis.
    fn masters(&mut self) -> Result<Option<Vec<(String, Connection)>>, SinkError> {
        let Opener::Cluster { target, .. } = &self.opener else {
            return Ok(None);
        };
        let target = target.clone();
        let io_timeout = self.io_timeout;
        let addrs = self.with_conn(|conn, _, _, _| ClusterTarget::masters(conn))?;
        let mut masters = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let client = target.client_for(&addr)?;
            let conn = client
                .get_connection_with_timeout(io_timeout)
                .and_then(|mut conn| {
                    conn.set_read_timeout(Some(io_timeout))?;
                    redis::cmd("PING").query::<String>(&mut conn)?;
                    Ok(conn)
                })
                .map_err(|source| SinkError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            masters.push((addr, conn));
        }
        Ok(Some(masters))
    }

    /// Keys held by the masters of a cluster (0 on one Redis, whose script counts them
    /// itself), for the origin of a new hash.
    fn cluster_keys(masters: &mut Option<Vec<(String, Connection)>>) -> Result<u64, SinkError> {
        let mut keys = 0;
        for (_, conn) in masters.iter_mut().flatten() {
            keys += redis::cmd("DBSIZE")
                .query::<u64>(conn)
                .map_err(SinkError::ReadMarks)?;
        }
        Ok(keys)
    }

    /// Takes over the topic's profiles for a new run: raises the generation, and ends the
    /// writer connections of older generations, on every master of a cluster (see the module
    /// documentation). Call it once per run, before [`load`](Self::load).
    pub fn take_over(&mut self) -> Result<TakeOver, SinkError> {
        let topic_prefix = writer_name_prefix(&self.topic);
        let mut masters = self.masters()?;
        let cluster_keys = Self::cluster_keys(&mut masters)?;
        let (generation, mut outcome) = self.with_conn(|conn, load, _, key| {
            // The hash is created (and its origin recorded) first: a hash without an origin
            // counts as of unknown origin.
            load.key(key)
                .arg(cluster_keys)
                .invoke::<Vec<(String, String)>>(conn)?;
            let generation: u64 = redis::cmd("HINCRBY")
                .arg(key)
                .arg(GENERATION_FIELD)
                .arg(1)
                .query(conn)?;
            // On one Redis the writers are ended on this connection.
            let outcome = match masters {
                None => end_older_writers(conn, &topic_prefix, generation),
                Some(_) => TakeOver {
                    generation,
                    exclusive: true,
                    ended: 0,
                },
            };
            Ok((generation, outcome))
        })?;
        // After the generation is raised, on every master (see `Service::open` for why this
        // order makes an older writer either ended here or fenced when it reconnects).
        for (_, conn) in masters.iter_mut().flatten() {
            let on_node = end_older_writers(conn, &topic_prefix, generation);
            outcome.exclusive &= on_node.exclusive;
            outcome.ended += on_node.ended;
        }
        Ok(outcome)
    }

    /// Reads the marks, creating the hash (and recording its origin) if it does not exist, and
    /// recording the floor of each partition of `first_offsets` (partition, its first offset
    /// now) that has neither a mark nor a floor yet.
    pub fn load(&mut self, first_offsets: &[(i32, i64)]) -> Result<StoredMarks, SinkError> {
        let mut masters = self.masters()?;
        let cluster_keys = Self::cluster_keys(&mut masters)?;
        let fields: Vec<(String, String)> = self.with_conn(|conn, load, _, key| {
            let mut invocation = load.key(key);
            invocation.arg(cluster_keys);
            for &(partition, first) in first_offsets {
                invocation.arg(partition).arg(first);
            }
            invocation.invoke(conn)
        })?;
        // A hash without an origin was recreated by `advance` after the database lost it (a
        // Redis restart without persistence): nothing says what the database held, so assume
        // the worst.
        let mut stored = StoredMarks {
            unknown_origin: true,
            ..StoredMarks::default()
        };
        for (field, value) in fields {
            if field == "origin" {
                stored.unknown_origin = value != "fresh";
            } else if let Some(partition) = field.strip_prefix("floor:") {
                if let (Ok(partition), Ok(offset)) = (partition.parse(), value.parse()) {
                    stored.floors.insert(partition, offset);
                }
            } else if let (Ok(partition), Ok(offset)) = (field.parse(), value.parse()) {
                stored.marks.insert(partition, offset);
            }
            // Anything else was not written by streamrec and says nothing about offsets.
        }
        Ok(stored)
    }

    /// Raises the marks of these partitions to these offsets (a mark never goes down), and
    /// returns once Redis has them.
    pub fn advance(&mut self, marks: &[(i32, i64)]) -> Result<(), SinkError> {
        if marks.is_empty() {
            return Ok(());
        }
        self.with_conn(|conn, _, advance, key| {
            let mut invocation = advance.key(key);
            for &(partition, offset) in marks {
                invocation.arg(partition).arg(offset);
            }
            invocation.invoke::<i64>(conn).map(drop)
        })
    }
}

/// Ends the writer connections of `topic_prefix` older than `generation` that `conn`'s node
/// holds. Not exclusive when the node refuses CLIENT LIST or CLIENT KILL (an ACL without them).
fn end_older_writers(
    conn: &mut dyn ConnectionLike,
    topic_prefix: &str,
    generation: u64,
) -> TakeOver {
    let Ok(list) = redis::cmd("CLIENT").arg("LIST").query::<String>(conn) else {
        return TakeOver {
            generation,
            exclusive: false,
            ended: 0,
        };
    };
    let mut exclusive = true;
    let mut ended = 0;
    for (id, older) in writer_connections(&list, topic_prefix) {
        if older >= generation {
            continue;
        }
        match redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query::<i64>(conn)
        {
            Ok(n) => ended += n as usize,
            Err(_) => exclusive = false,
        }
    }
    TakeOver {
        generation,
        exclusive,
        ended,
    }
}

/// The (id, generation) of each connection in `CLIENT LIST` output whose name starts with
/// `prefix` followed by a generation.
fn writer_connections(list: &str, prefix: &str) -> Vec<(u64, u64)> {
    list.lines()
        .filter_map(|line| {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
            };
            let id = field("id")?.parse().ok()?;
            let generation = field("name")?.strip_prefix(prefix)?.parse().ok()?;
            Some((id, generation))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_connections_are_found_by_name() {
        let list = "id=3 addr=127.0.0.1:5000 laddr=127.0.0.1:6379 fd=8 name=streamrec-writer:t:4 age=1\n\
                    id=5 addr=127.0.0.1:5001 laddr=127.0.0.1:6379 fd=9 name= age=1\n\
                    id=7 addr=127.0.0.1:5002 laddr=127.0.0.1:6379 fd=10 name=streamrec-writer:t:12 age=0\n\
                    id=8 addr=127.0.0.1:5003 laddr=127.0.0.1:6379 fd=11 name=streamrec-writer:tt:1 age=0\n\
                    id=9 addr=127.0.0.1:5004 laddr=127.0.0.1:6379 fd=12 name=streamrec-writer:t:x age=0\n";
        assert_eq!(
            writer_connections(list, "streamrec-writer:t:"),
            [(3, 4), (7, 12)]
        );
    }

    fn stored(unknown_origin: bool, marks: &[(i32, i64)]) -> StoredMarks {
        StoredMarks {
            unknown_origin,
            marks: marks.iter().copied().collect(),
            floors: BTreeMap::new(),
        }
    }

    #[test]
    fn nothing_is_deleted_while_the_first_offset_is_at_or_below_the_floor() {
        let mut s = stored(false, &[(0, 500)]);
        s.floors.insert(1, 100);
        assert!(s.nothing_deleted(1, 0));
        assert!(s.nothing_deleted(1, 100));
        assert!(!s.nothing_deleted(1, 101));
        // A partition without a floor: nothing says.
        assert!(!s.nothing_deleted(0, 0));
    }

    #[test]
    fn target_is_the_mark() {
        let s = stored(false, &[(0, 500), (1, 90)]);
        assert_eq!(s.catch_up_target(0), 500);
        assert_eq!(s.catch_up_target(1), 90);
        // A partition without a mark was never read into Redis.
        assert_eq!(s.catch_up_target(3), 0);
    }
}
