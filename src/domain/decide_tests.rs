//! Table-driven and property tests of caps, throttling, suppression, quiet hours
//! and boosts, through the same pure functions the pipeline calls.

use chrono::TimeZone;
use proptest::prelude::*;

use super::allowance::{AllowanceState, Violation};
use super::decide::{allowance_at, release_due, Effects};
use super::event::*;
use super::output::Output;
use super::policy::{Boost, Policy, PolicyConfig, TenantOverride};
use super::state::{CustomerState, Source, StateParams};
use super::step;

const H: i64 = 3_600_000;
const DAY: i64 = 24 * H;

fn sh(y: i32, m: u32, d: u32, h: u32, min: u32) -> i64 {
    chrono_tz::Asia::Shanghai
        .with_ymd_and_hms(y, m, d, h, min, 0)
        .unwrap()
        .timestamp_millis()
}

/// The `n`-th record of a test customer: event id `e{n}`, offset `n` of partition 0.
pub(super) fn record(who: &CustomerRef, n: i64, body: EventBody, t: i64) -> (Event, Source) {
    let ev = Event {
        event_id: format!("e{n}"),
        customer: who.clone(),
        occurred_at: t,
        body,
    };
    let src = Source {
        kind: ev.kind(),
        partition: 0,
        offset: n,
    };
    (ev, src)
}

/// A customer driven through `step::on_record`, as the pipeline drives one
/// (shared with `cross_channel_tests` and `platform_tests`).
pub(super) struct Sim {
    pub who: CustomerRef,
    pub state: CustomerState,
    pub policy: Policy,
    pub sp: StateParams,
    n: i64,
}

impl Sim {
    pub fn new(policy: Policy) -> Sim {
        Sim {
            who: CustomerRef::new("brandA", "c1"),
            state: CustomerState::default(),
            policy,
            sp: StateParams::default(),
            n: 0,
        }
    }

    fn default() -> Sim {
        Sim::new(PolicyConfig::default().resolve(None).unwrap())
    }

    pub fn apply(&mut self, body: EventBody, t: i64) -> Effects {
        self.n += 1;
        let (ev, src) = record(&self.who, self.n, body, t);
        let (out, _, fx) = step::on_record(&mut self.state, &ev, src, &self.policy, &self.sp);
        assert_eq!(out, super::state::Outcome::Applied);
        fx.expect("applied")
    }

    fn send(&mut self, c: Channel, t: i64) -> Effects {
        self.send_campaign(c, "camp", t)
    }

    /// A marketing send of `campaign` (none when empty).
    pub fn send_campaign(&mut self, c: Channel, campaign: &str, t: i64) -> Effects {
        self.apply(
            EventBody::Send {
                channel: c,
                message_id: format!("m{}", self.n),
                campaign_id: (!campaign.is_empty()).then(|| campaign.to_string()),
                purpose: Purpose::Marketing,
                cost: None,
            },
            t,
        )
    }

    fn service(&mut self, c: Channel, t: i64) -> Effects {
        self.apply(
            EventBody::Send {
                channel: c,
                message_id: format!("m{}", self.n),
                campaign_id: None,
                purpose: Purpose::Service,
                cost: None,
            },
            t,
        )
    }

    fn click(&mut self, c: Channel, t: i64) -> Effects {
        self.apply(
            EventBody::Click {
                channel: c,
                message_id: "m".into(),
                campaign_id: None,
            },
            t,
        )
    }

    fn open(&mut self, c: Channel, t: i64) -> Effects {
        self.apply(
            EventBody::Open {
                channel: c,
                message_id: "m".into(),
                campaign_id: None,
            },
            t,
        )
    }

    fn reply(&mut self, c: Channel, class: ReplyClass, t: i64) -> Effects {
        self.apply(
            EventBody::Reply {
                channel: c,
                message_id: None,
                class,
            },
            t,
        )
    }

