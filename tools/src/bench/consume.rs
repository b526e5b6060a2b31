//! `lapse-tools bench consume`: end-to-end throughput of the real service.
//!
//! Each run starts the `lapse run` binary as a child process (what users run),
//! with a fresh consumer group and a flushed Redis database, and observes it
//! from outside: its `/metrics` endpoint, the group's committed offsets, and
//! CPU time from `/proc`. Then it stops the child with SIGTERM.
//!
//! Timeline of a run (all measured here, at `--scrape-interval` resolution):
//!
//! * `first`: the first scrape where `lapse_records_total > 0`, i.e. the first
//!   batch has been read and handed to the pipeline. Group join and start-up
//!   before it are reported (`startup`) but not timed.
//! * `durable`: `lapse_batch_records_sum` (records of batches that finished,
//!   decoded, dead-lettered or folded, and written to Redis) reaches the record
//!   count: every state is durable.
//! * `committed`: the group's committed offsets reach the end of every input
//!   partition (read from the data: see `KafkaView::true_ends`). This is the
//!   headline: "applied and committed".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use super::child::Fleet;
use super::machine::{self, Machine};
use super::prom;
use super::CpuCounters;
use super::{median, opt, pct, Stats};
use lapse::config::Config;

#[derive(clap::Args, Debug, Clone)]
pub struct ConsumeArgs {
    /// Records the input topics must hold (what `bench produce` wrote); a
    /// different count stops the benchmark before it starts.
    #[arg(long)]
    pub expect: u64,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    /// How often /metrics is read, in milliseconds (the timing resolution).
    #[arg(long, default_value_t = 50)]
    pub scrape_interval_ms: u64,
    /// lapse instances per run, in one consumer group (they share the
    /// partitions; CPU and metrics are summed over them): the scaling figure.
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
    #[command(flatten)]
    pub child: super::ChildArgs,
}

