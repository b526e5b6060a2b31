//! One batch, start to durable: decode every record, dead-letter the bad ones,
//! fold the good ones into their customers' states (pure domain) and then into
//! their campaigns' states, write them back and publish their decisions (the
//! state write of `state_write.rs`). Outages are retried with back-off until
//! the batch is durable or the caller gives up (shutdown or revoke timed out).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use tracing::debug;

use crate::codec::{DecodeError, Decoder};
use crate::config::RetryConfig;
use crate::dead_letters::DeadLetters;
use crate::domain::campaign::{campaign_of, CampaignSignal, CampaignState};
use crate::domain::clock::Clock;
use crate::domain::clock::EventClock;
use crate::domain::decide::Effects;
use crate::domain::event::{Channel, CustomerRef, Event, EventBody, EventKind};
use crate::domain::experiment::ArmTag;
use crate::domain::feedback::{self, FeedbackNote};
use crate::domain::lapse::Stage;
use crate::domain::policy::Policies;
use crate::domain::recall::Arm;
use crate::domain::state::{CustomerState, Notes, Outcome, Source, StateParams};
use crate::domain::step;
use crate::error::BatchError;
use crate::kafka::record::InputRecord;
use crate::metrics::Metrics;
use crate::processor::Unpublished;
use crate::retry::{Backoff, RetryLog};
use crate::state_write::{Fold, StateWriter, Stored};
use crate::store::durability::{Durability, Shortfall};
use crate::store::event_time::SharedEventTime;
use crate::store::fault;
use crate::store::record::CampaignId;
use crate::store::timers::{self, TimerStore};
use crate::write_fence::{ReadIn, WriteFence};

/// The retried step a permanent Redis error is reported against (`/readyz`).
const STATE_WRITE: &str = "state write";
/// The step a missing durability (`redis.durability`) is reported against.
const DURABILITY: &str = "durability";

/// The batch was abandoned before it became durable; its offsets must not be committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaveUp;

/// What one batch did, for logs and the bench.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchSummary {
    pub records: usize,
    pub applied: usize,
    pub redelivered: usize,
    pub duplicate_ids: usize,
    pub dead_letters: usize,
    pub customers_written: usize,
    /// Allowance transitions published.
    pub decisions: usize,
}

pub struct Pipeline {
    pub decoder: Arc<Decoder>,
    /// Customer and campaign states: load, fold, compare-and-set, publish the outboxes.
    pub writer: StateWriter,
    pub dlq: DeadLetters,
    pub metrics: Metrics,
    pub params: StateParams,
    pub clock: Arc<dyn Clock>,
    pub retry: RetryConfig,
    pub policies: Arc<Policies>,
    pub timers: TimerStore,
    /// In event-time mode, advanced to the newest applied event time after each
    /// batch, locally and in Redis (shared by every instance).
    pub event_clock: Option<(Arc<EventClock>, SharedEventTime)>,
    /// A batch's customers are written in this many concurrent chunks (`batch.store_chunks`).
    pub store_chunks: usize,
    /// `redis.durability`: what must hold, beyond Redis' acknowledgement,
    /// before the batch counts as durable.
    pub durability: Durability,
    /// Gives each write attempt of a part or a batch's campaigns its writer.
    pub fence: WriteFence,
    /// The retry loops' warnings, limited.
    pub retry_log: RetryLog,
}

/// What [`Pipeline::finish`] hands to the offset gate with a durable batch.
#[derive(Debug, Clone, Copy)]
pub struct Applied {
    pub summary: BatchSummary,
    /// The Redis epoch the batch's (last, successful) writes began under:
    /// the oldest of its parts', so that a change during any of them counts.
    pub epoch: u64,
    /// When Redis had acknowledged every write of the batch.
    pub acked_at: Instant,
}

/// A batch's valid events, decoded, with how many were dead-lettered.
pub struct Decoded {
    pub valid: Vec<(Event, Source)>,
    pub dead_letters: usize,
}

/// The events of one batch processor's customers (`batch.processors`), in batch order.
#[derive(Default)]
pub struct Part {
    pub events: Vec<(Event, Source)>,
    /// Each event's index among the batch's valid events: the campaign
    /// signals of all parts are merged back into batch order.
    pub index: Vec<usize>,
}

/// What a part did once its customers were durable and their decisions published.
pub struct PartDone {
    pub summary: BatchSummary,
    pub epoch: u64,
    pub acked_at: Instant,
    /// (index in the batch, campaign, signal) of the part's campaign sends and clicks.
    pub signals: Vec<(usize, CampaignId, CampaignSignal)>,
    /// The newest event time of the part (event-time mode's clock).
    pub newest: Option<i64>,
}

/// A customer's state as step A wrote it, with an outbox to publish.
pub struct Outboxed {
    pub customer: CustomerRef,
    pub rev: u64,
    pub state: Box<CustomerState>,
}

