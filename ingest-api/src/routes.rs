//! The HTTP routes: the original service's three endpoints, the recommendations the dataflow
//! stores (semantics §8), health, metrics and API docs.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use futures::future::join_all;
use rand::Rng;
use serde::{Deserialize, Serialize};
use utoipa::{OpenApi, ToSchema};
use utoipa_swagger_ui::SwaggerUi;

use crate::auth::{require_token, ApiTokens};
use crate::error::{json_errors, AppError, ErrorBody};
use crate::extract::{JsonBody, UserIdPath, MAX_BODY_BYTES};
use crate::metrics::track_requests;
use crate::AppState;

/// A user and the time up to which their history counts.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct InterestRequest {
    /// The user, as in the behaviour data (an opaque string, 1..=256 bytes).
    #[schema(example = "A34O9UGRTZNTR8")]
    pub user_id: String,
    /// Unix seconds; history items at or before it are sent.
    #[schema(example = 1456923842, minimum = 0, maximum = 9007199254740992_u64)]
    pub timestamp: u64,
}

impl InterestRequest {
    fn validate(&self) -> Result<(), AppError> {
        profile::validate_user_id(&self.user_id)
            .and_then(|()| profile::validate_timestamp(self.timestamp))
            .map_err(|e| AppError::Unprocessable(e.to_string()))
    }
}

/// The answer to a successful /push_interest/.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PushResponse {
    /// Always `"success"`.
    #[schema(example = "success")]
    pub status: String,
    pub user_id: String,
    /// Items in the published history (at most MAX_HISTORY).
    pub history_items_count: usize,
    /// Partition the broker stored the message in.
    pub partition: i32,
    /// Offset the broker gave the message.
    pub offset: i64,
}

/// The answer to a successful /send_kafka/.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SendResponse {
    #[schema(example = "Sent 42 user profiles to Kafka")]
    pub message: String,
    /// Profile messages the broker acknowledged.
    pub sent: usize,
}

/// The answer to GET /recommendation/{user_id} (semantics §8).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecommendationResponse {
    pub user_id: String,
    /// `user`: the user's own list, as the dataflow last stored it; `popular`: the user has
    /// none, and these are the most popular items.
    #[schema(example = "user")]
    pub source: String,
    /// At most k items: `{"item_id", "score"}` from the user's list, or `{"item_id", "users"}`
    /// from the popular items.
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<serde_json::Value>,
}

/// The stored recommendations of a user, as far as the API reads them.
#[derive(Deserialize)]
struct StoredRecommendations {
    items: Vec<serde_json::Value>,
}

/// The answer to a successful /healthz.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    #[schema(example = "ok")]
    pub status: String,
    pub topic: String,
    /// Brokers in the cluster's metadata.
    pub brokers: usize,
    /// Partitions of the profile topic.
    pub partitions: usize,
}

/// The OpenAPI description, generated from the handlers below.
#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "streamrec ingest API",
        description = "Publishes users' behaviour histories as profile messages to Kafka and reads \
                       their interest profiles from Redis."
    ),
    paths(
        push_interest,
        send_kafka,
        user_profile,
        recommendation,
        healthz,
        metrics
    ),
    components(schemas(
        InterestRequest,
        PushResponse,
        SendResponse,
        RecommendationResponse,
        HealthResponse,
        ErrorBody
    ))
)]
pub struct ApiDoc;

