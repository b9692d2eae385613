//! Checkpoint files: the bytes of a checkpoint kept safe. What goes in a payload is
//! `payload.rs`'s, when one is taken `take.rs`'s; this module gives a versioned format with a
//! checksum, an atomic write, pruning, and finding the newest checkpoint that every worker
//! completed. A checkpoint is named by its `epoch`: the state of every epoch before it.
//!
//! Layout under the checkpoint directory:
//!
//! ```text
//! epoch-<epoch, 20 digits>/worker-<index>-of-<peers>.ckpt
//! ```
//!
//! A file is a header, then the payload:
//!
//! ```text
//! magic "SRECCKPT" | version u32 | epoch u64 | worker u32 | peers u32 | payload length u64 | xxh3-64 of the payload u64
//! ```
//!
//! (little-endian). It is written under a temporary name in the same directory, synced, renamed
//! and the directory synced, so a crash mid-write leaves at worst a temporary file, never a
//! partial file under a final name. An epoch is a checkpoint only when the file of every worker
//! `0..peers` is there and valid; anything else is reported ([`Unusable`]) and skipped, so a
//! restart falls back to an older checkpoint or to a full replay, never to a wrong state.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

/// The format this build writes and reads. A file of another version is [`Unusable`].
pub const FORMAT_VERSION: u32 = 1;

const MAGIC: &[u8; 8] = b"SRECCKPT";
const HEADER_LEN: usize = 8 + 4 + 8 + 4 + 4 + 8 + 8;

/// Why the checkpoint directory could not be used at all.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint directory {}: {source}", path.display())]
pub struct CheckpointError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError {
        path: path.to_owned(),
        source,
    }
}

/// Why a file (or an epoch's set of files) on disk is not a usable checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("{}: cannot be read: {error}", path.display())]
    Unreadable { path: PathBuf, error: String },
    #[error("{}: truncated ({len} bytes, {expected} expected)", path.display())]
    Truncated {
        path: PathBuf,
        len: usize,
        expected: usize,
    },
    #[error("{}: not a streamrec checkpoint (bad magic)", path.display())]
    NotACheckpoint { path: PathBuf },
    #[error("{}: format version {found}, this build reads {FORMAT_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("{}: checksum mismatch (corrupt payload)", path.display())]
    Checksum { path: PathBuf },
    #[error("{}: header says {what}, its name says otherwise", path.display())]
    Misnamed { path: PathBuf, what: String },
    #[error("epoch {epoch}: no valid file of worker {worker} of {peers}")]
    Incomplete { epoch: u64, worker: u32, peers: u32 },
}

/// A complete checkpoint: every worker's payload of one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub epoch: u64,
    /// The number of workers that wrote it (a restart may have another number).
    pub peers: u32,
    /// Worker `i`'s payload at index `i`.
    pub payloads: Vec<Vec<u8>>,
}

/// The checkpoint directory.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    root: PathBuf,
}

