//! Sequence continuity: CHAT ranges fan-out skipped, read back to tell what was evicted.

use super::*;

impl Delivery {
    /// Starts the check of the oldest skipped range, unless one is in flight.
    pub(super) fn next_gap_check(&mut self) {
        let in_flight = self
            .pending
            .values()
            .any(|p| matches!(p, Pending::GapCheck { .. }));
        if in_flight || !self.connected || self.stopped {
            return;
        }
        let Some((range, attempt)) = self.gap_queue.pop_front() else {
            return;
        };
        let max = u32::try_from(self.gap_page(range)).unwrap_or(u32::MAX);
        let op = self.op(Pending::GapCheck { range, attempt });
        self.commands.push_back(Command::ReadStream {
            op,
            stream: SpaceStream::Chat.name(&self.config.space),
            filter: chat_wildcard(&self.config.space),
            start: ReadStart::Seq(range.first),
            last_seq: Some(range.last),
            max,
            reader: None,
        });
    }

    /// A skipped range was read back from CHAT: what CHAT no longer holds is lost. A page that
    /// came back full judges only up to its last message; the rest is checked next.
    pub(super) fn on_gap_check(
        &mut self,
        now: Now,
        range: SeqRange,
        attempt: u32,
        outcome: Outcome<Reply>,
    ) {
        match outcome {
            Outcome::Success(Reply::Stored(messages)) => {
                let full =
                    u64::try_from(messages.len()).unwrap_or(u64::MAX) >= self.gap_page(range);
                let judged_to = match messages.last() {
                    Some(m) if full => m.seq.min(range.last),
                    _ => range.last,
                };
                let judged = SeqRange::new(range.first, judged_to).unwrap_or(range);
                for lost in missing(judged, messages.iter().map(|m| m.seq)) {
                    self.counters.evicted_before_fanout += lost.len();
                    self.tell_evicted(lost);
                    self.emit(DeliveryEvent::EvictedBeforeFanout {
                        first: lost.first,
                        last: lost.last,
                        verified: true,
                    });
                }
                if let Some(rest) = SeqRange::new(judged.last + 1, range.last) {
                    self.gap_queue.push_front((rest, 0));
                }
            }
            other => {
                let detail = match other {
                    Outcome::Failed(f) => f.to_string(),
                    Outcome::Unknown => "outcome unknown".to_owned(),
                    Outcome::Success(r) => format!("unexpected reply {r:?}"),
                };
                let attempt = attempt.saturating_add(1);
                if attempt >= GAP_CHECK_ATTEMPTS {
                    self.give_up_gap_check(range, &detail);
                } else {
                    self.gap_queue.push_front((range, attempt));
                    self.timers
                        .set(Timer::GapCheck, now.at + backoff(attempt - 1));
                    return;
                }
            }
        }
        self.next_gap_check();
    }

    /// A skipped range that cannot be checked is reported as possibly lost: a loss is never
    /// silent, and a false alarm is the lesser error.
    pub(super) fn give_up_gap_check(&mut self, range: SeqRange, detail: &str) {
        self.counters.gaps_unverified += range.len();
        self.tell_evicted(range);
        self.emit(DeliveryEvent::EvictedBeforeFanout {
            first: range.first,
            last: range.last,
            verified: false,
        });
        self.emit(DeliveryEvent::FeedProblem {
            feed: Feed::Fanout,
            detail: format!(
                "CHAT {}..={} skipped by fan-out and not checked: {detail}",
                range.first, range.last
            ),
        });
    }

    /// How many messages one check of `range` reads at most.
    pub(super) fn gap_page(&self, range: SeqRange) -> u64 {
        range.len().min(u64::from(self.config.catchup_page.max(1)))
    }

    /// Forgets the check in flight (its answer will be ignored) and returns its range.
    pub(super) fn take_gap_check_in_flight(&mut self) -> Option<(SeqRange, u32)> {
        let (op, range, attempt) = self.pending.iter().find_map(|(op, p)| match p {
            Pending::GapCheck { range, attempt } => Some((*op, *range, *attempt)),
            _ => None,
        })?;
        self.pending.remove(&op);
        Some((range, attempt))
    }

    pub(super) fn give_up_gap_checks(&mut self, detail: &str) {
        self.timers.cancel(&Timer::GapCheck);
        let queued: Vec<(SeqRange, u32)> = self
            .take_gap_check_in_flight()
            .into_iter()
            .chain(self.gap_queue.drain(..))
            .collect();
        for (range, _) in queued {
            self.give_up_gap_check(range, detail);
        }
    }
}
