//! The book's side of ending a membership with its channel: which membership a leave tombstones
//! (and the `durableLeave` it sends), the leave's `listMemberships` answer, the answer to a
//! `durableLeave` (a leave's tombstone or a refusal close's: both may concern a joined channel,
//! so they are judged together), a failed leave, and a late refusal. The channel's side (its
//! phase, its report, its subscription) is the
//! [`ChannelMachine`](crate::agent::channel::ChannelMachine)'s (`channel/leave.rs`); the parent
//! passes what the book needs to know about the machine (is it leaving, is it joined) as
//! arguments, and applies the verdicts to the machine.
//!
//! # Late refusal (§2(c))
//!
//! A refusal of an already joined channel's subscription drops the channel at once
//! ([`AgentEvent::ChannelRefused`](crate::agent::AgentEvent::ChannelRefused)) and, when a
//! membership exists, closes it with `durableLeave` retried with `min(30 s, 1 s · 2^attempt)`
//! backoff until confirmed, visible in
//! [`AgentHealth::unclosed`](crate::agent::AgentHealth::unclosed) while pending. A later durable
//! rejoin of the channel supersedes it.

use super::{MemberTimer, Members};
use crate::agent::ctx::Ctx;
use crate::agent::state::decode_leave_reply;
use crate::agent::types::{AgentEvent, LeaveError};
use crate::constants::{REQUEST_DELIVERY_TIMEOUT, backoff};
use crate::io::Reply;
use crate::op::{Failure, OpId, Outcome};
use crate::time::Now;
use crate::wire::control::DeliveryRequest;
use crate::wire::token::{Channel, ConcreteChannel};

/// What the book decided on a leave's `listMemberships` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(in crate::agent) enum ListVerdict {
    /// Tombstone this generation (the parent asks the book to send it).
    Tombstone(u64),
    /// Nothing to tombstone: the leave finishes.
    Finish,
    /// The memberships are unknown: the leave fails (closed).
    Fail(LeaveError),
}

/// What the book decided on a `durableLeave` answer, for the parent to apply to the channel's
/// machine (a leave in progress finishes or fails; a joined channel may be degraded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(in crate::agent) enum TombstoneVerdict {
    /// The membership is closed; `degrade`: the reason to degrade the channel's backstop with
    /// (it is joined and lost its membership; the reconcile is scheduled already).
    Closed { degrade: Option<&'static str> },
    /// The tombstone failed with `error`; `degrade`: the reason to degrade the backstop of the
    /// leaving channel with (the outcome is unknown; reported already). The parent fails the
    /// leave, then hands `detail` back ([`Members::tombstone_failed`]).
    Failed {
        error: LeaveError,
        detail: String,
        degrade: Option<&'static str>,
    },
}

impl Members {
    /// The membership a leave of `channel` must tombstone first, if any: its generation when
    /// the mirror has it, `None` to list first. G10 fix: whenever a membership is known,
    /// whatever the class reads now (`durable_class`, asked only when no membership is known).
    /// The test-only switch restores the reference's stale cached `live`, which skips it.
    pub(in crate::agent) fn tombstone_for(
        &self,
        cx: &Ctx,
        channel: &Channel,
        durable_class: impl FnOnce() -> bool,
    ) -> Option<(ConcreteChannel, Option<u64>)> {
        let concrete = channel.to_concrete();
        let needs_tombstone = cx.config.durable_backstop
            && !cx.config.reference_gap_g10
            && concrete.as_ref().is_some_and(|c| {
                self.mirror.contains_key(c) || self.is_maybe(c) || durable_class()
            });
        concrete
            .filter(|_| needs_tombstone)
            .map(|c| (c.clone(), self.mirror.get(&c).copied()))
    }

    /// Issues a leave's `durableLeave` of `generation`; the book owns the op.
    pub(in crate::agent) fn request_tombstone(
        &mut self,
        cx: &mut Ctx,
        channel: ConcreteChannel,
        generation: u64,
    ) {
        let request = DeliveryRequest::DurableLeave {
            channel: channel.clone(),
            generation,
        };
        if let Some(op) = cx.control_request(&request, REQUEST_DELIVERY_TIMEOUT) {
            self.tombstone_ops.insert(op, (channel, generation));
        }
    }

    /// Whether `op` is a leave's `durableLeave`: taken, with its channel and generation.
    pub(in crate::agent) fn take_tombstone_op(
        &mut self,
        op: OpId,
    ) -> Option<(ConcreteChannel, u64)> {
        self.tombstone_ops.remove(&op)
    }

    /// A leave's `listMemberships` answer for `channel` (its leave still in progress).
    pub(in crate::agent) fn on_list_for_leave(
        &mut self,
        channel: &ConcreteChannel,
        outcome: Outcome<Reply>,
    ) -> ListVerdict {
        match outcome {
            Outcome::Failed(Failure::NoResponders) if self.listed && !self.is_maybe(channel) => {
                // No daemon, and every membership that can exist is known: nothing to tombstone
                // (§2(b)).
                ListVerdict::Finish
            }
            Outcome::Failed(Failure::NoResponders) => {
                // G42: an earlier life (or this one) may have left a membership open, and no
                // daemon can say: fail closed, the caller retries once the daemon is back.
                ListVerdict::Fail(LeaveError::MembershipsUnknown {
                    detail: "no delivery daemon answered, and this life has not listed its \
                             memberships yet"
                        .to_owned(),
                })
            }
            outcome => match self.decode_list(outcome) {
                Ok(list) => match list.memberships.iter().find(|m| m.channel == *channel) {
                    Some(m) => ListVerdict::Tombstone(m.generation),
                    None => ListVerdict::Finish,
                },
                Err(detail) => ListVerdict::Fail(LeaveError::MembershipsUnknown { detail }),
            },
        }
    }

