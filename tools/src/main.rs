//! The `lapse-tools` command line: what measures and exercises lapse (the
//! product binary `lapse` has none of it).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use lapse::config::Config;
use lapse_tools::{bench, sample, simulate};

/// The same allocator as `lapse` (the benchmarks' producers and the simulator
/// were measured with it), counting each thread's heap for the memory figures.
#[global_allocator]
static ALLOC: bench::heap::Counting = bench::heap::Counting;

#[derive(Parser)]
#[command(
    name = "lapse-tools",
    version,
    about = "Benchmarks, the clinic simulator, the sample producer and the demo report for lapse."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Produce sample events (all five kinds) to the input topics, for the demo.
    ProduceSample(sample::SampleArgs),
    /// Benchmarks: `bench produce` fills the input topics, `bench consume` measures `lapse run`.
    Bench(bench::BenchArgs),
    /// Simulate clinic traffic (customers, campaigns, visits, recalls) to the input topics.
    Simulate(simulate::SimulateArgs),
    /// The demo's live summary (--watch) and KPI table, from /metrics and recall.outcomes.
    DemoReport(simulate::report::ReportArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    lapse::cli::main(dispatch(cli.cmd))
}

async fn dispatch(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::ProduceSample(args) => {
            let cfg = Config::load(args.config.as_deref())?;
            sample::produce(&cfg, &args).await
        }
        Cmd::Bench(args) => bench::run(args).await,
        Cmd::Simulate(args) => simulate::main(args).await,
        Cmd::DemoReport(args) => simulate::report::main(args).await,
    }
}
