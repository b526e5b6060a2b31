//! Deterministic ids of episodes, triggers and outcomes. These are part of the
//! output contract: never change the domain strings or the encoding.

use sha2::{Digest, Sha256};
use std::fmt;

use super::records::OutcomeKind;
use crate::domain::event::CustomerRef;
use crate::domain::lapse::Stage;

/// SHA-256 of the parts, each prefixed with its length (u64 big-endian), so no
/// two different part lists hash the same input.
pub(super) fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// First 16 bytes as 32 lower-case hex digits.
fn hex128(d: &[u8; 32]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(32);
    for b in &d[..16] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Id of the episode of `c` that starts at `start` (the last visit time, ms).
pub fn episode_id(c: &CustomerRef, start: i64) -> String {
    hex128(&digest(&[
        b"lapse.episode.v1",
        c.tenant.as_bytes(),
        c.customer.as_bytes(),
        start.to_string().as_bytes(),
    ]))
}

/// Id of a trigger: tenant, customer, episode (its start), stage symbol, attempt.
pub fn trigger_id(c: &CustomerRef, episode_start: i64, stage: Stage, attempt: u32) -> String {
    hex128(&digest(&[
        b"lapse.trigger.v1",
        c.tenant.as_bytes(),
        c.customer.as_bytes(),
        episode_start.to_string().as_bytes(),
        stage.as_str().as_bytes(),
        attempt.to_string().as_bytes(),
    ]))
}

/// Id of an outcome: its trigger id and kind.
pub fn outcome_id(trigger_id: &str, kind: OutcomeKind) -> String {
    hex128(&digest(&[
        b"lapse.outcome.v1",
        trigger_id.as_bytes(),
        kind.as_str().as_bytes(),
    ]))
}

/// Id of the care call a feedback event started: tenant, customer and the
/// feedback's event id (one care call per feedback event, however often it
/// is re-sent or re-read).
pub fn care_call_id(c: &CustomerRef, feedback_event_id: &str) -> String {
    hex128(&digest(&[
        b"lapse.care_call.v1",
        c.tenant.as_bytes(),
        c.customer.as_bytes(),
        feedback_event_id.as_bytes(),
    ]))
}
