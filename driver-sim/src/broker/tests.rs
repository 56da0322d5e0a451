//! Broker semantics against what nats-notes records the real server doing.

use super::*;
use cotal_core::wire::config::{Durability, StorageType};

fn at(ms: u64) -> Now {
    Now::new(Instant::from_millis(ms), UnixMillis(1_000_000 + ms))
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

fn consumer(stream: &str, name: &str, filter: &str, policy: DeliverPolicy) -> ConsumerSpec {
    ConsumerSpec {
        stream: stream.into(),
        name: name.into(),
        durability: Durability::Durable,
        filter_subject: filter.into(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Some(Duration::from_millis(1000)),
        deliver_policy: Some(policy),
        max_ack_pending: None,
        mem_storage: false,
        inactive_threshold: None,
    }
}

fn pub_(b: &mut Broker, subject: &str) -> u64 {
    b.publish(Publish::new(subject, Bytes::from_static(b"x")))
        .expect("publish")
        .ack
        .seq
}

fn pub_id(b: &mut Broker, subject: &str, id: &str) -> PubAck {
    let mut p = Publish::new(subject, Bytes::from_static(b"x"));
    p.msg_id = Some(id.into());
    b.publish(p).expect("publish").ack
}

fn bucket(b: &mut Broker, name: &str, ttl: Option<Duration>) {
    b.add_kv_bucket(&KvBucketSpec {
        bucket: name.into(),
        history: 1,
        ttl,
        max_consumers: None,
    })
    .expect("bucket");
}

fn put(
    b: &mut Broker,
    bucket: &str,
    key: &str,
    v: &'static str,
    c: KvCondition,
) -> Result<u64, Failure> {
    b.kv_put(bucket, key, Bytes::from_static(v.as_bytes()), c)
        .map(|m| m.seq)
}

#[test]
fn per_subject_limit_discards_old_as_the_server_does() {
    // nats-notes §5.3: max_messages_per_subject=2, discard old: 3 publishes to lim.a leave seqs 2
    // and 3; with one on lim.b the state is messages=3 first_seq=2 last_seq=4.
    let mut b = Broker::default();
    let mut s = stream("LIM", "lim.>");
    s.max_msgs_per_subject = Some(2);
    s.discard = Some(DiscardPolicy::Old);
    b.add_stream(s).unwrap();
    for _ in 0..3 {
        pub_(&mut b, "lim.a");
    }
    pub_(&mut b, "lim.b");
    let st = b.stream_state("LIM").unwrap();
    assert_eq!((st.messages, st.first_seq, st.last_seq), (3, 2, 4));
    let a: Vec<u64> = b
        .read("LIM", "lim.a", ReadStart::Seq(1), None, 10)
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect();
    assert_eq!(a, vec![2, 3]);
}

#[test]
fn kv_history_one_keeps_the_latest_even_with_discard_new() {
    // A KV stream is discard=new, yet the per-subject limit still evicts the old revision.
    let mut b = Broker::default();
    bucket(&mut b, "kv", None);
    for v in ["1", "2", "3"] {
        put(&mut b, "kv", "k", v, KvCondition::Any).unwrap();
    }
    let h = b.kv_history("kv", "k").unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].value, Bytes::from_static(b"3"));
}

