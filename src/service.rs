//! `lapse run`: wires the adapters around the domain and runs until SIGTERM/SIGINT.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::Consumer;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::codec::registry::RegistryAuth;
use crate::codec::{
    self, DecodeLimits, Decoder, Encoder, RegistryClient, RegistryOptions, SchemaSet,
};
use crate::config::{ClockMode, Config, SchemaConfig};
use crate::dead_letters::DeadLetters;
use crate::domain::clock::Clock;
use crate::domain::clock::EventClock;
use crate::domain::engagement::Horizons;
use crate::domain::event::EventKind;
use crate::domain::policy::Policies;
use crate::domain::state::{DedupParams, StateParams};
use crate::experiment_monitor::ExperimentMonitor;
use crate::http::{self, AllowanceApi, HttpState};
use crate::kafka::admin;
use crate::kafka::consumer::{self, Batch, PollLoop, Shared};
use crate::kafka::offset_gate;
use crate::kafka::producer::OutputProducer;
use crate::metrics::Metrics;
use crate::outputs::{OutputFramings, OutputWriter};
use crate::pipeline::Pipeline;
use crate::processor;
use crate::retry::{with_startup_retry, RetryLog};
use crate::state_write::{OutputSink, StateWriter};
use crate::store::durability::Durability;
use crate::store::event_time::SharedEventTime;
use crate::store::experiment_stops::ExperimentStops;
use crate::store::fault::Faults;
use crate::store::gauges::AllowanceGauges;
use crate::store::timers::TimerStore;
use crate::store::StateStore;
use crate::timer_loop::TimerLoop;
use crate::wall_clock::WallClock;
use crate::write_fence::WriteFence;

pub fn state_params(cfg: &Config) -> StateParams {
    StateParams {
        dedup: DedupParams {
            window_ms: cfg.state.dedup_window.as_millis_i64(),
            ids_per_topic: cfg.state.event_ids_per_topic,
            visit_ids: cfg.state.visit_ids_per_customer,
        },
        visit_history: cfg.state.visit_history,
        horizons: Horizons {
            short_half_life_ms: cfg.state.short_half_life.as_millis_i64(),
            long_half_life_ms: cfg.state.long_half_life.as_millis_i64(),
        },
    }
}

pub fn build_decoder(cfg: &Config) -> anyhow::Result<Decoder> {
    codec::set_allocation_limit(cfg.schema.avro_allocation_limit_bytes);
    let schemas = SchemaSet::load(&cfg.schema.dir).with_context(|| {
        format!(
            "loading schemas from {} (config key schema.dir)",
            cfg.schema.dir.display()
        )
    })?;
    let registry = match &cfg.schema.registry_url {
        Some(u) => Some(registry_client(&cfg.schema, u)?),
        None => None,
    };
    let limits = DecodeLimits {
        max_payload_bytes: cfg.schema.max_payload_bytes,
        max_future_skew_ms: cfg.schema.max_future_skew.as_millis_i64(),
        ..DecodeLimits::default()
    };
    Ok(Decoder::new(schemas, registry, limits))
}

/// The registry client with the configured credentials and CA.
fn registry_client(sc: &SchemaConfig, url: &str) -> anyhow::Result<RegistryClient> {
    let auth = match (
        &sc.registry_token,
        &sc.registry_username,
        &sc.registry_password,
    ) {
        (Some(token), _, _) => Some(RegistryAuth::Bearer(token.clone())),
        (None, Some(user), password) => Some(RegistryAuth::Basic {
            user: user.clone(),
            password: password.clone().unwrap_or_default(),
        }),
        (None, None, _) => None,
    };
    let ca_pem = match &sc.registry_ca_file {
        Some(p) => Some(
            std::fs::read(p)
                .with_context(|| format!("schema.registry_ca_file: cannot read {}", p.display()))?,
        ),
        None => None,
    };
    let opts = RegistryOptions {
        timeout: sc.registry_timeout.0,
        auth,
        ca_pem,
        ..RegistryOptions::default()
    };
    RegistryClient::with_options(url, opts).context("schema.registry_url")
}

