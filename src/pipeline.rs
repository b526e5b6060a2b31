//! One batch, start to durable: decode every record, dead-letter the bad ones,
//! fold the good ones into their customers' states (pure domain), and write the
//! states back with compare-and-set. Outages are retried with back-off until the
//! batch is durable or the caller gives up (shutdown or revoke timed out).

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use tracing::{debug, warn};

use crate::codec::{DecodeError, Decoder};
use crate::config::RetryConfig;
use crate::dead_letters::DeadLetters;
use crate::domain::clock::Clock;
use crate::domain::event::{CustomerRef, Event, EventBody, EventKind};
use crate::domain::state::{Outcome, Source, StateParams};
use crate::kafka::record::InputRecord;
use crate::metrics::Metrics;
use crate::retry::Backoff;
use crate::store::StateStore;

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
}

/// Conflicting writes retried within one batch before the batch is retried whole.
const MAX_CAS_ROUNDS: usize = 16;

pub struct Pipeline {
    pub decoder: Arc<Decoder>,
    pub store: StateStore,
    pub dlq: DeadLetters,
    pub metrics: Metrics,
    pub params: StateParams,
    pub clock: Arc<dyn Clock>,
    pub retry: RetryConfig,
}

impl Pipeline {
    /// Applies a batch until it is durable. Returns `GaveUp` only when `give_up` is raised.
    pub async fn apply(
        &self,
        batch: &[InputRecord],
        give_up: &AtomicBool,
    ) -> Result<BatchSummary, GaveUp> {
        let started = Instant::now();
        let mut summary = BatchSummary {
            records: batch.len(),
            ..Default::default()
        };
        for r in batch {
            self.metrics
                .records
                .with_label_values(&[&r.topic, r.kind.label()])
                .inc();
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
        summary.dead_letters = invalid.len();
        self.dead_letter_all(&invalid, give_up).await?;

        let mut backoff = Backoff::new(&self.retry);
        loop {
            match self.fold_and_store(&valid, &mut summary).await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, "state write failed; retrying the batch");
                    self.metrics.retries.with_label_values(&["redis"]).inc();
                    if !backoff.wait(give_up).await {
                        return Err(GaveUp);
                    }
                }
            }
        }
        self.metrics.batch_records.observe(batch.len() as f64);
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        debug!(?summary, "batch durable");
        Ok(summary)
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
                    warn!(error = %e, "schema registry unavailable; retrying");
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
                        warn!(error = %e, "dead-letter write failed; retrying");
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

    /// Loads the batch's customers, folds their events, writes back with CAS.
    async fn fold_and_store(
        &self,
        valid: &[(Event, Source)],
        summary: &mut BatchSummary,
    ) -> Result<(), crate::error::StoreError> {
        // Group by customer, keeping each customer's events in arrival order.
        let mut order: Vec<&CustomerRef> = Vec::new();
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
        let mut pending = order;
        let (mut applied, mut redelivered, mut dup_ids, mut written) = (0, 0, 0, 0);
        for _round in 0..MAX_CAS_ROUNDS {
            let loaded = self.store.load_many(&pending).await?;
            let mut folded = Vec::with_capacity(pending.len());
            for (c, mut l) in pending.iter().zip(loaded) {
                let mut outcomes = Vec::with_capacity(groups[c].len());
                for &i in &groups[c] {
                    let (ev, src) = &valid[i];
                    outcomes.push((i, l.state.apply(ev, *src, &self.params)));
                }
                folded.push((*c, l.rev, l.state, outcomes));
            }
            let writes: Vec<_> = folded
                .iter()
                .filter(|(_, _, _, o)| o.iter().any(|(_, (out, _))| *out == Outcome::Applied))
                .map(|(c, rev, s, _)| (*c, *rev, s))
                .collect();
            let results = self.store.save_many(&writes).await?;
            let conflicted: Vec<&CustomerRef> = writes
                .iter()
                .zip(&results)
                .filter(|(_, ok)| !**ok)
                .map(|((c, _, _), _)| *c)
                .collect();
            let now = self.clock.now_ms();
            for (c, _, _, outcomes) in &folded {
                if conflicted.contains(c) {
                    continue;
                }
                for (i, (out, notes)) in outcomes {
                    let ev = &valid[*i].0;
                    match out {
                        Outcome::Applied => {
                            applied += 1;
                            self.count_applied(ev, now, notes.currency_mismatch);
                        }
                        Outcome::Redelivered => {
                            redelivered += 1;
                            self.metrics
                                .duplicates
                                .with_label_values(&[ev.kind().label(), "redelivery"])
                                .inc();
                        }
                        Outcome::DuplicateEventId => {
                            dup_ids += 1;
                            self.metrics
                                .duplicates
                                .with_label_values(&[ev.kind().label(), "event_id"])
                                .inc();
                        }
                    }
                }
            }
            written += writes.len() - conflicted.len();
            self.metrics
                .state_writes
                .inc_by((writes.len() - conflicted.len()) as u64);
            if conflicted.is_empty() {
                summary.applied += applied;
                summary.redelivered += redelivered;
                summary.duplicate_ids += dup_ids;
                summary.customers_written += written;
                return Ok(());
            }
            self.metrics.cas_conflicts.inc_by(conflicted.len() as u64);
            pending = conflicted;
        }
        Err(crate::error::StoreError::Contended {
            customers: pending.len(),
        })
    }

    fn count_applied(&self, ev: &Event, now: i64, currency_mismatch: bool) {
        let m = &self.metrics;
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
        }
        if currency_mismatch {
            m.currency_mismatch.inc();
        }
        if ev.kind() != EventKind::Visit || now >= ev.occurred_at {
            m.processing_latency
                .observe(((now - ev.occurred_at).max(0)) as f64 / 1000.0);
        }
    }
}
