//! Deterministic generator of Amazon-Books-shaped behaviour data for streamrec.
//!
//! The original system was fed with the Amazon Books reviews (5M rows, 371,269 reviewers); that
//! data cannot be redistributed, so this crate synthesises data with the same *shape*: reviewer-
//! and ASIN-like ids, Zipf-like item popularity, a heavy-tailed number of rows per user with a
//! floor of 5, and day-granular timestamps that give many same-second ties within a user (the
//! case the `(timestamp, item_id)` history order of semantics §1 exists for). It writes the
//! behaviour CSV of semantics §1 and the item-features CSV of §3. Everything is derived from one
//! seed through ChaCha8, so the same configuration gives byte-identical files on every machine;
//! the committed sample in `data/` and the full-scale set used by the benchmarks both come from
//! here, and tests and benchmarks can regenerate them in memory instead of reading files.
//!
//! Rows drawn from popularity alone have nothing a recommender could find. With
//! [`GeneratorConfig::taste`] set, the data gets a taste structure instead: every item belongs to
//! a topic, every user prefers a few topics (some far more than others), and a user's items come
//! in sessions, each on one topic, contiguous in time, its items drawn by popularity within the
//! topic. The committed sample has it, so that the evaluation (`bench-recs`) finds something on
//! it out of the box; the `full` preset leaves it off, so that the full-scale set the benchmarks
//! compare across runs stays byte for byte what it was.

mod ids;
mod write;

use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use ids::{
    is_valid_isbn10, isbn10_check_char, item_ids, user_ids, ISBN_SHARE, ITEM_ID_LEN, USER_ID_LEN,
};
pub use write::{write_behavior_csv, write_item_features_csv};

/// 1996-01-01T00:00:00Z, the earliest review time generated.
pub const TIMESTAMP_MIN: u64 = 820_454_400;
/// 2018-12-31T00:00:00Z, the latest review time generated.
pub const TIMESTAMP_MAX: u64 = 1_546_214_400;
/// Amazon's `unixReviewTime` is a date, so every timestamp is a UTC midnight.
pub const SECONDS_PER_DAY: u64 = 86_400;

/// Rows in the original data set, and its reviewers; their ratio is the default mean.
pub const ORIGINAL_ROWS: usize = 5_000_000;
/// Reviewers in the original data set.
pub const ORIGINAL_USERS: usize = 371_269;
/// Items used by the `--full` preset.
pub const FULL_ITEMS: usize = 200_000;

// The generator draws each part from its own ChaCha stream, so that e.g. changing the number of
// users leaves the item ids and their popularity unchanged, and features can be computed for one
// item without replaying anything else.
const STREAM_USERS: u64 = 0;
const STREAM_ITEMS: u64 = 1;
const STREAM_POPULARITY: u64 = 2;
const STREAM_ROWS: u64 = 3;
/// The taste structure's own streams: items' topics, and users' tastes and items.
const STREAM_ITEM_TOPICS: u64 = 4;
const STREAM_TASTE: u64 = 5;
/// Features of item `i` come from stream `STREAM_FEATURES_BASE + i`.
const STREAM_FEATURES_BASE: u64 = 1 << 32;

/// Feature values are whole multiples of this, i.e. exactly what the CSV's 4 decimals can hold,
/// so a vector read back from the file equals the one returned by [`Dataset::features`].
const FEATURE_UNITS: i32 = 10_000;

/// Bounded number of popularity draws before falling back to scanning for an unused item.
const MAX_RESAMPLES: usize = 32;

