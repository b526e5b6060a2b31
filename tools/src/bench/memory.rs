//! `lapse-tools bench memory`: Redis bytes per customer with a full five-channel
//! history.
//!
//! Builds one customer's state by folding a long history through the domain
//! (marketing sends, opens, clicks and replies on every channel, treatment
//! visits: every bounded part of the state at its cap), then writes that state
//! for `--customers` customers with lapse's own store code (state key, CAS
//! script, timer) and measures:
//!
//! * `MEMORY USAGE` of a sample of state keys (what one customer's key costs,
//!   Redis overhead included);
//! * the growth of `used_memory` divided by the customers (everything: keys,
//!   the keyspace's hash table, timer sorted sets).

use std::time::Instant;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use lapse::config::Config;
use lapse::domain::event::CustomerRef;
use lapse::domain::state::CustomerState;
use lapse::histories::{blob_parts, full_history, irregular_history};
use lapse::metrics::Metrics;
use lapse::store::timers::TimerStore;
use lapse::store::StateStore;

use super::consume::RedisView;
use super::machine::Machine;
use super::Stats;

#[derive(clap::Args, Debug, Clone)]
pub struct MemoryArgs {
    /// lapse config (Redis URL, key prefix, state bounds, policy).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Customers written.
    #[arg(long, default_value_t = 100_000)]
    pub customers: u64,
    /// State keys whose `MEMORY USAGE` is sampled.
    #[arg(long, default_value_t = 2_000)]
    pub sample: u64,
    /// Rounds of history folded into the customer (regular: one send, open,
    /// click, reply on a channel and one visit, an hour apart; irregular: one
    /// send, with opens, clicks, replies and visits at random later times).
    #[arg(long, default_value_t = 1_000)]
    pub rounds: i64,
    /// Histories measured, in turn (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [History::Regular, History::Irregular])]
    pub history: Vec<History>,
    /// Runs (each flushes the Redis database first); the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Write every figure as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// The history folded into the measured customer state.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum History {
    /// Whole hours apart, a channel's send, open, click and reply at the same
    /// instant: the most compressible full history.
    Regular,
    /// Millisecond times, opens/clicks/replies minutes to hours after some of
    /// the sends, a visit every 30 sends: what a busy real customer stores.
    Irregular,
}