    pub fn throttles(&self) -> Vec<super::allowance::ThrottleDecision> {
        self.state
            .outbox
            .iter()
            .filter_map(|o| match o {
                Output::Throttle(d) => Some((**d).clone()),
                _ => None,
            })
            .collect()
    }

    fn state_of(&self, c: Channel, t: i64) -> AllowanceState {
        allowance_at(&self.state, c, &self.policy, &self.sp, t).state
    }
}

#[test]
fn two_wechat_sends_in_a_day_cap_until_first_plus_24h_and_a_third_is_a_violation() {
    let mut s = Sim::default();
    let t1 = sh(2026, 3, 2, 10, 0);
    assert!(s.send(Channel::Wechat, t1).transitions.is_empty());
    let fx = s.send(Channel::Wechat, t1 + 3 * H);
    assert_eq!(fx.cap_hits, vec![Channel::Wechat]);
    let ds = s.throttles();
    assert_eq!(ds.len(), 1, "{ds:?}");
    assert_eq!(ds[0].state, AllowanceState::Capped);
    assert_eq!(ds[0].allowed_from, Some(t1 + DAY));
    assert_eq!(ds[0].key(), "brandA/c1/WECHAT");
    assert_eq!(ds[0].cap, Some(2));
    assert_eq!(ds[0].sends_in_window, 2);
    let fx = s.send(Channel::Wechat, t1 + 5 * H);
    assert_eq!(
        fx.violations,
        vec![(Channel::Wechat, super::allowance::Violation::Cap)]
    );
    // Still CAPPED, and the window now frees later: one more event with the later allowed_from.
    let ds = s.throttles();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds[1].allowed_from, Some(t1 + 3 * H + DAY));
    // Other channels are untouched.
    assert_eq!(s.state_of(Channel::Sms, t1 + 5 * H), AllowanceState::Open);
    // After the window: released as OPEN on the next event.
    s.click(Channel::Wechat, t1 + 5 * H + DAY);
    let last = s.throttles().pop().unwrap();
    assert_eq!(last.state, AllowanceState::Open);
    assert_eq!(last.reason, "cap_window_passed");
}

#[test]
fn decision_ids_are_deterministic_and_distinct() {
    let run = || {
        let mut s = Sim::default();
        let t1 = sh(2026, 3, 2, 10, 0);
        s.send(Channel::Wechat, t1);
        s.send(Channel::Wechat, t1 + H);
        s.click(Channel::Wechat, t1 + 2 * DAY);
        s.throttles()
            .into_iter()
            .map(|d| d.decision_id)
            .collect::<Vec<_>>()
    };
    let a = run();
    assert_eq!(a, run());
    assert_eq!(a.len(), 2);
    assert_ne!(a[0], a[1]);
}

#[test]
fn a_customer_who_stops_clicking_is_throttled_and_released_when_clicks_resume() {
    let mut s = Sim::default();
    let start = sh(2026, 1, 5, 11, 0);
    // Three months of one send and one click every 3 days: a baseline of ~100%.
    let mut t = start;
    for _ in 0..30 {
        s.send(Channel::Wechat, t);
        s.click(Channel::Wechat, t + H);
        t += 3 * DAY;
    }
    assert_eq!(s.state_of(Channel::Wechat, t), AllowanceState::Open);
    // Then sends without clicks, one every 3 days: the short rate collapses.
    let mut throttled_at = None;
    for _ in 0..12 {
        s.send(Channel::Wechat, t);
        if s.state_of(Channel::Wechat, t + 1) == AllowanceState::Throttled {
            throttled_at = Some(t);
            break;
        }
        t += 3 * DAY;
    }
    let at = throttled_at.expect("throttled after clicks stopped");
    let d = s
        .throttles()
        .into_iter()
        .find(|d| d.state == AllowanceState::Throttled)
        .unwrap();
    assert_eq!(d.reason, "click_rate_below_baseline");
    assert!(d.short_click_rate.unwrap() < 0.5 * d.baseline_click_rate.unwrap());
    assert_eq!(
        d.allowed_from,
        Some(at + 7 * DAY),
        "paused for the cool-down"
    );
    // Clicks resume (on earlier messages): the rate recovers above the release threshold.
    let mut t = at + H;
    for _ in 0..20 {
        s.click(Channel::Wechat, t);
        t += H;
        if s.state_of(Channel::Wechat, t) == AllowanceState::Open {
            break;
        }
    }
    let last = s.throttles().pop().unwrap();
    assert_eq!(last.state, AllowanceState::Open, "{last:?}");
    assert_eq!(last.reason, "click_rate_recovered");
}

