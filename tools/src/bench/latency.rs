//! `lapse-tools bench latency`: decision latency of the real service under a fixed load.
//!
//! What is measured: from a send being handed to the producer (librdkafka's
//! enqueue, i.e. `send` returning) to the throttle decision it causes being read
//! back from `engagement.throttle` by this process. Everything in between is in
//! the figure: the broker append, lapse's fetch, its batch accumulation
//! (`batch.max_wait`), its batch queue, the batch itself (decode, Redis load,
//! fold, Redis CAS write, producing the decision and waiting for its
//! acknowledgement) and this process's fetch of the decision. Each probe also
//! gets a breakdown: send → broker ack, send → the decision record's timestamp
//! (set by lapse's producer), and that timestamp → read here.
//!
//! Each run, with a fresh consumer group (its offsets committed at the current
//! end of every input partition before lapse starts, or topics of its own with
//! `--fresh-topics`) and a flushed Redis:
//!
//! * the release `lapse run` is started as a child process, as in `bench consume`;
//! * a reader assigned to every partition of `engagement.throttle` at its end
//!   (no group, `--reader-fetch-wait-ms`) is started before any load;
//! * one thread produces `--rate` events/s to the five input topics, paced in
//!   `--slice-ms` slices. The background is the `bench::workload` mix (all five
//!   kinds), encoded once before the first run and stamped with event time =
//!   now as it is produced (`--linger-ms`). A `--probe-share` of the slots are
//!   probe pairs, sent by a producer of their own (`--probe-linger-ms`): two
//!   MARKETING WECHAT sends to a customer never seen before, `--probe-gap-ms`
//!   apart. The WECHAT cap is 2 per day, so the second send makes the channel
//!   CAPPED and lapse publishes a decision whose `cause_event_id` is that
//!   send's event id. WECHAT quiet hours only move that decision's
//!   `allowed_from`, never whether or when it is published, so they stay on;
//! * the first `--warmup` seconds are excluded from every figure; the next
//!   `--duration` seconds are measured; then the load stops and the run waits
//!   (at most `--drain-secs`) for the decisions still outstanding and for lapse
//!   to apply everything produced. A probe without a decision by then is
//!   reported as missing, never dropped silently.
//!
//! Whether lapse kept up is judged from its backlog, sampled every
//! `--scrape-interval-ms` over the measured window: events acknowledged by the
//! broker minus `lapse_batch_records_sum` (records applied and durable). If it
//! grows, the latency figure only says how long the queue had become: the
//! verdict then reads "did not sustain RATE".
//!
//! On tansu (the broker of `scripts/bench`) two broker traits weigh on the
//! figure: a fetch that finds data still sleeps before answering (half the
//! remaining `fetch.wait.max.ms` above 250 ms, all of it below), so lapse's
//! librdkafka default of 500 ms puts a ~250 ms fetch cycle in front of every
//! event; and its in-memory storage lists every stored batch of a partition on
//! each fetch, so the broker's CPU grows with the batches stored (hence the
//! batched background producer and `--fresh-topics`).

use lapse::domain::event::INPUT_KINDS;
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use apache_avro::types::Value;
use apache_avro::Schema;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::Serialize;

use super::child::LapseChild;
use super::consume::{effective_config, KafkaView, RedisView, Tp};
use super::machine::{self, Machine};
use super::prom::{self, Scrape};
use super::workload::{Workload, WorkloadSpec};
use super::CpuCounters;
use super::{opt, percentile, Stats};
use lapse::codec::{parse_frame, Encoder, Framing, SchemaSet, THROTTLE_EVENT};
use lapse::config::Config;
use lapse::domain::event::{Channel, CustomerRef, Event, EventBody, Purpose};
use lapse::domain::policy::Policies;

#[derive(clap::Args, Debug, Clone)]
pub struct LatencyArgs {
    /// Events per second produced to the five input topics, probes included.
    #[arg(long, default_value_t = 20_000.0)]
    pub rate: f64,
    /// Seconds measured (after the warm-up).
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Seconds of load before the measurement starts, excluded from every figure.
    #[arg(long, default_value_t = 10)]
    pub warmup: u64,
    /// Runs; each percentile is reported as the median over the runs.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Share of the rate that is probe sends (pairs of MARKETING WECHAT sends
    /// to fresh customers; the second one's decision is timed).
    #[arg(long, default_value_t = 0.02)]
    pub probe_share: f64,
    /// Milliseconds between a probe's first and second send.
    #[arg(long, default_value_t = 100)]
    pub probe_gap_ms: u64,
    /// Distinct customers of the background load.
    #[arg(long, default_value_t = 100_000)]
    pub customers: u64,
    /// Tenants (clinic brands) of the background load and the probes.
    #[arg(long, default_value_t = 4)]
    pub tenants: u64,
    /// Seed of the background load (the same stream every run).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Pacing slice: the events due are produced every this many milliseconds.
    #[arg(long, default_value_t = 5)]
    pub slice_ms: u64,
    /// `linger.ms` of the background load's producer: fewer, bigger batches
    /// (tansu's fetch cost grows with the batches stored); the probes have a
    /// producer of their own.
    #[arg(long, default_value_t = 200)]
    pub linger_ms: u64,
    /// `linger.ms` of the probes' producer (counted in the latency).
    #[arg(long, default_value_t = 0)]
    pub probe_linger_ms: u64,
    /// Produce each run into topics of its own: the configured names with a
    /// run suffix, created before lapse starts, so no run reads (or makes the
    /// broker search through) another run's records. For scratch brokers.
    #[arg(long)]
    pub fresh_topics: bool,
    /// Extra librdkafka setting KEY=VALUE for both load producers (repeatable), applied last.
    #[arg(long = "producer-property", value_name = "KEY=VALUE")]
    pub producer_properties: Vec<String>,
    /// `fetch.wait.max.ms` of this process's reader of the throttle topic.
    #[arg(long, default_value_t = 10)]
    pub reader_fetch_wait_ms: u64,
    /// After the load stops, wait at most this many seconds for outstanding
    /// decisions and for lapse to apply everything produced.
    #[arg(long, default_value_t = 30)]
    pub drain_secs: u64,
    /// Give up when lapse has not joined the group this many seconds after its start.
    #[arg(long, default_value_t = 120)]
    pub startup_timeout_secs: u64,
    /// How often /metrics is read during the run (backlog samples), in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub scrape_interval_ms: u64,
    #[command(flatten)]
    pub child: super::ChildArgs,
}

// ---------------------------------------------------------------------------
// Pure parts: percentiles, pacing, probe ids, the backlog trend and the verdict.

/// A latency distribution in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Latency {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    /// `None` without samples; NaN samples are ignored.
    pub fn of(samples: &[f64]) -> Option<Latency> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let p = |q| percentile(&v, q).expect("non-empty");
        Some(Latency {
            count: v.len(),
            p50: p(0.5),
            p90: p(0.9),
            p99: p(0.99),
            p999: p(0.999),
            max: *v.last().expect("non-empty"),
            mean: v.iter().sum::<f64>() / v.len() as f64,
        })
    }
}

/// Events due `elapsed_secs` after the start at `rate` events/s (a token bucket
/// refilled continuously, drained every slice).
pub fn due_events(rate: f64, elapsed_secs: f64) -> u64 {
    if rate <= 0.0 || elapsed_secs <= 0.0 {
        return 0;
    }
    (rate * elapsed_secs).floor() as u64
}

/// Whether slot `n` (0-based, over every event produced) starts a probe pair:
/// exactly `floor(n × pair_share)` pairs start in the first `n` slots, evenly spread.
pub fn is_pair_start(n: u64, pair_share: f64) -> bool {
    if pair_share <= 0.0 {
        return false;
    }
    ((n + 1) as f64 * pair_share).floor() > (n as f64 * pair_share).floor()
}

/// What every probe customer id of a run starts with.
pub fn probe_customer_prefix(tag: &str) -> String {
    format!("probe-{tag}-")
}

/// The customer id of probe `i` (a customer lapse has never seen).
pub fn probe_customer(tag: &str, i: u64) -> String {
    format!("{}{i}", probe_customer_prefix(tag))
}

/// The event id of probe `i`'s first (`second == false`) or second send.
pub fn probe_event_id(tag: &str, i: u64, second: bool) -> String {
    format!("lp-{tag}-{i}-{}", if second { 'b' } else { 'a' })
}

/// The probe a `cause_event_id` names, if it is the second send of one of this
/// run's probes (anything else on the topic: `None`).
pub fn parse_probe_event_id(tag: &str, id: &str) -> Option<u64> {
    let rest = id
        .strip_prefix("lp-")?
        .strip_prefix(tag)?
        .strip_prefix('-')?;
    let n = rest.strip_suffix("-b")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Least-squares slope of `(t, y)` samples (y per unit of t); 0 for fewer than two distinct t.
pub fn slope(samples: &[(f64, f64)]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let mt = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.1).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (t, y) in samples {
        num += (t - mt) * (y - my);
        den += (t - mt) * (t - mt);
    }
    if den <= 0.0 {
        0.0
    } else {
        num / den
    }
}

/// The backlog may grow by at most this share of the rate (events/s) over the window ...
const MAX_GROWTH_SHARE: f64 = 0.01;
/// ... and end below this many seconds of input ...
const MAX_END_BACKLOG_SECS: f64 = 2.0;
/// ... and the load generator must reach this share of the target rate.
const MIN_ACHIEVED_SHARE: f64 = 0.97;

/// Why a run's latency figure can or cannot be trusted.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verdict {
    /// lapse applied everything at the target rate without a growing backlog.
    pub sustained: bool,
    /// The load generator itself reached the target rate.
    pub generator_ok: bool,
    pub reasons: Vec<String>,
}

