//! The join job (life cycle step 3 in [`super`]): read the owner's ACL fresh, the CHAT frontier
//! and the member key; plan and commit with CAS; read the fence; copy `(J, fence]` into the
//! owner's dinbox (catch-up, off the lane); check for eviction; then tombstone or activate.
//! These are `impl Jobs` blocks over the state of [`super::Jobs`] (`jobs.rs`).
//!
//! # Decisions
//!
//! - **The fence** is `max(CHAT frontier read after the commit, highest fan-out sequence this
//!   machine has received)`. Fan-out runs inside this machine, so "fan-out progress" is known
//!   exactly without a consumer-info read (G9 cannot happen): a message received before the
//!   commit confirmed is `≤` that maximum and is copied by catch-up; one received after is routed
//!   from an index that already holds the commit.
//! - **A leave during catch-up wins (B9/B21, G22).** A join in catch-up releases its key, so a
//!   leave of the same `(owner, channel)` runs at once (another join of that key still waits).
//!   When catch-up ends while that leave is running, the activation waits for it, then plans
//!   from a fresh read: a tombstone makes it [`ActivatePlan::Superseded`] and the join answers
//!   `durable:false` ("activation superseded …").
//! - **Eviction (G8, I13).** Catch-up reads the channel's messages in `(J, fence]`. The window
//!   counts as evicted when (a) the CHAT stream's first stored sequence is above `J + 1`
//!   (everything in between is gone, whatever its channel), or (b) a sender subject of the channel
//!   holds at least [`MAX_MSGS_PER_SUBJECT`] messages inside the window and its oldest one is above
//!   `J + 1` (the subject is at its cap and may have discarded in-window messages). Both are
//!   conservative: they may report a loss that did not happen, never hide one that did. The
//!   reported range is `J+1 ..= last possibly evicted sequence`. Copies are still written for
//!   everything retained; then the record is tombstoned at the fence and the join answers
//!   `durable:false` with the range in an event.
//! - **Catch-up write failures (G24).** A dinbox publish of catch-up is retried
//!   [`CATCHUP_PUBLISH_ATTEMPTS`] times; then the join answers `ok:false` naming the sequence, the
//!   record stays pending (it routes), and a retry of the join resumes catch-up over the same
//!   window.

use super::*;

