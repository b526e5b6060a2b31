//! The consumer loop: one poll thread, one processing task, and a rebalance
//! handshake between them.
//!
//! * The poll thread never blocks on Redis: it collects bounded batches and hands
//!   them to the processor over a bounded queue. When the queue is full it pauses
//!   every assigned partition and keeps polling (heartbeats, rebalances), then
//!   resumes when the processor catches up.
//! * Offsets are committed only for work the processor reported durable, only for
//!   partitions still owned, and only from the generation that dispatched them.
//! * On revoke the callback waits (bounded) for dispatched batches to finish,
//!   commits what they applied, then drops ownership; records buffered but not
//!   dispatched are discarded (the next owner re-reads them). A batch still
//!   running when the wait times out is abandoned and its offsets are never
//!   committed: state updates are idempotent, so the next owner re-applies safely.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Headers, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::record::InputRecord;
use crate::config::{BatchConfig, KafkaConfig};
use crate::domain::event::EventKind;
use crate::error::KafkaError;
use crate::metrics::Metrics;

type Tp = (String, i32);

/// A batch handed from the poll thread to the processor.
pub struct Batch {
    pub generation: u64,
    pub records: Vec<InputRecord>,
    /// Counts the batch as being applied from its dispatch until this is
    /// dropped (the finisher drops it once the batch is applied or given up).
    pub applying: Option<Applying>,
}

/// One batch dispatched and not yet applied: while none is, the poll thread
/// dispatches what it has at once instead of waiting for a full batch or
/// `batch.max_wait` (see [`Consumer::run`]).
pub struct Applying(Arc<AtomicUsize>);

impl Drop for Applying {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Batch {
    /// What committing this batch means, without its records (which the
    /// offset gate need not keep while it holds the batch).
    pub fn offsets(&self) -> Done {
        let mut next: Vec<(Tp, i64)> = Vec::new();
        for r in &self.records {
            match next
                .iter_mut()
                .find(|((t, p), _)| *p == r.partition && **t == *r.topic)
            {
                Some((_, n)) => *n = (*n).max(r.offset + 1),
                None => next.push(((r.topic.to_string(), r.partition), r.offset + 1)),
            }
        }
        Done {
            generation: self.generation,
            next,
        }
    }
}

/// A durable batch's next offset per partition, and the generation that read it.
#[derive(Debug, Clone)]
pub struct Done {
    pub generation: u64,
    pub next: Vec<(Tp, i64)>,
}

#[derive(Default)]
struct Ownership {
    generation: u64,
    partitions: HashSet<Tp>,
}

/// State shared by the poll thread, the rebalance callbacks and the processor.
pub struct Shared {
    owned: Mutex<Ownership>,
    /// Batches dispatched and not yet finished.
    inflight: Mutex<usize>,
    /// Batches dispatched and not yet applied (see [`Applying`]).
    applying: Arc<AtomicUsize>,
    idle: Condvar,
    /// Abandon flags of the batches in flight (raised when a drain times out).
    abandon: Mutex<Vec<Arc<AtomicBool>>>,
    /// Next offset to commit per partition: applied and durable.
    done: Mutex<HashMap<Tp, i64>>,
    committed: Mutex<HashMap<Tp, i64>>,
    paused: AtomicBool,
    /// Raised by the offset gate when Redis may have lost acknowledged writes
    /// whose offsets were not committed: the poll thread re-reads every
    /// assigned partition from its last durable offset, then lowers it.
    rewind: AtomicBool,
    /// The generation the last rewind began (0: none yet).
    rewound: AtomicU64,
    metrics: Metrics,
}

impl Shared {
    pub fn new(metrics: Metrics) -> Arc<Shared> {
        Arc::new(Shared {
            owned: Mutex::new(Ownership::default()),
            inflight: Mutex::new(0),
            applying: Arc::default(),
            idle: Condvar::new(),
            abandon: Mutex::new(Vec::new()),
            done: Mutex::new(HashMap::new()),
            committed: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
            rewind: AtomicBool::new(false),
            rewound: AtomicU64::new(0),
            metrics,
        })
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The ownership generation (moves on every rebalance and rewind).
    pub fn generation(&self) -> u64 {
        Self::lock(&self.owned).generation
    }

    /// Called (through the offset gate) when a batch is durable.
    pub fn record_done(&self, batch: &Done) {
        let owned = Self::lock(&self.owned);
        if owned.generation != batch.generation {
            debug!("batch finished after a rebalance or rewind; its offsets are not committed");
            return;
        }
        let mut done = Self::lock(&self.done);
        for (tp, next) in &batch.next {
            if !owned.partitions.contains(tp) {
                continue;
            }
            let e = done.entry(tp.clone()).or_insert(*next);
            if *e < *next {
                *e = *next;
            }
        }
    }

    /// Asks the poll thread to re-read every assigned partition from its last
    /// durable offset; batches read before are never recorded done.
    pub fn request_rewind(&self) {
        self.rewind.store(true, Ordering::SeqCst);
    }

    /// Whether a requested rewind has not happened yet.
    pub fn rewind_pending(&self) -> bool {
        self.rewind.load(Ordering::SeqCst)
    }

    /// The generation the last rewind began: batches of an earlier one were
    /// read before it, and what they would write may follow records Redis lost.
    pub fn rewound_generation(&self) -> u64 {
        self.rewound.load(Ordering::SeqCst)
    }

    /// Registers a running batch's abandon flag.
    pub fn start_batch(&self) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(false));
        Self::lock(&self.abandon).push(flag.clone());
        flag
    }