#[test]
fn duplicate_window_returns_the_original_seq_across_subjects_and_after_eviction() {
    // nats-notes §5.2 with duplicate_window = 1 s and 2 per subject.
    let mut b = Broker::default();
    let mut s = stream("D", "d.>");
    s.duplicate_window = Some(Duration::from_millis(1000));
    s.max_msgs_per_subject = Some(2);
    b.add_stream(s).unwrap();
    for _ in 0..4 {
        pub_(&mut b, "d.x");
    }
    let first = pub_id(&mut b, "d.a", "m-1");
    assert_eq!((first.seq, first.duplicate), (5, false));
    let again = pub_id(&mut b, "d.a", "m-1");
    assert_eq!((again.seq, again.duplicate), (5, true));
    let other_subject = pub_id(&mut b, "d.b", "m-1");
    assert_eq!((other_subject.seq, other_subject.duplicate), (5, true));
    // Evict seq 5 from d.a; the id still answers with the evicted sequence.
    pub_(&mut b, "d.a");
    pub_(&mut b, "d.a");
    assert_eq!(b.message("D", 5).unwrap(), None);
    b.advance(at(900));
    assert_eq!(pub_id(&mut b, "d.a", "m-1").seq, 5);
    // After the window the id is new.
    b.advance(at(1300));
    let fresh = pub_id(&mut b, "d.a", "m-1");
    assert_eq!((fresh.seq, fresh.duplicate), (8, false));
    // The stored message carries the msg-id header.
    let m = b.message("D", 8).unwrap().unwrap();
    assert_eq!(header(&m.headers, MSG_ID_HEADER), Some("m-1"));
}

#[test]
fn duplicate_window_is_capped_by_max_age() {
    let mut b = Broker::default();
    let mut s = stream("T", "t.>");
    s.max_age = Some(Duration::from_millis(1000));
    b.add_stream(s).unwrap();
    assert_eq!(pub_id(&mut b, "t.a", "x").seq, 1);
    b.advance(at(1001));
    let again = pub_id(&mut b, "t.a", "x");
    assert_eq!((again.seq, again.duplicate), (2, false));
}

#[test]
fn stream_create_is_idempotent_and_refuses_another_config() {
    let mut b = Broker::default();
    b.add_stream(stream("S", "s.>")).unwrap();
    b.add_stream(stream("S", "s.>")).unwrap();
    let err = b.add_stream(stream("S", "other.>")).unwrap_err();
    assert!(matches!(
        err,
        Failure::Rejected {
            code: Some(10058),
            ..
        }
    ));
    assert_eq!(
        b.publish(Publish::new("nowhere", Bytes::new()))
            .unwrap_err(),
        Failure::NotFound
    );
}

#[test]
fn kv_cas_codes_match_async_nats() {
    // nats-notes §6.
    let mut b = Broker::default();
    bucket(&mut b, "kv", None);
    let r1 = put(&mut b, "kv", "alice", "a", KvCondition::CreateOnly).unwrap();
    assert_eq!(
        put(&mut b, "kv", "alice", "a2", KvCondition::CreateOnly),
        Err(Failure::AlreadyExists)
    );
    let r2 = put(&mut b, "kv", "alice", "b", KvCondition::Revision(r1)).unwrap();
    assert!(r2 > r1);
    // Stale revision: refused with the current one.
    assert_eq!(
        put(&mut b, "kv", "alice", "c", KvCondition::Revision(r1)),
        Err(Failure::WrongLastRevision { current: Some(r2) })
    );
    // update(absent, 0) succeeds; update(absent, 999) is refused.
    assert!(put(&mut b, "kv", "nobody", "n", KvCondition::Revision(0)).is_ok());
    assert_eq!(
        put(&mut b, "kv", "ghost", "g", KvCondition::Revision(999)),
        Err(Failure::WrongLastRevision { current: Some(0) })
    );
    // Delete with a stale expected revision.
    assert_eq!(
        b.kv_delete("kv", "alice", Some(r1)).map(|m| m.seq),
        Err(Failure::WrongLastRevision { current: Some(r2) })
    );
    // Invalid key.
    assert!(matches!(
        put(&mut b, "kv", "has space", "v", KvCondition::Any),
        Err(Failure::Rejected { .. })
    ));
    assert_eq!(
        b.kv_get("nope", "k").unwrap_err(),
        Failure::NotFound,
        "unknown bucket"
    );
}

