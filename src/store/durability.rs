//! The durability contract (`redis.durability`): what, beyond Redis
//! acknowledging a batch's writes, must hold before the batch's input offsets
//! may be committed.
//!
//! * [`RedisEpoch`] watches the identity of the Redis masters (the `run_id` of
//!   each, from `INFO server`): a restart (which may have lost the last
//!   unsynced writes) or a failover (a replica that may lack them) changes
//!   it. A batch whose writes began under one epoch and ended under another
//!   is not known to be durable.
//! * [`Durability::confirm`] (mode `replicas`) sends `WAIT replicas timeout` on
//!   the connection that wrote (on a Cluster the client sends it to every
//!   master and answers the smallest count), right after the batch's writes.
//!   A shortfall fails the batch's step, which is retried with back-off
//!   (`retry.*`): the fold is idempotent, so the retry re-writes whatever a
//!   failover lost and skips what is there.
//! * Mode `fsync_horizon` holds the offsets instead (`kafka/offset_gate.rs`):
//!   released `redis.fsync_horizon` after Redis acknowledged the writes if the
//!   epoch did not change, else lapse re-reads from the last safe offsets.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::Value;
use tracing::{error, info, warn};

use super::cluster::ClusterLink;
use super::redis::Conn;
use crate::config::{Durability as Mode, RedisConfig};
use crate::error::StoreError;
use crate::metrics::Metrics;

/// How often the masters' identities are read.
pub const EPOCH_POLL: Duration = Duration::from_millis(200);

#[derive(Default)]
struct Seen {
    /// Sorted `run_id`s of the masters at the last successful read.
    ids: Vec<String>,
    /// When the last successful read was sent.
    at: Option<Instant>,
}

/// The identity of the Redis masters, as a counter that moves whenever a
/// master restarted or the set of masters changed. Cheap to clone.
#[derive(Clone)]
pub struct RedisEpoch {
    epoch: Arc<AtomicU64>,
    /// On a Cluster: its connection, replaced when stuck; a replacement
    /// moves the epoch too (a `WAIT` on the new connection would not cover
    /// the old one's writes).
    link: Option<ClusterLink>,
    /// How often a write found Redis without lapse's script
    /// (`StateStore::scripts_lost`): seen before any poll could see a restart.
    scripts_lost: Arc<AtomicU64>,
    seen: Arc<Mutex<Seen>>,
    /// The last `INFO` was refused with an error waiting does not cure.
    refused: Arc<AtomicBool>,
}

/// The step `/readyz` names when the masters cannot be watched.
const WATCH: &str = "durability watch (INFO server)";

/// Whether writes made under an epoch are still backed by the same masters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Same masters, confirmed by a read sent at or after the asked instant.
    Same,
    /// A master restarted or changed since.
    Changed,
    /// No read since the asked instant yet (Redis unreachable, or just early).
    Unknown,
}

