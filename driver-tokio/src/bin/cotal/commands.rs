//! The running and one-shot subcommands of `cotal`: delivery, agent, send, members, health,
//! channels.

use crate::{NatsArgs, fail};
use bytes::Bytes;
use clap::Args;
use cotal_core::acl::subject_matches;
use cotal_core::agent::{Agent, AgentConfig, AgentEvent};
use cotal_core::constants::LEASE_TTL;
use cotal_core::delivery::daemon::{DeliveryConfig, DeliveryEvent, DeliveryHealth};
use cotal_core::delivery::lease::{
    HEALTH_FIELD, LeaseEvent, LeaseHealth, ORPHANS_FIELD, judge_health,
};
use cotal_core::delivery::revoke::SweepEvent;
use cotal_core::policy::{ChannelRegistry, DeliveryClass};
use cotal_core::wire::capacity::{Headroom, LOW_HEADROOM_PERCENT};
use cotal_core::wire::config::SpaceStream;
use cotal_core::wire::keys::KvBucket;
use cotal_core::wire::message::Sender;
use cotal_core::wire::permissions::{
    delivery_backlog_grants, delivery_loss_grants, delivery_revocation_grants,
};
use cotal_core::wire::records::{DeliveryLease, MembershipRecord};
use cotal_core::wire::shard::ShardMap;
use cotal_core::wire::token::{AgentId, Channel, Role, Space};
use cotal_driver_tokio::api::ApiError;
use cotal_driver_tokio::app::{
    Agent as AppAgent, AgentOptions, DeliveryDaemon, JoinError, LeaveError, SendError,
    Sent as AppSent,
};
use cotal_driver_tokio::connect::{ConnectConfig, NatsConnection, connect};
use cotal_driver_tokio::exec::{Executor, ExecutorConfig};
use cotal_driver_tokio::metrics::{AgentMetrics, DaemonMetrics, Render, serve};
use cotal_driver_tokio::provision::space_headroom;
use cotal_driver_tokio::run::{Runner, os_key, os_seed, wall_clock};
use futures::{FutureExt, StreamExt};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// How long a stopping agent or daemon waits for its last writes (offline presence, lease
/// release).
const STOP_GRACE: Duration = Duration::from_secs(3);

/// `--space` plus the connection.
#[derive(Args, Debug)]
pub(crate) struct SpaceArgs {
    /// The space name.
    #[arg(long)]
    space: String,
    /// Print one JSON document instead of the text (its fields are in the command's
    /// description above). Same exit codes; an error is `{"error": "…"}`.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

/// `cotal delivery`.
#[derive(Args, Debug)]
pub(crate) struct DeliveryArgs {
    /// The space name.
    #[arg(long)]
    space: String,
    /// The shard this daemon serves (0-based).
    #[arg(long, default_value_t = 0)]
    shard: u32,
    /// How many shards the space's delivery is split into.
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// The daemon id: the lease holder and every record's writerIdentity, and its inbox prefix
    /// `_INBOX_<id>` (the one `cotal provision delivery --id ID` grants). Default: the
    /// credential's identity (the nkey of --creds / --nkey, the --user name), else a fresh
    /// `delivery-<hex>`; given with a credential, it must match it.
    #[arg(long)]
    id: Option<String>,
    /// How long a member may be offline (no presence heartbeat seen by this daemon) before its
    /// open memberships are reported as orphaned, e.g. `7d`, `12h`, `90s` (shown by
    /// `cotal members --orphans`). The clock starts when the daemon starts.
    #[arg(long, default_value = "7d", value_parser = parse_retention)]
    orphan_retention: cotal_core::time::Duration,
    /// Tombstone orphaned memberships (each one logged), through the daemon's own leave. Off by
    /// default: they are only reported.
    #[arg(long)]
    reap_orphans: bool,
    /// Send every durable copy through the dinbox and the reader (the reference daemon's two
    /// hops), instead of writing the copies it may transfer straight to DLV. For comparisons.
    #[arg(long)]
    two_hop: bool,
    /// Exit (code 1) when the delivery lease is lost or cannot be acquired, for a supervisor to
    /// restart the process. By default the daemon rides that out in process: it stops writing
    /// at once, then contends for a fresh lease until it holds one again (a second daemon of
    /// the same shard is a standby that takes over when the holder's lease expires).
    #[arg(long)]
    exit_on_lease_loss: bool,
    /// Serve the daemon's metrics as OpenMetrics text on http://ADDR/metrics (e.g.
    /// `127.0.0.1:9464`): copies written, transferred, shed, lost by cause, revoked,
    /// back-pressure, lease state and fencing token, feeds, joins and leaves with their
    /// latencies. Bind to loopback or a private address: the endpoint has no authentication.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    #[command(flatten)]
    nats: NatsArgs,
}

/// `--orphan-retention`: the channel registry's duration grammar (`90s`, `12h`, `7d` …).
fn parse_retention(s: &str) -> Result<cotal_core::time::Duration, String> {
    cotal_core::policy::parse_duration(s).map_err(|e| e.to_string())
}

/// `cotal agent`.
#[derive(Args, Debug)]
pub(crate) struct AgentArgs {
    /// The space name.
    #[arg(long)]
    space: String,
    /// The agent's id (its user nkey in auth mode), and its inbox prefix `_INBOX_<id>`. Default:
    /// the credential's identity (the nkey of --creds / --nkey, the --user name); given with a
    /// credential, it must match it.
    #[arg(long)]
    id: Option<String>,
    /// Display name (default: the id).
    #[arg(long)]
    name: Option<String>,
    /// Channels to join at start (repeat the flag or separate with commas).
    #[arg(long, value_delimiter = ',')]
    join: Vec<String>,
    /// No durable backstop (no durable joins, no DLV consumer): live delivery only.
    #[arg(long)]
    live_only: bool,
    /// An anycast role this agent serves (repeat the flag or separate with commas): it takes
    /// tasks from the role's work queue `svc_<role>`, each task reaching one server of the role.
    /// The first role is also the `from.role` of what it sends.
    #[arg(long, value_delimiter = ',')]
    role: Vec<String>,
    /// Create the agent's DLV, `dm_<id>` and `svc_<role>` consumers if they are missing.
    /// Default: on without authentication (open mode), off with credentials (the provisioner
    /// creates them; an agent credential may not).
    #[arg(long)]
    create_dlv_consumer: Option<bool>,
    /// Serve the agent's metrics as OpenMetrics text on http://ADDR/metrics (e.g.
    /// `127.0.0.1:9465`): connection, each channel's backstop, losses reported to it, dedup
    /// and delivery counters. Bind to loopback or a private address: no authentication.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    #[command(flatten)]
    nats: NatsArgs,
}

/// `cotal send`: exactly one of `--channel`, `--to`, `--role` (one routing field).
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("route").required(true).args(["channel", "to", "role"])))]
pub(crate) struct SendArgs {
    /// The space name.
    #[arg(long)]
    space: String,
    /// The sender's id (and inbox prefix `_INBOX_<id>`). Default: the credential's identity (the
    /// nkey of --creds / --nkey, the --user name); given with a credential, it must match it.
    #[arg(long)]
    id: Option<String>,
    /// Display name (default: the id).
    #[arg(long)]
    name: Option<String>,
    /// The channel to post to (multicast).
    #[arg(long)]
    channel: Option<String>,
    /// The instance id to unicast to (a DM, read by its `dm_<id>` consumer).
    #[arg(long)]
    to: Option<String>,
    /// The role to anycast to (a task, taken by exactly one server of the role).
    #[arg(long)]
    role: Option<String>,
    /// The text.
    text: String,
    /// Print one JSON document instead of the sequence: `{"id", "seq", "duplicate", "stream"}`
    /// (the message id, its stream sequence, whether the stream had it already, and the stream:
    /// `CHAT_<space>`, `DM_<space>` or `TASK_<space>`). Same exit codes; an error is
    /// `{"error": "…"}`.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

/// `cotal members`.
#[derive(Args, Debug)]
pub(crate) struct MembersArgs {
    /// The space name.
    #[arg(long)]
    space: String,
    /// Only the records of this channel, or of the channels this pattern matches (`*` one
    /// token, `>` the rest, as the protocol matches subjects: `team.>` matches `team.a` and
    /// `team.a.b`, not `team`). An invalid name or pattern is refused (exit code 2).
    #[arg(long)]
    channel: Option<String>,
    /// List the memberships whose owner has been offline beyond the daemon's retention, as each
    /// shard's daemon publishes them (see `cotal delivery --orphan-retention`).
    #[arg(long, conflicts_with = "channel")]
    orphans: bool,
    /// Print one JSON object per line instead of the text: each membership record as stored
    /// (`{"key", "channel", "owner", "generation", "joinCursor", "leaveCursor", "state", …}`;
    /// an undecodable one as `{"key", "error"}`), no summary line. With --orphans, one line per
    /// orphaned membership: `{"shard", "channel", "owner", "generation", "offlineMs"}`. Nothing
    /// is printed for none. Same exit codes; an error is `{"error": "…"}`.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    nats: NatsArgs,
}

fn space_of(name: &str) -> Result<Space, String> {
    Space::new(name).map_err(|e| format!("invalid space name '{name}': {e}"))
}

fn channel_of(name: &str) -> Result<Channel, String> {
    Channel::new(name).map_err(|e| format!("invalid channel '{name}': {e}"))
}

async fn connect_with(config: &ConnectConfig) -> Result<NatsConnection, String> {
    connect(config).await.map_err(|e| e.to_string())
}

/// Fails with a clear line when the space's streams are missing.
async fn check_provisioned(
    conn: &NatsConnection,
    space: &Space,
    t: Duration,
) -> Result<(), String> {
    let stream = SpaceStream::Chat.name(space);
    let subject = format!("$JS.API.STREAM.INFO.{stream}");
    match cotal_driver_tokio::api::request(&conn.client, &subject, Bytes::new(), t).await {
        Ok(_) => Ok(()),
        Err(e) if e.err_code() == Some(cotal_driver_tokio::api::STREAM_NOT_FOUND) => Err(format!(
            "space '{}' is not provisioned: stream {stream} is missing (run `cotal up --space {}`)",
            space.as_str(),
            space.as_str()
        )),
        Err(e) => Err(format!("cannot read stream {stream}: {e}")),
    }
}

/// Binds the `--metrics` address before anything else starts: a busy or bad address fails the
/// command at once.
async fn metrics_listener(
    addr: Option<SocketAddr>,
) -> Result<Option<tokio::net::TcpListener>, String> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!(target: "cotal", "metrics: http://{bound}/metrics");
    Ok(Some(listener))
}

