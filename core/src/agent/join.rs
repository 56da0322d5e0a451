//! The join's routing (parent code, `impl Agent`): the channel machines do the join
//! (`channel/join.rs`), the membership book decides the membership (`members/join.rs`); the
//! parent registers a machine's feed, drops a failed join, hands the post-commit plan's durable
//! join to the book and its backfill pages to the history reader (their copies to the
//! receiver), and applies the book's verdicts (on a durable join answer, a reconcile, an audit)
//! to the machine.

use super::Agent;
use super::channel::join::JoinStep;
use super::channel::{ChannelMachine, ChannelOp};
use super::ctx::Link;
use super::established;
use super::history::PageRead;
use super::members::join::JoinVerdict;
use super::state::{Feed, Pending};
use super::types::{AgentEvent, JoinError, RequestId};
use crate::constants::HISTORY_FETCH_MAX_BATCH;
use crate::io::{ReadStart, Reply};
use crate::ledger::CopySource;
use crate::op::{OpId, Outcome};
use crate::time::Now;
use crate::wire::token::{Channel, ConcreteChannel};

impl Agent {
    pub(super) fn start_join(&mut self, channel: Channel, request: Option<RequestId>) {
        let epoch = self.epoch();
        let machine = ChannelMachine::start(&mut self.cx, channel.clone(), epoch, request);
        self.channels.insert(channel, machine);
    }

    pub(super) fn resubscribe(&mut self, channel: &Channel) {
        let epoch = self.epoch();
        if let Some(machine) = self.channels.get_mut(channel) {
            let sub = machine.resubscribe(&mut self.cx, epoch);
            self.feeds.insert(sub, Feed::Chat(epoch));
        }
    }

    /// Drops a channel's machine; its ops still in flight are retired.
    pub(super) fn remove_channel(&mut self, channel: &Channel) -> Option<ChannelMachine> {
        let machine = self.channels.remove(channel)?;
        for (op, kind) in machine.ops() {
            if kind == ChannelOp::ListForLeave {
                // Routed by channel name, as a leave's list always was.
                let channel = channel.clone();
                self.pending.insert(op, Pending::ListForLeave { channel });
            } else {
                self.retired.insert(op);
            }
        }
        Some(machine)
    }

    /// A join attempt failed before its commit: drop the machine, which undoes it and reports.
    pub(super) fn fail_join(&mut self, channel: &Channel, error: JoinError) {
        if let Some(machine) = self.remove_channel(channel)
            && let Some(sub) = machine.fail(&mut self.cx, error)
        {
            self.feeds.remove(&sub);
        }
    }

    pub(super) fn on_channel_completion(
        &mut self,
        channel: Channel,
        op: OpId,
        outcome: Outcome<Reply>,
    ) {
        let Some(machine) = self.channels.get_mut(&channel) else {
            return;
        };
        match machine.on_completion(&mut self.cx, op, outcome) {
            JoinStep::Nothing => {}
            JoinStep::Subscribed(sub) => {
                let epoch = machine.epoch();
                self.feeds.insert(sub, Feed::Chat(epoch));
            }
            JoinStep::Failed(error) => self.fail_join(&channel, error),
            JoinStep::Committed => self.maybe_start_post_commit(&channel),
            JoinStep::LateRefusal(detail) => self.late_refusal(&channel, detail),
            JoinStep::ListForLeave(outcome) => self.on_list_for_leave(channel, outcome),
        }
    }

    /// After the commit, once the registry is loaded: the durable step and the backfill.
    pub(super) fn maybe_start_post_commit(&mut self, channel: &Channel) {
        if self.cx.link != Link::Ready {
            return;
        }
        let Some(machine) = self.channels.get_mut(channel) else {
            return;
        };
        if !machine.post_commit_due() {
            return;
        }
        let policy = self.watch.registry().policy_for(channel);
        let member = channel
            .to_concrete()
            .and_then(|c| self.members.adoptable(&c));
        let plan = machine.start_post_commit(&self.cx, &policy, member);
        if let Some((c, cursor)) = plan.durable_join {
            self.members.request_durable_join(&mut self.cx, c, cursor);
        }
        if let Some((start, until)) = plan.backfill {
            self.read_backfill(channel, start, until);
        }
        self.maybe_report_join(channel);
    }

    pub(super) fn maybe_report_join(&mut self, channel: &Channel) {
        if let Some(machine) = self.channels.get_mut(channel) {
            machine.maybe_report(&mut self.cx);
        }
    }

    pub(super) fn read_backfill(&mut self, channel: &Channel, start: ReadStart, until: u64) {
        let Some(machine) = self.channels.get_mut(channel) else {
            return;
        };
        machine.read_page(start);
        let epoch = machine.epoch();
        self.history.read(
            &mut self.cx,
            PageRead {
                channel: channel.clone(),
                epoch,
                start,
                until,
            },
        );
    }

