//! A tiny in-test fake broker that answers the daemon's commands, and a world that drives the
//! machine by hand and writes a one-line-per-step transcript.
//!
//! Transcript format (one line per step):
//!
//! ```text
//! t=<ms> in   <what the test fed>            an input the test chose (a request, a delivery)
//! t=<ms> cmd  <command>                       a command the daemon issued
//! t=<ms> ans  <outcome>                       the fake broker's answer to the command above
//! t=<ms> hold <command>                       a command held back by the test
//! t=<ms> evt  <event>                         an event the daemon emitted
//! ```

use super::super::*;
use crate::delivery::lease::LeaseEvent;
use crate::io::{ConsumerState, KvEntry, PubAck, ReadStart, StoredMessage, StreamState};
use crate::time::UnixMillis;
use crate::wire::control::{ControlReply, DeliveryRequest};
use crate::wire::message::{CotalMessage, Part, Route, Sender};
use crate::wire::records::{AclRecord, MembershipRecord};
use crate::wire::shard::{Shard, ShardMap};
use crate::wire::token::Space;
use bytes::Bytes;
use std::collections::VecDeque;
use std::fmt::Write;

pub const BASE_WALL: u64 = 1_700_000_000_000;

pub fn space() -> Space {
    Space::new("main").unwrap()
}

