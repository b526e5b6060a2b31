//! The `lapse run` child process of the benchmarks that measure the service
//! (`consume`, `latency`, `timers`): started with a run's config, its own
//! consumer group and HTTP port, output to a log file; observed through its
//! `/metrics`; stopped with SIGTERM, recording whether it exited 0.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::prom::Scrape;

/// A running `lapse run`; killed if dropped before [`LapseChild::stop`] (a
/// run that ends with an error).
pub(super) struct LapseChild {
    child: tokio::process::Child,
    pub pid: u32,
    pub port: u16,
    /// When the process was started.
    pub spawned: Instant,
    pub log_path: PathBuf,
    /// A client for its HTTP port (2 s timeout) and its `/metrics` URL.
    pub http: reqwest::Client,
    pub metrics_url: String,
}

impl LapseChild {
    /// `BIN run --config CONFIG` with `LAPSE_GROUP_ID=group` and a free HTTP
    /// port; stdout and stderr go to `log_path`.
    pub fn spawn(
        bin: &Path,
        config: &Path,
        group: &str,
        log_path: PathBuf,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let log = std::fs::File::create(&log_path)?;
        let spawned = Instant::now();
        let child = tokio::process::Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("LAPSE_GROUP_ID", group)
            .env("LAPSE_HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} run", bin.display()))?;
        let pid = child.id().context("child pid")?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        Ok(LapseChild {
            child,
            pid,
            port,
            spawned,
            log_path,
            http,
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
        })
    }

    /// `/metrics` now; `None` if it cannot be read.
    pub async fn metrics(&self) -> Option<Scrape> {
        scrape(&self.http, &self.metrics_url).await
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// An error saying `what`, with the tail of lapse's log.
    pub fn fail(&self, what: String) -> anyhow::Error {
        anyhow::anyhow!(
            "{what}; lapse log {}:\n{}",
            self.log_path.display(),
            log_tail(&self.log_path)
        )
    }

    /// Waits until `/readyz` answers 200 (Redis and the broker reachable).
    pub async fn wait_ready(&self, deadline: Instant) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{}/readyz", self.port);
        while Instant::now() < deadline {
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("lapse not ready in time")
    }

    /// SIGTERM (what a user's supervisor sends), then up to 60 s for it to
    /// finish; killed if it does not exit 0. Returns whether it exited 0.
    pub async fn stop(mut self, run: usize) -> bool {
        terminate(self.pid);
        let exit = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await;
        let exit_ok = matches!(exit, Ok(Ok(st)) if st.success());
        if !exit_ok {
            eprintln!(
                "  run {run}: lapse did not exit 0 after SIGTERM ({exit:?}); see {}",
                self.log_path.display()
            );
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        exit_ok
    }
}

/// The lapse instances of one run, all in one consumer group (`bench consume
/// --instances`): they share the partitions; their metrics are read together.
pub(super) struct Fleet {
    pub children: Vec<LapseChild>,
}

impl Fleet {
    /// `n` instances of `bin run --config CONFIG` in `group`; instance `i`
    /// logs to `log_of(i)`.
    pub fn spawn(
        bin: &Path,
        config: &Path,
        group: &str,
        n: usize,
        log_of: impl Fn(usize) -> PathBuf,
    ) -> anyhow::Result<Fleet> {
        let children = (0..n.max(1))
            .map(|i| LapseChild::spawn(bin, config, group, log_of(i)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Fleet { children })
    }

    /// When the first instance was started.
    pub fn spawned(&self) -> Instant {
        self.children[0].spawned
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.pid).collect()
    }

    /// Every instance's `/metrics` as one scrape (the samples of all of them:
    /// sums and histogram buckets add up); `None` if one cannot be read.
    pub async fn metrics(&self) -> Option<Scrape> {
        let mut all = Scrape {
            samples: Vec::new(),
        };
        for c in &self.children {
            all.samples.extend(c.metrics().await?.samples);
        }
        Some(all)
    }

    /// The exit status of the first instance found exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        for c in &mut self.children {
            if let Some(st) = c.exited()? {
                return Ok(Some(st));
            }
        }
        Ok(None)
    }

    /// An error saying `what`, with the tail of the first instance's log.
    pub fn fail(&self, what: String) -> anyhow::Error {
        self.children[0].fail(what)
    }

    /// Stops every instance (see [`LapseChild::stop`]); whether all exited 0.
    pub async fn stop(self, run: usize) -> bool {
        let mut ok = true;
        for c in self.children {
            ok &= c.stop(run).await;
        }
        ok
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Sends SIGTERM to `pid`.
fn terminate(pid: u32) {
    unsafe extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    const SIGTERM: i32 = 15;
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            kill(pid, SIGTERM);
        }
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `/metrics` at `url`; `None` if it cannot be read.
pub(super) async fn scrape(http: &reqwest::Client, url: &str) -> Option<Scrape> {
    let r = http.get(url).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    Some(Scrape::parse(&r.text().await.ok()?))
}