#[test]
fn a_customer_hovering_at_the_threshold_does_not_flap() {
    let mut s = Sim::default();
    let mut t = sh(2026, 1, 5, 11, 0);
    for _ in 0..30 {
        s.send(Channel::Wechat, t);
        s.click(Channel::Wechat, t + H);
        t += 3 * DAY;
    }
    // Then alternate: a click on every other send, around half the baseline, for a year.
    for i in 0..120 {
        s.send(Channel::Wechat, t);
        if i % 2 == 0 {
            s.click(Channel::Wechat, t + H);
        }
        t += 3 * DAY;
    }
    let transitions = s
        .throttles()
        .iter()
        .filter(|d| matches!(d.state, AllowanceState::Throttled | AllowanceState::Open))
        .count();
    // At most one throttle/release pair per cool-down (7 d) over 360 days, and in practice far fewer.
    assert!(transitions <= 2 * (360 / 7), "{transitions} transitions");
    // Hysteresis + cool-down: consecutive throttles are at least a cool-down apart,
    // so the channel is never toggled event by event.
    let throttled: Vec<i64> = s
        .throttles()
        .iter()
        .filter(|d| d.state == AllowanceState::Throttled)
        .map(|d| d.decided_at)
        .collect();
    assert!(
        !throttled.is_empty(),
        "a customer at half the baseline is throttled"
    );
    for w in throttled.windows(2) {
        assert!(
            w[1] - w[0] >= 7 * DAY,
            "re-throttled {} h after the previous throttle",
            (w[1] - w[0]) / H
        );
    }
}

#[test]
fn unsubscribe_suppresses_that_channel_only_until_resubscribe() {
    let mut s = Sim::default();
    let t = sh(2026, 3, 2, 10, 0);
    s.send(Channel::Sms, t);
    s.reply(Channel::Sms, ReplyClass::Unsubscribe, t + H);
    let d = s.throttles().pop().unwrap();
    assert_eq!(d.state, AllowanceState::Suppressed);
    assert_eq!(d.allowed_from, None);
    assert_eq!(d.key(), "brandA/c1/SMS");
    assert_eq!(
        s.state_of(Channel::Sms, t + 300 * DAY),
        AllowanceState::Suppressed
    );
    assert_eq!(s.state_of(Channel::Wechat, t + 2 * H), AllowanceState::Open);
    s.reply(Channel::Sms, ReplyClass::Resubscribe, t + 10 * DAY);
    let d = s.throttles().pop().unwrap();
    assert_eq!(d.state, AllowanceState::Open);
    assert_eq!(d.reason, "resubscribed");
}

#[test]
fn quiet_hours_move_allowed_from_to_the_end_of_the_night() {
    let mut s = Sim::default();
    // SMS: 2 per 7 days; quiet 21:00-09:00. First send at 22:30 (a sender ignoring quiet hours).
    let t1 = sh(2026, 3, 2, 22, 30);
    let fx = s.send(Channel::Sms, t1);
    assert_eq!(
        fx.violations,
        vec![(Channel::Sms, super::allowance::Violation::QuietHours)]
    );
    s.send(Channel::Sms, sh(2026, 3, 3, 12, 0));
    let d = s.throttles().pop().unwrap();
    assert_eq!(d.state, AllowanceState::Capped);
    // first + 7 d = 9 Mar 22:30, inside quiet hours: moved to 10 Mar 09:00.
    assert_eq!(d.allowed_from, Some(sh(2026, 3, 10, 9, 0)));
}

