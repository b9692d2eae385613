//! The ingest API end to end against the real broker and Redis: a served socket, real HTTP,
//! messages read back from the topic and compared byte for byte, profiles and recommendations
//! read from Redis.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::time::Duration;

use ingest_api::store::BehaviorStore;
use ingest_api::{serve, AppState, Config};
use serde_json::{json, Value};
use testkit::{create_topic, http, keys, read_topic, unique_topic};

/// `tie` has four items at the same second; the contract orders them by item id bytes.
const BEHAVIOR: &str = "user_id,item_id,timestamp\n\
    tie,B000FC1PJI,1456923842\ntie,0553213113,1456923842\ntie,B00000AAAA,1456923842\n\
    tie,0312000001,1400000000\ntie,ZZZ,1456923842\ntie,late,1500000000\n\
    0196,x,100\n196,y,100\n";

struct Running {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<Result<(), ingest_api::ServeError>>,
}

async fn start(config: Config, behavior: &str) -> Running {
    start_with(
        config,
        BehaviorStore::from_reader(behavior.as_bytes()).unwrap(),
    )
    .await
}

async fn start_with(config: Config, store: BehaviorStore) -> Running {
    let state = AppState::new(config, store).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(serve(listener, state, async {
        let _ = stopped.await;
    }));
    Running { addr, stop, served }
}

impl Running {
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.served.await.unwrap().unwrap();
    }
}

fn config(topic: &str) -> Config {
    let mut config = Config::defaults();
    config.shared.brokers = testkit::brokers();
    config.shared.redis = testkit::redis_url();
    config.shared.topic = topic.to_owned();
    config
}

