//! Due-time timers in Redis: when each customer's next recall stage is due.
//!
//! # Layout
//!
//! `timer_shards` sorted sets `PREFIX:{timers:N}:due` (N in `0..shards`; the hash
//! tag puts each shard in one Redis Cluster slot, and different shards in
//! different slots). A customer is in shard `fnv1a64("tenant/customer") % shards`,
//! as member `tenant/customer` with score = due time in ms. A customer has at most
//! one timer: `ZADD` replaces its score.
//!
//! # Claiming with a lease
//!
//! [`TimerStore::claim_due`] atomically (one Lua script, one key) takes up to
//! `limit` members with score ≤ now and re-scores them to `now + lease_ms`. While
//! the lease runs nobody else can claim them; if the claimer dies, the timer is
//! simply due again when the lease ends and another instance claims it — a
//! crash never loses a timer. The claimer then [`TimerStore::complete`]s each
//! timer, which removes or re-schedules it **only if its score is still the lease
//! score it claimed** (else someone re-scheduled it meanwhile, e.g. a visit on
//! the event path, and that newer schedule wins).
//!
//! # Changing the shard count
//!
//! Changing `timers.shards` moves customers to other shards. Nothing is
//! orphaned: the timer loop first runs [`TimerStore::migrate_orphans`], which moves every timer of a
//! shard at or beyond the new count into its customer's shard, and a timer
//! claimed from a shard that is no longer its customer's (shards added) is
//! moved there instead of fired ([`TimerStore::claim_due_many`]), so it fires
//! from the shard its completion looks in. Moves keep the earlier due time
//! when the customer has a timer in both places (`ZADD LT`: firing early only
//! re-evaluates the customer).

use redis::{Cmd, ErrorKind, FromRedisValue};

use super::redis::Conn;
use super::slots::{self, Topology};
use crate::domain::event::CustomerRef;
use crate::error::StoreError;

/// Takes up to ARGV[3] members due at ARGV[1] and leases them until ARGV[2].
/// Returns `[member, due, member, due, ...]`, oldest first.
const CLAIM_SCRIPT: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[3]))
for i = 1, #due, 2 do
  redis.call('ZADD', KEYS[1], ARGV[2], due[i])
end
return due
"#;

/// If member ARGV[1] still has score ARGV[2] (the lease it was claimed with):
/// removes it (ARGV[3] empty) or re-schedules it to ARGV[3]. Returns 1 when
/// applied, 0 when the timer changed since the claim (left as it is).
const COMPLETE_SCRIPT: &str = r#"
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not s) or tonumber(s) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
end
return 1
"#;

/// Most shards allowed (each is one sorted set to poll).
pub const MAX_SHARDS: u32 = 1024;

/// Timers moved per round trip by [`TimerStore::migrate_orphans`].
const MIGRATE_PAGE: isize = 1000;

/// The shard of a customer: FNV-1a 64 of `tenant/customer`, mod `shards`.
/// Stable across versions and instances (stored data depends on it).
pub fn shard_of(c: &CustomerRef, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = c
        .tenant
        .bytes()
        .chain(std::iter::once(b'/'))
        .chain(c.customer.bytes());
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as u32
}

/// A timer taken by [`TimerStore::claim_due`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub customer: CustomerRef,
    /// Its due time before the claim, ms (firing lag = now − due_ms).
    pub due_ms: i64,
    /// The score it holds while leased: pass it to [`TimerStore::complete`].
    pub lease: i64,
}

/// Sharded due-time timers. Cheap to clone.
#[derive(Clone)]
pub struct TimerStore<C = Conn> {
    conn: C,
    prefix: String,
    shards: u32,
    claim_sha: String,
    complete_sha: String,
}