/// What step A of a part ([`Pipeline::write_part`]) hands to step B
/// ([`Pipeline::publish_part`]).
pub struct Written {
    epoch: u64,
    acked_at: Instant,
    tally: Tally,
    /// The outboxes to publish, then clear.
    outboxes: Vec<Outboxed>,
}

impl Written {
    /// The customers whose outbox step B publishes.
    pub fn outbox_customers(&self) -> impl Iterator<Item = &CustomerRef> {
        self.outboxes.iter().map(|o| &o.customer)
    }
}

impl Pipeline {
    /// Counts, decodes and dead-letters a batch's records (the dead letters
    /// acknowledged before this returns). Returns `GaveUp` only when `give_up` is raised.
    pub async fn decode(
        &self,
        batch: &[InputRecord],
        give_up: &AtomicBool,
    ) -> Result<Decoded, GaveUp> {
        // Counted per run of one topic (a batch holds long runs): a labelled
        // lookup per record hashed both labels each time.
        for (first, n) in topic_runs(batch) {
            self.metrics
                .records
                .with_label_values(&[&first.topic, first.kind.label()])
                .inc_by(n);
        }
        let decoded = self.decode_all(batch, give_up).await?;
        let mut valid: Vec<(Event, Source)> = Vec::with_capacity(batch.len());
        let mut invalid: Vec<(&InputRecord, DecodeError)> = Vec::new();
        for (rec, d) in batch.iter().zip(decoded) {
            match d {
                Ok(ev) => valid.push((
                    ev,
                    Source {
                        kind: rec.kind,
                        partition: rec.partition,
                        offset: rec.offset,
                    },
                )),
                Err(e) => invalid.push((rec, e)),
            }
        }
        self.dead_letter_all(&invalid, give_up).await?;
        Ok(Decoded {
            dead_letters: invalid.len(),
            valid,
        })
    }

    /// Splits a batch's valid events into `parts` by customer: a customer is
    /// always in the same part, so one processor applies its events in order.
    pub fn split(valid: Vec<(Event, Source)>, parts: usize) -> Vec<Part> {
        let mut out: Vec<Part> = (0..parts.max(1)).map(|_| Part::default()).collect();
        let n = out.len() as u32;
        for (i, (ev, src)) in valid.into_iter().enumerate() {
            let part = &mut out[timers::shard_of(&ev.customer, n) as usize];
            part.events.push((ev, src));
            part.index.push(i);
        }
        out
    }

    /// Step A of a part: its customers' states written, their timers
    /// scheduled and `redis.durability` confirmed, retried until done.
    /// Customers `unpublished` still holds (an earlier part's outbox, not yet
    /// published) are written only once it has been: see [`Unpublished`].
    /// Returns `GaveUp` only when `give_up` is raised.
    pub async fn write_part(
        &self,
        part: &Part,
        unpublished: &Unpublished,
        give_up: &AtomicBool,
        read: &ReadIn,
    ) -> Result<Written, GaveUp> {
        let (epoch, (acked_at, tally, outboxes)) = self
            .until_durable(give_up, Some(read), |epoch, writer| {
                self.store_customers(&part.events, unpublished, epoch, writer)
            })
            .await?;
        Ok(Written {
            epoch,
            acked_at,
            tally,
            outboxes,
        })
    }

    /// Step B of a part: publishes the outboxes step A wrote (then clears
    /// them), retried until done, and counts the part. Parts of one processor
    /// are published in the order written. Returns `GaveUp` only when
    /// `give_up` is raised.
    pub async fn publish_part(
        &self,
        part: &Part,
        written: Written,
        give_up: &AtomicBool,
    ) -> Result<PartDone, GaveUp> {
        let Written {
            epoch,
            acked_at,
            tally,
            outboxes,
        } = written;
        if !outboxes.is_empty() && crash_point("after_state_write") {
            // Test hook: die between the state write and the produce, like a kill -9 there.
            std::process::abort();
        }
        let (ids, states): (Vec<CustomerRef>, Vec<_>) = outboxes
            .into_iter()
            .map(|o| (o.customer, (o.rev, o.state)))
            .unzip();
        let stored: Vec<Stored<'_, CustomerState, ()>> = ids
            .iter()
            .zip(states)
            .map(|(id, (rev, record))| Stored {
                id,
                rev,
                record,
                written: true,
                extra: (),
            })
            .collect();
        if !stored.is_empty() {
            let stored = &stored;
            self.until_durable(give_up, None, |_, writer| async move {
                writer.publish(stored).await
            })
            .await?;
        }
        // Only now, with state and decisions durable, are the counts real.
        tally.report(self, &part.events, self.clock.now_ms());
        let signals = campaign_signals(&part.events, &tally)
            .into_iter()
            .map(|(i, id, sg)| (part.index[i], id, sg))
            .collect();
        Ok(PartDone {
            summary: BatchSummary {
                records: part.events.len(),
                applied: tally.applied,
                redelivered: tally.redelivered,
                duplicate_ids: tally.dup_ids,
                customers_written: tally.written,
                decisions: tally.decisions,
                ..Default::default()
            },
            epoch,
            acked_at,
            signals,
            newest: part.events.iter().map(|(e, _)| e.occurred_at).max(),
        })
    }

