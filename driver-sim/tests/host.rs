//! The connection layer and the host, driven by scripted machines.

// Test helpers outside `#[test]` functions unwrap set-up results too.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use cotal_core::io::{
    AckKind, Command, Completion, Connection, Inbound, Input, KvCondition, KvOperation, Reply,
    SubId,
};
use cotal_core::ledger::DeliveryId;
use cotal_core::op::{Failure, OpId, Outcome};
use cotal_core::time::{Duration, Instant};
use cotal_core::wire::config::{
    AckPolicy, ConsumerSpec, DeliverPolicy, Durability, KvBucketSpec, RetentionPolicy, StorageType,
    StreamSpec,
};
use cotal_core::wire::permissions::Permissions;
use cotal_driver_sim::host::{Host, hosted};
use cotal_driver_sim::sched::SimConfig;
use cotal_driver_sim::script::{Log, Script};

fn op(n: u64) -> OpId {
    OpId::from_raw(n)
}

fn sub(n: u64) -> SubId {
    SubId::from_raw(n)
}

fn add(host: &mut Host, name: &str, perms: Permissions, script: Script) -> Log {
    let log = script.log();
    host.add_machine(name, perms, hosted(script, |e| e));
    log
}

fn completion(log: &Log, id: OpId) -> Option<(usize, Instant, Outcome<Reply>)> {
    log.borrow()
        .iter()
        .enumerate()
        .find_map(|(i, (t, input))| match input {
            Input::Completed(Completion { op, outcome }) if *op == id => {
                Some((i, *t, outcome.clone()))
            }
            _ => None,
        })
}

fn position(log: &Log, pred: impl Fn(&Input) -> bool) -> Option<usize> {
    log.borrow().iter().position(|(_, i)| pred(i))
}

fn subscribe(o: u64, s: u64, subject: &str) -> Command {
    Command::Subscribe {
        op: op(o),
        sub: sub(s),
        subject: subject.into(),
    }
}

fn publish(subject: &str, body: &'static str) -> Command {
    Command::Publish {
        subject: subject.into(),
        headers: Vec::new(),
        payload: Bytes::from_static(body.as_bytes()),
    }
}

fn request(o: u64, subject: &str, reply: &str, timeout_ms: u64) -> Command {
    Command::Request {
        op: op(o),
        subject: subject.into(),
        reply: reply.into(),
        payload: Bytes::from_static(b"hi"),
        timeout: Duration::from_millis(timeout_ms),
    }
}

fn limited() -> Permissions {
    let mut p = Permissions::default();
    p.subscribe_allow.insert("ok.>".into());
    p.subscribe_allow.insert("my.>".into());
    p.publish_allow.insert("ok.>".into());
    p.publish_allow.insert("svc.>".into());
    p
}

