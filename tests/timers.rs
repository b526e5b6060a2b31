//! The Redis timer store against a real `redis-server`: scheduling, leased
//! claims, lease expiry, stale completions, concurrent claimers, and a
//! re-schedule during a lease winning over the claimer; and the timer loop
//! over it stopping promptly on shutdown while Redis is down.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_until, RedisServer};
use lapse::config::{Config, Dur, MetricsConfig, RedisConfig, RetryConfig};
use lapse::domain::clock::ManualClock;
use lapse::domain::event::CustomerRef;
use lapse::domain::policy::Policies;
use lapse::metrics::Metrics;
use lapse::service::state_params;
use lapse::state_write::{MemorySink, StateWriter};
use lapse::store::timers::{shard_of, TimerStore};
use lapse::store::{MemoryBackend, StateStore};
use lapse::timer_loop::TimerLoop;
use redis::aio::MultiplexedConnection;

type Store = TimerStore<MultiplexedConnection>;

async fn store(redis: &RedisServer, shards: u32) -> Store {
    TimerStore::new(redis.client().await, "lapse", shards)
        .await
        .expect("timer store")
}

fn cust(i: usize) -> CustomerRef {
    CustomerRef::new("brandA", format!("cust-{i}"))
}

#[tokio::test]
async fn schedule_claim_complete() {
    let redis = RedisServer::start().await;
    let t = store(&redis, 1).await;
    let (a, b, c) = (cust(1), cust(2), cust(3));
    t.schedule(&[(&a, 100), (&b, 200), (&c, 300)])
        .await
        .unwrap();
    assert_eq!(t.pending(0).await.unwrap(), 3);
    assert_eq!(t.oldest_due(0).await.unwrap(), Some(100));
    assert_eq!(t.due_count(0, 250).await.unwrap(), 2);

    // Only what is due, oldest first, at most `limit`.
    let got = t.claim_due(0, 250, 1_000, 1).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((&got[0].customer, got[0].due_ms), (&a, 100));
    assert_eq!(got[0].lease, 1_250);
    let got2 = t.claim_due(0, 250, 1_000, 10).await.unwrap();
    assert_eq!(got2.len(), 1);
    assert_eq!((&got2[0].customer, got2[0].due_ms), (&b, 200));
    // Leased timers hold their lease as score and are not due.
    assert_eq!(t.due_of(&a).await.unwrap(), Some(1_250));
    assert_eq!(t.due_count(0, 250).await.unwrap(), 0);

    // Complete: a is done, b re-scheduled.
    assert!(t.complete(&a, got[0].lease, None).await.unwrap());
    assert!(t.complete(&b, got2[0].lease, Some(5_000)).await.unwrap());
    assert_eq!(t.due_of(&a).await.unwrap(), None);
    assert_eq!(t.due_of(&b).await.unwrap(), Some(5_000));
    assert_eq!(t.pending(0).await.unwrap(), 2);

    // Cancel.
    t.cancel(&[&b, &c, &cust(99)]).await.unwrap();
    assert_eq!(t.pending(0).await.unwrap(), 0);
    assert_eq!(t.oldest_due(0).await.unwrap(), None);
    assert!(t
        .claim_due(0, i64::MAX / 2, 1, 10)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn timers_are_sharded_by_hash_tag() {
    let redis = RedisServer::start().await;
    let t = store(&redis, 16).await;
    let customers: Vec<CustomerRef> = (0..200).map(cust).collect();
    let items: Vec<(&CustomerRef, i64)> = customers.iter().map(|c| (c, 10)).collect();
    t.schedule(&items).await.unwrap();
    let mut conn = redis.client().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.sort();
    let mut want: Vec<String> = (0..16)
        .map(|n| format!("lapse:{{timers:{n}}}:due"))
        .collect();
    want.sort();
    assert_eq!(keys, want, "200 customers cover all 16 shards");
    let mut total = 0;
    for shard in 0..16 {
        let claimed = t.claim_due(shard, 10, 1_000, 1_000).await.unwrap();
        for c in &claimed {
            assert_eq!(shard_of(&c.customer, 16), shard);
        }
        total += claimed.len();
    }
    assert_eq!(total, 200);
}

#[tokio::test]
async fn a_lease_blocks_other_claims_until_it_ends() {
    let redis = RedisServer::start().await;
    let t = store(&redis, 4).await;
    let a = cust(7);
    let shard = t.shard(&a);
    t.schedule(&[(&a, 1_000)]).await.unwrap();
    let first = t.claim_due(shard, 1_000, 30_000, 10).await.unwrap();
    assert_eq!(first.len(), 1);
    // Another claimer, any time before the lease ends: nothing.
    for now in [1_000, 20_000, 30_999] {
        assert!(t
            .claim_due(shard, now, 30_000, 10)
            .await
            .unwrap()
            .is_empty());
    }
    // The first claimer "crashed": after the lease the timer is due again.
    let second = t.claim_due(shard, 31_000, 30_000, 10).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].due_ms, 31_000, "due again at its old lease");
    assert_eq!(second[0].lease, 61_000);
    // The first claimer's completion is stale now and changes nothing.
    assert!(!t.complete(&a, first[0].lease, None).await.unwrap());
    assert!(!t.complete(&a, first[0].lease, Some(5)).await.unwrap());
    assert_eq!(t.due_of(&a).await.unwrap(), Some(61_000));
    // The current holder's completion applies.
    assert!(t.complete(&a, second[0].lease, None).await.unwrap());
    assert_eq!(t.due_of(&a).await.unwrap(), None);
    // Completing a timer that no longer exists: false.
    assert!(!t.complete(&a, second[0].lease, None).await.unwrap());
}