    /// Called by the processor after every batch, durable or abandoned.
    pub fn finish_batch(&self, flag: &Arc<AtomicBool>) {
        Self::lock(&self.abandon).retain(|f| !Arc::ptr_eq(f, flag));
        let mut n = Self::lock(&self.inflight);
        *n = n.saturating_sub(1);
        self.idle.notify_all();
    }

    fn dispatched(&self) {
        *Self::lock(&self.inflight) += 1;
    }

    /// A batch about to be dispatched is being applied until the guard drops.
    fn applying(&self) -> Applying {
        self.applying.fetch_add(1, Ordering::SeqCst);
        Applying(self.applying.clone())
    }

    /// Whether no dispatched batch is still being applied.
    fn nothing_applying(&self) -> bool {
        self.applying.load(Ordering::SeqCst) == 0
    }

    fn undispatched(&self) {
        let mut n = Self::lock(&self.inflight);
        *n = n.saturating_sub(1);
        self.idle.notify_all();
    }

    /// Waits until no batch is in flight; on timeout abandons the running ones.
    fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut n = Self::lock(&self.inflight);
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                for f in Self::lock(&self.abandon).iter() {
                    f.store(true, Ordering::SeqCst);
                }
                return false;
            }
            n = self
                .idle
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Offsets applied but not yet committed, optionally only for `only`.
    fn pending_commits(&self, only: Option<&HashSet<Tp>>) -> Vec<(Tp, i64)> {
        let done = Self::lock(&self.done);
        let committed = Self::lock(&self.committed);
        done.iter()
            .filter(|(tp, off)| {
                only.is_none_or(|s| s.contains(*tp)) && committed.get(*tp) != Some(off)
            })
            .map(|(tp, off)| (tp.clone(), *off))
            .collect()
    }

    fn commit(&self, consumer: &BaseConsumer<LapseContext>, only: Option<&HashSet<Tp>>) -> bool {
        let pending = self.pending_commits(only);
        if pending.is_empty() {
            return true;
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), off) in &pending {
            if tpl
                .add_partition_offset(t, *p, Offset::Offset(*off))
                .is_err()
            {
                return false;
            }
        }
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                self.metrics.commits.with_label_values(&["ok"]).inc();
                let mut committed = Self::lock(&self.committed);
                for (tp, off) in pending {
                    committed.insert(tp, off);
                }
                true
            }
            Err(e) => {
                self.metrics.commits.with_label_values(&["error"]).inc();
                warn!(error = %e, "offset commit failed; retrying at the next interval");
                false
            }
        }
    }

    fn forget(&self, tps: &HashSet<Tp>) {
        Self::lock(&self.done).retain(|tp, _| !tps.contains(tp));
        Self::lock(&self.committed).retain(|tp, _| !tps.contains(tp));
    }
}

