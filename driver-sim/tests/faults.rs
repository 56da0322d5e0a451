//! Each fault knob fires in the fault phase and never in the heal phase.

// Test helpers outside `#[test]` functions unwrap set-up results too.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use cotal_core::io::{Command, Completion, Inbound, Input, KvCondition, Reply, SubId};
use cotal_core::op::{Failure, OpId, Outcome};
use cotal_core::time::{Duration, Instant};
use cotal_core::wire::config::KvBucketSpec;
use cotal_core::wire::permissions::Permissions;
use cotal_driver_sim::host::{Host, hosted};
use cotal_driver_sim::sched::{FaultConfig, SimConfig};
use cotal_driver_sim::script::{Log, Script};

const HEAL: Instant = Instant::from_millis(1_000);

fn host(faults: FaultConfig) -> Host {
    let mut h = Host::new(SimConfig::new(5).with_faults(faults, HEAL), false);
    h.broker_mut()
        .add_kv_bucket(&KvBucketSpec {
            bucket: "b".into(),
            history: 1,
            ttl: None,
            max_consumers: None,
        })
        .unwrap();
    h
}

fn add(h: &mut Host, name: &str, script: Script) -> Log {
    let log = script.log();
    h.add_machine(name, Permissions::default(), hosted(script, |e| e));
    log
}

fn outcome(log: &Log, id: u64) -> Option<Outcome<Reply>> {
    log.borrow().iter().find_map(|(_, i)| match i {
        Input::Completed(Completion { op, outcome }) if op.get() == id => Some(outcome.clone()),
        _ => None,
    })
}

fn put(o: u64, key: &str, condition: KvCondition) -> Command {
    Command::KvPut {
        op: OpId::from_raw(o),
        bucket: "b".into(),
        key: key.into(),
        value: Bytes::from_static(b"v"),
        condition,
    }
}

#[test]
fn ambiguous_outcome_applies_the_effect_but_answers_unknown() {
    let mut h = host(FaultConfig {
        ambiguous_ppm: 1_000_000,
        ..FaultConfig::default()
    });
    let log = add(
        &mut h,
        "a",
        Script::new()
            .at(10, put(1, "x", KvCondition::CreateOnly))
            .at(2_000, put(2, "y", KvCondition::CreateOnly)),
    );
    h.run_until(Instant::from_millis(3_000));
    assert_eq!(outcome(&log, 1), Some(Outcome::Unknown));
    assert!(
        h.broker().kv_get("b", "x").unwrap().is_some(),
        "the effect happened"
    );
    assert!(
        matches!(outcome(&log, 2), Some(Outcome::Success(_))),
        "healed"
    );
}

#[test]
fn injected_kv_conflict_is_a_visible_rewrite_that_beats_the_cas() {
    let mut h = host(FaultConfig {
        kv_conflict_ppm: 1_000_000,
        ..FaultConfig::default()
    });
    h.broker_mut()
        .kv_put("b", "k", Bytes::from_static(b"v0"), KvCondition::Any)
        .unwrap();
    let log = add(
        &mut h,
        "a",
        Script::new()
            .at(10, put(1, "k", KvCondition::Revision(1)))
            .at(10, put(2, "fresh", KvCondition::CreateOnly))
            .at(2_000, put(3, "k", KvCondition::Revision(2))),
    );
    h.run_until(Instant::from_millis(3_000));
    assert_eq!(
        outcome(&log, 1),
        Some(Outcome::Failed(Failure::WrongLastRevision {
            current: Some(2)
        }))
    );
    assert!(
        matches!(outcome(&log, 2), Some(Outcome::Success(_))),
        "nothing to race on an absent key"
    );
    assert!(
        matches!(outcome(&log, 3), Some(Outcome::Success(_))),
        "healed"
    );
    let k = h.broker().kv_get("b", "k").unwrap().unwrap();
    assert_eq!(k.value, Bytes::from_static(b"v"));
}

