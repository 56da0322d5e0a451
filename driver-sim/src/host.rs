//! The generic host: runs any number of [`Machine`]s on the simulated server, one client each.
//!
//! Each step the host finds the earliest instant something is due (a scheduled event, a machine's
//! [`Machine::poll_timeout`], the server's own [`Net::next_wake`]), moves the clock there, and
//! lets the [`Chooser`] pick one of the things due then:
//!
//! - a command arriving at the server ([`Net::execute`], with the faults drawn for it);
//! - an input arriving at a client ([`Net::accept`], then [`Machine::handle_input`]);
//! - a machine's deadline ([`Machine::handle_timeout`]);
//! - the server's wake-up (request timeouts, redeliveries);
//! - a scheduled fault (connection loss, reconnect, the end of a freeze).
//!
//! A machine can be **frozen** ([`Host::freeze`]): a stalled process (a GC pause, a stopped VM).
//! While frozen it gets no inputs and no timeouts; what reaches it is held in order, and the
//! commands it sent before the freeze still execute at the server. At the thaw the held inputs
//! are put back on its down lane, ahead of anything queued behind them, and its overdue
//! timeouts fire.
//!
//! After a machine ran, every command it emits is handed to [`Net::client_send`] and travels up
//! with latency; every input the server produces travels down with latency (core drops and slow
//! consumers applied in the fault phase). Every step writes transcript lines (simulated time
//! only, no real time, no hash-ordered output), and a 64-bit FNV-1a hash of all lines is the
//! determinism check: the same seed, config and machines give the same hash.
//!
//! Machines with different event types coexist through [`HostedMachine`]: wrap a machine with
//! [`hosted`] and a closure that turns each of its events into a line.

use crate::broker::Broker;
use crate::net::{ClientId, ExecFaults, Net, OutKind, Outgoing};
use crate::sched::{Chooser, Clock, Lane, Queue, SimConfig};
use cotal_core::io::{Command, Inbound, Input, KvCondition, Machine, Reply};
use cotal_core::op::{Failure, Outcome};
use cotal_core::time::{Instant, Now};
use cotal_core::wire::permissions::Permissions;
use std::collections::BTreeMap;

/// A machine as the host drives it: [`Machine`] with its events already turned into text.
pub trait HostedMachine {
    /// [`Machine::handle_input`].
    fn handle_input(&mut self, now: Now, input: Input);
    /// [`Machine::handle_timeout`].
    fn handle_timeout(&mut self, now: Now);
    /// [`Machine::poll_command`].
    fn poll_command(&mut self) -> Option<Command>;
    /// [`Machine::poll_event`], described.
    fn poll_event_line(&mut self) -> Option<String>;
    /// [`Machine::poll_timeout`].
    fn poll_timeout(&self) -> Option<Instant>;
}

/// A [`Machine`] with a closure describing its events.
pub struct Hosted<M, F> {
    machine: M,
    describe: F,
}

impl<M, F> HostedMachine for Hosted<M, F>
where
    M: Machine,
    F: FnMut(M::Event) -> String,
{
    fn handle_input(&mut self, now: Now, input: Input) {
        self.machine.handle_input(now, input);
    }
    fn handle_timeout(&mut self, now: Now) {
        self.machine.handle_timeout(now);
    }
    fn poll_command(&mut self) -> Option<Command> {
        self.machine.poll_command()
    }
    fn poll_event_line(&mut self) -> Option<String> {
        self.machine.poll_event().map(&mut self.describe)
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.machine.poll_timeout()
    }
}

/// Wraps a machine for the host; `describe` turns each event into a transcript line.
pub fn hosted<M, F>(machine: M, describe: F) -> Box<dyn HostedMachine>
where
    M: Machine + 'static,
    F: FnMut(M::Event) -> String + 'static,
{
    Box::new(Hosted { machine, describe })
}

/// An application event a machine emitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// When.
    pub at: Instant,
    /// Which machine.
    pub machine: String,
    /// The event, described.
    pub event: String,
}

