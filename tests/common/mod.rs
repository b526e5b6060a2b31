//! Shared integration-test harness.
//!
//! Every integration test file does `mod common;` and gets real servers on free
//! loopback ports, each with its own temp dir and captured logs, stopped when the
//! handle is dropped (also when the test panics; the server's log tail is printed
//! then, so a failure shows what the server said):
//!
//! * [`RedisServer`]: Debian `redis-server` with an append-only file fsynced on
//!   every write, so it can be stopped, killed and started again on the same port
//!   with its data.
//! * [`Broker`]: tansu, an Apache-Kafka-compatible broker (in-memory log), optionally
//!   behind a [`TcpProxy`] that a test can cut and restore to make the broker
//!   unreachable without losing its log.
//! * [`SchemaRegistryStub`]: a minimal Confluent-compatible schema registry.
//! * [`LapseProcess`]: the `lapse` binary under test, with its HTTP port.
//! * Kafka helpers ([`Producer`], [`produce`], [`consume_all`],
//!   [`committed_offsets`], [`end_offsets`]) and polling helpers ([`wait_until`],
//!   [`wait_for`]): tests never sleep for a fixed time to "let things happen".
//!
//! The tools crate's tests (`tools/tests/`) use this harness too, through
//! `#[path = "../../tests/common/mod.rs"] mod common;`.
//!
//! Binaries are found as follows: lapse as cargo built it for these tests (for
//! the tools' tests: the `lapse` that the workspace build put next to them); tansu from `$LAPSE_TANSU_BIN`, else the project
//! cache `.cache/tools/bin/tansu` (made by `scripts/install-deps`), else `tansu` on
//! `PATH`; redis from `$LAPSE_REDIS_SERVER_BIN`, else `redis-server` on `PATH`.
//! Set `LAPSE_TEST_KEEP_TMP=1` to keep the temp dirs (data, logs) after a run.
//!
//! All helpers work under the default `#[tokio::test]` (current-thread) runtime:
//! blocking librdkafka calls run on the blocking pool, and the proxy and the
//! registry stub run on their own small runtimes, so they keep serving while a
//! test blocks. Child processes are also bound to the lifetime of the thread that
//! started them (Linux `PR_SET_PDEATHSIG`), so even an aborted test binary leaves
//! no server behind; start them from the test itself, not from `spawn_blocking`.

#![allow(dead_code)]

pub mod cluster;
pub mod stack;
pub mod tls;

pub use cluster::RedisCluster;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Generous default deadline for "eventually" conditions on a loaded 2-core machine.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default poll interval for [`wait_until`] / [`wait_for`].
pub const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

/// A loopback TCP port that was free a moment ago. Servers started by this
/// harness retry with another port if they lose the race for it.
pub fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A name unique within this test process (topics, groups, subjects, ...).
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// A fresh temp dir, removed on drop unless `LAPSE_TEST_KEEP_TMP=1`.
pub fn scratch_dir(what: &str) -> TempDir {
    let keep = std::env::var("LAPSE_TEST_KEEP_TMP").is_ok_and(|v| v == "1");
    tempfile::Builder::new()
        .prefix(&format!("lapse-test-{what}-"))
        .disable_cleanup(keep)
        .tempdir()
        .expect("create temp dir")
}

/// Poll `cond` every `poll` until it returns true; panic with `what` after `timeout`.
/// Each call of `cond` is itself bounded by the remaining time.
///
/// ```ignore
/// wait_until(DEFAULT_TIMEOUT, POLL, "customer state written", async || {
///     conn.exists::<_, bool>("k").await.unwrap_or(false)
/// }).await;
/// ```
pub async fn wait_until(
    timeout: Duration,
    poll: Duration,
    what: &str,
    mut cond: impl AsyncFnMut() -> bool,
) {
    wait_for(timeout, poll, what, async || cond().await.then_some(())).await
}

/// Poll `f` until it returns `Some(value)` and return the value; panic with `what`
/// after `timeout`.
pub async fn wait_for<T>(
    timeout: Duration,
    poll: Duration,
    what: &str,
    f: impl AsyncFnMut() -> Option<T>,
) -> T {
    match try_wait_for(timeout, poll, f).await {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for: {what}"),
    }
}

/// Like [`wait_for`] but returns `None` on timeout instead of panicking.
pub async fn try_wait_for<T>(
    timeout: Duration,
    poll: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(v)) = tokio::time::timeout(remaining, f()).await {
            return Some(v);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return None;
        }
        tokio::time::sleep(poll.min(remaining)).await;
    }
}

/// Last `max_bytes` of a file, lossily decoded; empty if missing.
fn file_tail(path: &Path, max_bytes: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max_bytes);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    if start > 0 {
        format!("[... {start} bytes omitted ...]\n{text}")
    } else {
        text
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn dump_if_panicking(label: &str, files: &[&Path]) {
    if !std::thread::panicking() {
        return;
    }
    for f in files {
        eprintln!(
            "----- {label}: {} (tail) -----\n{}\n----- end {label} -----",
            f.display(),
            file_tail(f, 16 * 1024)
        );
    }
}

fn open_append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The repository root: the product crate's directory, also for the tools
/// crate's tests (its directory is `tools/`, one level below).
pub fn repo_root() -> &'static Path {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match env!("CARGO_PKG_NAME") {
        "lapse" => manifest,
        _ => manifest
            .parent()
            .expect("the tools crate lies inside the repository"),
    }
}

/// The tansu binary: `$LAPSE_TANSU_BIN`, the project cache, or `tansu` on `PATH`.
pub fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LAPSE_TANSU_BIN").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "LAPSE_TANSU_BIN={} does not exist",
            p.display()
        );
        return p;
    }
    let cached = repo_root().join(".cache/tools/bin/tansu");
    if cached.is_file() {
        return cached;
    }
    find_on_path("tansu").unwrap_or_else(|| {
        panic!(
            "tansu not found: run scripts/install-deps (then `. scripts/env`), \
             or set LAPSE_TANSU_BIN to a tansu 0.6 binary"
        )
    })
}

