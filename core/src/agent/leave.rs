//! The leave flow and the late refusal, membership side (parent code, `impl Agent`): the
//! tombstone before the unsubscribe, the late refusal's close, over the channel machines
//! ([`super::channel`]) and the membership book ([`super::members`]).
//!
//! # Leave (§2(b))
//!
//! The leave's protocol is described with the channel's side of it, in `channel/leave.rs`.
//!
//! # Late refusal (§2(c))
//!
//! A refusal of an already joined channel's subscription drops the channel at once
//! ([`AgentEvent::ChannelRefused`]) and, when a membership exists, closes it with
//! `durableLeave` retried with `min(30 s, 1 s · 2^attempt)` backoff until confirmed, visible in
//! [`AgentHealth::unclosed`] while pending. A later durable rejoin of the channel supersedes it.

use super::*;

impl Agent {
    pub(super) fn start_leave(&mut self, channel: Channel, request: RequestId) {
        let concrete = channel.to_concrete();
        // G10 fix: tombstone whenever a membership is known, whatever the class reads now. The
        // test-only switch restores the reference's stale cached `live`, which skips it.
        let needs_tombstone = self.cx.config.durable_backstop
            && !self.cx.config.reference_gap_g10
            && concrete.as_ref().is_some_and(|c| {
                self.members.mirror.contains_key(c)
                    || self.members.is_maybe(c)
                    || self.watch.registry().policy_for(&channel).is_durable()
            });
        let tombstone = concrete
            .filter(|_| needs_tombstone)
            .map(|c| (c.clone(), self.members.mirror.get(&c).copied()));
        let Some(machine) = self.channels.get_mut(&channel) else {
            return;
        };
        match machine.start_leave(&mut self.cx, request, tombstone) {
            LeaveStep::Tombstone(c, generation) => self.send_leave(c, generation),
            LeaveStep::Listing => {}
            LeaveStep::Finish => self.finish_leave(&channel, None),
        }
    }

    pub(super) fn send_leave(&mut self, channel: ConcreteChannel, generation: u64) {
        let request = DeliveryRequest::DurableLeave {
            channel: channel.clone(),
            generation,
        };
        self.control_request(
            &request,
            Pending::DurableLeave {
                channel,
                generation,
            },
            REQUEST_DELIVERY_TIMEOUT,
        );
    }

    pub(super) fn finish_leave(&mut self, channel: &Channel, tombstoned: Option<u64>) {
        let Some(machine) = self.remove_channel(channel) else {
            return;
        };
        if let Some(sub) = machine.finish_leave(&mut self.cx, tombstoned) {
            self.feeds.remove(&sub);
        }
        if let Some(c) = channel.to_concrete() {
            self.members.cancel_reconcile(&c);
        }
    }

    pub(super) fn fail_leave(&mut self, channel: &Channel, error: LeaveError) {
        let Some(durable) = self
            .channels
            .get_mut(channel)
            .and_then(|machine| machine.fail_leave(&mut self.cx, error))
        else {
            return;
        };
        // The channel stays joined, so it keeps (or gets back) its membership: a close queued
        // while the leave was in flight (a join reply that came back during it, G11) must not
        // tombstone the backstop of a joined channel, and a reconcile re-establishes a membership
        // the mirror no longer vouches for (found by the simulator, seed 3326).
        let Some(concrete) = channel.to_concrete() else {
            return;
        };
        if !self.members.close_in_flight(&concrete)
            && self.members.take_unclosed(&concrete).is_some()
            && let Some(slot) = self.members.slot_of(&concrete)
        {
            self.members.cancel_timer(MemberTimer::Close(slot));
        }
        if durable && !self.members.mirror.contains_key(&concrete) {
            let slot = self.members.slot(&concrete);
            let at = self.cx.last_at + backoff(0);
            self.members.set_timer(MemberTimer::Reconcile(slot), at);
        }
    }

    pub(super) fn on_list_for_leave(&mut self, channel: Channel, outcome: Outcome<Reply>) {
        let Some(concrete) = channel.to_concrete() else {
            return;
        };
        if self.channels.get(&channel).is_none_or(|e| !e.leaving()) {
            return;
        }
        match outcome {
            Outcome::Failed(Failure::NoResponders)
                if self.members.listed && !self.members.is_maybe(&concrete) =>
            {
                // No daemon, and every membership that can exist is known: nothing to tombstone
                // (§2(b)).
                self.finish_leave(&channel, None);
            }
            Outcome::Failed(Failure::NoResponders) => {
                // G42: an earlier life (or this one) may have left a membership open, and no
                // daemon can say: fail closed, the caller retries once the daemon is back.
                self.fail_leave(
                    &channel,
                    LeaveError::MembershipsUnknown {
                        detail: "no delivery daemon answered, and this life has not listed its \
                                 memberships yet"
                            .to_owned(),
                    },
                );
            }
            outcome => match self.members.decode_list(outcome) {
                Ok(list) => match list.memberships.iter().find(|m| m.channel == concrete) {
                    Some(m) => self.send_leave(concrete, m.generation),
                    None => self.finish_leave(&channel, None),
                },
                Err(detail) => self.fail_leave(&channel, LeaveError::MembershipsUnknown { detail }),
            },
        }
    }

