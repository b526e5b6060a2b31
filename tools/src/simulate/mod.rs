//! `lapse-tools simulate`: realistic clinic traffic for the five input topics.
//!
//! A population of customers over tenants (clinic brands) lives day by day
//! ([`model`]): treatment visits at their own cadence (BOTOX ~120 d, FILLER
//! ~270 d, LASER and SKIN_CARE ~30 d, prospects' consultations) with
//! log-normal spend, campaigns over five channels, opens and clicks that fall
//! with over-contact and recover with rest, opt-out and re-subscribe replies
//! in the words customers use, churn, and customers who come back after a
//! recall. Events are Avro single-object encoded and keyed `TENANT/CUSTOMER`.
//!
//! The simulator reads lapse's decisions back ([`feedback`]): a TREATMENT-arm
//! customer named in `recall.triggers` is contacted on the recommended channel
//! and may book a visit within the attribution window (held-out customers get
//! no trigger, so only their natural return rate: the uplift is measurable);
//! the sender follows `engagement.throttle` (skips CAPPED/THROTTLED channels
//! until `allowed_from`, SUPPRESSED ones until re-subscribed) and counts its
//! own sends against `policy.caps` in between (a decision reaches it only on
//! the next simulated day), except for a rogue share that ignores both, so cap
//! violations still show up.
//!
//! Modes:
//! * `--compressed` (default): simulated time starts `--days` before today's
//!   local midnight and advances day by day as fast as lapse applies it —
//!   after producing a day, the simulator waits until lapse's consumer group
//!   has committed it (`--ahead-days` of slack), so with `[clock] mode =
//!   "event"` lapse's timers fire as the days pass. No event is ever stamped
//!   after the wall clock. `--rate N` caps the events/s.
//! * `--live`: simulated time is the wall clock, from today's local midnight;
//!   each event is produced when its time comes (earlier ones of the first day
//!   are skipped).
//!
//! Deterministic (see [`model`]): a customer's events depend only on `--seed`,
//! the customer (tenant, number), the start date and, for prospects, `--days`
//! — not on `--customers` nor on any other customer. The start date is today
//! minus `--days`, so runs on different days differ in dates and weekday-bound
//! campaigns. Without feedback (`--no-feedback`, or no lapse running) the events
//! and their order per customer are exactly reproducible; with feedback they
//! also depend on the simulated day each trigger or throttle decision arrives,
//! which depends on lapse's timing. Event ids are deterministic too
//! (`s<seed>d<day>t<tenant>c<customer>n<k>`).
//!
//! Bounded: a fixed-size state per customer, one simulated day of events in
//! memory, at most `--max-in-flight` unacknowledged produce requests.

pub mod feedback;
pub mod model;
pub mod report;
pub mod rng;
pub mod satisfaction;

