//! Security of the API: profile reads as the README's Redis ACL user (`docs/redis-acl.txt`) and
//! as that user short of GET; and over TLS with a CA file, where another CA is refused.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use ingest_api::profiles::ProfileReader;
use ingest_api::store::BehaviorStore;
use ingest_api::{app, AppState, Config, ServeError};
use serde_json::Value;
use testkit::security::{AclUser, Role, TlsRedis};
use tower::ServiceExt;

const BEHAVIOR: &str = "user_id,item_id,timestamp\nalice,a,20\n";

/// A database no other test of the workspace uses; the keys are unique anyway.
const DB: u32 = 10;

/// A config whose producer and Redis can never connect (nothing listens on port 1).
fn offline_config() -> Config {
    let mut config = Config::defaults();
    config.brokers = "127.0.0.1:1".into();
    config.redis = "redis://127.0.0.1:1/0".into();
    config.publish_timeout_ms = 1000;
    config
}

fn new_state(config: Config) -> Result<AppState, ServeError> {
    AppState::new(
        config,
        BehaviorStore::from_reader(BEHAVIOR.as_bytes()).unwrap(),
    )
}

async fn call(state: &AppState, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
    let response = app(state.clone()).oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (parts.status, parts.headers, body)
}

fn request(method: &str, path: &str, authorization: Option<&str>) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(value) = authorization {
        builder = builder.header("authorization", value);
    }
    // An unknown user: past the token check, /push_interest/ answers 404 without a broker.
    let body = if method == "POST" {
        r#"{"user_id":"nobody","timestamp":20}"#
    } else {
        ""
    };
    builder.body(Body::from(body)).unwrap()
}

fn api_user(without: &[&str]) -> AclUser {
    let url = testkit::redis_url_db(DB);
    AclUser::create(
        redis::Client::open(url.as_str()).unwrap(),
        &url,
        Role::Api,
        without,
    )
}

async fn store(client: &redis::Client, user: &str) -> String {
    let value = format!(
        r#"{{"user_id":"{user}","timestamp":5,"history_items":["a"],"interest_vector":[0.5],"known_items":1,"epoch":7}}"#
    );
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(profile::redis_key(user))
        .arg(&value)
        .arg("EX")
        .arg(600)
        .query_async(&mut conn)
        .await
        .unwrap();
    value
}

#[tokio::test]
async fn profiles_are_read_as_the_acl_user_and_a_missing_get_is_a_500_naming_noperm() {
    let admin = redis::Client::open(testkit::redis_url_db(DB)).unwrap();
    let user = testkit::unique_topic("acl-api-user");
    let value = store(&admin, &user).await;
    let path = format!("/user_profile/{user}");

    let reader = api_user(&[]);
    let mut config = offline_config();
    config.redis = reader.url(DB);
    let state = new_state(config).unwrap();
    let response = app(state)
        .oneshot(request("GET", &path, None))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&bytes), value);
    // The user may read profiles only: no other key, and no writes.
    let mut conn = redis::Client::open(reader.url(DB))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let other: Result<Option<String>, _> = redis::cmd("GET")
        .arg("streamrec:read_marks:x")
        .query_async(&mut conn)
        .await;
    assert!(other.is_err());
    let write: Result<(), _> = redis::cmd("SET")
        .arg(profile::redis_key(&user))
        .arg("{}")
        .query_async(&mut conn)
        .await;
    assert!(write.is_err());

    let no_get = api_user(&["+get"]);
    let mut config = offline_config();
    config.redis = no_get.url(DB);
    let state = new_state(config).unwrap();
    let started = Instant::now();
    let (status, _, body) = call(&state, request("GET", &path, None)).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["status"], "error");
    // The client learns that the configuration is wrong, not Redis's words.
    assert!(!body.to_string().contains("NoPerm"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let error = state
        .profiles
        .get(&profile::redis_key(&user))
        .await
        .unwrap_err();
    assert!(error.is_refusal(), "{error}");
    assert!(
        error.to_string().to_ascii_uppercase().contains("NOPERM"),
        "{error}"
    );
}

#[tokio::test]
async fn profiles_are_read_over_tls_with_the_ca_file_and_another_ca_is_refused() {
    let server = TlsRedis::start();
    let value = store(&server.admin(), "tls-user").await;

    let mut config = offline_config();
    config.redis = server.url(0);
    config.redis_ca_file = Some(server.ca_file.clone());
    let state = new_state(config).unwrap();
    let response = app(state)
        .oneshot(request("GET", "/user_profile/tls-user", None))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&bytes), value);

    // Another CA, then the system store: 503 to the client, the reason in the error.
    for ca_file in [Some(server.other_ca_file.clone()), None] {
        let mut config = offline_config();
        config.redis = server.url(0);
        config.redis_ca_file = ca_file.clone();
        let state = new_state(config).unwrap();
        let (status, _, body) = call(&state, request("GET", "/user_profile/tls-user", None)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let error = ProfileReader::new(
            &server.url(0),
            ca_file.as_ref().map(|f| std::fs::read(f).unwrap()),
            Duration::from_secs(2),
        )
        .unwrap()
        .get("user_profile:tls-user")
        .await
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("invalid peer certificate: UnknownIssuer"),
            "{ca_file:?}: {error}"
        );
    }

    // A CA file with a plain redis:// URL, or one that does not exist, stops the start.
    let mut config = offline_config();
    config.redis_ca_file = Some(server.ca_file.clone());
    let err = new_state(config).unwrap_err();
    assert!(err.to_string().contains("rediss://"), "{err}");
    let mut config = offline_config();
    config.redis = server.url(0);
    config.redis_ca_file = Some(server.dir().join("missing.pem"));
    let err = new_state(config).unwrap_err();
    assert!(matches!(err, ServeError::RedisCaFile { .. }), "{err}");
}
