//! Streams, consumers and KV buckets as data (semantics §1.4–1.6).
//!
//! The core never talks to a broker; it only describes what a driver must create. Every value here
//! is what the TypeScript reference 0.6.0 sends to nats-server 2.15, checked field by field against
//! the recorded `$JS.API.STREAM.CREATE` / `$JS.API.CONSUMER.CREATE` request bodies and the
//! server's `STREAM.INFO` / `CONSUMER.LIST` answers (see `tests/tests/configs.rs`).
//!
//! - [`StreamSpec`]: one JetStream stream (the five space streams, and each KV bucket's backing
//!   stream `KV_<bucket>`), with [`StreamSpec::create_request`] giving the exact
//!   `$JS.API.STREAM.CREATE.<name>` request.
//! - [`KvBucketSpec`]: one KV bucket; [`KvBucketSpec::stream`] is the stream nats-server actually
//!   holds for it, written with the field values the reference's nats.js client sends. A driver
//!   must create buckets through that request, not through a client library's own KV-create
//!   helper: async-nats, for one, sets `deny_delete: true`, and nats-server refuses a second create
//!   with a different config (err_code 10058) on a space the reference set up.
//! - [`ConsumerSpec`]: one consumer (`fanout`, `reader`, `dlv_<id>`, `dm_<id>`, `svc_<role>`, and
//!   the ephemeral `chathist_<id>` and `cu_<owner>_<generation>` readers), with
//!   [`ConsumerSpec::create_request`] giving the exact `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`
//!   request.
//!
//! Durations are milliseconds in this crate ([`Duration`]) and nanoseconds on the wire.

use crate::time::{Duration, UnixMillis};
use crate::wire::token::{AgentId, Channel, ConcreteChannel, Role, Space, route_token};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::constants::{
    DEFAULT_ACK_WAIT, DINBOX_MAX_ACK_PENDING, HISTORY_INACTIVE_THRESHOLD, LEASE_TTL,
    MAX_MSGS_PER_SUBJECT, PLANE3_DEDUP_WINDOW, PRESENCE_TTL,
};
use crate::wire::keys::{KvBucket, kv_stream_name};

/// `consumer_limits.inactive_threshold` of the presence and channels KV streams: 5 min, the
/// `inactive_threshold` the reference's nats.js ordered consumer asks for its KV watch (the
/// server refuses a consumer asking more than the limit; async-nats asks 30 s).
pub const WATCH_CONSUMER_INACTIVE_LIMIT: Duration = Duration::from_millis(300_000);
use crate::wire::shard::{fanout_durable, reader_durable};
use crate::wire::subject::{
    anycast_role_pattern, chat_subscribe_pattern, chat_wildcard, dinbox_wildcard,
    unicast_inbox_pattern,
};

/// Grant and consumer-name builders that are patterns rather than typed subjects (for typed
/// subjects and the common patterns see [`crate::wire::subject`]).
pub(crate) mod names {
    use crate::wire::token::{AgentId, Space, route_token};

    /// `cotal.<space>.<kind>.<rest>`.
    pub(crate) fn space_subject(space: &Space, rest: &str) -> String {
        format!("{}.{rest}", space.subject_prefix())
    }

    /// `cotal.<space>.chat.<sender>.<channel>` (sender may be `*`).
    pub(crate) fn chat_subject(space: &Space, sender: &str, channel: &str) -> String {
        space_subject(space, &format!("chat.{}.{channel}", route_token(sender)))
    }

    /// `CHAT_<space>` and its siblings.
    pub(crate) fn stream_name(prefix: &str, space: &Space) -> String {
        format!("{prefix}_{}", space.as_str())
    }

    /// `<prefix>_<token(id)>`: `dm_`, `dlv_`, `chathist_` consumer names.
    pub(crate) fn per_agent_consumer(prefix: &str, id: &AgentId) -> String {
        format!("{prefix}_{}", route_token(id.as_str()))
    }
}

/// The stream kinds of a space, for [`StreamSpec::for_space`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum SpaceStream {
    /// `CHAT_<space>`: every multicast, `cotal.<space>.chat.>`.
    Chat,
    /// `DM_<space>`: every unicast, `cotal.<space>.inst.>`.
    Dm,
    /// `TASK_<space>`: every anycast, `cotal.<space>.svc.>` (work queue).
    Task,
    /// `INBOX_<space>`: the mixed pre-auth Plane-3 store, `cotal.<space>.dinbox.>`.
    Inbox,
    /// `DLV_<space>`: the post-auth handoff, `cotal.<space>.dlv.>`.
    Dlv,
}

impl SpaceStream {
    /// All five, in the order `STRM:createSpaceStreams` creates them.
    pub const ALL: [SpaceStream; 5] = [
        SpaceStream::Chat,
        SpaceStream::Dm,
        SpaceStream::Task,
        SpaceStream::Inbox,
        SpaceStream::Dlv,
    ];

