//! `cotal chaos`: faults on real infrastructure while messages flow and members come and go
//! (issue 9, faults half).
//!
//! The run: a fresh space with one durable channel (`replay: false`), M member agents in this
//! process (each with its ACL record and DLV consumer), a publisher task posting at a steady rate
//! for the duration (one publish at a time, each with its msg-id and awaited ack), and the
//! delivery daemon as a **child process** (`cotal delivery`, this same binary, its log kept under
//! `<temp>/cotal-chaos-<pid>/`). A seeded schedule injects faults, one per slot so outages never
//! overlap (`--faults`, default a seeded mix of all three):
//!
//! - `daemon-kill`: SIGKILL of the daemon by its PID; after a seeded pause (< 3 s) a successor
//!   with a new id starts and takes the lease once the dead holder's entry expires (30 s);
//! - `server-stop`: SIGTERM of nats-server (clean shutdown), restarted after 1–5 s on the same
//!   port and file store;
//! - `server-kill`: SIGKILL of nats-server, restarted the same way. The spawned server runs with
//!   `sync_interval: always`, so an acked publish is on disk before its ack;
//! - `long-outage` (only when asked for): SIGKILL of nats-server, restarted 35–40 s later, past
//!   the daemon's lease window: the daemon must ride it out in process (issue 19);
//! - `partition` (only when asked for, with `--spawn-server`, not `--cluster`): the daemon is cut
//!   off the network while it and the server live. The run makes a network namespace
//!   `cotal-chaos-<pid>` and a veth pair to it on a /30 of 198.18.0.0/15 picked from the PID
//!   ([`Netns`]), the spawned server listens on every interface (the harness and the members
//!   still connect on loopback), and every daemon is started inside the namespace (`ip netns
//!   exec`) on the root side's address. A partition takes the root side of the pair down for a
//!   seeded 5–15 s (at most half the slot), then up. The namespace and the pair are removed at
//!   the end of the run, also when it fails; where `ip` or the kernel refuses them the run fails
//!   at once saying partitions are unavailable here (issue 19);
//! - `stuck-member` (only when asked for): a seeded member (one that starts joined) hangs: its
//!   application loop takes no message and calls no `handled` for min(60 s, half the slot), so
//!   its agent, which acks a durable copy only after `handled`, acks none of its DLV copies
//!   (its DLV consumer stops delivering at `max_ack_pending`) while the agent machine itself
//!   runs on; then the loop resumes and takes everything ready. The stall lies in the second
//!   part of its slot, so the window of equal length before it is in the same slot (issue 19).
//!
//! and membership churn (`--churn`): a seeded member leaves the channel and rejoins 1–5 s later
//! (a request the agent refuses, e.g. during an outage, is shown in the timeline and changes
//! nothing), and late joiners (`--late-joiners`, default one per three members) that start
//! without the channel and join it in the first half of the run. The harness also **supervises** the daemon like a service manager: a daemon that
//! exits on its own (it does when its lease is lost, e.g. after outages longer than the lease's
//! safety window) is restarted, counted and shown.
//!
//! # What is expected, and the check
//!
//! A publish the broker never acked (error or timeout during an outage) is not expected anywhere.
//! An acked message with CHAT sequence `s` is owed to member `m` exactly when `s` lies in one of
//! the intervals of `m`'s membership record after the run: `join cursor < s ≤ leave cursor` for
//! the current interval (open while no leave cursor) and for every closed interval the record
//! keeps (`closedIntervals`). The records are the judge; no boundary window is excused.
//!
//! After the duration the run heals (outages end, no more faults) until every member surfaced as
//! many distinct messages as it is owed and that held for 3 s, **and** every owed copy is in the
//! member's DLV subject, or `--heal-s` passes. Then, per member and by message id:
//!
//! - `copies_expected`: owed (message, member) pairs;
//! - `delivered`: owed pairs the member surfaced (live, history or DLV);
//! - `losses_reported`: owed pairs reported lost: the members' loss events (by id) and the owed
//!   copies inside the loss ranges the daemon recorded and the agents reported (`CopiesLost`,
//!   by CHAT sequence; also alone as `losses_reported_by_daemon`: a copy shed at an owner's cap
//!   or share, for example); `losses_unreported`: owed pairs neither surfaced nor reported
//!   lost. Must be 0 (the exit code says so);
//! - `durable_missing`: owed pairs with no DLV copy (the durable path alone, which a live copy
//!   can hide), with a diagnosis of where the path stopped (CHAT, INBOX, the fan-out consumer);
//!   `durable_outside_intervals`: DLV copies of acked messages outside every interval (a leak);
//! - `duplicates_surfaced`: second surfacings to the application (must be 0);
//!   `duplicates_suppressed`: DLV copies the ledger took as duplicates of a live copy.
//!
//! DLV keeps 1000 copies per member (discard old): once a member's subject is at the cap, owed
//! copies older than its oldest retained one are counted as `dlv_rotated`, not missing.
//!
//! How fast durable delivery recovered ([`Recovery`], from each owed copy's ack time and its DLV
//! store time): `heal_s`, the longest per server fault from the restart to the last copy owed
//! then; `takeover_s`, the longest per daemon kill from the kill to the next DLV write; `stall_s`,
//! the longest time with an owed copy outstanding and no DLV write. `heal_phase_s` is how long
//! the final heal phase waited. A partition counts as a server fault here: its heal runs from
//! the moment the link is up again.
//!
//! A `stuck-member` stall is judged from every DLV copy as it is stored (a tap on DLV from the
//! run's start; the subjects keep too few copies to count at the end): `stuck_member` (the
//! stall with the lowest ratio; every stall in `stuck_members`) gives the others' DLV copies
//! per second during the stall and in the window of equal length before it, their `ratio`
//! (issue 19's target: at least 0.8), what the acks in each window owed the others (churn and
//! late joins move it), the stalled member's DLV consumer at the resume (copies left unacked:
//! the stall was real) and after the heal, and its catch-up: every copy owed to it by the
//! resume surfaced or reported lost (`caught_up`), and `catch_up_s` from the resume to the
//! surfacing of the last of them.

use super::bench::{
    SpawnedServer, durable_channel_for, free_port, spawn_daemon_process_in, start_member_pausable,
    target_server,
};
use super::progress::Progress;
use crate::connect::{ConnectConfig, connect};
use crate::provision::{SpacePlan, apply};
use crate::run::{os_key, wall_clock};
use bytes::Bytes;
use clap::Args;
use cotal_core::agent::AgentConfig;
use cotal_core::constants::LEASE_TTL;
use cotal_core::registry::{closed_intervals, current_interval, forgotten_intervals};
use cotal_core::wire::config::ConsumerSpec;
use cotal_core::wire::keys::{KvBucket, member_key};
use cotal_core::wire::message::Sender;
use cotal_core::wire::records::MembershipRecord;
use cotal_core::wire::token::{AgentId, Channel, ConcreteChannel, Space};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const CHANNEL: &str = "chaos";

/// `cotal chaos`.
#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// NATS server URL (no authentication).
    #[arg(long, conflicts_with = "spawn_server")]
    nats: Option<String>,
    /// Start a local nats-server (COTAL_NATS_SERVER, else .venv/bin/nats-server) for the run.
    #[arg(long)]
    spawn_server: bool,
    /// The seed of the fault schedule (same seed, same kill points and pauses).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds of traffic with faults.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Member agents on the durable channel.
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Messages per second.
    #[arg(long, default_value_t = 20)]
    rate: u64,
    /// Seconds the heal phase may take.
    #[arg(long, default_value_t = 120)]
    heal_s: u64,
    /// The fault kinds, comma-separated: daemon-kill, server-stop (SIGTERM), server-kill
    /// (SIGKILL); with --cluster also node-stop (SIGTERM of a node that does not lead CHAT) and
    /// leader-kill (SIGKILL of the node leading CHAT); long-outage (SIGKILL of the one server,
    /// restarted after 35–40 s, past the daemon's lease window; not in the default mix, and it
    /// needs 41 s of run per fault); partition (the daemon runs in a network namespace of its
    /// own, cut off for 5–15 s while it and the server live; needs root, `ip` and
    /// --spawn-server, whose server then listens on every interface; not in the default mix);
    /// stuck-member (a seeded member's application takes and acks nothing for min(60 s, half
    /// the slot), then resumes; the others' DLV rate is compared with the window before; not in
    /// the default mix). Each fault point picks one kind with the seed. Server faults need
    /// --spawn-server. Default: daemon-kill, server-stop, server-kill (node-stop and
    /// leader-kill with --cluster; daemon-kill alone with --nats).
    #[arg(long)]
    faults: Option<String>,
    /// Spawn a JetStream cluster of this many nodes (routes on loopback) instead of one server,
    /// and provision every stream and KV bucket with min(N, 3) replicas.
    #[arg(long, requires = "spawn_server")]
    cluster: Option<usize>,
    /// Fault points in the run (default: one per 30 s, at least one).
    #[arg(long)]
    fault_count: Option<u64>,
    /// Leave/rejoin cycles of members (default: one per 15 s of run).
    #[arg(long)]
    churn: Option<u64>,
    /// Members that start without the channel and join it at a seeded point of the first half
    /// of the run (default: one per three members).
    #[arg(long)]
    late_joiners: Option<usize>,
    /// Run a standby daemon beside the serving one (`cotal delivery` started twice for the
    /// shard): a `daemon-kill` kills whichever holds the lease, the standby takes over once the
    /// dead holder's lease expires, and the restarted process becomes the next standby.
    #[arg(long)]
    standby: bool,
    /// Provision the space with this delivery lease TTL in seconds (`cotal up --lease-ttl`):
    /// how long a dead holder's lease blocks its successor. Default: the reference's 30.
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..=3600))]
    lease_ttl: Option<u64>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// A seeded xorshift64*: the fault schedule, nothing else.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// The daemon child, killed by its PID.
struct DaemonChild {
    child: Child,
    id: String,
    /// Its stderr (tracing lines).
    log: std::path::PathBuf,
}

/// Starts daemon number `n` on `url`, inside the network namespace `netns` when given.
fn spawn_daemon(
    url: &str,
    netns: Option<&str>,
    space: &Space,
    n: usize,
) -> Result<DaemonChild, String> {
    let id = format!("chaos-daemon-{n}");
    let log = log_dir()?.join(format!("{}-{id}.log", space.as_str()));
    let child = spawn_daemon_process_in(netns, url, space, &id, &log)?;
    Ok(DaemonChild { child, id, log })
}

/// The daemon id in the shard's lease record (`lease.0`), if one holds it.
async fn lease_holder(js: &async_nats::jetstream::Context, space: &Space) -> Option<String> {
    let kv = js
        .get_key_value(KvBucket::Delivery.name(space))
        .await
        .ok()?;
    let value = kv.get("lease.0").await.ok()??;
    let record: serde_json::Value = serde_json::from_slice(&value).ok()?;
    record["holder"].as_str().map(str::to_owned)
}

/// The last ERROR line of a daemon log (why it exited), or its last line.
fn last_error(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let pick = text
        .lines()
        .rev()
        .find(|l| l.contains("ERROR"))
        .or_else(|| text.lines().last());
    pick.unwrap_or("no log").trim().to_owned()
}

