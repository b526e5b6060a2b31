//! The durability contract (`redis.durability`, README "Guarantees"): Redis
//! losing writes it had acknowledged loses no event, because offsets are
//! committed only once the writes are durable.
//!
//! | Redis loses acknowledged writes | test |
//! |---|---|
//! | single node, AOF `everysec`, kill -9 losing the unsynced tail, down 1.5 s while one customer's events keep coming (`fsync_horizon`, the default): batches read before the restart are fenced off (`lapse_fenced_writes_total`), state equals an uninterrupted run | `single_node_crash_losing_the_unsynced_aof_tail_loses_no_event` |
//! | the same crash with `durability = "ack"`: committed events are lost (why the contract exists) | `with_ack_only_the_same_crash_loses_committed_events` |
//! | Cluster, kill -9 of a master mid-stream, its replica takes over (`replicas`): no event lost, `/readyz` 503 while a master has no replica | `cluster_master_failover_mid_stream_loses_no_event` |
//! | Redis keeps no AOF (`appendonly no`) under `fsync_horizon`, which relies on it: said at start-up (a warning, `lapse_redis_masters_without_aof` 1), and nothing said once Redis keeps one | `fsync_horizon_says_so_when_redis_keeps_no_aof` |
//! | Cluster, kill -9 of the master lapse was given as its only seed, while records stream in: lapse's Redis calls answer again within seconds (not time out for minutes), then it catches up, every state equal to an uninterrupted run's | `after_the_seed_master_dies_lapse_reaches_the_cluster_again` |
//!
//! A kill -9 of redis-server alone loses nothing Redis wrote to its AOF
//! (the kernel keeps the page cache); what `everysec` loses is what was not
//! yet fsynced when the machine (or the disk) fails, up to about 2 s of
//! writes. The single-node tests model that exactly: the AOF is cut back to
//! the size it had [`UNSYNCED`] before the kill, then Redis restarts from it.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::stack::*;
use common::*;
use lapse::codec::Framing;
use lapse::domain::event::{Channel, Event, Purpose};

/// The writes a crash loses with `appendfsync everysec`: those of the last
/// 2 s (Redis fsyncs every second and postpones a write by at most 2 s
/// while an fsync is slow).
const UNSYNCED: Duration = Duration::from_secs(2);

/// How long the crashed Redis stays down: lapse's batches meanwhile wait in
/// their retries and write the moment it answers again, before a poll of
/// the masters' identities could have seen the restart.
const DOWN: Duration = Duration::from_millis(1500);

/// At most this many chunks of events (one every 300 ms) while waiting for a
/// failover: beyond the test's own time-outs.
const MAX_CHUNKS: usize = 400;

/// The AOF file Redis 7 appends to (`appendonlydir/*.incr.aof`, the newest).
fn incr_aof(data_dir: &Path) -> PathBuf {
    let dir = data_dir.join("appendonlydir");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".incr.aof"))
        .collect();
    files.sort_by_key(|p| {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let n: u64 = name
            .split('.')
            .nth(2)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        n
    });
    files.pop().expect("an incremental AOF file")
}

/// Samples the AOF's size every 10 ms, so a crash can cut it back to what
/// was on disk some time before.
struct AofSizes {
    /// (an instant taken just before reading the size, the size read).
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
    file: PathBuf,
}

