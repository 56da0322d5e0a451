//! The executor against a real nats-server, one test per command kind (skipped when
//! `COTAL_NATS_SERVER` is unset). Each wait is bounded (`common::WAIT`).

mod common;

use bytes::Bytes;
use common::{Driver, NatsServer, User, WAIT, ok};
use cotal_core::io::{
    AckKind, Command, Connection, Inbound, Input, KvCondition, KvEntry, KvOperation, PubAck,
    ReadStart, Reply, StoredMessage, StreamState, SubId,
};
use cotal_core::op::{Failure, Outcome};
use cotal_core::time::Duration as CoreDuration;
use cotal_core::wire::config::ConsumerSpec;
use cotal_core::wire::permissions::{AgentPolicy, Permissions};
use cotal_core::wire::token::{AgentId, Channel, Space};
use cotal_driver_tokio::connect::connect;
use cotal_driver_tokio::exec::ExecutorConfig;
use cotal_driver_tokio::provision::{nats_server_permissions, provision_space};
use futures::StreamExt;
use std::time::Duration;

fn space() -> Space {
    Space::new("main").expect("space")
}

/// Provisions the `main` space with a plain client.
async fn provision(server: &NatsServer) {
    let conn = connect(&server.config()).await.expect("connect");
    let report = provision_space(&conn.client, &space(), Duration::from_secs(5)).await;
    assert_eq!(report.failed(), 0, "{report:?}");
}

fn js_publish(
    op: cotal_core::op::OpId,
    subject: &str,
    msg_id: Option<&str>,
    body: &str,
) -> Command {
    Command::JsPublish {
        op,
        subject: subject.to_owned(),
        msg_id: msg_id.map(str::to_owned),
        headers: vec![("Cotal-Test".to_owned(), "1".to_owned())],
        payload: Bytes::from(body.to_owned()),
    }
}

fn pub_ack(outcome: Outcome<Reply>) -> PubAck {
    match ok(outcome) {
        Reply::PubAck(a) => a,
        other => panic!("expected a pub ack, got {other:?}"),
    }
}

fn stored(outcome: Outcome<Reply>) -> Vec<StoredMessage> {
    match ok(outcome) {
        Reply::Stored(m) => m,
        other => panic!("expected stored messages, got {other:?}"),
    }
}

fn revision(outcome: Outcome<Reply>) -> u64 {
    match ok(outcome) {
        Reply::KvWritten { revision } => revision,
        other => panic!("expected a KV write, got {other:?}"),
    }
}

/// Ten rounds of: subscribe granted, subscribe refused, barrier. The refusal (and only it) must
/// arrive before the barrier's completion.
async fn refusals_precede_barriers(d: &mut Driver) {
    for round in 0..10u64 {
        let (ok_sub, bad_sub) = (
            SubId::from_raw(round * 2 + 1),
            SubId::from_raw(round * 2 + 2),
        );
        let (op1, op2, op3) = (d.op(), d.op(), d.op());
        d.send(Command::Subscribe {
            op: op1,
            sub: ok_sub,
            subject: "cotal.main.chat.*.general".into(),
        });
        d.send(Command::Subscribe {
            op: op2,
            sub: bad_sub,
            subject: format!("cotal.main.chat.*.secret{round}"),
        });
        d.send(Command::Barrier { op: op3 });
        // Collect everything up to the barrier's completion.
        let mut before = Vec::new();
        loop {
            let i = d.next().await;
            let done = matches!(&i, Input::Completed(c) if c.op == op3);
            before.push(i);
            if done {
                break;
            }
        }
        let refused: Vec<SubId> = before
            .iter()
            .filter_map(|i| match i {
                Input::Inbound(Inbound::Refused { sub, detail }) => {
                    assert!(
                        detail.contains("Permissions Violation for Subscription"),
                        "{detail}"
                    );
                    Some(*sub)
                }
                _ => None,
            })
            .collect();
        assert_eq!(refused, vec![bad_sub], "round {round}: {before:?}");
        let last = before.last().expect("barrier completion");
        assert!(
            matches!(last, Input::Completed(c) if c.outcome == Outcome::Success(Reply::Done)),
            "{last:?}"
        );
        d.send(Command::Unsubscribe { sub: ok_sub });
    }
}

