//! What every lapse Kafka client (consumer, producer, admin) shares: the last
//! client error, kept for `/readyz` and logged with bounded volume.

use std::sync::{Arc, Mutex};

use crate::retry::{LogLimiter, REPEAT_LOG_EVERY};

/// The last error librdkafka reported to a client's context (it says why a
/// broker is unreachable: connection refused, TLS handshake failed,
/// SASL authentication failed), and the limiter of its log lines: librdkafka
/// reports every failed reconnect, which an outage must not turn into a
/// flood of lines. Cheap to clone.
#[derive(Clone)]
pub struct ClientErrors(Arc<Mutex<(Option<String>, LogLimiter)>>);

impl Default for ClientErrors {
    fn default() -> Self {
        ClientErrors(Arc::new(Mutex::new((
            None,
            LogLimiter::new(REPEAT_LOG_EVERY),
        ))))
    }
}

impl ClientErrors {
    /// Keeps `error` (with librdkafka's `reason`) and logs it unless the same
    /// message was logged less than a minute ago.
    pub fn record(&self, client: &str, error: &rdkafka::error::KafkaError, reason: &str) {
        let message = if reason.is_empty() || error.to_string().contains(reason) {
            error.to_string()
        } else {
            format!("{error}: {reason}")
        };
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(suppressed) = g.1.admit(&message) {
            tracing::warn!(error = %message, suppressed, "{client} error");
        }
        g.0 = Some(message);
    }

    /// The last error reported, if any.
    pub fn last(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// `e` with the last client error, which usually says more.
    pub fn explain(&self, e: &rdkafka::error::KafkaError) -> String {
        match self.last() {
            Some(last) if !e.to_string().contains(&last) => {
                format!("{e} (last client error: {last}; check kafka.brokers and the [kafka] security settings)")
            }
            _ => format!("{e} (check kafka.brokers and the [kafka] security settings)"),
        }
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
