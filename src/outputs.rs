//! Decisions out: Avro values for the output schemas, and the producer step of
//! the outbox. Every output carries its deterministic id as key-independent
//! header `lapse.id`, so consumers can de-duplicate exact repeats.

use apache_avro::types::Value;
use futures::future::join_all;

use crate::codec::{Encoder, Framing, RECALL_OUTCOME, RECALL_TRIGGER, THROTTLE_EVENT};
use crate::config::TopicsConfig;
use crate::domain::allowance::ThrottleDecision;
use crate::domain::state::Output;
use crate::error::KafkaError;
use crate::kafka::producer::OutputProducer;

pub const H_ID: &str = "lapse.id";
pub const H_KIND: &str = "lapse.kind";

fn opt<T>(v: Option<T>, f: impl FnOnce(T) -> Value) -> Value {
    v.map_or(Value::Null, f)
}

fn record(fields: Vec<(&str, Value)>) -> Value {
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

pub fn throttle_value(d: &ThrottleDecision) -> Value {
    let scope = if d.customer_id.is_some() {
        Value::Enum(0, "CUSTOMER_CHANNEL".into())
    } else {
        Value::Enum(1, "CAMPAIGN".into())
    };
    record(vec![
        ("decision_id", Value::String(d.decision_id.clone())),
        ("scope", scope),
        ("tenant_id", Value::String(d.tenant_id.clone())),
        ("customer_id", opt(d.customer_id.clone(), Value::String)),
        (
            "channel",
            opt(d.channel, |c| {
                Value::Enum(c.index() as u32, c.as_str().into())
            }),
        ),
        ("campaign_id", opt(d.campaign_id.clone(), Value::String)),
        (
            "state",
            Value::Enum(d.state.index() as u32, d.state.as_str().into()),
        ),
        ("reason", Value::String(d.reason.clone())),
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
        (
            "cause_event_id",
            opt(d.cause_event_id.clone(), Value::String),
        ),
    ])
}

/// An encoded output, ready to produce.
pub struct Encoded {
    pub topic: String,
    pub key: String,
    pub id: String,
    pub kind: &'static str,
    pub bytes: Vec<u8>,
}

#[derive(Clone)]
pub struct OutputWriter {
    pub producer: OutputProducer,
    pub encoder: Encoder,
    pub topics: TopicsConfig,
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
                    throttle_value(d),
                    Framing::SingleObject,
                )?,
            }),
            Output::Trigger(t) => Ok(Encoded {
                topic: self.topics.triggers.clone(),
                key: t.key(),
                id: t.trigger_id.clone(),
                kind: "trigger",
                bytes: self.encoder.encode_value(
                    RECALL_TRIGGER,
                    t.to_avro_value(),
                    Framing::SingleObject,
                )?,
            }),
            Output::Outcome(o) => Ok(Encoded {
                topic: self.topics.outcomes.clone(),
                key: o.key(),
                id: o.outcome_id.clone(),
                kind: "outcome",
                bytes: self.encoder.encode_value(
                    RECALL_OUTCOME,
                    o.to_avro_value(),
                    Framing::SingleObject,
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
