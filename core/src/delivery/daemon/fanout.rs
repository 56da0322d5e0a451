//! Fan-out: every CHAT delivery is routed against the in-memory views ([`route()`]) into dinbox
//! copies, one batch per delivery, acked once every copy is stored (semantics §2, life cycle
//! step 4 in [`super`]).
//!
//! [`Fanout`] owns the batches, the highest CHAT sequence received (the fan-out part of a join's
//! fence), the per-owner back-pressure (the reader consumer's backlog, [`InboxBacklog`]; the
//! copies held for an owner at [`DINBOX_HIGH_WATER`]; the owners in a back-pressure episode),
//! whether writes are failing (health), and the op ids it issued: the dinbox publishes
//! (`JsPublish`) and the reads of the reader consumer's unread total (`ConsumerInfo`). It settles
//! CHAT deliveries itself ([`Ctx::settle`]) and sets [`Timer::HeldCopies`].
//!
//! Inputs from the parent: a fan-out delivery (with the views lent), a completion of one of its
//! ops, the timer, and [`Fanout::settled`] when the reader settled an owner's dinbox entry (which
//! may release held copies). Read by the parent: [`Fanout::high`] (a join's fence),
//! [`Fanout::legacy_known`] (the fan-out consumer opens once the backlog is known),
//! [`Fanout::writes_failing`] (health).
//!
//! # Decisions
//!
//! - **Per-owner caps (G6).** The daemon counts, per owner, entries it stored minus entries the
//!   reader settled since it started. Crossing [`MAX_MSGS_PER_SUBJECT`](crate::constants::MAX_MSGS_PER_SUBJECT) reports
//!   [`DeliveryEvent::DinboxCapReached`]: older entries of that owner are about to be discarded by
//!   the INBOX stream. The count is a lower bound (entries written before this daemon started are
//!   not counted).

use super::config::{DINBOX_HIGH_WATER, FANOUT_HOLD_LIMIT, backpressure_delay};
use super::context::Ctx;
use super::events::{DeliveryEvent, FanoutAnomaly};
use super::types::{BatchId, Timer, outcome_detail};
use super::views::Views;
use crate::constants::backoff;
use crate::delivery::backlog::{BACKLOG_RECHECK, InboxBacklog, OWNER_CAP};
use crate::delivery::route::{MentionSkipReason, Routed, route};
use crate::io::{AckKind, Command, Reply};
use crate::ledger::DeliveryId;
use crate::op::{OpId, Outcome};
use crate::time::{Instant, Now};
use crate::wire::config::ConsumerSpec;
use crate::wire::json;
use crate::wire::message::CotalMessage;
use crate::wire::records::{MemberState, MembershipRecord};
use crate::wire::shard::Shard;
use crate::wire::subject::Subject;
use crate::wire::token::{AgentId, ConcreteChannel, Space};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

/// One CHAT delivery being fanned out.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FanoutBatch {
    delivery: DeliveryId,
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
}

/// An op fan-out issued.
#[derive(Clone, Debug, PartialEq, Eq)]
enum FanoutOp {
    /// A dinbox copy of a batch.
    Copy {
        batch: BatchId,
        owner: AgentId,
        generation: u64,
    },
    /// A read of the reader consumer's unread total.
    InboxBacklog,
}

