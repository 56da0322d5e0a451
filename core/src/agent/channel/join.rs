//! The join, as [`ChannelMachine`] runs it: arm, subscribe, confirm, commit, then the durable
//! step and the backfill. The parent hands the durable join to the membership book (which sends
//! it and decides on its answer, `members/join.rs`) and the backfill pages to the history reader
//! and their copies to the receiver; the machine keeps the join's progress and reports it.
//!
//! # The join, step by step (§2(a))
//!
//! 1. **Arm the watermark**: read the CHAT frontier `F` ([`Command::StreamInfo`]).
//! 2. **Subscribe live** to `cotal.<s>.chat.*.<ch>`.
//! 3. **Confirm** with a server round trip ([`Command::Barrier`]). A refusal of the SUB arrives
//!    before the barrier's completion; a refused or unconfirmable join is undone (unsubscribe,
//!    watermark dropped) and reported as [`AgentEvent::JoinFailed`]: fail closed, nothing left.
//! 4. **Commit**: the channel is joined now, and only now (SPEC §12 item 13).
//! 5. **Durable backstop** for a channel the one resolver ([`ChannelRegistry::policy_for`](crate::policy::ChannelRegistry::policy_for)) calls
//!    durable: `ctl.delivery durableJoin {channel, joinCursor: F}`. The cursor is our fix for G1: a
//!    daemon that honours it echoes it back, and the report says whether it did
//!    ([`JoinReport::cursor_honoured`](crate::agent::JoinReport::cursor_honoured)). If the backstop is not established the report carries a
//!    `reason`, the channel's health is degraded, and a reconcile loop retries with backoff (the
//!    reference does this for boot joins only, G13).
//! 6. **Backfill** messages `≤ F` ([`Command::ReadStream`], paged), through the same authenticity
//!    filter as the live path, as [`CopySource::Backfill`](crate::ledger::CopySource::Backfill) copies.
//! 7. Report [`AgentEvent::Joined`] once steps 5 and 6 both finished (they run concurrently).

use super::{ChannelMachine, ChannelOp, Phase};
use crate::agent::ctx::{Ctx, Link, bump};
use crate::agent::types::{AgentEvent, BackstopState, JoinError, JoinReport, RequestId};
use crate::io::{Command, ReadStart, Reply, SubId};
use crate::op::{OpId, Outcome};
use crate::policy::{Backfill, EffectivePolicy};
use crate::time::UnixMillis;
use crate::wire::token::ConcreteChannel;

/// What the parent does after a completion of a [`ChannelMachine`] op.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(in crate::agent) enum JoinStep {
    /// Nothing more.
    Nothing,
    /// The watermark is armed and the machine subscribed: register the feed.
    Subscribed(SubId),
    /// The join failed before its commit: drop the machine and undo it
    /// ([`ChannelMachine::fail`]).
    Failed(JoinError),
    /// The join committed: start the post-commit steps once the registry is loaded.
    Committed,
    /// A re-subscribe after reconnect was refused: a late refusal.
    LateRefusal(String),
    /// The answer to the leave's `listMemberships`, for the parent to judge with the book.
    ListForLeave(Outcome<Reply>),
}

/// The post-commit steps the parent must start for the machine, in this order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(in crate::agent) struct PostCommit {
    /// Request a durable join of this channel with this cursor.
    pub(in crate::agent) durable_join: Option<(ConcreteChannel, Option<u64>)>,
    /// Read the first backfill page: from `start` up to the watermark.
    pub(in crate::agent) backfill: Option<(ReadStart, u64)>,
}

impl ChannelMachine {
    /// The completion of one of its ops.
    pub(in crate::agent) fn on_completion(
        &mut self,
        cx: &mut Ctx,
        op: OpId,
        outcome: Outcome<Reply>,
    ) -> JoinStep {
        let Some((kind, epoch)) = self.ops.remove(&op) else {
            return JoinStep::Nothing;
        };
        match kind {
            ChannelOp::Arm => self.on_arm(cx, epoch, outcome),
            ChannelOp::Subscribe => {
                self.on_subscribe(epoch, outcome);
                JoinStep::Nothing
            }
            ChannelOp::Barrier => self.on_barrier(cx, epoch, outcome),
            ChannelOp::ListForLeave => JoinStep::ListForLeave(outcome),
        }
    }

