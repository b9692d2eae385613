//! `datagen`: writes the deterministic behaviour CSV and item-features CSV of the `datagen`
//! library to disk. With no flags it regenerates the committed sample in `data/`, which has the
//! taste structure (topics, preferences, sessions) recommendations can learn; `--full` produces
//! the original data's scale in `data/full/` (gitignored, see scripts/gen-full-data.sh), by
//! popularity alone unless `--taste on`.

use std::fs::{self, File};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use datagen::{
    generate, write_behavior_csv, write_item_features_csv, GeneratorConfig, TasteConfig,
};

/// A feature on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

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

    /// The taste structure: items in topics, users with a few preferred topics, sessions on one
    /// topic (the knobs below). Off, items follow global popularity alone, as in the full-scale
    /// set [default: on; with --full: off]. `--taste` alone is `--taste on`.
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "on")]
    taste: Option<Switch>,

    /// Number of topics [default: 50].
    #[arg(long)]
    topics: Option<usize>,

    /// Topics each user prefers (weights 1, 1/2, 1/4, ...) [default: 3].
    #[arg(long)]
    preferred_topics: Option<usize>,

    /// Zipf exponent of topic popularity [default: 0.5].
    #[arg(long)]
    topic_zipf_s: Option<f64>,

    /// Mean items per session (geometric) [default: 4].
    #[arg(long)]
    mean_session_length: Option<f64>,

    /// Probability that a session strays to a topic outside the preferences [default: 0.1].
    #[arg(long)]
    stray_session_prob: Option<f64>,

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

    let config = config(&args)?;
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

/// What to generate: the preset (`--full` or the committed sample) with the flags given.
fn config(args: &Args) -> anyhow::Result<GeneratorConfig> {
    let preset = if args.full {
        GeneratorConfig::full()
    } else {
        GeneratorConfig::default()
    };
    Ok(GeneratorConfig {
        users: args.users.unwrap_or(preset.users),
        items: args.items.unwrap_or(preset.items),
        seed: args.seed,
        zipf_s: args.zipf_s,
        dim: args.dim,
        mean_rows_per_user: args.mean_rows_per_user.unwrap_or(preset.mean_rows_per_user),
        max_rows_per_user: args.max_rows_per_user,
        same_day_prob: args.same_day_prob,
        taste: taste(args, preset.taste.is_some())?,
        ..preset
    })
}

/// The taste structure asked for: `--taste`, else the preset's, with the knobs given. A knob
/// given without the structure is an error, not silently ignored.
fn taste(args: &Args, preset: bool) -> anyhow::Result<Option<TasteConfig>> {
    let on = args.taste.map_or(preset, |taste| taste == Switch::On);
    let knobs = args.topics.is_some()
        || args.preferred_topics.is_some()
        || args.topic_zipf_s.is_some()
        || args.mean_session_length.is_some()
        || args.stray_session_prob.is_some();
    if !on {
        anyhow::ensure!(
            !knobs,
            "--topics, --preferred-topics, --topic-zipf-s, --mean-session-length and \
             --stray-session-prob shape the taste structure, which is off: add --taste on"
        );
        return Ok(None);
    }
    let default = TasteConfig::default();
    Ok(Some(TasteConfig {
        topics: args.topics.unwrap_or(default.topics),
        preferred_topics: args.preferred_topics.unwrap_or(default.preferred_topics),
        topic_zipf_s: args.topic_zipf_s.unwrap_or(default.topic_zipf_s),
        mean_session_length: args
            .mean_session_length
            .unwrap_or(default.mean_session_length),
        stray_session_prob: args
            .stray_session_prob
            .unwrap_or(default.stray_session_prob),
    }))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn help_states_the_taste_defaults_the_library_uses() {
        let help = Args::command().render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let default = TasteConfig::default();
        for stated in [
            format!("[default: {}]", default.topics),
            format!("[default: {}]", default.preferred_topics),
            format!("[default: {}]", default.topic_zipf_s),
            format!("[default: {}]", default.mean_session_length),
            format!("[default: {}]", default.stray_session_prob),
        ] {
            assert!(help.contains(&stated), "{stated} missing from:\n{help}");
        }
    }

    #[test]
    fn the_sample_has_taste_and_the_full_set_not_unless_asked() {
        let parse = |flags: &[&str]| {
            let args = Args::try_parse_from([&["datagen"], flags].concat()).unwrap();
            config(&args).map(|config| config.taste.map(|t| t.topics))
        };
        // Without flags, exactly the committed sample's configuration.
        let args = Args::try_parse_from(["datagen"]).unwrap();
        assert_eq!(config(&args).unwrap(), GeneratorConfig::default());
        assert_eq!(parse(&[]).unwrap(), Some(50));
        assert_eq!(parse(&["--topics", "7"]).unwrap(), Some(7));
        assert_eq!(parse(&["--full"]).unwrap(), None);
        assert_eq!(parse(&["--full", "--taste", "on"]).unwrap(), Some(50));
        assert_eq!(parse(&["--full", "--taste"]).unwrap(), Some(50));
        assert_eq!(parse(&["--taste", "--topics", "7"]).unwrap(), Some(7));
        assert_eq!(parse(&["--taste", "off"]).unwrap(), None);
        assert!(parse(&["--taste", "off", "--topics", "7"]).is_err());
    }
}
