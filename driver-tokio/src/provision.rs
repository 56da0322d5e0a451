//! Provisioning a space: its five streams, five KV buckets and the delivery daemon's consumers
//! (`cotal up`, semantics §1.4–1.6).
//!
//! Every object comes from the core's data ([`StreamSpec::create_request`],
//! [`KvBucketSpec::stream`], [`ConsumerSpec::create_request`]); the exact request bytes are sent
//! as they are, so a space provisioned here is the one the reference creates (a KV bucket is its
//! `KV_<bucket>` stream, created with the reference's fields, never through a client library's KV
//! helper).
//!
//! Rules:
//!
//! - **Idempotent.** Each object is looked up first (`STREAM.INFO` / `CONSUMER.INFO`). Missing:
//!   created ([`Applied::Created`]). Present with every field the spec sets equal:
//!   [`Applied::Unchanged`], and nothing is sent. Present but different: reported as
//!   [`ProvisionError::Drift`] with the differing fields, and **not** changed (a stream or
//!   consumer in use is not reconfigured behind its users' backs) — except a stream whose only
//!   differences are security settings its users never depend on
//!   ([`MIGRATED_STREAM_FIELDS`]): it is updated in place ([`Applied::Updated`]), so `cotal up`
//!   closes a hole in a space provisioned before the fix.
//! - **Per object.** A failure is recorded for that object and the run goes on; the report says
//!   which objects failed and why.

use crate::api::{self, ApiError};
use async_nats::Client;
use bytes::Bytes;
use cotal_core::policy::{ChannelDefaults, DeliveryClass};
use cotal_core::wire::capacity::{ConsumerBudget, Headroom};
use cotal_core::wire::config::{ApiRequest, ConsumerSpec, KvBucketSpec, StreamSpec};
use cotal_core::wire::keys::{CHANNEL_DEFAULTS_KEY, KvBucket};
use cotal_core::wire::permissions::Permissions;
use cotal_core::wire::token::Space;
use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// What kind of object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    /// A JetStream stream.
    Stream,
    /// A KV bucket (its `KV_<bucket>` stream).
    KvBucket,
    /// A consumer (`<stream>/<name>`).
    Consumer,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Stream => "stream",
            ObjectKind::KvBucket => "kv bucket",
            ObjectKind::Consumer => "consumer",
        })
    }
}

/// What was done to an object that is now as specified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// It did not exist and was created.
    Created,
    /// It existed with the specified configuration; nothing was sent.
    Unchanged,
    /// It existed and differed only in [`MIGRATED_STREAM_FIELDS`]; it was updated in place.
    Updated,
}

/// Stream fields `cotal up` brings to the spec in place on an existing stream (`STREAM.UPDATE`):
/// hardening no client of the space relies on. `allow_rollup_hdrs` closes the presence bucket's
/// rollup purge (issue 21 item 3): a bucket made by an older `cotal up`, or by a reference agent
/// in open mode, allows rollups.
/// `consumer_limits` bounds the life of consumers agents create on the presence and channels
/// buckets (issue 21 item 4; the server adds it to an existing stream, and it applies to
/// consumers created after it).
/// `max_consumers` is the space's consumer cap (issue 22): raised on a space provisioned
/// before it (−1: the server's 1,000), and set by `cotal up --max-agents` (lowering keeps the
/// consumers there and refuses new ones until the count falls under it).
pub const MIGRATED_STREAM_FIELDS: &[&str] =
    &["allow_rollup_hdrs", "consumer_limits", "max_consumers"];

/// Why an object could not be brought to its specification.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProvisionError {
    /// It exists with another configuration (left as it is).
    #[error("exists with a different configuration: {}", .0.join("; "))]
    Drift(Vec<String>),
    /// The server refused or failed the request.
    #[error("{0}")]
    Api(ApiError),
    /// A stream has no room for another consumer: the space holds as many agents as its
    /// consumer caps were sized for (`cotal up --max-agents`), or the server's default cap
    /// applies to a stream `cotal up` never sized.
    #[error("{}", full_message(space, stream, headroom))]
    Full {
        /// The space.
        space: String,
        /// The full stream.
        stream: String,
        /// Its room, as the server reported it (or as the refusal implies).
        headroom: Headroom,
    },
}

