//! The membership book: everything the agent knows about its durable memberships, one record
//! per concrete channel, kept for the life of the agent.
//!
//! A membership is not a join: it can outlive the join of its channel (an unclosed record after
//! a refusal, a membership a leave could not tombstone, an earlier life's orphan), and exist for
//! a channel this life never joined. So it is not kept inside the channel's join state: the
//! channel machines (`channel/`) hold what a join holds (phase, epoch, subscription, watermark,
//! join progress, backfill, backstop), and [`Members`] holds, per concrete channel, what the
//! membership protocol holds:
//!
//! - the **mirror** of established memberships (channel → generation; [`Members::mirror`] is
//!   the map [`super::Agent::memberships`] returns);
//! - a [`Member`] record: whether the channel held or may hold a membership in this life
//!   (`maybe`), the refusal close still to do (`unclosed`), whether a close or a reconcile
//!   request is in flight, and the channel's timer slot;
//! - the membership audit's state (the audit in flight, what changed since it was sent, whether
//!   this life listed its memberships);
//! - the deadlines of the reconciles, the closes and the audit (its own timer table; the parent
//!   takes the minimum with its own).
//!
//! The book decides everything about a membership; the parent routes. What the parent calls,
//! and what comes back (the record helpers are private to the book and its two files):
//!
//! | flow (file) | the parent calls | the book answers |
//! | --- | --- | --- |
//! | durable join (`join`) | `adoptable`, `request_durable_join`, `on_durable_join` (with the machine's staying / attempts) | the membership a commit adopts; a `JoinVerdict` (`Ignore`, `Established`, `Unavailable`) the parent applies to the machine |
//! | reconcile (`join`) | `reconcile_due` (with the machine's leaving), `reconcile` (with its cursor), `cancel_reconcile` | whether to ask the machine for an attempt; the durable join is sent by the book |
//! | audit (here) | `start_audit`, `on_audit` (lending the channel map as two functions), `membership_lost`, `close_orphan` | an `AuditVerdict`; the reason to degrade a lost channel's machine with |
//! | leave (`leave`) | `tombstone_for`, `request_tombstone`, `on_list_for_leave`, `on_durable_leave` (with the machine's leaving / joined), `tombstone_failed`, `leave_failed` | the membership to tombstone; a `ListVerdict` (`Tombstone`, `Finish`, `Fail`); a `TombstoneVerdict` (`Closed`, `Failed`, each with a reason to degrade the machine) |
//! | late refusal (`leave`) | `refused`, then `close_refused` | the generation being closed (reported by the parent with the refusal) |
//! | refusal close (here) | `try_close`, `on_list_for_close`, `on_close_timer` | nothing: the book retries and reports it itself |
//!
//! The book runs the audit itself ([`Members::start_audit`], [`Members::on_audit`]: it owns
//! the `listMemberships` requests of the audits and judges the answer against the parent's
//! channel map, which the parent lends as two functions) and hands the parent a verdict to act
//! on (re-establish a lost membership, close an orphan).
//!
//! The book runs the refusal close too (`start_close`, [`Members::try_close`]): it issues and
//! owns the close's `listMemberships` and `durableLeave`, answers the list itself, and judges
//! the `durableLeave` answer together with a leave's tombstone (both may concern a joined
//! channel, `leave`): the parent takes the op ([`Members::take_close_op`]) and routes it there.
//!
//! # Membership audit (issue 15 item 4, G12)
//!
//! The mirror is not trusted forever: at every ready connection and every
//! [`AgentConfig::membership_audit`](super::AgentConfig::membership_audit) the agent lists its
//! memberships (`listMemberships`) and reconciles:
//!
//! - a joined channel whose mirrored generation has no open record any more (purged or
//!   tombstoned out of band, a registry wipe) leaves the mirror, turns
//!   [`BackstopState::Degraded`](super::BackstopState::Degraded) with a reason, is reported
//!   ([`AgentEvent::MembershipLost`], [`AgentCounters::memberships_lost`](super::AgentCounters::memberships_lost))
//!   and is re-established by the reconcile (a new generation, join cursor = the armed
//!   watermark, so the gap is caught up). `Established` is never shown for a membership the
//!   daemon no longer has;
//! - an open membership of a channel this life does not join (an earlier life's, G12) is
//!   reported ([`AgentEvent::MembershipOrphaned`]) and tombstoned through the refusal-close path
//!   (retried, visible in [`AgentHealth::unclosed`](super::AgentHealth::unclosed),
//!   [`AgentEvent::MembershipClosed`] at the end);
//! - a channel whose mirror or membership changed while the list was in flight is not judged
//!   from that (possibly older) snapshot; the next audit looks again.

