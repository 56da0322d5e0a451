//! `Nats-Msg-Id` values (semantics §1.8): the JetStream dedup key of every protocol write.
//!
//! | write | Msg-Id |
//! | --- | --- |
//! | chat / DM / anycast publish | the message id ([`publish_msg_id`]) |
//! | dinbox entry (fan-out and catch-up) | `<msg.id>:<owner>:<generation>` ([`Plane3MsgId`]) |
//! | DLV transfer | the same string as the dinbox entry |
//!
//! `generation` is 0 for a `live-mention` entry. Because fan-out, catch-up and the reader all build
//! the same string for one logical copy, the broker collapses duplicates within the 2 h dedup window.

use crate::wire::message::CotalMessage;
use crate::wire::records::Plane3Entry;
use crate::wire::token::{AgentId, TokenError};
use std::fmt;

/// The JetStream header carrying the dedup id.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// The Msg-Id of a chat, DM or anycast publish: the message id itself.
pub fn publish_msg_id(msg: &CotalMessage) -> &str {
    &msg.id
}

/// The Msg-Id of one backstop copy: `<msg.id>:<owner>:<generation>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Plane3MsgId {
    /// The copied message's id.
    pub message_id: String,
    /// The member the copy is for.
    pub owner: AgentId,
    /// The entry's generation (0 for a live mention).
    pub generation: u64,
}

impl Plane3MsgId {
    /// The id for `entry`, stored in `owner`'s dinbox (and later DLV).
    pub fn for_entry(entry: &Plane3Entry, owner: &AgentId) -> Self {
        Plane3MsgId {
            message_id: entry.msg.id.clone(),
            owner: owner.clone(),
            generation: entry.generation,
        }
    }

    /// Parses `<msg.id>:<owner>:<generation>`.
    ///
    /// The owner and generation are taken from the right, so a message id that itself contains
    /// `:` still parses. The generation must be canonical decimal (`0`, or no leading zero), as
    /// JavaScript prints it.
    ///
    /// # Errors
    ///
    /// A [`MsgIdError`] naming the malformed part.
    pub fn parse(s: &str) -> Result<Self, MsgIdError> {
        let mut it = s.rsplitn(3, ':');
        let (Some(generation), Some(owner), Some(message_id)) = (it.next(), it.next(), it.next())
        else {
            return Err(MsgIdError::MissingSeparator);
        };
        if message_id.is_empty() {
            return Err(MsgIdError::EmptyMessageId);
        }
        let owner = AgentId::new(owner).map_err(MsgIdError::Owner)?;
        let canonical = !generation.is_empty()
            && generation.bytes().all(|b| b.is_ascii_digit())
            && (generation == "0" || !generation.starts_with('0'));
        let generation = canonical
            .then(|| generation.parse::<u64>().ok())
            .flatten()
            .ok_or_else(|| MsgIdError::Generation {
                found: generation.to_owned(),
            })?;
        Ok(Plane3MsgId {
            message_id: message_id.to_owned(),
            owner,
            generation,
        })
    }
}

impl fmt::Display for Plane3MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.message_id, self.owner, self.generation)
    }
}

impl std::str::FromStr for Plane3MsgId {
    type Err = MsgIdError;
    fn from_str(s: &str) -> Result<Self, MsgIdError> {
        Plane3MsgId::parse(s)
    }
}

/// Why a string is not a `<msg.id>:<owner>:<generation>` Msg-Id.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MsgIdError {
    /// Fewer than two `:` separators.
    MissingSeparator,
    /// Nothing before the owner.
    EmptyMessageId,
    /// The owner is not a valid agent id.
    Owner(TokenError),
    /// The generation is not canonical decimal `u64`.
    Generation {
        /// The text found.
        found: String,
    },
}

impl fmt::Display for MsgIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MsgIdError::MissingSeparator => {
                write!(f, "msg-id is not <msg.id>:<owner>:<generation>")
            }
            MsgIdError::EmptyMessageId => write!(f, "msg-id has an empty message id"),
            MsgIdError::Owner(e) => write!(f, "msg-id owner: {e}"),
            MsgIdError::Generation { found } => {
                write!(
                    f,
                    "msg-id generation {found:?} is not a canonical decimal integer"
                )
            }
        }
    }
}

impl std::error::Error for MsgIdError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MsgIdError::Owner(e) => Some(e),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format_round_trip() {
        let s = "1ba3fe6d-eb3f-4e34-bd33-af334be21a94:UDHQN2VXGF5T7O3GSPVKMV6VFFHD3XQTWFY3M5P7ELIK4ICOADTOEJ5S:1";
        let id = Plane3MsgId::parse(s).unwrap();
        assert_eq!(id.generation, 1);
        assert_eq!(id.to_string(), s);
        let colon = Plane3MsgId::parse("a:b:U1:0").unwrap();
        assert_eq!(
            (
                colon.message_id.as_str(),
                colon.owner.as_str(),
                colon.generation
            ),
            ("a:b", "U1", 0)
        );
    }

    #[test]
    fn malformed_ids_are_typed_errors() {
        assert_eq!(Plane3MsgId::parse("abc"), Err(MsgIdError::MissingSeparator));
        assert_eq!(
            Plane3MsgId::parse("a:U1"),
            Err(MsgIdError::MissingSeparator)
        );
        assert_eq!(Plane3MsgId::parse(":U1:1"), Err(MsgIdError::EmptyMessageId));
        assert!(matches!(
            Plane3MsgId::parse("m::1"),
            Err(MsgIdError::Owner(_))
        ));
        for g in ["", "01", "-1", "+1", "1.0", "18446744073709551616"] {
            assert!(
                matches!(
                    Plane3MsgId::parse(&format!("m:U1:{g}")),
                    Err(MsgIdError::Generation { .. })
                ),
                "{g}"
            );
        }
    }
}