/// One line of Redis' `INFO commandstats`: what a run asked of Redis.
#[derive(Debug, Clone, Serialize)]
pub struct RedisCommand {
    pub command: String,
    pub calls: u64,
    /// CPU time Redis spent in the command (scripts include their inner calls).
    pub usec: f64,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub run: usize,
    pub records: u64,
    /// Spawn to first record handed to the pipeline (group join, not timed).
    pub startup_seconds: f64,
    /// First record to all offsets committed (the headline).
    pub seconds: f64,
    pub events_per_second: f64,
    /// First record to every state durable in Redis.
    pub durable_seconds: f64,
    pub durable_events_per_second: f64,
    pub batches: u64,
    pub mean_batch_records: f64,
    pub batch_ms_p50: Option<f64>,
    pub batch_ms_p90: Option<f64>,
    pub batch_ms_p99: Option<f64>,
    pub batch_ms_mean: Option<f64>,
    /// Redis round-trip time per batch (`lapse_redis_call_seconds_sum` / batches):
    /// state loads, state writes, and every Redis call of the batch.
    pub redis_load_ms_per_batch: f64,
    pub redis_save_ms_per_batch: f64,
    pub redis_all_ms_per_batch: f64,
    /// Producing decisions and waiting for every acknowledgement
    /// (`lapse_output_produce_seconds_sum` / batches), and the produce calls per batch.
    pub publish_ms_per_batch: f64,
    pub publishes_per_batch: f64,
    /// Per stage of lapse's batch path (`lapse_batch_stage_seconds_total`):
    /// ms per batch working and blocked on the next stage's full queue.
    pub stage_ms_per_batch: Vec<StageTime>,
    pub state_writes: u64,
    pub cas_conflicts: u64,
    pub dead_letters: u64,
    pub duplicates_skipped: u64,
    /// Customer state keys (`PREFIX:{TENANT/CUSTOMER}:state`) after the run.
    pub customers_in_redis: u64,
    /// Every key in the database after the run (states, timers, campaigns, ...).
    pub redis_keys: u64,
    /// Growth of Redis `used_memory` over the run divided by the customers: all
    /// of a customer's keys plus Redis' own overhead.
    pub redis_bytes_per_customer: Option<f64>,
    /// CPU seconds used between `first` and `committed`, per process.
    pub lapse_cpu_seconds: Option<f64>,
    pub redis_cpu_seconds: Option<f64>,
    pub broker_cpu_seconds: Option<f64>,
    /// Busy share of the whole machine (all cores) between `first` and `committed`.
    pub machine_busy: Option<f64>,
    pub load_average_before: Option<f64>,
    /// Share of the durable phase the processor spent applying batches
    /// (`lapse_batch_seconds_sum` / durable wall time); the rest it waited for input.
    pub processor_busy: f64,
    /// Share of scrapes, first record to durable, that found partitions paused
    /// (`lapse_partitions_paused > 0`): back-pressure from a full batch queue.
    pub paused_share: f64,
    /// Redis work of the whole run (start-up included), costliest command first.
    pub redis_commands: Vec<RedisCommand>,
    pub lapse_exit_ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsumeReport {
    pub machine: Machine,
    pub redis_version: String,
    pub redis_persistence: String,
    pub partitions: usize,
    pub records: u64,
    /// lapse instances per run (one consumer group).
    pub instances: usize,
    pub config_overrides: Vec<String>,
    pub runs: Vec<RunResult>,
    pub median_events_per_second: f64,
    pub median_seconds: f64,
    pub median_durable_events_per_second: f64,
    pub events_per_second: Stats,
}

pub(super) type Tp = (String, i32);

/// Merges `--set` lines into the config file's table and writes the result.
pub(super) fn effective_config(
    base: Option<&Path>,
    sets: &[String],
    dir: &Path,
) -> anyhow::Result<(PathBuf, Config)> {
    let text = match base {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => String::new(),
    };
    let mut table: toml::Table = toml::from_str(&text).with_context(|| {
        format!(
            "parsing {}",
            base.map_or("".into(), |p| p.display().to_string())
        )
    })?;
    for s in sets {
        let patch: toml::Table = toml::from_str(s)
            .with_context(|| format!("--set {s:?} is not a TOML key = value line"))?;
        merge(&mut table, patch);
    }
    let path = dir.join("lapse-bench.toml");
    std::fs::write(&path, toml::to_string(&table)?)
        .with_context(|| format!("writing {}", path.display()))?;
    let cfg = Config::load(Some(&path)).context("the benchmark's effective config")?;
    Ok((path, cfg))
}

fn merge(into: &mut toml::Table, patch: toml::Table) {
    for (k, v) in patch {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Kafka look-ups of the benchmark (blocking librdkafka calls, run off the runtime).
pub(super) struct KafkaView {
    pub(super) brokers: String,
    pub(super) partitions: Vec<Tp>,
}

impl KafkaView {
    pub(super) async fn new(brokers: &str, topics: &[&str]) -> anyhow::Result<KafkaView> {
        let brokers = brokers.to_string();
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        let b = brokers.clone();
        let partitions = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Tp>> {
            let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &b).create()?;
            let mut out = Vec::new();
            for t in &topics {
                let md = c
                    .fetch_metadata(Some(t), Duration::from_secs(10))
                    .with_context(|| format!("metadata of topic {t}"))?;
                let tm = md
                    .topics()
                    .iter()
                    .find(|x| x.name() == t)
                    .with_context(|| format!("topic {t} not in metadata"))?;
                if tm.error().is_some() || tm.partitions().is_empty() {
                    bail!("topic {t} does not exist: run `lapse-tools bench produce` first");
                }
                out.extend(tm.partitions().iter().map(|p| (t.clone(), p.id())));
            }
            Ok(out)
        })
        .await??;
        Ok(KafkaView {
            brokers,
            partitions,
        })
    }

    /// `(low, high)` watermarks per partition.
    pub(super) async fn watermarks(&self) -> anyhow::Result<BTreeMap<Tp, (i64, i64)>> {
        let (b, parts) = (self.brokers.clone(), self.partitions.clone());
        tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &b).create()?;
            parts
                .into_iter()
                .map(|(t, p)| {
                    let w = c
                        .fetch_watermarks(&t, p, Duration::from_secs(10))
                        .with_context(|| format!("watermarks of {t}/{p}"))?;
                    Ok(((t, p), w))
                })
                .collect()
        })
        .await?
    }

    /// The offset after the last record of every partition, read from the data.
    ///
    /// Not simply the high watermark: tansu 0.6 reports the high watermark as the
    /// first offset of the partition's last record batch + 1, so with batching
    /// producers it under-counts. Reading from `high - 1` (the last record on a
    /// Kafka broker; the last batch's first record on tansu) to the end gives the
    /// true end on both.
    pub(super) async fn true_ends(
        &self,
        marks: &BTreeMap<Tp, (i64, i64)>,
    ) -> anyhow::Result<BTreeMap<Tp, i64>> {
        let b = self.brokers.clone();
        let marks = marks.clone();
        tokio::task::spawn_blocking(move || {
            let mut ends: BTreeMap<Tp, i64> =
                marks.iter().map(|(tp, (_, hi))| (tp.clone(), *hi)).collect();
            let mut tpl = TopicPartitionList::new();
            for ((t, p), (lo, hi)) in &marks {
                if hi > lo {
                    tpl.add_partition_offset(t, *p, Offset::Offset(hi - 1))?;
                }
            }
            let want = tpl.count();
            if want == 0 {
                return Ok(ends);
            }
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &b)
                .set("group.id", "lapse-bench-probe")
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "false")
                .create()?;
            c.assign(&tpl)?;
            let mut seen = std::collections::HashSet::new();
            let started = Instant::now();
            let mut last_new = Instant::now();
            loop {
                match c.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) => {
                        let tp = (m.topic().to_string(), m.partition());
                        let e = ends.entry(tp.clone()).or_insert(0);
                        *e = (*e).max(m.offset() + 1);
                        seen.insert(tp);
                        last_new = Instant::now();
                    }
                    Some(Err(e)) => bail!("reading the tail of the input topics: {e}"),
                    None => {}
                }
                if seen.len() == want && last_new.elapsed() >= Duration::from_millis(500) {
                    return Ok(ends);
                }
                if started.elapsed() >= Duration::from_secs(60) {
                    bail!(
                        "reading the tail of the input topics: {} of {want} partitions answered in 60 s",
                        seen.len()
                    );
                }
            }
        })
        .await?
    }

    /// A client that reads `group`'s committed offsets (it never joins the group).
    pub(super) fn group_reader(&self, group: &str) -> anyhow::Result<Arc<BaseConsumer>> {
        Ok(Arc::new(
            ClientConfig::new()
                .set("bootstrap.servers", &self.brokers)
                .set("group.id", group)
                .set("enable.auto.commit", "false")
                .create()?,
        ))
    }

    pub(super) async fn committed(
        &self,
        reader: &Arc<BaseConsumer>,
    ) -> anyhow::Result<BTreeMap<Tp, i64>> {
        let (c, parts) = (reader.clone(), self.partitions.clone());
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for (t, p) in &parts {
                tpl.add_partition(t, *p);
            }
            let got = c.committed_offsets(tpl, Duration::from_secs(10))?;
            Ok(got
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .collect())
        })
        .await?
    }
}

