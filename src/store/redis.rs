//! The Redis state store, the [`Backend`] of keyed records in production: one
//! pipelined round trip to load a batch of records, one to write them back
//! through a compare-and-set script.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;

use super::blob;
use super::cluster::ClusterLink;
use super::keys::Keys;
use super::record::{self, Backend, CampaignId, CasWrite};
use super::slots;
use crate::config::RedisConfig;
use crate::domain::campaign::CampaignState;
use crate::domain::event::CustomerRef;
use crate::domain::state::CustomerState;
use crate::error::StoreError;
use crate::metrics::Metrics;

/// Compare-and-set of `#KEYS` values in one call: `KEYS[i]` is written with
/// `ARGV[2i]` only if its stored revision equals `ARGV[2i-1]` (0 = absent).
/// Returns one 1 (written) or 0 (conflict: another writer got there first) per
/// key. Reads only the revision prefix (GETRANGE), not the whole value, and
/// takes many keys per call: the per-call cost of a script was most of Redis'
/// CPU when it ran once per customer.
const CAS_SCRIPT: &str = r#"
local out = {}
for i = 1, #KEYS do
  local cur = redis.call('GETRANGE', KEYS[i], 0, 20)
  local rev = 0
  local r = string.match(cur, '^(%d+):')
  if r then rev = tonumber(r) end
  if rev == tonumber(ARGV[2 * i - 1]) then
    redis.call('SET', KEYS[i], ARGV[2 * i])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"#;

/// Keys per CAS call on a single node (bounds how long one call holds Redis).
const CAS_KEYS_PER_CALL: usize = 64;

/// With a `rediss://` URL and a CA or client certificate configured: the PEM
/// files, read now (a file that cannot be read names its key). None: plain
/// TCP, or TLS checked against the system's trust store.
fn tls_certificates(cfg: &RedisConfig) -> Result<Option<redis::TlsCertificates>, StoreError> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| StoreError::Config(format!("{key}: cannot read {}: {e}", path.display())))
    };
    if cfg.tls_ca_file.is_none() && cfg.tls_cert_file.is_none() {
        return Ok(None);
    }
    let root_cert = match &cfg.tls_ca_file {
        Some(p) => Some(read("redis.tls_ca_file", p)?),
        None => None,
    };
    let client_tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
            client_cert: read("redis.tls_cert_file", c)?,
            client_key: read("redis.tls_key_file", k)?,
        }),
        _ => None,
    };
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// A single node (auto-reconnecting) or a Redis Cluster (replaced when it
/// stops answering, see `cluster.rs`).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterLink),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(link) => {
                let link = link.clone();
                Box::pin(async move {
                    let r = link.connection().req_packed_command(cmd).await;
                    link.observe(&r);
                    r
                })
            }
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(link) => {
                let link = link.clone();
                Box::pin(async move {
                    let r = link
                        .connection()
                        .req_packed_commands(cmd, offset, count)
                        .await;
                    link.observe(&r);
                    r
                })
            }
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(link) => link.connection().get_db(),
        }
    }
}

/// A customer's state as read, with the revision to compare against on write.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub rev: u64,
    pub state: CustomerState,
}

#[derive(Clone)]
pub struct StateStore {
    conn: Conn,
    keys: Keys,
    /// The shared copy of the CAS script (the same text for every lapse).
    cas_sha: String,
    scripts: Arc<Scripts>,
    metrics: Metrics,
}

/// This process's copies of the CAS script ([`WriteToken`]s) and how often
/// Redis was found without a script.
struct Scripts {
    /// Random per process: no other lapse loads this process's copies.
    instance: u64,
    issued: AtomicU64,
    lost: Arc<AtomicU64>,
}

/// A copy of the CAS script of this process's own (its text carries a
/// process-unique comment), loaded once and never again. Redis keeps scripts
/// in memory only, so after a restart or a failover its first call answers
/// `NOSCRIPT` and writes nothing: writes made through a token can never land
/// on a Redis that lost acknowledged writes before lapse knows
/// ([`StoreError::ScriptsLost`]), whoever else reloaded their scripts.
#[derive(Clone, Debug)]
pub struct WriteToken {
    sha: Arc<str>,
}

/// A [`StateStore`] whose compare-and-set writes go through a [`WriteToken`].
pub struct Tokened {
    store: StateStore,
    token: WriteToken,
}

