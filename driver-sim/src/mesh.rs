//! The simulated mesh: a provisioned space, agents (and delivery daemons), a workload, and the
//! ground-truth journal the [`crate::oracle`] checks.
//!
//! # Provisioning
//!
//! [`Mesh::new`] does what `cotal up` and the provisioner do, from the same data the real driver
//! uses: the space's streams and KV buckets ([`SpaceConfig`]), each agent's `dlv_<id>` durable
//! consumer ([`ConsumerSpec::dlv`]), each agent's read ACL record in the ACL bucket
//! ([`AclRecord`]), and the channel registry (one entry per channel with its delivery class).
//! Every agent connects with its own client and the credential
//! [`Permissions::agent`] mints from its read ACL.
//!
//! # Agents
//!
//! Each agent is a real [`Agent`] machine run by the [`Host`]. Around it, the mesh plays the
//! application: every [`AgentEvent::MessagesReady`] is answered at once with
//! [`Agent::take_messages`], each surfaced message is recorded in the [`Journal`] (agent, life,
//! id, channel, source, time) and reported [`Agent::handled`] after the agent's handling delay
//! (seeded; zero for some agents). A *life* is one process: a restart kills the client (its
//! connection is gone for good) and starts a fresh [`Agent`] with the same id, the same boot
//! channels and a new client: its ledger is lost, its memberships and DLV consumer are not.
//!
//! # Workload
//!
//! A [`Workload`] is a list of timed [`Action`]s (join, leave, post with mentions, ACL narrowing,
//! restart, connection loss), generated from the seed by [`Workload::generate`] or written by
//! hand. It is plain data, so a failing run can be shrunk by dropping steps.
//!
//! # Run
//!
//! [`Mesh::run`] plays the workload under the configured faults (the fault phase ends one second
//! after the last step), then heals for [`MeshConfig::heal`] of simulated time, with the oracle
//! checked after every host step and once more at the end ([`crate::oracle::Oracle::finish`]).
//!
//! # Mutations
//!
//! [`Mutation`] switches a fix of the core off from the outside, so tests can prove that the
//! oracle sees the bug the fix prevents.

use crate::host::{Host, HostedMachine};
use crate::net::ClientId;
use crate::oracle::{Oracle, Violation};
use crate::sched::{FaultConfig, Rng, SimConfig};
use bytes::Bytes;
use cotal_core::agent::{Agent, AgentConfig, AgentError, AgentEvent, RequestId};
use cotal_core::constants::DEFAULT_HEARTBEAT;
use cotal_core::delivery::daemon::{
    DegradedReason, Delivery, DeliveryConfig, DeliveryEvent, DeliveryHealth,
};
use cotal_core::delivery::lease::LeaseState;
use cotal_core::io::{Command, Input, Machine};
use cotal_core::ledger::{MessageId, SourceKind};
use cotal_core::time::{Duration, Instant, Now};
use cotal_core::wire::config::{ConsumerSpec, KvBucketSpec, SpaceConfig};
use cotal_core::wire::control::ControlRequest;
use cotal_core::wire::json;
use cotal_core::wire::keys::{KvBucket, acl_key};
use cotal_core::wire::message::{Part, Sender};
use cotal_core::wire::permissions::{AgentPolicy, Permissions};
use cotal_core::wire::records::AclRecord;
use cotal_core::wire::shard::ShardMap;
use cotal_core::wire::token::{AgentId, Channel, Space};
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::rc::Rc;

/// The names agents get, in order.
pub const AGENT_NAMES: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];

/// A channel of the mesh and its delivery class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelSpec {
    /// The channel.
    pub channel: Channel,
    /// Durable class (else live).
    pub durable: bool,
    /// A join backfills history (`replay`, on by default; off writes `"replay":false`).
    pub replay: bool,
}

/// A fix of the core switched off from outside, to prove the oracle sees the bug it prevents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mutation {
    /// Nothing switched off.
    #[default]
    None,
    /// G1 off: agents send `durableJoin` without their watermark as `joinCursor`, as the
    /// reference does, so the daemon picks its own later frontier.
    NoJoinCursor,
    /// G2 off: the daemons' readers judge an entry by the record's current interval only
    /// (`DeliveryConfig::reference_gap_g2`), so a rejoin drops the pending entries of the
    /// previous generation.
    ReferenceG2,
    /// G10 off: the agents' leaves skip the tombstone as the reference does when its cached
    /// class reads `live` (`AgentConfig::reference_gap_g10`), so the membership stays open.
    ReferenceG10,
    /// G23 off: the daemons' leases keep no deadline of their own
    /// (`DeliveryConfig::reference_gap_g23`), so a daemon stalled past the lease TTL keeps
    /// writing the registry until a renew CAS fails, while its successor holds the lease.
    ReferenceG23,
    /// Issue 9 off: the daemons run no DLV revocation sweep
    /// (`DeliveryConfig::reference_no_dlv_sweep`), so copies transferred before an ACL narrowing
    /// stay in the member's DLV and are surfaced.
    NoDlvSweep,
    /// G17 off: the daemons resolve `@mention`s as the reference does
    /// (`DeliveryConfig::reference_gap_g17`): offline ghosts count, and a name the roster has
    /// not seen since the daemon started is unknown.
    ReferenceG17,
}