/// The interop tests' independent client: a Python with confluent-kafka and
/// fastavro, `$LAPSE_PYTHON` or the project's `.cache/venv` (made by
/// `scripts/install-deps`). Missing is a failure, not a skip: CI installs it.
pub fn interop_python() -> PathBuf {
    if let Some(p) = std::env::var_os("LAPSE_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let venv = repo_root().join(".cache/venv/bin/python");
    assert!(
        venv.is_file(),
        "the interop client's Python ({}) is missing: run scripts/install-deps",
        venv.display()
    );
    venv
}

/// Runs `script` on the interop Python (fastavro, confluent-kafka) with
/// `input` as JSON on stdin and parses its stdout as JSON.
pub fn python_json(script: &str, input: &serde_json::Value) -> serde_json::Value {
    use std::io::Write;
    let mut child = Command::new(interop_python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the interop Python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the interop Python script failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The interop client scripts' directory (`tests/interop/`).
pub fn interop_dir() -> PathBuf {
    repo_root().join("tests/interop")
}

/// Runs one of tests/interop/java/*.java with Debian's Avro jars (the Avro
/// project's own library, installed by scripts/install-deps); its stdout.
pub fn java(program: &str, args: &[&str]) -> String {
    let classpath = std::process::Command::new(repo_root().join("scripts/java-classpath"))
        .output()
        .expect("run scripts/java-classpath");
    assert!(
        classpath.status.success(),
        "scripts/java-classpath: {} (run scripts/install-deps)",
        String::from_utf8_lossy(&classpath.stderr)
    );
    let classpath = String::from_utf8(classpath.stdout).unwrap();
    let out = std::process::Command::new("java")
        .arg("-cp")
        .arg(classpath.trim())
        .arg(interop_dir().join("java").join(program))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("run java (scripts/install-deps installs a JRE)");
    assert!(
        out.status.success(),
        "java {program} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The redis-server binary: `$LAPSE_REDIS_SERVER_BIN` or `redis-server` on `PATH`.
pub fn redis_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LAPSE_REDIS_SERVER_BIN").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    find_on_path("redis-server")
        .unwrap_or_else(|| panic!("redis-server not found: run scripts/install-deps"))
}

/// Process control without extra crates: the two libc calls the harness needs.
mod sys {
    use std::os::raw::c_int;
    use std::process::Command;

    pub const SIGKILL: c_int = 9;
    pub const SIGTERM: c_int = 15;
    pub const SIGCONT: c_int = 18;
    pub const SIGSTOP: c_int = 19;

    unsafe extern "C" {
        fn kill(pid: c_int, sig: c_int) -> c_int;
        #[cfg(target_os = "linux")]
        fn prctl(option: c_int, ...) -> c_int;
    }

    /// Send `sig` to `pid`.
    pub fn signal(pid: u32, sig: c_int) -> std::io::Result<()> {
        let pid = c_int::try_from(pid).expect("pid fits in c_int");
        // SAFETY: kill(2) has no memory-safety preconditions.
        if unsafe { kill(pid, sig) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Send `sig` to every process in process group `pgid`.
    pub fn signal_group(pgid: c_int, sig: c_int) -> std::io::Result<()> {
        // SAFETY: kill(2) has no memory-safety preconditions.
        if unsafe { kill(-pgid, sig) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Make the child receive SIGKILL when the thread that spawned it exits, so an
    /// aborted test run leaves no orphan servers (Linux only; no-op elsewhere).
    pub fn die_with_parent(cmd: &mut Command) {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;

            const PR_SET_PDEATHSIG: c_int = 1;
            // SAFETY: the closure runs between fork and exec and only calls prctl(2),
            // which is async-signal-safe; it allocates nothing.
            unsafe {
                cmd.pre_exec(|| {
                    if prctl(PR_SET_PDEATHSIG, SIGKILL as std::os::raw::c_ulong) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = cmd;
    }
}

/// How a server start attempt ended.
enum StartOutcome {
    Ready,
    /// The process exited before becoming ready (e.g. it lost the port race).
    Exited(ExitStatus),
    TimedOut,
}

/// Wait until `ready()` holds while watching `child` for an early exit.
async fn wait_started(
    child: &mut Child,
    timeout: Duration,
    mut ready: impl AsyncFnMut() -> bool,
) -> StartOutcome {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return StartOutcome::Exited(status);
        }
        if ready().await {
            return StartOutcome::Ready;
        }
        if Instant::now() >= deadline {
            return StartOutcome::TimedOut;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Poll a child until it exits or the timeout passes.
async fn wait_child_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

async fn tcp_accepts(addr: SocketAddr) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr)
        )
        .await,
        Ok(Ok(_))
    )
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

/// A `redis-server` on a free loopback port with its own data dir. Persistence is
/// an append-only file with `appendfsync always`, so every acknowledged write
/// survives [`stop`](Self::stop) and even [`kill`](Self::kill).
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    log: PathBuf,
    child: Option<Child>,
    /// Appended to the command line (TLS ports, ACL files, passwords).
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Start a fresh server and wait until it answers PING.
    pub async fn start() -> Self {
        Self::start_with(|_| Vec::new()).await
    }

    /// Like [`RedisServer::start`], with `extra` options after the defaults
    /// (AOF with `appendfsync always`, no RDB), e.g. `["--appendfsync", "everysec"]`.
    pub async fn start_with_options(extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_with(move |_| extra).await
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments made
    /// from the server's data dir (where a test puts certificates or an ACL
    /// file before the start). The plain port stays open on loopback for the
    /// harness' readiness check, which also accepts `-NOAUTH` (the default
    /// user off or password-protected).
    pub async fn start_with(extra: impl FnOnce(&Path) -> Vec<String>) -> Self {
        let dir = scratch_dir("redis");
        let log = dir.path().join("redis.log");
        let extra_args = extra(dir.path());
        let mut server = Self {
            port: 0,
            dir,
            log,
            child: None,
            extra_args,
        };
        for _attempt in 0..5 {
            server.port = free_port();
            match server.launch().await {
                StartOutcome::Ready => return server,
                // Most likely lost the race for the port: try another one.
                StartOutcome::Exited(_) => continue,
                StartOutcome::TimedOut => panic!(
                    "redis-server on port {} not ready in 20s; log:\n{}",
                    server.port,
                    file_tail(&server.log, 8192)
                ),
            }
        }
        panic!(
            "redis-server failed to start 5 times; log:\n{}",
            file_tail(&server.log, 8192)
        )
    }

    async fn launch(&mut self) -> StartOutcome {
        let mut cmd = Command::new(redis_server_bin());
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "no"])
            .args(["--daemonize", "no", "--logfile", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", ""])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(open_append(&self.log))
            .stderr(open_append(&self.log));
        sys::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawn redis-server");
        let port = self.port;
        let outcome = wait_started(&mut child, Duration::from_secs(20), async || {
            redis_ping(port).await
        })
        .await;
        if matches!(outcome, StartOutcome::Ready) {
            self.child = Some(child);
        } else {
            kill_and_reap(&mut child);
        }
        outcome
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A multiplexed async connection (cheap to clone).
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.url()))
    }

    pub async fn flushall(&self) {
        let mut conn = self.client().await;
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut conn)
            .await
            .expect("FLUSHALL");
    }

    /// Empties Redis' script cache, as a restart or failover does.
    pub async fn flush_scripts(&self) {
        let mut conn = self.client().await;
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async::<()>(&mut conn)
            .await
            .expect("SCRIPT FLUSH");
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Graceful stop (SIGTERM: redis flushes and exits). Data is kept.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let _ = sys::signal(child.id(), sys::SIGTERM);
            if wait_child_exit(&mut child, Duration::from_secs(20))
                .await
                .is_none()
            {
                kill_and_reap(&mut child);
                panic!("redis-server did not stop on SIGTERM within 20s");
            }
        }
    }

    /// SIGKILL, no chance to flush. Writes acknowledged before are kept (fsync always).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Start again on the same port with the same data (after `stop` or `kill`).
    pub async fn start_again(&mut self) {
        assert!(
            !self.is_running(),
            "start_again: redis-server is still running"
        );
        match self.launch().await {
            StartOutcome::Ready => {}
            StartOutcome::Exited(status) => panic!(
                "redis-server restart on port {} exited ({status}); log:\n{}",
                self.port,
                file_tail(&self.log, 8192)
            ),
            StartOutcome::TimedOut => panic!(
                "redis-server restart on port {} not ready in time; log:\n{}",
                self.port,
                file_tail(&self.log, 8192)
            ),
        }
    }

    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        dump_if_panicking("redis-server", &[&self.log]);
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

/// True when a server on `port` answers `+PONG` (not while loading its AOF).
async fn redis_ping(port: u16) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"))
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(true))
    )
}

// ---------------------------------------------------------------------------
// TCP proxy (fault injection)
// ---------------------------------------------------------------------------

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward bytes both ways.
    Forward,
    /// Reset existing connections; accept and immediately reset new ones.
    Refuse,
    /// Stop forwarding but keep connections open (a silent network partition:
    /// clients see timeouts, not resets). Held connections are reset on restore.
    Blackhole,
}

/// Upper bound on concurrently proxied connections (one task per connection).
const PROXY_MAX_CONNECTIONS: usize = 256;

/// A small TCP forwarder on a loopback port, run on its own runtime so it keeps
/// working while the test thread blocks. Dropping it closes everything.
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    rt: Option<tokio::runtime::Runtime>,
}

impl TcpProxy {
    /// Listen on a free loopback port and forward to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind proxy port");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy addr");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-tcp-proxy")
            .enable_all()
            .build()
            .expect("proxy runtime");
        let (mode, mode_rx) = watch::channel(ProxyMode::Forward);
        rt.spawn(proxy_accept_loop(listener, upstream, mode_rx));
        Self {
            addr,
            upstream,
            mode,
            rt: Some(rt),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    /// Make the upstream unreachable: existing connections are reset, new ones
    /// are reset right after accept.
    pub fn cut(&self) {
        self.mode.send_replace(ProxyMode::Refuse);
    }

    /// Make the upstream silently unreachable (connections hang).
    pub fn blackhole(&self) {
        self.mode.send_replace(ProxyMode::Blackhole);
    }

    /// Forward again (clients reconnect).
    pub fn restore(&self) {
        self.mode.send_replace(ProxyMode::Forward);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn proxy_accept_loop(
    listener: StdTcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<ProxyMode>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("proxy listener");
    let permits = Arc::new(tokio::sync::Semaphore::new(PROXY_MAX_CONNECTIONS));
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let current = *mode.borrow();
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            let _ = sock.set_zero_linger();
            continue;
        };
        match current {
            ProxyMode::Refuse => {
                let _ = sock.set_zero_linger();
                drop(sock);
            }
            ProxyMode::Blackhole => {
                let mut mode = mode.clone();
                tokio::spawn(async move {
                    let _ = mode.wait_for(|m| *m != ProxyMode::Blackhole).await;
                    let _ = sock.set_zero_linger();
                    drop(permit);
                });
            }
            ProxyMode::Forward => {
                let mode = mode.clone();
                tokio::spawn(async move {
                    proxy_connection(sock, upstream, mode).await;
                    drop(permit);
                });
            }
        }
    }
}

async fn proxy_connection(
    mut client: tokio::net::TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let interrupted = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        changed = mode.wait_for(|m| *m != ProxyMode::Forward) => changed.is_ok(),
    };
    if interrupted && *mode.borrow() == ProxyMode::Blackhole {
        let _ = mode.wait_for(|m| *m != ProxyMode::Blackhole).await;
    }
    let _ = client.set_zero_linger();
    let _ = server.set_zero_linger();
}

// ---------------------------------------------------------------------------
// Broker (tansu)
// ---------------------------------------------------------------------------

/// A tansu broker (Kafka protocol, in-memory log) on a free loopback port.
pub struct Broker {
    /// Port tansu listens on.
    listen_port: u16,
    /// Port clients are told to use (the proxy's when behind one).
    advertised_port: u16,
    dir: TempDir,
    log: PathBuf,
    child: Option<Child>,
    proxy: Option<TcpProxy>,
    /// The TLS terminator clients talk to, when started with `start_tls`.
    tls: Option<tls::TlsProxy>,
}

/// What stands in front of tansu's own (plaintext) listener.
enum Front<'a> {
    Direct,
    Proxy,
    Tls(&'a BrokerTls<'a>),
}

