//! Typed configuration: TOML file + environment overrides, seed defaults,
//! validated once at start-up. Every error names the offending key.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::domain::event::INPUT_KINDS;
use crate::domain::span::Span;
use crate::error::ConfigError;
use crate::secret::Secret;

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
    pub experiments: ExperimentsConfig,
}

/// How the running service watches contact-policy experiments
/// (`[[policy.experiments]]`); nothing runs without experiments.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExperimentsConfig {
    /// How often each instance reads every customer state to report the
    /// experiments (the `lapse_experiment_*` gauges) and judge the guardrail
    /// (an arm with `auto_stop` is stopped when flagged). One full read of
    /// the store each time: keep it long on big stores. Default 15m.
    pub report_every: Dur,
    /// How often each instance reads the stop records (one small hash), so a
    /// stop made by any instance applies everywhere within this. Default 10s.
    pub stop_poll: Dur,
}

impl Default for ExperimentsConfig {
    fn default() -> Self {
        ExperimentsConfig {
            report_every: Dur::secs(15 * 60),
            stop_poll: Dur::secs(10),
        }
    }
}

impl ExperimentsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.report_every < Dur::secs(1) {
            return Err(ConfigError::Invalid {
                key: "experiments.report_every".into(),
                message: "must be at least 1s (each report reads every customer state)".into(),
            });
        }
        if self.stop_poll < Dur::ms(100) {
            return Err(ConfigError::Invalid {
                key: "experiments.stop_poll".into(),
                message: "must be at least 100ms".into(),
            });
        }
        Ok(())
    }
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
    /// `PLAINTEXT`, `SSL` (TLS), `SASL_PLAINTEXT` or `SASL_SSL`.
    pub security_protocol: SecurityProtocol,
    /// With SASL: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<SaslMechanism>,
    /// Env: `LAPSE_KAFKA_SASL_USERNAME`.
    pub sasl_username: Option<String>,
    /// Better from `sasl_password_file` or env `LAPSE_KAFKA_SASL_PASSWORD`.
    pub sasl_password: Option<Secret>,
    pub sasl_password_file: Option<PathBuf>,
    /// PEM CA certificate(s) the brokers' certificates are checked against
    /// (default: the system's trust store).
    pub ssl_ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for mutual TLS.
    pub ssl_certificate_file: Option<PathBuf>,
    pub ssl_key_file: Option<PathBuf>,
    /// Check that a broker's certificate names the host lapse connected to
    /// (`ssl.endpoint.identification.algorithm=https`). Keep it on.
    pub ssl_hostname_verification: bool,
    /// Extra librdkafka consumer properties, applied last (values of
    /// password-like keys are never printed).
    pub consumer_properties: Properties,
    /// Extra librdkafka producer properties, applied last.
    pub producer_properties: Properties,
}

/// Raw librdkafka properties. Values of password-like keys
/// ([`is_secret_property`]) print as `***` (Debug, and rendered configs).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Properties(pub std::collections::BTreeMap<String, String>);

impl std::ops::Deref for Properties {
    type Target = std::collections::BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Properties {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl<'a> IntoIterator for &'a Properties {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Properties {
    fn shown(&self) -> impl Iterator<Item = (&String, &str)> {
        self.0.iter().map(|(k, v)| {
            let v = if is_secret_property(k) {
                crate::secret::REDACTED
            } else {
                v.as_str()
            };
            (k, v)
        })
    }
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.shown()).finish()
    }
}

impl Serialize for Properties {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.shown())
    }
}

/// `kafka.security_protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SecurityProtocol {
    #[default]
    #[serde(rename = "PLAINTEXT")]
    Plaintext,
    #[serde(rename = "SSL")]
    Ssl,
    #[serde(rename = "SASL_PLAINTEXT")]
    SaslPlaintext,
    #[serde(rename = "SASL_SSL")]
    SaslSsl,
}

impl SecurityProtocol {
    /// librdkafka's `security.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
    pub fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
    pub fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// `kafka.sasl_mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's `sasl.mechanisms` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// librdkafka properties whose values are secrets.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.contains("jaas")
        || k.contains("oauthbearer.config")
        || k == "ssl.key.pem"
        || k == "ssl_key"
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
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            sasl_password_file: None,
            ssl_ca_file: None,
            ssl_certificate_file: None,
            ssl_key_file: None,
            ssl_hostname_verification: true,
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
    /// Satisfaction feedback (`lapse.v1.Feedback`).
    pub feedback: String,
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
            feedback: "clinic.feedback".into(),
            dlq: "lapse.dlq".into(),
            throttle: "engagement.throttle".into(),
            triggers: "recall.triggers".into(),
            outcomes: "recall.outcomes".into(),
        }
    }
}

