//! Test certificates, made by the `openssl` command line in a temp dir: a CA,
//! a server certificate for `localhost` / `127.0.0.1` and a client
//! certificate signed by it, a server certificate naming another host, an
//! expired server certificate, and a second, untrusted CA. EC P-256 keys
//! (fast to make; rustls, OpenSSL and Redis all take them).

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

pub struct TestCerts {
    dir: TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA `NAME.pem` with key `NAME.key`.
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN=lapse test {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// `NAME.pem` + `NAME.key` signed by `ca`, with `extensions` (an openssl
/// extension file's lines), valid from now for `days` (-1: expired a day ago).
fn leaf(dir: &Path, name: &str, ca: &str, cn: &str, extensions: &str, days: i32) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    std::fs::write(dir.join(format!("{name}.ext")), extensions).expect("write extensions");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            &days.to_string(),
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

impl TestCerts {
    pub fn generate() -> TestCerts {
        let dir = super::scratch_dir("certs");
        let d = dir.path();
        ca(d, "ca");
        ca(d, "other-ca");
        let server = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n";
        leaf(d, "server", "ca", "localhost", server, 2);
        leaf(d, "expired", "ca", "localhost", server, -1);
        leaf(
            d,
            "wrong-host",
            "ca",
            "broker.example",
            "subjectAltName=DNS:broker.example\nextendedKeyUsage=serverAuth\n",
            2,
        );
        leaf(
            d,
            "client",
            "ca",
            "lapse",
            "extendedKeyUsage=clientAuth\n",
            2,
        );
        leaf(
            d,
            "expired-client",
            "ca",
            "lapse",
            "extendedKeyUsage=clientAuth\n",
            -1,
        );
        TestCerts { dir }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The CA that signed the server and client certificates.
    pub fn ca(&self) -> PathBuf {
        self.file("ca.pem")
    }
    /// A CA that signed nothing here.
    pub fn other_ca(&self) -> PathBuf {
        self.file("other-ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.file("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.file("server.key")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.file("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.file("client.key")
    }
    /// The certificate (`NAME.pem`) and key (`NAME.key`) of a [`ServerCert`].
    pub fn server_pair(&self, which: ServerCert) -> (PathBuf, PathBuf) {
        let name = which.name();
        (
            self.file(&format!("{name}.pem")),
            self.file(&format!("{name}.key")),
        )
    }
    /// A client certificate signed by the CA that expired a day ago, and its key.
    pub fn expired_client(&self) -> (PathBuf, PathBuf) {
        (
            self.file("expired-client.pem"),
            self.file("expired-client.key"),
        )
    }
}

/// Which certificate a TLS server presents: all signed by [`TestCerts::ca`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerCert {
    /// For `localhost` and `127.0.0.1`, valid.
    Good,
    /// For `localhost` and `127.0.0.1`, expired a day ago.
    Expired,
    /// For `broker.example` only: a host-name mismatch on loopback.
    WrongHost,
}

impl ServerCert {
    fn name(self) -> &'static str {
        match self {
            ServerCert::Good => "server",
            ServerCert::Expired => "expired",
            ServerCert::WrongHost => "wrong-host",
        }
    }
}

/// A TLS terminator on a loopback port (the test server certificate) in
/// front of a plain TCP `upstream`, on its own runtime: a real TLS handshake
/// for clients that must check the CA and the host name.
pub struct TlsProxy {
    addr: std::net::SocketAddr,
    rt: Option<tokio::runtime::Runtime>,
}

impl TlsProxy {
    pub fn start(certs: &TestCerts, upstream: std::net::SocketAddr) -> TlsProxy {
        Self::start_with(certs, ServerCert::Good, false, upstream)
    }

    /// Presenting `which` certificate; with `client_auth`, only clients with a
    /// valid certificate signed by the test CA get through (mutual TLS).
    pub fn start_with(
        certs: &TestCerts,
        which: ServerCert,
        client_auth: bool,
        upstream: std::net::SocketAddr,
    ) -> TlsProxy {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (cert, key) = certs.server_pair(which);
        let chain = CertificateDer::pem_file_iter(cert)
            .expect("server cert")
            .collect::<Result<Vec<_>, _>>()
            .expect("server cert PEM");
        let key = PrivateKeyDer::from_pem_file(key).expect("server key");
        // The one crypto provider in the build (ring) is the default.
        let builder = rustls::ServerConfig::builder();
        let builder = if client_auth {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(certs.ca()).expect("CA") {
                roots.add(ca.expect("CA PEM")).expect("CA certificate");
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder(std::sync::Arc::new(roots))
                    .build()
                    .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(chain, key)
            .expect("server certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind TLS proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-tls-proxy")
            .enable_all()
            .build()
            .expect("TLS proxy runtime");
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A refused handshake (untrusted CA on the client side, no
                    // or a bad client certificate) just ends here.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        TlsProxy { addr, rt: Some(rt) }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}