/// What to generate. `Default` is the committed sample (2,000 users, 3,000 items, seed 42);
/// [`GeneratorConfig::full`] is the scale of the original data.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorConfig {
    /// Number of users; every one gets at least `min_rows_per_user` rows.
    pub users: usize,
    /// Number of distinct item ids generated (not all of them need to be reviewed).
    pub items: usize,
    /// The only source of randomness.
    pub seed: u64,
    /// Zipf exponent of item popularity: the item of rank r (0-based) has weight 1/(r+1)^s.
    /// 0.7 puts the most popular of 200,000 items in about a tenth of the users' histories; 1.0
    /// would put it in more than half, far beyond any real bestseller, and would make a single
    /// feature update touch most users.
    pub zipf_s: f64,
    /// Dimension D of the item features.
    pub dim: usize,
    /// Target mean rows per user; the heavy tail is calibrated to hit it in expectation.
    pub mean_rows_per_user: f64,
    /// Floor on rows per user (the Amazon "5-core" filter).
    pub min_rows_per_user: usize,
    /// Cap on rows per user, which also bounds the heavy tail.
    pub max_rows_per_user: usize,
    /// Probability that a row reuses the day of an earlier row of the same user: people review
    /// several books in one sitting, and these ties are what the history order must break.
    pub same_day_prob: f64,
    /// The taste structure (topics, preferences, sessions), as the committed sample has it;
    /// `None` draws every item from the global popularity alone, as the full-scale set is made.
    pub taste: Option<TasteConfig>,
}

/// How users' tastes shape what they review (see the crate documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct TasteConfig {
    /// Number of topics; every item belongs to one, drawn uniformly.
    pub topics: usize,
    /// Topics each user prefers (distinct, at most `topics`). The first is chosen twice as
    /// often as the second, and so on (weights 1, 1/2, 1/4, ...).
    pub preferred_topics: usize,
    /// Zipf exponent of topic popularity: which topics users come to prefer. Topic t (0-based)
    /// has weight 1/(t+1)^s.
    pub topic_zipf_s: f64,
    /// Mean number of items in a session (geometric, at least 1).
    pub mean_session_length: f64,
    /// Probability that a session is on a topic drawn from topic popularity instead of from
    /// the user's preferences: people stray.
    pub stray_session_prob: f64,
}

impl Default for TasteConfig {
    fn default() -> Self {
        Self {
            topics: 50,
            preferred_topics: 3,
            topic_zipf_s: 0.5,
            mean_session_length: 4.0,
            stray_session_prob: 0.1,
        }
    }
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            users: 2_000,
            items: 3_000,
            seed: 42,
            zipf_s: 0.7,
            dim: 32,
            mean_rows_per_user: ORIGINAL_ROWS as f64 / ORIGINAL_USERS as f64,
            min_rows_per_user: 5,
            max_rows_per_user: 2_000,
            same_day_prob: 0.3,
            taste: Some(TasteConfig::default()),
        }
    }
}

impl GeneratorConfig {
    /// The scale of the original data: 371,269 users, 200,000 items, about 5M rows, the items
    /// by popularity alone, as this set was first made (the benchmarks' earlier figures were
    /// measured on it).
    pub fn full() -> Self {
        Self {
            users: ORIGINAL_USERS,
            items: FULL_ITEMS,
            taste: None,
            ..Self::default()
        }
    }

    /// Rows per user can never exceed the number of items, since a user reviews an item once.
    fn effective_max_rows(&self) -> usize {
        self.max_rows_per_user.min(self.items)
    }

    /// Checks that the configuration can be generated as asked.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.users == 0 {
            return Err(ConfigError::NoUsers);
        }
        if u32::try_from(self.users).is_err() || u32::try_from(self.items).is_err() {
            return Err(ConfigError::TooLarge);
        }
        if self.items < self.min_rows_per_user {
            return Err(ConfigError::TooFewItems {
                items: self.items,
                min_rows: self.min_rows_per_user,
            });
        }
        if self.max_rows_per_user < self.min_rows_per_user {
            return Err(ConfigError::RowBounds {
                min: self.min_rows_per_user,
                max: self.max_rows_per_user,
            });
        }
        if !(self.zipf_s.is_finite() && self.zipf_s >= 0.0) {
            return Err(ConfigError::ZipfExponent(self.zipf_s));
        }
        if !(0.0..=1.0).contains(&self.same_day_prob) {
            return Err(ConfigError::SameDayProb(self.same_day_prob));
        }
        if let Some(taste) = &self.taste {
            taste.validate(self.items)?;
        }
        let lo = self.min_rows_per_user as f64;
        let hi = self.effective_max_rows() as f64;
        // The upper end is excluded because only an infinite tail scale reaches it.
        let reachable = self.mean_rows_per_user >= lo
            && (self.mean_rows_per_user < hi || (self.mean_rows_per_user == hi && lo == hi));
        if !reachable {
            return Err(ConfigError::MeanRows {
                mean: self.mean_rows_per_user,
                min: self.min_rows_per_user,
                max: self.effective_max_rows(),
            });
        }
        Ok(())
    }

    /// The Pareto scale `xm` of the extra rows per user that makes their capped, floored mean
    /// equal `mean_rows_per_user - min_rows_per_user` (see [`expected_extra_rows`]).
    pub fn tail_scale(&self) -> f64 {
        let cap = self.effective_max_rows() - self.min_rows_per_user;
        let target = self.mean_rows_per_user - self.min_rows_per_user as f64;
        if cap == 0 || target <= 0.0 {
            return 0.0;
        }
        // expected_extra_rows grows monotonically in xm from 0 towards `cap`, so bisection
        // converges; 200 halvings are far more than f64 needs.
        let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
        while expected_extra_rows(hi, cap) < target && hi < 1e12 {
            hi *= 2.0;
        }
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if expected_extra_rows(mid, cap) < target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    }
}

