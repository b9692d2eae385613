//! Handler tests with `oneshot`: every client fault gets its status and a JSON error body, and a
//! broker or Redis that is down gives 503 within the bound, never a hang. The producer and the
//! Redis reader are the real ones, pointed at a closed port.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use ingest_api::store::BehaviorStore;
use ingest_api::{app, AppState, Config};
use serde_json::Value;
use tower::ServiceExt;

const BEHAVIOR: &str = "user_id,item_id,timestamp\n\
                        alice,b,20\nalice,a,20\nalice,c,10\n\
                        bob,x,50\n";

fn state() -> AppState {
    let mut config = Config::defaults();
    // Nothing listens on port 1: a real producer and Redis client that can never connect.
    config.shared.brokers = "127.0.0.1:1".into();
    config.shared.redis = "redis://127.0.0.1:1/0".into();
    config.publish_timeout_ms = 1500;
    let store = BehaviorStore::from_reader(BEHAVIOR.as_bytes()).unwrap();
    AppState::new(config, store).unwrap()
}

async fn call(request: Request<Body>) -> (StatusCode, Value) {
    let response = app(state()).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

fn post(path: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["status"], "error", "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// Sends `request` and checks that the answer is `expected` with exactly the README's error body,
/// `{"status":"error","message":"..."}`, declared as JSON. Returns the response's headers and
/// message.
async fn assert_json_error(
    request: Request<Body>,
    expected: StatusCode,
) -> (axum::http::HeaderMap, String) {
    let what = format!("{} {}", request.method(), request.uri());
    let response = app(state()).oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(parts.status, expected, "{what}: {text}");
    assert_eq!(
        parts.headers["content-type"], "application/json",
        "{what}: {text}"
    );
    let body: serde_json::Map<String, Value> = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{what}: body is not a JSON object ({e}): {text}"));
    let keys: Vec<&str> = body.keys().map(String::as_str).collect();
    assert_eq!(keys, ["message", "status"], "{what}: {text}");
    assert_eq!(body["status"], "error", "{what}: {text}");
    let message = body["message"].as_str().unwrap_or_default().to_owned();
    assert!(!message.is_empty(), "{what}: {text}");
    (parts.headers, message)
}

#[tokio::test]
async fn unknown_paths_are_404_with_a_json_body() {
    for path in ["/", "/nope", "/push_interest/extra", "/user_profile/"] {
        let request = Request::get(path).body(Body::empty()).unwrap();
        let (_, message) = assert_json_error(request, StatusCode::NOT_FOUND).await;
        assert_eq!(message, "no endpoint at this path; see /docs");
    }
    let request = post("/nope", r#"{"user_id":"alice","timestamp":20}"#);
    assert_json_error(request, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn wrong_methods_are_405_with_allow_and_a_json_body() {
    for (method, path, allow) in [
        ("GET", "/push_interest/", "POST"),
        ("DELETE", "/push_interest", "POST"),
        ("PUT", "/send_kafka/", "POST"),
        ("POST", "/healthz", "GET,HEAD"),
        ("POST", "/metrics", "GET,HEAD"),
        ("DELETE", "/user_profile/alice", "GET,HEAD"),
        ("POST", "/openapi.json", "GET,HEAD"),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let (headers, message) = assert_json_error(request, StatusCode::METHOD_NOT_ALLOWED).await;
        assert_eq!(headers["allow"], allow, "{method} {path}");
        assert_eq!(message, "method not allowed on this path");
    }
}

#[tokio::test]
async fn client_faults_have_the_json_error_body() {
    assert_json_error(
        post("/push_interest/", r#"{"user_id":"alice","#),
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_json_error(
        post("/send_kafka/", r#"{"user_id":"alice","timestamp":"x"}"#),
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let request = Request::post("/send_kafka/")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from("user_id=alice&timestamp=20"))
        .unwrap();
    assert_json_error(request, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let big = format!(r#"{{"user_id":"{}","timestamp":5}}"#, "u".repeat(70_000));
    assert_json_error(post("/push_interest/", big), StatusCode::PAYLOAD_TOO_LARGE).await;
}

#[tokio::test]
async fn an_error_made_outside_our_handlers_gets_the_json_body_too() {
    // The docs service answers an unknown file itself, with a plain 404.
    let request = Request::get("/docs/no-such-file.js")
        .body(Body::empty())
        .unwrap();
    assert_json_error(request, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn unknown_user_or_empty_history_is_404() {
    for path in ["/push_interest/", "/push_interest"] {
        let (status, body) = call(post(path, r#"{"user_id":"nobody","timestamp":99}"#)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(
            body,
            serde_json::json!({"status":"error","message":"No history found"})
        );
    }
    // alice's first item is at 10.
    let (status, body) = call(post(
        "/push_interest/",
        r#"{"user_id":"alice","timestamp":9}"#,
    ))
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn malformed_json_is_400() {
    for body in ["{", "not json", "", r#"{"user_id":"alice","timestamp":1"#] {
        let (status, json) = call(post("/push_interest/", body)).await;
        assert_error(status, &json, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn wrong_types_missing_fields_and_ranges_are_422() {
    let long = "u".repeat(257);
    let bodies = [
        r#"{"user_id":"alice"}"#.to_owned(),
        r#"{"timestamp":5}"#.to_owned(),
        r#"{"user_id":5,"timestamp":5}"#.to_owned(),
        r#"{"user_id":"alice","timestamp":"5"}"#.to_owned(),
        r#"{"user_id":"alice","timestamp":1.5}"#.to_owned(),
        r#"{"user_id":"alice","timestamp":-1}"#.to_owned(),
        r#"{"user_id":"alice","timestamp":9007199254740993}"#.to_owned(),
        r#"{"user_id":"","timestamp":5}"#.to_owned(),
        format!(r#"{{"user_id":"{long}","timestamp":5}}"#),
        "[1,2]".to_owned(),
    ];
    for path in ["/push_interest/", "/send_kafka/"] {
        for body in &bodies {
            let (status, json) = call(post(path, body.clone())).await;
            assert_error(status, &json, StatusCode::UNPROCESSABLE_ENTITY);
        }
    }
}

#[tokio::test]
async fn a_body_over_64_kib_is_413() {
    let big = format!(r#"{{"user_id":"{}","timestamp":5}}"#, "u".repeat(70_000));
    let (status, json) = call(post("/push_interest/", big)).await;
    assert_error(status, &json, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn content_type_is_checked_but_may_be_absent() {
    let request = Request::post("/push_interest/")
        .header("content-type", "text/plain")
        .body(Body::from(r#"{"user_id":"nobody","timestamp":5}"#))
        .unwrap();
    let (status, json) = call(request).await;
    assert_error(status, &json, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // Like FastAPI, no content type at all is read as JSON.
    let request = Request::post("/push_interest/")
        .body(Body::from(r#"{"user_id":"nobody","timestamp":5}"#))
        .unwrap();
    let (status, json) = call(request).await;
    assert_error(status, &json, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn broker_down_is_503_within_the_bound() {
    let started = Instant::now();
    let (status, json) = call(post(
        "/push_interest/",
        r#"{"user_id":"alice","timestamp":20}"#,
    ))
    .await;
    assert_error(status, &json, StatusCode::SERVICE_UNAVAILABLE);
    // The message must not leak librdkafka's internals to the client.
    assert_eq!(json["message"], "Kafka broker unavailable, try again later");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let (status, json) = call(post(
        "/send_kafka/",
        r#"{"user_id":"alice","timestamp":20}"#,
    ))
    .await;
    assert_error(status, &json, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(5));

    let started = Instant::now();
    let (status, json) = call(Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_error(status, &json, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn redis_down_is_503_and_bad_ids_are_422() {
    let started = Instant::now();
    let (status, json) = call(
        Request::get("/user_profile/alice")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_error(status, &json, StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(5));

    let path = format!("/user_profile/{}", "u".repeat(257));
    let (status, json) = call(Request::get(path).body(Body::empty()).unwrap()).await;
    assert_error(status, &json, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn openapi_and_docs_are_served_without_a_cdn() {
    let (status, spec) = call(Request::get("/openapi.json").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/push_interest/",
        "/send_kafka/",
        "/user_profile/{user_id}",
        "/recommendation/{user_id}",
        "/healthz",
        "/metrics",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} missing from the spec"
        );
    }
    assert!(spec["components"]["schemas"]["InterestRequest"].is_object());

    let response = app(state())
        .oneshot(Request::get("/docs/").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let html = response.into_body().collect().await.unwrap().to_bytes();
    let html = String::from_utf8_lossy(&html);
    assert!(html.contains("swagger-ui"), "{html}");
    assert!(
        !html.contains("://cdn") && !html.contains("unpkg.com"),
        "docs must not load from a CDN"
    );
    // The page's script and style come from the binary itself.
    let response = app(state())
        .oneshot(
            Request::get("/docs/swagger-ui-bundle.js")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status() {
    let state = state();
    let router = app(state.clone());
    for _ in 0..3 {
        let request = post("/push_interest/", r#"{"user_id":"nobody","timestamp":5}"#);
        router.clone().oneshot(request).await.unwrap();
    }
    let response = router
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains(r#"streamrec_ingest_http_requests_total{route="/push_interest/",method="POST",status="404"} 3"#),
        "{text}"
    );
    assert!(text.contains("streamrec_ingest_behavior_users 2"), "{text}");
    assert!(text.contains("streamrec_ingest_behavior_rows 4"), "{text}");
    assert!(
        text.contains("streamrec_ingest_publish_latency_seconds"),
        "{text}"
    );
}
