//! A private Redis Cluster for one test: three `redis-server` children in cluster mode on free
//! ports (whose bus ports, 10000 above, are free too: [`crate::free_port`]), joined by
//! `redis-cli --cluster create` (three masters, no replicas), killed on drop. A test that
//! reshards or counts every key needs a cluster of its own; starting one takes about a second.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A three-master Redis Cluster of this test.
pub struct PrivateCluster {
    /// The masters' ports, as created.
    ports: Vec<u16>,
    /// Every node's port, in the order of `children`.
    all_ports: Vec<u16>,
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for PrivateCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateCluster")
            .field("ports", &self.ports)
            .finish()
    }
}

impl PrivateCluster {
    /// Starts the three masters and waits until every one says the cluster is ok.
    pub fn start() -> Self {
        Self::start_with_replicas(0)
    }

    /// Three masters with `replicas` replicas each, and a node timeout of one second, so that
    /// a replica takes over from a failed master within a few seconds.
    pub fn start_with_replicas(replicas: usize) -> Self {
        let mut cluster = Self::spawn_nodes(3 * (1 + replicas));
        let nodes: Vec<String> = cluster
            .all_ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli");
        assert!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        cluster.wait_until_stable();
        cluster.ports = cluster.masters();
        // A replica takes over only if its data is recent: wait until each has synced.
        for &port in &cluster.all_ports {
            if cluster.ports.contains(&port) {
                continue;
            }
            cluster.wait_until(Duration::from_secs(20), || {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query(&mut cluster.try_node(port)?)
                    .ok()?;
                info.contains("master_link_status:up").then_some(())
            });
        }
        cluster
    }

