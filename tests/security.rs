//! Issue 12: security and failure behaviour, against real servers on loopback.
//!
//! | claim | test |
//! |---|---|
//! | HTTP endpoints answer from the first seconds whatever is unreachable; `/readyz` names what is not ready and why | `http_endpoints_answer_within_two_seconds_while_redis_and_the_broker_are_down` |
//! | `check-config` prints no secret (URL credentials, `*_file`, env, raw properties) | `check_config_never_prints_a_secret` |
//! | a wrong Redis password: one clear error naming the setting; no secret in logs at trace level, `/readyz`, `/metrics` or the exit error | `secrets_never_reach_logs_readyz_metrics_or_errors` |
//! | Redis over mutual TLS with exactly the README's least-privilege ACL user: the foundation path works | `redis_over_mutual_tls_as_the_least_privilege_acl_user_applies_and_commits` |
//! | schema registry over https (CA file, host name checked) with basic auth; wrong password and untrusted CA named | `schema_registry_over_https_with_basic_auth` |
//! | wrong password, untrusted CA, no client certificate: one clear error naming the setting, not ready, bounded logs over 30 s, nothing committed | `redis_wrong_password_untrusted_ca_or_no_client_cert_fail_clearly_and_commit_nothing` |
//! | Redis: an expired or host-mismatching server certificate, an expired client certificate: the cause named in `/readyz` and the log, nothing committed | `redis_expired_or_mismatching_certificates_fail_clearly_and_commit_nothing` |
//! | schema registry with a bearer token (from a file): registered; a wrong token named, never printed | `schema_registry_with_a_bearer_token` |
//! | Redis Cluster over mutual TLS (bus and replication too) as the README's ACL user plus `+cluster\|slots`: applied and committed, states on every master | `redis_cluster_over_mutual_tls_as_the_least_privilege_acl_user_applies_and_commits` |
//! | Kafka over mutual TLS (CA file, host name checked, client certificate), through a TLS terminator the broker advertises: consumed, applied, produced, committed | `kafka_over_mutual_tls_consumes_produces_and_commits` |
//! | Kafka SASL_PLAINTEXT (SCRAM-SHA-256, -512) and SASL_SSL: a refused login names `kafka.sasl_password` in `/readyz` and the log, bounded logs, the password (from a file) in no log line at debug level | `kafka_sasl_scram_refused_login_names_the_setting_and_leaks_no_password` |
//! | Kafka: untrusted CA, host-name mismatch, expired broker certificate, no or an expired client certificate: each one clear cause naming the setting in `/readyz` (503, `broker`) and the log, bounded logs over 30 s, nothing committed | `kafka_untrusted_ca_host_name_mismatch_expired_or_no_client_cert_fail_clearly_and_commit_nothing` |

mod common;

use std::time::{Duration, Instant};

use common::stack::*;
use common::tls::{ServerCert, TestCerts};
use common::*;
use lapse::domain::event::{Channel, Purpose};

