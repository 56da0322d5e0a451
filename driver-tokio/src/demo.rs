//! The demo mesh on a real nats-server (`cotal demo --nats URL` / `--spawn-server`).
//!
//! It runs the very script of the simulator demo ([`cotal_driver_sim::demo::workload`]): a
//! delivery daemon and four agents (alice, bob, carol, dave) on `lobby` (live) and `ops`
//! (durable), with runtime joins, a leave and a rejoin, a restart of an agent (its runner is
//! aborted, its connection dropped, and a fresh agent with the same id starts), a connection loss
//! (dave connects through a loopback TCP proxy that the demo cuts and later restores, so the
//! client really loses its connection and reconnects), and a join outside the agent's ACL.
//!
//! # Time
//!
//! The script's millisecond stamps only order the steps: each step runs when the previous one
//! finished (a join or leave answered, a post acknowledged and surfaced by every connected
//! member, a restart's boot joins done), each wait bounded by [`STEP_WAIT`]. The connection loss
//! lasts until the first step at least [`OUTAGE_MS`] of script time after it.
//!
//! # Verdict
//!
//! The verdict is computed from what each agent surfaced against a model of the run kept while
//! the script executes (who was a member of which channel, and connected, when each post was
//! acknowledged):
//!
//! - a post on a durable channel made while the agent was a member surfaced (not as history)
//!   at least once, and at most once per process life (the ledger's dedup);
//! - a post on a live channel made while the agent was a member and connected surfaced exactly
//!   once; while it was disconnected, at most once;
//! - no post surfaced (not as history) to an agent that was not a member when it was posted —
//!   in particular nothing posted after a leave;
//! - a history (backfill) copy is of a channel the agent joined in that life, posted before that
//!   join completed, at most once per life;
//! - nothing surfaced on a channel the agent was refused; the refused join is reported.

use crate::connect::{ConnectConfig, NatsConnection, connect};
use crate::exec::{Executor, ExecutorConfig};
use crate::provision::{apply_consumer, provision_space};
use crate::run::{MachineHandle, Runner, os_key, os_seed, wall_clock};
use bytes::Bytes;
use cotal_core::agent::{Agent, AgentConfig, AgentEvent, RequestId};
use cotal_core::delivery::daemon::{Delivery, DeliveryConfig};
use cotal_core::ledger::SourceKind;
use cotal_core::wire::config::ConsumerSpec;
use cotal_core::wire::keys::{KvBucket, acl_key};
use cotal_core::wire::message::{Part, Sender};
use cotal_core::wire::records::AclRecord;
use cotal_core::wire::shard::ShardMap;
use cotal_core::wire::token::{AgentId, Channel, Space};
use cotal_driver_sim::demo::Received;
use cotal_driver_sim::mesh::{AGENT_NAMES, Action, ChannelSpec, Workload, default_channels};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Every single wait of the script (a join answered, a post surfaced, a reconnect) is bounded by
/// this; a wait that runs out is not an error by itself: the verdict says what is missing.
pub const STEP_WAIT: Duration = Duration::from_secs(10);
/// How long (in script milliseconds) a connection loss lasts.
pub const OUTAGE_MS: u64 = 400;
/// Agents in the demo.
const AGENTS: usize = 4;

