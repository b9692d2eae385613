//! Redis Cluster: the seed list, the slot map, and connections to each node.
//!
//! In cluster mode (`SinkConfig::redis_cluster`) the Redis URL is a comma-separated list of seed
//! nodes. The sink asks one of them for the slot map (`CLUSTER SLOTS`), keeps one [`Service`]
//! (connection, pipeline, retries) and one batcher per master, and sends each record to the
//! master of its key's slot. A batch holds keys of many slots of one node, which no command may
//! declare (CROSSSLOT), so the cluster form of the write script declares none: it takes its keys
//! in ARGV and carries the `allow-cross-slot-keys` flag (Redis 7), and Redis checks each key the
//! script touches against the node's own slots.
//!
//! During a resharding a key may no longer be where the slot map says. The script then refuses
//! that key alone ("non local key"), the rest of the batch is written, and the record comes back
//! to the sink as *moved*. The sink refreshes the slot map and resends each moved record alone,
//! with its key declared, so that Redis answers a key that left with `MOVED` or `ASK` and the
//! address of its node; the sink follows it (after `ASKING` for `ASK`) until the record is
//! written. The script's no-regression check makes every resend harmless, as on one Redis.
//!
//! What stays as on one Redis: the read marks are one hash (one key, one slot), reached through
//! the redis crate's cluster connection, which follows redirects itself; a take-over ends older
//! writers on every master; a connection checks the fence against the marks' node before it
//! writes. A plain batch is a pipeline of `SET`s to one master (an `MSET` may not span slots),
//! each answered `OK` or with the redirect of a key that left; the record is then resent
//! checked, as above.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use redis::{Client, ConnectionLike, Value};

use crate::SinkError;

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: usize = 16384;

/// The hash slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag (the part between the
/// first `{` and the next `}`, if not empty), modulo 16384.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS as u16
}

/// The slot of the key of `kind` for `user_id`, without building it.
pub(crate) fn record_slot(kind: crate::KeyKind, user_id: &str) -> u16 {
    let prefix = kind.prefix();
    // A user id with a hash tag moves the key's slot, so the key must be hashed whole.
    if user_id.contains('{') {
        return key_slot(format!("{prefix}{user_id}").as_bytes());
    }
    // Without a '{' in the user id the key holds no hash tag (no prefix has one), and the CRC
    // runs over the prefix and the id in turn.
    let mut state = crc16::State::<crc16::XMODEM>::new();
    state.update(prefix.as_bytes());
    state.update(user_id.as_bytes());
    state.get() % SLOTS as u16
}

/// Where a cluster is and how to reach its nodes: the seed URLs, with the scheme, credentials
/// and CA of the first one used for every node.
#[derive(Clone)]
pub(crate) struct ClusterTarget {
    /// The seeds as URLs.
    seeds: Vec<String>,
    /// PEM CA certificates for `rediss://`, if given.
    ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ClusterTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterTarget")
            .field("seeds", &self.seeds.len())
            .finish_non_exhaustive()
    }
}