impl RedisEpoch {
    /// Reads the masters' identities once (so the first batches have an
    /// epoch to compare with), then every [`EPOCH_POLL`] in a task.
    pub async fn start(conn: Conn, scripts_lost: Arc<AtomicU64>, metrics: Metrics) -> RedisEpoch {
        let e = RedisEpoch {
            epoch: Arc::new(AtomicU64::new(0)),
            link: match &conn {
                Conn::Cluster(link) => Some(link.clone()),
                Conn::Single(_) => None,
            },
            scripts_lost,
            seen: Arc::new(Mutex::new(Seen::default())),
            refused: Arc::default(),
        };
        e.observe(&conn, &metrics).await;
        let watcher = e.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(EPOCH_POLL).await;
                watcher.observe(&conn, &metrics).await;
            }
        });
        e
    }

    /// The current epoch: take it before a batch's first write.
    pub fn current(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
            + self.scripts_lost.load(Ordering::SeqCst)
            + self.link.as_ref().map_or(0, ClusterLink::generation)
    }

    /// Whether the masters of epoch `epoch` were still the masters at `at`.
    pub fn verdict(&self, epoch: u64, at: Instant) -> Verdict {
        let seen = self.lock();
        if self.current() != epoch {
            return Verdict::Changed;
        }
        match seen.at {
            Some(t) if t >= at => Verdict::Same,
            _ => Verdict::Unknown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn observe(&self, conn: &Conn, metrics: &Metrics) {
        let sent = Instant::now();
        let mut c = conn.clone();
        let r: Result<Value, _> = redis::cmd("INFO").arg("server").query_async(&mut c).await;
        let ids = match r.map(|v| run_ids(&v)) {
            Ok(Some(ids)) => ids,
            Ok(None) => {
                warn!("INFO server carried no run_id: Redis restarts cannot be detected");
                return;
            }
            Err(e) => {
                metrics.redis_errors.with_label_values(&["epoch"]).inc();
                // Refused, not unreachable (an ACL without +info): nothing
                // would ever be committed, so /readyz must say why.
                let e = StoreError::Redis(e);
                if let Some(kind) = metrics.redis_fault.report(WATCH, &e) {
                    if !self.refused.swap(true, Ordering::SeqCst) {
                        metrics
                            .redis_permanent_errors
                            .with_label_values(&[kind])
                            .inc();
                        error!(error = %e, kind, "{WATCH} failed with a Redis error that waiting does not cure: no offset is committed until it is fixed; /readyz reports it");
                    }
                }
                return;
            }
        };
        if self.refused.swap(false, Ordering::SeqCst) {
            metrics.redis_fault.clear(WATCH);
        }
        let mut seen = self.lock();
        if !seen.ids.is_empty() && seen.ids != ids {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            metrics.redis_epoch_changes.inc();
            info!(
                masters = ids.len(),
                "a Redis master restarted or the masters changed: writes not yet confirmed durable are re-applied"
            );
        }
        seen.ids = ids;
        seen.at = Some(seen.at.map_or(sent, |t| t.max(sent)));
    }
}

/// The sorted `run_id`s in an `INFO server` reply: one text on a single node,
/// a map of node address → text on a Cluster (the client asks every master).
fn run_ids(v: &Value) -> Option<Vec<String>> {
    let mut ids = info_field(v, "run_id")?;
    ids.sort();
    Some(ids)
}

/// The value of `field` in an `INFO` reply, per node: one text on a single
/// node, a map of node address → text on a Cluster. None if a node lacks it.
fn info_field(v: &Value, field: &str) -> Option<Vec<String>> {
    fn one(text: &[u8], field: &str) -> Option<String> {
        let text = std::str::from_utf8(text).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .map(|s| s.trim().to_string())
    }
    match v {
        Value::BulkString(b) => Some(vec![one(b, field)?]),
        Value::VerbatimString { text, .. } => Some(vec![one(text.as_bytes(), field)?]),
        Value::SimpleString(s) => Some(vec![one(s.as_bytes(), field)?]),
        Value::Map(pairs) => pairs
            .iter()
            .map(|(_, v)| info_field(v, field).and_then(|mut v| v.pop()))
            .collect(),
        _ => None,
    }
}

/// Mode `fsync_horizon` holds offsets for the time Redis takes to fsync its
/// AOF; a master without an AOF (`appendonly no`) loses, on a crash, every
/// write since its last snapshot, and nothing re-reads those records. Checked
/// once at start-up (`INFO persistence`, which the ACL already allows): a
/// warning and `lapse_redis_masters_without_aof`.
async fn check_aof(cfg: &RedisConfig, conn: &Conn, metrics: &Metrics) {
    if cfg.durability != Mode::FsyncHorizon {
        return;
    }
    let mut c = conn.clone();
    let r: Result<Value, _> = redis::cmd("INFO")
        .arg("persistence")
        .query_async(&mut c)
        .await;
    let enabled = match r.map(|v| info_field(&v, "aof_enabled")) {
        Ok(Some(enabled)) => enabled,
        Ok(None) => {
            warn!("INFO persistence carried no aof_enabled: cannot tell whether Redis keeps an AOF, which redis.durability = \"fsync_horizon\" relies on");
            return;
        }
        Err(e) => {
            warn!(error = %e, "INFO persistence failed: cannot tell whether Redis keeps an AOF, which redis.durability = \"fsync_horizon\" relies on");
            return;
        }
    };
    let without = enabled.iter().filter(|v| v.as_str() != "1").count();
    metrics.redis_masters_without_aof.set(without as i64);
    if without > 0 {
        warn!(
            masters = enabled.len(),
            without_aof = without,
            "redis.durability = \"fsync_horizon\" relies on Redis appending every write to its AOF, but a master has appendonly no: a Redis crash there loses the writes since its last snapshot, and their records are not read again. Set appendonly yes with appendfsync everysec on every master, or use redis.durability = \"replicas\" on a Cluster with replicas"
        );
    }
}

/// Why a batch's writes are not (yet) known to be durable.
#[derive(Debug, thiserror::Error)]
pub enum Shortfall {
    #[error("only {got} of redis.replicas = {want} replicas confirmed the writes within redis.wait_timeout: offsets are not committed until they do (a master without its replica, after a failover or while a replica resyncs; add or repair replicas, or lower redis.replicas)")]
    Replicas { got: i64, want: u32 },
    #[error("a Redis master restarted or the masters changed while the batch was written: re-applying it")]
    EpochChanged,
    #[error("WAIT failed: {0}")]
    Redis(#[from] StoreError),
}

impl Shortfall {
    /// The bounded `kind` label of `lapse_durability_shortfalls_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Shortfall::Replicas { .. } => "replicas",
            Shortfall::EpochChanged => "epoch",
            Shortfall::Redis(_) => "redis",
        }
    }
}

/// The `kind`s of `lapse_durability_shortfalls_total`.
pub const SHORTFALL_KINDS: [&str; 3] = ["replicas", "epoch", "redis"];