impl TasteConfig {
    /// Checks the taste knobs against the number of items.
    fn validate(&self, items: usize) -> Result<(), ConfigError> {
        if self.topics == 0 || self.topics > items {
            return Err(ConfigError::Topics {
                topics: self.topics,
                items,
            });
        }
        if self.preferred_topics == 0 || self.preferred_topics > self.topics {
            return Err(ConfigError::PreferredTopics {
                preferred: self.preferred_topics,
                topics: self.topics,
            });
        }
        if !(self.topic_zipf_s.is_finite() && self.topic_zipf_s >= 0.0) {
            return Err(ConfigError::ZipfExponent(self.topic_zipf_s));
        }
        if !(self.mean_session_length.is_finite() && self.mean_session_length >= 1.0) {
            return Err(ConfigError::SessionLength(self.mean_session_length));
        }
        if !(0.0..=1.0).contains(&self.stray_session_prob) {
            return Err(ConfigError::StrayProb(self.stray_session_prob));
        }
        Ok(())
    }
}

/// Expected extra rows per user, `E[min(floor(xm * (U^(-1/2) - 1)), cap)]` for U uniform on
/// (0, 1]: a Lomax (Pareto II, alpha = 2) variable, whose uncapped mean is `xm`, floored and
/// capped. Since `P(floor(Y) >= k) = P(Y >= k) = (1 + k/xm)^-2`, the mean is the finite sum
/// `sum_{k=1..=cap} (xm / (xm + k))^2`, so the calibration is exact rather than simulated.
pub fn expected_extra_rows(xm: f64, cap: usize) -> f64 {
    if xm <= 0.0 {
        return 0.0;
    }
    (1..=cap)
        .map(|k| {
            let r = xm / (xm + k as f64);
            r * r
        })
        .sum()
}

/// Why a configuration cannot be generated.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// `users` is 0.
    #[error("at least one user is needed")]
    NoUsers,
    /// Rows store indices as u32.
    #[error("users and items must each fit in a u32")]
    TooLarge,
    /// Each user needs `min_rows` distinct items.
    #[error("{items} items cannot give every user {min_rows} distinct items")]
    TooFewItems {
        /// Items asked for.
        items: usize,
        /// Rows every user must have.
        min_rows: usize,
    },
    /// The floor is above the cap.
    #[error("min rows per user ({min}) exceeds max rows per user ({max})")]
    RowBounds {
        /// Floor.
        min: usize,
        /// Cap.
        max: usize,
    },
    /// The Zipf exponent is negative or not finite.
    #[error("zipf exponent must be finite and >= 0, got {0}")]
    ZipfExponent(f64),
    /// Not a probability.
    #[error("same-day probability must be in [0, 1], got {0}")]
    SameDayProb(f64),
    /// No topics, or more topics than items.
    #[error("topics must be in 1..={items} (the number of items), got {topics}")]
    Topics {
        /// Topics asked for.
        topics: usize,
        /// Items asked for.
        items: usize,
    },
    /// No preferred topic, or more than there are topics.
    #[error("preferred topics must be in 1..={topics} (the number of topics), got {preferred}")]
    PreferredTopics {
        /// Preferred topics asked for.
        preferred: usize,
        /// Topics asked for.
        topics: usize,
    },
    /// A session must hold at least one item on average.
    #[error("mean session length must be finite and >= 1, got {0}")]
    SessionLength(f64),
    /// Not a probability.
    #[error("stray session probability must be in [0, 1], got {0}")]
    StrayProb(f64),
    /// The mean cannot be reached within the floor and cap.
    #[error("mean rows per user {mean} must lie in [{min}, {max}) (floor, cap limited by items)")]
    MeanRows {
        /// Mean asked for.
        mean: f64,
        /// Floor.
        min: usize,
        /// Cap after limiting it by the number of items.
        max: usize,
    },
}

