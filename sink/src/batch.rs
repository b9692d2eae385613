//! Batching by count and bytes, straight into the wire format.
//!
//! A checked batch is one `EVALSHA <sha> N key1..keyN ts1 epoch1 value1 .. tsN epochN valueN`
//! command, the write script's no-regression check; a plain batch is one
//! `MSET key1 value1 .. keyN valueN`, for when no older value can reach Redis after this one (see
//! [`WriteMode`]). Records are encoded into RESP as they arrive, so a sealed batch is the exact
//! byte string sent to Redis: no per-argument allocation as with `redis::Cmd`, and the byte limit
//! measures what actually goes over the wire. A plain batch keeps where each record lies in it,
//! so that a retry can resend it as a checked batch ([`Batch::make_checked`]) without encoding
//! anything again.
//!
//! The write-safety rules, as one state machine: docs/architecture.md#write-safety.

use crate::encode::{check, encode_profile_into, estimated_len, EncodedProfile, ProfileRecord};
use crate::{SinkError, WriteMode};

/// A sealed batch: the packed command and what it holds.
pub(crate) struct Batch {
    /// The complete RESP command.
    pub(crate) packed: Vec<u8>,
    /// Number of records (keys) in it.
    pub(crate) records: usize,
    /// For a plain batch (`MSET`), each record's place and version; empty for a checked one.
    plain: Vec<PlainRecord>,
}

/// Where one record of a plain batch lies in its `packed` command, and its version, which the
/// checked form of the batch needs.
#[derive(Debug, Clone, Copy)]
struct PlainRecord {
    /// Start of the key's RESP bulk string; the value's follows it at `value_at`.
    key_at: usize,
    value_at: usize,
    timestamp: u64,
    epoch: u64,
}

impl Batch {
    /// Whether this is a plain `MSET`, whose reply is `OK` rather than a skip count.
    pub(crate) fn is_plain(&self) -> bool {
        !self.plain.is_empty()
    }

    /// Turns a plain batch into the checked one with the same records (the same bytes as if
    /// it had been built checked); a checked batch stays as it is. A batch is resent checked
    /// after a failure: by then a later batch may have reached Redis, and this one must not
    /// undo it.
    pub(crate) fn make_checked(&mut self, sha: &str) {
        if self.plain.is_empty() {
            return;
        }
        let n = self.records as u64;
        let plain = std::mem::take(&mut self.plain);
        let mut packed = Vec::with_capacity(self.packed.len() + 96 + 24 * plain.len());
        push_checked_header(&mut packed, sha, n);
        for record in &plain {
            packed.extend_from_slice(&self.packed[record.key_at..record.value_at]);
        }
        let value_ends = plain
            .iter()
            .skip(1)
            .map(|next| next.key_at)
            .chain([self.packed.len()]);
        for (record, value_end) in plain.iter().zip(value_ends) {
            push_bulk_decimal(&mut packed, record.timestamp);
            push_bulk_decimal(&mut packed, record.epoch);
            packed.extend_from_slice(&self.packed[record.value_at..value_end]);
        }
        self.packed = packed;
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
    /// Checked: RESP bulk strings of the keys of the open batch.
    keys: Vec<u8>,
    /// Checked: RESP bulk strings of (timestamp, epoch, value) of the open batch. Plain: the
    /// (key, value) pairs.
    args: Vec<u8>,
    /// Plain: each record's place in `args` (until sealed) and version.
    plain: Vec<PlainRecord>,
    records: usize,
    /// Scratch buffer for one JSON value, reused across records.
    value: Vec<u8>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("records", &self.records)
            .field("bytes", &self.packed.len())
            .finish()
    }
}

/// What pushing one record did.
#[derive(Debug)]
pub(crate) struct Pushed {
    /// The batch that the record closed, if any (the record itself opens the next batch).
    pub(crate) sealed: Option<Batch>,
    /// Non-finite floats written as 0.0.
    pub(crate) non_finite: usize,
}

