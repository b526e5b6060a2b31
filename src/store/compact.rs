//! Format 2: the compact stored layout of a [`CustomerState`] (what follows the
//! revision prefix and the format byte in `blob.rs`).
//!
//! postcard (format 1) spends 6–7 bytes on every millisecond timestamp, a tag
//! byte on every `Option` and a byte on every small enum. This layout is written
//! by hand instead:
//!
//! * **Times** are stored relative to one base time per blob (the customer's
//!   latest visit or engagement, itself a zigzag varint of ms), as zigzag
//!   varints (written `T` below) in a unit: the greatest common divisor of every
//!   time's distance to the base. Times at second or minute precision make it
//!   1 s or 1 min or more; a single time at millisecond precision makes it 1 ms
//!   for the whole blob. Sorted lists store their latest element and then the
//!   gaps back in time. Times that usually equal another one (a channel's last
//!   send and the reference time of its counts, the last visit and the latest
//!   recent visit) are a code instead of a value; the other times of a channel
//!   are deltas to its reference time.
//! * **Decayed counts** keep their exact `f32` bits: the domain computes them in
//!   `f32`, so storing them is lossless and a store round trip changes nothing
//!   (a run interrupted by a crash folds the same bits as an uninterrupted one).
//!   Each of the 8 counts of a channel is a code: `+0.0`, the same bits as the
//!   count before it, or its 4 little-endian bytes.
//! * **Options and small enums** are bits of a few flag bytes.
//! * **Idempotence**: the watermarks as zigzag deltas to the previous topic's
//!   partition and offset; per topic the remembered event ids as a time list
//!   and their 6-byte hashes.
//! * The outbox (empty at rest) stays postcard, behind its length.
//! * What each channel's last decision said beyond its control (reason, cap,
//!   rates, cause) is kept so that it can be published again as an exact
//!   repeat: the reason as a code into [`REASONS`], the window in minutes.
//!
//! Lossless: `decode(encode(s)) == s` for every state, bit for bit, and `encode`
//! is a function of the state alone, so re-encoding a decoded blob gives the
//! same bytes. Decoding checks every code and length: a length prefix is never
//! trusted beyond what the remaining bytes can hold, reserved bits must be 0,
//! and trailing bytes are an error.
//!
//! ```text
//! body     := h0:u8 base:ivar unit:var presence:u16le [visits] channel* control*
//!             watermark* seen [episode] [episode] [timer_due:T] [touches] [exposures]
//!             [measures] [outbox] [last] [send_after] [hours] [feedback] [offers]
//!             (with h0 bit 1, an extension byte h1 follows h0, before base)
//! h0       := bit 0 seen (else: ring, as earlier versions wrote it); 1 h1 follows;
//!             2 visits present; 3 timer_due; 4 recall.current; 5 recall.previous;
//!             6 outbox; 7 last decisions' details (absent in states written before them)
//! h1       := bit 0 campaign touches; 1 active hours; 2 experiment exposures;
//!             3 send_after of outbox triggers; 4 feedback; 5 offers (incentive
//!             costs of outbox outcomes, repurchase watch); 6 experiment
//!             measures (only with 2); bit 7 = 0 (for later sections);
//!             never 0 (absent in states written before it: read as 0)
//! unit     := (ms / 1000) << 1 | 1 when a whole number of seconds, else ms << 1
//! presence := bits 0-4 channels, 5-9 controls, 10-14 watermarks (by index); 15 = 0
//! visits   := v0:u8 v1:u8 count:var spend:ivar recent [first_at:T] [last_at:T]
//!             [last_treatment_at:T] [currency:str] [last_treatment:str]
//!   v0: bits 0-1 first_at (none, = oldest recent, explicit); 2-3 last_at (none,
//!       = latest recent, explicit); 4-5 last_treatment_at (none, = last_at,
//!       explicit); 6 currency; 7 last_treatment.  v1: bits 0-1 last visit type
//!       (none, consultation, treatment, follow-up); the rest 0.
//! list     := n:var [latest:T (n-1)×gap:var]          (ascending list, gaps back)
//! channel  := at:T a:u8 b:u8 c:u8 count-literals:(4 bytes each)
//!             last-times:(ivar to at each) [service:ivar] [unsub:ivar] [resub:ivar]
//!   a: base-3 codes of last send/open/click/reply (none, = at, explicit), bit 7 service
//!   b, c: base-3 codes of the short / long counts sends, opens, clicks, replies
//!       (+0.0, same bits as the count before, literal); bit 7 unsub / resub
//! control  := k0:u8 violations:var sends:list [since:T until:ivar-to-since]
//!             [seq:var [allowed_from:T] [decided_at:(ivar to the latest send) or T]]
//!   k0: bit 0 spell; 1 below_floor; 2 published; 3-4 its state; 5 its allowed_from;
//!       6 its decided_at (absent in states written before it existed); 7 decided_at
//!       is relative to the latest send
//! watermark:= partition:ivar offset:ivar            (deltas to the previous present one)
//! seen     := sp:var (topic×(list n×6 bytes))* (evicted_until:T)* [legacy:ring]
//!   sp: bits 0-4 topics with ids, 5-9 topics with evicted_until, 10 legacy ids;
//!   the rest 0. A topic's ids: their times as a list, then their hashes in order.
//! ring     := n:var n×6 bytes              (earlier: hashes, no times, topics mixed)
//! episode  := e0:u8 start:T [experiment:str] n:var n×(s0:u8 attempt:var due:T
//!             fired:ivar-to-due cost:ivar)
//!   e0: bits 0-1 arm (none, treatment, holdout); 2 experiment.  s0: bits 0-1
//!       stage; 2-3 segment; 4 skipped; 5-6 outcome (none, recalled, not, retracted)
//! touches  := times:list n×(channel:u8 campaign:6 bytes)  (n ≥ 1, in the list's order)
//! exposures:= n:var n×(at:T experiment:str arm:str)   (1 ≤ n ≤ MAX_EXPOSURES, in state order)
//! measures := k:var n×(k×ivar)   (n: the exposures' count; each exposure's first k
//!             `Measures` fields in `measure::Measures::to_fields` order, the rest 0;
//!             1 ≤ k ≤ FIELDS, the smallest k that holds every non-zero field)
//! outbox   := n:var n bytes of postcard(Vec<Output>)  (without send_after: see below)
//! last     := l0:u8 (l1:u8 [reason:str] [cap:var window:ivar] [short:f64le
//!             baseline:f64le] sends:ivar [cause:str])*   (one per bit of l0)
//!   l0: bit i: channel i has one (only with a published decision); 5-7 = 0
//!   l1: bits 0-3 reason code (index into REASONS; 15: the reason follows as a
//!       string); 4 cap; 5 rates; 6 cause; 7 the window is in minutes (else ms)
//! hours    := at:T width:u8 mask:u24le (weight per set bit, hour 0 first)
//!   the engagement histogram by local hour; an hour whose weight is +0.0 is not
//!   set. width 2: each weight is the high 16 bits of its f32 (the domain keeps
//!   them at bfloat16 precision), little-endian; width 4: its f32le bits (only
//!   for weights the domain did not round)
//! send_after := n:var n×(index:var at:T)
//!   the outbox triggers' `send_after` (a field postcard(Vec<Output>) predates),
//!   by ascending index into the outbox; n ≥ 1
//! feedback := f0:u8 [at:T score:u8] [partition:ivar offset:ivar]
//!             [ids: n:var latest:ivar (n-1)×gap:var n×6 bytes] [evicted_until:ivar]
//!   the latest feedback and the feedback topic's idempotence (a topic the
//!   presence and seen bits predate; its times in minutes, as in `seen`).
//!   f0: bit 0 latest feedback; 1 its kind is CSAT (else NPS; only with bit 0);
//!   2 watermark; 3 remembered ids (n ≥ 1); 4 evicted_until; 5-7 = 0; never 0
//! offers   := o0:u8 [n:var n×(index:var cost:ivar)] [watch]
//!   o0: bit 0 the outbox outcomes' `incentive_cost` (a field postcard(Vec<Output>)
//!   predates; by ascending index, n ≥ 1, only the non-zero ones); 1 the
//!   repurchase watch; the rest 0, never 0
//! watch    := w0:u8 attempt:var start:T experiment:str recalled_at:T window:var
//!   w0: bits 0-1 stage; 2-3 segment; 4 arm is HOLDOUT (else TREATMENT); 5 the
//!   window is in minutes (else ms); the rest 0
//! ```

use crate::domain::allowance::{
    AllowanceState, ChannelControl, DecisionDetail, Published, ThrottleSpell, REASONS,
};
use crate::domain::contact_hours::ActiveHours;
use crate::domain::cross_channel::{CampaignTouch, MAX_CAMPAIGN_TOUCHES};
use crate::domain::engagement::{ChannelEngagement, Counts};
use crate::domain::event::{Channel, EventKind, FeedbackKind, VisitType, INPUT_KINDS};
use crate::domain::experiment::exposure::{Exposure, MAX_EXPOSURES};
use crate::domain::experiment::measure::{Measures, FIELDS};
use crate::domain::feedback::LatestFeedback;
use crate::domain::lapse::{Segment, Stage};
use crate::domain::output::Output;
use crate::domain::recall::{Arm, Episode, OutcomeKind, RecallState, RepurchaseWatch, StageRecord};
use crate::domain::state::{
    Applied, CustomerState, IdHash, SeenId, SeenIds, Watermark, SEEN_AT_UNIT_MS,
};
use crate::domain::visits::Visits;

/// The h1 bits this version reads (the others are reserved).
const H1_KNOWN: u8 = 0b0111_1111;