impl Jobs {
    pub(super) fn on_join_step(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        what: JobOp,
        outcome: Outcome<Reply>,
    ) {
        match what {
            JobOp::Acl => {
                let Outcome::Success(Reply::Kv(entry)) = &outcome else {
                    return self.read_failed(env, now, id, "the read ACL", &outcome);
                };
                let record = entry
                    .as_ref()
                    .filter(|e| e.operation == KvOperation::Put)
                    .and_then(|e| crate::wire::records::AclRecord::from_kv(Some(&e.value)));
                let Some(job) = self.jobs.get(&id) else {
                    return;
                };
                if let Err(reply) =
                    crate::delivery::control::gate_join(&job.owner, &job.channel, record.as_ref())
                {
                    let error = reply.error.clone().unwrap_or_default();
                    let to = job.reply_to.clone();
                    let ev = DeliveryEvent::JoinFailed {
                        owner: job.owner.clone(),
                        channel: job.channel.clone(),
                        error,
                    };
                    env.cx.publish_reply(&to, encode_reply(&reply));
                    env.cx.emit(ev);
                    return self.end_job(env, now, id);
                }
                if self.join_is_live_class(env.channels, id) {
                    return self.reply_live_class(env, now, id);
                }
                if let Some(j) = self.join_mut(id) {
                    j.phase = JoinPhase::ReadFrontier;
                }
                self.read_frontier(env, id, JobOp::Frontier);
            }
            JobOp::Frontier => {
                let Outcome::Success(Reply::StreamState(state)) = &outcome else {
                    return self.read_failed(env, now, id, "the CHAT frontier", &outcome);
                };
                if let Some(j) = self.join_mut(id) {
                    j.frontier = state.last_seq;
                    j.phase = JoinPhase::ReadMember;
                }
                self.read_member(env, id);
            }
            JobOp::Member => {
                let Some(snapshot) = self.snapshot_of(id, &outcome) else {
                    return self.read_failed(env, now, id, "the membership record", &outcome);
                };
                let phase = self.join_mut(id).map(|j| j.phase);
                match phase {
                    Some(JoinPhase::ReadMember) => self.plan_join_step(env, now, id, &snapshot),
                    Some(JoinPhase::ReadForFinish) => self.plan_finish(env, now, id, &snapshot),
                    _ => {}
                }
            }
            JobOp::Write(intent) => self.on_join_write(env, now, id, *intent, outcome),
            JobOp::Fence => {
                let Outcome::Success(Reply::StreamState(state)) = &outcome else {
                    return self.read_failed(env, now, id, "the CHAT fence", &outcome);
                };
                let high = env.fanout.high();
                let Some(j) = self.join_mut(id) else {
                    return;
                };
                j.fence = state.last_seq.max(high);
                j.stream_first = state.first_seq;
                j.phase = JoinPhase::CatchUp;
                j.next_start = j.join_cursor.saturating_add(1);
                if j.fence <= j.join_cursor {
                    // Nothing to copy; eviction is not checked (§2h 7.1).
                    j.exhausted = true;
                }
                self.enter_catch_up(env, now, id);
            }
            JobOp::Read => {
                let Outcome::Success(Reply::Stored(messages)) = outcome else {
                    return self.read_failed(env, now, id, "the channel history", &outcome);
                };
                self.on_catch_up_page(env, now, id, messages);
            }
            JobOp::Publish {
                seq,
                subject,
                msg_id,
                payload,
                attempt,
            } => self.on_catch_up_publish(
                env, now, id, seq, subject, msg_id, payload, attempt, outcome,
            ),
        }
    }

    pub(super) fn plan_join_step(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        snapshot: &MemberSnapshot,
    ) {
        let Some(writer) = env.writer.clone() else {
            return self.abandon(env, now, id, AbandonReason::LeaseNotHeld);
        };
        let Some(j) = self.join_mut(id) else {
            return;
        };
        let (watermark, frontier) = (j.watermark, j.frontier);
        match plan_join(snapshot, watermark, frontier, &writer, now.wall) {
            Err(e) => self.registry_error(env, now, id, e),
            Ok(JoinPlan::AlreadyActive { generation }) => {
                let join_cursor = snapshot.record().map_or(0, |r| r.join_cursor);
                if let Some(j) = self.join_mut(id) {
                    j.generation = generation;
                    j.join_cursor = join_cursor;
                }
                self.reply_join(env, now, id, true, None);
            }
            Ok(JoinPlan::ResumePending {
                generation,
                join_cursor,
            }) => {
                if let Some(j) = self.join_mut(id) {
                    j.generation = generation;
                    j.join_cursor = join_cursor;
                    j.phase = JoinPhase::ReadFence;
                }
                self.read_frontier(env, id, JobOp::Fence);
            }
            Ok(JoinPlan::Commit(commit)) => {
                let commit = *commit;
                if !commit.forgotten.is_empty()
                    && let Some(job) = self.jobs.get(&id)
                {
                    let ev = DeliveryEvent::HistoryForgotten {
                        owner: job.owner.clone(),
                        channel: job.channel.clone(),
                        intervals: commit.forgotten.clone(),
                    };
                    env.cx.emit(ev);
                }
                if let Some(j) = self.join_mut(id) {
                    j.generation = commit.generation;
                    j.join_cursor = commit.join_cursor;
                    j.watermark_use = Some(commit.watermark);
                    j.phase = JoinPhase::Commit;
                }
                self.write_intent(env, id, commit.intent);
            }
        }
    }

