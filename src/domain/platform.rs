//! Platform rules: hard limits a messaging platform imposes on the sender,
//! named rule types configured per channel (`[[policy.platform_rules]]`, none
//! by default; documented templates with their sources in
//! `deploy/platform-rules.toml`):
//!
//! * `calendar_month`: at most `limit` marketing sends per calendar month in the
//!   customer's time zone (WeChat service account: 4 broadcasts a month per follower).
//! * `calendar_day`: at most `limit` per calendar day (WeCom: 1 mass message a
//!   day per customer).
//! * `inbound_window`: sends only within `window` after the customer's latest
//!   reply on the channel, at most `limit` of them (WeChat customer-service
//!   messages: 48 h, 5). Until the customer replies again no time is known, so
//!   `allowed_from` is null.
//!
//! They count the channel's marketing sends (`ChannelControl::sends`, kept long
//! enough for every rule: [`Policy::send_memory_ms`]); SERVICE sends are never
//! restricted, as everywhere in lapse. A rule binds when it allows later than
//! the channel's own rules; the allowance then names it (`reason`
//! `platform_<kind>`, the API's `platform_rule`).

use chrono::{Datelike, NaiveDate, TimeZone};
use serde::{Deserialize, Serialize};

use super::allowance::{Allowance, AllowanceState};
use super::event::Channel;
use super::policy::{CapRule, Policy, MAX_CAP};
use super::span::Span;
use super::state::CustomerState;

/// The kinds of platform rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlatformRuleKind {
    CalendarMonth,
    CalendarDay,
    InboundWindow,
}

impl PlatformRuleKind {
    /// The allowance reason when a rule of this kind binds.
    pub fn reason(self) -> &'static str {
        match self {
            PlatformRuleKind::CalendarMonth => "platform_calendar_month",
            PlatformRuleKind::CalendarDay => "platform_calendar_day",
            PlatformRuleKind::InboundWindow => "platform_inbound_window",
        }
    }
}

/// Whether an allowance reason is a platform rule's.
pub fn is_platform_reason(reason: &str) -> bool {
    reason.starts_with("platform_")
}

/// One `[[policy.platform_rules]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformRule {
    /// Shown by the allowance API when this rule binds, e.g. `wechat_service_account_broadcast`.
    pub name: String,
    pub channel: Channel,
    pub kind: PlatformRuleKind,
    /// Marketing sends allowed per period (month, day, or inbound window).
    pub limit: u32,
    /// `inbound_window` only: how long after the customer's latest reply.
    #[serde(default)]
    pub window: Option<Span>,
    /// Where the limit comes from (documentation only).
    #[serde(default)]
    pub source: String,
}

/// The longest an `inbound_window` may be.
const MAX_INBOUND_WINDOW: Span = Span::days(31);

impl PlatformRule {
    pub fn validate(&self, key: &str) -> Result<(), (String, String)> {
        if self.name.trim().is_empty() {
            return Err((
                format!("{key}.name"),
                "must name the rule (the allowance API shows it)".into(),
            ));
        }
        if self.limit == 0 || self.limit > MAX_CAP {
            return Err((
                format!("{key}.limit"),
                format!("must be between 1 and {MAX_CAP}"),
            ));
        }
        match (self.kind, self.window) {
            (PlatformRuleKind::InboundWindow, Some(w))
                if w >= Span::secs(60) && w <= MAX_INBOUND_WINDOW => {}
            (PlatformRuleKind::InboundWindow, _) => {
                return Err((
                    format!("{key}.window"),
                    format!(
                        "an inbound_window rule needs a window between 1m and {MAX_INBOUND_WINDOW} (e.g. \"48h\")"
                    ),
                ))
            }
            (_, Some(_)) => {
                return Err((
                    format!("{key}.window"),
                    "only inbound_window rules take a window (calendar rules follow the customer's time zone): remove it".into(),
                ))
            }
            (_, None) => {}
        }
        Ok(())
    }

    /// How far back this rule looks at sends.
    pub fn memory_ms(&self) -> i64 {
        match self.kind {
            // A month and a day are at most 31 days and 25 hours in any time zone.
            PlatformRuleKind::CalendarMonth => Span::days(32).as_ms(),
            PlatformRuleKind::CalendarDay => Span::days(2).as_ms(),
            PlatformRuleKind::InboundWindow => self.window.map_or(0, Span::as_ms),
        }
    }
}

/// A platform rule binding a channel at some instant.
#[derive(Debug, Clone, PartialEq)]
pub struct PlatformBinding<'p> {
    pub rule: &'p PlatformRule,
    /// When a send is allowed again by this rule (`None`: not until the customer replies).
    pub free_at: Option<i64>,
    /// Sends the rule counted.
    pub counted: u32,
}

