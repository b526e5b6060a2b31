//! `lapse-tools bench backtest`: speed and memory of `lapse backtest` (issue
//! 17). The synthetic workload of the throughput benchmark, held in memory and
//! sorted by event time, is replayed through the default policy on one thread:
//!
//! * **speed**: events/s per run and the median;
//! * **memory**: one more replay, keeping every customer's final state (compact,
//!   as `lapse backtest` does not), measured by the counting allocator
//!   (`heap.rs`): the heap it holds per customer once over (and with its
//!   report), and its peak while replaying; beside what the same customers'
//!   final states take stored: the compact blob and key, and with `--redis`
//!   what Redis holds once lapse's own store code has written them there
//!   (`used_memory` growth, `MEMORY USAGE` of state keys).

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use lapse::backtest::replay::Replay;
use lapse::backtest::source::History;
use lapse::backtest::Candidate;
use lapse::config::Config;
use lapse::domain::clock::Clock;
use lapse::domain::event::CustomerRef;
use lapse::domain::policy::Policies;
use lapse::domain::state::{CustomerState, Source};
use lapse::store::keys::Keys;
use lapse::wall_clock::WallClock;

use super::heap;
use super::machine::{self, Machine};
use super::memory::RedisStore;
use super::workload::{Workload, WorkloadSpec};

#[derive(clap::Args, Debug, Clone)]
pub struct BacktestArgs {
    /// Events replayed.
    #[arg(long, default_value_t = 2_000_000)]
    pub events: u64,
    /// Customers they are spread over.
    #[arg(long, default_value_t = 100_000)]
    pub customers: u64,
    /// Days of event time they cover.
    #[arg(long, default_value_t = 90)]
    pub days: i64,
    /// Runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// lapse config: the policy replayed (default policy without), and with
    /// `--redis` the Redis (`redis.url`, `LAPSE_REDIS_URL`) and key prefix.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Also write the replayed customers' final states to Redis with lapse's
    /// store code and measure what they take there (the database is flushed).
    #[arg(long)]
    pub redis: bool,
    /// State keys whose `MEMORY USAGE` is sampled (with `--redis`).
    #[arg(long, default_value_t = 2_000)]
    pub sample: u64,
}

