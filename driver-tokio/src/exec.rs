//! The production executor of the effect vocabulary (`cotal_core::io`) on async-nats.
//!
//! An [`Executor`] owns one NATS connection. A machine's [`Command`]s go in through
//! [`Executor::execute`]; every result comes back as an [`Input`] on the channel returned by
//! [`Executor::start`]. Inside, one actor task owns all state (open feeds, in-flight operations,
//! held deliveries) and everything else reports to it, so the rules below hold by construction:
//!
//! 1. **Exactly one completion per operation.** Each command with an `OpId` is registered as in
//!    flight before it starts, and answered once: by its task, or, when the connection is lost
//!    first, with [`Outcome::Unknown`] (the task is aborted and a late answer is dropped). A
//!    command that arrives while disconnected is never sent and fails with
//!    [`Failure::Other`] `not connected`.
//! 2. **Typed failures, never hidden errors.** async-nats errors map to `NoResponders`,
//!    `Timeout`, `PermissionDenied`, `WrongLastRevision`, `AlreadyExists`, `NotFound`,
//!    `Rejected{code}` or `Other`; a timeout of something that may have taken effect (a request,
//!    a publish, a write) is `Unknown`, a timeout of a read is `Timeout`.
//! 3. **Refusals.** nats-server refuses a SUB only with an asynchronous `-ERR`, which async-nats
//!    reports only through the event callback (nats-notes §4.1). The actor matches
//!    `Permissions Violation for Subscription to "<subject>"` to every open core subscription on
//!    that subject, drops it (so the client does not re-send it on reconnect) and emits
//!    [`Inbound::Refused`]. A `… for Publish to "<subject>"` fails the in-flight operations that
//!    publish there with [`Failure::PermissionDenied`] at once, instead of letting them time out.
//! 4. **Barrier.** [`Command::Barrier`] is a real round trip on the same connection (a request to
//!    [`ExecutorConfig::barrier_subject`], `$JS.API.INFO` by default, which every Cotal profile
//!    may publish), issued after the earlier commands were handed to the client in order. The
//!    server writes a SUB's `-ERR` before it answers anything sent later, so when the answer
//!    arrives the refusal event is already queued inside async-nats; its callback task may still
//!    be a few microseconds behind (measured ≤ 74 µs, nats-notes §4.2), so a barrier that follows
//!    a subscribe waits [`ExecutorConfig::refusal_grace`] (50 ms) more before it completes. Events
//!    are processed before completions (a biased select), so the refusal reaches the machine
//!    first. That grace is a bound on a scheduling delay, not a proof; for a restricted
//!    credential set [`ExecutorConfig::refusal_sentinel`] and the barrier becomes exact: it
//!    subscribes to a subject known to be refused and completes on *that* refusal, which the
//!    server writes after every earlier one.
//! 5. **Connection loss.** On `Disconnected` the actor emits [`Connection::Lost`], answers every
//!    in-flight operation with `Unknown`, and closes every feed (core subscriptions are
//!    unsubscribed, so the client does not silently restore them). Deliveries the machine still
//!    held are forgotten by the machine and naked back at the reconnect (counted in
//!    `handed_back`): without that, a server restart left them ack-pending until the consumer's
//!    60 s `ack_wait` (found by `cotal chaos`: durable copies up to a minute late).
//!    Nothing more arrives on any old feed: feed items carry a generation and stale ones are
//!    dropped. On `Connected` it emits [`Connection::Restored`]; the machine reopens what it needs.
//! 6. **Order and concurrency.** Subscribes, unsubscribes and core publishes are handed to the
//!    client inline, in command order. JetStream publishes go through one ordered publish lane
//!    and their acks are awaited concurrently (pipelined). Everything else runs as its own task.
//! 7. **The publish window.** At most [`ExecutorConfig::publish_window`] PubAcks are awaited at
//!    once; further publishes wait in the lane (in order) until one settles, so the wait for a
//!    PubAck measures the broker, not our own backlog, and [`ExecutorConfig::publish_ack_timeout`]
//!    (after which the outcome is `Unknown`) can be honest. With async-nats' defaults (5,000 in
//!    flight, a 5 s timeout) a daemon writing 2,000 copies/s to a busy broker saw up to 12 % of
//!    its DLV writes end `Unknown` and fanned those messages out again. At a connection loss the
//!    lane drops its window (every op in it is already answered `Unknown`) and starts a fresh one,
//!    so PubAcks the broker will never send do not hold the window after the reconnect.
//!
//! Durable consumers ([`Command::Consume`]) pull in batches sized by the free part of
//! `max_in_flight`: a batch never asks for more messages than the machine may still hold
//! unsettled, and each [`Command::Settle`] frees one slot. Settles are double acks (the server
//! confirms), so `Done` means the server has the ack.
//!
//! [`Command::ReadStream`] uses an ephemeral pull consumer (AckNone, memory storage, a 30 s
//! inactive threshold, deleted after the read), not direct get: direct get needs `allow_direct`,
//! which only CHAT and the KV streams have, while a consumer reads every stream, takes a wildcard
//! filter, and starts by sequence or by time natively. The cost is two extra API calls per page.
//! KV reads use `STREAM.MSG.GET` (`last_by_subj`), not direct get, because that is the grant the
//! Cotal profiles hold (semantics §1.10).

use crate::api;
use crate::connect::NatsConnection;
use async_nats::jetstream::{self, consumer};
use async_nats::{Client, Event, HeaderMap, ServerError};
use bytes::Bytes;
use cotal_core::io::{
    AckKind, Command, Completion, Connection, ConsumerState, Header, Inbound, Input, KvCondition,
    KvEntry, KvOperation, PubAck, ReadStart, Reply, Response, StoredMessage, StreamState, SubId,
};
use cotal_core::ledger::DeliveryId;
use cotal_core::op::{Failure, OpId, Outcome};
use cotal_core::time::UnixMillis;
use cotal_core::wire::config::{AckPolicy, ConsumerSpec};
use futures::StreamExt;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::{AbortHandle, JoinHandle};

/// Tunables of an [`Executor`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutorConfig {
    /// The subject a [`Command::Barrier`] requests. Any answer, or no responders, is a round trip.
    pub barrier_subject: String,
    /// How long a barrier's round trip may take.
    pub barrier_timeout: Duration,
    /// Extra wait after a barrier's round trip when subscribes preceded it (see module docs, 4).
    pub refusal_grace: Duration,
    /// A subject prefix this connection is known to be refused to subscribe to (for an agent
    /// credential, e.g. `_cotal_barrier`: its `sub.allow` covers nothing outside its inbox, its
    /// delivery replies and its channels). When set, a barrier is deterministic: it subscribes to
    /// `<prefix>.<op>` and completes when that refusal arrives, which the server sends after the
    /// refusal of every earlier subscribe (violations keep wire order, nats-notes §4.2 item 4).
    /// Must stay `None` for an unrestricted user, whose barrier would otherwise time out.
    pub refusal_sentinel: Option<String>,
    /// Timeout of JetStream API calls (info, get, consumer create, double ack).
    pub api_timeout: Duration,
    /// `expires` of each pull request of a durable consumer.
    ///
    /// A pull asks for **no idle heartbeat**. async-nats 0.51's one-shot `Batch` (the pull used
    /// here) never notices a missed heartbeat, and when a heartbeat status does arrive it returns
    /// `Pending` without registering a wake-up: the messages that follow sit unread until the
    /// batch's own timer (`expires` + 5 s) ends it, and whatever it still buffers then is dropped
    /// with its subscription, so the server redelivers it only after the consumer's `ack_wait`.
    /// Session 12 asked for a 5 s heartbeat; `cotal bench` at 200 members then lost 2–8 copies of
    /// 400,000 in every run (copies waiting out `ack_wait` while newer ones rotated them out of
    /// the owner's DLV), and none with the heartbeat removed.
    pub pull_expires: Duration,
    /// How long a JetStream publish waits for its PubAck before its outcome is `Unknown`. Keep it
    /// below the `ack_wait` of any consumer whose delivery a publish settles (fan-out's 60 s),
    /// so an unknown write is naked, not redelivered behind our back.
    pub publish_ack_timeout: Duration,
    /// How many JetStream publishes may await their PubAck at once (see module docs, 7).
    pub publish_window: usize,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            barrier_subject: "$JS.API.INFO".to_owned(),
            barrier_timeout: Duration::from_secs(5),
            refusal_grace: Duration::from_millis(50),
            refusal_sentinel: None,
            api_timeout: Duration::from_secs(5),
            pull_expires: Duration::from_secs(30),
            publish_ack_timeout: Duration::from_secs(20),
            publish_window: 1024,
        }
    }
}

/// Counters of what the executor saw; every loss or refusal is counted here.
#[derive(Debug, Default)]
struct Stats {
    refusals: AtomicU64,
    publish_violations: AtomicU64,
    slow_consumer_events: AtomicU64,
    disconnects: AtomicU64,
    unknown_on_loss: AtomicU64,
    publish_ack_timeouts: AtomicU64,
    rejected_while_disconnected: AtomicU64,
    stale_feed_items: AtomicU64,
    consumers_ended: AtomicU64,
    handed_back: AtomicU64,
}

