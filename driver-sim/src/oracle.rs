//! The delivery oracle: checks a mesh run against the invariants of semantics §3 and the SPEC §7
//! boundaries, from ground truth the machines cannot forge.
//!
//! # Ground truth
//!
//! - **CHAT**, read from the broker: every stored message's sequence, channel (from the subject),
//!   sender and id.
//! - **The members bucket**, read from the broker revision by revision: every membership
//!   generation's join cursor `J`, leave cursor `L`, and whether it was ever activated.
//! - **The journal** the mesh keeps ([`crate::world::Journal`]): what each agent life surfaced
//!   (id, channel, source, time), every agent event, every accepted application request,
//!   narrowings and process deaths.
//!
//! # Checks after every host step (safety)
//!
//! | id | check |
//! | --- | --- |
//! | `I23` | no agent life surfaces one id twice (every run stays far inside the ledger horizon) |
//! | `I4` | nothing an agent posted itself is surfaced to it |
//! | `I2` | a surfaced message was stored in CHAT, on the channel and by the sender it claims |
//! | `S7-window` | a live or backfill copy surfaces only inside a join window of its channel in this life (from the join request to the leave, refusal or failure): nothing on a channel never joined, nothing past a leave |
//! | `I5` | for a join armed at watermark `F`: backfill copies have `s ≤ F`, live copies `s > F` (checked when the join reports `F`, over every copy since its request, and for every later copy) |
//! | `S7-interval` | a DLV copy's sequence lies in one of the member's intervals `(J_g, L_g]` of that channel, or it is a live-mention of the agent on a live channel (I8) |
//! | `I30` | every membership-record write that landed was made by the daemon holding the lease at that moment (the server attributes writes to connections): a deposed daemon never writes (G23's fencing) |
//! | `I16` | per member key, the generation never decreases from one revision to the next |
//! | `I17` | within one generation the join cursor never changes and a leave cursor is never cleared or raised |
//! | `API1` | an application request gets at most one answer event, and only a request the agent accepted |
//! | `I1` | a `Sent` event names the CHAT sequence that stored that id |
//! | `ACL-revoke-window` | with a daemon, in a run without network faults: once a daemon has been ready (holding the lease, feeds open) for [`REVOKE_WINDOW`] after a channel left an agent's read ACL, the agent's DLV subject holds no copy of it (the daemon's watch saw the narrowing and its sweep took back what had landed, including copies whose writes were in flight), unless a daemon reported giving up on that owner's sweep |
//! | `I15` | a leave of a channel whose membership this life learnt of (durable join report, established backstop) is answered (`Left`) only once the member key's latest generation carries a leave cursor: a known membership is tombstoned before the agent lets the channel go |
//!
//! # Checks at the end of the heal phase (liveness)
//!
//! | id | check |
//! | --- | --- |
//! | `API1` | every request of a living process got exactly one answer |
//! | `I6` | the server holds a chat subscription for exactly the channels the agent has joined: a refused or failed join, a leave or a refusal left none behind; and a channel whose join was refused and never succeeded in any life has no open membership |
//! | `I12` | with no daemon, no joined durable channel claims an established backstop |
//! | `I11` | with a daemon, every joined durable channel's backstop is established after healing |
//! | `S7-complete` | with a daemon: a join reported `durable:true` at watermark `F` (generation `g`) gets every message of its channel with `F < s ≤ L_g` (or the frontier while open) not its own, surfaced at least once in some life, unless the agent reported it lost, a daemon reported it evicted from CHAT before fan-out saw it, or its ACL was narrowed on that channel |
//! | `I22` | every `handled` call of the application was accepted |
//! | `ACL-revoke` | with a daemon: an agent's DLV subject holds no copy of a channel its ACL lost (issue 9: the daemon's revocation sweep took them back), unless a daemon reported giving up on that owner's sweep |
//! | `M1-mention` | with a daemon: a message on a live-class channel that mentions agent `M` (not the sender; every mesh name resolves to exactly one provisioned member, live, offline or unseen), stored after the first daemon was ready, has its mention copy on `M`'s DLV subject (read from the broker), unless `M`'s ACL does not cover the channel or was narrowed on it, or the copy's loss was reported (by `M`, or by a daemon: given up, dropped, shed, evicted before fan-out) |
//!
//! A [`Violation`] names the invariant, the agent (with its life), the message (with its
//! sequence and channel) and the seed.

use crate::host::Host;
use crate::world::{Act, AgentSlot, Asked, Journal, MeshConfig};
use cotal_core::agent::{AgentEvent, BackstopState, JoinError};
use cotal_core::delivery::daemon::DeliveryEvent;
use cotal_core::delivery::lease::LeaseEvent;
use cotal_core::delivery::revoke::SweepEvent;
use cotal_core::io::ReadStart;
use cotal_core::ledger::SourceKind;
use cotal_core::time::Duration;
use cotal_core::time::Instant;
use cotal_core::wire::config::SpaceStream;
use cotal_core::wire::json;
use cotal_core::wire::keys::{KvBucket, parse_member_key};
use cotal_core::wire::message::CotalMessage;
use cotal_core::wire::records::MembershipRecord;
use cotal_core::wire::subject::{Subject, SubjectKind, chat_subscribe_pattern, parse_subject};
use cotal_core::wire::token::Space;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// How long after a narrowing a fault-free run may still hold a copy of the channel in the
/// agent's DLV (`ACL-revoke-window`): the ACL watch's delivery, the sweep's read of the owner's
/// DLV and its deletes take a few round trips of simulated time; this leaves a wide margin.
pub const REVOKE_WINDOW: Duration = Duration::from_secs(10);

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The invariant's id (semantics §3 `I…`, `S7-…` for the SPEC §7 boundaries, `API1`, `R29`).
    pub invariant: &'static str,
    /// The run seed.
    pub seed: u64,
    /// The agent (`name` or `name#life`).
    pub agent: Option<String>,
    /// The message (`id (seq s on channel c)`).
    pub message: Option<String>,
    /// Simulated time.
    pub at: Instant,
    /// What happened.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invariant {} violated at {} ms (seed {})",
            self.invariant,
            self.at.as_millis(),
            self.seed
        )?;
        if let Some(a) = &self.agent {
            write!(f, ", agent {a}")?;
        }
        if let Some(m) = &self.message {
            write!(f, ", message {m}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// One stored CHAT message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMsg {
    /// Its sequence.
    pub seq: u64,
    /// Its channel (from the subject).
    pub channel: String,
    /// The sender token of the subject.
    pub sender: String,
    /// Its id.
    pub id: String,
    /// Its mentions.
    pub mentions: Vec<String>,
    /// When the oracle first saw it stored (the end of the host step that stored it).
    pub stored_at: Instant,
}

/// One membership generation as the members bucket recorded it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interval {
    /// `J`.
    pub join_cursor: u64,
    /// `L`, once tombstoned.
    pub leave_cursor: Option<u64>,
    /// Ever activated.
    pub activated: bool,
}

