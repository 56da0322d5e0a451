//! The DLV revocation sweep: a narrowed read ACL also takes back the copies already waiting in
//! the member's DLV store (issue 9, security).
//!
//! The trusted reader ([`super::authorize()`]) judges a dinbox entry against the owner's ACL
//! **before** it transfers the copy to `cotal.<s>.dlv.<owner>`. Once transferred, nothing on the
//! way out of DLV looks at the ACL again: the agent binds its `dlv_<id>` durable and surfaces
//! whatever is there, and the agent is untrusted (it cannot read its own ACL record, and a hostile
//! agent would skip any check of its own). So the take-back runs in the privileged daemon, on the
//! stream itself.
//!
//! # The rule
//!
//! A stored DLV copy of owner `X` is kept exactly when [`acl_admits`] (the reader's rule, one rule
//! in one place) says X's **current** read ACL admits the copy's `channel`. Fail closed otherwise:
//!
//! - X has no ACL on record (the record was deleted, or holds something undecodable): revoke. The
//!   reader *defers* an entry of an unknown owner, because the record may not have been written
//!   yet; a DLV copy was transferred under a record that existed, so its deletion is a removal.
//! - The payload is not a message routed to a channel (nothing can authorize it): revoke.
//!
//! # The sweep
//!
//! [`DlvSweeper`] keeps a queue of owners to sweep and sweeps one owner at a time (paced: one
//! page read in flight, at most [`MAX_DELETES_IN_FLIGHT`] deletes). A pass reads the owner's whole
//! DLV subject from sequence 1, page by page ([`Command::ReadStream`] through the pinned reader
//! [`dlv_sweep_reader`]; DLV has no direct get). The subject holds at most 1000 copies (the stream's
//! per-subject cap), so a pass is at most four pages of [`SWEEP_PAGE`]. Each copy is judged
//! against the ACL view **at the moment its page arrives**, and every copy no longer admitted is
//! deleted with [`Command::DeleteStreamMessage`]. Copies the agent already acked are judged and
//! deleted too: it costs nothing and leaves nothing of the old ACL behind.
//!
//! Triggers (the daemon calls [`DlvSweeper::request`]):
//!
//! - every ACL change the daemon's ACL watch reports for an owner of its shard (put, delete or
//!   purge). A change that arrives while that owner's pass runs marks the pass to run again, since
//!   pages already judged used the older view;
//! - **start and lease takeover:** the watch delivers every current ACL record first, and each is
//!   a change to a fresh daemon, so every owner that has an ACL record is swept once, one after
//!   the other. This is the answer to narrowings that happened while no daemon ran: nothing is
//!   persisted, a new daemon simply re-checks every DLV subject. A reconnect replays the same
//!   revisions, which are not changes, and sweeps nothing new;
//! - a transfer that completes (in any outcome) for a channel the owner's **current** ACL no
//!   longer admits: the reader judged it under the older view and the copy may have landed after
//!   the pass read past it.
//!
//! Outcomes, per command:
//!
//! | command | Success | `NotFound` | other failure | Unknown |
//! |---|---|---|---|---|
//! | read a page | judge, delete, next page | pass in trouble | pass in trouble | pass in trouble |
//! | delete a copy | [`SweepEvent::Revoked`] | already gone: nothing to do | pass in trouble | pass in trouble (the next pass re-reads and sees) |
//!
//! A pass in trouble finishes what is in flight and then runs again from sequence 1 after
//! [`backoff`] (1 s, 2 s, …), at most [`SWEEP_ATTEMPTS`] passes; then [`SweepEvent::Failed`]
//! reports that copies of a narrowed channel may still be in the owner's DLV (the next ACL change
//! or daemon start sweeps again). Every pass that ends is [`SweepEvent::Finished`] or
//! [`SweepEvent::Retrying`]; a sweep never ends in silence.
//!
//! # The guarantee, precisely
//!
//! Once a sweep of owner `X` that started after an ACL change was observed finishes, X's DLV
//! subject holds no copy of a channel that change took away (and no copy transferred later does
//! either: the reader drops those, and the transfer hook above sweeps a transfer that raced the
//! change). A copy the agent's client **already pulled** from its `dlv_<id>` before the delete can
//! still be surfaced: deleting the stored message does not recall a delivery in flight. The
//! window is therefore *ACL change observed by the daemon → sweep finished* (a few API round
//! trips per page on a healthy server: about 10 ms from the acknowledged ACL write to a clean DLV
//! subject on loopback, measured by `sec_narrowed_acl_stops_backstop_copies_already_in_dlv`),
//! plus whatever the agent's client held unacked at that moment.
//! Deleting a message an agent holds unacked is harmless: its ack of a deleted sequence is a
//! no-op and the consumer never redelivers it.
//!
//! # Grants and limits
//!
//! The daemon credential ([`crate::wire::permissions::Permissions::delivery`]) holds
//! `STREAM.MSG.DELETE` on DLV and the consumer verbs of the one pinned reader name, nothing that
//! could create or change an agent's `dlv_<id>`. Like the INBOX reader's grant, it names shard 0
//! of 1: a sharded daemon's sweep reads are refused until its credential names its own
//! `dlvsweep_<i>`, and each such sweep ends in [`SweepEvent::Failed`] (reported, counted).
//! A start sweeps every owner with an ACL record, one after the other: a space with thousands of
//! agents pays one short read (three API calls) per owner at every daemon start.