    pub(super) fn on_durable_leave(
        &mut self,
        now: Now,
        channel: ConcreteChannel,
        generation: u64,
        outcome: Outcome<Reply>,
    ) {
        self.members.set_close_in_flight(&channel, false);
        self.members.touched_since_audit.insert(channel.clone());
        let result = decode_leave_reply(outcome);
        let key = channel.as_channel();
        let leaving = self.channels.get(&key).is_some_and(ChannelMachine::leaving);
        match result {
            Ok(()) => {
                let mirrored = self.members.mirror.get(&channel) == Some(&generation);
                if mirrored {
                    self.members.mirror.remove(&channel);
                }
                let joined = self.channels.get(&key).is_some_and(ChannelMachine::joined);
                if !leaving && joined && !self.members.mirror.contains_key(&channel) {
                    // A close landed while the channel is joined (a refusal close after a rejoin
                    // adopted the same generation, or a close queued during a leave that then
                    // failed): its membership is gone. Establish a new one now.
                    let slot = self.members.slot(&channel);
                    self.members.set_timer(MemberTimer::Reconcile(slot), now.at);
                    if let Some(machine) = self.channels.get_mut(&key) {
                        let reason = "membership closed by an earlier refusal; rejoining";
                        machine.degrade(reason.into(), 0);
                    }
                }
                if let Some(u) = self.members.unclosed(&channel)
                    && u.generation == Some(generation)
                {
                    self.members.take_unclosed(&channel);
                    if let Some(slot) = self.members.slot_of(&channel) {
                        self.members.cancel_timer(MemberTimer::Close(slot));
                    }
                    self.cx.events.push_back(AgentEvent::MembershipClosed {
                        channel: channel.clone(),
                        generation,
                    });
                }
                if leaving {
                    self.finish_leave(&key, Some(generation));
                }
                if self.members.unclosed(&channel).is_some() {
                    // A close whose target changed while this leave was in flight (a newer
                    // generation may exist): go on with it.
                    self.members.try_close(&mut self.cx, channel);
                }
            }
            Err((error, detail)) => {
                if leaving {
                    if error == LeaveError::TombstoneUnknown
                        && self.members.mirror.get(&channel) == Some(&generation)
                    {
                        // The tombstone may have landed: the mirror can no longer vouch for the
                        // membership. The channel stays joined (fail closed) but degraded; a
                        // retried leave lists first, and without one the reconcile re-establishes
                        // the backstop (reported, never silent).
                        self.members.mirror.remove(&channel);
                        let slot = self.members.slot(&channel);
                        self.members
                            .set_timer(MemberTimer::Reconcile(slot), now.at + backoff(0));
                        let reason = "durable leave outcome unknown; the membership may be closed";
                        if let Some(machine) = self.channels.get_mut(&key) {
                            machine.degrade(reason.into(), 0);
                        }
                        self.cx.events.push_back(AgentEvent::BackstopDegraded {
                            channel: channel.clone(),
                            reason: reason.into(),
                        });
                    }
                    self.fail_leave(&key, error.clone());
                }
                if self.members.unclosed(&channel).is_some() {
                    if error == LeaveError::TombstoneUnknown
                        && self.members.mirror.get(&channel) == Some(&generation)
                    {
                        // The close may have landed: the mirror can no longer vouch for this
                        // generation (a rejoin must ask the daemon rather than adopt it).
                        self.members.mirror.remove(&channel);
                    }
                    self.members
                        .close_failed(&mut self.cx, now, &channel, detail);
                }
            }
        }
    }

    pub(super) fn on_refused(&mut self, sub: SubId, detail: String) {
        let Some(Feed::Chat(epoch)) = self.feeds.remove(&sub) else {
            return;
        };
        let Some(channel) = self
            .channels
            .iter()
            .find(|(_, e)| e.is_feed(epoch, sub))
            .map(|(c, _)| c.clone())
        else {
            return;
        };
        let Some(machine) = self.channels.get_mut(&channel) else {
            return;
        };
        if let Some(detail) = machine.on_refused(detail) {
            self.late_refusal(&channel, detail);
        }
    }

    pub(super) fn late_refusal(&mut self, channel: &Channel, detail: String) {
        bump(&mut self.cx.counters.late_refusals);
        let Some(machine) = self.remove_channel(channel) else {
            return;
        };
        if let Some(sub) = machine.refuse(&mut self.cx) {
            self.feeds.remove(&sub);
        }
        let concrete = channel.to_concrete();
        if let Some(c) = &concrete {
            self.members.cancel_reconcile(c);
        }
        let closing = concrete
            .as_ref()
            .and_then(|c| self.members.mirror.get(c).copied());
        self.cx.events.push_back(AgentEvent::ChannelRefused {
            channel: channel.clone(),
            detail,
            closing,
        });
        if let Some(c) = concrete {
            if let Some(generation) = closing {
                self.members.start_close(&mut self.cx, c, Some(generation));
            } else if let Some(u) = self.members.unclosed_mut(&c) {
                // A close is pending already, but a join since may have opened a newer
                // generation: find out by listing before closing.
                u.generation = None;
            } else if self.members.is_maybe(&c) {
                // Not mirrored, but a membership may exist (G41): list, then close.
                self.members.start_close(&mut self.cx, c, None);
            }
        }
    }
}
