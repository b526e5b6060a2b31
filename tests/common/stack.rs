//! The stack most integration tests need: Redis + broker + topics + a schema
//! registry stub, the environment and config a `lapse run` needs to use them,
//! event builders, and helpers to read state and metrics.

use std::collections::BTreeMap;
use std::time::Duration;

use lapse::codec::{Encoder, Framing, SchemaSet};
use lapse::config::RedisConfig;
use lapse::domain::event::*;
use lapse::domain::state::CustomerState;
use lapse::metrics::Metrics;
use lapse::store::StateStore;

use super::*;
use apache_avro::types::Value as AvroValue;

pub const DAY: i64 = 86_400_000;

/// Noon in Shanghai, `days` after the tests' epoch (about two years ago): no
/// channel is in quiet hours, no event is in the future, and timers fire by day.
pub fn day(days: i64) -> i64 {
    use chrono::TimeZone;
    let base = chrono::Utc::now().timestamp_millis() - 800 * DAY;
    let d = chrono_tz::Asia::Shanghai
        .timestamp_millis_opt(base)
        .unwrap()
        .date_naive();
    chrono_tz::Asia::Shanghai
        .from_local_datetime(&d.and_hms_opt(12, 0, 0).unwrap())
        .unwrap()
        .timestamp_millis()
        + days * DAY
}
pub const INPUTS: [&str; 6] = [
    "engagement.sends",
    "engagement.opens",
    "engagement.clicks",
    "engagement.replies",
    "clinic.visits",
    "clinic.feedback",
];
pub const PARTITIONS: i32 = 3;
pub const LONG: Duration = Duration::from_secs(90);

pub fn schemas_dir() -> String {
    format!("{}/schemas", repo_root().display())
}

/// The schema file as written (with docs and logical types), as a producer would register it.
pub fn schema_file(kind: EventKind) -> String {
    let name = kind.label(); // the file stem of every input schema
    std::fs::read_to_string(format!("{}/{name}.avsc", schemas_dir())).expect("schema file")
}

