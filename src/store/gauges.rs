//! Fleet-wide gauges kept in Redis, so every instance exports the same value
//! through restarts and rebalances: which customers are currently CAPPED,
//! THROTTLED or SUPPRESSED on each channel. Sets are updated with SADD/SREM,
//! which are idempotent, so re-applying a transition after a crash is harmless.

use std::collections::BTreeMap;

use redis::Cmd;

use super::redis::Conn;
use super::slots;
use crate::domain::allowance::AllowanceState;
use crate::domain::event::{Channel, CustomerRef};
use crate::error::StoreError;

/// Sets per tenant×channel×state, spread so no single key grows huge.
const SHARDS: u64 = 8;

#[derive(Clone)]
pub struct AllowanceGauges {
    conn: Conn,
    prefix: String,
}

fn shard(customer: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in customer.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % SHARDS
}

/// One published change of a customer's allowance on a channel.
#[derive(Debug, Clone)]
pub struct Move {
    pub customer: CustomerRef,
    pub channel: Channel,
    pub from: AllowanceState,
    pub to: AllowanceState,
}

impl AllowanceGauges {
    pub fn new(conn: Conn, prefix: &str) -> AllowanceGauges {
        AllowanceGauges {
            conn,
            prefix: prefix.to_string(),
        }
    }

    fn key(&self, tenant: &str, n: u64, c: Channel, s: AllowanceState) -> String {
        format!(
            "{}:{{allow:{tenant}:{n}}}:{}:{}",
            self.prefix,
            c.as_str(),
            s.as_str()
        )
    }

    fn tenants_key(&self) -> String {
        format!("{}:tenants", self.prefix)
    }

    /// Applies the moves (idempotent).
    pub async fn apply(&self, moves: &[Move]) -> Result<(), StoreError> {
        if moves.is_empty() {
            return Ok(());
        }
        let set_cmd = |op: &str, key: String, member: &str| {
            let cmd = redis::cmd(op).arg(&key).arg(member).clone();
            (key, cmd)
        };
        let mut cmds: Vec<(String, Cmd)> = Vec::new();
        for m in moves {
            let n = shard(&m.customer.customer);
            let c = &m.customer;
            if m.from != AllowanceState::Open {
                let key = self.key(&c.tenant, n, m.channel, m.from);
                cmds.push(set_cmd("SREM", key, &c.customer));
            }
            if m.to != AllowanceState::Open {
                let key = self.key(&c.tenant, n, m.channel, m.to);
                cmds.push(set_cmd("SADD", key, &c.customer));
            }
            cmds.push(set_cmd("SADD", self.tenants_key(), &c.tenant));
        }
        slots::pipelined::<_, redis::Value>(&self.conn, cmds).await?;
        Ok(())
    }

    /// Customers per (tenant, channel, state) for the non-OPEN states.
    pub async fn counts(
        &self,
    ) -> Result<BTreeMap<(String, Channel, AllowanceState), u64>, StoreError> {
        let mut c = self.conn.clone();
        let tenants: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.tenants_key())
            .query_async(&mut c)
            .await?;
        let mut keys = Vec::new();
        let mut cmds: Vec<(String, Cmd)> = Vec::new();
        for t in &tenants {
            for ch in Channel::ALL {
                for s in [
                    AllowanceState::Capped,
                    AllowanceState::Throttled,
                    AllowanceState::Suppressed,
                ] {
                    for n in 0..SHARDS {
                        let key = self.key(t, n, ch, s);
                        cmds.push((key.clone(), redis::cmd("SCARD").arg(key).clone()));
                        keys.push((t.clone(), ch, s));
                    }
                }
            }
        }
        if keys.is_empty() {
            return Ok(BTreeMap::new());
        }
        let cards: Vec<u64> = slots::pipelined(&self.conn, cmds).await?;
        let mut out = BTreeMap::new();
        for (k, n) in keys.into_iter().zip(cards) {
            *out.entry(k).or_insert(0) += n;
        }
        Ok(out)
    }
}
