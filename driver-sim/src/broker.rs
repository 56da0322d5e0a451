//! The server model: JetStream streams, durable pull consumers and KV buckets, in memory.
//!
//! [`Broker`] is what nats-server 2.15 does for the features Cotal uses, as far as
//! `shared/spec/nats-notes.md` records it, and nothing more. It knows no clients, connections or
//! permissions (that is [`crate::net`]); every call is synchronous and deterministic, and time only
//! moves when the caller says so through [`Broker::advance`].
//!
//! # Rules it keeps
//!
//! Streams ([`StreamSpec`]):
//! - a publish is captured by the one stream whose `subjects` match (NATS forbids overlaps), gets
//!   the next sequence, and keeps its headers (a msg-id is stored as `Nats-Msg-Id`);
//! - `max_msgs_per_subject` always evicts the oldest message of the subject (a stream without
//!   `discard_new_per_subject`, which no Cotal spec sets, discards old per subject even when
//!   `discard` is `new`); `max_age` expires messages on the sim clock; `max_msg_size` and
//!   `max_bytes`, when positive, refuse or evict as `discard` says;
//! - the msg-id duplicate window (default 2 min, capped by `max_age`) is per stream, across
//!   subjects, on the monotonic clock: a duplicate is acknowledged with the **original** sequence
//!   and `duplicate: true`, even when the original was evicted (nats-notes §5.2);
//! - `Nats-Expected-Last-Subject-Sequence` ([`Publish::expected_last_subject_seq`]) refuses with
//!   [`Failure::WrongLastRevision`] carrying the current last sequence of the subject (10071);
//! - `Nats-Rollup: sub` on a stream with `allow_rollup_hdrs` removes every earlier message of the
//!   subject (KV purge);
//! - retention: limits; work queue (an ack removes the message, overlapping filters are refused
//!   with 10100); interest (kept only while a consumer whose filter matches has not acked it; with
//!   no such consumer the publish is acknowledged and nothing is kept).
//!
//! Consumers ([`ConsumerSpec`]):
//! - deliver policy `all`, `new`, `last`, `last_per_subject`, `by_start_sequence`,
//!   `by_start_time` (wall clock of storage), fixed at creation;
//! - ack explicit: a delivered message is pending until acked or termed; after `ack_wait`
//!   (default 30 s) or a nak's delay it is redelivered with `delivery_count + 1`, redeliveries
//!   before new messages; once it was delivered `max_deliver` times (default unlimited, see
//!   [`ConsumerLimits`]) it is never delivered again, leaves the ack-pending count and holds the ack
//!   floor (nats-notes §5.4); `max_ack_pending` (default 1000) bounds pending deliveries;
//! - ack all: an ack settles every pending sequence at or below it; ack none: delivered is done;
//! - a message evicted or expired while pending is dropped from the pending set when it would be
//!   redelivered (the server says nothing; gap G6 is the machine's business).
//!
//! KV ([`KvBucketSpec`]) is a stream `KV_<bucket>` on `$KV.<bucket>.>` exactly as the spec says:
//! revision = stream sequence; `KV-Operation: DEL` / `PURGE` markers; create-only succeeds over a
//! marker (async-nats re-tries as an update at the marker's revision); update with an expected
//! revision (0 = must not exist) refuses with the current revision; bucket TTL is the stream's
//! `max_age`, whose expiry is invisible to watchers (no limit markers in the specs).

use bytes::Bytes;
use cotal_core::acl::subject_matches;
use cotal_core::io::{AckKind, Header, KvCondition, KvEntry, KvOperation, PubAck, ReadStart};
use cotal_core::io::{StoredMessage, StreamState};
use cotal_core::op::Failure;
use cotal_core::time::{Duration, Instant, Now, UnixMillis};
use cotal_core::wire::capacity::Headroom;
use cotal_core::wire::config::ConsumerSpec;
use cotal_core::wire::config::{
    AckPolicy, DeliverPolicy, DiscardPolicy, KvBucketSpec, RetentionPolicy, SpaceConfig, StreamSpec,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The header carrying a publish's msg-id.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";
/// The header marking a KV delete or purge.
pub const KV_OPERATION_HEADER: &str = "KV-Operation";
/// The rollup header (`sub` removes earlier messages of the subject).
pub const ROLLUP_HEADER: &str = "Nats-Rollup";
/// The server's default duplicate window (2 min).
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_millis(120_000);
/// The server's default `ack_wait` (30 s).
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_millis(30_000);
/// The server's default `max_ack_pending`.
pub const DEFAULT_MAX_ACK_PENDING: i64 = 1000;

/// JetStream `err_code` values the model answers with.
pub mod err_code {
    /// Stream name already in use with a different configuration.
    pub const STREAM_NAME_IN_USE: u32 = 10058;
    /// Wrong last sequence (an expected-last-subject-sequence mismatch).
    pub const WRONG_LAST_SEQUENCE: u32 = 10071;
    /// A consumer's deliver policy or start cannot be updated.
    pub const CONSUMER_START_UPDATE: u32 = 10012;
    /// Filtered consumer not unique on a work-queue stream.
    pub const WORKQUEUE_NOT_UNIQUE: u32 = 10100;
    /// Maximum consumers limit reached (the stream's `max_consumers`, or the server's default
    /// cap when it set none).
    pub const MAX_CONSUMERS_REACHED: u32 = 10026;
}

/// Limits of a consumer that a [`ConsumerSpec`] does not carry (the server's `max_deliver`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumerLimits {
    /// Deliveries after which a message is never delivered again (`None` or 0: unlimited).
    pub max_deliver: Option<u64>,
}

