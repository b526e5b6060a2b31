//! The Redis state store against a real `redis-server`: the multi-key
//! compare-and-set write (per-entry results in order, across several script
//! calls), conflicts leaving the stored value untouched, and a script reload
//! after Redis lost its script cache.

mod common;

use common::RedisServer;
use lapse::config::{MetricsConfig, RedisConfig};
use lapse::domain::campaign::CampaignState;
use lapse::domain::event::CustomerRef;
use lapse::domain::state::CustomerState;
use lapse::metrics::Metrics;
use lapse::store::redis::StateStore;

async fn store(redis: &RedisServer) -> StateStore {
    let cfg = RedisConfig {
        url: redis.url(),
        ..RedisConfig::default()
    };
    StateStore::connect(&cfg, Metrics::new(&MetricsConfig::default()))
        .await
        .expect("state store")
}

fn state(n: i64) -> CustomerState {
    CustomerState {
        timer_due: Some(n),
        ..CustomerState::default()
    }
}

#[tokio::test]
async fn a_batch_write_lands_where_the_revision_matches_and_nowhere_else() {
    let redis = RedisServer::start().await;
    let s = store(&redis).await;
    // More customers than one script call takes, so the results of several
    // calls must come back flattened in order.
    let customers: Vec<CustomerRef> = (0..150)
        .map(|i| CustomerRef::new("brandA", format!("c{i}")))
        .collect();
    let first: Vec<CustomerState> = (0..150).map(state).collect();
    let writes: Vec<(&CustomerRef, u64, &CustomerState)> = customers
        .iter()
        .zip(&first)
        .map(|(c, st)| (c, 0, st))
        .collect();
    assert!(s.save_many(&writes).await.unwrap().iter().all(|ok| *ok));

    // Every third write is stale (expects the absent revision 0): exactly those
    // conflict, the others move to revision 2.
    let second: Vec<CustomerState> = (0..150).map(|i| state(1_000 + i)).collect();
    let writes: Vec<(&CustomerRef, u64, &CustomerState)> = customers
        .iter()
        .zip(&second)
        .enumerate()
        .map(|(i, (c, st))| (c, if i % 3 == 0 { 0 } else { 1 }, st))
        .collect();
    let landed = s.save_many(&writes).await.unwrap();
    let expected: Vec<bool> = (0..150).map(|i| i % 3 != 0).collect();
    assert_eq!(landed, expected);

    let refs: Vec<&CustomerRef> = customers.iter().collect();
    let loaded = s.load_many(&refs).await.unwrap();
    for (i, l) in loaded.iter().enumerate() {
        if i % 3 == 0 {
            assert_eq!((l.rev, &l.state), (1, &first[i]), "customer {i} kept");
        } else {
            assert_eq!((l.rev, &l.state), (2, &second[i]), "customer {i} written");
        }
    }

    // A value without a revision prefix counts as revision 0 (it is never
    // written by lapse; overwriting it beats failing the batch forever).
    let odd = CustomerRef::new("brandA", "odd");
    let mut conn = redis.client().await;
    redis::cmd("SET")
        .arg(s.keys().state(&odd))
        .arg("junk")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    assert_eq!(s.save_many(&[(&odd, 5, &first[0])]).await.unwrap(), [false]);
    assert_eq!(s.save_many(&[(&odd, 0, &first[0])]).await.unwrap(), [true]);
    assert_eq!(s.load(&odd).await.unwrap().unwrap().rev, 1);
}

#[tokio::test]
async fn writes_survive_a_lost_script_cache_and_campaigns_use_the_same_cas() {
    let redis = RedisServer::start().await;
    let s = store(&redis).await;
    redis.flush_scripts().await;
    let c = CustomerRef::new("brandA", "c1");
    assert_eq!(s.save_many(&[(&c, 0, &state(7))]).await.unwrap(), [true]);
    assert_eq!(s.load(&c).await.unwrap().unwrap().state, state(7));

    let campaign = CampaignState::default();
    let ids = [("brandA", "spring")];
    assert_eq!(
        s.save_campaigns(&[(ids[0], 0, &campaign)]).await.unwrap(),
        [true]
    );
    assert_eq!(
        s.save_campaigns(&[(ids[0], 0, &campaign)]).await.unwrap(),
        [false]
    );
    let loaded = s.load_campaigns(&ids).await.unwrap();
    assert_eq!(loaded[0].0, 1);
}

/// The script reads the stored revision (the digits before `:` in the first
/// 21 bytes) in Lua; it must agree with `stored_revision` (the memory
/// backend's check and the documented format) on every kind of head, odd
/// ones included.
#[tokio::test]
async fn the_script_reads_revisions_exactly_as_stored_revision_does() {
    let redis = RedisServer::start().await;
    let s = store(&redis).await;
    let mut conn = redis.client().await;
    let heads: [Option<&[u8]>; 10] = [
        None,
        Some(b""),
        Some(b"junk"),
        Some(b"0:x"),
        Some(b"012:x"),
        Some(b"12"),
        Some(b"12:x"),
        Some(b"123:x"),
        Some(b"1:"),
        Some(b"18446744073709551614:x"),
    ];
    let mut checked = 0;
    for (h, head) in heads.iter().enumerate() {
        for expected in [0u64, 1, 12, 123, u64::MAX - 1] {
            let c = CustomerRef::new("brandA", format!("h{h}-{expected}"));
            if let Some(v) = head {
                redis::cmd("SET")
                    .arg(s.keys().state(&c))
                    .arg(*v)
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap();
            }
            let model = head.map_or(0, lapse::store::record::stored_revision) == expected;
            let landed = s.save_many(&[(&c, expected, &state(1))]).await.unwrap();
            assert_eq!(
                landed,
                [model],
                "head {head:?}, expected revision {expected}"
            );
            checked += usize::from(model);
        }
    }
    // The table holds writes that land and writes that conflict.
    assert!(checked >= 5, "{checked}");
}
