//! The effect vocabulary shared by every machine and every driver.
//!
//! A machine ([`Machine`]) never touches a socket. It asks for effects with [`Command`]s, and the
//! driver (tokio + async-nats, the simulator, a test, a blocking loop in another runtime) answers
//! with [`Input`]s. The vocabulary is exactly the NATS features the protocol uses, named as NATS
//! names them: core subscriptions and publishes, request/reply, a server round-trip barrier,
//! JetStream publishes with a msg-id, stream reads and (privileged) message deletes, durable pull
//! consumers with ack / nak / term, and KV get / put / create / compare-and-set / delete / watch.
//!
//! # The driver's contract
//!
//! 1. Every command with an [`OpId`] is answered by exactly one [`Completion`] with that id, even
//!    when the connection dies: then the outcome is [`Outcome::Unknown`] unless the driver knows
//!    the effect did not happen (a command never sent is [`Failure::Other`]).
//! 2. Commands without an id ([`Command::Unsubscribe`], [`Command::Publish`],
//!    [`Command::StopConsume`], [`Command::KvUnwatch`]) are best effort and never answered.
//! 3. A subscription, consumer or KV watch is named by the machine's [`SubId`]. Everything that
//!    arrives on it is an [`Inbound`] carrying that id. After [`Input::Connection`] with
//!    [`Connection::Lost`], the driver delivers nothing more on any of them: the machine reopens
//!    what it still needs after [`Connection::Restored`] (semantics §2(e) is the machine's
//!    business, not the driver's).
//! 4. A permission refusal of a subscription arrives asynchronously as [`Inbound::Refused`].
//!    [`Command::Barrier`] completes only after the server has answered a round trip sent after
//!    every earlier command, so a refusal of an earlier subscribe is delivered *before* the
//!    barrier's completion (nats-notes §4.2: `flush()` is not such a barrier).
//! 5. Durable deliveries carry a driver-allocated [`DeliveryId`]; the machine resolves each with
//!    one [`Command::Settle`], or forgets it.
//!
//! Time is never read here: commands carry durations (request timeouts) and the machine keeps its
//! own deadlines (see [`crate::op::TimerTable`]).

use crate::ledger::DeliveryId;
use crate::op::{Failure, OpId, Outcome};
use crate::time::{Duration, Instant, Now, UnixMillis};
use crate::wire::config::ConsumerSpec;
use bytes::Bytes;
use std::fmt;

/// The name of one subscription-like feed a machine opened: a core subscription, a durable
/// consumer, or a KV watch. Allocated by the machine ([`SubIds`]), unique for its lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubId(u64);

impl SubId {
    /// The raw number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// An id with this number (drivers and tests naming an id they were given).
    pub const fn from_raw(raw: u64) -> Self {
        SubId(raw)
    }
}

impl fmt::Display for SubId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sub#{}", self.0)
    }
}

/// Allocates [`SubId`]s: 1, 2, 3 …
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubIds {
    last: u64,
}

impl SubIds {
    /// A fresh allocator.
    pub const fn new() -> Self {
        SubIds { last: 0 }
    }

    /// The next id.
    pub fn next_id(&mut self) -> SubId {
        self.last = self.last.saturating_add(1);
        SubId(self.last)
    }
}

/// One header of a published message.
pub type Header = (String, String);

/// Where a stream read starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReadStart {
    /// At this stream sequence (inclusive). `1` reads from the beginning.
    Seq(u64),
    /// At the first message stored at or after this wall-clock time.
    Time(UnixMillis),
}

/// The condition of a KV write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvCondition {
    /// `kv.put`: unconditional.
    Any,
    /// `kv.create`: only if the key holds nothing (a delete or purge marker counts as nothing).
    /// Refused with [`Failure::AlreadyExists`].
    CreateOnly,
    /// `kv.update`: only if the key is still at this revision. Refused with
    /// [`Failure::WrongLastRevision`].
    Revision(u64),
}

/// How to resolve one durable delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AckKind {
    /// Acknowledge: done, never redeliver.
    Ack,
    /// Negative-acknowledge: redeliver after this delay.
    Nak {
        /// Redelivery delay.
        delay: Duration,
    },
    /// Terminate: never redeliver (a permanent anomaly).
    Term,
}

impl fmt::Display for AckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AckKind::Ack => f.write_str("ack"),
            AckKind::Nak { delay } => write!(f, "nak({delay})"),
            AckKind::Term => f.write_str("term"),
        }
    }
}

