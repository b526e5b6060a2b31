//! Decisions out: Avro values for the output schemas, their framing (Confluent
//! schema ids resolved at start-up, or single-object fingerprints), and the
//! producer step of the outbox. Every output carries its deterministic id as
//! key-independent header `lapse.id`, so consumers can de-duplicate exact repeats.

use std::sync::Arc;

use apache_avro::types::Value;
use futures::future::join_all;

use crate::codec::{
    CodecError, Encoder, Framing, RegistryClient, SchemaSet, RECALL_OUTCOME, RECALL_TRIGGER,
    THROTTLE_EVENT,
};
use crate::config::{OutputFraming, TopicsConfig};
use crate::domain::allowance::ThrottleDecision;
use crate::domain::binding_rule::{binding_rule, BindingRule};
use crate::domain::event::{Channel, CustomerRef};
use crate::domain::experiment::{ArmTag, Experiments};
use crate::domain::output::Output;
use crate::domain::recall::{RecallOutcome, RecallTrigger};
use crate::error::KafkaError;
use crate::kafka::producer::OutputProducer;

pub const H_ID: &str = "lapse.id";
pub const H_KIND: &str = "lapse.kind";

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    v.map_or(Value::Null, f)
}

fn enm(index: usize, symbol: &str) -> Value {
    Value::Enum(index as u32, symbol.to_owned())
}

fn string(s: &str) -> Value {
    Value::String(s.to_owned())
}