pub async fn run(a: &BacktestArgs) -> anyhow::Result<()> {
    let cfg = Config::load(a.config.as_deref())?;
    let candidate = Candidate {
        name: "bench".into(),
        policies: Policies::new(&cfg.policy)
            .map_err(|(k, m)| anyhow::anyhow!("config key `{k}`: {m}"))?,
        params: lapse::service::state_params(&cfg),
    };
    let spec = WorkloadSpec {
        events: a.events,
        customers: a.customers,
        tenants: 4,
        seed: 17,
        days: a.days,
        now_ms: WallClock.now_ms(),
    };
    let before_history = heap::thread_net_bytes();
    let mut history = History::default();
    for (i, g) in Workload::new(spec).enumerate() {
        let src = Source {
            kind: g.event.kind(),
            partition: 0,
            offset: i as i64,
        };
        let at = g.event.occurred_at;
        history.events.push((g.event, src, at));
    }
    history.sort();
    let history_bytes = heap::thread_net_bytes() - before_history;
    let n = history.events.len();
    let stop = AtomicBool::new(false);
    let mut rates = Vec::new();
    for run in 1..=a.runs {
        // The machine may be shared: each run says how busy it was before.
        let load = super::opt(machine::load_average(), 2);
        let started = Instant::now();
        let (report, _) = lapse::backtest::run(&history, &candidate, false, &stop, &mut |_, _| {});
        let secs = started.elapsed().as_secs_f64();
        let rate = n as f64 / secs;
        println!(
            "run {run}: {n} events in {secs:.2} s = {rate:.0} events/s (load before: {load}; {} throttle decision kinds, {} trigger rows)",
            report.throttle_decisions.len(),
            report.triggers.len()
        );
        rates.push(rate);
    }
    let median = super::median(&rates);
    println!(
        "backtest replay: median {median:.0} events/s on one thread ({} customers, {} days)",
        a.customers, a.days
    );

    // Memory: the heap a finished replay (and its report) holds, on this thread.
    let before = heap::thread_net_bytes();
    heap::thread_peak_bytes();
    let mut replay = Replay::new(&candidate.policies, candidate.params).keeping_states();
    let (report, _) =
        lapse::backtest::replay_into(&mut replay, &history, false, &stop, &mut |_, _| {});
    let peak = heap::thread_peak_bytes() - before;
    let with_report = heap::thread_net_bytes() - before;
    drop(report);
    let held = heap::thread_net_bytes() - before;
    let customers = replay.customers();
    let per = |bytes: f64| bytes / customers.max(1) as f64;
    let keys = Keys::new(cfg.redis.key_prefix.clone());
    let mut stored = 0usize;
    for who in 0..customers as u32 {
        if let Some((c, s)) = replay.state(who) {
            stored += lapse::store::blob::encode(1, &s).len() + keys.state(c).len();
        }
    }
    println!("memory per customer, the same {customers} customers after the same {n} events:");
    println!(
        "  backtest replay, in memory: {:.0} B (heap held once the replay is over; {:.0} B with its report)",
        per(held as f64),
        per(with_report as f64)
    );
    println!(
        "  stored, compact blob + state key: {:.0} B (what Redis stores, before its own overhead)",
        per(stored as f64)
    );
    println!(
        "  (while replaying, the replay's peak: {:.0} B per customer = {:.1} B per record of its per-record index and clock, beside the history's own records: {:.0} B each)",
        per(peak as f64),
        (peak - with_report) as f64 / n.max(1) as f64,
        history_bytes as f64 / n.max(1) as f64
    );
    let redis = if a.redis {
        let (bytes, key) = in_redis(&cfg, &replay, a.sample).await?;
        println!(
            "  Redis, written by lapse's store code: {bytes:.0} B of used_memory per customer (state key alone: MEMORY USAGE median {key:.0} B)"
        );
        Some(bytes)
    } else {
        println!("  Redis: not measured (--redis; `scripts/bench backtest` starts one)");
        None
    };
    let bound = redis.unwrap_or(per(stored as f64));
    println!(
        "replay memory per customer <= {}: {}",
        if redis.is_some() {
            "Redis"
        } else {
            "the stored bytes (a lower bound of Redis)"
        },
        if per(held as f64) <= bound {
            "met"
        } else {
            "NOT met"
        }
    );
    println!("machine: {}", Machine::describe().one_line());
    Ok(())
}

/// Writes the replay's final states to Redis (as `lapse run` would, with their
/// timers) and returns its `used_memory` growth per customer and the median
/// `MEMORY USAGE` of a state key.
async fn in_redis(
    cfg: &Config,
    replay: &Replay<'_, '_>,
    sample: u64,
) -> anyhow::Result<(f64, f64)> {
    let redis = RedisStore::connect(cfg).await?;
    let before = redis.empty().await?;
    let customers = replay.customers() as u32;
    let mut refs: Vec<&CustomerRef> = Vec::with_capacity(customers as usize);
    for from in (0..customers).step_by(1_000) {
        let chunk: Vec<(&CustomerRef, CustomerState)> = (from..customers.min(from + 1_000))
            .filter_map(|who| replay.state(who))
            .collect();
        let states: Vec<(&CustomerRef, &CustomerState)> =
            chunk.iter().map(|(c, s)| (*c, s)).collect();
        redis.write(&states).await?;
        refs.extend(chunk.iter().map(|(c, _)| *c));
    }
    let (per_customer, key, _) = redis.measure(before, &refs, sample, 17).await?;
    redis.view.flush().await?;
    Ok((per_customer, key.median))
}
