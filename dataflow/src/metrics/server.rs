//! The HTTP listener of `--metrics-addr`: `GET /metrics` answers the [`Metrics`] text, anything
//! else 404. The dataflow's threads are timely's and the writers', none of them async, so the
//! server has a thread of its own running a current-thread tokio runtime: axum and tokio are
//! already built for the ingest API, and one thread that sleeps between scrapes costs the
//! workers nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::oneshot;

use super::Metrics;

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the metrics server: {0}")]
    Start(#[from] std::io::Error),
}

/// The running listener. Dropping it stops the server; its thread then ends on its own (it is
/// not waited for: a scraper that keeps its connection open must not hold up the exit).
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl MetricsServer {
    /// Listens on `addr` (port 0 picks a free port, see [`local_addr`](Self::local_addr)) and
    /// serves `metrics` from a thread of its own. The address is bound before this returns, so
    /// a port in use is an error at start, and logged as the `metrics_addr` field once bound.
    pub fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<Self, MetricsError> {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|source| MetricsError::Bind { addr, source })?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let listener = {
            // Registering the socket with the runtime's reactor needs its context.
            let _context = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let (shutdown, stopped) = oneshot::channel::<()>();
        let app = Router::new()
            .route("/metrics", get(scrape))
            .with_state(metrics);
        std::thread::Builder::new()
            .name("metrics-http".to_owned())
            .spawn(move || {
                let served = runtime.block_on(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            // A dropped sender (the server dropped) stops it too.
                            let _ = stopped.await;
                        })
                        .await
                });
                if let Err(error) = served {
                    tracing::error!(%error, "the metrics server stopped");
                }
            })?;
        tracing::info!(metrics_addr = %local, "serving Prometheus metrics at GET /metrics");
        Ok(MetricsServer {
            addr: local,
            shutdown: Some(shutdown),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            // Fails only if the server has stopped already.
            let _ = shutdown.send(());
        }
    }
}

/// `GET /metrics`: the text, in the OpenMetrics flavour Prometheus asks for first.
async fn scrape(State(metrics): State<Arc<Metrics>>) -> Response {
    match metrics.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        // Writing into a String fails only if a metric's encoding does, which none of ours can.
        Err(error) => {
            tracing::error!(%error, "cannot encode the metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// One request over a fresh connection; the whole response.
    fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    }

    #[test]
    fn serves_the_text_on_a_free_port_and_nothing_else() {
        let metrics = Arc::new(Metrics::new());
        metrics
            .writer()
            .wrote(3, std::time::Duration::ZERO, Default::default());
        let server = MetricsServer::start(SocketAddr::from(([127, 0, 0, 1], 0)), metrics).unwrap();
        assert_ne!(server.local_addr().port(), 0);
        let response = get(server.local_addr(), "/metrics");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.contains("content-type: application/openmetrics-text"),
            "{response}"
        );
        assert!(
            response.contains("\nstreamrec_dataflow_redis_writes_total 3\n"),
            "{response}"
        );
        assert!(get(server.local_addr(), "/").starts_with("HTTP/1.1 404"));
        // A second listener on the same port is an error at start.
        assert!(matches!(
            MetricsServer::start(server.local_addr(), Arc::new(Metrics::new())),
            Err(MetricsError::Bind { .. })
        ));
    }
}
