//! Table-driven and property tests of the platform rules (calendar month,
//! calendar day, inbound window), through the functions the pipeline calls.

use chrono::{Datelike, TimeZone};
use proptest::prelude::*;

use super::allowance::{AllowanceState, Violation};
use super::binding_rule::{binding_rule, BindingRule};
use super::cross_channel_tests::{sh, Sim};
use super::decide::{allowance_at, next_timer, release_due, Effects};
use super::event::*;
use super::platform::{PlatformRule, PlatformRuleKind};
use super::policy::{Policy, PolicyConfig};
use super::span::Span;

const H: i64 = 3_600_000;

fn rule(kind: PlatformRuleKind, limit: u32, window_h: Option<u64>) -> PlatformRule {
    PlatformRule {
        name: format!("{kind:?}"),
        channel: Channel::Wechat,
        kind,
        limit,
        window: window_h.map(|h| Span::secs(h * 3600)),
        source: String::new(),
    }
}

fn policy(rules: Vec<PlatformRule>) -> Policy {
    PolicyConfig {
        platform_rules: rules,
        ..PolicyConfig::default()
    }
    .resolve(None)
    .unwrap()
}

fn local(y: i32, m: u32, d: u32, h: u32) -> i64 {
    chrono_tz::Asia::Shanghai
        .with_ymd_and_hms(y, m, d, h, 0, 0)
        .unwrap()
        .timestamp_millis()
}

fn reply(s: &mut Sim, t: i64) {
    s.apply(
        EventBody::Reply {
            channel: Channel::Wechat,
            message_id: None,
            class: ReplyClass::Neutral,
        },
        t,
    );
}

/// `(what happens, at, the violation a send must be)`; a reply has no violation.
enum Step {
    Send(i64, Option<Violation>),
    Reply(i64),
}

