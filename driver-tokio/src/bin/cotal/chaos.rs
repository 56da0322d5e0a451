//! `cotal chaos`: the delivery daemon killed with SIGKILL at seeded random points while messages
//! flow (issue 9, faults half; first fault only).
//!
//! The run: a fresh space with one durable channel, M member agents in this process (each with
//! its ACL record and DLV consumer), a publisher posting at a steady rate for the duration, and
//! the delivery daemon as a **child process** (`cotal delivery`, this same binary). At seeded
//! points the daemon is killed with SIGKILL (by its PID) and, after a seeded pause, a successor
//! with a new id is started; it takes the lease once the dead holder's entry expires
//! (`LEASE_TTL`, 30 s) and resumes the durable fan-out consumer where the dead one left it.
//!
//! After the duration the run heals (no more faults, the last daemon keeps running) until every
//! member holds every message through DLV, or the heal timeout. The check is on the durable path,
//! which is the one the kills hit: for each member the distinct messages whose durable copy
//! reached its `dlv.<member>` subject (the DLV msg-id dedups rewrites by a successor). Then:
//!
//! - `copies_expected` = messages × members;
//! - `delivered` = distinct (message, member) pairs the members surfaced (live or DLV);
//! - `duplicates_suppressed` = durable copies that arrived for a message already surfaced live
//!   (the ledger suppressed them), plus DLV rewrites collapsed by the msg-id;
//! - `losses_reported` = loss events the members raised;
//! - `losses_unreported` = expected durable copies neither in DLV nor reported: must be 0.
//!
//! Not built yet: members joining and leaving during the run, nats-server restarts, a cluster,
//! agent crashes, SIGSTOP lease fights (see issue 9).