    /// Completes a batch whose parts are all durable: folds their campaign
    /// signals in batch order (campaign watermarks are per partition, so they
    /// must see each partition's offsets ascending), writes and publishes the
    /// campaigns, moves the event clock. Batches must be finished in the
    /// order they were read. Returns `GaveUp` only when `give_up` is raised.
    pub async fn finish(
        &self,
        parts: Vec<PartDone>,
        dead_letters: usize,
        give_up: &AtomicBool,
        read: &ReadIn,
    ) -> Result<Applied, GaveUp> {
        let mut summary = BatchSummary {
            dead_letters,
            records: dead_letters,
            ..Default::default()
        };
        let mut epoch = None::<u64>;
        let mut acked_at = None::<Instant>;
        let mut newest = None::<i64>;
        let mut signals = Vec::new();
        for p in parts {
            summary.records += p.summary.records;
            summary.applied += p.summary.applied;
            summary.redelivered += p.summary.redelivered;
            summary.duplicate_ids += p.summary.duplicate_ids;
            summary.customers_written += p.summary.customers_written;
            summary.decisions += p.summary.decisions;
            epoch = Some(epoch.map_or(p.epoch, |e| e.min(p.epoch)));
            acked_at = Some(acked_at.map_or(p.acked_at, |a| a.max(p.acked_at)));
            newest = newest.max(p.newest);
            signals.extend(p.signals);
        }
        if !signals.is_empty() {
            let by_campaign = in_batch_order(signals);
            let (e, a) = self
                .until_durable(give_up, Some(read), |e, writer| {
                    self.store_campaigns(&by_campaign, e, writer)
                })
                .await?;
            epoch = Some(epoch.map_or(e, |x| x.min(e)));
            acked_at = Some(acked_at.map_or(a, |x| x.max(a)));
        }
        let epoch = epoch.unwrap_or_else(|| self.durability.epoch.current());
        let acked_at = acked_at.unwrap_or_else(Instant::now);
        if let (Some((clock, shared)), Some(t)) = (&self.event_clock, newest) {
            clock.advance(t);
            // Best effort: the next batch (or the timer loop) catches up after a failure.
            match shared.advance(t).await {
                Ok(w) => clock.advance(w),
                Err(e) => {
                    self.metrics
                        .redis_errors
                        .with_label_values(&["clock"])
                        .inc();
                    debug!(error = %e, "sharing the event-time watermark failed");
                }
            }
        }
        Ok(Applied {
            summary,
            epoch,
            acked_at,
        })
    }

    /// The one retry loop of the batch path's writes: runs `step` (with the
    /// Redis epoch taken before it, and the writer to write with) until it
    /// succeeds, with the `retry.*` back-off. A step writing states of a
    /// batch `read` passes the write fence first (its writer); a step that
    /// only clears outboxes (`None`) uses the shared one. Returns the epoch
    /// and what `step` returned; `GaveUp` when `give_up` is raised or the
    /// fence refused the batch (it is read again).
    async fn until_durable<T, F, Fut>(
        &self,
        give_up: &AtomicBool,
        read: Option<&ReadIn>,
        step: F,
    ) -> Result<(u64, T), GaveUp>
    where
        F: Fn(u64, StateWriter) -> Fut,
        Fut: std::future::Future<Output = Result<T, BatchError>>,
    {
        let mut backoff = Backoff::new(&self.retry);
        loop {
            let epoch = self.durability.epoch.current();
            let writer = match read {
                None => Ok(self.writer.clone()),
                Some(read) => match self.fence.admit(read, epoch).await {
                    Ok(Some(w)) => Ok(w),
                    Ok(None) => return Err(GaveUp),
                    Err(e) => Err(BatchError::Store(e)),
                },
            };
            let cause = match async { step(epoch, writer?).await }.await {
                Ok(t) => {
                    self.metrics.redis_fault.clear(STATE_WRITE);
                    self.metrics.redis_fault.clear(DURABILITY);
                    return Ok((epoch, t));
                }
                Err(BatchError::NotDurable(short)) => {
                    self.metrics.redis_fault.clear(STATE_WRITE);
                    // Re-applied whole: what landed is skipped as a redelivery.
                    self.not_durable(&short);
                    "durability"
                }
                Err(e) => {
                    if !fault::report(&self.metrics, STATE_WRITE, &e) {
                        self.retry_log.warn("state write failed", &e);
                    }
                    "redis"
                }
            };
            self.metrics.retries.with_label_values(&[cause]).inc();
            if !backoff.wait(give_up).await {
                return Err(GaveUp);
            }
        }
    }