/// The service's router. Every route is also reachable without its trailing slash, as FastAPI
/// allowed through a redirect.
///
/// With bearer tokens configured, the write routes (and the profile reads, if so configured)
/// check the `Authorization` header before anything else; health, metrics and the docs stay
/// open so that probes, scrapers and people reading the docs need no token.
pub fn app(state: AppState) -> Router {
    let mut writes = Router::new()
        .route("/push_interest/", post(push_interest))
        .route("/push_interest", post(push_interest))
        .route("/send_kafka/", post(send_kafka))
        .route("/send_kafka", post(send_kafka));
    let mut reads = Router::new()
        .route("/user_profile/{user_id}", get(user_profile))
        .route("/recommendation/{user_id}", get(recommendation));
    if let Some(tokens) = &state.tokens {
        // route_layer: only requests that match a route are checked, so an unknown path is
        // still 404 and a wrong method still 405.
        let check = || middleware::from_fn_with_state(Arc::clone(tokens), require_token);
        writes = writes.route_layer(check());
        if tokens.protects_reads() {
            reads = reads.route_layer(check());
        }
    }
    let docs = openapi(state.tokens.as_deref());
    Router::new()
        .merge(writes)
        .merge(reads)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .merge(SwaggerUi::new("/docs").url("/openapi.json", docs))
        .fallback(no_route)
        // After every route: it applies to the routes registered before it. The router adds the
        // Allow header to what the handler answers.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            track_requests,
        ))
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}

/// The name of the bearer security scheme in the OpenAPI description.
const BEARER_SCHEME: &str = "bearer";

/// The OpenAPI description: [`ApiDoc`], plus, when tokens are configured, the bearer security
/// scheme and a 401 answer on the routes that need a token.
pub fn openapi(tokens: Option<&ApiTokens>) -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::SecurityScheme;
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement};
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};

    let mut doc = ApiDoc::openapi();
    let Some(tokens) = tokens else {
        return doc;
    };
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            BEARER_SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("One of the tokens in the service's API_TOKENS_FILE"))
                    .build(),
            ),
        );
    let unauthorized = ResponseBuilder::new()
        .description("Missing or invalid bearer token; the WWW-Authenticate header says which")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    let mut protected = vec!["/push_interest/", "/send_kafka/"];
    if tokens.protects_reads() {
        protected.push("/user_profile/{user_id}");
    }
    for path in protected {
        let Some(item) = doc.paths.paths.get_mut(path) else {
            continue;
        };
        for operation in [item.get.as_mut(), item.post.as_mut()]
            .into_iter()
            .flatten()
        {
            operation.security = Some(vec![SecurityRequirement::new(
                BEARER_SCHEME,
                Vec::<String>::new(),
            )]);
            operation
                .responses
                .responses
                .insert("401".into(), unauthorized.clone().into());
        }
    }
    doc
}

/// Any path no route matches.
async fn no_route() -> AppError {
    AppError::NoRoute
}

/// A path that exists, with a method it does not take.
async fn method_not_allowed() -> AppError {
    AppError::MethodNotAllowed
}

/// Publish one user's history up to a time.
///
/// Looks up history(user_id, timestamp) in the behaviour data and publishes it as one profile
/// message keyed by user_id; answers once the broker acknowledged it.
#[utoipa::path(
    post,
    path = "/push_interest/",
    request_body = InterestRequest,
    responses(
        (status = 200, description = "Published and acknowledged", body = PushResponse),
        (status = 400, description = "Body is not JSON", body = ErrorBody),
        (status = 404, description = "Unknown user or no history up to that time", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "Missing field, wrong type or value out of range", body = ErrorBody),
        (status = 503, description = "Broker did not acknowledge in time", body = ErrorBody),
    )
)]
pub async fn push_interest(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<InterestRequest>,
) -> Result<Json<PushResponse>, AppError> {
    request.validate()?;
    let history = state.history(&request.user_id, request.timestamp);
    if history.is_empty() {
        return Err(AppError::NotFound("No history found"));
    }
    let delivery = state
        .publish(&request.user_id, &history, request.timestamp)
        .await?;
    Ok(Json(PushResponse {
        status: "success".into(),
        history_items_count: history.len(),
        user_id: request.user_id,
        partition: delivery.partition,
        offset: delivery.offset,
    }))
}

