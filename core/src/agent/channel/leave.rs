//! The channel's side of the leave, the late refusal and a connection loss, as
//! [`ChannelMachine`] runs it. The membership side (which generation to tombstone, the
//! `durableLeave` and its answer, the refusal close) is the membership book's
//! (`members/leave.rs`): the parent asks the book whether a tombstone is needed and passes it
//! in, and calls back with what the book decided on the answers.
//!
//! # Leave (§2(b))
//!
//! A channel that has, or had in this life of the agent, a durable membership, or that the
//! resolver calls durable, is tombstoned first: the generation comes from the local mirror, or
//! from `listMemberships` when the mirror has none. Only a confirmed tombstone unsubscribes. A
//! refused, failed or unknown tombstone leaves the channel joined and reports
//! [`AgentEvent::LeaveFailed`]: the caller retries (fail closed). "No responders" counts as
//! "nothing to tombstone" only when the agent knows every membership that can exist: it listed
//! its memberships successfully in this life, and no join of this life may have opened one of
//! the channel. A restarted agent has an empty memory, so until its first successful list an
//! earlier life's membership may still be open and "no responders" fails the leave (G42 across
//! a restart).

use super::{ChannelMachine, ChannelOp, Phase};
use crate::agent::ctx::Ctx;
use crate::agent::types::{AgentEvent, BackstopState, JoinError, LeaveError, RequestId};
use crate::constants::REQUEST_DELIVERY_TIMEOUT;
use crate::io::{Command, SubId};
use crate::wire::control::DeliveryRequest;
use crate::wire::token::ConcreteChannel;

/// What the parent does next for a leave the machine started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(in crate::agent) enum LeaveStep {
    /// Tombstone this membership (`durableLeave`).
    Tombstone(ConcreteChannel, u64),
    /// The machine asked `listMemberships`; its answer comes back through the parent.
    Listing,
    /// Nothing to tombstone: finish the leave.
    Finish,
}

impl ChannelMachine {
    /// Whether the channel is committed with no join or leave in progress.
    pub(in crate::agent) fn idle(&self) -> bool {
        self.phase == Phase::Joined && self.join.is_none() && self.leave.is_none()
    }

    /// Starts the leave `request`. `tombstone` is the membership to close first, if one is
    /// needed: its generation when the mirror has it, `None` to list first.
    pub(in crate::agent) fn start_leave(
        &mut self,
        cx: &mut Ctx,
        request: RequestId,
        tombstone: Option<(ConcreteChannel, Option<u64>)>,
    ) -> LeaveStep {
        self.leave = Some(request);
        match tombstone {
            Some((c, Some(generation))) => LeaveStep::Tombstone(c, generation),
            Some((_, None)) => {
                if let Some(op) =
                    cx.control_request(&DeliveryRequest::ListMemberships, REQUEST_DELIVERY_TIMEOUT)
                {
                    self.ops.insert(op, (ChannelOp::ListForLeave, self.epoch));
                }
                LeaveStep::Listing
            }
            None => LeaveStep::Finish,
        }
    }

    /// The leave is done (the machine is dropped): unsubscribe and report. Returns the
    /// subscription the parent must forget.
    pub(in crate::agent) fn finish_leave(
        self,
        cx: &mut Ctx,
        tombstoned: Option<u64>,
    ) -> Option<SubId> {
        if let Some(sub) = self.sub {
            cx.commands.push_back(Command::Unsubscribe { sub });
        }
        if let Some(request) = self.leave {
            cx.events.push_back(AgentEvent::Left {
                request,
                channel: self.channel,
                tombstoned,
            });
        }
        self.sub
    }

    /// The leave failed: the channel stays joined. Reports it; returns whether the channel had
    /// (or wanted) a durable backstop, or `None` when no leave was in progress.
    pub(in crate::agent) fn fail_leave(&mut self, cx: &mut Ctx, error: LeaveError) -> Option<bool> {
        let request = self.leave.take()?;
        let durable = self.backstop != BackstopState::NotApplicable;
        cx.events.push_back(AgentEvent::LeaveFailed {
            request,
            channel: self.channel.clone(),
            error,
        });
        Some(durable)
    }

    /// A refusal of the subscription: `Some(detail)` back when it is a late refusal (the
    /// channel was committed and live), else remembered for the barrier to decide.
    pub(in crate::agent) fn on_refused(&mut self, detail: String) -> Option<String> {
        self.sub = None;
        if self.phase == Phase::Joined && !self.resubscribe {
            Some(detail)
        } else {
            // During a join's (or re-subscribe's) confirm window: the barrier decides.
            self.refused = Some(detail);
            None
        }
    }

    /// A late refusal drops the machine: unsubscribe, and end a leave or a join in progress.
    /// Returns the subscription the parent must forget.
    pub(in crate::agent) fn refuse(self, cx: &mut Ctx) -> Option<SubId> {
        if let Some(sub) = self.sub {
            cx.commands.push_back(Command::Unsubscribe { sub });
        }
        if let Some(request) = self.leave {
            cx.events.push_back(AgentEvent::LeaveFailed {
                request,
                channel: self.channel.clone(),
                error: LeaveError::TombstoneFailed {
                    detail: "the live subscription was refused; the membership is being closed"
                        .into(),
                },
            });
        }
        if let Some(join) = self.join {
            cx.events.push_back(AgentEvent::Joined {
                request: join.request,
                channel: self.channel.clone(),
                report: join.report,
            });
        }
        self.sub
    }

    /// The connection was lost: the subscription and the backfill are gone. Returns `false`
    /// when the join was not committed: it failed closed (reported here), and the parent drops
    /// the machine.
    pub(in crate::agent) fn on_lost(&mut self, cx: &mut Ctx) -> bool {
        self.sub = None;
        self.backfill_next = None;
        if self.phase != Phase::Joined {
            let request = self.join.as_ref().and_then(|j| j.request);
            cx.events.push_back(AgentEvent::JoinFailed {
                request,
                channel: self.channel.clone(),
                error: JoinError::Unconfirmed {
                    detail: "connection lost".into(),
                },
            });
            return false;
        }
        self.resubscribe = false;
        if self.join.as_ref().is_some_and(|j| !j.started) {
            // Committed before the registry ever loaded (a boot join): its backfill and
            // durable step have not begun. Keep them for the next ready connection, which
            // re-subscribes first; the join is reported then, with its original watermark.
            return true;
        }
        if let Some(join) = self.join.take() {
            // Committed already: report what we have.
            let mut report = join.report;
            if join.backfill_pending && report.reason.is_none() {
                report.reason = Some("backfill interrupted: connection lost".into());
            }
            cx.events.push_back(AgentEvent::Joined {
                request: join.request,
                channel: self.channel.clone(),
                report,
            });
        }
        true
    }
}