#[test]
fn create_succeeds_over_delete_and_purge_markers() {
    let mut b = Broker::default();
    bucket(&mut b, "kv", None);
    put(&mut b, "kv", "bob", "1", KvCondition::Any).unwrap();
    let del = b.kv_delete("kv", "bob", None).unwrap().seq;
    // entry returns the tombstone, get does not.
    let e = b.kv_entry("kv", "bob").unwrap().unwrap();
    assert_eq!((e.operation, e.revision), (KvOperation::Delete, del));
    assert_eq!(b.kv_get("kv", "bob").unwrap(), None);
    assert_eq!(b.kv_revision("kv", "bob").unwrap(), del);
    let again = put(&mut b, "kv", "bob", "2", KvCondition::CreateOnly).unwrap();
    assert!(again > del);
    let purge = b.kv_purge("kv", "bob", None).unwrap().seq;
    assert_eq!(
        b.kv_entry("kv", "bob").unwrap().map(|e| e.operation),
        Some(KvOperation::Purge)
    );
    assert!(put(&mut b, "kv", "bob", "3", KvCondition::CreateOnly).unwrap() > purge);
    assert_eq!(b.kv_keys("kv").unwrap(), vec!["bob".to_owned()]);
    b.kv_delete("kv", "bob", None).unwrap();
    assert!(b.kv_keys("kv").unwrap().is_empty(), "keys exclude markers");
}

#[test]
fn purge_removes_every_earlier_revision() {
    let mut b = Broker::default();
    b.add_kv_bucket(&KvBucketSpec {
        bucket: "h".into(),
        history: 5,
        ttl: None,
        max_consumers: None,
    })
    .unwrap();
    for v in ["1", "2", "3"] {
        put(&mut b, "h", "k", v, KvCondition::Any).unwrap();
    }
    assert_eq!(b.kv_history("h", "k").unwrap().len(), 3);
    b.kv_purge("h", "k", None).unwrap();
    let h = b.kv_history("h", "k").unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].operation, KvOperation::Purge);
}

#[test]
fn bucket_ttl_expires_keys_and_create_works_again() {
    // nats-notes §6: max_age 1 s, entry gone after 1.7 s, create works again.
    let mut b = Broker::default();
    bucket(&mut b, "p", Some(Duration::from_millis(1000)));
    put(&mut b, "p", "me", "on", KvCondition::CreateOnly).unwrap();
    b.advance(at(999));
    assert!(b.kv_get("p", "me").unwrap().is_some());
    b.advance(at(1700));
    assert_eq!(b.kv_entry("p", "me").unwrap(), None);
    assert!(put(&mut b, "p", "me", "on", KvCondition::CreateOnly).is_ok());
}

/// The ORD stream of nats-notes §5.4: odd seqs on ord.a, even on ord.b, 10 messages.
fn ord() -> Broker {
    let mut b = Broker::default();
    b.add_stream(stream("ORD", "ord.>")).unwrap();
    for i in 1..=10 {
        pub_(&mut b, if i % 2 == 1 { "ord.a" } else { "ord.b" });
    }
    b
}

fn next(b: &mut Broker, c: &str) -> Option<(u64, u64)> {
    b.next_delivery("ORD", c)
        .map(|d| (d.message.seq, d.delivery_count))
}

