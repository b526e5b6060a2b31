//! `lapse backtest`: replays a history through a proposed policy (and a
//! baseline) with the domain core the live pipeline runs, in memory and on the
//! event clock: no Redis, no output topic, nothing written but the report.
//!
//! Order and clock: records are replayed in the order they arrived (from the
//! topics; export files, which carry no arrival time, in event-time order).
//! The event clock is the latest event time replayed, as in the live
//! pipeline's `clock.mode = "event"`, and a timer fires as soon as the clock
//! reaches it (at its due time, or at the clock if that is later): the timer
//! loop of a live pipeline that keeps up.
//!
//! The history is replayed as it happened: a send the policy would have
//! blocked is still applied (its opens and clicks are in the history), and is
//! reported as blocked with its reason. So the report answers "what would this
//! policy have said about last quarter's traffic", not "what would the senders
//! have done had they obeyed it".

pub mod cli;
pub mod clock;
pub mod hours;
pub mod replay;
pub mod report;
pub mod source;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::domain::event::{Channel, CustomerRef};
use crate::domain::policy::Policies;
use crate::domain::state::StateParams;
use report::{PolicyReport, SendRow};
use source::History;

/// One policy to replay: its name in the report, its policies and state tunables.
pub struct Candidate {
    pub name: String,
    pub policies: Policies,
    pub params: StateParams,
}

/// Replays `history` through `candidate`. Stops early (`interrupted`) when
/// `stop` is raised (Ctrl-C); `progress` is called about once a second.
pub fn run(
    history: &History,
    candidate: &Candidate,
    keep_ids: bool,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(usize, usize),
) -> (PolicyReport, bool) {
    let mut replay = replay::Replay::new(&candidate.policies, candidate.params);
    replay_into(&mut replay, history, keep_ids, stop, progress)
}

/// [`run`] through the caller's replay (the benchmark keeps its states).
pub fn replay_into<'h>(
    replay: &mut replay::Replay<'_, 'h>,
    history: &'h History,
    keep_ids: bool,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(usize, usize),
) -> (PolicyReport, bool) {
    let mut report = if keep_ids {
        PolicyReport::keeping_ids()
    } else {
        PolicyReport::default()
    };
    let interrupted = replay.run(history, &mut report, stop, progress);
    report.finish();
    (report, interrupted)
}

/// The whole comparison, as `--json` prints it.
#[derive(Serialize)]
pub struct Comparison<'a> {
    pub records_read: u64,
    pub records_replayed: usize,
    pub records_outside_range: u64,
    /// Records or files that could not be used, by reason.
    pub records_unusable: &'a std::collections::BTreeMap<String, u64>,
    pub interrupted: bool,
    pub policies: Vec<(&'a str, &'a PolicyReport)>,
}

const REASONS: [&str; 7] = [
    "cap",
    "throttled",
    "suppressed",
    "quiet_hours",
    "cross_channel",
    "campaign_channel",
    "platform",
];

