//! Stream, consumer and KV invariants under random operation sequences.

// Test helpers outside `#[test]` functions unwrap set-up results too.
#![allow(clippy::unwrap_used)]

use bytes::Bytes;
use cotal_core::acl::subject_matches;
use cotal_core::io::{AckKind, KvCondition, KvOperation};
use cotal_core::op::Failure;
use cotal_core::time::{Duration, Instant, Now, UnixMillis};
use cotal_core::wire::config::{
    AckPolicy, ConsumerSpec, DeliverPolicy, Durability, KvBucketSpec, RetentionPolicy, StorageType,
    StreamSpec,
};
use cotal_driver_sim::broker::{Broker, ConsumerLimits, Publish};
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const SUBJECTS: [&str; 3] = ["p.a.x", "p.a.y", "p.b.x"];
const FILTERS: [&str; 2] = ["p.a.*", "p.>"];
const KEYS: [&str; 3] = ["k1", "k2", "team.k3"];
const WINDOW_MS: u64 = 2_000;

#[derive(Clone, Debug)]
enum Op {
    Publish {
        subject: usize,
        msg_id: Option<u8>,
    },
    KvPut {
        key: usize,
        cond: u8,
        stale: u64,
    },
    KvDelete {
        key: usize,
        expected: Option<u64>,
    },
    KvPurge {
        key: usize,
    },
    Next {
        consumer: usize,
    },
    Settle {
        consumer: usize,
        pick: usize,
        kind: u8,
    },
    Advance {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..SUBJECTS.len(), proptest::option::of(0u8..6))
            .prop_map(|(subject, msg_id)| Op::Publish { subject, msg_id }),
        3 => (0..KEYS.len(), 0u8..4, 0u64..30).prop_map(|(key, cond, stale)| Op::KvPut { key, cond, stale }),
        1 => (0..KEYS.len(), proptest::option::of(0u64..30))
            .prop_map(|(key, expected)| Op::KvDelete { key, expected }),
        1 => (0..KEYS.len()).prop_map(|key| Op::KvPurge { key }),
        4 => (0..FILTERS.len()).prop_map(|consumer| Op::Next { consumer }),
        3 => (0..FILTERS.len(), 0usize..8, 0u8..3)
            .prop_map(|(consumer, pick, kind)| Op::Settle { consumer, pick, kind }),
        2 => (0u64..1_500).prop_map(|ms| Op::Advance { ms }),
    ]
}