fn full_message(space: &str, stream: &str, h: &Headroom) -> String {
    let cap = if h.server_default {
        format!(
            "the server's default cap ({} on nats-server 2.15: `cotal up` never sized this stream)",
            h.cap
        )
    } else {
        format!("its cap of {}, sized by `cotal up --max-agents`", h.cap)
    };
    format!(
        "stream {stream} is full: {} consumers under {cap}; the space admits no more agents \
         until it is raised: `cotal up --space {space} --max-agents <more>`",
        h.consumers
    )
}

/// Checks that each stream `specs` would add a consumer to has room for it (`STREAM.INFO`): a
/// consumer that already exists needs none. Errors with [`ProvisionError::Full`] naming the
/// first full stream, before anything is written; a consumer create refused with
/// [`api::MAX_CONSUMERS_REACHED`] later (a race) is mapped to the same error by
/// [`full_on_refusal`].
pub async fn check_room(
    client: &Client,
    space: &Space,
    specs: &[ConsumerSpec],
    timeout: Duration,
) -> Result<(), ProvisionError> {
    let mut needed: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
    for spec in specs {
        match api::request(client, &spec.info_subject(), Bytes::new(), timeout).await {
            Ok(_) => {}
            Err(e) if e.err_code() == Some(api::CONSUMER_NOT_FOUND) => {
                *needed.entry(spec.stream.as_str()).or_default() += 1;
            }
            Err(e) => return Err(ProvisionError::Api(e)),
        }
    }
    for (stream, n) in needed {
        let headroom = stream_headroom(client, stream, timeout)
            .await
            .map_err(ProvisionError::Api)?;
        if !headroom.admits(n) {
            return Err(ProvisionError::Full {
                space: space.as_str().to_owned(),
                stream: stream.to_owned(),
                headroom,
            });
        }
    }
    Ok(())
}

/// The consumer headroom of every stream of `space` (the five space streams, then each bucket's),
/// from `STREAM.INFO`: `cotal health` reports the streams whose [`Headroom::is_low`].
pub async fn space_headroom(
    client: &Client,
    space: &Space,
    timeout: Duration,
) -> Vec<(String, Result<Headroom, ApiError>)> {
    let plan = SpacePlan::new(space);
    let names: Vec<String> = plan
        .streams
        .iter()
        .map(|s| s.name.clone())
        .chain(plan.kv_buckets.iter().map(|b| b.stream().name))
        .collect();
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let headroom = stream_headroom(client, &name, timeout).await;
        out.push((name, headroom));
    }
    out
}

/// The consumer headroom of `stream` (`STREAM.INFO`: `state.consumer_count` under
/// `config.max_consumers`, judged by [`Headroom::judge`]).
pub async fn stream_headroom(
    client: &Client,
    stream: &str,
    timeout: Duration,
) -> Result<Headroom, ApiError> {
    let info = api::request(
        client,
        &format!("$JS.API.STREAM.INFO.{stream}"),
        Bytes::new(),
        timeout,
    )
    .await?;
    Ok(Headroom::judge(
        info["state"]["consumer_count"].as_u64().unwrap_or(0),
        info["config"]["max_consumers"].as_i64().unwrap_or(-1),
    ))
}

/// `e` as [`ProvisionError::Full`] when it is the server's max-consumers refusal of a create on
/// `stream`; the headroom is read again for the message when it can be.
pub async fn full_on_refusal(
    client: &Client,
    space: &Space,
    stream: &str,
    e: ProvisionError,
    timeout: Duration,
) -> ProvisionError {
    let ProvisionError::Api(api_error) = &e else {
        return e;
    };
    if api_error.err_code() != Some(api::MAX_CONSUMERS_REACHED) {
        return e;
    }
    // The refusal says the stream is full; when its state cannot be read, the server's default
    // cap is the best guess of what it holds.
    let headroom = stream_headroom(client, stream, timeout)
        .await
        .unwrap_or_else(|_| {
            let h = Headroom::judge(0, -1);
            Headroom {
                consumers: h.cap,
                ..h
            }
        });
    ProvisionError::Full {
        space: space.as_str().to_owned(),
        stream: stream.to_owned(),
        headroom,
    }
}

/// The result for one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectReport {
    /// Kind.
    pub kind: ObjectKind,
    /// Name (`CHAT_main`, `cotal_presence_main`, `CHAT_main/fanout`).
    pub name: String,
    /// What happened.
    pub result: Result<Applied, ProvisionError>,
}