#[test]
fn boost_windows_raise_the_cap_and_change_allowed_from() {
    let mut cfg = PolicyConfig::default();
    cfg.tenants.insert(
        "brandA".into(),
        TenantOverride {
            boosts: vec![Boost {
                channel: Channel::Wechat,
                from: "2026-03-08T00:00".into(),
                until: "2026-03-09T00:00".into(),
                limit: 4,
                name: "member day".into(),
            }],
            ..Default::default()
        },
    );
    let mut s = Sim::new(cfg.resolve(Some("brandA")).unwrap());
    // Inside the boost: four sends allowed, the fourth caps.
    let t = sh(2026, 3, 8, 10, 0);
    for i in 0..3 {
        s.send(Channel::Wechat, t + i * H);
        assert!(s.throttles().is_empty(), "send {i} within the boosted cap");
    }
    s.send(Channel::Wechat, t + 3 * H);
    let d = s.throttles().pop().unwrap();
    assert_eq!((d.state, d.cap), (AllowanceState::Capped, Some(4)));
    // The boost ends at midnight: with the normal cap of 2 the window holds 4, so the
    // channel frees only when three sends have left it: the third send + 24 h.
    assert_eq!(d.allowed_from, Some(t + 2 * H + DAY));
    // Without the boost, two sends the day before cap, and the boost start frees it early.
    let mut s = Sim::new(cfg.resolve(Some("brandA")).unwrap());
    let t = sh(2026, 3, 7, 12, 0);
    s.send(Channel::Wechat, t);
    s.send(Channel::Wechat, t + H);
    let d = s.throttles().pop().unwrap();
    assert_eq!(
        d.allowed_from,
        Some(sh(2026, 3, 8, 8, 0)),
        "boost starts at 00:00, quiet until 08:00"
    );
}

#[test]
fn release_due_opens_expired_caps_without_an_event_on_that_channel() {
    let mut s = Sim::default();
    let t1 = sh(2026, 3, 2, 10, 0);
    s.send(Channel::Wechat, t1);
    s.send(Channel::Wechat, t1 + H);
    let who = s.who.clone();
    let mut fx = Effects::default();
    release_due(
        &mut s.state,
        &who,
        &s.policy,
        &s.sp,
        t1 + DAY + H,
        None,
        &mut fx,
        None,
    );
    assert_eq!(fx.transitions.len(), 1);
    assert_eq!(s.throttles().pop().unwrap().state, AllowanceState::Open);
}

proptest! {
    /// For any sequence of send attempts, a sender that only sends when the
    /// allowance says OPEN at that instant never exceeds any cap in any rolling window.
    #[test]
    fn an_obeying_sender_never_exceeds_a_cap(
        gaps in proptest::collection::vec(0i64..(36 * H), 1..80),
        channel in 0usize..5,
        boosted in any::<bool>(),
    ) {
        let c = Channel::ALL[channel];
        let mut cfg = PolicyConfig::default();
        if boosted {
            cfg.boosts.push(Boost { channel: c, from: "2026-03-03T00:00".into(), until: "2026-03-05T00:00".into(), limit: 5, name: String::new() });
        }
        let policy = cfg.resolve(None).unwrap();
        let mut s = Sim::new(policy.clone());
        let mut t = sh(2026, 3, 1, 0, 0);
        let mut sent = Vec::new();
        for g in gaps {
            t += g;
            let a = allowance_at(&s.state, c, &s.policy, &s.sp, t);
            if a.state == AllowanceState::Open && a.allowed_from.is_some_and(|x| x <= t) {
                let fx = s.send(c, t);
                prop_assert!(fx.violations.is_empty(), "an allowed send was a violation: {:?}", fx.violations);
                sent.push(t);
            }
        }
        let window = policy.caps[c.index()].window.as_ms();
        for (i, &end) in sent.iter().enumerate() {
            let in_window = sent[..=i].iter().filter(|x| **x > end - window).count() as u32;
            prop_assert!(in_window <= policy.cap_at(c, end).limit.max(policy.caps[c.index()].limit),
                "{in_window} sends in the window ending {end}");
            // Against the cap in force at each send, counted at that send.
            prop_assert!(in_window <= policy.cap_at(c, end).limit);
            prop_assert!(policy.quiet_until(c, end).is_none(), "sent in quiet hours");
        }
    }

    /// SERVICE sends never change any allowance.
    #[test]
    fn service_sends_never_change_an_allowance(
        ops in proptest::collection::vec((0i64..(20 * H), any::<bool>()), 1..60),
        channel in 0usize..5,
    ) {
        let c = Channel::ALL[channel];
        let mut with = Sim::default();
        let mut without = Sim::default();
        let mut t = sh(2026, 3, 1, 0, 0);
        for (g, service) in ops {
            t += g;
            if service {
                with.service(c, t);
            } else {
                with.send(c, t);
                without.send(c, t);
            }
            for probe in [t, t + H, t + DAY] {
                prop_assert_eq!(
                    allowance_at(&with.state, c, &with.policy, &with.sp, probe),
                    allowance_at(&without.state, c, &without.policy, &without.sp, probe)
                );
            }
        }
        let states = |s: &Sim| s.throttles().into_iter().map(|d| (d.state, d.allowed_from)).collect::<Vec<_>>();
        prop_assert_eq!(states(&with), states(&without));
    }
}

