//! The join flow (parent code, `impl Agent`): arm, subscribe, confirm, commit, then the durable
//! step and the backfill, over the parent's channel map. The backfill pages are read by
//! [`super::history::HistoryReader`] and ingested by [`super::receive::Receiver`].
//!
//! # The join, step by step (§2(a))
//!
//! 1. **Arm the watermark**: read the CHAT frontier `F` ([`Command::StreamInfo`]).
//! 2. **Subscribe live** to `cotal.<s>.chat.*.<ch>`.
//! 3. **Confirm** with a server round trip ([`Command::Barrier`]). A refusal of the SUB arrives
//!    before the barrier's completion; a refused or unconfirmable join is undone (unsubscribe,
//!    watermark dropped) and reported as [`AgentEvent::JoinFailed`]: fail closed, nothing left.
//! 4. **Commit**: the channel is joined now, and only now (SPEC §12 item 13).
//! 5. **Durable backstop** for a channel the one resolver ([`ChannelRegistry::policy_for`](crate::policy::ChannelRegistry::policy_for)) calls
//!    durable: `ctl.delivery durableJoin {channel, joinCursor: F}`. The cursor is our fix for G1: a
//!    daemon that honours it echoes it back, and the report says whether it did
//!    ([`JoinReport::cursor_honoured`]). If the backstop is not established the report carries a
//!    `reason`, the channel's health is degraded, and a reconcile loop retries with backoff (the
//!    reference does this for boot joins only, G13).
//! 6. **Backfill** messages `≤ F` ([`Command::ReadStream`], paged), through the same authenticity
//!    filter as the live path, as [`CopySource::Backfill`] copies.
//! 7. Report [`AgentEvent::Joined`] once steps 5 and 6 both finished (they run concurrently).

use super::*;

impl Agent {
    pub(super) fn start_join(&mut self, channel: Channel, request: Option<RequestId>) {
        let epoch = self.epoch();
        let entry = ChannelEntry {
            channel: channel.clone(),
            phase: Phase::Arming,
            epoch,
            sub: None,
            watermark: None,
            refused: None,
            join: Some(JoinProgress {
                request,
                started: false,
                backfill_pending: false,
                durable_pending: false,
                report: JoinReport {
                    joined: true,
                    watermark: None,
                    backfilled: 0,
                    durable: false,
                    generation: None,
                    cursor_honoured: None,
                    reason: None,
                },
            }),
            resubscribe: false,
            backstop: BackstopState::Pending,
            leave: None,
            backfill_next: None,
        };
        self.channels.insert(channel.clone(), entry);
        let op = self.op(Pending::Arm { channel, epoch });
        self.cx.commands.push_back(Command::StreamInfo {
            op,
            stream: self.chat_stream(),
        });
    }

    pub(super) fn subscribe(&mut self, channel: &Channel) {
        let Some(entry) = self.channels.get(channel) else {
            return;
        };
        let epoch = entry.epoch;
        let sub = self.cx.subs.next_id();
        self.feeds.insert(sub, Feed::Chat(epoch));
        let subject = chat_subscribe_pattern(&self.cx.config.space, channel);
        if let Some(entry) = self.channels.get_mut(channel) {
            entry.sub = Some(sub);
            entry.refused = None;
            if entry.phase == Phase::Arming {
                entry.phase = Phase::Subscribing;
            }
        }
        let op = self.op(Pending::Subscribe {
            channel: channel.clone(),
            epoch,
        });
        self.cx
            .commands
            .push_back(Command::Subscribe { op, sub, subject });
        let op = self.op(Pending::Barrier {
            channel: channel.clone(),
            epoch,
        });
        self.cx.commands.push_back(Command::Barrier { op });
    }

    pub(super) fn resubscribe(&mut self, channel: &Channel) {
        let epoch = self.epoch();
        if let Some(entry) = self.channels.get_mut(channel) {
            entry.epoch = epoch;
            entry.resubscribe = true;
            entry.refused = None;
        }
        self.subscribe(channel);
    }

    /// A join attempt failed before its commit: undo everything and report.
    pub(super) fn fail_join(&mut self, channel: &Channel, error: JoinError) {
        let Some(entry) = self.channels.remove(channel) else {
            return;
        };
        if let Some(sub) = entry.sub {
            self.feeds.remove(&sub);
            self.cx.commands.push_back(Command::Unsubscribe { sub });
        }
        let request = entry.join.and_then(|j| j.request);
        self.cx.events.push_back(AgentEvent::JoinFailed {
            request,
            channel: channel.clone(),
            error,
        });
    }