pub fn judge(
    target_rate: f64,
    achieved_rate: f64,
    backlog_growth_per_s: f64,
    end_backlog: f64,
    missing_probes: usize,
) -> Verdict {
    let mut reasons = Vec::new();
    let generator_ok = achieved_rate >= MIN_ACHIEVED_SHARE * target_rate;
    if !generator_ok {
        reasons.push(format!(
            "the load generator reached only {achieved_rate:.0} events/s"
        ));
    }
    let mut sustained = generator_ok;
    if backlog_growth_per_s > MAX_GROWTH_SHARE * target_rate {
        sustained = false;
        reasons.push(format!(
            "lapse's backlog grew by {backlog_growth_per_s:.0} events/s over the measured window"
        ));
    }
    if end_backlog > MAX_END_BACKLOG_SECS * target_rate {
        sustained = false;
        reasons.push(format!(
            "{end_backlog:.0} events ({:.1} s of input) were not yet applied at the end of the window",
            end_backlog / target_rate.max(1e-9)
        ));
    }
    if missing_probes > 0 {
        sustained = false;
        reasons.push(format!("{missing_probes} probes never got a decision"));
    }
    Verdict {
        sustained,
        generator_ok,
        reasons,
    }
}

/// Histogram buckets observed between two scrapes of the same process.
fn window_buckets(before: &Scrape, after: &Scrape, name: &str) -> Vec<(f64, f64)> {
    let b: BTreeMap<u64, f64> = before
        .buckets(name, &[])
        .into_iter()
        .map(|(le, c)| (le.to_bits(), c))
        .collect();
    after
        .buckets(name, &[])
        .into_iter()
        .map(|(le, c)| (le, c - b.get(&le.to_bits()).copied().unwrap_or(0.0)))
        .collect()
}

/// `q`-quantile (ms) of histogram `name` (seconds) over the window between two scrapes.
fn window_quantile_ms(before: &Scrape, after: &Scrape, name: &str, q: f64) -> Option<f64> {
    prom::quantile(&window_buckets(before, after, name), q).map(|s| s * 1000.0)
}

/// Share of the window's observations of histogram `name` at or below `bound`
/// (seconds); `None` without observations or when `bound` is not a bucket bound.
fn window_share_within(before: &Scrape, after: &Scrape, name: &str, bound: f64) -> Option<f64> {
    let buckets = window_buckets(before, after, name);
    let total = buckets.last().map(|(_, c)| *c).filter(|c| *c > 0.0)?;
    let (_, within) = buckets.iter().find(|(le, _)| (*le - bound).abs() < 1e-9)?;
    Some(within / total)
}

/// Mean (ms) of histogram `name` (seconds) over the window.
fn window_mean_ms(before: &Scrape, after: &Scrape, name: &str) -> Option<f64> {
    let d = |k: &str| after.sum(k) - before.sum(k);
    let count = d(&format!("{name}_count"));
    (count > 0.0).then(|| 1000.0 * d(&format!("{name}_sum")) / count)
}

fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

// ---------------------------------------------------------------------------
// The load: one thread, paced; delivery reports counted by the producer context.

struct LoadContext {
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    /// `(probe, acknowledged at)` of probes' second sends.
    probe_acks: Arc<Mutex<Vec<(u64, Instant)>>>,
}

impl ClientContext for LoadContext {}

impl ProducerContext for LoadContext {
    /// 0 for background events and first sends, probe index + 1 for second sends.
    type DeliveryOpaque = usize;

    fn delivery(&self, r: &DeliveryResult<'_>, opaque: usize) {
        let now = Instant::now();
        if r.is_ok() {
            self.acked.fetch_add(1, Ordering::Relaxed);
            if opaque > 0 {
                if let Ok(mut v) = self.probe_acks.lock() {
                    v.push(((opaque - 1) as u64, now));
                }
            }
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Where the `occurred_at` varint sits in a single-object encoded input event:
/// every input schema starts with three strings (`event_id`, `tenant_id`,
/// `customer_id`) followed by `occurred_at` (a long). `(offset, length)`.
pub fn occurred_at_span(payload: &[u8]) -> Option<(usize, usize)> {
    const HEADER: usize = 10;
    let mut pos = HEADER;
    for _ in 0..3 {
        let (len, n) = read_zigzag(payload.get(pos..)?)?;
        let len = usize::try_from(len).ok()?;
        pos = pos.checked_add(n)?.checked_add(len)?;
    }
    let (_, n) = read_zigzag(payload.get(pos..)?)?;
    Some((pos, n))
}

/// An Avro long (zig-zag varint): `(value, bytes read)`.
fn read_zigzag(b: &[u8]) -> Option<(i64, usize)> {
    let mut v: u64 = 0;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((((v >> 1) as i64) ^ -((v & 1) as i64), i + 1));
        }
    }
    None
}

fn write_zigzag(v: i64, out: &mut Vec<u8>) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        if z < 0x80 {
            out.push(z as u8);
            return;
        }
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
}

/// `payload` with `occurred_at` (at `span`) set to `t`, written into `out`.
pub fn stamp_occurred_at(payload: &[u8], span: (usize, usize), t: i64, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&payload[..span.0]);
    write_zigzag(t, out);
    out.extend_from_slice(&payload[span.0 + span.1..]);
}

#[derive(Debug, Clone, Copy)]
struct BgEntry {
    offset: usize,
    key_len: u32,
    payload_len: u32,
    ts_pos: u32,
    ts_len: u8,
    kind: u8,
}

/// One pre-encoded background event.
struct BgEvent<'a> {
    /// `EventKind::index`.
    kind: usize,
    key: &'a [u8],
    payload: &'a [u8],
    /// Where its `occurred_at` is (see `occurred_at_span`).
    span: (usize, usize),
}

/// The background events of a run, generated and Avro-encoded once before the
/// first run (the same events every run): during a run the load thread only
/// stamps the event time into a copy and produces it, so generating and
/// encoding (~10 µs an event) take no CPU from lapse while it is measured.
pub struct Background {
    bytes: Vec<u8>,
    index: Vec<BgEntry>,
}

impl Background {
    pub fn generate(spec: WorkloadSpec, events: usize, encoder: &Encoder) -> anyhow::Result<Self> {
        let mut bytes = Vec::with_capacity(events.saturating_mul(100));
        let mut index = Vec::with_capacity(events);
        for g in Workload::new(spec).take(events) {
            let payload = encoder
                .encode_event(&g.event, g.text, Framing::SingleObject)
                .context("encoding a benchmark event")?;
            let (ts_pos, ts_len) =
                occurred_at_span(&payload).context("locating occurred_at in an encoded event")?;
            let key = g.event.customer.key();
            index.push(BgEntry {
                offset: bytes.len(),
                key_len: u32::try_from(key.len())?,
                payload_len: u32::try_from(payload.len())?,
                ts_pos: u32::try_from(ts_pos)?,
                ts_len: u8::try_from(ts_len)?,
                kind: g.event.kind().index() as u8,
            });
            bytes.extend_from_slice(key.as_bytes());
            bytes.extend_from_slice(&payload);
        }
        Ok(Background { bytes, index })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Event `i`.
    fn get(&self, i: usize) -> Option<BgEvent<'_>> {
        let e = self.index.get(i)?;
        let k = e.offset + e.key_len as usize;
        Some(BgEvent {
            kind: usize::from(e.kind),
            key: &self.bytes[e.offset..k],
            payload: &self.bytes[k..k + e.payload_len as usize],
            span: (e.ts_pos as usize, usize::from(e.ts_len)),
        })
    }
}

/// What the load thread needs.
struct LoadPlan {
    rate: f64,
    pair_share: f64,
    gap: Duration,
    slice: Duration,
    start: Instant,
    window_start: Instant,
    end: Instant,
    tag: String,
    tenants: u64,
    topics: [String; INPUT_KINDS],
}

/// A probe's second send.
#[derive(Debug, Clone, Copy)]
struct ProbeSend {
    at: Instant,
    wall_ms: f64,
}

struct LoadOutcome {
    sent: u64,
    sent_in_window: u64,
    per_kind: [u64; INPUT_KINDS],
    pairs_started: u64,
    /// Second sends by probe index (`None`: the load stopped before it was due).
    probes: Vec<Option<ProbeSend>>,
    queue_full_waits: u64,
    /// How far the generator was behind its schedule at the start of each slice.
    behind_ms_max: f64,
    behind_ms_mean: f64,
}

fn probe_send(tag: &str, tenants: u64, i: u64, second: bool, now_ms: i64) -> Event {
    Event {
        event_id: probe_event_id(tag, i, second),
        customer: CustomerRef::new(
            format!("clinic-{}", i % tenants + 1),
            probe_customer(tag, i),
        ),
        occurred_at: now_ms,
        body: EventBody::Send {
            channel: Channel::Wechat,
            message_id: format!("lp-{tag}-{i}-msg-{}", if second { 2 } else { 1 }),
            campaign_id: None,
            purpose: Purpose::Marketing,
            cost: None,
        },
    }
}

/// Produces one record, waiting while librdkafka's queue is full; returns the
/// instant (and wall-clock ms) it was enqueued.
fn produce(
    producer: &ThreadedProducer<LoadContext>,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    opaque: usize,
    queue_full_waits: &mut u64,
) -> anyhow::Result<(Instant, f64)> {
    let mut rec = BaseRecord::with_opaque_to(topic, opaque)
        .key(key)
        .payload(payload);
    loop {
        let at = (Instant::now(), wall_ms());
        match producer.send(rec) {
            Ok(()) => return Ok(at),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                *queue_full_waits += 1;
                rec = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => bail!("producing: {e}"),
        }
    }
}

