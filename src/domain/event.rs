//! Typed input events: what the codec produces and the domain consumes.
//! Reply text never reaches this type: it is classified during decoding and dropped.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Contact channel, as in the Avro enum `lapse.v1.Channel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Channel {
    Wechat,
    Sms,
    Phone,
    Email,
    Social,
}

impl Channel {
    pub const ALL: [Channel; 5] = [
        Channel::Wechat,
        Channel::Sms,
        Channel::Phone,
        Channel::Email,
        Channel::Social,
    ];

    /// Symbol as written in the Avro enum.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Wechat => "WECHAT",
            Channel::Sms => "SMS",
            Channel::Phone => "PHONE",
            Channel::Email => "EMAIL",
            Channel::Social => "SOCIAL",
        }
    }

    /// Label value for metrics (lower case, bounded set).
    pub fn label(self) -> &'static str {
        match self {
            Channel::Wechat => "wechat",
            Channel::Sms => "sms",
            Channel::Phone => "phone",
            Channel::Email => "email",
            Channel::Social => "social",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn parse(symbol: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == symbol)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a message was sent. SERVICE messages (appointment reminders, pre/post-op
/// care) never count against caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Purpose {
    Marketing,
    Service,
}

impl Purpose {
    pub fn parse(symbol: &str) -> Option<Purpose> {
        match symbol {
            "MARKETING" => Some(Purpose::Marketing),
            "SERVICE" => Some(Purpose::Service),
            _ => None,
        }
    }
    /// Symbol as written in the Avro enum `lapse.v1.Purpose`.
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Marketing => "MARKETING",
            Purpose::Service => "SERVICE",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Purpose::Marketing => "marketing",
            Purpose::Service => "service",
        }
    }
}

/// Satisfaction scale of a feedback score, as in the Avro enum `lapse.v1.FeedbackKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FeedbackKind {
    /// Net Promoter Score: 0–10.
    Nps,
    /// Customer satisfaction: 1–5.
    Csat,
}

impl FeedbackKind {
    pub const ALL: [FeedbackKind; 2] = [FeedbackKind::Nps, FeedbackKind::Csat];

    pub fn parse(symbol: &str) -> Option<FeedbackKind> {
        match symbol {
            "NPS" => Some(FeedbackKind::Nps),
            "CSAT" => Some(FeedbackKind::Csat),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackKind::Nps => "NPS",
            FeedbackKind::Csat => "CSAT",
        }
    }

    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            FeedbackKind::Nps => "nps",
            FeedbackKind::Csat => "csat",
        }
    }

    /// The valid scores, inclusive.
    pub fn range(self) -> std::ops::RangeInclusive<i32> {
        match self {
            FeedbackKind::Nps => 0..=10,
            FeedbackKind::Csat => 1..=5,
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum VisitType {
    Consultation,
    Treatment,
    FollowUp,
}

impl VisitType {
    pub fn parse(symbol: &str) -> Option<VisitType> {
        match symbol {
            "CONSULTATION" => Some(VisitType::Consultation),
            "TREATMENT" => Some(VisitType::Treatment),
            "FOLLOW_UP" => Some(VisitType::FollowUp),
            _ => None,
        }
    }
}

/// What a reply said, decided on arrival. The text itself is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReplyClass {
    /// Opt-out of this channel (TD, 退订, STOP, ...).
    Unsubscribe,
    /// Explicit opt-in again after an opt-out.
    Resubscribe,
    /// Booking intent or assent: strong engagement.
    Positive,
    /// Anything else.
    Neutral,
}

impl ReplyClass {
    pub fn label(self) -> &'static str {
        match self {
            ReplyClass::Unsubscribe => "unsubscribe",
            ReplyClass::Resubscribe => "resubscribe",
            ReplyClass::Positive => "positive",
            ReplyClass::Neutral => "neutral",
        }
    }
}

/// The six input kinds; also the `event_type` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Send,
    Open,
    Click,
    Reply,
    Visit,
    Feedback,
}

/// How many input kinds (and input topics) there are.
pub const INPUT_KINDS: usize = 6;

impl EventKind {
    pub const ALL: [EventKind; INPUT_KINDS] = [
        EventKind::Send,
        EventKind::Open,
        EventKind::Click,
        EventKind::Reply,
        EventKind::Visit,
        EventKind::Feedback,
    ];