/// A broker reached over TLS: [`Broker::start_tls`].
pub struct BrokerTls<'a> {
    pub certs: &'a tls::TestCerts,
    /// The certificate the terminator presents.
    pub server: tls::ServerCert,
    /// Require a client certificate signed by the test CA (mutual TLS).
    pub client_auth: bool,
}

impl BrokerTls<'_> {
    /// The librdkafka settings the harness's own clients use for this broker:
    /// the test CA, the client certificate when required, and no host-name
    /// check (certificate check) when the certificate names another host (has
    /// expired): the harness must reach the brokers lapse is to refuse.
    fn client_settings(&self) -> Vec<(String, String)> {
        let path = |p: PathBuf| p.display().to_string();
        let mut v = vec![
            ("security.protocol".to_owned(), "ssl".to_owned()),
            ("ssl.ca.location".to_owned(), path(self.certs.ca())),
        ];
        match self.server {
            tls::ServerCert::Good => {}
            tls::ServerCert::WrongHost => v.push((
                "ssl.endpoint.identification.algorithm".into(),
                "none".into(),
            )),
            tls::ServerCert::Expired => {
                v.push(("enable.ssl.certificate.verification".into(), "false".into()))
            }
        }
        if self.client_auth {
            v.push((
                "ssl.certificate.location".into(),
                path(self.certs.client_cert()),
            ));
            v.push(("ssl.key.location".into(), path(self.certs.client_key())));
        }
        v
    }
}

/// librdkafka settings the harness's clients need per bootstrap address (a
/// broker behind TLS), applied by [`client_config`].
static CLIENT_SETTINGS: Mutex<BTreeMap<String, Vec<(String, String)>>> =
    Mutex::new(BTreeMap::new());

impl Broker {
    /// SIGSTOP: the broker keeps its sockets but answers nothing until [`Broker::resume`].
    pub fn pause(&self) {
        let pid = self.child.as_ref().expect("broker running").id();
        sys::signal(pid, sys::SIGSTOP).expect("SIGSTOP the broker");
    }

    /// SIGCONT after [`Broker::pause`].
    pub fn resume(&self) {
        let pid = self.child.as_ref().expect("broker running").id();
        sys::signal(pid, sys::SIGCONT).expect("SIGCONT the broker");
    }

    /// Start a broker; clients talk to it directly.
    pub async fn start() -> Self {
        Self::start_inner(Front::Direct, false).await
    }

    /// Start a broker that advertises a [`TcpProxy`] in front of it, so all client
    /// traffic (bootstrap and the advertised address) goes through the proxy; see
    /// [`proxy`](Self::proxy). Topic creation bypasses the proxy.
    pub async fn start_behind_proxy() -> Self {
        Self::start_inner(Front::Proxy, false).await
    }

    /// Start a broker that advertises a TLS terminator in front of it
    /// ([`tls::TlsProxy`]: tansu 0.6's own `--cert`/`--key` refuse to be
    /// given together), so every client connection (bootstrap, partition
    /// leaders, group coordinator) is TLS with a real certificate check. The
    /// harness's clients ([`client_config`]) use TLS for it; topic creation
    /// (tansu's CLI) goes to tansu's plaintext listener.
    pub async fn start_tls(tls: &BrokerTls<'_>) -> Self {
        Self::start_inner(Front::Tls(tls), false).await
    }

    /// A broker that requires SASL (`tansu broker --authentication`) and
    /// knows no user: with tansu 0.6's memory storage a user can only be
    /// created by an authenticated client (`tansu user create` is refused
    /// with NotAuthenticated), so every login fails with `unknown-user`
    /// after a real SCRAM exchange. Plaintext, or behind TLS (SASL_SSL).
    /// Neither topics nor the harness's clients work on it.
    pub async fn start_requiring_sasl(tls: Option<&BrokerTls<'_>>) -> Self {
        let front = tls.map_or(Front::Direct, Front::Tls);
        Self::start_inner(front, true).await
    }