/// `GET path` until it answers, for at most `within`: (status, body, when).
async fn first_answer(
    lapse: &LapseProcess,
    path: &str,
    within: Duration,
) -> Result<(u16, String, Duration), String> {
    let started = Instant::now();
    loop {
        match lapse.http_get(path).await {
            Ok((code, body)) => return Ok((code, body, started.elapsed())),
            Err(e) if started.elapsed() >= within => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The `/readyz` body as JSON.
fn readyz_json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/readyz is not JSON ({e}): {body}"))
}

#[tokio::test]
async fn http_endpoints_answer_within_two_seconds_while_redis_and_the_broker_are_down() {
    let mut s = Stack::start_with(Broker::start_behind_proxy().await).await;
    s.redis.stop().await;
    s.broker.proxy().cut();
    let cfg = s.config("down", "");
    let spawned = Instant::now();
    let mut lapse = s.spawn("g-down", &cfg);

    // Within about two seconds of the spawn, every endpoint answers.
    let (code, _, _) = first_answer(&lapse, "/healthz", Duration::from_secs(2))
        .await
        .unwrap_or_else(|e| panic!("/healthz: no answer within 2 s of the spawn: {e}"));
    assert_eq!(code, 200);
    assert!(
        spawned.elapsed() < Duration::from_millis(2500),
        "/healthz answered only after {:?}",
        spawned.elapsed()
    );
    let (code, metrics) = lapse.http_get("/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.lines().any(|l| l == "lapse_ready 0"),
        "lapse_ready must be 0:\n{metrics}"
    );
    let (code, body) = lapse.http_get("/readyz").await.unwrap();
    assert_eq!(code, 503, "{body}");
    let v = readyz_json(&body);
    assert_eq!(v["ready"], false, "{body}");
    for component in ["redis", "broker"] {
        assert!(
            v["not_ready"][component].is_string(),
            "/readyz must name {component}: {body}"
        );
    }
    assert!(
        lapse.is_running(),
        "lapse must wait for its dependencies, not exit"
    );
    // The reasons become the real errors once the first attempts have failed.
    let body = wait_for(
        LONG,
        POLL,
        "/readyz to say why Redis is unreachable",
        async || {
            let (code, body) = lapse.http_get("/readyz").await.ok()?;
            let v = readyz_json(&body);
            let redis = v["not_ready"]["redis"].as_str()?.to_owned();
            (code == 503 && !redis.contains("not connected yet")).then_some(body)
        },
    )
    .await;
    let v = readyz_json(&body);
    assert!(
        v["not_ready"]["redis"]
            .as_str()
            .unwrap()
            .contains("redis.url"),
        "the Redis reason names the setting to check: {body}"
    );
    // While Redis and the broker are down, the allowance API says it is starting.
    let (code, _) = lapse.http_get("/v1/allowance/t/c").await.unwrap();
    assert_eq!(code, 503);

    // Both come back: lapse becomes ready without a restart.
    s.redis.start_again().await;
    s.broker.proxy().restore();
    lapse.wait_ready(LONG).await;
    let (_, body) = lapse.http_get("/readyz").await.unwrap();
    assert_eq!(readyz_json(&body)["ready"], true, "{body}");
    wait_until(LONG, POLL, "lapse_ready 1", async || {
        metric(&lapse, "lapse_ready", &[]).await == 1.0
    })
    .await;
    let (code, _) = lapse.http_get("/v1/allowance/t/c").await.unwrap();
    assert_eq!(code, 200);
}

/// Secrets used by the leak tests: distinctive, so any copy is found.
const REDIS_SECRET: &str = "redis-pw-LEAKCHECK-41";
const SASL_SECRET: &str = "sasl-pw-LEAKCHECK-42";
const REGISTRY_SECRET: &str = "registry-pw-LEAKCHECK-43";
const PROPERTY_SECRET: &str = "key-pw-LEAKCHECK-44";

fn assert_no_secret(what: &str, text: &str) {
    for secret in [REDIS_SECRET, SASL_SECRET, REGISTRY_SECRET, PROPERTY_SECRET] {
        assert!(
            !text.contains(secret),
            "{what} contains the secret {secret}:\n{text}"
        );
        // Also not percent-encoded (URLs) or in part (the leading word).
        let head = &secret[..secret.len() - 3];
        assert!(
            !text.contains(head),
            "{what} contains part of {secret}:\n{text}"
        );
    }
}

#[tokio::test]
async fn check_config_never_prints_a_secret() {
    let dir = scratch_dir("check-config");
    let sasl_file = dir.path().join("sasl-password");
    std::fs::write(&sasl_file, format!("{SASL_SECRET}\n")).unwrap();
    let config = dir.path().join("lapse.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\nurl = \"redis://lapse:{REDIS_SECRET}@127.0.0.1:6379/\"\n\
             [kafka]\nsecurity_protocol = \"SASL_SSL\"\nsasl_mechanism = \"SCRAM-SHA-256\"\n\
             sasl_username = \"lapse\"\nsasl_password_file = \"{}\"\n\
             [kafka.consumer_properties]\n\"ssl.key.password\" = \"{PROPERTY_SECRET}\"\n\
             [schema]\nregistry_url = \"https://sr:{REGISTRY_SECRET}@registry.example:8081\"\n",
            sasl_file.display()
        ),
    )
    .unwrap();
    let out = run_lapse(
        &["check-config", &config.display().to_string()],
        &[("LAPSE_SCHEMAS_DIR", &schemas_dir())],
        Duration::from_secs(30),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_no_secret("check-config's output", &format!("{stdout}\n{stderr}"));
    // What it does print: where each secret comes from, masked.
    assert!(
        stdout.contains("url = \"redis://127.0.0.1:6379/\""),
        "{stdout}"
    );
    assert!(stdout.contains("username = \"lapse\""), "{stdout}");
    assert!(stdout.contains("password = \"***\""), "{stdout}");
    assert!(stdout.contains("sasl_password = \"***\""), "{stdout}");
    assert!(stdout.contains("registry_password = \"***\""), "{stdout}");
    assert!(
        stdout.contains("\"ssl.key.password\" = \"***\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("registry_url = \"https://registry.example:8081\""),
        "{stdout}"
    );

    // A config error that would otherwise quote the line holding a password.
    std::fs::write(&config, format!("[redis]\npasword = \"{REDIS_SECRET}\"\n")).unwrap();
    let out = run_lapse(
        &["check-config", &config.display().to_string()],
        &[("LAPSE_SCHEMAS_DIR", &schemas_dir())],
        Duration::from_secs(30),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("pasword"), "{stderr}");
    assert_no_secret("check-config's error", &stderr);
}

#[tokio::test]
async fn secrets_never_reach_logs_readyz_metrics_or_errors() {
    // Redis wants another password than lapse is given (from a file); the
    // registry's basic auth password comes from the environment, a raw
    // librdkafka property holds one too.
    let redis =
        RedisServer::start_with(|_| vec!["--requirepass".into(), "the-right-one".into()]).await;
    let broker = Broker::start().await;
    let registry = SchemaRegistryStub::start();
    let dir = scratch_dir("leak");
    let pw_file = dir.path().join("redis-password");
    std::fs::write(&pw_file, REDIS_SECRET).unwrap();
    let config = dir.path().join("lapse.toml");
    std::fs::write(
        &config,
        format!(
            "[redis]\npassword_file = \"{}\"\n\
             [schema]\nregistry_username = \"lapse\"\n\
             [kafka.producer_properties]\n\"ssl.key.password\" = \"{PROPERTY_SECRET}\"\n\
             [retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"500ms\"\n",
            pw_file.display()
        ),
    )
    .unwrap();
    let mut lapse = LapseProcess::spawn(
        &["run", "--config", &config.display().to_string()],
        &[
            ("LAPSE_REDIS_URL", &redis.url()),
            ("LAPSE_KAFKA_BROKERS", &broker.bootstrap()),
            ("LAPSE_SCHEMAS_DIR", &schemas_dir()),
            ("LAPSE_SCHEMA_REGISTRY_URL", &registry.url()),
            ("LAPSE_SCHEMA_REGISTRY_PASSWORD", REGISTRY_SECRET),
            (
                "RUST_LOG",
                "trace,hyper=debug,hyper_util=debug,h2=info,tokio=info,runtime=info,mio=info",
            ),
        ],
    );
    let body = wait_for(
        LONG,
        POLL,
        "/readyz to say Redis refused the password",
        async || {
            let (code, body) = lapse.http_get("/readyz").await.ok()?;
            let v = readyz_json(&body);
            let redis = v["not_ready"]["redis"].as_str()?;
            (code == 503 && redis.contains("redis.password")).then(|| body.clone())
        },
    )
    .await;
    assert_no_secret("/readyz", &body);
    // The registry got the password: lapse authenticated to it.
    wait_until(LONG, POLL, "the registry to be reached", async || {
        !registry.requests().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, metrics) = lapse.http_get("/metrics").await.unwrap();
    assert_no_secret("/metrics", &metrics);
    lapse.sigterm();
    lapse.wait_exit(Duration::from_secs(30)).await;
    let logs = lapse.all_output();
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "logs at every level:\n{logs}"
    );
    assert!(
        logs.contains("redis.password"),
        "the error names the setting:\n{logs}"
    );
    assert_no_secret("the logs", &logs);
}

/// The least-privilege ACL rule, exactly as the README documents it.
fn readme_acl_rule(password: &str) -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let line = readme
        .lines()
        .find(|l| l.starts_with("user lapse on >PASSWORD "))
        .expect("the README's Security section has the ACL rule");
    line.replace(">PASSWORD", &format!(">{password}"))
}

const ACL_PASSWORD: &str = "acl-pw-for-lapse";

/// Redis with TLS only for clients (`--tls-port`, client certificates
/// required) and an ACL file holding the default user switched off and the
/// README's lapse user. Returns the server and its TLS port.
async fn tls_redis(certs: &TestCerts) -> (RedisServer, u16) {
    tls_redis_presenting(certs, ServerCert::Good).await
}

/// [`tls_redis`] presenting `which` certificate.
async fn tls_redis_presenting(certs: &TestCerts, which: ServerCert) -> (RedisServer, u16) {
    let (server_cert, server_key) = certs.server_pair(which);
    let tls_port = free_port();
    let acl = readme_acl_rule(ACL_PASSWORD);
    let redis = RedisServer::start_with(|dir| {
        let acl_file = dir.join("users.acl");
        std::fs::write(&acl_file, format!("user default off\n{acl}\n")).unwrap();
        let p = |p: std::path::PathBuf| p.display().to_string();
        vec![
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            p(server_cert.clone()),
            "--tls-key-file".into(),
            p(server_key.clone()),
            "--tls-ca-cert-file".into(),
            p(certs.ca()),
            "--tls-auth-clients".into(),
            "yes".into(),
            "--aclfile".into(),
            p(acl_file),
        ]
    })
    .await;
    (redis, tls_port)
}

/// A config for lapse on the TLS Redis: `redis` lines under `[redis]`.
/// With the default `redis.durability` (`fsync_horizon`, which reads `INFO`),
/// so the ACL rule is proven with what a default deployment sends.
fn tls_config(s: &Stack, name: &str, redis: &str) -> String {
    s.config_redis(
        name,
        "",
        &format!("username = \"lapse\"\ndurability = \"fsync_horizon\"\n{redis}"),
        "",
    )
}

fn tls_env(s: &Stack, group: &str, tls_port: u16) -> Vec<(String, String)> {
    let mut env = s.env(group);
    env.retain(|(k, _)| k != "LAPSE_REDIS_URL" && k != "RUST_LOG");
    env.push((
        "LAPSE_REDIS_URL".into(),
        format!("rediss://127.0.0.1:{tls_port}/"),
    ));
    env
}

fn spawn_env(config: &str, env: &[(String, String)]) -> LapseProcess {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    LapseProcess::spawn(&["run", "--config", config], &env)
}

#[tokio::test]
async fn redis_over_mutual_tls_as_the_least_privilege_acl_user_applies_and_commits() {
    let certs = TestCerts::generate();
    let s = Stack::start().await;
    let (redis, tls_port) = tls_redis(&certs).await;
    let pw = s.dir.path().join("redis-password");
    std::fs::write(&pw, format!("{ACL_PASSWORD}\n")).unwrap();
    let cfg = tls_config(
        &s,
        "tls",
        &format!(
            "password_file = \"{}\"\ntls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
            pw.display(),
            certs.ca().display(),
            certs.client_cert().display(),
            certs.client_key().display()
        ),
    );
    let p = Producer::new(&s.broker.bootstrap());
    let events = population("tls", 20, 1);
    produce_events(&p, &events, |_| lapse::codec::Framing::SingleObject).await;
    let mut lapse = spawn_env(&cfg, &tls_env(&s, "g-tls", tls_port));
    s.wait_caught_up("g-tls", LONG).await;
    lapse.wait_ready(LONG).await;
    let (code, body) = lapse.http_get("/v1/allowance/tls/c0000").await.unwrap();
    assert_eq!(code, 200, "{body}");
    // The state went to the TLS Redis, as the ACL user, under its key pattern.
    let log = redis.log();
    assert!(!log.contains("NOPERM"), "{log}");
    assert_eq!(
        metric(&lapse, "lapse_redis_permanent_errors_total", &[]).await,
        0.0
    );
    assert!(metric(&lapse, "lapse_state_writes_total", &[]).await > 0.0);
}

#[tokio::test]
async fn redis_wrong_password_untrusted_ca_or_no_client_cert_fail_clearly_and_commit_nothing() {
    let certs = TestCerts::generate();
    let s = Stack::start().await;
    let (_redis, tls_port) = tls_redis(&certs).await;
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &population("bad", 5, 1), |_| {
        lapse::codec::Framing::SingleObject
    })
    .await;
    let dir = &s.dir;
    let pw = |name: &str, text: &str| {
        let f = dir.path().join(name);
        std::fs::write(&f, text).unwrap();
        f.display().to_string()
    };
    let tls = |ca: &std::path::Path, client: bool| {
        let mut t = format!("tls_ca_file = \"{}\"\n", ca.display());
        if client {
            t.push_str(&format!(
                "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
                certs.client_cert().display(),
                certs.client_key().display()
            ));
        }
        t
    };
    // (group, [redis] lines, the setting the error must name)
    let cases = [
        (
            "g-wrong-pw",
            format!(
                "password_file = \"{}\"\n{}",
                pw("wrong", "not-the-password"),
                tls(&certs.ca(), true)
            ),
            "redis.password",
        ),
        (
            "g-untrusted",
            format!(
                "password_file = \"{}\"\n{}",
                pw("right", ACL_PASSWORD),
                tls(&certs.other_ca(), true)
            ),
            "redis.tls_ca_file",
        ),
        (
            "g-no-client-cert",
            format!(
                "password_file = \"{}\"\n{}",
                pw("right2", ACL_PASSWORD),
                tls(&certs.ca(), false)
            ),
            "redis.tls_cert_file",
        ),
    ];
    let mut running = Vec::new();
    for (group, redis, setting) in &cases {
        let cfg = tls_config(&s, group, redis);
        let mut env = tls_env(&s, group, tls_port);
        env.push(("RUST_LOG".into(), "info,rdkafka=warn".into()));
        running.push((spawn_env(&cfg, &env), *group, *setting));
    }
    for (lapse, group, setting) in &running {
        let body = wait_for(
            LONG,
            POLL,
            &format!("{group}: /readyz to name {setting}"),
            async || {
                let (code, body) = lapse.http_get("/readyz").await.ok()?;
                let v = readyz_json(&body);
                let redis = v["not_ready"]["redis"].as_str()?;
                (code == 503 && redis.contains(setting)).then(|| body.clone())
            },
        )
        .await;
        assert!(!body.contains(ACL_PASSWORD), "{body}");
        let stderr = lapse.stderr();
        assert!(
            stderr.contains(setting),
            "{group}: the log names {setting}:\n{stderr}"
        );
    }
    // Bounded log volume while it keeps failing: over 30 s, a few lines at most
    // (an unchanged error is logged once a minute), however often it retries.
    let before: Vec<usize> = running
        .iter()
        .map(|(l, _, _)| l.stderr().lines().count())
        .collect();
    tokio::time::sleep(Duration::from_secs(30)).await;
    for ((lapse, group, _), before) in running.iter_mut().zip(before) {
        let stderr = lapse.stderr();
        let added = stderr.lines().count() - before;
        assert!(added <= 3, "{group}: {added} log lines in 30 s:\n{stderr}");
        assert!(lapse.is_running(), "{group} must keep retrying, not exit");
        let (code, _) = lapse.http_get("/readyz").await.unwrap();
        assert_eq!(code, 503, "{group} stays not ready");
        assert_eq!(metric(lapse, "lapse_ready", &[]).await, 0.0);
        assert!(
            committed_offsets(&s.broker.bootstrap(), group, &INPUTS)
                .await
                .is_empty(),
            "{group}: nothing may be committed"
        );
        assert!(!stderr.contains(ACL_PASSWORD));
    }
    // Each names its own setting, not the others'.
    for (lapse, group, setting) in &running {
        let (_, body) = lapse.http_get("/readyz").await.unwrap();
        let reason = readyz_json(&body)["not_ready"]["redis"]
            .as_str()
            .unwrap()
            .to_owned();
        for (_, _, other) in &cases {
            if other != setting {
                assert!(!reason.contains(other), "{group}: {reason}");
            }
        }
        eprintln!("{group}: {reason}");
    }
}