    /// Schedules the next due time of every customer whose state now
    /// expects one, after the state write: a timer scheduled before it could
    /// fire in between (due at once: an event applied late), find the state
    /// not yet written, and be dropped — the stage lost. A crash between the
    /// write and this leaves the records uncommitted: their redelivery
    /// schedules the timer again (see the customer fold).
    async fn schedule_timers(
        &self,
        stored: &[Stored<'_, CustomerState, CustomerFolded>],
    ) -> Result<(), BatchError> {
        let schedule: Vec<(&CustomerRef, i64)> = stored
            .iter()
            .filter_map(|s| Some((s.id, s.extra.schedule?)))
            .collect();
        if let Err(e) = self.timers.schedule(&schedule).await {
            self.metrics
                .redis_errors
                .with_label_values(&["timers"])
                .inc();
            return Err(e.into());
        }
        Ok(())
    }

    /// Counts a batch not confirmed durable, and tells `/readyz` when
    /// replicas are missing (cleared when a batch is next confirmed).
    fn not_durable(&self, short: &Shortfall) {
        self.metrics
            .durability_shortfalls
            .with_label_values(&[short.kind()])
            .inc();
        if let Shortfall::Replicas { .. } = short {
            self.metrics
                .redis_fault
                .set("redis", DURABILITY, short.to_string());
        }
        self.retry_log.warn("batch not confirmed durable", short);
    }

    /// Decodes every record; registry outages are retried, never dead-lettered.
    async fn decode_all(
        &self,
        batch: &[InputRecord],
        give_up: &AtomicBool,
    ) -> Result<Vec<Result<Event, DecodeError>>, GaveUp> {
        let mut out: Vec<Option<Result<Event, DecodeError>>> = vec![None; batch.len()];
        let mut backoff = Backoff::new(&self.retry);
        loop {
            let now = self.clock.now_ms();
            let mut transient = None;
            for (i, rec) in batch.iter().enumerate() {
                if out[i].is_some() {
                    continue;
                }
                let payload = rec.payload.as_deref().unwrap_or(&[]);
                match self
                    .decoder
                    .decode(rec.kind, rec.key.as_deref(), payload, now)
                    .await
                {
                    Err(e) if e.is_transient() => transient = Some(e),
                    r => out[i] = Some(r),
                }
            }
            match transient {
                None => {
                    return Ok(out
                        .into_iter()
                        .map(|r| r.expect("every record decoded"))
                        .collect())
                }
                Some(e) => {
                    self.retry_log.warn("schema registry unavailable", &e);
                    self.metrics.retries.with_label_values(&["registry"]).inc();
                    if !backoff.wait(give_up).await {
                        return Err(GaveUp);
                    }
                }
            }
        }
    }

    async fn dead_letter_all(
        &self,
        invalid: &[(&InputRecord, DecodeError)],
        give_up: &AtomicBool,
    ) -> Result<(), GaveUp> {
        if invalid.is_empty() {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let mut pending: Vec<usize> = (0..invalid.len()).collect();
        let mut backoff = Backoff::new(&self.retry);
        loop {
            let results = join_all(pending.iter().map(|&i| {
                let (rec, err) = &invalid[i];
                self.dlq.send(rec, err, now)
            }))
            .await;
            let mut failed = Vec::new();
            for (&i, r) in pending.iter().zip(results) {
                let (rec, err) = &invalid[i];
                match r {
                    Ok(()) => {
                        self.metrics
                            .invalid
                            .with_label_values(&[rec.kind.label(), err.reason()])
                            .inc();
                        self.metrics
                            .dlq_writes
                            .with_label_values(&[rec.kind.label()])
                            .inc();
                        debug!(topic = %rec.topic, partition = rec.partition, offset = rec.offset, reason = err.reason(), "dead-lettered");
                    }
                    Err(e) => {
                        self.retry_log.warn("dead-letter write failed", &e);
                        failed.push(i);
                    }
                }
            }
            if failed.is_empty() {
                return Ok(());
            }
            pending = failed;
            self.metrics.retries.with_label_values(&["dlq"]).inc();
            if !backoff.wait(give_up).await {
                return Err(GaveUp);
            }
        }
    }

    /// Loads a part's customers, folds their events and decides (pure domain),
    /// writes back with CAS and schedules their timers. Returns when Redis had
    /// acknowledged the writes (confirmed durable in mode `replicas`: a
    /// decision derived from a write a failover then lost could differ when
    /// derived again, so none is published before), with the part's tally and
    /// the outboxes to publish. Customers `unpublished` holds wait, in a chunk
    /// of their own, until their earlier outbox is published: loaded before,
    /// it would be published twice and its clear would find the record
    /// overtaken.
    async fn store_customers<'v>(
        &self,
        valid: &'v [(Event, Source)],
        unpublished: &Unpublished,
        epoch: u64,
        writer: StateWriter,
    ) -> Result<(Instant, Tally, Vec<Outboxed>), BatchError> {
        // Group by customer, keeping each customer's events in arrival order.
        let mut order: Vec<&'v CustomerRef> = Vec::new();
        let mut groups: HashMap<&CustomerRef, Vec<usize>> = HashMap::new();
        for (i, (ev, _)) in valid.iter().enumerate() {
            groups
                .entry(&ev.customer)
                .or_insert_with(|| {
                    order.push(&ev.customer);
                    Vec::new()
                })
                .push(i);
        }
        let (held, order, wait_for) = unpublished.split(order);
        // Customers are disjoint between chunks, so the chunks' Redis round trips
        // overlap with each other's folding instead of lapse and Redis taking turns.
        let size = order.len().div_ceil(self.store_chunks.max(1)).max(1);
        let (groups, writer) = (&groups, &writer);
        let chunk = |customers: Vec<&'v CustomerRef>, after: Option<u64>| async move {
            if let Some(seq) = after {
                unpublished.published_through(seq).await;
            }
            let mut fold = CustomerFold {
                p: self,
                valid,
                groups,
            };
            let stored = writer.write(customers, &mut fold).await?;
            self.schedule_timers(&stored).await?;
            let mut tally = Tally::default();
            for s in &stored {
                tally.written += s.written as usize;
                tally.count(&s.extra.outcomes, &s.extra.effects, s.id);
                tally.exposures.extend(s.extra.exposures.iter().cloned());
            }
            self.metrics.state_writes.inc_by(tally.written as u64);
            Ok::<_, BatchError>((tally, stored))
        };
        let mut chunks: Vec<_> = order
            .chunks(size)
            .map(|c| chunk(c.to_vec(), None))
            .collect();
        if !held.is_empty() {
            chunks.push(chunk(held, wait_for));
        }
        let mut tallies = Vec::new();
        let mut outboxes = Vec::new();
        for (t, stored) in futures::future::try_join_all(chunks).await? {
            tallies.push(t);
            outboxes.extend(
                stored
                    .into_iter()
                    .filter(|s| !s.record.outbox.is_empty())
                    .map(|s| Outboxed {
                        customer: s.id.clone(),
                        rev: s.rev,
                        state: s.record,
                    }),
            );
        }
        let tally = Tally::merged(tallies);
        let acked_at = Instant::now();
        self.durability.confirm(epoch).await?;
        Ok((acked_at, tally, outboxes))
    }

