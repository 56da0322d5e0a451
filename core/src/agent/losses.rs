//! The loss-record poll (agent side): [`LossPoll`] reads our record in the `losses` bucket at
//! every ready connection and then every [`LOSS_POLL`], when the durable backstop is on (the
//! daemon writes it), and reports what is new as [`AgentEvent::CopiesLost`].
//!
//! - **Owns:** the record as last read, the highest stamp reported in this life, the read in
//!   flight (its op id) and the next poll's deadline.
//! - **Issues:** `KvGetDirect` of `<losses bucket>/<our id>`.
//! - **Routed to it:** the completion of its read ([`LossPoll::owns`]), its deadline
//!   ([`LossPoll::poll_timeout`], timer `Losses`), the connection's loss ([`LossPoll::on_lost`]).

use super::ctx::{Ctx, Link, bump};
use super::types::AgentEvent;
use crate::delivery::losses::{LOSS_POLL, LossLedger};
use crate::io::{Command, Reply};
use crate::op::{OpId, Outcome};
use crate::time::{Instant, Now};
use crate::wire::keys::KvBucket;

/// The loss-record poll. See the module docs.
#[derive(Debug, Default)]
pub(super) struct LossPoll {
    /// Our loss record as last read.
    losses: Option<LossLedger>,
    /// The read in flight.
    reading: Option<OpId>,
    /// The highest loss-record stamp reported in this life.
    reported: u64,
    /// When to read again.
    deadline: Option<Instant>,
}

impl LossPoll {
    /// Our loss record as last read (`None` until one was read).
    pub(super) fn ledger(&self) -> Option<&LossLedger> {
        self.losses.as_ref()
    }

    /// Whether `op` is this child's read.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.reading == Some(op)
    }

    /// The next poll's deadline.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// The deadline fired (the parent popped it): read again.
    pub(super) fn handle_timeout(&mut self, cx: &mut Ctx) {
        self.deadline = None;
        self.read(cx);
    }

    /// The connection is gone (or the agent stopped): no poll until the next ready connection.
    pub(super) fn on_lost(&mut self) {
        self.deadline = None;
    }

    /// Reads our loss record, unless a read is in flight, the backstop is off or the endpoint
    /// is not ready.
    pub(super) fn read(&mut self, cx: &mut Ctx) {
        if !cx.config.durable_backstop
            || self.reading.is_some()
            || cx.stopped
            || cx.link != Link::Ready
        {
            return;
        }
        let op = cx.ops.next_id();
        self.reading = Some(op);
        cx.commands.push_back(Command::KvGetDirect {
            op,
            bucket: KvBucket::Losses.name(&cx.config.space),
            key: cx.config.me.id.as_str().to_owned(),
        });
    }

    /// The read's completion: report the ranges not reported before, schedule the next poll.
    pub(super) fn on_read(&mut self, cx: &mut Ctx, now: Now, outcome: Outcome<Reply>) {
        self.reading = None;
        match outcome {
            Outcome::Success(Reply::Kv(None)) => {}
            Outcome::Success(Reply::Kv(Some(entry))) => match LossLedger::decode(&entry.value) {
                Some(ledger) => {
                    let ranges = ledger.since(self.reported);
                    let more_grew = self.losses.as_ref().is_none_or(|l| l.more != ledger.more)
                        && ledger.more.ranges > 0;
                    cx.counters.copies_lost = ledger.total();
                    if !ranges.is_empty() || (more_grew && ledger.stamp > self.reported) {
                        cx.events.push_back(AgentEvent::CopiesLost {
                            ranges,
                            more: ledger.more,
                            total: ledger.total(),
                        });
                    }
                    self.reported = self.reported.max(ledger.stamp);
                    self.losses = Some(ledger);
                }
                None => bump(&mut cx.counters.loss_records_malformed),
            },
            _ => bump(&mut cx.counters.loss_reads_failed),
        }
        if cx.link == Link::Ready && !cx.stopped && cx.config.durable_backstop {
            self.deadline = Some(now.at + LOSS_POLL);
        }
    }
}