impl fmt::Display for ObjectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.result {
            Ok(Applied::Created) => write!(f, "created   {} {}", self.kind, self.name),
            Ok(Applied::Unchanged) => write!(f, "unchanged {} {}", self.kind, self.name),
            Ok(Applied::Updated) => write!(f, "updated   {} {}", self.kind, self.name),
            Err(e) => write!(f, "FAILED    {} {}: {e}", self.kind, self.name),
        }
    }
}

/// The result of a provisioning run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProvisionReport {
    /// One entry per object, in creation order.
    pub objects: Vec<ObjectReport>,
}

impl ProvisionReport {
    /// Objects created by this run.
    pub fn created(&self) -> usize {
        self.count(|r| matches!(r, Ok(Applied::Created)))
    }

    /// Objects already as specified.
    pub fn unchanged(&self) -> usize {
        self.count(|r| matches!(r, Ok(Applied::Unchanged)))
    }

    /// Objects updated in place.
    pub fn updated(&self) -> usize {
        self.count(|r| matches!(r, Ok(Applied::Updated)))
    }

    /// Objects that failed.
    pub fn failed(&self) -> usize {
        self.count(Result::is_err)
    }

    fn count(&self, f: impl Fn(&Result<Applied, ProvisionError>) -> bool) -> usize {
        self.objects.iter().filter(|o| f(&o.result)).count()
    }

    /// The closing line: what changed, or that nothing did.
    pub fn summary(&self) -> String {
        if self.updated() > 0 {
            return format!(
                "{} created, {} updated, {} unchanged, {} FAILED",
                self.created(),
                self.updated(),
                self.unchanged(),
                self.failed()
            );
        }
        match (self.created(), self.failed()) {
            (0, 0) => format!(
                "nothing changed: all {} objects already as specified",
                self.objects.len()
            ),
            (c, 0) => format!("{c} created, {} unchanged", self.unchanged()),
            (c, f) => format!("{c} created, {} unchanged, {f} FAILED", self.unchanged()),
        }
    }
}

/// What `cotal up` applies to a space: its streams and buckets, then the daemon's consumers
/// (`fanout` and `reader`, shard 0 of 1: the daemon runs unsharded).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpacePlan {
    /// The streams, including each bucket's.
    pub streams: Vec<StreamSpec>,
    /// The buckets.
    pub kv_buckets: Vec<KvBucketSpec>,
    /// The consumers.
    pub consumers: Vec<ConsumerSpec>,
    /// Replicas of every stream and KV bucket (`num_replicas`); `None` keeps the specs' own
    /// (one replica). Consumers follow their stream's replica count.
    pub replicas: Option<u32>,
    /// The agents the consumer caps are sized for (`max_consumers`, issue 22).
    pub budget: ConsumerBudget,
    /// The operator gave the budget (`cotal up --max-agents`): an existing stream's cap is set
    /// to it, lowered included. Otherwise (the default budget) a larger cap already on a stream
    /// is kept: re-running `cotal up` never shrinks a space behind its operator's back.
    pub budget_given: bool,
    /// The operator gave the delivery lease's TTL (`cotal up --lease-ttl`): a new space's lease
    /// bucket gets it, and an existing one with another TTL is reported as drift and left as it
    /// is (a daemon times its lease by the TTL it read when it acquired: shortening it under a
    /// running holder could let a successor write beside it). Not given, an existing bucket keeps
    /// its TTL and a new one gets the reference's 30 s.
    pub lease_ttl_given: bool,
}

impl SpacePlan {
    /// The plan of `space`, sized for the default number of agents
    /// ([`cotal_core::wire::capacity::DEFAULT_MAX_AGENTS`]).
    pub fn new(space: &Space) -> Self {
        let mut plan = SpacePlan::sized(space, ConsumerBudget::default());
        plan.budget_given = false;
        plan
    }

    /// The plan of `space` with its consumer caps sized for `max_agents` agents (`cotal up
    /// --max-agents`).
    pub fn for_agents(space: &Space, max_agents: u32) -> Self {
        SpacePlan::sized(space, ConsumerBudget::for_agents(max_agents))
    }