    /// A backfill page's completion (the reader has moved on already): its copies go to the
    /// receiver; the machine reads the next page or finishes.
    pub(super) fn on_backfill(&mut self, now: Now, read: PageRead, outcome: Outcome<Reply>) {
        let PageRead {
            channel,
            epoch,
            until,
            ..
        } = read;
        if !self
            .channels
            .get(&channel)
            .is_some_and(|m| m.page_current(epoch))
        {
            return;
        }
        let error = match outcome {
            Outcome::Success(Reply::Stored(messages)) => {
                let full = messages.len() >= HISTORY_FETCH_MAX_BATCH as usize;
                let mut last = None;
                let mut count = 0u64;
                for m in messages {
                    if m.seq > until {
                        break;
                    }
                    last = Some(m.seq);
                    count += 1;
                    let channels = &self.channels;
                    self.receiver.ingest_chat(
                        &mut self.cx,
                        now,
                        &m.subject,
                        &m.payload,
                        CopySource::Backfill,
                        |c| established(channels, c),
                    );
                }
                if let Some(machine) = self.channels.get_mut(&channel) {
                    machine.backfilled(count);
                }
                match last {
                    Some(l) if full && l < until => {
                        self.read_backfill(&channel, ReadStart::Seq(l + 1), until);
                        return;
                    }
                    _ => None,
                }
            }
            Outcome::Success(other) => Some(format!("backfill failed: unexpected reply {other:?}")),
            Outcome::Failed(f) => Some(format!("backfill failed: {f}")),
            Outcome::Unknown => Some("backfill interrupted".to_owned()),
        };
        if let Some(machine) = self.channels.get_mut(&channel) {
            machine.finish_backfill(&mut self.cx, error);
        }
    }

    /// The answer to a durable join (the book's op): the book judges it ([`Members::on_durable_join`](super::members::Members::on_durable_join))
    /// with what the channel's machine says, and the parent applies the verdict to the machine.
    pub(super) fn on_durable_join(
        &mut self,
        now: Now,
        channel: ConcreteChannel,
        cursor: Option<u64>,
        outcome: Outcome<Reply>,
    ) {
        let key = channel.as_channel();
        let staying = self.channels.get(&key).is_some_and(ChannelMachine::staying);
        let attempts = self
            .channels
            .get(&key)
            .map_or(0, ChannelMachine::degraded_attempts);
        let verdict = self.members.on_durable_join(
            &mut self.cx,
            now,
            channel.clone(),
            cursor,
            outcome,
            staying,
            attempts,
        );
        match verdict {
            JoinVerdict::Ignore => return,
            JoinVerdict::Established {
                generation,
                honoured,
            } => {
                if let Some(machine) = self.channels.get_mut(&key) {
                    machine.backstop_established(generation, honoured);
                }
                self.cx.events.push_back(AgentEvent::BackstopEstablished {
                    channel,
                    generation,
                });
            }
            JoinVerdict::Unavailable { reason, attempts } => {
                if let Some(machine) = self.channels.get_mut(&key) {
                    machine.backstop_unavailable(&reason, attempts);
                }
                if attempts == 0 {
                    self.cx
                        .events
                        .push_back(AgentEvent::BackstopDegraded { channel, reason });
                }
            }
        }
        self.maybe_report_join(&key);
    }

    /// Re-establishes the backstop of a joined channel when the book says a reconcile is due:
    /// the machine counts the attempt and gives the cursor, the book sends the durable join.
    pub(super) fn reconcile(&mut self, channel: ConcreteChannel) {
        let Some(machine) = self.channels.get_mut(&channel.as_channel()) else {
            return;
        };
        if !machine.joined() {
            return;
        }
        if !self
            .members
            .reconcile_due(&self.cx, &channel, machine.leaving())
        {
            return;
        }
        // One more attempt counted; the cursor is the armed watermark (G1).
        let cursor = machine.reconcile_attempt();
        self.members.reconcile(&mut self.cx, channel, cursor);
    }

    /// A `listMemberships` answer to the audit `op`: the book judges it against the channel map
    /// (lent as two functions), and the parent acts on the verdict: a lost membership degrades
    /// its channel's backstop and is reconciled, an orphan is closed by the book.
    pub(super) fn on_audit(&mut self, now: Now, op: OpId, outcome: Outcome<Reply>) {
        let channels = &self.channels;
        let Some(verdict) = self.members.on_audit(
            &mut self.cx,
            now,
            op,
            outcome,
            |c| {
                channels
                    .get(&c.as_channel())
                    .is_some_and(ChannelMachine::staying)
            },
            |c| channels.contains_key(&c.as_channel()),
        ) else {
            return;
        };
        for (channel, generation) in verdict.lost {
            let reason = self
                .members
                .membership_lost(&mut self.cx, &channel, generation);
            if let Some(machine) = self.channels.get_mut(&channel.as_channel()) {
                machine.degrade(reason, 0);
            }
            self.reconcile(channel);
        }
        for (channel, generation) in verdict.orphans {
            self.members.close_orphan(&mut self.cx, channel, generation);
        }
    }
}
