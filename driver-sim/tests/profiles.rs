//! The permission model against the real credential profiles of `cotal_core::wire::permissions`.

// Test helpers outside `#[test]` functions unwrap set-up results too.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use cotal_core::io::{Command, Completion, Inbound, Input, KvCondition, ReadStart, Reply, SubId};
use cotal_core::op::{Failure, OpId, Outcome};
use cotal_core::time::Instant;
use cotal_core::wire::config::ConsumerSpec;
use cotal_core::wire::keys::KvBucket;
use cotal_core::wire::permissions::{AgentPolicy, Permissions};
use cotal_core::wire::token::{AgentId, Channel, Space};
use cotal_driver_sim::host::{Host, hosted};
use cotal_driver_sim::sched::SimConfig;
use cotal_driver_sim::script::{Log, Script};

fn outcome(log: &Log, id: u64) -> Option<Outcome<Reply>> {
    log.borrow().iter().find_map(|(_, i)| match i {
        Input::Completed(Completion { op, outcome }) if op.get() == id => Some(outcome.clone()),
        _ => None,
    })
}

fn refused(log: &Log, sub: u64) -> bool {
    log.borrow().iter().any(
        |(_, i)| matches!(i, Input::Inbound(Inbound::Refused { sub: s, .. }) if s.get() == sub),
    )
}

fn denied(o: Option<Outcome<Reply>>) -> bool {
    matches!(o, Some(Outcome::Failed(Failure::PermissionDenied { .. })))
}

fn ok(o: Option<Outcome<Reply>>) -> bool {
    matches!(o, Some(Outcome::Success(_)))
}

#[test]
fn agent_and_daemon_profiles_grant_what_semantics_1_10_says() {
    let space = Space::new("main").unwrap();
    let alice = AgentId::new("alice").unwrap();
    let backend = Channel::new("team.backend").unwrap();
    let agent = Permissions::agent(
        &space,
        &AgentPolicy {
            id: alice.clone(),
            allow_subscribe: vec![backend.clone()],
            allow_publish: vec![backend.clone()],
            role: None,
            spawn: false,
        },
    );
    let daemon = Permissions::delivery(&space, &AgentId::new("dmn").unwrap());
    let mut host = Host::new(SimConfig::new(21), false);
    host.broker_mut()
        .provision(&cotal_core::wire::capacity::ConsumerBudget::default().space_config(&space))
        .unwrap();

    let op = OpId::from_raw;
    let sub = SubId::from_raw;
    let subscribe = |o, s, subject: &str| Command::Subscribe {
        op: op(o),
        sub: sub(s),
        subject: subject.into(),
    };
    let js = |o, subject: &str| Command::JsPublish {
        op: op(o),
        subject: subject.into(),
        msg_id: None,
        headers: Vec::new(),
        payload: Bytes::new(),
    };
    let read = |o, stream: &str, filter: &str| Command::ReadStream {
        op: op(o),
        stream: stream.into(),
        filter: filter.into(),
        start: ReadStart::Seq(1),
        last_seq: None,
        max: 10,
        reader: None,
    };
    let put = |o, bucket: String, key: &str| Command::KvPut {
        op: op(o),
        bucket,
        key: key.into(),
        value: Bytes::from_static(b"{}"),
        condition: KvCondition::Any,
    };
    let get = |o, bucket: String, key: &str| Command::KvGet {
        op: op(o),
        bucket,
        key: key.into(),
    };
    let members = KvBucket::Members.name(&space);
    let presence = KvBucket::Presence.name(&space);
    let channels = KvBucket::Channels.name(&space);

    let agent_log = {
        let script = Script::new()
            .at(1, subscribe(1, 1, "cotal.main.chat.*.team.backend"))
            .at(1, subscribe(2, 2, "cotal.main.chat.*.secret"))
            .at(1, subscribe(3, 3, "cotal.main.dinbox.>"))
            .at(1, Command::Barrier { op: op(4) })
            .at(1, js(5, "cotal.main.chat.alice.team.backend"))
            .at(1, js(6, "cotal.main.chat.alice.team.other"))
            .at(1, js(7, "cotal.main.chat.bob.team.backend"))
            .at(1, read(8, "CHAT_main", "cotal.main.chat.*.team.backend"))
            .at(1, read(9, "CHAT_main", "cotal.main.chat.>"))
            .at(1, read(10, "INBOX_main", "cotal.main.dinbox.>"))
            .at(1, put(11, presence.clone(), "alice"))
            .at(1, put(12, presence.clone(), "bob"))
            .at(1, put(13, members.clone(), "team.backend/alice"))
            .at(1, get(14, channels.clone(), "team.backend"))
            .at(
                1,
                Command::Consume {
                    op: op(15),
                    sub: sub(4),
                    consumer: ConsumerSpec::dlv(&space, &alice),
                    create: true,
                    max_in_flight: 4,
                },
            );
        let log = script.log();
        host.add_machine("alice", agent, hosted(script, |e| e));
        log
    };
    let daemon_log = {
        let script = Script::new()
            .at(1, subscribe(1, 1, "cotal.main.chat.>"))
            .at(1, subscribe(2, 2, "cotal.main.ctl.delivery.*"))
            .at(1, put(3, members, "team.backend/alice"))
            .at(
                1,
                Command::Consume {
                    op: op(4),
                    sub: sub(3),
                    consumer: ConsumerSpec::reader(&space, 0, 1),
                    create: true,
                    max_in_flight: 4,
                },
            )
            .at(1, js(5, "cotal.main.chat.dmn.team.backend"));
        let log = script.log();
        host.add_machine("daemon", daemon, hosted(script, |e| e));
        log
    };
    host.run_until(Instant::from_millis(200));

    let a = &agent_log;
    assert!(!refused(a, 1), "its own read ACL");
    assert!(
        refused(a, 2) && refused(a, 3),
        "outside its read ACL, and INBOX"
    );
    assert!(
        ok(outcome(a, 5)),
        "posts as itself to an allowPublish channel"
    );
    assert!(
        denied(outcome(a, 6)) && denied(outcome(a, 7)),
        "other channel / spoofed sender"
    );
    assert!(
        ok(outcome(a, 8)),
        "history through its pinned chathist grant"
    );
    assert!(
        denied(outcome(a, 9)) && denied(outcome(a, 10)),
        "wider than its grant; INBOX"
    );
    assert!(
        ok(outcome(a, 11)) && denied(outcome(a, 12)),
        "own presence key only"
    );
    assert!(denied(outcome(a, 13)), "no members grant");
    assert_eq!(outcome(a, 14), Some(Outcome::Success(Reply::Kv(None))));
    assert!(
        denied(outcome(a, 15)),
        "agents may not create DLV consumers"
    );

    let d = &daemon_log;
    assert!(refused(d, 1), "no native chat subscription");
    assert!(!refused(d, 2));
    assert!(ok(outcome(d, 3)) && ok(outcome(d, 4)));
    assert!(denied(outcome(d, 5)), "the daemon does not post chat");
}
