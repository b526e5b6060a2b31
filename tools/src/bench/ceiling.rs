//! `lapse-tools bench ceiling`: the most any consumer can show on this
//! machine. A consumer that only reads the input topics and commits its
//! offsets (no decoding, no Redis, no outputs), with lapse's consumer settings,
//! over what `bench produce` wrote: first record read → last offset committed,
//! as `bench consume` times lapse. What the broker can hand one consumer here
//! bounds lapse's throughput and the ratio to the Python reference.

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use super::machine::{self, Machine};
use lapse::config::Config;

#[derive(clap::Args, Debug, Clone)]
pub struct CeilingArgs {
    /// Records the input topics hold (what `bench produce` wrote).
    #[arg(long)]
    pub expect: u64,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// lapse config: brokers, topic names, consumer properties (LAPSE_* overrides apply).
    #[arg(long, short)]
    pub config: Option<std::path::PathBuf>,
    /// Process id of the broker on this machine, to report its CPU use.
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CeilingRun {
    pub records: u64,
    pub payload_bytes: u64,
    /// First record read → last offset committed.
    pub seconds: f64,
    pub events_per_second: f64,
    /// CPU of this consumer (the benchmark process) per event, µs.
    pub consumer_cpu_us_per_event: Option<f64>,
    /// CPU of the broker per event, µs.
    pub broker_cpu_us_per_event: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CeilingReport {
    pub machine: Machine,
    pub runs: Vec<CeilingRun>,
    pub median_events_per_second: f64,
}

/// lapse's consumer settings with a group of the run's own, so each run
/// reads everything from the start.
fn consumer_config(cfg: &Config, group: &str) -> ClientConfig {
    let mut cc = lapse::kafka::consumer::client_config(&cfg.kafka);
    cc.set("group.id", group)
        .set("client.id", "lapse-bench-ceiling");
    cc
}

/// The next offset to read of each partition seen: a short list searched in
/// place, so the read loop allocates nothing per record (the ceiling is the
/// lightest consumer).
type NextOffsets = Vec<((String, i32), i64)>;

/// Records that `offset` of `topic`/`partition` was read.
fn advance(next: &mut NextOffsets, topic: &str, partition: i32, offset: i64) {
    match next
        .iter_mut()
        .find(|((t, p), _)| *p == partition && t == topic)
    {
        Some((_, o)) => *o = offset + 1,
        None => next.push(((topic.to_string(), partition), offset + 1)),
    }
}

/// The next offset to read of every partition seen, as a commit.
fn commit_list(next: &NextOffsets) -> anyhow::Result<TopicPartitionList> {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
    }
    Ok(tpl)
}

fn one_run(args: &CeilingArgs, cfg: &Config, run: usize) -> anyhow::Result<CeilingRun> {
    let group = format!("lapse-bench-ceiling-{}-{run}", std::process::id());
    let consumer: BaseConsumer = consumer_config(cfg, &group)
        .create()
        .context("creating the consumer (kafka.brokers)")?;
    let topics = cfg.kafka.topics.inputs();
    consumer
        .subscribe(&topics)
        .context("subscribing to the input topics")?;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut next = NextOffsets::new();
    let (mut records, mut bytes) = (0u64, 0u64);
    let mut first: Option<(Instant, Option<f64>, Option<f64>)> = None;
    let mut last_commit = Instant::now();
    while records < args.expect {
        anyhow::ensure!(
            Instant::now() < deadline,
            "run {run}: {records} of {} records read after {} s (--timeout-secs)",
            args.expect,
            args.timeout_secs
        );
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m.context("reading the input topics")?;
        first.get_or_insert_with(|| {
            (
                Instant::now(),
                machine::process_cpu_seconds(std::process::id()),
                args.broker_pid.and_then(machine::process_cpu_seconds),
            )
        });
        records += 1;
        bytes += m.payload_len() as u64;
        advance(&mut next, m.topic(), m.partition(), m.offset());
        // Committed as often as lapse commits by default (`kafka.commit_interval`).
        if last_commit.elapsed() >= cfg.kafka.commit_interval.0 {
            consumer.commit(&commit_list(&next)?, CommitMode::Async)?;
            last_commit = Instant::now();
        }
    }
    consumer
        .commit(&commit_list(&next)?, CommitMode::Sync)
        .context("committing the last offsets")?;
    let (start, self_cpu, broker_cpu) = first.context("no record read")?;
    let seconds = start.elapsed().as_secs_f64();
    let per_event =
        |before: Option<f64>, after: Option<f64>| Some((after? - before?) / records as f64 * 1e6);
    Ok(CeilingRun {
        records,
        payload_bytes: bytes,
        seconds,
        events_per_second: records as f64 / seconds,
        consumer_cpu_us_per_event: per_event(
            self_cpu,
            machine::process_cpu_seconds(std::process::id()),
        ),
        broker_cpu_us_per_event: per_event(
            broker_cpu,
            args.broker_pid.and_then(machine::process_cpu_seconds),
        ),
    })
}

pub fn run(args: &CeilingArgs) -> anyhow::Result<CeilingReport> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    let cfg = Config::load(args.config.as_deref())?;
    let machine = Machine::describe();
    println!("== ceiling: a consumer that only reads and commits (no decoding, no Redis, no outputs); NOT lapse");
    println!("machine: {}", machine.one_line());
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let r = one_run(args, &cfg, run)?;
        println!(
            "run {run}: {:.0} events/s read and committed ({} records, {:.1} MB of payload, {:.2} s); CPU per event: this consumer {} µs, broker {} µs",
            r.events_per_second,
            r.records,
            r.payload_bytes as f64 / 1e6,
            r.seconds,
            super::opt(r.consumer_cpu_us_per_event, 2),
            super::opt(r.broker_cpu_us_per_event, 2),
        );
        runs.push(r);
    }
    let rates: Vec<f64> = runs.iter().map(|r| r.events_per_second).collect();
    let report = CeilingReport {
        machine,
        median_events_per_second: super::median(&rates),
        runs,
    };
    println!(
        "median: {:.0} events/s: no consumer reads and commits these events faster on this machine",
        report.median_events_per_second
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commit_names_the_next_offset_of_every_partition_seen() {
        let mut next = NextOffsets::new();
        advance(&mut next, "a", 0, 3);
        advance(&mut next, "b", 3, 0);
        advance(&mut next, "a", 0, 4);
        let tpl = commit_list(&next).unwrap();
        assert_eq!(tpl.count(), 2);
        assert_eq!(
            tpl.find_partition("a", 0).map(|e| e.offset()),
            Some(Offset::Offset(5))
        );
        assert_eq!(
            tpl.find_partition("b", 3).map(|e| e.offset()),
            Some(Offset::Offset(1))
        );
    }
}
