//! What every lapse Kafka client (consumer, producer, admin) shares: the last
//! client error, kept for `/readyz` and logged with bounded volume.

use std::sync::{Arc, Mutex};

use crate::kafka::tls_check::{self, TlsCheck};
use crate::retry::{LogLimiter, REPEAT_LOG_EVERY};

/// The last error librdkafka reported to a client's context (it says why a
/// broker is unreachable: connection refused, TLS handshake failed,
/// SASL authentication failed), and the limiter of its log lines: librdkafka
/// reports every failed reconnect, which an outage must not turn into a
/// flood of lines. Cheap to clone.
#[derive(Clone)]
pub struct ClientErrors(Arc<Inner>);

struct Inner {
    state: Mutex<State>,
    /// Shared by the short-lived clients of one purpose (the admin probes of
    /// every start-up attempt), so a cause is logged once a minute.
    limiter: Arc<Mutex<LogLimiter>>,
    /// With TLS and a CA file: how to check a refused broker certificate.
    tls: Option<TlsCheck>,
}

struct State {
    last: Option<String>,
    /// What to fix, when `last` is a refused TLS handshake or SASL login.
    hint: Option<&'static str>,
}

/// A log limiter for [`ClientErrors::sharing`].
pub fn shared_limiter() -> Arc<Mutex<LogLimiter>> {
    Arc::new(Mutex::new(LogLimiter::new(REPEAT_LOG_EVERY)))
}

impl Default for ClientErrors {
    fn default() -> Self {
        Self::new(None, shared_limiter())
    }
}

impl ClientErrors {
    /// For a client of `cfg`: a refused broker certificate is checked
    /// against `kafka.ssl_ca_file` to say why.
    pub fn for_config(cfg: &crate::config::KafkaConfig) -> Self {
        Self::sharing(cfg, shared_limiter())
    }

    /// [`for_config`](Self::for_config), logging through `limiter`.
    pub fn sharing(cfg: &crate::config::KafkaConfig, limiter: Arc<Mutex<LogLimiter>>) -> Self {
        let check = match (&cfg.ssl_ca_file, cfg.security_protocol.tls()) {
            (Some(ca), true) => Some(TlsCheck {
                ca_file: ca.clone(),
                hostname_verification: cfg.ssl_hostname_verification,
            }),
            _ => None,
        };
        Self::new(check, limiter)
    }