    /// The write of a join step (commit, tombstone after eviction, activation) completed.
    pub(super) fn on_join_write(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        intent: WriteIntent,
        outcome: Outcome<Reply>,
    ) {
        let Some(phase) = self.join_mut(id).map(|j| j.phase) else {
            return;
        };
        match outcome {
            Outcome::Success(Reply::KvWritten { revision }) => {
                env.members.put(intent.record().clone(), revision);
                match phase {
                    JoinPhase::Commit => {
                        if let Some(j) = self.join_mut(id) {
                            j.phase = JoinPhase::ReadFence;
                        }
                        self.read_frontier(env, id, JobOp::Fence);
                    }
                    JoinPhase::WriteFinish => self.finish_written(env, now, id),
                    _ => {}
                }
            }
            Outcome::Failed(Failure::WrongLastRevision { .. } | Failure::AlreadyExists)
            | Outcome::Unknown => {
                // Lost a CAS race, or the write may or may not have landed: read again and plan
                // again from what is really stored (an Unknown that landed re-plans as a resume
                // or an idempotent no-op).
                if matches!(outcome, Outcome::Unknown) {
                    env.cx.counters.writes_failed += 1;
                } else {
                    env.cx.counters.cas_retries += 1;
                }
                let Some(j) = self.join_mut(id) else {
                    return;
                };
                j.attempts += 1;
                if j.attempts >= KV_CAS_ATTEMPTS {
                    let key = intent.key().to_owned();
                    return match phase {
                        JoinPhase::WriteFinish => self.finish_exhausted(env, now, id),
                        _ => self.fail_job(
                            env,
                            now,
                            id,
                            RegistryError::CasExhausted { key }.to_string(),
                        ),
                    };
                }
                j.phase = match phase {
                    JoinPhase::Commit => JoinPhase::ReadMember,
                    _ => JoinPhase::ReadForFinish,
                };
                self.read_member(env, id);
            }
            Outcome::Failed(f) => {
                env.cx.counters.writes_failed += 1;
                self.fail_job(env, now, id, format!("membership write failed: {f}"));
            }
            Outcome::Success(r) => {
                self.fail_job(
                    env,
                    now,
                    id,
                    format!("unexpected reply to a membership write: {r:?}"),
                );
            }
        }
    }

    /// Catch-up runs off the lane: a leave of the same key may run meanwhile (B9/B21, G22).
    pub(super) fn enter_catch_up(&mut self, env: &mut Env<'_>, now: Now, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let key = job.key.clone();
        if let Some(lane) = self.lanes.get_mut(&key) {
            if lane.active == Some(id) {
                lane.active = None;
            }
            lane.catching_up = Some(id);
        }
        self.next_catch_up_read(env, now, id);
        self.pump(env, now, &key);
    }

