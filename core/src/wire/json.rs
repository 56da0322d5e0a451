//! The one entry point for wire JSON: [`decode`] and [`encode`].
//!
//! Every record the protocol puts on the wire or in a KV bucket goes through here, so the limits
//! that protect a receiver from hostile bytes are enforced in one place:
//!
//! | check | bound | error |
//! | --- | --- | --- |
//! | size | [`MAX_RECORD_BYTES`] (1 MiB, the NATS default `max_payload`) | [`DecodeError::TooLarge`] |
//! | empty payload (a KV `DEL`/`PURGE` marker, a stray publish) | — | [`DecodeError::Empty`] |
//! | UTF-8 | whole payload | [`DecodeError::NotUtf8`] |
//! | nesting | [`MAX_NESTING_DEPTH`] arrays/objects | [`DecodeError::TooDeep`] |
//! | JSON syntax, trailing bytes | — | [`DecodeError::Syntax`] |
//! | shape (missing field, wrong type, bad name) | — | [`DecodeError::Shape`] |
//!
//! The nesting bound is checked by a linear pre-scan before serde runs, so hostile input such as
//! 100 000 `[` never reaches a recursive parser and can never overflow the stack.
//!
//! # Numbers
//!
//! The reference writes numbers with `JSON.stringify`, which prints every integer-valued double below
//! 10²¹ as a plain integer. Integer fields (sequences, generations, cursors, revisions, timestamps)
//! therefore accept:
//!
//! - any non-negative integer literal that fits in `u64` (`0`, `42`, `18446744073709551615`);
//! - a float literal whose value is a non-negative integer no larger than [`MAX_SAFE_INTEGER`]
//!   (`1.0`, `1e3`), because a JavaScript peer cannot tell it apart from the integer.
//!
//! They reject negative numbers, fractions (`1.5`), and floats above [`MAX_SAFE_INTEGER`] (`1e300`),
//! whose integer value a JavaScript peer would not hold exactly. [`uint_from_number`] is that rule.
//!
//! # Encoding
//!
//! [`encode`] writes compact JSON (`JSON.stringify` without indentation). The record types emit their
//! known fields in the reference's key order (semantics §1.7), so a record decoded from the reference
//! re-encodes byte for byte. Unknown fields a record preserved are written after the known ones, in
//! sorted key order (this crate does not enable `serde_json/preserve_order`), and so are the keys of
//! free-form values such as a `data` part.

use bytes::Bytes;
use serde::Serialize;
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use std::fmt;

/// Largest payload [`decode`] accepts, in bytes: 1 MiB, the NATS server's default `max_payload`.
/// A broker with the default configuration cannot deliver anything larger.
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// Deepest array/object nesting [`decode`] accepts. Every record of the protocol nests at most five
/// levels below free-form `data`; 64 leaves room for application payloads while staying far below
/// `serde_json`'s own recursion limit of 128, so that limit is never what stops a decode.
pub const MAX_NESTING_DEPTH: usize = 64;

/// `Number.MAX_SAFE_INTEGER` (2⁵³ − 1): the largest integer a JavaScript peer holds exactly.
pub const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// Why bytes could not be decoded into a wire record.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The payload is longer than [`MAX_RECORD_BYTES`].
    TooLarge {
        /// The payload length, in bytes.
        len: usize,
        /// The bound it exceeded.
        max: usize,
    },
    /// The payload is empty (for example a KV `DEL` or `PURGE` marker).
    Empty,
    /// The payload is not valid UTF-8.
    NotUtf8 {
        /// Length of the longest valid UTF-8 prefix, in bytes.
        valid_up_to: usize,
    },
    /// Arrays/objects nest deeper than [`MAX_NESTING_DEPTH`].
    TooDeep {
        /// The bound that was exceeded.
        max: usize,
        /// Byte offset of the bracket that went past the bound.
        at: usize,
    },
    /// The payload is not a single well-formed JSON value.
    Syntax {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// The parser's description.
        message: String,
    },
    /// Well-formed JSON of the wrong shape: a missing field, a wrong type, an invalid name, two
    /// routing fields …
    Shape {
        /// 1-based line where the problem was noticed (0 when unknown).
        line: usize,
        /// 1-based column where the problem was noticed (0 when unknown).
        column: usize,
        /// serde's (or this crate's) description of the problem.
        message: String,
    },
    /// Well-formed JSON that breaks a rule of [`CotalMessage`](crate::wire::message::CotalMessage)
    /// (for example zero or two routing fields); returned by `CotalMessage::decode`.
    Message(MessageError),
}