fn messages(log: &Log) -> Vec<String> {
    log.borrow()
        .iter()
        .filter_map(|(_, i)| match i {
            Input::Inbound(Inbound::Message { subject, .. }) => Some(subject.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn refusal_arrives_before_a_later_barrier_on_every_seed() {
    for seed in 0..200 {
        let mut host = Host::new(SimConfig::new(seed), false);
        let log = add(
            &mut host,
            "agent",
            limited(),
            Script::new()
                .at(1, subscribe(1, 1, "secret.x"))
                .at(1, subscribe(2, 2, "ok.a"))
                .at(1, Command::Barrier { op: op(3) }),
        );
        host.run_until(Instant::from_millis(1_000));
        let refused = position(&log, |i| {
            matches!(i, Input::Inbound(Inbound::Refused { sub: s, detail })
                if *s == sub(1) && detail == "Permissions Violation for Subscription to \"secret.x\"")
        })
        .unwrap_or_else(|| panic!("seed {seed}: no refusal"));
        let (barrier, _, outcome) = completion(&log, op(3)).expect("barrier completes");
        assert_eq!(outcome, Outcome::Success(Reply::Done));
        assert!(refused < barrier, "seed {seed}: refusal after the barrier");
        let (done, _, _) = completion(&log, op(1)).expect("subscribe completes locally");
        assert!(
            done < refused,
            "seed {seed}: the SUB's own Done comes first"
        );
        assert!(
            position(
                &log,
                |i| matches!(i, Input::Inbound(Inbound::Refused { sub: s, .. }) if *s == sub(2))
            )
            .is_none()
        );
    }
}

#[test]
fn request_without_responders_fails_with_no_responders() {
    let mut host = Host::new(SimConfig::new(1), false);
    let log = add(
        &mut host,
        "a",
        Permissions::default(),
        Script::new().at(5, request(1, "svc.none", "my.reply.1", 1_000)),
    );
    host.run_until(Instant::from_millis(100));
    let (_, t, outcome) = completion(&log, op(1)).expect("answered");
    assert_eq!(outcome, Outcome::Failed(Failure::NoResponders));
    assert!(
        t < Instant::from_millis(100),
        "answered at once, not at the timeout"
    );
}

#[test]
fn request_reply_uses_the_explicit_reply_subject() {
    let mut host = Host::new(SimConfig::new(2), false);
    let server = add(
        &mut host,
        "daemon",
        Permissions::default(),
        Script::new().at(1, subscribe(1, 1, "svc.x")).responder(),
    );
    let client = add(
        &mut host,
        "agent",
        limited(),
        Script::new().at(50, request(1, "svc.x", "my.reply.abc", 1_000)),
    );
    host.run_until(Instant::from_millis(500));
    let (_, _, outcome) = completion(&client, op(1)).expect("answered");
    match outcome {
        Outcome::Success(Reply::Response(r)) => assert_eq!(r.payload, Bytes::from_static(b"re:hi")),
        other => panic!("{other:?}"),
    }
    assert!(server.borrow().iter().any(|(_, i)| matches!(i,
        Input::Inbound(Inbound::Message { reply: Some(r), .. }) if r == "my.reply.abc")));
}

#[test]
fn an_unanswered_request_times_out_unknown() {
    let mut host = Host::new(SimConfig::new(3), false);
    add(
        &mut host,
        "mute",
        Permissions::default(),
        Script::new().at(1, subscribe(1, 1, "svc.x")),
    );
    let client = add(
        &mut host,
        "agent",
        Permissions::default(),
        Script::new().at(50, request(1, "svc.x", "my.reply.1", 300)),
    );
    host.run_until(Instant::from_millis(2_000));
    let (_, t, outcome) = completion(&client, op(1)).expect("answered");
    assert_eq!(outcome, Outcome::Unknown);
    assert!(t >= Instant::from_millis(350), "{t}");
}

#[test]
fn a_requester_that_may_not_subscribe_its_reply_subject_never_sees_the_answer() {
    let mut host = Host::new(SimConfig::new(4), false);
    add(
        &mut host,
        "daemon",
        Permissions::default(),
        Script::new().at(1, subscribe(1, 1, "svc.x")).responder(),
    );
    let client = add(
        &mut host,
        "agent",
        limited(),
        Script::new().at(50, request(1, "svc.x", "elsewhere.reply", 300)),
    );
    host.run_until(Instant::from_millis(1_000));
    assert_eq!(
        completion(&client, op(1)).map(|c| c.2),
        Some(Outcome::Unknown)
    );
}

#[test]
fn forbidden_publishes_vanish_and_forbidden_js_calls_are_denied() {
    let mut host = Host::new(SimConfig::new(5), false);
    let watcher = add(
        &mut host,
        "watcher",
        Permissions::default(),
        Script::new().at(1, subscribe(1, 1, ">")),
    );
    host.broker_mut()
        .add_stream(stream("S", "secret.>"))
        .unwrap();
    let agent = add(
        &mut host,
        "agent",
        limited(),
        Script::new()
            .at(20, publish("secret.x", "no"))
            .at(20, publish("ok.x", "yes"))
            .at(
                20,
                Command::JsPublish {
                    op: op(1),
                    subject: "secret.y".into(),
                    msg_id: None,
                    headers: Vec::new(),
                    payload: Bytes::new(),
                },
            )
            .at(20, request(2, "secret.svc", "my.r", 100))
            .at(
                20,
                Command::StreamInfo {
                    op: op(3),
                    stream: "S".into(),
                },
            ),
    );
    host.run_until(Instant::from_millis(500));
    assert_eq!(messages(&watcher), vec!["ok.x".to_owned()]);
    for o in [1, 2, 3] {
        let outcome = completion(&agent, op(o)).map(|c| c.2);
        assert!(
            matches!(
                outcome,
                Some(Outcome::Failed(Failure::PermissionDenied { .. }))
            ),
            "op {o}: {outcome:?}"
        );
    }
    assert_eq!(host.broker().stream_state("S").unwrap().last_seq, 0);
}

fn stream(name: &str, subject: &str) -> StreamSpec {
    StreamSpec {
        name: name.into(),
        subjects: vec![subject.into()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::Memory,
        max_msgs_per_subject: None,
        max_bytes: None,
        max_msg_size: None,
        discard: None,
        duplicate_window: None,
        max_age: None,
        allow_direct: None,
        allow_rollup_hdrs: None,
        consumer_inactive_limit: None,
        num_replicas: None,
        max_consumers: None,
    }
}

fn consumer(stream: &str, name: &str, filter: &str) -> ConsumerSpec {
    ConsumerSpec {
        stream: stream.into(),
        name: name.into(),
        durability: Durability::Durable,
        filter_subject: filter.into(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Some(Duration::from_millis(1_000)),
        deliver_policy: Some(DeliverPolicy::All),
        max_ack_pending: None,
        mem_storage: false,
        inactive_threshold: None,
    }
}

fn kv_put(o: u64, key: &str, condition: KvCondition) -> Command {
    Command::KvPut {
        op: op(o),
        bucket: "b".into(),
        key: key.into(),
        value: Bytes::from_static(b"v"),
        condition,
    }
}

#[test]
fn connection_loss_answers_in_flight_commands_unknown_and_drops_feeds() {
    let mut reached = [0u32; 2];
    for seed in 0..40 {
        let mut host = Host::new(SimConfig::new(seed), false);
        host.broker_mut()
            .add_kv_bucket(&KvBucketSpec {
                bucket: "b".into(),
                history: 1,
                ttl: None,
                max_consumers: None,
            })
            .unwrap();
        let a_script = Script::new()
            .at(1, subscribe(1, 1, "chat.>"))
            .at(100, kv_put(2, "k", KvCondition::CreateOnly));
        let a = add(&mut host, "a", Permissions::default(), a_script);
        let b = add(
            &mut host,
            "b",
            Permissions::default(),
            Script::new()
                .at(1, subscribe(1, 1, "chat.>"))
                .at(2_000, publish("chat.x", "after")),
        );
        host.run_until(Instant::from_millis(100));
        // op 2 is on its way to the server (latency >= 1 ms).
        let client_a = host.net().clients().next().unwrap();
        host.lose(client_a);
        host.run_until(Instant::from_millis(3_000));
        let lost = position(&a, |i| matches!(i, Input::Connection(Connection::Lost))).unwrap();
        let (unknown, _, outcome) = completion(&a, op(2)).expect("answered");
        assert_eq!(outcome, Outcome::Unknown, "seed {seed}");
        assert!(lost < unknown);
        let restored =
            position(&a, |i| matches!(i, Input::Connection(Connection::Restored))).unwrap();
        assert!(restored == 0, "first Restored is the initial connect");
        assert_eq!(
            a.borrow()
                .iter()
                .filter(|(_, i)| matches!(i, Input::Connection(Connection::Restored)))
                .count(),
            2,
            "reconnected"
        );
        assert!(
            messages(&a).is_empty(),
            "the subscription died with the connection"
        );
        assert_eq!(
            messages(&b),
            vec!["chat.x".to_owned()],
            "the publish went out"
        );
        let present = host.broker().kv_get("b", "k").unwrap().is_some();
        reached[usize::from(present)] += 1;
    }
    assert!(
        reached[0] > 0 && reached[1] > 0,
        "both outcomes happen: {reached:?}"
    );
}

#[test]
fn commands_while_disconnected_fail_as_never_sent() {
    let mut host = Host::new(SimConfig::new(9), false);
    let a = add(
        &mut host,
        "a",
        Permissions::default(),
        Script::new().at(20, Command::Barrier { op: op(1) }),
    );
    host.run_until(Instant::from_millis(10));
    let c = host.net().clients().next().unwrap();
    host.lose(c);
    host.run_until(Instant::from_millis(30));
    assert!(matches!(
        completion(&a, op(1)).map(|c| c.2),
        Some(Outcome::Failed(Failure::Other { .. }))
    ));
}

fn deliveries(log: &Log) -> Vec<(u64, u64)> {
    log.borrow()
        .iter()
        .filter_map(|(_, i)| match i {
            Input::Inbound(Inbound::Delivery {
                stream_seq,
                delivery_count,
                ..
            }) => Some((*stream_seq, *delivery_count)),
            _ => None,
        })
        .collect()
}

fn consume(o: u64, s: u64, spec: ConsumerSpec, create: bool) -> Command {
    Command::Consume {
        op: op(o),
        sub: sub(s),
        consumer: spec,
        create,
        max_in_flight: 10,
    }
}

#[test]
fn durable_feed_redelivers_after_ack_wait_until_settled() {
    let mut host = Host::new(SimConfig::new(11), false);
    host.broker_mut().add_stream(stream("D", "d.>")).unwrap();
    let lazy = add(
        &mut host,
        "lazy",
        Permissions::default(),
        Script::new().at(1, consume(1, 1, consumer("D", "lazy", "d.>"), true)),
    );
    let diligent = add(
        &mut host,
        "diligent",
        Permissions::default(),
        Script::new()
            .at(1, consume(1, 1, consumer("D", "diligent", "d.>"), true))
            .settling(AckKind::Ack),
    );
    add(
        &mut host,
        "producer",
        Permissions::default(),
        Script::new().at(
            50,
            Command::JsPublish {
                op: op(1),
                subject: "d.x".into(),
                msg_id: Some("m1".into()),
                headers: Vec::new(),
                payload: Bytes::new(),
            },
        ),
    );
    host.run_until(Instant::from_millis(2_600));
    assert_eq!(deliveries(&lazy), vec![(1, 1), (1, 2), (1, 3)]);
    assert_eq!(deliveries(&diligent), vec![(1, 1)]);
    // A bind to a consumer that does not exist fails; an unknown delivery cannot be settled.
    let mut host = Host::new(SimConfig::new(12), false);
    host.broker_mut().add_stream(stream("D", "d.>")).unwrap();
    let a = add(
        &mut host,
        "a",
        Permissions::default(),
        Script::new()
            .at(1, consume(1, 1, consumer("D", "nope", "d.>"), false))
            .at(
                1,
                Command::Settle {
                    op: op(2),
                    delivery: DeliveryId(77),
                    kind: AckKind::Ack,
                    confirm: true,
                },
            ),
    );
    host.run_until(Instant::from_millis(100));
    assert_eq!(
        completion(&a, op(1)).map(|c| c.2),
        Some(Outcome::Failed(Failure::NotFound))
    );
    assert_eq!(
        completion(&a, op(2)).map(|c| c.2),
        Some(Outcome::Failed(Failure::NotFound))
    );
}

#[test]
fn kv_watch_delivers_current_values_then_done_then_changes() {
    let mut host = Host::new(SimConfig::new(13), false);
    host.broker_mut()
        .add_kv_bucket(&KvBucketSpec {
            bucket: "b".into(),
            history: 1,
            ttl: None,
            max_consumers: None,
        })
        .unwrap();
    let writer = add(
        &mut host,
        "writer",
        Permissions::default(),
        Script::new()
            .at(1, kv_put(1, "x", KvCondition::Any))
            .at(1, kv_put(2, "y", KvCondition::Any))
            .at(
                1,
                Command::KvDelete {
                    op: op(3),
                    bucket: "b".into(),
                    key: "y".into(),
                    expected_revision: None,
                },
            )
            .at(200, kv_put(4, "z", KvCondition::Revision(0)))
            .at(200, kv_put(5, "x", KvCondition::Revision(1))),
    );
    let watcher = add(
        &mut host,
        "watcher",
        Permissions::default(),
        Script::new().at(
            100,
            Command::KvWatch {
                op: op(1),
                sub: sub(1),
                bucket: "b".into(),
                filter: ">".into(),
            },
        ),
    );
    host.run_until(Instant::from_millis(500));
    assert_eq!(
        completion(&writer, op(5)).map(|c| c.2),
        Some(Outcome::Success(Reply::KvWritten { revision: 5 }))
    );
    let changes: Vec<(String, u64, KvOperation)> = watcher
        .borrow()
        .iter()
        .filter_map(|(_, i)| match i {
            Input::Inbound(Inbound::KvChange { entry, .. }) => {
                Some((entry.key.clone(), entry.revision, entry.operation))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        vec![
            ("x".into(), 1, KvOperation::Put),
            ("y".into(), 3, KvOperation::Delete),
            ("z".into(), 4, KvOperation::Put),
            ("x".into(), 5, KvOperation::Put),
        ]
    );
    let (done, _, _) = completion(&watcher, op(1)).unwrap();
    let first_live = position(
        &watcher,
        |i| matches!(i, Input::Inbound(Inbound::KvChange { entry, .. }) if entry.key == "z"),
    )
    .unwrap();
    let last_initial = position(
        &watcher,
        |i| matches!(i, Input::Inbound(Inbound::KvChange { entry, .. }) if entry.key == "y"),
    )
    .unwrap();
    assert!(last_initial < done && done < first_live);
}

#[test]
fn an_idle_ephemeral_consumer_is_removed_and_a_deleted_consumer_ends_its_feeds() {
    let mut host = Host::new(SimConfig::new(14), false);
    host.broker_mut().add_stream(stream("D", "d.>")).unwrap();
    let ephemeral = ConsumerSpec {
        durability: Durability::Ephemeral,
        ack_policy: AckPolicy::None,
        inactive_threshold: Some(Duration::from_millis(30_000)),
        ..consumer("D", "hist", "d.>")
    };
    add(
        &mut host,
        "reader",
        Permissions::default(),
        Script::new()
            .at(1, consume(1, 1, ephemeral, true))
            .at(100, Command::StopConsume { sub: sub(1) }),
    );
    let durable = add(
        &mut host,
        "durable",
        Permissions::default(),
        Script::new().at(1, consume(1, 1, consumer("D", "dur", "d.>"), true)),
    );
    host.run_until(Instant::from_millis(30_000));
    assert!(host.broker().consumer_spec("D", "hist").is_some());
    host.run_until(Instant::from_millis(30_200));
    assert!(
        host.broker().consumer_spec("D", "hist").is_none(),
        "inactive for 30 s"
    );
    assert!(
        host.broker().consumer_spec("D", "dur").is_some(),
        "durables stay"
    );
    assert!(host.delete_consumer("D", "dur"));
    host.run_until(Instant::from_millis(31_000));
    assert!(durable.borrow().iter().any(|(_, i)| matches!(i,
        Input::Inbound(Inbound::ConsumerEnded { sub: s, .. }) if *s == sub(1))));
}

/// A frozen machine gets nothing while it sleeps (no inputs, no timeouts); what reached it is
/// held and handed over in order at the thaw, and its overdue timers fire then.
#[test]
fn a_frozen_machine_gets_its_held_inputs_in_order_at_the_thaw() {
    let mut host = Host::new(SimConfig::new(11), true);
    let watcher = Script::new()
        .at(5, subscribe(1, 1, "x"))
        .at(300, publish("y", "late"));
    let wlog = watcher.log();
    let wclient = host.add_machine("watcher", Permissions::default(), hosted(watcher, |e| e));
    let ylog = add(
        &mut host,
        "y-reader",
        Permissions::default(),
        Script::new().at(1, subscribe(1, 1, "y")),
    );
    add(
        &mut host,
        "talker",
        Permissions::default(),
        Script::new()
            .at(100, publish("x", "one"))
            .at(200, publish("x", "two")),
    );
    host.run_until(Instant::from_millis(50));
    let before = wlog.borrow().len();
    host.freeze(wclient, Duration::from_millis(500));
    assert!(host.is_frozen(wclient));
    host.run_until(Instant::from_millis(540));
    assert_eq!(
        wlog.borrow().len(),
        before,
        "nothing reaches a frozen machine"
    );
    assert!(
        ylog.borrow()
            .iter()
            .all(|(_, i)| !matches!(i, Input::Inbound(Inbound::Message { .. }))),
        "its timer did not fire while frozen"
    );
    host.run_until(Instant::from_millis(1_000));
    assert!(!host.is_frozen(wclient));
    let bodies: Vec<(Instant, Bytes)> = wlog.borrow()[before..]
        .iter()
        .filter_map(|(t, i)| match i {
            Input::Inbound(Inbound::Message { payload, .. }) => Some((*t, payload.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        bodies.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(),
        [Bytes::from_static(b"one"), Bytes::from_static(b"two")]
    );
    assert!(bodies.iter().all(|(t, _)| *t >= Instant::from_millis(550)));
    let late = ylog
        .borrow()
        .iter()
        .find_map(|(t, i)| matches!(i, Input::Inbound(Inbound::Message { .. })).then_some(*t));
    assert!(
        late.is_some_and(|t| t >= Instant::from_millis(550)),
        "the overdue timer fired after the thaw: {late:?}"
    );
}