use lapse::domain::event::INPUT_KINDS;
use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use chrono_tz::Tz;
use futures::stream::{FuturesUnordered, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::warn;

use feedback::{Feedback, FeedbackReader, FeedbackTopics};
use lapse::codec::{Encoder, Framing, SchemaSet, RECALL_TRIGGER, THROTTLE_EVENT};
use lapse::config::Config;
use lapse::domain::event::{Channel, EventKind};
use model::{Params, Population, SimEvent, Stats};

#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {
    /// TOML config file (topic names, brokers, group id, time zone, schemas dir).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Bootstrap servers; overrides `kafka.brokers` and LAPSE_KAFKA_BROKERS.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Customers in all (spread over the tenants, the first brand biggest).
    #[arg(long, default_value_t = 10_000)]
    pub customers: u32,
    /// Tenants (clinic brands).
    #[arg(long, default_value_t = 3)]
    pub tenants: u32,
    /// Simulated days.
    #[arg(long, default_value_t = 180)]
    pub days: u32,
    /// Random seed: the same seed (and sizes and start date) gives the same events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Compressed history (the default): start --days before today, advance
    /// day by day as fast as lapse keeps up. For lapse with `[clock] mode = "event"`.
    #[arg(long, conflicts_with = "live")]
    pub compressed: bool,
    /// Wall-clock time: start today, produce each event when its time comes.
    #[arg(long)]
    pub live: bool,
    /// Target events/s in compressed mode (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Compressed mode: produce day d+1 once lapse's group has committed day d-N.
    #[arg(long, default_value_t = 0)]
    pub ahead_days: u32,
    /// Do not wait for lapse's consumer group (e.g. to pre-fill the topics).
    #[arg(long)]
    pub no_pace: bool,
    /// Consumer group to pace by (default: `kafka.group_id`).
    #[arg(long)]
    pub group: Option<String>,
    /// Stop pacing when the group commits nothing new for this many seconds.
    #[arg(long, default_value_t = 60)]
    pub pace_timeout_secs: u64,
    /// Do not read recall triggers and throttle decisions back.
    #[arg(long)]
    pub no_feedback: bool,
    /// The sender ignores throttle decisions (every restricted send is a violation).
    #[arg(long)]
    pub ignore_throttle: bool,
    /// Share of restricted marketing sends made anyway (cap violations).
    #[arg(long, default_value_t = 0.03)]
    pub rogue_share: f64,
    /// Unacknowledged produce requests at most.
    #[arg(long, default_value_t = 20_000)]
    pub max_in_flight: usize,
    /// Generate and count the events without producing them (no broker needed).
    #[arg(long)]
    pub dry_run: bool,
    /// Progress line interval, seconds (0: none).
    #[arg(long, default_value_t = 2.0)]
    pub progress_secs: f64,
}

