//! `cotal bench --agent-procs K`: the member agents in K child processes.
//!
//! The parent ([`AgentProcs`]) starts this binary K times as the hidden subcommand `cotal
//! bench-agents --nats URL --space S --ids m0,m1,…`, each with a contiguous share of the
//! members. A child ([`bench_agents`]) runs its members exactly as the in-process bench does
//! (each agent on its own connection, with the ACL record and DLV consumer the parent
//! provisioned) and talks to the parent in JSON lines:
//!
//! - child → parent, on stdout: `{"progress":{"joined":j,"surfaced":s}}` (cumulative, whenever
//!   they changed, checked every 10 ms), `{"live_joined":{"members":n}}` once every member
//!   joined the live channel, then at the end one `{"member":{…}}` per member (its
//!   [`MemberLog`]) and `"done"`; `{"error":{"error":"…"}}` on a failure (the child then exits 1);
//! - parent → child, on stdin: `live` (join the live channel), `stop` (stop the members and
//!   report). End of stdin (the parent is gone) stops the child too.
//!
//! **One clock.** Latency is a surfacing time in the child minus a publish time in the parent.
//! A child reports each surfacing as wall-clock nanoseconds (`SystemTime`): its `Instant` plus
//! the offset of one (`Instant`, `SystemTime`) pair read when it writes its report, and the
//! parent turns them back into its own `Instant`s through a pair it reads when the report
//! arrives. Both processes are on one machine and read the same clocks, so the result is the
//! child's monotonic instant itself, off only by how far the wall clock moved against the
//! monotonic one in the milliseconds between the two pairs (nothing, unless the wall clock is
//! stepped in that moment). Across machines this would need synchronized clocks.
//!
//! Every wait is bounded: a child that exits before `"done"` (or reports an error) fails the run
//! with its exit status and the last lines of its stderr (kept in a temporary file), and a child
//! still running when the parent drops it is killed by its PID.

use super::member::{
    CHANNEL, LIVE_CHANNEL, Member, MemberLog, SETUP_WAIT, cpu_seconds, finish_members,
    join_live_in_proc, member_config, progress, start_member,
};
use crate::connect::ConnectConfig;
use clap::Args;
use cotal_core::wire::token::{AgentId, Channel, Space};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ExitCode, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// How often a child looks whether its counts changed.
const PROGRESS_EVERY: Duration = Duration::from_millis(10);
/// The longest wait for every child's final report after `stop`.
const FINISH_WAIT: Duration = Duration::from_secs(60);
/// The longest wait for a child to exit after its final report.
const EXIT_WAIT: Duration = Duration::from_secs(5);

/// `cotal bench-agents` (hidden): the member agents of one `cotal bench --agent-procs` share.
#[derive(Args, Debug)]
pub struct BenchAgentsArgs {
    /// The NATS server URL the bench runs on.
    #[arg(long)]
    nats: String,
    /// The bench's space.
    #[arg(long)]
    space: String,
    /// The member ids this process runs (provisioned by the parent), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<String>,
    /// The index of the first member among all members (seeds only).
    #[arg(long, default_value_t = 0)]
    first: usize,
}

/// One line a child writes to the parent.
#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "snake_case")]
enum ChildLine {
    /// Members whose durable join is established, and first surfacings, so far.
    Progress { joined: usize, surfaced: usize },
    /// Every member joined the live channel.
    LiveJoined { members: usize },
    /// One member's log, at the end.
    Member(MemberReport),
    /// Every member reported; the child exits 0.
    Done,
    /// The child failed and exits 1.
    Error { error: String },
}

/// A [`MemberLog`] on the wire: surfacing times as wall-clock nanoseconds since the epoch.
#[derive(Serialize, Deserialize, Debug)]
struct MemberReport {
    first: BTreeMap<String, u64>,
    duplicates: u64,
    duplicate_ids: BTreeMap<String, u64>,
    lost_events: u64,
    lost_ids: BTreeSet<String>,
    via_dlv: u64,
    lost_log: Vec<(String, String)>,
    shed: u64,
}

/// One moment read on both clocks: converts this process's `Instant`s to wall-clock
/// nanoseconds and back.
#[derive(Clone, Copy)]
struct WallAnchor {
    at: Instant,
    wall_ns: u64,
}

