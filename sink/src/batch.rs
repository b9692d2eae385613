//! Batching by count and bytes, straight into the wire format.
//!
//! A batch is one `EVALSHA <sha> N key1..keyN ts1 epoch1 value1 .. tsN epochN valueN` command.
//! Records are encoded into RESP as they arrive, so a sealed batch is the exact byte string sent
//! to Redis (and resent unchanged on a retry): no per-argument allocation as with `redis::Cmd`,
//! and the byte limit measures what actually goes over the wire.

use crate::encode::{check, encode_profile_into, estimated_len, EncodedProfile, ProfileRecord};
use crate::SinkError;

/// A sealed batch: the packed command and what it holds.
pub(crate) struct Batch {
    /// The complete RESP command.
    pub(crate) packed: Vec<u8>,
    /// Number of records (keys) in it.
    pub(crate) records: usize,
}

/// Accumulates records into batches of at most `max_records` records and, unless a single
/// record is larger, at most `max_bytes` bytes.
pub(crate) struct Batcher {
    max_records: usize,
    max_bytes: usize,
    sha: String,
    /// RESP bulk strings of the keys of the open batch.
    keys: Vec<u8>,
    /// RESP bulk strings of (timestamp, epoch, value) of the open batch.
    args: Vec<u8>,
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
            keys: Vec::new(),
            args: Vec::new(),
            records: 0,
            value: Vec::new(),
        }
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
        let piece = bulk_len(key_len)
            + bulk_len(decimal_len(timestamp))
            + bulk_len(decimal_len(epoch))
            + bulk_len(value.len());
        let full = self.records >= self.max_records
            || (self.records > 0 && self.payload_len() + piece > self.max_bytes);
        let sealed = if full { self.seal() } else { None };

        // The key, `user_profile:{user_id}`, framed without building it as a String first.
        push_bulk_parts(
            &mut self.keys,
            &[profile::REDIS_KEY_PREFIX.as_bytes(), user_id.as_bytes()],
        );
        push_bulk_decimal(&mut self.args, timestamp);
        push_bulk_decimal(&mut self.args, epoch);
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
        push_array_header(&mut packed, 3 + 4 * n);
        push_bulk(&mut packed, b"EVALSHA");
        push_bulk(&mut packed, self.sha.as_bytes());
        push_bulk_decimal(&mut packed, n);
        packed.extend_from_slice(&self.keys);
        packed.extend_from_slice(&self.args);
        self.keys.clear();
        self.args.clear();
        self.records = 0;
        Some(Batch {
            packed,
            records: n as usize,
        })
    }

    /// Drops the open batch (after a failed write, so the next write starts clean).
    pub(crate) fn clear(&mut self) {
        self.keys.clear();
        self.args.clear();
        self.records = 0;
    }

    fn payload_len(&self) -> usize {
        self.keys.len() + self.args.len()
    }
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
