//! What lapse decided, read back by the simulator: recall triggers (a
//! triggered customer may come back) and throttle decisions (the obeying
//! sender skips restricted channels). A background thread consumes both topics
//! without a consumer group (partitions assigned directly, nothing committed)
//! and hands decoded records to the day loop.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use apache_avro::types::Value;
use apache_avro::Schema;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::warn;

use super::model::{ThrottleFeedback, TriggerFeedback};
use lapse::domain::allowance::AllowanceState;
use lapse::domain::event::Channel;
use lapse::domain::lapse::{Segment, Stage};

#[derive(Debug, Clone, PartialEq)]
pub enum Feedback {
    Trigger(TriggerFeedback),
    Throttle(ThrottleFeedback),
}

type Fields = BTreeMap<String, Value>;

fn fields(schema: &Schema, payload: &[u8]) -> Option<Fields> {
    // Either framing (Confluent when lapse runs with a registry): lapse wrote
    // it with the current schema.
    let body = lapse::codec::parse_frame(payload).ok()?.body();
    let v = apache_avro::from_avro_datum(schema, &mut &body[..], None).ok()?;
    match v {
        Value::Record(f) => Some(f.into_iter().collect()),
        _ => None,
    }
}

fn unwrap_union(v: &Value) -> &Value {
    match v {
        Value::Union(_, b) => b,
        o => o,
    }
}

fn text(f: &Fields, k: &str) -> Option<String> {
    match unwrap_union(f.get(k)?) {
        Value::String(s) | Value::Enum(_, s) => Some(s.clone()),
        _ => None,
    }
}

fn millis(f: &Fields, k: &str) -> Option<i64> {
    match unwrap_union(f.get(k)?) {
        Value::TimestampMillis(t) | Value::Long(t) => Some(*t),
        _ => None,
    }
}

/// Decodes a `lapse.v1.RecallTrigger` (single-object framing).
pub fn decode_trigger(schema: &Schema, payload: &[u8]) -> Option<TriggerFeedback> {
    let f = fields(schema, payload)?;
    Some(TriggerFeedback {
        tenant: text(&f, "tenant_id")?,
        customer: text(&f, "customer_id")?,
        segment: Segment::parse(&text(&f, "segment")?)?,
        stage: Stage::parse(&text(&f, "stage")?)?,
        channel: text(&f, "recommended_channel").and_then(|c| Channel::parse(&c)),
        fired_at: millis(&f, "fired_at")?,
        holdout: text(&f, "arm").as_deref() == Some("HOLDOUT"),
        send_after: millis(&f, "send_after"),
    })
}

/// Decodes a `lapse.v1.ThrottleEvent` (single-object framing).
pub fn decode_throttle(schema: &Schema, payload: &[u8]) -> Option<ThrottleFeedback> {
    let f = fields(schema, payload)?;
    let state = text(&f, "state")?;
    Some(ThrottleFeedback {
        tenant: text(&f, "tenant_id")?,
        customer: text(&f, "customer_id"),
        channel: text(&f, "channel").and_then(|c| Channel::parse(&c)),
        campaign: text(&f, "campaign_id"),
        state: AllowanceState::ALL
            .into_iter()
            .find(|s| s.as_str() == state)?,
        allowed_from: millis(&f, "allowed_from"),
    })
}

