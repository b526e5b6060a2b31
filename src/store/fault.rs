//! Permanent Redis errors: the ones that waiting does not cure (a command
//! spanning Cluster slots, a Cluster used as a single node, scripts Redis keeps refusing, a key of the wrong
//! type, credentials or ACL refused). They are still retried with back-off
//! (nothing is committed, nothing is lost, and an operator's fix is picked up
//! without a restart), but they are told apart from an unreachable Redis:
//! counted by kind, logged with what to do, and shown by `/readyz`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use redis::{ErrorKind, RedisError};
use tracing::error;

use crate::error::{BatchError, StoreError};
use crate::metrics::Metrics;

/// The bounded `kind` label of `lapse_redis_permanent_errors_total`.
pub const KINDS: [&str; 5] = ["cross_slot", "moved", "noscript", "wrong_type", "auth"];

/// The kind of a permanent error, None for one that may pass (connection
/// lost, timeout, failover in progress, server loading).
pub fn permanent_kind(e: &RedisError) -> Option<&'static str> {
    match e.kind() {
        ErrorKind::CrossSlot => return Some("cross_slot"),
        // Surfaces only once reloading the scripts did not help.
        ErrorKind::NoScriptError => return Some("noscript"),
        ErrorKind::AuthenticationFailed => return Some("auth"),
        // A Cluster client follows redirects itself: on a single-node
        // connection a redirect means Redis is a Cluster.
        ErrorKind::Moved | ErrorKind::Ask => return Some("moved"),
        _ => {}
    }
    match e.code() {
        Some("WRONGTYPE") => Some("wrong_type"),
        Some("NOAUTH" | "WRONGPASS" | "NOPERM") => Some("auth"),
        Some("CROSSSLOT") => Some("cross_slot"),
        Some("NOSCRIPT") => Some("noscript"),
        _ => None,
    }
}

/// What an operator should do about an error of `kind` (None: transient).
pub fn hint(kind: Option<&str>) -> &'static str {
    match kind {
        Some("cross_slot") => "a command spanned Redis Cluster hash slots: set redis.cluster = true when Redis is a Cluster; otherwise this is a lapse bug, please report it",
        Some("moved") => "Redis is a Cluster (it redirects keys to other nodes): set redis.cluster = true",
        Some("noscript") => "Redis keeps losing or refusing lapse's Lua scripts: allow EVALSHA and SCRIPT LOAD for lapse's user (ACL, rename-command)",
        Some("wrong_type") => "a key under redis.key_prefix holds another type: another application writes there; give lapse its own key_prefix or database",
        Some("auth") => "Redis refused the credentials or the ACL: check the user and password in redis.url and that the user may run GET, SET, GETRANGE, ZADD, SADD, EVALSHA and SCRIPT LOAD on lapse's keys",
        _ => "is Redis reachable at redis.url? lapse retries with back-off",
    }
}

/// The permanent Redis errors in force, per retried step (the batch's state
/// write, the timer loop), for `/readyz`: set when the step fails
/// permanently, cleared when it next succeeds. Cheap to clone.
#[derive(Clone, Default)]
pub struct RedisFault(Arc<Mutex<BTreeMap<&'static str, String>>>);

impl RedisFault {
    /// Records `e` against `step` if it is permanent; returns its kind.
    pub fn report(&self, step: &'static str, e: &StoreError) -> Option<&'static str> {
        let StoreError::Redis(r) = e else {
            return None;
        };
        let kind = permanent_kind(r)?;
        self.lock().insert(step, e.to_string());
        Some(kind)
    }

    /// Records a condition that is not a Redis error but keeps `step` from
    /// succeeding (e.g. replicas missing for `redis.durability = "replicas"`).
    pub fn set(&self, step: &'static str, reason: String) {
        self.lock().insert(step, reason);
    }

    /// `step` succeeded: its permanent error, if any, is over.
    pub fn clear(&self, step: &'static str) {
        self.lock().remove(step);
    }

    /// The errors in force, each with what to do about it.
    pub fn reason(&self) -> Option<String> {
        let m = self.lock();
        (!m.is_empty()).then(|| {
            m.iter()
                .map(|(step, e)| format!("{step}: {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Reports a failed step that its caller retries with back-off: a permanent
/// Redis error is counted by kind, logged at error level with what to do and
/// shown by `/readyz`. Returns false for anything else (the caller logs it as
/// an outage).
pub fn report(metrics: &Metrics, step: &'static str, e: &BatchError) -> bool {
    let BatchError::Store(s) = e else {
        return false;
    };
    let Some(kind) = metrics.redis_fault.report(step, s) else {
        return false;
    };
    metrics
        .redis_permanent_errors
        .with_label_values(&[kind])
        .inc();
    error!(error = %s, kind, "{step} failed with a Redis error that waiting does not cure; retrying with back-off until it is fixed, /readyz reports it");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_errors_are_told_from_transient_ones() {
        let cross: RedisError = (ErrorKind::CrossSlot, "Received crossed slots in pipeline").into();
        assert_eq!(permanent_kind(&cross), Some("cross_slot"));
        let io: RedisError = std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
        assert_eq!(permanent_kind(&io), None);
        let fault = RedisFault::default();
        assert_eq!(fault.report("state write", &StoreError::Redis(io)), None);
        assert_eq!(fault.reason(), None);
        let e = StoreError::Redis(cross);
        assert_eq!(fault.report("state write", &e), Some("cross_slot"));
        let reason = fault.reason().unwrap();
        assert!(reason.starts_with("state write: "), "{reason}");
        assert!(reason.contains("redis.cluster = true"), "{reason}");
        fault.clear("timers");
        assert!(
            fault.reason().is_some(),
            "another step's success clears nothing"
        );
        fault.clear("state write");
        assert_eq!(fault.reason(), None);
    }
}
