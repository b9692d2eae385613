//! The sink's writes to a Redis Cluster: one [`Service`] and one batcher per master, records
//! routed by their key's slot, and the resend of records whose slot moved (see `cluster.rs` for
//! the protocol).
//!
//! A node's service gives up after a few failed attempts ([`NODE_RETRIES`]) instead of retrying
//! for ever as the single-Redis sink does: its master may have failed over to another address,
//! which only a fresh slot map reveals. Its unacknowledged records then come back as moved, and
//! the resend loop here retries them, with backoff and a fresh slot map each round, until they
//! are written (or `max_retries` rounds failed, when set). So a record is never dropped, as on
//! one Redis.

use std::collections::HashMap;
use std::sync::Arc;

use profile::RateLimit;

use crate::batch::{Batch, Batcher};
use crate::cluster::{record_slot, ClusterTarget, Redirect, SlotMap, SLOTS};
use crate::encode::EncodedProfile;
use crate::metrics::SinkMetrics;
use crate::service::Service;
use crate::{SinkConfig, SinkError, WriteMode, WriteStats};

/// Consecutive failed attempts on one node before its records go back to the resend loop.
const NODE_RETRIES: u32 = 3;

pub(crate) struct ClusterWriter {
    target: ClusterTarget,
    /// The sink's settings, with each node's URL put in when it connects.
    config: SinkConfig,
    /// Reads the fence's generation wherever the read marks live; every node's service
    /// clones it.
    generation_reader: redis::cluster::ClusterClient,
    slots: SlotMap,
    nodes: Vec<Node>,
    node_of_addr: HashMap<String, usize>,
    /// Records waiting for a node that could not be reached, for the next resend round.
    waiting: Vec<(EncodedProfile, Option<Redirect>)>,
    /// The sink's `max_retries`: resend rounds before a write gives up (`None`: never).
    max_rounds: Option<u32>,
    /// How the next writes guard their keys (see [`WriteMode`]); resends are always checked.
    mode: WriteMode,
    metrics: Arc<SinkMetrics>,
    warnings: RateLimit,
}

struct Node {
    service: Service,
    batcher: Batcher,
    /// Gave up (after [`NODE_RETRIES`]) in this write or resend round: its further records
    /// wait for the next round instead of each waiting out the retries again.
    failing: bool,
}