/// Records of a partition not yet durably applied: its high watermark minus
/// the group's committed offset, or minus the low watermark before the group's
/// first commit there (lapse starts new groups at the earliest offset; the
/// statistics' own `consumer_lag` is -1 then, hiding a new group's whole
/// backlog). librdkafka queries the watermarks of paused partitions too, so the
/// figure stays current while back-pressure holds fetching. `None` while the
/// high watermark is unknown. Brokers whose high watermark is the last batch's
/// base offset + 1 (tansu 0.6) under-report by up to a batch; see README.
fn lag_of(high: i64, committed: i64, low: i64) -> Option<i64> {
    if high < 0 {
        return None;
    }
    let from = if committed >= 0 {
        committed
    } else {
        low.max(0)
    };
    Some((high - from).max(0))
}

pub struct LapseContext {
    shared: Arc<Shared>,
    drain_timeout: Duration,
}

fn tps_of(tpl: &TopicPartitionList) -> HashSet<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ClientContext for LapseContext {
    fn stats(&self, stats: Statistics) {
        let owned = Shared::lock(&self.shared.owned);
        for (topic, t) in &stats.topics {
            for (p, ps) in &t.partitions {
                if *p < 0 || !owned.partitions.contains(&(topic.clone(), *p)) {
                    continue;
                }
                if let Some(lag) = lag_of(ps.hi_offset, ps.committed_offset, ps.lo_offset) {
                    self.shared
                        .metrics
                        .consumer_lag
                        .with_label_values(&[topic, &p.to_string()])
                        .set(lag);
                }
            }
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.shared
            .metrics
            .kafka_errors
            .with_label_values(&["client"])
            .inc();
        warn!(error = %error, reason, "kafka client error");
    }
}

impl ConsumerContext for LapseContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                self.shared
                    .metrics
                    .rebalances
                    .with_label_values(&["revoke"])
                    .inc();
                let revoked = tps_of(tpl);
                let drained = self.shared.drain(self.drain_timeout);
                if !drained {
                    warn!(
                        partitions = revoked.len(),
                        "rebalance: in-flight batch did not finish in time; handing over without committing it"
                    );
                }
                // Commit what was applied before letting the partitions go.
                self.shared.commit(consumer, Some(&revoked));
                let mut owned = Shared::lock(&self.shared.owned);
                owned.generation += 1;
                owned.partitions.retain(|tp| !revoked.contains(tp));
                self.shared
                    .metrics
                    .partitions_assigned
                    .set(owned.partitions.len() as i64);
                drop(owned);
                self.shared.forget(&revoked);
                for (t, p) in &revoked {
                    let _ = self
                        .shared
                        .metrics
                        .consumer_lag
                        .remove_label_values(&[t, &p.to_string()]);
                }
                info!(partitions = revoked.len(), drained, "partitions revoked");
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                self.shared
                    .metrics
                    .rebalances
                    .with_label_values(&["error"])
                    .inc();
                error!(error = %e, "rebalance error");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.shared
                .metrics
                .rebalances
                .with_label_values(&["assign"])
                .inc();
            let mut owned = Shared::lock(&self.shared.owned);
            owned.generation += 1;
            owned.partitions.extend(tps_of(tpl));
            self.shared
                .metrics
                .partitions_assigned
                .set(owned.partitions.len() as i64);
            drop(owned);
            if self.shared.paused.load(Ordering::SeqCst) {
                let _ = consumer.pause(tpl);
            }
            info!(partitions = tpl.count(), "partitions assigned");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            debug!(error = %e, "commit callback error");
        }
    }
}

/// Builds the group consumer with manual offset management.
pub fn build(
    cfg: &KafkaConfig,
    shared: Arc<Shared>,
) -> Result<BaseConsumer<LapseContext>, KafkaError> {
    let ctx = LapseContext {
        shared,
        drain_timeout: cfg.rebalance_drain_timeout.0,
    };
    Ok(client_config(cfg).create_with_context(ctx)?)
}

