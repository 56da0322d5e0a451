//! Stranded deliveries read back: what a consumer of the daemon's offered to a feed that is gone
//! is read from its stream when the consumer is bound, and handled at once rather than after
//! the consumer's `ack_wait` ([`crate::delivery::stranded`] has the rule and why it is safe).
//! One [`Stranded`] per consumer: the fan-out's (CHAT; its messages are fanned out as
//! [`super::fanout::Offer::ReadBack`]) and the reader's (INBOX; its entries go to
//! [`super::reader::Reader::on_read_back`]).
//!
//! [`Stranded`] owns the range still to read and the one read in flight (its op id). It issues
//! `ReadStream` commands, a page at a time, and hands the messages each page returns to the
//! parent. It sets no timer: a read that fails ends the read-back (reported, counted), and the
//! consumer's redelivery serves what it would have read. A new bind replaces the range; a
//! connection loss forgets it (the bind that follows the reconnect sets the next one).

use super::context::Ctx;
use super::events::{DeliveryEvent, Feed};
use crate::delivery::gap::SeqRange;
use crate::io::{Command, ReadStart, Reply, StoredMessage};
use crate::op::{OpId, Outcome};

/// The read-back child of [`super::Delivery`].
#[derive(Debug)]
pub(super) struct Stranded {
    /// The feed whose consumer this reads behind (named in reports).
    feed: Feed,
    /// The stream and the consumer's filter.
    stream: String,
    filter: String,
    /// The most messages one read returns ([`super::DeliveryConfig::catchup_page`]).
    page: u32,
    /// What is still to read.
    range: Option<SeqRange>,
    /// The read in flight: its op and the range it reads.
    in_flight: Option<(OpId, SeqRange)>,
}

impl Stranded {
    pub(super) fn new(feed: Feed, stream: String, filter: String, page: u32) -> Self {
        Stranded {
            feed,
            stream,
            filter,
            page: page.max(1),
            range: None,
            in_flight: None,
        }
    }

    /// The fan-out consumer was bound with `range` possibly stranded
    /// ([`crate::delivery::stranded::stranded_range`]): it replaces whatever was left to read
    /// (a read in flight is forgotten; its answer will be ignored).
    pub(super) fn bound(&mut self, range: Option<SeqRange>) {
        self.range = range;
        self.in_flight = None;
    }

    /// Whether `op` is this child's read.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.in_flight.is_some_and(|(o, _)| o == op)
    }

    /// Reads the next page, unless nothing is left or the daemon may not read (`live` false).
    /// Called at the bind and after a page was handled: never with a page in flight.
    pub(super) fn next(&mut self, cx: &mut Ctx, live: bool) {
        debug_assert!(self.in_flight.is_none(), "one read-back page at a time");
        if !live {
            return;
        }
        let Some(range) = self.range.take() else {
            return;
        };
        let op = cx.op();
        self.in_flight = Some((op, range));
        cx.push(Command::ReadStream {
            op,
            stream: self.stream.clone(),
            filter: self.filter.clone(),
            start: ReadStart::Seq(range.first),
            last_seq: Some(range.last),
            max: self.page,
            reader: None,
        });
    }

    /// A page came back: its messages within the range, for the parent to fan out (then it
    /// calls [`Stranded::next`]). A page that came back full leaves the rest of the range to
    /// read; a failed read ends the read-back.
    pub(super) fn on_completion(
        &mut self,
        cx: &mut Ctx,
        op: OpId,
        outcome: Outcome<Reply>,
    ) -> Vec<StoredMessage> {
        let Some((_, range)) = self.in_flight.take_if(|(o, _)| *o == op) else {
            return Vec::new();
        };
        match outcome {
            Outcome::Success(Reply::Stored(mut messages)) => {
                messages.retain(|m| m.seq >= range.first && m.seq <= range.last);
                let full = messages.len() >= usize::try_from(self.page).unwrap_or(usize::MAX);
                if full && let Some(last) = messages.last() {
                    self.range = SeqRange::new(last.seq + 1, range.last);
                }
                cx.counters.stranded_read_back += messages.len() as u64;
                messages
            }
            other => {
                let detail = match other {
                    Outcome::Failed(f) => f.to_string(),
                    Outcome::Unknown => "outcome unknown".to_owned(),
                    Outcome::Success(r) => format!("unexpected reply {r:?}"),
                };
                cx.counters.stranded_reads_failed += 1;
                cx.emit(DeliveryEvent::FeedProblem {
                    feed: self.feed,
                    detail: format!(
                        "reading back {} {}..={} (offered to a feed that is gone) failed: \
                         {detail}; the consumer redelivers it after its ack_wait",
                        self.stream, range.first, range.last
                    ),
                });
                Vec::new()
            }
        }
    }

    /// The connection is gone: the range and the read in flight are forgotten.
    pub(super) fn connection_lost(&mut self) {
        self.range = None;
        self.in_flight = None;
    }
}
