//! `lapse inspect`: a customer's state as JSON for operators. Decayed counts are
//! shown as stored (at their reference time) and as of now.

use chrono::{TimeZone, Utc};
use serde::Serialize;
use serde_json::{json, Value};

use crate::domain::event::{Channel, CustomerRef};
use crate::domain::state::{CustomerState, StateParams};

fn ts(ms: Option<i64>) -> Value {
    match ms.and_then(|m| Utc.timestamp_millis_opt(m).single()) {
        Some(t) => Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        None => Value::Null,
    }
}

fn round(x: f32) -> f64 {
    (x as f64 * 1e4).round() / 1e4
}

fn counts<T: Serialize>(c: &T) -> Value {
    serde_json::to_value(c).unwrap_or(Value::Null)
}

pub fn view(c: &CustomerRef, rev: u64, s: &CustomerState, p: &StateParams, now_ms: i64) -> Value {
    let v = &s.visits;
    let mut channels = serde_json::Map::new();
    for ch in Channel::ALL {
        if let Some(e) = s.channel(ch) {
            let (short, long) = e.counts_at(now_ms, p.horizons);
            let r = |c: crate::domain::engagement::Counts| json!({"sends": round(c.sends), "opens": round(c.opens), "clicks": round(c.clicks), "replies": round(c.replies)});
            channels.insert(
                ch.as_str().into(),
                json!({
                    "decayed_at": ts(Some(e.at)),
                    "short": counts(&e.short),
                    "long": counts(&e.long),
                    "short_now": r(short),
                    "long_now": r(long),
                    "last_send_at": ts(e.last_send),
                    "last_open_at": ts(e.last_open),
                    "last_click_at": ts(e.last_click),
                    "last_reply_at": ts(e.last_reply),
                    "unsubscribed": e.is_unsubscribed(),
                    "unsubscribed_at": ts(e.unsubscribed_at),
                    "resubscribed_at": ts(e.resubscribed_at),
                }),
            );
        }
    }
    let watermarks: Vec<Value> = crate::domain::event::EventKind::ALL
        .iter()
        .zip(&s.applied.watermarks)
        .filter_map(|(k, w)| {
            w.map(
                |w| json!({"event_type": k.label(), "partition": w.partition, "offset": w.offset}),
            )
        })
        .collect();
    json!({
        "customer": {"tenant_id": c.tenant, "customer_id": c.customer},
        "revision": rev,
        "visits": {
            "count": v.count,
            "first_visit_at": ts(v.first_at),
            "last_visit_at": ts(v.last_at),
            "lifetime_spend": v.lifetime_spend,
            "currency": v.currency,
            "last_treatment": v.last_treatment,
            "last_visit_type": v.last_visit_type,
            "recent_visits": v.recent.iter().map(|t| ts(Some(*t))).collect::<Vec<_>>(),
            "gaps": v.gap_stats(),
        },
        "channels": channels,
        // The latest score only (the state keeps no more); the class is the
        // policy's and is not stored.
        "feedback": s.feedback.map(|f| json!({
            "kind": f.kind.as_str(),
            "score": f.score,
            "at": ts(Some(f.at)),
        })),
        "idempotence": {
            "watermarks": watermarks,
            "remembered_event_ids": crate::domain::event::EventKind::ALL
                .iter()
                .map(|k| (k.label().to_string(), json!(s.applied.seen[k.index()].ids.len())))
                .collect::<serde_json::Map<_, _>>(),
            "dedup_horizon_from_evictions": crate::domain::event::EventKind::ALL
                .iter()
                .filter_map(|k| {
                    let e = s.applied.seen[k.index()].evicted_until?;
                    Some((k.label().to_string(), ts(Some(e))))
                })
                .collect::<serde_json::Map<_, _>>(),
            "remembered_event_ids_of_earlier_versions": s.applied.legacy_ids.len(),
        },
    })
}

/// Every channel's allowance at `now`, as served by `GET /v1/allowance/T/C` and shown by inspect.
pub fn allowance_view(
    c: &CustomerRef,
    s: Option<&CustomerState>,
    policy: &crate::domain::policy::Policy,
    p: &StateParams,
    now_ms: i64,
) -> Value {
    campaign_allowance_view(c, s, policy, p, now_ms, None)
}

/// [`allowance_view`] for one campaign when given (`?campaign=X`): a channel
/// is also closed while the campaign is locked to another channel.
pub fn campaign_allowance_view(
    c: &CustomerRef,
    s: Option<&CustomerState>,
    policy: &crate::domain::policy::Policy,
    p: &StateParams,
    now_ms: i64,
    campaign: Option<&str>,
) -> Value {
    use crate::domain::decide::{allowance_at, campaign_allowance_at};
    let empty = CustomerState::default();
    let state = s.unwrap_or(&empty);
    let good = crate::domain::contact_hours::customer_good_hours(state, policy, now_ms);
    let mut channels = serde_json::Map::new();
    for ch in Channel::ALL {
        let a = match campaign {
            Some(k) => campaign_allowance_at(state, ch, k, policy, p, now_ms),
            None => allowance_at(state, ch, policy, p, now_ms),
        };
        let allowed = a.state == crate::domain::allowance::AllowanceState::Open
            && a.allowed_from.is_some_and(|t| t <= now_ms);
        // From the same allowance as `allowed_from` (the campaign's too).
        let next_good = good
            .and_then(|g| crate::domain::contact_hours::next_good_time_of(&g, &a, policy, now_ms));
        channels.insert(
            ch.as_str().into(),
            json!({
                "state": a.state.as_str(),
                "reason": a.reason,
                "rule": crate::domain::binding_rule::binding_rule(a.reason).as_str(),
                "platform_rule": crate::domain::platform::is_platform_reason(a.reason)
                    .then(|| crate::domain::platform::binding(state, ch, policy, now_ms))
                    .flatten()
                    .map(|b| b.rule.name.clone()),
                "allowed_now": allowed,
                "allowed_from": ts(a.allowed_from),
                "allowed_from_ms": a.allowed_from,
                "next_good_time": ts(next_good),
                "next_good_time_ms": next_good,
                "cap": a.cap.limit,
                "window": a.cap.window.to_string(),
                "sends_in_window": a.sends_in_window,
                "short_click_rate": a.short_click_rate.map(|r| (r * 1e4).round() / 1e4),
                "baseline_click_rate": a.baseline_click_rate.map(|r| (r * 1e4).round() / 1e4),
            }),
        );
    }
    json!({
        "tenant_id": c.tenant,
        "customer_id": c.customer,
        "campaign_id": campaign,
        "known": s.is_some(),
        "evaluated_at": ts(Some(now_ms)),
        "good_hours": good.map(|g| g.hours()),
        "good_hours_source": good.map(|g| g.source.as_str()),
        "channels": channels,
    })
}

