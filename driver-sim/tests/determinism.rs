//! Determinism: the same seed gives the same transcript, bit for bit, under every fault.

// Test helpers outside `#[test]` functions unwrap set-up results too.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use cotal_core::io::{AckKind, Command, Connection, Inbound, Input, KvCondition, Machine, SubIds};
use cotal_core::op::{OpIds, Outcome};
use cotal_core::time::{Duration, Instant, Now};
use cotal_core::wire::config::{
    AckPolicy, ConsumerSpec, DeliverPolicy, Durability, KvBucketSpec, RetentionPolicy, StorageType,
    StreamSpec,
};
use cotal_core::wire::permissions::Permissions;
use cotal_driver_sim::host::{Host, hosted};
use cotal_driver_sim::sched::{FaultConfig, SimConfig};
use std::collections::VecDeque;

/// A toy machine: subscribes, consumes a durable, watches a bucket, publishes, and counts.
struct Chatter {
    name: String,
    ops: OpIds,
    subs: SubIds,
    cmds: VecDeque<Command>,
    events: VecDeque<String>,
    next_publish: Option<Instant>,
    sent: u64,
    counter_rev: u64,
}

impl Chatter {
    fn new(name: &str) -> Self {
        Chatter {
            name: name.into(),
            ops: OpIds::new(),
            subs: SubIds::new(),
            cmds: VecDeque::new(),
            events: VecDeque::new(),
            next_publish: None,
            sent: 0,
            counter_rev: 0,
        }
    }

    fn connect(&mut self, now: Now) {
        let (op, sub) = (self.ops.next_id(), self.subs.next_id());
        self.cmds.push_back(Command::Subscribe {
            op,
            sub,
            subject: "chat.>".into(),
        });
        let (op, sub) = (self.ops.next_id(), self.subs.next_id());
        self.cmds.push_back(Command::Consume {
            op,
            sub,
            consumer: ConsumerSpec {
                stream: "CHAT".into(),
                name: format!("dur_{}", self.name),
                durability: Durability::Durable,
                filter_subject: "chat.>".into(),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Some(Duration::from_millis(500)),
                deliver_policy: Some(DeliverPolicy::All),
                max_ack_pending: Some(20),
                mem_storage: false,
                inactive_threshold: None,
            },
            create: true,
            max_in_flight: 8,
        });
        let (op, sub) = (self.ops.next_id(), self.subs.next_id());
        self.cmds.push_back(Command::KvWatch {
            op,
            sub,
            bucket: "state".into(),
            filter: ">".into(),
        });
        self.next_publish = Some(now.at + Duration::from_millis(10));
    }
}

impl Machine for Chatter {
    type Event = String;

    fn handle_input(&mut self, now: Now, input: Input) {
        match input {
            Input::Connection(Connection::Restored) => self.connect(now),
            Input::Connection(Connection::Lost) => self.next_publish = None,
            Input::Inbound(Inbound::Message { subject, .. }) => {
                self.events.push_back(format!("live {subject}"));
            }
            Input::Inbound(Inbound::Delivery {
                delivery,
                stream_seq,
                delivery_count,
                ..
            }) => {
                self.events
                    .push_back(format!("durable {stream_seq} x{delivery_count}"));
                let op = self.ops.next_id();
                let kind = if delivery_count == 1 && stream_seq % 3 == 0 {
                    AckKind::Nak {
                        delay: Duration::from_millis(100),
                    }
                } else {
                    AckKind::Ack
                };
                self.cmds.push_back(Command::Settle {
                    op,
                    delivery,
                    kind,
                    confirm: true,
                });
            }
            Input::Inbound(Inbound::KvChange { entry, .. }) => {
                if entry.key == "counter" {
                    self.counter_rev = self.counter_rev.max(entry.revision);
                }
                self.events
                    .push_back(format!("kv {} {}", entry.key, entry.revision));
            }
            Input::Completed(c) => {
                let kind = match c.outcome {
                    Outcome::Success(_) => "ok".to_owned(),
                    Outcome::Failed(f) => format!("failed {f}"),
                    Outcome::Unknown => "unknown".to_owned(),
                };
                self.events.push_back(format!("{} {kind}", c.op));
            }
            other => self.events.push_back(format!("other {other:?}")),
        }
    }

    fn handle_timeout(&mut self, now: Now) {
        if self.next_publish.is_some_and(|t| t <= now.at) {
            self.sent += 1;
            let n = self.sent;
            self.cmds.push_back(Command::JsPublish {
                op: self.ops.next_id(),
                subject: format!("chat.{}.{n}", self.name),
                msg_id: Some(format!("{}-{n}", self.name)),
                headers: Vec::new(),
                payload: Bytes::from(format!("{n}")),
            });
            self.cmds.push_back(Command::KvPut {
                op: self.ops.next_id(),
                bucket: "state".into(),
                key: "counter".into(),
                value: Bytes::from(format!("{}:{n}", self.name)),
                condition: KvCondition::Revision(self.counter_rev),
            });
            self.next_publish = (n < 40).then(|| now.at + Duration::from_millis(50));
        }
    }

    fn poll_command(&mut self) -> Option<Command> {
        self.cmds.pop_front()
    }

    fn poll_event(&mut self) -> Option<String> {
        self.events.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.next_publish
    }
}

struct Run {
    hash: u64,
    lines: u64,
    faults: usize,
    events: usize,
}

fn run(seed: u64) -> Run {
    let config =
        SimConfig::new(seed).with_faults(FaultConfig::chaos(), Instant::from_millis(5_000));
    let mut host = Host::new(config, true);
    host.broker_mut()
        .add_stream(StreamSpec {
            name: "CHAT".into(),
            subjects: vec!["chat.>".into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            max_msgs_per_subject: Some(5),
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
    host.broker_mut()
        .add_kv_bucket(&KvBucketSpec {
            bucket: "state".into(),
            history: 1,
            ttl: None,
            max_consumers: None,
        })
        .unwrap();
    for name in ["ann", "bob", "cy"] {
        host.add_machine(
            name,
            Permissions::default(),
            hosted(Chatter::new(name), |e| e),
        );
    }
    let stats = host.run_until(Instant::from_millis(10_000));
    assert!(!stats.exhausted, "seed {seed}: step budget exhausted");
    for probe in [
        "fault.core-drop",
        "fault.kv-conflict",
        "in.redelivery",
        "in.wrong-last-revision",
    ] {
        assert!(
            host.probes().contains_key(probe),
            "seed {seed}: probe {probe} never hit: {:?}",
            host.probes()
        );
    }
    let t = host.transcript();
    Run {
        hash: t.hash(),
        lines: t.len(),
        faults: t.lines().iter().filter(|l| l.contains(" fault ")).count(),
        events: host.events().len(),
    }
}

#[test]
fn the_same_seed_gives_the_same_transcript_hash() {
    let mut faults = 0;
    for seed in [1, 2, 3, 0xC07A1] {
        let a = run(seed);
        let b = run(seed);
        assert_eq!((a.hash, a.lines), (b.hash, b.lines), "seed {seed}");
        assert_ne!(a.hash, run(seed + 1000).hash, "seed {seed} vs another seed");
        assert!(
            a.events > 100,
            "seed {seed}: the workload ran ({} events)",
            a.events
        );
        faults += a.faults;
    }
    assert!(faults > 0, "the fault phase fired some faults");
}
