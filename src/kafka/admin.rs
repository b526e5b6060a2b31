//! Topic creation at start-up (optional) and broker reachability checks.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use std::time::Duration;
use tracing::info;

use crate::config::KafkaConfig;
use crate::error::KafkaError;
use crate::kafka::ClientErrors;

/// The admin client's context: keeps its errors (why the broker cannot be
/// reached) for the start-up error and `/readyz`.
struct AdminContext(ClientErrors);

impl ClientContext for AdminContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.0.record("kafka admin", &error, reason);
    }

    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.0.record_log("kafka admin", level, log_message);
        tracing::debug!(fac, "librdkafka: {log_message}");
    }
}

/// The probe is a producer only because a producer's events (errors, log
/// lines) can be polled: nothing polls an admin client's, which would leave
/// a refused TLS handshake or SASL login unexplained.
impl rdkafka::producer::ProducerContext for AdminContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// The admin clients of every start-up attempt log a cause once a minute.
fn admin_log_limiter() -> std::sync::Arc<std::sync::Mutex<crate::retry::LogLimiter>> {
    static LIMITER: std::sync::OnceLock<
        std::sync::Arc<std::sync::Mutex<crate::retry::LogLimiter>>,
    > = std::sync::OnceLock::new();
    LIMITER
        .get_or_init(crate::kafka::client::shared_limiter)
        .clone()
}

fn admin_client(cfg: &KafkaConfig) -> Result<AdminClient<AdminContext>, KafkaError> {
    Ok(
        admin_config(cfg).create_with_context(AdminContext(ClientErrors::sharing(
            cfg,
            admin_log_limiter(),
        )))?,
    )
}

fn admin_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", format!("{}-admin", cfg.client_id));
    crate::kafka::client::apply_security(&mut cc, cfg);
    // The admin client shares the producer's raw properties (security overrides).
    for (k, v) in &cfg.producer_properties {
        cc.set(k, v);
    }
    cc
}

/// The broker answers a metadata request within 10 s (start-up, when lapse
/// does not create the topics). The error names the client's last error.
pub async fn check_broker(cfg: &KafkaConfig) -> Result<(), KafkaError> {
    let probe: BaseProducer<AdminContext> = admin_config(cfg).create_with_context(AdminContext(
        ClientErrors::sharing(cfg, admin_log_limiter()),
    ))?;
    tokio::task::spawn_blocking(move || {
        let fetched = probe.client().fetch_metadata(None, Duration::from_secs(10));
        // Delivers the client's errors and log lines to its context.
        probe.poll(Duration::from_millis(100));
        fetched
            .map(|_| ())
            .map_err(|e| KafkaError::Unreachable(probe.context().0.explain_checked(&e)))
    })
    .await
    .map_err(|e| KafkaError::Unreachable(e.to_string()))?
}

/// Creates any missing lapse topic. The throttle topic is compacted: a sender
/// reading it from the start learns every customer's current allowance.
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<(), KafkaError> {
    let admin = admin_client(cfg)?;
    let t = &cfg.topics;
    let plain: Vec<&str> = t
        .inputs()
        .into_iter()
        .chain([t.dlq.as_str(), &t.triggers, &t.outcomes])
        .collect();
    let mut topics: Vec<NewTopic<'_>> = plain
        .iter()
        .map(|n| NewTopic::new(n, cfg.topic_partitions, TopicReplication::Fixed(-1)))
        .collect();
    topics.push(
        NewTopic::new(
            &t.throttle,
            cfg.topic_partitions,
            TopicReplication::Fixed(-1),
        )
        .set("cleanup.policy", "compact"),
    );
    // A broker that refuses the connection (TLS, SASL) fails here within
    // 10 s, naming why, instead of after the admin request's 60 s.
    check_broker(cfg).await?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&topics, &opts)
        .await
        .map_err(|e| KafkaError::Unreachable(admin.inner().context().0.explain(&e)))?;
    for r in results {
        match r {
            Ok(name) => info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(KafkaError::Admin {
                    topic: name,
                    code: format!("{code:?}"),
                })
            }
        }
    }
    Ok(())
}