    pub fn label(self) -> &'static str {
        match self {
            EventKind::Send => "send",
            EventKind::Open => "open",
            EventKind::Click => "click",
            EventKind::Reply => "reply",
            EventKind::Visit => "visit",
            EventKind::Feedback => "feedback",
        }
    }

    /// Fully-qualified Avro record name of the input schema.
    pub fn schema_name(self) -> &'static str {
        match self {
            EventKind::Send => "lapse.v1.Send",
            EventKind::Open => "lapse.v1.Open",
            EventKind::Click => "lapse.v1.Click",
            EventKind::Reply => "lapse.v1.Reply",
            EventKind::Visit => "lapse.v1.Visit",
            EventKind::Feedback => "lapse.v1.Feedback",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Tenant and customer: the unit of state, and of the Kafka key `<tenant>/<customer>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CustomerRef {
    pub tenant: String,
    pub customer: String,
}

impl CustomerRef {
    pub fn new(tenant: impl Into<String>, customer: impl Into<String>) -> Self {
        CustomerRef {
            tenant: tenant.into(),
            customer: customer.into(),
        }
    }

    /// Parses `TENANT/CUSTOMER` (split at the first `/`; tenant ids never contain one).
    pub fn parse(s: &str) -> Option<CustomerRef> {
        let (t, c) = s.split_once('/')?;
        if t.is_empty() || c.is_empty() {
            return None;
        }
        Some(CustomerRef::new(t, c))
    }

    /// The Kafka key for this customer.
    pub fn key(&self) -> String {
        format!("{}/{}", self.tenant, self.customer)
    }
}

impl fmt::Display for CustomerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.customer)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventBody {
    Send {
        channel: Channel,
        message_id: String,
        campaign_id: Option<String>,
        purpose: Purpose,
        /// Minor currency units; `None` means the per-channel default from config.
        cost: Option<i64>,
    },
    Open {
        channel: Channel,
        message_id: String,
        campaign_id: Option<String>,
    },
    Click {
        channel: Channel,
        message_id: String,
        campaign_id: Option<String>,
    },
    Reply {
        channel: Channel,
        message_id: Option<String>,
        class: ReplyClass,
    },
    Visit {
        visit_type: VisitType,
        treatment: Option<String>,
        /// Spend in minor currency units.
        amount: i64,
        currency: String,
        /// The offer tier redeemed on this visit (as a trigger's `offer_tier`).
        offer_code: Option<String>,
        /// What the redeemed offer took off, minor units of `currency`.
        discount: Option<i64>,
    },
    Feedback {
        kind: FeedbackKind,
        /// In [`FeedbackKind::range`] (checked on decoding).
        score: u8,
        /// The visit the feedback is about, if the producer knows it.
        visit_event_id: Option<String>,
        /// Where the feedback was given.
        channel: Option<Channel>,
    },
}

/// A validated input event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: String,
    pub customer: CustomerRef,
    /// Event time, milliseconds since the Unix epoch (UTC).
    pub occurred_at: i64,
    pub body: EventBody,
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self.body {
            EventBody::Send { .. } => EventKind::Send,
            EventBody::Open { .. } => EventKind::Open,
            EventBody::Click { .. } => EventKind::Click,
            EventBody::Reply { .. } => EventKind::Reply,
            EventBody::Visit { .. } => EventKind::Visit,
            EventBody::Feedback { .. } => EventKind::Feedback,
        }
    }

    /// A marketing send's channel and cost: its own, or the channel's
    /// configured cost (`costs`, by `Channel::index`). `None` for anything else.
    pub fn marketing_send(&self, costs: &[i64; 5]) -> Option<(Channel, i64)> {
        match &self.body {
            EventBody::Send {
                channel,
                purpose: Purpose::Marketing,
                cost,
                ..
            } => Some((*channel, cost.unwrap_or(costs[channel.index()]))),
            _ => None,
        }
    }

    pub fn channel(&self) -> Option<Channel> {
        match &self.body {
            EventBody::Send { channel, .. }
            | EventBody::Open { channel, .. }
            | EventBody::Click { channel, .. }
            | EventBody::Reply { channel, .. } => Some(*channel),
            // Feedback is no engagement with a message: its channel moves no
            // allowance and no engagement count.
            EventBody::Visit { .. } | EventBody::Feedback { .. } => None,
        }
    }
}