    /// The stream-name prefix (`CHAT`, `DM`, `TASK`, `INBOX`, `DLV`).
    pub fn prefix(self) -> &'static str {
        match self {
            SpaceStream::Chat => "CHAT",
            SpaceStream::Dm => "DM",
            SpaceStream::Task => "TASK",
            SpaceStream::Inbox => "INBOX",
            SpaceStream::Dlv => "DLV",
        }
    }

    /// The subject kind the stream captures (`chat`, `inst`, `svc`, `dinbox`, `dlv`).
    pub fn subject_kind(self) -> &'static str {
        match self {
            SpaceStream::Chat => "chat",
            SpaceStream::Dm => "inst",
            SpaceStream::Task => "svc",
            SpaceStream::Inbox => "dinbox",
            SpaceStream::Dlv => "dlv",
        }
    }

    /// The stream's name in `space`, e.g. `CHAT_main`.
    pub fn name(self, space: &Space) -> String {
        names::stream_name(self.prefix(), space)
    }
}

/// A stream's retention policy (`retention`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum RetentionPolicy {
    /// Keep until a limit evicts (`limits`).
    Limits,
    /// Keep while some consumer still has interest (`interest`).
    Interest,
    /// Remove on ack (`workqueue`).
    WorkQueue,
}

impl RetentionPolicy {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionPolicy::Limits => "limits",
            RetentionPolicy::Interest => "interest",
            RetentionPolicy::WorkQueue => "workqueue",
        }
    }
}

/// A stream's storage backend (`storage`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum StorageType {
    /// On disk (`file`).
    File,
    /// In memory (`memory`).
    Memory,
}

impl StorageType {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            StorageType::File => "file",
            StorageType::Memory => "memory",
        }
    }
}

/// What a full stream (or full subject) drops (`discard`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum DiscardPolicy {
    /// Evict the oldest message (`old`).
    Old,
    /// Refuse the new message (`new`).
    New,
}

impl DiscardPolicy {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            DiscardPolicy::Old => "old",
            DiscardPolicy::New => "new",
        }
    }
}

/// A consumer's ack policy (`ack_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum AckPolicy {
    /// No acks; delivered means done (`none`).
    None,
    /// An ack covers everything before it (`all`).
    All,
    /// Every message is acked on its own (`explicit`).
    Explicit,
}

impl AckPolicy {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            AckPolicy::None => "none",
            AckPolicy::All => "all",
            AckPolicy::Explicit => "explicit",
        }
    }
}

/// Where a new consumer starts (`deliver_policy`, plus `opt_start_seq` / `opt_start_time`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DeliverPolicy {
    /// From the first stored message (`all`).
    All,
    /// From the last stored message (`last`).
    Last,
    /// Only messages stored after creation (`new`).
    New,
    /// The last message of every subject (`last_per_subject`).
    LastPerSubject,
    /// From stream sequence `opt_start_seq` (`by_start_sequence`).
    ByStartSequence(u64),
    /// From the first message stored at or after this wall-clock time (`by_start_time`, with
    /// `opt_start_time` as the ISO-8601 UTC string JavaScript's `toISOString()` writes).
    ByStartTime(UnixMillis),
}

impl DeliverPolicy {
    /// The wire value of `deliver_policy`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliverPolicy::All => "all",
            DeliverPolicy::Last => "last",
            DeliverPolicy::New => "new",
            DeliverPolicy::LastPerSubject => "last_per_subject",
            DeliverPolicy::ByStartSequence(_) => "by_start_sequence",
            DeliverPolicy::ByStartTime(_) => "by_start_time",
        }
    }

    fn write_into(self, config: &mut Map<String, Value>) {
        config.insert("deliver_policy".into(), Value::from(self.as_str()));
        match self {
            DeliverPolicy::ByStartSequence(seq) => {
                config.insert("opt_start_seq".into(), Value::from(seq));
            }
            DeliverPolicy::ByStartTime(at) => {
                config.insert("opt_start_time".into(), Value::from(iso8601_utc_millis(at)));
            }
            _ => {}
        }
    }
}

/// A JetStream API request a driver sends: the subject and the JSON body.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ApiRequest {
    /// The `$JS.API.…` subject.
    pub subject: String,
    /// The request body.
    pub body: Value,
}

impl ApiRequest {
    /// The body as the bytes to publish (compact JSON).
    pub fn body_bytes(&self) -> Vec<u8> {
        // Serialising a `Value` cannot fail: every map key is a string.
        serde_json::to_vec(&self.body).unwrap_or_default()
    }
}

fn nanos(d: Duration) -> u64 {
    d.as_millis().saturating_mul(1_000_000)
}

/// One JetStream stream configuration.
///
/// `None` means "not sent": the server fills its default. The fields are those the reference sets
/// on any of the ten streams of a space; everything else stays at the server default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StreamSpec {
    /// Stream name (`CHAT_<space>`, `KV_<bucket>`, …).
    pub name: String,
    /// Captured subjects.
    pub subjects: Vec<String>,
    /// Retention policy.
    pub retention: RetentionPolicy,
    /// Storage backend.
    pub storage: StorageType,
    /// `max_msgs_per_subject` (server default −1, unlimited).
    pub max_msgs_per_subject: Option<i64>,
    /// `max_bytes` (server default −1).
    pub max_bytes: Option<i64>,
    /// `max_msg_size` (server default −1).
    pub max_msg_size: Option<i64>,
    /// `discard` (server default `old`).
    pub discard: Option<DiscardPolicy>,
    /// `duplicate_window` (server default 2 min, capped by `max_age`).
    pub duplicate_window: Option<Duration>,
    /// `max_age` (server default 0, forever); a KV bucket's TTL.
    pub max_age: Option<Duration>,
    /// `allow_direct` (server default false).
    pub allow_direct: Option<bool>,
    /// `allow_rollup_hdrs` (server default false).
    pub allow_rollup_hdrs: Option<bool>,
    /// `consumer_limits.inactive_threshold` (server default none): every consumer of the
    /// stream, durable or not, is deleted by the server once inactive this long, and a consumer
    /// asking for a longer threshold is refused (err 10153). See
    /// [`KvBucketSpec::consumer_inactive_limit`].
    pub consumer_inactive_limit: Option<Duration>,
    /// `num_replicas` (server default 1).
    pub num_replicas: Option<u32>,
    /// `max_consumers` (server default −1, which nats-server 2.15 caps at its
    /// `default_max_consumers`, 1,000): set from the space's
    /// [`ConsumerBudget`](crate::wire::capacity::ConsumerBudget) on every stream that carries
    /// per-agent consumers (issue 22).
    pub max_consumers: Option<i64>,
}

