//! Sequence continuity: the CHAT ranges fan-out skipped, read back from CHAT to tell which
//! messages left the stream before fan-out routed them (G40).
//!
//! [`Gaps`] owns the fan-out sequence cursor, the queue of skipped ranges still to check and the
//! one check in flight (its op id). It issues `ReadStream` commands of CHAT, one at a time, and
//! sets [`Timer::GapCheck`] to retry a failed read with backoff. A range it finds missing (or
//! gives up on after [`GAP_CHECK_ATTEMPTS`]) is counted and reported here
//! ([`DeliveryEvent::EvictedBeforeFanout`]) and handed back to the parent, which tells the
//! members concerned through the loss notices ([`super::notices`]).

use super::config::GAP_CHECK_ATTEMPTS;
use super::context::Ctx;
use super::events::{DeliveryEvent, Feed};
use super::types::Timer;
use crate::constants::backoff;
use crate::delivery::gap::{SeqRange, SequenceCursor, missing};
use crate::io::{Command, ReadStart, Reply};
use crate::op::{OpId, Outcome};
use crate::time::Now;
use crate::wire::config::SpaceStream;
use crate::wire::subject::chat_wildcard;
use crate::wire::token::Space;
use std::collections::VecDeque;

/// The sequence-continuity child of [`super::Delivery`].
#[derive(Debug)]
pub(super) struct Gaps {
    space: Space,
    /// The most messages one check reads ([`super::DeliveryConfig::catchup_page`]).
    page: u32,
    /// Where fan-out's consumer is: a delivery past the next expected sequence is a skip.
    cursor: SequenceCursor,
    /// Skipped CHAT ranges still to check, with the attempts made.
    queue: VecDeque<(SeqRange, u32)>,
    /// The check in flight: its op, range and attempts made.
    in_flight: Option<(OpId, SeqRange, u32)>,
}

/// What a completed check asks of the parent.
#[derive(Debug, Default)]
pub(super) struct GapReport {
    /// Ranges lost before fan-out (already counted and reported): tell the members concerned.
    pub(super) lost: Vec<SeqRange>,
    /// Start the next check ([`Gaps::next`]) once they are told.
    pub(super) next: bool,
    /// The messages of the range CHAT still holds: offered to a feed that is gone, never seen
    /// here; the parent fans them out ([`crate::delivery::stranded`]).
    pub(super) present: Vec<crate::io::StoredMessage>,
}

impl Gaps {
    pub(super) fn new(space: Space, page: u32) -> Self {
        Gaps {
            space,
            page,
            cursor: SequenceCursor::new(),
            queue: VecDeque::new(),
            in_flight: None,
        }
    }

    /// The fan-out consumer was bound at `delivered_stream_seq`.
    pub(super) fn bound(&mut self, delivered_stream_seq: u64) {
        self.cursor.bound(delivered_stream_seq);
    }

    /// Fan-out received `seq`: true when it skipped a range, queued for a check ([`Gaps::next`]).
    pub(super) fn offered(&mut self, seq: u64) -> bool {
        match self.cursor.offered(seq) {
            Some(skipped) => {
                self.queue.push_back((skipped, 0));
                true
            }
            None => false,
        }
    }

