//! The request gate of the `ctl.delivery` control service (semantics §2(l); invariants I25, I26,
//! I27; gaps G22, G38).
//!
//! One incoming message on `cotal.<s>.ctl.delivery.<sender>` becomes, before any registry read,
//! one of three [`Admission`]s:
//!
//! - [`Admission::Admitted`]: the authenticated requester, the typed [`DeliveryRequest`] and the
//!   exact reply subject to answer on;
//! - [`Admission::Refused`]: an `{ok:false, error}` reply, already encoded, and where to send it;
//! - [`Admission::Ignored`]: **send nothing** and report the [`Unanswerable`] reason as an event.
//!
//! [`admit`] checks, in the reference's order:
//!
//! 1. **Bound reply** ([`Subject::accept_reply`]): the reply must be exactly
//!    `<request subject>.reply.<one token>`. Otherwise nothing is sent at all (D1, I27). This runs
//!    first so that no later step can ever publish to a subject the requester did not own.
//! 2. **Size**: a payload over [`MAX_REQUEST_BYTES`] gets an error reply.
//! 3. **JSON**: a payload that is not JSON gets `{ok:false, error:<parse message>}`.
//! 4. **Sender authenticity**: `from.id` must equal the subject's sender token, otherwise
//!    "sender mismatch — request rejected" (D2).
//! 5. **Typed validation** ([`DeliveryRequest::from_request`]): unknown op, blank, invalid or
//!    wildcard channel (I26), leave without a finite generation, with the reference's texts.
//!
//! An admitted request is then split by [`Admitted::into_work`]. Only the join carries a gate
//! ([`PendingJoin::gate`], [`gate_join`]) and it is the only place a read ACL enters; the leave
//! and list paths have no ACL parameter anywhere, so a leave can never be ACL-gated (I25).
//!
//! # Decisions
//!
//! - **G22, per-key serialisation.** [`serial_key`] gives the key a daemon serialises on: joins
//!   and leaves by `(owner, channel)`, `listMemberships` by owner. Requests with different keys may
//!   run concurrently, so one long activation catch-up no longer blocks every other agent's leave.
//!   A list is a read-only snapshot of the owner's records: running it beside a join of the same
//!   owner is equivalent to the list having arrived just before or just after that join.
//! - **G38, durable join on a live-class channel: answered `durable:false`, nothing written.**
//!   After the ACL gate, the daemon resolves the channel's class with the one resolver fan-out
//!   routes by ([`crate::policy::ChannelRegistry::policy_for`] over its watched registry). A
//!   live-class channel gets `{ok:true, data:{durable:false, reason}}` ([`live_class_join_reply`])
//!   and no record: a membership there would route nothing, and `durable:true` would claim a
//!   backstop fan-out never gives (issue 15 item 5). Not a refusal: a reference agent, whose empty
//!   class cache makes it ask on every channel, treats `ok:false` as a failed backstop but
//!   `durable:false` as "live only, reason" and keeps its live subscription either way, so the
//!   answer it reports is the true one. If the channel later becomes durable, the agent must join
//!   durably again (ours does: its reconcile follows the resolver); a record created before this
//!   rule is left alone and still leaves normally.
//! - **Stricter than the reference, deliberately.** A reply with more than one token after
//!   `.reply.` is not answered (the reference answers any `startsWith`); a request subject that
//!   does not parse as a `ctl.delivery.<id>` subject of this space is not answered (the reference
//!   would send "sender mismatch" to `<that subject>.reply.…`); a leave generation that is a
//!   finite non-integer is refused at validation ([`DeliveryRequestError::GenerationNotInteger`]);
//!   and an ACL entry that is not a valid channel pattern covers nothing.