impl Mutation {
    /// Every mutation but [`Mutation::None`].
    pub const ALL: [Mutation; 6] = [
        Mutation::NoJoinCursor,
        Mutation::ReferenceG2,
        Mutation::ReferenceG10,
        Mutation::ReferenceG23,
        Mutation::NoDlvSweep,
        Mutation::ReferenceG17,
    ];

    /// Its name on the command line (`none` for [`Mutation::None`]).
    pub fn name(self) -> &'static str {
        match self {
            Mutation::None => "none",
            Mutation::NoJoinCursor => "no-join-cursor",
            Mutation::ReferenceG2 => "reference-g2",
            Mutation::ReferenceG10 => "reference-g10",
            Mutation::ReferenceG23 => "reference-g23",
            Mutation::NoDlvSweep => "no-dlv-sweep",
            Mutation::ReferenceG17 => "reference-g17",
        }
    }

    /// The mutation named `s` (see [`Mutation::name`]).
    pub fn parse(s: &str) -> Option<Mutation> {
        std::iter::once(Mutation::None)
            .chain(Mutation::ALL)
            .find(|m| m.name() == s)
    }
}

/// Everything a mesh run depends on besides its workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshConfig {
    /// The run seed.
    pub seed: u64,
    /// How many agents (at most [`AGENT_NAMES`]).
    pub agents: usize,
    /// The channels, with their classes.
    pub channels: Vec<ChannelSpec>,
    /// How many delivery daemons serve the space (0: live-only mesh, durable joins degrade).
    pub daemons: usize,
    /// Faults during the fault phase.
    pub faults: FaultConfig,
    /// Simulated time of the heal phase.
    pub heal: Duration,
    /// A fix switched off.
    pub mutation: Mutation,
    /// Keep transcript lines in memory (replay, the explorer's report).
    pub keep_transcript: bool,
}

impl MeshConfig {
    /// The default mesh of a seed: 2–4 agents (from the seed), channels `lobby` (live), `ops`
    /// and `review` (durable) and `secret` (durable, outside some agents' ACL), no daemons, no
    /// faults, 150 s of heal.
    pub fn new(seed: u64) -> Self {
        let mut rng = Rng::new(seed ^ 0x6d65_7368_0000_0001);
        MeshConfig {
            seed,
            agents: 2 + rng.below(3) as usize,
            channels: default_channels(),
            daemons: 0,
            faults: FaultConfig::default(),
            heal: Duration::from_secs(150),
            mutation: Mutation::None,
            keep_transcript: false,
        }
    }

    /// The same config with these faults.
    pub fn with_faults(self, faults: FaultConfig) -> Self {
        MeshConfig { faults, ..self }
    }
}

fn channel(name: &str) -> Channel {
    Channel::new(name).expect("a valid channel name")
}

/// `lobby` (live), `ops`, `review`, `secret` (durable).
pub fn default_channels() -> Vec<ChannelSpec> {
    vec![
        ChannelSpec {
            channel: channel("lobby"),
            durable: false,
            replay: true,
        },
        ChannelSpec {
            channel: channel("ops"),
            durable: true,
            replay: true,
        },
        ChannelSpec {
            channel: channel("review"),
            durable: true,
            replay: true,
        },
        ChannelSpec {
            channel: channel("secret"),
            durable: true,
            replay: true,
        },
    ]
}

/// One workload action. Agents and channels are indices into the mesh's lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// `Agent::join`.
    Join {
        /// Agent index.
        agent: usize,
        /// Channel index.
        channel: usize,
    },
    /// `Agent::leave`.
    Leave {
        /// Agent index.
        agent: usize,
        /// Channel index.
        channel: usize,
    },
    /// `Agent::send` of one text part, optionally mentioning another agent.
    Post {
        /// Agent index.
        agent: usize,
        /// Channel index.
        channel: usize,
        /// Mentioned agent index.
        mention: Option<usize>,
    },
    /// The provisioner removes a channel from the agent's read ACL: the ACL record is rewritten
    /// and the credential re-issued (a live subscription of it is refused).
    Narrow {
        /// Agent index.
        agent: usize,
        /// Channel index.
        channel: usize,
    },
    /// The agent's process dies and a fresh one with the same id starts.
    Restart {
        /// Agent index.
        agent: usize,
    },
    /// The agent's connection drops (it reconnects after the fault config's delay).
    Lose {
        /// Agent index.
        agent: usize,
    },
    /// Presence churn: the agent's process dies and a fresh one with the same id (and name)
    /// starts `ms` milliseconds later. Meanwhile its presence key stays until the bucket's TTL
    /// drops it (a gap longer than [`cotal_core::constants::PRESENCE_TTL`] takes it offline);
    /// the workload's steps for it are skipped while it is away.
    Away {
        /// Agent index.
        agent: usize,
        /// How long it stays away, in milliseconds.
        ms: u64,
    },
    /// A delivery daemon's process dies and a fresh one starts (it must win the lease again).
    RestartDaemon {
        /// Daemon index.
        daemon: usize,
    },
    /// A delivery daemon's connection drops (it reconnects after the fault config's delay).
    /// Scripted scenarios only: [`Workload::generate`] does not produce it.
    LoseDaemon {
        /// Daemon index.
        daemon: usize,
    },
    /// The daemon that holds the lease now (if any) stalls for `ms` milliseconds
    /// ([`Host::freeze`]): its in-flight commands complete while it sleeps, and it resumes with
    /// whatever it had in hands. Scripted scenarios only.
    FreezeHolder {
        /// How long, in milliseconds.
        ms: u64,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Join { agent, channel } => write!(f, "join a{agent} c{channel}"),
            Action::Leave { agent, channel } => write!(f, "leave a{agent} c{channel}"),
            Action::Post {
                agent,
                channel,
                mention,
            } => match mention {
                Some(m) => write!(f, "post a{agent} c{channel} @a{m}"),
                None => write!(f, "post a{agent} c{channel}"),
            },
            Action::Narrow { agent, channel } => write!(f, "narrow a{agent} c{channel}"),
            Action::Restart { agent } => write!(f, "restart a{agent}"),
            Action::Lose { agent } => write!(f, "lose a{agent}"),
            Action::Away { agent, ms } => write!(f, "away a{agent} {ms}ms"),
            Action::RestartDaemon { daemon } => write!(f, "restart-daemon d{daemon}"),
            Action::LoseDaemon { daemon } => write!(f, "lose-daemon d{daemon}"),
            Action::FreezeHolder { ms } => write!(f, "freeze-holder {ms}ms"),
        }
    }
}