impl StreamSpec {
    /// A stream with only name, subjects, retention and storage set.
    fn base(name: String, subject: String, retention: RetentionPolicy) -> Self {
        StreamSpec {
            name,
            subjects: vec![subject],
            retention,
            storage: StorageType::File,
            max_msgs_per_subject: None,
            max_bytes: None,
            max_msg_size: None,
            discard: None,
            duplicate_window: None,
            max_age: None,
            allow_direct: None,
            allow_rollup_hdrs: None,
            consumer_inactive_limit: None,
            num_replicas: None,
            max_consumers: None,
        }
    }

    /// One of the five space streams, as `STRM:createSpaceStreams` creates it (semantics §1.4).
    ///
    /// - CHAT: limits, file, 1000 per subject, discard old, `allow_direct`; dedup window left at
    ///   the server default (2 min).
    /// - DM: limits, file; everything else default.
    /// - TASK: work queue, file; everything else default.
    /// - INBOX and DLV: limits, file, 1000 per owner subject, discard old, dedup window 2 h.
    pub fn for_space(space: &Space, stream: SpaceStream) -> Self {
        let subject = names::space_subject(space, &format!("{}.>", stream.subject_kind()));
        let name = stream.name(space);
        match stream {
            SpaceStream::Chat => StreamSpec {
                max_msgs_per_subject: Some(MAX_MSGS_PER_SUBJECT),
                discard: Some(DiscardPolicy::Old),
                allow_direct: Some(true),
                ..StreamSpec::base(name, subject, RetentionPolicy::Limits)
            },
            SpaceStream::Dm => StreamSpec::base(name, subject, RetentionPolicy::Limits),
            SpaceStream::Task => StreamSpec::base(name, subject, RetentionPolicy::WorkQueue),
            SpaceStream::Inbox | SpaceStream::Dlv => StreamSpec {
                max_msgs_per_subject: Some(MAX_MSGS_PER_SUBJECT),
                discard: Some(DiscardPolicy::Old),
                duplicate_window: Some(PLANE3_DEDUP_WINDOW),
                ..StreamSpec::base(name, subject, RetentionPolicy::Limits)
            },
        }
    }

    /// The stream's config object as the JetStream API spells it (durations in nanoseconds;
    /// unset fields omitted).
    pub fn to_api_config(&self) -> Value {
        let mut c = Map::new();
        c.insert("name".into(), Value::from(self.name.as_str()));
        c.insert("subjects".into(), Value::from(self.subjects.clone()));
        c.insert("retention".into(), Value::from(self.retention.as_str()));
        c.insert("storage".into(), Value::from(self.storage.as_str()));
        let ints = [
            ("max_msgs_per_subject", self.max_msgs_per_subject),
            ("max_bytes", self.max_bytes),
            ("max_msg_size", self.max_msg_size),
            ("max_consumers", self.max_consumers),
        ];
        for (key, v) in ints {
            if let Some(v) = v {
                c.insert(key.into(), Value::from(v));
            }
        }
        if let Some(d) = self.discard {
            c.insert("discard".into(), Value::from(d.as_str()));
        }
        for (key, v) in [
            ("duplicate_window", self.duplicate_window),
            ("max_age", self.max_age),
        ] {
            if let Some(v) = v {
                c.insert(key.into(), Value::from(nanos(v)));
            }
        }
        let flags = [
            ("allow_direct", self.allow_direct),
            ("allow_rollup_hdrs", self.allow_rollup_hdrs),
        ];
        for (key, v) in flags {
            if let Some(v) = v {
                c.insert(key.into(), Value::from(v));
            }
        }
        if let Some(d) = self.consumer_inactive_limit {
            c.insert(
                "consumer_limits".into(),
                json!({ "inactive_threshold": nanos(d) }),
            );
        }
        if let Some(n) = self.num_replicas {
            c.insert("num_replicas".into(), Value::from(n));
        }
        Value::Object(c)
    }

    /// `$JS.API.STREAM.CREATE.<name>` with the config as body.
    pub fn create_request(&self) -> ApiRequest {
        ApiRequest {
            subject: format!("$JS.API.STREAM.CREATE.{}", self.name),
            body: self.to_api_config(),
        }
    }

    /// `$JS.API.STREAM.INFO.<name>`.
    pub fn info_subject(&self) -> String {
        format!("$JS.API.STREAM.INFO.{}", self.name)
    }
}

