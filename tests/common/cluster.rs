//! [`RedisCluster`]: a real Redis Cluster of 3 masters and 3 replicas from
//! Debian's `redis-server`, on free loopback ports, each node in its own dir,
//! stopped when the handle is dropped.

use super::*;

/// Node timeout: small, so a failover in a test takes seconds.
const NODE_TIMEOUT_MS: &str = "2000";
const NODES: usize = 6;

struct Node {
    port: u16,
    log: PathBuf,
    child: Child,
}

pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: TempDir,
}

/// `redis-cli` next to the `redis-server` in use (both come in Debian's package).
fn redis_cli_bin() -> PathBuf {
    let server = redis_server_bin();
    let cli = server.with_file_name("redis-cli");
    if cli.exists() {
        return cli;
    }
    find_on_path("redis-cli")
        .unwrap_or_else(|| panic!("redis-cli not found: run scripts/install-deps"))
}

/// A free port whose cluster bus port (port + 10000) is a valid port too.
fn free_cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55_000 {
            return p;
        }
    }
}

impl RedisCluster {
    /// Starts 6 nodes, joins them as 3 masters with a replica each, and waits
    /// until every node reports `cluster_state:ok`.
    pub async fn start() -> RedisCluster {
        let dir = scratch_dir("redis-cluster");
        let mut nodes = Vec::with_capacity(NODES);
        for i in 0..NODES {
            nodes.push(Self::launch(dir.path(), i).await);
        }
        let cluster = RedisCluster { nodes, dir };
        let mut create = Command::new(redis_cli_bin());
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        // Blocks the test's thread for a few seconds: nothing else runs yet.
        let out = create.output().expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ports = cluster.ports();
        wait_until(
            DEFAULT_TIMEOUT,
            Duration::from_millis(100),
            "every cluster node to report cluster_state:ok",
            async || {
                for p in &ports {
                    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{p}/")) else {
                        return false;
                    };
                    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                        return false;
                    };
                    let info: String =
                        match redis::cmd("CLUSTER").arg("INFO").query_async(&mut c).await {
                            Ok(i) => i,
                            Err(_) => return false,
                        };
                    if !info.contains("cluster_state:ok") {
                        return false;
                    }
                }
                true
            },
        )
        .await;
        cluster
    }

    async fn launch(root: &Path, i: usize) -> Node {
        let dir = root.join(format!("node-{i}"));
        std::fs::create_dir_all(&dir).expect("node dir");
        let log = dir.join("redis.log");
        for _attempt in 0..5 {
            let port = free_cluster_port();
            match Self::spawn_node(&dir, &log, port).await {
                Ok(child) => return Node { port, log, child },
                // Most likely lost the race for the port or its bus port.
                Err(None) => continue,
                Err(Some(e)) => panic!("{e}"),
            }
        }
        panic!(
            "cluster node failed to start 5 times; log:\n{}",
            file_tail(&log, 8192)
        )
    }

    /// Starts a node on `port` in `dir` (its AOF and nodes.conf are kept
    /// there, so a restart rejoins as the same node). Err(None): it exited.
    async fn spawn_node(dir: &Path, log: &Path, port: u16) -> Result<Child, Option<String>> {
        {
            let mut cmd = Command::new(redis_server_bin());
            cmd.arg("--port")
                .arg(port.to_string())
                .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
                .args(["--daemonize", "no", "--logfile", ""])
                .arg("--dir")
                .arg(dir)
                .args(["--cluster-enabled", "yes"])
                .arg("--cluster-config-file")
                .arg(format!("nodes-{port}.conf"))
                .args(["--cluster-node-timeout", NODE_TIMEOUT_MS])
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .args(["--save", ""])
                .stdin(Stdio::null())
                .stdout(open_append(log))
                .stderr(open_append(log));
            sys::die_with_parent(&mut cmd);
            let mut child = cmd.spawn().expect("spawn redis-server");
            match wait_started(&mut child, Duration::from_secs(20), async || {
                redis_ping(port).await
            })
            .await
            {
                StartOutcome::Ready => Ok(child),
                StartOutcome::Exited(_) => Err(None),
                StartOutcome::TimedOut => {
                    kill_and_reap(&mut child);
                    Err(Some(format!(
                        "cluster node {port} not ready in 20s; log:\n{}",
                        file_tail(log, 8192)
                    )))
                }
            }
        }
    }

    /// Indices (into [`RedisCluster::ports`]) of the nodes that are masters now.
    pub async fn master_indices(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, url) in self.urls().iter().enumerate() {
            let Ok(client) = redis::Client::open(url.as_str()) else {
                continue;
            };
            let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                continue;
            };
            let role: Vec<redis::Value> = match redis::cmd("ROLE").query_async(&mut c).await {
                Ok(r) => r,
                Err(_) => continue,
            };
            if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                out.push(i);
            }
        }
        out
    }

    /// SIGKILL of node `i`: no flush, no goodbye to the cluster (its AOF is
    /// fsynced on every write). Its replica takes over after the node timeout.
    pub fn kill_node(&mut self, i: usize) {
        kill_and_reap(&mut self.nodes[i].child);
    }

    /// Starts node `i` again on its port with its data and nodes.conf: it
    /// rejoins as the same node (a replica, if another took its slots over).
    pub async fn restart_node(&mut self, i: usize) {
        let dir = self.dir.path().join(format!("node-{i}"));
        let (port, log) = (self.nodes[i].port, self.nodes[i].log.clone());
        match Self::spawn_node(&dir, &log, port).await {
            Ok(child) => self.nodes[i].child = child,
            Err(e) => panic!(
                "cluster node {port} did not restart: {}; log:\n{}",
                e.unwrap_or_default(),
                file_tail(&log, 8192)
            ),
        }
    }

    /// The cluster node id of node `i` (`CLUSTER MYID`).
    pub async fn node_id(&self, i: usize) -> String {
        let mut c = redis::Client::open(self.urls()[i].as_str())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the node");
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut c)
            .await
            .expect("CLUSTER MYID")
    }

    /// Moves `slots` hash slots (with their keys) from master `from` to master
    /// `to` while clients go on: `redis-cli --cluster reshard` (MIGRATE key by
    /// key, so clients meet ASK and TRYAGAIN redirections meanwhile).
    pub async fn reshard(&self, from: usize, to: usize, slots: usize) {
        let (from_id, to_id) = (self.node_id(from).await, self.node_id(to).await);
        let out = tokio::process::Command::new(redis_cli_bin())
            .arg("--cluster")
            .arg("reshard")
            .arg(format!("127.0.0.1:{}", self.nodes[from].port))
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .args(["--cluster-pipeline", "10"])
            .output()
            .await
            .expect("run redis-cli --cluster reshard");
        assert!(
            out.status.success(),
            "redis-cli --cluster reshard failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Waits until every node reports `cluster_state:ok` and every master
    /// has a replica online (after a failover and the old master's return).
    pub async fn wait_healthy(&self, timeout: Duration) {
        let urls = self.urls();
        wait_until(
            timeout,
            Duration::from_millis(200),
            "the cluster to be ok with a replica online for every master",
            async || {
                let mut masters = 0;
                for url in &urls {
                    let Ok(client) = redis::Client::open(url.as_str()) else {
                        return false;
                    };
                    let Ok(mut c) = client.get_multiplexed_async_connection().await else {
                        return false;
                    };
                    let Ok(info) = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async::<String>(&mut c)
                        .await
                    else {
                        return false;
                    };
                    if !info.contains("cluster_state:ok") {
                        return false;
                    }
                    let Ok(repl) = redis::cmd("INFO")
                        .arg("replication")
                        .query_async::<String>(&mut c)
                        .await
                    else {
                        return false;
                    };
                    if repl.contains("role:master") {
                        masters += 1;
                        if repl.contains("connected_slaves:0") {
                            return false;
                        }
                    } else if !repl.contains("master_link_status:up") {
                        return false;
                    }
                }
                masters == NODES / 2
            },
        )
        .await;
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:PORT/` of every node: seeds for a cluster client.
    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    /// A connection to each master (for per-node commands: KEYS, DBSIZE).
    pub async fn masters(&self) -> Vec<redis::aio::MultiplexedConnection> {
        let mut out = Vec::new();
        for url in self.urls() {
            let mut c = redis::Client::open(url.as_str())
                .expect("redis url")
                .get_multiplexed_async_connection()
                .await
                .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
            let role: Vec<redis::Value> =
                redis::cmd("ROLE").query_async(&mut c).await.expect("ROLE");
            if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                out.push(c);
            }
        }
        out
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        let logs: Vec<&Path> = self.nodes.iter().map(|n| n.log.as_path()).collect();
        dump_if_panicking("redis cluster", &logs);
        for n in &mut self.nodes {
            kill_and_reap(&mut n.child);
        }
    }
}
