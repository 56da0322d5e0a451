//! The agent endpoint machine: channels, join / leave, watermark, backfill, the durable backstop,
//! refusal cleanup, boot self-join, reconnect, presence, and the receiver ledger (semantics §2
//! (a)–(f), (n)).
//!
//! [`Agent`] is a sans-IO [`Machine`]: the host calls [`Agent::join`], [`Agent::leave`],
//! [`Agent::send`], [`Agent::take_messages`] and [`Agent::handled`], feeds every [`Input`] with
//! the current [`Now`], executes every [`Command`], and shows every [`AgentEvent`].
//!
//! # The machine in one screen
//!
//! `Agent` is a parent that owns small children (design/models.md §1.3, R15). It lends them one
//! context (`ctx.rs`: the one op-id, subscription-id and uuid allocators, the one command and
//! event queue, the counters, the config and the connection state), so ids are drawn and
//! commands issued in the order the parent drives them. It routes every completion to the child
//! that owns the op (each child keeps its ops in flight and answers `owns(op)`; the rest are in
//! the parent's `Pending` table), every feed input to the child whose feed it is, and every
//! deadline to its owner: `poll_timeout` is the minimum of the children's deadlines, popped in
//! `(deadline, Timer)` order (the order one table of every timer would pop them in).
//!
//! | part (file) | owns | issues | routed to it |
//! | --- | --- | --- | --- |
//! | parent (`mod.rs`: API, dispatch, timers; `join.rs`, `leave.rs`: routing between the parts; `connection.rs`: fan-out of a connection change) | the channel map (one `ChannelMachine` per channel), the chat feeds, the epochs, a dropped machine's leave list (`Pending`), the retired ops of dropped machines; no decision about a membership and no timer of its own | `Unsubscribe` (at stop) | app calls, connection changes, chat feed inputs, a dropped machine's leave list answer |
//! | `ChannelMachine` (`channel/`) | one channel's join and leave: phase, epoch, subscription, watermark, join progress and report, backstop state, leave request, backfill position, its ops | `StreamInfo`, `Subscribe`, `Barrier`, a leave's `listMemberships`, `Unsubscribe` (failed join, finished leave, refusal) | its completions (it returns a `JoinStep`: register the feed, drop a failed join, start the post-commit steps, a late refusal, a leave's list answer for the book), refusals of its feed, connection loss |
//! | `RegistryWatch` (`watch.rs`) | the channel registry cache (the one resolver of a channel's class), its watch and retries | `KvWatch`, `KvUnwatch` | its completions (a load turns the parent ready), its feed's changes, timer `RegistryWatch`, loss / restore |
//! | `Members` (`members.rs`; its side of the join in `members/join.rs`, of the leave and refusal in `members/leave.rs`) | the membership book: the mirror (channel → generation), one record per concrete channel (maybe-member, unclosed close, close / reconcile in flight, timer slot), the audit's state, its ops | `durableJoin` (a post-commit plan's, a reconcile's), a leave's `durableLeave`, the audit's `listMemberships`, the refusal close's `listMemberships` and `durableLeave` | the answers to its ops: it decides, with what the parent passes about the channel's machine (staying, leaving, joined, attempts), and returns a verdict the parent applies to the machine (`JoinVerdict`, `ListVerdict`, `TombstoneVerdict`, `AuditVerdict`); a leave's list answer (from the machine, via the parent); the reconcile's and a leave's questions; timers `Reconcile`, `Close`, `Audit` |
//! | `Receiver` (`receive.rs`) | the dedup [`Ledger`], its settles | `Settle` | every copy (live, backfill, DLV, DM, TASK), `handled` / `decline`, settle completions |
//! | `HistoryReader` (`history.rs`) | the one-at-a-time reader, its queue and reads | `ReadStream` | read completions |
//! | `DirectFeeds` (`direct.rs`) | the DLV and `dm_<id>` / `svc_<role>` bindings and feeds | `Consume`, `StopConsume` | bind completions, `ConsumerEnded` / `Refused` of its feeds, timers `DlvBind`, `DirectBind`, loss / restore |
//! | `Sends` (`send.rs`) | publishes awaiting their PubAck (with what an id-collision republish needs) | `JsPublish` | PubAcks |
//! | `Heartbeats` (`presence.rs`) | presence puts, the next heartbeat | presence `KvPut` (`idle`; `offline` at stop) | its completions, timer `Heartbeat`, loss / restore / stop |
//! | `LossPoll` (`losses.rs`) | our loss record as last read, the stamp reported, its read | `KvGetDirect` | its read's completion, timer `Losses`, loss |
//!
//! What crosses between parts goes through the parent, never child to child: the parent asks
//! one part and passes the answer to another. A `ChannelMachine`'s commit returns a post-commit
//! plan: the parent passes it the book's adoptable membership, hands the plan's `durableJoin`
//! to the book (whose verdict on the answer the parent applies to the machine:
//! `backstop_established` / `backstop_unavailable`, then the join's report), and its backfill
//! pages to `HistoryReader` and their copies to `Receiver`. A reconcile asks the book whether it
//! is due, the machine for the attempt and cursor, then the book to send it. A leave gets the
//! membership to tombstone from the book and passes it to the machine; the machine's list
//! answer goes to the book, whose verdict (tombstone, finish, fail) the parent carries out; the
//! book's verdict on a `durableLeave` answer tells the parent to degrade, finish or fail the
//! machine. A late refusal drops the machine, then the book closes the membership. An audit
//! verdict's lost memberships degrade their machines and are reconciled. `Receiver` asks the parent (a
//! function argument) whether a channel's backstop is established, and `HistoryReader` whether
//! a queued read's join attempt is current; DLV / DM / TASK deliveries go from the parent to
//! `Receiver`.
//!
//! A `ChannelMachine` and the book are two maps, not one: a channel's *join* (keyed by
//! [`Channel`], possibly a wildcard) and its *membership* (keyed by [`ConcreteChannel`]) have
//! different lives. A membership outlives its join (a refusal close still to do, a tombstone
//! that failed, a durable join answered after the leave) and can exist for a channel this life
//! never joined (an earlier life's orphan), so the book keeps it for the life of the agent while
//! the machine is dropped when its join fails, its leave finishes or a refusal ends it. The
//! join, step by step, and the leave are in `channel/join.rs` and `channel/leave.rs`; unicast
//! and anycast in `direct.rs`; receiving in `receive.rs`.
//!
//! The parent is `mod.rs` plus three files of its own `impl Agent` code, each importing by
//! name: `join.rs` routes a join (post-commit plan, backfill pages, the book's verdicts on a
//! durable join answer, a reconcile and an audit), `leave.rs` a leave and a late refusal (the
//! book's tombstone choice, its verdicts on the list and `durableLeave` answers), and
//! `connection.rs` fans a connection change out to every part. They decide nothing about a
//! channel or a membership: every such decision is a child's (the machine's or the book's).