/// A snapshot of the executor's counters (health surface).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecutorStats {
    /// Subscriptions the broker refused.
    pub refusals: u64,
    /// Publish permission violations reported by the broker.
    pub publish_violations: u64,
    /// `SlowConsumer` events: the client dropped core messages of a subscription.
    pub slow_consumer_events: u64,
    /// Connection losses.
    pub disconnects: u64,
    /// Operations answered `Unknown` because the connection was lost while they were in flight.
    pub unknown_on_loss: u64,
    /// JetStream publishes whose PubAck did not arrive within `publish_ack_timeout` (or whose
    /// answer was lost) while the connection stayed up: each is an `Unknown` write.
    pub publish_ack_timeouts: u64,
    /// Commands refused (or best-effort ones dropped) because the connection was down.
    pub rejected_while_disconnected: u64,
    /// Feed items dropped because their feed had been closed or replaced.
    pub stale_feed_items: u64,
    /// Consumer feeds that ended on their own.
    pub consumers_ended: u64,
    /// Deliveries of a closed consumer feed naked back to the server (never seen by the machine).
    pub handed_back: u64,
}

impl Stats {
    fn snapshot(&self) -> ExecutorStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ExecutorStats {
            refusals: g(&self.refusals),
            publish_violations: g(&self.publish_violations),
            slow_consumer_events: g(&self.slow_consumer_events),
            disconnects: g(&self.disconnects),
            unknown_on_loss: g(&self.unknown_on_loss),
            publish_ack_timeouts: g(&self.publish_ack_timeouts),
            rejected_while_disconnected: g(&self.rejected_while_disconnected),
            stale_feed_items: g(&self.stale_feed_items),
            consumers_ended: g(&self.consumers_ended),
            handed_back: g(&self.handed_back),
        }
    }
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// The executor was stopped; the command was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the executor has stopped")]
pub struct ExecutorClosed;

/// Executes `cotal_core::io` commands on one NATS connection (see the module docs).
#[derive(Debug)]
pub struct Executor {
    commands: mpsc::UnboundedSender<Command>,
    stats: Arc<Stats>,
    client: Client,
    task: JoinHandle<()>,
}

impl Executor {
    /// Starts the executor on `conn`. Returns the handle and the channel every [`Input`] arrives
    /// on. The first input is [`Connection::Restored`] (the connection is up).
    pub fn start(
        conn: NatsConnection,
        config: ExecutorConfig,
    ) -> (Executor, mpsc::UnboundedReceiver<Input>) {
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (out, inputs) = mpsc::unbounded_channel();
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        let js = jetstream::new(conn.client.clone());
        let lane = PublishLane::spawn(
            conn.client.clone(),
            &config,
            stats.clone(),
            internal_tx.clone(),
        );
        let actor = Actor {
            client: conn.client.clone(),
            js,
            config,
            stats: stats.clone(),
            out,
            internal_tx,
            lane,
            connected: true,
            inflight: HashMap::new(),
            feeds: HashMap::new(),
            deliveries: HashMap::new(),
            orphaned: Vec::new(),
            next_delivery: 0,
            next_gen: 0,
            subscribed_since_barrier: false,
            sentinels: HashMap::new(),
        };
        let _ = actor.out.send(Input::Connection(Connection::Restored));
        let task = tokio::spawn(actor.run(command_rx, internal_rx, conn.events));
        (
            Executor {
                commands,
                stats,
                client: conn.client,
                task,
            },
            inputs,
        )
    }

    /// Queues one command. Commands are taken in call order.
    pub fn execute(&self, command: Command) -> Result<(), ExecutorClosed> {
        self.commands.send(command).map_err(|_| ExecutorClosed)
    }

    /// The counters so far.
    pub fn stats(&self) -> ExecutorStats {
        self.stats.snapshot()
    }

