//! The control jobs: admission of control requests, lanes serialized per `(owner, channel)`,
//! and the steps joins and leaves share (reads, writes, replies, ends).

use super::*;

impl Delivery {
    pub(super) fn on_control(
        &mut self,
        now: Now,
        subject: &str,
        reply: Option<&str>,
        payload: &[u8],
    ) {
        match admit(&self.config.space, subject, reply, payload) {
            Admission::Ignored(u) => self.emit(DeliveryEvent::ControlIgnored(u)),
            Admission::Refused(r) => {
                if !self.config.shard.owns(&r.subject_sender) {
                    return;
                }
                self.publish_reply(&r.reply_to, r.reply);
                self.emit(DeliveryEvent::ControlRefused {
                    requester: r.subject_sender,
                    error: r.reason.to_string(),
                });
            }
            Admission::Admitted(a) => {
                if !self.config.shard.owns(&a.requester) {
                    return; // the owner's shard answers
                }
                if self.held_requests >= self.config.max_requests {
                    let error = "delivery daemon busy: too many control requests in flight";
                    self.publish_reply(&a.reply_to, failure_reply(error));
                    self.emit(DeliveryEvent::ControlRefused {
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
                self.pump(now, &key);
            }
        }
    }

    /// Starts what may run on `key`'s lane.
    pub(super) fn pump(&mut self, now: Now, key: &SerialKey) {
        if !self.serving() {
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
                self.start_finish(now, job);
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
                    let reply =
                        list_memberships_reply(self.views.members.owner_memberships(&list.owner));
                    self.publish_reply(&list.reply_to, reply);
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
                    let bucket = KvBucket::Acl.name(&self.config.space);
                    let key = acl_key(&join.owner);
                    self.job_cmd(id, JobOp::Acl, |op| Command::KvGet { op, bucket, key });
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
                    self.read_member(id);
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

    pub(super) fn job_cmd(&mut self, job: JobId, what: JobOp, make: impl FnOnce(OpId) -> Command) {
        let op = self.op(Pending::Job { job, what });
        self.cx.commands.push_back(make(op));
    }

    pub(super) fn read_member(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let bucket = KvBucket::Members.name(&self.config.space);
        let key = member_key(&job.channel, &job.owner);
        self.job_cmd(id, JobOp::Member, |op| Command::KvGet { op, bucket, key });
    }

    pub(super) fn read_frontier(&mut self, id: JobId, what: JobOp) {
        let stream = SpaceStream::Chat.name(&self.config.space);
        self.job_cmd(id, what, |op| Command::StreamInfo { op, stream });
    }

    pub(super) fn write_intent(&mut self, id: JobId, intent: WriteIntent) {
        let bucket = KvBucket::Members.name(&self.config.space);
        let key = intent.key().to_owned();
        let value = intent.encode();
        let condition = match intent.precondition() {
            Precondition::CreateOnly => KvCondition::CreateOnly,
            Precondition::Revision(r) => KvCondition::Revision(r),
        };
        self.job_cmd(id, JobOp::Write(Box::new(intent)), |op| Command::KvPut {
            op,
            bucket,
            key,
            value,
            condition,
        });
    }

    /// Ends a job (its reply, if any, already sent) and lets its lane move on.
    pub(super) fn end_job(&mut self, now: Now, id: JobId) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        self.held_requests = self.held_requests.saturating_sub(1);
        self.pending
            .retain(|_, p| !matches!(p, Pending::Job { job, .. } if *job == id));
        if let Some(lane) = self.lanes.get_mut(&job.key) {
            if lane.active == Some(id) {
                lane.active = None;
            }
            if lane.catching_up == Some(id) {
                lane.catching_up = None;
                lane.finish_waiting = false;
            }
        }
        self.pump(now, &job.key);
    }

    pub(super) fn abandon(&mut self, now: Now, id: JobId, reason: AbandonReason) {
        if let Some(job) = self.jobs.get(&id) {
            self.cx.counters.abandoned += 1;
            if matches!(reason, AbandonReason::Fenced(_)) {
                self.cx.counters.fenced += 1;
            }
            self.cx.events.push_back(DeliveryEvent::Abandoned {
                owner: job.owner.clone(),
                channel: Some(job.channel.clone()),
                reason,
            });
        }
        self.end_job(now, id);
    }

    pub(super) fn abandon_jobs(&mut self, reason: AbandonReason) {
        let jobs = std::mem::take(&mut self.jobs);
        for job in jobs.into_values() {
            self.cx.counters.abandoned += 1;
            self.cx.events.push_back(DeliveryEvent::Abandoned {
                owner: job.owner,
                channel: Some(job.channel),
                reason: reason.clone(),
            });
        }
        let queued: usize = self.lanes.values().map(|l| l.queue.len()).sum();
        self.cx.counters.abandoned += queued as u64;
        self.lanes.clear();
        self.held_requests = 0;
        self.pending
            .retain(|_, p| !matches!(p, Pending::Job { .. }));
    }

    pub(super) fn reply_join(&mut self, now: Now, id: JobId, durable: bool, reason: Option<&str>) {
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
        self.publish_reply(&to, payload);
        self.emit(event);
        self.end_job(now, id);
    }

    /// Whether the channel of join `id` resolves live ([`crate::policy::ChannelRegistry::policy_for`],
    /// the resolver fan-out routes by): a membership there would route nothing (G38).
    pub(super) fn join_is_live_class(&self, id: JobId) -> bool {
        self.jobs.get(&id).is_some_and(|job| {
            !self
                .views
                .channels
                .policy_for(&job.channel.as_channel())
                .is_durable()
        })
    }

    /// Answers a join on a live-class channel `{durable:false, reason}` without a generation and
    /// writes nothing: the daemon does not claim a backstop fan-out will not give (issue 15
    /// item 5, G38). A record the owner already holds is left as it is (its leave still works).
    pub(super) fn reply_live_class(&mut self, now: Now, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        self.cx.counters.live_class_joins += 1;
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
        self.publish_reply(&to, live_class_join_reply());
        self.emit(event);
        self.end_job(now, id);
    }

    pub(super) fn fail_job(&mut self, now: Now, id: JobId, error: String) {
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
        self.publish_reply(&to, failure_reply(error));
        self.emit(event);
        self.end_job(now, id);
    }

    /// A registry refusal: fenced → abandon; anything else → an error reply.
    pub(super) fn registry_error(&mut self, now: Now, id: JobId, e: RegistryError) {
        if matches!(e, RegistryError::Fenced { .. }) {
            self.abandon(now, id, AbandonReason::Fenced(e));
        } else {
            self.fail_job(now, id, e.to_string());
        }
    }

    pub(super) fn on_job_completion(
        &mut self,
        now: Now,
        id: JobId,
        what: JobOp,
        outcome: Outcome<Reply>,
    ) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        match &job.kind {
            JobKind::Join(_) => self.on_join_step(now, id, what, outcome),
            JobKind::Leave(_) => self.on_leave_step(now, id, what, outcome),
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
        now: Now,
        id: JobId,
        what: &str,
        outcome: &Outcome<Reply>,
    ) {
        let detail = outcome_detail(outcome);
        self.fail_job(
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
