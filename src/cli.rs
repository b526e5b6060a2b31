//! What the `lapse` and `lapse-tools` binaries share around their commands:
//! logging to stderr, the async runtime, and the exit status.

use std::future::Future;
use std::process::ExitCode;

/// Logs to stderr, filtered by `RUST_LOG`; JSON lines with `LAPSE_LOG_FORMAT=json`.
/// Every line is scrubbed of the configured secrets (`secret::ScrubbingStderr`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let json = std::env::var("LAPSE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| crate::secret::ScrubbingStderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

/// Starts logging and a multi-threaded runtime, runs `command` on it, and turns
/// its error into a message on stderr and a failed exit status.
pub fn main(command: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", crate::secret::scrub(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}
