//! What the bench's parts share, a leaf module (it imports none of them): the channels, the setup
//! bound, progress lines, CPU readings from `/proc`, and one member agent (its configuration, its
//! start, its live join and its log). `bench.rs` runs members in its own process with these, and
//! `agents.rs` runs them in child processes (`--agent-procs`).

use crate::connect::{ConnectConfig, NatsConnection, connect};
use crate::exec::{Executor, ExecutorConfig};
use crate::run::{MachineHandle, Runner, os_key, os_seed};
use crate::tools::progress::{Progress, on_terminal};
use cotal_core::agent::{Agent, AgentConfig, AgentEvent};
use cotal_core::ledger::SourceKind;
use cotal_core::wire::message::Sender;
use cotal_core::wire::token::{AgentId, Channel, Space};
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The channel every member joins.
pub(crate) const CHANNEL: &str = "bench";

/// The live channel the members join after the durable phase.
pub(crate) const LIVE_CHANNEL: &str = "benchlive";

/// Every setup wait (server start, joins, activation) is bounded by this.
pub(crate) const SETUP_WAIT: Duration = Duration::from_secs(60);

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat` (Linux; `None`
/// elsewhere, or when the process is gone or the line does not parse).
pub(crate) fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = text.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_s())
}

/// CPU seconds (user + system) used so far by this process's threads named `name` (Linux:
/// `/proc/self/task/<tid>/comm` and `…/stat`); `None` when no such thread exists or `/proc` is
/// unreadable. The bench runs its daemons on a runtime of their own, whose worker threads carry
/// one name, so their CPU is measured apart from the senders' and the bench's own.
pub(crate) fn thread_cpu_seconds(name: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut found = false;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let dir = task.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        let Some((_, rest)) = text.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        if let (Some(u), Some(s)) = (ticks(11), ticks(12)) {
            total += u + s;
            found = true;
        }
    }
    found.then(|| total / clock_ticks_per_s())
}

/// The kernel's clock ticks per second (`sysconf(_SC_CLK_TCK)`), which `/proc/<pid>/stat`
/// counts CPU time in: read from this process's auxiliary vector (`AT_CLKTCK` in
/// `/proc/self/auxv`, which is where libc's `sysconf` gets it), else 100, the value of every
/// Linux target we run.
pub(crate) fn clock_ticks_per_s() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| auxv_clock_ticks().unwrap_or(100.0))
}

/// `AT_CLKTCK` (17) from `/proc/self/auxv`: (key, value) pairs of native words, ended by key 0.
pub(crate) fn auxv_clock_ticks() -> Option<f64> {
    const AT_NULL: usize = 0;
    const AT_CLKTCK: usize = 17;
    const W: usize = std::mem::size_of::<usize>();
    let bytes = std::fs::read("/proc/self/auxv").ok()?;
    for pair in bytes.chunks_exact(2 * W) {
        let key = usize::from_ne_bytes(pair.get(..W)?.try_into().ok()?);
        let value = usize::from_ne_bytes(pair.get(W..)?.try_into().ok()?);
        match key {
            AT_NULL => break,
            AT_CLKTCK if value > 0 => return Some(value as f64),
            _ => {}
        }
    }
    None
}

/// The progress shown now on a terminal: a spinner, or a bar toward a known total.
static SHOWN: Mutex<Option<(Progress, Option<u64>)>> = Mutex::new(None);

fn shown() -> std::sync::MutexGuard<'static, Option<(Progress, Option<u64>)>> {
    SHOWN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One progress line: on a terminal the message of an `indicatif` spinner; off one (a pipe, a
/// CI log) the plain line rewritten in place, as before.
#[allow(clippy::print_stderr)]
pub(crate) fn progress(line: &str) {
    if !on_terminal() {
        eprint!("\r{line}\x1b[K");
        return;
    }
    let mut shown = shown();
    if !matches!(*shown, Some((_, None))) {
        *shown = Some((Progress::spinner(), None));
    }
    if let Some((p, _)) = shown.as_ref() {
        p.message(line.to_owned());
    }
}

/// [`progress`] with a count toward a total: on a terminal a bar of `unit`s at `done`.
#[allow(clippy::print_stderr)]
pub(crate) fn progress_of(done: u64, total: u64, unit: &str, line: &str) {
    if !on_terminal() {
        eprint!("\r{line}\x1b[K");
        return;
    }
    let mut shown = shown();
    if !matches!(*shown, Some((_, Some(t))) if t == total) {
        *shown = Some((Progress::bar(total, unit), Some(total)));
    }
    if let Some((p, _)) = shown.as_ref() {
        p.set(done);
        p.message(line.to_owned());
    }
}

/// Ends the progress: the spinner or bar is cleared (on a terminal), the line ended (off one).
#[allow(clippy::print_stderr)]
pub(crate) fn progress_done() {
    if on_terminal() {
        *shown() = None;
    } else {
        eprintln!();
    }
}

/// What one member task saw.
#[derive(Default)]
pub(crate) struct MemberLog {
    /// First surfacing of each message id.
    pub(crate) first: BTreeMap<String, Instant>,
    /// Second (and later) surfacings.
    pub(crate) duplicates: u64,
    /// The ids of those duplicates, with how often each came again (to tell the durable
    /// phase's duplicates from the live phase's).
    pub(crate) duplicate_ids: BTreeMap<String, u64>,
    /// Loss events the agent reported.
    pub(crate) lost_events: u64,
    /// The message ids of those loss events.
    pub(crate) lost_ids: BTreeSet<String>,
    /// First surfacings whose copy came through DLV (the live copy did not arrive first).
    pub(crate) via_dlv: u64,
    /// Every loss event as (message id, reason), to split them by phase.
    pub(crate) lost_log: Vec<(String, String)>,
    /// Live copies a full ledger shed on the durable channel (their DLV copy follows).
    pub(crate) shed: u64,
    /// The loss ranges the daemon recorded for this member and the agent reported
    /// ([`AgentEvent::CopiesLost`]): `(channel, first CHAT seq, last CHAT seq)`, as reported
    /// (a range that grew comes again, whole).
    pub(crate) lost_ranges: Vec<(String, u64, u64)>,
}

impl MemberLog {
    /// Whether the daemon reported the copy of CHAT sequence `seq` on `channel` lost (it lies
    /// in one of the reported ranges).
    pub(crate) fn range_lost(&self, channel: &str, seq: u64) -> bool {
        self.lost_ranges
            .iter()
            .any(|(c, first, last)| c == channel && (*first..=*last).contains(&seq))
    }
}

pub(crate) struct Member {
    pub(crate) handle: MachineHandle<Agent>,
    pub(crate) task: tokio::task::JoinHandle<MemberLog>,
    pub(crate) agent: tokio::task::JoinHandle<Agent>,
    /// Every channel the agent reported [`AgentEvent::Joined`] for (live or durable).
    pub(crate) joined_channels: Arc<Mutex<BTreeSet<String>>>,
}

/// The configuration of bench member number `i`, `id`: joined to `channel` with a durable
/// backstop, its DLV consumer provisioned by the bench (the agent does not create it).
pub(crate) fn member_config(
    space: &Space,
    channel: &Channel,
    id: &AgentId,
    i: usize,
) -> AgentConfig {
    let mut config = AgentConfig::new(
        space.clone(),
        Sender::new(id.clone(), id.as_str()),
        vec![channel.clone()],
        os_seed() ^ (i as u64),
    );
    config.id_key = Some(os_key());
    config.durable_backstop = true;
    config.create_dlv_consumer = false;
    config
}

/// Joins every member of this process to `live` and waits (at most [`SETUP_WAIT`]) until
/// each reported the join.
pub(crate) async fn join_live_in_proc(members: &[Member], live: &Channel) -> Result<(), String> {
    for m in members {
        m.handle
            .join(live.clone())
            .await
            .map_err(|e| format!("live join: {e:?}"))?;
    }
    let deadline = Instant::now() + SETUP_WAIT;
    for (i, m) in members.iter().enumerate() {
        progress(&format!("bench: live join {}/{}", i + 1, members.len()));
        while !m
            .joined_channels
            .lock()
            .is_ok_and(|s| s.contains(live.as_str()))
        {
            if Instant::now() > deadline {
                return Err(format!(
                    "member {i} did not join the live channel within {SETUP_WAIT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(())
}

/// Collects every member's log once its surfacing task stopped (the run's stop signal was
/// sent), and stops its agent (bounded waits).
pub(crate) async fn finish_members(members: Vec<Member>) -> Result<Vec<MemberLog>, String> {
    let mut logs = Vec::with_capacity(members.len());
    for m in members {
        let log = m.task.await.map_err(|e| format!("member task: {e}"))?;
        let _ = m.handle.stop(Duration::from_secs(2));
        let _ = tokio::time::timeout(Duration::from_secs(5), m.agent).await;
        logs.push(log);
    }
    Ok(logs)
}

/// Connects as the agent of `config` (inbox prefix `_INBOX_<id>`).
pub(crate) async fn connect_as(
    cfg: &ConnectConfig,
    config: &AgentConfig,
) -> Result<NatsConnection, String> {
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
    stop: watch::Receiver<bool>,
) -> Result<Member, String> {
    start_member_pausable(cfg, config, surfaced, joined, stop, None).await
}

/// [`start_member`] whose application loop `pause` can stop (`cotal chaos --faults
/// stuck-member`): while `pause` holds `true` the loop takes no message from the agent and
/// calls no `handled`, so the agent acks none of its DLV copies (a durable copy is acked only
/// after `handled`) and its DLV consumer stops delivering once `max_ack_pending` copies are
/// unacked, as with an application that hangs. The agent machine itself keeps running
/// (heartbeats, live copies into its ledger, joins and leaves); its other events are still
/// read. When `pause` turns `false` the loop takes everything that became ready meanwhile.
pub(crate) async fn start_member_pausable(
    cfg: &ConnectConfig,
    config: AgentConfig,
    surfaced: Arc<AtomicUsize>,
    joined: Arc<AtomicUsize>,
    mut stop: watch::Receiver<bool>,
    pause: Option<watch::Receiver<bool>>,
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
    let joined_channels: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let channels_seen = Arc::clone(&joined_channels);
    let task = tokio::spawn(async move {
        let mut log = MemberLog::default();
        // Counted in `joined` once, at its first established backstop: a join whose durableJoin
        // failed (no daemon answering yet) reports `durable: false`, and the reconcile that
        // establishes it later says so only with `BackstopEstablished`.
        let mut established = false;
        let (mut pause, mut pausable) = match pause {
            Some(p) => (p, true),
            None => (watch::channel(false).1, false),
        };
        let mut paused = false;
        // Messages became ready while paused: take them at the resume.
        let mut ready = false;
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                changed = pause.changed(), if pausable => {
                    if changed.is_err() {
                        pausable = false;
                        paused = false;
                    } else {
                        paused = *pause.borrow_and_update();
                    }
                    if !paused && ready {
                        ready = false;
                        take_ready(&h, &mut log, &surfaced).await;
                    }
                }
                event = events.recv() => {
                if let Some(AgentEvent::Joined { channel, .. }) = &event
                    && let Ok(mut seen) = channels_seen.lock()
                {
                    seen.insert(channel.as_str().to_owned());
                }
                match event {
                    Some(AgentEvent::MessagesReady { .. }) if paused => ready = true,
                    Some(AgentEvent::MessagesReady { .. }) => {
                        take_ready(&h, &mut log, &surfaced).await;
                    }
                    Some(AgentEvent::Joined { report, .. }) if report.durable && !established => {
                        established = true;
                        joined.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(AgentEvent::BackstopEstablished { .. }) if !established => {
                        established = true;
                        joined.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(AgentEvent::LiveCopyShed { .. }) => log.shed += 1,
                    Some(AgentEvent::CopiesLost { ranges, .. }) => {
                        log.lost_ranges.extend(
                            ranges.into_iter().map(|r| (r.channel, r.first, r.last)),
                        );
                    }
                    Some(AgentEvent::Lost { id, reason }) => {
                        log.lost_events += 1;
                        log.lost_ids.insert(id.clone());

                        log.lost_log.push((id, reason));
                    }
                    Some(_) => {}
                    None => break,
                }
                }
            }
        }
        log
    });
    Ok(Member {
        handle,
        task,
        agent,
        joined_channels,
    })
}

/// Takes every message the agent has ready, logs its first surfacings and duplicates, and marks
/// each one handled (one trip into the machine per batch).
async fn take_ready(h: &MachineHandle<Agent>, log: &mut MemberLog, surfaced: &AtomicUsize) {
    loop {
        let Ok(batch) = h.take_messages(1024).await else {
            break;
        };
        if batch.is_empty() {
            break;
        }
        let now = Instant::now();
        let mut done = Vec::with_capacity(batch.len());
        for s in batch {
            let id = s.item.message.id.clone();
            match log.first.entry(id) {
                Entry::Occupied(o) => {
                    log.duplicates += 1;
                    *log.duplicate_ids.entry(o.key().clone()).or_default() += 1;
                }
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
    }
}