    fn sized(space: &Space, budget: ConsumerBudget) -> Self {
        let config = budget.space_config(space);
        SpacePlan {
            streams: config.streams,
            // The reference's five, then Cotal's loss records (`cotal_core::delivery::losses`).
            kv_buckets: config
                .kv_buckets
                .into_iter()
                .chain([KvBucketSpec {
                    max_consumers: budget.bucket_cap(KvBucket::Losses),
                    ..KvBucketSpec::for_space(space, KvBucket::Losses)
                }])
                .collect(),
            consumers: vec![
                ConsumerSpec::fanout(space, 0, 1),
                ConsumerSpec::reader(space, 0, 1),
            ],
            replicas: None,
            budget,
            budget_given: true,
            lease_ttl_given: false,
        }
    }

    /// The plan with the delivery lease bucket's TTL set to `ttl` (`cotal up --lease-ttl`).
    pub fn with_lease_ttl(mut self, ttl: std::time::Duration) -> Self {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        for b in &mut self.kv_buckets {
            if is_lease_bucket(b) {
                b.ttl = Some(cotal_core::time::Duration::from_millis(ms));
            }
        }
        self.lease_ttl_given = true;
        self
    }

    /// The plan with `n` replicas for every stream and KV bucket (a JetStream cluster of at least
    /// `n` nodes; 3 survives the loss of one node, and of a stream's leader).
    pub fn with_replicas(mut self, n: u32) -> Self {
        for s in &mut self.streams {
            s.num_replicas = Some(n);
        }
        self.replicas = Some(n);
        self
    }

    /// The stream that holds bucket `b`, with the plan's replica count.
    pub fn bucket_stream(&self, b: &KvBucketSpec) -> StreamSpec {
        let mut stream = b.stream();
        if let Some(n) = self.replicas {
            stream.num_replicas = Some(n);
        }
        stream
    }
}

/// Whether `b` is the delivery lease bucket (`cotal_delivery_<space>`).
fn is_lease_bucket(b: &KvBucketSpec) -> bool {
    b.bucket.starts_with(KvBucket::Delivery.prefix())
}

/// An existing stream's `max_age` (none when it has none, does not exist or cannot be read).
async fn existing_max_age(
    client: &Client,
    stream: &StreamSpec,
    timeout: Duration,
) -> Option<cotal_core::time::Duration> {
    let info = api::request(client, &stream.info_subject(), Bytes::new(), timeout)
        .await
        .ok()?;
    let ns = info["config"]["max_age"].as_u64().filter(|n| *n > 0)?;
    Some(cotal_core::time::Duration::from_millis(ns / 1_000_000))
}

/// Applies `plan`, object by object.
pub async fn apply(client: &Client, plan: &SpacePlan, timeout: Duration) -> ProvisionReport {
    let mut report = ProvisionReport::default();
    let cap = if plan.budget_given {
        CapRule::Exact
    } else {
        CapRule::KeepLarger
    };
    for s in &plan.streams {
        let result = apply_stream_with(client, s, cap, timeout).await;
        report.objects.push(ObjectReport {
            kind: ObjectKind::Stream,
            name: s.name.clone(),
            result,
        });
    }
    for b in &plan.kv_buckets {
        let mut stream = plan.bucket_stream(b);
        if is_lease_bucket(b)
            && !plan.lease_ttl_given
            && let Some(ttl) = existing_max_age(client, &stream, timeout).await
        {
            // An existing lease bucket keeps the TTL its space was made with.
            stream.max_age = Some(ttl);
        }
        let mut result = apply_stream_with(client, &stream, cap, timeout).await;
        if result.is_ok() {
            match reap_unbounded_consumers(client, &stream, timeout).await {
                Ok(0) => {}
                Ok(_) => result = Ok(Applied::Updated),
                Err(e) => result = Err(e),
            }
        }
        report.objects.push(ObjectReport {
            kind: ObjectKind::KvBucket,
            name: b.bucket.clone(),
            result,
        });
    }
    for c in &plan.consumers {
        let result = apply_consumer(client, c, timeout).await;
        report.objects.push(ObjectReport {
            kind: ObjectKind::Consumer,
            name: format!("{}/{}", c.stream, c.name),
            result,
        });
    }
    report
}

/// Provisions `space` (`cotal up`).
pub async fn provision_space(client: &Client, space: &Space, timeout: Duration) -> ProvisionReport {
    apply(client, &SpacePlan::new(space), timeout).await
}