impl Default for SimulateArgs {
    fn default() -> Self {
        SimulateArgs {
            config: None,
            brokers: None,
            customers: 10_000,
            tenants: 3,
            days: 180,
            seed: 42,
            compressed: false,
            live: false,
            rate: 0,
            ahead_days: 0,
            no_pace: false,
            group: None,
            pace_timeout_secs: 60,
            no_feedback: false,
            ignore_throttle: false,
            rogue_share: 0.03,
            max_in_flight: 20_000,
            dry_run: false,
            progress_secs: 2.0,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub customers: usize,
    pub tenants: Vec<String>,
    pub days: u32,
    pub live: bool,
    pub first_day: chrono::NaiveDate,
    pub last_day: chrono::NaiveDate,
    pub elapsed: Duration,
    /// Events produced (and acknowledged), by [`EventKind::index`].
    pub produced: [u64; INPUT_KINDS],
    /// Live mode: events of the first day before the start, not produced.
    pub skipped_past: u64,
    pub stats: Stats,
    pub churned: usize,
    pub high_value: usize,
    pub visited: usize,
    pub opted_out: usize,
    /// Whether the run ended with lapse's group caught up with everything
    /// produced (None: the run did not wait for lapse).
    pub caught_up: Option<bool>,
}

impl Summary {
    pub fn total(&self) -> u64 {
        self.produced.iter().sum()
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// Best contact hours, measured: recall messages sent at the trigger's
/// `send_after` against those sent at a random allowed time (customers split
/// at random by the simulator), with the two-proportion z of the click rates.
struct RecallTiming<'a>(&'a [[u64; 4]; 2]);

impl fmt::Display for RecallTiming<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = |x: u64, n: u64| (n > 0).then(|| x as f64 / n as f64);
        let pct = |r: Option<f64>| r.map_or("-".into(), |r| format!("{:.1}%", 100.0 * r));
        let arm = |a: &[u64; 4]| {
            format!(
                "{} sends, opened {}, clicked {}, booked {}",
                thousands(a[0]),
                pct(rate(a[1], a[0])),
                pct(rate(a[2], a[0])),
                pct(rate(a[3], a[0]))
            )
        };
        let [timed, random] = self.0;
        write!(
            f,
            "recall timing: at send_after (good hours) {}; at a random allowed time {}",
            arm(timed),
            arm(random)
        )?;
        let gain = rate(timed[2], timed[0]).zip(rate(random[2], random[0]));
        if let Some((a, b)) = gain {
            let z = report::z_score(
                timed[2] as f64,
                timed[0] as f64,
                random[2] as f64,
                random[0] as f64,
            );
            write!(
                f,
                "; click-rate gain {:+.1} points{}",
                100.0 * (a - b),
                z.map_or(String::new(), |z| format!(" (z = {z:.1})"))
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64().max(1e-3);
        let s = &self.stats;
        writeln!(
            f,
            "simulated {} days ({} .. {}, {}) for {} customers of {} tenants ({}) in {:.1} s",
            self.days,
            self.first_day,
            self.last_day,
            if self.live { "live" } else { "compressed" },
            thousands(self.customers as u64),
            self.tenants.len(),
            self.tenants.join(", "),
            secs
        )?;
        writeln!(
            f,
            "  events produced: {} ({}/s): {}",
            thousands(self.total()),
            thousands((self.total() as f64 / secs) as u64),
            EventKind::ALL
                .iter()
                .map(|k| format!("{} {}", k.label(), thousands(self.produced[k.index()])))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        if self.skipped_past > 0 {
            writeln!(
                f,
                "  events before the start, not produced: {}",
                self.skipped_past
            )?;
        }
        writeln!(
            f,
            "  sends (marketing/service): {}",
            Channel::ALL
                .iter()
                .map(|c| format!(
                    "{} {}/{}",
                    c.label(),
                    thousands(s.sends[c.index()][0]),
                    thousands(s.sends[c.index()][1])
                ))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            f,
            "  sender: skipped (obeying lapse) capped {}, throttled {}, suppressed {}; rogue sends {}; late-evening sends {}",
            s.skipped[1], s.skipped[2], s.skipped[3], s.rogue, s.evening
        )?;
        writeln!(
            f,
            "  replies: unsubscribe {}, resubscribe {}, positive {}, neutral {}; customer x channel opted out at the end: {}",
            s.replies[0], s.replies[1], s.replies[2], s.replies[3], self.opted_out
        )?;
        writeln!(
            f,
            "  visits: natural {}, after a recall {}; customers with a visit {}; churn decisions {}, churned at the end {}; high value (>= threshold) {}",
            s.visits_natural,
            s.visits_after_recall,
            self.visited,
            s.churn_decisions,
            self.churned,
            self.high_value
        )?;
        write!(
            f,
            "  recall triggers received: high_value_lapsed {}, at_risk {}, low_value_lapsed {} ({} without a channel); recall sends {}, bookings {}; throttle decisions read {}",
            s.triggers[0],
            s.triggers[1],
            s.triggers[2],
            s.triggers_without_channel,
            s.recall_sends,
            s.recall_bookings,
            s.throttle_decisions
        )?;
        write!(f, "\n  {}", RecallTiming(&s.recall_timing))?;
        write!(f, "\n  {}", s.satisfaction)?;
        if s.holdout_triggers > 0 || s.foreign_feedback > 0 {
            write!(
                f,
                "\n  (holdout triggers on the topic: {}; feedback about unknown customers: {})",
                s.holdout_triggers, s.foreign_feedback
            )?;
        }
        if self.caught_up == Some(false) {
            write!(
                f,
                "\n  (lapse had not caught up when the simulator stopped waiting)"
            )?;
        }
        Ok(())
    }
}

/// `lapse-tools simulate`: load the config, run, print the summary.
pub async fn main(args: SimulateArgs) -> anyhow::Result<()> {
    let cfg = Config::load(args.config.as_deref())?;
    // Ctrl-C: stop producing, flush, print what was done.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::Relaxed);
        }
    });
    let summary = run_until(&cfg, &args, stop).await?;
    // A closed stdout (`| head`) is not an error worth a panic.
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{summary}");
    Ok(())
}

type InFlight = Pin<
    Box<
        dyn Future<
                Output = (
                    usize,
                    Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
                ),
            > + Send,
    >,
>;

/// The producer side: bounded in-flight sends, offsets of what was acknowledged.
struct Out {
    /// None in a dry run: events are counted, not produced.
    producer: Option<FutureProducer>,
    topics: [String; INPUT_KINDS],
    in_flight: FuturesUnordered<InFlight>,
    max_in_flight: usize,
    /// (kind index, partition) → offset after the last acknowledged record.
    produced_offsets: BTreeMap<(usize, i32), i64>,
    produced: [u64; INPUT_KINDS],
}

impl Out {
    async fn send(&mut self, kind: usize, key: &str, bytes: &[u8]) -> anyhow::Result<()> {
        loop {
            while self.in_flight.len() >= self.max_in_flight {
                self.reap_one().await?;
            }
            let Some(producer) = &self.producer else {
                self.produced[kind] += 1;
                return Ok(());
            };
            let rec = FutureRecord::to(&self.topics[kind]).key(key).payload(bytes);
            match producer.send_result(rec) {
                Ok(fut) => {
                    self.in_flight
                        .push(Box::pin(async move { (kind, fut.await) }));
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if !self.reap_one().await? {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                Err((e, _)) => anyhow::bail!("producing to {}: {e}", self.topics[kind]),
            }
        }
    }

    /// Waits for one acknowledgement; false when nothing is in flight.
    async fn reap_one(&mut self) -> anyhow::Result<bool> {
        match self.in_flight.next().await {
            None => Ok(false),
            Some((kind, Ok(Ok(d)))) => {
                let e = self
                    .produced_offsets
                    .entry((kind, d.partition))
                    .or_insert(0);
                *e = (*e).max(d.offset + 1);
                self.produced[kind] += 1;
                Ok(true)
            }
            Some((kind, Ok(Err((e, _))))) => {
                anyhow::bail!("producing to {}: {e}", self.topics[kind])
            }
            Some((_, Err(_))) => anyhow::bail!("the producer went away"),
        }
    }

    async fn drain(&mut self) -> anyhow::Result<()> {
        while self.reap_one().await? {}
        Ok(())
    }
}

/// Waits for lapse's consumer group to commit what was produced.
struct Pacer {
    consumer: Arc<BaseConsumer>,
    group: String,
    topics: [String; INPUT_KINDS],
    timeout: Duration,
    enabled: bool,
}

impl Pacer {
    async fn committed(&self, want: &BTreeMap<(usize, i32), i64>) -> BTreeMap<(usize, i32), i64> {
        let mut tpl = TopicPartitionList::new();
        for (k, p) in want.keys() {
            tpl.add_partition(&self.topics[*k], *p);
        }
        let c = self.consumer.clone();
        let topics = self.topics.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(got) = c.committed_offsets(tpl, Duration::from_secs(5)) else {
                return BTreeMap::new();
            };
            got.elements()
                .iter()
                .filter_map(|e| {
                    let k = topics.iter().position(|t| t == e.topic())?;
                    match e.offset() {
                        Offset::Offset(o) => Some(((k, e.partition()), o)),
                        _ => None,
                    }
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// True once every partition in `want` is committed up to its offset; false
    /// when the group stopped making progress (pacing is then switched off).
    async fn wait(
        &mut self,
        want: &BTreeMap<(usize, i32), i64>,
        stop: &AtomicBool,
        mut tick: impl FnMut(),
    ) -> bool {
        if !self.enabled || want.is_empty() {
            return self.enabled;
        }
        let mut last_sum = i64::MIN;
        let mut last_change = Instant::now();
        loop {
            let got = self.committed(want).await;
            if want.iter().all(|(k, v)| got.get(k).is_some_and(|c| c >= v)) {
                return true;
            }
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            let sum: i64 = got.values().sum();
            if sum != last_sum {
                last_sum = sum;
                last_change = Instant::now();
            } else if last_change.elapsed() > self.timeout {
                warn!(
                    group = %self.group,
                    "lapse's consumer group committed nothing new for {:?}; producing without waiting from now on",
                    self.timeout
                );
                self.enabled = false;
                return false;
            }
            tick();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Progress {
    every: Option<Duration>,
    started: Instant,
    last: Instant,
    last_events: u64,
}

impl Progress {
    #[allow(clippy::too_many_arguments)]
    fn line(
        &mut self,
        force: bool,
        day: u32,
        days: u32,
        date: chrono::NaiveDate,
        events: u64,
        stats: &Stats,
        waiting: bool,
    ) {
        let Some(every) = self.every else { return };
        let now = Instant::now();
        if !force && now.duration_since(self.last) < every {
            return;
        }
        let dt = now.duration_since(self.last).as_secs_f64().max(1e-3);
        let rate = (events.saturating_sub(self.last_events)) as f64 / dt;
        eprintln!(
            "simulate: day {}/{} {} | {} events | {}/s | triggers {} | throttle decisions {} | {:.0} s{}",
            day + 1,
            days,
            date,
            thousands(events),
            thousands(rate as u64),
            stats.triggers.iter().sum::<u64>(),
            stats.throttle_decisions,
            now.duration_since(self.started).as_secs_f64(),
            if waiting { " | waiting for lapse" } else { "" }
        );
        self.last = now;
        self.last_events = events;
    }
}

/// The arguments' bounds.
fn validate(args: &SimulateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.customers >= 1, "--customers must be at least 1");
    anyhow::ensure!(
        args.tenants >= 1 && args.tenants <= args.customers,
        "--tenants must be between 1 and --customers"
    );
    anyhow::ensure!(args.days >= 1, "--days must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.rogue_share),
        "--rogue-share must be between 0 and 1"
    );
    anyhow::ensure!(
        args.max_in_flight >= 1,
        "--max-in-flight must be at least 1"
    );
    Ok(())
}

/// The population, its senders obeying the configured caps.
fn population(
    cfg: &Config,
    args: &SimulateArgs,
    tz: Tz,
    first_day: chrono::NaiveDate,
) -> Population {
    let mut params = Params {
        obey_throttle: !args.ignore_throttle,
        rogue_share: args.rogue_share,
        ..Params::default()
    };
    for ch in Channel::ALL {
        params.sender_caps[ch.index()] = cfg
            .policy
            .caps
            .get(&ch)
            .map_or((0, 0), |r| (r.limit, r.window.as_ms()));
    }
    let pop = Population::new(
        params,
        args.seed,
        args.customers,
        args.tenants,
        args.days,
        tz,
        first_day,
        cfg.policy.lapse.high_value_threshold,
    );
    // With experiments, each customer's caps are their arm's (the config was
    // validated by `Config::load`).
    match lapse::domain::policy::Policies::new(&cfg.policy) {
        Ok(p) if !p.experiments().is_empty() => pop.with_policies(std::sync::Arc::new(p)),
        _ => pop,
    }
}

/// The reader of lapse's decisions (triggers, and throttle events unless
/// `--ignore-throttle`); none with `--no-feedback` or `--dry-run`.
fn feedback_reader(
    cfg: &Config,
    args: &SimulateArgs,
    schemas: &SchemaSet,
) -> anyhow::Result<Option<FeedbackReader>> {
    if args.no_feedback || args.dry_run {
        return Ok(None);
    }
    let schema = |n: &str| {
        schemas
            .by_name(n)
            .map(|s| (**s).clone())
            .ok_or_else(|| anyhow::anyhow!("schema {n} missing from {}", cfg.schema.dir.display()))
    };
    Ok(Some(FeedbackReader::start(
        &cfg.kafka.brokers,
        &cfg.kafka.consumer_properties,
        FeedbackTopics {
            triggers: Some(cfg.kafka.topics.triggers.clone()),
            throttle: (!args.ignore_throttle).then(|| cfg.kafka.topics.throttle.clone()),
        },
        schema(RECALL_TRIGGER)?,
        schema(THROTTLE_EVENT)?,
    )?))
}

/// The idempotent producer to the input topics (none with `--dry-run`).
fn output(
    cfg: &Config,
    args: &SimulateArgs,
    topics: &[String; INPUT_KINDS],
) -> anyhow::Result<Out> {
    let mut pc = ClientConfig::new();
    pc.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("client.id", "lapse-simulate")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("linger.ms", "10")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        .set("message.timeout.ms", "120000");
    for (k, v) in &cfg.kafka.producer_properties {
        pc.set(k, v);
    }
    Ok(Out {
        producer: if args.dry_run {
            None
        } else {
            Some(
                pc.create()
                    .context("creating the producer (kafka.brokers)")?,
            )
        },
        topics: topics.clone(),
        in_flight: FuturesUnordered::new(),
        max_in_flight: args.max_in_flight,
        produced_offsets: BTreeMap::new(),
        produced: [0; INPUT_KINDS],
    })
}

/// The pacer that keeps the simulation at most `--ahead-days` ahead of lapse's
/// consumer group (compressed mode, unless `--no-pace` or `--dry-run`).
fn pacer(
    cfg: &Config,
    args: &SimulateArgs,
    topics: &[String; INPUT_KINDS],
) -> anyhow::Result<Option<Pacer>> {
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| cfg.kafka.group_id.clone());
    Ok(if !args.live && !args.no_pace && !args.dry_run {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.kafka.brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false");
        for (k, v) in &cfg.kafka.consumer_properties {
            cc.set(k, v);
        }
        Some(Pacer {
            consumer: Arc::new(cc.create().context("creating the pacing client")?),
            group: group.clone(),
            topics: topics.clone(),
            timeout: Duration::from_secs(args.pace_timeout_secs.max(1)),
            enabled: true,
        })
    } else {
        None
    })
}

/// Runs the simulation against the brokers of `cfg` (see the module docs).
pub async fn run(cfg: &Config, args: &SimulateArgs) -> anyhow::Result<Summary> {
    run_until(cfg, args, Arc::new(AtomicBool::new(false))).await
}

/// [`run`], stopping early (after flushing what was produced) once `stop` is set.
pub async fn run_until(
    cfg: &Config,
    args: &SimulateArgs,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Summary> {
    validate(args)?;
    let mut cfg = cfg.clone();
    if let Some(b) = &args.brokers {
        cfg.kafka.brokers = b.clone();
    }
    let schemas = SchemaSet::load(&cfg.schema.dir)
        .with_context(|| format!("loading schemas from {}", cfg.schema.dir.display()))?;
    let encoder = Encoder::new(&schemas);
    if cfg.kafka.create_topics && !args.dry_run {
        lapse::kafka::admin::ensure_topics(&cfg.kafka)
            .await
            .context("creating missing topics (kafka.brokers)")?;
    }
    let tz: Tz = cfg.policy.timezone.parse().map_err(|_| {
        anyhow::anyhow!(
            "policy.timezone `{}` is not a time zone",
            cfg.policy.timezone
        )
    })?;
    let run_start = Utc::now();
    let today = run_start.with_timezone(&tz).date_naive();
    let live = args.live;
    let first_day = if live {
        today
    } else {
        today - chrono::Days::new(args.days as u64)
    };
    let mut pop = population(&cfg, args, tz, first_day);

    let reader = feedback_reader(&cfg, args, &schemas)?;

    let topics = cfg.kafka.topics.inputs().map(str::to_string);
    let mut out = output(&cfg, args, &topics)?;

    let mut pacer = pacer(&cfg, args, &topics)?;

    let started = Instant::now();
    let mut progress = Progress {
        every: (args.progress_secs > 0.0).then(|| Duration::from_secs_f64(args.progress_secs)),
        started,
        last: started,
        last_events: 0,
    };
    let mut events: Vec<SimEvent> = Vec::new();
    let mut snapshots: std::collections::VecDeque<BTreeMap<(usize, i32), i64>> =
        std::collections::VecDeque::new();
    let mut skipped_past = 0u64;
    let mut rate_next = Instant::now();
    let per_event = (args.rate > 0).then(|| Duration::from_secs_f64(1.0 / args.rate as f64));
    let mut last_day = first_day;
    let mut caught_up = None;

    'days: for d in 0..args.days {
        apply_feedback(reader.as_ref(), &mut pop);
        events.clear();
        let day = pop.day(d, &mut events);
        last_day = day.date;
        let now_ms = Utc::now().timestamp_millis();
        for ev in &events {
            if stop.load(Ordering::Relaxed) {
                break 'days;
            }
            let at = ev.event.occurred_at;
            if live {
                if at < run_start.timestamp_millis() {
                    skipped_past += 1;
                    continue;
                }
                loop {
                    let wait = at - Utc::now().timestamp_millis();
                    if wait <= 0 || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(wait.min(500) as u64)).await;
                    progress.line(
                        false,
                        d,
                        args.days,
                        day.date,
                        out.produced.iter().sum(),
                        &pop.stats,
                        false,
                    );
                }
            } else {
                // Never stamp an event after the wall clock.
                debug_assert!(at <= now_ms, "compressed events are in the past");
                if at > now_ms {
                    continue;
                }
                if let Some(step) = per_event {
                    rate_next += step;
                    let now = Instant::now();
                    if rate_next > now + Duration::from_millis(5) {
                        tokio::time::sleep_until(rate_next.into()).await;
                    } else if rate_next + Duration::from_secs(1) < now {
                        rate_next = now;
                    }
                }
            }
            let bytes = encoder
                .encode_event(&ev.event, ev.text, Framing::SingleObject)
                .context("encoding an event")?;
            out.send(ev.event.kind().index(), &ev.event.customer.key(), &bytes)
                .await?;
            progress.line(
                false,
                d,
                args.days,
                day.date,
                out.produced.iter().sum(),
                &pop.stats,
                false,
            );
        }
        out.drain().await?;
        if let Some(p) = pacer.as_mut() {
            snapshots.push_back(out.produced_offsets.clone());
            while snapshots.len() > args.ahead_days as usize {
                let want = snapshots.pop_front().expect("non-empty");
                let produced: u64 = out.produced.iter().sum();
                let stats = &pop.stats;
                p.wait(&want, &stop, || {
                    progress.line(false, d, args.days, day.date, produced, stats, true)
                })
                .await;
            }
            // The next day's sender knows what lapse decided so far.
            if let Some(r) = reader
                .as_ref()
                .filter(|_| p.enabled && !args.ignore_throttle)
            {
                r.sync(Duration::from_secs(5)).await;
            }
        }
        progress.line(
            d + 1 == args.days,
            d,
            args.days,
            day.date,
            out.produced.iter().sum(),
            &pop.stats,
            false,
        );
    }
    out.drain().await?;
    if let Some(p) = &out.producer {
        p.flush(Duration::from_secs(30))
            .context("flushing the producer")?;
    }
    if let Some(p) = pacer.as_mut() {
        let want = out.produced_offsets.clone();
        let produced: u64 = out.produced.iter().sum();
        let stats = pop.stats.clone();
        caught_up = Some(
            p.wait(&want, &stop, || {
                progress.line(
                    false,
                    args.days.saturating_sub(1),
                    args.days,
                    last_day,
                    produced,
                    &stats,
                    true,
                )
            })
            .await,
        );
    }
    // Feedback that arrived after the last day still counts in the summary.
    apply_feedback(reader.as_ref(), &mut pop);
    drop(reader);
    Ok(Summary {
        customers: pop.customers(),
        tenants: pop.tenants().to_vec(),
        days: args.days,
        live,
        first_day,
        last_day,
        elapsed: started.elapsed(),
        produced: out.produced,
        skipped_past,
        stats: pop.stats.clone(),
        churned: pop.churned(),
        high_value: pop.high_value(),
        visited: pop.visited(),
        opted_out: pop.opted_out(),
        caught_up,
    })
}

/// Applies the recall triggers and throttle decisions read so far to the population.
fn apply_feedback(reader: Option<&FeedbackReader>, pop: &mut Population) {
    let Some(r) = reader else { return };
    while let Ok(fb) = r.rx.try_recv() {
        match fb {
            Feedback::Trigger(t) => {
                pop.apply_trigger(&t);
            }
            Feedback::Throttle(t) => {
                pop.apply_throttle(&t);
            }
        }
    }
}
