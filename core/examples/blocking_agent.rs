//! Embedding an [`Agent`] in a plain blocking loop: no async runtime, no threads.
//!
//! A host owns three things the core does not: the clock, the network and the randomness seed.
//! This example plays the host with a toy in-process "broker" that answers every command at once
//! (a real host would talk to nats-server through any client it likes: a blocking client, smol,
//! an embedded runtime). The loop is the same for every host:
//!
//! 1. feed inputs (`handle_input`) and expired deadlines (`handle_timeout`), with the time;
//! 2. drain `poll_command` and execute each command, turning results into inputs;
//! 3. drain `poll_event` and show them;
//! 4. sleep until `poll_timeout` or the next input.
//!
//! Run it with `cargo run -p cotal-core --example blocking_agent`.
// The host, not the core, owns the clock: the example reads std's clocks on purpose.
#![allow(
    clippy::print_stdout,
    clippy::disallowed_methods,
    clippy::disallowed_types,
    clippy::unwrap_used
)]

use cotal_core::agent::{Agent, AgentConfig, AgentEvent};
use cotal_core::io::{
    Command, Completion, Connection, Inbound, Input, Machine, PubAck, Reply, StoredMessage,
    StreamState,
};
use cotal_core::op::Failure;
use cotal_core::time::{Instant, Now, UnixMillis};
use cotal_core::wire::message::{Part, Sender};
use cotal_core::wire::token::{AgentId, Channel, Space};
use std::collections::VecDeque;

/// The host's clock: monotonic milliseconds since start, and the wall clock for stamps.
fn now(start: std::time::Instant) -> Now {
    let at = Instant::from_millis(start.elapsed().as_millis() as u64);
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Now::new(at, UnixMillis(wall))
}

/// A toy broker: a CHAT stream in a Vec, every subscription accepted, no delivery daemon.
#[derive(Default)]
struct ToyBroker {
    chat: Vec<StoredMessage>,
    subs: Vec<(cotal_core::io::SubId, String)>,
}

impl ToyBroker {
    fn execute(&mut self, command: Command, wall: UnixMillis, out: &mut VecDeque<Input>) {
        let done = |op| Input::Completed(Completion::success(op, Reply::Done));
        match command {
            Command::StreamInfo { op, .. } => out.push_back(Input::Completed(Completion::success(
                op,
                Reply::StreamState(StreamState {
                    first_seq: 1,
                    last_seq: self.chat.len() as u64,
                    messages: self.chat.len() as u64,
                    consumers: 0,
                    max_consumers: -1,
                    max_age_ms: 0,
                }),
            ))),
            Command::Subscribe { op, sub, subject } => {
                self.subs.push((sub, subject));
                out.push_back(done(op));
            }
            Command::JsPublish {
                op,
                subject,
                payload,
                ..
            } => {
                let seq = self.chat.len() as u64 + 1;
                self.chat.push(StoredMessage {
                    seq,
                    subject: subject.clone(),
                    headers: Vec::new(),
                    payload: payload.clone(),
                    stored_at: wall,
                });
                out.push_back(Input::Completed(Completion::success(
                    op,
                    Reply::PubAck(PubAck {
                        stream: "CHAT_demo".into(),
                        seq,
                        duplicate: false,
                    }),
                )));
                // Core delivery to matching subscriptions.
                for (sub, pattern) in &self.subs {
                    if cotal_core::acl::subject_matches(pattern, &subject) {
                        out.push_back(Input::Inbound(Inbound::Message {
                            sub: *sub,
                            subject: subject.clone(),
                            reply: None,
                            headers: Vec::new(),
                            payload: payload.clone(),
                        }));
                    }
                }
            }
            Command::ReadStream { op, .. } => out.push_back(Input::Completed(Completion::success(
                op,
                Reply::Stored(vec![]),
            ))),
            // No delivery daemon runs here: the durable backstop is reported unavailable.
            Command::Request { op, .. } => out.push_back(Input::Completed(Completion::failed(
                op,
                Failure::NoResponders,
            ))),
            other => {
                if let Some(op) = other.op() {
                    out.push_back(done(op));
                }
            }
        }
    }
}

fn main() {
    let start = std::time::Instant::now();
    let space = Space::new("demo").unwrap();
    let me = Sender::new(AgentId::new("bob").unwrap(), "bob");
    let mut config = AgentConfig::new(
        space.clone(),
        me,
        vec![Channel::new("general").unwrap()],
        42,
    );
    config.heartbeat = None;
    let mut agent = Agent::new(config).unwrap();
    let mut broker = ToyBroker::default();
    let mut inputs = VecDeque::from([Input::Connection(Connection::Restored)]);

    // Someone else posts once we are connected (step 3 below injects it).
    let mut posted = false;
    for _round in 0..20 {
        let t = now(start);
        while let Some(input) = inputs.pop_front() {
            agent.handle_input(t, input);
        }
        if agent.poll_timeout().is_some_and(|d| d <= t.at) {
            agent.handle_timeout(t);
        }
        while let Some(command) = agent.poll_command() {
            broker.execute(command, t.wall, &mut inputs);
        }
        while let Some(event) = agent.poll_event() {
            println!("event: {event:?}");
            if matches!(event, AgentEvent::Joined { .. }) && !posted {
                posted = true;
                // Alice's post, published straight to the toy broker.
                let alice = Sender::new(AgentId::new("alice").unwrap(), "alice");
                let msg = cotal_core::wire::message::CotalMessage::new(
                    "m-1",
                    t.wall,
                    space.clone(),
                    alice,
                    cotal_core::wire::message::Route::Channel(
                        cotal_core::wire::token::ConcreteChannel::new("general").unwrap(),
                    ),
                    vec![Part::text("hello bob")],
                );
                broker.execute(
                    Command::JsPublish {
                        op: cotal_core::op::OpId::from_raw(u64::MAX),
                        subject: "cotal.demo.chat.alice.general".into(),
                        msg_id: Some("m-1".into()),
                        headers: Vec::new(),
                        payload: cotal_core::wire::json::encode(&msg),
                    },
                    t.wall,
                    &mut VecDeque::new(),
                );
                // The toy broker delivered it to our subscription; feed that copy.
                for (sub, _) in &broker.subs {
                    inputs.push_back(Input::Inbound(Inbound::Message {
                        sub: *sub,
                        subject: "cotal.demo.chat.alice.general".into(),
                        reply: None,
                        headers: Vec::new(),
                        payload: cotal_core::wire::json::encode(&msg),
                    }));
                }
            }
        }
        // The application takes what surfaced, handles it, and reports it (acks happen only now).
        for item in agent.take_messages(t, 10) {
            println!(
                "message {} from {} on #{}: {:?}",
                item.id,
                item.item.message.from.id,
                item.item
                    .channel
                    .as_ref()
                    .map(|c| c.as_str())
                    .unwrap_or("?"),
                item.item.message.parts
            );
            agent.handled(t, &item.id).unwrap();
        }
        if inputs.is_empty() {
            // Nothing to feed: sleep until the next deadline (bounded for the example).
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    println!("health: {:?}", agent.health());
}
