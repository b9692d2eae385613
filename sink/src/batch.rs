//! Batching by count and bytes into the commands sent to Redis, packed by the redis crate.
//!
//! A checked batch is one `EVALSHA <sha> N key1..keyN ts1 epoch1 value1 .. tsN epochN valueN`
//! command, the write script's no-regression check; a plain batch is one
//! `MSET key1 value1 .. keyN valueN`, for when no older value can reach Redis after this one (see
//! [`WriteMode`]). The open batch holds its encoded profiles; sealing packs them with
//! `redis::Cmd`, so a sealed batch is the exact byte string sent to Redis and the byte limit
//! measures what goes over the wire. A plain batch keeps its profiles, so that a retry can resend
//! it as a checked batch ([`Batch::make_checked`]) without encoding anything again.
//!
//! The write-safety rules, as one state machine: docs/architecture.md#write-safety.

use redis::{Cmd, RedisWrite, ToRedisArgs};

use crate::encode::{EncodedProfile, ProfileRecord};
use crate::{SinkError, WriteMode};

/// A sealed batch: the packed command and what it holds.
pub(crate) struct Batch {
    /// The complete RESP command (for a batch sent after `ASKING`, both commands).
    pub(crate) packed: Vec<u8>,
    /// Number of records (keys) in it.
    pub(crate) records: usize,
    /// Its profiles, kept where they may be needed again: the checked form of a plain batch,
    /// and on a cluster the resend of a record whose key moved. Empty otherwise.
    pub(crate) profiles: Vec<EncodedProfile>,
    /// Whether this is a plain `MSET`, whose reply is `OK` rather than a skip count; on a
    /// cluster, a pipeline of `SET`s, one `OK` (or redirect) a record.
    plain: bool,
    /// Whether this is a cluster batch (the script's cluster form; profiles kept).
    pub(crate) cluster: bool,
    /// Cluster only: sent after `ASKING`, whose `OK` is its first reply.
    pub(crate) asking: bool,
    /// Cluster only: one record whose key the command declares, so that Redis answers a key
    /// that left the node with `MOVED` or `ASK` instead of running the script.
    pub(crate) declared: bool,
}

impl Batch {
    /// Whether this is a plain `MSET`, whose reply is `OK` rather than a skip count.
    pub(crate) fn is_plain(&self) -> bool {
        self.plain
    }

    /// Turns a plain batch into the checked one with the same records (the same bytes as if
    /// it had been built checked); a checked batch stays as it is. A batch is resent checked
    /// after a failure: by then a later batch may have reached Redis, and this one must not
    /// undo it.
    pub(crate) fn make_checked(&mut self, sha: &str) {
        if !self.plain {
            return;
        }
        self.plain = false;
        if self.cluster {
            // A cluster batch keeps its profiles, for a record that moved.
            self.packed = cluster_command(sha, &self.profiles).get_packed_command();
            return;
        }
        let plain = std::mem::take(&mut self.profiles);
        self.packed = checked_command(sha, &plain).get_packed_command();
    }

    /// Cluster: one record through the write script with its key declared, after `ASKING`
    /// when `asking` (see [`declared`](Self::declared)).
    pub(crate) fn single(sha: &str, profile: EncodedProfile, asking: bool) -> Self {
        let mut packed = if asking {
            redis::cmd("ASKING").get_packed_command()
        } else {
            Vec::new()
        };
        checked_command(sha, std::slice::from_ref(&profile)).write_packed_command(&mut packed);
        Self {
            packed,
            records: 1,
            profiles: vec![profile],
            plain: false,
            cluster: true,
            asking,
            declared: true,
        }
    }
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("records", &self.records)
            .field("bytes", &self.packed.len())
            .finish()
    }
}

/// Accumulates records into batches of at most `max_records` records and, unless a single
/// record is larger, at most `max_bytes` bytes.
pub(crate) struct Batcher {
    max_records: usize,
    max_bytes: usize,
    sha: String,
    /// Whether the open batch is checked or plain.
    mode: WriteMode,
    /// Whether batches take the cluster form: keys in ARGV, profiles kept (see `cluster.rs`).
    cluster: bool,
    /// The open batch's profiles.
    open: Vec<EncodedProfile>,
    /// Wire size of the open batch's arguments after the command's head.
    open_bytes: usize,
}

/// What pushing one record did.
#[derive(Debug)]
pub(crate) struct Pushed {
    /// The batch that the record closed, if any (the record itself opens the next batch).
    pub(crate) sealed: Option<Batch>,
    /// Non-finite floats written as 0.0.
    pub(crate) non_finite: usize,
}

