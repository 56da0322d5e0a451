//! `cotal bench`: end-to-end durable fan-out throughput and latency against a real nats-server.
//!
//! Everything it runs is in this process (the members in child processes with `--agent-procs`)
//! and visible in the report: a scratch stream for the raw ceiling (pipelined JetStream
//! publishes per second), a fresh space, one delivery daemon,
//! M member agents (each with its own connection, ACL record and DLV consumer, provisioned as
//! `cotal provision agent --apply` does) joined to one durable channel, and one sender agent that
//! publishes N messages on that channel without being a member.
//!
//! A message counts as surfaced for a member when it comes out of `take_messages` (the ledger
//! dedups the live and the DLV copy: the first surfacing counts, a second surfacing of the same
//! id is a duplicate). The run ends when every member surfaced every message, or at the timeout;
//! what is missing then is lost.
//!
//! Then, unless `--no-live`, the **live path**: the same members join a live channel (no
//! backstop, no backfill), the same senders publish N more messages on it, and the same surfacing
//! counts; what did not surface when no copy came for `--stall-s` is a live loss, reported (live
//! is at-most-once) but not a failure of the run.
//!
//! `--agent-procs K` runs the M members in K child processes instead (this binary, `cotal
//! bench-agents`, see [`bench_agents`]), so the bench process holds only the daemons and
//! the senders and the CPU of each side is measured apart. Before the durable phase (unless
//! `--no-ideal`) the run measures the ideal pipeline on a scratch stream: raw JetStream, one
//! write per copy, M filtered pull consumers (module `bench::ideal`).
//!
//! `--shards N` runs N daemons, shard i of N each (own connection, lease, fan-out and reader
//! durables); their counters are summed where the report uses them and also given per shard.
//!
//! `--memory` is a separate mode: a space with many members, channels and membership records
//! (written as the daemon writes them, with pipelined KV puts), `cotal delivery` on it as a child
//! process, and its `VmRSS`/`VmHWM` once its views are loaded, against a daemon on an empty space
//! measured the same way (Linux: `/proc/<pid>/status`).
//!
//! With `--spawn-server` a nats-server (from `COTAL_NATS_SERVER`, else `.venv/bin/nats-server`)
//! is started on a free loopback port with a temporary store and killed (by its PID) at the end.

use crate::connect::{ConnectConfig, NatsConnection, connect};
use crate::exec::{Executor, ExecutorConfig};
use crate::provision::{SpacePlan, apply, apply_consumer, provision_space};
use crate::run::{MachineHandle, Runner, os_key, os_seed, wall_clock};
use bytes::Bytes;
use clap::Args;
use cotal_core::agent::{Agent, AgentConfig, AgentEvent};
use cotal_core::delivery::daemon::{Delivery, DeliveryConfig, DeliveryCounters, DeliveryEvent};
use cotal_core::wire::config::{ConsumerSpec, SpaceStream};
use cotal_core::wire::keys::{KvBucket, acl_key, member_key};
use cotal_core::wire::message::Sender;
use cotal_core::wire::records::{AclRecord, MembershipRecord};
use cotal_core::wire::shard::{Shard, ShardMap};
use cotal_core::wire::token::{AgentId, Channel, ConcreteChannel, Space};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

mod agents;
mod ideal;
mod member;

pub(crate) use member::{
    CHANNEL, LIVE_CHANNEL, Member, MemberLog, SETUP_WAIT, connect_as, cpu_seconds, finish_members,
    join_live_in_proc, member_config, progress, progress_done, progress_of, start_member,
    start_member_pausable, thread_cpu_seconds,
};

pub use agents::{BenchAgentsArgs, bench_agents};

/// Publishes in flight while measuring the ceiling.
const CEILING_WINDOW: usize = 1024;
/// Publishes measured for the ceiling.
const CEILING_PUBLISHES: usize = 20_000;

/// `cotal bench`.
// The field docs are the `--help` text, printed as written (`/proc/<pid>/status` is no HTML tag).
#[allow(rustdoc::invalid_html_tags)]
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// NATS server URL (no authentication: the bench provisions a space and consumers).
    #[arg(long, conflicts_with = "spawn_server")]
    nats: Option<String>,
    /// Start a local nats-server (COTAL_NATS_SERVER, else .venv/bin/nats-server) for the run.
    #[arg(long)]
    spawn_server: bool,
    /// Member agents joined to the durable channel (default 10); with `--memory`, the member
    /// agents provisioned (default 10,000).
    #[arg(long)]
    members: Option<usize>,
    /// Messages published on the channel.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Sender agents the messages are spread over, round robin. CHAT keeps 1000 messages per
    /// sender subject: one sender bursting more than 1000 ahead of fan-out has its oldest
    /// discarded before fan-out reads them (the daemon reports them, `evicted_before_fanout`).
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Messages per second over all senders, in both phases; 0 (the default) publishes as fast
    /// as the senders can. A paced run measures latency without the queueing of a burst.
    #[arg(long, default_value_t = 0)]
    rate: u32,
    /// Seconds to wait for every copy to surface before counting the rest as lost.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Seconds without any DLV hand-off by the daemon after which the durable wait gives up.
    #[arg(long, default_value_t = 10)]
    stall_s: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Skip the live-path phase (members join a live channel after the durable phase and the
    /// senders publish `--messages` more on it).
    #[arg(long)]
    no_live: bool,
    /// Run the daemons with every durable copy through the dinbox and the reader (the reference's
    /// two hops, `cotal delivery --two-hop`) instead of one DLV write per copy: the A/B of issue 17.
    #[arg(long)]
    two_hop: bool,
    /// Delivery daemons run in this process, shard i of N each (one lease per shard, as
    /// `cotal delivery --shard i --shards N` runs them).
    #[arg(long, default_value_t = 1)]
    shards: u32,
    /// Run the member agents in K child processes (this binary re-executed as the hidden
    /// `cotal bench-agents`), the members split over them in contiguous shares; 0 (the default)
    /// runs them in this process. The daemons and senders stay here, so the CPU of the bench
    /// process, the agents and the server is measured apart.
    #[arg(long, default_value_t = 0)]
    agent_procs: usize,
    /// Skip the ideal-pipeline measurement (raw JetStream: one write per copy to M per-member
    /// subjects, M filtered pull consumers) before the durable phase.
    #[arg(long)]
    no_ideal: bool,
    /// Memory mode (Linux only: reads /proc/<pid>/status), instead of the throughput run:
    /// provision a space with `--members` agents (default 10,000), `--channels` durable channels
    /// and their membership records, start `cotal delivery` on it as a child process, and report
    /// its resident memory once its views are loaded, against a daemon on an empty space.
    #[arg(long)]
    memory: bool,
    /// With `--memory`: durable channels provisioned.
    #[arg(long, default_value_t = 1000)]
    channels: usize,
    /// With `--memory`: memberships each member holds (member i is in channels i·K … i·K+K−1,
    /// modulo `--channels`, so every channel has members when members·K ≥ channels).
    #[arg(long, default_value_t = 1)]
    memberships_per_member: usize,
}