/// The transcript of a run: its lines (optionally kept) and their rolling hash.
#[derive(Clone, Debug)]
pub struct Transcript {
    keep: bool,
    lines: Vec<String>,
    hash: u64,
    count: u64,
}

impl Transcript {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;

    fn new(keep: bool) -> Self {
        Transcript {
            keep,
            lines: Vec::new(),
            hash: Self::OFFSET,
            count: 0,
        }
    }

    fn record(&mut self, line: String) {
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(Self::PRIME);
        }
        self.count += 1;
        if self.keep {
            self.lines.push(line);
        }
    }

    /// The FNV-1a hash of every line so far.
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// The kept lines (empty when the host was told not to keep them).
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// How many lines were recorded.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// True before the first line.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

#[derive(Clone, Debug)]
enum SimEvent {
    Up {
        client: ClientId,
        epoch: u64,
        cmd: Command,
    },
    Down(Outgoing),
    Lose(ClientId),
    Restore(ClientId),
    Thaw(ClientId),
}

struct Node {
    name: String,
    client: ClientId,
    machine: Box<dyn HostedMachine>,
}

enum Due {
    Queued((Instant, u64)),
    Timeout(usize),
    Wake,
}

/// How a [`Host::run_until`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunStats {
    /// Steps taken.
    pub steps: u64,
    /// True when the step budget ran out before the deadline (a livelock or a busy machine).
    pub exhausted: bool,
}

/// The simulator host. See the module docs.
pub struct Host {
    config: SimConfig,
    clock: Clock,
    chooser: Chooser,
    queue: Queue<SimEvent>,
    net: Net,
    nodes: Vec<Node>,
    transcript: Transcript,
    events: Vec<EventRecord>,
    probes: BTreeMap<&'static str, u64>,
    dead: Vec<ClientId>,
    frozen: BTreeMap<ClientId, Vec<Outgoing>>,
    /// Step budget per [`Host::run_until`] call.
    pub max_steps: u64,
}

impl Host {
    /// A host with an empty server. `keep_lines` keeps transcript lines in memory (tests,
    /// replays); the hash is always kept.
    pub fn new(config: SimConfig, keep_lines: bool) -> Self {
        let clock = Clock::new(config.wall_epoch);
        let broker = Broker::new(clock.now());
        let mut host = Host {
            chooser: Chooser::new(config.seed),
            config,
            clock,
            queue: Queue::new(),
            net: Net::new(broker),
            nodes: Vec::new(),
            transcript: Transcript::new(keep_lines),
            events: Vec::new(),
            probes: BTreeMap::new(),
            dead: Vec::new(),
            frozen: BTreeMap::new(),
            max_steps: 1_000_000,
        };
        let line = format!("seed={} config={:?}", host.config.seed, host.config);
        host.transcript.record(line);
        host
    }

    /// The server's broker, for setting up streams, buckets and consumers.
    pub fn broker_mut(&mut self) -> &mut Broker {
        self.net.broker_mut()
    }

    /// The server's broker.
    pub fn broker(&self) -> &Broker {
        self.net.broker()
    }

    /// The connection layer.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// Now.
    pub fn now(&self) -> Now {
        self.clock.now()
    }

    /// The transcript.
    pub fn transcript(&self) -> &Transcript {
        &self.transcript
    }

