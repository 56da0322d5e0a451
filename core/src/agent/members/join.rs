//! The book's side of establishing a membership: the durable join (issued by the book, for a
//! channel machine's post-commit plan or for a reconcile) and its answer, the reconcile's
//! decision, and a membership the audit found lost. The channel's side (its backstop state and
//! its join report) is the [`ChannelMachine`](crate::agent::channel::ChannelMachine)'s; the
//! parent passes what the book needs to know about the machine (is the channel staying, how many
//! attempts its degraded backstop counts) as arguments, and applies the [`JoinVerdict`] to the
//! machine.
//!
//! # Durable join answer
//!
//! A durable membership established while the channel is staying is mirrored (and supersedes a
//! pending refusal close of the same or an older generation); one opened while the channel left
//! or was refused meanwhile is closed at once (G11), not mirrored; a late answer to an older
//! request changes nothing. A failed (or unknown) join degrades the backstop and schedules the
//! reconcile with backoff, unless the mirror holds a membership confirmed since (a late failure
//! of an older request); an unknown outcome marks the channel as maybe holding a membership.

use super::{MemberTimer, Members};
use crate::agent::ctx::{Ctx, Link, bump};
use crate::agent::state::{OUTCOME_UNKNOWN, decode_join_reply};
use crate::agent::types::AgentEvent;
use crate::constants::{DURABLE_JOIN_TIMEOUT, backoff};
use crate::io::Reply;
use crate::op::{OpId, Outcome};
use crate::time::Now;
use crate::wire::control::DeliveryRequest;
use crate::wire::token::ConcreteChannel;

/// What the book decided on a durable join answer: what the parent applies to the channel's
/// machine (and then reports the join if it is done).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(in crate::agent) enum JoinVerdict {
    /// Nothing for the machine: a close was started (the channel is not staying), the answer is
    /// a late one to an older request, or a late failure while the mirror holds a membership
    /// confirmed since.
    Ignore,
    /// The membership `generation` is established (mirrored); `honoured`: whether the daemon
    /// used our join cursor, when both are known. The machine's backstop is established.
    Established {
        generation: u64,
        honoured: Option<bool>,
    },
    /// No membership: the machine's backstop is unavailable for `reason` with `attempts`
    /// counted (the reconcile is scheduled already).
    Unavailable { reason: String, attempts: u32 },
}

impl Members {
    /// Issues `durableJoin` of `channel` with the join cursor `cursor`; the book owns the op.
    pub(in crate::agent) fn request_durable_join(
        &mut self,
        cx: &mut Ctx,
        channel: ConcreteChannel,
        cursor: Option<u64>,
    ) {
        let request = DeliveryRequest::DurableJoin {
            channel: channel.clone(),
            join_cursor: cursor,
        };
        if let Some(op) = cx.control_request(&request, DURABLE_JOIN_TIMEOUT) {
            self.join_ops.insert(op, (channel, cursor));
        }
    }

    /// Whether `op` is one of the book's durable joins: taken, with its channel and cursor.
    pub(in crate::agent) fn take_join_op(
        &mut self,
        op: OpId,
    ) -> Option<(ConcreteChannel, Option<u64>)> {
        self.join_ops.remove(&op)
    }

    /// The membership a committed join may adopt: mirrored, with no close pending.
    pub(in crate::agent) fn adoptable(&self, channel: &ConcreteChannel) -> Option<u64> {
        if self.unclosed(channel).is_some() {
            return None;
        }
        self.mirror.get(channel).copied()
    }