async fn terminate_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

// ---------------------------------------------------------------------------------------------
// cotal delivery
// ---------------------------------------------------------------------------------------------

pub(crate) async fn delivery(args: DeliveryArgs) -> ExitCode {
    let id = match args.nats.identity(args.id.as_deref(), false).resolve() {
        Ok(id) => id,
        Err(code) => return code,
    };
    match run_delivery(args, id).await {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

/// The reconnect backoff cap of `cotal delivery` (issue 19: the default 5 s cap cost 3 s of the
/// heal after a 3.3 s server outage).
const DAEMON_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

async fn run_delivery(args: DeliveryArgs, id: Option<AgentId>) -> Result<ExitCode, String> {
    let space = space_of(&args.space)?;
    let shard = ShardMap::new(args.shards)
        .and_then(|s| s.shard(args.shard))
        .map_err(|e| format!("invalid shard {} of {}: {e}", args.shard, args.shards))?;
    let id = match id {
        Some(id) => id,
        None => agent_of(&format!("delivery-{:012x}", os_seed() & 0xffff_ffff_ffff))?,
    };
    let mut config = args.nats.config_as(Some(&id))?;
    let id = id.as_str().to_owned();
    config.name = Some(format!("cotal-delivery-{id}"));
    // One daemon per shard reconnects at least every second: a broker back after an outage
    // costs durable delivery at most a second of backoff (agents, thousands of them, keep the
    // default cap so a restart is not met by all of them at once).
    config.reconnect_max_delay = DAEMON_RECONNECT_MAX_DELAY;
    let mut delivery_config = DeliveryConfig::new(space.clone(), shard, id.clone());
    delivery_config.orphan_retention = args.orphan_retention;
    delivery_config.reap_orphans = args.reap_orphans;
    delivery_config.two_hop = args.two_hop;
    delivery_config.reacquire_lease = !args.exit_on_lease_loss;
    let listener = metrics_listener(args.metrics).await?;
    let metrics = listener.as_ref().map(|_| {
        Arc::new(DaemonMetrics::new(
            space.as_str(),
            shard.index(),
            shard.shards(),
            &id,
        ))
    });
    let tap = metrics.clone().map(|m| {
        Box::new(move |input: &cotal_core::io::Input| m.input(input))
            as cotal_driver_tokio::app::InputTap
    });
    let (daemon, mut events) = DeliveryDaemon::start_tapped(&config, delivery_config, tap)
        .await
        .map_err(|e| e.to_string())?;
    let daemon = daemon.with_grace(STOP_GRACE);
    let server = listener.zip(metrics.clone()).map(|(listener, metrics)| {
        let monitor = daemon.monitor();
        let render: Render = Arc::new(move || {
            let (monitor, metrics) = (monitor.clone(), metrics.clone());
            Box::pin(async move { metrics.render(monitor.status().await.ok().as_ref()) })
        });
        serve(listener, render)
    });
    tracing::info!(
        target: "cotal",
        "delivery {id}: space {}, shard {} of {}",
        space.as_str(),
        shard.index(),
        shard.shards()
    );
    let signal = terminate_signal();
    tokio::pin!(signal);
    let mut failure: Option<String> = None;
    let mut report = DaemonReport::for_space(&space);
    report.exit_on_lease_loss = args.exit_on_lease_loss;
    loop {
        tokio::select! {
            () = &mut signal => {
                tracing::info!(target: "cotal", "signal: shutting down (releasing the lease)");
                break;
            }
            event = events.next() => match event {
                Some(event) => {
                    if let Some(m) = &metrics {
                        m.event(&event);
                    }
                    if let Some(reason) = report.event(&event) {
                        failure = Some(reason);
                        break;
                    }
                }
                None => {
                    failure = Some("the daemon's runner stopped".to_owned());
                    break;
                }
            },
        }
    }
    // The runner answers the release within the grace; then report what it said meanwhile.
    let stopped = daemon.shutdown().await;
    while let Some(Some(event)) = events.next().now_or_never() {
        let _ = report.event(&event);
    }
    if let Some(server) = server {
        server.abort();
    }
    let stopped = stopped.map_err(|e| format!("daemon task failed: {e}"))?;
    let counters = &stopped.counters;
    tracing::info!(
        target: "cotal",
        "stopped: {} copies written, {} transferred, {} lost, {} dropped",
        counters.copies_written,
        counters.transferred,
        counters.lost,
        counters.dropped
    );
    match failure {
        Some(reason) => Err(reason),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// What `cotal delivery` prints of its daemon's events: one line each, quiet by default.
#[derive(Default)]
struct DaemonReport {
    /// The daemon was active once: from then on every health change is printed (the boot's
    /// step-by-step degraded states only with `-vv`).
    was_active: bool,
    /// The space, for naming the grants a refused feature lacks.
    space: Option<Space>,
    /// The broker refused the DLV revocation sweep's grants: said once, then quiet.
    without_sweep: bool,
    /// The broker refused the per-owner DLV backlog read: said once, then quiet.
    without_dlv_backlog: bool,
    /// The broker refused the members' loss records: said once, then quiet.
    without_loss_records: bool,
    /// `--exit-on-lease-loss`: a lost (or unacquired) lease ends the run.
    exit_on_lease_loss: bool,
}

/// True when a failure detail is the broker's permission refusal (`Failure::PermissionDenied`).
fn refused_by_permissions(detail: &str) -> bool {
    detail.contains("Permissions Violation") || detail.starts_with("permission denied")
}

impl DaemonReport {
    fn for_space(space: &Space) -> Self {
        DaemonReport {
            space: Some(space.clone()),
            ..DaemonReport::default()
        }
    }

    /// The first permission refusal of a grant the reference's `deliveryPermissions` lacks
    /// (`delivery_additions`): one WARN line naming the feature and the grants, true; later
    /// ones: false (logged at debug). The daemon keeps working without the feature.
    fn without(&mut self, feature: Feature, detail: &str) -> bool {
        if !refused_by_permissions(detail) {
            return false;
        }
        let (said, what, grants) = match (feature, &self.space) {
            (Feature::Sweep, Some(space)) => (
                &mut self.without_sweep,
                "the DLV revocation sweep (copies already in an agent's DLV stay when its ACL \
                 narrows)",
                delivery_revocation_grants(space),
            ),
            (Feature::DlvBacklog, Some(space)) => (
                &mut self.without_dlv_backlog,
                "the per-owner DLV backlog read (the per-owner DLV cap is not verified)",
                delivery_backlog_grants(space),
            ),
            (Feature::LossRecords, Some(space)) => (
                &mut self.without_loss_records,
                "the members' loss records (a member is not told of its losses; they are still \
                 logged here)",
                delivery_loss_grants(space),
            ),
            (_, None) => return false,
        };
        if !*said {
            *said = true;
            tracing::warn!(
                target: "cotal",
                "running without {what}: the credential lacks {} (`cotal provision delivery` \
                 prints them)",
                grants.join(", ")
            );
        } else {
            tracing::debug!(target: "cotal", "{feature:?} refused again: {detail}");
        }
        true
    }

    /// Logs one daemon event; returns the reason to exit for a lease that is gone for good.
    fn event(&mut self, event: &DeliveryEvent) -> Option<String> {
        match event {
            DeliveryEvent::DlvRevocation(
                SweepEvent::Retrying { detail, .. } | SweepEvent::Failed { detail, .. },
            ) if self.without(Feature::Sweep, detail) => {}
            DeliveryEvent::BacklogUnverified {
                owner: Some(_),
                detail,
            } if self.without(Feature::DlvBacklog, detail) => {}
            DeliveryEvent::LossNoticeFailed { detail, .. }
                if self.without(Feature::LossRecords, detail) => {}
            DeliveryEvent::HealthChanged(h) => {
                let active = matches!(h, DeliveryHealth::Active);
                if active || self.was_active {
                    tracing::info!(target: "cotal", "health: {h}");
                } else {
                    tracing::debug!(target: "cotal", "health: {h}");
                }
                self.was_active |= active;
            }
            DeliveryEvent::Lease(LeaseEvent::Lost { .. }) if self.exit_on_lease_loss => {
                tracing::error!(target: "cotal", "lease: {event:?}");
                return Some("the delivery lease was lost".to_owned());
            }
            DeliveryEvent::Lease(LeaseEvent::AcquireFailed { .. }) if self.exit_on_lease_loss => {
                tracing::error!(target: "cotal", "lease: {event:?}");
                return Some(format!("could not acquire the delivery lease: {event:?}"));
            }
            DeliveryEvent::Lease(LeaseEvent::Lost { .. }) => tracing::error!(
                target: "cotal",
                "lease: {event:?}: writes stopped; starting over with a fresh lease"
            ),
            DeliveryEvent::Lease(LeaseEvent::AcquireFailed { .. }) => tracing::warn!(
                target: "cotal",
                "lease: {event:?}: another daemon holds it; standing by"
            ),
            DeliveryEvent::LeaseTtl { ttl } => tracing::info!(
                target: "cotal",
                "lease: timed by the lease bucket's TTL of {ttl}"
            ),
            DeliveryEvent::LeaseTtlUnusable { detail } => tracing::warn!(
                target: "cotal",
                "lease: not acquired: {detail}; reading it again"
            ),
            DeliveryEvent::Reincarnated { incarnation } => tracing::info!(
                target: "cotal",
                "starting over (incarnation {incarnation}): acquiring a fresh lease"
            ),
            DeliveryEvent::Lease(e @ LeaseEvent::Renewed { .. }) => {
                tracing::debug!(target: "cotal", "lease: {e:?}");
            }
            DeliveryEvent::Lease(e) => tracing::info!(target: "cotal", "lease: {e:?}"),
            DeliveryEvent::Joined {
                owner,
                channel,
                generation,
                join_cursor,
                durable,
                reason,
                copied,
                ..
            } => tracing::info!(
                target: "cotal",
                "joined: {} {} generation {generation} cursor {join_cursor} durable {durable} \
                 copied {copied}{}",
                owner.as_str(),
                channel.as_str(),
                reason.as_ref().map_or_else(String::new, |r| format!(" ({r})"))
            ),
            DeliveryEvent::Left {
                owner,
                channel,
                generation,
                leave_cursor,
            } => tracing::info!(
                target: "cotal",
                "left: {} {} generation {} leave cursor {}",
                owner.as_str(),
                channel.as_str(),
                generation.map_or_else(|| "-".to_owned(), |g| g.to_string()),
                leave_cursor.map_or_else(|| "-".to_owned(), |c| c.to_string())
            ),
            DeliveryEvent::MembershipOrphaned {
                owner,
                channel,
                generation,
                offline_for,
                reaping,
            } => tracing::warn!(
                target: "cotal",
                "orphaned membership: {} {} generation {generation}, owner offline {} s{}",
                channel.as_str(),
                owner.as_str(),
                offline_for.as_millis() / 1000,
                if *reaping { "; tombstoning it" } else { "; kept (no --reap-orphans)" }
            ),
            DeliveryEvent::ConsumerHeadroom {
                stream,
                headroom,
                low,
            } => {
                if *low {
                    tracing::warn!(
                        target: "cotal",
                        "consumer headroom low: stream {stream} holds {} of {} consumers ({} \
                         free); raise it with `cotal up --max-agents`",
                        headroom.consumers,
                        headroom.cap,
                        headroom.free()
                    );
                } else {
                    tracing::info!(
                        target: "cotal",
                        "consumer headroom back: stream {stream} holds {} of {} consumers",
                        headroom.consumers,
                        headroom.cap
                    );
                }
            }
            DeliveryEvent::Evicted { .. }
            | DeliveryEvent::EntryLost(_)
            | DeliveryEvent::HistoryForgotten { .. }
            | DeliveryEvent::DinboxCapReached { .. }
            | DeliveryEvent::CopyShed { .. }
            | DeliveryEvent::LossNoticeFailed { .. }
            | DeliveryEvent::CopyWriteFailed { .. }
            | DeliveryEvent::FanoutTerminated { .. }
            | DeliveryEvent::EntryTerminated { .. } => {
                tracing::warn!(target: "cotal", "loss: {event:?}");
            }
            DeliveryEvent::FeedProblem { .. }
            | DeliveryEvent::Abandoned { .. }
            | DeliveryEvent::JoinFailed { .. }
            | DeliveryEvent::LeaveFailed { .. }
            | DeliveryEvent::ControlRefused { .. }
            | DeliveryEvent::BacklogUnverified { .. }
            | DeliveryEvent::BackstopAtRisk { .. } => {
                tracing::warn!(target: "cotal", "{event:?}");
            }
            other => tracing::debug!(target: "cotal", "{other:?}"),
        }
        None
    }
}

/// A daemon feature that needs a grant beyond the reference's delivery credential.
#[derive(Clone, Copy, Debug)]
enum Feature {
    /// The DLV revocation sweep.
    Sweep,
    /// The per-owner DLV backlog read.
    DlvBacklog,
    /// The members' loss records (`cotal_losses_<s>`).
    LossRecords,
}

// ---------------------------------------------------------------------------------------------
// cotal agent
// ---------------------------------------------------------------------------------------------

pub(crate) async fn agent(args: AgentArgs) -> ExitCode {
    let id = match args.nats.identity(args.id.as_deref(), true).resolve() {
        Ok(Some(id)) => id,
        Ok(None) => return fail("no agent id"),
        Err(code) => return code,
    };
    match run_agent(args, id).await {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

fn role_of(name: &str) -> Result<Role, String> {
    Role::new(name).map_err(|e| format!("invalid role '{name}': {e}"))
}

fn agent_of(id: &str) -> Result<AgentId, String> {
    AgentId::new(id).map_err(|e| format!("invalid agent id '{id}': {e}"))
}

fn sender_of(id: AgentId, name: Option<&str>) -> Sender {
    let name = name.unwrap_or(id.as_str()).to_owned();
    Sender::new(id, name)
}

/// Connects as `me` (inbox prefix `_INBOX_<id>` before any request) and starts `config`.
async fn start_agent(
    nats: &NatsArgs,
    mut config: AgentConfig,
) -> Result<(Runner<Agent>, ConnectConfig), String> {
    // Every agent the binary runs draws its message ids from an OS key (unguessable ids).
    config.id_key = Some(os_key());
    let mut connect_config = nats.config()?;
    connect_config.inbox_prefix = Some(config.me.id.inbox_prefix());
    connect_config.name = Some(format!("cotal-agent-{}", config.me.id.as_str()));
    let conn = connect_with(&connect_config).await?;
    check_provisioned(&conn, &config.space, connect_config.request_timeout).await?;
    let machine = Agent::new(config).map_err(|e| format!("agent config: {e:?}"))?;
    // A one-shot publish answers within the request timeout: a PubAck later than that is an
    // `Unknown` send, reported before the command's own wait ends.
    let exec_config = ExecutorConfig {
        api_timeout: connect_config.request_timeout,
        publish_ack_timeout: connect_config.request_timeout,
        ..ExecutorConfig::default()
    };
    let (executor, inputs) = Executor::start(conn, exec_config);
    Ok((Runner::spawn(machine, executor, inputs), connect_config))
}

/// The agent options and connect config `cotal agent` and `cotal mcp` run with, and the boot
/// channels.
fn agent_options(
    args: &AgentArgs,
    id: &AgentId,
) -> Result<(AgentOptions, ConnectConfig, Vec<Channel>), String> {
    let space = space_of(&args.space)?;
    let channels = args
        .join
        .iter()
        .filter(|c| !c.is_empty())
        .map(|c| channel_of(c))
        .collect::<Result<Vec<_>, _>>()?;
    let mut options = AgentOptions::new(space.as_str(), id.as_str());
    options.name = args.name.clone();
    options.channels = channels.iter().map(|c| c.as_str().to_owned()).collect();
    options.roles = args
        .role
        .iter()
        .filter(|r| !r.is_empty())
        .cloned()
        .collect();
    for role in &options.roles {
        role_of(role)?;
    }
    options.durable_backstop = !args.live_only;
    options.create_consumers = args.create_dlv_consumer;
    options.close_grace = STOP_GRACE;
    let mut connect_config = args.nats.config()?;
    connect_config.inbox_prefix = Some(id.inbox_prefix());
    connect_config.name = Some(format!("cotal-agent-{}", id.as_str()));
    Ok((options, connect_config, channels))
}

async fn run_agent(args: AgentArgs, id: AgentId) -> Result<ExitCode, String> {
    let (mut options, connect_config, channels) = agent_options(&args, &id)?;
    // The agent prints its own `connected` line and refuses a request made before it with
    // "reconnecting": no wait (and no time limit) for it to be ready.
    options.wait_ready = false;
    let listener = metrics_listener(args.metrics).await?;
    let (agent, mut events) = AppAgent::connect_with_events(&connect_config, options)
        .await
        .map_err(|e| e.to_string())?;
    let server = listener.map(|listener| serve_agent_metrics(listener, &args.space, &id, &agent));
    let mut messages = agent.messages();
    // Stdin lines are run one after the other, in order, each to its outcome; the loop below
    // keeps printing meanwhile. The task ends when stdin does and its last line is done.
    let mut lines = tokio::spawn({
        let agent = agent.clone();
        let mut stdin = stdin_lines();
        async move {
            while let Some(line) = stdin.recv().await {
                agent_line(&agent, &channels, &line).await;
            }
        }
    });
    let signal = terminate_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            _ = &mut lines => break,
            event = events.next() => match event {
                Some(AgentEvent::MessagesReady { .. }) => {}
                Some(event) => print_agent_event(&event),
                None => return Err("the agent's runner stopped".to_owned()),
            },
            message = messages.next() => match message {
                Some(m) => {
                    println!("{}", m.to_json());
                    if let Err(e) = m.handled().await {
                        eprintln_line(&format!("cannot report {} handled: {e}", m.id()));
                    }
                }
                None => return Err("the agent's runner stopped".to_owned()),
            },
        }
    }
    lines.abort();
    // Print what already arrived, then stop (offline presence) and wait for it.
    while let Some(Some(event)) = events.next().now_or_never() {
        if !matches!(event, AgentEvent::MessagesReady { .. }) {
            print_agent_event(&event);
        }
    }
    if let Some(server) = server {
        server.abort();
    }
    let _ = agent.close().await;
    Ok(ExitCode::SUCCESS)
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `--metrics` of an agent: its OpenMetrics endpoint on `listener`, rendered at each scrape.
fn serve_agent_metrics(
    listener: tokio::net::TcpListener,
    space: &str,
    id: &AgentId,
    agent: &AppAgent,
) -> tokio::task::JoinHandle<()> {
    let metrics = Arc::new(AgentMetrics::new(space, id.as_str()));
    let agent = agent.clone();
    let render: Render = Arc::new(move || {
        let (agent, metrics) = (agent.clone(), metrics.clone());
        Box::pin(async move { metrics.render(agent.health().await.ok().as_ref()) })
    });
    serve(listener, render)
}

/// `cotal mcp`: the agent of `args` as an MCP server on stdio until the client leaves or a
/// signal; stdout carries the protocol only. `--metrics` serves the agent's metrics as `cotal
/// agent --metrics` does.
pub(crate) async fn mcp(args: AgentArgs) -> ExitCode {
    let id = match args.nats.identity(args.id.as_deref(), true).resolve() {
        Ok(Some(id)) => id,
        Ok(None) => return fail("no agent id"),
        Err(code) => return code,
    };
    let run = async {
        let (options, connect_config, _) = agent_options(&args, &id)?;
        let listener = metrics_listener(args.metrics).await?;
        // Ready (connected, registry loaded, boot joins answered) before the first tool call.
        let (agent, events) = AppAgent::connect_with_events(&connect_config, options)
            .await
            .map_err(|e| e.to_string())?;
        let _metrics = listener
            .map(|listener| AbortOnDrop(serve_agent_metrics(listener, &args.space, &id, &agent)));
        for (channel, result) in agent.boot_joins() {
            if let Err(e) = result {
                tracing::warn!(target: "cotal", "join of {}: {e}", channel.as_str());
            }
        }
        cotal_driver_tokio::mcp::serve_stdio(
            agent,
            events,
            cotal_driver_tokio::mcp::ServeOptions::default(),
            terminate_signal(),
        )
        .await
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

/// Lines of stdin, read on a plain thread (a blocking read cannot be cancelled, and a thread of
/// its own does not hold the runtime's shutdown).
fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[allow(clippy::print_stderr)]
fn eprintln_line(msg: &str) {
    eprintln!("cotal: error: {msg}");
}

fn print_agent_event(event: &AgentEvent) {
    let line = match event {
        AgentEvent::Connected { first } => json!({"event": "connected", "first": first}),
        AgentEvent::Disconnected => json!({"event": "disconnected"}),
        AgentEvent::Joined {
            request,
            channel,
            report,
        } => json!({
            "event": "joined",
            "request": request.map(|r| r.0),
            "channel": channel.as_str(),
            "joined": report.joined,
            "durable": report.durable,
            "generation": report.generation,
            "watermark": report.watermark,
            "backfilled": report.backfilled,
            "reason": report.reason,
        }),
        AgentEvent::JoinFailed {
            request,
            channel,
            error,
        } => json!({
            "event": "join_failed",
            "request": request.map(|r| r.0),
            "channel": channel.as_str(),
            "error": error.to_string(),
        }),
        AgentEvent::Left {
            request,
            channel,
            tombstoned,
        } => json!({
            "event": "left",
            "request": request.0,
            "channel": channel.as_str(),
            "tombstoned": tombstoned,
        }),
        AgentEvent::LeaveFailed {
            request,
            channel,
            error,
        } => json!({
            "event": "leave_failed",
            "request": request.0,
            "channel": channel.as_str(),
            "error": error.to_string(),
        }),
        AgentEvent::ChannelRefused {
            channel,
            detail,
            closing,
        } => json!({
            "event": "channel_refused",
            "channel": channel.as_str(),
            "detail": detail,
            "closing": closing,
        }),
        AgentEvent::BackstopEstablished {
            channel,
            generation,
        } => json!({
            "event": "backstop_established",
            "channel": channel.as_str(),
            "generation": generation,
        }),
        AgentEvent::BackstopDegraded { channel, reason } => json!({
            "event": "backstop_degraded",
            "channel": channel.as_str(),
            "reason": reason,
        }),
        AgentEvent::MembershipClosed {
            channel,
            generation,
        } => json!({
            "event": "membership_closed",
            "channel": channel.as_str(),
            "generation": generation,
        }),
        AgentEvent::MembershipCloseRetrying {
            channel,
            generation,
            attempts,
            error,
        } => json!({
            "event": "membership_close_retrying",
            "channel": channel.as_str(),
            "generation": generation,
            "attempts": attempts,
            "error": error,
        }),
        AgentEvent::Anomaly { subject, rejection } => json!({
            "event": "anomaly",
            "subject": subject,
            "rejection": format!("{rejection:?}"),
        }),
        AgentEvent::Lost { id, reason } => json!({"event": "lost", "id": id, "reason": reason}),
        AgentEvent::CopiesLost {
            ranges,
            more,
            total,
        } => json!({
            "event": "copies_lost",
            "ranges": ranges
                .iter()
                .map(|r| json!({
                    "channel": r.channel,
                    "first": r.first,
                    "last": r.last,
                    "count": r.count,
                    "exact": r.exact,
                    "reason": r.reason.as_str(),
                }))
                .collect::<Vec<_>>(),
            "more": {"ranges": more.ranges, "count": more.count},
            "total": total,
        }),
        AgentEvent::LiveCopyShed { id, channel } => {
            json!({"event": "live-copy-shed", "id": id, "channel": channel.as_str()})
        }
        AgentEvent::Sent {
            request,
            id,
            seq,
            duplicate,
        } => json!({
            "event": "sent",
            "request": request.0,
            "id": id,
            "seq": seq,
            "duplicate": duplicate,
        }),
        AgentEvent::MessageIdCollided { request, old, new } => json!({
            "event": "message_id_collided",
            "request": request.0,
            "old": old,
            "new": new,
        }),
        AgentEvent::SendFailed {
            request,
            id,
            error,
            unknown,
        } => json!({
            "event": "send_failed",
            "request": request.0,
            "id": id,
            "error": error,
            "unknown": unknown,
        }),
        AgentEvent::DirectUnbound {
            consumer,
            attempts,
            detail,
        } => json!({
            "event": "direct_unbound",
            "consumer": consumer,
            "attempts": attempts,
            "detail": detail,
        }),
        AgentEvent::MessagesReady { queued } => json!({"event": "messages", "queued": queued}),
        AgentEvent::MembershipLost {
            channel,
            generation,
        } => json!({
            "event": "membership_lost",
            "channel": channel.as_str(),
            "generation": generation,
        }),
        AgentEvent::MembershipOrphaned {
            channel,
            generation,
        } => json!({
            "event": "membership_orphaned",
            "channel": channel.as_str(),
            "generation": generation,
        }),
        other => json!({"event": "other", "detail": format!("{other:?}")}),
    };
    println!("{line}");
}

/// One stdin line: a command or a post to the first joined channel. A refusal is printed here;
/// an outcome (joined, sent, failed …) comes as the agent's event line.
async fn agent_line(agent: &AppAgent, boot: &[Channel], line: &str) {
    let line = line.trim();
    if line.is_empty() {
        return;
    }
    let result = match parse_line(line) {
        Err(e) => Err(e),
        Ok(Line::Join(ch)) => match agent.join(ch.as_str()).await {
            Err(JoinError::Refused(e)) => Err(e.to_string()),
            Err(e @ (JoinError::InvalidChannel { .. } | JoinError::Closed)) => Err(e.to_string()),
            _ => Ok(()),
        },
        Ok(Line::Leave(ch)) => match agent.leave(ch.as_str()).await {
            Err(LeaveError::Refused(e)) => Err(e.to_string()),
            Err(e @ (LeaveError::InvalidChannel { .. } | LeaveError::Closed)) => Err(e.to_string()),
            _ => Ok(()),
        },
        Ok(Line::Send(ch, text)) => sent(agent.send(ch.as_str(), text).await),
        Ok(Line::Dm(to, text)) => sent(agent.send_dm(to.as_str(), text).await),
        Ok(Line::Anycast(role, text)) => sent(agent.send_anycast(role.as_str(), text).await),
        Ok(Line::Post(text)) => match first_joined(agent, boot).await {
            Some(ch) => sent(agent.send(ch.as_str(), text).await),
            None => Err("no joined channel to post to (use /join CH or /send CH text)".into()),
        },
    };
    if let Err(e) = result {
        eprintln_line(&e);
    }
}

/// A send's refusal as an error line; its outcome is the `sent` / `send_failed` event line.
fn sent(result: Result<AppSent, SendError>) -> Result<(), String> {
    match result {
        Err(SendError::Refused(e)) => Err(e.to_string()),
        Err(e @ (SendError::Invalid { .. } | SendError::Closed)) => Err(e.to_string()),
        _ => Ok(()),
    }
}

/// The first of the `--join` channels still joined, else the first joined channel.
async fn first_joined(agent: &AppAgent, boot: &[Channel]) -> Option<Channel> {
    let joined: Vec<Channel> = agent
        .health()
        .await
        .ok()?
        .channels
        .into_iter()
        .map(|c| c.channel)
        .collect();
    boot.iter()
        .find(|c| joined.contains(c) && c.is_concrete())
        .or_else(|| joined.iter().find(|c| c.is_concrete()))
        .cloned()
}

/// A parsed stdin line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    Join(Channel),
    Leave(Channel),
    Send(Channel, String),
    Dm(AgentId, String),
    Anycast(Role, String),
    Post(String),
}

/// Parses one non-empty stdin line.
pub(crate) fn parse_line(line: &str) -> Result<Line, String> {
    let Some(rest) = line.strip_prefix('/') else {
        return Ok(Line::Post(line.to_owned()));
    };
    let (cmd, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let args = args.trim();
    match cmd {
        "join" | "leave" => {
            if args.is_empty() || args.contains(char::is_whitespace) {
                return Err(format!("usage: /{cmd} CHANNEL"));
            }
            let ch = channel_of(args)?;
            Ok(if cmd == "join" {
                Line::Join(ch)
            } else {
                Line::Leave(ch)
            })
        }
        "send" => {
            let Some((ch, text)) = args.split_once(char::is_whitespace) else {
                return Err("usage: /send CHANNEL TEXT".to_owned());
            };
            Ok(Line::Send(channel_of(ch)?, text.trim().to_owned()))
        }
        "dm" => {
            let Some((to, text)) = args.split_once(char::is_whitespace) else {
                return Err("usage: /dm ID TEXT".to_owned());
            };
            Ok(Line::Dm(agent_of(to)?, text.trim().to_owned()))
        }
        "anycast" => {
            let Some((role, text)) = args.split_once(char::is_whitespace) else {
                return Err("usage: /anycast ROLE TEXT".to_owned());
            };
            Ok(Line::Anycast(role_of(role)?, text.trim().to_owned()))
        }
        other => Err(format!(
            "unknown command '/{other}' (use /join CH, /leave CH, /send CH text, /dm ID text, \
             /anycast ROLE text, or plain text)"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// cotal send
// ---------------------------------------------------------------------------------------------

pub(crate) async fn send(args: SendArgs) -> ExitCode {
    let id = match args.nats.identity(args.id.as_deref(), true).resolve() {
        Ok(Some(id)) => id,
        Ok(None) => return fail("no sender id"),
        Err(code) => return code,
    };
    match run_send(args, id).await {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

/// Where `cotal send` sends: exactly one routing field.
enum SendRoute {
    Channel(Channel),
    Dm(AgentId),
    Anycast(Role),
}

async fn run_send(args: SendArgs, id: AgentId) -> Result<ExitCode, String> {
    let space = space_of(&args.space)?;
    let me = sender_of(id, args.name.as_deref());
    let route = match (&args.channel, &args.to, &args.role) {
        (Some(name), None, None) => {
            let channel = channel_of(name)?;
            if !channel.is_concrete() {
                return Err(format!("cannot post to wildcard channel '{name}'"));
            }
            SendRoute::Channel(channel)
        }
        (None, Some(to), None) => SendRoute::Dm(agent_of(to)?),
        (None, None, Some(role)) => SendRoute::Anycast(role_of(role)?),
        _ => return Err("give exactly one of --channel, --to, --role".to_owned()),
    };
    let mut config = AgentConfig::new(space.clone(), me, Vec::new(), os_seed());
    config.durable_backstop = false;
    config.heartbeat = None;
    let (runner, connect_config) = start_agent(&args.nats, config).await?;
    let Runner {
        handle,
        mut events,
        task,
    } = runner;
    let wait = connect_config.request_timeout + Duration::from_secs(1);
    let ready = tokio::time::timeout(wait, async {
        while let Some(event) = events.recv().await {
            if let AgentEvent::Connected { .. } = event {
                return true;
            }
        }
        false
    })
    .await;
    if ready != Ok(true) {
        return Err(format!("the agent was not ready within {wait:?}"));
    }
    let text = args.text.clone();
    let stream = match &route {
        SendRoute::Channel(_) => SpaceStream::Chat,
        SendRoute::Dm(_) => SpaceStream::Dm,
        SendRoute::Anycast(_) => SpaceStream::Task,
    }
    .name(&space);
    let (request, id) = match route {
        SendRoute::Channel(channel) => handle.send_text(channel, text).await,
        SendRoute::Dm(to) => handle.send_dm_text(to, text).await,
        SendRoute::Anycast(role) => handle.send_anycast_text(role, text).await,
    }
    .map_err(|e| e.to_string())?;
    let outcome = tokio::time::timeout(wait, async {
        while let Some(event) = events.recv().await {
            match event {
                AgentEvent::Sent {
                    request: r,
                    id: stored,
                    seq,
                    duplicate,
                } if r == request => {
                    if stored != id {
                        tracing::warn!(
                            target: "cotal",
                            "message id {id} was already taken in the stream; sent as {stored}"
                        );
                    }
                    return Ok((stored, seq, duplicate));
                }
                AgentEvent::SendFailed {
                    request: r,
                    error,
                    unknown,
                    ..
                } if r == request => {
                    return Err(if unknown {
                        format!("send of {id} outcome unknown: {error} (resend with the same id)")
                    } else {
                        format!("send of {id} failed: {error}")
                    });
                }
                _ => {}
            }
        }
        Err("the agent's runner stopped".to_owned())
    })
    .await
    .unwrap_or_else(|_| Err(format!("send of {id}: no acknowledgement within {wait:?}")));
    let _ = handle.stop(STOP_GRACE);
    let _ = task.await;
    let (stored, seq, duplicate) = outcome?;
    if args.json {
        println!(
            "{}",
            json!({"id": stored, "seq": seq, "duplicate": duplicate, "stream": stream})
        );
    } else {
        println!("{seq}{}", if duplicate { " (duplicate)" } else { "" });
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// cotal members / health / channels: KV reads
// ---------------------------------------------------------------------------------------------

/// Every live (not deleted) entry of a bucket, by key.
async fn kv_entries(
    nats: &NatsArgs,
    space: &Space,
    bucket: KvBucket,
) -> Result<Vec<(String, Bytes)>, String> {
    let config = nats.operator_config()?;
    let conn = connect_with(&config).await?;
    check_provisioned(&conn, space, config.request_timeout).await?;
    let name = bucket.name(space);
    let js = async_nats::jetstream::new(conn.client.clone());
    let kv = js
        .get_key_value(&name)
        .await
        .map_err(|e| format!("cannot open KV bucket {name}: {e}"))?;
    let work = async {
        let mut keys = match kv.keys().await {
            Ok(k) => k,
            Err(e) => return Err(format!("cannot list keys of {name}: {e}")),
        };
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            names.push(key.map_err(|e| format!("cannot list keys of {name}: {e}"))?);
        }
        names.sort();
        let mut out = Vec::new();
        for key in names {
            match kv.get(&key).await {
                Ok(Some(v)) => out.push((key, v)),
                Ok(None) => {}
                Err(e) => return Err(format!("cannot read {name}/{key}: {e}")),
            }
        }
        Ok(out)
    };
    tokio::time::timeout(config.request_timeout * 4, work)
        .await
        .unwrap_or_else(|_| Err(format!("reading {name} timed out")))
}

pub(crate) async fn members(args: MembersArgs) -> ExitCode {
    if args.orphans {
        return crate::lifecycle::members_orphans(&args.nats, &args.space, args.json).await;
    }
    let only = match args.channel.as_deref().map(channel_of).transpose() {
        Ok(only) => only,
        Err(e) => return crate::usage(e),
    };
    let run = async {
        let space = space_of(&args.space)?;
        let entries = kv_entries(&args.nats, &space, KvBucket::Members).await?;
        let total = entries.len();
        let mut shown = 0usize;
        for (key, value) in entries {
            let record: MembershipRecord = match serde_json::from_slice(&value) {
                Ok(r) => r,
                Err(e) if args.json => {
                    println!(
                        "{}",
                        json!({"key": key, "error": format!("undecodable: {e}")})
                    );
                    continue;
                }
                Err(e) => {
                    println!("{key}: undecodable record: {e}");
                    continue;
                }
            };
            // The protocol's subject matching: a concrete filter matches itself only.
            if let Some(ch) = &only
                && !subject_matches(ch.as_str(), record.channel.as_str())
            {
                continue;
            }
            shown += 1;
            if args.json {
                let mut line = json!({"key": key});
                if let (Some(line), Ok(Value::Object(fields))) =
                    (line.as_object_mut(), serde_json::to_value(&record))
                {
                    line.extend(fields);
                }
                println!("{line}");
                continue;
            }
            println!(
                "{} {} generation={} joinCursor={} leaveCursor={} activated={} state={}",
                record.channel.as_str(),
                record.owner.as_str(),
                record.generation,
                record.join_cursor,
                record
                    .leave_cursor
                    .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                record.activated.unwrap_or(false),
                serde_json::to_value(record.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            );
        }
        match &only {
            _ if args.json => {}
            Some(ch) => println!(
                "{shown} membership record(s) on channels matching {} ({total} in the space)",
                ch.as_str()
            ),
            None => println!("{shown} membership record(s)"),
        }
        Ok::<_, String>(ExitCode::SUCCESS)
    };
    run.await.unwrap_or_else(fail)
}

pub(crate) async fn health(args: SpaceArgs) -> ExitCode {
    let run = async {
        let space = space_of(&args.space)?;
        let entries = kv_entries(&args.nats, &space, KvBucket::Delivery).await?;
        let now = wall_clock();
        let mut all_active = true;
        let mut shards = Vec::new();
        for (key, value) in entries {
            if !key.starts_with(cotal_core::constants::LEASE_KEY_PREFIX) {
                continue;
            }
            let record: Option<DeliveryLease> = serde_json::from_slice(&value).ok();
            let verdict = judge_health(record.as_ref(), now, LEASE_TTL);
            all_active &= matches!(verdict, LeaseHealth::Active { .. });
            let published = record
                .as_ref()
                .and_then(|r| r.extra.get(HEALTH_FIELD))
                .cloned();
            // Memberships whose owner is offline beyond the daemon's retention (G12): shown
            // here as well as by `members --orphans`, never only in the daemon's log.
            let orphans = record
                .as_ref()
                .and_then(|r| r.extra.get(ORPHANS_FIELD))
                .and_then(|o| o.get("count"))
                .and_then(Value::as_u64);
            shards.push((key, verdict, published, orphans));
        }
        if shards.is_empty() {
            all_active = false;
        }
        // Consumer headroom (issue 22): each stream under 10 % free is named.
        let config = args.nats.operator_config()?;
        let conn = connect_with(&config).await?;
        let headroom = space_headroom(&conn.client, &space, config.request_timeout).await;
        if headroom
            .iter()
            .any(|(_, h)| h.as_ref().map_or(true, |h| h.is_low()))
        {
            all_active = false;
        }
        if args.json {
            println!("{}", health_json(&space, all_active, &shards, &headroom));
        } else {
            print_health(&space, &shards, &headroom);
        }
        Ok::<_, String>(if all_active {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(3)
        })
    };
    run.await.unwrap_or_else(fail)
}

/// One lease key of `cotal health`: its verdict, its published health and orphan count.
type ShardHealth = (String, LeaseHealth, Option<Value>, Option<u64>);

/// Each stream's consumer headroom, or why it could not be read.
type StreamHeadroom = Vec<(String, Result<Headroom, ApiError>)>;

fn print_health(space: &Space, shards: &[ShardHealth], headroom: &StreamHeadroom) {
    for (key, verdict, published, orphans) in shards {
        let text = match verdict {
            LeaseHealth::Active { holder } => format!("active (holder {holder})"),
            LeaseHealth::Degraded(reason) => format!("degraded: {reason:?}"),
            other => format!("{other:?}"),
        };
        let published = published
            .as_ref()
            .map_or_else(|| "-".to_owned(), Value::to_string);
        let orphans = orphans.map_or_else(String::new, |n| format!("; orphaned memberships {n}"));
        println!("{key}: {text}; published health {published}{orphans}");
    }
    if shards.is_empty() {
        println!(
            "no delivery lease: no daemon serves space '{}'",
            space.as_str()
        );
    }
    let mut low = 0usize;
    for (stream, headroom) in headroom {
        match headroom {
            Ok(h) if h.is_low() => {
                low += 1;
                println!(
                    "stream {stream}: consumer headroom low: {} of {} used, {} free{}; \
                     raise it with `cotal up --space {} --max-agents <more>`",
                    h.consumers,
                    h.cap,
                    h.free(),
                    if h.server_default {
                        " (the server's default cap: the stream has none of its own)"
                    } else {
                        ""
                    },
                    space.as_str()
                );
            }
            Ok(_) => {}
            Err(e) => println!("stream {stream}: cannot read its consumer count: {e}"),
        }
    }
    if low == 0 {
        println!(
            "consumer headroom: every stream has at least {LOW_HEADROOM_PERCENT} % of its \
             cap free"
        );
    }
}

/// `cotal health --json`: `{"space", "healthy", "shards": [{"key", "state", "holder"?,
/// "detail"?, "published", "orphans"}], "streams": [{"stream", "consumers", "cap", "free",
/// "low", "serverDefault"} or {"stream", "error"}]}`.
fn health_json(
    space: &Space,
    healthy: bool,
    shards: &[ShardHealth],
    headroom: &StreamHeadroom,
) -> Value {
    let shards: Vec<Value> = shards
        .iter()
        .map(|(key, verdict, published, orphans)| {
            let mut v = json!({"key": key, "published": published, "orphans": orphans});
            match verdict {
                LeaseHealth::Active { holder } => {
                    v["state"] = json!("active");
                    v["holder"] = json!(holder);
                }
                LeaseHealth::Degraded(reason) => {
                    v["state"] = json!("degraded");
                    v["detail"] = json!(format!("{reason:?}"));
                }
                other => {
                    v["state"] = json!("not-active");
                    v["detail"] = json!(format!("{other:?}"));
                }
            }
            v
        })
        .collect();
    let streams: Vec<Value> = headroom
        .iter()
        .map(|(stream, h)| match h {
            Ok(h) => json!({
                "stream": stream,
                "consumers": h.consumers,
                "cap": h.cap,
                "free": h.free(),
                "low": h.is_low(),
                "serverDefault": h.server_default,
            }),
            Err(e) => json!({"stream": stream, "error": e.to_string()}),
        })
        .collect();
    json!({
        "space": space.as_str(),
        "healthy": healthy,
        "shards": shards,
        "streams": streams,
    })
}

pub(crate) async fn channels(args: SpaceArgs) -> ExitCode {
    let run = async {
        let space = space_of(&args.space)?;
        let entries = kv_entries(&args.nats, &space, KvBucket::Channels).await?;
        let mut registry = ChannelRegistry::default();
        let mut ignored = Vec::new();
        for (key, value) in &entries {
            if let Err(e) = registry.apply(key, Some(value)) {
                ignored.push(json!({"key": key, "error": e.to_string()}));
                if !args.json {
                    println!("{key}: ignored: {e}");
                }
            }
        }
        let class = |c: DeliveryClass| match c {
            DeliveryClass::Live => "live",
            DeliveryClass::Durable => "durable",
        };
        let defaults = registry.defaults.as_ref().map(|d| d.to_object());
        let mut channels = Vec::new();
        for (channel, config) in &registry.channels {
            // A concrete channel is always a valid channel name.
            let Ok(as_channel) = channel_of(channel.as_str()) else {
                continue;
            };
            let policy = registry.policy_for(&as_channel);
            channels.push(json!({
                "channel": channel.as_str(),
                "class": class(policy.delivery_class),
                "replay": policy.replay,
                "config": config.to_object(),
            }));
        }
        if args.json {
            println!(
                "{}",
                json!({
                    "space": space.as_str(),
                    "defaults": defaults,
                    "channels": channels,
                    "ignored": ignored,
                })
            );
            return Ok(ExitCode::SUCCESS);
        }
        let defaults = defaults.map_or_else(
            || "(none: durable)".to_owned(),
            |d| serde_json::to_string(&d).unwrap_or_default(),
        );
        println!("defaults {defaults}");
        for c in &channels {
            println!(
                "{} class={} replay={} config={}",
                c["channel"].as_str().unwrap_or_default(),
                c["class"].as_str().unwrap_or_default(),
                c["replay"],
                c["config"]
            );
        }
        println!("{} channel(s)", registry.channels.len());
        Ok::<_, String>(ExitCode::SUCCESS)
    };
    run.await.unwrap_or_else(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdin_lines_parse_into_commands_or_posts() {
        let ch = |s: &str| Channel::new(s).expect("channel");
        assert_eq!(parse_line("hello"), Ok(Line::Post("hello".into())));
        assert_eq!(parse_line("/join general"), Ok(Line::Join(ch("general"))));
        assert_eq!(parse_line("/leave  team.x"), Ok(Line::Leave(ch("team.x"))));
        assert_eq!(
            parse_line("/send general two words"),
            Ok(Line::Send(ch("general"), "two words".into()))
        );
        assert!(parse_line("/join").is_err());
        assert!(parse_line("/join a b").is_err());
        assert!(parse_line("/send general").is_err());
        assert!(parse_line("/frobnicate x").is_err());
        assert!(parse_line("/join bad..name").is_err());
    }

    #[test]
    fn stdin_lines_address_an_instance_or_a_role() {
        let id = "UDI36ZKVNUM5WMO4QQ6HDQU7F4OH2RCXOJRX6GAIOS5SKVNNSKCDNLJA";
        assert_eq!(
            parse_line(&format!("/dm {id} a direct note")),
            Ok(Line::Dm(
                AgentId::new(id).expect("id"),
                "a direct note".into()
            ))
        );
        assert_eq!(
            parse_line("/anycast reviewer please review"),
            Ok(Line::Anycast(
                Role::new("reviewer").expect("role"),
                "please review".into()
            ))
        );
        assert!(parse_line("/dm").is_err());
        assert!(parse_line(&format!("/dm {id}")).is_err());
        assert!(parse_line("/dm bad.id text").is_err(), "an id is one token");
        assert!(parse_line("/anycast reviewer").is_err());
        assert!(parse_line("/anycast re.viewer text").is_err());
    }
}