fn setup() -> Broker {
    let mut b = Broker::new(Now::new(Instant::ZERO, UnixMillis(0)));
    b.add_stream(StreamSpec {
        name: "P".into(),
        subjects: vec!["p.>".into()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::Memory,
        max_msgs_per_subject: Some(4),
        max_bytes: None,
        max_msg_size: None,
        discard: None,
        duplicate_window: Some(Duration::from_millis(WINDOW_MS)),
        max_age: None,
        allow_direct: None,
        allow_rollup_hdrs: None,
        consumer_inactive_limit: None,
        num_replicas: None,
        max_consumers: None,
    })
    .unwrap();
    b.add_kv_bucket(&KvBucketSpec {
        bucket: "kv".into(),
        history: 2,
        ttl: None,
        max_consumers: None,
    })
    .unwrap();
    for (i, filter) in FILTERS.iter().enumerate() {
        let name = format!("c{i}");
        b.set_consumer_limits(
            "P",
            &name,
            ConsumerLimits {
                max_deliver: Some(4),
            },
        );
        b.add_consumer(ConsumerSpec {
            stream: "P".into(),
            name,
            durability: Durability::Durable,
            filter_subject: (*filter).into(),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Some(Duration::from_millis(1_000)),
            deliver_policy: Some(DeliverPolicy::All),
            max_ack_pending: Some(3),
            mem_storage: false,
            inactive_threshold: None,
        })
        .unwrap();
    }
    b
}

#[derive(Default)]
struct Model {
    now: u64,
    last_seq: u64,
    ids: BTreeMap<u8, (u64, u64)>,
    kv_last_rev: u64,
    /// key → (revision, is a value)
    kv: BTreeMap<String, (u64, bool)>,
    /// per consumer: seq → delivery count of outstanding deliveries
    outstanding: [BTreeMap<u64, u64>; 2],
    resolved: [BTreeSet<u64>; 2],
    counts: [BTreeMap<u64, u64>; 2],
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn stream_consumer_and_kv_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        let mut b = setup();
        let mut m = Model::default();
        for op in ops {
            match op {
                Op::Advance { ms } => {
                    m.now += ms;
                    b.advance(Now::new(Instant::from_millis(m.now), UnixMillis(m.now)));
                }
                Op::Publish { subject, msg_id } => {
                    let mut p = Publish::new(SUBJECTS[subject], Bytes::new());
                    p.msg_id = msg_id.map(|i| format!("id-{i}"));
                    let ack = b.publish(p).unwrap().ack;
                    let live = msg_id.and_then(|i| m.ids.get(&i).copied())
                        .filter(|(_, at)| at + WINDOW_MS > m.now);
                    match live {
                        Some((seq, _)) => {
                            prop_assert!(ack.duplicate);
                            prop_assert_eq!(ack.seq, seq, "a duplicate answers the original seq");
                        }
                        None => {
                            prop_assert!(!ack.duplicate);
                            prop_assert!(ack.seq > m.last_seq, "sequences strictly increase");
                            m.last_seq = ack.seq;
                            if let Some(i) = msg_id { m.ids.insert(i, (ack.seq, m.now)); }
                        }
                    }
                }
                Op::KvPut { key, cond, stale } => {
                    let key = KEYS[key];
                    let current = m.kv.get(key).copied();
                    let cur_rev = current.map_or(0, |c| c.0);
                    let condition = match cond {
                        0 => KvCondition::Any,
                        1 => KvCondition::CreateOnly,
                        2 => KvCondition::Revision(cur_rev),
                        _ => KvCondition::Revision(stale),
                    };
                    let result = b.kv_put("kv", key, Bytes::from_static(b"v"), condition);
                    match (condition, &result) {
                        (KvCondition::Revision(r), Ok(_)) => prop_assert_eq!(r, cur_rev, "a stale CAS never wins"),
                        (KvCondition::Revision(r), Err(Failure::WrongLastRevision { current })) => {
                            prop_assert_ne!(r, cur_rev);
                            prop_assert_eq!(*current, Some(cur_rev));
                        }
                        (KvCondition::CreateOnly, Ok(_)) => prop_assert!(!current.is_some_and(|c| c.1)),
                        (KvCondition::CreateOnly, Err(Failure::AlreadyExists)) => prop_assert!(current.is_some_and(|c| c.1)),
                        (KvCondition::Any, Ok(_)) => {}
                        (c, r) => prop_assert!(false, "unexpected {:?} for {:?}", r, c),
                    }
                    if let Ok(stored) = result {
                        prop_assert!(stored.seq > m.kv_last_rev, "revisions strictly increase");
                        m.kv_last_rev = stored.seq;
                        m.kv.insert(key.into(), (stored.seq, true));
                    }
                }
                Op::KvDelete { key, expected } => {
                    let key = KEYS[key];
                    let cur_rev = m.kv.get(key).map_or(0, |c| c.0);
                    match b.kv_delete("kv", key, expected) {
                        Ok(stored) => {
                            prop_assert!(expected.is_none_or(|e| e == cur_rev));
                            prop_assert!(stored.seq > m.kv_last_rev);
                            m.kv_last_rev = stored.seq;
                            m.kv.insert(key.into(), (stored.seq, false));
                        }
                        Err(Failure::WrongLastRevision { current }) => {
                            prop_assert!(expected.is_some_and(|e| e != cur_rev));
                            prop_assert_eq!(current, Some(cur_rev));
                        }
                        Err(e) => prop_assert!(false, "{e:?}"),
                    }
                }
                Op::KvPurge { key } => {
                    let key = KEYS[key];
                    let stored = b.kv_purge("kv", key, None).unwrap();
                    prop_assert!(stored.seq > m.kv_last_rev);
                    m.kv_last_rev = stored.seq;
                    m.kv.insert(key.into(), (stored.seq, false));
                    let history = b.kv_history("kv", key).unwrap();
                    prop_assert_eq!(history.len(), 1);
                    prop_assert_eq!(history[0].operation, KvOperation::Purge);
                }
                Op::Next { consumer } => {
                    let name = format!("c{consumer}");
                    if let Some(d) = b.next_delivery("P", &name) {
                        let seq = d.message.seq;
                        prop_assert!(subject_matches(FILTERS[consumer], &d.message.subject),
                            "delivered {} outside {}", d.message.subject, FILTERS[consumer]);
                        prop_assert!(!m.resolved[consumer].contains(&seq), "an acked or termed seq {} came back", seq);
                        let count = m.counts[consumer].entry(seq).or_insert(0);
                        *count += 1;
                        prop_assert_eq!(d.delivery_count, *count, "delivery counts go up by one");
                        prop_assert!(d.delivery_count <= 4, "max_deliver holds");
                        m.outstanding[consumer].insert(seq, d.delivery_count);
                    }
                }
                Op::Settle { consumer, pick, kind } => {
                    let name = format!("c{consumer}");
                    let keys: Vec<u64> = m.outstanding[consumer].keys().copied().collect();
                    if keys.is_empty() { continue; }
                    let seq = keys[pick % keys.len()];
                    let kind = match kind {
                        0 => AckKind::Ack,
                        1 => AckKind::Term,
                        _ => AckKind::Nak { delay: Duration::from_millis(200) },
                    };
                    b.settle("P", &name, seq, kind).unwrap();
                    if kind != (AckKind::Nak { delay: Duration::from_millis(200) }) {
                        m.outstanding[consumer].remove(&seq);
                        m.resolved[consumer].insert(seq);
                    }
                }
            }
            // The current KV view agrees with the model.
            for key in KEYS {
                let entry = b.kv_entry("kv", key).unwrap();
                let model = m.kv.get(key).copied();
                prop_assert_eq!(entry.as_ref().map(|e| e.revision), model.map(|c| c.0));
                prop_assert_eq!(entry.map(|e| e.operation == KvOperation::Put), model.map(|c| c.1));
            }
            let st = b.stream_state("P").unwrap();
            prop_assert!(st.last_seq >= m.last_seq);
        }
    }
}