/// A nats-server started for the run, killed by its PID on drop.
pub struct SpawnedServer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

/// Waits until message `i` of a run started at `start` is due at `rate` messages per second
/// (no wait when `rate` is 0).
async fn pace(start: Instant, i: usize, rate: u32) {
    if rate > 0 {
        let due = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
        tokio::time::sleep_until(due.into()).await;
    }
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

    /// Starts a server (JetStream on, its store in a fresh temporary directory) on a free
    /// loopback port, from `COTAL_NATS_SERVER`, else `.venv/bin/nats-server`.
    pub fn start() -> Result<Self, String> {
        Self::start_with("")
    }

    /// [`SpawnedServer::start`] with `extra` appended to the server config.
    pub fn start_with(extra: &str) -> Result<Self, String> {
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
        Self::start_node_on("127.0.0.1", port, name, js_extra, extra)
    }

    /// [`SpawnedServer::start_node`] listening on `host` (`0.0.0.0`: every interface, for
    /// clients in another network namespace; the harness itself still connects on loopback).
    pub(crate) fn start_node_on(
        host: &str,
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
            "listen: \"{host}:{port}\"\nserver_name: {name}\njetstream {{ store_dir: {:?}, max_memory_store: 256MB, max_file_store: 4GB{js_extra} }}\nmax_payload: 8MB\n{extra}",
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

    /// The client port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
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

/// Runs `cotal bench`: the report on stdout (with `--json`, one JSON object as the last line),
/// progress on stderr; a setup or run error is one `cotal: error:` line and exit code 1.
pub async fn bench(args: BenchArgs) -> ExitCode {
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            progress_done();
            super::fail(e)
        }
    }
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
    if args.memory {
        return run_memory(&args).await;
    }
    let n_members = args.members.unwrap_or(10);
    if n_members == 0 || args.messages == 0 || args.senders == 0 || args.shards == 0 {
        return Err("--members, --messages, --senders and --shards must be at least 1".to_owned());
    }
    let daemons_n = args.shards as usize;
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
    // 1b. The ideal pipeline: M×N raw copies on a scratch stream, consumed by M pull consumers.
    let ideal = if args.no_ideal {
        None
    } else {
        progress("bench: measuring the ideal pipeline (raw JetStream, one write per copy)");
        Some(
            ideal::measure_ideal(
                &cfg,
                &admin,
                &tag,
                n_members,
                args.messages,
                Duration::from_secs(args.timeout_s),
            )
            .await?,
        )
    };

    // 2. A fresh space, a durable channel, every agent's ACL record and DLV consumer.
    // Its consumer caps sized for the run's agents, as `cotal up --max-agents` does (issue 22).
    progress(&format!("bench: provisioning space {}", space.as_str()));
    let agents = u32::try_from(n_members + args.senders).unwrap_or(u32::MAX);
    let report = apply(&admin.client, &SpacePlan::for_agents(&space, agents), t).await;
    if report.failed() > 0 {
        return Err(format!("provisioning failed: {}", report.summary()));
    }
    let ids: Vec<AgentId> = (0..n_members)
        .map(|i| AgentId::new(format!("m{i}")))
        .chain((0..args.senders).map(|i| AgentId::new(format!("sender{i}"))))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("agent id: {e}"))?;
    durable_channel_for(&admin.client, &space, CHANNEL, &ids, t).await?;
    if !args.no_live {
        live_channel_for(&admin.client, &space, LIVE_CHANNEL).await?;
    }
    // How the members split over the shards (the daemons route only to their own owners).
    let map = ShardMap::new(args.shards).map_err(|e| format!("shards: {e}"))?;
    let mut shard_owners = vec![0usize; daemons_n];
    for id in ids.iter().take(n_members) {
        shard_owners[map.shard_of(id).index() as usize] += 1;
    }
    let js = async_nats::jetstream::new(admin.client.clone());

    // 3. The daemons (shard i of N each), until every one serves. Their events are tallied by
    //    kind for the report (where copies went when they did not arrive).
    let daemon_tally: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let evicted_ranges: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    // They run on a runtime of their own (threads named `DAEMON_THREADS`), so their CPU is
    // measured apart from the senders' and the bench's.
    let daemon_rt = DaemonRuntime::start()?;
    let daemons = daemon_rt
        .spawn(start_daemons(
            cfg.clone(),
            space.clone(),
            args.shards,
            args.two_hop,
            Arc::clone(&daemon_tally),
            Arc::clone(&evicted_ranges),
        ))
        .await
        .map_err(|e| format!("daemon start task: {e}"))??;

    // 4. The members, each on its own connection, and their tasks: in this process, or in
    //    `--agent-procs` child processes that report their surfacings back.
    let surfaced = Arc::new(AtomicUsize::new(0));
    let joined = Arc::new(AtomicUsize::new(0));
    let agent_procs = args.agent_procs.min(n_members);
    let agents = if agent_procs == 0 {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut members = Vec::with_capacity(n_members);
        for (i, id) in ids.iter().take(n_members).enumerate() {
            progress(&format!("bench: starting member {}/{}", i + 1, n_members));
            members.push(
                start_member(
                    &cfg,
                    member_config(&space, &channel, id, i),
                    Arc::clone(&surfaced),
                    Arc::clone(&joined),
                    stop_rx.clone(),
                )
                .await?,
            );
        }
        MemberAgents::InProc {
            members,
            stop: stop_tx,
        }
    } else {
        progress(&format!(
            "bench: starting {n_members} members in {agent_procs} agent processes"
        ));
        MemberAgents::Procs(agents::AgentProcs::spawn(
            &url,
            &space,
            &ids[..n_members],
            agent_procs,
            &surfaced,
            &joined,
        )?)
    };
    // Setup gives up when it stalls (no member joined for SETUP_WAIT), not after a fixed time:
    // thousands of members take minutes to connect and join on this machine.
    let mut deadline = Instant::now() + SETUP_WAIT;
    let mut seen = 0;
    while joined.load(Ordering::Relaxed) < n_members {
        agents.check()?;
        let now_joined = joined.load(Ordering::Relaxed);
        if now_joined > seen {
            seen = now_joined;
            deadline = Instant::now() + SETUP_WAIT;
            progress(&format!("bench: {seen}/{n_members} members joined"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {now_joined} of {n_members} members joined, none in the last {SETUP_WAIT:?}"
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
    for (i, id) in ids.iter().take(n_members).enumerate() {
        progress(&format!(
            "bench: waiting for activation {}/{}",
            i + 1,
            n_members
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
                deadline = Instant::now() + SETUP_WAIT;
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
    for (i, id) in ids[n_members..].iter().enumerate() {
        let mut sender_config = AgentConfig::new(
            space.clone(),
            Sender::new(id.clone(), id.as_str()),
            Vec::new(),
            os_seed() ^ (0x5e4d << 16) ^ (i as u64),
        );
        sender_config.id_key = Some(os_key());
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
    let total = n_members * args.messages;
    let mut published: BTreeMap<String, Instant> = BTreeMap::new();
    // CPU used during the durable phase, by the server (when this run spawned it), by this
    // process (daemons and senders, and the members unless they run in agent processes) and by
    // the agent processes together: where the time goes, per copy.
    let server_pid = server.as_ref().map(SpawnedServer::pid);
    let cpu_at_start = (
        cpu_seconds(server_pid),
        cpu_seconds(None),
        agents.cpu_seconds(),
        thread_cpu_seconds(DAEMON_THREADS),
    );
    let start = Instant::now();
    for i in 0..args.messages {
        pace(start, i, args.rate).await;
        let at = Instant::now();
        let (_, id) = senders[i % senders.len()]
            .0
            .send_text(channel.clone(), format!("bench message {i}"))
            .await
            .map_err(|e| format!("send {i}: {e}"))?;
        published.insert(id, at);
        if i % 100 == 0 {
            let n = surfaced.load(Ordering::Relaxed);
            progress_of(
                n as u64,
                total as u64,
                "copies",
                &format!(
                    "bench: published {i}/{}, surfaced {n}/{total} copies",
                    args.messages
                ),
            );
        }
    }
    let publish_done = start.elapsed();
    let timeout = Duration::from_secs(args.timeout_s);
    while surfaced.load(Ordering::Relaxed) < total && start.elapsed() < timeout {
        agents.check()?;
        let n = surfaced.load(Ordering::Relaxed);
        progress_of(
            n as u64,
            total as u64,
            "copies",
            &format!(
                "bench: published {}/{}, surfaced {n}/{total} copies, {:.1} s",
                args.messages,
                args.messages,
                start.elapsed().as_secs_f64()
            ),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The durable side: every copy written to a dinbox and handed off to DLV (the surfacing
    // above is usually the live copy; the durable copy must land too).
    let mut durable_done: Option<Duration> = None;
    let mut daemon_polls = 0u32;
    let mut progress_at = (0u64, Instant::now());
    let stall = Duration::from_secs(args.stall_s);
    while start.elapsed() < timeout {
        agents.check()?;
        let c = status_sum(&daemons).await?;
        // Copies of messages CHAT evicted before fan-out saw them can never be transferred.
        let unreachable = c.evicted_before_fanout + c.gaps_unverified;
        if c.transferred + unreachable * n_members as u64 >= total as u64 {
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
            progress_of(
                c.transferred,
                total as u64,
                "copies",
                &format!(
                    "bench: daemon wrote {}/{total} dinbox copies, transferred {}/{total}, {:.1} s",
                    c.copies_written,
                    c.transferred,
                    start.elapsed().as_secs_f64()
                ),
            );
        }
        // Each poll is a status request the daemons answer on their own threads: often enough
        // to time the end within 5 ms, seldom enough to cost them little.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Where each shard's fan-out consumer stands (for a stall: pending, unacked, redelivered).
    let mut fanout_infos = Vec::with_capacity(daemons.len());
    for d in &daemons {
        let fanout = ConsumerSpec::fanout(&space, d.shard.index(), d.shard.shards());
        fanout_infos.push(
            crate::api::request(&admin.client, &fanout.info_subject(), Bytes::new(), t)
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
                .unwrap_or_else(|e| json!({"error": e.to_string()})),
        );
    }
    let fanout_info = fanout_infos.first().cloned().unwrap_or(Value::Null);
    let per_copy_us = |at_start: Option<f64>, now: Option<f64>| {
        at_start
            .zip(now)
            .filter(|_| durable_done.is_some())
            .map(|(a, b)| ((b - a) * 1e6 / total.max(1) as f64).round())
    };
    let server_cpu_us_per_copy = per_copy_us(cpu_at_start.0, cpu_seconds(server_pid));
    let process_cpu_us_per_copy = per_copy_us(cpu_at_start.1, cpu_seconds(None));
    let agents_cpu_us_per_copy = per_copy_us(cpu_at_start.2, agents.cpu_seconds());
    // The daemons' own threads: not the senders, the bench's bookkeeping or in-process members.
    let daemon_cpu_us_per_copy = per_copy_us(cpu_at_start.3, thread_cpu_seconds(DAEMON_THREADS));
    // Resident memory at the end of the durable phase: the server (when this run started it)
    // and this process (the daemons and senders, plus the members without `--agent-procs`);
    // the consumers on DLV and the connections the run holds.
    let server_mem = server_pid.and_then(|pid| proc_memory(pid).ok());
    let process_mem = proc_memory(std::process::id()).ok();
    let dlv_consumers = consumer_count(&admin.client, &SpaceStream::Dlv.name(&space))
        .await
        .ok();
    // One per member, sender and daemon, and the admin connection.
    let connections = n_members + args.senders + daemons_n + 1;
    // A short grace to see duplicates that would follow the last copy.
    tokio::time::sleep(Duration::from_millis(300)).await;
    progress_done();

    // 6. The live path: the same members join a live channel, the same senders publish N more.
    let live_run = if args.no_live {
        None
    } else {
        Some(
            live_phase(
                &agents,
                n_members,
                &senders,
                &surfaced,
                args.messages,
                args.rate,
                timeout,
                stall,
            )
            .await?,
        )
    };
    progress_done();

    // 7. Figures.
    let logs = agents.finish().await?;
    for (sender, task) in senders {
        let _ = sender.stop(Duration::from_secs(2));
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    // Every shard's counters, in shard order; `counters` is their sum when every daemon
    // stopped within the grace.
    let mut shard_counters = Vec::with_capacity(daemons.len());
    for d in daemons {
        let _ = d.handle.shutdown(Duration::from_secs(2));
        let machine = tokio::time::timeout(Duration::from_secs(5), d.task)
            .await
            .ok()
            .and_then(Result::ok);
        shard_counters.push(machine.map(|m| m.counters().clone()));
    }

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
    let is_live = |id: &str| {
        live_run
            .as_ref()
            .is_some_and(|r| r.published.contains_key(id))
    };
    let mut duplicates = 0u64;
    let mut last = start;
    let mut lost_events = 0u64;
    let mut shed = 0u64;
    for log in &logs {
        duplicates += log.duplicates;
        lost_events += log.lost_events;
        lost_events -= log.lost_log.iter().filter(|(id, _)| is_live(id)).count() as u64;
        shed += log.shed;
    }
    // The live phase's figures; its duplicates are not the durable phase's.
    let live = live_run.as_ref().map(|r| live_figures(&logs, r));
    duplicates -= live.as_ref().map_or(0, |l| l.duplicates);
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
    let ratio_to_ideal = ideal.map(|i| copies_per_s / i.max(1e-9));
    let counters: Option<DeliveryCounters> = shard_counters
        .iter()
        .map(Option::as_ref)
        .collect::<Option<Vec<_>>>()
        .map(|all| sum_counters(all.into_iter()));
    let daemon_lost = counters.as_ref().map_or(0, |c| c.lost);

    println!(
        "cotal bench: space {}, {} members, {} messages from {} senders, server {url}",
        space.as_str(),
        n_members,
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
    if let (Some(i), Some(r)) = (ideal, ratio_to_ideal) {
        println!("  ideal pipeline copies/s (raw JetStream) {i:>11.0} /s");
        println!("  durable copies/s / ideal               {r:>12.3}");
    }
    let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |x| format!("{x:.0}"));
    println!(
        "  CPU µs/copy server / bench process (its daemon threads) / agent processes  {} / {} ({}) / {}",
        us(server_cpu_us_per_copy),
        us(process_cpu_us_per_copy),
        us(daemon_cpu_us_per_copy),
        us(agents_cpu_us_per_copy)
    );
    let kib = |m: Option<(u64, u64)>| {
        m.map_or_else(
            || "-".to_owned(),
            |(rss, hwm)| format!("{rss} KiB (peak {hwm})"),
        )
    };
    println!(
        "  RSS server / bench process             {} / {}",
        kib(server_mem),
        kib(process_mem)
    );
    println!(
        "  connections / DLV consumers            {connections:>12} / {}",
        dlv_consumers.map_or_else(|| "-".to_owned(), |n| n.to_string())
    );
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
    // The agents' loss events by reason, the durable phase's and the live phase's apart.
    let mut agent_losses: BTreeMap<String, u64> = BTreeMap::new();
    let mut live_agent_losses: BTreeMap<String, u64> = BTreeMap::new();
    for log in &logs {
        for (id, r) in &log.lost_log {
            let tally = if is_live(id) {
                &mut live_agent_losses
            } else {
                &mut agent_losses
            };
            *tally.entry(r.clone()).or_default() += 1;
        }
    }
    let daemon_events: BTreeMap<String, u64> =
        daemon_tally.lock().map(|t| t.clone()).unwrap_or_default();
    println!("  agent loss events by reason            {agent_losses:?}");
    println!("  daemon events by kind                  {daemon_events:?}");
    if let Some(c) = &counters {
        println!("  daemon counters                        {c:?}");
    }
    if daemons_n > 1 {
        println!("  shards                                 {daemons_n:>12}");
        for (i, (c, info)) in shard_counters.iter().zip(&fanout_infos).enumerate() {
            println!(
                "  shard {i}: {} owners, {} copies written, {} transferred, {} lost; fan-out {info}",
                shard_owners[i],
                c.as_ref().map_or(0, |c| c.copies_written),
                c.as_ref().map_or(0, |c| c.transferred),
                c.as_ref().map_or(0, |c| c.lost),
            );
        }
    } else {
        println!("  fan-out consumer at the end            {fanout_info}");
    }
    if let Some(l) = &live {
        println!(
            "  live channel: {} messages, {} copies surfaced of {}",
            args.messages,
            l.copies,
            args.messages * n_members
        );
        println!(
            "  live messages/s (every member)         {:>12.1} /s",
            l.messages_per_s
        );
        println!(
            "  live copies/s                          {:>12.0} /s",
            l.copies_per_s
        );
        println!(
            "  live latency all copies   p50/p99/max  {:>8.2} / {:.2} / {:.2} ms",
            l.p50, l.p99, l.max
        );
        println!(
            "  live latency first member p50/p99/max  {:>8.2} / {:.2} / {:.2} ms",
            l.first_p50, l.first_p99, l.first_max
        );
        println!(
            "  live lost (not surfaced within the wait) {}, live duplicates {}",
            l.lost, l.duplicates
        );
        println!("  live agent loss events by reason       {live_agent_losses:?}");
    }
    if args.json {
        let line = json!({
            "members": n_members,
            "messages": args.messages,
            "senders": args.senders,
            "rate": args.rate,
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
            "shards": daemons_n,
            "server_cpu_us_per_copy": server_cpu_us_per_copy,
            "process_cpu_us_per_copy": process_cpu_us_per_copy,

            "shard_owners": shard_owners,
            "shard_copies_written": shard_counters.iter().map(|c| c.as_ref().map(|c| c.copies_written)).collect::<Vec<_>>(),
            "shard_transferred": shard_counters.iter().map(|c| c.as_ref().map(|c| c.transferred)).collect::<Vec<_>>(),
            "fanout_consumers": fanout_infos,
        });
        let mut line = line;
        line["server_rss_kib"] = json!(server_mem.map(|m| m.0));
        line["server_hwm_kib"] = json!(server_mem.map(|m| m.1));
        line["process_rss_kib"] = json!(process_mem.map(|m| m.0));
        line["process_hwm_kib"] = json!(process_mem.map(|m| m.1));
        line["connections"] = json!(connections);
        line["dlv_consumers"] = json!(dlv_consumers);
        if let Some(obj) = line.as_object_mut() {
            obj.insert("two_hop".into(), json!(args.two_hop));
            obj.insert(
                "daemon_transferred_direct".into(),
                json!(counters.as_ref().map(|c| c.transferred_direct)),
            );
            obj.insert("ideal_copies_per_s".into(), json!(ideal.map(f64::round)));
            obj.insert(
                "ratio_to_ideal".into(),
                json!(ratio_to_ideal.map(|r| (r * 1000.0).round() / 1000.0)),
            );
            obj.insert("agent_procs".into(), json!(agent_procs));
            obj.insert(
                "daemon_cpu_us_per_copy".into(),
                json!(daemon_cpu_us_per_copy),
            );
            obj.insert(
                "agents_cpu_us_per_copy".into(),
                json!(agents_cpu_us_per_copy),
            );
        }
        if let (Some(l), Some(obj)) = (&live, line.as_object_mut()) {
            obj.insert(
                "live_messages_per_s".into(),
                json!((l.messages_per_s * 10.0).round() / 10.0),
            );
            obj.insert("live_copies_per_s".into(), json!(l.copies_per_s.round()));
            obj.insert("live_p50_ms".into(), json!(l.p50));
            obj.insert("live_p99_ms".into(), json!(l.p99));
            obj.insert("live_max_ms".into(), json!(l.max));
            obj.insert("live_first_p50_ms".into(), json!(l.first_p50));
            obj.insert("live_first_p99_ms".into(), json!(l.first_p99));
            obj.insert("live_first_max_ms".into(), json!(l.first_max));
            obj.insert("live_copies".into(), json!(l.copies));
            obj.insert("live_lost".into(), json!(l.lost));
            obj.insert("live_duplicates".into(), json!(l.duplicates));
            obj.insert("live_elapsed_s".into(), json!(l.elapsed_s));
            obj.insert("live_agent_losses".into(), json!(live_agent_losses));
        }
        println!("{line}");
    }
    drop(server);
    if lost + lost_reported == 0 && duplicates == 0 && durable_done.is_some() {
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::from(1))
    }
}

/// Where the run's member agents are: tasks of this process, or `--agent-procs` child
/// processes. Either way they count their durable joins and first surfacings into the run's
/// `joined` and `surfaced` counters, and hand back one [`MemberLog`] per member at the end.
enum MemberAgents {
    /// In this process; `stop` ends their surfacing tasks.
    InProc {
        members: Vec<Member>,
        stop: watch::Sender<bool>,
    },
    /// In child processes.
    Procs(agents::AgentProcs),
}

impl MemberAgents {
    /// An error when an agent process died or reported one (never for in-process members).
    fn check(&self) -> Result<(), String> {
        match self {
            MemberAgents::InProc { .. } => Ok(()),
            MemberAgents::Procs(p) => p.check(),
        }
    }

    /// CPU seconds the agent processes used so far, summed; `None` for in-process members (or
    /// when a process could not be read).
    fn cpu_seconds(&self) -> Option<f64> {
        match self {
            MemberAgents::InProc { .. } => None,
            MemberAgents::Procs(p) => p.cpu_seconds(),
        }
    }

    /// Joins every member to `live` and waits (at most [`SETUP_WAIT`]) until each joined.
    async fn join_live(&self, live: &Channel) -> Result<(), String> {
        match self {
            MemberAgents::InProc { members, .. } => join_live_in_proc(members, live).await,
            MemberAgents::Procs(p) => p.join_live().await,
        }
    }

    /// Stops the members and returns what each saw.
    async fn finish(self) -> Result<Vec<MemberLog>, String> {
        match self {
            MemberAgents::InProc { members, stop } => {
                let _ = stop.send(true);
                finish_members(members).await
            }
            MemberAgents::Procs(p) => p.finish().await,
        }
    }
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

/// Makes `channel` live in `space` (`{"deliveryClass":"live","replay":false}`): joins subscribe
/// on core NATS only, no backstop, no backfill.
async fn live_channel_for(
    client: &async_nats::Client,
    space: &Space,
    channel: &str,
) -> Result<(), String> {
    async_nats::jetstream::new(client.clone())
        .get_key_value(KvBucket::Channels.name(space))
        .await
        .map_err(|e| format!("channels bucket: {e}"))?
        .put(
            channel,
            Bytes::from(json!({"deliveryClass": "live", "replay": false}).to_string()),
        )
        .await
        .map_err(|e| format!("live channel entry: {e}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Daemons (one per shard)
// ---------------------------------------------------------------------------------------------

/// The name of the daemons' runtime threads.
const DAEMON_THREADS: &str = "cotal-daemon";

/// The runtime the daemons run on: two worker threads named [`DAEMON_THREADS`]. Shut down in the
/// background when dropped (a runtime may not be dropped inside another one).
struct DaemonRuntime(Option<tokio::runtime::Runtime>);

impl DaemonRuntime {
    fn start() -> Result<Self, String> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(DAEMON_THREADS)
            .enable_all()
            .build()
            .map(|rt| DaemonRuntime(Some(rt)))
            .map_err(|e| format!("daemon runtime: {e}"))
    }

    fn spawn<F>(&self, work: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0 {
            Some(rt) => rt.spawn(work),
            None => tokio::spawn(work),
        }
    }
}

impl Drop for DaemonRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// One in-process delivery daemon of the run.
struct BenchDaemon {
    /// The shard it holds the lease of.
    shard: Shard,
    handle: MachineHandle<Delivery>,
    task: tokio::task::JoinHandle<Delivery>,
}

/// Starts shard i of `shards` for every i, each on its own connection (as `cotal delivery
/// --shard i --shards N` would), drains their events into `tally` and `evicted`, and waits
/// (at most [`SETUP_WAIT`]) until every one serves.
async fn start_daemons(
    cfg: ConnectConfig,
    space: Space,
    shards: u32,
    two_hop: bool,
    tally: Arc<Mutex<BTreeMap<String, u64>>>,
    evicted: Arc<Mutex<Vec<(u64, u64)>>>,
) -> Result<Vec<BenchDaemon>, String> {
    let map = ShardMap::new(shards).map_err(|e| format!("shards: {e}"))?;
    let mut daemons = Vec::with_capacity(shards as usize);
    for shard in map.iter() {
        let mut cfg = cfg.clone();
        cfg.name = Some(format!("cotal-bench-daemon-{}", shard.index()));
        let conn = connect(&cfg).await.map_err(|e| e.to_string())?;
        let (exec, inputs) = Executor::start(conn, ExecutorConfig::default());
        let Runner {
            handle,
            mut events,
            task,
        } = Runner::spawn(
            Delivery::new({
                let mut config = DeliveryConfig::new(
                    space.clone(),
                    shard,
                    format!("bench-daemon-{}", shard.index()),
                );
                config.two_hop = two_hop;
                config
            }),
            exec,
            inputs,
        );
        let (tally, evicted) = (Arc::clone(&tally), Arc::clone(&evicted));
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if let DeliveryEvent::EvictedBeforeFanout { first, last, .. } = e
                    && let Ok(mut v) = evicted.lock()
                {
                    v.push((first, last));
                }
                let text = format!("{e:?}");
                let mut kind: String = text
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                // Why writes failed matters at scale: the failure's kind goes into the key.
                if let DeliveryEvent::CopyWriteFailed { failure, .. } = &e {
                    let why = failure.as_ref().map_or_else(
                        || "Unknown".to_owned(),
                        |f| {
                            format!("{f:?}")
                                .chars()
                                .take_while(|c| c.is_alphanumeric())
                                .collect()
                        },
                    );
                    kind = format!("{kind}:{why}");
                }
                if let Ok(mut t) = tally.lock() {
                    *t.entry(kind).or_default() += 1;
                }
            }
        });
        daemons.push(BenchDaemon {
            shard,
            handle,
            task,
        });
    }
    let deadline = Instant::now() + SETUP_WAIT;
    for d in &daemons {
        loop {
            let (health, _, serving) = d.handle.status().await.map_err(|e| e.to_string())?;
            if serving {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "daemon of shard {} of {} not serving within {SETUP_WAIT:?}: {health}",
                    d.shard.index(),
                    d.shard.shards()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(daemons)
}

/// The sum of every daemon's counters right now.
async fn status_sum(daemons: &[BenchDaemon]) -> Result<DeliveryCounters, String> {
    let mut each = Vec::with_capacity(daemons.len());
    for d in daemons {
        let (_, c, _) = d.handle.status().await.map_err(|e| e.to_string())?;
        each.push(c);
    }
    Ok(sum_counters(each.iter()))
}

/// Field-by-field sum of daemons' counters (what N shards did together).
fn sum_counters<'a>(all: impl Iterator<Item = &'a DeliveryCounters>) -> DeliveryCounters {
    let mut s = DeliveryCounters::default();
    for c in all {
        s.add(c);
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The live path
// ---------------------------------------------------------------------------------------------

/// What the live phase published, and when it started.
struct LiveRun {
    /// Message id → publish time.
    published: BTreeMap<String, Instant>,
    /// When the first live message was published.
    start: Instant,
}

/// Joins every member to [`LIVE_CHANNEL`], waits for every join, publishes `messages` on it from
/// the senders round robin and waits until every member surfaced every one, or no copy surfaced
/// for `stall`, or `timeout`. Live is at-most-once: what is missing then counts as lost, and is
/// reported, not an error.
#[allow(clippy::too_many_arguments)]
async fn live_phase(
    agents: &MemberAgents,
    n_members: usize,
    senders: &[(MachineHandle<Agent>, tokio::task::JoinHandle<Agent>)],
    surfaced: &AtomicUsize,
    messages: usize,
    rate: u32,
    timeout: Duration,
    stall: Duration,
) -> Result<LiveRun, String> {
    let live = Channel::new(LIVE_CHANNEL).map_err(|e| format!("live channel: {e}"))?;
    agents.join_live(&live).await?;
    let base = surfaced.load(Ordering::Relaxed);
    let total = n_members * messages;
    let mut published = BTreeMap::new();
    let start = Instant::now();
    for i in 0..messages {
        pace(start, i, rate).await;
        let at = Instant::now();
        let (_, id) = senders[i % senders.len()]
            .0
            .send_text(live.clone(), format!("bench live message {i}"))
            .await
            .map_err(|e| format!("live send {i}: {e}"))?;
        published.insert(id, at);
        if i % 100 == 0 {
            let n = surfaced.load(Ordering::Relaxed).saturating_sub(base);
            progress_of(
                n as u64,
                total as u64,
                "copies",
                &format!("bench: live published {i}/{messages}, surfaced {n}/{total} copies"),
            );
        }
    }
    let mut seen = (0usize, Instant::now());
    loop {
        agents.check()?;
        let n = surfaced.load(Ordering::Relaxed).saturating_sub(base);
        if n >= total || start.elapsed() > timeout {
            break;
        }
        if n != seen.0 {
            seen = (n, Instant::now());
        } else if seen.1.elapsed() > stall {
            break;
        }
        progress_of(
            n as u64,
            total as u64,
            "copies",
            &format!(
                "bench: live published {messages}/{messages}, surfaced {n}/{total} copies, {:.1} s",
                start.elapsed().as_secs_f64()
            ),
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A short grace to see duplicates that would follow the last copy.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(LiveRun { published, start })
}

/// The live phase's figures.
struct LiveFigures {
    /// Live copies surfaced (first surfacings).
    copies: usize,
    /// Messages per second surfaced by every member (over the time to the last surfacing).
    messages_per_s: f64,
    copies_per_s: f64,
    p50: f64,
    p99: f64,
    max: f64,
    first_p50: f64,
    first_p99: f64,
    first_max: f64,
    /// Copies not surfaced within the wait.
    lost: u64,
    /// Later surfacings of a live message already surfaced.
    duplicates: u64,
    /// First live publish → last live surfacing.
    elapsed_s: f64,
}

fn live_figures(logs: &[MemberLog], run: &LiveRun) -> LiveFigures {
    let mut all = Vec::with_capacity(logs.len() * run.published.len());
    let mut first = Vec::with_capacity(run.published.len());
    let mut lost = 0u64;
    let mut last = run.start;
    for (id, at) in &run.published {
        let mut earliest: Option<Instant> = None;
        for log in logs {
            match log.first.get(id) {
                Some(s) => {
                    all.push(s.saturating_duration_since(*at).as_secs_f64() * 1e3);
                    earliest = Some(earliest.map_or(*s, |e| e.min(*s)));
                    last = last.max(*s);
                }
                None => lost += 1,
            }
        }
        if let Some(e) = earliest {
            first.push(e.saturating_duration_since(*at).as_secs_f64() * 1e3);
        }
    }
    let duplicates = logs
        .iter()
        .flat_map(|l| &l.duplicate_ids)
        .filter(|(id, _)| run.published.contains_key(*id))
        .map(|(_, n)| n)
        .sum();
    all.sort_by(f64::total_cmp);
    first.sort_by(f64::total_cmp);
    let elapsed_s = last
        .saturating_duration_since(run.start)
        .as_secs_f64()
        .max(1e-9);
    LiveFigures {
        copies: all.len(),
        messages_per_s: if all.is_empty() {
            0.0
        } else {
            run.published.len() as f64 / elapsed_s
        },
        copies_per_s: all.len() as f64 / elapsed_s,
        p50: percentile(&all, 50.0),
        p99: percentile(&all, 99.0),
        max: all.last().copied().unwrap_or(0.0),
        first_p50: percentile(&first, 50.0),
        first_p99: percentile(&first, 99.0),
        first_max: first.last().copied().unwrap_or(0.0),
        lost,
        duplicates,
        elapsed_s,
    }
}

// ---------------------------------------------------------------------------------------------
// Memory mode
// ---------------------------------------------------------------------------------------------

/// KV puts in flight while provisioning the memory space.
const PUT_WINDOW: usize = 512;
/// How long the daemon's RSS must not grow before it counts as settled.
const RSS_QUIET: Duration = Duration::from_secs(2);
/// The longest wait for the RSS to settle once the daemon is active.
const RSS_SETTLE_WAIT: Duration = Duration::from_secs(60);
/// The longest wait for a daemon child to report `health: active`.
const DAEMON_ACTIVE_WAIT: Duration = Duration::from_secs(120);

/// Memory of one daemon child, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug)]
struct DaemonMemory {
    /// `VmRSS` once settled, KiB.
    rss_kib: u64,
    /// `VmHWM` (peak resident) at the same moment, KiB.
    hwm_kib: u64,
    /// From spawn to `health: active`.
    active_s: f64,
    /// Whether the RSS stopped growing for [`RSS_QUIET`] within [`RSS_SETTLE_WAIT`].
    settled: bool,
}

/// A `cotal delivery` child process; SIGKILLed by its PID on drop if still running.
struct DaemonProcess {
    child: Child,
    log: PathBuf,
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(VmRSS, VmHWM)` in KiB of process `pid`.
pub(super) fn proc_memory(pid: u32) -> Result<(u64, u64), String> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| format!("{path}: no {name}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Starts `cotal delivery --space <space> --id <id> --nats <url>` (this binary) as a child
/// process with its stderr (the tracing lines, at the default level) in `log`: how `cotal bench
/// --memory` and `cotal chaos` run a daemon they can measure, stop or kill.
pub(crate) fn spawn_daemon_process(
    url: &str,
    space: &Space,
    id: &str,
    log: &std::path::Path,
) -> Result<std::process::Child, String> {
    spawn_daemon_process_in(None, url, space, id, log)
}

/// [`spawn_daemon_process`] inside the network namespace `netns` when given (`ip netns exec
/// <netns> <this binary> delivery …`; `ip` execs the daemon in place, so the child's PID is the
/// daemon's): how `cotal chaos --faults partition` runs a daemon it can cut off the network.
pub(crate) fn spawn_daemon_process_in(
    netns: Option<&str>,
    url: &str,
    space: &Space,
    id: &str,
    log: &std::path::Path,
) -> Result<std::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own binary: {e}"))?;
    let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut command = match netns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns]).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    };
    command
        .args([
            "delivery",
            "--space",
            space.as_str(),
            "--id",
            id,
            "--nats",
            url,
        ])
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .map_err(|e| format!("cannot start the daemon: {e}"))
}

/// Starts `cotal delivery --space <space>` (this binary) as a child, waits until it logs
/// `health: active` (every watch delivered its initial values, the consumers are bound), then
/// until its RSS has not grown for [`RSS_QUIET`], and reads its memory. The child is stopped
/// with SIGTERM (it releases its lease) afterwards.
async fn measure_daemon(url: &str, space: &Space, tag: &str) -> Result<DaemonMemory, String> {
    let log = std::env::temp_dir().join(format!(
        "cotal-bench-{}-{}-{tag}.log",
        std::process::id(),
        space.as_str()
    ));
    let started = Instant::now();
    let child = spawn_daemon_process(url, space, &format!("bench-memory-{tag}"), &log)?;
    let mut daemon = DaemonProcess { child, log };
    let pid = daemon.child.id();
    loop {
        let text = std::fs::read_to_string(&daemon.log).unwrap_or_default();
        if text.contains("health: active") {
            break;
        }
        if let Ok(Some(status)) = daemon.child.try_wait() {
            return Err(format!(
                "the {tag} daemon exited ({status}) before it was active: {}",
                text.lines().last().unwrap_or("no log")
            ));
        }
        if started.elapsed() > DAEMON_ACTIVE_WAIT {
            return Err(format!(
                "the {tag} daemon was not active within {DAEMON_ACTIVE_WAIT:?} (log {})",
                daemon.log.display()
            ));
        }
        progress(&format!(
            "bench: {tag} daemon loading, {:.1} s, RSS {} KiB",
            started.elapsed().as_secs_f64(),
            proc_memory(pid).map_or(0, |m| m.0)
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let active_s = started.elapsed().as_secs_f64();
    let settle_start = Instant::now();
    let (mut peak, _) = proc_memory(pid)?;
    let mut grew_at = Instant::now();
    let settled = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (rss, _) = proc_memory(pid)?;
        if rss > peak {
            peak = rss;
            grew_at = Instant::now();
        }
        if grew_at.elapsed() >= RSS_QUIET {
            break true;
        }
        if settle_start.elapsed() > RSS_SETTLE_WAIT {
            break false;
        }
        progress(&format!(
            "bench: {tag} daemon active, waiting for its RSS to settle: {rss} KiB"
        ));
    };
    let (rss_kib, hwm_kib) = proc_memory(pid)?;
    let _ = signal(pid, "TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !matches!(daemon.child.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(daemon);
    Ok(DaemonMemory {
        rss_kib,
        hwm_kib,
        active_s,
        settled,
    })
}

/// Stores `records` (KV key, value) in `bucket` of `space` as pipelined JetStream publishes on
/// `$KV.<bucket>.<key>` (what a KV put is), at most [`PUT_WINDOW`] in flight.
async fn pipelined_puts(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    records: impl Iterator<Item = (String, Bytes)>,
    what: &str,
) -> Result<usize, String> {
    let mut inflight = VecDeque::with_capacity(PUT_WINDOW);
    let mut n = 0usize;
    for (key, value) in records {
        let ack = js
            .publish(format!("$KV.{bucket}.{key}"), value)
            .await
            .map_err(|e| format!("{what} {key}: {e}"))?;
        inflight.push_back(ack);
        n += 1;
        if inflight.len() >= PUT_WINDOW
            && let Some(a) = inflight.pop_front()
        {
            a.await.map_err(|e| format!("{what}: {e}"))?;
        }
        if n.is_multiple_of(1000) {
            progress(&format!("bench: {n} {what} written"));
        }
    }
    while let Some(a) = inflight.pop_front() {
        a.await.map_err(|e| format!("{what}: {e}"))?;
    }
    Ok(n)
}

/// Consumer creates in flight while provisioning the memory space.
const CONSUMER_CREATE_WINDOW: usize = 128;

/// Creates every agent's `dlv_<id>` and `dm_<id>` as `cotal provision agent --apply` does (its
/// exact create requests), `CONSUMER_CREATE_WINDOW` in flight; returns how many.
async fn pipelined_consumers(
    client: &async_nats::Client,
    space: &Space,
    ids: &[AgentId],
) -> Result<usize, String> {
    use futures::StreamExt;
    let t = Duration::from_secs(30);
    let requests = ids.iter().flat_map(|id| {
        [ConsumerSpec::dlv(space, id), ConsumerSpec::dm(space, id)].map(|c| c.create_request())
    });
    let mut made = futures::stream::iter(requests)
        .map(|r| async move {
            crate::api::request(client, &r.subject, Bytes::from(r.body_bytes()), t)
                .await
                .map_err(|e| format!("{}: {e}", r.subject))
        })
        .buffer_unordered(CONSUMER_CREATE_WINDOW);
    let mut n = 0usize;
    while let Some(r) = made.next().await {
        r?;
        n += 1;
        if n.is_multiple_of(1000) {
            progress(&format!("bench: {n} agent consumers created"));
        }
    }
    Ok(n)
}

/// `state.consumer_count` of `stream`.
async fn consumer_count(client: &async_nats::Client, stream: &str) -> Result<u64, String> {
    let info = crate::api::request(
        client,
        &format!("$JS.API.STREAM.INFO.{stream}"),
        Bytes::new(),
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| format!("stream info {stream}: {e}"))?;
    Ok(info["state"]["consumer_count"].as_u64().unwrap_or(0))
}

/// `cotal bench --memory`.
async fn run_memory(args: &BenchArgs) -> Result<ExitCode, String> {
    let members = args.members.unwrap_or(10_000);
    let (channels, per_member) = (args.channels, args.memberships_per_member);
    if members == 0 || channels == 0 || per_member == 0 || per_member > channels {
        return Err(
            "--members, --channels and --memberships-per-member must be at least 1, and \
             --memberships-per-member at most --channels"
                .to_owned(),
        );
    }
    if !std::path::Path::new("/proc/self/status").exists() {
        return Err("--memory reads /proc/<pid>/status: Linux only".to_owned());
    }
    let (server, url) = target_server(args.spawn_server, args.nats.as_deref())?;
    let cfg = ConnectConfig::new([url.clone()]);
    let t = cfg.request_timeout;
    let admin = connect(&cfg).await.map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(admin.client.clone());
    let tag = format!("{:08x}", os_seed() & 0xffff_ffff);

    // The baseline: a daemon on a provisioned, empty space.
    let empty_space = Space::new(format!("benchmem{tag}e")).map_err(|e| format!("space: {e}"))?;
    progress(&format!(
        "bench: provisioning space {}",
        empty_space.as_str()
    ));
    let report = provision_space(&admin.client, &empty_space, t).await;
    if report.failed() > 0 {
        return Err(format!("provisioning failed: {}", report.summary()));
    }
    let empty = measure_daemon(&url, &empty_space, "empty").await?;

    // The loaded space: ACL records, durable channels, membership records.
    let space = Space::new(format!("benchmem{tag}")).map_err(|e| format!("space: {e}"))?;
    progress(&format!("bench: provisioning space {}", space.as_str()));
    let agents = u32::try_from(members).unwrap_or(u32::MAX);
    let report = apply(&admin.client, &SpacePlan::for_agents(&space, agents), t).await;
    if report.failed() > 0 {
        return Err(format!("provisioning failed: {}", report.summary()));
    }
    let ids: Vec<AgentId> = (0..members)
        .map(|i| AgentId::new(format!("m{i}")))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("agent id: {e}"))?;
    let chans: Vec<ConcreteChannel> = (0..channels)
        .map(|i| ConcreteChannel::new(format!("mem{i}")))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("channel: {e}"))?;
    let acl = Bytes::from(
        serde_json::to_vec(&AclRecord {
            allow_subscribe: vec![">".to_owned()],
            revision: 1,
            updated_at: wall_clock(),
            extra: Default::default(),
        })
        .map_err(|e| e.to_string())?,
    );
    pipelined_puts(
        &js,
        &KvBucket::Acl.name(&space),
        ids.iter().map(|id| (acl_key(id), acl.clone())),
        "ACL records",
    )
    .await?;
    let durable = Bytes::from(json!({"deliveryClass": "durable", "replay": false}).to_string());
    pipelined_puts(
        &js,
        &KvBucket::Channels.name(&space),
        chans
            .iter()
            .map(|c| (c.as_str().to_owned(), durable.clone())),
        "channel entries",
    )
    .await?;
    // Member i holds channels i·K … i·K+K−1 (mod C): K distinct channels, round robin.
    let now = wall_clock();
    let mut records = Vec::with_capacity(members * per_member);
    for (i, id) in ids.iter().enumerate() {
        for k in 0..per_member {
            let channel = &chans[(i * per_member + k) % channels];
            let mut r = MembershipRecord::fresh_join(
                channel.clone(),
                id.clone(),
                0,
                1,
                "bench-memory",
                now,
            );
            r.activated = Some(true);
            let value = serde_json::to_vec(&r).map_err(|e| e.to_string())?;
            records.push((member_key(channel, id), Bytes::from(value)));
        }
    }
    let memberships = pipelined_puts(
        &js,
        &KvBucket::Members.name(&space),
        records.into_iter(),
        "membership records",
    )
    .await?;
    // Every agent's consumers, as `provision agent --apply` makes them; the server's resident
    // memory before and after (when this run started the server).
    let server_pid = server.as_ref().map(SpawnedServer::pid);
    let server_before = server_pid.map(proc_memory).transpose()?;
    let created = Instant::now();
    let consumers = pipelined_consumers(&admin.client, &space, &ids).await?;
    let consumers_s = created.elapsed().as_secs_f64();
    let server_after = server_pid.map(proc_memory).transpose()?;
    let dlv_consumers = consumer_count(&admin.client, &SpaceStream::Dlv.name(&space)).await?;
    let dm_consumers = consumer_count(&admin.client, &SpaceStream::Dm.name(&space)).await?;
    let loaded = measure_daemon(&url, &space, "loaded").await?;
    let server_loaded = server_pid.map(proc_memory).transpose()?;
    progress_done();
    let per_consumer = server_before
        .zip(server_after)
        .map(|(b, a)| (a.0.saturating_sub(b.0) as f64 * 1024.0) / consumers.max(1) as f64);

    let per_record =
        (loaded.rss_kib.saturating_sub(empty.rss_kib) as f64 * 1024.0) / memberships.max(1) as f64;
    println!(
        "cotal bench --memory: space {}, {members} members, {channels} channels, {memberships} \
         membership records, server {url}",
        space.as_str()
    );
    println!(
        "  daemon RSS, records loaded             {:>12} KiB (peak {} KiB, active after {:.1} s{})",
        loaded.rss_kib,
        loaded.hwm_kib,
        loaded.active_s,
        if loaded.settled {
            ""
        } else {
            ", RSS still growing"
        }
    );
    println!(
        "  daemon RSS, empty space                {:>12} KiB (peak {} KiB, active after {:.1} s{})",
        empty.rss_kib,
        empty.hwm_kib,
        empty.active_s,
        if empty.settled {
            ""
        } else {
            ", RSS still growing"
        }
    );
    println!("  bytes per membership record            {per_record:>12.0}");
    println!(
        "  agent consumers created                {consumers:>12} in {consumers_s:.1} s (DLV \
         holds {dlv_consumers}, DM {dm_consumers})"
    );
    match (server_before, server_after, server_loaded, per_consumer) {
        (Some(b), Some(a), Some(l), Some(per)) => {
            println!(
                "  server RSS before / after consumers    {:>12} / {} KiB (peak {} KiB; with the \
                 daemon {} KiB)",
                b.0, a.0, a.1, l.0
            );
            println!("  server bytes per consumer              {per:>12.0}");
        }
        _ => println!(
            "  server RSS                             (not started by this run: not measured)"
        ),
    }
    println!("  connections                            2 (this run's admin, the daemon)");
    if args.json {
        println!(
            "{}",
            json!({
                "mode": "memory",
                "members": members,
                "channels": channels,
                "memberships": memberships,
                "acl_records": members,
                "daemon_rss_kib": loaded.rss_kib,
                "daemon_hwm_kib": loaded.hwm_kib,
                "daemon_active_s": loaded.active_s,
                "daemon_settled": loaded.settled,
                "empty_daemon_rss_kib": empty.rss_kib,
                "empty_daemon_hwm_kib": empty.hwm_kib,
                "empty_daemon_settled": empty.settled,
                "bytes_per_membership": per_record.round(),
                "agent_consumers": consumers,
                "agent_consumers_s": consumers_s,
                "dlv_consumers": dlv_consumers,
                "dm_consumers": dm_consumers,
                "server_rss_kib_before_consumers": server_before.map(|m| m.0),
                "server_rss_kib_after_consumers": server_after.map(|m| m.0),
                "server_hwm_kib_after_consumers": server_after.map(|m| m.1),
                "server_rss_kib_with_daemon": server_loaded.map(|m| m.0),
                "server_bytes_per_consumer": per_consumer.map(f64::round),
                "connections": 2,
            })
        );
    }
    drop(server);
    Ok(ExitCode::SUCCESS)
}
