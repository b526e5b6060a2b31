//! The domain decides; adapters move bytes. This check fails when a file under
//! `src/domain` reaches for an adapter module, a wire format, a server client,
//! IO or the system clock: the domain is pure and its clock is injected.

use std::path::{Path, PathBuf};

/// External crates and std items the domain must not name (matched as whole words).
const FORBIDDEN: &[&str] = &[
    "apache_avro",
    "rdkafka",
    "redis",
    "tokio",
    "reqwest",
    "hyper",
    "axum",
    "prometheus",
    "tracing",
    "SystemTime",
    "Instant",
    "Utc::now",
    "Local::now",
    "std::fs",
    "std::net",
    "std::env",
    "std::process",
    "std::thread",
];

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src/domain") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate's top-level modules other than `domain` (from `src/lib.rs`): the adapters.
fn adapter_modules() -> Vec<String> {
    let lib = std::fs::read_to_string(manifest_dir().join("src/lib.rs")).expect("src/lib.rs");
    lib.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(str::to_string)
        })
        .filter(|m| m != "domain")
        .collect()
}

/// The line without its `//` comment (doc comments may name adapters; code may not).
fn code_of(line: &str) -> &str {
    let mut in_str = false;
    let b = line.as_bytes();
    for i in 0..b.len() {
        match b[i] {
            b'"' if i == 0 || b[i - 1] != b'\\' => in_str = !in_str,
            b'/' if !in_str && b.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
    }
    line
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `word` occurs in `code` with no identifier character on either side.
fn has_word(code: &str, word: &str) -> bool {
    code.match_indices(word).any(|(i, _)| {
        let before = code[..i].chars().next_back();
        let after = code[i + word.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

/// Why `code` breaks the domain's edges, if it does.
fn violation(code: &str, adapters: &[String]) -> Option<String> {
    // Every path from the crate root must stay inside the domain.
    for (i, _) in code.match_indices("crate::") {
        if !code[i + "crate::".len()..].starts_with("domain::") {
            return Some("a `crate::` path outside `crate::domain::`".into());
        }
    }
    // `super::…::config` and friends: reaching an adapter relative to here.
    for m in adapters {
        for (i, _) in code.match_indices(&format!("super::{m}")) {
            if !code[i + "super::".len() + m.len()..].starts_with(is_ident) {
                return Some(format!("the adapter module `{m}`"));
            }
        }
    }
    FORBIDDEN
        .iter()
        .find(|w| has_word(code, w))
        .map(|w| format!("`{w}`"))
}

#[test]
fn the_domain_imports_no_adapter_io_or_clock() {
    let adapters = adapter_modules();
    assert!(
        adapters.iter().any(|m| m == "config") && adapters.iter().any(|m| m == "codec"),
        "src/lib.rs lists the adapters: {adapters:?}"
    );
    let mut files = Vec::new();
    rust_files(&manifest_dir().join("src/domain"), &mut files);
    assert!(files.len() >= 10, "src/domain holds the domain: {files:?}");
    let mut found = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("readable source");
        for (n, line) in text.lines().enumerate() {
            if let Some(why) = violation(code_of(line), &adapters) {
                found.push(format!("{}:{}: {why}: {}", f.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "the domain is pure (no IO, injected clock); move these to an adapter:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_catches_what_it_should() {
    let adapters: Vec<String> = ["config", "codec", "store", "wall_clock"]
        .map(String::from)
        .to_vec();
    for bad in [
        "use crate::config::Dur;",
        "use crate::{codec, domain};",
        "use super::super::store::StateStore;",
        "let v = apache_avro::types::Value::Null;",
        "use redis::AsyncCommands;",
        "#[tokio::test]",
        "let now = chrono::Utc::now();",
        "use std::time::{Duration, SystemTime};",
        "let t = std::time::Instant::now();",
        "let s = std::fs::read_to_string(p);",
    ] {
        assert!(violation(code_of(bad), &adapters).is_some(), "{bad}");
    }
    for good in [
        "use crate::domain::event::Channel;",
        "use super::span::Span;",
        "use super::super::lapse::Stage;",
        "use std::time::Duration;",
        "/// Time is injected: `WallClock` (crate::wall_clock) reads the system clock.",
        "let x = 1; // not tokio",
        "let s = \"a // b\"; // after a string, a comment naming crate::config",
        "let configured = storey + codecs;",
    ] {
        assert_eq!(violation(code_of(good), &adapters), None, "{good}");
    }
}