/// One KV bucket (semantics §1.6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KvBucketSpec {
    /// The bucket name, e.g. `cotal_presence_main`.
    pub bucket: String,
    /// Revisions kept per key (`max_msgs_per_subject` of the backing stream); 1 for every Cotal
    /// bucket.
    pub history: i64,
    /// Bucket-wide TTL (`max_age`), if any.
    pub ttl: Option<Duration>,
    /// The backing stream's `max_consumers`, if set
    /// ([`ConsumerBudget::space_config`](crate::wire::capacity::ConsumerBudget::space_config));
    /// `None` leaves the
    /// server's default, as the reference does.
    pub max_consumers: Option<i64>,
}

impl KvBucketSpec {
    /// One of the five space buckets as `STRM:setupSpaceStreams` creates it: history 1, presence
    /// with TTL 6 s (`PRESENCE_TTL_MS`), delivery with TTL 30 s (`LEASE_TTL_MS`), the others
    /// without TTL.
    pub fn for_space(space: &Space, bucket: KvBucket) -> Self {
        let ttl = match bucket {
            KvBucket::Presence => Some(PRESENCE_TTL),
            KvBucket::Delivery => Some(LEASE_TTL),
            KvBucket::Channels | KvBucket::Members | KvBucket::Acl | KvBucket::Losses => None,
        };
        KvBucketSpec {
            bucket: bucket.name(space),
            history: 1,
            ttl,
            max_consumers: None,
        }
    }

    /// The presence bucket with another TTL: open mode creates it with the endpoint's `ttlMs`.
    pub fn presence_with_ttl(space: &Space, ttl: Duration) -> Self {
        KvBucketSpec {
            ttl: Some(ttl),
            ..KvBucketSpec::for_space(space, KvBucket::Presence)
        }
    }

    /// The stream `KV_<bucket>` that holds the bucket, with the fields the reference's nats.js
    /// client sends: subjects `$KV.<bucket>.>`, limits, file, `max_msgs_per_subject = history`,
    /// `max_bytes`/`max_msg_size` −1, discard new, `allow_direct`, `allow_rollup_hdrs`, one
    /// replica, and `max_age` = TTL when set. `deny_delete`/`deny_purge` stay at the server
    /// default (false), which is what the reference's buckets hold.
    ///
    /// One deliberate difference: the presence bucket refuses rollup headers
    /// ([`KvBucketSpec::allows_rollup`]).
    pub fn stream(&self) -> StreamSpec {
        StreamSpec {
            name: kv_stream_name(&self.bucket),
            subjects: vec![format!("$KV.{}.>", self.bucket)],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            max_msgs_per_subject: Some(self.history),
            max_bytes: Some(-1),
            max_msg_size: Some(-1),
            discard: Some(DiscardPolicy::New),
            duplicate_window: None,
            max_age: self.ttl,
            allow_direct: Some(true),
            allow_rollup_hdrs: Some(self.allows_rollup()),
            consumer_inactive_limit: self.consumer_inactive_limit(),
            num_replicas: Some(1),
            max_consumers: self.max_consumers,
        }
    }

    /// Whether the bucket's stream admits `Nats-Rollup` headers: every bucket but presence, as
    /// the reference's nats.js buckets do (issue 21 item 3).
    ///
    /// Every agent may write its own presence key, and a publish grant cannot restrict headers:
    /// with rollups allowed, one `Nats-Rollup: all` on one's own key deletes every other agent's
    /// presence record. No Cotal agent (ours or the reference's) purges a presence key — they
    /// put, and the TTL expires — and a KV delete is a `KV-Operation: DEL` marker without a
    /// rollup, which still works; only `purge` (a `Nats-Rollup: sub`) is refused. The other
    /// buckets are written only by the daemon and the operator, who keep the reference's setting.
    pub fn allows_rollup(&self) -> bool {
        !self.bucket.starts_with(KvBucket::Presence.prefix())
    }

    /// The bound on the inactivity of every consumer of the bucket's stream
    /// ([`WATCH_CONSUMER_INACTIVE_LIMIT`]) for the two buckets agents may create consumers on to
    /// watch them, presence and channels; `None` for the others (issue 21 item 4).
    ///
    /// An agent's grant must admit `CONSUMER.CREATE.<stream>.<name>.<filter>`, the form both
    /// async-nats's and nats.js's KV watch use, and that form also creates durables (the body
    /// decides; nats-server 2.15 refuses a durable only on the bare `CONSUMER.CREATE.<stream>`
    /// form, which no watch uses). A stream-wide inactive limit is what the broker can enforce:
    /// any consumer an agent creates there — durable included — is deleted once nothing consumes
    /// from it, so none outlives its creator's use of it. Their number is bounded by the stream's
    /// consumer cap (the server's 1,000 default; sizing it for larger spaces is issue 22).
    pub fn consumer_inactive_limit(&self) -> Option<Duration> {
        let watched = [KvBucket::Presence, KvBucket::Channels];
        watched
            .iter()
            .any(|b| self.bucket.starts_with(b.prefix()))
            .then_some(WATCH_CONSUMER_INACTIVE_LIMIT)
    }

    /// The KV put subject of `key`: `$KV.<bucket>.<key>`.
    pub fn key_subject(&self, key: &str) -> String {
        format!("$KV.{}.{key}", self.bucket)
    }
}

