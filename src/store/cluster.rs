//! The Redis Cluster connection, replaced when it stops answering.
//!
//! redis-rs 0.32's cluster client can stay stuck after a master dies: its
//! slot recovery waits for ever, every call times out, and when it falls back
//! to the seed nodes it knows only those it was built with, which may be the
//! dead master. A failover test saw that for minutes, long after the replica
//! had taken over. So every call is watched here: after
//! [`rebuild_after`] of nothing but connection failures, a new connection is
//! built from the configured seeds plus every node seen in the cluster, and
//! replaces the old one for all stores at once (they share this link).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{FromRedisValue, RedisError, RedisResult, Value};
use tracing::{debug, warn};

use crate::config::RedisConfig;
use crate::metrics::Metrics;

/// How long calls must have failed, and nothing succeeded, before the
/// connection is rebuilt: a few response timeouts, so a failover that the
/// client rides out by itself (about a second) never triggers it.
pub fn rebuild_after(cfg: &RedisConfig) -> Duration {
    (cfg.response_timeout.0 * 3).max(Duration::from_secs(5))
}

#[derive(Default)]
struct Health {
    /// The first failed call since the last success.
    failing_since: Option<Instant>,
    rebuilding: bool,
}

struct Inner {
    cfg: RedisConfig,
    tls: Option<redis::TlsCertificates>,
    conn: RwLock<ClusterConnection>,
    /// Connections replaced so far (see [`ClusterLink::generation`]).
    generation: AtomicU64,
    /// Seed URLs for a rebuild: the configured ones, then every node seen.
    seeds: Mutex<Vec<String>>,
    health: Mutex<Health>,
    metrics: Metrics,
}

/// A shared, replaceable connection to a Redis Cluster. Cheap to clone.
#[derive(Clone)]
pub struct ClusterLink {
    inner: Arc<Inner>,
}

impl ClusterLink {
    pub async fn connect(
        cfg: &RedisConfig,
        tls: Option<redis::TlsCertificates>,
        metrics: Metrics,
    ) -> RedisResult<ClusterLink> {
        let seeds = configured_seeds(cfg);
        let conn = open(cfg, tls.clone(), &seeds).await?;
        let link = ClusterLink {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                tls,
                conn: RwLock::new(conn),
                generation: AtomicU64::new(0),
                seeds: Mutex::new(seeds),
                health: Mutex::new(Health::default()),
                metrics,
            }),
        };
        link.learn_nodes().await;
        Ok(link)
    }

    /// The connection in use now (a handle: clones share its node connections).
    pub fn connection(&self) -> ClusterConnection {
        self.inner
            .conn
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How many times the connection was replaced. `WAIT` counts only the
    /// writes of the connection it is sent on, so the durability epoch moves
    /// with this: writes made before a replacement are never confirmed by a
    /// `WAIT` sent after it.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::SeqCst)
    }

    /// Notes how a call ended; starts a rebuild once calls have failed for
    /// [`rebuild_after`] with nothing succeeding.
    pub fn observe<T>(&self, r: &RedisResult<T>) {
        let mut h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(_) => h.failing_since = None,
            Err(e) if !is_connection_failure(e) => {}
            Err(_) => {
                let since = *h.failing_since.get_or_insert_with(Instant::now);
                if !h.rebuilding && since.elapsed() >= rebuild_after(&self.inner.cfg) {
                    h.rebuilding = true;
                    let link = self.clone();
                    tokio::spawn(async move { link.rebuild(since.elapsed()).await });
                }
            }
        }
    }

    async fn rebuild(&self, failing_for: Duration) {
        let seeds = self
            .inner
            .seeds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let opened = tokio::time::timeout(
            self.inner.cfg.connect_timeout.0 * 2 + self.inner.cfg.response_timeout.0,
            open(&self.inner.cfg, self.inner.tls.clone(), &seeds),
        )
        .await;
        match opened {
            Ok(Ok(conn)) => {
                *self.inner.conn.write().unwrap_or_else(|p| p.into_inner()) = conn;
                self.inner.generation.fetch_add(1, Ordering::SeqCst);
                self.inner.metrics.redis_cluster_reconnects.inc();
                warn!(
                    failing_for_s = failing_for.as_secs(),
                    seeds = seeds.len(),
                    "every Redis Cluster call failed for a while: replaced the cluster connection with a new one from the known nodes"
                );
                self.learn_nodes().await;
            }
            Ok(Err(e)) => {
                warn!(error = %e, seeds = seeds.len(), "could not open a new Redis Cluster connection from the known nodes; trying again while calls keep failing")
            }
            Err(_) => warn!(
                seeds = seeds.len(),
                "opening a new Redis Cluster connection timed out; trying again while calls keep failing"
            ),
        }
        let mut h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        h.rebuilding = false;
        // The next failure waits a full period again before another rebuild.
        h.failing_since = None;
    }

    /// The cluster's nodes (`CLUSTER SLOTS` of any node): its masters, or
    /// every master and replica.
    pub async fn nodes(&self, which: Nodes) -> RedisResult<Vec<(String, u16)>> {
        let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        let r = self
            .connection()
            .route_command(redis::cmd("CLUSTER").arg("SLOTS"), any)
            .await;
        self.observe(&r);
        cluster_nodes(r?, which)
    }

    /// Adds every node of the cluster (masters and replicas, `CLUSTER SLOTS`)
    /// to the seeds of a rebuild: a replica promoted after its master died is
    /// then a seed too.
    async fn learn_nodes(&self) {
        match self.nodes(Nodes::All).await {
            Ok(nodes) => {
                let scheme = scheme(&self.inner.cfg.url);
                let mut seeds = self.inner.seeds.lock().unwrap_or_else(|p| p.into_inner());
                for (host, port) in nodes {
                    let url = format!("{scheme}://{host}:{port}");
                    if !seeds.contains(&url) {
                        seeds.push(url);
                    }
                }
            }
            Err(e) => debug!(error = %e, "CLUSTER SLOTS failed; the seeds stay as configured"),
        }
    }
}

