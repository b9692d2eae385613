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

/// A loopback port nothing listens on right now (another process may take it before the
/// caller binds it: that shows as a failed start, not as a wrong result).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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
