//! An input record copied out of librdkafka's buffers, so batches can cross threads.

use std::time::Instant;

use crate::domain::event::EventKind;

#[derive(Debug, Clone)]
pub struct InputRecord {
    pub kind: EventKind,
    pub topic: std::sync::Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Broker/producer timestamp, ms.
    pub timestamp_ms: Option<i64>,
    /// When the consumer's poll returned it (the start of lapse's own latency).
    pub received: Instant,
}