/// `redis.durability` with what it needs: the connection that writes, the
/// masters' epoch. Cheap to clone.
#[derive(Clone)]
pub struct Durability {
    pub mode: Mode,
    pub fsync_horizon: Duration,
    replicas: u32,
    wait_timeout: Duration,
    conn: Conn,
    pub epoch: RedisEpoch,
    metrics: Metrics,
}

impl Durability {
    pub async fn new(
        cfg: &RedisConfig,
        conn: Conn,
        scripts_lost: Arc<AtomicU64>,
        metrics: Metrics,
    ) -> Durability {
        let epoch = RedisEpoch::start(conn.clone(), scripts_lost, metrics.clone()).await;
        check_aof(cfg, &conn, &metrics).await;
        info!(
            mode = cfg.durability.label(),
            "offsets are committed once a batch is durable in Redis by redis.durability"
        );
        Durability {
            mode: cfg.durability,
            fsync_horizon: cfg.fsync_horizon.0,
            replicas: cfg.replicas,
            wait_timeout: cfg.wait_timeout.0,
            conn,
            epoch,
            metrics,
        }
    }

    /// Mode `replicas`: after a batch's writes (begun under `epoch`) were
    /// acknowledged, waits until `redis.replicas` replicas of every master
    /// have them. Other modes: nothing to wait for here.
    pub async fn confirm(&self, epoch: u64) -> Result<(), Shortfall> {
        if self.mode != Mode::Replicas {
            return Ok(());
        }
        let started = Instant::now();
        let mut c = self.conn.clone();
        // The same multiplexed connection as the writes: WAIT covers every
        // write this client made on each node. On a Cluster the client sends
        // it to every master and returns the smallest count.
        let r: Result<i64, _> = redis::cmd("WAIT")
            .arg(self.replicas)
            .arg(self.wait_timeout.as_millis() as u64)
            .query_async(&mut c)
            .await;
        self.metrics
            .durability_wait_seconds
            .observe(started.elapsed().as_secs_f64());
        let got = r.map_err(|e| Shortfall::Redis(e.into()))?;
        if got < i64::from(self.replicas) {
            return Err(Shortfall::Replicas {
                got,
                want: self.replicas,
            });
        }
        // A reconnect in between (a master restarted or failed over) would
        // make WAIT count only the new connection's writes.
        if self.epoch.current() != epoch {
            return Err(Shortfall::EpochChanged);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_of_a_node_and_of_a_cluster() {
        let a = Value::BulkString(b"# Server\r\nredis_version:7.0.15\r\nrun_id:bbb\r\n".to_vec());
        assert_eq!(run_ids(&a), Some(vec!["bbb".to_string()]));
        let b = Value::BulkString(b"run_id:aaa\r\n".to_vec());
        let m = Value::Map(vec![
            (Value::BulkString(b"n1".to_vec()), a.clone()),
            (Value::BulkString(b"n2".to_vec()), b),
        ]);
        assert_eq!(run_ids(&m), Some(vec!["aaa".into(), "bbb".into()]));
        assert_eq!(run_ids(&Value::BulkString(b"# Server\r\n".to_vec())), None);
    }

    #[test]
    fn info_fields_are_read_per_node_by_their_whole_name() {
        let on =
            Value::BulkString(b"# Persistence\r\naof_enabled:1\r\naof_enabled_x:0\r\n".to_vec());
        let off = Value::BulkString(b"aof_rewrite_in_progress:0\r\naof_enabled:0\r\n".to_vec());
        assert_eq!(info_field(&on, "aof_enabled"), Some(vec!["1".to_string()]));
        let m = Value::Map(vec![
            (Value::BulkString(b"n1".to_vec()), on),
            (Value::BulkString(b"n2".to_vec()), off),
        ]);
        assert_eq!(
            info_field(&m, "aof_enabled"),
            Some(vec!["1".to_string(), "0".to_string()])
        );
        assert_eq!(info_field(&m, "aof"), None, "a prefix is not the field");
    }

    #[test]
    fn a_verdict_needs_a_read_after_the_instant_and_the_same_epoch() {
        let e = RedisEpoch {
            epoch: Arc::new(AtomicU64::new(3)),
            link: None,
            scripts_lost: Arc::default(),
            seen: Arc::new(Mutex::new(Seen::default())),
            refused: Arc::default(),
        };
        let t = Instant::now();
        assert_eq!(e.verdict(3, t), Verdict::Unknown);
        e.lock().at = Some(t + Duration::from_millis(1));
        assert_eq!(e.verdict(3, t), Verdict::Same);
        assert_eq!(e.verdict(2, t), Verdict::Changed);
        assert_eq!(e.verdict(3, t + Duration::from_secs(1)), Verdict::Unknown);
        // A write that found Redis without lapse's script moves the epoch.
        e.scripts_lost.fetch_add(1, Ordering::SeqCst);
        assert_eq!(e.verdict(3, t), Verdict::Changed);
        assert_eq!(e.current(), 4);
    }
}