// Not derived: the buffers can hold a megabyte of RESP.
impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("max_records", &self.max_records)
            .field("max_bytes", &self.max_bytes)
            .field("mode", &self.mode)
            .field("open_records", &self.records)
            .field("open_bytes", &self.payload_len())
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
            keys: Vec::new(),
            args: Vec::new(),
            plain: Vec::new(),
            records: 0,
            value: Vec::new(),
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
    /// [`check`]).
    pub(crate) fn push<S: AsRef<str>>(
        &mut self,
        record: &ProfileRecord<'_, S>,
    ) -> Result<Pushed, SinkError> {
        check(record)?;
        let mut value = std::mem::take(&mut self.value);
        value.clear();
        value.reserve(estimated_len(record));
        let non_finite = encode_profile_into(record, &mut value);
        let sealed = self.push_value(record.user_id, record.timestamp, record.epoch, &value);
        self.value = value;
        Ok(Pushed { sealed, non_finite })
    }

    /// Adds a profile encoded beforehand (already checked when it was encoded).
    pub(crate) fn push_encoded(&mut self, profile: &EncodedProfile) -> Result<Pushed, SinkError> {
        let sealed = self.push_value(
            profile.user_id(),
            profile.timestamp(),
            profile.epoch(),
            profile.value().as_bytes(),
        );
        Ok(Pushed {
            sealed,
            non_finite: profile.non_finite(),
        })
    }

    /// Adds one key's arguments. The open batch is sealed first when it already holds
    /// `max_records` records or when this record would take it past `max_bytes`; sealing before
    /// adding (not after) means one push seals at most one batch.
    fn push_value(
        &mut self,
        user_id: &str,
        timestamp: u64,
        epoch: u64,
        value: &[u8],
    ) -> Option<Batch> {
        let key_len = profile::REDIS_KEY_PREFIX.len() + user_id.len();
        let mut piece = bulk_len(key_len) + bulk_len(value.len());
        if self.mode == WriteMode::Checked {
            piece += bulk_len(decimal_len(timestamp)) + bulk_len(decimal_len(epoch));
        }
        let full = self.records >= self.max_records
            || (self.records > 0 && self.payload_len() + piece > self.max_bytes);
        let sealed = if full { self.seal() } else { None };

        // The key, `user_profile:{user_id}`, framed without building it as a String first.
        let key = [profile::REDIS_KEY_PREFIX.as_bytes(), user_id.as_bytes()];
        match self.mode {
            WriteMode::Checked => {
                push_bulk_parts(&mut self.keys, &key);
                push_bulk_decimal(&mut self.args, timestamp);
                push_bulk_decimal(&mut self.args, epoch);
            }
            WriteMode::Plain => {
                let key_at = self.args.len();
                push_bulk_parts(&mut self.args, &key);
                self.plain.push(PlainRecord {
                    key_at,
                    value_at: self.args.len(),
                    timestamp,
                    epoch,
                });
            }
        }
        push_bulk(&mut self.args, value);
        self.records += 1;
        sealed
    }

    /// Seals the open batch, if it holds anything. The buffers keep their capacity for the
    /// next batch.
    pub(crate) fn seal(&mut self) -> Option<Batch> {
        if self.records == 0 {
            return None;
        }
        let n = self.records as u64;
        let mut packed = Vec::with_capacity(96 + self.payload_len());
        let mut plain = Vec::new();
        match self.mode {
            WriteMode::Checked => {
                push_checked_header(&mut packed, &self.sha, n);
                packed.extend_from_slice(&self.keys);
            }
            WriteMode::Plain => {
                push_array_header(&mut packed, 1 + 2 * n);
                push_bulk(&mut packed, b"MSET");
                let offset = packed.len();
                plain = std::mem::take(&mut self.plain);
                for record in &mut plain {
                    record.key_at += offset;
                    record.value_at += offset;
                }
            }
        }
        packed.extend_from_slice(&self.args);
        self.clear();
        Some(Batch {
            packed,
            records: n as usize,
            plain,
        })
    }

    /// Drops the open batch (after a failed write, so the next write starts clean).
    pub(crate) fn clear(&mut self) {
        self.keys.clear();
        self.args.clear();
        self.plain.clear();
        self.records = 0;
    }

    fn payload_len(&self) -> usize {
        self.keys.len() + self.args.len()
    }
}

/// `EVALSHA <sha> <n>`, the head of a checked batch of `n` records.
fn push_checked_header(out: &mut Vec<u8>, sha: &str, n: u64) {
    push_array_header(out, 3 + 4 * n);
    push_bulk(out, b"EVALSHA");
    push_bulk(out, sha.as_bytes());
    push_bulk_decimal(out, n);
}

fn push_array_header(out: &mut Vec<u8>, len: u64) {
    out.push(b'*');
    push_decimal(out, len);
    out.extend_from_slice(b"\r\n");
}

fn push_bulk(out: &mut Vec<u8>, data: &[u8]) {
    push_bulk_parts(out, &[data]);
}

/// One RESP bulk string holding `parts` one after the other.
fn push_bulk_parts(out: &mut Vec<u8>, parts: &[&[u8]]) {
    out.push(b'$');
    push_decimal(out, parts.iter().map(|part| part.len() as u64).sum());
    out.extend_from_slice(b"\r\n");
    for part in parts {
        out.extend_from_slice(part);
    }
    out.extend_from_slice(b"\r\n");
}

fn push_bulk_decimal(out: &mut Vec<u8>, n: u64) {
    out.push(b'$');
    push_decimal(out, decimal_len(n) as u64);
    out.extend_from_slice(b"\r\n");
    push_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Size of a RESP bulk string holding `len` bytes: `$<len>\r\n<data>\r\n`.
fn bulk_len(len: usize) -> usize {
    1 + decimal_len(len as u64) + 2 + len + 2
}

fn decimal_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
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
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
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