//! # Receiving (§2(f))
//!
//! Every copy (live, backfill, DLV, DM, TASK) goes through the authenticity filter and then the
//! [`Ledger`]: one surfacing per id, the durable copy owns the ack, acks only after
//! [`Agent::handled`], anomalies terminated (see `receive.rs`).

use crate::entropy::IdGen;
use crate::io::{Command, Completion, Inbound, Input, Machine, SubId};
use crate::ledger::{CopySource, Ledger, LedgerError, MessageId, Surfaced};
use crate::op::OpId;
use crate::time::{Instant, Now};
use crate::wire::message::{Part, Route, normalize_mentions};
use crate::wire::token::{AgentId, Channel, ConcreteChannel, Role};
use std::collections::{BTreeMap, BTreeSet};

mod channel;
mod connection;
mod ctx;
mod direct;
mod history;
mod join;
mod leave;
mod losses;
mod members;
mod presence;
mod receive;
mod send;
mod state;
mod types;
mod watch;

use channel::ChannelMachine;
use ctx::{Ctx, Link};
use direct::{Consumer, DirectFeeds};
use history::HistoryReader;
use losses::LossPoll;
use members::{CloseOp, MemberTimer, Members};
use presence::Heartbeats;
use receive::{DlvDelivery, Receiver};
use send::{Outgoing, Sends};
use state::{Feed, Pending, Timer};
pub use types::*;
use watch::RegistryWatch;