/// One effect a machine asks its driver for.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// Open a core subscription (no queue group). Completes with [`Reply::Done`] once the SUB is
    /// written; a permission refusal arrives later as [`Inbound::Refused`] (see
    /// [`Command::Barrier`]).
    Subscribe {
        /// Operation id.
        op: OpId,
        /// The feed name for what arrives on it.
        sub: SubId,
        /// Subject or pattern.
        subject: String,
    },
    /// Close a core subscription. Best effort, not answered.
    Unsubscribe {
        /// The subscription.
        sub: SubId,
    },
    /// A server round trip on the same connection, issued after every earlier command. Completes
    /// with [`Reply::Done`] after every refusal caused by an earlier command was delivered.
    Barrier {
        /// Operation id.
        op: OpId,
    },
    /// A core publish. Best effort (at-most-once), not answered.
    Publish {
        /// Subject.
        subject: String,
        /// Headers (may be empty).
        headers: Vec<Header>,
        /// Body.
        payload: Bytes,
    },
    /// A core request with an explicit reply subject (the daemon only answers on
    /// `…ctl.delivery.<requester>.reply.<uuid>`, I27). Completes with [`Reply::Response`],
    /// [`Failure::NoResponders`], or [`Outcome::Unknown`] on timeout (the request may have been
    /// processed).
    Request {
        /// Operation id.
        op: OpId,
        /// Request subject.
        subject: String,
        /// The reply subject to listen on, chosen by the machine.
        reply: String,
        /// Body.
        payload: Bytes,
        /// How long to wait for the response.
        timeout: Duration,
    },
    /// A JetStream publish, awaiting the stream's acknowledgement. Completes with
    /// [`Reply::PubAck`].
    JsPublish {
        /// Operation id.
        op: OpId,
        /// Subject (captured by a stream).
        subject: String,
        /// `Nats-Msg-Id`, for the stream's duplicate window.
        msg_id: Option<String>,
        /// Other headers.
        headers: Vec<Header>,
        /// Body.
        payload: Bytes,
    },
    /// Read a stream's state (`STREAM.INFO`). Completes with [`Reply::StreamState`].
    StreamInfo {
        /// Operation id.
        op: OpId,
        /// Stream name.
        stream: String,
    },
    /// Read a durable consumer's state (`CONSUMER.INFO`). Completes with
    /// [`Reply::ConsumerState`], or [`Failure::NotFound`] when the consumer does not exist.
    ConsumerInfo {
        /// Operation id.
        op: OpId,
        /// Stream name.
        stream: String,
        /// Consumer (durable) name.
        consumer: String,
    },
    /// Read stored messages of a stream in sequence order: those matching `filter`, from `start`,
    /// none above `last_seq`, at most `max`. Completes with [`Reply::Stored`]; fewer than `max`
    /// messages (including none) means the range is exhausted.
    ReadStream {
        /// Operation id.
        op: OpId,
        /// Stream name.
        stream: String,
        /// Subject filter (may be a wildcard).
        filter: String,
        /// Where to start.
        start: ReadStart,
        /// The highest sequence to return, if bounded.
        last_seq: Option<u64>,
        /// Page size.
        max: u32,
        /// The name the driver must give the short-lived consumer it reads through, when the
        /// credential only grants a pinned name (an agent's `chathist_<id>`, I29); `None` lets
        /// the driver choose. A machine never has two reads with the same name in flight, and
        /// the driver removes a named reader before it completes the read, so the next page can
        /// reuse the name.
        reader: Option<String>,
    },
    /// Delete one stored message of a stream by sequence (`STREAM.MSG.DELETE` with
    /// `no_erase`), privileged. Completes with [`Reply::Done`] once the stream confirmed it;
    /// [`Failure::NotFound`] when the stream no longer holds that sequence (already deleted or
    /// evicted: the effect the caller wanted holds). Added for the DLV revocation sweep
    /// ([`crate::delivery::revoke`]).
    DeleteStreamMessage {
        /// Operation id.
        op: OpId,
        /// Stream name.
        stream: String,
        /// The sequence to delete.
        seq: u64,
    },
    /// Bind (and, when `create`, create or update) a durable pull consumer and start delivering
    /// from it as [`Inbound::Delivery`] on `sub`, with at most `max_in_flight` unsettled
    /// deliveries. Completes once bound with [`Reply::ConsumerBound`] (the consumer's delivery
    /// pointer at bind time), or [`Reply::Done`] from a driver that cannot tell.
    Consume {
        /// Operation id.
        op: OpId,
        /// The feed name for its deliveries.
        sub: SubId,
        /// The consumer configuration.
        consumer: ConsumerSpec,
        /// Create or update the consumer (privileged) rather than only bind to it.
        create: bool,
        /// Flow-control window.
        max_in_flight: u32,
    },
    /// Stop delivering from a consumer (the consumer stays on the server). Not answered.
    StopConsume {
        /// The feed.
        sub: SubId,
    },
    /// Resolve one durable delivery.
    ///
    /// With `confirm`, a double ack: completes with [`Reply::Done`] once the server confirmed it,
    /// or [`Outcome::Unknown`]. Without, a plain ack (what the reference sends): completes with
    /// [`Reply::Sent`] once it was handed to the connection; the server answers nothing, so an ack
    /// lost on the way shows only as a redelivery after `ack_wait`. A machine asks for the
    /// confirmation only when its decision depends on it; the plain ack saves the server one reply
    /// message and the client one request per settle.
    Settle {
        /// Operation id.
        op: OpId,
        /// The delivery.
        delivery: DeliveryId,
        /// How.
        kind: AckKind,
        /// Ask the server to confirm (double ack).
        confirm: bool,
    },
    /// Read a KV key. Completes with [`Reply::Kv`] (`None` for absent or a delete marker).
    KvGet {
        /// Operation id.
        op: OpId,
        /// Bucket name.
        bucket: String,
        /// Key.
        key: String,
    },
    /// Read a KV key through a direct get addressed by the key's subject
    /// (`$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>`), the one form of read a credential
    /// can grant for a single key (an agent's own loss record, [`crate::delivery::losses`]).
    /// Completes with [`Reply::Kv`] (`None` for absent or a delete marker).
    KvGetDirect {
        /// Operation id.
        op: OpId,
        /// Bucket name.
        bucket: String,
        /// Key.
        key: String,
    },
    /// Write a KV key. Completes with [`Reply::KvWritten`].
    KvPut {
        /// Operation id.
        op: OpId,
        /// Bucket name.
        bucket: String,
        /// Key.
        key: String,
        /// Value.
        value: Bytes,
        /// Condition.
        condition: KvCondition,
    },
    /// Delete a KV key (a delete marker), optionally only at a revision. Completes with
    /// [`Reply::KvWritten`] (the marker's revision).
    KvDelete {
        /// Operation id.
        op: OpId,
        /// Bucket name.
        bucket: String,
        /// Key.
        key: String,
        /// Only if the key is at this revision.
        expected_revision: Option<u64>,
    },
    /// Watch keys matching `filter` (a KV key pattern, `>` for all). Every current value is
    /// delivered first as [`Inbound::KvChange`], then the watch completes with [`Reply::Done`],
    /// then later changes follow.
    KvWatch {
        /// Operation id.
        op: OpId,
        /// The feed name.
        sub: SubId,
        /// Bucket name.
        bucket: String,
        /// Key pattern.
        filter: String,
    },
    /// Stop a watch. Not answered.
    KvUnwatch {
        /// The feed.
        sub: SubId,
    },
}