fn run_load(
    plan: LoadPlan,
    background: Arc<Background>,
    producer: ThreadedProducer<LoadContext>,
    probe_producer: ThreadedProducer<LoadContext>,
    encoder: Encoder,
) -> anyhow::Result<LoadOutcome> {
    let mut out = LoadOutcome {
        sent: 0,
        sent_in_window: 0,
        per_kind: [0; INPUT_KINDS],
        pairs_started: 0,
        probes: Vec::new(),
        queue_full_waits: 0,
        behind_ms_max: 0.0,
        behind_ms_mean: 0.0,
    };
    let mut pending: VecDeque<(Instant, u64)> = VecDeque::new();
    let (mut behind_sum, mut slices) = (0.0, 0u64);
    let mut next_bg = 0usize;
    let mut scratch = Vec::with_capacity(512);
    let mut next_wake = plan.start;
    loop {
        let now = Instant::now();
        if now >= plan.end {
            break;
        }
        let target = due_events(plan.rate, now.duration_since(plan.start).as_secs_f64());
        let behind = target.saturating_sub(out.sent) as f64 * 1000.0 / plan.rate;
        out.behind_ms_max = out.behind_ms_max.max(behind);
        behind_sum += behind;
        slices += 1;
        // Event times: now, never ahead of the wall clock.
        let now_ms = wall_ms() as i64;
        while out.sent < target {
            let slot = out.sent;
            let probe = if is_pair_start(slot, plan.pair_share) {
                let i = out.pairs_started;
                out.pairs_started += 1;
                out.probes.push(None);
                pending.push_back((Instant::now() + plan.gap, i));
                Some((i, false))
            } else if pending.front().is_some_and(|(due, _)| *due <= now) {
                pending.pop_front().map(|(_, i)| (i, true))
            } else {
                None
            };
            let (kind, at) = match probe {
                Some((i, second)) => {
                    let e = probe_send(&plan.tag, plan.tenants, i, second, now_ms);
                    let payload = encoder
                        .encode_event(&e, None, Framing::SingleObject)
                        .context("encoding a probe")?;
                    let key = e.customer.key();
                    let kind = e.kind().index();
                    // Delivery reports of second sends carry the probe index + 1.
                    let opaque = if second { i as usize + 1 } else { 0 };
                    let (at, wall) = produce(
                        &probe_producer,
                        &plan.topics[kind],
                        key.as_bytes(),
                        &payload,
                        opaque,
                        &mut out.queue_full_waits,
                    )?;
                    if second {
                        out.probes[i as usize] = Some(ProbeSend { at, wall_ms: wall });
                    }
                    (kind, at)
                }
                None => {
                    let e = background
                        .get(next_bg)
                        .context("the pre-encoded background load ran out")?;
                    next_bg += 1;
                    stamp_occurred_at(e.payload, e.span, now_ms, &mut scratch);
                    let (at, _) = produce(
                        &producer,
                        &plan.topics[e.kind],
                        e.key,
                        &scratch,
                        0,
                        &mut out.queue_full_waits,
                    )?;
                    (e.kind, at)
                }
            };
            out.sent += 1;
            out.per_kind[kind] += 1;
            if at >= plan.window_start {
                out.sent_in_window += 1;
            }
        }
        next_wake += plan.slice;
        let now = Instant::now();
        if next_wake > now {
            std::thread::sleep(next_wake - now);
        } else {
            next_wake = now; // behind: no burst of catch-up wake-ups
        }
    }
    out.behind_ms_mean = behind_sum / slices.max(1) as f64;
    for p in [&producer, &probe_producer] {
        p.flush(Duration::from_secs(60))
            .context("flushing the load producer")?;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// The reader of the throttle topic.

/// A probe's decision, as read back.
#[derive(Debug, Clone)]
struct Seen {
    probe: u64,
    at: Instant,
    wall_ms: f64,
    /// The decision record's timestamp (set by lapse's producer when it produced it).
    record_ms: Option<i64>,
    state: String,
}

#[derive(Default)]
struct ReaderShared {
    seen: Mutex<Vec<Seen>>,
    records: AtomicU64,
    undecodable: AtomicU64,
}

fn avro_text(v: &Value) -> Option<&str> {
    match v {
        Value::Union(_, b) => avro_text(b),
        Value::String(s) | Value::Enum(_, s) => Some(s),
        _ => None,
    }
}

/// `(cause_event_id, state)` of a `lapse.v1.ThrottleEvent` (either framing).
fn decode_decision(schema: &Schema, payload: &[u8]) -> Option<(String, String)> {
    let body = parse_frame(payload).ok()?.body();
    let Value::Record(fields) = apache_avro::from_avro_datum(schema, &mut &body[..], None).ok()?
    else {
        return None;
    };
    let get = |k: &str| {
        fields
            .iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| avro_text(v))
    };
    Some((
        get("cause_event_id")?.to_string(),
        get("state")?.to_string(),
    ))
}

fn spawn_reader(
    consumer: BaseConsumer,
    schema: Schema,
    tag: String,
    shared: Arc<ReaderShared>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    // Probe decisions are keyed TENANT/probe-TAG-I/WECHAT: only those are decoded.
    let marker = format!("/{}", probe_customer_prefix(&tag)).into_bytes();
    std::thread::Builder::new()
        .name("bench-reader".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(r) = consumer.poll(Duration::from_millis(50)) else {
                    continue;
                };
                let Ok(m) = r else { continue };
                let at = Instant::now();
                shared.records.fetch_add(1, Ordering::Relaxed);
                let key = m.key().unwrap_or_default();
                if !key.windows(marker.len()).any(|w| w == marker.as_slice()) {
                    continue;
                }
                let Some((cause, state)) =
                    decode_decision(&schema, m.payload().unwrap_or_default())
                else {
                    shared.undecodable.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if let Some(probe) = parse_probe_event_id(&tag, &cause) {
                    let seen = Seen {
                        probe,
                        at,
                        wall_ms: wall_ms(),
                        record_ms: m.timestamp().to_millis(),
                        state,
                    };
                    if let Ok(mut v) = shared.seen.lock() {
                        v.push(seen);
                    }
                }
            }
        })
        .context("spawning the reader thread")
}

// ---------------------------------------------------------------------------
// One run.

/// One run's figures (milliseconds unless named otherwise).
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub run: usize,
    pub target_rate: f64,
    /// Events enqueued during the measured window / its length.
    pub achieved_rate: f64,
    pub events_produced: u64,
    pub events_per_kind: [u64; INPUT_KINDS],
    pub failed_deliveries: u64,
    pub producer_queue_full_waits: u64,
    pub generator_behind_ms_max: f64,
    pub generator_behind_ms_mean: f64,
    pub probes_in_window: usize,
    pub probes_decided: usize,
    pub probes_missing: usize,
    /// Probe decisions whose state was not CAPPED (a bug or a policy surprise).
    pub probes_unexpected_state: usize,
    /// Probes whose second send fell in the WECHAT quiet hours of its tenant.
    pub probes_in_quiet_hours: usize,
    /// Send enqueued → decision read (the headline).
    pub latency_ms: Option<Latency>,
    /// Send enqueued → the broker's acknowledgement of the send (this process's producer).
    pub send_ack_ms: Option<Latency>,
    /// Send enqueued → the decision record's timestamp (lapse's producer, wall clock, ms resolution).
    pub send_to_decision_produced_ms: Option<Latency>,
    /// The decision record's timestamp → read here.
    pub decision_produced_to_read_ms: Option<Latency>,
    /// Events acknowledged but not yet applied by lapse, at the end of the window.
    pub backlog_end: f64,
    pub backlog_max: f64,
    pub backlog_growth_per_second: f64,
    /// From the end of the load until lapse had applied every event (None: not within --drain-secs).
    pub drain_seconds: Option<f64>,
    /// `lapse_consumer_lag` summed over partitions at the end of the window
    /// (librdkafka statistics every 5 s; under-counts on tansu).
    pub lapse_consumer_lag_metric: f64,
    pub batches: u64,
    pub mean_batch_records: f64,
    pub batch_ms_p50: Option<f64>,
    pub batch_ms_p99: Option<f64>,
    pub batch_ms_mean: Option<f64>,
    /// lapse's own `lapse_processing_latency_seconds` (event time → durable) over
    /// every event of the window (event time = enqueue time here).
    pub lapse_event_to_durable_ms_p50: Option<f64>,
    pub lapse_event_to_durable_ms_p99: Option<f64>,
    /// lapse's own part (`lapse_record_latency_seconds`): record returned by
    /// the consumer's poll → its batch durable and its decisions acknowledged.
    pub lapse_own_ms_p50: Option<f64>,
    pub lapse_own_ms_p99: Option<f64>,
    pub lapse_own_ms_p999: Option<f64>,
    /// Share of the window's records whose own part took at most 25 ms (a
    /// bucket bound of the histogram: counted, not interpolated).
    #[serde(default)]
    pub lapse_own_within_25ms: Option<f64>,
    pub output_produce_ms_p50: Option<f64>,
    pub output_produce_ms_p99: Option<f64>,
    pub partitions_paused_share: f64,
    /// Share of the window the batch processor(s) spent applying a part
    /// (mean over `batch.processors`).
    #[serde(default)]
    pub processor_busy: Option<f64>,
    /// Redis round-trip time per batch in the window (ms): loads, writes, all calls.
    #[serde(default)]
    pub redis_ms_per_batch: Option<[f64; 3]>,
    pub throttle_records_read: u64,
    pub lapse_cpu_seconds: Option<f64>,
    pub redis_cpu_seconds: Option<f64>,
    pub broker_cpu_seconds: Option<f64>,
    /// This process (load generator, its producer and the reader).
    pub bench_cpu_seconds: Option<f64>,
    pub machine_busy: Option<f64>,
    pub load_average_before: Option<f64>,
    pub verdict: Verdict,
    pub lapse_exit_ok: bool,
}

struct RunEnv<'a> {
    args: &'a LatencyArgs,
    /// The effective config of the runs (before any per-run topic names).
    cfg: &'a Config,
    bin: &'a Path,
    work_dir: &'a Path,
    redis: &'a RedisView,
    schemas: &'a SchemaSet,
    policies: &'a Policies,
    background: Arc<Background>,
}

