//! `lapse-tools bench backtest`: replay speed of `lapse backtest` (issue 17):
//! the synthetic workload of the throughput benchmark, held in memory and
//! sorted by event time, replayed through the default policy on one thread.
//! Prints events/s per run and the median, the replay's memory per customer,
//! and the machine.

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use lapse::backtest::source::History;
use lapse::backtest::Candidate;
use lapse::config::Config;
use lapse::domain::clock::Clock;
use lapse::domain::policy::Policies;
use lapse::domain::state::Source;
use lapse::wall_clock::WallClock;

use super::machine::Machine;
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
    /// lapse config whose policy is replayed (default policy without).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
}

/// Resident memory of this process, bytes (Linux; 0 elsewhere).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

pub fn run(a: &BacktestArgs) -> anyhow::Result<()> {
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
    let n = history.events.len();
    let stop = AtomicBool::new(false);
    let mut rates = Vec::new();
    let mut per_customer = 0.0;
    for run in 1..=a.runs {
        let before = rss_bytes();
        let started = Instant::now();
        let (report, _) = lapse::backtest::run(&history, &candidate, false, &stop, &mut |_, _| {});
        let secs = started.elapsed().as_secs_f64();
        // The replay's states are dropped with it; the report's maps stay small.
        let grown = rss_bytes().saturating_sub(before);
        if run == 1 {
            per_customer = grown as f64 / a.customers as f64;
        }
        let rate = n as f64 / secs;
        println!(
            "run {run}: {n} events in {secs:.2} s = {rate:.0} events/s ({} throttle decision kinds, {} trigger rows)",
            report.throttle_decisions.len(),
            report.triggers.len()
        );
        rates.push(rate);
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!(
        "backtest replay: median {median:.0} events/s on one thread ({} customers, {} days)",
        a.customers, a.days
    );
    println!("replay memory: ~{per_customer:.0} B per customer (resident growth of the first run / customers)");
    println!("machine: {}", Machine::describe().one_line());
    Ok(())
}
