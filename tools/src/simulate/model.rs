//! The clinic population model: pure, no IO, deterministic given the seed.
//!
//! A [`Population`] of customers over tenants (clinic brands) lives day by day
//! ([`Population::day`]): visits at each customer's own revisit cadence, the
//! tenants' campaign calendars sending MARKETING messages over channels, SERVICE
//! reminders, opens and clicks whose probability falls with over-contact
//! ([`fatigue_factor`]) and recovers with rest, replies (opt-outs that grow with
//! fatigue, re-subscriptions, booking intent), churn, and the answer of a
//! triggered customer to a recall ([`Population::apply_trigger`]). A sender that
//! obeys lapse's allowances ([`Population::apply_throttle`]) and keeps its own
//! record of the caps between them skips marketing sends to restricted
//! channels, except for a small rogue share (the cap violations lapse counts,
//! with the late-evening sends that fall in quiet hours).
//!
//! **Determinism.** Every random draw for a customer on day `d` comes from a
//! stream keyed by `(seed, tenant, customer, d)` (the profile from one keyed by
//! `(seed, tenant, customer)`), so a customer's events do not depend on how many
//! numbers any other customer or day drew, nor on the population size. With no feedback applied, the
//! same seed, population size and start date give exactly the same events in
//! the same order. Feedback (recall triggers, throttle decisions) changes the
//! customers it concerns from the day it is applied; the same feedback applied
//! on the same days gives the same events again, but in a live run the day a
//! trigger or decision arrives depends on lapse's timing.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{Datelike, NaiveDate, TimeZone};
use chrono_tz::Tz;

use super::rng::SimRng;
use lapse::domain::allowance::AllowanceState;
use lapse::domain::event::{
    Channel, CustomerRef, Event, EventBody, EventKind, Purpose, ReplyClass, VisitType, INPUT_KINDS,
};
use lapse::domain::lapse::{Offers, Segment, Stage};
use lapse::domain::policy::Policies;

pub const DAY: i64 = 86_400_000;
pub const HOUR: i64 = 3_600_000;
pub const MINUTE: i64 = 60_000;

/// Treatment categories, with the revisit cadences lapse defaults to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    Botox,
    Filler,
    Laser,
    SkinCare,
}

