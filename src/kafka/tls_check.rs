//! Why lapse refused a broker's certificate. librdkafka (OpenSSL) reports
//! only "certificate verify failed", whether the CA is unknown, the
//! certificate has expired or it names another host; lapse then checks the
//! certificate itself (rustls, against the same `kafka.ssl_ca_file`, for the
//! same host) to name the cause and the setting to fix.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, Error};

/// What the certificate check needs from `[kafka]`.
#[derive(Clone, Debug)]
pub struct TlsCheck {
    pub ca_file: PathBuf,
    pub hostname_verification: bool,
}

/// The broker address in a librdkafka message (`ssl://host:port/...`,
/// `sasl_plaintext://host:port/...`).
pub fn broker_address(message: &str) -> Option<(String, u16)> {
    let rest = &message[message.find("://")? + "://".len()..];
    let hostport = &rest[..rest.find('/')?];
    let (host, port) = hostport.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.to_owned(), port.parse().ok()?))
}

/// The cause, as a hint naming the setting, when rustls refuses the
/// certificate of the broker named in `message`; None when it cannot tell
/// (the broker unreachable, the CA file unreadable, or rustls accepts it).
pub fn diagnose(message: &str, check: &TlsCheck) -> Option<&'static str> {
    let (host, port) = broker_address(message)?;
    let refused = handshake(&host, port, &check.ca_file)?;
    Some(match refused {
        CertificateError::Expired
        | CertificateError::ExpiredContext { .. }
        | CertificateError::NotValidYet
        | CertificateError::NotValidYetContext { .. } => {
            "the broker's certificate has expired (or is not valid yet): renew it"
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            if check.hostname_verification =>
        {
            "the broker's certificate does not name the host lapse connected to (in kafka.brokers, or the one the broker advertises): connect by a name the certificate lists (host name verification: kafka.ssl_hostname_verification)"
        }
        CertificateError::UnknownIssuer | CertificateError::BadSignature => {
            "lapse does not trust the broker's certificate: set kafka.ssl_ca_file to the CA that signed it"
        }
        _ => return None,
    })
}

/// A TLS handshake with `host:port` trusting only `ca_file`: the
/// certificate error, if rustls refuses the server's certificate.
fn handshake(host: &str, port: u16, ca_file: &Path) -> Option<CertificateError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(ca_file).ok()? {
        roots.add(ca.ok()?).ok()?;
    }
    // The one crypto provider in the build (ring) is the default.
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).ok()?;
    let addr = (host, port).to_socket_addrs().ok()?.next()?;
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    tcp.set_write_timeout(Some(Duration::from_secs(3))).ok()?;
    while conn.is_handshaking() {
        match conn.complete_io(&mut tcp) {
            Ok(_) => {}
            Err(e) => {
                let inner = e.into_inner()?;
                return match inner.downcast::<Error>() {
                    Ok(err) => match *err {
                        Error::InvalidCertificate(c) => Some(c),
                        _ => None,
                    },
                    Err(_) => None,
                };
            }
        }
    }
    // Accepted: the cause is not the certificate.
    conn.send_close_notify();
    let _ = conn.complete_io(&mut tcp);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_address_is_read_from_librdkafka_messages() {
        assert_eq!(
            broker_address("ssl://127.0.0.1:9093/bootstrap: SSL handshake failed"),
            Some(("127.0.0.1".into(), 9093))
        );
        assert_eq!(
            broker_address("Global error: SSL: sasl_ssl://kafka-1.example:9094/1: x"),
            Some(("kafka-1.example".into(), 9094))
        );
        assert_eq!(
            broker_address("sasl_plaintext://[::1]:9092/bootstrap: SASL authentication error"),
            Some(("::1".into(), 9092))
        );
        assert_eq!(broker_address("Local: Broker transport failure"), None);
    }
}
