//! Which rule an allowance comes from, told by its reason: the allowance
//! API's `rule` and the throttle event's `rule_scope`.

use super::cross_channel::{CAMPAIGN_ON_OTHER_CHANNEL, CROSS_CHANNEL_CAP};
use super::platform::is_platform_reason;

/// Which kind of rule an allowance's reason comes from (the allowance API's
/// `rule`, the throttle event's `rule_scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingRule {
    /// The channel's own rules: cap, throttle, unsubscribe, quiet hours.
    Channel,
    /// The cap on marketing touches across all channels.
    CrossChannel,
    /// One campaign, one channel.
    CampaignChannel,
    /// A messaging platform's limit (`policy.platform_rules`).
    Platform,
}

impl BindingRule {
    pub fn as_str(self) -> &'static str {
        match self {
            BindingRule::Channel => "CHANNEL",
            BindingRule::CrossChannel => "CROSS_CHANNEL",
            BindingRule::CampaignChannel => "CAMPAIGN_CHANNEL",
            BindingRule::Platform => "PLATFORM",
        }
    }
}

pub fn binding_rule(reason: &str) -> BindingRule {
    match reason {
        CROSS_CHANNEL_CAP => BindingRule::CrossChannel,
        CAMPAIGN_ON_OTHER_CHANNEL => BindingRule::CampaignChannel,
        r if is_platform_reason(r) => BindingRule::Platform,
        _ => BindingRule::Channel,
    }
}
