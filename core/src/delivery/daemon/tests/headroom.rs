//! The daemon's consumer-headroom check (issue 22): CHAT and DLV read one interval after the
//! daemon starts serving and every interval after; a crossing of the low mark either way is one event,
//! a fall is counted, and the lease record carries the last reading.

use super::super::*;
use super::harness::*;
use super::{lease_bucket, served};
use crate::constants::CONSUMER_HEADROOM_INTERVAL;

fn headroom_events(w: &World) -> Vec<(String, u64, u64, bool)> {
    w.events
        .iter()
        .filter_map(|e| match e {
            DeliveryEvent::ConsumerHeadroom {
                stream,
                headroom,
                low,
            } => Some((stream.clone(), headroom.consumers, headroom.cap, *low)),
            _ => None,
        })
        .collect()
}

fn published(w: &World) -> serde_json::Value {
    let lease = w.b.kv_value(&lease_bucket(), "lease.0").expect("lease");
    let v: serde_json::Value = serde_json::from_slice(&lease.value).expect("json");
    v["consumerHeadroom"].clone()
}

/// Advances `ms` in 5 s steps (the lease renews in between).
fn run_for(w: &mut World, ms: u64) {
    for _ in 0..ms / 5_000 {
        w.advance(5_000);
    }
}

fn stream_infos(w: &World) -> usize {
    w.log.matches("stream.info DLV_main").count()
}

#[test]
fn a_stream_falling_under_ten_percent_free_is_reported_once_and_published() {
    let mut w = served();
    assert_eq!(
        stream_infos(&w),
        0,
        "no reading before the first interval: {}",
        w.log
    );
    // The first reading: both streams ample, no event.
    run_for(&mut w, CONSUMER_HEADROOM_INTERVAL.as_millis());
    assert_eq!(stream_infos(&w), 1, "{}", w.log);
    assert!(headroom_events(&w).is_empty(), "{:?}", w.events);
    assert_eq!(w.d.consumer_headroom().len(), 2);

    // DLV fills to 95 of 100: low at the next reading, once.
    w.b.stream_consumers.insert("DLV_main".into(), (95, 100));
    run_for(&mut w, CONSUMER_HEADROOM_INTERVAL.as_millis());
    assert_eq!(stream_infos(&w), 2, "{}", w.log);
    assert_eq!(
        headroom_events(&w),
        vec![("DLV_main".to_owned(), 95, 100, true)]
    );
    assert_eq!(w.d.counters().consumer_headroom_low, 1);
    run_for(&mut w, CONSUMER_HEADROOM_INTERVAL.as_millis());
    assert_eq!(headroom_events(&w).len(), 1, "still low: no second event");
    assert_eq!(w.d.counters().consumer_headroom_low, 1);
    // Published with the next lease write, for `cotal health`.
    run_for(&mut w, 10_000);
    let p = published(&w);
    assert_eq!(p["DLV_main"]["consumers"], 95, "{p}");
    assert_eq!(p["DLV_main"]["cap"], 100, "{p}");
    assert_eq!(p["DLV_main"]["low"], true, "{p}");
    assert_eq!(p["CHAT_main"]["low"], false, "{p}");
    // A stream without a cap of its own is judged against the server's default.
    assert_eq!(p["CHAT_main"]["serverDefault"], true, "{p}");

    // Raised by the operator: back above the mark, one event, not counted.
    w.b.stream_consumers.insert("DLV_main".into(), (95, 1_000));
    run_for(&mut w, CONSUMER_HEADROOM_INTERVAL.as_millis());
    assert_eq!(
        headroom_events(&w).last(),
        Some(&("DLV_main".to_owned(), 95, 1_000, false))
    );
    assert_eq!(headroom_events(&w).len(), 2);
    assert_eq!(w.d.counters().consumer_headroom_low, 1);
}

#[test]
fn a_failed_reading_changes_nothing_and_the_next_interval_reads_again() {
    let mut w = served();
    w.b.stream_consumers
        .insert("CHAT_main".into(), (999, 1_000));
    w.rules.push(Rule {
        matches: Box::new(
            |c| matches!(c, Command::StreamInfo { stream, .. } if stream == "CHAT_main"),
        ),
        effect: Effect::Answer(crate::op::Outcome::Failed(crate::op::Failure::Timeout)),
        times: 1,
    });
    run_for(&mut w, CONSUMER_HEADROOM_INTERVAL.as_millis());
    assert!(headroom_events(&w).is_empty(), "{:?}", w.events);
    run_for(&mut w, CONSUMER_HEADROOM_INTERVAL.as_millis());
    assert_eq!(
        headroom_events(&w),
        vec![("CHAT_main".to_owned(), 999, 1_000, true)],
        "{}",
        w.log
    );
}
