//! The membership flows (parent code, `impl Agent`): the durable join and its reconcile, and the
//! parent's half of the membership audit (acting on the verdict of
//! [`super::members::Members::on_audit`]). Their state is the membership book
//! ([`super::members`]), which also runs the refusal close ([`super::members::Members::start_close`]);
//! they issue their control requests through the parent's pending table.
//!
//! # Membership audit (issue 15 item 4, G12)
//!
//! The mirror is not trusted forever: at every ready connection and every
//! [`AgentConfig::membership_audit`] the agent lists its memberships (`listMemberships`) and
//! reconciles:
//!
//! - a joined channel whose mirrored generation has no open record any more (purged or
//!   tombstoned out of band, a registry wipe) leaves the mirror, turns
//!   [`BackstopState::Degraded`] with a reason, is reported ([`AgentEvent::MembershipLost`],
//!   [`AgentCounters::memberships_lost`]) and is re-established by the reconcile (a new
//!   generation, join cursor = the armed watermark, so the gap is caught up). `Established` is
//!   never shown for a membership the daemon no longer has;
//! - an open membership of a channel this life does not join (an earlier life's, G12) is
//!   reported ([`AgentEvent::MembershipOrphaned`]) and tombstoned through the refusal-close path
//!   (retried, visible in [`AgentHealth::unclosed`], [`AgentEvent::MembershipClosed`] at the end);
//! - a channel whose mirror or membership changed while the list was in flight is not judged
//!   from that (possibly older) snapshot; the next audit looks again.

use super::*;

impl Agent {
    pub(super) fn on_durable_join(
        &mut self,
        now: Now,
        channel: ConcreteChannel,
        cursor: Option<u64>,
        outcome: Outcome<Reply>,
    ) {
        self.members.set_reconcile_in_flight(&channel, false);
        let result = decode_join_reply(outcome);
        let key = channel.as_channel();
        let joined = self.channels.get(&key).is_some_and(ChannelMachine::staying);
        match result {
            Ok(reply) if reply.durable => {
                let generation = reply.generation.unwrap_or(0);
                if !joined {
                    // Left or refused while the request was in flight: the membership the daemon
                    // just opened must be closed (G11), not mirrored.
                    self.members
                        .start_close(&mut self.cx, channel, Some(generation));
                    return;
                }
                if self
                    .members
                    .mirror
                    .get(&channel)
                    .is_some_and(|current| *current > generation)
                {
                    // A late answer to an older request: a newer membership is established.
                    return;
                }
                self.members.mirror.insert(channel.clone(), generation);
                self.members.mark_maybe(&channel);
                self.members.touched_since_audit.insert(channel.clone());
                // A rejoin supersedes a pending refusal close: of an older generation (the daemon
                // already replaced it), and of this very generation (the daemon never closed it,
                // and it is ours again). A close already in flight may still land; its success
                // handler re-establishes the membership (see `on_durable_leave`).
                if self
                    .members
                    .unclosed(&channel)
                    .is_some_and(|u| u.generation.is_none_or(|g| g <= generation))
                {
                    self.members.take_unclosed(&channel);
                    if let Some(slot) = self.members.slot_of(&channel) {
                        self.members.cancel_timer(MemberTimer::Close(slot));
                    }
                }
                let honoured = match (cursor, reply.join_cursor) {
                    (Some(ours), Some(used)) => Some(ours == used),
                    _ => None,
                };
                let slot = self.members.slot(&channel);
                self.members.cancel_timer(MemberTimer::Reconcile(slot));
                if let Some(machine) = self.channels.get_mut(&key) {
                    machine.backstop_established(generation, honoured);
                }
                self.cx.events.push_back(AgentEvent::BackstopEstablished {
                    channel: channel.clone(),
                    generation,
                });
                self.maybe_report_join(&key);
            }
            other => {
                if other.as_ref().is_err_and(|e| e == OUTCOME_UNKNOWN) {
                    // The daemon may have opened a membership we do not know about; a pending
                    // close must look it up rather than close an older generation only.
                    self.members.mark_maybe(&channel);
                    if let Some(u) = self.members.unclosed_mut(&channel) {
                        u.generation = None;
                    }
                }
                if !joined {
                    if self.members.is_maybe(&channel) && self.members.unclosed(&channel).is_none()
                    {
                        self.members.start_close(&mut self.cx, channel, None);
                    }
                    return;
                }
                if self.members.mirror.contains_key(&channel) {
                    // A late failure of an older request (a reconcile from before a leave and
                    // rejoin, answered after its timeout): a durable join never closes anything,
                    // and the membership the mirror holds was confirmed since. Degrading it here
                    // left the backstop degraded for good, as the reconcile sees the mirror and
                    // does nothing (found by the simulator, seed 4734).
                    return;
                }
                let reason = match other {
                    Ok(reply) => reply
                        .reason
                        .unwrap_or_else(|| "durable backstop unavailable".to_owned()),
                    Err(e) => format!("durable backstop unavailable ({e})"),
                };
                let attempts = self
                    .channels
                    .get(&key)
                    .map_or(0, ChannelMachine::degraded_attempts);
                let slot = self.members.slot(&channel);
                self.members
                    .set_timer(MemberTimer::Reconcile(slot), now.at + backoff(attempts));
                if let Some(machine) = self.channels.get_mut(&key) {
                    machine.backstop_unavailable(&reason, attempts);
                }
                if attempts == 0 {
                    self.cx.events.push_back(AgentEvent::BackstopDegraded {
                        channel: channel.clone(),
                        reason,
                    });
                }
                self.maybe_report_join(&key);
            }
        }
    }

