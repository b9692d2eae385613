//! The recommendations' evaluation: `cargo run --release -p streamrec-bench --bin bench-recs --
//! --help`.

use std::path::PathBuf;

use anyhow::Context;
use bench::chart::{write_bar_chart, BarSeries};
use bench::recs::{
    evaluate, leave_last_out, read_behavior_file, BehaviorLayout, Column, DataflowRecommender,
    PopularityBaseline, Recommender, ReferenceRecommender, CUTOFF,
};
use clap::Parser;
use dataflow::recommend::reference::{
    RecommendSettings, DEFAULT_COVISIT_WINDOW, DEFAULT_NEIGHBOURS, DEFAULT_RECOMMENDATIONS_N,
};

/// Evaluates streamrec's recommendations (semantics §8) against the popularity baseline on a
/// behaviour CSV, leave-last-out: each user's items at their last timestamp are held out, the
/// rest (the newest --max-history in history order) is their profile. Prints HR@10 and NDCG@10
/// of both over the same users, and writes them as JSON and as an SVG bar chart. Needs no
/// broker and no Redis.
#[derive(Debug, Parser)]
#[command(name = "bench-recs", version)]
struct Args {
    /// Behaviour CSV with the columns `user_id`, `item_id`, `timestamp` (others ignored), or
    /// as the layout flags below say.
    #[arg(long, default_value = "data/behavior_sample.csv")]
    behavior_csv: PathBuf,
    /// Items of a profile kept (the newest).
    #[arg(long, default_value_t = profile::DEFAULT_MAX_HISTORY)]
    max_history: usize,
    /// W: a user's newest history positions that co-visitation counts.
    #[arg(long, default_value_t = DEFAULT_COVISIT_WINDOW)]
    covisit_window: usize,
    /// K: neighbours kept per item.
    #[arg(long, default_value_t = DEFAULT_NEIGHBOURS)]
    neighbours: usize,
    /// N: recommendations per user (the metrics count the first 10).
    #[arg(long, default_value_t = DEFAULT_RECOMMENDATIONS_N)]
    recommendations_n: usize,
    /// Recency decay of a window item's weight, in (0, 1].
    #[arg(long, default_value_t = profile::DEFAULT_DECAY)]
    decay: f64,
    /// Which implementation computes streamrec's lists: `dataflow` (the pipeline's own
    /// differential operators) or `reference` (the sequential definition, for comparison).
    #[arg(long, value_enum, default_value_t = Engine::Dataflow)]
    engine: Engine,
    /// Worker threads of the dataflow engine.
    #[arg(short = 'w', long, default_value_t = 2)]
    workers: usize,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "target/bench/recs.json")]
    json: PathBuf,
    /// Where to write the SVG bar chart.
    #[arg(long, default_value = "target/bench/recs.svg")]
    chart: PathBuf,
    // Last: its help heading applies to the arguments after it.
    #[command(flatten)]
    layout: LayoutArgs,
}

/// How the behaviour file is laid out, when not as semantics §1's CSV.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Layout of the behaviour file")]
struct LayoutArgs {
    /// The user column: its header name, or with --no-header its 0-based position.
    #[arg(long, default_value = "user_id")]
    user_column: String,
    /// The item column: its header name, or with --no-header its 0-based position.
    #[arg(long, default_value = "item_id")]
    item_column: String,
    /// The timestamp column (unsigned integers in any unit; only their order counts): its
    /// header name, or with --no-header its 0-based position.
    #[arg(long, default_value = "timestamp")]
    timestamp_column: String,
    /// The field separator: one ASCII character, or `tab`.
    #[arg(long, default_value = ",")]
    delimiter: String,
    /// The first line is a row, not column names; columns are then given by position.
    #[arg(long)]
    no_header: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Engine {
    Dataflow,
    Reference,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.decay > 0.0 && args.decay <= 1.0,
        "--decay must be in (0, 1], got {}",
        args.decay
    );
    anyhow::ensure!(args.max_history >= 1, "--max-history must be at least 1");
    let settings = RecommendSettings {
        covisit_window: args.covisit_window,
        neighbours: args.neighbours,
        recommendations_n: args.recommendations_n,
        decay: args.decay,
    };
    let (entries, read) = read_behavior_file(&args.behavior_csv, &layout(&args.layout)?)?;
    let split = leave_last_out(&entries, args.max_history);
    // The rows as read are a third of the peak at full scale, and the split has what the
    // engines need.
    let users = entries.len();
    drop(entries);
    let dataflow_engine = DataflowRecommender {
        settings,
        max_history: args.max_history,
        workers: args.workers,
    };
    let reference_engine = ReferenceRecommender { settings };
    let engines: [&dyn Recommender; 2] = [
        match args.engine {
            Engine::Dataflow => &dataflow_engine,
            Engine::Reference => &reference_engine,
        },
        &PopularityBaseline {
            covisit_window: settings.covisit_window,
            n: settings.recommendations_n,
        },
    ];
    let scores: Vec<_> = engines
        .iter()
        .map(|engine| evaluate(*engine, &split))
        .collect();
    let held_out: usize = split.held_out.values().map(|items| items.len()).sum();