// Not derived: the open batch can hold a megabyte of values.
impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("max_records", &self.max_records)
            .field("max_bytes", &self.max_bytes)
            .field("mode", &self.mode)
            .field("open_records", &self.open.len())
            .field("open_bytes", &self.open_bytes)
            .finish_non_exhaustive()
    }
}

impl Batcher {
    pub(crate) fn new(max_records: usize, max_bytes: usize, sha: &str) -> Self {
        Self {
            max_records,
            max_bytes,
            sha: sha.to_owned(),
            mode: WriteMode::Checked,
            cluster: false,
            open: Vec::new(),
            open_bytes: 0,
        }
    }

    /// A batcher of one cluster node: checked batches take the cluster form of the script (keys
    /// in ARGV, so that one batch can hold keys of many slots), plain ones are pipelines of
    /// `SET`s (an `MSET` may not span slots), and both keep their profiles for a resend
    /// elsewhere.
    pub(crate) fn cluster(max_records: usize, max_bytes: usize, sha: &str) -> Self {
        Self {
            cluster: true,
            ..Self::new(max_records, max_bytes, sha)
        }
    }

    /// Sets how the next records are written, sealing the open batch first if the mode changes.
    pub(crate) fn set_mode(&mut self, mode: WriteMode) -> Option<Batch> {
        if mode == self.mode {
            return None;
        }
        let sealed = self.seal();
        self.mode = mode;
        sealed
    }

    /// Encodes and adds a record; refuses one the script could not compare (see
    /// [`EncodedProfile::encode`]).
    pub(crate) fn push<S: AsRef<str>>(
        &mut self,
        record: &ProfileRecord<'_, S>,
    ) -> Result<Pushed, SinkError> {
        let profile = EncodedProfile::encode(record)?;
        let non_finite = profile.non_finite();
        let sealed = self.push_owned(profile);
        Ok(Pushed { sealed, non_finite })
    }

    /// Adds a profile encoded beforehand (already checked when it was encoded).
    pub(crate) fn push_encoded(&mut self, profile: &EncodedProfile) -> Result<Pushed, SinkError> {
        Ok(Pushed {
            sealed: self.push_owned(profile.clone()),
            non_finite: profile.non_finite(),
        })
    }

    /// Adds one profile. The open batch is sealed first when it already holds `max_records`
    /// records or when this one would take it past `max_bytes`; sealing before adding (not
    /// after) means one push seals at most one batch.
    pub(crate) fn push_owned(&mut self, profile: EncodedProfile) -> Option<Batch> {
        let key_len = profile.key_kind().prefix().len() + profile.user_id().len();
        let mut piece = arg_len(key_len) + arg_len(profile.value().len());
        if self.mode == WriteMode::Checked {
            piece +=
                arg_len(decimal_len(profile.timestamp())) + arg_len(decimal_len(profile.epoch()));
        }
        let full = self.open.len() >= self.max_records
            || (!self.open.is_empty() && self.open_bytes + piece > self.max_bytes);
        let sealed = if full { self.seal() } else { None };
        self.open.push(profile);
        self.open_bytes += piece;
        sealed
    }

    /// Seals the open batch, if it holds anything.
    pub(crate) fn seal(&mut self) -> Option<Batch> {
        if self.open.is_empty() {
            return None;
        }
        let records = self.open.len();
        let (packed, profiles) = match self.mode {
            WriteMode::Checked if self.cluster => {
                let packed = cluster_command(&self.sha, &self.open).get_packed_command();
                (packed, std::mem::take(&mut self.open))
            }
            WriteMode::Plain if self.cluster => {
                let mut sets = redis::pipe();
                for profile in &self.open {
                    sets.cmd("SET")
                        .arg(ProfileKey(profile.key_kind().prefix(), profile.user_id()))
                        .arg(profile.value());
                }
                (sets.get_packed_pipeline(), std::mem::take(&mut self.open))
            }
            WriteMode::Checked => {
                let packed = checked_command(&self.sha, &self.open).get_packed_command();
                self.open.clear();
                (packed, Vec::new())
            }
            WriteMode::Plain => {
                let mut mset = redis::cmd("MSET");
                for profile in &self.open {
                    mset.arg(ProfileKey(profile.key_kind().prefix(), profile.user_id()))
                        .arg(profile.value());
                }
                (mset.get_packed_command(), std::mem::take(&mut self.open))
            }
        };
        self.open_bytes = 0;
        Some(Batch {
            packed,
            records,
            profiles,
            plain: self.mode == WriteMode::Plain,
            cluster: self.cluster,
            asking: false,
            declared: false,
        })
    }

