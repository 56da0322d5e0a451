//! Clients, connections and permissions: where [`cotal_core::io::Command`]s are executed.
//!
//! [`Net`] owns the [`Broker`] and everything a NATS server keeps per connection: core
//! subscriptions, bound consumer feeds, KV watches, outstanding requests. It is sans-IO like the
//! machines it serves: the host ([`crate::host`]) carries commands to it and carries its
//! [`Outgoing`] inputs back to the clients with latency and faults, so ordering and time live in
//! one place ([`crate::sched`]).
//!
//! # A command's path
//!
//! 1. [`Net::client_send`] (client side, when the machine emits it): commands while disconnected
//!    fail at once with [`Failure::Other`] ("never sent", io contract rule 1); a `Subscribe`
//!    completes locally with `Done` (async-nats returns once the SUB is written); everything else
//!    travels to the server.
//! 2. [`Net::execute`] (server side, after the upload latency): permission checks, then the effect
//!    on the broker, then [`Outgoing`] inputs for the clients concerned.
//! 3. [`Net::accept`] (client side, when an input arrives): inputs of a dead connection and
//!    inbound messages of a feed the client already closed are dropped.
//!
//! # Permissions (modelled on [`Permissions`], nats-notes §4)
//!
//! Publish is allowed when the allow list is empty or some entry matches, and no deny entry
//! matches. A subscription is allowed when the allow list is empty or covers its pattern
//! ([`patterns_cover`]), and no deny entry covers it; messages matching a deny entry are not
//! delivered on an allowed wildcard subscription.
//!
//! - A refused subscription produces [`Inbound::Refused`] from the server, on the same ordered
//!   lane as every later reply, so it always arrives before the completion of a later
//!   [`Command::Barrier`] (and after the subscribe's own local `Done`).
//! - A forbidden core publish vanishes.
//! - A forbidden JetStream publish, request, or JetStream API call fails with
//!   [`Failure::PermissionDenied`] carrying the server's words. The real client sees a timeout
//!   plus an asynchronous `Permissions Violation for Publish` event (nats-notes §4.1 item 5); the
//!   tokio driver is expected to correlate the two and report the same failure.
//! - JetStream calls are checked against the API subjects the tokio driver uses: `$KV.<b>.<key>`
//!   for KV writes; `STREAM.MSG.GET` (or `DIRECT.GET`) on `KV_<b>` for KV reads; `CONSUMER.CREATE`
//!   on `KV_<b>` for watches; `STREAM.INFO.<stream>`; for stream reads `STREAM.MSG.GET`,
//!   `DIRECT.GET`, or a `CONSUMER.CREATE` grant on the stream whose filter covers the read's
//!   (the pinned `chathist_<id>` grant); the consumer's create subject for `Consume` with
//!   `create`, its `CONSUMER.INFO` subject for a bind; its `$JS.ACK` subject for settles. Reply
//!   inboxes (`_INBOX_…`) are not checked: the machines never name them.
//!
//! # Request / reply
//!
//! A request with no deliverable core subscriber on its subject fails with
//! [`Failure::NoResponders`]. Otherwise every subscriber gets the message with the request's reply
//! subject, and the first publish to that reply subject completes the request with
//! [`Reply::Response`]. No answer within the timeout completes it [`Outcome::Unknown`] (the
//! request may have been processed). A requester not allowed to subscribe to its reply subject
//! never sees the answer (it times out, as with a real server). A request is never stored by a
//! stream that captures its subject (a real server would store it and answer with a stream ack;
//! the machines never request on stream subjects).
//!
//! # KV watches
//!
//! A watch delivers the latest entry of every matching key first (delete and purge markers
//! included, as async-nats' `last_per_subject` watcher does), then its `Done`, then every later
//! write, marker and purge of a matching key, in revision order on the client's ordered lane.
//! Bucket TTL expiry is silent (the specs set no limit markers, nats-notes §6).
//!
//! # Durable feeds
//!
//! `Consume` binds a feed to a consumer; [`Net::pump`] hands out what the consumer has while the
//! feed holds fewer than `max_in_flight` unsettled sequences (ack-none feeds are not windowed).
//! Several feeds on one consumer share it round-robin. Every delivery gets a fresh
//! [`DeliveryId`]; a settle names the stream sequence, so it is valid across reconnects, after a
//! redelivery, and twice (a second ack is a no-op). A sequence leaves its feed's window when it is
//! settled or redelivered. Deliveries of an ack-none consumer cannot be settled (`NotFound`).
//! An ephemeral consumer (`name`, not `durable_name`) with no feed bound for its
//! `inactive_threshold` is deleted by the server; a deleted consumer ends its feeds with
//! [`Inbound::ConsumerEnded`].
//!
//! # Connection loss
//!
//! [`Net::lose_connection`]: the host first executes the in-flight commands that had already
//! reached the server (chosen by the seed), then every subscription, feed, watch and pending
//! request of the client is dropped server-side, the connection epoch moves on (inputs of the old
//! connection still travelling are dropped on arrival), and the client gets [`Connection::Lost`]
//! followed by an [`Outcome::Unknown`] completion for every command it has not seen answered.
//! Consumers keep their pending deliveries (they are redelivered after `ack_wait`).
//! [`Net::restore_connection`] delivers [`Connection::Restored`].