#[tokio::test]
async fn schema_registry_over_https_with_basic_auth() {
    assert_eq!(base64(b"us@er:p:ss"), "dXNAZXI6cDpzcw==");
    let certs = TestCerts::generate();
    let s = Stack::start().await;
    s.registry.require_basic_auth("lapse", "registry-pw-right");
    let tls = common::tls::TlsProxy::start(&certs, s.registry.addr());
    let https = format!("https://127.0.0.1:{}", tls.port());
    let spawn = |group: &str, ca: &std::path::Path, password: &str| {
        let cfg = s.config_with(
            group,
            "",
            &format!(
                "[schema]\nregistry_username = \"lapse\"\nregistry_ca_file = \"{}\"\n",
                ca.display()
            ),
        );
        let mut env = s.env(group);
        env.retain(|(k, _)| k != "LAPSE_SCHEMA_REGISTRY_URL");
        env.push(("LAPSE_SCHEMA_REGISTRY_URL".into(), https.clone()));
        env.push(("LAPSE_SCHEMA_REGISTRY_PASSWORD".into(), password.into()));
        spawn_env(&cfg, &env)
    };
    let mut good = spawn("g-https", &certs.ca(), "registry-pw-right");
    let wrong_pw = spawn("g-https-pw", &certs.ca(), "registry-pw-wrong");
    let untrusted = spawn("g-https-ca", &certs.other_ca(), "registry-pw-right");
    good.wait_ready(LONG).await;
    // lapse registered its output schemas over https, authenticated.
    assert!(!s
        .registry
        .subject_ids("engagement.throttle-value")
        .is_empty());
    for (lapse, setting) in [
        (&wrong_pw, "schema.registry_password"),
        (&untrusted, "schema.registry_ca_file"),
    ] {
        let body = wait_for(
            LONG,
            POLL,
            &format!("/readyz to name {setting}"),
            async || {
                let (code, body) = lapse.http_get("/readyz").await.ok()?;
                let v = readyz_json(&body);
                let registry = v["not_ready"]["registry"].as_str()?;
                (code == 503 && registry.contains(setting)).then(|| body.clone())
            },
        )
        .await;
        assert!(!body.contains("registry-pw-"), "{body}");
        assert!(!lapse.all_output().contains("registry-pw-"));
    }
}