/// One timed action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// When (simulated time since the start).
    pub at: Instant,
    /// What.
    pub action: Action,
}

/// A workload: boot channels per agent and timed actions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    /// Boot channels per agent (channel indices).
    pub boot: Vec<Vec<usize>>,
    /// Read ACL per agent at provisioning (channel indices).
    pub acl: Vec<Vec<usize>>,
    /// The actions, in time order.
    pub steps: Vec<Step>,
}

impl Workload {
    /// A workload from the seed: every agent's ACL covers every channel but `secret` for about
    /// half of them; boot channels are a random subset of the ACL; `steps` actions spaced
    /// 0–400 ms apart, mostly posts, with joins, leaves, rejoins, mentions, and rarer
    /// narrowings, restarts, presence churn (an agent away for 1–12 s, then back under the same
    /// name) and connection losses.
    pub fn generate(seed: u64, config: &MeshConfig, steps: usize) -> Self {
        let mut rng = Rng::new(seed ^ 0x776f_726b_0000_0002);
        let n = config.agents;
        let channels = config.channels.len();
        let mut acl = Vec::with_capacity(n);
        let mut boot = Vec::with_capacity(n);
        for _ in 0..n {
            let mut a: Vec<usize> = (0..channels).collect();
            if channels > 1 && rng.below(2) == 0 {
                a.pop();
            }
            let b: Vec<usize> = a.iter().copied().filter(|_| rng.below(3) == 0).collect();
            acl.push(a);
            boot.push(b);
        }
        let mut at = Instant::from_millis(200);
        let mut out = Vec::with_capacity(steps);
        for _ in 0..steps {
            at += Duration::from_millis(rng.below(401));
            let agent = rng.below(n as u64) as usize;
            let ch = rng.below(channels as u64) as usize;
            let roll = rng.below(100);
            let action = match roll {
                0..=44 => Action::Post {
                    agent,
                    channel: ch,
                    mention: (rng.below(4) == 0).then(|| rng.below(n as u64) as usize),
                },
                45..=67 => Action::Join { agent, channel: ch },
                68..=82 => Action::Leave { agent, channel: ch },
                83..=85 => Action::Lose { agent },
                86..=89 => Action::Restart { agent },
                90..=92 => Action::Away {
                    agent,
                    ms: 1_000 + rng.below(11_001),
                },
                93 if config.daemons > 0 => Action::RestartDaemon {
                    daemon: rng.below(config.daemons as u64) as usize,
                },
                93 => Action::Lose { agent },
                _ => Action::Narrow { agent, channel: ch },
            };
            out.push(Step { at, action });
        }
        Workload {
            boot,
            acl,
            steps: out,
        }
    }

    /// The end of the last step.
    pub fn last_at(&self) -> Instant {
        self.steps.last().map_or(Instant::ZERO, |s| s.at)
    }
}

// ---------------------------------------------------------------------------------------------
// The journal
// ---------------------------------------------------------------------------------------------

/// One message surfaced to an agent (taken with [`Agent::take_messages`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Surfacing {
    /// When.
    pub at: Instant,
    /// Agent index.
    pub agent: usize,
    /// The agent's life (0 first, +1 per restart).
    pub life: u32,
    /// The message id.
    pub id: String,
    /// The channel the copy came on (from the subject; a DLV copy's from its payload route).
    pub channel: Option<String>,
    /// The source of the first copy.
    pub origin: SourceKind,
    /// A historical (backfill) copy.
    pub historical: bool,
    /// `from.id` of the message.
    pub from: String,
    /// Whether it mentions the agent.
    pub mentions_me: bool,
}

/// An agent event, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Noted {
    /// When.
    pub at: Instant,
    /// Agent index.
    pub agent: usize,
    /// Life.
    pub life: u32,
    /// The event.
    pub event: AgentEvent,
}

/// What an application request asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Asked {
    /// A join of this channel.
    Join(String),
    /// A leave of this channel.
    Leave(String),
    /// A send of this message id to this channel.
    Send(String, String),
}

/// An application request the agent accepted (it owes exactly one answer event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requested {
    /// When.
    pub at: Instant,
    /// Agent index.
    pub agent: usize,
    /// Life.
    pub life: u32,
    /// The request id.
    pub request: RequestId,
    /// What.
    pub asked: Asked,
}

