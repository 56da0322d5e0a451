//! The unicast and anycast paths against the reference's recorded wire: an agent sending the
//! recorded DM (from `dm-task-messages.json`) and the recorded anycast (from `wire-log.jsonl`)
//! with the same id, time and sender produces the same subject, the same `Nats-Msg-Id` and the
//! same payload bytes; and the recorded deliveries, fed to the addressed agent through its
//! `dm_<id>` / `svc_<role>` consumer, surface with the kind taken from the subject.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a panic is the test failing"
)]

use cotal_core::agent::{Agent, AgentConfig};
use cotal_core::io::{Command, Completion, Connection, Inbound, Input, Machine, Reply};
use cotal_core::ledger::{DeliveryId, SourceKind};
use cotal_core::time::{Instant, Now, UnixMillis};
use cotal_core::wire::message::{CotalMessage, Part, Route, Sender};
use cotal_core::wire::subject::DeliveryKind;
use cotal_core::wire::token::{AgentId, Role, Space};
use cotal_tests::{b64, fixture_json, fixture_text};
use serde_json::Value;

/// One recorded message: its subject, `Nats-Msg-Id` and exact payload bytes.
struct Recorded {
    subject: String,
    msg_id: String,
    payload: Vec<u8>,
}

impl Recorded {
    fn message(&self) -> CotalMessage {
        CotalMessage::decode(&self.payload).expect("recorded message decodes")
    }
}

fn recorded_dm() -> Recorded {
    let f = fixture_json("dm-task-messages.json");
    let stored = &f["DM_wirefix"][0];
    Recorded {
        subject: stored["subject"].as_str().unwrap().to_owned(),
        msg_id: stored["headers"]["Nats-Msg-Id"][0]
            .as_str()
            .unwrap()
            .to_owned(),
        payload: b64(stored["raw_response"]["message"]["data"].as_str().unwrap()),
    }
}

/// The anycast publish (alice → `reviewer`) as the wire log recorded it.
fn recorded_anycast() -> Recorded {
    let line: Value = fixture_text("wire-log.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| {
            v["subject"]
                .as_str()
                .is_some_and(|s| s.starts_with("cotal.wirefix.svc."))
                && v["reply"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("_INBOX_"))
        })
        .expect("the anycast publish is in the wire log");
    Recorded {
        subject: line["subject"].as_str().unwrap().to_owned(),
        msg_id: line["headers"]["Nats-Msg-Id"][0]
            .as_str()
            .unwrap()
            .to_owned(),
        payload: line["payload"].as_str().unwrap().as_bytes().to_vec(),
    }
}

/// An agent that is `from`, connected (link up, registry loading), its commands drained.
fn agent_as(from: &Sender, unicast: bool, roles: &[Role]) -> (Agent, Vec<Command>) {
    let mut config = AgentConfig::new(Space::new("wirefix").unwrap(), from.clone(), Vec::new(), 1);
    config.heartbeat = None;
    config.durable_backstop = false;
    config.unicast = unicast;
    config.roles = roles.to_vec();
    let mut agent = Agent::new(config).unwrap();
    let now = Now::new(Instant::from_millis(1), UnixMillis(1));
    agent.handle_input(now, Input::Connection(Connection::Restored));
    let mut commands = Vec::new();
    while let Some(c) = agent.poll_command() {
        commands.push(c);
    }
    (agent, commands)
}

fn only_publish(agent: &mut Agent) -> (String, Option<String>, Vec<u8>) {
    let mut publishes = Vec::new();
    while let Some(c) = agent.poll_command() {
        if let Command::JsPublish {
            subject,
            msg_id,
            payload,
            ..
        } = c
        {
            publishes.push((subject, msg_id, payload.to_vec()));
        }
    }
    assert_eq!(publishes.len(), 1);
    publishes.remove(0)
}

fn assert_same_wire(ours: (String, Option<String>, Vec<u8>), theirs: &Recorded) {
    assert_eq!(ours.0, theirs.subject);
    assert_eq!(ours.1.as_deref(), Some(theirs.msg_id.as_str()));
    assert_eq!(
        String::from_utf8(ours.2).unwrap(),
        String::from_utf8(theirs.payload.clone()).unwrap(),
        "byte-exact payload"
    );
}