use crate::acl::ReadAcl;
use crate::wire::control::{
    ControlReply, ControlRequest, DeliveryRefusal, DeliveryRequest, DeliveryRequestError,
    DurableJoinReply, DurableLeaveReply, ListMembershipsReply, MembershipSummary,
    REASON_LIVE_CLASS,
};
use crate::wire::json::{self, DecodeError, MAX_RECORD_BYTES};
use crate::wire::message::{Extra, Sender};
use crate::wire::records::AclRecord;
use crate::wire::subject::{ControlService, ReplyId, Subject};
use crate::wire::token::{AgentId, Channel, ConcreteChannel, Space};
use bytes::Bytes;
use serde_json::Value;
use std::fmt;

/// Largest request payload the gate decodes, in bytes (the NATS default `max_payload`, as for every
/// wire record). A larger one gets an error reply.
pub const MAX_REQUEST_BYTES: usize = MAX_RECORD_BYTES;

/// The outcome of [`admit`] for one `ctl.delivery` message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Admission {
    /// Valid, authenticated request: run it and answer on [`Admitted::reply_to`].
    Admitted(Admitted),
    /// Answer with [`Refused::reply`] on [`Refused::reply_to`] and run nothing.
    Refused(Refused),
    /// Send nothing at all; report the reason as an error event.
    Ignored(Unanswerable),
}

impl Admission {
    /// The subject a reply goes to, if one is sent at all.
    pub fn reply_to(&self) -> Option<&str> {
        match self {
            Admission::Admitted(a) => Some(&a.reply_to),
            Admission::Refused(r) => Some(&r.reply_to),
            Admission::Ignored(_) => None,
        }
    }
}

/// A request that passed every check of [`admit`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// The subject-authenticated requester (`from.id`, equal to the subject's sender token).
    pub requester: AgentId,
    /// The typed request.
    pub request: DeliveryRequest,
    /// The exact reply subject to answer on: `<request subject>.reply.<reply_id>`.
    pub reply_to: String,
    /// The reply token the requester chose.
    pub reply_id: ReplyId,
}

impl Admitted {
    /// The G22 serialisation key of this request ([`serial_key`]).
    pub fn serial_key(&self) -> SerialKey {
        serial_key(&self.requester, &self.request)
    }

    /// Splits the request into the work to do. Only a join carries an ACL gate.
    pub fn into_work(self) -> Work {
        let Admitted {
            requester,
            request,
            reply_to,
            ..
        } = self;
        match request {
            DeliveryRequest::DurableJoin {
                channel,
                join_cursor,
            } => Work::Join(PendingJoin {
                owner: requester,
                channel,
                join_cursor,
                reply_to,
            }),
            DeliveryRequest::DurableLeave {
                channel,
                generation,
            } => Work::Leave(LeaveWork {
                owner: requester,
                channel,
                generation,
                reply_to,
            }),
            DeliveryRequest::ListMemberships => Work::List(ListWork {
                owner: requester,
                reply_to,
            }),
        }
    }
}

/// What an admitted request asks the daemon to do.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Work {
    /// A join, which must pass [`PendingJoin::gate`] first.
    Join(PendingJoin),
    /// A leave: never ACL-gated (I25), so there is nothing to check before the registry.
    Leave(LeaveWork),
    /// A listing of the requester's memberships.
    List(ListWork),
}

/// A `durableJoin` waiting for the requester's read ACL, read fresh from the ACL KV.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingJoin {
    /// The requester, who becomes the member.
    pub owner: AgentId,
    /// The concrete channel.
    pub channel: ConcreteChannel,
    /// The agent's armed watermark (our extension, G1), if sent.
    pub join_cursor: Option<u64>,
    /// Where to answer.
    pub reply_to: String,
}

impl PendingJoin {
    /// Applies [`gate_join`] with the owner's current ACL record (`None` when absent, as
    /// [`AclRecord::from_kv`] reads it).
    ///
    /// # Errors
    ///
    /// The `{ok:false}` reply to send on `reply_to`.
    pub fn gate(self, acl: Option<&AclRecord>) -> Result<ApprovedJoin, ControlReply> {
        gate_join(&self.owner, &self.channel, acl)?;
        Ok(ApprovedJoin {
            owner: self.owner,
            channel: self.channel,
            join_cursor: self.join_cursor,
            reply_to: self.reply_to,
        })
    }
}

