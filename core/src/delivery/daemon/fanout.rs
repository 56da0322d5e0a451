//! Fan-out: every CHAT delivery is routed against the in-memory views ([`route()`]); each copy
//! is written straight to its owner's DLV or spilled to the owner's dinbox, one batch per
//! delivery, acked once every copy is stored (semantics §2, life cycle step 4 in [`super`]).
//!
//! [`Fanout`] owns the batches, the highest CHAT sequence received (the fan-out part of a join's
//! fence), the spilled copies in flight per owner, the per-owner back-pressure (the reader
//! consumer's backlog, [`InboxBacklog`]; the copies held for an owner at [`DINBOX_HIGH_WATER`];
//! the owners in a back-pressure episode), whether writes are failing (health), and the op ids
//! it issued: the DLV and dinbox publishes (`JsPublish`) and the reads of the reader consumer's
//! unread total (`ConsumerInfo`). It settles CHAT deliveries itself ([`Ctx::settle`]) and sets
//! [`Timer::HeldCopies`].
//!
//! Inputs from the parent: a fan-out delivery (with [`Lent`]: the views, a running leave's
//! frontier, the reader's DLV gate), a completion of one of its ops (it answers a
//! [`FanoutStep`]), the timer, and [`Fanout::settled`] when the reader settled an owner's
//! dinbox entry (which may release held copies). Read by the parent: [`Fanout::high`] (a join's
//! fence), [`Fanout::legacy_known`] (the fan-out consumer opens once the backlog is known),
//! [`Fanout::writes_failing`] (health).
//!
//! # One write per copy (issue 17)
//!
//! Fan-out and the reader run in one daemon over the same views, so a copy can be judged when it
//! is routed. Each copy gets the reader's own decision ([`judge`]: the owner's current ACL, the
//! interval of the copy's own generation (G2), the hold for a leave in flight). A copy it would
//! transfer is published straight to `cotal.<s>.dlv.<owner>` under the msg-id and payload the
//! reader would have used (`<msg.id>:<owner>:<generation>`, the message itself, encoded once
//! per message), when
//!
//! - nothing of the owner's is in the dinbox or on its way there (no spilled copy in flight,
//!   the inbox backlog's bound is 0, a predecessor's unread entries included), so the owner's
//!   DLV keeps CHAT order; and
//! - the reader's DLV gate admits it ([`super::reader::Reader::admit_direct`]): under the
//!   owner's cap and the sender's share. When the gate must read the owner's consumer first
//!   (the owner's first copy in this life, the cap or the share reached), the copy is **parked**
//!   in the gate, in order with the owner's other waiting copies, and written once the read
//!   lets it in, or shed as a reported loss when the owner's DLV is full (as the reader sheds).
//!
//! Every other copy **spills** to the dinbox and the reader decides it as before: the first copy
//! of each owner in a daemon's life (its DLV backlog is unknown), copies of an owner whose DLV is
//! full or being read (the reader waits or sheds for that owner alone, so one slow member does
//! not hold fan-out for everyone), copies the decision does not transfer (unknown ACL, a leave in
//! flight, drops), and copies behind a spilled one. Catch-up copies and entries an earlier
//! daemon left in INBOX (ours or the reference's) are transferred by the reader too, and
//! [`super::DeliveryConfig::two_hop`] spills everything (the reference's two hops). A failed or
//! unknown direct write naks the message like a failed dinbox write; its redelivery collapses
//! on the DLV msg-id (the DLV stream's 2 h duplicate window).
//!
//! **The revocation window.** A copy is judged against the ACL as this daemon's watch last
//! delivered it. A narrowing the watch has not delivered yet, or one that arrives while the
//! copy's write is in flight, lets the copy land. Both are taken back: the narrowing's watch
//! event queues a sweep of the owner's DLV, and the copy's PubAck asks for one more when the
//! current ACL no longer admits its channel ([`FanoutStep::Transferred`]). A narrowed copy
//! stays in DLV from its landing to the end of that sweep pass: the window the reader's
//! transfers had.
//!
//! # Decisions
//!
//! - **Per-owner caps (G6).** The daemon counts, per owner, entries it stored minus entries the
//!   reader settled since it started. Crossing [`MAX_MSGS_PER_SUBJECT`](crate::constants::MAX_MSGS_PER_SUBJECT) reports
//!   [`DeliveryEvent::DinboxCapReached`]: older entries of that owner are about to be discarded by
//!   the INBOX stream. The count is a lower bound (entries written before this daemon started are
//!   not counted).

