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

/// A Redis Cluster (3 masters, 3 replicas) reachable only over mutual TLS,
/// the cluster bus and replication over TLS too, with an ACL file: the
/// default user off, `admin` (the harness: cluster creation, replication)
/// and the `acl_rules` given (lapse's user). Stopped when dropped.
pub struct TlsRedisCluster {
    nodes: Vec<(u16, PathBuf, std::process::Child)>,
    _dir: TempDir,
}

const CLUSTER_ADMIN_PASSWORD: &str = "cluster-admin-pw";

impl TlsRedisCluster {
    pub async fn start(certs: &TestCerts, acl_rules: &str) -> TlsRedisCluster {
        let dir = super::scratch_dir("redis-tls-cluster");
        let acl = dir.path().join("users.acl");
        std::fs::write(
            &acl,
            format!("user default off\nuser admin on >{CLUSTER_ADMIN_PASSWORD} ~* &* +@all\n{acl_rules}\n"),
        )
        .expect("write ACL file");
        let mut nodes = Vec::new();
        for i in 0..6 {
            nodes.push(Self::launch(certs, dir.path(), &acl, i).await);
        }
        let cluster = TlsRedisCluster { nodes, _dir: dir };
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(cluster.ports().iter().map(|p| format!("127.0.0.1:{p}")));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = cli(certs, None, &args);
        assert!(
            out.status.success(),
            "redis-cli --cluster create over TLS failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ports = cluster.ports();
        super::wait_until(
            super::DEFAULT_TIMEOUT,
            std::time::Duration::from_millis(200),
            "every TLS cluster node to report cluster_state:ok",
            async || {
                ports.iter().all(|p| {
                    let out = cli(certs, Some(*p), &["CLUSTER".into(), "INFO".into()]);
                    String::from_utf8_lossy(&out.stdout).contains("cluster_state:ok")
                })
            },
        )
        .await;
        cluster
    }

    async fn launch(
        certs: &TestCerts,
        root: &Path,
        acl: &Path,
        i: usize,
    ) -> (u16, PathBuf, std::process::Child) {
        let dir = root.join(format!("node-{i}"));
        std::fs::create_dir_all(&dir).expect("node dir");
        let log = dir.join("redis.log");
        let p = |p: PathBuf| p.display().to_string();
        for _attempt in 0..5 {
            // The cluster bus port (port + 10000) must be a valid port too.
            let port = loop {
                let p = super::free_port();
                if p < 55_000 {
                    break p;
                }
            };
            let mut cmd = Command::new(super::redis_server_bin());
            cmd.args(["--port", "0", "--tls-port"])
                .arg(port.to_string())
                .args(["--bind", "127.0.0.1", "--daemonize", "no", "--logfile", ""])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                .args(["--tls-auth-clients", "yes"])
                .args(["--tls-cert-file", &p(certs.server_cert())])
                .args(["--tls-key-file", &p(certs.server_key())])
                .args(["--tls-client-cert-file", &p(certs.client_cert())])
                .args(["--tls-client-key-file", &p(certs.client_key())])
                .args(["--tls-ca-cert-file", &p(certs.ca())])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .arg("--cluster-config-file")
                .arg(format!("nodes-{port}.conf"))
                .args(["--aclfile", &p(acl.to_path_buf())])
                .args([
                    "--masteruser",
                    "admin",
                    "--masterauth",
                    CLUSTER_ADMIN_PASSWORD,
                ])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--repl-diskless-sync-delay", "0"])
                .arg("--dir")
                .arg(&dir)
                .stdin(std::process::Stdio::null())
                .stdout(super::open_append(&log))
                .stderr(super::open_append(&log));
            super::sys::die_with_parent(&mut cmd);
            let mut child = cmd.spawn().expect("spawn redis-server");
            let outcome =
                super::wait_started(&mut child, std::time::Duration::from_secs(20), async || {
                    String::from_utf8_lossy(&cli(certs, Some(port), &["PING".into()]).stdout)
                        .contains("PONG")
                })
                .await;
            match outcome {
                super::StartOutcome::Ready => return (port, log, child),
                super::StartOutcome::Exited(_) => continue,
                super::StartOutcome::TimedOut => {
                    super::kill_and_reap(&mut child);
                    panic!(
                        "TLS cluster node {port} not ready in 20s; log:\n{}",
                        super::file_tail(&log, 8192)
                    )
                }
            }
        }
        panic!(
            "TLS cluster node failed to start 5 times; log:\n{}",
            super::file_tail(&log, 8192)
        )
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.0).collect()
    }

    /// Keys per node (`DBSIZE`; a replica holds its master's).
    pub fn key_counts(&self, certs: &TestCerts) -> Vec<u64> {
        self.ports()
            .iter()
            .map(|p| {
                let out = cli(certs, Some(*p), &["DBSIZE".into()]);
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("DBSIZE on {p}: {out:?}"))
            })
            .collect()
    }

    /// Every node's log, for NOPERM checks.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| super::read_lossy(&n.1))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `redis-cli` over mutual TLS as the cluster's admin user (on node `port`).
fn cli(certs: &TestCerts, port: Option<u16>, args: &[String]) -> std::process::Output {
    let server = super::redis_server_bin();
    let bin = server.with_file_name("redis-cli");
    let mut cmd = Command::new(if bin.exists() {
        bin
    } else {
        "redis-cli".into()
    });
    cmd.args(["--tls", "--cacert"])
        .arg(certs.ca())
        .arg("--cert")
        .arg(certs.client_cert())
        .arg("--key")
        .arg(certs.client_key())
        .args([
            "--user",
            "admin",
            "--pass",
            CLUSTER_ADMIN_PASSWORD,
            "--no-auth-warning",
        ]);
    if let Some(p) = port {
        cmd.args(["-h", "127.0.0.1", "-p", &p.to_string()]);
    }
    cmd.args(args).output().expect("run redis-cli")
}

impl Drop for TlsRedisCluster {
    fn drop(&mut self) {
        let logs: Vec<&Path> = self.nodes.iter().map(|n| n.1.as_path()).collect();
        super::dump_if_panicking("redis TLS cluster", &logs);
        for n in &mut self.nodes {
            super::kill_and_reap(&mut n.2);
        }
    }
}
