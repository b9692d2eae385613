//! The benchmark workload: profile messages shaped like the Amazon-Books data (reviewer-like
//! users, ASIN-like items with Zipf popularity, D-dimensional features), seeded.

use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What to generate.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadConfig {
    /// Profile messages to generate.
    #[arg(long, default_value_t = 200_000)]
    pub messages: usize,
    /// Distinct users messages are drawn from (uniformly, so some repeat: 200k messages over
    /// 100k users touch about 86k of them).
    #[arg(long, default_value_t = 100_000)]
    pub users: usize,
    /// Distinct items, with Zipf popularity.
    #[arg(long, default_value_t = 200_000)]
    pub items: usize,
    /// Feature dimension D.
    #[arg(long, default_value_t = 32)]
    pub dim: usize,
    /// Items per message history.
    #[arg(long, default_value_t = 50)]
    pub history: usize,
    /// Fraction of messages whose user already had one, e.g. 0.9: each message's user is then a
    /// user seen before (uniformly) with this probability, and otherwise the next new one of
    /// --users (or a seen one once all are used). Unset, users are drawn uniformly from --users.
    #[arg(long, value_parser = fraction)]
    pub repeat_fraction: Option<f64>,
    /// A message of a user seen before keeps that user's last history and appends this many
    /// new items to it (the oldest leave past --history), as a browsing user's profile grows:
    /// its co-visitation window slides by that many items. Unset, every message carries a new
    /// random history, which replaces its user's whole window (co-visitation's worst case).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub slide: Option<u32>,
    /// Zipf exponent of item popularity.
    #[arg(long, default_value_t = 0.7)]
    pub zipf_s: f64,
    /// Seed of everything generated.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

fn fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{text:?} is not a fraction in 0..=1")),
    }
}

/// Timestamp of message 0; message i has `BASE_TIMESTAMP + i`, so every message is newer than
/// the ones before it.
pub const BASE_TIMESTAMP: u64 = 1_500_000_000;

/// A generated workload: messages as (key, JSON value) and the items' features.
#[derive(Debug)]
pub struct Workload {
    pub messages: Vec<(String, Vec<u8>)>,
    /// Index into `users` of each message's user.
    pub message_users: Vec<u32>,
    /// Each message's history as indices into `items`, in message order (kept so the Redis
    /// phases can rebuild the profiles without parsing the JSON back): message `i`'s ends at
    /// `history_ends[i]`.
    pub histories: Vec<u32>,
    pub history_ends: Vec<usize>,
    /// The longest history of a message.
    pub history: usize,
    /// Generated with --slide: how many items a user's next history adds to its last one.
    pub slide: Option<u32>,
    /// Each message's timestamp, and the greatest.
    pub timestamps: Vec<u64>,
    pub max_timestamp: u64,
    pub users: Vec<String>,
    pub items: Vec<String>,
    /// Every item's features, `dim` each, where `known` says it has any.
    pub features: Vec<f32>,
    pub known: Vec<bool>,
    pub dim: usize,
    pub seed: u64,
    pub distinct_users: usize,
}

/// Why a workload could not be read from files.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: not a valid profile message: {reason}")]
    BadMessage {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path}: {source}")]
    Features {
        path: String,
        source: dataflow::features::FeaturesError,
    },
    #[error("{path}: no profile message")]
    Empty { path: String },
}