    pub(super) fn next_catch_up_read(&mut self, env: &mut Env<'_>, now: Now, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let JobKind::Join(j) = &job.kind else {
            return;
        };
        if j.exhausted || j.next_start > j.fence {
            return self.catch_up_done(env, now, id);
        }
        let stream = SpaceStream::Chat.name(&env.config.space);
        let filter = chat_subscribe_pattern(&env.config.space, &job.channel.as_channel());
        let (start, last) = (j.next_start, j.fence);
        let max = env.config.catchup_page.max(1);
        self.job_cmd(env, id, JobOp::Read, |op| Command::ReadStream {
            op,
            stream,
            filter,
            start: ReadStart::Seq(start),
            last_seq: Some(last),
            max,
            reader: None,
        });
    }

    pub(super) fn on_catch_up_page(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        messages: Vec<StoredMessage>,
    ) {
        let page = env.config.catchup_page.max(1) as usize;
        let space = env.config.space.clone();
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let (owner, channel) = (job.owner.clone(), job.channel.clone());
        let mut publishes = Vec::new();
        {
            let Some(j) = self.join_mut(id) else {
                return;
            };
            if messages.len() < page {
                j.exhausted = true;
            }
            for m in &messages {
                if m.seq < j.next_start || m.seq > j.fence {
                    continue;
                }
                j.next_start = m.seq.saturating_add(1);
                let Ok(Subject::Chat {
                    space: s,
                    sender,
                    channel: c,
                }) = Subject::parse(&m.subject)
                else {
                    continue;
                };
                if s != space || c != channel {
                    continue;
                }
                let counted = j.subjects.entry(m.subject.clone()).or_insert((0, m.seq));
                counted.0 += 1;
                let Ok(msg) = CotalMessage::decode(&m.payload) else {
                    continue;
                };
                if msg.from.id != sender || sender == owner {
                    continue; // spoofed, or the owner's own post (I4)
                }
                let entry = Plane3Entry::durable_channel(msg, channel.clone(), m.seq, j.generation);
                let routed = Routed {
                    owner: owner.clone(),
                    entry,
                };
                publishes.push((m.seq, routed));
            }
            if messages.is_empty() {
                j.exhausted = true;
            }
            j.outstanding += publishes.len();
        }
        let dinbox = Subject::Dinbox {
            space,
            owner: owner.clone(),
        }
        .to_string();
        for (seq, routed) in publishes {
            let msg_id = routed.msg_id().to_string();
            let payload = json::encode(&routed.entry);
            self.catch_up_publish(env, id, seq, dinbox.clone(), msg_id, payload, 1);
        }
        let outstanding = self.join_mut(id).map_or(0, |j| j.outstanding);
        if outstanding == 0 {
            self.next_catch_up_read(env, now, id);
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn catch_up_publish(
        &mut self,
        env: &mut Env<'_>,
        id: JobId,
        seq: u64,
        subject: String,
        msg_id: String,
        payload: bytes::Bytes,
        attempt: u32,
    ) {
        let what = JobOp::Publish {
            seq,
            subject: subject.clone(),
            msg_id: msg_id.clone(),
            payload: payload.clone(),
            attempt,
        };
        self.job_cmd(env, id, what, |op| Command::JsPublish {
            op,
            subject,
            msg_id: Some(msg_id),
            headers: Vec::new(),
            payload,
        });
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_catch_up_publish(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        seq: u64,
        subject: String,
        msg_id: String,
        payload: bytes::Bytes,
        attempt: u32,
        outcome: Outcome<Reply>,
    ) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let owner = job.owner.clone();
        let channel = job.channel.clone();
        match outcome {
            Outcome::Success(Reply::PubAck(ack)) => {
                env.fanout.stored(env.cx, &owner, ack.duplicate);
                let Some(j) = self.join_mut(id) else {
                    return;
                };
                j.outstanding = j.outstanding.saturating_sub(1);
                if !ack.duplicate {
                    j.copied += 1;
                }
                if j.outstanding == 0 {
                    self.next_catch_up_read(env, now, id);
                }
            }
            other => {
                env.cx.counters.writes_failed += 1;
                let generation = self.join_mut(id).map_or(0, |j| j.generation);
                let failure = match other {
                    Outcome::Failed(f) => Some(f),
                    _ => None,
                };
                env.cx.emit(DeliveryEvent::CopyWriteFailed {
                    owner: owner.clone(),
                    channel: channel.clone(),
                    seq,
                    generation,
                    failure: failure.clone(),
                });
                if attempt < CATCHUP_PUBLISH_ATTEMPTS {
                    self.catch_up_publish(env, id, seq, subject, msg_id, payload, attempt + 1);
                } else {
                    let why =
                        failure.map_or_else(|| "outcome unknown".to_owned(), |f| f.to_string());
                    self.fail_job(env,
                        now,
                        id,
                        format!(
                            "activation catch-up could not store the copy of {channel} seq {seq} for {owner}: {why}"
                        ),
                    );
                }
            }
        }
    }

    pub(super) fn catch_up_done(&mut self, env: &mut Env<'_>, now: Now, id: JobId) {
        let Some(j) = self.join_mut(id) else {
            return;
        };
        let start = j.join_cursor.saturating_add(1);
        let mut last_evicted: Option<u64> = None;
        if j.fence > j.join_cursor {
            if j.stream_first > start {
                last_evicted = Some(j.stream_first.saturating_sub(1).min(j.fence));
            }
            let cap = u64::try_from(MAX_MSGS_PER_SUBJECT).unwrap_or(u64::MAX);
            for (count, first) in j.subjects.values() {
                if *count >= cap && *first > start {
                    let end = first.saturating_sub(1);
                    last_evicted = Some(last_evicted.map_or(end, |e| e.max(end)));
                }
            }
        }
        j.evicted = last_evicted.map(|end| (start, end));
        j.phase = JoinPhase::WaitLane;
        let Some(key) = self.jobs.get(&id).map(|job| job.key.clone()) else {
            return;
        };
        let lane = self.lanes.entry(key).or_default();
        if lane.active.is_some_and(|a| a != id) {
            // A leave of the same key is running: the activation waits for it (B9/B21).
            lane.finish_waiting = true;
        } else {
            lane.catching_up = None;
            lane.active = Some(id);
            self.start_finish(env, now, id);
        }
    }

    pub(super) fn start_finish(&mut self, env: &mut Env<'_>, _now: Now, id: JobId) {
        if let Some(j) = self.join_mut(id) {
            j.phase = JoinPhase::ReadForFinish;
            j.attempts = 0;
        }
        self.read_member(env, id);
    }

    /// Tombstone after eviction, or activation, planned from a fresh read.
    pub(super) fn plan_finish(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        snapshot: &MemberSnapshot,
    ) {
        let Some(writer) = env.writer.clone() else {
            return self.abandon(env, now, id, AbandonReason::LeaseNotHeld);
        };
        let Some(j) = self.join_mut(id) else {
            return;
        };
        let (generation, join_cursor, fence, evicted) =
            (j.generation, j.join_cursor, j.fence, j.evicted);
        if evicted.is_some() {
            match plan_tombstone(snapshot, fence, Some(generation), &writer, now.wall) {
                Ok(TombstonePlan::Write(intent)) => {
                    if let Some(j) = self.join_mut(id) {
                        j.phase = JoinPhase::WriteFinish;
                    }
                    self.write_intent(env, id, intent);
                }
                // A newer rejoin won (stale), or nothing left to write: answer durable:false.
                Ok(_) | Err(RegistryError::StaleMembershipWrite { .. }) => {
                    self.finish_written(env, now, id);
                }
                Err(e) => self.registry_error(env, now, id, e),
            }
            return;
        }
        match plan_activate(snapshot, generation, join_cursor, &writer, now.wall) {
            Ok(ActivatePlan::Write(intent)) => {
                if let Some(j) = self.join_mut(id) {
                    j.phase = JoinPhase::WriteFinish;
                }
                self.write_intent(env, id, intent);
            }
            Ok(ActivatePlan::AlreadyActive) => self.reply_join(env, now, id, true, None),
            Ok(_) => self.reply_join(env, now, id, false, Some(REASON_SUPERSEDED)),
            Err(e) => self.registry_error(env, now, id, e),
        }
    }

    pub(super) fn finish_written(&mut self, env: &mut Env<'_>, now: Now, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let JobKind::Join(j) = &job.kind else {
            return;
        };
        match j.evicted {
            Some((from_seq, to_seq)) => {
                env.cx.counters.evicted_ranges += 1;
                let ev = DeliveryEvent::Evicted {
                    owner: job.owner.clone(),
                    channel: job.channel.clone(),
                    generation: j.generation,
                    from_seq,
                    to_seq,
                };
                env.cx.emit(ev);
                self.reply_join(env, now, id, false, Some(REASON_PARTIALLY_EVICTED));
            }
            None => self.reply_join(env, now, id, true, None),
        }
    }

    /// The finishing write lost every CAS attempt: an honest `durable:false`.
    pub(super) fn finish_exhausted(&mut self, env: &mut Env<'_>, now: Now, id: JobId) {
        let evicted = self.join_mut(id).and_then(|j| j.evicted);
        if evicted.is_some() {
            self.finish_written(env, now, id);
        } else {
            self.reply_join(env, now, id, false, Some(REASON_SUPERSEDED));
        }
    }
}