/// What [`ensure_default_class`] found or did to the space's `defaults.deliveryClass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultClass {
    /// It was unset and is now this class (the rest of `=defaults`, if any, kept).
    Set(DeliveryClass),
    /// It already held this class (an operator's choice, or an earlier bring-up): unchanged.
    Kept(DeliveryClass),
}

impl fmt::Display for DefaultClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DefaultClass::Set(c) => write!(f, "set       defaults.deliveryClass {}", c.as_str()),
            DefaultClass::Kept(c) => write!(f, "kept      defaults.deliveryClass {}", c.as_str()),
        }
    }
}

/// Writes `class` as the space's default delivery class (`defaults.deliveryClass` in the
/// channels registry's `=defaults` entry) when it is unset, merged over the entry's other fields
/// (`CHN:writeChannelDefaults`); an existing value wins. Compare-and-set on the entry's revision,
/// retried a bounded number of times when another writer got in between.
///
/// # Errors
///
/// A one-line reason: the bucket cannot be opened, read or written, or the entry kept changing.
pub async fn ensure_default_class(
    client: &Client,
    space: &Space,
    class: DeliveryClass,
    timeout: Duration,
) -> Result<DefaultClass, String> {
    let bucket = KvBucket::Channels.name(space);
    let work = async {
        let js = async_nats::jetstream::new(client.clone());
        let kv = js
            .get_key_value(&bucket)
            .await
            .map_err(|e| format!("cannot open KV bucket {bucket}: {e}"))?;
        let patch = ChannelDefaults {
            delivery_class: Some(class),
            ..ChannelDefaults::default()
        };
        for _ in 0..3 {
            let entry = kv
                .entry(CHANNEL_DEFAULTS_KEY)
                .await
                .map_err(|e| format!("cannot read {bucket}/{CHANNEL_DEFAULTS_KEY}: {e}"))?;
            let live = entry.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put);
            let existing = match &live {
                Some(e) => Some(serde_json::from_slice::<ChannelDefaults>(&e.value).map_err(
                    |err| {
                        format!(
                            "{bucket}/{CHANNEL_DEFAULTS_KEY} is not a defaults object ({err}): \
                             left as it is"
                        )
                    },
                )?),
                None => None,
            };
            if let Some(kept) = existing.as_ref().and_then(|d| d.delivery_class) {
                return Ok(DefaultClass::Kept(kept));
            }
            let merged = patch.merged_over(existing.as_ref());
            let value = Bytes::from(serde_json::to_vec(&merged.to_object()).unwrap_or_default());
            use async_nats::jetstream::kv::{CreateErrorKind, UpdateErrorKind};
            // `Ok(false)`: another writer got in between; read again (its value may win).
            let written = match &live {
                Some(e) => match kv.update(CHANNEL_DEFAULTS_KEY, value, e.revision).await {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
                    Err(e) => Err(e.to_string()),
                },
                None => match kv.create(CHANNEL_DEFAULTS_KEY, value).await {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e.to_string()),
                },
            };
            match written {
                Ok(true) => return Ok(DefaultClass::Set(class)),
                Ok(false) => {}
                Err(e) => return Err(format!("cannot write {bucket}/{CHANNEL_DEFAULTS_KEY}: {e}")),
            }
        }
        Err(format!(
            "{bucket}/{CHANNEL_DEFAULTS_KEY} kept changing while bring-up wrote it: left as it is"
        ))
    };
    tokio::time::timeout(timeout * 4, work)
        .await
        .unwrap_or_else(|_| Err(format!("writing {bucket}/{CHANNEL_DEFAULTS_KEY} timed out")))
}

/// How `cotal up` treats an existing stream's `max_consumers` that differs from the plan's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CapRule {
    /// Set it to the plan's (the operator gave `--max-agents`).
    Exact,
    /// Raise it to the plan's, keep it when larger (the default budget).
    KeepLarger,
}

/// Brings one stream to `spec` (its `max_consumers` exactly as the spec says).
pub async fn apply_stream(
    client: &Client,
    spec: &StreamSpec,
    timeout: Duration,
) -> Result<Applied, ProvisionError> {
    apply_stream_with(client, spec, CapRule::Exact, timeout).await
}

