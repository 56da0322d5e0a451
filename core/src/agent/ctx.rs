//! The context the parent [`super::Agent`] lends to its children: one op-id allocator, one
//! subscription-id allocator, one uuid generator, one command queue, one event queue, the
//! counters, the configuration and the connection state. Every child takes `&mut Ctx` in its
//! entry points, so ids are drawn and commands issued in exactly the order the parent drives
//! them. This module imports neither the parent nor any child.

use super::types::{AgentConfig, AgentCounters, AgentEvent, RequestId};
use crate::entropy::IdGen;
use crate::io::{Command, SubIds};
use crate::op::{OpId, OpIds};
use crate::time::{Duration, Instant, UnixMillis};
use crate::wire::control::DeliveryRequest;
use crate::wire::json;
use crate::wire::subject::{delivery_reply_subject, delivery_request_subject};
use std::collections::VecDeque;

/// The connection as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Link {
    Down,
    /// Connected; the registry watch has not loaded yet.
    Loading,
    Ready,
}

/// A direct (JetStream, acked) consumer: the unicast inbox or one role's task queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Direct {
    /// `dm_<id>` on DM.
    Dm,
    /// `svc_<role>` on TASK; the index into [`AgentConfig::roles`].
    Svc(usize),
}

/// What the parent lends its children (see the module docs).
#[derive(Debug)]
pub(super) struct Ctx {
    pub(super) config: AgentConfig,
    pub(super) ops: OpIds,
    pub(super) subs: SubIds,
    pub(super) ids: IdGen,
    pub(super) commands: VecDeque<Command>,
    pub(super) events: VecDeque<AgentEvent>,
    pub(super) counters: AgentCounters,
    pub(super) link: Link,
    pub(super) stopped: bool,
    /// The latest `now` seen (timers set outside an input use it).
    pub(super) last_at: Instant,
    pub(super) last_wall: UnixMillis,
    /// Request ids handed out so far.
    next_request: u64,
}

impl Ctx {
    pub(super) fn new(config: AgentConfig, ids: IdGen) -> Self {
        Ctx {
            config,
            ops: OpIds::new(),
            subs: SubIds::new(),
            ids,
            commands: VecDeque::new(),
            events: VecDeque::new(),
            counters: AgentCounters::default(),
            link: Link::Down,
            stopped: false,
            last_at: Instant::ZERO,
            last_wall: UnixMillis(0),
            next_request: 0,
        }
    }

    /// Sends a control request to the delivery daemon (`ctl.delivery`, a fresh reply subject);
    /// returns its op id for the caller's pending table.
    pub(super) fn control_request(
        &mut self,
        request: &DeliveryRequest,
        timeout: Duration,
    ) -> Option<OpId> {
        let uuid = self.ids.uuid();
        let space = self.config.space.clone();
        let me = self.config.me.id.clone();
        let reply = match delivery_reply_subject(&space, &me, &uuid) {
            Ok(s) => s.to_string(),
            // A uuid is always one token; this cannot happen.
            Err(_) => {
                debug_assert!(false, "uuid is not a subject token");
                return None;
            }
        };
        let payload = json::encode(&request.to_request(self.config.me.clone()));
        let op = self.ops.next_id();
        self.commands.push_back(Command::Request {
            op,
            subject: delivery_request_subject(&space, &me).to_string(),
            reply,
            payload,
            timeout,
        });
        Some(op)
    }

    /// The next application request id (joins, leaves and sends share the sequence).
    pub(super) fn next_request_id(&mut self) -> RequestId {
        self.next_request += 1;
        RequestId(self.next_request)
    }
}

/// Adds one to a counter, saturating.
pub(super) fn bump(c: &mut u64) {
    *c = c.saturating_add(1);
}