/// Whether a consumer is named as a durable (`durable_name`) or as an ephemeral (`name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Durability {
    /// Survives without clients; sent as `durable_name`.
    Durable,
    /// A named ephemeral; sent as `name`, removed by the server after `inactive_threshold`.
    Ephemeral,
}

/// One consumer configuration (semantics §1.5).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConsumerSpec {
    /// The stream the consumer reads.
    pub stream: String,
    /// The consumer name.
    pub name: String,
    /// Durable or named ephemeral.
    pub durability: Durability,
    /// The single `filter_subject`.
    pub filter_subject: String,
    /// `ack_policy`.
    pub ack_policy: AckPolicy,
    /// `ack_wait`, if sent.
    pub ack_wait: Option<Duration>,
    /// `deliver_policy` (and its start option), if sent; the server default is `all`.
    pub deliver_policy: Option<DeliverPolicy>,
    /// `max_ack_pending`, if sent (server default 1000).
    pub max_ack_pending: Option<i64>,
    /// `mem_storage: true` when set; omitted otherwise.
    pub mem_storage: bool,
    /// `inactive_threshold`, if sent.
    pub inactive_threshold: Option<Duration>,
}

impl ConsumerSpec {
    fn durable_pull(stream: String, name: String, filter: String) -> Self {
        ConsumerSpec {
            stream,
            name,
            durability: Durability::Durable,
            filter_subject: filter,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Some(DEFAULT_ACK_WAIT),
            deliver_policy: Some(DeliverPolicy::All),
            max_ack_pending: None,
            mem_storage: false,
            inactive_threshold: None,
        }
    }

    fn history_reader(stream: String, name: String, filter: String, start: DeliverPolicy) -> Self {
        ConsumerSpec {
            stream,
            name,
            durability: Durability::Ephemeral,
            filter_subject: filter,
            ack_policy: AckPolicy::None,
            ack_wait: None,
            deliver_policy: Some(start),
            max_ack_pending: None,
            mem_storage: true,
            inactive_threshold: Some(HISTORY_INACTIVE_THRESHOLD),
        }
    }

    /// The daemon's fan-out durable on CHAT (`STRM:fanoutDurableConfig`): name `fanout` when
    /// `shards <= 1`, else `fanout_<shard>`; filter `cotal.<space>.chat.>`, explicit ack,
    /// `ack_wait` 60 s, deliver `new` (backlog older than the consumer is pre-membership).
    pub fn fanout(space: &Space, shard: u32, shards: u32) -> Self {
        ConsumerSpec {
            deliver_policy: Some(DeliverPolicy::New),
            ..ConsumerSpec::durable_pull(
                SpaceStream::Chat.name(space),
                fanout_durable(shard, shards),
                chat_wildcard(space),
            )
        }
    }

    /// The daemon's trusted reader on INBOX (`STRM:inboxReaderConfig`): name `reader` when
    /// `shards <= 1`, else `reader_<shard>`; filter `cotal.<space>.dinbox.>` (all owners),
    /// explicit ack, 60 s, deliver `all`, `max_ack_pending` 1000 (consumer-wide, gap G5).
    pub fn reader(space: &Space, shard: u32, shards: u32) -> Self {
        ConsumerSpec {
            max_ack_pending: Some(DINBOX_MAX_ACK_PENDING),
            ..ConsumerSpec::durable_pull(
                SpaceStream::Inbox.name(space),
                reader_durable(shard, shards),
                dinbox_wildcard(space),
            )
        }
    }

    /// An agent's post-auth handoff durable `dlv_<id>` on DLV (`STRM:dlvDurableConfig`), created
    /// by the provisioner: filter `cotal.<space>.dlv.<id>`, explicit ack, 60 s, deliver `all`.
    pub fn dlv(space: &Space, owner: &AgentId) -> Self {
        ConsumerSpec::durable_pull(
            SpaceStream::Dlv.name(space),
            names::per_agent_consumer("dlv", owner),
            names::space_subject(space, &format!("dlv.{}", route_token(owner.as_str()))),
        )
    }

    /// An agent's DM durable `dm_<id>` on DM (`STRM:dmDurableConfig`): filter
    /// `cotal.<space>.inst.<id>.*`, explicit ack, 60 s, deliver `all`. Open-mode self-creation adds
    /// an `inactive_threshold` (see [`ConsumerSpec::with_inactive_threshold`]).
    pub fn dm(space: &Space, id: &AgentId) -> Self {
        ConsumerSpec::durable_pull(
            SpaceStream::Dm.name(space),
            names::per_agent_consumer("dm", id),
            unicast_inbox_pattern(space, id),
        )
    }

    /// A role's anycast durable `svc_<role>` on TASK (`STRM:taskDurableConfig`): filter
    /// `cotal.<space>.svc.<role>.*`, explicit ack, 60 s. The reference sends no `deliver_policy`
    /// here (the server default is `all`).
    pub fn svc(space: &Space, role: &Role) -> Self {
        ConsumerSpec {
            deliver_policy: None,
            ..ConsumerSpec::durable_pull(
                SpaceStream::Task.name(space),
                format!("svc_{role}"),
                anycast_role_pattern(space, role),
            )
        }
    }

