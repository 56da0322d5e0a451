//! What a simulated mesh is made of, apart from its run loop: the config ([`MeshConfig`],
//! [`Mutation`]), the workload ([`Workload`], [`Action`]), the ground-truth [`Journal`], and the
//! agent and daemon processes the host runs ([`AgentSlot`], [`DaemonSlot`]).
//!
//! The [`crate::oracle`] reads these; the run loop in [`crate::mesh`] (which owns the oracle)
//! builds and drives them. Keeping them here lets both import this module and neither the other.
//! Every public item is re-exported from [`crate::mesh`], where it was defined before.

use crate::host::HostedMachine;
use crate::net::ClientId;
use crate::sched::{FaultConfig, Rng};
use cotal_core::agent::{Agent, AgentEvent, RequestId};
use cotal_core::delivery::daemon::{Delivery, DeliveryEvent};
use cotal_core::io::{Command, Input, Machine};
use cotal_core::ledger::{MessageId, SourceKind};
use cotal_core::time::{Duration, Instant, Now};
use cotal_core::wire::control::ControlRequest;
use cotal_core::wire::json;
use cotal_core::wire::token::{AgentId, Channel};
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
    /// previous generation. Like the reference, they read nothing back
    /// (`DeliveryConfig::read_back_stranded` off): a stranded entry meets the reader only at its
    /// redelivery, after the rejoin.
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
    /// The daemons read the lease bucket's TTL before each acquisition
    /// (`DeliveryConfig::lease_ttl_from_bucket`, default true). `false` replays a seed found
    /// before they did: one round trip fewer at boot, so every later step where it was.
    pub lease_ttl_from_bucket: bool,
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
            lease_ttl_from_bucket: true,
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
    /// The daemon that holds the lease now (if any) is cut off the broker for `ms` milliseconds
    /// (an outage; its process lives on and reconnects after it). Longer than the lease window,
    /// it loses the lease and must ride that out in process (issue 19). Scripted scenarios only.
    CutHolder {
        /// How long, in milliseconds.
        ms: u64,
    },
    /// The daemon that holds the lease now (if any) stalls for `ms` milliseconds
    /// ([`Host::freeze`](crate::host::Host::freeze)): its in-flight commands complete while it
    /// sleeps, and it resumes with whatever it had in hands. Scripted scenarios only.
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
            Action::CutHolder { ms } => write!(f, "cut-holder {ms}ms"),
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
    /// A delivery daemon's process was killed and a fresh one started.
    DaemonRestarted {
        /// When.
        at: Instant,
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
    pub(crate) daemon: Delivery,
    pub(crate) index: usize,
    pub(crate) life: u32,
    pub(crate) now: Instant,
    pub(crate) journal: Rc<RefCell<Journal>>,
}

impl DaemonProc {
    /// The daemon machine.
    pub fn daemon(&self) -> &Delivery {
        &self.daemon
    }
}

pub(crate) struct DaemonHandle(pub(crate) Rc<RefCell<DaemonProc>>);

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
    pub(crate) agent: Agent,
    pub(crate) index: usize,
    pub(crate) life: u32,
    pub(crate) now: Now,
    pub(crate) journal: Rc<RefCell<Journal>>,
    pub(crate) lines: VecDeque<String>,
    pub(crate) to_handle: BTreeMap<(Instant, u64), MessageId>,
    pub(crate) handle_seq: u64,
    pub(crate) handle_delay: (Duration, Duration),
    pub(crate) rng: Rng,
    pub(crate) mutation: Mutation,
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

    pub(crate) fn pump(&mut self) {
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

    pub(crate) fn take(&mut self) {
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

    pub(crate) fn handled(&mut self, id: &MessageId) {
        if self.agent.handled(self.now, id).is_err() {
            self.journal.borrow_mut().handled_rejected.push((
                self.index,
                self.life,
                id.as_str().to_owned(),
            ));
        }
    }

    pub(crate) fn mutate(&self, cmd: Command) -> Command {
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
pub(crate) struct AgentHandle(pub(crate) Rc<RefCell<AgentProc>>);

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
    pub(crate) acl_revision: u64,
    pub(crate) handle_delay: (Duration, Duration),
}