impl Command {
    /// The operation id, for commands that are answered.
    pub fn op(&self) -> Option<OpId> {
        match self {
            Command::Subscribe { op, .. }
            | Command::Barrier { op }
            | Command::Request { op, .. }
            | Command::JsPublish { op, .. }
            | Command::StreamInfo { op, .. }
            | Command::ConsumerInfo { op, .. }
            | Command::ReadStream { op, .. }
            | Command::DeleteStreamMessage { op, .. }
            | Command::Consume { op, .. }
            | Command::Settle { op, .. }
            | Command::KvGet { op, .. }
            | Command::KvGetDirect { op, .. }
            | Command::KvPut { op, .. }
            | Command::KvDelete { op, .. }
            | Command::KvWatch { op, .. } => Some(*op),
            Command::Unsubscribe { .. }
            | Command::Publish { .. }
            | Command::StopConsume { .. }
            | Command::KvUnwatch { .. } => None,
        }
    }
}

/// A response to a [`Command::Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Headers of the response.
    pub headers: Vec<Header>,
    /// Body.
    pub payload: Bytes,
}

/// A stream's acknowledgement of a [`Command::JsPublish`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PubAck {
    /// The stream that stored it.
    pub stream: String,
    /// Its sequence (for a duplicate, the original's).
    pub seq: u64,
    /// The msg-id was already in the duplicate window: nothing new was stored.
    pub duplicate: bool,
}

