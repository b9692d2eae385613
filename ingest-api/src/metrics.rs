//! Prometheus metrics of the ingest API, served as text at GET /metrics.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::store::LoadStats;
use crate::AppState;

/// Labels of a served request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template, e.g. `/user_profile/{user_id}`, or `unmatched`.
    pub route: String,
    pub method: String,
    pub status: u16,
}

/// Labels of a route.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.1 ms .. ~1.6 s: a publish is acknowledged in about a millisecond when the broker is well,
    // and times out after seconds when it is not.
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

/// Every metric the service exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<RouteLabels>,
    pub messages_published: Counter,
    pub publish_failures: Counter,
    pub publish_latency: Histogram,
    /// Set from the producer when metrics are read: it is the producer's generation number.
    pub producer_replacements: Gauge,
}

impl Metrics {
    /// Creates the metrics, with the behaviour load's statistics as constant gauges.
    pub fn new(load: &LoadStats) -> Self {
        let mut registry = Registry::with_prefix("streamrec_ingest");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests served, by route, method and status",
            requests.clone(),
        );
        let request_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to answer an HTTP request, by route",
            request_duration.clone(),
        );
        let messages_published = Counter::default();
        registry.register(
            "messages_published",
            "Profile messages acknowledged by the broker",
            messages_published.clone(),
        );
        let publish_failures = Counter::default();
        registry.register(
            "publish_failures",
            "Profile messages the broker did not acknowledge in time or refused",
            publish_failures.clone(),
        );
        let publish_latency = latency_histogram();
        registry.register(
            "publish_latency_seconds",
            "Time from handing a profile message to the producer to the broker's acknowledgement",
            publish_latency.clone(),
        );
        let producer_replacements = Gauge::<i64>::default();
        registry.register(
            "producer_replacements",
            "Times the Kafka producer died (fenced or fatal) and was replaced by a new one",
            producer_replacements.clone(),
        );
        for (name, help, value) in [
            ("behavior_users", "Users in the behaviour CSV", load.users),
            (
                "behavior_items",
                "Distinct items in the behaviour CSV",
                load.items,
            ),
            (
                "behavior_rows",
                "Rows loaded from the behaviour CSV",
                load.rows,
            ),
            (
                "behavior_bad_rows",
                "Rows of the behaviour CSV that did not parse and were skipped",
                load.bad_rows,
            ),
        ] {
            let gauge = Gauge::<i64>::default();
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
            registry.register(name, help, gauge);
        }
        let load_seconds = Gauge::<f64, AtomicU64>::default();
        load_seconds.set(load.seconds);
        registry.register(
            "behavior_load_seconds",
            "Time taken to load the behaviour CSV at start",
            load_seconds,
        );
        Metrics {
            registry,
            requests,
            request_duration,
            messages_published,
            publish_failures,
            publish_latency,
            producer_replacements,
        }
    }

    /// The metrics in the Prometheus (OpenMetrics) text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("encoding metrics into a String");
        text
    }
}

/// Middleware that counts and times every request by its route template.
pub async fn track_requests(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = &state.metrics;
    metrics
        .request_duration
        .get_or_create(&RouteLabels {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .requests
        .get_or_create(&RequestLabels {
            route,
            method,
            status: response.status().as_u16(),
        })
        .inc();
    response
}
