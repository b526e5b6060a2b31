//! The running service's watch over contact-policy experiments: every
//! `experiments.report_every` it reports every experiment (the same report as
//! `lapse experiment report`) into the `lapse_experiment_*` gauges and, for
//! experiments with `auto_stop`, stops an arm the unsubscribe guardrail flags
//! (a stop record in Redis, first writer wins); every `experiments.stop_poll`
//! it reads the stop records, so every instance applies a stop from its time
//! on. Runs only with experiments configured. Stops act at the wall clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::domain::clock::Clock;
use crate::domain::experiment::report::{self, GuardVerdict, Phase, Report, METRICS};
use crate::domain::experiment::Experiments;
use crate::error::StoreError;
use crate::experiment_report;
use crate::metrics::Metrics;
use crate::store::experiment_stops::ExperimentStops;
use crate::store::StateStore;

pub struct ExperimentMonitor {
    pub store: StateStore,
    pub stops: ExperimentStops,
    pub experiments: Arc<Experiments>,
    pub metrics: Metrics,
    pub clock: Arc<dyn Clock>,
    pub report_every: Duration,
    pub stop_poll: Duration,
    pub shutdown: Arc<AtomicBool>,
}

impl ExperimentMonitor {
    pub async fn run(self) {
        let mut next_report = Instant::now() + self.stop_poll;
        while !self.shutdown.load(Ordering::SeqCst) {
            if let Err(e) = self.load_stops().await {
                warn!(error = %e, "cannot read the experiment stop records; retrying at the next poll");
            }
            if Instant::now() >= next_report {
                if let Err(e) = self.check().await {
                    warn!(error = %e, "experiment report failed; retrying at the next poll");
                    next_report = Instant::now() + self.stop_poll;
                } else {
                    next_report = Instant::now() + self.report_every;
                }
            }
            // In short steps, so shutdown is seen promptly.
            let until = Instant::now() + self.stop_poll;
            while Instant::now() < until && !self.shutdown.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Applies the stop records to the experiments.
    async fn load_stops(&self) -> Result<(), StoreError> {
        for (name, arm) in self.stops.apply(&self.experiments).await? {
            self.metrics
                .experiment_stopped
                .with_label_values(&[&name, &arm])
                .set(1);
        }
        Ok(())
    }

    /// Reports every experiment into the gauges and stops flagged arms of
    /// experiments with `auto_stop`.
    async fn check(&self) -> Result<(), StoreError> {
        let (tally, _) = experiment_report::tally(&self.store).await?;
        let now = self.clock.now_ms();
        for r in experiment_report::reports(&self.experiments, &tally, now, None) {
            self.export(&r);
            let Some(e) = self.experiments.all().find(|e| e.name == r.experiment) else {
                continue;
            };
            if !e.judging.auto_stop || !matches!(r.phase, Phase::Running { .. }) {
                continue;
            }
            for arm in report::flagged(&r) {
                if self.stops.stop(&r.experiment, arm, now).await? {
                    warn!(
                        experiment = %r.experiment,
                        arm,
                        "unsubscribe guardrail flagged the arm: stopped (auto_stop); its customers \
                         now get the control's policy. Delete the stop record to restart it."
                    );
                } else {
                    info!(experiment = %r.experiment, arm, "arm flagged; already stopped");
                }
            }
        }
        self.load_stops().await
    }

    fn export(&self, r: &Report) {
        let m = &self.metrics;
        let e = r.experiment.as_str();
        for a in &r.arms {
            m.experiment_customers
                .with_label_values(&[e, &a.arm])
                .set(a.exposed as i64);
            m.experiment_stopped
                .with_label_values(&[e, &a.arm])
                .set(i64::from(a.stopped_at.is_some()));
            for (metric, v) in METRICS.iter().zip(&a.values) {
                if let Some(v) = v {
                    m.experiment_measure
                        .with_label_values(&[e, &a.arm, metric.key])
                        .set(*v);
                }
            }
        }
        for c in &r.comparisons {
            if let Some(d) = c.difference {
                for (bound, v) in [
                    ("estimate", d.estimate),
                    ("lower", d.lower),
                    ("upper", d.upper),
                ] {
                    m.experiment_difference
                        .with_label_values(&[e, &c.arm, c.metric, bound])
                        .set(v);
                }
            }
        }
        for g in &r.guardrail {
            let v = match g.verdict {
                GuardVerdict::TooFewCustomers { .. } => -1,
                GuardVerdict::Holds { .. } => 0,
                GuardVerdict::Flagged { .. } => 1,
            };
            m.experiment_guardrail
                .with_label_values(&[e, &g.arm])
                .set(v);
        }
    }
}
