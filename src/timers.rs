//! The timer loop: every instance claims due timers (leased, so no two instances
//! fire one at the same time and a crash loses none), loads those customers,
//! lets the domain decide (recall stages, allowance releases), writes back with
//! CAS and publishes through the same outbox as the record path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::config::TimersConfig;
use crate::domain::clock::{Clock, EventClock};
use crate::domain::decide::{self, allowance_at, Effects};
use crate::domain::event::{Channel, CustomerRef};
use crate::domain::lapse::Stage;
use crate::domain::recall::{self, Arm, FireCtx, Fired};
use crate::domain::state::CustomerState;
use crate::pipeline::Pipeline;
use crate::retry::Backoff;
use crate::store::clock::SharedEventTime;
use crate::store::timers::{Claimed, TimerStore};

pub struct TimerLoop {
    pub pipeline: Arc<Pipeline>,
    pub timers: TimerStore,
    pub clock: Arc<dyn Clock>,
    /// Event-time mode: the local watermark and the one shared in Redis.
    pub shared_clock: Option<(Arc<EventClock>, SharedEventTime)>,
    pub cfg: TimersConfig,
    pub shutdown: Arc<AtomicBool>,
}

/// One customer after firing: what to write and when to fire next.
struct Fire<'a> {
    claimed: &'a Claimed,
    rev: u64,
    state: CustomerState,
    changed: bool,
    fired: Vec<Fired>,
    /// Allowance releases decided by time.
    effects: Effects,
    next: Option<i64>,
}

impl TimerLoop {
    /// Runs until shutdown: claims, fires, completes; sleeps `poll_interval` when idle.
    pub async fn run(self) {
        let give_up = AtomicBool::new(false);
        let mut backoff = Backoff::new(&self.pipeline.retry);
        let mut last_gauges = std::time::Instant::now() - Duration::from_secs(60);
        let shards: Vec<u32> = (0..self.timers.shards()).collect();
        while !self.shutdown.load(Ordering::SeqCst) {
            if let Some((local, shared)) = &self.shared_clock {
                // Other instances may have seen later events.
                match shared.now().await {
                    Ok(w) => local.advance(w),
                    Err(_) => self
                        .pipeline
                        .metrics
                        .redis_errors
                        .with_label_values(&["clock"])
                        .inc(),
                }
            }
            let now = self.clock.now_ms();
            self.pipeline.metrics.clock_now.set(now);
            if now <= 0 {
                // Event time before the first event: nothing can be due.
                tokio::time::sleep(self.cfg.poll_interval.0).await;
                continue;
            }
            let (busy, failed) = match self.fire_due(&shards, now).await {
                Ok(full) => (full, false),
                Err(e) => {
                    if matches!(e, crate::error::BatchError::Store(_)) {
                        self.pipeline
                            .metrics
                            .redis_errors
                            .with_label_values(&["timers"])
                            .inc();
                    }
                    warn!(error = %e, "firing timers failed; retrying");
                    self.pipeline
                        .metrics
                        .retries
                        .with_label_values(&["timers"])
                        .inc();
                    (false, true)
                }
            };
            if last_gauges.elapsed() >= Duration::from_secs(2) {
                self.export_gauges(now).await;
                last_gauges = std::time::Instant::now();
            }
            if failed {
                backoff.wait(&give_up).await;
            } else {
                backoff = Backoff::new(&self.pipeline.retry);
                if !busy {
                    tokio::time::sleep(self.cfg.poll_interval.0).await;
                }
            }
        }
    }

    async fn export_gauges(&self, now: i64) {
        match self.timers.counts(now).await {
            Ok((pending, overdue)) => {
                self.pipeline.metrics.timers_pending.set(pending as i64);
                self.pipeline.metrics.timers_overdue.set(overdue as i64);
            }
            Err(_) => self
                .pipeline
                .metrics
                .redis_errors
                .with_label_values(&["timers"])
                .inc(),
        }
    }

    /// Claims the due timers of every shard in one round trip and fires them as
    /// one batch: one load, one write, one produce and one completion for the
    /// whole poll, however many shards there are (firing shard by shard made the
    /// lag grow with the shard count). Returns true when a shard's claim was full
    /// (more may be due: poll again without sleeping).
    pub async fn fire_due(
        &self,
        shards: &[u32],
        now: i64,
    ) -> Result<bool, crate::error::BatchError> {
        let lease = self.cfg.lease.as_millis_i64();
        let limit = self.cfg.claim_limit;
        let per_shard = self
            .timers
            .claim_due_many(shards, now, lease, limit)
            .await?;
        let full = per_shard.iter().any(|c| c.len() >= limit);
        let claimed: Vec<Claimed> = per_shard.into_iter().flatten().collect();
        if claimed.is_empty() {
            return Ok(false);
        }
        for c in &claimed {
            self.pipeline
                .metrics
                .timer_lag
                .observe((now - c.due_ms).max(0) as f64 / 1000.0);
        }
        self.fire(&claimed, now).await?;
        Ok(full)
    }