#[tokio::test]
async fn subscribe_refusal_arrives_before_the_barrier_completion() {
    // The agent profile from the core, rendered into the server config: it may subscribe to
    // `chat.*.general` but not `chat.*.secret`.
    let id = AgentId::new("alice").expect("id");
    let policy = AgentPolicy {
        id: id.clone(),
        allow_subscribe: vec![Channel::new("general").expect("channel")],
        allow_publish: vec![Channel::new("general").expect("channel")],
        role: None,
        spawn: false,
    };
    let perms = nats_server_permissions(&Permissions::agent(&space(), &policy));
    let Some(server) = NatsServer::start_with_users(vec![
        User {
            name: "alice".into(),
            password: "pw".into(),
            permissions: Some(perms),
        },
        User {
            name: "admin".into(),
            password: "adminpw".into(),
            permissions: None,
        },
    ]) else {
        return;
    };
    let mut cfg = server.config_as("alice", "pw");
    cfg.inbox_prefix = Some(id.inbox_prefix());
    let mut d = Driver::start(cfg.clone()).await;
    refusals_precede_barriers(&mut d).await;
    // Both barrier kinds: the round trip plus grace, and the exact sentinel barrier.
    let sentinel = ExecutorConfig {
        refusal_sentinel: Some("_cotal_barrier".into()),
        ..ExecutorConfig::default()
    };
    let mut exact = Driver::start_with(cfg.clone(), sentinel).await;
    refusals_precede_barriers(&mut exact).await;
    assert_eq!(exact.exec.stats().refusals, 10);
    // The sentinel's own refusals are not reported as refusals of a machine's subscription.
    assert!(exact.seen.is_empty(), "{:?}", exact.seen);
    // The granted subscription delivers.
    let sub = SubId::from_raw(100);
    assert_eq!(
        d.run(|op| Command::Subscribe {
            op,
            sub,
            subject: "cotal.main.chat.*.general".into(),
        })
        .await,
        Outcome::Success(Reply::Done)
    );
    let _ = d.run(|op| Command::Barrier { op }).await;
    let admin = connect(&server.config_as("admin", "adminpw"))
        .await
        .expect("admin");
    let report = provision_space(&admin.client, &space(), Duration::from_secs(5)).await;
    assert_eq!(report.failed(), 0, "{report:?}");
    admin
        .client
        .publish("cotal.main.chat.bob.general", "hi".into())
        .await
        .expect("publish");
    admin.client.flush().await.expect("flush");
    match d.inbound(WAIT).await {
        Some(Inbound::Message {
            sub: s,
            subject,
            payload,
            ..
        }) => {
            assert_eq!(s, sub);
            assert_eq!(subject, "cotal.main.chat.bob.general");
            assert_eq!(payload, Bytes::from("hi"));
        }
        other => panic!("expected the message, got {other:?}"),
    }
    assert_eq!(d.exec.stats().refusals, 10);
    // Publishes outside the grants fail at once as PermissionDenied (the broker's words), not
    // after a timeout: a JetStream publish, a request, and a KV read of a bucket it may not read.
    let started = tokio::time::Instant::now();
    let denied = d
        .run(|op| js_publish(op, "cotal.main.chat.alice.secret", Some("x"), "no"))
        .await;
    assert!(
        matches!(&denied, Outcome::Failed(Failure::PermissionDenied { detail })
            if detail.contains("Publish to \"cotal.main.chat.alice.secret\"")),
        "{denied:?}"
    );
    let denied = d
        .run(|op| Command::Request {
            op,
            subject: "cotal.main.ctl.manager.alice".into(),
            reply: "_INBOX_alice.r1".into(),
            payload: Bytes::new(),
            timeout: CoreDuration::from_secs(5),
        })
        .await;
    assert!(
        matches!(denied, Outcome::Failed(Failure::PermissionDenied { .. })),
        "{denied:?}"
    );
    let denied = d
        .run(|op| Command::KvGet {
            op,
            bucket: "cotal_members_main".into(),
            key: "k".into(),
        })
        .await;
    assert!(
        matches!(denied, Outcome::Failed(Failure::PermissionDenied { .. })),
        "{denied:?}"
    );
    // A stream read creates a consumer, which the agent may not do on DLV.
    let denied = d
        .run(|op| Command::ReadStream {
            op,
            stream: "DLV_main".into(),
            filter: "cotal.main.dlv.alice".into(),
            start: ReadStart::Seq(1),
            last_seq: None,
            max: 10,
            reader: None,
        })
        .await;
    assert!(
        matches!(denied, Outcome::Failed(Failure::PermissionDenied { .. })),
        "{denied:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // The agent may read CHAT history only through its pinned `chathist_<id>` reader (I29), and
    // page after page with the same name (the driver removes it before completing each read).
    for start in [1, 2] {
        let read = d
            .run(|op| Command::ReadStream {
                op,
                stream: "CHAT_main".into(),
                filter: "cotal.main.chat.*.general".into(),
                start: ReadStart::Seq(start),
                last_seq: None,
                max: 10,
                reader: Some(format!("chathist_{id}")),
            })
            .await;
        match read {
            Outcome::Success(Reply::Stored(v)) => {
                assert!(v.iter().all(|m| m.seq >= start), "{v:?}");
                if start == 1 {
                    assert_eq!(v.len(), 1, "{v:?}");
                }
            }
            other => panic!("pinned history read from {start}: {other:?}"),
        }
    }
    // Any other name is refused.
    let denied = d
        .run(|op| Command::ReadStream {
            op,
            stream: "CHAT_main".into(),
            filter: "cotal.main.chat.*.general".into(),
            start: ReadStart::Seq(1),
            last_seq: None,
            max: 10,
            reader: None,
        })
        .await;
    assert!(
        matches!(denied, Outcome::Failed(Failure::PermissionDenied { .. })),
        "{denied:?}"
    );
}

#[tokio::test]
async fn request_uses_the_machines_own_reply_subject_and_no_responders_is_typed() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let responder = connect(&server.config()).await.expect("connect");
    let mut svc = responder.client.subscribe("svc.echo").await.expect("sub");
    let client = responder.client.clone();
    tokio::spawn(async move {
        while let Some(m) = svc.next().await {
            if let Some(reply) = m.reply {
                let body = format!("{}|{}", reply, String::from_utf8_lossy(&m.payload));
                let _ = client.publish(reply, body.into()).await;
            }
        }
    });
    responder.client.flush().await.expect("flush");
    let mut d = Driver::start(server.config()).await;
    let out = d
        .run(|op| Command::Request {
            op,
            subject: "svc.echo".into(),
            reply: "cotal.main.ctl.delivery.alice.reply.abc123".into(),
            payload: Bytes::from("ping"),
            timeout: CoreDuration::from_millis(2000),
        })
        .await;
    match ok(out) {
        Reply::Response(r) => assert_eq!(
            r.payload,
            Bytes::from("cotal.main.ctl.delivery.alice.reply.abc123|ping")
        ),
        other => panic!("{other:?}"),
    }
    let out = d
        .run(|op| Command::Request {
            op,
            subject: "nobody.home".into(),
            reply: "my.reply.1".into(),
            payload: Bytes::new(),
            timeout: CoreDuration::from_millis(2000),
        })
        .await;
    assert_eq!(out, Outcome::Failed(Failure::NoResponders));
}