    /// Folds a batch's campaign signals into their campaigns (their own
    /// per-partition watermarks make the fold idempotent), writes them back
    /// and publishes their decisions; returns when Redis had acknowledged.
    async fn store_campaigns(
        &self,
        signals: &BTreeMap<CampaignId, Vec<CampaignSignal>>,
        epoch: u64,
        writer: StateWriter,
    ) -> Result<Instant, BatchError> {
        let mut fold = CampaignFold {
            policies: &self.policies,
            signals,
        };
        let campaigns = writer.write(signals.keys().collect(), &mut fold).await?;
        let acked_at = Instant::now();
        self.durability.confirm(epoch).await?;
        self.writer.publish(&campaigns).await?;
        Ok(acked_at)
    }
}

/// What folding one customer's events of a batch did.
struct CustomerFolded {
    /// (index into the batch's valid events, what folding it did), in batch order.
    outcomes: Vec<(usize, (Outcome, Notes))>,
    effects: Vec<(usize, Effects)>,
    /// Experiments the customer was first exposed to.
    exposures: Vec<ArmTag>,
    /// A new due time, to schedule before the state write.
    schedule: Option<i64>,
}

/// The batch path's fold of a customer: its events in arrival order, each
/// applied one deciding (allowance, recall), then its next timer.
struct CustomerFold<'a, 'g> {
    p: &'g Pipeline,
    valid: &'a [(Event, Source)],
    groups: &'g HashMap<&'a CustomerRef, Vec<usize>>,
}

impl Fold<CustomerState> for CustomerFold<'_, '_> {
    type Extra = CustomerFolded;

    fn fold(&mut self, c: &CustomerRef, state: &mut CustomerState) -> (bool, CustomerFolded) {
        let p = self.p;
        let events = &self.groups[c];
        let mut outcomes = Vec::with_capacity(events.len());
        let mut effects = Vec::new();
        let mut exposures = Vec::new();
        // The policy in force at each event's time: the tenant's, with the
        // customer's arms in the experiments running then.
        let mut latest = None::<i64>;
        for &i in events {
            let (ev, src) = &self.valid[i];
            let eff = p.policies.effective(c, ev.occurred_at);
            let (out, notes, fx, exposed) = step::on_record_under(state, ev, *src, &eff, &p.params);
            if let Some(fx) = fx {
                effects.push((i, fx));
                exposures.extend(exposed);
                latest = latest.max(Some(ev.occurred_at));
            }
            outcomes.push((i, (out, notes)));
        }
        let redelivered = outcomes
            .iter()
            .any(|(_, (out, _))| *out == Outcome::Redelivered);
        let eff = latest.map(|t| p.policies.effective(c, t));
        let policy = eff
            .as_ref()
            .map_or(p.policies.of(&c.tenant), |e| &*e.policy);
        let mut schedule = step::after_records(state, policy);
        if schedule.is_none() && redelivered {
            // A crash between this state's write and its timer's: the
            // redelivery schedules the timer again (idempotent).
            schedule = state.timer_due;
        }
        let changed = outcomes
            .iter()
            .any(|(_, (out, _))| *out == Outcome::Applied);
        (
            changed,
            CustomerFolded {
                outcomes,
                effects,
                exposures,
                schedule,
            },
        )
    }
}

