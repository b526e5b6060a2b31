//! Typed configuration: TOML file + environment overrides, seed defaults,
//! validated once at start-up. Every error names the offending key.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::domain::span::Span;
use crate::error::ConfigError;

/// A duration written as `"50ms"`, `"30s"`, `"5m"`, `"2h"`, `"7d"` (or an integer of
/// milliseconds): the text of the domain's [`Span`], as a `Duration` for the adapters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn ms(ms: u64) -> Dur {
        Dur(Duration::from_millis(ms))
    }
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }
    pub const fn days(d: u64) -> Dur {
        Dur(Duration::from_secs(d * 86_400))
    }
    pub fn as_millis_i64(self) -> i64 {
        i64::try_from(self.0.as_millis()).unwrap_or(i64::MAX)
    }
    pub fn parse(s: &str) -> Result<Dur, String> {
        Span::parse(s).map(Dur::from)
    }
}

impl From<Span> for Dur {
    fn from(s: Span) -> Dur {
        Dur(s.into())
    }
}

impl From<Dur> for Span {
    fn from(d: Dur) -> Span {
        d.0.into()
    }
}

impl std::fmt::Display for Dur {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Span::from(*self).fmt(f)
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Span::from(*self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        Span::deserialize(d).map(Dur::from)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub redis: RedisConfig,
    pub schema: SchemaConfig,
    pub batch: BatchConfig,
    pub state: StateConfig,
    pub http: HttpConfig,
    pub metrics: MetricsConfig,
    pub dlq: DlqConfig,
    pub retry: RetryConfig,
    /// Contact policy: caps, quiet hours, boosts, throttling, lapse and recall.
    pub policy: crate::domain::policy::PolicyConfig,
    pub timers: TimersConfig,
    pub clock: ClockConfig,
    pub outputs: OutputsConfig,
}

/// How throttle events, recall triggers and outcomes are framed on their topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputFraming {
    /// `0x00` + registry schema id: what Confluent deserializers read. Needs
    /// `schema.registry_url`; subjects `<topic>-value` (TopicNameStrategy).
    Confluent,
    /// `C3 01` + CRC-64-AVRO fingerprint (Avro single-object encoding).
    SingleObject,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputsConfig {
    /// Unset: `confluent` when `schema.registry_url` is set, else `single_object`.
    pub framing: Option<OutputFraming>,
    /// With Confluent framing: register the output schemas at start-up (true),
    /// or only look them up, for registries where lapse may not register (false).
    pub register_schemas: bool,
}

impl Default for OutputsConfig {
    fn default() -> Self {
        OutputsConfig {
            framing: None,
            register_schemas: true,
        }
    }
}

impl Config {
    /// The output framing in force: the configured one, else Confluent when a
    /// registry is configured.
    pub fn output_framing(&self) -> OutputFraming {
        match (self.outputs.framing, &self.schema.registry_url) {
            (Some(f), _) => f,
            (None, Some(_)) => OutputFraming::Confluent,
            (None, None) => OutputFraming::SingleObject,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimersConfig {
    /// Sorted sets the due times are spread over (changing it orphans scheduled timers).
    pub shards: u32,
    /// A claimed timer is re-claimable after this if its instance died.
    pub lease: Dur,
    /// How often each instance looks for due timers (keep under 1s: stages fire within one poll).
    pub poll_interval: Dur,
    /// Timers claimed per shard per poll.
    pub claim_limit: usize,
}

impl Default for TimersConfig {
    fn default() -> Self {
        TimersConfig {
            shards: 16,
            lease: Dur::secs(30),
            poll_interval: Dur::ms(200),
            claim_limit: 500,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClockMode {
    /// Timers fire by the wall clock (production).
    Wall,
    /// Time follows the watermark of event timestamps: replays of history and
    /// tests run months in seconds.
    Event,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClockConfig {
    pub mode: ClockMode,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig {
            mode: ClockMode::Wall,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers. Env: `LAPSE_KAFKA_BROKERS`.
    pub brokers: String,
    /// Consumer group shared by every instance. Env: `LAPSE_GROUP_ID`.
    pub group_id: String,
    pub client_id: String,
    /// Consumer session timeout; a dead instance's partitions move after this.
    pub session_timeout: Dur,
    /// How long a rebalance waits for the in-flight batch before handing over uncommitted.
    pub rebalance_drain_timeout: Dur,
    /// How long SIGTERM waits for the in-flight batch before exiting without committing it.
    pub shutdown_drain_timeout: Dur,
    /// How often applied offsets are committed (also after every batch when due).
    pub commit_interval: Dur,
    /// Create missing input/output topics at start-up (with `topic_partitions`).
    pub create_topics: bool,
    pub topic_partitions: i32,
    pub topics: TopicsConfig,
    /// Extra librdkafka consumer properties (e.g. security settings), applied last.
    pub consumer_properties: std::collections::BTreeMap<String, String>,
    /// Extra librdkafka producer properties, applied last.
    pub producer_properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "lapse".into(),
            client_id: "lapse".into(),
            session_timeout: Dur::secs(10),
            rebalance_drain_timeout: Dur::secs(20),
            shutdown_drain_timeout: Dur::secs(30),
            commit_interval: Dur::secs(1),
            create_topics: true,
            topic_partitions: 6,
            topics: TopicsConfig::default(),
            consumer_properties: Default::default(),
            producer_properties: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicsConfig {
    pub sends: String,
    pub opens: String,
    pub clicks: String,
    pub replies: String,
    pub visits: String,
    pub dlq: String,
    pub throttle: String,
    pub triggers: String,
    pub outcomes: String,
}

impl Default for TopicsConfig {
    fn default() -> Self {
        TopicsConfig {
            sends: "engagement.sends".into(),
            opens: "engagement.opens".into(),
            clicks: "engagement.clicks".into(),
            replies: "engagement.replies".into(),
            visits: "clinic.visits".into(),
            dlq: "lapse.dlq".into(),
            throttle: "engagement.throttle".into(),
            triggers: "recall.triggers".into(),
            outcomes: "recall.outcomes".into(),
        }
    }
}

impl TopicsConfig {
    /// Input topics in `EventKind` order.
    pub fn inputs(&self) -> [&str; 5] {
        [
            &self.sends,
            &self.opens,
            &self.clicks,
            &self.replies,
            &self.visits,
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port/db`. Env: `LAPSE_REDIS_URL`.
    pub url: String,
    /// Extra seed nodes; when non-empty (or `cluster = true`) Redis Cluster is used.
    pub cluster: bool,
    pub cluster_nodes: Vec<String>,
    /// Prefix of every key; keys look like `PREFIX:{tenant/customer}:state`.
    pub key_prefix: String,
    pub connect_timeout: Dur,
    pub response_timeout: Dur,
    /// When a batch's offsets may be committed after Redis acknowledged its
    /// writes (see [`Durability`]).
    pub durability: Durability,
    /// `durability = "fsync_horizon"`: how long after Redis acknowledged a
    /// batch's writes its offsets wait (Redis with `appendfsync everysec`
    /// fsyncs at least every second, postponing a write at most 2 s).
    pub fsync_horizon: Dur,
    /// `durability = "replicas"`: replicas of every master that must confirm a
    /// batch's writes (`WAIT`).
    pub replicas: u32,
    /// `durability = "replicas"`: how long one `WAIT` blocks before the batch
    /// counts as short of replicas and is retried with back-off.
    pub wait_timeout: Dur,
}

/// What makes a batch durable enough to commit its input offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Redis acknowledged the writes. Writes Redis then loses (a restart
    /// without them, a failover to a replica that lacked them) are lost for
    /// good: their offsets were committed.
    Ack,
    /// Redis acknowledged the writes at least `redis.fsync_horizon` ago and
    /// no master restarted or changed since before they were made (else lapse
    /// re-reads from the last safe offsets). For Redis with AOF
    /// `appendfsync everysec` (or `always`) on a single node; no throughput cost.
    FsyncHorizon,
    /// `WAIT redis.replicas` on every master confirmed the writes, and no
    /// master restarted or changed meanwhile (else the batch is re-applied).
    /// For a Cluster or a primary with replicas.
    Replicas,
}

impl Durability {
    pub fn label(self) -> &'static str {
        match self {
            Durability::Ack => "ack",
            Durability::FsyncHorizon => "fsync_horizon",
            Durability::Replicas => "replicas",
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/".into(),
            cluster: false,
            cluster_nodes: vec![],
            key_prefix: "lapse".into(),
            connect_timeout: Dur::secs(2),
            response_timeout: Dur::secs(2),
            durability: Durability::FsyncHorizon,
            fsync_horizon: Dur::ms(2500),
            replicas: 1,
            wait_timeout: Dur::secs(1),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchemaConfig {
    /// Directory of `*.avsc` reader schemas (and older writer versions, recursively).
    pub dir: PathBuf,
    /// Confluent Schema Registry base URL. Env: `LAPSE_SCHEMA_REGISTRY_URL`.
    pub registry_url: Option<String>,
    pub registry_timeout: Dur,
    /// Records larger than this are dead-lettered without decoding.
    pub max_payload_bytes: usize,
    /// Process-wide cap on any single allocation the Avro decoder makes.
    pub avro_allocation_limit_bytes: usize,
    /// Events stamped further than this in the future are invalid.
    pub max_future_skew: Dur,
    /// Decode single-object records framed with lapse 0.1's non-standard
    /// fingerprint (counted by `lapse_legacy_fingerprint_records_total`).
    /// Deprecated: the default turns to false in 0.3.
    pub accept_legacy_fingerprints: bool,
}

impl Default for SchemaConfig {
    fn default() -> Self {
        SchemaConfig {
            dir: PathBuf::from("schemas"),
            registry_url: None,
            registry_timeout: Dur::secs(5),
            max_payload_bytes: 1 << 20,
            avro_allocation_limit_bytes: 16 << 20,
            max_future_skew: Dur::secs(3600),
            accept_legacy_fingerprints: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Upper bound of records per batch.
    pub max_records: usize,
    /// A partial batch is dispatched after this long.
    pub max_wait: Dur,
    /// Batches queued behind the one being applied; beyond it (and one more batch
    /// buffered) partitions are paused.
    pub queue_depth: usize,
    /// A batch's customers are loaded, folded and written in this many
    /// concurrent chunks, so lapse folds one while Redis works on another.
    pub store_chunks: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: 2000,
            max_wait: Dur::ms(50),
            queue_depth: 32,
            store_chunks: 4,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Event ids remembered per customer for duplicate detection across offsets
    /// (6 bytes of Redis memory each).
    pub event_ids_per_customer: usize,
    /// Visit timestamps kept per customer for gap statistics.
    pub visit_history: usize,
    /// Half-life of the short-horizon engagement counts.
    pub short_half_life: Dur,
    /// Half-life of the long-horizon (baseline) engagement counts.
    pub long_half_life: Dur,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            event_ids_per_customer: 16,
            visit_history: 16,
            short_half_life: Dur::days(14),
            long_half_life: Dur::days(90),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// `/metrics`, `/healthz`, `/readyz`. Env: `LAPSE_HTTP_LISTEN`.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Add a `tenant` label to per-tenant series. Turn off for very many tenants.
    pub tenant_label: bool,
    /// Distinct tenant label values before the rest are reported as `other`.
    pub max_tenants: usize,
    /// How often the fleet-wide gauges kept in Redis are read and exported.
    pub fleet_gauge_refresh: Dur,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            tenant_label: true,
            max_tenants: 100,
            fleet_gauge_refresh: Dur::secs(15),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DlqConfig {
    /// Reply payloads hold free text (PII): by default their DLQ copy carries headers only.
    pub redact_reply_payloads: bool,
}

impl Default for DlqConfig {
    fn default() -> Self {
        DlqConfig {
            redact_reply_payloads: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// First back-off after a Redis or broker failure; doubles up to `max_backoff`.
    pub initial_backoff: Dur,
    pub max_backoff: Dur,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff: Dur::ms(100),
            max_backoff: Dur::secs(5),
        }
    }
}

/// Environment variables that override file values, applied in this order.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("LAPSE_KAFKA_BROKERS", "kafka.brokers"),
    ("LAPSE_GROUP_ID", "kafka.group_id"),
    ("LAPSE_REDIS_URL", "redis.url"),
    ("LAPSE_HTTP_LISTEN", "http.listen"),
    ("LAPSE_SCHEMA_REGISTRY_URL", "schema.registry_url"),
    ("LAPSE_SCHEMAS_DIR", "schema.dir"),
];

impl Config {
    /// Reads the file (if any), applies environment overrides, validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ConfigError::Read {
                    path: p.display().to_string(),
                    source: e,
                })?;
                Config::from_toml(&text)?
            }
            None => Config::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok());
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))
    }

    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(v) = get("LAPSE_KAFKA_BROKERS") {
            self.kafka.brokers = v;
        }
        if let Some(v) = get("LAPSE_GROUP_ID") {
            self.kafka.group_id = v;
        }
        if let Some(v) = get("LAPSE_REDIS_URL") {
            self.redis.url = v;
        }
        if let Some(v) = get("LAPSE_HTTP_LISTEN") {
            self.http.listen = v;
        }
        if let Some(v) = get("LAPSE_SCHEMA_REGISTRY_URL") {
            self.schema.registry_url = if v.is_empty() { None } else { Some(v) };
        }
        if let Some(v) = get("LAPSE_SCHEMAS_DIR") {
            self.schema.dir = PathBuf::from(v);
        }
    }

    /// Every section in turn; the first invalid value is reported, naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.kafka.validate()?;
        self.redis.validate()?;
        self.schema.validate(&self.outputs)?;
        self.batch.validate()?;
        self.state.validate()?;
        self.http.validate()?;
        self.metrics.validate()?;
        self.timers.validate()?;
        self.validate_policy()?;
        self.retry.validate()
    }

    /// `[policy]`, which must learn from fewer gaps than `state.visit_history` keeps.
    fn validate_policy(&self) -> Result<(), ConfigError> {
        let gaps = self.policy.lapse.min_gaps_for_learning as usize;
        if gaps >= self.state.visit_history {
            return Err(bad(
                "policy.lapse.min_gaps_for_learning",
                format!(
                    "must be less than state.visit_history ({})",
                    self.state.visit_history
                ),
            ));
        }
        self.policy
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid { key, message })
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}"))
    }
}

/// An invalid value at `key`.
fn bad(key: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: msg.into(),
    }
}

impl KafkaConfig {
    /// `[kafka]` and `[kafka.topics]`: every topic name valid and distinct.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(bad("kafka.brokers", "must list at least one host:port"));
        }
        if self.group_id.trim().is_empty() {
            return Err(bad("kafka.group_id", "must not be empty"));
        }
        if !(Dur::secs(1)..=Dur::secs(300)).contains(&self.session_timeout) {
            return Err(bad("kafka.session_timeout", "must be between 1s and 300s"));
        }
        if !(1..=10_000).contains(&self.topic_partitions) {
            return Err(bad("kafka.topic_partitions", "must be between 1 and 10000"));
        }
        if self.commit_interval.0.is_zero() {
            return Err(bad("kafka.commit_interval", "must be positive"));
        }
        let t = &self.topics;
        let named = [
            ("kafka.topics.sends", &t.sends),
            ("kafka.topics.opens", &t.opens),
            ("kafka.topics.clicks", &t.clicks),
            ("kafka.topics.replies", &t.replies),
            ("kafka.topics.visits", &t.visits),
            ("kafka.topics.dlq", &t.dlq),
            ("kafka.topics.throttle", &t.throttle),
            ("kafka.topics.triggers", &t.triggers),
            ("kafka.topics.outcomes", &t.outcomes),
        ];
        for (i, (key, name)) in named.iter().enumerate() {
            if name.is_empty()
                || name.len() > 249
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                return Err(bad(
                    key,
                    format!("`{name}` is not a valid Kafka topic name (letters, digits, . _ -; at most 249)"),
                ));
            }
            if named[..i].iter().any(|(_, other)| other == name) {
                return Err(bad(
                    key,
                    format!("topic `{name}` is used twice: every topic must be distinct"),
                ));
            }
        }
        Ok(())
    }
}

impl RedisConfig {
    /// `[redis]`.
    fn validate(&self) -> Result<(), ConfigError> {
        if !(self.url.starts_with("redis://")
            || self.url.starts_with("rediss://")
            || self.url.starts_with("unix://"))
        {
            return Err(bad(
                "redis.url",
                "must start with redis://, rediss:// or unix://",
            ));
        }
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}']) {
            return Err(bad(
                "redis.key_prefix",
                "must be non-empty and contain no braces",
            ));
        }
        if self.response_timeout.0.is_zero() || self.connect_timeout.0.is_zero() {
            return Err(bad("redis.response_timeout", "timeouts must be positive"));
        }
        self.validate_durability()
    }

    /// `redis.durability` and the keys of its modes.
    fn validate_durability(&self) -> Result<(), ConfigError> {
        let h = self.fsync_horizon.0;
        if h < Duration::from_millis(1100) || h > Duration::from_secs(60) {
            return Err(bad(
                "redis.fsync_horizon",
                "must be between 1100ms and 60s: appendfsync everysec fsyncs every second and may postpone a write by 2 s (2500ms covers that)",
            ));
        }
        if self.durability == Durability::Replicas {
            if !(1..=16).contains(&self.replicas) {
                return Err(bad("redis.replicas", "must be between 1 and 16"));
            }
            // WAIT blocks the connection every other Redis call of lapse shares.
            if self.wait_timeout.0.is_zero() || self.wait_timeout.0 >= self.response_timeout.0 {
                return Err(bad(
                    "redis.wait_timeout",
                    "must be positive and shorter than redis.response_timeout (WAIT blocks the shared connection; 0 would block it for ever)",
                ));
            }
        }
        Ok(())
    }
}

impl SchemaConfig {
    /// `[schema]`, and the `[outputs]` framing that needs its registry.
    fn validate(&self, outputs: &OutputsConfig) -> Result<(), ConfigError> {
        if !self.dir.is_dir() {
            return Err(bad(
                "schema.dir",
                format!(
                    "`{}` is not a directory: point it at the schemas/ folder shipped with lapse",
                    self.dir.display()
                ),
            ));
        }
        if outputs.framing == Some(OutputFraming::Confluent) && self.registry_url.is_none() {
            return Err(bad(
                "outputs.framing",
                "`confluent` needs a schema registry: set schema.registry_url (LAPSE_SCHEMA_REGISTRY_URL) or use `single_object`",
            ));
        }
        if let Some(u) = &self.registry_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(bad(
                    "schema.registry_url",
                    "must be an http:// or https:// URL",
                ));
            }
        }
        if !(64..=(64 << 20)).contains(&self.max_payload_bytes) {
            return Err(bad(
                "schema.max_payload_bytes",
                "must be between 64 and 67108864",
            ));
        }
        if self.avro_allocation_limit_bytes < self.max_payload_bytes {
            return Err(bad(
                "schema.avro_allocation_limit_bytes",
                "must be at least schema.max_payload_bytes",
            ));
        }
        Ok(())
    }
}

impl BatchConfig {
    /// `[batch]`.
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=100_000).contains(&self.max_records) {
            return Err(bad("batch.max_records", "must be between 1 and 100000"));
        }
        if self.max_wait.0.is_zero() || self.max_wait > Dur::secs(60) {
            return Err(bad("batch.max_wait", "must be between 1ms and 60s"));
        }
        if !(1..=64).contains(&self.queue_depth) {
            return Err(bad("batch.queue_depth", "must be between 1 and 64"));
        }
        if !(1..=64).contains(&self.store_chunks) {
            return Err(bad("batch.store_chunks", "must be between 1 and 64"));
        }
        Ok(())
    }
}

impl StateConfig {
    /// `[state]`.
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1024).contains(&self.event_ids_per_customer) {
            return Err(bad(
                "state.event_ids_per_customer",
                "must be between 1 and 1024",
            ));
        }
        if !(2..=256).contains(&self.visit_history) {
            return Err(bad("state.visit_history", "must be between 2 and 256"));
        }
        if self.short_half_life.0.is_zero() {
            return Err(bad("state.short_half_life", "must be positive"));
        }
        if self.long_half_life <= self.short_half_life {
            return Err(bad(
                "state.long_half_life",
                "must be longer than state.short_half_life",
            ));
        }
        Ok(())
    }
}

impl HttpConfig {
    /// `[http]`.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad(
                "http.listen",
                format!("`{}` is not an ip:port address", self.listen),
            ));
        }
        Ok(())
    }
}

impl MetricsConfig {
    /// `[metrics]`.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.fleet_gauge_refresh < Dur::ms(100) {
            return Err(bad("metrics.fleet_gauge_refresh", "must be at least 100ms"));
        }
        if self.max_tenants == 0 {
            return Err(bad("metrics.max_tenants", "must be at least 1"));
        }
        Ok(())
    }
}

impl TimersConfig {
    /// `[timers]`.
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1024).contains(&self.shards) {
            return Err(bad("timers.shards", "must be between 1 and 1024"));
        }
        if self.lease < Dur::secs(1) {
            return Err(bad("timers.lease", "must be at least 1s"));
        }
        if self.poll_interval < Dur::ms(10) || self.poll_interval > Dur::secs(60) {
            return Err(bad("timers.poll_interval", "must be between 10ms and 60s"));
        }
        if !(1..=10_000).contains(&self.claim_limit) {
            return Err(bad("timers.claim_limit", "must be between 1 and 10000"));
        }
        Ok(())
    }
}

impl RetryConfig {
    /// `[retry]`.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.initial_backoff.0.is_zero() || self.max_backoff < self.initial_backoff {
            return Err(bad(
                "retry.max_backoff",
                "must be at least retry.initial_backoff (> 0)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(Dur::parse("50ms").unwrap(), Dur::ms(50));
        assert_eq!(Dur::parse("7d").unwrap(), Dur::days(7));
        assert_eq!(Dur::days(7).to_string(), "7d");
        assert_eq!(Dur::ms(1500).to_string(), "1500ms");
        assert!(Dur::parse("7 weeks").is_err());
        assert!(Dur::parse("d").is_err());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("[batch]\nmax_recs = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_recs"), "{e}");
    }

    #[test]
    fn invalid_value_is_named() {
        let mut c = Config::from_toml("[batch]\nmax_records = 0\n").unwrap();
        c.schema.dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("batch.max_records"), "{e}");
    }

    #[test]
    fn every_section_names_its_key() {
        let schemas = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let cases = [
            (
                "[kafka]\nsession_timeout = \"0s\"\n",
                "kafka.session_timeout",
                "must be between 1s and 300s",
            ),
            (
                "[kafka.topics]\ndlq = \"recall.triggers\"\n",
                "kafka.topics.triggers",
                "topic `recall.triggers` is used twice: every topic must be distinct",
            ),
            (
                "[redis]\nkey_prefix = \"{x}\"\n",
                "redis.key_prefix",
                "must be non-empty and contain no braces",
            ),
            (
                "[schema]\nregistry_url = \"ftp://r\"\n",
                "schema.registry_url",
                "must be an http:// or https:// URL",
            ),
            (
                "[batch]\nmax_wait = \"2m\"\n",
                "batch.max_wait",
                "must be between 1ms and 60s",
            ),
            (
                "[state]\nlong_half_life = \"1d\"\n",
                "state.long_half_life",
                "must be longer than state.short_half_life",
            ),
            (
                "[http]\nlisten = \"nowhere\"\n",
                "http.listen",
                "`nowhere` is not an ip:port address",
            ),
            (
                "[metrics]\nmax_tenants = 0\n",
                "metrics.max_tenants",
                "must be at least 1",
            ),
            (
                "[timers]\nlease = \"10ms\"\n",
                "timers.lease",
                "must be at least 1s",
            ),
            (
                "[state]\nvisit_history = 2\n",
                "policy.lapse.min_gaps_for_learning",
                "must be less than state.visit_history (2)",
            ),
            (
                "[policy.caps.SMS]\nlimit = 2\nwindow = \"30s\"\n",
                "policy.caps.SMS.window",
                "must be between 1m and 366d",
            ),
            (
                "[retry]\ninitial_backoff = \"1s\"\nmax_backoff = \"1ms\"\n",
                "retry.max_backoff",
                "must be at least retry.initial_backoff (> 0)",
            ),
        ];
        for (toml, key, message) in cases {
            let mut c = Config::from_toml(toml).unwrap();
            c.schema.dir = schemas.clone();
            match c.validate() {
                Err(ConfigError::Invalid { key: k, message: m }) => {
                    assert_eq!((k.as_str(), m.as_str()), (key, message), "{toml}")
                }
                other => panic!("{toml}: {other:?}"),
            }
        }
    }

    #[test]
    fn env_overrides_apply() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "LAPSE_REDIS_URL" => Some("redis://10.0.0.1:7000/".into()),
            "LAPSE_GROUP_ID" => Some("g2".into()),
            _ => None,
        });
        assert_eq!(c.redis.url, "redis://10.0.0.1:7000/");
        assert_eq!(c.kafka.group_id, "g2");
    }

    #[test]
    fn output_framing_follows_the_registry_unless_set() {
        let schemas = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let mut c = Config::default();
        c.schema.dir = schemas.clone();
        assert_eq!(c.output_framing(), OutputFraming::SingleObject);
        c.schema.registry_url = Some("http://127.0.0.1:8081".into());
        assert_eq!(c.output_framing(), OutputFraming::Confluent);
        c.outputs.framing = Some(OutputFraming::SingleObject);
        assert_eq!(c.output_framing(), OutputFraming::SingleObject);
        c.validate().unwrap();

        let mut c = Config::from_toml("[outputs]\nframing = \"confluent\"\n").unwrap();
        c.schema.dir = schemas;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("outputs.framing") && e.contains("schema.registry_url"),
            "{e}"
        );
        let e = Config::from_toml("[outputs]\nframing = \"json\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("json"), "{e}");
    }

    #[test]
    fn bad_duration_is_named() {
        let e = Config::from_toml("[batch]\nmax_wait = \"5 parsecs\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_wait"), "{e}");
    }

    #[test]
    fn durability_is_typed_and_validated() {
        let schemas = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let parse = |text: &str| {
            let mut c = Config::from_toml(text)?;
            c.schema.dir = schemas.clone();
            c.validate().map(|()| c)
        };
        let d = parse("").unwrap().redis;
        assert_eq!(d.durability, Durability::FsyncHorizon, "safe by default");
        assert_eq!(d.fsync_horizon, Dur::ms(2500));
        let r =
            parse("[redis]\ndurability = \"replicas\"\nreplicas = 2\nwait_timeout = \"500ms\"\n")
                .unwrap()
                .redis;
        assert_eq!((r.durability, r.replicas), (Durability::Replicas, 2));
        let e = Config::from_toml("[redis]\ndurability = \"fsync\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ack") && e.contains("replicas"), "{e}");
        for (text, key) in [
            (
                "[redis]\nfsync_horizon = \"500ms\"\n",
                "redis.fsync_horizon",
            ),
            (
                "[redis]\ndurability = \"replicas\"\nreplicas = 0\n",
                "redis.replicas",
            ),
            (
                "[redis]\ndurability = \"replicas\"\nwait_timeout = \"0s\"\n",
                "redis.wait_timeout",
            ),
            (
                "[redis]\ndurability = \"replicas\"\nwait_timeout = \"3s\"\n",
                "redis.wait_timeout",
            ),
        ] {
            let e = parse(text)
                .err()
                .unwrap_or_else(|| panic!("{text} accepted"))
                .to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
        // Only the chosen mode's keys are checked.
        parse("[redis]\ndurability = \"ack\"\nreplicas = 0\n").unwrap();
    }
}
