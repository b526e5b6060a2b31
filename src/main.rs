//! The `lapse` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: the hot path makes many small short-lived allocations (records,
/// keys, Avro values, state blobs) on several threads. The profile shows no
/// clear gain over glibc yet (doc/BENCHMARK.md): allocating less is the fix.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use lapse::config::Config;
use lapse::domain::clock::Clock;
use lapse::domain::event::CustomerRef;
use lapse::metrics::Metrics;
use lapse::store::StateStore;
use lapse::wall_clock::WallClock;

#[derive(Parser)]
#[command(
    name = "lapse",
    version,
    about = "Engagement, frequency-control and recall pipeline: Kafka in, Redis state, Kafka out."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Consume the input topics and keep per-customer state in Redis until SIGTERM/SIGINT.
    Run {
        /// TOML config file; without it, defaults plus LAPSE_* environment overrides.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file and print the effective config (defaults and env overrides applied).
    CheckConfig { file: PathBuf },
    /// Schedule the timers of customers whose state has a recall stage due but no
    /// timer (states written before timers existed, or timers lost by Redis).
    /// Safe while instances run; prints what it found as JSON.
    SweepTimers {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Count the missing timers without scheduling them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Replay a history through a proposed policy (and a baseline) in memory:
    /// what each would have blocked, throttled and triggered. Writes nothing.
    Backtest(lapse::backtest::cli::Args),
    /// Contact-policy experiments (`[[policy.experiments]]`).
    #[command(subcommand)]
    Experiment(ExperimentCmd),
    /// Print one customer's state as JSON.
    Inspect {
        /// TENANT/CUSTOMER
        customer: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ExperimentCmd {
    /// Per experiment, arm and measure: the difference to control with an
    /// always-valid interval (safe to read every day), the sample size and
    /// days still needed, the unsubscribe guardrail, and the winner or "not
    /// yet". Reads every customer state; writes nothing.
    Report {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only this experiment.
        #[arg(long)]
        experiment: Option<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// The config's policies (tenants, experiments), or which key is wrong.
fn policies(cfg: &Config) -> anyhow::Result<lapse::domain::policy::Policies> {
    lapse::domain::policy::Policies::new(&cfg.policy)
        .map_err(|(k, m)| anyhow::anyhow!("config key `{k}`: {m}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lapse::cli::main(dispatch(cli.cmd))
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Run { config } => {
            // A panic in any task would leave a half-working consumer: die instead,
            // and let the restart re-read everything not committed.
            let default_hook = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                default_hook(info);
                eprintln!("fatal: a lapse task panicked; exiting so the supervisor restarts it");
                std::process::abort();
            }));
            let cfg = Config::load(config.as_deref())?;
            lapse::service::run(cfg).await
        }
        Cmd::CheckConfig { file } => {
            let cfg = Config::load(Some(&file))?;
            lapse::service::build_decoder(&cfg)?;
            println!("{}", cfg.to_toml());
            eprintln!("config OK");
            Ok(())
        }
        Cmd::Backtest(args) => lapse::backtest::cli::run(args).await,
        Cmd::SweepTimers { config, dry_run } => {
            let cfg = Config::load(config.as_deref())?;
            let store = StateStore::connect(&cfg.redis, Metrics::new(&cfg.metrics)).await?;
            let timers = lapse::store::timers::TimerStore::new(
                store.conn(),
                cfg.redis.key_prefix.clone(),
                cfg.timers.shards,
            )
            .await?;
            let moved = timers.migrate_orphans().await?;
            let policies = policies(&cfg)?;
            let report =
                lapse::timer_sweep::sweep(&store, &timers, &policies, dry_run, WallClock.now_ms())
                    .await?;
            let mut v = serde_json::to_value(&report)?;
            v["dry_run"] = serde_json::json!(dry_run);
            v["timers_moved_between_shards"] = serde_json::json!(moved);
            println!("{}", serde_json::to_string_pretty(&v)?);
            Ok(())
        }
        Cmd::Experiment(ExperimentCmd::Report {
            config,
            experiment,
            json,
        }) => {
            let cfg = Config::load(config.as_deref())?;
            let policies = policies(&cfg)?;
            let x = policies.experiments();
            if let Some(name) = &experiment {
                if !x.all().any(|e| &e.name == name) {
                    anyhow::bail!(
                        "no experiment `{name}` in [[policy.experiments]] of this config"
                    );
                }
            }
            let store = StateStore::connect(&cfg.redis, Metrics::new(&cfg.metrics)).await?;
            let stops = lapse::store::experiment_stops::ExperimentStops::new(
                store.conn(),
                &cfg.redis.key_prefix,
            );
            stops.apply(x).await?;
            let (tally, customers) = lapse::experiment_report::tally(&store).await?;
            let now = WallClock.now_ms();
            let reports = lapse::experiment_report::reports(x, &tally, now, experiment.as_deref());
            if json {
                let v = serde_json::json!({ "customers_read": customers, "experiments": reports });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if reports.is_empty() {
                println!("no experiments configured ([[policy.experiments]]); {customers} customer states read");
            } else {
                for r in &reports {
                    println!("{}", lapse::experiment_report::render(r));
                }
                println!("{customers} customer states read");
            }
            Ok(())
        }
        Cmd::Inspect { customer, config } => {
            let cfg = Config::load(config.as_deref())?;
            let c = CustomerRef::parse(&customer)
                .ok_or_else(|| anyhow::anyhow!("`{customer}` is not TENANT/CUSTOMER"))?;
            let store = StateStore::connect(&cfg.redis, Metrics::new(&cfg.metrics)).await?;
            match store.load(&c).await? {
                None => {
                    anyhow::bail!("no state for {c}: no event for this customer has been applied")
                }
                Some(l) => {
                    let params = lapse::service::state_params(&cfg);
                    let now = WallClock.now_ms();
                    let mut v = lapse::inspect::view(&c, l.rev, &l.state, &params, now);
                    let policies = policies(&cfg)?;
                    v["recall"] = serde_json::to_value(lapse::domain::recall::view(
                        &l.state.recall,
                        &l.state.visits,
                        &c,
                        &policies.of(&c.tenant).lapse,
                    ))?;
                    v["timer_due"] = serde_json::json!(l.state.timer_due);
                    let eff = policies.effective(&c, now);
                    let mut a = lapse::inspect::allowance_view(
                        &c,
                        Some(&l.state),
                        &eff.policy,
                        &params,
                        now,
                    );
                    lapse::inspect::add_experiments(
                        &mut a,
                        &c,
                        Some(&l.state),
                        policies.experiments(),
                        now,
                    );
                    v["allowance"] = a["channels"].clone();
                    v["experiments"] = a["experiments"].clone();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    Ok(())
                }
            }
        }
    }
}