/// A late event (applied after the decision, stamped before it) must not
/// re-publish a stale allowance: an engagement event from another topic that
/// arrives after the cap-filling send but happened before it used to publish
/// `OPEN cap_window_passed` while the window was still full (senders reading
/// the compacted topic then sent past the cap), and a late event after a
/// timer release used to publish the expired cap again.
#[test]
fn a_late_event_never_publishes_an_allowance_older_than_the_last_decision() {
    let mut s = Sim::default();
    let t = sh(2026, 3, 2, 10, 0);
    s.send(Channel::Wechat, t);
    s.send(Channel::Wechat, t + 2 * H);
    let capped = s.throttles();
    assert_eq!(capped.len(), 1);
    assert_eq!(capped[0].state, AllowanceState::Capped);
    // A click from ten minutes after the first send, applied now.
    s.click(Channel::Wechat, t + H / 6);
    assert_eq!(s.throttles(), capped, "no decision from a late click");
    assert_eq!(
        s.state_of(Channel::Wechat, t + 3 * H),
        AllowanceState::Capped
    );

    // The cap runs out; the release is published at its time.
    let released_at = capped[0].allowed_from.unwrap();
    let mut fx = Effects::default();
    let who = s.who.clone();
    release_due(
        &mut s.state,
        &who,
        &s.policy,
        &s.sp,
        released_at,
        None,
        &mut fx,
        None,
    );
    let after_release = s.throttles();
    assert_eq!(after_release.len(), 2);
    assert_eq!(after_release[1].state, AllowanceState::Open);
    // A late open from within the old window does not bring the cap back.
    s.apply(
        EventBody::Open {
            channel: Channel::Wechat,
            message_id: "m".into(),
            campaign_id: None,
        },
        t + 3 * H,
    );
    assert_eq!(s.throttles(), after_release, "no decision from a late open");
    // A late marketing send from within the old window is a real third send:
    // made while capped (a violation), and with the send at t+2h it fills the
    // rolling window again, judged at the release's time, not before it.
    let fx = s.send(Channel::Wechat, t + 4 * H);
    assert!(!fx.violations.is_empty());
    let ds = s.throttles();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds[2].state, AllowanceState::Capped);
    assert_eq!(ds[2].decided_at, released_at);
    assert_eq!(ds[2].allowed_from, Some(t + 2 * H + DAY));
}

