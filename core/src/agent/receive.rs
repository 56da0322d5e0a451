//! Receiving: [`Receiver`] runs every copy (live, backfill, DLV, DM, TASK) through the
//! authenticity filter and then the [`Ledger`]: one surfacing per id, the durable copy owns the
//! ack, acks only after [`super::Agent::handled`], anomalies terminated (§2(f)).
//!
//! - Live and backfill copies: the channel and sender come from the subject; a payload whose
//!   `from.id` is not the subject's sender is dropped as spoofed, bad JSON as malformed (both
//!   an [`AgentEvent::Anomaly`]), our own echo is dropped.
//! - DLV copies are written only by the daemon: trusted, no spoof check; the channel label is
//!   the payload's route, which the daemon took from the authenticated subject.
//! - DM / TASK copies: the kind and the sender come from the subject, which must be the one the
//!   consumer's filter captures; bad JSON and a foreign subject are terminated as malformed, a
//!   spoof is terminated, our own echo is acked.
//! - A live copy a full ledger refuses is a loss ([`AgentEvent::Lost`]) unless its channel's
//!   backstop is established: then its durable twin is coming ([`AgentEvent::LiveCopyShed`]),
//!   and it is shed without displacing anything. The parent says which channels are established
//!   (the `established` argument).
//! - **The waiting room.** A durable copy of a new id that a full ledger cannot take is not
//!   nakked: it waits here, unsettled and oldest first, and enters the ledger as soon as the
//!   application settles something (at most one ledger's worth wait; past that the ledger naks).
//!   An unsettled delivery keeps its slot in the consumer's window, so the consumer stops
//!   delivering to a member whose application is behind, and its acks stay in stream order.
//!   A nak would let the consumer move on: newer copies acked while an older one waits out the
//!   nak delay. An owner's DLV keeps 1000 copies (discard-old), and the daemon's DLV gate counts
//!   only unread copies, so at a few hundred copies per second the older copy was rotated out
//!   unread before it came back: a silent loss (G6; `cotal bench` at 50 members lost up to 237
//!   copies of 100,000).
//!
//! - **Owns:** the ledger, and the settles in flight (by op id).
//! - **Issues:** `Settle` (ack / nak / term, unconfirmed: no decision waits on it).
//! - **Routed to it:** every copy the parent's feeds and the join's backfill deliver, the
//!   application's `handled` / `decline`, and the completions of its settles
//!   ([`Receiver::owns`]).

use super::ctx::{Ctx, Direct, bump};
use super::types::{AgentError, AgentEvent, Arrival};
use crate::io::{AckKind, Command, Reply};
use crate::ledger::{
    Action, CopySource, Decision, DeliveryId, DurableDelivery, Ledger, LedgerError, MessageId,
    Rejection, Resolution, Settled, Surfaced,
};
use crate::op::{OpId, Outcome};
use crate::time::Now;
use crate::wire::message::{CotalMessage, Route};
use crate::wire::subject::{DeliveryKind, Subject};
use crate::wire::token::{ConcreteChannel, Role};
use bytes::Bytes;
use std::collections::{BTreeSet, VecDeque};

/// A durable delivery as the parent's feed received it.
pub(super) struct DlvDelivery {
    pub(super) delivery: DeliveryId,
    pub(super) stream_seq: u64,
    pub(super) delivery_count: u64,
    pub(super) subject: String,
    pub(super) payload: Bytes,
}

/// A durable copy the full ledger could not take yet (see the module docs).
#[derive(Debug)]
struct Waiting {
    id: MessageId,
    source: CopySource,
    arrival: Arrival,
}

/// The receiving side. See the module docs.
#[derive(Debug)]
pub(super) struct Receiver {
    ledger: Ledger<Arrival>,
    /// Settles in flight.
    settles: BTreeSet<OpId>,
    /// Durable copies waiting for room in the ledger, oldest first (at most `max_pending`).
    waiting: VecDeque<Waiting>,
}

