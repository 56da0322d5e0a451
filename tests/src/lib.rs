//! Shared helpers for the integration tests.
//!
//! The wire fixtures recorded from the TypeScript reference 0.6.0 are vendored under
//! `tests/fixtures/reference-0.6.0/` so a fresh clone is self-contained; `fixtures_match_shared`
//! checks the copy against `../shared/spec/wire-fixtures/` whenever that folder is present.

pub mod fuzz_entry;

use std::path::{Path, PathBuf};

/// The folder holding the vendored reference fixtures.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("reference-0.6.0")
}

/// The path of one vendored fixture file.
pub fn fixture_path(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// Reads one fixture file as text.
///
/// # Panics
///
/// When the file is missing: a test that silently skipped would be a test that cannot fail.
pub fn fixture_text(name: &str) -> String {
    let path = fixture_path(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("fixture {} is missing: {e}", path.display()))
}

/// Reads and parses one JSON fixture file.
///
/// # Panics
///
/// When the file is missing or not JSON.
pub fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&fixture_text(name))
        .unwrap_or_else(|e| panic!("fixture {name} is not JSON: {e}"))
}

/// The shared spec folder beside the repository, if present (`../shared/spec/wire-fixtures`).
pub fn shared_fixtures_dir() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("..")
        .join("shared")
        .join("spec")
        .join("wire-fixtures");
    p.is_dir().then_some(p)
}

/// Standard base64 with padding, enough for the fixtures' `raw_response` data.
///
/// # Panics
///
/// On a character outside the standard alphabet.
pub fn b64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        let [_, a, b, c] = acc.to_be_bytes();
        out.extend_from_slice(&[a, b, c][..chunk.len() - 1]);
    }
    out
}