/// A join that passed the ACL gate: the registry may now create the membership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovedJoin {
    /// The member.
    pub owner: AgentId,
    /// The concrete channel, covered by the owner's read ACL.
    pub channel: ConcreteChannel,
    /// The agent's armed watermark (our extension, G1), if sent.
    pub join_cursor: Option<u64>,
    /// Where to answer.
    pub reply_to: String,
}

/// A `durableLeave` to run against the registry. It has no ACL: leave must work after an ACL was
/// narrowed or revoked (I25).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaveWork {
    /// The member leaving.
    pub owner: AgentId,
    /// The concrete channel.
    pub channel: ConcreteChannel,
    /// The generation the leave belongs to (the stale-leave guard).
    pub generation: u64,
    /// Where to answer.
    pub reply_to: String,
}

/// A `listMemberships` to run against the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListWork {
    /// Whose memberships to list.
    pub owner: AgentId,
    /// Where to answer.
    pub reply_to: String,
}

/// A request refused with an error reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The sender token of the request subject (authenticated by the broker's publish grant, not
    /// necessarily the payload's `from.id`).
    pub subject_sender: AgentId,
    /// The bound reply subject to send [`Refused::reply`] to.
    pub reply_to: String,
    /// Why.
    pub reason: RefusalReason,
    /// The encoded `{ok:false, error}` reply.
    pub reply: Bytes,
}

/// Why [`admit`] refused a request with an error reply. `Display` gives the reply's `error` text.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalReason {
    /// The payload is larger than [`MAX_REQUEST_BYTES`].
    TooLarge {
        /// The payload length, in bytes.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The payload is not a JSON value.
    Malformed(DecodeError),
    /// `from.id` is missing or differs from the subject's sender (also an error event).
    SenderMismatch {
        /// The `from.id` claimed, when it was a string.
        claimed: Option<String>,
    },
    /// The op or its arguments are invalid.
    Invalid(DeliveryRequestError),
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefusalReason::TooLarge { len, max } => DecodeError::TooLarge {
                len: *len,
                max: *max,
            }
            .fmt(f),
            RefusalReason::Malformed(e) => e.fmt(f),
            RefusalReason::SenderMismatch { .. } => DeliveryRefusal::SenderMismatch.fmt(f),
            RefusalReason::Invalid(e) => e.fmt(f),
        }
    }
}

/// Why a message gets no reply at all. `Display` gives the error event text.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unanswerable {
    /// The subject is not a `cotal.<space>.ctl.delivery.<id>` request of this daemon's space.
    NotDeliveryRequest {
        /// The subject as received.
        subject: String,
    },
    /// The message has no reply subject.
    NoReply {
        /// The request subject.
        subject: String,
    },
    /// The reply subject is not `<subject>.reply.<one token>` (the confused-deputy guard, D1).
    UnboundReply {
        /// The request subject.
        subject: String,
        /// The reply subject the requester embedded.
        reply: String,
    },
}

impl fmt::Display for Unanswerable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unanswerable::NotDeliveryRequest { subject } => write!(
                f,
                "rejected delivery request on {subject}: not a delivery control subject of this space"
            ),
            Unanswerable::NoReply { subject } => write!(
                f,
                "rejected delivery request on {subject}: reply target (none) is not under the sender's own reply subtree"
            ),
            Unanswerable::UnboundReply { subject, reply } => write!(
                f,
                "rejected delivery request on {subject}: reply target {reply} is not under the sender's own reply subtree"
            ),
        }
    }
}