#[tokio::test]
async fn a_reschedule_during_the_lease_wins() {
    let redis = RedisServer::start().await;
    let t = store(&redis, 4).await;
    let (a, b) = (cust(1), cust(2));
    t.schedule(&[(&a, 100), (&b, 100)]).await.unwrap();
    let mut claimed: HashMap<CustomerRef, i64> = HashMap::new();
    for shard in 0..4 {
        for c in t.claim_due(shard, 100, 60_000, 10).await.unwrap() {
            claimed.insert(c.customer, c.lease);
        }
    }
    assert_eq!(claimed.len(), 2);
    // The event path re-schedules a (a visit) and cancels b while they are leased.
    t.schedule(&[(&a, 9_000_000)]).await.unwrap();
    t.cancel(&[&b]).await.unwrap();
    let done = t
        .complete_many(&[(&a, claimed[&a], Some(200)), (&b, claimed[&b], Some(300))])
        .await
        .unwrap();
    assert_eq!(done, [false, false]);
    assert_eq!(t.due_of(&a).await.unwrap(), Some(9_000_000));
    assert_eq!(t.due_of(&b).await.unwrap(), None);
}

#[tokio::test]
async fn scripts_are_reloaded_after_a_flush() {
    let redis = RedisServer::start().await;
    let t = store(&redis, 2).await;
    let a = cust(1);
    t.schedule(&[(&a, 5)]).await.unwrap();
    redis.flush_scripts().await;
    let got = t.claim_due(t.shard(&a), 10, 100, 10).await.unwrap();
    assert_eq!(got.len(), 1);
    redis.flush_scripts().await;
    assert!(t.complete(&a, got[0].lease, Some(1_000)).await.unwrap());
    redis.flush_scripts().await;
    // The pipelined variant reloads too (the score is now 1_000: a match).
    assert_eq!(t.complete_many(&[(&a, 1_000, None)]).await.unwrap(), [true]);
    assert_eq!(t.due_of(&a).await.unwrap(), None);
}