    async fn start_inner(front: Front<'_>, authentication: bool) -> Self {
        let dir = scratch_dir("tansu");
        let log = dir.path().join("tansu.log");
        let mut last_status = None;
        for _attempt in 0..5 {
            let listen_port = free_port();
            let upstream: SocketAddr = ([127, 0, 0, 1], listen_port).into();
            let proxy = matches!(front, Front::Proxy).then(|| TcpProxy::start(upstream));
            let tls = match &front {
                Front::Tls(t) => Some(tls::TlsProxy::start_with(
                    t.certs,
                    t.server,
                    t.client_auth,
                    upstream,
                )),
                _ => None,
            };
            let advertised_port = proxy
                .as_ref()
                .map(TcpProxy::port)
                .or(tls.as_ref().map(tls::TlsProxy::port))
                .unwrap_or(listen_port);
            if let Front::Tls(t) = &front {
                CLIENT_SETTINGS
                    .lock()
                    .unwrap()
                    .insert(format!("127.0.0.1:{advertised_port}"), t.client_settings());
            }

            let mut cmd = Command::new(tansu_bin());
            cmd.arg("broker")
                .arg("--listener-url")
                .arg(format!("tcp://127.0.0.1:{listen_port}"))
                .arg("--advertised-listener-url")
                .arg(format!("tcp://127.0.0.1:{advertised_port}"))
                .args(["--storage-engine", "memory://tansu/"])
                .args(authentication.then_some("--authentication"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(open_append(&log))
                .stderr(open_append(&log));
            sys::die_with_parent(&mut cmd);
            let mut child = cmd.spawn().expect("spawn tansu broker");

            let bootstrap = format!("127.0.0.1:{advertised_port}");
            let outcome = wait_started(&mut child, Duration::from_secs(30), async || {
                tcp_accepts(upstream).await && (authentication || metadata_ok(&bootstrap).await)
            })
            .await;
            match outcome {
                StartOutcome::Ready => {
                    return Self {
                        listen_port,
                        advertised_port,
                        dir,
                        log,
                        child: Some(child),
                        proxy,
                        tls,
                    };
                }
                StartOutcome::Exited(status) => {
                    last_status = Some(status);
                    CLIENT_SETTINGS.lock().unwrap().remove(&bootstrap);
                }
                StartOutcome::TimedOut => {
                    kill_and_reap(&mut child);
                    panic!(
                        "tansu broker on port {listen_port} not ready in 30s; log:\n{}",
                        file_tail(&log, 8192)
                    );
                }
            }
        }
        panic!(
            "tansu broker failed to start 5 times (last exit: {last_status:?}); log:\n{}",
            file_tail(&log, 8192)
        )
    }

    /// `bootstrap.servers` for clients (the proxy's address when behind one).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised_port)
    }

    /// The broker's own listener, bypassing any proxy.
    pub fn direct_bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.listen_port)
    }

    /// The fault-injection proxy; panics unless started with `start_behind_proxy`.
    pub fn proxy(&self) -> &TcpProxy {
        self.proxy
            .as_ref()
            .expect("broker was not started with start_behind_proxy()")
    }

    pub async fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with_config(name, partitions, &[]).await
    }

    /// A topic with `cleanup.policy=compact`.
    pub async fn create_compacted_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with_config(name, partitions, &[("cleanup.policy", "compact")])
            .await
    }

    /// Create a topic with the tansu CLI, then wait until clients see all its
    /// partitions in metadata.
    pub async fn create_topic_with_config(
        &self,
        name: &str,
        partitions: i32,
        config: &[(&str, &str)],
    ) {
        let mut cmd = tokio::process::Command::new(tansu_bin());
        cmd.args(["topic", "create", name])
            .arg("--partitions")
            .arg(partitions.to_string())
            .arg("--broker")
            .arg(format!("tcp://127.0.0.1:{}", self.listen_port))
            .kill_on_drop(true)
            .stdin(Stdio::null());
        for (k, v) in config {
            cmd.arg("--config").arg(format!("{k}={v}"));
        }
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("tansu topic create {name}: timed out"))
            .expect("run tansu topic create");
        assert!(
            out.status.success(),
            "tansu topic create {name} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let bootstrap = self.bootstrap();
        wait_until(
            DEFAULT_TIMEOUT,
            POLL,
            &format!("topic {name} visible with {partitions} partitions"),
            async || partition_count(&bootstrap, name).await == Some(partitions),
        )
        .await;
    }

    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        dump_if_panicking("tansu", &[&self.log]);
        if self.tls.is_some() {
            CLIENT_SETTINGS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&self.bootstrap());
        }
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }
}

// ---------------------------------------------------------------------------
// Kafka helpers (rdkafka)
// ---------------------------------------------------------------------------

/// Client settings suited to tests on loopback: fast reconnects, short group
/// session (else the first join takes ~23 s against tansu).
pub fn client_config(bootstrap: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("reconnect.backoff.ms", "50")
        .set("reconnect.backoff.max.ms", "500")
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("topic.metadata.refresh.interval.ms", "2000");
    let settings = CLIENT_SETTINGS.lock().unwrap_or_else(|p| p.into_inner());
    for (k, v) in settings.get(bootstrap).into_iter().flatten() {
        cfg.set(k, v);
    }
    cfg
}

fn consumer_config(bootstrap: &str, group: &str) -> ClientConfig {
    let mut cfg = client_config(bootstrap);
    cfg.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .set("fetch.wait.max.ms", "100")
        .set("enable.partition.eof", "false");
    cfg
}

/// Run a blocking librdkafka call off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking kafka task panicked")
}

/// True when a metadata request through `bootstrap` returns at least one broker.
pub async fn metadata_ok(bootstrap: &str) -> bool {
    let cfg = client_config(bootstrap);
    blocking(move || {
        let Ok(c) = cfg.create::<BaseConsumer>() else {
            return false;
        };
        c.fetch_metadata(None, Duration::from_secs(2))
            .is_ok_and(|md| !md.brokers().is_empty())
    })
    .await
}

/// Number of partitions of `topic`, or `None` if unknown to the broker.
pub async fn partition_count(bootstrap: &str, topic: &str) -> Option<i32> {
    let cfg = client_config(bootstrap);
    let topic = topic.to_owned();
    blocking(move || {
        let c = cfg.create::<BaseConsumer>().ok()?;
        let md = c
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .ok()?;
        let t = md.topics().iter().find(|t| t.name() == topic)?;
        if t.error().is_some() || t.partitions().is_empty() {
            return None;
        }
        i32::try_from(t.partitions().len()).ok()
    })
    .await
}

/// A producer that waits for each delivery report.
pub struct Producer {
    inner: FutureProducer,
}

impl Producer {
    pub fn new(bootstrap: &str) -> Self {
        Self::with_config(bootstrap, &[])
    }

    /// With extra librdkafka settings, e.g. `[("message.timeout.ms", "2000")]`.
    pub fn with_config(bootstrap: &str, overrides: &[(&str, &str)]) -> Self {
        let mut cfg = client_config(bootstrap);
        cfg.set("message.timeout.ms", "30000").set("linger.ms", "1");
        for (k, v) in overrides {
            cfg.set(*k, *v);
        }
        Self {
            inner: cfg.create().expect("create producer"),
        }
    }

    /// Produce one record and wait for delivery: `(partition, offset)`.
    pub async fn send(
        &self,
        topic: &str,
        key: impl AsRef<[u8]>,
        payload: impl AsRef<[u8]>,
        headers: &[(&str, &[u8])],
    ) -> Result<(i32, i64), KafkaError> {
        self.send_opt(
            topic,
            Some(key.as_ref()),
            Some(payload.as_ref()),
            headers,
            None,
        )
        .await
    }

    /// Full control: null key or payload, explicit partition.
    pub async fn send_opt(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&str, &[u8])],
        partition: Option<i32>,
    ) -> Result<(i32, i64), KafkaError> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        if !headers.is_empty() {
            let mut h = OwnedHeaders::new_with_capacity(headers.len());
            for (k, v) in headers {
                h = h.insert(Header {
                    key: k,
                    value: Some(*v),
                });
            }
            record = record.headers(h);
        }
        self.inner
            .send(record, Timeout::After(Duration::from_secs(10)))
            .await
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| e)
    }
}

/// Produce one record with a throwaway producer; panics if it is not delivered.
pub async fn produce(
    bootstrap: &str,
    topic: &str,
    key: impl AsRef<[u8]>,
    payload: impl AsRef<[u8]>,
    headers: &[(&str, &[u8])],
) -> (i32, i64) {
    Producer::new(bootstrap)
        .send(topic, key, payload, headers)
        .await
        .unwrap_or_else(|e| panic!("produce to {topic} via {bootstrap}: {e}"))
}

/// A record read back by [`consume_all`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// Header name to value (a repeated name keeps the last value; a null value is empty).
    pub headers: BTreeMap<String, Vec<u8>>,
}

impl Consumed {
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    pub fn payload_str(&self) -> Option<&str> {
        self.payload
            .as_deref()
            .and_then(|p| std::str::from_utf8(p).ok())
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name).map(Vec::as_slice)
    }

    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// Read `topic` from the beginning of every partition until `expected_count`
