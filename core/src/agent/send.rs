//! Sending, with id-collision republish.

use super::*;

impl Agent {
    /// Posts `parts` to a concrete channel with the given mentions (normalized here). The message
    /// id is drawn from the agent's seeded generator; the result is [`AgentEvent::Sent`] or
    /// [`AgentEvent::SendFailed`].
    ///
    /// # Errors
    ///
    /// [`AgentError::NotReady`] or [`AgentError::NotConcrete`].
    pub fn send(
        &mut self,
        now: Now,
        channel: &Channel,
        parts: Vec<Part>,
        mentions: &[String],
    ) -> Result<(RequestId, String), AgentError> {
        let id = self.cx.ids.uuid();
        let request = self.send_channel(now, channel, parts, mentions, id.clone(), true)?;
        Ok((request, id))
    }

    /// [`Agent::send`] with a caller-chosen id (for a resend after an unknown outcome).
    ///
    /// # Errors
    ///
    /// As [`Agent::send`].
    pub fn send_with_id(
        &mut self,
        now: Now,
        channel: &Channel,
        parts: Vec<Part>,
        mentions: &[String],
        id: String,
    ) -> Result<RequestId, AgentError> {
        self.send_channel(now, channel, parts, mentions, id, false)
    }

    /// [`Agent::send_with_id`]; `fresh` when the id was drawn here (see [`FreshSend`]).
    pub(super) fn send_channel(
        &mut self,
        now: Now,
        channel: &Channel,
        parts: Vec<Part>,
        mentions: &[String],
        id: String,
        fresh: bool,
    ) -> Result<RequestId, AgentError> {
        if self.cx.stopped {
            return Err(AgentError::Stopped);
        }
        if self.cx.link == Link::Down {
            return Err(AgentError::NotReady);
        }
        let Some(concrete) = channel.to_concrete() else {
            return Err(AgentError::NotConcrete(channel.clone()));
        };
        let mentions = normalize_mentions(mentions.iter().map(String::as_str));
        Ok(self.publish(now, Route::Channel(concrete), parts, mentions, id, fresh))
    }

    /// Unicasts `parts` to the instance `to` on `cotal.<s>.inst.<to>.<me>` (captured by
    /// `DM_<space>`; the target reads it through its `dm_<to>` consumer with kind `dm`). The
    /// message carries exactly one routing field, `to`, and no mentions. The result is
    /// [`AgentEvent::Sent`] (with the DM stream's sequence) or [`AgentEvent::SendFailed`].
    ///
    /// A DM to ourselves is stored like any other and acked as our own echo on arrival (§2(f)).
    ///
    /// # Errors
    ///
    /// [`AgentError::NotReady`] while disconnected, [`AgentError::Stopped`].
    pub fn send_dm(
        &mut self,
        now: Now,
        to: &AgentId,
        parts: Vec<Part>,
    ) -> Result<(RequestId, String), AgentError> {
        let id = self.cx.ids.uuid();
        self.check_connected()?;
        let request = self.publish(
            now,
            Route::To(to.clone()),
            parts,
            Vec::new(),
            id.clone(),
            true,
        );
        Ok((request, id))
    }

    /// [`Agent::send_dm`] with a caller-chosen id (for a resend after an unknown outcome: the DM
    /// stream's duplicate window drops the second copy).
    ///
    /// # Errors
    ///
    /// As [`Agent::send_dm`].
    pub fn send_dm_with_id(
        &mut self,
        now: Now,
        to: &AgentId,
        parts: Vec<Part>,
        id: String,
    ) -> Result<RequestId, AgentError> {
        self.check_connected()?;
        Ok(self.publish(now, Route::To(to.clone()), parts, Vec::new(), id, false))
    }

