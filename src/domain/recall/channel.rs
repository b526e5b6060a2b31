//! Channel recommendation: which channel a trigger names, and the fallbacks.

use crate::domain::engagement::{ChannelEngagement, Horizons};
use crate::domain::event::Channel;
use crate::domain::lapse::LapsePolicy;
use crate::domain::state::CustomerState;

/// A channel the caller could use for a trigger now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelCandidate {
    pub channel: Channel,
    /// Not capped, throttled, suppressed (unsubscribed) or in quiet hours at the
    /// firing time: decided by the caller.
    pub available: bool,
    /// Higher is better, e.g. [`engagement_score`].
    pub engagement: f64,
}

/// Engagement is compared in steps of this size; within one step the cheaper
/// channel wins (then the lower `Channel::index`).
pub const ENGAGEMENT_TIE_STEP: f64 = 0.01;

/// Recommended channel and ranked fallbacks: the available candidates (PHONE only
/// when `high_value`), best engagement first, the cheaper one on a tie (engagement
/// equal to [`ENGAGEMENT_TIE_STEP`]), then by channel order. `costs` is the cost
/// per send, indexed by `Channel::index()`. Duplicated candidates count once
/// (the first). Deterministic.
pub fn recommend(
    candidates: &[ChannelCandidate],
    high_value: bool,
    costs: &[i64; 5],
) -> (Option<Channel>, Vec<Channel>) {
    let mut seen = [false; 5];
    let mut ranked: Vec<(i64, i64, usize, Channel)> = Vec::with_capacity(5);
    for c in candidates {
        let i = c.channel.index();
        if seen[i] {
            continue;
        }
        seen[i] = true;
        if !c.available || (c.channel == Channel::Phone && !high_value) {
            continue;
        }
        let e = if c.engagement.is_finite() {
            c.engagement
        } else {
            0.0
        };
        let step = (e / ENGAGEMENT_TIE_STEP).round() as i64;
        ranked.push((-step, costs[i], i, c.channel));
    }
    ranked.sort_unstable();
    let mut it = ranked.into_iter().map(|r| r.3);
    let best = it.next();
    (best, it.collect())
}

/// Reorders a recommendation (`best` and ranked `fallbacks`, from
/// [`recommend`]) so the channels of `preferred` come first, in its order;
/// the others keep their order after them. Only reorders: a channel that was
/// not recommendable stays out.
pub fn prefer(
    (best, fallbacks): (Option<Channel>, Vec<Channel>),
    preferred: &[Channel],
) -> (Option<Channel>, Vec<Channel>) {
    if preferred.is_empty() {
        return (best, fallbacks);
    }
    let mut all: Vec<Channel> = best.into_iter().chain(fallbacks).collect();
    let rank = |c: &Channel| {
        preferred
            .iter()
            .position(|p| p == c)
            .unwrap_or(preferred.len())
    };
    all.sort_by_key(rank); // stable: unlisted channels keep the engagement order
    let mut it = all.into_iter();
    let best = it.next();
    (best, it.collect())
}

/// Engagement score of a channel from its long-horizon decayed counts at `now`:
/// `(opens + clicks + replies + prior_rate·prior_sends) / (sends + prior_sends)`.
/// The prior keeps a channel with one lucky send from beating an established
/// one; a channel never used scores `prior_rate`.
pub fn engagement_score(
    e: Option<&ChannelEngagement>,
    now: i64,
    h: Horizons,
    prior_rate: f64,
    prior_sends: f64,
) -> f64 {
    let (sends, signals) = match e {
        None => (0.0, 0.0),
        Some(e) => {
            let (_, long) = e.counts_at(now, h);
            (
                long.sends as f64,
                long.opens as f64 + long.clicks as f64 + long.replies as f64,
            )
        }
    };
    (signals + prior_rate * prior_sends) / (sends + prior_sends)
}

/// Candidates for every channel of a customer: engagement from
/// [`engagement_score`] with the policy's prior; available when `available(c)`
/// (caps, throttles, quiet hours: the caller's) and the customer has not
/// unsubscribed from it.
pub fn candidates(
    s: &CustomerState,
    now: i64,
    h: Horizons,
    p: &LapsePolicy,
    available: impl Fn(Channel) -> bool,
) -> Vec<ChannelCandidate> {
    Channel::ALL
        .into_iter()
        .map(|c| ChannelCandidate {
            channel: c,
            available: !s.is_unsubscribed(c) && available(c),
            engagement: engagement_score(
                s.channel(c),
                now,
                h,
                p.engagement_prior_rate,
                p.engagement_prior_sends,
            ),
        })
        .collect()
}
