//! `lapse-tools bench timers`: firing lag of lapse/recall timers under a steady stream
//! of due times.
//!
//! Per run:
//!
//! 1. **Setup** (not timed). FLUSHDB, then `--customers` customers are built with
//!    the crate's own domain code, exactly as the pipeline would leave them after
//!    three BOTOX visits 120 days apart: the visits are folded with
//!    `CustomerState::apply` + `decide::on_event` + `decide::recall_on_event`, the
//!    timer is `decide::next_timer`, and the last visit is placed so that the
//!    customer's first recall stage (AT_RISK) falls due at `T0 + i·1d/N`: due
//!    times evenly spread over one day of event time. States are written with
//!    `StateStore::save_many` and timers with `TimerStore::schedule`, in chunks.
//! 2. **Run** (timed). The release `lapse run` starts as a child process in
//!    event-time mode (inputs idle), with `policy.lapse.holdout_share = 0` so every
//!    timer yields a trigger. The benchmark moves the shared event-time watermark
//!    (`SharedEventTime::advance`, what the pipeline does after each batch) from
//!    `T0` to `T0 + 1d` in `--day-seconds` of wall time, one step every
//!    `--step-ms`, recording the wall instant of each step. A consumer in this
//!    process reads the triggers: each run gets a fresh trigger topic
//!    (`kafka.topics.triggers` + `.bench-PID-RUN`, created before lapse starts and
//!    deleted after the run), because tansu's in-memory log slows down as a topic
//!    grows and earlier runs' triggers would slow later runs.
//! 3. **Lag.** For every trigger: wall lag = arrival instant − the instant the
//!    watermark first reached its `due_at`. Split in two: until the watermark
//!    reached the trigger's `fired_at` (the event time of the timer-loop poll that
//!    claimed it: "detect"), and from there to the arrival ("deliver": decide,
//!    write, produce, acknowledge, fetch). Resolution: one step. A second split
//!    uses the record's CreateTime, which librdkafka stamps with the wall clock
//!    at lapse's produce call (same machine): lapse's share up to producing,
//!    and the broker's and the reader's after it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use apache_avro::types::Value;
use futures::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use super::child::{self, LapseChild};
use super::consume::{self, KafkaView, RedisView};
use super::machine::{self, Machine};
use super::CpuCounters;
use super::{opt, pct, percentile, Stats};
use lapse::codec::{SchemaSet, RECALL_TRIGGER};
use lapse::config::{ClockMode, Config};
use lapse::domain::event::{CustomerRef, Event, EventBody, EventKind, VisitType};
use lapse::domain::lapse::{Stage, DAY_MS};
use lapse::domain::policy::{Policies, Policy};
use lapse::domain::recall;
use lapse::domain::state::{CustomerState, Source, StateParams};
use lapse::domain::{decide, step};
use lapse::metrics::Metrics;
use lapse::store::event_time::SharedEventTime;
use lapse::store::timers::TimerStore;
use lapse::store::StateStore;

/// Default start of the event-time day: 2025-01-01 00:00 Asia/Shanghai.
pub const DEFAULT_T0_MS: i64 = 1_735_660_800_000;
/// Gap between a customer's three set-up visits.
const VISIT_GAP_MS: i64 = 120 * DAY_MS;
const TREATMENT: &str = "BOTOX";

#[derive(clap::Args, Debug, Clone)]
pub struct TimersArgs {
    /// Customers, each with one timer due in the day.
    #[arg(long, default_value_t = 1_000_000)]
    pub customers: u64,
    /// Tenants the customers are spread over (interleaved).
    #[arg(long, default_value_t = 4)]
    pub tenants: u64,
    /// Wall seconds for the day of event time (the compression): timers/s = customers / this.
    #[arg(long, default_value_t = 300.0)]
    pub day_seconds: f64,
    /// Wall milliseconds between two watermark steps (the timing resolution).
    #[arg(long, default_value_t = 50)]
    pub step_ms: u64,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// After the watermark reached the end of the day, wait at most this long
    /// without a new trigger before declaring the rest missing.
    #[arg(long, default_value_t = 60)]
    pub drain_secs: u64,
    /// How often /metrics is read during the run, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub scrape_interval_ms: u64,
    /// Customers per set-up chunk (one pipelined write of states, one of timers).
    #[arg(long, default_value_t = 5000)]
    pub setup_chunk: usize,
    /// Start of the event-time day, ms since the epoch.
    #[arg(long, default_value_t = DEFAULT_T0_MS)]
    pub t0_ms: i64,
    /// `fetch.wait.max.ms` of the benchmark's trigger reader. tansu 0.6 answers a
    /// fetch only when this has run out, even with data waiting: it bounds the
    /// reader's share of the measured lag (at most this, half of it on average).
    #[arg(long, default_value_t = 10)]
    pub reader_fetch_wait_ms: u64,
    #[command(flatten)]
    pub child: super::ChildArgs,
}

// ---------------------------------------------------------------------------
// The population (pure)
// ---------------------------------------------------------------------------

/// Who the customers are and when each one's timer falls due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Population {
    pub customers: u64,
    pub tenants: u64,
    /// Start of the day, ms.
    pub t0: i64,
    /// Length of the spread, ms (one day).
    pub span_ms: i64,
}

impl Population {
    /// Customer `i`: tenants interleaved, named like the throughput workload's.
    pub fn customer(&self, i: u64) -> CustomerRef {
        CustomerRef::new(
            format!("clinic-{}", i % self.tenants + 1),
            format!("cust-{i:07}"),
        )
    }

    /// The index of a customer of this population.
    pub fn index_of(&self, c: &CustomerRef) -> Option<u64> {
        let i: u64 = c.customer.strip_prefix("cust-")?.parse().ok()?;
        (i < self.customers && self.customer(i) == *c).then_some(i)
    }

    /// When customer `i`'s timer is due: `t0 + i·span/N`, evenly spread in `[t0, t0+span)`.
    pub fn due(&self, i: u64) -> i64 {
        self.t0 + (i as i128 * self.span_ms as i128 / self.customers.max(1) as i128) as i64
    }

    /// Which tenth of the day a due time falls in (0..=9).
    pub fn tenth(&self, due: i64) -> usize {
        (((due - self.t0) as i128 * 10 / self.span_ms.max(1) as i128).clamp(0, 9)) as usize
    }
}

/// Three treatment visits `VISIT_GAP_MS` apart, the last at `last`, folded the
/// way the pipeline folds them. Returns the state with its timer set.
fn fold_visits(
    c: &CustomerRef,
    i: u64,
    last: i64,
    policy: &Policy,
    params: &StateParams,
) -> CustomerState {
    let mut st = CustomerState::default();
    let amount = 300_000 + (i.wrapping_mul(7919) % 700_000) as i64;
    for k in 0..3u64 {
        let ev = Event {
            event_id: format!("bench-timers-{i}-{k}"),
            customer: c.clone(),
            occurred_at: last - (2 - k as i64) * VISIT_GAP_MS,
            body: EventBody::Visit {
                visit_type: VisitType::Treatment,
                treatment: Some(TREATMENT.into()),
                amount,
                currency: "CNY".into(),
                offer_code: None,
                discount: None,
            },
        };
        let src = Source {
            kind: EventKind::Visit,
            partition: (i % 6) as i32,
            offset: (i * 3 + k) as i64,
        };
        step::on_record(&mut st, &ev, src, policy, params);
    }
    st.timer_due = decide::next_timer(&st, policy);
    st
}

