//! The leave job: read the member key and the CHAT frontier, plan the tombstone, write it with CAS
//! (re-read and re-plan on a conflict). `impl Jobs` blocks over the state of [`super::Jobs`].

use super::*;

impl Jobs {
    pub(super) fn on_leave_step(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        what: JobOp,
        outcome: Outcome<Reply>,
    ) {
        match what {
            JobOp::Member => {
                let Some(snapshot) = self.snapshot_of(id, &outcome) else {
                    return self.read_failed(env, now, id, "the membership record", &outcome);
                };
                let first = matches!(
                    self.jobs.get(&id).map(|j| &j.kind),
                    Some(JobKind::Leave(l)) if l.attempts == 0
                );
                if snapshot.record().is_none() && first {
                    return self.reply_leave(env, now, id, true, None);
                }
                let Some(JobKind::Leave(l)) = self.jobs.get_mut(&id).map(|j| &mut j.kind) else {
                    return;
                };
                l.snapshot = Some(snapshot);
                if l.attempts == 0 {
                    l.phase = LeavePhase::ReadFrontier;
                    self.read_frontier(env, id, JobOp::Frontier);
                } else {
                    self.plan_leave(env, now, id);
                }
            }
            JobOp::Frontier => {
                let Outcome::Success(Reply::StreamState(state)) = &outcome else {
                    return self.read_failed(env, now, id, "the CHAT frontier", &outcome);
                };
                if let Some(JobKind::Leave(l)) = self.jobs.get_mut(&id).map(|j| &mut j.kind) {
                    l.frontier = state.last_seq;
                }
                self.plan_leave(env, now, id);
            }
            JobOp::Write(intent) => match outcome {
                Outcome::Success(Reply::KvWritten { revision }) => {
                    env.members.put(intent.record().clone(), revision);
                    let g = intent.record().generation;
                    let l = intent.record().leave_cursor;
                    self.reply_leave(env, now, id, false, Some((g, l)));
                }
                Outcome::Failed(Failure::WrongLastRevision { .. } | Failure::AlreadyExists)
                | Outcome::Unknown => {
                    if matches!(outcome, Outcome::Unknown) {
                        env.cx.counters.writes_failed += 1;
                    } else {
                        env.cx.counters.cas_retries += 1;
                    }
                    let Some(JobKind::Leave(l)) = self.jobs.get_mut(&id).map(|j| &mut j.kind)
                    else {
                        return;
                    };
                    l.attempts += 1;
                    if l.attempts >= KV_CAS_ATTEMPTS {
                        let key = intent.key().to_owned();
                        return self.fail_job(
                            env,
                            now,
                            id,
                            RegistryError::CasExhausted { key }.to_string(),
                        );
                    }
                    l.phase = LeavePhase::ReadMember;
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
            },
            _ => {}
        }
    }

    pub(super) fn plan_leave(&mut self, env: &mut Env<'_>, now: Now, id: JobId) {
        let Some(writer) = env.writer.clone() else {
            return self.abandon(env, now, id, AbandonReason::LeaseNotHeld);
        };
        let Some(JobKind::Leave(l)) = self.jobs.get(&id).map(|j| &j.kind) else {
            return;
        };
        let Some(snapshot) = l.snapshot.clone() else {
            return;
        };
        match plan_tombstone(&snapshot, l.frontier, Some(l.generation), &writer, now.wall) {
            Ok(TombstonePlan::NoRecord) => self.reply_leave(env, now, id, true, None),
            Ok(TombstonePlan::AlreadyTombstoned {
                generation,
                leave_cursor,
            }) => self.reply_leave(env, now, id, false, Some((generation, Some(leave_cursor)))),
            Ok(TombstonePlan::Write(intent)) => {
                if let Some(JobKind::Leave(l)) = self.jobs.get_mut(&id).map(|j| &mut j.kind) {
                    l.phase = LeavePhase::Write;
                }
                self.write_intent(env, id, intent);
            }
            Err(e) => self.registry_error(env, now, id, e),
        }
    }

    pub(super) fn reply_leave(
        &mut self,
        env: &mut Env<'_>,
        now: Now,
        id: JobId,
        already_left: bool,
        written: Option<(u64, Option<u64>)>,
    ) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let to = job.reply_to.clone();
        let ev = DeliveryEvent::Left {
            owner: job.owner.clone(),
            channel: job.channel.clone(),
            generation: written.map(|w| w.0),
            leave_cursor: written.and_then(|w| w.1),
        };
        let payload = durable_leave_reply(&job.channel, already_left);
        env.cx.publish_reply(&to, payload);
        env.cx.emit(ev);
        self.end_job(env, now, id);
    }
}
