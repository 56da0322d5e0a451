//! The membership book: everything the agent knows about its durable memberships, one record
//! per concrete channel, kept for the life of the agent.
//!
//! A membership is not a join: it can outlive the join of its channel (an unclosed record after
//! a refusal, a membership a leave could not tombstone, an earlier life's orphan), and exist for
//! a channel this life never joined. So it is not kept inside the channel's join state: the
//! parent's channel map holds what a join holds (phase, epoch, subscription, watermark, join
//! progress, backfill, backstop), and [`Members`] holds, per concrete channel, what the
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
//! The flows that read and write the book (durable join, reconcile, leave, refusal close, audit)
//! are in `membership` and `leave`; they issue the control requests through the parent.

use super::types::Unclosed;
use crate::op::TimerTable;
use crate::time::Instant;
use crate::wire::token::ConcreteChannel;
use std::collections::{BTreeMap, BTreeSet};

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
    pub(super) listed: bool,
    /// The membership audit in flight (its number), if any.
    pub(super) audit_in_flight: Option<u64>,
    /// Audits sent so far (numbers the in-flight one).
    pub(super) audits: u64,
    /// Channels whose mirror or membership changed since the audit in flight was sent: its
    /// snapshot may predate the change, so they are not judged from it.
    pub(super) touched_since_audit: BTreeSet<ConcreteChannel>,
    timers: TimerTable<MemberTimer>,
}

impl Members {
    fn record(&mut self, channel: &ConcreteChannel) -> &mut Member {
        self.records.entry(channel.clone()).or_default()
    }

    /// Whether the channel held, or may hold, a membership in this life.
    pub(super) fn is_maybe(&self, channel: &ConcreteChannel) -> bool {
        self.records.get(channel).is_some_and(|m| m.maybe)
    }

    /// Marks the channel as (possibly) holding a membership in this life.
    pub(super) fn mark_maybe(&mut self, channel: &ConcreteChannel) {
        self.record(channel).maybe = true;
    }

    /// The refusal close pending for the channel.
    pub(super) fn unclosed(&self, channel: &ConcreteChannel) -> Option<&Unclosed> {
        self.records.get(channel).and_then(|m| m.unclosed.as_ref())
    }

    /// The refusal close pending for the channel, to update.
    pub(super) fn unclosed_mut(&mut self, channel: &ConcreteChannel) -> Option<&mut Unclosed> {
        self.records
            .get_mut(channel)
            .and_then(|m| m.unclosed.as_mut())
    }

    /// Records a refusal close to do (replacing one pending).
    pub(super) fn set_unclosed(&mut self, unclosed: Unclosed) {
        let channel = unclosed.channel.clone();
        self.record(&channel).unclosed = Some(unclosed);
    }

    /// Drops the channel's pending refusal close, returning it.
    pub(super) fn take_unclosed(&mut self, channel: &ConcreteChannel) -> Option<Unclosed> {
        self.records
            .get_mut(channel)
            .and_then(|m| m.unclosed.take())
    }

    /// Every pending refusal close, by channel.
    pub(super) fn unclosed_all(&self) -> impl Iterator<Item = &Unclosed> {
        self.records.values().filter_map(|m| m.unclosed.as_ref())
    }

    /// Whether a close request of the channel is in flight.
    pub(super) fn close_in_flight(&self, channel: &ConcreteChannel) -> bool {
        self.records.get(channel).is_some_and(|m| m.close_in_flight)
    }

    /// Sets whether a close request of the channel is in flight.
    pub(super) fn set_close_in_flight(&mut self, channel: &ConcreteChannel, on: bool) {
        if on || self.records.contains_key(channel) {
            self.record(channel).close_in_flight = on;
        }
    }

    /// Whether a reconcile request of the channel is in flight.
    pub(super) fn reconcile_in_flight(&self, channel: &ConcreteChannel) -> bool {
        self.records
            .get(channel)
            .is_some_and(|m| m.reconcile_in_flight)
    }

    /// Sets whether a reconcile request of the channel is in flight.
    pub(super) fn set_reconcile_in_flight(&mut self, channel: &ConcreteChannel, on: bool) {
        if on || self.records.contains_key(channel) {
            self.record(channel).reconcile_in_flight = on;
        }
    }

    /// Nothing about the channel is in motion: no reconcile, no close in flight, no close
    /// pending. The audit judges only such channels.
    pub(super) fn settled(&self, channel: &ConcreteChannel) -> bool {
        self.records
            .get(channel)
            .is_none_or(|m| !m.reconcile_in_flight && !m.close_in_flight && m.unclosed.is_none())
    }

    /// The channel's timer slot, allocated at first use.
    pub(super) fn slot(&mut self, channel: &ConcreteChannel) -> u64 {
        if let Some(s) = self.slot_of(channel) {
            return s;
        }
        let s = self.slots.len() as u64 + 1;
        self.slots.push(channel.clone());
        self.record(channel).slot = Some(s);
        s
    }

    /// The channel's timer slot, if it has one.
    pub(super) fn slot_of(&self, channel: &ConcreteChannel) -> Option<u64> {
        self.records.get(channel).and_then(|m| m.slot)
    }

    /// The channel of a timer slot.
    pub(super) fn channel_of(&self, slot: u64) -> Option<ConcreteChannel> {
        let index = usize::try_from(slot.checked_sub(1)?).ok()?;
        self.slots.get(index).cloned()
    }

    /// Sets (or moves) a deadline.
    pub(super) fn set_timer(&mut self, timer: MemberTimer, at: Instant) {
        self.timers.set(timer, at);
    }

    /// Cancels a deadline.
    pub(super) fn cancel_timer(&mut self, timer: MemberTimer) {
        self.timers.cancel(&timer);
    }

    /// Clears every deadline (the agent stopped).
    pub(super) fn clear_timers(&mut self) {
        self.timers = TimerTable::new();
    }

    /// The earliest deadline.
    pub(super) fn poll_timeout(&self) -> Option<(Instant, MemberTimer)> {
        self.timers.next().map(|(at, t)| (at, *t))
    }
}