    /// The answer to a `durableLeave` of `generation` (a leave's tombstone or a refusal
    /// close's). `leaving`: the channel's machine has a leave in progress; `joined`: its join
    /// committed. On success the parent then finishes a leave and calls
    /// [`Members::try_close`] (a close whose target changed meanwhile goes on); on failure it
    /// fails a leave and calls [`Members::tombstone_failed`].
    #[allow(clippy::too_many_arguments)]
    pub(in crate::agent) fn on_durable_leave(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        channel: &ConcreteChannel,
        generation: u64,
        outcome: Outcome<Reply>,
        leaving: bool,
        joined: bool,
    ) -> TombstoneVerdict {
        self.set_close_in_flight(channel, false);
        self.touched_since_audit.insert(channel.clone());
        match decode_leave_reply(outcome) {
            Ok(()) => {
                if self.mirror.get(channel) == Some(&generation) {
                    self.mirror.remove(channel);
                }
                let mut degrade = None;
                if !leaving && joined && !self.mirror.contains_key(channel) {
                    // A close landed while the channel is joined (a refusal close after a rejoin
                    // adopted the same generation, or a close queued during a leave that then
                    // failed): its membership is gone. Establish a new one now.
                    let slot = self.slot(channel);
                    self.set_timer(MemberTimer::Reconcile(slot), now.at);
                    degrade = Some("membership closed by an earlier refusal; rejoining");
                }
                if let Some(u) = self.unclosed(channel)
                    && u.generation == Some(generation)
                {
                    self.take_unclosed(channel);
                    if let Some(slot) = self.slot_of(channel) {
                        self.cancel_timer(MemberTimer::Close(slot));
                    }
                    cx.events.push_back(AgentEvent::MembershipClosed {
                        channel: channel.clone(),
                        generation,
                    });
                }
                TombstoneVerdict::Closed { degrade }
            }
            Err((error, detail)) => {
                let mut degrade = None;
                if leaving
                    && error == LeaveError::TombstoneUnknown
                    && self.mirror.get(channel) == Some(&generation)
                {
                    // The tombstone may have landed: the mirror can no longer vouch for the
                    // membership. The channel stays joined (fail closed) but degraded; a retried
                    // leave lists first, and without one the reconcile re-establishes the
                    // backstop (reported, never silent).
                    self.mirror.remove(channel);
                    let slot = self.slot(channel);
                    self.set_timer(MemberTimer::Reconcile(slot), now.at + backoff(0));
                    let reason = "durable leave outcome unknown; the membership may be closed";
                    cx.events.push_back(AgentEvent::BackstopDegraded {
                        channel: channel.clone(),
                        reason: reason.into(),
                    });
                    degrade = Some(reason);
                }
                TombstoneVerdict::Failed {
                    error,
                    detail,
                    degrade,
                }
            }
        }
    }

    /// After a failed `durableLeave` (and the leave it failed, if any): a refusal close still
    /// pending is retried with backoff. If the close may have landed, the mirror can no longer
    /// vouch for this generation (a rejoin must ask the daemon rather than adopt it).
    pub(in crate::agent) fn tombstone_failed(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        channel: &ConcreteChannel,
        generation: u64,
        error: &LeaveError,
        detail: String,
    ) {
        if self.unclosed(channel).is_none() {
            return;
        }
        if *error == LeaveError::TombstoneUnknown && self.mirror.get(channel) == Some(&generation) {
            self.mirror.remove(channel);
        }
        self.close_failed(cx, now, channel, detail);
    }

    /// A leave of the channel failed and it stays joined, so it keeps (or gets back) its
    /// membership: a close queued while the leave was in flight (a join reply that came back
    /// during it, G11) must not tombstone the backstop of a joined channel, and a reconcile
    /// re-establishes a membership the mirror no longer vouches for (`durable`: the channel has
    /// or wants a backstop; found by the simulator, seed 3326).
    pub(in crate::agent) fn leave_failed(
        &mut self,
        cx: &Ctx,
        channel: &ConcreteChannel,
        durable: bool,
    ) {
        if !self.close_in_flight(channel)
            && self.take_unclosed(channel).is_some()
            && let Some(slot) = self.slot_of(channel)
        {
            self.cancel_timer(MemberTimer::Close(slot));
        }
        if durable && !self.mirror.contains_key(channel) {
            let slot = self.slot(channel);
            self.set_timer(MemberTimer::Reconcile(slot), cx.last_at + backoff(0));
        }
    }

    /// A late refusal dropped the channel: its reconcile ends. Returns the mirrored generation
    /// the refusal closes (reported with the refusal), if any.
    pub(in crate::agent) fn refused(&mut self, channel: &ConcreteChannel) -> Option<u64> {
        self.cancel_reconcile(channel);
        self.mirror.get(channel).copied()
    }

    /// After a late refusal is reported: close the membership `closing` (the mirrored one); or,
    /// with a close pending already, list before closing (a join since may have opened a newer
    /// generation); or, not mirrored but a membership may exist (G41), list, then close.
    pub(in crate::agent) fn close_refused(
        &mut self,
        cx: &mut Ctx,
        channel: ConcreteChannel,
        closing: Option<u64>,
    ) {
        if let Some(generation) = closing {
            self.start_close(cx, channel, Some(generation));
        } else if let Some(u) = self.unclosed_mut(&channel) {
            u.generation = None;
        } else if self.is_maybe(&channel) {
            self.start_close(cx, channel, None);
        }
    }
}
