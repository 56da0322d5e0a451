//! Control requests and replies, and the typed `ctl.delivery` operations (semantics §1.7, §2l).
//!
//! A control request is `{op, args, from}` on `cotal.<s>.ctl.<service>.<sender>`; the reply is
//! `{ok, data?, error?}`. For the delivery service this module turns a request into a
//! [`DeliveryRequest`], validating `args` in the reference's order and with its error texts
//! ([`DeliveryRequestError`]), and gives the success payloads typed forms.
//!
//! # Extensions (old peers ignore them)
//!
//! - `durableJoin` args may carry `joinCursor`: the agent's armed watermark (gap G1). A reference
//!   daemon ignores unknown args.
//! - The `durableJoin` reply may carry `joinCursor`: the cursor the daemon actually used, so an agent
//!   can tell whether its watermark was honoured. A reference daemon never sends it.
//!
//! # Numbers
//!
//! `generation` and `joinCursor` follow [`crate::wire::json`]'s integer rule (`1` and `1.0`
//! accepted; `1.5`, `-1`, `1e300` refused). The reference accepts any finite number as a leave
//! generation and lets the stale-leave guard refuse it later; this crate refuses a non-integer one at
//! validation, with its own message ([`DeliveryRequestError::GenerationNotInteger`]).

use crate::wire::json::{self, DecodeError, WireRecord, de_opt_uint, de_uint, sealed::Sealed};
use crate::wire::message::{Extra, Sender};
use crate::wire::token::{ChannelError, ConcreteChannel, is_concrete_channel, validate_channel};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// The `durableJoin` op.
pub const OP_DURABLE_JOIN: &str = "durableJoin";
/// The `durableLeave` op.
pub const OP_DURABLE_LEAVE: &str = "durableLeave";
/// The `listMemberships` op.
pub const OP_LIST_MEMBERSHIPS: &str = "listMemberships";

/// `durableJoin` `reason` when activation catch-up found part of the window evicted.
pub const REASON_PARTIALLY_EVICTED: &str =
    "activation catch-up window partially evicted by retention";
/// `durableJoin` `reason` when the channel's class resolves live: fan-out routes no membership
/// there, so none is created (G38; issue 15 item 5).
pub const REASON_LIVE_CLASS: &str =
    "channel is live-class: no durable backstop (nothing is stored for offline members)";
/// `durableJoin` `reason` when a concurrent leave or rejoin superseded the activation.
pub const REASON_SUPERSEDED: &str = "activation superseded by a concurrent leave or rejoin";

fn empty_object() -> Value {
    Value::Object(Extra::new())
}

/// A control request (`TYP:ControlRequest`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRequest {
    /// The operation name.
    pub op: String,
    /// The operation's arguments (`{}` when absent, as the reference's `req.args ?? {}`).
    #[serde(default = "empty_object")]
    pub args: Value,
    /// The requester; `from.id` must equal the subject's sender token.
    pub from: Sender,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A control reply (`TYP:ControlReply`).
///
/// `T` is the type of `data`: a [`Value`] when decoding a reply whose op is not yet known, or one
/// of the typed payloads ([`DurableJoinReply`] …) when encoding, so `data` keeps the reference's
/// key order (a [`Value`] object is written in sorted key order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub struct ControlReply<T = Value> {
    /// Success flag.
    pub ok: bool,
    /// The success payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    /// The failure message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

impl<T> ControlReply<T> {
    /// `{ok:true, data}`.
    pub fn success(data: T) -> Self {
        ControlReply {
            ok: true,
            data: Some(data),
            error: None,
            extra: Extra::new(),
        }
    }

    /// `{ok:false, error}`.
    pub fn failure(error: impl fmt::Display) -> Self {
        ControlReply {
            ok: false,
            data: None,
            error: Some(error.to_string()),
            extra: Extra::new(),
        }
    }
}