/// A stream's sequence range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamState {
    /// The first stored sequence (`last_seq + 1` when empty).
    pub first_seq: u64,
    /// The last assigned sequence (the frontier; `0` for a stream that never stored anything).
    pub last_seq: u64,
    /// Messages stored.
    pub messages: u64,
    /// Consumers on the stream (`state.consumer_count`).
    pub consumers: u64,
    /// The stream's own consumer cap (`config.max_consumers`; −1 or 0: none, the server's
    /// default applies). Judged by [`Headroom::judge`](crate::wire::capacity::Headroom::judge).
    pub max_consumers: i64,
    /// The stream's `config.max_age` in milliseconds (0: none). For a KV bucket, its TTL: the
    /// delivery lease's comes from here.
    pub max_age_ms: u64,
}

/// A durable consumer's state, as `CONSUMER.INFO` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsumerState {
    /// The last stream sequence it offered to anyone (`delivered.stream_seq`; 0 when none).
    pub delivered_stream_seq: u64,
    /// Stored messages matching its filter not yet delivered (`num_pending`).
    pub num_pending: u64,
    /// Delivered and not yet acked (`num_ack_pending`).
    pub num_ack_pending: u64,
    /// Its ack floor (`ack_floor.stream_seq`): every sequence at or below it is settled.
    pub ack_floor_stream_seq: u64,
}

impl ConsumerState {
    /// Stored messages of this consumer nobody has acked yet: undelivered plus unacked.
    pub fn unread(&self) -> u64 {
        self.num_pending.saturating_add(self.num_ack_pending)
    }
}

/// One stored stream message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// Its sequence.
    pub seq: u64,
    /// Its subject.
    pub subject: String,
    /// Headers.
    pub headers: Vec<Header>,
    /// Body.
    pub payload: Bytes,
    /// When the stream stored it.
    pub stored_at: UnixMillis,
}

/// What a KV entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvOperation {
    /// A value.
    Put,
    /// A delete marker.
    Delete,
    /// A purge marker.
    Purge,
}

/// One KV entry as read or watched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    /// Key.
    pub key: String,
    /// Revision (the KV stream's sequence of this write).
    pub revision: u64,
    /// Put, delete or purge.
    pub operation: KvOperation,
    /// Value (empty for markers).
    pub value: Bytes,
}

/// The result of a successful command.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// Done, nothing to report (subscribe, barrier, consume, confirmed settle, watch).
    Done,
    /// Handed to the connection, with no answer from the server to wait for (an unconfirmed
    /// settle): sent, not known to be applied.
    Sent,
    /// A request's response.
    Response(Response),
    /// A JetStream publish acknowledgement.
    PubAck(PubAck),
    /// A stream's state.
    StreamState(StreamState),
    /// Stored messages, ascending.
    Stored(Vec<StoredMessage>),
    /// A durable consumer's state.
    ConsumerState(ConsumerState),
    /// A KV read: `None` when absent or a marker.
    Kv(Option<KvEntry>),
    /// A KV write's new revision.
    KvWritten {
        /// The revision.
        revision: u64,
    },
    /// A durable consumer bound: `delivered_stream_seq` is the last stream sequence it had
    /// offered to anyone (its `delivered.stream_seq`; 0 when none). The next first delivery is
    /// above it; see [`crate::delivery::gap`]. `ack_floor_stream_seq` and `num_ack_pending` say
    /// what it offered that nobody settled yet: those come back only after the consumer's
    /// `ack_wait`, unless the binder reads them itself (the daemon's stranded deliveries,
    /// [`crate::delivery::stranded`]).
    ConsumerBound {
        /// The consumer's delivery pointer.
        delivered_stream_seq: u64,
        /// Its ack floor (`ack_floor.stream_seq`): every sequence at or below it is settled.
        ack_floor_stream_seq: u64,
        /// How many deliveries above the floor are neither acked nor terminated.
        num_ack_pending: u64,
    },
}

/// The answer to one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The command's id.
    pub op: OpId,
    /// How it ended.
    pub outcome: Outcome<Reply>,
}

impl Completion {
    /// A success.
    pub fn success(op: OpId, reply: Reply) -> Self {
        Completion {
            op,
            outcome: Outcome::Success(reply),
        }
    }

    /// A typed failure.
    pub fn failed(op: OpId, failure: Failure) -> Self {
        Completion {
            op,
            outcome: Outcome::Failed(failure),
        }
    }

    /// Outcome unknown.
    pub fn unknown(op: OpId) -> Self {
        Completion {
            op,
            outcome: Outcome::Unknown,
        }
    }
}