/// `redis.url` then `redis.cluster_nodes`.
fn configured_seeds(cfg: &RedisConfig) -> Vec<String> {
    let mut nodes = vec![cfg.url.clone()];
    nodes.extend(cfg.cluster_nodes.iter().cloned());
    nodes
}

fn scheme(url: &str) -> &str {
    url.split_once("://").map_or("redis", |(s, _)| s)
}

async fn open(
    cfg: &RedisConfig,
    tls: Option<redis::TlsCertificates>,
    seeds: &[String],
) -> RedisResult<ClusterConnection> {
    let mut b = ClusterClientBuilder::new(seeds.to_vec())
        .connection_timeout(cfg.connect_timeout.0)
        .response_timeout(cfg.response_timeout.0);
    if let Some(u) = &cfg.username {
        b = b.username(u.clone());
    }
    if let Some(p) = &cfg.password {
        b = b.password(p.expose().to_owned());
    }
    if let Some(certs) = tls {
        b = b.certs(certs);
    }
    b.build()?.get_async_connection().await
}

/// Failures a new connection may cure: time-outs, refused or dropped
/// connections, no connection for a slot. Not replies Redis sent (NOSCRIPT,
/// NOPERM, a CAS conflict is not even an error).
fn is_connection_failure(e: &RedisError) -> bool {
    e.is_timeout()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
}

/// Which nodes of a `CLUSTER SLOTS` reply to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nodes {
    Masters,
    All,
}

/// The nodes (`host`, `port`) in a `CLUSTER SLOTS` reply, each once in order
/// of appearance: per slot range, the master then its replicas.
pub fn cluster_nodes(v: Value, which: Nodes) -> RedisResult<Vec<(String, u16)>> {
    let ranges: Vec<Vec<Value>> = FromRedisValue::from_owned_redis_value(v)?;
    let per_range = match which {
        Nodes::Masters => 1,
        Nodes::All => usize::MAX,
    };
    let mut out: Vec<(String, u16)> = Vec::new();
    for r in ranges {
        for node in r.into_iter().skip(2).take(per_range) {
            let node: Vec<Value> = FromRedisValue::from_owned_redis_value(node)?;
            let mut it = node.into_iter();
            let (Some(host), Some(port)) = (it.next(), it.next()) else {
                continue;
            };
            let host: String = FromRedisValue::from_owned_redis_value(host)?;
            let port: u16 = FromRedisValue::from_owned_redis_value(port)?;
            if !host.is_empty() && !out.contains(&(host.clone(), port)) {
                out.push((host, port));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn every_master_and_replica_of_cluster_slots_is_a_node_once() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("10.0.0.2", 7001),
            ]),
            // A second range of the first master: listed once.
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(16383),
                node("10.0.0.1", 7000),
                node("", 7005),
            ]),
        ]);
        assert_eq!(
            cluster_nodes(reply.clone(), Nodes::All).unwrap(),
            vec![
                ("10.0.0.1".to_string(), 7000),
                ("10.0.0.4".to_string(), 7003),
                ("10.0.0.2".to_string(), 7001),
            ]
        );
        assert_eq!(
            cluster_nodes(reply, Nodes::Masters).unwrap(),
            vec![
                ("10.0.0.1".to_string(), 7000),
                ("10.0.0.2".to_string(), 7001),
            ]
        );
    }

    #[test]
    fn only_failures_a_new_connection_may_cure_count() {
        let timeout = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let no_conn = RedisError::from((
            redis::ErrorKind::ClusterConnectionNotFound,
            "No connections found",
        ));
        let noscript = RedisError::from((redis::ErrorKind::NoScriptError, "NOSCRIPT"));
        let noperm = RedisError::from((redis::ErrorKind::ResponseError, "NOPERM"));
        assert!(is_connection_failure(&timeout));
        assert!(is_connection_failure(&refused));
        assert!(is_connection_failure(&no_conn));
        assert!(!is_connection_failure(&noscript));
        assert!(!is_connection_failure(&noperm));
    }

    #[test]
    fn the_rebuild_waits_a_few_response_timeouts_and_at_least_5_s() {
        let mut cfg = RedisConfig::default();
        assert_eq!(rebuild_after(&cfg), Duration::from_secs(6));
        cfg.response_timeout = crate::config::Dur::ms(500);
        assert_eq!(rebuild_after(&cfg), Duration::from_secs(5));
        assert_eq!(scheme("rediss://h:1"), "rediss");
        assert_eq!(scheme("h:1"), "redis");
    }
}
