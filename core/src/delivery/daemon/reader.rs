//! The reader: every dinbox entry of this shard's owners is authorized against the in-memory
//! ACL and membership views ([`judge`], around [`authorize()`]), transferred to `dlv.<owner>`
//! and acked only after the DLV PubAck (I21); an owner whose DLV backlog is full waits, or is
//! shed ([`DlvBacklog`]). Since fan-out writes the copies it may transfer straight to DLV
//! (`fanout.rs`), the dinbox holds the spill, catch-up copies and what an earlier daemon left;
//! the DLV gate is the reader's still, and fan-out's direct copies pass it too
//! ([`Reader::admit_direct`]).
//!
//! [`Reader`] owns the transfers in flight (by dinbox delivery), the DLV backlog bookkeeping and
//! the op ids it issued: the DLV publishes (`JsPublish`) and the DLV consumer reads
//! (`ConsumerInfo`). It emits its own events. What touches the rest of the daemon comes back to
//! the parent as [`ReaderStep`]s, applied in order: a settle of the dinbox delivery, an entry
//! settled for an owner (the fan-out's inbox backlog, which may release held copies), a loss for
//! the loss notices, a transfer to check against the current ACL (the sweeper).
//!
//! Order: within one call the reader issues its own commands before any step that issues one,
//! so the parent applying the steps afterwards issues every command in the order a single
//! machine did.

use super::context::Ctx;
use super::events::DeliveryEvent;
use super::index::{AclIndex, MemberIndex};
use super::types::{BatchId, outcome_detail};
use crate::delivery::authorize::{
    Decision, DropReason, after_transfer_failure, authorize, decode_entry, dlv_payload,
    hold_for_leave,
};
use crate::delivery::backlog::{DlvAdmit, DlvBacklog, DlvRead};
use crate::delivery::losses::LossReason;
use crate::io::{AckKind, Command, Reply};
use crate::ledger::DeliveryId;
use crate::op::{OpId, Outcome};
use crate::registry::{current_interval, durable_eligible};
use crate::wire::config::ConsumerSpec;
use crate::wire::records::{Plane3Entry, Plane3Reason};
use crate::wire::shard::Shard;
use crate::wire::subject::Subject;
use crate::wire::token::{AgentId, ConcreteChannel, Space};
use std::collections::BTreeMap;

/// A transfer in flight (or waiting for room in the owner's DLV).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Transfer {
    delivery_count: u64,
    owner: AgentId,
    entry: Plane3Entry,
    /// The DLV copy's msg-id (the reader's decision).
    msg_id: String,
}

/// A dinbox entry read back from INBOX because the reader consumer had offered it to a feed
/// that is gone ([`crate::delivery::stranded`]): transferred if the decision and the DLV gate
/// let it, with nothing to settle, counted or reported. The consumer's redelivery of the entry
/// is decided as any delivery, and its copy collapses on the msg-id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ReadBack {
    owner: AgentId,
    entry: Plane3Entry,
    msg_id: String,
}

/// An op the reader issued.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ReaderOp {
    /// The DLV publish of a transfer.
    Transfer { delivery: DeliveryId },
    /// The DLV publish of a read-back entry.
    ReadBack { id: u64 },
    /// A read of an owner's `dlv_<owner>` consumer; `in_flight` of the owner's transfers were
    /// published and unacknowledged when it was sent (the read may or may not see them).
    DlvBacklog { owner: AgentId, in_flight: u64 },
}

/// What waits in the DLV gate for a read of the owner's consumer: a reader transfer, or a copy
/// fan-out parked there (its batch) before writing it straight to DLV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waiter {
    Transfer(DeliveryId),
    Direct(BatchId),
    ReadBack(u64),
}

/// The gate's answer to a copy fan-out would write straight to DLV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DirectAdmit {
    /// Write it now (counted in the owner's DLV bound and as in flight).
    Write,
    /// Parked until the owner's consumer was read: [`ReaderStep::WriteDirect`] or
    /// [`ReaderStep::ShedDirect`] follows.
    Parked,
}

