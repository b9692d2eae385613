//! Log output of both binaries: to stderr, filtered by `RUST_LOG` (default `info`), as text or
//! as JSON lines. The dataflow's per-epoch statistics are not logs: they go to stdout.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// How log lines are written (`--log-format`, `LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// For people; coloured only when stderr is a terminal.
    Text,
    /// One JSON object a line, for a log collector.
    Json,
}

/// Installs the global subscriber. Text is coloured only when stderr is a terminal, so that a
/// log file or a collector never gets escape codes.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // Fields at the top level of each object, next to level, target and timestamp, so a
        // collector indexes them without unpacking a nested "fields" object.
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
