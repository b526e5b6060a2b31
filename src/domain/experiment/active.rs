//! Experiments resolved at start-up (times in ms, arms' draw ranges, overrides
//! checked against the tenant's policy), and what they mean for one customer at
//! one time: the arms they are in and the policy in force under those arms.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use super::assign;
use super::spec::{
    valid_name, ArmConfig, ExperimentConfig, PolicyKey, CONTROL, MAX_ARMS, MAX_EXPERIMENTS,
    MAX_NAME_LEN,
};
use crate::domain::event::{Channel, CustomerRef};
use crate::domain::policy::{parse_hhmm, parse_local, Policy, QuietSpan, MAX_CAP};
use crate::domain::span::Span;

type Invalid = (String, String);

/// An experiment ready to assign customers.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub name: String,
    pub tenant: String,
    /// Active from `start_ms` (inclusive) to `end_ms` (exclusive).
    pub start_ms: i64,
    pub end_ms: i64,
    /// Outcomes of triggers it shaped can be decided until this (the end plus
    /// the tenant's longer of attribution window and dormant delay).
    pub outcomes_until_ms: i64,
    pub arms: Vec<Arm>,
    /// Index of the `control` arm.
    pub control: usize,
    /// Every policy key one of its arms changes.
    pub keys: BTreeSet<PolicyKey>,
    /// How the report judges it.
    pub judging: Judging,
    bounds: Vec<u64>,
    /// Per arm, when the guardrail stopped it (`i64::MAX`: running). Shared by
    /// every clone; set from the store's stop records (`experiment_stops`).
    stopped: Arc<[AtomicI64]>,
}

/// How an experiment is judged (see `ExperimentConfig` for each key).
#[derive(Debug, Clone, PartialEq)]
pub struct Judging {
    pub alpha: f64,
    pub effect: f64,
    pub primary: String,
    pub guardrail_margin: f64,
    pub auto_stop: bool,
}

/// An arm with its overrides resolved (quiet hours as minutes).
#[derive(Debug, Clone)]
pub struct Arm {
    pub name: String,
    pub share: f64,
    spec: ArmConfig,
    quiet: Vec<(Channel, QuietSpan)>,
}

/// A customer's arm in one experiment.
#[derive(Debug, Clone, Copy)]
pub struct Assignment<'a> {
    pub experiment: &'a Experiment,
    pub arm: usize,
    /// The arm was stopped by the guardrail by then: the customer gets the
    /// control's policy (and is not exposed any more).
    pub stopped: bool,
}

impl Assignment<'_> {
    pub fn arm_name(&self) -> &str {
        &self.experiment.arms[self.arm].name
    }

    pub fn is_control(&self) -> bool {
        self.arm == self.experiment.control
    }

    /// The arm whose policy applies: the drawn one, or the control once stopped.
    pub fn arm_in_force(&self) -> usize {
        if self.stopped {
            self.experiment.control
        } else {
            self.arm
        }
    }
}

/// What an output carries about the experiment that shaped it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArmTag {
    pub experiment: String,
    pub arm: String,
}

/// Every configured experiment, by tenant, in configuration order.
#[derive(Debug, Clone, Default)]
pub struct Experiments {
    by_tenant: HashMap<String, Vec<Arc<Experiment>>>,
}

/// A customer's policy at one time: the tenant's (`control`), and the one in
/// force under the arms of the active experiments (`policy`).
pub struct Effective<'a> {
    pub control: &'a Policy,
    pub policy: Cow<'a, Policy>,
    pub assignments: Vec<Assignment<'a>>,
}

fn bad(key: String, msg: impl Into<String>) -> Invalid {
    (key, msg.into())
}

impl Experiment {
    pub fn is_active(&self, t: i64) -> bool {
        self.start_ms <= t && t < self.end_ms
    }

    /// When arm `arm` was stopped, if it was.
    pub fn stopped_at(&self, arm: usize) -> Option<i64> {
        let at = self.stopped.get(arm)?.load(Ordering::Relaxed);
        (at != i64::MAX).then_some(at)
    }

