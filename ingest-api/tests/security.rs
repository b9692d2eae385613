//! Security of the API: bearer tokens on the write routes (and on reads when configured), with
//! the project's JSON error body and a WWW-Authenticate challenge, in the OpenAPI description
//! too; profile reads as the README's Redis ACL user (`docs/redis-acl.txt`) and as that user
//! short of GET; and over TLS with a CA file, where another CA is refused.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::process::Stdio;
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
const TOKEN: &str = "tok-3f9c2a7e51d84b06";
const OTHER_TOKEN: &str = "second-token_with.more~chars";

/// A database no other test of the workspace uses; the keys are unique anyway.
const DB: u32 = 10;

/// A config whose producer and Redis can never connect (nothing listens on port 1).
fn offline_config() -> Config {
    let mut config = Config::defaults();
    config.shared.brokers = "127.0.0.1:1".into();
    config.shared.redis = "redis://127.0.0.1:1/0".into();
    config.publish_timeout_ms = 1000;
    config
}

fn tokens_file(dir: &tempfile::TempDir, text: &str) -> std::path::PathBuf {
    let path = dir.path().join("tokens");
    std::fs::write(&path, text).unwrap();
    path
}

fn new_state(config: Config) -> Result<AppState, ServeError> {
    AppState::new(
        config,
        BehaviorStore::from_reader(BEHAVIOR.as_bytes()).unwrap(),
    )
}