impl Treatment {
    pub const ALL: [Treatment; 4] = [
        Treatment::Botox,
        Treatment::Filler,
        Treatment::Laser,
        Treatment::SkinCare,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Treatment::Botox => "BOTOX",
            Treatment::Filler => "FILLER",
            Treatment::Laser => "LASER",
            Treatment::SkinCare => "SKIN_CARE",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Every parameter of the model. Channel arrays are indexed by
/// [`Channel::index`] (WECHAT, SMS, PHONE, EMAIL, SOCIAL); treatment arrays by
/// [`Treatment::index`] (BOTOX, FILLER, LASER, SKIN_CARE); segment arrays by
/// [`Segment::index`] (HIGH_VALUE_LAPSED, AT_RISK, LOW_VALUE_LAPSED).
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    // --- visits -----------------------------------------------------------
    /// Share of customers by main treatment.
    pub treatment_mix: [f64; 4],
    /// Share of customers who are prospects: a consultation first, then maybe a treatment.
    pub prospect_share: f64,
    /// Chance a prospect books a treatment after the consultation (3–21 days later).
    pub prospect_conversion: f64,
    /// Median revisit interval by treatment, days.
    pub cadence_days: [f64; 4],
    /// Log-sd of a customer's personal cadence around the treatment's.
    pub personal_cadence_sigma: f64,
    /// Log-sd of one gap around the customer's cadence.
    pub gap_sigma: f64,
    /// Chance one gap runs late (a customer drifting away who still comes back).
    pub drift_share: f64,
    /// Median factor of a late gap.
    pub drift_factor: f64,
    /// Chance of churning for good after a treatment visit, when not fatigued.
    pub churn_per_visit: f64,
    /// Extra churn chance at full over-contact fatigue.
    pub churn_fatigue: f64,
    /// Chance of switching to another treatment at a visit.
    pub treatment_switch: f64,
    /// Chance of a free FOLLOW_UP visit 11–17 days after BOTOX or FILLER.
    pub follow_up_share: f64,
    /// Chance of a post-treatment care message (SERVICE) the next day.
    pub care_message_share: f64,
    /// Median spend of one treatment visit, fen.
    pub spend_median_fen: [f64; 4],
    /// Log-sd of a customer's spend level (heavy tail: some are high value).
    pub spend_customer_sigma: f64,
    /// Log-sd of one visit's spend around the customer's level.
    pub spend_visit_sigma: f64,
    /// Chance a treatment visit is a package purchase ...
    pub package_share: f64,
    /// ... worth this many visits.
    pub package_factor: f64,
    /// Consultation fee, fen (charged at half of the consultations).
    pub consultation_fee_fen: i64,
    // --- channels ---------------------------------------------------------
    /// Chance a customer is reachable on a channel (PHONE: consent to calls).
    pub reach: [f64; 5],
    /// Open (PHONE: answer) rate per send of an average, rested customer.
    pub open_rate: [f64; 5],
    /// Click rate per send of an average, rested customer (PHONE has no clicks).
    pub click_rate: [f64; 5],
    /// Weights of a customer's favourite channel ...
    pub favourite_weights: [f64; 5],
    /// ... whose engagement is multiplied by this.
    pub favourite_boost: f64,
    /// Log-sd of a customer's engagement per channel.
    pub preference_sigma: f64,
    /// Half-life of the fatigue count of recent sends, days.
    pub fatigue_half_life_days: f64,
    /// Recent (decayed) sends per channel a customer tolerates before engagement drops.
    pub fatigue_tolerance: [f64; 5],
    /// Recent sends over all channels tolerated.
    pub fatigue_total_tolerance: f64,
    /// Opt-out reply rate per marketing send, rested.
    pub unsubscribe_rate: [f64; 5],
    /// Opt-outs are this many times likelier at full fatigue (1 + boost × (1 − fatigue factor)).
    pub unsubscribe_fatigue_boost: f64,
    /// Positive (booking intent) reply rate per send, average rested customer.
    pub positive_reply_rate: f64,
    /// Neutral reply rate per send.
    pub neutral_reply_rate: f64,
    /// Chance a marketing message to an opted-out channel is answered with another opt-out.
    pub annoyed_reply_rate: f64,
    /// Chance an opted-out channel is re-subscribed at a clinic visit.
    pub resubscribe_on_visit: f64,
    // --- sender -----------------------------------------------------------
    /// Share of campaign sends that go out late in the evening (quiet hours).
    pub evening_share: f64,
    /// Whether the sender skips marketing to channels lapse restricted (CAPPED,
    /// THROTTLED until `allowed_from`; SUPPRESSED until re-subscribed).
    pub obey_throttle: bool,
    /// Share of restricted sends a rogue sender makes anyway.
    pub rogue_share: f64,
    /// The caps the obeying sender keeps itself between lapse's decisions
    /// (limit, rolling window in ms), as in lapse's `policy.caps`; a limit of 0
    /// or above [`SENDER_CAP_MEMORY`] is not tracked. In compressed time a
    /// decision reaches the sender only on a later simulated day, so without
    /// this a sender could not obey a 1-day cap.
    pub sender_caps: [(u32, i64); 5],
    /// Lifetime spend (fen) from which consultants phone a customer ...
    pub phone_min_spend_fen: i64,
    /// ... with this chance per working day.
    pub phone_daily_chance: f64,
    // --- recall -----------------------------------------------------------
    /// Chance a triggered customer books a visit, by segment (recommended channel, rested, average engagement).
    pub response: [f64; 3],
    /// Factor on `response` for FOLLOW_UP triggers.
    pub follow_up_response_factor: f64,
    /// Factor on `response` for a customer who had churned for good.
    pub churned_response_factor: f64,
    /// Median days from the trigger to the booked visit.
    pub response_median_days: f64,
    /// Log-sd of those days (clamped to 1–50).
    pub response_sigma: f64,
    // --- active hours -----------------------------------------------------
    /// Weights of the local hour a customer is most active at (their active
    /// window is that hour ± 1): commutes, lunch breaks, evenings.
    pub active_peak_mix: [f64; 24],
    /// A message arriving inside the active window is clicked (and a recall
    /// answered, by the square root) this many times as often ...
    pub active_click_boost: f64,
    /// ... and one arriving outside it this many times.
    pub inactive_click_factor: f64,
    /// Chance a message arriving outside the active window is opened at the
    /// window's start (later the same day) rather than soon after arrival.
    pub open_in_window_share: f64,
    /// Share of customers whose recall messages go out at the trigger's
    /// `send_after` (the rest: at a random allowed time, the comparison).
    pub recall_at_send_after_share: f64,
    /// Discount (percent of the visit's spend) of the offer a recall visit
    /// redeems, by segment (its trigger's offer tier: a care call gives none,
    /// the coupons 5 % and 10 %).
    pub offer_discount_pct: [i64; 3],
    /// Chance a recalled customer comes back again within `repurchase_days`
    /// (复购), sooner than their cadence.
    pub repurchase_share: f64,
    pub repurchase_days: (i64, i64),
}

impl Default for Params {
    fn default() -> Params {
        Params {
            treatment_mix: [0.32, 0.13, 0.25, 0.30],
            prospect_share: 0.12,
            prospect_conversion: 0.5,
            cadence_days: [120.0, 270.0, 30.0, 30.0],
            personal_cadence_sigma: 0.15,
            gap_sigma: 0.22,
            drift_share: 0.15,
            drift_factor: 1.8,
            churn_per_visit: 0.06,
            churn_fatigue: 0.15,
            treatment_switch: 0.06,
            follow_up_share: 0.2,
            care_message_share: 0.6,
            spend_median_fen: [280_000.0, 680_000.0, 200_000.0, 90_000.0],
            spend_customer_sigma: 0.9,
            spend_visit_sigma: 0.25,
            package_share: 0.05,
            package_factor: 4.0,
            consultation_fee_fen: 20_000,
            reach: [0.92, 0.97, 0.30, 0.45, 0.35],
            open_rate: [0.45, 0.60, 0.55, 0.22, 0.40],
            click_rate: [0.06, 0.025, 0.0, 0.015, 0.04],
            favourite_weights: [0.55, 0.20, 0.0, 0.10, 0.15],
            favourite_boost: 2.0,
            preference_sigma: 0.4,
            fatigue_half_life_days: 7.0,
            fatigue_tolerance: [4.0, 1.5, 1.0, 2.0, 5.0],
            fatigue_total_tolerance: 8.0,
            unsubscribe_rate: [0.002, 0.006, 0.004, 0.002, 0.003],
            unsubscribe_fatigue_boost: 4.0,
            positive_reply_rate: 0.012,
            neutral_reply_rate: 0.006,
            annoyed_reply_rate: 0.15,
            resubscribe_on_visit: 0.1,
            evening_share: 0.01,
            obey_throttle: true,
            rogue_share: 0.03,
            sender_caps: [
                (2, DAY),
                (2, 7 * DAY),
                (2, 30 * DAY),
                (2, 30 * DAY),
                (3, DAY),
            ],
            phone_min_spend_fen: 1_000_000,
            phone_daily_chance: 0.04,
            response: [0.35, 0.25, 0.18],
            offer_discount_pct: [0, 5, 10],
            repurchase_share: 0.35,
            repurchase_days: (14, 60),
            follow_up_response_factor: 0.5,
            churned_response_factor: 0.4,
            response_median_days: 9.0,
            response_sigma: 0.6,
            active_peak_mix: {
                let mut m = [0.0; 24];
                for (h, w) in [
                    (8, 0.15),
                    (12, 0.15),
                    (13, 0.10),
                    (19, 0.15),
                    (20, 0.25),
                    (21, 0.20),
                ] {
                    m[h] = w;
                }
                m
            },
            active_click_boost: 1.6,
            inactive_click_factor: 0.75,
            open_in_window_share: 0.6,
            recall_at_send_after_share: 0.5,
        }
    }
}

// ---------------------------------------------------------------------------
// Pure pieces
// ---------------------------------------------------------------------------

/// Engagement multiplier for `recent` (decayed) sends against a tolerance: 1 up
/// to the tolerance, then halving with every further `tolerance` sends.
/// Rest lowers `recent` (see [`decayed`]), so engagement recovers.
pub fn fatigue_factor(recent: f64, tolerance: f64) -> f64 {
    if tolerance <= 0.0 || recent <= tolerance {
        1.0
    } else {
        0.5f64.powf((recent - tolerance) / tolerance)
    }
}

/// `count` after `elapsed_ms` of exponential decay with the given half-life.
pub fn decayed(count: f64, elapsed_ms: i64, half_life_days: f64) -> f64 {
    if elapsed_ms <= 0 || half_life_days <= 0.0 {
        return count;
    }
    count * 0.5f64.powf(elapsed_ms as f64 / (half_life_days * DAY as f64))
}

/// Days until the next treatment visit: the customer's cadence, jittered, and
/// sometimes late (drift).
pub fn next_gap_days(rng: &mut SimRng, p: &Params, t: Treatment, cadence_factor: f64) -> f64 {
    let base = p.cadence_days[t.index()] * cadence_factor;
    let mut gap = rng.lognormal(base, p.gap_sigma);
    if rng.chance(p.drift_share) {
        gap *= rng.lognormal(p.drift_factor, 0.25).max(1.2);
    }
    gap.clamp(7.0, 1000.0)
}

/// Chance of churning for good after a visit, given the customer's fatigue factor over all channels.
pub fn churn_probability(p: &Params, total_fatigue_factor: f64) -> f64 {
    (p.churn_per_visit + p.churn_fatigue * (1.0 - total_fatigue_factor)).clamp(0.0, 1.0)
}

/// Opt-out replies, as customers write them (all classified as opt-outs by lapse).
pub const UNSUBSCRIBE_TEXTS: &[&str] = &[
    "TD",
    "td",
    "退订",
    "T",
    "退订！",
    "ＴＤ",
    "不要再发了",
    "别发了谢谢",
    "STOP",
    "取消订阅",
    "请退订",
    "拒收",
];
/// Opt-outs from someone who had already opted out.
pub const ANNOYED_TEXTS: &[&str] = &["都退订了还发！退订", "说了退订", "别再发了"];
/// Re-subscriptions.
pub const RESUBSCRIBE_TEXTS: &[&str] = &["订阅", "恢复订阅", "重新订阅", "可以发", "START"];
/// Booking intent and assent.
pub const POSITIVE_TEXTS: &[&str] = &[
    "好的，想预约",
    "好的，想预约下周",
    "可以预约周六吗？",
    "想了解一下价格",
    "多少钱？",
    "好的",
    "有空，想约一下",
    "1",
];
/// Anything else.
pub const NEUTRAL_TEXTS: &[&str] = &["哦", "知道了", "你是哪位", "[微笑]", "下个月再说", "在外地"];
/// What a recalled customer answers.
pub const BOOKING_TEXTS: &[&str] = &["好的，想预约", "好的，想预约下周", "可以预约周六吗？"];

// ---------------------------------------------------------------------------
// Feedback from lapse
// ---------------------------------------------------------------------------

/// A recall trigger as the simulator needs it (from `recall.triggers`).
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerFeedback {
    pub tenant: String,
    pub customer: String,
    pub segment: Segment,
    pub stage: Stage,
    pub channel: Option<Channel>,
    pub fired_at: i64,
    pub holdout: bool,
    /// The trigger's `send_after`: when the customer is likeliest to engage.
    pub send_after: Option<i64>,
}

/// A throttle decision (from `engagement.throttle`): customer×channel or campaign scope.
#[derive(Debug, Clone, PartialEq)]
pub struct ThrottleFeedback {
    pub tenant: String,
    pub customer: Option<String>,
    pub channel: Option<Channel>,
    pub campaign: Option<String>,
    pub state: AllowanceState,
    pub allowed_from: Option<i64>,
}

// ---------------------------------------------------------------------------
// Population
// ---------------------------------------------------------------------------

/// One generated input event; `text` is set for replies only.
#[derive(Debug, Clone, PartialEq)]
pub struct SimEvent {
    pub event: Event,
    pub text: Option<&'static str>,
}

/// A simulated day in the customers' time zone.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DayInfo {
    pub index: u32,
    pub date: NaiveDate,
    /// Local midnight, ms since the epoch.
    pub start: i64,
    /// Next local midnight.
    pub end: i64,
    /// 0 = Monday.
    pub weekday: u32,
    /// Day of the month, 1-based.
    pub mday: u32,
}

/// A tenant's campaign of the day on one channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Campaign {
    pub channel: Channel,
    pub at: i64,
    pub share: f64,
    pub id: String,
    /// Consultants' calls: only customers above `phone_min_spend_fen`, at `phone_daily_chance`.
    pub consultant_call: bool,
}

/// Marketing send times the sender remembers per customer and channel.
pub const SENDER_CAP_MEMORY: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq)]
struct Allow {
    state: AllowanceState,
    allowed_from: Option<i64>,
}

const OPEN: Allow = Allow {
    state: AllowanceState::Open,
    allowed_from: None,
};

#[derive(Debug, Clone, Copy, PartialEq)]
struct PendingRecall {
    segment: Segment,
    stage: Stage,
    channel: Option<Channel>,
    fired_at: i64,
    send_after: Option<i64>,
}