use super::ctx::{Ctx, Link, bump};
use super::state::decode_list_reply;
use super::types::{AgentEvent, Unclosed};
use crate::constants::{REQUEST_DELIVERY_TIMEOUT, backoff};
use crate::io::Reply;
use crate::op::{OpId, Outcome, TimerTable};
use crate::time::{Instant, Now};
use crate::wire::control::{DeliveryRequest, ListMembershipsReply};
use crate::wire::token::ConcreteChannel;
use std::collections::{BTreeMap, BTreeSet};

pub(super) mod join;
pub(super) mod leave;

/// One concrete channel's membership record (beside its mirrored generation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Member {
    /// The channel's timer slot (allocated at its first timer, never reused).
    slot: Option<u64>,
    /// The channel held, or may hold, a membership in this life: established once, or a durable
    /// join whose outcome was unknown (it may have been applied, R10). A leave never skips its
    /// tombstone, and a refusal closes it even without a mirrored generation (G41, G42).
    maybe: bool,
    /// A membership to close after a refusal (`pendingDurableLeave`).
    unclosed: Option<Unclosed>,
    /// A close request is in flight.
    close_in_flight: bool,
    /// A reconcile (durable join) request is in flight.
    reconcile_in_flight: bool,
}

/// The deadlines of the book, in the order the parent's timers name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum MemberTimer {
    /// Re-establish the backstop of the channel in this slot.
    Reconcile(u64),
    /// Retry the refusal close of the channel in this slot.
    Close(u64),
    /// Audit the mirror.
    Audit,
}

/// A refusal close's request in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum CloseOp {
    /// `listMemberships`, to learn the generation to close.
    List(ConcreteChannel),
    /// `durableLeave` of this generation (its answer is judged by the parent, with a leave's).
    Leave(ConcreteChannel, u64),
}

/// The membership book. See the module docs.
#[derive(Debug, Default)]
pub(super) struct Members {
    /// The local mirror of established memberships (`plane3Channels`).
    pub(super) mirror: BTreeMap<ConcreteChannel, u64>,
    records: BTreeMap<ConcreteChannel, Member>,
    /// Slot `s` is `slots[s - 1]`.
    slots: Vec<ConcreteChannel>,
    /// A `listMemberships` reply was decoded in this life: from then on every membership that
    /// can exist is known (listed, or opened by a join of this life and so `maybe`). Until then
    /// an earlier life's membership may be open, so "no responders" proves nothing (G42 across a
    /// restart).
    listed: bool,
    /// The membership audit in flight (its number), if any.
    audit_in_flight: Option<u64>,
    /// Audits sent so far (numbers the in-flight one).
    audits: u64,
    /// Channels whose mirror or membership changed since the audit in flight was sent: its
    /// snapshot may predate the change, so they are not judged from it.
    touched_since_audit: BTreeSet<ConcreteChannel>,
    /// The audits' `listMemberships` requests in flight, with the audit each belongs to.
    audit_ops: BTreeMap<OpId, u64>,
    /// The refusal closes' requests in flight.
    close_ops: BTreeMap<OpId, CloseOp>,
    /// The durable joins in flight (a post-commit plan's or a reconcile's), with their channel
    /// and join cursor.
    join_ops: BTreeMap<OpId, (ConcreteChannel, Option<u64>)>,
    /// The leaves' `durableLeave`s in flight, with their channel and generation.
    tombstone_ops: BTreeMap<OpId, (ConcreteChannel, u64)>,
    timers: TimerTable<MemberTimer>,
}