/// Builds customer `i`'s state so that its first recall stage is due at
/// `pop.due(i)`, checking that state and timer agree as lapse would leave them:
/// the timer is AT_RISK of the episode that starts at the last visit, nothing
/// waits in the outbox, and the stage after it is not due before `not_before`.
pub fn build_customer(
    pop: &Population,
    i: u64,
    policy: &Policy,
    params: &StateParams,
    not_before: i64,
) -> anyhow::Result<(CustomerRef, CustomerState, i64)> {
    let c = pop.customer(i);
    let due = pop.due(i);
    // Where the AT_RISK stage falls relative to the last visit, for this policy.
    let probe = fold_visits(&c, i, pop.t0, policy, params);
    let offset = probe
        .timer_due
        .context("three visits schedule no timer: check policy.lapse")?
        - pop.t0;
    let st = fold_visits(&c, i, due - offset, policy, params);
    let next = recall::next_due(&st.recall, &st.visits, &policy.lapse)
        .context("no recall stage scheduled")?;
    if st.timer_due != Some(due) || next.due_at != due || next.stage != Stage::AtRisk {
        bail!(
            "customer {c}: timer {:?}, next stage {:?} at {}, expected AT_RISK at {due}",
            st.timer_due,
            next.stage,
            next.due_at
        );
    }
    if !st.outbox.is_empty() {
        bail!("customer {c}: the set-up visits left decisions in the outbox");
    }
    let start = st.visits.last_at.expect("three visits");
    let interval = lapse::domain::lapse::expected_interval(&st.visits, &policy.lapse);
    let after = lapse::domain::lapse::scheduled_due(1, start, &interval, &policy.lapse)
        .context("no stage after AT_RISK")?;
    if after < not_before {
        bail!(
            "customer {c}: the stage after AT_RISK is due within the benchmark's day \
             (policy.lapse.lapsed_factor / lapsed_min_days too low): one trigger per customer is expected"
        );
    }
    Ok((c, st, due))
}

// ---------------------------------------------------------------------------
// Watermark bookkeeping and percentiles (pure)
// ---------------------------------------------------------------------------

/// The watermark a step applies `elapsed` after the start: `span × elapsed / day`
/// past the start, whole ms, never past `span`.
pub fn watermark_offset(elapsed: Duration, day: Duration, span_ms: i64) -> i64 {
    let day = day.as_secs_f64().max(1e-9);
    let x = (elapsed.as_secs_f64() / day * span_ms as f64).floor() as i64;
    x.clamp(0, span_ms)
}

/// Each watermark step: the event time set and the wall offset (from the run's
/// origin) at which the call that set it was issued.
#[derive(Debug, Clone, Default)]
pub struct WatermarkLog {
    steps: Vec<(i64, Duration)>,
}

impl WatermarkLog {
    /// Records a step; a step that does not raise the watermark reaches nothing new.
    pub fn push(&mut self, watermark: i64, at: Duration) {
        if self.steps.last().is_none_or(|(w, _)| watermark > *w) {
            self.steps.push((watermark, at));
        }
    }

    /// The wall offset at which the watermark first reached `t` (≥ t), if it did.
    pub fn reached_at(&self, t: i64) -> Option<Duration> {
        let i = self.steps.partition_point(|(w, _)| *w < t);
        self.steps.get(i).map(|(_, at)| *at)
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub fn last(&self) -> Option<(i64, Duration)> {
        self.steps.last().copied()
    }

    pub fn first(&self) -> Option<(i64, Duration)> {
        self.steps.first().copied()
    }
}

/// p50, p99, p99.9 and max of a set of values.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
}

impl Percentiles {
    pub fn of(mut v: Vec<f64>) -> Percentiles {
        v.retain(|x| !x.is_nan());
        v.sort_by(f64::total_cmp);
        Percentiles {
            count: v.len(),
            p50: percentile(&v, 0.50),
            p99: percentile(&v, 0.99),
            p999: percentile(&v, 0.999),
            max: v.last().copied(),
            mean: (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64),
        }
    }
}

// ---------------------------------------------------------------------------
// Triggers read back
// ---------------------------------------------------------------------------

/// The fields of a `RecallTrigger` the benchmark needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub trigger_id: String,
    pub customer: CustomerRef,
    pub due_at: i64,
    pub fired_at: i64,
}

fn decode_trigger(schema: &apache_avro::Schema, payload: &[u8]) -> anyhow::Result<Seen> {
    // Single-object encoding: C3 01, 8-byte fingerprint, Avro datum.
    if payload.len() < 10 || payload[..2] != [0xC3, 0x01] {
        bail!("not an Avro single-object record");
    }
    let body = lapse::codec::parse_frame(payload)?.body();
    let v = apache_avro::from_avro_datum(schema, &mut &body[..], None)?;
    let Value::Record(fields) = v else {
        bail!("not a record");
    };
    let (mut tid, mut tenant, mut cust, mut due, mut fired) = (None, None, None, None, None);
    for (k, v) in fields {
        match (k.as_str(), v) {
            ("trigger_id", Value::String(s)) => tid = Some(s),
            ("tenant_id", Value::String(s)) => tenant = Some(s),
            ("customer_id", Value::String(s)) => cust = Some(s),
            ("due_at", Value::TimestampMillis(t) | Value::Long(t)) => due = Some(t),
            ("fired_at", Value::TimestampMillis(t) | Value::Long(t)) => fired = Some(t),
            _ => {}
        }
    }
    Ok(Seen {
        trigger_id: tid.context("trigger_id")?,
        customer: CustomerRef::new(tenant.context("tenant_id")?, cust.context("customer_id")?),
        due_at: due.context("due_at")?,
        fired_at: fired.context("fired_at")?,
    })
}

/// One trigger record as read: when it arrived and when lapse produced it,
/// both as offsets from the run's origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    pub at: Duration,
    /// The record's CreateTime (librdkafka stamps the wall clock at lapse's
    /// produce call; same machine) minus the origin's wall time, ms.
    pub produced_ms: Option<f64>,
    /// None: undecodable.
    pub seen: Option<Seen>,
}

/// What the triggers of one run say, against the population and the watermark log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Analysis {
    pub expected: u64,
    /// Distinct expected triggers received.
    pub received: u64,
    pub missing: u64,
    /// Up to 20 missing customers, `tenant/customer@due`.
    pub missing_sample: Vec<String>,
    /// Exact repeats (same trigger id).
    pub duplicates: u64,
    /// Triggers of customers outside the population, of held-out customers, or
    /// with another trigger id than the customer's first.
    pub unexpected: u64,
    /// Triggers whose due_at is not the customer's set-up due time.
    pub due_mismatch: u64,
    pub undecodable: u64,
    /// Wall ms from the watermark reaching due_at to the trigger's arrival.
    pub wall_lag_ms: Percentiles,
    /// Wall ms from the watermark reaching due_at to it reaching fired_at (the
    /// claiming poll's clock): waiting for a poll.
    pub detect_ms: Percentiles,
    /// Wall ms from the watermark reaching fired_at to the arrival: decide,
    /// write, produce, acknowledge, fetch.
    pub deliver_ms: Percentiles,
    /// The other split, by the record's CreateTime: wall ms from the watermark
    /// reaching due_at to lapse's produce call (poll wait, claim, load, decide,
    /// state write: lapse's own share)...
    pub to_produce_ms: Percentiles,
    /// ...and from the produce call to the benchmark reading it (linger,
    /// broker append and acknowledgement, the reader's fetch).
    pub produce_to_read_ms: Percentiles,
    /// Event seconds from due_at to fired_at (what `lapse_timer_firing_lag_seconds` observes).
    pub event_lag_seconds: Percentiles,
    /// p50 and p99 of the wall lag (ms) per tenth of the day, by due time.
    pub wall_lag_p50_by_tenth_ms: Vec<Option<f64>>,
    pub wall_lag_p99_by_tenth_ms: Vec<Option<f64>>,
    /// Offset of the last arrival from the run's origin.
    #[serde(skip)]
    pub last_arrival: Option<Duration>,
}

