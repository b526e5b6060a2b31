//! The timer loop: every instance claims due timers (leased, so no two instances
//! fire one at the same time and a crash loses none), loads those customers,
//! lets the domain decide (recall stages, allowance releases), and writes and
//! publishes through the record path's state write (`state_write.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{RetryConfig, TimersConfig};
use crate::domain::clock::{Clock, EventClock};
use crate::domain::decide::Effects;
use crate::domain::event::{Channel, CustomerRef};
use crate::domain::experiment::ArmTag;
use crate::domain::lapse::Stage;
use crate::domain::policy::Policies;
use crate::domain::recall::{Arm, Fired};
use crate::domain::state::{CustomerState, StateParams};
use crate::domain::step;
use crate::error::{BatchError, StoreError};
use crate::metrics::Metrics;
use crate::retry::{Backoff, RetryLog};
use crate::state_write::{Fold, StateWriter};
use crate::store::durability::Durability;
use crate::store::event_time::SharedEventTime;
use crate::store::fault;
use crate::store::timers::{Claimed, TimerStore};

/// The retried step a permanent Redis error is reported against (`/readyz`).
const FIRING: &str = "firing timers";

pub struct TimerLoop {
    /// Customer states: load, fold, compare-and-set, publish the outboxes (the
    /// same step as the record path's).
    pub writer: StateWriter,
    pub timers: TimerStore,
    pub policies: Arc<Policies>,
    pub params: StateParams,
    pub metrics: Metrics,
    /// Back-off after a failed poll (Redis or broker down).
    pub retry: RetryConfig,
    pub clock: Arc<dyn Clock>,
    /// Event-time mode: the local watermark and the one shared in Redis.
    pub shared_clock: Option<(Arc<EventClock>, SharedEventTime)>,
    pub cfg: TimersConfig,
    /// Raised on SIGTERM/SIGINT: the loop stops, also in the middle of a back-off.
    pub shutdown: Arc<AtomicBool>,
    /// `redis.durability = "replicas"`: a firing is confirmed on the replicas
    /// before its triggers are published (a firing a failover lost would fire
    /// again with another `fired_at`). None: not checked (tests).
    pub durability: Option<Durability>,
}

/// What firing one customer's timer did, kept until the write has landed.
struct Fire<'a> {
    claimed: &'a Claimed,
    fired: Vec<Fired>,
    /// Allowance releases decided by time.
    effects: Effects,
    next: Option<i64>,
    /// Experiments the customer was first exposed to.
    exposures: Vec<ArmTag>,
}

/// The timer loop's fold of a customer: what is due at `now`.
struct FireFold<'a, 'l> {
    timers: &'l TimerLoop,
    claimed: HashMap<&'a CustomerRef, &'a Claimed>,
    now: i64,
}

impl<'a> Fold<CustomerState> for FireFold<'a, '_> {
    type Extra = Fire<'a>;

    fn fold(&mut self, c: &CustomerRef, state: &mut CustomerState) -> (bool, Fire<'a>) {
        self.timers.decide(self.claimed[c], state, self.now)
    }
}

