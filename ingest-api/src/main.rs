//! The ingest-api binary: configuration, logging, and the service until Ctrl-C or SIGTERM.

use anyhow::Context;
use ingest_api::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Configuration first: it names the log format, and its .env may set RUST_LOG.
    let config = Config::from_env_and_args()?;
    settings::logging::init(config.shared.log_format);
    // Secrets (the Redis URL's password, secret -X properties) are shown as *** by Debug.
    tracing::info!(config = ?config, "configuration");
    ingest_api::run(config, ingest_api::shutdown_signal())
        .await
        .context("ingest API failed")
}
