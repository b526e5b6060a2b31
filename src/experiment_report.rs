//! `lapse experiment report`: reads every customer state (their exposures and
//! measures), and prints per experiment and arm the report of
//! `domain::experiment::report`, as text or JSON. Read-only, safe while
//! instances run; the intervals stay valid however often it is run.

use std::fmt::Write as _;

use chrono::{TimeZone, Utc};

use crate::domain::experiment::report::{
    self, Call, GuardVerdict, Phase, Report, Tally, Winner, METRICS,
};
use crate::domain::experiment::Experiments;
use crate::error::StoreError;
use crate::store::scan::StateScan;
use crate::store::StateStore;

/// States per SCAN page and pipelined load.
const PAGE: usize = 500;

/// Every exposed customer of the store, by experiment and arm, and the number
/// of customer states read.
pub async fn tally(store: &StateStore) -> Result<(Tally, usize), StoreError> {
    let mut tally = Tally::default();
    let mut customers = 0;
    let mut scan = StateScan::new(store).await?;
    while let Some(page) = scan.next_page(PAGE).await? {
        customers += page.len();
        for (_, state) in &page {
            tally.add(&state.exposures);
        }
    }
    Ok((tally, customers))
}

/// The reports of `experiments` (all, or the one named `only`) at `now`.
pub fn reports(
    experiments: &Experiments,
    tally: &Tally,
    now: i64,
    only: Option<&str>,
) -> Vec<Report> {
    let mut v: Vec<Report> = experiments
        .all()
        .filter(|e| only.is_none_or(|n| n == e.name))
        .map(|e| report::report(e, tally, now))
        .collect();
    v.sort_by(|a, b| {
        (&a.tenant, a.start_ms, &a.experiment).cmp(&(&b.tenant, b.start_ms, &b.experiment))
    });
    v
}

fn date(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms).single().map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M UTC").to_string(),
    )
}

fn value(v: Option<f64>, money: bool) -> String {
    match v {
        None => "-".into(),
        Some(x) if money => format!("{:.2}", x / 100.0),
        Some(x) if x.abs() < 10.0 => format!("{x:.4}"),
        Some(x) => format!("{x:.1}"),
    }
}

fn signed(x: f64, money: bool) -> String {
    if money {
        format!("{:+.2}", x / 100.0)
    } else if x.abs() < 10.0 {
        format!("{x:+.4}")
    } else {
        format!("{x:+.1}")
    }
}

/// The text report: one block per experiment.
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    let phase = match r.phase {
        Phase::NotStarted => "not started".to_string(),
        Phase::Running { day } => format!("running, day {day}"),
        Phase::Ended { days } => format!("ended after {days} days"),
    };
    let _ = writeln!(
        o,
        "experiment {} (tenant {}): {} → {}, {phase}; as of {}",
        r.experiment,
        r.tenant,
        date(r.start_ms),
        date(r.end_ms),
        date(r.at_ms)
    );
    let _ = writeln!(
        o,
        "intervals: always valid at {:.0} % (mSPRT; may be read every day), looking for {} SD; \
         money in major units (minor ÷ 100)",
        (1.0 - r.alpha) * 100.0,
        r.effect
    );
    let arms: Vec<&str> = r.arms.iter().map(|a| a.arm.as_str()).collect();
    let _ = write!(o, "{:<30}", "arm");
    for a in &r.arms {
        let _ = write!(o, "{:>16}", a.arm);
    }
    let _ = writeln!(o);
    let _ = write!(o, "{:<30}", "exposed customers (share)");
    for a in &r.arms {
        let _ = write!(
            o,
            "{:>16}",
            format!("{} ({:.0} %)", a.exposed, a.share * 100.0)
        );
    }
    let _ = writeln!(o);
    for (i, m) in METRICS.iter().enumerate() {
        let values: Vec<Option<f64>> = r.arms.iter().map(|a| a.values[i]).collect();
        if values.iter().all(|v| v.is_none_or(|x| x == 0.0)) {
            continue; // nothing measured (e.g. a channel nobody used)
        }
        let primary = if m.key == r.primary { " *" } else { "" };
        let _ = write!(o, "{:<30}", format!("{}{primary}", m.label));
        for v in &values {
            let _ = write!(o, "{:>16}", value(*v, m.money));
        }
        let _ = writeln!(o);
        for c in r.comparisons.iter().filter(|c| c.metric == m.key) {
            let diff = match c.difference {
                None => "no interval yet".to_string(),
                Some(d) => format!(
                    "{} [{}, {}]",
                    signed(d.estimate, m.money),
                    signed(d.lower, m.money),
                    signed(d.upper, m.money)
                ),
            };
            let call = match c.verdict {
                Call::Better => "better",
                Call::Worse => "worse",
                Call::Higher => "higher",
                Call::Lower => "lower",
                Call::NotYet => "not yet",
            };
            // The estimate is the same for every measure (the effect is in
            // standard deviations): shown on the primary measure only.
            let plan = match c.plan.filter(|_| m.key == r.primary) {
                None => String::new(),
                Some(p) => match p.days {
                    Some(d) => format!(
                        "; to show {} SD with 80 % power: ~{} exposed per arm, ~{d} days in all at the rate so far",
                        r.effect, p.per_arm
                    ),
                    None => format!(
                        "; to show {} SD with 80 % power: ~{} exposed per arm",
                        r.effect, p.per_arm
                    ),
                },
            };
            let _ = writeln!(o, "{:<30}  {} − control: {diff} {call}{plan}", "", c.arm);
        }
    }
    for g in &r.guardrail {
        let v = match g.verdict {
            GuardVerdict::TooFewCustomers { min_per_arm } => {
                format!("no verdict below {min_per_arm} exposed customers per arm")
            }
            GuardVerdict::Holds { worst } => format!(
                "holds (unsubscribe rate at most {:+.2} points over control)",
                worst * 100.0
            ),
            GuardVerdict::Flagged { at_least } => format!(
                "FLAGGED: unsubscribe rate at least {:+.2} points over control",
                at_least * 100.0
            ),
        };
        let _ = writeln!(o, "guardrail {}: {v}", g.arm);
    }
    for a in &r.arms {
        if let Some(t) = a.stopped_at {
            let _ = writeln!(
                o,
                "arm {} STOPPED at {} (auto_stop): its customers have the control's policy",
                a.arm,
                date(t)
            );
        }
    }
    let winner = match &r.winner {
        Winner::Arm(a) => format!("{a} (better than control on {})", r.primary),
        Winner::Control => format!("control (every other arm is worse on {})", r.primary),
        Winner::NotYet => format!("not yet (on {}, among {})", r.primary, arms.join(", ")),
    };
    let _ = writeln!(o, "winner: {winner}");
    o
}