#[derive(Clone, Debug)]
struct Window {
    start: Instant,
    end: Option<Instant>,
    request: Option<u64>,
    watermark: Option<u64>,
}

#[derive(Clone, Debug, Default)]
struct LifeState {
    surfaced: BTreeMap<String, usize>,
    count: usize,
    windows: BTreeMap<String, Vec<Window>>,
}

#[derive(Clone, Debug)]
struct ReqState {
    answers: u32,
    asked: Asked,
}

/// A durable join the agent reported established, to check for completeness at the end.
#[derive(Clone, Debug)]
struct DurableJoin {
    agent: usize,
    life: u32,
    channel: String,
    watermark: u64,
    generation: u64,
}

/// The oracle of one run. See the module docs.
#[derive(Clone, Debug)]
pub struct Oracle {
    seed: u64,
    space: Space,
    names: Vec<String>,
    boot: Vec<Vec<String>>,
    channel_names: Vec<String>,
    durable_channels: BTreeSet<String>,
    daemons: usize,
    horizon: usize,
    chat_stream: String,
    members_bucket: String,
    members_stream: String,
    chat: BTreeMap<String, ChatMsg>,
    by_seq: BTreeMap<u64, String>,
    chat_scanned: u64,
    members_scanned: u64,
    member_writes_seen: usize,
    intervals: BTreeMap<(String, String), BTreeMap<u64, Interval>>,
    last_generation: BTreeMap<(String, String), u64>,
    lives: BTreeMap<(usize, u32), LifeState>,
    requests: BTreeMap<(usize, u32, u64), ReqState>,
    killed: BTreeSet<(usize, u32)>,
    narrowed: BTreeSet<(usize, String)>,
    /// Narrowings whose window is still open: (when, agent, channel).
    revoke_due: Vec<(Instant, usize, String)>,
    /// Whether the run's fault config injects no network fault (the window check applies).
    calm: bool,
    daemon_restarts: Vec<Instant>,
    revoke_windows_checked: u64,
    lost: BTreeSet<(usize, String)>,
    durable_joins: Vec<DurableJoin>,
    ever_joined: BTreeSet<(usize, String)>,
    refused: BTreeSet<(usize, String)>,
    known_members: BTreeSet<(usize, u32, String)>,
    seen_surfacings: usize,
    seen_events: usize,
    seen_requests: usize,
    seen_acts: usize,
}

/// Whether a daemon reported giving up on the agent's DLV revocation sweep.
fn sweep_gave_up(journal: &Journal, slot: &AgentSlot) -> bool {
    journal.daemon_events.iter().any(|n| {
        matches!(&n.event, DeliveryEvent::DlvRevocation(SweepEvent::Failed { owner, .. })
            if *owner == slot.id)
    })
}

fn who(names: &[String], agent: usize, life: u32) -> String {
    let name = names.get(agent).map_or("?", String::as_str);
    if life == 0 {
        name.to_owned()
    } else {
        format!("{name}#{life}")
    }
}

impl Oracle {
    /// The oracle of a mesh with this config.
    pub fn new(config: &MeshConfig, space: &Space) -> Self {
        let members_bucket = KvBucket::Members.name(space);
        Oracle {
            seed: config.seed,
            space: space.clone(),
            names: crate::world::AGENT_NAMES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            boot: Vec::new(),
            channel_names: config
                .channels
                .iter()
                .map(|c| c.channel.as_str().to_owned())
                .collect(),
            durable_channels: config
                .channels
                .iter()
                .filter(|c| c.durable)
                .map(|c| c.channel.as_str().to_owned())
                .collect(),
            daemons: config.daemons,
            horizon: cotal_core::ledger::LedgerConfig::default().horizon_capacity,
            chat_stream: SpaceStream::Chat.name(space),
            members_stream: crate::broker::kv_stream(&members_bucket),
            members_bucket,
            chat: BTreeMap::new(),
            by_seq: BTreeMap::new(),
            chat_scanned: 0,
            members_scanned: 0,
            member_writes_seen: 0,
            intervals: BTreeMap::new(),
            last_generation: BTreeMap::new(),
            lives: BTreeMap::new(),
            requests: BTreeMap::new(),
            killed: BTreeSet::new(),
            narrowed: BTreeSet::new(),
            revoke_due: Vec::new(),
            calm: {
                let f = &config.faults;
                f.core_drop_ppm == 0
                    && f.connection_loss_every.is_none()
                    && f.slow_consumer_ppm == 0
                    && f.kv_conflict_ppm == 0
                    && f.ambiguous_ppm == 0
            },
            daemon_restarts: Vec::new(),
            revoke_windows_checked: 0,
            lost: BTreeSet::new(),
            durable_joins: Vec::new(),
            ever_joined: BTreeSet::new(),
            refused: BTreeSet::new(),
            seen_surfacings: 0,
            seen_events: 0,
            known_members: BTreeSet::new(),
            seen_requests: 0,
            seen_acts: 0,
        }
    }