pub fn id(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

pub fn ch(s: &str) -> ConcreteChannel {
    ConcreteChannel::new(s).unwrap()
}

pub fn shard0() -> Shard {
    ShardMap::SINGLE.shard(0).unwrap()
}

/// What the fake does with a command a rule matches.
#[derive(Clone, Debug)]
pub enum Effect {
    /// Answer with this outcome without executing the command.
    Answer(Outcome<Reply>),
    /// Execute the command, then answer Unknown (the write landed, the reply was lost).
    ExecuteThenUnknown,
    /// Keep the command unanswered until the test releases it.
    Hold,
}

/// A fault injector: the effect for a command no rule matched, if any.
pub type Chaos = Box<dyn FnMut(&Command) -> Option<Effect>>;

pub struct Rule {
    pub matches: Box<dyn Fn(&Command) -> bool>,
    pub effect: Effect,
    /// How many more commands it applies to (`u32::MAX`: always).
    pub times: u32,
}

#[derive(Default)]
pub struct Broker {
    pub kv: BTreeMap<String, BTreeMap<String, KvEntry>>,
    pub kv_seq: BTreeMap<String, u64>,
    pub chat: Vec<StoredMessage>,
    pub chat_last: u64,
    /// Forced first sequence of CHAT (simulates stream-level eviction).
    pub chat_first: Option<u64>,
    /// (seq, subject, msg-id, payload) of INBOX.
    pub inbox: Vec<(u64, String, String, Bytes)>,
    pub dlv: Vec<(u64, String, String, Bytes)>,
    pub inbox_ids: BTreeSet<String>,
    pub dlv_ids: BTreeSet<String>,
    /// DLV sequences deleted (`STREAM.MSG.DELETE`, the revocation sweep).
    pub dlv_deleted: BTreeSet<u64>,
    pub watches: BTreeMap<SubId, String>,
    pub consumers: BTreeMap<String, SubId>,
    pub control: Option<SubId>,
    pub replies: Vec<(String, Bytes)>,
    pub settled: Vec<(DeliveryId, AckKind)>,
    pub next_delivery: u64,
    /// The fan-out consumer's delivery pointer reported at bind (`None`: answer `Done`, as a
    /// driver that cannot tell).
    pub fanout_pointer: Option<u64>,
    /// The fan-out consumer's ack floor and unsettled count reported with the pointer (`None`:
    /// everything up to the pointer settled).
    pub fanout_unsettled: Option<(u64, u64)>,
    /// The reader consumer's pointer, ack floor and unsettled count reported at bind (`None`:
    /// answer `Done`, as a driver that cannot tell).
    pub reader_bound: Option<(u64, u64, u64)>,
    /// What a `CONSUMER.INFO` of the fan-out consumer reports (`None`: everything up to the
    /// CHAT frontier delivered and acked).
    pub fanout_state: Option<ConsumerState>,
    /// The lease bucket's TTL a `STREAM.INFO` reports, in ms (`None`: the reference's 30 s).
    pub lease_bucket_ttl_ms: Option<u64>,
    /// The reader consumer's unread total a `CONSUMER.INFO` reports; `None`: INBOX entries
    /// minus the reader deliveries acked or terminated.
    pub reader_unread: Option<u64>,
    /// What a `CONSUMER.INFO` of the reader consumer reports, when set (else `reader_unread`).
    pub reader_state: Option<ConsumerState>,
    /// Reader deliveries not yet acked or terminated.
    pub reader_open: BTreeSet<DeliveryId>,
    /// Reader deliveries acked or terminated.
    pub reader_done: u64,
    /// DLV copies each owner's agent acked (unread = stored for the owner minus these).
    pub dlv_acked: BTreeMap<String, u64>,
    /// Per stream: its consumer count and `max_consumers` as `STREAM.INFO` reports them
    /// (absent: 0 and −1).
    pub stream_consumers: BTreeMap<String, (u64, i64)>,
}

impl Broker {
    fn bump(&mut self, bucket: &str) -> u64 {
        let n = self.kv_seq.entry(bucket.to_owned()).or_insert(0);
        *n += 1;
        *n
    }

    /// Writes a KV entry directly (a provisioner, another daemon); returns the watch echo.
    pub fn kv_write(
        &mut self,
        bucket: &str,
        key: &str,
        op: KvOperation,
        value: Bytes,
    ) -> Vec<Input> {
        let revision = self.bump(bucket);
        let entry = KvEntry {
            key: key.to_owned(),
            revision,
            operation: op,
            value,
        };
        self.kv
            .entry(bucket.to_owned())
            .or_default()
            .insert(key.to_owned(), entry.clone());
        self.watches
            .iter()
            .filter(|(_, b)| b.as_str() == bucket)
            .map(|(sub, _)| {
                Input::Inbound(Inbound::KvChange {
                    sub: *sub,
                    entry: entry.clone(),
                })
            })
            .collect()
    }

    pub fn consumer(&self, prefix: &str) -> SubId {
        *self
            .consumers
            .iter()
            .find(|(n, _)| n.starts_with(prefix))
            .expect("consumer bound")
            .1
    }

    pub fn kv_value(&self, bucket: &str, key: &str) -> Option<&KvEntry> {
        self.kv
            .get(bucket)?
            .get(key)
            .filter(|e| e.operation == KvOperation::Put)
    }

    pub fn member(&self, channel: &str, owner: &str) -> Option<MembershipRecord> {
        let e = self.kv_value(
            &KvBucket::Members.name(&space()),
            &format!("{channel}/{owner}"),
        )?;
        MembershipRecord::from_kv(Some(&e.value))
    }

    /// Executes one command; returns the completion and the inputs that follow it.
    pub fn execute(&mut self, cmd: &Command) -> (Option<Completion>, Vec<Input>) {
        let mut after = Vec::new();
        let done = |op: OpId, r: Reply| Some(Completion::success(op, r));
        let c = match cmd {
            Command::KvGet { op, bucket, key } => {
                let e = self.kv_value(bucket, key).cloned();
                done(*op, Reply::Kv(e))
            }
            Command::KvPut {
                op,
                bucket,
                key,
                value,
                condition,
            } => {
                let cur = self.kv.get(bucket).and_then(|m| m.get(key)).cloned();
                let live = cur.as_ref().filter(|e| e.operation == KvOperation::Put);
                let refused = match condition {
                    KvCondition::Any => None,
                    KvCondition::CreateOnly => live.map(|_| Failure::AlreadyExists),
                    KvCondition::Revision(r) => match &cur {
                        Some(e) if e.revision == *r => None,
                        Some(e) => Some(Failure::WrongLastRevision {
                            current: Some(e.revision),
                        }),
                        None => Some(Failure::WrongLastRevision { current: None }),
                    },
                };
                match refused {
                    Some(f) => Some(Completion::failed(*op, f)),
                    None => {
                        after = self.kv_write(bucket, key, KvOperation::Put, value.clone());
                        let revision = self.kv_seq[bucket.as_str()];
                        done(*op, Reply::KvWritten { revision })
                    }
                }
            }
            Command::KvDelete {
                op,
                bucket,
                key,
                expected_revision,
            } => {
                let cur = self.kv.get(bucket).and_then(|m| m.get(key)).cloned();
                match (expected_revision, &cur) {
                    (Some(r), Some(e)) if e.revision != *r => Some(Completion::failed(
                        *op,
                        Failure::WrongLastRevision {
                            current: Some(e.revision),
                        },
                    )),
                    (Some(_), None) => Some(Completion::failed(*op, Failure::NotFound)),
                    _ => {
                        after = self.kv_write(bucket, key, KvOperation::Delete, Bytes::new());
                        let revision = self.kv_seq[bucket.as_str()];
                        done(*op, Reply::KvWritten { revision })
                    }
                }
            }
            Command::KvWatch {
                op, sub, bucket, ..
            } => {
                self.watches.insert(*sub, bucket.clone());
                let current: Vec<KvEntry> = self
                    .kv
                    .get(bucket)
                    .map(|m| m.values().cloned().collect())
                    .unwrap_or_default();
                let mut inputs: Vec<Input> = current
                    .into_iter()
                    .map(|entry| Input::Inbound(Inbound::KvChange { sub: *sub, entry }))
                    .collect();
                inputs.push(Input::Completed(Completion::success(*op, Reply::Done)));
                return (None, inputs);
            }
            Command::Subscribe { op, sub, .. } => {
                self.control = Some(*sub);
                done(*op, Reply::Done)
            }
            Command::Consume {
                op, sub, consumer, ..
            } => {
                self.consumers.insert(consumer.name.clone(), *sub);
                match self.fanout_pointer {
                    _ if consumer.name.starts_with("reader") && self.reader_bound.is_some() => {
                        let (p, floor, pending) = self.reader_bound.unwrap_or_default();
                        done(
                            *op,
                            Reply::ConsumerBound {
                                delivered_stream_seq: p,
                                ack_floor_stream_seq: floor,
                                num_ack_pending: pending,
                            },
                        )
                    }
                    Some(p) if consumer.name.starts_with("fanout") => done(
                        *op,
                        Reply::ConsumerBound {
                            delivered_stream_seq: p,
                            ack_floor_stream_seq: self.fanout_unsettled.map_or(p, |u| u.0),
                            num_ack_pending: self.fanout_unsettled.map_or(0, |u| u.1),
                        },
                    ),
                    _ => done(*op, Reply::Done),
                }
            }
            Command::ConsumerInfo { op, consumer, .. } if consumer.starts_with("fanout") => done(
                *op,
                Reply::ConsumerState(self.fanout_state.unwrap_or(ConsumerState {
                    delivered_stream_seq: self.chat_last,
                    num_pending: 0,
                    num_ack_pending: 0,
                    ack_floor_stream_seq: self.chat_last,
                })),
            ),
            Command::ConsumerInfo { op, consumer, .. }
                if consumer.starts_with("reader")
                    && let Some(state) = self.reader_state =>
            {
                done(*op, Reply::ConsumerState(state))
            }
            Command::ConsumerInfo { op, consumer, .. } => {
                let unread = match consumer.strip_prefix("dlv_") {
                    Some(owner) => {
                        let suffix = format!(".dlv.{owner}");
                        let stored = self.dlv.iter().filter(|e| e.1.ends_with(&suffix)).count();
                        (stored as u64)
                            .saturating_sub(self.dlv_acked.get(owner).copied().unwrap_or(0))
                    }
                    None => self.reader_unread.unwrap_or_else(|| {
                        (self.inbox.len() as u64).saturating_sub(self.reader_done)
                    }),
                };
                done(
                    *op,
                    Reply::ConsumerState(ConsumerState {
                        delivered_stream_seq: 0,
                        num_pending: unread,
                        num_ack_pending: 0,
                        ack_floor_stream_seq: 0,
                    }),
                )
            }
            Command::StreamInfo { op, stream } => done(
                *op,
                Reply::StreamState(StreamState {
                    first_seq: self
                        .chat_first
                        .unwrap_or_else(|| self.chat.first().map_or(self.chat_last + 1, |m| m.seq)),
                    last_seq: self.chat_last,
                    messages: self.chat.len() as u64,
                    consumers: self.stream_consumers.get(stream).map_or(0, |c| c.0),
                    max_consumers: self.stream_consumers.get(stream).map_or(-1, |c| c.1),
                    max_age_ms: if stream == "KV_cotal_delivery_main" {
                        self.lease_bucket_ttl_ms
                            .unwrap_or(crate::constants::LEASE_TTL.as_millis())
                    } else {
                        0
                    },
                }),
            ),
            Command::ReadStream {
                op,
                stream,
                filter,
                start,
                max,
                ..
            } if stream == "DLV_main" || stream == "INBOX_main" => {
                let ReadStart::Seq(from) = start else {
                    panic!("time starts are not modelled")
                };
                let none = BTreeSet::new();
                let (entries, deleted) = if stream == "DLV_main" {
                    (&self.dlv, &self.dlv_deleted)
                } else {
                    (&self.inbox, &none)
                };
                let stored: Vec<StoredMessage> = entries
                    .iter()
                    .filter(|e| e.0 >= *from && !deleted.contains(&e.0))
                    .filter(|e| crate::acl::subject_matches(filter, &e.1))
                    .take(*max as usize)
                    .map(|e| StoredMessage {
                        seq: e.0,
                        subject: e.1.clone(),
                        headers: Vec::new(),
                        payload: e.3.clone(),
                        stored_at: UnixMillis(1),
                    })
                    .collect();
                done(*op, Reply::Stored(stored))
            }
            Command::DeleteStreamMessage { op, seq, .. } => {
                if self.dlv.iter().any(|e| e.0 == *seq) && self.dlv_deleted.insert(*seq) {
                    done(*op, Reply::Done)
                } else {
                    Some(Completion::failed(*op, Failure::NotFound))
                }
            }
            Command::ReadStream {
                op,
                filter,
                start,
                last_seq,
                max,
                ..
            } => {
                let ReadStart::Seq(from) = start else {
                    panic!("time starts are not modelled")
                };
                let stored: Vec<StoredMessage> = self
                    .chat
                    .iter()
                    .filter(|m| m.seq >= *from && last_seq.is_none_or(|l| m.seq <= l))
                    .filter(|m| crate::acl::subject_matches(filter, &m.subject))
                    .take(*max as usize)
                    .cloned()
                    .collect();
                done(*op, Reply::Stored(stored))
            }
            Command::JsPublish {
                op,
                subject,
                msg_id,
                payload,
                ..
            } => {
                let id = msg_id.clone().unwrap_or_default();
                let (store, ids, stream) = if subject.contains(".dinbox.") {
                    (&mut self.inbox, &mut self.inbox_ids, "INBOX_main")
                } else {
                    (&mut self.dlv, &mut self.dlv_ids, "DLV_main")
                };
                let duplicate = !ids.insert(id.clone());
                let seq = if duplicate {
                    store.iter().find(|e| e.2 == id).map_or(0, |e| e.0)
                } else {
                    let seq = store.len() as u64 + 1;
                    store.push((seq, subject.clone(), id, payload.clone()));
                    seq
                };
                done(
                    *op,
                    Reply::PubAck(PubAck {
                        stream: stream.into(),
                        seq,
                        duplicate,
                    }),
                )
            }
            Command::Settle {
                op,
                delivery,
                kind,
                confirm,
            } => {
                self.settled.push((*delivery, *kind));
                if matches!(kind, AckKind::Ack | AckKind::Term) && self.reader_open.remove(delivery)
                {
                    self.reader_done += 1;
                }
                done(*op, if *confirm { Reply::Done } else { Reply::Sent })
            }
            Command::Publish {
                subject, payload, ..
            } => {
                self.replies.push((subject.clone(), payload.clone()));
                None
            }
            Command::KvUnwatch { sub } => {
                self.watches.remove(sub);
                None
            }
            Command::Unsubscribe { .. } | Command::StopConsume { .. } => None,
            other => panic!("the fake broker does not model {other:?}"),
        };
        (c, after)
    }
}

pub struct World {
    pub d: Delivery,
    pub b: Broker,
    pub t: u64,
    pub queue: VecDeque<Command>,
    pub held: Vec<Command>,
    pub rules: Vec<Rule>,
    pub events: Vec<DeliveryEvent>,
    pub log: String,
    /// Leave renewals out of the transcript.
    pub quiet_lease: bool,
    /// Chooses an effect for commands no rule matched (fault injection).
    pub chaos: Option<Chaos>,
    /// The INBOX sequences given to the reader so far.
    pub fed_to_reader: BTreeSet<u64>,
}

pub fn now_at(t: u64) -> Now {
    Now::new(Instant::from_millis(t), UnixMillis(BASE_WALL + t))
}

impl World {
    pub fn new() -> Self {
        World::with_config(DeliveryConfig::new(space(), shard0(), "D1"))
    }

    pub fn with_config(config: DeliveryConfig) -> Self {
        World {
            d: Delivery::new(config),
            b: Broker::default(),
            t: 0,
            queue: VecDeque::new(),
            held: Vec::new(),
            rules: Vec::new(),
            events: Vec::new(),
            log: String::new(),
            quiet_lease: true,
            chaos: None,
            fed_to_reader: BTreeSet::new(),
        }
    }

    /// A daemon that sends every copy the reference's two hops (dinbox, then the reader): for
    /// the tests of the reader's own path ([`DeliveryConfig::two_hop`]).
    pub fn two_hop() -> Self {
        let mut config = DeliveryConfig::new(space(), shard0(), "D1");
        config.two_hop = true;
        World::with_config(config)
    }

    pub fn now(&self) -> Now {
        now_at(self.t)
    }

    pub fn line(&mut self, tag: &str, text: &str) {
        let _ = writeln!(self.log, "t={:<6} {tag:<4} {text}", self.t);
    }

    pub fn note(&mut self, text: &str) {
        let _ = writeln!(self.log, "# {text}");
    }

    pub fn collect(&mut self) {
        while let Some(c) = self.d.poll_command() {
            self.queue.push_back(c);
        }
        while let Some(e) = self.d.poll_event() {
            let quiet =
                self.quiet_lease && matches!(e, DeliveryEvent::Lease(LeaseEvent::Renewed { .. }));
            if !quiet {
                let text = describe_event(&e);
                self.line("evt", &text);
            }
            self.events.push(e);
        }
    }

    pub fn feed(&mut self, input: Input) {
        let now = self.now();
        self.d.handle_input(now, input);
        self.collect();
    }

    /// Answers every queued command (and what follows) until nothing is left.
    pub fn run(&mut self) {
        let mut guard = 0;
        while let Some(cmd) = self.queue.pop_front() {
            guard += 1;
            assert!(guard < 100_000, "runaway");
            self.answer(cmd);
        }
    }

    fn answer(&mut self, cmd: Command) {
        let quiet =
            self.quiet_lease && is_lease_renewal(&cmd) && self.d.lease_state() == LeaseState::Ready;
        let effect = self
            .rules
            .iter_mut()
            .find(|r| r.times > 0 && (r.matches)(&cmd))
            .map(|r| {
                r.times = r.times.saturating_sub(1);
                r.effect.clone()
            })
            .or_else(|| self.chaos.as_mut().and_then(|c| c(&cmd)));
        match effect {
            Some(Effect::Hold) => {
                self.line("hold", &describe_command(&cmd));
                self.held.push(cmd);
            }
            Some(Effect::Answer(outcome)) => {
                self.line("cmd", &describe_command(&cmd));
                let op = cmd.op().expect("answered commands have an op");
                self.line("ans", &format!("{} (injected)", describe_outcome(&outcome)));
                self.feed(Input::Completed(Completion { op, outcome }));
            }
            Some(Effect::ExecuteThenUnknown) => {
                self.line("cmd", &describe_command(&cmd));
                let (c, after) = self.b.execute(&cmd);
                let op = c.map(|c| c.op).expect("an answered command");
                self.line("ans", "unknown (injected; the effect happened)");
                self.feed(Input::Completed(Completion::unknown(op)));
                for i in after {
                    self.feed(i);
                }
            }
            None => {
                if !quiet {
                    self.line("cmd", &describe_command(&cmd));
                }
                let (c, after) = self.b.execute(&cmd);
                if let Some(c) = c {
                    if !quiet {
                        self.line("ans", &describe_outcome(&c.outcome));
                    }
                    self.feed(Input::Completed(c));
                } else if let Command::KvWatch { .. } = cmd {
                    let values = after.len().saturating_sub(1);
                    self.line("ans", &format!("ok after {values} current value(s)"));
                }
                for i in after {
                    self.feed(i);
                }
            }
        }
    }

    /// Releases held command `i`: executes it normally, or answers `outcome`.
    pub fn release(&mut self, i: usize, outcome: Option<Outcome<Reply>>) {
        let cmd = self.held.remove(i);
        self.line("rel", &describe_command(&cmd));
        match outcome {
            Some(o) => {
                let op = cmd.op().expect("held commands have an op");
                self.line("ans", &describe_outcome(&o));
                self.feed(Input::Completed(Completion { op, outcome: o }));
            }
            None => {
                let (c, after) = self.b.execute(&cmd);
                if let Some(c) = c {
                    self.line("ans", &describe_outcome(&c.outcome));
                    self.feed(Input::Completed(c));
                }
                for i in after {
                    self.feed(i);
                }
            }
        }
        self.run();
    }

    pub fn rule(
        &mut self,
        matches: impl Fn(&Command) -> bool + 'static,
        effect: Effect,
        times: u32,
    ) {
        self.rules.push(Rule {
            matches: Box::new(matches),
            effect,
            times,
        });
    }

    pub fn advance(&mut self, ms: u64) {
        self.t += ms;
        let now = self.now();
        if self.d.poll_timeout().is_some_and(|d| d <= now.at) {
            self.d.handle_timeout(now);
            self.collect();
            self.run();
        }
    }

    /// Connects and runs boot to a serving daemon.
    pub fn boot(&mut self) {
        self.line("in", "connection restored");
        self.feed(Input::Connection(Connection::Restored));
        self.run();
    }

    pub fn acl(&mut self, owner: &str, allow: &[&str]) {
        let rec = AclRecord {
            allow_subscribe: allow.iter().map(|s| (*s).to_owned()).collect(),
            revision: 1,
            updated_at: UnixMillis(1),
            extra: Default::default(),
        };
        let bucket = KvBucket::Acl.name(&space());
        let inputs = self
            .b
            .kv_write(&bucket, owner, KvOperation::Put, json::encode(&rec));
        for i in inputs {
            self.feed(i);
        }
        self.run();
    }

    pub fn presence(&mut self, who: &str, name: &str) {
        let value = serde_json::json!({
            "card": {"id": who, "name": name, "kind": "agent"},
            "status": "idle",
            "ts": 1
        });
        let bucket = KvBucket::Presence.name(&space());
        let inputs = self.b.kv_write(
            &bucket,
            who,
            KvOperation::Put,
            Bytes::from(value.to_string()),
        );
        for i in inputs {
            self.feed(i);
        }
        self.run();
    }

    pub fn channel_class(&mut self, channel: &str, class: &str) {
        let value = serde_json::json!({ "deliveryClass": class });
        let bucket = KvBucket::Channels.name(&space());
        let inputs = self.b.kv_write(
            &bucket,
            channel,
            KvOperation::Put,
            Bytes::from(value.to_string()),
        );
        for i in inputs {
            self.feed(i);
        }
        self.run();
    }

    /// Stores a CHAT message; returns its sequence.
    pub fn post(&mut self, from: &str, channel: &str, mentions: &[&str]) -> u64 {
        self.b.chat_last += 1;
        let seq = self.b.chat_last;
        let msg = CotalMessage::new(
            format!("m{seq}"),
            UnixMillis(BASE_WALL + self.t),
            space(),
            Sender::new(id(from), from),
            Route::Channel(ch(channel)),
            vec![Part::text("hi")],
        )
        .with_mentions(mentions.iter().copied());
        self.b.chat.push(StoredMessage {
            seq,
            subject: format!("cotal.main.chat.{from}.{channel}"),
            headers: Vec::new(),
            payload: json::encode(&msg),
            stored_at: UnixMillis(BASE_WALL + self.t),
        });
        seq
    }

    /// Stores a raw CHAT message (spoofs, garbage).
    pub fn post_raw(&mut self, subject: &str, payload: Bytes) -> u64 {
        self.b.chat_last += 1;
        let seq = self.b.chat_last;
        self.b.chat.push(StoredMessage {
            seq,
            subject: subject.to_owned(),
            headers: Vec::new(),
            payload,
            stored_at: UnixMillis(BASE_WALL + self.t),
        });
        seq
    }

    fn next_delivery(&mut self) -> DeliveryId {
        self.b.next_delivery += 1;
        DeliveryId(self.b.next_delivery)
    }

    /// Delivers CHAT `seq` to the fan-out consumer; returns the delivery id.
    pub fn fanout(&mut self, seq: u64, count: u64) -> DeliveryId {
        self.fanout_with(seq, count, true)
    }

    /// [`World::fanout`] without its transcript line (for long loops).
    pub fn fanout_unlogged(&mut self, seq: u64, count: u64) -> DeliveryId {
        self.fanout_with(seq, count, false)
    }

    fn fanout_with(&mut self, seq: u64, count: u64, logged: bool) -> DeliveryId {
        let m = self
            .b
            .chat
            .iter()
            .find(|m| m.seq == seq)
            .cloned()
            .expect("posted");
        let sub = self.b.consumer("fanout");
        let delivery = self.next_delivery();
        if logged {
            self.line(
                "in",
                &format!("fanout {delivery} seq={seq} n={count} {}", m.subject),
            );
        }
        self.feed(Input::Inbound(Inbound::Delivery {
            sub,
            delivery,
            stream_seq: seq,
            delivery_count: count,
            subject: m.subject,
            headers: Vec::new(),
            payload: m.payload,
        }));
        self.run();
        delivery
    }

    /// Delivers INBOX entry `seq` to the reader; returns the delivery id.
    pub fn reader(&mut self, seq: u64, count: u64) -> DeliveryId {
        let (_, subject, msg_id, payload) = self
            .b
            .inbox
            .iter()
            .find(|e| e.0 == seq)
            .cloned()
            .expect("stored");
        self.reader_raw(seq, count, &subject, &msg_id, payload)
    }

    pub fn reader_raw(
        &mut self,
        seq: u64,
        count: u64,
        subject: &str,
        msg_id: &str,
        payload: Bytes,
    ) -> DeliveryId {
        let sub = self.b.consumer("reader");
        let delivery = self.next_delivery();
        self.fed_to_reader.insert(seq);
        self.b.reader_open.insert(delivery);
        self.line(
            "in",
            &format!("reader {delivery} inbox#{seq} n={count} {subject} id={msg_id}"),
        );
        self.feed(Input::Inbound(Inbound::Delivery {
            sub,
            delivery,
            stream_seq: seq,
            delivery_count: count,
            subject: subject.to_owned(),
            headers: Vec::new(),
            payload,
        }));
        self.run();
        delivery
    }

    /// Sends a control request from `who` with reply token `uuid`.
    pub fn request(&mut self, who: &str, req: &DeliveryRequest, uuid: &str) {
        let body = json::encode(&req.to_request(Sender::new(id(who), who)));
        let subject = format!("cotal.main.ctl.delivery.{who}");
        let reply = format!("{subject}.reply.{uuid}");
        self.request_raw(&subject, Some(&reply), body);
    }

    pub fn request_raw(&mut self, subject: &str, reply: Option<&str>, body: Bytes) {
        let sub = self.b.control.expect("control subscribed");
        self.line(
            "in",
            &format!(
                "ctl {subject} reply={} {}",
                reply.unwrap_or("-"),
                String::from_utf8_lossy(&body)
            ),
        );
        self.feed(Input::Inbound(Inbound::Message {
            sub,
            subject: subject.to_owned(),
            reply: reply.map(str::to_owned),
            headers: Vec::new(),
            payload: body,
        }));
        self.run();
    }

    pub fn join(&mut self, who: &str, channel: &str, watermark: Option<u64>, uuid: &str) {
        self.request(
            who,
            &DeliveryRequest::DurableJoin {
                channel: ch(channel),
                join_cursor: watermark,
            },
            uuid,
        );
    }

    pub fn leave(&mut self, who: &str, channel: &str, generation: u64, uuid: &str) {
        self.request(
            who,
            &DeliveryRequest::DurableLeave {
                channel: ch(channel),
                generation,
            },
            uuid,
        );
    }

    /// The reply sent to `…reply.<uuid>`, decoded.
    pub fn reply(&self, uuid: &str) -> Option<ControlReply> {
        let suffix = format!(".reply.{uuid}");
        let (_, p) = self
            .b
            .replies
            .iter()
            .rev()
            .find(|(s, _)| s.ends_with(&suffix))?;
        Some(json::decode(p).unwrap())
    }

    pub fn settled(&self, d: DeliveryId) -> Vec<AckKind> {
        self.b
            .settled
            .iter()
            .filter(|(x, _)| *x == d)
            .map(|(_, k)| *k)
            .collect()
    }

    /// INBOX msg-ids for `owner`.
    pub fn inbox_ids(&self, owner: &str) -> Vec<String> {
        let subject = format!("cotal.main.dinbox.{owner}");
        self.b
            .inbox
            .iter()
            .filter(|e| e.1 == subject)
            .map(|e| e.2.clone())
            .collect()
    }

    /// The msg-ids still stored on `owner`'s DLV subject (revoked copies are gone).
    /// Every copy written for `owner`, wherever it went: its dinbox entries, then its DLV
    /// copies (fan-out writes a copy it may transfer straight to DLV, the rest to the dinbox).
    pub fn copy_ids(&self, owner: &str) -> Vec<String> {
        let mut ids = self.inbox_ids(owner);
        for id in self.dlv_ids(owner) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// Gives the reader every INBOX entry it has not been given yet, in order.
    pub fn drain_reader(&mut self) {
        let seqs: Vec<u64> = self
            .b
            .inbox
            .iter()
            .map(|e| e.0)
            .filter(|s| !self.fed_to_reader.contains(s))
            .collect();
        for seq in seqs {
            self.reader(seq, 1);
        }
    }

    pub fn dlv_ids(&self, owner: &str) -> Vec<String> {
        let subject = format!("cotal.main.dlv.{owner}");
        self.b
            .dlv
            .iter()
            .filter(|e| e.1 == subject && !self.b.dlv_deleted.contains(&e.0))
            .map(|e| e.2.clone())
            .collect()
    }
}

fn is_lease_renewal(cmd: &Command) -> bool {
    matches!(cmd, Command::KvPut { key, condition: KvCondition::Revision(_), .. } if key.starts_with("lease."))
}

fn short_bucket(b: &str) -> &str {
    b.strip_prefix("cotal_")
        .and_then(|s| s.strip_suffix("_main"))
        .unwrap_or(b)
}

fn describe_value(bucket: &str, value: &[u8]) -> String {
    match short_bucket(bucket) {
        "members" => match MembershipRecord::from_kv(Some(value)) {
            Some(r) => format!(
                "g={} J={} L={} act={} fence={}",
                r.generation,
                r.join_cursor,
                r.leave_cursor.map_or("-".into(), |l| l.to_string()),
                r.is_activated(),
                crate::registry::stored_fence(&r).0
            ),
            None => "?".into(),
        },
        "delivery" => match DeliveryLease::from_kv(Some(value)) {
            Some(l) => format!("holder={} ready={}", l.holder, l.ready),
            None => "?".into(),
        },
        _ => String::from_utf8_lossy(value).into_owned(),
    }
}

pub fn describe_command(c: &Command) -> String {
    match c {
        Command::KvGet { bucket, key, .. } => format!("kv.get {}/{key}", short_bucket(bucket)),
        Command::KvPut {
            bucket,
            key,
            value,
            condition,
            ..
        } => {
            let cond = match condition {
                KvCondition::Any => "any".to_owned(),
                KvCondition::CreateOnly => "create".to_owned(),
                KvCondition::Revision(r) => format!("rev={r}"),
            };
            format!(
                "kv.put {}/{key} {cond} {}",
                short_bucket(bucket),
                describe_value(bucket, value)
            )
        }
        Command::KvDelete {
            bucket,
            key,
            expected_revision,
            ..
        } => format!(
            "kv.del {}/{key} rev={}",
            short_bucket(bucket),
            expected_revision.map_or("-".into(), |r| r.to_string())
        ),
        Command::KvWatch { bucket, sub, .. } => format!("kv.watch {} {sub}", short_bucket(bucket)),
        Command::KvUnwatch { sub } => format!("kv.unwatch {sub}"),
        Command::Subscribe { subject, sub, .. } => format!("sub {subject} {sub}"),
        Command::Unsubscribe { sub } => format!("unsub {sub}"),
        Command::Consume {
            consumer,
            sub,
            create,
            ..
        } => format!("consume {} create={create} {sub}", consumer.name),
        Command::StopConsume { sub } => format!("stop-consume {sub}"),
        Command::StreamInfo { stream, .. } => format!("stream.info {stream}"),
        Command::ConsumerInfo {
            stream, consumer, ..
        } => format!("consumer.info {stream}.{consumer}"),
        Command::DeleteStreamMessage { stream, seq, .. } => format!("msg.delete {stream} {seq}"),
        Command::ReadStream {
            filter,
            start,
            last_seq,
            max,
            ..
        } => format!(
            "read {filter} from={} to={} max={max}",
            match start {
                ReadStart::Seq(s) => s.to_string(),
                ReadStart::Time(t) => t.to_string(),
            },
            last_seq.map_or("-".into(), |l| l.to_string())
        ),
        Command::JsPublish {
            subject, msg_id, ..
        } => format!("js.pub {subject} id={}", msg_id.as_deref().unwrap_or("-")),
        Command::Settle { delivery, kind, .. } => format!("settle {delivery} {kind}"),
        Command::Publish {
            subject, payload, ..
        } => format!("reply {subject} {}", String::from_utf8_lossy(payload)),
        other => format!("{other:?}"),
    }
}

pub fn describe_outcome(o: &Outcome<Reply>) -> String {
    match o {
        Outcome::Success(r) => match r {
            Reply::Done => "ok".into(),
            Reply::KvWritten { revision } => format!("ok rev={revision}"),
            Reply::Kv(None) => "ok none".into(),
            Reply::Kv(Some(e)) => format!("ok rev={} {:?}", e.revision, e.operation),
            Reply::StreamState(s) => format!("ok first={} last={}", s.first_seq, s.last_seq),
            Reply::ConsumerState(c) => format!("ok unread={}", c.unread()),
            Reply::Stored(ms) => format!(
                "ok stored [{}]",
                ms.iter()
                    .map(|m| m.seq.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Reply::PubAck(a) => format!(
                "ok pub {}#{}{}",
                a.stream,
                a.seq,
                if a.duplicate { " duplicate" } else { "" }
            ),
            other => format!("ok {other:?}"),
        },
        Outcome::Failed(f) => format!("failed: {f}"),
        Outcome::Unknown => "unknown".into(),
    }
}

pub fn describe_event(e: &DeliveryEvent) -> String {
    match e {
        DeliveryEvent::Lease(l) => match l {
            LeaseEvent::Acquired { token } => format!("lease acquired ({token})"),
            LeaseEvent::Ready => "lease ready".into(),
            LeaseEvent::Lost { reason } => format!("lease lost {reason:?}"),
            other => format!("lease {other:?}"),
        },
        DeliveryEvent::HealthChanged(h) => format!("health {h}"),
        DeliveryEvent::Joined {
            owner,
            channel,
            generation,
            join_cursor,
            watermark,
            durable,
            reason,
            copied,
        } => format!(
            "joined {owner} {channel} g={generation} J={join_cursor} watermark={} durable={durable}{} copied={copied}",
            watermark.map_or("-".into(), |w| format!("{w:?}")),
            reason
                .as_deref()
                .map_or(String::new(), |r| format!(" reason={r:?}"))
        ),
        DeliveryEvent::Left {
            owner,
            channel,
            generation,
            leave_cursor,
        } => format!(
            "left {owner} {channel} g={} L={}",
            generation.map_or("-".into(), |g| g.to_string()),
            leave_cursor.map_or("-".into(), |l| l.to_string())
        ),
        DeliveryEvent::Evicted {
            owner,
            channel,
            generation,
            from_seq,
            to_seq,
        } => format!("evicted {owner} {channel} g={generation} seq {from_seq}..={to_seq}"),
        DeliveryEvent::EntryDropped {
            owner,
            channel,
            seq,
            generation,
            reason,
        } => format!("dropped {owner} {channel} seq={seq} g={generation} {reason:?}"),
        DeliveryEvent::EntryLost(g) => format!("lost {g}"),
        other => format!("{other:?}"),
    }
}
