//! Producer recovery end to end: the API against a tansu broker of its own, which the test
//! freezes with SIGSTOP for 10 s while requests keep coming, then thaws. Without recovery the
//! idempotent producer ends in a fatal state (`ProducerFenced`) and every later push is 503.
//!
//! The broker is this test's alone (`testkit::tansu`: memory storage, a free loopback port), so
//! stalling it does not disturb the shared test broker the other tests use.

#![allow(clippy::unwrap_used)] // a panic in a test helper is a test failure

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::Value;
use testkit::free_port;
use testkit::tansu::Broker;
use testkit::{create_topic_at, http};

const PARTITIONS: i32 = 4;
const USERS: u64 = 8;
const STALL: Duration = Duration::from_secs(10);
/// How long after SIGCONT pushes must be acknowledged again.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);

/// One push the test made and what the API answered.
#[derive(Debug)]
struct Push {
    user: String,
    timestamp: u64,
    started: Instant,
    finished: Instant,
    /// 0 when the API did not answer within 10 s.
    status: u16,
    body: String,
}

/// Pushes one user's history, with a client-side bound.
async fn push(addr: SocketAddr, counter: &AtomicU64) -> Push {
    let timestamp = counter.fetch_add(1, Ordering::Relaxed);
    let user = format!("user{}", timestamp % USERS);
    let body = format!(r#"{{"user_id":"{user}","timestamp":{timestamp}}}"#);
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        http(addr, "POST", "/push_interest/", &body),
    )
    .await;
    let (status, body) = answer.unwrap_or((0, String::new()));
    Push {
        user,
        timestamp,
        started,
        finished: Instant::now(),
        status,
        body,
    }
}

async fn healthz(addr: SocketAddr) -> (u16, String) {
    tokio::time::timeout(Duration::from_secs(10), http(addr, "GET", "/healthz", ""))
        .await
        .unwrap_or((0, String::new()))
}

