//! Raw JetStream API requests and the mapping of their errors onto [`Failure`].
//!
//! The core describes streams and consumers as exact API requests (`$JS.API.STREAM.CREATE.…` with a
//! JSON body, see `cotal_core::wire::config`), so the driver sends those bytes as they are instead
//! of re-expressing them through a client library's own config structs. This module is that send:
//! one request, one JSON answer, and a typed error.
//!
//! Error rules (nats-notes §5):
//!
//! - an answer with an `error` object is the server's word: `err_code` 10059 (stream not found),
//!   10014 (consumer not found), 10037 (no message found) and 10043 (sequence not found, a
//!   `STREAM.MSG.DELETE` of a sequence already gone) are [`Failure::NotFound`]; 10071
//!   (wrong last sequence) is [`Failure::WrongLastRevision`] with the revision the server named;
//!   every other code is [`Failure::Rejected`] with the code and the description;
//! - no responders (503) means no JetStream behind the subject;
//! - a timeout is a timeout: whether that means "not applied" or "unknown" depends on whether the
//!   request changes anything, which the caller decides ([`ApiError::into_failure`]).

use async_nats::{Client, Request, RequestErrorKind};
use bytes::Bytes;
use cotal_core::op::{Failure, Outcome};
use serde_json::Value;
use std::time::Duration;

/// JetStream `err_code`: stream not found.
pub const STREAM_NOT_FOUND: u32 = 10059;
/// JetStream `err_code`: consumer not found.
pub const CONSUMER_NOT_FOUND: u32 = 10014;
/// JetStream `err_code`: no message found.
pub const NO_MESSAGE_FOUND: u32 = 10037;
/// JetStream `err_code`: sequence not found (`STREAM.MSG.DELETE` of a deleted or evicted one).
pub const SEQUENCE_NOT_FOUND: u32 = 10043;
/// JetStream `err_code`: wrong last sequence (a compare-and-set conflict).
pub const WRONG_LAST_SEQUENCE: u32 = 10071;
/// JetStream `err_code`: stream name already in use with a different configuration.
pub const STREAM_NAME_IN_USE: u32 = 10058;
/// JetStream `err_code`: maximum consumers limit reached (the stream's `max_consumers`, or the
/// server's default cap when the stream set none).
pub const MAX_CONSUMERS_REACHED: u32 = 10026;

/// Why a JetStream API request failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// The server answered with an error object.
    #[error("{description} (err_code {err_code}, status {status})")]
    Api {
        /// HTTP-like status (`code`).
        status: u32,
        /// JetStream `err_code`.
        err_code: u32,
        /// The server's description.
        description: String,
    },
    /// Nobody answered the subject (JetStream not enabled for this account).
    #[error("no responders (is JetStream enabled?)")]
    NoResponders,
    /// No answer in time (also what a publish-permission violation looks like, nats-notes §4.1).
    #[error("timed out")]
    Timeout,
    /// The answer was not the JSON expected.
    #[error("unreadable answer: {0}")]
    Decode(String),
    /// The client could not send the request.
    #[error("{0}")]
    Client(String),
}

impl ApiError {
    /// The typed failure, for a request that changes nothing (`effectful == false`: a timeout is
    /// then [`Failure::Timeout`]) or that may have changed something (a timeout is unknown).
    pub fn into_failure<T>(self, effectful: bool) -> Outcome<T> {
        match self {
            ApiError::Api {
                err_code,
                description,
                ..
            } => Outcome::Failed(failure_for_code(err_code, description)),
            ApiError::NoResponders => Outcome::Failed(Failure::NoResponders),
            ApiError::Timeout if effectful => Outcome::Unknown,
            ApiError::Timeout => Outcome::Failed(Failure::Timeout),
            ApiError::Decode(d) => Outcome::Failed(Failure::Other { description: d }),
            ApiError::Client(d) if effectful => {
                tracing::debug!(error = %d, "client error on an effectful request: unknown");
                Outcome::Unknown
            }
            ApiError::Client(d) => Outcome::Failed(Failure::Other { description: d }),
        }
    }

    /// The JetStream `err_code`, if the server answered with one.
    pub fn err_code(&self) -> Option<u32> {
        match self {
            ApiError::Api { err_code, .. } => Some(*err_code),
            _ => None,
        }
    }
}

/// The failure kind of a JetStream error code.
pub fn failure_for_code(err_code: u32, description: String) -> Failure {
    match err_code {
        STREAM_NOT_FOUND | CONSUMER_NOT_FOUND | NO_MESSAGE_FOUND | SEQUENCE_NOT_FOUND => {
            Failure::NotFound
        }
        WRONG_LAST_SEQUENCE => Failure::WrongLastRevision {
            current: current_revision(&description),
        },
        code => Failure::Rejected {
            code: Some(code),
            description,
        },
    }
}

/// The revision named in `wrong last sequence: N`, if the text says one.
pub fn current_revision(text: &str) -> Option<u64> {
    // The client nests the server's words: `wrong last sequence: wrong last sequence: 2 (…)`.
    let (_, rest) = text.rsplit_once("wrong last sequence: ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Sends one JetStream API request and returns the JSON answer (an error object becomes
/// [`ApiError::Api`]).
pub async fn request(
    client: &Client,
    subject: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<Value, ApiError> {
    let req = Request::new().payload(body).timeout(Some(timeout));
    let msg = client
        .send_request(subject.to_owned(), req)
        .await
        .map_err(|e| match e.kind() {
            RequestErrorKind::TimedOut => ApiError::Timeout,
            RequestErrorKind::NoResponders => ApiError::NoResponders,
            _ => ApiError::Client(e.to_string()),
        })?;
    let value: Value =
        serde_json::from_slice(&msg.payload).map_err(|e| ApiError::Decode(e.to_string()))?;
    if let Some(err) = value.get("error") {
        let num = |k: &str| {
            err.get(k)
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0)
        };
        return Err(ApiError::Api {
            status: num("code"),
            err_code: num("err_code"),
            description: err
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("(no description)")
                .to_owned(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_last_sequence_names_the_current_revision() {
        assert_eq!(
            current_revision("wrong last sequence: 12 (code 400, error code 10071)"),
            Some(12)
        );
        assert_eq!(
            current_revision("wrong last sequence: wrong last sequence: 2 (code 400)"),
            Some(2)
        );
        assert_eq!(current_revision("something else"), None);
        assert_eq!(
            failure_for_code(WRONG_LAST_SEQUENCE, "wrong last sequence: 3".into()),
            Failure::WrongLastRevision { current: Some(3) }
        );
    }

    #[test]
    fn not_found_codes_and_the_rest() {
        for code in [
            STREAM_NOT_FOUND,
            CONSUMER_NOT_FOUND,
            NO_MESSAGE_FOUND,
            SEQUENCE_NOT_FOUND,
        ] {
            assert_eq!(failure_for_code(code, "x".into()), Failure::NotFound);
        }
        assert_eq!(
            failure_for_code(STREAM_NAME_IN_USE, "in use".into()),
            Failure::Rejected {
                code: Some(STREAM_NAME_IN_USE),
                description: "in use".into()
            }
        );
        assert_eq!(ApiError::Timeout.into_failure::<()>(true), Outcome::Unknown);
        assert_eq!(
            ApiError::Timeout.into_failure::<()>(false),
            Outcome::Failed(Failure::Timeout)
        );
    }
}