    /// The underlying client (for tools and tests; machines never need it).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What tasks report to the actor.
enum Internal {
    /// An operation finished.
    Done { op: OpId, outcome: Outcome<Reply> },
    /// Something arrived on a feed of generation `generation`.
    Feed {
        sub: SubId,
        generation: u64,
        item: FeedItem,
    },
}

enum FeedItem {
    Message(Box<async_nats::Message>),
    Delivery {
        msg: Box<jetstream::Message>,
        needs_ack: bool,
    },
    Kv(KvEntry),
    Ended(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum FeedKind {
    Core { subject: String },
    Consumer,
    Watch,
}

struct Feed {
    generation: u64,
    kind: FeedKind,
    abort: Option<AbortHandle>,
    flow: Option<Arc<Semaphore>>,
    /// Tells the feed's task to stop (a consumer hands back what it still holds first).
    stop: Arc<Notify>,
}

/// How long a stopped consumer feed may take to hand back (nak) the deliveries of its last pull
/// before its task is aborted.
const HAND_BACK_GRACE: Duration = Duration::from_millis(250);

/// The nak delay of a handed-back delivery: long enough that the stopped feed's own pull request
/// is gone from the server (our unsubscribe reached it), so the redelivery does not go back into
/// that dead pull, which would hold it for the consumer's whole `ack_wait`.
const HAND_BACK_DELAY: Duration = Duration::from_secs(1);

struct InFlight {
    abort: Option<AbortHandle>,
    /// Subjects this operation publishes to (for publish violations); one ending in `.` stands
    /// for every subject with that prefix.
    publishes: Vec<String>,
    /// The subject it subscribes to for its answer, if its own (a request's reply subject).
    reply_sub: Option<String>,
    /// The feed it opens.
    feed: Option<(SubId, u64)>,
}

struct Held {
    sub: SubId,
    generation: u64,
    /// The `$JS.ACK.…` subject to settle on; `None` for an ack-less consumer.
    ack_subject: Option<String>,
}

struct LaneJob {
    op: OpId,
    subject: String,
    publish: jetstream::message::PublishMessage,
}

struct Actor {
    client: Client,
    js: jetstream::Context,
    config: ExecutorConfig,
    stats: Arc<Stats>,
    out: mpsc::UnboundedSender<Input>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    lane: PublishLane,
    connected: bool,
    inflight: HashMap<OpId, InFlight>,
    feeds: HashMap<SubId, Feed>,
    deliveries: HashMap<DeliveryId, Held>,
    /// Ack subjects of deliveries the machine held when the connection was lost: naked back at
    /// the reconnect, so the server redelivers them then rather than after `ack_wait`.
    orphaned: Vec<String>,
    next_delivery: u64,
    next_gen: u64,
    subscribed_since_barrier: bool,
    /// Sentinel subscriptions of barriers waiting for their refusal: subject → (barrier, sub).
    sentinels: HashMap<String, (OpId, async_nats::Subscriber)>,
}

impl Drop for Actor {
    /// Stops every task the actor started (a feed task waiting for window slots would otherwise
    /// outlive its executor).
    fn drop(&mut self) {
        for f in self.inflight.values() {
            if let Some(a) = &f.abort {
                a.abort();
            }
        }
        for feed in self.feeds.values() {
            if let Some(a) = &feed.abort {
                a.abort();
            }
        }
    }
}

/// A parsed `Permissions Violation …` server error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// `Permissions Violation for Subscription to "<subject>"` (optionally `using queue "<q>"`).
    Subscribe {
        /// The refused subject.
        subject: String,
        /// The queue group, if named.
        queue: Option<String>,
    },
    /// `Permissions Violation for Publish to "<subject>"`.
    Publish {
        /// The refused subject.
        subject: String,
    },
}

/// Parses the text of `ServerError::Other` (nats-notes §4.1; an optional `nats: ` prefix and
/// surrounding quotes are tolerated).
pub fn parse_violation(text: &str) -> Option<Violation> {
    fn quoted_after<'a>(text: &'a str, marker: &str) -> Option<(&'a str, &'a str)> {
        let start = text.find(marker)? + marker.len();
        let rest = &text[start..];
        let end = rest.find('"')?;
        Some((&rest[..end], &rest[end + 1..]))
    }
    if let Some((subject, rest)) =
        quoted_after(text, "Permissions Violation for Subscription to \"")
    {
        let queue = quoted_after(rest, "using queue \"").map(|(q, _)| q.to_owned());
        return Some(Violation::Subscribe {
            subject: subject.to_owned(),
            queue,
        });
    }
    quoted_after(text, "Permissions Violation for Publish to \"").map(|(subject, _)| {
        Violation::Publish {
            subject: subject.to_owned(),
        }
    })
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        let mut events_open = true;
        loop {
            tokio::select! {
                biased;
                ev = events.recv(), if events_open => match ev {
                    Some(ev) => self.on_event(ev),
                    None => events_open = false,
                },
                Some(msg) = internal.recv() => self.on_internal(msg),
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd).await,
                    None => break,
                },
            }
        }
        // Drop (below) stops every task still running.
    }

    fn emit(&self, input: Input) {
        let _ = self.out.send(input);
    }

    fn complete(&mut self, op: OpId, outcome: Outcome<Reply>) {
        self.sentinels.retain(|_, (o, _)| *o != op);
        if let Some(f) = self.inflight.remove(&op) {
            if let (false, Some((sub, generation))) = (outcome.is_success(), f.feed) {
                self.close_feed_if(sub, generation);
            }
            self.emit(Input::Completed(Completion { op, outcome }));
        }
    }

    fn close_feed_if(&mut self, sub: SubId, generation: u64) {
        if self
            .feeds
            .get(&sub)
            .is_some_and(|f| f.generation == generation)
        {
            self.close_feed(sub);
        }
    }

    fn close_feed(&mut self, sub: SubId) -> Option<Feed> {
        let feed = self.feeds.remove(&sub)?;
        feed.stop.notify_one();
        if let Some(a) = feed.abort.clone() {
            if feed.kind == FeedKind::Consumer && feed.flow.is_some() && self.connected {
                // An acked consumer naks what its last pull still brings (see `consume`), so
                // the server redelivers it now rather than after the consumer's ack_wait.
                tokio::spawn(async move {
                    tokio::time::sleep(HAND_BACK_GRACE).await;
                    a.abort();
                });
            } else {
                a.abort();
            }
        }
        Some(feed)
    }

    fn new_generation(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    /// Registers `fut` as operation `op` and runs it.
    fn spawn_op<F>(&mut self, op: OpId, publishes: Vec<String>, reply_sub: Option<String>, fut: F)
    where
        F: Future<Output = Outcome<Reply>> + Send + 'static,
    {
        let tx = self.internal_tx.clone();
        let handle = tokio::spawn(async move {
            let outcome = fut.await;
            let _ = tx.send(Internal::Done { op, outcome });
        });
        self.inflight.insert(
            op,
            InFlight {
                abort: Some(handle.abort_handle()),
                publishes,
                reply_sub,
                feed: None,
            },
        );
    }

    /// Registers a feed task that also answers `op` (consume, watch).
    fn spawn_feed<F, Fut>(
        &mut self,
        op: OpId,
        sub: SubId,
        kind: FeedKind,
        flow: Option<Arc<Semaphore>>,
        publishes: Vec<String>,
        task: F,
    ) where
        F: FnOnce(FeedSink) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.close_feed(sub);
        let generation = self.new_generation();
        let stop = Arc::new(Notify::new());
        let sink = FeedSink {
            tx: self.internal_tx.clone(),
            op,
            sub,
            generation,
            stop: stop.clone(),
        };
        let handle = tokio::spawn(task(sink));
        self.feeds.insert(
            sub,
            Feed {
                generation,
                kind,
                abort: Some(handle.abort_handle()),
                flow,
                stop,
            },
        );
        self.inflight.insert(
            op,
            InFlight {
                abort: Some(handle.abort_handle()),
                publishes,
                reply_sub: None,
                feed: Some((sub, generation)),
            },
        );
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected => {
                if !self.connected {
                    self.connected = true;
                    tracing::info!("NATS connection restored");
                    self.emit(Input::Connection(Connection::Restored));
                    self.hand_back_orphans();
                }
            }
            Event::Disconnected | Event::Closed => {
                if self.connected {
                    self.connected = false;
                    bump(&self.stats.disconnects);
                    tracing::warn!("NATS connection lost");
                    self.emit(Input::Connection(Connection::Lost));
                    self.lose_everything();
                    self.lane.reset();
                }
            }
            Event::ServerError(ServerError::Other(text)) => match parse_violation(&text) {
                Some(Violation::Subscribe { subject, .. }) => self.on_refused(&subject, &text),
                Some(Violation::Publish { subject }) => {
                    bump(&self.stats.publish_violations);
                    self.on_publish_violation(&subject, &text);
                }
                None => tracing::warn!(error = %text, "NATS server error"),
            },
            Event::ServerError(err) => tracing::warn!(error = %err, "NATS server error"),
            Event::SlowConsumer(sid) => {
                bump(&self.stats.slow_consumer_events);
                tracing::warn!(sid, "slow consumer: the client dropped core messages");
            }
            Event::ClientError(err) => tracing::warn!(error = %err, "NATS client error"),
            Event::LameDuckMode => tracing::warn!("NATS server entered lame duck mode"),
            Event::Draining => tracing::info!("NATS connection draining"),
        }
    }

    fn lose_everything(&mut self) {
        let mut ops: Vec<(OpId, InFlight)> = self.inflight.drain().collect();
        ops.sort_by_key(|(op, _)| *op);
        for (op, f) in ops {
            if let Some(a) = f.abort {
                a.abort();
            }
            bump(&self.stats.unknown_on_loss);
            self.emit(Input::Completed(Completion::unknown(op)));
        }
        for (_, feed) in self.feeds.drain() {
            if let Some(a) = feed.abort {
                a.abort();
            }
        }
        self.orphaned
            .extend(self.deliveries.drain().filter_map(|(_, h)| h.ack_subject));
        self.sentinels.clear();
    }

    /// Naks the deliveries forgotten at the last connection loss (best effort: a nak the server
    /// no longer knows, after a restart that lost the consumer's state, is ignored by it).
    fn hand_back_orphans(&mut self) {
        let subjects = std::mem::take(&mut self.orphaned);
        if subjects.is_empty() {
            return;
        }
        let n = u64::try_from(subjects.len()).unwrap_or(u64::MAX);
        self.stats.handed_back.fetch_add(n, Ordering::Relaxed);
        let client = self.client.clone();
        let nak = jetstream::AckKind::Nak(Some(HAND_BACK_DELAY));
        let payload = Bytes::from(nak);
        tokio::spawn(async move {
            for subject in subjects {
                let _ = client.publish(subject, payload.clone()).await;
            }
            let _ = client.flush().await;
        });
    }

    fn on_refused(&mut self, subject: &str, text: &str) {
        if let Some((op, sentinel)) = self.sentinels.remove(subject) {
            // Every refusal of an earlier subscribe has been handled before this one.
            drop(sentinel);
            if let Some(timer) = self.inflight.get(&op).and_then(|f| f.abort.clone()) {
                timer.abort();
            }
            self.complete(op, Outcome::Success(Reply::Done));
            return;
        }
        let mut refused: Vec<SubId> = self
            .feeds
            .iter()
            .filter(|(_, f)| matches!(&f.kind, FeedKind::Core { subject: s } if s == subject))
            .map(|(sub, _)| *sub)
            .collect();
        refused.sort();
        for sub in refused {
            self.close_feed(sub);
            bump(&self.stats.refusals);
            self.emit(Input::Inbound(Inbound::Refused {
                sub,
                detail: text.to_owned(),
            }));
        }
        // A request whose own reply subject was refused can never be answered.
        let mut ops: Vec<OpId> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.reply_sub.as_deref() == Some(subject))
            .map(|(op, _)| *op)
            .collect();
        ops.sort();
        for op in ops {
            self.deny(op, text);
        }
    }

    fn on_publish_violation(&mut self, subject: &str, text: &str) {
        let mut ops: Vec<OpId> = self
            .inflight
            .iter()
            .filter(|(_, f)| {
                f.publishes
                    .iter()
                    .any(|p| p == subject || (p.ends_with('.') && subject.starts_with(p.as_str())))
            })
            .map(|(op, _)| *op)
            .collect();
        ops.sort();
        if ops.is_empty() {
            tracing::warn!(error = %text, "publish refused by the broker");
        }
        for op in ops {
            self.deny(op, text);
        }
    }

    fn deny(&mut self, op: OpId, text: &str) {
        if let Some(a) = self.inflight.get(&op).and_then(|f| f.abort.clone()) {
            a.abort();
        }
        self.complete(
            op,
            Outcome::Failed(Failure::PermissionDenied {
                detail: text.to_owned(),
            }),
        );
    }

    fn on_internal(&mut self, msg: Internal) {
        match msg {
            Internal::Done { op, outcome } => self.complete(op, outcome),
            Internal::Feed {
                sub,
                generation,
                item,
            } => {
                let live = self
                    .feeds
                    .get(&sub)
                    .is_some_and(|f| f.generation == generation);
                if !live {
                    bump(&self.stats.stale_feed_items);
                    if let FeedItem::Delivery {
                        msg,
                        needs_ack: true,
                    } = item
                    {
                        // Nobody will settle it: hand it back for redelivery now, not after
                        // the consumer's ack_wait.
                        bump(&self.stats.handed_back);
                        tokio::spawn(async move {
                            let _ = msg
                                .ack_with(jetstream::AckKind::Nak(Some(HAND_BACK_DELAY)))
                                .await;
                        });
                    }
                    return;
                }
                match item {
                    FeedItem::Message(m) => {
                        let m = *m;
                        self.emit(Input::Inbound(Inbound::Message {
                            sub,
                            subject: m.subject.to_string(),
                            reply: m.reply.map(|r| r.to_string()),
                            headers: headers_of(m.headers.as_ref()),
                            payload: m.payload,
                        }));
                    }
                    FeedItem::Delivery { msg, needs_ack } => {
                        self.on_delivery(sub, generation, *msg, needs_ack)
                    }
                    FeedItem::Kv(entry) => {
                        self.emit(Input::Inbound(Inbound::KvChange { sub, entry }))
                    }
                    FeedItem::Ended(detail) => {
                        self.close_feed(sub);
                        bump(&self.stats.consumers_ended);
                        self.emit(Input::Inbound(Inbound::ConsumerEnded { sub, detail }));
                    }
                }
            }
        }
    }

    fn on_delivery(
        &mut self,
        sub: SubId,
        generation: u64,
        msg: jetstream::Message,
        needs_ack: bool,
    ) {
        let (stream_seq, delivery_count) = match msg.info() {
            Ok(info) => (
                info.stream_sequence,
                u64::try_from(info.delivered).unwrap_or(1).max(1),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "delivery without JetStream metadata, ignored");
                return;
            }
        };
        self.next_delivery += 1;
        let delivery = DeliveryId(self.next_delivery);
        let inbound = Inbound::Delivery {
            sub,
            delivery,
            stream_seq,
            delivery_count,
            subject: msg.subject.to_string(),
            headers: headers_of(msg.headers.as_ref()),
            payload: msg.payload.clone(),
        };
        self.deliveries.insert(
            delivery,
            Held {
                sub,
                generation,
                ack_subject: if needs_ack {
                    msg.reply.as_ref().map(|r| r.to_string())
                } else {
                    None
                },
            },
        );
        self.emit(Input::Inbound(inbound));
    }

    fn reject_disconnected(&mut self, cmd: &Command) {
        bump(&self.stats.rejected_while_disconnected);
        if let Some(op) = cmd.op() {
            self.emit(Input::Completed(Completion::failed(
                op,
                Failure::Other {
                    description: "not connected".to_owned(),
                },
            )));
        }
    }

    async fn on_command(&mut self, cmd: Command) {
        // Closing a feed is local bookkeeping and always allowed.
        match &cmd {
            Command::Unsubscribe { sub }
            | Command::StopConsume { sub }
            | Command::KvUnwatch { sub } => {
                let sub = *sub;
                if self
                    .close_feed(sub)
                    .is_some_and(|feed| feed.kind == FeedKind::Consumer)
                {
                    // Unsettled deliveries of an ack-less consumer need nothing more.
                    self.deliveries
                        .retain(|_, h| !(h.sub == sub && h.ack_subject.is_none()));
                }
                return;
            }
            _ => {}
        }
        if !self.connected {
            self.reject_disconnected(&cmd);
            return;
        }
        match cmd {
            Command::Subscribe { op, sub, subject } => {
                self.close_feed(sub);
                match self.client.subscribe(subject.clone()).await {
                    Ok(mut subscriber) => {
                        self.subscribed_since_barrier = true;
                        let generation = self.new_generation();
                        let tx = self.internal_tx.clone();
                        let handle = tokio::spawn(async move {
                            while let Some(m) = subscriber.next().await {
                                let item = FeedItem::Message(Box::new(m));
                                if tx
                                    .send(Internal::Feed {
                                        sub,
                                        generation,
                                        item,
                                    })
                                    .is_err()
                                {
                                    break;
                                }
                            }
                        });
                        self.feeds.insert(
                            sub,
                            Feed {
                                generation,
                                kind: FeedKind::Core { subject },
                                abort: Some(handle.abort_handle()),
                                flow: None,
                                stop: Arc::new(Notify::new()),
                            },
                        );
                        self.emit(Input::Completed(Completion::success(op, Reply::Done)));
                    }
                    Err(e) => self.emit(Input::Completed(Completion::failed(
                        op,
                        Failure::Other {
                            description: format!("subscribe {subject}: {e}"),
                        },
                    ))),
                }
            }
            Command::Barrier { op } => {
                if let Some(prefix) = self.config.refusal_sentinel.clone() {
                    self.sentinel_barrier(op, format!("{prefix}.{}", op.get()))
                        .await;
                    return;
                }
                let grace = if std::mem::take(&mut self.subscribed_since_barrier) {
                    self.config.refusal_grace
                } else {
                    Duration::ZERO
                };
                let client = self.client.clone();
                let subject = self.config.barrier_subject.clone();
                let timeout = self.config.barrier_timeout;
                self.spawn_op(op, vec![subject.clone()], None, async move {
                    barrier(client, subject, timeout, grace).await
                });
            }
            Command::Publish {
                subject,
                headers,
                payload,
            } => {
                let result = if headers.is_empty() {
                    self.client.publish(subject.clone(), payload).await
                } else {
                    self.client
                        .publish_with_headers(subject.clone(), header_map(&headers), payload)
                        .await
                };
                if let Err(e) = result {
                    tracing::warn!(%subject, error = %e, "core publish not sent");
                }
            }
            Command::Request {
                op,
                subject,
                reply,
                payload,
                timeout,
            } => {
                let client = self.client.clone();
                let pubs = vec![subject.clone()];
                let reply_sub = Some(reply.clone());
                self.spawn_op(op, pubs, reply_sub, async move {
                    request(client, subject, reply, payload, to_std(timeout)).await
                });
            }
            Command::JsPublish {
                op,
                subject,
                msg_id,
                headers,
                payload,
            } => {
                let mut publish = jetstream::message::PublishMessage::build().payload(payload);
                if !headers.is_empty() {
                    publish = publish.headers(header_map(&headers));
                }
                if let Some(id) = msg_id {
                    publish = publish.message_id(id);
                }
                self.inflight.insert(
                    op,
                    InFlight {
                        abort: None,
                        publishes: vec![subject.clone()],
                        reply_sub: None,
                        feed: None,
                    },
                );
                if self
                    .lane
                    .jobs
                    .send(LaneJob {
                        op,
                        subject,
                        publish,
                    })
                    .is_err()
                {
                    self.complete(
                        op,
                        Outcome::Failed(Failure::Other {
                            description: "publish lane stopped".to_owned(),
                        }),
                    );
                }
            }
            Command::StreamInfo { op, stream } => {
                let client = self.client.clone();
                let timeout = self.config.api_timeout;
                let subject = format!("$JS.API.STREAM.INFO.{stream}");
                self.spawn_op(op, vec![subject.clone()], None, async move {
                    stream_info(client, subject, timeout).await
                });
            }
            Command::ConsumerInfo {
                op,
                stream,
                consumer,
            } => {
                let client = self.client.clone();
                let timeout = self.config.api_timeout;
                let subject = format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}");
                self.spawn_op(op, vec![subject.clone()], None, async move {
                    consumer_info(client, subject, timeout).await
                });
            }
            Command::ReadStream {
                op,
                stream,
                filter,
                start,
                last_seq,
                max,
                reader,
            } => {
                let js = self.js.clone();
                let client = self.client.clone();
                let timeout = self.config.api_timeout;
                let pubs = vec![format!("$JS.API.CONSUMER.CREATE.{stream}.")];
                self.spawn_op(op, pubs, None, async move {
                    read_stream(
                        js,
                        client,
                        ReadSpec {
                            stream,
                            filter,
                            start,
                            last_seq,
                            max,
                            reader,
                        },
                        timeout,
                    )
                    .await
                });
            }
            Command::DeleteStreamMessage { op, stream, seq } => {
                let client = self.client.clone();
                let timeout = self.config.api_timeout;
                let subject = format!("$JS.API.STREAM.MSG.DELETE.{stream}");
                self.spawn_op(op, vec![subject.clone()], None, async move {
                    // `no_erase`: a delete marker in the index, no overwrite of the bytes (the
                    // cheap delete; the copy is unreadable either way).
                    let body = serde_json::json!({"seq": seq, "no_erase": true});
                    match api::request(&client, &subject, Bytes::from(body.to_string()), timeout)
                        .await
                    {
                        Ok(v) if v["success"] == Value::Bool(true) => Outcome::Success(Reply::Done),
                        Ok(v) => Outcome::Failed(Failure::Other {
                            description: format!("delete {stream} seq {seq}: {v}"),
                        }),
                        Err(e) => e.into_failure(true),
                    }
                });
            }
            Command::Consume {
                op,
                sub,
                consumer,
                create,
                max_in_flight,
            } => {
                let needs_ack = consumer.ack_policy != AckPolicy::None;
                let window = usize::try_from(max_in_flight.max(1)).unwrap_or(1);
                let flow = needs_ack.then(|| Arc::new(Semaphore::new(window)));
                let job = ConsumeJob {
                    js: self.js.clone(),
                    client: self.client.clone(),
                    spec: consumer,
                    create,
                    window,
                    flow: flow.clone(),
                    api_timeout: self.config.api_timeout,
                    pull_expires: self.config.pull_expires,
                };
                let pubs = vec![job.spec.create_request().subject, job.spec.info_subject()];
                self.spawn_feed(op, sub, FeedKind::Consumer, flow, pubs, move |sink| {
                    consume(job, sink)
                });
            }
            Command::Settle {
                op,
                delivery,
                kind,
                confirm,
            } => self.settle(op, delivery, kind, confirm).await,
            Command::KvGet { op, bucket, key } => {
                let js = self.js.clone();
                let subject = format!("$JS.API.STREAM.MSG.GET.KV_{bucket}");
                self.spawn_op(op, vec![subject], None, async move {
                    match kv_last(&js, &bucket, &key).await {
                        Ok(entry) => Outcome::Success(Reply::Kv(
                            entry.filter(|e| e.operation == KvOperation::Put),
                        )),
                        Err(o) => o,
                    }
                });
            }
            Command::KvGetDirect { op, bucket, key } => {
                let js = self.js.clone();
                let subject = format!("$JS.API.DIRECT.GET.KV_{bucket}.$KV.{bucket}.{key}");
                self.spawn_op(op, vec![subject], None, async move {
                    match kv_last_direct(&js, &bucket, &key).await {
                        Ok(entry) => Outcome::Success(Reply::Kv(
                            entry.filter(|e| e.operation == KvOperation::Put),
                        )),
                        Err(o) => o,
                    }
                });
            }
            Command::KvPut {
                op,
                bucket,
                key,
                value,
                condition,
            } => {
                let js = self.js.clone();
                let subject = format!("$KV.{bucket}.{key}");
                self.spawn_op(op, vec![subject], None, async move {
                    kv_put(js, bucket, key, value, condition).await
                });
            }
            Command::KvDelete {
                op,
                bucket,
                key,
                expected_revision,
            } => {
                let js = self.js.clone();
                let subject = format!("$KV.{bucket}.{key}");
                self.spawn_op(op, vec![subject.clone()], None, async move {
                    let mut publish = jetstream::message::PublishMessage::build()
                        .payload(Bytes::new())
                        .header("KV-Operation", "DEL");
                    if let Some(rev) = expected_revision {
                        publish = publish.expected_last_subject_sequence(rev);
                    }
                    js_publish(&js, subject, publish)
                        .await
                        .map(|ack| Reply::KvWritten { revision: ack.seq })
                });
            }
            Command::KvWatch {
                op,
                sub,
                bucket,
                filter,
            } => {
                let job = WatchJob {
                    js: self.js.clone(),
                    client: self.client.clone(),
                    bucket,
                    filter,
                };
                let pubs = vec![format!("$JS.API.CONSUMER.CREATE.KV_{}.", job.bucket)];
                self.spawn_feed(op, sub, FeedKind::Watch, None, pubs, move |sink| {
                    watch(job, sink)
                });
            }
            Command::Unsubscribe { .. }
            | Command::StopConsume { .. }
            | Command::KvUnwatch { .. } => {}
            other => {
                tracing::error!(command = ?other, "command kind not supported by this executor");
                if let Some(op) = other.op() {
                    self.emit(Input::Completed(Completion::failed(
                        op,
                        Failure::Other {
                            description: "command not supported by the tokio executor".to_owned(),
                        },
                    )));
                }
            }
        }
    }

    /// A barrier that completes on the refusal of a subscription known to be refused.
    async fn sentinel_barrier(&mut self, op: OpId, subject: String) {
        self.subscribed_since_barrier = false;
        match self.client.subscribe(subject.clone()).await {
            Ok(sub) => {
                let timeout = self.config.barrier_timeout;
                self.spawn_op(op, Vec::new(), None, async move {
                    tokio::time::sleep(timeout).await;
                    Outcome::Failed(Failure::Timeout)
                });
                self.sentinels.insert(subject, (op, sub));
            }
            Err(e) => self.emit(Input::Completed(Completion::failed(
                op,
                Failure::Other {
                    description: format!("barrier sentinel {subject}: {e}"),
                },
            ))),
        }
    }

    async fn settle(&mut self, op: OpId, delivery: DeliveryId, kind: AckKind, confirm: bool) {
        let Some(held) = self.deliveries.remove(&delivery) else {
            self.emit(Input::Completed(Completion::failed(op, Failure::NotFound)));
            return;
        };
        // The machine no longer holds it: free one slot of the consumer's window.
        if let Some(flow) = self
            .feeds
            .get(&held.sub)
            .filter(|f| f.generation == held.generation)
            .and_then(|f| f.flow.as_ref())
        {
            flow.add_permits(1);
        }
        let Some(ack_subject) = held.ack_subject else {
            // AckNone: nothing to tell the server.
            self.emit(Input::Completed(Completion::success(op, Reply::Done)));
            return;
        };
        let ack = match kind {
            AckKind::Ack => jetstream::AckKind::Ack,
            AckKind::Nak { delay } => jetstream::AckKind::Nak(Some(to_std(delay))),
            AckKind::Term => jetstream::AckKind::Term,
        };
        if !confirm {
            // A plain ack, as the reference sends it: handed to the connection, nothing awaited.
            let outcome = match self.client.publish(ack_subject, Bytes::from(ack)).await {
                Ok(()) => Outcome::Success(Reply::Sent),
                Err(e) => {
                    tracing::debug!(error = %e, "plain ack not sent: unknown");
                    Outcome::Unknown
                }
            };
            self.emit(Input::Completed(Completion { op, outcome }));
            return;
        }
        let client = self.client.clone();
        let timeout = self.config.api_timeout;
        self.spawn_op(op, vec![ack_subject.clone()], None, async move {
            double_ack(client, ack_subject, ack, timeout).await
        });
    }
}