/// One behaviour row; `user` and `item` index [`Dataset::users`] and [`Dataset::items`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Row {
    /// Index into [`Dataset::users`].
    pub user: u32,
    /// Index into [`Dataset::items`].
    pub item: u32,
    /// Unix seconds, a UTC midnight.
    pub timestamp: u64,
}

/// Same-timestamp statistics of a data set (ties are what the `(timestamp, item_id)` order breaks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TieStats {
    /// Rows whose (user, timestamp) equals that of another row of the same user, counting all
    /// but the first of each group.
    pub tied_rows: usize,
    /// Users with at least one tie.
    pub users_with_ties: usize,
}

/// A generated data set, held in memory with ids interned as indices.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// User ids; rows refer to them by index.
    pub users: Vec<String>,
    /// All generated item ids, including any that no row uses.
    pub items: Vec<String>,
    /// Rows grouped user by user (users in index order), in random order within a user.
    pub rows: Vec<Row>,
    /// Seed the data set was generated from; features are derived from it.
    pub seed: u64,
    /// Feature dimension D.
    pub dim: usize,
    /// Every item's topic (indexed like `items`), when the data has a taste structure.
    pub item_topics: Option<Vec<u32>>,
}

impl Dataset {
    /// The features of item `item` (an index into `items`): `dim` values uniform on the grid of
    /// multiples of 1e-4 in [-1, 1]. They depend only on the seed and the index, never on which
    /// other items exist or in which order they are written.
    pub fn features(&self, item: usize) -> Vec<f32> {
        item_features(self.seed, self.dim, item)
    }

    /// Indices of the items that occur in some row, sorted by item id (the features file order).
    pub fn used_items(&self) -> Vec<u32> {
        let mut used = vec![false; self.items.len()];
        for r in &self.rows {
            used[r.item as usize] = true;
        }
        let mut out: Vec<u32> = (0..self.items.len() as u32)
            .filter(|&i| used[i as usize])
            .collect();
        out.sort_unstable_by(|&a, &b| self.items[a as usize].cmp(&self.items[b as usize]));
        out
    }

    /// Counts same-timestamp rows within users.
    pub fn tie_stats(&self) -> TieStats {
        let mut stats = TieStats::default();
        let mut stamps = Vec::new();
        for user_rows in self.rows.chunk_by(|a, b| a.user == b.user) {
            stamps.clear();
            stamps.extend(user_rows.iter().map(|r| r.timestamp));
            stamps.sort_unstable();
            let tied = stamps.windows(2).filter(|w| w[0] == w[1]).count();
            stats.tied_rows += tied;
            stats.users_with_ties += usize::from(tied > 0);
        }
        stats
    }
}

/// The `dim` features of item number `item` under `seed`, as [`Dataset::features`] gives them;
/// for workloads that need features without generating a whole data set.
pub fn item_features(seed: u64, dim: usize, item: usize) -> Vec<f32> {
    let mut units = Vec::with_capacity(dim);
    feature_units(seed, dim, item, &mut units);
    units
        .into_iter()
        .map(|u| u as f32 / FEATURE_UNITS as f32)
        .collect()
}

/// Writes the `dim` feature values of `item`, in units of 1e-4, into `out`.
fn feature_units(seed: u64, dim: usize, item: usize, out: &mut Vec<i32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(STREAM_FEATURES_BASE + item as u64);
    out.clear();
    out.extend((0..dim).map(|_| rng.random_range(-FEATURE_UNITS..=FEATURE_UNITS)));
}

