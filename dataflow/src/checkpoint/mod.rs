//! Checkpoints: restarts whose cost follows the state, not the topic's history.
//!
//! Every `--checkpoint-interval`, and on a clean shutdown, each worker writes its state (its
//! users' profiles and its items' features, read from the two arrangements) as of a time whose
//! epochs Redis holds, with the source offsets of those epochs, to `--checkpoint-dir`. A
//! restart loads the newest checkpoint every worker completed and replays only the messages
//! after its offsets, up to the committed ones; without a usable checkpoint it replays
//! everything, as before. Offsets are still committed once Redis holds an epoch: a checkpoint
//! only moves where the replay starts.
//!
//! - `files`: the bytes kept safe (format version, checksum, atomic write, pruning, the newest
//!   complete checkpoint);
//! - `payload`: what a worker's file holds (offsets, what the state is compatible with, the
//!   state as columns);
//! - `schedule`: which times every worker checkpoints, without talking to the others;
//! - `take`: reading the state from the arrangements as of such a time, and writing it in the
//!   background;
//! - `restore`: finding a usable checkpoint on start and turning it into events.
//!
//! The whole in docs/architecture.md#checkpoints.

mod files;
pub mod payload;
pub mod restore;
pub mod schedule;
pub mod take;

pub use files::{Checkpoint, CheckpointDir, CheckpointError, Unusable, FORMAT_VERSION};

/// How many complete checkpoints are kept: the newest, and one more in case the newest turns
/// out unreadable.
pub const KEEP: usize = 2;

/// The directory of one topic's and consumer group's checkpoints under the checkpoint root.
/// Two runs that share the root but not both (tests, or two pipelines on one host) never read
/// each other's state; the names are escaped so that any topic or group is one path component.
pub fn scoped_dir(root: &std::path::Path, group: &str, topic: &str) -> CheckpointDir {
    let escape = |name: &str| -> String {
        name.bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'_' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    CheckpointDir::new(root.join(format!("{}@{}", escape(group), escape(topic))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_group_and_topic_has_a_directory_of_its_own() {
        let root = std::path::Path::new("/c");
        assert_eq!(
            scoped_dir(root, "streamrec-dataflow", "user_behavior").root(),
            std::path::Path::new("/c/streamrec-dataflow@user_behavior")
        );
        assert_eq!(
            scoped_dir(root, "a/b", "..").root(),
            std::path::Path::new("/c/a%2Fb@..")
        );
    }
}
