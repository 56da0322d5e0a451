//! The control jobs (life cycle step 3 in [`super`]): each control request is admitted by the
//! gate ([`admit`]), requests of other shards' owners are left to their daemon, and the rest run
//! as jobs serialized per `(owner, channel)` in lanes (G22); a join in catch-up leaves its lane
//! to a leave of the same key (B9/B21).
//!
//! [`Jobs`] owns the jobs, the lanes, the count of requests held (the busy limit) and its own
//! pending table (op → job and step): KV reads and CAS writes of the members bucket, reads of
//! the owner's ACL, CHAT stream info and reads, catch-up dinbox publishes, and the replies. The
//! steps of a join live in `jobs/join.rs`, of a leave in `jobs/leave.rs`.
//!
//! Each call gets an [`Env`] from the parent for its length: the shared context, the
//! configuration, the lease's writer (fencing token) at this instant, whether the daemon
//! serves, the membership index (read for a listing, written with our own confirmed writes), the
//! channel registry (a live-class join, G38), and fan-out (its highest sequence for the fence;
//! catch-up's copies counted in its inbox backlog).

use super::config::{CATCHUP_PUBLISH_ATTEMPTS, DeliveryConfig};
use super::context::Ctx;
use super::events::{AbandonReason, DeliveryEvent};
use super::fanout::Fanout;
use super::index::MemberIndex;
use super::types::{
    Job, JobId, JobKind, JobOp, JoinJob, JoinPhase, Lane, LeaveJob, LeavePhase, outcome_detail,
};
use crate::constants::{KV_CAS_ATTEMPTS, MAX_MSGS_PER_SUBJECT};
use crate::delivery::control::{
    Admission, SerialKey, Work, admit, durable_join_reply, durable_leave_reply, encode_reply,
    failure_reply, list_memberships_reply, live_class_join_reply,
};
use crate::delivery::route::Routed;
use crate::io::{Command, KvCondition, KvOperation, ReadStart, Reply, StoredMessage};
use crate::op::{Failure, OpId, Outcome};
use crate::policy::ChannelRegistry;
use crate::registry::{
    ActivatePlan, JoinPlan, MemberSnapshot, Precondition, RegistryError, TombstonePlan,
    WriteIntent, Writer, plan_activate, plan_join, plan_tombstone,
};
use crate::time::Now;
use crate::wire::config::SpaceStream;
use crate::wire::control::{REASON_LIVE_CLASS, REASON_PARTIALLY_EVICTED, REASON_SUPERSEDED};
use crate::wire::json;
use crate::wire::keys::{KvBucket, acl_key, member_key};
use crate::wire::message::CotalMessage;
use crate::wire::records::Plane3Entry;
use crate::wire::subject::{Subject, chat_subscribe_pattern};
use crate::wire::token::{AgentId, ConcreteChannel};
use std::collections::BTreeMap;

mod join;
mod leave;

/// What the parent lends the jobs for one call.
pub(super) struct Env<'a> {
    pub(super) cx: &'a mut Ctx,
    pub(super) config: &'a DeliveryConfig,
    /// The lease's writer at this instant; `None` once the lease is not held.
    pub(super) writer: Option<Writer>,
    /// Whether the daemon serves control requests ([`super::Delivery::serving`]).
    pub(super) serving: bool,
    pub(super) members: &'a mut MemberIndex,
    pub(super) channels: &'a ChannelRegistry,
    pub(super) fanout: &'a mut Fanout,
}

/// The control-jobs child of [`super::Delivery`].
#[derive(Debug, Default)]
pub(super) struct Jobs {
    next_job: JobId,
    jobs: BTreeMap<JobId, Job>,
    lanes: BTreeMap<SerialKey, Lane>,
    /// Requests admitted and not answered yet (the busy limit).
    held_requests: usize,
    /// The ops in flight: op → (job, step).
    pending: BTreeMap<OpId, (JobId, JobOp)>,
}

impl Jobs {
    /// The CHAT frontier read by a running leave of `(owner, channel)` that is writing (or about
    /// to write, or re-planning) its tombstone; `None` when no leave of that key has read one.
    /// The reader holds entries past it ([`crate::delivery::authorize::hold_for_leave`]).
    pub(super) fn leave_frontier(&self, owner: &AgentId, channel: &ConcreteChannel) -> Option<u64> {
        self.jobs
            .values()
            .filter(|j| &j.owner == owner && &j.channel == channel)
            .filter_map(|j| match &j.kind {
                JobKind::Leave(l) if l.phase == LeavePhase::Write || l.attempts > 0 => {
                    Some(l.frontier)
                }
                _ => None,
            })
            .min()
    }

