//! Permanent Redis errors: the ones that waiting does not cure (a command
//! spanning Cluster slots, a Cluster used as a single node, scripts Redis keeps refusing, a key of the wrong
//! type, credentials or ACL refused). They are still retried with back-off
//! (nothing is committed, nothing is lost, and an operator's fix is picked up
//! without a restart), but they are told apart from an unreachable Redis:
//! counted by kind, logged with what to do, and shown by `/readyz`.
//!
//! [`Faults`] is what `/readyz` shows: those permanent errors and, per
//! component (Redis, the broker, the schema registry), why it cannot be
//! reached (start-up steps and the periodic readiness probe).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use redis::{ErrorKind, RedisError};
use tracing::error;

use crate::error::{BatchError, StoreError};
use crate::metrics::Metrics;

/// The bounded `kind` label of `lapse_redis_permanent_errors_total`.
pub const KINDS: [&str; 6] = [
    "cross_slot",
    "moved",
    "noscript",
    "wrong_type",
    "auth",
    "tls",
];

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
    if e.kind() == ErrorKind::IoError && is_tls_failure(&e.to_string()) {
        return Some("tls");
    }
    match e.code() {
        Some("WRONGTYPE") => Some("wrong_type"),
        Some("NOAUTH" | "WRONGPASS" | "NOPERM") => Some("auth"),
        Some("CROSSSLOT") => Some("cross_slot"),
        Some("NOSCRIPT") => Some("noscript"),
        _ => None,
    }
}

/// A refused TLS handshake (untrusted, expired or mismatching certificate, a
/// client certificate required or refused), as rustls words it.
fn is_tls_failure(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    ["certificate", "handshake", "tls", "alert", "unknownissuer"]
        .iter()
        .any(|w| t.contains(w))
}

/// What an operator should do about `e`: [`hint`] of its kind, made precise
/// for a refused TLS handshake (which side refused, and which setting to fix).
pub fn hint_for(e: &RedisError) -> &'static str {
    let kind = permanent_kind(e);
    if kind != Some("tls") {
        return hint(kind);
    }
    let t = e.to_string().to_ascii_lowercase();
    // Redis' alert first: "received fatal alert: CertificateExpired" is
    // lapse's client certificate, not Redis' one.
    if t.contains("received fatal alert") && t.contains("certificateexpired") {
        "Redis refused lapse's client certificate as expired (or not valid yet): renew the one in redis.tls_cert_file"
    } else if t.contains("received fatal alert") {
        "Redis refused the TLS handshake, most likely lapse's client certificate: set redis.tls_cert_file and redis.tls_key_file to a certificate signed by the CA Redis trusts (tls-auth-clients)"
    } else if t.contains("expired") || t.contains("notvalidyet") || t.contains("not valid after") {
        "Redis' certificate has expired (or is not valid yet): renew it; lapse checks it against redis.tls_ca_file"
    } else if t.contains("notvalidforname") || t.contains("not valid for name") {
        "Redis' certificate does not name the host in redis.url: connect by a name (or IP) the certificate lists"
    } else if t.contains("peer certificate")
        || t.contains("unknownissuer")
        || t.contains("badsignature")
    {
        "lapse does not trust Redis' certificate: set redis.tls_ca_file to the CA that signed it (without it, the system's trust store is used)"
    } else if t.contains("alert") {
        "Redis refused the TLS handshake, most likely lapse's client certificate: set redis.tls_cert_file and redis.tls_key_file to a certificate signed by the CA Redis trusts (tls-auth-clients)"
    } else {
        hint(kind)
    }
}

/// What an operator should do about an error of `kind` (None: transient).
pub fn hint(kind: Option<&str>) -> &'static str {
    match kind {
        Some("cross_slot") => "a command spanned Redis Cluster hash slots: set redis.cluster = true when Redis is a Cluster; otherwise this is a lapse bug, please report it",
        Some("moved") => "Redis is a Cluster (it redirects keys to other nodes): set redis.cluster = true",
        Some("noscript") => "Redis keeps losing or refusing lapse's Lua scripts: allow EVALSHA and SCRIPT LOAD for lapse's user (ACL, rename-command)",
        Some("wrong_type") => "a key under redis.key_prefix holds another type: another application writes there; give lapse its own key_prefix or database",
        Some("auth") => "Redis refused the credentials or the ACL: check redis.username and redis.password (redis.password_file, LAPSE_REDIS_PASSWORD) and that the user's ACL is the one in the README's Security section (lapse's commands on lapse's keys)",
        Some("tls") => "the TLS handshake with Redis failed: check redis.tls_ca_file (the CA that signed Redis' certificate), that Redis' certificate names the host in redis.url and has not expired, and redis.tls_cert_file / redis.tls_key_file when Redis requires client certificates (tls-auth-clients)",
        _ => "is Redis reachable at redis.url? lapse retries with back-off",
    }
}

/// What keeps lapse from being ready, for `/readyz` and `lapse_ready`: per
/// component (`redis`, `broker`, `registry`) and step (`connect`, `probe`,
/// `state write`, ...), the error in force. A step sets its entry when it
/// fails and clears it when it next succeeds; lapse is ready when nothing is
/// in force. The permanent Redis errors of the retried steps (the batch's
/// state write, the timer loop) are entries of component `redis`. Every
/// reason is scrubbed of configured secrets ([`crate::secret::scrub`]).
/// Cheap to clone.
#[derive(Clone, Default)]
pub struct Faults(Arc<Mutex<BTreeMap<(&'static str, &'static str), String>>>);

/// The name the permanent-error reporting code has always used.
pub type RedisFault = Faults;

/// The components `/readyz` names.
pub const COMPONENTS: [&str; 3] = ["redis", "broker", "registry"];

impl Faults {
    /// Records `e` against `step` if it is permanent; returns its kind.
    pub fn report(&self, step: &'static str, e: &StoreError) -> Option<&'static str> {
        let StoreError::Redis(r) = e else {
            return None;
        };
        let kind = permanent_kind(r)?;
        self.set("redis", step, e.to_string());
        Some(kind)
    }

    /// `step` succeeded: its permanent error, if any, is over.
    pub fn clear(&self, step: &'static str) {
        self.clear_in("redis", step);
    }

    /// `component` is not ready because `step` failed with `reason`.
    pub fn set(&self, component: &'static str, step: &'static str, reason: impl AsRef<str>) {
        let reason = crate::secret::scrub(reason.as_ref()).into_owned();
        self.lock().insert((component, step), reason);
    }

    /// `component`'s `step` succeeded.
    pub fn clear_in(&self, component: &'static str, step: &'static str) {
        self.lock().remove(&(component, step));
    }

    /// True when nothing keeps lapse from being ready.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The errors in force, each with what to do about it, one per line.
    pub fn reason(&self) -> Option<String> {
        let m = self.lock();
        (!m.is_empty()).then(|| {
            m.iter()
                .map(|((_, step), e)| format!("{step}: {e}"))
                .collect::<Vec<_>>()
                .join("\n")
        })
    }

    /// Per component not ready, its steps' errors (`step: error`, joined by `; `).
    pub fn by_component(&self) -> BTreeMap<&'static str, String> {
        let mut out: BTreeMap<&'static str, String> = BTreeMap::new();
        for ((component, step), e) in self.lock().iter() {
            let entry = out.entry(component).or_default();
            if !entry.is_empty() {
                entry.push_str("; ");
            }
            entry.push_str(&format!("{step}: {e}"));
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(&'static str, &'static str), String>> {
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