    /// Whether arm `arm` is stopped at `t`.
    pub fn is_stopped(&self, arm: usize, t: i64) -> bool {
        self.stopped_at(arm).is_some_and(|s| s <= t)
    }

    /// Records that arm `arm` was stopped at `at` (the earliest stop wins).
    /// The control cannot be stopped.
    pub fn stop(&self, arm: usize, at: i64) {
        if arm != self.control {
            if let Some(a) = self.stopped.get(arm) {
                a.fetch_min(at, Ordering::Relaxed);
            }
        }
    }

    /// Index of the arm named `name`.
    pub fn arm_index(&self, name: &str) -> Option<usize> {
        self.arms.iter().position(|a| a.name == name)
    }

    /// The arm of `c` (whether or not the experiment is active).
    pub fn arm_of(&self, c: &CustomerRef) -> usize {
        assign::arm_of(
            assign::draw(&c.tenant, &c.customer, &self.name),
            &self.bounds,
        )
    }

    /// Writes arm `arm`'s overrides into `p`.
    pub fn apply(&self, arm: usize, p: &mut Policy) {
        let a = &self.arms[arm];
        for (c, rule) in &a.spec.caps {
            p.caps[c.index()] = *rule;
        }
        for (c, q) in &a.quiet {
            p.quiet[c.index()] = Some(*q);
        }
        let t = &a.spec.throttle;
        let th = &mut p.throttle;
        th.throttle_below = t.throttle_below.unwrap_or(th.throttle_below);
        th.floor = t.floor.unwrap_or(th.floor);
        th.release_above = t.release_above.unwrap_or(th.release_above);
        th.min_sends = t.min_sends.unwrap_or(th.min_sends);
        th.cooldown = t.cooldown.unwrap_or(th.cooldown);
        let r = &a.spec.recall;
        let l = &mut p.lapse;
        l.at_risk_factor = r.at_risk_factor.unwrap_or(l.at_risk_factor);
        l.lapsed_factor = r.lapsed_factor.unwrap_or(l.lapsed_factor);
        l.lapsed_min_days = r.lapsed_min_days.unwrap_or(l.lapsed_min_days);
        l.follow_up_every_days = r.follow_up_every_days.unwrap_or(l.follow_up_every_days);
        l.max_follow_ups = r.max_follow_ups.unwrap_or(l.max_follow_ups);
        for (s, offer) in &r.offers {
            *l.offers.for_segment_mut(*s) = offer.clone();
        }
        for (s, channels) in &r.channel_preference {
            *l.channel_preference.for_segment_mut(*s) = channels.clone();
        }
    }

    /// Whether this experiment's keys change decisions on channel `c`.
    pub fn touches_channel(&self, c: Channel) -> bool {
        self.keys.iter().any(|k| k.touches_channel(c))
    }

    pub fn touches_recall(&self) -> bool {
        self.keys.iter().any(PolicyKey::touches_recall)
    }
}