use super::config::{DINBOX_HIGH_WATER, DeliveryConfig, FANOUT_HOLD_LIMIT, backpressure_delay};
use super::context::Ctx;
use super::events::{DeliveryEvent, FanoutAnomaly};
use super::reader::{DirectAdmit, judge};
use super::types::{BatchId, Timer, outcome_detail};
use super::views::Views;
use crate::constants::backoff;
use crate::delivery::authorize::{Decision, dlv_payload};
use crate::delivery::backlog::{BACKLOG_RECHECK, InboxBacklog, OWNER_CAP};
use crate::delivery::route::{MentionSkipReason, Routed, route};
use crate::io::{AckKind, Command, Reply};
use crate::ledger::DeliveryId;
use crate::op::{OpId, Outcome};
use crate::time::{Instant, Now};
use crate::wire::config::ConsumerSpec;
use crate::wire::json;
use crate::wire::message::CotalMessage;
use crate::wire::msgid::Plane3MsgId;
use crate::wire::records::{MemberState, MembershipRecord, Plane3Entry};
use crate::wire::shard::Shard;
use crate::wire::subject::Subject;
use crate::wire::token::{AgentId, ConcreteChannel, Space};
use bytes::Bytes;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

/// Where a fanned-out CHAT message came from, and so what settles it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Offer {
    /// A delivery of the fan-out consumer: settled once its copies are stored.
    Delivery(DeliveryId),
    /// A stranded message read back from CHAT ([`crate::delivery::stranded`]): nothing to
    /// settle; the consumer's own redelivery of it is settled, its copies collapsing on their
    /// msg-ids.
    ReadBack,
}

impl Offer {
    /// Settles the delivery, if there is one.
    fn settle(self, cx: &mut Ctx, kind: AckKind) {
        if let Offer::Delivery(delivery) = self {
            cx.settle(delivery, kind);
        }
    }
}

/// One CHAT delivery being fanned out.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FanoutBatch {
    offer: Offer,
    seq: u64,
    delivery_count: u64,
    channel: ConcreteChannel,
    outstanding: usize,
    failed: bool,
    /// Copies held back because their owner's dinbox backlog is at the high water, written by
    /// [`Fanout::release_held`] once the reader drained it. The delivery is settled only when
    /// none is left.
    held: Vec<Routed>,
    /// When the copies were held ([`FANOUT_HOLD_LIMIT`]).
    held_since: Option<Instant>,
    /// The hold gave up: nak the message once the others are stored, so its redelivery writes
    /// the copies that were held.
    deferred: bool,
    /// Copies parked in the DLV gate, by owner (counted in `outstanding`).
    parked: BTreeMap<AgentId, ParkedCopy>,
}

/// Where a copy is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CopyPath {
    /// Straight to the owner's DLV (one write per copy).
    Direct,
    /// To the owner's dinbox, for the reader (the spill, and every copy with
    /// [`super::DeliveryConfig::two_hop`]).
    Spill,
}

/// How one routed copy is written: straight to DLV with this msg-id and payload (now, or once
/// the DLV gate's read of the owner's consumer let it in), or spilled.
enum Write {
    Direct { msg_id: String, payload: Bytes },
    Parked { msg_id: String, payload: Bytes },
    Spill,
}

/// A copy parked in the DLV gate, written when the read lets it in (and the decision, taken
/// again then, still transfers it).
#[derive(Clone, Debug, PartialEq, Eq)]
struct ParkedCopy {
    msg_id: String,
    payload: Bytes,
    entry: Plane3Entry,
}

/// What became of a parked copy when the DLV gate let it in ([`Fanout::release_parked`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Released {
    /// Written to the owner's DLV.
    Written,
    /// The decision no longer transfers it (the owner's ACL narrowed, a leave began, … while it
    /// waited): spilled to the dinbox, where the reader decides it and counts what it drops.
    Spilled,
    /// Nothing parked there any more (the batch ended with the lease or the connection).
    Gone,
}

/// A routed copy and how it is written.
type RoutedCopy = (Routed, Write);

/// An op fan-out issued.
#[derive(Clone, Debug, PartialEq, Eq)]
enum FanoutOp {
    /// A copy of a batch, written to the owner's DLV or dinbox.
    Copy {
        batch: BatchId,
        owner: AgentId,
        channel: ConcreteChannel,
        generation: u64,
        path: CopyPath,
    },
    /// A read of the reader consumer's unread total.
    InboxBacklog,
}

/// What a completion of one of fan-out's ops asks of the parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum FanoutStep {
    /// The reader consumer's unread total was read: the fan-out consumer may open now.
    InboxBacklogRead,
    /// A copy reached `owner`'s DLV straight from fan-out: sweep again if the current ACL no
    /// longer admits `channel` (the revocation window, see the module docs).
    Transferred {
        owner: AgentId,
        channel: ConcreteChannel,
        /// Where the copy was stored, when it is a new one (not a duplicate).
        seq: Option<u64>,
    },
    /// A copy written straight to `owner`'s DLV was not stored: one fewer in its DLV bound.
    DirectUnstored(AgentId),
}