// ---------------------------------------------------------------------------
// Kafka over TLS (a TLS terminator in front of tansu, which advertises it)
// ---------------------------------------------------------------------------

/// `config` (a file written by [`Stack::config_with`]) with `lines` added to
/// its `[kafka]` table.
fn with_kafka_lines(config: &str, lines: &str) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.starts_with("[kafka]\n"), "{text}");
    let text = text.replacen("[kafka]\n", &format!("[kafka]\n{lines}\n"), 1);
    std::fs::write(config, text).unwrap();
    config.to_owned()
}

/// The `[kafka]` lines for TLS with `ca`, and the client certificate when given.
fn kafka_tls_lines(
    ca: &std::path::Path,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> String {
    let mut t = format!(
        "security_protocol = \"SSL\"\nssl_ca_file = \"{}\"\n",
        ca.display()
    );
    if let Some((cert, key)) = client {
        t.push_str(&format!(
            "ssl_certificate_file = \"{}\"\nssl_key_file = \"{}\"\n",
            cert.display(),
            key.display()
        ));
    }
    t
}

/// A stack whose broker is reached only through TLS presenting `server`,
/// requiring client certificates.
async fn kafka_tls_stack(certs: &TestCerts, server: ServerCert) -> Stack {
    let broker = Broker::start_tls(&BrokerTls {
        certs,
        server,
        client_auth: true,
    })
    .await;
    Stack::start_with(broker).await
}

#[tokio::test]
async fn kafka_over_mutual_tls_consumes_produces_and_commits() {
    const THROTTLE: &str = "engagement.throttle";
    let certs = TestCerts::generate();
    let s = kafka_tls_stack(&certs, ServerCert::Good).await;
    s.broker.create_compacted_topic(THROTTLE, 3).await;
    // Produced over TLS by the harness (the broker has no other client port).
    let c = cust("ktls", "amy");
    let t1 = day(700);
    let h = 3_600_000;
    let events = vec![
        (
            send(&c, "w1", t1, Channel::Wechat, Purpose::Marketing),
            None,
        ),
        (
            send(&c, "w2", t1 + 2 * h, Channel::Wechat, Purpose::Marketing),
            None,
        ),
        (reply(&c, "r1", t1 + 5 * h, Channel::Sms), Some("退订")),
    ];
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &events, |_| lapse::codec::Framing::SingleObject).await;
    let cfg = with_kafka_lines(
        &s.config("ktls", ""),
        &kafka_tls_lines(
            &certs.ca(),
            Some((&certs.client_cert(), &certs.client_key())),
        ),
    );
    let mut lapse = s.spawn("g-ktls", &cfg);
    // Consumed and committed over TLS.
    s.wait_caught_up("g-ktls", LONG).await;
    lapse.wait_ready(LONG).await;
    // Applied to Redis state.
    let (code, body) = lapse.http_get("/v1/allowance/ktls/amy").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["channels"]["SMS"]["state"], "SUPPRESSED", "{v}");
    // Produced over TLS: the throttle decisions of amy (CAPPED on WeChat,
    // SUPPRESSED on SMS) are readable.
    let out = wait_for(LONG, POLL, "amy's throttle events", async || {
        let got = consume_up_to(&s.broker.bootstrap(), THROTTLE, 100, Duration::from_secs(3)).await;
        let amy: Vec<_> = got
            .into_iter()
            .filter(|r| r.key_str().is_some_and(|k| k.contains("amy")))
            .collect();
        (amy.len() >= 2).then_some(amy)
    })
    .await;
    assert!(out.iter().all(|r| r.payload.is_some()), "{}", out.len());
    assert_eq!(
        metric(&lapse, "lapse_cap_hits_total", &[("channel", "wechat")]).await,
        1.0
    );
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}