/// A customer: a fixed profile and a bounded state (no list grows).
#[derive(Debug, Clone, PartialEq)]
struct Customer {
    tenant: u16,
    /// 1-based number within the tenant.
    local: u32,
    treatment: Treatment,
    prospect: bool,
    cadence_factor: f32,
    spend_factor: f32,
    pref: [f32; 5],
    reach: u8,
    unsubscribed: u8,
    churned: bool,
    recall_booked: bool,
    /// The segment of the recall booked (its trigger's offer is redeemed).
    recall_offer: Option<Segment>,
    next_visit: Option<u32>,
    next_is_consultation: bool,
    follow_up: Option<u32>,
    care: Option<u32>,
    lifetime: i64,
    visits: u32,
    fatigue: [f32; 5],
    fatigue_at: i64,
    allowance: [Allow; 5],
    /// The sender's own record of its last marketing sends per channel (i64::MIN: none).
    sent: [[i64; SENDER_CAP_MEMORY]; 5],
    pending: Option<PendingRecall>,
    /// Local hour of peak activity; the active window is this hour ± 1.
    peak: u8,
    /// Recall messages go out at the trigger's `send_after` (else at a random allowed time).
    recall_at_send_after: bool,
}

/// Counters of what the population did, for the summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Events generated, by [`EventKind::index`].
    pub events: [u64; INPUT_KINDS],
    /// Sends by channel and purpose (0 marketing, 1 service).
    pub sends: [[u64; 2]; 5],
    /// Marketing sends the obeying sender skipped, by [`AllowanceState::index`].
    pub skipped: [u64; 4],
    /// Restricted marketing sends made anyway (rogue sender).
    pub rogue: u64,
    /// Campaign sends in the late evening.
    pub evening: u64,
    /// Replies by class: unsubscribe, resubscribe, positive, neutral.
    pub replies: [u64; 4],
    pub visits_natural: u64,
    pub visits_after_recall: u64,
    /// Customers who decided to churn for good (some are won back later).
    pub churn_decisions: u64,
    /// Treatment-arm triggers received, by [`Segment::index`].
    pub triggers: [u64; 3],
    pub triggers_without_channel: u64,
    /// Holdout triggers seen on the topic (lapse never publishes them: should stay 0).
    pub holdout_triggers: u64,
    pub recall_sends: u64,
    pub recall_bookings: u64,
    /// Recall messages by timing — [0] at the trigger's `send_after`, [1] at a
    /// random allowed time — as [sends, opens, clicks, bookings].
    pub recall_timing: [[u64; 4]; 2],
    pub throttle_decisions: u64,
    /// Feedback about customers this population does not have (another run's).
    pub foreign_feedback: u64,
    /// Survey answers and care calls (`satisfaction`).
    pub satisfaction: super::satisfaction::Satisfaction,
}

impl Stats {
    pub fn total_events(&self) -> u64 {
        self.events.iter().sum()
    }
}

/// Tenant ids: clinic brands.
const BRANDS: &[&str] = &[
    "meiyan", "yuelan", "qingyan", "xinmei", "ruiyi", "anmei", "jiayan", "lihua",
];

pub fn tenant_name(i: usize) -> String {
    BRANDS
        .get(i)
        .map_or_else(|| format!("brand-{}", i + 1), |s| (*s).to_string())
}

/// The customer id of the `local`-th (1-based) customer of a tenant.
pub fn customer_name(local: u32) -> String {
    format!("c{local:06}")
}

/// Tenant sizes: `customers` over `tenants`, proportional to 1/(rank+1) (a big
/// brand and smaller ones), every tenant at least one customer when possible.
pub fn tenant_sizes(customers: u32, tenants: u32) -> Vec<u32> {
    let tenants = tenants.max(1);
    let base = u32::from(customers >= tenants);
    let rest = customers - base * tenants;
    let w: Vec<f64> = (0..tenants).map(|t| 1.0 / (t as f64 + 1.0)).collect();
    let total: f64 = w.iter().sum();
    let mut sizes: Vec<u32> = w
        .iter()
        .map(|x| base + ((rest as f64) * x / total).floor() as u32)
        .collect();
    let mut assigned: u32 = sizes.iter().sum();
    let mut i = 0usize;
    while assigned < customers {
        sizes[i % tenants as usize] += 1;
        assigned += 1;
        i += 1;
    }
    sizes
}

pub struct Population {
    pub params: Params,
    seed: u64,
    tz: Tz,
    start_date: NaiveDate,
    start_ms: i64,
    days: u32,
    tenants: Vec<String>,
    tenant_index: HashMap<String, usize>,
    /// Global index of each tenant's first customer.
    offsets: Vec<u32>,
    sizes: Vec<u32>,
    customers: Vec<Customer>,
    /// Campaign-scope throttles: campaign id → (state, allowed_from). Bounded by
    /// the number of campaigns, a few per tenant and day.
    campaign_throttles: HashMap<String, Allow>,
    high_value_threshold: i64,
    /// lapse's policies: the obeying sender keeps each customer's caps under
    /// their experiment arms (as a sender asking `/v1/allowance` would); none:
    /// `Params::sender_caps` for everyone.
    policies: Option<Arc<Policies>>,
    pub stats: Stats,
}

/// Stream tags, so profile and day streams never coincide.
const TAG_PROFILE: u64 = u64::MAX;