#[test]
fn sends_are_judged_by_the_platform_rules() {
    use PlatformRuleKind::*;
    use Step::*;
    let v = Some(Violation::PlatformRule);
    let cases: Vec<(&str, Vec<PlatformRule>, Vec<Step>)> = vec![
        (
            "WeChat service account: 4 broadcasts a calendar month",
            vec![rule(CalendarMonth, 4, None)],
            vec![
                Send(sh(2, 10), None),
                Send(sh(3, 10), None),
                Send(sh(4, 10), None),
                Send(sh(5, 10), None),
                Send(sh(20, 10), v),
                Send(sh(31, 12), v),
                // A new month, a new allowance.
                Send(local(2026, 4, 1, 9), None),
            ],
        ),
        (
            "WeCom: 1 mass message a calendar day, not a rolling 24 h",
            vec![rule(CalendarDay, 1, None)],
            vec![
                Send(sh(2, 20), None),
                // 09:00 the next morning: a new day, though only 13 h later.
                Send(sh(3, 9), None),
                Send(sh(3, 10), v),
            ],
        ),
        (
            "WeChat customer-service messages: within 48 h of the last reply, at most 2",
            vec![rule(InboundWindow, 2, Some(48))],
            vec![
                Send(sh(2, 10), v),
                Reply(sh(2, 11)),
                Send(sh(2, 12), None),
                Send(sh(3, 12), None),
                Send(sh(3, 18), v),
                Reply(sh(3, 19)),
                Send(sh(4, 13), None),
                // 48 h after the last reply: closed until the customer writes again.
                Send(sh(5, 20), v),
            ],
        ),
        (
            "without rules nothing changes",
            vec![],
            vec![
                Send(sh(2, 10), None),
                Send(sh(3, 10), None),
                Send(sh(4, 10), None),
            ],
        ),
    ];
    let mut wrong = Vec::new();
    for (name, rules, steps) in cases {
        let mut s = Sim::new(policy(rules));
        for (i, step) in steps.into_iter().enumerate() {
            match step {
                Reply(t) => reply(&mut s, t),
                Send(t, want) => {
                    let got = s
                        .send_campaign(Channel::Wechat, "", t)
                        .violations
                        .first()
                        .map(|x| x.1);
                    if got != want {
                        wrong.push(format!("{name}: step {i}: want {want:?}, got {got:?}"));
                    }
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_binding_rule_is_named_published_and_released_at_the_next_period() {
    let mut s = Sim::new(policy(vec![rule(PlatformRuleKind::CalendarMonth, 2, None)]));
    s.send_campaign(Channel::Wechat, "", sh(2, 10));
    s.send_campaign(Channel::Wechat, "", sh(5, 10));
    let a = allowance_at(&s.state, Channel::Wechat, &s.policy, &s.sp, sh(6, 10));
    assert_eq!(
        (a.state, a.reason),
        (AllowanceState::Capped, "platform_calendar_month")
    );
    assert_eq!(binding_rule(a.reason), BindingRule::Platform);
    // Midnight of April 1st is in WeChat's quiet hours (22:00-08:00): 08:00.
    let april = local(2026, 4, 1, 8);
    assert_eq!(a.allowed_from, Some(april));
    let d = s.throttles().pop().unwrap();
    assert_eq!(
        (d.reason.as_str(), d.allowed_from),
        ("platform_calendar_month", Some(april))
    );
    assert_eq!(next_timer(&s.state, &s.policy), Some(april));
    s.state.outbox.clear();
    let mut fx = Effects::default();
    release_due(
        &mut s.state,
        &s.who,
        &s.policy,
        &s.sp,
        april,
        None,
        &mut fx,
        None,
    );
    assert_eq!(s.throttles().pop().unwrap().state, AllowanceState::Open);
    // The other channels never had the rule.
    let sms = allowance_at(&s.state, Channel::Sms, &s.policy, &s.sp, sh(6, 10));
    assert_eq!(sms.state, AllowanceState::Open);
}

#[test]
fn an_inbound_window_closes_on_its_timer_and_reopens_on_a_reply() {
    let mut s = Sim::new(policy(vec![rule(
        PlatformRuleKind::InboundWindow,
        5,
        Some(48),
    )]));
    let r = sh(2, 10);
    reply(&mut s, r);
    // Open, and nothing published: the timer is due when the window closes.
    assert!(s.throttles().is_empty());
    assert_eq!(next_timer(&s.state, &s.policy), Some(r + 48 * H));
    let mut fx = Effects::default();
    release_due(
        &mut s.state,
        &s.who,
        &s.policy,
        &s.sp,
        r + 48 * H,
        None,
        &mut fx,
        None,
    );
    let d = s.throttles().pop().unwrap();
    assert_eq!(
        (d.state, d.reason.as_str()),
        (AllowanceState::Capped, "platform_inbound_window")
    );
    assert_eq!(
        d.allowed_from, None,
        "no time is known until the customer replies"
    );
    assert_eq!(next_timer(&s.state, &s.policy), None);
    reply(&mut s, r + 50 * H);
    assert_eq!(s.throttles().pop().unwrap().state, AllowanceState::Open);
    // An unsubscribe outranks the rule.
    s.apply(
        EventBody::Reply {
            channel: Channel::Wechat,
            message_id: None,
            class: ReplyClass::Unsubscribe,
        },
        r + 51 * H,
    );
    let a = allowance_at(&s.state, Channel::Wechat, &s.policy, &s.sp, r + 99 * H);
    assert_eq!(a.state, AllowanceState::Suppressed);
}

#[test]
fn rules_that_cannot_work_are_refused_with_the_key_and_what_to_do() {
    let refused = |r: PlatformRule| {
        PolicyConfig {
            platform_rules: vec![r],
            ..PolicyConfig::default()
        }
        .validate()
        .unwrap_err()
    };
    let (k, m) = refused(rule(PlatformRuleKind::InboundWindow, 5, None));
    assert_eq!(k, "policy.platform_rules[0].window");
    assert!(m.contains("48h"), "{m}");
    let (k, m) = refused(rule(PlatformRuleKind::CalendarMonth, 4, Some(48)));
    assert_eq!(k, "policy.platform_rules[0].window");
    assert!(m.contains("remove it"), "{m}");
    let (k, _) = refused(rule(PlatformRuleKind::CalendarDay, 0, None));
    assert_eq!(k, "policy.platform_rules[0].limit");
    let (k, _) = refused(PlatformRule {
        name: " ".into(),
        ..rule(PlatformRuleKind::CalendarDay, 1, None)
    });
    assert_eq!(k, "policy.platform_rules[0].name");
}

proptest! {
    /// A sender that sends only when the allowance says OPEN never breaks a
    /// platform rule, whatever the rules, the replies and the attempts.
    #[test]
    fn an_obeying_sender_never_breaks_a_platform_rule(
        steps in proptest::collection::vec((0i64..(30 * H), any::<bool>()), 1..80),
        month in 1u32..6,
        day in 1u32..3,
        inbound in proptest::option::of((1u64..72, 1u32..6)),
    ) {
        use PlatformRuleKind::*;
        let mut rules = vec![rule(CalendarMonth, month, None), rule(CalendarDay, day, None)];
        if let Some((h, limit)) = inbound {
            rules.push(rule(InboundWindow, limit, Some(h)));
        }
        let p = policy(rules);
        let mut s = Sim::new(p.clone());
        let mut t = sh(1, 0);
        let mut sent = Vec::new();
        let mut replies = Vec::new();
        for (gap, is_reply) in steps {
            t += gap;
            if is_reply {
                reply(&mut s, t);
                replies.push(t);
                continue;
            }
            let a = allowance_at(&s.state, Channel::Wechat, &s.policy, &s.sp, t);
            if a.state == AllowanceState::Open && a.allowed_from.is_some_and(|x| x <= t) {
                let fx = s.send_campaign(Channel::Wechat, "", t);
                prop_assert!(fx.violations.is_empty(), "{:?}", fx.violations);
                sent.push(t);
            }
        }
        let date = |x: i64| p.tz.timestamp_millis_opt(x).unwrap().date_naive();
        for (i, &x) in sent.iter().enumerate() {
            let before = &sent[..=i];
            let d = date(x);
            let in_month = before.iter().filter(|y| { let e = date(**y); (e.year(), e.month()) == (d.year(), d.month()) }).count();
            prop_assert!(in_month as u32 <= month, "{in_month} sends in the month of {x}");
            let in_day = before.iter().filter(|y| date(**y) == d).count();
            prop_assert!(in_day as u32 <= day, "{in_day} sends on the day of {x}");
            if let Some((h, limit)) = inbound {
                let last = replies.iter().filter(|r| **r <= x).max();
                prop_assert!(last.is_some_and(|r| x < r + h as i64 * H), "send at {x} outside the inbound window");
                let r = *last.unwrap();
                let since = before.iter().filter(|y| **y > r).count();
                prop_assert!(since as u32 <= limit, "{since} sends since the reply at {r}");
            }
        }
    }
}