impl ClusterTarget {
    /// Parses a seed list: comma-separated `redis://` or `rediss://` URLs, or `host:port`
    /// entries, which take the scheme and credentials of the first URL (plain `redis://`
    /// without one). A cluster has only database 0.
    pub(crate) fn parse(list: &str, ca_file: Option<&Path>) -> Result<Self, SinkError> {
        let fail = |what: String| Err(SinkError::Config(format!("Redis Cluster seeds: {what}")));
        let entries: Vec<&str> = list.split(',').map(str::trim).collect();
        if entries.iter().any(|entry| entry.is_empty()) {
            return fail("an empty entry in the comma-separated list".to_owned());
        }
        let template = entries
            .iter()
            .find(|entry| entry.contains("://"))
            .copied()
            .unwrap_or("redis://127.0.0.1:6379");
        let template = url::Url::parse(template).map_err(|e| {
            SinkError::Config(format!("Redis Cluster seeds: a URL does not parse: {e}"))
        })?;
        let mut seeds = Vec::with_capacity(entries.len());
        for entry in entries {
            let url = if entry.contains("://") {
                url::Url::parse(entry).map_err(|e| {
                    SinkError::Config(format!("Redis Cluster seeds: a URL does not parse: {e}"))
                })?
            } else {
                with_addr(&template, entry)?
            };
            if !matches!(url.scheme(), "redis" | "rediss") {
                return fail(format!(
                    "scheme {:?}: a seed is redis:// or rediss://",
                    url.scheme()
                ));
            }
            if !matches!(url.path(), "" | "/" | "/0") {
                return fail(format!(
                    "database {:?}: a Redis Cluster has only database 0",
                    url.path().trim_start_matches('/')
                ));
            }
            seeds.push(url.to_string());
        }
        let ca_pem = match ca_file {
            None => None,
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                SinkError::Config(format!("Redis CA file {}: {e}", path.display()))
            })?),
        };
        let target = Self { seeds, ca_pem };
        // Every seed must make a client (a CA file needs rediss://, for one).
        for seed in &target.seeds {
            target.client_for_url(seed)?;
        }
        Ok(target)
    }

    /// The seeds as URLs.
    pub(crate) fn seeds(&self) -> &[String] {
        &self.seeds
    }

    /// The URL of the node at `addr` (`host:port`): the first seed's, with that address.
    pub(crate) fn node_url(&self, addr: &str) -> Result<String, SinkError> {
        let template = url::Url::parse(&self.seeds[0])
            .map_err(|e| SinkError::Config(format!("Redis Cluster seeds: {e}")))?;
        Ok(with_addr(&template, addr)?.to_string())
    }

    /// A client of the node at `addr`.
    pub(crate) fn client_for(&self, addr: &str) -> Result<Client, SinkError> {
        self.client_for_url(&self.node_url(addr)?)
    }

    fn client_for_url(&self, url: &str) -> Result<Client, SinkError> {
        match &self.ca_pem {
            None => Client::open(url).map_err(|e| SinkError::Config(format!("redis_url: {e}"))),
            Some(pem) => Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            )
            .map_err(|e| SinkError::Config(format!("Redis with the CA file: {e}"))),
        }
    }

    /// The redis crate's cluster client, for commands on single keys (the read marks), which
    /// it routes and redirects itself.
    pub(crate) fn cluster_client(
        &self,
        io_timeout: Duration,
    ) -> Result<redis::cluster::ClusterClient, SinkError> {
        let mut builder = redis::cluster::ClusterClient::builder(self.seeds.clone())
            .connection_timeout(io_timeout)
            .response_timeout(io_timeout);
        if let Some(pem) = &self.ca_pem {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            });
        }
        builder
            .build()
            .map_err(|e| SinkError::Config(format!("Redis Cluster seeds: {e}")))
    }

    /// The seeds' `host:port` addresses.
    fn seed_addr_list(&self) -> Vec<String> {
        self.seeds
            .iter()
            .filter_map(|seed| {
                let url = url::Url::parse(seed).ok()?;
                Some(format!(
                    "{}:{}",
                    url.host_str()?,
                    url.port().unwrap_or(6379)
                ))
            })
            .collect()
    }

    /// The address of each seed, for messages.
    pub(crate) fn seed_addrs(&self) -> String {
        self.seed_addr_list().join(",")
    }

    /// Asks the nodes at `known` and then the seeds, in turn, for the slot map; the first answer
    /// wins. Fails with the last error when none answers.
    pub(crate) fn slot_map(
        &self,
        known: &[String],
        io_timeout: Duration,
    ) -> Result<SlotMap, redis::RedisError> {
        let mut last_error = None;
        for addr in known.iter().cloned().chain(self.seed_addr_list()) {
            let ask = || -> Result<SlotMap, redis::RedisError> {
                let client = self.client_for(&addr).map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "node URL",
                        e.to_string(),
                    ))
                })?;
                let mut conn = client.get_connection_with_timeout(io_timeout)?;
                conn.set_read_timeout(Some(io_timeout))?;
                let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn)?;
                SlotMap::parse(reply, host_of(&addr)).map_err(|what| {
                    redis::RedisError::from((
                        redis::ErrorKind::Parse,
                        "unexpected CLUSTER SLOTS reply",
                        what,
                    ))
                })
            };
            match ask() {
                Ok(map) => return Ok(map),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Client, "no Redis Cluster seed"))
        }))
    }

    /// The master addresses of the cluster, from a connection to any node.
    pub(crate) fn masters(conn: &mut dyn ConnectionLike) -> Result<Vec<String>, redis::RedisError> {
        let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query(conn)?;
        let map = SlotMap::parse(reply, "").map_err(|what| {
            redis::RedisError::from((
                redis::ErrorKind::Parse,
                "unexpected CLUSTER SLOTS reply",
                what,
            ))
        })?;
        Ok(map.nodes)
    }
}

