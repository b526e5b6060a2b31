//! `lapse-tools simulate` (issue 6): a small compressed simulation against a real
//! broker, Redis and `lapse run` in event-time mode — events of all five kinds
//! produced and applied, lapse's recall triggers and outcomes appear, and the
//! simulator reads lapse's decisions back. Determinism by seed is checked
//! without servers.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use chrono::NaiveDate;
use common::stack::*;
use common::*;
use lapse::config::Config;
use lapse::domain::event::EventKind;
use lapse_tools::simulate::model::{Params, Population, SimEvent};
use lapse_tools::simulate::{run, SimulateArgs};

fn generate(seed: u64, customers: u32, days: u32) -> Vec<SimEvent> {
    let mut pop = Population::new(
        Params::default(),
        seed,
        customers,
        3,
        days,
        chrono_tz::Asia::Shanghai,
        NaiveDate::from_ymd_opt(2025, 3, 1).unwrap(),
        2_000_000,
    );
    let mut out = Vec::new();
    for d in 0..days {
        pop.day(d, &mut out);
    }
    out
}

#[test]
fn the_same_seed_generates_the_same_event_sequence() {
    let a = generate(42, 400, 90);
    let b = generate(42, 400, 90);
    assert!(a.len() > 10_000, "{} events", a.len());
    assert_eq!(a, b, "same seed, same events in the same order");
    let c = generate(43, 400, 90);
    assert_ne!(a, c, "another seed, other events");
    for k in EventKind::ALL {
        assert!(a.iter().any(|e| e.event.kind() == k), "no {k:?} event");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_simulation_drives_lapse_to_triggers_and_outcomes() {
    // As scripts/demo runs the simulator: from the repository root (cargo starts
    // this crate's tests in tools/).
    std::env::set_current_dir(repo_root()).expect("cd to the repository root");
    let s = Stack::start().await;
    let group = "g-simulate";
    let path = s.config_with(
        "simulate",
        "",
        "[clock]\nmode = \"event\"\n[timers]\npoll_interval = \"50ms\"\n",
    );
    let mut lapse = s.spawn(group, &path);
    lapse.wait_ready(LONG).await;

    let mut cfg = Config::load(Some(std::path::Path::new(&path))).expect("config");
    cfg.kafka.brokers = s.broker.bootstrap();
    cfg.kafka.group_id = group.into();
    cfg.schema.dir = schemas_dir().into();
    let args = SimulateArgs {
        customers: 250,
        tenants: 2,
        days: 60,
        seed: 7,
        compressed: true,
        pace_timeout_secs: 30,
        progress_secs: 0.0,
        ..SimulateArgs::default()
    };
    let summary = tokio::time::timeout(Duration::from_secs(120), run(&cfg, &args))
        .await
        .expect("the simulation finishes")
        .expect("the simulation runs");
    eprintln!("{summary}");
    assert_eq!(summary.caught_up, Some(true), "lapse applied every day");
    for k in EventKind::ALL {
        let produced = summary.produced[k.index()] as f64;
        assert!(produced > 0.0, "no {k:?} produced");
        let applied = metric(&lapse, "lapse_records_total", &[("event_type", k.label())]).await;
        assert_eq!(applied, produced, "{k:?}: applied = produced");
    }
    assert_eq!(metric(&lapse, "lapse_dlq_writes_total", &[]).await, 0.0);

    // Months of event time passed: stages fired, customers came back.
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        "a recall trigger and a recall outcome",
        async || {
            metric(&lapse, "lapse_recall_triggers_total", &[]).await >= 1.0
                && metric(&lapse, "lapse_recall_outcomes_total", &[]).await >= 1.0
        },
    )
    .await;
    let triggers = consume_up_to(
        &s.broker.bootstrap(),
        "recall.triggers",
        100_000,
        Duration::from_secs(5),
    )
    .await;
    let outcomes = consume_up_to(
        &s.broker.bootstrap(),
        "recall.outcomes",
        100_000,
        Duration::from_secs(5),
    )
    .await;
    assert!(!triggers.is_empty(), "triggers on recall.triggers");
    assert!(!outcomes.is_empty(), "outcomes on recall.outcomes");
    // The feedback loop: the simulator read lapse's decisions back.
    assert!(
        summary.stats.triggers.iter().sum::<u64>() >= 1,
        "the simulator received triggers: {:?}",
        summary.stats
    );
    assert!(summary.stats.throttle_decisions >= 1, "{:?}", summary.stats);
}