/// Matches arrivals to the population. `expected(i)`: customer `i` should fire.
pub fn analyse(
    pop: &Population,
    expected: &dyn Fn(u64) -> bool,
    log: &WatermarkLog,
    arrivals: &[Arrival],
) -> Analysis {
    let n = pop.customers as usize;
    let mut a = Analysis {
        expected: (0..pop.customers).filter(|i| expected(*i)).count() as u64,
        ..Default::default()
    };
    let mut seen = vec![false; n];
    let mut ids: HashSet<&str> = HashSet::with_capacity(arrivals.len());
    let (mut wall, mut detect, mut deliver, mut event) = (vec![], vec![], vec![], vec![]);
    let (mut to_produce, mut produce_to_read) = (vec![], vec![]);
    let mut tenths: Vec<Vec<f64>> = vec![Vec::new(); 10];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for Arrival {
        at,
        produced_ms,
        seen: s,
    } in arrivals
    {
        a.last_arrival = Some(a.last_arrival.map_or(*at, |l| l.max(*at)));
        let Some(s) = s else {
            a.undecodable += 1;
            continue;
        };
        if !ids.insert(s.trigger_id.as_str()) {
            a.duplicates += 1;
            continue;
        }
        let Some(i) = pop.index_of(&s.customer).filter(|i| expected(*i)) else {
            a.unexpected += 1;
            continue;
        };
        if std::mem::replace(&mut seen[i as usize], true) {
            a.unexpected += 1;
            continue;
        }
        a.received += 1;
        if s.due_at != pop.due(i) {
            a.due_mismatch += 1;
        }
        event.push((s.fired_at - s.due_at) as f64 / 1000.0);
        if let Some(r) = log.reached_at(s.due_at) {
            let lag = ms(at.saturating_sub(r)) - ms(r.saturating_sub(*at));
            wall.push(lag);
            tenths[pop.tenth(s.due_at)].push(lag);
            if let Some(f) = log.reached_at(s.fired_at) {
                detect.push(ms(f.saturating_sub(r)));
                deliver.push(ms(at.saturating_sub(f)) - ms(f.saturating_sub(*at)));
            }
            if let Some(p) = produced_ms {
                to_produce.push(p - ms(r));
                produce_to_read.push(ms(*at) - p);
            }
        }
    }
    for i in 0..pop.customers {
        if expected(i) && !seen[i as usize] {
            a.missing += 1;
            if a.missing_sample.len() < 20 {
                a.missing_sample
                    .push(format!("{}@{}", pop.customer(i), pop.due(i)));
            }
        }
    }
    a.wall_lag_ms = Percentiles::of(wall);
    a.detect_ms = Percentiles::of(detect);
    a.deliver_ms = Percentiles::of(deliver);
    a.to_produce_ms = Percentiles::of(to_produce);
    a.produce_to_read_ms = Percentiles::of(produce_to_read);
    a.event_lag_seconds = Percentiles::of(event);
    for t in tenths {
        let p = Percentiles::of(t);
        a.wall_lag_p50_by_tenth_ms.push(p.p50);
        a.wall_lag_p99_by_tenth_ms.push(p.p99);
    }
    a
}

/// Raw trigger records: arrival (offset from the run's origin), CreateTime
/// (ms since the epoch) and payload.
type Arrivals = Vec<(Duration, Option<i64>, Vec<u8>)>;

/// Reads the trigger topic from the given offsets on its own thread, stamping
/// each record with its arrival (offset from `origin`).
struct TriggerReader {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    handle: std::thread::JoinHandle<anyhow::Result<Arrivals>>,
}

impl TriggerReader {
    fn start(
        brokers: &str,
        starts: &[((String, i32), i64)],
        fetch_wait_ms: u64,
        origin: Instant,
    ) -> anyhow::Result<TriggerReader> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "lapse-bench-timers-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", fetch_wait_ms.max(1).to_string())
            .set("fetch.min.bytes", "1")
            .set("fetch.queue.backoff.ms", "10")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in starts {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
        }
        c.assign(&tpl)?;
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), count.clone());
        let handle = std::thread::Builder::new()
            .name("bench-triggers".into())
            .spawn(move || {
                let mut out = Vec::new();
                while !s.load(Ordering::SeqCst) {
                    match c.poll(Duration::from_millis(50)) {
                        Some(Ok(m)) => {
                            let at = origin.elapsed();
                            out.push((
                                at,
                                m.timestamp().to_millis(),
                                m.payload().unwrap_or_default().to_vec(),
                            ));
                            n.fetch_add(1, Ordering::SeqCst);
                        }
                        Some(Err(e)) => bail!("reading the triggers: {e}"),
                        None => {}
                    }
                }
                Ok(out)
            })?;
        Ok(TriggerReader {
            stop,
            count,
            handle,
        })
    }

    fn received(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    async fn finish(self) -> anyhow::Result<Arrivals> {
        self.stop.store(true, Ordering::SeqCst);
        let h = self.handle;
        tokio::task::spawn_blocking(move || h.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the trigger reader panicked"))?
    }
}

// ---------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------

/// One /metrics reading during the run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Point {
    /// Seconds since the watermark started moving.
    pub t: f64,
    pub overdue: f64,
    pub fired: f64,
    pub outputs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimersRun {
    pub run: usize,
    pub setup_seconds: f64,
    pub setup_customers_per_second: f64,
    pub timers_scheduled: u64,
    pub redis_used_memory_bytes: Option<f64>,
    pub redis_bytes_per_customer: Option<f64>,
    pub redis_keys: u64,
    /// Wall seconds the watermark took to cross the day (≈ --day-seconds).
    pub drive_seconds: f64,
    /// Expected triggers / drive seconds.
    pub offered_timers_per_second: f64,
    /// From the watermark reaching the end of the day to the last trigger.
    pub drain_seconds: f64,
    pub watermark_steps: usize,
    /// Slowest `SharedEventTime::advance` call of the drive (a step counts from
    /// the call's start, so a slow call would hide lag).
    pub slowest_step_call_ms: f64,
    #[serde(flatten)]
    pub analysis: Analysis,
    /// lapse's own `lapse_timer_firing_lag_seconds` (event time), from its buckets.
    pub lapse_event_lag_p50_seconds: Option<f64>,
    pub lapse_event_lag_p99_seconds: Option<f64>,
    pub lapse_event_lag_p999_seconds: Option<f64>,
    /// Its highest finite bucket bound: quantiles at this value are saturated.
    pub lapse_event_lag_top_bucket_seconds: Option<f64>,
    pub overdue_max: f64,
    pub timers_fired: u64,
    pub timers_lost_lease: u64,
    pub cas_conflicts: u64,
    /// Publish calls of the timer loop (one per poll that fired timers).
    pub produce_calls: u64,
    pub triggers_per_produce_call: f64,
    pub produce_ms_p50: Option<f64>,
    pub produce_ms_p99: Option<f64>,
    /// Mean Redis round trip of the timer loop's state loads and writes.
    pub redis_load_ms_mean: Option<f64>,
    pub redis_save_ms_mean: Option<f64>,
    pub lapse_cpu_seconds: Option<f64>,
    pub redis_cpu_seconds: Option<f64>,
    pub broker_cpu_seconds: Option<f64>,
    pub machine_busy: Option<f64>,
    pub load_average_before: Option<f64>,
    pub lapse_exit_ok: bool,
    pub timeline: Vec<Point>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimersReport {
    pub machine: Machine,
    pub redis_version: String,
    pub redis_persistence: String,
    pub customers: u64,
    pub tenants: u64,
    pub day_seconds: f64,
    pub timers_per_second: f64,
    pub step_ms: u64,
    pub config_overrides: Vec<String>,
    pub timers_shards: u32,
    pub timers_poll_interval_ms: u64,
    pub timers_claim_limit: usize,
    pub runs: Vec<TimersRun>,
    /// Across runs: each percentile's min / median / max.
    pub wall_lag_p50_ms: Stats,
    pub wall_lag_p99_ms: Stats,
    pub wall_lag_p999_ms: Stats,
    pub wall_lag_max_ms: Stats,
}

struct Env<'a> {
    args: &'a TimersArgs,
    cfg: &'a Config,
    bin: &'a Path,
    sets: &'a [String],
    work_dir: &'a Path,
    redis: &'a RedisView,
    store: &'a StateStore,
    timers: &'a TimerStore,
    clock: &'a SharedEventTime,
    policies: &'a Policies,
    params: StateParams,
    pop: Population,
    schema: &'a apache_avro::Schema,
    expected: &'a [bool],
}

/// FLUSHDB, then every customer's state and timer. Returns (seconds, timers scheduled).
async fn setup(env: &Env<'_>) -> anyhow::Result<(f64, u64)> {
    env.redis.flush().await.context("FLUSHDB before the run")?;
    let started = Instant::now();
    let pop = env.pop;
    let not_before = pop.t0 + pop.span_ms + 7 * DAY_MS;
    let chunk = env.args.setup_chunk.max(1) as u64;
    let starts: Vec<u64> = (0..pop.customers).step_by(chunk as usize).collect();
    let done = AtomicU64::new(0);
    let mut last_note = Instant::now();
    let mut stream = futures::stream::iter(starts)
        .map(|from| {
            let done = &done;
            async move {
                let to = (from + chunk).min(pop.customers);
                let mut built = Vec::with_capacity((to - from) as usize);
                for i in from..to {
                    let policy = env.policies.of(&pop.customer(i).tenant);
                    built.push(build_customer(&pop, i, policy, &env.params, not_before)?);
                }
                let timers: Vec<(&CustomerRef, i64)> =
                    built.iter().map(|(c, _, d)| (c, *d)).collect();
                // Timers first, as the pipeline does.
                env.timers.schedule(&timers).await?;
                let writes: Vec<(&CustomerRef, u64, &CustomerState)> =
                    built.iter().map(|(c, s, _)| (c, 0, s)).collect();
                let ok = env.store.save_many(&writes).await?;
                if ok.iter().any(|x| !x) {
                    bail!("a set-up state write conflicted (was Redis flushed?)");
                }
                done.fetch_add(to - from, Ordering::Relaxed);
                anyhow::Ok(())
            }
        })
        .buffer_unordered(4);
    while let Some(r) = stream.next().await {
        r?;
        if last_note.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "  setup: {}/{} customers",
                done.load(Ordering::Relaxed),
                pop.customers
            );
            last_note = Instant::now();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut scheduled = 0u64;
    for shard in 0..env.timers.shards() {
        scheduled += env.timers.pending(shard).await? as u64;
    }
    Ok((seconds, scheduled))
}

/// Drops a run's trigger topic (the broker keeps its log in memory).
async fn delete_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.delete_topics(&[topic], &opts).await? {
        r.map_err(|(t, code)| anyhow::anyhow!("deleting {t}: {code:?}"))?;
    }
    Ok(())
}