    /// The answer to the durable join of `channel` sent with `cursor` (see the module docs).
    /// `staying`: the channel's machine is joined with no leave in progress; `attempts`: the
    /// attempts its degraded backstop counts (0 otherwise).
    #[allow(clippy::too_many_arguments)]
    pub(in crate::agent) fn on_durable_join(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        channel: ConcreteChannel,
        cursor: Option<u64>,
        outcome: Outcome<Reply>,
        staying: bool,
        attempts: u32,
    ) -> JoinVerdict {
        self.set_reconcile_in_flight(&channel, false);
        match decode_join_reply(outcome) {
            Ok(reply) if reply.durable => {
                let generation = reply.generation.unwrap_or(0);
                if !staying {
                    // Left or refused while the request was in flight: the membership the daemon
                    // just opened must be closed (G11), not mirrored.
                    self.start_close(cx, channel, Some(generation));
                    return JoinVerdict::Ignore;
                }
                if self
                    .mirror
                    .get(&channel)
                    .is_some_and(|current| *current > generation)
                {
                    // A late answer to an older request: a newer membership is established.
                    return JoinVerdict::Ignore;
                }
                self.mirror.insert(channel.clone(), generation);
                self.mark_maybe(&channel);
                self.touched_since_audit.insert(channel.clone());
                // A rejoin supersedes a pending refusal close: of an older generation (the daemon
                // already replaced it), and of this very generation (the daemon never closed it,
                // and it is ours again). A close already in flight may still land; its success
                // handler re-establishes the membership (see `on_durable_leave`).
                if self
                    .unclosed(&channel)
                    .is_some_and(|u| u.generation.is_none_or(|g| g <= generation))
                {
                    self.take_unclosed(&channel);
                    if let Some(slot) = self.slot_of(&channel) {
                        self.cancel_timer(MemberTimer::Close(slot));
                    }
                }
                let honoured = match (cursor, reply.join_cursor) {
                    (Some(ours), Some(used)) => Some(ours == used),
                    _ => None,
                };
                let slot = self.slot(&channel);
                self.cancel_timer(MemberTimer::Reconcile(slot));
                JoinVerdict::Established {
                    generation,
                    honoured,
                }
            }
            other => {
                if other.as_ref().is_err_and(|e| e == OUTCOME_UNKNOWN) {
                    // The daemon may have opened a membership we do not know about; a pending
                    // close must look it up rather than close an older generation only.
                    self.mark_maybe(&channel);
                    if let Some(u) = self.unclosed_mut(&channel) {
                        u.generation = None;
                    }
                }
                if !staying {
                    if self.is_maybe(&channel) && self.unclosed(&channel).is_none() {
                        self.start_close(cx, channel, None);
                    }
                    return JoinVerdict::Ignore;
                }
                if self.mirror.contains_key(&channel) {
                    // A late failure of an older request (a reconcile from before a leave and
                    // rejoin, answered after its timeout): a durable join never closes anything,
                    // and the membership the mirror holds was confirmed since. Degrading it here
                    // left the backstop degraded for good, as the reconcile sees the mirror and
                    // does nothing (found by the simulator, seed 4734).
                    return JoinVerdict::Ignore;
                }
                let reason = match other {
                    Ok(reply) => reply
                        .reason
                        .unwrap_or_else(|| "durable backstop unavailable".to_owned()),
                    Err(e) => format!("durable backstop unavailable ({e})"),
                };
                let slot = self.slot(&channel);
                self.set_timer(MemberTimer::Reconcile(slot), now.at + backoff(attempts));
                JoinVerdict::Unavailable { reason, attempts }
            }
        }
    }

    /// Whether a reconcile of the joined channel is due now. Not while a leave is in flight
    /// (`leaving`: it decides; if it fails the channel stays joined and still needs its
    /// backstop, so look again after the backoff step: found by the simulator, seed 409, where
    /// a reconcile that fired during a retried leave was dropped and the failed leave left the
    /// channel degraded for good), nor while disconnected (look again after the backoff step;
    /// the connection decides when); never while the mirror holds a membership or a reconcile
    /// is in flight.
    pub(in crate::agent) fn reconcile_due(
        &mut self,
        cx: &Ctx,
        channel: &ConcreteChannel,
        leaving: bool,
    ) -> bool {
        if leaving {
            let slot = self.slot(channel);
            self.set_timer(MemberTimer::Reconcile(slot), cx.last_at + backoff(0));
            return false;
        }
        if self.mirror.contains_key(channel) || self.reconcile_in_flight(channel) {
            return false;
        }
        if cx.link != Link::Ready {
            let slot = self.slot(channel);
            self.set_timer(MemberTimer::Reconcile(slot), cx.last_at + backoff(0));
            return false;
        }
        true
    }

    /// Sends the reconcile [`Members::reconcile_due`] allowed: one more attempt counted, a
    /// durable join with `cursor` (the armed watermark, G1).
    pub(in crate::agent) fn reconcile(
        &mut self,
        cx: &mut Ctx,
        channel: ConcreteChannel,
        cursor: Option<u64>,
    ) {
        bump(&mut cx.counters.reconcile_attempts);
        self.set_reconcile_in_flight(&channel, true);
        self.request_durable_join(cx, channel, cursor);
    }

    /// The audit found the mirrored membership `generation` of a joined channel gone: the
    /// mirror forgets it, and it is reported. Returns the reason the parent degrades the
    /// channel's backstop with (and then reconciles, which opens a new membership).
    pub(in crate::agent) fn membership_lost(
        &mut self,
        cx: &mut Ctx,
        channel: &ConcreteChannel,
        generation: u64,
    ) -> String {
        self.mirror.remove(channel);
        bump(&mut cx.counters.memberships_lost);
        let reason = format!(
            "membership generation {generation} is gone from the registry (removed out of band); \
             re-establishing"
        );
        cx.events.push_back(AgentEvent::MembershipLost {
            channel: channel.clone(),
            generation,
        });
        cx.events.push_back(AgentEvent::BackstopDegraded {
            channel: channel.clone(),
            reason: reason.clone(),
        });
        reason
    }

    /// The audit found an open membership of a channel this life does not hold (an earlier
    /// life's, G12): reported, and closed through the refusal close.
    pub(in crate::agent) fn close_orphan(
        &mut self,
        cx: &mut Ctx,
        channel: ConcreteChannel,
        generation: u64,
    ) {
        bump(&mut cx.counters.memberships_orphaned);
        self.mark_maybe(&channel);
        cx.events.push_back(AgentEvent::MembershipOrphaned {
            channel: channel.clone(),
            generation,
        });
        self.start_close(cx, channel, Some(generation));
    }
}