/// records arrived; panics if fewer arrive within `timeout`. Uses a fresh group id
/// and manual assignment (no group join, nothing committed). Sorted by
/// (partition, offset).
pub async fn consume_all(
    bootstrap: &str,
    topic: &str,
    expected_count: usize,
    timeout: Duration,
) -> Vec<Consumed> {
    let got = consume_up_to(bootstrap, topic, expected_count, timeout).await;
    assert!(
        got.len() >= expected_count,
        "consumed {} of {expected_count} expected records from {topic} within {timeout:?}",
        got.len()
    );
    got
}

/// Like [`consume_all`] but returns whatever arrived (at most `max_count`) when
/// the timeout passes, without panicking.
pub async fn consume_up_to(
    bootstrap: &str,
    topic: &str,
    max_count: usize,
    timeout: Duration,
) -> Vec<Consumed> {
    read_topic(bootstrap, topic, timeout, |got| got.len() >= max_count).await
}

/// Every record of `topic` up to the end offsets it has as the call begins
/// ([`end_offsets`]), from the beginning of every partition. Returns as soon
/// as they are all read; panics saying how many are missing if they are not
/// within `timeout` (a fixed wait, as [`consume_up_to`] has, can end before a
/// slow reader got them all). Sorted by (partition, offset).
pub async fn consume_to_end(bootstrap: &str, topic: &str, timeout: Duration) -> Vec<Consumed> {
    let ends = end_offsets(bootstrap, &[topic]).await;
    let reached = |got: &[Consumed]| {
        ends.iter().all(|((_, p), end)| {
            *end == 0
                || got
                    .iter()
                    .any(|c| c.partition == *p && c.offset + 1 >= *end)
        })
    };
    let got = read_topic(bootstrap, topic, timeout, reached).await;
    assert!(
        reached(&got),
        "{topic}: read {} records in {timeout:?}, not up to its end offsets {ends:?}",
        got.len()
    );
    got
}

/// Reads `topic` from the beginning of every partition (a fresh group id,
/// manual assignment, nothing committed) until `enough` says so or `timeout`
/// passes. Sorted by (partition, offset).
async fn read_topic(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    enough: impl Fn(&[Consumed]) -> bool,
) -> Vec<Consumed> {
    let deadline = Instant::now() + timeout;
    let partitions = wait_for(
        timeout,
        POLL,
        &format!("topic {topic} to exist"),
        async || partition_count(bootstrap, topic).await,
    )
    .await;
    let consumer: StreamConsumer = consumer_config(bootstrap, &unique_name("harness-reader"))
        .create()
        .expect("create consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("add partition");
    }
    consumer.assign(&tpl).expect("assign partitions");

    let mut out = Vec::new();
    while !enough(&out) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            break;
        }
        match tokio::time::timeout(remaining, consumer.recv()).await {
            Err(_) => break,
            Ok(Err(e)) => {
                // Transient fetch errors are retried until the deadline.
                eprintln!("consume {topic}: {e}");
                tokio::time::sleep(POLL).await;
            }
            Ok(Ok(m)) => {
                let mut headers = BTreeMap::new();
                if let Some(hs) = m.headers() {
                    for h in hs.iter() {
                        headers.insert(h.key.to_owned(), h.value.unwrap_or_default().to_vec());
                    }
                }
                out.push(Consumed {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
            }
        }
    }
    out.sort_by_key(|c| (c.partition, c.offset));
    out
}

/// The distinct records of `got` by the id `id_of` reads from a payload,
/// first seen first: an output may repeat a record, but only exactly (its
/// contract), so a repeated id with other bytes fails the test.
pub fn distinct_by_id(got: Vec<Consumed>, id_of: impl Fn(&[u8]) -> String) -> Vec<Consumed> {
    let mut seen: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut out = Vec::new();
    for r in got {
        let payload = r.payload.clone().expect("an output record has a value");
        let id = id_of(&payload);
        match seen.get(&id) {
            Some(first) => assert_eq!(
                first, &payload,
                "a repeated id {id} must be an exact repeat"
            ),
            None => {
                seen.insert(id, payload);
                out.push(r);
            }
        }
    }
    out
}

/// All partitions of `topics` as a list (for offset queries).
async fn topic_partitions(bootstrap: &str, topics: &[&str]) -> Vec<(String, i32)> {
    let mut all = Vec::new();
    for t in topics {
        let n = wait_for(
            DEFAULT_TIMEOUT,
            POLL,
            &format!("topic {t} to exist"),
            async || partition_count(bootstrap, t).await,
        )
        .await;
        all.extend((0..n).map(|p| (t.to_string(), p)));
    }
    all
}

/// Offsets committed by `group`: (topic, partition) -> next offset to read.
/// Partitions without a commit are absent.
pub async fn committed_offsets(
    bootstrap: &str,
    group: &str,
    topics: &[&str],
) -> BTreeMap<(String, i32), i64> {
    let parts = topic_partitions(bootstrap, topics).await;
    let cfg = consumer_config(bootstrap, group);
    blocking(move || {
        let c: BaseConsumer = cfg.create().expect("create consumer");
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &parts {
            tpl.add_partition(t, *p);
        }
        let got = c
            .committed_offsets(tpl, Duration::from_secs(10))
            .expect("fetch committed offsets");
        got.elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some(((e.topic().to_owned(), e.partition()), o)),
                _ => None,
            })
            .collect()
    })
    .await
}

/// End offsets: (topic, partition) -> offset of the next record to be written.
///
/// Not simply the high watermark: tansu 0.6 reports it as the first offset of
/// the partition's last record batch + 1, which under-counts a batching
/// producer's records (and made "caught up" true while a lapse that had just
/// committed that offset still had the rest of the batch to apply). So the
/// tail is read from `high - 1` to the end of the partition.
pub async fn end_offsets(bootstrap: &str, topics: &[&str]) -> BTreeMap<(String, i32), i64> {
    let parts = topic_partitions(bootstrap, topics).await;
    let cfg = client_config(bootstrap);
    let mut reader_cfg = client_config(bootstrap);
    blocking(move || {
        let c: BaseConsumer = cfg.create().expect("create consumer");
        let mut ends = BTreeMap::new();
        let mut tail = TopicPartitionList::new();
        for (t, p) in parts {
            let (low, high) = c
                .fetch_watermarks(&t, p, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("watermarks {t}/{p}: {e}"));
            if high > low {
                tail.add_partition_offset(&t, p, Offset::Offset(high - 1))
                    .expect("a tail offset");
            }
            ends.insert((t, p), high);
        }
        let want = tail.count();
        if want == 0 {
            return ends;
        }
        // A fetch returns whole record batches: once a partition's first tail
        // record is here, the rest of its last batch is in the local queue.
        let reader: BaseConsumer = reader_cfg
            .set("group.id", "lapse-test-tail")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .create()
            .expect("create tail reader");
        reader.assign(&tail).expect("assign the tails");
        let mut seen = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let wait = if seen.len() < want { 50 } else { 0 };
            match reader.poll(Duration::from_millis(wait)) {
                Some(Ok(m)) => {
                    let tp = (m.topic().to_string(), m.partition());
                    let e = ends.entry(tp.clone()).or_insert(0);
                    *e = (*e).max(m.offset() + 1);
                    seen.insert(tp);
                }
                Some(Err(e)) => panic!("reading the tails of the partitions: {e}"),
                None if seen.len() == want => break,
                None => assert!(
                    Instant::now() < deadline,
                    "reading the tails of {want} partitions: {} answered in 20 s",
                    seen.len()
                ),
            }
        }
        ends
    })
    .await
}

// ---------------------------------------------------------------------------
// Schema registry stub
// ---------------------------------------------------------------------------

