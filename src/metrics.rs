//! Prometheus metrics. Labels are bounded: topic, event type, channel, purpose,
//! reason, operation, partition, and tenant (capped, can be switched off).
//! Never a customer, message or campaign id.

use prometheus::{
    exponential_buckets, CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec,
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::config::MetricsConfig;
use crate::domain::event::FeedbackKind;
use crate::domain::feedback::FeedbackClass;
use crate::domain::recall::OutcomeKind;
use crate::store::fault::RedisFault;

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    tenants: Arc<TenantLabels>,
    pub records: IntCounterVec,
    pub invalid: IntCounterVec,
    pub legacy_fingerprints: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub dedup_evicted: IntCounterVec,
    pub dlq_writes: IntCounterVec,
    pub engagement: IntCounterVec,
    pub replies: IntCounterVec,
    pub visits: IntCounterVec,
    /// Applied feedback by tenant, kind and class (promoter, passive, detractor).
    pub feedback: IntCounterVec,
    /// Feedback scores by kind, the customer's segment and recall arm (no tenant: bounded).
    pub feedback_scores: HistogramVec,
    pub currency_mismatch: IntCounter,
    pub batch_records: Histogram,
    pub batch_seconds: Histogram,
    /// Seconds each batch processor (`batch.processors`, label `processor`) was applying a part.
    pub processor_busy: CounterVec,
    /// Seconds each stage of the batch path (label `stage`: dispatcher,
    /// processors, publishers, finisher) spent working, and (`activity`)
    /// waiting for room in the next stage's queue.
    pub stage_seconds: CounterVec,
    pub processing_latency: Histogram,
    pub record_latency: Histogram,
    pub redis_call_seconds: HistogramVec,
    pub redis_errors: IntCounterVec,
    pub redis_permanent_errors: IntCounterVec,
    /// The permanent Redis error in force, for `/readyz` (kept here because
    /// every component that reports Redis errors holds the metrics).
    pub redis_fault: RedisFault,
    pub cas_conflicts: IntCounter,
    pub decisions_republished: IntCounter,
    pub state_writes: IntCounter,
    pub kafka_errors: IntCounterVec,
    pub consumer_lag: IntGaugeVec,
    pub rebalances: IntCounterVec,
    pub partitions_assigned: IntGauge,
    pub partitions_paused: IntGauge,
    pub commits: IntCounterVec,
    pub retries: IntCounterVec,
    /// `redis.durability`: Redis acknowledgement → offsets eligible for commit.
    pub durability_wait_seconds: Histogram,
    pub durability_shortfalls: IntCounterVec,
    pub redis_epoch_changes: IntCounter,
    pub fenced_batches: IntCounter,
    pub redis_cluster_reconnects: IntCounter,
    pub redis_masters_without_aof: IntGauge,
    pub offset_rewinds: IntCounter,
    pub ready: IntGauge,
    pub outputs: IntCounterVec,
    pub output_seconds: Histogram,
    pub cap_hits: IntCounterVec,
    pub cap_violations: IntCounterVec,
    pub throttle_transitions: IntCounterVec,
    pub experiment_exposures: IntCounterVec,
    pub experiment_customers: IntGaugeVec,
    pub experiment_measure: GaugeVec,
    pub experiment_difference: GaugeVec,
    pub experiment_guardrail: IntGaugeVec,
    pub experiment_stopped: IntGaugeVec,
    pub customers_restricted: IntGaugeVec,
    pub recall_stages: IntCounterVec,
    pub recall_triggers: IntCounterVec,
    pub recall_outcomes: IntCounterVec,
    pub recalled_revenue: IntCounterVec,
    pub recall_cost: IntCounterVec,
    pub recall_incentive_cost: IntCounterVec,
    pub offer_codes_unknown: IntCounterVec,
    pub time_to_return: HistogramVec,
    pub timers_pending: IntGauge,
    pub timers_overdue: IntGauge,
    pub timer_lag: Histogram,
    pub timers_fired: IntCounterVec,
    pub clock_now: IntGauge,
}

/// Caps the distinct tenant label values; the rest report as `other`.
struct TenantLabels {
    enabled: bool,
    max: usize,
    seen: Mutex<HashSet<String>>,
}