fn stream_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Generates the data set described by `config`, entirely in memory.
pub fn generate(config: &GeneratorConfig) -> Result<Dataset, ConfigError> {
    config.validate()?;
    let seed = config.seed;
    let users = ids::user_ids(&mut stream_rng(seed, STREAM_USERS), config.users);
    let items = ids::item_ids(&mut stream_rng(seed, STREAM_ITEMS), config.items);

    // Popularity ranks are a random permutation, so the popular items are scattered over the id
    // space instead of being the first ids generated.
    let mut rank: Vec<u32> = (0..config.items as u32).collect();
    rank.shuffle(&mut stream_rng(seed, STREAM_POPULARITY));
    let weights: Vec<f64> = rank
        .iter()
        .map(|&r| (f64::from(r) + 1.0).powf(-config.zipf_s))
        .collect();
    let popularity = WeightedIndex::new(&weights)
        // validate() admits only finite s >= 0 and at least one item, so every weight is finite
        // and positive.
        .expect("zipf weights are finite and positive");
    let mut taste = config
        .taste
        .as_ref()
        .map(|taste| Taste::new(taste, seed, &weights));
    let mut picked: Vec<u32> = Vec::new();

    let xm = config.tail_scale();
    let min_rows = config.min_rows_per_user;
    let extra_cap = config.effective_max_rows() - min_rows;
    let days = (TIMESTAMP_MAX - TIMESTAMP_MIN) / SECONDS_PER_DAY;

    let mut rng = stream_rng(seed, STREAM_ROWS);
    let expected_rows = (config.users as f64 * config.mean_rows_per_user * 1.05) as usize;
    let mut rows = Vec::with_capacity(expected_rows);
    // seen[item] == user + 1 marks an item the current user already reviewed; stamping with the
    // user avoids clearing a set per user.
    let mut seen = vec![0u32; config.items];
    let mut user_days: Vec<u64> = Vec::new();

    for user in 0..config.users as u32 {
        // 1 - U is uniform on (0, 1], so the power below is finite.
        let u = 1.0 - rng.random::<f64>();
        let extra = (xm * (u.powf(-0.5) - 1.0)).floor().min(extra_cap as f64) as usize;
        let n = min_rows + extra;

        // Active window: a cadence of about two months per review, placed towards the later
        // years (start ~ U^(1/3)), as the Books reviews grow strongly after 2010.
        let cadence = -(1.0 - rng.random::<f64>()).ln() * 60.0;
        let span = ((n as f64 * cadence).ceil() as u64).clamp(1, days);
        let start = ((days - span) as f64 * rng.random::<f64>().cbrt()) as u64;

        user_days.clear();
        let first = rows.len();
        match &mut taste {
            None => {
                for _ in 0..n {
                    let day = draw_day(&mut rng, config.same_day_prob, &user_days, start, span);
                    user_days.push(day);
                    let item = pick_unused_item(&mut rng, &popularity, &mut seen, user + 1);
                    rows.push(Row {
                        user,
                        item,
                        timestamp: TIMESTAMP_MIN + day * SECONDS_PER_DAY,
                    });
                }
            }
            Some(taste) => {
                // The days are drawn exactly as above, so the timestamps (and their ties) have
                // the same statistics; the items come from the taste's own stream, in sessions
                // laid over the days in time order.
                for _ in 0..n {
                    let day = draw_day(&mut rng, config.same_day_prob, &user_days, start, span);
                    user_days.push(day);
                }
                user_days.sort_unstable();
                taste.pick_items(n, &popularity, &mut seen, user + 1, &mut picked);
                rows.extend(user_days.iter().zip(&picked).map(|(&day, &item)| Row {
                    user,
                    item,
                    timestamp: TIMESTAMP_MIN + day * SECONDS_PER_DAY,
                }));
            }
        }
        // The contract says rows need not be sorted; shuffling makes sure consumers do not rely
        // on generation order.
        rows[first..].shuffle(&mut rng);
    }

    Ok(Dataset {
        users,
        items,
        rows,
        seed,
        dim: config.dim,
        item_topics: taste.map(|taste| taste.item_topics),
    })
}