#[tokio::test]
async fn js_publish_dedups_by_msg_id_and_stream_info_reports_the_frontier() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    provision(&server).await;
    let mut d = Driver::start(server.config()).await;
    let empty = d
        .run(|op| Command::StreamInfo {
            op,
            stream: "CHAT_main".into(),
        })
        .await;
    assert_eq!(
        ok(empty),
        Reply::StreamState(StreamState {
            first_seq: 1,
            last_seq: 0,
            messages: 0,
            // The daemon's `fanout`; the cap `cotal up` sizes for 5,000 agents (issue 22).
            consumers: 1,
            max_consumers: 10_064,
            max_age_ms: 0,
        })
    );
    let subj = "cotal.main.chat.alice.general";
    let first = pub_ack(d.run(|op| js_publish(op, subj, Some("m-1"), "a")).await);
    assert_eq!(
        (first.stream.as_str(), first.seq, first.duplicate),
        ("CHAT_main", 1, false)
    );
    let again = pub_ack(d.run(|op| js_publish(op, subj, Some("m-1"), "a")).await);
    assert_eq!((again.seq, again.duplicate), (1, true));
    let second = pub_ack(d.run(|op| js_publish(op, subj, Some("m-2"), "b")).await);
    assert_eq!((second.seq, second.duplicate), (2, false));
    let info = d
        .run(|op| Command::StreamInfo {
            op,
            stream: "CHAT_main".into(),
        })
        .await;
    assert_eq!(
        ok(info),
        Reply::StreamState(StreamState {
            first_seq: 1,
            last_seq: 2,
            messages: 2,
            // The daemon's `fanout`; the cap `cotal up` sizes for 5,000 agents (issue 22).
            consumers: 1,
            max_consumers: 10_064,
            max_age_ms: 0,
        })
    );
    let missing = d
        .run(|op| Command::StreamInfo {
            op,
            stream: "NOPE".into(),
        })
        .await;
    assert_eq!(missing, Outcome::Failed(Failure::NotFound));
    let nowhere = d
        .run(|op| js_publish(op, "no.stream.here", None, "x"))
        .await;
    assert_eq!(nowhere, Outcome::Failed(Failure::NotFound));
    // Pipelined: many publishes in flight at once, all acked in order of sequence.
    let ops: Vec<_> = (0..50)
        .map(|i| {
            let op = d.op();
            d.send(js_publish(op, subj, Some(&format!("p-{i}")), "x"));
            op
        })
        .collect();
    let mut seqs = Vec::new();
    for op in ops {
        seqs.push(pub_ack(d.completion(op).await).seq);
    }
    assert_eq!(seqs, (3..53).collect::<Vec<_>>());
}