impl Population {
    /// `customers` over `tenants`, living `days` days from local midnight of
    /// `start_date` in `tz`. `high_value_threshold` is lapse's (fen), for the summary only.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        params: Params,
        seed: u64,
        customers: u32,
        tenants: u32,
        days: u32,
        tz: Tz,
        start_date: NaiveDate,
        high_value_threshold: i64,
    ) -> Population {
        let sizes = tenant_sizes(customers, tenants);
        let tenant_names: Vec<String> = (0..sizes.len()).map(tenant_name).collect();
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut acc = 0u32;
        for s in &sizes {
            offsets.push(acc);
            acc += s;
        }
        let mut pop = Population {
            params,
            seed,
            tz,
            start_date,
            start_ms: 0,
            days,
            tenant_index: tenant_names
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i))
                .collect(),
            tenants: tenant_names,
            offsets,
            sizes: sizes.clone(),
            customers: Vec::with_capacity(customers as usize),
            campaign_throttles: HashMap::new(),
            high_value_threshold,
            policies: None,
            stats: Stats::default(),
        };
        pop.start_ms = pop.local_midnight(start_date);
        for (t, size) in sizes.iter().enumerate() {
            for local in 1..=*size {
                let c = pop.new_customer(t as u16, local);
                pop.customers.push(c);
            }
        }
        pop
    }

    pub fn customers(&self) -> usize {
        self.customers.len()
    }

    pub fn tenants(&self) -> &[String] {
        &self.tenants
    }

    pub fn days(&self) -> u32 {
        self.days
    }

    fn local_midnight(&self, date: NaiveDate) -> i64 {
        let naive = date.and_hms_opt(0, 0, 0).expect("midnight");
        self.tz
            .from_local_datetime(&naive)
            .earliest()
            .or_else(|| {
                self.tz
                    .from_local_datetime(&(naive + chrono::Duration::hours(1)))
                    .earliest()
            })
            .map_or_else(
                || naive.and_utc().timestamp_millis(),
                |t| t.timestamp_millis(),
            )
    }

    pub fn day_info(&self, d: u32) -> DayInfo {
        let date = self.start_date + chrono::Days::new(d as u64);
        let next = date + chrono::Days::new(1);
        DayInfo {
            index: d,
            date,
            start: self.local_midnight(date),
            end: self.local_midnight(next),
            weekday: date.weekday().num_days_from_monday(),
            mday: date.day(),
        }
    }

    /// The simulated day a time falls in (0 before the start).
    pub fn day_of(&self, t: i64) -> u32 {
        ((t - self.start_ms).max(0) / DAY) as u32
    }

    fn new_customer(&self, tenant: u16, local: u32) -> Customer {
        let p = &self.params;
        let mut r = SimRng::keyed(&[self.seed, tenant as u64, local as u64, TAG_PROFILE]);
        let prospect = r.chance(p.prospect_share);
        let treatment = Treatment::ALL[r.weighted(&p.treatment_mix)];
        let cadence_factor = r.lognormal(1.0, p.personal_cadence_sigma);
        let spend_factor = r.lognormal(1.0, p.spend_customer_sigma);
        let mut reach = 0u8;
        for ch in Channel::ALL {
            if r.chance(p.reach[ch.index()]) {
                reach |= 1 << ch.index();
            }
        }
        if reach == 0 {
            reach = 1 << Channel::Sms.index();
        }
        let favourite = r.weighted(&p.favourite_weights);
        let mut pref = [0f32; 5];
        for (i, v) in pref.iter_mut().enumerate() {
            let boost = if i == favourite {
                p.favourite_boost
            } else {
                1.0
            };
            *v = (r.lognormal(1.0, p.preference_sigma) * boost) as f32;
        }
        // Prospects arrive over the run (over 60 days at least, so a short
        // or live run does not see every prospect on its first day).
        let days = self.days.max(60) as f64;
        let first = if prospect {
            r.f64() * days
        } else {
            r.f64() * p.cadence_days[treatment.index()] * cadence_factor
        };
        // Drawn last, so the draws above (and the events they shape) stay as they were.
        let peak = r.weighted(&p.active_peak_mix) as u8;
        let recall_at_send_after = r.chance(p.recall_at_send_after_share);
        Customer {
            tenant,
            local,
            treatment,
            prospect,
            cadence_factor: cadence_factor as f32,
            spend_factor: spend_factor as f32,
            pref,
            reach,
            unsubscribed: 0,
            churned: false,
            recall_booked: false,
            recall_offer: None,
            next_visit: Some(first.floor().min(u32::MAX as f64) as u32),
            next_is_consultation: prospect,
            follow_up: None,
            care: None,
            lifetime: 0,
            visits: 0,
            fatigue: [0.0; 5],
            fatigue_at: self.start_ms,
            allowance: [OPEN; 5],
            sent: [[i64::MIN; SENDER_CAP_MEMORY]; 5],
            pending: None,
            peak,
            recall_at_send_after,
        }
    }

    /// The obeying sender keeps the caps of `policies` (the tenant's, under the
    /// customer's experiment arms) instead of `Params::sender_caps`.
    pub fn with_policies(mut self, policies: Arc<Policies>) -> Population {
        self.policies = Some(policies);
        self
    }

    /// The tenant's campaigns of a day: a weekly WeChat push and a weekly
    /// content push to a part of the followers, a monthly member
    /// day (two WeChat pushes — the daily cap — and an SMS), a weekly
    /// SMS promotion, a fortnightly e-mail newsletter, social DMs three times a
    /// week, and consultants' calls to big spenders on working days.
    pub fn campaigns(&self, tenant: usize, day: &DayInfo) -> Vec<Campaign> {
        let name = &self.tenants[tenant];
        let t = tenant as u32;
        let date = day.date.format("%Y%m%d");
        let at = |h: i64, m: i64| day.start + h * HOUR + m * MINUTE;
        let mut v = Vec::new();
        let mut add = |channel, at, share, kind: &str, consultant_call| {
            v.push(Campaign {
                channel,
                at,
                share,
                id: format!("{name}-{kind}-{date}"),
                consultant_call,
            })
        };
        if day.weekday == (1 + t) % 7 {
            add(Channel::Wechat, at(11, 30), 0.8, "wx-weekly", false);
        }
        if day.weekday == (4 + t) % 7 {
            add(Channel::Wechat, at(12, 0), 0.4, "wx-content", false);
        }
        if day.mday == 8 + 10 * (t % 3) {
            add(Channel::Wechat, at(10, 0), 0.9, "wx-member-day-am", false);
            add(Channel::Wechat, at(19, 0), 0.9, "wx-member-day-pm", false);
            add(Channel::Sms, at(10, 30), 0.6, "sms-member-day", false);
        }
        if day.weekday == (3 + t) % 7 {
            add(Channel::Sms, at(15, 0), 0.45, "sms-promo", false);
        }
        if day.mday == 1 || day.mday == 15 {
            add(Channel::Email, at(9, 30), 0.9, "email-newsletter", false);
        }
        if matches!(day.weekday, 0 | 2 | 5) {
            add(Channel::Social, at(18, 0), 0.35, "social-dm", false);
        }
        if day.weekday < 5 {
            add(Channel::Phone, at(14, 0), 1.0, "phone-consultant", true);
        }
        v
    }

    /// Every event of day `d` for every customer, sorted by event time (ties in
    /// customer order), appended to `out`.
    pub fn day(&mut self, d: u32, out: &mut Vec<SimEvent>) -> DayInfo {
        let day = self.day_info(d);
        let campaigns: Vec<Vec<Campaign>> = (0..self.tenants.len())
            .map(|t| self.campaigns(t, &day))
            .collect();
        let first = out.len();
        let mut customers = std::mem::take(&mut self.customers);
        for c in customers.iter_mut() {
            let mut ctx = DayCtx {
                p: &self.params,
                day: &day,
                campaigns: &campaigns[c.tenant as usize],
                campaign_throttles: &self.campaign_throttles,
                policies: self.policies.as_deref(),
                stats: &mut self.stats,
                rng: SimRng::keyed(&[self.seed, c.tenant as u64, c.local as u64, d as u64]),
                out,
                who: CustomerRef::new(
                    self.tenants[c.tenant as usize].clone(),
                    customer_name(c.local),
                ),
                id_prefix: format!("s{}d{}t{}c{}", self.seed, d, c.tenant, c.local),
                n: 0,
                start_ms: self.start_ms,
            };
            ctx.live(c);
        }
        self.customers = customers;
        out[first..].sort_by_key(|e| e.event.occurred_at);
        day
    }

    fn customer_mut(&mut self, tenant: &str, customer: &str) -> Option<&mut Customer> {
        let t = *self.tenant_index.get(tenant)?;
        let local: u32 = customer.strip_prefix('c')?.parse().ok()?;
        if local == 0 || local > self.sizes[t] || customer != customer_name(local) {
            return None;
        }
        let idx = self.offsets[t] + local - 1;
        self.customers.get_mut(idx as usize)
    }

    /// A recall trigger: the customer is contacted on the recommended channel
    /// on the next simulated day and may book a visit. Returns false (and
    /// counts it) when the customer is not in this population.
    pub fn apply_trigger(&mut self, t: &TriggerFeedback) -> bool {
        if t.stage == Stage::CareCall {
            // A service call about a bad experience, not a win-back message.
            self.stats.satisfaction.care_calls += 1;
            return true;
        }
        if t.holdout {
            self.stats.holdout_triggers += 1;
            return true;
        }
        let Some(c) = self.customer_mut(&t.tenant, &t.customer) else {
            self.stats.foreign_feedback += 1;
            return false;
        };
        c.pending = Some(PendingRecall {
            segment: t.segment,
            stage: t.stage,
            channel: t.channel,
            fired_at: t.fired_at,
            send_after: t.send_after,
        });
        self.stats.triggers[t.segment.index()] += 1;
        if t.channel.is_none() {
            self.stats.triggers_without_channel += 1;
        }
        true
    }

    /// A throttle decision: the obeying sender follows it from now on.
    pub fn apply_throttle(&mut self, t: &ThrottleFeedback) -> bool {
        self.stats.throttle_decisions += 1;
        let allow = Allow {
            state: t.state,
            allowed_from: t.allowed_from,
        };
        match (&t.customer, t.channel, &t.campaign) {
            (Some(cust), Some(ch), _) => match self.customer_mut(&t.tenant, cust) {
                Some(c) => {
                    c.allowance[ch.index()] = allow;
                    true
                }
                None => {
                    self.stats.foreign_feedback += 1;
                    false
                }
            },
            (None, _, Some(campaign)) => {
                if t.state == AllowanceState::Open {
                    self.campaign_throttles.remove(campaign);
                } else {
                    self.campaign_throttles.insert(campaign.clone(), allow);
                }
                true
            }
            _ => false,
        }
    }

    /// Customers who churned for good and were not won back.
    pub fn churned(&self) -> usize {
        self.customers.iter().filter(|c| c.churned).count()
    }

    /// Customers whose simulated lifetime spend reached lapse's high-value threshold.
    pub fn high_value(&self) -> usize {
        self.customers
            .iter()
            .filter(|c| c.lifetime >= self.high_value_threshold)
            .count()
    }

    /// Customer×channel pairs opted out at the end.
    pub fn opted_out(&self) -> usize {
        self.customers
            .iter()
            .map(|c| c.unsubscribed.count_ones() as usize)
            .sum()
    }

    /// Customers with at least one visit.
    pub fn visited(&self) -> usize {
        self.customers.iter().filter(|c| c.visits > 0).count()
    }
}

/// One customer's day: the context the generation needs.
struct DayCtx<'a> {
    p: &'a Params,
    day: &'a DayInfo,
    campaigns: &'a [Campaign],
    campaign_throttles: &'a HashMap<String, Allow>,
    policies: Option<&'a Policies>,
    stats: &'a mut Stats,
    rng: SimRng,
    out: &'a mut Vec<SimEvent>,
    who: CustomerRef,
    id_prefix: String,
    n: u32,
    start_ms: i64,
}

struct Planned {
    at: i64,
    channel: Channel,
    purpose: Purpose,
    campaign: Option<String>,
    recall: Option<PendingRecall>,
}