/// The batch path's fold of a campaign: its signals, then a decision as of
/// the latest new one.
struct CampaignFold<'a> {
    policies: &'a Policies,
    signals: &'a BTreeMap<CampaignId, Vec<CampaignSignal>>,
}

impl Fold<CampaignState> for CampaignFold<'_> {
    type Extra = ();

    fn fold(&mut self, id: &CampaignId, st: &mut CampaignState) -> (bool, ()) {
        let (tenant, campaign) = id;
        let policy = self.policies.of(tenant);
        let signals = &self.signals[id];
        (
            step::on_campaign_signals(st, tenant, campaign, signals, policy),
            (),
        )
    }
}

/// `LAPSE_CRASH_POINT=NAME` makes the process abort at that point: crash-safety
/// tests use it to die exactly between two steps. Unset in production.
fn crash_point(name: &str) -> bool {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    POINT
        .get_or_init(|| std::env::var("LAPSE_CRASH_POINT").ok())
        .as_deref()
        == Some(name)
}

/// The campaign signals of a part (marketing sends and clicks naming a
/// campaign, upstream duplicates left out), as (index in `valid`, campaign,
/// signal), in `valid`'s order. Events the customer fold saw as duplicate
/// event ids are left out; those it saw as redeliveries are offered again and
/// skipped by the campaigns' watermarks.
fn campaign_signals(
    valid: &[(Event, Source)],
    tally: &Tally,
) -> Vec<(usize, CampaignId, CampaignSignal)> {
    let mut signals = Vec::new();
    for (i, out, _) in &tally.outcomes {
        // Upstream copies were never applied to the customer: not to campaigns either.
        if matches!(out, Outcome::DuplicateEventId | Outcome::BeyondDedupHorizon) {
            continue;
        }
        let (ev, src) = &valid[*i];
        let Some(campaign) = campaign_of(ev) else {
            continue;
        };
        signals.push((
            *i,
            (ev.customer.tenant.clone(), campaign.to_string()),
            CampaignSignal::of(ev, src, tally.violating.contains(i)),
        ));
    }
    signals
}

/// The campaign signals of a batch's parts (finished in any order) per
/// campaign, in batch order: campaign folds skip offsets at or below a
/// partition's watermark, so they must see each partition's offsets ascending.
fn in_batch_order(
    mut signals: Vec<(usize, CampaignId, CampaignSignal)>,
) -> BTreeMap<CampaignId, Vec<CampaignSignal>> {
    signals.sort_by_key(|(i, _, _)| *i);
    let mut by_campaign: BTreeMap<CampaignId, Vec<CampaignSignal>> = BTreeMap::new();
    for (_, id, sg) in signals {
        by_campaign.entry(id).or_default().push(sg);
    }
    by_campaign
}

/// Counts of one batch, reported to metrics only once everything is durable.
#[derive(Default)]
struct Tally {
    applied: usize,
    redelivered: usize,
    dup_ids: usize,
    written: usize,
    decisions: usize,
    /// (index into the batch's valid events, outcome, notes)
    outcomes: Vec<(usize, Outcome, Notes)>,
    effects: Vec<(String, Effects)>,
    /// Events (by index) that were marketing sends made while not allowed.
    violating: std::collections::HashSet<usize>,
    exposures: Vec<ArmTag>,
}

impl Tally {
    /// One batch's tally from its chunks' (in any order), with the outcomes back
    /// in batch order: campaign folds skip offsets at or below a partition's
    /// watermark, so they must see each partition in order.
    fn merged(chunks: Vec<Tally>) -> Tally {
        let mut all = Tally::default();
        for other in chunks {
            all.applied += other.applied;
            all.redelivered += other.redelivered;
            all.dup_ids += other.dup_ids;
            all.written += other.written;
            all.decisions += other.decisions;
            all.outcomes.extend(other.outcomes);
            all.effects.extend(other.effects);
            all.violating.extend(other.violating);
            all.exposures.extend(other.exposures);
        }
        all.outcomes.sort_by_key(|(i, _, _)| *i);
        all
    }