/// A minimal Confluent-Schema-Registry-compatible HTTP server on 127.0.0.1:0.
///
/// It exists because no Confluent Schema Registry distribution can be installed on
/// the build and CI machines (no Docker, no Confluent packages in the reachable
/// registries). It serves what lapse and Confluent's own client library call
/// (confluent-kafka's `SchemaRegistryClient`, `AvroSerializer` and
/// `AvroDeserializer`, exercised by `tests/interop.rs`), with Confluent's JSON
/// shapes, error codes and content type (`application/vnd.schemaregistry.v1+json`):
///
/// * `POST /subjects/{subject}/versions` with `{"schema": "...", "schemaType"?,
///   "references"?}` -> `{"id": N}`. The same schema (same `schemaType`, default
///   `AVRO`; Avro compared as parsed JSON) always gets the same id, in any subject,
///   and becomes the subject's next version unless it is registered there already.
///   422 `42201` for a schema that is not JSON (Avro) or has no `schema`.
/// * `POST /subjects/{subject}` (lookup: is this schema registered under the
///   subject?) -> `{"subject", "id", "version", "schema"}`; 404 `40401` (subject
///   not found) or `40403` (schema not found).
/// * `GET /schemas/ids/{id}` -> `{"schema": "..."}`, plus `"schemaType"` unless it
///   is `AVRO` (as Confluent answers); 404 `40403` "Schema not found". Counted by
///   [`id_lookups`](Self::id_lookups).
/// * `GET /schemas/ids/{id}/versions` -> `[{"subject", "version"}]`;
///   `GET /schemas/types` -> `["AVRO", "JSON", "PROTOBUF"]`.
/// * `GET /subjects` -> names; `GET /subjects/{subject}/versions` -> `[1, 2, ...]`;
///   `GET /subjects/{subject}/versions/{version}` (a number, `latest` or `-1`) ->
///   `{"subject", "id", "version", "schema"}`; 404 `40401` / `40402`, 422 `42202`.
/// * `GET /config` -> `{"compatibilityLevel": "BACKWARD"}`; `GET /config/{subject}`
///   -> 404 `40408` (no subject-level setting).
/// * `GET /associations/resources/{namespace}/{topic}` -> `[]`: no topic-subject
///   associations. (confluent-kafka 2.16's default subject name strategy asks
///   this first, then falls back to `<topic>-value`.)
/// * Anything else: 404 `{"error_code": 404, "message": "HTTP 404 Not Found"}`.
///
/// Query parameters (`normalize`, `deleted`, `subject`, `format`, ...) are accepted
/// and ignored. Every request is recorded as `METHOD /path?query`
/// ([`requests`](Self::requests)).
/// [`set_available(false)`](Self::set_available) makes every call answer 503
/// (`50003`), to test "registry down" (retry) apart from "schema unknown" (dead letter).
pub struct SchemaRegistryStub {
    addr: SocketAddr,
    state: Arc<Mutex<RegistryState>>,
    rt: Option<tokio::runtime::Runtime>,
}

/// One registered schema.
struct StoredSchema {
    /// The text as first registered.
    text: String,
    /// `AVRO`, `JSON` or `PROTOBUF`.
    schema_type: String,
}

#[derive(Default)]
struct RegistryState {
    /// Schemas by id - 1.
    schemas: Vec<StoredSchema>,
    /// (schema type, normalized schema) -> id.
    ids: HashMap<(String, String), u32>,
    /// Subject -> ids registered under it, in version order (version = index + 1).
    subjects: BTreeMap<String, Vec<u32>>,
    /// Number of `GET /schemas/ids/{id}` requests served.
    id_lookups: u64,
    /// Every request received, as `METHOD /path?query`.
    requests: Vec<String>,
    unavailable: bool,
    /// When set, every request must carry this `Authorization` header value
    /// (else 401 `40101`, as Confluent answers).
    required_auth: Option<String>,
    /// When set, `POST /subjects/{s}/versions` answers this error
    /// (status, error_code, message), as a registry that refuses a schema does.
    refuse_registration: Option<(u16, u32, String)>,
}

impl RegistryState {
    fn schema(&self, id: u32) -> Option<&StoredSchema> {
        let index = usize::try_from(id).ok()?.checked_sub(1)?;
        self.schemas.get(index)
    }

    /// `{"schema": ...}`, with `schemaType` unless it is AVRO (Confluent's shape).
    fn schema_json(&self, id: u32) -> Option<serde_json::Value> {
        let s = self.schema(id)?;
        let mut v = serde_json::json!({ "schema": s.text });
        if s.schema_type != "AVRO" {
            v["schemaType"] = s.schema_type.clone().into();
        }
        Some(v)
    }

    /// `{"subject", "id", "version", "schema"}` of `subject`'s `version` (1-based).
    fn version_json(&self, subject: &str, version: usize) -> Option<serde_json::Value> {
        let id = *self.subjects.get(subject)?.get(version.checked_sub(1)?)?;
        let mut v = self.schema_json(id)?;
        v["subject"] = subject.into();
        v["id"] = id.into();
        v["version"] = version.into();
        Some(v)
    }
}

const REGISTRY_CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