    /// Narrowings whose `ACL-revoke-window` was checked (a window closed with a daemon ready).
    pub fn revoke_windows_checked(&self) -> u64 {
        self.revoke_windows_checked
    }

    /// How many CHAT messages the oracle has seen stored.
    pub fn chat_messages(&self) -> u64 {
        self.chat.len() as u64
    }

    /// The ground truth of CHAT, by id.
    pub fn chat(&self) -> &BTreeMap<String, ChatMsg> {
        &self.chat
    }

    /// The membership intervals seen, by `(channel, owner)` then generation.
    pub fn intervals(&self) -> &BTreeMap<(String, String), BTreeMap<u64, Interval>> {
        &self.intervals
    }

    /// A violation of this run.
    pub fn violation(
        &self,
        invariant: &'static str,
        agent: Option<String>,
        message: Option<String>,
        at: Instant,
        detail: String,
    ) -> Violation {
        Violation {
            invariant,
            seed: self.seed,
            agent,
            message,
            at,
            detail,
        }
    }

    fn describe_msg(&self, id: &str) -> String {
        match self.chat.get(id) {
            Some(m) => format!("{id} (seq {} on {} from {})", m.seq, m.channel, m.sender),
            None => format!("{id} (not in CHAT)"),
        }
    }

    fn scan_chat(&mut self, host: &Host) {
        let Ok(state) = host.broker().stream_state(&self.chat_stream) else {
            return;
        };
        let from = (self.chat_scanned + 1).max(state.first_seq);
        for seq in from..=state.last_seq {
            let Ok(Some(stored)) = host.broker().message(&self.chat_stream, seq) else {
                continue;
            };
            let Some(parsed) = parse_subject(&stored.subject) else {
                continue;
            };
            if parsed.kind() != SubjectKind::Chat {
                continue;
            }
            let Ok(msg) = json::decode::<CotalMessage>(&stored.payload) else {
                continue;
            };
            self.by_seq.insert(seq, msg.id.clone());
            self.chat.insert(
                msg.id.clone(),
                ChatMsg {
                    seq,
                    channel: parsed.rest().to_owned(),
                    sender: parsed.sender().as_str().to_owned(),
                    id: msg.id,
                    mentions: msg.mentions,
                    stored_at: host.now().at,
                },
            );
        }
        self.chat_scanned = self.chat_scanned.max(state.last_seq);
    }

    /// I30 with G23's fencing: every membership-record write that landed was made by the client
    /// of the daemon holding the lease at that moment (the server attributes each write to its
    /// connection, [`crate::net::Net::member_writes`]).
    fn check_fenced_writes(&mut self, host: &Host) -> Result<(), Violation> {
        let writes = host.net().member_writes();
        while self.member_writes_seen < writes.len() {
            let w = &writes[self.member_writes_seen];
            self.member_writes_seen += 1;
            if !w.lease_holders.contains(&w.writer) {
                let holders = if w.lease_holders.is_empty() {
                    "no daemon".to_owned()
                } else {
                    w.lease_holders.join(", ")
                };
                return Err(self.violation(
                    "I30",
                    None,
                    Some(format!("member key {} revision {}", w.key, w.revision)),
                    w.at,
                    format!(
                        "{} wrote a membership record while {holders} held the lease: a deposed daemon's write landed (G23)",
                        w.writer
                    ),
                ));
            }
        }
        Ok(())
    }

    fn scan_members(&mut self, host: &Host) -> Result<(), Violation> {
        let Ok(state) = host.broker().stream_state(&self.members_stream) else {
            return Ok(());
        };
        let from = (self.members_scanned + 1).max(state.first_seq);
        let at = host.now().at;
        for seq in from..=state.last_seq {
            let Ok(Some(stored)) = host.broker().message(&self.members_stream, seq) else {
                continue;
            };
            let Some(entry) = crate::broker::Broker::kv_entry_of(&self.members_bucket, &stored)
            else {
                continue;
            };
            let Ok(key) = parse_member_key(&entry.key) else {
                continue;
            };
            let Some(record) = MembershipRecord::from_kv(Some(&entry.value)) else {
                continue;
            };
            let k = (
                key.channel.as_str().to_owned(),
                key.owner.as_str().to_owned(),
            );
            let message = Some(format!("member key {} revision {seq}", entry.key));
            let owner = Some(k.1.clone());
            if let Some(last) = self.last_generation.get(&k)
                && record.generation < *last
            {
                return Err(self.violation(
                    "I16",
                    owner,
                    message,
                    at,
                    format!(
                        "a generation {} write followed generation {last}: a stale-generation write won",
                        record.generation
                    ),
                ));
            }
            self.last_generation.insert(k.clone(), record.generation);
            let gens = self.intervals.entry(k).or_default();
            match gens.get_mut(&record.generation) {
                None => {
                    gens.insert(
                        record.generation,
                        Interval {
                            join_cursor: record.join_cursor,
                            leave_cursor: record.leave_cursor,
                            activated: record.is_activated(),
                        },
                    );
                }
                Some(iv) => {
                    let problem = if iv.join_cursor != record.join_cursor {
                        Some(format!(
                            "generation {} changed its join cursor {} -> {}",
                            record.generation, iv.join_cursor, record.join_cursor
                        ))
                    } else {
                        match (iv.leave_cursor, record.leave_cursor) {
                            (Some(l), None) => Some(format!(
                                "generation {} was resurrected after its tombstone at {l}",
                                record.generation
                            )),
                            (Some(l), Some(l2)) if l2 > l => Some(format!(
                                "generation {} raised its leave cursor {l} -> {l2}",
                                record.generation
                            )),
                            _ => None,
                        }
                    };
                    if let Some(detail) = problem {
                        return Err(self.violation("I17", owner, message, at, detail));
                    }
                    iv.leave_cursor = record.leave_cursor;
                    iv.activated |= record.is_activated();
                }
            }
        }
        self.members_scanned = self.members_scanned.max(state.last_seq);
        Ok(())
    }