/// The messages of the topic, by (partition, offset), read from the beginning until every one of
/// `wanted` has arrived; panics naming the missing ones after `timeout`.
fn read_until(
    brokers: &str,
    topic: &str,
    wanted: &HashSet<(i32, i64)>,
    timeout: Duration,
) -> HashMap<(i32, i64), (Vec<u8>, Vec<u8>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "streamrec-recovery-test")
        .set("enable.auto.commit", "false")
        // tansu holds a fetch until this wait expires; keep it short (docs/tansu.md, 2).
        .set("fetch.wait.max.ms", "5")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let deadline = Instant::now() + timeout;
    let mut records = HashMap::new();
    while !wanted.iter().all(|at| records.contains_key(at)) {
        if Instant::now() >= deadline {
            let mut missing: Vec<_> = wanted
                .iter()
                .filter(|at| !records.contains_key(*at))
                .collect();
            missing.sort();
            panic!(
                "acknowledged messages missing from {topic} after {timeout:?} (read {}): {missing:?}",
                records.len()
            );
        }
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.unwrap();
            records.insert(
                (message.partition(), message.offset()),
                (
                    message.key().unwrap_or_default().to_vec(),
                    message.payload().unwrap_or_default().to_vec(),
                ),
            );
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_are_acknowledged_again_after_the_broker_stalls() {
    // The API's own warnings (the fatal error, the replacement) show with --nocapture.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,ingest_api=info")
        .with_test_writer()
        .try_init();

    let mut broker = Broker::start();
    broker.wait_until_listening().await;
    let brokers = broker.addr.to_string();
    let topic = testkit::unique_topic("recovery");
    create_topic_at(&brokers, &topic, PARTITIONS).await;

    let mut behavior = tempfile::NamedTempFile::new().unwrap();
    let mut csv = String::from("user_id,item_id,timestamp\n");
    for u in 0..USERS {
        csv.push_str(&format!("user{u},item{u},1\n"));
    }
    std::io::Write::write_all(&mut behavior, csv.as_bytes()).unwrap();

    let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut config = ingest_api::Config::defaults();
    config.shared.brokers = brokers.clone();
    config.shared.topic = topic.clone();
    config.shared.redis = testkit::redis_url();
    config.bind = api.to_string();
    config.behavior_csv = behavior.path().to_owned();
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(ingest_api::run(config, async {
        let _ = api_stopped.await;
    }));

    // Healthy before anything else: the API listens, the broker answers, the topic is there.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = tokio::time::timeout(Duration::from_secs(5), async {
            match tokio::net::TcpStream::connect(api).await {
                Ok(_) => healthz(api).await,
                Err(_) => (0, String::new()),
            }
        })
        .await
        .unwrap_or_default();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the API never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Four clients push continuously (about 80 a second in all), a fifth watches /healthz.
    let counter = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut pushers = Vec::new();
    for _ in 0..4 {
        let (counter, stop) = (Arc::clone(&counter), Arc::clone(&stop));
        pushers.push(tokio::spawn(async move {
            let mut pushes = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                pushes.push(push(api, &counter).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            pushes
        }));
    }
    let health_checks = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut checks = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = healthz(api).await;
                checks.push((Instant::now(), status, body));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            checks
        })
    };

    // Some pushes go through before the stall.
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter.load(Ordering::Relaxed) < 40 {
        assert!(Instant::now() < deadline, "no pushes before the stall");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stalled = Instant::now();
    broker.signal("STOP");
    tokio::time::sleep(STALL).await;
    broker.signal("CONT");
    let thawed = Instant::now();

    // Within the bound, a push that started after the thaw is acknowledged and /healthz is 200.
    let deadline = thawed + RECOVERY_BOUND;
    let probe = AtomicU64::new(1_000_000);
    let mut probes = Vec::new();
    let recovered = loop {
        let attempt = push(api, &probe).await;
        let (status, finished) = (attempt.status, attempt.finished);
        probes.push(attempt);
        if status == 200 && healthz(api).await.0 == 200 {
            break finished;
        }
        assert!(
            Instant::now() < deadline,
            "no push acknowledged within {RECOVERY_BOUND:?} of SIGCONT; last answer {:?}",
            probes.last()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A little more traffic after recovery, all of which must succeed.
    let after = counter.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter.load(Ordering::Relaxed) < after + 40 {
        assert!(Instant::now() < deadline, "pushes stopped after recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    // The probes are checked like the clients' pushes.
    let mut pushes = probes;
    for pusher in pushers {
        pushes.extend(pusher.await.unwrap());
    }
    let checks = health_checks.await.unwrap();
    let (_, metrics) = http(api, "GET", "/metrics", "").await;
    let replacements = metrics
        .lines()
        .find_map(|l| l.strip_prefix("streamrec_ingest_producer_replacements "))
        .unwrap_or_else(|| panic!("no replacement count in {metrics}"))
        .to_owned();
    stop_api.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("the API did not stop within 30 s")
        .unwrap()
        .unwrap();

    let acked: Vec<&Push> = pushes.iter().filter(|p| p.status == 200).collect();
    let failed: Vec<&Push> = pushes.iter().filter(|p| p.status != 200).collect();
    let first_ack_after_thaw = acked
        .iter()
        .filter(|p| p.started >= thawed)
        .map(|p| p.finished)
        .min();
    eprintln!(
        "stall {:?}; first acknowledged probe (with /healthz 200) {:?} after SIGCONT, first client push started \
         after SIGCONT acknowledged {:?} after it; {} pushes: {} acknowledged, {} not; producer \
         replaced {replacements} time(s)",
        thawed - stalled,
        recovered - thawed,
        first_ack_after_thaw.map(|t| t - thawed),
        pushes.len(),
        acked.len(),
        failed.len(),
    );

    // Every failure is the API's 503 with its JSON body; none hung past the client's bound.
    for push in &failed {
        assert_eq!(push.status, 503, "{push:?}");
        let body: Value = serde_json::from_str(&push.body).unwrap();
        assert_eq!(body["status"], "error", "{push:?}");
        assert_eq!(body["message"], "Kafka broker unavailable, try again later");
    }
    // Failures happen only around the stall: none after recovery.
    if let Some(late) = failed.iter().find(|p| p.started > recovered) {
        panic!("a push after recovery failed: {late:?}");
    }
    assert!(
        failed.iter().any(|p| p.started >= stalled),
        "no push failed during the stall: the broker was not stalled"
    );
    // /healthz told the truth: 503 at some point between the stall and the recovery, 200 after.
    let unhealthy = checks
        .iter()
        .filter(|(at, status, _)| *status != 200 && *at >= stalled && *at <= recovered)
        .count();
    assert!(
        unhealthy > 0,
        "/healthz never answered 503 during the stall"
    );
    for (at, status, body) in &checks {
        if *status != 200 {
            assert_eq!(*status, 503, "{body}");
            let body: Value = serde_json::from_str(body).unwrap();
            assert_eq!(body["status"], "error");
            assert!(*at >= stalled, "/healthz failed before the stall: {body}");
        }
    }
    let last = checks.last().unwrap();
    assert_eq!(last.1, 200, "/healthz after recovery: {}", last.2);

    // Every acknowledged push is in the topic where the API said it is, byte for byte.
    let places: Vec<(i32, i64)> = acked
        .iter()
        .map(|push| {
            let answer: Value = serde_json::from_str(&push.body).unwrap();
            (
                i32::try_from(answer["partition"].as_i64().unwrap()).unwrap(),
                answer["offset"].as_i64().unwrap(),
            )
        })
        .collect();
    let wanted: HashSet<(i32, i64)> = places.iter().copied().collect();
    assert_eq!(
        wanted.len(),
        places.len(),
        "two pushes acknowledged at one offset"
    );
    let records = tokio::task::spawn_blocking({
        let (brokers, topic) = (brokers.clone(), topic.clone());
        move || read_until(&brokers, &topic, &wanted, Duration::from_secs(30))
    })
    .await
    .unwrap();
    for (push, at) in acked.iter().zip(places) {
        let expected = format!(
            r#"{{"user_id":"{}","history_items":["item{}"],"timestamp":{}}}"#,
            push.user,
            &push.user["user".len()..],
            push.timestamp
        );
        let (key, value) = records
            .get(&at)
            .unwrap_or_else(|| panic!("acknowledged push {push:?} is not at {at:?}"));
        assert_eq!(key, push.user.as_bytes(), "{push:?}");
        assert_eq!(String::from_utf8_lossy(value), expected, "{push:?}");
    }
    eprintln!(
        "{} messages in the topic, {} acknowledged pushes all found",
        records.len(),
        acked.len()
    );
    drop(broker);
}