impl Workload {
    /// Generates the workload described by `config`.
    pub fn generate(config: &WorkloadConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let users = datagen::user_ids(&mut rng, config.users.max(1));
        let items = datagen::item_ids(&mut rng, config.items.max(1));
        let popularity =
            WeightedIndex::new((0..items.len()).map(|r| (r as f64 + 1.0).powf(-config.zipf_s)))
                .expect("Zipf weights are finite and positive");
        let mut seen = vec![false; users.len()];
        // With --repeat-fraction: the users seen so far, and the next new one.
        let mut seen_users: Vec<usize> = Vec::new();
        let mut next_new = 0;
        let mut history: Vec<&str> = Vec::with_capacity(config.history);
        // With --slide: each user's last history, as item indices, oldest first.
        let mut last_history: Vec<Vec<u32>> = vec![Vec::new(); users.len()];
        let mut message_users = Vec::with_capacity(config.messages);
        let mut histories = Vec::with_capacity(config.messages * config.history);
        let mut history_ends = Vec::with_capacity(config.messages);
        let mut timestamps = Vec::with_capacity(config.messages);
        let messages = (0..config.messages)
            .map(|i| {
                let user = match config.repeat_fraction {
                    None => rng.random_range(0..users.len()),
                    Some(repeat) => {
                        let repeats = next_new == users.len()
                            || (!seen_users.is_empty() && rng.random_bool(repeat));
                        if repeats {
                            seen_users[rng.random_range(0..seen_users.len())]
                        } else {
                            next_new += 1;
                            seen_users.push(next_new - 1);
                            next_new - 1
                        }
                    }
                };
                message_users.push(user as u32);
                let last = &mut last_history[user];
                match config.slide.filter(|_| seen[user]) {
                    // The oldest items leave to make room for `slide` new ones.
                    Some(slide) => {
                        let new = (slide as usize).min(config.history);
                        last.drain(..(last.len() + new).saturating_sub(config.history));
                    }
                    None => last.clear(),
                }
                seen[user] = true;
                while last.len() < config.history {
                    last.push(popularity.sample(&mut rng) as u32);
                }
                history.clear();
                history.extend(last.iter().map(|&item| items[item as usize].as_str()));
                histories.extend_from_slice(last);
                if config.slide.is_none() {
                    // Only a sliding history needs to be kept for the user's next message.
                    last.clear();
                }
                history_ends.push(histories.len());
                timestamps.push(BASE_TIMESTAMP + i as u64);
                let value = profile::ProfileMessageRef {
                    user_id: &users[user],
                    history_items: &history,
                    timestamp: BASE_TIMESTAMP + i as u64,
                }
                .encode(profile::Encoding::Json);
                (users[user].clone(), value)
            })
            .collect();
        let features = (0..items.len())
            .flat_map(|index| datagen::item_features(config.seed, config.dim, index))
            .collect();
        Workload {
            messages,
            message_users,
            histories,
            history_ends,
            history: config.history,
            slide: config.slide,
            max_timestamp: timestamps.last().copied().unwrap_or(BASE_TIMESTAMP),
            timestamps,
            distinct_users: seen.iter().filter(|&&s| s).count(),
            known: vec![true; items.len()],
            features,
            users,
            items,
            dim: config.dim,
            seed: config.seed,
        }
    }

    /// Reads a workload from files: `messages`, one profile message a line, each the value the
    /// topic gets (semantics §2, JSON), keyed by its user; and `features`, the item features CSV
    /// the dataflow loads (semantics §3). Items named by messages but not by the CSV are
    /// unknown. An invalid message line is an error naming the line.
    pub fn load(
        messages: &std::path::Path,
        features: &std::path::Path,
    ) -> Result<Self, WorkloadError> {
        use std::collections::HashMap;
        use std::io::BufRead;

        let features_path = features.display().to_string();
        let loaded = dataflow::features::load_item_features(features).map_err(|source| {
            WorkloadError::Features {
                path: features_path.clone(),
                source,
            }
        })?;
        let path = messages.display().to_string();
        let read = |source| WorkloadError::Read {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(messages).map_err(read)?;
        let mut workload = Workload {
            messages: Vec::new(),
            message_users: Vec::new(),
            histories: Vec::new(),
            history_ends: Vec::new(),
            history: 0,
            slide: None,
            timestamps: Vec::new(),
            max_timestamp: 0,
            users: Vec::new(),
            items: Vec::new(),
            features: Vec::new(),
            known: Vec::new(),
            dim: loaded.dim,
            seed: 0,
            distinct_users: 0,
        };
        let mut item_index: HashMap<String, u32> = HashMap::new();
        for event in loaded.shares.into_iter().flatten() {
            let index = workload.intern_item(&mut item_index, &event.item_id) as usize;
            // A later row for the same item wins, as it does in the dataflow.
            if let Some(values) = &event.features {
                let dim = workload.dim;
                for (slot, x) in workload.features[index * dim..][..dim]
                    .iter_mut()
                    .zip(values.values())
                {
                    *slot = x;
                }
                workload.known[index] = true;
            }
        }

        let mut user_index: HashMap<String, u32> = HashMap::new();
        for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(read)?;
            if line.trim().is_empty() {
                continue;
            }
            let message = profile::ProfileMessage::decode(line.as_bytes(), profile::Encoding::Json)
                .map_err(|e| WorkloadError::BadMessage {
                    path: path.clone(),
                    line: number + 1,
                    reason: e.to_string(),
                })?;
            let user = *user_index
                .entry(message.user_id.clone())
                .or_insert_with(|| {
                    workload.users.push(message.user_id.clone());
                    (workload.users.len() - 1) as u32
                });
            workload.message_users.push(user);
            for item in &message.history_items {
                let index = workload.intern_item(&mut item_index, item);
                workload.histories.push(index);
            }
            workload.history_ends.push(workload.histories.len());
            workload.history = workload.history.max(message.history_items.len());
            workload.timestamps.push(message.timestamp);
            workload.messages.push((message.user_id, line.into_bytes()));
        }
        if workload.messages.is_empty() {
            return Err(WorkloadError::Empty { path });
        }
        workload.distinct_users = workload.users.len();
        workload.max_timestamp = workload.timestamps.iter().copied().max().unwrap_or(0);
        Ok(workload)
    }