impl Receiver {
    /// A receiver around `ledger`.
    pub(super) fn new(ledger: Ledger<Arrival>) -> Self {
        Receiver {
            ledger,
            settles: BTreeSet::new(),
            waiting: VecDeque::new(),
        }
    }

    /// Durable copies waiting for room in the ledger.
    pub(super) fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether the ledger would refuse a copy of `id` for want of room (a new id, a full ledger).
    fn no_room_for(&self, id: &MessageId) -> bool {
        self.ledger.pending_len() >= self.ledger.config().max_pending
            && !self.ledger.is_pending(id)
            && self.ledger.settlement(id).is_none()
    }

    /// Moves waiting copies into the ledger, oldest first, while it has room.
    fn admit_waiting(&mut self, cx: &mut Ctx, now: Now) {
        while self.ledger.pending_len() < self.ledger.config().max_pending {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            self.hand_to_ledger(cx, now, w.id, w.source, w.arrival, false);
        }
    }

    /// The ledger (read-only).
    pub(super) fn ledger(&self) -> &Ledger<Arrival> {
        &self.ledger
    }

    /// Whether `op` is one of this child's settles.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.settles.contains(&op)
    }

    /// A settle's completion: unconfirmed ones are counted (the delivery comes back after
    /// ack_wait, and the ledger's horizon settles it).
    pub(super) fn on_completion(&mut self, cx: &mut Ctx, op: OpId, outcome: Outcome<Reply>) {
        self.settles.remove(&op);
        if !outcome.is_success() {
            bump(&mut cx.counters.settles_unconfirmed);
        }
    }

    /// Takes up to `limit` queued messages, oldest first.
    pub(super) fn surface(&mut self, now: Now, limit: usize) -> Vec<Surfaced<Arrival>> {
        self.ledger.surface(now.at, limit)
    }

    /// The application handled `id`: ack its durable copy.
    pub(super) fn handled(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        id: &MessageId,
    ) -> Result<(), AgentError> {
        let settled = self.ledger.handled(now.at, id);
        self.ack_settled(cx, settled)?;
        self.admit_waiting(cx, now);
        Ok(())
    }

    /// The application declined `id`: ack it, remember it, never surface it again.
    pub(super) fn decline(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        id: &MessageId,
    ) -> Result<(), AgentError> {
        let settled = self.ledger.decline(now.at, id);
        self.ack_settled(cx, settled)?;
        self.admit_waiting(cx, now);
        Ok(())
    }

    /// Sends the ack a settlement carries (the durable copy's, if the entry held one).
    fn ack_settled(
        &mut self,
        cx: &mut Ctx,
        settled: Result<Settled, LedgerError>,
    ) -> Result<(), AgentError> {
        if let Some(r) = settled.map_err(AgentError::Ledger)?.ack {
            self.resolve(cx, r);
        }
        Ok(())
    }

    fn resolve(&mut self, cx: &mut Ctx, r: Resolution) {
        let kind = match r.action {
            Action::Ack => AckKind::Ack,
            Action::Nak { delay } => AckKind::Nak { delay },
            Action::Term => AckKind::Term,
            Action::Forget => return,
        };
        let op = cx.ops.next_id();
        self.settles.insert(op);
        // Unconfirmed: no decision waits on it. A lost ack brings the copy back after ack_wait,
        // and the dedup ledger's settled horizon acks it again without surfacing it.
        cx.commands.push_back(Command::Settle {
            op,
            delivery: r.delivery,
            kind,
            confirm: false,
        });
    }

    /// The authenticity filter of the live and backfill paths, then the ledger.
    pub(super) fn ingest_chat(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        subject: &str,
        payload: &Bytes,
        source: CopySource,
        established: impl Fn(&ConcreteChannel) -> bool,
    ) {
        let Ok(Subject::Chat {
            sender, channel, ..
        }) = Subject::parse(subject)
        else {
            // Not a chat subject: dropped silently, as the reference does.
            return;
        };
        let msg = match CotalMessage::decode(payload) {
            Ok(m) => m,
            Err(_) => {
                bump(&mut cx.counters.malformed);
                cx.events.push_back(AgentEvent::Anomaly {
                    subject: subject.to_owned(),
                    rejection: Rejection::Malformed,
                });
                return;
            }
        };
        if msg.from.id != sender {
            bump(&mut cx.counters.spoofed);
            cx.events.push_back(AgentEvent::Anomaly {
                subject: subject.to_owned(),
                rejection: Rejection::Spoofed,
            });
            return;
        }
        if sender == cx.config.me.id {
            bump(&mut cx.counters.own_echoes);
            return;
        }
        let historical = matches!(source, CopySource::Backfill);
        self.ingest(
            cx,
            now,
            msg,
            (Some(channel), DeliveryKind::Channel, None),
            (historical, source),
            established,
        );
    }

    fn ingest(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        msg: CotalMessage,
        (channel, kind, role): (Option<ConcreteChannel>, DeliveryKind, Option<Role>),
        (historical, source): (bool, CopySource),
        established: impl Fn(&ConcreteChannel) -> bool,
    ) {
        let me = cx.config.me.name.to_lowercase();
        let mentions_me = msg.mentions.contains(&me);
        let id = MessageId::new(msg.id.clone());
        // A live copy of a channel whose durable backstop is established has a durable twin on
        // its way (the membership interval starts at the watermark, and live copies lie above
        // it, I5): shedding it under overflow costs latency, not the message.
        let twin_coming =
            matches!(source, CopySource::Live) && channel.as_ref().is_some_and(established);
        let arrival = Arrival {
            message: msg,
            channel,
            historical,
            mentions_me,
            kind,
            role,
        };
        if self.no_room_for(&id) {
            if twin_coming {
                // Its durable twin is coming: shed it, displacing nothing.
                self.shed_live(cx, &id, arrival.channel);
                return;
            }
            if matches!(source, CopySource::Durable(_))
                && self.waiting.len() < self.ledger.config().max_pending
            {
                bump(&mut cx.counters.durable_copies_waited);
                self.waiting.push_back(Waiting {
                    id,
                    source,
                    arrival,
                });
                return;
            }
        }
        self.hand_to_ledger(cx, now, id, source, arrival, twin_coming);
    }

    /// A live copy refused for want of room whose durable twin is coming.
    fn shed_live(&mut self, cx: &mut Ctx, id: &MessageId, channel: Option<ConcreteChannel>) {
        let Some(channel) = channel else {
            return;
        };
        bump(&mut cx.counters.live_copies_shed);
        cx.events.push_back(AgentEvent::LiveCopyShed {
            id: id.as_str().to_owned(),
            channel,
        });
    }

    /// Hands one copy to the ledger and carries out its decision.
    fn hand_to_ledger(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        id: MessageId,
        source: CopySource,
        arrival: Arrival,
        twin_coming: bool,
    ) {
        let shed_channel = arrival.channel.clone();
        match self.ledger.ingest(now.at, id.clone(), source, arrival) {
            Ok(decision) => {
                if let Some(r) = decision.resolution() {
                    self.resolve(cx, r);
                }
                if decision == Decision::OverflowLost {
                    if twin_coming {
                        self.shed_live(cx, &id, shed_channel);
                    } else {
                        cx.events.push_back(AgentEvent::Lost {
                            id: id.as_str().to_owned(),
                            reason: "receiver inbox full".into(),
                        });
                    }
                }
                if decision.is_buffered() {
                    cx.events.push_back(AgentEvent::MessagesReady {
                        queued: self.ledger.queued_len(),
                    });
                }
            }
            Err(e) => {
                debug_assert!(false, "ledger misuse: {e}");
            }
        }
    }

    pub(super) fn on_delivery(&mut self, cx: &mut Ctx, now: Now, d: DlvDelivery) {
        let durable = DurableDelivery::new(d.delivery)
            .with_stream_seq(d.stream_seq)
            .with_delivery_count(d.delivery_count);
        let msg = match CotalMessage::decode(&d.payload) {
            Ok(m) => m,
            Err(_) => {
                bump(&mut cx.counters.malformed);
                self.reject(cx, now, d.delivery, &d.subject, Rejection::Malformed);
                return;
            }
        };
        if msg.from.id == cx.config.me.id {
            bump(&mut cx.counters.own_echoes);
            self.reject(cx, now, d.delivery, &d.subject, Rejection::OwnEcho);
            return;
        }
        // DLV is written only by the daemon: trusted, no spoof check (§2(f)). The channel label
        // is the payload's route, which the daemon took from the authenticated subject.
        let channel = match &msg.route {
            Route::Channel(c) => Some(c.clone()),
            _ => None,
        };
        self.ingest(
            cx,
            now,
            msg,
            (channel, DeliveryKind::Channel, None),
            (false, CopySource::Durable(durable)),
            |_| false,
        );
    }

    /// A DM or TASK delivery (§2(f) `pump`): the kind and the sender come from the subject, and
    /// the subject must be the one this consumer's filter captures; bad JSON and a foreign
    /// subject are terminated as malformed, a spoof (`from.id` ≠ the subject's sender) is
    /// terminated, our own echo is acked; everything else goes to the ledger as a durable copy
    /// that is acked only once the application handled it.
    pub(super) fn on_direct_delivery(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        d: Direct,
        dd: DlvDelivery,
    ) {
        let expected = match (Subject::parse(&dd.subject), d) {
            (
                Ok(Subject::Unicast {
                    space,
                    target,
                    sender,
                }),
                Direct::Dm,
            ) if space == cx.config.space && target == cx.config.me.id => {
                Some((sender, DeliveryKind::Dm, None))
            }
            (
                Ok(Subject::Anycast {
                    space,
                    role,
                    sender,
                }),
                Direct::Svc(i),
            ) if space == cx.config.space && cx.config.roles.get(i) == Some(&role) => {
                Some((sender, DeliveryKind::Anycast, Some(role)))
            }
            _ => None,
        };
        let Some((sender, kind, role)) = expected else {
            // Our consumer's filter never captures this: nothing here can be authenticated.
            bump(&mut cx.counters.malformed);
            bump(&mut cx.counters.direct_malformed);
            self.reject(cx, now, dd.delivery, &dd.subject, Rejection::Malformed);
            return;
        };
        let msg = match CotalMessage::decode(&dd.payload) {
            Ok(m) => m,
            Err(_) => {
                bump(&mut cx.counters.malformed);
                bump(&mut cx.counters.direct_malformed);
                self.reject(cx, now, dd.delivery, &dd.subject, Rejection::Malformed);
                return;
            }
        };
        if msg.from.id != sender {
            bump(&mut cx.counters.spoofed);
            bump(&mut cx.counters.direct_spoofed);
            self.reject(cx, now, dd.delivery, &dd.subject, Rejection::Spoofed);
            return;
        }
        if sender == cx.config.me.id {
            bump(&mut cx.counters.own_echoes);
            self.reject(cx, now, dd.delivery, &dd.subject, Rejection::OwnEcho);
            return;
        }
        let durable = DurableDelivery::new(dd.delivery)
            .with_stream_seq(dd.stream_seq)
            .with_delivery_count(dd.delivery_count);
        self.ingest(
            cx,
            now,
            msg,
            (None, kind, role),
            (false, CopySource::Durable(durable)),
            |_| false,
        );
    }

    fn reject(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        delivery: DeliveryId,
        subject: &str,
        rejection: Rejection,
    ) {
        let durable = DurableDelivery::new(delivery);
        match self
            .ledger
            .reject(now.at, CopySource::Durable(durable), rejection)
        {
            Ok(Some(r)) => self.resolve(cx, r),
            Ok(None) => {}
            Err(e) => debug_assert!(false, "ledger misuse: {e}"),
        }
        if rejection != Rejection::OwnEcho {
            cx.events.push_back(AgentEvent::Anomaly {
                subject: subject.to_owned(),
                rejection,
            });
        }
    }
}
