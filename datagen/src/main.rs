//! `datagen`: writes the deterministic behaviour CSV and item-features CSV of the `datagen`
//! library to disk. With no flags it regenerates the committed sample in `data/`; `--full`
//! produces the original data's scale in `data/full/` (gitignored, see scripts/gen-full-data.sh);
//! `--taste` adds the taste structure (topics, preferences, sessions) recommendations can learn.

use std::fs::{self, File};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use datagen::{
    generate, write_behavior_csv, write_item_features_csv, GeneratorConfig, TasteConfig,
};

/// Generate Amazon-Books-shaped behaviour data and item features, deterministically from a seed.
///
/// The same flags always give byte-identical files. Without flags this writes the committed
/// sample: data/behavior_sample.csv and data/item_features.csv.
#[derive(Debug, Parser)]
#[command(name = "datagen", version)]
struct Args {
    /// Preset for the original data's scale: 371,269 users, 200,000 items, written to
    /// data/full/behavior.csv and data/full/item_features.csv. Flags given explicitly override
    /// the preset.
    #[arg(long)]
    full: bool,

    /// Number of users [default: 2000; with --full: 371269].
    #[arg(long)]
    users: Option<usize>,

    /// Number of distinct item ids [default: 3000; with --full: 200000].
    #[arg(long)]
    items: Option<usize>,

    /// Seed of all randomness.
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Item feature dimension D.
    #[arg(long, default_value_t = 32)]
    dim: usize,

    /// Zipf exponent of item popularity (weight of rank r is 1/(r+1)^s).
    #[arg(long, default_value_t = 0.7)]
    zipf_s: f64,

    /// Target mean rows per user [default: 13.467…, i.e. 5,000,000 / 371,269].
    #[arg(long)]
    mean_rows_per_user: Option<f64>,

    /// Cap on rows per user.
    #[arg(long, default_value_t = 2_000)]
    max_rows_per_user: usize,

    /// Probability that a row reuses the day of an earlier row of the same user (same-second
    /// ties, as Amazon's review times are dates).
    #[arg(long, default_value_t = 0.3)]
    same_day_prob: f64,

    /// Give the data a taste structure: items in topics, users with a few preferred topics,
    /// sessions on one topic (the knobs below). Off, items follow global popularity alone, as
    /// in the committed sample.
    #[arg(long)]
    taste: bool,

    /// With --taste: number of topics.
    #[arg(long, requires = "taste", default_value_t = TasteConfig::default().topics)]
    topics: usize,

    /// With --taste: topics each user prefers (weights 1, 1/2, 1/4, ...).
    #[arg(long, requires = "taste", default_value_t = TasteConfig::default().preferred_topics)]
    preferred_topics: usize,

    /// With --taste: Zipf exponent of topic popularity.
    #[arg(long, requires = "taste", default_value_t = TasteConfig::default().topic_zipf_s)]
    topic_zipf_s: f64,

    /// With --taste: mean items per session (geometric).
    #[arg(long, requires = "taste", default_value_t = TasteConfig::default().mean_session_length)]
    mean_session_length: f64,

    /// With --taste: probability that a session strays to a topic outside the preferences.
    #[arg(long, requires = "taste", default_value_t = TasteConfig::default().stray_session_prob)]
    stray_session_prob: f64,

    /// Output directory, created if missing [default: data; with --full: data/full].
    #[arg(long)]
    out_dir: Option<PathBuf>,

    /// Behaviour file name inside the output directory
    /// [default: behavior_sample.csv; with --full: behavior.csv].
    #[arg(long)]
    behavior_file: Option<String>,

    /// Item features file name inside the output directory.
    #[arg(long, default_value = "item_features.csv")]
    features_file: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = Instant::now();

    let preset = if args.full {
        GeneratorConfig::full()
    } else {
        GeneratorConfig::default()
    };
    let config = GeneratorConfig {
        users: args.users.unwrap_or(preset.users),
        items: args.items.unwrap_or(preset.items),
        seed: args.seed,
        zipf_s: args.zipf_s,
        dim: args.dim,
        mean_rows_per_user: args.mean_rows_per_user.unwrap_or(preset.mean_rows_per_user),
        max_rows_per_user: args.max_rows_per_user,
        same_day_prob: args.same_day_prob,
        taste: args.taste.then_some(TasteConfig {
            topics: args.topics,
            preferred_topics: args.preferred_topics,
            topic_zipf_s: args.topic_zipf_s,
            mean_session_length: args.mean_session_length,
            stray_session_prob: args.stray_session_prob,
        }),
        ..preset
    };
    let (default_dir, default_behavior) = if args.full {
        ("data/full", "behavior.csv")
    } else {
        ("data", "behavior_sample.csv")
    };
    let out_dir = args.out_dir.unwrap_or_else(|| PathBuf::from(default_dir));
    let behavior_path = out_dir.join(args.behavior_file.as_deref().unwrap_or(default_behavior));
    let features_path = out_dir.join(&args.features_file);

    let dataset = generate(&config).context("invalid generator configuration")?;

    fs::create_dir_all(&out_dir)
        .with_context(|| format!("creating output directory {}", out_dir.display()))?;
    let file = File::create(&behavior_path)
        .with_context(|| format!("creating {}", behavior_path.display()))?;
    write_behavior_csv(&dataset, file)
        .with_context(|| format!("writing {}", behavior_path.display()))?;
    let file = File::create(&features_path)
        .with_context(|| format!("creating {}", features_path.display()))?;
    write_item_features_csv(&dataset, file)
        .with_context(|| format!("writing {}", features_path.display()))?;

    let ties = dataset.tie_stats();
    println!(
        "datagen: users={} items={} used_items={} rows={} tied_rows={} users_with_ties={} \
         seed={} seconds={:.2} -> {}, {}",
        dataset.users.len(),
        dataset.items.len(),
        dataset.used_items().len(),
        dataset.rows.len(),
        ties.tied_rows,
        ties.users_with_ties,
        config.seed,
        started.elapsed().as_secs_f64(),
        behavior_path.display(),
        features_path.display(),
    );
    Ok(())
}