/// The timer loop claims every shard in one pipelined round trip: each shard's
/// answer holds only its own due timers, oldest first, at most `limit`, and the
/// counts over all shards follow the leases.
#[tokio::test]
async fn one_round_trip_claims_every_shard() {
    let redis = RedisServer::start().await;
    let t = store(&redis, 4).await;
    let customers: Vec<CustomerRef> = (0..40).map(cust).collect();
    // Due at 10, 20, ..., 400; 25 of them due at 250.
    let timers: Vec<(&CustomerRef, i64)> = customers
        .iter()
        .enumerate()
        .map(|(i, c)| (c, (i as i64 + 1) * 10))
        .collect();
    t.schedule(&timers).await.unwrap();
    // Garbage in one shard is dropped without disturbing the others.
    let mut conn = redis.client().await;
    redis::cmd("ZADD")
        .arg(t.key(2))
        .arg(1)
        .arg("no-slash")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert_eq!(t.counts(250).await.unwrap(), (41, 26));

    let mut due_by_shard: HashMap<u32, Vec<(CustomerRef, i64)>> = HashMap::new();
    for (c, due) in timers.iter().filter(|(_, d)| *d <= 250) {
        due_by_shard
            .entry(t.shard(c))
            .or_default()
            .push(((*c).clone(), *due));
    }
    let shards = [0, 1, 2, 3];
    let got = t.claim_due_many(&shards, 250, 1_000, 3).await.unwrap();
    assert_eq!(got.len(), 4);
    let mut claimed = 0;
    for (shard, claims) in shards.iter().zip(&got) {
        // In shard 2 the garbage (oldest) took one of the three places.
        let room = if *shard == 2 { 2 } else { 3 };
        let expected: Vec<(CustomerRef, i64)> = due_by_shard
            .get(shard)
            .map(|v| v.iter().take(room).cloned().collect())
            .unwrap_or_default();
        let actual: Vec<(CustomerRef, i64)> = claims
            .iter()
            .map(|c| (c.customer.clone(), c.due_ms))
            .collect();
        assert_eq!(actual, expected, "shard {shard}");
        assert!(claims.iter().all(|c| c.lease == 1_250));
        claimed += claims.len();
    }
    assert_eq!(claimed, 11, "3 + 3 + 2 + 3 of the 25 due");
    // The garbage member is gone; the claimed ones are leased, not due.
    assert_eq!(t.counts(250).await.unwrap(), (40, 25 - claimed));
    // An empty shard list asks Redis nothing and claims nothing.
    assert!(t
        .claim_due_many(&[], 250, 1_000, 3)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn members_not_written_by_schedule_are_dropped() {
    let redis = RedisServer::start().await;
    let t = store(&redis, 1).await;
    let mut conn = redis.client().await;
    redis::cmd("ZADD")
        .arg(t.key(0))
        .arg(1)
        .arg("no-slash")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert!(t.claim_due(0, 10, 100, 10).await.unwrap().is_empty());
    assert_eq!(t.pending(0).await.unwrap(), 0);
}

/// Two claimers on separate connections race over 1,000 due timers (lease much
/// longer than the test): every timer is claimed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_get_the_same_timer() {
    let redis = RedisServer::start().await;
    let shards = 4;
    let setup = store(&redis, shards).await;
    let customers: Vec<CustomerRef> = (0..1_000).map(cust).collect();
    let items: Vec<(&CustomerRef, i64)> = customers
        .iter()
        .enumerate()
        .map(|(i, c)| (c, i as i64))
        .collect();
    setup.schedule(&items).await.unwrap();

    let mut tasks = Vec::new();
    for _ in 0..2 {
        let t = store(&redis, shards).await;
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let mut got_any = false;
                for shard in 0..shards {
                    // Small batches so the two interleave.
                    let claimed = t.claim_due(shard, 1_000, 3_600_000, 7).await.unwrap();
                    got_any |= !claimed.is_empty();
                    mine.extend(claimed);
                }
                if !got_any {
                    return mine;
                }
            }
        }));
    }
    let mut seen = HashSet::new();
    let mut per_task = Vec::new();
    for task in tasks {
        let mine = task.await.unwrap();
        per_task.push(mine.len());
        for c in mine {
            assert!(
                seen.insert(c.customer.clone()),
                "{} claimed twice",
                c.customer
            );
        }
    }
    assert_eq!(
        seen.len(),
        1_000,
        "every timer claimed (per task: {per_task:?})"
    );
    assert!(
        per_task.iter().all(|n| *n > 0),
        "both claimed: {per_task:?}"
    );
    for shard in 0..shards {
        assert_eq!(setup.due_count(shard, 1_000).await.unwrap(), 0);
    }
}