impl DayCtx<'_> {
    fn next_id(&mut self) -> String {
        self.n += 1;
        format!("{}n{}", self.id_prefix, self.n)
    }

    fn emit(&mut self, at: i64, body: EventBody, text: Option<&'static str>) -> String {
        let event_id = self.next_id();
        self.push(event_id.clone(), at, body, text);
        event_id
    }

    fn push(&mut self, event_id: String, at: i64, body: EventBody, text: Option<&'static str>) {
        let at = at.clamp(self.day.start, self.day.end - 1);
        let event = Event {
            event_id: event_id.clone(),
            customer: self.who.clone(),
            occurred_at: at,
            body,
        };
        self.stats.events[event.kind().index()] += 1;
        self.out.push(SimEvent { event, text });
    }

    fn reply(&mut self, at: i64, ch: Channel, msg: Option<&str>, class: ReplyClass) {
        let texts = match class {
            ReplyClass::Unsubscribe => UNSUBSCRIBE_TEXTS,
            ReplyClass::Resubscribe => RESUBSCRIBE_TEXTS,
            ReplyClass::Positive => POSITIVE_TEXTS,
            ReplyClass::Neutral => NEUTRAL_TEXTS,
        };
        let text = *self.rng.pick(texts);
        self.reply_text(at, ch, msg, class, text);
    }

    fn reply_text(
        &mut self,
        at: i64,
        ch: Channel,
        msg: Option<&str>,
        class: ReplyClass,
        text: &'static str,
    ) {
        let i = match class {
            ReplyClass::Unsubscribe => 0,
            ReplyClass::Resubscribe => 1,
            ReplyClass::Positive => 2,
            ReplyClass::Neutral => 3,
        };
        self.stats.replies[i] += 1;
        self.emit(
            at,
            EventBody::Reply {
                channel: ch,
                message_id: msg.map(str::to_string),
                class,
            },
            Some(text),
        );
    }

    /// A time in local business hours today, from `h0` to `h1` o'clock.
    fn hours(&mut self, h0: i64, h1: i64) -> i64 {
        self.day.start + self.rng.range(h0 * HOUR, h1 * HOUR)
    }

    fn live(&mut self, c: &mut Customer) {
        let d = self.day.index;
        // Visits.
        if c.follow_up == Some(d) {
            c.follow_up = None;
            self.visit(c, VisitType::FollowUp);
        }
        if c.next_visit == Some(d) {
            let kind = if c.next_is_consultation {
                VisitType::Consultation
            } else {
                VisitType::Treatment
            };
            let recalled = c.recall_booked;
            self.visit(c, kind);
            self.schedule_after(c, kind);
            let p = self.p;
            if recalled && !c.churned && self.rng.chance(p.repurchase_share) {
                let again = d + self.rng.range(p.repurchase_days.0, p.repurchase_days.1) as u32;
                if c.next_visit.is_none_or(|n| n > again) {
                    c.next_visit = Some(again);
                    c.next_is_consultation = false;
                }
            }
        }

        // Sends of the day, planned then made in time order.
        let mut planned: Vec<Planned> = Vec::new();
        let reach_bits = c.reach;
        let reach = |ch: Channel| reach_bits & (1 << ch.index()) != 0;
        let service_channel = if reach(Channel::Wechat) {
            Channel::Wechat
        } else {
            Channel::Sms
        };
        if c.next_visit == Some(d + 1) || c.follow_up == Some(d + 1) {
            let at = self.hours(10, 12);
            planned.push(Planned {
                at,
                channel: service_channel,
                purpose: Purpose::Service,
                campaign: None,
                recall: None,
            });
        }
        if c.care == Some(d) {
            c.care = None;
            let at = self.hours(11, 20);
            planned.push(Planned {
                at,
                channel: service_channel,
                purpose: Purpose::Service,
                campaign: None,
                recall: None,
            });
        }
        for camp in self.campaigns {
            if !reach(camp.channel) {
                continue;
            }
            let share = if camp.consultant_call {
                if c.lifetime < self.p.phone_min_spend_fen {
                    continue;
                }
                self.p.phone_daily_chance
            } else {
                camp.share
            };
            if !self.rng.chance(share) {
                continue;
            }
            let at = if self.rng.chance(self.p.evening_share) {
                self.stats.evening += 1;
                self.day.start + 21 * HOUR + 15 * MINUTE + self.rng.range(0, 90 * MINUTE)
            } else {
                camp.at + self.rng.range(0, 45 * MINUTE)
            };
            planned.push(Planned {
                at,
                channel: camp.channel,
                purpose: Purpose::Marketing,
                campaign: Some(camp.id.clone()),
                recall: None,
            });
        }
        // A recall trigger: the message goes out on the recommended channel
        // (none recommended: nobody can be reached, nothing is sent).
        if let Some((r, ch)) = c.pending.take().and_then(|r| Some((r, r.channel?))) {
            let earliest = (r.fired_at + 30 * MINUTE).max(self.day.start);
            let at = match r.send_after.filter(|_| c.recall_at_send_after) {
                // The same good hour on the first day the sender can make it.
                Some(after) => {
                    let late = (earliest - after).max(0);
                    Some(after + (late + DAY - 1) / DAY * DAY).filter(|t| *t < self.day.end)
                }
                // The comparison: any allowed hour (09-21 is outside every quiet hour).
                None => Some(self.hours(9, 21).max(earliest).min(self.day.end - 2 * HOUR)),
            };
            match at {
                Some(at) => planned.push(Planned {
                    at,
                    channel: ch,
                    purpose: Purpose::Marketing,
                    campaign: Some(format!(
                        "{}-recall-{}",
                        self.who.tenant,
                        r.segment.label().replace('_', "-")
                    )),
                    recall: Some(r),
                }),
                // Its good hour is on a later day.
                None => c.pending = Some(r),
            }
        }
        planned.sort_by_key(|s| s.at);
        for s in planned {
            self.send(c, s);
        }
    }

    /// Whether `t` (today) falls in the customer's active window.
    fn in_active_window(&self, c: &Customer, t: i64) -> bool {
        let hour = (t - self.day.start).clamp(0, DAY - 1) / HOUR;
        let d = (hour - c.peak as i64).rem_euclid(24);
        d <= 1 || d == 23
    }

    fn visit(&mut self, c: &mut Customer, kind: VisitType) {
        let p = self.p;
        let at = self.hours(10, 19);
        let t = c.treatment;
        let amount = match kind {
            VisitType::Consultation => {
                if self.rng.chance(0.5) {
                    p.consultation_fee_fen
                } else {
                    0
                }
            }
            VisitType::FollowUp => 0,
            VisitType::Treatment => {
                let package = if self.rng.chance(p.package_share) {
                    p.package_factor
                } else {
                    1.0
                };
                let v = p.spend_median_fen[t.index()]
                    * c.spend_factor as f64
                    * self.rng.lognormal(1.0, p.spend_visit_sigma)
                    * package;
                ((v / 100.0).round() as i64 * 100).max(10_000)
            }
        };
        let treatment = match kind {
            VisitType::Consultation => None,
            _ => Some(t.as_str().to_string()),
        };
        // A recall visit redeems its trigger's offer (the default tiers).
        let offer = match kind {
            VisitType::FollowUp => None,
            _ => c.recall_offer.take(),
        };
        let offer_code = offer.map(|s| Offers::default().for_segment(s).to_string());
        let discount = offer
            .map(|s| amount * p.offer_discount_pct[s.index()] / 100)
            .filter(|d| *d > 0);
        let visit_id = self.emit(
            at,
            EventBody::Visit {
                visit_type: kind,
                treatment,
                amount,
                currency: "CNY".into(),
                offer_code,
                discount,
            },
            None,
        );
        c.lifetime += amount;
        c.visits += 1;
        if kind == VisitType::Treatment && self.rng.chance(super::satisfaction::ANSWER_SHARE) {
            let answered = at + self.rng.range(HOUR, 4 * HOUR);
            let fatigue = self.total_fatigue(c, answered);
            let (kind, score) = super::satisfaction::answer(&mut self.rng, fatigue);
            self.stats.satisfaction.record(kind, score);
            let visit_event_id = Some(visit_id);
            let body = EventBody::Feedback {
                kind,
                score,
                visit_event_id,
                channel: Some(Channel::Wechat),
            };
            self.emit(answered, body, None);
        }
        if kind != VisitType::FollowUp {
            if c.recall_booked {
                self.stats.visits_after_recall += 1;
            } else {
                self.stats.visits_natural += 1;
            }
            c.recall_booked = false;
        }
        // At the clinic, an opted-out customer sometimes asks for messages again.
        for ch in Channel::ALL {
            let bit = 1 << ch.index();
            if c.unsubscribed & bit != 0 && self.rng.chance(p.resubscribe_on_visit) {
                c.unsubscribed &= !bit;
                let when = at + self.rng.range(30 * MINUTE, 3 * HOUR);
                self.reply(when, ch, None, ReplyClass::Resubscribe);
            }
        }
    }

    fn schedule_after(&mut self, c: &mut Customer, kind: VisitType) {
        let p = self.p;
        let d = self.day.index;
        match kind {
            VisitType::Consultation => {
                if self.rng.chance(p.prospect_conversion) {
                    c.next_visit = Some(d + self.rng.range(3, 22) as u32);
                    c.next_is_consultation = false;
                    c.prospect = false;
                } else {
                    c.next_visit = None;
                    c.churned = true;
                    self.stats.churn_decisions += 1;
                }
            }
            VisitType::Treatment => {
                if self.rng.chance(p.care_message_share) {
                    c.care = Some(d + 1);
                }
                if matches!(c.treatment, Treatment::Botox | Treatment::Filler)
                    && self.rng.chance(p.follow_up_share)
                {
                    c.follow_up = Some(d + self.rng.range(11, 18) as u32);
                }
                if self.rng.chance(p.treatment_switch) {
                    let others: Vec<Treatment> = Treatment::ALL
                        .into_iter()
                        .filter(|t| *t != c.treatment)
                        .collect();
                    c.treatment = *self.rng.pick(&others);
                }
                let total = self.total_fatigue(c, self.day.start + 12 * HOUR);
                let rested = fatigue_factor(total, p.fatigue_total_tolerance);
                if self.rng.chance(churn_probability(p, rested)) {
                    c.next_visit = None;
                    c.churned = true;
                    self.stats.churn_decisions += 1;
                } else {
                    let gap = next_gap_days(&mut self.rng, p, c.treatment, c.cadence_factor as f64);
                    c.next_visit = Some(d + gap.round() as u32);
                    c.churned = false;
                }
            }
            VisitType::FollowUp => {}
        }
    }

    /// Brings the fatigue counts to time `t` and returns their sum.
    fn total_fatigue(&self, c: &mut Customer, t: i64) -> f64 {
        if t > c.fatigue_at {
            for f in &mut c.fatigue {
                *f = decayed(*f as f64, t - c.fatigue_at, self.p.fatigue_half_life_days) as f32;
            }
            c.fatigue_at = t;
        }
        c.fatigue.iter().map(|f| *f as f64).sum()
    }

    /// Whether the obeying sender holds back a marketing send at `at` on `ch`.
    fn restricted(
        &self,
        c: &Customer,
        ch: Channel,
        at: i64,
        campaign: &Option<String>,
    ) -> Option<AllowanceState> {
        let blocks = |a: &Allow| match a.state {
            AllowanceState::Open => false,
            AllowanceState::Suppressed => true,
            AllowanceState::Capped | AllowanceState::Throttled => {
                a.allowed_from.is_none_or(|f| at < f)
            }
        };
        let a = &c.allowance[ch.index()];
        if blocks(a) {
            return Some(a.state);
        }
        let camp = campaign
            .as_ref()
            .and_then(|id| self.campaign_throttles.get(id));
        camp.filter(|a| blocks(a)).map(|a| a.state)
    }

    /// Whether the sender's own record already holds a full cap window at `at`.
    fn own_cap_full(&self, c: &Customer, ch: Channel, at: i64) -> bool {
        let (limit, window) = match self.policies {
            Some(p) => {
                let rule = p.effective(&self.who, at).policy.caps[ch.index()];
                (rule.limit, rule.window.as_ms())
            }
            None => self.p.sender_caps[ch.index()],
        };
        if limit == 0 || limit as usize > SENDER_CAP_MEMORY {
            return false;
        }
        let in_window = c.sent[ch.index()]
            .iter()
            .filter(|t| **t > at - window && **t <= at)
            .count();
        in_window >= limit as usize
    }

    fn send(&mut self, c: &mut Customer, s: Planned) {
        let p = self.p;
        let ch = s.channel;
        let i = ch.index();
        let marketing = s.purpose == Purpose::Marketing;
        if marketing && p.obey_throttle {
            let restricted = self.restricted(c, ch, s.at, &s.campaign).or_else(|| {
                self.own_cap_full(c, ch, s.at)
                    .then_some(AllowanceState::Capped)
            });
            if let Some(state) = restricted {
                if self.rng.chance(p.rogue_share) {
                    self.stats.rogue += 1;
                } else {
                    self.stats.skipped[state.index()] += 1;
                    if let Some(r) = s.recall {
                        // The recall goes out on the next day instead.
                        c.pending = Some(r);
                    }
                    return;
                }
            }
        }
        // The message id is the send's event id.
        let msg = self.next_id();
        self.push(
            msg.clone(),
            s.at,
            EventBody::Send {
                channel: ch,
                message_id: msg.clone(),
                campaign_id: s.campaign.clone(),
                purpose: s.purpose,
                cost: None,
            },
            None,
        );
        self.stats.sends[i][usize::from(!marketing)] += 1;
        if marketing {
            let oldest = c.sent[i].iter_mut().min().expect("SENDER_CAP_MEMORY > 0");
            *oldest = s.at;
        }

        // Fatigue: this send counts (service messages a little).
        let total = self.total_fatigue(c, s.at) + if marketing { 1.0 } else { 0.3 };
        c.fatigue[i] += if marketing { 1.0 } else { 0.3 };
        let fat = fatigue_factor(c.fatigue[i] as f64, p.fatigue_tolerance[i])
            * fatigue_factor(total, p.fatigue_total_tolerance).sqrt();

        let opted_out = c.unsubscribed & (1 << i) != 0;
        if opted_out {
            if marketing && self.rng.chance(p.annoyed_reply_rate) {
                let at = s.at + self.rng.range(5 * MINUTE, 2 * HOUR);
                let text = *self.rng.pick(ANNOYED_TEXTS);
                self.reply_text(at, ch, Some(&msg), ReplyClass::Unsubscribe, text);
            }
            return;
        }

        // Seen when the customer is active, a message is clicked more.
        let active = self.in_active_window(c, s.at);
        let timing = if active {
            p.active_click_boost
        } else {
            p.inactive_click_factor
        };
        let arm = usize::from(!c.recall_at_send_after);
        // A recall: does the customer book?
        let mut booked = false;
        if let Some(r) = s.recall {
            self.stats.recall_sends += 1;
            self.stats.recall_timing[arm][0] += 1;
            let mut chance = p.response[r.segment.index()]
                * (c.pref[i] as f64).sqrt().clamp(0.5, 1.6)
                * fat.sqrt()
                * timing.sqrt();
            if r.stage == Stage::FollowUp {
                chance *= p.follow_up_response_factor;
            }
            if c.churned {
                chance *= p.churned_response_factor;
            }
            if self.rng.chance(chance) {
                booked = true;
                let delay = self
                    .rng
                    .lognormal(p.response_median_days, p.response_sigma)
                    .clamp(1.0, 50.0);
                let fired_day = ((r.fired_at - self.start_ms).max(0) / DAY) as u32;
                let day = (fired_day + delay.round() as u32).max(self.day.index + 1);
                if c.next_visit.is_none_or(|n| n > day) {
                    c.next_visit = Some(day);
                    c.next_is_consultation = false;
                }
                c.recall_booked = true;
                c.recall_offer = Some(r.segment);
                c.churned = false;
                self.stats.recall_bookings += 1;
                self.stats.recall_timing[arm][3] += 1;
            }
        }

        let service = if marketing { 1.0 } else { 1.3 };
        let pref = c.pref[i] as f64;
        let p_open = (p.open_rate[i] * pref.sqrt() * fat.sqrt() * service).min(0.95);
        let p_click = (p.click_rate[i] * pref * fat * timing * if marketing { 1.0 } else { 0.5 })
            .min(p_open * 0.9);
        let opened = booked || self.rng.chance(p_open);
        let mut last = s.at;
        if opened {
            let delay = (self.rng.lognormal(25.0, 1.0) * MINUTE as f64) as i64;
            last = s.at + delay.clamp(MINUTE, 6 * HOUR);
            // Outside the active window, often read when the window comes.
            let window = self.day.start + (c.peak as i64 - 1) * HOUR;
            if !active && window > s.at && self.rng.chance(p.open_in_window_share) {
                last = window + self.rng.range(0, 3 * HOUR);
            }
            if s.recall.is_some() {
                self.stats.recall_timing[arm][1] += 1;
            }
            self.emit(
                last,
                EventBody::Open {
                    channel: ch,
                    message_id: msg.clone(),
                    campaign_id: s.campaign.clone(),
                },
                None,
            );
            let clicks = if booked {
                p.click_rate[i] > 0.0 && self.rng.chance(0.6)
            } else {
                p_open > 0.0 && self.rng.chance(p_click / p_open)
            };
            if clicks {
                if s.recall.is_some() {
                    self.stats.recall_timing[arm][2] += 1;
                }
                last += self.rng.range(30_000, 20 * MINUTE);
                self.emit(
                    last,
                    EventBody::Click {
                        channel: ch,
                        message_id: msg.clone(),
                        campaign_id: s.campaign.clone(),
                    },
                    None,
                );
            }
        }
        let reply_at = last + self.rng.range(2 * MINUTE, 90 * MINUTE);
        if booked {
            if self.rng.chance(0.4) {
                let text = *self.rng.pick(BOOKING_TEXTS);
                self.reply_text(reply_at, ch, Some(&msg), ReplyClass::Positive, text);
            }
            return;
        }
        let p_unsub = if marketing {
            p.unsubscribe_rate[i] * (1.0 + p.unsubscribe_fatigue_boost * (1.0 - fat))
        } else {
            0.0
        };
        let p_pos = p.positive_reply_rate * pref * fat;
        let u = self.rng.f64();
        if u < p_unsub {
            c.unsubscribed |= 1 << i;
            self.reply(reply_at, ch, Some(&msg), ReplyClass::Unsubscribe);
        } else if u < p_unsub + p_pos {
            self.reply(reply_at, ch, Some(&msg), ReplyClass::Positive);
        } else if u < p_unsub + p_pos + p.neutral_reply_rate {
            self.reply(reply_at, ch, Some(&msg), ReplyClass::Neutral);
        }
    }
}