#[test]
fn ack_nak_term_ack_wait_and_max_deliver_as_observed() {
    let mut b = ord();
    b.set_consumer_limits(
        "ORD",
        "c",
        ConsumerLimits {
            max_deliver: Some(3),
        },
    );
    b.add_consumer(consumer(
        "ORD",
        "c",
        "ord.a",
        DeliverPolicy::ByStartSequence(3),
    ))
    .unwrap();
    let info = b.consumer_info("ORD", "c").unwrap();
    assert_eq!((info.delivered_stream_seq, info.num_pending), (2, 4));
    let batch: Vec<_> = std::iter::from_fn(|| next(&mut b, "c")).collect();
    assert_eq!(batch, vec![(3, 1), (5, 1), (7, 1), (9, 1)]);
    b.settle("ORD", "c", 3, AckKind::Ack).unwrap();
    b.settle(
        "ORD",
        "c",
        5,
        AckKind::Nak {
            delay: Duration::ZERO,
        },
    )
    .unwrap();
    b.settle(
        "ORD",
        "c",
        7,
        AckKind::Nak {
            delay: Duration::from_millis(700),
        },
    )
    .unwrap();
    b.settle("ORD", "c", 9, AckKind::Term).unwrap();
    let info = b.consumer_info("ORD", "c").unwrap();
    assert_eq!(
        (
            info.delivered_stream_seq,
            info.ack_floor,
            info.num_ack_pending
        ),
        (9, 4, 2)
    );
    // Plain nak: redelivered at once.
    assert_eq!(next(&mut b, "c"), Some((5, 2)));
    assert_eq!(next(&mut b, "c"), None);
    assert_eq!(
        b.consumer_next_due("ORD", "c"),
        Some(Instant::from_millis(700))
    );
    // Nak delay honoured.
    b.advance(at(699));
    assert_eq!(next(&mut b, "c"), None);
    b.advance(at(700));
    assert_eq!(next(&mut b, "c"), Some((7, 2)));
    b.settle("ORD", "c", 7, AckKind::Ack).unwrap();
    // seq 5 never acked: redelivered after ack_wait (1 s after its redelivery at 0).
    b.advance(at(1000));
    assert_eq!(next(&mut b, "c"), Some((5, 3)));
    // max_deliver = 3: never again, out of ack pending, but it holds the ack floor.
    b.advance(at(5000));
    assert_eq!(next(&mut b, "c"), None);
    let info = b.consumer_info("ORD", "c").unwrap();
    assert_eq!(
        (info.num_ack_pending, info.num_exhausted, info.ack_floor),
        (0, 1, 4)
    );
    // The termed seq 9 never comes back either.
    b.advance(at(60_000));
    assert_eq!(next(&mut b, "c"), None);
}

#[test]
fn an_acked_message_is_never_redelivered_and_a_late_ack_is_a_no_op() {
    let mut b = ord();
    b.add_consumer(consumer("ORD", "c", "ord.>", DeliverPolicy::All))
        .unwrap();
    assert_eq!(next(&mut b, "c"), Some((1, 1)));
    b.settle("ORD", "c", 1, AckKind::Ack).unwrap();
    b.settle("ORD", "c", 1, AckKind::Ack).unwrap();
    b.settle(
        "ORD",
        "c",
        1,
        AckKind::Nak {
            delay: Duration::ZERO,
        },
    )
    .unwrap();
    b.advance(at(10_000));
    let seqs: Vec<u64> = std::iter::from_fn(|| next(&mut b, "c"))
        .map(|d| d.0)
        .collect();
    assert!(!seqs.contains(&1), "{seqs:?}");
    assert_eq!(
        b.settle("ORD", "gone", 1, AckKind::Ack),
        Err(Failure::NotFound)
    );
}

#[test]
fn max_ack_pending_bounds_outstanding_deliveries() {
    let mut b = ord();
    let mut spec = consumer("ORD", "c", "ord.>", DeliverPolicy::All);
    spec.max_ack_pending = Some(2);
    b.add_consumer(spec).unwrap();
    assert_eq!(next(&mut b, "c"), Some((1, 1)));
    assert_eq!(next(&mut b, "c"), Some((2, 1)));
    assert_eq!(next(&mut b, "c"), None);
    b.settle("ORD", "c", 1, AckKind::Ack).unwrap();
    assert_eq!(next(&mut b, "c"), Some((3, 1)));
}

