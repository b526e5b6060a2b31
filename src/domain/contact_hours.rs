//! Best contact hours: "根据用户的活跃时间段进行推送" (the frequency article:
//! push at the customer's active times).
//!
//! Each customer keeps a decayed histogram of their engagement (opens, clicks,
//! replies, on any channel) by local hour of the day ([`ActiveHours`]). A
//! customer's *good hours* are the hours where they are more active than on an
//! average hour (`good_at` × the mean), read off the histogram smoothed over
//! neighbouring hours and blended with the tenant's population histogram
//! (`prior_weight` engagements' worth of it), so a few engagements only nudge
//! the population's shape. Below `min_engagements` (decayed) the population
//! histogram alone decides. [`next_good_time`] is the first moment a channel is
//! both allowed and inside a good hour (and outside its quiet hours).
//!
//! Hours of the day, not of the week: a customer's few dozen engagements a
//! quarter cannot fill 168 buckets, and the state would grow by up to 672
//! bytes, more than the whole rest of a typical customer. 24 buckets cost at
//! most 24 × 4 bytes, and only the hours the customer ever engaged in are
//! stored (README "State").
//!
//! The fold is order-independent like the engagement counts (`engagement.rs`):
//! the histogram is kept as of its latest event time; a later event decays it
//! forward, an earlier one is added already decayed.

use chrono::{TimeZone, Timelike};
use serde::{Deserialize, Serialize};

use super::allowance::Allowance;
use super::engagement::decay;
use super::event::{Channel, Event, EventBody};
use super::policy::Policy;
use super::span::Span;
use super::state::CustomerState;

const HOUR_MS: i64 = 3_600_000;

/// `[policy.contact_hours]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContactHoursPolicy {
    /// Learn and serve good hours (the histogram, `good_hours`,
    /// `next_good_time`, the recall trigger's `send_after`).
    pub enabled: bool,
    /// Half-life of an engagement's weight in the histogram.
    pub half_life: Span,
    /// Decayed engagements before the customer's own histogram is used at all
    /// (below: the population's good hours).
    pub min_engagements: f64,
    /// Weight of the population histogram blended into the customer's, in engagements.
    pub prior_weight: f64,
    /// An hour is good at or above this × the mean hourly weight.
    pub good_at: f64,
    /// The tenant's engagement by local hour 0–23 (relative weights). Default:
    /// every waking hour 08:00–22:00 alike, an assumption to replace with the
    /// tenant's own (`lapse backtest` prints it from history).
    pub population: Vec<f64>,
}

impl Default for ContactHoursPolicy {
    fn default() -> Self {
        ContactHoursPolicy {
            enabled: true,
            half_life: Span::days(30),
            min_engagements: 3.0,
            prior_weight: 3.0,
            good_at: 1.0,
            population: (0..24)
                .map(|h| if (8..22).contains(&h) { 1.0 } else { 0.0 })
                .collect(),
        }
    }
}

impl ContactHoursPolicy {
    /// Checks the values; the error names the key and what to write instead.
    pub fn validate(&self, key: &str) -> Result<(), (String, String)> {
        let bad = |k: &str, m: &str| Err((format!("{key}.{k}"), m.to_string()));
        if self.half_life.is_zero() {
            return bad("half_life", "must be positive, e.g. \"30d\"");
        }
        let non_negative = |v: f64| v >= 0.0 && v.is_finite();
        if !non_negative(self.min_engagements) || !non_negative(self.prior_weight) {
            return bad(
                "min_engagements",
                "min_engagements and prior_weight must be >= 0",
            );
        }
        if !(self.good_at > 0.0 && self.good_at.is_finite()) {
            return bad("good_at", "must be > 0 (1.0: hours above the average hour)");
        }
        if self.population.len() != 24 {
            return bad(
                "population",
                "needs 24 weights, one per local hour from 00 to 23",
            );
        }
        if !self.population.iter().all(|w| non_negative(*w)) || self.population_total() <= 0.0 {
            return bad(
                "population",
                "weights must be >= 0 with at least one above 0",
            );
        }
        Ok(())
    }

    fn population_total(&self) -> f64 {
        self.population.iter().sum()
    }
}