type RegistryReply = (
    axum::http::StatusCode,
    [(axum::http::header::HeaderName, &'static str); 1],
    String,
);

fn registry_reply(status: u16, body: serde_json::Value) -> RegistryReply {
    (
        axum::http::StatusCode::from_u16(status).expect("status code"),
        [(axum::http::header::CONTENT_TYPE, REGISTRY_CONTENT_TYPE)],
        body.to_string(),
    )
}

fn registry_error(status: u16, code: u32, message: &str) -> RegistryReply {
    registry_reply(
        status,
        serde_json::json!({ "error_code": code, "message": message }),
    )
}

fn subject_not_found(subject: &str) -> RegistryReply {
    registry_error(404, 40401, &format!("Subject '{subject}' not found."))
}

/// The schema a register or lookup request carries: `(type, text, identity)`,
/// where equal identities mean the same schema (and the same id).
fn schema_request(body: &[u8]) -> Result<(String, String, String), RegistryReply> {
    let invalid = || registry_error(422, 42201, "Invalid schema");
    let req: serde_json::Value = serde_json::from_slice(body).map_err(|_| invalid())?;
    let text = req
        .get("schema")
        .and_then(|s| s.as_str())
        .ok_or_else(invalid)?
        .to_owned();
    let schema_type = req
        .get("schemaType")
        .and_then(|t| t.as_str())
        .unwrap_or("AVRO")
        .to_ascii_uppercase();
    let identity = if schema_type == "PROTOBUF" {
        text.clone()
    } else {
        // Avro and JSON Schema are JSON: compare parsed (keys sorted, no whitespace).
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|_| invalid())?
            .to_string()
    };
    Ok((schema_type, text, identity))
}

impl SchemaRegistryStub {
    pub fn start() -> Self {
        use axum::extract::{Path as UrlPath, Request, State};
        use axum::middleware::Next;
        use axum::response::{IntoResponse, Response};
        use axum::routing::{get, post};

        type Shared = Arc<Mutex<RegistryState>>;

        /// Records every request; answers 503 for all of them while unavailable.
        async fn gate(State(state): State<Shared>, req: Request, next: Next) -> Response {
            {
                let mut st = state.lock().expect("registry state");
                st.requests.push(format!("{} {}", req.method(), req.uri()));
                if let Some(want) = &st.required_auth {
                    let got = req
                        .headers()
                        .get(axum::http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok());
                    if got != Some(want.as_str()) {
                        return registry_error(401, 40101, "Unauthorized (test stub)")
                            .into_response();
                    }
                }
                if st.unavailable {
                    return registry_error(503, 50003, "Service unavailable (test stub)")
                        .into_response();
                }
            }
            next.run(req).await
        }

        async fn register(
            State(state): State<Shared>,
            UrlPath(subject): UrlPath<String>,
            body: axum::body::Bytes,
        ) -> RegistryReply {
            let (schema_type, text, identity) = match schema_request(&body) {
                Ok(s) => s,
                Err(reply) => return reply,
            };
            let mut st = state.lock().expect("registry state");
            if let Some((status, code, message)) = &st.refuse_registration {
                return registry_error(*status, *code, message);
            }
            let key = (schema_type.clone(), identity);
            let id = match st.ids.get(&key) {
                Some(id) => *id,
                None => {
                    st.schemas.push(StoredSchema { text, schema_type });
                    let id = u32::try_from(st.schemas.len()).expect("schema count");
                    st.ids.insert(key, id);
                    id
                }
            };
            let versions = st.subjects.entry(subject).or_default();
            if !versions.contains(&id) {
                versions.push(id);
            }
            registry_reply(200, serde_json::json!({ "id": id }))
        }

        async fn lookup(
            State(state): State<Shared>,
            UrlPath(subject): UrlPath<String>,
            body: axum::body::Bytes,
        ) -> RegistryReply {
            let (schema_type, _, identity) = match schema_request(&body) {
                Ok(s) => s,
                Err(reply) => return reply,
            };
            let st = state.lock().expect("registry state");
            let Some(versions) = st.subjects.get(&subject) else {
                return subject_not_found(&subject);
            };
            let found = st
                .ids
                .get(&(schema_type, identity))
                .and_then(|id| versions.iter().position(|v| v == id))
                .and_then(|i| st.version_json(&subject, i + 1));
            match found {
                Some(v) => registry_reply(200, v),
                None => registry_error(404, 40403, "Schema not found"),
            }
        }

        async fn schema_by_id(
            State(state): State<Shared>,
            UrlPath(id): UrlPath<String>,
        ) -> RegistryReply {
            let mut st = state.lock().expect("registry state");
            st.id_lookups += 1;
            match id.parse().ok().and_then(|id| st.schema_json(id)) {
                Some(v) => registry_reply(200, v),
                None => registry_error(404, 40403, "Schema not found"),
            }
        }

        async fn versions_of_id(
            State(state): State<Shared>,
            UrlPath(id): UrlPath<String>,
        ) -> RegistryReply {
            let st = state.lock().expect("registry state");
            let Some(id) = id.parse::<u32>().ok().filter(|id| st.schema(*id).is_some()) else {
                return registry_error(404, 40403, "Schema not found");
            };
            let uses: Vec<serde_json::Value> = st
                .subjects
                .iter()
                .filter_map(|(subject, ids)| {
                    let i = ids.iter().position(|v| *v == id)?;
                    Some(serde_json::json!({ "subject": subject, "version": i + 1 }))
                })
                .collect();
            registry_reply(200, uses.into())
        }

        async fn subjects(State(state): State<Shared>) -> RegistryReply {
            let st = state.lock().expect("registry state");
            let names: Vec<&String> = st.subjects.keys().collect();
            registry_reply(200, serde_json::json!(names))
        }

        async fn versions(
            State(state): State<Shared>,
            UrlPath(subject): UrlPath<String>,
        ) -> RegistryReply {
            let st = state.lock().expect("registry state");
            match st.subjects.get(&subject) {
                Some(ids) => registry_reply(200, (1..=ids.len()).collect::<Vec<_>>().into()),
                None => subject_not_found(&subject),
            }
        }

        async fn version(
            State(state): State<Shared>,
            UrlPath((subject, version)): UrlPath<(String, String)>,
        ) -> RegistryReply {
            let st = state.lock().expect("registry state");
            let Some(ids) = st.subjects.get(&subject) else {
                return subject_not_found(&subject);
            };
            let n = match version.as_str() {
                "latest" | "-1" => ids.len(),
                v => match v.parse::<usize>() {
                    Ok(n) if n >= 1 => n,
                    _ => {
                        return registry_error(
                            422,
                            42202,
                            &format!(
                                "The specified version '{version}' is not a valid version id. \
                                 Allowed values are between [1, 2^31-1] and the string \"latest\""
                            ),
                        )
                    }
                },
            };
            match st.version_json(&subject, n) {
                Some(v) => registry_reply(200, v),
                None => registry_error(404, 40402, &format!("Version {version} not found.")),
            }
        }

        async fn global_config() -> RegistryReply {
            registry_reply(200, serde_json::json!({ "compatibilityLevel": "BACKWARD" }))
        }

        async fn subject_config(UrlPath(subject): UrlPath<String>) -> RegistryReply {
            registry_error(
                404,
                40408,
                &format!(
                    "Subject '{subject}' does not have subject-level compatibility configured"
                ),
            )
        }

        async fn schema_types() -> RegistryReply {
            registry_reply(200, serde_json::json!(["AVRO", "JSON", "PROTOBUF"]))
        }

        async fn no_associations() -> RegistryReply {
            registry_reply(200, serde_json::json!([]))
        }

        async fn not_found() -> RegistryReply {
            registry_error(404, 404, "HTTP 404 Not Found")
        }

        let state: Shared = Arc::default();
        let app = axum::Router::new()
            .route("/subjects", get(subjects))
            .route("/subjects/{subject}", post(lookup))
            .route("/subjects/{subject}/versions", get(versions).post(register))
            .route("/subjects/{subject}/versions/{version}", get(version))
            .route("/schemas/ids/{id}", get(schema_by_id))
            .route("/schemas/ids/{id}/versions", get(versions_of_id))
            .route("/schemas/types", get(schema_types))
            .route("/config", get(global_config))
            .route("/config/{subject}", get(subject_config))
            .route(
                "/associations/resources/{namespace}/{name}",
                get(no_associations),
            )
            .fallback(not_found)
            .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
            .with_state(state.clone());

        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind registry port");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("registry addr");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-schema-registry")
            .enable_all()
            .build()
            .expect("registry runtime");
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            state,
            rt: Some(rt),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Register `schema_json` (an Avro schema as JSON text) under `subject` over
    /// HTTP, like a producer would; returns the schema id.
    pub async fn register(&self, subject: &str, schema_json: &str) -> u32 {
        let resp = reqwest::Client::new()
            .post(format!("{}/subjects/{subject}/versions", self.url()))
            .header(reqwest::header::CONTENT_TYPE, REGISTRY_CONTENT_TYPE)
            .body(serde_json::json!({ "schema": schema_json }).to_string())
            .send()
            .await
            .expect("POST schema");
        let status = resp.status();
        let body = resp.text().await.expect("registry response body");
        assert!(status.is_success(), "register {subject}: {status} {body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("registry JSON");
        let id = v["id"].as_u64().expect("id in registry response");
        u32::try_from(id).expect("id fits u32")
    }

    /// How many `GET /schemas/ids/{id}` requests were served (to check caching).
    pub fn id_lookups(&self) -> u64 {
        self.state.lock().expect("registry state").id_lookups
    }

    /// Every request received so far, as `METHOD /path?query`, oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().expect("registry state").requests.clone()
    }

    /// Schema ids registered under `subject`, in version order (empty if unknown).
    pub fn subject_ids(&self, subject: &str) -> Vec<u32> {
        let st = self.state.lock().expect("registry state");
        st.subjects.get(subject).cloned().unwrap_or_default()
    }

    /// Registration answers `status` with Confluent's `error_code` and
    /// `message` (e.g. 409/409 "incompatible", 403/40301 "forbidden"); `None`
    /// registers again.
    pub fn refuse_registration(&self, refusal: Option<(u16, u32, &str)>) {
        self.state
            .lock()
            .expect("registry state")
            .refuse_registration = refusal.map(|(s, c, m)| (s, c, m.to_owned()));
    }

    /// Every request must carry `Authorization: Basic base64(user:password)`.
    pub fn require_basic_auth(&self, user: &str, password: &str) {
        let token = base64(format!("{user}:{password}").as_bytes());
        self.state.lock().expect("registry state").required_auth = Some(format!("Basic {token}"));
    }

    /// Every request must carry `Authorization: Bearer TOKEN`.
    pub fn require_bearer_token(&self, token: &str) {
        self.state.lock().expect("registry state").required_auth = Some(format!("Bearer {token}"));
    }

    /// `host:port` of the plain HTTP listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// When false, every request answers 503 (registry down).
    pub fn set_available(&self, available: bool) {
        self.state.lock().expect("registry state").unavailable = !available;
    }
}

impl Drop for SchemaRegistryStub {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Standard base64 with padding (basic auth headers).
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// GET `url`: `(status, body)`, or an error string if there was no HTTP answer.
pub async fn http_get_url(url: &str) -> Result<(u16, String), String> {
    let resp = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?
        .get(url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp.text().await.map_err(|e| format!("GET {url}: {e}"))?;
    Ok((status, body))
}

// ---------------------------------------------------------------------------
// The lapse binary
// ---------------------------------------------------------------------------

/// Drop `LAPSE_*` variables inherited from the developer's shell or CI, so only
/// what a test passes explicitly can override its config file.
fn clear_inherited_lapse_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("LAPSE_") {
            cmd.env_remove(key);
        }
    }
}

/// Path of the `lapse` binary built for these tests. Cargo names it only to
/// the product's own tests; the tools' tests take the one the workspace build
/// (`cargo nextest run --workspace`) put in their target directory.
pub fn lapse_bin() -> &'static str {
    if let Some(bin) = option_env!("CARGO_BIN_EXE_lapse") {
        return bin;
    }
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        // This test executable is target/<profile>/deps/NAME-HASH.
        let exe = std::env::current_exe().expect("this test's executable");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps")
            .join("lapse");
        assert!(
            bin.is_file(),
            "{} is missing: run the tests of the whole workspace (`cargo nextest run --workspace`), \
             or `cargo build --bin lapse` first",
            bin.display()
        );
        bin.display().to_string()
    })
}