use crate::broker::{Broker, Publish, kv_stream};
use bytes::Bytes;
use cotal_core::acl::{pattern_covers, patterns_cover, subject_matches};
use cotal_core::io::{
    Command, Completion, Connection, ConsumerState, Header, Inbound, Input, KvCondition,
    KvOperation, Reply, Response, SubId,
};
use cotal_core::ledger::DeliveryId;
use cotal_core::op::{Failure, OpId, Outcome};
use cotal_core::time::{Instant, Now};
use cotal_core::wire::config::{AckPolicy, ConsumerSpec, Durability};
use cotal_core::wire::json;
use cotal_core::wire::keys::KvBucket;
use cotal_core::wire::permissions::Permissions;
use cotal_core::wire::records::DeliveryLease;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// One client (one connection, one user) of the simulated server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u32);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// What kind of input an [`Outgoing`] is, for the fault injector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OutKind {
    /// Produced on the client itself (local completions, connection changes).
    Local,
    /// A server answer to a command.
    Reply,
    /// A core message (may be dropped by the core-drop fault).
    CoreMessage,
    /// A subscription refusal.
    Refusal,
    /// A durable consumer delivery (may be delayed by the slow-consumer fault).
    Delivery,
    /// A KV watch change.
    KvChange,
}

/// An input travelling to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// The receiving client.
    pub client: ClientId,
    /// The connection epoch it belongs to; dropped on arrival if the client reconnected since.
    pub epoch: u64,
    /// What kind of input.
    pub kind: OutKind,
    /// The input.
    pub input: Input,
}

/// Faults the host decided for one execution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecFaults {
    /// Before a conditional KV write, another writer rewrites the key's current value (a real,
    /// visible write), so the condition fails as in a race.
    pub kv_conflict: bool,
    /// The effect happens but the answer is lost: the completion is [`Outcome::Unknown`].
    pub ambiguous: bool,
}

#[derive(Clone, Debug)]
struct ClientState {
    name: String,
    permissions: Permissions,
    connected: bool,
    epoch: u64,
    open_feeds: BTreeSet<SubId>,
    inflight: BTreeSet<OpId>,
}

#[derive(Clone, Debug)]
struct Feed {
    stream: String,
    consumer: String,
    max_in_flight: u32,
    acks: bool,
    unsettled: BTreeSet<u64>,
}

#[derive(Clone, Debug)]
struct Watch {
    bucket: String,
    filter: String,
}

#[derive(Clone, Debug)]
struct PendingRequest {
    requester: ClientId,
    op: OpId,
    reply: String,
    deadline: Instant,
    can_receive: bool,
}

#[derive(Clone, Debug)]
struct DeliveryRecord {
    stream: String,
    consumer: String,
    seq: u64,
}

/// A membership-record write a client made, attributed (the oracle's ground truth for I30/G23).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberWrite {
    /// When it landed.
    pub at: Instant,
    /// The writing client.
    pub client: ClientId,
    /// The writing client's name (a daemon's client is named after its daemon id).
    pub writer: String,
    /// The members bucket.
    pub bucket: String,
    /// The member key.
    pub key: String,
    /// The revision it was stored at.
    pub revision: u64,
    /// The holders of every live `lease.*` key of the space's delivery bucket at that moment.
    pub lease_holders: Vec<String>,
}

/// The server's connection layer around a [`Broker`]. See the module docs.
#[derive(Clone, Debug, Default)]
pub struct Net {
    member_writes: Vec<MemberWrite>,
    broker: Broker,
    clients: Vec<ClientState>,
    core_subs: BTreeMap<(ClientId, SubId), String>,
    feeds: BTreeMap<(ClientId, SubId), Feed>,
    watches: BTreeMap<(ClientId, SubId), Watch>,
    requests: BTreeMap<u64, PendingRequest>,
    next_request: u64,
    deliveries: BTreeMap<DeliveryId, DeliveryRecord>,
    next_delivery: u64,
    /// Ephemeral consumers with no feed bound, since when (removed after `inactive_threshold`).
    idle: BTreeMap<(String, String), Instant>,
    out: VecDeque<Outgoing>,
}

fn may_publish(p: &Permissions, subject: &str) -> bool {
    (p.publish_allow.is_empty() || p.publish_allow.iter().any(|a| subject_matches(a, subject)))
        && !p.publish_deny.iter().any(|d| subject_matches(d, subject))
}

fn may_subscribe(p: &Permissions, pattern: &str) -> bool {
    let allow: Vec<&str> = p.subscribe_allow.iter().map(String::as_str).collect();
    (allow.is_empty() || patterns_cover(&allow, pattern))
        && !p.subscribe_deny.iter().any(|d| pattern_covers(d, pattern))
}

fn may_receive(p: &Permissions, subject: &str) -> bool {
    !p.subscribe_deny.iter().any(|d| subject_matches(d, subject))
}

fn publish_violation(subject: &str) -> Failure {
    Failure::PermissionDenied {
        detail: format!("Permissions Violation for Publish to \"{subject}\""),
    }
}

/// The `$JS.ACK` subject of a delivery, as the server would name it.
fn ack_subject(stream: &str, consumer: &str, seq: u64) -> String {
    format!("$JS.ACK.{stream}.{consumer}.1.{seq}.{seq}.0.0")
}

