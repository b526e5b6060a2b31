//! Cross-channel coordination (多渠道协同, 避免重复性信息的高频出现): rules that
//! look at a customer's marketing on every channel at once.
//!
//! * **Touch cap**: at most `limit` marketing sends across all channels per
//!   rolling `window`. When it binds, every channel's allowance is `CAPPED`
//!   with reason [`CROSS_CHANNEL_CAP`] until the window frees a slot; the
//!   throttle events then carry rule scope `CROSS_CHANNEL`. It counts the
//!   sends each channel already keeps (`ChannelControl::sends`), so it needs no
//!   state of its own: the window may not exceed the shortest channel cap
//!   window (checked at start-up), and a channel that broke its own cap more
//!   than twice over in its window counts as 2 × its cap.
//! * **One campaign, one channel**: once a campaign reached the customer on a
//!   channel, no other channel may carry it for `campaign_lock` after that
//!   channel's latest send of it. Remembered as a 6-byte hash of the campaign
//!   id per (campaign, channel), at most [`MAX_CAMPAIGN_TOUCHES`] per customer.
//!   Per customer and campaign, so it is answered by the allowance API
//!   (`?campaign=`) and enforced as a violation, not published per campaign.
//!
//! Both are off by default: the seeds name no cross-channel figure, and
//! turning them on changes the allowances every existing sender receives.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::allowance::{Allowance, AllowanceState, ChannelControl};
use super::event::Channel;
use super::policy::{CapRule, Policy, MAX_CAP};
use super::span::Span;
use super::state::IdHash;

/// Reason of an allowance the cross-channel touch cap decides.
pub const CROSS_CHANNEL_CAP: &str = "cross_channel_cap";
/// Reason of a campaign allowance closed because the campaign went out on another channel.
pub const CAMPAIGN_ON_OTHER_CHANNEL: &str = "campaign_on_other_channel";
/// At most this many (campaign, channel) touches are remembered per customer.
pub const MAX_CAMPAIGN_TOUCHES: usize = 16;

/// `[policy.cross_channel]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CrossChannelPolicy {
    /// Marketing sends allowed across all channels per `window`; 0 = no cap.
    pub limit: u32,
    /// Rolling window of the touch cap.
    pub window: Span,
    /// How long a campaign stays on the channel that carried it; 0 = no lock.
    pub campaign_lock: Span,
}

impl Default for CrossChannelPolicy {
    fn default() -> Self {
        CrossChannelPolicy {
            limit: 0,
            window: Span::days(1),
            campaign_lock: Span::secs(0),
        }
    }
}

impl CrossChannelPolicy {
    /// The touch cap, when on.
    pub fn cap(&self) -> Option<CapRule> {
        (self.limit > 0).then_some(CapRule {
            limit: self.limit,
            window: self.window,
        })
    }

    /// Checks the values against the resolved channel caps.
    pub fn validate(&self, key: &str, caps: &[CapRule; 5]) -> Result<(), (String, String)> {
        if self.limit > MAX_CAP {
            return Err((
                format!("{key}.limit"),
                format!("must be between 0 (off) and {MAX_CAP}"),
            ));
        }
        let shortest = caps.iter().map(|c| c.window).min().unwrap_or(self.window);
        if self.limit > 0 && (self.window < Span::secs(60) || self.window > shortest) {
            return Err((
                format!("{key}.window"),
                format!(
                    "must be between 1m and the shortest channel cap window ({shortest}): \
                     the touch cap counts the sends each channel keeps for its own window"
                ),
            ));
        }
        if self.campaign_lock > Span::days(366) {
            return Err((
                format!("{key}.campaign_lock"),
                "must be at most 366d (0 turns the lock off)".into(),
            ));
        }
        Ok(())
    }
}

/// The touch cap binding at `t`: when a marketing send is allowed again across
/// channels, and the touches counted now. `None` when the cap is off or not reached.
pub fn touch_cap_free_at(
    controls: &[Option<ChannelControl>; 5],
    p: &Policy,
    t: i64,
) -> Option<(i64, u32)> {
    let rule = p.cross_channel.cap()?;
    let w = rule.window.as_ms();
    let mut sends: Vec<i64> = controls
        .iter()
        .flatten()
        .flat_map(|c| c.sends.iter().copied())
        .filter(|s| *s > t - w && *s <= t)
        .collect();
    let in_window =
        |x: i64, sends: &[i64]| sends.iter().filter(|s| **s > x - w && **s <= x).count();
    let now = in_window(t, &sends) as u32;
    if now < rule.limit {
        return None;
    }
    sends.sort_unstable();
    // A slot frees when a send leaves the window; sends are never in the future of `t`.
    let free = sends
        .iter()
        .map(|s| s + w)
        .find(|x| (in_window(*x, &sends) as u32) < rule.limit)
        .unwrap_or(t + w);
    Some((free, now))
}