    fn new(tls: Option<TlsCheck>, limiter: Arc<Mutex<LogLimiter>>) -> Self {
        ClientErrors(Arc::new(Inner {
            state: Mutex::new(State {
                last: None,
                hint: None,
            }),
            limiter,
            tls,
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `error` (with librdkafka's `reason`) and logs it unless the same
    /// message was logged less than a minute ago.
    pub fn record(&self, client: &str, error: &rdkafka::error::KafkaError, reason: &str) {
        let message = if reason.is_empty() || error.to_string().contains(reason) {
            error.to_string()
        } else {
            format!("{error}: {reason}")
        };
        self.keep(client, normalize(&message));
    }

    /// A librdkafka log line: one at error level (a failed connection, TLS
    /// handshake or SASL authentication) is kept like an error. A client
    /// whose error events nobody polls learns why the broker is unreachable
    /// only this way.
    pub fn record_log(&self, client: &str, level: rdkafka::config::RDKafkaLogLevel, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        if matches!(level, L::Emerg | L::Alert | L::Critical | L::Error) {
            self.keep(client, normalize(message));
        }
    }

    /// librdkafka reports one cause several times in other words (as a log
    /// line and as an error, per broker address, then "all brokers down"):
    /// the first wording of a cause stays, and the log limiter counts a
    /// cause, not a wording.
    fn keep(&self, client: &str, message: String) {
        let hint = security_hint(&message);
        let mut g = self.state();
        if g.last.is_some() && message.contains("AllBrokersDown") {
            return;
        }
        let admitted = self
            .0
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(hint.unwrap_or(&message));
        if let Some(suppressed) = admitted {
            match hint {
                Some(hint) => tracing::warn!(error = %message, hint, suppressed, "{client} error"),
                None => tracing::warn!(error = %message, suppressed, "{client} error"),
            }
        }
        if hint.is_none() || g.hint != hint {
            g.last = Some(message);
            g.hint = hint;
        }
    }

    /// The last error reported, if any.
    pub fn last(&self) -> Option<String> {
        self.state().last.clone()
    }

    /// `e` with the last client error, which usually says more (and, for a
    /// refused TLS handshake or SASL login, what to fix).
    pub fn explain(&self, e: &rdkafka::error::KafkaError) -> String {
        self.explain_with(e, false)
    }

    /// [`explain`](Self::explain), and a refused broker certificate checked
    /// to say why (expired, another host, an unknown CA). Blocks for up to
    /// a few seconds (a TLS handshake with the broker).
    pub fn explain_checked(&self, e: &rdkafka::error::KafkaError) -> String {
        self.explain_with(e, true)
    }

    fn explain_with(&self, e: &rdkafka::error::KafkaError, check: bool) -> String {
        let (last, hint) = {
            let g = self.state();
            (g.last.clone(), g.hint)
        };
        match (last, hint) {
            (Some(last), Some(hint)) => {
                let hint = match &self.0.tls {
                    Some(tls) if check && hint == CERTIFICATE_REFUSED => {
                        tls_check::diagnose(&last, tls).unwrap_or(hint)
                    }
                    _ => hint,
                };
                // Without librdkafka's wording, which varies between
                // attempts (logged above): the reason stays the same.
                match tls_check::broker_address(&last) {
                    Some((host, port)) => format!("{e}: {hint} (broker {host}:{port})"),
                    None => format!("{e}: {hint}"),
                }
            }
            (Some(last), None) if !e.to_string().contains(&last) => {
                format!("{e} (last client error: {last}; check kafka.brokers and the [kafka] security settings)")
            }
            _ => format!("{e} (check kafka.brokers and the [kafka] security settings)"),
        }
    }
}

/// librdkafka's message without what changes at every retry (`(after 3ms in
/// state SSL_HANDSHAKE)`, also `(after ..., 2 identical error(s)
/// suppressed)`) or repeats the address (a log line's thread name).
fn normalize(message: &str) -> String {
    let mut m = message.trim();
    // A log line's "[thrd:ssl://host:port/bootstrap]: " (the address follows).
    if m.starts_with("[thrd:") {
        if let Some(i) = m.find("]: ") {
            m = &m[i + 3..];
        }
    }
    if m.ends_with(')') {
        if let Some(i) = m.rfind(" (after ") {
            m = &m[..i];
        }
    }
    m.to_owned()
}

/// OpenSSL refused the broker's certificate, without saying why.
const CERTIFICATE_REFUSED: &str = "lapse refused the broker's certificate: set kafka.ssl_ca_file to the CA that signed it (without it, the system's trust store is used); the certificate must also name the broker's host and be valid now";

/// What to fix, when librdkafka's `message` is a refused TLS handshake or
/// SASL login (OpenSSL's and librdkafka's wording).
pub fn security_hint(message: &str) -> Option<&'static str> {
    let t = message.to_ascii_lowercase();
    if t.contains("certificate verify failed") {
        Some(CERTIFICATE_REFUSED)
    } else if t.contains("alert") && t.contains("certificate") {
        Some("the broker refused lapse's client certificate (missing, expired or not signed by a CA it trusts): set kafka.ssl_certificate_file and kafka.ssl_key_file")
    } else if t.contains("ssl handshake failed") || t.contains("wrong version number") {
        Some("the TLS handshake with the broker failed: check kafka.security_protocol (TLS on both sides?), kafka.ssl_ca_file, and kafka.ssl_certificate_file / kafka.ssl_key_file when the broker requires client certificates")
    } else if t.contains("sasl") && t.contains("mechanism") {
        Some("the broker does not offer kafka.sasl_mechanism (or SASL at all): check kafka.sasl_mechanism and kafka.security_protocol")
    } else if t.contains("sasl") && (t.contains("authentication") || t.contains("unknown-user")) {
        Some("the broker refused the SASL login: check kafka.sasl_username and kafka.sasl_password (kafka.sasl_password_file, LAPSE_KAFKA_SASL_PASSWORD) and kafka.sasl_mechanism")
    } else {
        None
    }
}

/// The typed `[kafka]` security keys as librdkafka properties, set on every
/// client before the raw `consumer_properties` / `producer_properties` (which
/// may still override them). The password goes only to librdkafka.
pub fn apply_security(cc: &mut rdkafka::config::ClientConfig, cfg: &crate::config::KafkaConfig) {
    let p = cfg.security_protocol;
    cc.set("security.protocol", p.as_str());
    if p.tls() {
        cc.set(
            "ssl.endpoint.identification.algorithm",
            if cfg.ssl_hostname_verification {
                "https"
            } else {
                "none"
            },
        );
        cc.set("enable.ssl.certificate.verification", "true");
        if let Some(f) = &cfg.ssl_ca_file {
            cc.set("ssl.ca.location", f.display().to_string());
        }
        if let Some(f) = &cfg.ssl_certificate_file {
            cc.set("ssl.certificate.location", f.display().to_string());
        }
        if let Some(f) = &cfg.ssl_key_file {
            cc.set("ssl.key.location", f.display().to_string());
        }
    }
    if p.sasl() {
        if let Some(m) = cfg.sasl_mechanism {
            cc.set("sasl.mechanisms", m.as_str());
        }
        if let Some(u) = &cfg.sasl_username {
            cc.set("sasl.username", u);
        }
        if let Some(pw) = &cfg.sasl_password {
            cc.set("sasl.password", pw.expose());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn librdkafka_messages_are_normalised_and_their_setting_named() {
        assert_eq!(
            normalize("[thrd:ssl://127.0.0.1:9093/bootstrap]: ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified (after 3ms in state SSL_HANDSHAKE, 2 identical error(s) suppressed)"),
            "ssl://127.0.0.1:9093/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified"
        );
        // The wordings seen from librdkafka 2.12 with OpenSSL 3 against tansu
        // behind a TLS terminator (tests/security.rs).
        let cases = [
            ("ssl://h:1/bootstrap: SSL handshake failed: error:0A000086:SSL routines::certificate verify failed: broker certificate could not be verified", "kafka.ssl_ca_file"),
            ("ssl://h:1/bootstrap: Receive failed: error:0A00045C:SSL routines::tlsv13 alert certificate required: SSL alert number 116", "kafka.ssl_certificate_file"),
            ("ssl://h:1/bootstrap: Receive failed: error:0A000415:SSL routines::sslv3 alert certificate expired: SSL alert number 45", "kafka.ssl_certificate_file"),
            ("sasl_plaintext://h:1/bootstrap: SASL authentication error: SASL SCRAM authentication failed: broker responded with unknown-user", "kafka.sasl_password"),
            ("sasl_plaintext://h:1/bootstrap: SASL SCRAM-SHA-256 mechanism handshake failed: Broker: Unsupported SASL mechanism: broker's supported mechanisms: PLAIN", "kafka.sasl_mechanism"),
        ];
        for (message, setting) in cases {
            let hint = security_hint(message).unwrap_or_else(|| panic!("no hint for {message}"));
            assert!(hint.contains(setting), "{message}: {hint}");
        }
        assert_eq!(security_hint("ipv4#127.0.0.1:1: Connection refused"), None);
    }
    use crate::config::{KafkaConfig, SaslMechanism, SecurityProtocol};
    use crate::secret::Secret;

    #[test]
    fn typed_security_keys_become_librdkafka_properties() {
        let mut cfg = KafkaConfig::default();
        let mut cc = rdkafka::config::ClientConfig::new();
        apply_security(&mut cc, &cfg);
        assert_eq!(cc.get("security.protocol"), Some("plaintext"));
        assert_eq!(cc.get("sasl.password"), None);

        cfg.security_protocol = SecurityProtocol::SaslSsl;
        cfg.sasl_mechanism = Some(SaslMechanism::ScramSha512);
        cfg.sasl_username = Some("lapse".into());
        cfg.sasl_password = Some(Secret::new("kafka-secret"));
        cfg.ssl_ca_file = Some("/etc/ca.pem".into());
        cfg.ssl_certificate_file = Some("/etc/client.pem".into());
        cfg.ssl_key_file = Some("/etc/client.key".into());
        let mut cc = rdkafka::config::ClientConfig::new();
        apply_security(&mut cc, &cfg);
        for (k, v) in [
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "lapse"),
            ("sasl.password", "kafka-secret"),
            ("ssl.ca.location", "/etc/ca.pem"),
            ("ssl.certificate.location", "/etc/client.pem"),
            ("ssl.key.location", "/etc/client.key"),
            ("ssl.endpoint.identification.algorithm", "https"),
            ("enable.ssl.certificate.verification", "true"),
        ] {
            assert_eq!(cc.get(k), Some(v), "{k}");
        }
        // librdkafka itself accepts SASL_SSL with SCRAM (this build has
        // OpenSSL); it checks the files at creation, which do not exist here.
        let mut no_files = cfg.clone();
        no_files.ssl_ca_file = None;
        no_files.ssl_certificate_file = None;
        no_files.ssl_key_file = None;
        let mut cc = rdkafka::config::ClientConfig::new();
        apply_security(&mut cc, &no_files);
        cc.set("bootstrap.servers", "127.0.0.1:1");
        let p: Result<rdkafka::producer::BaseProducer, _> = cc.create();
        assert!(p.is_ok(), "{:?}", p.err());
        cfg.ssl_hostname_verification = false;
        let mut cc = rdkafka::config::ClientConfig::new();
        apply_security(&mut cc, &cfg);
        assert_eq!(
            cc.get("ssl.endpoint.identification.algorithm"),
            Some("none")
        );
    }
}