/// The request gate: one `ctl.delivery` message to an [`Admission`], in the reference's order
/// (see the module docs). `space` is the daemon's space. Total: never panics, whatever the input.
///
/// An [`Admission::Admitted`] or [`Admission::Refused`] reply subject always starts with
/// `<subject>.reply.` (I27).
pub fn admit(space: &Space, subject: &str, reply: Option<&str>, payload: &[u8]) -> Admission {
    // 1. The bound-reply guard, before anything is decoded.
    let parsed = match Subject::parse(subject) {
        Ok(
            s @ Subject::Control {
                service: ControlService::Delivery,
                ..
            },
        ) if s.space() == space => s,
        _ => {
            return Admission::Ignored(Unanswerable::NotDeliveryRequest {
                subject: subject.to_owned(),
            });
        }
    };
    let Some(reply) = reply else {
        return Admission::Ignored(Unanswerable::NoReply {
            subject: subject.to_owned(),
        });
    };
    let (Some(reply_id), Some(sender)) = (parsed.accept_reply(reply), parsed.sender()) else {
        return Admission::Ignored(Unanswerable::UnboundReply {
            subject: subject.to_owned(),
            reply: reply.to_owned(),
        });
    };
    let refuse = |reason: RefusalReason| {
        Admission::Refused(Refused {
            subject_sender: sender.clone(),
            reply_to: reply.to_owned(),
            reply: failure_reply(&reason),
            reason,
        })
    };
    // 2. Size.
    if payload.len() > MAX_REQUEST_BYTES {
        return refuse(RefusalReason::TooLarge {
            len: payload.len(),
            max: MAX_REQUEST_BYTES,
        });
    }
    // 3. JSON.
    let value: Value = match json::decode(payload) {
        Ok(v) => v,
        Err(e) => return refuse(RefusalReason::Malformed(e)),
    };
    // 4. Sender authenticity: `req.from?.id !== parsed.sender`.
    let from = value.get("from");
    let claimed = from.and_then(|f| f.get("id")).and_then(Value::as_str);
    if claimed != Some(sender.as_str()) {
        return refuse(RefusalReason::SenderMismatch {
            claimed: claimed.map(str::to_owned),
        });
    }
    // 5. Typed validation. The request is rebuilt from the authenticated id, so display metadata
    // (`name`, `role`) can never make a valid request fail.
    let request = control_request(&value, sender, from);
    match DeliveryRequest::from_request(&request) {
        Ok(request) => Admission::Admitted(Admitted {
            requester: sender.clone(),
            request,
            reply_to: reply.to_owned(),
            reply_id,
        }),
        Err(e) => refuse(RefusalReason::Invalid(e)),
    }
}

/// The decoded request as the reference's handler sees it: `op` (`"undefined"` when missing, the
/// JSON text when not a string), `args ?? {}`, and `from` with the authenticated id.
fn control_request(value: &Value, sender: &AgentId, from: Option<&Value>) -> ControlRequest {
    let op = match value.get("op") {
        None => "undefined".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let args = match value.get("args") {
        None | Some(Value::Null) => Value::Object(Extra::new()),
        Some(a) => a.clone(),
    };
    let text = |key: &str| from.and_then(|f| f.get(key)).and_then(Value::as_str);
    let mut who = Sender::new(sender.clone(), text("name").unwrap_or_default());
    who.role = text("role").map(str::to_owned);
    ControlRequest {
        op,
        args,
        from: who,
        extra: Extra::new(),
    }
}

/// The join gate (I25, B22): the requester's **current** read ACL, read fresh from the ACL KV
/// ([`AclRecord::from_kv`]), must exist and cover `channel`.
///
/// Coverage is [`ReadAcl::covers`], the core's one rule. An `allowSubscribe` entry that is not a
/// valid channel pattern covers nothing (fail closed); the refusal still lists the record's entries
/// verbatim, as the reference does. The channel's delivery class is not checked (G38, see the
/// module docs).
///
/// # Errors
///
/// The `{ok:false}` reply: `durableJoin: no read ACL on record for <caller> (not provisioned for
/// durable delivery)` when `acl` is `None`; `channel "<ch>" is not within your read ACL [<a, b>]`
/// when it does not cover `channel` (including `[]`).
pub fn gate_join(
    requester: &AgentId,
    channel: &ConcreteChannel,
    acl: Option<&AclRecord>,
) -> Result<(), ControlReply> {
    let Some(record) = acl else {
        return Err(ControlReply::failure(DeliveryRefusal::NoReadAcl {
            caller: requester.as_str().to_owned(),
        }));
    };
    let read = ReadAcl::new(
        record
            .allow_subscribe
            .iter()
            .filter_map(|e| Channel::new(e.as_str()).ok()),
    );
    if read.covers(channel) {
        Ok(())
    } else {
        Err(ControlReply::failure(DeliveryRefusal::NotWithinReadAcl {
            channel: channel.as_str().to_owned(),
            allow_subscribe: record.allow_subscribe.clone(),
        }))
    }
}

/// The G22 serialisation key: requests with equal keys must run one after another, in arrival
/// order; requests with different keys may run concurrently.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum SerialKey {
    /// A join or leave: one membership record, `(owner, channel)`.
    Membership {
        /// The member.
        owner: AgentId,
        /// The concrete channel.
        channel: ConcreteChannel,
    },
    /// A `listMemberships`: a read-only snapshot of one owner's records.
    Owner {
        /// The owner.
        owner: AgentId,
    },
}