impl TopicsConfig {
    /// Input topics in `EventKind` order.
    pub fn inputs(&self) -> [&str; INPUT_KINDS] {
        [
            &self.sends,
            &self.opens,
            &self.clicks,
            &self.replies,
            &self.visits,
            &self.feedback,
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`, or `rediss://` for TLS. Env: `LAPSE_REDIS_URL`.
    /// Credentials written into it (`redis://user:pass@...`) are moved to
    /// `username`/`password` at load, so the URL printed never holds them.
    pub url: String,
    /// ACL user (Redis 6+). Env: `LAPSE_REDIS_USERNAME`.
    pub username: Option<String>,
    /// Better from `password_file` or env `LAPSE_REDIS_PASSWORD`.
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// With `rediss://`: PEM CA certificate(s) Redis' certificate is checked
    /// against (default: the system's trust store).
    pub tls_ca_file: Option<PathBuf>,
    /// With `rediss://`: PEM client certificate and key, for mutual TLS
    /// (`tls-auth-clients yes`).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
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
            username: None,
            password: None,
            password_file: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
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
    /// Confluent Schema Registry base URL (`http://` or `https://`). Env:
    /// `LAPSE_SCHEMA_REGISTRY_URL`. Credentials written into it are moved to
    /// `registry_username`/`registry_password` at load.
    pub registry_url: Option<String>,
    /// Basic auth user. Env: `LAPSE_SCHEMA_REGISTRY_USERNAME`.
    pub registry_username: Option<String>,
    /// Basic auth password; better from `registry_password_file` or env
    /// `LAPSE_SCHEMA_REGISTRY_PASSWORD`.
    pub registry_password: Option<Secret>,
    pub registry_password_file: Option<PathBuf>,
    /// Bearer token (instead of basic auth); better from `registry_token_file`
    /// or env `LAPSE_SCHEMA_REGISTRY_TOKEN`.
    pub registry_token: Option<Secret>,
    pub registry_token_file: Option<PathBuf>,
    /// With `https://`: PEM CA certificate(s) the registry's certificate is
    /// checked against, in addition to the system's trust store.
    pub registry_ca_file: Option<PathBuf>,
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
            registry_username: None,
            registry_password: None,
            registry_password_file: None,
            registry_token: None,
            registry_token_file: None,
            registry_ca_file: None,
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
    /// A partial batch is dispatched after this long at the latest; at once
    /// when no batch is being applied (so at a light load a record waits for
    /// no timer, and under load batches grow while earlier ones apply).
    pub max_wait: Dur,
    /// Batches queued behind the one being applied; beyond it (and one more batch
    /// buffered) partitions are paused.
    pub queue_depth: usize,
    /// A batch's customers are loaded, folded and written in this many
    /// concurrent chunks, so lapse folds one while Redis works on another.
    pub store_chunks: usize,
    /// Batch processors over disjoint customers (by hash): each applies its
    /// customers' part of every batch in order, while the others and the next
    /// batches' decoding run beside it. 1 by default: on 2 cores shared with
    /// Redis and the broker more cost CPU per event (smaller Redis calls) and
    /// gained nothing measurable; raise it where lapse has idle cores.
    pub processors: usize,
}

/// Most batch processors (`batch.processors`; also bounds the metric's processor label).
pub const MAX_PROCESSORS: usize = 16;

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_records: 2000,
            max_wait: Dur::ms(50),
            queue_depth: 32,
            store_chunks: 4,
            processors: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Engagement event ids (sends, opens, clicks, replies) are remembered this
    /// long in event time behind the latest event of their topic: a re-sent copy
    /// inside it is skipped by its id, an event older than it is skipped as
    /// possibly re-sent (`lapse_duplicates_skipped_total{kind="beyond_dedup_horizon"}`).
    pub dedup_window: Dur,
    /// At most this many engagement ids per customer and input topic (about 10
    /// bytes of Redis memory each); when more fall inside the window, the oldest
    /// are pushed out and counted (`lapse_dedup_ids_evicted_total`).
    /// `event_ids_per_customer` (earlier versions) is read as this key.
    #[serde(alias = "event_ids_per_customer")]
    pub event_ids_per_topic: usize,
    /// At most this many visit ids per customer: every visit of any realistic
    /// customer, so a re-sent visit is never counted twice however old.
    pub visit_ids_per_customer: usize,
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
            dedup_window: Dur::days(7),
            event_ids_per_topic: 64,
            visit_ids_per_customer: 256,
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
    ("LAPSE_REDIS_USERNAME", "redis.username"),
    ("LAPSE_REDIS_PASSWORD", "redis.password"),
    ("LAPSE_KAFKA_SASL_USERNAME", "kafka.sasl_username"),
    ("LAPSE_KAFKA_SASL_PASSWORD", "kafka.sasl_password"),
    ("LAPSE_SCHEMA_REGISTRY_USERNAME", "schema.registry_username"),
    ("LAPSE_SCHEMA_REGISTRY_PASSWORD", "schema.registry_password"),
    ("LAPSE_SCHEMA_REGISTRY_TOKEN", "schema.registry_token"),
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
        cfg.resolve_secrets()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The error says where and what, but never quotes the file: the line
    /// at fault may hold a secret (a misspelt `pasword = "..."`).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let at = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let line_start = before.rfind('\n').map_or(0, |i| i + 1);
                let column = before.len() - line_start + 1;
                // The key (never its value) of the line at fault.
                let key = text[line_start..]
                    .lines()
                    .next()
                    .and_then(|l| l.split_once('='))
                    .map(|(k, _)| format!(" (key `{}`)", k.trim()))
                    .unwrap_or_default();
                format!("line {line}, column {column}{key}: ")
            });
            ConfigError::Parse(format!("{}{}", at.unwrap_or_default(), e.message().trim()))
        })
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
        let text = |k: &str| get(k).filter(|v| !v.is_empty());
        let secret = |k: &str| text(k).map(Secret::new);
        if let Some(v) = text("LAPSE_REDIS_USERNAME") {
            self.redis.username = Some(v);
        }
        if let Some(v) = secret("LAPSE_REDIS_PASSWORD") {
            self.redis.password = Some(v);
        }
        if let Some(v) = text("LAPSE_KAFKA_SASL_USERNAME") {
            self.kafka.sasl_username = Some(v);
        }
        if let Some(v) = secret("LAPSE_KAFKA_SASL_PASSWORD") {
            self.kafka.sasl_password = Some(v);
        }
        if let Some(v) = text("LAPSE_SCHEMA_REGISTRY_USERNAME") {
            self.schema.registry_username = Some(v);
        }
        if let Some(v) = secret("LAPSE_SCHEMA_REGISTRY_PASSWORD") {
            self.schema.registry_password = Some(v);
        }
        if let Some(v) = secret("LAPSE_SCHEMA_REGISTRY_TOKEN") {
            self.schema.registry_token = Some(v);
        }
    }

    /// Reads every `*_file` secret, moves credentials out of `redis.url`,
    /// `redis.cluster_nodes` and `schema.registry_url`, and registers every
    /// secret value for scrubbing. Errors name the key.
    pub fn resolve_secrets(&mut self) -> Result<(), ConfigError> {
        read_secret(
            "redis.password",
            &mut self.redis.password,
            &self.redis.password_file,
        )?;
        read_secret(
            "kafka.sasl_password",
            &mut self.kafka.sasl_password,
            &self.kafka.sasl_password_file,
        )?;
        read_secret(
            "schema.registry_password",
            &mut self.schema.registry_password,
            &self.schema.registry_password_file,
        )?;
        read_secret(
            "schema.registry_token",
            &mut self.schema.registry_token,
            &self.schema.registry_token_file,
        )?;
        let r = &mut self.redis;
        r.url = take_url_credentials("redis.url", &r.url, &mut r.username, &mut r.password)?;
        for i in 0..r.cluster_nodes.len() {
            let key = format!("redis.cluster_nodes[{i}]");
            r.cluster_nodes[i] =
                take_url_credentials(&key, &r.cluster_nodes[i], &mut r.username, &mut r.password)?;
        }
        let sc = &mut self.schema;
        if let Some(u) = sc.registry_url.take() {
            sc.registry_url = Some(take_url_credentials(
                "schema.registry_url",
                &u,
                &mut sc.registry_username,
                &mut sc.registry_password,
            )?);
        }
        for props in [
            &self.kafka.consumer_properties,
            &self.kafka.producer_properties,
        ] {
            for (k, v) in props {
                if is_secret_property(k) {
                    crate::secret::register(v);
                }
            }
        }
        Ok(())
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
        self.experiments.validate()?;
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

/// `key` from `key_file` (a file holding only the secret; one trailing
/// newline is dropped), unless both are set.
fn read_secret(
    key: &str,
    value: &mut Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<(), ConfigError> {
    let Some(path) = file else {
        return Ok(());
    };
    if value.is_some() {
        return Err(bad(
            &format!("{key}_file"),
            format!("{key} is set too (from the file or the environment): set one of them"),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        bad(
            &format!("{key}_file"),
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let text = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if text.is_empty() {
        return Err(bad(
            &format!("{key}_file"),
            format!("{} is empty", path.display()),
        ));
    }
    *value = Some(Secret::new(text));
    Ok(())
}

/// `url` without `user:password@`, which go to `username` and `password`
/// (percent-decoded) unless those are set already with other values.
fn take_url_credentials(
    key: &str,
    url: &str,
    username: &mut Option<String>,
    password: &mut Option<Secret>,
) -> Result<String, ConfigError> {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        // Validation names the key; the text itself is never shown.
        return Ok(url.to_owned());
    };
    if !parsed.has_host() || (parsed.username().is_empty() && parsed.password().is_none()) {
        return Ok(url.to_owned());
    }
    let user = crate::codec::percent_decode(parsed.username());
    let pass = parsed.password().map(crate::codec::percent_decode);
    if let Some(p) = &pass {
        // Registered before any error can mention the URL.
        crate::secret::register(p);
    }
    if !user.is_empty() {
        match username {
            Some(u) if *u != user => {
                return Err(bad(
                    key,
                    "names another user than the username key: set the user in one place",
                ))
            }
            _ => *username = Some(user),
        }
    }
    if let Some(p) = pass {
        match password {
            Some(existing) if existing.expose() != p => {
                return Err(bad(key, "holds another password than the password key (or its _file or environment variable): set it in one place"))
            }
            _ => *password = Some(Secret::new(p)),
        }
    }
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    let mut out = parsed.to_string();
    // Url adds a trailing slash to an empty path; keep the original shape.
    if !url.ends_with('/') && parsed.path() == "/" && out.ends_with('/') {
        out.pop();
    }
    Ok(out)
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
            ("kafka.topics.feedback", &t.feedback),
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
        self.validate_security()
    }

    /// The typed security keys: what the protocol needs is set, nothing is
    /// set that it would ignore, and every file is readable.
    fn validate_security(&self) -> Result<(), ConfigError> {
        let p = self.security_protocol;
        if p.sasl() {
            if self.sasl_mechanism.is_none() {
                return Err(bad(
                    "kafka.sasl_mechanism",
                    format!(
                        "security_protocol {} needs a SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                        p.as_str().to_ascii_uppercase()
                    ),
                ));
            }
            if self.sasl_username.as_deref().is_none_or(str::is_empty) {
                return Err(bad(
                    "kafka.sasl_username",
                    "must be set with a SASL security_protocol (env LAPSE_KAFKA_SASL_USERNAME)",
                ));
            }
            if self.sasl_password.as_ref().is_none_or(Secret::is_empty) {
                return Err(bad(
                    "kafka.sasl_password",
                    "must be set with a SASL security_protocol: kafka.sasl_password_file or env LAPSE_KAFKA_SASL_PASSWORD",
                ));
            }
        } else if self.sasl_mechanism.is_some()
            || self.sasl_username.is_some()
            || self.sasl_password.is_some()
        {
            return Err(bad(
                "kafka.security_protocol",
                "SASL credentials are set but the protocol is not SASL_SSL or SASL_PLAINTEXT: they would be ignored",
            ));
        }
        let files = [
            ("kafka.ssl_ca_file", &self.ssl_ca_file),
            ("kafka.ssl_certificate_file", &self.ssl_certificate_file),
            ("kafka.ssl_key_file", &self.ssl_key_file),
        ];
        if !p.tls() && files.iter().any(|(_, f)| f.is_some()) {
            return Err(bad(
                "kafka.security_protocol",
                "TLS files are set but the protocol is not SSL or SASL_SSL: they would be ignored",
            ));
        }
        pair(
            ("kafka.ssl_certificate_file", &self.ssl_certificate_file),
            ("kafka.ssl_key_file", &self.ssl_key_file),
        )?;
        readable(&files)
    }
}

/// A client certificate needs its key and the other way round.
fn pair(cert: (&str, &Option<PathBuf>), key: (&str, &Option<PathBuf>)) -> Result<(), ConfigError> {
    match (cert.1, key.1) {
        (Some(_), None) => Err(bad(key.0, format!("must be set with {}", cert.0))),
        (None, Some(_)) => Err(bad(cert.0, format!("must be set with {}", key.0))),
        _ => Ok(()),
    }
}

/// Every file set is readable.
fn readable(files: &[(&str, &Option<PathBuf>)]) -> Result<(), ConfigError> {
    for (key, f) in files {
        if let Some(path) = f {
            if let Err(e) = std::fs::File::open(path) {
                return Err(bad(key, format!("cannot read {}: {e}", path.display())));
            }
        }
    }
    Ok(())
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
        let files = [
            ("redis.tls_ca_file", &self.tls_ca_file),
            ("redis.tls_cert_file", &self.tls_cert_file),
            ("redis.tls_key_file", &self.tls_key_file),
        ];
        if !self.url.starts_with("rediss://") {
            if let Some((key, _)) = files.iter().find(|(_, f)| f.is_some()) {
                return Err(bad(
                    key,
                    "is set but redis.url does not start with rediss:// (TLS): use rediss://",
                ));
            }
        }
        pair(
            ("redis.tls_cert_file", &self.tls_cert_file),
            ("redis.tls_key_file", &self.tls_key_file),
        )?;
        readable(&files)?;
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
        if self.registry_token.is_some() && self.registry_password.is_some() {
            return Err(bad(
                "schema.registry_token",
                "set either a bearer token or a basic auth password (schema.registry_password), not both",
            ));
        }
        if self.registry_password.is_some() && self.registry_username.is_none() {
            return Err(bad(
                "schema.registry_username",
                "must be set with schema.registry_password (basic auth is user:password)",
            ));
        }
        if self.registry_ca_file.is_some()
            && !self
                .registry_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
        {
            return Err(bad(
                "schema.registry_ca_file",
                "is set but schema.registry_url is not an https:// URL",
            ));
        }
        readable(&[("schema.registry_ca_file", &self.registry_ca_file)])?;
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
        if !(1..=MAX_PROCESSORS).contains(&self.processors) {
            return Err(bad("batch.processors", "must be between 1 and 16"));
        }
        Ok(())
    }
}

impl StateConfig {
    /// `[state]`.
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=1024).contains(&self.event_ids_per_topic) {
            return Err(bad(
                "state.event_ids_per_topic",
                "must be between 1 and 1024",
            ));
        }
        if !(1..=4096).contains(&self.visit_ids_per_customer) {
            return Err(bad(
                "state.visit_ids_per_customer",
                "must be between 1 and 4096",
            ));
        }
        if self.dedup_window.0.is_zero() || self.dedup_window > Dur::days(366) {
            return Err(bad(
                "state.dedup_window",
                "must be between 1 ms and 366 days (events older than it behind their topic's latest are skipped)",
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

    /// The documented config, alone (no platform rule, nothing across channels)
    /// and with the platform-rule templates appended as the template says.
    #[test]
    fn the_shipped_config_and_platform_rule_templates_load() {
        use crate::domain::platform::PlatformRuleKind;
        let shipped = include_str!("../deploy/lapse.toml");
        let c = Config::from_toml(shipped).unwrap();
        let p = c.policy.resolve(None).unwrap();
        assert!(p.platform_rules.is_empty(), "off by default");
        assert_eq!(p.cross_channel.cap(), None, "off by default");
        let templates = include_str!("../deploy/platform-rules.toml");
        let c = Config::from_toml(&format!("{shipped}\n{templates}")).unwrap();
        let p = c.policy.resolve(None).unwrap();
        let kinds: Vec<_> = p
            .platform_rules
            .iter()
            .map(|r| (r.name.as_str(), r.kind, r.limit))
            .collect();
        assert_eq!(
            kinds,
            [
                (
                    "wechat_service_account_broadcast",
                    PlatformRuleKind::CalendarMonth,
                    4
                ),
                (
                    "wechat_customer_service_window",
                    PlatformRuleKind::InboundWindow,
                    5
                ),
                ("wecom_daily_mass_message", PlatformRuleKind::CalendarDay, 1),
            ]
        );
        assert!(p.platform_rules.iter().all(|r| !r.source.is_empty()));
    }

    /// The commented experiment at the end of the shipped config, uncommented,
    /// loads; a mistake in it stops start-up naming the key.
    #[test]
    fn the_shipped_experiment_example_loads() {
        let shipped = include_str!("../deploy/lapse.toml");
        let (_, example) = shipped
            .split_once("# [[policy.experiments]]")
            .expect("the example");
        let example: String = format!("# [[policy.experiments]]{example}")
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::from_toml(&format!("{shipped}\n{example}")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.policy.experiments.len(), 1);
        assert_eq!(c.policy.experiments[0].arms.len(), 2);
        let bad = example.replace("share = 0.5\ncaps", "share = 0.6\ncaps");
        match Config::from_toml(&format!("{shipped}\n{bad}")).and_then(|c| c.validate()) {
            Err(e) => assert!(
                e.to_string()
                    .contains("policy.experiments.wechat-1-vs-2.arms"),
                "{e}"
            ),
            Ok(()) => panic!("shares of 1.1 accepted"),
        }
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
                "[batch]\nprocessors = 0\n",
                "batch.processors",
                "must be between 1 and 16",
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

    /// A config from `toml` with the repository's schemas, env from `env`.
    fn loaded(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut c = Config::from_toml(toml)?;
        c.schema.dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas");
        c.apply_env(|k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        });
        c.resolve_secrets()?;
        c.validate()?;
        Ok(c)
    }

    fn file(dir: &Path, name: &str, text: &str) -> String {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    #[test]
    fn secrets_come_from_files_env_or_urls_and_are_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let sasl = file(dir.path(), "sasl", "sasl-pw-from-file\n");
        let token = file(dir.path(), "token", "registry-token-from-file");
        let toml = format!(
            "[redis]\nurl = \"redis://lapse:redis%40pw-in-url@10.0.0.1:6379/0\"\n\
             [kafka]\nsecurity_protocol = \"SASL_SSL\"\nsasl_mechanism = \"SCRAM-SHA-512\"\n\
             sasl_username = \"lapse\"\nsasl_password_file = \"{sasl}\"\n\
             [kafka.producer_properties]\n\"ssl.key.password\" = \"key-pw-in-props\"\n\"linger.ms\" = \"7\"\n\
             [schema]\nregistry_url = \"https://r.example:8081/sr\"\nregistry_token_file = \"{token}\"\n"
        );
        let c = loaded(&toml, &[]).unwrap();
        assert_eq!(c.redis.url, "redis://10.0.0.1:6379/0");
        assert_eq!(c.redis.username.as_deref(), Some("lapse"));
        assert_eq!(
            c.redis.password.as_ref().unwrap().expose(),
            "redis@pw-in-url"
        );
        assert_eq!(
            c.kafka.sasl_password.as_ref().unwrap().expose(),
            "sasl-pw-from-file"
        );
        assert_eq!(
            c.schema.registry_token.as_ref().unwrap().expose(),
            "registry-token-from-file"
        );
        let printed = format!("{}\n{c:?}", c.to_toml());
        for secret in [
            "redis@pw-in-url",
            "redis%40pw-in-url",
            "sasl-pw-from-file",
            "key-pw-in-props",
            "registry-token-from-file",
        ] {
            assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        }
        assert!(printed.contains("password = \"***\""), "{printed}");
        assert!(printed.contains("\"linger.ms\" = \"7\""), "{printed}");

        // The environment, for the process' secrets.
        let c = loaded(
            "[schema]\nregistry_url = \"http://r:8081\"\n",
            &[
                ("LAPSE_REDIS_PASSWORD", "redis-pw-from-env"),
                ("LAPSE_SCHEMA_REGISTRY_USERNAME", "sr"),
                ("LAPSE_SCHEMA_REGISTRY_PASSWORD", "sr-pw-from-env"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.redis.password.as_ref().unwrap().expose(),
            "redis-pw-from-env"
        );
        assert_eq!(
            c.schema.registry_password.as_ref().unwrap().expose(),
            "sr-pw-from-env"
        );
        assert!(!c.to_toml().contains("-from-env"));
    }

    #[test]
    fn a_secret_set_twice_or_unreadable_is_refused_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let pw = file(dir.path(), "pw", "from-file");
        let key = |r: Result<Config, ConfigError>| match r {
            Err(ConfigError::Invalid { key, message }) => {
                assert!(
                    !message.contains("from-file") && !message.contains("other-pw"),
                    "{message}"
                );
                key
            }
            other => panic!("{other:?}"),
        };
        let toml = format!("[redis]\npassword_file = \"{pw}\"\n");
        assert_eq!(
            key(loaded(&toml, &[("LAPSE_REDIS_PASSWORD", "other-pw")])),
            "redis.password_file"
        );
        assert_eq!(
            key(loaded(
                "[redis]\npassword_file = \"/nonexistent/pw\"\n",
                &[]
            )),
            "redis.password_file"
        );
        let toml = format!("[redis]\nurl = \"redis://:other-pw@h:1/\"\npassword_file = \"{pw}\"\n");
        assert_eq!(key(loaded(&toml, &[])), "redis.url");
    }

    #[test]
    fn a_toml_error_never_quotes_the_file() {
        // A misspelt key: its line holds a password.
        let e = Config::from_toml("[redis]\npasword = \"hunter2-secret\"\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("pasword") && msg.contains("line 2"), "{msg}");
        assert!(!msg.contains("hunter2-secret"), "{msg}");
    }

    #[test]
    fn security_keys_are_validated_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = file(dir.path(), "ca.pem", "-----BEGIN CERTIFICATE-----\n");
        let cases = [
            ("[kafka]\nsecurity_protocol = \"SASL_SSL\"\n", "kafka.sasl_mechanism"),
            (
                "[kafka]\nsecurity_protocol = \"SASL_SSL\"\nsasl_mechanism = \"PLAIN\"\n",
                "kafka.sasl_username",
            ),
            (
                "[kafka]\nsecurity_protocol = \"SASL_PLAINTEXT\"\nsasl_mechanism = \"SCRAM-SHA-256\"\nsasl_username = \"u\"\n",
                "kafka.sasl_password",
            ),
            ("[kafka]\nsasl_username = \"u\"\n", "kafka.security_protocol"),
            (&format!("[kafka]\nssl_ca_file = \"{ca}\"\n"), "kafka.security_protocol"),
            (
                &format!("[kafka]\nsecurity_protocol = \"SSL\"\nssl_certificate_file = \"{ca}\"\n"),
                "kafka.ssl_key_file",
            ),
            (
                "[kafka]\nsecurity_protocol = \"SSL\"\nssl_ca_file = \"/nonexistent/ca.pem\"\n",
                "kafka.ssl_ca_file",
            ),
            (&format!("[redis]\ntls_ca_file = \"{ca}\"\n"), "redis.tls_ca_file"),
            (
                &format!("[redis]\nurl = \"rediss://h:1/\"\ntls_key_file = \"{ca}\"\n"),
                "redis.tls_cert_file",
            ),
            (
                "[schema]\nregistry_url = \"https://r\"\nregistry_token = \"t0ken\"\nregistry_username = \"u\"\nregistry_password = \"p4ss\"\n",
                "schema.registry_token",
            ),
            (
                "[schema]\nregistry_url = \"https://r\"\nregistry_password = \"p4ss\"\n",
                "schema.registry_username",
            ),
            (
                &format!("[schema]\nregistry_url = \"http://r\"\nregistry_ca_file = \"{ca}\"\n"),
                "schema.registry_ca_file",
            ),
        ];
        for (toml, want) in cases {
            match loaded(toml, &[]) {
                Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, want, "{toml}"),
                other => panic!("{toml}: {other:?}"),
            }
        }
        let ok = format!(
            "[kafka]\nsecurity_protocol = \"SASL_SSL\"\nsasl_mechanism = \"SCRAM-SHA-256\"\nsasl_username = \"u\"\nssl_ca_file = \"{ca}\"\n"
        );
        let c = loaded(&ok, &[("LAPSE_KAFKA_SASL_PASSWORD", "pw")]).unwrap();
        assert!(c.kafka.ssl_hostname_verification, "on by default");
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