/// The channel's own allowance with the touch cap applied: the cap binds when it
/// allows later than the channel's own rules (an unsubscribe always stays).
pub fn bind_touch_cap(a: Allowance, cap: Option<(i64, u32)>, p: &Policy) -> Allowance {
    let (Some((free, counted)), Some(rule)) = (cap, p.cross_channel.cap()) else {
        return a;
    };
    let free = p.outside_quiet(a.channel, free);
    if a.state == AllowanceState::Suppressed || a.allowed_from.is_none_or(|x| x >= free) {
        return a;
    }
    Allowance {
        state: AllowanceState::Capped,
        reason: CROSS_CHANNEL_CAP,
        allowed_from: Some(free),
        cap: rule,
        sends_in_window: counted,
        ..a
    }
}

/// A campaign's latest marketing send to the customer on one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignTouch {
    pub campaign: IdHash,
    pub channel: Channel,
    pub at: i64,
}

/// The stored hash of a campaign id (first 6 bytes of SHA-256; stored, never change it).
pub fn campaign_hash(campaign_id: &str) -> IdHash {
    let d = Sha256::digest(campaign_id.as_bytes());
    IdHash::from_bytes([d[0], d[1], d[2], d[3], d[4], d[5]])
}

/// Until when `campaign` may not go out on `c` at `t` because another channel carried it.
pub fn campaign_locked_until(
    touches: &[CampaignTouch],
    campaign: IdHash,
    c: Channel,
    p: &Policy,
    t: i64,
) -> Option<(i64, Channel)> {
    let lock = p.cross_channel.campaign_lock.as_ms();
    if lock == 0 {
        return None;
    }
    touches
        .iter()
        .filter(|x| x.campaign == campaign && x.channel != c && x.at <= t && t < x.at + lock)
        .map(|x| (x.at + lock, x.channel))
        .max()
}

/// Remembers that `campaign` went out on `c` at `t` (when the lock is on).
/// Keeps the latest time per (campaign, channel), drops what can no longer
/// lock anything, and at most [`MAX_CAMPAIGN_TOUCHES`] (the oldest go first).
/// Sorted by time, then campaign and channel, so the result is independent of
/// the order sends are applied in.
pub fn record_campaign_touch(
    touches: &mut Vec<CampaignTouch>,
    campaign: IdHash,
    c: Channel,
    p: &Policy,
    t: i64,
) {
    let lock = p.cross_channel.campaign_lock.as_ms();
    if lock == 0 {
        return;
    }
    match touches
        .iter_mut()
        .find(|x| x.campaign == campaign && x.channel == c)
    {
        Some(x) => x.at = x.at.max(t),
        None => touches.push(CampaignTouch {
            campaign,
            channel: c,
            at: t,
        }),
    }
    let latest = touches.iter().map(|x| x.at).max().unwrap_or(t);
    touches.retain(|x| x.at + lock > latest);
    touches.sort_unstable_by_key(|x| (x.at, x.campaign, x.channel));
    if touches.len() > MAX_CAMPAIGN_TOUCHES {
        let drop = touches.len() - MAX_CAMPAIGN_TOUCHES;
        touches.drain(..drop);
    }
}

/// A channel's allowance for one campaign: its allowance, closed while the
/// campaign is locked to another channel.
pub fn bind_campaign_lock(a: Allowance, locked: Option<(i64, Channel)>, p: &Policy) -> Allowance {
    let Some((until, _)) = locked else {
        return a;
    };
    let until = p.outside_quiet(a.channel, until);
    if a.state == AllowanceState::Suppressed || a.allowed_from.is_none_or(|x| x >= until) {
        return a;
    }
    Allowance {
        state: AllowanceState::Capped,
        reason: CAMPAIGN_ON_OTHER_CHANNEL,
        allowed_from: Some(until),
        ..a
    }
}