/// A customer's decayed engagement by local hour of the day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ActiveHours {
    /// Reference time of the weights (the latest engagement folded in), ms.
    pub at: i64,
    /// Decayed engagements per local hour 0–23.
    pub weights: [f32; 24],
}

impl ActiveHours {
    /// Folds one engagement at `t` in local hour `hour`. Weights are kept at
    /// bfloat16 precision (8 significant bits, 0.4%: plenty to rank hours), so
    /// the compact format stores 2 bytes per hour, losslessly.
    pub fn record(&mut self, hour: usize, t: i64, half_life_ms: i64) {
        if self.weights == [0.0; 24] {
            self.at = self.at.max(t);
        }
        if t >= self.at {
            let f = decay(t - self.at, half_life_ms);
            for w in &mut self.weights {
                *w = bf16(*w as f64 * f);
            }
            self.at = t;
            self.weights[hour] = bf16(self.weights[hour] as f64 + 1.0);
        } else {
            let w = decay(self.at - t, half_life_ms);
            self.weights[hour] = bf16(self.weights[hour] as f64 + w);
        }
    }

    /// The weights as of `now` (decayed further, never mutated).
    pub fn weights_at(&self, now: i64, half_life_ms: i64) -> [f64; 24] {
        let f = decay(now - self.at, half_life_ms);
        self.weights.map(|w| w as f64 * f)
    }
}

/// `x` rounded to the nearest bfloat16 (an `f32` whose low 16 bits are 0).
pub fn bf16(x: f64) -> f32 {
    let b = (x as f32).to_bits();
    if (x as f32).is_nan() {
        return f32::from_bits(b & 0xffff_0000 | 0x0040_0000);
    }
    // Round half to even on the 16 bits dropped; saturates into infinity like f32.
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(rounded)
}

/// The local hour of `t` in the policy's time zone.
pub fn local_hour(p: &Policy, t: i64) -> Option<usize> {
    Some(p.tz.timestamp_millis_opt(t).single()?.hour() as usize)
}

/// The local hour of an engagement event: opens, clicks and replies (a send
/// says when the sender acts, not the customer); `None` for other events.
pub fn engagement_hour(ev: &Event, p: &Policy) -> Option<usize> {
    match ev.body {
        EventBody::Open { .. } | EventBody::Click { .. } | EventBody::Reply { .. } => {
            local_hour(p, ev.occurred_at)
        }
        EventBody::Send { .. } | EventBody::Visit { .. } | EventBody::Feedback { .. } => None,
    }
}

/// Folds an applied event into the customer's active hours.
pub fn observe(state: &mut CustomerState, ev: &Event, p: &Policy) {
    let ch = &p.contact_hours;
    if !ch.enabled {
        return;
    }
    let Some(hour) = engagement_hour(ev, p) else {
        return;
    };
    state
        .active_hours
        .get_or_insert_with(ActiveHours::default)
        .record(hour, ev.occurred_at, ch.half_life.as_ms());
}

/// Whose histogram the good hours come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoursSource {
    /// Too little engagement of their own: the tenant's population histogram.
    Population,
    /// The customer's own, blended with the population's.
    Customer,
}

impl HoursSource {
    pub fn as_str(self) -> &'static str {
        match self {
            HoursSource::Population => "population",
            HoursSource::Customer => "customer",
        }
    }
}

/// A customer's good local hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoodHours {
    /// Bit `h` set: local hour `h` is good.
    pub mask: u32,
    pub source: HoursSource,
}

impl GoodHours {
    pub fn contains(&self, hour: usize) -> bool {
        self.mask & (1 << hour) != 0
    }

    /// The good hours, ascending.
    pub fn hours(&self) -> Vec<u8> {
        (0..24u8).filter(|h| self.contains(*h as usize)).collect()
    }
}

