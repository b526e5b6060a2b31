//! lapse on a real Redis Cluster (3 masters, 3 replicas on loopback): a
//! representative set of the end-to-end guarantees, each also proven on a
//! single node by its own test file.
//!
//! | guarantee on a Cluster | test |
//! |---|---|
//! | state equals a single-node run's; replay from zero changes no byte; a re-sent event id is skipped | `state_equals_the_single_node_run_and_a_replay_changes_nothing` |
//! | caps publish CAPPED; the allowance API reads the cluster | `caps_and_the_allowance_api_work_on_a_cluster` |
//! | timers fire on the cluster: AT_RISK triggers published once per customer | `recall_timers_fire_once_on_a_cluster` |
//! | a permanent Redis error fails `/readyz` with what to do, counted by kind | `a_cluster_used_as_a_single_node_fails_readiness_with_what_to_do` |
//! | `lapse sweep-timers` scans every master and restores lost timers | `sweep_timers_restores_timers_on_a_cluster` |

mod common;

use std::time::Duration;

use common::stack::*;
use common::*;
use lapse::codec::{Framing, RECALL_TRIGGER, THROTTLE_EVENT};
use lapse::config::RedisConfig;
use lapse::domain::event::*;
use lapse::domain::lapse::Stage;
use lapse::domain::recall::trigger_id;
use lapse::metrics::Metrics;
use lapse::store::StateStore;

