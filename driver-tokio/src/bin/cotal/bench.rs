//! `cotal bench`: end-to-end durable fan-out throughput and latency against a real nats-server.
//!
//! Everything it runs is in this process and visible in the report: a scratch stream for the
//! raw ceiling (pipelined JetStream publishes per second), a fresh space, one delivery daemon,
//! M member agents (each with its own connection, ACL record and DLV consumer, provisioned as
//! `cotal provision agent --apply` does) joined to one durable channel, and one sender agent that
//! publishes N messages on that channel without being a member.
//!
//! A message counts as surfaced for a member when it comes out of `take_messages` (the ledger
//! dedups the live and the DLV copy: the first surfacing counts, a second surfacing of the same
//! id is a duplicate). The run ends when every member surfaced every message, or at the timeout;
//! what is missing then is lost.
//!
//! With `--spawn-server` a nats-server (from `COTAL_NATS_SERVER`, else `.venv/bin/nats-server`)
//! is started on a free loopback port with a temporary store and killed (by its PID) at the end.

use bytes::Bytes;
use clap::Args;
use cotal_core::agent::{Agent, AgentConfig, AgentEvent};
use cotal_core::delivery::daemon::{Delivery, DeliveryConfig, DeliveryEvent};
use cotal_core::ledger::SourceKind;
use cotal_core::wire::config::ConsumerSpec;
use cotal_core::wire::keys::{KvBucket, acl_key, member_key};
use cotal_core::wire::message::Sender;
use cotal_core::wire::records::{AclRecord, MembershipRecord};
use cotal_core::wire::shard::ShardMap;
use cotal_core::wire::token::{AgentId, Channel, Space};
use cotal_driver_tokio::connect::{ConnectConfig, NatsConnection, connect};
use cotal_driver_tokio::exec::{Executor, ExecutorConfig};
use cotal_driver_tokio::provision::{apply_consumer, provision_space};
use cotal_driver_tokio::run::{MachineHandle, Runner, os_seed, wall_clock};
use serde_json::json;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The channel every member joins.
const CHANNEL: &str = "bench";
/// Publishes in flight while measuring the ceiling.
const CEILING_WINDOW: usize = 1024;
/// Publishes measured for the ceiling.
const CEILING_PUBLISHES: usize = 20_000;
/// Every setup wait (server start, joins, activation) is bounded by this.
const SETUP_WAIT: Duration = Duration::from_secs(60);

/// `cotal bench`.
#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// NATS server URL (no authentication: the bench provisions a space and consumers).
    #[arg(long, conflicts_with = "spawn_server")]
    nats: Option<String>,
    /// Start a local nats-server (COTAL_NATS_SERVER, else .venv/bin/nats-server) for the run.
    #[arg(long)]
    spawn_server: bool,
    /// Member agents joined to the durable channel.
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Messages published on the channel.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Sender agents the messages are spread over, round robin. CHAT keeps 1000 messages per
    /// sender subject: one sender bursting more than 1000 ahead of fan-out has its oldest
    /// discarded before fan-out reads them (the daemon reports them, `evicted_before_fanout`).
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Seconds to wait for every copy to surface before counting the rest as lost.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Seconds without any DLV hand-off by the daemon after which the durable wait gives up.
    #[arg(long, default_value_t = 10)]
    stall_s: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

