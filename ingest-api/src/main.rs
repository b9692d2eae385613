//! The ingest-api binary: configuration, logging, and the service until Ctrl-C or SIGTERM.

use anyhow::Context;
use ingest_api::Config;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let config = Config::from_env_and_args()?;
    ingest_api::run(config, ingest_api::shutdown_signal())
        .await
        .context("ingest API failed")
}