    /// An agent's history reader `chathist_<id>` on CHAT (`EP:collectHistoryInner`): a named
    /// ephemeral with the **single** filter `cotal.<space>.chat.*.<channel>` (the agent's create
    /// grant pins exactly this subject), no acks, memory storage, `inactive_threshold` 30 s,
    /// starting at `start` (by sequence or by time).
    pub fn chathist(space: &Space, id: &AgentId, channel: &Channel, start: DeliverPolicy) -> Self {
        ConsumerSpec::history_reader(
            SpaceStream::Chat.name(space),
            names::per_agent_consumer("chathist", id),
            chat_subscribe_pattern(space, channel),
            start,
        )
    }

    /// The daemon's activation catch-up reader `cu_<owner>_<generation>` on CHAT
    /// (`EP:catchupCopy`): the `chathist` shape, starting at sequence `join_cursor + 1`.
    pub fn catchup(
        space: &Space,
        owner: &AgentId,
        generation: u64,
        channel: &ConcreteChannel,
        join_cursor: u64,
    ) -> Self {
        ConsumerSpec::history_reader(
            SpaceStream::Chat.name(space),
            format!("cu_{}_{generation}", route_token(owner.as_str())),
            chat_subscribe_pattern(space, &channel.as_channel()),
            DeliverPolicy::ByStartSequence(join_cursor.saturating_add(1)),
        )
    }

    /// The same consumer with another `ack_wait` (the endpoint's `ackWaitMs` option).
    pub fn with_ack_wait(self, ack_wait: Duration) -> Self {
        ConsumerSpec {
            ack_wait: Some(ack_wait),
            ..self
        }
    }

    /// The same consumer with an `inactive_threshold` (open-mode `dm_` self-creation uses the
    /// endpoint's `inactiveThresholdMs`, default 600 s).
    pub fn with_inactive_threshold(self, threshold: Duration) -> Self {
        ConsumerSpec {
            inactive_threshold: Some(threshold),
            ..self
        }
    }

    /// The consumer's config object as the JetStream API spells it (durations in nanoseconds;
    /// unset fields omitted).
    pub fn to_api_config(&self) -> Value {
        let mut c = Map::new();
        let name_key = match self.durability {
            Durability::Durable => "durable_name",
            Durability::Ephemeral => "name",
        };
        c.insert(name_key.into(), Value::from(self.name.as_str()));
        c.insert(
            "filter_subject".into(),
            Value::from(self.filter_subject.as_str()),
        );
        c.insert("ack_policy".into(), Value::from(self.ack_policy.as_str()));
        if self.mem_storage {
            c.insert("mem_storage".into(), Value::from(true));
        }
        if let Some(t) = self.inactive_threshold {
            c.insert("inactive_threshold".into(), Value::from(nanos(t)));
        }
        if let Some(w) = self.ack_wait {
            c.insert("ack_wait".into(), Value::from(nanos(w)));
        }
        if let Some(p) = self.deliver_policy {
            p.write_into(&mut c);
        }
        if let Some(n) = self.max_ack_pending {
            c.insert("max_ack_pending".into(), Value::from(n));
        }
        Value::Object(c)
    }

    /// `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>` with the body
    /// `{"config": …, "stream_name": …, "action": "create", "pedantic": false}`, as nats.js sends
    /// it. Action `create` fails on an existing consumer with a different config.
    pub fn create_request(&self) -> ApiRequest {
        ApiRequest {
            subject: format!(
                "$JS.API.CONSUMER.CREATE.{}.{}.{}",
                self.stream, self.name, self.filter_subject
            ),
            body: json!({
                "config": self.to_api_config(),
                "stream_name": self.stream,
                "action": "create",
                "pedantic": false,
            }),
        }
    }

    /// `$JS.API.CONSUMER.INFO.<stream>.<name>`.
    pub fn info_subject(&self) -> String {
        format!("$JS.API.CONSUMER.INFO.{}.{}", self.stream, self.name)
    }

    /// `$JS.API.CONSUMER.MSG.NEXT.<stream>.<name>` (pull requests).
    pub fn next_subject(&self) -> String {
        format!("$JS.API.CONSUMER.MSG.NEXT.{}.{}", self.stream, self.name)
    }

    /// `$JS.API.CONSUMER.DELETE.<stream>.<name>`.
    pub fn delete_subject(&self) -> String {
        format!("$JS.API.CONSUMER.DELETE.{}.{}", self.stream, self.name)
    }

    /// `$JS.ACK.<stream>.<name>.>`: the pattern every ack reply subject of this consumer matches.
    pub fn ack_pattern(&self) -> String {
        format!("$JS.ACK.{}.{}.>", self.stream, self.name)
    }
}

/// Everything `cotal up` provisions for a space, in creation order: the five streams, then the
/// five KV buckets (semantics §1.4, §1.6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SpaceConfig {
    /// CHAT, DM, TASK, INBOX, DLV.
    pub streams: Vec<StreamSpec>,
    /// presence, channels, members, acl, delivery.
    pub kv_buckets: Vec<KvBucketSpec>,
}