#[cfg(test)]
mod tests;

/// The agent endpoint machine. See the module docs.
#[derive(Debug)]
pub struct Agent {
    /// What the children are lent: ids, queues, counters, config, connection state.
    cx: Ctx,
    next_epoch: u64,
    pending: BTreeMap<OpId, Pending>,
    feeds: BTreeMap<SubId, Feed>,
    /// Channel entries by a stable key (their epoch-independent slot).
    channels: BTreeMap<Channel, ChannelMachine>,
    /// The ops of dropped channel machines still in flight: their completions are ignored.
    retired: BTreeSet<OpId>,
    /// The membership book: the mirror and every concrete channel's membership record.
    members: Members,
    /// The channel registry watch and cache.
    watch: RegistryWatch,
    first_connect: bool,
    /// The loss-record poll.
    loss_poll: LossPoll,
    /// Presence heartbeats.
    presence: Heartbeats,
    /// The sends awaiting their PubAck.
    sends: Sends,
    /// The DLV and direct consumers' bindings.
    direct: DirectFeeds,
    /// The backfill's history reader.
    history: HistoryReader,
    /// The authenticity filter and the ledger.
    receiver: Receiver,
}

impl Agent {
    /// A new agent, disconnected. The boot channels are joined at the first
    /// [`Connection::Restored`](crate::io::Connection::Restored).
    ///
    /// # Errors
    ///
    /// The ledger's configuration error.
    pub fn new(config: AgentConfig) -> Result<Self, LedgerError> {
        let ledger = Ledger::new(config.ledger)?;
        let direct = DirectFeeds::new(&config);
        let ids = match config.id_key {
            Some(key) => IdGen::from_key(key),
            None => IdGen::from_seed(config.seed),
        };
        Ok(Agent {
            cx: Ctx::new(config, ids),
            direct,
            next_epoch: 0,
            pending: BTreeMap::new(),
            feeds: BTreeMap::new(),
            channels: BTreeMap::new(),
            retired: BTreeSet::new(),
            members: Members::default(),
            watch: RegistryWatch::default(),
            first_connect: true,
            loss_poll: LossPoll::default(),
            presence: Heartbeats::default(),
            sends: Sends::default(),
            history: HistoryReader::default(),
            receiver: Receiver::new(ledger),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.cx.config
    }

    /// Joins `channel` at runtime. The result is [`AgentEvent::Joined`] or
    /// [`AgentEvent::JoinFailed`] with the returned id.
    ///
    /// # Errors
    ///
    /// [`AgentError::NotReady`] while disconnected or loading, [`AgentError::Busy`] while a join or
    /// leave of the exact channel is in progress; nothing changes. Joining a joined channel is not
    /// an error: it reports `joined: false` at once (A4).
    pub fn join(&mut self, now: Now, channel: Channel) -> Result<RequestId, AgentError> {
        let _ = now;
        self.check_ready()?;
        if let Some(entry) = self.channels.get(&channel) {
            if !entry.idle() {
                return Err(AgentError::Busy(channel));
            }
            // Already joined: an idempotent no-op that reports the mirror (A4).
            let generation = channel
                .to_concrete()
                .and_then(|c| self.members.mirror.get(&c).copied());
            let request = self.cx.next_request_id();
            entry.report_joined(&mut self.cx, request, generation);
            return Ok(request);
        }
        let request = self.cx.next_request_id();
        self.start_join(channel, Some(request));
        Ok(request)
    }

    /// Leaves `channel`. The result is [`AgentEvent::Left`] or [`AgentEvent::LeaveFailed`].
    ///
    /// # Errors
    ///
    /// [`AgentError::NotReady`], [`AgentError::NotJoined`], or [`AgentError::Busy`] while a join
    /// or leave of it is in progress; nothing changes.
    pub fn leave(&mut self, now: Now, channel: &Channel) -> Result<RequestId, AgentError> {
        let _ = now;
        self.check_ready()?;
        let Some(entry) = self.channels.get(channel) else {
            return Err(AgentError::NotJoined(channel.clone()));
        };
        if !entry.idle() {
            return Err(AgentError::Busy(channel.clone()));
        }
        let request = self.cx.next_request_id();
        self.start_leave(channel.clone(), request);
        Ok(request)
    }

    /// Posts `parts` to a concrete channel with the given mentions (normalized here). The message
    /// id is drawn from the agent's seeded generator; the result is [`AgentEvent::Sent`] or
    /// [`AgentEvent::SendFailed`].
    ///
    /// # Errors
    ///
    /// [`AgentError::NotReady`] or [`AgentError::NotConcrete`].
    pub fn send(
        &mut self,
        now: Now,
        channel: &Channel,
        parts: Vec<Part>,
        mentions: &[String],
    ) -> Result<(RequestId, String), AgentError> {
        let id = self.cx.ids.uuid();
        let request = self.send_channel(now, channel, parts, mentions, id.clone(), true)?;
        Ok((request, id))
    }

    /// [`Agent::send`] with a caller-chosen id (for a resend after an unknown outcome).
    ///
    /// # Errors
    ///
    /// As [`Agent::send`].
    pub fn send_with_id(
        &mut self,
        now: Now,
        channel: &Channel,
        parts: Vec<Part>,
        mentions: &[String],
        id: String,
    ) -> Result<RequestId, AgentError> {
        self.send_channel(now, channel, parts, mentions, id, false)
    }

    /// [`Agent::send_with_id`]; `fresh` when the id was drawn here (a fresh id: a `duplicate: true` answer is a collision).
    fn send_channel(
        &mut self,
        now: Now,
        channel: &Channel,
        parts: Vec<Part>,
        mentions: &[String],
        id: String,
        fresh: bool,
    ) -> Result<RequestId, AgentError> {
        if self.cx.stopped {
            return Err(AgentError::Stopped);
        }
        if self.cx.link == Link::Down {
            return Err(AgentError::NotReady);
        }
        let Some(concrete) = channel.to_concrete() else {
            return Err(AgentError::NotConcrete(channel.clone()));
        };
        let mentions = normalize_mentions(mentions.iter().map(String::as_str));
        Ok(self.sends.publish(
            &mut self.cx,
            now,
            Outgoing {
                route: Route::Channel(concrete),
                parts,
                mentions,
            },
            id,
            fresh,
        ))
    }

    /// Unicasts `parts` to the instance `to` on `cotal.<s>.inst.<to>.<me>` (captured by
    /// `DM_<space>`; the target reads it through its `dm_<to>` consumer with kind `dm`). The
    /// message carries exactly one routing field, `to`, and no mentions. The result is
    /// [`AgentEvent::Sent`] (with the DM stream's sequence) or [`AgentEvent::SendFailed`].
    ///
    /// A DM to ourselves is stored like any other and acked as our own echo on arrival (§2(f)).
    ///
    /// # Errors
    ///
    /// [`AgentError::NotReady`] while disconnected, [`AgentError::Stopped`].
    pub fn send_dm(
        &mut self,
        now: Now,
        to: &AgentId,
        parts: Vec<Part>,
    ) -> Result<(RequestId, String), AgentError> {
        let id = self.cx.ids.uuid();
        self.check_connected()?;
        let request = self.sends.publish(
            &mut self.cx,
            now,
            Outgoing {
                route: Route::To(to.clone()),
                parts,
                mentions: Vec::new(),
            },
            id.clone(),
            true,
        );
        Ok((request, id))
    }

    /// [`Agent::send_dm`] with a caller-chosen id (for a resend after an unknown outcome: the DM
    /// stream's duplicate window drops the second copy).
    ///
    /// # Errors
    ///
    /// As [`Agent::send_dm`].
    pub fn send_dm_with_id(
        &mut self,
        now: Now,
        to: &AgentId,
        parts: Vec<Part>,
        id: String,
    ) -> Result<RequestId, AgentError> {
        self.check_connected()?;
        Ok(self.sends.publish(
            &mut self.cx,
            now,
            Outgoing {
                route: Route::To(to.clone()),
                parts,
                mentions: Vec::new(),
            },
            id,
            false,
        ))
    }

    /// Anycasts `parts` to `role` on `cotal.<s>.svc.<role>.<me>` (captured by the work queue
    /// `TASK_<space>`: exactly one server of the role takes it, with kind `anycast`). The message
    /// carries exactly one routing field, `toService`. The result is [`AgentEvent::Sent`] or
    /// [`AgentEvent::SendFailed`].
    ///
    /// # Errors
    ///
    /// [`AgentError::NotReady`] while disconnected, [`AgentError::Stopped`].
    pub fn send_anycast(
        &mut self,
        now: Now,
        role: &Role,
        parts: Vec<Part>,
    ) -> Result<(RequestId, String), AgentError> {
        let id = self.cx.ids.uuid();
        self.check_connected()?;
        let route = Route::ToService(role.clone());
        let request = self.sends.publish(
            &mut self.cx,
            now,
            Outgoing {
                route,
                parts,
                mentions: Vec::new(),
            },
            id.clone(),
            true,
        );
        Ok((request, id))
    }

    /// [`Agent::send_anycast`] with a caller-chosen id.
    ///
    /// # Errors
    ///
    /// As [`Agent::send_anycast`].
    pub fn send_anycast_with_id(
        &mut self,
        now: Now,
        role: &Role,
        parts: Vec<Part>,
        id: String,
    ) -> Result<RequestId, AgentError> {
        self.check_connected()?;
        let route = Route::ToService(role.clone());
        Ok(self.sends.publish(
            &mut self.cx,
            now,
            Outgoing {
                route,
                parts,
                mentions: Vec::new(),
            },
            id,
            false,
        ))
    }

    /// Takes up to `limit` queued messages, oldest first. Report each with [`Agent::handled`]
    /// (or [`Agent::decline`]) once the application is done with it: only then is its durable
    /// copy acked.
    pub fn take_messages(&mut self, now: Now, limit: usize) -> Vec<Surfaced<Arrival>> {
        self.receiver.surface(now, limit)
    }

    /// Reports a surfaced message as handled: its durable copy, if any, is acked now.
    ///
    /// # Errors
    ///
    /// [`AgentError::Ledger`] for an id that is not pending; nothing changes.
    pub fn handled(&mut self, now: Now, id: &MessageId) -> Result<(), AgentError> {
        self.receiver.handled(&mut self.cx, now, id)
    }

    /// Declines a pending message (mute, focus …): acked, remembered, not surfaced again.
    ///
    /// # Errors
    ///
    /// [`AgentError::Ledger`] for an id that is not pending.
    pub fn decline(&mut self, now: Now, id: &MessageId) -> Result<(), AgentError> {
        self.receiver.decline(&mut self.cx, now, id)
    }

    /// Stops the agent: publishes an offline presence (best effort), closes every feed, clears
    /// timers. Memberships are not tombstoned: a relaunch resumes them (§2(e) `stop()`).
    pub fn stop(&mut self, now: Now) {
        if self.cx.stopped {
            return;
        }
        self.cx.stopped = true;
        self.loss_poll.on_lost();
        self.direct.clear_timers();
        self.members.clear_timers();
        self.watch.clear_timer();
        self.presence.stop(&mut self.cx, now);
        // Every open feed, the parent's and the consumers', closed in subscription order.
        let mut closes: Vec<(SubId, Command)> = std::mem::take(&mut self.feeds)
            .into_iter()
            .map(|(sub, feed)| {
                let Feed::Chat(_) = feed;
                (sub, Command::Unsubscribe { sub })
            })
            .collect();
        closes.extend(
            self.watch
                .take_feed()
                .map(|sub| (sub, Command::KvUnwatch { sub })),
        );
        closes.extend(
            self.direct
                .take_feeds()
                .into_iter()
                .map(|sub| (sub, Command::StopConsume { sub })),
        );
        closes.sort_by_key(|(sub, _)| *sub);
        self.cx
            .commands
            .extend(closes.into_iter().map(|(_, close)| close));
    }

    /// The joined channels (committed joins), in order.
    pub fn joined(&self) -> Vec<Channel> {
        self.channels
            .values()
            .filter(|e| e.joined())
            .map(|e| e.channel().clone())
            .collect()
    }

    /// The membership mirror: channel → generation.
    pub fn memberships(&self) -> &BTreeMap<ConcreteChannel, u64> {
        &self.members.mirror
    }

    /// The health surface.
    pub fn health(&self) -> AgentHealth {
        AgentHealth {
            ready: self.cx.link == Link::Ready,
            channels: self
                .channels
                .values()
                .filter(|e| e.joined())
                .map(ChannelMachine::health)
                .collect(),
            unclosed: self.members.unclosed_all().cloned().collect(),
            dlv_bound: self.direct.dlv_bound(),
            direct: self.direct.health(&self.cx.config),
            counters: self.cx.counters,
            losses: self.loss_poll.ledger().cloned(),
            ledger: *self.receiver.ledger().counters(),
            waiting: self.receiver.waiting_len(),
        }
    }

    /// The receiver ledger (read-only), for hosts that persist its horizon.
    pub fn ledger(&self) -> &Ledger<Arrival> {
        self.receiver.ledger()
    }

    fn check_connected(&self) -> Result<(), AgentError> {
        if self.cx.stopped {
            return Err(AgentError::Stopped);
        }
        if self.cx.link == Link::Down {
            return Err(AgentError::NotReady);
        }
        Ok(())
    }

    fn check_ready(&self) -> Result<(), AgentError> {
        if self.cx.stopped {
            return Err(AgentError::Stopped);
        }
        if self.cx.link != Link::Ready {
            return Err(AgentError::NotReady);
        }
        Ok(())
    }

    fn epoch(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch
    }

    fn on_completion(&mut self, now: Now, completion: Completion) {
        if self.sends.owns(completion.op) {
            self.sends
                .on_completion(&mut self.cx, completion.op, completion.outcome);
            return;
        }
        if self.watch.owns(completion.op) {
            let loaded =
                self.watch
                    .on_completion(&mut self.cx, now, completion.op, completion.outcome);
            if loaded {
                self.on_registry_loaded();
            }
            return;
        }
        if self.history.owns(completion.op) {
            let channels = &self.channels;
            let done = self
                .history
                .on_completion(&mut self.cx, completion.op, |c, epoch| {
                    channels.get(c).is_some_and(|e| e.page_current(epoch))
                });
            if let Some(read) = done {
                self.on_backfill(now, read, completion.outcome);
            }
            return;
        }
        if self.receiver.owns(completion.op) {
            self.receiver
                .on_completion(&mut self.cx, completion.op, completion.outcome);
            return;
        }
        if self.direct.owns(completion.op) {
            self.direct
                .on_completion(&mut self.cx, now, completion.op, completion.outcome);
            return;
        }
        if let Some(close) = self.members.take_close_op(completion.op) {
            match close {
                CloseOp::List(c) => {
                    self.members
                        .on_list_for_close(&mut self.cx, now, c, completion.outcome)
                }
                CloseOp::Leave(c, g) => self.on_durable_leave(now, c, g, completion.outcome),
            }
            return;
        }
        if let Some((c, g)) = self.members.take_tombstone_op(completion.op) {
            self.on_durable_leave(now, c, g, completion.outcome);
            return;
        }
        if let Some((channel, cursor)) = self.members.take_join_op(completion.op) {
            self.on_durable_join(now, channel, cursor, completion.outcome);
            return;
        }
        if self.members.owns(completion.op) {
            self.on_audit(now, completion.op, completion.outcome);
            return;
        }
        if self.presence.owns(completion.op) {
            self.presence.on_completion(completion.op);
            return;
        }
        if self.loss_poll.owns(completion.op) {
            self.loss_poll
                .on_read(&mut self.cx, now, completion.outcome);
            return;
        }
        if let Some(channel) = self
            .channels
            .iter()
            .find(|(_, m)| m.owns(completion.op))
            .map(|(c, _)| c.clone())
        {
            self.on_channel_completion(channel, completion.op, completion.outcome);
            return;
        }
        if self.retired.remove(&completion.op) {
            // An op of a channel machine dropped since: its completion is moot.
            return;
        }
        let Some(pending) = self.pending.remove(&completion.op) else {
            debug_assert!(false, "completion for an unknown {}", completion.op);
            return;
        };
        let outcome = completion.outcome;
        match pending {
            Pending::ListForLeave { channel } => self.on_list_for_leave(channel, outcome),
        }
    }

    fn on_inbound(&mut self, now: Now, inbound: Inbound) {
        let sub = inbound.sub();
        if self.watch.is_feed(sub) {
            match inbound {
                Inbound::KvChange { entry, .. } => self.watch.on_change(entry),
                Inbound::Refused { .. } => self.watch.forget_feed(),
                _ => {}
            }
            return;
        }
        if let Some(consumer) = self.direct.feed(sub) {
            self.on_consumer_inbound(now, consumer, inbound);
            return;
        }
        let Some(feed) = self.feeds.get(&sub).copied() else {
            // A feed we closed: anything still in flight is dropped. A durable delivery on a
            // closed consumer is redelivered after ack_wait.
            return;
        };
        match (feed, inbound) {
            (
                Feed::Chat(_),
                Inbound::Message {
                    subject, payload, ..
                },
            ) => {
                let channels = &self.channels;
                self.receiver.ingest_chat(
                    &mut self.cx,
                    now,
                    &subject,
                    &payload,
                    CopySource::Live,
                    |c| established(channels, c),
                );
            }
            (_, Inbound::Refused { detail, .. }) => self.on_refused(sub, detail),
            _ => {}
        }
    }

    /// An input on a feed of [`DirectFeeds`]: deliveries go through the filter to the ledger,
    /// the rest to the child.
    fn on_consumer_inbound(&mut self, now: Now, consumer: Consumer, inbound: Inbound) {
        match inbound {
            Inbound::Delivery {
                delivery,
                stream_seq,
                delivery_count,
                subject,
                payload,
                ..
            } => {
                let d = DlvDelivery {
                    delivery,
                    stream_seq,
                    delivery_count,
                    subject,
                    payload,
                };
                match consumer {
                    Consumer::Dlv => self.receiver.on_delivery(&mut self.cx, now, d),
                    Consumer::Direct(direct) => {
                        self.receiver
                            .on_direct_delivery(&mut self.cx, now, direct, d)
                    }
                }
            }
            Inbound::ConsumerEnded { detail, .. } => {
                self.direct.on_ended(&mut self.cx, now, consumer, detail);
            }
            Inbound::Refused { sub, .. } => {
                self.direct.forget_feed(sub);
            }
            _ => {}
        }
    }

    fn on_timer(&mut self, now: Now, timer: Timer) {
        match timer {
            Timer::Losses => self.loss_poll.handle_timeout(&mut self.cx),
            Timer::Heartbeat => self.presence.handle_timeout(&mut self.cx, now),
            Timer::RegistryWatch => self.watch.handle_timeout(&mut self.cx),
            Timer::DlvBind => self.direct.handle_timeout(&mut self.cx, Consumer::Dlv),
            Timer::DirectBind(d) => self
                .direct
                .handle_timeout(&mut self.cx, Consumer::Direct(d)),
            Timer::Reconcile(slot) => {
                if let Some(c) = self.members.channel_of(slot) {
                    self.reconcile(c);
                }
            }
            Timer::Audit => self.members.start_audit(&mut self.cx),
            Timer::Close(slot) => self.members.on_close_timer(&mut self.cx, now, slot),
        }
    }
}

impl Machine for Agent {
    type Event = AgentEvent;

    fn handle_input(&mut self, now: Now, input: Input) {
        self.observe(now);
        match input {
            Input::Completed(c) => self.on_completion(now, c),
            Input::Inbound(i) => self.on_inbound(now, i),
            Input::Connection(c) => self.on_connection(now, c),
        }
    }

    fn handle_timeout(&mut self, now: Now) {
        self.observe(now);
        // Every expired deadline of the children, in (deadline, timer) order:
        // the order one table of all timers would pop them in.
        while let Some((at, timer)) = self.next_timer() {
            if at > now.at {
                break;
            }
            self.take_timer(&timer);
            self.on_timer(now, timer);
        }
    }

    fn poll_command(&mut self) -> Option<Command> {
        self.cx.commands.pop_front()
    }

    fn poll_event(&mut self) -> Option<AgentEvent> {
        self.cx.events.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.next_timer().map(|(at, _)| at)
    }
}

/// Whether the channel's durable backstop is established (its live copies have a durable twin
/// coming).
fn established(channels: &BTreeMap<Channel, ChannelMachine>, channel: &ConcreteChannel) -> bool {
    channels
        .get(&channel.as_channel())
        .is_some_and(ChannelMachine::established)
}

impl Agent {
    /// The earliest deadline of the children (the parent has none of its own), with the timer it
    /// names.
    fn next_timer(&self) -> Option<(Instant, Timer)> {
        let children = [
            self.presence
                .poll_timeout()
                .map(|at| (at, Timer::Heartbeat)),
            self.loss_poll.poll_timeout().map(|at| (at, Timer::Losses)),
            self.direct.poll_timeout().map(|(at, c)| match c {
                Consumer::Dlv => (at, Timer::DlvBind),
                Consumer::Direct(d) => (at, Timer::DirectBind(d)),
            }),
            self.watch
                .poll_timeout()
                .map(|at| (at, Timer::RegistryWatch)),
            self.members.poll_timeout().map(|(at, t)| match t {
                MemberTimer::Reconcile(slot) => (at, Timer::Reconcile(slot)),
                MemberTimer::Close(slot) => (at, Timer::Close(slot)),
                MemberTimer::Audit => (at, Timer::Audit),
            }),
        ];
        children.into_iter().flatten().min()
    }

    /// Removes a timer from the child that owns it.
    fn take_timer(&mut self, timer: &Timer) {
        match timer {
            Timer::Heartbeat | Timer::Losses | Timer::RegistryWatch => {}
            Timer::DlvBind => self.direct.take_timer(Consumer::Dlv),
            Timer::DirectBind(d) => self.direct.take_timer(Consumer::Direct(*d)),
            Timer::Reconcile(slot) => self.members.cancel_timer(MemberTimer::Reconcile(*slot)),
            Timer::Close(slot) => self.members.cancel_timer(MemberTimer::Close(*slot)),
            Timer::Audit => self.members.cancel_timer(MemberTimer::Audit),
        }
    }

    fn observe(&mut self, now: Now) {
        self.cx.last_at = self.cx.last_at.max(now.at);
        self.cx.last_wall = now.wall;
    }
}