/// What the parent lends fan-out for one delivery: the views to route and judge by, the
/// frontier of a running leave per `(owner, channel)`, and the DLV gate of the reader.
pub(super) struct Lent<'a> {
    pub(super) views: &'a Views,
    pub(super) leave_frontier: &'a dyn Fn(&AgentId, &ConcreteChannel) -> Option<u64>,
    /// `(owner, sender, batch)`: the reader's DLV gate for a copy of `batch` (see
    /// [`DirectAdmit`]).
    pub(super) dlv_gate: &'a mut dyn FnMut(&mut Ctx, &AgentId, &AgentId, BatchId) -> DirectAdmit,
}

/// The fan-out child of [`super::Delivery`].
#[derive(Debug)]
pub(super) struct Fanout {
    space: Space,
    shard: Shard,
    /// [`super::DeliveryConfig::reference_gap_g17`].
    reference_gap_g17: bool,
    /// [`super::DeliveryConfig::reference_gap_g2`] (for the decision it shares with the reader).
    reference_gap_g2: bool,
    /// [`super::DeliveryConfig::two_hop`]: every copy goes through the dinbox.
    two_hop: bool,
    /// Spilled copies in flight per owner (not yet in the inbox backlog, which counts stored
    /// ones): a copy goes straight to DLV only when none of its owner's is in the dinbox or on
    /// its way there.
    spilling: BTreeMap<AgentId, u64>,
    /// The highest CHAT sequence received.
    high: u64,
    next_batch: BatchId,
    batches: BTreeMap<BatchId, FanoutBatch>,
    writes_failing: bool,
    inbox: InboxBacklog,
    /// Owners whose fan-out copies are held back (for one event per episode).
    backpressured: BTreeSet<AgentId>,
    /// The fan-out batches holding a copy for each owner, oldest first.
    held_for: BTreeMap<AgentId, BTreeSet<BatchId>>,
    pending: BTreeMap<OpId, FanoutOp>,
}

impl Fanout {
    pub(super) fn new(space: Space, shard: Shard, config: &DeliveryConfig) -> Self {
        Fanout {
            space,
            shard,
            reference_gap_g17: config.reference_gap_g17,
            reference_gap_g2: config.reference_gap_g2,
            two_hop: config.two_hop,
            spilling: BTreeMap::new(),
            high: 0,
            next_batch: 0,
            batches: BTreeMap::new(),
            writes_failing: false,
            inbox: InboxBacklog::default(),
            backpressured: BTreeSet::new(),
            held_for: BTreeMap::new(),
            pending: BTreeMap::new(),
        }
    }

    /// Whether a batch of CHAT sequence `seq` is being fanned out now.
    pub(super) fn holds(&self, seq: u64) -> bool {
        self.batches.values().any(|b| b.seq == seq)
    }

    /// The highest CHAT sequence fan-out has received.
    pub(super) fn high(&self) -> u64 {
        self.high
    }

    /// Whether the reader consumer's unread total left by a predecessor is known.
    pub(super) fn legacy_known(&self) -> bool {
        self.inbox.legacy_known()
    }

    /// Whether the last settled batch had a failed write.
    pub(super) fn writes_failing(&self) -> bool {
        self.writes_failing
    }

