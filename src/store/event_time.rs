//! The event-time watermark shared by every instance (event-time clock mode):
//! the highest event time applied anywhere. Kept in Redis so that timers fire
//! by the same time on every instance and after a restart.

use super::redis::Conn;
use crate::error::StoreError;

/// Raises the stored watermark to ARGV[1] if that is higher; returns the watermark.
const ADVANCE: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = tonumber(ARGV[1])
if t > cur then
  redis.call('SET', KEYS[1], ARGV[1])
  return t
end
return cur
"#;

#[derive(Clone)]
pub struct SharedEventTime {
    conn: Conn,
    key: String,
    script: redis::Script,
}

impl SharedEventTime {
    pub fn new(conn: Conn, prefix: &str) -> SharedEventTime {
        SharedEventTime {
            conn,
            key: format!("{prefix}:clock:event_time"),
            script: redis::Script::new(ADVANCE),
        }
    }

    /// Moves the watermark forward (never back); returns the watermark now in force.
    pub async fn advance(&self, t: i64) -> Result<i64, StoreError> {
        let mut c = self.conn.clone();
        let v: i64 = self
            .script
            .key(&self.key)
            .arg(t)
            .invoke_async(&mut c)
            .await?;
        Ok(v)
    }

    pub async fn now(&self) -> Result<i64, StoreError> {
        let mut c = self.conn.clone();
        let v: Option<i64> = redis::cmd("GET").arg(&self.key).query_async(&mut c).await?;
        Ok(v.unwrap_or(0))
    }
}
