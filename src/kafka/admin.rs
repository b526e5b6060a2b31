//! Topic creation at start-up (optional) and broker reachability checks.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;
use tracing::info;

use crate::config::KafkaConfig;
use crate::error::KafkaError;

/// Creates any missing lapse topic. The throttle topic is compacted: a sender
/// reading it from the start learns every customer's current allowance.
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("client.id", format!("{}-admin", cfg.client_id))
        .create()?;
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
    let results = admin.create_topics(&topics, &opts).await?;
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
