//! The streamrec ingest API: an axum service, drop-in for the original FastAPI one, that looks up
//! a user's behaviour history (semantics §1) in a store loaded from CSV and publishes it as a
//! profile message (§2) to Kafka, answering once the broker acknowledged it. It also reads the
//! profiles the dataflow wrote to Redis (§6), and serves health, Prometheus metrics and its own
//! OpenAPI docs.
//!
//! `main` only parses configuration and calls [`run`]; tests build an [`AppState`] and drive
//! [`app`] with `oneshot`, or [`serve`] a listener and stop it through the shutdown future.

pub mod auth;
pub mod config;
pub mod error;
pub mod extract;
pub mod metrics;
pub mod producer;
pub mod profiles;
pub mod routes;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use profile::{ProfileMessageRef, RateLimit};
use tokio::net::TcpListener;

pub use config::Config;
pub use error::AppError;
pub use producer::Delivery;
pub use routes::app;

use auth::ApiTokens;
use metrics::Metrics;
use producer::ProfileProducer;
use profiles::ProfileReader;
use store::BehaviorStore;

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Load(#[from] store::LoadError),
    #[error("cannot create the Kafka producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
    #[error("bad Redis URL or TLS settings: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("bad Redis settings: {0}")]
    RedisCluster(#[from] profiles::ProfileReadError),
    #[error("cannot read the Redis CA file {path}: {source}")]
    RedisCaFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tokens(#[from] auth::TokenFileError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Serve(std::io::Error),
    #[error(
        "topic {topic:?} (--topic / KAFKA_TOPIC) does not exist on {brokers} \
         (scripts/services.sh start creates it)"
    )]
    TopicMissing { topic: String, brokers: String },
    #[error("Redis {url} (--redis / REDIS_URL) refuses this client: {reason}")]
    RedisRefused {
        /// The URL with its password shown as `***`.
        url: String,
        reason: String,
    },
}

/// Everything a request handler needs, cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Arc<BehaviorStore>,
    pub producer: ProfileProducer,
    pub profiles: Arc<ProfileReader>,
    pub metrics: Arc<Metrics>,
    /// The accepted bearer tokens, when `API_TOKENS_FILE` is set.
    pub tokens: Option<Arc<ApiTokens>>,
    /// The warnings of failed requests (publish, profile read, health check), at most one a
    /// second: a broker or Redis outage under load fails every request.
    warnings: Arc<RateLimit>,
}

impl AppState {
    /// Builds the state from a configuration and an already loaded store.
    pub fn new(config: Config, store: BehaviorStore) -> Result<Self, ServeError> {
        // The tokens first: a bad tokens file should stop the start before anything connects.
        let tokens = config
            .api_tokens_file
            .as_deref()
            .map(|path| ApiTokens::load(path, config.api_tokens_for_reads))
            .transpose()?
            .map(Arc::new);
        if let Some(tokens) = &tokens {
            tracing::info!(
                tokens = tokens.len(),
                reads_protected = tokens.protects_reads(),
                "API bearer tokens loaded; the write endpoints require one"
            );
        }
        let ca_pem = config
            .redis_ca_file
            .as_deref()
            .map(|path| {
                std::fs::read(path).map_err(|source| ServeError::RedisCaFile {
                    path: path.to_owned(),
                    source,
                })
            })
            .transpose()?;
        let producer = ProfileProducer::new(&config)?;
        let redis_timeout = Duration::from_secs(2);
        let profiles = if config.shared.redis_cluster {
            ProfileReader::cluster(&config.shared.redis, ca_pem, redis_timeout)?
        } else {
            ProfileReader::new(&config.shared.redis, ca_pem, redis_timeout)?
        };
        let metrics = Metrics::new(store.stats());
        Ok(AppState {
            config: Arc::new(config),
            store: Arc::new(store),
            producer,
            profiles: Arc::new(profiles),
            metrics: Arc::new(metrics),
            tokens,
            warnings: Arc::new(RateLimit::per_second()),
        })
    }

