//! Issue 12: security and failure behaviour, against real servers on loopback.
//!
//! | claim | test |
//! |---|---|
//! | HTTP endpoints answer from the first seconds whatever is unreachable; `/readyz` names what is not ready and why | `http_endpoints_answer_within_two_seconds_while_redis_and_the_broker_are_down` |

mod common;

use std::time::{Duration, Instant};

use common::stack::*;
use common::*;

/// `GET path` until it answers, for at most `within`: (status, body, when).
async fn first_answer(
    lapse: &LapseProcess,
    path: &str,
    within: Duration,
) -> Result<(u16, String, Duration), String> {
    let started = Instant::now();
    loop {
        match lapse.http_get(path).await {
            Ok((code, body)) => return Ok((code, body, started.elapsed())),
            Err(e) if started.elapsed() >= within => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The `/readyz` body as JSON.
fn readyz_json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/readyz is not JSON ({e}): {body}"))
}

#[tokio::test]
async fn http_endpoints_answer_within_two_seconds_while_redis_and_the_broker_are_down() {
    let mut s = Stack::start_with(Broker::start_behind_proxy().await).await;
    s.redis.stop().await;
    s.broker.proxy().cut();
    let cfg = s.config("down", "");
    let spawned = Instant::now();
    let mut lapse = s.spawn("g-down", &cfg);

    // Within about two seconds of the spawn, every endpoint answers.
    let (code, _, _) = first_answer(&lapse, "/healthz", Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| panic!("/healthz: no answer within 2 s of the spawn: {e}"));
    assert_eq!(code, 200);
    assert!(
        spawned.elapsed() < Duration::from_millis(2500),
        "/healthz answered only after {:?}",
        spawned.elapsed()
    );
    let (code, metrics) = lapse.http_get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.lines().any(|l| l == "lapse_ready 0"),
        "lapse_ready must be 0:\n{metrics}"
    );
    let (code, body) = lapse.http_get("/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    let v = readyz_json(&body);
    assert_eq!(v["ready"], false, "{body}");
    for component in ["redis", "broker"] {
        assert!(
            v["not_ready"][component].is_string(),
            "/readyz must name {component}: {body}"
        );
    }
    assert!(
        lapse.is_running(),
        "lapse must wait for its dependencies, not exit"
    );
    // The reasons become the real errors once the first attempts have failed.
    let body = wait_for(
        LONG,
        POLL,
        "/readyz to say why Redis is unreachable",
        async || {
            let (code, body) = lapse.http_get("/readyz").await.ok()?;
            let v = readyz_json(&body);
            let redis = v["not_ready"]["redis"].as_str()?.to_owned();
            (code == 503 && !redis.contains("not connected yet")).then_some(body)
        },
    )
    .await;
    let v = readyz_json(&body);
    assert!(
        v["not_ready"]["redis"]
            .as_str()
            .unwrap()
            .contains("redis.url"),
        "the Redis reason names the setting to check: {body}"
    );
    // While Redis and the broker are down, the allowance API says it is starting.
    let (code, _) = lapse.http_get("/v1/allowance/t/c").await.unwrap();
    assert_eq!(code, 503);

    // Both come back: lapse becomes ready without a restart.
    s.redis.start_again().await;
    s.broker.proxy().restore();
    lapse.wait_ready(LONG).await;
    let (_, body) = lapse.http_get("/readyz").await.unwrap();
    assert_eq!(readyz_json(&body)["ready"], true, "{body}");
    wait_until(LONG, POLL, "lapse_ready 1", async || {
        metric(&lapse, "lapse_ready", &[]).await == 1.0
    })
    .await;
    let (code, _) = lapse.http_get("/v1/allowance/t/c").await.unwrap();
    assert_eq!(code, 200);
}