impl TimerLoop {
    /// Runs until shutdown: claims, fires, completes; sleeps `poll_interval`
    /// when idle, backs off (`retry.*`) after a failure.
    pub async fn run(self) {
        let mut backoff = Backoff::new(&self.retry);
        let retry_log = RetryLog::default();
        let mut last_gauges = std::time::Instant::now() - Duration::from_secs(60);
        let shards: Vec<u32> = (0..self.timers.shards()).collect();
        // A changed timers.shards leaves timers in shards nobody polls any
        // more: moved first, retried and reported like a poll.
        let mut migrated = false;
        while !self.shutdown.load(Ordering::SeqCst) {
            if let Some((local, shared)) = &self.shared_clock {
                // Other instances may have seen later events.
                match shared.now().await {
                    Ok(w) => local.advance(w),
                    Err(_) => self
                        .metrics
                        .redis_errors
                        .with_label_values(&["clock"])
                        .inc(),
                }
            }
            let now = self.clock.now_ms();
            self.metrics.clock_now.set(now);
            if now <= 0 {
                // Event time before the first event: nothing can be due.
                tokio::time::sleep(self.cfg.poll_interval.0).await;
                continue;
            }
            let step = if migrated {
                self.fire_due(&shards, now).await
            } else {
                match self.timers.migrate_orphans().await {
                    Ok(_) => {
                        migrated = true;
                        self.fire_due(&shards, now).await
                    }
                    Err(e) => Err(e.into()),
                }
            };
            let (busy, failed) = match step {
                Ok(full) => {
                    self.metrics.redis_fault.clear(FIRING);
                    (full, false)
                }
                Err(e) => {
                    if matches!(&e, BatchError::Store(s) if !matches!(s, StoreError::Contended { .. }))
                    {
                        self.metrics
                            .redis_errors
                            .with_label_values(&["timers"])
                            .inc();
                    }
                    if !fault::report(&self.metrics, FIRING, &e) {
                        retry_log.warn("firing timers failed", &e);
                    }
                    self.metrics.retries.with_label_values(&["timers"]).inc();
                    (false, true)
                }
            };
            if last_gauges.elapsed() >= Duration::from_secs(2) {
                self.export_gauges(now).await;
                last_gauges = std::time::Instant::now();
            }
            if failed {
                // Returns early, with false, once shutdown is raised.
                backoff.wait(&self.shutdown).await;
            } else {
                backoff = Backoff::new(&self.retry);
                if !busy {
                    tokio::time::sleep(self.cfg.poll_interval.0).await;
                }
            }
        }
    }

    async fn export_gauges(&self, now: i64) {
        match self.timers.counts(now).await {
            Ok((pending, overdue)) => {
                self.metrics.timers_pending.set(pending as i64);
                self.metrics.timers_overdue.set(overdue as i64);
            }
            Err(_) => self
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
    pub async fn fire_due(&self, shards: &[u32], now: i64) -> Result<bool, BatchError> {
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
            self.metrics
                .timer_lag
                .observe((now - c.due_ms).max(0) as f64 / 1000.0);
        }
        self.fire(&claimed, now).await?;
        Ok(full)
    }

    /// Fires claimed timers: decide, CAS-write, publish, complete. Timers of
    /// customers still conflicting after the write step's rounds stay leased
    /// (the step fails with `Contended`): this or another instance fires them
    /// when the lease ends.
    async fn fire(&self, claimed: &[Claimed], now: i64) -> Result<(), BatchError> {
        let ids: Vec<&CustomerRef> = claimed.iter().map(|c| &c.customer).collect();
        let mut fold = FireFold {
            timers: self,
            claimed: claimed.iter().map(|c| (&c.customer, c)).collect(),
            now,
        };
        let epoch = self.durability.as_ref().map(|d| d.epoch.current());
        let done = self.writer.write(ids, &mut fold).await?;
        if let (Some(d), Some(epoch)) = (&self.durability, epoch) {
            d.confirm(epoch).await?;
        }
        self.writer.publish(&done).await?;
        for d in &done {
            self.count(&d.extra);
        }
        let completes: Vec<(&CustomerRef, i64, Option<i64>)> = done
            .iter()
            .map(|d| (d.id, d.extra.claimed.lease, d.extra.next))
            .collect();
        let results = self.timers.complete_many(&completes).await?;
        for ok in results {
            let result = if ok { "fired" } else { "lost_lease" };
            self.metrics.timers_fired.with_label_values(&[result]).inc();
        }
        Ok(())
    }

    /// The pure part: what is due for this customer at `now`. Returns whether
    /// the state changed.
    fn decide<'a>(
        &self,
        claimed: &'a Claimed,
        state: &mut CustomerState,
        now: i64,
    ) -> (bool, Fire<'a>) {
        let who = &claimed.customer;
        let eff = self.policies.effective(who, now);
        let (step, exposures) = step::on_timer_under(state, who, &eff, &self.params, now);
        (
            step.changed,
            Fire {
                claimed,
                fired: step.fired,
                effects: step.effects,
                next: step.next,
                exposures,
            },
        )
    }

    fn count(&self, f: &Fire<'_>) {
        let m = &self.metrics;
        let tenant = m.tenant(&f.claimed.customer.tenant);
        for x in &f.exposures {
            m.experiment_exposures
                .with_label_values(&[&x.experiment, &x.arm])
                .inc();
        }
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