fn opt_string(s: &Option<String>) -> Value {
    s.as_deref().map_or(Value::Null, string)
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// `policy_experiment` and `policy_arm`: the experiment arm an output carries.
fn arm_fields(tag: Option<&ArmTag>) -> [(&'static str, Value); 2] {
    [
        ("policy_experiment", opt(tag, |t| string(&t.experiment))),
        ("policy_arm", opt(tag, |t| string(&t.arm))),
    ]
}

/// `lapse.v1.ThrottleEvent` (schemas/throttle_event.avsc); `tag`: the
/// experiment arm that shaped the decision (see `Experiments::tag_channel`).
pub fn throttle_value(d: &ThrottleDecision, tag: Option<&ArmTag>) -> Value {
    let scope = if d.customer_id.is_some() {
        enm(0, "CUSTOMER_CHANNEL")
    } else {
        enm(1, "CAMPAIGN")
    };
    let rule_scope = match (&d.customer_id, binding_rule(&d.reason)) {
        (None, _) => Value::Null,
        (Some(_), BindingRule::CrossChannel) => enm(1, "CROSS_CHANNEL"),
        (Some(_), BindingRule::Platform) => enm(2, "PLATFORM"),
        // The campaign lock is never published: it answers `?campaign=` only.
        (Some(_), _) => enm(0, "CHANNEL"),
    };
    record(
        vec![
            ("decision_id", string(&d.decision_id)),
            ("scope", scope),
            ("tenant_id", string(&d.tenant_id)),
            ("customer_id", opt_string(&d.customer_id)),
            ("channel", opt(d.channel, |c| enm(c.index(), c.as_str()))),
            ("campaign_id", opt_string(&d.campaign_id)),
            ("state", enm(d.state.index(), d.state.as_str())),
            ("reason", string(&d.reason)),
            ("allowed_from", opt(d.allowed_from, Value::TimestampMillis)),
            ("cap", opt(d.cap, |c| Value::Int(c as i32))),
            ("window_ms", opt(d.window_ms, Value::Long)),
            ("short_click_rate", opt(d.short_click_rate, Value::Double)),
            (
                "baseline_click_rate",
                opt(d.baseline_click_rate, Value::Double),
            ),
            ("sends_in_window", Value::Long(d.sends_in_window)),
            ("decided_at", Value::TimestampMillis(d.decided_at)),
            ("cause_event_id", opt_string(&d.cause_event_id)),
            ("rule_scope", rule_scope),
        ]
        .into_iter()
        .chain(arm_fields(tag))
        .collect(),
    )
}

/// `lapse.v1.RecallTrigger` (schemas/recall_trigger.avsc); `tag`: the
/// experiment arm that shaped it (see `Experiments::tag_recall`).
pub fn trigger_value(t: &RecallTrigger, tag: Option<&ArmTag>) -> Value {
    let ch = |c: Channel| enm(c.index(), c.as_str());
    record(
        vec![
            ("trigger_id", string(&t.trigger_id)),
            ("tenant_id", string(&t.tenant_id)),
            ("customer_id", string(&t.customer_id)),
            ("episode_id", string(&t.episode_id)),
            ("stage", enm(t.stage.index(), t.stage.as_str())),
            ("attempt", Value::Int(t.attempt)),
            ("segment", enm(t.segment.index(), t.segment.as_str())),
            ("days_since_last_visit", Value::Int(t.days_since_last_visit)),
            (
                "expected_interval_days",
                Value::Double(t.expected_interval_days),
            ),
            ("lifetime_value", Value::Long(t.lifetime_value)),
            ("currency", string(&t.currency)),
            ("last_treatment", opt_string(&t.last_treatment)),
            (
                "recommended_channel",
                t.recommended_channel.map_or(Value::Null, ch),
            ),
            (
                "fallback_channels",
                Value::Array(t.fallback_channels.iter().map(|c| ch(*c)).collect()),
            ),
            ("offer_tier", string(&t.offer_tier)),
            ("experiment", string(&t.experiment)),
            ("arm", enm(t.arm.index(), t.arm.as_str())),
            ("due_at", Value::TimestampMillis(t.due_at)),
            ("fired_at", Value::TimestampMillis(t.fired_at)),
            ("send_after", opt(t.send_after, Value::TimestampMillis)),
        ]
        .into_iter()
        .chain(arm_fields(tag))
        .chain([("purpose", {
            let p = t.purpose();
            enm(p as usize, p.as_str())
        })])
        .collect(),
    )
}

/// `lapse.v1.RecallOutcome` (schemas/recall_outcome.avsc), with the
/// experiment arm it belongs to (see `Experiments::tag_outcome`).
pub fn outcome_value(o: &RecallOutcome, tag: Option<&ArmTag>) -> Value {
    record(
        vec![
            ("outcome_id", string(&o.outcome_id)),
            ("trigger_id", string(&o.trigger_id)),
            ("kind", enm(o.kind.index(), o.kind.as_str())),
            ("tenant_id", string(&o.tenant_id)),
            ("customer_id", string(&o.customer_id)),
            ("episode_id", string(&o.episode_id)),
            ("stage", enm(o.stage.index(), o.stage.as_str())),
            ("segment", enm(o.segment.index(), o.segment.as_str())),
            ("experiment", string(&o.experiment)),
            ("arm", enm(o.arm.index(), o.arm.as_str())),
            (
                "days_to_return",
                o.days_to_return.map_or(Value::Null, Value::Double),
            ),
            ("revenue", Value::Long(o.revenue)),
            ("marketing_cost", Value::Long(o.marketing_cost)),
            ("incentive_cost", Value::Long(o.incentive_cost)),
            ("currency", string(&o.currency)),
            ("cause_event_id", opt_string(&o.cause_event_id)),
            ("decided_at", Value::TimestampMillis(o.decided_at)),
        ]
        .into_iter()
        .chain(arm_fields(tag))
        .collect(),
    )
}

/// The arm a customer×channel decision carries: the experiment running at
/// `decided_at` that changes the channel's decisions.
pub fn throttle_tag(x: &Experiments, d: &ThrottleDecision) -> Option<ArmTag> {
    let (Some(customer), Some(channel)) = (&d.customer_id, d.channel) else {
        return None;
    };
    let who = CustomerRef::new(d.tenant_id.clone(), customer.clone());
    x.tag_channel(&who, channel, d.decided_at)
}

/// The arm a trigger carries: the experiment running at `fired_at` that
/// changes recall stage offsets. None for a care call: no stage offset shapes it.
pub fn trigger_tag(x: &Experiments, t: &RecallTrigger) -> Option<ArmTag> {
    if t.stage == crate::domain::lapse::Stage::CareCall {
        return None;
    }
    let who = CustomerRef::new(t.tenant_id.clone(), t.customer_id.clone());
    x.tag_recall(&who, t.fired_at)
}

/// The arm an outcome carries (see `Experiments::tag_outcome`).
pub fn outcome_tag(x: &Experiments, o: &RecallOutcome) -> Option<ArmTag> {
    let who = CustomerRef::new(o.tenant_id.clone(), o.customer_id.clone());
    x.tag_outcome(&who, o.decided_at)
}

/// An encoded output, ready to produce.
pub struct Encoded {
    pub topic: String,
    pub key: String,
    pub id: String,
    pub kind: &'static str,
    pub bytes: Vec<u8>,
}

/// How each output record is framed on its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputFramings {
    pub throttle: Framing,
    pub trigger: Framing,
    pub outcome: Framing,
}

impl OutputFramings {
    /// Avro single-object encoding for every output.
    pub const SINGLE_OBJECT: OutputFramings = OutputFramings {
        throttle: Framing::SingleObject,
        trigger: Framing::SingleObject,
        outcome: Framing::SingleObject,
    };

    /// Resolves `framing` for the output topics: for Confluent framing, each
    /// output schema's id under its TopicNameStrategy subject `<topic>-value`,
    /// registered first when `register`. Called once at start-up.
    pub async fn resolve(
        framing: OutputFraming,
        topics: &TopicsConfig,
        schemas: &SchemaSet,
        registry: Option<&RegistryClient>,
        register: bool,
    ) -> Result<OutputFramings, CodecError> {
        let registry = match (framing, registry) {
            (OutputFraming::SingleObject, _) => return Ok(Self::SINGLE_OBJECT),
            (OutputFraming::Confluent, Some(r)) => r,
            (OutputFraming::Confluent, None) => {
                return Err(CodecError::RegistryUrl {
                    url: String::new(),
                    detail: "outputs.framing = \"confluent\" needs schema.registry_url".into(),
                })
            }
        };
        let id = |topic: &str, name: &'static str| {
            let subject = format!("{topic}-value");
            async move {
                let text = schemas
                    .text_of(name)
                    .ok_or_else(|| CodecError::UnknownSchema { name: name.into() })?;
                let id = registry.subject_schema_id(&subject, text, register).await?;
                Ok::<_, CodecError>(Framing::Confluent(id))
            }
        };
        Ok(OutputFramings {
            throttle: id(&topics.throttle, THROTTLE_EVENT).await?,
            trigger: id(&topics.triggers, RECALL_TRIGGER).await?,
            outcome: id(&topics.outcomes, RECALL_OUTCOME).await?,
        })
    }
}