impl CheckpointDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn epoch_dir(&self, epoch: u64) -> PathBuf {
        self.root.join(format!("epoch-{epoch:020}"))
    }

    fn file_name(worker: u32, peers: u32) -> String {
        format!("worker-{worker}-of-{peers}.ckpt")
    }

    /// Writes worker `worker` of `peers`'s `payload` for `epoch`, atomically (see the module
    /// documentation), and returns its path.
    pub fn write(
        &self,
        epoch: u64,
        worker: u32,
        peers: u32,
        payload: &[u8],
    ) -> Result<PathBuf, CheckpointError> {
        self.write_with(epoch, worker, peers, |out| out.write_all(payload))
    }

    /// Like [`write`](Self::write), with the payload written by `fill` straight to the file,
    /// so that a large state is never held encoded in memory as well: the header's length and
    /// checksum are computed on the way and written last, over a placeholder.
    pub fn write_with(
        &self,
        epoch: u64,
        worker: u32,
        peers: u32,
        fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<PathBuf, CheckpointError> {
        let dir = self.epoch_dir(epoch);
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        let name = Self::file_name(worker, peers);
        let path = dir.join(&name);
        let temporary = dir.join(format!(".{name}.tmp"));
        let write = || -> io::Result<()> {
            let mut file = File::create(&temporary)?;
            file.write_all(&[0; HEADER_LEN])?;
            let mut out = Hashing {
                inner: io::BufWriter::with_capacity(1 << 20, &mut file),
                hasher: xxhash_rust::xxh3::Xxh3::new(),
                len: 0,
            };
            fill(&mut out)?;
            out.inner.flush()?;
            let (len, checksum) = (out.len, out.hasher.digest());
            drop(out);
            let mut header = Vec::with_capacity(HEADER_LEN);
            header.extend_from_slice(MAGIC);
            header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            header.extend_from_slice(&epoch.to_le_bytes());
            header.extend_from_slice(&worker.to_le_bytes());
            header.extend_from_slice(&peers.to_le_bytes());
            header.extend_from_slice(&len.to_le_bytes());
            header.extend_from_slice(&checksum.to_le_bytes());
            file.seek(io::SeekFrom::Start(0))?;
            file.write_all(&header)?;
            file.sync_all()
        };
        write().map_err(io_error(&temporary))?;
        fs::rename(&temporary, &path).map_err(io_error(&path))?;
        // The rename is durable only once the directory is.
        File::open(&dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error(&dir))?;
        Ok(path)
    }

    /// The epochs that have a directory, newest first.
    fn epochs(&self) -> Result<Vec<u64>, CheckpointError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(io_error(&self.root)(error)),
        };
        let mut epochs: Vec<u64> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error(&self.root))?;
            let name = entry.file_name();
            if let Some(epoch) = name
                .to_str()
                .and_then(|name| name.strip_prefix("epoch-"))
                .and_then(|digits| digits.parse().ok())
            {
                epochs.push(epoch);
            }
        }
        epochs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(epochs)
    }

    /// The newest epoch whose files form a complete checkpoint, with what was wrong with every
    /// newer one (to log); `None` when there is none.
    pub fn newest_complete(&self) -> Result<(Option<Checkpoint>, Vec<Unusable>), CheckpointError> {
        let mut problems = Vec::new();
        for epoch in self.epochs()? {
            match self.read_epoch(epoch)? {
                Ok(checkpoint) => return Ok((Some(checkpoint), problems)),
                Err(mut unusable) => problems.append(&mut unusable),
            }
        }
        Ok((None, problems))
    }

    /// The worker count of `epoch`'s files and each worker's file (`None` if it has none). The
    /// files name their worker count; the set is judged by the largest count named, so that
    /// files left by an earlier run with fewer workers cannot pass for a checkpoint.
    fn worker_files(&self, epoch: u64) -> io::Result<Option<(u32, WorkerFiles)>> {
        let mut files: Vec<(u32, u32, PathBuf)> = Vec::new();
        for entry in fs::read_dir(self.epoch_dir(epoch))? {
            let entry = entry?;
            if let Some((worker, peers)) = entry.file_name().to_str().and_then(parse_file_name) {
                files.push((worker, peers, entry.path()));
            }
        }
        let Some(peers) = files.iter().map(|&(_, peers, _)| peers).max() else {
            return Ok(None);
        };
        let files = files
            .into_iter()
            .filter(|&(worker, file_peers, _)| file_peers == peers && worker < peers)
            .map(|(worker, _, path)| (worker, path))
            .collect();
        Ok(Some((peers, files)))
    }

    /// The checkpoint of `epoch`, or why its files are not one.
    fn read_epoch(&self, epoch: u64) -> Result<Result<Checkpoint, Vec<Unusable>>, CheckpointError> {
        let dir = self.epoch_dir(epoch);
        let mut problems = Vec::new();
        let Some((peers, files)) = self.worker_files(epoch).map_err(io_error(&dir))? else {
            return Ok(Err(vec![Unusable::Incomplete {
                epoch,
                worker: 0,
                peers: 0,
            }]));
        };
        let mut payloads: Vec<Option<Vec<u8>>> = vec![None; peers as usize];
        for (worker, path) in files {
            match read_file(&path, epoch, worker, peers) {
                Ok(payload) => payloads[worker as usize] = Some(payload),
                Err(unusable) => problems.push(unusable),
            }
        }
        for (worker, payload) in payloads.iter().enumerate() {
            if payload.is_none() {
                problems.push(Unusable::Incomplete {
                    epoch,
                    worker: worker as u32,
                    peers,
                });
            }
        }
        if !problems.is_empty() {
            return Ok(Err(problems));
        }
        Ok(Ok(Checkpoint {
            epoch,
            peers,
            payloads: payloads.into_iter().flatten().collect(),
        }))
    }

    /// Keeps the `keep` newest complete checkpoints, and every epoch newer than the oldest of
    /// them (a checkpoint still being written); removes the rest. Judges completeness by the
    /// files' headers and lengths, not their checksums: reading every payload of a full-scale
    /// state at each checkpoint would cost more than writing it. Returns how many epochs it
    /// removed. Another process may prune the same directory at the same time: an epoch
    /// already gone is not an error.
    pub fn prune(&self, keep: usize) -> Result<usize, CheckpointError> {
        let mut complete = 0;
        let mut removed = 0;
        for epoch in self.epochs()? {
            if complete >= keep {
                let dir = self.epoch_dir(epoch);
                match fs::remove_dir_all(&dir) {
                    Ok(()) => removed += 1,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                    Err(error) => return Err(io_error(&dir)(error)),
                }
            } else if self.complete_by_headers(epoch) {
                complete += 1;
            }
        }
        Ok(removed)
    }

    /// Whether every worker's file of `epoch` is there with a valid header and the length it
    /// states.
    fn complete_by_headers(&self, epoch: u64) -> bool {
        let Ok(Some((peers, files))) = self.worker_files(epoch) else {
            return false;
        };
        let mut seen = vec![false; peers as usize];
        for (worker, path) in files {
            if read_header(&path, epoch, worker, peers).is_ok() {
                seen[worker as usize] = true;
            }
        }
        seen.iter().all(|&seen| seen)
    }
}

