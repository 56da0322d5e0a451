//! Sending, with id-collision republish: [`Sends`] publishes a post, a DM or an anycast through
//! JetStream with `Nats-Msg-Id` = the message id, on the subject its one route names (SPEC §12
//! items 2–4: our own sender token, one routing field), and reports [`AgentEvent::Sent`] or
//! [`AgentEvent::SendFailed`].
//!
//! A *fresh* send (an id drawn here, not a caller-chosen resend) answered `duplicate: true` met
//! an id already in the stream's duplicate window: it is republished under a new id
//! ([`AgentEvent::MessageIdCollided`]), at most [`MAX_ID_COLLISIONS`] times.
//!
//! - **Owns:** the sends awaiting their PubAck (by op id), each with what a republish needs.
//! - **Issues:** `JsPublish`; draws request ids and (on a collision) uuids from the context.
//! - **Routed to it:** the PubAck of each of its publishes ([`Sends::owns`]).

use super::ctx::{Ctx, bump};
use super::types::{AgentEvent, MAX_ID_COLLISIONS, RequestId};
use crate::io::{Command, Reply};
use crate::op::{OpId, Outcome};
use crate::time::Now;
use crate::wire::json;
use crate::wire::message::{CotalMessage, Part, Route};
use crate::wire::subject::Subject;
use std::collections::BTreeMap;

/// What to send: the route (one routing field), the parts and the (normalized) mentions.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) route: Route,
    pub(super) parts: Vec<Part>,
    pub(super) mentions: Vec<String>,
}

/// A send awaiting its PubAck.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PendingSend {
    request: RequestId,
    id: String,
    /// For a send whose id we drew (not a caller-chosen resend): what to republish under a new
    /// id if the stream answers `duplicate: true`.
    fresh: Option<Box<FreshSend>>,
}

/// A fresh send kept until its PubAck, to republish under a new id on an id collision.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FreshSend {
    subject: String,
    msg: CotalMessage,
    collisions: u32,
}

/// The sends in flight. See the module docs.
#[derive(Debug, Default)]
pub(super) struct Sends {
    pending: BTreeMap<OpId, PendingSend>,
}

impl Sends {
    /// Whether `op` is one of this child's publishes.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.pending.contains_key(&op)
    }

    /// Publishes one message with the id `id`; `fresh`: the id was drawn here, so
    /// `duplicate: true` is a collision. Returns the request id its result event carries.
    pub(super) fn publish(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        out: Outgoing,
        id: String,
        fresh: bool,
    ) -> RequestId {
        let space = cx.config.space.clone();
        let sender = cx.config.me.id.clone();
        let subject = match &out.route {
            Route::Channel(channel) => Subject::Chat {
                space,
                sender,
                channel: channel.clone(),
            },
            Route::To(target) => Subject::Unicast {
                space,
                target: target.clone(),
                sender,
            },
            Route::ToService(role) => Subject::Anycast {
                space,
                role: role.clone(),
                sender,
            },
        };
        let mut msg = CotalMessage::new(
            id.clone(),
            now.wall,
            cx.config.space.clone(),
            cx.config.me.clone(),
            out.route,
            out.parts,
        );
        msg.mentions = out.mentions;
        let request = cx.next_request_id();
        let subject = subject.to_string();
        let fresh = fresh.then(|| {
            Box::new(FreshSend {
                subject: subject.clone(),
                msg: msg.clone(),
                collisions: 0,
            })
        });
        self.publish_message(cx, request, subject, msg, fresh);
        request
    }

    /// Sends the `JsPublish` of `msg` (its id is the `Nats-Msg-Id`) for `request`.
    fn publish_message(
        &mut self,
        cx: &mut Ctx,
        request: RequestId,
        subject: String,
        msg: CotalMessage,
        fresh: Option<Box<FreshSend>>,
    ) {
        let payload = json::encode(&msg);
        let op = cx.ops.next_id();
        self.pending.insert(
            op,
            PendingSend {
                request,
                id: msg.id.clone(),
                fresh,
            },
        );
        cx.commands.push_back(Command::JsPublish {
            op,
            subject,
            msg_id: Some(msg.id),
            headers: Vec::new(),
            payload,
        });
    }

    /// The PubAck (or failure) of the publish `op`.
    pub(super) fn on_completion(&mut self, cx: &mut Ctx, op: OpId, outcome: Outcome<Reply>) {
        let Some(PendingSend { request, id, fresh }) = self.pending.remove(&op) else {
            return;
        };
        let event = match outcome {
            Outcome::Success(Reply::PubAck(ack)) if ack.duplicate && fresh.is_some() => {
                if let Some(fresh) = fresh {
                    self.on_id_collision(cx, request, id, fresh);
                }
                return;
            }
            Outcome::Success(Reply::PubAck(ack)) => AgentEvent::Sent {
                request,
                id,
                seq: ack.seq,
                duplicate: ack.duplicate,
            },
            Outcome::Success(other) => AgentEvent::SendFailed {
                request,
                id,
                error: format!("unexpected reply {other:?}"),
                unknown: true,
            },
            Outcome::Failed(f) => AgentEvent::SendFailed {
                request,
                id,
                error: f.to_string(),
                unknown: false,
            },
            Outcome::Unknown => AgentEvent::SendFailed {
                request,
                id,
                error: "outcome unknown; resend with the same id".into(),
                unknown: true,
            },
        };
        cx.events.push_back(event);
    }

    /// A fresh send answered `duplicate: true`: republish under a new id (bounded).
    fn on_id_collision(
        &mut self,
        cx: &mut Ctx,
        request: RequestId,
        old: String,
        mut fresh: Box<FreshSend>,
    ) {
        bump(&mut cx.counters.message_id_collisions);
        fresh.collisions += 1;
        if fresh.collisions > MAX_ID_COLLISIONS {
            cx.events.push_back(AgentEvent::SendFailed {
                request,
                id: old,
                error: format!(
                    "message id collided {MAX_ID_COLLISIONS} times: ids published ahead of ours"
                ),
                unknown: false,
            });
            return;
        }
        let new = cx.ids.uuid();
        cx.events.push_back(AgentEvent::MessageIdCollided {
            request,
            old,
            new: new.clone(),
        });
        let mut msg = fresh.msg.clone();
        msg.id = new;
        fresh.msg = msg.clone();
        let subject = fresh.subject.clone();
        self.publish_message(cx, request, subject, msg, Some(fresh));
    }
}