/// Where the daemons' logs go: `<temp>/cotal-chaos-<pid>/` (kept after the run).
fn log_dir() -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("cotal-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

impl Drop for DaemonChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cotal chaos`: the timeline and the summary table on stdout (with `--json`, one JSON
/// object as the last line); a setup or run error is one `cotal: error:` line and exit code 1.
pub async fn chaos(args: ChaosArgs) -> ExitCode {
    match run(args).await {
        Ok(code) => code,
        Err(e) => super::fail(e),
    }
}

/// One kind of infrastructure fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// SIGKILL of the delivery daemon child; a successor with a new id after a pause.
    DaemonKill,
    /// SIGTERM of nats-server (clean shutdown), restarted on the same port and store.
    ServerStop,
    /// SIGKILL of nats-server, restarted on the same port and store.
    ServerKill,
    /// SIGTERM of a cluster node that does not lead the CHAT stream, restarted.
    NodeStop,
    /// SIGKILL of the cluster node leading the CHAT stream, restarted.
    LeaderKill,
    /// SIGKILL of nats-server, restarted after 35–40 s: longer than the daemon's lease window,
    /// which it must ride out in process (issue 19).
    LongOutage,
    /// The daemon's network namespace cut off (its veth link down) for 5–15 s while the daemon
    /// and the server live, then restored (issue 19).
    Partition,
    /// One member's application stops taking and handling messages (so its agent acks no DLV
    /// copy) for min(60 s, half the slot), then resumes and catches up (issue 19).
    StuckMember,
}

impl Fault {
    fn parse(s: &str) -> Result<Vec<Fault>, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let f = match part {
                "daemon-kill" => Fault::DaemonKill,
                "server-stop" => Fault::ServerStop,
                "server-kill" => Fault::ServerKill,
                "node-stop" => Fault::NodeStop,
                "leader-kill" => Fault::LeaderKill,
                "long-outage" => Fault::LongOutage,
                "partition" => Fault::Partition,
                "stuck-member" => Fault::StuckMember,
                other => {
                    return Err(format!(
                        "unknown fault {other:?} (daemon-kill, server-stop, server-kill, \
                         node-stop, leader-kill, long-outage, partition, stuck-member)"
                    ));
                }
            };
            if !out.contains(&f) {
                out.push(f);
            }
        }
        if out.is_empty() {
            return Err("--faults names no fault".into());
        }
        Ok(out)
    }

    fn name(self) -> &'static str {
        match self {
            Fault::DaemonKill => "daemon-kill",
            Fault::ServerStop => "server-stop",
            Fault::ServerKill => "server-kill",
            Fault::NodeStop => "node-stop",
            Fault::LeaderKill => "leader-kill",
            Fault::LongOutage => "long-outage",
            Fault::Partition => "partition",
            Fault::StuckMember => "stuck-member",
        }
    }

    /// A fault of the broker (the run restarts it), not of the daemon or a member.
    fn of_the_server(self) -> bool {
        matches!(
            self,
            Fault::ServerStop
                | Fault::ServerKill
                | Fault::NodeStop
                | Fault::LeaderKill
                | Fault::LongOutage
        )
    }

    /// An outage the run ends at a known moment (the server accepts again, the partition is
    /// lifted), from which [`Recovery`] measures a heal.
    fn heals(self) -> bool {
        self.of_the_server() || self == Fault::Partition
    }
}

/// What the run does at one point of its schedule.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// Inject a fault.
    Inject(Fault),
    /// End the outage a fault started (start the successor daemon or the server again).
    Restore(Fault),
    /// Member `i` leaves the channel.
    Leave(usize),
    /// Member `i` joins the channel (again, or for the first time if it is a late joiner).
    Rejoin(usize),
    /// Member `i`'s application stops taking messages (`stuck-member`).
    Stall(usize),
    /// Member `i`'s application takes messages again.
    Resume(usize),
}

/// One acked publish: the message id and its CHAT sequence.
struct Published {
    id: String,
    seq: u64,
    /// When the ack arrived (Unix ms).
    acked_ms: u64,
}

/// What the publisher task hands back.
#[derive(Default)]
struct PublishLog {
    acked: Vec<Published>,
    /// Publishes the broker never acked (error or timeout): not expected anywhere.
    failed: u64,
}

/// Publishes at `rate` until `stop`, each with its msg-id, one at a time (the ack is awaited,
/// bounded by the JetStream request timeout).
async fn publisher(
    js: async_nats::jetstream::Context,
    space: Space,
    seed: u64,
    rate: u64,
    mut stop: watch::Receiver<bool>,
) -> PublishLog {
    let interval = Duration::from_micros(1_000_000 / rate);
    let mut log = PublishLog::default();
    let mut n = 0u64;
    while !*stop.borrow() {
        let id = format!("{:08x}-0000-4000-8000-{:012}", seed & 0xffff_ffff, n);
        n += 1;
        let body = json!({"id": id, "ts": wall_clock().0, "space": space.as_str(),
                          "from": {"id": "publisher", "name": "publisher"}, "channel": CHANNEL,
                          "parts": [{"kind": "text", "text": format!("chaos {n}")}]});
        let sent = js
            .send_publish(
                format!("cotal.{}.chat.publisher.{CHANNEL}", space.as_str()),
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(body.to_string()))
                    .message_id(id.clone()),
            )
            .await;
        let ack = match sent {
            Ok(fut) => fut.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match ack {
            Ok(a) if !a.duplicate => log.acked.push(Published {
                id,
                seq: a.sequence,
                acked_ms: wall_clock().0,
            }),
            _ => log.failed += 1,
        }
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(interval) => {}
        }
    }
    log
}

/// The seeded schedule: infrastructure faults with their restore points, and membership churn
/// (a member leaves, then rejoins), all inside `[5 s, duration − 5 s)` except restores, which
/// may run into the last seconds.
fn schedule(args: &ChaosArgs, kinds: &[Fault]) -> Vec<(u64, Step)> {
    let mut rng = Rng(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let span = args.duration.saturating_sub(10) * 1000;
    let mut steps = Vec::new();
    // One fault per slot, its outage ending inside the slot: faults never overlap.
    let faults = args
        .fault_count
        .unwrap_or((args.duration / 30).max(1))
        .max(1);
    let slot = span / faults;
    for k in 0..faults {
        let mut at = 5_000 + k * slot + rng.below(slot / 2);
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let pause = match kind {
            Fault::DaemonKill => rng.below(3000).min(slot / 2),
            Fault::ServerStop | Fault::ServerKill | Fault::NodeStop | Fault::LeaderKill => {
                (1000 + rng.below(4000)).min(slot / 2)
            }
            // From the start of its slot, so the long outage ends inside it.
            Fault::LongOutage => {
                at = 5_000 + k * slot;
                (LONG_OUTAGE_MS + rng.below(5000)).min(slot.saturating_sub(1000))
            }
            Fault::Partition => (PARTITION_MIN_MS + rng.below(10_001)).min(slot / 2),
            // The stall in the second part of its slot, so the window of equal length before
            // it (the rate it is compared with) lies in the same slot, clear of other faults.
            Fault::StuckMember => {
                let stall = stuck_stall_ms(slot);
                at = 5_000 + k * slot + stall + rng.below(slot.saturating_sub(2 * stall) + 1);
                let member = rng.below((args.members - late_joiners(args)) as u64) as usize;
                steps.push((at, Step::Stall(member)));
                steps.push((at + stall, Step::Resume(member)));
                continue;
            }
        };
        steps.push((at, Step::Inject(kind)));
        steps.push((at + pause, Step::Restore(kind)));
    }
    // Churn: one leave/rejoin cycle per slot, member and times seeded, independent of faults
    // (a leave may land in a server outage; the agent's refusal is recorded, not hidden).
    let churn = args.churn.unwrap_or(args.duration / 15);
    if let Some(slot) = span.checked_div(churn) {
        for k in 0..churn {
            let at = 5_000 + k * slot + rng.below(slot / 2);
            let member = rng.below(args.members as u64) as usize;
            steps.push((at, Step::Leave(member)));
            steps.push((
                at + (1000 + rng.below(4000)).min(slot / 2),
                Step::Rejoin(member),
            ));
        }
    }
    // Late joiners: the last members, each joining once in the first half of the run.
    for i in args.members - late_joiners(args)..args.members {
        steps.push((5_000 + rng.below(span / 2), Step::Rejoin(i)));
    }
    steps.sort_by_key(|(at, _)| *at);
    steps
}

/// The shortest `long-outage`: past the lease deadline (TTL 30 s minus its margin) and past the
/// TTL of the daemon's last lease write.
const LONG_OUTAGE_MS: u64 = 35_000;

/// The shortest `partition` (the longest is 10 s more, each at most half its slot).
const PARTITION_MIN_MS: u64 = 5_000;

/// The longest `stuck-member` stall.
const STUCK_MAX_MS: u64 = 60_000;

/// How long a `stuck-member` stall lasts in a slot of `slot` ms: 60 s, or less when the slot
/// cannot hold the stall and the window of equal length before it (one second to spare).
fn stuck_stall_ms(slot: u64) -> u64 {
    STUCK_MAX_MS.min(slot.saturating_sub(1000) / 2)
}

/// How many of the members start unjoined (at most all but one).
fn late_joiners(args: &ChaosArgs) -> usize {
    args.late_joiners
        .unwrap_or(args.members / 3)
        .min(args.members.saturating_sub(1))
}

async fn run(args: ChaosArgs) -> Result<ExitCode, String> {
    if args.members == 0 || args.rate == 0 || args.duration < 10 {
        return Err("--members and --rate must be at least 1, --duration at least 10".into());
    }
    let default_faults = if args.cluster.is_some() {
        "daemon-kill,node-stop,leader-kill"
    } else if args.spawn_server {
        "daemon-kill,server-stop,server-kill"
    } else {
        "daemon-kill"
    };
    let kinds = Fault::parse(args.faults.as_deref().unwrap_or(default_faults))?;
    if args.cluster.is_none()
        && kinds
            .iter()
            .any(|k| matches!(k, Fault::NodeStop | Fault::LeaderKill))
    {
        return Err("node-stop and leader-kill need --cluster".into());
    }
    if kinds.contains(&Fault::LongOutage) {
        if args.cluster.is_some() {
            return Err("long-outage stops the one server; it does not take --cluster".into());
        }
        let faults = args
            .fault_count
            .unwrap_or((args.duration / 30).max(1))
            .max(1);
        if args.duration.saturating_sub(10) * 1000 / faults < LONG_OUTAGE_MS + 6_000 {
            return Err(format!(
                "long-outage needs {} s per fault: --duration at least {} for {faults} fault(s)",
                (LONG_OUTAGE_MS + 6_000) / 1000,
                10 + faults * (LONG_OUTAGE_MS + 6_000) / 1000
            ));
        }
    }
    let server_faults = kinds
        .iter()
        .any(|k| k.of_the_server() || *k == Fault::Partition);
    if server_faults && !args.spawn_server {
        return Err(
            "server-stop, server-kill and partition need --spawn-server (the run owns the \
             process); use --faults daemon-kill or stuck-member with --nats"
                .into(),
        );
    }
    let partitions = kinds.contains(&Fault::Partition);
    if partitions && args.cluster.is_some() {
        return Err(
            "partition cuts the daemon off the one server; it does not take --cluster".into(),
        );
    }
    // Before the server: with partitions it must listen where the namespace reaches it. Made
    // first, dropped last (after the daemons in it and the server).
    let netns = if partitions {
        Some(tokio::task::block_in_place(Netns::create)?)
    } else {
        None
    };
    // `sync_interval: always`: an acked publish is on disk before the ack, so a SIGKILL of the
    // server cannot take back a message the harness already counts as published (the default
    // two-minute fsync would let it, by design of nats-server, not of Cotal).
    let (mut servers, url) = match (args.spawn_server, args.cluster) {
        (true, Some(n)) => {
            let nodes = start_cluster(n)?;
            let urls: Vec<String> = nodes.iter().map(SpawnedServer::url).collect();
            (nodes, urls.join(","))
        }
        (true, None) => {
            // With partitions on every interface (the daemon's namespace reaches it over the
            // veth pair); the harness and the members still connect on loopback.
            let host = if netns.is_some() {
                "0.0.0.0"
            } else {
                "127.0.0.1"
            };
            let s = SpawnedServer::start_node_on(
                host,
                free_port()?,
                "cotal_bench",
                "sync_interval: always",
                "",
            )?;
            let url = s.url();
            (vec![s], url)
        }
        (false, _) => {
            let (_, url) = target_server(false, args.nats.as_deref())?;
            (Vec::new(), url)
        }
    };
    let cfg = ConnectConfig::new(url.split(',').map(str::to_owned));
    let t = cfg.request_timeout;
    let admin = connect(&cfg).await.map_err(|e| e.to_string())?;
    let space = Space::new(format!("chaos{}", args.seed)).map_err(|e| format!("space: {e}"))?;
    let channel = Channel::new(CHANNEL).map_err(|e| format!("channel: {e}"))?;
    let concrete = ConcreteChannel::new(CHANNEL).map_err(|e| format!("channel: {e}"))?;
    let mut plan = SpacePlan::new(&space);
    if let Some(n) = args.cluster {
        plan = plan.with_replicas(n.min(3) as u32);
    }
    if let Some(secs) = args.lease_ttl {
        plan = plan.with_lease_ttl(Duration::from_secs(secs));
    }
    // A fresh cluster elects its JetStream meta leader a few seconds after it accepts clients.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = apply(&admin.client, &plan, t).await;
        if report.failed() == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("provisioning failed: {}", report.summary()));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let ids: Vec<AgentId> = (0..args.members)
        .map(|i| AgentId::new(format!("m{i}")))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("agent id: {e}"))?;
    durable_channel_for(&admin.client, &space, CHANNEL, &ids, t).await?;
    let js = async_nats::jetstream::new(admin.client.clone());

    // The daemons of a partition run reach the server over the veth pair.
    let (daemon_url, daemon_ns) = match (&netns, servers.first()) {
        (Some(ns), Some(s)) => (
            format!("nats://{}:{}", ns.root_addr, s.port()),
            Some(ns.name.as_str()),
        ),
        _ => (url.clone(), None),
    };
    let mut spawned = 0usize;
    let mut daemon = Some(spawn_daemon(&daemon_url, daemon_ns, &space, spawned)?);
    spawned += 1;
    // With --standby, a second process that watches the lease; `daemon` is the one believed to
    // hold it (checked against the lease record before a kill).
    let mut standby = if args.standby {
        spawned += 1;
        Some(spawn_daemon(&daemon_url, daemon_ns, &space, spawned - 1)?)
    } else {
        None
    };

    let joined = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut members = Vec::new();
    let mut surfaced = Vec::new();
    // A `stuck-member` stall pauses the member's application loop through its sender.
    let mut pauses = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut config = AgentConfig::new(
            space.clone(),
            Sender::new(id.clone(), id.as_str()),
            if i < args.members - late_joiners(&args) {
                vec![channel.clone()]
            } else {
                Vec::new()
            },
            args.seed ^ (i as u64 + 1),
        );
        // The seed picks the faults; ids stay unguessable as in every run on a broker.
        config.id_key = Some(os_key());
        config.durable_backstop = true;
        config.create_dlv_consumer = false;
        let count = Arc::new(AtomicUsize::new(0));
        let (pause_tx, pause_rx) = watch::channel(false);
        members.push(
            start_member_pausable(
                &cfg,
                config,
                Arc::clone(&count),
                Arc::clone(&joined),
                stop_rx.clone(),
                Some(pause_rx),
            )
            .await?,
        );
        surfaced.push(count);
        pauses.push(pause_tx);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while joined.load(Ordering::Relaxed) < args.members - late_joiners(&args) {
        if Instant::now() > deadline {
            return Err("members did not join durably within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let steps = schedule(&args, &kinds);
    // Every DLV write as it is stored: the subjects keep only 1000 copies each, too few at the
    // end of a long run to judge a stuck member's rates or to time the recovery from faults
    // early in the run (session 13: an hour's soak had lost the store times of all but its last
    // faults' copies, so their heals read 0.0).
    let tap = DlvTap::start(&js, &space, &ids, stop_rx.clone()).await?;
    let start = Instant::now();
    let (pub_stop_tx, pub_stop_rx) = watch::channel(false);
    let pub_task = tokio::spawn(publisher(
        js.clone(),
        space.clone(),
        args.seed,
        args.rate,
        pub_stop_rx,
    ));
    let mut faults_injected = 0u64;
    let mut marks: Vec<FaultMark> = Vec::new();
    let mut fault_counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut churn_steps = 0u64;
    let mut timeline: Vec<String> = Vec::new();
    let mut server_down: Option<usize> = None;
    let mut partitioned = false;
    let mut stalls: Vec<StallMark> = Vec::new();
    // A late joiner counts as "left" until its first join.
    let mut left: Vec<bool> = (0..args.members)
        .map(|i| i >= args.members - late_joiners(&args))
        .collect();
    let stamp = |start: Instant| format!("{:>6.1}s", start.elapsed().as_secs_f64());
    let mut daemon_exits = 0u64;
    let mut memory = Memory::default();
    // The harness supervises the daemon as systemd would: a daemon that exits on its own (it
    // does when its lease is lost, for example after a long server outage) is restarted and the
    // exit is counted and shown.
    let mut supervise = |daemon: &mut Option<DaemonChild>,
                         spawned: &mut usize,
                         timeline: &mut Vec<String>|
     -> Result<(), String> {
        let exited = match daemon.as_mut() {
            Some(d) => d.child.try_wait().ok().flatten(),
            None => return Ok(()),
        };
        if let Some(status) = exited
            && let Some(d) = daemon.take()
        {
            daemon_exits += 1;
            timeline.push(format!(
                "{} {} exited on its own ({status}): {}",
                stamp(start),
                d.id,
                last_error(&d.log)
            ));
            let next = spawn_daemon(&daemon_url, daemon_ns, &space, *spawned)?;
            *spawned += 1;
            timeline.push(format!("{} supervisor starts {}", stamp(start), next.id));
            *daemon = Some(next);
        }
        Ok(())
    };
    // On a terminal: a bar over the run's seconds, with the last thing done.
    let bar = Progress::bar(args.duration, "s");
    let show = |timeline: &[String]| {
        bar.set(start.elapsed().as_secs());
        if let Some(last) = timeline.last() {
            bar.message(last.trim_start().to_owned());
        }
    };
    for (at, step) in steps {
        let when = start + Duration::from_millis(at);
        while Instant::now() < when {
            supervise(&mut daemon, &mut spawned, &mut timeline)?;
            supervise(&mut standby, &mut spawned, &mut timeline)?;
            memory.sample(daemon.as_ref(), servers.first());
            show(&timeline);
            tokio::time::sleep(Duration::from_millis(100).min(when - Instant::now())).await;
        }
        match step {
            Step::Inject(Fault::DaemonKill) => {
                // The holder dies; the standby, if any, is the one expected to take over.
                if let Some(s) = &standby
                    && lease_holder(&js, &space).await.as_deref() == Some(s.id.as_str())
                {
                    std::mem::swap(&mut daemon, &mut standby);
                }
                let Some(mut d) = daemon.take() else {
                    continue;
                };
                daemon = standby.take();
                let _ = d.child.kill();
                let _ = d.child.wait();
                timeline.push(format!(
                    "{} SIGKILL {} (pid {})",
                    stamp(start),
                    d.id,
                    d.child.id()
                ));
                faults_injected += 1;
                *fault_counts.entry(Fault::DaemonKill.name()).or_default() += 1;
                marks.push(FaultMark::injected(Fault::DaemonKill));
            }
            Step::Restore(Fault::DaemonKill) => {
                if daemon.is_none() {
                    let d = spawn_daemon(&daemon_url, daemon_ns, &space, spawned)?;
                    spawned += 1;
                    timeline.push(format!("{} start {}", stamp(start), d.id));
                    daemon = Some(d);
                } else if args.standby && standby.is_none() {
                    let d = spawn_daemon(&daemon_url, daemon_ns, &space, spawned)?;
                    spawned += 1;
                    timeline.push(format!("{} start {} (standby)", stamp(start), d.id));
                    standby = Some(d);
                }
            }
            Step::Inject(
                kind @ (Fault::ServerStop
                | Fault::ServerKill
                | Fault::NodeStop
                | Fault::LeaderKill
                | Fault::LongOutage),
            ) => {
                if servers.is_empty() || server_down.is_some() {
                    continue;
                }
                let leader = if servers.len() > 1 {
                    chat_leader(&js, &space).await
                } else {
                    None
                };
                let index = match kind {
                    Fault::LeaderKill => leader.unwrap_or(0),
                    Fault::NodeStop => {
                        let others: Vec<usize> =
                            (0..servers.len()).filter(|i| Some(*i) != leader).collect();
                        others[(at as usize) % others.len().max(1)]
                    }
                    _ => 0,
                };
                let Some(s) = servers.get_mut(index) else {
                    continue;
                };
                let pid = s.pid();
                let kill = matches!(
                    kind,
                    Fault::ServerKill | Fault::LeaderKill | Fault::LongOutage
                );
                tokio::task::block_in_place(|| s.stop(kill))?;
                server_down = Some(index);
                timeline.push(format!(
                    "{} {} nats-server n{index} (pid {pid}){}",
                    stamp(start),
                    if kill { "SIGKILL" } else { "SIGTERM" },
                    match leader {
                        Some(l) if l == index => ", the CHAT leader",
                        Some(_) => ", not the CHAT leader",
                        None => "",
                    }
                ));
                faults_injected += 1;
                *fault_counts.entry(kind.name()).or_default() += 1;
                marks.push(FaultMark::injected(kind));
            }
            Step::Restore(
                Fault::ServerStop
                | Fault::ServerKill
                | Fault::NodeStop
                | Fault::LeaderKill
                | Fault::LongOutage,
            ) => {
                let Some(index) = server_down.take() else {
                    continue;
                };
                let Some(s) = servers.get_mut(index) else {
                    continue;
                };
                tokio::task::block_in_place(|| s.restart())?;
                if let Some(mark) = marks.last_mut() {
                    mark.restored(wall_clock().0);
                }
                timeline.push(format!(
                    "{} nats-server n{index} restarted (pid {})",
                    stamp(start),
                    s.pid()
                ));
            }
            Step::Inject(Fault::Partition) => {
                let Some(ns) = &netns else {
                    continue;
                };
                if partitioned {
                    continue;
                }
                tokio::task::block_in_place(|| ns.cut())?;
                partitioned = true;
                timeline.push(format!(
                    "{} partition: {} down, the daemon's namespace {} cut off",
                    stamp(start),
                    ns.root_link,
                    ns.name
                ));
                faults_injected += 1;
                *fault_counts.entry(Fault::Partition.name()).or_default() += 1;
                marks.push(FaultMark::injected(Fault::Partition));
            }
            Step::Restore(Fault::Partition) => {
                let Some(ns) = &netns else {
                    continue;
                };
                if !partitioned {
                    continue;
                }
                tokio::task::block_in_place(|| ns.restore())?;
                partitioned = false;
                if let Some(mark) = marks.last_mut() {
                    mark.restored(wall_clock().0);
                }
                timeline.push(format!(
                    "{} partition lifted: {} up",
                    stamp(start),
                    ns.root_link
                ));
            }
            // Stalls are their own steps (Stall, Resume).
            Step::Inject(Fault::StuckMember) | Step::Restore(Fault::StuckMember) => {}
            Step::Stall(i) => {
                if stalls.last().is_some_and(|s| s.resumed_ms.is_none()) {
                    continue;
                }
                let _ = pauses[i].send(true);
                timeline.push(format!(
                    "{} {} stuck: its application takes and acks nothing",
                    stamp(start),
                    ids[i]
                ));
                faults_injected += 1;
                *fault_counts.entry(Fault::StuckMember.name()).or_default() += 1;
                stalls.push(StallMark {
                    member: i,
                    stalled_ms: wall_clock().0,
                    resumed_ms: None,
                    resumed_at: None,
                    backlog_at_resume: None,
                    backlog_after_heal: None,
                });
            }
            Step::Resume(i) => {
                let Some(stall) = stalls.last_mut().filter(|s| s.member == i) else {
                    continue;
                };
                if stall.resumed_ms.is_some() {
                    continue;
                }
                // What the stall left on the member's DLV consumer: the proof it acked nothing.
                stall.backlog_at_resume = dlv_backlog(&js, &space, &ids[i]).await;
                stall.resumed_ms = Some(wall_clock().0);
                stall.resumed_at = Some(Instant::now());
                let _ = pauses[i].send(false);
                timeline.push(format!(
                    "{} {} resumes (its DLV consumer: {})",
                    stamp(start),
                    ids[i],
                    backlog_text(stall.backlog_at_resume)
                ));
            }
            Step::Leave(i) => {
                if left[i] {
                    continue;
                }
                match members[i].handle.leave(channel.clone()).await {
                    Ok(_) => {
                        timeline.push(format!("{} {} leaves", stamp(start), ids[i]));
                        left[i] = true;
                        churn_steps += 1;
                    }
                    Err(e) => {
                        timeline.push(format!("{} {} leave refused: {e}", stamp(start), ids[i]));
                    }
                }
            }
            Step::Rejoin(i) => {
                if !left[i] {
                    continue;
                }
                match members[i].handle.join(channel.clone()).await {
                    Ok(_) => {
                        timeline.push(format!("{} {} joins", stamp(start), ids[i]));
                        left[i] = false;
                        churn_steps += 1;
                    }
                    Err(e) => {
                        timeline.push(format!("{} {} join refused: {e}", stamp(start), ids[i]));
                    }
                }
            }
        }
    }
    let end = start + Duration::from_secs(args.duration);
    while Instant::now() < end {
        supervise(&mut daemon, &mut spawned, &mut timeline)?;
        supervise(&mut standby, &mut spawned, &mut timeline)?;
        memory.sample(daemon.as_ref(), servers.first());
        show(&timeline);
        tokio::time::sleep(
            Duration::from_millis(100).min(end.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    let _ = pub_stop_tx.send(true);
    let published = pub_task.await.map_err(|e| format!("publisher: {e}"))?;

    // Heal: every outage ends, then wait until each member has surfaced as many distinct
    // messages as its intervals owe it and that count stood still for 3 s, or the timeout.
    if let Some(index) = server_down.take()
        && let Some(s) = servers.get_mut(index)
    {
        tokio::task::block_in_place(|| s.restart())?;
        if let Some(mark) = marks.last_mut() {
            mark.restored(wall_clock().0);
        }
        timeline.push(format!("{} heal: nats-server restarted", stamp(start)));
    }
    if partitioned && let Some(ns) = &netns {
        tokio::task::block_in_place(|| ns.restore())?;
        if let Some(mark) = marks.last_mut() {
            mark.restored(wall_clock().0);
        }
        timeline.push(format!("{} heal: partition lifted", stamp(start)));
    }
    if let Some(stall) = stalls.last_mut()
        && stall.resumed_ms.is_none()
    {
        stall.backlog_at_resume = dlv_backlog(&js, &space, &ids[stall.member]).await;
        stall.resumed_ms = Some(wall_clock().0);
        stall.resumed_at = Some(Instant::now());
        let _ = pauses[stall.member].send(false);
        timeline.push(format!(
            "{} heal: {} resumes",
            stamp(start),
            ids[stall.member]
        ));
    }
    if daemon.is_none() {
        daemon = Some(spawn_daemon(&daemon_url, daemon_ns, &space, spawned)?);
        timeline.push(format!("{} heal: daemon started", stamp(start)));
    }
    drop(bar);
    let heal = Progress::spinner();
    heal.message("heal: waiting for every member's copies");
    let heal_start = Instant::now();
    let mut owed = owed_copies(&js, &space, &concrete, &ids, &published.acked).await?;
    let mut last: Vec<usize> = Vec::new();
    let mut still_since = Instant::now();
    while heal_start.elapsed() < Duration::from_secs(args.heal_s) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        supervise(&mut daemon, &mut spawned, &mut timeline)?;
        let now: Vec<usize> = surfaced.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        if now != last {
            last = now;
            still_since = Instant::now();
            // Records may still change in the heal (a join or leave that was in flight).
            owed = owed_copies(&js, &space, &concrete, &ids, &published.acked).await?;
            continue;
        }
        let caught_up = owed.iter().zip(&last).all(|(o, n)| *n >= o.expected.len());
        heal.message(format!(
            "heal: {} of {} owed copies surfaced",
            last.iter().sum::<usize>(),
            owed.iter().map(|o| o.expected.len()).sum::<usize>()
        ));
        if caught_up && still_since.elapsed() >= Duration::from_secs(3) {
            // The application view is complete; the durable path must be too (a live copy
            // can hide a durable copy the daemon has not written yet, or never will).
            let durable = dlv_ids(&js, &space, &ids).await?;
            let complete = owed
                .iter()
                .zip(&durable)
                .all(|(o, d)| no_dlv_copy(o, d).is_empty());
            if complete {
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let heal_time = heal_start.elapsed();
    drop(heal);
    owed = owed_copies(&js, &space, &concrete, &ids, &published.acked).await?;
    let durable = dlv_ids(&js, &space, &ids).await?;
    for stall in &mut stalls {
        stall.backlog_after_heal = dlv_backlog(&js, &space, &ids[stall.member]).await;
    }
    let _ = stop_tx.send(true);

    let mut expected = 0u64;
    let mut delivered = 0u64;
    let mut app_duplicates = 0u64;
    let mut via_dlv = 0u64;
    let mut losses_reported = 0u64;
    let mut losses_by_daemon = 0u64;
    let mut losses_unreported = 0u64;
    let mut forgotten = 0u64;
    let mut missing_lines = Vec::new();
    let mut durable_missing = 0u64;
    let mut dlv_rotated = 0u64;
    let mut durable_outside = 0u64;
    let mut durable_total = 0u64;
    let acked_at: BTreeMap<&str, u64> = published
        .acked
        .iter()
        .map(|p| (p.id.as_str(), p.acked_ms))
        .collect();
    let mut stuck: Vec<StuckFigures> = stalls
        .iter()
        .map(|s| StuckFigures {
            member: ids[s.member].as_str().to_owned(),
            ..StuckFigures::default()
        })
        .collect();
    for (i, ((m, owe), copies)) in members.into_iter().zip(&owed).zip(&durable).enumerate() {
        let log = m.task.await.map_err(|e| format!("member task: {e}"))?;
        // A stalled member's catch-up: every copy owed to it by its resume, surfaced (when) or
        // reported lost.
        for (stall, f) in stalls.iter().zip(stuck.iter_mut()) {
            let (Some(resumed_ms), Some(resumed_at)) = (stall.resumed_ms, stall.resumed_at) else {
                continue;
            };
            if stall.member != i {
                continue;
            }
            let due: Vec<&(String, u64)> = owe
                .expected
                .iter()
                .filter(|(id, _)| acked_at.get(id.as_str()).is_some_and(|a| *a <= resumed_ms))
                .collect();
            let lost = |(id, seq): &(String, u64)| {
                !log.first.contains_key(id)
                    && (log.lost_ids.contains(id) || log.range_lost(CHANNEL, *seq))
            };
            f.owed_at_resume = due.len();
            f.live_shed = log.shed;
            f.backlog_at_resume = stall.backlog_at_resume;
            f.backlog_after_heal = stall.backlog_after_heal;
            f.lost_reported = due.iter().filter(|c| lost(c)).count();
            f.caught_up = due.iter().all(|c| log.first.contains_key(&c.0) || lost(c));
            f.catch_up_s = due
                .iter()
                .filter_map(|(id, _)| log.first.get(id))
                .map(|at| at.saturating_duration_since(resumed_at).as_secs_f64())
                .reduce(f64::max);
        }
        let _ = m.handle.stop(Duration::from_secs(2));
        let _ = tokio::time::timeout(Duration::from_secs(5), m.agent).await;
        expected += owe.expected.len() as u64;
        forgotten += owe.forgotten;
        app_duplicates += log.duplicates;
        via_dlv += log.via_dlv;
        losses_reported += log.lost_events;
        let mut missing = Vec::new();
        for (id, seq) in &owe.expected {
            if log.first.contains_key(id) {
                delivered += 1;
            } else if log.lost_ids.contains(id) {
                // Counted in the member's loss events.
            } else if log.range_lost(CHANNEL, *seq) {
                // The daemon recorded it lost (a shed copy, a full DLV) and the agent
                // reported the range.
                losses_by_daemon += 1;
            } else {
                missing.push(*seq);
            }
        }
        losses_unreported += missing.len() as u64;
        // The durable path alone: expected copies with no DLV copy (covered live, or lost on
        // the durable path), and DLV copies of acked messages outside every interval (a leak).
        durable_total += copies.len() as u64;
        let owed_ids: BTreeSet<&String> = owe.expected.iter().map(|(id, _)| id).collect();
        let not_in_dlv = no_dlv_copy(owe, copies);
        durable_missing += not_in_dlv.len() as u64;
        dlv_rotated += owe.expected.len() as u64
            - owe
                .expected
                .iter()
                .filter(|(id, _)| copies.contains_key(id))
                .count() as u64
            - not_in_dlv.len() as u64;
        if !not_in_dlv.is_empty() {
            missing_lines.push(format!(
                "{}: no DLV copy for CHAT seqs {:?}{}",
                owe.member,
                &not_in_dlv[..not_in_dlv.len().min(20)],
                if not_in_dlv.len() > 20 { " …" } else { "" },
            ));
        }
        durable_outside += published
            .acked
            .iter()
            .filter(|p| copies.contains_key(&p.id) && !owed_ids.contains(&p.id))
            .count() as u64;
        if !missing.is_empty() {
            missing_lines.push(format!(
                "{}: {} unreported, CHAT seqs {:?}{}; intervals {:?}",
                owe.member,
                missing.len(),
                &missing[..missing.len().min(20)],
                if missing.len() > 20 { " …" } else { "" },
                owe.intervals
            ));
        }
    }
    if durable_missing > 0 {
        // The copies counted missing (not those rotated out by the cap).
        let seqs: BTreeSet<u64> = owed
            .iter()
            .zip(&durable)
            .flat_map(|(o, d)| no_dlv_copy(o, d))
            .collect();
        missing_lines.extend(durable_diagnosis(&js, &space, &seqs).await);
        if let Some(d) = &daemon {
            missing_lines.push(format!("diagnosis: daemon log {}", d.log.display()));
        }
    }
    drop(daemon);
    drop(standby);
    let duplicates_suppressed = durable_total.saturating_sub(via_dlv);
    let tapped = tap.task.await.map_err(|e| format!("DLV tap: {e}"))?;
    // Recovery, from when each owed copy was acked and when DLV first stored it (the tap's time,
    // else the end read's, for the copies the cap has not rotated out).
    let first_stored = |slot: usize, id: &str| -> Option<u64> {
        let tapped = tapped
            .first_stored
            .get(slot)
            .and_then(|d| d.get(id).copied());
        let read = durable.get(slot).and_then(|d| d.get(id).copied());
        match (tapped, read) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    };
    let acked = &acked_at;
    let first_stored = &first_stored;
    let pairs: Vec<(u64, u64)> = owed
        .iter()
        .enumerate()
        .flat_map(|(slot, o)| {
            o.expected.iter().filter_map(move |(id, _)| {
                Some((*acked.get(id.as_str())?, first_stored(slot, id)?))
            })
        })
        .collect();
    let recovery = Recovery::measure(&marks, &pairs);
    for (stall, f) in stalls.iter().zip(stuck.iter_mut()) {
        stuck_rates(stall, &tapped.writes, &owed, &acked_at, f);
    }
    // The stall that hurt the others most (the lowest ratio) is the headline.
    let worst = stuck.iter().min_by(|a, b| {
        a.ratio()
            .unwrap_or(f64::MAX)
            .total_cmp(&b.ratio().unwrap_or(f64::MAX))
    });

    let kinds_text: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    println!(
        "cotal chaos: seed {}, {} s, {} members, faults {}, {} membership changes",
        args.seed,
        args.duration,
        args.members,
        kinds_text.join(","),
        churn_steps
    );
    for line in &timeline {
        println!("  {line}");
    }
    for line in &missing_lines {
        println!("  MISSING {line}");
    }
    println!("| figure | value |");
    println!("| --- | --- |");
    let mut rows = vec![("faults injected".to_owned(), faults_injected)];
    for (k, v) in &fault_counts {
        rows.push((format!("  of which {k}"), *v));
    }
    rows.extend([
        (
            "daemon exits on its own (restarted)".to_owned(),
            daemon_exits,
        ),
        (
            "membership changes (join/leave/rejoin)".to_owned(),
            churn_steps,
        ),
        (
            "messages published (acked)".to_owned(),
            published.acked.len() as u64,
        ),
        (
            "publishes not acked (not expected)".to_owned(),
            published.failed,
        ),
        (
            "copies expected (by the records' intervals)".to_owned(),
            expected,
        ),
        ("delivered (surfaced, distinct)".to_owned(), delivered),
        ("durable copies in DLV".to_owned(), durable_total),
        (
            "expected copies with no DLV copy".to_owned(),
            durable_missing,
        ),
        (
            "DLV copies rotated out by the 1000 cap".to_owned(),
            dlv_rotated,
        ),
        (
            "DLV copies outside the intervals".to_owned(),
            durable_outside,
        ),
        ("duplicates suppressed".to_owned(), duplicates_suppressed),
        (
            "duplicates surfaced to the application".to_owned(),
            app_duplicates,
        ),
        (
            "losses reported (events and the daemon's ranges)".to_owned(),
            losses_reported + losses_by_daemon,
        ),
        (
            "  of which copies in the daemon's loss ranges".to_owned(),
            losses_by_daemon,
        ),
        ("losses unreported".to_owned(), losses_unreported),
        ("intervals forgotten by the records".to_owned(), forgotten),
    ]);
    for (name, value) in &rows {
        println!("| {name} | {value} |");
    }
    println!("heal phase took {:.1} s", heal_time.as_secs_f64());
    for f in &stuck {
        println!(
            "stuck member {}: {:.1} s stalled; the others' DLV copies/s {:.1} before, {:.1} \
             during (ratio {}; owed {:.1} and {:.1}/s); caught up {} ({} copies owed by the \
             resume, {} reported lost, the last surfaced {} s after the resume; {} live copies \
             shed by its full ledger; DLV consumer after the heal: {})",
            f.member,
            f.stall_s,
            f.others_before,
            f.others_during,
            f.ratio()
                .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
            f.owed_before,
            f.owed_during,
            if f.caught_up { "yes" } else { "NO" },
            f.owed_at_resume,
            f.lost_reported,
            secs(f.catch_up_s),
            f.live_shed,
            backlog_text(f.backlog_after_heal)
        );
    }
    println!(
        "recovery: heal {} s (per server fault or partition {:?}), takeover {} s (per daemon kill {:?}), longest stall {:.1} s",
        secs(recovery.heal_s()),
        recovery.heals_s,
        secs(recovery.takeover_s()),
        recovery.takeovers_s,
        recovery.stall_s
    );
    println!("{}", memory.summary());
    if args.json {
        println!(
            "{}",
            json!({"seed": args.seed, "duration_s": args.duration, "members": args.members,
                   "memory": memory.to_json(),
                   "faults": kinds_text, "faults_injected": faults_injected,
                   "fault_counts": fault_counts,
                   "membership_changes": churn_steps,
                   "daemon_exits": daemon_exits,
                   "standby": args.standby,
                   "lease_ttl_s": args.lease_ttl.unwrap_or(LEASE_TTL.as_millis() / 1000),
                   "messages": published.acked.len(),
                   "publishes_failed": published.failed,
                   "copies_expected": expected, "delivered": delivered,
                   "durable_copies": durable_total,
                   "durable_missing": durable_missing,
                   "dlv_rotated": dlv_rotated,
                   "durable_outside_intervals": durable_outside,
                   "duplicates_suppressed": duplicates_suppressed,
                   "duplicates_surfaced": app_duplicates,
                   "losses_reported": losses_reported + losses_by_daemon,
                   "losses_reported_by_daemon": losses_by_daemon,
                   "losses_unreported": losses_unreported,
                   "intervals_forgotten": forgotten,
                   "heal_s": recovery.heal_s(),
                   "heals_s": recovery.heals_s,
                   "takeover_s": recovery.takeover_s(),
                   "takeovers_s": recovery.takeovers_s,
                   "stall_s": recovery.stall_s,
                   "stuck_member": worst.map(StuckFigures::json),
                   "stuck_members": stuck.iter().map(StuckFigures::json).collect::<Vec<_>>(),
                   "heal_phase_s": heal_time.as_secs_f64()})
        );
    }
    drop(servers);
    Ok(if losses_unreported == 0 && app_duplicates == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The network namespace a `partition` run starts its daemons in: `cotal-chaos-<pid>`, joined
/// to the root namespace by a veth pair on a /30 of 198.18.0.0/15 (RFC 2544's benchmarking
/// range) picked from the PID (the next free block when an address is in use), so two runs do
/// not clash. A partition takes the root side of the pair down; lifting it brings it up. Drop
/// deletes the pair and the namespace (also when the run fails); a run killed by a signal
/// leaves them, and the next partition run removes every `cotal-chaos-<pid>` whose process is
/// gone.
struct Netns {
    name: String,
    /// The root side of the veth pair (`cch<pid>r`).
    root_link: String,
    /// Its address: where the daemons reach the server.
    root_addr: std::net::Ipv4Addr,
}

impl Netns {
    /// Creates the namespace and the pair, or says that partitions are unavailable here (no
    /// `ip`, or the kernel refuses namespaces or veth pairs).
    fn create() -> Result<Netns, String> {
        let unavailable = |e: String| format!("partitions are unavailable here: {e}");
        let pid = std::process::id();
        let used = ip_output(&["-o", "-4", "addr", "show"]).map_err(unavailable)?;
        let in_use = |a: std::net::Ipv4Addr| used.contains(&format!(" {a}/"));
        let base = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0));
        let blocks = 1u32 << 15;
        let (root_addr, ns_addr) = (0..blocks)
            .map(|k| (pid + k) % blocks)
            .map(|b| {
                (
                    std::net::Ipv4Addr::from(base + 4 * b + 1),
                    std::net::Ipv4Addr::from(base + 4 * b + 2),
                )
            })
            .find(|(r, n)| !in_use(*r) && !in_use(*n))
            .ok_or_else(|| unavailable("no free /30 in 198.18.0.0/15".into()))?;
        let name = format!("cotal-chaos-{pid}");
        let root_link = format!("cch{pid}r");
        let ns_link = format!("cch{pid}n");
        // What an earlier run with this PID left (killed before its cleanup), and the
        // namespaces of runs whose process is gone (interrupted: no drop ran).
        let _ = ip(&["link", "del", &root_link]);
        let _ = ip(&["netns", "del", &name]);
        Netns::remove_stale();
        ip(&["netns", "add", &name]).map_err(unavailable)?;
        // From here on, drop removes whatever exists.
        let ns = Netns {
            name,
            root_link,
            root_addr,
        };
        let (name, root) = (ns.name.as_str(), ns.root_link.as_str());
        let steps: [&[&str]; 8] = [
            &[
                "link", "add", root, "type", "veth", "peer", "name", &ns_link,
            ],
            &["link", "set", &ns_link, "netns", name],
            &["addr", "add", &format!("{root_addr}/30"), "dev", root],
            &["link", "set", root, "up"],
            &[
                "-n",
                name,
                "addr",
                "add",
                &format!("{ns_addr}/30"),
                "dev",
                &ns_link,
            ],
            &["-n", name, "link", "set", &ns_link, "up"],
            &["-n", name, "link", "set", "lo", "up"],
            // `ip netns exec` must work too (it mounts a /sys of its own).
            &["netns", "exec", name, "true"],
        ];
        for args in steps {
            ip(args).map_err(unavailable)?;
        }
        Ok(ns)
    }

    /// Removes `cotal-chaos-<pid>` namespaces (and their pairs) whose run process is gone.
    fn remove_stale() {
        let Ok(list) = ip_output(&["netns", "list"]) else {
            return;
        };
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(pid) = name
                .strip_prefix("cotal-chaos-")
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let _ = ip(&["link", "del", &format!("cch{pid}r")]);
            let _ = ip(&["netns", "del", name]);
        }
    }

    /// The partition: the root side of the pair down (the daemon's packets go nowhere).
    fn cut(&self) -> Result<(), String> {
        ip(&["link", "set", &self.root_link, "down"])
    }

    /// Lifts the partition.
    fn restore(&self) -> Result<(), String> {
        ip(&["link", "set", &self.root_link, "up"])
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one side of a veth pair deletes both.
        let _ = ip(&["link", "del", &self.root_link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Runs `ip <args>`; its stderr is the error.
fn ip(args: &[&str]) -> Result<(), String> {
    ip_output(args).map(drop)
}

/// Runs `ip <args>` and returns its stdout.
fn ip_output(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {} ({})",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ))
    }
}

/// One `stuck-member` stall: who, when (Unix ms), and how the member caught up.
#[derive(Debug)]
struct StallMark {
    member: usize,
    stalled_ms: u64,
    resumed_ms: Option<u64>,
    resumed_at: Option<Instant>,
    /// The member's DLV consumer at the resume and after the heal.
    backlog_at_resume: Option<DlvBacklog>,
    backlog_after_heal: Option<DlvBacklog>,
}

/// A member's DLV consumer: copies not yet delivered, and delivered but not acked.
#[derive(Clone, Copy, Debug)]
struct DlvBacklog {
    pending: u64,
    ack_pending: usize,
}

/// Reads member `id`'s DLV consumer (`None` when the read fails).
async fn dlv_backlog(
    js: &async_nats::jetstream::Context,
    space: &Space,
    id: &AgentId,
) -> Option<DlvBacklog> {
    let spec = ConsumerSpec::dlv(space, id);
    let stream = js.get_stream(&spec.stream).await.ok()?;
    let mut consumer = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&spec.name)
        .await
        .ok()?;
    let info = consumer.info().await.ok()?;
    Some(DlvBacklog {
        pending: info.num_pending,
        ack_pending: info.num_ack_pending,
    })
}

fn backlog_text(b: Option<DlvBacklog>) -> String {
    b.map_or_else(
        || "not read".to_owned(),
        |b| format!("{} unacked, {} undelivered", b.ack_pending, b.pending),
    )
}

/// Every DLV copy stored during the run, as `(member index, store time in Unix ms)`, read as it
/// is stored (an ordered push consumer from the run's start): what the `stuck-member` rates are
/// counted from.
struct DlvTap {
    task: tokio::task::JoinHandle<Tapped>,
}

/// What the DLV tap saw: every write as `(member slot, store ms)`, and per member the first
/// store time of each message id.
struct Tapped {
    writes: Vec<(usize, u64)>,
    first_stored: Vec<DlvCopies>,
}

impl DlvTap {
    async fn start(
        js: &async_nats::jetstream::Context,
        space: &Space,
        ids: &[AgentId],
        mut stop: watch::Receiver<bool>,
    ) -> Result<DlvTap, String> {
        use async_nats::jetstream::consumer;
        use futures::StreamExt;
        let name = format!("DLV_{}", space.as_str());
        let stream = js
            .get_stream(&name)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        let prefix = format!("cotal.{}.dlv.", space.as_str());
        let config = consumer::push::OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            filter_subject: format!("{prefix}>"),
            deliver_policy: consumer::DeliverPolicy::New,
            ..Default::default()
        };
        let reader = stream
            .create_consumer(config)
            .await
            .map_err(|e| format!("{name} tap: {e}"))?;
        let mut messages = reader
            .messages()
            .await
            .map_err(|e| format!("{name} tap: {e}"))?;
        let ids: Vec<String> = ids.iter().map(|i| i.as_str().to_owned()).collect();
        let task = tokio::spawn(async move {
            let mut out = Tapped {
                writes: Vec::new(),
                first_stored: vec![DlvCopies::new(); ids.len()],
            };
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    next = messages.next() => match next {
                        Some(Ok(m)) => {
                            let owner = m.subject.as_str().strip_prefix(&prefix).unwrap_or_default();
                            let stored_ms = m.info().map_or(0, |i| {
                                u64::try_from(i.published.unix_timestamp_nanos() / 1_000_000)
                                    .unwrap_or(0)
                            });
                            if let Some(slot) = ids.iter().position(|id| id == owner) {
                                out.writes.push((slot, stored_ms));
                                let id = serde_json::from_slice::<serde_json::Value>(&m.payload)
                                    .ok()
                                    .and_then(|v| v.get("id")?.as_str().map(str::to_owned));
                                if let (Some(id), Some(first)) = (id, out.first_stored.get_mut(slot)) {
                                    first.entry(id).or_insert(stored_ms);
                                }
                            }
                        }
                        // The ordered consumer recreates itself after an error.
                        Some(Err(_)) => {}
                        None => break,
                    },
                }
            }
            out
        });
        Ok(DlvTap { task })
    }
}

/// The figures of one `stuck-member` stall (the `stuck_member` JSON object).
#[derive(Debug, Default)]
struct StuckFigures {
    member: String,
    stall_s: f64,
    /// The window before the stall the rates are compared with (as long as the stall).
    window_s: f64,
    others: usize,
    others_before: f64,
    others_during: f64,
    /// Copies owed to the others by the acks in each window (what the publisher and the churn
    /// gave them to receive), per second.
    owed_before: f64,
    owed_during: f64,
    /// From the resume to the first surfacing of the last copy owed to the member by then.
    catch_up_s: Option<f64>,
    /// Every copy owed to the member by the resume surfaced or reported lost.
    caught_up: bool,
    owed_at_resume: usize,
    lost_reported: usize,
    /// Live copies the member's full ledger shed over the run (their DLV copies follow).
    live_shed: u64,
    backlog_at_resume: Option<DlvBacklog>,
    backlog_after_heal: Option<DlvBacklog>,
}

impl StuckFigures {
    fn ratio(&self) -> Option<f64> {
        (self.others_before > 0.0).then(|| self.others_during / self.others_before)
    }

    fn json(&self) -> serde_json::Value {
        let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
        json!({"member": self.member, "stall_s": r3(self.stall_s),
               "window_s": r3(self.window_s),
               "rate_basis": "DLV copies stored for the other members",
               "others": self.others,
               "others_copies_per_s_before": r3(self.others_before),
               "others_copies_per_s_during": r3(self.others_during),
               "ratio": self.ratio().map(r3),
               "others_owed_per_s_before": r3(self.owed_before),
               "others_owed_per_s_during": r3(self.owed_during),
               "catch_up_s": self.catch_up_s.map(r3),
               "caught_up": self.caught_up,
               "owed_at_resume": self.owed_at_resume,
               "losses_reported": self.lost_reported,
               "live_copies_shed": self.live_shed,
               "dlv_unacked_at_resume": self.backlog_at_resume.map(|b| b.ack_pending),
               "dlv_undelivered_at_resume": self.backlog_at_resume.map(|b| b.pending),
               "dlv_unacked_after_heal": self.backlog_after_heal.map(|b| b.ack_pending),
               "dlv_undelivered_after_heal": self.backlog_after_heal.map(|b| b.pending)})
    }
}

/// The others' DLV rate during a stall against the window of equal length before it (from the
/// tap's store times), and what the acks in each window owed them.
fn stuck_rates(
    stall: &StallMark,
    tap: &[(usize, u64)],
    owed: &[Owed],
    acked_at: &BTreeMap<&str, u64>,
    f: &mut StuckFigures,
) {
    let Some(resumed) = stall.resumed_ms else {
        return;
    };
    let len = resumed.saturating_sub(stall.stalled_ms);
    let before = (stall.stalled_ms.saturating_sub(len), stall.stalled_ms);
    let during = (stall.stalled_ms, resumed);
    let per_s = |n: usize| {
        if len == 0 {
            0.0
        } else {
            n as f64 * 1000.0 / len as f64
        }
    };
    let stored_in = |(from, to): (u64, u64)| {
        tap.iter()
            .filter(|(m, at)| *m != stall.member && *at >= from && *at < to)
            .count()
    };
    let owed_in = |(from, to): (u64, u64)| {
        owed.iter()
            .enumerate()
            .filter(|(m, _)| *m != stall.member)
            .flat_map(|(_, o)| &o.expected)
            .filter_map(|(id, _)| acked_at.get(id.as_str()))
            .filter(|at| **at >= from && **at < to)
            .count()
    };
    f.stall_s = len as f64 / 1000.0;
    f.window_s = f.stall_s;
    f.others = owed.len().saturating_sub(1);
    f.others_before = per_s(stored_in(before));
    f.others_during = per_s(stored_in(during));
    f.owed_before = per_s(owed_in(before));
    f.owed_during = per_s(owed_in(during));
}

/// One injected fault's moments (Unix ms).
#[derive(Clone, Copy, Debug)]
struct FaultMark {
    kind: Fault,
    injected_ms: u64,
    /// When the server accepted connections again (server faults).
    restored_ms: Option<u64>,
}

impl FaultMark {
    fn injected(kind: Fault) -> Self {
        FaultMark {
            kind,
            injected_ms: wall_clock().0,
            restored_ms: None,
        }
    }

    fn restored(&mut self, at_ms: u64) {
        if self.kind.heals() && self.restored_ms.is_none() {
            self.restored_ms = Some(at_ms);
        }
    }
}

/// How long durable delivery took to recover, from the owed copies' ack and DLV store times:
/// - per server fault, **heal**: from the server accepting connections again to the DLV write of
///   the last copy owed then (acked by then, not yet stored); 0 when none was owed;
/// - per daemon kill, **takeover**: from the kill to the next DLV write (the successor's first);
/// - **stall**: the longest time with an owed copy outstanding (acked, not yet stored) and no
///   DLV write at all.
///
/// Copies without a DLV store time (rotated out, missing) do not take part.
#[derive(Debug, Default, PartialEq)]
struct Recovery {
    heals_s: Vec<f64>,
    takeovers_s: Vec<f64>,
    stall_s: f64,
}

impl Recovery {
    fn measure(marks: &[FaultMark], pairs: &[(u64, u64)]) -> Recovery {
        let mut writes: Vec<u64> = pairs.iter().map(|(_, stored)| *stored).collect();
        writes.sort_unstable();
        writes.dedup();
        let s = |ms: u64| ms as f64 / 1000.0;
        let mut out = Recovery::default();
        for m in marks {
            match (m.kind, m.restored_ms) {
                (Fault::DaemonKill, _) => {
                    if let Some(next) = writes.iter().find(|w| **w > m.injected_ms) {
                        out.takeovers_s.push(s(next - m.injected_ms));
                    }
                }
                (_, Some(restored)) => {
                    let last = pairs
                        .iter()
                        .filter(|(acked, stored)| *acked <= restored && *stored > restored)
                        .map(|(_, stored)| *stored)
                        .max();
                    out.heals_s.push(last.map_or(0.0, |l| s(l - restored)));
                }
                _ => {}
            }
        }
        // Each owed copy sees the gaps between DLV writes from its ack to its own write; the
        // longest of those over every copy is the stall.
        let mut stall = 0u64;
        for (acked, stored) in pairs {
            let mut from = *acked;
            let first = writes.partition_point(|w| *w <= *acked);
            for w in &writes[first..] {
                if *w > *stored {
                    break;
                }
                stall = stall.max(w - from);
                from = *w;
            }
        }
        out.stall_s = s(stall);
        out
    }

    fn heal_s(&self) -> Option<f64> {
        self.heals_s.iter().copied().reduce(f64::max)
    }

    fn takeover_s(&self) -> Option<f64> {
        self.takeovers_s.iter().copied().reduce(f64::max)
    }
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |x| format!("{x:.1}"))
}

/// Starts `n` nats-server nodes `n0..` on loopback, each routed to all others (cluster
/// `cotal_chaos`), JetStream on with its own file store and `sync_interval: always`.
fn start_cluster(n: usize) -> Result<Vec<SpawnedServer>, String> {
    if !(1..=5).contains(&n) {
        return Err("--cluster takes 1 to 5 nodes".into());
    }
    let client: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
    let cluster: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
    let routes: Vec<String> = cluster
        .iter()
        .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
        .collect();
    let mut nodes = Vec::new();
    for i in 0..n {
        let extra = format!(
            "cluster {{ name: cotal_chaos, listen: \"127.0.0.1:{}\", routes: [{}] }}\n",
            cluster[i],
            routes.join(", ")
        );
        nodes.push(SpawnedServer::start_node(
            client[i],
            &format!("n{i}"),
            "sync_interval: always",
            &extra,
        )?);
    }
    Ok(nodes)
}

/// The index of the node leading the CHAT stream (its server name is `n<i>`), if known.
async fn chat_leader(js: &async_nats::jetstream::Context, space: &Space) -> Option<usize> {
    let mut stream = js
        .get_stream(format!("CHAT_{}", space.as_str()))
        .await
        .ok()?;
    let info = stream.info().await.ok()?;
    info.cluster
        .as_ref()?
        .leader
        .as_deref()?
        .strip_prefix('n')?
        .parse()
        .ok()
}

/// The CHAT sequences of the copies owed to a member that have no DLV copy, leaving out those
/// older than its oldest retained DLV copy when its DLV subject is at the stream's 1000-copy cap
/// (rotated out with discard-old after their transfer, not missing).
fn no_dlv_copy(owe: &Owed, copies: &DlvCopies) -> Vec<u64> {
    let at_cap = copies.len() >= DLV_CAP;
    let oldest = owe
        .expected
        .iter()
        .filter(|(id, _)| copies.contains_key(id))
        .map(|(_, seq)| *seq)
        .min()
        .unwrap_or(0);
    owe.expected
        .iter()
        .filter(|(id, seq)| {
            let rotated = at_cap && *seq < oldest;
            !copies.contains_key(id) && !rotated
        })
        .map(|(_, seq)| *seq)
        .collect()
}

/// Copies `DLV_<space>` keeps per member subject (limits, discard old).
const DLV_CAP: usize = 1000;

/// One member's DLV copies: message id → when the stream stored it (Unix ms, the server's clock,
/// which is this machine's).
type DlvCopies = BTreeMap<String, u64>;

/// What one member is owed, from its membership record.
struct Owed {
    member: AgentId,
    /// The intervals of the record (current and closed), as `(join cursor, leave cursor)`.
    intervals: Vec<(u64, Option<u64>)>,
    /// Closed intervals the record no longer keeps (their messages cannot be judged).
    forgotten: u64,
    /// `(message id, CHAT seq)` of every acked message inside one of the intervals.
    expected: Vec<(String, u64)>,
}

/// The copies each member is owed: an acked message is expected for a member if its CHAT
/// sequence lies in one of the intervals its membership record holds (`join cursor < seq ≤
/// leave cursor`, the record's current interval and its closed ones). The records are the
/// judge: no boundary window is excused.
async fn owed_copies(
    js: &async_nats::jetstream::Context,
    space: &Space,
    channel: &ConcreteChannel,
    ids: &[AgentId],
    acked: &[Published],
) -> Result<Vec<Owed>, String> {
    let kv = js
        .get_key_value(KvBucket::Members.name(space))
        .await
        .map_err(|e| format!("members bucket: {e}"))?;
    let mut out = Vec::new();
    for id in ids {
        let value = kv
            .get(member_key(channel, id))
            .await
            .map_err(|e| format!("membership record of {id}: {e}"))?;
        let mut intervals = Vec::new();
        let mut forgotten = 0;
        if let Some(bytes) = value {
            let rec: MembershipRecord = serde_json::from_slice(&bytes)
                .map_err(|e| format!("membership record of {id}: {e}"))?;
            if let Some(i) = current_interval(&rec) {
                intervals.push((i.join_cursor, i.leave_cursor));
            }
            for c in closed_intervals(&rec) {
                intervals.push((c.join_cursor, Some(c.leave_cursor)));
            }
            forgotten = forgotten_intervals(&rec);
        }
        let inside = |seq: u64| {
            intervals
                .iter()
                .any(|(j, l)| seq > *j && l.is_none_or(|l| seq <= l))
        };
        let expected = acked
            .iter()
            .filter(|p| inside(p.seq))
            .map(|p| (p.id.clone(), p.seq))
            .collect();
        out.push(Owed {
            member: id.clone(),
            intervals,
            forgotten,
            expected,
        });
    }
    Ok(out)
}

/// Where the durable path stopped for the `seqs` with no DLV copy: is the message in CHAT, does
/// INBOX hold an entry for it, and where the fan-out consumer stands.
async fn durable_diagnosis(
    js: &async_nats::jetstream::Context,
    space: &Space,
    seqs: &BTreeSet<u64>,
) -> Vec<String> {
    let mut out = Vec::new();
    let chat = format!("CHAT_{}", space.as_str());
    let inbox = format!("INBOX_{}", space.as_str());
    let Ok(stream) = js.get_stream(&chat).await else {
        return vec![format!("diagnosis: no {chat}")];
    };
    for seq in seqs.iter().take(10) {
        let line = match stream.get_raw_message(*seq).await {
            Ok(m) => {
                let id = serde_json::from_slice::<serde_json::Value>(&m.payload)
                    .ok()
                    .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned))
                    .unwrap_or_default();
                let entries = inbox_entries(js, &inbox, &id).await;
                format!("diagnosis: CHAT seq {seq} holds {id}; INBOX entries for it: {entries}")
            }
            Err(e) => format!("diagnosis: CHAT seq {seq} not readable: {e}"),
        };
        out.push(line);
    }
    if let Ok(mut c) = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("fanout")
        .await
        && let Ok(info) = c.info().await
    {
        out.push(format!(
            "diagnosis: fanout consumer: delivered stream seq {}, ack floor {}, pending {}, \
             ack pending {}, redelivered {}",
            info.delivered.stream_sequence,
            info.ack_floor.stream_sequence,
            info.num_pending,
            info.num_ack_pending,
            info.num_redelivered
        ));
    }
    out
}