/// A feed task's way back to the actor.
struct FeedSink {
    tx: mpsc::UnboundedSender<Internal>,
    op: OpId,
    sub: SubId,
    generation: u64,
    /// Notified when the feed is closed.
    stop: Arc<Notify>,
}

impl FeedSink {
    fn done(&self, outcome: Outcome<Reply>) {
        let _ = self.tx.send(Internal::Done {
            op: self.op,
            outcome,
        });
    }

    /// False once the actor is gone.
    fn item(&self, item: FeedItem) -> bool {
        self.tx
            .send(Internal::Feed {
                sub: self.sub,
                generation: self.generation,
                item,
            })
            .is_ok()
    }
}

/// The JetStream publish lane: one task that sends every `JsPublish` in command order and
/// awaits their PubAcks together (a `FuturesUnordered` in the same task, not a task per PubAck),
/// reporting each completion as it arrives. Publishes stay pipelined: a send does not wait for
/// an earlier PubAck, only for room in the window (`publish_window` PubAcks awaited at once; the
/// permits are freed only as PubAcks are taken, so they are still collected while a send waits).
struct PublishLane {
    jobs: mpsc::UnboundedSender<LaneJob>,
    /// Bumped at every connection loss: the lane drops its window and starts a fresh one.
    epoch: tokio::sync::watch::Sender<u64>,
}

