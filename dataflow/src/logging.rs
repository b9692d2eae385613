//! Log output of the binary: to stderr, filtered by `RUST_LOG` (default `info`), as text or as
//! JSON lines. Per-epoch statistics are not logs: they go to stdout (see [`crate::stats`]).
//!
//! The same as the ingest API's `logging` module, kept as a copy: the only crate both binaries
//! depend on is `profile`, the data contract, which would have to take clap and
//! tracing-subscriber (with its env-filter and json features) for these few lines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

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