/// The topic-name lines that give run `tag` topics of its own.
fn fresh_topic_sets(cfg: &Config, tag: &str) -> Vec<String> {
    let t = &cfg.kafka.topics;
    [
        ("sends", &t.sends),
        ("opens", &t.opens),
        ("clicks", &t.clicks),
        ("replies", &t.replies),
        ("visits", &t.visits),
        ("feedback", &t.feedback),
        ("dlq", &t.dlq),
        ("throttle", &t.throttle),
        ("triggers", &t.triggers),
        ("outcomes", &t.outcomes),
    ]
    .into_iter()
    .map(|(k, name)| format!("kafka.topics.{k} = \"{name}.lat-{tag}\""))
    .collect()
}

/// Commits `group`'s offsets at `ends` (the group has no members yet), so a
/// lapse joining it starts at the end of every input partition.
async fn start_group_at(
    kafka: &KafkaView,
    group: &str,
    ends: &BTreeMap<Tp, i64>,
) -> anyhow::Result<()> {
    let (b, g, want) = (kafka.brokers.clone(), group.to_string(), ends.clone());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("group.id", &g)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for ((t, p), end) in &want {
            tpl.add_partition_offset(t, *p, Offset::Offset((*end).max(0)))?;
        }
        c.commit(&tpl, CommitMode::Sync)
            .context("committing the fresh group's start offsets")?;
        Ok(())
    })
    .await??;
    let reader = kafka.group_reader(group)?;
    let got = kafka.committed(&reader).await?;
    let wrong: Vec<String> = ends
        .iter()
        .filter(|(tp, e)| got.get(*tp) != Some(&(**e).max(0)))
        .map(|((t, p), e)| {
            format!(
                "{t}/{p}: want {e}, committed {:?}",
                got.get(&(t.clone(), *p))
            )
        })
        .collect();
    if !wrong.is_empty() {
        bail!(
            "the broker did not keep the start offsets committed for group {group}: {}",
            wrong.join(", ")
        );
    }
    Ok(())
}