    /// Anycasts `parts` to `role` on `cotal.<s>.svc.<role>.<me>` (captured by the work queue
    /// `TASK_<space>`: exactly one server of the role takes it, with kind `anycast`). The message
    /// carries exactly one routing field, `toService`. The result is [`AgentEvent::Sent`] or
    /// [`AgentEvent::SendFailed`].
    ///
    /// # Errors
    ///
    /// [`AgentError::NotReady`] while disconnected, [`AgentError::Stopped`].
    pub fn send_anycast(
        &mut self,
        now: Now,
        role: &Role,
        parts: Vec<Part>,
    ) -> Result<(RequestId, String), AgentError> {
        let id = self.cx.ids.uuid();
        self.check_connected()?;
        let route = Route::ToService(role.clone());
        let request = self.publish(now, route, parts, Vec::new(), id.clone(), true);
        Ok((request, id))
    }

    /// [`Agent::send_anycast`] with a caller-chosen id.
    ///
    /// # Errors
    ///
    /// As [`Agent::send_anycast`].
    pub fn send_anycast_with_id(
        &mut self,
        now: Now,
        role: &Role,
        parts: Vec<Part>,
        id: String,
    ) -> Result<RequestId, AgentError> {
        self.check_connected()?;
        let route = Route::ToService(role.clone());
        Ok(self.publish(now, route, parts, Vec::new(), id, false))
    }

    /// Publishes one message through JetStream with `Nats-Msg-Id` = its id, on the subject its
    /// one route names (SPEC §12 items 2–4: our own sender token, one routing field). `fresh`:
    /// the id was drawn here, so `duplicate: true` is a collision ([`FreshSend`]).
    pub(super) fn publish(
        &mut self,
        now: Now,
        route: Route,
        parts: Vec<Part>,
        mentions: Vec<String>,
        id: String,
        fresh: bool,
    ) -> RequestId {
        let space = self.cx.config.space.clone();
        let sender = self.cx.config.me.id.clone();
        let subject = match &route {
            Route::Channel(channel) => Subject::Chat {
                space,
                sender,
                channel: channel.clone(),
            },
            Route::To(target) => Subject::Unicast {
                space,
                target: target.clone(),
                sender,
            },
            Route::ToService(role) => Subject::Anycast {
                space,
                role: role.clone(),
                sender,
            },
        };
        let mut msg = CotalMessage::new(
            id.clone(),
            now.wall,
            self.cx.config.space.clone(),
            self.cx.config.me.clone(),
            route,
            parts,
        );
        msg.mentions = mentions;
        let request = self.next_request_id();
        let subject = subject.to_string();
        let fresh = fresh.then(|| {
            Box::new(FreshSend {
                subject: subject.clone(),
                msg: msg.clone(),
                collisions: 0,
            })
        });
        self.publish_message(request, subject, msg, fresh);
        request
    }

    /// Sends the `JsPublish` of `msg` (its id is the `Nats-Msg-Id`) for `request`.
    pub(super) fn publish_message(
        &mut self,
        request: RequestId,
        subject: String,
        msg: CotalMessage,
        fresh: Option<Box<FreshSend>>,
    ) {
        let payload = json::encode(&msg);
        let op = self.op(Pending::Send {
            request,
            id: msg.id.clone(),
            fresh,
        });
        self.cx.commands.push_back(Command::JsPublish {
            op,
            subject,
            msg_id: Some(msg.id),
            headers: Vec::new(),
            payload,
        });
    }

    /// A fresh send answered `duplicate: true`: republish under a new id (bounded).
    pub(super) fn on_id_collision(
        &mut self,
        request: RequestId,
        old: String,
        mut fresh: Box<FreshSend>,
    ) {
        bump(&mut self.cx.counters.message_id_collisions);
        fresh.collisions += 1;
        if fresh.collisions > MAX_ID_COLLISIONS {
            self.cx.events.push_back(AgentEvent::SendFailed {
                request,
                id: old,
                error: format!(
                    "message id collided {MAX_ID_COLLISIONS} times: ids published ahead of ours"
                ),
                unknown: false,
            });
            return;
        }
        let new = self.cx.ids.uuid();
        self.cx.events.push_back(AgentEvent::MessageIdCollided {
            request,
            old,
            new: new.clone(),
        });
        let mut msg = fresh.msg.clone();
        msg.id = new;
        fresh.msg = msg.clone();
        let subject = fresh.subject.clone();
        self.publish_message(request, subject, msg, Some(fresh));
    }
}