/// Each worker's file of a checkpoint: (worker, path).
type WorkerFiles = Vec<(u32, PathBuf)>;

/// A writer that counts and hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: xxhash_rust::xxh3::Xxh3,
    len: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(bytes)?;
        self.hasher.update(&bytes[..written]);
        self.len += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The worker and worker count a file's name gives (`worker-<worker>-of-<peers>.ckpt`).
fn parse_file_name(name: &str) -> Option<(u32, u32)> {
    let (worker, peers) = name
        .strip_prefix("worker-")?
        .strip_suffix(".ckpt")?
        .split_once("-of-")?;
    Some((worker.parse().ok()?, peers.parse().ok()?))
}

/// Checks the header at the start of `bytes` against the file's name and returns the payload's
/// length and checksum; `file_len` is the whole file's length.
fn check_header(
    path: &Path,
    bytes: &[u8],
    file_len: usize,
    (epoch, worker, peers): (u64, u32, u32),
) -> Result<(usize, u64), Unusable> {
    let truncated = |expected| Unusable::Truncated {
        path: path.to_owned(),
        len: file_len,
        expected,
    };
    if bytes.len() < HEADER_LEN {
        return Err(truncated(HEADER_LEN));
    }
    if &bytes[..8] != MAGIC {
        return Err(Unusable::NotACheckpoint {
            path: path.to_owned(),
        });
    }
    let u32_at = |at: usize| {
        let mut word = [0; 4];
        word.copy_from_slice(&bytes[at..at + 4]);
        u32::from_le_bytes(word)
    };
    let u64_at = |at: usize| {
        let mut word = [0; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(word)
    };
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(Unusable::Version {
            path: path.to_owned(),
            found: version,
        });
    }
    let (file_epoch, file_worker, file_peers) = (u64_at(12), u32_at(20), u32_at(24));
    if (file_epoch, file_worker, file_peers) != (epoch, worker, peers) {
        return Err(Unusable::Misnamed {
            path: path.to_owned(),
            what: format!("epoch {file_epoch}, worker {file_worker} of {file_peers}"),
        });
    }
    let len = usize::try_from(u64_at(28)).unwrap_or(usize::MAX);
    let expected = HEADER_LEN.saturating_add(len);
    if file_len != expected {
        return Err(truncated(expected));
    }
    Ok((len, u64_at(36)))
}