/// Redis look-ups: flush before a run, size and CPU after.
pub(super) struct RedisView {
    pub(super) conn: redis::aio::MultiplexedConnection,
}

impl RedisView {
    pub(super) async fn connect(cfg: &Config) -> anyhow::Result<RedisView> {
        if cfg.redis.cluster || !cfg.redis.cluster_nodes.is_empty() {
            bail!("the benchmark flushes one Redis node between runs: use a single node (redis.cluster = false)");
        }
        let client = redis::Client::open(cfg.redis.url.as_str()).context("redis.url")?;
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connecting to Redis at {}", cfg.redis.url))?;
        Ok(RedisView { conn })
    }

    pub(super) async fn info(&self, section: &str) -> anyhow::Result<BTreeMap<String, String>> {
        let mut c = self.conn.clone();
        let text: String = redis::cmd("INFO").arg(section).query_async(&mut c).await?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect())
    }

    pub(super) async fn num(&self, section: &str, key: &str) -> Option<f64> {
        self.info(section).await.ok()?.get(key)?.parse().ok()
    }

    pub(super) async fn cpu_seconds(&self) -> Option<f64> {
        let i = self.info("cpu").await.ok()?;
        let f = |k: &str| i.get(k)?.parse::<f64>().ok();
        Some(f("used_cpu_user")? + f("used_cpu_sys")?)
    }

    pub(super) async fn flush(&self) -> anyhow::Result<()> {
        let mut c = self.conn.clone();
        let _: () = redis::cmd("FLUSHDB").query_async(&mut c).await?;
        Ok(())
    }

    /// Keys matching `pattern`, counted with SCAN (never KEYS).
    async fn count_matching(&self, pattern: &str) -> anyhow::Result<u64> {
        let mut c = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut n = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(5000)
                .query_async(&mut c)
                .await?;
            n += keys.len() as u64;
            if next == 0 {
                return Ok(n);
            }
            cursor = next;
        }
    }

    /// Clears Redis' per-command counters (`INFO commandstats`).
    pub(super) async fn reset_command_stats(&self) -> anyhow::Result<()> {
        let mut c = self.conn.clone();
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    /// Calls and CPU time per command since the last reset, costliest first.
    pub(super) async fn command_stats(&self) -> anyhow::Result<Vec<RedisCommand>> {
        let stats = self.info("commandstats").await?;
        let mut out: Vec<RedisCommand> = stats
            .iter()
            .filter_map(|(k, v)| {
                let command = k.strip_prefix("cmdstat_")?.to_string();
                let field = |name: &str| -> Option<f64> {
                    v.split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .find(|(key, _)| *key == name)?
                        .1
                        .parse()
                        .ok()
                };
                Some(RedisCommand {
                    command,
                    calls: field("calls")? as u64,
                    usec: field("usec")?,
                })
            })
            .collect();
        out.sort_by(|a, b| b.usec.total_cmp(&a.usec));
        Ok(out)
    }

    pub(super) async fn dbsize(&self) -> anyhow::Result<u64> {
        let mut c = self.conn.clone();
        Ok(redis::cmd("DBSIZE").query_async(&mut c).await?)
    }

    pub(super) async fn persistence(&self) -> String {
        let get = |k: &'static str| {
            let mut c = self.conn.clone();
            async move {
                let v: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(k)
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default();
                v.get(1).cloned().unwrap_or_else(|| "?".into())
            }
        };
        let (aof, save, fsync) = (
            get("appendonly").await,
            get("save").await,
            get("appendfsync").await,
        );
        if aof == "no" && save.is_empty() {
            "off (appendonly no, save \"\"): the figures measure lapse, not disk fsync".into()
        } else {
            format!("appendonly {aof} (appendfsync {fsync}), save \"{save}\"")
        }
    }
}

