//! The guardrail's stop records: one Redis hash, `PREFIX:experiment-stops`,
//! field `EXPERIMENT/ARM` → the stop time (ms). Written once per arm (HSETNX:
//! the first instance to flag it decides the time), read by every instance.
//! A single key outside the customers' slots, read on its own (never inside a
//! customer's script), so it works on a cluster too. Delete the field to
//! restart a stopped arm.

use redis::AsyncCommands;

use crate::domain::experiment::Experiments;
use crate::error::StoreError;
use crate::store::redis::Conn;

/// The stop records of a store.
#[derive(Clone)]
pub struct ExperimentStops {
    conn: Conn,
    key: String,
}

impl ExperimentStops {
    pub fn new(conn: Conn, prefix: &str) -> ExperimentStops {
        ExperimentStops {
            conn,
            key: format!("{prefix}:experiment-stops"),
        }
    }

    /// Every stop: (experiment, arm, stopped at). Fields that are not
    /// `EXPERIMENT/ARM` → ms are left out.
    pub async fn load(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let mut c = self.conn.clone();
        let all: Vec<(String, String)> = c.hgetall(&self.key).await?;
        Ok(all
            .into_iter()
            .filter_map(|(field, at)| {
                let (e, a) = field.split_once('/')?;
                Some((e.to_string(), a.to_string(), at.parse().ok()?))
            })
            .collect())
    }

    /// Records that `arm` of `experiment` stopped at `at`, unless it already
    /// had; returns whether this call recorded it.
    pub async fn stop(&self, experiment: &str, arm: &str, at: i64) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        Ok(c.hset_nx(&self.key, format!("{experiment}/{arm}"), at)
            .await?)
    }

    /// Applies every stop record to `experiments` (records of experiments or
    /// arms not configured are ignored); returns the (experiment, arm) applied.
    pub async fn apply(
        &self,
        experiments: &Experiments,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut applied = Vec::new();
        for (name, arm, at) in self.load().await? {
            let found = experiments
                .all()
                .find(|e| e.name == name)
                .and_then(|e| Some((e, e.arm_index(&arm)?)));
            if let Some((e, i)) = found {
                e.stop(i, at);
                applied.push((name, arm));
            }
        }
        Ok(applied)
    }
}