    fn count(
        &mut self,
        outcomes: &[(usize, (Outcome, Notes))],
        effects: &[(usize, Effects)],
        c: &CustomerRef,
    ) {
        for (i, (out, notes)) in outcomes {
            match out {
                Outcome::Applied => self.applied += 1,
                Outcome::Redelivered => self.redelivered += 1,
                Outcome::DuplicateEventId | Outcome::BeyondDedupHorizon => self.dup_ids += 1,
            }
            self.outcomes.push((*i, *out, *notes));
        }
        for (i, fx) in effects {
            if !fx.violations.is_empty() {
                self.violating.insert(*i);
            }
            self.decisions += fx.transitions.len();
            if !fx.transitions.is_empty()
                || !fx.violations.is_empty()
                || !fx.cap_hits.is_empty()
                || fx.unknown_offer_codes > 0
                || fx.care_call.is_some()
            {
                self.effects.push((c.tenant.clone(), fx.clone()));
            }
        }
    }

    fn report(&self, p: &Pipeline, valid: &[(Event, Source)], now: i64) {
        let m = &p.metrics;
        for x in &self.exposures {
            m.experiment_exposures
                .with_label_values(&[&x.experiment, &x.arm])
                .inc();
        }
        for (i, out, notes) in &self.outcomes {
            let ev = &valid[*i].0;
            match out {
                Outcome::Applied => {
                    count_applied(m, ev, now, notes.currency_mismatch);
                    if let Some(f) = notes.feedback {
                        count_feedback(m, &p.policies, ev, &f);
                    }
                }
                Outcome::Redelivered => m
                    .duplicates
                    .with_label_values(&[ev.kind().label(), "redelivery"])
                    .inc(),
                Outcome::DuplicateEventId => m
                    .duplicates
                    .with_label_values(&[ev.kind().label(), "event_id"])
                    .inc(),
                Outcome::BeyondDedupHorizon => m
                    .duplicates
                    .with_label_values(&[ev.kind().label(), "beyond_dedup_horizon"])
                    .inc(),
            }
            if notes.evicted_ids > 0 {
                m.dedup_evicted
                    .with_label_values(&[ev.kind().label()])
                    .inc_by(u64::from(notes.evicted_ids));
            }
        }
        for (tenant, fx) in &self.effects {
            let tenant = m.tenant(tenant);
            for c in &fx.cap_hits {
                m.cap_hits.with_label_values(&[&tenant, c.label()]).inc();
            }
            for (c, v) in &fx.violations {
                m.cap_violations
                    .with_label_values(&[&tenant, c.label(), v.label()])
                    .inc();
            }
            for (t, reason) in &fx.transitions {
                m.throttle_transitions
                    .with_label_values(&[&tenant, t.channel.label(), t.to.label(), reason])
                    .inc();
            }
            if fx.unknown_offer_codes > 0 {
                m.offer_codes_unknown
                    .with_label_values(&[&tenant])
                    .inc_by(u64::from(fx.unknown_offer_codes));
            }
            if let Some((segment, channel)) = fx.care_call {
                let ch = channel.map_or("none", Channel::label);
                m.recall_triggers
                    .with_label_values(&[
                        &tenant,
                        segment.label(),
                        Stage::CareCall.label(),
                        ch,
                        Arm::Treatment.label(),
                    ])
                    .inc();
            }
        }
    }
}

fn count_feedback(m: &Metrics, policies: &Policies, ev: &Event, f: &FeedbackNote) {
    let tenant = m.tenant(&ev.customer.tenant);
    let p = &policies.of(&ev.customer.tenant).feedback;
    let class = feedback::class(f.kind, f.score, p);
    m.feedback
        .with_label_values(&[&tenant, f.kind.label(), class.label()])
        .inc();
    m.feedback_scores
        .with_label_values(&[f.kind.label(), f.segment, f.recall_arm.label()])
        .observe(f64::from(f.score));
}

fn count_applied(m: &Metrics, ev: &Event, now: i64, currency_mismatch: bool) {
    let tenant = m.tenant(&ev.customer.tenant);
    match &ev.body {
        EventBody::Send {
            channel, purpose, ..
        } => {
            m.engagement
                .with_label_values(&[&tenant, channel.label(), "send", purpose.label()])
                .inc();
        }
        EventBody::Open { channel, .. } | EventBody::Click { channel, .. } => {
            m.engagement
                .with_label_values(&[&tenant, channel.label(), ev.kind().label(), "none"])
                .inc();
        }
        EventBody::Reply { channel, class, .. } => {
            m.engagement
                .with_label_values(&[&tenant, channel.label(), "reply", "none"])
                .inc();
            m.replies
                .with_label_values(&[&tenant, channel.label(), class.label()])
                .inc();
        }
        EventBody::Visit { visit_type, .. } => {
            let vt = match visit_type {
                crate::domain::event::VisitType::Consultation => "consultation",
                crate::domain::event::VisitType::Treatment => "treatment",
                crate::domain::event::VisitType::FollowUp => "follow_up",
            };
            m.visits.with_label_values(&[&tenant, vt]).inc();
        }
        // Counted with its class and arm by `count_feedback`.
        EventBody::Feedback { .. } => {}
    }
    if currency_mismatch {
        m.currency_mismatch.inc();
    }
    if ev.kind() != EventKind::Visit || now >= ev.occurred_at {
        m.processing_latency
            .observe(((now - ev.occurred_at).max(0)) as f64 / 1000.0);
    }
}