/// Counts (and once logs) records framed with lapse 0.1's fingerprint.
fn observe_legacy_fingerprints(decoder: Decoder, accept: bool, metrics: &Metrics) -> Decoder {
    let counter = metrics.legacy_fingerprints.clone();
    let warned = AtomicBool::new(false);
    decoder.with_legacy_fingerprints(accept, move |kind| {
        counter.with_label_values(&[kind.label()]).inc();
        if !warned.swap(true, Ordering::Relaxed) {
            warn!(
                event_type = kind.label(),
                "a producer frames single-object records with lapse 0.1's non-standard fingerprint; \
                 accepted for now (schema.accept_legacy_fingerprints), migrate it to a standard Avro \
                 library (lapse_legacy_fingerprint_records_total counts such records)"
            );
        }
    })
}

/// Output framing, with Confluent schema ids registered or looked up at
/// start-up: an unreachable registry is retried, a refusal stops start-up.
async fn resolve_output_framings(
    cfg: &Config,
    decoder: &Decoder,
    faults: &Faults,
    shutdown: &AtomicBool,
) -> anyhow::Result<OutputFramings> {
    let framing = cfg.output_framing();
    let what = "schema registry (output schemas)";
    let failed = |e: &anyhow::Error| faults.set("registry", "start-up", format!("{e:#}"));
    let framings = with_startup_retry(what, &cfg.retry, shutdown, failed, || async {
        match OutputFramings::resolve(
            framing,
            &cfg.kafka.topics,
            decoder.schemas(),
            decoder.registry(),
            cfg.outputs.register_schemas,
        )
        .await
        {
            Err(e @ codec::CodecError::RegistryUnreachable { .. }) => Err(anyhow::Error::new(e)),
            other => Ok(other),
        }
    })
    .await?
    .context("resolving the output schemas (config keys outputs.framing, outputs.register_schemas, schema.registry_url)")?;
    faults.clear_in("registry", "start-up");
    info!(?framings, "output framing");
    Ok(framings)
}

