//! Loss notices: losses folded into each owner's loss record ([`crate::delivery::losses`]).

use super::*;

impl Delivery {
    /// A copy of `seq` on `channel` is lost to `owner`: fold it into the owner's loss record
    /// ([`crate::delivery::losses`]), written now or after the read or write in flight.
    pub(super) fn tell_loss(
        &mut self,
        owner: &AgentId,
        channel: &ConcreteChannel,
        seq: u64,
        reason: LossReason,
    ) {
        let step = self
            .notices
            .lost(owner, channel.as_str(), seq, seq, 1, reason);
        if !self.connected || self.stopped {
            // Written after the reconnect ([`LossNotices::resume`]).
            self.notices.interrupt();
            return;
        }
        if let Some(step) = step {
            self.issue_notice(step);
        }
    }

    /// CHAT messages `range` left the stream before fan-out routed them: every member of this
    /// shard whose current interval overlaps the range is told the overlap, on that channel.
    /// Which of those sequences were on the member's channel is unknown (they are gone), so the
    /// notice names the whole overlap: an upper bound, never an omission.
    pub(super) fn tell_evicted(&mut self, range: SeqRange) {
        let mut told = Vec::new();
        for rec in self.members.records() {
            if !self.config.shard.owns(&rec.owner) {
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
            if !self.connected || self.stopped {
                self.notices.interrupt();
            } else if let Some(step) = step {
                self.issue_notice(step);
            }
        }
    }

    pub(super) fn issue_notice(&mut self, step: NoticeStep) {
        let bucket = KvBucket::Losses.name(&self.config.space);
        match step {
            NoticeStep::Read { owner } => {
                let key = owner.as_str().to_owned();
                let op = self.op(Pending::LossNotice { owner });
                self.cx
                    .commands
                    .push_back(Command::KvGet { op, bucket, key });
            }
            NoticeStep::Write {
                owner,
                value,
                condition,
            } => {
                let key = owner.as_str().to_owned();
                let op = self.op(Pending::LossNotice { owner });
                self.cx.commands.push_back(Command::KvPut {
                    op,
                    bucket,
                    key,
                    value,
                    condition,
                });
            }
        }
    }

    pub(super) fn on_loss_notice(&mut self, owner: AgentId, outcome: Outcome<Reply>) {
        let ended = match outcome {
            Outcome::Success(Reply::Kv(entry)) => {
                NoticeOutcome::Read(entry.map(|e| (e.value, e.revision)))
            }
            Outcome::Success(Reply::KvWritten { revision }) => {
                self.cx.counters.loss_notices_written += 1;
                NoticeOutcome::Written(revision)
            }
            other => {
                self.cx.counters.loss_notices_failed += 1;
                self.emit(DeliveryEvent::LossNoticeFailed {
                    owner: owner.clone(),
                    detail: outcome_detail(&other),
                });
                NoticeOutcome::Failed
            }
        };
        if let Some(step) = self.notices.ended(&owner, ended) {
            self.issue_notice(step);
        }
    }
}