/// `url` with its host and port replaced by those of `addr` (`host:port`, `[v6]:port`).
fn with_addr(url: &url::Url, addr: &str) -> Result<url::Url, SinkError> {
    let bad = || SinkError::Config(format!("Redis Cluster node {addr:?}: not host:port"));
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let mut url = url.clone();
    url.set_host(Some(host)).map_err(|_| bad())?;
    url.set_port(Some(port)).map_err(|()| bad())?;
    Ok(url)
}

/// The host part of `host:port`.
fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}

/// Which master serves each slot, as indices into `nodes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotMap {
    /// The masters' `host:port`, in order of first appearance.
    pub(crate) nodes: Vec<String>,
    /// Slot → index into `nodes`; `None` for a slot no master serves (a cluster being set up).
    owner: Vec<Option<u16>>,
}

impl SlotMap {
    /// Reads a `CLUSTER SLOTS` reply: `[[start, end, [host, port, id, ...], replicas...], ...]`.
    /// An empty host means the node that answered, whose host is `asked_host`.
    pub(crate) fn parse(reply: Value, asked_host: &str) -> Result<Self, String> {
        let describe = |value: &Value| format!("{value:?}");
        let Value::Array(ranges) = reply else {
            return Err(describe(&reply));
        };
        let mut map = SlotMap {
            nodes: Vec::new(),
            owner: vec![None; SLOTS],
        };
        let mut index_of: HashMap<String, u16> = HashMap::new();
        for range in ranges {
            let Value::Array(fields) = &range else {
                return Err(describe(&range));
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return Err(describe(&range));
            };
            let host = match master.first() {
                Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
                Some(Value::SimpleString(host)) => host.clone(),
                _ => return Err(describe(&range)),
            };
            let Some(Value::Int(port)) = master.get(1) else {
                return Err(describe(&range));
            };
            let host = if host.is_empty() || host == "?" {
                asked_host.to_owned()
            } else {
                host
            };
            let addr = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let (start, end) = (*start, *end);
            if !(0..SLOTS as i64).contains(&start) || !(start..SLOTS as i64).contains(&end) {
                return Err(describe(&range));
            }
            let next = map.nodes.len() as u16;
            let index = *index_of.entry(addr.clone()).or_insert_with(|| {
                map.nodes.push(addr);
                next
            });
            for slot in start..=end {
                map.owner[slot as usize] = Some(index);
            }
        }
        Ok(map)
    }

    /// The master serving `slot`, if any.
    pub(crate) fn owner(&self, slot: u16) -> Option<&str> {
        let index = self.owner[slot as usize]?;
        Some(&self.nodes[index as usize])
    }

    /// Records that `slot` is now served by `addr` (a MOVED redirect).
    pub(crate) fn set_owner(&mut self, slot: u16, addr: &str) {
        let index = match self.nodes.iter().position(|node| node == addr) {
            Some(index) => index,
            None => {
                self.nodes.push(addr.to_owned());
                self.nodes.len() - 1
            }
        };
        self.owner[slot as usize] = Some(index as u16);
    }
}