/// lapse's consumer settings: the group's, offsets stored and committed by
/// lapse only, security, then `kafka.consumer_properties` (also what
/// `lapse-tools bench ceiling` reads with).
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("client.id", &cfg.client_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        // Range assignment keeps partition i of every input topic on one instance
        // (co-partitioned by customer key) when the topics have equal partition counts.
        .set("partition.assignment.strategy", "range")
        .set(
            "session.timeout.ms",
            cfg.session_timeout.0.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            (cfg.session_timeout.0.as_millis() / 3).max(100).to_string(),
        )
        .set("statistics.interval.ms", "5000")
        .set("queued.max.messages.kbytes", "16384")
        .set("enable.partition.eof", "false");
    crate::kafka::client::apply_security(&mut cc, cfg);
    for (k, v) in &cfg.consumer_properties {
        cc.set(k, v);
    }
    cc
}

pub struct PollLoop {
    pub consumer: BaseConsumer<LapseContext>,
    pub shared: Arc<Shared>,
    /// Input topics: their kind, and the name every record of them shares.
    pub topics: HashMap<String, (EventKind, Arc<str>)>,
    pub batch: BatchConfig,
    pub commit_interval: Duration,
    pub shutdown_drain_timeout: Duration,
    pub tx: mpsc::Sender<Batch>,
    pub shutdown: Arc<AtomicBool>,
}

impl PollLoop {
    fn set_paused(&self, pause: bool) {
        if self.shared.paused.swap(pause, Ordering::SeqCst) == pause {
            return;
        }
        match self.consumer.assignment() {
            Ok(tpl) => {
                let r = if pause {
                    self.consumer.pause(&tpl)
                } else {
                    self.consumer.resume(&tpl)
                };
                if let Err(e) = r {
                    warn!(error = %e, pause, "pause/resume failed");
                }
                self.shared.metrics.partitions_paused.set(if pause {
                    tpl.count() as i64
                } else {
                    0
                });
                debug!(pause, partitions = tpl.count(), "back-pressure");
            }
            Err(e) => warn!(error = %e, "cannot read assignment"),
        }
    }

    /// Tries to hand a batch over; gives it back when the queue is full.
    fn dispatch(&self, mut batch: Batch) -> Result<Option<Batch>, ()> {
        self.shared.dispatched();
        batch.applying = Some(self.shared.applying());
        match self.tx.try_send(batch) {
            Ok(()) => Ok(None),
            Err(mpsc::error::TrySendError::Full(mut b)) => {
                self.shared.undispatched();
                b.applying = None;
                Ok(Some(b))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.shared.undispatched();
                Err(())
            }
        }
    }

    /// Keeps only records of partitions owned in the current generation.
    fn owned_only(&self, records: Vec<(u64, InputRecord)>) -> Batch {
        let owned = Shared::lock(&self.shared.owned);
        let generation = owned.generation;
        // One set lookup (and key allocation) per partition, not per record.
        let mut known: Vec<(String, i32, bool)> = Vec::new();
        let records = records
            .into_iter()
            .filter(|(g, r)| {
                if *g != generation {
                    return false;
                }
                if let Some(k) = known
                    .iter()
                    .find(|k| k.1 == r.partition && *k.0 == *r.topic)
                {
                    return k.2;
                }
                let tp = (r.topic.to_string(), r.partition);
                let ok = owned.partitions.contains(&tp);
                known.push((tp.0, tp.1, ok));
                ok
            })
            .map(|(_, r)| r)
            .collect();
        Batch {
            generation,
            records,
            applying: None,
        }
    }