impl WallAnchor {
    fn now() -> Self {
        let at = Instant::now();
        let wall_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        WallAnchor { at, wall_ns }
    }

    fn to_wall(self, t: Instant) -> u64 {
        match t.checked_duration_since(self.at) {
            Some(after) => self
                .wall_ns
                .saturating_add(u64::try_from(after.as_nanos()).unwrap_or(u64::MAX)),
            None => self.wall_ns.saturating_sub(
                u64::try_from(self.at.duration_since(t).as_nanos()).unwrap_or(u64::MAX),
            ),
        }
    }

    fn to_instant(self, wall_ns: u64) -> Instant {
        if wall_ns >= self.wall_ns {
            self.at + Duration::from_nanos(wall_ns - self.wall_ns)
        } else {
            self.at
                .checked_sub(Duration::from_nanos(self.wall_ns - wall_ns))
                .unwrap_or(self.at)
        }
    }
}

impl MemberReport {
    fn from_log(log: &MemberLog, anchor: WallAnchor) -> Self {
        MemberReport {
            first: log
                .first
                .iter()
                .map(|(id, t)| (id.clone(), anchor.to_wall(*t)))
                .collect(),
            duplicates: log.duplicates,
            duplicate_ids: log.duplicate_ids.clone(),
            lost_events: log.lost_events,
            lost_ids: log.lost_ids.clone(),
            via_dlv: log.via_dlv,
            lost_log: log.lost_log.clone(),
            shed: log.shed,
        }
    }

    fn into_log(self, anchor: WallAnchor) -> MemberLog {
        MemberLog {
            first: self
                .first
                .into_iter()
                .map(|(id, ns)| (id, anchor.to_instant(ns)))
                .collect(),
            duplicates: self.duplicates,
            duplicate_ids: self.duplicate_ids,
            lost_events: self.lost_events,
            lost_ids: self.lost_ids,
            via_dlv: self.via_dlv,
            lost_log: self.lost_log,
            shed: self.shed,
            // Only `cotal chaos` reads the daemon's loss ranges; the bench's children do not
            // send them.
            lost_ranges: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The child: `cotal bench-agents`
// ---------------------------------------------------------------------------------------------

/// Writes one line to the parent (stdout); a parent that is gone is noticed on stdin instead.
fn emit(line: &ChildLine) {
    if let Ok(text) = serde_json::to_string(line) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
}

/// Runs `cotal bench-agents`: the members until the parent says `stop` (or its stdin ends),
/// then their logs on stdout. Exit code 1 on a failure, after an `error` line.
pub async fn bench_agents(args: BenchAgentsArgs) -> ExitCode {
    match run_child(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            emit(&ChildLine::Error { error });
            ExitCode::from(1)
        }
    }
}

async fn run_child(args: BenchAgentsArgs) -> Result<(), String> {
    let space = Space::new(args.space).map_err(|e| format!("space: {e}"))?;
    let channel = Channel::new(CHANNEL).map_err(|e| format!("channel: {e}"))?;
    let live = Channel::new(LIVE_CHANNEL).map_err(|e| format!("live channel: {e}"))?;
    let cfg = ConnectConfig::new([args.nats]);
    // The parent's commands, one per line; the channel closes at the end of stdin.
    let (cmd_tx, mut commands) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if cmd_tx.send(line.trim().to_owned()).is_err() {
                break;
            }
        }
    });
    let surfaced = Arc::new(AtomicUsize::new(0));
    let joined = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Progress goes to the parent from the first member on: thousands of members take minutes
    // to start, and the parent's setup wait gives up only when nothing moves.
    let (report_stop, mut report_stopped) = watch::channel(false);
    let reporter = {
        let (joined, surfaced) = (Arc::clone(&joined), Arc::clone(&surfaced));
        tokio::spawn(async move {
            let mut reported = None;
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            loop {
                tokio::select! {
                    _ = report_stopped.changed() => break,
                    _ = tick.tick() => {
                        let now = (joined.load(Ordering::Relaxed), surfaced.load(Ordering::Relaxed));
                        if reported != Some(now) {
                            reported = Some(now);
                            emit(&ChildLine::Progress { joined: now.0, surfaced: now.1 });
                        }
                    }
                }
            }
        })
    };
    let mut members: Vec<Member> = Vec::with_capacity(args.ids.len());
    for (k, id) in args.ids.iter().enumerate() {
        let id = AgentId::new(id.clone()).map_err(|e| format!("agent id {id}: {e}"))?;
        let config = member_config(&space, &channel, &id, args.first + k);
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
    let counts = || {
        (
            joined.load(Ordering::Relaxed),
            surfaced.load(Ordering::Relaxed),
        )
    };
    loop {
        match commands.recv().await.as_deref() {
            Some("live") => {
                join_live_in_proc(&members, &live).await?;
                emit(&ChildLine::LiveJoined {
                    members: members.len(),
                });
            }
            Some("stop") | None => break,
            Some(other) => return Err(format!("unknown command from the bench: {other:?}")),
        }
    }
    let _ = report_stop.send(true);
    let _ = reporter.await;
    let (joined_n, surfaced_n) = counts();
    emit(&ChildLine::Progress {
        joined: joined_n,
        surfaced: surfaced_n,
    });
    let _ = stop_tx.send(true);
    let logs = finish_members(members).await?;
    let anchor = WallAnchor::now();
    for log in logs {
        emit(&ChildLine::Member(MemberReport::from_log(&log, anchor)));
    }
    emit(&ChildLine::Done);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The parent's side
// ---------------------------------------------------------------------------------------------

/// What the parent knows of one child, kept up to date by the thread that reads its stdout.
#[derive(Default)]
struct ProcState {
    /// The child's last cumulative counts.
    joined: usize,
    surfaced: usize,
    live_joined: bool,
    logs: Vec<MemberLog>,
    done: bool,
    /// Its stdout ended (it exited or closed it).
    ended: bool,
    /// An error it reported, or a line the parent could not read.
    error: Option<String>,
}

/// One `cotal bench-agents` child; killed by its PID on drop if still running.
struct AgentProc {
    index: usize,
    child: Mutex<Child>,
    pid: u32,
    stdin: Mutex<Option<ChildStdin>>,
    state: Arc<Mutex<ProcState>>,
    /// Its stderr (the agents' warnings), for the error when it dies.
    stderr_log: PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(child) = self.child.get_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.stderr_log);
    }
}