/// `lapse run`, phase by phase: serve HTTP (from the first second, not ready),
/// connect (Redis, broker and registry at once, each waited for), build the
/// adapters, consume until a signal, shut down.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let metrics = Metrics::new(&cfg.metrics);
    // Schemas first: a wrong schema.dir fails at once, not after waiting for Redis.
    let decoder = Arc::new(observe_legacy_fingerprints(
        build_decoder(&cfg)?,
        cfg.schema.accept_legacy_fingerprints,
        &metrics,
    ));
    let faults = metrics.redis_fault.clone();
    faults.set("redis", "start-up", "not connected yet");
    faults.set("broker", "start-up", "not connected yet");
    if cfg.schema.registry_url.is_some() {
        faults.set("registry", "start-up", "not connected yet");
    }
    let allowance = Arc::new(OnceLock::new());
    spawn_http(&cfg, &metrics, allowance.clone()).await?;
    let shutdown = spawn_signal_watch();
    let started = async {
        let connected = connect(&cfg, &metrics, &decoder, &shutdown).await?;
        let app = build(&cfg, &metrics, decoder, &connected).await?;
        anyhow::Ok((connected.store, app))
    };
    let (store, app) = match started.await {
        Ok(v) => v,
        Err(e) if shutdown.load(Ordering::SeqCst) => {
            info!(reason = %format!("{e:#}"), "stopped during start-up");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let _ = allowance.set(AllowanceApi {
        store: store.clone(),
        policies: app.pipeline.policies.clone(),
        params: app.pipeline.params,
        clock: app.pipeline.clock.clone(),
    });
    if !app.pipeline.policies.experiments().is_empty() {
        tokio::spawn(
            ExperimentMonitor {
                stops: ExperimentStops::new(store.conn(), &cfg.redis.key_prefix),
                store: store.clone(),
                experiments: app.pipeline.policies.experiments().clone(),
                metrics: metrics.clone(),
                clock: app.pipeline.clock.clone(),
                report_every: cfg.experiments.report_every.0,
                stop_poll: cfg.experiments.stop_poll.0,
                shutdown: shutdown.clone(),
            }
            .run(),
        );
    }
    spawn_readiness_probe(
        store,
        app.producer.clone(),
        app.pipeline.decoder.registry().cloned(),
        metrics.clone(),
    );
    let running = consume(&cfg, &app, shutdown)?;
    stop(running, &app.producer).await
}

/// What start-up reached: Redis, the broker (topics created when asked) and
/// the output framing (the registry's ids).
struct Connected {
    store: StateStore,
    framings: OutputFramings,
}

/// Connects to Redis, creates the topics (or checks the broker answers) and
/// resolves the output framing, all three at once, each retried with back-off
/// until it works or lapse is told to stop; `/readyz` names those still
/// failing, and why.
async fn connect(
    cfg: &Config,
    metrics: &Metrics,
    decoder: &Decoder,
    shutdown: &AtomicBool,
) -> anyhow::Result<Connected> {
    let faults = &metrics.redis_fault;
    let redis = async {
        let failed = |e: &anyhow::Error| faults.set("redis", "start-up", format!("{e:#}"));
        let store = with_startup_retry("redis", &cfg.retry, shutdown, failed, || {
            let (rc, m) = (cfg.redis.clone(), metrics.clone());
            async move { Ok(StateStore::connect(&rc, m).await?) }
        })
        .await?;
        faults.clear_in("redis", "start-up");
        anyhow::Ok(store)
    };
    let broker = async {
        let failed = |e: &anyhow::Error| faults.set("broker", "start-up", format!("{e:#}"));
        let what = if cfg.kafka.create_topics {
            "kafka (creating topics)"
        } else {
            "kafka"
        };
        with_startup_retry(what, &cfg.retry, shutdown, failed, || async {
            if cfg.kafka.create_topics {
                Ok(admin::ensure_topics(&cfg.kafka).await?)
            } else {
                Ok(admin::check_broker(&cfg.kafka).await?)
            }
        })
        .await?;
        faults.clear_in("broker", "start-up");
        anyhow::Ok(())
    };
    let registry = resolve_output_framings(cfg, decoder, faults, shutdown);
    let (store, (), framings) = tokio::try_join!(redis, broker, registry)?;
    Ok(Connected { store, framings })
}

/// The adapters around the domain, wired.
struct App {
    producer: OutputProducer,
    /// The batch path; its state writer, timer store, policies and clocks are
    /// the timer loop's too.
    pipeline: Arc<Pipeline>,
}

/// Builds the producer and dead letters, the state writer, the timer store, the clocks and the batch
/// pipeline; starts the fleet gauge exporter.
async fn build(
    cfg: &Config,
    metrics: &Metrics,
    decoder: Arc<Decoder>,
    connected: &Connected,
) -> anyhow::Result<App> {
    let store = &connected.store;
    let producer = OutputProducer::new(&cfg.kafka, metrics.clone())?;
    let dlq = DeadLetters::new(
        producer.clone(),
        cfg.kafka.topics.dlq.clone(),
        cfg.dlq.redact_reply_payloads,
    );
    let policies = Arc::new(
        Policies::new(&cfg.policy)
            .map_err(|(key, message)| crate::error::ConfigError::Invalid { key, message })?,
    );
    let outputs = OutputWriter {
        producer: producer.clone(),
        encoder: Encoder::new(decoder.schemas()),
        topics: cfg.kafka.topics.clone(),
        framings: connected.framings,
        experiments: policies.experiments().clone(),
    };
    let gauges = AllowanceGauges::new(store.conn(), &cfg.redis.key_prefix);
    spawn_gauge_exporter(
        gauges.clone(),
        metrics.clone(),
        cfg.metrics.fleet_gauge_refresh.0,
    );
    let writer = StateWriter {
        backend: Arc::new(store.clone()),
        sink: Arc::new(OutputSink {
            outputs,
            gauges,
            metrics: metrics.clone(),
        }),
        metrics: metrics.clone(),
    };
    let timers = TimerStore::new(
        store.conn(),
        cfg.redis.key_prefix.clone(),
        cfg.timers.shards,
    )
    .await?;
    let event_clock = match cfg.clock.mode {
        ClockMode::Event => Some((
            Arc::new(EventClock::new()),
            SharedEventTime::new(store.conn(), &cfg.redis.key_prefix),
        )),
        ClockMode::Wall => None,
    };
    let fence = WriteFence::new(
        cfg.redis.durability,
        store.clone(),
        writer.clone(),
        metrics.clone(),
    );
    let pipeline = Arc::new(Pipeline {
        policies,
        fence,
        retry_log: RetryLog::default(),
        writer,
        timers,
        event_clock,
        decoder,
        dlq,
        metrics: metrics.clone(),
        params: state_params(cfg),
        clock: Arc::new(WallClock),
        retry: cfg.retry.clone(),
        store_chunks: cfg.batch.store_chunks,
        durability: Durability::new(
            &cfg.redis,
            store.conn(),
            store.scripts_lost(),
            metrics.clone(),
        )
        .await,
    });
    Ok(App { producer, pipeline })
}

/// The timer loop, over the batch path's state writer, timer store and clocks:
/// by event time (the shared watermark) in event-time mode, else by wall time.
fn timer_loop(cfg: &Config, p: &Pipeline, shutdown: Arc<AtomicBool>) -> TimerLoop {
    let clock: Arc<dyn Clock> = match &p.event_clock {
        Some((c, _)) => c.clone(),
        None => Arc::new(WallClock),
    };
    TimerLoop {
        writer: p.writer.clone(),
        timers: p.timers.clone(),
        policies: p.policies.clone(),
        params: p.params,
        metrics: p.metrics.clone(),
        retry: p.retry.clone(),
        clock,
        shared_clock: p.event_clock.clone(),
        cfg: cfg.timers.clone(),
        shutdown,
        durability: Some(p.durability.clone()),
    }
}

/// Binds the HTTP port and serves `/metrics`, `/healthz`, `/readyz` at once
/// (not ready until start-up is over); `/v1/allowance` and `/v1/campaigns`
/// answer once `allowance` is set.
async fn spawn_http(
    cfg: &Config,
    metrics: &Metrics,
    allowance: Arc<OnceLock<AllowanceApi>>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&cfg.http.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (config key http.listen)",
                cfg.http.listen
            )
        })?;
    let http_state = HttpState {
        metrics: metrics.clone(),
        allowance,
    };
    tokio::spawn(async move {
        if let Err(e) = http::serve(listener, http_state).await {
            error!(error = %e, "http server stopped");
        }
    });
    info!(listen = %cfg.http.listen, "serving /metrics, /healthz, /readyz, /v1/allowance");
    Ok(())
}