#[tokio::test]
async fn read_stream_honours_filter_start_bound_and_page_size() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    provision(&server).await;
    let mut d = Driver::start(server.config()).await;
    for i in 1..=6u64 {
        if i == 5 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let subj = if i % 2 == 1 {
            "cotal.main.chat.alice.general"
        } else {
            "cotal.main.chat.bob.other"
        };
        let ack = pub_ack(
            d.run(|op| js_publish(op, subj, None, &format!("m{i}")))
                .await,
        );
        assert_eq!(ack.seq, i);
    }
    let read = |filter: &str, start: ReadStart, last_seq: Option<u64>, max: u32| {
        let filter = filter.to_owned();
        move |op| Command::ReadStream {
            op,
            stream: "CHAT_main".into(),
            filter,
            start,
            last_seq,
            max,
            reader: None,
        }
    };
    let general = "cotal.main.chat.*.general";
    let seqs = |m: &[StoredMessage]| m.iter().map(|m| m.seq).collect::<Vec<_>>();
    let all = stored(d.run(read(general, ReadStart::Seq(1), None, 10)).await);
    assert_eq!(seqs(&all), [1, 3, 5]);
    assert_eq!(all[1].payload, Bytes::from("m3"));
    assert_eq!(all[1].subject, "cotal.main.chat.alice.general");
    assert!(
        all[1]
            .headers
            .contains(&("Cotal-Test".to_owned(), "1".to_owned()))
    );
    let bounded = stored(d.run(read(general, ReadStart::Seq(1), Some(3), 10)).await);
    assert_eq!(seqs(&bounded), [1, 3]);
    let page = stored(d.run(read(general, ReadStart::Seq(2), None, 1)).await);
    assert_eq!(seqs(&page), [3]);
    let everything = stored(
        d.run(read("cotal.main.chat.>", ReadStart::Seq(4), None, 10))
            .await,
    );
    assert_eq!(seqs(&everything), [4, 5, 6]);
    let none = stored(d.run(read(general, ReadStart::Seq(6), None, 10)).await);
    assert!(none.is_empty());
    // By time: from the stored time of seq 5 (seq 4 was stored ≥ 50 ms earlier).
    let from = everything[1].stored_at;
    let by_time = stored(
        d.run(read("cotal.main.chat.>", ReadStart::Time(from), None, 10))
            .await,
    );
    assert_eq!(seqs(&by_time), [5, 6]);
    let missing = d.run(read(general, ReadStart::Seq(1), None, 10)).await;
    assert!(missing.is_success());
    let no_stream = d
        .run(|op| Command::ReadStream {
            op,
            stream: "NOPE".into(),
            filter: "x".into(),
            start: ReadStart::Seq(1),
            last_seq: None,
            max: 5,
            reader: None,
        })
        .await;
    assert_eq!(no_stream, Outcome::Failed(Failure::NotFound));
}

/// `DeleteStreamMessage` under the delivery daemon's own credential: it reads a DLV subject
/// through the pinned sweep reader (page after page with the same name), deletes a copy
/// (`Done`), a second delete of it is `NotFound`, the re-read skips it; a read under any other
/// reader name and a delete on another stream are refused.
#[tokio::test]
async fn delete_stream_message_under_the_daemon_credential() {
    let daemon = AgentId::new("daemon").expect("id");
    let perms = nats_server_permissions(&Permissions::delivery(&space(), &daemon));
    let Some(server) = NatsServer::start_with_users(vec![
        User {
            name: "daemon".into(),
            password: "pw".into(),
            permissions: Some(perms),
        },
        User {
            name: "admin".into(),
            password: "adminpw".into(),
            permissions: None,
        },
    ]) else {
        return;
    };
    let admin = connect(&server.config_as("admin", "adminpw"))
        .await
        .expect("admin");
    let report = provision_space(&admin.client, &space(), Duration::from_secs(5)).await;
    assert_eq!(report.failed(), 0, "{report:?}");
    let mut cfg = server.config_as("daemon", "pw");
    cfg.inbox_prefix = Some(daemon.inbox_prefix());
    let mut d = Driver::start(cfg).await;
    for i in 1..=3u64 {
        let ack = pub_ack(
            d.run(|op| js_publish(op, "cotal.main.dlv.alice", Some(&format!("c{i}")), "m"))
                .await,
        );
        assert_eq!(ack.seq, i);
    }
    let read = |start: u64, reader: &str| {
        let reader = reader.to_owned();
        move |op| Command::ReadStream {
            op,
            stream: "DLV_main".into(),
            filter: "cotal.main.dlv.alice".into(),
            start: ReadStart::Seq(start),
            last_seq: None,
            max: 2,
            reader: Some(reader),
        }
    };
    let seqs = |m: Vec<StoredMessage>| m.into_iter().map(|m| m.seq).collect::<Vec<_>>();
    assert_eq!(seqs(stored(d.run(read(1, "dlvsweep")).await)), [1, 2]);
    assert_eq!(seqs(stored(d.run(read(3, "dlvsweep")).await)), [3]);
    let delete = |stream: &str, seq: u64| {
        let stream = stream.to_owned();
        move |op| Command::DeleteStreamMessage { op, stream, seq }
    };
    assert_eq!(
        d.run(delete("DLV_main", 2)).await,
        Outcome::Success(Reply::Done)
    );
    assert_eq!(
        d.run(delete("DLV_main", 2)).await,
        Outcome::Failed(Failure::NotFound)
    );
    assert_eq!(seqs(stored(d.run(read(1, "dlvsweep")).await)), [1, 3]);
    let denied = d.run(read(1, "dlv_alice")).await;
    assert!(
        matches!(denied, Outcome::Failed(Failure::PermissionDenied { .. })),
        "{denied:?}"
    );
    let denied = d.run(delete("CHAT_main", 1)).await;
    assert!(
        !denied.is_success() && denied != Outcome::Failed(Failure::NotFound),
        "{denied:?}"
    );
}