#[tokio::test]
async fn kafka_untrusted_ca_host_name_mismatch_expired_or_no_client_cert_fail_clearly_and_commit_nothing(
) {
    let certs = TestCerts::generate();
    let good = kafka_tls_stack(&certs, ServerCert::Good).await;
    let wrong_host = kafka_tls_stack(&certs, ServerCert::WrongHost).await;
    let expired = kafka_tls_stack(&certs, ServerCert::Expired).await;
    let client = Some((certs.client_cert(), certs.client_key()));
    let client = client.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
    let expired_client = certs.expired_client();
    // (stack, group, [kafka] lines, what the error must say)
    let cases = [
        (
            &good,
            "g-k-untrusted",
            kafka_tls_lines(&certs.other_ca(), client),
            "kafka.ssl_ca_file",
        ),
        (
            &wrong_host,
            "g-k-host",
            kafka_tls_lines(&certs.ca(), client),
            "does not name the host",
        ),
        (
            &expired,
            "g-k-expired",
            kafka_tls_lines(&certs.ca(), client),
            "has expired",
        ),
        (
            &good,
            "g-k-no-cert",
            kafka_tls_lines(&certs.ca(), None),
            "kafka.ssl_certificate_file",
        ),
        (
            &good,
            "g-k-expired-cert",
            kafka_tls_lines(&certs.ca(), Some((&expired_client.0, &expired_client.1))),
            "kafka.ssl_certificate_file",
        ),
    ];
    let mut running = Vec::new();
    for (s, group, lines, says) in &cases {
        let p = Producer::new(&s.broker.bootstrap());
        produce_events(&p, &population(group, 3, 1), |_| {
            lapse::codec::Framing::SingleObject
        })
        .await;
        let cfg = with_kafka_lines(&s.config(group, ""), lines);
        let mut env = s.env(group);
        env.retain(|(k, _)| k != "RUST_LOG");
        env.push(("RUST_LOG".into(), "info,rdkafka=warn".into()));
        running.push((spawn_env(&cfg, &env), *s, *group, *says));
    }
    for (lapse, _, group, says) in &running {
        let body = wait_for(
            LONG,
            POLL,
            &format!("{group}: /readyz to say {says}"),
            async || {
                let (code, body) = lapse.http_get("/readyz").await.ok()?;
                let v = readyz_json(&body);
                let broker = v["not_ready"]["broker"].as_str()?;
                (code == 503 && broker.contains(says)).then(|| body.clone())
            },
        )
        .await;
        eprintln!("{group}: {body}");
        let stderr = lapse.stderr();
        assert!(
            stderr.contains(says),
            "{group}: the log says {says}:\n{stderr}"
        );
    }
    let before: Vec<usize> = running
        .iter()
        .map(|(l, ..)| l.stderr().lines().count())
        .collect();
    tokio::time::sleep(Duration::from_secs(30)).await;
    for ((lapse, s, group, _), before) in running.iter_mut().zip(before) {
        let stderr = lapse.stderr();
        let added = stderr.lines().count() - before;
        assert!(added <= 3, "{group}: {added} log lines in 30 s:\n{stderr}");
        assert!(lapse.is_running(), "{group} must keep retrying, not exit");
        let (code, body) = lapse.http_get("/readyz").await.unwrap();
        assert_eq!(code, 503, "{group} stays not ready: {body}");
        assert!(
            readyz_json(&body)["not_ready"]["broker"].is_string(),
            "{body}"
        );
        assert_eq!(metric(lapse, "lapse_ready", &[]).await, 0.0);
        assert!(
            committed_offsets(&s.broker.bootstrap(), group, &INPUTS)
                .await
                .is_empty(),
            "{group}: nothing may be committed"
        );
    }
    // Each names its own cause, not the others'.
    for (lapse, _, group, says) in &running {
        let (_, body) = lapse.http_get("/readyz").await.unwrap();
        let reason = readyz_json(&body)["not_ready"]["broker"]
            .as_str()
            .unwrap()
            .to_owned();
        let hint = reason.split(" (broker ").next().unwrap();
        for (_, _, _, other) in &cases {
            if other != says {
                assert!(!hint.contains(other), "{group}: {reason}");
            }
        }
        eprintln!("{group}: {reason}");
    }
}

