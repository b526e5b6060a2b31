//! The tenants' population histogram for best contact hours, measured from the
//! history: engagement (opens, clicks, replies) by local hour, printed as the
//! `population` line to paste under `[policy.tenants.ID.contact_hours]`
//! (README "Best contact hours"). A property of the history, not of a policy.

use std::collections::BTreeMap;

use crate::domain::contact_hours::engagement_hour;
use crate::domain::event::Event;
use crate::domain::policy::Policies;

/// Engagement events by tenant and local hour (in the tenant's time zone).
pub fn engagement_by_hour<'a>(
    events: impl IntoIterator<Item = &'a Event>,
    policies: &Policies,
) -> BTreeMap<String, [u64; 24]> {
    let mut out: BTreeMap<String, [u64; 24]> = BTreeMap::new();
    for ev in events {
        if let Some(h) = engagement_hour(ev, policies.of(&ev.customer.tenant)) {
            match out.get_mut(&ev.customer.tenant) {
                Some(counts) => counts[h] += 1,
                None => {
                    let mut counts = [0; 24];
                    counts[h] = 1;
                    out.insert(ev.customer.tenant.clone(), counts);
                }
            }
        }
    }
    out
}

/// `population = [...]`: the counts relative to the busiest hour, 2 decimals.
pub fn population_line(counts: &[u64; 24]) -> String {
    let max = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let weights: Vec<String> = counts
        .iter()
        .map(|n| format!("{:.2}", *n as f64 / max))
        .collect();
    format!("population = [{}]", weights.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{Channel, CustomerRef, EventBody};
    use crate::domain::policy::PolicyConfig;
    use chrono::TimeZone;

    #[test]
    fn engagement_is_counted_by_the_tenants_local_hour() {
        let mut cfg = PolicyConfig::default();
        cfg.tenants.insert(
            "ny".into(),
            crate::domain::policy::TenantOverride {
                timezone: Some("America/New_York".into()),
                ..Default::default()
            },
        );
        let policies = Policies::new(&cfg).unwrap();
        // 12:00 UTC: 20:00 in Shanghai, 07:00 in New York (winter).
        let t = chrono::Utc
            .with_ymd_and_hms(2026, 1, 15, 12, 0, 0)
            .unwrap()
            .timestamp_millis();
        let ev = |tenant: &str, body: EventBody| Event {
            event_id: "e".into(),
            customer: CustomerRef::new(tenant, "c"),
            occurred_at: t,
            body,
        };
        let open = || EventBody::Open {
            channel: Channel::Wechat,
            message_id: "m".into(),
            campaign_id: None,
        };
        let send = EventBody::Send {
            channel: Channel::Sms,
            message_id: "m".into(),
            campaign_id: None,
            purpose: crate::domain::event::Purpose::Marketing,
            cost: None,
        };
        let events = [
            ev("sh", open()),
            ev("sh", open()),
            ev("ny", open()),
            ev("sh", send),
        ];
        let by = engagement_by_hour(events.iter(), &policies);
        assert_eq!(by["sh"][20], 2, "sends are not engagement");
        assert_eq!(by["sh"].iter().sum::<u64>(), 2);
        assert_eq!(by["ny"][7], 1);
        let line = population_line(&by["sh"]);
        assert!(line.starts_with("population = [0.00, "), "{line}");
        assert!(line.contains(", 1.00, 0.00, 0.00, 0.00]"), "{line}");
    }
}