    fn on_arm(&mut self, cx: &mut Ctx, epoch: u64, outcome: Outcome<Reply>) -> JoinStep {
        if self.epoch != epoch || self.phase != Phase::Arming {
            return JoinStep::Nothing;
        }
        match outcome {
            Outcome::Success(Reply::StreamState(state)) => {
                self.watermark = Some(state.last_seq);
                if let Some(join) = self.join.as_mut() {
                    join.report.watermark = Some(state.last_seq);
                }
                JoinStep::Subscribed(self.subscribe(cx))
            }
            Outcome::Success(other) => JoinStep::Failed(JoinError::Unconfirmed {
                detail: format!("unexpected reply to the frontier read: {other:?}"),
            }),
            Outcome::Failed(f) => JoinStep::Failed(JoinError::Unconfirmed {
                detail: format!("CHAT frontier unreadable: {f}"),
            }),
            Outcome::Unknown => JoinStep::Failed(JoinError::Unconfirmed {
                detail: "CHAT frontier read outcome unknown".into(),
            }),
        }
    }

    fn on_subscribe(&mut self, epoch: u64, outcome: Outcome<Reply>) {
        if self.epoch != epoch {
            return;
        }
        if self.phase == Phase::Subscribing {
            self.phase = Phase::Confirming;
        }
        match outcome {
            Outcome::Success(_) => {}
            Outcome::Failed(f) => {
                // The barrier decides; remember the failure as a refusal reason.
                self.refused.get_or_insert_with(|| f.to_string());
            }
            Outcome::Unknown => {
                self.refused
                    .get_or_insert_with(|| "subscribe outcome unknown".into());
            }
        }
    }

    fn on_barrier(&mut self, cx: &mut Ctx, epoch: u64, outcome: Outcome<Reply>) -> JoinStep {
        if self.epoch != epoch {
            return JoinStep::Nothing;
        }
        let refused = self.refused.clone();
        let confirmed = matches!(outcome, Outcome::Success(_));
        if self.resubscribe {
            // A re-subscribe after reconnect: a refusal here is a late refusal.
            if let Some(detail) = refused {
                return JoinStep::LateRefusal(detail);
            } else if !confirmed {
                // Not confirmed. When the connection is going down, the next restore
                // re-subscribes. On a live connection (a timeout, or an answer lost after the
                // effect), confirm again: until a barrier succeeds, a refusal of the new
                // subscription may still be on its way, and the channel must not be reported
                // live (found by the simulator, seed 1677: a later refusal was parked for a
                // barrier that had already completed, so the channel stayed joined with no
                // subscription).
                if cx.link != Link::Down {
                    let op = self.op(cx, ChannelOp::Barrier);
                    cx.commands.push_back(Command::Barrier { op });
                }
            } else {
                self.resubscribe = false;
            }
            return JoinStep::Nothing;
        }
        if self.phase != Phase::Confirming && self.phase != Phase::Subscribing {
            return JoinStep::Nothing;
        }
        if let Some(detail) = refused {
            let error = if detail.to_ascii_lowercase().contains("permission") {
                JoinError::Refused { detail }
            } else {
                JoinError::Unconfirmed { detail }
            };
            return JoinStep::Failed(error);
        }
        match outcome {
            Outcome::Success(_) => {
                self.phase = Phase::Joined;
                JoinStep::Committed
            }
            Outcome::Failed(f) => JoinStep::Failed(JoinError::Unconfirmed {
                detail: f.to_string(),
            }),
            Outcome::Unknown => JoinStep::Failed(JoinError::Unconfirmed {
                detail: "confirmation outcome unknown".into(),
            }),
        }
    }

    /// A join of the channel while it is joined: an idempotent no-op that reports the mirror's
    /// `generation` (A4).
    pub(in crate::agent) fn report_joined(
        &self,
        cx: &mut Ctx,
        request: RequestId,
        generation: Option<u64>,
    ) {
        cx.events.push_back(AgentEvent::Joined {
            request: Some(request),
            channel: self.channel.clone(),
            report: JoinReport {
                joined: false,
                watermark: None,
                backfilled: 0,
                durable: generation.is_some(),
                generation,
                cursor_honoured: None,
                reason: None,
            },
        });
    }

    /// Whether the post-commit steps are due: committed, a join in progress, not begun.
    pub(in crate::agent) fn post_commit_due(&self) -> bool {
        self.phase == Phase::Joined && self.join.as_ref().is_some_and(|j| !j.started)
    }