    /// Loads the behaviour CSV named by the configuration (off the async threads) and builds the
    /// state.
    pub async fn load(config: Config) -> Result<Self, ServeError> {
        let path = config.behavior_csv.clone();
        let store = tokio::task::spawn_blocking(move || BehaviorStore::load(&path))
            .await
            .map_err(|e| ServeError::Serve(std::io::Error::other(e)))??;
        let stats = store.stats();
        tracing::info!(
            path = %config.behavior_csv.display(),
            users = stats.users,
            items = stats.items,
            rows = stats.rows,
            bad_rows = stats.bad_rows,
            seconds = format_args!("{:.2}", stats.seconds),
            "loaded behaviour data"
        );
        if stats.bad_rows > 0 {
            tracing::warn!(
                bad_rows = stats.bad_rows,
                "some behaviour rows did not parse and were skipped"
            );
        }
        Self::new(config, store)
    }

    /// `history(user, at)` with the configured history length.
    pub fn history(&self, user_id: &str, at: u64) -> Vec<&str> {
        self.store
            .history(user_id, at, self.config.shared.max_history)
    }

    /// Encodes and publishes one profile message, recording metrics.
    pub async fn publish(
        &self,
        user_id: &str,
        history: &[&str],
        timestamp: u64,
    ) -> Result<Delivery, AppError> {
        let payload = ProfileMessageRef {
            user_id,
            history_items: history,
            timestamp,
        }
        .encode(self.config.shared.encoding);
        match self.producer.publish(user_id, &payload).await {
            Ok((delivery, latency)) => {
                self.metrics.messages_published.inc();
                self.metrics.publish_latency.observe(latency.as_secs_f64());
                Ok(delivery)
            }
            Err(error) => {
                self.metrics.publish_failures.inc();
                if let Some(suppressed) = self.warnings.allow() {
                    tracing::warn!(%error, topic = self.producer.topic(), suppressed, "publish failed");
                }
                Err(AppError::BrokerUnavailable)
            }
        }
    }
}

/// Loads the data, listens on the configured address and serves until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let addr = config.bind.clone();
    let state = AppState::load(config).await?;
    check_at_start(&state).await?;
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    serve(listener, state, shutdown).await
}

/// Checks the broker and Redis before listening. A broker that answers that the topic does not
/// exist, or a Redis that refuses these credentials, is a configuration that will never work:
/// the service does not start. One that does not answer may be starting too (the API is meant
/// to start and serve its other routes while they are down): a warning, and /healthz answers 503
/// until the broker is back.
async fn check_at_start(state: &AppState) -> Result<(), ServeError> {
    let (kafka, redis) = tokio::join!(state.producer.health(), state.profiles.ping());
    match kafka {
        Ok(_) => {}
        Err(producer::HealthError::TopicMissing) => {
            return Err(ServeError::TopicMissing {
                topic: state.producer.topic().to_owned(),
                brokers: state.config.shared.brokers.clone(),
            })
        }
        Err(error) => tracing::warn!(
            %error,
            brokers = %state.config.shared.brokers,
            "no Kafka broker answered at start; starting anyway, /healthz answers 503 until one does"
        ),
    }
    match redis {
        Ok(()) => {}
        Err(profiles::ProfileReadError::Redis(error))
            if !(error.is_io_error()
                || error.is_timeout()
                || error.is_connection_refusal()
                || error.is_connection_dropped()) =>
        {
            return Err(ServeError::RedisRefused {
                url: state.config.shared.redis_redacted(),
                reason: error.to_string(),
            })
        }
        Err(error) => tracing::warn!(
            %error,
            redis = %state.config.shared.redis_redacted(),
            "Redis did not answer at start; starting anyway, profiles answer 503 until it does"
        ),
    }
    Ok(())
}

/// Serves on `listener` until `shutdown` completes: then it stops accepting, lets in-flight
/// requests finish, and flushes the producer.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, topic = state.producer.topic(), "ingest API listening; docs at /docs");
    }
    let producer = state.producer.clone();
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ServeError::Serve)?;
    tracing::info!("stopped accepting; flushing the producer");
    if let Err(error) = producer.flush(Duration::from_secs(10)).await {
        tracing::warn!(%error, "some messages were not delivered before shutdown");
    }
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested");
}
