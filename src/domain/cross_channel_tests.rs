//! Table-driven and property tests of the cross-channel rules (touch cap, one
//! campaign one channel), through the same pure functions the pipeline calls.

use chrono::TimeZone;
use proptest::prelude::*;

use super::allowance::{AllowanceState, Violation};
use super::binding_rule::{binding_rule, BindingRule};
use super::cross_channel::{
    CrossChannelPolicy, CAMPAIGN_ON_OTHER_CHANNEL, CROSS_CHANNEL_CAP, MAX_CAMPAIGN_TOUCHES,
};
use super::decide::{allowance_at, campaign_allowance_at, release_due, Effects};
use super::event::*;
use super::policy::{Policy, PolicyConfig, TenantOverride};
use super::span::Span;

const H: i64 = 3_600_000;
const DAY: i64 = 24 * H;

pub(super) fn sh(d: u32, h: u32) -> i64 {
    chrono_tz::Asia::Shanghai
        .with_ymd_and_hms(2026, 3, d, h, 0, 0)
        .unwrap()
        .timestamp_millis()
}

fn policy(limit: u32, lock_days: u64) -> Policy {
    let cfg = PolicyConfig {
        cross_channel: CrossChannelPolicy {
            limit,
            window: Span::days(1),
            campaign_lock: Span::days(lock_days),
        },
        ..PolicyConfig::default()
    };
    cfg.resolve(None).unwrap()
}

pub(super) use super::decide_tests::Sim;