impl Net {
    /// A server around `broker`, with no clients.
    pub fn new(broker: Broker) -> Self {
        Net {
            broker,
            ..Net::default()
        }
    }

    /// Every membership-record write (put or delete into a `cotal_members_<space>` bucket) a
    /// client made, in the order they landed, with the lease holders of that moment. Writes the
    /// server makes itself (the KV-conflict fault's rival write, operator puts) are not listed.
    pub fn member_writes(&self) -> &[MemberWrite] {
        &self.member_writes
    }

    /// The broker (for setup, inspection and the oracle).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// The broker, mutable (for setup and out-of-band effects).
    pub fn broker_mut(&mut self) -> &mut Broker {
        &mut self.broker
    }

    /// Adds a client with this user's permissions ([`Permissions::default`] allows everything).
    /// It starts disconnected; [`Net::restore_connection`] connects it.
    pub fn add_client(&mut self, name: impl Into<String>, permissions: Permissions) -> ClientId {
        let id = ClientId(u32::try_from(self.clients.len()).expect("fewer than 2^32 clients"));
        self.clients.push(ClientState {
            name: name.into(),
            permissions,
            connected: false,
            epoch: 0,
            open_feeds: BTreeSet::new(),
            inflight: BTreeSet::new(),
        });
        id
    }

    /// The client's name.
    pub fn client_name(&self, client: ClientId) -> &str {
        self.client(client).map_or("?", |c| c.name.as_str())
    }

