//! Redis Cluster hash slots, and THE way lapse sends several commands at once:
//! [`pipelined`] runs them as one pipeline on a single node and as one pipeline
//! per hash slot on a Cluster (a Cluster pipeline, like a script call, must
//! stay in one slot: the client refuses it with CrossSlot otherwise).

use futures::stream::{self, StreamExt, TryStreamExt};
use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, FromRedisValue, RedisResult, Value};

use super::cluster::Nodes;
use super::redis::Conn;

/// Whether a connection talks to a Redis Cluster (commands grouped per slot)
/// or to a single node (everything in one pipeline).
pub trait Topology: ConnectionLike + Clone + Send + Sync {
    fn is_cluster(&self) -> bool;
}

impl Topology for Conn {
    fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl Topology for MultiplexedConnection {
    fn is_cluster(&self) -> bool {
        false
    }
}

impl Topology for ConnectionManager {
    fn is_cluster(&self) -> bool {
        false
    }
}

/// Per-slot pipelines in flight at once on a Cluster (they are multiplexed
/// over one connection per node; this bounds the requests queued there).
const SLOTS_IN_FLIGHT: usize = 256;

/// CRC16-XMODEM, the checksum Redis Cluster hashes keys with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The hash slot of `key` (0..16384): of its `{hash tag}` if it has a
/// non-empty one, else of the whole key — as Redis computes it.
pub fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % 16384
}

/// Indices of `keys` grouped so that each group may go into one pipeline or
/// one script call: a single group on a single node, one group per hash slot
/// on a Cluster. Groups keep the order of `keys`, and so do indices in a group.
pub fn groups<K: AsRef<[u8]>>(conn: &impl Topology, keys: &[K]) -> Vec<Vec<usize>> {
    match conn.is_cluster() {
        false => vec![(0..keys.len()).collect()],
        true => {
            let mut slot_groups: Vec<(u16, Vec<usize>)> = Vec::new();
            let mut at = std::collections::HashMap::new();
            for (i, k) in keys.iter().enumerate() {
                let s = slot(k.as_ref());
                let g = *at.entry(s).or_insert_with(|| {
                    slot_groups.push((s, Vec::new()));
                    slot_groups.len() - 1
                });
                slot_groups[g].1.push(i);
            }
            slot_groups.into_iter().map(|(_, g)| g).collect()
        }
    }
}

/// Runs `cmds`, each given with the key that routes it (every key the command
/// touches must share that key's slot), and returns each command's reply in
/// the order of `cmds`: one round trip on a single node, one pipeline per hash
/// slot on a Cluster (concurrently). The commands are moved into the
/// pipelines, not copied: a compare-and-set call carries ~30 KB of states.
pub async fn pipelined<K: AsRef<[u8]>, T: FromRedisValue>(
    conn: &impl Topology,
    cmds: Vec<(K, Cmd)>,
) -> RedisResult<Vec<T>> {
    if cmds.is_empty() {
        return Ok(vec![]);
    }
    let n = cmds.len();
    let (keys, cmds): (Vec<K>, Vec<Cmd>) = cmds.into_iter().unzip();
    let groups = groups(conn, &keys);
    let mut cmds: Vec<Option<Cmd>> = cmds.into_iter().map(Some).collect();
    let pipes: Vec<(Vec<usize>, redis::Pipeline)> = groups
        .into_iter()
        .map(|g| {
            let mut pipe = redis::pipe();
            for &i in &g {
                if let Some(c) = cmds[i].take() {
                    pipe.add_command(c);
                }
            }
            (g, pipe)
        })
        .collect();
    let replies: Vec<(Vec<usize>, Vec<Value>)> = stream::iter(pipes)
        .map(|(g, pipe)| {
            let mut c = conn.clone();
            async move {
                let v: Vec<Value> = pipe.query_async(&mut c).await?;
                RedisResult::Ok((g, v))
            }
        })
        .buffer_unordered(SLOTS_IN_FLIGHT)
        .try_collect()
        .await?;
    let mut out: Vec<Option<Value>> = vec![None; n];
    for (g, vs) in replies {
        for (i, v) in g.into_iter().zip(vs) {
            out[i] = Some(v);
        }
    }
    out.into_iter()
        .map(|v| T::from_owned_redis_value(v.unwrap_or(Value::Nil)))
        .collect()
}

/// A SCAN over every key matching a pattern: of the one node, or of every
/// master of a Cluster in turn. A Cluster resharding meanwhile can make a scan
/// miss or repeat keys (as SCAN itself may repeat): callers must be idempotent
/// and may run again.
pub struct KeyScan {
    conn: Conn,
    pattern: String,
    /// Masters still to scan (`None` on a single node), the current one last.
    masters: Option<Vec<(String, u16)>>,
    cursor: u64,
    done: bool,
}

impl KeyScan {
    pub async fn new(conn: Conn, pattern: impl Into<String>) -> RedisResult<KeyScan> {
        let masters = match &conn {
            Conn::Single(_) => None,
            Conn::Cluster(link) => Some(link.nodes(Nodes::Masters).await?),
        };
        Ok(KeyScan {
            conn,
            pattern: pattern.into(),
            masters,
            cursor: 0,
            done: false,
        })
    }

    /// The next page of keys (possibly empty), or `None` when every node is done.
    pub async fn next_page(&mut self, count: usize) -> RedisResult<Option<Vec<String>>> {
        if self.done {
            return Ok(None);
        }
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(self.cursor)
            .arg("MATCH")
            .arg(&self.pattern)
            .arg("COUNT")
            .arg(count);
        let (cursor, keys): (u64, Vec<String>) = match (&mut self.conn, &mut self.masters) {
            (Conn::Cluster(link), Some(masters)) => {
                let Some((host, port)) = masters.last().cloned() else {
                    self.done = true;
                    return Ok(None);
                };
                let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                let r = link.connection().route_command(&cmd, to).await;
                link.observe(&r);
                let v = r?;
                FromRedisValue::from_owned_redis_value(v)?
            }
            (c, _) => cmd.query_async(c).await?,
        };
        self.cursor = cursor;
        if cursor == 0 {
            match &mut self.masters {
                Some(m) => {
                    m.pop();
                    self.done = m.is_empty();
                }
                None => self.done = true,
            }
        }
        Ok(Some(keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // CLUSTER KEYSLOT foo (Redis' docs) and the CRC16-XMODEM check value.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"123456789"), 0x31c3);
        assert_eq!(slot(b"lapse:{foo}:state"), slot(b"foo"));
        assert_ne!(slot(b"{}foo"), slot(b"foo"), "an empty tag: the whole key");
        assert_eq!(slot(b"a{b}{c}"), slot(b"b"), "the first tag counts");
    }
}