/// One step of a table: a marketing send `(channel, campaign, at)` and the
/// violation it must be (None: allowed).
type Step = (Channel, &'static str, i64, Option<Violation>);

#[test]
fn sends_are_judged_by_the_cross_channel_rules() {
    use Channel::*;
    let t = sh(2, 10);
    let cases: &[(&str, Policy, &[Step])] = &[
        (
            "off by default: five channels in an hour, one campaign everywhere",
            PolicyConfig::default().resolve(None).unwrap(),
            &[
                (Wechat, "x", t, None),
                (Sms, "x", t + 1, None),
                (Email, "x", t + 2, None),
                (Social, "x", t + 3, None),
                (Phone, "x", t + 4, None),
            ],
        ),
        (
            "3 a day across channels: the fourth touch on a fresh channel is a violation",
            policy(3, 0),
            &[
                (Wechat, "a", t, None),
                (Sms, "b", t + H, None),
                (Email, "c", t + 2 * H, None),
                (Social, "d", t + 3 * H, Some(Violation::CrossChannelCap)),
            ],
        ),
        (
            "the window rolls: a day after the first touch one slot is free again",
            policy(3, 0),
            &[
                (Wechat, "a", t, None),
                (Sms, "b", t + H, None),
                (Email, "c", t + 2 * H, None),
                (Social, "d", t + DAY, None),
                (Wechat, "e", t + DAY + 10, Some(Violation::CrossChannelCap)),
            ],
        ),
        (
            "a channel's own cap still binds first",
            policy(3, 0),
            &[
                (Wechat, "a", t, None),
                (Wechat, "b", t + H, None),
                (Wechat, "c", t + 2 * H, Some(Violation::Cap)),
            ],
        ),
        (
            "one campaign, one channel: the campaign is refused elsewhere, others are not",
            policy(0, 7),
            &[
                (Wechat, "x", t, None),
                (Sms, "x", t + H, Some(Violation::CampaignOnOtherChannel)),
                (Sms, "y", t + 2 * H, None),
                (
                    Wechat,
                    "x",
                    t + 3 * H,
                    Some(Violation::CampaignOnOtherChannel),
                ),
            ],
        ),
        (
            "the lock runs from the carrying channel's latest send of the campaign",
            policy(0, 7),
            &[
                (Email, "x", t, None),
                (Email, "x", t + 6 * DAY, None),
                (
                    Sms,
                    "x",
                    t + 8 * DAY,
                    Some(Violation::CampaignOnOtherChannel),
                ),
                (Sms, "x", t + 13 * DAY + H, None),
            ],
        ),
        (
            "sends without a campaign are never locked",
            policy(0, 7),
            &[(Wechat, "", t, None), (Sms, "", t + H, None)],
        ),
    ];
    let mut wrong = Vec::new();
    for (name, policy, steps) in cases {
        let mut s = Sim::new(policy.clone());
        for (i, (c, campaign, at, want)) in steps.iter().enumerate() {
            let fx = s.send_campaign(*c, campaign, *at);
            let got = fx.violations.first().map(|(_, v)| *v);
            if got != *want {
                wrong.push(format!("{name}: step {i}: want {want:?}, got {got:?}"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_filled_touch_cap_caps_every_channel_with_its_own_scope_and_releases_on_time() {
    let mut s = Sim::new(policy(3, 0));
    let t = sh(2, 10);
    s.send_campaign(Channel::Wechat, "a", t);
    s.send_campaign(Channel::Sms, "b", t + H);
    assert!(s.throttles().is_empty(), "{:?}", s.throttles());
    s.send_campaign(Channel::Email, "c", t + 2 * H);
    let ds = s.throttles();
    // Every channel is told, each on its own key, that the cross-channel cap binds.
    assert_eq!(ds.len(), 5, "{ds:?}");
    for d in &ds {
        assert_eq!(d.state, AllowanceState::Capped, "{d:?}");
        assert_eq!(d.reason, CROSS_CHANNEL_CAP);
        assert_eq!(binding_rule(&d.reason), BindingRule::CrossChannel);
        assert_eq!(d.allowed_from, Some(t + DAY), "{d:?}");
        assert_eq!(
            (d.cap, d.window_ms, d.sends_in_window),
            (Some(3), Some(DAY), 3)
        );
    }
    let a = allowance_at(&s.state, Channel::Phone, &s.policy, &s.sp, t + 3 * H);
    assert_eq!(
        (a.state, a.reason),
        (AllowanceState::Capped, CROSS_CHANNEL_CAP)
    );
    // Due at the window's end: the timer releases every channel.
    assert_eq!(super::decide::next_release(&s.state), Some(t + DAY));
    s.state.outbox.clear();
    let mut fx = Effects::default();
    release_due(
        &mut s.state,
        &s.who,
        &s.policy,
        &s.sp,
        t + DAY,
        None,
        &mut fx,
        None,
    );
    let ds = s.throttles();
    assert_eq!(ds.len(), 5, "{ds:?}");
    assert!(ds.iter().all(|d| d.state == AllowanceState::Open), "{ds:?}");
    assert_eq!(super::decide::next_release(&s.state), None);
}

#[test]
fn the_touch_cap_never_shortens_a_longer_restriction_and_never_lifts_an_unsubscribe() {
    let mut s = Sim::new(policy(3, 0));
    let t = sh(2, 10);
    s.apply(
        EventBody::Reply {
            channel: Channel::Phone,
            message_id: None,
            class: ReplyClass::Unsubscribe,
        },
        t - H,
    );
    // SMS fills its own 2 per 7 days: capped until t + 7d, beyond the touch cap's day.
    s.send_campaign(Channel::Sms, "a", t);
    s.send_campaign(Channel::Sms, "b", t + H);
    s.send_campaign(Channel::Wechat, "c", t + 2 * H);
    let at = t + 3 * H;
    let sms = allowance_at(&s.state, Channel::Sms, &s.policy, &s.sp, at);
    assert_eq!(
        (sms.state, sms.reason),
        (AllowanceState::Capped, "frequency_cap")
    );
    assert_eq!(sms.allowed_from, Some(t + 7 * DAY));
    let phone = allowance_at(&s.state, Channel::Phone, &s.policy, &s.sp, at);
    assert_eq!(phone.state, AllowanceState::Suppressed);
    let email = allowance_at(&s.state, Channel::Email, &s.policy, &s.sp, at);
    assert_eq!(
        (email.state, email.reason),
        (AllowanceState::Capped, CROSS_CHANNEL_CAP)
    );
}

#[test]
fn the_allowance_for_a_campaign_names_the_lock_and_when_it_ends() {
    let mut s = Sim::new(policy(0, 7));
    let t = sh(2, 10);
    s.send_campaign(Channel::Wechat, "spring", t);
    let at = t + H;
    let sms = campaign_allowance_at(&s.state, Channel::Sms, "spring", &s.policy, &s.sp, at);
    assert_eq!(sms.state, AllowanceState::Capped);
    assert_eq!(sms.reason, CAMPAIGN_ON_OTHER_CHANNEL);
    assert_eq!(binding_rule(sms.reason), BindingRule::CampaignChannel);
    assert_eq!(sms.allowed_from, Some(t + 7 * DAY));
    let wechat = campaign_allowance_at(&s.state, Channel::Wechat, "spring", &s.policy, &s.sp, at);
    assert_eq!(wechat.state, AllowanceState::Open);
    let other = campaign_allowance_at(&s.state, Channel::Sms, "summer", &s.policy, &s.sp, at);
    assert_eq!(other.state, AllowanceState::Open);
    // Without a campaign the channel is open: the lock is per campaign, never published.
    let plain = allowance_at(&s.state, Channel::Sms, &s.policy, &s.sp, at);
    assert_eq!(plain.state, AllowanceState::Open);
    assert!(s.throttles().is_empty());
    let later = campaign_allowance_at(
        &s.state,
        Channel::Sms,
        "spring",
        &s.policy,
        &s.sp,
        t + 7 * DAY,
    );
    assert_eq!(later.state, AllowanceState::Open);
}

#[test]
fn campaign_memory_is_bounded_and_off_when_the_lock_is() {
    let mut s = Sim::new(policy(0, 30));
    let t = sh(2, 10);
    for i in 0..40 {
        s.send_campaign(Channel::ALL[i % 5], &format!("c{i}"), t + i as i64 * H);
    }
    assert_eq!(s.state.campaign_touches.len(), MAX_CAMPAIGN_TOUCHES);
    // The newest are kept.
    let newest = s.state.campaign_touches.last().unwrap();
    assert_eq!(newest.at, t + 39 * H);
    let mut off = Sim::new(PolicyConfig::default().resolve(None).unwrap());
    off.send_campaign(Channel::Wechat, "x", t);
    assert!(off.state.campaign_touches.is_empty());
    // Touches older than the lock are forgotten.
    let mut s = Sim::new(policy(0, 1));
    s.send_campaign(Channel::Wechat, "x", t);
    s.send_campaign(Channel::Sms, "y", t + 2 * DAY);
    assert_eq!(s.state.campaign_touches.len(), 1);
}

#[test]
fn settings_that_cannot_work_are_refused_with_the_key_and_what_to_do() {
    let with = |cc: CrossChannelPolicy| {
        PolicyConfig {
            cross_channel: cc,
            ..PolicyConfig::default()
        }
        .validate()
    };
    let base = CrossChannelPolicy {
        limit: 3,
        window: Span::days(1),
        campaign_lock: Span::days(7),
    };
    assert_eq!(with(base), Ok(()));
    let (key, msg) = with(CrossChannelPolicy {
        window: Span::days(2),
        ..base
    })
    .unwrap_err();
    assert_eq!(key, "policy.cross_channel.window");
    assert!(msg.contains("shortest channel cap window"), "{msg}");
    let (key, _) = with(CrossChannelPolicy { limit: 99, ..base }).unwrap_err();
    assert_eq!(key, "policy.cross_channel.limit");
    // A tenant may turn it on alone.
    let mut cfg = PolicyConfig::default();
    cfg.tenants.insert(
        "brandA".into(),
        TenantOverride {
            cross_channel: Some(base),
            ..TenantOverride::default()
        },
    );
    assert_eq!(cfg.resolve(Some("brandA")).unwrap().cross_channel, base);
    assert_eq!(cfg.resolve(None).unwrap().cross_channel.limit, 0);
}

proptest! {
    /// A sender that sends only when the allowance for that campaign says OPEN
    /// never breaks a channel cap, the touch cap or the campaign lock, whatever
    /// it attempts on whichever channels.
    #[test]
    fn an_obeying_sender_never_exceeds_any_per_channel_or_cross_channel_rule(
        attempts in proptest::collection::vec((0i64..(8 * H), 0usize..5, 0usize..4), 1..80),
        limit in 1u32..5,
        lock_days in 0u64..4,
        wecom_daily in proptest::option::of(1u32..3),
    ) {
        let mut p = policy(limit, lock_days);
        // With a platform rule on top (WeCom's daily limit on WECHAT), all rules hold together.
        if let Some(daily) = wecom_daily {
            p.platform_rules.push(super::platform::PlatformRule {
                name: "wecom_daily_mass_message".into(),
                channel: Channel::Wechat,
                kind: super::platform::PlatformRuleKind::CalendarDay,
                limit: daily,
                window: None,
                source: String::new(),
            });
        }
        let mut s = Sim::new(p.clone());
        let mut t = sh(1, 0);
        let mut sent: Vec<(i64, Channel, usize)> = Vec::new();
        for (gap, ch, campaign) in attempts {
            t += gap;
            let c = Channel::ALL[ch];
            let name = format!("k{campaign}");
            let a = campaign_allowance_at(&s.state, c, &name, &s.policy, &s.sp, t);
            if a.state == AllowanceState::Open && a.allowed_from.is_some_and(|x| x <= t) {
                let fx = s.send_campaign(c, &name, t);
                prop_assert!(fx.violations.is_empty(), "an allowed send was a violation: {:?}", fx.violations);
                sent.push((t, c, campaign));
            }
        }
        let lock = (lock_days as i64) * DAY;
        for (i, &(end, c, k)) in sent.iter().enumerate() {
            let before = &sent[..=i];
            let cap = p.caps[c.index()];
            let own = before.iter().filter(|x| x.1 == c && x.0 > end - cap.window.as_ms()).count();
            prop_assert!(own as u32 <= cap.limit, "{c:?}: {own} sends in its window ending {end}");
            let all = before.iter().filter(|x| x.0 > end - DAY).count();
            prop_assert!(all as u32 <= limit, "{all} touches across channels in the day ending {end}");
            let elsewhere = before.iter().any(|x| x.2 == k && x.1 != c && x.0 > end - lock);
            prop_assert!(!elsewhere, "campaign k{k} on {c:?} at {end} within the lock of another channel");
            if let (Some(daily), Channel::Wechat) = (wecom_daily, c) {
                let day = |x: i64| p.tz.timestamp_millis_opt(x).unwrap().date_naive();
                let same_day = before.iter().filter(|x| x.1 == c && day(x.0) == day(end)).count();
                prop_assert!(same_day as u32 <= daily, "{same_day} WECHAT sends on the local day of {end}");
            }
        }
    }
}

/// Sends and replies come from different topics, so an opt-out may be applied
/// before sends that happened earlier: the decisions in between differ, but
/// every channel ends on the same published allowance.
#[test]
fn an_opt_out_applied_before_earlier_sends_ends_on_the_same_allowances() {
    const M: i64 = 60_000;
    let last_per_channel = |reply_first: bool| {
        let mut s = Sim::new(policy(3, 7));
        let t = sh(2, 12);
        let opt_out = |s: &mut Sim| {
            s.apply(
                EventBody::Reply {
                    channel: Channel::Sms,
                    message_id: None,
                    class: ReplyClass::Unsubscribe,
                },
                t + 4 * M,
            );
        };
        if reply_first {
            opt_out(&mut s);
        }
        s.send_campaign(Channel::Email, "spring", t);
        s.send_campaign(Channel::Social, "summer", t + M);
        s.send_campaign(Channel::Wechat, "autumn", t + 2 * M);
        s.send_campaign(Channel::Social, "winter", t + 3 * M);
        if !reply_first {
            opt_out(&mut s);
        }
        let ds = s.throttles();
        let last: std::collections::BTreeMap<_, _> = ds
            .iter()
            .map(|d| (d.channel, (d.state, d.reason.clone(), d.allowed_from)))
            .collect();
        (ds.len(), last)
    };
    let (in_order, a) = last_per_channel(false);
    let (reply_first, b) = last_per_channel(true);
    // In order: 5 capped, 5 moved later, SMS suppressed. Reply first: SMS is
    // suppressed already, so the cap is news to 4 channels, twice.
    assert_eq!((in_order, reply_first), (11, 9));
    assert_eq!(a, b);
    assert_eq!(a.len(), 5);
    assert_eq!(
        a[&Some(Channel::Sms)],
        (
            AllowanceState::Suppressed,
            "unsubscribe_reply".to_string(),
            None
        )
    );
    assert_eq!(
        a[&Some(Channel::Email)],
        (
            AllowanceState::Capped,
            CROSS_CHANNEL_CAP.to_string(),
            Some(sh(2, 12) + M + DAY)
        )
    );
}