    /// Starts `count` cluster-mode nodes and waits until each answers on its port. A node that
    /// exits or stays silent (another process took its port or its bus port between our check
    /// and its bind) makes a new start on other ports, up to three; the panic after the third
    /// quotes each attempt's node log.
    fn spawn_nodes(count: usize) -> Self {
        let mut failures = Vec::new();
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let ports: Vec<u16> = (0..count).map(|_| crate::free_port()).collect();
            let children = ports
                .iter()
                .map(|port| {
                    Command::new("redis-server")
                        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                        .args(["--save", "", "--appendonly", "no"])
                        .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "1000"])
                        .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                        .args(["--logfile", &format!("node-{port}.log")])
                        .args(["--dir", dir.path().to_str().unwrap()])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap_or_else(|e| {
                            panic!("cannot start redis-server (is it installed?): {e}")
                        })
                })
                .collect();
            let mut cluster = Self {
                ports: ports.clone(),
                all_ports: ports,
                children,
                dir,
            };
            match cluster.wait_until_nodes_answer(Duration::from_secs(10)) {
                Ok(()) => return cluster,
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "Redis Cluster nodes did not start in three attempts:\n{}",
            failures.join("\n")
        )
    }

    /// Ok once every node answers on its port; otherwise the first node that exited or did not
    /// answer within `limit`, with the tail of its log.
    fn wait_until_nodes_answer(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        for index in 0..self.all_ports.len() {
            let port = self.all_ports[index];
            // Our child, not whatever else may listen on the port: its process id.
            let pid = format!("process_id:{}", self.children[index].id());
            loop {
                let answered = self.try_node(port).is_some_and(|mut conn| {
                    conn.set_read_timeout(Some(Duration::from_millis(500)))
                        .is_ok()
                        && redis::cmd("INFO")
                            .arg("server")
                            .query::<String>(&mut conn)
                            .is_ok_and(|info| info.lines().any(|line| line.trim_end() == pid))
                });
                if answered {
                    break;
                }
                let exited = self.children[index].try_wait().ok().flatten();
                if exited.is_some() || Instant::now() >= deadline {
                    let why = match exited {
                        Some(status) => format!("exited ({status})"),
                        None => format!("did not answer within {limit:?}"),
                    };
                    let log =
                        std::fs::read_to_string(self.dir.path().join(format!("node-{port}.log")))
                            .unwrap_or_default();
                    let lines: Vec<&str> = log.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(5)..];
                    return Err(format!(
                        "node on port {port} {why}; its log ends: {}",
                        tail.join(" | ")
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// The ports of the nodes that are masters now, in port order.
    pub fn masters(&self) -> Vec<u16> {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut self.live_node())
            .unwrap();
        let mut masters: Vec<u16> = nodes
            .lines()
            .filter(|line| {
                let flags = line.split(' ').nth(2).unwrap_or_default();
                flags.split(',').any(|flag| flag == "master") && !flags.contains("fail")
            })
            .filter_map(|line| {
                line.split(' ')
                    .nth(1)?
                    .split(['@', ':'])
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .collect();
        masters.sort_unstable();
        masters
    }

    /// The masters' ports.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The seed list, as `--redis` takes it with `--redis-cluster`.
    pub fn seeds(&self) -> String {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn try_node(&self, port: u16) -> Option<redis::Connection> {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .ok()?
            .get_connection_with_timeout(Duration::from_millis(500))
            .ok()
    }

    /// A connection to any node that answers.
    fn live_node(&self) -> redis::Connection {
        self.all_ports
            .iter()
            .find_map(|&port| self.try_node(port))
            .expect("no node of the cluster answers")
    }

    /// A plain connection to the master on `port` (no redirects followed).
    pub fn node(&self, port: u16) -> redis::Connection {
        self.try_node(port)
            .unwrap_or_else(|| panic!("cluster node 127.0.0.1:{port} unreachable"))
    }

    /// A connection that routes each command to its key's node.
    pub fn connection(&self) -> redis::cluster::ClusterConnection {
        let seeds: Vec<String> = self
            .ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect();
        redis::cluster::ClusterClient::new(seeds)
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// The port of the master serving `slot`, from the node on the first port.
    pub fn owner(&self, slot: u16) -> u16 {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut self.live_node())
            .unwrap();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let port: u16 = fields[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap();
            for range in &fields[8.min(fields.len())..] {
                if range.starts_with('[') {
                    continue;
                }
                let (start, end) = match range.split_once('-') {
                    Some((start, end)) => (start.parse().unwrap(), end.parse().unwrap()),
                    None => {
                        let one: u16 = range.parse().unwrap();
                        (one, one)
                    }
                };
                if (start..=end).contains(&slot) {
                    return port;
                }
            }
        }
        panic!("no master serves slot {slot}")
    }

    fn node_id(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.node(port))
            .unwrap()
    }

    /// Starts moving `slot` from its master to the master on `to`: the slot is IMPORTING on
    /// `to` and MIGRATING on its owner, and the keys in `keys` (of that slot) are moved now.
    /// Until [`finish_migration`](Self::finish_migration), the owner answers ASK for a moved
    /// key.
    pub fn begin_migration(&self, slot: u16, to: u16, keys: &[String]) {
        let from = self.owner(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let setslot = |port: u16, state: &str, id: &str| {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(id)
                .query::<()>(&mut self.node(port))
                .unwrap();
        };
        setslot(to, "IMPORTING", &from_id);
        setslot(from, "MIGRATING", &to_id);
        if !keys.is_empty() {
            self.migrate(from, to, keys);
        }
    }

    /// `MIGRATE` of `keys` from the master on `from` to the one on `to`.
    fn migrate(&self, from: u16, to: u16, keys: &[String]) {
        let _: redis::Value = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(to)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(keys)
            .query(&mut self.node(from))
            .unwrap();
    }

    /// Moves (the rest of) `slot`'s keys to the master on `to` and makes it the slot's owner on
    /// every node; begins the migration first if [`begin_migration`](Self::begin_migration) did
    /// not.
    pub fn finish_migration(&self, slot: u16, to: u16) {
        let from = self.owner(slot);
        // Setting the states again is harmless when the migration has begun.
        self.begin_migration(slot, to, &[]);
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(1000)
                .query(&mut self.node(from))
                .unwrap();
            if keys.is_empty() {
                break;
            }
            self.migrate(from, to, &keys);
        }
        let to_id = self.node_id(to);
        // The new owner first, then the old one, then the other masters, as Redis advises.
        let others = self.ports.iter().copied().filter(|&p| p != to && p != from);
        for port in [to, from].into_iter().chain(others) {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&to_id)
                .query::<()>(&mut self.node(port))
                .unwrap();
        }
        self.wait_until_stable();
    }

    /// Waits until every master says the cluster is ok.
    fn wait_until_stable(&self) {
        self.wait_until(Duration::from_secs(20), || {
            self.ports
                .iter()
                .all(|&port| {
                    self.try_node(port)
                        .and_then(|mut conn| {
                            redis::cmd("CLUSTER")
                                .arg("INFO")
                                .query::<String>(&mut conn)
                                .ok()
                        })
                        .is_some_and(|info| info.contains("cluster_state:ok"))
                })
                .then_some(())
        });
    }

    fn wait_until(&self, limit: Duration, mut ready: impl FnMut() -> Option<()>) {
        let deadline = Instant::now() + limit;
        while ready().is_none() {
            assert!(
                Instant::now() < deadline,
                "Redis Cluster on {:?} not ready within {limit:?}",
                self.ports
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the node on `port` (SIGKILL), leaving the others up.
    pub fn kill(&mut self, port: u16) {
        let index = self.all_ports.iter().position(|&p| p == port).unwrap();
        let _ = self.children[index].kill();
        let _ = self.children[index].wait();
    }

    /// Keys held by each master, in port order.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.ports
            .iter()
            .map(|&port| redis::cmd("DBSIZE").query(&mut self.node(port)).unwrap())
            .collect()
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