/// Readiness, every 2 s: Redis answers PING, the broker a metadata request
/// and the schema registry (when configured) `GET /config`. Each failure is
/// shown by `/readyz` with its reason; `lapse_ready` is 1 when nothing is.
fn spawn_readiness_probe(
    store: StateStore,
    probe: OutputProducer,
    registry: Option<RegistryClient>,
    metrics: Metrics,
) {
    let faults = metrics.redis_fault.clone();
    tokio::spawn(async move {
        loop {
            match store.ping().await {
                Ok(()) => faults.clear_in("redis", "probe"),
                Err(e) => {
                    metrics.redis_errors.with_label_values(&["ping"]).inc();
                    faults.set("redis", "probe", e.to_string());
                }
            }
            let p = probe.clone();
            let broker = tokio::task::spawn_blocking(move || p.check_broker())
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            match broker {
                Ok(()) => faults.clear_in("broker", "probe"),
                Err(e) => {
                    metrics.kafka_errors.with_label_values(&["metadata"]).inc();
                    faults.set("broker", "probe", e);
                }
            }
            if let Some(r) = &registry {
                match r.probe().await {
                    Ok(()) => faults.clear_in("registry", "probe"),
                    Err(e) => faults.set("registry", "probe", e.to_string()),
                }
            }
            metrics.ready.set(faults.is_empty() as i64);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
}

/// The shutdown flag, raised on SIGTERM or SIGINT.
fn spawn_signal_watch() -> Arc<AtomicBool> {
    let shutdown = Arc::new(AtomicBool::new(false));
    let raise = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("signal received");
        raise.store(true, Ordering::SeqCst);
    });
    shutdown
}

/// What runs until shutdown.
struct Running {
    poll_thread: std::thread::JoinHandle<()>,
    processor: tokio::task::JoinHandle<()>,
    timer_task: tokio::task::JoinHandle<()>,
}

/// Subscribes, then starts the batch processor, the timer loop and the poll
/// thread, all stopping on `shutdown`.
fn consume(cfg: &Config, app: &App, shutdown: Arc<AtomicBool>) -> anyhow::Result<Running> {
    let shared = Shared::new(app.pipeline.metrics.clone());
    let consumer = consumer::build(&cfg.kafka, shared.clone())?;
    let inputs = cfg.kafka.topics.inputs();
    consumer
        .subscribe(&inputs)
        .context("subscribing to the input topics (kafka.topics.*)")?;
    let topics: HashMap<String, (EventKind, std::sync::Arc<str>)> = inputs
        .iter()
        .zip(EventKind::ALL)
        .map(|(t, k)| (t.to_string(), (k, std::sync::Arc::from(*t))))
        .collect();

    let (tx, rx) = mpsc::channel::<Batch>(cfg.batch.queue_depth);
    let processor = {
        let durability = &app.pipeline.durability;
        // Durable batches pass the offset gate (redis.durability) in order.
        let gate = offset_gate::spawn(
            durability.mode,
            durability.fsync_horizon,
            durability.epoch.clone(),
            shared.clone(),
            app.pipeline.metrics.clone(),
        );
        processor::spawn(
            app.pipeline.clone(),
            shared.clone(),
            rx,
            cfg.batch.processors,
            gate,
        )
    };
    let timer_task = tokio::spawn(timer_loop(cfg, &app.pipeline, shutdown.clone()).run());
    let poll = PollLoop {
        consumer,
        shared,
        topics,
        batch: cfg.batch.clone(),
        commit_interval: cfg.kafka.commit_interval.0,
        shutdown_drain_timeout: cfg.kafka.shutdown_drain_timeout.0,
        tx,
        shutdown,
    };
    info!(group = %cfg.kafka.group_id, "consuming");
    let poll_thread = std::thread::Builder::new()
        .name("kafka-poll".into())
        .spawn(move || poll.run())
        .context("spawning the poll thread")?;
    Ok(Running {
        poll_thread,
        processor,
        timer_task,
    })
}

/// Waits for the poll thread (it drains and commits), the processor and the
/// timer loop, then flushes the producer.
async fn stop(running: Running, producer: &OutputProducer) -> anyhow::Result<()> {
    let Running {
        poll_thread,
        processor,
        timer_task,
    } = running;
    tokio::task::spawn_blocking(move || poll_thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the poll thread panicked"))?;
    let _ = processor.await;
    let _ = timer_task.await;
    if let Err(e) = producer.flush(Duration::from_secs(10)) {
        warn!(error = %e, "producer flush at shutdown failed");
    }
    info!("stopped cleanly");
    Ok(())
}

/// Exports the fleet-wide allowance gauges from Redis every `metrics.fleet_gauge_refresh`.
fn spawn_gauge_exporter(gauges: AllowanceGauges, metrics: Metrics, every: Duration) {
    tokio::spawn(async move {
        loop {
            match gauges.counts().await {
                Ok(counts) => {
                    for ((tenant, channel, state), n) in counts {
                        metrics
                            .customers_restricted
                            .with_label_values(&[
                                &metrics.tenant(&tenant),
                                channel.label(),
                                state.label(),
                            ])
                            .set(n as i64);
                    }
                }
                Err(e) => {
                    metrics.redis_errors.with_label_values(&["gauges"]).inc();
                    warn!(error = %e, "reading allowance gauges failed");
                }
            }
            tokio::time::sleep(every).await;
        }
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