/// An operator or fault act the oracle needs to know about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Act {
    /// A channel left an agent's read ACL.
    Narrowed {
        /// When.
        at: Instant,
        /// Agent index.
        agent: usize,
        /// The channel.
        channel: String,
    },
    /// An agent's life ended (its process was killed).
    Killed {
        /// When.
        at: Instant,
        /// Agent index.
        agent: usize,
        /// The life that ended.
        life: u32,
    },
}

/// The ground-truth log of a run (what the mesh saw happen).
#[derive(Clone, Debug, Default)]
pub struct Journal {
    /// Every surfaced message.
    pub surfacings: Vec<Surfacing>,
    /// Every agent event.
    pub events: Vec<Noted>,
    /// Every accepted application request.
    pub requests: Vec<Requested>,
    /// Operator acts and process deaths.
    pub acts: Vec<Act>,
    /// Application calls refused at once (not ready, busy …): not requests.
    pub refused_calls: u64,
    /// `Agent::handled` calls the agent rejected (should be none).
    pub handled_rejected: Vec<(usize, u32, String)>,
    /// Every delivery daemon event.
    pub daemon_events: Vec<DaemonNoted>,
}

/// A delivery daemon event, typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonNoted {
    /// When.
    pub at: Instant,
    /// Daemon index.
    pub daemon: usize,
    /// The daemon's life.
    pub life: u32,
    /// The event.
    pub event: DeliveryEvent,
}

/// One delivery daemon process as the host runs it.
pub struct DaemonProc {
    daemon: Delivery,
    index: usize,
    life: u32,
    now: Instant,
    journal: Rc<RefCell<Journal>>,
}

impl DaemonProc {
    /// The daemon machine.
    pub fn daemon(&self) -> &Delivery {
        &self.daemon
    }
}

struct DaemonHandle(Rc<RefCell<DaemonProc>>);

impl HostedMachine for DaemonHandle {
    fn handle_input(&mut self, now: Now, input: Input) {
        let mut p = self.0.borrow_mut();
        p.now = now.at;
        p.daemon.handle_input(now, input);
    }

    fn handle_timeout(&mut self, now: Now) {
        let mut p = self.0.borrow_mut();
        p.now = now.at;
        p.daemon.handle_timeout(now);
    }

    fn poll_command(&mut self) -> Option<Command> {
        self.0.borrow_mut().daemon.poll_command()
    }

    fn poll_event_line(&mut self) -> Option<String> {
        let mut p = self.0.borrow_mut();
        let event = p.daemon.poll_event()?;
        let line = format!("{event:?}");
        let (daemon, life) = (p.index, p.life);
        let at = p.now;
        p.journal.borrow_mut().daemon_events.push(DaemonNoted {
            at,
            daemon,
            life,
            event,
        });
        Some(line)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.0.borrow().daemon.poll_timeout()
    }
}

/// One delivery daemon across its lives.
pub struct DaemonSlot {
    /// The current life.
    pub life: u32,
    /// The current process's client.
    pub client: ClientId,
    /// The current process.
    pub proc: Rc<RefCell<DaemonProc>>,
}

// ---------------------------------------------------------------------------------------------
// An agent process
// ---------------------------------------------------------------------------------------------

/// One agent process as the host runs it: the machine plus the application around it.
pub struct AgentProc {
    agent: Agent,
    index: usize,
    life: u32,
    now: Now,
    journal: Rc<RefCell<Journal>>,
    lines: VecDeque<String>,
    to_handle: BTreeMap<(Instant, u64), MessageId>,
    handle_seq: u64,
    handle_delay: (Duration, Duration),
    rng: Rng,
    mutation: Mutation,
}

impl AgentProc {
    /// The agent machine.
    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// Messages surfaced but not yet reported handled.
    pub fn unhandled(&self) -> usize {
        self.to_handle.len()
    }

    fn pump(&mut self) {
        while let Some(event) = self.agent.poll_event() {
            if matches!(event, AgentEvent::MessagesReady { .. }) {
                self.take();
            }
            let line = describe(&event);
            self.journal.borrow_mut().events.push(Noted {
                at: self.now.at,
                agent: self.index,
                life: self.life,
                event,
            });
            self.lines.push_back(line);
        }
    }

    fn take(&mut self) {
        let now = self.now;
        for m in self.agent.take_messages(now, usize::MAX) {
            self.journal.borrow_mut().surfacings.push(Surfacing {
                at: now.at,
                agent: self.index,
                life: self.life,
                id: m.id.as_str().to_owned(),
                channel: m.item.channel.as_ref().map(|c| c.as_str().to_owned()),
                origin: m.origin,
                historical: m.item.historical,
                from: m.item.message.from.id.as_str().to_owned(),
                mentions_me: m.item.mentions_me,
            });
            self.lines
                .push_back(format!("surfaced {} via {}", m.id.as_str(), m.origin));
            let (lo, hi) = self.handle_delay;
            let delay = self.rng.between(lo, hi);
            if delay == Duration::ZERO {
                self.handled(&m.id);
            } else {
                self.handle_seq += 1;
                self.to_handle
                    .insert((now.at + delay, self.handle_seq), m.id);
            }
        }
    }

    fn handled(&mut self, id: &MessageId) {
        if self.agent.handled(self.now, id).is_err() {
            self.journal.borrow_mut().handled_rejected.push((
                self.index,
                self.life,
                id.as_str().to_owned(),
            ));
        }
    }

