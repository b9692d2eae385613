//! Reads users' profiles from Redis (semantics §6) for GET /user_profile/{user_id}.
//!
//! The connection is made on first use and remade after a failure, so the API starts and serves
//! its other routes while Redis is down, and answers 503 for profiles until it is back. On a Redis
//! Cluster (`--redis-cluster`) the redis crate's cluster connection routes each read to its
//! slot's node and follows MOVED/ASK.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use tokio::sync::OnceCell;

/// Why a profile could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProfileReadError {
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis Cluster seeds (--redis with --redis-cluster): {0}")]
    Seeds(String),
}

impl ProfileReadError {
    /// Whether Redis refused the read for good (a missing ACL permission, bad credentials):
    /// retrying cannot help, the configuration must change.
    pub fn is_refusal(&self) -> bool {
        let Self::Redis(error) = self else {
            return false;
        };
        matches!(
            error.kind(),
            redis::ErrorKind::AuthenticationFailed
                | redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm)
        ) || matches!(error.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
    }
}

/// A lazily connected Redis reader.
pub struct ProfileReader {
    backend: Backend,
    timeout: Duration,
}

/// One Redis, or a cluster. The clients are boxed: they differ in size, and each is made once.
enum Backend {
    Single {
        client: Box<redis::Client>,
        connection: OnceCell<ConnectionManager>,
    },
    Cluster {
        client: Box<ClusterClient>,
        connection: OnceCell<ClusterConnection>,
    },
}

impl std::fmt::Debug for ProfileReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileReader")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ProfileReader {
    /// A reader for the Redis at `url` (`redis://` or `rediss://`); with `ca_pem` (PEM CA
    /// certificates, for a `rediss://` URL only) a TLS connection trusts those instead of the
    /// system's store. Fails only if the URL or the certificates are malformed.
    pub fn new(
        url: &str,
        ca_pem: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Self, redis::RedisError> {
        let certificates = |pem| redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        };
        let client = match ca_pem {
            None => redis::Client::open(url)?,
            Some(pem) => redis::Client::build_with_tls(url, certificates(pem))?,
        };
        Ok(ProfileReader {
            backend: Backend::Single {
                client: Box::new(client),
                connection: OnceCell::new(),
            },
            timeout,
        })
    }

    /// A reader for the Redis Cluster whose seed list is `seeds` (see `--redis-cluster`), with
    /// `ca_pem` as in [`new`](Self::new).
    pub fn cluster(
        seeds: &str,
        ca_pem: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Self, ProfileReadError> {
        let seeds =
            sink::cluster_seed_urls(seeds).map_err(|e| ProfileReadError::Seeds(e.to_string()))?;
        let mut builder = ClusterClient::builder(seeds)
            .connection_timeout(timeout)
            .response_timeout(timeout)
            // As for one Redis: one retry, so that a refusal is not hidden behind a timeout.
            .retries(1);
        if let Some(pem) = ca_pem {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            });
        }
        Ok(ProfileReader {
            backend: Backend::Cluster {
                client: Box::new(builder.build()?),
                connection: OnceCell::new(),
            },
            timeout,
        })
    }

    /// The raw JSON value stored under `key`, or `None` when the key is absent.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ProfileReadError> {
        let mut command = redis::cmd("GET");
        command.arg(key);
        self.query(command).await
    }

    /// Connects once, on a connection of its own, and asks for a PONG: the start-up check,
    /// which tells a Redis that refuses these credentials from one that is not reachable. (The
    /// reader's connection manager retries a refused AUTH until its timeout, which would hide
    /// the refusal.)
    pub async fn ping(&self) -> Result<(), ProfileReadError> {
        let ping = async {
            match &self.backend {
                Backend::Single { client, .. } => {
                    let mut connection = client.get_multiplexed_async_connection().await?;
                    let _: String = redis::cmd("PING").query_async(&mut connection).await?;
                }
                Backend::Cluster { client, .. } => {
                    // Connecting reads the slot map from a seed, with these credentials.
                    let mut connection = client.get_async_connection().await?;
                    let _: redis::Value = redis::cmd("PING").query_async(&mut connection).await?;
                }
            }
            Ok::<_, ProfileReadError>(())
        };
        tokio::time::timeout(self.timeout, ping)
            .await
            .map_err(|_| ProfileReadError::Timeout(self.timeout))?
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        command: redis::Cmd,
    ) -> Result<T, ProfileReadError> {
        let read = async {
            let value: T = match &self.backend {
                Backend::Single { client, connection } => {
                    let connection = connection
                        .get_or_try_init(|| {
                            // One retry: the manager's default (6, with backoff) outlasts the
                            // request's timeout, which then hides the reason (a refused
                            // certificate, a wrong password) behind "did not answer". The next
                            // request tries again anyway.
                            let config = ConnectionManagerConfig::new()
                                .set_connection_timeout(Some(self.timeout))
                                .set_response_timeout(Some(self.timeout))
                                .set_number_of_retries(1);
                            client.get_connection_manager_with_config(config)
                        })
                        .await?;
                    command.query_async(&mut connection.clone()).await?
                }
                Backend::Cluster { client, connection } => {
                    // The cluster connection reconnects to each node by itself.
                    let connection = connection
                        .get_or_try_init(|| client.get_async_connection())
                        .await?;
                    command.query_async(&mut connection.clone()).await?
                }
            };
            Ok::<_, ProfileReadError>(value)
        };
        tokio::time::timeout(self.timeout, read)
            .await
            .map_err(|_| ProfileReadError::Timeout(self.timeout))?
    }
}