impl AofSizes {
    fn start(file: PathBuf) -> AofSizes {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st, f) = (samples.clone(), stop.clone(), file.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let t = Instant::now();
                if let Ok(m) = std::fs::metadata(&f) {
                    s.lock().unwrap().push((t, m.len()));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        AofSizes {
            samples,
            stop,
            file,
        }
    }

    /// At least the size the file had at `at`: the first sample taken after
    /// it (the file only grows), else the size now. Never less, so a stalled
    /// sampler cannot make the crash lose more than [`UNSYNCED`] of writes.
    fn size_at(&self, at: Instant) -> u64 {
        let s = self.samples.lock().unwrap();
        s.iter()
            .find(|(t, _)| *t >= at)
            .map(|(_, n)| *n)
            .unwrap_or_else(|| std::fs::metadata(&self.file).expect("the AOF").len())
    }
}

impl Drop for AofSizes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Every customer of `events` has the state an uninterrupted run over the
/// same inputs (group `reference_group`) leaves. Returns how many customers.
async fn assert_states_equal_an_uninterrupted_run(
    s: &Stack,
    reference_group: &str,
    events: &[(Event, Option<&'static str>)],
) -> usize {
    let reference = s.reference_run(reference_group).await;
    let store = s.store().await;
    let mut customers: Vec<_> = events.iter().map(|(e, _)| e.customer.clone()).collect();
    customers.sort_by_key(|c| c.key());
    customers.dedup();
    for c in &customers {
        assert_same_state(
            c,
            &state(&store, c).await,
            &state(&reference.store, c).await,
        );
    }
    customers.len()
}

/// kill -9 of Redis, its AOF cut back to its size [`UNSYNCED`] before (what
/// an OS crash leaves of an `everysec` AOF), restart after [`DOWN`]. Returns
/// the bytes lost.
async fn crash_losing_unsynced_tail(redis: &mut RedisServer, aof: &AofSizes) -> u64 {
    redis.kill();
    // Taken once Redis is dead: a test thread slow to send the signal must
    // not make the cut reach back further than UNSYNCED.
    let killed_at = Instant::now();
    let keep = aof.size_at(killed_at - UNSYNCED);
    let had = std::fs::metadata(&aof.file).unwrap().len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&aof.file)
        .unwrap();
    f.set_len(keep).unwrap();
    drop(f);
    tokio::time::sleep(DOWN).await;
    redis.start_again().await;
    had - keep
}

/// What one crash run saw.
struct Crash {
    s: Stack,
    lapse: LapseProcess,
    /// Customers produced, and their events.
    events: Vec<(Event, Option<&'static str>)>,
    customers: Vec<lapse::domain::event::CustomerRef>,
    /// From the first streamed event to the kill.
    stream_to_kill: Duration,
    lost_bytes: u64,
}

/// A single-node Redis with AOF `everysec`; lapse (`durability = mode`)
/// applies a population, then a stream; right after lapse committed part
/// of the stream, Redis crashes losing its unsynced AOF tail and restarts;
/// the stream goes on and lapse catches up.
async fn crash_run(mode: &str) -> Crash {
    let redis = RedisServer::start_with_options(&[
        "--appendfsync",
        "everysec",
        "--auto-aof-rewrite-percentage",
        "0",
    ])
    .await;
    let mut s = Stack::start_with_redis(Broker::start().await, redis).await;
    let group = "g-crash";
    let cfg = s.config_redis(
        "crash",
        "max_records = 50",
        &format!("durability = \"{mode}\""),
        "",
    );
    let bootstrap = s.broker.bootstrap();
    let p = Producer::new(&bootstrap);
    let before = population("ta", 40, 1);
    produce_events(&p, &before, |_| Framing::SingleObject).await;
    let lapse = s.spawn(group, &cfg);
    s.wait_caught_up(group, LONG).await;
    let committed_before: i64 = committed_offsets(&bootstrap, group, &INPUTS)
        .await
        .values()
        .sum();

    let aof = AofSizes::start(incr_aof(s.redis.data_dir()));
    let chunks: Vec<Vec<(Event, Option<&'static str>)>> = (0..8)
        .map(|j| population(&format!("tb{j}"), 6, 10 + j))
        .collect();
    let streamed: Vec<_> = chunks.iter().flatten().cloned().collect();
    let started = Instant::now();
    let producing = tokio::spawn(async move {
        let p = Producer::new(&bootstrap);
        for chunk in chunks {
            produce_events(&p, &chunk, |_| Framing::SingleObject).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    // One customer's sends all along, across the crash: a batch applied
    // before it (its write lost) and one applied after it hold events of the
    // same customer, so a write reaching the restarted Redis before lapse
    // re-read what was lost would move that customer's watermark past them.
    let steady_stop = Arc::new(AtomicBool::new(false));
    let steady = {
        let (bootstrap, stop) = (s.broker.bootstrap(), steady_stop.clone());
        tokio::spawn(async move {
            let p = Producer::new(&bootstrap);
            let c = cust("ts", "steady");
            let t0 = now_ms() - 30 * DAY;
            let mut sent = Vec::new();
            for k in 0.. {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let ev = (
                    send(
                        &c,
                        &format!("steady-{k}"),
                        t0 + k * 60_000,
                        Channel::ALL[0],
                        Purpose::Marketing,
                    ),
                    None,
                );
                produce_events(&p, std::slice::from_ref(&ev), |_| Framing::SingleObject).await;
                sent.push(ev);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };
    let bootstrap = s.broker.bootstrap();
    wait_until(
        LONG,
        Duration::from_millis(10),
        "lapse to commit part of the stream",
        async || {
            let done: i64 = committed_offsets(&bootstrap, group, &INPUTS)
                .await
                .values()
                .sum();
            done > committed_before
        },
    )
    .await;
    let stream_to_kill = started.elapsed();
    let lost_bytes = crash_losing_unsynced_tail(&mut s.redis, &aof).await;
    producing.await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    steady_stop.store(true, Ordering::SeqCst);
    let steady = steady.await.unwrap();
    s.wait_caught_up(group, LONG).await;

    let mut events = before;
    events.extend(streamed);
    events.extend(steady);
    let mut customers: Vec<_> = events.iter().map(|(e, _)| e.customer.clone()).collect();
    customers.sort_by_key(|c| c.key());
    customers.dedup();
    Crash {
        s,
        lapse,
        events,
        customers,
        stream_to_kill,
        lost_bytes,
    }
}

#[tokio::test]
async fn single_node_crash_losing_the_unsynced_aof_tail_loses_no_event() {
    let Crash {
        s,
        mut lapse,
        events,
        customers,
        lost_bytes,
        ..
    } = crash_run("fsync_horizon").await;
    assert!(lost_bytes > 0, "the crash must lose acknowledged writes");
    assert!(
        metric(&lapse, "lapse_offset_rewinds_total", &[]).await >= 1.0,
        "lapse saw Redis restart and re-read from its last durable offsets"
    );
    // Batches read before the rewind were waiting to write when Redis came
    // back: the write fence refused them (else they could move a steady
    // customer's watermark past its lost records).
    let fenced = metric(&lapse, "lapse_fenced_writes_total", &[]).await;
    assert!(fenced >= 1.0, "no write was fenced: {fenced}");
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());

    let reference = s.reference_run("g-ref").await;
    let store = s.store().await;
    for c in &customers {
        assert_same_state(
            c,
            &state(&store, c).await,
            &state(&reference.store, c).await,
        );
    }
    eprintln!(
        "fsync_horizon: {} events, {} customers, {lost_bytes} AOF bytes lost by the crash, {fenced} writes fenced, 0 events lost",
        events.len(),
        customers.len()
    );
}

#[tokio::test]
async fn with_ack_only_the_same_crash_loses_committed_events() {
    let Crash {
        s,
        mut lapse,
        customers,
        stream_to_kill,
        lost_bytes,
        ..
    } = crash_run("ack").await;
    // Every streamed write lapse had committed came after the stream began:
    // within the lost tail when the kill followed within UNSYNCED.
    assert!(
        stream_to_kill < UNSYNCED,
        "precondition: lapse committed part of the stream and Redis was killed within {UNSYNCED:?} of its first event (took {stream_to_kill:?})"
    );
    assert!(lost_bytes > 0);
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());

    let reference = s.reference_run("g-ref").await;
    let store = s.store().await;
    let mut lost = 0;
    for c in &customers {
        let a = store.load(c).await.unwrap().map(|l| l.state);
        let b = state(&reference.store, c).await;
        if a.is_none_or(|a| a.visits != b.visits || a.applied.watermarks != b.applied.watermarks) {
            lost += 1;
        }
    }
    eprintln!("ack: {lost} of {} customers lost events", customers.len());
    assert!(
        lost > 0,
        "with durability = \"ack\" lapse committed offsets of writes the crash lost"
    );
}

#[tokio::test]
async fn cluster_master_failover_mid_stream_loses_no_event() {
    let mut s = Stack::start_cluster().await;
    let group = "g-failover";
    let cfg = s.config_redis(
        "failover",
        "max_records = 50",
        "durability = \"replicas\"\nreplicas = 1\nwait_timeout = \"500ms\"",
        "",
    );
    let bootstrap = s.broker.bootstrap();
    let p = Producer::new(&bootstrap);
    let mut events = population("ta", 30, 1);
    produce_events(&p, &events, |_| Framing::SingleObject).await;
    let mut lapse = s.spawn(group, &cfg);
    s.wait_caught_up(group, LONG).await;
    let committed_before: i64 = committed_offsets(&bootstrap, group, &INPUTS)
        .await
        .values()
        .sum();

    // Chunks keep coming until the failover has been seen (bounded), so
    // writes reach the promoted master however long the failover takes
    // on a loaded machine: a fixed number of chunks could all be applied
    // before it, leaving no write to find the replica missing.
    let failover_seen = Arc::new(AtomicBool::new(false));
    let producing = {
        let bootstrap = bootstrap.clone();
        let failover_seen = failover_seen.clone();
        tokio::spawn(async move {
            let p = Producer::new(&bootstrap);
            let mut produced = Vec::new();
            for j in 0..MAX_CHUNKS {
                let chunk = population(&format!("tb{j}"), 6, 10 + j as i64);
                produce_events(&p, &chunk, |_| Framing::SingleObject).await;
                produced.extend(chunk);
                if j >= 10 && failover_seen.load(Ordering::SeqCst) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            produced
        })
    };
    wait_until(
        LONG,
        Duration::from_millis(20),
        "lapse to commit part of the stream",
        async || {
            let done: i64 = committed_offsets(&bootstrap, group, &INPUTS)
                .await
                .values()
                .sum();
            done > committed_before
        },
    )
    .await;
    let cluster = s.cluster.as_mut().unwrap();
    let victim = cluster.master_indices().await[0];
    cluster.kill_node(victim);
    // Its replica takes over, alone: WAIT 1 cannot be met, nothing is committed.
    let body = wait_for(
        LONG,
        Duration::from_millis(100),
        "/readyz to say replicas are missing",
        async || {
            let (code, body) = lapse.http_get("/readyz").await.ok()?;
            (code == 503 && body.contains("redis.replicas")).then_some(body)
        },
    )
    .await;
    failover_seen.store(true, Ordering::SeqCst);
    assert!(body.contains("durability: only 0 of"), "{body}");
    let cluster = s.cluster.as_mut().unwrap();
    cluster.restart_node(victim).await;
    cluster.wait_healthy(LONG).await;
    events.extend(producing.await.unwrap());
    s.wait_caught_up(group, LONG).await;
    lapse.wait_ready(LONG).await;
    let shortfalls = metric(
        &lapse,
        "lapse_durability_shortfalls_total",
        &[("kind", "replicas")],
    )
    .await;
    assert!(shortfalls >= 1.0, "WAIT shortfalls are counted");
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());

    let customers = assert_states_equal_an_uninterrupted_run(&s, "g-ref", &events).await;
    eprintln!(
        "failover: {} events, {customers} customers, 1 master killed, {shortfalls} WAIT shortfalls, 0 events lost",
        events.len(),
    );
}

/// The master lapse knows the cluster by (its only seed) is killed while
/// records stream in. redis-rs 0.32 could then stay stuck for minutes with
/// every call timing out (its slot recovery never ended, and it would fall
/// back only to the dead seed); lapse replaces such a connection from every
/// node it has seen (`store/cluster.rs`). Before that, this test saw `/readyz`
/// say "timed out" for the whole minute after the kill, 3 runs of 3.
#[tokio::test]
async fn after_the_seed_master_dies_lapse_reaches_the_cluster_again() {
    let mut s = Stack::start_cluster().await;
    let group = "g-seed";
    let cfg = s.config_redis(
        "seed",
        "max_records = 50",
        "durability = \"replicas\"\nreplicas = 1\nwait_timeout = \"500ms\"",
        "",
    );
    let bootstrap = s.broker.bootstrap();
    let p = Producer::new(&bootstrap);
    let mut lapse = s.spawn(group, &cfg);
    let seed = s.redis_url();
    let cluster = s.cluster.as_mut().unwrap();
    let victim = cluster
        .urls()
        .iter()
        .position(|u| *u == seed)
        .expect("the seed is a node");
    assert!(
        cluster.master_indices().await.contains(&victim),
        "the seed starts as a master"
    );

    let mut events = Vec::new();
    let chunk = |j: usize| population(&format!("sd{j}"), 6, 10 + j as i64);
    // Records flow for a few seconds, then the seed dies mid-stream.
    for j in 0..15 {
        let c = chunk(j);
        produce_events(&p, &c, |_| Framing::SingleObject).await;
        events.extend(c);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let cluster = s.cluster.as_mut().unwrap();
    cluster.kill_node(victim);
    let killed = Instant::now();
    // Redis answers again once lapse's calls succeed: WAIT then reports the
    // promoted replica alone, instead of every call timing out.
    let mut j = 15;
    let body = loop {
        let c = chunk(j);
        produce_events(&p, &c, |_| Framing::SingleObject).await;
        events.extend(c);
        j += 1;
        let (_, body) = lapse.http_get("/readyz").await.unwrap_or_default();
        if body.contains("durability: only 0 of") {
            break body;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(45),
            "45 s after the seed master died lapse still cannot use the cluster: {body}\n{}",
            lapse.stderr()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    eprintln!(
        "lapse used the cluster again {:.1} s after the kill: {body}",
        killed.elapsed().as_secs_f64()
    );
    let cluster = s.cluster.as_mut().unwrap();
    cluster.restart_node(victim).await;
    cluster.wait_healthy(LONG).await;
    s.wait_caught_up(group, LONG).await;
    lapse.wait_ready(LONG).await;
    let reconnects = metric(&lapse, "lapse_redis_cluster_reconnects_total", &[]).await;
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());

    // Nothing was lost across the replaced connection: every state equals
    // an uninterrupted run's.
    let customers = assert_states_equal_an_uninterrupted_run(&s, "g-seed-ref", &events).await;
    eprintln!(
        "seed failover: {} events, {customers} customers, 0 lost; cluster connection replaced {reconnects} times",
        events.len(),
    );
}

/// `fsync_horizon` waits for Redis to fsync its AOF; with `appendonly no`
/// there is no AOF and a Redis crash loses acknowledged writes for good, so
/// lapse says so at start-up. Once Redis keeps an AOF it says nothing.
#[tokio::test]
async fn fsync_horizon_says_so_when_redis_keeps_no_aof() {
    let redis = RedisServer::start_with_options(&["--appendonly", "no"]).await;
    let s = Stack::start_with_redis(Broker::start().await, redis).await;
    let cfg = s.config_redis("no-aof", "", "durability = \"fsync_horizon\"", "");
    const SAID: &str = "a master has appendonly no";

    let mut lapse = s.spawn("g-no-aof", &cfg);
    lapse.wait_ready(LONG).await;
    assert_eq!(
        metric(&lapse, "lapse_redis_masters_without_aof", &[]).await,
        1.0
    );
    assert!(lapse.stderr().contains(SAID), "{}", lapse.stderr());
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());

    let mut c = s.redis.client().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendonly")
        .arg("yes")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut lapse = s.spawn("g-aof", &cfg);
    lapse.wait_ready(LONG).await;
    assert_eq!(
        metric(&lapse, "lapse_redis_masters_without_aof", &[]).await,
        0.0
    );
    assert!(!lapse.stderr().contains(SAID), "{}", lapse.stderr());
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}