/// The fan-out child of [`super::Delivery`].
#[derive(Debug)]
pub(super) struct Fanout {
    space: Space,
    shard: Shard,
    /// [`super::DeliveryConfig::reference_gap_g17`].
    reference_gap_g17: bool,
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
    pub(super) fn new(space: Space, shard: Shard, reference_gap_g17: bool) -> Self {
        Fanout {
            space,
            shard,
            reference_gap_g17,
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

    /// A completion of one of fan-out's ops. True when it was the read of the reader
    /// consumer's unread total (the parent may open the fan-out consumer now).
    pub(super) fn on_completion(
        &mut self,
        cx: &mut Ctx,
        op: OpId,
        outcome: Outcome<Reply>,
    ) -> bool {
        match self.pending.remove(&op) {
            Some(FanoutOp::Copy {
                batch,
                owner,
                generation,
            }) => {
                self.on_copy_stored(cx, batch, owner, generation, outcome);
                false
            }
            Some(FanoutOp::InboxBacklog) => {
                self.on_inbox_backlog(cx, outcome);
                true
            }
            None => false,
        }
    }

    /// The lease is gone: the deliveries of the batches still held, in order (the parent hands
    /// them back). Answers in flight still arrive (and find no batch).
    pub(super) fn stop(&mut self, cx: &mut Ctx) -> Vec<DeliveryId> {
        let held = self.batches.values().map(|b| b.delivery).collect();
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
    }

    /// A CHAT delivery of the fan-out consumer: routed against `views`, its copies written (or
    /// held for an owner at the high water), settled once all are stored.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_delivery(
        &mut self,
        cx: &mut Ctx,
        views: &Views,
        live: bool,
        now: Now,
        delivery: DeliveryId,
        seq: u64,
        delivery_count: u64,
        subject: &str,
        payload: &[u8],
    ) {
        self.high = self.high.max(seq);
        let space = &self.space;
        let (sender, channel) = match Subject::parse(subject) {
            Ok(Subject::Chat {
                space: s,
                sender,
                channel,
            }) if &s == space => (sender, channel),
            _ => return self.fanout_anomaly(cx, delivery, seq, subject, FanoutAnomaly::NotChat),
        };
        let msg = match CotalMessage::decode(payload) {
            Ok(m) => m,
            Err(e) => {
                let a = FanoutAnomaly::Undecodable(e.to_string());
                return self.fanout_anomaly(cx, delivery, seq, subject, a);
            }
        };
        if msg.from.id != sender {
            let a = FanoutAnomaly::Spoofed {
                sender,
                claimed: msg.from.id.clone(),
            };
            return self.fanout_anomaly(cx, delivery, seq, subject, a);
        }
        let shard = self.shard;
        let class = views
            .channels
            .policy_for(&channel.as_channel())
            .delivery_class;
        let roster = &views.roster;
        let acls = &views.acls;
        let reference_g17 = self.reference_gap_g17;
        let views: Vec<Cow<'_, MembershipRecord>> = views
            .members
            .channel(&channel)
            .map(|r| routing_view(r, seq))
            .collect();
        let decision = route(
            &msg,
            &channel,
            seq,
            class,
            views.iter().map(|v| v.as_ref()),
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
            return cx.settle(delivery, AckKind::Ack);
        }
        // Per-owner back-pressure (G6): INBOX keeps the newest 1000 entries of an owner, so a
        // copy written while 1000 newer ones wait for the reader is discarded unread. An owner at
        // the high water gets its copy from this very delivery, held until the reader drained.
        let (entries, held): (Vec<Routed>, Vec<Routed>) = entries
            .into_iter()
            .partition(|r| self.inbox.admits(&r.owner));
        self.next_batch += 1;
        let batch = self.next_batch;
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
                delivery,
                seq,
                delivery_count,
                channel,
                outstanding: 0,
                failed: false,
                held,
                held_since,
                deferred: false,
            },
        );
        for routed in entries {
            self.publish_copy(cx, batch, routed);
        }
    }

    /// Writes one routed copy of fan-out batch `batch` to its owner's dinbox.
    fn publish_copy(&mut self, cx: &mut Ctx, batch: BatchId, routed: Routed) {
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
        };
        b.outstanding += 1;
        let subject = Subject::Dinbox {
            space: self.space.clone(),
            owner: routed.owner.clone(),
        }
        .to_string();
        let msg_id = routed.msg_id().to_string();
        let payload = json::encode(&routed.entry);
        let op = cx.op();
        self.pending.insert(
            op,
            FanoutOp::Copy {
                batch,
                owner: routed.owner,
                generation: routed.entry.generation,
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
            self.publish_copy(cx, batch, routed);
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
        delivery: DeliveryId,
        seq: u64,
        subject: &str,
        anomaly: FanoutAnomaly,
    ) {
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

    fn on_copy_stored(
        &mut self,
        cx: &mut Ctx,
        batch: BatchId,
        owner: AgentId,
        generation: u64,
        outcome: Outcome<Reply>,
    ) {
        let ok = match outcome {
            Outcome::Success(Reply::PubAck(ack)) => {
                self.stored(cx, &owner, ack.duplicate);
                None
            }
            Outcome::Failed(f) => Some(Some(f)),
            _ => Some(None),
        };
        let Some(b) = self.batches.get_mut(&batch) else {
            return;
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
            cx.settle(
                b.delivery,
                AckKind::Nak {
                    delay: backoff(attempt),
                },
            );
        } else if b.deferred {
            self.writes_failing = false;
            cx.settle(
                b.delivery,
                AckKind::Nak {
                    delay: backpressure_delay(b.delivery_count),
                },
            );
        } else {
            self.writes_failing = false;
            cx.settle(b.delivery, AckKind::Ack);
        }
    }
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