impl SpaceConfig {
    /// The streams and buckets of `space` as the reference creates them (no consumer caps:
    /// `cotal up` sizes them with
    /// [`ConsumerBudget::space_config`](crate::wire::capacity::ConsumerBudget::space_config)).
    pub fn new(space: &Space) -> Self {
        SpaceConfig {
            streams: SpaceStream::ALL
                .iter()
                .map(|s| StreamSpec::for_space(space, *s))
                .collect(),
            kv_buckets: KvBucket::ALL
                .iter()
                .map(|b| KvBucketSpec::for_space(space, *b))
                .collect(),
        }
    }

    /// The `STREAM.CREATE` requests, streams first, then the KV streams, in creation order.
    pub fn create_requests(&self) -> Vec<ApiRequest> {
        self.streams
            .iter()
            .cloned()
            .chain(self.kv_buckets.iter().map(KvBucketSpec::stream))
            .map(|s| s.create_request())
            .collect()
    }
}

/// Formats `at` as JavaScript's `Date.prototype.toISOString()` does: `YYYY-MM-DDTHH:MM:SS.mmmZ`
/// (years past 9999 in the extended `+YYYYYY` form).
fn iso8601_utc_millis(at: UnixMillis) -> String {
    const MS_PER_DAY: u64 = 86_400_000;
    let days = at.0 / MS_PER_DAY;
    let ms_of_day = at.0 % MS_PER_DAY;
    let (year, month, day) = civil_from_days(days);
    let (h, m, s, ms) = (
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000,
    );
    let year = if year > 9999 {
        format!("+{year:06}")
    } else {
        format!("{year:04}")
    };
    format!("{year}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

/// Proleptic Gregorian (year, month, day) of `days` days after 1970-01-01, counting in 400-year
/// eras of 146 097 days that start on 1 March, so the leap day falls at the end of an era year.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01, a multiple of whole eras before 1970-01-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Open mode creates the presence bucket with the endpoint's own TTL (mutation survivor of
    /// issue 16: deleting the override left the default 6 s and no test saw it).
    #[test]
    fn the_presence_bucket_takes_the_ttl_it_is_given() {
        let space = Space::new("s").unwrap();
        let ttl = Duration::from_millis(15_000);
        let spec = KvBucketSpec::presence_with_ttl(&space, ttl);
        let default = KvBucketSpec::for_space(&space, KvBucket::Presence);
        assert_eq!(spec.ttl, Some(ttl));
        assert_ne!(default.ttl, Some(ttl));
        assert_eq!(
            (spec.bucket, spec.history),
            (default.bucket, default.history)
        );
    }

    fn space() -> Space {
        Space::new("main").unwrap()
    }

    fn alice() -> AgentId {
        AgentId::new("UAQGWOEVJKMIO4WXSYOTLARXYOZTCXFK67JASEH6AFFFYK6FOPSKQCAD").unwrap()
    }

    #[test]
    fn iso_format_matches_javascript_to_iso_string() {
        assert_eq!(
            iso8601_utc_millis(UnixMillis(0)),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            iso8601_utc_millis(UnixMillis(951_868_799_999)),
            "2000-02-29T23:59:59.999Z"
        );
        assert_eq!(
            iso8601_utc_millis(UnixMillis(951_868_800_000)),
            "2000-03-01T00:00:00.000Z"
        );
        assert_eq!(
            iso8601_utc_millis(UnixMillis(1_795_289_833_349)),
            "2026-11-21T19:37:13.349Z"
        );
        // 1900 is not a leap year, 2100 neither; 2024-12-31 is day 366 of a leap year.
        assert_eq!(
            iso8601_utc_millis(UnixMillis(4_107_542_400_000)),
            "2100-03-01T00:00:00.000Z"
        );
        assert_eq!(
            iso8601_utc_millis(UnixMillis(1_735_603_200_000)),
            "2024-12-31T00:00:00.000Z"
        );
        // JavaScript's largest date, and a value past it: no panic, extended year.
        assert_eq!(
            iso8601_utc_millis(UnixMillis(8_640_000_000_000_000)),
            "+275760-09-13T00:00:00.000Z"
        );
        assert!(iso8601_utc_millis(UnixMillis(u64::MAX)).starts_with('+'));
    }

    #[test]
    fn civil_dates_agree_with_day_counting() {
        // Walk 1970..2401 day by day and check the calendar advances one day at a time.
        let mut prev = civil_from_days(0);
        assert_eq!(prev, (1970, 1, 1));
        for d in 1..(431 * 366) {
            let cur = civil_from_days(d);
            let leap =
                |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
            let month_len = |y: u64, m: u64| match m {
                2 if leap(y) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            let expected = if prev.2 < month_len(prev.0, prev.1) {
                (prev.0, prev.1, prev.2 + 1)
            } else if prev.1 < 12 {
                (prev.0, prev.1 + 1, 1)
            } else {
                (prev.0 + 1, 1, 1)
            };
            assert_eq!(cur, expected, "day {d}");
            prev = cur;
        }
    }

    #[test]
    fn chat_stream_is_limits_file_capped_and_direct() {
        let s = StreamSpec::for_space(&space(), SpaceStream::Chat);
        assert_eq!(
            s.create_request(),
            ApiRequest {
                subject: "$JS.API.STREAM.CREATE.CHAT_main".into(),
                body: json!({
                    "name": "CHAT_main", "subjects": ["cotal.main.chat.>"], "retention": "limits",
                    "storage": "file", "max_msgs_per_subject": 1000, "discard": "old",
                    "allow_direct": true
                }),
            }
        );
    }

    #[test]
    fn plane3_streams_carry_the_two_hour_dedup_window() {
        for kind in [SpaceStream::Inbox, SpaceStream::Dlv] {
            let s = StreamSpec::for_space(&space(), kind);
            assert_eq!(
                s.to_api_config()["duplicate_window"],
                json!(7_200_000_000_000u64)
            );
            assert_eq!(s.allow_direct, None, "no Direct Get on {}", s.name);
        }
        let task = StreamSpec::for_space(&space(), SpaceStream::Task);
        assert_eq!(task.retention, RetentionPolicy::WorkQueue);
        assert_eq!(task.to_api_config()["retention"], json!("workqueue"));
    }

    #[test]
    fn kv_streams_follow_bucket_ttls() {
        let cfg = SpaceConfig::new(&space());
        let ages: Vec<Option<u64>> = cfg
            .kv_buckets
            .iter()
            .map(|b| b.stream().max_age.map(Duration::as_millis))
            .collect();
        assert_eq!(ages, vec![Some(6000), None, None, None, Some(30_000)]);
        let presence = cfg.kv_buckets[0].stream();
        assert_eq!(presence.name, "KV_cotal_presence_main");
        assert_eq!(
            presence.subjects,
            vec!["$KV.cotal_presence_main.>".to_owned()]
        );
        assert_eq!(presence.to_api_config()["max_age"], json!(6_000_000_000u64));
        assert_eq!(
            cfg.kv_buckets[4].key_subject("lease.0"),
            "$KV.cotal_delivery_main.lease.0"
        );
        assert_eq!(cfg.create_requests().len(), 10);
    }

    #[test]
    fn durable_names_and_filters() {
        let s = space();
        let a = alice();
        let id = a.as_str();
        assert_eq!(ConsumerSpec::fanout(&s, 0, 1).name, "fanout");
        assert_eq!(ConsumerSpec::fanout(&s, 0, 2).name, "fanout_0");
        assert_eq!(ConsumerSpec::reader(&s, 3, 4).name, "reader_3");
        assert_eq!(ConsumerSpec::reader(&s, 0, 0).name, "reader");
        let dm = ConsumerSpec::dm(&s, &a);
        assert_eq!(dm.name, format!("dm_{id}"));
        assert_eq!(dm.filter_subject, format!("cotal.main.inst.{id}.*"));
        assert_eq!(
            dm.create_request().subject,
            format!("$JS.API.CONSUMER.CREATE.DM_main.dm_{id}.cotal.main.inst.{id}.*")
        );
        let dlv = ConsumerSpec::dlv(&s, &a);
        assert_eq!(dlv.filter_subject, format!("cotal.main.dlv.{id}"));
        assert_eq!(dlv.ack_pattern(), format!("$JS.ACK.DLV_main.dlv_{id}.>"));
        let svc = ConsumerSpec::svc(&s, &Role::new("reviewer").unwrap());
        assert_eq!(svc.filter_subject, "cotal.main.svc.reviewer.*");
        assert!(svc.to_api_config().get("deliver_policy").is_none());
    }

    #[test]
    fn history_readers_are_single_filter_memory_ephemerals() {
        let s = space();
        let general = Channel::new("team.*").unwrap();
        let by_time = DeliverPolicy::ByStartTime(UnixMillis(1_795_289_833_349));
        let c = ConsumerSpec::chathist(&s, &alice(), &general, by_time);
        assert_eq!(
            c.to_api_config(),
            json!({
                "name": format!("chathist_{}", alice()),
                "filter_subject": "cotal.main.chat.*.team.*",
                "ack_policy": "none", "mem_storage": true, "inactive_threshold": 30_000_000_000u64,
                "deliver_policy": "by_start_time", "opt_start_time": "2026-11-21T19:37:13.349Z"
            })
        );
        let ch = ConcreteChannel::new("review").unwrap();
        let cu = ConsumerSpec::catchup(&s, &alice(), 2, &ch, 21);
        assert_eq!(cu.name, format!("cu_{}_2", alice()));
        assert_eq!(cu.deliver_policy, Some(DeliverPolicy::ByStartSequence(22)));
        assert_eq!(cu.to_api_config()["opt_start_seq"], json!(22));
        let end = ConsumerSpec::catchup(&s, &alice(), 1, &ch, u64::MAX);
        assert_eq!(
            end.deliver_policy,
            Some(DeliverPolicy::ByStartSequence(u64::MAX))
        );
    }

    #[test]
    fn option_overrides_and_body_bytes() {
        let dm = ConsumerSpec::dm(&space(), &alice())
            .with_inactive_threshold(Duration::from_millis(600_000))
            .with_ack_wait(Duration::from_secs(5));
        let cfg = dm.to_api_config();
        assert_eq!(cfg["inactive_threshold"], json!(600_000_000_000u64));
        assert_eq!(cfg["ack_wait"], json!(5_000_000_000u64));
        let req = dm.create_request();
        let back: Value = serde_json::from_slice(&req.body_bytes()).unwrap();
        assert_eq!(back, req.body);
        assert_eq!(back["action"], json!("create"));
        assert_eq!(back["stream_name"], json!("DM_main"));
        assert_eq!(nanos(Duration::from_millis(u64::MAX)), u64::MAX);
    }
}