impl AgentProc {
    /// Sends one command line.
    fn send(&self, command: &str) -> Result<(), String> {
        let mut stdin = self
            .stdin
            .lock()
            .map_err(|_| format!("agent process {}: stdin lock poisoned", self.index))?;
        let pipe = stdin
            .as_mut()
            .ok_or_else(|| format!("agent process {}: stdin closed", self.index))?;
        writeln!(pipe, "{command}")
            .and_then(|()| pipe.flush())
            .map_err(|e| format!("agent process {} (pid {}): {e}", self.index, self.pid))
    }

    /// Reads what it reported; an error when it failed or died before `"done"`.
    fn check(&self) -> Result<(), String> {
        let state = self
            .state
            .lock()
            .map_err(|_| format!("agent process {}: state lock poisoned", self.index))?;
        let failure = match (&state.error, state.ended && !state.done) {
            (Some(e), _) => e.clone(),
            (None, true) => "exited before it reported its members".to_owned(),
            (None, false) => return Ok(()),
        };
        drop(state);
        let status = self
            .child
            .lock()
            .ok()
            .and_then(|mut c| c.try_wait().ok().flatten())
            .map_or_else(|| "still running".to_owned(), |s| s.to_string());
        let stderr = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        // Its last lines (progress lines end in a carriage return), each cut to 300 characters.
        let mut tail: Vec<String> = stderr
            .split(['\n', '\r'])
            .filter(|l| !l.trim().is_empty())
            .rev()
            .take(5)
            .map(|l| l.chars().take(300).collect())
            .collect();
        tail.reverse();
        Err(format!(
            "agent process {} (pid {}, {status}): {failure}{}",
            self.index,
            self.pid,
            if tail.is_empty() {
                String::new()
            } else {
                format!("; its stderr ends: {}", tail.join(" | "))
            }
        ))
    }
}

/// The `--agent-procs` children of a run.
pub(super) struct AgentProcs {
    procs: Vec<AgentProc>,
}