fn live(log: &Log) -> usize {
    log.borrow()
        .iter()
        .filter(|(_, i)| matches!(i, Input::Inbound(Inbound::Message { .. })))
        .count()
}

#[test]
fn core_drops_only_in_the_fault_phase() {
    let mut h = host(FaultConfig {
        core_drop_ppm: 1_000_000,
        ..FaultConfig::default()
    });
    let rx = add(
        &mut h,
        "rx",
        Script::new().at(
            1,
            Command::Subscribe {
                op: OpId::from_raw(1),
                sub: SubId::from_raw(1),
                subject: "x.>".into(),
            },
        ),
    );
    let mut tx = Script::new();
    for t in [100, 200, 1_500, 1_600] {
        tx = tx.at(
            t,
            Command::Publish {
                subject: "x.y".into(),
                headers: Vec::new(),
                payload: Bytes::new(),
            },
        );
    }
    add(&mut h, "tx", tx);
    h.run_until(Instant::from_millis(3_000));
    assert_eq!(live(&rx), 2, "the two publishes after the heal arrive");
}

#[test]
fn connection_losses_happen_in_the_fault_phase_and_always_heal() {
    let mut h = host(FaultConfig {
        connection_loss_every: Some(Duration::from_millis(100)),
        restore_after: (Duration::from_millis(10), Duration::from_millis(50)),
        ..FaultConfig::default()
    });
    let log = add(&mut h, "a", Script::new());
    h.run_until(Instant::from_millis(5_000));
    let changes: Vec<(Instant, Input)> = log
        .borrow()
        .iter()
        .filter(|(_, i)| matches!(i, Input::Connection(_)))
        .cloned()
        .collect();
    assert!(changes.len() >= 5, "{} connection changes", changes.len());
    let (last_at, last) = changes.last().unwrap();
    assert_eq!(
        *last,
        Input::Connection(cotal_core::io::Connection::Restored)
    );
    assert!(
        *last_at < Instant::from_millis(1_100),
        "no loss after the heal"
    );
    assert!(h.net().is_connected(h.net().clients().next().unwrap()));
}

#[test]
fn a_slow_consumer_holds_deliveries_back() {
    use cotal_core::wire::config::{
        AckPolicy, ConsumerSpec, DeliverPolicy, Durability, RetentionPolicy, StorageType,
        StreamSpec,
    };
    let mut h = host(FaultConfig {
        slow_consumer_ppm: 1_000_000,
        slow_consumer_delay: (Duration::from_millis(400), Duration::from_millis(400)),
        ..FaultConfig::default()
    });
    h.broker_mut()
        .add_stream(StreamSpec {
            name: "S".into(),
            subjects: vec!["s.>".into()],
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
        })
        .unwrap();
    h.broker_mut()
        .publish(cotal_driver_sim::broker::Publish::new("s.a", Bytes::new()))
        .unwrap();
    let log = add(
        &mut h,
        "c",
        Script::new().at(
            10,
            Command::Consume {
                op: OpId::from_raw(1),
                sub: SubId::from_raw(1),
                consumer: ConsumerSpec {
                    stream: "S".into(),
                    name: "c".into(),
                    durability: Durability::Durable,
                    filter_subject: "s.>".into(),
                    ack_policy: AckPolicy::None,
                    ack_wait: None,
                    deliver_policy: Some(DeliverPolicy::All),
                    max_ack_pending: None,
                    mem_storage: true,
                    inactive_threshold: None,
                },
                create: true,
                max_in_flight: 1,
            },
        ),
    );
    h.run_until(Instant::from_millis(1_000));
    let at = log
        .borrow()
        .iter()
        .find(|(_, i)| matches!(i, Input::Inbound(Inbound::Delivery { .. })))
        .map(|(t, _)| *t)
        .unwrap();
    assert!(at >= Instant::from_millis(410), "held back until {at}");
}