/// A running `lapse` (or, for harness self-tests, any program). stdout and stderr
/// go to files in its temp dir (one pair per run); they are printed if the test
/// panics while this handle is alive. Killed (SIGKILL) on drop.
///
/// Unless the caller sets `LAPSE_HTTP_LISTEN`, it is set to a free loopback port,
/// used by [`http_get`](Self::http_get). `LAPSE_*` variables of the test's own
/// environment are not passed on (only `envs` are). The working directory is
/// inherited (the crate root under `cargo test` and nextest).
pub struct LapseProcess {
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    http_port: u16,
    dir: TempDir,
    run: u32,
    child: Option<Child>,
    status: Option<ExitStatus>,
}

impl LapseProcess {
    /// Spawn `lapse ARGS` with extra environment `envs`.
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::spawn_program(lapse_bin(), args, envs)
    }

    /// Spawn any program with the same supervision (used by the harness self-test).
    pub fn spawn_program(program: impl AsRef<Path>, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut envs: Vec<(String, String)> = envs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let http_port = match envs.iter().find(|(k, _)| k == "LAPSE_HTTP_LISTEN") {
            Some((_, v)) => v
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("LAPSE_HTTP_LISTEN={v}: expected HOST:PORT")),
            None => {
                let port = free_port();
                envs.push(("LAPSE_HTTP_LISTEN".into(), format!("127.0.0.1:{port}")));
                port
            }
        };
        if !envs.iter().any(|(k, _)| k == "RUST_BACKTRACE") {
            envs.push(("RUST_BACKTRACE".into(), "1".into()));
        }
        let mut p = Self {
            program: program.as_ref().to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            envs,
            http_port,
            dir: scratch_dir("lapse"),
            run: 0,
            child: None,
            status: None,
        };
        p.launch();
        p
    }

    fn launch(&mut self) {
        self.run += 1;
        self.status = None;
        let mut cmd = Command::new(&self.program);
        clear_inherited_lapse_env(&mut cmd);
        cmd.args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            // Own process group, so kill9/drop also reach anything it spawned.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(open_append(&self.stdout_path()))
            .stderr(open_append(&self.stderr_path()));
        sys::die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.program.display()));
        self.child = Some(child);
    }

    /// Start the same command again (same args, env and HTTP port) after it exited
    /// or was killed. Output goes to new files (`stdout()` shows the new run).
    pub fn restart(&mut self) {
        assert!(
            !self.is_running(),
            "restart: process {} is still running",
            self.pid()
        );
        self.launch();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("process was started").id()
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// `http://127.0.0.1:PORT`
    pub fn http_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The process's own temp dir (logs live here; tests may put files here too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn stdout_path(&self) -> PathBuf {
        self.dir.path().join(format!("stdout.{}.log", self.run))
    }

    pub fn stderr_path(&self) -> PathBuf {
        self.dir.path().join(format!("stderr.{}.log", self.run))
    }

    /// stdout of the current run so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path())
    }

    /// stderr of the current run so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path())
    }

    /// stdout and stderr of every run so far (e.g. to check that no customer data
    /// was ever logged).
    pub fn all_output(&self) -> String {
        let mut all = String::new();
        for run in 1..=self.run {
            for stream in ["stdout", "stderr"] {
                all.push_str(&read_lossy(
                    &self.dir.path().join(format!("{stream}.{run}.log")),
                ));
            }
        }
        all
    }

    /// Exit status if the process has exited (reaps it).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.status = child.try_wait().expect("try_wait");
            }
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_status().is_none()
    }

    /// Ask for a graceful shutdown.
    pub fn sigterm(&mut self) {
        if self.is_running() {
            sys::signal(self.pid(), sys::SIGTERM).expect("send SIGTERM");
        }
    }

    /// SIGKILL (the process and its process group) and reap; returns the exit status.
    pub fn kill9(&mut self) -> ExitStatus {
        if let Some(child) = self.child.as_mut() {
            kill_group_and_reap(child);
            self.status = Some(child.wait().expect("wait after SIGKILL"));
        }
        self.status.expect("process was started")
    }

    /// Wait for the process to exit; panics (showing its output) after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} (pid {}) did not exit within {timeout:?}",
                    self.program.display(),
                    self.pid()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GET `path` on the process's HTTP port: `(status, body)`, or an error
    /// string if nothing answered (e.g. not listening yet).
    pub async fn http_get(&self, path: &str) -> Result<(u16, String), String> {
        http_get_url(&format!("{}{path}", self.http_base())).await
    }

    /// Wait until `GET path` answers 200; panics early if the process exits.
    pub async fn wait_http_ok(&mut self, path: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                panic!("process exited ({status}) before GET {path} answered 200");
            }
            let last = match self.http_get(path).await {
                Ok((200, _)) => return,
                Ok((code, body)) => format!("{code} {body}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!("GET {path} not 200 within {timeout:?}; last answer: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until `/readyz` answers 200.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        self.wait_http_ok("/readyz", timeout).await
    }
}

impl Drop for LapseProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let label = format!("{} (run {})", self.program.display(), self.run);
            dump_if_panicking(&label, &[&self.stdout_path(), &self.stderr_path()]);
        }
        if let Some(child) = self.child.as_mut() {
            kill_group_and_reap(child);
        }
    }
}

/// SIGKILL a child spawned with `process_group(0)` together with its group, then
/// reap it. Members of the group outlive the leader's exit, so this is done even
/// when the leader already exited.
fn kill_group_and_reap(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // The group id equals the leader's pid; the leader stays a zombie (and the
        // id stays reserved) until reaped below, so the id cannot be reused yet.
        let _ = sys::signal_group(pid, sys::SIGKILL);
    }
    let _ = child.wait();
}

/// Run `lapse ARGS` to completion (for one-shot commands such as `inspect` or
/// `check-config`); panics if it does not finish within `timeout`.
pub async fn run_lapse(
    args: &[&str],
    envs: &[(&str, &str)],
    timeout: Duration,
) -> std::process::Output {
    let mut cmd = Command::new(lapse_bin());
    clear_inherited_lapse_env(&mut cmd);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(timeout, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("lapse {args:?} did not finish within {timeout:?}"))
        .expect("run lapse")
}