    /// Runs until `shutdown` is raised; then drains, commits and leaves the group.
    pub fn run(self) {
        let max = self.batch.max_records;
        let mut buf: Vec<(u64, InputRecord)> = Vec::with_capacity(max);
        let mut buf_since: Option<Instant> = None;
        let mut held: Option<Batch> = None;
        let mut last_commit = Instant::now();
        while !self.shutdown.load(Ordering::SeqCst) {
            if self.shared.rewind_pending() {
                self.rewind(&mut buf, &mut held);
                buf_since = None;
            }
            if let Some(b) = held.take() {
                // Re-check ownership only after a rebalance: this runs on every poll.
                let b = if b.generation == self.shared.generation() {
                    b
                } else {
                    self.owned_only(b.records.into_iter().map(|r| (b.generation, r)).collect())
                };
                if !b.records.is_empty() {
                    match self.dispatch(b) {
                        Ok(None) => {}
                        Ok(Some(b)) => held = Some(b),
                        Err(()) => break,
                    }
                }
            }
            // Pausing discards librdkafka's prefetched data, so it is the last resort:
            // only when a batch is held *and* a second one is buffered behind it.
            // Resume once the backlog is below one batch.
            let high_water = 2 * max;
            if held.is_some() && buf.len() >= high_water {
                self.set_paused(true);
            } else if held.is_none() && buf.len() < max {
                self.set_paused(false);
            }
            // Nothing being applied: what is buffered goes now (below), so
            // poll only for what is already fetched (the 1 ms floor below).
            let idle = held.is_none() && self.shared.nothing_applying();
            let wait = if held.is_some() {
                Duration::from_millis(20)
            } else if idle && !buf.is_empty() {
                Duration::from_millis(1)
            } else {
                buf_since.map_or(self.batch.max_wait.0, |s| {
                    self.batch.max_wait.0.saturating_sub(s.elapsed())
                })
            };
            // At most 100 ms per poll, so a shutdown or rewind is seen soon
            // whatever `batch.max_wait` is (up to 60 s).
            let wait = wait.clamp(Duration::from_millis(1), Duration::from_millis(100));
            match self.consumer.poll(wait) {
                Some(Ok(m)) => {
                    if let Some((kind, topic)) = self.topics.get(m.topic()) {
                        let headers = m
                            .headers()
                            .map(|hs| {
                                hs.iter()
                                    .take(64)
                                    .map(|h| {
                                        (h.key.to_string(), h.value.unwrap_or_default().to_vec())
                                    })
                                    .collect()
                            })
                            .unwrap_or_default();
                        let rec = InputRecord {
                            kind: *kind,
                            topic: topic.clone(),
                            partition: m.partition(),
                            offset: m.offset(),
                            key: m.key().map(<[u8]>::to_vec),
                            payload: m.payload().map(<[u8]>::to_vec),
                            headers,
                            timestamp_ms: m.timestamp().to_millis(),
                            received: Instant::now(),
                        };
                        buf.push((self.shared.generation(), rec));
                        buf_since.get_or_insert_with(Instant::now);
                    }
                }
                Some(Err(e)) => {
                    self.shared
                        .metrics
                        .kafka_errors
                        .with_label_values(&["poll"])
                        .inc();
                    warn!(error = %e, "poll error");
                }
                None => {}
            }
            // A batch is due when full, after `batch.max_wait`, or as soon as
            // no batch is being applied: at a light load records go on at
            // once in small batches; under load batches grow while the ones
            // before are applied (latency stays near one batch's apply time).
            let due = buf.len() >= max
                || buf_since.is_some_and(|s| s.elapsed() >= self.batch.max_wait.0)
                || (idle && !buf.is_empty());
            if held.is_none() && due && !buf.is_empty() {
                let take = buf.len().min(max);
                let b = self.owned_only(buf.drain(..take).collect());
                if buf.is_empty() {
                    buf_since = None;
                }
                if !b.records.is_empty() {
                    match self.dispatch(b) {
                        Ok(None) => {}
                        Ok(Some(b)) => held = Some(b),
                        Err(()) => break,
                    }
                }
            }
            if last_commit.elapsed() >= self.commit_interval {
                self.shared.commit(&self.consumer, None);
                last_commit = Instant::now();
            }
        }
        self.shutdown_gracefully(buf, held);
    }