/// What the reader asks of the parent, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ReaderStep {
    /// An entry of `owner`'s dinbox is settled (one fewer unread): fan-out's inbox backlog.
    Settled(AgentId),
    /// Settle the dinbox delivery.
    Settle(DeliveryId, AckKind),
    /// A copy is lost to its owner: the loss notices.
    Lost {
        owner: AgentId,
        channel: ConcreteChannel,
        seq: u64,
        reason: LossReason,
    },
    /// A transfer to `owner`'s DLV completed: sweep again if the current ACL no longer admits
    /// `channel`.
    SweepIfRevoked {
        owner: AgentId,
        channel: ConcreteChannel,
    },
    /// The read let fan-out's parked copy of `batch` for `owner` in: write it now.
    WriteDirect { batch: BatchId, owner: AgentId },
    /// The read found no room for fan-out's parked copy of `batch` for `owner`: shed it (a
    /// reported loss; the owner's DLV holds `unread` unread copies).
    ShedDirect {
        batch: BatchId,
        owner: AgentId,
        unread: u64,
    },
}

/// The reader child of [`super::Delivery`].
#[derive(Debug)]
pub(super) struct Reader {
    space: Space,
    shard: Shard,
    /// [`super::DeliveryConfig::reference_gap_g2`].
    reference_gap_g2: bool,
    transfers: BTreeMap<DeliveryId, Transfer>,
    /// The DLV gate: per-owner bounds, and what waits for a read (transfers and fan-out's
    /// parked copies, in order).
    dlv: DlvBacklog<Waiter>,
    /// Fan-out's copies admitted by the gate and not yet stored, per owner (a read counts them
    /// as possibly unseen).
    direct_in_flight: BTreeMap<AgentId, u64>,
    /// Entries read back, waiting in the gate or published, by their own id.
    read_backs: BTreeMap<u64, ReadBack>,
    next_read_back: u64,
    pending: BTreeMap<OpId, ReaderOp>,
    /// The INBOX sequence of every delivery of the reader consumer not yet settled (what the
    /// consumer's floor check must not read back).
    in_hand: BTreeMap<DeliveryId, u64>,
}

impl Reader {
    pub(super) fn new(space: Space, shard: Shard, reference_gap_g2: bool) -> Self {
        Reader {
            space,
            shard,
            reference_gap_g2,
            transfers: BTreeMap::new(),
            dlv: DlvBacklog::default(),
            direct_in_flight: BTreeMap::new(),
            read_backs: BTreeMap::new(),
            next_read_back: 0,
            pending: BTreeMap::new(),
            in_hand: BTreeMap::new(),
        }
    }

    /// Whether the reader holds the delivery of INBOX sequence `seq` unsettled.
    pub(super) fn holds(&self, seq: u64) -> bool {
        self.in_hand.values().any(|s| *s == seq)
    }

    /// The parent settled `delivery` (a [`ReaderStep::Settle`]).
    pub(super) fn delivery_settled(&mut self, delivery: DeliveryId) {
        self.in_hand.remove(&delivery);
    }