/// Start of the local calendar period holding `t` and of the next one.
fn period(p: &Policy, kind: PlatformRuleKind, t: i64) -> Option<(i64, i64)> {
    let local = p.tz.timestamp_millis_opt(t).single()?.date_naive();
    let (start, next) = match kind {
        PlatformRuleKind::CalendarDay => (local, local.succ_opt()?),
        _ => {
            let first = NaiveDate::from_ymd_opt(local.year(), local.month(), 1)?;
            let next = if local.month() == 12 {
                NaiveDate::from_ymd_opt(local.year() + 1, 1, 1)?
            } else {
                NaiveDate::from_ymd_opt(local.year(), local.month() + 1, 1)?
            };
            (first, next)
        }
    };
    let at = |d: NaiveDate| {
        p.tz.from_local_datetime(&d.and_hms_opt(0, 0, 0)?)
            .earliest()
            .map(|x| x.timestamp_millis())
    };
    Some((at(start)?, at(next)?))
}

/// The platform rule of channel `c` that binds longest at `t`, if any.
pub fn binding<'p>(
    state: &CustomerState,
    c: Channel,
    p: &'p Policy,
    t: i64,
) -> Option<PlatformBinding<'p>> {
    let sends: &[i64] = state.controls[c.index()]
        .as_ref()
        .map_or(&[], |ctl| ctl.sends.as_slice());
    let count = |from: i64| sends.iter().filter(|s| **s >= from && **s <= t).count() as u32;
    let mut worst: Option<PlatformBinding<'p>> = None;
    for rule in p.platform_rules.iter().filter(|r| r.channel == c) {
        let b = match rule.kind {
            PlatformRuleKind::CalendarMonth | PlatformRuleKind::CalendarDay => {
                let Some((start, next)) = period(p, rule.kind, t) else {
                    continue;
                };
                let n = count(start);
                (n >= rule.limit).then_some(PlatformBinding {
                    rule,
                    free_at: Some(next),
                    counted: n,
                })
            }
            PlatformRuleKind::InboundWindow => {
                let window = rule.memory_ms();
                let reply = state.channel(c).and_then(|e| e.last_reply);
                match reply {
                    Some(r) if t < r + window => {
                        // Sends after the reply (at its instant too: a reply answers earlier sends).
                        let n = sends.iter().filter(|s| **s > r && **s <= t).count() as u32;
                        (n >= rule.limit).then_some(PlatformBinding {
                            rule,
                            free_at: None,
                            counted: n,
                        })
                    }
                    _ => Some(PlatformBinding {
                        rule,
                        free_at: None,
                        counted: 0,
                    }),
                }
            }
        };
        let Some(b) = b else { continue };
        let later = match &worst {
            None => true,
            Some(w) => b.free_at.unwrap_or(i64::MAX) > w.free_at.unwrap_or(i64::MAX),
        };
        if later {
            worst = Some(b);
        }
    }
    worst
}

/// When an open channel's inbound window closes (for the timer): the latest
/// reply plus the longest `inbound_window` of `c`, while the channel's last
/// published decision is `OPEN` (a closed window is published as `CAPPED`).
pub fn inbound_window_closes(state: &CustomerState, c: Channel, p: &Policy) -> Option<i64> {
    // Nothing published yet reads as OPEN to a sender too.
    let published = state.controls[c.index()].as_ref().and_then(|x| x.published);
    if published.is_some_and(|pb| pb.state != AllowanceState::Open) {
        return None;
    }
    let reply = state.channel(c)?.last_reply?;
    p.platform_rules
        .iter()
        .filter(|r| r.channel == c && r.kind == PlatformRuleKind::InboundWindow)
        .map(|r| reply.saturating_add(r.memory_ms()))
        .max()
}

/// True when `c` is published `OPEN` but its inbound window has closed by `t`.
pub fn inbound_window_closed(state: &CustomerState, c: Channel, p: &Policy, t: i64) -> bool {
    inbound_window_closes(state, c, p).is_some_and(|x| x <= t)
}

/// The channel's allowance with its platform rules applied: a rule binds when
/// it allows later than the channel's own rules (an unsubscribe always stays).
pub fn bind(a: Allowance, b: Option<&PlatformBinding<'_>>, p: &Policy) -> Allowance {
    let Some(b) = b else { return a };
    let free = b.free_at.map(|f| p.outside_quiet(a.channel, f));
    let later = match (a.allowed_from, free) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(x), Some(f)) => x < f,
    };
    if a.state == AllowanceState::Suppressed || !later {
        return a;
    }
    let window = match b.rule.kind {
        PlatformRuleKind::CalendarMonth => Span::days(30),
        PlatformRuleKind::CalendarDay => Span::days(1),
        PlatformRuleKind::InboundWindow => b.rule.window.unwrap_or(Span::days(2)),
    };
    Allowance {
        state: AllowanceState::Capped,
        reason: b.rule.kind.reason(),
        allowed_from: free,
        cap: CapRule {
            limit: b.rule.limit,
            window,
        },
        sends_in_window: b.counted,
        ..a
    }
}