impl History {
    pub fn label(self) -> &'static str {
        match self {
            History::Regular => "regular",
            History::Irregular => "irregular",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryRun {
    pub customers: u64,
    pub used_memory_per_customer: f64,
    pub memory_usage_state_key: Stats,
    pub keys: u64,
    pub write_seconds: f64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CodecMicros {
    pub encode: f64,
    pub decode: f64,
    pub format1_encode: f64,
    pub format1_decode: f64,
}

/// Mean time of `f` over enough calls to take ~50 ms, in µs.
fn micros(mut f: impl FnMut()) -> f64 {
    let mut n = 0u32;
    let started = Instant::now();
    while started.elapsed().as_millis() < 50 {
        for _ in 0..100 {
            f();
        }
        n += 100;
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

/// Encode and decode times of `s` in both formats.
pub fn codec_micros(s: &CustomerState) -> CodecMicros {
    use lapse::store::blob;
    let v2 = blob::encode(1, s);
    let v1 = blob::encode_any(1, s);
    CodecMicros {
        encode: micros(|| drop(std::hint::black_box(blob::encode(1, s)))),
        decode: micros(|| drop(std::hint::black_box(blob::decode(&v2)))),
        format1_encode: micros(|| drop(std::hint::black_box(blob::encode_any(1, s)))),
        format1_decode: micros(|| drop(std::hint::black_box(blob::decode(&v1)))),
    }
}

/// The figures of one history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryReport {
    pub history: History,
    pub blob_bytes: usize,
    pub blob_parts: Vec<(String, usize)>,
    /// CPU time to encode and to decode that state, format 2 and format 1, µs.
    pub codec_micros: CodecMicros,
    pub runs: Vec<MemoryRun>,
    pub per_customer_median: f64,
    pub state_key_median: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemoryReport {
    pub machine: Machine,
    pub redis_version: String,
    pub histories: Vec<HistoryReport>,
    pub target_bytes: f64,
}

/// The target of the benchmark suite (issue 6): Redis bytes per customer.
pub const TARGET_BYTES: f64 = 600.0;

pub async fn run(args: &MemoryArgs) -> anyhow::Result<MemoryReport> {
    anyhow::ensure!(args.customers > 0, "--customers must be at least 1");
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    anyhow::ensure!(
        !args.history.is_empty(),
        "--history needs at least one history"
    );
    let cfg = Config::load(args.config.as_deref())?;
    let params = lapse::service::state_params(&cfg);
    let policies = lapse::domain::policy::Policies::new(&cfg.policy)
        .map_err(|(key, message)| anyhow::anyhow!("policy: {key}: {message}"))?;

    let redis = RedisStore::connect(&cfg).await?;
    let machine = Machine::describe();
    println!("machine: {}", machine.one_line());
    println!(
        "redis {}; {} customers per run, {} runs per history",
        redis.version, args.customers, args.runs
    );
    let mut histories = Vec::new();
    for history in &args.history {
        let template_customer = CustomerRef::new("clinic-1", "cust-0000000");
        let policy = policies.of(&template_customer.tenant);
        let template = match history {
            History::Regular => full_history(&template_customer, args.rounds, &params, policy),
            History::Irregular => {
                irregular_history(&template_customer, args.rounds, 1, &params, policy)
            }
        };
        histories.push(measure(args, &redis, *history, &template).await?);
    }
    redis.view.flush().await?;
    println!();
    for h in &histories {
        println!(
            "median, {} history: {:.0} B of Redis memory per customer with a full five-channel history (state key alone: {:.0} B; blob {} B); target <= {TARGET_BYTES:.0} B: {}",
            h.history.label(),
            h.per_customer_median,
            h.state_key_median,
            h.blob_bytes,
            if h.per_customer_median <= TARGET_BYTES { "met" } else { "NOT met" }
        );
    }
    let report = MemoryReport {
        machine,
        redis_version: redis.version.clone(),
        histories,
        target_bytes: TARGET_BYTES,
    };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// lapse's own store code on the benchmark's Redis: customers' states are
/// written as `lapse run` writes them (state key by the CAS script, timer),
/// so what Redis holds afterwards is what lapse would hold.
pub(super) struct RedisStore {
    store: StateStore,
    timers: TimerStore,
    pub(super) view: RedisView,
    pub(super) version: String,
}

impl RedisStore {
    /// Connects to `cfg`'s Redis (`redis.url`, `redis.key_prefix`, `timers.shards`).
    pub(super) async fn connect(cfg: &Config) -> anyhow::Result<RedisStore> {
        let metrics = Metrics::new(&cfg.metrics);
        let store = StateStore::connect(&cfg.redis, metrics)
            .await
            .with_context(|| format!("connecting to Redis at {}", cfg.redis.url))?;
        let timers = TimerStore::new(
            store.conn(),
            cfg.redis.key_prefix.clone(),
            cfg.timers.shards,
        )
        .await?;
        let view = RedisView::connect(cfg).await?;
        let version = view
            .info("server")
            .await?
            .remove("redis_version")
            .unwrap_or_else(|| "?".into());
        Ok(RedisStore {
            store,
            timers,
            view,
            version,
        })
    }

    /// Empties the database and returns `used_memory` once the allocator has
    /// settled: the baseline of a measurement.
    pub(super) async fn empty(&self) -> anyhow::Result<f64> {
        self.view.flush().await?;
        // Let the allocator settle so the baseline is not mid-free.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        self.used_memory().await
    }

    async fn used_memory(&self) -> anyhow::Result<f64> {
        self.view
            .num("memory", "used_memory")
            .await
            .context("INFO memory has no used_memory")
    }

    /// Writes new customers' states (revision 1) and schedules their timers.
    pub(super) async fn write(
        &self,
        states: &[(&CustomerRef, &CustomerState)],
    ) -> anyhow::Result<()> {
        let writes: Vec<(&CustomerRef, u64, &CustomerState)> =
            states.iter().map(|(c, s)| (*c, 0, *s)).collect();
        let ok = self.store.save_many(&writes).await?;
        anyhow::ensure!(
            ok.iter().all(|b| *b),
            "a fresh write conflicted: is the database shared?"
        );
        let due: Vec<(&CustomerRef, i64)> = states
            .iter()
            .filter_map(|(c, s)| Some((*c, s.timer_due?)))
            .collect();
        if !due.is_empty() {
            self.timers.schedule(&due).await?;
        }
        Ok(())
    }

    /// Redis' memory for the customers written since [`RedisStore::empty`]
    /// returned `before`: `used_memory` growth per customer, and `MEMORY
    /// USAGE` of `sample` state keys picked at random (seeded) from `customers`.
    pub(super) async fn measure(
        &self,
        before: f64,
        customers: &[&CustomerRef],
        sample: u64,
        seed: u64,
    ) -> anyhow::Result<(f64, Stats, u64)> {
        let after = self.used_memory().await?;
        let keys = self.view.dbsize().await?;
        let mut conn = self.view.conn.clone();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut usage = Vec::new();
        for _ in 0..sample.min(customers.len() as u64) {
            let c = customers[rng.random_range(0..customers.len())];
            let bytes: Option<u64> = redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(self.store.keys().state(c))
                .arg("SAMPLES")
                .arg(0)
                .query_async(&mut conn)
                .await?;
            usage.push(bytes.context("a written state key is missing")? as f64);
        }
        let per_customer = (after - before) / customers.len().max(1) as f64;
        Ok((per_customer, Stats::of(&usage), keys))
    }
}

/// Writes `template` for `--customers` customers, `--runs` times, and measures.
async fn measure(
    args: &MemoryArgs,
    redis: &RedisStore,
    history: History,
    template: &CustomerState,
) -> anyhow::Result<HistoryReport> {
    let blob_bytes = lapse::store::blob::encode(1, template).len();
    let parts = blob_parts(template);
    let codec = codec_micros(template);
    println!();
    println!(
        "{} history, {} rounds on all five channels: {blob_bytes} B stored blob at revision 1 ({})",
        history.label(),
        args.rounds,
        parts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "encoding / decoding that state: {:.2} / {:.2} µs (format 1, postcard: {:.2} / {:.2} µs)",
        codec.encode, codec.decode, codec.format1_encode, codec.format1_decode
    );
    let ids: Vec<CustomerRef> = (0..args.customers)
        .map(|i| CustomerRef::new(format!("clinic-{}", i % 4 + 1), format!("cust-{i:07}")))
        .collect();
    let refs: Vec<&CustomerRef> = ids.iter().collect();
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let before = redis.empty().await?;
        let started = Instant::now();
        for chunk in refs.chunks(1_000) {
            let states: Vec<(&CustomerRef, &CustomerState)> =
                chunk.iter().map(|c| (*c, template)).collect();
            redis.write(&states).await?;
        }
        let write_seconds = started.elapsed().as_secs_f64();
        let (per_customer, usage, keys) = redis
            .measure(before, &refs, args.sample, run as u64)
            .await?;
        let r = MemoryRun {
            customers: args.customers,
            used_memory_per_customer: per_customer,
            memory_usage_state_key: usage,
            keys,
            write_seconds,
        };
        println!(
            "run {run}: {:.0} B of used_memory per customer ({} keys); MEMORY USAGE of a state key: median {:.0} B (min {:.0}, max {:.0}, {} sampled); written in {:.1} s",
            r.used_memory_per_customer,
            r.keys,
            r.memory_usage_state_key.median,
            r.memory_usage_state_key.min,
            r.memory_usage_state_key.max,
            args.sample.min(args.customers),
            r.write_seconds
        );
        runs.push(r);
    }
    let per_customer_median = super::median(
        &runs
            .iter()
            .map(|r| r.used_memory_per_customer)
            .collect::<Vec<_>>(),
    );
    let state_key_median = super::median(
        &runs
            .iter()
            .map(|r| r.memory_usage_state_key.median)
            .collect::<Vec<_>>(),
    );
    Ok(HistoryReport {
        history,
        blob_bytes,
        blob_parts: parts,
        codec_micros: codec,
        runs,
        per_customer_median,
        state_key_median,
    })
}