async fn apply_stream_with(
    client: &Client,
    spec: &StreamSpec,
    cap: CapRule,
    timeout: Duration,
) -> Result<Applied, ProvisionError> {
    let wanted = spec.to_api_config();
    match apply_object(
        client,
        &spec.info_subject(),
        &spec.create_request(),
        &wanted,
        timeout,
    )
    .await
    {
        Err(ProvisionError::Drift(drift)) => {
            migrate_stream(client, spec, &wanted, drift, cap, timeout).await
        }
        other => other,
    }
}

/// Updates an existing stream in place when every field that differs from `wanted` is one of
/// [`MIGRATED_STREAM_FIELDS`]; otherwise reports the drift and changes nothing.
async fn migrate_stream(
    client: &Client,
    spec: &StreamSpec,
    wanted: &Value,
    drift: Vec<String>,
    cap: CapRule,
    timeout: Duration,
) -> Result<Applied, ProvisionError> {
    let info = api::request(client, &spec.info_subject(), Bytes::new(), timeout)
        .await
        .map_err(ProvisionError::Api)?;
    let (Some(actual), Some(wanted)) = (info["config"].as_object(), wanted.as_object()) else {
        return Err(ProvisionError::Drift(drift));
    };
    let mut wanted = wanted.clone();
    if cap == CapRule::KeepLarger
        && let (Some(want), Some(found)) = (
            wanted.get("max_consumers").and_then(Value::as_i64),
            actual.get("max_consumers").and_then(Value::as_i64),
        )
        && found > want
    {
        wanted.insert("max_consumers".into(), Value::from(found));
    }
    let drifting: Vec<&String> = wanted
        .iter()
        .filter(|(k, w)| !same(w, actual.get(*k).unwrap_or(&Value::Null)))
        .map(|(k, _)| k)
        .collect();
    if drifting.is_empty() {
        return Ok(Applied::Unchanged);
    }
    if !drifting
        .iter()
        .all(|k| MIGRATED_STREAM_FIELDS.contains(&k.as_str()))
    {
        return Err(ProvisionError::Drift(drift));
    }
    let mut config = actual.clone();
    for k in drifting {
        config.insert(k.clone(), wanted[k].clone());
    }
    api::request(
        client,
        &format!("$JS.API.STREAM.UPDATE.{}", spec.name),
        Bytes::from(Value::Object(config).to_string()),
        timeout,
    )
    .await
    .map(|_| Applied::Updated)
    .map_err(ProvisionError::Api)
}

/// On a stream with a consumer inactivity limit (the presence and channels buckets), deletes the
/// consumers that escape it: made before `cotal up` set the limit (the server applies it only to
/// consumers created after), with no inactivity threshold or a longer one. Neither Cotal nor the
/// reference ever makes such a consumer there (their watches are ordered consumers with a
/// threshold), so each is a leftover of an agent's abuse of its watch grant. Returns how many.
async fn reap_unbounded_consumers(
    client: &Client,
    spec: &StreamSpec,
    timeout: Duration,
) -> Result<usize, ProvisionError> {
    let Some(limit) = spec.consumer_inactive_limit else {
        return Ok(0);
    };
    let limit_ns = u128::from(limit.as_millis()) * 1_000_000;
    let mut unbounded = Vec::new();
    let mut offset = 0u64;
    loop {
        let page = api::request(
            client,
            &format!("$JS.API.CONSUMER.LIST.{}", spec.name),
            Bytes::from(serde_json::json!({ "offset": offset }).to_string()),
            timeout,
        )
        .await
        .map_err(ProvisionError::Api)?;
        let consumers = page["consumers"].as_array().cloned().unwrap_or_default();
        for c in &consumers {
            let threshold = c["config"]["inactive_threshold"].as_u64().unwrap_or(0);
            if (threshold == 0 || u128::from(threshold) > limit_ns)
                && let Some(name) = c["name"].as_str()
            {
                unbounded.push(name.to_owned());
            }
        }
        offset += consumers.len() as u64;
        let total = page["total"].as_u64().unwrap_or(0);
        if consumers.is_empty() || offset >= total {
            break;
        }
    }
    for name in &unbounded {
        api::request(
            client,
            &format!("$JS.API.CONSUMER.DELETE.{}.{name}", spec.name),
            Bytes::new(),
            timeout,
        )
        .await
        .map_err(ProvisionError::Api)?;
    }
    Ok(unbounded.len())
}