impl StateStore {
    pub async fn connect(cfg: &RedisConfig, metrics: Metrics) -> Result<StateStore, StoreError> {
        let tls = tls_certificates(cfg)?;
        let conn = if cfg.cluster || !cfg.cluster_nodes.is_empty() {
            Conn::Cluster(ClusterLink::connect(cfg, tls, metrics.clone()).await?)
        } else {
            let mut info = redis::IntoConnectionInfo::into_connection_info(cfg.url.as_str())?;
            if cfg.username.is_some() {
                info.redis.username = cfg.username.clone();
            }
            if let Some(p) = &cfg.password {
                info.redis.password = Some(p.expose().to_owned());
            }
            let client = match tls {
                Some(certs) => redis::Client::build_with_tls(info, certs)?,
                None => redis::Client::open(info)?,
            };
            let mcfg = ConnectionManagerConfig::new()
                .set_connection_timeout(cfg.connect_timeout.0)
                .set_response_timeout(cfg.response_timeout.0)
                .set_number_of_retries(1);
            Conn::Single(ConnectionManager::new_with_config(client, mcfg).await?)
        };
        let store = StateStore {
            conn,
            keys: Keys::new(cfg.key_prefix.clone()),
            cas_sha: redis::Script::new(CAS_SCRIPT).get_hash().to_string(),
            scripts: Arc::new(Scripts {
                instance: rand::random(),
                issued: AtomicU64::new(0),
                lost: Arc::default(),
            }),
            metrics,
        };
        store.load_scripts().await?;
        Ok(store)
    }

    /// The shared connection, for other stores (timers, gauges).
    pub fn conn(&self) -> Conn {
        self.conn.clone()
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// How many times Redis answered `NOSCRIPT` (it restarted, failed over
    /// or flushed its scripts): a move of the durability epoch.
    pub fn scripts_lost(&self) -> Arc<AtomicU64> {
        self.scripts.lost.clone()
    }

    /// Loads a new [`WriteToken`].
    pub async fn write_token(&self) -> Result<WriteToken, StoreError> {
        let n = self.scripts.issued.fetch_add(1, Ordering::SeqCst);
        let text = format!(
            "{CAS_SCRIPT}-- write token {:016x}.{n}\n",
            self.scripts.instance
        );
        let sha = self.load_script(&text).await?;
        Ok(WriteToken { sha: sha.into() })
    }

    /// This store, its writes through `token`.
    pub fn with_token(&self, token: WriteToken) -> Tokened {
        Tokened {
            store: self.clone(),
            token,
        }
    }

    /// Loads the shared copy of the script (again after a Redis restart lost it).
    async fn load_scripts(&self) -> Result<(), StoreError> {
        let sha = self.load_script(CAS_SCRIPT).await?;
        debug_assert_eq!(sha, self.cas_sha);
        Ok(())
    }

    /// `SCRIPT LOAD` of `text` (on a Cluster, every node); returns its SHA.
    async fn load_script(&self, text: &str) -> Result<String, StoreError> {
        let mut c = self.conn.clone();
        Ok(redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(text)
            .query_async(&mut c)
            .await?)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    fn observe<T>(&self, op: &'static str, started: Instant, r: &Result<T, redis::RedisError>) {
        self.metrics
            .redis_call_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        if r.is_err() {
            self.metrics.redis_errors.with_label_values(&[op]).inc();
        }
    }

    /// Raw stored bytes of a customer (for `inspect` and byte-level tests).
    pub async fn raw(&self, c: &CustomerRef) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.conn.clone();
        let v: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.keys.state(c))
            .query_async(&mut conn)
            .await?;
        Ok(v)
    }

    pub async fn load(&self, c: &CustomerRef) -> Result<Option<Loaded>, StoreError> {
        match self.raw(c).await? {
            None => Ok(None),
            Some(bytes) => {
                let (rev, state) = blob::decode(&bytes).map_err(|reason| StoreError::Corrupt {
                    key: self.keys.state(c),
                    reason,
                })?;
                Ok(Some(Loaded { rev, state }))
            }
        }
    }

    /// Loads many customers in one pipelined round trip; absent ones are empty at revision 0.
    pub async fn load_many(&self, customers: &[&CustomerRef]) -> Result<Vec<Loaded>, StoreError> {
        let loaded = record::load::<CustomerState, _>(self, customers).await?;
        Ok(loaded
            .into_iter()
            .map(|(rev, state)| Loaded { rev, state: *state })
            .collect())
    }

    /// Writes each state if its revision is unchanged since load. Returns, per
    /// write, whether it landed (false = conflict: reload and re-apply).
    pub async fn save_many(
        &self,
        writes: &[(&CustomerRef, u64, &CustomerState)],
    ) -> Result<Vec<bool>, StoreError> {
        record::save(self, writes).await
    }

    /// Loads campaign states (absent: empty at revision 0) in one round trip.
    pub async fn load_campaigns(
        &self,
        ids: &[(&str, &str)],
    ) -> Result<Vec<(u64, CampaignState)>, StoreError> {
        let ids: Vec<CampaignId> = ids
            .iter()
            .map(|(t, c)| (t.to_string(), c.to_string()))
            .collect();
        let refs: Vec<&CampaignId> = ids.iter().collect();
        let loaded = record::load(self, &refs).await?;
        Ok(loaded.into_iter().map(|(rev, c)| (rev, *c)).collect())
    }

    /// Compare-and-set writes of campaign states; true where the write landed.
    pub async fn save_campaigns(
        &self,
        writes: &[((&str, &str), u64, &CampaignState)],
    ) -> Result<Vec<bool>, StoreError> {
        let ids: Vec<CampaignId> = writes
            .iter()
            .map(|((t, c), _, _)| (t.to_string(), c.to_string()))
            .collect();
        let writes: Vec<(&CampaignId, u64, &CampaignState)> = ids
            .iter()
            .zip(writes)
            .map(|(id, (_, rev, st))| (id, *rev, *st))
            .collect();
        record::save(self, &writes).await
    }