/// Claim-fire-complete loops racing, with leases expiring under them: a timer is
/// never held by two claimers at once, and each is completed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_fire_loops_complete_each_timer_once() {
    let redis = RedisServer::start().await;
    let shards = 2;
    let setup = store(&redis, shards).await;
    let customers: Vec<CustomerRef> = (0..300).map(cust).collect();
    let items: Vec<(&CustomerRef, i64)> = customers.iter().map(|c| (c, 0)).collect();
    setup.schedule(&items).await.unwrap();

    let mut tasks = Vec::new();
    for w in 0..2i64 {
        let t = store(&redis, shards).await;
        tasks.push(tokio::spawn(async move {
            let mut completed = Vec::new();
            let mut stale = 0;
            // A logical clock per worker, 1 ms per step; a lease of 5 ms, so
            // leases often expire and timers are re-claimed by the other worker.
            let mut now = w;
            loop {
                now += 1;
                let mut got_any = false;
                for shard in 0..shards {
                    let claimed = t.claim_due(shard, now, 5, 3).await.unwrap();
                    got_any |= !claimed.is_empty();
                    for c in claimed {
                        if t.complete(&c.customer, c.lease, None).await.unwrap() {
                            completed.push(c.customer);
                        } else {
                            stale += 1;
                        }
                    }
                }
                if !got_any && t.pending(0).await.unwrap() + t.pending(1).await.unwrap() == 0 {
                    return (completed, stale);
                }
                if now > 100_000 {
                    panic!("timers never drained");
                }
            }
        }));
    }
    let mut seen = HashSet::new();
    for task in tasks {
        let (completed, _stale) = task.await.unwrap();
        for c in completed {
            assert!(seen.insert(c.clone()), "{c} completed twice");
        }
    }
    assert_eq!(seen.len(), 300);
}

/// The timer loop fires and completes a due timer; then, with Redis gone, it
/// backs off (here for a minute) and still stops within moments of shutdown:
/// the back-off waits on the shutdown signal (it once waited on a flag nothing
/// raised, so shutdown stalled for a whole back-off while Redis was down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timer_loop_stops_on_shutdown_in_the_middle_of_a_back_off() {
    let mut redis = RedisServer::start().await;
    let config = Config::default();
    let metrics = Metrics::new(&MetricsConfig::default());
    let redis_cfg = RedisConfig {
        url: redis.url(),
        ..RedisConfig::default()
    };
    let store = StateStore::connect(&redis_cfg, metrics.clone())
        .await
        .expect("state store");
    let timers = TimerStore::new(store.conn(), "lapse", 4)
        .await
        .expect("timer store");
    let c = cust(1);
    timers.schedule(&[(&c, 1_000)]).await.unwrap();
    let shutdown = Arc::new(AtomicBool::new(false));
    let timer_loop = TimerLoop {
        writer: StateWriter {
            backend: Arc::new(MemoryBackend::new("lapse")),
            sink: Arc::new(MemorySink::default()),
            metrics: metrics.clone(),
        },
        timers: timers.clone(),
        policies: Arc::new(Policies::new(&config.policy).expect("default policy")),
        params: state_params(&config),
        metrics: metrics.clone(),
        retry: RetryConfig {
            initial_backoff: Dur::secs(60),
            max_backoff: Dur::secs(60),
        },
        clock: Arc::new(ManualClock::new(1_700_000_000_000)),
        shared_clock: None,
        cfg: config.timers.clone(),
        shutdown: shutdown.clone(),
        durability: None,
    };
    let task = tokio::spawn(timer_loop.run());

    let fired = || metrics.timers_fired.with_label_values(&["fired"]).get();
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        "the due timer fired",
        async || fired() == 1,
    )
    .await;
    assert_eq!(timers.due_of(&c).await.unwrap(), None, "completed");

    redis.kill();
    let retries = || metrics.retries.with_label_values(&["timers"]).get();
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        "a failed poll",
        async || retries() >= 1,
    )
    .await;
    let started = Instant::now();
    shutdown.store(true, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the timer loop stops within 5 s of shutdown, not after its 60 s back-off")
        .expect("the timer loop does not panic");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(retries(), 1, "still in its first back-off");
}