pub fn encoder() -> Encoder {
    Encoder::new(&SchemaSet::load(std::path::Path::new(&schemas_dir())).expect("schemas load"))
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Redis + broker + topics, and the environment a `lapse run` needs to use them.
pub struct Stack {
    pub redis: RedisServer,
    /// Set by [`Stack::start_cluster`]: lapse and the helpers use this Redis
    /// Cluster instead of `redis` (which then stays empty).
    pub cluster: Option<RedisCluster>,
    pub broker: Broker,
    pub registry: SchemaRegistryStub,
    pub dir: tempfile::TempDir,
}

impl Stack {
    /// Redis single node, or the Redis Cluster when `LAPSE_TEST_REDIS=cluster`
    /// (`scripts/cluster-suite` runs the end-to-end suites that way).
    pub async fn start() -> Stack {
        if std::env::var("LAPSE_TEST_REDIS").is_ok_and(|v| v == "cluster") {
            return Self::start_cluster().await;
        }
        Self::start_single().await
    }

    /// Always a single Redis node: for tests that stop, restart or configure
    /// that server itself.
    pub async fn start_single() -> Stack {
        Self::start_with(Broker::start().await).await
    }

    pub async fn start_with(broker: Broker) -> Stack {
        Self::start_with_redis(broker, RedisServer::start().await).await
    }

    /// Like [`Stack::start_with`], on a Redis started by the caller (e.g.
    /// [`RedisServer::start_with`] other persistence options).
    pub async fn start_with_redis(broker: Broker, redis: RedisServer) -> Stack {
        for t in INPUTS {
            broker.create_topic(t, PARTITIONS).await;
        }
        broker.create_topic("lapse.dlq", 1).await;
        Stack {
            redis,
            cluster: None,
            broker,
            registry: SchemaRegistryStub::start(),
            dir: scratch_dir("stack"),
        }
    }

    /// Like [`Stack::start`], with lapse on a real Redis Cluster (3 masters, 3 replicas).
    pub async fn start_cluster() -> Stack {
        let mut s = Self::start_single().await;
        s.cluster = Some(RedisCluster::start().await);
        s
    }

    /// The Redis URL lapse and the helpers connect to (a seed node on a Cluster).
    pub fn redis_url(&self) -> String {
        match &self.cluster {
            Some(c) => c.urls()[0].clone(),
            None => self.redis.url(),
        }
    }

    /// A connection per node holding data: the masters of a Cluster, or the one server.
    pub async fn nodes(&self) -> Vec<redis::aio::MultiplexedConnection> {
        match &self.cluster {
            Some(c) => c.masters().await,
            None => vec![self.redis.client().await],
        }
    }

    /// Writes a config file tuned for tests (short session, small batches) and
    /// returns its path; `batch` lines go under `[batch]`.
    pub fn config(&self, name: &str, batch: &str) -> String {
        self.config_with(name, batch, "")
    }

    /// Like [`Stack::config`], with whole extra TOML sections appended (e.g. `[policy.throttle]`).
    pub fn config_with(&self, name: &str, batch: &str, sections: &str) -> String {
        let path = self.dir.path().join(format!("{name}.toml"));
        let cluster = if self.cluster.is_some() {
            "cluster = true\n"
        } else {
            ""
        };
        let text = format!(
            "[kafka]\nsession_timeout = \"3s\"\ncommit_interval = \"200ms\"\ntopic_partitions = {PARTITIONS}\nrebalance_drain_timeout = \"10s\"\n\
             [batch]\nmax_wait = \"20ms\"\n{batch}\n\
             [metrics]\nfleet_gauge_refresh = \"1s\"\n\
             [retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"500ms\"\n[redis]\n{HARNESS_DURABILITY}{cluster}{sections}\n",
        );
        std::fs::write(&path, text).expect("write config");
        path.display().to_string()
    }

    /// A config (as [`Stack::config`]) for a single-node Redis even on a
    /// Cluster stack: for reference runs on `s.redis` or a fresh server.
    pub fn single_node_config(&self, name: &str) -> String {
        self.single_node_config_with(name, "")
    }

    /// [`Stack::single_node_config`] with whole extra TOML sections.
    pub fn single_node_config_with(&self, name: &str, sections: &str) -> String {
        let path = self.config_with(name, "", sections);
        let text = std::fs::read_to_string(&path).unwrap();
        let single = text.replace("cluster = true\n", "");
        assert!(
            self.cluster.is_none() || text != single,
            "a cluster stack's config names the cluster"
        );
        std::fs::write(&path, single).unwrap();
        path
    }

    /// The uninterrupted reference run over the same input: one lapse
    /// (group `group`) on a fresh single-node Redis until it has committed
    /// every input offset, then stopped. Its decisions go to topics of its
    /// own ([`REF_OUTPUTS`]), so the run under test's outputs stay its own.
    pub async fn reference_run(&self, group: &str) -> Reference {
        let redis = RedisServer::start().await;
        let cfg = self.single_node_config_with(group, REF_OUTPUTS);
        let mut env = self.env(group);
        env.retain(|(k, _)| k != "LAPSE_REDIS_URL");
        env.push(("LAPSE_REDIS_URL".into(), redis.url()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut lapse = LapseProcess::spawn(&["run", "--config", &cfg], &env);
        self.wait_caught_up(group, LONG).await;
        // Its timer loop has fired what is due (releases, stages) too.
        wait_no_timer_due_on(vec![redis.client().await], LONG).await;
        // A claimed timer is no longer due while it fires: let that finish.
        tokio::time::sleep(Duration::from_secs(1)).await;
        lapse.sigterm();
        assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
        let store = StateStore::connect(
            &RedisConfig {
                url: redis.url(),
                ..RedisConfig::default()
            },
            Metrics::new(&Default::default()),
        )
        .await
        .expect("connect to the reference redis");
        Reference { redis, store }
    }

    /// Like [`Stack::config_with`], with `keys` (TOML lines) under `[redis]`
    /// (next to `cluster = true` on a Cluster stack).
    pub fn config_redis(&self, name: &str, batch: &str, keys: &str, sections: &str) -> String {
        let path = self.config_with(name, batch, sections);
        let text = std::fs::read_to_string(&path).unwrap();
        let text = match keys.contains("durability") {
            true => text.replace(HARNESS_DURABILITY, ""),
            false => text,
        };
        let text = match text.find("[redis]\n") {
            Some(i) => format!("{}[redis]\n{keys}\n{}", &text[..i], &text[i + 8..]),
            None => format!("{text}[redis]\n{keys}\n"),
        };
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn env(&self, group: &str) -> Vec<(String, String)> {
        vec![
            ("LAPSE_KAFKA_BROKERS".into(), self.broker.bootstrap()),
            ("LAPSE_REDIS_URL".into(), self.redis_url()),
            ("LAPSE_GROUP_ID".into(), group.into()),
            ("LAPSE_SCHEMAS_DIR".into(), schemas_dir()),
            ("LAPSE_SCHEMA_REGISTRY_URL".into(), self.registry.url()),
            ("RUST_LOG".into(), "info,lapse=debug,rdkafka=warn".into()),
        ]
    }

    pub fn spawn(&self, group: &str, config: &str) -> LapseProcess {
        let env = self.env(group);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        LapseProcess::spawn(&["run", "--config", config], &env)
    }

    pub async fn store(&self) -> StateStore {
        let cfg = RedisConfig {
            url: self.redis_url(),
            cluster: self.cluster.is_some(),
            ..RedisConfig::default()
        };
        StateStore::connect(&cfg, Metrics::new(&Default::default()))
            .await
            .expect("connect to redis")
    }

    /// Waits until `group` has committed every input partition up to its end,
    /// seen at two polls in a row with the same ends: one read of the ends
    /// that lags the broker (or a partition read as empty) cannot pass alone.
    pub async fn wait_caught_up(&self, group: &str, timeout: Duration) {
        let bootstrap = self.broker.bootstrap();
        let mut caught_up_at: Option<BTreeMap<(String, i32), i64>> = None;
        wait_until(
            timeout,
            Duration::from_millis(200),
            &format!("group {group} to commit every input offset"),
            async || {
                let end = end_offsets(&bootstrap, &INPUTS).await;
                let committed = committed_offsets(&bootstrap, group, &INPUTS).await;
                let now = end
                    .iter()
                    .all(|(tp, e)| *e == 0 || committed.get(tp) == Some(e));
                let before = caught_up_at.take();
                if !now {
                    return false;
                }
                let twice = before.as_ref() == Some(&end);
                caught_up_at = Some(end);
                twice
            },
        )
        .await;
    }

    /// Event-time mode: moves event time to `at` (a SERVICE send of a dedicated
    /// clock customer), waits until `group` applied it and every timer due by
    /// then has fired.
    pub async fn advance_event_time(&self, p: &Producer, group: &str, at: i64) {
        let clock = CustomerRef::new("clinicA", "zz-clock");
        let tick = send(
            &clock,
            &format!("tick-{at}"),
            at,
            Channel::Email,
            Purpose::Service,
        );
        produce_events(p, &[(tick, None)], |_| Framing::SingleObject).await;
        self.wait_applied_and_fired(group, at).await;
    }

    /// Waits until `group` applied everything produced and every timer due by
    /// `at` has fired: none is due, and none is still claimed by a timer loop
    /// whose clock read `at` (a claim moves the timer to the clock plus
    /// `timers.lease`, and it is completed only once its decisions are
    /// published; an event produced before that could overtake the firing).
    pub async fn wait_applied_and_fired(&self, group: &str, at: i64) {
        self.wait_caught_up(group, LONG).await;
        let mut nodes = self.nodes().await;
        wait_until(
            LONG,
            Duration::from_millis(20),
            "timers due by the tick to fire",
            async || {
                timers_due_by(&mut nodes, at).await == Some(0)
                    && timers_scored(&mut nodes, at + TIMER_LEASE_MS).await == Some(0)
            },
        )
        .await;
    }

    /// Waits until no scheduled timer is due (the running instances' timer loops
    /// have fired everything overdue), so a later byte comparison does not race them.
    pub async fn wait_no_timer_due(&self, within: Duration) {
        wait_no_timer_due_on(self.nodes().await, within).await;
    }

    /// Every key and raw value in Redis, for byte-level comparisons.
    /// Replays every input from offset 0 with a new group (`g-replay`, on
    /// `config`): each of the `records` must be skipped (recognised as applied,
    /// or as an upstream copy) and no byte of Redis may change.
    pub async fn replay_changes_nothing(&self, config: &str, records: usize) {
        let before = self.dump().await;
        let mut replay = self.spawn("g-replay", config);
        self.wait_caught_up("g-replay", LONG).await;
        // Applied records by their watermark; upstream copies (skipped the
        // first time, so above the watermark) again by their event id.
        let skipped = metric(&replay, "lapse_duplicates_skipped_total", &[]).await;
        assert_eq!(
            skipped as usize, records,
            "every replayed record is recognised as applied or as a copy"
        );
        let after = self.dump().await;
        let changed: Vec<&String> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        assert!(
            changed.is_empty(),
            "a replay from offset 0 must not change a single byte; it changed {changed:?}"
        );
        replay.sigterm();
        assert!(replay.wait_exit(Duration::from_secs(30)).await.success());
    }

    /// Every timer (member → score) of every shard, on every node.
    pub async fn timers(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for mut c in self.nodes().await {
            for k in timer_keys(&mut c).await.expect("KEYS") {
                let m: Vec<(String, f64)> = redis::cmd("ZRANGE")
                    .arg(&k)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(&mut c)
                    .await
                    .expect("ZRANGE");
                out.extend(m.into_iter().map(|(m, s)| (m, s as i64)));
            }
        }
        out
    }

    /// Deletes every timer (as if the states predated them, or Redis lost the
    /// timer keys), then checks `lapse sweep-timers` on `config`: a dry run
    /// counts them and schedules nothing; the sweep puts back exactly the
    /// timers the running pipeline had scheduled; a second sweep finds none
    /// missing. Run with no lapse instance running.
    pub async fn sweep_restores_deleted_timers(&self, config: &str, customers: usize) {
        let scheduled = self.timers().await;
        assert!(
            !scheduled.is_empty(),
            "the population must have timers to lose"
        );
        for mut c in self.nodes().await {
            for k in timer_keys(&mut c).await.expect("KEYS") {
                let _: i64 = redis::cmd("DEL")
                    .arg(&k)
                    .query_async(&mut c)
                    .await
                    .expect("DEL");
            }
        }
        let sweep = async |extra: &[&str]| -> serde_json::Value {
            let env = self.env("g-sweep");
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let args = [&["sweep-timers", "--config", config][..], extra].concat();
            let out = run_lapse(&args, &env, LONG).await;
            assert!(
                out.status.success(),
                "lapse sweep-timers: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice(&out.stdout).expect("sweep-timers prints JSON")
        };
        let dry = sweep(&["--dry-run"]).await;
        assert_eq!(dry["customers"], customers, "{dry}");
        assert_eq!(dry["without_timer"], scheduled.len(), "{dry}");
        assert!(
            self.timers().await.is_empty(),
            "a dry run schedules nothing"
        );
        let done = sweep(&[]).await;
        assert_eq!(done["without_timer"], scheduled.len(), "{done}");
        assert_eq!(
            self.timers().await,
            scheduled,
            "the sweep restores every timer as scheduled"
        );
        let again = sweep(&[]).await;
        assert_eq!(again["without_timer"], 0, "{again}");
    }

    /// Issue 17's faithfulness check: replays the input topics through the
    /// backtest (the library `lapse backtest` runs) with `config`'s policy and
    /// checks it publishes exactly the decisions (ids) the live pipeline
    /// published on the output topics. Returns how many of each it compared.
    pub async fn backtest_matches_live(&self, config: &str) -> (usize, usize, usize) {
        use lapse::backtest::{source, Candidate};
        let mut cfg =
            lapse::config::Config::load(Some(std::path::Path::new(config))).expect("config");
        let env: BTreeMap<String, String> = self.env("g-backtest").into_iter().collect();
        cfg.apply_env(|k| env.get(k).cloned());
        let decoder = lapse::service::build_decoder(&cfg).expect("decoder");
        let history =
            source::from_kafka(&cfg.kafka, &decoder, &source::Filter::default(), now_ms())
                .await
                .expect("read the input topics");
        assert!(
            history.bad.is_empty(),
            "unusable records: {:?}",
            history.bad
        );
        let candidate = Candidate {
            name: "live".into(),
            policies: lapse::domain::policy::Policies::new(&cfg.policy).expect("policy"),
            params: lapse::service::state_params(&cfg),
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (report, _) = lapse::backtest::run(&history, &candidate, true, &stop, &mut |_, _| {});
        let replayed = report.ids.expect("ids kept");
        let schemas = SchemaSet::load(std::path::Path::new(&schemas_dir())).expect("schemas");
        let live_ids = async |topic: &str, schema: &str, field: &str| {
            let schema = schemas.by_name(schema).expect("output schema");
            let records = consume_to_end(&self.broker.bootstrap(), topic, LONG).await;
            records
                .iter()
                .map(|r| {
                    let payload = r.payload.as_deref().expect("a value");
                    let body = lapse::codec::parse_frame(payload).expect("framed").body();
                    let v = apache_avro::from_avro_datum(schema, &mut &body[..], None)
                        .expect("decodes");
                    let apache_avro::types::Value::Record(fields) = v else {
                        panic!("{topic}: not a record")
                    };
                    match fields.into_iter().find(|(k, _)| k == field) {
                        Some((_, apache_avro::types::Value::String(id))) => id,
                        other => panic!("{topic}: {field} is {other:?}"),
                    }
                })
                .collect::<std::collections::BTreeSet<String>>()
        };
        let throttle = live_ids(
            "engagement.throttle",
            lapse::codec::THROTTLE_EVENT,
            "decision_id",
        )
        .await;
        let triggers = live_ids(
            "recall.triggers",
            lapse::codec::RECALL_TRIGGER,
            "trigger_id",
        )
        .await;
        let outcomes = live_ids(
            "recall.outcomes",
            lapse::codec::RECALL_OUTCOME,
            "outcome_id",
        )
        .await;
        assert_eq!(
            replayed.triggers, triggers,
            "recall triggers: backtest vs live"
        );
        assert_eq!(
            replayed.outcomes, outcomes,
            "recall outcomes: backtest vs live"
        );
        assert_eq!(
            replayed.throttle, throttle,
            "throttle decisions: backtest vs live"
        );
        (throttle.len(), triggers.len(), outcomes.len())
    }

    pub async fn dump(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for mut c in self.nodes().await {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("*")
                .query_async(&mut c)
                .await
                .expect("KEYS");
            Self::dump_keys(&mut c, keys, &mut out).await;
        }
        out
    }

    async fn dump_keys(
        c: &mut redis::aio::MultiplexedConnection,
        keys: Vec<String>,
        out: &mut BTreeMap<String, Vec<u8>>,
    ) {
        for k in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&k)
                .query_async(c)
                .await
                .expect("TYPE");
            let v: Vec<u8> = match kind.as_str() {
                "string" => redis::cmd("GET").arg(&k).query_async(c).await.expect("GET"),
                "set" => {
                    let mut m: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
                        .arg(&k)
                        .query_async(c)
                        .await
                        .expect("SMEMBERS");
                    m.sort();
                    m.join(&b"\n"[..])
                }
                "zset" => {
                    let m: Vec<(Vec<u8>, f64)> = redis::cmd("ZRANGE")
                        .arg(&k)
                        .arg(0)
                        .arg(-1)
                        .arg("WITHSCORES")
                        .query_async(c)
                        .await
                        .expect("ZRANGE");
                    format!("{m:?}").into_bytes()
                }
                _ => redis::cmd("DUMP")
                    .arg(&k)
                    .query_async(c)
                    .await
                    .expect("DUMP"),
            };
            out.insert(k, v);
        }
    }
}

/// [`Stack::wait_no_timer_due`] on the given nodes (e.g. a reference run's Redis).
pub async fn wait_no_timer_due_on(
    mut nodes: Vec<redis::aio::MultiplexedConnection>,
    within: Duration,
) {
    wait_until(
        within,
        Duration::from_millis(100),
        "no timer due",
        async || timers_due_by(&mut nodes, now_ms()).await == Some(0),
    )
    .await;
}

/// The timer shards' keys on one node.
async fn timer_keys(c: &mut redis::aio::MultiplexedConnection) -> redis::RedisResult<Vec<String>> {
    redis::cmd("KEYS")
        .arg("lapse:{timers:*}:due")
        .query_async(c)
        .await
}

/// Timers due by `at` over every shard of every node (`None` if a node failed
/// to answer: not known to be zero).
/// `timers.lease` as the harness leaves it (the default).
const TIMER_LEASE_MS: i64 = 30_000;

async fn timers_due_by(nodes: &mut [redis::aio::MultiplexedConnection], at: i64) -> Option<u64> {
    timers_between(nodes, "-inf", at).await
}

/// Timers whose score is exactly `score` (a claim's lease).
async fn timers_scored(nodes: &mut [redis::aio::MultiplexedConnection], score: i64) -> Option<u64> {
    timers_between(nodes, &score.to_string(), score).await
}

async fn timers_between(
    nodes: &mut [redis::aio::MultiplexedConnection],
    from: &str,
    to: i64,
) -> Option<u64> {
    let mut n = 0u64;
    for c in nodes.iter_mut() {
        for k in timer_keys(c).await.ok()? {
            let count: u64 = redis::cmd("ZCOUNT")
                .arg(&k)
                .arg(from)
                .arg(to)
                .query_async(c)
                .await
                .ok()?;
            n += count;
        }
    }
    Some(n)
}

/// The harness's Redis fsyncs every write (`appendfsync always`), where
/// `ack` is durable (README "Guarantees"); the default `fsync_horizon` would
/// only delay every commit by 2.5 s. Tests of the other modes set their own
/// ([`Stack::config_redis`]).
pub const HARNESS_DURABILITY: &str = "durability = \"ack\"\n";

/// The output topics of a [`Stack::reference_run`].
pub const REF_OUTPUTS: &str = "[kafka.topics]\nthrottle = \"ref.throttle\"\ntriggers = \"ref.triggers\"\noutcomes = \"ref.outcomes\"\ndlq = \"ref.dlq\"\n";

/// The state of an uninterrupted run ([`Stack::reference_run`]).
pub struct Reference {
    pub redis: RedisServer,
    pub store: StateStore,
}

/// A deterministic population: `n` customers, a few events each of every kind.
pub fn population(tenant: &str, n: usize, seed: i64) -> Vec<(Event, Option<&'static str>)> {
    let t0 = now_ms() - 300 * DAY;
    let mut out = Vec::new();
    for i in 0..n {
        let c = cust(tenant, &format!("c{i:04}"));
        let ch = Channel::ALL[i % 5];
        for v in 0..(1 + i % 3) {
            out.push((
                visit(
                    &c,
                    &format!("{seed}-{i}-v{v}"),
                    t0 + (v as i64) * 90 * DAY + i as i64,
                    10_000 * (v as i64 + 1),
                    Some("FILLER"),
                ),
                None,
            ));
        }
        for k in 0..(2 + i % 4) {
            let at = t0 + 200 * DAY + (k as i64) * DAY + i as i64;
            out.push((
                send(&c, &format!("{seed}-{i}-s{k}"), at, ch, Purpose::Marketing),
                None,
            ));
            if k % 2 == 0 {
                out.push((open(&c, &format!("{seed}-{i}-o{k}"), at + 1000, ch), None));
            }
            if k % 3 == 0 {
                out.push((click(&c, &format!("{seed}-{i}-c{k}"), at + 2000, ch), None));
            }
        }
        if i % 7 == 0 {
            out.push((
                reply(&c, &format!("{seed}-{i}-r"), t0 + 250 * DAY, ch),
                Some("TD"),
            ));
        }
    }
    out
}

/// Compares two states: integers, times and sets exactly; decayed counts up to float rounding.
pub fn assert_same_state(c: &CustomerRef, a: &CustomerState, b: &CustomerState) {
    assert_eq!(a.visits, b.visits, "{c}: visits");
    assert_eq!(
        a.applied.watermarks, b.applied.watermarks,
        "{c}: watermarks"
    );
    assert_eq!(a.applied.seen, b.applied.seen, "{c}: remembered event ids");
    assert_eq!(
        a.applied.legacy_ids, b.applied.legacy_ids,
        "{c}: event ids remembered by earlier versions"
    );
    for ch in Channel::ALL {
        match (a.channel(ch), b.channel(ch)) {
            (None, None) => {}
            (Some(x), Some(y)) => {
                assert_eq!(
                    (x.at, x.last_send, x.last_open, x.last_click, x.last_reply),
                    (y.at, y.last_send, y.last_open, y.last_click, y.last_reply),
                    "{c} {ch}"
                );
                assert_eq!(
                    (x.unsubscribed_at, x.resubscribed_at),
                    (y.unsubscribed_at, y.resubscribed_at),
                    "{c} {ch}"
                );
                for (p, q) in [
                    (x.short.sends, y.short.sends),
                    (x.short.opens, y.short.opens),
                    (x.short.clicks, y.short.clicks),
                    (x.long.sends, y.long.sends),
                    (x.long.opens, y.long.opens),
                    (x.long.clicks, y.long.clicks),
                    (x.long.replies, y.long.replies),
                ] {
                    assert!(
                        (p - q).abs() <= 1e-4 * p.abs().max(1.0),
                        "{c} {ch}: {p} vs {q}"
                    );
                }
            }
            _ => panic!("{c} {ch}: present in one run only"),
        }
    }
}

/// Produces events (single-object framing unless `confluent` maps the kind to a schema id).
pub async fn produce_events(
    p: &Producer,
    events: &[(Event, Option<&str>)],
    framing: impl Fn(EventKind) -> Framing,
) {
    let enc = encoder();
    for (ev, text) in events {
        let bytes = enc
            .encode_event(ev, *text, framing(ev.kind()))
            .expect("encode");
        p.send(INPUTS[ev.kind().index()], ev.customer.key(), bytes, &[])
            .await
            .expect("produce");
    }
}

pub fn cust(t: &str, c: &str) -> CustomerRef {
    CustomerRef::new(t, c)
}

pub fn send(c: &CustomerRef, id: &str, at: i64, ch: Channel, purpose: Purpose) -> Event {
    Event {
        event_id: id.into(),
        customer: c.clone(),
        occurred_at: at,
        body: EventBody::Send {
            channel: ch,
            message_id: format!("m-{id}"),
            campaign_id: Some("spring".into()),
            purpose,
            cost: Some(5),
        },
    }
}

pub fn open(c: &CustomerRef, id: &str, at: i64, ch: Channel) -> Event {
    Event {
        event_id: id.into(),
        customer: c.clone(),
        occurred_at: at,
        body: EventBody::Open {
            channel: ch,
            message_id: "m".into(),
            campaign_id: None,
        },
    }
}

pub fn click(c: &CustomerRef, id: &str, at: i64, ch: Channel) -> Event {
    Event {
        event_id: id.into(),
        customer: c.clone(),
        occurred_at: at,
        body: EventBody::Click {
            channel: ch,
            message_id: "m".into(),
            campaign_id: Some("spring".into()),
        },
    }
}

pub fn reply(c: &CustomerRef, id: &str, at: i64, ch: Channel) -> Event {
    Event {
        event_id: id.into(),
        customer: c.clone(),
        occurred_at: at,
        body: EventBody::Reply {
            channel: ch,
            message_id: None,
            class: ReplyClass::Neutral,
        },
    }
}

pub fn visit(c: &CustomerRef, id: &str, at: i64, amount: i64, treatment: Option<&str>) -> Event {
    Event {
        event_id: id.into(),
        customer: c.clone(),
        occurred_at: at,
        body: EventBody::Visit {
            visit_type: VisitType::Treatment,
            treatment: treatment.map(str::to_string),
            amount,
            currency: "CNY".into(),
            offer_code: None,
            discount: None,
        },
    }
}

/// `e` (a visit) redeeming the offer `code`, with `discount` if given.
pub fn redeeming(mut e: Event, code: &str, discount: Option<i64>) -> Event {
    if let EventBody::Visit {
        offer_code,
        discount: d,
        ..
    } = &mut e.body
    {
        *offer_code = Some(code.into());
        *d = discount;
    }
    e
}

pub async fn state(store: &StateStore, c: &CustomerRef) -> CustomerState {
    store
        .load(c)
        .await
        .expect("load")
        .unwrap_or_else(|| panic!("no state for {c}"))
        .state
}

/// Sum of a counter over the series whose labels contain every `want` pair.
pub async fn metric(p: &LapseProcess, name: &str, want: &[(&str, &str)]) -> f64 {
    let Ok((200, body)) = p.http_get("/metrics").await else {
        return f64::NAN;
    };
    body.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b'{')
                    || l.as_bytes().get(name.len()) == Some(&b' '))
        })
        .filter(|l| {
            want.iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A decoded output record (throttle event or recall trigger): field → value.
pub fn decode(schema_name: &str, payload: &[u8]) -> BTreeMap<String, AvroValue> {
    let schemas = lapse::codec::SchemaSet::load(std::path::Path::new(&schemas_dir())).unwrap();
    let schema = schemas.by_name(schema_name).unwrap();
    let body = lapse::codec::parse_frame(payload).expect("framed").body();
    let v = apache_avro::from_avro_datum(schema, &mut &body[..], None).expect("decodes");
    let AvroValue::Record(f) = v else {
        panic!("not a record")
    };
    f.into_iter().collect()
}

pub fn txt(r: &BTreeMap<String, AvroValue>, k: &str) -> String {
    match &r[k] {
        AvroValue::String(s) | AvroValue::Enum(_, s) => s.clone(),
        AvroValue::Union(_, b) => match b.as_ref() {
            AvroValue::String(s) | AvroValue::Enum(_, s) => s.clone(),
            o => format!("{o:?}"),
        },
        o => format!("{o:?}"),
    }
}

/// Every record of `topic` (until none arrives for a few seconds), grouped by
/// the id field `id`; asserts that repeats of an id are exact repeats.
pub async fn by_id(
    s: &Stack,
    topic: &str,
    schema: &str,
    id: &str,
) -> BTreeMap<String, Vec<Vec<u8>>> {
    let got = consume_up_to(
        &s.broker.bootstrap(),
        topic,
        100_000,
        Duration::from_secs(5),
    )
    .await;
    let mut out: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for r in got {
        let payload = r.payload.clone().unwrap();
        out.entry(txt(&decode(schema, &payload), id))
            .or_default()
            .push(payload);
    }
    for (k, copies) in &out {
        assert!(
            copies.windows(2).all(|w| w[0] == w[1]),
            "repeats of {k} must be exact"
        );
    }
    out
}