use crate::bench::{start_member, target_server};
use bytes::Bytes;
use clap::Args;
use cotal_core::agent::AgentConfig;
use cotal_core::wire::config::ConsumerSpec;
use cotal_core::wire::keys::{KvBucket, acl_key};
use cotal_core::wire::message::Sender;
use cotal_core::wire::records::AclRecord;
use cotal_core::wire::token::{AgentId, Channel, Space};
use cotal_driver_tokio::connect::{ConnectConfig, connect};
use cotal_driver_tokio::provision::{apply_consumer, provision_space};
use cotal_driver_tokio::run::wall_clock;
use serde_json::json;
use std::collections::BTreeSet;
use std::process::{Child, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const CHANNEL: &str = "chaos";

/// `cotal chaos`.
#[derive(Args, Debug)]
pub(crate) struct ChaosArgs {
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
}

fn spawn_daemon(url: &str, space: &Space, n: usize) -> Result<DaemonChild, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own binary: {e}"))?;
    let id = format!("chaos-daemon-{n}");
    let child = std::process::Command::new(exe)
        .args([
            "delivery",
            "--space",
            space.as_str(),
            "--id",
            &id,
            "--nats",
            url,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the daemon: {e}"))?;
    Ok(DaemonChild { child, id })
}

impl Drop for DaemonChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn chaos(args: ChaosArgs) -> ExitCode {
    match run(args).await {
        Ok(code) => code,
        Err(e) => crate::fail(e),
    }
}

async fn run(args: ChaosArgs) -> Result<ExitCode, String> {
    if args.members == 0 || args.rate == 0 || args.duration < 10 {
        return Err("--members and --rate must be at least 1, --duration at least 10".into());
    }
    let (server, url) = target_server(args.spawn_server, args.nats.as_deref())?;
    let cfg = ConnectConfig::new([url.clone()]);
    let t = cfg.request_timeout;
    let admin = connect(&cfg).await.map_err(|e| e.to_string())?;
    let space = Space::new(format!("chaos{}", args.seed)).map_err(|e| format!("space: {e}"))?;
    let channel = Channel::new(CHANNEL).map_err(|e| format!("channel: {e}"))?;
    let report = provision_space(&admin.client, &space, t).await;
    if report.failed() > 0 {
        return Err(format!("provisioning failed: {}", report.summary()));
    }
    let js = async_nats::jetstream::new(admin.client.clone());
    js.get_key_value(KvBucket::Channels.name(&space))
        .await
        .map_err(|e| format!("channels bucket: {e}"))?
        .put(
            CHANNEL,
            Bytes::from(json!({"deliveryClass": "durable", "replay": false}).to_string()),
        )
        .await
        .map_err(|e| format!("channel entry: {e}"))?;
    let acl = js
        .get_key_value(KvBucket::Acl.name(&space))
        .await
        .map_err(|e| format!("acl bucket: {e}"))?;
    let ids: Vec<AgentId> = (0..args.members)
        .map(|i| AgentId::new(format!("m{i}")))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("agent id: {e}"))?;
    let record = AclRecord {
        allow_subscribe: vec![">".to_owned()],
        revision: 1,
        updated_at: wall_clock(),
        extra: Default::default(),
    };
    let record = Bytes::from(serde_json::to_vec(&record).map_err(|e| e.to_string())?);
    for id in &ids {
        acl.put(acl_key(id), record.clone())
            .await
            .map_err(|e| format!("ACL record: {e}"))?;
        apply_consumer(&admin.client, &ConsumerSpec::dlv(&space, id), t)
            .await
            .map_err(|e| format!("DLV consumer: {e}"))?;
    }

    let mut spawned = 0usize;
    let mut daemon = spawn_daemon(&url, &space, spawned)?;
    spawned += 1;

    let surfaced = Arc::new(AtomicUsize::new(0));
    let joined = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut members = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let mut config = AgentConfig::new(
            space.clone(),
            Sender::new(id.clone(), id.as_str()),
            vec![channel.clone()],
            args.seed ^ (i as u64 + 1),
        );
        config.durable_backstop = true;
        config.create_dlv_consumer = false;
        members.push(
            start_member(
                &cfg,
                config,
                Arc::clone(&surfaced),
                Arc::clone(&joined),
                stop_rx.clone(),
            )
            .await?,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while joined.load(std::sync::atomic::Ordering::Relaxed) < args.members {
        if Instant::now() > deadline {
            return Err("members did not join durably within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The fault schedule: kill points in [5 s, duration − 5 s), one per 30 s of run (at least 1).
    let mut rng = Rng(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let faults = (args.duration / 30).max(1);
    let mut kills: Vec<u64> = (0..faults)
        .map(|_| 5_000 + rng.below(args.duration.saturating_sub(10) * 1000))
        .collect();
    kills.sort_unstable();
    let pauses: Vec<u64> = kills.iter().map(|_| rng.below(3000)).collect();

    let start = Instant::now();
    let interval = Duration::from_micros(1_000_000 / args.rate);
    let mut published: Vec<String> = Vec::new();
    let mut next_kill = 0usize;
    let mut faults_injected = 0u64;
    let mut timeline: Vec<String> = Vec::new();
    while start.elapsed() < Duration::from_secs(args.duration) {
        if next_kill < kills.len() && start.elapsed() >= Duration::from_millis(kills[next_kill]) {
            let _ = daemon.child.kill();
            let _ = daemon.child.wait();
            timeline.push(format!(
                "{:>6.1}s SIGKILL {} (pid {})",
                start.elapsed().as_secs_f64(),
                daemon.id,
                daemon.child.id()
            ));
            faults_injected += 1;
            tokio::time::sleep(Duration::from_millis(pauses[next_kill])).await;
            daemon = spawn_daemon(&url, &space, spawned)?;
            spawned += 1;
            timeline.push(format!(
                "{:>6.1}s start {}",
                start.elapsed().as_secs_f64(),
                daemon.id
            ));
            next_kill += 1;
        }
        let n = published.len();
        let id = format!("{:08x}-0000-4000-8000-{:012}", args.seed & 0xffff_ffff, n);
        let body = json!({"id": id, "ts": wall_clock().0, "space": space.as_str(),
                          "from": {"id": "publisher", "name": "publisher"}, "channel": CHANNEL,
                          "parts": [{"kind": "text", "text": format!("chaos {n}")}]});
        let ack = js
            .send_publish(
                format!("cotal.{}.chat.publisher.{CHANNEL}", space.as_str()),
                async_nats::jetstream::message::PublishMessage::build()
                    .payload(Bytes::from(body.to_string()))
                    .message_id(id.clone()),
            )
            .await
            .map_err(|e| format!("publish: {e}"))?
            .await;
        if ack.is_ok() {
            published.push(id);
        }
        tokio::time::sleep(interval).await;
    }

    // Heal: until every member's DLV holds every message, or the timeout.
    let expected = published.len() * args.members;
    let heal_start = Instant::now();
    let dlv = format!("DLV_{}", space.as_str());
    let mut durable = dlv_counts(&js, &dlv, &space, &ids).await?;
    while durable.iter().sum::<u64>() < expected as u64
        && heal_start.elapsed() < Duration::from_secs(args.heal_s)
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        durable = dlv_counts(&js, &dlv, &space, &ids).await?;
    }
    let heal_time = heal_start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_tx.send(true);
    let mut delivered = 0u64;
    let mut app_duplicates = 0u64;
    let mut via_dlv = 0u64;
    let mut losses_reported = 0u64;
    let published_set: BTreeSet<&String> = published.iter().collect();
    for m in members {
        let log = m.task.await.map_err(|e| format!("member task: {e}"))?;
        let _ = m.handle.stop(Duration::from_secs(2));
        let _ = tokio::time::timeout(Duration::from_secs(5), m.agent).await;
        delivered += log
            .first
            .keys()
            .filter(|k| published_set.contains(k))
            .count() as u64;
        app_duplicates += log.duplicates;
        via_dlv += log.via_dlv;
        losses_reported += log.lost_events;
    }
    drop(daemon);
    let durable_total: u64 = durable.iter().sum();
    let losses_unreported = (expected as u64)
        .saturating_sub(durable_total)
        .saturating_sub(losses_reported);
    let duplicates_suppressed = durable_total.saturating_sub(via_dlv);

    println!(
        "cotal chaos: seed {}, {} s, {} members, daemon SIGKILLed and replaced",
        args.seed, args.duration, args.members
    );
    for line in &timeline {
        println!("  {line}");
    }
    println!("| figure | value |");
    println!("| --- | --- |");
    for (name, value) in [
        ("faults injected (daemon SIGKILL)", faults_injected),
        ("messages published", published.len() as u64),
        ("copies expected", expected as u64),
        ("delivered (surfaced, distinct)", delivered),
        ("durable copies in DLV", durable_total),
        ("duplicates suppressed", duplicates_suppressed),
        ("duplicates surfaced to the application", app_duplicates),
        ("losses reported", losses_reported),
        ("losses unreported", losses_unreported),
    ] {
        println!("| {name} | {value} |");
    }
    println!("heal took {:.1} s", heal_time.as_secs_f64());
    if args.json {
        println!(
            "{}",
            json!({"seed": args.seed, "duration_s": args.duration, "members": args.members,
                   "faults_injected": faults_injected, "messages": published.len(),
                   "copies_expected": expected, "delivered": delivered,
                   "durable_copies": durable_total,
                   "duplicates_suppressed": duplicates_suppressed,
                   "duplicates_surfaced": app_duplicates,
                   "losses_reported": losses_reported,
                   "losses_unreported": losses_unreported,
                   "heal_s": heal_time.as_secs_f64()})
        );
    }
    drop(server);
    Ok(if losses_unreported == 0 && app_duplicates == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Messages stored on each member's `dlv.<id>` subject (one per distinct copy: the DLV msg-id
/// collapses a successor's rewrite of the same copy).
async fn dlv_counts(
    js: &async_nats::jetstream::Context,
    dlv: &str,
    space: &Space,
    ids: &[AgentId],
) -> Result<Vec<u64>, String> {
    let stream = js
        .get_stream(dlv)
        .await
        .map_err(|e| format!("{dlv}: {e}"))?;
    let mut out = Vec::new();
    for id in ids {
        let info = stream
            .info_with_subjects(format!("cotal.{}.dlv.{}", space.as_str(), id.as_str()))
            .await
            .map_err(|e| format!("{dlv} info: {e}"))?;
        use futures::TryStreamExt;
        let subjects: Vec<(String, usize)> = info
            .try_collect()
            .await
            .map_err(|e| format!("{dlv} subjects: {e}"))?;
        out.push(subjects.iter().map(|(_, n)| *n as u64).sum());
    }
    Ok(out)
}
