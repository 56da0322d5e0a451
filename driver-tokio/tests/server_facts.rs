//! What nats-server does that a protocol rule rests on, checked against the server CI installs
//! (skipped when `COTAL_NATS_SERVER` is unset). A failure here means a rule's premise changed.

mod common;

use async_nats::jetstream::{self, consumer::pull, stream};
use common::NatsServer;
use futures::StreamExt;
use std::time::Duration;

/// A per-subject cap (discard-old, limits retention, as INBOX and DLV are provisioned) rotates out
/// the oldest stored entry whether or not the filtered consumer acked it:
/// - an **ack-pending** entry rotated out is forgotten at once: it leaves the pending count and
///   the ack floor moves past it, so nothing the server reports afterwards shows it was unacked;
/// - **undelivered** entries rotated out leave the ack floor and the delivered sequence where
///   they were (below the subject's first stored sequence) until the consumer delivers past them.
///
/// So an unacked entry rotated out cannot be detected after the fact; the DLV gate prevents it
/// instead, counting an owner's stored copies above the ack floor (`delivery::backlog`, G6).
#[tokio::test]
async fn a_per_subject_cap_forgets_an_unacked_entry_it_rotates_out() {
    let Some(server) = NatsServer::start() else {
        return;
    };
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client);
    let s = js
        .create_stream(stream::Config {
            name: "CAP".into(),
            subjects: vec!["cap.*".into()],
            max_messages_per_subject: 5,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        })
        .await
        .expect("stream");
    let mut consumer = s
        .create_consumer(pull::Config {
            durable_name: Some("a".into()),
            filter_subject: "cap.a".into(),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let publish = |subject: &'static str, n: usize| {
        let js = js.clone();
        async move {
            for _ in 0..n {
                js.publish(subject, "x".into())
                    .await
                    .expect("publish")
                    .await
                    .expect("stored");
            }
        }
    };
    // cap.a holds 1, 2, 3, 5, 6; cap.b holds 4.
    publish("cap.a", 3).await;
    publish("cap.b", 1).await;
    publish("cap.a", 2).await;
    let mut batch = consumer
        .fetch()
        .max_messages(3)
        .messages()
        .await
        .expect("fetch");
    let mut got = Vec::new();
    while let Some(m) = batch.next().await {
        got.push(m.expect("message"));
    }
    let seqs: Vec<u64> = got
        .iter()
        .map(|m| m.info().expect("info").stream_sequence)
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    // 2 and 3 acked, 1 left unacked: out of order.
    got[1].double_ack().await.expect("ack 2");
    got[2].double_ack().await.expect("ack 3");
    let first_of_a = |s: stream::Stream| async move {
        s.get_first_raw_message_by_subject("cap.a", 0)
            .await
            .expect("first")
            .sequence
    };
    let i = consumer.info().await.expect("info").clone();
    assert_eq!(
        (
            i.ack_floor.stream_sequence,
            i.num_ack_pending,
            i.num_pending
        ),
        (0, 1, 2)
    );

    // Three more on cap.a (7, 8, 9) rotate out 1 (unacked), 2 and 3.
    publish("cap.a", 3).await;
    let i = consumer.info().await.expect("info").clone();
    assert_eq!(first_of_a(s.clone()).await, 5);
    assert_eq!(
        (i.ack_floor.stream_sequence, i.num_ack_pending),
        (3, 0),
        "the unacked entry is forgotten: the floor is past it, nothing is pending"
    );

    // Four more (10..13) rotate out 5, 6, 7, 8, never delivered.
    publish("cap.a", 4).await;
    let i = consumer.info().await.expect("info").clone();
    assert_eq!(first_of_a(s.clone()).await, 9);
    assert_eq!(
        (
            i.delivered.stream_sequence,
            i.ack_floor.stream_sequence,
            i.num_pending
        ),
        (3, 3, 5),
        "undelivered entries rotated out leave the floor below the subject's first entry"
    );

    // Past the ack wait, nothing comes back for 1; the next delivery is 9.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut batch = consumer
        .fetch()
        .max_messages(10)
        .messages()
        .await
        .expect("fetch");
    let mut seqs = Vec::new();
    while let Some(m) = batch.next().await {
        let m = m.expect("message");
        let info = m.info().expect("info");
        seqs.push((info.stream_sequence, info.delivered));
        m.double_ack().await.expect("ack");
    }
    assert_eq!(seqs, [(9, 1), (10, 1), (11, 1), (12, 1), (13, 1)]);
    let i = consumer.info().await.expect("info").clone();
    assert_eq!((i.ack_floor.stream_sequence, i.num_pending), (13, 0));
}