#[test]
fn deliver_policies_pick_their_start() {
    let mut b = ord();
    b.add_consumer(consumer("ORD", "new", "ord.>", DeliverPolicy::New))
        .unwrap();
    b.add_consumer(consumer("ORD", "last", "ord.a", DeliverPolicy::Last))
        .unwrap();
    b.add_consumer(consumer(
        "ORD",
        "lps",
        "ord.>",
        DeliverPolicy::LastPerSubject,
    ))
    .unwrap();
    b.add_consumer(consumer(
        "ORD",
        "time",
        "ord.>",
        DeliverPolicy::ByStartTime(UnixMillis(0)),
    ))
    .unwrap();
    assert_eq!(next(&mut b, "new"), None);
    assert_eq!(next(&mut b, "last"), Some((9, 1)));
    assert_eq!(next(&mut b, "last"), None);
    let lps: Vec<u64> = std::iter::from_fn(|| next(&mut b, "lps"))
        .map(|d| d.0)
        .collect();
    assert_eq!(lps, vec![9, 10]);
    assert_eq!(next(&mut b, "time"), Some((1, 1)));
    let s11 = pub_(&mut b, "ord.a");
    assert_eq!(next(&mut b, "new"), Some((s11, 1)));
    assert_eq!(next(&mut b, "lps"), Some((s11, 1)));
    // A changed deliver policy cannot be applied to an existing consumer.
    assert!(matches!(
        b.add_consumer(consumer("ORD", "new", "ord.>", DeliverPolicy::All)),
        Err(Failure::Rejected {
            code: Some(10012),
            ..
        })
    ));
}

#[test]
fn work_queue_ack_removes_and_overlapping_filters_are_refused() {
    let mut b = Broker::default();
    let mut s = stream("WQ", "wq.>");
    s.retention = RetentionPolicy::WorkQueue;
    b.add_stream(s).unwrap();
    b.add_consumer(consumer("WQ", "one", "wq.a.*", DeliverPolicy::All))
        .unwrap();
    assert!(matches!(
        b.add_consumer(consumer("WQ", "two", "wq.>", DeliverPolicy::All)),
        Err(Failure::Rejected {
            code: Some(10100),
            ..
        })
    ));
    b.add_consumer(consumer("WQ", "three", "wq.b.*", DeliverPolicy::All))
        .unwrap();
    let seq = pub_(&mut b, "wq.a.x");
    pub_(&mut b, "wq.b.x");
    assert_eq!(b.stream_state("WQ").unwrap().messages, 2);
    let d = b.next_delivery("WQ", "one").unwrap();
    assert_eq!(d.message.seq, seq);
    b.settle("WQ", "one", seq, AckKind::Ack).unwrap();
    assert_eq!(b.stream_state("WQ").unwrap().messages, 1);
}

#[test]
fn interest_stream_without_consumers_keeps_nothing() {
    let mut b = Broker::default();
    let mut s = stream("I", "i.>");
    s.retention = RetentionPolicy::Interest;
    b.add_stream(s).unwrap();
    let p = b.publish(Publish::new("i.a", Bytes::new())).unwrap();
    assert_eq!((p.ack.seq, p.stored), (1, None));
    let st = b.stream_state("I").unwrap();
    assert_eq!((st.messages, st.last_seq), (0, 1));
    b.add_consumer(consumer("I", "c1", "i.>", DeliverPolicy::New))
        .unwrap();
    b.add_consumer(consumer("I", "c2", "i.>", DeliverPolicy::New))
        .unwrap();
    let seq = pub_(&mut b, "i.a");
    b.next_delivery("I", "c1").unwrap();
    b.next_delivery("I", "c2").unwrap();
    b.settle("I", "c1", seq, AckKind::Ack).unwrap();
    assert_eq!(
        b.stream_state("I").unwrap().messages,
        1,
        "c2 still has interest"
    );
    b.settle("I", "c2", seq, AckKind::Ack).unwrap();
    assert_eq!(b.stream_state("I").unwrap().messages, 0);
}