impl AgentProcs {
    /// Starts `k` children (1 ≤ k ≤ ids.len()) on `url`, child c running the c-th contiguous
    /// share of `ids`, and threads that add their reported joins and first surfacings to
    /// `joined` and `surfaced`.
    pub(super) fn spawn(
        url: &str,
        space: &Space,
        ids: &[AgentId],
        k: usize,
        surfaced: &Arc<AtomicUsize>,
        joined: &Arc<AtomicUsize>,
    ) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own binary: {e}"))?;
        let k = k.clamp(1, ids.len().max(1));
        let mut procs = Vec::with_capacity(k);
        for c in 0..k {
            let (from, to) = (c * ids.len() / k, (c + 1) * ids.len() / k);
            let share: Vec<&str> = ids[from..to].iter().map(AgentId::as_str).collect();
            let stderr_log = std::env::temp_dir().join(format!(
                "cotal-bench-{}-{}-agents{c}.log",
                std::process::id(),
                space.as_str()
            ));
            let stderr = std::fs::File::create(&stderr_log)
                .map_err(|e| format!("{}: {e}", stderr_log.display()))?;
            let mut child = std::process::Command::new(&exe)
                .args(["bench-agents", "--nats", url, "--space", space.as_str()])
                .arg("--ids")
                .arg(share.join(","))
                .arg("--first")
                .arg(from.to_string())
                .env("NO_COLOR", "1")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .map_err(|e| format!("cannot start agent process {c}: {e}"))?;
            let pid = child.id();
            let stdin = child.stdin.take();
            let stdout = child.stdout.take();
            let state = Arc::new(Mutex::new(ProcState::default()));
            let proc = AgentProc {
                index: c,
                child: Mutex::new(child),
                pid,
                stdin: Mutex::new(stdin),
                state: Arc::clone(&state),
                stderr_log,
            };
            let stdout = stdout.ok_or_else(|| format!("agent process {c}: no stdout pipe"))?;
            let (surfaced, joined) = (Arc::clone(surfaced), Arc::clone(joined));
            std::thread::spawn(move || read_child(stdout, &state, &surfaced, &joined));
            procs.push(proc);
        }
        Ok(AgentProcs { procs })
    }

    /// An error when any child failed or died.
    pub(super) fn check(&self) -> Result<(), String> {
        self.procs.iter().try_for_each(AgentProc::check)
    }

    /// CPU seconds used by every child so far, summed; `None` when one cannot be read.
    pub(super) fn cpu_seconds(&self) -> Option<f64> {
        self.procs.iter().map(|p| cpu_seconds(Some(p.pid))).sum()
    }

    /// Tells every child to join the live channel and waits (at most [`SETUP_WAIT`]) until
    /// every one reported its members joined.
    pub(super) async fn join_live(&self) -> Result<(), String> {
        self.check()?;
        for p in &self.procs {
            p.send("live")?;
        }
        let deadline = Instant::now() + SETUP_WAIT;
        loop {
            self.check()?;
            let joined = self
                .procs
                .iter()
                .filter(|p| p.state.lock().is_ok_and(|s| s.live_joined))
                .count();
            progress(&format!(
                "bench: live join, {joined}/{} agent processes",
                self.procs.len()
            ));
            if joined == self.procs.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "only {joined} of {} agent processes joined the live channel within {SETUP_WAIT:?}",
                    self.procs.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Tells every child to stop, waits (at most [`FINISH_WAIT`]) for every member's log, and
    /// (at most [`EXIT_WAIT`]) for each child to exit; a child still running then is killed.
    pub(super) async fn finish(self) -> Result<Vec<MemberLog>, String> {
        // A child that already died says why, rather than a broken pipe.
        self.check()?;
        for p in &self.procs {
            p.send("stop")?;
            // End of stdin as well: a child stuck before reading `stop` still ends.
            if let Ok(mut stdin) = p.stdin.lock() {
                stdin.take();
            }
        }
        let deadline = Instant::now() + FINISH_WAIT;
        loop {
            self.check()?;
            let done = self
                .procs
                .iter()
                .filter(|p| p.state.lock().is_ok_and(|s| s.done))
                .count();
            if done == self.procs.len() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "only {done} of {} agent processes reported their members within {FINISH_WAIT:?}",
                    self.procs.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut logs = Vec::new();
        for p in &self.procs {
            if let Ok(mut s) = p.state.lock() {
                logs.append(&mut s.logs);
            }
        }
        let exit_by = Instant::now() + EXIT_WAIT;
        for p in &self.procs {
            while Instant::now() < exit_by
                && p.child
                    .lock()
                    .is_ok_and(|mut c| matches!(c.try_wait(), Ok(None)))
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // Drop kills whatever still runs.
        Ok(logs)
    }
}

/// Reads one child's lines until its stdout ends: counts go to the run's counters (the
/// difference to the child's last cumulative counts), logs and errors into `state`.
fn read_child(
    stdout: std::process::ChildStdout,
    state: &Mutex<ProcState>,
    surfaced: &AtomicUsize,
    joined: &AtomicUsize,
) {
    // Read when the first member's report arrives, right after the child read its own.
    let mut anchor: Option<WallAnchor> = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let parsed = serde_json::from_str::<ChildLine>(&line);
        let Ok(mut s) = state.lock() else { return };
        match parsed {
            Ok(ChildLine::Progress {
                joined: j,
                surfaced: n,
            }) => {
                joined.fetch_add(j.saturating_sub(s.joined), Ordering::Relaxed);
                surfaced.fetch_add(n.saturating_sub(s.surfaced), Ordering::Relaxed);
                s.joined = s.joined.max(j);
                s.surfaced = s.surfaced.max(n);
            }
            Ok(ChildLine::LiveJoined { .. }) => s.live_joined = true,
            Ok(ChildLine::Member(report)) => {
                let anchor = *anchor.get_or_insert_with(WallAnchor::now);
                s.logs.push(report.into_log(anchor));
            }
            Ok(ChildLine::Done) => s.done = true,
            Ok(ChildLine::Error { error }) => {
                s.error.get_or_insert(error);
            }
            Err(e) => {
                let shown: String = line.chars().take(200).collect();
                s.error
                    .get_or_insert(format!("unreadable line from it ({e}): {shown}"));
            }
        }
    }
    if let Ok(mut s) = state.lock() {
        s.ended = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_ticks_come_from_the_auxiliary_vector_on_linux() {
        if std::path::Path::new("/proc/self/auxv").exists() {
            let ticks =
                super::super::member::auxv_clock_ticks().expect("AT_CLKTCK in /proc/self/auxv");
            assert!(ticks >= 1.0, "{ticks}");
            assert!(cpu_seconds(None).is_some_and(|s| s >= 0.0));
        }
    }

    #[test]
    fn the_wall_anchor_round_trips_instants_on_both_sides() {
        let a = WallAnchor::now();
        let later = a.at + Duration::from_millis(1500);
        assert_eq!(a.to_instant(a.to_wall(later)), later);
        assert_eq!(a.to_wall(later) - a.wall_ns, 1_500_000_000);
        // A wall time before the anchor maps before it.
        assert!(a.to_instant(a.wall_ns - 1_000) < a.at);
    }

    #[test]
    fn a_member_report_carries_every_field() {
        let a = WallAnchor::now();
        let mut log = MemberLog::default();
        log.first
            .insert("x".into(), a.at + Duration::from_micros(250));
        log.duplicates = 2;
        log.duplicate_ids.insert("x".into(), 2);
        log.lost_events = 1;
        log.lost_ids.insert("y".into());
        log.via_dlv = 1;
        log.lost_log.push(("y".into(), "why".into()));
        log.shed = 3;
        let line = serde_json::to_string(&ChildLine::Member(MemberReport::from_log(&log, a)))
            .expect("encode");
        let Ok(ChildLine::Member(back)) = serde_json::from_str::<ChildLine>(&line) else {
            panic!("not a member line: {line}");
        };
        let back = back.into_log(a);
        assert_eq!(back.first, log.first);
        assert_eq!(
            (back.duplicates, back.lost_events, back.via_dlv, back.shed),
            (2, 1, 1, 3)
        );
        assert_eq!(back.duplicate_ids, log.duplicate_ids);
        assert_eq!(back.lost_ids, log.lost_ids);
        assert_eq!(back.lost_log, log.lost_log);
        assert_eq!(
            serde_json::to_string(&ChildLine::Done).expect("encode"),
            "\"done\""
        );
    }
}
