//! The loss-record poll.

use super::*;

impl Agent {
    /// Reads our loss record (at every connect, then every [`LOSS_POLL`]), when the durable
    /// backstop is on (the daemon writes it).
    pub(super) fn read_losses(&mut self) {
        if !self.config.durable_backstop
            || self.losses_reading
            || self.stopped
            || self.link != Link::Ready
        {
            return;
        }
        self.losses_reading = true;
        let op = self.op(Pending::Losses);
        self.commands.push_back(Command::KvGetDirect {
            op,
            bucket: KvBucket::Losses.name(&self.config.space),
            key: self.config.me.id.as_str().to_owned(),
        });
    }

    pub(super) fn on_losses(&mut self, now: Now, outcome: Outcome<Reply>) {
        self.losses_reading = false;
        match outcome {
            Outcome::Success(Reply::Kv(None)) => {}
            Outcome::Success(Reply::Kv(Some(entry))) => match LossLedger::decode(&entry.value) {
                Some(ledger) => {
                    let ranges = ledger.since(self.losses_reported);
                    let more_grew = self.losses.as_ref().is_none_or(|l| l.more != ledger.more)
                        && ledger.more.ranges > 0;
                    self.counters.copies_lost = ledger.total();
                    if !ranges.is_empty() || (more_grew && ledger.stamp > self.losses_reported) {
                        self.events.push_back(AgentEvent::CopiesLost {
                            ranges,
                            more: ledger.more,
                            total: ledger.total(),
                        });
                    }
                    self.losses_reported = self.losses_reported.max(ledger.stamp);
                    self.losses = Some(ledger);
                }
                None => bump(&mut self.counters.loss_records_malformed),
            },
            _ => bump(&mut self.counters.loss_reads_failed),
        }
        if self.link == Link::Ready && !self.stopped && self.config.durable_backstop {
            self.timers.set(Timer::Losses, now.at + LOSS_POLL);
        }
    }
}
