//! Confluent Schema Registry client: `GET {base}/schemas/ids/{id}`, parsed
//! schemas cached by id (ids are immutable in a registry, so entries never go stale).
//!
//! Outcomes are split for the consumer: 404 is permanent (`unknown_schema_id`,
//! dead-letter); connection errors, timeouts, 5xx and other non-404 statuses are
//! transient (`registry_unavailable`, retry): a wrong password or a registry
//! outage must pause the pipeline, not dead-letter every record.

use super::error::{truncate, CodecError, DecodeError};
use crate::secret::Secret;
use apache_avro::Schema;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Parsed schemas kept; registries hold few ids, this only bounds memory.
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;
/// Confluent's content type for registry requests and answers.
const REGISTRY_JSON: &str = "application/vnd.schemaregistry.v1+json";
/// Largest registry response read; real schemas are far smaller.
const MAX_RESPONSE_BYTES: usize = 4 << 20;
/// Unknown ids remembered, so a stream of records with a bad id does not
/// become a stream of HTTP requests.
const MAX_NOT_FOUND: usize = 1024;

/// Tuning of [`RegistryClient`]; `Default` gives the values used by `new`.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Whole-request timeout (connect + response).
    pub timeout: Duration,
    /// Parsed schemas cached by id.
    pub cache_capacity: usize,
    /// How long a permanent answer (404, or a schema lapse cannot use) is
    /// remembered before asking again.
    pub not_found_ttl: Duration,
    /// After a transient failure, uncached lookups fail at once for this long
    /// instead of each waiting for its own timeout (a batch of records with a
    /// registry outage then costs one timeout, not one per record).
    pub fail_fast: Duration,
    /// Credentials (instead of, or over, any in the URL).
    pub auth: Option<RegistryAuth>,
    /// PEM CA certificate(s) trusted for an https registry, in addition to
    /// the system's trust store.
    pub ca_pem: Option<Vec<u8>>,
}

/// How lapse authenticates to the registry.
#[derive(Debug, Clone)]
pub enum RegistryAuth {
    /// `Authorization: Basic base64(user:password)`.
    Basic { user: String, password: Secret },
    /// `Authorization: Bearer TOKEN`.
    Bearer(Secret),
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            timeout: Duration::from_secs(5),
            cache_capacity: DEFAULT_CACHE_CAPACITY,
            not_found_ttl: Duration::from_secs(10),
            fail_fast: Duration::from_secs(1),
            auth: None,
            ca_pem: None,
        }
    }
}

#[derive(Default)]
struct State {
    schemas: HashMap<u32, Arc<Schema>>,
    /// Ids answered with a permanent error (404, references, not Avro, not
    /// parseable), with when: a stream of such records costs one request, not
    /// one per record.
    not_found: HashMap<u32, (Instant, DecodeError)>,
    down: Option<(Instant, String)>,
}

struct Inner {
    http: reqwest::Client,
    /// Base URL without credentials and without a trailing slash.
    base: String,
    auth: Option<RegistryAuth>,
    opts: RegistryOptions,
    state: Mutex<State>,
}

/// Schema registry client; cheap to clone (shared cache and connection pool).
/// Concurrent lookups of the same uncached id may both fetch; the first
/// answer is kept.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.inner.base)
            .field("auth", &self.inner.auth)
            .finish()
    }
}

#[derive(Deserialize)]
struct SchemaResponse {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<serde_json::Value>,
}

impl RegistryClient {
    /// `url` is the registry base (`http://host:8081` or `https://...`,
    /// optionally with a path prefix and `user:password@` for basic auth).
    pub fn new(url: &str, timeout: Duration) -> Result<RegistryClient, CodecError> {
        RegistryClient::with_options(
            url,
            RegistryOptions {
                timeout,
                ..RegistryOptions::default()
            },
        )
    }