#[derive(Clone)]
pub struct OutputWriter {
    pub producer: OutputProducer,
    pub encoder: Encoder,
    pub topics: TopicsConfig,
    pub framings: OutputFramings,
    /// Which experiment arm each output carries (a function of configuration,
    /// customer and decision time, so a republished output is an exact repeat).
    pub experiments: Arc<Experiments>,
}

impl OutputWriter {
    pub fn encode(&self, o: &Output) -> Result<Encoded, crate::codec::CodecError> {
        match o {
            Output::Throttle(d) => Ok(Encoded {
                topic: self.topics.throttle.clone(),
                key: d.key(),
                id: d.decision_id.clone(),
                kind: "throttle",
                bytes: self.encoder.encode_value(
                    THROTTLE_EVENT,
                    throttle_value(d, throttle_tag(&self.experiments, d).as_ref()),
                    self.framings.throttle,
                )?,
            }),
            Output::Trigger(t) => Ok(Encoded {
                topic: self.topics.triggers.clone(),
                key: t.key(),
                id: t.trigger_id.clone(),
                kind: "trigger",
                bytes: self.encoder.encode_value(
                    RECALL_TRIGGER,
                    trigger_value(t, trigger_tag(&self.experiments, t).as_ref()),
                    self.framings.trigger,
                )?,
            }),
            Output::Outcome(o) => Ok(Encoded {
                topic: self.topics.outcomes.clone(),
                key: o.key(),
                id: o.outcome_id.clone(),
                kind: "outcome",
                bytes: self.encoder.encode_value(
                    RECALL_OUTCOME,
                    outcome_value(o, outcome_tag(&self.experiments, o).as_ref()),
                    self.framings.outcome,
                )?,
            }),
        }
    }