    pub(super) fn reconcile(&mut self, channel: ConcreteChannel) {
        let key = channel.as_channel();
        let Some(machine) = self.channels.get_mut(&key) else {
            return;
        };
        if !machine.joined() {
            return;
        }
        if machine.leaving() {
            // A leave is in flight: it decides. If it fails, the channel stays joined and the
            // backstop must still be re-established, so look again after the backoff step (found
            // by the simulator, seed 409: a reconcile that fired during a retried leave was
            // dropped, and the failed leave left the channel degraded for good).
            let slot = self.members.slot(&channel);
            let at = self.cx.last_at + backoff(0);
            self.members.set_timer(MemberTimer::Reconcile(slot), at);
            return;
        }
        if self.members.mirror.contains_key(&channel) || self.members.reconcile_in_flight(&channel)
        {
            return;
        }
        if self.cx.link != Link::Ready {
            // Retry after the next backoff step; the connection decides when.
            let slot = self.members.slot(&channel);
            let at = self.cx.last_at + backoff(0);
            self.members.set_timer(MemberTimer::Reconcile(slot), at);
            return;
        }
        // One more attempt counted; the cursor is the armed watermark (G1).
        let join_cursor = machine.reconcile_attempt();
        bump(&mut self.cx.counters.reconcile_attempts);
        self.members.set_reconcile_in_flight(&channel, true);
        let request = DeliveryRequest::DurableJoin {
            channel: channel.clone(),
            join_cursor,
        };
        self.control_request(
            &request,
            Pending::DurableJoin {
                channel,
                cursor: join_cursor,
            },
            DURABLE_JOIN_TIMEOUT,
        );
    }

    /// A `listMemberships` answer to the audit `op`: [`Members::on_audit`] judges it against
    /// the channel map, and the parent acts on the verdict (see the module docs).
    pub(super) fn on_audit(&mut self, now: Now, op: OpId, outcome: Outcome<Reply>) {
        let channels = &self.channels;
        let Some(verdict) = self.members.on_audit(
            &mut self.cx,
            now,
            op,
            outcome,
            |c| {
                channels
                    .get(&c.as_channel())
                    .is_some_and(ChannelMachine::staying)
            },
            |c| channels.contains_key(&c.as_channel()),
        ) else {
            return;
        };
        for (channel, generation) in verdict.lost {
            self.membership_lost(channel, generation);
        }
        for (channel, generation) in verdict.orphans {
            bump(&mut self.cx.counters.memberships_orphaned);
            self.members.mark_maybe(&channel);
            self.cx.events.push_back(AgentEvent::MembershipOrphaned {
                channel: channel.clone(),
                generation,
            });
            self.members
                .start_close(&mut self.cx, channel, Some(generation));
        }
    }

    /// The audit found the mirrored membership `generation` of a joined channel gone: the mirror
    /// forgets it, the backstop is degraded and reported, and the reconcile opens a new one.
    pub(super) fn membership_lost(&mut self, channel: ConcreteChannel, generation: u64) {
        self.members.mirror.remove(&channel);
        bump(&mut self.cx.counters.memberships_lost);
        let reason = format!(
            "membership generation {generation} is gone from the registry (removed out of band); \
             re-establishing"
        );
        if let Some(machine) = self.channels.get_mut(&channel.as_channel()) {
            machine.degrade(reason.clone(), 0);
        }
        self.cx.events.push_back(AgentEvent::MembershipLost {
            channel: channel.clone(),
            generation,
        });
        self.cx.events.push_back(AgentEvent::BackstopDegraded {
            channel: channel.clone(),
            reason,
        });
        self.reconcile(channel);
    }
}