/// What an audit found: mirrored memberships of joined channels whose record is gone (`lost`),
/// and open memberships of channels this life does not hold (`orphans`), each with its
/// generation.
#[derive(Debug, Default)]
pub(super) struct AuditVerdict {
    pub(super) lost: Vec<(ConcreteChannel, u64)>,
    pub(super) orphans: Vec<(ConcreteChannel, u64)>,
}

impl Members {
    fn record(&mut self, channel: &ConcreteChannel) -> &mut Member {
        self.records.entry(channel.clone()).or_default()
    }

    /// Whether the channel held, or may hold, a membership in this life.
    fn is_maybe(&self, channel: &ConcreteChannel) -> bool {
        self.records.get(channel).is_some_and(|m| m.maybe)
    }

    /// Marks the channel as (possibly) holding a membership in this life.
    fn mark_maybe(&mut self, channel: &ConcreteChannel) {
        self.record(channel).maybe = true;
    }

    /// The refusal close pending for the channel.
    fn unclosed(&self, channel: &ConcreteChannel) -> Option<&Unclosed> {
        self.records.get(channel).and_then(|m| m.unclosed.as_ref())
    }

    /// The refusal close pending for the channel, to update.
    fn unclosed_mut(&mut self, channel: &ConcreteChannel) -> Option<&mut Unclosed> {
        self.records
            .get_mut(channel)
            .and_then(|m| m.unclosed.as_mut())
    }

    /// Records a refusal close to do (replacing one pending).
    fn set_unclosed(&mut self, unclosed: Unclosed) {
        let channel = unclosed.channel.clone();
        self.record(&channel).unclosed = Some(unclosed);
    }

    /// Drops the channel's pending refusal close, returning it.
    fn take_unclosed(&mut self, channel: &ConcreteChannel) -> Option<Unclosed> {
        self.records
            .get_mut(channel)
            .and_then(|m| m.unclosed.take())
    }

    /// Every pending refusal close, by channel.
    pub(super) fn unclosed_all(&self) -> impl Iterator<Item = &Unclosed> {
        self.records.values().filter_map(|m| m.unclosed.as_ref())
    }

    /// Whether a close request of the channel is in flight.
    fn close_in_flight(&self, channel: &ConcreteChannel) -> bool {
        self.records.get(channel).is_some_and(|m| m.close_in_flight)
    }

    /// Sets whether a close request of the channel is in flight.
    fn set_close_in_flight(&mut self, channel: &ConcreteChannel, on: bool) {
        if on || self.records.contains_key(channel) {
            self.record(channel).close_in_flight = on;
        }
    }

    /// Whether a reconcile request of the channel is in flight.
    fn reconcile_in_flight(&self, channel: &ConcreteChannel) -> bool {
        self.records
            .get(channel)
            .is_some_and(|m| m.reconcile_in_flight)
    }

    /// Sets whether a reconcile request of the channel is in flight.
    fn set_reconcile_in_flight(&mut self, channel: &ConcreteChannel, on: bool) {
        if on || self.records.contains_key(channel) {
            self.record(channel).reconcile_in_flight = on;
        }
    }

    /// Nothing about the channel is in motion: no reconcile, no close in flight, no close
    /// pending. The audit judges only such channels.
    fn settled(&self, channel: &ConcreteChannel) -> bool {
        self.records
            .get(channel)
            .is_none_or(|m| !m.reconcile_in_flight && !m.close_in_flight && m.unclosed.is_none())
    }

    /// The channel's timer slot, allocated at first use.
    fn slot(&mut self, channel: &ConcreteChannel) -> u64 {
        if let Some(s) = self.slot_of(channel) {
            return s;
        }
        let s = self.slots.len() as u64 + 1;
        self.slots.push(channel.clone());
        self.record(channel).slot = Some(s);
        s
    }

    /// The channel's timer slot, if it has one.
    fn slot_of(&self, channel: &ConcreteChannel) -> Option<u64> {
        self.records.get(channel).and_then(|m| m.slot)
    }

    /// The channel of a timer slot.
    pub(super) fn channel_of(&self, slot: u64) -> Option<ConcreteChannel> {
        let index = usize::try_from(slot.checked_sub(1)?).ok()?;
        self.slots.get(index).cloned()
    }