/// A day of the user's active window `start..=start + span`; after the first, with probability
/// `same_day_prob` one of the days drawn before (`earlier`), giving same-second ties.
fn draw_day(
    rng: &mut ChaCha8Rng,
    same_day_prob: f64,
    earlier: &[u64],
    start: u64,
    span: u64,
) -> u64 {
    if !earlier.is_empty() && rng.random_bool(same_day_prob) {
        earlier[rng.random_range(0..earlier.len())]
    } else {
        start + rng.random_range(0..=span)
    }
}

/// The taste structure while rows are generated: the items of each topic, how topics are drawn,
/// and its own random stream.
struct Taste<'a> {
    config: &'a TasteConfig,
    rng: ChaCha8Rng,
    item_topics: Vec<u32>,
    /// The items of each topic, and a draw among them by their global popularity weight.
    topic_items: Vec<Vec<u32>>,
    topic_popularity: Vec<WeightedIndex<f64>>,
    /// Topics by topic popularity, for preferences and stray sessions.
    topic_choice: WeightedIndex<f64>,
    /// The weights of a user's preferred topics, first to last.
    preference_weights: WeightedIndex<f64>,
}

impl<'a> Taste<'a> {
    /// Topics for every item, from `weights` (each item's global popularity weight).
    fn new(config: &'a TasteConfig, seed: u64, weights: &[f64]) -> Self {
        // Topics are dealt round-robin over a random permutation of the items, so every topic
        // gets items (validate() keeps topics <= items) and sizes differ by at most one.
        let mut order: Vec<u32> = (0..weights.len() as u32).collect();
        order.shuffle(&mut stream_rng(seed, STREAM_ITEM_TOPICS));
        let mut item_topics = vec![0u32; weights.len()];
        let mut topic_items = vec![Vec::new(); config.topics];
        for (position, &item) in order.iter().enumerate() {
            let topic = position % config.topics;
            item_topics[item as usize] = topic as u32;
            topic_items[topic].push(item);
        }
        for items in &mut topic_items {
            items.sort_unstable();
        }
        let topic_popularity = topic_items
            .iter()
            .map(|items| {
                WeightedIndex::new(items.iter().map(|&i| weights[i as usize]))
                    .expect("every topic has items, with finite positive weights")
            })
            .collect();
        let topic_choice = WeightedIndex::new(
            (0..config.topics).map(|t| (t as f64 + 1.0).powf(-config.topic_zipf_s)),
        )
        .expect("topic weights are finite and positive");
        let preference_weights =
            WeightedIndex::new((0..config.preferred_topics).map(|j| 0.5f64.powi(j as i32)))
                .expect("at least one preferred topic");
        Taste {
            config,
            rng: stream_rng(seed, STREAM_TASTE),
            item_topics,
            topic_items,
            topic_popularity,
            topic_choice,
            preference_weights,
        }
    }

    /// The `n` distinct items of one user (`stamp`, as in [`pick_unused_item`]) in time order,
    /// into `picked`: the user's preferred topics, then sessions, each on one topic.
    fn pick_items(
        &mut self,
        n: usize,
        popularity: &WeightedIndex<f64>,
        seen: &mut [u32],
        stamp: u32,
        picked: &mut Vec<u32>,
    ) {
        let preferred = self.preferred_topics();
        // A session goes on after each item with this probability: a geometric length with the
        // configured mean.
        let go_on = 1.0 - 1.0 / self.config.mean_session_length;
        picked.clear();
        let mut topic = 0;
        for i in 0..n {
            if i == 0 || !self.rng.random_bool(go_on) {
                topic = if self.rng.random_bool(self.config.stray_session_prob) {
                    self.topic_choice.sample(&mut self.rng)
                } else {
                    preferred[self.preference_weights.sample(&mut self.rng)]
                };
            }
            picked.push(self.pick_in_topic(topic, popularity, seen, stamp));
        }
    }