/// One publish into a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    /// Subject.
    pub subject: String,
    /// `Nats-Msg-Id`.
    pub msg_id: Option<String>,
    /// Other headers.
    pub headers: Vec<Header>,
    /// Body.
    pub payload: Bytes,
    /// `Nats-Expected-Last-Subject-Sequence` (0: the subject must hold nothing).
    pub expected_last_subject_seq: Option<u64>,
}

impl Publish {
    /// A plain publish.
    pub fn new(subject: impl Into<String>, payload: Bytes) -> Self {
        Publish {
            subject: subject.into(),
            msg_id: None,
            headers: Vec::new(),
            payload,
            expected_last_subject_seq: None,
        }
    }
}

/// What a successful publish did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// The acknowledgement the publisher gets.
    pub ack: PubAck,
    /// The message as stored (`None` for a duplicate, or an interest stream that kept nothing).
    pub stored: Option<StoredMessage>,
}

/// One consumer delivery chosen by [`Broker::next_delivery`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerDelivery {
    /// The message.
    pub message: StoredMessage,
    /// 1 for the first delivery, then 2, 3 …
    pub delivery_count: u64,
}

/// A consumer's state as `CONSUMER.INFO` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsumerInfo {
    /// The highest stream sequence delivered so far.
    pub delivered_stream_seq: u64,
    /// Every stream sequence at or below it is acked (or termed, or was never for this consumer).
    pub ack_floor: u64,
    /// Delivered, not yet acked, not past `max_deliver`.
    pub num_ack_pending: u64,
    /// Stored messages matching the filter not yet delivered.
    pub num_pending: u64,
    /// Pending messages delivered more than once.
    pub num_redelivered: u64,
    /// Messages that reached `max_deliver` without an ack (they hold the ack floor).
    pub num_exhausted: u64,
}

#[derive(Clone, Debug)]
struct Msg {
    stored: StoredMessage,
    at: Instant,
}

#[derive(Clone, Debug)]
struct Pending {
    count: u64,
    due: Instant,
}

#[derive(Clone, Debug)]
struct Consumer {
    spec: ConsumerSpec,
    limits: ConsumerLimits,
    /// The next stream sequence to consider for a first delivery.
    next_seq: u64,
    /// `last_per_subject`: sequences up to `.0` are delivered only if in `.1`.
    last_per_subject: Option<(u64, BTreeSet<u64>)>,
    pending: BTreeMap<u64, Pending>,
    exhausted: BTreeSet<u64>,
    delivered_seq: u64,
}

impl Consumer {
    fn ack_wait(&self) -> Duration {
        self.spec.ack_wait.unwrap_or(DEFAULT_ACK_WAIT)
    }

    fn max_ack_pending(&self) -> Option<u64> {
        let n = self.spec.max_ack_pending.unwrap_or(DEFAULT_MAX_ACK_PENDING);
        u64::try_from(n).ok().filter(|n| *n > 0)
    }

    fn acks(&self) -> bool {
        self.spec.ack_policy != AckPolicy::None
    }

    fn max_deliver(&self) -> Option<u64> {
        self.limits.max_deliver.filter(|n| *n > 0)
    }

    /// True once this consumer is finished with `seq` (delivered and resolved, or skipped).
    fn done_with(&self, seq: u64) -> bool {
        seq < self.next_seq && !self.pending.contains_key(&seq) && !self.exhausted.contains(&seq)
    }
}

#[derive(Clone, Debug)]
struct Stream {
    spec: StreamSpec,
    messages: BTreeMap<u64, Msg>,
    per_subject: BTreeMap<String, BTreeSet<u64>>,
    last_seq: u64,
    bytes: u64,
    dedup: BTreeMap<String, (u64, Instant)>,
    /// Msg-ids in the order they entered the window (publish times never decrease).
    dedup_order: VecDeque<(Instant, String)>,
    consumers: BTreeMap<String, Consumer>,
}

impl Stream {
    fn new(spec: StreamSpec) -> Self {
        Stream {
            spec,
            messages: BTreeMap::new(),
            per_subject: BTreeMap::new(),
            last_seq: 0,
            bytes: 0,
            dedup: BTreeMap::new(),
            dedup_order: VecDeque::new(),
            consumers: BTreeMap::new(),
        }
    }

    fn captures(&self, subject: &str) -> bool {
        self.spec
            .subjects
            .iter()
            .any(|p| subject_matches(p, subject))
    }

    fn duplicate_window(&self) -> Duration {
        let w = self
            .spec
            .duplicate_window
            .filter(|w| *w > Duration::ZERO)
            .unwrap_or(DEFAULT_DUPLICATE_WINDOW);
        match self.spec.max_age.filter(|a| *a > Duration::ZERO) {
            Some(age) => w.min(age),
            None => w,
        }
    }

