//! The context the parent lends its children: the one op-id allocator, the one command queue,
//! the one event queue, the one timer table and the counters.
//!
//! One allocator and one pair of queues keep op ids and the order of commands and events exactly
//! what a single machine would produce; one timer table keeps one expiry order. A child gets
//! `&mut Ctx` for the length of a call and never keeps it.

use super::events::{DeliveryCounters, DeliveryEvent};
use super::types::Timer;
use crate::io::{AckKind, Command};
use crate::ledger::DeliveryId;
use crate::op::{OpId, OpIds, TimerTable};
use std::collections::VecDeque;

/// What every child of [`super::Delivery`] writes into.
#[derive(Debug)]
pub(super) struct Ctx {
    /// The daemon's op-id allocator (every command's op id comes from here).
    pub(super) ops: OpIds,
    /// Commands to the driver, in issue order.
    pub(super) commands: VecDeque<Command>,
    /// Events for the driver, in emission order.
    pub(super) events: VecDeque<DeliveryEvent>,
    /// Every deadline of the daemon (each child sets its own [`Timer`] keys).
    pub(super) timers: TimerTable<Timer>,
    /// The daemon's counters.
    pub(super) counters: DeliveryCounters,
}

impl Ctx {
    pub(super) fn new() -> Self {
        Ctx {
            ops: OpIds::new(),
            commands: VecDeque::new(),
            events: VecDeque::new(),
            timers: TimerTable::new(),
            counters: DeliveryCounters::default(),
        }
    }

    /// A fresh op id.
    pub(super) fn op(&mut self) -> OpId {
        self.ops.next_id()
    }

    /// Queues a command.
    pub(super) fn push(&mut self, cmd: Command) {
        self.commands.push_back(cmd);
    }

    /// Queues an event.
    pub(super) fn emit(&mut self, e: DeliveryEvent) {
        self.events.push_back(e);
    }

    /// Settles a CHAT or dinbox delivery with a plain (unconfirmed) ack: nothing waits on the
    /// outcome (its op is not tracked; its completion is ignored). An ack lost on the way means a
    /// redelivery after `ack_wait`, and redoing a fan-out or a transfer is collapsed by the
    /// copy's msg-id.
    pub(super) fn settle(&mut self, delivery: DeliveryId, kind: AckKind) {
        let op = self.op();
        self.push(Command::Settle {
            op,
            delivery,
            kind,
            confirm: false,
        });
    }

    /// Publishes a control reply (core NATS); the daemon's own jobs have no requester.
    pub(super) fn publish_reply(&mut self, subject: &str, payload: bytes::Bytes) {
        if subject.is_empty() {
            // The daemon's own jobs (the orphan reaper's leaves) have no requester to answer.
            return;
        }
        self.push(Command::Publish {
            subject: subject.to_owned(),
            headers: Vec::new(),
            payload,
        });
    }
}