/// What the demo did on the real server.
#[derive(Clone, Debug)]
pub struct NatsDemoReport {
    /// The server URL.
    pub url: String,
    /// The (fresh) space the run provisioned.
    pub space: String,
    /// Messages posted (acknowledged by the stream).
    pub messages: u64,
    /// What each agent surfaced, by agent name, in order (`at_ms` since the run started).
    pub received: Vec<(String, Vec<Received>)>,
    /// Joins that were refused: `agent #channel: reason`.
    pub refused: Vec<String>,
    /// The checks made (one line each, for the verdict).
    pub checks: u64,
    /// Everything the checks found wrong; empty when clean.
    pub problems: Vec<String>,
    /// Remarks that are not violations (an at-least-once copy in a later life, a wait that ran
    /// out but was met later).
    pub notes: Vec<String>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl NatsDemoReport {
    /// True when every check passed.
    pub fn clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// The texts an agent surfaced, not as history (live or durable), sorted.
    pub fn surfaced_texts(&self, agent: &str) -> Vec<String> {
        texts_of(&self.received, agent)
    }
}

/// The texts an agent surfaced not as history (`source` other than `backfill`), sorted: the
/// figure the simulator and the real server must agree on.
pub fn texts_of(received: &[(String, Vec<Received>)], agent: &str) -> Vec<String> {
    let mut out: Vec<String> = received
        .iter()
        .filter(|(a, _)| a == agent)
        .flat_map(|(_, got)| got.iter())
        .filter(|r| r.source != "backfill")
        .map(|r| r.text.clone())
        .collect();
    out.sort();
    out
}

impl fmt::Display for NatsDemoReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cotal demo on {} (space {}, 1 delivery daemon): {} messages posted in {:.1} s",
            self.url,
            self.space,
            self.messages,
            self.elapsed.as_secs_f64()
        )?;
        for (agent, got) in &self.received {
            writeln!(f, "\n{agent} received {}:", got.len())?;
            for r in got {
                let life = if r.life == 0 {
                    String::new()
                } else {
                    format!(" (after restart #{})", r.life)
                };
                writeln!(
                    f,
                    "  {:>6} ms  #{:<7} {:<6} via {:<8} {:?}{life}",
                    r.at_ms, r.channel, r.from, r.source, r.text
                )?;
            }
        }
        if !self.refused.is_empty() {
            writeln!(f)?;
            for r in &self.refused {
                writeln!(f, "refused: {r}")?;
            }
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        if self.problems.is_empty() {
            writeln!(
                f,
                "\nverdict: clean ({} checks: every member got every message of its intervals, \
                 nothing outside them, nothing past a leave)",
                self.checks
            )
        } else {
            writeln!(f, "\nverdict: VIOLATION ({} problems)", self.problems.len())?;
            for p in &self.problems {
                writeln!(f, "  {p}")?;
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The cuttable proxy (a real connection loss)
// ---------------------------------------------------------------------------------------------

/// A loopback TCP proxy to the server that can be cut: cutting drops every open connection and
/// refuses new ones until it is restored.
struct CutProxy {
    port: u16,
    up: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl CutProxy {
    async fn start(target: std::net::SocketAddr) -> Result<Self, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("proxy bind: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("proxy addr: {e}"))?
            .port();
        let (up, up_rx) = watch::channel(true);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    break;
                };
                if !*up_rx.borrow() {
                    let _ = inbound.shutdown().await;
                    continue;
                }
                let mut down = up_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Ok(CutProxy { port, up, task })
    }

    fn set(&self, up: bool) {
        let _ = self.up.send(up);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------------------------

/// What one agent (all its lives) reported.
#[derive(Default)]
struct AgentLog {
    received: Vec<Received>,
    /// Events by life.
    events: Vec<(u32, AgentEvent)>,
}

type SharedLog = Arc<Mutex<AgentLog>>;

struct Life {
    handle: MachineHandle<Agent>,
    task: JoinHandle<Agent>,
    collector: JoinHandle<()>,
}

fn message_text(m: &cotal_core::wire::message::CotalMessage) -> String {
    let text = m
        .parts
        .iter()
        .filter_map(|p| match p {
            Part::Text { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join(" ");
    if m.mentions.is_empty() {
        text
    } else {
        format!("{text} @{}", m.mentions.join(" @"))
    }
}

async fn start_life(
    cfg: &ConnectConfig,
    space: &Space,
    index: usize,
    life: u32,
    boot: Vec<Channel>,
    log: SharedLog,
    started: Instant,
) -> Result<Life, String> {
    let name = AGENT_NAMES[index];
    let id = AgentId::new(name).map_err(|e| format!("agent id {name}: {e}"))?;
    let mut config = AgentConfig::new(
        space.clone(),
        Sender::new(id.clone(), name),
        boot,
        os_seed() ^ index as u64,
    );
    config.id_key = Some(os_key());
    config.durable_backstop = true;
    config.create_dlv_consumer = false;
    let mut cfg = cfg.clone();
    cfg.inbox_prefix = Some(id.inbox_prefix());
    cfg.name = Some(format!("cotal-demo-{name}-{life}"));
    let conn: NatsConnection = connect(&cfg).await.map_err(|e| e.to_string())?;
    let machine = Agent::new(config).map_err(|e| format!("agent {name}: {e:?}"))?;
    let (exec, inputs) = Executor::start(conn, ExecutorConfig::default());
    let Runner {
        handle,
        mut events,
        task,
    } = Runner::spawn(machine, exec, inputs);
    let h = handle.clone();
    let collector = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let AgentEvent::MessagesReady { .. } = event {
                loop {
                    let Ok(batch) = h.take_messages(256).await else {
                        break;
                    };
                    if batch.is_empty() {
                        break;
                    }
                    let at_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    for s in batch {
                        let m = &s.item.message;
                        let r = Received {
                            at_ms,
                            life,
                            channel: s
                                .item
                                .channel
                                .as_ref()
                                .map(|c| c.as_str().to_owned())
                                .unwrap_or_default(),
                            from: m.from.name.clone(),
                            source: match s.origin {
                                SourceKind::Live => "live",
                                SourceKind::Backfill => "backfill",
                                _ => "durable",
                            }
                            .to_owned(),
                            text: message_text(m),
                        };
                        if let Ok(mut l) = log.lock() {
                            l.received.push(r);
                        }
                        let id = s.id;
                        let _ = h.cast(move |a, now| {
                            let _ = a.handled(now, &id);
                        });
                    }
                }
            } else if let Ok(mut l) = log.lock() {
                l.events.push((life, event));
            }
        }
    });
    Ok(Life {
        handle,
        task,
        collector,
    })
}

/// Polls `pred` over the log every 10 ms until it holds or `STEP_WAIT` runs out.
async fn wait_for(log: &SharedLog, mut pred: impl FnMut(&AgentLog) -> bool) -> bool {
    let deadline = Instant::now() + STEP_WAIT;
    loop {
        if log.lock().map(|l| pred(&l)).unwrap_or(false) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The model of the run
// ---------------------------------------------------------------------------------------------

/// One acknowledged post and who should see it.
struct Post {
    text: String,
    channel: usize,
    from: usize,
    /// Agents that were members of the channel when it was acknowledged, and whether connected.
    members: Vec<(usize, bool)>,
}

#[derive(Default)]
struct Model {
    /// Channels joined, per agent (current life).
    joined: Vec<BTreeSet<usize>>,
    /// Connected, per agent.
    online: Vec<bool>,
    /// Current life, per agent.
    life: Vec<u32>,
    posts: Vec<Post>,
    /// (agent, life, channel) → posts acknowledged before the join completed (history bound).
    history_bound: BTreeMap<(usize, u32, usize), usize>,
    /// (agent, channel) refused.
    refused: BTreeSet<(usize, usize)>,
}

/// How the demo's agents authenticate.
#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    /// The space to provision (a fresh random one when `None`).
    pub space: Option<Space>,
    /// When set, each agent connects as the user named after it with this password (the users of
    /// [`server_authorization`], whose per-user permissions make the broker enforce each agent's
    /// read ACL); `cfg` is then the privileged connection that provisions and runs the daemon.
    pub agent_password: Option<String>,
}

/// A fresh space name for one demo run.
pub fn fresh_space() -> Space {
    // `demo` + 8 hex digits is always a valid space token.
    Space::new(format!("demo{:08x}", os_seed() & 0xffff_ffff))
        .expect("demo + hex digits is a valid space name")
}

/// An `authorization { users = [...] }` block for a nats-server config: `admin` (password
/// `admin_password`, unrestricted: it provisions and runs the daemon) and one user per demo agent
/// (password `agent_password`) whose permissions are the agent profile of its read ACL in the
/// demo's workload, so the broker itself refuses the out-of-ACL join.
pub fn server_authorization(space: &Space, admin_password: &str, agent_password: &str) -> String {
    use cotal_core::wire::permissions::{AgentPolicy, Permissions};
    let workload = cotal_driver_sim::demo::workload();
    let channels = default_channels();
    let mut text = format!(
        "authorization {{\n  users = [\n    {{ user: \"admin\", password: {admin_password:?} }}\n"
    );
    for (i, acl) in workload.acl.iter().enumerate().take(AGENTS) {
        let Ok(id) = AgentId::new(AGENT_NAMES[i]) else {
            continue;
        };
        let list: Vec<Channel> = acl.iter().map(|c| channels[*c].channel.clone()).collect();
        let policy = AgentPolicy {
            id,
            allow_subscribe: list.clone(),
            allow_publish: list,
            role: None,
            spawn: false,
        };
        let perms = crate::provision::nats_server_permissions(&Permissions::agent(space, &policy));
        text.push_str(&format!(
            "    {{ user: {:?}, password: {agent_password:?}, permissions: {perms} }}\n",
            AGENT_NAMES[i]
        ));
    }
    text.push_str("  ]\n}\n");
    text
}

/// Runs the demo mesh on the server of `cfg` (which must allow provisioning a space) and reports
/// what each agent received and the verdict.
///
/// # Errors
///
/// A one-line reason when the run could not be set up (unreachable server, provisioning failed,
/// the daemon never served). Faults during the script are not errors: the verdict reports them.
pub async fn run(cfg: &ConnectConfig, options: &DemoOptions) -> Result<NatsDemoReport, String> {
    let started = Instant::now();
    let workload = cotal_driver_sim::demo::workload();
    let channels = default_channels();
    let t = cfg.request_timeout;
    let admin = connect(cfg).await.map_err(|e| e.to_string())?;
    let url = cfg.urls.first().cloned().unwrap_or_default();
    let space = options.space.clone().unwrap_or_else(fresh_space);
    let agent_cfg = match &options.agent_password {
        None => cfg.clone(),
        Some(_) => ConnectConfig {
            auth: crate::connect::Auth::None,
            ..cfg.clone()
        },
    };
    provision(&admin, &space, &channels, &workload, t).await?;

    // The daemon, until it serves.
    let shard = ShardMap::new(1)
        .and_then(|m| m.shard(0))
        .map_err(|e| format!("shard: {e}"))?;
    let daemon_conn = connect(cfg).await.map_err(|e| e.to_string())?;
    let (exec, inputs) = Executor::start(daemon_conn, ExecutorConfig::default());
    let Runner {
        handle: daemon,
        events: mut daemon_events,
        task: daemon_task,
    } = Runner::spawn(
        Delivery::new(DeliveryConfig::new(space.clone(), shard, "demo-daemon")),
        exec,
        inputs,
    );
    tokio::spawn(async move { while daemon_events.recv().await.is_some() {} });
    let deadline = Instant::now() + STEP_WAIT;
    loop {
        let (health, _, serving) = daemon.status().await.map_err(|e| e.to_string())?;
        if serving {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the delivery daemon did not serve within {STEP_WAIT:?}: {health}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Dave (the agent that loses its connection) goes through the proxy.
    let target = first_socket_addr(&url).await?;
    let proxy = CutProxy::start(target).await?;
    let mut script = Script {
        cfg: agent_cfg.clone(),
        agent_password: options.agent_password.clone(),
        proxied: {
            let mut c = agent_cfg.clone();
            c.urls = vec![format!("nats://127.0.0.1:{}", proxy.port)];
            c.tls.required = false;
            c
        },
        proxy,
        space: space.clone(),
        channels: channels.iter().map(|c| c.channel.clone()).collect(),
        durable: channels.iter().map(|c| c.durable).collect(),
        logs: (0..AGENTS).map(|_| SharedLog::default()).collect(),
        lives: Vec::new(),
        boot: workload.boot.clone(),
        model: Model {
            joined: vec![BTreeSet::new(); AGENTS],
            online: vec![true; AGENTS],
            life: vec![0; AGENTS],
            ..Model::default()
        },
        notes: Vec::new(),
        posts_made: 0,
        started,
        lost: None,
    };
    for i in 0..AGENTS {
        let life = script.start(i).await?;
        script.lives.push(life);
    }
    for i in 0..AGENTS {
        script.await_boot(i).await;
    }
    for step in &workload.steps {
        if let Some((agent, at)) = script.lost
            && step.at.as_millis() >= at + OUTAGE_MS
        {
            script.restore(agent).await;
        }
        script.apply(&step.action).await?;
    }
    if let Some((agent, _)) = script.lost {
        script.restore(agent).await;
    }
    // Everything owed surfaces (durable copies of an outage come through the daemon).
    script.settle().await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let Script {
        lives,
        logs,
        model,
        mut notes,
        posts_made,
        ..
    } = script;
    for l in &lives {
        let _ = l.handle.stop(Duration::from_secs(2));
    }
    for l in lives {
        let _ = tokio::time::timeout(Duration::from_secs(5), l.task).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), l.collector).await;
    }
    let _ = daemon.shutdown(Duration::from_secs(2));
    let _ = tokio::time::timeout(Duration::from_secs(5), daemon_task).await;

    let received: Vec<(String, Vec<Received>)> = logs
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let got = l.lock().map(|l| l.received.clone()).unwrap_or_default();
            (AGENT_NAMES[i].to_owned(), got)
        })
        .collect();
    let names: Vec<String> = channels
        .iter()
        .map(|c| c.channel.as_str().to_owned())
        .collect();
    let (checks, mut problems) = verdict(&model, &received, &names, &mut notes);
    // The out-of-ACL joins of the script: refused by the broker when it enforces permissions.
    for step in &workload.steps {
        let Action::Join { agent, channel } = step.action else {
            continue;
        };
        if workload.acl[agent].contains(&channel) || model.refused.contains(&(agent, channel)) {
            continue;
        }
        let what = format!(
            "{}'s join of #{} (outside its ACL) was accepted",
            AGENT_NAMES[agent], names[channel]
        );
        if options.agent_password.is_some() {
            problems.push(what);
        } else {
            notes.push(format!(
                "{what}: the server enforces no per-user permissions for this run \
                 (--spawn-server runs with them)"
            ));
        }
    }
    let refused = model
        .refused
        .iter()
        .map(|(a, c)| format!("{} #{}", AGENT_NAMES[*a], names[*c]))
        .collect();
    Ok(NatsDemoReport {
        url,
        space: space.as_str().to_owned(),
        messages: posts_made,
        received,
        refused,
        checks,
        problems,
        notes,
        elapsed: started.elapsed(),
    })
}

async fn first_socket_addr(url: &str) -> Result<std::net::SocketAddr, String> {
    let hostport = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .rsplit('@')
        .next()
        .unwrap_or(url)
        .trim_end_matches('/')
        .to_owned();
    let hostport = if hostport.contains(':') {
        hostport
    } else {
        format!("{hostport}:4222")
    };
    tokio::net::lookup_host(&hostport)
        .await
        .map_err(|e| format!("cannot resolve {hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {hostport}"))
}

/// A fresh space: streams, buckets, the channel registry, ACL records and DLV consumers.
async fn provision(
    admin: &NatsConnection,
    space: &Space,
    channels: &[ChannelSpec],
    workload: &Workload,
    t: Duration,
) -> Result<(), String> {
    let report = provision_space(&admin.client, space, t).await;
    if report.failed() > 0 {
        return Err(format!("provisioning failed: {}", report.summary()));
    }
    let js = async_nats::jetstream::new(admin.client.clone());
    let registry = js
        .get_key_value(KvBucket::Channels.name(space))
        .await
        .map_err(|e| format!("channels bucket: {e}"))?;
    for c in channels {
        let class = if c.durable { "durable" } else { "live" };
        let value = if c.replay {
            format!("{{\"deliveryClass\":\"{class}\"}}")
        } else {
            format!("{{\"deliveryClass\":\"{class}\",\"replay\":false}}")
        };
        registry
            .put(c.channel.as_str(), Bytes::from(value))
            .await
            .map_err(|e| format!("channel entry {}: {e}", c.channel.as_str()))?;
    }
    let acl = js
        .get_key_value(KvBucket::Acl.name(space))
        .await
        .map_err(|e| format!("acl bucket: {e}"))?;
    for (i, allowed) in workload.acl.iter().enumerate().take(AGENTS) {
        let id = AgentId::new(AGENT_NAMES[i]).map_err(|e| format!("agent id: {e}"))?;
        let record = AclRecord {
            allow_subscribe: allowed
                .iter()
                .map(|c| channels[*c].channel.as_str().to_owned())
                .collect(),
            revision: 1,
            updated_at: wall_clock(),
            extra: Default::default(),
        };
        let value = serde_json::to_vec(&record).map_err(|e| e.to_string())?;
        acl.put(acl_key(&id), Bytes::from(value))
            .await
            .map_err(|e| format!("ACL record of {}: {e}", id.as_str()))?;
        apply_consumer(&admin.client, &ConsumerSpec::dlv(space, &id), t)
            .await
            .map_err(|e| format!("DLV consumer of {}: {e}", id.as_str()))?;
    }
    Ok(())
}

struct Script {
    cfg: ConnectConfig,
    agent_password: Option<String>,
    proxied: ConnectConfig,
    proxy: CutProxy,
    space: Space,
    channels: Vec<Channel>,
    durable: Vec<bool>,
    logs: Vec<SharedLog>,
    lives: Vec<Life>,
    boot: Vec<Vec<usize>>,
    model: Model,
    notes: Vec<String>,
    posts_made: u64,
    started: Instant,
    /// The agent whose connection is cut, and the script time of the cut.
    lost: Option<(usize, u64)>,
}

/// The agent that goes through the proxy (the one the demo's script cuts).
const PROXIED: usize = 3;

impl Script {
    async fn start(&self, i: usize) -> Result<Life, String> {
        let boot = self.boot[i]
            .iter()
            .map(|c| self.channels[*c].clone())
            .collect();
        let mut cfg = if i == PROXIED {
            self.proxied.clone()
        } else {
            self.cfg.clone()
        };
        if let Some(password) = &self.agent_password {
            cfg.auth = crate::connect::Auth::UserPassword {
                user: AGENT_NAMES[i].to_owned(),
                password: password.clone(),
            };
        }
        start_life(
            &cfg,
            &self.space,
            i,
            self.model.life[i],
            boot,
            Arc::clone(&self.logs[i]),
            self.started,
        )
        .await
    }

    /// Waits for the boot joins of agent `i`'s current life and records them in the model.
    async fn await_boot(&mut self, i: usize) {
        let life = self.model.life[i];
        for c in self.boot[i].clone() {
            let ch = self.channels[c].clone();
            let mut outcome = None;
            let done = wait_for(&self.logs[i], |l| {
                l.events.iter().any(|(lf, e)| {
                    *lf == life
                        && match e {
                            AgentEvent::Joined {
                                request: None,
                                channel,
                                ..
                            } if *channel == ch => {
                                outcome = Some(true);
                                true
                            }
                            AgentEvent::JoinFailed {
                                request: None,
                                channel,
                                ..
                            } if *channel == ch => {
                                outcome = Some(false);
                                true
                            }
                            _ => false,
                        }
                })
            })
            .await;
            match (done, outcome) {
                (true, Some(true)) => self.joined(i, c),
                (true, _) => {
                    self.model.refused.insert((i, c));
                }
                (false, _) => self.notes.push(format!(
                    "{} life {life}: boot join of #{} not answered within {STEP_WAIT:?}",
                    AGENT_NAMES[i],
                    ch.as_str()
                )),
            }
        }
    }

    fn joined(&mut self, i: usize, c: usize) {
        self.model.joined[i].insert(c);
        let bound = self.model.posts.len();
        self.model
            .history_bound
            .insert((i, self.model.life[i], c), bound);
    }

    /// Waits for the answer to `request` of agent `i`.
    async fn answer(&self, i: usize, request: RequestId) -> Option<AgentEvent> {
        let life = self.model.life[i];
        let mut found = None;
        wait_for(&self.logs[i], |l| {
            found = l
                .events
                .iter()
                .filter(|(lf, _)| *lf == life)
                .map(|(_, e)| e)
                .find(|e| match e {
                    AgentEvent::Joined { request: r, .. }
                    | AgentEvent::JoinFailed { request: r, .. } => *r == Some(request),
                    AgentEvent::Left { request: r, .. }
                    | AgentEvent::LeaveFailed { request: r, .. }
                    | AgentEvent::Sent { request: r, .. }
                    | AgentEvent::SendFailed { request: r, .. } => *r == request,
                    _ => false,
                })
                .cloned();
            found.is_some()
        })
        .await;
        found
    }

    async fn apply(&mut self, action: &Action) -> Result<(), String> {
        match *action {
            Action::Join { agent, channel } => {
                let ch = self.channels[channel].clone();
                match self.lives[agent].handle.join(ch).await {
                    Ok(req) => match self.answer(agent, req).await {
                        Some(AgentEvent::Joined { .. }) => self.joined(agent, channel),
                        Some(_) => {
                            self.model.refused.insert((agent, channel));
                        }
                        None => self.notes.push(format!(
                            "{} join #{}: no answer within {STEP_WAIT:?}",
                            AGENT_NAMES[agent],
                            self.channels[channel].as_str()
                        )),
                    },
                    Err(_) => {
                        self.model.refused.insert((agent, channel));
                    }
                }
            }
            Action::Leave { agent, channel } => {
                // A leave is a hard cut from the moment it is asked.
                self.model.joined[agent].remove(&channel);
                let ch = self.channels[channel].clone();
                match self.lives[agent].handle.leave(ch).await {
                    Ok(req) => {
                        if !matches!(self.answer(agent, req).await, Some(AgentEvent::Left { .. })) {
                            self.notes.push(format!(
                                "{} leave #{}: not confirmed",
                                AGENT_NAMES[agent],
                                self.channels[channel].as_str()
                            ));
                        }
                    }
                    Err(e) => self.notes.push(format!(
                        "{} leave #{}: refused: {e}",
                        AGENT_NAMES[agent],
                        self.channels[channel].as_str()
                    )),
                }
            }
            Action::Post {
                agent,
                channel,
                mention,
            } => self.post(agent, channel, mention).await,
            Action::Restart { agent } => {
                // Let the last acks reach the server, then the process dies without a word.
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.lives[agent].task.abort();
                self.lives[agent].collector.abort();
                self.model.joined[agent].clear();
                self.model.life[agent] += 1;
                let life = self.start(agent).await?;
                self.lives[agent] = life;
                self.await_boot(agent).await;
            }
            Action::Lose { agent } => {
                if agent == PROXIED {
                    self.proxy.set(false);
                    self.model.online[agent] = false;
                    let at = self.step_at(action);
                    self.lost = Some((agent, at));
                    let life = self.model.life[agent];
                    if !wait_for(&self.logs[agent], |l| {
                        l.events
                            .iter()
                            .any(|(lf, e)| *lf == life && *e == AgentEvent::Disconnected)
                    })
                    .await
                    {
                        self.notes
                            .push(format!("{}: disconnect not seen", AGENT_NAMES[agent]));
                    }
                } else {
                    self.notes.push(format!(
                        "lose {}: only {} goes through the proxy; skipped",
                        AGENT_NAMES[agent], AGENT_NAMES[PROXIED]
                    ));
                }
            }
            Action::Narrow { .. }
            | Action::RestartDaemon { .. }
            | Action::LoseDaemon { .. }
            | Action::FreezeHolder { .. }
            | Action::CutHolder { .. }
            | Action::Away { .. } => {
                self.notes
                    .push(format!("{action}: not part of the demo; skipped"));
            }
        }
        Ok(())
    }

    fn step_at(&self, action: &Action) -> u64 {
        cotal_driver_sim::demo::workload()
            .steps
            .iter()
            .find(|s| s.action == *action)
            .map_or(0, |s| s.at.as_millis())
    }

    async fn restore(&mut self, agent: usize) {
        self.proxy.set(true);
        self.lost = None;
        let life = self.model.life[agent];
        if !wait_for(&self.logs[agent], |l| {
            l.events
                .iter()
                .any(|(lf, e)| *lf == life && matches!(e, AgentEvent::Connected { first: false }))
        })
        .await
        {
            self.notes
                .push(format!("{}: reconnect not seen", AGENT_NAMES[agent]));
        }
        self.model.online[agent] = true;
    }

    async fn post(&mut self, agent: usize, channel: usize, mention: Option<usize>) {
        self.posts_made += 1;
        let ch = self.channels[channel].clone();
        let text = format!(
            "{} post {} on {}",
            AGENT_NAMES[agent],
            self.posts_made,
            ch.as_str()
        );
        let mentions: Vec<String> = mention
            .filter(|m| *m < AGENTS)
            .map(|m| AGENT_NAMES[m].to_owned())
            .into_iter()
            .collect();
        let label = if mentions.is_empty() {
            text.clone()
        } else {
            format!("{text} @{}", mentions.join(" @"))
        };
        let sent = self.lives[agent]
            .handle
            .call(move |a, now| a.send(now, &ch, vec![Part::text(text)], &mentions))
            .await;
        let acked = match sent {
            Ok(Ok((req, _id))) => {
                matches!(self.answer(agent, req).await, Some(AgentEvent::Sent { .. }))
            }
            _ => false,
        };
        if !acked {
            self.notes
                .push(format!("post {label:?} was not acknowledged"));
            return;
        }
        let members: Vec<(usize, bool)> = (0..AGENTS)
            .filter(|a| *a != agent && self.model.joined[*a].contains(&channel))
            .map(|a| (a, self.model.online[a]))
            .collect();
        // Every connected member surfaces it before the script goes on.
        for (a, online) in &members {
            if *online {
                let l = label.clone();
                if !wait_for(&self.logs[*a], |log| {
                    log.received.iter().any(|r| r.text == l)
                })
                .await
                {
                    self.notes.push(format!(
                        "{} had not surfaced {label:?} after {STEP_WAIT:?}",
                        AGENT_NAMES[*a]
                    ));
                }
            }
        }
        self.model.posts.push(Post {
            text: label,
            channel,
            from: agent,
            members,
        });
    }

    /// Waits until every durable member surfaced every post of its intervals.
    async fn settle(&mut self) {
        for p in &self.model.posts {
            if !self.durable[p.channel] {
                continue;
            }
            for (a, _) in &p.members {
                let t = p.text.clone();
                if !wait_for(&self.logs[*a], |l| {
                    l.received
                        .iter()
                        .any(|r| r.text == t && r.source != "backfill")
                })
                .await
                {
                    self.notes.push(format!(
                        "{} had not surfaced {:?} at the end",
                        AGENT_NAMES[*a], p.text
                    ));
                }
            }
        }
    }
}

/// The checks of the module docs. Returns the number of checks made and the problems found.
fn verdict(
    model: &Model,
    received: &[(String, Vec<Received>)],
    channel_names: &[String],
    notes: &mut Vec<String>,
) -> (u64, Vec<String>) {
    let mut checks = 0u64;
    let mut problems = Vec::new();
    let by_text: BTreeMap<&str, (usize, &Post)> = model
        .posts
        .iter()
        .enumerate()
        .map(|(n, p)| (p.text.as_str(), (n, p)))
        .collect();
    for (a, (name, got)) in received.iter().enumerate() {
        // Non-history surfacings per post, per life.
        let mut per_life: BTreeMap<(&str, u32), u32> = BTreeMap::new();
        let mut history: BTreeMap<(&str, u32), u32> = BTreeMap::new();
        for r in got {
            checks += 1;
            let Some((n, post)) = by_text.get(r.text.as_str()) else {
                problems.push(format!("{name} surfaced {:?}, which nobody posted", r.text));
                continue;
            };
            if channel_names.get(post.channel).map(String::as_str) != Some(r.channel.as_str()) {
                problems.push(format!(
                    "{name} surfaced {:?} on #{} (posted on #{})",
                    r.text, r.channel, channel_names[post.channel]
                ));
            }
            if model.refused.contains(&(a, post.channel)) && !post.members.iter().any(|m| m.0 == a)
            {
                problems.push(format!(
                    "{name} surfaced {:?} on #{}, which it was refused",
                    r.text, r.channel
                ));
            }
            if r.source == "backfill" {
                *history.entry((r.text.as_str(), r.life)).or_default() += 1;
                match model.history_bound.get(&(a, r.life, post.channel)) {
                    Some(bound) if n < bound => {}
                    Some(_) => problems.push(format!(
                        "{name} (life {}) got {:?} as history, but it was posted after the join",
                        r.life, r.text
                    )),
                    None => problems.push(format!(
                        "{name} (life {}) got {:?} as history of a channel it never joined",
                        r.life, r.text
                    )),
                }
            } else {
                *per_life.entry((r.text.as_str(), r.life)).or_default() += 1;
                if post.from == a {
                    problems.push(format!("{name} surfaced its own post {:?}", r.text));
                } else if !post.members.iter().any(|m| m.0 == a) {
                    problems.push(format!(
                        "{name} surfaced {:?} via {}, but was not a member of #{} when it was posted",
                        r.text, r.source, r.channel
                    ));
                }
            }
        }
        for ((text, life), n) in per_life.iter().chain(history.iter()) {
            checks += 1;
            if *n > 1 {
                problems.push(format!(
                    "{name} (life {life}) surfaced {text:?} {n} times (dedup failed)"
                ));
            }
        }
        // Completeness.
        for post in &model.posts {
            let Some((_, online)) = post.members.iter().find(|m| m.0 == a) else {
                continue;
            };
            checks += 1;
            let lives: Vec<u32> = per_life
                .iter()
                .filter(|((t, _), _)| *t == post.text)
                .map(|((_, l), _)| *l)
                .collect();
            let durable = model_durable(channel_names, post.channel);
            if lives.is_empty() && (durable || *online) {
                problems.push(format!(
                    "{name} never surfaced {:?} (#{} {}, posted while it was a member)",
                    post.text,
                    channel_names[post.channel],
                    if durable { "durable" } else { "live" }
                ));
            }
            if lives.len() > 1 {
                notes.push(format!(
                    "{name} surfaced {:?} again in a later life (at-least-once across a restart)",
                    post.text
                ));
            }
        }
    }
    (checks, problems)
}

fn model_durable(channel_names: &[String], channel: usize) -> bool {
    default_channels()
        .iter()
        .find(|c| Some(c.channel.as_str()) == channel_names.get(channel).map(String::as_str))
        .is_some_and(|c| c.durable)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn got(life: u32, channel: &str, source: &str, text: &str) -> Received {
        Received {
            at_ms: 0,
            life,
            channel: channel.to_owned(),
            from: "x".to_owned(),
            source: source.to_owned(),
            text: text.to_owned(),
        }
    }

    fn names() -> Vec<String> {
        default_channels()
            .iter()
            .map(|c| c.channel.as_str().to_owned())
            .collect()
    }

    /// Two posts on `ops` (durable, index 1) by alice (0): bob (1) was a member for the first
    /// only; carol (2) for both, but offline for the second (durable: still owed).
    fn model() -> Model {
        let mut m = Model {
            joined: vec![BTreeSet::new(); AGENTS],
            online: vec![true; AGENTS],
            life: vec![0; AGENTS],
            ..Model::default()
        };
        m.history_bound.insert((1, 0, 1), 0);
        m.history_bound.insert((2, 0, 1), 0);
        m.posts.push(Post {
            text: "p1".into(),
            channel: 1,
            from: 0,
            members: vec![(1, true), (2, true)],
        });
        m.posts.push(Post {
            text: "p2".into(),
            channel: 1,
            from: 0,
            members: vec![(2, false)],
        });
        m
    }

    fn run_verdict(received: Vec<(String, Vec<Received>)>) -> Vec<String> {
        let mut notes = Vec::new();
        verdict(&model(), &received, &names(), &mut notes).1
    }

    #[test]
    fn a_clean_run_passes() {
        let problems = run_verdict(vec![
            ("alice".into(), vec![]),
            ("bob".into(), vec![got(0, "ops", "live", "p1")]),
            (
                "carol".into(),
                vec![got(0, "ops", "live", "p1"), got(0, "ops", "durable", "p2")],
            ),
        ]);
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn loss_duplicates_and_surfacings_past_a_leave_are_violations() {
        let problems = run_verdict(vec![
            // Her own post.
            ("alice".into(), vec![got(0, "ops", "live", "p1")]),
            // Twice in one life, and p2 after he was no longer a member.
            (
                "bob".into(),
                vec![
                    got(0, "ops", "live", "p1"),
                    got(0, "ops", "durable", "p1"),
                    got(0, "ops", "live", "p2"),
                ],
            ),
            // The durable p2 owed to her never came; p2 as history, posted after her join.
            (
                "carol".into(),
                vec![got(0, "ops", "live", "p1"), got(0, "ops", "backfill", "p2")],
            ),
        ]);
        let has = |needle: &str| problems.iter().any(|p| p.contains(needle));
        assert!(has("alice surfaced its own post"), "{problems:?}");
        assert!(has("bob (life 0) surfaced \"p1\" 2 times"), "{problems:?}");
        assert!(
            has("bob surfaced \"p2\" via live, but was not a member"),
            "{problems:?}"
        );
        assert!(has("carol never surfaced \"p2\""), "{problems:?}");
        assert!(has("posted after the join"), "{problems:?}");
        assert_eq!(problems.len(), 5, "{problems:?}");
    }
}
