//! `lapse-tools bench produce`: fills the five input topics with a synthetic workload,
//! Avro single-object encoded, as fast as the broker takes it.
//!
//! Generation and encoding run on their own thread and hand chunks over a small
//! bounded channel; the async side enqueues into librdkafka (batched, lz4) and
//! keeps at most `--max-in-flight` delivery reports outstanding.

use lapse::domain::event::INPUT_KINDS;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;

use super::workload::{Workload, WorkloadSpec};
use lapse::codec::{Encoder, Framing, SchemaSet};
use lapse::config::Config;
use lapse::domain::event::EventKind;

#[derive(clap::Args, Debug, Clone)]
pub struct ProduceArgs {
    /// Events to produce (all five kinds, see `bench::workload::MIX_PER_MILLE`).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Distinct customers the events are spread over.
    #[arg(long, default_value_t = 100_000)]
    pub customers: u64,
    /// Tenants (clinic brands) the customers belong to.
    #[arg(long, default_value_t = 4)]
    pub tenants: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Event times are spread over this many days before now.
    #[arg(long, default_value_t = 180)]
    pub days: i64,
    /// lapse config: brokers, topic names, schema dir (LAPSE_* overrides apply).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Delivery reports awaited at most at once.
    #[arg(long, default_value_t = 200_000)]
    pub max_in_flight: usize,
    /// Extra librdkafka producer setting KEY=VALUE (repeatable), applied last.
    #[arg(long = "producer-property", value_name = "KEY=VALUE")]
    pub producer_properties: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProduceReport {
    pub events: u64,
    pub per_kind: [u64; INPUT_KINDS],
    pub payload_bytes: u64,
    pub seconds: f64,
    pub events_per_second: f64,
}

/// One encoded record on its way to the producer.
struct Encoded {
    kind: EventKind,
    key: String,
    payload: Vec<u8>,
}

const CHUNK: usize = 4096;

pub fn producer_config(cfg: &Config, extra: &[String]) -> anyhow::Result<ClientConfig> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("client.id", "lapse-bench-producer")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("batch.size", "4000000")
        .set("queue.buffering.max.messages", "500000")
        .set("queue.buffering.max.kbytes", "524288")
        .set("message.timeout.ms", "300000");
    for (k, v) in &cfg.kafka.producer_properties {
        cc.set(k, v);
    }
    for kv in extra {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--producer-property {kv:?}: expected KEY=VALUE"))?;
        cc.set(k.trim(), v.trim());
    }
    Ok(cc)
}