    /// Re-reads every assigned partition from its last durable offset (the
    /// last one recorded done, else the group's committed one): a new
    /// generation, so nothing read or dispatched before is recorded done.
    /// Keeps the request raised (retried on the next poll) if a seek fails.
    fn rewind(&self, buf: &mut Vec<(u64, InputRecord)>, held: &mut Option<Batch>) {
        buf.clear();
        *held = None;
        let mut owned = Shared::lock(&self.shared.owned);
        owned.generation += 1;
        self.shared
            .rewound
            .store(owned.generation, Ordering::SeqCst);
        let partitions: Vec<Tp> = owned.partitions.iter().cloned().collect();
        drop(owned);
        if partitions.is_empty() {
            self.shared.rewind.store(false, Ordering::SeqCst);
            return;
        }
        let mut ask = TopicPartitionList::new();
        for (t, p) in &partitions {
            ask.add_partition(t, *p);
        }
        let committed = match self
            .consumer
            .committed_offsets(ask, Duration::from_secs(10))
        {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "rewind: reading committed offsets failed; retrying");
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
        };
        let done = Shared::lock(&self.shared.done).clone();
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &partitions {
            let at = match done.get(&(t.clone(), *p)) {
                Some(o) => Offset::Offset(*o),
                None => match committed.find_partition(t, *p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Offset::Offset(o),
                    _ => Offset::Beginning,
                },
            };
            if tpl.add_partition_offset(t, *p, at).is_err() {
                return;
            }
        }
        match self.consumer.seek_partitions(tpl, Duration::from_secs(10)) {
            Ok(res) if res.elements().iter().all(|e| e.error().is_ok()) => {
                self.shared.metrics.offset_rewinds.inc();
                self.shared.rewind.store(false, Ordering::SeqCst);
                warn!(
                    partitions = partitions.len(),
                    "Redis may have lost acknowledged writes: re-reading every assigned partition from its last durable offset"
                );
            }
            Ok(res) => {
                let failed: Vec<String> = res
                    .elements()
                    .iter()
                    .filter_map(|e| {
                        e.error()
                            .err()
                            .map(|x| format!("{}[{}]: {x}", e.topic(), e.partition()))
                    })
                    .collect();
                warn!(?failed, "rewind: seek failed; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                warn!(error = %e, "rewind: seek failed; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    fn shutdown_gracefully(self, buf: Vec<(u64, InputRecord)>, held: Option<Batch>) {
        info!("shutting down: finishing the in-flight batch");
        let deadline = Instant::now() + self.shutdown_drain_timeout;
        // Finish what was already read: hand the held and buffered records over.
        let mut rest: Vec<(u64, InputRecord)> = held
            .map(|b| b.records.into_iter().map(|r| (b.generation, r)).collect())
            .unwrap_or_default();
        rest.extend(buf);
        let mut b = Some(self.owned_only(rest));
        while let Some(batch) = b.take() {
            if batch.records.is_empty() || Instant::now() >= deadline {
                break;
            }
            match self.dispatch(batch) {
                Ok(None) => {}
                Ok(Some(batch)) => {
                    b = Some(batch);
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(()) => break,
            }
        }
        let drained = self
            .shared
            .drain(deadline.saturating_duration_since(Instant::now()));
        if !drained {
            warn!("shutdown: the in-flight batch did not finish in time; its offsets stay uncommitted");
            // Let the abandoned batch notice before the process exits.
            self.shared.drain(Duration::from_secs(2));
        }
        let committed = self.shared.commit(&self.consumer, None);
        info!(committed, "offsets committed; leaving the group");
        drop(self.tx);
        self.consumer.unsubscribe();
    }
}

#[cfg(test)]
mod tests {
    use super::lag_of;

    #[test]
    fn lag_counts_from_the_commit_or_the_start_of_the_log() {
        // Unknown high watermark: no figure rather than a wrong one.
        assert_eq!(lag_of(-1, 10, 0), None);
        // Committed: behind the high watermark by the difference.
        assert_eq!(lag_of(1_000, 400, 0), Some(600));
        assert_eq!(lag_of(1_000, 1_000, 0), Some(0));
        // Nothing committed yet (-1001 = invalid): the whole retained log.
        assert_eq!(lag_of(1_000, -1001, 0), Some(1_000));
        assert_eq!(lag_of(1_000, -1001, 250), Some(750));
        assert_eq!(lag_of(1_000, -1001, -1), Some(1_000));
        // A high watermark behind the commit (a broker reporting a batch's base
        // offset) is no negative lag.
        assert_eq!(lag_of(10, 12, 0), Some(0));
    }
}
