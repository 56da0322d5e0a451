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
//!
//! **Without a bind.** A consumer whose leader moved to another cluster node (the old one
//! killed) loses what the old leader had sent and nobody received, while this daemon's
//! connection and feed live on: no bind follows. So each `Stranded` also looks at its consumer
//! every [`STRAND_CHECK_INTERVAL`] while the feed is open ([`Stranded::check`]): an ack floor
//! that did not move between two looks, with deliveries pending and the sequence above it not
//! in the hands of fan-out (CHAT) or of the reader (INBOX), is stranded there; the range above it is read back, once per floor
//! (a floor held by a message fan-out holds, or by a traffic too slow to move it, is not). A
//! read-back that fails lets the next look read above the same floor again.

use super::context::Ctx;
use super::events::{DeliveryEvent, Feed};
use crate::delivery::gap::SeqRange;
use crate::delivery::stranded::stranded_range;
use crate::io::{Command, ReadStart, Reply, StoredMessage};
use crate::op::{OpId, Outcome};
use crate::time::Duration;

/// How often the fan-out consumer is looked at for deliveries stranded without a bind.
pub(super) const STRAND_CHECK_INTERVAL: Duration = Duration::from_millis(5_000);

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
    /// The consumer looked at by [`Stranded::check`]: its stream and name (`None`: never).
    consumer: Option<(String, String)>,
    /// The look in flight.
    check_in_flight: Option<OpId>,
    /// The ack floor the last look found.
    last_floor: Option<u64>,
    /// The floor a look already read back above (once per floor).
    read_back_floor: Option<u64>,
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
            consumer: None,
            check_in_flight: None,
            last_floor: None,
            read_back_floor: None,
        }
    }

    /// Also looks at `consumer` (stream, name) every [`STRAND_CHECK_INTERVAL`].
    pub(super) fn checking(mut self, stream: String, name: String) -> Self {
        self.consumer = Some((stream, name));
        self
    }

    /// Looks at the consumer (`CONSUMER.INFO`), unless one look is in flight or this child
    /// does not look. The answer goes to [`Stranded::on_check`].
    pub(super) fn check(&mut self, cx: &mut Ctx) {
        let Some((stream, consumer)) = &self.consumer else {
            return;
        };
        if self.check_in_flight.is_some() {
            return;
        }
        let op = cx.op();
        self.check_in_flight = Some(op);
        cx.push(Command::ConsumerInfo {
            op,
            stream: stream.clone(),
            consumer: consumer.clone(),
        });
    }

    /// Whether `op` is this child's look.
    pub(super) fn owns_check(&self, op: OpId) -> bool {
        self.check_in_flight == Some(op)
    }

    /// A look came back: when the floor stood still since the last look with deliveries pending,
    /// the sequence above it not in fan-out's hands (`held`) and nothing read back above it yet,
    /// the range above it is to be read: true, and the parent calls [`Stranded::next`]. A
    /// failed look changes nothing (the next one comes).
    pub(super) fn on_check(
        &mut self,
        op: OpId,
        outcome: Outcome<Reply>,
        held: &dyn Fn(u64) -> bool,
    ) -> bool {
        if self.check_in_flight.take_if(|o| *o == op).is_none() {
            return false;
        }
        let Outcome::Success(Reply::ConsumerState(state)) = outcome else {
            return false;
        };
        let floor = state.ack_floor_stream_seq;
        let stood_still = self.last_floor.replace(floor) == Some(floor);
        if stood_still
            && self.read_back_floor != Some(floor)
            && self.range.is_none()
            && self.in_flight.is_none()
            && !held(floor.saturating_add(1))
            && let Some(range) =
                stranded_range(state.delivered_stream_seq, floor, state.num_ack_pending)
        {
            self.read_back_floor = Some(floor);
            self.range = Some(range);
            return true;
        }
        false
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
                // The next look may read above this floor again (a read lost while a cluster
                // elects a stream leader must not leave the range to the `ack_wait`).
                self.read_back_floor = None;
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

    /// The connection is gone: the range, the read and the look in flight are forgotten.
    pub(super) fn connection_lost(&mut self) {
        self.range = None;
        self.in_flight = None;
        self.check_in_flight = None;
        self.last_floor = None;
    }
}