/// The runs of consecutive records of one topic: each run's first record and length.
fn topic_runs(batch: &[InputRecord]) -> Vec<(&InputRecord, u64)> {
    let mut runs: Vec<(&InputRecord, u64)> = Vec::new();
    for r in batch {
        match runs.last_mut() {
            Some((first, n)) if first.topic == r.topic => *n += 1,
            _ => runs.push((r, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{Channel, Purpose};

    #[test]
    fn records_are_counted_per_run_of_one_topic() {
        let rec = |kind: EventKind, topic: &str| InputRecord {
            kind,
            topic: topic.into(),
            partition: 0,
            offset: 0,
            key: None,
            payload: None,
            headers: vec![],
            timestamp_ms: None,
            received: std::time::Instant::now(),
        };
        let batch = [
            rec(EventKind::Send, "s"),
            rec(EventKind::Send, "s"),
            rec(EventKind::Open, "o"),
            rec(EventKind::Send, "s"),
        ];
        let runs: Vec<(&str, u64)> = topic_runs(&batch)
            .into_iter()
            .map(|(r, n)| (&*r.topic, n))
            .collect();
        assert_eq!(runs, [("s", 2), ("o", 1), ("s", 1)]);
        assert!(topic_runs(&[]).is_empty());
    }

    fn send(i: i64, customer: &str, partition: i32) -> (Event, Source) {
        (
            Event {
                event_id: format!("e{i}"),
                customer: CustomerRef::new("brandA", customer),
                occurred_at: 1_700_000_000_000 + i,
                body: EventBody::Send {
                    channel: Channel::Wechat,
                    message_id: format!("m{i}"),
                    campaign_id: Some("spring".into()),
                    purpose: Purpose::Marketing,
                    cost: None,
                },
            },
            Source {
                kind: EventKind::Send,
                partition,
                offset: i,
            },
        )
    }

    /// A chunk's tally, as `fold_and_store` builds it for its customers.
    fn chunk_tally(valid: &[(Event, Source)], customers: &[&str]) -> Tally {
        let mut t = Tally::default();
        for c in customers {
            let who = CustomerRef::new("brandA", *c);
            let outcomes: Vec<(usize, (Outcome, Notes))> = valid
                .iter()
                .enumerate()
                .filter(|(_, (ev, _))| ev.customer == who)
                .map(|(i, _)| (i, (Outcome::Applied, Notes::default())))
                .collect();
            t.count(&outcomes, &[], &who);
        }
        t
    }

    /// Customers are folded in concurrent chunks (`batch.store_chunks`) that
    /// finish in any order; the campaign fold must still see each partition's
    /// offsets ascending, or its watermark skips sends.
    #[test]
    fn campaign_signals_keep_partition_order_whatever_order_the_chunks_finish_in() {
        let valid: Vec<(Event, Source)> = (0..12)
            .map(|i| send(i, &format!("c{}", i % 4), (i % 2) as i32))
            .collect();
        let chunks = vec![
            chunk_tally(&valid, &["c3"]),
            chunk_tally(&valid, &["c1", "c2"]),
            chunk_tally(&valid, &["c0"]),
        ];
        let tally = Tally::merged(chunks);
        assert_eq!(tally.applied, 12);
        let signals = campaign_signals(&valid, &tally);
        let offsets: Vec<i64> = signals.iter().map(|(_, _, s)| s.offset).collect();
        assert_eq!(offsets, (0..12).collect::<Vec<i64>>());
    }

    /// Parts (`batch.processors`) split a batch by customer and finish in
    /// any order; the finisher's campaign fold still sees every partition's
    /// offsets ascending.
    #[test]
    fn campaign_signals_of_parts_finished_in_any_order_are_folded_in_batch_order() {
        let valid: Vec<(Event, Source)> = (0..40)
            .map(|i| send(i, &format!("c{}", i % 7), (i % 3) as i32))
            .collect();
        let parts = Pipeline::split(valid, 3);
        assert_eq!(parts.iter().map(|p| p.events.len()).sum::<usize>(), 40);
        let mut signals = Vec::new();
        for part in parts.iter().rev() {
            let mut customers: Vec<String> = part
                .events
                .iter()
                .map(|(e, _)| e.customer.customer.clone())
                .collect();
            customers.sort();
            customers.dedup();
            let names: Vec<&str> = customers.iter().map(String::as_str).collect();
            let tally = chunk_tally(&part.events, &names);
            signals.extend(
                campaign_signals(&part.events, &tally)
                    .into_iter()
                    .map(|(i, id, sg)| (part.index[i], id, sg)),
            );
        }
        let by_campaign = in_batch_order(signals);
        let spring = &by_campaign[&("brandA".to_string(), "spring".to_string())];
        let offsets: Vec<i64> = spring.iter().map(|s| s.offset).collect();
        assert_eq!(offsets, (0..40).collect::<Vec<i64>>());
    }
}