    /// The index of item `id`, added without features if new.
    fn intern_item(&mut self, index: &mut std::collections::HashMap<String, u32>, id: &str) -> u32 {
        if let Some(&item) = index.get(id) {
            return item;
        }
        self.items.push(id.to_owned());
        self.features.resize(self.features.len() + self.dim, 0.0);
        self.known.push(false);
        let item = (self.items.len() - 1) as u32;
        index.insert(id.to_owned(), item);
        item
    }

    /// Item `index`'s features, if it has any.
    pub fn features_of(&self, index: usize) -> Option<&[f32]> {
        self.known[index].then(|| &self.features[index * self.dim..(index + 1) * self.dim])
    }

    /// Writes the items' features as the dataflow's CSV (semantics §3).
    pub fn write_features(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        write!(out, "item_id")?;
        for j in 0..self.dim {
            write!(out, ",f{j}")?;
        }
        writeln!(out)?;
        for (index, item) in self.items.iter().enumerate() {
            let Some(features) = self.features_of(index) else {
                continue;
            };
            write!(out, "{item}")?;
            for x in features {
                write!(out, ",{x}")?;
            }
            writeln!(out)?;
        }
        out.flush()
    }

    /// Message `i` of an endless stream: the workload's messages over and over, each pass with
    /// timestamps after every one before, so that every message is newer than its user's
    /// profile and changes it. Message `i < len` is `messages[i]` itself.
    pub fn message_at(&self, i: usize) -> (String, Vec<u8>) {
        let n = self.messages.len();
        if i < n {
            return self.messages[i].clone();
        }
        let base = i % n;
        let user = &self.users[self.message_users[base] as usize];
        let history: Vec<&str> = self
            .history_of(base)
            .iter()
            .map(|&item| self.items[item as usize].as_str())
            .collect();
        let value = profile::ProfileMessageRef {
            user_id: user,
            history_items: &history,
            timestamp: self.max_timestamp + i as u64,
        }
        .encode(profile::Encoding::Json);
        (user.clone(), value)
    }

    /// The item indices of message `i`'s history, in message order.
    pub fn history_of(&self, i: usize) -> &[u32] {
        let start = i
            .checked_sub(1)
            .map_or(0, |before| self.history_ends[before]);
        &self.histories[start..self.history_ends[i]]
    }

