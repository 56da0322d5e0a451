//! The leave's routing and the late refusal (parent code, `impl Agent`): the channel machine
//! runs its side of the leave (`channel/leave.rs`), the membership book decides the membership's
//! (`members/leave.rs`: which generation to tombstone, the answers to the leave's list and to a
//! `durableLeave`, the close after a refusal); the parent asks the book, passes its answer to
//! the machine, and applies the book's verdicts to the machine.
//!
//! # Leave (§2(b))
//!
//! The leave's protocol is described with the channel's side of it, in `channel/leave.rs`; the
//! late refusal (§2(c)) with the book's side of it, in `members/leave.rs`.

use super::Agent;
use super::channel::ChannelMachine;
use super::channel::leave::LeaveStep;
use super::ctx::bump;
use super::members::leave::{ListVerdict, TombstoneVerdict};
use super::state::Feed;
use super::types::{AgentEvent, LeaveError, RequestId};
use crate::io::{Reply, SubId};
use crate::op::Outcome;
use crate::time::Now;
use crate::wire::token::{Channel, ConcreteChannel};

impl Agent {
    /// Starts the leave `request`: the book names the membership to tombstone first, the
    /// machine starts with it.
    pub(super) fn start_leave(&mut self, channel: Channel, request: RequestId) {
        let watch = &self.watch;
        let tombstone = self.members.tombstone_for(&self.cx, &channel, || {
            watch.registry().policy_for(&channel).is_durable()
        });
        let Some(machine) = self.channels.get_mut(&channel) else {
            return;
        };
        match machine.start_leave(&mut self.cx, request, tombstone) {
            LeaveStep::Tombstone(c, generation) => self.send_leave(c, generation),
            LeaveStep::Listing => {}
            LeaveStep::Finish => self.finish_leave(&channel, None),
        }
    }

    /// The leave's tombstone: the book sends it and owns the op.
    pub(super) fn send_leave(&mut self, channel: ConcreteChannel, generation: u64) {
        self.members
            .request_tombstone(&mut self.cx, channel, generation);
    }

    /// The leave is done: the machine is dropped (unsubscribes, reports), the book's reconcile
    /// of the channel ends.
    pub(super) fn finish_leave(&mut self, channel: &Channel, tombstoned: Option<u64>) {
        let Some(machine) = self.remove_channel(channel) else {
            return;
        };
        if let Some(sub) = machine.finish_leave(&mut self.cx, tombstoned) {
            self.feeds.remove(&sub);
        }
        if let Some(c) = channel.to_concrete() {
            self.members.cancel_reconcile(&c);
        }
    }

    /// The leave failed: the machine reports it and stays joined; the book keeps (or gets
    /// back) the channel's membership.
    pub(super) fn fail_leave(&mut self, channel: &Channel, error: LeaveError) {
        let Some(durable) = self
            .channels
            .get_mut(channel)
            .and_then(|machine| machine.fail_leave(&mut self.cx, error))
        else {
            return;
        };
        if let Some(concrete) = channel.to_concrete() {
            self.members.leave_failed(&self.cx, &concrete, durable);
        }
    }

    /// The answer to a leave's `listMemberships` (routed by channel name): the book judges it,
    /// the parent tombstones, finishes or fails the leave.
    pub(super) fn on_list_for_leave(&mut self, channel: Channel, outcome: Outcome<Reply>) {
        let Some(concrete) = channel.to_concrete() else {
            return;
        };
        if self.channels.get(&channel).is_none_or(|e| !e.leaving()) {
            return;
        }
        match self.members.on_list_for_leave(&concrete, outcome) {
            ListVerdict::Tombstone(generation) => self.send_leave(concrete, generation),
            ListVerdict::Finish => self.finish_leave(&channel, None),
            ListVerdict::Fail(error) => self.fail_leave(&channel, error),
        }
    }

    /// The answer to a `durableLeave` (a leave's tombstone or a refusal close's): the book
    /// judges it with what the machine says, and the parent applies the verdict to the machine.
    pub(super) fn on_durable_leave(
        &mut self,
        now: Now,
        channel: ConcreteChannel,
        generation: u64,
        outcome: Outcome<Reply>,
    ) {
        let key = channel.as_channel();
        let leaving = self.channels.get(&key).is_some_and(ChannelMachine::leaving);
        let joined = self.channels.get(&key).is_some_and(ChannelMachine::joined);
        let verdict = self.members.on_durable_leave(
            &mut self.cx,
            now,
            &channel,
            generation,
            outcome,
            leaving,
            joined,
        );
        match verdict {
            TombstoneVerdict::Closed { degrade } => {
                if let Some(reason) = degrade
                    && let Some(machine) = self.channels.get_mut(&key)
                {
                    machine.degrade(reason.into(), 0);
                }
                if leaving {
                    self.finish_leave(&key, Some(generation));
                }
                // A close whose target changed while this leave was in flight (a newer
                // generation may exist): go on with it.
                self.members.try_close(&mut self.cx, channel);
            }
            TombstoneVerdict::Failed {
                error,
                detail,
                degrade,
            } => {
                if let Some(reason) = degrade
                    && let Some(machine) = self.channels.get_mut(&key)
                {
                    machine.degrade(reason.into(), 0);
                }
                if leaving {
                    self.fail_leave(&key, error.clone());
                }
                self.members.tombstone_failed(
                    &mut self.cx,
                    now,
                    &channel,
                    generation,
                    &error,
                    detail,
                );
            }
        }
    }

    /// A refusal of a chat feed: the channel's machine says whether it is a late refusal.
    pub(super) fn on_refused(&mut self, sub: SubId, detail: String) {
        let Some(Feed::Chat(epoch)) = self.feeds.remove(&sub) else {
            return;
        };
        let Some(channel) = self
            .channels
            .iter()
            .find(|(_, e)| e.is_feed(epoch, sub))
            .map(|(c, _)| c.clone())
        else {
            return;
        };
        let Some(machine) = self.channels.get_mut(&channel) else {
            return;
        };
        if let Some(detail) = machine.on_refused(detail) {
            self.late_refusal(&channel, detail);
        }
    }

    /// A late refusal (§2(c)): the machine is dropped (unsubscribes, ends a leave or join in
    /// progress), the refusal is reported, and the book closes the membership.
    pub(super) fn late_refusal(&mut self, channel: &Channel, detail: String) {
        bump(&mut self.cx.counters.late_refusals);
        let Some(machine) = self.remove_channel(channel) else {
            return;
        };
        if let Some(sub) = machine.refuse(&mut self.cx) {
            self.feeds.remove(&sub);
        }
        let concrete = channel.to_concrete();
        let closing = concrete.as_ref().and_then(|c| self.members.refused(c));
        self.cx.events.push_back(AgentEvent::ChannelRefused {
            channel: channel.clone(),
            detail,
            closing,
        });
        if let Some(c) = concrete {
            self.members.close_refused(&mut self.cx, c, closing);
        }
    }
}