    pub fn with_options(url: &str, opts: RegistryOptions) -> Result<RegistryClient, CodecError> {
        let bad = |detail: &str| CodecError::RegistryUrl {
            url: redact(url),
            detail: detail.to_owned(),
        };
        let mut parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        match parsed.scheme() {
            "http" | "https" => {}
            _ => return Err(bad("scheme must be http or https")),
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        let auth = if parsed.username().is_empty() && parsed.password().is_none() {
            None
        } else {
            let user = percent_decode(parsed.username());
            let password = Secret::new(percent_decode(parsed.password().unwrap_or("")));
            // Credentials never appear in URLs we log or put into errors.
            let _ = parsed.set_username("");
            let _ = parsed.set_password(None);
            Some(RegistryAuth::Basic { user, password })
        };
        let auth = opts.auth.clone().or(auth);
        parsed.set_query(None);
        parsed.set_fragment(None);
        let base = parsed.as_str().trim_end_matches('/').to_owned();
        if opts.cache_capacity == 0 {
            return Err(bad("cache capacity must be at least 1"));
        }
        let mut builder = reqwest::Client::builder()
            .timeout(opts.timeout)
            .connect_timeout(opts.timeout)
            .https_only(parsed.scheme() == "https");
        if let Some(pem) = &opts.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                bad(&format!(
                    "schema.registry_ca_file is not a PEM certificate bundle: {e}"
                ))
            })?;
            if certs.is_empty() {
                return Err(bad("schema.registry_ca_file holds no PEM certificate"));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| CodecError::HttpClient(e.to_string()))?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                http,
                base,
                auth,
                opts,
                state: Mutex::new(State::default()),
            }),
        })
    }

    /// The base URL, without credentials.
    pub fn base_url(&self) -> &str {
        &self.inner.base
    }

    /// Number of parsed schemas cached.
    pub fn cached(&self) -> usize {
        self.state().schemas.len()
    }

    /// The writer schema registered under `id`.
    pub async fn schema(&self, id: u32) -> Result<Arc<Schema>, DecodeError> {
        {
            let mut st = self.state();
            if let Some(s) = st.schemas.get(&id) {
                return Ok(s.clone());
            }
            let now = Instant::now();
            if let Some((at, error)) = st.not_found.get(&id) {
                if now.duration_since(*at) < self.inner.opts.not_found_ttl {
                    return Err(error.clone());
                }
                st.not_found.remove(&id);
            }
            if let Some((at, detail)) = &st.down {
                if now.duration_since(*at) < self.inner.opts.fail_fast {
                    return Err(DecodeError::RegistryUnavailable {
                        id,
                        detail: format!("{detail} (failed moments ago; not retried yet)"),
                    });
                }
            }
        }
        let result = self.fetch(id).await;
        let mut st = self.state();
        match &result {
            Ok(schema) => {
                st.down = None;
                if st.schemas.len() >= self.inner.opts.cache_capacity {
                    // Any victim will do: ids are immutable, a miss only costs a fetch.
                    if let Some(victim) = st.schemas.keys().next().copied() {
                        st.schemas.remove(&victim);
                    }
                }
                let kept = st
                    .schemas
                    .entry(id)
                    .or_insert_with(|| schema.clone())
                    .clone();
                return Ok(kept);
            }
            Err(DecodeError::RegistryUnavailable { detail, .. }) => {
                st.down = Some((Instant::now(), detail.clone()));
            }
            Err(permanent) => {
                st.down = None;
                if st.not_found.len() >= MAX_NOT_FOUND {
                    st.not_found.clear();
                }
                st.not_found.insert(id, (Instant::now(), permanent.clone()));
            }
        }
        result
    }

    /// Start-up/readiness probe: `GET {base}/config`, which every
    /// Confluent-compatible registry answers. Catches a wrong base URL (which
    /// would otherwise turn into 404s, dead-lettering every Confluent record)
    /// and bad credentials.
    pub async fn probe(&self) -> Result<(), CodecError> {
        let url = format!("{}/config", self.inner.base);
        let resp = self
            .request(reqwest::Method::GET, &url)
            .send()
            .await
            .map_err(|e| CodecError::RegistryUrl {
                url: self.inner.base.clone(),
                detail: format!(
                    "{}; check schema.registry_url{}",
                    describe(&e),
                    if self.inner.base.starts_with("https") {
                        " and schema.registry_ca_file (the CA that signed the registry's certificate)"
                    } else {
                        ""
                    }
                ),
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let hint = match status.as_u16() {
            401 | 403 => "the registry refused lapse's credentials: check schema.registry_username and schema.registry_password (or schema.registry_token), their _file keys or LAPSE_SCHEMA_REGISTRY_* variables",
            _ => "is this a schema registry?",
        };
        Err(CodecError::RegistryUrl {
            url: self.inner.base.clone(),
            detail: format!("GET /config answered HTTP {status}; {hint}"),
        })
    }

    /// The id of `schema_json` under `subject`, registering it first when
    /// `register` (`POST /subjects/{subject}/versions`; the registry answers
    /// the existing id for a schema it has) or only looking it up otherwise
    /// (`POST /subjects/{subject}`). An unreachable registry is
    /// [`CodecError::RegistryUnreachable`] (worth retrying); a refusal
    /// (incompatible, forbidden, not registered) is [`CodecError::RegistryRefused`].
    pub async fn subject_schema_id(
        &self,
        subject: &str,
        schema_json: &str,
        register: bool,
    ) -> Result<u32, CodecError> {
        let path = if register {
            format!("/subjects/{}/versions", path_segment(subject))
        } else {
            format!("/subjects/{}", path_segment(subject))
        };
        let url = format!("{}{path}", self.inner.base);
        let unreachable = |detail: String| CodecError::RegistryUnreachable {
            url: self.inner.base.clone(),
            detail,
        };
        let req = self
            .request(reqwest::Method::POST, &url)
            .header(reqwest::header::CONTENT_TYPE, REGISTRY_JSON)
            .body(serde_json::json!({ "schema": schema_json }).to_string());
        let resp = req.send().await.map_err(|e| unreachable(describe(&e)))?;
        let status = resp.status();
        let body = read_limited(resp)
            .await
            .map_err(|e| unreachable(format!("POST {path}: {e}")))?;
        if status.is_server_error() {
            return Err(unreachable(format!("POST {path} answered HTTP {status}")));
        }
        if status == reqwest::StatusCode::UNAUTHORIZED {
            // Wrong credentials: retried (not ready) until an operator fixes them.
            return Err(unreachable(format!(
                "POST {path} answered HTTP {status}: the registry refused lapse's credentials; check schema.registry_username and schema.registry_password (or schema.registry_token), their _file keys or LAPSE_SCHEMA_REGISTRY_* variables"
            )));
        }
        let refused = |detail: String| CodecError::RegistryRefused {
            subject: subject.to_owned(),
            detail,
        };
        if !status.is_success() {
            // Confluent's error body: {"error_code": 40403, "message": "..."}.
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
                .unwrap_or_default();
            let hint = match (status.as_u16(), register) {
                (401 | 403, _) => "check the registry credentials (schema.registry_username, schema.registry_password or schema.registry_token), or give lapse's user the right to register (or set outputs.register_schemas = false and register the schemas yourself)",
                (404, false) => "the schema is not registered under this subject: register schemas/ with the registry, or set outputs.register_schemas = true",
                (409, _) => "the subject's compatibility rules refuse this schema: check the subject's earlier versions and compatibility level",
                (422, _) => "the registry does not accept the schema as Avro",
                _ => "check the registry and the subject",
            };
            return Err(refused(format!(
                "POST {path} answered HTTP {status} {}; {hint}",
                truncate(&message, 300)
            )));
        }
        #[derive(Deserialize)]
        struct IdResponse {
            id: u32,
        }
        let parsed: IdResponse = serde_json::from_slice(&body).map_err(|e| {
            unreachable(format!(
                "POST {path}: answer is not a schema registry response ({e})"
            ))
        })?;
        Ok(parsed.id)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The lock only guards map updates; a panic elsewhere cannot leave them torn.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request to the registry: its content types accepted, credentials attached.
    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.inner.http.request(method, url).header(
            reqwest::header::ACCEPT,
            format!("{REGISTRY_JSON}, application/json"),
        );
        match &self.inner.auth {
            Some(RegistryAuth::Basic { user, password }) => {
                req.basic_auth(user, Some(password.expose()))
            }
            Some(RegistryAuth::Bearer(token)) => req.bearer_auth(token.expose()),
            None => req,
        }
    }

    async fn fetch(&self, id: u32) -> Result<Arc<Schema>, DecodeError> {
        let unavailable = |detail: String| DecodeError::RegistryUnavailable { id, detail };
        let url = format!("{}/schemas/ids/{id}", self.inner.base);
        let resp = self
            .request(reqwest::Method::GET, &url)
            .send()
            .await
            .map_err(|e| unavailable(describe(&e)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(DecodeError::UnknownSchemaId { id });
        }
        if !status.is_success() {
            let hint = match status.as_u16() {
                401 | 403 => "; check the registry credentials (schema.registry_username, schema.registry_password or schema.registry_token, their _file keys or LAPSE_SCHEMA_REGISTRY_* variables)",
                _ => "",
            };
            return Err(unavailable(format!(
                "GET {url} answered HTTP {status}{hint}"
            )));
        }
        let body = read_limited(resp)
            .await
            .map_err(|e| unavailable(format!("GET {url}: {e}")))?;
        // A 200 that is not a registry answer means a misconfigured endpoint:
        // transient, so records wait for the fix instead of being dead-lettered.
        let parsed: SchemaResponse = serde_json::from_slice(&body).map_err(|e| {
            unavailable(format!(
                "GET {url}: answer is not a schema registry response ({e})"
            ))
        })?;
        if let Some(t) = parsed.schema_type.as_deref() {
            if !t.eq_ignore_ascii_case("AVRO") {
                return Err(DecodeError::UnsupportedSchemaType {
                    id,
                    schema_type: truncate(t, 16),
                });
            }
        }
        let source_desc = format!("id {id} from the registry");
        if !parsed.references.is_empty() {
            return Err(DecodeError::SchemaReferences {
                id,
                references: describe_references(&parsed.references),
            });
        }
        let schema =
            Schema::parse_str(&parsed.schema).map_err(|e| DecodeError::BadWriterSchema {
                source_desc,
                detail: truncate(&e.to_string(), 200),
            })?;
        Ok(Arc::new(schema))
    }
}

/// A response body of at most [`MAX_RESPONSE_BYTES`].
async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(format!("response larger than {MAX_RESPONSE_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A subject as one URL path segment (topic names may hold `.`, never `/`,
/// but a configured name is not trusted to be clean).
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The first few references of a registry answer, as `name (subject S, version
/// V)`: type and subject names only, bounded.
fn describe_references(refs: &[serde_json::Value]) -> String {
    const SHOWN: usize = 3;
    let field = |r: &serde_json::Value, k: &str| match r.get(k) {
        Some(serde_json::Value::String(s)) => truncate(s, 100),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => "?".to_owned(),
    };
    let mut out: Vec<String> = refs
        .iter()
        .take(SHOWN)
        .map(|r| {
            format!(
                "{} (subject {}, version {})",
                field(r, "name"),
                field(r, "subject"),
                field(r, "version")
            )
        })
        .collect();
    if refs.len() > SHOWN {
        out.push(format!("{} more", refs.len() - SHOWN));
    }
    out.join(", ")
}

/// reqwest errors with their cause chain (the top level alone says only
/// "error sending request").
fn describe(e: &reqwest::Error) -> String {
    let mut s = if e.is_timeout() {
        format!("timed out: {e}")
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    let lower = s.to_ascii_lowercase();
    let hint = if lower.contains("peer certificate") || lower.contains("unknownissuer") {
        "; lapse does not trust the registry's certificate (or it names another host, or has expired): set schema.registry_ca_file to the CA that signed it"
    } else if lower.contains("alert") || lower.contains("handshake") {
        "; the TLS handshake with the registry failed: check schema.registry_url and schema.registry_ca_file"
    } else {
        ""
    };
    format!("{}{hint}", truncate(&s, 300))
}

/// The URL with any password replaced, for error messages about the URL itself.
fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        // Unparseable: show only the part before any '@'-separated credentials.
        Err(_) => match url.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => url.to_owned(),
        },
    }
}

pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
pub(crate) mod stub {
    //! A tiny schema registry on 127.0.0.1 for tests.
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::Router;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[derive(Clone, Debug)]
    pub(crate) enum Answer {
        /// 200 with `{"schema": ...}`.
        Avro(String),
        /// 200 with a raw body.
        Raw(String),
        /// That status, empty body.
        Status(u16),
        /// Never answers in time.
        Slow,
    }

    pub(crate) struct Stub {
        pub base: String,
        pub hits: Arc<AtomicUsize>,
        pub last_auth: Arc<std::sync::Mutex<Option<String>>>,
    }

    impl Stub {
        pub(crate) fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }
    }

    #[derive(Clone)]
    struct St {
        answers: Arc<HashMap<u32, Answer>>,
        hits: Arc<AtomicUsize>,
        last_auth: Arc<std::sync::Mutex<Option<String>>>,
    }

    async fn by_id(State(st): State<St>, Path(id): Path<u32>, headers: HeaderMap) -> Response {
        st.hits.fetch_add(1, Ordering::SeqCst);
        *st.last_auth.lock().unwrap() = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        match st.answers.get(&id).cloned() {
            Some(Answer::Avro(s)) => (
                StatusCode::OK,
                serde_json::json!({ "schema": s }).to_string(),
            )
                .into_response(),
            Some(Answer::Raw(body)) => (StatusCode::OK, body).into_response(),
            Some(Answer::Status(code)) => StatusCode::from_u16(code).unwrap().into_response(),
            Some(Answer::Slow) => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                StatusCode::OK.into_response()
            }
            None => (
                StatusCode::NOT_FOUND,
                r#"{"error_code":40403,"message":"Schema not found"}"#,
            )
                .into_response(),
        }
    }

    /// Serves `answers` at `/schemas/ids/{id}` (unknown ids: 404) and `/config`.
    pub(crate) async fn start(answers: HashMap<u32, Answer>) -> Stub {
        let hits = Arc::new(AtomicUsize::new(0));
        let last_auth = Arc::new(std::sync::Mutex::new(None));
        let app = Router::new()
            .route("/schemas/ids/{id}", get(by_id))
            .route(
                "/config",
                get(|| async { r#"{"compatibilityLevel":"BACKWARD"}"# }),
            )
            .with_state(St {
                answers: Arc::new(answers),
                hits: hits.clone(),
                last_auth: last_auth.clone(),
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Stub {
            base: format!("http://{addr}"),
            hits,
            last_auth,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::stub::{start, Answer};
    use super::*;

    const SCHEMA: &str =
        r#"{"type":"record","name":"X","namespace":"t","fields":[{"name":"a","type":"long"}]}"#;

    fn client(base: &str) -> RegistryClient {
        RegistryClient::new(base, Duration::from_millis(500)).unwrap()
    }

    #[tokio::test]
    async fn fetches_and_caches_by_id() {
        let stub = start([(7, Answer::Avro(SCHEMA.into()))].into()).await;
        let c = client(&stub.base);
        let s1 = c.schema(7).await.unwrap();
        let s2 = c.schema(7).await.unwrap();
        assert!(Arc::ptr_eq(&s1, &s2));
        assert_eq!(stub.hits(), 1);
        assert_eq!(c.cached(), 1);
        c.probe().await.unwrap();
    }

    #[tokio::test]
    async fn not_found_is_permanent_and_remembered() {
        let stub = start(HashMap::new()).await;
        let c = client(&stub.base);
        for _ in 0..3 {
            let e = c.schema(99).await.unwrap_err();
            assert_eq!(e.reason(), "unknown_schema_id");
            assert!(!e.is_transient());
        }
        assert_eq!(stub.hits(), 1);
    }

    #[tokio::test]
    async fn server_errors_bad_answers_and_timeouts_are_transient() {
        let stub = start(
            [
                (1, Answer::Status(503)),
                (2, Answer::Raw("<html>proxy error</html>".into())),
                (3, Answer::Slow),
                (4, Answer::Status(401)),
            ]
            .into(),
        )
        .await;
        let opts = RegistryOptions {
            timeout: Duration::from_millis(300),
            fail_fast: Duration::ZERO,
            ..RegistryOptions::default()
        };
        let c = RegistryClient::with_options(&stub.base, opts).unwrap();
        for id in [1, 2, 3, 4] {
            let e = c.schema(id).await.unwrap_err();
            assert!(e.is_transient(), "id {id}: {e}");
            assert_eq!(e.reason(), "registry_unavailable");
        }
        let e = c.schema(4).await.unwrap_err();
        assert!(e.to_string().contains("credentials"), "{e}");
    }

    #[tokio::test]
    async fn connection_refused_is_transient_and_fails_fast_afterwards() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let c = client(&format!("http://{addr}"));
        let e = c.schema(1).await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        let started = Instant::now();
        let e = c.schema(2).await.unwrap_err();
        assert!(e.is_transient());
        assert!(e.to_string().contains("moments ago"), "{e}");
        assert!(started.elapsed() < Duration::from_millis(50));
    }

    #[tokio::test]
    async fn unusable_schemas_are_permanent() {
        let stub = start(
            [
                (1, Answer::Raw(r#"{"schema":"syntax = \"proto3\";","schemaType":"PROTOBUF"}"#.into())),
                (2, Answer::Avro("{\"type\": \"nonsense\"}".into())),
                (
                    3,
                    Answer::Raw(
                        serde_json::json!({"schema": SCHEMA, "references": [{"name":"a","subject":"b","version":1}]})
                            .to_string(),
                    ),
                ),
                (4, Answer::Raw(serde_json::json!({"schema": SCHEMA, "schemaType": "AVRO"}).to_string())),
            ]
            .into(),
        )
        .await;
        let c = client(&stub.base);
        assert_eq!(
            c.schema(1).await.unwrap_err().reason(),
            "unsupported_schema_type"
        );
        assert_eq!(c.schema(2).await.unwrap_err().reason(), "bad_writer_schema");
        let e = c.schema(3).await.unwrap_err();
        assert_eq!(e.reason(), "schema_references");
        assert!(!e.is_transient());
        assert!(
            e.to_string()
                .contains("references (a (subject b, version 1))"),
            "{e}"
        );
        c.schema(4).await.unwrap();
        // Permanent answers are remembered: asking again costs no request.
        let hits = stub.hits();
        for id in [1, 2, 3] {
            let again = c.schema(id).await.unwrap_err();
            assert!(!again.is_transient());
        }
        assert_eq!(c.schema(3).await.unwrap_err(), e);
        assert_eq!(stub.hits(), hits);
    }

    #[tokio::test]
    async fn cache_is_bounded() {
        let answers = (0..20).map(|i| (i, Answer::Avro(SCHEMA.into()))).collect();
        let stub = start(answers).await;
        let opts = RegistryOptions {
            cache_capacity: 5,
            ..RegistryOptions::default()
        };
        let c = RegistryClient::with_options(&stub.base, opts).unwrap();
        for i in 0..20 {
            c.schema(i).await.unwrap();
        }
        assert_eq!(c.cached(), 5);
    }

    #[tokio::test]
    async fn basic_auth_from_the_url_is_sent_and_never_shown() {
        let stub = start([(7, Answer::Avro(SCHEMA.into()))].into()).await;
        let url = stub.base.replace("http://", "http://us%40er:p%3Ass@");
        let c = client(&format!("{url}/"));
        assert_eq!(c.base_url(), stub.base);
        assert!(!format!("{c:?}").contains("p%3Ass"));
        c.schema(7).await.unwrap();
        // base64("us@er:p:ss")
        assert_eq!(
            stub.last_auth.lock().unwrap().as_deref(),
            Some("Basic dXNAZXI6cDpzcw==")
        );
    }

    #[test]
    fn bad_urls_fail_at_start_up_without_leaking_passwords() {
        for url in [
            "not a url",
            "ftp://r",
            "ftp://u:secret@r",
            "http://u:secret@/x",
        ] {
            let e = RegistryClient::new(url, Duration::from_secs(1)).unwrap_err();
            assert!(!e.to_string().contains("secret"), "{e}");
        }
        let e = RegistryClient::new("ftp://u:secret@r:8081", Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("***"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%40b%3a"), "a@b:");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