impl<C> TimerStore<C>
where
    C: Topology,
{
    /// A store over `conn` with keys under `prefix` (`redis.key_prefix`) and
    /// `shards` shards (1..=[`MAX_SHARDS`]). Loads the scripts.
    pub async fn new(
        conn: C,
        prefix: impl Into<String>,
        shards: u32,
    ) -> Result<TimerStore<C>, StoreError> {
        assert!(
            (1..=MAX_SHARDS).contains(&shards),
            "timer shards must be between 1 and {MAX_SHARDS} (validate the config first)"
        );
        let store = TimerStore {
            conn,
            prefix: prefix.into(),
            shards,
            claim_sha: redis::Script::new(CLAIM_SCRIPT).get_hash().to_string(),
            complete_sha: redis::Script::new(COMPLETE_SCRIPT).get_hash().to_string(),
        };
        store.load_scripts().await?;
        Ok(store)
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard of a customer.
    pub fn shard(&self, c: &CustomerRef) -> u32 {
        shard_of(c, self.shards)
    }

    /// The sorted set of shard `n`: `PREFIX:{timers:N}:due`.
    pub fn key(&self, shard: u32) -> String {
        format!("{}:{{timers:{shard}}}:due", self.prefix)
    }

    async fn load_scripts(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        for src in [CLAIM_SCRIPT, COMPLETE_SCRIPT] {
            let _: String = redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(src)
                .query_async(&mut c)
                .await?;
        }
        Ok(())
    }

    /// Runs an EVALSHA command (or a pipeline of them), reloading the scripts
    /// once if Redis lost them (restart, SCRIPT FLUSH, failover).
    async fn eval<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        match cmd.query_async::<T>(&mut conn).await {
            Err(e) if e.kind() == ErrorKind::NoScriptError => {
                self.load_scripts().await?;
                Ok(cmd.query_async(&mut conn).await?)
            }
            r => Ok(r?),
        }
    }

    /// Sets (or replaces) the due time of each customer's timer, in one pipelined
    /// round trip (one ZADD per shard). A later entry for the same customer wins.
    pub async fn schedule(&self, timers: &[(&CustomerRef, i64)]) -> Result<(), StoreError> {
        self.schedule_with(timers, &[]).await?;
        Ok(())
    }

    /// One `ZADD <flags>` per shard, pipelined; returns each one's reply (members added).
    async fn schedule_with(
        &self,
        timers: &[(&CustomerRef, i64)],
        flags: &[&str],
    ) -> Result<Vec<usize>, StoreError> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        let mut by_shard: Vec<Vec<(i64, String)>> = vec![Vec::new(); self.shards as usize];
        for (c, due) in timers {
            by_shard[self.shard(c) as usize].push((*due, c.key()));
        }
        let cmds: Vec<(String, Cmd)> = by_shard
            .iter()
            .enumerate()
            .filter(|(_, items)| !items.is_empty())
            .map(|(shard, items)| {
                let key = self.key(shard as u32);
                let cmd = redis::cmd("ZADD").arg(&key).arg(flags).arg(items).clone();
                (key, cmd)
            })
            .collect();
        Ok(slots::pipelined(&self.conn, cmds).await?)
    }

    /// Removes the timers of these customers (absent ones are fine).
    pub async fn cancel(&self, customers: &[&CustomerRef]) -> Result<(), StoreError> {
        if customers.is_empty() {
            return Ok(());
        }
        let mut by_shard: Vec<Vec<String>> = vec![Vec::new(); self.shards as usize];
        for c in customers {
            by_shard[self.shard(c) as usize].push(c.key());
        }
        let cmds: Vec<(String, Cmd)> = by_shard
            .iter()
            .enumerate()
            .filter(|(_, members)| !members.is_empty())
            .map(|(shard, members)| self.zrem(shard as u32, members))
            .collect();
        slots::pipelined::<_, redis::Value>(&self.conn, cmds).await?;
        Ok(())
    }

    /// Atomically takes up to `limit` timers of `shard` due at `now_ms` (oldest
    /// first) and leases them until `now_ms + lease_ms`: nobody else can claim
    /// them before that; after it, they are due again (crash recovery). Complete
    /// each one with [`complete`](Self::complete).
    pub async fn claim_due(
        &self,
        shard: u32,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Claimed>, StoreError> {
        let mut per_shard = self
            .claim_due_many(&[shard], now_ms, lease_ms, limit)
            .await?;
        Ok(per_shard.pop().unwrap_or_default())
    }

    /// [`claim_due`](Self::claim_due) for several shards in one pipelined round
    /// trip (each shard's claim is still one atomic script on its own key).
    /// Returns the claims per shard, in the order of `shards`.
    pub async fn claim_due_many(
        &self,
        shards: &[u32],
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
    ) -> Result<Vec<Vec<Claimed>>, StoreError> {
        if limit == 0 || shards.is_empty() {
            return Ok(vec![Vec::new(); shards.len()]);
        }
        let lease = now_ms.saturating_add(lease_ms.max(1));
        let cmds: Vec<(String, Cmd)> = shards
            .iter()
            .map(|shard| {
                let key = self.key(*shard);
                let mut cmd = redis::cmd("EVALSHA");
                cmd.arg(&self.claim_sha)
                    .arg(1)
                    .arg(&key)
                    .arg(now_ms)
                    .arg(lease)
                    .arg(limit);
                (key, cmd)
            })
            .collect();
        let flats: Vec<Vec<String>> = self.eval_pipe(&cmds).await?;
        let mut out = Vec::with_capacity(shards.len());
        let mut garbage: Vec<(u32, Vec<String>)> = Vec::new();
        let mut misplaced: Vec<(u32, CustomerRef, i64)> = Vec::new();
        for (shard, flat) in shards.iter().zip(flats) {
            let mut claimed = Vec::with_capacity(flat.len() / 2);
            let mut bad = Vec::new();
            for pair in flat.chunks_exact(2) {
                let due = pair[1].parse::<f64>().ok().map(|f| f as i64);
                match (CustomerRef::parse(&pair[0]), due) {
                    // Scheduled under another shard count: its completion would
                    // look in its customer's shard and miss it (claimed again
                    // after every lease). Moved there, fired from there.
                    (Some(customer), Some(due_ms)) if self.shard(&customer) != *shard => {
                        misplaced.push((*shard, customer, due_ms));
                    }
                    (Some(customer), Some(due_ms)) => claimed.push(Claimed {
                        customer,
                        due_ms,
                        lease,
                    }),
                    // Not written by `schedule`: drop it, or it would be claimed forever.
                    _ => bad.push(pair[0].clone()),
                }
            }
            if !bad.is_empty() {
                garbage.push((*shard, bad));
            }
            out.push(claimed);
        }
        if !garbage.is_empty() {
            let cmds: Vec<(String, Cmd)> = garbage
                .iter()
                .map(|(shard, members)| self.zrem(*shard, members))
                .collect();
            slots::pipelined::<_, redis::Value>(&self.conn, cmds).await?;
        }
        if !misplaced.is_empty() {
            // Into the right shard first, then out of the wrong one while it
            // still holds our lease: a crash in between leaves a copy, never none.
            let moves: Vec<(&CustomerRef, i64)> =
                misplaced.iter().map(|(_, c, d)| (c, *d)).collect();
            self.schedule_with(&moves, &["LT"]).await?;
            let cmds: Vec<(String, Cmd)> = misplaced
                .iter()
                .map(|(shard, c, _)| {
                    let key = self.key(*shard);
                    (key.clone(), self.complete_cmd_in(&key, c, lease, None))
                })
                .collect();
            self.eval_pipe::<i64>(&cmds).await?;
            tracing::info!(
                timers = misplaced.len(),
                shards = self.shards,
                "moved timers scheduled under another timers.shards into their customers' shards"
            );
        }
        Ok(out)
    }

    /// Moves every timer of the shards at or beyond the configured count (left
    /// by a larger `timers.shards`, and no longer polled) into its customer's
    /// shard. Run at start-up; idempotent. Returns how many timers moved.
    pub async fn migrate_orphans(&self) -> Result<usize, StoreError> {
        let orphans: Vec<u32> = (self.shards..MAX_SHARDS).collect();
        let cmds: Vec<(String, Cmd)> = orphans
            .iter()
            .map(|s| {
                let key = self.key(*s);
                (key.clone(), redis::cmd("ZCARD").arg(&key).clone())
            })
            .collect();
        let sizes: Vec<usize> = slots::pipelined(&self.conn, cmds).await?;
        let mut moved = 0;
        for (shard, _) in orphans.iter().zip(sizes).filter(|(_, n)| *n > 0) {
            let key = self.key(*shard);
            let mut conn = self.conn.clone();
            loop {
                let page: Vec<(String, f64)> = redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(MIGRATE_PAGE - 1)
                    .arg("WITHSCORES")
                    .query_async(&mut conn)
                    .await?;
                if page.is_empty() {
                    break;
                }
                let parsed: Vec<(CustomerRef, i64)> = page
                    .iter()
                    .filter_map(|(m, due)| Some((CustomerRef::parse(m)?, *due as i64)))
                    .collect();
                let moves: Vec<(&CustomerRef, i64)> = parsed.iter().map(|(c, d)| (c, *d)).collect();
                self.schedule_with(&moves, &["LT"]).await?;
                let members: Vec<String> = page.into_iter().map(|(m, _)| m).collect();
                let (_, zrem) = self.zrem(*shard, &members);
                let _: usize = zrem.query_async(&mut conn).await?;
                moved += parsed.len();
            }
        }
        if moved > 0 {
            tracing::info!(
                timers = moved,
                shards = self.shards,
                "moved timers from shards beyond timers.shards into their customers' shards"
            );
        }
        Ok(moved)
    }

    /// Schedules each customer's timer unless it has one already (`ZADD NX`):
    /// for states that predate their timer. With `dry_run`, only counts them.
    /// Returns how many customers had no timer.
    pub async fn schedule_missing(
        &self,
        timers: &[(&CustomerRef, i64)],
        dry_run: bool,
    ) -> Result<usize, StoreError> {
        if !dry_run {
            let added: Vec<usize> = self.schedule_with(timers, &["NX"]).await?;
            return Ok(added.iter().sum());
        }
        let cmds: Vec<(String, Cmd)> = timers
            .iter()
            .map(|(c, _)| {
                let key = self.key(self.shard(c));
                (
                    key.clone(),
                    redis::cmd("ZSCORE").arg(&key).arg(c.key()).clone(),
                )
            })
            .collect();
        let scores: Vec<Option<f64>> = slots::pipelined(&self.conn, cmds).await?;
        Ok(scores.iter().filter(|s| s.is_none()).count())
    }

    /// Finishes a claimed timer: removes it (`next_due` None) or re-schedules it
    /// to `next_due`, but only if it still holds the lease score `lease` it was
    /// claimed with. Returns false (and changes nothing) when it was re-scheduled
    /// or cancelled meanwhile, or its lease ran out and another claimer took it.
    pub async fn complete(
        &self,
        customer: &CustomerRef,
        lease: i64,
        next_due: Option<i64>,
    ) -> Result<bool, StoreError> {
        let cmd = self.complete_cmd(customer, lease, next_due);
        let applied: i64 = self.eval(&cmd).await?;
        Ok(applied == 1)
    }

    /// [`complete`](Self::complete) for many timers in one pipelined round trip.
    /// Returns, per entry, whether it was applied.
    pub async fn complete_many(
        &self,
        done: &[(&CustomerRef, i64, Option<i64>)],
    ) -> Result<Vec<bool>, StoreError> {
        if done.is_empty() {
            return Ok(vec![]);
        }
        let cmds: Vec<(String, Cmd)> = done
            .iter()
            .map(|(c, lease, next)| (self.key(self.shard(c)), self.complete_cmd(c, *lease, *next)))
            .collect();
        let v: Vec<i64> = self.eval_pipe(&cmds).await?;
        Ok(v.into_iter().map(|x| x == 1).collect())
    }

    /// Runs EVALSHA commands ([`slots::pipelined`]: one pipeline, or one per
    /// slot on a Cluster), reloading the scripts once if Redis lost them. Scripts are lost all at once (restart, flush, failover), so the
    /// whole pipeline failed and re-running it whole repeats nothing; if a flush
    /// ever landed mid-pipeline, a re-run claim only leaves some timers leased
    /// until their lease ends, and a re-run complete reports "lost lease".
    async fn eval_pipe<T: FromRedisValue>(
        &self,
        cmds: &[(String, Cmd)],
    ) -> Result<Vec<T>, StoreError> {
        match slots::pipelined(&self.conn, cmds.to_vec()).await {
            Err(e) if e.kind() == ErrorKind::NoScriptError => {
                self.load_scripts().await?;
                Ok(slots::pipelined(&self.conn, cmds.to_vec()).await?)
            }
            r => Ok(r?),
        }
    }

    /// `ZREM` of `members` from shard `shard`, routed by the shard's key.
    fn zrem(&self, shard: u32, members: &[String]) -> (String, Cmd) {
        let key = self.key(shard);
        let cmd = redis::cmd("ZREM").arg(&key).arg(members).clone();
        (key, cmd)
    }

    fn complete_cmd(&self, c: &CustomerRef, lease: i64, next_due: Option<i64>) -> Cmd {
        self.complete_cmd_in(&self.key(self.shard(c)), c, lease, next_due)
    }

    fn complete_cmd_in(
        &self,
        key: &str,
        c: &CustomerRef,
        lease: i64,
        next_due: Option<i64>,
    ) -> Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.complete_sha)
            .arg(1)
            .arg(key)
            .arg(c.key())
            .arg(lease)
            .arg(next_due.map_or(String::new(), |d| d.to_string()));
        cmd
    }

    /// The score of a customer's timer (its due time, or its lease while claimed).
    pub async fn due_of(&self, c: &CustomerRef) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn.clone();
        let s: Option<f64> = redis::cmd("ZSCORE")
            .arg(self.key(self.shard(c)))
            .arg(c.key())
            .query_async(&mut conn)
            .await?;
        Ok(s.map(|f| f as i64))
    }

    /// Timers in a shard, leased ones included (gauge "timers pending").
    pub async fn pending(&self, shard: u32) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        let n: usize = redis::cmd("ZCARD")
            .arg(self.key(shard))
            .query_async(&mut conn)
            .await?;
        Ok(n)
    }

    /// Timers of a shard due at `now_ms` and not claimed (the backlog).
    pub async fn due_count(&self, shard: u32, now_ms: i64) -> Result<usize, StoreError> {
        let mut conn = self.conn.clone();
        let n: usize = redis::cmd("ZCOUNT")
            .arg(self.key(shard))
            .arg("-inf")
            .arg(now_ms)
            .query_async(&mut conn)
            .await?;
        Ok(n)
    }

    /// Over all shards in one round trip: timers scheduled (leased included) and
    /// timers due at `now_ms` and not claimed (the "pending" and "overdue" gauges).
    pub async fn counts(&self, now_ms: i64) -> Result<(usize, usize), StoreError> {
        let mut cmds: Vec<(String, Cmd)> = Vec::with_capacity(2 * self.shards as usize);
        for shard in 0..self.shards {
            let key = self.key(shard);
            cmds.push((key.clone(), redis::cmd("ZCARD").arg(&key).clone()));
            let zcount = redis::cmd("ZCOUNT")
                .arg(&key)
                .arg("-inf")
                .arg(now_ms)
                .clone();
            cmds.push((key, zcount));
        }
        let v: Vec<usize> = slots::pipelined(&self.conn, cmds).await?;
        let pending = v.iter().step_by(2).sum();
        let due = v.iter().skip(1).step_by(2).sum();
        Ok((pending, due))
    }

    /// The lowest score in a shard: the oldest due time (firing lag = now − it,
    /// when positive). Leased timers have future scores and do not count as late.
    pub async fn oldest_due(&self, shard: u32) -> Result<Option<i64>, StoreError> {
        let mut conn = self.conn.clone();
        let v: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(self.key(shard))
            .arg(0)
            .arg(0)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await?;
        Ok(v.first().map(|(_, s)| *s as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        let c = CustomerRef::new("brandA", "cust-1");
        // Golden (FNV-1a 64 of "brandA/cust-1" = 11465703666551126511): stored
        // timers depend on it, it must never change.
        assert_eq!(shard_of(&c, 16), 15);
        assert_eq!(
            shard_of(&c, 1000),
            (11_465_703_666_551_126_511u64 % 1000) as u32
        );
        assert_eq!(shard_of(&c, 1), 0);
        let mut counts = [0usize; 16];
        for i in 0..16_000 {
            counts[shard_of(&CustomerRef::new("t", format!("c{i}")), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|n| (800..1200).contains(n)), "{counts:?}");
    }
}