impl TenantLabels {
    /// The label value, and whether it is seen for the first time.
    fn label(&self, tenant: &str) -> (String, bool) {
        if !self.enabled {
            return ("all".into(), false);
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.contains(tenant) {
            return (tenant.to_string(), false);
        }
        if seen.len() < self.max {
            seen.insert(tenant.to_string());
            return (tenant.to_string(), true);
        }
        ("other".into(), false)
    }
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn float_gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

/// Buckets of `lapse_record_latency_seconds`: fine below a second, with 25 ms
/// (the latency target) a bound, so the share of records within it is
/// counted, not interpolated (doubling buckets put it between 16 and 32 ms).
const RECORD_LATENCY_BUCKETS: [f64; 30] = [
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.064, 0.08,
    0.1, 0.128, 0.16, 0.2, 0.25, 0.32, 0.4, 0.5, 0.64, 0.8, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0,
];

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    pub fn new(cfg: &MetricsConfig) -> Metrics {
        let r = Registry::new();
        let redis_call_seconds = HistogramVec::new(
            HistogramOpts::new(
                "lapse_redis_call_seconds",
                "Latency of Redis round trips by operation.",
            )
            .buckets(exponential_buckets(0.0001, 2.0, 16).expect("buckets")),
            &["op"],
        )
        .expect("valid metric");
        r.register(Box::new(redis_call_seconds.clone()))
            .expect("unique metric");
        let single = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let plain_gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let m = Metrics {
            tenants: Arc::new(TenantLabels {
                enabled: cfg.tenant_label,
                max: cfg.max_tenants,
                seen: Mutex::new(HashSet::new()),
            }),
            records: counter(&r, "lapse_records_total", "Input records consumed, by topic and event type.", &["topic", "event_type"]),
            invalid: counter(&r, "lapse_records_invalid_total", "Input records rejected (sent to the DLQ), by event type and reason.", &["event_type", "reason"]),
            legacy_fingerprints: counter(&r, "lapse_legacy_fingerprint_records_total", "Single-object input records framed with lapse 0.1's non-standard fingerprint (accepted while schema.accept_legacy_fingerprints is true), by event type: producers still to migrate to a standard Avro library.", &["event_type"]),
            duplicates: counter(
                &r,
                "lapse_duplicates_skipped_total",
                "Records skipped as already applied: kind=redelivery (offset at or below the watermark), event_id (same event id at a new offset) or beyond_dedup_horizon (older than what the topic's dedup memory covers: state.dedup_window behind the topic's latest event, or an id pushed out by the bound; skipped as a possible re-sent copy).",
                &["event_type", "kind"],
            ),
            dedup_evicted: counter(
                &r,
                "lapse_dedup_ids_evicted_total",
                "Event ids still inside state.dedup_window pushed out of a customer's dedup memory by its bound (state.event_ids_per_topic, state.visit_ids_per_customer): older events of that customer and topic are then skipped as beyond_dedup_horizon. Raise the bound if this grows.",
                &["event_type"],
            ),
            dlq_writes: counter(&r, "lapse_dlq_writes_total", "Records written to the dead-letter topic, by source event type.", &["event_type"]),
            engagement: counter(
                &r,
                "lapse_engagement_events_total",
                "Applied sends, opens, clicks and replies by tenant, channel, event type and purpose (opens, clicks, replies: purpose=\"none\").",
                &["tenant", "channel", "event_type", "purpose"],
            ),
            replies: counter(&r, "lapse_replies_total", "Applied replies by tenant, channel and class (unsubscribe, resubscribe, positive, neutral).", &["tenant", "channel", "class"]),
            visits: counter(&r, "lapse_visits_total", "Applied clinic visits by tenant and visit type.", &["tenant", "visit_type"]),
            feedback: counter(
                &r,
                "lapse_feedback_total",
                "Applied satisfaction feedback by tenant, kind (nps, csat) and class (promoter, passive, detractor: policy.feedback thresholds).",
                &["tenant", "kind", "class"],
            ),
            feedback_scores: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "lapse_feedback_scores",
                        "Applied feedback scores (NPS 0-10, CSAT 1-5) by kind, the customer's win-back segment (active: no stage fired since the last visit) and recall arm (recalled: came back after a treatment trigger; holdout; none), of the current episode, else the previous one.",
                    )
                    .buckets((0..=10).map(f64::from).collect()),
                    &["kind", "segment", "recall_arm"],
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            currency_mismatch: single(
                "lapse_visit_currency_mismatch_total",
                "Visits whose currency differs from the customer's first visit: counted as visits, not as spend.",
            ),
            batch_records: histogram(&r, "lapse_batch_records", "Records per applied batch.", exponential_buckets(1.0, 2.0, 16).expect("buckets")),
            batch_seconds: histogram(&r, "lapse_batch_seconds", "Wall time to apply one batch, decode to durable.", exponential_buckets(0.0005, 2.0, 16).expect("buckets")),
            processor_busy: {
                let c = CounterVec::new(
                    Opts::new(
                        "lapse_batch_processor_busy_seconds_total",
                        "Wall time each batch processor (batch.processors, labelled 0..n-1) spent applying its customers' part of batches: a rate near 1 for each means the processors are the limit.",
                    ),
                    &["processor"],
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            stage_seconds: {
                let c = CounterVec::new(
                    Opts::new(
                        "lapse_batch_stage_seconds_total",
                        "Seconds the stages of the batch path (stage: dispatcher = decode and split, processors = state writes, publishers = decisions produced and outboxes cleared, finisher = campaigns and hand-over to the offset gate; summed over a stage's tasks) spent working (activity=\"working\") and blocked on the next stage's full queue (activity=\"blocked\"). The stage whose working rate is near its task count is the limit.",
                    ),
                    &["stage", "activity"],
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            processing_latency: histogram(
                &r,
                "lapse_processing_latency_seconds",
                "Event time to state durable in Redis, per applied event.",
                exponential_buckets(0.001, 2.0, 24).expect("buckets"),
            ),
            record_latency: histogram(
                &r,
                "lapse_record_latency_seconds",
                "From a record's arrival in lapse (returned by the consumer's poll) to its batch durable and its decisions acknowledged by the broker, per record: lapse's own part of an event's latency, without the broker's fetch wait.",
                RECORD_LATENCY_BUCKETS.to_vec(),
            ),
            redis_call_seconds,
            redis_errors: counter(&r, "lapse_redis_errors_total", "Failed Redis calls by operation.", &["op"]),
            redis_permanent_errors: counter(
                &r,
                "lapse_redis_permanent_errors_total",
                "Failed Redis steps that waiting does not cure, by kind (cross_slot, moved, noscript, wrong_type, auth): see the log for what to do.",
                &["kind"],
            ),
            redis_fault: RedisFault::default(),
            cas_conflicts: single("lapse_state_write_conflicts_total", "State writes retried because another writer changed the record (customer or campaign) first."),
            decisions_republished: single("lapse_decisions_republished_total", "Allowance decisions published again because another writer of the record may have published a newer one before this writer's older copy landed (the newest is then the last on its key)."),
            state_writes: single("lapse_state_writes_total", "Customer states written to Redis."),
            kafka_errors: counter(&r, "lapse_kafka_errors_total", "Kafka client errors by operation.", &["op"]),
            consumer_lag: gauge(&r, "lapse_consumer_lag", "Records behind the partition's high watermark, per assigned partition.", &["topic", "partition"]),
            rebalances: counter(&r, "lapse_rebalances_total", "Consumer group rebalance callbacks by kind (assign, revoke, error).", &["kind"]),
            partitions_assigned: plain_gauge("lapse_partitions_assigned", "Input partitions currently assigned to this instance."),
            partitions_paused: plain_gauge("lapse_partitions_paused", "Input partitions currently paused for back-pressure."),
            commits: counter(&r, "lapse_offset_commits_total", "Offset commits by result (ok, error).", &["result"]),
            retries: counter(&r, "lapse_retries_total", "Back-off retries by cause (redis, dlq, registry, timers, durability).", &["cause"]),
            durability_wait_seconds: histogram(&r, "lapse_durability_wait_seconds", "redis.durability: time from Redis acknowledging a batch's writes to its offsets being eligible for commit (WAIT, or the fsync horizon).", exponential_buckets(0.0001, 2.0, 18).expect("buckets")),
            durability_shortfalls: counter(&r, "lapse_durability_shortfalls_total", "Batches not confirmed durable, by kind (replicas: WAIT counted fewer than redis.replicas; epoch: a Redis master restarted or changed meanwhile; redis: WAIT failed): retried, never committed.", &["kind"]),
            redis_epoch_changes: single("lapse_redis_epoch_changes_total", "Redis master restarts or changes of the set of masters seen (INFO server run_id)."),
            fenced_batches: single("lapse_fenced_writes_total", "State writes of the batch path refused by the write fence (redis.durability = \"fsync_horizon\"): Redis may have lost acknowledged writes, so batches read before the rewind are dropped and read again."),
            redis_masters_without_aof: plain_gauge("lapse_redis_masters_without_aof", "Redis masters with appendonly no, read at start-up when redis.durability = fsync_horizon (which relies on the AOF): above 0, a Redis crash there loses acknowledged writes for good."),
            redis_cluster_reconnects: single("lapse_redis_cluster_reconnects_total", "Redis Cluster connections replaced by a new one from the known nodes after every call failed for a while (redis.response_timeout x 3, at least 5 s)."),
            offset_rewinds: single("lapse_offset_rewinds_total", "Times every assigned partition was re-read from its last durable offset because Redis may have lost acknowledged writes (redis.durability = fsync_horizon)."),
            ready: plain_gauge("lapse_ready", "1 when /readyz answers 200: Redis, the broker and the schema registry answered the last readiness probe and no permanent Redis error is in force."),
            outputs: counter(&r, "lapse_outputs_total", "Decisions produced (acknowledged by the broker), by kind (throttle, trigger, outcome).", &["kind"]),
            output_seconds: histogram(&r, "lapse_output_produce_seconds", "Time to produce one batch's decisions and get every acknowledgement.", exponential_buckets(0.0005, 2.0, 16).expect("buckets")),
            cap_hits: counter(&r, "lapse_cap_hits_total", "Marketing sends that filled a channel's rolling window (the channel became CAPPED).", &["tenant", "channel"]),
            cap_violations: counter(
                &r,
                "lapse_cap_violations_total",
                "Marketing sends made while not allowed, by kind (cap, throttled, suppressed, quiet_hours, cross_channel_cap, campaign_on_other_channel, platform_rule): a sender ignoring the allowance.",
                &["tenant", "channel", "kind"],
            ),
            throttle_transitions: counter(
                &r,
                "lapse_throttle_transitions_total",
                "Published allowance changes by channel, new state and reason.",
                &["tenant", "channel", "state", "reason"],
            ),
            experiment_exposures: counter(
                &r,
                "lapse_experiment_exposures_total",
                "Customers exposed to a contact-policy experiment (the arm first changed a decision for them; control customers when another arm would have), by experiment and arm. Labels are bounded: at most 16 experiments of at most 4 arms, from the configuration.",
                &["experiment", "arm"],
            ),
            experiment_customers: gauge(
                &r,
                "lapse_experiment_customers",
                "Exposed customers of a contact-policy experiment by arm, as of the last experiment report (every experiments.report_every). Bounded labels as lapse_experiment_exposures_total.",
                &["experiment", "arm"],
            ),
            experiment_measure: float_gauge(
                &r,
                "lapse_experiment_measure",
                "Per-arm measure of a contact-policy experiment over its exposed customers (see `lapse experiment report`: rates per send, counts and money per customer, money in minor units), as of the last experiment report. measure is one of a fixed list of 20.",
                &["experiment", "arm", "measure"],
            ),
            experiment_difference: float_gauge(
                &r,
                "lapse_experiment_difference",
                "Arm minus control of a measure with its always-valid interval (bound = estimate, lower, upper), as of the last experiment report.",
                &["experiment", "arm", "measure", "bound"],
            ),
            experiment_guardrail: gauge(
                &r,
                "lapse_experiment_guardrail",
                "Unsubscribe guardrail of an arm as of the last experiment report: -1 too few customers to judge, 0 holds, 1 flagged (worse than control beyond the interval).",
                &["experiment", "arm"],
            ),
            experiment_stopped: gauge(
                &r,
                "lapse_experiment_stopped",
                "1 when the arm was stopped by the guardrail (auto_stop): its customers have the control's policy.",
                &["experiment", "arm"],
            ),
            customers_restricted: gauge(
                &r,
                "lapse_customers_restricted",
                "Customers currently CAPPED, THROTTLED or SUPPRESSED per channel, fleet-wide (kept in Redis: every instance exports the same value, aggregate with max()).",
                &["tenant", "channel", "state"],
            ),
            recall_stages: counter(
                &r,
                "lapse_recall_stage_entries_total",
                "Customers entering a lapse stage (AT_RISK, LAPSED, FOLLOW_UP, DORMANT), by segment and arm; holdout included.",
                &["tenant", "stage", "segment", "arm"],
            ),
            recall_triggers: counter(
                &r,
                "lapse_recall_triggers_total",
                "Recall triggers fired, by segment, stage, recommended channel (none: no channel available) and arm (holdout ones are recorded, not sent).",
                &["tenant", "segment", "stage", "channel", "arm"],
            ),
            recall_outcomes: counter(
                &r,
                "lapse_recall_outcomes_total",
                "Recall outcomes by kind (recalled, not_recalled, retracted, repurchased), segment and arm; repurchase rate = repurchased / recalled.",
                &["tenant", "kind", "segment", "arm"],
            ),
            recalled_revenue: counter(
                &r,
                "lapse_recalled_revenue_total",
                "Revenue of recalling visits, minor currency units, by arm and currency.",
                &["tenant", "arm", "currency"],
            ),
            recall_cost: counter(
                &r,
                "lapse_recall_marketing_cost_total",
                "Marketing cost between a trigger and its outcome (recalled or not), minor units, by arm and currency.",
                &["tenant", "arm", "currency"],
            ),
            recall_incentive_cost: counter(
                &r,
                "lapse_recall_incentive_cost_total",
                "Incentive cost of recalling visits (the redeemed offer: the visit's discount, else its tier's configured cost), minor units, by arm and currency. Cost per recall = (marketing + incentive) / recalled.",
                &["tenant", "arm", "currency"],
            ),
            offer_codes_unknown: counter(
                &r,
                "lapse_offer_codes_unknown_total",
                "Recalling visits whose offer_code has no configured cost (policy.lapse.offer_costs) and no discount: counted as incentive 0. Add the tier's cost to the config.",
                &["tenant"],
            ),
            time_to_return: {
                let h = HistogramVec::new(
                    HistogramOpts::new("lapse_recall_time_to_return_days", "Days from trigger to the recalling visit.")
                        .buckets(vec![1.0, 3.0, 7.0, 14.0, 21.0, 30.0, 45.0, 60.0, 90.0]),
                    &["tenant", "segment", "arm"],
                )
                .expect("valid metric");
                r.register(Box::new(h.clone())).expect("unique metric");
                h
            },
            timers_pending: plain_gauge("lapse_timers_pending", "Customers with a scheduled timer (recall stage or allowance release), fleet-wide."),
            timers_overdue: plain_gauge("lapse_timers_overdue", "Timers due now and not yet fired, fleet-wide."),
            timer_lag: histogram(
                &r,
                "lapse_timer_firing_lag_seconds",
                "Due time to firing, per fired timer (in event-time mode: in event time).",
                exponential_buckets(0.01, 2.0, 16).expect("buckets"),
            ),
            timers_fired: counter(&r, "lapse_timers_fired_total", "Timers fired, by result (fired, nothing_due, lost_lease).", &["result"]),
            clock_now: plain_gauge("lapse_clock_now_ms", "The clock timers fire by (wall or event-time watermark), ms since the epoch."),
            registry: r,
        };
        m.precreate();
        m
    }

    /// Counts one published recall outcome.
    pub fn count_outcome(&self, o: &crate::domain::recall::RecallOutcome) {
        let tenant = self.tenant(&o.tenant_id);
        let arm = o.arm.label();
        self.recall_outcomes
            .with_label_values(&[&tenant, o.kind.label(), o.segment.label(), arm])
            .inc();
        if o.kind == crate::domain::recall::OutcomeKind::Recalled {
            self.recalled_revenue
                .with_label_values(&[&tenant, arm, &o.currency])
                .inc_by(o.revenue.max(0) as u64);
            if let Some(d) = o.days_to_return {
                self.time_to_return
                    .with_label_values(&[&tenant, o.segment.label(), arm])
                    .observe(d);
            }
        }
        if o.kind == crate::domain::recall::OutcomeKind::Recalled {
            self.recall_incentive_cost
                .with_label_values(&[&tenant, arm, &o.currency])
                .inc_by(o.incentive_cost.max(0) as u64);
        }
        if o.kind != crate::domain::recall::OutcomeKind::Retracted {
            self.recall_cost
                .with_label_values(&[&tenant, arm, &o.currency])
                .inc_by(o.marketing_cost.max(0) as u64);
        }
    }

    /// The tenant label value for `tenant`, bounded by `metrics.max_tenants`.
    pub fn tenant(&self, tenant: &str) -> String {
        let (label, new) = self.tenants.label(tenant);
        if new {
            // Series at 0 from the start, so rate() and increase() see the first event.
            for kind in OutcomeKind::ALL.map(OutcomeKind::label) {
                for seg in ["high_value_lapsed", "at_risk", "low_value_lapsed"] {
                    for arm in ["treatment", "holdout"] {
                        self.recall_outcomes
                            .with_label_values(&[&label, kind, seg, arm]);
                    }
                }
            }
            for kind in FeedbackKind::ALL {
                for class in FeedbackClass::ALL {
                    self.feedback
                        .with_label_values(&[&label, kind.label(), class.label()]);
                }
            }
        }
        label
    }

    /// Creates the fixed-label error and outcome series at 0 (standard practice,
    /// so alerts on rate() fire on the first error).
    fn precreate(&self) {
        for op in [
            "load",
            "save",
            "load_campaigns",
            "save_campaigns",
            "timers",
            "gauges",
            "clock",
            "ping",
            "allowance",
            "campaign",
            "epoch",
        ] {
            self.redis_errors.with_label_values(&[op]);
        }
        for kind in crate::store::fault::KINDS {
            self.redis_permanent_errors.with_label_values(&[kind]);
        }
        for op in ["client", "poll", "producer", "metadata"] {
            self.kafka_errors.with_label_values(&[op]);
        }
        for r in ["ok", "error"] {
            self.commits.with_label_values(&[r]);
        }
        for k in ["assign", "revoke", "error"] {
            self.rebalances.with_label_values(&[k]);
        }
        for k in crate::store::durability::SHORTFALL_KINDS {
            self.durability_shortfalls.with_label_values(&[k]);
        }
        for c in ["redis", "dlq", "registry", "timers", "durability"] {
            self.retries.with_label_values(&[c]);
        }
        for k in crate::domain::event::EventKind::ALL {
            self.dlq_writes.with_label_values(&[k.label()]);
            self.legacy_fingerprints.with_label_values(&[k.label()]);
            for reason in crate::codec::DecodeError::REASONS {
                self.invalid.with_label_values(&[k.label(), reason]);
            }
        }
        for r in ["fired", "lost_lease"] {
            self.timers_fired.with_label_values(&[r]);
        }
        for k in ["throttle", "trigger", "outcome"] {
            self.outputs.with_label_values(&[k]);
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            return format!("# encode error: {e}\n");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_labels_are_capped() {
        let m = Metrics::new(&MetricsConfig {
            tenant_label: true,
            max_tenants: 2,
            ..MetricsConfig::default()
        });
        assert_eq!(m.tenant("a"), "a");
        assert_eq!(m.tenant("b"), "b");
        assert_eq!(m.tenant("c"), "other");
        assert_eq!(m.tenant("a"), "a");
        let off = Metrics::new(&MetricsConfig {
            tenant_label: false,
            max_tenants: 2,
            ..MetricsConfig::default()
        });
        assert_eq!(off.tenant("a"), "all");
    }

    #[test]
    fn renders_text_format() {
        let m = Metrics::new(&MetricsConfig::default());
        m.records
            .with_label_values(&["engagement.sends", "send"])
            .inc();
        assert!(m
            .render()
            .contains("lapse_records_total{event_type=\"send\",topic=\"engagement.sends\"} 1"));
    }
}