impl ControlReply<Value> {
    /// Decodes `data` as `T`; `Ok(None)` when the reply has no `data`.
    ///
    /// # Errors
    ///
    /// [`DecodeError::Shape`] when `data` is not a `T`.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<Option<T>, DecodeError> {
        match &self.data {
            None | Some(Value::Null) => Ok(None),
            Some(v) => T::deserialize(v)
                .map(Some)
                .map_err(|e| DecodeError::from_serde(&e)),
        }
    }
}

/// A typed `ctl.delivery` request.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryRequest {
    /// `durableJoin {channel, joinCursor?}`.
    DurableJoin {
        /// The concrete channel to join.
        channel: ConcreteChannel,
        /// The agent's armed watermark (our extension, gap G1); `None` from reference agents.
        join_cursor: Option<u64>,
    },
    /// `durableLeave {channel, generation}`.
    DurableLeave {
        /// The concrete channel to leave.
        channel: ConcreteChannel,
        /// The generation the leave belongs to (the stale-leave guard).
        generation: u64,
    },
    /// `listMemberships {}`.
    ListMemberships,
}

/// Why a `ctl.delivery` request was refused before any registry read. `Display` gives the
/// reference's error text, which is what goes into the `{ok:false, error}` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryRequestError {
    /// `args.channel` is not a string, or is blank after trimming.
    ChannelRequired {
        /// The op.
        op: &'static str,
    },
    /// The trimmed channel fails `assertValidChannel`.
    InvalidChannel {
        /// The op.
        op: &'static str,
        /// What the validator found.
        error: ChannelError,
    },
    /// The channel holds a `*` or `>` segment.
    NotConcrete {
        /// The op.
        op: &'static str,
        /// The trimmed channel.
        channel: String,
    },
    /// `durableLeave` without a numeric `generation`.
    GenerationRequired,
    /// `durableLeave` with a number that is not a non-negative integer (this crate's rule).
    GenerationNotInteger {
        /// The number as received.
        value: String,
    },
    /// `durableJoin` with a `joinCursor` that is not a non-negative integer (our extension).
    InvalidJoinCursor {
        /// The value as received.
        value: String,
    },
    /// An op the delivery service does not serve.
    UnsupportedOp {
        /// The op as received.
        op: String,
    },
}

impl fmt::Display for DeliveryRequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryRequestError::ChannelRequired { op } => {
                write!(f, "{op}: channel must be a non-blank string")
            }
            DeliveryRequestError::InvalidChannel { error, .. } => write!(f, "{error}"),
            DeliveryRequestError::NotConcrete { op, channel } => write!(
                f,
                "{op}: \"{channel}\" must be a concrete channel (durable membership is per-concrete-channel, not wildcard)"
            ),
            DeliveryRequestError::GenerationRequired => write!(
                f,
                "durableLeave: a finite generation is required (fail-closed stale-leave guard)"
            ),
            DeliveryRequestError::GenerationNotInteger { value } => write!(
                f,
                "durableLeave: generation {value} is not a non-negative integer (fail-closed stale-leave guard)"
            ),
            DeliveryRequestError::InvalidJoinCursor { value } => {
                write!(
                    f,
                    "durableJoin: joinCursor {value} is not a non-negative integer"
                )
            }
            DeliveryRequestError::UnsupportedOp { op } => {
                write!(
                    f,
                    "op \"{op}\" not supported on the delivery control service"
                )
            }
        }
    }
}

impl std::error::Error for DeliveryRequestError {}

/// `checkDurableChannelArg`: a string, non-blank after trimming, valid, concrete.
fn channel_arg(args: &Value, op: &'static str) -> Result<ConcreteChannel, DeliveryRequestError> {
    let trimmed = match args.get("channel") {
        Some(Value::String(s)) => s.trim(),
        _ => "",
    };
    if trimmed.is_empty() {
        return Err(DeliveryRequestError::ChannelRequired { op });
    }
    validate_channel(trimmed)
        .map_err(|error| DeliveryRequestError::InvalidChannel { op, error })?;
    if !is_concrete_channel(trimmed) {
        return Err(DeliveryRequestError::NotConcrete {
            op,
            channel: trimmed.to_owned(),
        });
    }
    ConcreteChannel::new(trimmed)
        .map_err(|error| DeliveryRequestError::InvalidChannel { op, error })
}