use crate::acl::ReadAcl;
use crate::constants::backoff;
use crate::delivery::authorize::acl_admits;
use crate::delivery::daemon::index::AclIndex;
use crate::io::{Command, ReadStart, Reply, StoredMessage};
use crate::op::{Failure, OpId, OpIds, Outcome};
use crate::time::Instant;
use crate::wire::config::SpaceStream;
use crate::wire::json;
use crate::wire::message::CotalMessage;
use crate::wire::shard::{Shard, dlv_sweep_reader};
use crate::wire::subject::Subject;
use crate::wire::token::{AgentId, ConcreteChannel, Space};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// Passes of one owner's sweep before it is reported as failed.
pub const SWEEP_ATTEMPTS: u32 = 5;

/// Copies read per page.
pub const SWEEP_PAGE: u32 = 256;

/// Deletes of one sweep in flight at once.
pub const MAX_DELETES_IN_FLIGHT: usize = 64;

/// What the sweep decides for one stored DLV copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyVerdict {
    /// The owner's current ACL admits the copy's channel.
    Keep,
    /// Delete it: its channel (`None` when the payload names none) is not admitted.
    Revoke {
        /// The copy's channel, when the payload names one.
        channel: Option<ConcreteChannel>,
    },
}

/// Judges one stored DLV copy (the bare `CotalMessage`) against the owner's current read ACL
/// (`None`: no record). See the [module docs](self) for the fail-closed cases.
pub fn judge_copy(acl: Option<&ReadAcl>, payload: &[u8]) -> CopyVerdict {
    let channel = json::decode::<CotalMessage>(payload)
        .ok()
        .and_then(|m| m.channel().cloned());
    match (acl, channel) {
        (Some(acl), Some(ch)) if acl_admits(acl, &ch) => CopyVerdict::Keep,
        (_, channel) => CopyVerdict::Revoke { channel },
    }
}

/// What the sweeper reports.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SweepEvent {
    /// A DLV copy was deleted: its owner will not surface it (unless its client already held it).
    Revoked {
        /// The owner.
        owner: AgentId,
        /// The copy's channel (`None`: the payload named none).
        channel: Option<ConcreteChannel>,
        /// The DLV stream sequence.
        seq: u64,
    },
    /// A sweep of one owner finished cleanly.
    Finished {
        /// The owner.
        owner: AgentId,
        /// Copies deleted by this sweep (all passes).
        revoked: u64,
        /// Copies judged and kept in the last pass.
        kept: u64,
        /// Passes run.
        passes: u32,
    },
    /// A pass ran into a failed or unknown read or delete; another pass follows after `delay`.
    Retrying {
        /// The owner.
        owner: AgentId,
        /// The pass that failed (1-based).
        pass: u32,
        /// What went wrong first.
        detail: String,
    },
    /// [`SWEEP_ATTEMPTS`] passes failed: copies the owner may no longer read may still be in its
    /// DLV until the next ACL change or daemon start.
    Failed {
        /// The owner.
        owner: AgentId,
        /// Copies deleted before giving up.
        revoked: u64,
        /// What went wrong last.
        detail: String,
    },
}