    /// Whether `op` is one of fan-out's publishes or reads.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.pending.contains_key(&op)
    }

    /// A completion of one of fan-out's ops, and what it asks of the parent.
    pub(super) fn on_completion(
        &mut self,
        cx: &mut Ctx,
        op: OpId,
        outcome: Outcome<Reply>,
    ) -> Option<FanoutStep> {
        match self.pending.remove(&op) {
            Some(FanoutOp::Copy {
                batch,
                owner,
                channel,
                generation,
                path,
            }) => self.on_copy_stored(cx, batch, owner, channel, generation, path, outcome),
            Some(FanoutOp::InboxBacklog) => {
                self.on_inbox_backlog(cx, outcome);
                Some(FanoutStep::InboxBacklogRead)
            }
            None => None,
        }
    }

    /// The lease is gone: the deliveries of the batches still held, in order (the parent hands
    /// them back). Answers in flight still arrive (and find no batch).
    pub(super) fn stop(&mut self, cx: &mut Ctx) -> Vec<DeliveryId> {
        let held = self
            .batches
            .values()
            .filter_map(|b| match b.offer {
                Offer::Delivery(d) => Some(d),
                Offer::ReadBack => None,
            })
            .collect();
        self.batches.clear();
        self.held_for.clear();
        cx.timers.cancel(&Timer::HeldCopies);
        held
    }

    /// The connection is gone: the broker redelivers every unsettled message; answers in flight
    /// are forgotten.
    pub(super) fn connection_lost(&mut self, cx: &mut Ctx) {
        self.batches.clear();
        self.held_for.clear();
        cx.timers.cancel(&Timer::HeldCopies);
        self.inbox.check_abandoned();
        self.pending.clear();
        self.spilling.clear();
    }

    /// A CHAT delivery of the fan-out consumer: routed against the views, each copy judged and
    /// written straight to DLV or spilled to the dinbox (or held for an owner at the high
    /// water), settled once all are stored.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_delivery(
        &mut self,
        cx: &mut Ctx,
        mut lent: Lent<'_>,
        live: bool,
        now: Now,
        offer: Offer,
        seq: u64,
        delivery_count: u64,
        subject: &str,
        payload: &[u8],
    ) {
        self.high = self.high.max(seq);
        let views = lent.views;
        let space = &self.space;
        let (sender, channel) = match Subject::parse(subject) {
            Ok(Subject::Chat {
                space: s,
                sender,
                channel,
            }) if &s == space => (sender, channel),
            _ => return self.fanout_anomaly(cx, offer, seq, subject, FanoutAnomaly::NotChat),
        };
        let msg = match CotalMessage::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                let a = FanoutAnomaly::Undecodable(e.to_string());
                return self.fanout_anomaly(cx, offer, seq, subject, a);
            }
        };
        if msg.from.id != sender {
            let a = FanoutAnomaly::Spoofed {
                sender,
                claimed: msg.from.id.clone(),
            };
            return self.fanout_anomaly(cx, offer, seq, subject, a);
        }
        let shard = self.shard;
        let class = views
            .channels
            .policy_for(&channel.as_channel())
            .delivery_class;
        let roster = &views.roster;
        let acls = &views.acls;
        let reference_g17 = self.reference_gap_g17;
        let records: Vec<Cow<'_, MembershipRecord>> = views
            .members
            .channel(&channel)
            .map(|r| routing_view(r, seq))
            .collect();
        let decision = route(
            &msg,
            &channel,
            seq,
            class,
            records.iter().map(|v| v.as_ref()),
            |name| {
                if reference_g17 {
                    roster.resolve_reference(name)
                } else {
                    roster.resolve(name, now.at, acls)
                }
            },
            |owner| acls.get(owner).map(|v| &v.read),
        );
        // A mention that reaches nobody is reported, by the first shard only (every shard
        // routes every message) and on the first delivery only (not again on a redelivery).
        if shard.index() == 0 && delivery_count <= 1 {
            for skipped in &decision.skipped_mentions {
                let counter = match skipped.reason {
                    MentionSkipReason::Ambiguous => &mut cx.counters.mentions_ambiguous,
                    MentionSkipReason::Unknown => &mut cx.counters.mentions_unknown,
                    _ => continue,
                };
                *counter += 1;
                cx.emit(DeliveryEvent::MentionUnresolved {
                    channel: channel.clone(),
                    seq,
                    name: skipped.name.clone(),
                    reason: skipped.reason,
                });
            }
        }
        let entries: Vec<Routed> = decision
            .entries
            .into_iter()
            .filter(|r| shard.owns(&r.owner))
            .collect();
        if entries.is_empty() {
            return offer.settle(cx, AckKind::Ack);
        }
        // One write per copy: each copy is judged now, as the reader would judge its entry, and
        // one it would transfer goes straight to the owner's DLV when nothing of the owner's is
        // in the dinbox or on its way there (so DLV keeps CHAT order) and the owner's DLV has
        // room now. Every other copy spills to the dinbox, where the reader decides it.
        self.next_batch += 1;
        let batch = self.next_batch;
        let mut payload: Option<Bytes> = None;
        let mut writes: Vec<RoutedCopy> = Vec::with_capacity(entries.len());
        for routed in entries {
            let write = self.direct_write(cx, &mut lent, batch, now, live, &routed, &mut payload);
            writes.push((routed, write));
        }
        // Per-owner back-pressure (G6): INBOX keeps the newest 1000 entries of an owner, so a
        // copy written while 1000 newer ones wait for the reader is discarded unread. An owner at
        // the high water gets its copy from this very delivery, held until the reader drained.
        let (writes, held): (Vec<RoutedCopy>, Vec<RoutedCopy>) = writes
            .into_iter()
            .partition(|(r, w)| !matches!(w, Write::Spill) || self.inbox.admits(&r.owner));
        let held: Vec<Routed> = held.into_iter().map(|(r, _)| r).collect();
        if !held.is_empty() {
            cx.counters.fanout_deferred += 1;
            for r in &held {
                self.held_for
                    .entry(r.owner.clone())
                    .or_default()
                    .insert(batch);
                if self.backpressured.insert(r.owner.clone()) {
                    let backlog = self.inbox.bound(&r.owner);
                    cx.emit(DeliveryEvent::DinboxBackpressure {
                        owner: r.owner.clone(),
                        backlog,
                    });
                }
            }
            if cx.timers.get(&Timer::HeldCopies).is_none() {
                cx.timers.set(Timer::HeldCopies, now.at + BACKLOG_RECHECK);
            }
            // A hold may rest on an over-count: read the truth (paced).
            if self.inbox.needs_recheck(now.at) {
                self.read_inbox_backlog(cx, now, live);
            }
        }
        let held_since = (!held.is_empty()).then_some(now.at);
        self.batches.insert(
            batch,
            FanoutBatch {
                offer,
                seq,
                delivery_count,
                channel,
                outstanding: 0,
                failed: false,
                held,
                held_since,
                deferred: false,
                parked: BTreeMap::new(),
            },
        );
        for (routed, write) in writes {
            self.publish_copy(cx, batch, routed, write);
        }
    }

    /// How `routed` is written: [`Write::Direct`] when the reader's decision ([`judge`]) is a
    /// transfer, no copy of the owner's is in the dinbox or on its way there, and the owner's
    /// DLV admits it now (the gate counts it then); else [`Write::Spill`]. `payload` is the
    /// message's DLV payload, encoded once per message.
    #[allow(clippy::too_many_arguments)]
    fn direct_write(
        &mut self,
        cx: &mut Ctx,
        lent: &mut Lent<'_>,
        batch: BatchId,
        now: Now,
        live: bool,
        routed: &Routed,
        payload: &mut Option<Bytes>,
    ) -> Write {
        if self.two_hop {
            return Write::Spill;
        }
        let owner = &routed.owner;
        let entry = &routed.entry;
        let leave = (lent.leave_frontier)(owner, &entry.channel);
        // A first look, as on the entry's first delivery: anything but a transfer is the
        // reader's to decide (and to count), with its own delivery count.
        let (decision, _) = judge(
            &lent.views.acls,
            &lent.views.members,
            leave,
            self.reference_gap_g2,
            owner,
            entry,
            1,
        );
        let Decision::Transfer { msg_id } = decision else {
            return Write::Spill;
        };
        if self.spilling.contains_key(owner) || self.inbox.bound(owner) > 0 {
            if self.inbox.legacy() > 0 && self.inbox.needs_recheck(now.at) {
                // A predecessor's unread entries bound every owner until a read shows them gone.
                self.read_inbox_backlog(cx, now, live);
            }
            return Write::Spill;
        }
        let admit = (lent.dlv_gate)(cx, owner, &entry.msg.from.id, batch);
        let payload = payload.get_or_insert_with(|| dlv_payload(entry)).clone();
        let msg_id = msg_id.to_string();
        match admit {
            DirectAdmit::Write => Write::Direct { msg_id, payload },
            DirectAdmit::Parked => Write::Parked { msg_id, payload },
        }
    }

    /// Writes one routed copy of fan-out batch `batch`: to its owner's DLV, or to its dinbox.
    fn publish_copy(&mut self, cx: &mut Ctx, batch: BatchId, routed: Routed, write: Write) {
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        b.outstanding += 1;
        let owner = routed.owner;
        let (path, subject, msg_id, payload) = match write {
            Write::Parked { msg_id, payload } => {
                let parked = ParkedCopy {
                    msg_id,
                    payload,
                    entry: routed.entry,
                };
                b.parked.insert(owner, parked);
                return;
            }
            Write::Direct { msg_id, payload } => {
                let subject = Subject::Dlv {
                    space: self.space.clone(),
                    owner: owner.clone(),
                };
                (CopyPath::Direct, subject, msg_id, payload)
            }
            Write::Spill => {
                *self.spilling.entry(owner.clone()).or_insert(0) += 1;
                let subject = Subject::Dinbox {
                    space: self.space.clone(),
                    owner: owner.clone(),
                };
                let msg_id = Plane3MsgId::for_entry(&routed.entry, &owner).to_string();
                (
                    CopyPath::Spill,
                    subject,
                    msg_id,
                    json::encode(&routed.entry),
                )
            }
        };
        let subject = subject.to_string();
        let op = cx.op();
        self.pending.insert(
            op,
            FanoutOp::Copy {
                batch,
                owner,
                channel: routed.entry.channel,
                generation: routed.entry.generation,
                path,
            },
        );
        cx.commands.push_back(Command::JsPublish {
            op,
            subject,
            msg_id: Some(msg_id),
            headers: Vec::new(),
            payload,
        });
    }

    /// The DLV gate's read let the copy of `batch` parked for `owner` in: the decision
    /// ([`judge`]) is taken again on the views of now, and a copy it still transfers is written.
    /// The views may have moved while the copy waited for the read: a narrowing of the owner's
    /// ACL, a leave, a new generation. A copy it no longer transfers is spilled to the dinbox,
    /// where the reader decides it as any spilled copy. Anything but [`Released::Written`] gives
    /// the gate's place back (the caller's part).
    pub(super) fn release_parked(
        &mut self,
        cx: &mut Ctx,
        views: &Views,
        leave_frontier: &dyn Fn(&AgentId, &ConcreteChannel) -> Option<u64>,
        batch: BatchId,
        owner: &AgentId,
    ) -> Released {
        let Some(b) = self.batches.get_mut(&batch) else {
            return Released::Gone;
        };
        let Some(p) = b.parked.remove(owner) else {
            return Released::Gone;
        };
        let (decision, _) = judge(
            &views.acls,
            &views.members,
            leave_frontier(owner, &p.entry.channel),
            self.reference_gap_g2,
            owner,
            &p.entry,
            1,
        );
        if !matches!(decision, Decision::Transfer { .. }) {
            // Counted once already (at the park); `publish_copy` counts it again.
            b.outstanding = b.outstanding.saturating_sub(1);
            let routed = Routed {
                owner: owner.clone(),
                entry: p.entry,
            };
            self.publish_copy(cx, batch, routed, Write::Spill);
            return Released::Spilled;
        }
        let op = cx.op();
        self.pending.insert(
            op,
            FanoutOp::Copy {
                batch,
                owner: owner.clone(),
                channel: b.channel.clone(),
                generation: p.entry.generation,
                path: CopyPath::Direct,
            },
        );
        let subject = Subject::Dlv {
            space: self.space.clone(),
            owner: owner.clone(),
        };
        cx.commands.push_back(Command::JsPublish {
            op,
            subject: subject.to_string(),
            msg_id: Some(p.msg_id),
            headers: Vec::new(),
            payload: p.payload,
        });
        Released::Written
    }

    /// The DLV gate's read found no room in `owner`'s DLV for the copy of `batch` parked there
    /// (the owner's DLV holds `unread` unread copies): it is shed, a reported loss, as the reader
    /// sheds a transfer. Returns the channel and sequence lost, for the loss notices.
    pub(super) fn shed_parked(
        &mut self,
        cx: &mut Ctx,
        batch: BatchId,
        owner: &AgentId,
        unread: u64,
    ) -> Option<(ConcreteChannel, u64)> {
        let b = self.batches.get_mut(&batch)?;
        let p = b.parked.remove(owner)?;
        b.outstanding = b.outstanding.saturating_sub(1);
        let (channel, seq) = (b.channel.clone(), b.seq);
        cx.counters.dlv_shed += 1;
        cx.counters.lost += 1;
        cx.emit(DeliveryEvent::CopyShed {
            owner: owner.clone(),
            channel: channel.clone(),
            seq,
            generation: p.entry.generation,
            unread,
        });
        self.finish_batch_if_done(cx, batch);
        Some((channel, seq))
    }

    /// Writes the copies held for `owner`, oldest CHAT message first, as many as its backlog has
    /// room for under the high water. (A copy counts once stored; the few in flight meanwhile fit
    /// in the margin between the high water and the cap.)
    fn release_held(&mut self, cx: &mut Ctx, owner: &AgentId) {
        let room = DINBOX_HIGH_WATER.saturating_sub(self.inbox.bound(owner));
        for _ in 0..room {
            let Some(batches) = self.held_for.get_mut(owner) else {
                return;
            };
            let Some(batch) = batches.pop_first() else {
                self.held_for.remove(owner);
                return;
            };
            if batches.is_empty() {
                self.held_for.remove(owner);
            }
            let Some(b) = self.batches.get_mut(&batch) else {
                continue;
            };
            let Some(at) = b.held.iter().position(|r| &r.owner == owner) else {
                continue;
            };
            let routed = b.held.swap_remove(at);
            if b.held.is_empty() {
                b.held_since = None;
            }
            self.publish_copy(cx, batch, routed, Write::Spill);
        }
    }

    /// Every hold whose owner the reader has drained below the high water is released.
    fn release_all_held(&mut self, cx: &mut Ctx) {
        let owners: Vec<AgentId> = self
            .held_for
            .keys()
            .filter(|o| self.inbox.admits(o))
            .cloned()
            .collect();
        for owner in owners {
            self.release_held(cx, &owner);
        }
    }

    /// [`Timer::HeldCopies`]: holds older than [`FANOUT_HOLD_LIMIT`] give up (their message is
    /// naked once its other copies are stored), the reader consumer is read again if a hold may
    /// rest on an over-count, and the timer is set again while anything is held.
    pub(super) fn on_held_timer(&mut self, cx: &mut Ctx, now: Now, live: bool) {
        let expired: Vec<BatchId> = self
            .batches
            .iter()
            .filter(|(_, b)| {
                b.held_since
                    .is_some_and(|t| now.at.saturating_since(t) >= FANOUT_HOLD_LIMIT)
            })
            .map(|(id, _)| *id)
            .collect();
        for batch in expired {
            let Some(b) = self.batches.get_mut(&batch) else {
                continue;
            };
            let held = std::mem::take(&mut b.held);
            b.held_since = None;
            b.deferred = true;
            cx.counters.fanout_hold_expired += 1;
            for r in held {
                if let Some(set) = self.held_for.get_mut(&r.owner) {
                    set.remove(&batch);
                    if set.is_empty() {
                        self.held_for.remove(&r.owner);
                    }
                }
            }
            self.finish_batch_if_done(cx, batch);
        }
        if !self.held_for.is_empty() {
            if self.inbox.needs_recheck(now.at) {
                self.read_inbox_backlog(cx, now, live);
            }
            cx.timers.set(Timer::HeldCopies, now.at + BACKLOG_RECHECK);
        }
    }

    fn fanout_anomaly(
        &mut self,
        cx: &mut Ctx,
        offer: Offer,
        seq: u64,
        subject: &str,
        anomaly: FanoutAnomaly,
    ) {
        let Offer::Delivery(delivery) = offer else {
            return; // counted and terminated when the consumer delivers it
        };
        cx.counters.fanout_anomalies += 1;
        cx.settle(delivery, AckKind::Term);
        cx.emit(DeliveryEvent::FanoutTerminated {
            seq,
            subject: subject.to_owned(),
            anomaly,
        });
    }

    /// A dinbox copy of `owner`'s was stored (fan-out or a join's catch-up): counted in the
    /// owner's backlog; reaching the INBOX cap is reported.
    pub(super) fn stored(&mut self, cx: &mut Ctx, owner: &AgentId, duplicate: bool) {
        if duplicate {
            cx.counters.copies_duplicate += 1;
            return;
        }
        cx.counters.copies_written += 1;
        let n = self.inbox.stored(owner);
        if n == OWNER_CAP {
            let backlog = n;
            cx.counters.cap_reached += 1;
            cx.emit(DeliveryEvent::DinboxCapReached {
                owner: owner.clone(),
                backlog,
            });
        }
    }

    pub(super) fn settled(&mut self, cx: &mut Ctx, owner: &AgentId) {
        if self.inbox.settled(owner) && !self.held_for.is_empty() {
            // A predecessor's entry: the legacy bounds every owner.
            self.release_all_held(cx);
        }
        if self.inbox.admits(owner) {
            if self.held_for.contains_key(owner) {
                self.release_held(cx, owner);
            }
            // The episode ends when nothing of the owner's is held any more.
            if !self.held_for.contains_key(owner) {
                self.backpressured.remove(owner);
            }
        }
    }

    /// Reads the reader consumer's unread total (at its bind, and when a hold may rest on an
    /// over-count).
    pub(super) fn read_inbox_backlog(&mut self, cx: &mut Ctx, now: Now, live: bool) {
        if !live {
            return;
        }
        self.inbox.check_started(now.at);
        let op = cx.op();
        self.pending.insert(op, FanoutOp::InboxBacklog);
        let reader = ConsumerSpec::reader(&self.space, self.shard.index(), self.shard.shards());
        cx.commands.push_back(Command::ConsumerInfo {
            op,
            stream: reader.stream,
            consumer: reader.name,
        });
    }

    fn on_inbox_backlog(&mut self, cx: &mut Ctx, outcome: Outcome<Reply>) {
        match outcome {
            Outcome::Success(Reply::ConsumerState(state)) => {
                self.inbox.clamp(state.unread());
                self.release_all_held(cx);
                let (inbox, held_for) = (&self.inbox, &self.held_for);
                self.backpressured
                    .retain(|owner| !inbox.admits(owner) || held_for.contains_key(owner));
            }
            other => {
                self.inbox.check_failed();
                cx.counters.backlog_unverified += 1;
                cx.emit(DeliveryEvent::BacklogUnverified {
                    owner: None,
                    detail: outcome_detail(&other),
                });
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_copy_stored(
        &mut self,
        cx: &mut Ctx,
        batch: BatchId,
        owner: AgentId,
        channel: ConcreteChannel,
        generation: u64,
        path: CopyPath,
        outcome: Outcome<Reply>,
    ) -> Option<FanoutStep> {
        if path == CopyPath::Spill
            && let Some(n) = self.spilling.get_mut(&owner)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.spilling.remove(&owner);
            }
        }
        let (ok, step) = match (outcome, path) {
            (Outcome::Success(Reply::PubAck(ack)), CopyPath::Spill) => {
                self.stored(cx, &owner, ack.duplicate);
                (None, None)
            }
            (Outcome::Success(Reply::PubAck(ack)), CopyPath::Direct) => {
                if ack.duplicate {
                    cx.counters.copies_duplicate += 1;
                } else {
                    cx.counters.copies_written += 1;
                }
                cx.counters.transferred += 1;
                cx.counters.transferred_direct += 1;
                let step = FanoutStep::Transferred {
                    owner: owner.clone(),
                    channel,
                    seq: (!ack.duplicate).then_some(ack.seq),
                };
                (None, Some(step))
            }
            (Outcome::Failed(f), path) => (Some(Some(f)), unstored(path, &owner)),
            (_, path) => (Some(None), unstored(path, &owner)),
        };
        let Some(b) = self.batches.get_mut(&batch) else {
            return step;
        };
        b.outstanding = b.outstanding.saturating_sub(1);
        if let Some(failure) = ok {
            b.failed = true;
            let (channel, seq) = (b.channel.clone(), b.seq);
            cx.counters.writes_failed += 1;
            cx.emit(DeliveryEvent::CopyWriteFailed {
                owner,
                channel,
                seq,
                generation,
                failure,
            });
        }
        self.finish_batch_if_done(cx, batch);
        step
    }

    /// Settles a fan-out batch's CHAT delivery once no copy is in flight or held: acked when
    /// every copy is stored, naked with backoff after a failed write (the msg-id collapses the
    /// copies already stored), naked with [`backpressure_delay`] after a hold gave up. A failed
    /// write ends the holds too (the redelivery writes everything again).
    fn finish_batch_if_done(&mut self, cx: &mut Ctx, batch: BatchId) {
        let Some(b) = self.batches.get(&batch) else {
            return;
        };
        if b.outstanding > 0 || (!b.held.is_empty() && !b.failed) {
            return;
        }
        let Some(b) = self.batches.remove(&batch) else {
            return;
        };
        for r in &b.held {
            if let Some(set) = self.held_for.get_mut(&r.owner) {
                set.remove(&batch);
                if set.is_empty() {
                    self.held_for.remove(&r.owner);
                }
            }
        }
        if b.failed {
            self.writes_failing = true;
            let attempt = u32::try_from(b.delivery_count.saturating_sub(1)).unwrap_or(u32::MAX);
            b.offer.settle(
                cx,
                AckKind::Nak {
                    delay: backoff(attempt),
                },
            );
        } else if b.deferred {
            self.writes_failing = false;
            b.offer.settle(
                cx,
                AckKind::Nak {
                    delay: backpressure_delay(b.delivery_count),
                },
            );
        } else {
            self.writes_failing = false;
            b.offer.settle(cx, AckKind::Ack);
        }
    }
}