    pub(super) fn on_arm(&mut self, channel: Channel, epoch: u64, outcome: Outcome<Reply>) {
        if !self.is_current(&channel, epoch, Phase::Arming) {
            return;
        }
        match outcome {
            Outcome::Success(Reply::StreamState(state)) => {
                if let Some(entry) = self.channels.get_mut(&channel) {
                    entry.watermark = Some(state.last_seq);
                    if let Some(join) = entry.join.as_mut() {
                        join.report.watermark = Some(state.last_seq);
                    }
                }
                self.subscribe(&channel);
            }
            Outcome::Success(other) => self.fail_join(
                &channel,
                JoinError::Unconfirmed {
                    detail: format!("unexpected reply to the frontier read: {other:?}"),
                },
            ),
            Outcome::Failed(f) => self.fail_join(
                &channel,
                JoinError::Unconfirmed {
                    detail: format!("CHAT frontier unreadable: {f}"),
                },
            ),
            Outcome::Unknown => self.fail_join(
                &channel,
                JoinError::Unconfirmed {
                    detail: "CHAT frontier read outcome unknown".into(),
                },
            ),
        }
    }

    pub(super) fn is_current(&self, channel: &Channel, epoch: u64, phase: Phase) -> bool {
        self.channels
            .get(channel)
            .is_some_and(|e| e.epoch == epoch && e.phase == phase)
    }

    pub(super) fn on_subscribe(&mut self, channel: Channel, epoch: u64, outcome: Outcome<Reply>) {
        let Some(entry) = self.channels.get_mut(&channel) else {
            return;
        };
        if entry.epoch != epoch {
            return;
        }
        if entry.phase == Phase::Subscribing {
            entry.phase = Phase::Confirming;
        }
        match outcome {
            Outcome::Success(_) => {}
            Outcome::Failed(f) => {
                // The barrier decides; remember the failure as a refusal reason.
                entry.refused.get_or_insert_with(|| f.to_string());
            }
            Outcome::Unknown => {
                entry
                    .refused
                    .get_or_insert_with(|| "subscribe outcome unknown".into());
            }
        }
    }

    pub(super) fn on_barrier(&mut self, channel: Channel, epoch: u64, outcome: Outcome<Reply>) {
        let Some(entry) = self.channels.get(&channel) else {
            return;
        };
        if entry.epoch != epoch {
            return;
        }
        let refused = entry.refused.clone();
        let resubscribe = entry.resubscribe;
        let confirmed = matches!(outcome, Outcome::Success(_));
        if resubscribe {
            // A re-subscribe after reconnect: a refusal here is a late refusal.
            if let Some(detail) = refused {
                self.late_refusal(&channel, detail);
            } else if !confirmed {
                // Not confirmed. When the connection is going down, the next restore
                // re-subscribes. On a live connection (a timeout, or an answer lost after the
                // effect), confirm again: until a barrier succeeds, a refusal of the new
                // subscription may still be on its way, and the channel must not be reported
                // live (found by the simulator, seed 1677: a later refusal was parked for a
                // barrier that had already completed, so the channel stayed joined with no
                // subscription).
                if self.cx.link != Link::Down {
                    let op = self.op(Pending::Barrier {
                        channel: channel.clone(),
                        epoch,
                    });
                    self.cx.commands.push_back(Command::Barrier { op });
                }
            } else if let Some(entry) = self.channels.get_mut(&channel) {
                entry.resubscribe = false;
            }
            return;
        }
        if entry.phase != Phase::Confirming && entry.phase != Phase::Subscribing {
            return;
        }
        if let Some(detail) = refused {
            let error = if detail.to_ascii_lowercase().contains("permission") {
                JoinError::Refused { detail }
            } else {
                JoinError::Unconfirmed { detail }
            };
            self.fail_join(&channel, error);
            return;
        }
        match outcome {
            Outcome::Success(_) => {
                if let Some(entry) = self.channels.get_mut(&channel) {
                    entry.phase = Phase::Joined;
                }
                self.maybe_start_post_commit(&channel);
            }
            Outcome::Failed(f) => self.fail_join(
                &channel,
                JoinError::Unconfirmed {
                    detail: f.to_string(),
                },
            ),
            Outcome::Unknown => self.fail_join(
                &channel,
                JoinError::Unconfirmed {
                    detail: "confirmation outcome unknown".into(),
                },
            ),
        }
    }