/// Something that arrived on a feed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Inbound {
    /// A core message on a subscription.
    Message {
        /// The subscription.
        sub: SubId,
        /// Its subject.
        subject: String,
        /// Its reply subject, if any.
        reply: Option<String>,
        /// Headers.
        headers: Vec<Header>,
        /// Body.
        payload: Bytes,
    },
    /// The broker refused a subscription (`Permissions Violation for Subscription to …`). The
    /// driver has already forgotten it; nothing more arrives on it.
    Refused {
        /// The subscription.
        sub: SubId,
        /// The broker's words.
        detail: String,
    },
    /// A durable consumer delivery; resolve it with [`Command::Settle`].
    Delivery {
        /// The consumer feed.
        sub: SubId,
        /// The driver's handle for settling it.
        delivery: DeliveryId,
        /// The stream sequence of the message.
        stream_seq: u64,
        /// 1 for the first delivery, then 2, 3 … for redeliveries.
        delivery_count: u64,
        /// Subject.
        subject: String,
        /// Headers.
        headers: Vec<Header>,
        /// Body.
        payload: Bytes,
    },
    /// A consumer feed ended on its own (consumer deleted, bind lost). Reopen to continue.
    ConsumerEnded {
        /// The feed.
        sub: SubId,
        /// Why, in the driver's words.
        detail: String,
    },
    /// A KV change on a watch (initial values first, see [`Command::KvWatch`]).
    KvChange {
        /// The watch.
        sub: SubId,
        /// The entry.
        entry: KvEntry,
    },
}

impl Inbound {
    /// The feed it arrived on.
    pub fn sub(&self) -> SubId {
        match self {
            Inbound::Message { sub, .. }
            | Inbound::Refused { sub, .. }
            | Inbound::Delivery { sub, .. }
            | Inbound::ConsumerEnded { sub, .. }
            | Inbound::KvChange { sub, .. } => *sub,
        }
    }
}

/// A change of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Connection {
    /// Connected (first time, or again after [`Connection::Lost`]). Every feed of the previous
    /// connection is gone.
    Restored,
    /// The connection is gone: every in-flight command will complete (mostly as unknown) and no
    /// feed delivers anything more.
    Lost,
}

/// Everything a driver tells a machine.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Input {
    /// A command completed.
    Completed(Completion),
    /// Something arrived on a feed.
    Inbound(Inbound),
    /// The connection changed.
    Connection(Connection),
}

/// The common surface of the protocol machines, so a driver can run any of them.
///
/// A driver loop: feed every [`Input`] and every expired deadline, then drain
/// [`poll_command`](Machine::poll_command) and [`poll_event`](Machine::poll_event) until both are
/// empty, then sleep until [`poll_timeout`](Machine::poll_timeout) or the next input.
pub trait Machine {
    /// What the application sees.
    type Event;

    /// Feeds one input.
    fn handle_input(&mut self, now: Now, input: Input);

    /// Feeds the passage of time; call when `now.at` reached [`poll_timeout`](Machine::poll_timeout).
    fn handle_timeout(&mut self, now: Now);

    /// The next effect to execute.
    fn poll_command(&mut self) -> Option<Command>;

    /// The next event for the application.
    fn poll_event(&mut self) -> Option<Self::Event>;

    /// The next deadline, if any.
    fn poll_timeout(&self) -> Option<Instant>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answered_commands_carry_their_op_and_best_effort_ones_none() {
        let op = OpId::from_raw(7);
        assert_eq!(Command::Barrier { op }.op(), Some(op));
        assert_eq!(
            Command::Unsubscribe {
                sub: SubId::from_raw(1)
            }
            .op(),
            None
        );
        assert_eq!(
            Command::KvPut {
                op,
                bucket: "b".into(),
                key: "k".into(),
                value: Bytes::new(),
                condition: KvCondition::Revision(3),
            }
            .op(),
            Some(op)
        );
    }

    #[test]
    fn sub_ids_increase_from_one() {
        let mut ids = SubIds::new();
        assert_eq!(ids.next_id(), SubId::from_raw(1));
        assert_eq!(ids.next_id().to_string(), "sub#2");
    }

    #[test]
    fn inbound_names_its_feed() {
        let sub = SubId::from_raw(4);
        let i = Inbound::Refused {
            sub,
            detail: "no".into(),
        };
        assert_eq!(i.sub(), sub);
        assert_eq!(
            Completion::unknown(OpId::from_raw(1)).outcome,
            Outcome::Unknown
        );
    }
}