    /// Values of `keys` in one pipelined round trip.
    async fn get_values(
        &self,
        op: &'static str,
        keys: &[String],
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(vec![]);
        }
        let cmds: Vec<(&str, Cmd)> = keys
            .iter()
            .map(|k| {
                let mut get = redis::cmd("GET");
                get.arg(k);
                (k.as_str(), get)
            })
            .collect();
        let started = Instant::now();
        let r = slots::pipelined(&self.conn, cmds).await;
        self.observe(op, started, &r);
        Ok(r?)
    }

    /// Compare-and-set writes through the script, in one pipelined round trip
    /// per slot group (see [`StateStore::cas_calls`]). If Redis lost the
    /// script (restart, SCRIPT FLUSH, failover) nothing was written: the
    /// shared copy is reloaded and the writes retried once (the CAS makes it
    /// safe), a token's copy fails with [`StoreError::ScriptsLost`].
    async fn cas(
        &self,
        op: &'static str,
        items: &[CasWrite],
        token: Option<&WriteToken>,
    ) -> Result<Vec<bool>, StoreError> {
        if items.is_empty() {
            return Ok(vec![]);
        }
        let sha = token.map_or(self.cas_sha.as_str(), |t| &t.sha);
        for attempt in 0..2 {
            // Built again for the rare second attempt: the calls move into the pipeline.
            let (calls, order) = self.cas_calls(sha, items);
            let started = Instant::now();
            let r: Result<Vec<Vec<i64>>, _> = slots::pipelined(&self.conn, calls).await;
            self.observe(op, started, &r);
            match r {
                Ok(v) => {
                    let mut out = vec![false; items.len()];
                    for (i, x) in order.iter().zip(v.into_iter().flatten()) {
                        out[*i] = x == 1;
                    }
                    return Ok(out);
                }
                Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                    self.scripts.lost.fetch_add(1, Ordering::SeqCst);
                    if token.is_some() {
                        return Err(StoreError::ScriptsLost);
                    }
                    if attempt > 0 {
                        return Err(e.into());
                    }
                    self.load_scripts().await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// The CAS calls for `(key, expected revision, new value)` writes, each
    /// routed by its first key, and the index in `items` of each key in call
    /// order: up to [`CAS_KEYS_PER_CALL`] keys per call, all of one slot group
    /// ([`slots::groups`]: everything on a single node, one hash slot on a
    /// Cluster, where a script's keys must share a slot).
    fn cas_calls<'i>(&self, sha: &str, items: &'i [CasWrite]) -> (Vec<(&'i str, Cmd)>, Vec<usize>) {
        let keys: Vec<&str> = items.iter().map(|(k, _, _)| k.as_str()).collect();
        let mut calls = Vec::new();
        let mut order = Vec::with_capacity(items.len());
        for group in slots::groups(&self.conn, &keys) {
            for chunk in group.chunks(CAS_KEYS_PER_CALL) {
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(sha).arg(chunk.len());
                for &i in chunk {
                    cmd.arg(&items[i].0);
                }
                for &i in chunk {
                    cmd.arg(items[i].1).arg(&items[i].2);
                }
                calls.push((items[chunk[0]].0.as_str(), cmd));
                order.extend_from_slice(chunk);
            }
        }
        (calls, order)
    }

    /// Deletes every key of one customer (operator tooling and tests).
    pub async fn delete(&self, c: &CustomerRef) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: i64 = redis::cmd("DEL")
            .arg(self.keys.state(c))
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

impl Backend for StateStore {
    fn keys(&self) -> &Keys {
        &self.keys
    }

    fn get_many<'s>(
        &'s self,
        op: &'static str,
        keys: &'s [String],
    ) -> BoxFuture<'s, Result<Vec<Option<Vec<u8>>>, StoreError>> {
        Box::pin(self.get_values(op, keys))
    }

    fn cas_many<'s>(
        &'s self,
        op: &'static str,
        writes: &'s [CasWrite],
    ) -> BoxFuture<'s, Result<Vec<bool>, StoreError>> {
        Box::pin(self.cas(op, writes, None))
    }
}

impl Backend for Tokened {
    fn keys(&self) -> &Keys {
        &self.store.keys
    }

    fn get_many<'s>(
        &'s self,
        op: &'static str,
        keys: &'s [String],
    ) -> BoxFuture<'s, Result<Vec<Option<Vec<u8>>>, StoreError>> {
        Box::pin(self.store.get_values(op, keys))
    }

    fn cas_many<'s>(
        &'s self,
        op: &'static str,
        writes: &'s [CasWrite],
    ) -> BoxFuture<'s, Result<Vec<bool>, StoreError>> {
        Box::pin(self.store.cas(op, writes, Some(&self.token)))
    }
}