    /// After the commit, once the registry is loaded: durable step and backfill.
    pub(super) fn maybe_start_post_commit(&mut self, channel: &Channel) {
        if self.cx.link != Link::Ready {
            return;
        }
        let Some(entry) = self.channels.get(channel) else {
            return;
        };
        if entry.phase != Phase::Joined {
            return;
        }
        let Some(join) = entry.join.as_ref() else {
            return;
        };
        if join.started {
            return;
        }
        let watermark = entry.watermark;
        let policy = self.watch.registry().policy_for(channel);
        let durable_class = policy.is_durable() && self.cx.config.durable_backstop;
        let concrete = channel.to_concrete();
        // Durable step.
        let mut durable_pending = false;
        let mut backstop = BackstopState::NotApplicable;
        let mut reason = None;
        if durable_class {
            match &concrete {
                Some(c)
                    if self.members.mirror.contains_key(c)
                        && self.members.unclosed(c).is_none() =>
                {
                    // Already a member (a relaunch's boot join finds it idempotently too). With a
                    // close pending, the daemon is asked instead: the close may have landed.
                    let generation = self.members.mirror[c];
                    backstop = BackstopState::Established { generation };
                }
                Some(c) => {
                    durable_pending = true;
                    backstop = BackstopState::Requesting;
                    let request = DeliveryRequest::DurableJoin {
                        channel: c.clone(),
                        join_cursor: watermark,
                    };
                    self.control_request(
                        &request,
                        Pending::DurableJoin {
                            channel: c.clone(),
                            cursor: watermark,
                        },
                        DURABLE_JOIN_TIMEOUT,
                    );
                }
                None => {
                    reason = Some(
                        "durable backstop unavailable (a wildcard channel has no membership)"
                            .to_owned(),
                    );
                    backstop = BackstopState::Degraded {
                        reason: reason.clone().unwrap_or_default(),
                        attempts: 0,
                    };
                }
            }
        }
        // Backfill.
        let mut backfill_pending = false;
        let mut next = None;
        if let Some(f) = watermark {
            let start = match policy.backfill() {
                Backfill::Skip => None,
                Backfill::Full => Some(ReadStart::Seq(1)),
                Backfill::Window(w) => Some(ReadStart::Time(UnixMillis(
                    self.cx.last_wall.0.saturating_sub(w.as_millis()),
                ))),
            };
            if let (Some(start), true) = (start, f > 0) {
                backfill_pending = true;
                next = Some(start);
            }
        }
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        entry.backstop = backstop;
        if let Some(join) = entry.join.as_mut() {
            join.started = true;
            join.durable_pending = durable_pending;
            join.backfill_pending = backfill_pending;
            if reason.is_some() {
                join.report.reason = reason;
            }
            if let BackstopState::Established { generation } = entry.backstop {
                join.report.durable = true;
                join.report.generation = Some(generation);
            }
        }
        if let (Some(start), Some(f)) = (next, watermark) {
            self.read_backfill(channel, start, f);
        }
        self.maybe_report_join(channel);
    }

    pub(super) fn read_backfill(&mut self, channel: &Channel, start: ReadStart, until: u64) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        let epoch = entry.epoch;
        if let ReadStart::Seq(s) = start {
            entry.backfill_next = Some(s);
        }
        self.history.read(
            &mut self.cx,
            PageRead {
                channel: channel.clone(),
                epoch,
                start,
                until,
            },
        );
    }

    /// A backfill page's completion (the reader has moved on already): ingest it, and read the
    /// next page or finish.
    pub(super) fn on_backfill(&mut self, now: Now, read: PageRead, outcome: Outcome<Reply>) {
        let PageRead {
            channel,
            epoch,
            until,
            ..
        } = read;
        let Some(entry) = self.channels.get(&channel) else {
            return;
        };
        if entry.epoch != epoch || entry.phase != Phase::Joined {
            return;
        }
        match outcome {
            Outcome::Success(Reply::Stored(messages)) => {
                let full = messages.len() >= HISTORY_FETCH_MAX_BATCH as usize;
                let mut last = None;
                let mut count = 0u64;
                for m in messages {
                    if m.seq > until {
                        break;
                    }
                    last = Some(m.seq);
                    count += 1;
                    let channels = &self.channels;
                    self.receiver.ingest_chat(
                        &mut self.cx,
                        now,
                        &m.subject,
                        &m.payload,
                        CopySource::Backfill,
                        |c| established(channels, c),
                    );
                }
                if let Some(join) = self
                    .channels
                    .get_mut(&channel)
                    .and_then(|e| e.join.as_mut())
                {
                    join.report.backfilled = join.report.backfilled.saturating_add(count);
                }
                match last {
                    Some(l) if full && l < until => {
                        self.read_backfill(&channel, ReadStart::Seq(l + 1), until)
                    }
                    _ => self.finish_backfill(&channel, None),
                }
            }
            Outcome::Success(other) => self.finish_backfill(
                &channel,
                Some(format!("backfill failed: unexpected reply {other:?}")),
            ),
            Outcome::Failed(f) => {
                self.finish_backfill(&channel, Some(format!("backfill failed: {f}")))
            }
            Outcome::Unknown => {
                self.finish_backfill(&channel, Some("backfill interrupted".to_owned()))
            }
        }
    }

    pub(super) fn finish_backfill(&mut self, channel: &Channel, error: Option<String>) {
        if error.is_some() {
            bump(&mut self.cx.counters.backfill_failures);
        }
        if let Some(entry) = self.channels.get_mut(channel) {
            entry.backfill_next = None;
            if let Some(join) = entry.join.as_mut() {
                join.backfill_pending = false;
                if let Some(e) = error {
                    join.report.reason = Some(match join.report.reason.take() {
                        Some(r) => format!("{r}; {e}"),
                        None => e,
                    });
                }
            }
        }
        self.maybe_report_join(channel);
    }

    pub(super) fn maybe_report_join(&mut self, channel: &Channel) {
        let Some(entry) = self.channels.get_mut(channel) else {
            return;
        };
        let done = entry
            .join
            .as_ref()
            .is_some_and(|j| j.started && !j.backfill_pending && !j.durable_pending);
        if !done {
            return;
        }
        let Some(join) = entry.join.take() else {
            return;
        };
        self.cx.events.push_back(AgentEvent::Joined {
            request: join.request,
            channel: channel.clone(),
            report: join.report,
        });
    }
}