impl Experiments {
    /// Resolves and validates `cfgs`; `policy_of` gives each tenant's resolved
    /// policy (the control). Errors name the key and say what to do.
    pub fn new<'p>(
        cfgs: &[ExperimentConfig],
        policy_of: impl Fn(&str) -> &'p Policy,
    ) -> Result<Experiments, Invalid> {
        if cfgs.len() > MAX_EXPERIMENTS {
            return Err(bad(
                "policy.experiments".into(),
                format!(
                    "{} experiments configured, at most {MAX_EXPERIMENTS}: their names are \
                     metric labels; remove finished ones",
                    cfgs.len()
                ),
            ));
        }
        let mut names = BTreeSet::new();
        let mut out = Experiments::default();
        for (i, cfg) in cfgs.iter().enumerate() {
            let key = format!("policy.experiments[{i}]");
            if !valid_name(&cfg.name) {
                return Err(bad(
                    format!("{key}.name"),
                    format!(
                        "`{}` must be 1 to {MAX_NAME_LEN} characters of a-z, 0-9, `_` and `-`",
                        cfg.name
                    ),
                ));
            }
            if !names.insert(cfg.name.as_str()) {
                return Err(bad(
                    format!("{key}.name"),
                    format!(
                        "`{}` is used by another experiment: names must be unique",
                        cfg.name
                    ),
                ));
            }
            let key = format!("policy.experiments.{}", cfg.name);
            if cfg.tenant.trim().is_empty() {
                return Err(bad(format!("{key}.tenant"), "must name a tenant"));
            }
            let control_policy = policy_of(&cfg.tenant);
            let e = resolve(cfg, &key, control_policy)?;
            let list = out.by_tenant.entry(cfg.tenant.clone()).or_default();
            for other in list.iter() {
                let overlap_in_time = e.start_ms < other.end_ms && other.start_ms < e.end_ms;
                if let Some(k) = e.keys.intersection(&other.keys).next() {
                    if overlap_in_time {
                        return Err(bad(
                            format!("{key}.arms"),
                            format!(
                                "experiments `{}` and `{}` both change `{k}` for tenant `{}` \
                                 while both run: end one before the other starts, or test \
                                 the key in one of them only",
                                other.name, e.name, cfg.tenant
                            ),
                        ));
                    }
                }
            }
            list.push(Arc::new(e));
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.by_tenant.is_empty()
    }

    /// Every experiment (for metric label bounds and reports).
    pub fn all(&self) -> impl Iterator<Item = &Experiment> {
        self.by_tenant.values().flatten().map(|e| &**e)
    }

    /// The experiments of `tenant` active at `t`, in configuration order.
    pub fn active(&self, tenant: &str, t: i64) -> impl Iterator<Item = &Experiment> {
        self.by_tenant
            .get(tenant)
            .into_iter()
            .flatten()
            .map(|e| &**e)
            .filter(move |e| e.is_active(t))
    }

    /// The arms `c` is in at `t`.
    pub fn assignments(&self, c: &CustomerRef, t: i64) -> Vec<Assignment<'_>> {
        self.active(&c.tenant, t)
            .map(|e| {
                let arm = e.arm_of(c);
                Assignment {
                    experiment: e,
                    arm,
                    stopped: e.is_stopped(arm, t),
                }
            })
            .collect()
    }

    /// The policy of `c` at `t`: `control` with the overrides of their arms.
    /// Borrowed (no copy) when no active experiment changes anything for them.
    pub fn effective<'a>(&'a self, control: &'a Policy, c: &CustomerRef, t: i64) -> Effective<'a> {
        let assignments = self.assignments(c, t);
        let policy = policy_under(control, &assignments, None);
        Effective {
            control,
            policy,
            assignments,
        }
    }

    /// The experiment (and `c`'s arm in it) shaping channel `ch`'s decision at
    /// `t`: the first active one whose keys touch the channel.
    pub fn tag_channel(&self, c: &CustomerRef, ch: Channel, t: i64) -> Option<ArmTag> {
        self.active(&c.tenant, t)
            .find(|e| e.touches_channel(ch))
            .map(|e| tag(e, c))
    }

    /// The experiment (and `c`'s arm in it) an outcome decided at `t`
    /// belongs to: the first of the tenant's that changes recall decisions and
    /// runs at `t` or ended less than its outcome tail before. (Approximate
    /// for a trigger fired before the start; join on `trigger_id` to be exact.)
    pub fn tag_outcome(&self, c: &CustomerRef, t: i64) -> Option<ArmTag> {
        self.by_tenant
            .get(&c.tenant)
            .into_iter()
            .flatten()
            .find(|e| e.touches_recall() && e.start_ms <= t && t < e.outcomes_until_ms)
            .map(|e| tag(e, c))
    }

    /// The experiment (and `c`'s arm in it) shaping recall stages at `t`.
    pub fn tag_recall(&self, c: &CustomerRef, t: i64) -> Option<ArmTag> {
        self.active(&c.tenant, t)
            .find(|e| e.touches_recall())
            .map(|e| tag(e, c))
    }
}

fn tag(e: &Experiment, c: &CustomerRef) -> ArmTag {
    ArmTag {
        experiment: e.name.clone(),
        arm: e.arms[e.arm_of(c)].name.clone(),
    }
}

