//! Secrets (passwords, tokens): a [`Secret`] prints as `***` (Debug, Display,
//! and when a config is rendered by `check-config`), and every secret value
//! lapse was configured with is registered here, so text that leaves the
//! process (log lines, `/readyz` reasons, the final error) is scrubbed of it
//! even when a library put it into a message ([`scrub`], [`ScrubbingStderr`]).

use std::borrow::Cow;
use std::io::Write;
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

/// What a secret prints as.
pub const REDACTED: &str = "***";

/// A password or token. Its value is reachable only through [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value` and registers it for scrubbing.
    pub fn new(value: impl Into<String>) -> Secret {
        let s = Secret(value.into());
        register(&s.0);
        s
    }

    /// The value, for the one place that hands it to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Rendered configs show `***`, never the value.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// Secret values shorter than this are not scrubbed from text (a one- or
/// two-character password would turn every log line into stars); they are
/// still never printed by lapse itself.
const MIN_SCRUBBED_LEN: usize = 3;

static REGISTERED: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Remembers `value` so [`scrub`] removes it from any text.
pub fn register(value: &str) {
    if value.len() < MIN_SCRUBBED_LEN {
        return;
    }
    let mut r = REGISTERED.write().unwrap_or_else(|p| p.into_inner());
    if !r.iter().any(|v| v == value) {
        r.push(value.to_owned());
        // Longest first, so a secret containing another is replaced whole.
        r.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }
}

/// `text` with every registered secret value replaced by `***`.
pub fn scrub(text: &str) -> Cow<'_, str> {
    let r = REGISTERED.read().unwrap_or_else(|p| p.into_inner());
    if !r.iter().any(|v| text.contains(v.as_str())) {
        return Cow::Borrowed(text);
    }
    let mut out = text.to_owned();
    for v in r.iter() {
        if out.contains(v.as_str()) {
            out = out.replace(v.as_str(), REDACTED);
        }
    }
    Cow::Owned(out)
}

/// stderr for the log subscriber: every write is scrubbed of registered
/// secrets. The formatter writes one whole event per call.
pub struct ScrubbingStderr;

impl Write for ScrubbingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(scrub(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_its_value() {
        let s = Secret::new("hunter2-correct-horse");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{:?}", Some(&s)), "Some(***)");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert_eq!(s.expose(), "hunter2-correct-horse");
        let back: Secret = serde_json::from_str("\"from-a-file\"").unwrap();
        assert_eq!(back.expose(), "from-a-file");
    }

    #[test]
    fn registered_values_are_scrubbed_from_text() {
        Secret::new("s3cr3t-token-value");
        Secret::new("s3cr3t");
        let text = "connect failed: password s3cr3t-token-value refused, s3cr3t too";
        assert_eq!(scrub(text), "connect failed: password *** refused, *** too");
        assert!(matches!(scrub("nothing here"), Cow::Borrowed(_)));
        register("ab");
        assert_eq!(scrub("a tab"), "a tab", "too short to scrub");
    }
}