pub async fn run(args: &ProduceArgs) -> anyhow::Result<ProduceReport> {
    anyhow::ensure!(args.customers > 0, "--customers must be at least 1");
    anyhow::ensure!(args.tenants > 0, "--tenants must be at least 1");
    anyhow::ensure!(args.days > 0, "--days must be at least 1");
    anyhow::ensure!(args.max_in_flight > 0, "--max-in-flight must be at least 1");
    let cfg = Config::load(args.config.as_deref())?;
    let schemas = SchemaSet::load(&cfg.schema.dir).with_context(|| {
        format!(
            "loading schemas from {} (config key schema.dir)",
            cfg.schema.dir.display()
        )
    })?;
    if cfg.kafka.create_topics {
        lapse::kafka::admin::ensure_topics(&cfg.kafka)
            .await
            .context("creating the input topics (kafka.create_topics)")?;
    }
    let producer: FutureProducer = producer_config(&cfg, &args.producer_properties)?
        .create()
        .context("creating the producer (kafka.brokers)")?;
    let topics: Vec<String> = cfg
        .kafka
        .topics
        .inputs()
        .iter()
        .map(|t| t.to_string())
        .collect();

    let spec = WorkloadSpec {
        events: args.events,
        customers: args.customers,
        tenants: args.tenants,
        seed: args.seed,
        days: args.days,
        now_ms: chrono::Utc::now().timestamp_millis(),
    };
    eprintln!(
        "bench produce: {} events for {} customers of {} tenants (seed {}) -> {}",
        args.events,
        args.customers,
        args.tenants,
        args.seed,
        topics.join(", ")
    );

    // Generate and encode on a thread of its own; chunks travel over a bounded channel.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Encoded>>(8);
    let encoder_thread = std::thread::Builder::new()
        .name("bench-encode".into())
        .spawn(move || -> anyhow::Result<()> {
            let encoder = Encoder::new(&schemas);
            let mut chunk = Vec::with_capacity(CHUNK);
            for g in Workload::new(spec) {
                let payload = encoder
                    .encode_event(&g.event, g.text, Framing::SingleObject)
                    .context("encoding a benchmark event")?;
                chunk.push(Encoded {
                    kind: g.event.kind(),
                    key: g.event.customer.key(),
                    payload,
                });
                if chunk.len() == CHUNK {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK));
                    if tx.blocking_send(full).is_err() {
                        return Ok(()); // the producing side stopped (and says why)
                    }
                }
            }
            if !chunk.is_empty() {
                let _ = tx.blocking_send(chunk);
            }
            Ok(())
        })
        .context("spawning the encoder thread")?;

    let mut per_kind = [0u64; INPUT_KINDS];
    let mut bytes = 0u64;
    let mut inflight: FuturesUnordered<DeliveryFuture> = FuturesUnordered::new();
    let mut started: Option<Instant> = None;
    let mut last_report = Instant::now();
    let mut acked = 0u64;
    while let Some(chunk) = rx.recv().await {
        started.get_or_insert_with(Instant::now);
        for e in chunk {
            let mut rec = FutureRecord::to(&topics[e.kind.index()])
                .key(e.key.as_str())
                .payload(e.payload.as_slice());
            loop {
                match producer.send_result(rec) {
                    Ok(f) => {
                        inflight.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        rec = r;
                        if !settle_one(&mut inflight).await? {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        } else {
                            acked += 1;
                        }
                    }
                    Err((e, _)) => return Err(anyhow::anyhow!("producing: {e}")),
                }
            }
            per_kind[e.kind.index()] += 1;
            bytes += e.payload.len() as u64;
            while inflight.len() >= args.max_in_flight {
                settle_one(&mut inflight).await?;
                acked += 1;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            let secs = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
            eprintln!(
                "bench produce: {acked} acknowledged after {secs:.1}s ({:.0} events/s)",
                acked as f64 / secs.max(1e-9)
            );
            last_report = Instant::now();
        }
    }
    while settle_one(&mut inflight).await? {}
    let seconds = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
    encoder_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the encoder thread panicked"))??;

    let events: u64 = per_kind.iter().sum();
    anyhow::ensure!(
        events == args.events,
        "produced {events} of {} events",
        args.events
    );
    Ok(ProduceReport {
        events,
        per_kind,
        payload_bytes: bytes,
        seconds,
        events_per_second: events as f64 / seconds.max(1e-9),
    })
}

/// Awaits one delivery report; `false` when none is outstanding.
async fn settle_one(inflight: &mut FuturesUnordered<DeliveryFuture>) -> anyhow::Result<bool> {
    match inflight.next().await {
        None => Ok(false),
        Some(Ok(Ok(_))) => Ok(true),
        Some(Ok(Err((e, _)))) => Err(anyhow::anyhow!("delivery failed: {e}")),
        Some(Err(_)) => Err(anyhow::anyhow!(
            "delivery report lost (producer dropped the message)"
        )),
    }
}

pub fn print(report: &ProduceReport, topics: &[&str; INPUT_KINDS]) {
    for k in EventKind::ALL {
        println!(
            "  {:>9} {:<6} -> {}",
            report.per_kind[k.index()],
            k.label(),
            topics[k.index()]
        );
    }
    println!(
        "produced {} events ({:.1} MB of Avro payload) in {:.2} s: {:.0} events/s",
        report.events,
        report.payload_bytes as f64 / 1e6,
        report.seconds,
        report.events_per_second
    );
}