fn text_of(m: &CotalMessage) -> String {
    match &m.parts[0] {
        Part::Text { text, .. } => text.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_agent_dm_is_the_reference_dm_byte_for_byte() {
    let theirs = recorded_dm();
    let m = theirs.message();
    let Route::To(target) = &m.route else {
        panic!("the recorded DM routes with `to`: {:?}", m.route)
    };
    let (mut agent, _) = agent_as(&m.from, false, &[]);
    let now = Now::new(Instant::from_millis(2), m.ts);
    agent
        .send_dm_with_id(now, target, vec![Part::text(text_of(&m))], m.id.clone())
        .unwrap();
    assert_same_wire(only_publish(&mut agent), &theirs);
}

#[test]
fn an_agent_anycast_is_the_reference_anycast_byte_for_byte() {
    let theirs = recorded_anycast();
    let m = theirs.message();
    let Route::ToService(role) = &m.route else {
        panic!(
            "the recorded anycast routes with `toService`: {:?}",
            m.route
        )
    };
    let (mut agent, _) = agent_as(&m.from, false, &[]);
    let now = Now::new(Instant::from_millis(2), m.ts);
    agent
        .send_anycast_with_id(now, role, vec![Part::text(text_of(&m))], m.id.clone())
        .unwrap();
    assert_same_wire(only_publish(&mut agent), &theirs);
}

/// Feeds `recorded` through the consumer named `consumer` of an agent that is `me`, and returns
/// what it surfaced.
fn receive(
    me: Sender,
    roles: &[Role],
    consumer: &str,
    recorded: &Recorded,
) -> (DeliveryKind, Option<Role>, SourceKind, String) {
    let (mut agent, commands) = agent_as(&me, true, roles);
    let now = Now::new(Instant::from_millis(3), UnixMillis(3));
    let mut sub = None;
    for c in commands {
        if let Command::Consume {
            op,
            sub: s,
            consumer: spec,
            create,
            ..
        } = c
        {
            assert!(!create, "agents bind, never create (auth mode)");
            agent.handle_input(now, Input::Completed(Completion::success(op, Reply::Done)));
            if spec.name == consumer {
                sub = Some(s);
            }
        }
    }
    let sub = sub.unwrap_or_else(|| panic!("{consumer} bound"));
    agent.handle_input(
        now,
        Input::Inbound(Inbound::Delivery {
            sub,
            delivery: DeliveryId(1),
            stream_seq: 1,
            delivery_count: 1,
            subject: recorded.subject.clone(),
            headers: vec![("Nats-Msg-Id".into(), recorded.msg_id.clone())],
            payload: recorded.payload.clone().into(),
        }),
    );
    let mut got = agent.take_messages(now, 10);
    assert_eq!(got.len(), 1);
    let s = got.remove(0);
    (s.item.kind, s.item.role, s.origin, s.item.message.id)
}

#[test]
fn the_recorded_dm_surfaces_with_kind_dm_for_its_target() {
    let theirs = recorded_dm();
    let m = theirs.message();
    let Route::To(target) = m.route.clone() else {
        panic!()
    };
    let consumer = format!("dm_{}", target.as_str());
    let got = receive(Sender::new(target, "alice"), &[], &consumer, &theirs);
    assert_eq!(got, (DeliveryKind::Dm, None, SourceKind::Durable, m.id));
}

#[test]
fn the_recorded_anycast_surfaces_with_kind_anycast_for_a_reviewer() {
    let theirs = recorded_anycast();
    let m = theirs.message();
    let reviewer = Role::new("reviewer").unwrap();
    let bob = AgentId::new("UANNGPK6D5RREC7GAIT7DMR7YUXSB5EDBUVD6SCMQDWLZXXK236WPAOW").unwrap();
    let got = receive(
        Sender::new(bob, "bob"),
        std::slice::from_ref(&reviewer),
        "svc_reviewer",
        &theirs,
    );
    assert_eq!(
        got,
        (
            DeliveryKind::Anycast,
            Some(reviewer),
            SourceKind::Durable,
            m.id
        )
    );
}
