//! Restoring a checkpoint on start: find the newest complete one, check it fits this run, and
//! turn it into the events that rebuild the state.
//!
//! The state enters the dataflow as events of the first replay epoch, like the features file,
//! and goes through the same exchanges as any message: each user to the worker that owns it
//! now. That is what makes a checkpoint of `-w 2` restore into `-w 4` or `-n 2 -w 2`: worker
//! `i` of the new run sends the parts `j` with `j mod peers = i`, wherever their users belong.
//! A restored event sorts before every message of its epoch (its read position is the least
//! there is), so the replay of the messages after the checkpoint applies on top of it.
//!
//! Anything wrong (no checkpoint, a corrupt or truncated file, a part missing, another topic,
//! history length, dimension or features file) is logged, and the run replays in full, as
//! without checkpoints: never a wrong state.

use std::collections::BTreeMap;

use super::files::{CheckpointDir, Unusable};
use super::payload::{decode_body, decode_head, Body, Compatibility};
use crate::epoch::SourcePartition;
use crate::model::{id_key, FeatureEvent, FeatureVector, IdList, ProfileEvent, ReadPosition};

/// The read position of a restored event: before any message's.
const RESTORED: ReadPosition = (i32::MIN, i64::MIN);

/// A complete, compatible checkpoint, decoded.
#[derive(Debug)]
pub struct Restore {
    /// The checkpoint's time: it holds every epoch before it.
    pub time: u64,
    /// The number of workers that wrote it.
    pub peers: u32,
    /// Where reading resumes for every partition any of its workers read.
    pub offsets: BTreeMap<SourcePartition, i64>,
    bodies: Vec<Body>,
    dim: usize,
}

/// The newest complete checkpoint in `dir` that a run with `expected` can use, or `None` (with
/// the reasons logged) for a full replay.
pub fn find(dir: &CheckpointDir, expected: &Compatibility) -> Option<Restore> {
    let (found, problems) = match dir.newest_complete() {
        Ok(found) => found,
        Err(error) => {
            tracing::warn!(%error, "cannot read the checkpoint directory: replaying in full");
            return None;
        }
    };
    log_problems(&problems);
    let Some(checkpoint) = found else {
        tracing::info!(
            dir = %dir.root().display(),
            "no complete checkpoint: replaying every partition up to the committed offsets"
        );
        return None;
    };
    let time = checkpoint.epoch;
    match decode(checkpoint.payloads, expected) {
        Ok((offsets, bodies)) => Some(Restore {
            time,
            peers: checkpoint.peers,
            offsets,
            bodies,
            dim: expected.dim as usize,
        }),
        Err(why) => {
            tracing::warn!(
                time,
                reason = %why,
                "the newest checkpoint cannot be used: replaying every partition up to the committed offsets"
            );
            None
        }
    }
}

/// Every part's offsets and body, or why the checkpoint cannot be used.
fn decode(
    payloads: Vec<Vec<u8>>,
    expected: &Compatibility,
) -> Result<(BTreeMap<SourcePartition, i64>, Vec<Body>), String> {
    let mut offsets = BTreeMap::new();
    let mut bodies = Vec::with_capacity(payloads.len());
    for (worker, payload) in payloads.iter().enumerate() {
        let (head, rest) =
            decode_head(payload).map_err(|error| format!("worker {worker}'s file: {error}"))?;
        if let Some(why) = head.mismatch(expected) {
            return Err(why);
        }
        offsets.extend(head.positions());
        let body = decode_body(rest, expected.dim as usize)
            .map_err(|error| format!("worker {worker}'s file: {error}"))?;
        bodies.push(body);
    }
    Ok((offsets, bodies))
}

fn log_problems(problems: &[Unusable]) {
    for problem in problems {
        tracing::warn!(%problem, "checkpoint skipped");
    }
}

impl Restore {
    /// The events worker `index` of `peers` sends: the profiles and features of the parts `j`
    /// with `j mod peers = index`. Moves those parts out: each is sent once.
    pub fn take_events(
        &mut self,
        index: usize,
        peers: usize,
    ) -> (Vec<ProfileEvent>, Vec<FeatureEvent>) {
        let mut profiles = Vec::new();
        let mut features = Vec::new();
        for part in (index..self.bodies.len()).step_by(peers.max(1)) {
            let body = std::mem::take(&mut self.bodies[part]);
            profiles.reserve(body.user_ids.len());
            for (user, user_id) in body.user_ids.iter().enumerate() {
                let history = body.history(user);
                profiles.push(ProfileEvent {
                    user_id: user_id.to_owned(),
                    user_key: id_key(user_id),
                    timestamp: body.timestamps[user],
                    history_items: IdList::from_ids(
                        history.iter().map(|&item| body.items.get(item as usize)),
                    ),
                    position: RESTORED,
                });
            }
            for (item, item_id) in body.feature_items.iter().enumerate() {
                let bits = &body.features[item * self.dim..][..self.dim];
                // The writer stored only vectors the decoder had accepted.
                let Some(vector) = FeatureVector::from_bits(bits) else {
                    tracing::warn!(
                        item_id,
                        "a checkpointed feature vector is out of bounds; skipped"
                    );
                    continue;
                };
                features.push(FeatureEvent {
                    item_id: item_id.to_owned(),
                    features: Some(vector),
                    position: RESTORED,
                });
            }
        }
        (profiles, features)
    }
}