/// Events of one kind in a slice (for summaries and tests).
pub fn count_kind(events: &[SimEvent], kind: EventKind) -> usize {
    events.iter().filter(|e| e.event.kind() == kind).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapse::domain::replies::classify;
    use std::collections::HashSet;

    fn start() -> NaiveDate {
        NaiveDate::from_ymd_opt(2025, 1, 1).unwrap()
    }

    fn population(seed: u64, customers: u32, days: u32) -> Population {
        population_with(Params::default(), seed, customers, days)
    }

    fn population_with(params: Params, seed: u64, customers: u32, days: u32) -> Population {
        Population::new(
            params,
            seed,
            customers,
            3,
            days,
            chrono_tz::Asia::Shanghai,
            start(),
            2_000_000,
        )
    }

    fn run(pop: &mut Population, days: u32) -> Vec<SimEvent> {
        let mut out = Vec::new();
        for d in 0..days {
            pop.day(d, &mut out);
        }
        out
    }

    #[test]
    fn fatigue_is_one_when_rested_falls_with_over_contact_and_recovers_with_rest() {
        assert_eq!(fatigue_factor(0.0, 4.0), 1.0);
        assert_eq!(fatigue_factor(4.0, 4.0), 1.0);
        assert!((fatigue_factor(8.0, 4.0) - 0.5).abs() < 1e-12);
        assert!((fatigue_factor(12.0, 4.0) - 0.25).abs() < 1e-12);
        // Monotone non-increasing in recent sends.
        let mut prev = 1.0;
        for i in 0..100 {
            let f = fatigue_factor(i as f64 * 0.3, 2.0);
            assert!(f <= prev && f > 0.0);
            prev = f;
        }
        // Rest: a burst of 12 sends decays (half-life 7 d) and engagement recovers.
        let burst = 12.0;
        let after = |days: i64| fatigue_factor(decayed(burst, days * DAY, 7.0), 4.0);
        assert!(after(0) < 0.3);
        assert!(after(7) > after(0));
        assert!(after(14) > after(7));
        assert_eq!(after(14), 1.0); // 12 → 3 after two half-lives: rested
        assert!((decayed(8.0, 7 * DAY, 7.0) - 4.0).abs() < 1e-9);
        assert_eq!(decayed(8.0, -5, 7.0), 8.0);
        // Churn grows with fatigue.
        let p = Params::default();
        assert!(churn_probability(&p, 0.2) > churn_probability(&p, 1.0));
        assert_eq!(churn_probability(&p, 1.0), p.churn_per_visit);
    }

    #[test]
    fn cadences_follow_the_treatment_with_late_drifters() {
        let p = Params::default();
        for (t, days) in [
            (Treatment::Botox, 120.0),
            (Treatment::Filler, 270.0),
            (Treatment::Laser, 30.0),
            (Treatment::SkinCare, 30.0),
        ] {
            let mut rng = SimRng::new(9);
            let mut gaps: Vec<f64> = (0..20_000)
                .map(|_| next_gap_days(&mut rng, &p, t, 1.0))
                .collect();
            gaps.sort_by(f64::total_cmp);
            let median = gaps[gaps.len() / 2];
            assert!(
                median > days * 0.95 && median < days * 1.15,
                "{t:?}: median {median}"
            );
            // Some run late enough to be at risk (1.2×) or lapsed (1.5×) before coming back.
            let late = gaps.iter().filter(|g| **g > 1.5 * days).count() as f64 / gaps.len() as f64;
            assert!(late > 0.08 && late < 0.3, "{t:?}: late share {late}");
            assert!(gaps[0] >= 7.0);
        }
    }

    #[test]
    fn reply_texts_mean_what_the_model_says() {
        for t in UNSUBSCRIBE_TEXTS.iter().chain(ANNOYED_TEXTS) {
            assert_eq!(classify(t), ReplyClass::Unsubscribe, "{t}");
        }
        for t in RESUBSCRIBE_TEXTS {
            assert_eq!(classify(t), ReplyClass::Resubscribe, "{t}");
        }
        for t in POSITIVE_TEXTS.iter().chain(BOOKING_TEXTS) {
            assert_eq!(classify(t), ReplyClass::Positive, "{t}");
        }
        for t in NEUTRAL_TEXTS {
            assert_eq!(classify(t), ReplyClass::Neutral, "{t}");
        }
    }

    #[test]
    fn tenants_split_the_customers() {
        assert_eq!(tenant_sizes(10_000, 3).iter().sum::<u32>(), 10_000);
        let s = tenant_sizes(10_000, 3);
        assert!(s[0] > s[1] && s[1] > s[2], "{s:?}");
        assert_eq!(tenant_sizes(2, 2), vec![1, 1]);
        assert_eq!(tenant_sizes(4, 3), vec![2, 1, 1]);
        assert_eq!(tenant_sizes(7, 1), vec![7]);
        assert_eq!(tenant_name(0), "meiyan");
        assert_eq!(tenant_name(20), "brand-21");
    }

    #[test]
    fn the_same_seed_gives_the_same_events_and_another_seed_others() {
        let a = run(&mut population(7, 300, 60), 60);
        let b = run(&mut population(7, 300, 60), 60);
        assert!(a.len() > 1000, "{}", a.len());
        assert_eq!(a, b);
        let c = run(&mut population(8, 300, 60), 60);
        assert_ne!(a, c);
        // A customer's life does not depend on the population size: the
        // customers of a 300-customer population live the same lives in a
        // 900-customer one (same seed, same start).
        let big = run(&mut population(7, 900, 60), 60);
        let small_ids: HashSet<String> = a.iter().map(|e| e.event.customer.key()).collect();
        let in_big: Vec<&SimEvent> = big
            .iter()
            .filter(|e| small_ids.contains(&e.event.customer.key()))
            .collect();
        assert_eq!(a.iter().collect::<Vec<_>>(), in_big);
    }

    #[test]
    fn feedback_changes_only_the_customer_it_names() {
        let mut a = population(3, 200, 40);
        let mut b = population(3, 200, 40);
        let mut ea = Vec::new();
        let mut eb = Vec::new();
        for d in 0..40 {
            if d == 10 {
                let t = TriggerFeedback {
                    tenant: "meiyan".into(),
                    customer: "c000005".into(),
                    segment: Segment::AtRisk,
                    stage: Stage::AtRisk,
                    channel: Some(Channel::Sms),
                    fired_at: b.day_info(9).start + 15 * HOUR,
                    holdout: false,
                    send_after: None,
                };
                assert!(b.apply_trigger(&t));
                assert!(!b.apply_trigger(&TriggerFeedback {
                    customer: "c999999".into(),
                    ..t.clone()
                }));
                assert!(!b.apply_trigger(&TriggerFeedback {
                    tenant: "nope".into(),
                    ..t
                }));
            }
            a.day(d, &mut ea);
            b.day(d, &mut eb);
        }
        let others = |v: &[SimEvent]| -> Vec<SimEvent> {
            v.iter()
                .filter(|e| e.event.customer.key() != "meiyan/c000005")
                .cloned()
                .collect()
        };
        assert_eq!(others(&ea), others(&eb));
        // The triggered customer got a recall send on SMS on day 10.
        let day10 = b.day_info(10);
        assert!(eb.iter().any(|e| e.event.customer.key() == "meiyan/c000005"
            && matches!(&e.event.body, EventBody::Send { channel: Channel::Sms, campaign_id: Some(c), .. } if c.contains("recall"))
            && (day10.start..day10.end).contains(&e.event.occurred_at)));
        assert_eq!(b.stats.triggers[Segment::AtRisk.index()], 1);
        assert_eq!(b.stats.foreign_feedback, 2);
    }

    /// Every customer of the first tenant triggered (LOW_VALUE_LAPSED) on day
    /// 5 of 120: (recall visits, customers with another visit within 60 days
    /// of theirs). Checks every redeemed offer on the way.
    fn recall_and_again(repurchase_share: f64) -> (usize, usize) {
        let params = Params {
            repurchase_share,
            ..Params::default()
        };
        let mut p = population_with(params, 5, 300, 120);
        let mut ev = Vec::new();
        for d in 0..120 {
            if d == 5 {
                let (tenant, size) = (p.tenants[0].clone(), p.sizes[0]);
                for local in 1..=size {
                    p.apply_trigger(&TriggerFeedback {
                        tenant: tenant.clone(),
                        customer: customer_name(local),
                        segment: Segment::LowValueLapsed,
                        stage: Stage::Lapsed,
                        channel: Some(Channel::Wechat),
                        fired_at: p.day_info(4).start + 15 * HOUR,
                        holdout: false,
                        send_after: None,
                    });
                }
            }
            p.day(d, &mut ev);
        }
        let mut redeemed: HashMap<String, i64> = HashMap::new();
        let mut again = std::collections::HashSet::new();
        for e in &ev {
            let EventBody::Visit {
                amount,
                offer_code,
                discount,
                visit_type,
                ..
            } = &e.event.body
            else {
                continue;
            };
            let key = e.event.customer.key();
            if let Some(code) = offer_code {
                assert_eq!(code, "coupon-10pct");
                assert_eq!(*discount, Some(amount / 10).filter(|d| *d > 0));
                assert!(key.starts_with(&format!("{}/", p.tenants[0])), "{key}");
                assert!(redeemed.insert(key.clone(), e.event.occurred_at).is_none());
            } else if let Some(at) = redeemed.get(&key) {
                let t = e.event.occurred_at;
                if *visit_type != VisitType::FollowUp && t > *at && t - at <= 60 * DAY {
                    again.insert(key);
                }
            }
        }
        (redeemed.len(), again.len())
    }

    #[test]
    fn recall_visits_redeem_the_triggers_offer_and_some_come_back_again() {
        let (recalled, natural) = recall_and_again(0.0);
        assert!(recalled >= 10, "{recalled} recall visits");
        let (recalled_too, again) = recall_and_again(1.0);
        assert!(recalled_too >= 10, "{recalled_too} recall visits");
        let (a, b) = (
            natural as f64 / recalled as f64,
            again as f64 / recalled_too as f64,
        );
        assert!(
            b > a + 0.2,
            "came back within 60 days: {b} (repurchase) vs {a} (cadence only)"
        );
    }

    #[test]
    fn an_obeying_sender_skips_restricted_channels_but_rogues_remain() {
        let mut p = population(11, 500, 30);
        // Suppress SMS and WeChat for everyone from the start.
        for t in 0..3 {
            let size = p.sizes[t];
            let tenant = p.tenants[t].clone();
            for local in 1..=size {
                for ch in [Channel::Sms, Channel::Wechat] {
                    assert!(p.apply_throttle(&ThrottleFeedback {
                        tenant: tenant.clone(),
                        customer: Some(customer_name(local)),
                        channel: Some(ch),
                        campaign: None,
                        state: AllowanceState::Suppressed,
                        allowed_from: None,
                    }));
                }
            }
        }
        let ev = run(&mut p, 30);
        let marketing_sms = ev
            .iter()
            .filter(|e| {
                matches!(
                    &e.event.body,
                    EventBody::Send {
                        channel: Channel::Sms | Channel::Wechat,
                        purpose: Purpose::Marketing,
                        ..
                    }
                )
            })
            .count() as u64;
        let skipped = p.stats.skipped[AllowanceState::Suppressed.index()];
        assert!(skipped > 100, "{skipped}");
        assert_eq!(marketing_sms, p.stats.rogue);
        let share = p.stats.rogue as f64 / (p.stats.rogue + skipped) as f64;
        assert!(share > 0.005 && share < 0.08, "{share}");
        // Service messages are never held back.
        assert!(
            p.stats.sends[Channel::Wechat.index()][1] + p.stats.sends[Channel::Sms.index()][1] > 0
        );
    }

    #[test]
    fn the_obeying_sender_keeps_the_caps_except_for_its_rogue_sends() {
        let mut pop = population(5, 600, 60);
        let ev = run(&mut pop, 60);
        let caps = pop.params.sender_caps;
        let mut times: std::collections::BTreeMap<(String, usize), Vec<i64>> = Default::default();
        for e in &ev {
            if let EventBody::Send {
                channel,
                purpose: Purpose::Marketing,
                ..
            } = &e.event.body
            {
                times
                    .entry((e.event.customer.key(), channel.index()))
                    .or_default()
                    .push(e.event.occurred_at);
            }
        }
        let mut over = 0u64;
        for ((_, ch), ts) in &times {
            let (limit, window) = caps[*ch];
            for (k, t) in ts.iter().enumerate() {
                let before = ts[..k].iter().filter(|u| **u > t - window).count();
                if before >= limit as usize {
                    over += 1;
                }
            }
        }
        assert!(pop.stats.skipped[AllowanceState::Capped.index()] > 0);
        assert!(over > 0, "rogue sends show up as violations");
        assert_eq!(over, pop.stats.rogue, "every over-cap send is a rogue one");
    }

    /// With lapse's policies, the sender keeps each customer's caps under
    /// their experiment arm: WeChat once a week for one arm, twice a day (the
    /// tenant's) for the control.
    #[test]
    fn the_sender_keeps_the_caps_of_the_customers_experiment_arm() {
        let begin = start();
        let end = begin + chrono::Days::new(60);
        let cfg: lapse::domain::policy::PolicyConfig = toml::from_str(&format!(
            "[[experiments]]\nname = \"wechat-weekly\"\ntenant = \"meiyan\"\n\
             start = \"{begin}T00:00\"\nend = \"{end}T00:00\"\n\
             [[experiments.arms]]\nname = \"control\"\nshare = 0.5\n\
             [[experiments.arms]]\nname = \"once-a-week\"\nshare = 0.5\n\
             caps.WECHAT = {{ limit = 1, window = \"7d\" }}\n"
        ))
        .unwrap();
        let policies = Arc::new(Policies::new(&cfg).unwrap());
        let e = policies.experiments().all().next().unwrap().clone();
        let mut pop = Population::new(
            Params {
                rogue_share: 0.0,
                ..Params::default()
            },
            7,
            600,
            3,
            60,
            chrono_tz::Asia::Shanghai,
            begin,
            2_000_000,
        )
        .with_policies(policies);
        let ev = run(&mut pop, 60);
        let mut wechat: std::collections::BTreeMap<CustomerRef, Vec<i64>> = Default::default();
        for x in &ev {
            if let EventBody::Send {
                channel: Channel::Wechat,
                purpose: Purpose::Marketing,
                ..
            } = &x.event.body
            {
                let c = x.event.customer.clone();
                wechat.entry(c).or_default().push(x.event.occurred_at);
            }
        }
        let within_a_week = |ts: &Vec<i64>| ts.windows(2).filter(|w| w[1] - w[0] < 7 * DAY).count();
        let (mut weekly, mut control) = (0, 0);
        for (c, ts) in &wechat {
            if c.tenant != "meiyan" {
                continue;
            }
            if e.arms[e.arm_of(c)].name == "once-a-week" {
                weekly += ts.len();
                assert_eq!(within_a_week(ts), 0, "{c}: {ts:?}");
            } else {
                control += within_a_week(ts);
            }
        }
        assert!(weekly > 0 && control > 0, "{weekly} {control}");
    }

    #[test]
    fn events_stay_inside_their_day_with_unique_ids_and_a_realistic_mix() {
        let mut pop = population(42, 2000, 90);
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for d in 0..90 {
            out.clear();
            let day = pop.day(d, &mut out);
            assert!(out
                .windows(2)
                .all(|w| w[0].event.occurred_at <= w[1].event.occurred_at));
            for e in &out {
                assert!((day.start..day.end).contains(&e.event.occurred_at));
                assert!(
                    seen.insert(e.event.event_id.clone()),
                    "{}",
                    e.event.event_id
                );
                assert_eq!(e.text.is_some(), e.event.kind() == EventKind::Reply);
            }
        }
        let s = &pop.stats;
        for k in EventKind::ALL {
            assert!(s.events[k.index()] > 0, "no {k:?}");
        }
        let sends = s.events[EventKind::Send.index()] as f64;
        let opens = s.events[EventKind::Open.index()] as f64;
        let clicks = s.events[EventKind::Click.index()] as f64;
        assert!(
            opens / sends > 0.25 && opens / sends < 0.7,
            "{}",
            opens / sends
        );
        assert!(
            clicks / sends > 0.01 && clicks / sends < 0.1,
            "{}",
            clicks / sends
        );
        assert!(
            s.replies[0] > 0 && s.replies[1] > 0 && s.replies[2] > 0 && s.replies[3] > 0,
            "{:?}",
            s.replies
        );
        assert!(s.churn_decisions > 0);
        assert!(pop.high_value() > 0);
        // Every channel is used.
        for ch in Channel::ALL {
            assert!(s.sends[ch.index()][0] > 0, "{ch:?}");
        }
    }
}