    /// Drops the open batch (after a failed write, so the next write starts clean).
    pub(crate) fn clear(&mut self) {
        self.open.clear();
        self.open_bytes = 0;
    }
}

/// `EVALSHA <sha> <n> keys.. (timestamp epoch value)..`: the write script over `profiles`.
fn checked_command(sha: &str, profiles: &[EncodedProfile]) -> Cmd {
    script_command(sha, profiles, false)
}

/// `EVALSHA <sha> 0 <n> keys.. (timestamp epoch value)..`: the cluster form of the write
/// script, which declares no key (see `cluster.rs`).
fn cluster_command(sha: &str, profiles: &[EncodedProfile]) -> Cmd {
    script_command(sha, profiles, true)
}

/// The write script over `profiles`, its keys declared (`<n> keys..`) or, on a cluster, passed
/// first in ARGV (`0 <n> keys..`).
fn script_command(sha: &str, profiles: &[EncodedProfile], keys_in_argv: bool) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(sha);
    if keys_in_argv {
        cmd.arg(0);
    }
    cmd.arg(profiles.len());
    for profile in profiles {
        cmd.arg(ProfileKey(profile.key_kind().prefix(), profile.user_id()));
    }
    for profile in profiles {
        cmd.arg(profile.timestamp())
            .arg(profile.epoch())
            .arg(profile.value());
    }
    cmd
}

/// A record's key, its kind's prefix and the user id (`user_profile:{user_id}`), written into
/// the command without building it as a `String` first.
struct ProfileKey<'a>(&'static str, &'a str);

impl ToRedisArgs for ProfileKey<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // Writing into the command's own buffer cannot fail.
        let _ = arg.write_all(self.0.as_bytes());
        let _ = arg.write_all(self.1.as_bytes());
    }
}

/// Wire size of a RESP bulk string of `len` bytes: `$<len>\r\n<data>\r\n`.
fn arg_len(len: usize) -> usize {
    1 + decimal_len(len as u64) + 2 + len + 2
}