    /// All clients.
    pub fn clients(&self) -> impl Iterator<Item = ClientId> + '_ {
        (0..self.clients.len()).map(|i| ClientId(i as u32))
    }

    /// True while the client is connected.
    pub fn is_connected(&self, client: ClientId) -> bool {
        self.client(client).is_some_and(|c| c.connected)
    }

    /// The client's connection epoch (moves on at every loss).
    pub fn epoch(&self, client: ClientId) -> u64 {
        self.client(client).map_or(0, |c| c.epoch)
    }

    /// Commands of this client not yet seen answered.
    pub fn inflight(&self, client: ClientId) -> impl Iterator<Item = OpId> + '_ {
        self.client(client)
            .into_iter()
            .flat_map(|c| c.inflight.iter().copied())
    }

    fn client(&self, client: ClientId) -> Option<&ClientState> {
        self.clients.get(client.0 as usize)
    }

    fn client_mut(&mut self, client: ClientId) -> Option<&mut ClientState> {
        self.clients.get_mut(client.0 as usize)
    }

    /// The next input ready to travel, in production order.
    pub fn poll_outgoing(&mut self) -> Option<Outgoing> {
        self.out.pop_front()
    }

    fn emit(&mut self, client: ClientId, kind: OutKind, input: Input) {
        let epoch = self.epoch(client);
        self.out.push_back(Outgoing {
            client,
            epoch,
            kind,
            input,
        });
    }

    fn complete(&mut self, client: ClientId, op: OpId, outcome: Outcome<Reply>) {
        self.emit(
            client,
            OutKind::Reply,
            Input::Completed(Completion { op, outcome }),
        );
    }

    // ----- client side ----------------------------------------------------------------------

    /// A machine emitted `cmd`: returns the command to carry to the server with the connection
    /// epoch, or `None` when it was answered (or dropped) locally.
    pub fn client_send(&mut self, client: ClientId, cmd: Command) -> Option<(u64, Command)> {
        let state = self.client_mut(client)?;
        if let Some(op) = cmd.op() {
            state.inflight.insert(op);
        }
        match &cmd {
            Command::Subscribe { sub, .. }
            | Command::Consume { sub, .. }
            | Command::KvWatch { sub, .. }
                if state.connected =>
            {
                state.open_feeds.insert(*sub);
            }
            Command::Unsubscribe { sub }
            | Command::StopConsume { sub }
            | Command::KvUnwatch { sub } => {
                state.open_feeds.remove(sub);
            }
            _ => {}
        }
        if !state.connected {
            if let Some(op) = cmd.op() {
                self.emit(
                    client,
                    OutKind::Local,
                    Input::Completed(Completion::failed(
                        op,
                        Failure::Other {
                            description: "not connected: the command was never sent".into(),
                        },
                    )),
                );
            }
            return None;
        }
        if let Command::Subscribe { op, .. } = &cmd {
            let op = *op;
            self.emit(
                client,
                OutKind::Local,
                Input::Completed(Completion::success(op, Reply::Done)),
            );
        }
        let epoch = self.epoch(client);
        Some((epoch, cmd))
    }

    /// An input reached the client: `false` when it must be dropped (an older connection's, or a
    /// message on a feed the client closed). Keeps the client-side bookkeeping.
    pub fn accept(&mut self, out: &Outgoing) -> bool {
        let Some(state) = self.client_mut(out.client) else {
            return false;
        };
        if out.epoch != state.epoch {
            return false;
        }
        match &out.input {
            Input::Completed(c) => state.inflight.remove(&c.op),
            Input::Inbound(Inbound::Refused { sub, .. }) => state.open_feeds.remove(sub),
            Input::Inbound(i) => state.open_feeds.contains(&i.sub()),
            Input::Connection(_) => true,
            // `Input` is non-exhaustive: deliver what this model does not know.
            _ => true,
        }
    }

    // ----- operator actions -------------------------------------------------------------------

    /// Re-issues a client's credential with new permissions, as an operator's config reload does:
    /// every core subscription the new permissions no longer allow is removed server-side and
    /// refused asynchronously ([`Inbound::Refused`], nats-server re-checks existing subscriptions
    /// on reload). Later commands are checked against the new permissions.
    pub fn set_permissions(&mut self, client: ClientId, permissions: Permissions) {
        let Some(state) = self.client_mut(client) else {
            return;
        };
        state.permissions = permissions.clone();
        let revoked: Vec<(SubId, String)> = self
            .core_subs
            .iter()
            .filter(|((c, _), subject)| *c == client && !may_subscribe(&permissions, subject))
            .map(|((_, sub), subject)| (*sub, subject.clone()))
            .collect();
        for (sub, subject) in revoked {
            self.core_subs.remove(&(client, sub));
            let detail = format!("Permissions Violation for Subscription to \"{subject}\"");
            self.emit(
                client,
                OutKind::Refusal,
                Input::Inbound(Inbound::Refused { sub, detail }),
            );
        }
    }

    /// The client's core subscriptions held by the server: `(sub, subject pattern)`.
    pub fn core_subscriptions(&self, client: ClientId) -> Vec<(SubId, String)> {
        self.core_subs
            .iter()
            .filter(|((c, _), _)| *c == client)
            .map(|((_, sub), subject)| (*sub, subject.clone()))
            .collect()
    }

    /// A KV put by an operator (the provisioner), outside any client: stored, and every watch of
    /// the key is told. Returns the revision.
    ///
    /// # Errors
    ///
    /// The broker's failure (unknown bucket, invalid key).
    pub fn operator_kv_put(
        &mut self,
        bucket: &str,
        key: &str,
        value: Bytes,
    ) -> Result<u64, Failure> {
        let stored = self.broker.kv_put(bucket, key, value, KvCondition::Any)?;
        let revision = stored.seq;
        let stream = kv_stream(bucket);
        self.notify_watches(&stream, Some(&stored));
        Ok(revision)
    }

    // ----- connection -----------------------------------------------------------------------

    /// Drops the client's connection (see the module docs). The host has already executed the
    /// in-flight commands that reached the server.
    pub fn lose_connection(&mut self, client: ClientId) {
        let Some(state) = self.client_mut(client) else {
            return;
        };
        if !state.connected {
            return;
        }
        state.connected = false;
        state.epoch += 1;
        state.open_feeds.clear();
        // They stay in flight until the Unknown completions below reach the client.
        let unknown: Vec<OpId> = state.inflight.iter().copied().collect();
        self.core_subs.retain(|(c, _), _| *c != client);
        let unbound: Vec<(ClientId, SubId)> = self
            .feeds
            .keys()
            .filter(|(c, _)| *c == client)
            .copied()
            .collect();
        for key in unbound {
            self.unbind(key);
        }
        self.watches.retain(|(c, _), _| *c != client);
        self.requests.retain(|_, r| r.requester != client);
        self.emit(client, OutKind::Local, Input::Connection(Connection::Lost));
        for op in unknown {
            self.emit(
                client,
                OutKind::Local,
                Input::Completed(Completion::unknown(op)),
            );
        }
    }

    /// (Re)connects the client: it gets [`Connection::Restored`].
    pub fn restore_connection(&mut self, client: ClientId) {
        let Some(state) = self.client_mut(client) else {
            return;
        };
        if state.connected {
            return;
        }
        state.connected = true;
        self.emit(
            client,
            OutKind::Local,
            Input::Connection(Connection::Restored),
        );
    }

    // ----- time -----------------------------------------------------------------------------

    /// The next instant the server has something to do on its own: a request timeout, or a
    /// redelivery due on a consumer that a feed with room is bound to.
    pub fn next_wake(&self) -> Option<Instant> {
        let requests = self.requests.values().map(|r| r.deadline);
        let redeliveries = self
            .feeds
            .values()
            .filter(|f| !f.acks || (f.unsettled.len() as u64) < u64::from(f.max_in_flight))
            .filter_map(|f| self.broker.consumer_next_due(&f.stream, &f.consumer));
        let idle = self.idle.iter().filter_map(|((stream, name), since)| {
            let threshold = self
                .broker
                .consumer_spec(stream, name)?
                .inactive_threshold?;
            Some(*since + threshold)
        });
        requests.chain(redeliveries).chain(idle).min()
    }

    /// Lets time pass on the server: expiry, request timeouts, due redeliveries.
    pub fn handle_wake(&mut self, now: Now) {
        self.broker.advance(now);
        let expired: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.deadline <= now.at)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            if let Some(r) = self.requests.remove(&key) {
                self.complete(r.requester, r.op, Outcome::Unknown);
            }
        }
        let inactive: Vec<(String, String)> = self
            .idle
            .iter()
            .filter(|((stream, name), since)| {
                self.broker
                    .consumer_spec(stream, name)
                    .and_then(|c| c.inactive_threshold)
                    .is_none_or(|t| **since + t <= now.at)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for (stream, name) in inactive {
            self.idle.remove(&(stream.clone(), name.clone()));
            self.delete_consumer(&stream, &name);
        }
        self.pump();
    }

    /// Deletes a consumer (`CONSUMER.DELETE`, or the server removing an inactive ephemeral):
    /// every feed bound to it ends with [`Inbound::ConsumerEnded`]. False if it did not exist.
    pub fn delete_consumer(&mut self, stream: &str, name: &str) -> bool {
        if self.broker.delete_consumer(stream, name).is_err() {
            return false;
        }
        let bound: Vec<(ClientId, SubId)> = self
            .feeds
            .iter()
            .filter(|(_, f)| f.stream == stream && f.consumer == name)
            .map(|(k, _)| *k)
            .collect();
        for (client, sub) in bound {
            self.feeds.remove(&(client, sub));
            self.emit(
                client,
                OutKind::Reply,
                Input::Inbound(Inbound::ConsumerEnded {
                    sub,
                    detail: format!("consumer {stream} > {name} deleted"),
                }),
            );
        }
        self.idle.remove(&(stream.to_owned(), name.to_owned()));
        true
    }

    /// Removes a feed; an ephemeral consumer left with no feed starts its inactivity clock.
    fn unbind(&mut self, key: (ClientId, SubId)) {
        let Some(feed) = self.feeds.remove(&key) else {
            return;
        };
        let still_bound = self
            .feeds
            .values()
            .any(|f| f.stream == feed.stream && f.consumer == feed.consumer);
        let ephemeral = self
            .broker
            .consumer_spec(&feed.stream, &feed.consumer)
            .is_some_and(|c| c.durability == Durability::Ephemeral);
        if !still_bound && ephemeral {
            let now = self.broker.now().at;
            self.idle.insert((feed.stream, feed.consumer), now);
        }
    }

    // ----- server side ----------------------------------------------------------------------

    /// Executes one command of `client` that reached the server on connection `epoch`.
    pub fn execute(
        &mut self,
        now: Now,
        client: ClientId,
        epoch: u64,
        cmd: Command,
        faults: ExecFaults,
    ) {
        self.broker.advance(now);
        if self.epoch(client) != epoch || !self.is_connected(client) {
            return;
        }
        let op = cmd.op();
        let first_new = self.out.len();
        self.run(now, client, cmd, faults);
        if faults.ambiguous
            && let Some(op) = op
        {
            for o in self.out.iter_mut().skip(first_new) {
                if o.client == client
                    && let Input::Completed(c) = &mut o.input
                    && c.op == op
                {
                    c.outcome = Outcome::Unknown;
                }
            }
        }
        self.pump();
    }

    fn permissions(&self, client: ClientId) -> Permissions {
        self.client(client)
            .map(|c| c.permissions.clone())
            .unwrap_or_default()
    }

    fn run(&mut self, now: Now, client: ClientId, cmd: Command, faults: ExecFaults) {
        let perms = self.permissions(client);
        match cmd {
            Command::Subscribe { sub, subject, .. } => {
                if may_subscribe(&perms, &subject) {
                    self.core_subs.insert((client, sub), subject);
                } else {
                    let detail = format!("Permissions Violation for Subscription to \"{subject}\"");
                    self.emit(
                        client,
                        OutKind::Refusal,
                        Input::Inbound(Inbound::Refused { sub, detail }),
                    );
                }
            }
            Command::Unsubscribe { sub } => {
                self.core_subs.remove(&(client, sub));
            }
            Command::Barrier { op } => self.complete(client, op, Outcome::Success(Reply::Done)),
            Command::Publish {
                subject,
                headers,
                payload,
            } => {
                if may_publish(&perms, &subject) {
                    self.publish_core(&subject, None, &headers, &payload);
                    let publish = Publish {
                        subject,
                        msg_id: None,
                        headers,
                        payload,
                        expected_last_subject_seq: None,
                    };
                    if let Ok(p) = self.broker.publish(publish) {
                        self.notify_watches(&p.ack.stream, p.stored.as_ref());
                    }
                }
            }
            Command::Request {
                op,
                subject,
                reply,
                payload,
                timeout,
            } => {
                if !may_publish(&perms, &subject) {
                    self.complete(client, op, Outcome::Failed(publish_violation(&subject)));
                    return;
                }
                let delivered = self.publish_core(&subject, Some(&reply), &[], &payload);
                if delivered == 0 {
                    self.complete(client, op, Outcome::Failed(Failure::NoResponders));
                    return;
                }
                self.next_request += 1;
                let can_receive = may_subscribe(&perms, &reply);
                self.requests.insert(
                    self.next_request,
                    PendingRequest {
                        requester: client,
                        op,
                        reply,
                        deadline: now.at + timeout,
                        can_receive,
                    },
                );
            }
            Command::JsPublish {
                op,
                subject,
                msg_id,
                headers,
                payload,
            } => {
                if !may_publish(&perms, &subject) {
                    self.complete(client, op, Outcome::Failed(publish_violation(&subject)));
                    return;
                }
                self.publish_core(&subject, None, &headers, &payload);
                let publish = Publish {
                    subject,
                    msg_id,
                    headers,
                    payload,
                    expected_last_subject_seq: None,
                };
                match self.broker.publish(publish) {
                    Ok(p) => {
                        self.notify_watches(&p.ack.stream, p.stored.as_ref());
                        self.complete(client, op, Outcome::Success(Reply::PubAck(p.ack)));
                    }
                    Err(f) => self.complete(client, op, Outcome::Failed(f)),
                }
            }
            Command::StreamInfo { op, stream } => {
                let api = format!("$JS.API.STREAM.INFO.{stream}");
                let outcome = if may_publish(&perms, &api) {
                    to_outcome(self.broker.stream_state(&stream).map(Reply::StreamState))
                } else {
                    Outcome::Failed(publish_violation(&api))
                };
                self.complete(client, op, outcome);
            }
            Command::ConsumerInfo {
                op,
                stream,
                consumer,
            } => {
                let api = format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}");
                let outcome = if may_publish(&perms, &api) {
                    to_outcome(self.broker.consumer_info(&stream, &consumer).map(|i| {
                        Reply::ConsumerState(ConsumerState {
                            delivered_stream_seq: i.delivered_stream_seq,
                            num_pending: i.num_pending,
                            num_ack_pending: i.num_ack_pending,
                            ack_floor_stream_seq: i.ack_floor,
                        })
                    }))
                } else {
                    Outcome::Failed(publish_violation(&api))
                };
                self.complete(client, op, outcome);
            }
            Command::DeleteStreamMessage { op, stream, seq } => {
                let api = format!("$JS.API.STREAM.MSG.DELETE.{stream}");
                let outcome = if may_publish(&perms, &api) {
                    to_outcome(
                        self.broker
                            .delete_message(&stream, seq)
                            .map(|()| Reply::Done),
                    )
                } else {
                    Outcome::Failed(publish_violation(&api))
                };
                self.complete(client, op, outcome);
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
                let outcome = if may_read_stream(&perms, &stream, &filter, reader.as_deref()) {
                    to_outcome(
                        self.broker
                            .read(&stream, &filter, start, last_seq, max)
                            .map(Reply::Stored),
                    )
                } else {
                    Outcome::Failed(publish_violation(&format!(
                        "$JS.API.STREAM.MSG.GET.{stream}"
                    )))
                };
                self.complete(client, op, outcome);
            }
            Command::Consume {
                op,
                sub,
                consumer,
                create,
                max_in_flight,
            } => {
                let outcome = self.consume(client, sub, consumer, create, max_in_flight, &perms);
                self.complete(client, op, outcome);
            }
            Command::StopConsume { sub } => self.unbind((client, sub)),
            Command::Settle {
                op,
                delivery,
                kind,
                confirm,
            } => {
                let outcome = match self.deliveries.get(&delivery).cloned() {
                    None => Outcome::Failed(Failure::NotFound),
                    Some(d) => {
                        let ack = ack_subject(&d.stream, &d.consumer, d.seq);
                        if !may_publish(&perms, &ack) {
                            Outcome::Failed(publish_violation(&ack))
                        } else {
                            match self.broker.settle(&d.stream, &d.consumer, d.seq, kind) {
                                Ok(()) => {
                                    for f in self.feeds.values_mut() {
                                        if f.stream == d.stream && f.consumer == d.consumer {
                                            f.unsettled.remove(&d.seq);
                                        }
                                    }
                                    Outcome::Success(Reply::Done)
                                }
                                Err(f) => Outcome::Failed(f),
                            }
                        }
                    }
                };
                // A plain ack: the server answers nothing, applied or not; the client only knows
                // it sent it.
                let outcome = if confirm {
                    outcome
                } else {
                    Outcome::Success(Reply::Sent)
                };
                self.complete(client, op, outcome);
            }
            Command::KvGet { op, bucket, key } | Command::KvGetDirect { op, bucket, key } => {
                let stream = kv_stream(&bucket);
                let msg_get = format!("$JS.API.STREAM.MSG.GET.{stream}");
                let direct = format!("$JS.API.DIRECT.GET.{stream}.$KV.{bucket}.{key}");
                let outcome = if may_publish(&perms, &msg_get) || may_publish(&perms, &direct) {
                    to_outcome(self.broker.kv_get(&bucket, &key).map(Reply::Kv))
                } else {
                    Outcome::Failed(publish_violation(&msg_get))
                };
                self.complete(client, op, outcome);
            }
            Command::KvPut {
                op,
                bucket,
                key,
                value,
                condition,
            } => {
                let subject = format!("$KV.{bucket}.{key}");
                if !may_publish(&perms, &subject) {
                    self.complete(client, op, Outcome::Failed(publish_violation(&subject)));
                    return;
                }
                if faults.kv_conflict && condition != KvCondition::Any {
                    self.phantom_rewrite(&bucket, &key);
                }
                let result = self.broker.kv_put(&bucket, &key, value, condition);
                self.kv_written(client, op, &bucket, &key, result);
            }
            Command::KvDelete {
                op,
                bucket,
                key,
                expected_revision,
            } => {
                let subject = format!("$KV.{bucket}.{key}");
                if !may_publish(&perms, &subject) {
                    self.complete(client, op, Outcome::Failed(publish_violation(&subject)));
                    return;
                }
                if faults.kv_conflict && expected_revision.is_some() {
                    self.phantom_rewrite(&bucket, &key);
                }
                let result = self.broker.kv_delete(&bucket, &key, expected_revision);
                self.kv_written(client, op, &bucket, &key, result);
            }
            Command::KvWatch {
                op,
                sub,
                bucket,
                filter,
            } => {
                let api = format!(
                    "$JS.API.CONSUMER.CREATE.{}.watch.$KV.{bucket}.{filter}",
                    kv_stream(&bucket)
                );
                if !may_publish(&perms, &api) {
                    self.complete(client, op, Outcome::Failed(publish_violation(&api)));
                    return;
                }
                match self.broker.kv_current(&bucket, &filter) {
                    Ok(entries) => {
                        for entry in entries {
                            self.emit(
                                client,
                                OutKind::KvChange,
                                Input::Inbound(Inbound::KvChange { sub, entry }),
                            );
                        }
                        self.watches.insert((client, sub), Watch { bucket, filter });
                        self.complete(client, op, Outcome::Success(Reply::Done));
                    }
                    Err(f) => self.complete(client, op, Outcome::Failed(f)),
                }
            }
            Command::KvUnwatch { sub } => {
                self.watches.remove(&(client, sub));
            }
            other => {
                if let Some(op) = other.op() {
                    let description = format!("the simulator does not model {other:?}");
                    self.complete(client, op, Outcome::Failed(Failure::Other { description }));
                }
            }
        }
    }

    fn consume(
        &mut self,
        client: ClientId,
        sub: SubId,
        spec: ConsumerSpec,
        create: bool,
        max_in_flight: u32,
        perms: &Permissions,
    ) -> Outcome<Reply> {
        let api = if create {
            spec.create_request().subject
        } else {
            spec.info_subject()
        };
        if !may_publish(perms, &api) {
            return Outcome::Failed(publish_violation(&api));
        }
        if create {
            if let Err(f) = self.broker.add_consumer(spec.clone()) {
                return Outcome::Failed(f);
            }
        } else if self
            .broker
            .consumer_spec(&spec.stream, &spec.name)
            .is_none()
        {
            return Outcome::Failed(Failure::NotFound);
        }
        let acks = self
            .broker
            .consumer_spec(&spec.stream, &spec.name)
            .is_some_and(|s| s.ack_policy != AckPolicy::None);
        self.idle.remove(&(spec.stream.clone(), spec.name.clone()));
        self.unbind((client, sub));
        let (delivered_stream_seq, ack_floor_stream_seq, num_ack_pending) = self
            .broker
            .consumer_info(&spec.stream, &spec.name)
            .map_or((0, 0, 0), |i| {
                (i.delivered_stream_seq, i.ack_floor, i.num_ack_pending)
            });
        self.feeds.insert(
            (client, sub),
            Feed {
                stream: spec.stream,
                consumer: spec.name,
                max_in_flight,
                acks,
                unsettled: BTreeSet::new(),
            },
        );
        Outcome::Success(Reply::ConsumerBound {
            delivered_stream_seq,
            ack_floor_stream_seq,
            num_ack_pending,
        })
    }

    /// Another writer rewrites the key's current value: its revision moves on, nothing else.
    fn phantom_rewrite(&mut self, bucket: &str, key: &str) {
        if let Ok(Some(current)) = self.broker.kv_get(bucket, key)
            && let Ok(stored) = self
                .broker
                .kv_put(bucket, key, current.value, KvCondition::Any)
        {
            let stream = kv_stream(bucket);
            self.notify_watches(&stream, Some(&stored));
        }
    }

    fn kv_written(
        &mut self,
        client: ClientId,
        op: OpId,
        bucket: &str,
        key: &str,
        result: Result<cotal_core::io::StoredMessage, Failure>,
    ) {
        match result {
            Ok(stored) => {
                let revision = stored.seq;
                self.attribute(client, bucket, key, revision);
                self.notify_watches(&kv_stream(bucket), Some(&stored));
                self.complete(client, op, Outcome::Success(Reply::KvWritten { revision }));
            }
            Err(f) => self.complete(client, op, Outcome::Failed(f)),
        }
    }

    /// Notes a membership-record write with the lease holders of this moment.
    fn attribute(&mut self, client: ClientId, bucket: &str, key: &str, revision: u64) {
        let members = KvBucket::Members.prefix();
        let Some(space) = bucket.strip_prefix(members) else {
            return;
        };
        let delivery = format!("{}{space}", KvBucket::Delivery.prefix());
        let lease_holders = self
            .broker
            .kv_current(&delivery, "lease.*")
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.operation == KvOperation::Put)
            .filter_map(|e| json::decode::<DeliveryLease>(&e.value).ok())
            .map(|l| l.holder)
            .collect();
        self.member_writes.push(MemberWrite {
            at: self.broker.now().at,
            client,
            writer: self.client_name(client).to_owned(),
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            revision,
            lease_holders,
        });
    }

    /// Core fan-out: completes a request waiting on `subject` as its reply subject, and delivers
    /// to every matching core subscription. Returns how many subscriptions got it.
    fn publish_core(
        &mut self,
        subject: &str,
        reply: Option<&str>,
        headers: &[Header],
        payload: &Bytes,
    ) -> usize {
        // A requester that may not subscribe to its reply subject never sees the answer: its
        // request stays pending until it times out.
        let answered = self
            .requests
            .iter()
            .find(|(_, r)| r.reply == subject && r.can_receive)
            .map(|(k, _)| *k);
        if let Some(key) = answered
            && let Some(r) = self.requests.remove(&key)
        {
            let response = Response {
                headers: headers.to_vec(),
                payload: payload.clone(),
            };
            self.complete(
                r.requester,
                r.op,
                Outcome::Success(Reply::Response(response)),
            );
        }
        let targets: Vec<(ClientId, SubId)> = self
            .core_subs
            .iter()
            .filter(|(_, pattern)| subject_matches(pattern, subject))
            .map(|(k, _)| *k)
            .filter(|(c, _)| {
                self.client(*c)
                    .is_some_and(|s| s.connected && may_receive(&s.permissions, subject))
            })
            .collect();
        for (client, sub) in &targets {
            self.emit(
                *client,
                OutKind::CoreMessage,
                Input::Inbound(Inbound::Message {
                    sub: *sub,
                    subject: subject.to_owned(),
                    reply: reply.map(str::to_owned),
                    headers: headers.to_vec(),
                    payload: payload.clone(),
                }),
            );
        }
        targets.len()
    }

    fn notify_watches(&mut self, stream: &str, stored: Option<&cotal_core::io::StoredMessage>) {
        let Some(stored) = stored else { return };
        let Some(bucket) = self.broker.bucket_of_stream(stream).map(str::to_owned) else {
            return;
        };
        let Some(entry) = Broker::kv_entry_of(&bucket, stored) else {
            return;
        };
        let targets: Vec<(ClientId, SubId)> = self
            .watches
            .iter()
            .filter(|(_, w)| w.bucket == bucket && subject_matches(&w.filter, &entry.key))
            .map(|(k, _)| *k)
            .collect();
        for (client, sub) in targets {
            self.emit(
                client,
                OutKind::KvChange,
                Input::Inbound(Inbound::KvChange {
                    sub,
                    entry: entry.clone(),
                }),
            );
        }
    }

    /// Hands out what bound consumers have, round-robin over feeds, within each feed's window.
    pub fn pump(&mut self) {
        loop {
            let mut progressed = false;
            let keys: Vec<(ClientId, SubId)> = self.feeds.keys().copied().collect();
            for key in keys {
                let Some(feed) = self.feeds.get(&key) else {
                    continue;
                };
                if feed.acks && feed.unsettled.len() as u64 >= u64::from(feed.max_in_flight) {
                    continue;
                }
                let (stream, consumer) = (feed.stream.clone(), feed.consumer.clone());
                let Some(d) = self.broker.next_delivery(&stream, &consumer) else {
                    continue;
                };
                progressed = true;
                let seq = d.message.seq;
                // A redelivered sequence leaves whichever window held it.
                for f in self.feeds.values_mut() {
                    if f.stream == stream && f.consumer == consumer {
                        f.unsettled.remove(&seq);
                    }
                }
                let acks = if let Some(f) = self.feeds.get_mut(&key) {
                    if f.acks {
                        f.unsettled.insert(seq);
                    }
                    f.acks
                } else {
                    false
                };
                self.next_delivery += 1;
                let delivery = DeliveryId(self.next_delivery);
                if acks {
                    self.deliveries.insert(
                        delivery,
                        DeliveryRecord {
                            stream,
                            consumer,
                            seq,
                        },
                    );
                }
                self.emit(
                    key.0,
                    OutKind::Delivery,
                    Input::Inbound(Inbound::Delivery {
                        sub: key.1,
                        delivery,
                        stream_seq: seq,
                        delivery_count: d.delivery_count,
                        subject: d.message.subject,
                        headers: d.message.headers,
                        payload: d.message.payload,
                    }),
                );
            }
            if !progressed {
                break;
            }
        }
    }

    /// The stream sequence a delivery handle names, if it was issued.
    pub fn delivery_seq(&self, delivery: DeliveryId) -> Option<u64> {
        self.deliveries.get(&delivery).map(|d| d.seq)
    }
}