// ---------------------------------------------------------------------------
// Kafka SASL (SCRAM against tansu's own authentication)
// ---------------------------------------------------------------------------

#[tokio::test]
async fn kafka_sasl_scram_refused_login_names_the_setting_and_leaks_no_password() {
    // tansu 0.6 runs the SCRAM exchange but, on its memory storage, cannot be
    // given a user (see Broker::start_requiring_sasl): every login is refused,
    // which is what this test needs; a successful SASL login is not tested.
    let certs = TestCerts::generate();
    let plain = Broker::start_requiring_sasl(None).await;
    let tls = Broker::start_requiring_sasl(Some(&BrokerTls {
        certs: &certs,
        server: ServerCert::Good,
        client_auth: false,
    }))
    .await;
    let redis = RedisServer::start().await;
    let dir = scratch_dir("sasl");
    let pw = dir.path().join("sasl-password");
    std::fs::write(&pw, format!("{SASL_SECRET}\n")).unwrap();
    // (group, broker, security_protocol, mechanism)
    let cases = [
        ("g-sasl-256", &plain, "SASL_PLAINTEXT", "SCRAM-SHA-256"),
        ("g-sasl-512", &plain, "SASL_PLAINTEXT", "SCRAM-SHA-512"),
        ("g-sasl-ssl", &tls, "SASL_SSL", "SCRAM-SHA-512"),
    ];
    let mut running = Vec::new();
    for (group, broker, protocol, mechanism) in cases {
        let config = dir.path().join(format!("{group}.toml"));
        let mut kafka = format!(
            "[kafka]\nsecurity_protocol = \"{protocol}\"\nsasl_mechanism = \"{mechanism}\"\n\
             sasl_username = \"lapse\"\nsasl_password_file = \"{}\"\n",
            pw.display()
        );
        if protocol == "SASL_SSL" {
            kafka.push_str(&format!("ssl_ca_file = \"{}\"\n", certs.ca().display()));
        }
        std::fs::write(
            &config,
            format!("{kafka}[retry]\ninitial_backoff = \"50ms\"\nmax_backoff = \"500ms\"\n"),
        )
        .unwrap();
        let lapse = LapseProcess::spawn(
            &["run", "--config", &config.display().to_string()],
            &[
                ("LAPSE_REDIS_URL", &redis.url()),
                ("LAPSE_KAFKA_BROKERS", &broker.bootstrap()),
                ("LAPSE_GROUP_ID", group),
                ("LAPSE_SCHEMAS_DIR", &schemas_dir()),
                (
                    "RUST_LOG",
                    "debug,rdkafka=debug,hyper=info,hyper_util=info,h2=info",
                ),
            ],
        );
        running.push((lapse, group));
    }
    for (lapse, group) in &running {
        let body = wait_for(
            LONG,
            POLL,
            &format!("{group}: /readyz to name kafka.sasl_password"),
            async || {
                let (code, body) = lapse.http_get("/readyz").await.ok()?;
                let v = readyz_json(&body);
                let broker = v["not_ready"]["broker"].as_str()?;
                (code == 503 && broker.contains("kafka.sasl_password")).then(|| body.clone())
            },
        )
        .await;
        eprintln!("{group}: {body}");
        assert_no_secret("/readyz", &body);
    }
    let before: Vec<usize> = running
        .iter()
        .map(|(l, _)| {
            l.stderr()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .count()
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(15)).await;
    for ((lapse, group), before) in running.iter_mut().zip(before) {
        let stderr = lapse.stderr();
        let added = stderr
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .count()
            - before;
        assert!(added <= 2, "{group}: {added} warnings in 15 s:\n{stderr}");
        assert!(lapse.is_running(), "{group} must keep retrying, not exit");
        let (code, _) = lapse.http_get("/readyz").await.unwrap();
        assert_eq!(code, 503, "{group} stays not ready");
        lapse.sigterm();
        lapse.wait_exit(Duration::from_secs(30)).await;
        let logs = lapse.all_output();
        assert!(logs.contains("kafka.sasl_password"), "{group}:\n{logs}");
        // The broker refused the SCRAM exchange itself, not the mechanism.
        assert!(logs.contains("unknown-user"), "{group}:\n{logs}");
        // At debug level too, librdkafka's SASL exchange included.
        assert_no_secret("the logs", &logs);
    }
}

#[tokio::test]
async fn redis_expired_or_mismatching_certificates_fail_clearly_and_commit_nothing() {
    let certs = TestCerts::generate();
    let s = Stack::start().await;
    let (_expired, expired_port) = tls_redis_presenting(&certs, ServerCert::Expired).await;
    let (_wrong_host, wrong_host_port) = tls_redis_presenting(&certs, ServerCert::WrongHost).await;
    let (_good, good_port) = tls_redis(&certs).await;
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &population("rcert", 3, 1), |_| {
        lapse::codec::Framing::SingleObject
    })
    .await;
    let pw = s.dir.path().join("redis-password");
    std::fs::write(&pw, ACL_PASSWORD).unwrap();
    let redis_lines = |(cert, key): (std::path::PathBuf, std::path::PathBuf)| {
        format!(
            "password_file = \"{}\"\ntls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            pw.display(),
            certs.ca().display(),
            cert.display(),
            key.display()
        )
    };
    let client = || (certs.client_cert(), certs.client_key());
    // (group, Redis TLS port, [redis] lines, what the reason must say)
    let cases = [
        (
            "g-r-expired",
            expired_port,
            redis_lines(client()),
            "has expired",
        ),
        (
            "g-r-host",
            wrong_host_port,
            redis_lines(client()),
            "does not name the host in redis.url",
        ),
        (
            "g-r-expired-client",
            good_port,
            redis_lines(certs.expired_client()),
            "redis.tls_cert_file",
        ),
    ];
    let mut running = Vec::new();
    for (group, port, redis, says) in &cases {
        let cfg = tls_config(&s, group, redis);
        let mut env = tls_env(&s, group, *port);
        env.push(("RUST_LOG".into(), "info,rdkafka=warn".into()));
        running.push((spawn_env(&cfg, &env), *group, *says));
    }
    for (lapse, group, says) in &running {
        let body = wait_for(
            LONG,
            POLL,
            &format!("{group}: /readyz to say {says}"),
            async || {
                let (code, body) = lapse.http_get("/readyz").await.ok()?;
                let v = readyz_json(&body);
                let redis = v["not_ready"]["redis"].as_str()?;
                (code == 503 && redis.contains(says)).then(|| body.clone())
            },
        )
        .await;
        eprintln!("{group}: {body}");
        for (_, _, _, other) in &cases {
            if other != says {
                assert!(!body.contains(other), "{group}: {body}");
            }
        }
        assert!(
            lapse.stderr().contains(says),
            "{group}: the log says {says}"
        );
    }
    // Consuming waits for Redis: nothing is committed meanwhile.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (lapse, group, _) in &mut running {
        assert!(lapse.is_running(), "{group} must keep retrying, not exit");
        assert_eq!(metric(lapse, "lapse_ready", &[]).await, 0.0);
        assert!(
            committed_offsets(&s.broker.bootstrap(), group, &INPUTS)
                .await
                .is_empty(),
            "{group}: nothing may be committed"
        );
    }
}

