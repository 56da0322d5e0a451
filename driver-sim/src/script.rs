//! A scripted [`Machine`] for tests of the simulator and of driver conformance.
//!
//! [`Script`] emits planned commands at planned instants, records every input it gets (with the
//! time) in a shared [`Log`], and can play two simple roles: a responder that answers every
//! request it receives, and a consumer that settles every delivery at once.

use bytes::Bytes;
use cotal_core::io::{AckKind, Command, Inbound, Input, Machine};
use cotal_core::op::OpId;
use cotal_core::time::{Instant, Now};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

/// The inputs a [`Script`] received, shared with the test that reads them.
pub type Log = Rc<RefCell<Vec<(Instant, Input)>>>;

/// A scripted machine. See the module docs.
#[derive(Debug, Default)]
pub struct Script {
    plan: VecDeque<(Instant, Command)>,
    ready: VecDeque<Command>,
    log: Log,
    respond: bool,
    settle: Option<AckKind>,
    next_op: u64,
}

impl Script {
    /// A script that does nothing until given a plan.
    pub fn new() -> Self {
        Script {
            next_op: 1_000_000,
            ..Script::default()
        }
    }

    /// Emits `cmd` once the clock reaches `at` (plans are kept in the order given).
    pub fn at(mut self, at: u64, cmd: Command) -> Self {
        self.plan.push_back((Instant::from_millis(at), cmd));
        self
    }

    /// Answers every request it receives with `re:<payload>` on the request's reply subject.
    pub fn responder(mut self) -> Self {
        self.respond = true;
        self
    }

    /// Settles every durable delivery with `kind` as soon as it arrives (ops from 1 000 000 up).
    pub fn settling(mut self, kind: AckKind) -> Self {
        self.settle = Some(kind);
        self
    }

    /// The shared log of received inputs.
    pub fn log(&self) -> Log {
        Rc::clone(&self.log)
    }

    fn release(&mut self, now: Instant) {
        while self.plan.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, cmd)) = self.plan.pop_front() {
                self.ready.push_back(cmd);
            }
        }
    }
}

impl Machine for Script {
    type Event = String;

    fn handle_input(&mut self, now: Now, input: Input) {
        match &input {
            Input::Inbound(Inbound::Message {
                reply: Some(reply),
                payload,
                ..
            }) if self.respond => {
                let mut body = b"re:".to_vec();
                body.extend_from_slice(payload);
                self.ready.push_back(Command::Publish {
                    subject: reply.clone(),
                    headers: Vec::new(),
                    payload: Bytes::from(body),
                });
            }
            Input::Inbound(Inbound::Delivery { delivery, .. }) => {
                if let Some(kind) = self.settle {
                    self.next_op += 1;
                    self.ready.push_back(Command::Settle {
                        op: OpId::from_raw(self.next_op),
                        delivery: *delivery,
                        kind,
                        confirm: true,
                    });
                }
            }
            _ => {}
        }
        self.log.borrow_mut().push((now.at, input));
        self.release(now.at);
    }

    fn handle_timeout(&mut self, now: Now) {
        self.release(now.at);
    }

    fn poll_command(&mut self) -> Option<Command> {
        self.ready.pop_front()
    }

    fn poll_event(&mut self) -> Option<String> {
        None
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.plan.front().map(|(t, _)| *t)
    }
}