    fn mutate(&self, cmd: Command) -> Command {
        match (self.mutation, cmd) {
            (
                Mutation::NoJoinCursor,
                Command::Request {
                    op,
                    subject,
                    reply,
                    payload,
                    timeout,
                },
            ) => {
                let payload = match json::decode::<ControlRequest>(&payload) {
                    Ok(mut req) if req.op == "durableJoin" => {
                        if let Some(args) = req.args.as_object_mut() {
                            args.remove("joinCursor");
                        }
                        json::encode(&req)
                    }
                    _ => payload,
                };
                Command::Request {
                    op,
                    subject,
                    reply,
                    payload,
                    timeout,
                }
            }
            (_, cmd) => cmd,
        }
    }
}

fn describe(event: &AgentEvent) -> String {
    format!("{event:?}")
}

/// The host's handle on a shared [`AgentProc`].
struct AgentHandle(Rc<RefCell<AgentProc>>);

impl HostedMachine for AgentHandle {
    fn handle_input(&mut self, now: Now, input: Input) {
        let mut p = self.0.borrow_mut();
        p.now = now;
        p.agent.handle_input(now, input);
        p.pump();
    }

    fn handle_timeout(&mut self, now: Now) {
        let mut p = self.0.borrow_mut();
        p.now = now;
        if p.agent.poll_timeout().is_some_and(|t| t <= now.at) {
            p.agent.handle_timeout(now);
        }
        while let Some(entry) = p.to_handle.first_entry() {
            if entry.key().0 > now.at {
                break;
            }
            let id = entry.remove();
            p.handled(&id);
        }
        p.pump();
    }

    fn poll_command(&mut self) -> Option<Command> {
        let mut p = self.0.borrow_mut();
        let cmd = p.agent.poll_command()?;
        Some(p.mutate(cmd))
    }