fn delivery(i: Option<Inbound>) -> (cotal_core::ledger::DeliveryId, u64, u64) {
    match i {
        Some(Inbound::Delivery {
            delivery,
            stream_seq,
            delivery_count,
            ..
        }) => (delivery, stream_seq, delivery_count),
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[tokio::test]
async fn consume_and_settle_ack_nak_with_delay_and_term() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    provision(&server).await;
    let mut d = Driver::start(server.config()).await;
    let owner = AgentId::new("alice").expect("id");
    // A short ack_wait, so an unsettled message *would* come back within the test.
    let spec = ConsumerSpec::dlv(&space(), &owner).with_ack_wait(CoreDuration::from_millis(1000));
    for i in 1..=3 {
        pub_ack(
            d.run(|op| js_publish(op, "cotal.main.dlv.alice", None, &format!("m{i}")))
                .await,
        );
    }
    let sub = SubId::from_raw(7);
    let bound = d
        .run(|op| Command::Consume {
            op,
            sub,
            consumer: spec.clone(),
            create: true,
            max_in_flight: 10,
        })
        .await;
    assert_eq!(
        bound,
        Outcome::Success(Reply::ConsumerBound {
            delivered_stream_seq: 0,
            ack_floor_stream_seq: 0,
            num_ack_pending: 0,
        }),
        "a fresh consumer has offered nothing yet"
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(delivery(d.inbound(WAIT).await));
    }
    let seqs: Vec<_> = got.iter().map(|g| (g.1, g.2)).collect();
    assert_eq!(seqs, [(1, 1), (2, 1), (3, 1)]);
    let nak_at = tokio::time::Instant::now();
    for (g, kind) in got.iter().zip([
        AckKind::Ack,
        AckKind::Nak {
            delay: CoreDuration::from_millis(700),
        },
        AckKind::Term,
    ]) {
        let settled = d
            .run(|op| Command::Settle {
                op,
                delivery: g.0,
                kind,
                confirm: true,
            })
            .await;
        assert_eq!(settled, Outcome::Success(Reply::Done), "{kind}");
    }
    let (again, seq, count) = delivery(d.inbound(WAIT).await);
    assert_eq!((seq, count), (2, 2));
    assert!(
        nak_at.elapsed() >= Duration::from_millis(600),
        "redelivered after {:?}, before the nak delay",
        nak_at.elapsed()
    );
    // A plain ack (unconfirmed): sent, and applied all the same.
    assert_eq!(
        d.run(|op| Command::Settle {
            op,
            delivery: again,
            kind: AckKind::Ack,
            confirm: false,
        })
        .await,
        Outcome::Success(Reply::Sent)
    );
    // Nothing else comes back within two ack_waits: acked and termed messages stay settled.
    assert_eq!(d.inbound(Duration::from_millis(2200)).await, None);
    // Settling twice is a typed failure, not a hidden error.
    assert_eq!(
        d.run(|op| Command::Settle {
            op,
            delivery: again,
            kind: AckKind::Ack,
            confirm: true,
        })
        .await,
        Outcome::Failed(Failure::NotFound)
    );
    // A rebind reports the consumer's delivery pointer: everything up to 3 was offered.
    let rebound = d
        .run(|op| Command::Consume {
            op,
            sub: SubId::from_raw(9),
            consumer: spec.clone(),
            create: false,
            max_in_flight: 1,
        })
        .await;
    assert_eq!(
        rebound,
        Outcome::Success(Reply::ConsumerBound {
            delivered_stream_seq: 3,
            ack_floor_stream_seq: 3,
            num_ack_pending: 0,
        })
    );
    // Binding (create: false) a consumer that does not exist.
    let missing = d
        .run(|op| Command::Consume {
            op,
            sub: SubId::from_raw(8),
            consumer: ConsumerSpec::dlv(&space(), &AgentId::new("nobody").expect("id")),
            create: false,
            max_in_flight: 1,
        })
        .await;
    assert_eq!(missing, Outcome::Failed(Failure::NotFound));
}

/// Deliveries a feed took and never settled stay pending on the consumer after the feed is
/// gone; the next bind says where they are (above the ack floor, up to the pointer), which is
/// what the daemon reads back instead of waiting out the `ack_wait`.
#[tokio::test]
async fn a_rebind_reports_what_a_gone_feed_left_unsettled() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    provision(&server).await;
    let mut d = Driver::start(server.config()).await;
    let owner = AgentId::new("carol").expect("id");
    for i in 1..=3 {
        pub_ack(
            d.run(|op| js_publish(op, "cotal.main.dlv.carol", None, &format!("m{i}")))
                .await,
        );
    }
    let spec = ConsumerSpec::dlv(&space(), &owner);
    let consume = |sub: u64, create: bool| {
        let spec = spec.clone();
        move |op| Command::Consume {
            op,
            sub: SubId::from_raw(sub),
            consumer: spec,
            create,
            max_in_flight: 2,
        }
    };
    assert!(matches!(
        d.run(consume(1, true)).await,
        Outcome::Success(Reply::ConsumerBound { .. })
    ));
    let (a, b) = (
        delivery(d.inbound(WAIT).await),
        delivery(d.inbound(WAIT).await),
    );
    assert_eq!((a.1, b.1), (1, 2));
    d.send(Command::StopConsume {
        sub: SubId::from_raw(1),
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        d.run(consume(2, false)).await,
        Outcome::Success(Reply::ConsumerBound {
            delivered_stream_seq: 2,
            ack_floor_stream_seq: 0,
            num_ack_pending: 2,
        }),
        "both deliveries of the gone feed are pending above the floor"
    );
    // The new feed gets the third message; the stranded two wait for the ack_wait (60 s).
    assert_eq!(delivery(d.inbound(WAIT).await).1, 3);
    assert_eq!(d.inbound(Duration::from_millis(500)).await, None);
}

#[tokio::test]
async fn consume_holds_at_most_max_in_flight_unsettled() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    provision(&server).await;
    let mut d = Driver::start(server.config()).await;
    let owner = AgentId::new("bob").expect("id");
    for i in 1..=4 {
        pub_ack(
            d.run(|op| js_publish(op, "cotal.main.dlv.bob", None, &format!("m{i}")))
                .await,
        );
    }
    let sub = SubId::from_raw(1);
    let bound = d
        .run(|op| Command::Consume {
            op,
            sub,
            consumer: ConsumerSpec::dlv(&space(), &owner),
            create: true,
            max_in_flight: 2,
        })
        .await;
    assert_eq!(
        bound,
        Outcome::Success(Reply::ConsumerBound {
            delivered_stream_seq: 0,
            ack_floor_stream_seq: 0,
            num_ack_pending: 0,
        }),
        "a fresh consumer has offered nothing yet"
    );
    let a = delivery(d.inbound(WAIT).await);
    let b = delivery(d.inbound(WAIT).await);
    assert_eq!((a.1, b.1), (1, 2));
    assert_eq!(
        d.inbound(Duration::from_millis(500)).await,
        None,
        "window of 2 exceeded"
    );
    let settled = d
        .run(|op| Command::Settle {
            op,
            delivery: a.0,
            kind: AckKind::Ack,
            confirm: true,
        })
        .await;
    assert_eq!(settled, Outcome::Success(Reply::Done));
    let c = delivery(d.inbound(WAIT).await);
    assert_eq!(c.1, 3);
    assert_eq!(d.inbound(Duration::from_millis(300)).await, None);
    // Settle b: one slot frees, so a pull is outstanding when the consumer goes away.
    let settled = d
        .run(|op| Command::Settle {
            op,
            delivery: b.0,
            kind: AckKind::Ack,
            confirm: true,
        })
        .await;
    assert_eq!(settled, Outcome::Success(Reply::Done));
    let d4 = delivery(d.inbound(WAIT).await);
    assert_eq!(d4.1, 4);
    let settled = d
        .run(|op| Command::Settle {
            op,
            delivery: c.0,
            kind: AckKind::Ack,
            confirm: true,
        })
        .await;
    assert_eq!(settled, Outcome::Success(Reply::Done));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The consumer is deleted under the feed: the feed ends and says so.
    let admin = connect(&server.config()).await.expect("connect");
    let spec = ConsumerSpec::dlv(&space(), &owner);
    cotal_driver_tokio::api::request(
        &admin.client,
        &spec.delete_subject(),
        Bytes::new(),
        Duration::from_secs(5),
    )
    .await
    .expect("delete consumer");
    match d.inbound(WAIT).await {
        Some(Inbound::ConsumerEnded { sub: s, detail }) => {
            assert_eq!(s, sub);
            assert!(!detail.is_empty());
        }
        other => panic!("expected the feed to end, got {other:?}"),
    }
    // Its deliveries can no longer be settled with the server, and the settle says so.
    let late = d
        .run(|op| Command::Settle {
            op,
            delivery: d4.0,
            kind: AckKind::Ack,
            confirm: true,
        })
        .await;
    assert_eq!(late, Outcome::Failed(Failure::NotFound));
    assert_eq!(d.exec.stats().consumers_ended, 1);
}