/// Brings one consumer to `spec` (created with the reference's `action: create`).
pub async fn apply_consumer(
    client: &Client,
    spec: &ConsumerSpec,
    timeout: Duration,
) -> Result<Applied, ProvisionError> {
    let wanted = spec.to_api_config();
    match apply_object(
        client,
        &spec.info_subject(),
        &spec.create_request(),
        &wanted,
        timeout,
    )
    .await
    {
        Ok(Applied::Unchanged) => {
            // Fields the spec leaves unset must be unset on the server too: a `dm_<id>` made by
            // an open-mode agent (inactive_threshold 600 s) is not the provisioner's durable.
            let info = api::request(client, &spec.info_subject(), Bytes::new(), timeout)
                .await
                .map_err(ProvisionError::Api)?;
            let drift = unset_differences(&wanted, &info["config"]);
            if drift.is_empty() {
                Ok(Applied::Unchanged)
            } else {
                Err(ProvisionError::Drift(drift))
            }
        }
        other => other,
    }
}

/// The consumer fields the reference may create that `wanted` leaves unset but `actual` holds
/// set (`field: wanted none, found X`): `inactive_threshold` (0 is unset), `mem_storage` (false is
/// unset), and a `deliver_policy` other than the server default `all`.
pub fn unset_differences(wanted: &Value, actual: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let unset = |key: &str, default: &Value| {
        wanted.get(key).is_none()
            && actual
                .get(key)
                .is_some_and(|v| !v.is_null() && v != default && v != &Value::from(0))
    };
    for (key, default) in [
        ("inactive_threshold", Value::from(0)),
        ("mem_storage", Value::Bool(false)),
        ("deliver_policy", Value::from("all")),
    ] {
        if unset(key, &default) {
            out.push(format!("{key}: wanted none, found {}", actual[key]));
        }
    }
    out
}

async fn apply_object(
    client: &Client,
    info_subject: &str,
    create: &ApiRequest,
    wanted: &Value,
    timeout: Duration,
) -> Result<Applied, ProvisionError> {
    match api::request(client, info_subject, Bytes::new(), timeout).await {
        Ok(info) => {
            let drift = differences(wanted, &info["config"]);
            if drift.is_empty() {
                Ok(Applied::Unchanged)
            } else {
                Err(ProvisionError::Drift(drift))
            }
        }
        Err(e)
            if matches!(
                e.err_code(),
                Some(api::STREAM_NOT_FOUND | api::CONSUMER_NOT_FOUND)
            ) =>
        {
            api::request(
                client,
                &create.subject,
                Bytes::from(create.body_bytes()),
                timeout,
            )
            .await
            .map(|_| Applied::Created)
            .map_err(ProvisionError::Api)
        }
        Err(e) => Err(ProvisionError::Api(e)),
    }
}

/// The fields of `wanted` that `actual` holds differently (`field: wanted X, found Y`).
pub fn differences(wanted: &Value, actual: &Value) -> Vec<String> {
    let Some(wanted) = wanted.as_object() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, want) in wanted {
        let found = actual.get(key).unwrap_or(&Value::Null);
        if !same(want, found) {
            out.push(format!("{key}: wanted {want}, found {found}"));
        }
    }
    out
}

fn same(want: &Value, found: &Value) -> bool {
    match (want, found) {
        // Numbers compare by value (the server may echo 1000 where we sent 1000 as i64 or u64).
        (Value::Number(a), Value::Number(b)) => {
            a.as_i64()
                .zip(b.as_i64())
                .map(|(a, b)| a == b)
                .unwrap_or(false)
                || a.as_u64()
                    .zip(b.as_u64())
                    .map(|(a, b)| a == b)
                    .unwrap_or(false)
        }
        _ => want == found,
    }
}