/// How many INBOX entries carry message `id` (a scan of the stream, bounded by 10 s).
async fn inbox_entries(js: &async_nats::jetstream::Context, inbox: &str, id: &str) -> String {
    use async_nats::jetstream::consumer;
    use futures::StreamExt;
    let Ok(mut stream) = js.get_stream(inbox).await else {
        return "no stream".into();
    };
    let Ok(info) = stream.info().await else {
        return "no info".into();
    };
    let total = info.state.messages;
    let config = consumer::push::OrderedConfig {
        deliver_subject: js.client().new_inbox(),
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    };
    let Ok(reader) = stream.create_consumer(config).await else {
        return "no reader".into();
    };
    let Ok(mut messages) = reader.messages().await else {
        return "no reader".into();
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (mut seen, mut hits) = (0u64, 0u64);
    while seen < total {
        match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(Ok(m))) => {
                seen += 1;
                if m.payload.windows(id.len()).any(|w| w == id.as_bytes()) {
                    hits += 1;
                }
            }
            _ => break,
        }
    }
    format!("{hits} (of {seen} scanned)")
}

/// The message ids of the durable copies stored on each member's `dlv.<id>` subject (the DLV
/// payload is the bare CotalMessage; the DLV msg-id collapses a successor's rewrite of the same
/// copy). Read with an ordered push consumer, bounded by the stream's message count and 30 s.
async fn dlv_ids(
    js: &async_nats::jetstream::Context,
    space: &Space,
    ids: &[AgentId],
) -> Result<Vec<DlvCopies>, String> {
    use async_nats::jetstream::consumer;
    use futures::StreamExt;
    let name = format!("DLV_{}", space.as_str());
    let mut stream = js
        .get_stream(&name)
        .await
        .map_err(|e| format!("{name}: {e}"))?;
    let total = stream
        .info()
        .await
        .map_err(|e| format!("{name} info: {e}"))?
        .state
        .messages;
    let mut out = vec![DlvCopies::new(); ids.len()];
    if total == 0 {
        return Ok(out);
    }
    let prefix = format!("cotal.{}.dlv.", space.as_str());
    let config = consumer::push::OrderedConfig {
        deliver_subject: js.client().new_inbox(),
        filter_subject: format!("{prefix}>"),
        deliver_policy: consumer::DeliverPolicy::All,
        replay_policy: consumer::ReplayPolicy::Instant,
        ..Default::default()
    };
    let reader = stream
        .create_consumer(config)
        .await
        .map_err(|e| format!("{name} reader: {e}"))?;
    let mut messages = reader
        .messages()
        .await
        .map_err(|e| format!("{name} reader: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut seen = 0u64;
    while seen < total {
        let next = tokio::time::timeout_at(deadline, messages.next())
            .await
            .map_err(|_| format!("{name}: read {seen} of {total} copies in 30 s"))?;
        let Some(Ok(m)) = next else {
            return Err(format!("{name}: reader ended after {seen} of {total}"));
        };
        seen += 1;
        let owner = m.subject.as_str().strip_prefix(&prefix).unwrap_or_default();
        let Some(slot) = ids.iter().position(|id| id.as_str() == owner) else {
            continue;
        };
        let id = serde_json::from_slice::<serde_json::Value>(&m.payload)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_owned));
        let stored_ms = m.info().map_or(0, |i| {
            u64::try_from(i.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
        });
        if let Some(id) = id {
            out[slot].entry(id).or_insert(stored_ms);
        }
    }
    Ok(out)
}

/// How often the run samples resident memory.
const MEMORY_EVERY: Duration = Duration::from_secs(10);

/// Resident memory of the serving daemon (whichever process holds that role) and of the first
/// server over the run, sampled every [`MEMORY_EVERY`] from `/proc/<pid>/status` (`VmRSS`).
/// A fault restarts a process and its memory with it, so beside the role's first and last
/// samples the longest-lived process of each is reported: its growth over its own life.
#[derive(Default)]
struct Memory {
    last_at: Option<Instant>,
    daemon: RssTrack,
    server: RssTrack,
}

/// The samples of one role: the first and the last, and per process its first and last.
#[derive(Default)]
struct RssTrack {
    first_kib: Option<u64>,
    last_kib: Option<u64>,
    /// The process sampled last: pid, first seen, its first and last sample.
    current: Option<Life>,
    /// The longest-lived process so far.
    longest: Option<Life>,
}

#[derive(Clone, Copy)]
struct Life {
    pid: u32,
    since: Instant,
    until: Instant,
    first_kib: u64,
    last_kib: u64,
    /// The first sample once it had lived [`MEMORY_WARM`]: growth after it is not warm-up.
    warm_kib: Option<u64>,
}

/// How long a process runs before its memory counts as warmed up.
const MEMORY_WARM: Duration = Duration::from_secs(600);

impl Life {
    fn lived(&self) -> Duration {
        self.until.saturating_duration_since(self.since)
    }
}

impl RssTrack {
    fn sample(&mut self, pid: u32, now: Instant) {
        let Ok((rss, _)) = super::bench::proc_memory(pid) else {
            return;
        };
        self.first_kib.get_or_insert(rss);
        self.last_kib = Some(rss);
        match &mut self.current {
            Some(life) if life.pid == pid => {
                life.until = now;
                life.last_kib = rss;
                if life.warm_kib.is_none() && life.lived() >= MEMORY_WARM {
                    life.warm_kib = Some(rss);
                }
            }
            _ => {
                self.current = Some(Life {
                    pid,
                    since: now,
                    until: now,
                    first_kib: rss,
                    last_kib: rss,
                    warm_kib: None,
                });
            }
        }
        if let Some(life) = self.current
            && self
                .longest
                .is_none_or(|l| l.pid == pid || life.lived() > l.lived())
        {
            self.longest = Some(life);
        }
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "rss_kib_first": self.first_kib,
            "rss_kib_last": self.last_kib,
            "longest_life": self.longest.map(|l| json!({
                "pid": l.pid,
                "lived_s": l.lived().as_secs(),
                "rss_kib_first": l.first_kib,
                "rss_kib_last": l.last_kib,
                "growth_pct": growth_pct(l.first_kib, l.last_kib),
                "rss_kib_after_10_min": l.warm_kib,
                "growth_after_10_min_pct": l.warm_kib.map(|w| growth_pct(w, l.last_kib)),
            })),
        })
    }

    fn line(&self, role: &str) -> String {
        match self.longest {
            Some(l) => format!(
                "{role} RSS first/last {}/{} KiB; longest-lived process (pid {}, {} s): {} -> {} KiB ({:+.1} %)",
                self.first_kib.unwrap_or(0),
                self.last_kib.unwrap_or(0),
                l.pid,
                l.lived().as_secs(),
                l.first_kib,
                l.last_kib,
                growth_pct(l.first_kib, l.last_kib)
            ),
            None => format!("{role} RSS not sampled"),
        }
    }
}