/// The background reader. Dropping it stops the thread.
pub struct FeedbackReader {
    pub rx: mpsc::Receiver<Feedback>,
    sync_tx: mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// Which topic a record came from.
#[derive(Clone)]
pub struct FeedbackTopics {
    pub triggers: Option<String>,
    pub throttle: Option<String>,
}

impl FeedbackReader {
    /// Starts reading. Triggers are read from the end as of now (only what
    /// lapse decides from here on) — or from the beginning if the topic does
    /// not exist yet; throttle decisions from the beginning (the compacted
    /// topic holds every current allowance). Topics that do not exist yet are
    /// waited for (metadata polled every 500 ms, never auto-created).
    pub fn start(
        brokers: &str,
        extra: &BTreeMap<String, String>,
        topics: FeedbackTopics,
        trigger_schema: Schema,
        throttle_schema: Schema,
    ) -> anyhow::Result<FeedbackReader> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", brokers)
            .set("group.id", format!("lapse-simulate-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("allow.auto.create.topics", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "20");
        for (k, v) in extra {
            cc.set(k, v);
        }
        let consumer: BaseConsumer = cc.create()?;
        let (tx, rx) = mpsc::channel();
        let (sync_tx, sync_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("simulate-feedback".into())
            .spawn(move || {
                let mut r = Reader {
                    consumer,
                    topics,
                    trigger_schema,
                    throttle_schema,
                    tx,
                    sync_rx,
                    stop: stop2,
                    throttle_seen: BTreeMap::new(),
                    pending: Vec::new(),
                };
                r.run()
            })?;
        Ok(FeedbackReader {
            rx,
            sync_tx,
            stop,
            handle: Some(handle),
        })
    }

    /// Waits (at most `timeout`) until every throttle decision on the topic now
    /// has been read and handed to [`FeedbackReader::rx`], so the sender of the
    /// next simulated day knows the allowances lapse decided so far. Triggers
    /// are not waited for: they fire on lapse's timer loop a moment later and
    /// reach the simulator on a later day, like a real sender's next run.
    pub async fn sync(&self, timeout: Duration) -> bool {
        let (ack, done) = tokio::sync::oneshot::channel();
        if self.sync_tx.send(ack).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, done).await, Ok(Ok(())))
    }
}

impl Drop for FeedbackReader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn existing_topics(c: &BaseConsumer) -> Option<BTreeMap<String, i32>> {
    let md = c.fetch_metadata(None, Duration::from_secs(5)).ok()?;
    Some(
        md.topics()
            .iter()
            .filter(|t| t.error().is_none() && !t.partitions().is_empty())
            .map(|t| (t.name().to_string(), t.partitions().len() as i32))
            .collect(),
    )
}

struct Reader {
    consumer: BaseConsumer,
    topics: FeedbackTopics,
    trigger_schema: Schema,
    throttle_schema: Schema,
    tx: mpsc::Sender<Feedback>,
    sync_rx: mpsc::Receiver<tokio::sync::oneshot::Sender<()>>,
    stop: Arc<AtomicBool>,
    /// Throttle partition → offset after the last record handed over.
    throttle_seen: BTreeMap<i32, i64>,
    /// Sync requests: throttle partition → offset to reach, the ack, a deadline.
    pending: Vec<(
        BTreeMap<i32, i64>,
        tokio::sync::oneshot::Sender<()>,
        std::time::Instant,
    )>,
}

impl Reader {
    fn run(&mut self) {
        let wanted: Vec<(String, bool)> = self
            .topics
            .triggers
            .iter()
            .map(|t| (t.clone(), true))
            .chain(self.topics.throttle.iter().map(|t| (t.clone(), false)))
            .collect();
        if wanted.is_empty() {
            return;
        }
        // Which topics existed when we started (read those triggers from the end).
        let mut at_start: Option<BTreeMap<String, i32>> = None;
        let mut warned = false;
        let started = std::time::Instant::now();
        let parts = loop {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            // Nothing to wait for before the topics exist.
            while let Ok(ack) = self.sync_rx.try_recv() {
                let _ = ack.send(());
            }
            if let Some(existing) = existing_topics(&self.consumer) {
                let first = at_start.get_or_insert_with(|| existing.clone());
                if wanted.iter().all(|(t, _)| existing.contains_key(t)) {
                    let mut tpl = TopicPartitionList::new();
                    for (t, is_trigger) in &wanted {
                        let offset = if *is_trigger && first.contains_key(t) {
                            Offset::End
                        } else {
                            Offset::Beginning
                        };
                        for p in 0..existing[t] {
                            let _ = tpl.add_partition_offset(t, p, offset);
                        }
                    }
                    break tpl;
                }
            }
            if !warned && started.elapsed() > Duration::from_secs(30) {
                warn!(topics = ?wanted.iter().map(|w| &w.0).collect::<Vec<_>>(),
                    "feedback topics do not exist yet (is lapse running?); waiting for them");
                warned = true;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        if let Err(e) = self.consumer.assign(&parts) {
            warn!(error = %e, "cannot assign the feedback topics; running without feedback");
            return;
        }
        let triggers = self.topics.triggers.clone().unwrap_or_default();
        let throttle = self.topics.throttle.clone().unwrap_or_default();
        while !self.stop.load(Ordering::Relaxed) {
            while let Ok(ack) = self.sync_rx.try_recv() {
                let targets = self.throttle_ends(&throttle);
                self.pending.push((
                    targets,
                    ack,
                    std::time::Instant::now() + Duration::from_secs(5),
                ));
            }
            self.settle();
            match self.consumer.poll(Duration::from_millis(20)) {
                None => {}
                Some(Err(e)) => {
                    warn!(error = %e, "reading feedback");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Some(Ok(m)) => {
                    let fb = m.payload().and_then(|payload| {
                        if m.topic() == triggers {
                            decode_trigger(&self.trigger_schema, payload).map(Feedback::Trigger)
                        } else {
                            decode_throttle(&self.throttle_schema, payload).map(Feedback::Throttle)
                        }
                    });
                    if let Some(fb) = fb {
                        if self.tx.send(fb).is_err() {
                            return;
                        }
                    }
                    if m.topic() == throttle {
                        let e = self.throttle_seen.entry(m.partition()).or_insert(0);
                        *e = (*e).max(m.offset() + 1);
                    }
                }
            }
        }
    }

    /// High watermarks of the throttle partitions that hold records.
    fn throttle_ends(&self, topic: &str) -> BTreeMap<i32, i64> {
        let mut ends = BTreeMap::new();
        if topic.is_empty() {
            return ends;
        }
        let Some(md) = self
            .consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
        else {
            return ends;
        };
        for t in md.topics() {
            for p in t.partitions() {
                if let Ok((low, high)) =
                    self.consumer
                        .fetch_watermarks(topic, p.id(), Duration::from_secs(5))
                {
                    if high > low {
                        ends.insert(p.id(), high);
                    }
                }
            }
        }
        ends
    }

    /// Acknowledges the sync requests whose targets are reached (or too old).
    fn settle(&mut self) {
        let now = std::time::Instant::now();
        let seen = &self.throttle_seen;
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(targets, _, deadline)| {
                now >= *deadline
                    || targets
                        .iter()
                        .all(|(p, end)| seen.get(p).is_some_and(|s| s >= end))
            });
        self.pending = waiting;
        for (_, ack, _) in done {
            let _ = ack.send(());
        }
    }
}