impl DeliveryRequest {
    /// The op name.
    pub fn op(&self) -> &'static str {
        match self {
            DeliveryRequest::DurableJoin { .. } => OP_DURABLE_JOIN,
            DeliveryRequest::DurableLeave { .. } => OP_DURABLE_LEAVE,
            DeliveryRequest::ListMemberships => OP_LIST_MEMBERSHIPS,
        }
    }

    /// The `args` object, in the reference's key order (`joinCursor` only when set).
    pub fn args(&self) -> Value {
        let mut args = Extra::new();
        match self {
            DeliveryRequest::DurableJoin {
                channel,
                join_cursor,
            } => {
                args.insert("channel".into(), Value::String(channel.as_str().to_owned()));
                if let Some(j) = join_cursor {
                    args.insert("joinCursor".into(), Value::from(*j));
                }
            }
            DeliveryRequest::DurableLeave {
                channel,
                generation,
            } => {
                args.insert("channel".into(), Value::String(channel.as_str().to_owned()));
                args.insert("generation".into(), Value::from(*generation));
            }
            DeliveryRequest::ListMemberships => {}
        }
        Value::Object(args)
    }

    /// The request to send from `from`.
    pub fn to_request(&self, from: Sender) -> ControlRequest {
        ControlRequest {
            op: self.op().to_owned(),
            args: self.args(),
            from,
            extra: Extra::new(),
        }
    }

    /// Validates a decoded request the way `handleDeliveryControl` does: dispatch on `op`, then
    /// check the channel argument, then the op's own arguments. A non-object `args` reads as `{}`.
    ///
    /// # Errors
    ///
    /// The first [`DeliveryRequestError`], in the reference's order.
    pub fn from_request(req: &ControlRequest) -> Result<Self, DeliveryRequestError> {
        let args = &req.args;
        match req.op.as_str() {
            OP_DURABLE_JOIN => {
                let channel = channel_arg(args, OP_DURABLE_JOIN)?;
                let join_cursor = match args.get("joinCursor") {
                    None | Some(Value::Null) => None,
                    Some(Value::Number(n)) => Some(json::uint_from_number(n).ok_or_else(|| {
                        DeliveryRequestError::InvalidJoinCursor {
                            value: n.to_string(),
                        }
                    })?),
                    Some(other) => {
                        return Err(DeliveryRequestError::InvalidJoinCursor {
                            value: other.to_string(),
                        });
                    }
                };
                Ok(DeliveryRequest::DurableJoin {
                    channel,
                    join_cursor,
                })
            }
            OP_DURABLE_LEAVE => {
                let channel = channel_arg(args, OP_DURABLE_LEAVE)?;
                let generation = match args.get("generation") {
                    Some(Value::Number(n)) => json::uint_from_number(n).ok_or_else(|| {
                        DeliveryRequestError::GenerationNotInteger {
                            value: n.to_string(),
                        }
                    })?,
                    _ => return Err(DeliveryRequestError::GenerationRequired),
                };
                Ok(DeliveryRequest::DurableLeave {
                    channel,
                    generation,
                })
            }
            OP_LIST_MEMBERSHIPS => Ok(DeliveryRequest::ListMemberships),
            other => Err(DeliveryRequestError::UnsupportedOp {
                op: other.to_owned(),
            }),
        }
    }
}

/// Daemon-side refusals after validation, with the reference's error texts (semantics §1.7).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeliveryRefusal {
    /// `from.id` does not match the subject's sender token.
    SenderMismatch,
    /// The caller has no ACL record (absent).
    NoReadAcl {
        /// The caller id.
        caller: String,
    },
    /// The channel is outside the caller's read ACL.
    NotWithinReadAcl {
        /// The channel.
        channel: String,
        /// The caller's `allowSubscribe`.
        allow_subscribe: Vec<String>,
    },
    /// `StaleMembershipWrite`. The reference text always says `<`, even when the attempted
    /// generation is larger (G35); kept for compatibility.
    StaleMembershipWrite {
        /// The channel.
        channel: String,
        /// The owner.
        owner: String,
        /// The generation the write carried.
        attempted: u64,
        /// The stored generation.
        current: u64,
    },
    /// The members CAS gave up.
    CasExhausted {
        /// The KV key.
        key: String,
    },
}