    fn state(&self) -> StreamState {
        StreamState {
            first_seq: self
                .messages
                .keys()
                .next()
                .copied()
                .unwrap_or(self.last_seq.saturating_add(1)),
            last_seq: self.last_seq,
            messages: self.messages.len() as u64,
            consumers: self.consumers.len() as u64,
            max_consumers: self.spec.max_consumers.unwrap_or(-1),
            max_age_ms: self.spec.max_age.map_or(0, |a| a.as_millis()),
        }
    }

    fn remove(&mut self, seq: u64) -> Option<Msg> {
        let msg = self.messages.remove(&seq)?;
        if let Some(set) = self.per_subject.get_mut(&msg.stored.subject) {
            set.remove(&seq);
            if set.is_empty() {
                self.per_subject.remove(&msg.stored.subject);
            }
        }
        self.bytes = self.bytes.saturating_sub(msg_size(&msg.stored));
        Some(msg)
    }

    fn last_seq_of(&self, subject: &str) -> u64 {
        self.per_subject
            .get(subject)
            .and_then(|s| s.iter().next_back().copied())
            .unwrap_or(0)
    }

    fn expire(&mut self, now: Instant) {
        if let Some(age) = self.spec.max_age.filter(|a| *a > Duration::ZERO) {
            let old: Vec<u64> = self
                .messages
                .iter()
                .take_while(|(_, m)| m.at + age <= now)
                .map(|(s, _)| *s)
                .collect();
            for seq in old {
                self.remove(seq);
            }
        }
        let window = self.duplicate_window();
        while let Some((at, _)) = self.dedup_order.front()
            && *at + window <= now
        {
            if let Some((at, id)) = self.dedup_order.pop_front()
                && self.dedup.get(&id).is_some_and(|(_, t)| *t == at)
            {
                self.dedup.remove(&id);
            }
        }
    }

    /// Removes messages nothing has interest in any more (interest / work-queue retention).
    fn drop_if_done(&mut self, seq: u64) {
        let Some(msg) = self.messages.get(&seq) else {
            return;
        };
        let subject = msg.stored.subject.clone();
        let done = match self.spec.retention {
            RetentionPolicy::WorkQueue | RetentionPolicy::Interest => self
                .consumers
                .values()
                .filter(|c| subject_matches(&c.spec.filter_subject, &subject))
                .all(|c| c.done_with(seq)),
            // Limits, and any policy this model does not know: keep until a limit evicts.
            _ => false,
        };
        if done {
            self.remove(seq);
        }
    }
}

fn msg_size(m: &StoredMessage) -> u64 {
    let headers: usize = m.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    (m.subject.len() + headers + m.payload.len()) as u64
}