/// The input topics whose watermarks and remembered ids the header's presence
/// and seen bits cover (sends to visits); the feedback topic, added later,
/// keeps its own in the feedback section.
const HEADER_TOPICS: usize = 5;
/// The input topic kept in the feedback section.
const FEEDBACK: EventKind = EventKind::Feedback;

/// Names of the sections, in the order [`encode_parts`] measures them.
pub const SECTIONS: [&str; 9] = [
    "header",
    "visits",
    "channels",
    "allowance control",
    "idempotence",
    "recall",
    "timer, experiments, outbox, last decisions",
    "contact hours",
    "offers, repurchase",
];

/// Appends the format-2 body of `s` to `out`.
pub fn encode(s: &CustomerState, out: &mut Vec<u8>) {
    encode_parts(s, out);
}

/// Appends the body and returns the bytes each section took (see [`SECTIONS`]).
pub fn encode_parts(s: &CustomerState, out: &mut Vec<u8>) -> [usize; SECTIONS.len()] {
    let start = out.len();
    let base = pick_base(s);
    let mut e = Enc {
        out,
        base,
        unit: pick_unit(s, base),
        inexact: false,
    };
    let parts = e.state(s);
    if !e.inexact {
        return parts;
    }
    // A time the unit does not divide: only if `times` missed a field. Stay
    // lossless with 1 ms.
    debug_assert!(false, "a time of the state is missing from `times`");
    out.truncate(start);
    let mut e = Enc {
        out,
        base,
        unit: 1,
        inexact: false,
    };
    e.state(s)
}

/// Decodes a format-2 body.
pub fn decode(bytes: &[u8]) -> Result<CustomerState, String> {
    let mut s = CustomerState::default();
    decode_into(bytes, &mut s)?;
    Ok(s)
}