    /// Total bytes of the message values.
    pub fn value_bytes(&self) -> usize {
        self.messages.iter().map(|(_, v)| v.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(messages: usize, users: usize, repeat_fraction: Option<f64>) -> WorkloadConfig {
        WorkloadConfig {
            messages,
            users,
            items: 100,
            dim: 2,
            history: 3,
            repeat_fraction,
            slide: None,
            zipf_s: 0.7,
            seed: 7,
        }
    }

    #[test]
    fn the_endless_stream_repeats_the_messages_with_later_timestamps() {
        let workload = Workload::generate(&config(5, 3, None));
        assert_eq!(workload.message_at(2), workload.messages[2]);
        let again =
            profile::ProfileMessage::decode(&workload.message_at(7).1, Default::default()).unwrap();
        let first =
            profile::ProfileMessage::decode(&workload.messages[2].1, Default::default()).unwrap();
        assert_eq!(again.user_id, first.user_id);
        assert_eq!(again.history_items, first.history_items);
        assert_eq!(again.timestamp, BASE_TIMESTAMP + 4 + 7);
        assert_eq!(workload.message_at(7).0, first.user_id);
    }

    #[test]
    fn a_workload_reads_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let features = dir.path().join("features.csv");
        std::fs::write(&features, "item_id,f0,f1\na,1,0\nb,0,1\n").unwrap();
        let messages = dir.path().join("messages.jsonl");
        std::fs::write(
            &messages,
            concat!(
                r#"{"user_id":"u1","history_items":["a","x"],"timestamp":10}"#,
                "\n\n",
                r#"{"user_id":"u2","history_items":["b"],"timestamp":12}"#,
                "\n",
                r#"{"user_id":"u1","history_items":["a","b","x"],"timestamp":11}"#,
                "\n"
            ),
        )
        .unwrap();
        let workload = Workload::load(&messages, &features).unwrap();
        assert_eq!(workload.messages.len(), 3);
        assert_eq!(workload.messages[1].0, "u2");
        assert_eq!(workload.distinct_users, 2);
        assert_eq!(workload.dim, 2);
        assert_eq!(workload.history, 3);
        assert_eq!(workload.items, ["a", "b", "x"]);
        assert_eq!(workload.history_of(0), [0, 2]);
        assert_eq!(workload.history_of(2), [0, 1, 2]);
        assert_eq!(workload.features_of(1), Some(&[0.0, 1.0][..]));
        // "x" is named by a message, not by the CSV: unknown.
        assert_eq!(workload.features_of(2), None);
        // The endless stream goes on after the greatest timestamp.
        let next =
            profile::ProfileMessage::decode(&workload.message_at(3).1, Default::default()).unwrap();
        assert_eq!((next.user_id.as_str(), next.timestamp), ("u1", 12 + 3));

        std::fs::write(&messages, "{\"user_id\":\"u1\"}\n").unwrap();
        let error = Workload::load(&messages, &features)
            .unwrap_err()
            .to_string();
        assert!(error.contains("line 1"), "{error}");
    }

    #[test]
    fn the_repeat_fraction_sets_how_many_messages_have_a_known_user() {
        let workload = Workload::generate(&config(10_000, 100_000, Some(0.9)));
        // About 10% of the messages bring a new user.
        assert!(
            (800..=1_200).contains(&workload.distinct_users),
            "{}",
            workload.distinct_users
        );
        // Once every user is used, messages repeat them.
        let all_used = Workload::generate(&config(1_000, 10, Some(0.0)));
        assert_eq!(all_used.distinct_users, 10);
        // Unset, users are uniform: 10k messages over 100k users touch ~9.5k of them.
        let uniform = Workload::generate(&config(10_000, 100_000, None));
        assert!(uniform.distinct_users > 9_000, "{}", uniform.distinct_users);
    }

    #[test]
    fn a_sliding_history_keeps_the_users_last_one_and_appends_new_items() {
        for slide in [1, 2, 3, 5] {
            let workload = Workload::generate(&WorkloadConfig {
                slide: Some(slide),
                ..config(2_000, 50, None)
            });
            let mut last: Vec<Option<&[u32]>> = vec![None; workload.users.len()];
            let mut slid = 0;
            for i in 0..workload.messages.len() {
                let user = workload.message_users[i] as usize;
                let history = workload.history_of(i);
                assert_eq!(history.len(), 3, "message {i}");
                // The previous history less its oldest `slide` items comes first (a slide of
                // the whole history or more keeps nothing).
                if let Some(before) = last[user] {
                    let kept = 3usize.saturating_sub(slide as usize);
                    assert_eq!(history[..kept], before[3 - kept..], "message {i}");
                    slid += 1;
                }
                last[user] = Some(history);
                // The JSON value carries the same history.
                let message = profile::ProfileMessage::decode(
                    &workload.messages[i].1,
                    profile::Encoding::Json,
                )
                .unwrap();
                let named: Vec<&str> = history
                    .iter()
                    .map(|&item| workload.items[item as usize].as_str())
                    .collect();
                assert_eq!(message.history_items, named, "message {i}");
            }
            assert_eq!(slid, 2_000 - workload.distinct_users);
        }
    }
}