impl fmt::Display for SweepEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SweepEvent::Revoked {
                owner,
                channel,
                seq,
            } => match channel {
                Some(ch) => write!(
                    f,
                    "dlv sweep: revoked {owner}'s copy of {ch} (dlv seq {seq})"
                ),
                None => write!(
                    f,
                    "dlv sweep: revoked {owner}'s unroutable copy (dlv seq {seq})"
                ),
            },
            SweepEvent::Finished {
                owner,
                revoked,
                kept,
                passes,
            } => write!(
                f,
                "dlv sweep of {owner}: {revoked} revoked, {kept} kept, {passes} pass(es)"
            ),
            SweepEvent::Retrying {
                owner,
                pass,
                detail,
            } => write!(
                f,
                "dlv sweep of {owner}: pass {pass} failed ({detail}), retrying"
            ),
            SweepEvent::Failed {
                owner,
                revoked,
                detail,
            } => write!(
                f,
                "dlv sweep of {owner} gave up after {SWEEP_ATTEMPTS} passes ({revoked} revoked): {detail}"
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadState {
    Wanted,
    InFlight(OpId),
    Done,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Sweep {
    owner: AgentId,
    subject: String,
    next_start: u64,
    read: ReadState,
    to_delete: VecDeque<(u64, Option<ConcreteChannel>)>,
    deleting: BTreeMap<OpId, (u64, Option<ConcreteChannel>)>,
    trouble: Option<String>,
    /// Passes finished in trouble.
    failed_passes: u32,
    /// An ACL change arrived during the pass: sweep again afterwards.
    again: bool,
    resume_at: Option<Instant>,
    revoked: u64,
    kept: u64,
}

impl Sweep {
    fn new(space: &Space, owner: AgentId) -> Self {
        let subject = Subject::Dlv {
            space: space.clone(),
            owner: owner.clone(),
        }
        .to_string();
        Sweep {
            owner,
            subject,
            next_start: 1,
            read: ReadState::Wanted,
            to_delete: VecDeque::new(),
            deleting: BTreeMap::new(),
            trouble: None,
            failed_passes: 0,
            again: false,
            resume_at: None,
            revoked: 0,
            kept: 0,
        }
    }

    /// Starts the pass over from sequence 1 (what is in flight is forgotten).
    fn restart(&mut self) {
        self.next_start = 1;
        self.read = ReadState::Wanted;
        self.to_delete.clear();
        self.deleting.clear();
        self.trouble = None;
        self.kept = 0;
    }

    fn troubled(&mut self, detail: String) {
        self.trouble.get_or_insert(detail);
    }

    fn pass_over(&self) -> bool {
        self.read == ReadState::Done && self.to_delete.is_empty() && self.deleting.is_empty()
    }
}

/// The DLV revocation sweeper of one daemon shard. See the [module docs](self).
///
/// It is driven by its daemon: [`request`](Self::request) on ACL changes,
/// [`pump`](Self::pump) after every input while the daemon may write (it allocates the commands'
/// ids from the daemon's [`OpIds`]), [`on_completion`](Self::on_completion) for the completions of
/// those commands, [`interrupt`](Self::interrupt) when the connection or the lease is lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DlvSweeper {
    space: Space,
    stream: String,
    reader: String,
    page: u32,
    queue: VecDeque<AgentId>,
    /// The owners in `queue`, for the idempotence check: a daemon loading 100,000 ACL records
    /// requests 100,000 sweeps, and a scan of the queue per request made that quadratic (found
    /// by `cotal bench --memory --members 100000`, issue 22).
    queued_owners: BTreeSet<AgentId>,
    active: Option<Sweep>,
    events: VecDeque<SweepEvent>,
}

impl DlvSweeper {
    /// A sweeper for `shard` of `space`, with nothing queued.
    pub fn new(space: &Space, shard: Shard) -> Self {
        DlvSweeper {
            space: space.clone(),
            stream: SpaceStream::Dlv.name(space),
            reader: dlv_sweep_reader(shard.index(), shard.shards()),
            page: SWEEP_PAGE,
            queue: VecDeque::new(),
            queued_owners: BTreeSet::new(),
            active: None,
            events: VecDeque::new(),
        }
    }

    /// The same with another page size (at least 1).
    pub fn with_page(mut self, page: u32) -> Self {
        self.page = page.max(1);
        self
    }

    /// Asks for a sweep of `owner`'s DLV subject (idempotent while queued; marks a running sweep
    /// of the same owner to run again).
    pub fn request(&mut self, owner: AgentId) {
        if let Some(s) = self.active.as_mut()
            && s.owner == owner
        {
            s.again = true;
            return;
        }
        if self.queued_owners.insert(owner.clone()) {
            self.queue.push_back(owner);
        }
    }

    /// Owners waiting for a sweep (the running one not included).
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The owner being swept, if any.
    pub fn active(&self) -> Option<&AgentId> {
        self.active.as_ref().map(|s| &s.owner)
    }

    /// True when nothing is queued or running.
    pub fn idle(&self) -> bool {
        self.active.is_none() && self.queue.is_empty()
    }

    /// The commands due now: the next page read, deletes up to the in-flight bound, and the start
    /// of the next queued sweep. Call only while the daemon is connected and may write.
    pub fn pump(&mut self, now: Instant, ops: &mut OpIds) -> Vec<Command> {
        let mut out = Vec::new();
        loop {
            let Some(s) = self.active.as_mut() else {
                let Some(owner) = self.queue.pop_front() else {
                    return out;
                };
                self.queued_owners.remove(&owner);
                self.active = Some(Sweep::new(&self.space, owner));
                continue;
            };
            if s.resume_at.is_some_and(|at| now < at) {
                return out;
            }
            s.resume_at = None;
            if s.read == ReadState::Wanted {
                let op = ops.next_id();
                s.read = ReadState::InFlight(op);
                out.push(Command::ReadStream {
                    op,
                    stream: self.stream.clone(),
                    filter: s.subject.clone(),
                    start: ReadStart::Seq(s.next_start),
                    last_seq: None,
                    max: self.page,
                    reader: Some(self.reader.clone()),
                });
            }
            while s.deleting.len() < MAX_DELETES_IN_FLIGHT
                && let Some((seq, channel)) = s.to_delete.pop_front()
            {
                let op = ops.next_id();
                s.deleting.insert(op, (seq, channel));
                out.push(Command::DeleteStreamMessage {
                    op,
                    stream: self.stream.clone(),
                    seq,
                });
            }
            if !s.pass_over() {
                return out;
            }
            self.end_pass(now);
        }
    }

    fn end_pass(&mut self, now: Instant) {
        let Some(mut s) = self.active.take() else {
            return;
        };
        match s.trouble.take() {
            Some(detail) => {
                s.failed_passes = s.failed_passes.saturating_add(1);
                if s.failed_passes >= SWEEP_ATTEMPTS {
                    self.events.push_back(SweepEvent::Failed {
                        owner: s.owner.clone(),
                        revoked: s.revoked,
                        detail,
                    });
                    if s.again {
                        self.request(s.owner);
                    }
                    return;
                }
                self.events.push_back(SweepEvent::Retrying {
                    owner: s.owner.clone(),
                    pass: s.failed_passes,
                    detail,
                });
                s.restart();
                s.resume_at = Some(now + backoff(s.failed_passes - 1));
                self.active = Some(s);
            }
            None => {
                self.events.push_back(SweepEvent::Finished {
                    owner: s.owner.clone(),
                    revoked: s.revoked,
                    kept: s.kept,
                    passes: s.failed_passes + 1,
                });
                if s.again {
                    self.request(s.owner);
                }
            }
        }
    }

    /// A completion of a command [`pump`](Self::pump) issued; judged against `acls` as they are
    /// now. Completions of forgotten commands (before an [`interrupt`](Self::interrupt)) are
    /// ignored.
    pub fn on_completion(&mut self, op: OpId, outcome: Outcome<Reply>, acls: &AclIndex) {
        let Some(s) = self.active.as_mut() else {
            return;
        };
        if s.read == ReadState::InFlight(op) {
            s.read = ReadState::Done;
            match outcome {
                Outcome::Success(Reply::Stored(page)) => {
                    let acl = acls.get(&s.owner).map(|v| &v.read);
                    on_page(s, &page, acl, self.page);
                }
                Outcome::Success(other) => s.troubled(format!("read: unexpected reply {other:?}")),
                Outcome::Failed(f) => s.troubled(format!("read: {f}")),
                Outcome::Unknown => s.troubled("read: outcome unknown".to_owned()),
            }
            return;
        }
        let Some((seq, channel)) = s.deleting.remove(&op) else {
            return;
        };
        match outcome {
            Outcome::Success(_) => {
                s.revoked += 1;
                self.events.push_back(SweepEvent::Revoked {
                    owner: s.owner.clone(),
                    channel,
                    seq,
                });
            }
            // Already gone (evicted by the per-subject cap, or an earlier delete whose answer was
            // lost): what the sweep wanted holds.
            Outcome::Failed(Failure::NotFound) => {}
            Outcome::Failed(f) => s.troubled(format!("delete dlv seq {seq}: {f}")),
            Outcome::Unknown => s.troubled(format!("delete dlv seq {seq}: outcome unknown")),
        }
    }

    /// The connection (or the lease) is gone: every command in flight is forgotten and the
    /// running sweep starts its pass over once [`pump`](Self::pump) is called again. Queued owners
    /// stay queued.
    pub fn interrupt(&mut self) {
        if let Some(s) = self.active.as_mut() {
            s.restart();
            s.resume_at = None;
        }
    }

    /// When [`pump`](Self::pump) has something to do again after a backoff.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.active.as_ref().and_then(|s| s.resume_at)
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<SweepEvent> {
        self.events.pop_front()
    }
}

fn on_page(s: &mut Sweep, page: &[StoredMessage], acl: Option<&ReadAcl>, page_size: u32) {
    for m in page {
        debug_assert_eq!(m.subject, s.subject, "the read's filter was ignored");
        if m.subject != s.subject {
            continue; // never judge another owner's copy as this one's
        }
        match judge_copy(acl, &m.payload) {
            CopyVerdict::Keep => s.kept += 1,
            CopyVerdict::Revoke { channel } => s.to_delete.push_back((m.seq, channel)),
        }
    }
    match page.last() {
        Some(last) if page.len() >= page_size as usize => {
            s.next_start = last.seq.saturating_add(1);
            s.read = ReadState::Wanted;
        }
        _ => s.read = ReadState::Done,
    }
}

#[cfg(test)]
mod tests;