/// `control` with the overrides of `assignments`, where `swap` = (experiment
/// index in `assignments`, arm) puts the customer in another arm of one of them.
pub fn policy_under<'a>(
    control: &'a Policy,
    assignments: &[Assignment<'_>],
    swap: Option<(usize, usize)>,
) -> Cow<'a, Policy> {
    let mut policy = Cow::Borrowed(control);
    for (i, a) in assignments.iter().enumerate() {
        let arm = match swap {
            Some((j, arm)) if j == i => arm,
            _ => a.arm_in_force(),
        };
        if arm != a.experiment.control {
            a.experiment.apply(arm, policy.to_mut());
        }
    }
    policy
}

fn resolve(cfg: &ExperimentConfig, key: &str, tenant: &Policy) -> Result<Experiment, Invalid> {
    let start_ms = parse_local(&tenant.tz, &cfg.start).ok_or_else(|| {
        bad(
            format!("{key}.start"),
            "must be YYYY-MM-DDTHH:MM (tenant's local time)",
        )
    })?;
    let end_ms = parse_local(&tenant.tz, &cfg.end).ok_or_else(|| {
        bad(
            format!("{key}.end"),
            "must be YYYY-MM-DDTHH:MM (tenant's local time)",
        )
    })?;
    if end_ms <= start_ms {
        return Err(bad(format!("{key}.end"), "must be after `start`"));
    }
    if cfg.arms.len() < 2 || cfg.arms.len() > MAX_ARMS {
        return Err(bad(
            format!("{key}.arms"),
            format!(
                "{} arms: an experiment has 2 to {MAX_ARMS} arms (`control` and at least one other)",
                cfg.arms.len()
            ),
        ));
    }
    let mut names = BTreeSet::new();
    let mut arms = Vec::with_capacity(cfg.arms.len());
    let mut keys = BTreeSet::new();
    let mut control_at = None;
    let mut total = 0.0;
    for a in &cfg.arms {
        let akey = format!("{key}.arms.{}", a.name);
        if !valid_name(&a.name) {
            return Err(bad(
                format!("{key}.arms"),
                format!(
                    "arm name `{}` must be 1 to {MAX_NAME_LEN} characters of a-z, 0-9, `_` and `-`",
                    a.name
                ),
            ));
        }
        if !names.insert(a.name.as_str()) {
            return Err(bad(
                akey,
                "two arms have this name: arm names must be unique",
            ));
        }
        if !(a.share > 0.0 && a.share <= 1.0) {
            return Err(bad(format!("{akey}.share"), "must be in (0, 1]"));
        }
        total += a.share;
        let arm_keys = a.keys();
        if a.name == CONTROL {
            if !arm_keys.is_empty() {
                return Err(bad(
                    akey,
                    "the control arm is the tenant's policy: move its overrides to another arm",
                ));
            }
            control_at = Some(arms.len());
        } else if arm_keys.is_empty() {
            return Err(bad(
                akey,
                "changes nothing: give it caps, quiet_hours, throttle or recall overrides \
                 (stage offsets, offers, channel_preference)",
            ));
        }
        let mut quiet = Vec::new();
        for (c, q) in &a.quiet_hours {
            let qk = format!("{akey}.quiet_hours.{c}");
            let s =
                parse_hhmm(&q.start).ok_or_else(|| bad(format!("{qk}.start"), "must be HH:MM"))?;
            let e = parse_hhmm(&q.end).ok_or_else(|| bad(format!("{qk}.end"), "must be HH:MM"))?;
            if s == e {
                return Err(bad(
                    qk,
                    "start and end are equal: quiet hours need a length",
                ));
            }
            quiet.push((
                *c,
                QuietSpan {
                    start_min: s,
                    end_min: e,
                },
            ));
        }
        keys.extend(arm_keys);
        arms.push(Arm {
            name: a.name.clone(),
            share: a.share,
            spec: a.clone(),
            quiet,
        });
    }
    if (total - 1.0).abs() > 1e-6 {
        return Err(bad(
            format!("{key}.arms"),
            format!("the shares sum to {total}: they must sum to 1"),
        ));
    }
    let control = control_at.ok_or_else(|| {
        bad(
            format!("{key}.arms"),
            format!(
                "no arm is named `{CONTROL}`: every experiment needs one (the tenant's policy)"
            ),
        )
    })?;
    if !(cfg.alpha > 0.0 && cfg.alpha <= 0.5) {
        return Err(bad(
            format!("{key}.alpha"),
            "must be in (0, 0.5], e.g. 0.05",
        ));
    }
    if !(cfg.effect > 0.0 && cfg.effect <= 5.0) {
        return Err(bad(
            format!("{key}.effect"),
            "must be in (0, 5] standard deviations, e.g. 0.1",
        ));
    }
    if !super::report::METRICS.iter().any(|m| m.key == cfg.primary) {
        let known: Vec<&str> = super::report::METRICS.iter().map(|m| m.key).collect();
        return Err(bad(
            format!("{key}.primary"),
            format!(
                "`{}` is not a measure; one of {}",
                cfg.primary,
                known.join(", ")
            ),
        ));
    }
    if !(0.0..1.0).contains(&cfg.guardrail_margin) {
        return Err(bad(
            format!("{key}.guardrail_margin"),
            "must be in [0, 1): an absolute unsubscribe-rate increase, e.g. 0.002",
        ));
    }
    let bounds = assign::bounds(&arms.iter().map(|a| a.share).collect::<Vec<_>>());
    let arms_len = arms.len();
    let e = Experiment {
        name: cfg.name.clone(),
        tenant: cfg.tenant.clone(),
        start_ms,
        end_ms,
        outcomes_until_ms: end_ms.saturating_add(
            i64::from(
                tenant
                    .lapse
                    .attribution_window_days
                    .max(tenant.lapse.dormant_after_days),
            ) * 86_400_000,
        ),
        arms,
        control,
        keys,
        judging: Judging {
            alpha: cfg.alpha,
            effect: cfg.effect,
            primary: cfg.primary.clone(),
            guardrail_margin: cfg.guardrail_margin,
            auto_stop: cfg.auto_stop,
        },
        stopped: e_stopped(arms_len),
        bounds,
    };
    for (i, a) in e.arms.iter().enumerate() {
        let mut p = tenant.clone();
        e.apply(i, &mut p);
        check_arm_policy(&p, &format!("{key}.arms.{}", a.name))?;
    }
    Ok(e)
}