fn decimal_len(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |digits| digits as usize + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(user: &'a str, items: &'a [&'a str], v: &'a [f32]) -> ProfileRecord<'a> {
        ProfileRecord {
            user_id: user,
            timestamp: 1_456_923_842,
            history_items: items,
            interest_vector: v,
            known_items: 1,
            epoch: 17,
        }
    }

    #[test]
    fn packed_batch_is_what_redis_cmd_would_send() {
        let sha = "0123456789012345678901234567890123456789";
        let mut b = Batcher::new(10, 1 << 20, sha);
        let users = ["a", "bé\"\\", ""];
        let mut expected = redis::cmd("EVALSHA");
        expected.arg(sha).arg(users.len());
        for u in users {
            assert!(b
                .push(&record(u, &["i1", "i2"], &[0.5, 1.0]))
                .unwrap()
                .sealed
                .is_none());
            expected.arg(profile::redis_key(u));
        }
        for u in users {
            let r = record(u, &["i1", "i2"], &[0.5, 1.0]);
            expected
                .arg(r.timestamp)
                .arg(r.epoch)
                .arg(crate::encode_profile(&r));
        }
        let batch = b.seal().unwrap();
        assert_eq!(batch.records, 3);
        assert_eq!(
            String::from_utf8_lossy(&batch.packed),
            String::from_utf8_lossy(&expected.get_packed_command())
        );
        assert!(b.seal().is_none());
    }

    #[test]
    fn encoded_profiles_pack_like_records() {
        let users = ["a", "bé\"\\", "0196"];
        let items = ["i1", "i\n2"];
        let records: Vec<_> = users
            .iter()
            .map(|u| record(u, &items, &[0.5, f32::NAN]))
            .collect();
        let mut from_records = Batcher::new(2, 1 << 20, "x");
        let mut from_encoded = Batcher::new(2, 1 << 20, "x");
        let mut packed = (Vec::new(), Vec::new());
        for r in &records {
            let a = from_records.push(r).unwrap();
            let b = from_encoded
                .push_encoded(&EncodedProfile::encode(r).unwrap())
                .unwrap();
            assert_eq!(a.non_finite, 1);
            assert_eq!(b.non_finite, 1);
            packed.0.extend(a.sealed.map(|b| b.packed));
            packed.1.extend(b.sealed.map(|b| b.packed));
        }
        packed.0.extend(from_records.seal().map(|b| b.packed));
        packed.1.extend(from_encoded.seal().map(|b| b.packed));
        assert_eq!(packed.0.len(), 2);
        assert_eq!(packed.0, packed.1);
    }

    #[test]
    fn plain_batch_is_what_an_mset_would_send() {
        let mut b = Batcher::new(10, 1 << 20, "x");
        assert!(
            b.set_mode(WriteMode::Plain).is_none(),
            "nothing open to seal"
        );
        let users = ["a", "bé\"\\", ""];
        let mut expected = redis::cmd("MSET");
        for u in users {
            let r = record(u, &["i1"], &[0.5]);
            assert!(b.push(&r).unwrap().sealed.is_none());
            expected
                .arg(profile::redis_key(u))
                .arg(crate::encode_profile(&r));
        }
        let batch = b.seal().unwrap();
        assert!(batch.is_plain());
        assert_eq!(batch.records, 3);
        assert_eq!(
            String::from_utf8_lossy(&batch.packed),
            String::from_utf8_lossy(&expected.get_packed_command())
        );
    }

    #[test]
    fn a_plain_batch_made_checked_is_the_checked_batch() {
        let users: Vec<String> = (0..7).map(|i| format!("user-{i}")).collect();
        let items = ["i1", "i2"];
        let build = |mode| {
            let mut b = Batcher::new(3, 1 << 20, "sha");
            b.set_mode(mode);
            let mut batches = Vec::new();
            for (i, u) in users.iter().enumerate() {
                let vector = [0.25, i as f32];
                let mut r = record(u, &items, &vector);
                r.timestamp += i as u64;
                r.epoch += 10 * i as u64;
                batches.extend(b.push(&r).unwrap().sealed);
            }
            batches.extend(b.seal());
            batches
        };
        let checked = build(WriteMode::Checked);
        let mut plain = build(WriteMode::Plain);
        assert_eq!(plain.len(), 3);
        for (plain, checked) in plain.iter_mut().zip(&checked) {
            assert!(plain.is_plain() && !checked.is_plain());
            plain.make_checked("sha");
            assert!(!plain.is_plain());
            assert_eq!(plain.records, checked.records);
            assert_eq!(
                String::from_utf8_lossy(&plain.packed),
                String::from_utf8_lossy(&checked.packed)
            );
            // A second conversion changes nothing.
            let before = plain.packed.clone();
            plain.make_checked("sha");
            assert_eq!(plain.packed, before);
        }
    }

    #[test]
    fn changing_mode_seals_the_open_batch() {
        let mut b = Batcher::new(10, 1 << 20, "x");
        b.push(&record("u", &[], &[])).unwrap();
        let sealed = b.set_mode(WriteMode::Plain).unwrap();
        assert!(!sealed.is_plain());
        assert!(b.set_mode(WriteMode::Plain).is_none());
        b.push(&record("u", &[], &[])).unwrap();
        assert!(b.seal().unwrap().is_plain());
    }

    #[test]
    fn decimals() {
        for n in [0u64, 9, 10, 99, 100, 12345, u64::MAX] {
            assert_eq!(decimal_len(n), n.to_string().len());
        }
    }

    #[test]
    fn count_limit() {
        let mut b = Batcher::new(3, 1 << 20, "x");
        let mut sealed: Vec<usize> = (0..10)
            .filter_map(|_| b.push(&record("u", &[], &[])).unwrap().sealed)
            .map(|b| b.records)
            .collect();
        sealed.extend(b.seal().map(|b| b.records));
        assert_eq!(sealed, [3, 3, 3, 1]);
    }

    #[test]
    fn byte_limit_and_oversized_record() {
        let items = ["0123456789"; 50];
        // Each record is ~800 bytes on the wire; 2000 bytes fit two of them.
        let mut b = Batcher::new(100, 2000, "x");
        let mut sizes = Vec::new();
        for _ in 0..5 {
            if let Some(s) = b.push(&record("u", &items, &[0.25; 8])).unwrap().sealed {
                sizes.push(s.records);
            }
        }
        sizes.extend(b.seal().map(|s| s.records));
        assert_eq!(sizes, [2, 2, 1]);

        // A limit below one record: every record goes alone, none is refused.
        let mut b = Batcher::new(100, 10, "x");
        let mut n = 0;
        for _ in 0..4 {
            n += b
                .push(&record("u", &items, &[]))
                .unwrap()
                .sealed
                .map_or(0, |s| s.records);
        }
        n += b.seal().map_or(0, |s| s.records);
        assert_eq!(n, 4);
    }
}