fn unreadable(path: &Path) -> impl FnOnce(io::Error) -> Unusable + '_ {
    move |error| Unusable::Unreadable {
        path: path.to_owned(),
        error: error.to_string(),
    }
}

/// Checks the header of the file at `path` against its name and its length, without reading
/// the payload.
fn read_header(path: &Path, epoch: u64, worker: u32, peers: u32) -> Result<(), Unusable> {
    let mut file = File::open(path).map_err(unreadable(path))?;
    let file_len = file.metadata().map_err(unreadable(path))?.len() as usize;
    let mut header = Vec::with_capacity(HEADER_LEN);
    (&mut file)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut header)
        .map_err(unreadable(path))?;
    check_header(path, &header, file_len, (epoch, worker, peers)).map(|_| ())
}

/// The payload of the file at `path`, checked against its header and its name.
fn read_file(path: &Path, epoch: u64, worker: u32, peers: u32) -> Result<Vec<u8>, Unusable> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut file| file.read_to_end(&mut bytes))
        .map_err(unreadable(path))?;
    let (_, checksum) = check_header(path, &bytes, bytes.len(), (epoch, worker, peers))?;
    let payload = bytes.split_off(HEADER_LEN);
    if xxhash_rust::xxh3::xxh3_64(&payload) != checksum {
        return Err(Unusable::Checksum {
            path: path.to_owned(),
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn write_all(dir: &CheckpointDir, epoch: u64, peers: u32) {
        for worker in 0..peers {
            dir.write(
                epoch,
                worker,
                peers,
                format!("state of {worker} at {epoch}").as_bytes(),
            )
            .unwrap();
        }
    }

    #[test]
    fn the_newest_complete_epoch_is_found_and_older_ones_pruned() {
        let root = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::new(root.path());
        assert_eq!(dir.newest_complete().unwrap(), (None, Vec::new()));
        write_all(&dir, 100, 2);
        write_all(&dir, 200, 2);
        write_all(&dir, 300, 2);
        // Epoch 400 is being written: one worker of two so far.
        dir.write(400, 1, 2, b"partial").unwrap();
        let (found, problems) = dir.newest_complete().unwrap();
        let found = found.unwrap();
        assert_eq!((found.epoch, found.peers), (300, 2));
        assert_eq!(found.payloads[1], b"state of 1 at 300");
        assert_eq!(
            problems,
            [Unusable::Incomplete {
                epoch: 400,
                worker: 0,
                peers: 2
            }]
        );
        assert_eq!(dir.prune(2).unwrap(), 1, "epoch 100 goes");
        assert_eq!(dir.epochs().unwrap(), [400, 300, 200]);
        // No temporary file is left behind by a finished write.
        let names: Vec<String> = fs::read_dir(dir.epoch_dir(300))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names.iter().all(|name| !name.ends_with(".tmp")),
            "{names:?}"
        );
    }

    #[test]
    fn corrupt_truncated_and_foreign_files_are_reported_and_skipped() {
        let root = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::new(root.path());
        write_all(&dir, 10, 1);
        type Damage = fn(&mut Vec<u8>);
        let cases: [(&str, Damage); 4] = [
            ("truncated", |bytes| bytes.truncate(bytes.len() - 3)),
            ("flipped", |bytes| {
                let last = bytes.len() - 1;
                bytes[last] ^= 1;
            }),
            ("version", |bytes| bytes[8] = 9),
            ("magic", |bytes| bytes[0] = b'X'),
        ];
        for (epoch, (what, damage)) in (20..).zip(cases) {
            let path = dir.write(epoch, 0, 1, b"a good payload").unwrap();
            let mut bytes = fs::read(&path).unwrap();
            damage(&mut bytes);
            fs::write(&path, &bytes).unwrap();
            let (found, problems) = dir.newest_complete().unwrap();
            assert_eq!(
                found.unwrap().epoch,
                10,
                "{what}: falls back to the older one"
            );
            let reported = problems.iter().any(|problem| {
                matches!(
                    (what, problem),
                    ("truncated", Unusable::Truncated { .. })
                        | ("flipped", Unusable::Checksum { .. })
                        | ("version", Unusable::Version { found: 9, .. })
                        | ("magic", Unusable::NotACheckpoint { .. })
                )
            });
            assert!(reported, "{what}: {problems:?}");
            // Each message names the file.
            assert!(
                problems.iter().all(|p| p.to_string().contains("epoch")),
                "{problems:?}"
            );
        }
        // A file renamed to another worker's name is caught by its header.
        let path = dir.write(90, 0, 2, b"x").unwrap();
        fs::rename(&path, path.with_file_name("worker-1-of-2.ckpt")).unwrap();
        dir.write(90, 0, 2, b"y").unwrap();
        let (found, problems) = dir.newest_complete().unwrap();
        assert_eq!(found.unwrap().epoch, 10);
        assert!(
            problems
                .iter()
                .any(|p| matches!(p, Unusable::Misnamed { .. })),
            "{problems:?}"
        );
    }

    #[test]
    fn a_crash_mid_write_leaves_the_previous_checkpoint_usable() {
        let root = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::new(root.path());
        write_all(&dir, 10, 2);
        // Worker 0 finished epoch 20; worker 1 died with half its file written, under the
        // temporary name, as a crash leaves it.
        dir.write(20, 0, 2, b"w0").unwrap();
        let epoch_dir = dir.epoch_dir(20);
        fs::write(epoch_dir.join(".worker-1-of-2.ckpt.tmp"), b"SRECCKPT\x01").unwrap();
        let (found, problems) = dir.newest_complete().unwrap();
        assert_eq!(found.unwrap().epoch, 10);
        assert_eq!(
            problems,
            [Unusable::Incomplete {
                epoch: 20,
                worker: 1,
                peers: 2
            }]
        );
        // Pruning keeps it (it is newer than the newest complete one) until two complete ones
        // are newer.
        assert_eq!(dir.prune(2).unwrap(), 0);
        write_all(&dir, 30, 2);
        write_all(&dir, 40, 2);
        assert_eq!(dir.prune(2).unwrap(), 2);
        assert_eq!(dir.epochs().unwrap(), [40, 30]);
    }

    #[test]
    fn pruning_judges_files_by_their_headers() {
        let root = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::new(root.path());
        write_all(&dir, 1, 1);
        write_all(&dir, 2, 1);
        // The newest truncated: not complete, so the two before it stay.
        let path = dir.write(3, 0, 1, b"a payload").unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert_eq!(dir.prune(2).unwrap(), 0);
        assert!(!dir.complete_by_headers(3));
        assert!(dir.complete_by_headers(2));
    }

    #[test]
    fn files_of_a_run_with_fewer_workers_do_not_complete_an_epoch() {
        let root = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::new(root.path());
        // A run of one worker, then a run of two that wrote only worker 0 at the same epoch.
        write_all(&dir, 5, 1);
        dir.write(5, 0, 2, b"w0").unwrap();
        let (found, problems) = dir.newest_complete().unwrap();
        assert_eq!(found, None);
        assert_eq!(
            problems,
            [Unusable::Incomplete {
                epoch: 5,
                worker: 1,
                peers: 2
            }]
        );
    }
}