/// Claims every due timer of `shards` until none is left (misplaced ones are
/// moved on the first claim and claimed from their own shard on a later one),
/// completing each: returns each claimed customer with how often it was claimed.
async fn claim_all(t: &Store, now: i64) -> HashMap<CustomerRef, usize> {
    let shards: Vec<u32> = (0..t.shards()).collect();
    let mut got: HashMap<CustomerRef, usize> = HashMap::new();
    for _ in 0..4 {
        for claimed in t
            .claim_due_many(&shards, now, 60_000, 10_000)
            .await
            .unwrap()
        {
            for c in claimed {
                assert!(
                    t.complete(&c.customer, c.lease, None).await.unwrap(),
                    "{c:?}"
                );
                *got.entry(c.customer).or_default() += 1;
            }
        }
    }
    got
}

/// `timers.shards` changed in both directions: every timer fires once, none is
/// left behind in a shard nobody polls, none is claimed again and again.
#[tokio::test]
async fn changing_the_shard_count_orphans_no_timer() {
    let redis = RedisServer::start().await;
    let customers: Vec<CustomerRef> = (0..300).map(cust).collect();
    let timers: Vec<(&CustomerRef, i64)> = customers.iter().zip(1..).collect();
    let now = 1_000_000;
    for (from, to) in [(8u32, 3u32), (3, 8), (16, 16)] {
        store(&redis, from).await.schedule(&timers).await.unwrap();
        let t = store(&redis, to).await;
        let orphaned = customers.iter().filter(|c| shard_of(c, from) >= to).count();
        assert_eq!(
            t.migrate_orphans().await.unwrap(),
            orphaned,
            "{from} → {to}"
        );
        assert_eq!(t.migrate_orphans().await.unwrap(), 0, "idempotent");
        let got = claim_all(&t, now).await;
        assert_eq!(
            got.len(),
            customers.len(),
            "{from} → {to}: every timer fired"
        );
        assert!(got.values().all(|n| *n == 1), "{from} → {to}: each once");
        // Nothing left anywhere, polled or not.
        let mut conn = redis.client().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("lapse:{timers:*}:due")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(keys.is_empty(), "{from} → {to}: left {keys:?}");
    }
}

/// A customer with a timer in its new shard and an older one in an orphaned
/// shard keeps the earlier due time (firing early only re-evaluates).
#[tokio::test]
async fn a_migrated_timer_keeps_the_earlier_due_time() {
    let redis = RedisServer::start().await;
    let c = (0..)
        .map(cust)
        .find(|c| shard_of(c, 8) >= 2)
        .expect("a customer beyond shard 2 of 8");
    store(&redis, 8).await.schedule(&[(&c, 500)]).await.unwrap();
    let t = store(&redis, 2).await;
    t.schedule(&[(&c, 900)]).await.unwrap();
    assert_eq!(t.migrate_orphans().await.unwrap(), 1);
    assert_eq!(t.due_of(&c).await.unwrap(), Some(500));
}