/// A `MOVED <slot> <addr>` or `ASK <slot> <addr>` error's redirect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Redirect {
    pub(crate) slot: u16,
    pub(crate) addr: String,
    /// ASK: the slot is moving and this key is already at `addr`, which serves it only after
    /// `ASKING`; MOVED: the slot now lives at `addr`.
    pub(crate) ask: bool,
}

impl Redirect {
    /// The redirect of an error reply with code `code` and details `details`, if it is one.
    pub(crate) fn parse(code: &str, details: Option<&str>) -> Option<Self> {
        let ask = match code {
            "MOVED" => false,
            "ASK" => true,
            _ => return None,
        };
        let mut words = details?.split_whitespace();
        let slot = words.next()?.parse().ok()?;
        let addr = words.next()?;
        // Redis 7 may answer ":port" when it does not know its own address: the same host.
        Some(Self {
            slot,
            addr: addr.to_owned(),
            ask,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.
        assert_eq!(key_slot(b"a"), 15495);
        assert_eq!(key_slot(b"b"), 3300);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        // An empty tag hashes the whole key; only the first '{' counts.
        assert_eq!(key_slot(b"foo{}{bar}"), 8363);
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        for user in ["A34O9UGRTZNTR8", "", "u{1}", "x}{"] {
            assert_eq!(
                record_slot(crate::KeyKind::Profile, user),
                key_slot(profile::redis_key(user).as_bytes()),
                "{user}"
            );
            assert_eq!(
                record_slot(crate::KeyKind::Recommendations, user),
                key_slot(profile::recs_key(user).as_bytes()),
                "{user}"
            );
        }
        assert_eq!(
            record_slot(crate::KeyKind::PopularItems, ""),
            key_slot(b"popular_items")
        );
    }

    #[test]
    fn seeds_take_the_first_urls_scheme_and_credentials() {
        let target =
            ClusterTarget::parse("redis://app:pw@10.0.0.1:7000, 10.0.0.2:7001", None).unwrap();
        assert_eq!(target.seeds[1], "redis://app:pw@10.0.0.2:7001");
        assert_eq!(
            target.node_url("10.0.0.3:7002").unwrap(),
            "redis://app:pw@10.0.0.3:7002"
        );
        assert_eq!(target.seed_addrs(), "10.0.0.1:7000,10.0.0.2:7001");
        let bare = ClusterTarget::parse("h1:7000,h2:7001", None).unwrap();
        assert_eq!(bare.seeds[0], "redis://h1:7000");
        for bad in [
            "redis://h:7000/1",
            "h1:7000,,h2:7001",
            "http://h:7000",
            "h1",
            "h1:port",
        ] {
            assert!(
                matches!(ClusterTarget::parse(bad, None), Err(SinkError::Config(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn slot_map_reads_cluster_slots() {
        let node = |host: &str, port| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000),
                node("127.0.0.1", 7100),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node("", 7001)]),
        ]);
        let mut map = SlotMap::parse(reply, "10.1.1.1").unwrap();
        assert_eq!(map.owner(0), Some("127.0.0.1:7000"));
        assert_eq!(map.owner(5460), Some("127.0.0.1:7000"));
        assert_eq!(map.owner(5461), Some("10.1.1.1:7001"));
        assert_eq!(map.nodes.len(), 2);
        map.set_owner(3, "127.0.0.1:7002");
        assert_eq!(map.owner(3), Some("127.0.0.1:7002"));
        assert!(SlotMap::parse(Value::Int(1), "").is_err());
        let half = Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(10),
            node("h", 1),
        ])]);
        assert_eq!(SlotMap::parse(half, "").unwrap().owner(11), None);
    }

    #[test]
    fn redirects_parse() {
        assert_eq!(
            Redirect::parse("ASK", Some("3300 127.0.0.1:17002")),
            Some(Redirect {
                slot: 3300,
                addr: "127.0.0.1:17002".to_owned(),
                ask: true
            })
        );
        assert!(!Redirect::parse("MOVED", Some("1 h:2")).unwrap().ask);
        assert_eq!(Redirect::parse("ERR", Some("1 h:2")), None);
        assert_eq!(Redirect::parse("MOVED", Some("x h:2")), None);
    }
}