/// The G22 key of `request` from `requester` (see [`SerialKey`] and the module docs).
pub fn serial_key(requester: &AgentId, request: &DeliveryRequest) -> SerialKey {
    match request {
        DeliveryRequest::DurableJoin { channel, .. }
        | DeliveryRequest::DurableLeave { channel, .. } => SerialKey::Membership {
            owner: requester.clone(),
            channel: channel.clone(),
        },
        DeliveryRequest::ListMemberships => SerialKey::Owner {
            owner: requester.clone(),
        },
    }
}

/// `{ok:false, error}` with the given text, encoded.
pub fn failure_reply(error: impl fmt::Display) -> Bytes {
    json::encode(&ControlReply::<Value>::failure(error))
}

/// Encodes an already-built reply (for example the error of [`gate_join`]).
pub fn encode_reply(reply: &ControlReply) -> Bytes {
    json::encode(reply)
}

/// The `durableJoin` success reply, `{ok:true, data:{durable, reason?, generation, joinCursor?}}`,
/// encoded. `join_cursor` is our extension (the cursor the daemon used); reference agents ignore
/// it.
pub fn durable_join_reply(
    durable: bool,
    reason: Option<&str>,
    generation: u64,
    join_cursor: Option<u64>,
) -> Bytes {
    json::encode(&ControlReply::success(DurableJoinReply {
        durable,
        reason: reason.map(str::to_owned),
        generation: Some(generation),
        join_cursor,
        extra: Extra::new(),
    }))
}

/// The `durableJoin` reply for a live-class channel: `{ok:true, data:{durable:false, reason}}`
/// with no generation, since no membership exists for it ([`REASON_LIVE_CLASS`]). A reference
/// agent reports the reason and keeps its live subscription (semantics §2(a) step 7).
pub fn live_class_join_reply() -> Bytes {
    json::encode(&ControlReply::success(DurableJoinReply {
        durable: false,
        reason: Some(REASON_LIVE_CLASS.to_owned()),
        generation: None,
        join_cursor: None,
        extra: Extra::new(),
    }))
}

/// The `durableLeave` success reply, `{ok:true, data:{channel, alreadyLeft?}}`, encoded;
/// `alreadyLeft` is written only when true.
pub fn durable_leave_reply(channel: &ConcreteChannel, already_left: bool) -> Bytes {
    json::encode(&ControlReply::success(DurableLeaveReply {
        channel: channel.clone(),
        already_left,
        extra: Extra::new(),
    }))
}

/// The `listMemberships` success reply, `{ok:true, data:{memberships:[{channel, generation,
/// activated}]}}`, encoded, in the given order.
pub fn list_memberships_reply(memberships: impl IntoIterator<Item = MembershipSummary>) -> Bytes {
    json::encode(&ControlReply::success(ListMembershipsReply {
        memberships: memberships.into_iter().collect(),
        extra: Extra::new(),
    }))
}

#[cfg(test)]
mod tests;
