//! Proves the integration-test harness in `tests/common` works against the real
//! servers: Redis (restart with data kept), tansu (topics, produce, consume,
//! committed offsets), the fault-injection proxy, the schema-registry stub and
//! process supervision.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use redis::AsyncCommands;

#[tokio::test]
async fn redis_keeps_data_across_stop_and_kill() {
    let mut redis = RedisServer::start().await;
    let port = redis.port();
    let mut conn = redis.client().await;
    let _: () = conn.set("greeting", "hello").await.unwrap();
    let got: String = conn.get("greeting").await.unwrap();
    assert_eq!(got, "hello");

    redis.stop().await;
    assert!(!redis.is_running());
    redis.start_again().await;
    assert_eq!(redis.port(), port, "restarted on the same port");
    let mut conn = redis.client().await;
    let got: Option<String> = conn.get("greeting").await.unwrap();
    assert_eq!(got.as_deref(), Some("hello"), "data kept after SIGTERM");

    // appendfsync always: an acknowledged write survives SIGKILL.
    let _: () = conn.set("after-restart", 42).await.unwrap();
    redis.kill();
    redis.start_again().await;
    let mut conn = redis.client().await;
    let got: Option<i64> = conn.get("after-restart").await.unwrap();
    assert_eq!(got, Some(42), "data kept after SIGKILL");

    redis.flushall().await;
    let n: usize = redis::cmd("DBSIZE").query_async(&mut conn).await.unwrap();
    assert_eq!(n, 0);
}

/// `end_offsets` counts every record of a batching producer: tansu's high
/// watermark is the first offset of the last record batch + 1, so a check
/// of "caught up" against it passed while records were still unapplied.
#[tokio::test]
async fn end_offsets_count_every_record_of_a_batching_producer() {
    let broker = Broker::start().await;
    let bootstrap = broker.bootstrap();
    broker.create_topic("selftest.batched", 1).await;
    let producer = Producer::new(&bootstrap);
    // Sent together, so the producer puts them in few record batches.
    let sends = (0..300).map(|i| {
        let payload = format!("payload-{i}");
        let producer = &producer;
        async move {
            producer
                .send("selftest.batched", "k", payload, &[])
                .await
                .expect("delivered")
        }
    });
    futures::future::join_all(sends).await;
    let ends = end_offsets(&bootstrap, &["selftest.batched"]).await;
    assert_eq!(ends.get(&("selftest.batched".to_string(), 0)), Some(&300));
}

#[tokio::test]
async fn broker_round_trip_on_three_partitions() {
    let broker = Broker::start().await;
    let bootstrap = broker.bootstrap();
    broker.create_topic("selftest.events", 3).await;
    broker.create_compacted_topic("selftest.compacted", 2).await;
    assert_eq!(
        partition_count(&bootstrap, "selftest.compacted").await,
        Some(2)
    );

    let producer = Producer::new(&bootstrap);
    for i in 0..10 {
        let key = format!("tenant-a/customer-{i}");
        let payload = format!("payload-{i}");
        producer
            .send(
                "selftest.events",
                &key,
                &payload,
                &[("source", b"selftest"), ("index", i.to_string().as_bytes())],
            )
            .await
            .expect("delivered");
    }
    let (_, offset) = produce(&bootstrap, "selftest.compacted", "k", "v", &[]).await;
    assert_eq!(offset, 0);

    let got = consume_all(&bootstrap, "selftest.events", 10, DEFAULT_TIMEOUT).await;
    assert_eq!(got.len(), 10);
    let payloads: BTreeSet<_> = got.iter().map(|c| c.payload_str().unwrap()).collect();
    let expected: BTreeSet<_> = (0..10).map(|i| format!("payload-{i}")).collect();
    assert_eq!(
        payloads,
        expected.iter().map(String::as_str).collect::<BTreeSet<_>>()
    );
    for c in &got {
        assert_eq!(c.header_str("source"), Some("selftest"));
        let i = c.header_str("index").unwrap();
        assert_eq!(c.key_str(), Some(format!("tenant-a/customer-{i}").as_str()));
    }
    let partitions: BTreeSet<i32> = got.iter().map(|c| c.partition).collect();
    assert!(
        partitions.len() > 1,
        "keys spread over partitions: {partitions:?}"
    );

    // Offsets: end offsets add up to 10; a group's commit is read back.
    let ends = end_offsets(&bootstrap, &["selftest.events"]).await;
    assert_eq!(ends.len(), 3);
    assert_eq!(ends.values().sum::<i64>(), 10);

    let group = unique_name("selftest-group");
    let mut commit = TopicPartitionList::new();
    for ((topic, partition), end) in &ends {
        commit
            .add_partition_offset(topic, *partition, Offset::Offset(*end))
            .unwrap();
    }
    let cfg = {
        let mut cfg = client_config(&bootstrap);
        cfg.set("group.id", &group);
        cfg
    };
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = cfg.create().unwrap();
        c.commit(&commit, CommitMode::Sync).unwrap();
    })
    .await
    .unwrap();
    let committed = committed_offsets(&bootstrap, &group, &["selftest.events"]).await;
    assert_eq!(committed, ends);
    let none = committed_offsets(&bootstrap, "no-such-group", &["selftest.events"]).await;
    assert!(none.is_empty(), "{none:?}");
}