/// A state requiring [`TOKEN`] or [`OTHER_TOKEN`], for reads too if `reads`.
fn protected(dir: &tempfile::TempDir, reads: bool) -> AppState {
    let mut config = offline_config();
    config.api_tokens_file = Some(tokens_file(
        dir,
        &format!("# the ops team's tokens\n\n{TOKEN}\n  {OTHER_TOKEN}  \n"),
    ));
    config.api_tokens_for_reads = reads;
    new_state(config).unwrap()
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

/// Checks a 401 with exactly the project's error body and a Bearer challenge; returns the
/// message and the challenge.
fn assert_unauthorized(status: StatusCode, headers: &HeaderMap, body: &Value) -> (String, String) {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(headers["content-type"], "application/json");
    let object = body.as_object().unwrap();
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    assert_eq!(keys, ["message", "status"], "{body}");
    assert_eq!(body["status"], "error");
    let challenge = headers["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    (body["message"].as_str().unwrap().to_owned(), challenge)
}

#[tokio::test]
async fn write_routes_need_an_accepted_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let state = protected(&dir, false);
    for path in [
        "/push_interest/",
        "/push_interest",
        "/send_kafka/",
        "/send_kafka",
    ] {
        let (status, headers, body) = call(&state, request("POST", path, None)).await;
        let (message, challenge) = assert_unauthorized(status, &headers, &body);
        assert!(
            message.contains("missing bearer token"),
            "{path}: {message}"
        );
        assert!(!challenge.contains("invalid_token"), "{challenge}");

        let basic = request("POST", path, Some(&format!("Basic {TOKEN}")));
        let (status, headers, body) = call(&state, basic).await;
        let (message, _) = assert_unauthorized(status, &headers, &body);
        assert!(message.contains("Bearer scheme"), "{path}: {message}");

        let bare = request("POST", path, Some(TOKEN));
        let (status, headers, body) = call(&state, bare).await;
        assert_unauthorized(status, &headers, &body);

        for wrong in ["Bearer nope", &format!("Bearer {TOKEN}x"), "Bearer "] {
            let (status, headers, body) = call(&state, request("POST", path, Some(wrong))).await;
            let (message, challenge) = assert_unauthorized(status, &headers, &body);
            assert_eq!(message, "invalid bearer token", "{path}");
            assert!(
                challenge.contains(r#"error="invalid_token""#),
                "{challenge}"
            );
        }
    }

    // The right token (either of the file's, scheme in any case) gets to the handler.
    for header in [format!("Bearer {TOKEN}"), format!("bearer {OTHER_TOKEN}")] {
        let push = request("POST", "/push_interest/", Some(&header));
        let (status, _, body) = call(&state, push).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(body["message"], "No history found");
    }
    let bad_body = Request::post("/send_kafka/")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Body::from("{"))
        .unwrap();
    let (status, _, _) = call(&state, bad_body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Paths and methods that do not exist answer as before, token or not.
    let (status, _, _) = call(&state, request("GET", "/send_kafka/", None)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _, _) = call(&state, request("POST", "/nope", None)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn reads_are_open_unless_configured_and_health_metrics_docs_always() {
    let dir = tempfile::tempdir().unwrap();
    let open_reads = protected(&dir, false);
    // Past the check: Redis on port 1 is unavailable, so 503 and not 401.
    let (status, _, body) = call(&open_reads, request("GET", "/user_profile/alice", None)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    let closed_reads = protected(&dir, true);
    let (status, headers, body) =
        call(&closed_reads, request("GET", "/user_profile/alice", None)).await;
    assert_unauthorized(status, &headers, &body);
    let wrong = request("GET", "/user_profile/alice", Some("Bearer nope"));
    let (status, headers, body) = call(&closed_reads, wrong).await;
    assert_unauthorized(status, &headers, &body);
    let right = request(
        "GET",
        "/user_profile/alice",
        Some(&format!("Bearer {TOKEN}")),
    );
    let (status, _, body) = call(&closed_reads, right).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");

    for path in ["/metrics", "/openapi.json", "/healthz"] {
        let (status, _, body) = call(&closed_reads, request("GET", path, None)).await;
        assert_ne!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
    }
}

#[tokio::test]
async fn the_openapi_description_declares_the_bearer_scheme_where_it_applies() {
    let dir = tempfile::tempdir().unwrap();
    let doc = |state: AppState| async move {
        let (status, _, body) = call(&state, request("GET", "/openapi.json", None)).await;
        assert_eq!(status, StatusCode::OK);
        body
    };
    let bearer = serde_json::json!([{"bearer": []}]);

    let writes_only = doc(protected(&dir, false)).await;
    let scheme = &writes_only["components"]["securitySchemes"]["bearer"];
    assert_eq!(scheme["type"], "http", "{scheme}");
    assert_eq!(scheme["scheme"], "bearer", "{scheme}");
    for path in ["/push_interest/", "/send_kafka/"] {
        let operation = &writes_only["paths"][path]["post"];
        assert_eq!(operation["security"], bearer, "{path}");
        assert_eq!(
            operation["responses"]["401"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ErrorBody",
            "{path}"
        );
    }
    let read = &writes_only["paths"]["/user_profile/{user_id}"]["get"];
    assert!(read.get("security").is_none(), "{read}");
    assert!(writes_only["paths"]["/healthz"]["get"]
        .get("security")
        .is_none());

    let reads_too = doc(protected(&dir, true)).await;
    assert_eq!(
        reads_too["paths"]["/user_profile/{user_id}"]["get"]["security"],
        bearer
    );

    let open = doc(new_state(offline_config()).unwrap()).await;
    assert!(open["components"].get("securitySchemes").is_none());
    assert!(open["paths"]["/send_kafka/"]["post"]
        .get("security")
        .is_none());
}

#[tokio::test]
async fn an_empty_or_unreadable_tokens_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = offline_config();
    config.api_tokens_file = Some(tokens_file(&dir, "# nobody yet\n\n   \n"));
    let err = new_state(config).unwrap_err();
    assert!(matches!(err, ServeError::Tokens(_)), "{err}");
    assert!(err.to_string().contains("holds no token"), "{err}");

    let mut config = offline_config();
    config.api_tokens_file = Some(dir.path().join("missing"));
    let err = new_state(config).unwrap_err();
    assert!(
        err.to_string().contains("cannot read the API tokens file"),
        "{err}"
    );

    let mut config = offline_config();
    config.api_tokens_file = Some(tokens_file(&dir, "good\nsecret-value # ops\n"));
    let err = new_state(config).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
    assert!(!err.to_string().contains("secret-value"), "{err}");
}

/// The binary with a tokens file at debug level: requests with wrong and right tokens leave
/// no token in its log.
#[tokio::test]
async fn tokens_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("behavior.csv");
    std::fs::write(&csv, BEHAVIOR).unwrap();
    let tokens = tokens_file(&dir, &format!("{TOKEN}\n"));
    let port = testkit::free_port();
    let mut child = testkit::process::isolated(env!("CARGO_BIN_EXE_ingest-api"), dir.path())
        .args(["--bind", &format!("127.0.0.1:{port}")])
        .args([
            "--brokers",
            "127.0.0.1:1",
            "--redis",
            "redis://127.0.0.1:1/0",
        ])
        .arg("--behavior-csv")
        .arg(&csv)
        .arg("--api-tokens-file")
        .arg(&tokens)
        .env("RUST_LOG", "debug")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let receiver = testkit::process::stderr_lines(&mut child);
    let mut log = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log.iter().any(|l: &String| l.contains("listening")) {
        let left = deadline.saturating_duration_since(Instant::now());
        log.push(receiver.recv_timeout(left).expect("the API did not start"));
    }
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let body = r#"{"user_id":"nobody","timestamp":20}"#;
    for authorization in [format!("Bearer {TOKEN}"), format!("Bearer {TOKEN}-typo")] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "POST /push_interest/ HTTP/1.1\r\nhost: {addr}\r\nauthorization: {authorization}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
            .await
            .unwrap();
        let mut response = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut response)
            .await
            .unwrap();
        let response = String::from_utf8(response).unwrap();
        assert!(
            response.starts_with("HTTP/1.1 404") || response.starts_with("HTTP/1.1 401"),
            "{response}"
        );
    }
    // Let the last lines arrive, then stop it.
    std::thread::sleep(Duration::from_millis(300));
    let _ = child.kill();
    let _ = child.wait();
    log.extend(receiver.try_iter());
    assert!(
        log.iter().any(|l| l.contains("API bearer tokens loaded")),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|l| l.contains("request refused")),
        "{log:#?}"
    );
    for line in &log {
        assert!(!line.contains(TOKEN), "a token in the log: {line}");
    }
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
    config.shared.redis = reader.url(DB);
    let state = new_state(config).unwrap();
    let response = app(state.clone())
        .oneshot(request("GET", &path, None))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&bytes), value);
    // And recommendations: the user's list, or else the popular items.
    let recs = format!(
        r#"{{"user_id":"{user}","timestamp":5,"items":[{{"item_id":"a","score":0.5}}],"epoch":7}}"#
    );
    let mut admin_conn = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(profile::recs_key(&user))
        .arg(&recs)
        .arg("EX")
        .arg(600)
        .query_async(&mut admin_conn)
        .await
        .unwrap();
    let (status, _, body) = call(
        &state,
        request("GET", &format!("/recommendation/{user}"), None),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["source"], "user");
    let (status, _, body) = call(&state, request("GET", "/recommendation/nobody-here", None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["source"], "popular");
    // The user may read profiles and recommendations only: no other key, and no writes.
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
    config.shared.redis = no_get.url(DB);
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
    config.shared.redis = server.url(0);
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
        config.shared.redis = server.url(0);
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
    config.shared.redis = server.url(0);
    config.redis_ca_file = Some(server.dir().join("missing.pem"));
    let err = new_state(config).unwrap_err();
    assert!(matches!(err, ServeError::RedisCaFile { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_read_from_a_redis_cluster_as_the_acl_user() {
    let cluster = testkit::cluster::PrivateCluster::start();
    let mut conn = cluster.connection();
    let users: Vec<String> = (0..30).map(|i| format!("cluster-reader-{i}")).collect();
    for user in &users {
        let _: () = redis::cmd("SET")
            .arg(profile::redis_key(user))
            .arg(format!(r#"{{"user_id":"{user}"}}"#))
            .query(&mut conn)
            .unwrap();
    }
    let seeds = testkit::security::acl_user_on_cluster(&cluster, Role::Api, &[]);
    let mut config = offline_config();
    config.shared.redis = seeds;
    config.shared.redis_cluster = true;
    let state = new_state(config).unwrap();
    // Keys of every master, each read from its own.
    for user in &users {
        let (status, _, body) = call(
            &state,
            request("GET", &format!("/user_profile/{user}"), None),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["user_id"], user.as_str());
    }
    let (status, _, _) = call(&state, request("GET", "/user_profile/nobody", None)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    state.profiles.ping().await.unwrap();

    // Without the slot map the reader is refused, and says so.
    let cluster = testkit::cluster::PrivateCluster::start();
    let seeds = testkit::security::acl_user_on_cluster(&cluster, Role::Api, &["+cluster|slots"]);
    let reader = ProfileReader::cluster(&seeds, None, Duration::from_secs(2)).unwrap();
    let error = reader.ping().await.unwrap_err();
    assert!(error.to_string().contains("cluster|slots"), "{error}");
}