impl std::fmt::Debug for ClusterWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterWriter")
            .field("seeds", &self.target.seed_addrs())
            .field("nodes", &self.node_of_addr.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl ClusterWriter {
    /// Reads the slot map from the seeds and connects to every master, without retrying: an
    /// unreachable node at start is reported, as on one Redis.
    pub(crate) fn connect(
        config: &SinkConfig,
        metrics: Arc<SinkMetrics>,
    ) -> Result<Self, SinkError> {
        config.validate()?;
        let target = ClusterTarget::parse(&config.redis_url, config.redis_ca_file.as_deref())?;
        let slots =
            target
                .slot_map(&[], config.io_timeout)
                .map_err(|source| SinkError::Connect {
                    addr: target.seed_addrs(),
                    source,
                })?;
        let served = (0..SLOTS as u16)
            .filter(|&slot| slots.owner(slot).is_some())
            .count();
        if served < SLOTS {
            return Err(SinkError::Connect {
                addr: target.seed_addrs(),
                source: redis::RedisError::from((
                    redis::ErrorKind::ClusterConnectionNotFound,
                    "the cluster does not serve every slot",
                    format!("{served} of {SLOTS} slots have a master"),
                )),
            });
        }
        let generation_reader = target.cluster_client(config.io_timeout)?;
        let mut node_config = config.clone();
        node_config.max_retries = Some(NODE_RETRIES);
        let mut writer = Self {
            target,
            config: node_config,
            generation_reader,
            slots,
            nodes: Vec::new(),
            node_of_addr: HashMap::new(),
            waiting: Vec::new(),
            max_rounds: config.max_retries,
            mode: WriteMode::Checked,
            metrics,
            warnings: RateLimit::per_second(),
        };
        for addr in writer.slots.nodes.clone() {
            writer.node(&addr)?;
        }
        Ok(writer)
    }

    /// The node at `addr`, connected on first use.
    fn node(&mut self, addr: &str) -> Result<usize, SinkError> {
        if let Some(&index) = self.node_of_addr.get(addr) {
            return Ok(index);
        }
        let mut config = self.config.clone();
        config.redis_url = self.target.node_url(addr)?;
        let client = self.target.client_for(addr)?;
        let service = Service::connect_node(
            &config,
            client,
            self.generation_reader.clone(),
            Arc::clone(&self.metrics),
        )?;
        let mut batcher = Batcher::cluster(
            config.max_batch_records,
            config.max_batch_bytes,
            service.script_sha(),
        );
        // A node joining mid-write (a redirect's) writes as the others do.
        batcher.set_mode(self.mode);
        self.nodes.push(Node {
            service,
            batcher,
            failing: false,
        });
        self.node_of_addr
            .insert(addr.to_owned(), self.nodes.len() - 1);
        Ok(self.nodes.len() - 1)
    }

    /// How the next writes guard their keys, as [`RedisSink::set_mode`](crate::RedisSink::set_mode).
    pub(crate) fn set_mode(&mut self, mode: WriteMode) {
        self.mode = mode;
    }

    /// Writes every profile to the master of its slot and returns once each is acknowledged
    /// (moved records resent until they are); see [`RedisSink::write`](crate::RedisSink::write).
    pub(crate) fn write(
        &mut self,
        profiles: impl IntoIterator<Item = EncodedProfile>,
        stats: &mut WriteStats,
    ) -> Result<(), SinkError> {
        let result = self.write_inner(profiles, stats);
        if result.is_err() {
            // The next write starts clean, as on one Redis.
            for node in &mut self.nodes {
                node.batcher.clear();
                node.service.moved.clear();
            }
            self.waiting.clear();
        }
        result
    }

    fn write_inner(
        &mut self,
        profiles: impl IntoIterator<Item = EncodedProfile>,
        stats: &mut WriteStats,
    ) -> Result<(), SinkError> {
        self.nodes.iter_mut().for_each(|node| node.failing = false);
        for index in 0..self.nodes.len() {
            if let Some(batch) = self.nodes[index].batcher.set_mode(self.mode) {
                self.submit(index, batch, stats)?;
            }
        }
        for profile in profiles {
            let non_finite = profile.non_finite();
            if non_finite > 0 {
                SinkMetrics::add(&self.metrics.non_finite_floats, non_finite);
            }
            let Some(addr) = self
                .slots
                .owner(record_slot(profile.key_kind(), profile.user_id()))
            else {
                self.waiting.push((profile, None));
                continue;
            };
            let index = match self.node_of_addr.get(addr) {
                Some(&index) => index,
                None => {
                    let addr = addr.to_owned();
                    match self.node(&addr) {
                        Ok(index) => index,
                        Err(error) => {
                            self.warn_unreachable(&addr, &error);
                            self.waiting.push((profile, None));
                            continue;
                        }
                    }
                }
            };
            if let Some(batch) = self.nodes[index].batcher.push_owned(profile) {
                self.submit(index, batch, stats)?;
            }
        }
        for index in 0..self.nodes.len() {
            if let Some(batch) = self.nodes[index].batcher.seal() {
                self.submit(index, batch, stats)?;
            }
        }
        self.flush(stats)?;
        self.resend_moved(stats)
    }

    /// Sends a batch to a node. A node that keeps failing hands its records back as moved
    /// (see the module documentation) and is not an error here.
    fn submit(
        &mut self,
        index: usize,
        batch: Batch,
        stats: &mut WriteStats,
    ) -> Result<(), SinkError> {
        if self.nodes[index].failing {
            self.waiting
                .extend(batch.profiles.into_iter().map(|profile| (profile, None)));
            return Ok(());
        }
        let result = self.nodes[index].service.submit(batch, stats);
        self.node_result(index, result)
    }

    fn flush(&mut self, stats: &mut WriteStats) -> Result<(), SinkError> {
        for index in 0..self.nodes.len() {
            let result = self.nodes[index].service.flush(stats);
            self.node_result(index, result)?;
        }
        Ok(())
    }

    fn node_result(
        &mut self,
        index: usize,
        result: Result<(), SinkError>,
    ) -> Result<(), SinkError> {
        match result {
            Err(SinkError::RetriesExhausted { last_error, .. }) => {
                self.nodes[index].failing = true;
                let addr = self.nodes[index].service.addr();
                if let Some(suppressed) = self.warnings.allow() {
                    tracing::warn!(
                        redis = %addr,
                        error = %last_error,
                        suppressed_warnings = suppressed,
                        "Redis Cluster node keeps failing; its records go where a fresh slot map says"
                    );
                }
                Ok(())
            }
            other => other,
        }
    }

    fn warn_unreachable(&mut self, addr: &str, error: &SinkError) {
        if let Some(suppressed) = self.warnings.allow() {
            tracing::warn!(
                redis = %addr,
                %error,
                suppressed_warnings = suppressed,
                "cannot connect to a Redis Cluster node; its records wait"
            );
        }
    }

    /// Resends, one record a command with its key declared, every record a node did not take,
    /// following `MOVED` and `ASK`, until none is left.
    fn resend_moved(&mut self, stats: &mut WriteStats) -> Result<(), SinkError> {
        let mut round: u32 = 0;
        loop {
            let mut moved = std::mem::take(&mut self.waiting);
            for node in &mut self.nodes {
                moved.append(&mut node.service.moved);
            }
            if moved.is_empty() {
                return Ok(());
            }
            round += 1;
            if let Some(max) = self.max_rounds {
                if round > max {
                    return Err(SinkError::RetriesExhausted {
                        retries: max,
                        pending_batches: 0,
                        pending_records: moved.len(),
                        last_error: redis::RedisError::from((
                            redis::ErrorKind::ClusterConnectionNotFound,
                            "records could not reach the Redis Cluster node of their slot",
                        )),
                    });
                }
            }
            if round > 1 {
                std::thread::sleep(crate::service::backoff(
                    self.config.retry_initial_backoff,
                    self.config.retry_max_backoff,
                    round - 1,
                ));
            }
            self.nodes.iter_mut().for_each(|node| node.failing = false);
            // A record Redis named no node for, or a slot that moved for good: the map is out
            // of date. (An ASK alone says nothing about the map.)
            if moved
                .iter()
                .any(|(_, redirect)| !redirect.as_ref().is_some_and(|r| r.ask))
            {
                let known: Vec<String> = self.slots.nodes.clone();
                match self.target.slot_map(&known, self.config.io_timeout) {
                    Ok(slots) => self.slots = slots,
                    Err(error) => {
                        if let Some(suppressed) = self.warnings.allow() {
                            tracing::warn!(
                                %error,
                                suppressed_warnings = suppressed,
                                "cannot read the Redis Cluster slot map; trying again"
                            );
                        }
                    }
                }
            }
            for (profile, redirect) in moved {
                let (addr, asking) = match &redirect {
                    Some(Redirect {
                        addr, ask: true, ..
                    }) => (addr.clone(), true),
                    Some(Redirect { addr, slot, .. }) => {
                        self.slots.set_owner(*slot, addr);
                        (addr.clone(), false)
                    }
                    None => match self
                        .slots
                        .owner(record_slot(profile.key_kind(), profile.user_id()))
                    {
                        Some(addr) => (addr.to_owned(), false),
                        None => {
                            self.waiting.push((profile, None));
                            continue;
                        }
                    },
                };
                let index = match self.node(&addr) {
                    Ok(index) => index,
                    Err(error) => {
                        self.warn_unreachable(&addr, &error);
                        self.waiting.push((profile, None));
                        continue;
                    }
                };
                let sha = self.nodes[index].service.script_sha().to_owned();
                self.submit(index, Batch::single(&sha, profile, asking), stats)?;
            }
            self.flush(stats)?;
        }
    }
}