impl PublishLane {
    fn spawn(
        client: Client,
        config: &ExecutorConfig,
        stats: Arc<Stats>,
        internal: mpsc::UnboundedSender<Internal>,
    ) -> PublishLane {
        let (jobs, rx) = mpsc::unbounded_channel::<LaneJob>();
        let (epoch, epoch_rx) = tokio::sync::watch::channel(0);
        let window = LaneWindow {
            client,
            ack_timeout: config.publish_ack_timeout,
            size: config.publish_window.max(1),
        };
        tokio::spawn(run_publish_lane(window, rx, epoch_rx, stats, internal));
        PublishLane { jobs, epoch }
    }

    /// Drops the window: every op in it has been answered `Unknown` already.
    fn reset(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }
}

/// What a fresh publish window is made of.
struct LaneWindow {
    client: Client,
    ack_timeout: Duration,
    size: usize,
}

impl LaneWindow {
    fn open(&self) -> jetstream::Context {
        jetstream::ContextBuilder::new()
            .timeout(self.ack_timeout)
            .max_ack_inflight(self.size)
            .build(self.client.clone())
    }
}

async fn run_publish_lane(
    window: LaneWindow,
    mut rx: mpsc::UnboundedReceiver<LaneJob>,
    mut epoch: tokio::sync::watch::Receiver<u64>,
    stats: Arc<Stats>,
    internal: mpsc::UnboundedSender<Internal>,
) {
    let report = |op: OpId, result: Result<jetstream::publish::PublishAck, _>| {
        let outcome = match result {
            Ok(ack) => Outcome::Success(Reply::PubAck(PubAck {
                stream: ack.stream,
                seq: ack.sequence,
                duplicate: ack.duplicate,
            })),
            Err(e) => {
                let outcome = publish_failure(&e);
                if matches!(outcome, Outcome::Unknown) {
                    bump(&stats.publish_ack_timeouts);
                }
                outcome
            }
        };
        let _ = internal.send(Internal::Done { op, outcome });
    };
    let mut js = window.open();
    let mut acks = futures::stream::FuturesUnordered::new();
    let mut open = true;
    let mut epoch_open = true;
    while open || !acks.is_empty() {
        tokio::select! {
            changed = epoch.changed(), if epoch_open => {
                epoch_open = changed.is_ok();
                js = window.open();
                acks = futures::stream::FuturesUnordered::new();
            }
            job = rx.recv(), if open => {
                let Some(job) = job else {
                    open = false;
                    continue;
                };
                let sent = {
                    let send = js.send_publish(job.subject, job.publish);
                    tokio::pin!(send);
                    loop {
                        tokio::select! {
                            sent = &mut send => break Some(sent),
                            Some((op, result)) = acks.next(), if !acks.is_empty() => {
                                report(op, result);
                            }
                            changed = epoch.changed(), if epoch_open => {
                                epoch_open = changed.is_ok();
                                break None;
                            }
                        }
                    }
                };
                match sent {
                    // The connection was lost while this publish waited for room: its op is
                    // answered `Unknown` already, and the window is renewed.
                    None => {
                        js = window.open();
                        acks = futures::stream::FuturesUnordered::new();
                    }
                    Some(Ok(ack)) => {
                        let op = job.op;
                        acks.push(async move { (op, ack.await) });
                    }
                    Some(Err(e)) => {
                        let _ = internal.send(Internal::Done {
                            op: job.op,
                            outcome: publish_failure(&e),
                        });
                    }
                }
            }
            Some((op, result)) = acks.next(), if !acks.is_empty() => report(op, result),
        }
    }
}

