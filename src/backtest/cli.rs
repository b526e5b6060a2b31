//! `lapse backtest` from the command line: loads the policies and the
//! history, replays, prints.

use std::path::PathBuf;

use anyhow::Context;

use super::source::{self, Filter};
use super::{Candidate, Comparison};
use crate::config::Config;
use crate::domain::clock::Clock;
use crate::domain::policy::Policies;
use crate::wall_clock::WallClock;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Config with the proposed `[policy]` (and `[state]`) sections.
    #[arg(long)]
    pub policy: PathBuf,
    /// Config with the current policy (default: the `--config` file's, or the defaults).
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// `kafka` (the input topics of `--config`, read-only) or export files /
    /// directories (`*.jsonl`, `*.avro`), comma-separated.
    #[arg(long)]
    pub from: String,
    /// Connection, topics and schemas (Kafka source, registry).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Event time from (RFC 3339), inclusive.
    #[arg(long)]
    pub since: Option<String>,
    /// Event time until (RFC 3339), exclusive.
    #[arg(long)]
    pub until: Option<String>,
    /// Only this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Print JSON instead of the table.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print the per channel and week rows as CSV.
    #[arg(long)]
    pub csv: bool,
    /// List up to N example customers per channel whose blocked sends differ.
    #[arg(long, default_value_t = 0)]
    pub sample: usize,
    /// Show customer ids in samples (hashed otherwise).
    #[arg(long)]
    pub show_ids: bool,
}

fn candidate(name: &str, cfg: &Config) -> anyhow::Result<Candidate> {
    let policies = Policies::new(&cfg.policy)
        .map_err(|(k, m)| anyhow::anyhow!("{name} policy: config key `{k}`: {m}"))?;
    Ok(Candidate {
        name: name.to_string(),
        policies,
        params: crate::service::state_params(cfg),
    })
}

fn instant(key: &str, v: &Option<String>) -> anyhow::Result<Option<i64>> {
    v.as_deref()
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.timestamp_millis())
                .with_context(|| {
                    format!(
                        "--{key} `{s}`: expected an RFC 3339 time, e.g. 2026-09-01T00:00:00+08:00"
                    )
                })
        })
        .transpose()
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let base_cfg = Config::load(a.config.as_deref())?;
    let proposed_cfg = Config::load(Some(&a.policy))
        .with_context(|| format!("--policy {}", a.policy.display()))?;
    let baseline_cfg = match &a.baseline {
        Some(p) => Config::load(Some(p)).with_context(|| format!("--baseline {}", p.display()))?,
        None => base_cfg.clone(),
    };
    let candidates = [
        candidate("baseline", &baseline_cfg)?,
        candidate("proposed", &proposed_cfg)?,
    ];
    let filter = Filter {
        since: instant("since", &a.since)?,
        until: instant("until", &a.until)?,
        tenant: a.tenant.clone(),
    };
    let decoder = crate::service::build_decoder(&base_cfg)?;
    let now = WallClock.now_ms();
    let started = std::time::Instant::now();
    let history = if a.from == "kafka" {
        source::from_kafka(&base_cfg.kafka, &decoder, &filter, now).await?
    } else {
        let paths: Vec<PathBuf> = a.from.split(',').map(PathBuf::from).collect();
        source::from_files(&paths, &decoder, &filter, now)
    };
    eprintln!(
        "backtest: {} records loaded in {:.1} s ({} unusable)",
        history.events.len(),
        started.elapsed().as_secs_f64(),
        history.bad.values().sum::<u64>()
    );
    if history.events.is_empty() {
        let why: Vec<String> = history
            .bad
            .iter()
            .map(|(r, n)| format!("{r}: {n}"))
            .collect();
        anyhow::bail!(
            "no record to replay from `{}` ({} read, {} outside the range or tenant; unusable: {})",
            a.from,
            history.read,
            history.filtered,
            if why.is_empty() {
                "none".to_string()
            } else {
                why.join(", ")
            }
        );
    }
    // The tenants' own population histograms for best contact hours.
    let hours = super::hours::engagement_by_hour(
        history.events.iter().map(|(ev, _, _)| ev),
        &candidates[0].policies,
    );
    for (tenant, counts) in &hours {
        eprintln!(
            "backtest: {tenant}: {} engagements by local hour; for [policy.tenants.{tenant}.contact_hours]: {}",
            counts.iter().sum::<u64>(),
            super::hours::population_line(counts)
        );
    }
    let stop = super::stop_on_ctrl_c();
    let mut reports = Vec::new();
    let mut interrupted = false;
    for c in &candidates {
        let t = std::time::Instant::now();
        let mut progress = |i: usize, n: usize| {
            eprint!(
                "\r{}: {i}/{n} records ({:.0}%)   ",
                c.name,
                100.0 * i as f64 / n.max(1) as f64
            );
        };
        let (r, stopped) = super::run(&history, c, false, &stop, &mut progress);
        eprintln!(
            "\r{}: {} records replayed in {:.2} s{}          ",
            c.name,
            history.events.len(),
            t.elapsed().as_secs_f64(),
            if stopped { " (interrupted)" } else { "" }
        );
        reports.push(r);
        if stopped {
            interrupted = true;
            break;
        }
    }
    let comparison = Comparison {
        records_read: history.read,
        records_replayed: history.events.len(),
        records_outside_range: history.filtered,
        records_unusable: &history.bad,
        interrupted,
        policies: candidates
            .iter()
            .zip(&reports)
            .map(|(c, r)| (c.name.as_str(), r))
            .collect(),
    };
    let samples = match &comparison.policies[..] {
        [a_, b_] if a.sample > 0 => super::samples(*a_, *b_, a.sample, a.show_ids),
        _ => Vec::new(),
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        let mut v = serde_json::to_value(&comparison)?;
        v["samples"] = serde_json::json!(samples);
        serde_json::to_writer_pretty(&mut out, &v)?;
        writeln_flush(&mut out)?;
    } else if a.csv {
        super::print_csv(&mut out, &comparison)?;
    } else {
        super::print_table(&mut out, &comparison, &samples)?;
    }
    if interrupted {
        anyhow::bail!("interrupted: the report above covers part of the history");
    }
    Ok(())
}

fn writeln_flush(out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(out)?;
    out.flush()
}
