//! The history reader of the join's backfill (§2(a) step 6): [`HistoryReader`] reads CHAT
//! pages `≤ F` for joined channels, one read at a time (the agent's credential grants one
//! pinned reader name, `chathist_<id>_<channel>`), queueing the others in order.
//!
//! - **Owns:** whether a read is in flight, the queue of reads waiting for the reader, and the
//!   reads in flight (by op id) with the channel, join attempt (epoch) and upper bound each
//!   belongs to.
//! - **Issues:** `ReadStream` on `CHAT_<space>`.
//! - **Routed to it:** the completion of each read ([`HistoryReader::owns`]): it frees the
//!   reader, starts the next queued read of a channel still joined in the same attempt (the
//!   parent says which are, through a function), and hands the completed read back to the
//!   parent, which ingests the page and asks for the next one.

use super::ctx::{Ctx, Link};
use crate::constants::HISTORY_FETCH_MAX_BATCH;
use crate::io::{Command, ReadStart};
use crate::op::OpId;
use crate::wire::config::{ConsumerSpec, DeliverPolicy, SpaceStream};
use crate::wire::subject::chat_subscribe_pattern;
use crate::wire::token::Channel;
use std::collections::{BTreeMap, VecDeque};

/// One page read of one channel's join attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PageRead {
    /// The channel.
    pub(super) channel: Channel,
    /// The join attempt (the channel entry's epoch) it belongs to.
    pub(super) epoch: u64,
    /// Where the page starts.
    pub(super) start: ReadStart,
    /// The watermark `F`: nothing above it is read.
    pub(super) until: u64,
}

/// The history reader. See the module docs.
#[derive(Debug, Default)]
pub(super) struct HistoryReader {
    /// A read is in flight (one at a time: one pinned reader name).
    busy: bool,
    queue: VecDeque<PageRead>,
    pending: BTreeMap<OpId, PageRead>,
}

impl HistoryReader {
    /// Whether `op` is one of this child's reads.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.pending.contains_key(&op)
    }

    /// Reads a page now, or queues it while the reader is busy.
    pub(super) fn read(&mut self, cx: &mut Ctx, read: PageRead) {
        if self.busy {
            // One history reader at a time: the agent's credential grants one pinned name.
            self.queue.push_back(read);
            return;
        }
        self.issue(cx, read);
    }

    fn issue(&mut self, cx: &mut Ctx, read: PageRead) {
        self.busy = true;
        let filter = chat_subscribe_pattern(&cx.config.space, &read.channel);
        let reader = ConsumerSpec::chathist(
            &cx.config.space,
            &cx.config.me.id,
            &read.channel,
            DeliverPolicy::All,
        )
        .name;
        let op = cx.ops.next_id();
        let (start, until) = (read.start, read.until);
        self.pending.insert(op, read);
        cx.commands.push_back(Command::ReadStream {
            op,
            stream: SpaceStream::Chat.name(&cx.config.space),
            filter,
            start,
            last_seq: Some(until),
            max: HISTORY_FETCH_MAX_BATCH,
            reader: Some(reader),
        });
    }

    /// The read `op` completed: the reader is free again, so start the next queued page of a
    /// channel still joined in the same attempt (`current(channel, epoch)`), then return the
    /// completed read for the parent to handle.
    pub(super) fn on_completion(
        &mut self,
        cx: &mut Ctx,
        op: OpId,
        current: impl Fn(&Channel, u64) -> bool,
    ) -> Option<PageRead> {
        let done = self.pending.remove(&op)?;
        self.busy = false;
        if cx.link == Link::Down {
            // The reads of this connection are over; a restore does not re-backfill.
            self.queue.clear();
            return Some(done);
        }
        while let Some(read) = self.queue.pop_front() {
            if current(&read.channel, read.epoch) {
                self.issue(cx, read);
                break;
            }
        }
        Some(done)
    }
}