struct RunEnv<'a> {
    args: &'a ConsumeArgs,
    bin: &'a Path,
    config_path: &'a Path,
    work_dir: &'a Path,
    kafka: &'a KafkaView,
    redis: &'a RedisView,
    records: u64,
    ends: &'a BTreeMap<Tp, i64>,
    key_prefix: &'a str,
}

async fn one_run(env: &RunEnv<'_>, run: usize) -> anyhow::Result<RunResult> {
    env.redis.flush().await.context("FLUSHDB before the run")?;
    env.redis
        .reset_command_stats()
        .await
        .context("CONFIG RESETSTAT before the run")?;
    let mem_before = env.redis.num("memory", "used_memory").await;
    let load_average_before = machine::load_average();
    let group = format!(
        "lapse-bench-{}-{}-{run}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis()
    );
    let log_of = |i: usize| match env.args.instances {
        1 => env.work_dir.join(format!("lapse-run-{run}.log")),
        _ => env.work_dir.join(format!("lapse-run-{run}-{i}.log")),
    };
    let mut lapse = Fleet::spawn(env.bin, env.config_path, &group, env.args.instances, log_of)?;
    let deadline = lapse.spawned() + Duration::from_secs(env.args.timeout_secs);

    let progress = wait_durable(env, &mut lapse, run, deadline).await?;
    let committed_at = wait_committed(env, &mut lapse, run, &group, deadline).await?;
    let pids = lapse.pids();
    let cpu_at_end = CpuCounters::now(&pids, env.redis, env.args.child.broker_pid).await;

    let s = lapse
        .metrics()
        .await
        .ok_or_else(|| lapse.fail("cannot read /metrics after the run".into()))?;
    let redis_keys = env.redis.dbsize().await?;
    let customers_in_redis = env
        .redis
        .count_matching(&format!("{}:*:state", env.key_prefix))
        .await?;
    let mem_after = env.redis.num("memory", "used_memory").await;
    let redis_commands = env.redis.command_stats().await.unwrap_or_default();
    let spawned = lapse.spawned();
    let lapse_exit_ok = lapse.stop(run).await;

    let Progress {
        first,
        durable,
        cpu_at_first,
        scrapes,
        paused_scrapes,
    } = progress;
    let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    let seconds = committed_at.duration_since(first).as_secs_f64();
    let durable_seconds = durable.duration_since(first).as_secs_f64();
    let ms = |v: Option<f64>| v.map(|x| x * 1000.0);
    let batches = s.sum("lapse_batch_records_count") as u64;
    let [redis_load, redis_save, redis_all] =
        prom::redis_ms_per_batch(&prom::Scrape::default(), &s, batches);
    Ok(RunResult {
        run,
        records: env.records,
        startup_seconds: first.duration_since(spawned).as_secs_f64(),
        seconds,
        events_per_second: env.records as f64 / seconds.max(1e-9),
        durable_seconds,
        durable_events_per_second: env.records as f64 / durable_seconds.max(1e-9),
        batches,
        mean_batch_records: s.sum("lapse_batch_records_sum") / (batches.max(1) as f64),
        batch_ms_p50: ms(s.quantile("lapse_batch_seconds", &[], 0.5)),
        batch_ms_p90: ms(s.quantile("lapse_batch_seconds", &[], 0.9)),
        batch_ms_p99: ms(s.quantile("lapse_batch_seconds", &[], 0.99)),
        batch_ms_mean: ms(s.mean("lapse_batch_seconds", &[])),
        redis_load_ms_per_batch: redis_load,
        redis_save_ms_per_batch: redis_save,
        redis_all_ms_per_batch: redis_all,
        publish_ms_per_batch: 1000.0 * s.sum("lapse_output_produce_seconds_sum")
            / batches.max(1) as f64,
        publishes_per_batch: s.sum("lapse_output_produce_seconds_count") / batches.max(1) as f64,
        stage_ms_per_batch: stage_times(&s, batches),
        state_writes: s.sum("lapse_state_writes_total") as u64,
        cas_conflicts: s.sum("lapse_state_write_conflicts_total") as u64,
        dead_letters: s.sum("lapse_records_invalid_total") as u64,
        duplicates_skipped: s.sum("lapse_duplicates_skipped_total") as u64,
        customers_in_redis,
        redis_keys,
        redis_bytes_per_customer: match (mem_before, mem_after) {
            (Some(a), Some(b)) if customers_in_redis > 0 => {
                Some((b - a) / customers_in_redis as f64)
            }
            _ => None,
        },
        lapse_cpu_seconds: diff(cpu_at_first.lapse, cpu_at_end.lapse),
        redis_cpu_seconds: diff(cpu_at_first.redis, cpu_at_end.redis),
        broker_cpu_seconds: diff(cpu_at_first.broker, cpu_at_end.broker),
        machine_busy: machine::busy_share(cpu_at_first.machine, cpu_at_end.machine),
        load_average_before,
        // Mean over the batch processors (`batch.processors`); lapse builds
        // without that metric had one processor, busy while a batch ran.
        processor_busy: {
            let per = s.by("lapse_batch_processor_busy_seconds_total", "processor", &[]);
            let busy: f64 = per.values().sum();
            if per.is_empty() {
                s.sum("lapse_batch_seconds_sum") / durable_seconds.max(1e-9)
            } else {
                // (The instances' processors share labels: their times add up.)
                let instances = env.args.instances.max(1) as f64;
                busy / (per.len() as f64 * instances * durable_seconds.max(1e-9))
            }
        },
        paused_share: f64::from(paused_scrapes) / f64::from(scrapes.max(1)),
        redis_commands,
        lapse_exit_ok,
    })
}