/// Every arm running.
fn e_stopped(arms: usize) -> Arc<[AtomicI64]> {
    (0..arms).map(|_| AtomicI64::new(i64::MAX)).collect()
}

/// The tenant's policy under an arm must still be a valid policy.
fn check_arm_policy(p: &Policy, key: &str) -> Result<(), Invalid> {
    for c in Channel::ALL {
        let rule = p.caps[c.index()];
        if rule.limit == 0 || rule.limit > MAX_CAP {
            return Err(bad(
                format!("{key}.caps.{c}.limit"),
                format!("must be between 1 and {MAX_CAP}"),
            ));
        }
        if rule.window < Span::secs(60) || rule.window > Span::days(366) {
            return Err(bad(
                format!("{key}.caps.{c}.window"),
                "must be between 1m and 366d",
            ));
        }
    }
    let th = &p.throttle;
    let frac = |v: f64| (0.0..=1.0).contains(&v);
    if !frac(th.throttle_below) || !frac(th.floor) || !frac(th.release_above) {
        return Err(bad(
            format!("{key}.throttle"),
            "throttle_below, floor and release_above must be between 0 and 1",
        ));
    }
    if th.release_above <= th.throttle_below {
        return Err(bad(
            format!("{key}.throttle.release_above"),
            "must be greater than throttle_below (the tenant's, unless the arm sets it): \
             hysteresis, or customers flap",
        ));
    }
    if th.min_sends.is_nan() || th.min_sends < 1.0 {
        return Err(bad(format!("{key}.throttle.min_sends"), "must be >= 1"));
    }
    if th.cooldown.is_zero() {
        return Err(bad(format!("{key}.throttle.cooldown"), "must be positive"));
    }
    p.cross_channel
        .validate(&format!("{key}.caps (policy.cross_channel)"), &p.caps)?;
    p.lapse
        .validate(&format!("{key}.recall"))
        .map_err(|(k, m)| bad(k, m))
}