    /// Fires claimed timers: decide, CAS-write, publish, complete.
    async fn fire(&self, claimed: &[Claimed], now: i64) -> Result<(), crate::error::BatchError> {
        let p = &self.pipeline;
        let mut pending: Vec<&Claimed> = claimed.iter().collect();
        let mut done: Vec<Fire<'_>> = Vec::new();
        for _round in 0..16 {
            if pending.is_empty() {
                break;
            }
            let refs: Vec<&CustomerRef> = pending.iter().map(|c| &c.customer).collect();
            let loaded = p.store.load_many(&refs).await?;
            let mut fires: Vec<Fire<'_>> = pending
                .iter()
                .zip(loaded)
                .map(|(c, l)| self.decide(c, l.rev, l.state, now))
                .collect();
            let writes: Vec<_> = fires
                .iter()
                .filter(|f| f.changed)
                .map(|f| (&f.claimed.customer, f.rev, &f.state))
                .collect();
            let results = p.store.save_many(&writes).await?;
            let lost: Vec<&CustomerRef> = writes
                .iter()
                .zip(&results)
                .filter(|(_, ok)| !**ok)
                .map(|(w, _)| w.0)
                .collect();
            if !lost.is_empty() {
                p.metrics.cas_conflicts.inc_by(lost.len() as u64);
            }
            let mut retry = Vec::new();
            for f in fires.drain(..) {
                if lost.contains(&&f.claimed.customer) {
                    retry.push(f.claimed);
                } else {
                    done.push(f);
                }
            }
            pending = retry;
        }
        if !pending.is_empty() {
            // Left leased: another poll (ours or another instance's) fires them after the lease.
            debug!(
                customers = pending.len(),
                "timers left for a later pass after repeated conflicts"
            );
        }
        // Publish what the writes put in the outboxes.
        let mut to_publish: Vec<(&CustomerRef, u64, CustomerState)> = done
            .iter()
            .filter(|f| !f.state.outbox.is_empty())
            .map(|f| {
                (
                    &f.claimed.customer,
                    if f.changed { f.rev + 1 } else { f.rev },
                    f.state.clone(),
                )
            })
            .collect();
        p.publish(&mut to_publish).await?;
        for f in &done {
            self.count(f);
        }
        let completes: Vec<(&CustomerRef, i64, Option<i64>)> = done
            .iter()
            .map(|f| (&f.claimed.customer, f.claimed.lease, f.next))
            .collect();
        let results = self.timers.complete_many(&completes).await?;
        for ok in results {
            let result = if ok { "fired" } else { "lost_lease" };
            p.metrics.timers_fired.with_label_values(&[result]).inc();
        }
        Ok(())
    }

    /// The pure part: what is due for this customer at `now`.
    fn decide<'a>(
        &self,
        claimed: &'a Claimed,
        rev: u64,
        mut state: CustomerState,
        now: i64,
    ) -> Fire<'a> {
        let p = &self.pipeline;
        let who = &claimed.customer;
        let policy = p.policies.of(&who.tenant);
        let before_outbox = state.outbox.len();
        let before_recall = state.recall.clone();
        let mut fx = Effects::default();
        decide::release_due(&mut state, who, policy, &p.params, now, None, &mut fx, None);
        let costs = policy.costs;
        let snapshot = state.clone();
        let available = |c: Channel| {
            let a = allowance_at(&snapshot, c, policy, &p.params, now);
            a.state == crate::domain::allowance::AllowanceState::Open
                && a.allowed_from.is_some_and(|t| t <= now)
        };
        let cands = recall::candidates(&snapshot, now, p.params.horizons, &policy.lapse, available);
        let ctx = FireCtx {
            customer: who,
            visits: &snapshot.visits,
            policy: &policy.lapse,
            candidates: &cands,
            costs: &costs,
        };
        let fired = recall::fire_due(&mut state.recall, now, &ctx);
        for f in &fired {
            if let Some(o) = f.output() {
                state.outbox.push(o);
            }
        }
        let next = decide::next_timer(&state, policy);
        let changed = state.outbox.len() != before_outbox
            || state.recall != before_recall
            || next != state.timer_due;
        state.timer_due = next;
        Fire {
            claimed,
            rev,
            state,
            changed,
            fired,
            effects: fx,
            next,
        }
    }

    fn count(&self, f: &Fire<'_>) {
        let m = &self.pipeline.metrics;
        let tenant = m.tenant(&f.claimed.customer.tenant);
        for (t, reason) in &f.effects.transitions {
            m.throttle_transitions
                .with_label_values(&[&tenant, t.channel.label(), t.to.label(), reason])
                .inc();
        }
        for fired in &f.fired {
            match fired {
                Fired::Trigger(t) => {
                    m.recall_stages
                        .with_label_values(&[
                            &tenant,
                            t.stage.label(),
                            t.segment.label(),
                            t.arm.label(),
                        ])
                        .inc();
                    let ch = t.recommended_channel.map_or("none", Channel::label);
                    m.recall_triggers
                        .with_label_values(&[
                            &tenant,
                            t.segment.label(),
                            t.stage.label(),
                            ch,
                            t.arm.label(),
                        ])
                        .inc();
                }
                Fired::Dormant(o) => {
                    let (segment, arm) = o.as_ref().map_or(("none", Arm::Treatment.label()), |o| {
                        (o.segment.label(), o.arm.label())
                    });
                    m.recall_stages
                        .with_label_values(&[&tenant, Stage::Dormant.label(), segment, arm])
                        .inc();
                }
                _ => {}
            }
        }
    }
}