/// What phase 1 of a run saw.
struct Progress {
    /// The first scrape with a record read.
    first: Instant,
    /// The first scrape with every record's batch durable.
    durable: Instant,
    cpu_at_first: CpuCounters,
    /// Scrapes from `first` on, and those of them with a partition paused.
    scrapes: u32,
    paused_scrapes: u32,
}

/// Phase 1: waits for the first record, then for every batch to be durable.
async fn wait_durable(
    env: &RunEnv<'_>,
    lapse: &mut Fleet,
    run: usize,
    deadline: Instant,
) -> anyhow::Result<Progress> {
    let args = env.args;
    let interval = Duration::from_millis(args.scrape_interval_ms.max(1));
    let mut first: Option<Instant> = None;
    let mut durable: Option<Instant> = None;
    let mut cpu_at_first = CpuCounters::default();
    let mut last_progress = Instant::now();
    let (mut scrapes, mut paused_scrapes) = (0u32, 0u32);
    while durable.is_none() {
        if let Some(status) = lapse.exited()? {
            return Err(lapse.fail(format!("lapse exited early ({status})")));
        }
        if Instant::now() >= deadline {
            return Err(lapse.fail(format!(
                "run {run} did not finish in {} s (--timeout-secs)",
                args.timeout_secs
            )));
        }
        if let Some(s) = lapse.metrics().await {
            let now = Instant::now();
            if first.is_none() && s.sum("lapse_records_total") > 0.0 {
                first = Some(now);
                let pids = lapse.pids();
                cpu_at_first = CpuCounters::now(&pids, env.redis, args.child.broker_pid).await;
            }
            if first.is_some() {
                scrapes += 1;
                if s.sum("lapse_partitions_paused") > 0.0 {
                    paused_scrapes += 1;
                }
            }
            let done = s.sum("lapse_batch_records_sum");
            if done >= env.records as f64 {
                durable = Some(now);
            } else if last_progress.elapsed() >= Duration::from_secs(5) {
                eprintln!("  run {run}: {done:.0}/{} records durable", env.records);
                last_progress = Instant::now();
            }
        }
        if durable.is_none() {
            tokio::time::sleep(interval).await;
        }
    }
    Ok(Progress {
        first: first.expect("set before durable"),
        durable: durable.expect("loop exit"),
        cpu_at_first,
        scrapes,
        paused_scrapes,
    })
}