#[tokio::test]
async fn kv_create_update_delete_follow_their_conditions() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    provision(&server).await;
    let mut d = Driver::start(server.config()).await;
    let bucket = "cotal_channels_main";
    let put = |value: &str, condition: KvCondition| {
        let value = Bytes::from(value.to_owned());
        move |op| Command::KvPut {
            op,
            bucket: bucket.into(),
            key: "general".into(),
            value,
            condition,
        }
    };
    let del = |expected_revision: Option<u64>| {
        move |op| Command::KvDelete {
            op,
            bucket: bucket.into(),
            key: "general".into(),
            expected_revision,
        }
    };
    let get = |op| Command::KvGet {
        op,
        bucket: bucket.into(),
        key: "general".into(),
    };
    assert_eq!(ok(d.run(get).await), Reply::Kv(None));
    let r1 = revision(d.run(put("v1", KvCondition::CreateOnly)).await);
    assert_eq!(
        d.run(put("v1b", KvCondition::CreateOnly)).await,
        Outcome::Failed(Failure::AlreadyExists)
    );
    assert_eq!(
        d.run(put("stale", KvCondition::Revision(r1 + 100))).await,
        Outcome::Failed(Failure::WrongLastRevision { current: Some(r1) })
    );
    let r2 = revision(d.run(put("v2", KvCondition::Revision(r1))).await);
    assert!(r2 > r1);
    assert_eq!(
        ok(d.run(get).await),
        Reply::Kv(Some(KvEntry {
            key: "general".into(),
            revision: r2,
            operation: KvOperation::Put,
            value: Bytes::from("v2"),
        }))
    );
    assert_eq!(
        d.run(del(Some(r1))).await,
        Outcome::Failed(Failure::WrongLastRevision { current: Some(r2) })
    );
    let r3 = revision(d.run(del(Some(r2))).await);
    assert!(r3 > r2);
    assert_eq!(ok(d.run(get).await), Reply::Kv(None));
    // A delete marker counts as nothing: create over it succeeds.
    let r4 = revision(d.run(put("v4", KvCondition::CreateOnly)).await);
    assert!(r4 > r3);
    let r5 = revision(d.run(put("v5", KvCondition::Any)).await);
    assert!(r5 > r4);
    let missing_bucket = d
        .run(|op| Command::KvGet {
            op,
            bucket: "nope".into(),
            key: "k".into(),
        })
        .await;
    assert_eq!(missing_bucket, Outcome::Failed(Failure::NotFound));
}

