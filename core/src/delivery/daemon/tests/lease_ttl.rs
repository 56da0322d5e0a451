//! The lease timed by the lease bucket's TTL (issue 19, [`DeliveryConfig::lease_ttl_from_bucket`]):
//! the daemon reads the bucket's `max_age` before every acquisition, renews within it, and does
//! not acquire on a guess.

use super::super::*;
use super::harness::*;

fn is_ttl_read(c: &Command) -> bool {
    matches!(c, Command::StreamInfo { stream, .. } if stream == "KV_cotal_delivery_main")
}

fn lease_writes(w: &World) -> usize {
    w.b.kv_seq.get("cotal_delivery_main").copied().unwrap_or(0) as usize
}

fn ttl_events(w: &World) -> Vec<Duration> {
    w.events
        .iter()
        .filter_map(|e| match e {
            DeliveryEvent::LeaseTtl { ttl } => Some(*ttl),
            _ => None,
        })
        .collect()
}

#[test]
fn a_bucket_with_the_reference_ttl_keeps_the_reference_timing() {
    let mut w = World::new();
    w.boot();
    assert!(w.d.serving(), "{}", w.log);
    assert_eq!(ttl_events(&w), vec![]);
    assert_eq!(w.d.lease_config().ttl(), crate::constants::LEASE_TTL);
}

#[test]
fn a_shorter_bucket_ttl_times_the_lease_and_the_renewals() {
    let mut w = World::new();
    w.b.lease_bucket_ttl_ms = Some(6_000);
    w.quiet_lease = false;
    w.boot();
    assert!(w.d.serving(), "{}", w.log);
    assert_eq!(ttl_events(&w), vec![Duration::from_millis(6_000)]);
    assert_eq!(w.d.lease_config().ttl(), Duration::from_millis(6_000));
    // Renewed every 3 s (half the TTL), not every 15 s: the lease stays held past the TTL.
    let before = lease_writes(&w);
    for _ in 0..10 {
        w.advance(1_000);
    }
    assert!(
        lease_writes(&w) >= before + 3,
        "renewed within the 6 s TTL\n{}",
        w.log
    );
    assert_eq!(w.d.lease_state(), LeaseState::Ready, "{}", w.log);
}

#[test]
fn an_unreadable_ttl_delays_the_acquisition_until_a_read_succeeds() {
    let mut w = World::new();
    w.rule(
        is_ttl_read,
        Effect::Answer(Outcome::Failed(Failure::Timeout)),
        2,
    );
    w.boot();
    assert_eq!(
        w.d.lease_state(),
        LeaseState::Idle,
        "no acquisition on a guess"
    );
    assert_eq!(lease_writes(&w), 0, "{}", w.log);
    assert!(
        w.events
            .iter()
            .any(|e| matches!(e, DeliveryEvent::LeaseTtlUnusable { .. })),
        "{:?}",
        w.events
    );
    w.advance(1_000);
    assert_eq!(lease_writes(&w), 0, "the second read failed too\n{}", w.log);
    w.advance(1_000);
    assert!(w.d.serving(), "the third read lets it acquire\n{}", w.log);
}

#[test]
fn a_ttl_too_short_to_renew_in_is_refused() {
    let mut w = World::new();
    w.b.lease_bucket_ttl_ms = Some(1_000);
    w.boot();
    assert_eq!(w.d.lease_state(), LeaseState::Idle);
    assert_eq!(lease_writes(&w), 0, "{}", w.log);
    let detail = w
        .events
        .iter()
        .find_map(|e| match e {
            DeliveryEvent::LeaseTtlUnusable { detail } => Some(detail.clone()),
            _ => None,
        })
        .expect("reported");
    assert!(detail.contains("1000"), "{detail}");
    // An operator lengthens it: the next read acquires.
    w.b.lease_bucket_ttl_ms = Some(10_000);
    w.advance(1_000);
    assert!(w.d.serving(), "{}", w.log);
    assert_eq!(w.d.lease_config().ttl(), Duration::from_millis(10_000));
}

#[test]
fn without_the_bucket_read_the_configured_timing_is_used() {
    let mut config = DeliveryConfig::new(space(), shard0(), "D1");
    config.lease_ttl_from_bucket = false;
    let mut w = World::with_config(config);
    w.b.lease_bucket_ttl_ms = Some(6_000);
    w.boot();
    assert!(w.d.serving(), "{}", w.log);
    assert!(
        !w.log.contains("stream.info KV_cotal_delivery_main"),
        "{}",
        w.log
    );
    assert_eq!(w.d.lease_config().ttl(), crate::constants::LEASE_TTL);
}

#[test]
fn a_retry_timer_due_while_a_read_is_in_flight_does_not_read_twice() {
    let mut w = World::new();
    // The first read fails (a retry is timed 1 s later), the connection drops and comes back,
    // and the read the reconnect issues is still unanswered when the retry comes due.
    w.rule(
        is_ttl_read,
        Effect::Answer(Outcome::Failed(Failure::Timeout)),
        1,
    );
    w.boot();
    w.feed(Input::Connection(Connection::Lost));
    w.run();
    w.rule(is_ttl_read, Effect::Hold, 1);
    w.feed(Input::Connection(Connection::Restored));
    w.run();
    assert_eq!(w.held.len(), 1, "{}", w.log);
    w.advance(1_500);
    let reads = w.log.matches("stream.info KV_cotal_delivery_main").count();
    assert_eq!(reads, 2, "one read per attempt, none doubled\n{}", w.log);
    w.release(0, None);
    assert!(w.d.serving(), "{}", w.log);
}

#[test]
fn a_new_incarnation_keeps_the_bucket_timing_and_does_not_report_it_again() {
    let mut w = World::new();
    w.b.lease_bucket_ttl_ms = Some(6_000);
    w.boot();
    assert!(w.d.serving(), "{}", w.log);
    // Another daemon's record replaces ours: the next renewal fails, the lease is lost, and the
    // daemon starts over, reading the TTL again before it contends.
    super::reacquire::successor_takes_the_key(&mut w);
    for _ in 0..20 {
        w.advance(500);
    }
    assert!(w.d.incarnation() >= 1, "{}", w.log);
    assert!(
        w.log.matches("stream.info KV_cotal_delivery_main").count() >= 2,
        "read again\n{}",
        w.log
    );
    assert_eq!(
        ttl_events(&w).len(),
        1,
        "reported once: {:?}",
        ttl_events(&w)
    );
    assert_eq!(w.d.lease_config().ttl(), Duration::from_millis(6_000));
}