    fn poll_event_line(&mut self) -> Option<String> {
        let mut p = self.0.borrow_mut();
        p.pump();
        p.lines.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let p = self.0.borrow();
        let handle = p.to_handle.keys().next().map(|(at, _)| *at);
        match (p.agent.poll_timeout(), handle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// One agent of the mesh across its lives.
pub struct AgentSlot {
    /// Its id.
    pub id: AgentId,
    /// Its read ACL now (channel indices).
    pub acl: Vec<usize>,
    /// Its boot channels (channel indices).
    pub boot: Vec<usize>,
    /// The current life.
    pub life: u32,
    /// The current process's client.
    pub client: ClientId,
    /// The current process.
    pub proc: Rc<RefCell<AgentProc>>,
    acl_revision: u64,
    handle_delay: (Duration, Duration),
}

// ---------------------------------------------------------------------------------------------
// The mesh
// ---------------------------------------------------------------------------------------------

/// How a mesh run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunReport {
    /// The first violation, if any.
    pub violation: Option<Violation>,
    /// Host steps taken.
    pub host_steps: u64,
    /// CHAT messages stored.
    pub messages: u64,
    /// Messages surfaced (all agents, all lives).
    pub surfaced: u64,
    /// Transcript hash.
    pub hash: u64,
    /// Simulated time at the end.
    pub end: Instant,
    /// The host's coverage probes (faults fired, rare outcomes reached).
    pub probes: BTreeMap<&'static str, u64>,
}

/// The simulated mesh. See the module docs.
pub struct Mesh {
    config: MeshConfig,
    space: Space,
    host: Host,
    agents: Vec<AgentSlot>,
    daemons: Vec<DaemonSlot>,
    journal: Rc<RefCell<Journal>>,
    oracle: Oracle,
    workload: Workload,
    host_steps: u64,
    posts: u64,
    /// Agents away ([`Action::Away`]) and when they come back, in workload order.
    returns: Vec<(Instant, usize)>,
}

impl Mesh {
    /// Provisions the space and starts the agents of `workload` (see the module docs).
    pub fn new(config: MeshConfig, workload: Workload) -> Self {
        let space = Space::new("main").expect("a valid space");
        let fault_end = workload.last_at() + Duration::from_secs(1);
        let sim = SimConfig::new(config.seed).with_faults(config.faults.clone(), fault_end);
        let mut host = Host::new(sim, config.keep_transcript);
        host.broker_mut()
            .provision(&SpaceConfig::new(&space))
            .expect("a fresh broker provisions");
        // Cotal's loss records, which `cotal up` creates after the reference's five buckets.
        host.broker_mut()
            .add_kv_bucket(&KvBucketSpec::for_space(&space, KvBucket::Losses))
            .expect("a fresh broker provisions");
        let channels_bucket = KvBucket::Channels.name(&space);
        for spec in &config.channels {
            let class = if spec.durable { "durable" } else { "live" };
            let value = if spec.replay {
                format!("{{\"deliveryClass\":\"{class}\"}}")
            } else {
                format!("{{\"deliveryClass\":\"{class}\",\"replay\":false}}")
            };
            host.broker_mut()
                .kv_put(
                    &channels_bucket,
                    spec.channel.as_str(),
                    Bytes::from(value),
                    cotal_core::io::KvCondition::Any,
                )
                .expect("the channels bucket exists");
        }
        let journal = Rc::new(RefCell::new(Journal::default()));
        let oracle = Oracle::new(&config, &space);
        let mut mesh = Mesh {
            config,
            space,
            host,
            agents: Vec::new(),
            daemons: Vec::new(),
            journal,
            oracle,
            workload,
            host_steps: 0,
            posts: 0,
            returns: Vec::new(),
        };
        for d in 0..mesh.config.daemons {
            let proc = mesh.new_daemon(d, 0);
            let client = mesh.start_daemon(d, 0, &proc);
            mesh.daemons.push(DaemonSlot {
                life: 0,
                client,
                proc,
            });
        }
        let mut rng = Rng::new(mesh.config.seed ^ 0x6167_656e_0000_0003);
        let n = mesh.config.agents.min(AGENT_NAMES.len());
        for (i, name) in AGENT_NAMES.iter().enumerate().take(n) {
            let id = AgentId::new(*name).expect("a valid agent id");
            let acl = mesh.workload.acl.get(i).cloned().unwrap_or_default();
            let boot = mesh.workload.boot.get(i).cloned().unwrap_or_default();
            let consumer = ConsumerSpec::dlv(&mesh.space, &id);
            mesh.host
                .broker_mut()
                .add_consumer(consumer)
                .expect("one DLV consumer per agent");
            let handle_delay = match rng.below(3) {
                0 => (Duration::ZERO, Duration::ZERO),
                1 => (Duration::from_millis(1), Duration::from_millis(200)),
                _ => (Duration::ZERO, Duration::from_millis(3_000)),
            };
            let slot = AgentSlot {
                id,
                acl,
                boot,
                life: 0,
                client: ClientId(0),
                proc: mesh.new_proc(i, 0, &[], handle_delay),
                acl_revision: 0,
                handle_delay,
            };
            mesh.agents.push(slot);
            mesh.write_acl(i, false);
            mesh.start_life(i);
        }
        mesh
    }

    fn daemon_id(index: usize, life: u32) -> String {
        format!("dmn{index}-{life}")
    }

    fn new_daemon(&self, index: usize, life: u32) -> Rc<RefCell<DaemonProc>> {
        let shard = ShardMap::SINGLE.shard(0).expect("shard 0 of 1 exists");
        let mut config =
            DeliveryConfig::new(self.space.clone(), shard, Self::daemon_id(index, life));
        config.reference_gap_g2 = self.config.mutation == Mutation::ReferenceG2;
        config.reference_gap_g23 = self.config.mutation == Mutation::ReferenceG23;
        config.reference_no_dlv_sweep = self.config.mutation == Mutation::NoDlvSweep;
        config.reference_gap_g17 = self.config.mutation == Mutation::ReferenceG17;
        Rc::new(RefCell::new(DaemonProc {
            daemon: Delivery::new(config),
            index,
            life,
            now: self.host.now().at,
            journal: Rc::clone(&self.journal),
        }))
    }

    fn start_daemon(
        &mut self,
        index: usize,
        life: u32,
        proc: &Rc<RefCell<DaemonProc>>,
    ) -> ClientId {
        let id = AgentId::new(Self::daemon_id(index, life)).expect("a valid daemon id");
        let perms = Permissions::delivery(&self.space, &id);
        self.host.add_machine(
            Self::daemon_id(index, life),
            perms,
            Box::new(DaemonHandle(Rc::clone(proc))),
        )
    }

    fn agent_config(&self, index: usize, life: u32, boot: &[usize]) -> AgentConfig {
        let id = AgentId::new(AGENT_NAMES[index]).expect("a valid agent id");
        let me = Sender::new(id, AGENT_NAMES[index]);
        let channels = boot
            .iter()
            .map(|c| self.config.channels[*c].channel.clone())
            .collect();
        let seed = self
            .config
            .seed
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add((index as u64) << 32 | u64::from(life));
        let mut config = AgentConfig::new(self.space.clone(), me, channels, seed);
        // Presence (the daemon's mention roster) as deployed: at connect and every
        // DEFAULT_HEARTBEAT (2 s), inside the presence bucket's PRESENCE_TTL (6 s).
        config.heartbeat = Some(DEFAULT_HEARTBEAT);
        config.reference_gap_g10 = self.config.mutation == Mutation::ReferenceG10;
        config
    }

    fn new_proc(
        &self,
        index: usize,
        life: u32,
        boot: &[usize],
        handle_delay: (Duration, Duration),
    ) -> Rc<RefCell<AgentProc>> {
        let config = self.agent_config(index, life, boot);
        let rng_seed = config.seed ^ 0x6861_6e64_0000_0004;
        let agent = Agent::new(config).expect("the default ledger config is valid");
        Rc::new(RefCell::new(AgentProc {
            agent,
            index,
            life,
            now: self.host.now(),
            journal: Rc::clone(&self.journal),
            lines: VecDeque::new(),
            to_handle: BTreeMap::new(),
            handle_seq: 0,
            handle_delay,
            rng: Rng::new(rng_seed),
            mutation: self.config.mutation,
        }))
    }

    fn permissions(&self, index: usize) -> Permissions {
        let slot = &self.agents[index];
        let all: Vec<Channel> = self
            .config
            .channels
            .iter()
            .map(|c| c.channel.clone())
            .collect();
        Permissions::agent(
            &self.space,
            &AgentPolicy {
                id: slot.id.clone(),
                allow_subscribe: slot
                    .acl
                    .iter()
                    .map(|c| self.config.channels[*c].channel.clone())
                    .collect(),
                allow_publish: all,
                role: None,
                spawn: false,
            },
        )
    }

    /// Writes the agent's ACL record (the provisioner's `commitAcl`).
    fn write_acl(&mut self, index: usize, through_server: bool) {
        let slot = &mut self.agents[index];
        slot.acl_revision += 1;
        let record = AclRecord {
            allow_subscribe: slot
                .acl
                .iter()
                .map(|c| self.config.channels[*c].channel.as_str().to_owned())
                .collect(),
            revision: slot.acl_revision,
            updated_at: self.host.now().wall,
            extra: Default::default(),
        };
        let bucket = KvBucket::Acl.name(&self.space);
        let key = acl_key(&slot.id);
        let value = json::encode(&record);
        if through_server {
            let _ = self.host.operator_kv_put(&bucket, &key, value);
        } else {
            let _ = self.host.broker_mut().kv_put(
                &bucket,
                &key,
                value,
                cotal_core::io::KvCondition::Any,
            );
        }
    }

    fn start_life(&mut self, index: usize) {
        let life = self.agents[index].life;
        let boot = self.agents[index].boot.clone();
        let delay = self.agents[index].handle_delay;
        let proc = self.new_proc(index, life, &boot, delay);
        let perms = self.permissions(index);
        let name = if life == 0 {
            AGENT_NAMES[index].to_owned()
        } else {
            format!("{}#{life}", AGENT_NAMES[index])
        };
        let client = self
            .host
            .add_machine(name, perms, Box::new(AgentHandle(Rc::clone(&proc))));
        let slot = &mut self.agents[index];
        slot.proc = proc;
        slot.client = client;
    }

    /// The config.
    pub fn config(&self) -> &MeshConfig {
        &self.config
    }

    /// The space.
    pub fn space(&self) -> &Space {
        &self.space
    }

    /// The host.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// The agents.
    pub fn agents(&self) -> &[AgentSlot] {
        &self.agents
    }

    /// The delivery daemons.
    pub fn daemons(&self) -> &[DaemonSlot] {
        &self.daemons
    }

    /// The journal.
    pub fn journal(&self) -> std::cell::Ref<'_, Journal> {
        self.journal.borrow()
    }

    /// The workload.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    fn note_request(&mut self, index: usize, request: RequestId, asked: Asked) {
        let at = self.host.now().at;
        let life = self.agents[index].life;
        self.journal.borrow_mut().requests.push(Requested {
            at,
            agent: index,
            life,
            request,
            asked,
        });
    }