/// The customer's good hours as of `now`.
pub fn good_hours(active: Option<&ActiveHours>, p: &ContactHoursPolicy, now: i64) -> GoodHours {
    let population: [f64; 24] = std::array::from_fn(|h| p.population[h]);
    let pop_total = p.population_total();
    let own = active.map(|a| smooth(&a.weights_at(now, p.half_life.as_ms())));
    let own_total: f64 = own.iter().flatten().sum();
    let (profile, source) = match own {
        Some(own) if own_total >= p.min_engagements && own_total > 0.0 => {
            let k = p.prior_weight / pop_total;
            let blended: [f64; 24] = std::array::from_fn(|h| own[h] + k * population[h]);
            (blended, HoursSource::Customer)
        }
        _ => (population, HoursSource::Population),
    };
    let mean = profile.iter().sum::<f64>() / 24.0;
    let mut mask = 0u32;
    for (h, w) in profile.iter().enumerate() {
        if *w > 0.0 && *w >= p.good_at * mean {
            mask |= 1 << h;
        }
    }
    if mask == 0 {
        // good_at above the peak: the busiest hour is still the best one.
        let best = (0..24).fold(0, |b, h| if profile[h] > profile[b] { h } else { b });
        mask = 1 << best;
    }
    GoodHours { mask, source }
}

/// Spreads each hour's weight over its neighbours (¼, ½, ¼, around midnight
/// too): a customer seen at 20:10 and 20:50 is likely active at 19:55 as well.
fn smooth(w: &[f64; 24]) -> [f64; 24] {
    std::array::from_fn(|h| 0.25 * w[(h + 23) % 24] + 0.5 * w[h] + 0.25 * w[(h + 1) % 24])
}

/// The first moment at or after `from` inside a good hour and outside the
/// quiet hours of `c` (within the next 8 days; `None` when no good hour is
/// ever outside them). The caller passes `from` = when the channel is allowed.
pub fn next_good_time(good: &GoodHours, c: Channel, p: &Policy, from: i64) -> Option<i64> {
    let mut t = from;
    for _ in 0..(8 * 24 + 2) {
        t = p.outside_quiet(c, t);
        let local = p.tz.timestamp_millis_opt(t).single()?;
        if good.contains(local.hour() as usize) {
            return Some(t);
        }
        // The start of the next local hour.
        let into_hour =
            local.minute() as i64 * 60_000 + local.second() as i64 * 1000 + t.rem_euclid(1000);
        t = t - into_hour + HOUR_MS;
    }
    None
}

/// The customer's good hours as of `now` (`None` with `policy.contact_hours` off).
pub fn customer_good_hours(state: &CustomerState, p: &Policy, now: i64) -> Option<GoodHours> {
    p.contact_hours
        .enabled
        .then(|| good_hours(state.active_hours.as_ref(), &p.contact_hours, now))
}