    /// Whether `op` is one of the jobs' ops.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.pending.contains_key(&op)
    }

    /// A completion of one of the jobs' ops.
    pub(super) fn on_completion(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        op: OpId,
        outcome: Outcome<Reply>,
    ) {
        if let Some((job, what)) = self.pending.remove(&op) {
            self.on_job_completion(env, now, job, what, outcome);
        }
    }

    /// Pumps every lane (the daemon just became ready).
    pub(super) fn pump_all(&mut self, env: &mut Env<'_>, now: Now) {
        let keys: Vec<SerialKey> = self.lanes.keys().cloned().collect();
        for key in keys {
            self.pump(env, now, &key);
        }
    }

    /// Queues the orphan reaper's leave on its membership's lane, unless a join or leave of it
    /// is running (it decides first; the next scan looks again). True when queued.
    pub(super) fn reap(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        key: SerialKey,
        leave: crate::delivery::control::LeaveWork,
    ) -> bool {
        if self.lanes.contains_key(&key) {
            return false;
        }
        env.cx.counters.orphans_reaped += 1;
        self.held_requests += 1;
        self.lanes
            .entry(key.clone())
            .or_default()
            .queue
            .push_back(Work::Leave(leave));
        self.pump(env, now, &key);
        true
    }
    pub(super) fn on_control(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
    ) {
        match admit(&env.config.space, subject, reply, payload) {
            Admission::Ignored(u) => env.cx.emit(DeliveryEvent::ControlIgnored(u)),
            Admission::Refused(r) => {
                if !env.config.shard.owns(&r.subject_sender) {
                    return;
                }
                env.cx.publish_reply(&r.reply_to, r.reply);
                env.cx.emit(DeliveryEvent::ControlRefused {
                    requester: r.subject_sender,
                    error: r.reason.to_string(),
                });
            }
            Admission::Admitted(a) => {
                if !env.config.shard.owns(&a.requester) {
                    return; // the owner's shard answers
                }
                if self.held_requests >= env.config.max_requests {
                    let error = "delivery daemon busy: too many control requests in flight";
                    env.cx.publish_reply(&a.reply_to, failure_reply(error));
                    env.cx.emit(DeliveryEvent::ControlRefused {
                        requester: a.requester,
                        error: error.into(),
                    });
                    return;
                }
                let key = a.serial_key();
                self.held_requests += 1;
                self.lanes
                    .entry(key.clone())
                    .or_default()
                    .queue
                    .push_back(a.into_work());
                self.pump(env, now, &key);
            }
        }
    }

    /// Starts what may run on `key`'s lane.
    pub(super) fn pump(&mut self, env: &mut Env<'_>, now: Now, key: &SerialKey) {
        if !env.serving {
            return;
        }
        loop {
            let Some(lane) = self.lanes.get_mut(key) else {
                return;
            };
            if lane.active.is_some() {
                return;
            }
            if lane.finish_waiting {
                lane.finish_waiting = false;
                let Some(job) = lane.catching_up.take() else {
                    continue;
                };
                lane.active = Some(job);
                self.start_finish(env, now, job);
                continue;
            }
            let blocked =
                matches!(lane.queue.front(), Some(Work::Join(_))) && lane.catching_up.is_some();
            if blocked {
                return;
            }
            let Some(work) = lane.queue.pop_front() else {
                if lane.catching_up.is_none() {
                    self.lanes.remove(key);
                }
                return;
            };
            match work {
                Work::List(list) => {
                    self.held_requests = self.held_requests.saturating_sub(1);
                    let reply = list_memberships_reply(env.members.owner_memberships(&list.owner));
                    env.cx.publish_reply(&list.reply_to, reply);
                }
                Work::Join(join) => {
                    let id = self.new_job(Job {
                        key: key.clone(),
                        owner: join.owner.clone(),
                        channel: join.channel.clone(),
                        reply_to: join.reply_to.clone(),
                        kind: JobKind::Join(Box::new(JoinJob {
                            watermark: join.join_cursor,
                            phase: JoinPhase::ReadAcl,
                            attempts: 0,
                            frontier: 0,
                            generation: 0,
                            join_cursor: 0,
                            watermark_use: None,
                            fence: 0,
                            stream_first: 0,
                            next_start: 0,
                            exhausted: false,
                            outstanding: 0,
                            copied: 0,
                            subjects: BTreeMap::new(),
                            evicted: None,
                        })),
                    });
                    if let Some(lane) = self.lanes.get_mut(key) {
                        lane.active = Some(id);
                    }
                    let bucket = KvBucket::Acl.name(&env.config.space);
                    let key = acl_key(&join.owner);
                    self.job_cmd(env, id, JobOp::Acl, |op| Command::KvGet { op, bucket, key });
                }
                Work::Leave(leave) => {
                    let id = self.new_job(Job {
                        key: key.clone(),
                        owner: leave.owner.clone(),
                        channel: leave.channel.clone(),
                        reply_to: leave.reply_to.clone(),
                        kind: JobKind::Leave(Box::new(LeaveJob {
                            generation: leave.generation,
                            phase: LeavePhase::ReadMember,
                            attempts: 0,
                            snapshot: None,
                            frontier: 0,
                        })),
                    });
                    if let Some(lane) = self.lanes.get_mut(key) {
                        lane.active = Some(id);
                    }
                    self.read_member(env, id);
                }
            }
        }
    }

    pub(super) fn new_job(&mut self, job: Job) -> JobId {
        self.next_job += 1;
        let id = self.next_job;
        self.jobs.insert(id, job);
        id
    }

    pub(super) fn job_cmd(
        &mut self,
        env: &mut Env<'_>,
        job: JobId,
        what: JobOp,
        make: impl FnOnce(OpId) -> Command,
    ) {
        let op = env.cx.op();
        self.pending.insert(op, (job, what));
        env.cx.push(make(op));
    }

    pub(super) fn read_member(&mut self, env: &mut Env<'_>, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let bucket = KvBucket::Members.name(&env.config.space);
        let key = member_key(&job.channel, &job.owner);
        self.job_cmd(env, id, JobOp::Member, |op| Command::KvGet {
            op,
            bucket,
            key,
        });
    }

    pub(super) fn read_frontier(&mut self, env: &mut Env<'_>, id: JobId, what: JobOp) {
        let stream = SpaceStream::Chat.name(&env.config.space);
        self.job_cmd(env, id, what, |op| Command::StreamInfo { op, stream });
    }

    pub(super) fn write_intent(&mut self, env: &mut Env<'_>, id: JobId, intent: WriteIntent) {
        let bucket = KvBucket::Members.name(&env.config.space);
        let key = intent.key().to_owned();
        let value = intent.encode();
        let condition = match intent.precondition() {
            Precondition::CreateOnly => KvCondition::CreateOnly,
            Precondition::Revision(r) => KvCondition::Revision(r),
        };
        self.job_cmd(env, id, JobOp::Write(Box::new(intent)), |op| {
            Command::KvPut {
                op,
                bucket,
                key,
                value,
                condition,
            }
        });
    }

    /// Ends a job (its reply, if any, already sent) and lets its lane move on.
    pub(super) fn end_job(&mut self, env: &mut Env<'_>, now: Now, id: JobId) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        self.held_requests = self.held_requests.saturating_sub(1);
        self.pending.retain(|_, (job, _)| *job != id);
        if let Some(lane) = self.lanes.get_mut(&job.key) {
            if lane.active == Some(id) {
                lane.active = None;
            }
            if lane.catching_up == Some(id) {
                lane.catching_up = None;
                lane.finish_waiting = false;
            }
        }
        self.pump(env, now, &job.key);
    }

    pub(super) fn abandon(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        reason: AbandonReason,
    ) {
        if let Some(job) = self.jobs.get(&id) {
            env.cx.counters.abandoned += 1;
            if matches!(reason, AbandonReason::Fenced(_)) {
                env.cx.counters.fenced += 1;
            }
            env.cx.events.push_back(DeliveryEvent::Abandoned {
                owner: job.owner.clone(),
                channel: Some(job.channel.clone()),
                reason,
            });
        }
        self.end_job(env, now, id);
    }

    pub(super) fn abandon_jobs(&mut self, cx: &mut Ctx, reason: AbandonReason) {
        let jobs = std::mem::take(&mut self.jobs);
        for job in jobs.into_values() {
            cx.counters.abandoned += 1;
            cx.events.push_back(DeliveryEvent::Abandoned {
                owner: job.owner,
                channel: Some(job.channel),
                reason: reason.clone(),
            });
        }
        let queued: usize = self.lanes.values().map(|l| l.queue.len()).sum();
        cx.counters.abandoned += queued as u64;
        self.lanes.clear();
        self.held_requests = 0;
        self.pending.clear();
    }

    pub(super) fn reply_join(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        durable: bool,
        reason: Option<&str>,
    ) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let JobKind::Join(j) = &job.kind else {
            return;
        };
        let payload = durable_join_reply(durable, reason, j.generation, Some(j.join_cursor));
        let event = DeliveryEvent::Joined {
            owner: job.owner.clone(),
            channel: job.channel.clone(),
            generation: j.generation,
            join_cursor: j.join_cursor,
            watermark: j.watermark_use,
            durable,
            reason: reason.map(str::to_owned),
            copied: j.copied,
        };
        let to = job.reply_to.clone();
        env.cx.publish_reply(&to, payload);
        env.cx.emit(event);
        self.end_job(env, now, id);
    }

    /// Whether the channel of join `id` resolves live ([`crate::policy::ChannelRegistry::policy_for`],
    /// the resolver fan-out routes by): a membership there would route nothing (G38).
    pub(super) fn join_is_live_class(&self, channels: &ChannelRegistry, id: JobId) -> bool {
        self.jobs
            .get(&id)
            .is_some_and(|job| !channels.policy_for(&job.channel.as_channel()).is_durable())
    }

    /// Answers a join on a live-class channel `{durable:false, reason}` without a generation and
    /// writes nothing: the daemon does not claim a backstop fan-out will not give (issue 15
    /// item 5, G38). A record the owner already holds is left as it is (its leave still works).
    pub(super) fn reply_live_class(&mut self, env: &mut Env<'_>, now: Now, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        env.cx.counters.live_class_joins += 1;
        let event = DeliveryEvent::Joined {
            owner: job.owner.clone(),
            channel: job.channel.clone(),
            generation: 0,
            join_cursor: 0,
            watermark: None,
            durable: false,
            reason: Some(REASON_LIVE_CLASS.to_owned()),
            copied: 0,
        };
        let to = job.reply_to.clone();
        env.cx.publish_reply(&to, live_class_join_reply());
        env.cx.emit(event);
        self.end_job(env, now, id);
    }

    pub(super) fn fail_job(&mut self, env: &mut Env<'_>, now: Now, id: JobId, error: String) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let to = job.reply_to.clone();
        let event = match &job.kind {
            JobKind::Join(_) => DeliveryEvent::JoinFailed {
                owner: job.owner.clone(),
                channel: job.channel.clone(),
                error: error.clone(),
            },
            JobKind::Leave(_) => DeliveryEvent::LeaveFailed {
                owner: job.owner.clone(),
                channel: job.channel.clone(),
                error: error.clone(),
            },
        };
        env.cx.publish_reply(&to, failure_reply(error));
        env.cx.emit(event);
        self.end_job(env, now, id);
    }

    /// A registry refusal: fenced → abandon; anything else → an error reply.
    pub(super) fn registry_error(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        e: RegistryError,
    ) {
        if matches!(e, RegistryError::Fenced { .. }) {
            self.abandon(env, now, id, AbandonReason::Fenced(e));
        } else {
            self.fail_job(env, now, id, e.to_string());
        }
    }

    pub(super) fn on_job_completion(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        what: JobOp,
        outcome: Outcome<Reply>,
    ) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        match &job.kind {
            JobKind::Join(_) => self.on_join_step(env, now, id, what, outcome),
            JobKind::Leave(_) => self.on_leave_step(env, now, id, what, outcome),
        }
    }

    pub(super) fn snapshot_of(
        &self,
        id: JobId,
        outcome: &Outcome<Reply>,
    ) -> Option<MemberSnapshot> {
        let job = self.jobs.get(&id)?;
        match outcome {
            Outcome::Success(Reply::Kv(entry)) => {
                let (value, revision) = match entry {
                    Some(e) if e.operation == KvOperation::Put => (Some(&e.value[..]), e.revision),
                    Some(e) => (None, e.revision),
                    None => (None, 0),
                };
                Some(MemberSnapshot::from_kv(
                    job.channel.clone(),
                    job.owner.clone(),
                    value,
                    revision,
                ))
            }
            _ => None,
        }
    }

    /// A failed or unknown read: the job fails with an error reply naming what could not be read.
    pub(super) fn read_failed(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        what: &str,
        outcome: &Outcome<Reply>,
    ) {
        let detail = outcome_detail(outcome);
        self.fail_job(
            env,
            now,
            id,
            format!("delivery daemon could not read {what}: {detail}"),
        );
    }

    pub(super) fn join_mut(&mut self, id: JobId) -> Option<&mut JoinJob> {
        match &mut self.jobs.get_mut(&id)?.kind {
            JobKind::Join(j) => Some(j),
            JobKind::Leave(_) => None,
        }
    }
}