/// Publish a user and a random sample of other users.
///
/// Publishes the user's profile and those of RANDOM_USER_MIN..=RANDOM_USER_MAX other distinct
/// users picked uniformly at random, each with its history up to the same time. Users with no
/// history then are skipped.
#[utoipa::path(
    post,
    path = "/send_kafka/",
    request_body = InterestRequest,
    responses(
        (status = 200, description = "Published and acknowledged", body = SendResponse),
        (status = 400, description = "Body is not JSON", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB", body = ErrorBody),
        (status = 422, description = "Missing field, wrong type or value out of range", body = ErrorBody),
        (status = 503, description = "Broker did not acknowledge them all in time", body = ErrorBody),
    )
)]
pub async fn send_kafka(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<InterestRequest>,
) -> Result<Json<SendResponse>, AppError> {
    request.validate()?;
    let (min, max) = (state.config.random_user_min, state.config.random_user_max);
    let others = {
        // The thread's generator is not Send: use it up before the first await.
        let mut rng = rand::rng();
        let count = rng.random_range(min..=max);
        state
            .store
            .sample_other_users(&mut rng, count, &request.user_id)
    };
    let profiles: Vec<(&str, Vec<&str>)> = std::iter::once(request.user_id.as_str())
        .chain(others)
        .map(|user| (user, state.history(user, request.timestamp)))
        .filter(|(_, history)| !history.is_empty())
        .collect();
    let results = join_all(
        profiles
            .iter()
            .map(|(user, history)| state.publish(user, history, request.timestamp)),
    )
    .await;
    let sent = results.iter().filter(|r| r.is_ok()).count();
    if sent < profiles.len() {
        tracing::warn!(
            sent,
            wanted = profiles.len(),
            "send_kafka: not every profile was acknowledged"
        );
        return Err(AppError::BrokerUnavailable);
    }
    Ok(Json(SendResponse {
        message: format!("Sent {sent} user profiles to Kafka"),
        sent,
    }))
}

/// Read a user's interest profile.
///
/// The JSON value of `user_profile:{user_id}` in Redis, as the dataflow wrote it.
#[utoipa::path(
    get,
    path = "/user_profile/{user_id}",
    params(("user_id" = String, Path, description = "The user")),
    responses(
        (status = 200, description = "The profile JSON: user_id, timestamp, history_items, interest_vector, known_items, epoch", content_type = "application/json"),
        (status = 404, description = "No profile for this user", body = ErrorBody),
        (status = 422, description = "user_id over 256 bytes", body = ErrorBody),
        (status = 500, description = "Redis refused the read (the service's ACL user or password is wrong)", body = ErrorBody),
        (status = 503, description = "Redis did not answer in time", body = ErrorBody),
    )
)]
pub async fn user_profile(
    State(state): State<AppState>,
    UserIdPath(user_id): UserIdPath,
) -> Result<Response, AppError> {
    match read_key(&state, &profile::redis_key(&user_id)).await? {
        Some(json) => Ok(([(CONTENT_TYPE, "application/json")], json).into_response()),
        None => Err(AppError::NotFound("No profile found")),
    }
}

/// The value of `key` in Redis, if any; a refusal (ACL, password) is a 500 and logged as a
/// configuration fault, anything else a 503.
async fn read_key(state: &AppState, key: &str) -> Result<Option<Vec<u8>>, AppError> {
    state.profiles.get(key).await.map_err(|error| {
        if error.is_refusal() {
            // A configuration fault (e.g. the ACL user lacks GET on the key): an error, and a
            // 500, since no retry by the client helps.
            if let Some(suppressed) = state.warnings.allow() {
                tracing::error!(
                    %error,
                    key,
                    suppressed,
                    "Redis refused a read; check the Redis user's ACL and password"
                );
            }
            return AppError::RedisRefused;
        }
        if let Some(suppressed) = state.warnings.allow() {
            tracing::warn!(%error, key, suppressed, "reading from Redis failed");
        }
        AppError::RedisUnavailable
    })
}