/// A direct copy that was not stored frees its place in the owner's DLV bound.
fn unstored(path: CopyPath, owner: &AgentId) -> Option<FanoutStep> {
    (path == CopyPath::Direct).then(|| FanoutStep::DirectUnstored(owner.clone()))
}

/// The record fan-out routes `seq` by: the record itself when its current interval admits `seq`,
/// else a view of the closed generation whose interval does (G2 on the fan-out side).
///
/// Without it, a message that fan-out reaches only after its member left **and rejoined** would be
/// judged by the new generation's interval alone and never routed, although it lies in the old
/// generation's window (the reference loses it). The view carries the old generation, so the
/// entry's msg-id and the reader's check both use that generation.
fn routing_view(rec: &MembershipRecord, seq: u64) -> Cow<'_, MembershipRecord> {
    if crate::registry::durable_eligible(rec, seq) {
        return Cow::Borrowed(rec);
    }
    let closed = crate::registry::closed_intervals(rec)
        .into_iter()
        .find(|c| c.interval().contains(seq));
    match closed {
        Some(c) => {
            let mut view = rec.clone();
            view.generation = c.generation;
            view.join_cursor = c.join_cursor;
            view.leave_cursor = Some(c.leave_cursor);
            view.state = MemberState::LiveConfirmed;
            Cow::Owned(view)
        }
        None => Cow::Borrowed(rec),
    }
}