/// Why a JSON object is not a [`CotalMessage`](crate::wire::message::CotalMessage) (also
/// `wire::message::MessageError`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageError {
    /// The payload is not a JSON object.
    NotAnObject,
    /// A required field is absent (or `null`).
    MissingField {
        /// The JSON key.
        field: &'static str,
    },
    /// A field has the wrong type or an invalid value.
    InvalidField {
        /// The JSON key.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// None of `channel`, `to`, `toService` is present.
    NoRoutingField,
    /// More than one routing field is present.
    MultipleRoutingFields {
        /// The routing fields found, in
        /// [`ROUTING_FIELDS`](crate::wire::message::ROUTING_FIELDS) order.
        fields: Vec<&'static str>,
    },
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::NotAnObject => write!(f, "message is not a JSON object"),
            MessageError::MissingField { field } => write!(f, "message: missing field `{field}`"),
            MessageError::InvalidField { field, message } => {
                write!(f, "message: invalid `{field}`: {message}")
            }
            MessageError::NoRoutingField => write!(
                f,
                "message has no routing field (exactly one of channel, to, toService is required)"
            ),
            MessageError::MultipleRoutingFields { fields } => write!(
                f,
                "message has {} routing fields ({}); exactly one of channel, to, toService is allowed",
                fields.len(),
                fields.join(", ")
            ),
        }
    }
}

impl std::error::Error for MessageError {}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { len, max } => {
                write!(f, "record of {len} bytes exceeds the {max}-byte limit")
            }
            DecodeError::Empty => write!(f, "empty payload is not a JSON record"),
            DecodeError::NotUtf8 { valid_up_to } => {
                write!(
                    f,
                    "payload is not UTF-8 (invalid byte at offset {valid_up_to})"
                )
            }
            DecodeError::TooDeep { max, at } => {
                write!(f, "JSON nests deeper than {max} levels (at byte {at})")
            }
            DecodeError::Syntax {
                line,
                column,
                message,
            } => {
                write!(
                    f,
                    "malformed JSON at line {line} column {column}: {message}"
                )
            }
            DecodeError::Shape {
                line: 0, message, ..
            } => {
                write!(f, "unexpected record shape: {message}")
            }
            DecodeError::Shape {
                line,
                column,
                message,
            } => {
                write!(
                    f,
                    "unexpected record shape at line {line} column {column}: {message}"
                )
            }
            DecodeError::Message(e) => write!(f, "invalid message: {e}"),
        }
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DecodeError::Message(e) => Some(e),
            _ => None,
        }
    }
}

impl DecodeError {
    /// Maps a `serde_json` error into the typed form.
    pub fn from_serde(err: &serde_json::Error) -> Self {
        let (line, column) = (err.line(), err.column());
        let full = err.to_string();
        let suffix = format!(" at line {line} column {column}");
        let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
        match err.classify() {
            serde_json::error::Category::Data => DecodeError::Shape {
                line,
                column,
                message,
            },
            _ if message.starts_with("recursion limit exceeded") => DecodeError::TooDeep {
                max: MAX_NESTING_DEPTH,
                at: 0,
            },
            _ => DecodeError::Syntax {
                line,
                column,
                message,
            },
        }
    }
}

/// Decodes one wire record from `bytes`, enforcing every bound in the module table.
///
/// # Errors
///
/// A [`DecodeError`] naming the first bound or rule the payload breaks. Never panics.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: MAX_RECORD_BYTES,
        });
    }
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    check_depth(text.as_bytes())?;
    serde_json::from_str(text).map_err(|e| DecodeError::from_serde(&e))
}

/// Linear scan for bracket depth, skipping string contents. It only bounds depth; syntax is
/// serde's job.
fn check_depth(bytes: &[u8]) -> Result<(), DecodeError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (at, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING_DEPTH {
                    return Err(DecodeError::TooDeep {
                        max: MAX_NESTING_DEPTH,
                        at,
                    });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

pub(crate) mod sealed {
    /// Seals [`super::WireRecord`]: only this crate's types, whose serialization cannot fail.
    pub trait Sealed {}
}

/// A type [`encode`] accepts: one of this crate's wire records (or a plain JSON value). Their
/// serialization cannot fail: every map key is a string and no field serializer returns an error.
pub trait WireRecord: Serialize + sealed::Sealed {}

impl sealed::Sealed for serde_json::Value {}
impl WireRecord for serde_json::Value {}
impl sealed::Sealed for serde_json::Map<String, serde_json::Value> {}
impl WireRecord for serde_json::Map<String, serde_json::Value> {}

/// Encodes a wire record as compact JSON, in the reference's key order.
pub fn encode<T: WireRecord + ?Sized>(value: &T) -> Bytes {
    match serde_json::to_vec(value) {
        Ok(v) => Bytes::from(v),
        // Unreachable for `WireRecord` types (see the trait). Should it ever happen, `null` is a
        // payload every decoder in this crate rejects, so a bug can never forge a valid record.
        Err(_) => Bytes::from_static(b"null"),
    }
}

/// The module's integer rule applied to one JSON number: `Some` for a non-negative integer literal
/// that fits `u64`, or an integral float in `0..=MAX_SAFE_INTEGER`; `None` otherwise.
pub fn uint_from_number(n: &serde_json::Number) -> Option<u64> {
    if let Some(u) = n.as_u64() {
        return Some(u);
    }
    if n.is_i64() {
        return None;
    }
    n.as_f64().and_then(uint_from_f64)
}

// The bound check comes first, so the cast to u64 is exact.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
fn uint_from_f64(f: f64) -> Option<u64> {
    if f.is_finite() && f.fract() == 0.0 && (0.0..=MAX_SAFE_INTEGER as f64).contains(&f) {
        Some(f as u64)
    } else {
        None
    }
}

struct UintVisitor;

impl Visitor<'_> for UintVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a non-negative integer")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        uint_from_f64(v).ok_or_else(|| {
            E::invalid_value(
                de::Unexpected::Float(v),
                &"a non-negative integer (a float must be integral and at most 2^53-1)",
            )
        })
    }
}

