//! Loss notices: every copy the daemon knows lost is folded into its owner's loss record in the
//! losses bucket ([`crate::delivery::losses`]).
//!
//! [`Notifier`] owns the [`LossNotices`] machine (one read-modify-write per owner at a time) and
//! the op ids of the reads and writes it issued (`KvGet`/`KvPut` of `cotal_losses_<space>`).
//! The parent tells it a loss from the reader (a shed, a dropped or given-up entry) or from the
//! gap checks (a range evicted before fan-out, with the membership view to find the members
//! concerned), routes its completions back by op id, and interrupts or resumes it with the
//! connection and the lease.

use super::context::Ctx;
use super::events::DeliveryEvent;
use super::index::MemberIndex;
use super::types::outcome_detail;
use crate::delivery::gap::SeqRange;
use crate::delivery::losses::{LossNotices, LossReason, NoticeOutcome, NoticeStep};
use crate::io::{Command, Reply};
use crate::op::{OpId, Outcome};
use crate::registry::current_interval;
use crate::wire::keys::KvBucket;
use crate::wire::shard::Shard;
use crate::wire::token::{AgentId, ConcreteChannel, Space};
use std::collections::BTreeMap;

/// The loss-notice child of [`super::Delivery`].
#[derive(Debug)]
pub(super) struct Notifier {
    space: Space,
    /// Each member's losses on their way to its loss record.
    notices: LossNotices,
    /// The reads and writes in flight: op → owner.
    pending: BTreeMap<OpId, AgentId>,
}

impl Notifier {
    pub(super) fn new(space: Space) -> Self {
        Notifier {
            space,
            notices: LossNotices::default(),
            pending: BTreeMap::new(),
        }
    }

    /// A copy of `seq` on `channel` is lost to `owner`: fold it into the owner's loss record,
    /// written now or after the read or write in flight. `live` is false while the daemon may
    /// not write (disconnected or stopped): the loss waits for [`Notifier::resume`].
    pub(super) fn lost(
        &mut self,
        cx: &mut Ctx,
        live: bool,
        owner: &AgentId,
        channel: &ConcreteChannel,
        seq: u64,
        reason: LossReason,
    ) {
        let step = self
            .notices
            .lost(owner, channel.as_str(), seq, seq, 1, reason);
        if !live {
            // Written after the reconnect ([`LossNotices::resume`]).
            self.notices.interrupt();
            return;
        }
        if let Some(step) = step {
            self.issue(cx, step);
        }
    }

    /// CHAT messages `range` left the stream before fan-out routed them: every member of this
    /// shard whose current interval overlaps the range is told the overlap, on that channel.
    /// Which of those sequences were on the member's channel is unknown (they are gone), so the
    /// notice names the whole overlap: an upper bound, never an omission.
    pub(super) fn evicted(
        &mut self,
        cx: &mut Ctx,
        live: bool,
        members: &MemberIndex,
        shard: Shard,
        range: SeqRange,
    ) {
        let mut told = Vec::new();
        for rec in members.records() {
            if !shard.owns(&rec.owner) {
                continue;
            }
            let Some(interval) = current_interval(rec) else {
                continue;
            };
            let lo = range.first.max(interval.join_cursor.saturating_add(1));
            let hi = range.last.min(interval.leave_cursor.unwrap_or(u64::MAX));
            if lo <= hi {
                told.push((rec.owner.clone(), rec.channel.clone(), lo, hi));
            }
        }
        for (owner, channel, lo, hi) in told {
            let step = self.notices.lost(
                &owner,
                channel.as_str(),
                lo,
                hi,
                hi - lo + 1,
                LossReason::EvictedBeforeFanout,
            );
            if !live {
                self.notices.interrupt();
            } else if let Some(step) = step {
                self.issue(cx, step);
            }
        }
    }

    /// The daemon stopped: the notices wait (their answers in flight still count).
    pub(super) fn interrupt(&mut self) {
        self.notices.interrupt();
    }

    /// The connection is gone: the notices wait and the answers in flight are forgotten.
    pub(super) fn connection_lost(&mut self) {
        self.pending.clear();
        self.notices.interrupt();
    }

    /// The connection is back (lease held): write what waited.
    pub(super) fn resume(&mut self, cx: &mut Ctx) {
        for step in self.notices.resume() {
            self.issue(cx, step);
        }
    }

    /// Whether `op` is one of this child's reads or writes.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.pending.contains_key(&op)
    }

    /// A read or write of an owner's loss record completed.
    pub(super) fn on_completion(&mut self, cx: &mut Ctx, op: OpId, outcome: Outcome<Reply>) {
        let Some(owner) = self.pending.remove(&op) else {
            return;
        };
        let ended = match outcome {
            Outcome::Success(Reply::Kv(entry)) => {
                NoticeOutcome::Read(entry.map(|e| (e.value, e.revision)))
            }
            Outcome::Success(Reply::KvWritten { revision }) => {
                cx.counters.loss_notices_written += 1;
                NoticeOutcome::Written(revision)
            }
            other => {
                cx.counters.loss_notices_failed += 1;
                cx.emit(DeliveryEvent::LossNoticeFailed {
                    owner: owner.clone(),
                    detail: outcome_detail(&other),
                });
                NoticeOutcome::Failed
            }
        };
        if let Some(step) = self.notices.ended(&owner, ended) {
            self.issue(cx, step);
        }
    }

    fn issue(&mut self, cx: &mut Ctx, step: NoticeStep) {
        let bucket = KvBucket::Losses.name(&self.space);
        match step {
            NoticeStep::Read { owner } => {
                let key = owner.as_str().to_owned();
                let op = cx.op();
                self.pending.insert(op, owner);
                cx.push(Command::KvGet { op, bucket, key });
            }
            NoticeStep::Write {
                owner,
                value,
                condition,
            } => {
                let key = owner.as_str().to_owned();
                let op = cx.op();
                self.pending.insert(op, owner);
                cx.push(Command::KvPut {
                    op,
                    bucket,
                    key,
                    value,
                    condition,
                });
            }
        }
    }
}
