//! Dead letters: records that cannot be decoded or fail validation go to the DLQ
//! topic with their original key, bytes and headers, plus headers that say why
//! and where they came from. The offset then advances past them.

use crate::codec::DecodeError;
use crate::domain::event::EventKind;
use crate::error::KafkaError;
use crate::kafka::producer::OutputProducer;
use crate::kafka::record::InputRecord;

pub const H_REASON: &str = "lapse.error.reason";
pub const H_MESSAGE: &str = "lapse.error.message";
pub const H_TOPIC: &str = "lapse.source.topic";
pub const H_PARTITION: &str = "lapse.source.partition";
pub const H_OFFSET: &str = "lapse.source.offset";
pub const H_TIMESTAMP: &str = "lapse.source.timestamp";
pub const H_FAILED_AT: &str = "lapse.failed_at";
pub const H_REDACTED: &str = "lapse.payload.redacted";

#[derive(Clone)]
pub struct DeadLetters {
    producer: OutputProducer,
    topic: String,
    redact_replies: bool,
}

impl DeadLetters {
    pub fn new(producer: OutputProducer, topic: String, redact_replies: bool) -> DeadLetters {
        DeadLetters {
            producer,
            topic,
            redact_replies,
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes one dead letter and waits for the broker to acknowledge it.
    pub async fn send(
        &self,
        rec: &InputRecord,
        err: &DecodeError,
        now_ms: i64,
    ) -> Result<(), KafkaError> {
        let partition = rec.partition.to_string();
        let offset = rec.offset.to_string();
        let failed_at = now_ms.to_string();
        let message = err.to_string();
        let ts = rec.timestamp_ms.map(|t| t.to_string()).unwrap_or_default();
        // Reply payloads carry customer free text: keep it out of our topics unless asked.
        let redact = self.redact_replies && rec.kind == EventKind::Reply;
        let mut headers: Vec<(&str, &[u8])> = rec
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        headers.push((H_REASON, err.reason().as_bytes()));
        headers.push((H_MESSAGE, message.as_bytes()));
        headers.push((H_TOPIC, rec.topic.as_bytes()));
        headers.push((H_PARTITION, partition.as_bytes()));
        headers.push((H_OFFSET, offset.as_bytes()));
        headers.push((H_TIMESTAMP, ts.as_bytes()));
        headers.push((H_FAILED_AT, failed_at.as_bytes()));
        if redact {
            headers.push((H_REDACTED, b"reply-text"));
        }
        let payload = if redact { None } else { rec.payload.as_deref() };
        self.producer
            .send(&self.topic, rec.key.as_deref(), payload, &headers)
            .await
    }
}