    /// The user's distinct preferred topics, drawn by topic popularity, most preferred first.
    fn preferred_topics(&mut self) -> Vec<usize> {
        let wanted = self.config.preferred_topics;
        let mut topics = Vec::with_capacity(wanted);
        for _ in 0..MAX_RESAMPLES * wanted {
            if topics.len() == wanted {
                break;
            }
            let topic = self.topic_choice.sample(&mut self.rng);
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
        // Under a steep topic skew the draws may keep hitting the same few topics; the rest
        // are then the first topics not taken yet, which keeps generation bounded.
        let mut next = 0;
        while topics.len() < wanted {
            if !topics.contains(&next) {
                topics.push(next);
            }
            next += 1;
        }
        topics
    }

    /// An item of `topic` the user has not reviewed, by popularity within the topic; once the
    /// topic has none left, any unused item by global popularity.
    fn pick_in_topic(
        &mut self,
        topic: usize,
        popularity: &WeightedIndex<f64>,
        seen: &mut [u32],
        stamp: u32,
    ) -> u32 {
        let items = &self.topic_items[topic];
        for _ in 0..MAX_RESAMPLES {
            let item = items[self.topic_popularity[topic].sample(&mut self.rng)];
            if seen[item as usize] != stamp {
                seen[item as usize] = stamp;
                return item;
            }
        }
        let start = self.rng.random_range(0..items.len());
        let unused = (start..items.len())
            .chain(0..start)
            .map(|i| items[i])
            .find(|&item| seen[item as usize] != stamp);
        match unused {
            Some(item) => {
                seen[item as usize] = stamp;
                item
            }
            None => pick_unused_item(&mut self.rng, popularity, seen, stamp),
        }
    }
}

/// Draws an item the current user (`stamp`) has not reviewed yet and marks it reviewed.
fn pick_unused_item(
    rng: &mut ChaCha8Rng,
    popularity: &WeightedIndex<f64>,
    seen: &mut [u32],
    stamp: u32,
) -> u32 {
    for _ in 0..MAX_RESAMPLES {
        let i = popularity.sample(rng);
        if seen[i] != stamp {
            seen[i] = stamp;
            return i as u32;
        }
    }
    // Only heavy users exhaust the popular items; the next unused item from a random start keeps
    // generation bounded. validate() guarantees rows per user <= items, so one exists.
    let start = rng.random_range(0..seen.len());
    let i = (start..seen.len())
        .chain(0..start)
        .find(|&i| seen[i] != stamp)
        .expect("a user has fewer rows than there are items");
    seen[i] = stamp;
    i as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_scale_hits_target_mean_in_expectation() {
        let c = GeneratorConfig::full();
        let xm = c.tail_scale();
        let cap = c.max_rows_per_user - c.min_rows_per_user;
        let mean = c.min_rows_per_user as f64 + expected_extra_rows(xm, cap);
        assert!((mean - c.mean_rows_per_user).abs() < 1e-9, "mean {mean}");
        // Flooring and capping take something off the uncapped Lomax mean xm.
        assert!(xm > mean - c.min_rows_per_user as f64);
    }

    #[test]
    fn validation_rejects_impossible_configs() {
        let ok = GeneratorConfig::default();
        assert_eq!(ok.validate(), Ok(()));
        let bad = |f: fn(&mut GeneratorConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c.validate().is_err() && generate(&c).is_err()
        };
        assert!(bad(|c| c.users = 0));
        assert!(bad(|c| c.items = 4));
        assert!(bad(|c| c.zipf_s = f64::NAN));
        assert!(bad(|c| c.zipf_s = -1.0));
        assert!(bad(|c| c.same_day_prob = 1.5));
        assert!(bad(|c| c.mean_rows_per_user = 4.0));
        assert!(bad(|c| c.max_rows_per_user = 3));
        assert!(bad(|c| {
            c.items = 10;
            c.mean_rows_per_user = 10.0;
        }));
    }

    #[test]
    fn items_equal_to_min_rows_still_generate() {
        // Every user must then review every item, which exercises the fallback scan.
        let c = GeneratorConfig {
            users: 50,
            items: 5,
            mean_rows_per_user: 5.0,
            taste: None,
            ..GeneratorConfig::default()
        };
        let d = generate(&c).expect("valid config");
        assert_eq!(d.rows.len(), 250);
        let pairs: std::collections::HashSet<_> = d.rows.iter().map(|r| (r.user, r.item)).collect();
        assert_eq!(pairs.len(), 250);
    }
}