#[tokio::test]
async fn push_publishes_exactly_the_history_up_to_the_time() {
    let topic = unique_topic("push");
    create_topic(&topic, 4).await;
    let server = start(config(&topic), BEHAVIOR).await;

    let (status, body) = http(
        server.addr,
        "POST",
        "/push_interest/",
        r#"{"user_id":"tie","timestamp":1456923842}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["status"], "success");
    assert_eq!(answer["user_id"], "tie");
    assert_eq!(answer["history_items_count"], 5);

    let (status, body) = http(
        server.addr,
        "POST",
        "/push_interest",
        r#"{"user_id":"0196","timestamp":100}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let records = read_topic(&topic, 4, 2, Duration::from_secs(20)).await;
    let tie = records.iter().find(|r| r.key == b"tie").unwrap();
    assert_eq!(
        i64::from(tie.partition),
        answer["partition"].as_i64().unwrap()
    );
    assert_eq!(tie.offset, answer["offset"].as_i64().unwrap());
    assert_eq!(
        String::from_utf8(tie.value.clone()).unwrap(),
        r#"{"user_id":"tie","history_items":["0312000001","0553213113","B00000AAAA","B000FC1PJI","ZZZ"],"timestamp":1456923842}"#
    );
    let opaque = records.iter().find(|r| r.key == b"0196").unwrap();
    assert_eq!(
        opaque.value,
        br#"{"user_id":"0196","history_items":["x"],"timestamp":100}"#.to_vec()
    );
    server.stop().await;
}

#[tokio::test]
async fn history_is_cut_to_max_history_newest_last() {
    let topic = unique_topic("maxhist");
    create_topic(&topic, 1).await;
    let mut config = config(&topic);
    config.shared.max_history = 2;
    let server = start(config, BEHAVIOR).await;
    let (status, body) = http(
        server.addr,
        "POST",
        "/push_interest/",
        r#"{"user_id":"tie","timestamp":2000000000}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let records = read_topic(&topic, 1, 1, Duration::from_secs(20)).await;
    assert_eq!(
        records[0].value,
        br#"{"user_id":"tie","history_items":["ZZZ","late"],"timestamp":2000000000}"#.to_vec()
    );
    server.stop().await;
}

#[tokio::test]
async fn send_kafka_sends_the_target_and_distinct_others_with_history() {
    let topic = unique_topic("send");
    create_topic(&topic, 4).await;
    // 40 users with history at t=10, 20 more whose history starts later (skipped at t=10).
    let mut behavior = String::from("user_id,item_id,timestamp\n");
    for u in 0..40 {
        behavior.push_str(&format!("early{u},item{u},10\n"));
    }
    for u in 0..20 {
        behavior.push_str(&format!("late{u},item{u},99\n"));
    }
    let mut config = config(&topic);
    config.random_user_min = 59;
    config.random_user_max = 59;
    let server = start(config, &behavior).await;

    let (status, body) = http(
        server.addr,
        "POST",
        "/send_kafka/",
        r#"{"user_id":"early7","timestamp":10}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // All 59 others are sampled; only the 39 early ones have history, plus the target.
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer,
        json!({"message": "Sent 40 user profiles to Kafka", "sent": 40})
    );
    let records = read_topic(&topic, 4, 40, Duration::from_secs(20)).await;
    let keys = keys(&records);
    assert_eq!(keys.len(), 40, "keys must be distinct");
    assert!(keys.contains("early7"));
    assert!(keys.iter().all(|k| k.starts_with("early")));
    for record in &records {
        let message =
            profile::ProfileMessage::decode(&record.value, profile::Encoding::Json).unwrap();
        assert_eq!(message.timestamp, 10);
        assert_eq!(message.user_id.as_bytes(), record.key.as_slice());
    }
    server.stop().await;
}

#[tokio::test]
async fn send_kafka_samples_within_the_configured_range() {
    let topic = unique_topic("sendrange");
    create_topic(&topic, 4).await;
    let mut behavior = String::from("user_id,item_id,timestamp\n");
    for u in 0..500 {
        behavior.push_str(&format!("user{u},item,1\n"));
    }
    let mut config = config(&topic);
    config.random_user_min = 3;
    config.random_user_max = 6;
    let server = start(config, &behavior).await;
    let mut total = 0;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let (status, body) = http(
            server.addr,
            "POST",
            "/send_kafka/",
            r#"{"user_id":"user0","timestamp":1}"#,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let sent = serde_json::from_str::<Value>(&body).unwrap()["sent"]
            .as_u64()
            .unwrap();
        assert!((4..=7).contains(&sent), "{sent}");
        seen.insert(sent);
        total += sent as usize;
    }
    assert!(seen.len() > 1, "the sample size never varied: {seen:?}");
    read_topic(&topic, 4, total, Duration::from_secs(20)).await;
    server.stop().await;
}

#[tokio::test]
async fn user_profile_reads_redis_and_healthz_sees_the_topic() {
    let topic = unique_topic("profile");
    create_topic(&topic, 4).await;
    let server = start(config(&topic), BEHAVIOR).await;

    let client = redis::Client::open(testkit::redis_url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let user = unique_topic("user");
    let value = format!(
        r#"{{"user_id":"{user}","timestamp":5,"history_items":["a"],"interest_vector":[0.5,0.25],"known_items":1,"epoch":7}}"#
    );
    let _: () = redis::cmd("SET")
        .arg(profile::redis_key(&user))
        .arg(&value)
        .query_async(&mut redis)
        .await
        .unwrap();

    let (status, body) = http(server.addr, "GET", &format!("/user_profile/{user}"), "").await;
    assert_eq!(status, 200);
    assert_eq!(body, value);
    let (status, body) = http(server.addr, "GET", "/user_profile/no-such-user", "").await;
    assert_eq!(status, 404);
    assert_eq!(body, r#"{"status":"error","message":"No profile found"}"#);

    let (status, body) = http(server.addr, "GET", "/healthz", "").await;
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["partitions"], 4);
    assert_eq!(health["topic"], topic.as_str());
    server.stop().await;
}

#[tokio::test]
async fn healthz_is_503_for_a_missing_topic() {
    let server = start(config(&unique_topic("missing")), BEHAVIOR).await;
    let (status, _) = http(server.addr, "GET", "/healthz", "").await;
    assert_eq!(status, 503);
    server.stop().await;
}

#[tokio::test]
async fn the_sample_data_round_trips_through_the_broker() {
    // The committed sample: pick the user with the most same-second ties and check the published
    // history against a plain re-reading of the CSV.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/behavior_sample.csv");
    let csv = std::fs::read_to_string(path).unwrap();
    let mut rows: std::collections::HashMap<&str, Vec<(u64, &str)>> = Default::default();
    for line in csv.lines().skip(1) {
        let mut fields = line.split(',');
        let (user, item, ts) = (
            fields.next().unwrap(),
            fields.next().unwrap(),
            fields.next().unwrap(),
        );
        rows.entry(user)
            .or_default()
            .push((ts.parse().unwrap(), item));
    }
    for history in rows.values_mut() {
        history.sort_by(|a, b| profile::history_order(*a, *b));
    }
    let (user, history) = rows
        .iter()
        .max_by_key(|(user, history)| {
            let ties = history.windows(2).filter(|w| w[0].0 == w[1].0).count();
            (ties, std::cmp::Reverse(**user))
        })
        .unwrap();
    assert!(
        history.windows(2).any(|w| w[0].0 == w[1].0),
        "the sample has no ties"
    );
    let at = history[history.len() / 2].0;
    let upto: Vec<&str> = history
        .iter()
        .filter(|(t, _)| *t <= at)
        .map(|(_, i)| *i)
        .collect();
    let expected = profile::ProfileMessageRef {
        user_id: user,
        history_items: &upto[upto.len().saturating_sub(50)..],
        timestamp: at,
    }
    .encode(profile::Encoding::Json);

    let topic = unique_topic("sample");
    create_topic(&topic, 4).await;
    let store = BehaviorStore::load(std::path::Path::new(path)).unwrap();
    assert_eq!(store.stats().bad_rows, 0);
    let server = start_with(config(&topic), store).await;
    let (status, body) = http(
        server.addr,
        "POST",
        "/push_interest/",
        &format!(r#"{{"user_id":"{user}","timestamp":{at}}}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let records = read_topic(&topic, 4, 1, Duration::from_secs(20)).await;
    assert_eq!(records[0].key, user.as_bytes());
    assert_eq!(
        String::from_utf8_lossy(&records[0].value),
        String::from_utf8_lossy(&expected)
    );
    server.stop().await;
}

/// The database of the recommendation test: `popular_items` is one key, which no other test
/// may touch meanwhile.
const RECS_DB: u32 = 11;

#[tokio::test]
async fn recommendations_are_the_users_list_or_the_popular_items_and_k_is_checked() {
    let topic = unique_topic("recs");
    create_topic(&topic, 1).await;
    let mut config = config(&topic);
    config.shared.redis = testkit::redis_url_db(RECS_DB);
    config.shared.recommendations_n = 5;
    let server = start(config, BEHAVIOR).await;
    let client = redis::Client::open(testkit::redis_url_db(RECS_DB)).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut redis).await.unwrap();
    let get = |path: String| async move {
        let (status, body) = http(server.addr, "GET", &path, "").await;
        (status, serde_json::from_str::<Value>(&body).unwrap())
    };

    // Before the dataflow stored anything: the popular source, empty.
    let (status, body) = get("/recommendation/alice".into()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"user_id": "alice", "source": "popular", "items": []})
    );

    let items: Vec<Value> = (0..5)
        .map(|i| json!({"item_id": format!("i{i}"), "score": 1.0 / f64::from(i + 1)}))
        .collect();
    let stored = json!({"user_id": "alice", "timestamp": 9, "items": items, "epoch": 3});
    let popular: Vec<Value> = (0..100)
        .map(|i| json!({"item_id": format!("p{i}"), "users": 1000 - i}))
        .collect();
    for (key, value) in [
        (profile::recs_key("alice"), stored.to_string()),
        (
            profile::POPULAR_ITEMS_KEY.to_owned(),
            json!(popular).to_string(),
        ),
    ] {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut redis)
            .await
            .unwrap();
    }

    // The user's own list, the first k (default 10, here capped by RECOMMENDATIONS_N = 5).
    let (status, body) = get("/recommendation/alice?k=2".into()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"user_id": "alice", "source": "user", "items": items[..2]})
    );
    let (_, body) = get("/recommendation/alice".into()).await;
    assert_eq!(body["items"].as_array().unwrap().len(), 5);
    // A user without a list gets the popular items.
    let (status, body) = get("/recommendation/bob?k=3".into()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"user_id": "bob", "source": "popular", "items": popular[..3]})
    );
    // A bad k is a 422 that says what k may be.
    for k in ["0", "6", "-1", "two", ""] {
        let (status, body) = get(format!("/recommendation/alice?k={k}")).await;
        assert_eq!(status, 422, "k={k}: {body}");
        assert_eq!(body["status"], "error");
        assert!(
            body["message"].as_str().unwrap().contains("1..=5"),
            "{body}"
        );
    }
    // A value another program put there is a 500 with a JSON error, not its text.
    let _: () = redis::cmd("SET")
        .arg(profile::recs_key("carol"))
        .arg("not json")
        .query_async(&mut redis)
        .await
        .unwrap();
    let (status, body) = get("/recommendation/carol".into()).await;
    assert_eq!(status, 500, "{body}");
    assert!(!body.to_string().contains("not json"), "{body}");
    server.stop().await;
}