    /// Sets (or moves) a deadline.
    fn set_timer(&mut self, timer: MemberTimer, at: Instant) {
        self.timers.set(timer, at);
    }

    /// Cancels a deadline.
    pub(super) fn cancel_timer(&mut self, timer: MemberTimer) {
        self.timers.cancel(&timer);
    }

    /// Cancels the channel's reconcile (its join ended).
    pub(super) fn cancel_reconcile(&mut self, channel: &ConcreteChannel) {
        if let Some(slot) = self.slot_of(channel) {
            self.cancel_timer(MemberTimer::Reconcile(slot));
        }
    }

    /// Clears every deadline (the agent stopped).
    pub(super) fn clear_timers(&mut self) {
        self.timers = TimerTable::new();
    }

    /// The earliest deadline.
    pub(super) fn poll_timeout(&self) -> Option<(Instant, MemberTimer)> {
        self.timers.next().map(|(at, t)| (at, *t))
    }

    /// Decodes a `listMemberships` answer; a good one marks this life's memberships as listed.
    fn decode_list(&mut self, outcome: Outcome<Reply>) -> Result<ListMembershipsReply, String> {
        let list = decode_list_reply(outcome)?;
        self.listed = true;
        Ok(list)
    }

    /// Whether `op` is one of the audit's requests.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.audit_ops.contains_key(&op)
    }

    /// The connection is gone: the audit in flight is moot (its answer is ignored); the next
    /// ready connection audits.
    pub(super) fn on_lost(&mut self) {
        self.timers.cancel(&MemberTimer::Audit);
        self.audit_in_flight = None;
    }

    /// Lists our memberships to re-validate the mirror (at every ready connection and every
    /// [`super::AgentConfig::membership_audit`]). One audit at a time; a stale one's answer is
    /// ignored.
    pub(super) fn start_audit(&mut self, cx: &mut Ctx) {
        if !cx.config.durable_backstop || cx.stopped || cx.link != Link::Ready {
            return;
        }
        self.timers.cancel(&MemberTimer::Audit);
        self.audits = self.audits.saturating_add(1);
        let audit = self.audits;
        self.audit_in_flight = Some(audit);
        self.touched_since_audit.clear();
        if let Some(op) =
            cx.control_request(&DeliveryRequest::ListMemberships, REQUEST_DELIVERY_TIMEOUT)
        {
            self.audit_ops.insert(op, audit);
        }
    }

    /// The answer to the audit request `op`: schedules the next audit and judges the mirror
    /// against the list. `joined(c)`: the channel is joined with no leave in progress;
    /// `held(c)`: the channel has an entry in the parent's channel map. A channel whose mirror or
    /// membership changed while the list was in flight, or with a reconcile or close in motion,
    /// is not judged from this snapshot. `None` for a stale or failed audit.
    pub(super) fn on_audit(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        op: OpId,
        outcome: Outcome<Reply>,
        joined: impl Fn(&ConcreteChannel) -> bool,
        held: impl Fn(&ConcreteChannel) -> bool,
    ) -> Option<AuditVerdict> {
        let audit = self.audit_ops.remove(&op)?;
        if self.audit_in_flight != Some(audit) {
            return None;
        }
        self.audit_in_flight = None;
        if let Some(every) = cx.config.membership_audit
            && !cx.stopped
        {
            self.timers.set(MemberTimer::Audit, now.at + every);
        }
        let list = match self.decode_list(outcome) {
            Ok(list) => list,
            Err(_) => {
                bump(&mut cx.counters.membership_audit_failures);
                return None;
            }
        };
        bump(&mut cx.counters.membership_audits);
        let open: BTreeMap<ConcreteChannel, u64> = list
            .memberships
            .iter()
            .map(|m| (m.channel.clone(), m.generation))
            .collect();
        let touched = std::mem::take(&mut self.touched_since_audit);
        let settled = |c: &ConcreteChannel| !touched.contains(c) && self.settled(c);
        // Mirrored memberships whose record is gone.
        let lost = self
            .mirror
            .iter()
            .filter(|(c, g)| {
                settled(c) && open.get(*c).is_none_or(|listed| *listed < **g) && joined(c)
            })
            .map(|(c, g)| (c.clone(), *g))
            .collect();
        // Open memberships of channels this life does not hold. (Judging them before the
        // parent acts on `lost` changes nothing: a lost channel is held, an orphan is not.)
        let orphans = open
            .iter()
            .filter(|(c, _)| settled(c) && !held(c))
            .map(|(c, g)| (c.clone(), *g))
            .collect();
        Some(AuditVerdict { lost, orphans })
    }

    /// Whether `op` is one of the refusal closes' requests: taken, with what it was.
    pub(super) fn take_close_op(&mut self, op: OpId) -> Option<CloseOp> {
        self.close_ops.remove(&op)
    }

    /// Records a refusal close of the channel's membership (`generation`, or `None` to list
    /// first) and starts it.
    fn start_close(&mut self, cx: &mut Ctx, channel: ConcreteChannel, generation: Option<u64>) {
        self.set_unclosed(Unclosed {
            channel: channel.clone(),
            generation,
            attempts: 0,
            last_error: None,
        });
        self.try_close(cx, channel);
    }

    /// Sends the channel's pending close, unless one is in flight: `durableLeave` of the known
    /// generation, or `listMemberships` to learn it.
    pub(super) fn try_close(&mut self, cx: &mut Ctx, channel: ConcreteChannel) {
        let Some(u) = self.unclosed(&channel) else {
            return;
        };
        if self.close_in_flight(&channel) {
            return;
        }
        let generation = u.generation;
        self.set_close_in_flight(&channel, true);
        let (request, kind) = match generation {
            Some(generation) => (
                DeliveryRequest::DurableLeave {
                    channel: channel.clone(),
                    generation,
                },
                CloseOp::Leave(channel, generation),
            ),
            None => (DeliveryRequest::ListMemberships, CloseOp::List(channel)),
        };
        if let Some(op) = cx.control_request(&request, REQUEST_DELIVERY_TIMEOUT) {
            self.close_ops.insert(op, kind);
        }
    }

    /// The answer to a close's `listMemberships`: close the generation found, or nothing.
    pub(super) fn on_list_for_close(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        channel: ConcreteChannel,
        outcome: Outcome<Reply>,
    ) {
        self.set_close_in_flight(&channel, false);
        if self.unclosed(&channel).is_none() {
            return;
        }
        match self.decode_list(outcome) {
            Ok(list) => match list.memberships.iter().find(|m| m.channel == channel) {
                Some(m) => {
                    if let Some(u) = self.unclosed_mut(&channel) {
                        u.generation = Some(m.generation);
                    }
                    self.try_close(cx, channel);
                }
                None => {
                    // Nothing open: the unknown join was not applied, or was closed already.
                    self.take_unclosed(&channel);
                }
            },
            Err(detail) => self.close_failed(cx, now, &channel, detail),
        }
    }

    /// The close timer of `slot` fired: retry the channel's close once the connection is
    /// ready, else look again after the backoff step.
    pub(super) fn on_close_timer(&mut self, cx: &mut Ctx, now: Now, slot: u64) {
        let Some(channel) = self.channel_of(slot) else {
            return;
        };
        if cx.link == Link::Ready {
            self.try_close(cx, channel);
        } else {
            self.set_timer(MemberTimer::Close(slot), now.at + backoff(0));
        }
    }

    /// A close failed: retried with backoff, reported at the first and every fifth attempt.
    fn close_failed(&mut self, cx: &mut Ctx, now: Now, channel: &ConcreteChannel, detail: String) {
        bump(&mut cx.counters.close_failures);
        let slot = self.slot(channel);
        let Some(u) = self.unclosed_mut(channel) else {
            return;
        };
        let attempt = u.attempts;
        u.attempts = u.attempts.saturating_add(1);
        u.last_error = Some(detail.clone());
        let (generation, attempts) = (u.generation, u.attempts);
        self.set_timer(MemberTimer::Close(slot), now.at + backoff(attempt));
        if attempt == 0 || attempts.is_multiple_of(5) {
            cx.events.push_back(AgentEvent::MembershipCloseRetrying {
                channel: channel.clone(),
                generation,
                attempts,
                error: detail,
            });
        }
    }
}