#[tokio::test]
async fn broker_behind_proxy_cut_and_restore() {
    let broker = Broker::start_behind_proxy().await;
    let bootstrap = broker.bootstrap();
    assert_ne!(bootstrap, broker.direct_bootstrap());
    broker.create_topic("selftest.proxied", 1).await;

    let producer = Producer::with_config(&bootstrap, &[("message.timeout.ms", "3000")]);
    producer
        .send("selftest.proxied", "k", "before-cut", &[])
        .await
        .expect("produce through the proxy");

    broker.proxy().cut();
    assert_eq!(broker.proxy().mode(), ProxyMode::Refuse);
    let err = producer
        .send("selftest.proxied", "k", "during-cut", &[])
        .await
        .expect_err("produce must fail while the proxy is cut");
    eprintln!("produce during cut failed as expected: {err}");
    let fresh = Producer::with_config(&bootstrap, &[("message.timeout.ms", "2000")]);
    fresh
        .send("selftest.proxied", "k", "during-cut-fresh", &[])
        .await
        .expect_err("a new client cannot reach the broker either");

    broker.proxy().restore();
    // The same producer reconnects on its own.
    wait_until(DEFAULT_TIMEOUT, POLL, "produce after restore", async || {
        producer
            .send("selftest.proxied", "k", "after-restore", &[])
            .await
            .is_ok()
    })
    .await;

    // The in-memory log survived the outage.
    let got = consume_all(&bootstrap, "selftest.proxied", 2, DEFAULT_TIMEOUT).await;
    assert_eq!(got[0].payload_str(), Some("before-cut"));
    assert!(got.iter().any(|c| c.payload_str() == Some("after-restore")));
    assert!(got
        .iter()
        .all(|c| !c.payload_str().unwrap().starts_with("during-cut")));
}

#[tokio::test]
async fn proxy_blackhole_hangs_then_recovers() {
    let broker = Broker::start_behind_proxy().await;
    let bootstrap = broker.bootstrap();
    broker.create_topic("selftest.blackhole", 1).await;
    let producer = Producer::with_config(&bootstrap, &[("message.timeout.ms", "2000")]);
    producer
        .send("selftest.blackhole", "k", "one", &[])
        .await
        .unwrap();
    broker.proxy().blackhole();
    assert!(producer
        .send("selftest.blackhole", "k", "lost", &[])
        .await
        .is_err());
    broker.proxy().restore();
    wait_until(
        DEFAULT_TIMEOUT,
        POLL,
        "produce after blackhole",
        async || {
            producer
                .send("selftest.blackhole", "k", "two", &[])
                .await
                .is_ok()
        },
    )
    .await;
}

#[tokio::test]
async fn schema_registry_stub_register_get_and_404() {
    let registry = SchemaRegistryStub::start();
    let schema = r#"{"type":"record","name":"Ping","namespace":"lapse.v1","fields":[{"name":"n","type":"long"}]}"#;
    let other = r#"{"type":"record","name":"Pong","namespace":"lapse.v1","fields":[]}"#;

    let id = registry.register("selftest-value", schema).await;
    assert_eq!(registry.register("selftest-value", schema).await, id);
    // Same schema modulo whitespace, other subject: same id (ids are global).
    let spaced = schema.replace(',', ", ");
    assert_eq!(registry.register("another-value", &spaced).await, id);
    let id2 = registry.register("selftest-value", other).await;
    assert_ne!(id, id2);

    let (status, body) = http_get_url(&format!("{}/schemas/ids/{id}", registry.url()))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["schema"].as_str(), Some(schema));

    let (status, body) = http_get_url(&format!("{}/schemas/ids/9999", registry.url()))
        .await
        .unwrap();
    assert_eq!(status, 404);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error_code"], 40403);
    assert_eq!(v["message"], "Schema not found");
    assert_eq!(registry.id_lookups(), 2);

    registry.set_available(false);
    let (status, _) = http_get_url(&format!("{}/schemas/ids/{id}", registry.url()))
        .await
        .unwrap();
    assert_eq!(status, 503);
    registry.set_available(true);
}

#[tokio::test]
async fn process_supervision_sigterm_kill_restart() {
    let mut p = LapseProcess::spawn_program("sleep", &["30"], &[]);
    assert!(p.is_running());
    p.sigterm();
    let status = p.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success());
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(15)
    );

    p.restart();
    assert!(p.is_running());
    let status = p.kill9();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );

    // Output capture and environment: LAPSE_HTTP_LISTEN is set, other LAPSE_*
    // variables of the test's environment (e.g. LAPSE_TANSU_BIN) are not inherited.
    let mut echo = LapseProcess::spawn_program(
        "sh",
        &[
            "-c",
            "echo \"$LAPSE_HTTP_LISTEN ${LAPSE_TANSU_BIN:-unset} $LAPSE_MINE\"; echo err >&2",
        ],
        &[("LAPSE_MINE", "mine")],
    );
    assert!(echo.wait_exit(Duration::from_secs(10)).await.success());
    assert_eq!(
        echo.stdout(),
        format!("127.0.0.1:{} unset mine\n", echo.http_port())
    );
    assert_eq!(echo.stderr(), "err\n");

    // The real binary starts and exits on its own for a one-shot invocation.
    let out = run_lapse(&["--help"], &[], Duration::from_secs(30)).await;
    assert!(out.status.code().is_some(), "lapse --help: {out:?}");
}

#[tokio::test]
#[should_panic(expected = "timed out after")]
async fn wait_until_fails_with_a_clear_message() {
    wait_until(
        Duration::from_millis(200),
        Duration::from_millis(20),
        "something that never happens",
        async || false,
    )
    .await;
}
