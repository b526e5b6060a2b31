//! Service-level errors. Each message says what failed and what to do about it.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file is not valid: {0}")]
    Parse(String),
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

#[derive(Debug, Error)]
pub enum StoreError {
    /// The hint tells a permanent error (see `store::fault`) from an outage.
    #[error("redis: {0} ({hint})", hint = crate::store::fault::hint_for(.0))]
    Redis(#[from] redis::RedisError),
    /// A Redis setting lapse cannot use (a TLS file that cannot be read).
    #[error("{0}")]
    Config(String),
    /// Records (customers or campaigns) another writer kept changing between
    /// load and compare-and-set, for `state_write::MAX_CAS_ROUNDS` rounds.
    #[error("{records} records kept changing under concurrent writers; retried with back-off")]
    Contended { records: usize },
    /// A write through a [`crate::store::redis::WriteToken`] found Redis
    /// without lapse's copy of the write script: Redis restarted, failed over
    /// or flushed its scripts, and may have lost acknowledged writes.
    #[error("Redis no longer holds lapse's write script (it restarted, failed over or ran SCRIPT FLUSH): nothing was written; lapse re-reads what Redis may have lost before it writes again")]
    ScriptsLost,
    /// The key is kept for debug logs only: it contains a customer id.
    #[error("a stored customer state is unreadable ({reason}); run with RUST_LOG=lapse=debug to see its key, inspect it with `lapse inspect`, then delete it to rebuild from a replay")]
    Corrupt { key: String, reason: String },
}

#[derive(Debug, Error)]
pub enum KafkaError {
    #[error("kafka: {0} (check kafka.brokers and the broker's health)")]
    Client(#[from] rdkafka::error::KafkaError),
    /// The broker did not answer; the text includes the client's last error.
    #[error("kafka: {0}")]
    Unreachable(String),
    #[error("cannot create topic {topic}: {code} (create it by hand, or check the broker's ACLs; set kafka.create_topics = false to skip)")]
    Admin { topic: String, code: String },
}

/// Why a batch step failed; all of these are retried with back-off.
#[derive(Debug, Error)]
pub enum BatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publishing decisions: {0}")]
    Kafka(#[from] KafkaError),
    /// The writes landed but are not confirmed durable (`redis.durability`).
    #[error("state not confirmed durable: {0}")]
    NotDurable(#[from] crate::store::durability::Shortfall),
}