#[tokio::test]
async fn schema_registry_with_a_bearer_token() {
    let s = Stack::start().await;
    s.registry.require_bearer_token("registry-token-right");
    let spawn = |group: &str, token: &str| {
        let dir = &s.dir;
        let file = dir.path().join(format!("{group}-token"));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        let cfg = s.config_with(
            group,
            "",
            &format!("[schema]\nregistry_token_file = \"{}\"\n", file.display()),
        );
        s.spawn(group, &cfg)
    };
    let mut good = spawn("g-token", "registry-token-right");
    let wrong = spawn("g-token-wrong", "registry-token-wrong");
    good.wait_ready(LONG).await;
    // lapse registered its output schemas with the token.
    assert!(!s
        .registry
        .subject_ids("engagement.throttle-value")
        .is_empty());
    let body = wait_for(
        LONG,
        POLL,
        "/readyz to name schema.registry_token",
        async || {
            let (code, body) = wrong.http_get("/readyz").await.ok()?;
            let v = readyz_json(&body);
            let registry = v["not_ready"]["registry"].as_str()?;
            (code == 503 && registry.contains("schema.registry_token")).then(|| body.clone())
        },
    )
    .await;
    assert!(!body.contains("registry-token-"), "{body}");
    assert!(!wrong.all_output().contains("registry-token-"));
    assert!(!good.all_output().contains("registry-token-"));
}

