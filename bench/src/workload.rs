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
    /// Each message's history as indices into `items`, `history` per message, in message order
    /// (kept so the Redis phases can rebuild the profiles without parsing the JSON back).
    pub histories: Vec<u32>,
    pub history: usize,
    pub users: Vec<String>,
    pub items: Vec<String>,
    pub dim: usize,
    pub seed: u64,
    pub distinct_users: usize,
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
        let mut message_users = Vec::with_capacity(config.messages);
        let mut histories = Vec::with_capacity(config.messages * config.history);
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
                seen[user] = true;
                message_users.push(user as u32);
                history.clear();
                for _ in 0..config.history {
                    let item = popularity.sample(&mut rng);
                    histories.push(item as u32);
                    history.push(items[item].as_str());
                }
                let value = profile::ProfileMessageRef {
                    user_id: &users[user],
                    history_items: &history,
                    timestamp: BASE_TIMESTAMP + i as u64,
                }
                .encode(profile::Encoding::Json);
                (users[user].clone(), value)
            })
            .collect();
        Workload {
            messages,
            message_users,
            histories,
            history: config.history,
            distinct_users: seen.iter().filter(|&&s| s).count(),
            users,
            items,
            dim: config.dim,
            seed: config.seed,
        }
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
            write!(out, "{item}")?;
            for x in datagen::item_features(self.seed, self.dim, index) {
                write!(out, ",{x}")?;
            }
            writeln!(out)?;
        }
        out.flush()
    }

    /// Message `i` of an endless stream: the workload's messages over and over, each pass with
    /// timestamps after the last one's, so that every message is newer than its user's profile
    /// and changes it, as the first pass's do. Message `i < len` is `messages[i]` itself.
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
            timestamp: BASE_TIMESTAMP + i as u64,
        }
        .encode(profile::Encoding::Json);
        (user.clone(), value)
    }

    /// The item indices of message `i`'s history, in message order.
    pub fn history_of(&self, i: usize) -> &[u32] {
        &self.histories[i * self.history..(i + 1) * self.history]
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
        assert_eq!(again.timestamp, BASE_TIMESTAMP + 7);
        assert_eq!(workload.message_at(7).0, first.user_id);
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
}