    fn life<'a>(
        lives: &'a mut BTreeMap<(usize, u32), LifeState>,
        boot: &[Vec<String>],
        agent: usize,
        life: u32,
    ) -> &'a mut LifeState {
        lives.entry((agent, life)).or_insert_with(|| {
            let mut state = LifeState::default();
            for ch in boot.get(agent).into_iter().flatten() {
                state.windows.insert(
                    ch.clone(),
                    vec![Window {
                        start: Instant::ZERO,
                        end: None,
                        request: None,
                        watermark: None,
                    }],
                );
            }
            state
        })
    }

    /// Checks everything new in the journal and the broker. Call after every host step.
    ///
    /// # Errors
    ///
    /// The first violation.
    pub fn check_step(
        &mut self,
        host: &Host,
        journal: &Journal,
        agents: &[AgentSlot],
    ) -> Result<(), Violation> {
        if self.boot.is_empty() {
            self.boot = agents
                .iter()
                .map(|a| {
                    a.boot
                        .iter()
                        .filter_map(|c| self.channel_names.get(*c).cloned())
                        .collect()
                })
                .collect();
        }
        self.scan_chat(host);
        self.check_fenced_writes(host)?;
        self.scan_members(host)?;
        // Acts first: a kill or narrowing is noted before anything that follows it.
        while self.seen_acts < journal.acts.len() {
            match &journal.acts[self.seen_acts] {
                Act::Narrowed { agent, channel, at } => {
                    self.narrowed.insert((*agent, channel.clone()));
                    self.revoke_due.push((*at, *agent, channel.clone()));
                }
                Act::DaemonRestarted { at } => self.daemon_restarts.push(*at),
                Act::Killed { agent, life, .. } => {
                    self.killed.insert((*agent, *life));
                }
            }
            self.seen_acts += 1;
        }
        while self.seen_requests < journal.requests.len() {
            let r = &journal.requests[self.seen_requests];
            self.seen_requests += 1;
            self.requests.insert(
                (r.agent, r.life, r.request.0),
                ReqState {
                    answers: 0,
                    asked: r.asked.clone(),
                },
            );
            if let Asked::Join(ch) = &r.asked {
                let state = Self::life(&mut self.lives, &self.boot, r.agent, r.life);
                let windows = state.windows.entry(ch.clone()).or_default();
                if !windows.iter().any(|w| w.end.is_none()) {
                    windows.push(Window {
                        start: r.at,
                        end: None,
                        request: Some(r.request.0),
                        watermark: None,
                    });
                }
            }
        }
        // Surfacings and events are interleaved in time; take them in time order (surfacings
        // first at equal times: a message surfaces inside the event that announced it).
        loop {
            let s = journal.surfacings.get(self.seen_surfacings);
            let e = journal.events.get(self.seen_events);
            match (s, e) {
                (Some(s), Some(e)) if s.at <= e.at => {
                    self.seen_surfacings += 1;
                    self.check_surfacing(journal, self.seen_surfacings - 1)?;
                }
                (Some(_), None) => {
                    self.seen_surfacings += 1;
                    self.check_surfacing(journal, self.seen_surfacings - 1)?;
                }
                (_, Some(_)) => {
                    self.seen_events += 1;
                    self.check_event(journal, self.seen_events - 1)?;
                }
                (None, None) => break,
            }
        }
        self.check_revoke_window(host, journal, agents)
    }

    /// `ACL-revoke-window`: see the module docs. A narrowing's window opens when it happened
    /// with a daemon ready (holding the lease, its feeds open), or else when one next became
    /// ready, and closes [`REVOKE_WINDOW`] later; a daemon restart or a lost or released lease
    /// inside it opens a new one at the next ready. Each narrowing is checked once, when its
    /// window closes.
    fn check_revoke_window(
        &mut self,
        host: &Host,
        journal: &Journal,
        agents: &[AgentSlot],
    ) -> Result<(), Violation> {
        let now = host.now().at;
        if self.daemons == 0 || !self.calm {
            self.revoke_due.clear();
            return Ok(());
        }
        if self
            .revoke_due
            .iter()
            .all(|(at, ..)| now < *at + REVOKE_WINDOW)
        {
            return Ok(());
        }
        // When a daemon became ready (true) or stopped being sure to be (false), in time order.
        let mut turns: Vec<(Instant, bool)> = journal
            .daemon_events
            .iter()
            .filter_map(|n| match &n.event {
                DeliveryEvent::Lease(LeaseEvent::Ready) => Some((n.at, true)),
                DeliveryEvent::Lease(LeaseEvent::Lost { .. } | LeaseEvent::Released) => {
                    Some((n.at, false))
                }
                _ => None,
            })
            .chain(self.daemon_restarts.iter().map(|at| (*at, false)))
            .collect();
        turns.sort_by_key(|(at, ready)| (*at, *ready));
        // The end of the first full window of a ready daemon from `at` on, if it has closed.
        let closes = |at: Instant| -> Option<Instant> {
            let mut ready = turns
                .iter()
                .take_while(|(t, _)| *t <= at)
                .last()
                .is_some_and(|(_, r)| *r);
            let mut start = ready.then_some(at);
            for (t, r) in turns.iter().filter(|(t, _)| *t > at) {
                if let Some(s) = start
                    && *t > s + REVOKE_WINDOW
                {
                    break;
                }
                if *r && !ready {
                    start = Some(*t);
                } else if !*r {
                    start = None;
                }
                ready = *r;
            }
            start.map(|s| s + REVOKE_WINDOW).filter(|end| *end <= now)
        };
        let mut closed = Vec::new();
        let mut open = Vec::new();
        for item in std::mem::take(&mut self.revoke_due) {
            if closes(item.0).is_some() {
                closed.push(item);
            } else {
                open.push(item);
            }
        }
        self.revoke_due = open;
        for (at, index, channel) in closed {
            let Some(slot) = agents.get(index) else {
                continue;
            };
            if sweep_gave_up(journal, slot) {
                continue;
            }
            self.revoke_windows_checked += 1;
            if let Some((seq, msg)) = self.dlv_copy_of(host, slot, &channel) {
                return Err(self.violation(
                    "ACL-revoke-window",
                    Some(who(&self.names, index, slot.life)),
                    Some(self.describe_msg(&msg.id)),
                    now,
                    format!(
                        "DLV seq {seq} still holds a copy of {channel} {} ms after the ACL lost it (narrowed at {} ms)",
                        (now - at).as_millis(),
                        at.as_millis()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The first copy of `channel` stored on the agent's DLV subject (its sequence and message),
    /// read from the broker.
    fn dlv_copy_of(
        &self,
        host: &Host,
        slot: &AgentSlot,
        channel: &str,
    ) -> Option<(u64, CotalMessage)> {
        let subject = Subject::Dlv {
            space: self.space.clone(),
            owner: slot.id.clone(),
        }
        .to_string();
        host.broker()
            .read(
                &SpaceStream::Dlv.name(&self.space),
                &subject,
                ReadStart::Seq(1),
                None,
                u32::MAX,
            )
            .unwrap_or_default()
            .into_iter()
            .find_map(|m| {
                let msg = json::decode::<CotalMessage>(&m.payload).ok()?;
                (msg.channel().map(|c| c.as_str()) == Some(channel)).then_some((m.seq, msg))
            })
    }

    fn check_surfacing(&mut self, journal: &Journal, index: usize) -> Result<(), Violation> {
        let s = &journal.surfacings[index];
        let agent = Some(who(&self.names, s.agent, s.life));
        let message = Some(self.describe_msg(&s.id));
        let truth = self.chat.get(&s.id).cloned();
        let me = self.names.get(s.agent).cloned().unwrap_or_default();
        let duplicate = {
            let state = Self::life(&mut self.lives, &self.boot, s.agent, s.life);
            let dup = state
                .surfaced
                .get(&s.id)
                .is_some_and(|first| state.count - first < self.horizon);
            state.surfaced.insert(s.id.clone(), state.count);
            state.count += 1;
            dup
        };
        if duplicate {
            return Err(self.violation(
                "I23",
                agent,
                message,
                s.at,
                format!("surfaced twice in one life (second copy via {})", s.origin),
            ));
        }
        if s.from == me {
            return Err(self.violation(
                "I4",
                agent,
                message,
                s.at,
                "an agent's own post surfaced to it".into(),
            ));
        }
        let Some(truth) = truth else {
            return Err(self.violation(
                "I2",
                agent,
                message,
                s.at,
                "surfaced a message CHAT never stored".into(),
            ));
        };
        if truth.sender != s.from {
            return Err(self.violation(
                "I2",
                agent,
                message,
                s.at,
                format!(
                    "from.id {} but the subject's sender is {}",
                    s.from, truth.sender
                ),
            ));
        }
        if s.channel.as_deref() != Some(truth.channel.as_str()) {
            return Err(self.violation(
                "I2",
                agent,
                message,
                s.at,
                format!(
                    "surfaced on channel {:?} but stored on {}",
                    s.channel, truth.channel
                ),
            ));
        }
        if s.historical != (s.origin == SourceKind::Backfill) {
            return Err(self.violation(
                "I5",
                agent,
                message,
                s.at,
                format!("historical={} for a {} copy", s.historical, s.origin),
            ));
        }
        match s.origin {
            SourceKind::Live | SourceKind::Backfill => {
                let window = Self::life(&mut self.lives, &self.boot, s.agent, s.life)
                    .windows
                    .get(&truth.channel)
                    .and_then(|ws| {
                        ws.iter()
                            .rev()
                            .find(|w| w.start <= s.at && w.end.is_none_or(|e| e >= s.at))
                            .cloned()
                    });
                let Some(window) = window else {
                    return Err(self.violation(
                        "S7-window",
                        agent,
                        message,
                        s.at,
                        format!(
                            "a {} copy surfaced outside every join window of {} in this life",
                            s.origin, truth.channel
                        ),
                    ));
                };
                if let Some(f) = window.watermark {
                    disjoint(s.origin, truth.seq, f).map_err(|detail| {
                        self.violation("I5", agent.clone(), message.clone(), s.at, detail)
                    })?;
                }
            }
            _ => {
                let key = (truth.channel.clone(), me.clone());
                let in_interval = self.intervals.get(&key).is_some_and(|gens| {
                    gens.values().any(|iv| {
                        iv.join_cursor < truth.seq && iv.leave_cursor.is_none_or(|l| truth.seq <= l)
                    })
                });
                let mention =
                    !self.durable_channels.contains(&truth.channel) && truth.mentions.contains(&me);
                if !in_interval && !mention {
                    return Err(self.violation(
                        "S7-interval",
                        agent,
                        message,
                        s.at,
                        format!(
                            "a DLV copy outside every membership interval of {} ({:?})",
                            truth.channel,
                            self.intervals.get(&key)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn answer(
        &mut self,
        agent: usize,
        life: u32,
        request: u64,
        at: Instant,
    ) -> Result<(), Violation> {
        let a = Some(who(&self.names, agent, life));
        match self.requests.get_mut(&(agent, life, request)) {
            None => Err(self.violation(
                "API1",
                a,
                None,
                at,
                format!("an answer to req#{request}, which the agent never accepted"),
            )),
            Some(r) => {
                r.answers += 1;
                if r.answers > 1 {
                    let detail = format!("req#{request} ({:?}) answered twice", r.asked);
                    return Err(self.violation("API1", a, None, at, detail));
                }
                Ok(())
            }
        }
    }

    fn close_window(&mut self, agent: usize, life: u32, channel: &str, at: Instant) {
        let state = Self::life(&mut self.lives, &self.boot, agent, life);
        if let Some(ws) = state.windows.get_mut(channel) {
            for w in ws.iter_mut().filter(|w| w.end.is_none()) {
                w.end = Some(at);
            }
        }
    }

    /// I15: a leave is answered only after the membership it knew of was tombstoned, so at the
    /// `Left` event the member key's latest generation (if any) carries a leave cursor. Checked
    /// for a membership this life learnt of (a durable join report or an established backstop).
    fn check_leave_closed(
        &mut self,
        agent: usize,
        life: u32,
        channel: &str,
        at: Instant,
    ) -> Result<(), Violation> {
        // A membership this life never learnt of is G42's business (a leave while the daemon is
        // unreachable), not I15's.
        if !self
            .known_members
            .remove(&(agent, life, channel.to_owned()))
        {
            return Ok(());
        }
        let Some(owner) = self.names.get(agent) else {
            return Ok(());
        };
        let key = (channel.to_owned(), owner.clone());
        let Some(g) = self.last_generation.get(&key) else {
            return Ok(());
        };
        let open = self
            .intervals
            .get(&key)
            .and_then(|gens| gens.get(g))
            .is_some_and(|i| i.leave_cursor.is_none());
        if open {
            let detail = format!(
                "the leave of {channel} was answered while membership generation {g} is still open (no tombstone): DLV copies keep coming after the leave"
            );
            let a = Some(who(&self.names, agent, life));
            return Err(self.violation("I15", a, None, at, detail));
        }
        Ok(())
    }

    fn check_event(&mut self, journal: &Journal, index: usize) -> Result<(), Violation> {
        let n = &journal.events[index];
        let (agent, life, at) = (n.agent, n.life, n.at);
        match &n.event {
            AgentEvent::Joined {
                request,
                channel,
                report,
            } => {
                if let Some(r) = request {
                    self.answer(agent, life, r.0, at)?;
                }
                let ch = channel.as_str().to_owned();
                self.ever_joined.insert((agent, ch.clone()));
                if report.generation.is_some() {
                    self.known_members.insert((agent, life, ch.clone()));
                }
                if let Some(f) = report.watermark {
                    self.arm_window(journal, agent, life, &ch, request.map(|r| r.0), f, at)?;
                    if report.durable
                        && let Some(g) = report.generation
                    {
                        self.durable_joins.push(DurableJoin {
                            agent,
                            life,
                            channel: ch,
                            watermark: f,
                            generation: g,
                        });
                    }
                }
            }
            AgentEvent::JoinFailed {
                request,
                channel,
                error,
            } => {
                if let Some(r) = request {
                    self.answer(agent, life, r.0, at)?;
                }
                if matches!(error, JoinError::Refused { .. }) {
                    self.refused.insert((agent, channel.as_str().to_owned()));
                }
                self.close_window(agent, life, channel.as_str(), at);
            }
            AgentEvent::Left {
                request, channel, ..
            } => {
                self.answer(agent, life, request.0, at)?;
                self.close_window(agent, life, channel.as_str(), at);
                self.check_leave_closed(agent, life, channel.as_str(), at)?;
            }
            AgentEvent::BackstopEstablished { channel, .. } => {
                self.known_members
                    .insert((agent, life, channel.as_str().to_owned()));
            }
            AgentEvent::LeaveFailed { request, .. } => {
                self.answer(agent, life, request.0, at)?;
            }
            AgentEvent::ChannelRefused { channel, .. } => {
                self.close_window(agent, life, channel.as_str(), at);
            }
            AgentEvent::Sent {
                request, id, seq, ..
            } => {
                self.answer(agent, life, request.0, at)?;
                if let Some(truth) = self.chat.get(id)
                    && truth.seq != *seq
                {
                    let detail = format!("Sent reports seq {seq}, CHAT stored it at {}", truth.seq);
                    let a = Some(who(&self.names, agent, life));
                    return Err(self.violation("I1", a, Some(self.describe_msg(id)), at, detail));
                }
            }
            AgentEvent::SendFailed { request, .. } => {
                self.answer(agent, life, request.0, at)?;
            }
            AgentEvent::Connected { first: true } => {
                // The boot channels are joined at the first connect that loads the registry; a
                // boot join cut short by a loss before it is tried again then.
                let boot = self.boot.get(agent).cloned().unwrap_or_default();
                let state = Self::life(&mut self.lives, &self.boot, agent, life);
                for ch in boot {
                    let windows = state.windows.entry(ch).or_default();
                    if !windows.iter().any(|w| w.end.is_none()) {
                        windows.push(Window {
                            start: at,
                            end: None,
                            request: None,
                            watermark: None,
                        });
                    }
                }
            }
            AgentEvent::Lost { id, .. } => {
                self.lost.insert((agent, id.clone()));
            }
            _ => {}
        }
        Ok(())
    }

    /// A join reported its watermark `F`: every copy of the channel surfaced since the join's
    /// request must be on the right side of it (I5), and so must every later one.
    #[allow(clippy::too_many_arguments)]
    fn arm_window(
        &mut self,
        journal: &Journal,
        agent: usize,
        life: u32,
        channel: &str,
        request: Option<u64>,
        f: u64,
        at: Instant,
    ) -> Result<(), Violation> {
        let state = Self::life(&mut self.lives, &self.boot, agent, life);
        let Some(window) = state.windows.get_mut(channel).and_then(|ws| {
            ws.iter_mut()
                .rev()
                .find(|w| w.request == request && w.end.is_none())
        }) else {
            return Ok(());
        };
        window.watermark = Some(f);
        let start = window.start;
        for s in journal.surfacings[..self.seen_surfacings].iter().rev() {
            if s.at < start {
                break;
            }
            if s.agent != agent || s.life != life || s.origin == SourceKind::Durable {
                continue;
            }
            let Some(truth) = self.chat.get(&s.id) else {
                continue;
            };
            if truth.channel != channel {
                continue;
            }
            if let Err(detail) = disjoint(s.origin, truth.seq, f) {
                let a = Some(who(&self.names, agent, life));
                return Err(self.violation("I5", a, Some(self.describe_msg(&s.id)), at, detail));
            }
        }
        Ok(())
    }

    /// The end-of-heal checks (see the module docs).
    ///
    /// # Errors
    ///
    /// The first violation.
    pub fn finish(
        &mut self,
        host: &Host,
        journal: &Journal,
        agents: &[AgentSlot],
    ) -> Result<(), Violation> {
        self.check_step(host, journal, agents)?;
        let at = host.now().at;
        if let Some((agent, life, id)) = journal.handled_rejected.first() {
            return Err(self.violation(
                "I22",
                Some(who(&self.names, *agent, *life)),
                Some(self.describe_msg(id)),
                at,
                "the agent rejected `handled` for a message it surfaced".into(),
            ));
        }
        for ((agent, life, request), r) in &self.requests {
            if r.answers == 0 && !self.killed.contains(&(*agent, *life)) {
                return Err(self.violation(
                    "API1",
                    Some(who(&self.names, *agent, *life)),
                    None,
                    at,
                    format!("req#{request} ({:?}) never answered after healing", r.asked),
                ));
            }
        }
        for (index, slot) in agents.iter().enumerate() {
            let a = Some(who(&self.names, index, slot.life));
            let p = slot.proc.borrow();
            let agent = p.agent();
            let joined: BTreeSet<String> = agent
                .joined()
                .iter()
                .map(|c| chat_subscribe_pattern(&self.space, c))
                .collect();
            let held: BTreeSet<String> = host
                .net()
                .core_subscriptions(slot.client)
                .into_iter()
                .map(|(_, s)| s)
                .filter(|s| s.starts_with(&format!("cotal.{}.chat.", self.space)))
                .collect();
            if host.net().is_connected(slot.client) && joined != held {
                return Err(self.violation(
                    "I6",
                    a,
                    None,
                    at,
                    format!("joined {joined:?} but the server holds chat subscriptions {held:?}"),
                ));
            }
            for ch in agent.health().channels {
                if !self.durable_channels.contains(ch.channel.as_str()) {
                    continue;
                }
                let established = matches!(ch.backstop, BackstopState::Established { .. });
                if self.daemons == 0 && established {
                    return Err(self.violation(
                        "I12",
                        a,
                        None,
                        at,
                        format!("{} claims a backstop with no daemon", ch.channel),
                    ));
                }
                if self.daemons > 0
                    && !established
                    && !self
                        .narrowed
                        .contains(&(index, ch.channel.as_str().to_owned()))
                {
                    return Err(self.violation(
                        "I11",
                        a,
                        None,
                        at,
                        format!(
                            "{} has no established backstop after healing: {:?}",
                            ch.channel, ch.backstop
                        ),
                    ));
                }
            }
        }
        // A refused join leaves no membership behind (A2): a channel an agent never joined in
        // any life has no open membership record of it.
        for (agent, channel) in &self.refused {
            if self.ever_joined.contains(&(*agent, channel.clone())) {
                continue;
            }
            let me = self.names.get(*agent).cloned().unwrap_or_default();
            let open = self
                .intervals
                .get(&(channel.clone(), me))
                .is_some_and(|g| g.values().any(|iv| iv.leave_cursor.is_none()));
            if open {
                return Err(self.violation(
                    "I6",
                    Some(who(&self.names, *agent, 0)),
                    None,
                    at,
                    format!("a refused join of {channel} left an open membership behind"),
                ));
            }
        }
        self.check_complete(journal, at)?;
        self.check_mentions(host, journal, agents, at)?;
        self.check_revoked(host, journal, agents, at)
    }

    /// `M1-mention` (issue 15 item 3): with a daemon, after healing, every CHAT message on a
    /// live-class channel that mentions agent `M`'s name, posted by another agent after the first
    /// daemon was ready (its fan-out consumer delivers new messages only), left its mention copy
    /// on `M`'s DLV subject (ground truth from the broker; online or not, joined or not, the
    /// daemon writes the copy) — unless `M`'s ACL never covered that channel or was narrowed on it,
    /// `M` reported it lost, or a daemon reported the copy lost (given up, dropped, shed) or the
    /// message evicted from CHAT before fan-out saw it.
    ///
    /// In the mesh every name is held by exactly one agent id (the slot's, in every life), and
    /// every agent is provisioned (an ACL record reserves its id as its name), so each such
    /// mention resolves to exactly one eligible member whether its presence is live, offline
    /// (away past the TTL, or a killed life's leftover key) or not yet written: that member
    /// must get its mention copy (a `live-mention` dinbox entry, through its DLV).
    fn check_mentions(
        &self,
        host: &Host,
        journal: &Journal,
        agents: &[AgentSlot],
        at: Instant,
    ) -> Result<(), Violation> {
        if self.daemons == 0 {
            return Ok(());
        }
        // Every message id stored on each member's DLV subject (limits retention: a copy stays
        // after its ack).
        let dlv = SpaceStream::Dlv.name(&self.space);
        let got: BTreeSet<(usize, String)> = agents
            .iter()
            .enumerate()
            .flat_map(|(index, slot)| {
                let subject = Subject::Dlv {
                    space: self.space.clone(),
                    owner: slot.id.clone(),
                }
                .to_string();
                host.broker()
                    .read(&dlv, &subject, ReadStart::Seq(1), None, u32::MAX)
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(move |m| {
                        json::decode::<CotalMessage>(&m.payload)
                            .ok()
                            .map(|msg| (index, msg.id))
                    })
            })
            .collect();
        // The fan-out consumer is created by the first daemon, delivering new messages only: a
        // message stored before any daemon was ready is routed by nobody (for every class).
        let Some(first_ready) = journal
            .daemon_events
            .iter()
            .filter(|n| matches!(n.event, DeliveryEvent::Lease(LeaseEvent::Ready)))
            .map(|n| n.at)
            .min()
        else {
            return Ok(());
        };
        let excused = |owner: &str, seq: u64| {
            journal.daemon_events.iter().any(|n| match &n.event {
                DeliveryEvent::EvictedBeforeFanout { first, last, .. } => {
                    (*first..=*last).contains(&seq)
                }
                DeliveryEvent::CopyShed {
                    owner: o, seq: s, ..
                }
                | DeliveryEvent::EntryDropped {
                    owner: o, seq: s, ..
                } => o.as_str() == owner && *s == seq,
                DeliveryEvent::EntryLost(g) => g.owner.as_str() == owner && g.seq == seq,
                _ => false,
            })
        };
        for m in self.chat.values() {
            if self.durable_channels.contains(&m.channel) || m.stored_at <= first_ready {
                continue;
            }
            for (index, slot) in agents.iter().enumerate() {
                let me = slot.id.as_str();
                if me == m.sender || !m.mentions.iter().any(|n| n.eq_ignore_ascii_case(me)) {
                    continue;
                }
                let covered = slot
                    .acl
                    .iter()
                    .any(|c| self.channel_names.get(*c) == Some(&m.channel));
                if !covered
                    || self.narrowed.contains(&(index, m.channel.clone()))
                    || got.contains(&(index, m.id.clone()))
                    || self.lost.contains(&(index, m.id.clone()))
                    || excused(me, m.seq)
                {
                    continue;
                }
                return Err(self.violation(
                    "M1-mention",
                    Some(who(&self.names, index, slot.life)),
                    Some(self.describe_msg(&m.id)),
                    at,
                    format!(
                        "mentioned on live channel {}: no mention copy in its DLV",
                        m.channel
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `ACL-revoke` (issue 9): with a daemon, after healing, an agent's DLV subject holds no copy
    /// of a channel its ACL lost, unless a daemon reported that it gave up sweeping that owner.
    fn check_revoked(
        &self,
        host: &Host,
        journal: &Journal,
        agents: &[AgentSlot],
        at: Instant,
    ) -> Result<(), Violation> {
        if self.daemons == 0 {
            return Ok(());
        }
        for (index, channel) in &self.narrowed {
            let Some(slot) = agents.get(*index) else {
                continue;
            };
            if sweep_gave_up(journal, slot) {
                continue;
            }
            if let Some((seq, msg)) = self.dlv_copy_of(host, slot, channel) {
                return Err(self.violation(
                    "ACL-revoke",
                    Some(who(&self.names, *index, slot.life)),
                    Some(self.describe_msg(&msg.id)),
                    at,
                    format!("DLV seq {seq} still holds a copy of {channel} after the ACL lost it"),
                ));
            }
        }
        Ok(())
    }

    fn check_complete(&self, journal: &Journal, at: Instant) -> Result<(), Violation> {
        let mut got: BTreeSet<(usize, &str)> = BTreeSet::new();
        for s in &journal.surfacings {
            got.insert((s.agent, s.id.as_str()));
        }
        let frontier = self.by_seq.keys().next_back().copied().unwrap_or(0);
        // CHAT sequences a daemon reported evicted before its fan-out saw them (checked or not):
        // a reported loss, for every member.
        let evicted: Vec<(u64, u64)> = journal
            .daemon_events
            .iter()
            .filter_map(|n| match n.event {
                DeliveryEvent::EvictedBeforeFanout { first, last, .. } => Some((first, last)),
                _ => None,
            })
            .collect();
        // Copies a reader shed because the member's DLV was full: a reported loss, for that
        // member and sequence only.
        let shed: BTreeSet<(&str, u64)> = journal
            .daemon_events
            .iter()
            .filter_map(|n| match &n.event {
                DeliveryEvent::CopyShed { owner, seq, .. } => Some((owner.as_str(), *seq)),
                _ => None,
            })
            .collect();
        for j in &self.durable_joins {
            if self.narrowed.contains(&(j.agent, j.channel.clone())) {
                continue;
            }
            let me = self.names.get(j.agent).cloned().unwrap_or_default();
            let key = (j.channel.clone(), me.clone());
            let end = self
                .intervals
                .get(&key)
                .and_then(|g| g.get(&j.generation))
                .map_or(frontier, |iv| iv.leave_cursor.unwrap_or(frontier));
            if end <= j.watermark {
                continue;
            }
            for (seq, id) in self.by_seq.range(j.watermark + 1..=end) {
                let Some(m) = self.chat.get(id) else { continue };
                if m.channel != j.channel || m.sender == me {
                    continue;
                }
                if got.contains(&(j.agent, id.as_str()))
                    || self.lost.contains(&(j.agent, id.clone()))
                    || evicted.iter().any(|&(f, l)| (f..=l).contains(seq))
                    || shed.contains(&(me.as_str(), *seq))
                {
                    continue;
                }
                return Err(self.violation(
                    "S7-complete",
                    Some(who(&self.names, j.agent, j.life)),
                    Some(self.describe_msg(id)),
                    at,
                    format!(
                        "durable join of {} at watermark {} (generation {}) never surfaced seq {seq} (interval ends at {end})",
                        j.channel, j.watermark, j.generation
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn disjoint(origin: SourceKind, seq: u64, f: u64) -> Result<(), String> {
    match origin {
        SourceKind::Backfill if seq > f => Err(format!(
            "a backfill copy at seq {seq} above the watermark {f}"
        )),
        SourceKind::Live if seq <= f => Err(format!(
            "a live copy at seq {seq} at or below the watermark {f}"
        )),
        _ => Ok(()),
    }
}