impl fmt::Display for DeliveryRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliveryRefusal::SenderMismatch => write!(f, "sender mismatch — request rejected"),
            DeliveryRefusal::NoReadAcl { caller } => write!(
                f,
                "durableJoin: no read ACL on record for {caller} (not provisioned for durable delivery)"
            ),
            DeliveryRefusal::NotWithinReadAcl {
                channel,
                allow_subscribe,
            } => write!(
                f,
                "channel \"{channel}\" is not within your read ACL [{}]",
                allow_subscribe.join(", ")
            ),
            DeliveryRefusal::StaleMembershipWrite {
                channel,
                owner,
                attempted,
                current,
            } => write!(
                f,
                "stale membership write for {channel}/{owner}: generation {attempted} < current {current}"
            ),
            DeliveryRefusal::CasExhausted { key } => {
                write!(f, "members CAS exhausted retries for {key}")
            }
        }
    }
}

impl std::error::Error for DeliveryRefusal {}

/// `durableJoin` success data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableJoinReply {
    /// True once the membership is activated.
    pub durable: bool,
    /// Why it is not durable (see [`REASON_PARTIALLY_EVICTED`], [`REASON_SUPERSEDED`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The membership generation.
    #[serde(
        default,
        deserialize_with = "de_opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub generation: Option<u64>,
    /// The join cursor the daemon used (our extension; absent from reference daemons).
    #[serde(
        rename = "joinCursor",
        default,
        deserialize_with = "de_opt_uint",
        skip_serializing_if = "Option::is_none"
    )]
    pub join_cursor: Option<u64>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `durableLeave` success data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableLeaveReply {
    /// The (trimmed) channel.
    pub channel: ConcreteChannel,
    /// True when there was no record to tombstone. Written only when true, as the reference does.
    #[serde(
        rename = "alreadyLeft",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub already_left: bool,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One entry of `listMemberships`: a non-tombstoned membership of the caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipSummary {
    /// The channel.
    pub channel: ConcreteChannel,
    /// Its generation.
    #[serde(deserialize_with = "de_uint")]
    pub generation: u64,
    /// Whether activation completed.
    pub activated: bool,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `listMemberships` success data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListMembershipsReply {
    /// The caller's open memberships.
    pub memberships: Vec<MembershipSummary>,
    /// Unknown fields, preserved.
    #[serde(flatten)]
    pub extra: Extra,
}

impl Sealed for ControlRequest {}
impl WireRecord for ControlRequest {}
impl<T: WireRecord> Sealed for ControlReply<T> {}
impl<T: WireRecord> WireRecord for ControlReply<T> {}
impl Sealed for DurableJoinReply {}
impl WireRecord for DurableJoinReply {}
impl Sealed for DurableLeaveReply {}
impl WireRecord for DurableLeaveReply {}
impl Sealed for MembershipSummary {}
impl WireRecord for MembershipSummary {}
impl Sealed for ListMembershipsReply {}
impl WireRecord for ListMembershipsReply {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::token::AgentId;
    use serde_json::json;

    fn req(op: &str, args: Value) -> ControlRequest {
        DeliveryRequest::ListMemberships
            .to_request(Sender::new(AgentId::new("U1").unwrap(), "a"))
            .with_op(op, args)
    }

    impl ControlRequest {
        fn with_op(mut self, op: &str, args: Value) -> Self {
            self.op = op.into();
            self.args = args;
            self
        }
    }

    fn check(op: &str, args: Value) -> Result<DeliveryRequest, String> {
        DeliveryRequest::from_request(&req(op, args)).map_err(|e| e.to_string())
    }

    #[test]
    fn validation_order_and_messages_follow_the_reference() {
        assert_eq!(
            check("durableJoin", json!({})),
            Err("durableJoin: channel must be a non-blank string".into())
        );
        assert_eq!(
            check("durableLeave", json!({"channel": "  "})),
            Err("durableLeave: channel must be a non-blank string".into())
        );
        assert_eq!(
            check("durableJoin", json!({"channel": 5})),
            Err("durableJoin: channel must be a non-blank string".into())
        );
        assert_eq!(
            check("durableJoin", json!("x")),
            Err("durableJoin: channel must be a non-blank string".into())
        );
        assert!(
            check("durableJoin", json!({"channel": "a..b"}))
                .unwrap_err()
                .starts_with("invalid channel")
        );
        assert_eq!(
            check("durableJoin", json!({"channel": "general.>"})),
            Err("durableJoin: \"general.>\" must be a concrete channel (durable membership is per-concrete-channel, not wildcard)".into())
        );
        // The channel check runs before the generation check.
        assert_eq!(
            check("durableLeave", json!({"channel": "*", "generation": "x"})).unwrap_err(),
            "durableLeave: \"*\" must be a concrete channel (durable membership is per-concrete-channel, not wildcard)"
        );
        for bad in [
            json!({"channel": "g"}),
            json!({"channel": "g", "generation": null}),
            json!({"channel": "g", "generation": "1"}),
        ] {
            assert_eq!(
                check("durableLeave", bad),
                Err(
                    "durableLeave: a finite generation is required (fail-closed stale-leave guard)"
                        .into()
                )
            );
        }
        assert!(matches!(
            DeliveryRequest::from_request(&req(
                "durableLeave",
                json!({"channel": "g", "generation": 1.5})
            )),
            Err(DeliveryRequestError::GenerationNotInteger { .. })
        ));
        assert_eq!(
            check("nope", json!({})),
            Err("op \"nope\" not supported on the delivery control service".into())
        );
    }

    #[test]
    fn accepted_forms() {
        let g = ConcreteChannel::new("team.backend").unwrap();
        assert_eq!(
            check("durableJoin", json!({"channel": " team.backend "})),
            Ok(DeliveryRequest::DurableJoin {
                channel: g.clone(),
                join_cursor: None
            })
        );
        assert_eq!(
            check(
                "durableJoin",
                json!({"channel": "team.backend", "joinCursor": 41})
            ),
            Ok(DeliveryRequest::DurableJoin {
                channel: g.clone(),
                join_cursor: Some(41)
            })
        );
        assert!(check("durableJoin", json!({"channel": "g", "joinCursor": -1})).is_err());
        assert_eq!(
            check(
                "durableLeave",
                json!({"channel": "team.backend", "generation": 2.0})
            ),
            Ok(DeliveryRequest::DurableLeave {
                channel: g,
                generation: 2
            })
        );
        assert_eq!(
            check("listMemberships", json!(null)),
            Ok(DeliveryRequest::ListMemberships)
        );
    }

    #[test]
    fn replies_encode_in_reference_order() {
        let r = DurableJoinReply {
            durable: false,
            reason: Some(REASON_SUPERSEDED.into()),
            generation: Some(3),
            join_cursor: None,
            extra: Extra::new(),
        };
        assert_eq!(
            std::str::from_utf8(&json::encode(&ControlReply::success(r.clone()))).unwrap(),
            r#"{"ok":true,"data":{"durable":false,"reason":"activation superseded by a concurrent leave or rejoin","generation":3}}"#
        );
        let raw: ControlReply =
            json::decode(&json::encode(&ControlReply::success(r.clone()))).unwrap();
        let back: DurableJoinReply = raw.data_as().unwrap().unwrap();
        assert_eq!(back, r);
        assert_eq!(
            std::str::from_utf8(&json::encode(&ControlReply::<Value>::failure(
                DeliveryRefusal::SenderMismatch
            )))
            .unwrap(),
            r#"{"ok":false,"error":"sender mismatch — request rejected"}"#
        );
    }
}