    println!(
        "{}: {} rows ({} bad), {} users: {} evaluated, {} skipped (nothing before their last \
         timestamp); {} held-out items",
        args.behavior_csv.display(),
        read.rows,
        read.bad_rows,
        users,
        split.profiles.len(),
        split.skipped_users,
        held_out
    );
    println!(
        "W={} K={} N={} decay={} max_history={}",
        settings.covisit_window,
        settings.neighbours,
        settings.recommendations_n,
        settings.decay,
        args.max_history
    );
    println!(
        "{:<12} {:>8} {:>8} {:>7} {:>8} {:>9}",
        "engine", "HR@10", "NDCG@10", "hits", "list", "seconds"
    );
    for s in &scores {
        println!(
            "{:<12} {:>8.4} {:>8.4} {:>7} {:>8.2} {:>9.2}",
            s.engine, s.hr_at_10, s.ndcg_at_10, s.hits, s.mean_list_length, s.seconds
        );
    }
    // The baseline scores zero when no held-out item is popular: no ratio then, `null` in the
    // JSON.
    let hr_ratio = bench::ratio(scores[0].hr_at_10, scores[1].hr_at_10);
    let ndcg_ratio = bench::ratio(scores[0].ndcg_at_10, scores[1].ndcg_at_10);
    let shown =
        |ratio: Option<f64>| ratio.map_or("n/a (baseline 0)".to_owned(), |r| format!("{r:.2}x"));
    println!(
        "streamrec / popularity: HR@10 {}, NDCG@10 {}",
        shown(hr_ratio),
        shown(ndcg_ratio)
    );

    let report = serde_json::json!({
        "behavior_csv": args.behavior_csv,
        "read": read,
        "users": users,
        "evaluated_users": split.profiles.len(),
        "skipped_users": split.skipped_users,
        "held_out_items": held_out,
        "cutoff": CUTOFF,
        "settings": {
            "covisit_window": settings.covisit_window,
            "neighbours": settings.neighbours,
            "recommendations_n": settings.recommendations_n,
            "decay": settings.decay,
            "max_history": args.max_history,
        },
        "engines": scores,
        "hr_at_10_ratio": hr_ratio,
        "ndcg_at_10_ratio": ndcg_ratio,
    });
    bench::write_json(&args.json, &report)?;
    if let Some(parent) = args.chart.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let series: Vec<BarSeries> = scores
        .iter()
        .map(|s| BarSeries {
            name: s.engine.clone(),
            values: vec![s.hr_at_10, s.ndcg_at_10],
        })
        .collect();
    let title = format!(
        "leave-last-out on {}: {} users, W={} K={} N={}",
        args.behavior_csv.display(),
        split.profiles.len(),
        settings.covisit_window,
        settings.neighbours,
        settings.recommendations_n
    );
    write_bar_chart(
        &args.chart,
        &title,
        "mean over the evaluated users",
        &["HR@10", "NDCG@10"],
        &series,
    )?;
    println!("wrote {} and {}", args.json.display(), args.chart.display());
    Ok(())
}

/// The behaviour file's layout from the flags.
fn layout(args: &LayoutArgs) -> anyhow::Result<BehaviorLayout> {
    let delimiter = match args.delimiter.as_str() {
        "tab" | "\\t" => b'\t',
        other => match other.as_bytes() {
            [byte] if byte.is_ascii() => *byte,
            _ => anyhow::bail!(
                "--delimiter must be one ASCII character or `tab`, got {:?}",
                args.delimiter
            ),
        },
    };
    let column = |flag: &str, value: &str| -> anyhow::Result<Column> {
        if args.no_header {
            let index = value.parse().with_context(|| {
                format!("with --no-header, --{flag} must be a 0-based position, got {value:?}")
            })?;
            Ok(Column::Index(index))
        } else {
            Ok(Column::Name(value.to_owned()))
        }
    };
    Ok(BehaviorLayout {
        delimiter,
        header: !args.no_header,
        user: column("user-column", &args.user_column)?,
        item: column("item-column", &args.item_column)?,
        timestamp: column("timestamp-column", &args.timestamp_column)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_of(flags: &[&str]) -> anyhow::Result<BehaviorLayout> {
        let args = Args::try_parse_from([&["bench-recs"], flags].concat())?;
        layout(&args.layout)
    }

    #[test]
    fn the_layout_flags_name_columns_or_give_positions() {
        assert_eq!(layout_of(&[]).unwrap(), BehaviorLayout::default());
        let tsv = layout_of(&[
            "--no-header",
            "--delimiter",
            "tab",
            "--user-column",
            "1",
            "--item-column",
            "2",
            "--timestamp-column",
            "0",
        ])
        .unwrap();
        assert_eq!(
            (tsv.delimiter, tsv.header, tsv.user, tsv.item, tsv.timestamp),
            (
                b'\t',
                false,
                Column::Index(1),
                Column::Index(2),
                Column::Index(0)
            )
        );
        let named = layout_of(&["--user-column", "userId", "--delimiter", ";"]).unwrap();
        assert_eq!(
            (named.delimiter, named.user),
            (b';', Column::Name("userId".into()))
        );
        // A name without a header, and a separator of two characters, are refused.
        assert!(layout_of(&["--no-header"]).is_err());
        assert!(layout_of(&["--delimiter", "::"]).is_err());
    }
}
