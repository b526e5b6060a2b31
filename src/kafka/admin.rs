//! Topic creation at start-up (optional) and broker reachability checks.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
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
}

fn admin_client(cfg: &KafkaConfig) -> Result<AdminClient<AdminContext>, KafkaError> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", format!("{}-admin", cfg.client_id));
    crate::kafka::client::apply_security(&mut cc, cfg);
    // The admin client shares the producer's raw properties (security overrides).
    for (k, v) in &cfg.producer_properties {
        cc.set(k, v);
    }
    Ok(cc.create_with_context(AdminContext(ClientErrors::default()))?)
}

/// The broker answers a metadata request within 10 s (start-up, when lapse
/// does not create the topics). The error names the client's last error.
pub async fn check_broker(cfg: &KafkaConfig) -> Result<(), KafkaError> {
    let admin = admin_client(cfg)?;
    tokio::task::spawn_blocking(move || {
        admin
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .map(|_| ())
            .map_err(|e| KafkaError::Unreachable(admin.inner().context().0.explain(&e)))
    })
    .await
    .map_err(|e| KafkaError::Unreachable(e.to_string()))?
}

/// Creates any missing lapse topic. The throttle topic is compacted: a sender
/// reading it from the start learns every customer's current allowance.
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<(), KafkaError> {
    let admin = admin_client(cfg)?;
    let t = &cfg.topics;
    let plain: Vec<&str> = vec![
        &t.sends,
        &t.opens,
        &t.clicks,
        &t.replies,
        &t.visits,
        &t.dlq,
        &t.triggers,
        &t.outcomes,
    ];
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
