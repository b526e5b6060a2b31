//! The output producer: idempotent, acks=all, so retried sends never duplicate
//! within a producer session, and every output carries a deterministic id for
//! the sessions in between.

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::time::Duration;

use crate::config::KafkaConfig;
use crate::error::KafkaError;
use crate::kafka::ClientErrors;
use crate::metrics::Metrics;
use rdkafka::ClientContext;

/// Counts the producer's client errors (broker down, TLS or SASL refused, ...)
/// in `lapse_kafka_errors_total{op="producer"}`, keeps the last one for
/// `/readyz` and logs them with bounded volume.
pub struct ProducerContext {
    metrics: Metrics,
    errors: ClientErrors,
}

impl ClientContext for ProducerContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.metrics
            .kafka_errors
            .with_label_values(&["producer"])
            .inc();
        self.errors.record("kafka producer", &error, reason);
    }
}

#[derive(Clone)]
pub struct OutputProducer {
    inner: FutureProducer<ProducerContext>,
    errors: ClientErrors,
}

impl OutputProducer {
    pub fn new(cfg: &KafkaConfig, metrics: Metrics) -> Result<OutputProducer, KafkaError> {
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", &cfg.brokers)
            .set("client.id", format!("{}-producer", cfg.client_id))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            // A send is retried inside librdkafka for this long before we see an error and retry ourselves.
            .set("message.timeout.ms", "30000");
        crate::kafka::client::apply_security(&mut cc, cfg);
        for (k, v) in &cfg.producer_properties {
            cc.set(k, v);
        }
        let errors = ClientErrors::for_config(cfg);
        Ok(OutputProducer {
            inner: cc.create_with_context(ProducerContext {
                metrics,
                errors: errors.clone(),
            })?,
            errors,
        })
    }

    /// Sends one record and waits for the broker's acknowledgement.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Result<(), KafkaError> {
        let mut hs = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(hs);
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(p) = payload {
            rec = rec.payload(p);
        }
        self.inner
            .send(rec, Duration::from_secs(0))
            .await
            .map(|_| ())
            .map_err(|(e, _)| KafkaError::Client(e))
    }

    /// Waits until every queued record is acknowledged (shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout).map_err(KafkaError::Client)
    }

    /// Readiness: the broker answers a metadata request within 2 s. Blocking.
    /// The error says why, with the client's last error (a refused TLS
    /// handshake or SASL login says more than a failed metadata request).
    pub fn check_broker(&self) -> Result<(), String> {
        self.inner
            .client()
            .fetch_metadata(None, Duration::from_secs(2))
            .map(|_| ())
            .map_err(|e| self.errors.explain_checked(&e))
    }

    pub fn inner(&self) -> &FutureProducer<ProducerContext> {
        &self.inner
    }
}