    /// Coverage probes (design rule R30): how often each fault fired and each "sometimes"
    /// outcome reached a machine. Keys: `fault.core-drop`, `fault.slow-consumer`,
    /// `fault.connection-loss`, `fault.inflight-reached`, `fault.inflight-lost`,
    /// `fault.kv-conflict`, `fault.ambiguous`, `fault.freeze`; `in.refused`, `in.redelivery`,
    /// `in.consumer-ended`, `in.duplicate-ack`, `in.unknown`, `in.no-responders`,
    /// `in.wrong-last-revision`, `in.already-exists`, `in.permission-denied`, `in.not-found`.
    pub fn probes(&self) -> &BTreeMap<&'static str, u64> {
        &self.probes
    }

    fn probe(&mut self, name: &'static str) {
        *self.probes.entry(name).or_insert(0) += 1;
    }

    fn probe_input(&mut self, input: &Input) {
        let name = match input {
            Input::Inbound(Inbound::Refused { .. }) => "in.refused",
            Input::Inbound(Inbound::Delivery { delivery_count, .. }) if *delivery_count > 1 => {
                "in.redelivery"
            }
            Input::Inbound(Inbound::ConsumerEnded { .. }) => "in.consumer-ended",
            Input::Completed(c) => match &c.outcome {
                Outcome::Success(Reply::PubAck(ack)) if ack.duplicate => "in.duplicate-ack",
                Outcome::Unknown => "in.unknown",
                Outcome::Failed(Failure::NoResponders) => "in.no-responders",
                Outcome::Failed(Failure::WrongLastRevision { .. }) => "in.wrong-last-revision",
                Outcome::Failed(Failure::AlreadyExists) => "in.already-exists",
                Outcome::Failed(Failure::PermissionDenied { .. }) => "in.permission-denied",
                Outcome::Failed(Failure::NotFound) => "in.not-found",
                _ => return,
            },
            _ => return,
        };
        self.probe(name);
    }

    /// Every application event so far.
    pub fn events(&self) -> &[EventRecord] {
        &self.events
    }

    /// Adds a machine with its own client (a user with `permissions`). It connects at once: its
    /// first input is [`cotal_core::io::Connection::Restored`]. If connection losses are
    /// configured, its first loss is scheduled.
    pub fn add_machine(
        &mut self,
        name: impl Into<String>,
        permissions: Permissions,
        machine: Box<dyn HostedMachine>,
    ) -> ClientId {
        let name = name.into();
        let client = self.net.add_client(name.clone(), permissions);
        self.nodes.push(Node {
            name,
            client,
            machine,
        });
        self.net.restore_connection(client);
        self.flush_outgoing();
        self.schedule_next_loss(client);
        client
    }

    fn node_of(&self, client: ClientId) -> Option<usize> {
        self.nodes.iter().position(|n| n.client == client)
    }

    fn in_fault_phase(&self) -> bool {
        self.clock.now().at < self.config.fault_phase
    }

    fn record(&mut self, line: String) {
        let line = format!("{} {line}", self.clock.now().at.as_millis());
        self.transcript.record(line);
    }

    fn schedule_next_loss(&mut self, client: ClientId) {
        let Some(every) = self.config.faults.connection_loss_every else {
            return;
        };
        let gap = self
            .chooser
            .faults
            .between(cotal_core::time::Duration::ZERO, every + every);
        let at = self.clock.now().at + gap;
        if at < self.config.fault_phase {
            self.queue.push(Lane::Control, at, SimEvent::Lose(client));
        }
    }

    /// Moves every input the server produced onto its client's down lane.
    fn flush_outgoing(&mut self) {
        let now = self.clock.now().at;
        while let Some(out) = self.net.poll_outgoing() {
            let faulty = self.in_fault_phase();
            let mut at = now;
            if out.kind != OutKind::Local {
                let (lo, hi) = self.config.latency;
                at += self.chooser.latency.between(lo, hi);
            }
            if faulty
                && out.kind == OutKind::CoreMessage
                && self.chooser.faults.chance(self.config.faults.core_drop_ppm)
            {
                let who = self.net.client_name(out.client).to_owned();
                self.record(format!("fault drop-core {who} {:?}", out.input));
                self.probe("fault.core-drop");
                continue;
            }
            if faulty
                && out.kind == OutKind::Delivery
                && self
                    .chooser
                    .faults
                    .chance(self.config.faults.slow_consumer_ppm)
            {
                self.probe("fault.slow-consumer");
                let (lo, hi) = self.config.faults.slow_consumer_delay;
                at += self.chooser.faults.between(lo, hi);
            }
            let lane = Lane::Down(out.client.0);
            self.queue.push(lane, at, SimEvent::Down(out));
        }
    }

    /// Drains a machine's commands (onto its up lane) and events (into the transcript).
    fn drain(&mut self, idx: usize) {
        let client = self.nodes[idx].client;
        while let Some(cmd) = self.nodes[idx].machine.poll_command() {
            let line = format!("{} cmd {cmd:?}", self.nodes[idx].name);
            self.record(line);
            if let Some((epoch, cmd)) = self.net.client_send(client, cmd) {
                let (lo, hi) = self.config.latency;
                let at = self.clock.now().at + self.chooser.latency.between(lo, hi);
                self.queue
                    .push(Lane::Up(client.0), at, SimEvent::Up { client, epoch, cmd });
            }
        }
        while let Some(event) = self.nodes[idx].machine.poll_event_line() {
            let line = format!("{} event {event}", self.nodes[idx].name);
            self.record(line);
            self.events.push(EventRecord {
                at: self.clock.now().at,
                machine: self.nodes[idx].name.clone(),
                event,
            });
        }
        self.flush_outgoing();
    }

    fn exec_faults(&mut self) -> ExecFaults {
        if !self.in_fault_phase() {
            return ExecFaults::default();
        }
        let f = &self.config.faults;
        let (kv, amb) = (f.kv_conflict_ppm, f.ambiguous_ppm);
        ExecFaults {
            kv_conflict: self.chooser.faults.chance(kv),
            ambiguous: self.chooser.faults.chance(amb),
        }
    }

    /// The earliest instant anything is due.
    fn next_due(&self) -> Option<Instant> {
        let machines = self
            .nodes
            .iter()
            .filter(|n| !self.frozen.contains_key(&n.client))
            .filter_map(|n| n.machine.poll_timeout());
        self.queue
            .next_time()
            .into_iter()
            .chain(machines)
            .chain(self.net.next_wake())
            .min()
    }

    /// Takes one step if something is due at or before `until`; returns false otherwise.
    pub fn step(&mut self, until: Instant) -> bool {
        let Some(next) = self.next_due() else {
            return false;
        };
        if next > until {
            return false;
        }
        self.clock.advance_to(next);
        let now = self.clock.now();
        self.net.broker_mut().advance(now);
        let mut due: Vec<Due> = self
            .queue
            .ready(now.at)
            .into_iter()
            .map(Due::Queued)
            .collect();
        for (i, n) in self.nodes.iter().enumerate() {
            if !self.frozen.contains_key(&n.client)
                && n.machine.poll_timeout().is_some_and(|t| t <= now.at)
            {
                due.push(Due::Timeout(i));
            }
        }
        if self.net.next_wake().is_some_and(|t| t <= now.at) {
            due.push(Due::Wake);
        }
        if due.is_empty() {
            return false;
        }
        let pick = self.chooser.order.below(due.len() as u64) as usize;
        match due.swap_remove(pick) {
            Due::Queued(key) => {
                if let Some((_, event)) = self.queue.take(key) {
                    self.happen(event);
                }
            }
            Due::Timeout(idx) => {
                let line = format!("{} timeout", self.nodes[idx].name);
                self.record(line);
                self.nodes[idx].machine.handle_timeout(now);
                self.drain(idx);
            }
            Due::Wake => {
                self.record("server wake".to_owned());
                self.net.handle_wake(now);
                self.flush_outgoing();
            }
        }
        true
    }

    fn happen(&mut self, event: SimEvent) {
        let now = self.clock.now();
        match event {
            SimEvent::Up { client, epoch, cmd } => {
                let faults = self.exec_faults();
                if faults != ExecFaults::default() {
                    let who = self.net.client_name(client).to_owned();
                    self.record(format!("fault {faults:?} on {who} {:?}", cmd.op()));
                    if faults.ambiguous && cmd.op().is_some() {
                        self.probe("fault.ambiguous");
                    }
                    if faults.kv_conflict
                        && matches!(
                            cmd,
                            Command::KvPut {
                                condition: KvCondition::Revision(_) | KvCondition::CreateOnly,
                                ..
                            } | Command::KvDelete {
                                expected_revision: Some(_),
                                ..
                            }
                        )
                    {
                        self.probe("fault.kv-conflict");
                    }
                }
                self.net.execute(now, client, epoch, cmd, faults);
                self.flush_outgoing();
            }
            SimEvent::Down(out) => {
                if let Some(held) = self.frozen.get_mut(&out.client) {
                    held.push(out);
                    return;
                }
                if !self.net.accept(&out) {
                    let who = self.net.client_name(out.client).to_owned();
                    self.record(format!("drop-stale {who} {:?}", out.input));
                    return;
                }
                let Some(idx) = self.node_of(out.client) else {
                    return;
                };
                let line = format!("{} in {:?}", self.nodes[idx].name, out.input);
                self.record(line);
                self.probe_input(&out.input);
                self.nodes[idx].machine.handle_input(now, out.input);
                self.drain(idx);
            }
            SimEvent::Lose(client) => self.lose(client),
            SimEvent::Thaw(client) => self.thaw(client),
            SimEvent::Restore(client) if self.dead.contains(&client) => {}
            SimEvent::Restore(client) => {
                let who = self.net.client_name(client).to_owned();
                self.record(format!("fault restore {who}"));
                self.net.restore_connection(client);
                self.flush_outgoing();
                self.schedule_next_loss(client);
            }
        }
    }

    /// Drops a client's connection now (a fault, or a test's explicit act): commands still on the
    /// way up reach the server or not as the seed says, then the connection is gone and a
    /// reconnect is scheduled after [`crate::sched::FaultConfig::restore_after`].
    pub fn lose(&mut self, client: ClientId) {
        self.cut(client, None);
    }

    /// The same with the reconnect `down` after the loss: an outage of a chosen length.
    pub fn lose_for(&mut self, client: ClientId, down: cotal_core::time::Duration) {
        self.cut(client, Some(down));
    }

    /// A connection loss; the reconnect `down` later, or after a delay drawn from
    /// `restore_after` (drawn after the in-flight commands' fates, as always: seeds replay).
    fn cut(&mut self, client: ClientId, down: Option<cotal_core::time::Duration>) {
        if !self.net.is_connected(client) {
            return;
        }
        let now = self.clock.now();
        let who = self.net.client_name(client).to_owned();
        self.record(format!("fault lose {who}"));
        self.probe("fault.connection-loss");
        let travelling = self
            .queue
            .drain_where(|_, e| matches!(e, SimEvent::Up { client: c, .. } if *c == client));
        for (_, event) in travelling {
            if let SimEvent::Up { client, epoch, cmd } = event {
                let reached = self
                    .chooser
                    .faults
                    .chance(self.config.faults.inflight_reached_ppm);
                self.record(format!("in-flight reached={reached} {:?}", cmd.op()));
                self.probe(if reached {
                    "fault.inflight-reached"
                } else {
                    "fault.inflight-lost"
                });
                if reached {
                    self.net
                        .execute(now, client, epoch, cmd, ExecFaults::default());
                }
            }
        }
        self.net.lose_connection(client);
        self.queue.reset_lane(Lane::Down(client.0));
        self.flush_outgoing();
        let down = down.unwrap_or_else(|| {
            let (lo, hi) = self.config.faults.restore_after;
            self.chooser.faults.between(lo, hi)
        });
        let at = now.at + down;
        self.queue
            .push(Lane::Control, at, SimEvent::Restore(client));
    }

    /// Freezes a machine's process for `d` (a stalled process): no inputs and no timeouts reach
    /// it until then; inputs are held in order; its connection and the commands it already sent
    /// carry on at the server. A frozen or unknown client is left alone.
    pub fn freeze(&mut self, client: ClientId, d: cotal_core::time::Duration) {
        if self.frozen.contains_key(&client) || self.node_of(client).is_none() {
            return;
        }
        let who = self.net.client_name(client).to_owned();
        self.record(format!("fault freeze {who} for {} ms", d.as_millis()));
        self.probe("fault.freeze");
        self.frozen.insert(client, Vec::new());
        let at = self.clock.now().at + d;
        self.queue.push(Lane::Control, at, SimEvent::Thaw(client));
    }

    /// Whether a client's process is frozen now.
    pub fn is_frozen(&self, client: ClientId) -> bool {
        self.frozen.contains_key(&client)
    }

    fn thaw(&mut self, client: ClientId) {
        let Some(held) = self.frozen.remove(&client) else {
            return;
        };
        let who = self.net.client_name(client).to_owned();
        self.record(format!("fault thaw {who} ({} held inputs)", held.len()));
        let now = self.clock.now().at;
        let lane = Lane::Down(client.0);
        let queued = self.queue.drain_lane(lane);
        self.queue.reset_lane(lane);
        for out in held {
            self.queue.push(lane, now, SimEvent::Down(out));
        }
        for (at, event) in queued {
            self.queue.push(lane, at, event);
        }
    }

    /// Writes a line of the caller's into the transcript (a workload step, an operator act).
    pub fn note(&mut self, line: String) {
        self.record(line);
    }

    /// Drains a machine's commands and events now: call it after an application call on a
    /// machine the host runs (a join, a send) so what the call emitted starts travelling.
    pub fn drain_client(&mut self, client: ClientId) {
        if let Some(idx) = self.node_of(client) {
            self.drain(idx);
        }
    }

    /// Kills a machine's process: its connection is lost for good (commands still travelling
    /// reach the server or not as the seed says; no reconnect), and the machine is removed, so
    /// nothing reaches it any more. A restarted process is a new machine with a new client
    /// ([`Host::add_machine`]).
    pub fn kill(&mut self, client: ClientId) {
        let who = self.net.client_name(client).to_owned();
        self.record(format!("kill {who}"));
        self.dead.push(client);
        self.frozen.remove(&client);
        if let Some(idx) = self.node_of(client) {
            self.nodes.remove(idx);
        }
        self.lose(client);
    }

    /// Re-issues a client's credential with new permissions ([`Net::set_permissions`]):
    /// subscriptions no longer allowed are refused asynchronously.
    pub fn set_permissions(&mut self, client: ClientId, permissions: Permissions) {
        let who = self.net.client_name(client).to_owned();
        self.record(format!("server set-permissions {who}"));
        self.net.set_permissions(client, permissions);
        self.flush_outgoing();
    }

    /// An operator's KV put ([`Net::operator_kv_put`]): watches are told.
    ///
    /// # Errors
    ///
    /// The broker's failure.
    pub fn operator_kv_put(
        &mut self,
        bucket: &str,
        key: &str,
        value: bytes::Bytes,
    ) -> Result<u64, Failure> {
        self.record(format!("server kv-put {bucket} {key}"));
        let revision = self.net.operator_kv_put(bucket, key, value);
        self.flush_outgoing();
        revision
    }

    /// Deletes a consumer now (an operator's `CONSUMER.DELETE`): its feeds end with
    /// [`cotal_core::io::Inbound::ConsumerEnded`]. False if it did not exist.
    pub fn delete_consumer(&mut self, stream: &str, name: &str) -> bool {
        self.record(format!("server delete-consumer {stream} {name}"));
        let deleted = self.net.delete_consumer(stream, name);
        self.flush_outgoing();
        deleted
    }

    /// Runs until nothing is due up to `until` (then the clock reads `until`), or the step
    /// budget runs out.
    pub fn run_until(&mut self, until: Instant) -> RunStats {
        let mut steps = 0;
        while steps < self.max_steps {
            if !self.step(until) {
                self.clock.advance_to(until);
                return RunStats {
                    steps,
                    exhausted: false,
                };
            }
            steps += 1;
        }
        RunStats {
            steps,
            exhausted: true,
        }
    }

    /// Runs for `d` of simulated time.
    pub fn run_for(&mut self, d: cotal_core::time::Duration) -> RunStats {
        let until = self.clock.now().at + d;
        self.run_until(until)
    }
}