    /// Begins the post-commit steps (5 and 6) under `policy`; `member` is the generation of a
    /// membership the book vouches for (mirrored, no close pending), which is adopted. Returns
    /// what the parent must start; the parent then calls [`ChannelMachine::maybe_report`].
    pub(in crate::agent) fn start_post_commit(
        &mut self,
        cx: &Ctx,
        policy: &EffectivePolicy,
        member: Option<u64>,
    ) -> PostCommit {
        let watermark = self.watermark;
        let durable_class = policy.is_durable() && cx.config.durable_backstop;
        let concrete = self.channel.to_concrete();
        // Durable step.
        let mut durable_pending = false;
        let mut durable_join = None;
        let mut backstop = BackstopState::NotApplicable;
        let mut reason = None;
        if durable_class {
            match (&concrete, member) {
                (Some(_), Some(generation)) => {
                    // Already a member (a relaunch's boot join finds it idempotently too). With a
                    // close pending, the daemon is asked instead: the close may have landed.
                    backstop = BackstopState::Established { generation };
                }
                (Some(c), None) => {
                    durable_pending = true;
                    backstop = BackstopState::Requesting;
                    durable_join = Some((c.clone(), watermark));
                }
                (None, _) => {
                    reason = Some(
                        "durable backstop unavailable (a wildcard channel has no membership)"
                            .to_owned(),
                    );
                    backstop = BackstopState::Degraded {
                        reason: reason.clone().unwrap_or_default(),
                        attempts: 0,
                    };
                }
            }
        }
        // Backfill.
        let mut backfill_pending = false;
        let mut backfill = None;
        if let Some(f) = watermark {
            let start = match policy.backfill() {
                Backfill::Skip => None,
                Backfill::Full => Some(ReadStart::Seq(1)),
                Backfill::Window(w) => Some(ReadStart::Time(UnixMillis(
                    cx.last_wall.0.saturating_sub(w.as_millis()),
                ))),
            };
            if let (Some(start), true) = (start, f > 0) {
                backfill_pending = true;
                backfill = Some((start, f));
            }
        }
        self.backstop = backstop;
        if let Some(join) = self.join.as_mut() {
            join.started = true;
            join.durable_pending = durable_pending;
            join.backfill_pending = backfill_pending;
            if reason.is_some() {
                join.report.reason = reason;
            }
            if let BackstopState::Established { generation } = self.backstop {
                join.report.durable = true;
                join.report.generation = Some(generation);
            }
        }
        PostCommit {
            durable_join,
            backfill,
        }
    }

    /// A backfill page read from `start` is about to be issued: remember where it starts.
    pub(in crate::agent) fn read_page(&mut self, start: ReadStart) {
        if let ReadStart::Seq(s) = start {
            self.backfill_next = Some(s);
        }
    }

    /// Whether the backfill page of attempt `epoch` is still wanted.
    pub(in crate::agent) fn page_current(&self, epoch: u64) -> bool {
        self.epoch == epoch && self.phase == Phase::Joined
    }

    /// A backfill page ingested `count` copies.
    pub(in crate::agent) fn backfilled(&mut self, count: u64) {
        if let Some(join) = self.join.as_mut() {
            join.report.backfilled = join.report.backfilled.saturating_add(count);
        }
    }

    /// The backfill finished (with `error` if it failed); reports the join if it is done.
    pub(in crate::agent) fn finish_backfill(&mut self, cx: &mut Ctx, error: Option<String>) {
        if error.is_some() {
            bump(&mut cx.counters.backfill_failures);
        }
        self.backfill_next = None;
        if let Some(join) = self.join.as_mut() {
            join.backfill_pending = false;
            if let Some(e) = error {
                join.report.reason = Some(match join.report.reason.take() {
                    Some(r) => format!("{r}; {e}"),
                    None => e,
                });
            }
        }
        self.maybe_report(cx);
    }

    /// Reports the join once its post-commit steps all finished.
    pub(in crate::agent) fn maybe_report(&mut self, cx: &mut Ctx) {
        let done = self
            .join
            .as_ref()
            .is_some_and(|j| j.started && !j.backfill_pending && !j.durable_pending);
        if !done {
            return;
        }
        let Some(join) = self.join.take() else {
            return;
        };
        cx.events.push_back(AgentEvent::Joined {
            request: join.request,
            channel: self.channel.clone(),
            report: join.report,
        });
    }
}