/// A fresh trigger topic per run, and the run's config naming it. Tansu's
/// in-memory log gets slower as a topic grows (its CPU per run rose from 9 to
/// 21 s for the same 20,000 triggers as the topic filled), so earlier runs'
/// triggers would slow this one.
async fn trigger_topic(
    env: &Env<'_>,
    run: usize,
) -> anyhow::Result<(String, std::path::PathBuf, KafkaView)> {
    let args = env.args;
    let topic = format!(
        "{}.bench-{}-{run}",
        env.cfg.kafka.topics.triggers,
        std::process::id()
    );
    let mut sets = env.sets.to_vec();
    sets.push(format!(
        "kafka.topics.triggers = {}",
        toml::Value::String(topic.clone())
    ));
    let (config_path, run_cfg) =
        consume::effective_config(args.child.config.as_deref(), &sets, env.work_dir)?;
    lapse::kafka::admin::ensure_topics(&run_cfg.kafka)
        .await
        .with_context(|| format!("creating the run's trigger topic {topic}"))?;
    let kafka = {
        let waited = Instant::now();
        loop {
            match KafkaView::new(&env.cfg.kafka.brokers, &[&topic]).await {
                Ok(k) => break k,
                Err(e) if waited.elapsed() > Duration::from_secs(20) => {
                    return Err(e.context(format!("the trigger topic {topic}")))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    };
    Ok((topic, config_path, kafka))
}

/// Waits until lapse's timer loop reads the event time `at` (`lapse_clock_now_ms`).
async fn wait_clock(lapse: &LapseChild, at: i64) -> anyhow::Result<()> {
    let waited = Instant::now();
    loop {
        if let Some(s) = lapse.metrics().await {
            if s.max("lapse_clock_now_ms", &[]) == Some(at as f64) {
                return Ok(());
            }
        }
        if waited.elapsed() > Duration::from_secs(30) {
            return Err(lapse.fail("the timer loop did not pick up the event time".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Advances the shared event time across the day in `--day-seconds`, every
/// `--step-ms`, logging each step; returns (seconds taken, slowest step call).
async fn drive(
    env: &Env<'_>,
    lapse: &mut LapseChild,
    run: usize,
    origin: Instant,
    reader: &TriggerReader,
    log: &mut WatermarkLog,
) -> anyhow::Result<(f64, Duration)> {
    let (args, pop) = (env.args, env.pop);
    let day = Duration::from_secs_f64(args.day_seconds);
    let mut tick = tokio::time::interval(Duration::from_millis(args.step_ms.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut last_note = Instant::now();
    let mut slowest_step = Duration::ZERO;
    loop {
        tick.tick().await;
        let w = pop.t0 + watermark_offset(start.elapsed(), day, pop.span_ms);
        let at = origin.elapsed();
        env.clock.advance(w).await?;
        slowest_step = slowest_step.max(origin.elapsed().saturating_sub(at));
        log.push(w, at);
        if w >= pop.t0 + pop.span_ms {
            break;
        }
        if last_note.elapsed() >= Duration::from_secs(15) {
            eprintln!(
                "  run {run}: {:.0}% of the day, {} triggers read",
                100.0 * (w - pop.t0) as f64 / pop.span_ms as f64,
                reader.received()
            );
            last_note = Instant::now();
            if let Some(status) = lapse.exited()? {
                return Err(lapse.fail(format!("lapse exited during the run ({status})")));
            }
        }
    }
    Ok((start.elapsed().as_secs_f64(), slowest_step))
}

/// Waits for the remaining triggers (`want` in all), until none came for
/// `--drain-secs`.
async fn drain(
    env: &Env<'_>,
    lapse: &mut LapseChild,
    run: usize,
    reader: &TriggerReader,
    want: u64,
) -> anyhow::Result<()> {
    let args = env.args;
    let mut last_count = reader.received();
    let mut last_new = Instant::now();
    loop {
        let n = reader.received();
        if n >= want {
            // A moment more for any duplicates.
            tokio::time::sleep(Duration::from_secs(1)).await;
            break;
        }
        if n != last_count {
            last_count = n;
            last_new = Instant::now();
        } else if last_new.elapsed() >= Duration::from_secs(args.drain_secs) {
            eprintln!(
                "  run {run}: no new trigger for {} s: {n} of {want} read",
                args.drain_secs
            );
            break;
        }
        if let Some(status) = lapse.exited()? {
            return Err(lapse.fail(format!("lapse exited during the drain ({status})")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn one_run(env: &Env<'_>, run: usize) -> anyhow::Result<TimersRun> {
    let args = env.args;
    let pop = env.pop;
    let mem_before = {
        env.redis.flush().await?;
        env.redis.num("memory", "used_memory").await
    };
    eprintln!(
        "run {run}/{}: setting up {} customers' states and timers",
        args.runs, pop.customers
    );
    let (setup_seconds, timers_scheduled) = setup(env).await?;
    let mem_after = env.redis.num("memory", "used_memory").await;
    let redis_keys = env.redis.dbsize().await?;
    println!(
        "run {run} setup: {} customers in {:.1} s ({:.0}/s); {} timers scheduled; Redis {} keys, used_memory {} MiB ({} B per customer)",
        pop.customers,
        setup_seconds,
        pop.customers as f64 / setup_seconds.max(1e-9),
        timers_scheduled,
        redis_keys,
        opt(mem_after.map(|m| m / 1_048_576.0), 0),
        opt(
            mem_before
                .zip(mem_after)
                .map(|(a, b)| (b - a) / pop.customers.max(1) as f64),
            0
        ),
    );
    if timers_scheduled != pop.customers {
        bail!(
            "{timers_scheduled} timers scheduled for {} customers",
            pop.customers
        );
    }

    let (topic, config_path, kafka) = trigger_topic(env, run).await?;
    let starts: Vec<((String, i32), i64)> =
        kafka.partitions.iter().map(|tp| (tp.clone(), 0)).collect();
    let origin = Instant::now();
    let origin_epoch_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let reader = TriggerReader::start(
        &env.cfg.kafka.brokers,
        &starts,
        args.reader_fetch_wait_ms,
        origin,
    )?;

    let load_average_before = machine::load_average();
    let group = format!(
        "lapse-bench-timers-{}-{}-{run}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis()
    );
    let log_path = env.work_dir.join(format!("lapse-timers-{run}.log"));
    let mut lapse = LapseChild::spawn(env.bin, &config_path, &group, log_path)?;
    lapse
        .wait_ready(Instant::now() + Duration::from_secs(90))
        .await
        .map_err(|e| lapse.fail(e.to_string()))?;

    // Just before the day: the timer loop must have read it (nothing is due yet).
    let before = pop.t0 - 1;
    let before_at = origin.elapsed();
    env.clock.advance(before).await?;
    wait_clock(&lapse, before).await?;

    // Scrape /metrics in the background during the run.
    let drive_origin = Instant::now();
    let scraping = Arc::new(AtomicBool::new(true));
    let scraper = {
        let (http, url) = (lapse.http.clone(), lapse.metrics_url.clone());
        let on = scraping.clone();
        let every = Duration::from_millis(args.scrape_interval_ms.max(10));
        tokio::spawn(async move {
            let mut points = Vec::new();
            while on.load(Ordering::SeqCst) {
                if let Some(s) = child::scrape(&http, &url).await {
                    points.push(Point {
                        t: drive_origin.elapsed().as_secs_f64(),
                        overdue: s.sum("lapse_timers_overdue"),
                        fired: s.sum_where("lapse_timers_fired_total", &[("result", "fired")]),
                        outputs: s.sum_where("lapse_outputs_total", &[("kind", "trigger")]),
                    });
                }
                tokio::time::sleep(every).await;
            }
            points
        })
    };
    let cpu_at_start = CpuCounters::now(&[lapse.pid], env.redis, args.child.broker_pid).await;

    // Drive the watermark across the day.
    let mut log = WatermarkLog::default();
    log.push(before, before_at);
    let (drive_seconds, slowest_step) =
        drive(env, &mut lapse, run, origin, &reader, &mut log).await?;
    let end_at = origin.elapsed();

    // Drain: wait for the rest, until nothing new comes for --drain-secs.
    let want = env.expected.iter().filter(|x| **x).count() as u64;
    drain(env, &mut lapse, run, &reader, want).await?;
    let cpu_at_end = CpuCounters::now(&[lapse.pid], env.redis, args.child.broker_pid).await;
    scraping.store(false, Ordering::SeqCst);
    let timeline = scraper.await?;
    let s = lapse
        .metrics()
        .await
        .ok_or_else(|| lapse.fail("cannot read /metrics after the run".into()))?;
    let raw = reader.finish().await?;
    if let Err(e) = delete_topic(&env.cfg.kafka.brokers, &topic).await {
        eprintln!("  run {run}: could not delete {topic} ({e:#}); it stays in the broker's memory");
    }

    let lapse_exit_ok = lapse.stop(run).await;

    // Decode and match (off the runtime: a million records).
    let watermark_steps = log.len();
    let (schema, expected) = (env.schema.clone(), env.expected.to_vec());
    let analysis = tokio::task::spawn_blocking(move || {
        let arrivals: Vec<Arrival> = raw
            .into_iter()
            .map(|(at, created, p)| Arrival {
                at,
                produced_ms: created.map(|c| c as f64 - origin_epoch_ms),
                seen: decode_trigger(&schema, &p).ok(),
            })
            .collect();
        analyse(&pop, &|i| expected[i as usize], &log, &arrivals)
    })
    .await?;

    let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    let overdue_max = timeline
        .iter()
        .map(|p| p.overdue)
        .fold(s.sum("lapse_timers_overdue"), f64::max);
    let produce_calls = s.sum("lapse_output_produce_seconds_count") as u64;
    let ms = |v: Option<f64>| v.map(|x| x * 1000.0);
    let drain_seconds = analysis
        .last_arrival
        .map_or(0.0, |l| l.saturating_sub(end_at).as_secs_f64());
    Ok(TimersRun {
        run,
        setup_seconds,
        setup_customers_per_second: pop.customers as f64 / setup_seconds.max(1e-9),
        timers_scheduled,
        redis_used_memory_bytes: mem_after,
        redis_bytes_per_customer: mem_before
            .zip(mem_after)
            .map(|(a, b)| (b - a) / pop.customers.max(1) as f64),
        redis_keys,
        drive_seconds,
        offered_timers_per_second: want as f64 / drive_seconds.max(1e-9),
        drain_seconds,
        watermark_steps,
        slowest_step_call_ms: slowest_step.as_secs_f64() * 1000.0,
        lapse_event_lag_p50_seconds: s.quantile("lapse_timer_firing_lag_seconds", &[], 0.5),
        lapse_event_lag_p99_seconds: s.quantile("lapse_timer_firing_lag_seconds", &[], 0.99),
        lapse_event_lag_p999_seconds: s.quantile("lapse_timer_firing_lag_seconds", &[], 0.999),
        lapse_event_lag_top_bucket_seconds: s
            .buckets("lapse_timer_firing_lag_seconds", &[])
            .iter()
            .map(|(b, _)| *b)
            .filter(|b| b.is_finite())
            .reduce(f64::max),
        overdue_max,
        timers_fired: s.sum_where("lapse_timers_fired_total", &[("result", "fired")]) as u64,
        timers_lost_lease: s.sum_where("lapse_timers_fired_total", &[("result", "lost_lease")])
            as u64,
        cas_conflicts: s.sum("lapse_state_write_conflicts_total") as u64,
        produce_calls,
        triggers_per_produce_call: s.sum_where("lapse_outputs_total", &[("kind", "trigger")])
            / produce_calls.max(1) as f64,
        produce_ms_p50: ms(s.quantile("lapse_output_produce_seconds", &[], 0.5)),
        produce_ms_p99: ms(s.quantile("lapse_output_produce_seconds", &[], 0.99)),
        redis_load_ms_mean: ms(s.mean("lapse_redis_call_seconds", &[("op", "load")])),
        redis_save_ms_mean: ms(s.mean("lapse_redis_call_seconds", &[("op", "save")])),
        lapse_cpu_seconds: diff(cpu_at_start.lapse, cpu_at_end.lapse),
        redis_cpu_seconds: diff(cpu_at_start.redis, cpu_at_end.redis),
        broker_cpu_seconds: diff(cpu_at_start.broker, cpu_at_end.broker),
        machine_busy: machine::busy_share(cpu_at_start.machine, cpu_at_end.machine),
        load_average_before,
        lapse_exit_ok,
        timeline,
        analysis,
    })
}

pub async fn run(args: &TimersArgs) -> anyhow::Result<TimersReport> {
    anyhow::ensure!(args.runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(args.customers >= 1, "--customers must be at least 1");
    anyhow::ensure!(args.tenants >= 1, "--tenants must be at least 1");
    anyhow::ensure!(
        args.day_seconds.is_finite() && args.day_seconds > 0.0,
        "--day-seconds must be positive"
    );
    let work_dir = args.child.work_dir("lapse-bench-timers")?;
    let mut sets = vec![
        "clock.mode = \"event\"".to_string(),
        "policy.lapse.holdout_share = 0.0".to_string(),
    ];
    sets.extend(args.child.set.iter().cloned());
    let (config_path, cfg) =
        consume::effective_config(args.child.config.as_deref(), &sets, &work_dir)?;
    if cfg.clock.mode != ClockMode::Event {
        bail!("the timer benchmark drives event time: clock.mode must stay \"event\"");
    }
    let bin = args.child.lapse_bin()?;
    let redis = RedisView::connect(&cfg).await?;
    // The benchmark's own connection (set-up pipelines of thousands of scripts,
    // on a machine that may be busy) gets a long response timeout; lapse keeps
    // the configured one.
    let mut bench_redis = cfg.redis.clone();
    bench_redis.response_timeout.0 = bench_redis.response_timeout.0.max(Duration::from_secs(60));
    let store = StateStore::connect(&bench_redis, Metrics::new(&cfg.metrics))
        .await
        .context("connecting the state store")?;
    let timers = TimerStore::new(
        store.conn(),
        cfg.redis.key_prefix.clone(),
        cfg.timers.shards,
    )
    .await
    .context("the timer store")?;
    let clock = SharedEventTime::new(store.conn(), &cfg.redis.key_prefix);
    let policies = Policies::new(&cfg.policy)
        .map_err(|(k, m)| anyhow::anyhow!("config key {k}: {m}"))
        .context("the policy")?;
    let schemas = SchemaSet::load(&cfg.schema.dir)
        .or_else(|_| SchemaSet::builtin())
        .context("loading the output schemas")?;
    let schema = schemas
        .by_name(RECALL_TRIGGER)
        .context("the RecallTrigger schema")?
        .as_ref()
        .clone();
    let pop = Population {
        customers: args.customers,
        tenants: args.tenants,
        t0: args.t0_ms,
        span_ms: DAY_MS,
    };
    let expected: Vec<bool> = (0..pop.customers)
        .map(|i| {
            let c = pop.customer(i);
            recall::arm_for(&c, &policies.of(&c.tenant).lapse) == recall::Arm::Treatment
        })
        .collect();
    let want = expected.iter().filter(|x| **x).count() as u64;

    let machine = Machine::describe();
    let redis_version = redis
        .info("server")
        .await
        .ok()
        .and_then(|i| i.get("redis_version").cloned())
        .unwrap_or_else(|| "?".into());
    let redis_persistence = redis.persistence().await;
    let rate = want as f64 / args.day_seconds;
    println!("machine: {}", machine.one_line());
    println!("redis {redis_version}: persistence {redis_persistence}");
    println!(
        "timers: {} customers ({} tenants), due evenly over one day of event time from {} \
         compressed into {} s: {:.0} timers/s; watermark step every {} ms ({:.1} event-s per step)",
        pop.customers,
        pop.tenants,
        chrono::DateTime::from_timestamp_millis(pop.t0)
            .map_or_else(|| pop.t0.to_string(), |d| d.to_rfc3339()),
        args.day_seconds,
        rate,
        args.step_ms,
        args.step_ms as f64 / 1000.0 * DAY_MS as f64 / 1000.0 / args.day_seconds,
    );
    println!(
        "lapse: {} run --config {}; timers.shards {}, poll_interval {} ms, claim_limit {}, lease {} s (event time); {} triggers expected",
        bin.display(),
        config_path.display(),
        cfg.timers.shards,
        cfg.timers.poll_interval.0.as_millis(),
        cfg.timers.claim_limit,
        cfg.timers.lease.0.as_secs(),
        want,
    );
    println!("config overrides: {}", sets.join("  "));
    println!(
        "work dir (effective config, lapse logs): {}",
        work_dir.display()
    );

    let env = Env {
        args,
        cfg: &cfg,
        bin: &bin,
        sets: &sets,
        work_dir: &work_dir,
        redis: &redis,
        store: &store,
        timers: &timers,
        clock: &clock,
        policies: &policies,
        params: lapse::service::state_params(&cfg),
        pop,
        schema: &schema,
        expected: &expected,
    };
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let r = one_run(&env, run).await?;
        print_run(&r);
        runs.push(r);
    }
    let stat = |f: &dyn Fn(&TimersRun) -> Option<f64>| {
        Stats::of(&runs.iter().filter_map(f).collect::<Vec<_>>())
    };
    let report = TimersReport {
        machine,
        redis_version,
        redis_persistence,
        customers: pop.customers,
        tenants: pop.tenants,
        day_seconds: args.day_seconds,
        timers_per_second: rate,
        step_ms: args.step_ms,
        config_overrides: sets,
        timers_shards: cfg.timers.shards,
        timers_poll_interval_ms: cfg.timers.poll_interval.0.as_millis() as u64,
        timers_claim_limit: cfg.timers.claim_limit,
        wall_lag_p50_ms: stat(&|r| r.analysis.wall_lag_ms.p50),
        wall_lag_p99_ms: stat(&|r| r.analysis.wall_lag_ms.p99),
        wall_lag_p999_ms: stat(&|r| r.analysis.wall_lag_ms.p999),
        wall_lag_max_ms: stat(&|r| r.analysis.wall_lag_ms.max),
        runs,
    };
    print_summary(&report);
    if let Some(p) = &args.child.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", p.display()))?;
        println!("results written to {}", p.display());
    }
    let failed = report
        .runs
        .iter()
        .any(|r| r.analysis.missing > 0 || r.analysis.due_mismatch > 0);
    if failed {
        bail!("triggers were missing or carried the wrong due time (see above)");
    }
    Ok(report)
}

// ---------------------------------------------------------------------------
// Printing
// ---------------------------------------------------------------------------

fn ptiles(p: &Percentiles, prec: usize) -> String {
    format!(
        "p50 {} p99 {} p999 {} max {}",
        opt(p.p50, prec),
        opt(p.p99, prec),
        opt(p.p999, prec),
        opt(p.max, prec)
    )
}

fn print_run(r: &TimersRun) {
    let a = &r.analysis;
    println!(
        "run {}: {}/{} triggers ({} missing, {} duplicates, {} unexpected, {} wrong due_at, {} undecodable); \
         {:.0} timers/s offered over {:.1} s ({} watermark steps, slowest step call {:.1} ms), last trigger {:.2} s after the end of the day",
        r.run,
        a.received,
        a.expected,
        a.missing,
        a.duplicates,
        a.unexpected,
        a.due_mismatch,
        a.undecodable,
        r.offered_timers_per_second,
        r.drive_seconds,
        r.watermark_steps,
        r.slowest_step_call_ms,
        r.drain_seconds,
    );
    if a.missing > 0 {
        println!(
            "  MISSING (first {}): {}",
            a.missing_sample.len(),
            a.missing_sample.join(" ")
        );
    }
    println!("  wall lag ms: {}", ptiles(&a.wall_lag_ms, 0));
    println!(
        "    until the claiming poll's clock (detect): {}; from there to arrival (deliver): {}",
        ptiles(&a.detect_ms, 0),
        ptiles(&a.deliver_ms, 0)
    );
    println!(
        "    by the record's CreateTime: lapse (to its produce call): {}; broker + reader (produce call to read): {}",
        ptiles(&a.to_produce_ms, 0),
        ptiles(&a.produce_to_read_ms, 0)
    );
    println!(
        "    p99 by tenth of the day: {}",
        a.wall_lag_p99_by_tenth_ms
            .iter()
            .map(|v| opt(*v, 0))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let top = r.lapse_event_lag_top_bucket_seconds;
    let sat = |v: Option<f64>| {
        let x = opt(v, 1);
        match (v, top) {
            (Some(v), Some(t)) if v >= t - 1e-9 => format!("{x}(saturated)"),
            _ => x,
        }
    };
    println!(
        "  event lag s (fired_at - due_at, from the triggers): {}; lapse_timer_firing_lag_seconds p50 {} p99 {} p999 {} (top bucket {} s)",
        ptiles(&a.event_lag_seconds, 1),
        sat(r.lapse_event_lag_p50_seconds),
        sat(r.lapse_event_lag_p99_seconds),
        sat(r.lapse_event_lag_p999_seconds),
        opt(top, 1),
    );
    println!(
        "  lapse_timers_overdue max {:.0}; timers fired {} (lost lease {}); CAS conflicts {}; \
         {} produce calls ({:.1} triggers each), produce ms p50 {} p99 {}; redis ms load {} save {}",
        r.overdue_max,
        r.timers_fired,
        r.timers_lost_lease,
        r.cas_conflicts,
        r.produce_calls,
        r.triggers_per_produce_call,
        opt(r.produce_ms_p50, 1),
        opt(r.produce_ms_p99, 1),
        opt(r.redis_load_ms_mean, 2),
        opt(r.redis_save_ms_mean, 2),
    );
    println!(
        "  cpu seconds: lapse {} redis {} broker {}; machine busy {} (1-min load before: {}); lapse {}",
        opt(r.lapse_cpu_seconds, 1),
        opt(r.redis_cpu_seconds, 1),
        opt(r.broker_cpu_seconds, 1),
        pct(r.machine_busy),
        opt(r.load_average_before, 2),
        if r.lapse_exit_ok {
            "exited 0 on SIGTERM"
        } else {
            "did NOT exit 0 on SIGTERM"
        }
    );
}

fn print_summary(rep: &TimersReport) {
    println!();
    println!(
        "== lapse bench timers: {} customers, one day in {} s ({:.0} timers/s), {} runs",
        rep.customers,
        rep.day_seconds,
        rep.timers_per_second,
        rep.runs.len()
    );
    println!("machine: {}", rep.machine.one_line());
    println!(
        "redis {}: persistence {}",
        rep.redis_version, rep.redis_persistence
    );
    println!(
        "timers: shards {}, poll_interval {} ms, claim_limit {}; overrides: {}",
        rep.timers_shards,
        rep.timers_poll_interval_ms,
        rep.timers_claim_limit,
        rep.config_overrides.join("  ")
    );
    println!(
        "{:>4} {:>9} {:>7} {:>4} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7} {:>6} {:>6} {:>5} {:>6} {:>5}",
        "run", "triggers", "missing", "dup", "p50 ms", "p99 ms", "p999 ms", "max ms", "overdue", "cpu:lps", "redis", "broker", "busy", "load", "setup", "exit"
    );
    for r in &rep.runs {
        let a = &r.analysis;
        println!(
            "{:>4} {:>9} {:>7} {:>4} {:>7} {:>7} {:>7} {:>7} {:>8.0} {:>7} {:>7} {:>6} {:>6} {:>5} {:>6} {:>5}",
            r.run,
            a.received,
            a.missing,
            a.duplicates,
            opt(a.wall_lag_ms.p50, 0),
            opt(a.wall_lag_ms.p99, 0),
            opt(a.wall_lag_ms.p999, 0),
            opt(a.wall_lag_ms.max, 0),
            r.overdue_max,
            opt(r.lapse_cpu_seconds, 1),
            opt(r.redis_cpu_seconds, 1),
            opt(r.broker_cpu_seconds, 1),
            pct(r.machine_busy),
            opt(r.load_average_before, 2),
            format!("{:.0}s", r.setup_seconds),
            if r.lapse_exit_ok { "0" } else { "FAIL" },
        );
    }
    println!(
        "median wall firing lag: p50 {:.0} ms, p99 {:.0} ms, p999 {:.0} ms, max {:.0} ms \
         (due time reached by the watermark → trigger read by the benchmark)",
        rep.wall_lag_p50_ms.median,
        rep.wall_lag_p99_ms.median,
        rep.wall_lag_p999_ms.median,
        rep.wall_lag_max_ms.median,
    );
    println!(
        "columns: overdue = max of lapse_timers_overdue, cpu:lps/redis/broker = CPU seconds during the run \
         (day + drain), busy = whole-machine CPU use, load = 1-min load average before the run, \
         setup = states and timers written (not timed)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapse::domain::policy::PolicyConfig;

    fn pop(n: u64) -> Population {
        Population {
            customers: n,
            tenants: 4,
            t0: DEFAULT_T0_MS,
            span_ms: DAY_MS,
        }
    }

    #[test]
    fn due_times_are_spread_over_the_day_and_customers_round_trip() {
        let p = pop(1_000_000);
        assert_eq!(p.due(0), p.t0);
        assert_eq!(p.due(500_000), p.t0 + DAY_MS / 2);
        assert!(p.due(999_999) < p.t0 + DAY_MS);
        assert_eq!(p.due(1) - p.due(0), 86);
        for i in [0, 1, 3, 4, 999_999] {
            assert_eq!(p.index_of(&p.customer(i)), Some(i));
        }
        assert_eq!(
            p.index_of(&CustomerRef::new("clinic-2", "cust-0000000")),
            None
        );
        assert_eq!(
            p.index_of(&CustomerRef::new("clinic-1", "cust-1000000")),
            None
        );
        assert_eq!(p.index_of(&CustomerRef::new("clinic-1", "x")), None);
        assert_eq!(p.tenth(p.t0), 0);
        assert_eq!(p.tenth(p.t0 + DAY_MS - 1), 9);
        assert_eq!(p.tenth(p.t0 + DAY_MS / 10), 1);
    }

    #[test]
    fn watermark_follows_wall_time_and_stops_at_the_end_of_the_day() {
        let day = Duration::from_secs(300);
        assert_eq!(watermark_offset(Duration::ZERO, day, DAY_MS), 0);
        // 50 ms of wall time at 300 s per day = 14.4 s of event time.
        assert_eq!(
            watermark_offset(Duration::from_millis(50), day, DAY_MS),
            14_400
        );
        assert_eq!(
            watermark_offset(Duration::from_secs(150), day, DAY_MS),
            DAY_MS / 2
        );
        assert_eq!(
            watermark_offset(Duration::from_secs(301), day, DAY_MS),
            DAY_MS
        );
    }

    #[test]
    fn a_due_time_is_reached_by_the_first_step_at_or_past_it() {
        let mut log = WatermarkLog::default();
        let ms = Duration::from_millis;
        log.push(99, ms(0));
        log.push(100, ms(50));
        log.push(100, ms(60)); // did not move: reaches nothing new
        log.push(130, ms(100));
        log.push(125, ms(110)); // backwards: ignored
        log.push(200, ms(150));
        assert_eq!(log.len(), 4);
        assert_eq!(log.reached_at(50), Some(ms(0)));
        assert_eq!(log.reached_at(99), Some(ms(0)));
        assert_eq!(log.reached_at(100), Some(ms(50)));
        assert_eq!(log.reached_at(101), Some(ms(100)));
        assert_eq!(log.reached_at(130), Some(ms(100)));
        assert_eq!(log.reached_at(131), Some(ms(150)));
        assert_eq!(log.reached_at(200), Some(ms(150)));
        assert_eq!(log.reached_at(201), None);
        assert_eq!(log.first(), Some((99, ms(0))));
        assert_eq!(log.last(), Some((200, ms(150))));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), Some(500.0));
        assert_eq!(percentile(&v, 0.99), Some(990.0));
        assert_eq!(percentile(&v, 0.999), Some(999.0));
        assert_eq!(percentile(&v, 1.0), Some(1000.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7.0], 0.999), Some(7.0));
        let p = Percentiles::of(vec![3.0, 1.0, f64::NAN, 2.0]);
        assert_eq!(
            (p.count, p.p50, p.max, p.mean),
            (3, Some(2.0), Some(3.0), Some(2.0))
        );
        assert_eq!(Percentiles::of(vec![]).p50, None);
    }

    #[test]
    fn analysis_matches_triggers_to_due_times_and_counts_failures() {
        let p = Population {
            customers: 4,
            tenants: 2,
            t0: 1_000,
            span_ms: 400,
        };
        // Dues: 1000, 1100, 1200, 1300. The watermark reaches them 10 ms apart.
        let ms = Duration::from_millis;
        let mut log = WatermarkLog::default();
        for k in 0..=4 {
            log.push(1_000 + 100 * k, ms(10 * k as u64));
        }
        let seen = |i: u64, fired_step: i64, id: &str| Seen {
            trigger_id: id.into(),
            customer: p.customer(i),
            due_at: p.due(i),
            fired_at: p.due(i) + fired_step * 100,
        };
        let arr = |at: u64, produced: u64, seen: Option<Seen>| Arrival {
            at: ms(at),
            produced_ms: Some(produced as f64),
            seen,
        };
        let arrivals = vec![
            // Customer 0: claimed one step late, produced at 20 ms, arrives
            // 25 ms after its due was reached.
            arr(25, 20, Some(seen(0, 1, "a"))),
            // Customer 1: on time, 5 ms.
            arr(15, 12, Some(seen(1, 0, "b"))),
            arr(16, 12, Some(seen(1, 0, "b"))),  // exact repeat
            arr(17, 12, Some(seen(1, 0, "b2"))), // another trigger for the same customer
            arr(18, 12, None),                   // undecodable
            arr(
                19,
                12,
                Some(Seen {
                    customer: CustomerRef::new("other", "cust-0000001"),
                    ..seen(1, 0, "z")
                }),
            ),
            // Customer 3 with a wrong due time (reached at 30 ms), no CreateTime.
            Arrival {
                at: ms(40),
                produced_ms: None,
                seen: Some(Seen {
                    due_at: 1_250,
                    ..seen(3, 0, "d")
                }),
            },
        ];
        let a = analyse(&p, &|_| true, &log, &arrivals);
        assert_eq!(a.expected, 4);
        assert_eq!(a.received, 3);
        assert_eq!(a.missing, 1);
        assert_eq!(
            a.missing_sample,
            vec!["clinic-1/cust-0000002@1200".to_string()]
        );
        assert_eq!(a.duplicates, 1);
        assert_eq!(a.unexpected, 2);
        assert_eq!(a.undecodable, 1);
        assert_eq!(a.due_mismatch, 1);
        assert_eq!(a.wall_lag_ms.count, 3);
        assert_eq!(a.wall_lag_ms.max, Some(25.0));
        assert_eq!(a.wall_lag_ms.p50, Some(10.0));
        assert_eq!(a.detect_ms.max, Some(10.0));
        assert_eq!(
            (a.deliver_ms.p50, a.deliver_ms.max),
            (Some(10.0), Some(15.0))
        );
        assert_eq!(a.event_lag_seconds.max, Some(0.1));
        // CreateTime split: customer 0 produced 20 ms after its due was reached,
        // read 5 ms later; customer 1: 2 ms and 3 ms.
        assert_eq!(a.to_produce_ms.count, 2);
        assert_eq!(
            (a.to_produce_ms.p50, a.to_produce_ms.max),
            (Some(2.0), Some(20.0))
        );
        assert_eq!(
            (a.produce_to_read_ms.p50, a.produce_to_read_ms.max),
            (Some(3.0), Some(5.0))
        );
        assert_eq!(a.last_arrival, Some(ms(40)));
        assert_eq!(a.wall_lag_p99_by_tenth_ms.len(), 10);
        // With customer 2 held out, nobody is missing.
        let b = analyse(&p, &|i| i != 2, &log, &arrivals);
        assert_eq!((b.expected, b.missing), (3, 0));
    }

    #[test]
    fn built_customers_fire_exactly_one_trigger_at_their_due_time() {
        let mut cfg = PolicyConfig::default();
        cfg.lapse.holdout_share = 0.0;
        let policies = Policies::new(&cfg).unwrap();
        let params = StateParams::default();
        let p = pop(1000);
        for i in [0, 1, 2, 3, 517, 999] {
            let c = p.customer(i);
            let policy = policies.of(&c.tenant);
            let (c2, mut st, due) =
                build_customer(&p, i, policy, &params, p.t0 + 2 * DAY_MS).unwrap();
            assert_eq!(c2, c);
            assert_eq!(due, p.due(i));
            assert_eq!(st.timer_due, Some(due));
            // Round-trips through the stored blob.
            let blob = lapse::store::blob::encode(1, &st);
            assert_eq!(lapse::store::blob::decode(&blob).unwrap().1, st);
            let ctx = recall::FireCtx {
                customer: &c,
                visits: &st.visits.clone(),
                policy: &policy.lapse,
                candidates: &recall::candidates(&st, due, params.horizons, &policy.lapse, |_| true),
                costs: &policy.costs,
            };
            assert!(recall::fire_due(&mut st.recall, due - 1, &ctx).is_empty());
            let fired = recall::fire_due(&mut st.recall, due + 60_000, &ctx);
            assert_eq!(fired.len(), 1, "{fired:?}");
            let recall::Fired::Trigger(t) = &fired[0] else {
                panic!("{fired:?}")
            };
            assert_eq!(
                (t.stage, t.due_at, t.arm),
                (Stage::AtRisk, due, recall::Arm::Treatment)
            );
            assert!(fired[0].output().is_some());
            // The next stage is far after the day.
            let next = recall::next_due(&st.recall, &st.visits, &policy.lapse).unwrap();
            assert!(next.due_at > p.t0 + 30 * DAY_MS);
        }
    }
}
