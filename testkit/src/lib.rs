//! Helpers for tests against the real broker and Redis that `scripts/test.sh` starts
//! (`scripts/services.sh` on the test ports), shared by the crates' integration tests. They
//! fail, never skip, when those are not up: a panic here is a test failure. The Redis helpers
//! need only the redis crate; the broker and HTTP helpers (module `broker`, the default feature
//! `broker`) need rdkafka and tokio, which a crate that tests against Redis alone (the sink) can
//! do without.

#![allow(clippy::unwrap_used)]

pub mod cluster;
pub mod process;
pub mod prometheus;
pub mod security;

use std::time::Duration;

#[cfg(feature = "broker")]
mod broker;
#[cfg(feature = "broker")]
pub mod tansu;
#[cfg(feature = "broker")]
pub use broker::*;

/// A loopback port nothing listens on right now, for a server that a test starts (and may
/// restart on the same port), with the port 10000 above it free too (a Redis Cluster node's
/// bus port). The ports lie in 20000..22700, below Linux's ephemeral range (32768 and up by
/// default), and that is the point: a port the OS hands out for `bind(0)` is one it also gives
/// to outgoing connections, so while a test's server was down for a restart a client's
/// reconnect could take its port (or connect to itself on it), and a cluster node's bus port
/// could be any connection's. A process-wide cursor, started at an offset from the process id,
/// keeps the threads of one test binary from choosing the same port; another process may still
/// take one before the caller binds it, which shows as a failed start, not as a wrong result.
pub fn free_port() -> u16 {
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 2_700;
    static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = CURSOR.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % COUNT,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
    for _ in 0..COUNT {
        let port = (FIRST + CURSOR.fetch_add(1, Ordering::Relaxed) % COUNT) as u16;
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!(
        "no free loopback port (with port + 10000 free too) in {FIRST}..{}",
        FIRST + COUNT
    )
}

/// The seeds a property test runs: `STREAMREC_TEST_SEEDS` (`START..END`) if set, else the
/// test's own `default`. The tests that check the dataflow against a sequential reference on
/// seeded random input run a few fixed seeds in CI; a longer sweep runs others without an edit,
/// e.g. `STREAMREC_TEST_SEEDS=0..300 cargo test --release -p streamrec-dataflow recommend::`.
/// Each seed is printed to stderr as its run starts, so that a failure's output (which
/// `cargo test` shows) names the seed to run again. Panics on a malformed value: a sweep that
/// silently ran the defaults would prove nothing.
pub fn seeds(default: std::ops::Range<u64>) -> impl Iterator<Item = u64> {
    let seeds = match std::env::var("STREAMREC_TEST_SEEDS") {
        Ok(value) => parse_seeds(&value).unwrap_or_else(|error| panic!("{error}")),
        Err(_) => default,
    };
    seeds.inspect(|seed| eprintln!("seed {seed}"))
}

/// `START..END`, not empty.
fn parse_seeds(value: &str) -> Result<std::ops::Range<u64>, String> {
    let bad = || format!("STREAMREC_TEST_SEEDS={value:?}: want START..END, e.g. 0..300");
    let (start, end) = value.trim().split_once("..").ok_or_else(bad)?;
    let start: u64 = start.parse().map_err(|_| bad())?;
    let end: u64 = end.parse().map_err(|_| bad())?;
    if start >= end {
        return Err(bad());
    }
    Ok(start..end)
}

/// The test broker: `STREAMREC_TEST_BROKERS`, by default the test port of scripts/test.sh.
pub fn brokers() -> String {
    std::env::var("STREAMREC_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// The test Redis: `STREAMREC_TEST_REDIS`, by default the test port of scripts/test.sh.
pub fn redis_url() -> String {
    std::env::var("STREAMREC_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:16379/0".into())
}

/// The test Redis URL with database `db` instead, for a test that empties its database or
/// compares runs side by side.
pub fn redis_url_db(db: u32) -> String {
    let url = redis_url();
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    format!("{base}/{db}")
}

/// The test Redis's URL with `user:password@` in it.
pub fn redis_url_as(user: &str, password: &str) -> String {
    redis_url().replacen("redis://", &format!("redis://{user}:{password}@"), 1)
}

/// A plain connection to the test Redis.
pub fn redis_connection() -> redis::Connection {
    let url = redis_url();
    redis::Client::open(url.as_str())
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("test Redis unreachable at {url}: {e}; run scripts/test.sh"))
}

/// A user on the test Redis with `password` and every right, deleted on drop: for tests of
/// logging in, not of permissions (those use [`security::AclUser`], made from the ACL file).
#[derive(Debug)]
pub struct FullAccessUser(pub String);

impl FullAccessUser {
    /// Creates a user named after `prefix` and unique to this test.
    pub fn new(prefix: &str, password: &str) -> Self {
        let name = unique_topic(prefix);
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&name)
            .arg("on")
            .arg(format!(">{password}"))
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .query::<()>(&mut redis_connection())
            .unwrap();
        FullAccessUser(name)
    }
}

impl Drop for FullAccessUser {
    fn drop(&mut self) {
        let _ = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&self.0)
            .query::<i64>(&mut redis_connection());
    }
}

/// A topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::{free_port, parse_seeds};

    #[test]
    fn free_ports_differ_across_threads_and_lie_below_the_ephemeral_range() {
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..25).map(|_| free_port()).collect::<Vec<_>>()))
            .collect();
        let mut ports: Vec<u16> = threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap())
            .collect();
        // The machine's ephemeral range, where the OS picks a connection's local port.
        let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse().ok())
            .unwrap_or(32768);
        for &port in &ports {
            assert!(
                (20_000..22_700).contains(&port) && port + 10_000 < ephemeral_low,
                "port {port} (bus port {}) reaches the ephemeral range from {ephemeral_low}",
                port + 10_000
            );
        }
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 100, "a port was handed out twice");
    }

    #[test]
    fn seeds_are_a_non_empty_range() {
        assert_eq!(parse_seeds("0..300"), Ok(0..300));
        assert_eq!(parse_seeds(" 7..8 "), Ok(7..8));
        for bad in ["", "300", "5..5", "9..3", "a..b", "0..=3", "-1..2"] {
            assert!(parse_seeds(bad).is_err(), "{bad:?} accepted");
        }
    }
}