/// Phase 2: waits until the group's committed offsets reach the end of every
/// partition; returns when they did.
async fn wait_committed(
    env: &RunEnv<'_>,
    lapse: &mut Fleet,
    run: usize,
    group: &str,
    deadline: Instant,
) -> anyhow::Result<Instant> {
    let reader = env.kafka.group_reader(group)?;
    loop {
        if let Some(status) = lapse.exited()? {
            return Err(lapse.fail(format!("lapse exited before committing ({status})")));
        }
        if Instant::now() >= deadline {
            return Err(lapse.fail(format!("run {run}: offsets not committed in time")));
        }
        let committed = env.kafka.committed(&reader).await.unwrap_or_default();
        let now = Instant::now();
        if env
            .ends
            .iter()
            .all(|(tp, end)| *end == 0 || committed.get(tp) == Some(end))
        {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn run(args: &ConsumeArgs) -> anyhow::Result<ConsumeReport> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    let work_dir = args.child.work_dir("lapse-bench")?;
    let (config_path, cfg) =
        effective_config(args.child.config.as_deref(), &args.child.set, &work_dir)?;
    let bin = args.child.lapse_bin()?;
    let inputs = cfg.kafka.topics.inputs();
    let kafka = KafkaView::new(&cfg.kafka.brokers, &inputs).await?;
    let marks = kafka.watermarks().await?;
    if marks.values().any(|(lo, _)| *lo > 0) {
        bail!("the input topics were truncated (low watermark > 0); produce into fresh topics");
    }
    let ends = kafka.true_ends(&marks).await?;
    let records: u64 = ends.values().map(|e| (*e).max(0) as u64).sum();
    if records != args.expect {
        bail!(
            "the input topics hold {records} records, not the {} expected (--expect): \
             produce into fresh topics with `lapse-tools bench produce --events {}`",
            args.expect,
            args.expect
        );
    }
    let redis = RedisView::connect(&cfg).await?;
    let machine = Machine::describe();
    let redis_version = redis
        .info("server")
        .await
        .ok()
        .and_then(|i| i.get("redis_version").cloned())
        .unwrap_or_else(|| "?".into());
    let redis_persistence = redis.persistence().await;

    println!("machine: {}", machine.one_line());
    println!("redis {redis_version}: persistence {redis_persistence}");
    println!(
        "input: {records} records in {} partitions of {} topics; lapse: {} run --config {} \
         ({} instance{} in one group)",
        kafka.partitions.len(),
        inputs.len(),
        bin.display(),
        config_path.display(),
        args.instances.max(1),
        if args.instances > 1 { "s" } else { "" }
    );
    if !args.child.set.is_empty() {
        println!("config overrides: {}", args.child.set.join("  "));
    }
    println!(
        "work dir (effective config, lapse logs): {}",
        work_dir.display()
    );

    let env = RunEnv {
        args,
        bin: &bin,
        config_path: &config_path,
        work_dir: &work_dir,
        kafka: &kafka,
        redis: &redis,
        records,
        ends: &ends,
        key_prefix: &cfg.redis.key_prefix,
    };
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        eprintln!(
            "run {run}/{}: flushing Redis, starting lapse with a fresh group",
            args.runs
        );
        let r = one_run(&env, run).await?;
        print_run(&r);
        runs.push(r);
    }
    let eps: Vec<f64> = runs.iter().map(|r| r.events_per_second).collect();
    let report = ConsumeReport {
        machine,
        redis_version,
        redis_persistence,
        partitions: kafka.partitions.len(),
        records,
        instances: args.instances.max(1),
        config_overrides: args.child.set.clone(),
        median_events_per_second: median(&eps),
        median_seconds: median(&runs.iter().map(|r| r.seconds).collect::<Vec<_>>()),
        median_durable_events_per_second: median(
            &runs
                .iter()
                .map(|r| r.durable_events_per_second)
                .collect::<Vec<_>>(),
        ),
        events_per_second: Stats::of(&eps),
        runs,
    };
    print_summary(&report);
    if let Some(p) = &args.child.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("results written to {}", p.display());
    }
    Ok(report)
}