/// The terminal table: per channel and week, then totals, triggers, decisions, samples.
pub fn print_table(
    out: &mut dyn Write,
    c: &Comparison<'_>,
    samples: &[(String, String)],
) -> std::io::Result<()> {
    writeln!(
        out,
        "records: {} read, {} replayed, {} outside the range/tenant, {} unusable{}",
        c.records_read,
        c.records_replayed,
        c.records_outside_range,
        c.records_unusable.values().sum::<u64>(),
        if c.interrupted {
            " (INTERRUPTED: partial)"
        } else {
            ""
        }
    )?;
    for (reason, n) in c.records_unusable {
        writeln!(out, "  unusable: {reason}: {n}")?;
    }
    let names: Vec<&str> = c.policies.iter().map(|(n, _)| *n).collect();
    writeln!(out, "\nmarketing sends per channel and week (allowed / blocked: cap, throttled, suppressed, quiet hours, cross-channel cap, campaign on another channel, platform rule; customers with a blocked send)")?;
    let mut keys: std::collections::BTreeSet<&(Channel, i64)> = std::collections::BTreeSet::new();
    for (_, r) in &c.policies {
        keys.extend(r.sends.keys());
    }
    write!(out, "{:<8} {:<10}", "channel", "week")?;
    for n in &names {
        write!(out, " | {n:>51}")?;
    }
    if names.len() == 2 {
        write!(out, " | {:>9}", "Δ blocked")?;
    }
    writeln!(out)?;
    let cell = |r: &SendRow| {
        format!(
            "{:>6} / {:>4} {:>4} {:>4} {:>4} {:>4} {:>4} {:>4} ({:>4})",
            r.allowed,
            r.blocked[0],
            r.blocked[1],
            r.blocked[2],
            r.blocked[3],
            r.blocked[4],
            r.blocked[5],
            r.blocked[6],
            r.customers_blocked
        )
    };
    let empty = SendRow::default();
    for k in keys {
        write!(out, "{:<8} {:<10}", k.0.as_str(), report::week_label(k.1))?;
        let rows: Vec<&SendRow> = c
            .policies
            .iter()
            .map(|(_, r)| r.sends.get(k).unwrap_or(&empty))
            .collect();
        for r in &rows {
            write!(out, " | {:>51}", cell(r))?;
        }
        if let [a, b] = rows[..] {
            let d = b.blocked.iter().sum::<u64>() as i64 - a.blocked.iter().sum::<u64>() as i64;
            write!(out, " | {d:>+9}")?;
        }
        writeln!(out)?;
    }
    writeln!(out, "\ntotals")?;
    for (n, r) in &c.policies {
        let t = r.totals();
        writeln!(
            out,
            "  {n}: {} allowed, {} blocked ({}), {} customers with a blocked send; cost of allowed sends {}, saved by blocking {}",
            t.allowed,
            t.blocked.iter().sum::<u64>(),
            REASONS
                .iter()
                .zip(t.blocked)
                .map(|(r, v)| format!("{r} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            t.customers_blocked,
            t.cost_allowed,
            t.cost_blocked,
        )?;
    }
    writeln!(
        out,
        "\nrecall triggers per week, stage and segment (triggers, cost)"
    )?;
    let mut tkeys: std::collections::BTreeSet<&(i64, &str, &str)> =
        std::collections::BTreeSet::new();
    for (_, r) in &c.policies {
        tkeys.extend(r.triggers.keys());
    }
    for k in tkeys {
        write!(
            out,
            "  {:<10} {:<10} {:<18}",
            report::week_label(k.0),
            k.1,
            k.2
        )?;
        for (n, r) in &c.policies {
            let row = r.triggers.get(k).cloned().unwrap_or_default();
            write!(out, " | {n}: {:>5} ({:>8})", row.triggers, row.cost)?;
        }
        writeln!(out)?;
    }
    writeln!(out, "\nthrottle decisions published (scope, state, reason)")?;
    let mut dkeys: std::collections::BTreeSet<&(String, String, String)> =
        std::collections::BTreeSet::new();
    for (_, r) in &c.policies {
        dkeys.extend(r.throttle_decisions.keys());
    }
    for k in dkeys {
        write!(out, "  {:<8} {:<10} {:<26}", k.0, k.1, k.2)?;
        for (n, r) in &c.policies {
            write!(
                out,
                " | {n}: {:>6}",
                r.throttle_decisions.get(k).copied().unwrap_or(0)
            )?;
        }
        writeln!(out)?;
    }
    if !samples.is_empty() {
        writeln!(out, "\nexample customers whose blocked sends differ")?;
        for (who, what) in samples {
            writeln!(out, "  {who}: {what}")?;
        }
    }
    Ok(())
}

/// The per channel and week rows as CSV (one line per policy, channel and week).
pub fn print_csv(out: &mut dyn Write, c: &Comparison<'_>) -> std::io::Result<()> {
    write!(out, "policy,channel,week,allowed")?;
    for r in REASONS {
        write!(out, ",blocked_{r}")?;
    }
    writeln!(out, ",customers_blocked,cost_allowed,cost_blocked")?;
    for (n, r) in &c.policies {
        for ((ch, week), row) in &r.sends {
            write!(
                out,
                "{n},{},{},{}",
                ch.as_str(),
                report::week_label(*week),
                row.allowed
            )?;
            for b in row.blocked {
                write!(out, ",{b}")?;
            }
            writeln!(
                out,
                ",{},{},{}",
                row.customers_blocked, row.cost_allowed, row.cost_blocked
            )?;
        }
    }
    Ok(())
}

/// Up to `per_channel` customers per channel whose blocked sends differ
/// between the first two reports, with both counts.
pub fn samples(
    a: (&str, &PolicyReport),
    b: (&str, &PolicyReport),
    per_channel: usize,
    show_ids: bool,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for ch in Channel::ALL {
        let blocked = |r: &PolicyReport, c: &CustomerRef| r.blocked_by(c, ch);
        let mut who: Vec<&CustomerRef> =
            a.1.blocked_by_customer
                .keys()
                .chain(b.1.blocked_by_customer.keys())
                .filter(|c| blocked(a.1, c) != blocked(b.1, c))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
        who.truncate(per_channel);
        for c in who {
            out.push((
                source::shown(c, show_ids),
                format!(
                    "{ch}: {} blocked under {}, {} under {}",
                    blocked(a.1, c),
                    a.0,
                    blocked(b.1, c),
                    b.0
                ),
            ));
        }
    }
    out
}

/// Raised by Ctrl-C: the replay stops and the partial report is printed.
pub fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            flag.store(true, Ordering::Relaxed);
        }
    });
    stop
}