#[tokio::test]
async fn state_equals_the_single_node_run_and_a_replay_changes_nothing() {
    let s = Stack::start_cluster().await;
    let n = 60;
    let mut events = population("t1", n, 1);
    // Visits and sends re-sent upstream: the same event ids at new offsets.
    let mut resent: Vec<_> = Vec::new();
    for kind in [EventKind::Visit, EventKind::Send] {
        resent.extend(
            events
                .iter()
                .filter(|(e, _)| e.kind() == kind)
                .take(5)
                .cloned(),
        );
    }
    events.extend(resent);
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &events, |_| Framing::SingleObject).await;

    let mut on_cluster = s.spawn("g-cluster", &s.config("cluster", ""));
    let mut env = s.env("g-single");
    env.retain(|(k, _)| k != "LAPSE_REDIS_URL");
    env.push(("LAPSE_REDIS_URL".into(), s.redis.url()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let single_cfg = s.single_node_config("single");
    let mut on_single = LapseProcess::spawn(&["run", "--config", &single_cfg], &env);
    s.wait_caught_up("g-cluster", LONG).await;
    s.wait_caught_up("g-single", LONG).await;
    // Overdue recall stages fire too: let the cluster's timer loop fire them
    // (the replay below would, changing bytes).
    s.wait_no_timer_due(LONG).await;
    assert!(
        metric(
            &on_cluster,
            "lapse_duplicates_skipped_total",
            &[("kind", "event_id")]
        )
        .await
            >= 10.0,
        "the re-sent event ids are skipped on the cluster"
    );

    let cluster_store = s.store().await;
    let single_store = StateStore::connect(
        &RedisConfig {
            url: s.redis.url(),
            ..RedisConfig::default()
        },
        Metrics::new(&Default::default()),
    )
    .await
    .unwrap();
    for i in 0..n {
        let c = cust("t1", &format!("c{i:04}"));
        let a = state(&cluster_store, &c).await;
        // Applied history (visits, watermarks, event ids, channels), as in
        // foundation.rs; firing times follow each run's wall clock.
        assert_same_state(&c, &a, &state(&single_store, &c).await);
        assert_eq!(a.visits.count as usize, 1 + i % 3, "{c}: visits");
    }
    on_single.sigterm();
    assert!(on_single.wait_exit(Duration::from_secs(30)).await.success());
    on_cluster.sigterm();
    assert!(on_cluster
        .wait_exit(Duration::from_secs(30))
        .await
        .success());

    let before = s.dump().await;
    assert_eq!(before.keys().filter(|k| k.ends_with(":state")).count(), n);
    s.replay_changes_nothing(&s.config("replay", ""), events.len())
        .await;
}

#[tokio::test]
async fn caps_and_the_allowance_api_work_on_a_cluster() {
    const THROTTLE: &str = "engagement.throttle";
    let s = Stack::start_cluster().await;
    s.broker.create_compacted_topic(THROTTLE, 3).await;
    let c = cust("brandA", "amy");
    let t1 = day(700);
    let h = 3_600_000;
    let events = vec![
        // Two WeChat marketing sends within a day: CAPPED until the first + 24 h.
        (
            send(&c, "w1", t1, Channel::Wechat, Purpose::Marketing),
            None,
        ),
        (
            send(&c, "w2", t1 + 2 * h, Channel::Wechat, Purpose::Marketing),
            None,
        ),
        // Unsubscribe on SMS: SUPPRESSED on SMS.
        (reply(&c, "r1", t1 + 5 * h, Channel::Sms), Some("退订")),
    ];
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &events, |_| Framing::SingleObject).await;
    let mut lapse = s.spawn("g-caps", &s.config("caps", ""));
    s.wait_caught_up("g-caps", LONG).await;

    let decisions = wait_for(
        LONG,
        Duration::from_millis(200),
        "CAPPED and SUPPRESSED",
        async || {
            let d = by_id(&s, THROTTLE, THROTTLE_EVENT, "decision_id").await;
            let states: Vec<String> = d
                .values()
                .map(|copies| txt(&decode(THROTTLE_EVENT, &copies[0]), "state"))
                .collect();
            (states.iter().any(|s| s == "CAPPED") && states.iter().any(|s| s == "SUPPRESSED"))
                .then_some(d)
        },
    )
    .await;
    let capped: Vec<_> = decisions
        .values()
        .map(|copies| decode(THROTTLE_EVENT, &copies[0]))
        .filter(|d| txt(d, "state") == "CAPPED")
        .collect();
    assert_eq!(capped.len(), 1, "one CAPPED decision: {decisions:?}");
    assert_eq!(txt(&capped[0], "cause_event_id"), "w2");
    assert_eq!(
        metric(&lapse, "lapse_cap_hits_total", &[("channel", "wechat")]).await,
        1.0
    );

    // The synchronous check reads the customer from the cluster.
    let (code, body) = lapse.http_get("/v1/allowance/brandA/amy").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["channels"]["SMS"]["state"], "SUPPRESSED", "{v}");
    assert_eq!(v["channels"]["SMS"]["allowed_now"], false, "{v}");
    let (code, _) = lapse.http_get("/readyz").await.unwrap();
    assert_eq!(code, 200);
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn recall_timers_fire_once_on_a_cluster() {
    const TRIGGERS: &str = "recall.triggers";
    let s = Stack::start_cluster().await;
    s.broker.create_topic(TRIGGERS, 3).await;
    s.broker.create_topic("recall.outcomes", 3).await;
    let n = 40;
    let customers: Vec<CustomerRef> = (0..n)
        .map(|i| cust("clinicK", &format!("k{i:03}")))
        .collect();
    let history: Vec<(Event, Option<&str>)> = customers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            (
                visit(c, &format!("v{i}"), day(100), 60_000, Some("LASER")),
                None,
            )
        })
        .collect();
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &history, |_| Framing::SingleObject).await;
    let cfg = s.config_with(
        "recall",
        "",
        "[clock]\nmode = \"event\"\n[timers]\npoll_interval = \"20ms\"\n[policy.lapse]\nholdout_share = 0.0\n",
    );
    let mut lapse = s.spawn("g-recall", &cfg);
    s.wait_caught_up("g-recall", LONG).await;
    // LASER: 30 d → AT_RISK at day 136; event time moves past it, every
    // timer (spread over the cluster's slots) fires.
    s.advance_event_time(&p, "g-recall", day(140)).await;
    let triggers = wait_for(
        LONG,
        Duration::from_millis(200),
        "a trigger per customer",
        async || {
            let t = by_id(&s, TRIGGERS, RECALL_TRIGGER, "trigger_id").await;
            (t.len() >= n).then_some(t)
        },
    )
    .await;
    assert_eq!(triggers.len(), n, "one AT_RISK trigger per customer");
    for c in &customers {
        let id = trigger_id(c, day(100), Stage::AtRisk, 1);
        assert_eq!(
            triggers.get(&id).map(Vec::len),
            Some(1),
            "{c}: published once"
        );
    }
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn a_cluster_used_as_a_single_node_fails_readiness_with_what_to_do() {
    let s = Stack::start_cluster().await;
    let events = population("t1", 30, 2);
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &events, |_| Framing::SingleObject).await;
    // redis.cluster left false, pointed at one node: most keys live elsewhere.
    let mut env = s.env("g-misconfigured");
    env.retain(|(k, _)| k != "LAPSE_REDIS_URL");
    env.push(("LAPSE_REDIS_URL".into(), s.redis_url()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cfg = s.single_node_config("misconfigured");
    let mut lapse = LapseProcess::spawn(&["run", "--config", &cfg], &env);
    let body = wait_for(
        LONG,
        Duration::from_millis(200),
        "/readyz to say why",
        async || {
            let (code, body) = lapse.http_get("/readyz").await.ok()?;
            // Both retried steps: the batch's state write and the timer loop.
            let both = body.contains("state write: ") && body.contains("firing timers: ");
            (code == 503 && both).then_some(body)
        },
    )
    .await;
    assert!(body.contains("set redis.cluster = true"), "{body}");
    assert!(
        metric(
            &lapse,
            "lapse_redis_permanent_errors_total",
            &[("kind", "moved")]
        )
        .await
            >= 1.0
    );
    assert!(
        lapse.stderr().contains("waiting does not cure"),
        "logged at error level with what to do"
    );
    // (A SIGTERM would wait out kafka's shutdown drain timeout: the batch
    // cannot finish.)
    lapse.kill9();
}

/// `lapse sweep-timers` scans every master of the cluster (SCAN per node) and
/// restores lost timers in their shards' slots.
#[tokio::test]
async fn sweep_timers_restores_timers_on_a_cluster() {
    let s = Stack::start_cluster().await;
    let events = population("csweep", 60, 5);
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &events, |_| Framing::SingleObject).await;
    let cfg = s.config("cluster", "");
    let mut lapse = s.spawn("g-csweep", &cfg);
    s.wait_caught_up("g-csweep", LONG).await;
    s.wait_no_timer_due(LONG).await;
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
    s.sweep_restores_deleted_timers(&cfg, 60).await;
}