    /// Whether `op` is one of the reader's publishes or reads.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.pending.contains_key(&op)
    }

    /// The lease is gone: the deliveries of the transfers still held, in order (the parent hands
    /// them back). Answers in flight still arrive (and find no transfer).
    pub(super) fn stop(&mut self) -> Vec<DeliveryId> {
        let held = self.transfers.keys().copied().collect();
        self.transfers.clear();
        self.in_hand.clear();
        self.dlv.reset();
        self.direct_in_flight.clear();
        self.read_backs.clear();
        held
    }

    /// The connection is gone: the broker redelivers every unsettled entry; answers in flight
    /// are forgotten.
    pub(super) fn connection_lost(&mut self) {
        self.transfers.clear();
        self.in_hand.clear();
        self.dlv.reset();
        self.direct_in_flight.clear();
        self.read_backs.clear();
        self.pending.clear();
    }

    /// Fan-out would write its copy of `batch`, posted by `sender`, straight to `owner`'s DLV:
    /// the gate admits it now, or parks it behind a read of the owner's consumer (issued here
    /// when none is in flight), in order with the owner's other waiting copies.
    pub(super) fn admit_direct(
        &mut self,
        cx: &mut Ctx,
        owner: &AgentId,
        sender: &AgentId,
        batch: BatchId,
    ) -> DirectAdmit {
        match self.dlv.admit(owner, sender, Waiter::Direct(batch)).0 {
            DlvAdmit::Transfer => {
                *self.direct_in_flight.entry(owner.clone()).or_insert(0) += 1;
                DirectAdmit::Write
            }
            DlvAdmit::Wait { read } => {
                if read {
                    self.read_dlv(cx, owner.clone());
                }
                DirectAdmit::Parked
            }
        }
    }

    /// A copy admitted for fan-out ([`DirectAdmit::Write`], [`ReaderStep::WriteDirect`]) is
    /// settled: stored (at `Some(seq)` when it is a new copy), or not (its place in the owner's
    /// bound is given back).
    pub(super) fn direct_done(&mut self, owner: &AgentId, stored: bool, seq: Option<u64>) {
        if let Some(seq) = seq {
            self.dlv.stored(owner, seq);
        }
        if let Some(n) = self.direct_in_flight.get_mut(owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.direct_in_flight.remove(owner);
            }
        }
        if !stored {
            self.dlv.unstored(owner);
        }
    }

    /// A dinbox delivery of the reader consumer.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_delivery(
        &mut self,
        cx: &mut Ctx,
        acls: &AclIndex,
        members: &MemberIndex,
        leave_frontier: &dyn Fn(&AgentId, &ConcreteChannel) -> Option<u64>,
        delivery: DeliveryId,
        stream_seq: u64,
        delivery_count: u64,
        subject: &str,
        payload: &[u8],
    ) -> Vec<ReaderStep> {
        let mut steps = Vec::new();
        self.in_hand.insert(delivery, stream_seq);
        let (owner, entry) = match decode_entry(subject, payload) {
            Ok(x) => x,
            Err(anomaly) => {
                cx.counters.terminated += 1;
                if let Ok(Subject::Dinbox { owner, .. }) = Subject::parse(subject) {
                    // Settled all the same: one fewer unread entry of that owner.
                    steps.push(ReaderStep::Settled(owner));
                }
                steps.push(ReaderStep::Settle(delivery, AckKind::Term));
                cx.emit(DeliveryEvent::EntryTerminated {
                    subject: subject.to_owned(),
                    anomaly,
                });
                return steps;
            }
        };
        if !self.shard.owns(&owner) {
            // Another shard's reader (its own durable) handles this owner.
            steps.push(ReaderStep::Settle(delivery, AckKind::Ack));
            return steps;
        }
        let leave = leave_frontier(&owner, &entry.channel);
        let (decision, held_for_leave) = judge(
            acls,
            members,
            leave,
            self.reference_gap_g2,
            &owner,
            &entry,
            delivery_count,
        );
        if held_for_leave {
            cx.counters.held_for_leave += 1;
        }
        self.apply(
            cx,
            &mut steps,
            delivery,
            delivery_count,
            owner,
            entry,
            decision,
        );
        steps
    }

    /// A dinbox entry read back from INBOX ([`ReadBack`]): judged as its redelivery would be
    /// judged, and transferred when that is the decision and the gate admits it (parked behind
    /// a read like a transfer). Anything else is left to the redelivery: an anomaly, another
    /// shard's owner, a drop, a deferral, a shed copy.
    pub(super) fn on_read_back(
        &mut self,
        cx: &mut Ctx,
        acls: &AclIndex,
        members: &MemberIndex,
        leave_frontier: &dyn Fn(&AgentId, &ConcreteChannel) -> Option<u64>,
        subject: &str,
        payload: &[u8],
    ) {
        let Ok((owner, entry)) = decode_entry(subject, payload) else {
            return;
        };
        if !self.shard.owns(&owner) {
            return;
        }
        let leave = leave_frontier(&owner, &entry.channel);
        let (decision, _) = judge(
            acls,
            members,
            leave,
            self.reference_gap_g2,
            &owner,
            &entry,
            2,
        );
        let Decision::Transfer { msg_id } = decision else {
            return;
        };
        self.next_read_back += 1;
        let id = self.next_read_back;
        let sender = entry.msg.from.id.clone();
        let (admit, _) = self.dlv.admit(&owner, &sender, Waiter::ReadBack(id));
        let dlv_owner = owner.clone();
        self.read_backs.insert(
            id,
            ReadBack {
                owner,
                entry,
                msg_id: msg_id.to_string(),
            },
        );
        match admit {
            DlvAdmit::Transfer => self.publish_read_back(cx, id),
            DlvAdmit::Wait { read: false } => {}
            DlvAdmit::Wait { read: true } => self.read_dlv(cx, dlv_owner),
        }
    }

    /// Publishes an admitted read-back entry's DLV copy.
    fn publish_read_back(&mut self, cx: &mut Ctx, id: u64) {
        let Some(r) = self.read_backs.get(&id) else {
            return;
        };
        let command = dlv_publish(&self.space, &r.owner, &r.entry, &r.msg_id);
        let op = cx.op();
        self.pending.insert(op, ReaderOp::ReadBack { id });
        cx.push(command(op));
    }

    /// A read-back entry's DLV publish completed: a copy that landed goes to the sweeper like a
    /// transfer (the revocation window); one that did not gives its place in the owner's bound
    /// back. Nothing is counted as transferred: the entry's redelivery is.
    fn on_read_back_published(
        &mut self,
        cx: &mut Ctx,
        steps: &mut Vec<ReaderStep>,
        id: u64,
        outcome: Outcome<Reply>,
    ) {
        let Some(r) = self.read_backs.remove(&id) else {
            return;
        };
        match outcome {
            Outcome::Success(Reply::PubAck(ack)) => {
                if !ack.duplicate {
                    self.dlv.stored(&r.owner, ack.seq);
                }
                steps.push(ReaderStep::SweepIfRevoked {
                    owner: r.owner,
                    channel: r.entry.channel,
                });
            }
            _ => {
                cx.counters.stranded_reads_failed += 1;
                self.dlv.unstored(&r.owner);
            }
        }
    }

    /// A DLV publish or a DLV consumer read completed.
    pub(super) fn on_completion(
        &mut self,
        cx: &mut Ctx,
        op: OpId,
        outcome: Outcome<Reply>,
    ) -> Vec<ReaderStep> {
        let mut steps = Vec::new();
        match self.pending.remove(&op) {
            Some(ReaderOp::Transfer { delivery }) => {
                self.on_transfer(cx, &mut steps, delivery, outcome);
            }
            Some(ReaderOp::DlvBacklog { owner, in_flight }) => {
                self.on_dlv_backlog(cx, &mut steps, owner, in_flight, outcome);
            }
            Some(ReaderOp::ReadBack { id }) => {
                self.on_read_back_published(cx, &mut steps, id, outcome);
            }
            None => {}
        }
        steps
    }

    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        cx: &mut Ctx,
        steps: &mut Vec<ReaderStep>,
        delivery: DeliveryId,
        delivery_count: u64,
        owner: AgentId,
        entry: Plane3Entry,
        decision: Decision,
    ) {
        match decision {
            Decision::Transfer { msg_id } => {
                let sender = entry.msg.from.id.clone();
                let (admit, _) = self.dlv.admit(&owner, &sender, Waiter::Transfer(delivery));
                let dlv_owner = owner.clone();
                self.transfers.insert(
                    delivery,
                    Transfer {
                        delivery_count,
                        owner,
                        entry,
                        msg_id: msg_id.to_string(),
                    },
                );
                match admit {
                    DlvAdmit::Transfer => self.start_transfer(cx, delivery),
                    DlvAdmit::Wait { read: false } => {}
                    DlvAdmit::Wait { read: true } => self.read_dlv(cx, dlv_owner),
                }
            }
            Decision::Drop(reason) => {
                cx.counters.dropped += 1;
                if reason.is_loss() {
                    cx.counters.lost += 1;
                    steps.push(ReaderStep::Lost {
                        owner: owner.clone(),
                        channel: entry.channel.clone(),
                        seq: entry.seq,
                        reason: LossReason::IntervalForgotten,
                    });
                }
                steps.push(ReaderStep::Settled(owner.clone()));
                steps.push(ReaderStep::Settle(delivery, AckKind::Ack));
                cx.emit(DeliveryEvent::EntryDropped {
                    owner,
                    channel: entry.channel,
                    seq: entry.seq,
                    generation: entry.generation,
                    reason,
                });
            }
            Decision::Defer { delay, .. } => {
                cx.counters.deferred += 1;
                steps.push(ReaderStep::Settle(delivery, AckKind::Nak { delay }));
            }
            Decision::GiveUp(g) => {
                cx.counters.terminated += 1;
                cx.counters.lost += 1;
                steps.push(ReaderStep::Settled(owner));
                steps.push(ReaderStep::Settle(delivery, AckKind::Term));
                steps.push(ReaderStep::Lost {
                    owner: g.owner.clone(),
                    channel: g.channel.clone(),
                    seq: g.seq,
                    reason: LossReason::RedeliveryCeiling,
                });
                cx.emit(DeliveryEvent::EntryLost(g));
            }
            Decision::Terminate(anomaly) => {
                cx.counters.terminated += 1;
                steps.push(ReaderStep::Settled(owner.clone()));
                steps.push(ReaderStep::Settle(delivery, AckKind::Term));
                cx.emit(DeliveryEvent::EntryTerminated {
                    subject: Subject::Dinbox {
                        space: self.space.clone(),
                        owner,
                    }
                    .to_string(),
                    anomaly,
                });
            }
        }
    }

    /// Reads `owner`'s `dlv_<owner>` consumer for the gate. The copies of the owner published
    /// and not yet acknowledged (the reader's transfers and fan-out's direct copies) go with it:
    /// the read may not have seen them.
    fn read_dlv(&mut self, cx: &mut Ctx, owner: AgentId) {
        let consumer = ConsumerSpec::dlv(&self.space, &owner);
        let (transfers, read_backs) = (&self.transfers, &self.read_backs);
        let transferring = self
            .pending
            .values()
            .filter(|p| match p {
                ReaderOp::Transfer { delivery } => {
                    transfers.get(delivery).is_some_and(|t| t.owner == owner)
                }
                ReaderOp::ReadBack { id } => read_backs.get(id).is_some_and(|r| r.owner == owner),
                ReaderOp::DlvBacklog { .. } => false,
            })
            .count();
        let direct = self.direct_in_flight.get(&owner).copied().unwrap_or(0);
        let in_flight = u64::try_from(transferring)
            .unwrap_or(u64::MAX)
            .saturating_add(direct);
        let op = cx.op();
        self.pending
            .insert(op, ReaderOp::DlvBacklog { owner, in_flight });
        cx.push(Command::ConsumerInfo {
            op,
            stream: consumer.stream,
            consumer: consumer.name,
        });
    }

    /// Publishes an admitted transfer's DLV copy.
    fn start_transfer(&mut self, cx: &mut Ctx, delivery: DeliveryId) {
        let Some(t) = self.transfers.get(&delivery) else {
            return;
        };
        let command = dlv_publish(&self.space, &t.owner, &t.entry, &t.msg_id);
        let op = cx.op();
        self.pending.insert(op, ReaderOp::Transfer { delivery });
        cx.push(command(op));
    }

    fn on_transfer(
        &mut self,
        cx: &mut Ctx,
        steps: &mut Vec<ReaderStep>,
        delivery: DeliveryId,
        outcome: Outcome<Reply>,
    ) {
        let Some(t) = self.transfers.remove(&delivery) else {
            return;
        };
        steps.push(ReaderStep::SweepIfRevoked {
            owner: t.owner.clone(),
            channel: t.entry.channel.clone(),
        });
        match outcome {
            Outcome::Success(Reply::PubAck(ack)) => {
                if !ack.duplicate {
                    self.dlv.stored(&t.owner, ack.seq);
                }
                cx.counters.transferred += 1;
                steps.push(ReaderStep::Settled(t.owner));
                steps.push(ReaderStep::Settle(delivery, AckKind::Ack));
            }
            _ => {
                cx.counters.writes_failed += 1;
                self.dlv.unstored(&t.owner);
                let decision = after_transfer_failure(&t.entry, &t.owner, t.delivery_count);
                self.apply(
                    cx,
                    steps,
                    delivery,
                    t.delivery_count,
                    t.owner,
                    t.entry,
                    decision,
                );
            }
        }
    }

    fn on_dlv_backlog(
        &mut self,
        cx: &mut Ctx,
        steps: &mut Vec<ReaderStep>,
        owner: AgentId,
        in_flight: u64,
        outcome: Outcome<Reply>,
    ) {
        let read = match outcome {
            Outcome::Success(Reply::ConsumerState(state)) => Some(DlvRead::from(&state)),
            other => {
                cx.counters.backlog_unverified += 1;
                cx.emit(DeliveryEvent::BacklogUnverified {
                    owner: Some(owner.clone()),
                    detail: outcome_detail(&other),
                });
                None
            }
        };
        let verdict = self.dlv.read(&owner, read, in_flight);
        if let Some(risk) = verdict.at_risk
            && risk.began
        {
            cx.counters.dlv_at_risk += 1;
            cx.emit(DeliveryEvent::BackstopAtRisk {
                owner: owner.clone(),
                span: risk.span,
                unread: verdict.unread.unwrap_or(0),
            });
        }
        for waiter in verdict.admitted {
            match waiter {
                Waiter::Transfer(delivery) => self.start_transfer(cx, delivery),
                Waiter::ReadBack(id) => self.publish_read_back(cx, id),
                Waiter::Direct(batch) => {
                    *self.direct_in_flight.entry(owner.clone()).or_insert(0) += 1;
                    steps.push(ReaderStep::WriteDirect {
                        batch,
                        owner: owner.clone(),
                    });
                }
            }
        }
        for waiter in verdict.shed {
            let delivery = match waiter {
                Waiter::Transfer(delivery) => delivery,
                Waiter::ReadBack(id) => {
                    // No room now: the entry's redelivery decides (and reports a shed).
                    self.read_backs.remove(&id);
                    continue;
                }
                Waiter::Direct(batch) => {
                    steps.push(ReaderStep::ShedDirect {
                        batch,
                        owner: owner.clone(),
                        unread: verdict.unread.unwrap_or(0),
                    });
                    continue;
                }
            };
            let Some(t) = self.transfers.remove(&delivery) else {
                continue;
            };
            cx.counters.dlv_shed += 1;
            cx.counters.lost += 1;
            steps.push(ReaderStep::Settled(t.owner.clone()));
            steps.push(ReaderStep::Settle(delivery, AckKind::Ack));
            steps.push(ReaderStep::Lost {
                owner: t.owner.clone(),
                channel: t.entry.channel.clone(),
                seq: t.entry.seq,
                reason: LossReason::DlvFull,
            });
            cx.emit(DeliveryEvent::CopyShed {
                owner: t.owner,
                channel: t.entry.channel,
                seq: t.entry.seq,
                generation: t.entry.generation,
                unread: verdict.unread.unwrap_or(0),
            });
        }
    }
}

