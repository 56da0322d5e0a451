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
//! application: every
//! [`AgentEvent::MessagesReady`](cotal_core::agent::AgentEvent::MessagesReady) is answered at
//! once with [`Agent::take_messages`], each surfaced message is recorded in the [`Journal`]
//! (agent, life, id, channel, source, time) and reported [`Agent::handled`] after the agent's
//! handling delay (seeded; zero for some agents). A *life* is one process: a restart kills the
//! client (its connection is gone for good) and starts a fresh [`Agent`] with the same id, the
//! same boot channels and a new client: its ledger is lost, its memberships and DLV consumer are
//! not.
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

use crate::host::Host;
use crate::net::ClientId;
use crate::oracle::{Oracle, Violation};
use crate::sched::{Rng, SimConfig};
use bytes::Bytes;
use cotal_core::agent::{Agent, AgentConfig, AgentError, RequestId};
use cotal_core::constants::DEFAULT_HEARTBEAT;
use cotal_core::delivery::daemon::{
    DegradedReason, Delivery, DeliveryConfig, DeliveryCounters, DeliveryHealth,
};
use cotal_core::delivery::lease::LeaseState;
use cotal_core::time::{Duration, Instant};
use cotal_core::wire::config::{ConsumerSpec, KvBucketSpec};
use cotal_core::wire::json;
use cotal_core::wire::keys::{KvBucket, acl_key};
use cotal_core::wire::message::{Part, Sender};
use cotal_core::wire::permissions::{AgentPolicy, Permissions};
use cotal_core::wire::records::AclRecord;
use cotal_core::wire::shard::ShardMap;
use cotal_core::wire::token::{AgentId, Channel, Space};
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;

// Defined in `world` (read by the oracle too), re-exported here.
pub use crate::world::{
    AGENT_NAMES, Act, Action, AgentProc, AgentSlot, Asked, ChannelSpec, DaemonNoted, DaemonProc,
    DaemonSlot, Journal, MeshConfig, Mutation, Noted, Requested, Step, Surfacing, Workload,
    default_channels,
};
use crate::world::{AgentHandle, DaemonHandle};

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
    /// The counters of daemon lives that ended (restarted or replaced).
    retired: DeliveryCounters,
}

impl Mesh {
    /// Provisions the space and starts the agents of `workload` (see the module docs).
    pub fn new(config: MeshConfig, workload: Workload) -> Self {
        let space = Space::new("main").expect("a valid space");
        let fault_end = workload.last_at() + Duration::from_secs(1);
        let sim = SimConfig::new(config.seed).with_faults(config.faults.clone(), fault_end);
        let mut host = Host::new(sim, config.keep_transcript);
        host.broker_mut()
            .provision(&cotal_core::wire::capacity::ConsumerBudget::default().space_config(&space))
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
            retired: DeliveryCounters::default(),
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
        // The reference reads nothing back: its reader meets a stranded entry at the redelivery.
        config.read_back_stranded = self.config.mutation != Mutation::ReferenceG2;
        config.lease_ttl_from_bucket = self.config.lease_ttl_from_bucket;
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
                if let Some(client) = self.lease_holder() {
                    self.host.freeze(client, Duration::from_millis(ms));
                }
            }
            Action::CutHolder { ms } => {
                if let Some(client) = self.lease_holder() {
                    self.host.lose_for(client, Duration::from_millis(ms));
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

    /// The client of the daemon that holds the lease now, if any.
    fn lease_holder(&self) -> Option<ClientId> {
        self.daemons
            .iter()
            .find(|d| {
                matches!(
                    d.proc.borrow().daemon().lease_state(),
                    LeaseState::Held | LeaseState::Ready
                )
            })
            .map(|d| d.client)
    }

    fn restart_daemon(&mut self, daemon: usize) {
        let Some(slot) = self.daemons.get(daemon) else {
            return;
        };
        let (client, life) = (slot.client, slot.life + 1);
        self.retired.add(slot.proc.borrow().daemon().counters());
        self.journal.borrow_mut().acts.push(Act::DaemonRestarted {
            at: self.host.now().at,
        });
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
            probes: self.probes(),
        }
    }

    /// The host's probes, and the daemons' paths of every copy: `daemon.direct` (fan-out wrote
    /// it straight to DLV), `daemon.via-reader` (the reader transferred a dinbox entry),
    /// `daemon.dinbox` (dinbox entries written: spilled, caught up), `daemon.read-back` (CHAT
    /// messages read back because the fan-out consumer had offered them to a feed that is gone),
    /// and `oracle.revoke-window` (narrowings whose `ACL-revoke-window` the oracle checked).
    fn probes(&self) -> BTreeMap<&'static str, u64> {
        let mut probes = self.host.probes().clone();
        let mut c = self.retired.clone();
        for d in &self.daemons {
            c.add(d.proc.borrow().daemon().counters());
        }
        for (name, n) in [
            ("daemon.direct", c.transferred_direct),
            ("daemon.via-reader", c.transferred - c.transferred_direct),
            (
                "daemon.dinbox",
                c.copies_written.saturating_sub(c.transferred_direct),
            ),
            ("daemon.read-back", c.stranded_read_back),
            ("oracle.revoke-window", self.oracle.revoke_windows_checked()),
        ] {
            if n > 0 {
                probes.insert(name, n);
            }
        }
        probes
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