/// Adds the customer's experiment arms to an [`allowance_view`]: per channel
/// `policy_experiment` and `policy_arm` (the experiment that shapes that
/// channel's decisions now, as on its throttle events), and `experiments`:
/// every experiment running now with the customer's arm, when they were
/// exposed (null: not yet) and when the guardrail stopped the arm (null:
/// running; once stopped, the control's policy applies).
pub fn add_experiments(
    v: &mut Value,
    c: &CustomerRef,
    s: Option<&CustomerState>,
    x: &crate::domain::experiment::Experiments,
    now_ms: i64,
) {
    if let Some(channels) = v.get_mut("channels").and_then(Value::as_object_mut) {
        for ch in Channel::ALL {
            let tag = x.tag_channel(c, ch, now_ms);
            if let Some(o) = channels.get_mut(ch.as_str()).and_then(Value::as_object_mut) {
                o.insert(
                    "policy_experiment".into(),
                    json!(tag.as_ref().map(|t| &t.experiment)),
                );
                o.insert("policy_arm".into(), json!(tag.as_ref().map(|t| &t.arm)));
            }
        }
    }
    let exposures = s.map_or(&[][..], |s| &s.exposures[..]);
    let running: Vec<Value> = x
        .assignments(c, now_ms)
        .iter()
        .map(|a| {
            let exposed = exposures
                .iter()
                .find(|e| e.experiment == a.experiment.name)
                .map(|e| e.at);
            json!({
                "experiment": a.experiment.name,
                "arm": a.arm_name(),
                "exposed_at": ts(exposed),
                // Stopped by the guardrail: the control's policy applies.
                "stopped_at": ts(a.experiment.stopped_at(a.arm)),
            })
        })
        .collect();
    if let Some(o) = v.as_object_mut() {
        o.insert("experiments".into(), Value::Array(running));
    }
}

#[cfg(test)]
mod experiment_view_tests {
    use super::*;
    use crate::domain::experiment::Exposure;
    use crate::domain::policy::{Policies, PolicyConfig};
    use crate::domain::state::StateParams;

    #[test]
    fn the_allowance_view_shows_the_arm_and_the_exposure() {
        let cfg: PolicyConfig = toml::from_str(
            r#"
[[experiments]]
name = "sms-weekly-1"
tenant = "brandA"
start = "2026-01-01T00:00"
end = "2027-01-01T00:00"
[[experiments.arms]]
name = "control"
share = 0.5
[[experiments.arms]]
name = "one"
share = 0.5
caps.SMS = { limit = 1, window = "7d" }
"#,
        )
        .unwrap();
        let p = Policies::new(&cfg).unwrap();
        let c = CustomerRef::new("brandA", "c1");
        let now = 1_780_000_000_000; // 2026-05-28
        let e = p.experiments().all().next().unwrap();
        let arm = e.arms[e.arm_of(&c)].name.clone();
        let state = CustomerState {
            exposures: vec![Exposure {
                experiment: "sms-weekly-1".into(),
                arm: arm.clone(),
                at: now - 1000,
                measures: Default::default(),
            }],
            ..Default::default()
        };
        let eff = p.effective(&c, now);
        let mut v = allowance_view(&c, Some(&state), &eff.policy, &StateParams::default(), now);
        add_experiments(&mut v, &c, Some(&state), p.experiments(), now);
        assert_eq!(v["channels"]["SMS"]["policy_experiment"], "sms-weekly-1");
        assert_eq!(v["channels"]["SMS"]["policy_arm"], arm.as_str());
        assert!(v["channels"]["WECHAT"]["policy_experiment"].is_null());
        let expected_cap = if arm == "one" { 1 } else { 2 };
        assert_eq!(v["channels"]["SMS"]["cap"], expected_cap);
        assert_eq!(v["experiments"][0]["experiment"], "sms-weekly-1");
        assert_eq!(v["experiments"][0]["arm"], arm.as_str());
        assert_eq!(v["experiments"][0]["exposed_at"], ts(Some(now - 1000)));
        // After the experiment: nothing running, no tags.
        let later = now + 400 * 86_400_000;
        let mut v = allowance_view(
            &c,
            Some(&state),
            p.of("brandA"),
            &StateParams::default(),
            later,
        );
        add_experiments(&mut v, &c, Some(&state), p.experiments(), later);
        assert_eq!(v["experiments"], json!([]));
        assert!(v["channels"]["SMS"]["policy_arm"].is_null());
    }
}