/// The DLV publish of a dinbox entry's copy for `owner` under `msg_id` (a transfer or a
/// read-back), given its op id.
fn dlv_publish(
    space: &Space,
    owner: &AgentId,
    entry: &Plane3Entry,
    msg_id: &str,
) -> impl FnOnce(OpId) -> Command {
    let subject = Subject::Dlv {
        space: space.clone(),
        owner: owner.clone(),
    }
    .to_string();
    let payload = dlv_payload(entry);
    let msg_id = msg_id.to_owned();
    move |op| Command::JsPublish {
        op,
        subject,
        msg_id: Some(msg_id),
        headers: Vec::new(),
        payload,
    }
}

/// The one decision for a copy of `owner`'s, in one place for both hops: [`authorize`] against
/// the owner's current ACL and the membership record of the entry's channel as the views hold
/// them now (the interval of the entry's own generation, G2), the reference's current-interval
/// rule when switched back on (test only), then the hold for a leave whose tombstone is in
/// flight ([`hold_for_leave`], `leave_frontier`). Returns the decision and whether it is such a
/// hold (a deferral, counted by the reader in `held_for_leave`).
///
/// The reader applies it to every dinbox entry. Fan-out applies it to every copy it routes and
/// writes straight to DLV only a copy it would transfer; every other copy goes to the dinbox,
/// where the reader decides it again with its own delivery count.
pub(super) fn judge(
    acls: &AclIndex,
    members: &MemberIndex,
    leave_frontier: Option<u64>,
    reference_gap_g2: bool,
    owner: &AgentId,
    entry: &Plane3Entry,
    delivery_count: u64,
) -> (Decision, bool) {
    let acl = acls.get(owner).map(|v| &v.read);
    let record = members.get(&entry.channel, owner);
    let mut decision = authorize(entry, owner, acl, record, delivery_count);
    if reference_gap_g2
        && entry.reason == Plane3Reason::DurableChannel
        && matches!(decision, Decision::Transfer { .. })
        && let Some(rec) = record
        && !durable_eligible(rec, entry.seq)
    {
        // The reference's reader: the current interval only (G2 switched back on).
        decision = Decision::Drop(match current_interval(rec) {
            Some(interval) => DropReason::OutsideInterval(interval),
            None => DropReason::InertGeneration {
                generation: rec.generation,
            },
        });
    }
    if matches!(decision, Decision::Transfer { .. })
        && let Some(held) = hold_for_leave(entry, owner, leave_frontier, delivery_count)
    {
        let deferred = matches!(held, Decision::Defer { .. });
        return (held, deferred);
    }
    (decision, false)
}