    /// Whether `op` is this child's check.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.in_flight.is_some_and(|(o, _, _)| o == op)
    }

    /// Starts the check of the oldest skipped range, unless one is in flight or the daemon may
    /// not read (`live` false: disconnected or stopped).
    pub(super) fn next(&mut self, cx: &mut Ctx, live: bool) {
        if self.in_flight.is_some() || !live {
            return;
        }
        let Some((range, attempt)) = self.queue.pop_front() else {
            return;
        };
        let max = u32::try_from(self.page_of(range)).unwrap_or(u32::MAX);
        let op = cx.op();
        self.in_flight = Some((op, range, attempt));
        cx.push(Command::ReadStream {
            op,
            stream: SpaceStream::Chat.name(&self.space),
            filter: chat_wildcard(&self.space),
            start: ReadStart::Seq(range.first),
            last_seq: Some(range.last),
            max,
            reader: None,
        });
    }

    /// A skipped range was read back from CHAT: what CHAT no longer holds is lost. A page that
    /// came back full judges only up to its last message; the rest is checked next.
    pub(super) fn on_completion(
        &mut self,
        cx: &mut Ctx,
        now: Now,
        op: OpId,
        outcome: Outcome<Reply>,
    ) -> GapReport {
        let mut report = GapReport::default();
        let Some((_, range, attempt)) = self.in_flight.take_if(|(o, _, _)| *o == op) else {
            return report;
        };
        match outcome {
            Outcome::Success(Reply::Stored(messages)) => {
                let full = u64::try_from(messages.len()).unwrap_or(u64::MAX) >= self.page_of(range);
                let judged_to = match messages.last() {
                    Some(m) if full => m.seq.min(range.last),
                    _ => range.last,
                };
                let judged = SeqRange::new(range.first, judged_to).unwrap_or(range);
                for lost in missing(judged, messages.iter().map(|m| m.seq)) {
                    cx.counters.evicted_before_fanout += lost.len();
                    report.lost.push(lost);
                    cx.emit(DeliveryEvent::EvictedBeforeFanout {
                        first: lost.first,
                        last: lost.last,
                        verified: true,
                    });
                }
                if let Some(rest) = SeqRange::new(judged.last + 1, range.last) {
                    self.queue.push_front((rest, 0));
                }
                report.present = messages
                    .into_iter()
                    .filter(|m| m.seq >= judged.first && m.seq <= judged.last)
                    .collect();
            }
            other => {
                let detail = match other {
                    Outcome::Failed(f) => f.to_string(),
                    Outcome::Unknown => "outcome unknown".to_owned(),
                    Outcome::Success(r) => format!("unexpected reply {r:?}"),
                };
                let attempt = attempt.saturating_add(1);
                if attempt >= GAP_CHECK_ATTEMPTS {
                    report.lost.push(give_up(cx, range, &detail));
                } else {
                    self.queue.push_front((range, attempt));
                    cx.timers
                        .set(Timer::GapCheck, now.at + backoff(attempt - 1));
                    return report;
                }
            }
        }
        report.next = true;
        report
    }

    /// The connection is gone: the check in flight is forgotten (its answer will be ignored) and
    /// its range checked again first.
    pub(super) fn connection_lost(&mut self) {
        if let Some((_, range, attempt)) = self.in_flight.take() {
            self.queue.push_front((range, attempt));
        }
    }

    /// Gives up every range still to check (the daemon stops): each is reported as possibly
    /// lost and returned for the parent to tell the members concerned.
    pub(super) fn give_up_all(&mut self, cx: &mut Ctx, detail: &str) -> Vec<SeqRange> {
        cx.timers.cancel(&Timer::GapCheck);
        let queued: Vec<(SeqRange, u32)> = self
            .in_flight
            .take()
            .map(|(_, range, attempt)| (range, attempt))
            .into_iter()
            .chain(self.queue.drain(..))
            .collect();
        queued
            .into_iter()
            .map(|(range, _)| give_up(cx, range, detail))
            .collect()
    }

    /// How many messages one check of `range` reads at most.
    fn page_of(&self, range: SeqRange) -> u64 {
        range.len().min(u64::from(self.page.max(1)))
    }
}

/// A skipped range that cannot be checked is reported as possibly lost: a loss is never silent,
/// and a false alarm is the lesser error.
fn give_up(cx: &mut Ctx, range: SeqRange, detail: &str) -> SeqRange {
    cx.counters.gaps_unverified += range.len();
    cx.emit(DeliveryEvent::EvictedBeforeFanout {
        first: range.first,
        last: range.last,
        verified: false,
    });
    cx.emit(DeliveryEvent::FeedProblem {
        feed: Feed::Fanout,
        detail: format!(
            "CHAT {}..={} skipped by fan-out and not checked: {detail}",
            range.first, range.last
        ),
    });
    range
}