    fn note_refused(&mut self, _e: AgentError) {
        self.journal.borrow_mut().refused_calls += 1;
    }

    /// Applies one action now.
    pub fn apply(&mut self, action: &Action) {
        let now = self.host.now();
        self.host.note(format!("workload {action}"));
        // An away agent has no process: the application's steps for it wait for nobody.
        let target = match *action {
            Action::Join { agent, .. }
            | Action::Leave { agent, .. }
            | Action::Post { agent, .. }
            | Action::Restart { agent }
            | Action::Lose { agent }
            | Action::Away { agent, .. } => Some(agent),
            _ => None,
        };
        if target.is_some_and(|a| self.returns.iter().any(|(_, r)| *r == a)) {
            return;
        }
        match *action {
            Action::Join { agent, channel } => {
                let Some(slot) = self.agents.get(agent) else {
                    return;
                };
                let ch = self.config.channels[channel].channel.clone();
                let result = {
                    let mut p = slot.proc.borrow_mut();
                    p.now = now;
                    p.agent.join(now, ch.clone())
                };
                match result {
                    Ok(r) => self.note_request(agent, r, Asked::Join(ch.as_str().to_owned())),
                    Err(e) => self.note_refused(e),
                }
                self.host.drain_client(self.agents[agent].client);
            }
            Action::Leave { agent, channel } => {
                let Some(slot) = self.agents.get(agent) else {
                    return;
                };
                let ch = self.config.channels[channel].channel.clone();
                let result = {
                    let mut p = slot.proc.borrow_mut();
                    p.now = now;
                    p.agent.leave(now, &ch)
                };
                match result {
                    Ok(r) => self.note_request(agent, r, Asked::Leave(ch.as_str().to_owned())),
                    Err(e) => self.note_refused(e),
                }
                self.host.drain_client(self.agents[agent].client);
            }
            Action::Post {
                agent,
                channel,
                mention,
            } => {
                let Some(slot) = self.agents.get(agent) else {
                    return;
                };
                let ch = self.config.channels[channel].channel.clone();
                let mentions: Vec<String> = mention
                    .filter(|m| *m < self.agents.len())
                    .map(|m| AGENT_NAMES[m].to_owned())
                    .into_iter()
                    .collect();
                self.posts += 1;
                let text = format!(
                    "{} post {} on {}",
                    AGENT_NAMES[agent],
                    self.posts,
                    ch.as_str()
                );
                let result = {
                    let mut p = slot.proc.borrow_mut();
                    p.now = now;
                    p.agent.send(now, &ch, vec![Part::text(text)], &mentions)
                };
                match result {
                    Ok((r, id)) => {
                        self.note_request(agent, r, Asked::Send(ch.as_str().to_owned(), id));
                    }
                    Err(e) => self.note_refused(e),
                }
                self.host.drain_client(self.agents[agent].client);
            }
            Action::Narrow { agent, channel } => {
                let Some(slot) = self.agents.get_mut(agent) else {
                    return;
                };
                if !slot.acl.contains(&channel) {
                    return;
                }
                slot.acl.retain(|c| *c != channel);
                let name = self.config.channels[channel].channel.as_str().to_owned();
                self.journal.borrow_mut().acts.push(Act::Narrowed {
                    at: now.at,
                    agent,
                    channel: name,
                });
                self.write_acl(agent, true);
                let perms = self.permissions(agent);
                let client = self.agents[agent].client;
                self.host.set_permissions(client, perms);
            }
            Action::Restart { agent } => {
                let Some(slot) = self.agents.get_mut(agent) else {
                    return;
                };
                let (client, life) = (slot.client, slot.life);
                slot.life += 1;
                self.journal.borrow_mut().acts.push(Act::Killed {
                    at: now.at,
                    agent,
                    life,
                });
                self.host.kill(client);
                self.start_life(agent);
            }
            Action::Lose { agent } => {
                if let Some(slot) = self.agents.get(agent) {
                    let client = slot.client;
                    self.host.lose(client);
                }
            }
            Action::Away { agent, ms } => {
                let Some(slot) = self.agents.get_mut(agent) else {
                    return;
                };
                let (client, life) = (slot.client, slot.life);
                slot.life += 1;
                self.journal.borrow_mut().acts.push(Act::Killed {
                    at: now.at,
                    agent,
                    life,
                });
                self.host.kill(client);
                self.returns
                    .push((now.at + Duration::from_millis(ms), agent));
            }
            Action::RestartDaemon { daemon } => self.restart_daemon(daemon),
            Action::FreezeHolder { ms } => {
                let holder = self.daemons.iter().find(|d| {
                    matches!(
                        d.proc.borrow().daemon().lease_state(),
                        LeaseState::Held | LeaseState::Ready
                    )
                });
                if let Some(client) = holder.map(|d| d.client) {
                    self.host.freeze(client, Duration::from_millis(ms));
                }
            }
            Action::LoseDaemon { daemon } => {
                if let Some(slot) = self.daemons.get(daemon) {
                    let client = slot.client;
                    self.host.lose(client);
                }
            }
        }
    }

