//! Helpers shared by the Redis tests: the shared test server, unique ids, and private
//! redis-server processes for the tests that kill or reconfigure Redis.

#![allow(dead_code, clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sink::{RedisSink, SinkConfig};

/// A sink on the shared test Redis; fails the test, with the way out, when it is unreachable.
pub fn sink(config: SinkConfig) -> RedisSink {
    let url = config.redis_url.clone();
    RedisSink::connect(config).unwrap_or_else(|e| {
        panic!(
            "test Redis unreachable ({e}) at {url}: start one with \
             `redis-server --port 16379 --save '' --appendonly no --daemonize yes` \
             or point STREAMREC_TEST_REDIS at one"
        )
    })
}

/// A plain connection to check what the sink stored.
pub fn conn(url: &str) -> redis::Connection {
    redis::Client::open(url)
        .unwrap()
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap_or_else(|e| {
            panic!("test Redis unreachable at {url}: {e} (see `sink()` for how to start one)")
        })
}

pub fn get(conn: &mut redis::Connection, user_id: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(profile::redis_key(user_id))
        .query(conn)
        .unwrap()
}

/// Deletes the keys of `users`, so that repeated runs do not fill the shared server.
pub fn delete(url: &str, users: &[String]) {
    let mut c = conn(url);
    for chunk in users.chunks(1000) {
        let keys: Vec<String> = chunk.iter().map(|u| profile::redis_key(u)).collect();
        let _: i64 = redis::cmd("UNLINK").arg(keys).query(&mut c).unwrap();
    }
}

/// A prefix no other test run uses, so that tests can run concurrently and repeatedly against
/// one server.
pub fn unique(test: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "test-{test}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A redis-server child process of this test on its own port; killed on drop.
pub struct PrivateRedis {
    pub port: u16,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    pub fn start(extra_args: &[&str]) -> Self {
        // Below the ephemeral range, so that no client's reconnect takes it while the server
        // is down for a restart.
        let port = testkit::free_port();
        let mut server = Self {
            port,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Adds a user that may do everything but CLIENT, and returns a URL that logs in as it.
    pub fn url_without_client(&self) -> String {
        let _: () = redis::cmd("ACL")
            .arg(&[
                "SETUSER", "writer", "on", ">secret", "~*", "&*", "+@all", "-client",
            ])
            .query(&mut conn(&self.url()))
            .unwrap();
        format!("redis://writer:secret@127.0.0.1:{}/0", self.port)
    }

    /// Starts the server (again, on the same port) and waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"));
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ready.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not come up: {ready:?}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL: like a crash, no goodbye to clients) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A realistic record set: `n` users with 50 item ids of 10 characters and 32 floats.
pub struct Profiles {
    pub users: Vec<String>,
    pub items: Vec<Vec<String>>,
    pub vectors: Vec<Vec<f32>>,
}

impl Profiles {
    pub fn new(prefix: &str, n: usize, history: usize, dim: usize) -> Self {
        let users = (0..n).map(|i| format!("{prefix}-{i}")).collect();
        let items = (0..n)
            .map(|i| (0..history).map(|j| format!("I{:09}", i * 7 + j)).collect())
            .collect();
        let vectors = (0..n)
            .map(|i| {
                (0..dim)
                    .map(|j| ((i * 31 + j) % 97) as f32 / 97.0)
                    .collect()
            })
            .collect();
        Self {
            users,
            items,
            vectors,
        }
    }

    pub fn records(
        &self,
        timestamp: u64,
        epoch: u64,
    ) -> impl Iterator<Item = sink::ProfileRecord<'_, String>> + '_ {
        (0..self.users.len()).map(move |i| sink::ProfileRecord {
            user_id: &self.users[i],
            timestamp,
            history_items: &self.items[i],
            interest_vector: &self.vectors[i],
            known_items: self.items[i].len() as u32,
            epoch,
        })
    }
}
