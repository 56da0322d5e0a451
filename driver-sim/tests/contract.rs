//! The driver contract of `cotal_core::io` holds under random commands and every fault:
//! every command with an op id is answered exactly once, nothing arrives on a feed between
//! `Lost` and `Restored`, and nothing arrives on a feed that was never opened.

// Test helpers outside `#[test]` functions unwrap set-up results too.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use cotal_core::io::{AckKind, Command, Connection, Input, KvCondition, ReadStart, SubId};
use cotal_core::op::OpId;
use cotal_core::time::{Duration, Instant};
use cotal_core::wire::config::{
    AckPolicy, ConsumerSpec, DeliverPolicy, Durability, KvBucketSpec, RetentionPolicy, StorageType,
    StreamSpec,
};
use cotal_core::wire::permissions::Permissions;
use cotal_driver_sim::host::{Host, hosted};
use cotal_driver_sim::sched::{FaultConfig, SimConfig};
use cotal_driver_sim::script::{Log, Script};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn command(kind: u8, n: u64, arg: u8) -> Command {
    let op = OpId::from_raw(n);
    let sub = SubId::from_raw(u64::from(arg % 4) + 1);
    let subject = ["s.a", "s.b", "t.x", "u.y"][usize::from(arg % 4)].to_owned();
    match kind % 12 {
        0 => Command::Subscribe {
            op,
            sub,
            subject: format!("{subject}.>"),
        },
        1 => Command::Unsubscribe { sub },
        2 => Command::Barrier { op },
        3 => Command::Publish {
            subject: format!("{subject}.z"),
            headers: Vec::new(),
            payload: Bytes::new(),
        },
        4 => Command::Request {
            op,
            subject: format!("{subject}.z"),
            reply: format!("r.{n}"),
            payload: Bytes::new(),
            timeout: Duration::from_millis(200),
        },
        5 => Command::JsPublish {
            op,
            subject: format!("s.{}", arg % 3),
            msg_id: Some(format!("m{}", arg % 5)),
            headers: Vec::new(),
            payload: Bytes::new(),
        },
        6 => Command::StreamInfo {
            op,
            stream: if arg.is_multiple_of(5) {
                "NOPE".into()
            } else {
                "S".into()
            },
        },
        7 => Command::ReadStream {
            op,
            stream: "S".into(),
            filter: "s.>".into(),
            start: ReadStart::Seq(1),
            last_seq: None,
            max: 3,
            reader: None,
        },
        8 => Command::Consume {
            op,
            sub: SubId::from_raw(10),
            consumer: ConsumerSpec {
                stream: "S".into(),
                name: "c".into(),
                durability: Durability::Durable,
                filter_subject: "s.>".into(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Some(Duration::from_millis(300)),
                deliver_policy: Some(DeliverPolicy::All),
                max_ack_pending: None,
                mem_storage: false,
                inactive_threshold: None,
            },
            create: true,
            max_in_flight: 3,
        },
        9 => Command::KvGet {
            op,
            bucket: "b".into(),
            key: format!("k{}", arg % 3),
        },
        10 => Command::KvPut {
            op,
            bucket: "b".into(),
            key: format!("k{}", arg % 3),
            value: Bytes::new(),
            condition: match arg % 3 {
                0 => KvCondition::Any,
                1 => KvCondition::CreateOnly,
                _ => KvCondition::Revision(u64::from(arg)),
            },
        },
        _ => Command::KvWatch {
            op,
            sub: SubId::from_raw(20 + u64::from(arg % 2)),
            bucket: "b".into(),
            filter: ">".into(),
        },
    }
}

fn setup(host: &mut Host) {
    host.broker_mut()
        .add_stream(StreamSpec {
            name: "S".into(),
            subjects: vec!["s.>".into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::Memory,
            max_msgs_per_subject: Some(3),
            max_bytes: None,
            max_msg_size: None,
            discard: None,
            duplicate_window: Some(Duration::from_millis(500)),
            max_age: None,
            allow_direct: None,
            allow_rollup_hdrs: None,
            consumer_inactive_limit: None,
            num_replicas: None,
            max_consumers: None,
        })
        .unwrap();
    host.broker_mut()
        .add_kv_bucket(&KvBucketSpec {
            bucket: "b".into(),
            history: 1,
            ttl: None,
            max_consumers: None,
        })
        .unwrap();
}

fn check(log: &Log, planned: &BTreeSet<u64>, who: &str) -> Result<(), TestCaseError> {
    let mut answers: BTreeMap<u64, u32> = BTreeMap::new();
    let mut connected = false;
    for (t, input) in log.borrow().iter() {
        match input {
            Input::Completed(c) => *answers.entry(c.op.get()).or_insert(0) += 1,
            Input::Connection(Connection::Lost) => connected = false,
            Input::Connection(Connection::Restored) => connected = true,
            Input::Inbound(i) => {
                prop_assert!(connected, "{who}: {i:?} at {t} while disconnected");
                let s = i.sub().get();
                prop_assert!(
                    (1..=4).contains(&s) || s == 10 || s == 20 || s == 21,
                    "{who}: unknown feed {s}"
                );
            }
            _ => {}
        }
    }
    for op in planned {
        let n = answers.get(op).copied().unwrap_or(0);
        prop_assert_eq!(n, 1, "{}: op {} answered {} times", who, op, n);
    }
    for op in answers.keys() {
        prop_assert!(
            planned.contains(op) || *op >= 1_000_000,
            "{who}: answer to an unknown op {op}"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_op_is_answered_exactly_once_under_faults(
        seed in any::<u64>(),
        plans in proptest::collection::vec(
            proptest::collection::vec((0u64..3_000, 0u8..12, any::<u8>()), 1..40),
            2..4,
        ),
    ) {
        let faults = FaultConfig {
            connection_loss_every: Some(Duration::from_millis(700)),
            ambiguous_ppm: 50_000,
            ..FaultConfig::chaos()
        };
        let mut host = Host::new(SimConfig::new(seed).with_faults(faults, Instant::from_millis(3_000)), false);
        setup(&mut host);
        let mut logs = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            let mut plan = plan.clone();
            plan.sort_by_key(|p| p.0);
            let mut script = Script::new().settling(AckKind::Ack);
            if i == 0 {
                script = script.responder();
            }
            let mut planned = BTreeSet::new();
            for (n, (at, kind, arg)) in plan.into_iter().enumerate() {
                let cmd = command(kind, n as u64 + 1, arg);
                if let Some(op) = cmd.op() {
                    planned.insert(op.get());
                }
                script = script.at(at, cmd);
            }
            let log = script.log();
            host.add_machine(format!("m{i}"), Permissions::default(), hosted(script, |e| e));
            logs.push((log, planned));
        }
        let stats = host.run_until(Instant::from_millis(20_000));
        prop_assert!(!stats.exhausted);
        for (i, (log, planned)) in logs.iter().enumerate() {
            check(log, planned, &format!("m{i}"))?;
        }
    }
}