fn header<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// True when some subject matches both patterns.
pub fn patterns_overlap(a: &str, b: &str) -> bool {
    let (mut ai, mut bi) = (a.split('.'), b.split('.'));
    loop {
        match (ai.next(), bi.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some(x), Some(y)) => {
                if x != y && x != "*" && y != "*" {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// A KV key as nats.js and async-nats accept it: non-empty, `[-/_=.a-zA-Z0-9]`, no leading or
/// trailing dot, no empty token.
pub fn valid_kv_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && !key.contains("..")
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '=' | '.'))
}

/// The KV stream name of a bucket (`KV_<bucket>`).
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// `Failure::NotFound` (the argument says what was missing, for the reader of this file).
fn not_found(_what: &str) -> Failure {
    Failure::NotFound
}

/// The in-memory JetStream server. See the module docs for the rules it keeps.
#[derive(Clone, Debug)]
pub struct Broker {
    streams: BTreeMap<String, Stream>,
    buckets: BTreeSet<String>,
    limits: BTreeMap<(String, String), ConsumerLimits>,
    now: Now,
}

impl Default for Broker {
    fn default() -> Self {
        Broker::new(Now::new(Instant::ZERO, UnixMillis(0)))
    }
}

impl Broker {
    /// An empty server at `now`.
    pub fn new(now: Now) -> Self {
        Broker {
            streams: BTreeMap::new(),
            buckets: BTreeSet::new(),
            limits: BTreeMap::new(),
            now,
        }
    }

    /// The server's clock.
    pub fn now(&self) -> Now {
        self.now
    }

    /// Moves the clock to `now` (never backwards) and applies what time does: `max_age` expiry
    /// and the end of duplicate windows. Redeliveries are not pushed; [`Broker::next_delivery`]
    /// finds those that are due.
    pub fn advance(&mut self, now: Now) {
        if now.at >= self.now.at {
            self.now = now;
        }
        let at = self.now.at;
        for s in self.streams.values_mut() {
            s.expire(at);
        }
    }

    /// Creates a stream (`STREAM.CREATE`): the same config again is a no-op, another config under
    /// the same name is refused with 10058.
    pub fn add_stream(&mut self, spec: StreamSpec) -> Result<(), Failure> {
        if let Some(s) = self.streams.get(&spec.name) {
            return if s.spec == spec {
                Ok(())
            } else {
                Err(Failure::Rejected {
                    code: Some(err_code::STREAM_NAME_IN_USE),
                    description: "stream name already in use with a different configuration".into(),
                })
            };
        }
        self.streams.insert(spec.name.clone(), Stream::new(spec));
        Ok(())
    }

    /// Creates a KV bucket: its stream [`KvBucketSpec::stream`].
    pub fn add_kv_bucket(&mut self, spec: &KvBucketSpec) -> Result<(), Failure> {
        self.add_stream(spec.stream())?;
        self.buckets.insert(spec.bucket.clone());
        Ok(())
    }

    /// Provisions a space as `cotal up` does: its five streams, then its five KV buckets.
    pub fn provision(&mut self, space: &SpaceConfig) -> Result<(), Failure> {
        for stream in &space.streams {
            self.add_stream(stream.clone())?;
        }
        for bucket in &space.kv_buckets {
            self.add_kv_bucket(bucket)?;
        }
        Ok(())
    }

    /// Names of all streams.
    pub fn stream_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.streams.keys().map(String::as_str)
    }

    /// The stream that captures `subject`, if any.
    pub fn stream_for_subject(&self, subject: &str) -> Option<&str> {
        self.streams
            .values()
            .find(|s| s.captures(subject))
            .map(|s| s.spec.name.as_str())
    }

    /// The bucket whose stream is `stream`, if it is a KV stream.
    pub fn bucket_of_stream(&self, stream: &str) -> Option<&str> {
        let bucket = stream.strip_prefix("KV_")?;
        self.buckets.get(bucket).map(String::as_str)
    }

    /// Stores a publish in the stream that captures its subject (a JetStream publish; a core
    /// publish to a captured subject is stored the same way without anyone seeing the ack).
    ///
    /// Fails with [`Failure::NotFound`] when no stream captures the subject (async-nats
    /// `StreamNotFound`, 503), [`Failure::WrongLastRevision`] on an expected-sequence mismatch,
    /// [`Failure::Rejected`] for a too-large message or a full stream with discard new.
    pub fn publish(&mut self, publish: Publish) -> Result<Published, Failure> {
        let now = self.now;
        let name = self
            .stream_for_subject(&publish.subject)
            .map(str::to_owned)
            .ok_or_else(|| not_found("no stream captures the subject"))?;
        let stream = self
            .streams
            .get_mut(&name)
            .expect("the stream was just found by name");
        if let Some(id) = &publish.msg_id
            && let Some((seq, _)) = stream.dedup.get(id)
        {
            return Ok(Published {
                ack: PubAck {
                    stream: name,
                    seq: *seq,
                    duplicate: true,
                },
                stored: None,
            });
        }
        if let Some(expected) = publish.expected_last_subject_seq {
            let current = stream.last_seq_of(&publish.subject);
            if current != expected {
                return Err(Failure::WrongLastRevision {
                    current: Some(current),
                });
            }
        }
        let mut headers = Vec::with_capacity(publish.headers.len() + 1);
        if let Some(id) = &publish.msg_id {
            headers.push((MSG_ID_HEADER.to_owned(), id.clone()));
        }
        headers.extend(publish.headers);
        let seq = stream.last_seq + 1;
        let stored = StoredMessage {
            seq,
            subject: publish.subject,
            headers,
            payload: publish.payload,
            stored_at: now.wall,
        };
        let size = msg_size(&stored);
        if let Some(max) = stream.spec.max_msg_size.filter(|m| *m > 0)
            && stored.payload.len() as u64 > max as u64
        {
            return Err(Failure::Rejected {
                code: None,
                description: "message size exceeds maximum allowed".into(),
            });
        }
        if let Some(max) = stream.spec.max_bytes.filter(|m| *m > 0) {
            let max = max as u64;
            if stream.spec.discard == Some(DiscardPolicy::New) && stream.bytes + size > max {
                return Err(Failure::Rejected {
                    code: None,
                    description: "maximum bytes exceeded".into(),
                });
            }
            while stream.bytes + size > max {
                let Some(first) = stream.messages.keys().next().copied() else {
                    break;
                };
                stream.remove(first);
            }
        }
        stream.last_seq = seq;
        if let Some(id) = &publish.msg_id {
            stream.dedup.insert(id.clone(), (seq, now.at));
            stream.dedup_order.push_back((now.at, id.clone()));
        }
        let rollup = stream.spec.allow_rollup_hdrs == Some(true)
            && header(&stored.headers, ROLLUP_HEADER) == Some("sub");
        if rollup {
            let earlier: Vec<u64> = stream
                .per_subject
                .get(&stored.subject)
                .map(|s| s.iter().copied().collect())
                .unwrap_or_default();
            for s in earlier {
                stream.remove(s);
            }
        }
        if let Some(limit) = stream.spec.max_msgs_per_subject.filter(|m| *m > 0) {
            let limit = limit as usize;
            let held = stream
                .per_subject
                .get(&stored.subject)
                .map_or(0, BTreeSet::len);
            if held + 1 > limit {
                let evict: Vec<u64> = stream
                    .per_subject
                    .get(&stored.subject)
                    .map(|s| s.iter().copied().take(held + 1 - limit).collect())
                    .unwrap_or_default();
                for s in evict {
                    stream.remove(s);
                }
            }
        }
        stream
            .per_subject
            .entry(stored.subject.clone())
            .or_default()
            .insert(seq);
        stream.bytes += size;
        stream.messages.insert(
            seq,
            Msg {
                stored: stored.clone(),
                at: now.at,
            },
        );
        let kept = match stream.spec.retention {
            RetentionPolicy::Interest => {
                let interested = stream
                    .consumers
                    .values()
                    .any(|c| subject_matches(&c.spec.filter_subject, &stored.subject));
                if !interested {
                    stream.remove(seq);
                }
                interested
            }
            _ => true,
        };
        Ok(Published {
            ack: PubAck {
                stream: name,
                seq,
                duplicate: false,
            },
            stored: kept.then_some(stored),
        })
    }

    fn stream(&self, name: &str) -> Result<&Stream, Failure> {
        self.streams
            .get(name)
            .ok_or_else(|| not_found("no such stream"))
    }

    /// `STREAM.INFO`: first and last sequence and the message count.
    pub fn stream_state(&self, stream: &str) -> Result<StreamState, Failure> {
        Ok(self.stream(stream)?.state())
    }

    /// The stored message at `seq`, if still held.
    pub fn message(&self, stream: &str, seq: u64) -> Result<Option<StoredMessage>, Failure> {
        Ok(self
            .stream(stream)?
            .messages
            .get(&seq)
            .map(|m| m.stored.clone()))
    }

    /// The last stored message of a subject (`STREAM.MSG.GET` with `last_by_subj`).
    pub fn last_for_subject(
        &self,
        stream: &str,
        subject: &str,
    ) -> Result<Option<StoredMessage>, Failure> {
        let s = self.stream(stream)?;
        let seq = s.last_seq_of(subject);
        Ok(s.messages.get(&seq).map(|m| m.stored.clone()))
    }

    /// Stored messages in sequence order matching `filter`, from `start`, none above `last_seq`,
    /// at most `max` ([`cotal_core::io::Command::ReadStream`]).
    pub fn read(
        &self,
        stream: &str,
        filter: &str,
        start: ReadStart,
        last_seq: Option<u64>,
        max: u32,
    ) -> Result<Vec<StoredMessage>, Failure> {
        let s = self.stream(stream)?;
        let upper = last_seq.unwrap_or(u64::MAX);
        let from = match start {
            ReadStart::Seq(seq) => seq.max(1),
            ReadStart::Time(t) => s
                .messages
                .values()
                .find(|m| m.stored.stored_at >= t)
                .map_or(s.last_seq.saturating_add(1), |m| m.stored.seq),
        };
        if from > upper {
            return Ok(Vec::new());
        }
        Ok(s.messages
            .range(from..=upper)
            .map(|(_, m)| &m.stored)
            .filter(|m| subject_matches(filter, &m.subject))
            .take(max as usize)
            .cloned()
            .collect())
    }

    /// Sets limits for a consumer the spec cannot express (before or after it is created).
    pub fn set_consumer_limits(&mut self, stream: &str, consumer: &str, limits: ConsumerLimits) {
        self.limits
            .insert((stream.to_owned(), consumer.to_owned()), limits);
        if let Some(c) = self
            .streams
            .get_mut(stream)
            .and_then(|s| s.consumers.get_mut(consumer))
        {
            c.limits = limits;
        }
    }

    /// Creates or updates a consumer (`CONSUMER.CREATE`). The same spec again is a no-op; a
    /// changed deliver policy is refused (10012); other changes (filter, ack wait, max ack
    /// pending) apply. On a work-queue stream a filter overlapping another consumer's is refused
    /// (10100). A new consumer on a stream holding its cap is refused (10026): the stream's
    /// `max_consumers`, or nats-server 2.15's default of 1,000 when it set none.
    pub fn add_consumer(&mut self, spec: ConsumerSpec) -> Result<(), Failure> {
        let limits = self
            .limits
            .get(&(spec.stream.clone(), spec.name.clone()))
            .copied()
            .unwrap_or_default();
        let s = self
            .streams
            .get_mut(&spec.stream)
            .ok_or_else(|| not_found("no such stream"))?;
        if s.spec.retention == RetentionPolicy::WorkQueue
            && s.consumers.values().any(|c| {
                c.spec.name != spec.name
                    && patterns_overlap(&c.spec.filter_subject, &spec.filter_subject)
            })
        {
            return Err(Failure::Rejected {
                code: Some(err_code::WORKQUEUE_NOT_UNIQUE),
                description: "filtered consumer not unique on workqueue stream".into(),
            });
        }
        if let Some(c) = s.consumers.get_mut(&spec.name) {
            if c.spec.deliver_policy.unwrap_or(DeliverPolicy::All)
                != spec.deliver_policy.unwrap_or(DeliverPolicy::All)
            {
                return Err(Failure::Rejected {
                    code: Some(err_code::CONSUMER_START_UPDATE),
                    description: "deliver policy can not be updated".into(),
                });
            }
            c.spec = spec;
            return Ok(());
        }
        let cap = Headroom::judge(s.consumers.len() as u64, s.spec.max_consumers.unwrap_or(-1));
        if !cap.admits(1) {
            return Err(Failure::Rejected {
                code: Some(err_code::MAX_CONSUMERS_REACHED),
                description: "maximum consumers limit reached".into(),
            });
        }
        let last = s.last_seq;
        let matching = |m: &&Msg| subject_matches(&spec.filter_subject, &m.stored.subject);
        let mut last_per_subject = None;
        let next_seq = match spec.deliver_policy.unwrap_or(DeliverPolicy::All) {
            DeliverPolicy::New => last + 1,
            DeliverPolicy::Last => s
                .messages
                .values()
                .rev()
                .find(matching)
                .map_or(last + 1, |m| m.stored.seq),
            DeliverPolicy::LastPerSubject => {
                let set: BTreeSet<u64> = s
                    .per_subject
                    .iter()
                    .filter(|(subj, _)| subject_matches(&spec.filter_subject, subj))
                    .filter_map(|(_, seqs)| seqs.iter().next_back().copied())
                    .collect();
                let first = set.iter().next().copied().unwrap_or(last + 1);
                last_per_subject = Some((last, set));
                first
            }
            DeliverPolicy::ByStartSequence(seq) => seq.max(1),
            DeliverPolicy::ByStartTime(t) => s
                .messages
                .values()
                .find(|m| m.stored.stored_at >= t)
                .map_or(last + 1, |m| m.stored.seq),
            // All, and any policy this model does not know: from the beginning.
            _ => 1,
        };
        s.consumers.insert(
            spec.name.clone(),
            Consumer {
                spec,
                limits,
                next_seq,
                last_per_subject,
                pending: BTreeMap::new(),
                exhausted: BTreeSet::new(),
                delivered_seq: next_seq.saturating_sub(1),
            },
        );
        Ok(())
    }

    /// Deletes one stored message (`STREAM.MSG.DELETE`). [`Failure::NotFound`] when the stream
    /// or the sequence is not there; consumers skip the gap as the server does.
    pub fn delete_message(&mut self, stream: &str, seq: u64) -> Result<(), Failure> {
        let s = self
            .streams
            .get_mut(stream)
            .ok_or_else(|| not_found("no such stream"))?;
        s.remove(seq)
            .map(|_| ())
            .ok_or_else(|| not_found("no message found"))
    }

    /// Deletes a consumer (`CONSUMER.DELETE`).
    pub fn delete_consumer(&mut self, stream: &str, consumer: &str) -> Result<(), Failure> {
        let s = self
            .streams
            .get_mut(stream)
            .ok_or_else(|| not_found("no such stream"))?;
        s.consumers
            .remove(consumer)
            .map(|_| ())
            .ok_or_else(|| not_found("no such consumer"))
    }

    /// The spec of an existing consumer.
    pub fn consumer_spec(&self, stream: &str, consumer: &str) -> Option<&ConsumerSpec> {
        self.streams
            .get(stream)?
            .consumers
            .get(consumer)
            .map(|c| &c.spec)
    }

    /// The next message the consumer hands out now, if any: a due redelivery first (lowest
    /// sequence), else the next matching stored message, within `max_ack_pending`.
    pub fn next_delivery(&mut self, stream: &str, consumer: &str) -> Option<ConsumerDelivery> {
        let s = self.streams.get_mut(stream)?;
        let (delivery, done) = Self::pick(s, consumer, self.now.at)?;
        if done {
            s.drop_if_done(delivery.message.seq);
        }
        Some(delivery)
    }

    /// The choice of [`Broker::next_delivery`]; the flag says the message is done for this
    /// consumer already (ack none), for interest / work-queue removal.
    fn pick(s: &mut Stream, consumer: &str, now: Instant) -> Option<(ConsumerDelivery, bool)> {
        let Stream {
            messages,
            consumers,
            last_seq,
            ..
        } = s;
        let c = consumers.get_mut(consumer)?;
        // Redeliveries that are due.
        loop {
            let due = c
                .pending
                .iter()
                .filter(|(_, p)| p.due <= now)
                .map(|(seq, p)| (*seq, p.count))
                .next();
            let Some((seq, count)) = due else { break };
            let Some(msg) = messages.get(&seq) else {
                // Evicted or expired while pending: the server forgets it.
                c.pending.remove(&seq);
                continue;
            };
            if c.max_deliver().is_some_and(|max| count >= max) {
                c.pending.remove(&seq);
                c.exhausted.insert(seq);
                continue;
            }
            let wait = c.ack_wait();
            let p = c
                .pending
                .get_mut(&seq)
                .expect("the due entry was just found");
            p.count += 1;
            p.due = now + wait;
            return Some((
                ConsumerDelivery {
                    message: msg.stored.clone(),
                    delivery_count: p.count,
                },
                false,
            ));
        }
        if c.acks()
            && c.max_ack_pending()
                .is_some_and(|max| c.pending.len() as u64 >= max)
        {
            return None;
        }
        while c.next_seq <= *last_seq {
            let seq = c.next_seq;
            c.next_seq += 1;
            if let Some((cutoff, set)) = &c.last_per_subject
                && seq <= *cutoff
                && !set.contains(&seq)
            {
                continue;
            }
            let Some(msg) = messages.get(&seq) else {
                continue;
            };
            if !subject_matches(&c.spec.filter_subject, &msg.stored.subject) {
                continue;
            }
            c.delivered_seq = seq;
            if c.acks() {
                c.pending.insert(
                    seq,
                    Pending {
                        count: 1,
                        due: now + c.ack_wait(),
                    },
                );
            }
            return Some((
                ConsumerDelivery {
                    message: msg.stored.clone(),
                    delivery_count: 1,
                },
                !c.acks(),
            ));
        }
        None
    }

    /// The earliest instant a pending message of this consumer becomes due for redelivery.
    pub fn consumer_next_due(&self, stream: &str, consumer: &str) -> Option<Instant> {
        let c = self.streams.get(stream)?.consumers.get(consumer)?;
        c.pending.values().map(|p| p.due).min()
    }

    /// True when the consumer would hand out a message right now.
    pub fn consumer_has_ready(&self, stream: &str, consumer: &str) -> bool {
        let Some(s) = self.streams.get(stream) else {
            return false;
        };
        let Some(c) = s.consumers.get(consumer) else {
            return false;
        };
        let now = self.now.at;
        if c.pending.values().any(|p| p.due <= now) {
            return true;
        }
        if c.acks()
            && c.max_ack_pending()
                .is_some_and(|max| c.pending.len() as u64 >= max)
        {
            return false;
        }
        s.messages.range(c.next_seq..).any(|(seq, m)| {
            subject_matches(&c.spec.filter_subject, &m.stored.subject)
                && c.last_per_subject
                    .as_ref()
                    .is_none_or(|(cut, set)| *seq > *cut || set.contains(seq))
        })
    }

    /// Resolves a delivered message by its stream sequence (an ack reply subject names the
    /// sequence, so an ack from an earlier delivery of the same message settles it too).
    ///
    /// Ack or term of a sequence no longer pending is a no-op (`+OK`), as the server answers a
    /// double ack. A nak of a sequence not pending is a no-op too. Fails with
    /// [`Failure::NotFound`] only when the stream or consumer is gone.
    pub fn settle(
        &mut self,
        stream: &str,
        consumer: &str,
        seq: u64,
        kind: AckKind,
    ) -> Result<(), Failure> {
        let now = self.now.at;
        let s = self
            .streams
            .get_mut(stream)
            .ok_or_else(|| not_found("no such stream"))?;
        let c = s
            .consumers
            .get_mut(consumer)
            .ok_or_else(|| not_found("no such consumer"))?;
        match kind {
            AckKind::Ack => {
                let settled: Vec<u64> = if c.spec.ack_policy == AckPolicy::All {
                    c.pending.range(..=seq).map(|(s, _)| *s).collect()
                } else {
                    vec![seq]
                };
                for sq in &settled {
                    c.pending.remove(sq);
                }
                for sq in settled {
                    s.drop_if_done(sq);
                }
            }
            AckKind::Term => {
                c.pending.remove(&seq);
                s.drop_if_done(seq);
            }
            AckKind::Nak { delay } => {
                if let Some(p) = c.pending.get_mut(&seq) {
                    p.due = now + delay;
                }
            }
        }
        Ok(())
    }

    /// `CONSUMER.INFO`.
    pub fn consumer_info(&self, stream: &str, consumer: &str) -> Result<ConsumerInfo, Failure> {
        let s = self.stream(stream)?;
        let c = s
            .consumers
            .get(consumer)
            .ok_or_else(|| not_found("no such consumer"))?;
        let first_unresolved = c
            .pending
            .keys()
            .chain(c.exhausted.iter())
            .min()
            .copied()
            .unwrap_or(c.next_seq);
        let num_pending = s
            .messages
            .range(c.next_seq..)
            .filter(|(_, m)| subject_matches(&c.spec.filter_subject, &m.stored.subject))
            .count() as u64;
        Ok(ConsumerInfo {
            delivered_stream_seq: c.delivered_seq,
            ack_floor: first_unresolved.saturating_sub(1).min(c.delivered_seq),
            num_ack_pending: c.pending.len() as u64,
            num_pending,
            num_redelivered: c.pending.values().filter(|p| p.count > 1).count() as u64,
            num_exhausted: c.exhausted.len() as u64,
        })
    }

    // ----- KV -------------------------------------------------------------------------------

    fn bucket_stream(&self, bucket: &str) -> Result<String, Failure> {
        if self.buckets.contains(bucket) {
            Ok(kv_stream(bucket))
        } else {
            Err(not_found("no such bucket"))
        }
    }

    fn check_key(key: &str) -> Result<(), Failure> {
        if valid_kv_key(key) {
            Ok(())
        } else {
            Err(Failure::Rejected {
                code: None,
                description: format!("invalid key {key:?}"),
            })
        }
    }

    /// The KV entry a stored message of a bucket's stream is (`None` if its subject is not a key
    /// of `bucket`).
    pub fn kv_entry_of(bucket: &str, m: &StoredMessage) -> Option<KvEntry> {
        let key = m.subject.strip_prefix(&format!("$KV.{bucket}."))?;
        let operation = match header(&m.headers, KV_OPERATION_HEADER) {
            Some("DEL") => KvOperation::Delete,
            Some("PURGE") => KvOperation::Purge,
            _ => KvOperation::Put,
        };
        Some(KvEntry {
            key: key.to_owned(),
            revision: m.seq,
            operation,
            value: if operation == KvOperation::Put {
                m.payload.clone()
            } else {
                Bytes::new()
            },
        })
    }

    /// `kv.entry(key)`: the latest entry, delete and purge markers included (`None` when the key
    /// never held anything or expired).
    pub fn kv_entry(&self, bucket: &str, key: &str) -> Result<Option<KvEntry>, Failure> {
        let stream = self.bucket_stream(bucket)?;
        Self::check_key(key)?;
        Ok(self
            .last_for_subject(&stream, &kv_subject(bucket, key))?
            .and_then(|m| Self::kv_entry_of(bucket, &m)))
    }

    /// `kv.get(key)`: the latest value, `None` for an absent key or a marker.
    pub fn kv_get(&self, bucket: &str, key: &str) -> Result<Option<KvEntry>, Failure> {
        Ok(self
            .kv_entry(bucket, key)?
            .filter(|e| e.operation == KvOperation::Put))
    }

    /// The current revision of a key for compare-and-set (0: nothing held).
    pub fn kv_revision(&self, bucket: &str, key: &str) -> Result<u64, Failure> {
        Ok(self.kv_entry(bucket, key)?.map_or(0, |e| e.revision))
    }

    fn kv_write(
        &mut self,
        bucket: &str,
        key: &str,
        value: Bytes,
        headers: Vec<Header>,
        expected: Option<u64>,
    ) -> Result<StoredMessage, Failure> {
        self.bucket_stream(bucket)?;
        Self::check_key(key)?;
        let publish = Publish {
            subject: kv_subject(bucket, key),
            msg_id: None,
            headers,
            payload: value,
            expected_last_subject_seq: expected,
        };
        let published = self.publish(publish)?;
        published.stored.ok_or_else(|| Failure::Other {
            description: "a KV stream kept nothing".into(),
        })
    }

    /// A KV write under a condition ([`cotal_core::io::Command::KvPut`]); returns the stored
    /// message, whose sequence is the new revision.
    ///
    /// - [`KvCondition::Any`]\: unconditional;
    /// - [`KvCondition::CreateOnly`]\: [`Failure::AlreadyExists`] unless the key holds nothing or a
    ///   delete / purge marker (then a CAS on the marker's revision, as async-nats does);
    /// - [`KvCondition::Revision`]\: [`Failure::WrongLastRevision`] with the current revision
    ///   unless the key is at exactly that revision (0: must not exist).
    pub fn kv_put(
        &mut self,
        bucket: &str,
        key: &str,
        value: Bytes,
        condition: KvCondition,
    ) -> Result<StoredMessage, Failure> {
        let expected = match condition {
            KvCondition::Any => None,
            KvCondition::Revision(rev) => Some(rev),
            KvCondition::CreateOnly => match self.kv_entry(bucket, key)? {
                None => Some(0),
                Some(e) if e.operation != KvOperation::Put => Some(e.revision),
                Some(_) => return Err(Failure::AlreadyExists),
            },
        };
        self.kv_write(bucket, key, value, Vec::new(), expected)
    }

    /// Writes a delete marker, optionally only at `expected_revision`.
    pub fn kv_delete(
        &mut self,
        bucket: &str,
        key: &str,
        expected_revision: Option<u64>,
    ) -> Result<StoredMessage, Failure> {
        let headers = vec![(KV_OPERATION_HEADER.to_owned(), "DEL".to_owned())];
        self.kv_write(bucket, key, Bytes::new(), headers, expected_revision)
    }

    /// Writes a purge marker that removes every earlier revision of the key, optionally only at
    /// `expected_revision`.
    pub fn kv_purge(
        &mut self,
        bucket: &str,
        key: &str,
        expected_revision: Option<u64>,
    ) -> Result<StoredMessage, Failure> {
        let headers = vec![
            (KV_OPERATION_HEADER.to_owned(), "PURGE".to_owned()),
            (ROLLUP_HEADER.to_owned(), "sub".to_owned()),
        ];
        self.kv_write(bucket, key, Bytes::new(), headers, expected_revision)
    }

    /// Every revision of a key still held, oldest first (markers included).
    pub fn kv_history(&self, bucket: &str, key: &str) -> Result<Vec<KvEntry>, Failure> {
        let stream = self.bucket_stream(bucket)?;
        let s = self.stream(&stream)?;
        let subject = kv_subject(bucket, key);
        Ok(s.per_subject
            .get(&subject)
            .into_iter()
            .flatten()
            .filter_map(|seq| s.messages.get(seq))
            .filter_map(|m| Self::kv_entry_of(bucket, &m.stored))
            .collect())
    }

    /// The latest entry of every key matching `filter` (a key pattern), in revision order,
    /// markers included: what a watch delivers first (`last_per_subject`).
    pub fn kv_current(&self, bucket: &str, filter: &str) -> Result<Vec<KvEntry>, Failure> {
        let stream = self.bucket_stream(bucket)?;
        let s = self.stream(&stream)?;
        let mut seqs: Vec<u64> = s
            .per_subject
            .values()
            .filter_map(|set| set.iter().next_back().copied())
            .collect();
        seqs.sort_unstable();
        Ok(seqs
            .into_iter()
            .filter_map(|seq| s.messages.get(&seq))
            .filter_map(|m| Self::kv_entry_of(bucket, &m.stored))
            .filter(|e| subject_matches(filter, &e.key))
            .collect())
    }

    /// Keys holding a value (markers excluded), sorted.
    pub fn kv_keys(&self, bucket: &str) -> Result<Vec<String>, Failure> {
        let mut keys: Vec<String> = self
            .kv_current(bucket, ">")?
            .into_iter()
            .filter(|e| e.operation == KvOperation::Put)
            .map(|e| e.key)
            .collect();
        keys.sort();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests;
