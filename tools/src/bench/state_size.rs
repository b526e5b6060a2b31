//! `lapse-tools bench state-size`: what a realistic customer's stored state
//! takes, section by section. The simulator's population lives `--days` days
//! (its own sender, without lapse's feedback) and every event is folded
//! through lapse's domain (`step::on_record`, the timers by `step::on_timer`
//! at their due times) — no Redis, no broker. Run twice, with
//! `policy.contact_hours` on and off, so what the engagement-by-hour histogram
//! adds is measured rather than estimated.

use std::collections::HashMap;

use lapse::config::Config;
use lapse::domain::event::CustomerRef;
use lapse::domain::policy::Policies;
use lapse::domain::state::{CustomerState, Source};
use lapse::domain::step;
use lapse::histories::blob_parts;
use lapse::store::blob;

use crate::simulate::model::{Params, Population, SimEvent};

#[derive(clap::Args, Debug, Clone)]
pub struct StateSizeArgs {
    /// lapse config (policy, state bounds, time zone).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Simulated customers.
    #[arg(long, default_value_t = 5_000)]
    pub customers: u32,
    /// Simulated days.
    #[arg(long, default_value_t = 180)]
    pub days: u32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Stored bytes per customer, in one run.
struct Sizes {
    blob: Vec<usize>,
    hours: Vec<usize>,
}

pub fn run(a: &StateSizeArgs) -> anyhow::Result<()> {
    let cfg = Config::load(a.config.as_deref())?;
    println!(
        "stored state per customer: {} simulated customers over {} days, folded through lapse's domain",
        a.customers, a.days
    );
    let on = sizes(&cfg, a, true)?;
    let off = sizes(&cfg, a, false)?;
    let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
    let pct = |v: &[usize], q: f64| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    for (name, s) in [("contact_hours on ", &on), ("contact_hours off", &off)] {
        println!(
            "  {name}: blob mean {:.0} B, p50 {} B, p99 {} B, max {} B",
            mean(&s.blob),
            pct(&s.blob, 0.5),
            pct(&s.blob, 0.99),
            pct(&s.blob, 1.0)
        );
    }
    let with = on.hours.iter().filter(|n| **n > 0).count();
    println!(
        "  the engagement-by-hour histogram: {:.1} B per customer on average (p50 {} B, p99 {} B, max {} B; bound 57 B); {:.0}% of customers have one",
        mean(&on.hours),
        pct(&on.hours, 0.5),
        pct(&on.hours, 0.99),
        pct(&on.hours, 1.0),
        100.0 * with as f64 / on.hours.len().max(1) as f64
    );
    println!(
        "  growth of the mean blob: {:+.0} B ({:+.1}%)",
        mean(&on.blob) - mean(&off.blob),
        100.0 * (mean(&on.blob) / mean(&off.blob).max(1.0) - 1.0)
    );
    Ok(())
}

fn sizes(cfg: &Config, a: &StateSizeArgs, contact_hours: bool) -> anyhow::Result<Sizes> {
    let mut pc = cfg.policy.clone();
    pc.contact_hours.enabled = contact_hours;
    for t in pc.tenants.values_mut() {
        if let Some(c) = t.contact_hours.as_mut() {
            c.enabled = contact_hours;
        }
    }
    let policies = Policies::new(&pc).map_err(|(k, m)| anyhow::anyhow!("{k}: {m}"))?;
    let params = lapse::service::state_params(cfg);
    let tz: chrono_tz::Tz = cfg
        .policy
        .timezone
        .parse()
        .map_err(|_| anyhow::anyhow!("policy.timezone"))?;
    let start =
        chrono::Utc::now().with_timezone(&tz).date_naive() - chrono::Days::new(a.days as u64);
    let mut pop = Population::new(
        Params::default(),
        a.seed,
        a.customers,
        3,
        a.days,
        tz,
        start,
        cfg.policy.lapse.high_value_threshold,
    );
    let mut states: HashMap<String, (CustomerRef, CustomerState)> = HashMap::new();
    let mut offsets = [0i64; lapse::domain::event::INPUT_KINDS];
    let mut events: Vec<SimEvent> = Vec::new();
    for d in 0..a.days {
        events.clear();
        let day = pop.day(d, &mut events);
        for e in &events {
            let ev = &e.event;
            let kind = ev.kind();
            offsets[kind.index()] += 1;
            let src = Source {
                kind,
                partition: 0,
                offset: offsets[kind.index()],
            };
            let (who, st) = states
                .entry(ev.customer.key())
                .or_insert_with(|| (ev.customer.clone(), CustomerState::default()));
            let policy = policies.of(&who.tenant);
            step::on_record(st, ev, src, policy, &params);
            step::after_records(st, policy);
            st.outbox.clear();
        }
        // Timers due today fire (recall stages, releases), as the live loop would.
        for (who, st) in states.values_mut() {
            let policy = policies.of(&who.tenant);
            while let Some(due) = st.timer_due.filter(|t| *t < day.end) {
                let out = step::on_timer(st, who, policy, &params, due);
                st.outbox.clear();
                if out.next.is_some_and(|n| n <= due) {
                    break;
                }
            }
        }
    }
    let mut s = Sizes {
        blob: Vec::with_capacity(states.len()),
        hours: Vec::with_capacity(states.len()),
    };
    for (_, st) in states.values() {
        s.blob.push(blob::encode(1, st).len());
        let hours = blob_parts(st)
            .into_iter()
            .find(|(k, _)| k == "contact hours")
            .map_or(0, |(_, n)| n);
        s.hours.push(hours);
    }
    Ok(s)
}