fn growth_pct(first: u64, last: u64) -> f64 {
    if first == 0 {
        return 0.0;
    }
    (last as f64 - first as f64) * 100.0 / first as f64
}

impl Memory {
    /// Samples the serving daemon and the first server, at most every [`MEMORY_EVERY`].
    fn sample(&mut self, daemon: Option<&DaemonChild>, server: Option<&SpawnedServer>) {
        let now = Instant::now();
        if self.last_at.is_some_and(|t| now < t + MEMORY_EVERY) {
            return;
        }
        self.last_at = Some(now);
        if let Some(d) = daemon {
            self.daemon.sample(d.child.id(), now);
        }
        if let Some(s) = server {
            self.server.sample(s.pid(), now);
        }
    }

    fn to_json(&self) -> serde_json::Value {
        json!({"daemon": self.daemon.to_json(), "server": self.server.to_json()})
    }

    fn summary(&self) -> String {
        format!(
            "memory: {}; {}",
            self.daemon.line("daemon"),
            self.server.line("server")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ChaosArgs,
    }

    fn args(extra: &[&str]) -> ChaosArgs {
        let mut argv = vec!["chaos", "--spawn-server"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("valid arguments").args
    }

    fn plan(extra: &[&str]) -> Vec<(u64, Step)> {
        let a = args(extra);
        let kinds = Fault::parse(a.faults.as_deref().unwrap_or("daemon-kill,server-stop"))
            .expect("fault list");
        schedule(&a, &kinds)
    }

    fn render(steps: &[(u64, Step)]) -> String {
        format!("{steps:?}")
    }

    #[test]
    fn the_schedule_is_a_function_of_the_seed() {
        let run = ["--duration", "120", "--members", "3", "--seed", "9"];
        assert_eq!(render(&plan(&run)), render(&plan(&run)));
        let other = ["--duration", "120", "--members", "3", "--seed", "10"];
        assert_ne!(render(&plan(&run)), render(&plan(&other)));
    }

    #[test]
    fn outages_never_overlap_and_stay_inside_the_run() {
        for seed in 0..50u64 {
            let seed = seed.to_string();
            let steps = plan(&[
                "--duration",
                "90",
                "--members",
                "4",
                "--fault-count",
                "6",
                "--seed",
                &seed,
            ]);
            let mut open: Option<Fault> = None;
            let mut injected = 0;
            for (at, step) in &steps {
                assert!(*at >= 5_000 && *at < 90_000, "seed {seed}: {at}");
                match step {
                    Step::Inject(k) => {
                        assert!(open.is_none(), "seed {seed}: {k:?} during {open:?}");
                        open = Some(*k);
                        injected += 1;
                    }
                    Step::Restore(k) => {
                        assert_eq!(open.take(), Some(*k), "seed {seed}");
                    }
                    Step::Leave(i) | Step::Rejoin(i) => assert!(*i < 4),
                    Step::Stall(_) | Step::Resume(_) => panic!("no stuck-member asked for"),
                }
            }
            assert_eq!(injected, 6, "seed {seed}");
            assert!(open.is_none());
        }
    }

    #[test]
    fn late_joiners_join_once_in_the_first_half() {
        let steps = plan(&[
            "--duration",
            "100",
            "--members",
            "6",
            "--churn",
            "0",
            "--seed",
            "3",
        ]);
        let joins: Vec<(u64, usize)> = steps
            .iter()
            .filter_map(|(at, s)| match s {
                Step::Rejoin(i) => Some((*at, *i)),
                _ => None,
            })
            .collect();
        let mut who: Vec<usize> = joins.iter().map(|(_, i)| *i).collect();
        who.sort_unstable();
        assert_eq!(who, [4, 5], "the last two of six members join late");
        assert!(joins.iter().all(|(at, _)| *at < 5_000 + 45_000));
        assert_eq!(late_joiners(&args(&["--members", "1"])), 0);
        assert_eq!(
            late_joiners(&args(&["--members", "2", "--late-joiners", "5"])),
            1
        );
    }

    fn mark(kind: Fault, injected_ms: u64, restored_ms: Option<u64>) -> FaultMark {
        FaultMark {
            kind,
            injected_ms,
            restored_ms,
        }
    }

    #[test]
    fn recovery_measures_heal_takeover_and_stall_from_ack_and_store_times() {
        // Steady copies (acked then stored 10 ms later) with a server outage 1,000–4,000 and a
        // daemon kill at 10,000.
        let mut pairs = vec![(100, 110), (900, 910)];
        // Acked before the outage, stored 2.5 s after the restart: the heal.
        pairs.push((950, 6_500));
        pairs.push((4_500, 4_600));
        // The kill: the next write 3.2 s later.
        pairs.push((9_900, 13_200));
        pairs.push((13_000, 13_210));
        let marks = [
            mark(Fault::ServerKill, 1_000, Some(4_000)),
            mark(Fault::DaemonKill, 10_000, None),
        ];
        let r = Recovery::measure(&marks, &pairs);
        assert_eq!(r.heals_s, vec![2.5]);
        assert_eq!(r.takeovers_s, vec![3.2]);
        // Longest gap with a copy outstanding: 6,500 → 13,200 (the copy acked at 9,900 waits
        // from its ack, 9,900, to 13,200: 3.3 s) vs 950 → 4,600 (3.65 s).
        assert_eq!(r.stall_s, 3.65);
        assert_eq!(r.heal_s(), Some(2.5));
        // Nothing owed at a restart: a heal of 0; no daemon kill: no takeover.
        let r = Recovery::measure(
            &[mark(Fault::ServerStop, 1_000, Some(2_000))],
            &[(100, 110)],
        );
        assert_eq!((r.heals_s.clone(), r.takeover_s()), (vec![0.0], None));
    }

    #[test]
    fn long_outages_start_their_slot_and_end_inside_it() {
        let steps = plan(&[
            "--faults",
            "long-outage",
            "--duration",
            "100",
            "--fault-count",
            "2",
        ]);
        let outages: Vec<(u64, u64)> = steps
            .iter()
            .filter_map(|(at, s)| match s {
                Step::Inject(Fault::LongOutage) => Some(*at),
                _ => None,
            })
            .zip(steps.iter().filter_map(|(at, s)| match s {
                Step::Restore(Fault::LongOutage) => Some(*at),
                _ => None,
            }))
            .collect();
        assert_eq!(outages.len(), 2, "{}", render(&steps));
        for (inject, restore) in &outages {
            assert!(restore - inject >= LONG_OUTAGE_MS, "{}", render(&steps));
        }
        assert!(outages[0].1 < outages[1].0, "{}", render(&steps));
    }

    #[test]
    fn partitions_last_5_to_15_s_and_stalls_have_their_window_before_them_in_the_slot() {
        for seed in 0..50u64 {
            let seed = seed.to_string();
            let steps = plan(&[
                "--faults",
                "partition,stuck-member",
                "--duration",
                "250",
                "--fault-count",
                "4",
                "--members",
                "4",
                "--churn",
                "0",
                "--seed",
                &seed,
            ]);
            // Slots of 60 s from 5 s on: a stall of min(60 s, (slot - 1 s) / 2) = 29.5 s.
            let slot = 60_000;
            let mut open: Option<(u64, Step)> = None;
            let mut faults = 0;
            for (at, step) in &steps {
                match (step, open.take()) {
                    (Step::Inject(Fault::Partition) | Step::Stall(_), None) => {
                        open = Some((*at, *step));
                        faults += 1;
                    }
                    (Step::Restore(Fault::Partition), Some((from, Step::Inject(_)))) => {
                        let pause = at - from;
                        assert!((5_000..=15_000).contains(&pause), "seed {seed}: {pause}");
                    }
                    (Step::Resume(m), Some((from, Step::Stall(n)))) => {
                        assert_eq!(*m, n, "seed {seed}");
                        // Late joiners (the last of four) are never stalled.
                        assert!(n < 3, "seed {seed}: {n}");
                        assert_eq!(at - from, stuck_stall_ms(slot), "seed {seed}");
                        let k = (from - 5_000) / slot;
                        assert!(
                            from - stuck_stall_ms(slot) >= 5_000 + k * slot,
                            "seed {seed}"
                        );
                        assert!(*at <= 5_000 + (k + 1) * slot, "seed {seed}");
                    }
                    (Step::Leave(_) | Step::Rejoin(_), o) => open = o,
                    (s, o) => panic!("seed {seed}: {s:?} with {o:?} open"),
                }
            }
            assert_eq!(faults, 4, "seed {seed}");
            assert!(open.is_none(), "seed {seed}");
        }
        assert_eq!(stuck_stall_ms(200_000), STUCK_MAX_MS);
        assert_eq!(stuck_stall_ms(21_000), 10_000);
        assert_eq!(stuck_stall_ms(500), 0);
    }

    #[test]
    fn stuck_rates_compare_the_others_dlv_copies_with_the_window_before() {
        // A 10 s stall of member 0 at 20,000: the other member got 40 copies in the 10 s
        // before and 30 during; the stalled member's own copies do not count.
        let stall = StallMark {
            member: 0,
            stalled_ms: 20_000,
            resumed_ms: Some(30_000),
            resumed_at: None,
            backlog_at_resume: None,
            backlog_after_heal: None,
        };
        let mut tap: Vec<(usize, u64)> = (0..40).map(|i| (1, 10_000 + i * 250)).collect();
        tap.extend((0..30).map(|i| (1, 20_000 + i * 300)));
        tap.extend((0..99).map(|i| (0, 10_000 + i * 200)));
        let acked: Vec<Published> = (0..5)
            .map(|i| Published {
                id: format!("a{i}"),
                seq: i + 1,
                acked_ms: 12_000 + i * 4_000,
            })
            .collect();
        let acked_at: BTreeMap<&str, u64> =
            acked.iter().map(|p| (p.id.as_str(), p.acked_ms)).collect();
        let owe = |member: &str, ids: &[&str]| Owed {
            member: AgentId::new(member).expect("id"),
            intervals: Vec::new(),
            forgotten: 0,
            expected: ids.iter().map(|i| ((*i).to_owned(), 0)).collect(),
        };
        // a0 (12 s), a1 (16 s) before; a2 (20 s), a3 (24 s), a4 (28 s) during.
        let owed = [
            owe("m0", &["a0", "a1", "a2", "a3", "a4"]),
            owe("m1", &["a0", "a1", "a2", "a3", "a4"]),
        ];
        let mut f = StuckFigures::default();
        stuck_rates(&stall, &tap, &owed, &acked_at, &mut f);
        assert_eq!((f.stall_s, f.window_s, f.others), (10.0, 10.0, 1));
        assert_eq!((f.others_before, f.others_during), (4.0, 3.0));
        assert_eq!(f.ratio(), Some(0.75));
        assert_eq!((f.owed_before, f.owed_during), (0.2, 0.3));
        // No copy before the stall: no ratio.
        let mut f = StuckFigures::default();
        stuck_rates(&stall, &[], &owed, &acked_at, &mut f);
        assert_eq!(f.ratio(), None);
    }

    #[test]
    fn fault_lists_parse_and_refuse_unknown_names() {
        assert_eq!(
            Fault::parse("partition,stuck-member").expect("valid"),
            [Fault::Partition, Fault::StuckMember]
        );
        assert!(Fault::Partition.heals() && !Fault::Partition.of_the_server());
        assert!(!Fault::StuckMember.heals() && !Fault::DaemonKill.heals());
        assert_eq!(
            Fault::parse("server-kill, daemon-kill,server-kill").expect("valid"),
            [Fault::ServerKill, Fault::DaemonKill]
        );
        assert!(Fault::parse("").is_err());
        assert!(
            Fault::parse("daemon-kill,meteor")
                .expect_err("unknown")
                .contains("meteor")
        );
    }
}