/// Read a user's recommendations.
///
/// The first k items of `user_recs:{user_id}` as the dataflow last stored it (`"source":
/// "user"`), or, for a user without a list, the first k of `popular_items` (`"source":
/// "popular"`, an empty list before the dataflow has stored any).
#[utoipa::path(
    get,
    path = "/recommendation/{user_id}",
    params(
        ("user_id" = String, Path, description = "The user"),
        ("k" = Option<usize>, Query, description = "How many items, 1..=RECOMMENDATIONS_N (default 10, or RECOMMENDATIONS_N if lower)"),
    ),
    responses(
        (status = 200, description = "The user's list, or the popular items", body = RecommendationResponse),
        (status = 422, description = "user_id over 256 bytes, or k not an integer in 1..=RECOMMENDATIONS_N", body = ErrorBody),
        (status = 500, description = "Redis refused the read, or holds a value the dataflow did not write", body = ErrorBody),
        (status = 503, description = "Redis did not answer in time", body = ErrorBody),
    )
)]
pub async fn recommendation(
    State(state): State<AppState>,
    UserIdPath(user_id): UserIdPath,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<RecommendationResponse>, AppError> {
    let n = state.config.shared.recommendations_n;
    let k = match query.get("k") {
        None => n.min(profile::DEFAULT_RECOMMENDATIONS_N),
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|k| (1..=n).contains(k))
            .ok_or_else(|| {
                AppError::Unprocessable(format!(
                    "k must be an integer in 1..={n} (RECOMMENDATIONS_N), not {text:?}"
                ))
            })?,
    };
    let recs_key = profile::recs_key(&user_id);
    let popular_key = profile::POPULAR_ITEMS_KEY;
    // Each stored value parsed by its own shape; no popular items yet is an empty list.
    let (source, key, parsed) = match read_key(&state, &recs_key).await? {
        Some(json) => (
            "user",
            recs_key.as_str(),
            serde_json::from_slice::<StoredRecommendations>(&json).map(|stored| stored.items),
        ),
        None => match read_key(&state, popular_key).await? {
            Some(json) => ("popular", popular_key, serde_json::from_slice(&json)),
            None => ("popular", popular_key, Ok(Vec::new())),
        },
    };
    let mut items = parsed.map_err(|error| {
        if let Some(suppressed) = state.warnings.allow() {
            tracing::error!(%error, key, suppressed, "a stored value is not what the dataflow writes");
        }
        AppError::CorruptValue("recommendations")
    })?;
    items.truncate(k);
    Ok(Json(RecommendationResponse {
        user_id,
        source: source.to_owned(),
        items,
    }))
}

/// Health: whether publishing can succeed now.
///
/// 200 when the producer is not in a fatal state, a broker answers a metadata request within 2 s
/// and the profile topic exists. The answer is reused for up to a second.
#[utoipa::path(
    get,
    path = "/healthz",
    responses(
        (status = 200, description = "Broker reachable and topic present", body = HealthResponse),
        (status = 503, description = "Producer in a fatal state (being replaced), broker unreachable or topic missing", body = ErrorBody),
    )
)]
pub async fn healthz(State(state): State<AppState>) -> Result<Json<HealthResponse>, AppError> {
    match state.producer.health().await {
        Ok(health) => Ok(Json(HealthResponse {
            status: "ok".into(),
            topic: state.producer.topic().to_owned(),
            brokers: health.brokers,
            partitions: health.partitions,
        })),
        Err(error) => {
            if let Some(suppressed) = state.warnings.allow() {
                tracing::warn!(%error, topic = state.producer.topic(), suppressed, "health check failed");
            }
            Err(AppError::BrokerUnavailable)
        }
    }
}

/// Prometheus metrics (OpenMetrics text).
#[utoipa::path(
    get,
    path = "/metrics",
    responses((status = 200, description = "Metrics in the OpenMetrics text format", content_type = "application/openmetrics-text"))
)]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let replacements = i64::try_from(state.producer.generation()).unwrap_or(i64::MAX);
    state.metrics.producer_replacements.set(replacements);
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}