/// The first moment at or after `now` when the channel of allowance `a` is
/// both allowed and inside one of the `good` hours (`None`: not allowed, or
/// no good hour outside its quiet hours within 8 days). What the allowance
/// API's `next_good_time` and the recall trigger's `send_after` say.
pub fn next_good_time_of(good: &GoodHours, a: &Allowance, p: &Policy, now: i64) -> Option<i64> {
    let from = a.allowed_from?.max(now);
    next_good_time(good, a.channel, p, from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::CustomerRef;
    use crate::domain::policy::PolicyConfig;
    use chrono::NaiveDateTime;

    const DAY: i64 = 86_400_000;

    fn policy() -> Policy {
        PolicyConfig::default().resolve(None).unwrap()
    }

    /// Shanghai local time `2026-03-02T20:15` as ms.
    fn at(s: &str) -> i64 {
        let naive = NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M").unwrap();
        chrono_tz::Asia::Shanghai
            .from_local_datetime(&naive)
            .unwrap()
            .timestamp_millis()
    }

    fn open(t: i64) -> Event {
        Event {
            event_id: format!("o{t}"),
            customer: CustomerRef::new("t", "c"),
            occurred_at: t,
            body: EventBody::Open {
                channel: Channel::Wechat,
                message_id: "m".into(),
                campaign_id: None,
            },
        }
    }

    fn with_opens(times: &[i64]) -> CustomerState {
        let p = policy();
        let mut s = CustomerState::default();
        for t in times {
            observe(&mut s, &open(*t), &p);
        }
        s
    }

    #[test]
    fn the_fold_is_order_independent() {
        let h = 30 * DAY;
        let evs = [(20, 5 * DAY), (12, DAY), (20, 9 * DAY), (8, 3 * DAY)];
        let mut a = ActiveHours::default();
        for (hr, t) in evs {
            a.record(hr, t, h);
        }
        let mut b = ActiveHours::default();
        for (hr, t) in evs.iter().rev() {
            b.record(*hr, *t, h);
        }
        let (wa, wb) = (a.weights_at(10 * DAY, h), b.weights_at(10 * DAY, h));
        for hr in 0..24 {
            assert!((wa[hr] - wb[hr]).abs() < 1e-2, "hour {hr}");
        }
        assert!((wa[20] - (decay(5 * DAY, h) + decay(DAY, h))).abs() < 1e-2);
        assert!(a.weights.iter().all(|w| w.to_bits() & 0xffff == 0), "bf16");
    }

    #[test]
    fn sends_do_not_count_and_disabled_keeps_nothing() {
        let mut p = policy();
        let mut s = CustomerState::default();
        let mut send = open(at("2026-03-02T20:15"));
        send.body = EventBody::Send {
            channel: Channel::Sms,
            message_id: "m".into(),
            campaign_id: None,
            purpose: crate::domain::event::Purpose::Marketing,
            cost: None,
        };
        observe(&mut s, &send, &p);
        assert_eq!(s.active_hours, None);
        p.contact_hours.enabled = false;
        observe(&mut s, &open(at("2026-03-02T20:15")), &p);
        assert_eq!(s.active_hours, None);
    }

    /// Table: engagement history → good hours and where they come from.
    #[test]
    fn good_hours_follow_the_customer_once_there_is_enough_of_them() {
        let p = policy();
        let evening: Vec<i64> = (0..6).map(|d| at("2026-03-02T20:15") + d * DAY).collect();
        let lunch: Vec<i64> = (0..6).map(|d| at("2026-03-02T12:40") + d * DAY).collect();
        let mixed: Vec<i64> = evening.iter().chain(&lunch).copied().collect();
        let now = at("2026-03-09T09:00");
        let cases: [(&str, &[i64], HoursSource, Vec<u8>); 5] = [
            (
                "no history",
                &[],
                HoursSource::Population,
                (8..22).collect(),
            ),
            (
                "two opens: too few",
                &evening[..2],
                HoursSource::Population,
                (8..22).collect(),
            ),
            (
                "evenings",
                &evening,
                HoursSource::Customer,
                vec![19, 20, 21],
            ),
            ("lunches", &lunch, HoursSource::Customer, vec![11, 12, 13]),
            (
                "both",
                &mixed,
                HoursSource::Customer,
                vec![11, 12, 13, 19, 20, 21],
            ),
        ];
        for (name, times, source, hours) in cases {
            let s = with_opens(times);
            let g = good_hours(s.active_hours.as_ref(), &p.contact_hours, now);
            assert_eq!(g.source, source, "{name}");
            assert_eq!(g.hours(), hours, "{name}");
        }
    }

    #[test]
    fn an_old_habit_fades_under_a_new_one() {
        let p = policy();
        let mut times: Vec<i64> = (0..8).map(|d| at("2025-11-03T08:10") + d * DAY).collect();
        let later = at("2026-04-06T21:10");
        times.extend((0..8).map(|d| later + d * DAY));
        let s = with_opens(&times);
        let g = good_hours(s.active_hours.as_ref(), &p.contact_hours, later + 8 * DAY);
        assert_eq!(
            g.hours(),
            vec![20, 21, 22],
            "five half-lives on, mornings are gone"
        );
    }

    #[test]
    fn next_good_time_is_allowed_and_good_and_outside_quiet_hours() {
        let p = policy();
        let evenings = GoodHours {
            mask: (1 << 20) | (1 << 21) | (1 << 22),
            source: HoursSource::Customer,
        };
        let early = GoodHours {
            mask: (1 << 7) | (1 << 8),
            source: HoursSource::Customer,
        };
        let night = GoodHours {
            mask: 1 << 23,
            source: HoursSource::Customer,
        };
        let cases = [
            // (good hours, channel, allowed from, next good time)
            (
                evenings,
                Channel::Email,
                "2026-03-02T10:20",
                Some("2026-03-02T20:00"),
            ),
            (
                evenings,
                Channel::Email,
                "2026-03-02T20:35",
                Some("2026-03-02T20:35"),
            ),
            // SMS is quiet from 21:00: 20:00 is the only good hour left.
            (
                evenings,
                Channel::Sms,
                "2026-03-02T20:50",
                Some("2026-03-02T20:50"),
            ),
            (
                evenings,
                Channel::Sms,
                "2026-03-02T21:05",
                Some("2026-03-03T20:00"),
            ),
            // WeChat is quiet until 08:00: 07:xx never is allowed, 08:00 is.
            (
                early,
                Channel::Wechat,
                "2026-03-02T06:30",
                Some("2026-03-02T08:00"),
            ),
            (
                early,
                Channel::Email,
                "2026-03-02T06:30",
                Some("2026-03-02T07:00"),
            ),
            // 23:00 is inside every SMS night: never.
            (night, Channel::Sms, "2026-03-02T10:00", None),
            (
                night,
                Channel::Email,
                "2026-03-02T10:00",
                Some("2026-03-02T23:00"),
            ),
        ];
        for (g, c, from, want) in cases {
            let got = next_good_time(&g, c, &p, at(from));
            assert_eq!(got, want.map(at), "{c} from {from}");
        }
    }

    proptest::proptest! {
        /// Whatever the good hours, channel and start: the answer is the first
        /// moment from `from` on that is in a good hour and outside quiet hours
        /// (checked at `from` and at every local hour start before the answer).
        #[test]
        fn next_good_time_is_the_first_good_allowed_moment(
            mask in 1u32..(1 << 24),
            ch in 0usize..5,
            from in 1_700_000_000_000i64..1_800_000_000_000,
        ) {
            let p = policy();
            let c = Channel::ALL[ch];
            let g = GoodHours { mask, source: HoursSource::Customer };
            let ok = |t: i64| {
                g.contains(local_hour(&p, t).unwrap()) && p.quiet_until(c, t).is_none()
            };
            let got = next_good_time(&g, c, &p, from);
            let mut t = from;
            let end = got.unwrap_or(from + 8 * DAY);
            while t < end {
                proptest::prop_assert!(!ok(t), "{t} was good already, got {got:?}");
                t = (t / HOUR_MS + 1) * HOUR_MS;
            }
            if let Some(r) = got {
                proptest::prop_assert!(r >= from && ok(r));
            }
        }

        /// The fold of any engagement history, in any order, gives the same
        /// histogram (to the bfloat16 rounding of each fold).
        #[test]
        fn the_histogram_does_not_depend_on_arrival_order(
            evs in proptest::collection::vec((0usize..24, 0i64..(60 * DAY)), 1..40),
        ) {
            let p = policy();
            let h = p.contact_hours.half_life.as_ms();
            let fold = |evs: &mut dyn Iterator<Item = &(usize, i64)>| {
                let mut a = ActiveHours::default();
                for (hr, t) in evs {
                    a.record(*hr, *t, h);
                }
                a
            };
            let a = fold(&mut evs.iter());
            let b = fold(&mut evs.iter().rev());
            let now = 61 * DAY;
            let (wa, wb) = (a.weights_at(now, h), b.weights_at(now, h));
            for hr in 0..24 {
                proptest::prop_assert!((wa[hr] - wb[hr]).abs() <= 0.05 * wa[hr].max(1.0));
            }
        }
    }

    #[test]
    fn bad_values_are_refused_with_the_key() {
        let mut c = ContactHoursPolicy {
            population: vec![1.0; 23],
            ..Default::default()
        };
        let e = c.validate("policy.contact_hours").unwrap_err();
        assert_eq!(e.0, "policy.contact_hours.population");
        c.population = vec![0.0; 24];
        assert!(c.validate("k").is_err());
        c.population = vec![1.0; 24];
        c.good_at = 0.0;
        assert_eq!(c.validate("k").unwrap_err().0, "k.good_at");
        c.good_at = 1.0;
        c.half_life = Span::ms(0);
        assert_eq!(c.validate("k").unwrap_err().0, "k.half_life");
    }
}