#[test]
fn reads_by_sequence_time_filter_and_bound() {
    let mut b = Broker::default();
    b.add_stream(stream("R", "r.>")).unwrap();
    for i in 0..6u64 {
        b.advance(at(i * 10));
        pub_(&mut b, if i % 2 == 0 { "r.a" } else { "r.b" });
    }
    let seqs = |v: Vec<StoredMessage>| v.into_iter().map(|m| m.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(b.read("R", "r.a", ReadStart::Seq(2), None, 10).unwrap()),
        vec![3, 5]
    );
    assert_eq!(
        seqs(b.read("R", "r.>", ReadStart::Seq(1), Some(3), 10).unwrap()),
        vec![1, 2, 3]
    );
    assert_eq!(
        seqs(b.read("R", "r.>", ReadStart::Seq(1), None, 2).unwrap()),
        vec![1, 2]
    );
    assert_eq!(
        seqs(
            b.read("R", "r.>", ReadStart::Time(UnixMillis(1_000_030)), None, 10)
                .unwrap()
        ),
        vec![4, 5, 6]
    );
    assert_eq!(
        b.read("nope", ">", ReadStart::Seq(1), None, 1),
        Err(Failure::NotFound)
    );
}

#[test]
fn expected_last_subject_sequence_reports_the_current_one() {
    let mut b = Broker::default();
    b.add_stream(stream("E", "e.>")).unwrap();
    pub_(&mut b, "e.a");
    pub_(&mut b, "e.b");
    let mut p = Publish::new("e.a", Bytes::new());
    p.expected_last_subject_seq = Some(2);
    assert_eq!(
        b.publish(p.clone()).unwrap_err(),
        Failure::WrongLastRevision { current: Some(1) }
    );
    p.expected_last_subject_seq = Some(1);
    assert_eq!(b.publish(p).unwrap().ack.seq, 3);
}

#[test]
fn overlap_and_key_helpers() {
    assert!(patterns_overlap("a.*", "a.b"));
    assert!(patterns_overlap("a.>", "*.b.c"));
    assert!(!patterns_overlap("a.b", "a.c"));
    assert!(!patterns_overlap("a.b", "a.b.c"));
    assert!(valid_kv_key("lease.0"));
    assert!(valid_kv_key("team.backend/ABC"));
    assert!(!valid_kv_key(""));
    assert!(!valid_kv_key(".a"));
    assert!(!valid_kv_key("a b"));
}

/// Issue 22: a stream's consumer cap, as nats-server 2.15 enforces it. With `max_consumers` set,
/// a new consumer past it is refused (10026) while an existing one still updates; the count and
/// the cap are what `STREAM.INFO` reports. Without one, the server's default of 1,000 applies.
#[test]
fn a_stream_refuses_a_new_consumer_past_its_cap() {
    let mut b = Broker::default();
    b.add_stream(StreamSpec {
        max_consumers: Some(2),
        ..stream("CAP", "cap.>")
    })
    .unwrap();
    for name in ["a", "b"] {
        b.add_consumer(consumer("CAP", name, "cap.>", DeliverPolicy::All))
            .unwrap();
    }
    let refused = b
        .add_consumer(consumer("CAP", "c", "cap.>", DeliverPolicy::All))
        .unwrap_err();
    assert_eq!(
        refused,
        Failure::Rejected {
            code: Some(err_code::MAX_CONSUMERS_REACHED),
            description: "maximum consumers limit reached".into(),
        }
    );
    let mut update = consumer("CAP", "a", "cap.x", DeliverPolicy::All);
    update.max_ack_pending = Some(5);
    b.add_consumer(update).unwrap();
    let state = b.stream_state("CAP").unwrap();
    assert_eq!((state.consumers, state.max_consumers), (2, 2));

    b.add_stream(stream("DEF", "def.>")).unwrap();
    for i in 0..1_000 {
        b.add_consumer(consumer(
            "DEF",
            &format!("c{i}"),
            "def.>",
            DeliverPolicy::All,
        ))
        .unwrap();
    }
    assert!(
        b.add_consumer(consumer("DEF", "one-more", "def.>", DeliverPolicy::All))
            .is_err()
    );
    let state = b.stream_state("DEF").unwrap();
    assert_eq!((state.consumers, state.max_consumers), (1_000, -1));
}