/// A consumer of every throttle partition, assigned at its current end.
async fn throttle_reader(kafka: &KafkaView, fetch_wait_ms: u64) -> anyhow::Result<BaseConsumer> {
    let marks = kafka.watermarks().await?;
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set(
            "group.id",
            format!("lapse-bench-latency-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string())
        .set("fetch.min.bytes", "1")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for ((t, p), (_, hi)) in &marks {
        tpl.add_partition_offset(t, *p, Offset::Offset(*hi))?;
    }
    c.assign(&tpl).context("assigning the throttle topic")?;
    Ok(c)
}

async fn one_run(env: &RunEnv<'_>, run: usize) -> anyhow::Result<RunResult> {
    let args = env.args;
    env.redis.flush().await.context("FLUSHDB before the run")?;
    let load_average_before = machine::load_average();
    let stamp = chrono::Utc::now().timestamp_millis();
    let group = format!("lapse-bench-latency-{}-{stamp}-{run}", std::process::id());
    let tag = format!("{}r{run}t{}", std::process::id(), stamp % 1_000_000);

    // The run's config: the runs' one, with topics of its own if asked.
    let mut sets = args.child.set.clone();
    if args.fresh_topics {
        sets.extend(fresh_topic_sets(env.cfg, &tag));
    }
    let run_dir = env.work_dir.join(format!("latency-run-{run}"));
    std::fs::create_dir_all(&run_dir)?;
    let (config_path, run_cfg) = effective_config(args.child.config.as_deref(), &sets, &run_dir)?;
    let cfg = &run_cfg;
    if args.fresh_topics {
        lapse::kafka::admin::ensure_topics(&cfg.kafka)
            .await
            .context("creating the run's topics")?;
    }
    let inputs = KafkaView::new(&cfg.kafka.brokers, &cfg.kafka.topics.inputs()).await?;
    let throttle =
        KafkaView::new(&cfg.kafka.brokers, &[cfg.kafka.topics.throttle.as_str()]).await?;

    // Inputs: lapse starts at their current end; the throttle reader likewise.
    let marks = inputs.watermarks().await?;
    let ends = inputs.true_ends(&marks).await?;
    start_group_at(&inputs, &group, &ends).await?;
    let schema = env
        .schemas
        .by_name(THROTTLE_EVENT)
        .context("the ThrottleEvent schema")?
        .as_ref()
        .clone();
    let reader_shared = Arc::new(ReaderShared::default());
    let stop_reader = Arc::new(AtomicBool::new(false));
    let reader = spawn_reader(
        throttle_reader(&throttle, args.reader_fetch_wait_ms).await?,
        schema,
        tag.clone(),
        reader_shared.clone(),
        stop_reader.clone(),
    )?;
    let stop_reader_guard = StopOnDrop(stop_reader.clone());

    // lapse.
    let log_path = env.work_dir.join(format!("lapse-latency-run-{run}.log"));
    let mut lapse = LapseChild::spawn(env.bin, &config_path, &group, log_path)?;
    let want = inputs.partitions.len() as f64;
    let (startup_seconds, base) = wait_owning(args, &mut lapse, want).await?;
    eprintln!(
        "  run {run}: lapse ready after {startup_seconds:.1} s ({:.0} records read before the load); load starts",
        base.sum("lapse_records_total").abs()
    );

    // The load.
    let acked = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let probe_acks = Arc::new(Mutex::new(Vec::new()));
    let load_producer = |linger: u64, id: &str| -> anyhow::Result<ThreadedProducer<LoadContext>> {
        let mut extra = vec![format!("linger.ms={linger}")];
        extra.extend(args.producer_properties.iter().cloned());
        super::produce::producer_config(cfg, &extra)?
            .set("client.id", id)
            .create_with_context(LoadContext {
                acked: acked.clone(),
                failed: failed.clone(),
                probe_acks: probe_acks.clone(),
            })
            .context("creating a load producer")
    };
    let producer = load_producer(args.linger_ms, "lapse-bench-latency-load")?;
    let probe_producer = load_producer(args.probe_linger_ms, "lapse-bench-latency-probes")?;
    let topics = cfg.kafka.topics.inputs().map(str::to_string);
    let start = Instant::now() + Duration::from_millis(50);
    let window_start = start + Duration::from_secs(args.warmup);
    let window_end = window_start + Duration::from_secs(args.duration);
    let plan = LoadPlan {
        rate: args.rate,
        pair_share: args.probe_share / 2.0,
        gap: Duration::from_millis(args.probe_gap_ms),
        slice: Duration::from_millis(args.slice_ms.max(1)),
        start,
        window_start,
        end: window_end,
        tag: tag.clone(),
        tenants: args.tenants,
        topics,
    };
    let encoder = Encoder::new(env.schemas);
    let background = env.background.clone();
    let load = std::thread::Builder::new()
        .name("bench-load".into())
        .spawn(move || run_load(plan, background, producer, probe_producer, encoder))
        .context("spawning the load thread")?;

    // Observe: backlog samples over the window, CPU and metrics at its edges.
    let backlog = Backlog {
        acked: acked.clone(),
        durable_base: base.sum("lapse_batch_records_sum"),
    };
    let times = (start, window_start, window_end);
    let (w, load) = observe(env, &mut lapse, run, load, &backlog, times, &reader_shared).await?;
    let load_end = Instant::now();
    let outcome = tokio::task::spawn_blocking(move || load.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the load thread panicked"))??;

    // Drain: outstanding decisions of window probes, and every event applied.
    let window_probes: Vec<(u64, ProbeSend)> = outcome
        .probes
        .iter()
        .enumerate()
        .filter_map(|(i, p)| p.map(|p| (i as u64, p)))
        .filter(|(_, p)| p.at >= window_start && p.at < window_end)
        .collect();
    let drain_deadline = load_end + Duration::from_secs(args.drain_secs);
    let drain_seconds = drain(
        &mut lapse,
        &backlog,
        &reader_shared,
        &window_probes,
        load_end,
        drain_deadline,
    )
    .await?;
    stop_reader.store(true, Ordering::Relaxed);
    drop(stop_reader_guard);
    tokio::task::spawn_blocking(move || reader.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))?;

    let lapse_exit_ok = lapse.stop(run).await;

    // Match probes with decisions (the first decision caused by each probe).
    let m = match_probes(env, &window_probes, &reader_shared, &probe_acks)?;

    let (start_scrape, end_scrape) = (&w.start_scrape, &w.end_scrape);
    let d = |k: &str| end_scrape.sum(k) - start_scrape.sum(k);
    let batches = d("lapse_batch_records_count") as u64;
    let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    let window_secs = window_end.duration_since(window_start).as_secs_f64();
    let achieved_rate = outcome.sent_in_window as f64 / window_secs.max(1e-9);
    let growth = slope(&w.samples);
    let verdict = judge(args.rate, achieved_rate, growth, w.backlog_end, m.missing);
    let own = |q| window_quantile_ms(start_scrape, end_scrape, "lapse_record_latency_seconds", q);
    Ok(RunResult {
        run,
        target_rate: args.rate,
        achieved_rate,
        events_produced: outcome.sent,
        events_per_kind: outcome.per_kind,
        failed_deliveries: failed.load(Ordering::Relaxed),
        producer_queue_full_waits: outcome.queue_full_waits,
        generator_behind_ms_max: outcome.behind_ms_max,
        generator_behind_ms_mean: outcome.behind_ms_mean,
        probes_in_window: window_probes.len(),
        probes_decided: window_probes.len() - m.missing,
        probes_missing: m.missing,
        probes_unexpected_state: m.unexpected,
        probes_in_quiet_hours: m.quiet,
        latency_ms: Latency::of(&m.total),
        send_ack_ms: Latency::of(&m.ack),
        send_to_decision_produced_ms: Latency::of(&m.to_out),
        decision_produced_to_read_ms: Latency::of(&m.out_read),
        backlog_end: w.backlog_end,
        backlog_max: w.backlog_max,
        backlog_growth_per_second: growth,
        drain_seconds,
        lapse_consumer_lag_metric: end_scrape.sum("lapse_consumer_lag"),
        batches,
        mean_batch_records: d("lapse_batch_records_sum") / batches.max(1) as f64,
        batch_ms_p50: window_quantile_ms(start_scrape, end_scrape, "lapse_batch_seconds", 0.5),
        batch_ms_p99: window_quantile_ms(start_scrape, end_scrape, "lapse_batch_seconds", 0.99),
        batch_ms_mean: window_mean_ms(start_scrape, end_scrape, "lapse_batch_seconds"),
        lapse_event_to_durable_ms_p50: window_quantile_ms(
            start_scrape,
            end_scrape,
            "lapse_processing_latency_seconds",
            0.5,
        ),
        lapse_event_to_durable_ms_p99: window_quantile_ms(
            start_scrape,
            end_scrape,
            "lapse_processing_latency_seconds",
            0.99,
        ),
        lapse_own_ms_p50: own(0.5),
        lapse_own_ms_p99: own(0.99),
        lapse_own_ms_p999: own(0.999),
        lapse_own_within_25ms: window_share_within(
            start_scrape,
            end_scrape,
            "lapse_record_latency_seconds",
            0.025,
        ),
        output_produce_ms_p50: window_quantile_ms(
            start_scrape,
            end_scrape,
            "lapse_output_produce_seconds",
            0.5,
        ),
        output_produce_ms_p99: window_quantile_ms(
            start_scrape,
            end_scrape,
            "lapse_output_produce_seconds",
            0.99,
        ),
        partitions_paused_share: f64::from(w.paused_scrapes)
            / f64::from(w.scrapes_in_window.max(1)),
        processor_busy: {
            let name = "lapse_batch_processor_busy_seconds_total";
            let processors = end_scrape.by(name, "processor", &[]).len();
            (processors > 0).then(|| d(name) / (processors as f64 * window_secs.max(1e-9)))
        },
        redis_ms_per_batch: (batches > 0)
            .then(|| prom::redis_ms_per_batch(start_scrape, end_scrape, batches)),
        throttle_records_read: reader_shared.records.load(Ordering::Relaxed),
        lapse_cpu_seconds: diff(w.cpu_start.lapse, w.cpu_end.lapse),
        redis_cpu_seconds: diff(w.cpu_start.redis, w.cpu_end.redis),
        broker_cpu_seconds: diff(w.cpu_start.broker, w.cpu_end.broker),
        bench_cpu_seconds: diff(w.cpu_start.bench, w.cpu_end.bench),
        machine_busy: machine::busy_share(w.cpu_start.machine, w.cpu_end.machine),
        load_average_before,
        verdict,
        lapse_exit_ok,
    })
}

/// Waits until lapse owns every input partition (`want`) and is ready, then
/// lets it settle; returns the seconds since it was started and `/metrics` as
/// the load starts.
async fn wait_owning(
    args: &LatencyArgs,
    lapse: &mut LapseChild,
    want: f64,
) -> anyhow::Result<(f64, Scrape)> {
    loop {
        if let Some(status) = lapse.exited()? {
            return Err(lapse.fail(format!("lapse exited early ({status})")));
        }
        if lapse.spawned.elapsed() >= Duration::from_secs(args.startup_timeout_secs) {
            return Err(lapse.fail(format!(
                "lapse did not own the {want} input partitions within {} s",
                args.startup_timeout_secs
            )));
        }
        if let Some(s) = lapse.metrics().await {
            if s.sum("lapse_partitions_assigned") >= want && s.sum("lapse_ready") >= 1.0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let it fetch its committed offsets and settle on empty partitions.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let startup_seconds = lapse.spawned.elapsed().as_secs_f64();
    let base = lapse
        .metrics()
        .await
        .ok_or_else(|| lapse.fail("cannot read /metrics before the load".into()))?;
    Ok((startup_seconds, base))
}

/// Events acknowledged by the broker and not yet durable in lapse.
struct Backlog {
    acked: Arc<AtomicU64>,
    /// `lapse_batch_records_sum` before the load.
    durable_base: f64,
}

impl Backlog {
    fn of(&self, s: &Scrape) -> f64 {
        self.acked.load(Ordering::Relaxed) as f64
            - (s.sum("lapse_batch_records_sum") - self.durable_base)
    }
}

/// What the measurement window saw: metrics and CPU at its edges, backlog samples.
struct Window {
    start_scrape: Scrape,
    cpu_start: CpuCounters,
    end_scrape: Scrape,
    cpu_end: CpuCounters,
    backlog_end: f64,
    backlog_max: f64,
    /// (seconds into the window, backlog).
    samples: Vec<(f64, f64)>,
    scrapes_in_window: u32,
    paused_scrapes: u32,
}

/// Samples the backlog over the window while the load thread produces; CPU and
/// metrics at the window's edges. `times`: (load start, window start, window
/// end). Hands the load thread back once the window has ended.
async fn observe(
    env: &RunEnv<'_>,
    lapse: &mut LapseChild,
    run: usize,
    load: LoadThread,
    backlog_of: &Backlog,
    times: (Instant, Instant, Instant),
    reader_shared: &ReaderShared,
) -> anyhow::Result<(Window, LoadThread)> {
    let (start, window_start, window_end) = times;
    let args = env.args;
    let interval = Duration::from_millis(args.scrape_interval_ms.max(50));
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut backlog_max: f64 = 0.0;
    let (mut scrapes_in_window, mut paused_scrapes) = (0u32, 0u32);
    let mut at_start: Option<(Scrape, CpuCounters)> = None;
    let mut last_report = Instant::now();
    let (end_scrape, cpu_end, backlog_end) = loop {
        let now = Instant::now();
        let mut next = now + interval;
        if at_start.is_none() && window_start > now {
            next = next.min(window_start);
        }
        if window_end > now {
            next = next.min(window_end);
        }
        tokio::time::sleep_until(next.into()).await;
        if let Some(status) = lapse.exited()? {
            return Err(lapse.fail(format!("lapse exited during the load ({status})")));
        }
        if load.is_finished() && Instant::now() < window_end {
            let r = load.join();
            return Err(lapse.fail(format!(
                "the load thread stopped early: {:?}",
                r.map(|r| r.err())
            )));
        }
        let now = Instant::now();
        let Some(s) = lapse.metrics().await else {
            continue;
        };
        let backlog = backlog_of.of(&s);
        if now >= window_start {
            if at_start.is_none() {
                at_start = Some((
                    s.clone(),
                    CpuCounters::now(&[lapse.pid], env.redis, args.child.broker_pid).await,
                ));
            }
            samples.push((now.duration_since(window_start).as_secs_f64(), backlog));
            backlog_max = backlog_max.max(backlog);
            scrapes_in_window += 1;
            if s.sum("lapse_partitions_paused") > 0.0 {
                paused_scrapes += 1;
            }
        }
        if now >= window_end {
            break (
                s,
                CpuCounters::now(&[lapse.pid], env.redis, args.child.broker_pid).await,
                backlog,
            );
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            let t = now.duration_since(start).as_secs_f64();
            eprintln!(
                "  run {run}: t={t:.0}s {} events acknowledged, backlog {backlog:.0}, {} probe decisions read",
                backlog_of.acked.load(Ordering::Relaxed),
                reader_shared.seen.lock().map_or(0, |v| v.len())
            );
            last_report = Instant::now();
        }
    };
    let (start_scrape, cpu_start) = at_start.context("the window never started")?;
    let window = Window {
        start_scrape,
        cpu_start,
        end_scrape,
        cpu_end,
        backlog_end,
        backlog_max,
        samples,
        scrapes_in_window,
        paused_scrapes,
    };
    Ok((window, load))
}

type LoadThread = std::thread::JoinHandle<anyhow::Result<LoadOutcome>>;

/// Drain: waits for the decisions of the window's probes and for every event
/// to be applied, until `deadline`; returns how long after the load ended the
/// backlog reached zero.
async fn drain(
    lapse: &mut LapseChild,
    backlog_of: &Backlog,
    reader_shared: &ReaderShared,
    window_probes: &[(u64, ProbeSend)],
    load_end: Instant,
    drain_deadline: Instant,
) -> anyhow::Result<Option<f64>> {
    let mut drain_seconds = None;
    loop {
        if drain_seconds.is_none() {
            if let Some(s) = lapse.metrics().await {
                if backlog_of.of(&s) <= 0.0 {
                    drain_seconds = Some(load_end.elapsed().as_secs_f64());
                }
            }
        }
        let decided = {
            let seen = reader_shared
                .seen
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?;
            let got: std::collections::HashSet<u64> = seen.iter().map(|s| s.probe).collect();
            window_probes.iter().all(|(i, _)| got.contains(i))
        };
        if (decided && drain_seconds.is_some()) || Instant::now() >= drain_deadline {
            break;
        }
        if let Some(status) = lapse.exited()? {
            return Err(lapse.fail(format!("lapse exited while draining ({status})")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(drain_seconds)
}

/// The window's probes matched with their decisions, in ms.
struct ProbeMatch {
    /// Send → decision read.
    total: Vec<f64>,
    /// Send → broker acknowledgement.
    ack: Vec<f64>,
    /// Send → decision produced (record timestamp), and from there → read.
    to_out: Vec<f64>,
    out_read: Vec<f64>,
    missing: usize,
    /// Decided, but not `CAPPED`.
    unexpected: usize,
    /// Sent in WECHAT quiet hours.
    quiet: usize,
}

/// Matches each probe with the first decision it caused.
fn match_probes(
    env: &RunEnv<'_>,
    window_probes: &[(u64, ProbeSend)],
    reader_shared: &ReaderShared,
    probe_acks: &Mutex<Vec<(u64, Instant)>>,
) -> anyhow::Result<ProbeMatch> {
    let args = env.args;
    let seen = std::mem::take(&mut *reader_shared.seen.lock().expect("reader stopped"));
    let mut first: BTreeMap<u64, Seen> = BTreeMap::new();
    for s in seen {
        first.entry(s.probe).or_insert(s);
    }
    let acks: BTreeMap<u64, Instant> = probe_acks
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
        .copied()
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (mut total, mut ack, mut to_out, mut out_read) = (vec![], vec![], vec![], vec![]);
    let (mut missing, mut unexpected, mut quiet) = (0usize, 0usize, 0usize);
    for (i, p) in window_probes {
        let tenant = format!("clinic-{}", i % args.tenants + 1);
        if env
            .policies
            .of(&tenant)
            .quiet_until(Channel::Wechat, p.wall_ms as i64)
            .is_some()
        {
            quiet += 1;
        }
        if let Some(a) = acks.get(i) {
            ack.push(ms(a.saturating_duration_since(p.at)));
        }
        match first.get(i) {
            None => missing += 1,
            Some(s) => {
                if s.state != "CAPPED" {
                    unexpected += 1;
                }
                total.push(ms(s.at.saturating_duration_since(p.at)));
                if let Some(r) = s.record_ms {
                    to_out.push(r as f64 - p.wall_ms);
                    out_read.push(s.wall_ms - r as f64);
                }
            }
        }
    }
    Ok(ProbeMatch {
        total,
        ack,
        to_out,
        out_read,
        missing,
        unexpected,
        quiet,
    })
}

/// Stops the reader thread if a run ends early with an error.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// The command.

/// Median over the runs of each figure of the headline distribution.
#[derive(Debug, Clone, Serialize)]
pub struct MedianLatency {
    pub p50: Stats,
    pub p90: Stats,
    pub p99: Stats,
    pub p999: Stats,
    pub max: Stats,
    pub mean: Stats,
}

impl MedianLatency {
    fn of(ls: &[Latency]) -> MedianLatency {
        let s = |f: fn(&Latency) -> f64| Stats::of(&ls.iter().map(f).collect::<Vec<_>>());
        MedianLatency {
            p50: s(|l| l.p50),
            p90: s(|l| l.p90),
            p99: s(|l| l.p99),
            p999: s(|l| l.p999),
            max: s(|l| l.max),
            mean: s(|l| l.mean),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    pub machine: Machine,
    pub redis_version: String,
    pub redis_persistence: String,
    pub rate: f64,
    pub duration_seconds: u64,
    pub warmup_seconds: u64,
    pub probe_share: f64,
    pub probe_gap_ms: u64,
    pub customers: u64,
    pub config_overrides: Vec<String>,
    /// The lapse settings that shape latency, as in effect.
    pub lapse_settings: Vec<String>,
    /// The load producer's and the reader's settings.
    pub bench_settings: Vec<String>,
    pub quiet_hours: String,
    pub runs: Vec<RunResult>,
    /// Every run sustained the rate.
    pub sustained: bool,
    pub verdict: String,
    /// Median over the runs (of the runs that have decisions).
    pub latency_ms: Option<MedianLatency>,
}

fn lapse_settings(cfg: &Config) -> Vec<String> {
    let mut v = vec![
        format!("batch.max_records={}", cfg.batch.max_records),
        format!("batch.max_wait={:?}", cfg.batch.max_wait.0),
        format!("batch.queue_depth={}", cfg.batch.queue_depth),
        format!("kafka.commit_interval={:?}", cfg.kafka.commit_interval.0),
        "output producer linger.ms=5 (built in)".to_string(),
    ];
    for (k, val) in &cfg.kafka.consumer_properties {
        v.push(format!("kafka.consumer_properties.{k}={val}"));
    }
    for (k, val) in &cfg.kafka.producer_properties {
        v.push(format!("kafka.producer_properties.{k}={val}"));
    }
    v
}

fn quiet_hours_note(cfg: &Config) -> String {
    match cfg.policy.quiet_hours.get(&Channel::Wechat) {
        Some(q) => format!(
            "policy.quiet_hours.WECHAT {}-{} ({}) left in force: it only moves a CAPPED decision's \
             allowed_from past the quiet period, never whether or when the decision is published, \
             so the probes need no override",
            q.start, q.end, cfg.policy.timezone
        ),
        None => "no WECHAT quiet hours configured".into(),
    }
}

pub async fn run(args: &LatencyArgs) -> anyhow::Result<LatencyReport> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(args.rate > 0.0, "--rate must be positive");
    anyhow::ensure!(args.duration >= 1, "--duration must be at least 1 s");
    anyhow::ensure!(
        args.probe_share > 0.0 && args.probe_share <= 0.5,
        "--probe-share must be in (0, 0.5]"
    );
    anyhow::ensure!(
        args.customers > 0 && args.tenants > 0,
        "--customers and --tenants must be at least 1"
    );
    let work_dir = args.child.work_dir("lapse-bench")?;
    let (config_path, cfg) =
        effective_config(args.child.config.as_deref(), &args.child.set, &work_dir)?;
    anyhow::ensure!(
        cfg.clock.mode == lapse::config::ClockMode::Wall,
        "bench latency needs clock.mode = \"wall\""
    );
    let bin = args.child.lapse_bin()?;
    let schemas = SchemaSet::load(&cfg.schema.dir).with_context(|| {
        format!(
            "loading schemas from {} (config key schema.dir)",
            cfg.schema.dir.display()
        )
    })?;
    let policies = Policies::new(&cfg.policy)
        .map_err(|(key, message)| anyhow::anyhow!("config key `{key}`: {message}"))?;
    let redis = RedisView::connect(&cfg).await?;
    let machine = Machine::describe();
    let redis_version = redis
        .info("server")
        .await
        .ok()
        .and_then(|i| i.get("redis_version").cloned())
        .unwrap_or_else(|| "?".into());
    let redis_persistence = redis.persistence().await;
    let mut bench_settings = vec![
        format!("background producer linger.ms={}", args.linger_ms),
        format!("probe producer linger.ms={}", args.probe_linger_ms),
        "both acks=all, idempotent, lz4".to_string(),
        format!("pacing slice {} ms", args.slice_ms),
        format!(
            "throttle reader fetch.wait.max.ms={}",
            args.reader_fetch_wait_ms
        ),
        if args.fresh_topics {
            "topics of its own per run (configured names + .lat-RUNTAG)".to_string()
        } else {
            "configured topics, each run's group starting at their end".to_string()
        },
    ];
    bench_settings.extend(
        args.producer_properties
            .iter()
            .map(|p| format!("load producers {p}")),
    );

    println!("machine: {}", machine.one_line());
    println!("redis {redis_version}: persistence {redis_persistence}");
    println!(
        "lapse: {} run --config {} (per run: {}/latency-run-N/lapse-bench.toml)",
        bin.display(),
        config_path.display(),
        work_dir.display()
    );
    if !args.child.set.is_empty() {
        println!("config overrides: {}", args.child.set.join("  "));
    }
    println!("lapse settings: {}", lapse_settings(&cfg).join(", "));
    println!("bench settings: {}", bench_settings.join(", "));
    println!("{}", quiet_hours_note(&cfg));
    println!(
        "load: {:.0} events/s ({} customers, {} tenants, all five kinds, event time = now), \
         {:.1}% probe sends (pairs {} ms apart); warm-up {} s, measured {} s, {} runs",
        args.rate,
        args.customers,
        args.tenants,
        args.probe_share * 100.0,
        args.probe_gap_ms,
        args.warmup,
        args.duration,
        args.runs
    );
    println!(
        "work dir (effective config, lapse logs): {}",
        work_dir.display()
    );

    // The background load, generated and encoded once (the same events every run).
    let events = (args.rate * (args.warmup + args.duration + 2) as f64).ceil() as usize;
    let spec = WorkloadSpec {
        events: events as u64,
        customers: args.customers,
        tenants: args.tenants,
        seed: args.seed,
        days: 1,
        now_ms: chrono::Utc::now().timestamp_millis(),
    };
    let encoder = Encoder::new(&schemas);
    let t = Instant::now();
    eprintln!("encoding {events} background events once, before the runs");
    let background =
        tokio::task::spawn_blocking(move || Background::generate(spec, events, &encoder)).await??;
    eprintln!(
        "  {} events, {:.0} MB, in {:.1} s",
        background.len(),
        background.bytes.len() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    let env = RunEnv {
        args,
        cfg: &cfg,
        bin: &bin,
        work_dir: &work_dir,
        redis: &redis,
        schemas: &schemas,
        policies: &policies,
        background: Arc::new(background),
    };
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        eprintln!(
            "run {run}/{}: flushing Redis, starting lapse with a fresh group at the end of the inputs",
            args.runs
        );
        let r = one_run(&env, run).await?;
        print_run(&r);
        runs.push(r);
    }
    let sustained = runs.iter().all(|r| r.verdict.sustained);
    let lat: Vec<Latency> = runs.iter().filter_map(|r| r.latency_ms).collect();
    let verdicts: Vec<(usize, Verdict)> = runs.iter().map(|r| (r.run, r.verdict.clone())).collect();
    let verdict = overall_verdict(args.rate, &verdicts);
    let report = LatencyReport {
        machine,
        redis_version,
        redis_persistence,
        rate: args.rate,
        duration_seconds: args.duration,
        warmup_seconds: args.warmup,
        probe_share: args.probe_share,
        probe_gap_ms: args.probe_gap_ms,
        customers: args.customers,
        config_overrides: args.child.set.clone(),
        lapse_settings: lapse_settings(&cfg),
        bench_settings,
        quiet_hours: quiet_hours_note(&cfg),
        sustained,
        verdict,
        latency_ms: (!lat.is_empty()).then(|| MedianLatency::of(&lat)),
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

fn overall_verdict(rate: f64, runs: &[(usize, Verdict)]) -> String {
    let bad: Vec<String> = runs
        .iter()
        .filter(|(_, v)| !v.sustained)
        .map(|(run, v)| format!("run {run}: {}", v.reasons.join("; ")))
        .collect();
    if bad.is_empty() {
        format!(
            "lapse sustained {rate:.0} events/s in all {} runs (backlog flat, every probe decided)",
            runs.len()
        )
    } else if runs.iter().any(|(_, v)| !v.generator_ok) {
        format!(
            "not measured at {rate:.0} events/s: lapse did not sustain {rate:.0} events/s or the load \
             generator fell short ({}); the latency figures are NOT the latency at this rate",
            bad.join(" | ")
        )
    } else {
        format!(
            "lapse did not sustain {rate:.0} events/s ({}): the latency figures only measure a growing \
             queue and are meaningless at this rate",
            bad.join(" | ")
        )
    }
}

fn dist(l: &Option<Latency>) -> String {
    match l {
        None => "no samples".into(),
        Some(l) => format!(
            "p50 {:.1} p90 {:.1} p99 {:.1} p999 {:.1} max {:.1} mean {:.1} ms (n={})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean, l.count
        ),
    }
}

fn print_run(r: &RunResult) {
    println!(
        "run {}: send -> decision read: {}",
        r.run,
        dist(&r.latency_ms)
    );
    println!(
        "  {}",
        if r.verdict.sustained {
            format!("sustained {:.0} events/s", r.target_rate)
        } else {
            format!(
                "did not sustain {:.0} events/s: {}",
                r.target_rate,
                r.verdict.reasons.join("; ")
            )
        }
    );
    println!(
        "  load: {:.0} events/s achieved (target {:.0}), {} events, {} delivery failures, \
         generator behind schedule max {:.1} ms mean {:.1} ms, {} producer queue-full waits",
        r.achieved_rate,
        r.target_rate,
        r.events_produced,
        r.failed_deliveries,
        r.generator_behind_ms_max,
        r.generator_behind_ms_mean,
        r.producer_queue_full_waits
    );
    println!(
        "  probes: {} in the window, {} decided, {} MISSING, {} not CAPPED, {} sent in WECHAT quiet hours",
        r.probes_in_window,
        r.probes_decided,
        r.probes_missing,
        r.probes_unexpected_state,
        r.probes_in_quiet_hours
    );
    println!("  breakdown: send -> broker ack {}", dist(&r.send_ack_ms));
    println!(
        "             send -> decision produced by lapse (record timestamp) {}",
        dist(&r.send_to_decision_produced_ms)
    );
    println!(
        "             decision produced -> read here {}",
        dist(&r.decision_produced_to_read_ms)
    );
    println!(
        "  lapse's own part (record polled -> batch durable, decisions acked; no fetch wait): p50 {} p99 {} p999 {} ms (target p99 <= 25); within 25 ms: {}",
        opt(r.lapse_own_ms_p50, 1),
        opt(r.lapse_own_ms_p99, 1),
        opt(r.lapse_own_ms_p999, 1),
        r.lapse_own_within_25ms
            .map_or_else(|| "n/a".into(), |s| format!("{:.1}% of records", 100.0 * s)),
    );
    println!(
        "  lapse: backlog at window end {:.0} events (max {:.0}, trend {:+.0} events/s), drained {} after the load; \
         lapse_consumer_lag {:.0}; {} batches (mean {:.0} records), batch ms p50 {} p99 {} mean {}; \
         event time -> durable ms p50 {} p99 {}; decision produce+ack ms p50 {} p99 {}; \
         partitions paused in {:.0}% of scrapes; processor busy {}; redis round trips per batch: {}",
        r.backlog_end,
        r.backlog_max,
        r.backlog_growth_per_second,
        r.drain_seconds
            .map_or_else(|| "NOT".into(), |s| format!("{s:.1} s")),
        r.lapse_consumer_lag_metric,
        r.batches,
        r.mean_batch_records,
        opt(r.batch_ms_p50, 1),
        opt(r.batch_ms_p99, 1),
        opt(r.batch_ms_mean, 1),
        opt(r.lapse_event_to_durable_ms_p50, 1),
        opt(r.lapse_event_to_durable_ms_p99, 1),
        opt(r.output_produce_ms_p50, 1),
        opt(r.output_produce_ms_p99, 1),
        r.partitions_paused_share * 100.0,
        r.processor_busy
            .map_or_else(|| "n/a".into(), |b| format!("{:.0}%", b * 100.0)),
        r.redis_ms_per_batch
            .map_or_else(|| "n/a".into(), prom::show_redis_ms_per_batch),
    );
    println!(
        "  cpu seconds in the window: lapse {} redis {} broker {} bench {}; machine busy {}; \
         1-min load before {}; {} throttle records read; lapse {}",
        opt(r.lapse_cpu_seconds, 1),
        opt(r.redis_cpu_seconds, 1),
        opt(r.broker_cpu_seconds, 1),
        opt(r.bench_cpu_seconds, 1),
        r.machine_busy
            .map_or_else(|| "?".into(), |b| format!("{:.0}%", b * 100.0)),
        opt(r.load_average_before, 2),
        r.throttle_records_read,
        if r.lapse_exit_ok {
            "exited 0 on SIGTERM"
        } else {
            "did NOT exit 0 on SIGTERM"
        }
    );
}

fn print_summary(rep: &LatencyReport) {
    println!();
    println!(
        "== lapse bench latency: {:.0} events/s, {} s measured after {} s warm-up, {} runs",
        rep.rate,
        rep.duration_seconds,
        rep.warmup_seconds,
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
    println!("lapse settings: {}", rep.lapse_settings.join(", "));
    println!("bench settings: {}", rep.bench_settings.join(", "));
    println!("{}", rep.quiet_hours);
    println!(
        "{:>4} {:>8} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>6} {:>6} {:>6} {:>5} {:>5}",
        "run",
        "events/s",
        "probes",
        "missing",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "max ms",
        "mean ms",
        "backlog",
        "trend/s",
        "cpu:lps",
        "redis",
        "broker",
        "bench",
        "busy",
        "kept"
    );
    for r in &rep.runs {
        let l = r.latency_ms;
        let f = |g: fn(&Latency) -> f64| {
            l.as_ref()
                .map_or_else(|| "?".into(), |l| format!("{:.1}", g(l)))
        };
        println!(
            "{:>4} {:>8.0} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8.0} {:>+8.0} {:>6} {:>6} {:>6} {:>6} {:>5} {:>5}",
            r.run,
            r.achieved_rate,
            r.probes_in_window,
            r.probes_missing,
            f(|l| l.p50),
            f(|l| l.p99),
            f(|l| l.p999),
            f(|l| l.max),
            f(|l| l.mean),
            r.backlog_end,
            r.backlog_growth_per_second,
            opt(r.lapse_cpu_seconds, 1),
            opt(r.redis_cpu_seconds, 1),
            opt(r.broker_cpu_seconds, 1),
            opt(r.bench_cpu_seconds, 1),
            r.machine_busy
                .map_or_else(|| "?".into(), |b| format!("{:.0}%", b * 100.0)),
            if r.verdict.sustained { "yes" } else { "NO" },
        );
    }
    if let Some(m) = &rep.latency_ms {
        println!(
            "median over runs, send -> decision read: p50 {:.1} ms, p99 {:.1} ms, p999 {:.1} ms, \
             max {:.1} ms, mean {:.1} ms (p99 range {:.1}-{:.1} ms)",
            m.p50.median,
            m.p99.median,
            m.p999.median,
            m.max.median,
            m.mean.median,
            m.p99.min,
            m.p99.max
        );
    }
    println!("verdict: {}", rep.verdict);
    println!(
        "columns: events/s = achieved produce rate in the window, probes = timed probes, \
         backlog = events acknowledged but not applied at the window's end, trend = its growth per second, \
         cpu:lps/redis/broker/bench = CPU seconds in the window, busy = whole-machine CPU use"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapse::domain::event::EventKind;

    #[test]
    fn the_share_within_a_bucket_bound_counts_the_window_only() {
        let name = "lapse_record_latency_seconds";
        let page = |within: u32, total: u32| {
            Scrape::parse(&format!(
                "{name}_bucket{{le=\"0.02\"}} {within}\n{name}_bucket{{le=\"0.025\"}} {within}\n\
                 {name}_bucket{{le=\"+Inf\"}} {total}\n"
            ))
        };
        // Before the window: 10 of 10 within; in it: 30 of 90 more.
        let share = window_share_within(&page(10, 10), &page(40, 100), name, 0.025);
        assert!((share.unwrap() - 30.0 / 90.0).abs() < 1e-9, "{share:?}");
        assert_eq!(
            window_share_within(&page(10, 10), &page(40, 100), name, 0.03),
            None
        );
        assert_eq!(
            window_share_within(&page(1, 1), &page(1, 1), name, 0.025),
            None
        );
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(500.0));
        assert_eq!(percentile(&v, 0.99), Some(990.0));
        assert_eq!(percentile(&v, 0.999), Some(999.0));
        assert_eq!(percentile(&v, 1.0), Some(1000.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7.0], 0.999), Some(7.0));
        // Few samples: p999 is the maximum, never interpolated beyond it.
        let few = [1.0, 2.0, 3.0];
        assert_eq!(percentile(&few, 0.999), Some(3.0));
        assert_eq!(percentile(&few, 0.5), Some(2.0));
    }

    #[test]
    fn latency_summary_sorts_and_ignores_nan() {
        let l = Latency::of(&[30.0, 10.0, f64::NAN, 20.0, 40.0]).unwrap();
        assert_eq!(l.count, 4);
        assert_eq!((l.p50, l.max, l.mean), (20.0, 40.0, 25.0));
        assert_eq!(l.p999, 40.0);
        assert!(Latency::of(&[]).is_none());
        let m = MedianLatency::of(&[l, Latency { p50: 50.0, ..l }, Latency { p50: 5.0, ..l }]);
        assert_eq!(m.p50.median, 20.0);
        assert_eq!((m.p50.min, m.p50.max), (5.0, 50.0));
    }

    #[test]
    fn pacing_produces_the_rate_in_slices() {
        assert_eq!(due_events(20_000.0, 0.005), 100);
        assert_eq!(due_events(20_000.0, 60.0), 1_200_000);
        assert_eq!(due_events(333.0, 0.001), 0);
        assert_eq!(due_events(333.0, 1.0), 333);
        assert_eq!(due_events(0.0, 5.0), 0);
        assert_eq!(due_events(100.0, -1.0), 0);
        // Draining every 5 ms slice sends exactly the bucket's content, never more.
        let mut sent = 0;
        for slice in 1..=200u32 {
            let due = due_events(7_777.0, f64::from(slice) * 0.005);
            assert!(due >= sent);
            sent = due;
        }
        assert_eq!(sent, 7_777);
    }

    #[test]
    fn probe_pairs_are_spread_evenly() {
        // 2% probe sends: one pair start per 100 slots.
        let starts: Vec<u64> = (0..10_000).filter(|n| is_pair_start(*n, 0.01)).collect();
        assert_eq!(starts.len(), 100);
        assert!(starts.windows(2).all(|w| w[1] - w[0] == 100));
        let starts = (0..10_000).filter(|n| is_pair_start(*n, 0.025)).count();
        assert_eq!(starts, 250);
        assert!(!(0..1000).any(|n| is_pair_start(n, 0.0)));
    }

    #[test]
    fn probe_ids_round_trip_and_reject_everything_else() {
        let tag = "123r2t456789";
        let id = probe_event_id(tag, 42, true);
        assert_eq!(parse_probe_event_id(tag, &id), Some(42));
        // First sends cause no decision; if one ever named it, it is not a match.
        assert_eq!(
            parse_probe_event_id(tag, &probe_event_id(tag, 42, false)),
            None
        );
        // Another run's probes, background events and garbage.
        assert_eq!(
            parse_probe_event_id(tag, &probe_event_id("123r1t456789", 42, true)),
            None
        );
        assert_eq!(parse_probe_event_id("123r1", &id), None);
        assert_eq!(parse_probe_event_id(tag, "bench-42-1000"), None);
        assert_eq!(parse_probe_event_id(tag, &format!("lp-{tag}--b")), None);
        assert_eq!(parse_probe_event_id(tag, &format!("lp-{tag}-+4-b")), None);
        assert_eq!(parse_probe_event_id(tag, ""), None);
        let e = probe_send(tag, 4, 42, true, 1_750_000_000_000);
        assert_eq!(e.event_id, id);
        assert_eq!(
            e.customer.key(),
            format!("clinic-3/{}", probe_customer(tag, 42))
        );
        assert_eq!(e.kind(), EventKind::Send);
    }

    #[test]
    fn decisions_decode_from_the_output_encoding() {
        use lapse::domain::allowance::{AllowanceState, ThrottleDecision};
        let schemas = SchemaSet::builtin().unwrap();
        let d = ThrottleDecision {
            decision_id: "d1".into(),
            tenant_id: "clinic-1".into(),
            customer_id: Some("probe-x-1".into()),
            channel: Some(Channel::Wechat),
            campaign_id: None,
            state: AllowanceState::Capped,
            reason: "frequency_cap".into(),
            allowed_from: Some(1_750_086_400_000),
            cap: Some(2),
            window_ms: Some(86_400_000),
            short_click_rate: None,
            baseline_click_rate: None,
            sends_in_window: 2,
            decided_at: 1_750_000_000_000,
            cause_event_id: Some("lp-x-1-b".into()),
            previous: None,
        };
        let bytes = Encoder::new(&schemas)
            .encode_value(
                THROTTLE_EVENT,
                lapse::outputs::throttle_value(&d, None),
                Framing::SingleObject,
            )
            .unwrap();
        let schema = schemas.by_name(THROTTLE_EVENT).unwrap();
        assert_eq!(
            decode_decision(schema, &bytes),
            Some(("lp-x-1-b".to_string(), "CAPPED".to_string()))
        );
        assert_eq!(decode_decision(schema, b"junk"), None);
        assert_eq!(parse_probe_event_id("x", "lp-x-1-b"), Some(1));
    }

    #[test]
    fn stamped_event_times_equal_a_fresh_encoding() {
        let schemas = SchemaSet::builtin().unwrap();
        let encoder = Encoder::new(&schemas);
        let spec = WorkloadSpec {
            events: 300,
            customers: 50,
            tenants: 3,
            seed: 9,
            days: 1,
            now_ms: 1_750_000_000_000,
        };
        let mut out = Vec::new();
        let mut kinds = std::collections::HashSet::new();
        for g in Workload::new(spec.clone()) {
            kinds.insert(g.event.kind());
            let bytes = encoder
                .encode_event(&g.event, g.text, Framing::SingleObject)
                .unwrap();
            let span = occurred_at_span(&bytes).unwrap();
            // Same varint length (now-ish) and a different one (epoch, negative).
            for t in [1_760_123_456_789, 0, -5, i64::MAX] {
                let mut e = g.event.clone();
                e.occurred_at = t;
                let want = encoder
                    .encode_event(&e, g.text, Framing::SingleObject)
                    .unwrap();
                stamp_occurred_at(&bytes, span, t, &mut out);
                assert_eq!(out, want, "{:?} at {t}", g.event.kind());
            }
        }
        assert_eq!(kinds.len(), 5, "every kind was checked");
        assert_eq!(occurred_at_span(b"short"), None);
        assert_eq!(
            occurred_at_span(&[0xC3, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0xff]),
            None
        );

        let bg = Background::generate(spec.clone(), 100, &encoder).unwrap();
        assert_eq!(bg.len(), 100);
        let first = Workload::new(spec).next().unwrap();
        let e0 = bg.get(0).unwrap();
        assert_eq!(e0.kind, first.event.kind().index());
        assert_eq!(e0.key, first.event.customer.key().as_bytes());
        stamp_occurred_at(e0.payload, e0.span, 42, &mut out);
        let mut e = first.event.clone();
        e.occurred_at = 42;
        assert_eq!(
            out,
            encoder
                .encode_event(&e, first.text, Framing::SingleObject)
                .unwrap()
        );
        assert!(bg.get(100).is_none());
    }

    #[test]
    fn fresh_topics_get_a_run_suffix() {
        crate::run_from_repo_root();
        let cfg = Config::default();
        let sets = fresh_topic_sets(&cfg, "12r1t5");
        assert_eq!(sets.len(), 10);
        assert!(sets.contains(&r#"kafka.topics.sends = "engagement.sends.lat-12r1t5""#.to_string()));
        assert!(sets
            .contains(&r#"kafka.topics.throttle = "engagement.throttle.lat-12r1t5""#.to_string()));
        let dir = tempfile::tempdir().unwrap();
        let (_, c) = effective_config(None, &sets, dir.path()).unwrap();
        assert_eq!(c.kafka.topics.visits, "clinic.visits.lat-12r1t5");
        assert_eq!(c.kafka.topics.feedback, "clinic.feedback.lat-12r1t5");
    }

    #[test]
    fn backlog_trend_and_verdict() {
        let flat: Vec<(f64, f64)> = (0..60)
            .map(|t| (f64::from(t), 3000.0 + f64::from(t % 3) * 500.0))
            .collect();
        assert!(slope(&flat).abs() < 30.0);
        let growing: Vec<(f64, f64)> = (0..60)
            .map(|t| (f64::from(t), 2000.0 * f64::from(t)))
            .collect();
        assert!((slope(&growing) - 2000.0).abs() < 1e-6);
        assert_eq!(slope(&[(1.0, 5.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 5.0), (1.0, 9.0)]), 0.0);

        let ok = judge(20_000.0, 19_990.0, 10.0, 4_000.0, 0);
        assert!(ok.sustained && ok.generator_ok && ok.reasons.is_empty());
        let behind = judge(20_000.0, 19_990.0, 2_000.0, 120_000.0, 0);
        assert!(!behind.sustained && behind.generator_ok);
        assert_eq!(behind.reasons.len(), 2);
        let missing = judge(20_000.0, 19_990.0, 0.0, 100.0, 3);
        assert!(!missing.sustained);
        assert!(missing.reasons[0].contains("3 probes"));
        let slow_generator = judge(20_000.0, 15_000.0, 0.0, 100.0, 0);
        assert!(!slow_generator.sustained && !slow_generator.generator_ok);
    }

    #[test]
    fn verdict_text_says_did_not_sustain() {
        let ok = judge(20_000.0, 20_000.0, 0.0, 100.0, 0);
        let v = overall_verdict(20_000.0, &[(1, ok.clone()), (2, ok.clone())]);
        assert!(
            v.starts_with("lapse sustained 20000 events/s in all 2 runs"),
            "{v}"
        );
        let behind = judge(20_000.0, 20_000.0, 3_000.0, 200_000.0, 0);
        let v = overall_verdict(20_000.0, &[(1, ok.clone()), (2, behind)]);
        assert!(
            v.starts_with("lapse did not sustain 20000 events/s (run 2: "),
            "{v}"
        );
        assert!(v.contains("meaningless"), "{v}");
        let short = judge(20_000.0, 12_000.0, 0.0, 100.0, 0);
        let v = overall_verdict(20_000.0, &[(1, ok), (2, short)]);
        assert!(v.contains("did not sustain 20000 events/s"), "{v}");
        assert!(v.contains("load generator"), "{v}");
    }

    #[test]
    fn histogram_window_subtracts_the_earlier_scrape() {
        let before = Scrape::parse(
            "h_bucket{le=\"0.01\"} 10\nh_bucket{le=\"0.02\"} 10\nh_bucket{le=\"+Inf\"} 10\nh_sum 0.05\nh_count 10\n",
        );
        let after = Scrape::parse(
            "h_bucket{le=\"0.01\"} 10\nh_bucket{le=\"0.02\"} 110\nh_bucket{le=\"+Inf\"} 110\nh_sum 1.55\nh_count 110\n",
        );
        // All 100 new observations are in (0.01, 0.02]: the window median is 15 ms.
        let p50 = window_quantile_ms(&before, &after, "h", 0.5).unwrap();
        assert!((p50 - 15.0).abs() < 1e-9, "{p50}");
        assert!((window_mean_ms(&before, &after, "h").unwrap() - 15.0).abs() < 1e-9);
        assert_eq!(window_mean_ms(&before, &before, "h"), None);
    }
}