/// An e-mail customer after `months` of e-mails on the 1st and 15th at 10:00,
/// opening every `opens_every`-th one, as a sender obeying the allowance sends
/// them. The click-rate throttle is off: it would pause a customer who never
/// clicks before the adaptive cap has the sends to judge them by.
fn email_history(months: u32, opens_every: Option<u32>) -> Sim {
    let mut cfg = PolicyConfig::default();
    cfg.throttle.throttle_below = 0.0;
    cfg.throttle.floor = 0.0;
    let mut s = Sim::new(cfg.resolve(None).unwrap());
    let mut n = 0;
    for m in 0..months {
        for day in [1, 15] {
            let t = sh(2026, 1 + m, day, 10, 0);
            let a = allowance_at(&s.state, Channel::Email, &s.policy, &s.sp, t);
            if a.state != AllowanceState::Open || a.allowed_from.is_none_or(|x| x > t) {
                continue;
            }
            s.send(Channel::Email, t);
            n += 1;
            if opens_every.is_some_and(|k| n % k == 0) {
                s.open(Channel::Email, t + H);
            }
        }
    }
    s
}

#[test]
fn e_mail_caps_follow_the_customers_open_rate() {
    let at = sh(2026, 7, 20, 10, 0);
    // (opens: every k-th e-mail, or none) -> the e-mail cap in force afterwards.
    for (opens_every, cap) in [(Some(1), 3), (Some(3), 2), (None, 1)] {
        let s = email_history(6, opens_every);
        let a = allowance_at(&s.state, Channel::Email, &s.policy, &s.sp, at);
        assert_eq!(a.cap.limit, cap, "opening every {opens_every:?}");
    }
    // A new customer has no verdict yet: the channel's cap.
    let s = email_history(1, Some(1));
    let a = allowance_at(
        &s.state,
        Channel::Email,
        &s.policy,
        &s.sp,
        sh(2026, 1, 20, 10, 0),
    );
    assert_eq!(a.cap.limit, 2);
    // Off for e-mail, or on another channel by default: never moved.
    let mut cfg = PolicyConfig::default();
    cfg.throttle.throttle_below = 0.0;
    cfg.throttle.floor = 0.0;
    cfg.adaptive_caps.insert(
        Channel::Email,
        crate::domain::adaptive_cap::AdaptiveCap {
            enabled: false,
            ..Default::default()
        },
    );
    let mut s = email_history(6, Some(1));
    s.policy = cfg.resolve(None).unwrap();
    let a = allowance_at(&s.state, Channel::Email, &s.policy, &s.sp, at);
    assert_eq!(a.cap.limit, 2);
    assert!(s.policy.adaptive_caps[Channel::Sms.index()].is_none());
}

#[test]
fn an_engaged_customers_raised_cap_is_published_and_a_third_e_mail_is_no_violation() {
    let mut s = email_history(6, Some(1));
    // The last e-mail of the history (June 15) is out of the 30-day window.
    let t = sh(2026, 7, 20, 10, 0);
    for k in 0..3 {
        let fx = s.send(Channel::Email, t + k * H);
        assert!(fx.violations.is_empty(), "send {k}: {:?}", fx.violations);
        s.open(Channel::Email, t + k * H + 60_000);
    }
    let capped = s.throttles().pop().unwrap();
    assert_eq!(
        (capped.state, capped.cap, capped.sends_in_window),
        (AllowanceState::Capped, Some(3), 3)
    );
    let fx = s.send(Channel::Email, t + 4 * H);
    assert_eq!(fx.violations, [(Channel::Email, Violation::Cap)]);
}