/// A nats-server started for the run, killed by its PID on drop.
pub(crate) struct SpawnedServer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl SpawnedServer {
    fn binary() -> Result<PathBuf, String> {
        if let Some(p) = std::env::var_os("COTAL_NATS_SERVER") {
            return Ok(PathBuf::from(p));
        }
        let candidates = [
            PathBuf::from(".venv/bin/nats-server"),
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../.venv/bin/nats-server"
            )),
        ];
        candidates.into_iter().find(|p| p.exists()).ok_or_else(|| {
            "no nats-server: set COTAL_NATS_SERVER or run scripts/ensure-nats-server.sh".to_owned()
        })
    }

    pub(crate) fn start() -> Result<Self, String> {
        Self::start_with("")
    }

    /// [`SpawnedServer::start`] with `extra` appended to the server config.
    pub(crate) fn start_with(extra: &str) -> Result<Self, String> {
        Self::start_with_js("", extra)
    }

    /// [`SpawnedServer::start_with`] with `js_extra` added inside the `jetstream { }` block (for
    /// example `sync_interval: always`).
    pub(crate) fn start_with_js(js_extra: &str, extra: &str) -> Result<Self, String> {
        Self::start_node(free_port()?, "cotal_bench", js_extra, extra)
    }

    /// Starts a server named `name` on client port `port` (a cluster node passes its
    /// `cluster { }` block in `extra`), each with its own store directory.
    pub(crate) fn start_node(
        port: u16,
        name: &str,
        js_extra: &str,
        extra: &str,
    ) -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!(
            "cotal-bench-{}-{name}-{:x}",
            std::process::id(),
            os_seed() & 0xffff_ffff
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
        let conf = dir.join("server.conf");
        let js_extra = if js_extra.is_empty() {
            String::new()
        } else {
            format!(", {js_extra}")
        };
        let text = format!(
            "listen: \"127.0.0.1:{port}\"\nserver_name: {name}\njetstream {{ store_dir: {:?}, max_memory_store: 256MB, max_file_store: 4GB{js_extra} }}\nmax_payload: 8MB\n{extra}",
            dir.join("js").display().to_string()
        );
        std::fs::write(&conf, text).map_err(|e| format!("server config: {e}"))?;
        let child = Self::spawn_process(&dir)?;
        let mut server = SpawnedServer { child, dir, port };
        server.await_accept()?;
        Ok(server)
    }

    /// Starts nats-server on the config in `dir` (its log appended to `dir/server.log`).
    fn spawn_process(dir: &std::path::Path) -> Result<Child, String> {
        let bin = Self::binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .map_err(|e| e.to_string())?;
        std::process::Command::new(&bin)
            .arg("-c")
            .arg(dir.join("server.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))
    }

    /// Waits (at most 10 s) until the server accepts TCP connections on its port.
    fn await_accept(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("nats-server exited early ({status})"));
            }
            if Instant::now() > deadline {
                return Err("nats-server did not accept within 10 s".to_owned());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server process by its PID: `kill = false` sends SIGTERM (a clean shutdown,
    /// JetStream flushes its store) and waits up to 15 s before a SIGKILL; `kill = true` sends
    /// SIGKILL at once. The store directory and port are kept for [`SpawnedServer::restart`].
    pub(crate) fn stop(&mut self, kill: bool) -> Result<(), String> {
        if kill {
            let _ = self.child.kill();
        } else {
            signal(self.child.id(), "TERM")?;
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.wait();
        Ok(())
    }

    /// Starts the server again on the same config, port and store directory (file storage: the
    /// streams and KV buckets come back with what the stopped server had synced).
    pub(crate) fn restart(&mut self) -> Result<(), String> {
        // The port may linger for a moment after the old process; retry the start briefly.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.child = Self::spawn_process(&self.dir)?;
            match self.await_accept() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub(crate) fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// Sends `SIG<sig>` to the process `pid` with the system `kill` (no `unsafe` here).
pub(crate) fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map_err(|e| format!("kill -{sig} {pid}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{sig} {pid}: {status}"))
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[allow(clippy::print_stderr)]
fn progress(line: &str) {
    eprint!("\r{line}\x1b[K");
}

#[allow(clippy::print_stderr)]
fn progress_done() {
    eprintln!();
}

pub(crate) async fn bench(args: BenchArgs) -> ExitCode {
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            progress_done();
            crate::fail(e)
        }
    }
}

/// What one member task saw.
#[derive(Default)]
pub(crate) struct MemberLog {
    /// First surfacing of each message id.
    pub(crate) first: BTreeMap<String, Instant>,
    /// Second (and later) surfacings.
    pub(crate) duplicates: u64,
    /// Loss events the agent reported.
    pub(crate) lost_events: u64,
    /// The message ids of those loss events.
    pub(crate) lost_ids: BTreeSet<String>,
    /// First surfacings whose copy came through DLV (the live copy did not arrive first).
    pub(crate) via_dlv: u64,
    /// The agent's loss events by reason.
    lost_reasons: BTreeMap<String, u64>,
    /// Live copies a full ledger shed on the durable channel (their DLV copy follows).
    shed: u64,
}

pub(crate) struct Member {
    pub(crate) handle: MachineHandle<Agent>,
    pub(crate) task: tokio::task::JoinHandle<MemberLog>,
    pub(crate) agent: tokio::task::JoinHandle<Agent>,
}

/// The server a run talks to and its URL: one spawned for the run, else `--nats`, else
/// `NATS_URL`, else `nats://127.0.0.1:4222`.
pub(crate) fn target_server(
    spawn: bool,
    nats: Option<&str>,
) -> Result<(Option<SpawnedServer>, String), String> {
    if spawn {
        let server = SpawnedServer::start()?;
        let url = server.url();
        return Ok((Some(server), url));
    }
    let url = match nats {
        Some(u) => u.to_owned(),
        None => std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
    };
    Ok((None, url))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run(args: BenchArgs) -> Result<ExitCode, String> {
    if args.members == 0 || args.messages == 0 || args.senders == 0 {
        return Err("--members, --messages and --senders must be at least 1".to_owned());
    }
    let (server, url) = target_server(args.spawn_server, args.nats.as_deref())?;
    let cfg = ConnectConfig::new([url.clone()]);
    let t = cfg.request_timeout;
    let admin = connect(&cfg).await.map_err(|e| e.to_string())?;
    let tag = format!("{:08x}", os_seed() & 0xffff_ffff);
    let space = Space::new(format!("bench{tag}")).map_err(|e| format!("space: {e}"))?;
    let channel = Channel::new(CHANNEL).map_err(|e| format!("channel: {e}"))?;

    // 1. The raw ceiling on a scratch stream.
    progress("bench: measuring the JetStream publish ceiling");
    let ceiling = measure_ceiling(&admin, &tag).await?;

    // 2. A fresh space, a durable channel, every agent's ACL record and DLV consumer.
    progress(&format!("bench: provisioning space {}", space.as_str()));
    let report = provision_space(&admin.client, &space, t).await;
    if report.failed() > 0 {
        return Err(format!("provisioning failed: {}", report.summary()));
    }
    let ids: Vec<AgentId> = (0..args.members)
        .map(|i| AgentId::new(format!("m{i}")))
        .chain((0..args.senders).map(|i| AgentId::new(format!("sender{i}"))))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("agent id: {e}"))?;
    durable_channel_for(&admin.client, &space, CHANNEL, &ids, t).await?;
    let js = async_nats::jetstream::new(admin.client.clone());

    // 3. The daemon, until it serves.
    let shard = ShardMap::new(1)
        .and_then(|m| m.shard(0))
        .map_err(|e| format!("shard: {e}"))?;
    let daemon_conn = connect(&cfg).await.map_err(|e| e.to_string())?;
    let (exec, inputs) = Executor::start(daemon_conn, ExecutorConfig::default());
    let Runner {
        handle: daemon,
        events: mut daemon_events,
        task: daemon_task,
    } = Runner::spawn(
        Delivery::new(DeliveryConfig::new(space.clone(), shard, "bench-daemon")),
        exec,
        inputs,
    );
    let deadline = Instant::now() + SETUP_WAIT;
    loop {
        let (health, _, serving) = daemon.status().await.map_err(|e| e.to_string())?;
        while daemon_events.try_recv().is_ok() {}
        if serving {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "daemon not serving within {SETUP_WAIT:?}: {health}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The daemon's events are not needed: drain them so the channel does not grow.
    // Tallied by kind for the report (where copies went when they did not arrive).
    let daemon_tally: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let evicted_ranges: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    {
        let tally = Arc::clone(&daemon_tally);
        let evicted = Arc::clone(&evicted_ranges);
        tokio::spawn(async move {
            while let Some(e) = daemon_events.recv().await {
                if let DeliveryEvent::EvictedBeforeFanout { first, last, .. } = e
                    && let Ok(mut v) = evicted.lock()
                {
                    v.push((first, last));
                }
                let text = format!("{e:?}");
                let kind: String = text
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if let Ok(mut t) = tally.lock() {
                    *t.entry(kind).or_default() += 1;
                }
            }
        });
    }

    // 4. The members, each on its own connection, and their tasks.
    let surfaced = Arc::new(AtomicUsize::new(0));
    let joined = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut members = Vec::with_capacity(args.members);
    for (i, id) in ids.iter().take(args.members).enumerate() {
        progress(&format!(
            "bench: starting member {}/{}",
            i + 1,
            args.members
        ));
        let mut config = AgentConfig::new(
            space.clone(),
            Sender::new(id.clone(), id.as_str()),
            vec![channel.clone()],
            os_seed() ^ (i as u64),
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
    let deadline = Instant::now() + SETUP_WAIT;
    while joined.load(Ordering::Relaxed) < args.members {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} members joined within {SETUP_WAIT:?}",
                joined.load(Ordering::Relaxed),
                args.members
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every membership activated (catch-up finished), so the run measures steady state.
    let members_kv = js
        .get_key_value(KvBucket::Members.name(&space))
        .await
        .map_err(|e| format!("members bucket: {e}"))?;
    let concrete = channel
        .to_concrete()
        .ok_or_else(|| "the bench channel is not concrete".to_owned())?;
    for (i, id) in ids.iter().take(args.members).enumerate() {
        progress(&format!(
            "bench: waiting for activation {}/{}",
            i + 1,
            args.members
        ));
        let key = member_key(&concrete, id);
        loop {
            let activated = members_kv
                .get(&key)
                .await
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_slice::<MembershipRecord>(&v).ok())
                .is_some_and(|r| r.activated == Some(true));
            if activated {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "membership {key} not activated within {SETUP_WAIT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // 5. The senders (not members) publish N messages round robin, as fast as their loops take
    //    them.
    let send_failures = Arc::new(AtomicUsize::new(0));
    let sent_seqs: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut senders = Vec::with_capacity(args.senders);
    for (i, id) in ids[args.members..].iter().enumerate() {
        let mut sender_config = AgentConfig::new(
            space.clone(),
            Sender::new(id.clone(), id.as_str()),
            Vec::new(),
            os_seed() ^ (0x5e4d << 16) ^ (i as u64),
        );
        sender_config.durable_backstop = false;
        let sender_conn = connect_as(&cfg, &sender_config).await?;
        let (exec, inputs) = Executor::start(sender_conn, ExecutorConfig::default());
        let Runner {
            handle,
            events: mut sender_events,
            task,
        } = Runner::spawn(
            Agent::new(sender_config).map_err(|e| format!("{e:?}"))?,
            exec,
            inputs,
        );
        loop {
            match tokio::time::timeout(SETUP_WAIT, sender_events.recv()).await {
                Ok(Some(AgentEvent::Connected { .. })) => break,
                Ok(Some(_)) => {}
                _ => return Err(format!("sender {} did not connect", id.as_str())),
            }
        }
        let (failures, seqs) = (Arc::clone(&send_failures), Arc::clone(&sent_seqs));
        tokio::spawn(async move {
            while let Some(e) = sender_events.recv().await {
                match e {
                    AgentEvent::Sent { id, seq, .. } => {
                        if let Ok(mut m) = seqs.lock() {
                            m.insert(id, seq);
                        }
                    }
                    AgentEvent::SendFailed { .. } => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
        senders.push((handle, task));
    }
    let total = args.members * args.messages;
    let mut published: BTreeMap<String, Instant> = BTreeMap::new();
    let start = Instant::now();
    for i in 0..args.messages {
        let at = Instant::now();
        let (_, id) = senders[i % senders.len()]
            .0
            .send_text(channel.clone(), format!("bench message {i}"))
            .await
            .map_err(|e| format!("send {i}: {e}"))?;
        published.insert(id, at);
        if i % 100 == 0 {
            progress(&format!(
                "bench: published {i}/{}, surfaced {}/{total} copies",
                args.messages,
                surfaced.load(Ordering::Relaxed)
            ));
        }
    }
    let publish_done = start.elapsed();
    let timeout = Duration::from_secs(args.timeout_s);
    while surfaced.load(Ordering::Relaxed) < total && start.elapsed() < timeout {
        progress(&format!(
            "bench: published {}/{}, surfaced {}/{total} copies, {:.1} s",
            args.messages,
            args.messages,
            surfaced.load(Ordering::Relaxed),
            start.elapsed().as_secs_f64()
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The durable side: every copy written to a dinbox and handed off to DLV (the surfacing
    // above is usually the live copy; the durable copy must land too).
    let mut durable_done: Option<Duration> = None;
    let mut daemon_polls = 0u32;
    let mut progress_at = (0u64, Instant::now());
    let stall = Duration::from_secs(args.stall_s);
    while start.elapsed() < timeout {
        let (_, c, _) = daemon.status().await.map_err(|e| e.to_string())?;
        // Copies of messages CHAT evicted before fan-out saw them can never be transferred.
        let unreachable = c.evicted_before_fanout + c.gaps_unverified;
        if c.transferred + unreachable * args.members as u64 >= total as u64 {
            durable_done = Some(start.elapsed());
            break;
        }
        if c.transferred != progress_at.0 {
            progress_at = (c.transferred, Instant::now());
        } else if progress_at.1.elapsed() > stall {
            progress_done();
            progress(&format!(
                "bench: the daemon made no progress for {stall:?} ({}/{total} transferred): giving up",
                c.transferred
            ));
            break;
        }
        daemon_polls += 1;
        if daemon_polls.is_multiple_of(10) {
            progress(&format!(
                "bench: daemon wrote {}/{total} dinbox copies, transferred {}/{total}, {:.1} s",
                c.copies_written,
                c.transferred,
                start.elapsed().as_secs_f64()
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Where the fan-out consumer stands (for a stall: pending, unacked, redelivered).
    let fanout = ConsumerSpec::fanout(&space, 0, 1);
    let fanout_info =
        cotal_driver_tokio::api::request(&admin.client, &fanout.info_subject(), Bytes::new(), t)
            .await
            .map(|v| {
                json!({
                    "num_pending": v["num_pending"],
                    "num_ack_pending": v["num_ack_pending"],
                    "num_redelivered": v["num_redelivered"],
                    "num_waiting": v["num_waiting"],
                    "delivered_stream_seq": v["delivered"]["stream_seq"],
                    "ack_floor_stream_seq": v["ack_floor"]["stream_seq"],
                })
            })
            .unwrap_or_else(|e| json!({"error": e.to_string()}));
    // A short grace to see duplicates that would follow the last copy.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop_tx.send(true);
    progress_done();

    // 6. Figures.
    let mut logs = Vec::with_capacity(members.len());
    for m in members {
        let log = m.task.await.map_err(|e| format!("member task: {e}"))?;
        let _ = m.handle.stop(Duration::from_secs(2));
        let _ = tokio::time::timeout(Duration::from_secs(5), m.agent).await;
        logs.push(log);
    }
    for (sender, task) in senders {
        let _ = sender.stop(Duration::from_secs(2));
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let _ = daemon.shutdown(Duration::from_secs(2));
    let daemon_machine = tokio::time::timeout(Duration::from_secs(5), daemon_task)
        .await
        .ok()
        .and_then(Result::ok);

    let mut all = Vec::with_capacity(total);
    let mut first = Vec::with_capacity(args.messages);
    let mut lost = 0u64;
    let mut lost_reported = 0u64;
    let evicted: Vec<(u64, u64)> = evicted_ranges.lock().map(|v| v.clone()).unwrap_or_default();
    let seqs: BTreeMap<String, u64> = sent_seqs.lock().map(|m| m.clone()).unwrap_or_default();
    let reported = |id: &str| {
        seqs.get(id)
            .is_some_and(|s| evicted.iter().any(|&(f, l)| (f..=l).contains(s)))
    };
    let mut duplicates = 0u64;
    let mut last = start;
    let mut lost_events = 0u64;
    let mut shed = 0u64;
    for log in &logs {
        duplicates += log.duplicates;
        lost_events += log.lost_events;
        shed += log.shed;
    }
    for (id, at) in &published {
        let mut earliest: Option<Instant> = None;
        for log in &logs {
            match log.first.get(id) {
                Some(s) => {
                    all.push(s.saturating_duration_since(*at).as_secs_f64() * 1e3);
                    earliest = Some(earliest.map_or(*s, |e| e.min(*s)));
                    last = last.max(*s);
                }
                None if reported(id) => lost_reported += 1,
                None => lost += 1,
            }
        }
        if let Some(e) = earliest {
            first.push(e.saturating_duration_since(*at).as_secs_f64() * 1e3);
        }
    }
    all.sort_by(f64::total_cmp);
    first.sort_by(f64::total_cmp);
    let surfaced_elapsed = last
        .saturating_duration_since(start)
        .as_secs_f64()
        .max(1e-9);
    let copies = all.len();
    let surfaced_per_s = copies as f64 / surfaced_elapsed;
    // Durable copies/s: every copy surfaced AND handed off to DLV by the daemon; 0 when the
    // daemon did not hand off every copy within the timeout.
    let elapsed = durable_done
        .map_or(f64::INFINITY, |d| d.as_secs_f64())
        .max(surfaced_elapsed);
    let copies_per_s = if durable_done.is_some() {
        copies as f64 / elapsed
    } else {
        0.0
    };
    let messages_per_s = if lost + lost_reported == 0 && durable_done.is_some() {
        args.messages as f64 / elapsed
    } else {
        0.0
    };
    let via_dlv: u64 = logs.iter().map(|l| l.via_dlv).sum();
    let ratio = copies_per_s / (ceiling / 2.0);
    let counters = daemon_machine.as_ref().map(|d| d.counters().clone());
    let daemon_lost = counters.as_ref().map_or(0, |c| c.lost);

    println!(
        "cotal bench: space {}, {} members, {} messages from {} senders, server {url}",
        space.as_str(),
        args.members,
        args.messages,
        args.senders
    );
    println!("  ceiling (pipelined JetStream publishes) {ceiling:>12.0} /s");
    println!("  durable copies surfaced                {copies:>12} of {total}");
    println!("  copies surfaced/s (first surfacing)    {surfaced_per_s:>12.0} /s");
    println!("  surfaced through DLV (not live)        {via_dlv:>12}");
    println!("  durable copies/s                       {copies_per_s:>12.0} /s");
    println!("  messages/s (every member)              {messages_per_s:>12.1} /s");
    println!("  copies/s / (ceiling / 2)               {ratio:>12.3}");
    println!(
        "  publishing took                        {:>12.3} s",
        publish_done.as_secs_f64()
    );
    println!("  end to end took                        {elapsed:>12.3} s");
    println!(
        "  latency all copies   p50 / p99 / max   {:>8.2} / {:.2} / {:.2} ms",
        percentile(&all, 50.0),
        percentile(&all, 99.0),
        all.last().copied().unwrap_or(0.0)
    );
    println!(
        "  latency first member p50 / p99 / max   {:>8.2} / {:.2} / {:.2} ms",
        percentile(&first, 50.0),
        percentile(&first, 99.0),
        first.last().copied().unwrap_or(0.0)
    );
    println!(
        "  lost unreported {lost}, lost reported {lost_reported}, duplicates {duplicates}, send failures {}",
        send_failures.load(Ordering::Relaxed)
    );
    println!(
        "  agent loss events {lost_events}, live copies shed {shed}, daemon lost {daemon_lost}, evicted before fan-out {}",
        counters
            .as_ref()
            .map_or(0, |c| c.evicted_before_fanout + c.gaps_unverified)
    );
    let mut agent_losses: BTreeMap<String, u64> = BTreeMap::new();
    for log in &logs {
        for (r, n) in &log.lost_reasons {
            *agent_losses.entry(r.clone()).or_default() += n;
        }
    }
    let daemon_events: BTreeMap<String, u64> =
        daemon_tally.lock().map(|t| t.clone()).unwrap_or_default();
    println!("  agent loss events by reason            {agent_losses:?}");
    println!("  daemon events by kind                  {daemon_events:?}");
    if let Some(c) = &counters {
        println!("  daemon counters                        {c:?}");
    }
    println!("  fan-out consumer at the end            {fanout_info}");
    if args.json {
        let line = json!({
            "members": args.members,
            "messages": args.messages,
            "senders": args.senders,
            "ceiling_publish_per_s": ceiling.round(),
            "durable_copies_per_s": copies_per_s.round(),
            "messages_per_s": (messages_per_s * 10.0).round() / 10.0,
            "ratio_to_half_ceiling": (ratio * 1000.0).round() / 1000.0,
            "p50_ms": percentile(&all, 50.0),
            "p99_ms": percentile(&all, 99.0),
            "max_ms": all.last().copied().unwrap_or(0.0),
            "first_p50_ms": percentile(&first, 50.0),
            "first_p99_ms": percentile(&first, 99.0),
            "first_max_ms": first.last().copied().unwrap_or(0.0),
            "elapsed_s": elapsed,
            "surfaced_elapsed_s": surfaced_elapsed,
            "surfaced_copies_per_s": surfaced_per_s.round(),
            "surfaced_via_dlv": via_dlv,
            "durable_complete": durable_done.is_some(),
            "daemon_transferred": counters.as_ref().map(|c| c.transferred),
            "publish_s": publish_done.as_secs_f64(),
            "lost": lost + lost_reported,
            "lost_unreported": lost,
            "lost_reported": lost_reported,
            "evicted_before_fanout": counters.as_ref().map(|c| c.evicted_before_fanout + c.gaps_unverified),
            "live_copies_shed": shed,
            "duplicates": duplicates,
            "send_failures": send_failures.load(Ordering::Relaxed),
            "daemon_copies_written": counters.as_ref().map(|c| c.copies_written),
            "daemon_lost": daemon_lost,
            "agent_losses": agent_losses,
            "fanout_consumer": fanout_info,
            "daemon_events": daemon_events,
        });
        println!("{line}");
    }
    drop(server);
    if lost + lost_reported == 0 && duplicates == 0 && durable_done.is_some() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}

/// Connects as the agent of `config` (inbox prefix `_INBOX_<id>`).
async fn connect_as(cfg: &ConnectConfig, config: &AgentConfig) -> Result<NatsConnection, String> {
    let mut cfg = cfg.clone();
    cfg.inbox_prefix = Some(config.me.id.inbox_prefix());
    cfg.name = Some(format!("cotal-bench-{}", config.me.id.as_str()));
    connect(&cfg).await.map_err(|e| e.to_string())
}

/// Starts one member and the task that surfaces its messages until `stop`.
pub(crate) async fn start_member(
    cfg: &ConnectConfig,
    config: AgentConfig,
    surfaced: Arc<AtomicUsize>,
    joined: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
) -> Result<Member, String> {
    let conn = connect_as(cfg, &config).await?;
    let machine = Agent::new(config).map_err(|e| format!("agent config: {e:?}"))?;
    let (exec, inputs) = Executor::start(conn, ExecutorConfig::default());
    let Runner {
        handle,
        mut events,
        task: agent,
    } = Runner::spawn(machine, exec, inputs);
    let h = handle.clone();
    let task = tokio::spawn(async move {
        let mut log = MemberLog::default();
        // Counted in `joined` once, at its first established backstop: a join whose durableJoin
        // failed (no daemon answering yet) reports `durable: false`, and the reconcile that
        // establishes it later says so only with `BackstopEstablished`.
        let mut established = false;
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                event = events.recv() => match event {
                    Some(AgentEvent::MessagesReady { .. }) => loop {
                        let Ok(batch) = h.take_messages(1024).await else { break };
                        if batch.is_empty() {
                            break;
                        }
                        let now = Instant::now();
                        let mut done = Vec::with_capacity(batch.len());
                        for s in batch {
                            let id = s.item.message.id.clone();
                            match log.first.entry(id) {
                                Entry::Occupied(_) => log.duplicates += 1,
                                Entry::Vacant(v) => {
                                    v.insert(now);
                                    if s.origin == SourceKind::Durable {
                                        log.via_dlv += 1;
                                    }
                                    surfaced.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            done.push(s.id);
                        }
                        // One trip into the machine for the whole batch.
                        let _ = h.cast(move |a, now| {
                            for mid in &done {
                                let _ = a.handled(now, mid);
                            }
                        });
                    },
                    Some(AgentEvent::Joined { report, .. }) if report.durable && !established => {
                        established = true;
                        joined.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(AgentEvent::BackstopEstablished { .. }) if !established => {
                        established = true;
                        joined.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(AgentEvent::LiveCopyShed { .. }) => log.shed += 1,
                    Some(AgentEvent::Lost { id, reason }) => {
                        log.lost_events += 1;
                        log.lost_ids.insert(id);
                        *log.lost_reasons.entry(reason).or_default() += 1;
                    }
                    Some(_) => {}
                    None => break,
                },
            }
        }
        log
    });
    Ok(Member {
        handle,
        task,
        agent,
    })
}

/// Pipelined publishes per second on a scratch file stream (deleted afterwards).
async fn measure_ceiling(admin: &NatsConnection, tag: &str) -> Result<f64, String> {
    use async_nats::jetstream::stream::{Config, StorageType};
    let js = async_nats::jetstream::new(admin.client.clone());
    let name = format!("BENCHCEIL_{tag}");
    let subject = format!("benchceil.{tag}");
    js.create_stream(Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("scratch stream: {e}"))?;
    // About the size of a small CotalMessage as JSON.
    let payload = Bytes::from(vec![b'x'; 400]);
    let mut inflight = VecDeque::with_capacity(CEILING_WINDOW);
    let start = Instant::now();
    for _ in 0..CEILING_PUBLISHES {
        let ack = js
            .publish(subject.clone(), payload.clone())
            .await
            .map_err(|e| format!("ceiling publish: {e}"))?;
        inflight.push_back(ack);
        if inflight.len() >= CEILING_WINDOW
            && let Some(a) = inflight.pop_front()
        {
            a.await.map_err(|e| format!("ceiling ack: {e}"))?;
        }
    }
    while let Some(a) = inflight.pop_front() {
        a.await.map_err(|e| format!("ceiling ack: {e}"))?;
    }
    let rate = CEILING_PUBLISHES as f64 / start.elapsed().as_secs_f64().max(1e-9);
    let _ = js.delete_stream(&name).await;
    Ok(rate)
}

/// Makes `channel` durable (no replay) in `space` and gives every agent of `ids` a read-all ACL
/// record and its `dlv_<id>` consumer: the setup `cotal bench` and `cotal chaos` share.
pub(crate) async fn durable_channel_for(
    client: &async_nats::Client,
    space: &Space,
    channel: &str,
    ids: &[AgentId],
    t: Duration,
) -> Result<(), String> {
    let js = async_nats::jetstream::new(client.clone());
    js.get_key_value(KvBucket::Channels.name(space))
        .await
        .map_err(|e| format!("channels bucket: {e}"))?
        .put(
            channel,
            Bytes::from(json!({"deliveryClass": "durable", "replay": false}).to_string()),
        )
        .await
        .map_err(|e| format!("channel entry: {e}"))?;
    let acl = js
        .get_key_value(KvBucket::Acl.name(space))
        .await
        .map_err(|e| format!("acl bucket: {e}"))?;
    let record = AclRecord {
        allow_subscribe: vec![">".to_owned()],
        revision: 1,
        updated_at: wall_clock(),
        extra: Default::default(),
    };
    let record = Bytes::from(serde_json::to_vec(&record).map_err(|e| e.to_string())?);
    for id in ids {
        acl.put(acl_key(id), record.clone())
            .await
            .map_err(|e| format!("ACL record of {}: {e}", id.as_str()))?;
        apply_consumer(client, &ConsumerSpec::dlv(space, id), t)
            .await
            .map_err(|e| format!("DLV consumer of {}: {e}", id.as_str()))?;
    }
    Ok(())
}
