//! `lapse-tools bench`: benchmarks that print figures (never timed assertions in tests).
//!
//! * `produce`: fill the input topics with a deterministic synthetic workload;
//! * `consume`: end-to-end throughput of `lapse run` over what is in the topics;
//! * `latency`: send → throttle decision latency of `lapse run` under a fixed load;
//! * `timers`: firing lag of a day of lapse timers in event-time mode;
//! * `memory`: Redis bytes per customer with a full five-channel history;
//! * `backtest`: replay speed of `lapse backtest`, and its memory per customer
//!   beside what the same customers cost in Redis;
//! * `ceiling`: what a consumer that only reads and commits reaches on the same
//!   events (the machine's bound, not lapse).
//!
//! `scripts/bench [throughput|latency|timers|memory|backtest|profile]` sets up Redis and
//! the broker on loopback and runs one of them. They share the pieces here: the
//! workload generator, the machine description, the `/metrics` reader, `median`
//! and `Stats`.

pub mod backtest;
pub mod ceiling;
mod child;
pub mod consume;
pub mod heap;
pub mod latency;
pub mod machine;
pub mod memory;
pub mod produce;
pub mod prom;
pub mod state_size;
pub mod timers;
pub mod workload;

use std::path::PathBuf;

use anyhow::Context;
use serde::Serialize;

use lapse::config::Config;

/// What the benchmarks that run `lapse run` as a child process (`consume`,
/// `latency`, `timers`) share: the child's config, overrides and binary, and
/// where the runs' files and results go.
#[derive(clap::Args, Debug, Clone)]
pub struct ChildArgs {
    /// lapse config for the runs; the child gets it as `lapse run --config`.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override one config key for the runs, as a TOML line (repeatable), e.g.
    /// `--set batch.max_records=5000` or `--set 'kafka.consumer_properties."fetch.wait.max.ms"="10"'`.
    /// Settings a benchmark needs (timers: `clock.mode="event"`,
    /// `policy.lapse.holdout_share=0.0`) come first; these lines after.
    #[arg(long = "set", value_name = "TOML")]
    pub set: Vec<String>,
    /// The lapse binary to run (default: `lapse` next to this executable).
    #[arg(long)]
    pub lapse_bin: Option<PathBuf>,
    /// Process id of the broker on this machine, to report its CPU use.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Directory for the runs' effective config and lapse logs (default: a temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

impl ChildArgs {
    /// `--work-dir`, or `NAME-PID` in the temp dir; created if missing.
    pub fn work_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = match &self.work_dir {
            Some(d) => d.clone(),
            None => std::env::temp_dir().join(format!("{name}-{}", std::process::id())),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// `--lapse-bin`, or `lapse` next to this executable (cargo builds both
    /// binaries into one directory).
    pub fn lapse_bin(&self) -> anyhow::Result<PathBuf> {
        match &self.lapse_bin {
            Some(b) => Ok(b.clone()),
            None => {
                let exe = std::env::current_exe().context("locating this executable")?;
                let bin = exe.with_file_name("lapse");
                anyhow::ensure!(
                    bin.is_file(),
                    "{} not found: build it (`cargo build --release --bin lapse`) or pass --lapse-bin",
                    bin.display()
                );
                Ok(bin)
            }
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub cmd: BenchCmd,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum BenchCmd {
    /// Pre-produce a synthetic workload (all five kinds) to the input topics.
    Produce(produce::ProduceArgs),
    /// Measure events/s of `lapse run` consuming what the input topics hold.
    Consume(consume::ConsumeArgs),
    /// Redis bytes per customer with a full five-channel history.
    Memory(memory::MemoryArgs),
    /// Measure the firing lag of lapse timers (event-time mode, idle inputs).
    Timers(timers::TimersArgs),
    /// Measure send → decision latency of `lapse run` under a fixed produce rate.
    Latency(latency::LatencyArgs),
    /// Replay speed and memory of `lapse backtest` (in memory, one thread; Redis only with --redis).
    Backtest(backtest::BacktestArgs),
    /// Stored bytes per customer over the simulator's population (domain only; no Redis).
    StateSize(state_size::StateSizeArgs),
    /// The most any consumer can show here: read the input topics and commit, nothing else.
    Ceiling(ceiling::CeilingArgs),
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.cmd {
        BenchCmd::Produce(a) => {
            let report = produce::run(&a).await?;
            let cfg = Config::load(a.config.as_deref())?;
            produce::print(&report, &cfg.kafka.topics.inputs());
            Ok(())
        }
        BenchCmd::Consume(a) => consume::run(&a).await.map(|_| ()),
        BenchCmd::Memory(a) => memory::run(&a).await.map(|_| ()),
        BenchCmd::Timers(a) => timers::run(&a).await.map(|_| ()),
        BenchCmd::Latency(a) => latency::run(&a).await.map(|_| ()),
        BenchCmd::Backtest(a) => backtest::run(&a).await,
        BenchCmd::StateSize(a) => state_size::run(&a),
        BenchCmd::Ceiling(a) => ceiling::run(&a).map(|_| ()),
    }
}

/// CPU counters at one instant: lapse's, Redis', the broker's, this process'
/// and the whole machine's; the difference of two is what a run used.
#[derive(Debug, Clone, Copy, Default)]
struct CpuCounters {
    lapse: Option<f64>,
    redis: Option<f64>,
    broker: Option<f64>,
    bench: Option<f64>,
    machine: Option<(u64, u64)>,
}

impl CpuCounters {
    /// `lapse_pids`: every lapse instance of the run (their CPU is summed).
    async fn now(
        lapse_pids: &[u32],
        redis: &consume::RedisView,
        broker_pid: Option<u32>,
    ) -> CpuCounters {
        CpuCounters {
            lapse: lapse_pids
                .iter()
                .map(|p| machine::process_cpu_seconds(*p))
                .sum::<Option<f64>>(),
            redis: redis.cpu_seconds().await,
            broker: broker_pid.and_then(machine::process_cpu_seconds),
            bench: machine::process_cpu_seconds(std::process::id()),
            machine: machine::machine_cpu_ticks(),
        }
    }
}

/// Median (mean of the two middle values for an even count); 0 for no values.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nearest-rank `q`-percentile (0..=1) of ascending `sorted`; `None` when empty.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// A figure for a results table: `?` when it could not be measured.
pub(crate) fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "?".into(), |x| format!("{x:.prec$}"))
}

/// A share (0..=1) as a whole percentage for a results table; `?` when unknown.
pub(crate) fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "?".into(), |x| format!("{:.0}%", x * 100.0))
}

/// Spread of a figure over the runs.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Stats {
            min: if min.is_finite() { min } else { 0.0 },
            median: median(values),
            max: if max.is_finite() { max } else { 0.0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        let s = Stats::of(&[5.0, 1.0, 3.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 3.0, 5.0));
    }
}