proptest! {
    /// With any opens, a sender that only sends when e-mail is OPEN never has
    /// more e-mails in a window than the cap in force when each was sent, and
    /// never more than the channel's cap plus the raise.
    #[test]
    fn an_obeying_sender_never_exceeds_an_adaptive_cap(
        steps in proptest::collection::vec((0i64..(20 * DAY), any::<bool>()), 1..60),
    ) {
        let mut s = Sim::default();
        let raise = s.policy.adaptive_caps[Channel::Email.index()].map_or(0, |a| a.raise_by);
        let base = s.policy.caps[Channel::Email.index()];
        let mut t = sh(2026, 1, 1, 12, 0);
        let mut sent: Vec<(i64, u32)> = Vec::new();
        for (gap, opened) in steps {
            t += gap;
            let a = allowance_at(&s.state, Channel::Email, &s.policy, &s.sp, t);
            if a.state == AllowanceState::Open && a.allowed_from.is_some_and(|x| x <= t) {
                let fx = s.send(Channel::Email, t);
                prop_assert!(fx.violations.is_empty(), "an allowed send was a violation");
                sent.push((t, a.cap.limit));
                if opened {
                    s.open(Channel::Email, t + 60_000);
                }
            }
        }
        let window = base.window.as_ms();
        for (i, &(end, cap)) in sent.iter().enumerate() {
            let in_window = sent[..=i].iter().filter(|(x, _)| *x > end - window).count() as u32;
            prop_assert!(in_window <= cap, "{in_window} e-mails in the window ending {end}, cap {cap}");
            prop_assert!(in_window <= base.limit + raise);
        }
    }
}

/// Through the step the pipeline runs: a recalling visit's offer is costed
/// (an unknown code is counted in the effects, at 0), the repurchase window
/// follows the customer's expected interval as of the recalling visit, and a
/// repurchase visit's own offer costs nothing and is not counted.
#[test]
fn offers_and_repurchase_through_the_step() {
    use super::recall::{OutcomeKind, RecallOutcome};
    let mut sim = Sim::default();
    sim.policy.lapse.holdout_share = 0.0;
    let visit = |offer_code: Option<&str>, discount: Option<i64>| EventBody::Visit {
        visit_type: VisitType::Treatment,
        treatment: Some("BOTOX".into()),
        amount: 300_000,
        currency: "CNY".into(),
        offer_code: offer_code.map(str::to_string),
        discount,
    };
    let t0 = sh(2026, 1, 5, 11, 0);
    let fx = sim.apply(visit(Some("coupon-10pct"), Some(9)), t0);
    assert_eq!(fx.unknown_offer_codes, 0, "no recall, nothing counted");
    assert!(sim.state.outbox.is_empty());
    let fired = step::on_timer(
        &mut sim.state,
        &sim.who.clone(),
        &sim.policy,
        &sim.sp,
        t0 + 144 * DAY,
    );
    assert_eq!(fired.fired.len(), 1);
    sim.state.outbox.clear();
    let outcomes = |s: &mut Sim| -> Vec<RecallOutcome> {
        s.state
            .outbox
            .drain(..)
            .filter_map(|o| match o {
                Output::Outcome(o) => Some(o),
                _ => None,
            })
            .collect()
    };
    let fx = sim.apply(visit(Some("spring-sale"), None), t0 + 150 * DAY);
    assert_eq!(fx.unknown_offer_codes, 1);
    let out = outcomes(&mut sim);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].kind, out[0].incentive_cost),
        (OutcomeKind::Recalled, 0)
    );
    // One gap (150 d) is too few to learn from: BOTOX's 120 d × 1.5.
    let watch = sim.state.recall.repurchase.clone().expect("watched");
    assert_eq!(
        (watch.recalled_at, watch.window_ms),
        (t0 + 150 * DAY, 180 * DAY)
    );
    let fx = sim.apply(visit(Some("spring-sale"), Some(5_000)), t0 + 200 * DAY);
    assert_eq!(fx.unknown_offer_codes, 0);
    let out = outcomes(&mut sim);
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].kind, out[0].incentive_cost),
        (OutcomeKind::Repurchased, 0)
    );
    assert_eq!(out[0].days_to_return, Some(50.0));
    assert!(sim.state.recall.repurchase.is_none());
    // The lapse episode goes on from the repurchase visit.
    assert_eq!(
        super::recall::next_due(&sim.state.recall, &sim.state.visits, &sim.policy.lapse)
            .unwrap()
            .episode_start,
        t0 + 200 * DAY
    );
}