#[tokio::test]
async fn redis_cluster_over_mutual_tls_as_the_least_privilege_acl_user_applies_and_commits() {
    let certs = TestCerts::generate();
    // The README's rule, plus what it says a Cluster needs.
    let rule = format!("{} +cluster|slots", readme_acl_rule(ACL_PASSWORD));
    let cluster = common::tls::TlsRedisCluster::start(&certs, &rule).await;
    let s = Stack::start_single().await;
    let pw = s.dir.path().join("redis-password");
    std::fs::write(&pw, format!("{ACL_PASSWORD}\n")).unwrap();
    let cfg = tls_config(
        &s,
        "tls-cluster",
        &format!(
            "cluster = true\npassword_file = \"{}\"\ntls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
            pw.display(),
            certs.ca().display(),
            certs.client_cert().display(),
            certs.client_key().display()
        ),
    );
    let p = Producer::new(&s.broker.bootstrap());
    produce_events(&p, &population("tlsc", 20, 1), |_| {
        lapse::codec::Framing::SingleObject
    })
    .await;
    let group = "g-tls-cluster";
    let mut lapse = spawn_env(&cfg, &tls_env(&s, group, cluster.ports()[0]));
    s.wait_caught_up(group, LONG).await;
    lapse.wait_ready(LONG).await;
    // The states are in the cluster, spread over its masters (each key is
    // on a master and its replica): 20 customers' states at least.
    // (Replicated over TLS as the ACL file's admin user.)
    wait_until(
        LONG,
        POLL,
        "every master and replica to hold states",
        async || {
            let counts = cluster.key_counts(&certs);
            counts.iter().sum::<u64>() >= 2 * 20 && counts.iter().all(|n| *n > 0)
        },
    )
    .await;
    let (code, body) = lapse.http_get("/v1/allowance/tlsc/c0007").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(metric(&lapse, "lapse_state_writes_total", &[]).await > 0.0);
    assert_eq!(
        metric(&lapse, "lapse_redis_permanent_errors_total", &[]).await,
        0.0
    );
    let logs = cluster.logs();
    assert!(!logs.contains("NOPERM"), "{logs}");
    lapse.sigterm();
    assert!(lapse.wait_exit(Duration::from_secs(30)).await.success());
}