/// A `permissions { … }` block for a user in a nats-server config file (`authorization { users
/// = [ { user: …, password: …, permissions: <this> } ] }`), with every subject quoted so `$JS.…`
/// is not read as a variable. An unrestricted set renders as `{}`.
pub fn nats_server_permissions(p: &Permissions) -> String {
    fn list(items: &std::collections::BTreeSet<String>) -> String {
        let quoted: Vec<String> = items
            .iter()
            .map(|s| serde_json::to_string(s).unwrap_or_default())
            .collect();
        format!("[{}]", quoted.join(", "))
    }
    fn section(
        name: &str,
        allow: &std::collections::BTreeSet<String>,
        deny: &std::collections::BTreeSet<String>,
    ) -> Option<String> {
        let mut parts = Vec::new();
        if !allow.is_empty() {
            parts.push(format!("    allow: {}", list(allow)));
        }
        if !deny.is_empty() {
            parts.push(format!("    deny: {}", list(deny)));
        }
        (!parts.is_empty()).then(|| format!("  {name}: {{\n{}\n  }}", parts.join("\n")))
    }
    let sections: Vec<String> = [
        section("publish", &p.publish_allow, &p.publish_deny),
        section("subscribe", &p.subscribe_allow, &p.subscribe_deny),
    ]
    .into_iter()
    .flatten()
    .collect();
    if sections.is_empty() {
        "{}".to_owned()
    } else {
        format!("{{\n{}\n}}", sections.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn permissions_render_quoted_for_the_server_config() {
        let mut p = Permissions::default();
        assert_eq!(nats_server_permissions(&p), "{}");
        p.publish_allow.insert("$JS.API.INFO".into());
        p.subscribe_allow.insert("_INBOX_a.>".into());
        assert_eq!(
            nats_server_permissions(&p),
            "{\n  publish: {\n    allow: [\"$JS.API.INFO\"]\n  }\n  subscribe: {\n    allow: [\"_INBOX_a.>\"]\n  }\n}"
        );
    }

    #[test]
    fn differences_name_only_the_fields_the_spec_sets() {
        let wanted =
            json!({"name": "CHAT_main", "max_msgs_per_subject": 1000, "allow_direct": true});
        let same_cfg = json!({"name": "CHAT_main", "max_msgs_per_subject": 1000, "allow_direct": true, "max_age": 0});
        assert!(differences(&wanted, &same_cfg).is_empty());
        let other = json!({"name": "CHAT_main", "max_msgs_per_subject": 10});
        assert_eq!(
            differences(&wanted, &other),
            [
                "allow_direct: wanted true, found null",
                "max_msgs_per_subject: wanted 1000, found 10"
            ]
        );
    }

    #[test]
    fn the_plan_holds_five_streams_six_buckets_and_two_consumers() {
        let plan = SpacePlan::new(&Space::new("main").expect("valid space"));
        assert_eq!(plan.streams.len(), 5);
        assert_eq!(plan.kv_buckets.len(), 6);
        assert_eq!(plan.kv_buckets[5].bucket, "cotal_losses_main");
        let names: Vec<_> = plan.consumers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["fanout", "reader"]);
    }

    #[test]
    fn with_replicas_sets_every_stream_and_bucket_stream() {
        let plan = SpacePlan::new(&Space::new("main").expect("valid space"));
        assert!(plan.streams.iter().all(|s| s.num_replicas.is_none()));
        assert!(
            plan.kv_buckets
                .iter()
                .all(|b| plan.bucket_stream(b).num_replicas == Some(1))
        );
        let plan = plan.with_replicas(3);
        assert!(plan.streams.iter().all(|s| s.num_replicas == Some(3)));
        for b in &plan.kv_buckets {
            let stream = plan.bucket_stream(b);
            assert_eq!(stream.num_replicas, Some(3), "{}", stream.name);
            assert_eq!(stream.to_api_config()["num_replicas"], json!(3));
        }
    }

    #[test]
    fn the_summary_says_when_nothing_changed() {
        let mut r = ProvisionReport::default();
        r.objects.push(ObjectReport {
            kind: ObjectKind::Stream,
            name: "CHAT_main".into(),
            result: Ok(Applied::Unchanged),
        });
        assert_eq!(
            r.summary(),
            "nothing changed: all 1 objects already as specified"
        );
        r.objects.push(ObjectReport {
            kind: ObjectKind::Consumer,
            name: "CHAT_main/fanout".into(),
            result: Err(ProvisionError::Drift(vec!["x".into()])),
        });
        assert_eq!(r.summary(), "0 created, 1 unchanged, 1 FAILED");
        assert_eq!(
            r.objects[1].to_string(),
            "FAILED    consumer CHAT_main/fanout: exists with a different configuration: x"
        );
    }
}