/// One stage of the batch path, per batch.
#[derive(Debug, Clone, Serialize)]
pub struct StageTime {
    pub stage: String,
    pub working_ms: f64,
    pub blocked_ms: f64,
}

const STAGES: [&str; 4] = ["dispatcher", "processors", "publishers", "finisher"];

fn stage_times(s: &prom::Scrape, batches: u64) -> Vec<StageTime> {
    let name = "lapse_batch_stage_seconds_total";
    let per_batch = |stage: &str, activity: &str| {
        // (+ 0.0: an empty sum is -0.0.)
        1000.0 * s.sum_where(name, &[("stage", stage), ("activity", activity)])
            / batches.max(1) as f64
            + 0.0
    };
    STAGES
        .iter()
        .filter(|st| s.matching(name, &[("stage", st)]).next().is_some())
        .map(|st| StageTime {
            stage: st.to_string(),
            working_ms: per_batch(st, "working"),
            blocked_ms: per_batch(st, "blocked"),
        })
        .collect()
}

fn print_run(r: &RunResult) {
    println!(
        "run {}: {:.0} events/s committed ({:.2} s), {:.0} events/s durable ({:.2} s); start-up {:.1} s",
        r.run,
        r.events_per_second,
        r.seconds,
        r.durable_events_per_second,
        r.durable_seconds,
        r.startup_seconds
    );
    println!(
        "  processor busy {} of the time, partitions paused in {} of scrapes; \
         {} batches (mean {:.0} records), batch ms p50 {} p90 {} p99 {} mean {}; \
         redis round trips per batch: {}; publishing decisions (produce + acks) \
         {:.1} ms per batch in {:.2} calls",
        pct(Some(r.processor_busy)),
        pct(Some(r.paused_share)),
        r.batches,
        r.mean_batch_records,
        opt(r.batch_ms_p50, 1),
        opt(r.batch_ms_p90, 1),
        opt(r.batch_ms_p99, 1),
        opt(r.batch_ms_mean, 1),
        prom::show_redis_ms_per_batch([
            r.redis_load_ms_per_batch,
            r.redis_save_ms_per_batch,
            r.redis_all_ms_per_batch,
        ]),
        r.publish_ms_per_batch,
        r.publishes_per_batch,
    );
    if !r.stage_ms_per_batch.is_empty() {
        let stages: Vec<String> = r
            .stage_ms_per_batch
            .iter()
            .map(|t| {
                format!(
                    "{} {:.1} working, {:.1} blocked",
                    t.stage, t.working_ms, t.blocked_ms
                )
            })
            .collect();
        println!(
            "  stages, ms per batch (summed over a stage's tasks): {}",
            stages.join("; ")
        );
    }
    println!(
        "  cpu seconds: lapse {} redis {} broker {}; machine busy {} (1-min load before: {})",
        opt(r.lapse_cpu_seconds, 1),
        opt(r.redis_cpu_seconds, 1),
        opt(r.broker_cpu_seconds, 1),
        pct(r.machine_busy),
        opt(r.load_average_before, 2),
    );
    let per_event = |x: f64| x / r.records.max(1) as f64;
    let top: Vec<String> = r
        .redis_commands
        .iter()
        .take(6)
        .map(|c| {
            format!(
                "{} {:.2} calls {:.2} µs",
                c.command,
                per_event(c.calls as f64),
                per_event(c.usec)
            )
        })
        .collect();
    let redis_usec = per_event(r.redis_commands.iter().map(|c| c.usec).sum());
    println!(
        "  redis work per event ({redis_usec:.2} µs in commands): {}",
        top.join(", ")
    );
    let us = |s: Option<f64>| opt(s.map(|s| per_event(s * 1e6)), 1);
    println!(
        "  budgets per event (issue 18: lapse CPU <= 8 µs, Redis work <= 3 µs): lapse CPU {} µs, \
         Redis work {redis_usec:.2} µs in commands ({} µs of Redis CPU), broker CPU {} µs",
        us(r.lapse_cpu_seconds),
        us(r.redis_cpu_seconds),
        us(r.broker_cpu_seconds),
    );
    println!(
        "  {} customers in Redis ({} keys; {} B of Redis memory per customer), {} state writes, {} conflicts, {} dead letters, \
         {} duplicates; lapse {}",
        r.customers_in_redis,
        r.redis_keys,
        opt(r.redis_bytes_per_customer, 0),
        r.state_writes,
        r.cas_conflicts,
        r.dead_letters,
        r.duplicates_skipped,
        if r.lapse_exit_ok {
            "exited 0 on SIGTERM"
        } else {
            "did NOT exit 0 on SIGTERM"
        }
    );
}