fn to_outcome(result: Result<Reply, Failure>) -> Outcome<Reply> {
    match result {
        Ok(r) => Outcome::Success(r),
        Err(f) => Outcome::Failed(f),
    }
}

/// A stream read is allowed by `STREAM.MSG.GET` or `DIRECT.GET` on the stream, or by a
/// `CONSUMER.CREATE` grant on the stream (under any consumer name it pins) whose filter covers
/// the read's filter.
fn may_read_stream(p: &Permissions, stream: &str, filter: &str, reader: Option<&str>) -> bool {
    if may_publish(p, &format!("$JS.API.STREAM.MSG.GET.{stream}"))
        || may_publish(p, &format!("$JS.API.DIRECT.GET.{stream}"))
    {
        return true;
    }
    if let Some(name) = reader {
        // A pinned reader name: exactly the create the real driver sends.
        return may_publish(
            p,
            &format!("$JS.API.CONSUMER.CREATE.{stream}.{name}.{filter}"),
        );
    }
    if p.publish_allow.is_empty() {
        return may_publish(
            p,
            &format!("$JS.API.CONSUMER.CREATE.{stream}.read.{filter}"),
        );
    }
    let prefix = format!("$JS.API.CONSUMER.CREATE.{stream}.");
    p.publish_allow.iter().any(|grant| {
        let Some(rest) = grant.strip_prefix(&prefix) else {
            return false;
        };
        let (name, covered) = match rest.split_once('.') {
            _ if rest == ">" => ("read", true),
            Some((name, grant_filter)) => (name, pattern_covers(grant_filter, filter)),
            None => return false,
        };
        let name = if name == "*" { "read" } else { name };
        let subject = format!("{prefix}{name}.{filter}");
        covered && !p.publish_deny.iter().any(|d| subject_matches(d, &subject))
    })
}