/// Decodes a format-2 body into `out` (every field written), so that a
/// caller holding a boxed state moves no 2.7 KB struct around.
pub fn decode_into(bytes: &[u8], out: &mut CustomerState) -> Result<(), String> {
    let mut r = Dec {
        b: bytes,
        base: 0,
        unit: 1,
    };
    r.state(out).map_err(|e| format!("format 2: {e}"))?;
    if !r.b.is_empty() {
        return Err(format!("format 2: {} trailing bytes", r.b.len()));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Times
// ---------------------------------------------------------------------------

/// The time the others are stored relative to: the latest visit or engagement.
fn pick_base(s: &CustomerState) -> i64 {
    let v = &s.visits;
    v.last_at
        .into_iter()
        .chain(v.recent.last().copied())
        .chain(s.channels.iter().flatten().map(|c| c.at))
        .max()
        .or(s.timer_due)
        .unwrap_or(0)
}

/// The unit of the times: the greatest common divisor of their distances to
/// `base` (1 when they are all at the base).
fn pick_unit(s: &CustomerState, base: i64) -> i64 {
    let mut g = 0u64;
    times(s, &mut |t| {
        if g != 1 {
            g = gcd(g, t.wrapping_sub(base).unsigned_abs());
        }
    });
    // 2^63 (one distance of i64::MIN alone) is no i64: use 1 ms.
    i64::try_from(g).ok().filter(|g| *g > 0).unwrap_or(1)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Calls `f` with every time stored in `s` (all of them: the unit must divide each).
/// How many measure fields the measures section writes per exposure: up to
/// the last one any exposure has non-zero (0: no section).
fn measure_width(exposures: &[Exposure]) -> usize {
    exposures
        .iter()
        .map(|x| {
            let f = x.measures.to_fields();
            f.iter().rposition(|v| *v != 0).map_or(0, |i| i + 1)
        })
        .max()
        .unwrap_or(0)
}

/// The outbox's triggers that carry a `send_after`: (index, time).
fn send_afters(outbox: &[Output]) -> impl Iterator<Item = (usize, i64)> + '_ {
    outbox.iter().enumerate().filter_map(|(i, o)| match o {
        Output::Trigger(t) => Some((i, t.send_after?)),
        _ => None,
    })
}

/// The outbox's outcomes with a non-zero `incentive_cost`: (index, cost).
fn incentives(outbox: &[Output]) -> impl Iterator<Item = (usize, i64)> + '_ {
    outbox.iter().enumerate().filter_map(|(i, o)| match o {
        Output::Outcome(x) if x.incentive_cost != 0 => Some((i, x.incentive_cost)),
        _ => None,
    })
}

fn times(s: &CustomerState, f: &mut dyn FnMut(i64)) {
    let CustomerState {
        visits,
        channels,
        applied: _,
        controls,
        recall,
        outbox,
        timer_due,
        campaign_touches,
        active_hours,
        exposures,
        feedback,
    } = s;
    campaign_touches.iter().for_each(|x| f(x.at));
    feedback.iter().for_each(|x| f(x.at));
    exposures.iter().for_each(|x| f(x.at));
    active_hours.iter().for_each(|h| f(h.at));
    send_afters(outbox).for_each(|(_, t)| f(t));
    if let Some(w) = &recall.repurchase {
        f(w.episode_start);
        f(w.recalled_at);
    }
    let Visits {
        count: _,
        first_at,
        last_at,
        lifetime_spend: _,
        currency: _,
        last_treatment: _,
        last_treatment_at,
        last_visit_type: _,
        recent,
    } = visits;
    first_at
        .iter()
        .chain(last_at)
        .chain(last_treatment_at)
        .chain(recent)
        .chain(timer_due)
        .for_each(|t| f(*t));
    for c in channels.iter().flatten() {
        let ChannelEngagement {
            at,
            short: _,
            long: _,
            last_send,
            last_open,
            last_click,
            last_reply,
            last_service_send,
            unsubscribed_at,
            resubscribed_at,
        } = c;
        f(*at);
        [
            last_send,
            last_open,
            last_click,
            last_reply,
            last_service_send,
            unsubscribed_at,
            resubscribed_at,
        ]
        .into_iter()
        .flatten()
        .for_each(|t| f(*t));
    }
    for c in controls.iter().flatten() {
        let ChannelControl {
            sends,
            spell,
            published,
            violations: _,
            last: _,
        } = c;
        sends.iter().for_each(|t| f(*t));
        if let Some(ThrottleSpell { since, until, .. }) = spell {
            f(*since);
            f(*until);
        }
        if let Some(p) = published {
            p.allowed_from
                .into_iter()
                .chain(p.decided_at)
                .for_each(&mut *f);
        }
    }
    for e in recall.current.iter().chain(&recall.previous) {
        f(e.start);
        for r in &e.stages {
            f(r.due_at);
            f(r.fired_at);
        }
    }
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

struct Enc<'a> {
    out: &'a mut Vec<u8>,
    base: i64,
    unit: i64,
    /// A time was not a multiple of the unit away from the base.
    inexact: bool,
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Packs four codes 0..3 (base 3) into 0..=80.
fn base3(codes: [u8; 4]) -> u8 {
    codes.iter().rev().fold(0, |acc, c| acc * 3 + c)
}

fn bit(b: bool, n: u32) -> u8 {
    (b as u8) << n
}

/// Code of an optional time that usually equals `reference`: 0 none, 1 equal, 2 explicit.
fn same_or(t: Option<i64>, reference: Option<i64>) -> u8 {
    match t {
        None => 0,
        Some(t) if Some(t) == reference => 1,
        Some(_) => 2,
    }
}

impl Enc<'_> {
    fn u8(&mut self, b: u8) {
        self.out.push(b);
    }

    fn var(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.out.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.out.push(v as u8);
    }

    fn ivar(&mut self, v: i64) {
        self.var(zigzag(v));
    }

    fn str(&mut self, s: &str) {
        self.var(s.len() as u64);
        self.out.extend_from_slice(s.as_bytes());
    }

    /// A time in units from the base.
    fn q(&mut self, t: i64) -> i64 {
        let d = t.wrapping_sub(self.base);
        if d % self.unit != 0 {
            self.inexact = true;
        }
        d / self.unit
    }

    fn time(&mut self, t: i64) {
        let q = self.q(t);
        self.ivar(q);
    }

    /// `t` relative to `reference`, both in units.
    fn time_to(&mut self, t: i64, reference: i64) {
        let q = self.q(t).wrapping_sub(self.q(reference));
        self.ivar(q);
    }

    /// An ascending list: its length, the latest, then the gaps back.
    fn list(&mut self, ts: &[i64]) {
        self.var(ts.len() as u64);
        let Some(&latest) = ts.last() else { return };
        self.time(latest);
        for w in ts.windows(2).rev() {
            let gap = self.q(w[1]).wrapping_sub(self.q(w[0]));
            self.var(gap as u64);
        }
    }

    fn state(&mut self, s: &CustomerState) -> [usize; SECTIONS.len()] {
        let CustomerState {
            visits,
            channels,
            applied,
            controls,
            recall,
            outbox,
            timer_due,
            campaign_touches,
            active_hours,
            exposures,
            feedback,
        } = s;
        let RecallState {
            current,
            previous,
            repurchase,
        } = recall;
        let send_after: Vec<(usize, i64)> = send_afters(outbox).collect();
        let incentives: Vec<(usize, i64)> = incentives(outbox).collect();
        let fb = FEEDBACK.index();
        let feedback_topic = (
            applied.watermarks[fb],
            &applied.seen[fb].ids,
            applied.seen[fb].evicted_until,
        );
        let has_feedback = feedback.is_some() || feedback_topic != (None, &Vec::new(), None);
        let h1 = bit(!campaign_touches.is_empty(), 0)
            | bit(active_hours.is_some(), 1)
            | bit(!exposures.is_empty(), 2)
            | bit(!send_after.is_empty(), 3)
            | bit(has_feedback, 4)
            | bit(!incentives.is_empty() || repurchase.is_some(), 5)
            | bit(measure_width(exposures) > 0, 6);
        let has_visits = *visits != Visits::default();
        let mut marks = [self.out.len(); SECTIONS.len() + 1];
        let last: Vec<(usize, &DecisionDetail)> = controls
            .iter()
            .enumerate()
            .filter_map(|(i, c)| Some((i, c.as_ref()?.last.as_ref()?)))
            .collect();
        self.u8(1
            | bit(has_visits, 2)
            | bit(timer_due.is_some(), 3)
            | bit(current.is_some(), 4)
            | bit(previous.is_some(), 5)
            | bit(!outbox.is_empty(), 6)
            | bit(h1 != 0, 1)
            | bit(!last.is_empty(), 7));
        if h1 != 0 {
            self.u8(h1);
        }
        self.ivar(self.base);
        let unit = self.unit as u64;
        self.var(if unit % 1000 == 0 {
            (unit / 1000) << 1 | 1
        } else {
            unit << 1
        });
        let mut presence = 0u16;
        for i in 0..HEADER_TOPICS {
            presence |= (channels[i].is_some() as u16) << i;
            presence |= (controls[i].is_some() as u16) << (5 + i);
            presence |= (applied.watermarks[i].is_some() as u16) << (10 + i);
        }
        self.out.extend_from_slice(&presence.to_le_bytes());
        marks[1] = self.out.len();
        if has_visits {
            self.visits(visits);
        }
        marks[2] = self.out.len();
        for c in channels.iter().flatten() {
            self.channel(c);
        }
        marks[3] = self.out.len();
        for c in controls.iter().flatten() {
            self.control(c);
        }
        marks[4] = self.out.len();
        self.applied(applied);
        marks[5] = self.out.len();
        for e in current.iter().chain(previous) {
            self.episode(e);
        }
        marks[6] = self.out.len();
        if let Some(t) = timer_due {
            self.time(*t);
        }
        if !campaign_touches.is_empty() {
            self.campaign_touches(campaign_touches);
        }
        if !exposures.is_empty() {
            self.exposures(exposures);
            self.measures(exposures);
        }
        if !outbox.is_empty() {
            // postcard into a Vec cannot fail for these plain types.
            let body = postcard::to_allocvec(outbox).unwrap_or_default();
            self.var(body.len() as u64);
            self.out.extend_from_slice(&body);
        }
        if !last.is_empty() {
            self.last_decisions(&last);
        }
        if !send_after.is_empty() {
            self.var(send_after.len() as u64);
            for (i, t) in send_after {
                self.var(i as u64);
                self.time(t);
            }
        }
        marks[7] = self.out.len();
        if let Some(h) = active_hours {
            self.active_hours(h);
        }
        if has_feedback {
            self.feedback(*feedback, feedback_topic);
        }
        marks[8] = self.out.len();
        if h1 & 32 != 0 {
            self.offers(&incentives, repurchase.as_ref());
        }
        marks[9] = self.out.len();
        std::array::from_fn(|i| marks[i + 1] - marks[i])
    }

    fn offers(&mut self, incentives: &[(usize, i64)], watch: Option<&RepurchaseWatch>) {
        self.u8(bit(!incentives.is_empty(), 0) | bit(watch.is_some(), 1));
        if !incentives.is_empty() {
            self.var(incentives.len() as u64);
            for (i, cost) in incentives {
                self.var(*i as u64);
                self.ivar(*cost);
            }
        }
        if let Some(w) = watch {
            let minutes = w.window_ms % 60_000 == 0;
            self.u8(w.stage.index() as u8
                | (w.segment.index() as u8) << 2
                | bit(w.arm == Arm::Holdout, 4)
                | bit(minutes, 5));
            self.var(u64::from(w.attempt));
            self.time(w.episode_start);
            self.str(&w.experiment);
            self.time(w.recalled_at);
            self.ivar(if minutes {
                w.window_ms / 60_000
            } else {
                w.window_ms
            });
        }
    }

    fn feedback(
        &mut self,
        latest: Option<LatestFeedback>,
        (watermark, ids, evicted_until): (Option<Watermark>, &Vec<SeenId>, Option<i64>),
    ) {
        self.u8(bit(latest.is_some(), 0)
            | bit(latest.is_some_and(|f| f.kind == FeedbackKind::Csat), 1)
            | bit(watermark.is_some(), 2)
            | bit(!ids.is_empty(), 3)
            | bit(evicted_until.is_some(), 4));
        if let Some(f) = latest {
            self.time(f.at);
            self.u8(f.score);
        }
        if let Some(w) = watermark {
            self.ivar(i64::from(w.partition));
            self.ivar(w.offset);
        }
        if !ids.is_empty() {
            self.seen_ids(ids);
        }
        if let Some(e) = evicted_until {
            self.ivar(self.seen_minutes(e));
        }
    }

    fn active_hours(&mut self, h: &ActiveHours) {
        self.time(h.at);
        let narrow = h.weights.iter().all(|w| w.to_bits() & 0xffff == 0);
        self.u8(if narrow { 2 } else { 4 });
        let mask = (0..24).fold(0u32, |m, i| m | u32::from(h.weights[i].to_bits() != 0) << i);
        self.out.extend_from_slice(&mask.to_le_bytes()[..3]);
        for w in h.weights.iter().filter(|w| w.to_bits() != 0) {
            let b = w.to_bits().to_le_bytes();
            self.out
                .extend_from_slice(if narrow { &b[2..] } else { &b[..] });
        }
    }

    fn campaign_touches(&mut self, touches: &[CampaignTouch]) {
        let at: Vec<i64> = touches.iter().map(|x| x.at).collect();
        self.list(&at);
        for x in touches {
            self.u8(x.channel.index() as u8);
            self.out.extend_from_slice(&x.campaign.to_bytes());
        }
    }

    fn exposures(&mut self, exposures: &[Exposure]) {
        self.var(exposures.len() as u64);
        for x in exposures {
            self.time(x.at);
            self.str(&x.experiment);
            self.str(&x.arm);
        }
    }

    /// The measures section, when any exposure has a non-zero measure.
    fn measures(&mut self, exposures: &[Exposure]) {
        let k = measure_width(exposures);
        if k == 0 {
            return;
        }
        self.var(k as u64);
        for x in exposures {
            for v in &x.measures.to_fields()[..k] {
                self.ivar(*v);
            }
        }
    }

    fn visits(&mut self, v: &Visits) {
        let Visits {
            count,
            first_at,
            last_at,
            lifetime_spend,
            currency,
            last_treatment,
            last_treatment_at,
            last_visit_type,
            recent,
        } = v;
        let first_code = same_or(*first_at, recent.first().copied());
        let last_code = same_or(*last_at, recent.last().copied());
        let treatment_code = same_or(*last_treatment_at, *last_at);
        self.u8(first_code
            | last_code << 2
            | treatment_code << 4
            | bit(currency.is_some(), 6)
            | bit(last_treatment.is_some(), 7));
        self.u8(match last_visit_type {
            None => 0,
            Some(VisitType::Consultation) => 1,
            Some(VisitType::Treatment) => 2,
            Some(VisitType::FollowUp) => 3,
        });
        self.var(u64::from(*count));
        self.ivar(*lifetime_spend);
        self.list(recent);
        for (code, t) in [
            (first_code, first_at),
            (last_code, last_at),
            (treatment_code, last_treatment_at),
        ] {
            if let (2, Some(t)) = (code, t) {
                self.time(*t);
            }
        }
        for s in [currency, last_treatment].into_iter().flatten() {
            self.str(s);
        }
    }

    fn channel(&mut self, c: &ChannelEngagement) {
        let ChannelEngagement {
            at,
            short,
            long,
            last_send,
            last_open,
            last_click,
            last_reply,
            last_service_send,
            unsubscribed_at,
            resubscribed_at,
        } = c;
        let lasts = [*last_send, *last_open, *last_click, *last_reply];
        let codes = lasts.map(|t| same_or(t, Some(*at)));
        let counts = flat(short, long);
        let mut count_codes = [0u8; 8];
        for i in 0..8 {
            count_codes[i] = match counts[i] {
                0 => 0,
                b if i > 0 && b == counts[i - 1] => 1,
                _ => 2,
            };
        }
        let half = |k: usize| -> [u8; 4] { std::array::from_fn(|i| count_codes[4 * k + i]) };
        self.time(*at);
        self.u8(base3(codes) | bit(last_service_send.is_some(), 7));
        self.u8(base3(half(0)) | bit(unsubscribed_at.is_some(), 7));
        self.u8(base3(half(1)) | bit(resubscribed_at.is_some(), 7));
        for (code, bits) in count_codes.iter().zip(counts) {
            if *code == 2 {
                self.out.extend_from_slice(&bits.to_le_bytes());
            }
        }
        for (code, t) in codes.iter().zip(lasts) {
            if let (2, Some(t)) = (code, t) {
                self.time_to(t, *at);
            }
        }
        for t in [last_service_send, unsubscribed_at, resubscribed_at]
            .into_iter()
            .flatten()
        {
            self.time_to(*t, *at);
        }
    }

    fn last_decisions(&mut self, last: &[(usize, &DecisionDetail)]) {
        self.u8(last.iter().fold(0, |b, (i, _)| b | 1 << i));
        for (_, d) in last {
            let DecisionDetail {
                reason,
                cap,
                rates,
                sends_in_window,
                cause_event_id,
            } = d;
            let code = REASONS
                .iter()
                .position(|r| r == reason)
                .map_or(15, |i| i as u8);
            let minutes = cap.is_some_and(|(_, w)| w % 60_000 == 0);
            self.u8(code
                | bit(cap.is_some(), 4)
                | bit(rates.is_some(), 5)
                | bit(cause_event_id.is_some(), 6)
                | bit(minutes, 7));
            if code == 15 {
                self.str(reason);
            }
            if let Some((limit, window)) = cap {
                self.var(u64::from(*limit));
                self.ivar(if minutes { window / 60_000 } else { *window });
            }
            if let Some((short, baseline)) = rates {
                self.out.extend_from_slice(&short.to_le_bytes());
                self.out.extend_from_slice(&baseline.to_le_bytes());
            }
            self.ivar(*sends_in_window);
            if let Some(c) = cause_event_id {
                self.str(c);
            }
        }
    }

    fn control(&mut self, c: &ChannelControl) {
        let ChannelControl {
            sends,
            spell,
            published,
            violations,
            last: _,
        } = c;
        let mut k0 = bit(spell.is_some(), 0);
        if let Some(ThrottleSpell { below_floor, .. }) = spell {
            k0 |= bit(*below_floor, 1);
        }
        // decided_at is stored relative to the latest send (a cap: close to it)
        // or to the base (an old suppression): whichever is nearer.
        let decided_near_send = match (published.and_then(|p| p.decided_at), sends.last()) {
            (Some(t), Some(latest)) => {
                self.q(t).wrapping_sub(self.q(*latest)).unsigned_abs() < self.q(t).unsigned_abs()
            }
            _ => false,
        };
        if let Some(Published {
            state,
            allowed_from,
            seq: _,
            decided_at,
        }) = published
        {
            k0 |= 1 << 2
                | allowance_code(*state) << 3
                | bit(allowed_from.is_some(), 5)
                | bit(decided_at.is_some(), 6)
                | bit(decided_near_send, 7);
        }
        self.u8(k0);
        self.var(u64::from(*violations));
        self.list(sends);
        if let Some(ThrottleSpell { since, until, .. }) = spell {
            self.time(*since);
            self.time_to(*until, *since);
        }
        if let Some(Published {
            allowed_from,
            seq,
            decided_at,
            ..
        }) = published
        {
            self.var(u64::from(*seq));
            if let Some(t) = allowed_from {
                self.time(*t);
            }
            match (decided_at, sends.last()) {
                (Some(t), Some(latest)) if decided_near_send => self.time_to(*t, *latest),
                (Some(t), _) => self.time(*t),
                (None, _) => {}
            }
        }
    }

    fn applied(&mut self, a: &Applied) {
        let Applied {
            watermarks,
            seen,
            legacy_ids,
        } = a;
        let (mut partition, mut offset) = (0i64, 0i64);
        for Watermark {
            partition: p,
            offset: o,
        } in watermarks[..HEADER_TOPICS].iter().flatten()
        {
            self.ivar(i64::from(*p) - partition);
            self.ivar(o.wrapping_sub(offset));
            (partition, offset) = (i64::from(*p), *o);
        }
        let seen = &seen[..HEADER_TOPICS];
        let mut sp = (!legacy_ids.is_empty() as u16) << 10;
        for (i, t) in seen.iter().enumerate() {
            sp |= (!t.ids.is_empty() as u16) << i;
            sp |= (t.evicted_until.is_some() as u16) << (5 + i);
        }
        self.var(u64::from(sp));
        for t in seen.iter().filter(|t| !t.ids.is_empty()) {
            self.seen_ids(&t.ids);
        }
        for e in seen.iter().filter_map(|t| t.evicted_until) {
            self.ivar(self.seen_minutes(e));
        }
        if !legacy_ids.is_empty() {
            self.ring(legacy_ids);
        }
    }

    /// A remembered id's time in whole minutes (`SeenId::new`) from the base:
    /// in their own unit, 1–2 bytes a gap.
    fn seen_minutes(&self, t: i64) -> i64 {
        let base = self.base.div_euclid(SEEN_AT_UNIT_MS);
        t.div_euclid(SEEN_AT_UNIT_MS).wrapping_sub(base)
    }

    /// One topic's remembered ids (at least one): their times, then hashes.
    fn seen_ids(&mut self, ids: &[SeenId]) {
        self.var(ids.len() as u64);
        self.ivar(self.seen_minutes(ids[ids.len() - 1].at));
        for w in ids.windows(2).rev() {
            let gap = self
                .seen_minutes(w[1].at)
                .wrapping_sub(self.seen_minutes(w[0].at));
            self.var(gap as u64);
        }
        for x in ids {
            self.out.extend_from_slice(&x.id.to_bytes());
        }
    }

    fn ring(&mut self, ids: &[IdHash]) {
        self.var(ids.len() as u64);
        for h in ids {
            self.out.extend_from_slice(&h.to_bytes());
        }
    }

    fn episode(&mut self, e: &Episode) {
        let Episode {
            start,
            arm,
            experiment,
            stages,
        } = e;
        let arm_code = match arm {
            None => 0,
            Some(Arm::Treatment) => 1,
            Some(Arm::Holdout) => 2,
        };
        self.u8(arm_code | bit(experiment.is_some(), 2));
        self.time(*start);
        if let Some(x) = experiment {
            self.str(x);
        }
        self.var(stages.len() as u64);
        for r in stages {
            let StageRecord {
                stage,
                attempt,
                due_at,
                fired_at,
                segment,
                skipped,
                cost,
                outcome,
            } = r;
            let outcome_code = match outcome {
                None => 0,
                Some(OutcomeKind::Recalled) => 1,
                Some(OutcomeKind::NotRecalled) => 2,
                Some(OutcomeKind::Retracted) => 3,
                // A stage's strongest outcome is never REPURCHASED (the
                // repurchase watch holds it); were it, RECALLED is implied.
                Some(OutcomeKind::Repurchased) => 1,
            };
            // Two bits: an episode holds its four stages, never a CARE_CALL.
            debug_assert!(stage.index() < 4, "{stage} in an episode");
            self.u8(stage.index() as u8
                | (segment.index() as u8) << 2
                | bit(*skipped, 4)
                | outcome_code << 5);
            self.var(u64::from(*attempt));
            self.time(*due_at);
            self.time_to(*fired_at, *due_at);
            self.ivar(*cost);
        }
    }
}

/// The 8 counts of a channel as bits: short then long; sends, opens, clicks, replies.
fn flat(short: &Counts, long: &Counts) -> [u32; 8] {
    let b = |c: &Counts| {
        let Counts {
            sends,
            opens,
            clicks,
            replies,
        } = c;
        [*sends, *opens, *clicks, *replies].map(f32::to_bits)
    };
    let (s, l) = (b(short), b(long));
    [s[0], s[1], s[2], s[3], l[0], l[1], l[2], l[3]]
}

fn allowance_code(s: AllowanceState) -> u8 {
    s.index() as u8
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

struct Dec<'a> {
    b: &'a [u8],
    base: i64,
    unit: i64,
}

type Res<T> = Result<T, String>;

fn codes3(mut v: u8, what: &str) -> Res<[u8; 4]> {
    if v > 80 {
        return Err(format!("{what}: code {v} out of range"));
    }
    let mut out = [0; 4];
    for c in out.iter_mut() {
        *c = v % 3;
        v /= 3;
    }
    Ok(out)
}

impl Dec<'_> {
    fn u8(&mut self) -> Res<u8> {
        let (&x, rest) = self.b.split_first().ok_or("truncated")?;
        self.b = rest;
        Ok(x)
    }

    fn take(&mut self, n: usize) -> Res<&[u8]> {
        if n > self.b.len() {
            return Err("truncated".into());
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn var(&mut self) -> Res<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let byte = self.u8()?;
            if i == 9 && byte > 1 {
                return Err("varint overflows 64 bits".into());
            }
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn ivar(&mut self) -> Res<i64> {
        self.var().map(unzigzag)
    }

    fn u32(&mut self, what: &str) -> Res<u32> {
        u32::try_from(self.var()?).map_err(|_| format!("{what} exceeds 32 bits"))
    }

    /// A length prefix, checked against what the remaining bytes can hold.
    fn len(&mut self, min_bytes_each: usize, what: &str) -> Res<usize> {
        let n = self.var()?;
        if n > (self.b.len() / min_bytes_each) as u64 {
            return Err(format!("{what}: {n} entries cannot fit in the rest"));
        }
        Ok(n as usize)
    }

    fn str(&mut self, what: &str) -> Res<String> {
        let n = self.len(1, what)?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn time_of(&self, q: i64) -> Res<i64> {
        q.checked_mul(self.unit)
            .map(|d| self.base.wrapping_add(d))
            .ok_or_else(|| "time out of range".into())
    }

    fn time(&mut self) -> Res<i64> {
        let q = self.ivar()?;
        self.time_of(q)
    }

    /// A time stored relative to `reference`.
    fn time_to(&mut self, reference: i64) -> Res<i64> {
        let delta = self.ivar()?;
        // `reference` came from `from_q`, so it is a whole number of units away.
        let q = reference.wrapping_sub(self.base) / self.unit;
        self.time_of(q.wrapping_add(delta))
    }

    fn list(&mut self, what: &str) -> Res<Vec<i64>> {
        let n = self.len(1, what)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut q = self.ivar()?;
        let mut out = vec![0; n];
        out[n - 1] = self.time_of(q)?;
        for i in (0..n - 1).rev() {
            q = q.wrapping_sub(self.var()? as i64);
            out[i] = self.time_of(q)?;
        }
        Ok(out)
    }

    /// Reads a state into `s`, field by field (see [`decode_into`]).
    fn state(&mut self, s: &mut CustomerState) -> Res<()> {
        let h0 = self.u8()?;
        let h1 = if h0 & 0x02 != 0 { self.u8()? } else { 0 };
        if h0 & 0x02 != 0 && (h1 == 0 || h1 & !H1_KNOWN != 0) {
            return Err("extension header: empty, or a reserved bit set".into());
        }
        self.base = self.ivar()?;
        let unit = self.var()?;
        self.unit = if unit & 1 == 1 {
            (unit >> 1).checked_mul(1000)
        } else {
            Some(unit >> 1)
        }
        .and_then(|u| i64::try_from(u).ok())
        .filter(|u| *u > 0)
        .ok_or("time unit out of range")?;
        let p = self.take(2)?;
        let presence = u16::from_le_bytes([p[0], p[1]]);
        if presence & 0x8000 != 0 {
            return Err("reserved presence bit set".into());
        }
        let has = |i: usize| presence & (1 << i) != 0;
        let visits = if h0 & 4 != 0 {
            self.visits()?
        } else {
            Visits::default()
        };
        let mut channels: [Option<ChannelEngagement>; 5] = Default::default();
        for (i, slot) in channels.iter_mut().enumerate() {
            if has(i) {
                *slot = Some(self.channel()?);
            }
        }
        let mut controls: [Option<ChannelControl>; 5] = Default::default();
        for (i, slot) in controls.iter_mut().enumerate() {
            if has(5 + i) {
                *slot = Some(self.control()?);
            }
        }
        let mut watermarks = [None; INPUT_KINDS];
        let (mut partition, mut offset) = (0i64, 0i64);
        for (i, slot) in watermarks[..HEADER_TOPICS].iter_mut().enumerate() {
            if has(10 + i) {
                partition = partition
                    .checked_add(self.ivar()?)
                    .ok_or("watermark partition out of range")?;
                offset = offset.wrapping_add(self.ivar()?);
                *slot = Some(Watermark {
                    partition: i32::try_from(partition)
                        .map_err(|_| "watermark partition out of range")?,
                    offset,
                });
            }
        }
        let (mut seen, legacy_ids) = if h0 & 1 != 0 {
            self.seen()?
        } else {
            (Default::default(), self.ring()?)
        };
        let current = if h0 & 16 != 0 {
            Some(self.episode()?)
        } else {
            None
        };
        let previous = if h0 & 32 != 0 {
            Some(self.episode()?)
        } else {
            None
        };
        let timer_due = if h0 & 8 != 0 {
            Some(self.time()?)
        } else {
            None
        };
        let campaign_touches = if h1 & 1 != 0 {
            self.campaign_touches()?
        } else {
            Vec::new()
        };
        let mut exposures = if h1 & 4 != 0 {
            self.exposures()?
        } else {
            Vec::new()
        };
        if h1 & 64 != 0 {
            self.measures(&mut exposures)?;
        }
        let mut outbox: Vec<Output> = if h0 & 64 != 0 {
            let n = self.len(1, "outbox")?;
            let body = self.take(n)?;
            postcard::from_bytes(body).map_err(|e| format!("outbox: {e}"))?
        } else {
            Vec::new()
        };
        if h0 & 128 != 0 {
            self.last_decisions(&mut controls)?;
        }
        if h1 & 8 != 0 {
            self.send_after(&mut outbox)?;
        }
        let active_hours = if h1 & 2 != 0 {
            Some(self.active_hours()?)
        } else {
            None
        };
        let feedback = if h1 & 16 != 0 {
            let fb = FEEDBACK.index();
            self.feedback(&mut watermarks[fb], &mut seen[fb])?
        } else {
            None
        };
        let repurchase = if h1 & 32 != 0 {
            self.offers(&mut outbox)?
        } else {
            None
        };
        s.visits = visits;
        s.channels = channels;
        s.applied = Applied {
            watermarks,
            seen,
            legacy_ids,
        };
        s.controls = controls;
        s.recall = RecallState {
            current,
            previous,
            repurchase,
        };
        s.outbox = outbox;
        s.timer_due = timer_due;
        s.campaign_touches = campaign_touches;
        s.active_hours = active_hours;
        s.exposures = exposures;
        s.feedback = feedback;
        Ok(())
    }

    fn feedback(
        &mut self,
        watermark: &mut Option<Watermark>,
        seen: &mut SeenIds,
    ) -> Res<Option<LatestFeedback>> {
        let f0 = self.u8()?;
        if f0 == 0 || f0 >> 5 != 0 || (f0 & 1 == 0 && f0 & 2 != 0) {
            return Err("feedback: empty, or a reserved bit set".into());
        }
        let latest = if f0 & 1 != 0 {
            let at = self.time()?;
            let kind = if f0 & 2 != 0 {
                FeedbackKind::Csat
            } else {
                FeedbackKind::Nps
            };
            let score = self.u8()?;
            if !kind.range().contains(&i32::from(score)) {
                return Err(format!("feedback: {kind:?} score {score} out of range"));
            }
            Some(LatestFeedback { at, kind, score })
        } else {
            None
        };
        if f0 & 4 != 0 {
            let partition = i32::try_from(self.ivar()?)
                .map_err(|_| "feedback watermark partition out of range")?;
            *watermark = Some(Watermark {
                partition,
                offset: self.ivar()?,
            });
        }
        if f0 & 8 != 0 {
            seen.ids = self.seen_ids()?;
        }
        if f0 & 16 != 0 {
            let m = self.ivar()?;
            seen.evicted_until = Some(self.seen_at(m)?);
        }
        Ok(latest)
    }

    fn send_after(&mut self, outbox: &mut [Output]) -> Res<()> {
        let n = self.len(2, "send_after")?;
        if n == 0 {
            return Err("send_after: no entries".into());
        }
        let mut next = 0;
        for _ in 0..n {
            let i = usize::try_from(self.var()?).map_err(|_| "send_after: index")?;
            let t = self.time()?;
            match outbox.get_mut(i) {
                Some(Output::Trigger(tr)) if i >= next => tr.send_after = Some(t),
                _ => return Err(format!("send_after: index {i} is not a later trigger")),
            }
            next = i + 1;
        }
        Ok(())
    }

    /// The offers section: sets the outbox outcomes' incentive costs, returns
    /// the repurchase watch.
    fn offers(&mut self, outbox: &mut [Output]) -> Res<Option<RepurchaseWatch>> {
        let o0 = self.u8()?;
        if o0 == 0 || o0 & !3 != 0 {
            return Err(format!("offers: flags {o0}"));
        }
        if o0 & 1 != 0 {
            let n = self.len(2, "incentive costs")?;
            if n == 0 {
                return Err("incentive costs: no entries".into());
            }
            let mut next = 0;
            for _ in 0..n {
                let i = usize::try_from(self.var()?).map_err(|_| "incentive costs: index")?;
                let cost = self.ivar()?;
                match outbox.get_mut(i) {
                    Some(Output::Outcome(o)) if i >= next && cost != 0 => o.incentive_cost = cost,
                    _ => {
                        return Err(format!(
                            "incentive costs: index {i} is not a later outcome, or cost 0"
                        ))
                    }
                }
                next = i + 1;
            }
        }
        if o0 & 2 == 0 {
            return Ok(None);
        }
        let w0 = self.u8()?;
        if w0 & 0xc0 != 0 {
            return Err(format!("repurchase watch: flags {w0}"));
        }
        let segment = *Segment::ALL
            .get(usize::from(w0 >> 2 & 3))
            .ok_or("repurchase watch: segment code 3")?;
        let attempt = self.u32("repurchase attempt")?;
        let episode_start = self.time()?;
        let experiment = self.str("repurchase experiment")?;
        let recalled_at = self.time()?;
        let window = self.ivar()?;
        let window_ms = if w0 & 32 != 0 {
            window
                .checked_mul(60_000)
                .ok_or("repurchase window out of range")?
        } else {
            window
        };
        Ok(Some(RepurchaseWatch {
            episode_start,
            stage: Stage::ALL[usize::from(w0 & 3)],
            attempt,
            segment,
            experiment,
            arm: if w0 & 16 != 0 {
                Arm::Holdout
            } else {
                Arm::Treatment
            },
            recalled_at,
            window_ms,
        }))
    }

    fn active_hours(&mut self) -> Res<ActiveHours> {
        let at = self.time()?;
        let width = self.u8()?;
        if width != 2 && width != 4 {
            return Err(format!("active hours: width {width}"));
        }
        let m = self.take(3)?;
        let mask = u32::from_le_bytes([m[0], m[1], m[2], 0]);
        let mut weights = [0f32; 24];
        for (i, w) in weights.iter_mut().enumerate() {
            if mask & (1 << i) != 0 {
                let b = self.take(width.into())?;
                let bits = match *b {
                    [b0, b1] => u32::from_le_bytes([0, 0, b0, b1]),
                    [b0, b1, b2, b3] => u32::from_le_bytes([b0, b1, b2, b3]),
                    _ => unreachable!("width is 2 or 4"),
                };
                *w = f32::from_bits(bits);
                if w.to_bits() == 0 {
                    return Err(format!("active hours: hour {i} is set but +0.0"));
                }
            }
        }
        Ok(ActiveHours { at, weights })
    }

    fn exposures(&mut self) -> Res<Vec<Exposure>> {
        let n = self.len(3, "exposures")?;
        if n == 0 || n > MAX_EXPOSURES {
            return Err(format!("exposures: {n} entries"));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let at = self.time()?;
            let experiment = self.str("exposure experiment")?;
            let arm = self.str("exposure arm")?;
            out.push(Exposure {
                experiment,
                arm,
                at,
                measures: Measures::default(),
            });
        }
        Ok(out)
    }

    fn measures(&mut self, exposures: &mut [Exposure]) -> Res<()> {
        if exposures.is_empty() {
            return Err("measures without exposures".into());
        }
        let k = usize::try_from(self.var()?).unwrap_or(usize::MAX);
        if k == 0 || k > FIELDS {
            return Err(format!("measures: {k} fields, 1 to {FIELDS} known"));
        }
        for x in exposures.iter_mut() {
            let mut f = [0i64; FIELDS];
            for v in &mut f[..k] {
                *v = self.ivar()?;
            }
            x.measures = Measures::from_fields(&f).ok_or("measures: a count out of range")?;
        }
        if measure_width(exposures) != k {
            return Err(format!("measures: {k} fields written, fewer needed"));
        }
        Ok(())
    }

    fn campaign_touches(&mut self) -> Res<Vec<CampaignTouch>> {
        let at = self.list("campaign touches")?;
        if at.is_empty() || at.len() > MAX_CAMPAIGN_TOUCHES {
            return Err(format!("campaign touches: {} entries", at.len()));
        }
        let mut out = Vec::with_capacity(at.len());
        for at in at {
            let i = self.u8()?;
            let channel = *Channel::ALL
                .get(i as usize)
                .ok_or_else(|| format!("campaign touch: channel {i}"))?;
            let campaign = self.id_hash()?;
            out.push(CampaignTouch {
                campaign,
                channel,
                at,
            });
        }
        Ok(out)
    }

    fn ring(&mut self) -> Res<Vec<IdHash>> {
        let n = self.len(6, "event-id ring")?;
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(self.id_hash()?);
        }
        Ok(ids)
    }

    fn id_hash(&mut self) -> Res<IdHash> {
        let b = self.take(6)?;
        Ok(IdHash::from_bytes([b[0], b[1], b[2], b[3], b[4], b[5]]))
    }

    /// A remembered id's time from its minutes to the base.
    fn seen_at(&self, m: i64) -> Res<i64> {
        self.base
            .div_euclid(SEEN_AT_UNIT_MS)
            .checked_add(m)
            .and_then(|m| m.checked_mul(SEEN_AT_UNIT_MS))
            .ok_or_else(|| "seen ids: time out of range".to_string())
    }

    /// One topic's remembered ids (see `Enc::seen_ids`).
    fn seen_ids(&mut self) -> Res<Vec<SeenId>> {
        // Each id is at least its 6 hash bytes and a gap byte.
        let n = self.len(7, "seen ids")?;
        if n == 0 {
            return Err("seen ids: a present topic with none".into());
        }
        let mut m = vec![self.ivar()?; n];
        for j in (0..n - 1).rev() {
            m[j] = m[j + 1].wrapping_sub(self.var()? as i64);
        }
        m.into_iter()
            .map(|m| {
                Ok(SeenId {
                    at: self.seen_at(m)?,
                    id: self.id_hash()?,
                })
            })
            .collect()
    }

    fn seen(&mut self) -> Res<([SeenIds; INPUT_KINDS], Vec<IdHash>)> {
        let sp = self.var()?;
        if sp >> 11 != 0 {
            return Err("seen ids: reserved bit set".into());
        }
        let mut seen: [SeenIds; INPUT_KINDS] = Default::default();
        for (i, t) in seen[..HEADER_TOPICS].iter_mut().enumerate() {
            if sp & (1 << i) != 0 {
                t.ids = self.seen_ids()?;
            }
        }
        for (i, t) in seen[..HEADER_TOPICS].iter_mut().enumerate() {
            if sp & (1 << (5 + i)) != 0 {
                let m = self.ivar()?;
                t.evicted_until = Some(self.seen_at(m)?);
            }
        }
        let legacy = if sp & (1 << 10) != 0 {
            self.ring()?
        } else {
            Vec::new()
        };
        Ok((seen, legacy))
    }

    fn visits(&mut self) -> Res<Visits> {
        let v0 = self.u8()?;
        let v1 = self.u8()?;
        let last_visit_type = match v1 {
            0 => None,
            1 => Some(VisitType::Consultation),
            2 => Some(VisitType::Treatment),
            3 => Some(VisitType::FollowUp),
            _ => return Err(format!("visits: flags {v1}")),
        };
        let count = self.u32("visit count")?;
        let lifetime_spend = self.ivar()?;
        let recent = self.list("recent visits")?;
        let mut resolve = |code: u8, reference: Option<i64>, what: &str| -> Res<Option<i64>> {
            match code {
                0 => Ok(None),
                1 => reference
                    .map(Some)
                    .ok_or_else(|| format!("{what}: refers to an absent time")),
                2 => self.time().map(Some),
                _ => Err(format!("{what}: code 3")),
            }
        };
        let first_at = resolve(v0 & 3, recent.first().copied(), "first visit")?;
        let last_at = resolve(v0 >> 2 & 3, recent.last().copied(), "last visit")?;
        let last_treatment_at = resolve(v0 >> 4 & 3, last_at, "last treatment")?;
        let currency = (v0 & 64 != 0).then(|| self.str("currency")).transpose()?;
        let last_treatment = (v0 & 128 != 0).then(|| self.str("treatment")).transpose()?;
        Ok(Visits {
            count,
            first_at,
            last_at,
            lifetime_spend,
            currency,
            last_treatment,
            last_treatment_at,
            last_visit_type,
            recent,
        })
    }

    fn channel(&mut self) -> Res<ChannelEngagement> {
        let at = self.time()?;
        let a = self.u8()?;
        let b = self.u8()?;
        let c = self.u8()?;
        let last_codes = codes3(a & 0x7f, "last times")?;
        let short_codes = codes3(b & 0x7f, "short counts")?;
        let long_codes = codes3(c & 0x7f, "long counts")?;
        let mut bits = [0u32; 8];
        for (i, code) in short_codes.iter().chain(&long_codes).enumerate() {
            bits[i] = match code {
                0 => 0,
                1 if i > 0 => bits[i - 1],
                2 => {
                    let x = self.take(4)?;
                    u32::from_le_bytes([x[0], x[1], x[2], x[3]])
                }
                _ => return Err("the first count refers to a previous one".into()),
            };
        }
        let counts = |o: usize| Counts {
            sends: f32::from_bits(bits[o]),
            opens: f32::from_bits(bits[o + 1]),
            clicks: f32::from_bits(bits[o + 2]),
            replies: f32::from_bits(bits[o + 3]),
        };
        let mut lasts = [None; 4];
        for (slot, code) in lasts.iter_mut().zip(last_codes) {
            *slot = match code {
                0 => None,
                1 => Some(at),
                _ => Some(self.time_to(at)?),
            };
        }
        let mut opt = |present: bool| present.then(|| self.time_to(at)).transpose();
        let last_service_send = opt(a & 0x80 != 0)?;
        let unsubscribed_at = opt(b & 0x80 != 0)?;
        let resubscribed_at = opt(c & 0x80 != 0)?;
        Ok(ChannelEngagement {
            at,
            short: counts(0),
            long: counts(4),
            last_send: lasts[0],
            last_open: lasts[1],
            last_click: lasts[2],
            last_reply: lasts[3],
            last_service_send,
            unsubscribed_at,
            resubscribed_at,
        })
    }

    fn control(&mut self) -> Res<ChannelControl> {
        let k0 = self.u8()?;
        if (k0 & 1 == 0 && k0 & 2 != 0)
            || (k0 & 4 == 0 && k0 & 0xf8 != 0)
            || (k0 & 64 == 0 && k0 & 128 != 0)
        {
            return Err(format!("control: flags {k0}"));
        }
        let violations = self.u32("violations")?;
        let sends = self.list("cap-window sends")?;
        let spell = if k0 & 1 != 0 {
            let since = self.time()?;
            let until = self.time_to(since)?;
            Some(ThrottleSpell {
                since,
                until,
                below_floor: k0 & 2 != 0,
            })
        } else {
            None
        };
        let published = if k0 & 4 != 0 {
            let state = AllowanceState::ALL[usize::from(k0 >> 3 & 3)];
            let seq = self.u32("published seq")?;
            let allowed_from = (k0 & 32 != 0).then(|| self.time()).transpose()?;
            let decided_at = match (k0 & 64 != 0, k0 & 128 != 0, sends.last()) {
                (false, _, _) => None,
                (true, true, Some(latest)) => Some(self.time_to(*latest)?),
                (true, false, _) => Some(self.time()?),
                (true, true, None) => return Err("control: decided_at relative to no send".into()),
            };
            Some(Published {
                state,
                allowed_from,
                seq,
                decided_at,
            })
        } else {
            None
        };
        Ok(ChannelControl {
            sends,
            spell,
            published,
            violations,
            last: None,
        })
    }

    fn last_decisions(&mut self, controls: &mut [Option<ChannelControl>; 5]) -> Res<()> {
        let l0 = self.u8()?;
        if l0 == 0 || l0 & 0xe0 != 0 {
            return Err("last decisions: no channel, or a reserved bit set".into());
        }
        for (i, control) in controls.iter_mut().enumerate() {
            if l0 & 1 << i == 0 {
                continue;
            }
            let Some(c) = control.as_mut().filter(|c| c.published.is_some()) else {
                return Err(format!("last decision of channel {i} without its decision"));
            };
            let l1 = self.u8()?;
            let reason = match l1 & 15 {
                15 => self.str("reason")?,
                code => REASONS
                    .get(usize::from(code))
                    .ok_or("last decision: unknown reason code")?
                    .to_string(),
            };
            let cap = if l1 & 16 != 0 {
                let limit = self.u32("cap")?;
                let w = self.ivar()?;
                let window = if l1 & 128 != 0 {
                    w.checked_mul(60_000)
                        .ok_or("last decision: window out of range")?
                } else {
                    w
                };
                Some((limit, window))
            } else if l1 & 128 != 0 {
                return Err("last decision: window unit without a cap".into());
            } else {
                None
            };
            let rates = if l1 & 32 != 0 {
                let b = self.take(16)?;
                let f = |b: &[u8]| f64::from_le_bytes(b.try_into().unwrap_or_default());
                Some((f(&b[..8]), f(&b[8..])))
            } else {
                None
            };
            let sends_in_window = self.ivar()?;
            let cause_event_id = (l1 & 64 != 0).then(|| self.str("cause")).transpose()?;
            c.last = Some(DecisionDetail {
                reason,
                cap,
                rates,
                sends_in_window,
                cause_event_id,
            });
        }
        Ok(())
    }

    fn episode(&mut self) -> Res<Episode> {
        let e0 = self.u8()?;
        let arm = match e0 & 3 {
            0 => None,
            1 => Some(Arm::Treatment),
            2 => Some(Arm::Holdout),
            _ => return Err("episode: arm code 3".into()),
        };
        if e0 & 0xf8 != 0 {
            return Err(format!("episode: flags {e0}"));
        }
        let start = self.time()?;
        let experiment = (e0 & 4 != 0).then(|| self.str("experiment")).transpose()?;
        let n = self.len(5, "stages")?;
        let mut stages = Vec::with_capacity(n);
        for _ in 0..n {
            let s0 = self.u8()?;
            let segment = *Segment::ALL
                .get(usize::from(s0 >> 2 & 3))
                .ok_or("stage: segment code 3")?;
            if s0 & 0x80 != 0 {
                return Err(format!("stage: flags {s0}"));
            }
            let outcome = match s0 >> 5 & 3 {
                0 => None,
                1 => Some(OutcomeKind::Recalled),
                2 => Some(OutcomeKind::NotRecalled),
                _ => Some(OutcomeKind::Retracted),
            };
            let attempt = self.u32("attempt")?;
            let due_at = self.time()?;
            let fired_at = self.time_to(due_at)?;
            stages.push(StageRecord {
                stage: Stage::ALL[usize::from(s0 & 3)],
                attempt,
                due_at,
                fired_at,
                segment,
                skipped: s0 & 16 != 0,
                cost: self.ivar()?,
                outcome,
            });
        }
        Ok(Episode {
            start,
            arm,
            experiment,
            stages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::allowance::ThrottleDecision;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn encoded(s: &CustomerState) -> Vec<u8> {
        let mut out = Vec::new();
        encode(s, &mut out);
        out
    }

    /// A time: near a base, in a random unit; in a quarter of the states
    /// (`unit` odd) sometimes extreme.
    fn time(r: &mut StdRng, base: i64, unit: i64) -> i64 {
        match r.random_range(0..40) {
            0 if unit % 2 == 1 => [i64::MIN, i64::MAX, 0, -1, 1][r.random_range(0..5)],
            1 if unit % 2 == 1 => r.random(),
            _ => base + r.random_range(-5_000i64..5_000) * unit,
        }
    }

    fn opt<T>(r: &mut StdRng, f: impl FnOnce(&mut StdRng) -> T) -> Option<T> {
        r.random_bool(0.6).then(|| f(r))
    }

    fn count(r: &mut StdRng, prev: f32) -> f32 {
        match r.random_range(0..5) {
            0 => 0.0,
            1 => prev,
            2 => f32::from_bits(r.random()),
            _ => r.random_range(0.0..300.0),
        }
    }

    fn times(r: &mut StdRng, base: i64, unit: i64, max: usize) -> Vec<i64> {
        let mut v: Vec<i64> = (0..r.random_range(0..=max))
            .map(|_| time(r, base, unit))
            .collect();
        if r.random_bool(0.8) {
            v.sort_unstable();
        }
        v
    }

    fn random_state(r: &mut StdRng) -> CustomerState {
        let base = r.random_range(0..2_000_000_000_000i64);
        let unit = [1, 7, 1_000, 60_000, 3_600_000, 86_400_000, 180_000][r.random_range(0..7)];
        let mut s = CustomerState::default();
        if r.random_bool(0.8) {
            let recent = times(r, base, unit, 20);
            let v = &mut s.visits;
            v.count = r.random();
            v.first_at = match r.random_range(0..3) {
                0 => None,
                1 => recent.first().copied(),
                _ => Some(time(r, base, unit)),
            };
            v.last_at = match r.random_range(0..3) {
                0 => None,
                1 => recent.last().copied(),
                _ => Some(time(r, base, unit)),
            };
            v.last_treatment_at = match r.random_range(0..3) {
                0 => None,
                1 => v.last_at,
                _ => Some(time(r, base, unit)),
            };
            v.lifetime_spend = r.random();
            v.currency = opt(r, |_| "CNY".to_string());
            v.last_treatment = opt(r, |_| "HYALURONIC ACID 注射".to_string());
            v.last_visit_type = opt(r, |r| {
                [
                    VisitType::Consultation,
                    VisitType::Treatment,
                    VisitType::FollowUp,
                ][r.random_range(0..3)]
            });
            v.recent = recent;
        }
        for i in 0..5 {
            if r.random_bool(0.7) {
                let at = time(r, base, unit);
                let mut prev = 0.0;
                let mut c = || {
                    prev = count(r, prev);
                    prev
                };
                let short = Counts {
                    sends: c(),
                    opens: c(),
                    clicks: c(),
                    replies: c(),
                };
                let long = Counts {
                    sends: c(),
                    opens: c(),
                    clicks: c(),
                    replies: c(),
                };
                let last = |r: &mut StdRng| match r.random_range(0..3) {
                    0 => None,
                    1 => Some(at),
                    _ => Some(time(r, base, unit)),
                };
                s.channels[i] = Some(ChannelEngagement {
                    at,
                    short,
                    long,
                    last_send: last(r),
                    last_open: last(r),
                    last_click: last(r),
                    last_reply: last(r),
                    last_service_send: opt(r, |r| time(r, base, unit)),
                    unsubscribed_at: opt(r, |r| time(r, base, unit)),
                    resubscribed_at: opt(r, |r| time(r, base, unit)),
                });
            }
            if r.random_bool(0.7) {
                s.controls[i] = Some(ChannelControl {
                    sends: times(r, base, unit, 12),
                    spell: opt(r, |r| ThrottleSpell {
                        since: time(r, base, unit),
                        until: time(r, base, unit),
                        below_floor: r.random(),
                    }),
                    published: opt(r, |r| Published {
                        state: AllowanceState::ALL[r.random_range(0..4)],
                        allowed_from: opt(r, |r| time(r, base, unit)),
                        seq: r.random(),
                        decided_at: opt(r, |r| time(r, base, unit)),
                    }),
                    violations: r.random(),
                    last: None,
                });
                let c = s.controls[i].as_mut().unwrap();
                if c.published.is_some() && r.random_bool(0.6) {
                    c.last = Some(DecisionDetail {
                        reason: ["frequency_cap", "cap_window_passed", "not_yet_known"]
                            [r.random_range(0..3)]
                        .into(),
                        cap: opt(r, |r| {
                            let w = if r.random() { 86_400_000 } else { 1 };
                            (r.random(), r.random_range(1..30) * w)
                        }),
                        rates: opt(r, |r| (r.random(), r.random())),
                        sends_in_window: if r.random() {
                            r.random_range(0..20)
                        } else {
                            r.random()
                        },
                        cause_event_id: opt(r, |r| format!("e-{}", r.random::<u32>())),
                    });
                }
            }
            s.applied.watermarks[i] = opt(r, |r| Watermark {
                partition: if r.random_bool(0.9) {
                    r.random_range(0..12)
                } else {
                    r.random()
                },
                offset: if r.random_bool(0.9) {
                    r.random_range(0..1_000_000)
                } else {
                    r.random()
                },
            });
        }
        for t in s.applied.seen.iter_mut() {
            if r.random_bool(0.15) {
                let mut ids: Vec<SeenId> = (0..r.random_range(1..40))
                    .map(|_| SeenId::new(IdHash::from(r.random::<u64>()), time(r, base, unit)))
                    .collect();
                ids.sort_by_key(|x| (x.at, x.id));
                t.ids = ids;
            }
            if r.random_bool(0.1) {
                t.evicted_until = Some(SeenId::new(IdHash::from(0), time(r, base, unit)).at);
            }
        }
        if r.random_bool(0.2) {
            s.applied.legacy_ids = (0..r.random_range(1..17))
                .map(|_| IdHash::from(r.random::<u64>()))
                .collect();
        }
        let episode = |r: &mut StdRng| Episode {
            start: time(r, base, unit),
            arm: opt(r, |r| [Arm::Treatment, Arm::Holdout][r.random_range(0..2)]),
            experiment: opt(r, |_| "winback-2026".to_string()),
            stages: (0..r.random_range(0..14))
                .map(|_| StageRecord {
                    stage: Stage::ALL[r.random_range(0..4)],
                    attempt: r.random(),
                    due_at: time(r, base, unit),
                    fired_at: time(r, base, unit),
                    segment: Segment::ALL[r.random_range(0..3)],
                    skipped: r.random(),
                    cost: r.random(),
                    outcome: opt(r, |r| {
                        [
                            OutcomeKind::Recalled,
                            OutcomeKind::NotRecalled,
                            OutcomeKind::Retracted,
                        ][r.random_range(0..3)]
                    }),
                })
                .collect(),
        };
        s.recall.current = opt(r, episode);
        s.recall.previous = opt(r, episode);
        s.timer_due = opt(r, |r| time(r, base, unit));
        if r.random_bool(0.3) {
            let at = times(r, base, unit, MAX_CAMPAIGN_TOUCHES);
            s.campaign_touches = at
                .into_iter()
                .map(|at| CampaignTouch {
                    campaign: IdHash::from(r.random::<u64>()),
                    channel: Channel::ALL[r.random_range(0..5)],
                    at,
                })
                .collect();
        }
        if r.random_bool(0.3) {
            s.exposures = (0..r.random_range(1..=MAX_EXPOSURES))
                .map(|i| Exposure {
                    experiment: format!("wechat-cap-{i}"),
                    arm: ["control", "one-a-day", "三"][r.random_range(0..3)].into(),
                    at: time(r, base, unit),
                    measures: if r.random_bool(0.5) {
                        Measures::default()
                    } else {
                        // Some fields zero (the width follows the last non-zero one).
                        let mut f = [0i64; FIELDS];
                        for v in f.iter_mut().take(r.random_range(1..=FIELDS)) {
                            *v = match r.random_range(0..3) {
                                0 => 0,
                                1 => r.random_range(0..100),
                                _ => i64::from(r.random::<u32>()),
                            };
                        }
                        Measures::from_fields(&f).expect("counts in range")
                    },
                })
                .collect();
        }
        if r.random_bool(0.2) {
            s.outbox.push(Output::Throttle(Box::new(ThrottleDecision {
                decision_id: "d".into(),
                tenant_id: "t".into(),
                customer_id: Some("c".into()),
                channel: Some(Channel::Sms),
                campaign_id: None,
                state: AllowanceState::Capped,
                reason: "frequency_cap".into(),
                allowed_from: Some(base),
                cap: Some(3),
                window_ms: Some(86_400_000),
                short_click_rate: Some(0.1),
                baseline_click_rate: None,
                sends_in_window: 3,
                decided_at: base,
                cause_event_id: None,
                previous: None,
            })));
        }
        if r.random_bool(0.15) {
            for _ in 0..r.random_range(1..3) {
                s.outbox
                    .push(Output::Trigger(trigger(opt(r, |r| time(r, base, unit)))));
            }
        }
        if r.random_bool(0.4) {
            let mut h = ActiveHours {
                at: time(r, base, unit),
                weights: [0.0; 24],
            };
            let mut prev = 0.0;
            let narrow = r.random_bool(0.5);
            for w in &mut h.weights {
                *w = count(r, prev);
                if narrow {
                    *w = f32::from_bits(w.to_bits() & 0xffff_0000);
                }
                prev = *w;
            }
            s.active_hours = Some(h);
        }
        if r.random_bool(0.2) {
            for _ in 0..r.random_range(1..4) {
                let cost = [0, 15_000, r.random()][r.random_range(0..3)];
                s.outbox.push(Output::Outcome(outcome(cost)));
            }
        }
        if r.random_bool(0.3) {
            let window_ms =
                [180 * 86_400_000, 7, r.random::<i64>() / 60_000 * 60_000, 0][r.random_range(0..4)];
            s.recall.repurchase = Some(RepurchaseWatch {
                episode_start: time(r, base, unit),
                stage: Stage::ALL[r.random_range(0..4)],
                attempt: r.random(),
                segment: Segment::ALL[r.random_range(0..3)],
                experiment: ["recall-v1", "", "三"][r.random_range(0..3)].into(),
                arm: [Arm::Treatment, Arm::Holdout][r.random_range(0..2)],
                recalled_at: time(r, base, unit),
                window_ms,
            });
        }
        if r.random_bool(0.3) {
            let kind = [FeedbackKind::Nps, FeedbackKind::Csat][r.random_range(0..2)];
            s.feedback = Some(LatestFeedback {
                at: time(r, base, unit),
                kind,
                score: r.random_range(kind.range()) as u8,
            });
        }
        // The feedback topic's watermark lives in the feedback section.
        s.applied.watermarks[FEEDBACK.index()] = opt(r, |r| Watermark {
            partition: r.random_range(0..12),
            offset: r.random(),
        });
        if r.random_bool(0.1) {
            // A care call: a stage appended to the enum, through postcard.
            let mut t = trigger(opt(r, |r| time(r, base, unit)));
            t.stage = Stage::CareCall;
            s.outbox.push(Output::Trigger(t));
        }
        s
    }

    fn outcome(incentive_cost: i64) -> crate::domain::recall::RecallOutcome {
        crate::domain::recall::RecallOutcome {
            outcome_id: "o".into(),
            trigger_id: "tr".into(),
            kind: OutcomeKind::Recalled,
            tenant_id: "t".into(),
            customer_id: "c".into(),
            episode_id: "e".into(),
            stage: Stage::Lapsed,
            segment: Segment::AtRisk,
            experiment: "x".into(),
            arm: Arm::Treatment,
            days_to_return: Some(3.5),
            revenue: 100,
            marketing_cost: 7,
            currency: "CNY".into(),
            cause_event_id: Some("v".into()),
            decided_at: 1,
            incentive_cost,
        }
    }

    fn trigger(send_after: Option<i64>) -> crate::domain::recall::RecallTrigger {
        crate::domain::recall::RecallTrigger {
            trigger_id: "tr".into(),
            tenant_id: "t".into(),
            customer_id: "c".into(),
            episode_id: "e".into(),
            stage: Stage::Lapsed,
            attempt: 1,
            segment: Segment::AtRisk,
            days_since_last_visit: 200,
            expected_interval_days: 120.0,
            lifetime_value: 1,
            currency: "CNY".into(),
            last_treatment: None,
            recommended_channel: Some(Channel::Wechat),
            fallback_channels: vec![],
            offer_tier: "STANDARD".into(),
            experiment: "x".into(),
            arm: Arm::Treatment,
            due_at: 1,
            fired_at: 2,
            send_after,
        }
    }

    #[test]
    fn every_state_round_trips_bit_for_bit() {
        let mut r = StdRng::seed_from_u64(6);
        let mut units = std::collections::BTreeMap::new();
        for _ in 0..20_000 {
            let s = random_state(&mut r);
            let b = encoded(&s);
            let base = pick_base(&s);
            *units.entry(pick_unit(&s, base)).or_insert(0) += 1;
            let back = decode(&b).unwrap_or_else(|e| panic!("{e}: {s:?}"));
            // Compared as bytes: NaN counts are not equal to themselves.
            assert_eq!(encoded(&back), b, "{s:?}");
            if format!("{s:?}").contains("NaN") {
                continue;
            }
            assert_eq!(back, s);
        }
        for unit in [1, 7, 1_000, 60_000, 180_000, 3_600_000, 86_400_000] {
            assert!(units.get(&unit) > Some(&100), "unit {unit}: {units:?}");
        }
    }

    #[test]
    fn the_default_state_is_six_bytes() {
        let b = encoded(&CustomerState::default());
        // Header (seen ids, unit 1 ms), no presence, no seen ids.
        assert_eq!(b, [1, 0, 2, 0, 0, 0]);
        assert_eq!(decode(&b).unwrap(), CustomerState::default());
    }

    #[test]
    fn damaged_bytes_are_errors_not_panics() {
        let mut r = StdRng::seed_from_u64(7);
        for _ in 0..300 {
            let s = random_state(&mut r);
            let b = encoded(&s);
            for n in 0..b.len() {
                assert!(decode(&b[..n]).is_err(), "a prefix of {n} bytes decoded");
            }
            let mut d = b.clone();
            d.push(0);
            assert!(decode(&d).unwrap_err().contains("trailing"));
            for _ in 0..50 {
                let mut d = b.clone();
                let i = r.random_range(0..d.len());
                d[i] ^= 1 << r.random_range(0..8);
                let _ = decode(&d);
            }
        }
        // A huge length prefix allocates nothing: it cannot fit in the rest
        // (the earlier ring; a topic's seen ids).
        let huge = [0xff, 0xff, 0xff, 0xff, 0x0f];
        for head in [&[0u8, 0, 2, 0, 0][..], &[1, 0, 2, 0, 0, 1]] {
            let b = [head, &huge].concat();
            assert!(decode(&b).unwrap_err().contains("cannot fit"), "{head:?}");
        }
        assert!(decode(&[0x02, 0, 2, 0, 0, 0])
            .unwrap_err()
            .contains("reserved"));
        // The extension byte: never empty, no unknown section.
        assert!(decode(&[0x03, 0x80, 0, 2, 0, 0, 0])
            .unwrap_err()
            .contains("reserved"));
        // The offers section (h1 bit 5): flags never 0, no reserved flag;
        // an incentive cost only on an outcome, never 0.
        for (body, what) in [
            (&[0u8][..], "offers: flags 0"),
            (&[4], "offers: flags 4"),
            (&[1, 1, 0, 2], "not a later outcome"),
        ] {
            let b = [&[0x03, 0x20, 0, 2, 0, 0, 0][..], body].concat();
            assert!(decode(&b).unwrap_err().contains(what), "{what}");
        }
        let mut s = CustomerState::default();
        s.outbox.push(Output::Outcome(outcome(15_000)));
        let b = encoded(&s);
        assert_eq!(
            decode(&b).unwrap(),
            s,
            "the incentive cost survives the outbox"
        );
        let zero = b.len() - 1; // the cost's ivar (15_000 → 3 bytes): make it 0
        let mut d = b.clone();
        d.truncate(zero - 2);
        d.push(0);
        assert!(decode(&d).unwrap_err().contains("cost 0"));
        // The feedback section (h1 bit 4): never empty, no reserved bit, a kind
        // only with a score, a score in its kind's range.
        let with_feedback = |f: &[u8]| [&[0x03u8, 0x10, 0, 2, 0, 0, 0][..], f].concat();
        for (f, what) in [
            (&[0u8][..], "empty"),
            (&[0x20], "reserved"),
            (&[0x02], "reserved"),
            (&[0x01, 0, 11], "out of range"),
            (&[0x03, 0, 0], "out of range"),
        ] {
            let e = decode(&with_feedback(f)).unwrap_err();
            assert!(e.contains(what), "{f:?}: {e}");
        }
        let ok = decode(&with_feedback(&[0x03, 0, 5])).unwrap();
        assert_eq!(
            ok.feedback.map(|f| (f.kind, f.score)),
            Some((FeedbackKind::Csat, 5))
        );
        // Last decisions flagged with no control to belong to.
        let e = decode(&[0x81, 0, 2, 0, 0, 0, 1, 0, 0]).unwrap_err();
        assert!(e.contains("without its decision"), "{e}");
        assert!(decode(&[0, 0, 0, 0, 0, 0]).unwrap_err().contains("unit"));
    }
}