/// `deserialize_with` helper: a `u64` under the module's integer rule.
pub(crate) fn de_uint<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    d.deserialize_any(UintVisitor)
}

/// `deserialize_with` helper: an optional `u64` under the module's integer rule (`null` = absent).
pub(crate) fn de_opt_uint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct OptVisitor;
    impl<'de> Visitor<'de> for OptVisitor {
        type Value = Option<u64>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a non-negative integer or null")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            de_uint(d).map(Some)
        }
    }
    d.deserialize_option(OptVisitor)
}

/// `deserialize_with` helper: a [`crate::time::UnixMillis`] under the module's integer rule.
pub(crate) fn de_millis<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<crate::time::UnixMillis, D::Error> {
    de_uint(d).map(crate::time::UnixMillis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn bounds_are_checked_in_order() {
        assert_eq!(decode::<Value>(b""), Err(DecodeError::Empty));
        assert_eq!(
            decode::<Value>(b"\"\xff\""),
            Err(DecodeError::NotUtf8 { valid_up_to: 1 })
        );
        let big = vec![b' '; MAX_RECORD_BYTES + 1];
        assert_eq!(
            decode::<Value>(&big),
            Err(DecodeError::TooLarge {
                len: MAX_RECORD_BYTES + 1,
                max: MAX_RECORD_BYTES
            })
        );
        let deep = "[".repeat(100_000);
        assert_eq!(
            decode::<Value>(deep.as_bytes()),
            Err(DecodeError::TooDeep {
                max: MAX_NESTING_DEPTH,
                at: MAX_NESTING_DEPTH
            })
        );
        let ok = format!(
            "{}{}",
            "[".repeat(MAX_NESTING_DEPTH),
            "]".repeat(MAX_NESTING_DEPTH)
        );
        assert!(decode::<Value>(ok.as_bytes()).is_ok());
        // Brackets inside strings do not count.
        let quoted = format!("\"{}\\\"{}\"", "[".repeat(1000), "{".repeat(1000));
        assert!(decode::<Value>(quoted.as_bytes()).is_ok());
    }

    #[test]
    fn syntax_and_shape_errors_are_typed_with_positions() {
        match decode::<Value>(b"{\"a\":}") {
            Err(DecodeError::Syntax {
                line: 1,
                column: 6,
                message,
            }) => {
                assert!(message.starts_with("expected value"), "{message}");
                assert!(!message.contains("at line"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode::<Value>(b"{} x"),
            Err(DecodeError::Syntax { .. })
        ));
        match decode::<u64>(b"\"x\"") {
            Err(DecodeError::Shape { message, .. }) => assert!(message.contains("invalid type")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn integers_follow_the_js_rule() {
        let n = |v: Value| match v {
            Value::Number(n) => uint_from_number(&n),
            _ => None,
        };
        assert_eq!(n(json!(7)), Some(7));
        assert_eq!(n(json!(u64::MAX)), Some(u64::MAX));
        assert_eq!(n(json!(1.0)), Some(1));
        assert_eq!(n(json!(9_007_199_254_740_991.0)), Some(MAX_SAFE_INTEGER));
        assert_eq!(n(json!(9_007_199_254_740_992.0)), None);
        assert_eq!(n(json!(1.5)), None);
        assert_eq!(n(json!(-1)), None);
        assert_eq!(n(json!(-0.0)), Some(0));
        assert_eq!(n(json!(1e300)), None);
    }

    #[test]
    fn encode_is_compact() {
        assert_eq!(
            &encode(&json!({"b": [1, 2], "a": "x"}))[..],
            br#"{"a":"x","b":[1,2]}"#
        );
    }
}