fn print_summary(rep: &ConsumeReport) {
    println!();
    println!(
        "== lapse bench consume: {} records, {} runs",
        rep.records,
        rep.runs.len()
    );
    println!("machine: {}", rep.machine.one_line());
    println!(
        "redis {}: persistence {}",
        rep.redis_version, rep.redis_persistence
    );
    if !rep.config_overrides.is_empty() {
        println!("config overrides: {}", rep.config_overrides.join("  "));
    }
    println!(
        "{:>4} {:>9} {:>8} {:>9} {:>6} {:>6} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>5} {:>5}",
        "run",
        "events/s",
        "wall s",
        "durable/s",
        "proc",
        "paused",
        "p50 ms",
        "p99 ms",
        "cpu:lps",
        "redis",
        "broker",
        "busy",
        "load",
        "exit"
    );
    for r in &rep.runs {
        println!(
            "{:>4} {:>9.0} {:>8.2} {:>9.0} {:>6} {:>6} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>5} {:>5}",
            r.run,
            r.events_per_second,
            r.seconds,
            r.durable_events_per_second,
            pct(Some(r.processor_busy)),
            pct(Some(r.paused_share)),
            opt(r.batch_ms_p50, 1),
            opt(r.batch_ms_p99, 1),
            opt(r.lapse_cpu_seconds, 1),
            opt(r.redis_cpu_seconds, 1),
            opt(r.broker_cpu_seconds, 1),
            pct(r.machine_busy),
            opt(r.load_average_before, 2),
            if r.lapse_exit_ok { "0" } else { "FAIL" },
        );
    }
    println!(
        "median: {:.0} events/s ({:.2} s from first record read to all offsets committed; \
         {:.0} events/s to all state durable in Redis)",
        rep.median_events_per_second, rep.median_seconds, rep.median_durable_events_per_second
    );
    println!(
        "columns: proc = batch processors' mean busy share, paused = share of time partitions were paused, \
         cpu:lps/redis/broker = CPU seconds of each process during the run, \
         busy = whole-machine CPU use, load = 1-min load average before the run"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_lines_merge_into_the_config_file() {
        crate::run_from_repo_root();
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.toml");
        std::fs::write(
            &base,
            "[batch]\nmax_records = 10\nmax_wait = \"50ms\"\n[kafka]\nbrokers = \"x:1\"\n",
        )
        .unwrap();
        let (path, cfg) = effective_config(
            Some(&base),
            &[
                "batch.max_records = 5000".into(),
                r#"kafka.consumer_properties."fetch.wait.max.ms" = "10""#.into(),
            ],
            dir.path(),
        )
        .unwrap();
        assert!(path.exists());
        assert_eq!(cfg.batch.max_records, 5000);
        assert_eq!(cfg.batch.max_wait.0, Duration::from_millis(50));
        assert_eq!(
            cfg.kafka
                .consumer_properties
                .get("fetch.wait.max.ms")
                .map(String::as_str),
            Some("10")
        );
        let err = effective_config(Some(&base), &["batch.max_records = 0".into()], dir.path())
            .unwrap_err();
        assert!(format!("{err:#}").contains("batch.max_records"), "{err:#}");
    }
}