/// Maps a JetStream publish error.
fn publish_failure<T>(e: &jetstream::context::PublishError) -> Outcome<T> {
    use jetstream::context::PublishErrorKind as K;
    let text = error_chain(e);
    match e.kind() {
        K::StreamNotFound => Outcome::Failed(Failure::NotFound),
        K::WrongLastSequence => Outcome::Failed(Failure::WrongLastRevision {
            current: api::current_revision(&text),
        }),
        K::WrongLastMessageId => Outcome::Failed(Failure::Rejected {
            code: Some(10070),
            description: text,
        }),
        K::TimedOut | K::BrokenPipe => Outcome::Unknown,
        K::MaxPayloadExceeded => Outcome::Failed(Failure::Rejected {
            code: None,
            description: text,
        }),
        K::MaxAckPending => Outcome::Failed(Failure::Other { description: text }),
        K::Other => {
            let js_err =
                std::error::Error::source(e).and_then(|s| s.downcast_ref::<jetstream::Error>());
            match js_err {
                Some(j) => Outcome::Failed(api::failure_for_code(
                    u32::try_from(j.error_code().0).unwrap_or(0),
                    text,
                )),
                None => Outcome::Failed(Failure::Other { description: text }),
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let t = src.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = src.source();
    }
    s
}

async fn js_publish(
    js: &jetstream::Context,
    subject: String,
    publish: jetstream::message::PublishMessage,
) -> Outcome<PubAck> {
    match js.send_publish(subject, publish).await {
        Ok(fut) => match fut.await {
            Ok(ack) => Outcome::Success(PubAck {
                stream: ack.stream,
                seq: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(e) => publish_failure(&e),
        },
        Err(e) => publish_failure(&e),
    }
}

/// A double ack as a request: the server confirms an ack it applied. Not async-nats'
/// `double_ack`, which takes *any* answer as confirmation, including the no-responders status
/// the server sends when the consumer no longer exists.
async fn double_ack(
    client: Client,
    ack_subject: String,
    ack: jetstream::AckKind,
    timeout: Duration,
) -> Outcome<Reply> {
    use async_nats::RequestErrorKind as K;
    let req = async_nats::Request::new()
        .payload(Bytes::from(ack))
        .timeout(Some(timeout));
    match client.send_request(ack_subject, req).await {
        Ok(_) => Outcome::Success(Reply::Done),
        // Nobody behind the ack subject: the consumer is gone, the ack was not applied.
        Err(e) if e.kind() == K::NoResponders => Outcome::Failed(Failure::NotFound),
        Err(e) => {
            tracing::debug!(error = %e, "settle without confirmation: unknown");
            Outcome::Unknown
        }
    }
}

async fn barrier(
    client: Client,
    subject: String,
    timeout: Duration,
    grace: Duration,
) -> Outcome<Reply> {
    let req = async_nats::Request::new().timeout(Some(timeout));
    match client.send_request(subject, req).await {
        Ok(_) => {}
        Err(e) => match e.kind() {
            async_nats::RequestErrorKind::NoResponders => {}
            async_nats::RequestErrorKind::TimedOut => return Outcome::Failed(Failure::Timeout),
            _ => {
                return Outcome::Failed(Failure::Other {
                    description: format!("barrier: {e}"),
                });
            }
        },
    }
    if !grace.is_zero() {
        tokio::time::sleep(grace).await;
    }
    Outcome::Success(Reply::Done)
}

async fn request(
    client: Client,
    subject: String,
    reply: String,
    payload: Bytes,
    timeout: Duration,
) -> Outcome<Reply> {
    use async_nats::RequestErrorKind as K;
    let req = async_nats::Request::new()
        .payload(payload)
        .inbox(reply)
        .timeout(Some(timeout));
    match client.send_request(subject, req).await {
        Ok(msg) => Outcome::Success(Reply::Response(Response {
            headers: headers_of(msg.headers.as_ref()),
            payload: msg.payload,
        })),
        Err(e) => match e.kind() {
            K::NoResponders => Outcome::Failed(Failure::NoResponders),
            K::TimedOut => Outcome::Unknown,
            K::InvalidSubject | K::MaxPayloadExceeded => Outcome::Failed(Failure::Rejected {
                code: None,
                description: e.to_string(),
            }),
            K::Other => Outcome::Unknown,
        },
    }
}

async fn stream_info(client: Client, subject: String, timeout: Duration) -> Outcome<Reply> {
    match api::request(&client, &subject, Bytes::new(), timeout).await {
        Ok(v) => {
            let state = &v["state"];
            let n = |k: &str| state.get(k).and_then(Value::as_u64).unwrap_or(0);
            let (last_seq, messages) = (n("last_seq"), n("messages"));
            // The io contract: an empty stream's first sequence is `last_seq + 1` (the server
            // says 0 for a stream that never stored anything).
            let first_seq = if messages == 0 {
                last_seq.saturating_add(1)
            } else {
                n("first_seq")
            };
            Outcome::Success(Reply::StreamState(StreamState {
                first_seq,
                last_seq,
                messages,
                consumers: n("consumer_count"),
                max_consumers: v["config"]["max_consumers"].as_i64().unwrap_or(-1),
                // The server reports `max_age` in nanoseconds.
                max_age_ms: v["config"]["max_age"].as_u64().unwrap_or(0) / 1_000_000,
            }))
        }
        Err(e) => e.into_failure(false),
    }
}

async fn consumer_info(client: Client, subject: String, timeout: Duration) -> Outcome<Reply> {
    match api::request(&client, &subject, Bytes::new(), timeout).await {
        Ok(v) => {
            let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            let delivered_stream_seq = v["delivered"]
                .get("stream_seq")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            Outcome::Success(Reply::ConsumerState(ConsumerState {
                delivered_stream_seq,
                num_pending: n("num_pending"),
                num_ack_pending: n("num_ack_pending"),
                ack_floor_stream_seq: v["ack_floor"]
                    .get("stream_seq")
                    .and_then(Value::as_u64)
                    .unwrap_or(0),
            }))
        }
        Err(e) => e.into_failure(false),
    }
}

struct ReadSpec {
    stream: String,
    filter: String,
    start: ReadStart,
    last_seq: Option<u64>,
    max: u32,
    reader: Option<String>,
}

fn unique_token(client: &Client) -> String {
    let inbox = client.new_inbox();
    inbox.rsplit('.').next().unwrap_or("x").to_owned()
}

async fn read_stream(
    js: jetstream::Context,
    client: Client,
    spec: ReadSpec,
    timeout: Duration,
) -> Outcome<Reply> {
    let deliver_policy = match spec.start {
        ReadStart::Seq(seq) => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: seq.max(1),
        },
        ReadStart::Time(at) => {
            let nanos = i128::from(at.0) * 1_000_000;
            match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
                Ok(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
                Err(e) => {
                    return Outcome::Failed(Failure::Rejected {
                        code: None,
                        description: format!("start time {at}: {e}"),
                    });
                }
            }
        }
    };
    if spec.max == 0
        || spec
            .last_seq
            .is_some_and(|l| matches!(spec.start, ReadStart::Seq(s) if s > l))
    {
        return Outcome::Success(Reply::Stored(Vec::new()));
    }
    // A pinned name (the agent's `chathist_<id>`) is removed before the read completes, so the
    // next page can create it again; a leftover of a crashed read is removed and the create
    // retried once. A name of our own is removed in the background.
    let pinned = spec.reader.is_some();
    let name = spec
        .reader
        .clone()
        .unwrap_or_else(|| format!("read_{}", unique_token(&client)));
    let remove = |js: jetstream::Context, stream: String, name: String| async move {
        if pinned {
            if let Err(e) = js.delete_consumer_from_stream(&name, &stream).await {
                tracing::debug!(error = %e, consumer = %name, "read consumer not deleted (expires by itself)");
            }
        } else {
            delete_consumer_later(js, stream, name);
        }
    };
    let config = consumer::pull::Config {
        name: Some(name.clone()),
        filter_subject: spec.filter.clone(),
        deliver_policy,
        ack_policy: consumer::AckPolicy::None,
        memory_storage: true,
        inactive_threshold: Duration::from_secs(30),
        ..Default::default()
    };
    let created = match js
        .create_consumer_on_stream(config.clone(), &spec.stream)
        .await
    {
        Ok(c) => c,
        Err(_) if pinned => {
            // Most likely a leftover reader of the same name with another start: remove it and
            // try once more.
            let _ = js.delete_consumer_from_stream(&name, &spec.stream).await;
            match js.create_consumer_on_stream(config, &spec.stream).await {
                Ok(c) => c,
                Err(e) => return consumer_error(&e),
            }
        }
        Err(e) => return consumer_error(&e),
    };
    let pending = created.cached_info().num_pending;
    let want = u64::from(spec.max).min(pending);
    let mut out = Vec::new();
    if want > 0 {
        let batch = created
            .batch()
            .max_messages(usize::try_from(want).unwrap_or(usize::MAX))
            .expires(timeout)
            .messages()
            .await;
        match batch {
            Ok(mut batch) => {
                while let Some(m) = batch.next().await {
                    match m {
                        Ok(m) => {
                            let Ok(info) = m.info() else { continue };
                            let seq = info.stream_sequence;
                            if spec.last_seq.is_some_and(|l| seq > l) {
                                break;
                            }
                            out.push(StoredMessage {
                                seq,
                                subject: m.subject.to_string(),
                                headers: headers_of(m.headers.as_ref()),
                                payload: m.payload.clone(),
                                stored_at: unix_millis(info.published),
                            });
                        }
                        Err(e) => {
                            remove(js, spec.stream, name).await;
                            return Outcome::Failed(Failure::Other {
                                description: format!("read {}: {e}", spec.filter),
                            });
                        }
                    }
                }
            }
            Err(e) => {
                remove(js, spec.stream, name).await;
                return Outcome::Failed(Failure::Other {
                    description: format!("read {}: {e}", spec.filter),
                });
            }
        }
    }
    remove(js, spec.stream, name).await;
    Outcome::Success(Reply::Stored(out))
}

fn delete_consumer_later(js: jetstream::Context, stream: String, name: String) {
    tokio::spawn(async move {
        if let Err(e) = js.delete_consumer_from_stream(&name, &stream).await {
            tracing::debug!(error = %e, consumer = %name, "read consumer not deleted (expires by itself)");
        }
    });
}

fn consumer_error<T>(e: &jetstream::stream::ConsumerError) -> Outcome<T> {
    use jetstream::stream::ConsumerErrorKind as K;
    match e.kind() {
        K::JetStream(j) => Outcome::Failed(api::failure_for_code(
            u32::try_from(j.error_code().0).unwrap_or(0),
            j.to_string(),
        )),
        K::TimedOut => Outcome::Failed(Failure::Timeout),
        _ => Outcome::Failed(Failure::Other {
            description: error_chain(e),
        }),
    }
}

fn unix_millis(t: time::OffsetDateTime) -> UnixMillis {
    UnixMillis(u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
}

struct ConsumeJob {
    js: jetstream::Context,
    client: Client,
    spec: ConsumerSpec,
    create: bool,
    window: usize,
    flow: Option<Arc<Semaphore>>,
    api_timeout: Duration,
    pull_expires: Duration,
}

async fn consume(job: ConsumeJob, sink: FeedSink) {
    if job.create {
        let req = job.spec.create_request();
        let mut body = req.body;
        // No `action`: create or update (the command's contract); provisioning uses `create`.
        if let Some(obj) = body.as_object_mut() {
            obj.remove("action");
        }
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
        if let Err(e) = api::request(&job.client, &req.subject, bytes, job.api_timeout).await {
            sink.done(e.into_failure(true));
            return;
        }
    }
    let bound = job
        .js
        .get_consumer_from_stream::<consumer::pull::Config, _, _>(&job.spec.name, &job.spec.stream)
        .await;
    let consumer = match bound {
        Ok(c) => c,
        Err(e) => {
            sink.done(consumer_error(&e));
            return;
        }
    };
    // Where the consumer stood at the bind: the machine's gap check starts at the delivery
    // pointer, and what sits between the ack floor and it unsettled may be stranded.
    let info = consumer.cached_info();
    sink.done(Outcome::Success(Reply::ConsumerBound {
        delivered_stream_seq: info.delivered.stream_sequence,
        ack_floor_stream_seq: info.ack_floor.stream_sequence,
        num_ack_pending: u64::try_from(info.num_ack_pending).unwrap_or(0),
    }));
    let needs_ack = job.flow.is_some();
    loop {
        // How many messages this pull may ask for: the free part of the window.
        let asked = match &job.flow {
            Some(flow) => {
                // While the window is full no pull is outstanding, so nothing would tell us the
                // consumer is gone: look every `pull_expires`.
                let first = loop {
                    match tokio::time::timeout(job.pull_expires, flow.acquire()).await {
                        Ok(Ok(permit)) => break permit,
                        Ok(Err(_)) => return,
                        Err(_) => {
                            if let Some(detail) = consumer_gone(&job).await {
                                sink.item(FeedItem::Ended(detail));
                                return;
                            }
                        }
                    }
                };
                first.forget();
                let mut n = 1;
                while n < job.window {
                    match flow.try_acquire() {
                        Ok(p) => {
                            p.forget();
                            n += 1;
                        }
                        Err(_) => break,
                    }
                }
                n
            }
            None => job.window,
        };
        let started = tokio::time::Instant::now();
        let batch = consumer
            .batch()
            .max_messages(asked)
            .expires(job.pull_expires)
            .messages()
            .await;
        let mut got = 0;
        let mut ended: Option<String> = None;
        match batch {
            Ok(mut batch) => loop {
                let next = tokio::select! {
                    biased;
                    () = sink.stop.notified() => {
                        if needs_ack {
                            hand_back(&mut batch).await;
                        }
                        return;
                    }
                    m = batch.next() => m,
                };
                let Some(m) = next else { break };
                match m {
                    Ok(msg) => {
                        got += 1;
                        if !sink.item(FeedItem::Delivery {
                            msg: Box::new(msg),
                            needs_ack,
                        }) {
                            return;
                        }
                    }
                    Err(e) => {
                        ended = Some(e.to_string());
                        break;
                    }
                }
            },
            Err(e) => ended = Some(e.to_string()),
        }
        if let Some(flow) = &job.flow {
            flow.add_permits(asked.saturating_sub(got));
        }
        if let Some(detail) = ended {
            sink.item(FeedItem::Ended(detail));
            return;
        }
        // A pull that ended early and empty: make sure the consumer still exists, and never spin.
        if got == 0 && started.elapsed() < job.pull_expires / 2 {
            if let Some(detail) = consumer_gone(&job).await {
                sink.item(FeedItem::Ended(detail));
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Naks whatever the pull of a stopped feed still delivers within [`HAND_BACK_GRACE`], so the
/// server redelivers it at once (to a successor) instead of after the consumer's `ack_wait`.
async fn hand_back<S, E>(batch: &mut S)
where
    S: futures::Stream<Item = Result<jetstream::Message, E>> + Unpin,
{
    let until = tokio::time::Instant::now() + HAND_BACK_GRACE / 2;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(until, batch.next()).await {
        let _ = msg
            .ack_with(jetstream::AckKind::Nak(Some(HAND_BACK_DELAY)))
            .await;
    }
}

/// `Some(why)` when the server says the consumer (or its stream) no longer exists; `None` when
/// it exists or the check itself failed (a transient fault is not an end).
async fn consumer_gone(job: &ConsumeJob) -> Option<String> {
    match api::request(
        &job.client,
        &job.spec.info_subject(),
        Bytes::new(),
        job.api_timeout,
    )
    .await
    {
        Err(e)
            if matches!(
                e.err_code(),
                Some(api::CONSUMER_NOT_FOUND | api::STREAM_NOT_FOUND)
            ) =>
        {
            Some(format!(
                "consumer {}/{}: {e}",
                job.spec.stream, job.spec.name
            ))
        }
        _ => None,
    }
}

struct WatchJob {
    js: jetstream::Context,
    client: Client,
    bucket: String,
    filter: String,
}

async fn watch(job: WatchJob, sink: FeedSink) {
    let stream = match job
        .js
        .get_stream_no_info(format!("KV_{}", job.bucket))
        .await
    {
        Ok(s) => s,
        Err(e) => {
            sink.done(Outcome::Failed(Failure::Rejected {
                code: None,
                description: e.to_string(),
            }));
            return;
        }
    };
    let prefix = format!("$KV.{}.", job.bucket);
    let config = consumer::push::OrderedConfig {
        name: Some(format!("watch_{}", unique_token(&job.client))),
        deliver_subject: job.client.new_inbox(),
        description: Some("cotal kv watch".to_owned()),
        filter_subject: format!("{prefix}{}", job.filter),
        deliver_policy: consumer::DeliverPolicy::LastPerSubject,
        replay_policy: consumer::ReplayPolicy::Instant,
        ..Default::default()
    };
    let created = match stream.create_consumer(config).await {
        Ok(c) => c,
        Err(e) => {
            sink.done(consumer_error(&e));
            return;
        }
    };
    let mut initial_done = created.cached_info().num_pending == 0;
    let mut messages = match created.messages().await {
        Ok(m) => m,
        Err(e) => {
            sink.done(Outcome::Failed(Failure::Other {
                description: format!("watch {}: {e}", job.bucket),
            }));
            return;
        }
    };
    if initial_done {
        sink.done(Outcome::Success(Reply::Done));
    }
    let mut errors_in_a_row = 0;
    while let Some(m) = messages.next().await {
        let msg = match m {
            Ok(msg) => {
                errors_in_a_row = 0;
                msg
            }
            Err(e) => {
                errors_in_a_row += 1;
                tracing::warn!(error = %e, bucket = %job.bucket, "kv watch error");
                if errors_in_a_row >= 3 {
                    let detail = format!("kv watch {}: {e}", job.bucket);
                    if initial_done {
                        sink.item(FeedItem::Ended(detail));
                    } else {
                        sink.done(Outcome::Failed(Failure::Other {
                            description: detail,
                        }));
                    }
                    return;
                }
                continue;
            }
        };
        let Ok(info) = msg.info() else { continue };
        let pending = info.pending;
        let entry = KvEntry {
            key: msg
                .subject
                .strip_prefix(prefix.as_str())
                .unwrap_or(msg.subject.as_str())
                .to_owned(),
            revision: info.stream_sequence,
            operation: kv_operation(msg.headers.as_ref()),
            value: msg.payload.clone(),
        };
        if !sink.item(FeedItem::Kv(entry)) {
            return;
        }
        if !initial_done && pending == 0 {
            initial_done = true;
            sink.done(Outcome::Success(Reply::Done));
        }
    }
    if initial_done {
        sink.item(FeedItem::Ended(format!("kv watch {} closed", job.bucket)));
    } else {
        sink.done(Outcome::Unknown);
    }
}

fn kv_operation(headers: Option<&HeaderMap>) -> KvOperation {
    let Some(h) = headers else {
        return KvOperation::Put;
    };
    match h.get("KV-Operation").map(|v| v.as_str()) {
        Some("DEL") => KvOperation::Delete,
        Some("PURGE") => KvOperation::Purge,
        // A TTL limit marker (2.11+) reads as a purge, as async-nats reports it.
        _ if h.get("Nats-Marker-Reason").is_some() => KvOperation::Purge,
        _ => KvOperation::Put,
    }
}

/// The stream behind KV bucket `bucket`, without a STREAM.INFO round trip.
async fn kv_stream(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<jetstream::stream::Stream<()>, Outcome<Reply>> {
    js.get_stream_no_info(format!("KV_{bucket}"))
        .await
        .map_err(|e| {
            Outcome::Failed(Failure::Rejected {
                code: None,
                description: e.to_string(),
            })
        })
}

/// [`kv_last`] through a direct get addressed by the key's subject
/// (`$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>`, empty body), which a credential can grant
/// for one key.
async fn kv_last_direct(
    js: &jetstream::Context,
    bucket: &str,
    key: &str,
) -> Result<Option<KvEntry>, Outcome<Reply>> {
    use jetstream::stream::DirectGetErrorKind as K;
    let stream = kv_stream(js, bucket).await?;
    match stream
        .direct_get_last_for_subject(format!("$KV.{bucket}.{key}"))
        .await
    {
        Ok(m) => Ok(Some(KvEntry {
            key: key.to_owned(),
            revision: m.sequence,
            operation: kv_operation(Some(&m.headers)),
            value: m.payload,
        })),
        Err(e) => match e.kind() {
            K::NotFound => Ok(None),
            K::TimedOut => Err(Outcome::Unknown),
            K::InvalidSubject => Err(Outcome::Failed(Failure::Rejected {
                code: None,
                description: format!("invalid key {key:?}"),
            })),
            _ => Err(Outcome::Failed(Failure::Other {
                description: error_chain(&e),
            })),
        },
    }
}

/// The last entry of a key, markers included; `None` when the key never held anything (or its
/// history was removed).
async fn kv_last(
    js: &jetstream::Context,
    bucket: &str,
    key: &str,
) -> Result<Option<KvEntry>, Outcome<Reply>> {
    use jetstream::stream::LastRawMessageErrorKind as K;
    let stream = kv_stream(js, bucket).await?;
    match stream
        .get_last_raw_message_by_subject(&format!("$KV.{bucket}.{key}"))
        .await
    {
        Ok(m) => Ok(Some(KvEntry {
            key: key.to_owned(),
            revision: m.sequence,
            operation: kv_operation(Some(&m.headers)),
            value: m.payload,
        })),
        Err(e) => match e.kind() {
            K::NoMessageFound => Ok(None),
            K::JetStream(j) => Err(Outcome::Failed(api::failure_for_code(
                u32::try_from(j.error_code().0).unwrap_or(0),
                j.to_string(),
            ))),
            K::InvalidSubject => Err(Outcome::Failed(Failure::Rejected {
                code: None,
                description: format!("invalid key {key:?}"),
            })),
            K::Other => Err(Outcome::Failed(Failure::Other {
                description: error_chain(&e),
            })),
        },
    }
}

async fn kv_put(
    js: jetstream::Context,
    bucket: String,
    key: String,
    value: Bytes,
    condition: KvCondition,
) -> Outcome<Reply> {
    let subject = format!("$KV.{bucket}.{key}");
    let put = |expect: Option<u64>| {
        let mut p = jetstream::message::PublishMessage::build().payload(value.clone());
        if let Some(rev) = expect {
            p = p.expected_last_subject_sequence(rev);
        }
        js_publish(&js, subject.clone(), p)
    };
    let written = |ack: PubAck| Reply::KvWritten { revision: ack.seq };
    match condition {
        KvCondition::Any => put(None).await.map(written),
        KvCondition::Revision(rev) => put(Some(rev)).await.map(written),
        KvCondition::CreateOnly => {
            // Create = "expected last subject sequence 0"; a delete or purge marker counts as
            // nothing, so on conflict look at what is there and, for a marker, try over it (still
            // compare-and-set on the marker's revision). Bounded: three tries.
            let mut expect = 0;
            for _ in 0..3 {
                match put(Some(expect)).await {
                    Outcome::Failed(Failure::WrongLastRevision { .. }) => {
                        match kv_last(&js, &bucket, &key).await {
                            Ok(Some(e)) if e.operation == KvOperation::Put => {
                                return Outcome::Failed(Failure::AlreadyExists);
                            }
                            Ok(Some(marker)) => expect = marker.revision,
                            Ok(None) => expect = 0,
                            Err(o) => return o,
                        }
                    }
                    other => return other.map(written),
                }
            }
            Outcome::Failed(Failure::AlreadyExists)
        }
    }
}

fn header_map(headers: &[Header]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(k.as_str(), v.as_str());
    }
    map
}

/// Headers as `(name, value)` pairs, sorted by name (the client keeps them in a hash map).
pub fn headers_of(headers: Option<&HeaderMap>) -> Vec<Header> {
    let Some(h) = headers else {
        return Vec::new();
    };
    let mut out: Vec<Header> = h
        .iter()
        .flat_map(|(name, values)| {
            values
                .iter()
                .map(move |v| (name.to_string(), v.to_string()))
        })
        .collect();
    out.sort();
    out
}

fn to_std(d: cotal_core::time::Duration) -> Duration {
    Duration::from_millis(d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_parse_as_the_server_writes_them() {
        assert_eq!(
            parse_violation("Permissions Violation for Subscription to \"secret.x\""),
            Some(Violation::Subscribe {
                subject: "secret.x".into(),
                queue: None
            })
        );
        assert_eq!(
            parse_violation(
                "nats: Permissions Violation for Subscription to \"secret.q\" using queue \"grp\""
            ),
            Some(Violation::Subscribe {
                subject: "secret.q".into(),
                queue: Some("grp".into())
            })
        );
        assert_eq!(
            parse_violation("Permissions Violation for Publish to \"secret.pub\""),
            Some(Violation::Publish {
                subject: "secret.pub".into()
            })
        );
        assert_eq!(parse_violation("Authorization Violation"), None);
        assert_eq!(
            parse_violation("Permissions Violation for Publish to \"x"),
            None
        );
    }

    #[test]
    fn kv_markers_are_read_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(kv_operation(None), KvOperation::Put);
        h.insert("KV-Operation", "DEL");
        assert_eq!(kv_operation(Some(&h)), KvOperation::Delete);
        let mut p = HeaderMap::new();
        p.insert("KV-Operation", "PURGE");
        assert_eq!(kv_operation(Some(&p)), KvOperation::Purge);
        let mut t = HeaderMap::new();
        t.insert("Nats-Marker-Reason", "MaxAge");
        assert_eq!(kv_operation(Some(&t)), KvOperation::Purge);
    }

    #[test]
    fn headers_round_trip_sorted() {
        let h = header_map(&[("b".into(), "2".into()), ("a".into(), "1".into())]);
        assert_eq!(
            headers_of(Some(&h)),
            vec![("a".to_owned(), "1".to_owned()), ("b".into(), "2".into())]
        );
        assert!(headers_of(None).is_empty());
    }
}
