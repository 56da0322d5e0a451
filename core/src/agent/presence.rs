//! Presence: [`Heartbeats`] publishes our presence record (`idle`) in the presence bucket at
//! every connect and every [`super::AgentConfig::heartbeat`], and an `offline` record when the
//! agent stops while connected (best effort). With `heartbeat: None` there is no presence.
//!
//! - **Owns:** the presence puts in flight (by op id; no decision waits on them) and the next
//!   heartbeat's deadline (timer `Heartbeat`).
//! - **Issues:** `KvPut` of `<presence bucket>/<our id>`.
//! - **Routed to it:** the completions of its puts ([`Heartbeats::owns`]), its deadline, loss,
//!   restore and stop.

use super::ctx::{Ctx, Link};
use crate::constants::ADVERTISED_PROTOCOL_VERSION;
use crate::io::{Command, KvCondition};
use crate::op::OpId;
use crate::time::{Instant, Now};
use crate::wire::json;
use crate::wire::keys::KvBucket;
use crate::wire::message::{AgentCard, Presence, PresenceStatus};
use std::collections::BTreeSet;

/// The presence heartbeats. See the module docs.
#[derive(Debug, Default)]
pub(super) struct Heartbeats {
    /// Puts in flight.
    pending: BTreeSet<OpId>,
    /// The next heartbeat.
    deadline: Option<Instant>,
}

impl Heartbeats {
    /// Whether `op` is one of this child's puts.
    pub(super) fn owns(&self, op: OpId) -> bool {
        self.pending.contains(&op)
    }

    /// A put's completion (nothing waits on it).
    pub(super) fn on_completion(&mut self, op: OpId) {
        self.pending.remove(&op);
    }

    /// The next heartbeat's deadline.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// A connection is up: beat now, and every interval from now.
    pub(super) fn on_restored(&mut self, cx: &mut Ctx, now: Now) {
        if let Some(every) = cx.config.heartbeat {
            self.put(cx, presence(cx, now, PresenceStatus::Idle));
            self.deadline = Some(now.at + every);
        }
    }

    /// The deadline fired (the parent popped it): beat again while connected.
    pub(super) fn handle_timeout(&mut self, cx: &mut Ctx, now: Now) {
        self.deadline = None;
        if cx.link != Link::Down
            && let Some(every) = cx.config.heartbeat
        {
            self.put(cx, presence(cx, now, PresenceStatus::Idle));
            self.deadline = Some(now.at + every);
        }
    }

    /// The connection is gone: no heartbeat until the next one.
    pub(super) fn on_lost(&mut self) {
        self.deadline = None;
    }

    /// The agent stops: no more heartbeats; an offline record when connected.
    pub(super) fn stop(&mut self, cx: &mut Ctx, now: Now) {
        self.deadline = None;
        if cx.link != Link::Down && cx.config.heartbeat.is_some() {
            let record = presence(cx, now, PresenceStatus::Offline).to_offline();
            self.put(cx, record);
        }
    }

    fn put(&mut self, cx: &mut Ctx, record: Presence) {
        let op = cx.ops.next_id();
        self.pending.insert(op);
        cx.commands.push_back(Command::KvPut {
            op,
            bucket: KvBucket::Presence.name(&cx.config.space),
            key: cx.config.me.id.as_str().to_owned(),
            value: json::encode(&record),
            condition: KvCondition::Any,
        });
    }
}

/// Our presence record with `status`.
fn presence(cx: &Ctx, now: Now, status: PresenceStatus) -> Presence {
    Presence {
        card: AgentCard {
            id: cx.config.me.id.clone(),
            name: cx.config.me.name.clone(),
            kind: Some("agent".into()),
            role: cx.config.me.role.clone(),
            protocol_version: Some(ADVERTISED_PROTOCOL_VERSION.into()),
            extra: Default::default(),
        },
        status,
        activity: None,
        attention: None,
        channel_modes: None,
        ts: now.wall,
        extra: Default::default(),
    }
}