    /// Produces every output and waits for all acknowledgements.
    pub async fn produce(&self, outputs: &[Encoded]) -> Result<(), KafkaError> {
        let results = join_all(outputs.iter().map(|e| async move {
            let headers = [(H_ID, e.id.as_bytes()), (H_KIND, e.kind.as_bytes())];
            self.producer
                .send(&e.topic, Some(e.key.as_bytes()), Some(&e.bytes), &headers)
                .await
        }))
        .await;
        results.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{CustomerRef, VisitType};
    use crate::domain::lapse::{LapsePolicy, DAY_MS};
    use crate::domain::recall::{
        self, ChannelCandidate, FireCtx, Fired, OutcomeKind, RecallState, VisitInfo,
    };
    use crate::domain::visits::Visits;

    /// The AT_RISK trigger of a BOTOX customer (120 d) at day 144, and the
    /// RECALLED outcome of their visit at day 150.
    fn trigger_and_outcome() -> (RecallTrigger, RecallOutcome) {
        const D: i64 = DAY_MS;
        let c = CustomerRef::new("brandA", "c0");
        let p = LapsePolicy::default();
        let visit = |at: i64, revenue: i64, id: &str| VisitInfo {
            at,
            revenue,
            currency: "CNY".into(),
            event_id: id.into(),
            offer_code: Some("reminder-coupon-5pct".into()),
            discount: None,
            expected_interval_days: 120.0,
        };
        let v = Visits {
            count: 1,
            first_at: Some(0),
            last_at: Some(0),
            lifetime_spend: 10_000,
            currency: Some("CNY".into()),
            last_treatment: Some("BOTOX".into()),
            last_treatment_at: Some(0),
            last_visit_type: Some(VisitType::Treatment),
            recent: vec![0],
        };
        let candidates: Vec<ChannelCandidate> = Channel::ALL
            .into_iter()
            .map(|channel| ChannelCandidate {
                channel,
                available: true,
                engagement: 0.1,
            })
            .collect();
        let mut st = RecallState::default();
        recall::on_visit(&mut st, &visit(0, 100, "v0"), &c, &p);
        let ctx = FireCtx {
            customer: &c,
            visits: &v,
            policy: &p,
            candidates: &candidates,
            costs: &[1, 5, 300, 1, 0],
        };
        let fired = recall::fire_due(&mut st, 144 * D, &ctx);
        let Some(Fired::Trigger(t)) = fired.first() else {
            panic!("no trigger: {fired:?}");
        };
        let t = t.clone();
        let out = recall::on_visit(&mut st, &visit(150 * D, 1, "v"), &c, &p);
        (t, out[0].clone())
    }

    /// A recall experiment tags the win-back stages, never a care call (no
    /// stage offset shapes it).
    #[test]
    fn a_care_call_carries_no_policy_experiment_arm() {
        let cfg: crate::domain::policy::PolicyConfig = toml::from_str(
            r#"
[[experiments]]
name = "early-at-risk"
tenant = "brandA"
start = "2026-01-01T00:00"
end = "2028-01-01T00:00"
[[experiments.arms]]
name = "control"
share = 0.5
[[experiments.arms]]
name = "early"
share = 0.5
recall.at_risk_factor = 1.1
"#,
        )
        .unwrap();
        let p = crate::domain::policy::Policies::new(&cfg).unwrap();
        let (t, _) = trigger_and_outcome();
        let t = RecallTrigger {
            fired_at: 1_800_000_000_000, // 2027
            ..t
        };
        assert!(trigger_tag(p.experiments(), &t).is_some());
        let care = RecallTrigger {
            stage: crate::domain::lapse::Stage::CareCall,
            ..t
        };
        assert_eq!(trigger_tag(p.experiments(), &care), None);
        let enc = Encoder::new(&SchemaSet::builtin().unwrap());
        enc.encode_value(
            RECALL_TRIGGER,
            trigger_value(&care, None),
            Framing::SingleObject,
        )
        .unwrap();
    }

    #[test]
    fn outputs_encode_with_the_avro_schemas() {
        let enc = Encoder::new(&SchemaSet::builtin().unwrap());
        let (t, o) = trigger_and_outcome();
        assert!(t.recommended_channel.is_some() && t.last_treatment.is_some());
        enc.encode_value(
            RECALL_TRIGGER,
            trigger_value(&t, None),
            Framing::SingleObject,
        )
        .unwrap();
        let t2 = RecallTrigger {
            recommended_channel: None,
            fallback_channels: vec![],
            last_treatment: None,
            ..t
        };
        enc.encode_value(
            RECALL_TRIGGER,
            trigger_value(&t2, None),
            Framing::SingleObject,
        )
        .unwrap();
        assert_eq!(o.kind, OutcomeKind::Recalled);
        assert_eq!(o.incentive_cost, 15_000, "the tier's configured cost");
        enc.encode_value(
            RECALL_OUTCOME,
            outcome_value(&o, None),
            Framing::SingleObject,
        )
        .unwrap();
        let nr = RecallOutcome {
            days_to_return: None,
            cause_event_id: None,
            kind: OutcomeKind::NotRecalled,
            incentive_cost: 0,
            ..o.clone()
        };
        enc.encode_value(
            RECALL_OUTCOME,
            outcome_value(&nr, None),
            Framing::SingleObject,
        )
        .unwrap();
        let rp = RecallOutcome {
            kind: OutcomeKind::Repurchased,
            ..o
        };
        enc.encode_value(
            RECALL_OUTCOME,
            outcome_value(&rp, None),
            Framing::SingleObject,
        )
        .unwrap();
    }
}