    fn restart_daemon(&mut self, daemon: usize) {
        let Some(slot) = self.daemons.get(daemon) else {
            return;
        };
        let (client, life) = (slot.client, slot.life + 1);
        self.host.kill(client);
        let proc = self.new_daemon(daemon, life);
        let client = self.start_daemon(daemon, life, &proc);
        self.daemons[daemon] = DaemonSlot { life, client, proc };
    }

    /// The supervisor of the daemons (systemd's `Restart=always`): a daemon that stopped (lost
    /// its lease, or failed to acquire it within its window) is replaced by a fresh process.
    fn supervise(&mut self) {
        for d in 0..self.daemons.len() {
            let stopped = matches!(
                self.daemons[d].proc.borrow().daemon().health(),
                DeliveryHealth::Degraded(reasons) if reasons.contains(&DegradedReason::Stopped)
            );
            if stopped {
                self.host.note(format!("supervisor restarts d{d}"));
                self.restart_daemon(d);
            }
        }
    }

    /// Runs the host until `until`, checking the oracle after every step.
    ///
    /// # Errors
    ///
    /// The first violation.
    pub fn run_until(&mut self, until: Instant) -> Result<(), Violation> {
        while self.host.step(until) {
            self.host_steps += 1;
            if self.host_steps > self.host.max_steps {
                return Err(self.oracle.violation(
                    "R29",
                    None,
                    None,
                    self.host.now().at,
                    format!(
                        "step budget of {} exhausted (livelock)",
                        self.host.max_steps
                    ),
                ));
            }
            {
                let journal = self.journal.borrow();
                self.oracle.check_step(&self.host, &journal, &self.agents)?;
            }
            self.supervise();
        }
        self.host.run_until(until);
        Ok(())
    }

    /// Plays the workload, heals, and runs the final checks.
    pub fn run(&mut self) -> RunReport {
        let result = self.run_inner();
        let journal = self.journal.borrow();
        RunReport {
            violation: result.err(),
            host_steps: self.host_steps,
            messages: self.oracle.chat_messages(),
            surfaced: journal.surfacings.len() as u64,
            hash: self.host.transcript().hash(),
            end: self.host.now().at,
            probes: self.host.probes().clone(),
        }
    }

    /// Starts the fresh life of every away agent due back by `until`, each at its time.
    fn come_back_until(&mut self, until: Instant) -> Result<(), Violation> {
        while let Some(i) = self
            .returns
            .iter()
            .enumerate()
            .filter(|(_, (at, _))| *at <= until)
            .min_by_key(|(i, (at, _))| (*at, *i))
            .map(|(i, _)| i)
        {
            let (at, agent) = self.returns.remove(i);
            self.run_until(at)?;
            self.host.note(format!("workload back a{agent}"));
            self.start_life(agent);
            let journal = self.journal.borrow();
            self.oracle.check_step(&self.host, &journal, &self.agents)?;
        }
        Ok(())
    }

    fn run_inner(&mut self) -> Result<(), Violation> {
        let steps = self.workload.steps.clone();
        for step in &steps {
            self.come_back_until(step.at)?;
            self.run_until(step.at)?;
            self.apply(&step.action);
            let journal = self.journal.borrow();
            self.oracle.check_step(&self.host, &journal, &self.agents)?;
        }
        let end = self.workload.last_at() + Duration::from_secs(1) + self.config.heal;
        self.come_back_until(end)?;
        self.run_until(end)?;
        let journal = self.journal.borrow();
        self.oracle.finish(&self.host, &journal, &self.agents)
    }
}