#[tokio::test]
async fn kv_watch_delivers_initial_values_then_done_then_changes() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    provision(&server).await;
    let mut d = Driver::start(server.config()).await;
    let bucket = "cotal_presence_main";
    for (key, value) in [("a", "1"), ("b", "2"), ("a", "3")] {
        let value = Bytes::from(value);
        revision(
            d.run(|op| Command::KvPut {
                op,
                bucket: bucket.into(),
                key: key.into(),
                value,
                condition: KvCondition::Any,
            })
            .await,
        );
    }
    let sub = SubId::from_raw(3);
    let op = d.op();
    d.send(Command::KvWatch {
        op,
        sub,
        bucket: bucket.into(),
        filter: ">".into(),
    });
    let mut initial = Vec::new();
    loop {
        match d.next().await {
            Input::Completed(c) if c.op == op => {
                assert_eq!(c.outcome, Outcome::Success(Reply::Done));
                break;
            }
            Input::Inbound(Inbound::KvChange { sub: s, entry }) => {
                assert_eq!(s, sub);
                initial.push((entry.key, entry.value));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    initial.sort();
    assert_eq!(
        initial,
        [
            ("a".to_owned(), Bytes::from("3")),
            ("b".to_owned(), Bytes::from("2"))
        ]
    );
    let op_del = d.op();
    d.send(Command::KvDelete {
        op: op_del,
        bucket: bucket.into(),
        key: "b".into(),
        expected_revision: None,
    });
    let mut change = None;
    let mut deleted = None;
    for _ in 0..2 {
        match d.next().await {
            Input::Completed(c) if c.op == op_del => deleted = Some(revision(c.outcome)),
            Input::Inbound(Inbound::KvChange { entry, .. }) => change = Some(entry),
            other => panic!("unexpected {other:?}"),
        }
    }
    let change = change.expect("the change");
    assert_eq!(change.key, "b");
    assert_eq!(change.operation, KvOperation::Delete);
    assert_eq!(Some(change.revision), deleted);
    // A watch of keys that do not exist completes at once, with nothing before it.
    let empty = d
        .run(|op| Command::KvWatch {
            op,
            sub: SubId::from_raw(4),
            bucket: bucket.into(),
            filter: "nobody.*".into(),
        })
        .await;
    assert_eq!(empty, Outcome::Success(Reply::Done));
    d.send(Command::KvUnwatch { sub });
    assert!(
        !d.seen.iter().any(|i| matches!(i, Input::Inbound(_))),
        "{:?}",
        d.seen
    );
}

#[tokio::test]
async fn connection_loss_makes_in_flight_requests_unknown_and_reconnect_restores() {
    let Some(mut server) = NatsServer::start() else {
        return;
    };
    // A responder that never answers keeps the request in flight.
    let silent = connect(&server.config()).await.expect("connect");
    let _held = silent.client.subscribe("svc.silent").await.expect("sub");
    silent.client.flush().await.expect("flush");
    let mut d = Driver::start(server.config()).await;
    let sub = SubId::from_raw(9);
    assert!(
        d.run(|op| Command::Subscribe {
            op,
            sub,
            subject: "x.y".into()
        })
        .await
        .is_success()
    );
    let op = d.op();
    d.send(Command::Request {
        op,
        subject: "svc.silent".into(),
        reply: "my.reply.x".into(),
        payload: Bytes::new(),
        timeout: CoreDuration::from_secs(30),
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed_at = tokio::time::Instant::now();
    server.kill();
    let mut lost = false;
    let outcome = loop {
        match d.next().await {
            Input::Connection(Connection::Lost) => lost = true,
            Input::Completed(c) if c.op == op => break c.outcome,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(lost, "Lost must come before the in-flight outcomes");
    assert_eq!(outcome, Outcome::Unknown);
    assert!(killed_at.elapsed() < Duration::from_secs(5));
    // While down, a command is never sent and says so.
    let down = d.run(|op| Command::Barrier { op }).await;
    assert_eq!(
        down,
        Outcome::Failed(Failure::Other {
            description: "not connected".into()
        })
    );
    server.restart();
    assert_eq!(d.next().await, Input::Connection(Connection::Restored));
    // The old subscription is gone for good: a message on it is not delivered.
    assert!(d.run(|op| Command::Barrier { op }).await.is_success());
    let other = connect(&server.config()).await.expect("connect");
    other
        .client
        .publish("x.y", "late".into())
        .await
        .expect("pub");
    other.client.flush().await.expect("flush");
    assert_eq!(d.inbound(Duration::from_millis(500)).await, None);
    assert_eq!(d.exec.stats().disconnects, 1);
}

/// Found by `cotal chaos`: a delivery the machine still held when the connection dropped stayed
/// ack-pending on the restarted server until the consumer's 60 s `ack_wait`. The executor now naks
/// it at the reconnect, so it comes back within seconds.
#[tokio::test]
async fn deliveries_held_at_a_connection_loss_are_handed_back_at_the_reconnect() {
    let Some(mut server) = NatsServer::start() else {
        return;
    };
    provision(&server).await;
    let mut d = Driver::start(server.config()).await;
    let owner = AgentId::new("alice").expect("id");
    let spec = ConsumerSpec::dlv(&space(), &owner);
    pub_ack(
        d.run(|op| js_publish(op, "cotal.main.dlv.alice", None, "m1"))
            .await,
    );
    let consume = |op, sub| Command::Consume {
        op,
        sub,
        consumer: spec.clone(),
        create: true,
        max_in_flight: 10,
    };
    let bound = d.run(|op| consume(op, SubId::from_raw(11))).await;
    assert!(bound.is_success(), "{bound:?}");
    let (_, seq, count) = delivery(d.inbound(WAIT).await);
    assert_eq!((seq, count), (1, 1));
    // Held, never settled; the server goes down cleanly (it keeps the pending state) and back.
    server.stop();
    while d.next().await != Input::Connection(Connection::Lost) {}
    server.restart();
    while d.next().await != Input::Connection(Connection::Restored) {}
    let bound = d.run(|op| consume(op, SubId::from_raw(12))).await;
    assert!(bound.is_success(), "{bound:?}");
    // Well inside the 60 s ack_wait: the hand-back nak (1 s delay) made it redeliverable.
    let (_, seq, count) = delivery(d.inbound(Duration::from_secs(10)).await);
    assert_eq!((seq, count), (1, 2), "redelivered after the hand-back");
    assert_eq!(d.exec.stats().handed_back, 1);
}

/// A JetStream publish to a subject a silent core subscriber holds: the broker routes it there,
/// nobody answers, so its PubAck never arrives.
const SILENT: &str = "hold.silent";

#[tokio::test]
async fn a_pub_ack_that_never_arrives_is_unknown_after_the_publish_ack_timeout() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let silent = connect(&server.config()).await.expect("connect");
    let _held = silent.client.subscribe(SILENT).await.expect("sub");
    silent.client.flush().await.expect("flush");
    let exec_config = ExecutorConfig {
        publish_ack_timeout: Duration::from_millis(300),
        ..ExecutorConfig::default()
    };
    let mut d = Driver::start_with(server.config(), exec_config).await;
    let started = tokio::time::Instant::now();
    let outcome = d.run(|op| js_publish(op, SILENT, None, "x")).await;
    assert_eq!(outcome, Outcome::Unknown);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "the publish waited {waited:?} for a 300 ms PubAck timeout"
    );
    assert_eq!(d.exec.stats().publish_ack_timeouts, 1);
    assert_eq!(d.exec.stats().unknown_on_loss, 0);
}

/// The window holds at most `publish_window` PubAcks; the next publish waits for room. At a
/// connection loss the window's PubAcks can never arrive: the lane starts a fresh window, so the
/// first publish after the reconnect does not wait out their timeout.
#[tokio::test]
async fn the_publish_window_holds_its_size_and_is_renewed_at_a_connection_loss() {
    let Some(mut server) = NatsServer::start() else {
        return;
    };
    provision(&server).await;
    let silent = connect(&server.config()).await.expect("connect");
    let _held = silent.client.subscribe(SILENT).await.expect("sub");
    silent.client.flush().await.expect("flush");
    let exec_config = ExecutorConfig {
        publish_window: 2,
        publish_ack_timeout: Duration::from_secs(60),
        ..ExecutorConfig::default()
    };
    let mut d = Driver::start_with(server.config(), exec_config).await;
    let subj = "cotal.main.chat.alice.general";
    let held: Vec<_> = (0..2)
        .map(|i| {
            let op = d.op();
            d.send(js_publish(op, SILENT, None, &format!("held {i}")));
            op
        })
        .collect();
    let waiting = d.op();
    d.send(js_publish(waiting, subj, Some("w-1"), "waits for room"));
    // The window is full of PubAcks that never come: the third publish is not even sent.
    assert_eq!(d.recv(Duration::from_millis(500)).await, None);
    server.kill();
    let mut unknown = Vec::new();
    let mut lost = false;
    while unknown.len() < 3 {
        match d.next().await {
            Input::Connection(Connection::Lost) => lost = true,
            Input::Completed(c) => {
                assert_eq!(c.outcome, Outcome::Unknown, "{c:?}");
                unknown.push(c.op);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(lost);
    unknown.sort();
    let mut expected = held.clone();
    expected.push(waiting);
    assert_eq!(unknown, expected);
    server.restart();
    assert_eq!(d.next().await, Input::Connection(Connection::Restored));
    let after = tokio::time::Instant::now();
    let ack = pub_ack(d.run(|op| js_publish(op, subj, Some("w-2"), "after")).await);
    assert_eq!(ack.stream, "CHAT_main");
    assert!(
        after.elapsed() < Duration::from_secs(10),
        "the first publish after the reconnect waited {:?}: the old window still held it",
        after.elapsed()
    );
    assert_eq!(d.exec.stats().publish_ack_timeouts, 0);
}
